//! The `systolic` command line as a user drives it: JSON listings, run and grad through
//! safetensors files, and one clear error line (never a panic) for each kind of bad input.

use std::path::{Path, PathBuf};

use systolic::compiler::reference::{self, RunOptions};
use systolic::compiler::{Tensor, TensorMap, autodiff, tensors, zoo};

mod common;

use common::{fails, ok, systolic};

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

fn image_batch(shape: &[usize]) -> TensorMap {
    let n: usize = shape.iter().product();
    let t = Tensor::from_shape_vec(shape.to_vec(), (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect());
    TensorMap::from([("image".to_string(), t.unwrap())])
}

#[test]
fn zoo_json_lists_published_parameter_counts() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["zoo", "--json"])).unwrap();
    let find = |name: &str| v.as_array().unwrap().iter().find(|m| m["name"] == name).unwrap().clone();
    for (name, params) in
        [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("vgg16", 138_357_544), ("mobilenet_v1", 4_231_976)]
    {
        let m = find(name);
        assert_eq!(m["params"], params, "{name}");
        assert_eq!(m["input_shape"], serde_json::json!([224, 224, 3]));
        assert!(m["flops_per_example"].as_u64().unwrap() > 1_000_000_000);
    }
    assert_eq!(find("simple_cnn")["input_shape"], serde_json::json!([28, 28, 1]));
}

#[test]
fn inspect_lists_inputs_layers_and_totals() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["inspect", "simple_cnn", "--batch", "4", "--json"])).unwrap();
    assert_eq!(v["inputs"][0]["name"], "image");
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!([4, 28, 28, 1]));
    let conv1 = &v["layers"][0];
    assert_eq!(conv1["name"], "conv1");
    assert_eq!(conv1["op"], "Conv2d");
    assert_eq!(conv1["output_shape"], serde_json::json!([4, 24, 24, 10]));
    assert_eq!(conv1["params"], 260);
    // 2 * 24*24*10 outputs * 25 taps + bias, for 4 examples.
    assert_eq!(conv1["flops"], 4 * (2 * 5760 * 25 + 5760));
    assert_eq!(v["trainable_params"], 104_590);
    let table = ok(&["inspect", "resnet50"]);
    assert!(table.contains("layer4.2.conv3") && table.contains("25,557,032 trainable parameters"), "{table}");
}

#[test]
fn run_writes_what_the_library_computes() {
    let d = Dir::new();
    tensors::save(d.path("x.safetensors"), &image_batch(&[3, 28, 28, 1])).unwrap();
    let out = ok(&[
        "run",
        "simple_cnn",
        "--seed",
        "7",
        "--input",
        &d.s("x.safetensors"),
        "--output",
        &d.s("y.safetensors"),
        "--save-weights",
        &d.s("w.safetensors"),
    ]);
    assert!(out.contains("logits [3, 10]"), "{out}");
    let y = tensors::load(d.path("y.safetensors")).unwrap();
    let w = tensors::load(d.path("w.safetensors")).unwrap();
    let g = zoo::build("simple_cnn").unwrap();
    assert_eq!(w, g.init_parameters(7), "--save-weights writes the parameters used");
    let mut b = w.clone();
    b.extend(image_batch(&[3, 28, 28, 1]));
    let (want, _) = reference::run_outputs(&g, &b, RunOptions::default()).unwrap();
    assert_eq!(y, want);
    // Running again from the saved weights gives the same bits.
    ok(&[
        "run",
        "simple_cnn",
        "--weights",
        &d.s("w.safetensors"),
        "--input",
        &d.s("x.safetensors"),
        "--output",
        &d.s("y2.safetensors"),
    ]);
    assert_eq!(tensors::load(d.path("y2.safetensors")).unwrap(), want);
}

#[test]
fn train_mode_updates_batch_norm_statistics() {
    let d = Dir::new();
    let g = zoo::build_with("resnet18", zoo::ZooOptions { input_hw: Some([32, 32]), classes: Some(10) }).unwrap();
    g.save(d.path("r18.ron")).unwrap();
    // Four images: at 32x32 ResNet-18's last stage is 1x1, and batch statistics over two
    // values amplify rounding wherever the two nearly agree.
    tensors::save(d.path("x.safetensors"), &image_batch(&[4, 32, 32, 3])).unwrap();
    let run = |mode: &[&str], weights: &str| {
        let mut args = vec!["run", "", "--input", "", "--output", "", "--save-weights", weights];
        let (model, x, y) = (d.s("r18.ron"), d.s("x.safetensors"), d.s("y.safetensors"));
        args[1] = &model;
        args[3] = &x;
        args[5] = &y;
        args.extend(mode);
        ok(&args);
        tensors::load(weights).unwrap()
    };
    let (w_infer, w_train) = (d.s("wi.safetensors"), d.s("wt.safetensors"));
    let inference = run(&[], &w_infer);
    let training = run(&["--train-mode"], &w_train);
    assert_eq!(inference["bn1/moving_mean"], g.init_parameters(0)["bn1/moving_mean"]);
    assert_ne!(training["bn1/moving_mean"], inference["bn1/moving_mean"]);
    assert_eq!(training["conv1/kernel"], inference["conv1/kernel"]);
    let out_name = g.node(g.outputs()[0]).name.clone();
    let cpu_out = tensors::load(d.path("y.safetensors")).unwrap().remove(&out_name).unwrap();

    // The simulated TPU in training mode: batch statistics, and the same moving statistics.
    let w_tpu = d.s("wtpu.safetensors");
    let tpu = run(&["--train-mode", "--backend", "tpu", "--precision", "highest"], &w_tpu);
    let tpu_out = tensors::load(d.path("y.safetensors")).unwrap().remove(&out_name).unwrap();
    let (cos, rel) = closeness(&cpu_out, &tpu_out);
    assert!(cos > 0.999_99 && rel < 1e-3, "training-mode outputs: cosine {cos}, relative error {rel}");
    for name in ["bn1/moving_mean", "bn1/moving_variance", "layer4.1.bn2/moving_mean"] {
        let (cos, rel) = closeness(&training[name], &tpu[name]);
        assert!(cos > 0.999_99 && rel < 1e-3, "{name}: cosine {cos}, relative error {rel}");
    }
    assert_eq!(tpu["conv1/kernel"], training["conv1/kernel"]);
}

