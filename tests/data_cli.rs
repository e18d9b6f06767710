//! The data commands as a user drives them: augmentation grids, the input pipeline's
//! measured rate fed to the slice simulator, training with augmentation and warm starts,
//! test-time augmentation, and clear errors for data that does not fit.

use std::path::Path;

mod common;

use common::{fails, ok};

#[test]
fn augment_writes_a_grid_of_originals_and_views() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid.png");
    let o = ok(&[
        "augment",
        "--augment",
        "flip,rotate=15,crop",
        "--count",
        "3",
        "--views",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.contains("3 examples of digits"), "{o}");
    // 3 rows of 5 cells of 8 pixels, with 2-pixel padding around every cell.
    let png = std::fs::read(&out).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let (w, h) =
        (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
    assert_eq!((w, h), (5 * 8 + 6 * 2, 3 * 8 + 4 * 2));
    let e = fails(&["augment", "--augment", "hue", "--out", out.to_str().unwrap()]);
    assert!(e.contains("hue") && e.contains("3 channels"), "{e}");
    let e = fails(&["augment", "--augment", "wobble", "--out", out.to_str().unwrap()]);
    assert!(e.contains("wobble"), "{e}");
}

#[test]
fn the_measured_pipeline_rate_feeds_the_slice_simulator() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ok(&["data-bench", "--augment", "flip,crop", "--batch", "32", "--batches", "3", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&o).unwrap();
    let rate = report["examples_per_second"].as_f64().unwrap();
    assert!(rate > 0.0);
    let file = tmp.path().join("bench.json");
    std::fs::write(&file, &o).unwrap();
    // A pipeline at 1/100 of the measured rate on every host makes the step infeed-bound.
    let slow = format!("{}", rate / 100.0);
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "simulate",
        "digits_cnn",
        "--machine",
        "v2-8",
        "--batch",
        "32",
        "--input-rate",
        &slow,
        "--json",
    ]))
    .unwrap();
    let from_file: serde_json::Value = serde_json::from_str(&ok(&[
        "simulate",
        "digits_cnn",
        "--machine",
        "v2-8",
        "--batch",
        "32",
        "--input-rate",
        file.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let step = |v: &serde_json::Value| v["step_seconds"].as_f64().unwrap();
    assert!(step(&v) > step(&from_file), "{v} vs {from_file}");
    let e = fails(&["simulate", "digits_cnn", "--input-rate", "nonsense.json"]);
    assert!(e.contains("neither a number nor a readable data-bench report"), "{e}");
}

#[test]
fn training_with_augmentation_warm_starts_and_test_time_augmentation() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let o = ok(&[
        "train",
        "digits_cnn",
        "--cpu",
        "--steps",
        "6",
        "--batch",
        "16",
        "--augment",
        "rotate,crop",
        "--model-dir",
        a,
    ]);
    assert!(o.contains("to 6"), "{o}");
    let o = ok(&[
        "train",
        "digits_cnn",
        "--cpu",
        "--steps",
        "4",
        "--batch",
        "16",
        "--model-dir",
        b,
        "--warm-start",
        a,
        "--warm-start-vars",
        "conv.*",
        "--freeze",
        "conv1/.*",
    ]);
    assert!(o.contains("warm-started 4 variables"), "{o}");
    let load = |d: &str, step| {
        systolic::runtime::checkpoint::load(&systolic::runtime::checkpoint::path(Path::new(d), step)).unwrap().state
    };
    let (src, dst) = (load(a, 6), load(b, 4));
    assert_eq!(src["conv1/kernel"], dst["conv1/kernel"], "frozen");
    assert_ne!(src["conv2/kernel"], dst["conv2/kernel"], "loaded, then trained");
    let p = tmp.path().join("p.safetensors");
    let o = ok(&[
        "predict",
        "digits_cnn",
        "--cpu",
        "--model-dir",
        b,
        "--batch",
        "64",
        "--tta",
        "3",
        "--augment",
        "rotate",
        "--output",
        p.to_str().unwrap(),
    ]);
    assert!(o.contains("logits [297, 10]"), "{o}");
    let e = fails(&["train", "digits_cnn", "--cpu", "--steps", "2", "--dataset", "shapes"]);
    assert!(e.contains("makes RGB images, but model 'digits_cnn' takes [8, 8, 1]"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("cats")).unwrap();
    let e = fails(&["train", "shapes_cnn", "--cpu", "--steps", "2", "--dataset", empty.to_str().unwrap()]);
    assert!(e.contains("class 'cats' has no PNG or JPEG images"), "{e}");
    // A file whose labels are not the model's classes names the file and the label.
    let file = tmp.path().join("bad_labels.safetensors");
    let image = systolic::compiler::Tensor::zeros(vec![4, 8, 8, 1]);
    let labels = systolic::compiler::Tensor::from_shape_vec(vec![4], vec![0.0, 1.0, 2.0, 12.0]).unwrap();
    systolic::compiler::tensors::save(&file, &[("image".to_string(), image), ("labels".to_string(), labels)].into())
        .unwrap();
    let e =
        fails(&["train", "digits_cnn", "--cpu", "--steps", "1", "--batch", "2", "--dataset", file.to_str().unwrap()]);
    assert!(e.contains("bad_labels.safetensors") && e.contains("label 12 of example 3"), "{e}");
    // Rescaling is preprocessing (every mode), not augmentation (training only).
    let e = fails(&["train", "digits_cnn", "--cpu", "--steps", "1", "--augment", "flip,rescale"]);
    assert!(e.contains("rescale is preprocessing") && e.contains("--rescale"), "{e}");
    let c = tmp.path().join("c");
    let o = ok(&[
        "train",
        "digits_cnn",
        "--cpu",
        "--steps",
        "2",
        "--batch",
        "16",
        "--rescale",
        "--classes",
        "12",
        "--model-dir",
        c.to_str().unwrap(),
    ]);
    assert!(o.contains("to 2"), "{o}");
    let state = systolic::runtime::checkpoint::load(&systolic::runtime::checkpoint::path(&c, 2)).unwrap().state;
    assert_eq!(state["logits/kernel"].shape(), &[64, 12]);
    let e = fails(&["train", "no_such.ron", "--cpu", "--steps", "1", "--classes", "3"]);
    assert!(e.contains("--classes applies to zoo models"), "{e}");
}
