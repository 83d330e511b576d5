//! The Lambda Kinesis event decoder and the whole processor behind it, on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(init: shardwise_fuzz::init(), |data: &[u8]| shardwise_fuzz::event(data));
