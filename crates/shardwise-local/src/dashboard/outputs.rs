//! What the functions produced, read back for the dashboard: their own outcome counts (EMF
//! lines in their log files) and what they wrote to the local backends — dead letters, alerts,
//! closed windows' aggregates, the mapping's on-failure records.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};
use shardwise_sqlite::{LocalDb, SqliteQueue, SqliteTable, item_to_json, queues};

/// The table the aggregation function writes a closed window's aggregates to.
pub const AGGREGATES_TABLE: &str = "aggregates";
/// Rows kept of each list (dead letters, alerts, windows): the newest.
pub const RECENT: usize = 20;
/// Decoded payloads are cut here (the whole record stays in the queue).
const PAYLOAD_CHARS: usize = 2_000;
/// Rows read per poll of each source: a large backlog is caught up over a few seconds.
const READ_LIMIT: usize = 2_000;
/// Log bytes read per poll.
const LOG_READ_LIMIT: u64 = 16 * 1024 * 1024;

/// Record deliveries by what the function did with them, summed from its EMF lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Outcomes {
    pub processed: u64,
    pub already_done: u64,
    pub dead_lettered: u64,
    /// Reported back to Lambda as failed (the mapping retries them).
    pub handed_back: u64,
    /// EMF lines read (one per invocation that reported metrics).
    pub metric_lines: u64,
}

impl Outcomes {
    /// Add one EMF line's counts; lines without the `_aws` directive are not metrics.
    fn add_line(&mut self, line: &[u8]) {
        if !line.starts_with(b"{") || !contains(line, b"\"_aws\"") {
            return;
        }
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        if value.get("_aws").is_none() {
            return;
        }
        let count = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map_or(0, |v| {
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let n = v.round() as u64;
                    n
                })
        };
        self.processed += count("RecordsProcessed");
        self.already_done += count("RecordsAlreadyDone");
        self.dead_lettered += count("RecordsDeadLettered");
        self.handed_back += count("RecordsFailed");
        self.metric_lines += 1;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Follows one function's log file from where it was when the run started (a state directory
/// keeps the logs of earlier runs).
#[derive(Debug)]
pub struct LogTail {
    path: PathBuf,
    offset: Option<u64>,
    partial: Vec<u8>,
    outcomes: Outcomes,
}

impl LogTail {
    pub fn from_end(path: PathBuf) -> Self {
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Self {
            path,
            offset: Some(offset),
            partial: Vec::new(),
            outcomes: Outcomes::default(),
        }
    }

    /// Read what was appended since the last poll; the totals so far.
    pub fn poll(&mut self) -> Outcomes {
        if let Err(error) = self.read_new() {
            tracing::debug!(path = %self.path.display(), %error, "function log not readable yet");
        }
        self.outcomes
    }

    fn read_new(&mut self) -> std::io::Result<()> {
        let mut file = std::fs::File::open(&self.path)?;
        let length = file.metadata()?.len();
        let offset = self.offset.unwrap_or(0);
        if length < offset {
            // Truncated or replaced: start over on the new file.
            self.partial.clear();
            self.offset = Some(0);
            return self.read_new();
        }
        file.seek(SeekFrom::Start(offset))?;
        let mut new = Vec::new();
        file.take(LOG_READ_LIMIT).read_to_end(&mut new)?;
        self.offset = Some(offset + new.len() as u64);
        self.partial.extend_from_slice(&new);
        let complete = self.partial.iter().rposition(|&b| b == b'\n');
        if let Some(end) = complete {
            for line in self.partial[..end].split(|&b| b == b'\n') {
                self.outcomes.add_line(line);
            }
            self.partial.drain(..=end);
        }
        Ok(())
    }
}

/// A dead letter as the page shows it: where the record came from, the error, the payload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterRow {
    pub sent_at_ms: i64,
    pub function: Option<String>,
    pub shard: Option<String>,
    pub sequence_number: Option<String>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    /// The record's data as text (invalid UTF-8 replaced), cut at 2,000 characters; the raw
    /// field when it was not base64.
    pub payload: Option<String>,
    pub payload_truncated: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeadLetters {
    pub depth: u64,
    pub oldest_age_ms: Option<i64>,
    /// Newest first.
    pub recent: Vec<DeadLetterRow>,
}

/// A list that grows as its source is polled; the newest [`RECENT`] rows, newest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Recent<T> {
    pub count: u64,
    pub recent: Vec<T>,
}

/// Everything read back from the local backends.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OutputsView {
    pub dead_letters: DeadLetters,
    /// Alert bodies as the fraud function wrote them (score, reasons, card, transaction).
    pub alerts: Recent<Value>,
    /// Closed windows' aggregates, their attributes as plain JSON values.
    pub windows: Recent<Value>,
    pub on_failure_records: u64,
    /// A backend that could not be read this second, and why.
    pub error: Option<String>,
}

