//! The card transactions the tools, the demo, the benchmarks and the tests send.
//!
//! One generator so that what the local runner's `loadgen` offers, what the chaos tests check
//! and what the benchmarks decode are the same shape: [`TransactionGenerator`] for realistic
//! traffic (cards with habits, fraud patterns, poison), [`card_transaction`] for a fixed ~1 KiB
//! record with nested objects, the size a real acquirer payload has.
//!
//! Every transaction either generator makes carries a [`Label`]: the fraud pattern it belongs
//! to, or what kind of ordinary traffic it is. [`scenario`] makes the labelled evaluation set.

pub mod scenario;

pub use scenario::{ScenarioOptions, scenario};

use std::borrow::Cow;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::json;
use shardwise::producer::ProducerRecord;
use shardwise::testing::{event_json, plain, sequence_number};

/// A fraud pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// A burst of small purchases, often at many merchants (a stolen number being tried).
    CardTesting,
    /// A purchase far above the card's norm, often through a new channel.
    AccountTakeover,
    /// Card present in two places too far apart for the time between them.
    ImpossibleTravel,
    /// A blocklisted merchant or card range.
    Blocklisted,
    /// A merchant category or country unusual for the card.
    UnusualMerchant,
}

impl Pattern {
    pub const ALL: [Pattern; 5] = [
        Pattern::CardTesting,
        Pattern::AccountTakeover,
        Pattern::ImpossibleTravel,
        Pattern::Blocklisted,
        Pattern::UnusualMerchant,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::CardTesting => "card_testing",
            Pattern::AccountTakeover => "account_takeover",
            Pattern::ImpossibleTravel => "impossible_travel",
            Pattern::Blocklisted => "blocklisted",
            Pattern::UnusualMerchant => "unusual_merchant",
        }
    }
}

/// Kinds of ordinary traffic, so an evaluation can say where false positives come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Normal {
    Everyday,
    /// The two days after a card's payday: bigger baskets.
    Payday,
    /// The monthly payment to the card's landlord.
    Rent,
    /// A trip: flights, and days of spending in another city.
    Travel,
    /// A card's first days.
    NewCard,
}

impl Normal {
    pub fn name(self) -> &'static str {
        match self {
            Normal::Everyday => "everyday",
            Normal::Payday => "payday",
            Normal::Rent => "rent",
            Normal::Travel => "travel",
            Normal::NewCard => "new_card",
        }
    }
}

/// What a generated record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    Normal(Normal),
    /// A transaction of a fraud incident (one incident may be several transactions).
    Fraud {
        pattern: Pattern,
        incident: u64,
    },
    /// Not a transaction at all (not JSON, wrong shape).
    Poison,
}

impl Label {
    pub fn pattern(self) -> Option<Pattern> {
        match self {
            Label::Fraud { pattern, .. } => Some(pattern),
            _ => None,
        }
    }
}

/// A generated record, its event time and its label.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub record: ProducerRecord,
    pub at_ms: i64,
    pub label: Label,
}

/// What [`TransactionGenerator`] produces.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorOptions {
    /// Distinct cards (partition keys). Each card shops near its home and around its usual
    /// amount, so ordinary traffic raises (almost) no alerts.
    pub cards: u32,
    /// Share of records that are poison (not JSON, wrong shape).
    pub poison_share: f64,
    /// Share of records that start a fraud pattern (velocity burst, impossible travel, amount
    /// spike, blocklisted merchant).
    pub fraud_share: f64,
    /// Merchant of the blocklist pattern.
    pub blocked_merchant: String,
    pub seed: u64,
}