#[test]
fn train_mode_dropout_draws_the_same_mask_on_both_backends() {
    let d = Dir::new();
    tensors::save(d.path("x.safetensors"), &image_batch(&[3, 28, 28, 1])).unwrap();
    let run = |backend: &str, step: &str| {
        let out = d.s(&format!("{backend}{step}.safetensors"));
        let args = ["run", "simple_cnn", "--input", &d.s("x.safetensors"), "--output", &out, "--train-mode"];
        let mut args: Vec<&str> = args.to_vec();
        args.extend(["--step", step, "--backend", backend]);
        if backend == "tpu" {
            args.extend(["--precision", "highest"]);
        }
        ok(&args);
        tensors::load(&out).unwrap().remove("logits").unwrap()
    };
    let (cpu3, tpu3, tpu4) = (run("cpu", "3"), run("tpu", "3"), run("tpu", "4"));
    let (cos, rel) = closeness(&cpu3, &tpu3);
    assert!(cos > 0.999_999 && rel < 1e-4, "step 3: cosine {cos}, relative error {rel}");
    // Another step draws another mask.
    let (_, rel) = closeness(&tpu3, &tpu4);
    assert!(rel > 1e-2, "steps 3 and 4 gave the same outputs");
}

#[test]
fn grad_writes_the_loss_and_every_gradient() {
    let d = Dir::new();
    tensors::save(d.path("x.safetensors"), &image_batch(&[4, 8, 8, 1])).unwrap();
    let labels = Tensor::from_shape_vec(vec![4], vec![1.0, 7.0, 3.0, 0.0]).unwrap();
    tensors::save(d.path("l.safetensors"), &TensorMap::from([("labels".to_string(), labels.clone())])).unwrap();
    ok(&[
        "run",
        "digits_cnn",
        "--input",
        &d.s("x.safetensors"),
        "--output",
        &d.s("y.safetensors"),
        "--save-weights",
        &d.s("w.safetensors"),
    ]);
    let out = ok(&[
        "grad",
        "digits_cnn",
        "--weights",
        &d.s("w.safetensors"),
        "--input",
        &d.s("x.safetensors"),
        "--labels",
        &d.s("l.safetensors"),
        "--output",
        &d.s("g.safetensors"),
    ]);
    assert!(out.starts_with("loss "), "{out}");
    let grads = tensors::load(d.path("g.safetensors")).unwrap();

    let g = zoo::build("digits_cnn").unwrap();
    let train = autodiff::training_graph(&g, 0.0).unwrap();
    let mut b = tensors::load(d.path("w.safetensors")).unwrap();
    b.extend(image_batch(&[4, 8, 8, 1]));
    b.insert("labels".into(), labels);
    let want = reference::run_gradients(&train, &b, RunOptions::training(0)).unwrap();
    assert_eq!(grads["loss"], want.root);
    let mut names: Vec<&str> = grads.keys().map(String::as_str).collect();
    names.sort();
    let mut expected: Vec<String> = g.trainable_parameters().iter().map(|&p| g.node(p).name.clone()).collect();
    expected.extend(["image".to_string(), "loss".to_string()]);
    expected.sort();
    assert_eq!(names, expected);
    for (name, t) in &want.grads {
        assert_eq!(&grads[name], t, "{name}");
    }
}

#[test]
fn export_then_run_from_the_file() {
    let d = Dir::new();
    ok(&["export", "lenet5", "--out", &d.s("lenet5.ron")]);
    let g = systolic::compiler::Graph::load(d.path("lenet5.ron")).unwrap();
    assert_eq!(g, zoo::build("lenet5").unwrap());
    tensors::save(d.path("x.safetensors"), &image_batch(&[1, 32, 32, 1])).unwrap();
    ok(&["run", &d.s("lenet5.ron"), "--input", &d.s("x.safetensors"), "--output", &d.s("y.safetensors")]);
}

/// Writes the files the error cases need: weights and an input for simple_cnn.
fn fixtures(d: &Dir) {
    tensors::save(d.path("x.safetensors"), &image_batch(&[2, 28, 28, 1])).unwrap();
    ok(&[
        "run",
        "simple_cnn",
        "--input",
        &d.s("x.safetensors"),
        "--output",
        &d.s("y.safetensors"),
        "--save-weights",
        &d.s("w.safetensors"),
    ]);
}

fn run_args<'a>(model: &'a str, weights: &'a str, input: &'a str, output: &'a str) -> Vec<&'a str> {
    vec!["run", model, "--weights", weights, "--input", input, "--output", output]
}

#[test]
fn unknown_model_lists_the_known_ones() {
    let e = fails(&["inspect", "resnet51"]);
    assert!(e.contains("unknown model 'resnet51'") && e.contains("resnet50") && e.contains("digits_cnn"), "{e}");
}

#[test]
fn malformed_model_files_give_file_line_and_column() {
    let d = Dir::new();
    std::fs::write(
        d.path("bad.ron"),
        "(\n  name: \"x\",\n  nodes: [\n    (name: \"a\" op: Relu),\n  ],\n  outputs: [],\n)\n",
    )
    .unwrap();
    let e = fails(&["inspect", &d.s("bad.ron")]);
    assert!(e.contains("bad.ron:4:"), "{e}");
}

#[test]
fn mismatched_conv_channels_in_a_file_name_the_node() {
    let d = Dir::new();
    ok(&["export", "simple_cnn", "--out", &d.s("m.ron")]);
    let text = std::fs::read_to_string(d.path("m.ron")).unwrap();
    // conv2's kernel expects 10 input channels; claim 12.
    let text = text.replace("shape: [5, 5, 10, 20]", "shape: [5, 5, 12, 20]");
    std::fs::write(d.path("m.ron"), text).unwrap();
    let e = fails(&["inspect", &d.s("m.ron")]);
    assert!(e.contains("m.ron:") && e.contains("node 'conv2'") && e.contains("10 channels"), "{e}");
}

#[test]
fn wrong_input_shape_names_the_tensor_and_the_expected_shape() {
    let d = Dir::new();
    fixtures(&d);
    tensors::save(d.path("bad.safetensors"), &image_batch(&[2, 32, 32, 1])).unwrap();
    let e = fails(&run_args("simple_cnn", &d.s("w.safetensors"), &d.s("bad.safetensors"), &d.s("y.safetensors")));
    assert!(e.contains("bad.safetensors") && e.contains("'image'") && e.contains("[N, 28, 28, 1]"), "{e}");
}

#[test]
fn missing_input_tensor_is_named() {
    let d = Dir::new();
    fixtures(&d);
    let other = TensorMap::from([("pixels".to_string(), Tensor::zeros(vec![2, 28, 28, 1]))]);
    tensors::save(d.path("other.safetensors"), &other).unwrap();
    let out =
        systolic(&run_args("simple_cnn", &d.s("w.safetensors"), &d.s("other.safetensors"), &d.s("y.safetensors")));
    let e = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{e}");
    // The tensor the file has instead is noted first, then the one error line.
    let lines: Vec<&str> = e.lines().collect();
    assert!(lines[0].starts_with("note: ") && lines[0].contains("ignored: 'pixels'"), "{e}");
    assert!(lines[1].starts_with("error: ") && lines[1].contains("'image'") && lines[1].contains("missing"), "{e}");
    assert_eq!(lines.len(), 2, "{e}");
}

