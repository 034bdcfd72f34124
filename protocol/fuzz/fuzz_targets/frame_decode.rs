#![no_main]
//! Fuzz target (placeholder until its decoder lands).
libfuzzer_sys::fuzz_target!(|_data: &[u8]| {});
