//! `make demo` (`shardwise demo`): an embedded stream with several shards, `fraud` and
//! `aggregation` run as their real binaries with the local backends, load from the generator
//! (fraud patterns and poison records included), the live view, and a summary of what happened
//! and where to look at it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use shardwise::producer::Producer;
use shardwise_sqlite::{LocalDb, SqliteQueue, SqliteTable, queues};

use crate::cli::{BackendKind, MappingOverrides, RunArgs, SourceKind, StreamArgs, prepare_run};
use crate::dashboard::DashboardAddress;
use crate::runner::StopWhen;
use crate::stats::MappingStats;
use crate::stream::EmbeddedStream;
use crate::stream::embedded::EmbeddedWriter;
use crate::tools::{LoadOptions, generate};
use crate::view::ViewMode;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How long the load runs (the demo then drains and closes its windows).
    #[arg(long, value_parser = crate::parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// Records per second.
    #[arg(long, default_value_t = 300)]
    pub rate: u32,
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// Tumbling window of `aggregation` for the demo (the template's 60 s would close one
    /// window a minute).
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    pub window: Duration,
    #[arg(long, default_value_t = 0.01)]
    pub poison_share: f64,
    #[arg(long, default_value_t = 0.02)]
    pub fraud_share: f64,
    /// Functions to run (binary names of the template).
    #[arg(long, value_delimiter = ',', default_value = "fraud,aggregation")]
    pub functions: Vec<String>,
    /// Where the function binaries are.
    #[arg(long, default_value = "target/debug")]
    pub bin_dir: PathBuf,
    #[arg(long, default_value = "template.yaml")]
    pub template: PathBuf,
    /// State of this demo (wiped at start).
    #[arg(long, default_value = ".shardwise/demo")]
    pub state_dir: PathBuf,
    /// Plain progress lines every this often instead of the live view.
    #[arg(long, value_parser = crate::parse_duration)]
    pub plain: Option<Duration>,
    /// Fail unless every function acknowledged every record put, poison records were
    /// dead-lettered, and fraud raised alerts / aggregation wrote windows (for CI).
    #[arg(long)]
    pub check: bool,
    /// The live dashboard's loopback address (another free port if this one is taken; port 0:
    /// any free port), or `off`.
    #[arg(long, default_value = DEMO_DASHBOARD, value_parser = DashboardAddress::parse)]
    pub dashboard: DashboardAddress,
}

