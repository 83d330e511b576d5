//! Filter criteria: EventBridge pattern syntax, applied as Lambda does to Kinesis records.
//!
//! A record is matched as the object `{partitionKey, sequenceNumber, approximateArrivalTimestamp,
//! kinesisSchemaVersion, data}` where `data` is the decoded payload parsed as JSON. A record that
//! no filter matches is dropped before any invocation (and counts as processed: the checkpoint
//! moves past it). A pattern that names `data` cannot match a record whose payload is not JSON,
//! so such records are dropped. Several filters are OR-ed.
//!
//! Supported rules: exact values (strings, numbers, booleans, `null`), `prefix`, `suffix`,
//! `equals-ignore-case`, `anything-but` (values, or `{prefix}`/`{suffix}`), `numeric` (with
//! `=`, `<`, `<=`, `>`, `>=`, ranges), `exists`, `wildcard` (`*`), `cidr` is not supported, and
//! `$or` between field sets. An array in the event matches when any element matches.

use serde_json::{Map, Value};

/// A parsed filter pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern(Map<String, Value>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter pattern: {0}")]
pub struct PatternError(String);

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| PatternError(format!("not JSON: {e}")))?;
        match value {
            Value::Object(map) => {
                validate(&map)?;
                Ok(Self(map))
            }
            _ => Err(PatternError("a pattern is a JSON object".to_owned())),
        }
    }

    /// Does `event` (the record object described in the module docs) match?
    pub fn matches(&self, event: &Value) -> bool {
        match_object(&self.0, event)
    }

    /// Whether the pattern looks into `data`.
    pub fn uses_data(&self) -> bool {
        fn walk(map: &Map<String, Value>) -> bool {
            map.iter().any(|(k, v)| {
                k == "data"
                    || (k == "$or"
                        && v.as_array().is_some_and(|alts| {
                            alts.iter().any(|a| a.as_object().is_some_and(walk))
                        }))
            })
        }
        walk(&self.0)
    }
}

fn validate(map: &Map<String, Value>) -> Result<(), PatternError> {
    for (key, value) in map {
        match value {
            Value::Object(inner) => validate(inner)?,
            Value::Array(rules) if key == "$or" => {
                for alt in rules {
                    let alt = alt
                        .as_object()
                        .ok_or_else(|| PatternError("$or takes objects".to_owned()))?;
                    validate(alt)?;
                }
            }
            Value::Array(_) => {}
            _ => {
                return Err(PatternError(format!(
                    "the value of {key:?} must be an array of rules or an object"
                )));
            }
        }
    }
    Ok(())
}

fn match_object(pattern: &Map<String, Value>, event: &Value) -> bool {
    pattern.iter().all(|(key, rule)| {
        if key == "$or" {
            return rule.as_array().is_some_and(|alts| {
                alts.iter()
                    .filter_map(Value::as_object)
                    .any(|alt| match_object(alt, event))
            });
        }
        let field = event.get(key);
        match rule {
            Value::Object(inner) => field.is_some_and(|f| match f {
                Value::Array(items) => items.iter().any(|item| match_object(inner, item)),
                other => match_object(inner, other),
            }),
            Value::Array(rules) => match_rules(rules, field),
            _ => false,
        }
    })
}

/// Any rule matches the field (or, for an array field, any of its elements).
fn match_rules(rules: &[Value], field: Option<&Value>) -> bool {
    rules.iter().any(|rule| {
        // `exists` looks at the field itself, not its elements.
        if let Some(exists) = rule.get("exists").and_then(Value::as_bool) {
            return exists == field.is_some_and(|f| !f.is_null() || exists);
        }
        match field {
            None => false,
            Some(Value::Array(items)) => items.iter().any(|item| match_rule(rule, item)),
            Some(value) => match_rule(rule, value),
        }
    })
}

fn match_rule(rule: &Value, value: &Value) -> bool {
    match rule {
        Value::Object(op) => {
            let Some((name, arg)) = op.iter().next() else {
                return false;
            };
            match name.as_str() {
                "prefix" => match (arg, value) {
                    (Value::String(p), Value::String(s)) => s.starts_with(p.as_str()),
                    (Value::Object(o), Value::String(s)) => o
                        .get("equals-ignore-case")
                        .and_then(Value::as_str)
                        .is_some_and(|p| s.to_lowercase().starts_with(&p.to_lowercase())),
                    _ => false,
                },
                "suffix" => match (arg, value) {
                    (Value::String(p), Value::String(s)) => s.ends_with(p.as_str()),
                    _ => false,
                },
                "equals-ignore-case" => match (arg, value) {
                    (Value::String(p), Value::String(s)) => p.eq_ignore_ascii_case(s),
                    _ => false,
                },
                "wildcard" => match (arg, value) {
                    (Value::String(p), Value::String(s)) => wildcard(p, s),
                    _ => false,
                },
                "anything-but" => match arg {
                    Value::Array(values) => !values.iter().any(|v| scalar_eq(v, value)),
                    Value::Object(inner) => !inner.iter().any(|(k, v)| {
                        let mut o = Map::new();
                        o.insert(k.clone(), v.clone());
                        match_rule(&Value::Object(o), value)
                    }),
                    scalar => !scalar_eq(scalar, value),
                },
                "numeric" => numeric(arg, value),
                _ => false,
            }
        }
        scalar => scalar_eq(scalar, value),
    }
}

