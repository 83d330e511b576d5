"""scripts/redrive.py: against the moto server (Kinesis + SQS on the wire), and with fakes for the
failures moto cannot produce (PutRecords refusing some entries)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redrive  # noqa: E402

REGION = "us-east-1"


# ------------------------------------------------------------------ helpers


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def kpl_aggregate(records: list[tuple[str, bytes]]) -> bytes:
    """A KPL AggregatedRecord: magic, protobuf, MD5 of the protobuf."""
    keys = sorted({key for key, _ in records})
    body = b"".join(length_delimited(1, key.encode()) for key in keys)
    for key, data in records:
        record = varint(1 << 3 | 0) + varint(keys.index(key)) + length_delimited(3, data)
        body += length_delimited(3, record)
    return redrive.KPL_MAGIC + body + hashlib.md5(body).digest()


def dead_letter(stream_arn: str, shard: str, seq: str, key: str, data: bytes | None, sub: int | None = None) -> str:
    body = {
        "streamArn": stream_arn,
        "shardId": shard,
        "sequenceNumber": seq,
        "partitionKey": key,
        "approximateArrivalTimestamp": 1700000000.0,
        "functionName": "fraud",
        "error": {"type": "Permanent", "message": "test"},
        "attempts": 1,
    }
    if data is None:
        body["dataTruncated"] = True
    else:
        body["data"] = base64.b64encode(data).decode()
    if sub is not None:
        body["subSequenceNumber"] = sub
    return json.dumps(body)


# ------------------------------------------------------------------ against moto


@pytest.fixture
def moto_endpoint() -> str:
    endpoint = os.environ.get("SHARDWISE_MOTO_ENDPOINT")
    if not endpoint:
        if os.environ.get("SHARDWISE_REQUIRE_MOTO") == "1":
            pytest.fail("SHARDWISE_REQUIRE_MOTO=1 but SHARDWISE_MOTO_ENDPOINT is not set")
        pytest.skip("SHARDWISE_MOTO_ENDPOINT not set (make test starts moto)")
    return endpoint


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID", "test"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY", "test"))
    session = boto3.session.Session(region_name=REGION)
    return (
        session.client("kinesis", endpoint_url=moto_endpoint),
        session.client("sqs", endpoint_url=moto_endpoint),
    )


def all_records(kinesis, stream: str) -> list[dict]:
    shards = kinesis.list_shards(StreamName=stream)["Shards"]
    out = []
    for shard in shards:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")
        out += kinesis.get_records(ShardIterator=it["ShardIterator"], Limit=1000)["Records"]
    return out


def queue_depth(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_redrive_against_moto(aws, moto_endpoint: str) -> None:
    kinesis, sqs = aws
    name = f"redrive-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    arn = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamARN"]
    shard = kinesis.list_shards(StreamName=name)["Shards"][0]["ShardId"]
    url = sqs.create_queue(QueueName=name)["QueueUrl"]

    big = json.dumps({"card_id": "c-1", "blob": "x" * 4000}).encode()
    big_seq = kinesis.put_record(StreamName=name, PartitionKey="c-1", Data=big)["SequenceNumber"]
    aggregate = kpl_aggregate([("c-2", b'{"card_id":"c-2"}'), ("c-3", b'{"card_id":"c-3"}')])
    agg_seq = kinesis.put_record(StreamName=name, PartitionKey="c-2", Data=aggregate)["SequenceNumber"]

    plain = b'{"card_id":"c-9","amount":12}'
    sqs.send_message(QueueUrl=url, MessageBody=dead_letter(arn, shard, "99999999", "c-9", plain))
    sqs.send_message(QueueUrl=url, MessageBody=dead_letter(arn, shard, big_seq, "c-1", None))
    sqs.send_message(QueueUrl=url, MessageBody=dead_letter(arn, shard, agg_seq, "c-2", None, sub=1))
    sqs.send_message(QueueUrl=url, MessageBody="this is not a dead letter")

    common = ["--queue-url", url, "--region", REGION, "--endpoint-url", moto_endpoint, "--wait-seconds", "0"]

    # Dry run: nothing put, nothing deleted; the bad message is reported (exit 1).
    assert redrive.main(common + ["--dry-run", "--visibility-timeout", "0"]) == 1
    assert len(all_records(kinesis, name)) == 2
    assert queue_depth(sqs, url) == 4

    # Real run: three records back on the stream, their messages deleted, the bad one kept.
    assert redrive.main(common) == 1
    records = all_records(kinesis, name)
    assert len(records) == 5
    redriven = [(r["PartitionKey"], r["Data"]) for r in records[2:]]
    # Ordered by original (shard, sequence number, sub-sequence number).
    assert redriven == [("c-1", big), ("c-3", b'{"card_id":"c-3"}'), ("c-9", plain)]
    assert queue_depth(sqs, url) == 1

    # Idempotent: a second run finds only the bad message, puts nothing.
    assert redrive.main(common) == 0
    assert len(all_records(kinesis, name)) == 5


# ------------------------------------------------------------------ with fakes


class FakeSqs:
    def __init__(self, bodies: list[str]):
        self.messages = {f"m{i}": body for i, body in enumerate(bodies)}
        self.handed_out: set[str] = set()
        self.deleted: list[str] = []

    def receive_message(self, **kwargs):
        fresh = [m for m in self.messages if m not in self.handed_out][: kwargs["MaxNumberOfMessages"]]
        self.handed_out.update(fresh)
        return {"Messages": [{"MessageId": m, "ReceiptHandle": f"rh-{m}", "Body": self.messages[m]} for m in fresh]}

    def delete_message_batch(self, QueueUrl, Entries):
        self.deleted += [e["ReceiptHandle"].removeprefix("rh-") for e in Entries]
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}


class FakeKinesis:
    """Refuses the records whose partition key is in `refuse` for the first `times` calls."""

    def __init__(self, refuse: set[str], times: int):
        self.refuse, self.times, self.calls, self.put = refuse, times, 0, []

    def put_records(self, StreamName, Records):
        self.calls += 1
        results = []
        for i, record in enumerate(Records):
            if record["PartitionKey"] in self.refuse and self.calls <= self.times:
                results.append({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow down"})
            else:
                self.put.append((StreamName, record["PartitionKey"], record["Data"]))
                results.append({"SequenceNumber": str(1000 + len(self.put)), "ShardId": "shardId-000000000000"})
        return {"FailedRecordCount": sum("ErrorCode" in r for r in results), "Records": results}


ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/payments"


def letters(n: int) -> list[str]:
    return [dead_letter(ARN, "shardId-000000000000", str(10 + i), f"k{i}", f"d{i}".encode()) for i in range(n)]


def test_refused_entries_are_retried_and_deleted_only_once_accepted() -> None:
    sqs, kinesis = FakeSqs(letters(3)), FakeKinesis(refuse={"k1"}, times=2)
    summary = redrive.Redriver(sqs, kinesis, "q", wait_seconds=0, backoff_s=0).run()
    assert summary.redriven == 3 and summary.left == 0
    assert sorted(sqs.deleted) == ["m0", "m1", "m2"]
    assert [key for _, key, _ in kinesis.put] == ["k0", "k2", "k1"]
    assert all(stream == "payments" for stream, _, _ in kinesis.put)


def test_never_accepted_stays_in_queue() -> None:
    sqs, kinesis = FakeSqs(letters(3)), FakeKinesis(refuse={"k2"}, times=99)
    summary = redrive.Redriver(sqs, kinesis, "q", wait_seconds=0, backoff_s=0, put_attempts=3).run()
    assert summary.redriven == 2 and summary.left == 1
    assert sorted(sqs.deleted) == ["m0", "m1"]
    assert "k2" not in [key for _, key, _ in kinesis.put]


def test_dry_run_puts_and_deletes_nothing() -> None:
    sqs, kinesis = FakeSqs(letters(2)), FakeKinesis(refuse=set(), times=0)
    summary = redrive.Redriver(sqs, kinesis, "q", wait_seconds=0, dry_run=True).run()
    assert summary.would_redrive == 2 and summary.redriven == 0
    assert kinesis.put == [] and sqs.deleted == []


def test_stream_name_override_and_max_messages() -> None:
    sqs, kinesis = FakeSqs(letters(25)), FakeKinesis(refuse=set(), times=0)
    summary = redrive.Redriver(sqs, kinesis, "q", wait_seconds=0, stream_name="other", max_messages=12).run()
    assert summary.redriven == 12
    assert {stream for stream, _, _ in kinesis.put} == {"other"}


def test_order_compares_long_sequence_numbers_by_length_then_text() -> None:
    long_seq = "49590338271490256608559692538361571095921575989136588898"
    bodies = [
        dead_letter(ARN, "shardId-000000000000", long_seq, "late", b"2"),
        dead_letter(ARN, "shardId-000000000000", "9" * 55, "early", b"1"),
    ]
    sqs, kinesis = FakeSqs(bodies), FakeKinesis(refuse=set(), times=0)
    redrive.Redriver(sqs, kinesis, "q", wait_seconds=0).run()
    assert [key for _, key, _ in kinesis.put] == ["early", "late"]


@pytest.mark.parametrize(
    "body, problem",
    [
        ("not json", "not JSON"),
        (json.dumps({"streamArn": ARN, "shardId": "s", "sequenceNumber": "1"}), "missing fields"),
        (json.dumps({"streamArn": ARN, "shardId": "s", "sequenceNumber": "1", "partitionKey": "k", "data": "@@"}),
         "not base64"),
        (json.dumps({"streamArn": "arn:aws:sqs:us-east-1:1:q", "shardId": "s", "sequenceNumber": "1",
                     "partitionKey": "k", "data": "eA=="}), "not a Kinesis stream ARN"),
    ],
)
def test_bad_messages_are_reported_and_kept(body: str, problem: str) -> None:
    sqs, kinesis = FakeSqs([body]), FakeKinesis(refuse=set(), times=0)
    summary = redrive.Redriver(sqs, kinesis, "q", wait_seconds=0).run()
    assert summary.left == 1 and problem in summary.problems[0]
    assert sqs.deleted == [] and kinesis.put == []


def test_kpl_user_record_and_corruption() -> None:
    aggregate = kpl_aggregate([("a", b"first"), ("b", b"second")])
    assert redrive.kpl_user_record(aggregate, 0) == (b"first", "a")
    assert redrive.kpl_user_record(aggregate, 1) == (b"second", "b")
    with pytest.raises(redrive.RedriveError, match="no #2"):
        redrive.kpl_user_record(aggregate, 2)
    corrupt = aggregate[:-1] + bytes([aggregate[-1] ^ 1])
    with pytest.raises(redrive.RedriveError, match="MD5"):
        redrive.kpl_user_record(corrupt, 0)


def test_batches_respect_put_records_limits() -> None:
    small = [redrive.DeadLetter("m", "r", ARN, "s", str(i), None, "k", b"x") for i in range(1201)]
    assert [len(b) for b in redrive.batches(small)] == [500, 500, 201]
    big = [redrive.DeadLetter("m", "r", ARN, "s", str(i), None, "k", b"x" * (1024 * 1024 - 1)) for i in range(6)]
    assert [len(b) for b in redrive.batches(big)] == [5, 1]
