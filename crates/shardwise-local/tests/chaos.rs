//! Chaos on the local pipeline: real runner and function processes, real stores, random kills.
//!
//! Records go onto a 4-shard stream in waves while `shardwise run` invokes the test function in
//! its chaos mode (the real processor, idempotency gate and dead-letter sink; an effect that is a
//! conditional put keyed by the gate's key). At random moments a function process or the whole
//! runner is SIGKILLed; a killed runner is started again on the same state directory. At the end
//! a last runner drains the stream, and the stores are read back:
//!
//! - **no record lost**: every good record has its effect, every poison record is in the
//!   dead-letter queue with its payload;
//! - **no effect duplicated**: one effect per record;
//! - **per partition key, effects in stream order**;
//! - **nothing acknowledged unsettled**: each time the runner is killed, every record at or
//!   before a shard's checkpoint already has its effect or its dead letter.
//!
//! Two set-ups: the embedded stream with the SQLite backends, and Kinesis, DynamoDB and SQS on
//! moto (`SHARDWISE_MOTO_ENDPOINT`; skipped without it unless `SHARDWISE_REQUIRE_MOTO=1`).
//! Knobs: `SHARDWISE_CHAOS_RECORDS` (default 2000), `SHARDWISE_CHAOS_KILLS` (12),
//! `SHARDWISE_CHAOS_SEED` (random; printed, so a failure can be replayed). `make chaos` runs a
//! longer schedule.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shardwise::producer::{Producer, ProducerRecord, PutOutcome, StreamWriter};
use shardwise_aws::{KinesisStreamWriter, StreamTarget};
use shardwise_local::checkpoint::CheckpointStore;
use shardwise_local::stream::{
    EmbeddedStream, KinesisSource, Position, Source, StartingPosition, sequence_cmp,
};

const RUNNER: &str = env!("CARGO_BIN_EXE_shardwise");
const FUNCTION: &str = env!("CARGO_BIN_EXE_shardwise-test-function");
const SHARDS: usize = 4;
const KEYS: usize = 61;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One record put: its identity in the stream and what it should have caused.
#[derive(Debug, Clone)]
struct Put {
    id: String,
    key: String,
    n: u64,
    poison: bool,
    data: String,
    shard: String,
    sequence: String,
}

/// What the stores hold at the end (or at a kill).
#[derive(Debug, Default)]
struct Observed {
    /// record id → (partition key, n, effect time in ns), one entry per effect item.
    effects: Vec<(String, String, u64, u128)>,
    /// record id → the dead letters' `data` fields (base64).
    dead_letters: HashMap<String, Vec<String>>,
    /// Dead letters whose payload names no record: none may exist.
    unreadable_dead_letters: Vec<String>,
}

/// The stores of one set-up.
enum Stores {
    Embedded {
        db: PathBuf,
    },
    Moto {
        config: Box<aws_config::SdkConfig>,
        effects_table: String,
        dead_letter_queue: String,
        /// Dead letters already taken off the queue (reading SQS consumes).
        drained: Vec<String>,
    },
}

impl Stores {
    async fn observe(&mut self) -> Observed {
        let mut observed = Observed::default();
        let bodies = match self {
            Stores::Embedded { db } => {
                let db = std::sync::Arc::new(shardwise_sqlite::LocalDb::open(&*db).unwrap());
                let table = shardwise_sqlite::SqliteTable::new(db.clone(), "effects");
                for (_, item) in table.scan().unwrap() {
                    observed.effects.push(effect_of(&item));
                }
                shardwise_sqlite::SqliteQueue::new(db, shardwise_sqlite::queues::DEAD_LETTERS)
                    .messages(0, 1_000_000)
                    .unwrap()
                    .into_iter()
                    .map(|m| m.body)
                    .collect::<Vec<_>>()
            }
            Stores::Moto {
                config,
                effects_table,
                dead_letter_queue,
                drained,
            } => {
                let client = aws_sdk_dynamodb::Client::new(config);
                let mut start = None;
                loop {
                    let page = client
                        .scan()
                        .table_name(effects_table.as_str())
                        .consistent_read(true)
                        .set_exclusive_start_key(start)
                        .send()
                        .await
                        .unwrap();
                    for item in page.items() {
                        observed.effects.push(effect_of(item));
                    }
                    start = page.last_evaluated_key().cloned();
                    if start.is_none() {
                        break;
                    }
                }
                // A received message stays hidden for the drain's visibility timeout, then comes
                // back: keep each body once (a real repeat differs in `requestId` and
                // `deadLetteredAt`).
                for body in shardwise_testkit::drain_queue(config, dead_letter_queue).await {
                    if !drained.contains(&body) {
                        drained.push(body);
                    }
                }
                drained.clone()
            }
        };
        for body in bodies {
            let letter: serde_json::Value = serde_json::from_str(&body).unwrap();
            let data = letter["data"].as_str().unwrap_or_default().to_owned();
            let id = base64_simd::STANDARD
                .decode_to_vec(&data)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .and_then(|v| v["id"].as_str().map(str::to_owned));
            match id {
                Some(id) => observed.dead_letters.entry(id).or_default().push(data),
                None => observed.unreadable_dead_letters.push(body),
            }
        }
        observed
    }
}

