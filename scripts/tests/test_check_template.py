"""The template checker must fail on each regression it exists to catch.

Each case breaks one thing in a copy of template.yaml (or samconfig.toml) and asserts that
scripts/check_template.py fails with the rule that covers it. Without these, a checker that
silently passes everything would look exactly like a good template.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import check_template  # noqa: E402

SOURCE, _ = check_template.load_template(ROOT / "template.yaml")


def fraud_event(t: dict) -> dict:
    return t["Resources"]["FraudFunction"]["Properties"]["Events"]["Stream"]["Properties"]


def aggregation_event(t: dict) -> dict:
    return t["Resources"]["AggregationFunction"]["Properties"]["Events"]["Stream"]["Properties"]


def run_checker(tmp_path: Path, template: dict, *extra: str, samconfig: Path | None = None) -> tuple[int, str]:
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template))
    args = ["--template", str(path), "--samconfig", str(samconfig or ROOT / "samconfig.toml"),
            "--output", str(tmp_path / "translated.json"), *extra]
    return subprocess_free_main(args)


def subprocess_free_main(args: list[str]) -> tuple[int, str]:
    """Runs the checker in this process (the translator import is paid once) and captures its output."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = check_template.main(args)
    return code, buffer.getvalue()


def set_(fn: Callable[[dict], dict], key: str, value) -> Callable[[dict], None]:
    def mutate(t: dict) -> None:
        fn(t)[key] = value

    return mutate


def delete(fn: Callable[[dict], dict], key: str) -> Callable[[dict], None]:
    def mutate(t: dict) -> None:
        del fn(t)[key]

    return mutate


def add_wildcard_statement(t: dict) -> None:
    statements = t["Resources"]["FraudRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    statements.append({"Sid": "Oops", "Effect": "Allow", "Action": "kinesis:Get*", "Resource": "*"})


def add_table_wildcard_statement(t: dict) -> None:
    statements = t["Resources"]["CanaryRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    statements.append({
        "Sid": "AllTables",
        "Effect": "Allow",
        "Action": ["dynamodb:PutItem"],
        "Resource": {"Fn::Sub": "arn:${AWS::Partition}:dynamodb:${AWS::Region}:${AWS::AccountId}:table/*"},
    })


def drop_role(t: dict) -> None:
    # SAM then generates a role with the managed AWSLambdaKinesisExecutionRole (kinesis:Get* on "*").
    del t["Resources"]["FraudFunction"]["Properties"]["Role"]


def on_failure_to_our_dlq(t: dict) -> None:
    fraud_event(t)["DestinationConfig"]["OnFailure"]["Destination"] = {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}


def unbounded_record_age(t: dict) -> None:
    del t["Parameters"]["FraudMaximumRecordAgeInSeconds"]["MaxValue"]


def allow_starting_position(t: dict) -> None:
    t["Parameters"]["AggregationStartingPosition"]["AllowedValues"].append("NEWEST")


def drop_env(t: dict) -> None:
    del t["Resources"]["FraudFunction"]["Properties"]["Environment"]["Variables"]["CARD_STATE_TABLE"]


def wrong_table_key(t: dict) -> None:
    t["Resources"]["CanaryTable"]["Properties"]["KeySchema"] = [{"AttributeName": "canary_id", "KeyType": "HASH"}]


def drop_iterator_age_alarm(t: dict) -> None:
    del t["Resources"]["AggregationIteratorAgeAlarm"]
    body = t["Resources"]["Dashboard"]["Properties"]["DashboardBody"]
    body["Fn::Sub"] = body["Fn::Sub"].replace('"${AggregationIteratorAgeAlarm.Arn}", ', "")


def drop_emf_metric_from_dashboard(t: dict) -> None:
    body = t["Resources"]["Dashboard"]["Properties"]["DashboardBody"]
    body["Fn::Sub"] = body["Fn::Sub"].replace("RecordsDeadLettered", "RecordsDropped")


