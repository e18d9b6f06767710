//! Helpers for tests of the lowering: a graph compiled for a simulated core and run by the
//! functional engine, against the CPU reference.

use std::collections::BTreeMap;

use super::{labels, random_bindings};
use systolic_compiler::autodiff;
use systolic_compiler::lower::training::DROPOUT_STEP;
use systolic_compiler::lower::training::{ONE_HOT_SUFFIX, grad_name};
use systolic_compiler::lower::{Options, Training, compile};
use systolic_compiler::optimizer::Optimizer;
use systolic_compiler::reference::{self, RunOptions};
use systolic_compiler::{Graph, NodeId, Op, Tensor, TensorMap};
use systolic_simulator::config::{Machine, presets};
use systolic_simulator::isa::DType;
use systolic_simulator::numerics::Precision;
use systolic_simulator::timing::simulate;

/// Compiles `g` for `machine` at `batch`, runs it on the functional simulator and the CPU
/// reference on the same weights and input, and returns the worst error relative to the
/// largest reference value of each output.
pub fn differential(g: &Graph, machine: &str, batch: usize, precision: Precision) -> Vec<(String, f64)> {
    let m = presets::preset(machine).unwrap();
    let compiled = compile(g, &options(m.clone(), batch, precision)).unwrap();
    let b = random_bindings(g, batch, 3, 5);
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

/// [`differential`] with each output's error relative to the magnitude of the terms it sums:
/// the reference run on the absolute values of the weights and input (`|W|·|x|` through
/// the layers — exact for convolutions, dense layers, pooling and ReLU, a scale elsewhere).
/// That is the classic bound of a sum's rounding, so outputs that nearly cancel (a dense head
/// over a few ReLU outputs) are held to the rounding of their terms, not of their small sum.
pub fn differential_by_magnitude(g: &Graph, machine: &str, batch: usize, precision: Precision) -> Vec<(String, f64)> {
    let m = presets::preset(machine).unwrap();
    let compiled = compile(g, &options(m.clone(), batch, precision)).unwrap();
    let b = random_bindings(g, batch, 3, 5);
    let (want, _) = reference::run_outputs(g, &b, RunOptions::default()).unwrap();
    let abs: TensorMap = b.iter().map(|(k, t)| (k.clone(), t.mapv(f32::abs))).collect();
    let (magnitude, _) = reference::run_outputs(g, &abs, RunOptions::default()).unwrap();
    let got = compiled.executable.run(&m, |name| b.get(name).and_then(|t| t.as_slice())).unwrap();
    got.into_iter()
        .map(|(name, values)| {
            let (w, mag) = (&want[&name], &magnitude[&name]);
            let largest = |t: &Tensor| t.iter().fold(0f64, |a, &v| a.max((v as f64).abs()));
            let scale = largest(w).max(largest(mag)).max(1e-30);
            let err = w.iter().zip(&values).fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs())) / scale;
            (name, err)
        })
        .collect()
}

/// Gradients of one SGD step at HIGHEST precision against the reference, element by element.
pub fn gradients_match(g: Graph, batch: usize) {
    gradients_match_at_step(g, batch, 0);
}

/// [`gradients_match`] on another machine (several MXUs per core share the work).
pub fn gradients_match_on(g: Graph, batch: usize, machine: &str) {
    check_step(g, batch, 0, Check::Elements, machine);
}

/// A whole deep model's step at HIGHEST precision: the loss to 1e-4 (f32 batch statistics
/// against the reference's f64), gradients to 10% in norm. Exact agreement is not a sound
/// expectation there: a ReLU input within f32 rounding of 0, or a near tie in a max-pool
/// window, routes a gradient differently in two runs. The reference itself moves ResNet-18's
/// gradients by 0.9% and ResNet-50's by 1.4% in norm when its input moves by one ulp
/// (measured); the simulated step differs by up to 2% (ResNet-18), 3% (VGG-16: one ReLU at
/// 2.2e-8 against activations of 0.18) and 8% (ResNet-50).
pub fn deep_model_gradients_match(g: Graph, batch: usize) {
    check_step(g, batch, 0, Check::Norm(0.1), "v2-8");
}

