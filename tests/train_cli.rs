//! `systolic train`, `evaluate` and `predict` as a user drives them: a run killed with
//! SIGKILL resumes from its last checkpoint and ends bit for bit where an uninterrupted run
//! ends; a corrupted checkpoint is named and the one before it used; TensorFlow's rules are
//! one clear error line.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use systolic::runtime::checkpoint;

mod common;

use common::{fails, ok};

fn train_args<'a>(dir: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "digits_cnn",
        "--cpu",
        "--steps",
        steps,
        "--batch",
        "16",
        "--iterations-per-loop",
        "1",
        "--save-checkpoints-steps",
        "5",
        "--model-dir",
        dir,
        "--seed",
        "4",
    ]
}

#[test]
fn a_killed_run_resumes_and_ends_bit_identical_to_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    let (w, k) = (whole.to_str().unwrap(), killed.to_str().unwrap());
    let steps = "300";
    ok(&train_args(w, steps));

    let mut child = Command::new(env!("CARGO_BIN_EXE_systolic"))
        .args(train_args(k, steps))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let began = Instant::now();
    // SIGKILL once the second checkpoint is on disk (the first may be mid-write).
    while checkpoint::list(&killed).unwrap().iter().all(|c| c.0 < 10) {
        assert!(began.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was killed before it finished");
    let at_kill = checkpoint::list(&killed).unwrap().last().unwrap().0;
    assert!(at_kill < 300, "killed at step {at_kill}");

    let out = ok(&train_args(k, steps));
    assert!(out.contains("resuming from") && out.contains("from global step"), "{out}");
    let last = |d: &Path| checkpoint::load(&checkpoint::path(d, 300)).unwrap();
    let (a, b) = (last(&whole), last(&killed));
    assert_eq!(a.input_positions, b.input_positions);
    assert_eq!(a.state, b.state, "the resumed run's parameters and slots differ");
    // No temporary file of an interrupted write is left behind.
    let names: Vec<String> =
        std::fs::read_dir(&killed).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    // Training again to the same step does nothing.
    assert!(ok(&train_args(k, steps)).contains("already trained to global step 300"));
}

#[test]
fn a_corrupted_checkpoint_is_named_and_the_previous_one_used() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let d = dir.to_str().unwrap();
    ok(&train_args(d, "10"));
    let newest = checkpoint::path(&dir, 10);
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&newest, &bytes).unwrap();
    let out = ok(&["evaluate", "digits_cnn", "--cpu", "--model-dir", d, "--batch", "32"]);
    assert!(out.contains("skipping checkpoint") && out.contains("model.ckpt-10.safetensors"), "{out}");
    assert!(out.contains("checksum") && out.contains("evaluation at global step 5"), "{out}");
    // Truncated: the same.
    std::fs::write(&newest, &bytes[..n / 3]).unwrap();
    let out = ok(&["evaluate", "digits_cnn", "--cpu", "--model-dir", d, "--batch", "32"]);
    assert!(out.contains("not a valid safetensors file") && out.contains("global step 5"), "{out}");
    // Predict writes one row per test example (297, the last batch padded).
    let p = tmp.path().join("p.safetensors");
    ok(&["predict", "digits_cnn", "--cpu", "--model-dir", d, "--batch", "64", "--output", p.to_str().unwrap()]);
    let t = systolic::compiler::tensors::load(&p).unwrap();
    assert_eq!(t["logits"].shape(), &[297, 10]);
}

#[test]
fn simulated_training_reports_simulated_examples_per_second() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("tpu");
    let out = ok(&[
        "train",
        "digits_cnn",
        "--machine",
        "v2-8",
        "--steps",
        "4",
        "--batch",
        "32",
        "--iterations-per-loop",
        "2",
        "--model-dir",
        d.to_str().unwrap(),
    ]);
    assert!(out.contains("on v2-8 (8 replicas)") && out.contains("simulated:") && out.contains("examples/s"), "{out}");
    let metrics = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["global_step"], 4);
    assert!(last["simulated_examples_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn tensorflow_rules_are_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let e = fails(&["train", "digits_cnn", "--machine", "v2-8", "--steps", "2", "--batch", "12"]);
    assert!(e.contains("must be divisible by number of replicas 8"), "{e}");
    let cfg = tmp.path().join("run.ron");
    std::fs::write(&cfg, "(save_checkpoints_steps: Some(10), save_checkpoints_secs: Some(60.0))").unwrap();
    let e = fails(&["train", "digits_cnn", "--cpu", "--steps", "2", "--config", cfg.to_str().unwrap()]);
    assert!(e.contains("both set"), "{e}");
    let e = fails(&["train", "digits_cnn", "--cpu", "--steps", "2", "--iterations-per-loop", "2x"]);
    assert!(e.contains("iterations_per_loop '2x'"), "{e}");
    let e = fails(&["evaluate", "digits_cnn", "--cpu", "--model-dir", tmp.path().join("none").to_str().unwrap()]);
    assert!(e.contains("could not find a trained model"), "{e}");
    let e = fails(&["train", "resnet18", "--cpu", "--steps", "1", "--batch", "2"]);
    assert!(e.contains("holds examples of shape [8, 8, 1] but model 'resnet18' takes [224, 224, 3]"), "{e}");
    let e = fails(&["train", "digits_cnn", "--cpu", "--steps", "0"]);
    assert!(e.contains("max_steps must be positive"), "{e}");
}