#[test]
fn weights_missing_a_tensor_or_with_a_wrong_shape() {
    let d = Dir::new();
    fixtures(&d);
    let mut w = tensors::load(d.path("w.safetensors")).unwrap();
    w.remove("conv2/bias");
    tensors::save(d.path("missing.safetensors"), &w).unwrap();
    let e = fails(&run_args("simple_cnn", &d.s("missing.safetensors"), &d.s("x.safetensors"), &d.s("y.safetensors")));
    assert!(e.contains("missing.safetensors") && e.contains("'conv2/bias'") && e.contains("[20]"), "{e}");

    w.insert("conv2/bias".into(), Tensor::zeros(vec![21]));
    tensors::save(d.path("shape.safetensors"), &w).unwrap();
    let e = fails(&run_args("simple_cnn", &d.s("shape.safetensors"), &d.s("x.safetensors"), &d.s("y.safetensors")));
    assert!(e.contains("shape.safetensors") && e.contains("[21]") && e.contains("[20]"), "{e}");
}

#[test]
fn unreadable_tensor_files_and_bad_labels() {
    let d = Dir::new();
    fixtures(&d);
    std::fs::write(d.path("junk.safetensors"), b"not a tensor file").unwrap();
    let e = fails(&run_args("simple_cnn", &d.s("w.safetensors"), &d.s("junk.safetensors"), &d.s("y.safetensors")));
    assert!(e.contains("junk.safetensors") && e.contains("not a valid safetensors file"), "{e}");
    let e = fails(&run_args("simple_cnn", &d.s("w.safetensors"), &d.s("nowhere.safetensors"), &d.s("y.safetensors")));
    assert!(e.contains("nowhere.safetensors"), "{e}");

    let labels = Tensor::from_shape_vec(vec![2], vec![3.0, 12.0]).unwrap();
    tensors::save(d.path("l.safetensors"), &TensorMap::from([("labels".to_string(), labels)])).unwrap();
    let mut args = vec!["grad", "simple_cnn", "--weights", "", "--input", "", "--labels", "", "--output", ""];
    let (w, x, l, g) = (d.s("w.safetensors"), d.s("x.safetensors"), d.s("l.safetensors"), d.s("g.safetensors"));
    args[3] = &w;
    args[5] = &x;
    args[7] = &l;
    args[9] = &g;
    let e = fails(&args);
    assert!(e.contains("label 12") && e.contains("[0, 10)"), "{e}");
}

#[test]
fn a_batch_of_zero_is_refused() {
    let d = Dir::new();
    fixtures(&d);
    tensors::save(
        d.path("empty.safetensors"),
        &TensorMap::from([("image".to_string(), Tensor::zeros(vec![0, 28, 28, 1]))]),
    )
    .unwrap();
    let e = fails(&run_args("simple_cnn", &d.s("w.safetensors"), &d.s("empty.safetensors"), &d.s("y.safetensors")));
    assert!(e.contains("batch of zero"), "{e}");
}

#[test]
fn written_files_follow_the_safetensors_layout() {
    // The format PyTorch's and NumPy's loaders read: u64 header length, a JSON header with
    // dtype/shape/data_offsets per tensor, then the little-endian data.
    let d = Dir::new();
    fixtures(&d);
    let bytes = std::fs::read(d.path("y.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let logits = &header["logits"];
    assert_eq!(logits["dtype"], "F32");
    assert_eq!(logits["shape"], serde_json::json!([2, 10]));
    let offsets = logits["data_offsets"].as_array().unwrap();
    let (start, end) = (offsets[0].as_u64().unwrap() as usize, offsets[1].as_u64().unwrap() as usize);
    assert_eq!(end - start, 2 * 10 * 4);
    let first = f32::from_le_bytes(bytes[8 + n + start..8 + n + start + 4].try_into().unwrap());
    assert_eq!(first, tensors::load(d.path("y.safetensors")).unwrap()["logits"][[0, 0]]);
}

#[test]
fn reads_files_written_by_numpy() {
    // Written by `safetensors.numpy.save_file` (see tests/fixtures/README.md): f32, f16, bf16,
    // i64 labels.
    let t = tensors::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/numpy.safetensors")).unwrap();
    assert_eq!(t["f32"].as_slice().unwrap(), &[0.5, -1.25, 3.0, 1e-3]);
    assert_eq!(t["f16"].as_slice().unwrap(), &[0.5, -1.25, 3.0, 1049.0 / 1048576.0]); // f16(1e-3) = 1049 * 2^-20
    assert_eq!(t["bf16"].as_slice().unwrap(), &[0.5, -1.25, 3.0, 131.0 / 131072.0]); // bf16(1e-3) = 131 * 2^-17
    assert_eq!(t["labels"].as_slice().unwrap(), &[0.0, 9.0, 3.0]);
    assert_eq!(t["f32"].shape(), &[2, 2]);
}

// ---- machines and the MXU ----

#[test]
fn machines_json_lists_every_preset_with_published_peaks() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["machines", "--json"])).unwrap();
    let all = v.as_array().unwrap();
    let find = |name: &str| all.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name} missing")).clone();
    for name in ["v2-8", "v2-32", "v2-128", "v2-512", "v3-8", "v3-32", "v3-128", "v3-512", "v3-2048", "v4-8", "v4-8192"]
    {
        let m = find(name);
        let cores: u64 = name.split('-').nth(1).unwrap().parse().unwrap();
        assert_eq!(m["cores"], cores, "{name}");
        assert_eq!(m["chips"].as_u64().unwrap() * 2, cores);
    }
    let per_chip = |name: &str| find(name)["chip_peak_tflops"].as_f64().unwrap();
    assert!((per_chip("v2-8") - 45.9).abs() < 0.05);
    assert!((per_chip("v3-8") - 123.2).abs() < 0.05);
    assert!((per_chip("v4-8") - 275.3).abs() < 0.05);
    assert!((find("v2-512")["peak_tflops"].as_f64().unwrap() - 256.0 * 45.875).abs() < 1.0);
    let shown = ok(&["machines", "v3-8", "--set", "core.mxu.rows=256"]);
    let row = shown.lines().find(|l| l.starts_with("core.mxu.rows ")).unwrap_or_else(|| panic!("{shown}"));
    assert!(row.contains(" 256 ") && row.ends_with("set by the user to 256"), "{row}");
    assert!(shown.contains("HC20") && shown.contains("16777216 (16 MiB)") && !shown.contains("sources: {"), "{shown}");
}

