//! The conformance suite's harness: an embedded stream in a temp dir, the test function as the
//! real bootstrap process, a run until everything settled, and the function's invocation log.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use shardwise::producer::PutEntry;
use shardwise_local::esm::{OnFailure, WorkerOptions};
use shardwise_local::function::{FunctionSpec, Invoker, ProcessPool};
use shardwise_local::runner::{FunctionRun, RunConfig, RunReport, StopWhen, run};
use shardwise_local::settings::MappingSettings;
use shardwise_local::stats::MappingStats;
use shardwise_local::stream::{EmbeddedStream, Source};
use shardwise_local::view::ViewMode;
use shardwise_sqlite::{LocalDb, SqliteQueue, queues};

pub const TEST_FUNCTION: &str = env!("CARGO_BIN_EXE_shardwise-test-function");

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub stream: Arc<EmbeddedStream>,
    pub timeout: Duration,
    pub instances: usize,
    pub idle: Duration,
    /// Where on-failure records go instead of the local queue.
    pub on_failure: Option<OnFailure>,
}

/// One record to put: its id, partition key and extra JSON fields (`"fail": "error"`, …).
pub fn rec(id: &str, key: &str, extra: &str) -> (String, String) {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(",{extra}")
    };
    (key.to_owned(), format!("{{\"id\":\"{id}\"{extra}}}"))
}

/// The settings the conformance tests start from: Lambda's defaults with finite retries.
pub fn settings() -> MappingSettings {
    MappingSettings {
        batch_size: 10,
        max_retry_attempts: Some(2),
        on_failure: Some("on-failure".to_owned()),
        ..MappingSettings::default()
    }
}

pub struct Outcome {
    pub report: RunReport,
    pub log: Vec<Value>,
    pub on_failure: Vec<Value>,
}

impl Outcome {
    pub fn stats(&self) -> &MappingStats {
        &self.report.functions[0].1
    }

    /// The ids of each invocation, in log order.
    pub fn invocations(&self) -> Vec<Vec<String>> {
        self.log
            .iter()
            .map(|line| {
                line["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .collect()
    }

    pub fn get(&self, counter: fn(&MappingStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        MappingStats::get(counter(self.stats()))
    }
}

impl Harness {
    pub fn new(shards: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stream = Arc::new(
            EmbeddedStream::open(dir.path().join("stream.db"), "conformance", shards).unwrap(),
        );
        Self {
            dir,
            stream,
            timeout: Duration::from_secs(10),
            instances: shards as usize,
            idle: Duration::from_millis(400),
            on_failure: None,
        }
    }

    pub fn put(&self, records: &[(String, String)]) {
        let entries: Vec<PutEntry<'_>> = records
            .iter()
            .map(|(key, data)| PutEntry {
                partition_key: key,
                explicit_hash_key: None,
                data: data.as_bytes(),
            })
            .collect();
        self.stream
            .append(&entries, shardwise_local::now_ms())
            .unwrap();
    }

    pub fn put_raw(&self, key: &str, data: &[u8]) {
        self.stream
            .append(
                &[PutEntry {
                    partition_key: key,
                    explicit_hash_key: None,
                    data,
                }],
                shardwise_local::now_ms(),
            )
            .unwrap();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("invocations.jsonl")
    }

    pub fn local_db(&self) -> Arc<LocalDb> {
        Arc::new(LocalDb::open(self.dir.path().join("local.db")).unwrap())
    }

    pub async fn run(&self, settings: MappingSettings) -> Outcome {
        self.run_source(settings, Source::Embedded(self.stream.clone()), vec![])
            .await
    }

    pub async fn run_source(
        &self,
        settings: MappingSettings,
        source: Source,
        env: Vec<(String, String)>,
    ) -> Outcome {
        let mut env = env;
        env.push((
            "TEST_FN_LOG".to_owned(),
            self.log_path().display().to_string(),
        ));
        let pool = ProcessPool::start(
            FunctionSpec {
                name: "conformance".to_owned(),
                binary: PathBuf::from(TEST_FUNCTION),
                env,
                memory_mb: 128,
                timeout: self.timeout,
                log_file: Some(self.dir.path().join("function.log")),
                sandbox_dir: None,
            },
            self.instances,
        )
        .await
        .unwrap();
        let db = self.local_db();
        let config = RunConfig {
            functions: vec![FunctionRun {
                name: "conformance".to_owned(),
                on_failure: if let Some(destination) = &self.on_failure {
                    destination.clone()
                } else if settings.on_failure.is_some() {
                    OnFailure::Local(SqliteQueue::new(db.clone(), queues::ON_FAILURE))
                } else {
                    OnFailure::None
                },
                settings,
                invoker: Invoker::Processes(pool),
            }],
            source,
            checkpoints: self.dir.path().join("runner.db"),
            options: WorkerOptions {
                poll_interval: Duration::from_millis(20),
                retry_backoff: Duration::from_millis(5),
                max_retry_backoff: Duration::from_millis(50),
                ..WorkerOptions::default()
            },
            stop: StopWhen {
                duration: Some(Duration::from_secs(60)),
                idle: Some(self.idle),
                idle_armed: None,
            },
            view: ViewMode::None,
            header: None,
            dashboard: None,
        };
        let report = run(config, None).await.unwrap();
        let log = std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let on_failure = SqliteQueue::new(db, queues::ON_FAILURE)
            .messages(0, 1000)
            .unwrap()
            .into_iter()
            .map(|m| serde_json::from_str(&m.body).unwrap())
            .collect();
        Outcome {
            report,
            log,
            on_failure,
        }
    }
}
