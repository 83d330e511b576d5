//! The live dashboard of a run: one page served by the runner on a loopback address, fed over
//! server-sent events, and the same numbers as JSON for scripts.
//!
//! Why it is shaped so:
//! - The page reads the very counters the text view and the summary read ([`MappingStats`]),
//!   turned into per-second rates once a second by [`Sampler`]; nothing is sent per record, so
//!   the page costs the same at 10 records/s and at 10,000.
//! - What the functions did with the records (processed, already done, dead-lettered, handed
//!   back) only the functions know: they write it as CloudWatch EMF lines to stdout, which the
//!   runner sends to each function's log file. [`outputs::LogTail`] reads those lines as
//!   CloudWatch would. Dead letters, alerts and closed windows are read back from the local
//!   backends ([`outputs::LocalOutputs`]) — the same queue and table `shardwise inspect` shows.
//! - The server ([`server`]) outlives nothing: when the run ends the last frame says so
//!   (`state: stopped`) and the page keeps the final numbers and says the runner has stopped.
//!
//! Endpoints: `/` the page, `/api/snapshot` everything as JSON (with up to five minutes of
//! per-second history), `/api/events` the event stream (`snapshot` first, then a `tick` a
//! second, `stopped` last).

pub mod outputs;
pub mod server;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

use crate::stats::{BATCH_SIZE_BUCKETS, MappingStats, ShardStats};
use outputs::{LocalOutputs, LogTail, Outcomes, OutputsView};

/// A shard's write limits (Kinesis `PutRecord`/`PutRecords`, per shard): the page shows each
/// shard's traffic as a share of them.
pub const SHARD_RECORDS_PER_SECOND: u64 = 1_000;
pub const SHARD_BYTES_PER_SECOND: u64 = 1024 * 1024;
/// Iterator age above which the page marks a shard as falling behind (the line on the plot).
pub const ITERATOR_AGE_WARNING_MS: i64 = 30_000;
/// Seconds of per-second history kept for a page opened late.
pub const HISTORY_SECONDS: usize = 300;

/// Where the dashboard is served, or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DashboardAddress {
    Off,
    On(SocketAddr),
    /// This address, or any free port when it is taken (the demo's default: a second demo
    /// still gets a page).
    Preferred(SocketAddr),
}

impl DashboardAddress {
    /// `off`, or a loopback `IP:PORT` (port 0: any free port). The page has no authentication,
    /// so it is never served beyond this machine.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        let address: SocketAddr = text.parse().map_err(|_| {
            format!("{text:?}: expected a loopback address such as 127.0.0.1:8717, or off")
        })?;
        if !address.ip().is_loopback() {
            return Err(format!(
                "{text:?} is not a loopback address: the dashboard has no authentication, so it \
                 is only served on 127.0.0.1 or ::1"
            ));
        }
        Ok(Self::On(address))
    }
}

/// One function as the dashboard sees it.
#[derive(Debug, Clone)]
pub struct FunctionFeed {
    pub name: String,
    pub stats: Arc<MappingStats>,
    /// The function processes' log file, where their EMF lines go (`None` under `--watch`).
    pub log_file: Option<PathBuf>,
}

/// Whether the run is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Bound, functions starting.
    Starting,
    Running,
    Stopped,
}

/// Per-second rates of one set of counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    pub records_in: f64,
    pub bytes_in: f64,
    pub records_out: f64,
    pub bytes_out: f64,
}

/// One shard of one function, one second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardTick {
    pub shard: String,
    pub rates: Rates,
    pub iterator_age_ms: i64,
}

/// One function, one second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionTick {
    pub name: String,
    pub rates: Rates,
    pub invokes_per_second: f64,
    pub errors_per_second: f64,
    /// The largest of its shards'.
    pub iterator_age_ms: i64,
    pub shards: Vec<ShardTick>,
}

/// One second of the run: what the plots draw.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tick {
    pub at_ms: i64,
    pub functions: Vec<FunctionTick>,
}