enum Check {
    /// Every element to `1e-4` of the largest (plus `1e-6` of the step's largest gradient).
    Elements,
    /// The 2-norm of the difference relative to the reference's.
    Norm(f64),
}

/// [`gradients_match`] for training step `step` (dropout draws each step's own mask).
pub fn gradients_match_at_step(g: Graph, batch: usize, step: u64) {
    check_step(g, batch, step, Check::Elements, "v2-8");
}

fn check_step(g: Graph, batch: usize, step: u64, check: Check, machine: &str) {
    let m = presets::preset(machine).unwrap();
    let (with_loss, loss) = g.with_classifier_loss(0.0).unwrap();
    let grads = autodiff::differentiate(&with_loss, loss, &with_loss.trainable_parameters()).unwrap();
    let training = Some(Training { optimizer: Optimizer::sgd(0.1), label_smoothing: 0.0 });
    let compiled = compile(&g, &Options { training, ..options(m.clone(), batch, Precision::Highest) }).unwrap();
    let mut b = random_bindings(&g, batch, 3, 5);
    let mut feed = add_labels(&mut b, batch);
    feed.insert(DROPOUT_STEP.into(), Tensor::from_shape_vec(vec![1], vec![step as f32]).unwrap());
    let got: BTreeMap<String, Vec<f32>> =
        compiled.executable.run(&m, |name| feed.get(name).and_then(|t| t.as_slice())).unwrap().into_iter().collect();
    simulate(&m, &compiled.executable.program, false).unwrap();
    let want = reference::run_gradients(&grads, &b, RunOptions::training(step)).unwrap();
    if let Some(next) = got.get(DROPOUT_STEP) {
        assert_eq!(next, &[(step + 1) as f32], "the program advances its step counter");
    }
    let loss_err = rel_err(&[want.root.iter().next().copied().unwrap()], &got["loss"]);
    // Deep models pass the loss through many f32 batch statistics (the reference's are f64).
    let loss_tol = if matches!(check, Check::Norm(_)) { 1e-4 } else { 1e-6 };
    assert!(loss_err < loss_tol, "{}: loss {loss_err}", g.name());
    if matches!(check, Check::Elements) && near_a_kink(&with_loss, &b, step) {
        // The two runs may send a gradient either way there; the loss agreed.
        return;
    }
    // A gradient that nearly cancels (a bias summing dy of both signs) is small next to the
    // terms it sums: its rounding is measured against the step's largest gradient too.
    let step_scale = want.grads.values().flat_map(|t| t.iter()).fold(0f64, |a, &v| a.max((v as f64).abs()));
    for (name, gw) in &want.grads {
        let (gw, gs) = (gw.as_slice().unwrap(), &got[&grad_name(name)]);
        if let Check::Norm(tol) = check {
            let e = norm_err(gw, gs);
            assert!(e < tol, "{}: gradient of {name}: {e} in norm", g.name());
            continue;
        }
        // Kernels agree to ~5e-7 of their largest element; a bias gradient sums thousands of
        // pixels, in another order than the reference's (1.5e-5 measured for 4,608 pixels,
        // 5.4e-5 for 6,400 whose sum partly cancels).
        let scale = gw.iter().fold(0f64, |a, &v| a.max((v as f64).abs()));
        let worst = gw.iter().zip(gs).fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs()));
        assert!(
            worst <= 1e-4 * scale + 1e-6 * step_scale,
            "{}: gradient of {name}: {worst} off, largest element {scale}, largest gradient {step_scale}",
            g.name()
        );
    }
}

