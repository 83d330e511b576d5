//! The stream's payload: card transactions, and the canary records mixed in with them.
//!
//! Every consumer of the transactions stream (`fraud`, `aggregation`, the local runner's load
//! generator) reads the same JSON, so its type lives here once. A record whose JSON object has a
//! top-level `canary_id` is a canary (written by the `canary` function to measure end-to-end
//! latency) and must be acknowledged, not scored or aggregated: [`StreamPayload`] tells the two
//! apart in a single pass over the record, so a consumer names `StreamPayload<'d>` as its payload
//! type and matches on it.
//!
//! Strings are `Cow<'a, str>` borrowed from the decoded record: no copy on the hot path, and a
//! producer that escapes a character (`"c\u002d1"`) still decodes (see PERFORMANCE.md).
//! `timestamp` is checked as RFC 3339 while decoding, so a consumer never meets a bad one: a record
//! with an unreadable timestamp is a wrong-shape payload, dead-lettered with the field named.
//!
//! # Acknowledging canaries
//! Consumers write one row per canary they see to the canary table (`CANARY_TABLE`), which the
//! `canary` function reads back to measure latency and spot missing records. The row's shape is
//! defined once, here ([`canary_table`]), and written through a [`CanaryAckStore`]:
//! [`DynamoDbCanaryAckStore`] in Lambda, [`InMemoryCanaryAckStore`] in tests.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Mutex;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::payload::{FromRecordData, Json, PayloadError};

/// One card transaction, as producers write it. The partition key is `card_id`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Transaction<'a> {
    #[serde(borrow)]
    pub transaction_id: Cow<'a, str>,
    #[serde(borrow)]
    pub card_id: Cow<'a, str>,
    #[serde(borrow)]
    pub merchant_id: Cow<'a, str>,
    /// ISO 18245 merchant category code, as a string (`"5411"`).
    #[serde(borrow)]
    pub merchant_category: Cow<'a, str>,
    /// In major units of `currency` (`12.5` is 12.50).
    pub amount: f64,
    /// ISO 4217 (`"EUR"`).
    #[serde(borrow)]
    pub currency: Cow<'a, str>,
    /// ISO 3166-1 alpha-2 (`"DE"`).
    #[serde(borrow)]
    pub country: Cow<'a, str>,
    pub lat: f64,
    pub lon: f64,
    pub timestamp: Timestamp,
    pub channel: Channel,
}

/// Where the card was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Card present, at a point of sale.
    Pos,
    /// Card not present, online.
    Ecom,
    /// Cash withdrawal.
    Atm,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pos => "pos",
            Self::Ecom => "ecom",
            Self::Atm => "atm",
        }
    }
}

/// A record written by the `canary` function: `{"canary_id": "...", "sent_at": <epoch ms>}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CanaryRecord<'a> {
    #[serde(borrow)]
    pub canary_id: Cow<'a, str>,
    /// When the canary put the record, in milliseconds since the Unix epoch.
    pub sent_at: i64,
}

/// What a record of the transactions stream is.
///
/// Use it as a handler's payload type (it implements [`FromRecordData`]), or as `Json<StreamPayload>`.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamPayload<'a> {
    Transaction(Transaction<'a>),
    Canary(CanaryRecord<'a>),
}

impl<'a> StreamPayload<'a> {
    pub fn as_transaction(&self) -> Option<&Transaction<'a>> {
        match self {
            Self::Transaction(tx) => Some(tx),
            Self::Canary(_) => None,
        }
    }

    pub fn as_canary(&self) -> Option<&CanaryRecord<'a>> {
        match self {
            Self::Canary(canary) => Some(canary),
            Self::Transaction(_) => None,
        }
    }
}

impl<'d> FromRecordData<'d> for StreamPayload<'d> {
    fn from_record_data(data: &'d [u8]) -> Result<Self, PayloadError> {
        Json::<StreamPayload<'d>>::from_record_data(data).map(|Json(payload)| payload)
    }
}

impl Serialize for StreamPayload<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Transaction(tx) => tx.serialize(serializer),
            Self::Canary(canary) => canary.serialize(serializer),
        }
    }
}

