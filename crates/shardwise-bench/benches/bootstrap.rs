//! Real Lambda bootstraps against a Runtime API server: CPU per record (user and kernel), minor
//! page faults per invocation, peak RSS and start-up, for a function written the usual way and
//! for two Shardwise functions, side by side in one run.
//!
//! `cargo bench -p shardwise-bench --bench bootstrap` builds the three bootstrap binaries of this
//! package in the bench profile and runs each as Lambda runs it: a process that polls
//! `GET /2018-06-01/runtime/invocation/next` on the local runner's Runtime API server
//! (`shardwise_local::function::ProcessPool`, one instance) and posts its answer back. Events
//! hold 100, 1,000 and 3,000 ~1 KiB card transactions (25 fields, nested objects), partition
//! keys varied as `crates/shardwise/benches/pipeline.rs` varies them.
//!
//! - `usual`: `lambda_runtime::run(service_fn(..))` with `LambdaEvent<KinesisEvent>` from
//!   `aws_lambda_events`, each record's data into an owned struct of the whole transaction.
//! - `shardwise-lean`: `Processor::per_record` + `shardwise::run` (Shardwise's own Runtime API
//!   client), the handler's payload `Json<CardAmount>` (two borrowed fields); SDK config and SQS
//!   client built at start, as in a real function.
//! - `shardwise-borrowed`: the same with a payload that borrows all 25 fields.
//!
//! All three run a current-thread tokio runtime, so the comparison is of the event path.
//!
//! # Why real bootstraps
//! A library bench starts from the event bytes. A real function does not: the runtime reads the
//! body into a buffer (`lambda_runtime` then has serde_json validate and copy or deserialize the
//! whole event again before a handler sees it), and each batch-sized buffer the allocator maps
//! and unmaps every invocation costs page faults in the kernel. Neither shows in a library
//! bench; both show in the process's counters.
//!
//! # How it is measured
//! Per size, one fresh process per bootstrap. Each answers one invocation (its start-up is taken
//! then) and a few warm-up invocations, whose CPU (`/proc/<pid>/task/*/schedstat`) sets how many
//! invocations give it about `BENCH_SECONDS` (default 2.5) of CPU (`BENCH_RECORDS=1,100` picks
//! other event sizes), so that the 10 ms tick of
//! `/proc/<pid>/stat` is under 1% of the figure. Then the bootstraps take turns in rounds
//! (order rotated each round) so that all see the same machine load; a process waiting on
//! `/next` uses no CPU, so its counters read before the first round and after the last one
//! count its own invocations only:
//! - user and kernel µs/record: `utime`, `stime` of `/proc/<pid>/stat` (all threads);
//! - `sched` µs/record: the ns on CPU of `/proc/<pid>/task/*/schedstat`, a cross-check;
//! - faults/invocation: `minflt` of `/proc/<pid>/stat`;
//! - peak RSS: `VmHWM` of `/proc/<pid>/status` after the rounds (start-up included).
//!
//! Every response must be a success with no `batchItemFailures`: a bench that measures failures
//! measures nothing. Start-up is timed from just before `spawn` to the process's first
//! `GET /next` reaching the server (`ProcessPool::process`); its CPU and RSS are read while
//! it waits there. Nothing leaves the machine: the credentials are dummies (Lambda passes
//! credentials in the environment too), SQS points at a closed local port, and no shared AWS
//! config files are read.
//!
//! `BENCH_FIGURES=dir` also writes the table as `dir/bootstrap.csv`, which
//! `scripts/bench_plots.py` draws (CPU per record against batch size, per bootstrap).
//!
//! Absolute times drift ~2× on shared machines; compare the ratios of one run. Without
//! `--bench` (`cargo test --all-targets`) the binary only checks every bootstrap on small events.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shardwise_cards::generator::card_transaction_event;
use shardwise_local::function::{FunctionSpec, InvokeOutcome, ProcessPool};

