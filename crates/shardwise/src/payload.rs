//! Typed views of a record's payload.
//!
//! A handler names the type it wants (`Json<Transaction<'a>>`, or `&[u8]` for raw bytes) and the
//! processor decodes it before the handler runs. A payload that does not decode is a permanent
//! error of that record — retrying cannot make bad bytes good — and its message names the serde
//! field path, so the dead letter says what was wrong and where.

use std::ops::Deref;

use serde::Deserialize;

/// Types a record's payload bytes can be turned into. `'d` is the lifetime of the batch's decoded
/// data, so implementations may borrow from it.
pub trait FromRecordData<'d>: Sized {
    fn from_record_data(data: &'d [u8]) -> Result<Self, PayloadError>;
}

/// A JSON payload deserialized into `T` (which may borrow `&'d str` fields from the record).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Json<T>(pub T);

impl<T> Deref for Json<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'d, T: Deserialize<'d>> FromRecordData<'d> for Json<T> {
    fn from_record_data(data: &'d [u8]) -> Result<Self, PayloadError> {
        if data.is_empty() {
            return Err(PayloadError {
                kind: PayloadErrorKind::Empty,
                path: String::new(),
                message: "the record has no data".to_owned(),
            });
        }
        match sonic_rs::from_slice::<T>(data) {
            Ok(value) => Ok(Json(value)),
            Err(fast) => Err(PayloadError::describe::<T>(data, fast.to_string())),
        }
    }
}

/// The raw payload bytes, for handlers that parse nothing or parse on their own.
impl<'d> FromRecordData<'d> for &'d [u8] {
    fn from_record_data(data: &'d [u8]) -> Result<Self, PayloadError> {
        Ok(data)
    }
}

/// What kind of bad payload this is; the dead letter's `error.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadErrorKind {
    /// Zero bytes of data.
    Empty,
    /// Not UTF-8 text.
    NotUtf8,
    /// Not JSON at all.
    NotJson,
    /// JSON, but not of the expected shape (missing field, wrong type, …).
    WrongShape,
}

impl PayloadErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "EmptyPayload",
            Self::NotUtf8 => "PayloadNotUtf8",
            Self::NotJson => "PayloadNotJson",
            Self::WrongShape => "PayloadWrongShape",
        }
    }
}

/// A payload that did not decode into the handler's type.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}{}: {message}", kind.as_str(), if path.is_empty() { String::new() } else { format!(" at `{path}`") })]
pub struct PayloadError {
    pub kind: PayloadErrorKind,
    /// The serde field path (`amount`, `items[3].price`), empty where it does not apply.
    pub path: String,
    pub message: String,
}

impl PayloadError {
    /// Re-parse with path tracking to explain a failure of the fast parser.
    fn describe<'d, T: Deserialize<'d>>(data: &'d [u8], fallback: String) -> Self {
        if std::str::from_utf8(data).is_err() {
            return Self {
                kind: PayloadErrorKind::NotUtf8,
                path: String::new(),
                message: "the record's data is not UTF-8 text, so it cannot be JSON".to_owned(),
            };
        }
        if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(data) {
            return Self {
                kind: PayloadErrorKind::NotJson,
                path: String::new(),
                message: error.to_string(),
            };
        }
        let error = crate::event::describe_json_error::<T>(data, fallback);
        Self {
            kind: PayloadErrorKind::WrongShape,
            path: error.path,
            message: error.message,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Tx<'a> {
        card_id: &'a str,
        amount: f64,
        #[serde(default)]
        items: Vec<Item>,
    }
    #[derive(Debug, Deserialize)]
    struct Item {
        #[allow(dead_code)]
        price: u32,
    }

    #[test]
    fn borrows_fields_from_the_record() {
        let data = br#"{"card_id":"c-1","amount":12.5,"other":true}"#;
        let Json(tx) = Json::<Tx<'_>>::from_record_data(data).unwrap();
        assert_eq!(tx.card_id, "c-1");
        assert_eq!(tx.amount, 12.5);
        assert!(tx.items.is_empty());
    }

    #[test]
    fn errors_say_what_and_where() {
        let err = Json::<Tx<'_>>::from_record_data(b"").unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::Empty);
        let err = Json::<Tx<'_>>::from_record_data(b"\xff\xfe").unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::NotUtf8);
        let err = Json::<Tx<'_>>::from_record_data(b"hello").unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::NotJson);
        let err =
            Json::<Tx<'_>>::from_record_data(br#"{"card_id":"c","amount":"12"}"#).unwrap_err();
        assert_eq!(err.kind, PayloadErrorKind::WrongShape);
        assert_eq!(err.path, "amount");
        let err = Json::<Tx<'_>>::from_record_data(
            br#"{"card_id":"c","amount":1,"items":[{"price":1},{"price":-3}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "items[1].price");
        assert!(
            err.to_string()
                .starts_with("PayloadWrongShape at `items[1].price`")
        );
        let err = Json::<Tx<'_>>::from_record_data(br#"{"amount":1}"#).unwrap_err();
        assert!(err.message.contains("card_id"), "{err}");
    }

    #[test]
    fn escaped_strings_need_an_owned_type() {
        // A producer may escape any character; `&str` fields cannot borrow then. `Cow` can.
        #[derive(Deserialize)]
        struct Owned<'a> {
            #[serde(borrow)]
            card_id: std::borrow::Cow<'a, str>,
        }
        let Json(v) = Json::<Owned<'_>>::from_record_data(br#"{"card_id":"c\u002d1"}"#).unwrap();
        assert_eq!(v.card_id, "c-1");
    }
}
