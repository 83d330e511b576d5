//! The KPL deaggregator, on arbitrary bytes and on arbitrary protobuf behind a valid digest.
#![no_main]

libfuzzer_sys::fuzz_target!(init: shardwise_fuzz::init(), |data: &[u8]| shardwise_fuzz::kpl(data));