/// `compile --json` without its wall-clock timings.
fn compile_report(machine: &str) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&ok(&["compile", "digits_cnn", "--batch", "8", "--machine", machine, "--json"])).unwrap();
    for key in ["compile_seconds", "simulate_seconds"] {
        v.as_object_mut().unwrap().remove(key).unwrap_or_else(|| panic!("no {key} in {v}"));
    }
    v
}

#[test]
fn machines_ron_writes_a_file_that_loads_back_as_the_same_machine() {
    let d = Dir::new();
    let text = ok(&["machines", "v3-8", "--ron"]);
    assert!(text.trim_start().starts_with('(') && text.trim_end().ends_with(')'), "only RON: {text}");
    assert!(text.contains("\"core.clock_hz\": \"HC20: TPUv3 runs at 940 MHz\""), "sources included: {text}");
    std::fs::write(d.path("v3.ron"), &text).unwrap();
    // The file is the preset, sources included, and compiles exactly like it.
    assert_eq!(ok(&["machines", &d.s("v3.ron"), "--ron"]), text);
    assert_eq!(ok(&["machines", &d.s("v3.ron"), "--json"]), ok(&["machines", "v3-8", "--json"]));
    assert_eq!(compile_report(&d.s("v3.ron")), compile_report("v3-8"));
    // Edited, it is another machine.
    std::fs::write(d.path("mine.ron"), text.replace("count: 2,", "count: 4,")).unwrap();
    let mine: serde_json::Value = serde_json::from_str(&ok(&["machines", &d.s("mine.ron"), "--json"])).unwrap();
    assert_eq!(mine["core"]["mxu"]["count"], 4);
    assert_ne!(compile_report(&d.s("mine.ron")), compile_report("v3-8"));
    // Overrides keep their citation through the file.
    let set = ok(&["machines", "v3-8", "--set", "core.mxu.rows=256", "--set", "core.vmem_bytes=33554432", "--ron"]);
    std::fs::write(d.path("set.ron"), &set).unwrap();
    assert_eq!(ok(&["machines", &d.s("set.ron"), "--ron"]), set);
    let v: serde_json::Value = serde_json::from_str(&ok(&["machines", &d.s("set.ron"), "--json"])).unwrap();
    assert_eq!(v["core"]["mxu"]["rows"], 256);
    assert_eq!(v["sources"]["core.mxu.rows"], "set by the user to 256");
    // A bad file is refused with its file, line and column.
    let line = text.lines().position(|l| l.contains("rows: 128")).unwrap() + 1;
    std::fs::write(d.path("bad.ron"), text.replace("rows: 128", "rows: 0")).unwrap();
    let e = fails(&["compile", "digits_cnn", "--machine", &d.s("bad.ron")]);
    assert!(e.contains(&format!("bad.ron:{line}:")) && e.contains("'core.mxu.rows': must be at least 1"), "{e}");
    std::fs::write(d.path("typo.ron"), text.replace("cols: 128", "colls: 128")).unwrap();
    let e = fails(&["machines", &d.s("typo.ron"), "--ron"]);
    assert!(e.contains(&format!("typo.ron:{}:", line + 1)) && e.contains("colls"), "{e}");
    let e = fails(&["machines", "--ron"]);
    assert!(e.contains("--ron needs a machine"), "{e}");
}

