//! CloudWatch Embedded Metric Format (EMF): metrics as one structured log line.
//!
//! Lambda ships stdout to CloudWatch Logs, which turns any line with an `_aws` member into
//! metrics, with no API call on the hot path. The format is small enough to write to AWS's
//! specification here rather than take a dependency.

use serde_json::{Map, Value, json};

/// Where metrics go: stdout in Lambda, a buffer in tests.
pub trait MetricsWriter: Send + Sync {
    fn write_line(&self, line: &str);
}

/// Writes EMF lines to stdout, where Lambda's log agent picks them up.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdoutMetrics;

impl MetricsWriter for StdoutMetrics {
    fn write_line(&self, line: &str) {
        println!("{line}");
    }
}

impl<W: MetricsWriter + ?Sized> MetricsWriter for std::sync::Arc<W> {
    fn write_line(&self, line: &str) {
        (**self).write_line(line);
    }
}

/// A CloudWatch unit (the subset we use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    Bytes,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Milliseconds => "Milliseconds",
            Self::Bytes => "Bytes",
        }
    }
}

/// One EMF document: a namespace, one dimension set, and the metrics measured under it.
#[derive(Debug, Clone)]
pub struct EmfDocument {
    namespace: String,
    dimensions: Vec<(String, String)>,
    metrics: Vec<(String, Unit, f64)>,
    properties: Vec<(String, Value)>,
}

impl EmfDocument {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            dimensions: Vec::new(),
            metrics: Vec::new(),
            properties: Vec::new(),
        }
    }

    pub fn dimension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.dimensions.push((name.into(), value.into()));
        self
    }

    pub fn metric(mut self, name: impl Into<String>, unit: Unit, value: f64) -> Self {
        self.metrics.push((name.into(), unit, value));
        self
    }

    /// A searchable log property that is not a metric (request id, shard).
    pub fn property(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.properties.push((name.into(), value.into()));
        self
    }

    /// The JSON line, timestamped `timestamp_ms` (epoch milliseconds).
    pub fn to_line(&self, timestamp_ms: i64) -> String {
        let mut root = Map::new();
        let dimension_names: Vec<&str> = self.dimensions.iter().map(|(n, _)| n.as_str()).collect();
        let metric_defs: Vec<Value> = self
            .metrics
            .iter()
            .map(|(name, unit, _)| json!({"Name": name, "Unit": unit.as_str()}))
            .collect();
        root.insert(
            "_aws".to_owned(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [dimension_names],
                    "Metrics": metric_defs,
                }],
            }),
        );
        for (name, value) in &self.dimensions {
            root.insert(name.clone(), Value::String(value.clone()));
        }
        for (name, value) in &self.properties {
            root.insert(name.clone(), value.clone());
        }
        for (name, _, value) in &self.metrics {
            root.insert(name.clone(), json!(value));
        }
        Value::Object(root).to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_emf_specification() {
        let line = EmfDocument::new("Shardwise")
            .dimension("FunctionName", "fraud")
            .metric("RecordsProcessed", Unit::Count, 10.0)
            .metric("BatchDuration", Unit::Milliseconds, 12.5)
            .property("requestId", "abc")
            .to_line(1_700_000_000_000);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["_aws"]["Timestamp"], 1_700_000_000_000i64);
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Shardwise");
        assert_eq!(directive["Dimensions"], json!([["FunctionName"]]));
        assert_eq!(
            directive["Metrics"],
            json!([{"Name":"RecordsProcessed","Unit":"Count"},{"Name":"BatchDuration","Unit":"Milliseconds"}])
        );
        assert_eq!(v["FunctionName"], "fraud");
        assert_eq!(v["RecordsProcessed"], 10.0);
        assert_eq!(v["requestId"], "abc");
        assert!(!line.contains('\n'));
    }
}