/// A ~1 KiB JSON card transaction, the payload shape the benchmarks and examples use
/// (25 fields with the nested `device`, `customer`, `terminal` and `metadata` objects).
pub fn card_transaction(n: u64) -> String {
    format!(
        concat!(
            "{{\"transaction_id\":\"tx-{n:012}\",\"card_id\":\"card-{card:06}\",",
            "\"merchant_id\":\"m-{m:05}\",\"merchant_category\":\"5411\",\"amount\":{amt}.{cents:02},",
            "\"currency\":\"EUR\",\"country\":\"DE\",\"lat\":52.52,\"lon\":13.405,",
            "\"timestamp\":\"2026-11-26T10:00:{s:02}Z\",\"channel\":\"pos\",",
            "\"device\":{{\"id\":\"dev-{n:08}\",\"ip\":\"203.0.113.{ip}\",\"user_agent\":",
            "\"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\"}},",
            "\"customer\":{{\"id\":\"cust-{card:06}\",\"segment\":\"retail\",\"risk_tier\":\"low\",",
            "\"since\":\"2019-04-01\",\"email_hash\":\"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\"}},",
            "\"terminal\":{{\"id\":\"term-{m:05}-01\",\"type\":\"chip\",\"entry_mode\":\"contactless\",",
            "\"address\":\"Unter den Linden 1, 10117 Berlin\"}},",
            "\"metadata\":{{\"source\":\"acquirer-gateway\",\"schema\":\"card-tx/v3\",\"trace\":\"{n:032x}\",",
            "\"tags\":[\"grocery\",\"domestic\",\"chip\",\"low-value\"],\"notes\":\"",
            "synthetic benchmark record padded to about one kibibyte of JSON, as real acquirer payloads are\"}}}}"
        ),
        n = n,
        card = n % 5000,
        m = n % 997,
        amt = 5 + n % 200,
        cents = n % 100,
        s = n % 60,
        ip = n % 250,
    )
}

const MCCS: [&str; 8] = [
    "5411", "5812", "5999", "4111", "5541", "5732", "7011", "6011",
];
const PLACES: [(&str, f64, f64); 6] = [
    ("US", 40.71, -74.00),
    ("GB", 51.50, -0.12),
    ("DE", 52.52, 13.40),
    ("JP", 35.68, 139.69),
    ("BR", -23.55, -46.63),
    ("AU", -33.86, 151.20),
];

/// A Lambda Kinesis event of `records` [`card_transaction`]s on 5,000 cards (partition keys), as
/// the benchmarks decode it.
pub fn card_transaction_event(records: usize) -> String {
    let records: Vec<_> = (0..records as u64)
        .map(|n| {
            let tx = card_transaction(n);
            plain(
                &format!("card-{:06}", n % 5000),
                &sequence_number(n),
                tx.as_bytes(),
            )
        })
        .collect();
    event_json(&records)
}

/// Synthetic card transactions, deterministic for a seed: ordinary traffic, fraud patterns and
/// poison records, as `shardwise loadgen`, the demo and the chaos tests send them.
#[derive(Debug)]
pub struct TransactionGenerator {
    rng: StdRng,
    options: GeneratorOptions,
    next_id: u64,
    /// Records of started fraud patterns still to send.
    queued: std::collections::VecDeque<Labelled>,
    pub poison: u64,
    pub fraud_patterns: u64,
}

impl TransactionGenerator {
    pub fn new(options: GeneratorOptions) -> Self {
        Self {
            rng: StdRng::seed_from_u64(options.seed),
            options,
            next_id: 0,
            queued: std::collections::VecDeque::new(),
            poison: 0,
            fraud_patterns: 0,
        }
    }

    fn card(&mut self) -> (String, u32) {
        let n = self.rng.random_range(0..self.options.cards.max(1));
        (format!("card-{n:06}"), n)
    }

    /// A card's home (index into the places) and usual amount.
    fn habits(card: u32) -> (usize, f64) {
        let mix = card.wrapping_mul(2_654_435_761);
        (
            (mix >> 8) as usize % PLACES.len(),
            5.0 + f64::from(mix % 150),
        )
    }

    fn transaction(
        &mut self,
        card: &str,
        at_ms: i64,
        place: usize,
        amount: f64,
        merchant: Option<&str>,
    ) -> ProducerRecord {
        self.next_id += 1;
        let (country, lat, lon) = PLACES[place % PLACES.len()];
        let channel = ["pos", "ecom", "atm"][self.rng.random_range(0..3)];
        let mcc = MCCS[self.rng.random_range(0..MCCS.len())];
        let merchant = merchant.map_or_else(
            || format!("m-{:04}", self.rng.random_range(0..500)),
            str::to_owned,
        );
        let body = json!({
            "transaction_id": format!("tx-{}-{:010}", self.options.seed, self.next_id),
            "card_id": card,
            "merchant_id": merchant,
            "merchant_category": mcc,
            "amount": (amount * 100.0).round() / 100.0,
            "currency": "USD",
            "country": country,
            "lat": lat + self.rng.random_range(-0.05..0.05),
            "lon": lon + self.rng.random_range(-0.05..0.05),
            "timestamp": shardwise::time::Timestamp::from_epoch_millis(at_ms).to_rfc3339(),
            "channel": channel,
        });
        ProducerRecord::new(card, body.to_string().into_bytes())
    }

