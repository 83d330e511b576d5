//! DynamoDB-shaped tables in SQLite: items are attribute maps (the SDK's `AttributeValue`), so a
//! function's existing `to_item`/`from_item` serve both backends, and puts take the conditions
//! the functions use (`attribute_not_exists`, a version equal to the expected one).

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use rusqlite::{OptionalExtension, params};
use serde_json::{Map, Value};

use crate::{LocalDb, LocalError};

/// An item as the SDK holds it.
pub type Item = HashMap<String, AttributeValue>;

/// The condition of a put, as the functions write them in DynamoDB.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Unconditional.
    None,
    /// `attribute_not_exists(<key>)`: no item with this id.
    NotExists,
    /// `<attribute> = :n` on a number attribute of the stored item.
    NumberEquals { attribute: String, value: String },
}

/// What a conditional put did.
#[derive(Debug, Clone, PartialEq)]
pub enum PutResult {
    Written,
    /// The condition failed; the stored item (`ReturnValuesOnConditionCheckFailure=ALL_OLD`).
    ConditionFailed(Option<HashMap<String, AttributeValue>>),
}

/// One named table of a [`LocalDb`]; items keyed by a string id the caller derives (for a
/// composite DynamoDB key, join its parts).
#[derive(Debug, Clone)]
pub struct SqliteTable {
    db: Arc<LocalDb>,
    table: String,
}

impl SqliteTable {
    pub fn new(db: Arc<LocalDb>, table: impl Into<String>) -> Self {
        Self {
            db,
            table: table.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.table
    }

    fn corrupt(&self, id: &str, message: impl std::fmt::Display) -> LocalError {
        LocalError::Corrupt {
            path: self.db.path().display().to_string(),
            message: format!("{}/{id}: {message}", self.table),
        }
    }

    /// The items of `ids` (same positions; `None` where absent).
    pub fn get_many(
        &self,
        ids: &[&str],
    ) -> Result<Vec<Option<HashMap<String, AttributeValue>>>, LocalError> {
        let docs = self.db.with(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT doc FROM items WHERE tbl = ?1 AND id = ?2")?;
            ids.iter()
                .map(|id| {
                    statement
                        .query_row(params![self.table, id], |row| row.get::<_, String>(0))
                        .optional()
                })
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        docs.into_iter()
            .zip(ids)
            .map(|(doc, id)| {
                doc.map(|doc| {
                    let value: Value =
                        serde_json::from_str(&doc).map_err(|e| self.corrupt(id, e))?;
                    item_from_json(&value).map_err(|e| self.corrupt(id, e))
                })
                .transpose()
            })
            .collect()
    }

    pub fn get(&self, id: &str) -> Result<Option<HashMap<String, AttributeValue>>, LocalError> {
        Ok(self.get_many(&[id])?.into_iter().next().flatten())
    }

    /// Put `item` under `id` if `condition` holds, atomically.
    pub fn put(
        &self,
        id: &str,
        item: &HashMap<String, AttributeValue>,
        condition: &Condition,
    ) -> Result<PutResult, LocalError> {
        let doc = item_to_json(item).to_string();
        let current = self.db.with(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let current: Option<String> = tx
                .query_row(
                    "SELECT doc FROM items WHERE tbl = ?1 AND id = ?2",
                    params![self.table, id],
                    |row| row.get(0),
                )
                .optional()?;
            let allowed = match (condition, &current) {
                (Condition::None, _) => true,
                (Condition::NotExists, existing) => existing.is_none(),
                (Condition::NumberEquals { .. }, None) => false,
                (Condition::NumberEquals { attribute, value }, Some(doc)) => {
                    serde_json::from_str::<Value>(doc)
                        .ok()
                        .and_then(|v| v.get(attribute).and_then(|a| a.get("N")).cloned())
                        .and_then(|n| n.as_str().map(|n| n == value))
                        .unwrap_or(false)
                }
            };
            if !allowed {
                tx.rollback()?;
                return Ok(Some(current));
            }
            tx.execute(
                "INSERT OR REPLACE INTO items (tbl, id, doc) VALUES (?1, ?2, ?3)",
                params![self.table, id, doc],
            )?;
            tx.commit()?;
            Ok(None)
        })?;
        match current {
            None => Ok(PutResult::Written),
            Some(None) => Ok(PutResult::ConditionFailed(None)),
            Some(Some(doc)) => {
                let value: Value = serde_json::from_str(&doc).map_err(|e| self.corrupt(id, e))?;
                Ok(PutResult::ConditionFailed(Some(
                    item_from_json(&value).map_err(|e| self.corrupt(id, e))?,
                )))
            }
        }
    }

    pub fn count(&self) -> Result<u64, LocalError> {
        self.db.with(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM items WHERE tbl = ?1",
                [&self.table],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| u64::try_from(n).unwrap_or(0))
        })
    }

    /// Every item with its id, ordered by id (for inspection and the demo summary).
    pub fn scan(&self) -> Result<Vec<(String, Item)>, LocalError> {
        let rows = self.db.with(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT id, doc FROM items WHERE tbl = ?1 ORDER BY id")?;
            let rows = statement.query_map([&self.table], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter()
            .map(|(id, doc)| {
                let value: Value = serde_json::from_str(&doc).map_err(|e| self.corrupt(&id, e))?;
                let item = item_from_json(&value).map_err(|e| self.corrupt(&id, e))?;
                Ok((id, item))
            })
            .collect()
    }
}

impl SqliteTable {
    /// Items written after position `after` (0 for all), oldest write first, at most `limit`,
    /// each with its position to pass next time. A rewrite moves an item to the end (SQLite
    /// gives a replaced row a new rowid), so a reader polling this sees every write once.
    pub fn written_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String, Item)>, LocalError> {
        let rows = self.db.with(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT rowid, id, doc FROM items WHERE tbl = ?1 AND rowid > ?2
                 ORDER BY rowid LIMIT ?3",
            )?;
            let rows = statement.query_map(
                params![self.table, after, i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                    ))
                },
            )?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter()
            .map(|(position, id, doc)| {
                let value: Value = serde_json::from_str(&doc).map_err(|e| self.corrupt(&id, e))?;
                let item = item_from_json(&value).map_err(|e| self.corrupt(&id, e))?;
                Ok((position, id, item))
            })
            .collect()
    }
}

