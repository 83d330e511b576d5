//! Time as Kinesis events and payloads write it: RFC 3339 text, kept as epoch milliseconds.
//!
//! The window layer reads Lambda's window bounds (`window.start`, `window.end`) with it, and
//! payload types use it for their own timestamps, so a record whose time does not read is a
//! wrong-shape payload named by its field path. Parsing is hand-written (no date crate on the hot
//! path): RFC 3339 with any offset, digits past the millisecond truncated.

use std::borrow::Cow;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
