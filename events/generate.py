#!/usr/bin/env python3
"""Writes the fraud, KPL and canary sample events in this folder (standard library only).

The JSON files are committed; this script is how they were made, kept so a change to them is a
change to this script. Run it from anywhere: `python3 events/generate.py`. It is deterministic:
running it again rewrites the same bytes.

Shapes are Lambda's own: Kinesis events as Lambda delivers them (base64 `data`, 56-digit
sequence numbers, `eventID` = `shardId:sequenceNumber`), an EventBridge scheduled event.
"""

import base64
import hashlib
import json
import pathlib
from datetime import datetime, timedelta, timezone

HERE = pathlib.Path(__file__).resolve().parent
REGION = "us-east-1"
ACCOUNT = "123456789012"
STREAM_ARN = f"arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/shardwise-transactions"
SHARD = "shardId-000000000000"
# 56 digits, as real sequence numbers are; each record gets a larger one.
SEQUENCE_BASE = 49656752418953374588117285836785373493958341436154000000
BASE_TIME = datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc)

BERLIN = (52.5200, 13.4050)
MUNICH = (48.1351, 11.5820)
HAMBURG = (53.5511, 9.9937)
NEW_YORK = (40.7128, -74.0060)


def rfc3339(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def transaction(tx_id, card, minutes, amount, where, channel="pos", merchant="m-00042",
                mcc="5411", country="DE", currency="EUR"):
    return {
        "transaction_id": tx_id,
        "card_id": card,
        "merchant_id": merchant,
        "merchant_category": mcc,
        "amount": amount,
        "currency": currency,
        "country": country,
        "lat": where[0],
        "lon": where[1],
        "timestamp": rfc3339(BASE_TIME + timedelta(minutes=minutes)),
        "channel": channel,
    }


def canary(canary_id, minutes):
    sent = BASE_TIME + timedelta(minutes=minutes)
    return {"canary_id": canary_id, "sent_at": int(sent.timestamp() * 1000)}


def payload_bytes(payload):
    if isinstance(payload, bytes):
        return payload
    return json.dumps(payload, separators=(",", ":")).encode()


class Batch:
    """Builds the `Records` of one event; sequence numbers grow in order."""

    def __init__(self, first_sequence=0):
        self.records = []
        self.next = first_sequence

    def add(self, partition_key, payload=None, data_field=None):
        sequence = str(SEQUENCE_BASE + self.next * 10)
        arrival = BASE_TIME.timestamp() + self.next * 0.25 + 0.5
        self.next += 1
        if data_field is None:
            data_field = base64.b64encode(payload_bytes(payload)).decode()
        self.records.append({
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": partition_key,
                "sequenceNumber": sequence,
                "data": data_field,
                "approximateArrivalTimestamp": round(arrival, 3),
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": f"{SHARD}:{sequence}",
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": f"arn:aws:iam::{ACCOUNT}:role/shardwise-fraud",
            "awsRegion": REGION,
            "eventSourceARN": STREAM_ARN,
        })

    def event(self):
        return {"Records": self.records}


# ---------------------------------------------------------------- KPL aggregate (protobuf by hand)

KPL_MAGIC = bytes([0xF3, 0x89, 0x9A, 0xC2])


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data


def kpl_aggregate(entries):
    """Same bytes as shardwise::kpl::aggregate: key tables in order of first use, then records."""
    keys = []
    records = b""
    for partition_key, data in entries:
        if partition_key not in keys:
            keys.append(partition_key)
        record = varint(1 << 3 | 0) + varint(keys.index(partition_key))
        record += length_delimited(3, data)
        records += length_delimited(3, record)
    message = b"".join(length_delimited(1, k.encode()) for k in keys) + records
    return KPL_MAGIC + message + hashlib.md5(message).digest()


# ---------------------------------------------------------------- the events


def fraud_normal():
    batch = Batch()
    cards = [
        ("4000001234567899", BERLIN),
        ("4000009876543210", MUNICH),
        ("5100004444333322", HAMBURG),
        ("4000005555666677", BERLIN),
    ]
    amounts = [23.40, 8.95, 61.20, 14.99, 102.50, 5.60, 33.00, 47.85, 12.30, 75.10, 9.99, 28.45]
    n = 0
    for round_ in range(3):
        for card, home in cards:
            channel = "ecom" if n % 4 == 3 else "pos"
            tx = transaction(f"tx-normal-{n:04d}", card, round_ * 20 + n % 4, amounts[n], home,
                             channel=channel, merchant=f"m-{100 + n:05d}")
            batch.add(card, tx)
            n += 1
    batch.add("canary-1795687200-0", canary("canary-1795687200-0", 0))
    return batch.event()


def fraud_suspicious():
    batch = Batch(first_sequence=100)
    # Velocity and amount: five small online purchases, a sixth within the window (velocity,
    # 40, under the threshold), then a seventh that is also 100 times the usual amount (80).
    card = "4111110000000001"
    for i, amount in enumerate([12.00, 15.50, 9.90, 14.20, 11.75, 13.30]):
        batch.add(card, transaction(f"tx-velocity-{i}", card, i * 0.5, amount, BERLIN,
                                    channel="ecom", merchant="m-00777", mcc="5999"))
    batch.add(card, transaction("tx-velocity-amount", card, 3.2, 1450.00, BERLIN,
                                channel="ecom", merchant="m-00777", mcc="5999"))
    # Impossible travel: Berlin, then a New York ATM half an hour later (70).
    card = "4222220000000002"
    batch.add(card, transaction("tx-travel-0", card, 0, 42.00, BERLIN))
    batch.add(card, transaction("tx-travel-1", card, 30, 200.00, NEW_YORK, channel="atm",
                                merchant="m-atm-0001", mcc="6011", country="US", currency="USD"))
    # Blocklisted merchant (100).
    card = "4333330000000003"
    batch.add(card, transaction("tx-blocked-merchant", card, 5, 89.00, HAMBURG,
                                merchant="m-blocked-666", mcc="7995"))
    # Blocklisted card range (100).
    card = "9999990000000004"
    batch.add(card, transaction("tx-blocked-card", card, 6, 19.99, MUNICH))
    # Amount anomaly alone (40): fires, but stays under the threshold, so no alert.
    card = "4444440000000005"
    for i in range(5):
        batch.add(card, transaction(f"tx-amount-{i}", card, i * 90, 30.00 + i, MUNICH))
    batch.add(card, transaction("tx-amount-big", card, 600, 2400.00, MUNICH,
                                merchant="m-jeweller-9", mcc="5944"))
    return batch.event()


def fraud_poison():
    batch = Batch(first_sequence=200)
    card = "4000001234567899"
    batch.add(card, transaction("tx-poison-ok-0", card, 0, 20.00, BERLIN))
    batch.add("5100001111222233", data_field="not base64 at all!")
    batch.add("5100001111222234", b"hello, this is not JSON")
    batch.add("5100001111222235", {"transaction_id": "tx-wrong-shape", "card_id": "5100001111222235",
                                    "amount": "12.50"})
    batch.add(card, transaction("tx-poison-ok-1", card, 10, 25.00, BERLIN))
    return batch.event()


def kpl_aggregated():
    batch = Batch(first_sequence=300)
    card = "4555550000000006"
    users = [
        (card, payload_bytes(transaction(f"tx-kpl-{i}", card, i * 10, 10.0 + i, BERLIN)))
        for i in range(3)
    ]
    users.append(("canary-1795687260-1", payload_bytes(canary("canary-1795687260-1", 1))))
    batch.add(card, kpl_aggregate(users))
    other = "4000009876543210"
    batch.add(other, transaction("tx-kpl-plain", other, 1, 55.00, MUNICH))
    return batch.event()


def canary_scheduled():
    return {
        "version": "0",
        "id": "5e3a1a8c-7b52-4a1e-9d3e-2f6a0f0c7d11",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": rfc3339(BASE_TIME),
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/shardwise-canary"],
        "detail": {},
    }


def main():
    events = {
        "fraud-normal.json": fraud_normal(),
        "fraud-suspicious.json": fraud_suspicious(),
        "fraud-poison.json": fraud_poison(),
        "kpl-aggregated.json": kpl_aggregated(),
        "canary-scheduled.json": canary_scheduled(),
    }
    for name, event in events.items():
        (HERE / name).write_text(json.dumps(event, indent=2) + "\n")
        print(f"wrote events/{name}")


if __name__ == "__main__":
    main()