/// An item as DynamoDB's JSON wire format (`{"attr": {"S": "…"}}`).
pub fn item_to_json(item: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), attribute_to_json(v)))
            .collect(),
    )
}

fn attribute_to_json(value: &AttributeValue) -> Value {
    let tagged = |tag: &str, v: Value| {
        let mut map = Map::new();
        map.insert(tag.to_owned(), v);
        Value::Object(map)
    };
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let b64 = |b: &Blob| Value::String(base64_simd::STANDARD.encode_to_string(b.as_ref()));
    match value {
        AttributeValue::S(s) => tagged("S", Value::String(s.clone())),
        AttributeValue::N(n) => tagged("N", Value::String(n.clone())),
        AttributeValue::B(b) => tagged("B", b64(b)),
        AttributeValue::Bool(b) => tagged("BOOL", Value::Bool(*b)),
        AttributeValue::Null(n) => tagged("NULL", Value::Bool(*n)),
        AttributeValue::Ss(v) => tagged("SS", strings(v)),
        AttributeValue::Ns(v) => tagged("NS", strings(v)),
        AttributeValue::Bs(v) => tagged("BS", Value::Array(v.iter().map(b64).collect())),
        AttributeValue::L(v) => {
            tagged("L", Value::Array(v.iter().map(attribute_to_json).collect()))
        }
        AttributeValue::M(m) => tagged("M", item_to_json(m)),
        _ => tagged("NULL", Value::Bool(true)),
    }
}

/// The inverse of [`item_to_json`].
pub fn item_from_json(value: &Value) -> Result<HashMap<String, AttributeValue>, String> {
    let object = value.as_object().ok_or("an item must be a JSON object")?;
    object
        .iter()
        .map(|(k, v)| Ok((k.clone(), attribute_from_json(v)?)))
        .collect()
}

