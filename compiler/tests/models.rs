//! Whole models on the CPU reference: every zoo model runs, whole-model gradients match finite
//! differences, and results are bit-identical for any number of threads.

mod common;

use common::*;
use systolic_compiler::autodiff;
use systolic_compiler::reference::{self, Mode, RunOptions};
use systolic_compiler::zoo;
use systolic_compiler::{Graph, Tensor, TensorMap};

const TRAIN: RunOptions = RunOptions { mode: Mode::Training, step: 1, bf16: None };

fn small(name: &str) -> Graph {
    let hw = match name {
        "simple_cnn" => 28,
        "digits_cnn" => 8,
        "lenet5" => 32,
        "alexnet" => 67,
        _ => 32,
    };
    small_model(name, hw)
}

/// Weights from seed 0, a random image batch and labels.
fn bindings(g: &Graph, batch: usize) -> TensorMap {
    let mut b = random_bindings(g, batch, 0, 17);
    for id in g.inputs() {
        let node = g.node(id);
        if node.shape.dims.is_empty() {
            let labels = (0..batch).map(|i| (i * 3 % 10) as f32).collect();
            b.insert(node.name.clone(), Tensor::from_shape_vec(node.shape.concrete(batch), labels).unwrap());
        }
    }
    b
}

#[test]
fn every_zoo_model_runs_forward_and_backward_at_small_size() {
    for name in zoo::names() {
        let g = small(name);
        let train = autodiff::training_graph(&g, 0.1).unwrap();
        let b = bindings(&train.graph, 2);
        let v = reference::run_gradients(&train, &b, TRAIN).unwrap();
        let loss = v.root.first().copied().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{name}: loss {loss}");
        for (n, t) in &v.grads {
            assert!(t.iter().all(|v| v.is_finite()), "{name}: {n} is not finite");
            assert!(t.iter().any(|&v| v != 0.0), "{name}: the gradient of {n} is all zeros");
        }
        // One gradient per trainable parameter, plus the image.
        assert_eq!(v.grads.len(), g.trainable_parameters().len() + 1, "{name}");
        assert!(v.grads.contains_key("image"));
        let bn_layers = g.nodes().filter(|(_, n)| n.op.kind() == "BatchNorm").count();
        assert_eq!(v.updates.len(), 2 * bn_layers, "{name}: moving statistics updated in training mode");
    }
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    // Deep models are piecewise linear with many ReLU and max-pool kinks near any point, so
    // finite differences of whole ResNets mean little; the zoo's small CNNs and the blocks below
    // (residual, depthwise separable) exercise every backward op in composition instead.
    for name in ["digits_cnn", "lenet5", "simple_cnn"] {
        let (g, loss) = small(name).with_classifier_loss(0.1).unwrap();
        let b = bindings(&g, 3);
        let mut wrt: Vec<String> = g.trainable_parameters().iter().map(|&p| g.node(p).name.clone()).collect();
        wrt.push("image".into());
        let wrt: Vec<&str> = wrt.iter().map(String::as_str).collect();
        check_gradient_direction(&g, loss, &b, &wrt, TRAIN, 1e-3, 24);
    }
}

#[test]
fn depthwise_separable_block_gradients_in_training_mode() {
    use systolic_compiler::graph::{BatchNorm, ConvSpec, Padding};
    let mut g = Graph::new("separable");
    let x = g.input("image", &[9, 9, 4]).unwrap();
    let pad = Padding::Explicit { top: 0, bottom: 1, left: 0, right: 1 };
    let y = g.conv2d("dw", x, ConvSpec::depthwise(3).stride(2).padding(pad).no_bias()).unwrap();
    let y = g.batch_norm("dw_bn", y, BatchNorm::default()).unwrap();
    let y = g.relu6("dw_relu", y).unwrap();
    let y = g.conv2d("pw", y, ConvSpec::new(8, 1).no_bias()).unwrap();
    let y = g.batch_norm("pw_bn", y, BatchNorm::default()).unwrap();
    let y = g.relu6("pw_relu", y).unwrap();
    let y = g
        .avg_pool("pool", y, systolic_compiler::graph::Pool { window: [3, 3], strides: [2, 2], padding: Padding::Same })
        .unwrap();
    let y = g.flatten("flatten", y).unwrap();
    let y = g.dropout("dropout", y, 0.2, 5).unwrap();
    let logits = g.dense("fc", y, 3).unwrap();
    g.add_output(logits);
    let (g, loss) = g.with_classifier_loss(0.0).unwrap();
    let mut b = bindings(&g, 4);
    b.insert("labels".into(), Tensor::from_shape_vec(vec![4], vec![0.0, 2.0, 1.0, 2.0]).unwrap());
    let wrt =
        ["dw/kernel", "dw_bn/gamma", "dw_bn/beta", "pw/kernel", "pw_bn/gamma", "pw_bn/beta", "fc/kernel", "image"];
    check_gradient_direction(&g, loss, &b, &wrt, TRAIN, 1e-3, 24);
}