/// A point in time read from an RFC 3339 string, kept as milliseconds since the Unix epoch.
/// Serializes back to RFC 3339 (UTC, millisecond precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    epoch_millis: i64,
}

impl Timestamp {
    pub fn from_epoch_millis(epoch_millis: i64) -> Self {
        Self { epoch_millis }
    }

    pub fn epoch_millis(self) -> i64 {
        self.epoch_millis
    }

    /// Parse `2024-05-01T12:00:00Z`, `2024-05-01T12:00:00.123+02:00`, … (digits past the
    /// millisecond are truncated).
    pub fn parse_rfc3339(text: &str) -> Result<Self, TimestampError> {
        parse_rfc3339_millis(text.as_bytes())
            .map(Self::from_epoch_millis)
            .ok_or_else(|| TimestampError {
                text: text.to_owned(),
            })
    }

    /// RFC 3339 in UTC with milliseconds (`2024-05-01T12:00:00.123Z`).
    pub fn to_rfc3339(self) -> String {
        let days = self.epoch_millis.div_euclid(86_400_000);
        let in_day = self.epoch_millis.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            in_day / 3_600_000,
            in_day / 60_000 % 60,
            in_day / 1000 % 60,
            in_day % 1000
        )
    }
}

// RFC 3339 by hand: the SDK's parser rejects numeric offsets, and a full date-time crate is a lot
// of binary for one format.
fn parse_rfc3339_millis(b: &[u8]) -> Option<i64> {
    fn num(b: &[u8], range: std::ops::Range<usize>) -> Option<i64> {
        let digits = b.get(range)?;
        digits.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    }
    let sep = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(b, 0..4)?, num(b, 5..7)?, num(b, 8..10)?);
    let (hour, minute, second) = (num(b, 11..13)?, num(b, 14..16)?, num(b, 17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        match i - start {
            0 => return None,
            1 => millis *= 100,
            2 => millis *= 10,
            _ => {}
        }
    }
    let offset_minutes = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(b, i + 1..i + 3)?, num(b, i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return None,
    };
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's `days_from_civil` / `civil_from_days` (proleptic Gregorian, day 0 = 1970-01-01).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if month <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        month,
        day,
    )
}

/// A `timestamp` that is not RFC 3339.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{text}` is not an RFC 3339 timestamp")]
pub struct TimestampError {
    pub text: String,
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse_rfc3339(&text).map_err(de::Error::custom)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

// One pass over the object: every field is read into its slot, and only at the end does the
// presence of `canary_id` decide which variant it is. (`#[serde(untagged)]` would buffer the whole
// record and, on failure, say only "did not match any variant", losing the field path.)
impl<'de: 'a, 'a> Deserialize<'de> for StreamPayload<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(StreamPayloadVisitor)
    }
}

struct StreamPayloadVisitor;

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    TransactionId,
    CardId,
    MerchantId,
    MerchantCategory,
    Amount,
    Currency,
    Country,
    Lat,
    Lon,
    Timestamp,
    Channel,
    CanaryId,
    SentAt,
    #[serde(other)]
    Other,
}

