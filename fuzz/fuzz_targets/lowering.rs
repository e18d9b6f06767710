#![no_main]
//! libFuzzer on `systolic::fuzz::lowering` (docs/validation.md, "Fuzzing").

libfuzzer_sys::fuzz_target!(|data: &[u8]| systolic::fuzz::lowering(data));