    /// The next record to send at `at_ms`.
    pub fn next_record(&mut self, at_ms: i64) -> ProducerRecord {
        self.next_labelled(at_ms).record
    }

    /// The next record to send at `at_ms`, with what it is. (A fraud pattern's later records
    /// carry their own event times, after `at_ms`.)
    pub fn next_labelled(&mut self, at_ms: i64) -> Labelled {
        if let Some(record) = self.queued.pop_front() {
            return record;
        }
        let plain = |record, label| Labelled {
            record,
            at_ms,
            label,
        };
        let roll: f64 = self.rng.random();
        if roll < self.options.poison_share {
            self.poison += 1;
            let (card, _) = self.card();
            let data: Vec<u8> = match self.rng.random_range(0..3) {
                0 => b"\xff\xfe not json at all".to_vec(),
                1 => br#"{"transaction_id": 42, "card_id": null}"#.to_vec(),
                _ => br#"{"truncated": "#.to_vec(),
            };
            return plain(ProducerRecord::new(card, data), Label::Poison);
        }
        if roll < self.options.poison_share + self.options.fraud_share {
            self.fraud_patterns += 1;
            let incident = self.fraud_patterns;
            let fraud = |pattern| Label::Fraud { pattern, incident };
            let labelled = |record, at_ms, label| Labelled {
                record,
                at_ms,
                label,
            };
            let (card, n) = self.card();
            let (home, usual) = Self::habits(n);
            match self.rng.random_range(0..4) {
                // Card testing: a burst of transactions within seconds, then a large one
                // (velocity and amount anomaly together pass the alert threshold).
                0 => {
                    let label = fraud(Pattern::CardTesting);
                    for i in 0..12 {
                        let r = self.transaction(&card, at_ms + i * 500, home, usual, None);
                        self.queued.push_back(labelled(r, at_ms + i * 500, label));
                    }
                    let big = self.transaction(&card, at_ms + 6_500, home, usual * 40.0, None);
                    self.queued.push_back(labelled(big, at_ms + 6_500, label));
                }
                // Impossible travel: at home, then on another continent ten minutes later.
                1 => {
                    let a = self.transaction(&card, at_ms, home, usual, None);
                    let b = self.transaction(&card, at_ms + 600_000, home + 3, usual, None);
                    self.queued.extend([
                        labelled(a, at_ms, Label::Normal(Normal::Everyday)),
                        labelled(b, at_ms + 600_000, fraud(Pattern::ImpossibleTravel)),
                    ]);
                }
                // Amount anomaly: a quick history of usual amounts, then a spike.
                2 => {
                    let label = fraud(Pattern::AccountTakeover);
                    for i in 0..8 {
                        let r = self.transaction(&card, at_ms + i * 20_000, home, usual, None);
                        self.queued
                            .push_back(labelled(r, at_ms + i * 20_000, label));
                    }
                    let spike = self.transaction(&card, at_ms + 170_000, home, 9_500.0, None);
                    self.queued
                        .push_back(labelled(spike, at_ms + 170_000, label));
                }
                // Known signature: a blocklisted merchant.
                _ => {
                    let merchant = self.options.blocked_merchant.clone();
                    let r = self.transaction(&card, at_ms, home, usual, Some(&merchant));
                    self.queued
                        .push_back(labelled(r, at_ms, fraud(Pattern::Blocklisted)));
                }
            }
            if let Some(record) = self.queued.pop_front() {
                return record;
            }
        }
        let (card, n) = self.card();
        let (home, usual) = Self::habits(n);
        let amount = usual * self.rng.random_range(0.8..1.25);
        let record = self.transaction(&card, at_ms, home, amount, None);
        plain(record, Label::Normal(Normal::Everyday))
    }
}