#[test]
fn residual_block_gradients_in_training_mode() {
    // A residual block with batch norm over 4x8x8 pixels per channel: smooth enough for
    // finite differences of the training-mode (batch statistics) gradients.
    use systolic_compiler::graph::{BatchNorm, ConvSpec};
    let mut g = Graph::new("block");
    let x = g.input("image", &[8, 8, 3]).unwrap();
    let y = g.conv2d("conv1", x, ConvSpec::new(6, 3).same().no_bias()).unwrap();
    let y = g.batch_norm("bn1", y, BatchNorm::default()).unwrap();
    let y = g.relu("relu1", y).unwrap();
    let y = g.conv2d("conv2", y, ConvSpec::new(6, 3).same().stride(2).no_bias()).unwrap();
    let y = g.batch_norm("bn2", y, BatchNorm::default()).unwrap();
    let s = g.conv2d("shortcut", x, ConvSpec::new(6, 1).stride(2)).unwrap();
    let y = g.add_op("add", y, s).unwrap();
    let y = g.relu("relu", y).unwrap();
    let y = g.global_avg_pool("gap", y).unwrap();
    let logits = g.dense("fc", y, 4).unwrap();
    g.add_output(logits);
    let (g, loss) = g.with_classifier_loss(0.1).unwrap();
    let mut b = bindings(&g, 4);
    b.insert("labels".into(), Tensor::from_shape_vec(vec![4], vec![0.0, 3.0, 1.0, 2.0]).unwrap());
    let wrt =
        ["conv1/kernel", "bn1/gamma", "bn1/beta", "conv2/kernel", "bn2/gamma", "shortcut/bias", "fc/kernel", "image"];
    check_gradient_direction(&g, loss, &b, &wrt, TRAIN, 1e-3, 24);
}

/// Runs `f` on a rayon pool of `threads` threads.
fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

#[test]
fn results_are_bit_identical_for_any_thread_count() {
    let g = small_model("resnet18", 40);
    let train = autodiff::training_graph(&g, 0.0).unwrap();
    let b = bindings(&train.graph, 4);
    let run = || reference::run_outputs(&train.graph, &b, TRAIN).unwrap();
    let one = with_threads(1, run);
    for threads in [2, 3] {
        let many = with_threads(threads, run);
        assert_eq!(one.0.len(), many.0.len());
        for (name, t) in &one.0 {
            let bits = |t: &Tensor| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(t), bits(&many.0[name]), "{name} differs between 1 and {threads} threads");
        }
        assert_eq!(one.1, many.1, "moving statistics differ between 1 and {threads} threads");
    }
}

#[test]
fn inference_uses_moving_statistics_and_training_updates_them() {
    let g = small_model("resnet18", 32);
    let mut b = bindings(&g, 2);
    let (infer, no_updates) = reference::run_outputs(&g, &b, RunOptions::default()).unwrap();
    assert!(no_updates.is_empty());
    let (_, updates) = reference::run_outputs(&g, &b, TRAIN).unwrap();
    // Feeding the updated statistics back changes inference results.
    b.extend(updates);
    let (infer2, _) = reference::run_outputs(&g, &b, RunOptions::default()).unwrap();
    assert_ne!(infer["fc"], infer2["fc"]);
}

#[test]
fn gradient_descent_lowers_the_loss() {
    // Thirty plain SGD steps on one batch of digits_cnn: the loss must fall well below ln(10).
    let g = small("digits_cnn");
    let train = autodiff::training_graph(&g, 0.0).unwrap();
    let mut b = bindings(&train.graph, 16);
    let mut losses = Vec::new();
    for step in 0..30 {
        let v = reference::run_gradients(&train, &b, RunOptions { step, ..TRAIN }).unwrap();
        losses.push(v.root.first().copied().unwrap());
        for id in g.trainable_parameters() {
            let name = &g.node(id).name;
            let grad = &v.grads[name];
            let p = b.get_mut(name).unwrap();
            p.zip_mut_with(grad, |w, d| *w -= 0.1 * d);
        }
    }
    assert!(losses[0] > 2.0, "{losses:?}");
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "the loss must fall at every step: {losses:?}");
    assert!(*losses.last().unwrap() < 0.8 * losses[0], "{losses:?}");
}
