//! Every backend against the CPU reference: the same model, starting state and batches,
//! three training steps and a prediction — the losses, the parameters and the predictions
//! agree within what bf16 (one MXU pass, bf16 activations) allows; the simulated backends
//! report simulated time; on a slice the replicas' mean gradient is the whole batch's.

use systolic_compiler::graph::{ConvSpec, Graph, Pool};
use systolic_compiler::optimizer::{Optimizer, STEP, Schedule};
use systolic_compiler::{Tensor, TensorMap};
use systolic_runtime::session::{self, DROPOUT_STEP};
use systolic_runtime::{Backend, Settings, Target, backend};
use systolic_simulator::config::presets;
use systolic_simulator::numerics::Precision;

/// A small CNN: convolution, ReLU, max pooling, dropout at `rate`, a dense classifier.
fn model(rate: f32) -> Graph {
    let mut g = Graph::new("small");
    let x = g.input("image", &[8, 8, 1]).unwrap();
    let h = g.conv2d("conv", x, ConvSpec::new(8, 3).same()).unwrap();
    let h = g.relu("relu", h).unwrap();
    let h = g.max_pool("pool", h, Pool::default()).unwrap();
    let h = g.dropout("drop", h, rate, 7).unwrap();
    let h = g.flatten("flat", h).unwrap();
    let logits = g.dense("logits", h, 10).unwrap();
    g.set_outputs(vec![logits]);
    g
}

/// Step `s`'s batch of `n` examples: images and integer labels.
fn batch(n: usize, s: usize) -> TensorMap {
    let image: Vec<f32> = (0..n * 64).map(|i| (((i * 37 + s * 11) % 29) as f32 - 14.0) / 14.0).collect();
    let labels: Vec<f32> = (0..n).map(|i| ((i * 7 + s) % 10) as f32).collect();
    TensorMap::from([
        ("image".to_string(), Tensor::from_shape_vec(vec![n, 8, 8, 1], image).unwrap()),
        ("labels".to_string(), Tensor::from_shape_vec(vec![n], labels).unwrap()),
    ])
}