/// Wraps a borrowed-or-owned string so the map's value deserializer may hand us either.
#[derive(Deserialize)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Visitor<'de> for StreamPayloadVisitor {
    type Value = StreamPayload<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a transaction or canary JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut transaction_id = None;
        let mut card_id = None;
        let mut merchant_id = None;
        let mut merchant_category = None;
        let mut amount = None;
        let mut currency = None;
        let mut country = None;
        let mut lat = None;
        let mut lon = None;
        let mut timestamp = None;
        let mut channel = None;
        let mut canary_id = None;
        let mut sent_at = None;

        fn set<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
            map: &mut A,
            slot: &mut Option<T>,
            name: &'static str,
        ) -> Result<(), A::Error> {
            if slot.is_some() {
                return Err(de::Error::duplicate_field(name));
            }
            *slot = Some(map.next_value()?);
            Ok(())
        }

        while let Some(key) = map.next_key::<Field>()? {
            match key {
                Field::TransactionId => set(&mut map, &mut transaction_id, "transaction_id")?,
                Field::CardId => set(&mut map, &mut card_id, "card_id")?,
                Field::MerchantId => set(&mut map, &mut merchant_id, "merchant_id")?,
                Field::MerchantCategory => {
                    set(&mut map, &mut merchant_category, "merchant_category")?
                }
                Field::Amount => set(&mut map, &mut amount, "amount")?,
                Field::Currency => set(&mut map, &mut currency, "currency")?,
                Field::Country => set(&mut map, &mut country, "country")?,
                Field::Lat => set(&mut map, &mut lat, "lat")?,
                Field::Lon => set(&mut map, &mut lon, "lon")?,
                Field::Timestamp => set(&mut map, &mut timestamp, "timestamp")?,
                Field::Channel => set(&mut map, &mut channel, "channel")?,
                Field::CanaryId => set(&mut map, &mut canary_id, "canary_id")?,
                Field::SentAt => set(&mut map, &mut sent_at, "sent_at")?,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }

        if let Some(Text(canary_id)) = canary_id {
            return Ok(StreamPayload::Canary(CanaryRecord {
                canary_id,
                sent_at: sent_at.ok_or_else(|| de::Error::missing_field("sent_at"))?,
            }));
        }

        fn required<T, E: de::Error>(slot: Option<T>, name: &'static str) -> Result<T, E> {
            slot.ok_or_else(|| E::missing_field(name))
        }
        let text = |slot: Option<Text<'de>>, name| required(slot, name).map(|Text(t)| t);
        Ok(StreamPayload::Transaction(Transaction {
            transaction_id: text(transaction_id, "transaction_id")?,
            card_id: text(card_id, "card_id")?,
            merchant_id: text(merchant_id, "merchant_id")?,
            merchant_category: text(merchant_category, "merchant_category")?,
            amount: required(amount, "amount")?,
            currency: text(currency, "currency")?,
            country: text(country, "country")?,
            lat: required(lat, "lat")?,
            lon: required(lon, "lon")?,
            timestamp: required(timestamp, "timestamp")?,
            channel: required(channel, "channel")?,
        }))
    }
}

/// The canary table (`CANARY_TABLE`): attribute names shared by the consumers that acknowledge
/// canaries and the `canary` function that reads them back.
///
/// | attribute | type | meaning |
/// |---|---|---|
/// | `canary_id` | S, partition key | the canary record's `canary_id` |
/// | `consumer` | S, sort key | who wrote the row: a consumer (`fraud`, `aggregation`) acknowledging, or [`SENDER`](canary_table::SENDER) for the canary's own row written when it sent the record |
/// | `sent_at` | N | epoch ms, from the record |
/// | `acked_at` | N | epoch ms, when the consumer saw the record (acknowledgement rows) |
/// | `expiration` | N, TTL | epoch seconds |
pub mod canary_table {
    pub const CANARY_ID: &str = "canary_id";
    pub const CONSUMER: &str = "consumer";
    pub const SENT_AT: &str = "sent_at";
    pub const ACKED_AT: &str = "acked_at";
    pub const EXPIRATION: &str = "expiration";
    /// The `consumer` value of the row the canary function writes for each record it sends.
    pub const SENDER: &str = "canary";
}

/// One consumer's acknowledgement of one canary record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryAck {
    pub canary_id: String,
    /// The consumer's name as the canary reports it (`fraud`, `aggregation`).
    pub consumer: String,
    pub sent_at: i64,
    /// Epoch ms.
    pub acked_at: i64,
}

/// Acknowledgements could not be written; retrying may help when `retryable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("canary acknowledgement not written: {message}")]
pub struct CanaryAckError {
    pub retryable: bool,
    pub message: String,
}

/// Where acknowledgements go. The first acknowledgement of a (canary, consumer) is kept, so a
/// redelivered canary does not change the latency already measured.
pub trait CanaryAckStore: Send + Sync {
    fn acknowledge(
        &self,
        acks: &[CanaryAck],
    ) -> impl Future<Output = Result<(), CanaryAckError>> + Send;
}