#[test]
fn mxu_shows_why_small_batches_waste_the_array() {
    let run = |m: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["mxu", "--m", m, "--k", "1024", "--n", "1024", "--json"];
        args.extend(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let small = run("8", &[]);
    let big = run("128", &[]);
    assert!(small["mxu_utilization"].as_f64().unwrap() < 0.07, "{small}");
    assert!(big["mxu_utilization"].as_f64().unwrap() > 0.95, "{big}");
    assert!(small["bound"].as_str().unwrap().contains("weight loading"));
    let single = run("128", &["--set", "core.mxu.weight_double_buffering=false"]);
    assert!((single["mxu_utilization"].as_f64().unwrap() - 0.5).abs() < 0.02, "{single}");
    // Two MXUs per v3 core, the PE-level array agreeing in bits and cycles.
    let v3 = run("64", &["--machine", "v3-8", "--precision", "high", "--pe-level"]);
    assert_eq!(v3["mxus"], 2);
    assert_eq!(v3["pe_level"]["cycles_match"], true);
    assert_eq!(v3["pe_level"]["bits_identical"], true);
    let text = ok(&["mxu", "--m", "8", "--k", "256", "--n", "256"]);
    assert!(text.contains("MXU utilization") && text.contains("weight loading"), "{text}");
}

#[test]
fn mxu_gives_scale_sims_cycles_with_its_timing() {
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["mxu", "--m", "256", "--k", "300", "--n", "200", "--json"];
        args.extend(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    // SCALE-Sim's weight-stationary total on its 128x128 array: ceil(300/128) * ceil(200/128)
    // folds of 2*128 + 128 + 256 - 2 cycles, minus one (it reports the last cycle's index).
    let closed_form = 3 * 2 * (2 * 128 + 128 + 256 - 2) - 1;
    let scalesim = run(&["--set", "core.mxu.timing=scalesim", "--pe-level"]);
    assert_eq!(scalesim["timing"], "scalesim");
    assert_eq!(scalesim["cycles"], closed_form, "{scalesim}");
    assert_eq!(scalesim["pe_level"]["cycles"], closed_form, "{scalesim}");
    assert_eq!(scalesim["pe_level"]["bits_identical"], true);
    // The default timing overlaps folds: under half of SCALE-Sim's cycles here.
    let default = run(&[]);
    assert_eq!(default["timing"], "pipelined");
    assert!(default["cycles"].as_u64().unwrap() * 2 < closed_form, "{default}");
    // The text says which model it used.
    let text = ok(&["mxu", "--m", "256", "--k", "300", "--n", "200", "--set", "core.mxu.timing=scalesim"]);
    assert!(text.contains("timing model scalesim") && text.contains("3,827"), "{text}");
    assert!(ok(&["mxu", "--m", "8", "--k", "8", "--n", "8"]).contains("timing model pipelined"));
    // A machine file keeps the choice.
    let d = Dir::new();
    let ron = ok(&["machines", "v2-8", "--set", "core.mxu.timing=scalesim", "--ron"]);
    assert!(ron.contains("timing: scalesim,") && ron.contains("\"set by the user to scalesim\""), "{ron}");
    std::fs::write(d.path("ss.ron"), &ron).unwrap();
    assert_eq!(ok(&["machines", &d.s("ss.ron"), "--ron"]), ron);
    let from_file = run(&["--machine", &d.s("ss.ron")]);
    assert_eq!(from_file["cycles"], closed_form);
    let shown = ok(&["machines", "v2-8"]);
    let row = shown.lines().find(|l| l.starts_with("core.mxu.timing ")).unwrap_or_else(|| panic!("{shown}"));
    assert!(row.contains(" pipelined ") && row.contains("model: "), "{row}");
    let e = fails(&["mxu", "--m", "8", "--k", "8", "--n", "8", "--set", "core.mxu.timing=fast"]);
    assert!(e.contains("core.mxu.timing") && e.contains("scalesim"), "{e}");
}

#[test]
fn mxu_writes_a_trace_and_rejects_bad_input() {
    let d = Dir::new();
    ok(&["mxu", "--m", "256", "--k", "256", "--n", "512", "--machine", "v4-8", "--trace", &d.s("t.json")]);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path("t.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events.iter().any(|e| e["ph"] == "X" && e["name"] == "matmul"));
    assert!(events.iter().any(|e| e["name"] == "thread_name" && e["args"]["name"] == "mxu3"));

    let e = fails(&["mxu", "--m", "8", "--k", "8", "--n", "8", "--set", "core.mxu.rows=0"]);
    assert!(e.contains("core.mxu.rows") && e.contains("at least 1"), "{e}");
    let e = fails(&["mxu", "--m", "8", "--k", "8", "--n", "8", "--set", "core.vmem_bytes=1024"]);
    assert!(e.contains("smaller than one 128x128 f32 tile"), "{e}");
    let e = fails(&["mxu", "--m", "8", "--k", "8", "--n", "8", "--machine", "v2-8", "--set", "slice.torus=[4,4,4]"]);
    assert!(e.contains("needs 6 ICI links per chip but chips have 4"), "{e}");
    let e = fails(&["mxu", "--m", "8", "--k", "8", "--n", "8", "--machine", "v9-8"]);
    assert!(e.contains("unknown machine 'v9-8'") && e.contains("v3-2048"), "{e}");
    let e = fails(&["mxu", "--m", "4096", "--k", "4096", "--n", "4096"]);
    assert!(e.contains("VMEM") && e.contains("lower M, K or N"), "{e}");
    let e = fails(&["mxu", "--m", "8", "--k", "8", "--n", "8", "--precision", "ultra"]);
    assert!(e.contains("use default, high or highest"), "{e}");
    std::fs::write(d.path("bad.ron"), "(name: \"x\", core: (clock_hz: 1.0,)").unwrap();
    let e = fails(&["mxu", "--m", "8", "--k", "8", "--n", "8", "--machine", &d.s("bad.ron")]);
    assert!(e.contains("bad.ron:1:"), "{e}");
}

/// Cosine similarity and largest error relative to the largest reference magnitude.
fn closeness(want: &Tensor, got: &Tensor) -> (f64, f64) {
    assert_eq!(want.shape(), got.shape());
    let (mut dot, mut ww, mut gg, mut err, mut scale) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&w, &g) in want.iter().zip(got.iter()) {
        let (w, g) = (w as f64, g as f64);
        dot += w * g;
        ww += w * w;
        gg += g * g;
        err = err.max((w - g).abs());
        scale = scale.max(w.abs());
    }
    (dot / (ww.sqrt() * gg.sqrt()), err / scale)
}

#[test]
fn run_on_the_simulated_tpu_agrees_with_the_reference_as_bf16_allows() {
    let d = Dir::new();
    tensors::save(d.path("x.safetensors"), &image_batch(&[4, 28, 28, 1])).unwrap();
    let run = |backend: &str, precision: &str, out: &str| {
        let (x, y) = (d.s("x.safetensors"), d.s(out));
        let mut args = vec!["run", "simple_cnn", "--seed", "3", "--input", &x, "--output", &y, "--backend", backend];
        // The CPU reference has no MXU precision (giving one is an error).
        if backend == "tpu" {
            args.extend(["--precision", precision]);
        }
        let text = ok(&args);
        (text, tensors::load(d.path(out)).unwrap().remove("logits").unwrap())
    };
    let (_, cpu) = run("cpu", "default", "cpu.safetensors");
    let (text, bf16) = run("tpu", "default", "bf16.safetensors");
    assert!(text.contains("simulated v2-8 core") && text.contains("cycles"), "{text}");
    let (_, f32ish) = run("tpu", "highest", "highest.safetensors");
    // One bf16 pass rounds inputs to 8 significant bits: ~1e-2 relative, never more than 3e-2.
    let (cos, rel) = closeness(&cpu, &bf16);
    assert!(cos > 0.9999 && rel < 3e-2 && rel > 1e-5, "default precision: cosine {cos}, relative error {rel}");
    // Six passes recover f32 products: only accumulation order differs.
    let (cos, rel) = closeness(&cpu, &f32ish);
    assert!(cos > 0.999_999 && rel < 1e-4, "highest precision: cosine {cos}, relative error {rel}");

    // Without --input, a seeded random batch; the JSON names what was simulated.
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "run",
        "lenet5",
        "--batch",
        "2",
        "--output",
        &d.s("r.safetensors"),
        "--backend",
        "tpu",
        "--machine",
        "v3-8",
        "--json",
    ]))
    .unwrap();
    assert_eq!((v["batch"].as_u64(), v["machine"].as_str()), (Some(2), Some("v3-8")));
    assert!(v["simulated_step_cycles"].as_u64().unwrap() > 0);
    assert_eq!(tensors::load(d.path("r.safetensors")).unwrap()["logits"].shape(), &[2, 10]);

    // --profile on the simulated TPU: the functional engine's host time per instruction kind.
    let out = ok(&["run", "simple_cnn", "--output", &d.s("t.safetensors"), "--backend", "tpu", "--profile"]);
    assert!(out.contains("functional engine, host time per instruction kind"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("matmul ")), "{out}");
    tensors::save(d.path("bad.safetensors"), &image_batch(&[2, 32, 32, 1])).unwrap();
    let e = fails(&[
        "run",
        "simple_cnn",
        "--input",
        &d.s("bad.safetensors"),
        "--output",
        &d.s("t.safetensors"),
        "--backend",
        "tpu",
    ]);
    assert!(e.contains("bad.safetensors") && e.contains("'image'") && e.contains("[2, 28, 28, 1]"), "{e}");
}

