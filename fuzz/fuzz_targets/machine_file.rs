#![no_main]
//! libFuzzer on `systolic::fuzz::machine_file` (docs/validation.md, "Fuzzing").

libfuzzer_sys::fuzz_target!(|data: &[u8]| systolic::fuzz::machine_file(data));