fn scalar_eq(rule: &Value, value: &Value) -> bool {
    match (rule, value) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

fn numeric(arg: &Value, value: &Value) -> bool {
    let (Some(ops), Some(x)) = (arg.as_array(), value.as_f64()) else {
        return false;
    };
    ops.chunks(2).all(|pair| {
        let (Some(op), Some(bound)) = (pair[0].as_str(), pair.get(1).and_then(Value::as_f64))
        else {
            return false;
        };
        match op {
            "=" => (x - bound).abs() < f64::EPSILON,
            "<" => x < bound,
            "<=" => x <= bound,
            ">" => x > bound,
            ">=" => x >= bound,
            _ => false,
        }
    })
}

fn wildcard(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else if let Some(at) = rest.find(part) {
            rest = &rest[at + part.len()..];
        } else {
            return false;
        }
    }
    true
}

/// The object a Kinesis record is matched as; `data` is absent when the payload is not JSON.
pub fn record_view(
    partition_key: &str,
    sequence_number: &str,
    arrival_ms: i64,
    data: &[u8],
) -> Value {
    let mut map = Map::new();
    map.insert("kinesisSchemaVersion".into(), Value::String("1.0".into()));
    map.insert("partitionKey".into(), Value::String(partition_key.into()));
    map.insert(
        "sequenceNumber".into(),
        Value::String(sequence_number.into()),
    );
    #[allow(clippy::cast_precision_loss)]
    map.insert(
        "approximateArrivalTimestamp".into(),
        serde_json::Number::from_f64(arrival_ms as f64 / 1000.0).map_or(Value::Null, Value::Number),
    );
    if let Ok(parsed) = serde_json::from_slice::<Value>(data) {
        map.insert("data".into(), parsed);
    }
    Value::Object(map)
}

/// Whether a record passes `filters` (no filters: everything passes).
pub fn passes(filters: &[Pattern], view: &Value) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(view))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn view(data: &str) -> Value {
        record_view("card-1", "1", 1000, data.as_bytes())
    }

    #[test]
    fn rules_match_as_eventbridge_does() {
        let p = Pattern::parse(
            r#"{"data": {"channel": ["atm"], "amount": [{"numeric": [">", 100]}]}}"#,
        )
        .unwrap();
        assert!(p.matches(&view(r#"{"channel":"atm","amount":150}"#)));
        assert!(!p.matches(&view(r#"{"channel":"pos","amount":150}"#)));
        assert!(!p.matches(&view(r#"{"channel":"atm","amount":50}"#)));
        // Non-JSON data never meets a data pattern.
        assert!(!p.matches(&view("not json")));

        let p = Pattern::parse(r#"{"partitionKey": [{"prefix": "card-"}]}"#).unwrap();
        assert!(
            p.matches(&view("not json")),
            "metadata-only patterns see non-JSON records"
        );

        let p = Pattern::parse(r#"{"data": {"canary_id": [{"exists": false}]}}"#).unwrap();
        assert!(p.matches(&view(r#"{"x":1}"#)));
        assert!(!p.matches(&view(r#"{"canary_id":"c"}"#)));

        let p = Pattern::parse(r#"{"data": {"tags": ["b"], "cur": [{"anything-but": ["EUR"]}]}}"#)
            .unwrap();
        assert!(p.matches(&view(r#"{"tags":["a","b"],"cur":"USD"}"#)));
        assert!(!p.matches(&view(r#"{"tags":["a"],"cur":"USD"}"#)));

        let p = Pattern::parse(
            r#"{"$or": [{"data": {"a": [1]}}, {"data": {"b": [{"wildcard": "x*z"}]}}]}"#,
        )
        .unwrap();
        assert!(p.matches(&view(r#"{"b":"xyyz"}"#)));
        assert!(p.matches(&view(r#"{"a":1}"#)));
        assert!(!p.matches(&view(r#"{"a":2}"#)));
        assert!(p.uses_data());

        assert!(Pattern::parse(r#"{"data": "x"}"#).is_err());
        assert!(passes(&[], &json!({})));
    }
}