#[test]
fn compile_reports_every_layer_against_its_roofline() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["compile", "lenet5", "--batch", "16", "--json"])).unwrap();
    let layers = v["layers"].as_array().unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names.first(), Some(&"c1"));
    assert!(names.contains(&"logits"), "{names:?}");
    for l in layers {
        let (cycles, fraction) = (l["cycles"].as_u64().unwrap(), l["roofline_fraction"].as_f64().unwrap());
        // Nothing beats its roofline; every kernel runs for some cycles.
        assert!(cycles > 0 && fraction > 0.0 && fraction <= 1.0, "{l}");
        let [first, end] = [l["instructions"][0].as_u64().unwrap(), l["instructions"][1].as_u64().unwrap()];
        assert!(first < end && end <= v["instructions"].as_u64().unwrap(), "{l}");
    }
    // A fused kernel's FLOPs are its ops': 2 * 28*28*6 outputs * 25 taps, plus bias and relu, per example.
    assert_eq!(layers[0]["ops"], "Conv2d+Relu");
    assert_eq!(layers[0]["flops"].as_u64().unwrap(), 16 * (2 * 28 * 28 * 6 * 25 + 2 * 28 * 28 * 6));

    let dump = ok(&["compile", "simple_cnn", "--dump-after", "fusion"]);
    assert!(dump.contains("== after fusion ==") && dump.contains("Conv2d+Relu"), "{dump}");
    let e = fails(&["compile", "simple_cnn", "--dump-after", "magic"]);
    assert!(e.contains("fusion, layout, storage, allocation, tiling"), "{e}");
    // Activations in bf16 by default at DEFAULT precision: the storage pass lists them.
    let dump = ok(&["compile", "simple_cnn", "--dump-after", "storage"]);
    assert!(dump.contains("B in bf16") && dump.contains("bf16") && dump.contains("conv1"), "{dump}");
    let dump = ok(&["compile", "simple_cnn", "--activations", "f32", "--dump-after", "storage"]);
    assert!(dump.contains("0 B in bf16 (0 B saved)"), "{dump}");
    let e = fails(&["compile", "simple_cnn", "--activations", "fp8"]);
    assert!(e.contains("--activations fp8: use bf16 or f32"), "{e}");
    let e = fails(&["run", "simple_cnn", "--activations", "bf16", "--output", "/dev/null"]);
    assert!(e.contains("--backend tpu"), "{e}");
    let e = fails(&["compile", "vgg16", "--batch", "4096"]);
    assert!(e.contains("GiB of HBM per core") && e.contains("lower the batch"), "{e}");
    let e = fails(&["compile", "simple_cnn", "--batch", "0"]);
    assert!(e.contains("batch"), "{e}");
}

#[test]
fn simulate_reports_units_and_writes_a_trace() {
    let d = Dir::new();
    let args = ["simulate", "simple_cnn", "--batch", "32", "--json", "--trace", &d.s("t.json")];
    let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let cycles = v["step_cycles"].as_u64().unwrap();
    let seconds = v["core_step_seconds"].as_f64().unwrap();
    // v2 cores run at 700 MHz; the slice's step adds the host's round trip (1 ms per 100 steps).
    assert!((seconds * 700e6 - cycles as f64).abs() < 1.0, "{v}");
    assert!((v["step_seconds"].as_f64().unwrap() - seconds - 1e-5).abs() < 1e-12, "{v}");
    assert_eq!((v["cores"].as_u64(), v["chips"].as_u64(), v["global_batch"].as_u64()), (Some(8), Some(4), Some(256)));
    let units = v["units"].as_array().unwrap();
    assert!(units.iter().any(|u| u["unit"] == "mxu0" && u["busy_cycles"].as_u64().unwrap() > 0), "{v}");
    assert!(units.iter().all(|u| u["utilization"].as_f64().unwrap() <= 1.0));
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path("t.json")).unwrap()).unwrap();
    assert!(trace["traceEvents"].as_array().unwrap().iter().any(|e| e["ph"] == "X"));
    // The same step on a faster machine takes less time.
    let v4: serde_json::Value =
        serde_json::from_str(&ok(&["simulate", "simple_cnn", "--batch", "32", "--machine", "v4-8", "--json"])).unwrap();
    assert!(v4["core_step_seconds"].as_f64().unwrap() < seconds, "{v4}");
}

