//! Command-line arguments and how they become a run: which functions, from which template, with
//! which overrides, against which stream. `main.rs` only parses and dispatches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::dashboard::{Dashboard, DashboardAddress};
use crate::esm::{OnFailure, WorkerOptions};
use crate::filter::Pattern;
use crate::function::{FunctionSpec, Invoker, ProcessPool, WatchForwarder};
use crate::runner::{FunctionRun, RunConfig, StopWhen};
use crate::settings::{EnvValue, MappingSettings, TemplateFunction, read_template};
use crate::stream::{EmbeddedStream, KinesisSource, Source, StartingPosition};
use crate::view::ViewMode;

#[derive(Debug, Parser)]
#[command(
    name = "shardwise",
    version,
    about = "Lambda's Kinesis event source mapping on one machine, producer tools, capacity plan"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a stream and invoke functions as Lambda's event source mapping does.
    Run(Box<RunArgs>),
    /// Put records from JSONL (a file or stdin) through the shared producer.
    Put(crate::tools::PutArgs),
    /// Replay recorded traffic (JSONL with timestamps), keeping relative timing.
    Replay(crate::tools::ReplayArgs),
    /// Generate card transactions with fraud patterns and poison records.
    Loadgen(crate::tools::LoadgenArgs),
    /// Shards, Lambda concurrency and monthly cost for a workload.
    Plan(crate::plan::PlanArgs),
    /// The demo: fraud and aggregation under generated load, live view, summary.
    Demo(crate::demo::DemoArgs),
    /// Throughput and latency of the embedded pipeline (records/s, put-to-processed p50/p99).
    Bench(crate::bench::BenchArgs),
    /// Show what the local backends hold: dead letters, on-failure records, alerts.
    Inspect(crate::demo::InspectArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// The embedded stream in the state directory (no AWS needed).
    Embedded,
    /// Kinesis through the AWS SDK (AWS, or `AWS_ENDPOINT_URL`, e.g. moto).
    Kinesis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Functions use the SQLite backends in the state directory (`SHARDWISE_BACKEND=local`).
    Local,
    /// Functions use DynamoDB/SQS (their environment must name them).
    Aws,
}

/// `PutRecords` calls the producer tools keep in flight by default (the producer's own default).
pub const PUT_CALLS_IN_FLIGHT: usize = 4;

/// Where the stream is.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    #[arg(long, value_enum, default_value_t = SourceKind::Embedded)]
    pub source: SourceKind,
    /// Stream name (or ARN, for Kinesis).
    #[arg(long, default_value = "shardwise-transactions")]
    pub stream: String,
    /// Where the embedded stream, checkpoints, local backends and logs live.
    #[arg(long, default_value = ".shardwise")]
    pub state_dir: PathBuf,
    /// Shards of the embedded stream when it is created.
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// `PutRecords` calls in flight when putting (`put`, `replay`, `loadgen`). Use 1 against
    /// moto, whose Kinesis numbers records without a lock and can lose some to concurrent calls.
    #[arg(long, default_value_t = PUT_CALLS_IN_FLIGHT)]
    pub put_calls_in_flight: usize,
}

impl StreamArgs {
    pub fn stream_db(&self) -> PathBuf {
        self.state_dir.join("stream.db")
    }

    pub fn local_db(&self) -> PathBuf {
        self.state_dir.join("local.db")
    }

