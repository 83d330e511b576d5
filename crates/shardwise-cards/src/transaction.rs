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
//! producer that escapes a character (`"c\u002d1"`) still decodes (a `&str` would refuse it).
//! `timestamp` is checked as RFC 3339 while decoding, so a consumer never meets a bad one: a record
//! with an unreadable timestamp is a wrong-shape payload, dead-lettered with the field named.
//!
//! Canary records are acknowledged through [`crate::canary`].

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use shardwise::payload::{FromRecordData, Json, PayloadError};
pub use shardwise::time::{Timestamp, TimestampError};

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use shardwise::payload::PayloadErrorKind;

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
    fn serializes_back_to_the_same_shape() {
        let payload = StreamPayload::from_record_data(TX).unwrap();
        let json = serde_json::to_vec(&payload).unwrap();
        assert_eq!(StreamPayload::from_record_data(&json).unwrap(), payload);
    }
}