struct Bootstrap {
    name: &'static str,
    binary: &'static str,
}

const BOOTSTRAPS: [Bootstrap; 3] = [
    Bootstrap {
        name: "usual",
        binary: env!("CARGO_BIN_EXE_bootstrap-usual"),
    },
    Bootstrap {
        name: "shardwise-lean",
        binary: env!("CARGO_BIN_EXE_bootstrap-lean"),
    },
    Bootstrap {
        name: "shardwise-borrowed",
        binary: env!("CARGO_BIN_EXE_bootstrap-borrowed"),
    },
];

const WARM_UP: usize = 3;
const ROUNDS: usize = 5;
/// Starts per bootstrap for the start-up line only, besides the one per size.
const EXTRA_STARTS: usize = 5;

fn make_event(records: usize) -> Vec<u8> {
    card_transaction_event(records).into_bytes()
}

fn spec(bootstrap: &Bootstrap) -> FunctionSpec {
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDBENCHBENCHBENCH0"),
        ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
        ("AWS_SESSION_TOKEN", "bench-token"),
        ("AWS_CONFIG_FILE", "/nonexistent/shardwise-bench/config"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/shardwise-bench/credentials",
        ),
        // Port 9 (discard) is closed on loopback: a dead letter would fail fast, and show.
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        (
            "DEAD_LETTER_QUEUE_URL",
            "http://127.0.0.1:9/000000000000/bench-dead-letters",
        ),
    ];
    FunctionSpec {
        name: format!("bench-{}", bootstrap.name),
        binary: PathBuf::from(bootstrap.binary),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        memory_mb: 1769,
        timeout: Duration::from_secs(60),
        // `BENCH_LOG=path` keeps the processes' output (EMF lines, errors) for a look.
        log_file: std::env::var_os("BENCH_LOG").map(PathBuf::from),
        sandbox_dir: None,
    }
}

/// Panics unless `outcome` is a success that reports no failed record.
fn check(name: &str, outcome: InvokeOutcome) {
    let InvokeOutcome::Response(body) = outcome else {
        panic!("{name}: invocation failed: {outcome:?}");
    };
    let response: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{name}: response is not JSON ({e}): {body:?}"));
    match response.get("batchItemFailures").and_then(|f| f.as_array()) {
        Some(failures) if failures.is_empty() => {}
        _ => panic!(
            "{name}: the response reports failures or is not a batch response: {}",
            String::from_utf8_lossy(&body)
        ),
    }
}

/// The counters of one process read from `/proc`.
#[derive(Debug, Clone, Default)]
struct Counters {
    utime_ticks: u64,
    stime_ticks: u64,
    minflt: u64,
    /// ns on CPU per thread id.
    sched_ns: HashMap<u32, u64>,
}

impl Counters {
    fn read(pid: u32) -> Self {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The command name may hold spaces; the fields after it do not.
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Fields counted from `state`, the 3rd of proc(5): minflt is the 10th, utime and
        // stime the 14th and 15th.
        let field = |n: usize| fields[n - 3].parse::<u64>().unwrap();
        let mut sched_ns = HashMap::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap();
            let Some(tid) = task.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            // A thread may exit between the listing and the read.
            if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
                let ns = text.split_whitespace().next().unwrap().parse().unwrap();
                sched_ns.insert(tid, ns);
            }
        }
        Self {
            utime_ticks: field(14),
            stime_ticks: field(15),
            minflt: field(10),
            sched_ns,
        }
    }

    /// CPU ns between `self` (earlier) and `later`, from the per-thread schedstat.
    fn sched_ns_until(&self, later: &Self) -> u64 {
        later
            .sched_ns
            .iter()
            .map(|(tid, ns)| ns - self.sched_ns.get(tid).copied().unwrap_or(0))
            .sum()
    }
}

