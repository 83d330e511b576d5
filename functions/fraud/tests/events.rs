//! The fraud handler on the sample events in `events/`, with in-memory stores: the responses and
//! alerts the events README promises, and alert-once across redeliveries and failures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use fraud::alert::{AlertError, InMemoryAlertSink};
use fraud::rules::{CardRange, Rule, RuleSet};
use fraud::state::{InMemoryCardStateStore, StateError};
use fraud::{CONSUMER, FraudHandler};
use shardwise::clock::ManualClock;
use shardwise::config::{CommonSettings, Env};
use shardwise::processor::{Bisecting, Outcome};
use shardwise::retry::{ExponentialBackoff, Jitter};
use shardwise::{InMemoryDeadLetterSink, Invocation, Processor};
use shardwise_cards::canary::InMemoryCanaryAckStore;

type Handler =
    FraudHandler<InMemoryCardStateStore, InMemoryAlertSink, InMemoryCanaryAckStore, ManualClock>;
type FraudProcessor = Processor<Bisecting<Handler>, InMemoryDeadLetterSink>;

fn event(name: &str) -> Vec<u8> {
    let path = format!("{}/../../events/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The rules the events README runs the suspicious sample with.
fn sample_rules() -> RuleSet {
    let mut rules = RuleSet::default();
    rules.blocklist.merchants.insert("m-blocked-666".into());
    rules
        .blocklist
        .card_ranges
        .push(CardRange::parse("999999").unwrap());
    rules
}

fn processor() -> FraudProcessor {
    let common = CommonSettings::from_env(&Env(std::collections::HashMap::from([(
        "DEAD_LETTER_QUEUE_URL",
        "memory",
    )])))
    .unwrap();
    let handler = FraudHandler::new(
        InMemoryCardStateStore::new(),
        InMemoryAlertSink::new(),
        InMemoryCanaryAckStore::new(),
        // 2026-11-26T10:15:00Z, a little after the sample transactions.
        ManualClock::new(1_795_688_100_000),
        sample_rules(),
    );
    fraud::processor(handler, InMemoryDeadLetterSink::new(), &common).retry(ExponentialBackoff {
        initial: Duration::from_millis(10),
        max_delay: Duration::from_millis(10),
        max_retries: 0,
        jitter: Jitter::None,
    })
}

fn handler(p: &FraudProcessor) -> &Handler {
    &p.handler().0
}

async fn run(p: &FraudProcessor, name: &str) -> String {
    let report = p
        .process(&event(name), &Invocation::unbounded("test"))
        .await
        .unwrap();
    serde_json::to_string(&report.response).unwrap()
}

fn alerted(p: &FraudProcessor) -> Vec<(String, Vec<Rule>)> {
    handler(p)
        .alerts()
        .alerts()
        .into_iter()
        .map(|a| (a.transaction_id, a.reasons.iter().map(|r| r.rule).collect()))
        .collect()
}

const ALL_DONE: &str = r#"{"batchItemFailures":[]}"#;

#[tokio::test]
async fn a_normal_batch_raises_nothing_and_acknowledges_its_canary() {
    let p = processor();
    assert_eq!(run(&p, "fraud-normal.json").await, ALL_DONE);
    assert!(alerted(&p).is_empty());
    let acks = handler(&p).canaries().acks();
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].canary_id, "canary-1795687200-0");
    assert_eq!(acks[0].consumer, CONSUMER);
    assert_eq!(acks[0].acked_at, 1_795_688_100_000);
    // Four cards: one read and one write for the whole batch.
    assert_eq!(handler(&p).store().calls(), (1, 1));
    let card = handler(&p).store().get("4000001234567899").unwrap();
    assert_eq!(card.version, 1);
    assert_eq!(card.profile.amounts.n, 3);
    assert_eq!(
        card.last_applied.unwrap().sequence_number,
        "49656752418953374588117285836785373493958341436154000080"
    );
}

#[tokio::test]
async fn every_rule_fires_in_the_suspicious_batch() {
    let p = processor();
    assert_eq!(run(&p, "fraud-suspicious.json").await, ALL_DONE);
    // Each rule alerts on its own: the velocity burst from its sixth purchase, the big amount
    // after small ones too.
    assert_eq!(
        alerted(&p),
        vec![
            ("tx-velocity-5".to_owned(), vec![Rule::Velocity]),
            (
                "tx-velocity-amount".to_owned(),
                vec![Rule::Velocity, Rule::AmountAnomaly]
            ),
            ("tx-travel-1".to_owned(), vec![Rule::ImpossibleTravel]),
            (
                "tx-blocked-merchant".to_owned(),
                vec![Rule::BlockedMerchant]
            ),
            ("tx-blocked-card".to_owned(), vec![Rule::BlockedCardRange]),
            ("tx-amount-big".to_owned(), vec![Rule::AmountAnomaly]),
        ]
    );
    let alert = &handler(&p).alerts().alerts()[1];
    assert_eq!(alert.card_id, "4111110000000001");
    assert_eq!(alert.score, 120);
    assert_eq!(alert.detected_at, "2026-11-26T10:15:00.000Z");
    // The outboxes are empty once sent.
    for card in ["4111110000000001", "4222220000000002", "4444440000000005"] {
        assert!(
            handler(&p)
                .store()
                .get(card)
                .unwrap()
                .pending_alerts
                .is_empty()
        );
    }
    // The alert body has the documented fields.
    let body: serde_json::Value = serde_json::from_str(&handler(&p).alerts().bodies()[2]).unwrap();
    for field in ["transactionId", "cardId", "score", "reasons", "detectedAt"] {
        assert!(body.get(field).is_some(), "{field} missing from {body}");
    }
    assert_eq!(body["reasons"][0]["rule"], "impossible_travel");
}

