#![no_main]
//! libFuzzer on `systolic::fuzz::graph_file` (docs/validation.md, "Fuzzing").

libfuzzer_sys::fuzz_target!(|data: &[u8]| systolic::fuzz::graph_file(data));