#[test]
fn slices_train_with_the_gradient_all_reduce_and_scale() {
    // A training step on v3-32 over a global batch: 4 per core, the gradients all-reduced in
    // buckets, the shares adding up to the step.
    let d = Dir::new();
    let args = ["simulate", "digits_cnn", "--train", "--machine", "v3-32", "--global-batch", "128", "--json"];
    let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!((v["cores"].as_u64(), v["batch"].as_u64(), v["core_runs"].as_u64()), (Some(32), Some(4), Some(1)));
    assert!(v["allreduce_buckets"].as_u64().unwrap() >= 1 && v["allreduce_seconds"]["total"].as_f64().unwrap() > 0.0);
    let parts = v["compute_seconds"].as_f64().unwrap()
        + v["allreduce_seconds"]["exposed"].as_f64().unwrap()
        + v["infeed_seconds"]["exposed"].as_f64().unwrap()
        + v["host_seconds"].as_f64().unwrap();
    assert!((parts - v["step_seconds"].as_f64().unwrap()).abs() < 1e-12, "{v}");
    assert!(!v["busiest_links"].as_array().unwrap().is_empty());
    // Every core on its own gives the same step; a slow input pipeline shows as infeed.
    let full: serde_json::Value = serde_json::from_str(&ok(&[&args[..], &["--no-shortcut"]].concat())).unwrap();
    assert_eq!(full["step_seconds"], v["step_seconds"]);
    assert_eq!(full["core_runs"].as_u64(), Some(32));
    let slow: serde_json::Value = serde_json::from_str(&ok(&[&args[..], &["--input-rate", "100"]].concat())).unwrap();
    assert!((slow["infeed_seconds"]["per_step"].as_f64().unwrap() - 32.0 * 4.0 / 100.0 * 0.25).abs() < 1e-9, "{slow}");
    // The trace has core 0 and the network.
    ok(&["simulate", "digits_cnn", "--train", "--machine", "v3-32", "--trace", &d.s("s.json"), "--trace-cores", "0,5"]);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path("s.json")).unwrap()).unwrap();
    let names: Vec<String> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.iter().any(|n| n.contains("core 5")) && names.iter().any(|n| n.contains("ICI")), "{names:?}");
    // Bad slices and batches.
    let e = fails(&["simulate", "digits_cnn", "--machine", "v3-32", "--global-batch", "100"]);
    assert!(e.contains("--global-batch 100 does not split evenly over the 32 cores") && e.contains("128"), "{e}");
    let e = fails(&["simulate", "digits_cnn", "--machine", "v3-32", "--global-batch", "0"]);
    assert!(e.contains("--global-batch 0"), "{e}");
    let e = fails(&["simulate", "digits_cnn", "--machine", "v3-32", "--host-rate", "9=10"]);
    assert!(e.contains("host 9 does not exist"), "{e}");
    // Batch norm over groups of 4 replicas: its sums all-reduced in the step (forward and
    // backward, per batch norm), the same step with every core on its own.
    let g = zoo::build_with("resnet18", zoo::ZooOptions { input_hw: Some([16, 16]), classes: Some(10) }).unwrap();
    g.save(d.path("r18.ron")).unwrap();
    let bn = ["simulate", &d.s("r18.ron"), "--train", "--machine", "v2-8", "--batch", "2", "--json"];
    let alone: serde_json::Value = serde_json::from_str(&ok(&bn)).unwrap();
    assert_eq!(alone["batch_norm_allreduces"].as_u64(), Some(0));
    let grouped: serde_json::Value = serde_json::from_str(&ok(&[&bn[..], &["--bn-group", "4"]].concat())).unwrap();
    assert_eq!(grouped["batch_norm_allreduces"].as_u64(), Some(2 * 20), "{grouped}");
    assert_eq!(grouped["allreduce_buckets"], alone["allreduce_buckets"]);
    assert!(grouped["step_seconds"].as_f64() > alone["step_seconds"].as_f64());
    let full = ok(&[&bn[..], &["--bn-group", "4", "--no-shortcut"]].concat());
    assert_eq!(serde_json::from_str::<serde_json::Value>(&full).unwrap()["step_seconds"], grouped["step_seconds"]);
    let e = fails(&[&bn[..], &["--bn-group", "3"]].concat());
    assert!(e.contains("--bn-group 3") && e.contains("divides the slice's 8 cores"), "{e}");
    // The sharded weight update: the same buckets reduce-scattered, each replica's update a
    // shard of the whole, the same step with every core on its own.
    let sharded: serde_json::Value = serde_json::from_str(&ok(&[&bn[..], &["--sharded-update"]].concat())).unwrap();
    assert_eq!(sharded["sharded_update"], true);
    assert_eq!(alone["sharded_update"], false);
    assert_eq!(sharded["allreduce_buckets"], alone["allreduce_buckets"]);
    assert!(sharded["compute_seconds"].as_f64() < alone["compute_seconds"].as_f64(), "{sharded}");
    let full = ok(&[&bn[..], &["--sharded-update", "--no-shortcut"]].concat());
    assert_eq!(serde_json::from_str::<serde_json::Value>(&full).unwrap()["step_seconds"], sharded["step_seconds"]);
    let e = fails(&["simulate", "digits_cnn", "--machine", "v2-8", "--sharded-update"]);
    assert!(e.contains("--sharded-update needs --train"), "{e}");
    // scale: a row per slice, efficiency against the first, and a plot.
    let out = ok(&[
        "scale",
        "digits_cnn",
        "--train",
        "--machine",
        "v2",
        "--cores",
        "8,32",
        "--batch",
        "8",
        "--json",
        "--plot",
        &d.s("p.svg"),
    ]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["scaling_efficiency"].as_f64(), Some(1.0));
    for key in ["cores", "chips", "global_batch", "step_seconds", "examples_per_second", "scaling_efficiency"] {
        assert!(rows[1][key].is_number(), "{key}: {}", rows[1]);
    }
    assert_eq!(rows[1]["global_batch"].as_u64(), Some(256));
    assert!(std::fs::read_to_string(d.path("p.svg")).unwrap().contains("scaling efficiency"));
    let e = fails(&["scale", "digits_cnn", "--machine", "v3", "--cores", "8,24"]);
    assert!(e.contains("--cores 24") && e.contains("v3-24"), "{e}");
}

#[test]
fn compare_measures_the_simulated_tpu_against_the_reference() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["compare", "lenet5", "--batch", "8", "--json"])).unwrap();
    let logits = &v["outputs"][0];
    assert_eq!(logits["name"], "logits");
    let (cos, rel) = (logits["cosine"].as_f64().unwrap(), logits["max_rel_error"].as_f64().unwrap());
    assert!(cos > 0.9999 && rel < 3e-2 && rel > 0.0, "{v}");
    assert!(v["simulated_cycles"].as_u64().unwrap() > 0 && v["cpu_reference_seconds"].as_f64().unwrap() > 0.0);
    let text = ok(&["compare", "simple_cnn", "--precision", "highest"]);
    assert!(text.contains("CPU reference") && text.contains("simulated TPU"), "{text}");
}

const MLP: &str = r#"(
  name: "mlp",
  nodes: [
    (name: "x", op: Input(shape: [64], dtype: F32)),
    (name: "fc1/kernel", op: Parameter(shape: [64, 256], init: GlorotUniform)),
    (name: "fc1/bias", op: Parameter(shape: [256], init: Zeros)),
    (name: "fc1", op: Dense, inputs: ["x", "fc1/kernel", "fc1/bias"]),
    (name: "fc1_relu", op: Relu, inputs: ["fc1"]),
    (name: "logits/kernel", op: Parameter(shape: [256, 10], init: GlorotUniform)),
    (name: "logits/bias", op: Parameter(shape: [10], init: Zeros)),
    (name: "logits", op: Dense, inputs: ["fc1_relu", "logits/kernel", "logits/bias"]),
  ],
  outputs: ["logits"],
)"#;

