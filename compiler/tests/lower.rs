//! The lowering against the CPU reference: zoo models at small sizes, compiled for a simulated
//! core and run by the functional engine, match the f32 reference within bf16 tolerance.

mod common;

use common::*;
use systolic_compiler::lower::{Options, compile};
use systolic_compiler::reference::{self, RunOptions};
use systolic_compiler::zoo::{self, ZooOptions};
use systolic_compiler::{Graph, TensorMap};
use systolic_simulator::config::presets;
use systolic_simulator::numerics::Precision;
use systolic_simulator::timing::simulate;

/// Compiles `g` for `machine` at `batch`, runs it on the functional simulator and the CPU
/// reference on the same weights and input, and returns the worst error relative to the
/// largest reference value of each output.
fn differential(g: &Graph, machine: &str, batch: usize, precision: Precision) -> Vec<(String, f64)> {
    let m = presets::preset(machine).unwrap();
    let compiled = compile(g, &Options { machine: m.clone(), batch, precision, training: false }).unwrap();
    let mut b: TensorMap = g.init_parameters(3);
    for id in g.inputs() {
        let node = g.node(id);
        b.insert(node.name.clone(), rand_tensor(&node.shape.concrete(batch), 5));
    }
    let (want, _) = reference::run_outputs(g, &b, RunOptions::default()).unwrap();
    let got = compiled.executable.run(&m, |name| b.get(name).and_then(|t| t.as_slice())).unwrap();
    // The timing engine accepts the same program.
    simulate(&m, &compiled.executable.program, false).unwrap();
    got.into_iter()
        .map(|(name, values)| {
            let w = &want[&name];
            let scale = w.iter().fold(0f64, |a, &v| a.max((v as f64).abs())).max(1e-30);
            let err = w.iter().zip(&values).fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs())) / scale;
            (name, err)
        })
        .collect()
}

fn small(name: &str, hw: usize) -> Graph {
    zoo::build_with(name, ZooOptions { input_hw: Some([hw, hw]), classes: Some(10) }).unwrap()
}

#[test]
fn small_cnns_match_the_reference() {
    for (name, hw) in [("digits_cnn", 8), ("simple_cnn", 28), ("lenet5", 32)] {
        for (out, err) in differential(&small(name, hw), "v2-8", 3, Precision::Default) {
            // bf16 inputs keep 8 significant bits; sums stay f32.
            assert!(err < 2e-2, "{name}/{out}: relative error {err}");
        }
    }
}

#[test]
fn highest_precision_matches_closely() {
    for (out, err) in differential(&small("simple_cnn", 28), "v2-8", 2, Precision::Highest) {
        assert!(err < 1e-5, "simple_cnn/{out}: relative error {err}");
    }
}

#[test]
fn residual_and_depthwise_networks_match_the_reference() {
    for (name, hw, machine) in [("resnet18", 32, "v3-8"), ("resnet50", 32, "v4-8"), ("mobilenet_v1", 32, "v2-8")] {
        for (out, err) in differential(&small(name, hw), machine, 2, Precision::Highest) {
            assert!(err < 1e-4, "{name}/{out}: relative error {err}");
        }
    }
}

#[test]
fn classic_large_models_compile_and_match_at_small_sizes() {
    for (name, hw) in [("vgg16", 32), ("alexnet", 64)] {
        for (out, err) in differential(&small(name, hw), "v2-8", 1, Precision::High) {
            assert!(err < 1e-3, "{name}/{out}: relative error {err}");
        }
    }
}

#[test]
fn bands_many_images_and_channel_blocks_match_the_reference() {
    // 64x64 images are staged in bands; 40 small images share blocks; 512 channels are split.
    for (name, hw, batch) in [("vgg16", 64, 1), ("digits_cnn", 8, 40), ("resnet34", 40, 3)] {
        for (out, err) in differential(&small(name, hw), "v2-8", batch, Precision::High) {
            assert!(err < 1e-3, "{name}/{out}: relative error {err}");
        }
    }
}

#[test]
fn compile_errors_name_what_to_change() {
    let m = presets::preset("v2-8").unwrap();
    let opts = |batch| Options { machine: m.clone(), batch, precision: Precision::Default, training: false };
    let g = small("simple_cnn", 28);
    let e = compile(&g, &opts(0)).unwrap_err().to_string();
    assert!(e.contains("batch of zero"), "{e}");
    // VGG-16 at 224x224 with a batch of 2048 needs far more than 8 GiB of activations.
    let big = zoo::build("vgg16").unwrap();
    let e = compile(&big, &opts(2048)).unwrap_err().to_string();
    assert!(
        e.contains("GiB of HBM per core") && e.contains("v2-8 cores have 8.00 GiB: lower the batch or add cores"),
        "{e}"
    );
    // An op the lowering cannot place.
    let (with_loss, _) = g.with_classifier_loss(0.0).unwrap();
    let mut g2 = with_loss.clone();
    g2.set_outputs(vec![g2.find("loss").unwrap()]);
    let e = compile(&g2, &opts(2)).unwrap_err().to_string();
    assert!(e.contains("node 'loss'") && e.contains("cannot place"), "{e}");
    let e = compile(&g, &Options { training: true, ..opts(2) }).unwrap_err().to_string();
    assert!(e.contains("training"), "{e}");
}
