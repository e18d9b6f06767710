//! Every example, run in a small configuration: what the README and docs quote comes from
//! these programs, so CI runs them (their full runs: `cargo run --release --example NAME`).

#[allow(dead_code)]
#[path = "../examples/digits_estimator.rs"]
mod digits_estimator;

#[allow(dead_code)]
#[path = "../examples/transfer_learning.rs"]
mod transfer_learning;

#[allow(dead_code)]
#[path = "../examples/augmentation.rs"]
mod augmentation;

#[allow(dead_code)]
#[path = "../examples/edge_kernels.rs"]
mod edge_kernels;

#[test]
fn digits_estimator_trains_on_the_cpu_and_a_simulated_v2_8() {
    let s = digits_estimator::run(60, 64, 0.05, "v2-8", false).unwrap();
    assert!(s.cpu_accuracy > 0.6, "CPU {}", s.cpu_accuracy);
    assert!(s.tpu_accuracy.unwrap() > 0.6, "TPU {:?}", s.tpu_accuracy);
    assert!(s.simulated_examples_per_second.unwrap() > 1e4);
}

#[test]
fn transfer_learning_compares_three_starts() {
    // The README's configuration (seconds on the CPU reference): its figures, deterministic.
    let s = transfer_learning::run(300, 150, 20).unwrap();
    assert!(s.pretrained > 0.95, "pre-trained {}", s.pretrained);
    // Every start learns the new digits; the warm ones lead after the short budget, by more
    // than a few test digits.
    assert!(s.full.iter().all(|&a| a > 0.8), "{:?}", s.full);
    assert!(s.short[0] > s.short[2] + 0.03 && s.short[1] > s.short[2] + 0.03, "{:?}", s.short);
}

#[test]
fn augmentation_trains_with_and_without_and_writes_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.png");
    // The README's configuration: augmentation must beat the plain run, as quoted.
    let s = augmentation::run(10, 400, "rotate=12,crop=0.7,zoom=1.15", &grid).unwrap();
    assert!(s.plain > 0.8 && s.augmented > s.plain + 0.01, "{} {}", s.plain, s.augmented);
    assert!(std::fs::metadata(&grid).unwrap().len() > 100);
}

#[test]
fn edge_kernels_agree_between_the_simulated_tpu_and_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let s = edge_kernels::run(32, dir.path()).unwrap();
    // One bf16 pass: the image rounded to bf16 (the kernels' integers are exact).
    assert!(s.relative_error < 1e-2, "{}", s.relative_error);
    assert_eq!(s.files.len(), 4);
    assert!(s.files.iter().all(|f| f.exists()));
}