CASES = {
    "bisect off": (set_(fraud_event, "BisectBatchOnFunctionError", False), "esm.BisectBatchOnFunctionError"),
    "batch size 20000": (set_(aggregation_event, "BatchSize", 20000), "esm.BatchSize"),
    "infinite retries": (set_(fraud_event, "MaximumRetryAttempts", -1), "esm.MaximumRetryAttempts"),
    "retries absent": (delete(fraud_event, "MaximumRetryAttempts"), "esm.MaximumRetryAttempts"),
    "infinite record age": (set_(aggregation_event, "MaximumRecordAgeInSeconds", -1), "esm.MaximumRecordAgeInSeconds"),
    "record age parameter unbounded": (unbounded_record_age, "esm.MaximumRecordAgeInSeconds"),
    "no partial batch response": (delete(fraud_event, "FunctionResponseTypes"), "esm.FunctionResponseTypes"),
    "no on-failure destination": (delete(aggregation_event, "DestinationConfig"), "esm.DestinationConfig.OnFailure"),
    "on-failure into our payload DLQ": (on_failure_to_our_dlq, "esm.DestinationConfig.OnFailure"),
    "starting position NEWEST": (set_(fraud_event, "StartingPosition", "NEWEST"), "esm.StartingPosition"),
    "starting position parameter allows NEWEST": (allow_starting_position, "esm.StartingPosition"),
    "no tumbling window on aggregation": (delete(aggregation_event, "TumblingWindowInSeconds"), "esm.TumblingWindowInSeconds"),
    "parallelization 11": (set_(fraud_event, "ParallelizationFactor", 11), "esm.ParallelizationFactor"),
    "kinesis:Get* on *": (add_wildcard_statement, "iam.wildcard-resource"),
    "dynamodb on table/*": (add_table_wildcard_statement, "iam.wildcard-resource"),
    "SAM-generated role": (drop_role, "iam.managed-policy"),
    "env var missing": (drop_env, "function.env"),
    "canary table without sort key": (wrong_table_key, "function.table"),
    "iterator age alarm missing": (drop_iterator_age_alarm, "alarm.present"),
    "EMF metric missing from dashboard": (drop_emf_metric_from_dashboard, "dashboard.emf"),
}


def test_real_template_passes(tmp_path: Path) -> None:
    code, out = run_checker(tmp_path, SOURCE, "--skip-cfn-lint")
    assert code == 0, out
    assert "0 failed" in out


@pytest.mark.parametrize("case", sorted(CASES))
def test_checker_fails_on(case: str, tmp_path: Path) -> None:
    mutate, rule = CASES[case]
    broken = copy.deepcopy(SOURCE)
    mutate(broken)
    code, out = run_checker(tmp_path, broken, "--skip-cfn-lint")
    assert code == 1, f"checker passed a template with {case}:\n{out}"
    assert f"FAIL [{rule}]" in out, out


def test_samconfig_override_out_of_range_fails(tmp_path: Path) -> None:
    samconfig = tmp_path / "samconfig.toml"
    samconfig.write_text(
        'version = 0.1\n[prod.deploy.parameters]\nparameter_overrides = ["FraudBatchSize=20000"]\n'
    )
    code, out = run_checker(tmp_path, SOURCE, "--skip-cfn-lint", samconfig=samconfig)
    assert code == 1, out
    assert "samconfig [prod.deploy]" in out and "FAIL [esm.BatchSize]" in out, out


def test_cfn_lint_sees_generated_mapping(tmp_path: Path) -> None:
    """cfn-lint alone passes BatchSize 20000 on template.yaml; on the transformed template it must not."""
    broken = copy.deepcopy(SOURCE)
    aggregation_event(broken)["BatchSize"] = 20000
    code, out = run_checker(tmp_path, broken, "--skip-assertions")
    assert code == 1, out
    assert "FAIL [cfn-lint E3034] Resources/AggregationFunctionStream/Properties/BatchSize" in out, out


def test_command_line_exit_status(tmp_path: Path) -> None:
    """The CLI (what make runs) exits non-zero on a broken template."""
    broken = copy.deepcopy(SOURCE)
    fraud_event(broken)["BisectBatchOnFunctionError"] = False
    path = tmp_path / "template.json"
    path.write_text(json.dumps(broken))
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "check_template.py"), "--template", str(path), "--skip-cfn-lint",
         "--output", str(tmp_path / "translated.json")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BisectBatchOnFunctionError" in proc.stdout