/// Acknowledgements in the DynamoDB canary table, one conditional `PutItem` each (canaries are a
/// few records a minute, and `BatchWriteItem` cannot keep the first acknowledgement).
#[derive(Debug, Clone)]
pub struct DynamoDbCanaryAckStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    ttl_seconds: i64,
}

impl DynamoDbCanaryAckStore {
    /// Rows live a day (TTL), far longer than the canary looks back.
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            ttl_seconds: 86_400,
        }
    }

    pub fn ttl_seconds(mut self, seconds: i64) -> Self {
        self.ttl_seconds = seconds;
        self
    }

    async fn put(&self, ack: &CanaryAck) -> Result<(), CanaryAckError> {
        use aws_sdk_dynamodb::types::AttributeValue;
        use aws_smithy_types::error::metadata::ProvideErrorMetadata;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(
                canary_table::CANARY_ID,
                AttributeValue::S(ack.canary_id.clone()),
            )
            .item(
                canary_table::CONSUMER,
                AttributeValue::S(ack.consumer.clone()),
            )
            .item(
                canary_table::SENT_AT,
                AttributeValue::N(ack.sent_at.to_string()),
            )
            .item(
                canary_table::ACKED_AT,
                AttributeValue::N(ack.acked_at.to_string()),
            )
            .item(
                canary_table::EXPIRATION,
                AttributeValue::N((ack.acked_at / 1000 + self.ttl_seconds).to_string()),
            )
            .condition_expression("attribute_not_exists(#id)")
            .expression_attribute_names("#id", canary_table::CANARY_ID)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) => {
                let code = error.code().unwrap_or_default().to_owned();
                if code == "ConditionalCheckFailedException" {
                    return Ok(());
                }
                let retryable =
                    !matches!(error, aws_sdk_dynamodb::error::SdkError::ServiceError(_))
                        || matches!(
                            code.as_str(),
                            "ProvisionedThroughputExceededException"
                                | "ThrottlingException"
                                | "RequestLimitExceeded"
                                | "InternalServerError"
                                | "ServiceUnavailable"
                        );
                Err(CanaryAckError {
                    retryable,
                    message: aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string(),
                })
            }
        }
    }
}

