#![no_main]
//! libFuzzer on `systolic::fuzz::program` (docs/validation.md, "Fuzzing").

libfuzzer_sys::fuzz_target!(|data: &[u8]| systolic::fuzz::program(data));
