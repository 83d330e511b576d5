//! `shardwise run`: start the functions, one worker per (function, shard), the live view, and
//! stop on a duration, on Ctrl-C, or once everything read has settled and nothing new came.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::checkpoint::CheckpointStore;
use crate::esm::{Mapping, OnFailure, WorkerOptions};
use crate::function::Invoker;
use crate::settings::MappingSettings;
use crate::stats::MappingStats;
use crate::stream::Source;
use crate::view::{LiveView, ViewMode};

/// One function to run.
#[derive(Debug)]
pub struct FunctionRun {
    pub name: String,
    pub settings: MappingSettings,
    pub invoker: Invoker,
    pub on_failure: OnFailure,
}

/// When a run ends.
#[derive(Debug, Clone, Default)]
pub struct StopWhen {
    /// After this long.
    pub duration: Option<Duration>,
    /// Once every record read has settled, no window is open, and nothing changed for this long.
    pub idle: Option<Duration>,
    /// Idleness only counts once this turns true (the demo arms it when its load ends).
    pub idle_armed: Option<watch::Receiver<bool>>,
}

pub struct RunConfig {
    pub functions: Vec<FunctionRun>,
    pub source: Source,
    pub checkpoints: PathBuf,
    pub options: WorkerOptions,
    pub stop: StopWhen,
    pub view: ViewMode,
    /// The live view's first line.
    pub header: Option<crate::view::Header>,
    /// The dashboard to feed, already serving (`--dashboard`).
    pub dashboard: Option<Arc<crate::dashboard::Dashboard>>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("functions", &self.functions)
            .field("source", &self.source)
            .field("checkpoints", &self.checkpoints)
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

/// What a run did, per function.
#[derive(Debug)]
pub struct RunReport {
    pub functions: Vec<(String, Arc<MappingStats>)>,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
}

fn settled(stats: &MappingStats) -> (bool, u64) {
    let read = MappingStats::get(&stats.records_in);
    let done = MappingStats::get(&stats.records_out)
        + MappingStats::get(&stats.discarded)
        + MappingStats::get(&stats.filtered);
    let open = stats
        .open_windows
        .load(std::sync::atomic::Ordering::Relaxed);
    let activity = read + done + MappingStats::get(&stats.invokes);
    (done >= read && open <= 0, activity)
}

/// Run until `config.stop` says so (or Ctrl-C), with `extra` running beside the workers (the
/// demo's load generator); returns the counters.
pub async fn run(
    config: RunConfig,
    stop_tx: Option<watch::Sender<bool>>,
) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let checkpoints = Arc::new(CheckpointStore::open(&config.checkpoints)?);
    let shards = config.source.shards().await?;
    let stream_arn = config.source.arn();
    let (stop_tx, stop_rx) = match stop_tx {
        Some(tx) => {
            let rx = tx.subscribe();
            (tx, rx)
        }
        None => watch::channel(false),
    };
    let mut mappings = Vec::new();
    let mut workers = Vec::new();
    for function in config.functions {
        let mapping = Arc::new(Mapping {
            function: function.name.clone(),
            settings: function.settings,
            invoker: Arc::new(function.invoker),
            stats: Arc::new(MappingStats::default()),
            checkpoints: checkpoints.clone(),
            on_failure: function.on_failure,
            source: config.source.clone(),
            stream_arn: stream_arn.clone(),
            options: config.options.clone(),
        });
        for shard in &shards {
            workers.push(tokio::spawn(
                mapping.clone().run_shard(shard.clone(), stop_rx.clone()),
            ));
        }
        mappings.push(mapping);
    }
    let view = LiveView::start(
        config.view,
        mappings
            .iter()
            .map(|m| (m.function.clone(), m.stats.clone()))
            .collect(),
        config.header.clone(),
    );
    if let Some(dashboard) = &config.dashboard {
        dashboard.attach(
            mappings
                .iter()
                .map(|m| crate::dashboard::FunctionFeed {
                    name: m.function.clone(),
                    stats: m.stats.clone(),
                    log_file: m.invoker.log_file().map(std::path::Path::to_path_buf),
                })
                .collect(),
            shards.len(),
            crate::now_ms(),
        );
    }

    let mut stop_rx_main = stop_rx.clone();
    let mut last_activity = 0u64;
    let mut quiet_since = Instant::now();
    // Bounded: ends on the duration, on idleness, on Ctrl-C, or when someone else says stop.
    loop {
        if *stop_rx_main.borrow() {
            break;
        }
        if let Some(duration) = config.stop.duration
            && started.elapsed() >= duration
        {
            break;
        }
        let armed = config.stop.idle_armed.as_ref().is_none_or(|a| *a.borrow());
        if let Some(idle) = config.stop.idle.filter(|_| armed) {
            let mut all_settled = true;
            let mut activity = 0;
            for mapping in &mappings {
                let (ok, a) = settled(&mapping.stats);
                all_settled &= ok;
                activity += a;
            }
            if activity != last_activity || !all_settled {
                last_activity = activity;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= idle {
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = stop_rx_main.changed() => {}
        }
    }
    let _ = stop_tx.send(true);
    for worker in workers {
        // A worker in an invocation finishes it (bounded by the function's timeout).
        let _ = tokio::time::timeout(Duration::from_secs(30), worker).await;
    }
    let report = RunReport {
        functions: mappings
            .iter()
            .map(|m| (m.function.clone(), m.stats.clone()))
            .collect(),
        elapsed: started.elapsed(),
    };
    view.finish().await;
    if let Some(dashboard) = &config.dashboard {
        dashboard.stop(crate::now_ms());
        crate::dashboard::server::flush(dashboard, Duration::from_secs(2)).await;
    }
    drop(mappings);
    Ok(report)
}
