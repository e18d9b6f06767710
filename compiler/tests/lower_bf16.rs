//! bf16 storage against the reference's bf16-storage mode: activations, kept values and
//! activation gradients stored in HBM as bf16, every zoo model at a small size, forward and a
//! whole training step. At HIGHEST precision the MXU's products are f32-exact, so what is left
//! between the program and the reference that rounds the same tensors at the same points is
//! f32 summation order — and, where an f32 difference straddles a bf16 rounding boundary, one
//! bf16 ulp (2^-8 relative) in a stored element. Against the f32 reference the gap is bf16
//! storage itself, which the tests require to be larger.

mod common;

use std::collections::BTreeMap;

use common::lowering::*;
use common::*;
use systolic_compiler::autodiff;
use systolic_compiler::lower::training::DROPOUT_STEP;
use systolic_compiler::lower::training::grad_name;
use systolic_compiler::lower::{Options, Training, compile};
use systolic_compiler::optimizer::Optimizer;
use systolic_compiler::reference::{self, RunOptions};
use systolic_compiler::{Graph, Tensor};
use systolic_simulator::config::presets;
use systolic_simulator::isa::DType;
use systolic_simulator::numerics::Precision;

/// HIGHEST precision with bf16 storage on `machine`.
fn bf16_options(machine: &str, batch: usize) -> Options {
    Options { activations: DType::Bf16, ..options(presets::preset(machine).unwrap(), batch, Precision::Highest) }
}

/// Each output's error (relative to its largest element) against the bf16-storage reference
/// and against the f32 reference.
fn forward(g: &Graph, machine: &str, batch: usize) -> Vec<(String, f64, f64)> {
    let opts = bf16_options(machine, batch);
    let compiled = compile(g, &opts).unwrap();
    let names = compiled.bf16_tensors();
    assert!(!names.is_empty(), "{}: activations are stored in bf16", g.name());
    let b = random_bindings(g, batch, 3, 5);
    let (f32_ref, _) = reference::run_outputs(g, &b, RunOptions::default()).unwrap();
    let (stored_ref, _) =
        reference::run_outputs(g, &b, RunOptions { bf16: Some(&names), ..Default::default() }).unwrap();
    let got = compiled.executable.run(&opts.machine, |name| b.get(name).and_then(|t| t.as_slice())).unwrap();
    got.into_iter()
        .map(|(name, v)| {
            let stored = rel_err(stored_ref[&name].as_slice().unwrap(), &v);
            let f32 = rel_err(f32_ref[&name].as_slice().unwrap(), &v);
            (name, stored, f32)
        })
        .collect()
}

/// A training step's loss and gradients: (name, error against the bf16-storage reference,
/// against the f32 reference), the loss relative, the gradients in norm.
fn training_step(g: &Graph, machine: &str, batch: usize) -> Vec<(String, f64, f64)> {
    let (with_loss, loss) = g.with_classifier_loss(0.0).unwrap();
    let grads = autodiff::differentiate(&with_loss, loss, &with_loss.trainable_parameters()).unwrap();
    let training = Some(Training { optimizer: Optimizer::sgd(0.1), label_smoothing: 0.0 });
    let opts = Options { training, ..bf16_options(machine, batch) };
    let compiled = compile(g, &opts).unwrap();
    let names = compiled.bf16_tensors();
    let mut b = random_bindings(g, batch, 3, 5);
    let mut feed = add_labels(&mut b, batch);
    feed.insert(DROPOUT_STEP.into(), Tensor::from_shape_vec(vec![1], vec![0.0]).unwrap());
    let got: BTreeMap<String, Vec<f32>> = compiled
        .executable
        .run(&opts.machine, |name| feed.get(name).and_then(|t| t.as_slice()))
        .unwrap()
        .into_iter()
        .collect();
    let f32_ref = reference::run_gradients(&grads, &b, RunOptions::training(0)).unwrap();
    let stored_ref =
        reference::run_gradients(&grads, &b, RunOptions { bf16: Some(&names), ..RunOptions::training(0) }).unwrap();
    let loss_of = |t: &Tensor| [t.iter().next().copied().unwrap()];
    let mut out = vec![(
        "loss".to_string(),
        rel_err(&loss_of(&stored_ref.root), &got["loss"]),
        rel_err(&loss_of(&f32_ref.root), &got["loss"]),
    )];
    for (name, want) in &stored_ref.grads {
        let got = &got[&grad_name(name)];
        out.push((
            name.clone(),
            norm_err(want.as_slice().unwrap(), got),
            norm_err(f32_ref.grads[name].as_slice().unwrap(), got),
        ));
    }
    out
}