#[tokio::test]
async fn a_redelivered_batch_alerts_nothing_twice() {
    let p = processor();
    run(&p, "fraud-suspicious.json").await;
    assert_eq!(run(&p, "fraud-suspicious.json").await, ALL_DONE);
    assert_eq!(handler(&p).alerts().bodies().len(), 6);
    // Nor does it move state: the second delivery wrote nothing.
    assert_eq!(handler(&p).store().calls(), (2, 1));
    assert_eq!(
        handler(&p)
            .store()
            .get("4444440000000005")
            .unwrap()
            .profile
            .amounts
            .n,
        6
    );
}

#[tokio::test]
async fn alerts_decided_before_a_failed_send_go_out_once_on_redelivery() {
    let p = processor();
    handler(&p).alerts().fail_next(AlertError {
        retryable: true,
        message: "throttled".into(),
    });
    let first = run(&p, "fraud-suspicious.json").await;
    // The whole batch goes back to Lambda (a batch handler fails as one)...
    assert!(first.contains("itemIdentifier"), "{first}");
    assert!(handler(&p).alerts().bodies().is_empty());
    // ...with the state written and the alerts kept in the outboxes.
    assert_eq!(
        handler(&p)
            .store()
            .get("4222220000000002")
            .unwrap()
            .pending_alerts
            .len(),
        1
    );
    assert_eq!(run(&p, "fraud-suspicious.json").await, ALL_DONE);
    let ids: Vec<String> = alerted(&p).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 6);
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 6);
    assert!(
        handler(&p)
            .store()
            .get("4222220000000002")
            .unwrap()
            .pending_alerts
            .is_empty()
    );
}

#[tokio::test]
async fn a_failed_state_write_sends_nothing_and_the_retry_scores_once() {
    let p = processor();
    handler(&p)
        .store()
        .fail_next_save(StateError::Unavailable("throttled".into()));
    let first = run(&p, "fraud-suspicious.json").await;
    assert!(first.contains("itemIdentifier"), "{first}");
    assert!(handler(&p).alerts().bodies().is_empty());
    assert_eq!(run(&p, "fraud-suspicious.json").await, ALL_DONE);
    assert_eq!(handler(&p).alerts().bodies().len(), 6);
}

#[tokio::test]
async fn an_outbox_that_cannot_be_cleared_is_retried_before_giving_up() {
    let p = processor();
    handler(&p)
        .store()
        .fail_next_outbox(StateError::Unavailable("throttled".into()));
    assert_eq!(run(&p, "fraud-suspicious.json").await, ALL_DONE);
    assert_eq!(handler(&p).alerts().bodies().len(), 6);
    assert!(
        handler(&p)
            .store()
            .get("4111110000000001")
            .unwrap()
            .pending_alerts
            .is_empty()
    );
}