fn attribute_from_json(value: &Value) -> Result<AttributeValue, String> {
    let object = value
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or_else(|| format!("not an attribute value: {value}"))?;
    let (tag, inner) = object
        .iter()
        .next()
        .ok_or_else(|| format!("not an attribute value: {value}"))?;
    let string = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{tag}: expected a string"))
    };
    let strings = |v: &Value| -> Result<Vec<String>, String> {
        v.as_array()
            .ok_or_else(|| format!("{tag}: expected an array"))?
            .iter()
            .map(string)
            .collect()
    };
    let blob = |v: &Value| -> Result<Blob, String> {
        base64_simd::STANDARD
            .decode_to_vec(string(v)?)
            .map(Blob::new)
            .map_err(|e| format!("{tag}: {e}"))
    };
    Ok(match tag.as_str() {
        "S" => AttributeValue::S(string(inner)?),
        "N" => AttributeValue::N(string(inner)?),
        "B" => AttributeValue::B(blob(inner)?),
        "BOOL" => AttributeValue::Bool(inner.as_bool().unwrap_or(false)),
        "NULL" => AttributeValue::Null(true),
        "SS" => AttributeValue::Ss(strings(inner)?),
        "NS" => AttributeValue::Ns(strings(inner)?),
        "BS" => AttributeValue::Bs(
            inner
                .as_array()
                .ok_or("BS: expected an array")?
                .iter()
                .map(blob)
                .collect::<Result<_, _>>()?,
        ),
        "L" => AttributeValue::L(
            inner
                .as_array()
                .ok_or("L: expected an array")?
                .iter()
                .map(attribute_from_json)
                .collect::<Result<_, _>>()?,
        ),
        "M" => AttributeValue::M(item_from_json(inner)?),
        other => return Err(format!("unknown attribute type {other}")),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip_and_conditions_hold() {
        let dir = std::env::temp_dir().join(format!("sw-table-{}", std::process::id()));
        let db = Arc::new(LocalDb::open(dir.join("db.sqlite")).unwrap());
        let table = SqliteTable::new(db, "t");
        let item = HashMap::from([
            ("id".to_owned(), AttributeValue::S("a".into())),
            ("version".to_owned(), AttributeValue::N("1".into())),
            (
                "blob".to_owned(),
                AttributeValue::B(Blob::new(vec![0, 255])),
            ),
            (
                "m".to_owned(),
                AttributeValue::M(HashMap::from([(
                    "l".to_owned(),
                    AttributeValue::L(vec![AttributeValue::Ss(vec!["x".into()])]),
                )])),
            ),
        ]);
        assert_eq!(
            table.put("a", &item, &Condition::NotExists).unwrap(),
            PutResult::Written
        );
        assert_eq!(table.get("a").unwrap().unwrap(), item);
        assert_eq!(
            table.put("a", &item, &Condition::NotExists).unwrap(),
            PutResult::ConditionFailed(Some(item.clone()))
        );
        let v1 = Condition::NumberEquals {
            attribute: "version".into(),
            value: "1".into(),
        };
        let mut item2 = item.clone();
        item2.insert("version".into(), AttributeValue::N("2".into()));
        assert_eq!(table.put("a", &item2, &v1).unwrap(), PutResult::Written);
        assert!(matches!(
            table.put("a", &item2, &v1).unwrap(),
            PutResult::ConditionFailed(Some(_))
        ));
        assert_eq!(table.count().unwrap(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_poller_sees_every_write_once() {
        let dir = std::env::temp_dir().join(format!("sw-table-writes-{}", std::process::id()));
        let db = Arc::new(LocalDb::open(dir.join("db.sqlite")).unwrap());
        let table = SqliteTable::new(db, "t");
        let item = |n: &str| HashMap::from([("n".to_owned(), AttributeValue::N(n.into()))]);
        for (id, n) in [("a", "1"), ("b", "1")] {
            table.put(id, &item(n), &Condition::None).unwrap();
        }
        let first = table.written_after(0, 10).unwrap();
        let ids: Vec<&str> = first.iter().map(|(_, id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let seen = first.last().unwrap().0;
        assert!(table.written_after(seen, 10).unwrap().is_empty());
        // A rewrite of "a" comes again, after what was seen.
        table.put("a", &item("2"), &Condition::None).unwrap();
        let next = table.written_after(seen, 10).unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].1, "a");
        assert_eq!(next[0].2, item("2"));
        assert_eq!(table.written_after(0, 1).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
