//! Event source mapping settings, read from `template.yaml` the way CloudFormation would resolve
//! them with the parameters' defaults: each `AWS::Serverless::Function` with a `Kinesis` event
//! gives one mapping. `!Ref` to a parameter takes its `Default`; `!If`, `!Equals`, `!Not`,
//! `!And`, `!Or` and `AWS::NoValue` are evaluated; a `!Ref` to a resource (a queue, a table) is
//! left as the resource's logical id, which the local runner maps to a local backend.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_yaml::Value;

use crate::filter::Pattern;
use crate::stream::StartingPosition;

/// Lambda's cap on an invocation payload (synchronous invoke, 6 MB).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;
/// Lambda's cap on the tumbling-window state (1 MB).
pub const MAX_WINDOW_STATE_BYTES: usize = 1024 * 1024;

/// One function's mapping, as Lambda would run it.
#[derive(Debug, Clone)]
pub struct MappingSettings {
    pub batch_size: usize,
    pub batching_window: Duration,
    pub max_payload_bytes: usize,
    pub starting_position: StartingPosition,
    pub parallelization_factor: u32,
    pub bisect_on_error: bool,
    /// `None`: retry until the record expires (`-1`).
    pub max_retry_attempts: Option<u32>,
    /// `None`: no limit (`-1`).
    pub max_record_age: Option<Duration>,
    pub report_batch_item_failures: bool,
    pub tumbling_window: Option<Duration>,
    pub filters: Vec<Pattern>,
    /// An on-failure destination is configured (its name, for the summary).
    pub on_failure: Option<String>,
    pub max_window_state_bytes: usize,
}

impl Default for MappingSettings {
    /// Lambda's own defaults for a Kinesis mapping.
    fn default() -> Self {
        Self {
            batch_size: 100,
            batching_window: Duration::ZERO,
            max_payload_bytes: MAX_PAYLOAD_BYTES,
            starting_position: StartingPosition::TrimHorizon,
            parallelization_factor: 1,
            bisect_on_error: false,
            max_retry_attempts: None,
            max_record_age: None,
            report_batch_item_failures: false,
            tumbling_window: None,
            filters: Vec::new(),
            on_failure: None,
            max_window_state_bytes: MAX_WINDOW_STATE_BYTES,
        }
    }
}

/// A function of the template with its mapping.
#[derive(Debug, Clone)]
pub struct TemplateFunction {
    /// Logical id (`FraudFunction`).
    pub logical_id: String,
    /// The binary (`Metadata.BuildProperties.Binary`, e.g. `fraud`).
    pub binary: String,
    pub mapping: MappingSettings,
    /// Environment variables (globals, then the function's), resolved.
    pub env: BTreeMap<String, EnvValue>,
    pub memory_mb: u32,
    pub timeout: Duration,
}

/// A resolved environment value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    Literal(String),
    /// A reference to a resource of the stack (its logical id).
    Resource(String),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("template: {0}")]
    Invalid(String),
}

struct Resolver<'a> {
    parameters: &'a serde_yaml::Mapping,
    conditions: &'a serde_yaml::Mapping,
}

/// The result of resolving a template expression.
#[derive(Debug, Clone, PartialEq)]
enum Resolved {
    Value(Value),
    Resource(String),
    NoValue,
}