impl CanaryAckStore for DynamoDbCanaryAckStore {
    async fn acknowledge(&self, acks: &[CanaryAck]) -> Result<(), CanaryAckError> {
        let results = futures::future::join_all(acks.iter().map(|ack| self.put(ack))).await;
        // Retryable first: a redelivery may then fix everything.
        let mut errors: Vec<CanaryAckError> = results.into_iter().filter_map(Result::err).collect();
        errors.sort_by_key(|e| !e.retryable);
        match errors.into_iter().next() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Keeps acknowledgements in memory (first one per canary and consumer).
#[derive(Debug, Default)]
pub struct InMemoryCanaryAckStore {
    acks: Mutex<Vec<CanaryAck>>,
    fail_next: Mutex<Option<CanaryAckError>>,
}

impl InMemoryCanaryAckStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn acks(&self) -> Vec<CanaryAck> {
        self.acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Make the next call fail with `error`.
    pub fn fail_next(&self, error: CanaryAckError) {
        *self
            .fail_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
    }
}

impl CanaryAckStore for InMemoryCanaryAckStore {
    async fn acknowledge(&self, acks: &[CanaryAck]) -> Result<(), CanaryAckError> {
        if let Some(error) = self
            .fail_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            return Err(error);
        }
        let mut stored = self
            .acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ack in acks {
            if !stored
                .iter()
                .any(|a| a.canary_id == ack.canary_id && a.consumer == ack.consumer)
            {
                stored.push(ack.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::payload::PayloadErrorKind;

    const TX: &[u8] = br#"{"transaction_id":"t-1","card_id":"4000001234567899","merchant_id":"m-7",
        "merchant_category":"5411","amount":12.5,"currency":"EUR","country":"DE","lat":52.52,
        "lon":13.405,"timestamp":"2024-05-01T12:00:00.250Z","channel":"pos","extra":[1,2]}"#;

    #[test]
    fn a_transaction_borrows_its_strings() {
        let payload = StreamPayload::from_record_data(TX).unwrap();
        let tx = payload.as_transaction().unwrap();
        assert!(matches!(tx.card_id, Cow::Borrowed("4000001234567899")));
        assert_eq!(tx.amount, 12.5);
        assert_eq!(tx.channel, Channel::Pos);
        assert_eq!(tx.timestamp.epoch_millis(), 1_714_564_800_250);
        // The plain derive reads the same JSON.
        let Json(same) = Json::<Transaction<'_>>::from_record_data(TX).unwrap();
        assert_eq!(&same, tx);
    }

    #[test]
    fn a_canary_id_makes_a_canary() {
        let payload =
            StreamPayload::from_record_data(br#"{"sent_at":1714564800000,"canary_id":"c-1"}"#)
                .unwrap();
        assert_eq!(
            payload,
            StreamPayload::Canary(CanaryRecord {
                canary_id: "c-1".into(),
                sent_at: 1_714_564_800_000
            })
        );
        // Even when it also looks like a transaction.
        let mut with_tx = TX[..TX.len() - 1].to_vec();
        with_tx.extend_from_slice(br#","canary_id":"c-2","sent_at":5}"#);
        assert!(
            StreamPayload::from_record_data(&with_tx)
                .unwrap()
                .as_canary()
                .is_some()
        );
    }

    #[test]
    fn escaped_strings_decode() {
        let data = br#"{"canary_id":"c\u002d1","sent_at":1}"#;
        let payload = StreamPayload::from_record_data(data).unwrap();
        assert_eq!(payload.as_canary().unwrap().canary_id, "c-1");
    }

    #[test]
    fn bad_records_name_the_field() {
        let err = StreamPayload::from_record_data(br#"{"canary_id":"c"}"#).unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::WrongShape);
        assert!(err.message.contains("sent_at"), "{err}");

        let bad_time = String::from_utf8(TX.to_vec())
            .unwrap()
            .replace("2024-05-01T12:00:00.250Z", "yesterday");
        let err = StreamPayload::from_record_data(bad_time.as_bytes()).unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::WrongShape);
        assert_eq!(err.path, "timestamp");

        let bad_channel = String::from_utf8(TX.to_vec())
            .unwrap()
            .replace("\"pos\"", "\"phone\"");
        let err = StreamPayload::from_record_data(bad_channel.as_bytes()).unwrap_err();
        assert_eq!(err.path, "channel");

        let err = StreamPayload::from_record_data(br#"{"card_id":"c"}"#).unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::WrongShape);
        assert!(err.message.contains("transaction_id"), "{err}");

        let err = StreamPayload::from_record_data(b"[1,2]").unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::WrongShape);
        let err = StreamPayload::from_record_data(b"nope").unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::NotJson);
    }

    #[test]
    fn timestamps_round_trip() {
        let ts = Timestamp::parse_rfc3339("2024-05-01T14:00:00.5+02:00").unwrap();
        assert_eq!(ts.epoch_millis(), 1_714_564_800_500);
        assert_eq!(ts.to_rfc3339(), "2024-05-01T12:00:00.500Z");
        assert_eq!(Timestamp::parse_rfc3339(&ts.to_rfc3339()).unwrap(), ts);
        for (text, millis) in [
            ("1970-01-01T00:00:00Z", 0),
            ("1969-12-31T23:59:59.999Z", -1),
            ("2000-02-29T00:00:00.123456z", 951_782_400_123),
            ("2024-12-31 23:00:00-01:30", 1_735_691_400_000),
        ] {
            let ts = Timestamp::parse_rfc3339(text).unwrap();
            assert_eq!(ts.epoch_millis(), millis, "{text}");
            assert_eq!(Timestamp::parse_rfc3339(&ts.to_rfc3339()).unwrap(), ts);
        }
        for bad in [
            "2023-02-29T00:00:00Z",
            "2024-05-01T12:00:00",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+2:00",
            "2024-5-01T12:00:00Z",
            "",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serializes_back_to_the_same_shape() {
        let payload = StreamPayload::from_record_data(TX).unwrap();
        let json = serde_json::to_vec(&payload).unwrap();
        assert_eq!(StreamPayload::from_record_data(&json).unwrap(), payload);
    }
}