/// Where the demo serves its dashboard unless told otherwise.
pub const DEMO_DASHBOARD: &str = "127.0.0.1:8717";

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    if args.state_dir.exists() {
        std::fs::remove_dir_all(&args.state_dir)?;
    }
    let stream_args = StreamArgs {
        source: SourceKind::Embedded,
        stream: "shardwise-transactions".to_owned(),
        state_dir: args.state_dir.clone(),
        shards: args.shards,
        put_calls_in_flight: crate::cli::PUT_CALLS_IN_FLIGHT,
    };
    let blocked = "m-blocked-0001";
    let run_args = RunArgs {
        stream: stream_args.clone(),
        template: args.template.clone(),
        functions: args.functions.clone(),
        bin_dir: args.bin_dir.clone(),
        watch: None,
        backend: BackendKind::Local,
        env: vec![
            format!("FRAUD_BLOCKED_MERCHANTS={blocked}"),
            "RUST_LOG=warn".to_owned(),
        ],
        instances: None,
        overrides: MappingOverrides::default(),
        duration: None,
        until_idle: None,
        plain: args.plain,
        quiet: false,
        on_failure_queue_url: None,
        poll_interval: Duration::from_millis(100),
        retry_backoff: Duration::from_millis(100),
        dashboard: Some(match args.dashboard {
            DashboardAddress::On(address) if address.to_string() == DEMO_DASHBOARD => {
                DashboardAddress::Preferred(address)
            }
            other => other,
        }),
    };
    let view = args.plain.map_or(ViewMode::Auto, ViewMode::Plain);
    let mut config = prepare_run(&run_args, view).await?;
    let dashboard_url = config.dashboard.as_ref().and_then(|d| d.url());
    for function in &mut config.functions {
        if function.settings.tumbling_window.is_some() {
            function.settings.tumbling_window = Some(args.window);
        }
    }
    let (armed_tx, armed_rx) = tokio::sync::watch::channel(false);
    config.stop = StopWhen {
        // Load, then at most two windows and a minute of retries to drain.
        duration: Some(args.duration + args.window * 2 + Duration::from_secs(60)),
        idle: Some(Duration::from_secs(2)),
        idle_armed: Some(armed_rx),
    };
    eprintln!(
        "demo: {} shards, {} (real binaries from {}), {} rec/s for {:.0} s, \
         {:.1}% poison, {:.1}% fraud patterns; state in {}",
        args.shards,
        args.functions.join(" + "),
        args.bin_dir.display(),
        args.rate,
        args.duration.as_secs_f64(),
        args.poison_share * 100.0,
        args.fraud_share * 100.0,
        args.state_dir.display()
    );
    let stream = Arc::new(EmbeddedStream::open(
        stream_args.stream_db(),
        &stream_args.stream,
        args.shards,
    )?);
    let load = LoadOptions {
        rate: args.rate,
        duration: args.duration,
        cards: 50_000,
        poison_share: args.poison_share,
        fraud_share: args.fraud_share,
        blocked_merchant: blocked.to_owned(),
        seed: 7,
    };
    let loader = tokio::spawn(async move {
        let producer = Producer::new(EmbeddedWriter(stream));
        let report = generate(&producer, &load, None, |_| {}).await;
        let _ = armed_tx.send(true);
        report
    });
    let report = crate::runner::run(config, None).await?;
    let load = loader.await?;
    println!("\n{}", crate::view::summary(&report));
    let db = Arc::new(LocalDb::open(stream_args.local_db())?);
    let dead = SqliteQueue::new(db.clone(), queues::DEAD_LETTERS).count()?;
    let on_failure = SqliteQueue::new(db.clone(), queues::ON_FAILURE).count()?;
    let alerts = SqliteQueue::new(db.clone(), queues::ALERTS).count()?;
    let windows = SqliteTable::new(db.clone(), "aggregates").count()?;
    let processed: u64 = report
        .functions
        .iter()
        .map(|(_, s)| MappingStats::get(&s.records_out))
        .sum();
    let latency = report
        .functions
        .iter()
        .find(|(n, _)| n == "fraud")
        .and_then(|(_, s)| s.latency_percentiles());
    println!(
        "load:            {} records put ({} poison, {} fraud patterns) in {:.0} s",
        load.put,
        load.poison,
        load.fraud_patterns,
        args.duration.as_secs_f64()
    );
    println!("processed:       {processed} record deliveries acknowledged (fraud + aggregation)");
    if let Some((p50, p99, _)) = latency {
        println!("fraud latency:   put → acknowledged p50 {p50} ms, p99 {p99} ms");
    }
    println!("alerts raised:   {alerts}   (queue `alerts`)");
    println!("windows written: {windows} aggregate items (table `aggregates`)");
    println!(
        "dead letters:    {dead} with payloads (queue `dead-letters`); on-failure records: {on_failure}"
    );
    println!(
        "look at them:    target/debug/shardwise inspect --state-dir {} dead-letters|alerts|on-failure|aggregates",
        args.state_dir.display()
    );
    println!("function logs:   {}/logs/", args.state_dir.display());
    if let Some(url) = dashboard_url {
        println!(
            "dashboard:       {url} showed the run live (a page left open keeps the final numbers)"
        );
    }
    if args.check {
        let mut problems = Vec::new();
        for (name, stats) in &report.functions {
            let acked = MappingStats::get(&stats.records_out);
            if acked < load.put {
                problems.push(format!(
                    "{name} acknowledged {acked} of {} records",
                    load.put
                ));
            }
        }
        if load.poison > 0 && dead == 0 {
            problems.push("no dead letters although poison records were put".to_owned());
        }
        if args.functions.iter().any(|f| f == "fraud") && alerts == 0 {
            problems.push("fraud raised no alert".to_owned());
        }
        if args.functions.iter().any(|f| f == "aggregation") && windows == 0 {
            problems.push("aggregation wrote no window".to_owned());
        }
        anyhow::ensure!(
            problems.is_empty(),
            "demo check failed: {}",
            problems.join("; ")
        );
        println!("check:           ok");
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    #[arg(long, default_value = ".shardwise/demo")]
    pub state_dir: PathBuf,
    /// dead-letters, on-failure, alerts (queues) or a table name (aggregates, card-state, canary).
    pub what: String,
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
}

pub fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let db = Arc::new(LocalDb::open(args.state_dir.join("local.db"))?);
    let queue = SqliteQueue::new(db.clone(), args.what.as_str());
    let count = queue.count()?;
    if count > 0
        || [queues::DEAD_LETTERS, queues::ON_FAILURE, queues::ALERTS].contains(&args.what.as_str())
    {
        println!(
            "{count} messages in queue {}; the first {}:",
            args.what,
            args.limit.min(usize::try_from(count).unwrap_or(usize::MAX))
        );
        for message in queue.messages(0, args.limit)? {
            println!("{}", message.body);
        }
        return Ok(());
    }
    let table = SqliteTable::new(db, args.what.as_str());
    let items = table.scan()?;
    println!(
        "{} items in table {}; the first {}:",
        items.len(),
        args.what,
        args.limit.min(items.len())
    );
    for (id, item) in items.into_iter().take(args.limit) {
        println!("{id}: {}", shardwise_sqlite::item_to_json(&item));
    }
    Ok(())
}
