//! Output files and options as a user meets them: every output path is checked before any
//! work, so a command that cannot write one of its outputs writes none of them; files are
//! written atomically; an option that does not apply is an error, never ignored; a run the
//! host cannot hold is refused before it allocates.

mod common;

use common::{fails, ok, systolic};

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

/// `--output /dev/null` discards the values and leaves the device a device: an atomic
/// rename over it (as root) would make it a plain file that every later program writes into.
#[cfg(unix)]
#[test]
fn a_device_as_output_is_written_in_place() {
    use std::os::unix::fs::FileTypeExt;
    ok(&["run", "digits_cnn", "--batch", "2", "--output", "/dev/null"]);
    ok(&["simulate", "digits_cnn", "--batch", "8", "--trace", "/dev/null"]);
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    // `--output /dev/stdout > file`: the tensors go through the same handle as the printed
    // lines, in order, into the file the shell opened (not over it, not over the lines).
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_systolic"))
        .args(["run", "digits_cnn", "--batch", "2", "--output", "/dev/stdout"])
        .stdout(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    // The tensors are written before the summary is printed: the file starts with them whole.
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let end = 8 + header + 2 * 10 * 4;
    assert!(text[8..8 + header].contains("\"logits\""), "{text}");
    let printed = String::from_utf8_lossy(&bytes[end..]);
    assert!(printed.starts_with("logits [2, 10]") && printed.contains("ran digits_cnn"), "{printed}");
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
    assert!(e.contains("a negative number: this option takes 0 or more"), "{e}");
    // Fractions and exponents in whole-number options say so.
    for (option, value) in [("--batch", "2.5"), ("--steps", "1e3")] {
        let out = common::systolic(&["train", "digits_cnn", "--cpu", option, value]);
        let e = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success());
        assert!(e.contains(&format!("invalid value '{value}' for '{option} <")), "{e}");
        assert!(e.contains("not a whole number: this option counts"), "{e}");
    }
    let e = fails(&["train", "digits_cnn", "--cpu", "--steps", "1", "--label-smoothing", "-0.5"]);
    assert!(e.contains("-0.5"), "{e}");
}

/// A graph that validates but holds 6.4e9 parameters (25.6 GB in f32).
const HUGE_GRAPH: &str = r#"(
  name: "huge",
  nodes: [
    (name: "x", op: Input(shape: [80000], dtype: F32)),
    (name: "fc/kernel", op: Parameter(shape: [80000, 80000], init: GlorotUniform)),
    (name: "fc", op: Dense, inputs: ["x", "fc/kernel"]),
  ],
  outputs: ["fc"],
)"#;

#[test]
fn runs_the_host_cannot_hold_are_refused_before_they_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let y = dir.path().join("y.safetensors");
    let y = y.to_str().unwrap();
    // Each of these used to end in "memory allocation of N bytes failed" (exit 134).
    for args in [
        vec!["run", "simple_cnn", "--batch", "99999999", "--output", y],
        vec!["run", "resnet50", "--batch", "99999999", "--output", y],
        vec!["compare", "resnet50", "--batch", "99999999"],
        vec!["run", "simple_cnn", "--batch", "5000000", "--output", y],
    ] {
        let e = fails(&args);
        assert!(e.contains("the CPU reference running") && e.contains("lower the batch to at most"), "{e}");
        assert!(e.contains("--memory-limit"), "{e}");
    }
    let e = fails(&["run", "resnet50", "--batch", "99999999", "--backend", "tpu", "--output", y]);
    assert!(e.contains("holding the inputs and parameters of 'resnet50'"), "{e}");
    // A model whose parameters alone do not fit.
    let huge = dir.path().join("huge.ron");
    std::fs::write(&huge, HUGE_GRAPH).unwrap();
    let e = fails(&["run", huge.to_str().unwrap(), "--batch", "2", "--output", y]);
    assert!(e.contains("inputs and parameters 23.8 GiB"), "{e}");
    // The bit-exact kernel with VMEM raised so far that the operands pass the VMEM check.
    let e = fails(&[
        "mxu",
        "--m",
        "100000",
        "--k",
        "100000",
        "--n",
        "100000",
        "--set",
        "core.vmem_bytes=1000000000000",
        "--values",
    ]);
    assert!(e.contains("the bit-exact MXU kernel of a 100000x100000x100000 matmul needs about 149.0 GiB"), "{e}");
    assert!(!y_exists(y));
}

fn y_exists(path: &str) -> bool {
    std::path::Path::new(path).exists()
}