/// Small CNNs (no batch norm), forward and a training step: within f32 summation order of
/// the bf16-storage reference (1.5e-7 to 8.3e-7 measured), at least 100 times closer than to
/// the f32 reference (1e-3 to 1e-1 measured: the error of bf16 storage itself).
#[test]
fn small_cnns_match_the_bf16_storage_reference_closely() {
    for (name, hw) in [("digits_cnn", 8), ("simple_cnn", 28), ("lenet5", 32)] {
        let g = small_model(name, hw);
        for (out, stored, f32) in forward(&g, "v2-8", 3).into_iter().chain(training_step(&g, "v2-8", 3)) {
            assert!(stored < 1e-5, "{name}/{out}: {stored:.3e} from the bf16-storage reference");
            assert!(
                f32 == 0.0 || stored * 100.0 < f32,
                "{name}/{out}: {stored:.3e} against bf16 storage, {f32:.3e} against f32"
            );
        }
    }
}

/// Every zoo model's forward pass at a small size. Deep networks cannot agree to f32
/// rounding: where the program's f32 sum and the reference's differ in the last bit next to a
/// bf16 rounding boundary, the stored value differs by one bf16 ulp (2^-8 relative), and the
/// layers after carry it; measured against the bf16-storage reference 3e-3 (AlexNet) to 1.1e-2
/// (ResNet-34) of the largest output, the same order as against f32 (4e-3 to 1.3e-2). The
/// bound is a few bf16 ulps.
#[test]
fn every_zoo_model_forward_stays_within_bf16_ulps_of_the_bf16_storage_reference() {
    for (name, hw, machine, batch) in [
        ("alexnet", 64, "v2-8", 1),
        ("vgg16", 32, "v2-8", 1),
        ("resnet18", 32, "v3-8", 2),
        ("resnet34", 32, "v2-8", 2),
        ("resnet50", 32, "v4-8", 2),
        ("mobilenet_v1", 32, "v2-8", 2),
    ] {
        for (out, stored, _) in forward(&small_model(name, hw), machine, batch) {
            assert!(stored < 2e-2, "{name}/{out}: {stored:.3e} from the bf16-storage reference");
        }
    }
}

/// Every deep zoo model's training step with bf16 storage runs and its loss agrees with the
/// bf16-storage reference's. Gradients are not compared element by element: at these sizes
/// the bf16-storage reference itself moves its gradients by 25% (VGG-16 at 32x32, batch 4)
/// and 37% (ResNet-18 at 64x64, batch 8) in norm when every input moves by one f32 ulp
/// (measured), so the program's one-ulp differences in stored values (see above) move them as
/// much; the small CNNs above show the kernels agree where the network does not amplify.
#[test]
fn deep_zoo_models_train_one_step_with_bf16_storage() {
    for (name, hw, batch) in
        [("alexnet", 64, 2), ("vgg16", 32, 2), ("resnet18", 32, 4), ("resnet50", 64, 2), ("mobilenet_v1", 32, 4)]
    {
        let errs = training_step(&small_model(name, hw), "v2-8", batch);
        let (_, loss, _) = &errs[0];
        assert!(*loss < 0.1, "{name}: loss {loss:.3e} from the bf16-storage reference");
        assert!(errs.iter().all(|e| e.1.is_finite()), "{name}: {errs:?}");
    }
}

/// With bf16 storage every zoo model's full-size training step fits a v2 core at batch 128 per
/// core, the batch of the published v2-8 recipes (ResNet-50: 5.36 GiB of 8; in f32 it needs
/// 10.54 GiB and the compiler says so). Compile only.
#[test]
fn every_zoo_model_trains_at_batch_128_on_a_v2_core() {
    let m = presets::preset("v2-8").unwrap();
    let training = Some(Training::default());
    for name in systolic_compiler::zoo::names() {
        let g = systolic_compiler::zoo::build(name).unwrap();
        let opts = Options {
            training: training.clone(),
            activations: DType::Bf16,
            ..options(m.clone(), 128, Precision::Default)
        };
        let c = compile(&g, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(c.executable.hbm_peak_bytes <= m.core.hbm.bytes, "{name}");
    }
    let g = systolic_compiler::zoo::build("resnet50").unwrap();
    let f32 = Options { training, ..options(m.clone(), 128, Precision::Default) };
    let e = compile(&g, &f32).unwrap_err().to_string();
    assert!(e.contains("10.54 GiB") && e.contains("--activations bf16"), "{e}");
}
