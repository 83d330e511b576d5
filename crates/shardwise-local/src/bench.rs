//! `shardwise bench`: end-to-end throughput and latency of the embedded pipeline — producer →
//! embedded stream → mapping → a real function process (the no-op test function by default) →
//! checkpoint — printed as records/s and put-to-acknowledged p50/p99.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use shardwise::producer::Producer;
use tokio::time::Instant;

use crate::esm::{OnFailure, WorkerOptions};
use crate::function::{FunctionSpec, Invoker, ProcessPool};
use crate::runner::{FunctionRun, RunConfig, StopWhen};
use crate::settings::MappingSettings;
use crate::stats::MappingStats;
use crate::stream::embedded::EmbeddedWriter;
use crate::stream::{EmbeddedStream, Source};
use crate::tools::{LoadOptions, generate};
use crate::view::ViewMode;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Records per second offered (the latency figure is at this rate).
    #[arg(long, default_value_t = 5000)]
    pub rate: u32,
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    pub duration: Duration,
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Function binary (default: shardwise-test-function next to this binary).
    #[arg(long)]
    pub function: Option<PathBuf>,
    #[arg(long, default_value = ".shardwise/bench")]
    pub state_dir: PathBuf,
    /// Also append this run's figures to this CSV file (header written when it is new):
    /// offered rate, throughput and latency percentiles, which `scripts/bench_plots.py` draws.
    #[arg(long)]
    pub figures: Option<PathBuf>,
    /// Serve the live dashboard on this loopback address while the bench runs (e.g.
    /// 127.0.0.1:0): how the page fares at the bench's rate.
    #[arg(long, value_parser = crate::dashboard::DashboardAddress::parse)]
    pub dashboard: Option<crate::dashboard::DashboardAddress>,
}

const FIGURES_HEADER: &str = "offered_per_second,shards,batch_size,put,acked,seconds,acked_per_second,p50_ms,p90_ms,p99_ms,max_ms";

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.state_dir.exists() {
        std::fs::remove_dir_all(&args.state_dir)?;
    }
    let binary = match &args.function {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("shardwise-test-function"))
            .ok_or_else(|| anyhow::anyhow!("cannot locate shardwise-test-function"))?,
    };
    let stream = Arc::new(EmbeddedStream::open(
        args.state_dir.join("stream.db"),
        "bench",
        args.shards,
    )?);
    let settings = MappingSettings {
        batch_size: args.batch_size,
        report_batch_item_failures: true,
        bisect_on_error: true,
        max_retry_attempts: Some(3),
        ..MappingSettings::default()
    };
    let pool = ProcessPool::start(
        FunctionSpec {
            name: "bench".to_owned(),
            binary,
            env: vec![],
            memory_mb: 512,
            timeout: Duration::from_secs(30),
            log_file: None,
            sandbox_dir: None,
        },
        args.shards as usize,
    )
    .await?;
    let (armed_tx, armed_rx) = tokio::sync::watch::channel(false);
    let config = RunConfig {
        functions: vec![FunctionRun {
            name: "bench".to_owned(),
            settings,
            invoker: Invoker::Processes(pool),
            on_failure: OnFailure::None,
        }],
        source: Source::Embedded(stream.clone()),
        checkpoints: args.state_dir.join("runner.db"),
        options: WorkerOptions {
            poll_interval: Duration::from_millis(20),
            ..WorkerOptions::default()
        },
        stop: StopWhen {
            duration: Some(args.duration + Duration::from_secs(60)),
            idle: Some(Duration::from_millis(500)),
            idle_armed: Some(armed_rx),
        },
        view: ViewMode::None,
        header: None,
        dashboard: match args.dashboard {
            Some(address) => crate::cli::serve_dashboard(address, None).await?,
            None => None,
        },
    };
    let load = LoadOptions {
        rate: args.rate,
        duration: args.duration,
        cards: 10_000,
        poison_share: 0.0,
        fraud_share: 0.0,
        blocked_merchant: "none".to_owned(),
        seed: 1,
    };
    let started = Instant::now();
    let writer = EmbeddedWriter(stream);
    let loader = tokio::spawn(async move {
        let producer = Producer::new(writer);
        let report = generate(&producer, &load, None, |_| {}).await;
        let _ = armed_tx.send(true);
        report
    });
    let report = crate::runner::run(config, None).await?;
    let load = loader.await?;
    let (_, stats) = report
        .functions
        .first()
        .ok_or_else(|| anyhow::anyhow!("no function ran"))?;
    let acked = MappingStats::get(&stats.records_out);
    // The run waits 0.5 s of quiet before it stops: not part of the pipeline's time.
    let elapsed = started.elapsed().saturating_sub(Duration::from_millis(500));
    #[allow(clippy::cast_precision_loss)]
    let throughput = acked as f64 / elapsed.as_secs_f64();
    println!(
        "embedded pipeline: {} shards, batch {}, offered {} rec/s for {:.0} s",
        args.shards,
        args.batch_size,
        args.rate,
        args.duration.as_secs_f64()
    );
    println!(
        "  put {} records, acknowledged {acked} in {:.2} s → {throughput:.0} records/s end to end ({} invocations)",
        load.put,
        elapsed.as_secs_f64(),
        MappingStats::get(&stats.invokes)
    );
    let quantiles = stats.latency_quantiles(&[0.5, 0.9, 0.99, 1.0]);
    if let Some((at, n)) = &quantiles {
        println!(
            "  put → acknowledged latency: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms ({n} records)",
            at[0], at[1], at[2], at[3]
        );
    }
    anyhow::ensure!(acked >= load.put, "not every record was acknowledged");
    if let (Some(path), Some((at, _))) = (&args.figures, &quantiles) {
        use std::io::Write as _;
        let new = !path.exists();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("--figures {}: {e}", path.display()))?;
        if new {
            writeln!(file, "{FIGURES_HEADER}")?;
        }
        writeln!(
            file,
            "{},{},{},{},{acked},{:.3},{throughput:.1},{},{},{},{}",
            args.rate,
            args.shards,
            args.batch_size,
            load.put,
            elapsed.as_secs_f64(),
            at[0],
            at[1],
            at[2],
            at[3]
        )?;
    }
    Ok(())
}
