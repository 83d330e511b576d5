"""The crate boundaries the README's layout table promises, checked on the dependency graph.

The core crate must build without any AWS SDK crate, SQLite or lambda_runtime (what a function
that only uses the core links, dev-dependencies included, since `cargo tree -p shardwise` is what
a user looks at); the AWS adapters must not pull in SQLite; the Lambda functions must not link
SQLite unless built with their `local` feature.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
CARGO = shutil.which("cargo")


def tree(*args: str) -> set[str]:
    out = subprocess.run(
        [CARGO, "tree", "--offline", "--prefix", "none", "--format", "{p}", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {line.split(" ")[0] for line in out.splitlines() if line.strip()}


pytestmark = pytest.mark.skipif(CARGO is None, reason="cargo is not on PATH")


def test_the_core_links_no_aws_sdk_sqlite_or_lambda_runtime():
    crates = tree("-p", "shardwise")
    assert not {c for c in crates if c.startswith(("aws-sdk-", "aws-config", "aws-smithy"))}
    assert "rusqlite" not in crates
    assert "lambda_runtime" not in crates


def test_the_aws_adapters_link_no_sqlite():
    assert "rusqlite" not in tree("-p", "shardwise-aws", "-e", "normal")


@pytest.mark.parametrize("function", ["fraud", "aggregation", "canary"])
def test_lambda_builds_carry_no_sqlite(function):
    assert "rusqlite" not in tree("-p", function, "-e", "normal")


def test_the_local_feature_brings_the_embedded_backends():
    assert "rusqlite" in tree("-p", "fraud", "-e", "normal", "--features", "local")