/// Whether the reference puts any ReLU or ReLU6 input within 1e-5 (of the tensor's largest
/// value) of a kink, where rounding differences between two correct runs flip the mask and move
/// that element's gradient by its whole size (random cases hit one in about a hundred).
fn near_a_kink(g: &Graph, bindings: &TensorMap, step: u64) -> bool {
    let inputs: Vec<(NodeId, bool)> = g
        .nodes()
        .filter_map(|(_, n)| match n.op {
            Op::Relu => Some((n.inputs[0], false)),
            Op::Relu6 => Some((n.inputs[0], true)),
            _ => None,
        })
        .collect();
    let fetch: Vec<NodeId> = inputs.iter().map(|&(id, _)| id).collect();
    let ev = reference::run(g, bindings, &fetch, RunOptions::training(step)).unwrap();
    inputs.iter().any(|&(id, six)| {
        let v = ev.get(id).expect("fetched");
        let scale = v.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-30);
        // Exact zeros (a window of zero padding, ReLU zeros times any weight) are zeros in
        // both runs.
        v.iter().any(|&x| (x != 0.0 && x.abs() < 1e-5 * scale) || (six && (x - 6.0).abs() < 1e-5 * scale.max(6.0)))
    })
}

/// Inference of `batch` examples at `precision` on `machine`; set `training` for a step.
pub fn options(machine: Machine, batch: usize, precision: Precision) -> Options {
    // f32 storage: these tests hold the lowering to the f32 reference; bf16 storage is tested
    // against the reference's bf16-storage mode.
    Options { activations: DType::F32, ..Options::new(machine, batch, precision) }
}

/// Binds `labels` (ten classes, [`labels`]) in `b` and returns what a compiled program is fed:
/// `b` and the labels one-hot (`labels/one_hot`).
pub fn add_labels(b: &mut TensorMap, batch: usize) -> TensorMap {
    let y = labels(batch, 10);
    b.insert("labels".into(), y.clone());
    let mut feed = b.clone();
    feed.insert(format!("labels{ONE_HOT_SUFFIX}"), one_hot(&y, 10));
    feed
}

pub fn one_hot(labels: &Tensor, classes: usize) -> Tensor {
    let n = labels.len();
    let mut v = vec![0f32; n * classes];
    for (i, &l) in labels.iter().enumerate() {
        v[i * classes + l as usize] = 1.0;
    }
    Tensor::from_shape_vec(vec![n, classes], v).unwrap()
}

/// Largest difference relative to the largest reference magnitude.
pub fn rel_err(want: &[f32], got: &[f32]) -> f64 {
    assert_eq!(want.len(), got.len());
    let scale = want.iter().fold(0f64, |a, &v| a.max((v as f64).abs())).max(1e-30);
    want.iter().zip(got).fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs())) / scale
}

/// `|got - want| / |want|` in the 2-norm.
pub fn norm_err(want: &[f32], got: &[f32]) -> f64 {
    let diff: f64 = want.iter().zip(got).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|&x| (x as f64).powi(2)).sum();
    (diff / norm.max(1e-60)).sqrt()
}

/// Batch norm with batch statistics after a convolution, in a residual block, before a ReLU:
/// an 8x8x3 input `x` to global average pooling (the head is the caller's).
pub fn batch_normed_trunk(g: &mut Graph) -> NodeId {
    use systolic_compiler::graph::{BatchNorm, ConvSpec};
    let x = g.input("x", &[8, 8, 3]).unwrap();
    let h = g.conv2d("c1", x, ConvSpec::new(8, 3).same().no_bias()).unwrap();
    let h = g.batch_norm("bn1", h, BatchNorm::default()).unwrap();
    let a = g.relu("relu1", h).unwrap();
    let h = g.conv2d("c2", a, ConvSpec::new(8, 3).same().no_bias()).unwrap();
    let h = g.batch_norm("bn2", h, BatchNorm::default()).unwrap();
    let h = g.add_op("residual", h, a).unwrap();
    let h = g.relu("relu2", h).unwrap();
    g.global_avg_pool("gap", h).unwrap()
}