/// Polls the local backends' queues and tables for what is new.
#[derive(Debug)]
pub struct LocalOutputs {
    dead_letters: SqliteQueue,
    alerts: SqliteQueue,
    on_failure: SqliteQueue,
    windows: SqliteTable,
    after: [i64; 3],
    dead_recent: VecDeque<DeadLetterRow>,
    alerts_recent: VecDeque<Value>,
    windows_recent: VecDeque<Value>,
}

fn push_recent<T>(list: &mut VecDeque<T>, item: T) {
    if list.len() == RECENT {
        list.pop_back();
    }
    list.push_front(item);
}

impl LocalOutputs {
    pub fn new(db: Arc<LocalDb>) -> Self {
        Self {
            dead_letters: SqliteQueue::new(db.clone(), queues::DEAD_LETTERS),
            alerts: SqliteQueue::new(db.clone(), queues::ALERTS),
            on_failure: SqliteQueue::new(db.clone(), queues::ON_FAILURE),
            windows: SqliteTable::new(db, AGGREGATES_TABLE),
            after: [0; 3],
            dead_recent: VecDeque::new(),
            alerts_recent: VecDeque::new(),
            windows_recent: VecDeque::new(),
        }
    }

    /// What is there now; new rows since the last poll join the recent lists.
    pub fn poll(&mut self, now_ms: i64) -> OutputsView {
        let mut view = OutputsView::default();
        if let Err(error) = self.read(now_ms, &mut view) {
            view.error = Some(error.to_string());
        }
        view.dead_letters.recent = self.dead_recent.iter().cloned().collect();
        view.alerts.recent = self.alerts_recent.iter().cloned().collect();
        view.windows.recent = self.windows_recent.iter().cloned().collect();
        view
    }

    fn read(
        &mut self,
        now_ms: i64,
        view: &mut OutputsView,
    ) -> Result<(), shardwise_sqlite::LocalError> {
        for message in self.dead_letters.messages(self.after[0], READ_LIMIT)? {
            self.after[0] = message.id;
            push_recent(
                &mut self.dead_recent,
                dead_letter_row(&message.body, message.sent_at_ms),
            );
        }
        for message in self.alerts.messages(self.after[1], READ_LIMIT)? {
            self.after[1] = message.id;
            let alert = serde_json::from_str(&message.body).unwrap_or(Value::String(message.body));
            push_recent(&mut self.alerts_recent, alert);
        }
        for (position, _, item) in self.windows.written_after(self.after[2], READ_LIMIT)? {
            self.after[2] = position;
            push_recent(&mut self.windows_recent, plain_item(&item_to_json(&item)));
        }
        view.dead_letters.depth = self.dead_letters.count()?;
        view.dead_letters.oldest_age_ms = self
            .dead_letters
            .messages(0, 1)?
            .first()
            .map(|m| (now_ms - m.sent_at_ms).max(0));
        view.alerts.count = self.alerts.count()?;
        view.windows.count = self.windows.count()?;
        view.on_failure_records = self.on_failure.count()?;
        Ok(())
    }
}

/// Read a dead-letter body (the shape `shardwise::dead_letter::DeadLetter` writes); what
/// cannot be read shows as it is.
pub fn dead_letter_row(body: &str, sent_at_ms: i64) -> DeadLetterRow {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let (payload, cut) = match value.get("data").and_then(Value::as_str) {
        Some(data) => match base64_simd::STANDARD.decode_to_vec(data) {
            Ok(bytes) => cut_text(&String::from_utf8_lossy(&bytes)),
            Err(_) => cut_text(&format!("(not base64) {data}")),
        },
        None if value.is_null() => cut_text(body),
        None => (None, false),
    };
    DeadLetterRow {
        sent_at_ms,
        function: text(value.get("functionName")),
        shard: text(value.get("shardId")),
        sequence_number: text(value.get("sequenceNumber")),
        error_type: text(value.pointer("/error/type")),
        error_message: text(value.pointer("/error/message")),
        payload_truncated: cut
            || value
                .get("dataTruncated")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        payload,
    }
}

fn cut_text(text: &str) -> (Option<String>, bool) {
    match text.char_indices().nth(PAYLOAD_CHARS) {
        Some((at, _)) => (Some(text[..at].to_owned()), true),
        None => (Some(text.to_owned()), false),
    }
}