#[tokio::test]
async fn poison_records_are_dead_lettered_and_the_rest_processed() {
    let p = processor();
    let report = p
        .process(&event("fraud-poison.json"), &Invocation::unbounded("test"))
        .await
        .unwrap();
    assert_eq!(serde_json::to_string(&report.response).unwrap(), ALL_DONE);
    let types: Vec<String> = p
        .dead_letter_sink()
        .letters()
        .iter()
        .map(|l| l["error"]["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        vec!["InvalidBase64", "PayloadNotJson", "PayloadWrongShape"]
    );
    assert!(matches!(report.outcomes[0], Outcome::Processed { .. }));
    assert!(matches!(report.outcomes[4], Outcome::Processed { .. }));
    let card = handler(&p).store().get("4000001234567899").unwrap();
    assert_eq!(card.profile.amounts.n, 2);
    // The good records cost one handler call: the bad ones never reached it.
    assert_eq!(report.handler_calls, 1);
}

#[tokio::test]
async fn kpl_user_records_are_scored_and_acknowledged() {
    let p = processor();
    let report = p
        .process(
            &event("kpl-aggregated.json"),
            &Invocation::unbounded("test"),
        )
        .await
        .unwrap();
    assert_eq!(serde_json::to_string(&report.response).unwrap(), ALL_DONE);
    assert_eq!(report.counts.processed, 5);
    let card = handler(&p).store().get("4555550000000006").unwrap();
    assert_eq!(card.profile.amounts.n, 3);
    // The guard remembers the sub-sequence number of the last user record applied.
    assert_eq!(card.last_applied.unwrap().sub_sequence_number, Some(2));
    assert_eq!(
        handler(&p).canaries().acks()[0].canary_id,
        "canary-1795687260-1"
    );
    // Redelivered: nothing applied twice.
    run(&p, "kpl-aggregated.json").await;
    let card = handler(&p).store().get("4555550000000006").unwrap();
    assert_eq!(card.profile.amounts.n, 3);
}

#[test]
fn the_kpl_sample_is_in_our_kpl_modules_format() {
    use shardwise::kpl::{AggregateEntry, aggregate, deaggregate};
    let event: serde_json::Value = serde_json::from_slice(&event("kpl-aggregated.json")).unwrap();
    let data = event["Records"][0]["kinesis"]["data"].as_str().unwrap();
    let bytes = base64_decode(data);
    let users = deaggregate(&bytes).unwrap().unwrap();
    assert_eq!(users.len(), 4);
    let entries: Vec<AggregateEntry<'_>> = users
        .iter()
        .map(|u| AggregateEntry {
            partition_key: &u.partition_key,
            explicit_hash_key: u.explicit_hash_key.as_deref(),
            data: &u.data,
        })
        .collect();
    // Byte for byte what shardwise::kpl::aggregate builds.
    assert_eq!(aggregate(&entries), bytes);
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|&c| c != b'=') {
        let value = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        buffer = buffer << 6 | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    out
}

#[tokio::test]
async fn a_bisected_subset_then_the_whole_batch_applies_each_record_once() {
    // Bisecting hands the handler halves it already saw; replay that directly.
    let p = processor();
    let full: serde_json::Value = serde_json::from_slice(&event("fraud-suspicious.json")).unwrap();
    let records = full["Records"].as_array().unwrap();
    let half = serde_json::json!({ "Records": records[..records.len() / 2] });
    p.process(
        serde_json::to_vec(&half).unwrap().as_slice(),
        &Invocation::unbounded("half"),
    )
    .await
    .unwrap();
    assert_eq!(run(&p, "fraud-suspicious.json").await, ALL_DONE);
    assert_eq!(handler(&p).alerts().bodies().len(), 6);
    let velocity = handler(&p).store().get("4111110000000001").unwrap();
    assert_eq!(velocity.profile.amounts.n, 7);
}

#[tokio::test]
async fn a_transaction_put_twice_by_a_producer_alerts_once() {
    use shardwise::testing::{event_json, plain, sequence_number};
    let p = processor();
    let tx =
        br#"{"transaction_id":"tx-dup","card_id":"4333330000000003","merchant_id":"m-blocked-666",
        "merchant_category":"7995","amount":89.0,"currency":"EUR","country":"DE","lat":53.55,
        "lon":9.99,"timestamp":"2026-11-26T10:05:00Z","channel":"pos"}"#;
    // The retry of a PutRecords that had in fact succeeded: same payload, later sequence number.
    let event = event_json(&[
        plain("4333330000000003", &sequence_number(1), tx),
        plain("4333330000000003", &sequence_number(7), tx),
    ]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("dup"))
        .await
        .unwrap();
    assert_eq!(report.counts.processed, 2);
    assert_eq!(alerted(&p).len(), 1);
    let card = handler(&p).store().get("4333330000000003").unwrap();
    assert_eq!(card.profile.amounts.n, 1);
    assert_eq!(card.profile.recent.len(), 1);
}

#[test]
fn the_kinesis_samples_are_lambda_events_and_round_trip() {
    use aws_lambda_events::event::kinesis::KinesisEvent;
    for name in [
        "fraud-normal.json",
        "fraud-suspicious.json",
        "fraud-poison.json",
        "kpl-aggregated.json",
    ] {
        let raw = event(name);
        // The official event type reads every sample but the one with deliberately bad base64.
        let parsed = serde_json::from_slice::<KinesisEvent>(&raw);
        if name == "fraud-poison.json" {
            assert!(
                parsed.is_err(),
                "{name} should not decode: its second record is not base64"
            );
            continue;
        }
        let parsed = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        let again: KinesisEvent =
            serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
        assert_eq!(again, parsed, "{name}");
        for record in &parsed.records {
            assert_eq!(record.event_source.as_deref(), Some("aws:kinesis"));
            assert_eq!(record.kinesis.sequence_number.len(), 56, "{name}");
            assert!(
                record
                    .event_id
                    .as_deref()
                    .unwrap()
                    .ends_with(&record.kinesis.sequence_number)
            );
        }
    }
}
