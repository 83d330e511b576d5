//! What each fuzz target checks, as plain functions: the libFuzzer binaries in `fuzz_targets/`
//! call them, and `crates/shardwise/tests/prop_decoders.rs` checks the same properties with
//! proptest in every `cargo test`.
//!
//! A target fails when the code under test panics (libFuzzer reports the panic as a crash),
//! allocates past `-malloc_limit_mb`, runs past `-timeout`, or breaks one of the properties
//! asserted below. See docs/proof.md for how they are run and what they found.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use md5::{Digest, Md5};
use shardwise::event::{DecodedBatch, KinesisEvent, parse_event};
use shardwise::kpl::{self, AggregateEntry, KPL_MAGIC, MAX_DEAGGREGATED_BYTES, UserRecord};
use shardwise::processor::Invocation;
use shardwise::retry::ExponentialBackoff;
use shardwise::testing::CountPerKey;
use shardwise::window::{WindowEvent, WindowProcessor, decode_state, encode_state, raw_state};
use shardwise::{HandlerError, InMemoryDeadLetterSink, Json, Processor, Record, RecordHandler};

/// No single allocation may exceed this many bytes, plus [`BYTES_PER_INPUT_BYTE`] per byte of
/// the input being run: hostile input must not make the code allocate from a size it claims
/// (a KPL table or a length prefix saying "4 GiB"), only in proportion to what it is.
pub const BASE_ALLOCATION_LIMIT: usize = 16 * 1024 * 1024;
/// See [`BASE_ALLOCATION_LIMIT`]. The largest legitimate ratio is a KPL aggregate of empty user
/// records: one `UserRecord` (80 bytes) per 6 input bytes, and the processor's per-record vectors.
pub const BYTES_PER_INPUT_BYTE: usize = 128;

static INPUT_LEN: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, refusing any single allocation over the limit for the current input.
/// A refused allocation aborts the process ("memory allocation of N bytes failed"), which
/// libFuzzer reports as a crash and saves the input of.
struct Bounded;

impl Bounded {
    fn allowed(size: usize) -> bool {
        let input = INPUT_LEN.load(Ordering::Relaxed);
        size <= BASE_ALLOCATION_LIMIT.saturating_add(input.saturating_mul(BYTES_PER_INPUT_BYTE))
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator, except that an allocation
// over the limit returns null, which `GlobalAlloc` permits to signal failure.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::allowed(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::allowed(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::allowed(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

/// Set the allocation limit for an input of `len` bytes.
fn bound_allocations(len: usize) {
    INPUT_LEN.store(len, Ordering::Relaxed);
}

/// One runtime for every input: building one per input would dominate the time per run.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Accepts any JSON payload; a payload that says `"fail"` fails permanently, so dead letters
/// are built from fuzzed records too.
#[derive(Debug)]
struct AnyJson;

impl<'d> RecordHandler<'d> for AnyJson {
    type Payload = Json<serde_json::Value>;

    async fn handle(
        &self,
        _record: &Record<'d>,
        payload: &Json<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        if payload.0 == serde_json::Value::String("fail".into()) {
            return Err(HandlerError::permanent("asked to fail"));
        }
        Ok(())
    }
}

/// The event decoder (`parse_event`, `DecodedBatch`) and then the whole processor.
pub fn event(data: &[u8]) {
    bound_allocations(data.len());
    let event = match parse_event::<KinesisEvent<'_>>(data) {
        Ok(event) => event,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    let batch = DecodedBatch::decode(&event.records);
    let records = batch.records(&event.records);
    // Every event record yields at least one record (a KPL aggregate one per user record; a
    // bad one, itself with its error), in order.
    assert!(records.len() >= event.records.len());
    let mut last_index = 0;
    for decoded in &records {
        let record = &decoded.record;
        assert!(record.event_index >= last_index);
        last_index = record.event_index;
        let source = &event.records[record.event_index];
        assert_eq!(
            record.sequence_number.as_str(),
            source.kinesis.sequence_number
        );
        assert!(record.data.len() <= source.kinesis.data.len());
        if let Some(error) = &decoded.error {
            assert!(!error.to_string().is_empty());
            assert_eq!(record.data, source.kinesis.data.as_bytes());
        }
        let _ = record.id().to_string();
    }

    let processor = Processor::per_record(AnyJson, InMemoryDeadLetterSink::new())
        .retry(ExponentialBackoff::none());
    let report = runtime()
        .block_on(processor.process_records(&event.records, &Invocation::unbounded("fuzz")));
    assert_eq!(report.outcomes.len(), records.len());
    // No deadline, no faults: every record is acknowledged (processed or dead-lettered).
    assert!(
        report.response.batch_item_failures.is_empty(),
        "{:?}",
        report.outcomes
    );
    let letters = processor.dead_letter_sink().letters();
    assert_eq!(letters.len(), report.counts.dead_lettered);
}

/// The KPL deaggregator: on the input as it is, and on the input as the protobuf of an
/// aggregate with the right magic and digest (random bytes almost never carry a valid MD5, so
/// without the second the fuzzer would not get past the digest check).
pub fn kpl(data: &[u8]) {
    bound_allocations(data.len() + KPL_MAGIC.len() + 16);
    check_deaggregated(data);
    let mut framed = Vec::with_capacity(KPL_MAGIC.len() + data.len() + 16);
    framed.extend_from_slice(&KPL_MAGIC);
    framed.extend_from_slice(data);
    framed.extend_from_slice(&Md5::digest(data));
    check_deaggregated(&framed);
}

fn check_deaggregated(data: &[u8]) {
    match kpl::deaggregate(data) {
        Ok(None) => assert!(!kpl::is_aggregated(data)),
        Ok(Some(users)) => {
            assert!(kpl::is_aggregated(data));
            assert!(!users.is_empty());
            let mut bytes = 0usize;
            for (i, user) in users.iter().enumerate() {
                assert_eq!(user.sub_sequence_number, i as u64);
                bytes += user.partition_key.len()
                    + user.explicit_hash_key.as_ref().map_or(0, String::len)
                    + user.data.len();
            }
            assert!(bytes <= MAX_DEAGGREGATED_BYTES);
            // What we read, written again by our own encoder, reads back the same.
            assert_eq!(round_trip(&users), users);
        }
        Err(error) => {
            assert!(kpl::is_aggregated(data));
            assert!(!error.is_retryable());
            assert!(!error.to_string().is_empty());
        }
    }
}

fn round_trip(users: &[UserRecord]) -> Vec<UserRecord> {
    let entries: Vec<AggregateEntry<'_>> = users
        .iter()
        .map(|u| AggregateEntry {
            partition_key: &u.partition_key,
            explicit_hash_key: u.explicit_hash_key.as_deref(),
            data: &u.data,
        })
        .collect();
    kpl::deaggregate(&kpl::aggregate(&entries))
        .expect("our own aggregate decodes")
        .expect("our own aggregate has the magic")
}

/// A state type with nesting, as a real window handler has.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Totals {
    count: u64,
    #[serde(default)]
    by_key: BTreeMap<String, u64>,
}

/// Window state decoding (two state types, with a round trip), the window event, and the
/// window processor on the input as an event.
pub fn window_state(data: &[u8]) {
    bound_allocations(data.len());
    if let Ok(text) = std::str::from_utf8(data) {
        state_round_trips::<BTreeMap<String, u64>>(text);
        state_round_trips::<Totals>(text);
    }
    let _ = raw_state(data);
    if let Ok(window) = parse_event::<WindowEvent<'_>>(data) {
        let _ = window.window.start.to_rfc3339();
        let _ = window.window.end.to_rfc3339();
        let processor = WindowProcessor::new(CountPerKey::default(), InMemoryDeadLetterSink::new())
            .records(|p| p.retry(ExponentialBackoff::none()))
            .state_retry(ExponentialBackoff::none());
        let result = runtime().block_on(processor.process(data, &Invocation::unbounded("fuzz")));
        if let Err(error) = result {
            assert!(!error.to_string().is_empty());
        }
    }
}