impl Resolver<'_> {
    fn tag_of(value: &Value) -> Option<(String, &Value)> {
        match value {
            Value::Tagged(tagged) => Some((tagged.tag.to_string(), &tagged.value)),
            Value::Mapping(map) if map.len() == 1 => {
                let (k, v) = map.iter().next()?;
                let k = k.as_str()?;
                let short = k.strip_prefix("Fn::").or((k == "Ref").then_some("Ref"))?;
                Some((short.to_owned(), v))
            }
            _ => None,
        }
    }

    fn resolve(&self, value: &Value) -> Resolved {
        let Some((tag, inner)) = Self::tag_of(value) else {
            return Resolved::Value(value.clone());
        };
        match tag.trim_start_matches('!') {
            "Ref" => {
                let name = inner.as_str().unwrap_or_default();
                if name == "AWS::NoValue" {
                    return Resolved::NoValue;
                }
                if let Some(param) = self.parameters.get(name) {
                    return Resolved::Value(param.get("Default").cloned().unwrap_or(Value::Null));
                }
                Resolved::Resource(name.to_owned())
            }
            "GetAtt" => {
                let name = match inner {
                    Value::String(s) => s.split('.').next().unwrap_or_default().to_owned(),
                    Value::Sequence(parts) => parts
                        .first()
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    _ => String::new(),
                };
                Resolved::Resource(name)
            }
            "If" => {
                let Some(parts) = inner.as_sequence().filter(|p| p.len() == 3) else {
                    return Resolved::NoValue;
                };
                let condition = parts[0].as_str().unwrap_or_default();
                if self.condition(condition) {
                    self.resolve(&parts[1])
                } else {
                    self.resolve(&parts[2])
                }
            }
            "Sub" => Resolved::Value(inner.clone()),
            _ => Resolved::Value(Value::Bool(self.truth(value))),
        }
    }

    fn condition(&self, name: &str) -> bool {
        self.conditions
            .get(name)
            .is_some_and(|expression| self.truth(expression))
    }

    fn truth(&self, value: &Value) -> bool {
        let Some((tag, inner)) = Self::tag_of(value) else {
            return value.as_bool().unwrap_or(false);
        };
        let args = inner.as_sequence().cloned().unwrap_or_default();
        match tag.trim_start_matches('!') {
            "Equals" => {
                let scalar = |v: &Value| match self.resolve(v) {
                    Resolved::Value(v) => scalar_string(&v),
                    Resolved::Resource(r) => r,
                    Resolved::NoValue => String::new(),
                };
                args.len() == 2 && scalar(&args[0]) == scalar(&args[1])
            }
            "Not" => !args.first().is_some_and(|a| self.truth(a)),
            "And" => args.iter().all(|a| self.truth(a)),
            "Or" => args.iter().any(|a| self.truth(a)),
            "Condition" => inner.as_str().is_some_and(|c| self.condition(c)),
            _ => false,
        }
    }

    fn scalar(&self, value: Option<&Value>) -> Option<String> {
        match self.resolve(value?) {
            Resolved::Value(Value::Null) | Resolved::NoValue => None,
            Resolved::Value(v) => Some(scalar_string(&v)),
            Resolved::Resource(r) => Some(r),
        }
    }
}

fn scalar_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

fn number<T: std::str::FromStr>(
    text: Option<String>,
    what: &str,
) -> Result<Option<T>, TemplateError> {
    text.map(|t| {
        t.trim()
            .parse()
            .map_err(|_| TemplateError::Invalid(format!("{what}: {t:?} is not a number")))
    })
    .transpose()
}

/// A number within the range Lambda accepts for a Kinesis event source mapping: out of range is
/// an error here, as `CreateEventSourceMapping` refuses it, so a template that would fail to
/// deploy never runs locally. `-1` passes where Lambda documents it (`infinite`).
fn ranged(
    text: Option<String>,
    what: &str,
    range: std::ops::RangeInclusive<i64>,
    infinite: bool,
) -> Result<Option<i64>, TemplateError> {
    let Some(value) = number::<i64>(text, what)? else {
        return Ok(None);
    };
    if range.contains(&value) || (infinite && value == -1) {
        return Ok(Some(value));
    }
    Err(TemplateError::Invalid(format!(
        "{what}: {value} is out of range; Lambda accepts {}–{}{}",
        range.start(),
        range.end(),
        if infinite { ", or -1 for infinite" } else { "" }
    )))
}