/// The whole transaction [`card_transaction`] writes, owned: the typed payload a handler written
/// against `aws_lambda_events` declares (the benchmarks' naive floor).
#[derive(Debug, Deserialize)]
pub struct FullTransaction {
    pub transaction_id: String,
    pub card_id: String,
    pub merchant_id: String,
    pub merchant_category: String,
    pub amount: f64,
    pub currency: String,
    pub country: String,
    pub lat: f64,
    pub lon: f64,
    pub timestamp: String,
    pub channel: String,
    pub device: Device,
    pub customer: Customer,
    pub terminal: Terminal,
    pub metadata: Metadata,
}

#[derive(Debug, Deserialize)]
pub struct Device {
    pub id: String,
    pub ip: String,
    pub user_agent: String,
}

#[derive(Debug, Deserialize)]
pub struct Customer {
    pub id: String,
    pub segment: String,
    pub risk_tier: String,
    pub since: String,
    pub email_hash: String,
}

#[derive(Debug, Deserialize)]
pub struct Terminal {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub entry_mode: String,
    pub address: String,
}

#[derive(Debug, Deserialize)]
pub struct Metadata {
    pub source: String,
    pub schema: String,
    pub trace: String,
    pub tags: Vec<String>,
    pub notes: String,
}

/// The same transaction with every string borrowed from the record (`Cow`, so an escaped string
/// still decodes): what a Shardwise handler that reads every field declares.
#[derive(Debug, Deserialize)]
pub struct FullTransactionRef<'a> {
    #[serde(borrow)]
    pub transaction_id: Cow<'a, str>,
    #[serde(borrow)]
    pub card_id: Cow<'a, str>,
    #[serde(borrow)]
    pub merchant_id: Cow<'a, str>,
    #[serde(borrow)]
    pub merchant_category: Cow<'a, str>,
    pub amount: f64,
    #[serde(borrow)]
    pub currency: Cow<'a, str>,
    #[serde(borrow)]
    pub country: Cow<'a, str>,
    pub lat: f64,
    pub lon: f64,
    #[serde(borrow)]
    pub timestamp: Cow<'a, str>,
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    #[serde(borrow)]
    pub device: DeviceRef<'a>,
    #[serde(borrow)]
    pub customer: CustomerRef<'a>,
    #[serde(borrow)]
    pub terminal: TerminalRef<'a>,
    #[serde(borrow)]
    pub metadata: MetadataRef<'a>,
}

#[derive(Debug, Deserialize)]
pub struct DeviceRef<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub ip: Cow<'a, str>,
    #[serde(borrow)]
    pub user_agent: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
pub struct CustomerRef<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub segment: Cow<'a, str>,
    #[serde(borrow)]
    pub risk_tier: Cow<'a, str>,
    #[serde(borrow)]
    pub since: Cow<'a, str>,
    #[serde(borrow)]
    pub email_hash: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
pub struct TerminalRef<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    pub kind: Cow<'a, str>,
    #[serde(borrow)]
    pub entry_mode: Cow<'a, str>,
    #[serde(borrow)]
    pub address: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
pub struct MetadataRef<'a> {
    #[serde(borrow)]
    pub source: Cow<'a, str>,
    #[serde(borrow)]
    pub schema: Cow<'a, str>,
    #[serde(borrow)]
    pub trace: Cow<'a, str>,
    #[serde(borrow)]
    pub tags: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    pub notes: Cow<'a, str>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_fixed_transaction_reads_as_both_whole_payload_types() {
        let text = card_transaction(42);
        assert!((900..1300).contains(&text.len()), "{}", text.len());
        let owned: FullTransaction = serde_json::from_str(&text).unwrap();
        let borrowed: FullTransactionRef<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(owned.card_id, borrowed.card_id);
        assert_eq!(owned.amount, borrowed.amount);
        assert_eq!(borrowed.terminal.kind, "chip");
        assert!(matches!(borrowed.device.user_agent, Cow::Borrowed(_)));
        assert_eq!(owned.metadata.tags.len(), 4);
    }

    #[test]
    fn the_generator_is_deterministic_for_a_seed() {
        let options = GeneratorOptions {
            cards: 100,
            poison_share: 0.05,
            fraud_share: 0.05,
            blocked_merchant: "m-blocked".to_owned(),
            seed: 3,
        };
        let run = || {
            let mut generator = TransactionGenerator::new(options.clone());
            (0..200)
                .map(|i| generator.next_record(i * 100).data)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