#[test]
fn a_training_step_compiles_simulates_and_compares() {
    let d = Dir::new();
    std::fs::write(d.path("mlp.ron"), MLP).unwrap();
    let model = d.s("mlp.ron");
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "compile",
        &model,
        "--train",
        "--optimizer",
        "lars",
        "--schedule",
        "warmup=2,cosine=10",
        "--weight-decay",
        "1e-4",
        "--json",
    ]))
    .unwrap();
    let layers = v["layers"].as_array().unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    for want in ["fc1", "loss", "bwd/logits/kernel", "update/fc1/kernel", "update/logits/bias"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // LARS takes the norms of kernels, not of biases (the recipe's skip list).
    let strategy = |name: &str| layers.iter().find(|l| l["name"] == name).unwrap()["strategy"].as_str().unwrap();
    assert!(strategy("update/fc1/kernel").contains("lars") && strategy("update/fc1/kernel").contains("norms"));
    assert!(!strategy("update/logits/bias").contains("norms"), "{}", strategy("update/logits/bias"));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["simulate", &model, "--train", "--batch", "64", "--json"])).unwrap();
    assert!(v["step_cycles"].as_u64().unwrap() > 0 && v["examples_per_second"].as_f64().unwrap() > 0.0);

    // Highest precision: the loss and every gradient as the reference's, to f32 rounding.
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["compare", &model, "--train", "--batch", "16", "--precision", "highest", "--json"]))
            .unwrap();
    let outputs = v["outputs"].as_array().unwrap();
    let names: Vec<&str> = outputs.iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["loss", "fc1/kernel/grad", "fc1/bias/grad", "logits/kernel/grad", "logits/bias/grad"]);
    for o in outputs {
        assert!(o["max_rel_error"].as_f64().unwrap() < 1e-5, "{o}");
    }
    assert_eq!(v["training"], true);

    // Convolution and pooling gradients: digits_cnn's step at highest precision.
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "compare",
        "digits_cnn",
        "--train",
        "--batch",
        "8",
        "--precision",
        "highest",
        "--json",
    ]))
    .unwrap();
    for o in v["outputs"].as_array().unwrap() {
        assert!(o["max_rel_error"].as_f64().unwrap() < 1e-4, "{o}");
    }
    assert_eq!(v["outputs"].as_array().unwrap().len(), 9);

    let e = fails(&["compile", &model, "--train", "--optimizer", "adagrad"]);
    assert!(e.contains("sgd, momentum, nesterov, adam, rmsprop or lars"), "{e}");
    let e = fails(&["compile", &model, "--train", "--schedule", "warmup=abc"]);
    assert!(e.contains("--schedule warmup=abc") && e.contains("not a whole number of steps"), "{e}");
    let e = fails(&["compile", &model, "--train", "--weight-decay", "-1"]);
    assert!(e.contains("weight decay -1"), "{e}");
    let e = fails(&["compile", &model, "--train", "--learning-rate", "-1"]);
    assert!(e.contains("positive"), "{e}");
}

/// Every op lowers, but a kernel whose smallest blocks overflow VMEM cannot be placed; the
/// error names it and the field to change.
#[test]
fn a_kernel_the_lowering_cannot_place_is_named() {
    let e = fails(&["compile", "simple_cnn", "--set", "core.vmem_bytes=70000"]);
    assert!(e.contains("node 'conv2' (Conv2d)") && e.contains("cannot place") && e.contains("core.vmem_bytes"), "{e}");
    // Concatenation along any axis is placed (one strided DMA per input).
    let d = Dir::new();
    std::fs::write(d.path("stacked.ron"), CONCAT_HEIGHT).unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "run",
        &d.s("stacked.ron"),
        "--batch",
        "2",
        "--output",
        &d.s("y.safetensors"),
        "--backend",
        "tpu",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["backend"], "tpu");
    assert_eq!(tensors::load(d.path("y.safetensors")).unwrap()["cat"].shape(), &[2, 8, 4, 8]);
}

/// Two copies of an image stacked along the height axis.
const CONCAT_HEIGHT: &str = r#"(
  name: "stacked",
  nodes: [
    (name: "x", op: Input(shape: [4, 4, 8], dtype: F32)),
    (name: "cat", op: Concat(axis: 1), inputs: ["x", "x"]),
  ],
  outputs: ["cat"],
)"#;

#[test]
fn collective_times_a_ring_against_its_closed_form() {
    // A full v3 pod wraps both axes: the unloaded all-reduce takes its closed form.
    let out = ok(&["collective", "all-reduce", "--bytes", "100000000", "--machine", "v3-2048", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (got, want) = (v["seconds"].as_f64().unwrap(), v["closed_form_seconds"].as_f64().unwrap());
    assert!((got - want).abs() <= 1e-9 * want, "{out}");
    assert_eq!(v["chips"], 1024);
    assert_eq!(v["busiest_links"].as_array().unwrap().len(), 4);
    // A 4x4 mesh (v3-32) folds its rings over the lines: at most 6% over the folded closed form.
    let out = ok(&["collective", "all-reduce", "--bytes", "100000000", "--machine", "v3-32", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ratio = v["seconds"].as_f64().unwrap() / v["closed_form_seconds"].as_f64().unwrap();
    assert!((1.0..1.06).contains(&ratio), "{out}");
    let text = ok(&["collective", "reduce-scatter", "--bytes", "1000000", "--machine", "v4-128"]);
    assert!(text.contains("4x4x4") && text.contains("busiest links"), "{text}");
    let e = fails(&["collective", "all-reduce", "--bytes", "0"]);
    assert!(e.contains("--bytes 0"), "{e}");
    let e = fails(&["collective", "all-sum", "--bytes", "8"]);
    assert!(e.contains("unknown collective 'all-sum': use all-reduce, reduce-scatter, all-gather or broadcast"), "{e}");
    let e = fails(&["collective", "all-reduce", "--bytes", "100000000", "--chunk-bytes", "1"]);
    assert!(e.contains("--chunk-bytes 1 cuts each transfer") && e.contains("use at least"), "{e}");
    let e = fails(&["collective", "all-reduce", "--bytes", "8", "--set", "slice.torus=[1000,1000]"]);
    assert!(e.contains("slice.torus") && e.contains("more than the 1048576 cores this simulator models"), "{e}");
    let e = fails(&["collective", "all-reduce", "--bytes", "8", "--machine", "v9-8"]);
    assert!(e.contains("unknown machine"), "{e}");
}

#[test]
fn a_machine_file_degrades_and_fails_links() {
    // The v3 pod with one link at half bandwidth and one failed, written into its machine file.
    let d = Dir::new();
    let ron = ok(&["machines", "v3-2048", "--ron"]);
    let links = "    links: [\n      (chip: [3, 3], axis: 0, direction: Up, bytes_per_second: Some(41e9)),\n      (chip: [7, 7], axis: 1, direction: Down, failed: true),\n    ],\n  ),\n  sources:";
    let edited = ron.replacen("\n  ),\n  sources:", &format!("\n{links}"), 1);
    assert_ne!(edited, ron, "the slice section is where the test expects it");
    std::fs::write(d.path("slow.ron"), &edited).unwrap();
    let out = ok(&["collective", "all-reduce", "--bytes", "100000000", "--machine", &d.s("slow.ron"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["seconds"].as_f64().unwrap() > 1.5 * v["closed_form_seconds"].as_f64().unwrap(), "{out}");
    // A link the slice does not have: the field and why.
    let bad = edited.replace("(chip: [7, 7], axis: 1", "(chip: [7, 40], axis: 1");
    std::fs::write(d.path("bad.ron"), &bad).unwrap();
    let e = fails(&["collective", "all-reduce", "--bytes", "8", "--machine", &d.s("bad.ron")]);
    assert!(e.contains("slice.links[1]") && e.contains("[7, 40]"), "{e}");
}
