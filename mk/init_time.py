#!/usr/bin/env python3
"""Cold-start cost of the function binaries: process start to the first Runtime API `/next`.

    python3 mk/init_time.py [--runs 30] [--env NAME=VALUE ...] BOOTSTRAP [BOOTSTRAP ...]

For each bootstrap (e.g. target/lambda/fraud/bootstrap from `cargo lambda build --release`), runs
it `--runs` times against a fake Lambda Runtime API on loopback and prints, per binary, the time
from just before the process is spawned to the moment its first `GET /2018-06-01/runtime/
invocation/next` arrives: everything a cold start does before it can take an event — reading the
settings, building the AWS SDK configuration and clients, the processor, the runtime. The process
is then killed (no event is served). The spawn itself (fork/exec from Python, ~1 ms) is included,
so the figures slightly overstate the function's own init.

The environment is Lambda's (AWS_LAMBDA_* variables, region, credentials in variables as Lambda
provides them) plus every variable the functions require, pointing nowhere: init makes no AWS call.
"""

import argparse
import http.server
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ENVIRONMENT = {
    "AWS_LAMBDA_FUNCTION_NAME": "init-time",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
    "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/init-time",
    "AWS_LAMBDA_LOG_STREAM_NAME": "init-time",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_SESSION_TOKEN": "test",
    "RUST_LOG": "info",
    "DEAD_LETTER_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/dlq",
    "ALERTS_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/alerts",
    "CARD_STATE_TABLE": "cards",
    "CANARY_TABLE": "canary",
    "AGGREGATES_TABLE": "aggregates",
    "IDEMPOTENCY_TABLE": "idempotency",
    "STREAM_NAME": "transactions",
}


class FakeRuntimeApi(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.first_next = threading.Event()
        self.first_next_ns = None


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.endswith("/runtime/invocation/next") and not self.server.first_next.is_set():
            self.server.first_next_ns = time.monotonic_ns()
            self.server.first_next.set()
        # Never answer: the process is killed once it has asked.
        time.sleep(5)

    def log_message(self, *_):
        pass


def measure(bootstrap, home, extra):
    server = FakeRuntimeApi()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(ENVIRONMENT, PATH="/usr/bin:/bin", HOME=home,
               AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{server.server_address[1]}", **extra)
    started = time.monotonic_ns()
    process = subprocess.Popen([bootstrap], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        if not server.first_next.wait(timeout=10):
            raise RuntimeError(f"{bootstrap} never asked for an event: "
                               f"{process.stderr.read1(4096).decode(errors='replace')}")
        return (server.first_next_ns - started) / 1e6
    finally:
        process.kill()
        process.wait()
        server.shutdown()
        server.server_close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra environment variable for the function")
    parser.add_argument("bootstraps", nargs="+")
    args = parser.parse_args()
    extra = dict(pair.split("=", 1) for pair in args.env)
    with tempfile.TemporaryDirectory() as home:  # no ~/.aws files, as in Lambda
        for bootstrap in args.bootstraps:
            path = str(pathlib.Path(bootstrap).resolve())
            measure(path, home, extra)  # warm the page cache, as a second cold start would have it
            times = sorted(measure(path, home, extra) for _ in range(args.runs))
            p90 = times[int(len(times) * 0.9) - 1]
            print(f"{bootstrap}: process start -> first /next: min {times[0]:.2f} ms, "
                  f"median {statistics.median(times):.2f} ms, p90 {p90:.2f} ms, "
                  f"max {times[-1]:.2f} ms ({args.runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
