#![no_main]
//! libFuzzer on `systolic::fuzz::specs` (docs/validation.md, "Fuzzing").

libfuzzer_sys::fuzz_target!(|data: &[u8]| systolic::fuzz::specs(data));
