//! Kill and resume: the runner is killed (SIGKILL) in the middle of a stream, started again on
//! the same state directory, and every record has had its effect exactly once — none lost (the
//! checkpoints), none twice (the function's idempotency over the redelivered tail).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardwise::producer::PutEntry;
use shardwise_local::stream::EmbeddedStream;

const RUNNER: &str = env!("CARGO_BIN_EXE_shardwise");
const FUNCTION: &str = env!("CARGO_BIN_EXE_shardwise-test-function");

fn put(stream: &EmbeddedStream, from: usize, to: usize) {
    let data: Vec<(String, String)> = (from..to)
        .map(|i| (format!("card-{}", i % 97), format!("{{\"id\":\"e{i}\"}}")))
        .collect();
    for chunk in data.chunks(500) {
        let entries: Vec<PutEntry<'_>> = chunk
            .iter()
            .map(|(k, d)| PutEntry {
                partition_key: k,
                explicit_hash_key: None,
                data: d.as_bytes(),
            })
            .collect();
        stream.append(&entries, shardwise_local::now_ms()).unwrap();
    }
}

fn runner(dir: &Path, until_idle: bool) -> Child {
    let mut command = Command::new(RUNNER);
    command
        .current_dir(dir)
        .args([
            "run",
            "--template",
            "none.yaml",
            "--state-dir",
            "state",
            "--shards",
            "4",
        ])
        .args(["--function", &format!("effects={FUNCTION}")])
        .args(["--batch-size", "25", "--quiet"])
        .args([
            "--env",
            &format!("TEST_FN_EFFECTS={}", dir.join("effects.txt").display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if until_idle {
        command.args(["--until-idle", "1s", "--duration", "90s"]);
    } else {
        command.args(["--duration", "90s"]);
    }
    command.spawn().unwrap()
}

fn effects(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("effects.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_killed_runner_resumes_and_every_record_takes_effect_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(
        dir.path().join("state/stream.db"),
        "shardwise-transactions",
        4,
    )
    .unwrap();
    put(&stream, 0, 3000);

    let mut first = runner(dir.path(), false);
    let started = Instant::now();
    while effects(dir.path()).len() < 600 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap(); // SIGKILL: no clean shutdown, no final checkpoint
    first.wait().unwrap();
    let at_kill = effects(dir.path()).len();
    assert!(at_kill < 3000, "killed mid-stream ({at_kill} effects)");
    put(&stream, 3000, 3500);

    let mut second = runner(dir.path(), true);
    let started = Instant::now();
    loop {
        if second.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the resumed run did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in effects(dir.path()) {
        *counts.entry(id).or_default() += 1;
    }
    let missing: Vec<usize> = (0..3500)
        .filter(|i| !counts.contains_key(&format!("e{i}")))
        .collect();
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert!(twice.is_empty(), "more than once: {twice:?}");
    assert_eq!(counts.len(), 3500);
}