/// A `/proc/<pid>/status` field in kB (`VmHWM`, `VmRSS`).
fn status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// One bootstrap's process for one size.
struct Cell {
    pool: ProcessPool,
    pid: u32,
    invocations: usize,
    before: Option<Counters>,
}

/// One bootstrap's start-up, taken while the fresh process waits on its first `/next`.
#[derive(Debug, Clone, Copy)]
struct Startup {
    to_first_next: Duration,
    cpu: Duration,
    rss_kb: u64,
}

/// Start `bootstrap` and wait for its first `/next`.
async fn start(bootstrap: &Bootstrap) -> (ProcessPool, u32, Startup) {
    let pool = ProcessPool::start(spec(bootstrap), 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(process) = pool.process(0)
            && let Some(to_first_next) = process.start_to_first_next
        {
            let counters = Counters::read(process.pid);
            let startup = Startup {
                to_first_next,
                cpu: Duration::from_nanos(Counters::default().sched_ns_until(&counters)),
                rss_kb: status_kb(process.pid, "VmRSS"),
            };
            return (pool, process.pid, startup);
        }
        assert!(
            Instant::now() < deadline,
            "{}: no GET /next within 10 s",
            bootstrap.name
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

struct Row {
    name: &'static str,
    records: usize,
    invocations: usize,
    user_us: f64,
    kernel_us: f64,
    sched_us: f64,
    faults: f64,
    peak_rss_mib: f64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it,
    // as a check that every bootstrap answers, on small events.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let cpu_per_cell = if smoke {
        Duration::from_millis(20)
    } else {
        let seconds = std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(2.5);
        Duration::from_secs_f64(seconds)
    };
    // `BENCH_RECORDS=1,100` measures other event sizes (a 1-record event shows the fixed cost of
    // an invocation).
    let sizes: Vec<usize> = match std::env::var("BENCH_RECORDS") {
        Ok(list) if !smoke => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("BENCH_RECORDS: whole numbers, comma-separated")
            })
            .collect(),
        _ if smoke => vec![10],
        _ => vec![100, 1000, 3000],
    };
    let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
    let began = Instant::now();

    let mut startups: Vec<Vec<Startup>> = vec![Vec::new(); BOOTSTRAPS.len()];
    for _ in 0..if smoke { 0 } else { EXTRA_STARTS } {
        for (bootstrap, startups) in BOOTSTRAPS.iter().zip(&mut startups) {
            let (pool, _, startup) = start(bootstrap).await;
            startups.push(startup);
            drop(pool);
        }
    }
    let mut rows = Vec::new();
    for &records in &sizes {
        let event = make_event(records);
        let mut cells = Vec::new();
        for (bootstrap, startups) in BOOTSTRAPS.iter().zip(&mut startups) {
            let (pool, pid, startup) = start(bootstrap).await;
            startups.push(startup);
            // The first invocation and the warm-up; the warm-up's CPU sets the invocations.
            check(bootstrap.name, pool.invoke(event.clone()).await);
            let warm_from = Counters::read(pid);
            for _ in 0..WARM_UP {
                check(bootstrap.name, pool.invoke(event.clone()).await);
            }
            let per_invocation =
                warm_from.sched_ns_until(&Counters::read(pid)) as f64 / WARM_UP as f64;
            let wanted = (cpu_per_cell.as_nanos() as f64 / per_invocation.max(1.0)).ceil();
            let invocations = (wanted as usize).clamp(ROUNDS * 2, 50_000).div_ceil(ROUNDS) * ROUNDS;
            cells.push(Cell {
                pool,
                pid,
                invocations,
                before: None,
            });
        }
        for cell in &mut cells {
            cell.before = Some(Counters::read(cell.pid));
        }
        for round in 0..ROUNDS {
            for offset in 0..cells.len() {
                let index = (round + offset) % cells.len();
                let cell = &cells[index];
                for _ in 0..cell.invocations / ROUNDS {
                    check(
                        BOOTSTRAPS[index].name,
                        cell.pool.invoke(event.clone()).await,
                    );
                }
            }
        }
        for (cell, bootstrap) in cells.iter().zip(&BOOTSTRAPS) {
            let after = Counters::read(cell.pid);
            let before = cell.before.as_ref().unwrap();
            let total_records = (cell.invocations * records) as f64;
            let per_record_us = |ticks: u64| ticks as f64 / ticks_per_second * 1e6 / total_records;
            rows.push(Row {
                name: bootstrap.name,
                records,
                invocations: cell.invocations,
                user_us: per_record_us(after.utime_ticks - before.utime_ticks),
                kernel_us: per_record_us(after.stime_ticks - before.stime_ticks),
                sched_us: before.sched_ns_until(&after) as f64 / 1e3 / total_records,
                faults: (after.minflt - before.minflt) as f64 / cell.invocations as f64,
                peak_rss_mib: status_kb(cell.pid, "VmHWM") as f64 / 1024.0,
            });
            assert_eq!(
                cell.pool.starts(),
                1,
                "{}: the process restarted",
                bootstrap.name
            );
        }
        // Dropping the pools stops the processes.
        drop(cells);
    }

    println!(
        "{:<19} {:>7} {:>6} {:>9} {:>9} {:>9} {:>9} {:>11} {:>12} {:>8}",
        "bootstrap",
        "records",
        "invoc",
        "user_us",
        "kernel_us",
        "total_us",
        "sched_us",
        "usual/this",
        "faults/invoc",
        "peak_MiB"
    );
    for row in &rows {
        let total = row.user_us + row.kernel_us;
        let usual = rows
            .iter()
            .find(|r| r.records == row.records && r.name == BOOTSTRAPS[0].name)
            .map_or(f64::NAN, |r| r.user_us + r.kernel_us);
        println!(
            "{:<19} {:>7} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2}x {:>12.0} {:>8.1}",
            row.name,
            row.records,
            row.invocations,
            row.user_us,
            row.kernel_us,
            total,
            row.sched_us,
            usual / total,
            row.faults,
            row.peak_rss_mib
        );
    }
    println!(
        "(µs per record: user, kernel, their sum from /proc/<pid>/stat ticks; sched from schedstat)"
    );
    for (bootstrap, startups) in BOOTSTRAPS.iter().zip(&startups) {
        let mut times: Vec<Duration> = startups.iter().map(|s| s.to_first_next).collect();
        times.sort();
        let median = times[times.len() / 2];
        let cpu = startups.iter().map(|s| s.cpu).min().unwrap_or_default();
        let rss = startups.iter().map(|s| s.rss_kb).min().unwrap_or_default();
        println!(
            "start-up {:<19} start to first /next: median {:.1} ms, min {:.1} ms of {} starts; \
             init CPU {:.1} ms; RSS waiting {:.1} MiB",
            bootstrap.name,
            median.as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
            times.len(),
            cpu.as_secs_f64() * 1e3,
            rss as f64 / 1024.0
        );
    }
    println!("wall time {:.1} s", began.elapsed().as_secs_f64());
    if let Some(dir) = std::env::var_os("BENCH_FIGURES").filter(|_| !smoke) {
        let path = PathBuf::from(dir).join("bootstrap.csv");
        let mut csv = String::from(
            "bootstrap,records,invocations,user_us,kernel_us,total_us,faults_per_invocation,peak_rss_mib\n",
        );
        for row in &rows {
            csv.push_str(&format!(
                "{},{},{},{:.3},{:.3},{:.3},{:.1},{:.1}\n",
                row.name,
                row.records,
                row.invocations,
                row.user_us,
                row.kernel_us,
                row.user_us + row.kernel_us,
                row.faults,
                row.peak_rss_mib
            ));
        }
        std::fs::write(&path, csv).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        println!("figures written to {}", path.display());
    }
}
