//! Tumbling-window state decoding and the window processor, on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(init: shardwise_fuzz::init(), |data: &[u8]| shardwise_fuzz::window_state(data));