/// DynamoDB JSON (`{"count": {"N": "3"}}`) to plain values, scalars only (sets, lists, maps
/// and binaries are internal state, such as a window's card sketch).
fn plain_item(item: &Value) -> Value {
    let mut out = Map::new();
    if let Some(attributes) = item.as_object() {
        for (name, attribute) in attributes {
            let value = match (
                attribute.get("S"),
                attribute.get("N"),
                attribute.get("BOOL"),
            ) {
                (Some(s), _, _) => s.clone(),
                (_, Some(Value::String(n)), _) => n
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map_or_else(|| Value::String(n.clone()), Value::Number),
                (_, _, Some(b)) => b.clone(),
                _ => continue,
            };
            out.insert(name.clone(), value);
        }
    }
    Value::Object(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use serde_json::json;

    #[test]
    fn outcomes_come_from_emf_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fraud.log");
        std::fs::write(&path, "{\"_aws\":{},\"RecordsProcessed\":99.0}\n").unwrap();
        // Lines already there belong to an earlier run.
        let mut tail = LogTail::from_end(path.clone());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        write!(
            file,
            "{{\"_aws\":{{\"Timestamp\":1}},\"RecordsProcessed\":8.0,\"RecordsAlreadyDone\":1.0,\
             \"RecordsDeadLettered\":1.0,\"RecordsFailed\":2.0}}\n\
             {{\"level\":\"WARN\",\"RecordsProcessed\":1000}}\nnot json\n{{\"_aws\":{{}},\"Records"
        )
        .unwrap();
        let outcomes = tail.poll();
        assert_eq!(
            outcomes,
            Outcomes {
                processed: 8,
                already_done: 1,
                dead_lettered: 1,
                handed_back: 2,
                metric_lines: 1
            }
        );
        // The half-written line is read once it is complete.
        writeln!(file, "Processed\":5.0}}").unwrap();
        assert_eq!(tail.poll().processed, 13);
        assert_eq!(tail.poll().metric_lines, 2);
    }

    #[test]
    fn a_missing_log_file_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut tail = LogTail::from_end(dir.path().join("later.log"));
        assert_eq!(tail.poll(), Outcomes::default());
        std::fs::write(
            dir.path().join("later.log"),
            "{\"_aws\":{},\"RecordsFailed\":3}\n",
        )
        .unwrap();
        assert_eq!(tail.poll().handed_back, 3);
    }

    #[test]
    fn dead_letters_show_their_error_and_decoded_payload() {
        let body = json!({
            "functionName": "fraud", "shardId": "shardId-000000000002", "sequenceNumber": "17",
            "error": {"type": "Decode", "message": "expected value at line 1 column 1"},
            "data": base64_simd::STANDARD.encode_to_string(b"{not json"),
            "dataTruncated": false,
        })
        .to_string();
        let row = dead_letter_row(&body, 5);
        assert_eq!(row.shard.as_deref(), Some("shardId-000000000002"));
        assert_eq!(row.error_type.as_deref(), Some("Decode"));
        assert_eq!(row.payload.as_deref(), Some("{not json"));
        assert!(!row.payload_truncated);
        let raw = dead_letter_row(&json!({"data": "%%%"}).to_string(), 5);
        assert_eq!(raw.payload.as_deref(), Some("(not base64) %%%"));
        let long = "x".repeat(PAYLOAD_CHARS + 1);
        let data = base64_simd::STANDARD.encode_to_string(long.as_bytes());
        let cut = dead_letter_row(&json!({"data": data}).to_string(), 5);
        assert!(cut.payload_truncated);
        assert_eq!(cut.payload.unwrap().len(), PAYLOAD_CHARS);
        assert_eq!(
            dead_letter_row("not json", 5).payload.as_deref(),
            Some("not json")
        );
    }

    #[test]
    fn new_rows_join_the_recent_lists_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(LocalDb::open(dir.path().join("local.db")).unwrap());
        let mut outputs = LocalOutputs::new(db.clone());
        let dead = SqliteQueue::new(db.clone(), queues::DEAD_LETTERS);
        dead.send_all(&[json!({"error": {"type": "A", "message": "m"}}).to_string()])
            .unwrap();
        SqliteQueue::new(db.clone(), queues::ALERTS)
            .send_all(&[r#"{"score":90,"reasons":["velocity"]}"#])
            .unwrap();
        let item = shardwise_sqlite::item_from_json(&json!({
            "shard_id": {"S": "s-0"}, "count": {"N": "3"}, "cards": {"B": "AAE="}
        }))
        .unwrap();
        SqliteTable::new(db.clone(), AGGREGATES_TABLE)
            .put("s-0#w", &item, &shardwise_sqlite::Condition::None)
            .unwrap();
        let view = outputs.poll(i64::MAX / 2);
        assert_eq!(view.error, None);
        assert_eq!(view.dead_letters.depth, 1);
        assert!(view.dead_letters.oldest_age_ms.unwrap() > 0);
        assert_eq!(
            view.alerts.recent,
            [json!({"score": 90, "reasons": ["velocity"]})]
        );
        assert_eq!(
            view.windows.recent,
            [json!({"shard_id": "s-0", "count": 3.0})]
        );
        dead.send_all(&[json!({"error": {"type": "B", "message": "m"}}).to_string()])
            .unwrap();
        let view = outputs.poll(i64::MAX / 2);
        let types: Vec<_> = view
            .dead_letters
            .recent
            .iter()
            .map(|r| r.error_type.clone().unwrap())
            .collect();
        assert_eq!(types, ["B", "A"]);
        assert_eq!(view.alerts.recent.len(), 1);
    }
}