/// Read every Kinesis-triggered function of a SAM template.
pub fn read_template(path: &Path) -> Result<Vec<TemplateFunction>, TemplateError> {
    let text = std::fs::read_to_string(path).map_err(|e| TemplateError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse_template(&text)
}

pub fn parse_template(text: &str) -> Result<Vec<TemplateFunction>, TemplateError> {
    let doc: Value =
        serde_yaml::from_str(text).map_err(|e| TemplateError::Invalid(e.to_string()))?;
    let empty = serde_yaml::Mapping::new();
    let parameters = doc
        .get("Parameters")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let conditions = doc
        .get("Conditions")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let resolver = Resolver {
        parameters,
        conditions,
    };
    let globals = doc.get("Globals").and_then(|g| g.get("Function"));
    let resources = doc
        .get("Resources")
        .and_then(Value::as_mapping)
        .ok_or_else(|| TemplateError::Invalid("no Resources".to_owned()))?;
    let mut functions = Vec::new();
    for (id, resource) in resources {
        let Some(id) = id.as_str() else { continue };
        if resource.get("Type").and_then(Value::as_str) != Some("AWS::Serverless::Function") {
            continue;
        }
        let properties = resource.get("Properties");
        let events = properties
            .and_then(|p| p.get("Events"))
            .and_then(Value::as_mapping);
        let Some(kinesis) = events.and_then(|events| {
            events
                .values()
                .find(|e| e.get("Type").and_then(Value::as_str) == Some("Kinesis"))
        }) else {
            continue;
        };
        let p = kinesis.get("Properties");
        let get = |key: &str| resolver.scalar(p.and_then(|p| p.get(key)));
        let mut mapping = MappingSettings::default();
        if let Some(v) = ranged(get("BatchSize"), "BatchSize", 1..=10_000, false)? {
            mapping.batch_size = usize::try_from(v).unwrap_or(mapping.batch_size);
        }
        if let Some(v) = ranged(
            get("MaximumBatchingWindowInSeconds"),
            "MaximumBatchingWindowInSeconds",
            0..=300,
            false,
        )? {
            mapping.batching_window = Duration::from_secs(v.unsigned_abs());
        }
        if let Some(v) = ranged(
            get("ParallelizationFactor"),
            "ParallelizationFactor",
            1..=10,
            false,
        )? {
            mapping.parallelization_factor =
                u32::try_from(v).unwrap_or(mapping.parallelization_factor);
        }
        if let Some(position) = get("StartingPosition") {
            let timestamp = number::<f64>(
                get("StartingPositionTimestamp"),
                "StartingPositionTimestamp",
            )?;
            mapping.starting_position =
                StartingPosition::parse(&position, timestamp).map_err(TemplateError::Invalid)?;
        }
        mapping.bisect_on_error = get("BisectBatchOnFunctionError").as_deref() == Some("true");
        if let Some(v) = ranged(
            get("MaximumRetryAttempts"),
            "MaximumRetryAttempts",
            0..=10_000,
            true,
        )? {
            mapping.max_retry_attempts = u32::try_from(v).ok();
        }
        if let Some(v) = ranged(
            get("MaximumRecordAgeInSeconds"),
            "MaximumRecordAgeInSeconds",
            60..=604_800,
            true,
        )? {
            mapping.max_record_age = u64::try_from(v).ok().map(Duration::from_secs);
        }
        mapping.report_batch_item_failures = p
            .and_then(|p| p.get("FunctionResponseTypes"))
            .and_then(Value::as_sequence)
            .is_some_and(|types| {
                types
                    .iter()
                    .any(|t| t.as_str() == Some("ReportBatchItemFailures"))
            });
        if let Some(v) = ranged(
            get("TumblingWindowInSeconds"),
            "TumblingWindowInSeconds",
            0..=900,
            false,
        )? {
            mapping.tumbling_window = (v > 0).then(|| Duration::from_secs(v.unsigned_abs()));
        }
        mapping.on_failure = p
            .and_then(|p| p.get("DestinationConfig"))
            .and_then(|d| d.get("OnFailure"))
            .and_then(|o| resolver.scalar(o.get("Destination")));
        if let Some(criteria) = p.and_then(|p| p.get("FilterCriteria"))
            && let Resolved::Value(criteria) = resolver.resolve(criteria)
        {
            let filters = criteria
                .get("Filters")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for filter in filters {
                if let Some(pattern) = resolver.scalar(filter.get("Pattern"))
                    && !pattern.trim().is_empty()
                {
                    mapping.filters.push(
                        Pattern::parse(&pattern)
                            .map_err(|e| TemplateError::Invalid(format!("{id}: {e}")))?,
                    );
                }
            }
        }

        let mut env = BTreeMap::new();
        for source in [globals, properties] {
            let variables = source
                .and_then(|s| s.get("Environment"))
                .and_then(|e| e.get("Variables"))
                .and_then(Value::as_mapping);
            for (key, value) in variables.into_iter().flatten() {
                let Some(key) = key.as_str() else { continue };
                match resolver.resolve(value) {
                    Resolved::Value(v) => {
                        env.insert(key.to_owned(), EnvValue::Literal(scalar_string(&v)));
                    }
                    Resolved::Resource(r) => {
                        env.insert(key.to_owned(), EnvValue::Resource(r));
                    }
                    Resolved::NoValue => {}
                }
            }
        }
        let prop = |key: &str| {
            resolver
                .scalar(properties.and_then(|p| p.get(key)))
                .or_else(|| resolver.scalar(globals.and_then(|g| g.get(key))))
        };
        let binary = resource
            .get("Metadata")
            .and_then(|m| m.get("BuildProperties"))
            .and_then(|b| b.get("Binary"))
            .and_then(Value::as_str)
            .map_or_else(|| id.to_lowercase(), str::to_owned);
        functions.push(TemplateFunction {
            logical_id: id.to_owned(),
            binary,
            mapping,
            env,
            memory_mb: number(prop("MemorySize"), "MemorySize")?.unwrap_or(128),
            timeout: Duration::from_secs(number(prop("Timeout"), "Timeout")?.unwrap_or(3)),
        });
    }
    Ok(functions)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_template_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../template.yaml");
        let functions = read_template(&path).unwrap();
        let names: Vec<&str> = functions.iter().map(|f| f.binary.as_str()).collect();
        assert!(names.contains(&"fraud"), "{names:?}");
        assert!(names.contains(&"aggregation"), "{names:?}");
        for f in &functions {
            assert!(f.mapping.bisect_on_error, "{}", f.logical_id);
            assert!(f.mapping.report_batch_item_failures, "{}", f.logical_id);
            assert!(f.mapping.max_retry_attempts.is_some(), "{}", f.logical_id);
            assert!(f.mapping.max_record_age.is_some(), "{}", f.logical_id);
            assert!(f.mapping.on_failure.is_some(), "{}", f.logical_id);
            assert!(f.timeout > Duration::ZERO);
        }
        let aggregation = functions
            .iter()
            .find(|f| f.binary == "aggregation")
            .unwrap();
        assert!(aggregation.mapping.tumbling_window.is_some());
        assert!(
            aggregation
                .env
                .values()
                .any(|v| matches!(v, EnvValue::Resource(_)))
        );
    }

    #[test]
    fn conditions_and_filters_resolve() {
        let template = r#"
Parameters:
  Size: {Type: Number, Default: 7}
  Pattern: {Type: String, Default: '{"data": {"a": [1]}}'}
Conditions:
  HasPattern: !Not [!Equals [!Ref Pattern, ""]]
Resources:
  F:
    Type: AWS::Serverless::Function
    Properties:
      Events:
        S:
          Type: Kinesis
          Properties:
            BatchSize: !Ref Size
            StartingPosition: LATEST
            MaximumRetryAttempts: -1
            FilterCriteria: !If [HasPattern, {Filters: [{Pattern: !Ref Pattern}]}, !Ref AWS::NoValue]
"#;
        let f = &parse_template(template).unwrap()[0];
        assert_eq!(f.mapping.batch_size, 7);
        assert_eq!(f.mapping.starting_position, StartingPosition::Latest);
        assert_eq!(f.mapping.max_retry_attempts, None);
        assert_eq!(f.mapping.filters.len(), 1);
        assert_eq!(f.binary, "f");
    }

    #[test]
    fn settings_lambda_refuses_are_refused_here_too() {
        let with = |property: &str| {
            format!(
                "Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      \
                 Events:\n        S:\n          Type: Kinesis\n          Properties:\n            \
                 StartingPosition: LATEST\n            {property}\n"
            )
        };
        for (property, field) in [
            ("BatchSize: 0", "BatchSize"),
            ("BatchSize: 10001", "BatchSize"),
            ("MaximumRetryAttempts: -5", "MaximumRetryAttempts"),
            ("MaximumRecordAgeInSeconds: 30", "MaximumRecordAgeInSeconds"),
            ("ParallelizationFactor: 11", "ParallelizationFactor"),
            ("TumblingWindowInSeconds: 901", "TumblingWindowInSeconds"),
            (
                "MaximumBatchingWindowInSeconds: 301",
                "MaximumBatchingWindowInSeconds",
            ),
        ] {
            let error = parse_template(&with(property)).map(|_| ()).unwrap_err();
            let text = error.to_string();
            assert!(
                text.contains(field) && text.contains("out of range"),
                "{property}: {text}"
            );
        }
        // -1 is Lambda's "infinite" for retries and record age.
        let f = &parse_template(&with("MaximumRecordAgeInSeconds: -1")).unwrap()[0];
        assert_eq!(f.mapping.max_record_age, None);
        let f = &parse_template(&with("MaximumRetryAttempts: 10000")).unwrap()[0];
        assert_eq!(f.mapping.max_retry_attempts, Some(10_000));
    }
}