#[test]
fn the_memory_limit_can_be_lowered_raised_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let y = dir.path().join("y.safetensors");
    let y = y.to_str().unwrap();
    // Below what a run needs: the reference, the functional engine, the PE-level array.
    let e = fails(&["run", "simple_cnn", "--batch", "64", "--output", y, "--memory-limit", "1MiB"]);
    assert!(e.contains("but 1.0 MiB may be used (the limit set by --memory-limit)"), "{e}");
    assert!(e.contains("lower the batch to at most"), "{e}");
    let e = fails(&["run", "digits_cnn", "--backend", "tpu", "--batch", "8", "--output", y, "--memory-limit", "64KiB"]);
    assert!(e.contains("the functional engine running 'digits_cnn' on 1 core needs about"), "{e}");
    let e = fails(&["mxu", "--m", "256", "--k", "256", "--n", "256", "--pe-level", "--memory-limit", "100KB"]);
    assert!(e.contains("the PE-level check of a 256x256x256 matmul"), "{e}");
    // The environment variable does the same; a limit of none checks nothing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_systolic"))
        .args(["run", "digits_cnn", "--batch", "4", "--output", y])
        .env("SYSTOLIC_MEMORY_LIMIT", "10KB")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("(SYSTOLIC_MEMORY_LIMIT=10KB)"), "{e}");
    ok(&["run", "digits_cnn", "--batch", "4", "--output", y, "--memory-limit", "none"]);
    // Training on the CPU reference checks each step: an error, not an abort.
    let model_dir = dir.path().join("model");
    let e = fails(&[
        "train",
        "digits_cnn",
        "--cpu",
        "--steps",
        "1",
        "--batch",
        "32",
        "--model-dir",
        model_dir.to_str().unwrap(),
        "--memory-limit",
        "16KiB",
    ]);
    assert!(e.contains("needs about") && e.contains("16.0 KiB"), "{e}");
    // A size that is not one is refused by the option.
    let out = systolic(&["zoo", "--memory-limit", "lots"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("'lots' is not a size"), "{e}");
}

/// A safetensors file from (name, dtype, shape, little-endian bytes), as other tools write them.
fn safetensors_file(path: &std::path::Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = Vec::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let (start, end) = (data.len(), data.len() + bytes.len());
        header.push(format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}"#));
        data.extend_from_slice(bytes);
    }
    let mut json = format!("{{{}}}", header.join(","));
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json.as_bytes());
    file.extend_from_slice(&data);
    std::fs::write(path, file).unwrap();
}

#[test]
fn conversions_and_unused_tensors_are_noted_or_refused_with_strict() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (x, y, labels) = (path("x.safetensors"), path("y.safetensors"), path("labels.safetensors"));
    // digits_cnn's image as f64 (0.1 is not an f32: rounded), and a tensor it does not use.
    let image: Vec<u8> = (0..2 * 64).flat_map(|_| 0.1f64.to_le_bytes()).collect();
    safetensors_file(
        std::path::Path::new(&x),
        &[("image", "F64", vec![2, 8, 8, 1], image), ("extra", "F32", vec![1], 1f32.to_le_bytes().to_vec())],
    );
    let out = systolic(&["run", "digits_cnn", "--input", &x, "--output", &y]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("note: {x}: converted to f32: 'image' (F64, rounded)")), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "note: {x}: 1 tensor the model 'digits_cnn' as an input does not use, ignored: 'extra'"
        )),
        "{stderr}"
    );
    let e = fails(&["run", "digits_cnn", "--input", &x, "--output", &y, "--strict"]);
    assert!(e.contains("converted to f32: 'image' (F64, rounded) (refused by --strict"), "{e}");
    // A weights file with a tensor the model does not have: noted, and left out.
    let w = path("w.safetensors");
    ok(&["run", "digits_cnn", "--batch", "2", "--output", &y, "--save-weights", &w]);
    let mut weights = systolic::compiler::tensors::load(&w).unwrap();
    weights.insert("conv9/kernel".into(), systolic::compiler::Tensor::zeros(vec![3]));
    let w2 = path("w2.safetensors");
    systolic::compiler::tensors::save(&w2, &weights).unwrap();
    let out = systolic(&["run", "digits_cnn", "--batch", "2", "--output", &y, "--weights", &w2]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("note: {w2}: 1 tensor the model 'digits_cnn' does not use, ignored: 'conv9/kernel'")),
        "{stderr}"
    );
    // Integer labels are what labels are: no note; float inputs stored as f32 pass silently.
    let f32_image: Vec<u8> = (0..2 * 64).flat_map(|i| (i as f32 / 128.0).to_le_bytes()).collect();
    safetensors_file(std::path::Path::new(&x), &[("image", "F32", vec![2, 8, 8, 1], f32_image)]);
    let ids: Vec<u8> = [3i32, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
    safetensors_file(std::path::Path::new(&labels), &[("labels", "I32", vec![2], ids)]);
    let g = path("g.safetensors");
    let out = systolic(&[
        "grad",
        "digits_cnn",
        "--input",
        &x,
        "--labels",
        &labels,
        "--output",
        &g,
        "--weights",
        &w,
        "--strict",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("note"), "{stderr}");
}