fn effect_of(item: &HashMap<String, AttributeValue>) -> (String, String, u64, u128) {
    let s = |k: &str| match item.get(k) {
        Some(AttributeValue::S(v)) => v.clone(),
        _ => String::new(),
    };
    let n = |k: &str| match item.get(k) {
        Some(AttributeValue::N(v)) => v.clone(),
        _ => String::new(),
    };
    (
        s("record_id"),
        s("partition_key"),
        n("n").parse().unwrap(),
        n("at_ns").parse().unwrap(),
    )
}

/// The records of wave `wave`: ids `c{i}`, keys round-robin, about 1 in 40 poison.
fn wave(rng: &mut StdRng, from: usize, to: usize, per_key: &mut [u64]) -> Vec<Put> {
    (from..to)
        .map(|i| {
            let key_index = rng.random_range(0..KEYS);
            let n = per_key[key_index];
            per_key[key_index] += 1;
            let poison = rng.random_ratio(1, 40);
            let id = format!("c{i}");
            let key = format!("card-{key_index}");
            let data =
                serde_json::json!({"id": id, "key": key, "n": n, "poison": poison}).to_string();
            Put {
                id,
                key,
                n,
                poison,
                data,
                shard: String::new(),
                sequence: String::new(),
            }
        })
        .collect()
}

async fn put_all<W: StreamWriter>(producer: &Producer<W>, puts: &mut [Put]) {
    let records: Vec<ProducerRecord> = puts
        .iter()
        .map(|p| ProducerRecord::new(p.key.clone(), p.data.clone().into_bytes()))
        .collect();
    let report = producer.put(&records, None).await;
    for (put, outcome) in puts.iter_mut().zip(report.outcomes) {
        match outcome {
            PutOutcome::Put {
                shard_id,
                sequence_number,
                ..
            } => {
                put.shard = shard_id;
                put.sequence = sequence_number;
            }
            PutOutcome::Failed { message, .. } => panic!("put {}: {message}", put.id),
        }
    }
}

/// How the runner is started for one set-up.
struct RunnerSetup {
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// 2: lanes, the checkpoint moves per read chunk (a killed runner redelivers a chunk);
    /// 1: the checkpoint moves after every batch.
    parallelization_factor: u32,
}

/// `shardwise run` on `dir/state`, as every schedule here starts it: quick polls and retries,
/// no live view, stderr to `log` (or nowhere). `until_idle`: a drain that ends by itself after
/// that much quiet; its own limit is below the tests' 240 s, so a drain that runs out shows as
/// such, not as lost records.
fn shardwise_run(dir: &Path, log: Option<&str>, until_idle: Option<&str>) -> Command {
    let mut command = Command::new(RUNNER);
    command
        .current_dir(dir)
        .args(["run", "--state-dir", "state", "--quiet"])
        .args(["--poll-interval", "50ms", "--retry-backoff", "50ms"])
        .stdout(Stdio::null())
        .stderr(log.map_or_else(Stdio::null, |name| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .unwrap()
                .into()
        }));
    match until_idle {
        Some(quiet) => command.args(["--until-idle", quiet, "--duration", "200s"]),
        None => command.args(["--duration", "240s"]),
    };
    command
}

impl RunnerSetup {
    fn start(&self, until_idle: bool) -> Running {
        let mut command = shardwise_run(&self.dir, None, until_idle.then_some("2s"));
        command
            .args(["--template", "none.yaml"])
            .args(&self.args)
            .args(["--function", &format!("chaos={FUNCTION}")])
            .args(["--batch-size", "40", "--bisect", "true"])
            .args([
                "--parallelization-factor",
                &self.parallelization_factor.to_string(),
            ])
            .args(["--report-batch-item-failures", "true"])
            .args(["--env", "TEST_FN_MODE=chaos"])
            .args([
                "--env",
                &format!(
                    "TEST_FN_ATTEMPTS={}",
                    self.dir.join("attempts.txt").display()
                ),
            ])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Running(command.spawn().unwrap())
    }
}

/// Processes whose parent is `pid` (the runner's function instances).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        // Fields after the name: state, ppid, …
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) && state != Some("Z") {
            out.push(child);
        }
    }
    out
}

fn signal(pid: u32, signal: rustix::process::Signal) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|pid| rustix::process::kill_process(pid, signal).is_ok())
}

fn sigkill(pid: u32) -> bool {
    signal(pid, rustix::process::Signal::KILL)
}

/// A running `shardwise run`. Dropped (a failing test), it is SIGKILLed with its function
/// processes, so nothing outlives the test.
struct Running(Child);