fn state_round_trips<S>(text: &str)
where
    S: serde::Serialize + serde::de::DeserializeOwned + Default + PartialEq + std::fmt::Debug,
{
    match decode_state::<S>(Some(text)) {
        Ok((state, meta)) => {
            let encoded = encode_state(&state, &meta).expect("a decoded state encodes");
            let (again, again_meta) =
                decode_state::<S>(Some(&encoded)).expect("an encoded state decodes");
            assert_eq!(again, state);
            assert_eq!(again_meta, meta);
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

/// Run once before fuzzing. With `SHARDWISE_FUZZ_SEEDS=<dir>` set, write every target's seed
/// inputs under `<dir>/<target>/` and exit instead (`make fuzz-seeds`): seeds are generated from
/// the code and the sample events, not committed, so they follow both.
pub fn init() {
    if let Some(dir) = std::env::var_os("SHARDWISE_FUZZ_SEEDS") {
        let dir = std::path::PathBuf::from(dir);
        match write_seeds(&dir) {
            Ok(count) => {
                println!("{count} seed inputs written under {}", dir.display());
                std::process::exit(0);
            }
            Err(error) => {
                eprintln!("seeds not written to {}: {error}", dir.display());
                std::process::exit(1);
            }
        }
    }
}

/// The seeds: the sample events of `events/`, events built with `shardwise::testing`, KPL
/// aggregates built with `shardwise::kpl::aggregate`, and window states.
pub fn write_seeds(out: &std::path::Path) -> std::io::Result<usize> {
    use shardwise::testing::{event_json, plain, raw_data, sequence_number};

    let mut written = 0;
    let mut write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
        written += 1;
        Ok(())
    };

    let aggregate = kpl::aggregate(&[
        AggregateEntry {
            partition_key: "a",
            explicit_hash_key: None,
            data: br#"{"n":1}"#,
        },
        AggregateEntry {
            partition_key: "b",
            explicit_hash_key: Some("340282366920938463463374607431768211455"),
            data: b"two",
        },
        AggregateEntry {
            partition_key: "a",
            explicit_hash_key: None,
            data: b"",
        },
    ]);
    write("kpl", "aggregate", &aggregate)?;
    // The protobuf alone: the target frames it with magic and digest itself.
    write(
        "kpl",
        "protobuf",
        &aggregate[KPL_MAGIC.len()..aggregate.len() - 16],
    )?;
    write("kpl", "magic-only", &KPL_MAGIC)?;

    let events = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../events");
    for entry in std::fs::read_dir(&events)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".json") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        write("event", name, &bytes)?;
        if name.starts_with("window") {
            write("window_state", name, &bytes)?;
        }
    }
    let built = event_json(&[
        plain("k1", &sequence_number(1), br#"{"n":1}"#),
        raw_data("k2", &sequence_number(2), "!!not base64!!"),
        plain("k3", &sequence_number(3), &aggregate),
        plain("k4", "9", b"\"fail\""),
        plain("k5", "10", b""),
    ]);
    write("event", "built", built.as_bytes())?;
    write("window_state", "state-map", br#"{"1": 282, "2": 715}"#)?;
    write(
        "window_state",
        "state-totals",
        br#"{"shardwise":{"opened_by":"7/1","partial":true},"count":3,"by_key":{"a":3}}"#,
    )?;
    Ok(written)
}
