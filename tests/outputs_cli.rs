//! Output files and options as a user meets them: every output path is checked before any
//! work, so a command that cannot write one of its outputs writes none of them; files are
//! written atomically; an option that does not apply is an error, never ignored.

mod common;

use common::{fails, ok};

#[test]
fn a_bad_output_path_fails_before_any_work_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("y.safetensors");
    let (o, missing) = (out.to_str().unwrap(), "/no/such/folder/w.safetensors");
    let e = fails(&["run", "digits_cnn", "--batch", "2", "--output", o, "--save-weights", missing]);
    assert!(e.contains("--save-weights") && e.contains("/no/such/folder") && e.contains("does not exist"), "{e}");
    assert!(!out.exists(), "--output was written although the command failed");
    let dir = tmp.path().to_str().unwrap();
    let e = fails(&["simulate", "digits_cnn", "--batch", "8", "--trace", dir]);
    assert!(e.contains("--trace") && e.contains("is a folder"), "{e}");
    let e = fails(&["export", "digits_cnn", "--out", "/no/such/folder/m.ron"]);
    assert!(e.starts_with("error: --out /no/such/folder/m.ron"), "{e}");
    let e = fails(&["compile", "digits_cnn", "--emit", "/no/such/folder/p.json"]);
    assert!(e.contains("--emit"), "{e}");
}

#[test]
fn traces_emitted_programs_and_plots_are_written_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("t.json");
    ok(&["simulate", "digits_cnn", "--batch", "8", "--trace", trace.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    assert!(v.is_object() || v.is_array());
    let emit = tmp.path().join("p.json");
    ok(&["compile", "digits_cnn", "--batch", "8", "--emit", emit.to_str().unwrap()]);
    assert!(serde_json::from_slice::<serde_json::Value>(&std::fs::read(&emit).unwrap()).is_ok());
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "temporaries left behind: {names:?}");
}

#[test]
fn options_that_do_not_apply_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("y.safetensors");
    let o = out.to_str().unwrap();
    for (option, value) in [("--machine", "nosuch"), ("--precision", "nonsense"), ("--set", "core.nosuch=1")] {
        let e = fails(&["run", "digits_cnn", "--output", o, option, value]);
        assert!(e.contains(&format!("{option} applies to the simulated TPU")), "{e}");
    }
    let e = fails(&["compile", "digits_cnn", "--optimizer", "adam"]);
    assert!(e.contains("--optimizer applies to a training step: add --train"), "{e}");
    let e = fails(&["compare", "digits_cnn", "--labels", o]);
    assert!(e.contains("--labels applies to a training step"), "{e}");
    // The defaults still hold where they apply.
    ok(&["run", "digits_cnn", "--output", o, "--backend", "tpu"]);
}

#[test]
fn negative_numbers_are_values_refused_by_their_option() {
    let out = common::systolic(&["run", "digits_cnn", "--batch", "-1", "--output", "/tmp/never.safetensors"]);
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(e.contains("invalid value '-1' for '--batch"), "{e}");
    assert!(!e.contains("-- -1"), "{e}");
    let e = fails(&["train", "digits_cnn", "--cpu", "--steps", "1", "--label-smoothing", "-0.5"]);
    assert!(e.contains("-0.5"), "{e}");
}
