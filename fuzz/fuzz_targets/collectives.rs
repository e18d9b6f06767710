#![no_main]
//! libFuzzer on `systolic::fuzz::collectives` (docs/validation.md, "Fuzzing").

libfuzzer_sys::fuzz_target!(|data: &[u8]| systolic::fuzz::collectives(data));