    pub async fn source(&self) -> anyhow::Result<Source> {
        Ok(match self.source {
            SourceKind::Embedded => Source::Embedded(Arc::new(EmbeddedStream::open(
                self.stream_db(),
                &self.stream,
                self.shards,
            )?)),
            SourceKind::Kinesis => {
                let sdk = shardwise_aws::sdk_config(None).await;
                Source::Kinesis(Arc::new(
                    KinesisSource::connect(aws_sdk_kinesis::Client::new(&sdk), &self.stream)
                        .await?,
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub stream: StreamArgs,
    /// SAM template to read mappings and environments from (skipped if absent).
    #[arg(long, default_value = "template.yaml")]
    pub template: PathBuf,
    /// Functions to run: a binary name from the template (`fraud`), or NAME=PATH for any
    /// bootstrap binary. Default: every Kinesis-triggered function of the template.
    #[arg(long = "function", short = 'f')]
    pub functions: Vec<String>,
    /// Where to find binaries named by the template.
    #[arg(long, default_value = "target/debug")]
    pub bin_dir: PathBuf,
    /// Forward invocations to a running `cargo lambda watch` at this address instead of
    /// starting processes (e.g. 127.0.0.1:9000).
    #[arg(long)]
    pub watch: Option<String>,
    #[arg(long, value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,
    /// Extra environment for the functions, KEY=VALUE.
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Instances (processes) per function; default shards × parallelization factor, at most 16.
    #[arg(long)]
    pub instances: Option<usize>,
    #[command(flatten)]
    pub overrides: MappingOverrides,
    /// Stop after this long (e.g. 60s).
    #[arg(long, value_parser = crate::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop once everything read has settled and nothing happened for this long.
    #[arg(long, value_parser = crate::parse_duration)]
    pub until_idle: Option<Duration>,
    /// Plain progress lines every this often instead of the live view.
    #[arg(long, value_parser = crate::parse_duration)]
    pub plain: Option<Duration>,
    /// No progress output (the summary is still printed).
    #[arg(long)]
    pub quiet: bool,
    /// Send on-failure records to this SQS queue (with `--source kinesis`); default: the local
    /// queue `on-failure` in the state directory.
    #[arg(long)]
    pub on_failure_queue_url: Option<String>,
    /// Pause after an empty read.
    #[arg(long, value_parser = crate::parse_duration, default_value = "100ms")]
    pub poll_interval: Duration,
    /// First pause before a retry (doubles up to 5 s).
    #[arg(long, value_parser = crate::parse_duration, default_value = "100ms")]
    pub retry_backoff: Duration,
    /// Serve the live dashboard on this loopback address (e.g. 127.0.0.1:8717; port 0: any
    /// free port; `off`: none, the default). The URL is printed when the run starts.
    #[arg(long, value_parser = DashboardAddress::parse)]
    pub dashboard: Option<DashboardAddress>,
}

/// Flags that override the template's mapping settings (for every function run).
#[derive(Debug, Clone, Default, Args)]
pub struct MappingOverrides {
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, value_parser = crate::parse_duration)]
    pub batching_window: Option<Duration>,
    /// Cap on one invocation's payload, bytes (Lambda: 6 MB).
    #[arg(long)]
    pub max_payload_bytes: Option<usize>,
    /// TRIM_HORIZON, LATEST or AT_TIMESTAMP (with --starting-position-timestamp, seconds).
    #[arg(long)]
    pub starting_position: Option<String>,
    #[arg(long)]
    pub starting_position_timestamp: Option<f64>,
    #[arg(long)]
    pub parallelization_factor: Option<u32>,
    #[arg(long)]
    pub bisect: Option<bool>,
    /// -1: until the record expires.
    #[arg(long, allow_hyphen_values = true)]
    pub max_retry_attempts: Option<i64>,
    /// Seconds; -1: no limit.
    #[arg(long, allow_hyphen_values = true)]
    pub max_record_age: Option<i64>,
    #[arg(long)]
    pub report_batch_item_failures: Option<bool>,
    /// 0: no windows. Changes the window of template functions that have one (and sets it for
    /// functions given as NAME=PATH); a template function without windows keeps none.
    #[arg(long, value_parser = crate::parse_duration)]
    pub tumbling_window: Option<Duration>,
    /// A filter pattern (EventBridge syntax); repeat for several (OR).
    #[arg(long = "filter")]
    pub filters: Vec<String>,
    /// Function timeout.
    #[arg(long, value_parser = crate::parse_duration)]
    pub timeout: Option<Duration>,
    /// Window state cap, bytes (Lambda: 1 MB).
    #[arg(long)]
    pub max_window_state_bytes: Option<usize>,
}

impl MappingOverrides {
    pub fn apply(&self, settings: &mut MappingSettings) -> anyhow::Result<()> {
        if let Some(v) = self.batch_size {
            anyhow::ensure!((1..=10_000).contains(&v), "--batch-size must be 1..=10000");
            settings.batch_size = v;
        }
        if let Some(v) = self.batching_window {
            settings.batching_window = v;
        }
        if let Some(v) = self.max_payload_bytes {
            settings.max_payload_bytes = v;
        }
        if let Some(v) = &self.starting_position {
            settings.starting_position =
                StartingPosition::parse(v, self.starting_position_timestamp)
                    .map_err(anyhow::Error::msg)?;
        }
        if let Some(v) = self.parallelization_factor {
            anyhow::ensure!(
                (1..=10).contains(&v),
                "--parallelization-factor must be 1..=10"
            );
            settings.parallelization_factor = v;
        }
        if let Some(v) = self.bisect {
            settings.bisect_on_error = v;
        }
        if let Some(v) = self.max_retry_attempts {
            settings.max_retry_attempts = u32::try_from(v).ok();
        }
        if let Some(v) = self.max_record_age {
            settings.max_record_age = u64::try_from(v).ok().map(Duration::from_secs);
        }
        if let Some(v) = self.report_batch_item_failures {
            settings.report_batch_item_failures = v;
        }
        if let Some(v) = self.tumbling_window {
            settings.tumbling_window = (!v.is_zero()).then_some(v);
        }
        if !self.filters.is_empty() {
            settings.filters = self
                .filters
                .iter()
                .map(|f| Pattern::parse(f))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = self.max_window_state_bytes {
            settings.max_window_state_bytes = v;
        }
        Ok(())
    }
}

/// One function resolved from the arguments and the template.
#[derive(Debug, Clone)]
pub struct ResolvedFunction {
    pub name: String,
    pub binary: PathBuf,
    pub settings: MappingSettings,
    pub env: Vec<(String, String)>,
    pub memory_mb: u32,
    pub timeout: Duration,
}

/// The local value of a template resource reference: queues and tables by their logical id.
fn local_resource(logical_id: &str) -> String {
    format!("local:{logical_id}")
}

pub fn resolve_functions(args: &RunArgs) -> anyhow::Result<Vec<ResolvedFunction>> {
    let template: Vec<TemplateFunction> = if args.template.exists() {
        read_template(&args.template)?
    } else {
        Vec::new()
    };
    let requested: Vec<String> = if args.functions.is_empty() {
        template.iter().map(|f| f.binary.clone()).collect()
    } else {
        args.functions.clone()
    };
    anyhow::ensure!(
        !requested.is_empty(),
        "no functions: pass --function NAME[=PATH] or a template with Kinesis-triggered functions"
    );
    let state_dir = absolute(&args.stream.state_dir);
    let mut out = Vec::new();
    for request in requested {
        let (name, path) = match request.split_once('=') {
            Some((name, path)) => (name.to_owned(), Some(PathBuf::from(path))),
            None => (request.clone(), None),
        };
        let from_template = template
            .iter()
            .find(|f| f.binary == name || f.logical_id == name);
        let mut settings =
            from_template.map_or_else(MappingSettings::default, |f| f.mapping.clone());
        args.overrides.apply(&mut settings)?;
        if from_template.is_some_and(|f| f.mapping.tumbling_window.is_none()) {
            settings.tumbling_window = None;
        }
        let binary = path.unwrap_or_else(|| args.bin_dir.join(&name));
        let mut env: Vec<(String, String)> = Vec::new();
        if let Some(f) = from_template {
            for (key, value) in &f.env {
                let value = match value {
                    EnvValue::Literal(v) => v.clone(),
                    EnvValue::Resource(r) => local_resource(r),
                };
                env.push((key.clone(), value));
            }
        }
        if args.backend == BackendKind::Local {
            env.push(("SHARDWISE_BACKEND".into(), "local".into()));
            env.push((
                "SHARDWISE_LOCAL_DB".into(),
                state_dir.join("local.db").display().to_string(),
            ));
        }
        for pair in &args.env {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--env {pair:?}: expected KEY=VALUE"))?;
            env.retain(|(key, _)| key != k);
            env.push((k.to_owned(), v.to_owned()));
        }
        let timeout = args
            .overrides
            .timeout
            .or(from_template.map(|f| f.timeout))
            .unwrap_or(Duration::from_secs(60));
        out.push(ResolvedFunction {
            name,
            binary: absolute(&binary),
            settings,
            env,
            memory_mb: from_template.map_or(512, |f| f.memory_mb),
            timeout,
        });
    }
    Ok(out)
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| path.to_path_buf(), |d| d.join(path))
    }
}

/// Everything `shardwise run` needs, started: function processes, source, destinations.
pub async fn prepare_run(args: &RunArgs, view: ViewMode) -> anyhow::Result<RunConfig> {
    let functions = resolve_functions(args)?;
    let source = args.stream.source().await?;
    let shards = source.shards().await?.len().max(1);
    let local_db = Arc::new(shardwise_sqlite::LocalDb::open(args.stream.local_db())?);
    let on_failure_sqs = match &args.on_failure_queue_url {
        Some(url) => {
            let sdk = shardwise_aws::sdk_config(None).await;
            Some((aws_sdk_sqs::Client::new(&sdk), url.clone()))
        }
        None => None,
    };
    // Before any process of ours starts: a runner killed on this state directory may have left
    // its function processes running, one perhaps mid-invocation.
    let sandboxes = absolute(&args.stream.state_dir).join("sandboxes");
    let names: Vec<&str> = functions.iter().map(|f| f.name.as_str()).collect();
    crate::sandbox::stop_stale(&sandboxes, &names);
    let mut runs = Vec::new();
    for function in functions {
        let factor = function.settings.parallelization_factor.max(1) as usize;
        let instances = args.instances.unwrap_or((shards * factor).min(16)).max(1);
        let invoker = match &args.watch {
            Some(address) => Invoker::Watch(WatchForwarder::new(
                &function.name,
                address,
                function.timeout,
            )),
            None => Invoker::Processes(
                ProcessPool::start(
                    FunctionSpec {
                        name: function.name.clone(),
                        binary: function.binary.clone(),
                        env: function.env.clone(),
                        memory_mb: function.memory_mb,
                        timeout: function.timeout,
                        log_file: Some(
                            absolute(&args.stream.state_dir)
                                .join("logs")
                                .join(format!("{}.log", function.name)),
                        ),
                        sandbox_dir: Some(sandboxes.clone()),
                    },
                    instances,
                )
                .await?,
            ),
        };
        let on_failure = match (&function.settings.on_failure, &on_failure_sqs) {
            (_, Some((client, url))) => OnFailure::Sqs {
                client: client.clone(),
                queue_url: url.clone(),
            },
            (Some(_), None) => OnFailure::Local(shardwise_sqlite::SqliteQueue::new(
                local_db.clone(),
                shardwise_sqlite::queues::ON_FAILURE,
            )),
            (None, None) => OnFailure::None,
        };
        runs.push(FunctionRun {
            name: function.name,
            settings: function.settings,
            invoker,
            on_failure,
        });
    }
    let dashboard = match args.dashboard {
        Some(address) => {
            let outputs = (args.backend == BackendKind::Local)
                .then(|| crate::dashboard::outputs::LocalOutputs::new(local_db.clone()));
            serve_dashboard(address, outputs).await?
        }
        None => None,
    };
    Ok(RunConfig {
        functions: runs,
        source,
        checkpoints: args.stream.state_dir.join("runner.db"),
        options: WorkerOptions {
            poll_interval: args.poll_interval,
            retry_backoff: args.retry_backoff,
            ..WorkerOptions::default()
        },
        stop: StopWhen {
            duration: args.duration,
            idle: args.until_idle,
            idle_armed: None,
        },
        view,
        header: Some(backend_header(local_db.clone())),
        dashboard,
    })
}

/// Start the dashboard's server and say where it is.
pub async fn serve_dashboard(
    address: DashboardAddress,
    outputs: Option<crate::dashboard::outputs::LocalOutputs>,
) -> anyhow::Result<Option<Arc<Dashboard>>> {
    if address == DashboardAddress::Off {
        return Ok(None);
    }
    let dashboard = Dashboard::new(outputs, crate::now_ms());
    let bound = match address {
        DashboardAddress::Off => return Ok(None),
        DashboardAddress::On(address) => {
            crate::dashboard::server::start(address, dashboard.clone()).await?
        }
        DashboardAddress::Preferred(address) => {
            match crate::dashboard::server::start(address, dashboard.clone()).await {
                Ok(bound) => bound,
                Err(error) => {
                    let any = std::net::SocketAddr::new(address.ip(), 0);
                    eprintln!("{error}; using another port");
                    crate::dashboard::server::start(any, dashboard.clone()).await?
                }
            }
        }
    };
    eprintln!("dashboard: http://{bound}/  (open it to watch the run; JSON at /api/snapshot)");
    Ok(Some(dashboard))
}

/// The live view's first line: elapsed time and what the local backends hold.
pub fn backend_header(db: Arc<shardwise_sqlite::LocalDb>) -> crate::view::Header {
    use shardwise_sqlite::{SqliteQueue, queues};
    let started = std::time::Instant::now();
    let dead = SqliteQueue::new(db.clone(), queues::DEAD_LETTERS);
    let on_failure = SqliteQueue::new(db.clone(), queues::ON_FAILURE);
    let alerts = SqliteQueue::new(db, queues::ALERTS);
    Arc::new(move || {
        format!(
            "{:>5.0} s  dead letters {}  on-failure records {}  alerts {}",
            started.elapsed().as_secs_f64(),
            dead.count().unwrap_or(0),
            on_failure.count().unwrap_or(0),
            alerts.count().unwrap_or(0),
        )
    })
}

impl RunArgs {
    pub fn view_mode(&self) -> ViewMode {
        if self.quiet {
            ViewMode::None
        } else if let Some(every) = self.plain {
            ViewMode::Plain(every)
        } else {
            ViewMode::Auto
        }
    }
}