/// A function's counters since the run started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FunctionTotals {
    pub records_in: u64,
    pub bytes_in: u64,
    pub records_out: u64,
    pub bytes_out: u64,
    pub filtered: u64,
    pub discarded: u64,
    pub invokes: u64,
    pub invoked_records: u64,
    /// Function errors plus partial batch failures, as the summary counts them.
    pub errors: u64,
    pub retries: u64,
    pub bisects: u64,
    pub on_failure_records: u64,
    pub windows_closed: u64,
    pub open_windows: i64,
}

/// Invocations whose batch size was at most `max_records` (`None`: the rest).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchBucket {
    pub max_records: Option<u64>,
    pub invokes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardTotals {
    pub shard: String,
    pub records_in: u64,
    pub bytes_in: u64,
    pub records_out: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub p50_ms: u32,
    pub p99_ms: u32,
    pub records: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionView {
    pub name: String,
    pub totals: FunctionTotals,
    pub batch_sizes: Vec<BatchBucket>,
    /// Put-to-acknowledged latency over the run.
    pub latency: Option<Latency>,
    /// From the function's own metrics (`None`: no log file to read them from).
    pub outcomes: Option<Outcomes>,
    pub shards: Vec<ShardTotals>,
}

/// The stream and its limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamView {
    pub shards: usize,
    pub shard_records_per_second: u64,
    pub shard_bytes_per_second: u64,
    pub iterator_age_warning_ms: i64,
}

/// Everything the page shows now (the JSON endpoint adds the history).
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    pub state: RunState,
    pub started_at_ms: i64,
    pub at_ms: i64,
    pub elapsed_seconds: f64,
    pub stream: StreamView,
    /// Shard-count decisions of a scaler; `null`: no scaler in this run.
    pub scaler: Option<()>,
    pub functions: Vec<FunctionView>,
    /// `None` when the functions use AWS backends (nothing local to read back).
    pub outputs: Option<OutputsView>,
    /// The second just sampled.
    pub tick: Option<Tick>,
}

/// A frame plus the history: `/api/snapshot` and the event stream's first event.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot<'a> {
    #[serde(flatten)]
    pub frame: &'a Frame,
    pub history: Vec<&'a Tick>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    records_in: u64,
    bytes_in: u64,
    records_out: u64,
    bytes_out: u64,
}

impl Counts {
    fn of_function(stats: &MappingStats) -> Self {
        let g = MappingStats::get;
        Self {
            records_in: g(&stats.records_in),
            bytes_in: g(&stats.bytes_in),
            records_out: g(&stats.records_out),
            bytes_out: g(&stats.bytes_out),
        }
    }

