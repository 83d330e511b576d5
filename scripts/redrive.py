#!/usr/bin/env python3
"""Puts Shardwise dead letters back on their Kinesis stream.

Reads the dead-letter SQS queue our functions write to (DEAD_LETTER_QUEUE_URL, stack output
DeadLetterQueueUrl), puts each record back on the stream with PutRecords, and deletes a message
only after Kinesis accepted its record. A record that was too large for SQS (`dataTruncated: true`)
is read again from the stream at its sequence number (GetShardIterator AT_SEQUENCE_NUMBER); a
user record from a KPL aggregate is cut out of its aggregate by `subSequenceNumber`.

    scripts/redrive.py --queue-url URL [--dry-run] [--stream-name NAME] [--max-messages N]

Messages that cannot be redriven (not JSON, missing fields, a record no longer in the stream,
PutRecords refusing it after retries) stay in the queue and are reported; the exit status is
then 1. Redriven records go to the end of the stream: they are processed again after the
records that arrived meanwhile (within one run, records of a shard keep their original order).
Consumers must therefore be idempotent, which Shardwise's are.

Credentials, region and endpoint come from the usual AWS environment (AWS_PROFILE, AWS_REGION,
AWS_ENDPOINT_URL), or --region / --endpoint-url.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

KPL_MAGIC = b"\xf3\x89\x9a\xc2"
MAX_PUT_RECORDS = 500  # PutRecords entries per call
MAX_PUT_BYTES = 5 * 1024 * 1024  # PutRecords payload per call (data + partition keys)


class RedriveError(Exception):
    """A message that cannot be redriven; it stays in the queue."""


@dataclass
class DeadLetter:
    message_id: str
    receipt_handle: str
    stream_arn: str
    shard_id: str
    sequence_number: str
    sub_sequence_number: int | None
    partition_key: str
    data: bytes | None  # None while truncated and not yet re-read

    def order_key(self) -> tuple:
        # Sequence numbers are decimal strings too long for 64 bits: compare by (length, text).
        seq = self.sequence_number
        return (self.shard_id, len(seq), seq, self.sub_sequence_number or 0)

    def label(self) -> str:
        sub = f"/{self.sub_sequence_number}" if self.sub_sequence_number is not None else ""
        return f"{self.shard_id}:{self.sequence_number}{sub}"


def parse_message(message: dict) -> DeadLetter:
    try:
        body = json.loads(message["Body"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise RedriveError(f"body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RedriveError("body is not a JSON object")
    missing = [k for k in ("streamArn", "shardId", "sequenceNumber", "partitionKey") if not body.get(k)]
    if missing:
        raise RedriveError(f"missing fields {missing}")
    truncated = body.get("dataTruncated") is True
    data = None
    if not truncated:
        if not isinstance(body.get("data"), str):
            raise RedriveError("no data and dataTruncated is not true")
        try:
            data = base64.b64decode(body["data"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RedriveError(f"data is not base64 ({exc})") from None
    sub = body.get("subSequenceNumber")
    return DeadLetter(
        message_id=message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        stream_arn=body["streamArn"],
        shard_id=body["shardId"],
        sequence_number=str(body["sequenceNumber"]),
        sub_sequence_number=int(sub) if sub is not None else None,
        partition_key=body["partitionKey"],
        data=data,
    )


def stream_name_of(arn: str) -> str:
    # arn:aws:kinesis:REGION:ACCOUNT:stream/NAME
    _, _, resource = arn.rpartition(":")
    kind, _, name = resource.partition("/")
    if kind != "stream" or not name:
        raise RedriveError(f"streamArn {arn!r} is not a Kinesis stream ARN")
    return name.split("/", 1)[0]


# ------------------------------------------------------------------ KPL


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise RedriveError("corrupt KPL aggregate (truncated varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise RedriveError("corrupt KPL aggregate (varint too long)")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message; only the wire types KPL uses."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise RedriveError("corrupt KPL aggregate (field past end)")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise RedriveError(f"corrupt KPL aggregate (wire type {wire})")
        yield number, wire, value


def kpl_user_record(data: bytes, index: int) -> tuple[bytes, str]:
    """(data, partition key) of user record `index` of a KPL aggregated record."""
    if not data.startswith(KPL_MAGIC) or len(data) < len(KPL_MAGIC) + 16:
        raise RedriveError("subSequenceNumber given but the stream record is not a KPL aggregate")
    body, digest = data[len(KPL_MAGIC) : -16], data[-16:]
    if hashlib.md5(body).digest() != digest:
        raise RedriveError("KPL aggregate MD5 mismatch")
    keys: list[str] = []
    records: list[bytes] = []
    for number, wire, value in _fields(body):
        if number == 1 and wire == 2:
            keys.append(value.decode("utf-8"))
        elif number == 3 and wire == 2:
            records.append(value)
    if index >= len(records):
        raise RedriveError(f"KPL aggregate has {len(records)} user records, no #{index}")
    key_index, payload = 0, b""
    for number, wire, value in _fields(records[index]):
        if number == 1 and wire == 0:
            key_index = value
        elif number == 3 and wire == 2:
            payload = value
    if key_index >= len(keys):
        raise RedriveError("corrupt KPL aggregate (partition key index)")
    return payload, keys[key_index]


# ------------------------------------------------------------------ the redrive


@dataclass
class Summary:
    redriven: int = 0
    would_redrive: int = 0
    left: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.left += 1
        self.problems.append(text)
        print(f"left in queue: {text}", file=sys.stderr)


class Redriver:
    def __init__(self, sqs, kinesis, queue_url: str, *, stream_name: str | None = None, dry_run: bool = False,
                 visibility_timeout: int = 300, wait_seconds: int = 1, max_messages: int | None = None,
                 put_attempts: int = 5, backoff_s: float = 0.2, out=sys.stdout):
        self.sqs = sqs
        self.kinesis = kinesis
        self.queue_url = queue_url
        self.stream_name = stream_name
        self.dry_run = dry_run
        self.visibility_timeout = visibility_timeout
        self.wait_seconds = wait_seconds
        self.max_messages = max_messages
        self.put_attempts = put_attempts
        self.backoff_s = backoff_s
        self.out = out
        self.summary = Summary()

    # Receives until a receive brings no message not seen before (an empty queue, or in a dry
    # run with a short visibility timeout, the same messages again).
    def receive_all(self) -> list[dict]:
        seen: dict[str, dict] = {}
        while self.max_messages is None or len(seen) < self.max_messages:
            want = 10 if self.max_messages is None else min(10, self.max_messages - len(seen))
            response = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=want,
                WaitTimeSeconds=self.wait_seconds,
                VisibilityTimeout=self.visibility_timeout,
            )
            fresh = [m for m in response.get("Messages", []) if m["MessageId"] not in seen]
            if not fresh:
                break
            for message in fresh:
                seen[message["MessageId"]] = message
        return list(seen.values())

    def reread(self, letter: DeadLetter, stream: str) -> None:
        """Fills in data (and the partition key of a KPL user record) from the stream."""
        try:
            iterator = self.kinesis.get_shard_iterator(
                StreamName=stream,
                ShardId=letter.shard_id,
                ShardIteratorType="AT_SEQUENCE_NUMBER",
                StartingSequenceNumber=letter.sequence_number,
            )["ShardIterator"]
            records = self.kinesis.get_records(ShardIterator=iterator, Limit=1).get("Records", [])
        except Exception as exc:  # botocore ClientError and friends: report, keep the message
            raise RedriveError(f"cannot re-read from {stream}: {exc}") from None
        if not records or records[0]["SequenceNumber"] != letter.sequence_number:
            raise RedriveError(f"record is no longer in {stream} (past retention?)")
        data = records[0]["Data"]
        if letter.sub_sequence_number is not None and data.startswith(KPL_MAGIC):
            data, key = kpl_user_record(data, letter.sub_sequence_number)
            letter.partition_key = key or letter.partition_key
        letter.data = data

    def put(self, stream: str, letters: list[DeadLetter]) -> None:
        """PutRecords in order, retrying only the entries Kinesis refused; deletes accepted ones."""
        pending = letters
        errors: dict[str, str] = {}
        for attempt in range(self.put_attempts):
            if not pending:
                return
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.kinesis.put_records(
                    StreamName=stream,
                    Records=[{"Data": l.data, "PartitionKey": l.partition_key} for l in pending],
                )
            except Exception as exc:  # throttled or failed as a whole: retry every entry
                errors = {l.message_id: str(exc) for l in pending}
                continue
            accepted, refused, errors = [], [], {}
            for letter, result in zip(pending, response["Records"]):
                if result.get("SequenceNumber") and not result.get("ErrorCode"):
                    accepted.append(letter)
                    print(f"redriven {letter.label()} -> {stream} as {result['SequenceNumber']}", file=self.out)
                else:
                    refused.append(letter)
                    errors[letter.message_id] = f"{result.get('ErrorCode')}: {result.get('ErrorMessage')}"
            self.delete(accepted)
            self.summary.redriven += len(accepted)
            pending = refused
        for letter in pending:
            self.summary.problem(f"{letter.label()}: PutRecords refused it {self.put_attempts} times "
                                 f"({errors.get(letter.message_id)})")

    def delete(self, letters: list[DeadLetter]) -> None:
        for start in range(0, len(letters), 10):
            chunk = letters[start : start + 10]
            response = self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": l.receipt_handle} for i, l in enumerate(chunk)],
            )
            for failure in response.get("Failed", []):
                # Put but not deleted: it will be redriven again later (a duplicate, not a loss).
                letter = chunk[int(failure["Id"])]
                print(f"warning: {letter.label()} was redriven but could not be deleted "
                      f"({failure.get('Code')}); it may be redriven twice", file=sys.stderr)

    def run(self) -> Summary:
        by_stream: dict[str, list[DeadLetter]] = {}
        for message in self.receive_all():
            try:
                letter = parse_message(message)
                stream = self.stream_name or stream_name_of(letter.stream_arn)
                if letter.data is None:
                    self.reread(letter, stream)
            except RedriveError as exc:
                self.summary.problem(f"message {message.get('MessageId')}: {exc}")
                continue
            by_stream.setdefault(stream, []).append(letter)

        for stream, letters in by_stream.items():
            letters.sort(key=DeadLetter.order_key)
            if self.dry_run:
                for letter in letters:
                    print(f"would redrive {letter.label()} key={letter.partition_key!r} "
                          f"({len(letter.data or b'')} bytes) -> {stream}", file=self.out)
                self.summary.would_redrive += len(letters)
                continue
            for batch in batches(letters):
                self.put(stream, batch)
        return self.summary


def batches(letters: list[DeadLetter]) -> Iterator[list[DeadLetter]]:
    batch: list[DeadLetter] = []
    size = 0
    for letter in letters:
        entry = len(letter.data or b"") + len(letter.partition_key.encode())
        if batch and (len(batch) == MAX_PUT_RECORDS or size + entry > MAX_PUT_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(letter)
        size += entry
    if batch:
        yield batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue-url", required=True, help="the dead-letter queue (stack output DeadLetterQueueUrl)")
    parser.add_argument("--stream-name", help="put records here instead of the stream named in each message")
    parser.add_argument("--dry-run", action="store_true",
                        help="show what would be redriven; put and delete nothing (messages reappear "
                             "after --visibility-timeout)")
    parser.add_argument("--max-messages", type=int, help="stop after this many messages")
    parser.add_argument("--visibility-timeout", type=int, help="seconds received messages stay hidden "
                        "(default 300, or 30 with --dry-run)")
    parser.add_argument("--wait-seconds", type=int, default=1, help="long-poll wait per receive (0..20)")
    parser.add_argument("--region")
    parser.add_argument("--endpoint-url", help="e.g. a local moto server")
    args = parser.parse_args(argv)

    import boto3  # imported here so --help works without it

    session = boto3.session.Session(region_name=args.region)
    clients = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    visibility = args.visibility_timeout if args.visibility_timeout is not None else (30 if args.dry_run else 300)
    redriver = Redriver(
        session.client("sqs", **clients),
        session.client("kinesis", **clients),
        args.queue_url,
        stream_name=args.stream_name,
        dry_run=args.dry_run,
        visibility_timeout=visibility,
        wait_seconds=args.wait_seconds,
        max_messages=args.max_messages,
    )
    summary = redriver.run()
    done = f"{summary.would_redrive} would be redriven" if args.dry_run else f"{summary.redriven} redriven"
    print(f"redrive: {done}, {summary.left} left in the queue")
    return 1 if summary.left else 0


if __name__ == "__main__":
    sys.exit(main())
