#!/usr/bin/env python3
"""`make invoke-check`: every function invoked through cargo-lambda, as Lambda would, against moto.

1. Creates the functions' resources on moto (AWS_ENDPOINT_URL): the stream, the card state and
   canary tables, the alerts and dead-letter queues, with boto3 from the repo's venv.
2. Starts `cargo lambda watch -A 127.0.0.1 -P <free port>` in the background, with the functions'
   environment pointing at them (an --env-file).
3. Invokes `fraud` with events/fraud-normal.json and events/fraud-suspicious.json and `canary`
   with events/canary-scheduled.json (`cargo lambda invoke … --data-file`), checks each response
   and what it did: the canary acknowledged, the alerts on the queue, the canary records on the
   stream.
4. Stops watch (the process group it started) whatever happened.

Exit status 0 when every check passed. Expects moto's variables in the environment (scripts/moto.sh
exports them; `make invoke-check` starts moto when none is running) and cargo-lambda on PATH.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import boto3

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRST_INVOKE_TIMEOUT_S = 900  # the first invoke builds the function (debug) if needed
INVOKE_TIMEOUT_S = 120
SUFFIX = f"invoke-check-{os.getpid()}"


def log(message):
    print(f"invoke-check: {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_resources():
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kinesis = boto3.client("kinesis", endpoint_url=endpoint, region_name=region)
    dynamodb = boto3.client("dynamodb", endpoint_url=endpoint, region_name=region)
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=region)

    stream = f"transactions-{SUFFIX}"
    kinesis.create_stream(StreamName=stream, ShardCount=1)

    def table(name, keys):
        dynamodb.create_table(
            TableName=name,
            AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k, _ in keys],
            KeySchema=[{"AttributeName": k, "KeyType": t} for k, t in keys],
            BillingMode="PAY_PER_REQUEST",
        )
        return name

    cards = table(f"cards-{SUFFIX}", [("card_id", "HASH")])
    aggregates = table(f"aggregates-{SUFFIX}", [("id", "HASH")])
    canary = table(f"canary-{SUFFIX}", [("canary_id", "HASH"), ("consumer", "RANGE")])
    alerts = sqs.create_queue(QueueName=f"alerts-{SUFFIX}")["QueueUrl"]
    dead_letters = sqs.create_queue(QueueName=f"dlq-{SUFFIX}")["QueueUrl"]
    clients = {"kinesis": kinesis, "dynamodb": dynamodb, "sqs": sqs}
    environment = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": region,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUST_LOG": "info",
        "SHARDWISE_METRICS_NAMESPACE": "ShardwiseInvokeCheck",
        "DEAD_LETTER_QUEUE_URL": dead_letters,
        "ALERTS_QUEUE_URL": alerts,
        "CARD_STATE_TABLE": cards,
        "AGGREGATES_TABLE": aggregates,
        "CANARY_TABLE": canary,
        "STREAM_NAME": stream,
        # The blocklists the suspicious sample is written for (events/README.md).
        "FRAUD_BLOCKED_MERCHANTS": "m-blocked-666",
        "FRAUD_BLOCKED_CARD_PREFIXES": "999999",
    }
    return clients, environment


def start_watch(port, env_file):
    command = ["cargo", "lambda", "watch", "-A", "127.0.0.1", "-P", str(port),
               "--env-file", env_file, "--ignore-changes"]
    log(" ".join(command))
    # A session of its own: stopping it stops the functions it started, and only those.
    return subprocess.Popen(command, cwd=ROOT, start_new_session=True)


def stop_watch(process):
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def wait_for_port(port, process, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cargo lambda watch exited with status {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"cargo lambda watch did not listen on port {port} within {timeout_s} s")


def invoke(function, event, port, timeout_s):
    command = ["cargo", "lambda", "invoke", function, "--invoke-address", "127.0.0.1",
               "--invoke-port", str(port), "--data-file", f"events/{event}",
               "--output-format", "json"]
    log(" ".join(command))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"invoke {function} {event} failed ({done.returncode}):\n"
                           f"{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout)


def drain(sqs, queue_url):
    bodies = []
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                       VisibilityTimeout=300).get("Messages", [])
        if not messages:
            return bodies
        bodies.extend(m["Body"] for m in messages)


def stream_records(kinesis, stream):
    shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard,
                                          ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    return [json.loads(r["Data"]) for r in kinesis.get_records(ShardIterator=iterator)["Records"]]


def expect(condition, message):
    if not condition:
        raise AssertionError(message)
    log(f"ok: {message}")


def check(clients, env, port):
    done = {"batchItemFailures": []}

    response = invoke("fraud", "fraud-normal.json", port, FIRST_INVOKE_TIMEOUT_S)
    expect(response == done, f"fraud answers fraud-normal.json with {json.dumps(done)} "
           f"(got {json.dumps(response)})")
    ack = clients["dynamodb"].get_item(
        TableName=env["CANARY_TABLE"],
        Key={"canary_id": {"S": "canary-1795687200-0"}, "consumer": {"S": "fraud"}},
    ).get("Item")
    expect(ack is not None and "acked_at" in ack, "fraud acknowledged the sample's canary record")

    response = invoke("fraud", "fraud-suspicious.json", port, INVOKE_TIMEOUT_S)
    expect(response == done, f"fraud answers fraud-suspicious.json with {json.dumps(done)} "
           f"(got {json.dumps(response)})")
    alerts = sorted(json.loads(b)["transactionId"]
                    for b in drain(clients["sqs"], env["ALERTS_QUEUE_URL"]))
    expected = ["tx-amount-big", "tx-blocked-card", "tx-blocked-merchant", "tx-travel-1",
                "tx-velocity-5", "tx-velocity-amount"]
    expect(alerts == expected, f"the 6 suspicious transactions raised one alert each: {alerts}")

    # aggregation: one tumbling window, first → middle → final, each answer's state being the
    # state the next sample carries (events/README.md); the final invoke writes the aggregates.
    first = invoke("aggregation", "window-first.json", port, FIRST_INVOKE_TIMEOUT_S)
    expected_state = json.loads((ROOT / "events" / "window-middle.json").read_text())["state"]
    expect(first.get("batchItemFailures") == [] and first.get("state") == expected_state,
           "aggregation answers window-first.json with the state window-middle.json carries")
    final = invoke("aggregation", "window-final.json", port, INVOKE_TIMEOUT_S)
    expect(final == {"state": {}, "batchItemFailures": []},
           f"aggregation answers the final invoke with an empty state (got {json.dumps(final)})")
    items = clients["dynamodb"].scan(TableName=env["AGGREGATES_TABLE"])["Items"]
    ids = sorted(i["id"]["S"].rsplit("#", 1)[-1] for i in items)
    expect(ids == ["5411", "5812", "5999"],
           f"the window's aggregates were written, one item per category: {ids}")

    response = invoke("canary", "canary-scheduled.json", port, FIRST_INVOKE_TIMEOUT_S)
    expect(response.get("sent") == 3 and response.get("putFailed") == 0,
           f"canary put its 3 records: {json.dumps(response)}")
    expect(set(response.get("consumers", {})) == {"fraud", "aggregation"},
           "canary reported on both consumers")
    records = stream_records(clients["kinesis"], env["STREAM_NAME"])
    expect(len(records) == 3 and all("canary_id" in r for r in records),
           "the canary records are on the stream")


def main():
    for name in ("AWS_ENDPOINT_URL",):
        if not os.environ.get(name):
            sys.exit(f"invoke-check: {name} is not set: run through `make invoke-check`")
    clients, env = create_resources()
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as f:
        f.write("".join(f"{k}={v}\n" for k, v in env.items()))
        env_file = f.name
    watch = start_watch(port, env_file)
    try:
        wait_for_port(port, watch)
        check(clients, env, port)
    except (AssertionError, RuntimeError, subprocess.TimeoutExpired) as error:
        log(f"FAILED: {error}")
        return 1
    finally:
        stop_watch(watch)
        os.unlink(env_file)
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