    fn of_shard(stats: &ShardStats) -> Self {
        let g = MappingStats::get;
        Self {
            records_in: g(&stats.records_in),
            bytes_in: g(&stats.bytes_in),
            records_out: g(&stats.records_out),
            bytes_out: g(&stats.bytes_out),
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn rates_since(&self, before: &Self, seconds: f64) -> Rates {
        let per_second = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
        Rates {
            records_in: per_second(self.records_in, before.records_in),
            bytes_in: per_second(self.bytes_in, before.bytes_in),
            records_out: per_second(self.records_out, before.records_out),
            bytes_out: per_second(self.bytes_out, before.bytes_out),
        }
    }
}

#[derive(Debug, Default)]
struct Previous {
    function: Counts,
    invokes: u64,
    errors: u64,
    shards: Vec<(String, Counts)>,
}

/// Turns counters into one [`Tick`] a second.
#[derive(Debug)]
pub struct Sampler {
    functions: Vec<FunctionFeed>,
    previous: Vec<Previous>,
    previous_at_ms: i64,
}

fn errors(stats: &MappingStats) -> u64 {
    MappingStats::get(&stats.function_errors) + MappingStats::get(&stats.partial_failures)
}

impl Sampler {
    pub fn new(functions: Vec<FunctionFeed>, now_ms: i64) -> Self {
        let mut sampler = Self {
            previous: functions.iter().map(|_| Previous::default()).collect(),
            functions,
            previous_at_ms: now_ms,
        };
        // Counting starts now: a page shows rates of this run, not of what came before.
        let _ = sampler.sample(now_ms);
        sampler
    }

    pub fn functions(&self) -> &[FunctionFeed] {
        &self.functions
    }

    /// Rates since the last sample.
    pub fn sample(&mut self, now_ms: i64) -> Tick {
        #[allow(clippy::cast_precision_loss)]
        let seconds = ((now_ms - self.previous_at_ms) as f64 / 1000.0).max(0.001);
        self.previous_at_ms = now_ms;
        let functions = self
            .functions
            .iter()
            .zip(&mut self.previous)
            .map(|(feed, previous)| {
                let stats = &feed.stats;
                let counts = Counts::of_function(stats);
                let invokes = MappingStats::get(&stats.invokes);
                let errors = errors(stats);
                let shards: Vec<ShardTick> = stats
                    .shards()
                    .into_iter()
                    .map(|(shard, shard_stats)| {
                        let now = Counts::of_shard(&shard_stats);
                        let before = previous
                            .shards
                            .iter()
                            .find(|(id, _)| *id == shard)
                            .map(|(_, c)| *c)
                            .unwrap_or_default();
                        let tick = ShardTick {
                            rates: now.rates_since(&before, seconds),
                            iterator_age_ms: shard_stats.iterator_age_ms.load(Ordering::Relaxed),
                            shard: shard.clone(),
                        };
                        match previous.shards.iter_mut().find(|(id, _)| *id == shard) {
                            Some((_, c)) => *c = now,
                            None => previous.shards.push((shard, now)),
                        }
                        tick
                    })
                    .collect();
                #[allow(clippy::cast_precision_loss)]
                let tick = FunctionTick {
                    name: feed.name.clone(),
                    rates: counts.rates_since(&previous.function, seconds),
                    invokes_per_second: invokes.saturating_sub(previous.invokes) as f64 / seconds,
                    errors_per_second: errors.saturating_sub(previous.errors) as f64 / seconds,
                    iterator_age_ms: shards.iter().map(|s| s.iterator_age_ms).max().unwrap_or(0),
                    shards,
                };
                previous.function = counts;
                previous.invokes = invokes;
                previous.errors = errors;
                tick
            })
            .collect();
        Tick {
            at_ms: now_ms,
            functions,
        }
    }
}

/// A function's totals, batch sizes and latency, read from its counters.
pub fn function_view(feed: &FunctionFeed, outcomes: Option<Outcomes>) -> FunctionView {
    let stats = &feed.stats;
    let g = MappingStats::get;
    let batch_sizes = stats
        .batch_sizes
        .iter()
        .enumerate()
        .map(|(i, count)| BatchBucket {
            max_records: BATCH_SIZE_BUCKETS.get(i).copied(),
            invokes: g(count),
        })
        .collect();
    FunctionView {
        name: feed.name.clone(),
        totals: FunctionTotals {
            records_in: g(&stats.records_in),
            bytes_in: g(&stats.bytes_in),
            records_out: g(&stats.records_out),
            bytes_out: g(&stats.bytes_out),
            filtered: g(&stats.filtered),
            discarded: g(&stats.discarded),
            invokes: g(&stats.invokes),
            invoked_records: g(&stats.invoked_records),
            errors: errors(stats),
            retries: g(&stats.retries),
            bisects: g(&stats.bisects),
            on_failure_records: g(&stats.on_failure_records),
            windows_closed: g(&stats.windows_closed),
            open_windows: stats.open_windows.load(Ordering::Relaxed),
        },
        batch_sizes,
        latency: stats
            .latency_percentiles()
            .map(|(p50_ms, p99_ms, records)| Latency {
                p50_ms,
                p99_ms,
                records,
            }),
        outcomes,
        shards: stats
            .shards()
            .into_iter()
            .map(|(shard, s)| ShardTotals {
                shard,
                records_in: g(&s.records_in),
                bytes_in: g(&s.bytes_in),
                records_out: g(&s.records_out),
                bytes_out: g(&s.bytes_out),
            })
            .collect(),
    }
}

/// What the run feeds once its functions are up.
#[derive(Debug)]
struct Attached {
    sampler: Sampler,
    logs: Vec<Option<LogTail>>,
    shard_count: usize,
}

#[derive(Debug)]
struct Inner {
    started_at_ms: i64,
    state: RunState,
    attached: Option<Attached>,
    outputs: Option<LocalOutputs>,
    history: VecDeque<Tick>,
    frame: Arc<Frame>,
}

/// The dashboard of one run: state shared by the sampler and the server's connections.
#[derive(Debug)]
pub struct Dashboard {
    inner: Mutex<Inner>,
    frames: watch::Sender<Arc<Frame>>,
    /// Where the server listens, once it does.
    address: std::sync::OnceLock<SocketAddr>,
}

impl Dashboard {
    /// A dashboard that has not seen the run yet (`state: starting`). `outputs`: the local
    /// backends the functions write to, when they use them.
    pub fn new(outputs: Option<LocalOutputs>, now_ms: i64) -> Arc<Self> {
        let frame = Arc::new(Frame {
            state: RunState::Starting,
            started_at_ms: now_ms,
            at_ms: now_ms,
            elapsed_seconds: 0.0,
            stream: stream_view(0),
            scaler: None,
            functions: Vec::new(),
            outputs: None,
            tick: None,
        });
        let (frames, _) = watch::channel(frame.clone());
        Arc::new(Self {
            inner: Mutex::new(Inner {
                started_at_ms: now_ms,
                state: RunState::Starting,
                attached: None,
                outputs,
                history: VecDeque::new(),
                frame,
            }),
            frames,
            address: std::sync::OnceLock::new(),
        })
    }

    /// The page's URL, once the server listens.
    pub fn url(&self) -> Option<String> {
        self.address.get().map(|a| format!("http://{a}/"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The run has started its workers: sample these functions from now on.
    pub fn attach(&self, functions: Vec<FunctionFeed>, shard_count: usize, now_ms: i64) {
        let logs = functions
            .iter()
            .map(|f| f.log_file.clone().map(LogTail::from_end))
            .collect();
        let mut inner = self.lock();
        inner.attached = Some(Attached {
            sampler: Sampler::new(functions, now_ms),
            logs,
            shard_count,
        });
        inner.state = RunState::Running;
    }

    /// Take one sample and publish it (the sampler task calls this once a second).
    pub fn sample(&self, now_ms: i64) {
        let frame = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let outputs = inner.outputs.as_mut().map(|o| o.poll(now_ms));
            let (tick, functions, shard_count) = match inner.attached.as_mut() {
                Some(attached) => {
                    let tick = attached.sampler.sample(now_ms);
                    let functions = attached
                        .sampler
                        .functions()
                        .iter()
                        .zip(&mut attached.logs)
                        .map(|(feed, log)| function_view(feed, log.as_mut().map(LogTail::poll)))
                        .collect();
                    (Some(tick), functions, attached.shard_count)
                }
                None => (None, Vec::new(), 0),
            };
            if let Some(tick) = &tick {
                if inner.history.len() == HISTORY_SECONDS {
                    inner.history.pop_front();
                }
                inner.history.push_back(tick.clone());
            }
            #[allow(clippy::cast_precision_loss)]
            let frame = Arc::new(Frame {
                state: inner.state,
                started_at_ms: inner.started_at_ms,
                at_ms: now_ms,
                elapsed_seconds: (now_ms - inner.started_at_ms) as f64 / 1000.0,
                stream: stream_view(shard_count),
                scaler: None,
                functions,
                outputs,
                tick,
            });
            inner.frame = frame.clone();
            frame
        };
        self.frames.send_replace(frame);
    }

    /// The run has ended: one last sample, marked stopped.
    pub fn stop(&self, now_ms: i64) {
        self.lock().state = RunState::Stopped;
        self.sample(now_ms);
    }

    /// The current frame with the history, as JSON.
    pub fn snapshot_json(&self) -> String {
        let inner = self.lock();
        let snapshot = Snapshot {
            frame: &inner.frame,
            history: inner.history.iter().collect(),
        };
        serde_json::to_string(&snapshot).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Frames as they are published.
    pub fn frames(&self) -> watch::Receiver<Arc<Frame>> {
        self.frames.subscribe()
    }

    /// Page connections following the event stream.
    pub fn followers(&self) -> usize {
        self.frames.receiver_count()
    }
}

fn stream_view(shards: usize) -> StreamView {
    StreamView {
        shards,
        shard_records_per_second: SHARD_RECORDS_PER_SECOND,
        shard_bytes_per_second: SHARD_BYTES_PER_SECOND,
        iterator_age_warning_ms: ITERATOR_AGE_WARNING_MS,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn feed(name: &str) -> FunctionFeed {
        FunctionFeed {
            name: name.to_owned(),
            stats: Arc::new(MappingStats::default()),
            log_file: None,
        }
    }

    #[test]
    fn addresses_are_loopback_or_off() {
        assert_eq!(DashboardAddress::parse("off"), Ok(DashboardAddress::Off));
        assert_eq!(
            DashboardAddress::parse("127.0.0.1:0"),
            Ok(DashboardAddress::On("127.0.0.1:0".parse().unwrap()))
        );
        assert!(DashboardAddress::parse("[::1]:8717").is_ok());
        let error = DashboardAddress::parse("0.0.0.0:8717").unwrap_err();
        assert!(error.contains("not a loopback address"), "{error}");
        assert!(DashboardAddress::parse("localhost").is_err());
    }

    #[test]
    fn rates_are_per_second_since_the_last_sample() {
        let fraud = feed("fraud");
        let stats = fraud.stats.clone();
        // Counted before the dashboard started: not part of any rate.
        MappingStats::add(&stats.records_in, 1_000);
        let mut sampler = Sampler::new(vec![fraud], 10_000);
        let shard = stats.shard("shardId-000000000000");
        for counter in [&stats.records_in, &shard.records_in] {
            MappingStats::add(counter, 500);
        }
        for counter in [&stats.bytes_in, &shard.bytes_in] {
            MappingStats::add(counter, 1_048_576);
        }
        MappingStats::add(&stats.records_out, 250);
        MappingStats::add(&stats.invokes, 5);
        MappingStats::add(&stats.function_errors, 1);
        shard.iterator_age_ms.store(42_000, Ordering::Relaxed);
        let tick = sampler.sample(12_000);
        let f = &tick.functions[0];
        assert_eq!(f.rates.records_in, 250.0);
        assert_eq!(f.rates.bytes_in, 524_288.0);
        assert_eq!(f.rates.records_out, 125.0);
        assert_eq!(f.invokes_per_second, 2.5);
        assert_eq!(f.errors_per_second, 0.5);
        assert_eq!(f.iterator_age_ms, 42_000);
        // A shard seen for the first time counts from zero.
        assert_eq!(f.shards[0].rates.records_in, 250.0);
        let quiet = sampler.sample(13_000);
        assert_eq!(quiet.functions[0].rates, Rates::default());
    }

    #[test]
    fn the_frame_says_when_the_run_stopped() {
        let dashboard = Dashboard::new(None, 0);
        let frames = dashboard.frames();
        assert_eq!(frames.borrow().state, RunState::Starting);
        let fraud = feed("fraud");
        MappingStats::add(&fraud.stats.shard("s-0").records_in, 3);
        dashboard.attach(vec![fraud.clone()], 1, 1_000);
        MappingStats::add(&fraud.stats.records_in, 7);
        dashboard.sample(2_000);
        assert_eq!(frames.borrow().state, RunState::Running);
        assert_eq!(frames.borrow().functions[0].totals.records_in, 7);
        dashboard.stop(3_000);
        let last = frames.borrow().clone();
        assert_eq!(last.state, RunState::Stopped);
        assert_eq!(last.stream.shards, 1);
        let snapshot: serde_json::Value = serde_json::from_str(&dashboard.snapshot_json()).unwrap();
        assert_eq!(snapshot["state"], "stopped");
        assert_eq!(snapshot["history"].as_array().unwrap().len(), 2);
        assert_eq!(snapshot["functions"][0]["shards"][0]["shard"], "s-0");
        assert!(snapshot["scaler"].is_null());
    }
}