/// The 2-norm of `a − b` over the norm of `a`.
fn norm_err(a: &Tensor, b: &Tensor) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b.iter()) {
        d += (x as f64 - y as f64).powi(2);
        n += (x as f64).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

/// Errors allowed (loss relative; gradients, state and predictions in norm): six passes and
/// f32 storage are the reference but for the order of sums; one pass with bf16 storage
/// flips ReLU masks and rounds every product's inputs, and once the parameters differ the
/// gradients drift apart (checked at the first `grad_steps` steps).
struct Tolerance {
    loss: f32,
    grads: f64,
    grad_steps: usize,
    state: f64,
    predictions: f64,
}

#[test]
fn every_backend_trains_and_predicts_like_the_reference() {
    let highest = Tolerance { loss: 1e-5, grads: 1e-4, grad_steps: 3, state: 1e-4, predictions: 1e-5 };
    matches_the_reference(Precision::Highest, highest);
    let default = Tolerance { loss: 2e-2, grads: 0.15, grad_steps: 1, state: 0.15, predictions: 5e-2 };
    matches_the_reference(Precision::Default, default);
}

/// One core with dropout (it draws the reference's masks); a slice without (each replica
/// draws the masks one core would for its own examples, not the whole batch's).
fn matches_the_reference(precision: Precision, tol: Tolerance) {
    let n = 16;
    // Nesterov with weight decay after a one-step warm-up, halved at step 2: the global step
    // is state like the slots.
    let schedule = Schedule::parse("warmup=1,step=2,factor=0.5", 0.1).unwrap();
    let optimizer = Optimizer::nesterov(0.1, 0.9).with_weight_decay(1e-3).with_schedule(schedule);
    let settings = Settings { precision, ..Settings::new(optimizer) };
    let machine = presets::preset("v2-8").unwrap();
    let run = |g: &Graph, target: Target| {
        let mut b: Box<dyn Backend> = backend(target, g, g.init_parameters(3), n, settings.clone()).unwrap();
        let steps: Vec<_> = (0..3).map(|s| b.train_step(&batch(n, s)).unwrap()).collect();
        let predicted = b.predict(&batch(n, 9)).unwrap();
        (b.describe(), steps, predicted, b.state().unwrap())
    };
    for (g, target) in [(model(0.25), Target::Core(machine.clone())), (model(0.0), Target::Slice(machine.clone()))] {
        let (_, cpu, cpu_pred, cpu_state) = run(&g, Target::Cpu);
        assert!(cpu.iter().all(|s| s.simulated_seconds.is_none()));
        assert!(cpu[0].outputs.contains_key(&session::grad_name("conv/kernel")));
        let (what, steps, pred, state) = run(&g, target);
        for (s, (want, got)) in cpu.iter().zip(&steps).enumerate() {
            let (w, l) = (want.loss.unwrap(), got.loss.unwrap());
            assert!((w - l).abs() <= tol.loss * w.abs(), "{what} {precision:?}: step {s} loss {l} vs {w}");
            assert!(got.simulated_seconds.unwrap() > 0.0, "{what}");
            for (name, gw) in want.outputs.iter().filter(|_| s < tol.grad_steps) {
                let e = norm_err(gw, &got.outputs[name]);
                assert!(e <= tol.grads, "{what} {precision:?}: step {s} {name}: {e}");
            }
        }
        // The state: parameters, the momentum slots, the global and dropout steps, like the
        // reference's.
        assert_eq!(cpu_state[STEP].iter().next(), Some(&3.0), "{what}");
        for (name, w) in &cpu_state {
            let e = norm_err(w, &state[name]);
            assert!(e <= tol.state, "{what} {precision:?}: {name}: {e}");
        }
        if let Some(step) = state.get(DROPOUT_STEP) {
            assert_eq!(step.iter().next(), Some(&3.0), "{what}");
        }
        let e = norm_err(&cpu_pred.outputs["logits"], &pred.outputs["logits"]);
        assert!(e <= tol.predictions, "{what} {precision:?}: predictions {e}");
        assert_eq!(pred.outputs["logits"].shape(), &[n, 10]);
    }
}

#[test]
fn a_batch_must_split_over_the_replicas() {
    let g = model(0.25);
    let settings = Settings::new(Optimizer::sgd(0.1));
    let machine = presets::preset("v2-8").unwrap();
    let e = backend(Target::Slice(machine), &g, g.init_parameters(3), 12, settings.clone()).err().unwrap().to_string();
    assert!(e.contains("12 examples does not split evenly over 8 replicas"), "{e}");
    // A batch whose images have the wrong shape changes nothing: the state stays the start.
    let start = g.init_parameters(3);
    let mut core =
        backend(Target::Core(presets::preset("v2-8").unwrap()), &g, start.clone(), 4, settings.clone()).unwrap();
    let mut bad = batch(4, 0);
    bad.insert("image".into(), Tensor::zeros(vec![4, 8, 8, 2]));
    let e = core.train_step(&bad).unwrap_err().to_string();
    assert!(e.contains("'image' holds examples of shape [8, 8, 2] but model 'small' takes [8, 8, 1]"), "{e}");
    let state = core.state().unwrap();
    assert!(start.iter().all(|(name, t)| state[name] == *t));
    core.train_step(&batch(4, 0)).unwrap();
    assert!(core.state().unwrap()["conv/kernel"] != start["conv/kernel"]);
    let mut cpu = backend(Target::Cpu, &g, g.init_parameters(3), 4, settings).unwrap();
    let e = cpu.train_step(&batch(5, 0)).unwrap_err().to_string();
    assert!(e.contains("give 4 examples"), "{e}");
}

/// A parameter the loss does not reach (a second head beside the classifier's): every
/// backend reports its gradient as zeros and leaves it as it is — no weight decay, no
/// momentum — as TensorFlow's optimizers skip a variable without a gradient.
#[test]
fn parameters_the_loss_does_not_reach_stay_as_they_are() {
    let mut g = Graph::new("two_heads");
    let x = g.input("image", &[8, 8, 1]).unwrap();
    let h = g.conv2d("conv", x, ConvSpec::new(4, 3).same()).unwrap();
    let h = g.flatten("flat", h).unwrap();
    let logits = g.dense("logits", h, 10).unwrap();
    let aux = g.dense("aux", h, 3).unwrap();
    // And a dead branch: a head on no output, whose parameters no program binds.
    g.dense("dead", h, 2).unwrap();
    g.set_outputs(vec![logits, aux]);
    let n = 8;
    let optimizer = Optimizer::momentum(0.1, 0.9).with_weight_decay(0.1);
    let settings = Settings { precision: Precision::Highest, ..Settings::new(optimizer) };
    let machine = presets::preset("v2-8").unwrap();
    let start = g.init_parameters(3);
    let mut states = Vec::new();
    for target in [Target::Cpu, Target::Core(machine.clone()), Target::Slice(machine)] {
        // Every backend needs every parameter, reached or not, and says which is missing.
        let mut partial = start.clone();
        partial.remove("dead/bias");
        let e = backend(target.clone(), &g, partial, n, settings.clone()).err().expect("a state without dead/bias");
        assert!(e.to_string().contains("'dead/bias'"), "{e}");
        let mut b = backend(target, &g, start.clone(), n, settings.clone()).unwrap();
        let what = b.describe();
        for s in 0..2 {
            let out = b.train_step(&batch(n, s)).unwrap();
            for name in ["aux/kernel", "aux/bias", "dead/kernel", "dead/bias"] {
                let grad = out
                    .outputs
                    .get(&session::grad_name(name))
                    .unwrap_or_else(|| panic!("{what}: no gradient of {name}: {:?}", out.outputs.keys()));
                assert_eq!(grad.shape(), start[name].shape(), "{what}: {name}");
                assert!(grad.iter().all(|&v| v == 0.0), "{what}: {name}'s gradient is not zero");
            }
            let logits = &out.outputs[&session::grad_name("logits/kernel")];
            assert!(logits.iter().any(|&v| v != 0.0), "{what}: the classifier's gradient is zero");
        }
        // Predictions read every head's parameters.
        let predicted = b.predict(&batch(n, 5)).unwrap();
        assert_eq!(predicted.outputs["aux"].shape(), &[n, 3], "{what}");
        let state = b.state().unwrap();
        for name in ["aux/kernel", "aux/bias", "dead/kernel", "dead/bias"] {
            assert_eq!(state[name], start[name], "{what}: {name} moved");
        }
        assert_ne!(state["logits/kernel"], start["logits/kernel"], "{what}");
        // The same tensors on every backend (no slots for a parameter never updated), so a
        // checkpoint of one resumes on another.
        let shapes = b.state_shapes().unwrap();
        assert_eq!(shapes.keys().collect::<Vec<_>>(), state.keys().collect::<Vec<_>>(), "{what}");
        states.push(shapes);
    }
    assert!(states.windows(2).all(|w| w[0] == w[1]), "{states:?}");
}