impl Running {
    fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL the runner the way a crash would, its function processes frozen first (SIGSTOP)
    /// so that none of them adds an effect while the stores are checked. [`Frozen::thaw`] lets
    /// them go on, as orphans a killed runner leaves: the next runner must stop them itself.
    fn crash(&mut self) -> Frozen {
        let orphans = children(self.id());
        for &pid in &orphans {
            signal(pid, rustix::process::Signal::STOP);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        Frozen(orphans)
    }

    /// Wait for a runner started with `--until-idle` to end by itself.
    async fn finish(&mut self, name: &str, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "chaos[{name}]: the draining run ended with {status}"
                );
                return;
            }
            assert!(
                Instant::now() < until,
                "chaos[{name}]: the draining run did not finish"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            for pid in children(self.0.id()) {
                sigkill(pid);
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Function processes of a killed runner, stopped while the stores are read.
struct Frozen(Vec<u32>);

impl Frozen {
    fn thaw(mut self) {
        for pid in std::mem::take(&mut self.0) {
            signal(pid, rustix::process::Signal::CONT);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            sigkill(pid);
        }
    }
}

/// What the read-back found; every list must be empty.
#[derive(Debug, Default)]
struct Findings {
    seed: u64,
    lost: Vec<String>,
    duplicated: Vec<String>,
    out_of_order: Vec<String>,
    acknowledged_unsettled: Vec<String>,
    good_records_dead_lettered: Vec<String>,
    /// Records the producer was told were put but that the stream does not hold: a fault of
    /// the stream (or emulator), not of the pipeline, but it would show as loss.
    not_in_stream: Vec<String>,
    /// After the drain: records past their shard's checkpoint (never acknowledged).
    not_acknowledged_at_end: Vec<String>,
    /// Dead letters of no record put.
    unexpected_dead_letters: Vec<String>,
}

impl Findings {
    fn assert_clean(&self, name: &str) {
        let seed = self.seed;
        assert!(
            self.not_in_stream.is_empty(),
            "chaos[{name}] seed {seed}: the stream lacks {:?}",
            self.not_in_stream
        );
        assert!(
            self.lost.is_empty(),
            "chaos[{name}] seed {seed}: lost {:?}",
            self.lost
        );
        assert!(
            self.duplicated.is_empty(),
            "chaos[{name}] seed {seed}: duplicated {:?}",
            self.duplicated
        );
        assert!(
            self.out_of_order.is_empty(),
            "chaos[{name}] seed {seed}: out of order {:?}",
            self.out_of_order
        );
        assert!(
            self.acknowledged_unsettled.is_empty(),
            "chaos[{name}] seed {seed}: acknowledged unsettled {:?}",
            self.acknowledged_unsettled
        );
        assert!(
            self.good_records_dead_lettered.is_empty(),
            "chaos[{name}] seed {seed}: dead-lettered {:?}",
            self.good_records_dead_lettered
        );
        assert!(
            self.not_acknowledged_at_end.is_empty(),
            "chaos[{name}] seed {seed}: never acknowledged {:?}",
            self.not_acknowledged_at_end
        );
        assert!(
            self.unexpected_dead_letters.is_empty(),
            "chaos[{name}] seed {seed}: dead letters of no record {:?}",
            self.unexpected_dead_letters
        );
    }
}

/// Handler attempts so far, and the repeats among them that the conditional put absorbed.
fn attempts(dir: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(dir.join("attempts.txt")).unwrap_or_default();
    let absorbed = text.lines().filter(|l| l.starts_with('=')).count();
    (text.lines().count() - absorbed, absorbed)
}

/// What the schedule did.
#[derive(Debug, Default)]
struct Tally {
    runner_kills: usize,
    function_kills: usize,
    checkpoint_checks: usize,
    /// Records found at or before a checkpoint, summed over the checks.
    records_checked: usize,
    acknowledged_unsettled: Vec<String>,
    not_acknowledged_at_end: Vec<String>,
}

/// Every record at or before its shard's checkpoint must have taken effect or be dead-lettered.
/// With `all_acknowledged` (after the drain), every record must be at or before it, too.
async fn check_checkpoints(
    dir: &Path,
    stores: &mut Stores,
    puts: &[Put],
    tally: &mut Tally,
    all_acknowledged: bool,
) {
    let checkpoints = CheckpointStore::open(dir.join("state/runner.db")).unwrap();
    let observed = stores.observe().await;
    let effected: std::collections::HashSet<&str> = observed
        .effects
        .iter()
        .map(|(id, ..)| id.as_str())
        .collect();
    let mut cache: HashMap<String, Option<String>> = HashMap::new();
    for put in puts.iter().filter(|p| !p.sequence.is_empty()) {
        let checkpoint = cache.entry(put.shard.clone()).or_insert_with(|| {
            checkpoints
                .load("chaos", &put.shard)
                .unwrap()
                .sequence_number
        });
        let acknowledged = checkpoint
            .as_deref()
            .is_some_and(|checkpoint| sequence_cmp(&put.sequence, checkpoint).is_le());
        if all_acknowledged && !acknowledged {
            tally.not_acknowledged_at_end.push(put.id.clone());
        }
        tally.records_checked += usize::from(acknowledged);
        let settled =
            effected.contains(put.id.as_str()) || observed.dead_letters.contains_key(&put.id);
        if acknowledged && !settled {
            tally.acknowledged_unsettled.push(put.id.clone());
        }
    }
    tally.checkpoint_checks += 1;
}

/// Run the schedule: half the records first and a runner kill in the middle of that backlog
/// (the deterministic worst case: a whole read chunk in flight), then `kills` random events
/// between waves of the other half, then a drain. Returns what the stores showed.
async fn chaos<W: StreamWriter>(
    name: &str,
    producer: Producer<W>,
    source: Source,
    setup: RunnerSetup,
    mut stores: Stores,
    records: usize,
    kills: usize,
) -> Findings {
    let seed = knob("SHARDWISE_CHAOS_SEED", rand::random::<u32>() as u64);
    eprintln!(
        "chaos[{name}]: seed {seed} (SHARDWISE_CHAOS_SEED={seed} replays the schedule), {records} records, {kills} kills"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    // Which processes die depends on how many are up at that moment: drawn from their own
    // generator, so the records and the schedule replay from the seed whatever the timing.
    let mut victims_rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
    let started = Instant::now();
    let mut per_key = vec![0u64; KEYS];
    let mut puts: Vec<Put> = Vec::new();
    let mut tally = Tally::default();
    let mut opening = wave(&mut rng, 0, records / 2, &mut per_key);
    put_all(&producer, &mut opening).await;
    puts.extend(opening);
    let mut runner = setup.start(false);
    let opened = Instant::now();
    while attempts(&setup.dir).0 < records / 10 {
        assert!(
            opened.elapsed() < Duration::from_secs(120),
            "chaos[{name}]: no progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let frozen = runner.crash();
    tally.runner_kills += 1;
    check_checkpoints(&setup.dir, &mut stores, &puts, &mut tally, false).await;
    frozen.thaw();
    runner = setup.start(false);
    for k in 0..kills {
        let from = puts.len();
        let to = records / 2 + (records - records / 2) * (k + 1) / (kills + 1);
        let mut batch = wave(&mut rng, from, to, &mut per_key);
        put_all(&producer, &mut batch).await;
        puts.extend(batch);
        // Soon enough after the wave that its batches are often in flight.
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..600))).await;
        let kill_runner = rng.random_ratio(2, 5);
        let victims = rng.random_range(1..=2usize);
        if kill_runner {
            // SIGKILL: no final checkpoint, function processes orphaned.
            let frozen = runner.crash();
            tally.runner_kills += 1;
            check_checkpoints(&setup.dir, &mut stores, &puts, &mut tally, false).await;
            frozen.thaw();
            runner = setup.start(false);
        } else {
            let mut instances = children(runner.id());
            instances.shuffle(&mut victims_rng);
            for pid in instances.into_iter().take(victims) {
                tally.function_kills += usize::from(sigkill(pid));
            }
        }
    }
    let mut last = wave(&mut rng, puts.len(), records, &mut per_key);
    put_all(&producer, &mut last).await;
    puts.extend(last);
    // Let the running runner go on a little, then kill it once more and drain with a fresh one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = runner.crash();
    tally.runner_kills += 1;
    check_checkpoints(&setup.dir, &mut stores, &puts, &mut tally, false).await;
    frozen.thaw();
    let mut drain = setup.start(true);
    drain.finish(name, Duration::from_secs(240)).await;
    check_checkpoints(&setup.dir, &mut stores, &puts, &mut tally, true).await;

    // The stores, read back.
    let observed = stores.observe().await;
    let mut effects_of: HashMap<&str, usize> = HashMap::new();
    let mut effect_fields: HashMap<&str, (&str, u64)> = HashMap::new();
    for (id, key, n, _) in &observed.effects {
        *effects_of.entry(id.as_str()).or_default() += 1;
        effect_fields.insert(id.as_str(), (key.as_str(), *n));
    }
    let mut lost = Vec::new();
    let mut duplicated = Vec::new();
    let mut wrongly_dead_lettered = Vec::new();
    let mut dead_letters_repeated = 0;
    for put in &puts {
        let effects = effects_of.get(put.id.as_str()).copied().unwrap_or(0);
        let letters = observed
            .dead_letters
            .get(&put.id)
            .map_or(&[][..], Vec::as_slice);
        if put.poison {
            let expected = base64_simd::STANDARD.encode_to_string(put.data.as_bytes());
            if effects > 0 {
                duplicated.push(format!("{} (poison, took effect)", put.id));
            }
            if letters.is_empty() || letters.iter().any(|d| *d != expected) {
                lost.push(format!(
                    "{} (poison: {} dead letters, payload kept: {})",
                    put.id,
                    letters.len(),
                    letters.iter().all(|d| *d == expected)
                ));
            }
            dead_letters_repeated += letters.len().saturating_sub(1);
        } else {
            // The effect saw the record the stream delivered: its partition key and payload.
            if let Some(fields) = effect_fields.get(put.id.as_str()) {
                assert_eq!(
                    *fields,
                    (put.key.as_str(), put.n),
                    "chaos[{name}]: effect of {}",
                    put.id
                );
            }
            match effects {
                0 => lost.push(put.id.clone()),
                1 => {}
                n => duplicated.push(format!("{} ({n} effects)", put.id)),
            }
            if !letters.is_empty() {
                wrongly_dead_lettered.push(put.id.clone());
            }
        }
    }
    // The stream itself, read back: every record the producer was told is there, is there.
    let in_stream = read_back(&source).await;
    let not_in_stream: Vec<String> = puts
        .iter()
        .filter(|p| in_stream.get(&(p.shard.clone(), p.sequence.clone())) != Some(&p.data))
        .map(|p| format!("{} ({} {})", p.id, p.shard, p.sequence))
        .collect();
    // Per key, effects in stream order (a key's records are on one shard).
    let position: HashMap<&str, &Put> = puts.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut by_key: BTreeMap<&str, Vec<(u128, &str)>> = BTreeMap::new();
    for (id, key, _, at) in &observed.effects {
        by_key
            .entry(key.as_str())
            .or_default()
            .push((*at, id.as_str()));
    }
    let mut out_of_order = Vec::new();
    for (key, mut effects) in by_key {
        effects.sort();
        let sequences: Vec<&str> = effects
            .iter()
            .filter_map(|(_, id)| position.get(id).map(|p| p.sequence.as_str()))
            .collect();
        if let Some(pair) = sequences
            .windows(2)
            .find(|w| sequence_cmp(w[0], w[1]).is_ge())
        {
            out_of_order.push(format!("{key}: {} took effect before {}", pair[0], pair[1]));
        }
    }
    let (attempts, absorbed) = attempts(&setup.dir);
    let poison = puts.iter().filter(|p| p.poison).count();
    eprintln!(
        "chaos[{name}]: {} records ({poison} poison) on {SHARDS} shards, {} runner kills, {} function kills, \
         {} checkpoint checks over {} acknowledged records, {:.0} s",
        puts.len(),
        tally.runner_kills,
        tally.function_kills,
        tally.checkpoint_checks,
        tally.records_checked,
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "chaos[{name}]: effects {} from {attempts} handler attempts: {absorbed} repeats absorbed by the \
         conditional put, {} ended before their put (killed, or the store failed); dead letters {} ({dead_letters_repeated} repeated)",
        observed.effects.len(),
        attempts.saturating_sub(observed.effects.len() + absorbed),
        observed.dead_letters.values().map(Vec::len).sum::<usize>(),
    );
    eprintln!(
        "chaos[{name}]: records lost: {}, effects duplicated: {}, out of order: {}, acknowledged unsettled: {}, \
         good records dead-lettered: {}, put but not in the stream: {}",
        lost.len(),
        duplicated.len(),
        out_of_order.len(),
        tally.acknowledged_unsettled.len(),
        wrongly_dead_lettered.len(),
        not_in_stream.len(),
    );
    // The drain acknowledged everything, so the last check covered every record.
    assert!(
        tally.records_checked >= puts.len() || !tally.not_acknowledged_at_end.is_empty(),
        "chaos[{name}]: the checkpoint checks saw {} records",
        tally.records_checked
    );
    let ids: std::collections::HashSet<&str> = puts.iter().map(|p| p.id.as_str()).collect();
    let mut unexpected_dead_letters = observed.unreadable_dead_letters.clone();
    unexpected_dead_letters.extend(
        observed
            .dead_letters
            .keys()
            .filter(|id| !ids.contains(id.as_str()))
            .cloned(),
    );
    Findings {
        seed,
        lost,
        duplicated,
        out_of_order,
        acknowledged_unsettled: tally.acknowledged_unsettled,
        good_records_dead_lettered: wrongly_dead_lettered,
        not_in_stream,
        not_acknowledged_at_end: tally.not_acknowledged_at_end,
        unexpected_dead_letters,
    }
}

/// Every record of every shard: (shard, sequence number) → data.
async fn read_back(source: &Source) -> HashMap<(String, String), String> {
    let mut out = HashMap::new();
    for shard in source.shards().await.unwrap() {
        let mut reader = source
            .open(&shard, Position::Start(StartingPosition::TrimHorizon))
            .await
            .unwrap();
        loop {
            let batch = reader.read(10_000).await.unwrap();
            if batch.records.is_empty() {
                break;
            }
            for record in batch.records {
                out.insert(
                    (shard.clone(), record.sequence_number),
                    String::from_utf8_lossy(&record.data).into_owned(),
                );
            }
        }
    }
    out
}

fn records() -> usize {
    knob("SHARDWISE_CHAOS_RECORDS", 2000) as usize
}

fn kills() -> usize {
    knob("SHARDWISE_CHAOS_KILLS", 12) as usize
}

fn embedded(
    dir: &Path,
    env: Vec<(String, String)>,
) -> (Producer<EmbeddedStream>, Source, RunnerSetup, Stores) {
    let open = || {
        EmbeddedStream::open(
            dir.join("state/stream.db"),
            "shardwise-transactions",
            SHARDS as u32,
        )
        .unwrap()
    };
    let stream = open();
    let source = Source::Embedded(std::sync::Arc::new(open()));
    let mut args = vec!["--shards".to_owned(), SHARDS.to_string()];
    for (key, value) in env {
        args.extend(["--env".to_owned(), format!("{key}={value}")]);
    }
    let setup = RunnerSetup {
        dir: dir.to_path_buf(),
        args,
        env: vec![],
        parallelization_factor: 2,
    };
    let stores = Stores::Embedded {
        db: dir.join("state/local.db"),
    };
    (Producer::new(stream), source, setup, stores)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_stream_and_sqlite_stores_survive_random_kills() {
    let dir = tempfile::tempdir().unwrap();
    // The embedded stores answer in microseconds; a handler's usual I/O time keeps invocations
    // in flight long enough for kills to find them.
    let delay = vec![("TEST_FN_CHAOS_DELAY_MS".to_owned(), "2".to_owned())];
    let (producer, source, setup, stores) = embedded(dir.path(), delay);
    chaos(
        "embedded",
        producer,
        source,
        setup,
        stores,
        records(),
        kills(),
    )
    .await
    .assert_clean("embedded");
}

/// The checks are not vacuous: the same schedule against a function without idempotency (no
/// gate, no conditional effect) must show the redelivered records taking effect twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chaos_checks_catch_a_function_without_idempotency() {
    let dir = tempfile::tempdir().unwrap();
    let sabotage = vec![(
        "TEST_FN_CHAOS_SABOTAGE".to_owned(),
        "no-idempotency".to_owned(),
    )];
    let (producer, source, setup, stores) = embedded(dir.path(), sabotage);
    let findings = chaos("sabotaged", producer, source, setup, stores, 1000, 3).await;
    assert!(
        !findings.duplicated.is_empty(),
        "a runner killed mid-backlog redelivers effected records: {findings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_dynamodb_and_sqs_on_moto_survive_random_kills() {
    let Some(config) = shardwise_testkit::moto_config().await else {
        return;
    };
    let endpoint = std::env::var("SHARDWISE_MOTO_ENDPOINT").unwrap();
    let kinesis = aws_sdk_kinesis::Client::new(&config);
    let stream = shardwise_testkit::unique_name("chaos");
    kinesis
        .create_stream()
        .stream_name(&stream)
        .shard_count(SHARDS as i32)
        .send()
        .await
        .unwrap();
    use shardwise_testkit::KeyType;
    let idempotency =
        shardwise_testkit::create_table(&config, "chaos-idem", &[("id", KeyType::Hash)]).await;
    let effects_table =
        shardwise_testkit::create_table(&config, "chaos-effects", &[("id", KeyType::Hash)]).await;
    let dead_letter_queue = shardwise_testkit::create_queue(&config, "chaos-dlq").await;
    let dir = tempfile::tempdir().unwrap();
    let setup = RunnerSetup {
        dir: dir.path().to_path_buf(),
        args: vec![
            "--source".into(),
            "kinesis".into(),
            "--stream".into(),
            stream.clone(),
            "--backend".into(),
            "aws".into(),
            "--env".into(),
            format!("IDEMPOTENCY_TABLE={idempotency}"),
            "--env".into(),
            format!("EFFECTS_TABLE={effects_table}"),
            "--env".into(),
            format!("DEAD_LETTER_QUEUE_URL={dead_letter_queue}"),
        ],
        env: vec![
            ("AWS_ENDPOINT_URL".into(), endpoint),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ],
        // Per-batch checkpoints: with moto's slower stores a read chunk rarely completes
        // between two kills, so chunk checkpoints would leave the kill-time checks nothing
        // acknowledged to look at. The embedded set-up covers lanes and chunk checkpoints.
        parallelization_factor: 1,
    };
    let stores = Stores::Moto {
        config: Box::new(config.clone()),
        effects_table,
        dead_letter_queue,
        drained: Vec::new(),
    };
    let source = Source::Kinesis(std::sync::Arc::new(
        KinesisSource::connect(kinesis.clone(), &stream)
            .await
            .unwrap(),
    ));
    // One PutRecords call at a time: moto's Kinesis assigns a sequence number as "the shard's
    // highest plus one" without a lock, so concurrent calls can give two records one number and
    // keep only one of them (the read-back below caught exactly that). Kinesis itself has no
    // such limit; the producer's default is 4 calls in flight.
    let producer = Producer::new(KinesisStreamWriter::new(
        kinesis,
        StreamTarget::Name(stream),
    ))
    .max_in_flight(1);
    chaos("moto", producer, source, setup, stores, records(), kills())
        .await
        .assert_clean("moto");
}

/// A card transaction put for the real functions, and what it should cause.
struct Transaction {
    id: String,
    card: String,
    data: String,
    /// Not JSON: both functions must dead-letter it.
    poison: bool,
    /// At the blocklisted merchant: fraud must alert on it exactly once.
    blocked: bool,
    /// What aggregation must count it under, and add up (thousandths).
    category: &'static str,
    amount_milli: i64,
}

/// Transaction `i`: about 1 in 50 is poison, 1 in 30 at the blocklisted merchant.
fn transaction(rng: &mut StdRng, i: usize) -> Transaction {
    let id = format!("tx-{i}");
    let card = format!("card-{:04}", rng.random_range(0..300));
    if rng.random_ratio(1, 50) {
        let data = format!("{{\"transaction_id\":\"{id}\", not json");
        return Transaction {
            id,
            card,
            data,
            poison: true,
            blocked: false,
            category: "",
            amount_milli: 0,
        };
    }
    let blocked = rng.random_ratio(1, 30);
    let merchant = if blocked {
        BLOCKED_MERCHANT.to_owned()
    } else {
        format!("m-{:05}", rng.random_range(0..400))
    };
    let category = ["5411", "5812", "5999", "4111"][rng.random_range(0..4)];
    let cents: u32 = rng.random_range(100..20_000);
    let data = serde_json::json!({
        "transaction_id": id,
        "card_id": card,
        "merchant_id": merchant,
        "merchant_category": category,
        "amount": f64::from(cents) / 100.0,
        "currency": "EUR",
        "country": "DE",
        "lat": 52.52,
        "lon": 13.405,
        "timestamp": "2026-11-26T10:00:00Z",
        "channel": "pos",
    })
    .to_string();
    Transaction {
        id,
        card,
        data,
        poison: false,
        blocked,
        category,
        amount_milli: i64::from(cents) * 10,
    }
}

const BLOCKED_MERCHANT: &str = "m-blocked-0001";

/// `fraud` and `aggregation`, the real binaries with their local backends, each under its own
/// runner on one state directory (aggregation's tumbling window shortened to 2 s), killed at
/// random like the test function above. Checked from the stores: fraud alerted on every
/// blocklisted transaction and never twice on one; aggregation's window items add up, per
/// merchant category, to exactly the good transactions put (nothing counted twice or missed);
/// each function dead-lettered every poison record with its payload.
///
/// Needs the binaries built with `--features fraud/local,aggregation/local` (`make local-build`)
/// in `SHARDWISE_FUNCTIONS_BIN_DIR`; `make test` provides them, and `SHARDWISE_REQUIRE_FUNCTIONS=1`
/// makes their absence a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_functions_survive_random_kills() {
    let Some(bin_dir) = std::env::var_os("SHARDWISE_FUNCTIONS_BIN_DIR").map(PathBuf::from) else {
        assert!(
            std::env::var("SHARDWISE_REQUIRE_FUNCTIONS").as_deref() != Ok("1"),
            "SHARDWISE_REQUIRE_FUNCTIONS=1 but SHARDWISE_FUNCTIONS_BIN_DIR is not set"
        );
        eprintln!("skipped: SHARDWISE_FUNCTIONS_BIN_DIR is not set (make test sets it)");
        return;
    };
    let bin_dir = std::path::absolute(bin_dir).unwrap();
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../template.yaml");
    let records = knob("SHARDWISE_CHAOS_FUNCTION_RECORDS", 1500) as usize;
    let kills = kills();
    let seed = knob("SHARDWISE_CHAOS_SEED", rand::random::<u32>() as u64);
    eprintln!("chaos[functions]: seed {seed}, {records} records, {kills} kills");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut victims_rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(
        dir.path().join("state/stream.db"),
        "shardwise-transactions",
        SHARDS as u32,
    )
    .unwrap();
    let runner = |function: &str, extra: &[&str], until_idle: bool| {
        let log = format!("runner-{function}.log");
        let mut command = shardwise_run(dir.path(), Some(&log), until_idle.then_some("3s"));
        command
            .args(["--shards", &SHARDS.to_string()])
            .arg("--template")
            .arg(&template)
            .arg("--bin-dir")
            .arg(&bin_dir)
            .args(["--function", function])
            .args([
                "--env",
                &format!("FRAUD_BLOCKED_MERCHANTS={BLOCKED_MERCHANT}"),
            ])
            .args(["--env", "RUST_LOG=warn"])
            .args(extra);
        Running(command.spawn().unwrap())
    };
    let window: &[&str] = &["--tumbling-window", "2s"];
    let start = |which: usize| {
        if which == 0 {
            runner("fraud", &[], false)
        } else {
            runner("aggregation", window, false)
        }
    };
    let started = Instant::now();
    let mut runners = [start(0), start(1)];
    let mut puts: Vec<Transaction> = Vec::new();
    let (mut runner_kills, mut function_kills) = (0, 0);
    for k in 0..=kills {
        let to = records * (k + 1) / (kills + 1);
        let wave: Vec<_> = (puts.len()..to).map(|i| transaction(&mut rng, i)).collect();
        let entries: Vec<shardwise::producer::PutEntry<'_>> = wave
            .iter()
            .map(|tx| shardwise::producer::PutEntry {
                partition_key: &tx.card,
                explicit_hash_key: None,
                data: tx.data.as_bytes(),
            })
            .collect();
        stream.append(&entries, shardwise_local::now_ms()).unwrap();
        puts.extend(wave);
        if k == kills {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..800))).await;
        for (r, name) in runners.iter_mut().zip(["fraud", "aggregation"]) {
            if let Some(status) = r.0.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.path().join(format!("runner-{name}.log")));
                panic!("the {name} runner exited by itself ({status}): {log:?}");
            }
        }
        let which = rng.random_range(0..2);
        if rng.random_ratio(2, 5) {
            runners[which].crash().thaw();
            runners[which] = start(which);
            runner_kills += 1;
        } else {
            let mut instances = children(runners[which].id());
            instances.shuffle(&mut victims_rng);
            if let Some(pid) = instances.first() {
                function_kills += usize::from(sigkill(*pid));
            }
        }
    }
    for r in &mut runners {
        r.crash().thaw();
    }
    let mut drains = [
        runner("fraud", &[], true),
        runner("aggregation", window, true),
    ];
    for drain in &mut drains {
        drain.finish("functions", Duration::from_secs(240)).await;
    }

    let db = std::sync::Arc::new(
        shardwise_sqlite::LocalDb::open(dir.path().join("state/local.db")).unwrap(),
    );
    let queue = |name: &str| {
        shardwise_sqlite::SqliteQueue::new(db.clone(), name)
            .messages(0, 1_000_000)
            .unwrap()
            .into_iter()
            .map(|m| serde_json::from_str::<serde_json::Value>(&m.body).unwrap())
            .collect::<Vec<_>>()
    };
    // fraud: one alert per blocklisted transaction, none twice.
    let mut alerts: HashMap<String, usize> = HashMap::new();
    for alert in queue(shardwise_sqlite::queues::ALERTS) {
        *alerts
            .entry(
                alert["transactionId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += 1;
    }
    let alerted_twice: Vec<&String> = alerts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(t, _)| t)
        .collect();
    let blocked: Vec<&String> = puts.iter().filter(|t| t.blocked).map(|t| &t.id).collect();
    let not_alerted: Vec<&String> = blocked
        .iter()
        .copied()
        .filter(|t| !alerts.contains_key(t.as_str()))
        .collect();
    // Both functions: every poison record dead-lettered with its payload.
    let mut letters: HashMap<(String, String), usize> = HashMap::new();
    for letter in queue(shardwise_sqlite::queues::DEAD_LETTERS) {
        let function = letter["functionName"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let data = letter["data"].as_str().unwrap_or_default().to_owned();
        *letters.entry((function, data)).or_default() += 1;
    }
    let functions: std::collections::BTreeSet<&str> =
        letters.keys().map(|(f, _)| f.as_str()).collect();
    let poison: Vec<String> = puts
        .iter()
        .filter(|t| t.poison)
        .map(|t| base64_simd::STANDARD.encode_to_string(t.data.as_bytes()))
        .collect();
    let mut poison_missing = Vec::new();
    for function in ["fraud", "aggregation"] {
        for data in &poison {
            if !letters.contains_key(&(function.to_owned(), data.clone())) {
                poison_missing.push(format!("{function}: {data}"));
            }
        }
    }
    // aggregation: per category, the window items add up to the good transactions.
    let mut expected: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for tx in puts.iter().filter(|t| !t.poison) {
        let entry = expected.entry(tx.category.to_owned()).or_default();
        entry.0 += 1;
        entry.1 += tx.amount_milli;
    }
    let mut got: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    let items = shardwise_sqlite::SqliteTable::new(db.clone(), "aggregates")
        .scan()
        .unwrap();
    for (_, item) in &items {
        let json = shardwise_sqlite::item_to_json(item);
        let number = |k: &str| {
            json[k]["N"]
                .as_str()
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let entry = got
            .entry(
                json["merchant_category"]["S"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default();
        entry.0 += number("count") as u64;
        // `sum` is stored in units; thousandths, rounded, are what the function added up.
        entry.1 += (number("sum") * 1000.0).round() as i64;
    }
    eprintln!(
        "chaos[functions]: {} transactions ({} poison, {} blocklisted) on {SHARDS} shards, {runner_kills} runner kills, \
         {function_kills} function kills, {:.0} s",
        puts.len(),
        poison.len(),
        blocked.len(),
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "chaos[functions]: fraud: {} alerts, {} blocklisted not alerted, {} alerted twice; aggregation: {} window items, \
         per category (count, sum) expected {expected:?}, got {got:?}; dead letters from {functions:?}, {} missing",
        alerts.values().sum::<usize>(),
        not_alerted.len(),
        alerted_twice.len(),
        items.len(),
        poison_missing.len()
    );
    if std::env::var_os("SHARDWISE_CHAOS_KEEP").is_some() {
        eprintln!("chaos[functions]: state kept in {}", dir.keep().display());
    }
    assert!(
        not_alerted.is_empty(),
        "seed {seed}: no alert for {not_alerted:?}"
    );
    assert!(
        alerted_twice.is_empty(),
        "seed {seed}: alerted twice: {alerted_twice:?}"
    );
    assert_eq!(got, expected, "seed {seed}: aggregates");
    assert!(
        poison_missing.is_empty(),
        "seed {seed}: not dead-lettered: {poison_missing:?}"
    );
}
