//! Every op of the IR against a naive implementation (forward) and against central finite
//! differences (gradients from autodiff), over random shapes, strides, paddings and groups.

mod common;

use common::*;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use systolic_compiler::graph::*;
use systolic_compiler::reference::{Mode, RunOptions};
use systolic_compiler::{Tensor, TensorMap};

const INFER: RunOptions = RunOptions { mode: Mode::Inference, step: 0, bf16: None };
const TRAIN: RunOptions = RunOptions { mode: Mode::Training, step: 3, bf16: None };

/// A parameter the test binds (its initialiser is never used).
fn param(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    parameter(g, name, shape, Init::Zeros).unwrap()
}

fn conv_cases() -> impl Strategy<Value = ConvParams> {
    conv_params(ConvRanges { hw: 1..9, cg: 1..4, strides: 1..3 })
}

/// A graph `x -> conv(x, k, b)`, or None when the case is not a valid convolution.
fn conv_graph(p: &ConvParams) -> Option<(Graph, NodeId, TensorMap)> {
    let mut g = Graph::new("conv");
    let x = g.input("x", &[p.hw[0], p.hw[1], p.channels()]).unwrap();
    let y = add_conv(&mut g, "conv", ["k", "b"], Init::Zeros, x, p)?;
    let mut b = TensorMap::new();
    b.insert("x".into(), rand_tensor(&[p.n, p.hw[0], p.hw[1], p.channels()], 1));
    b.insert("k".into(), rand_tensor(&p.kernel_shape(), 2));
    b.insert("b".into(), rand_tensor(&[p.filters()], 3));
    Some((g, y, b))
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn conv_forward_matches_naive(p in conv_cases()) {
        let Some((g, y, b)) = conv_graph(&p) else { return Ok(()) };
        let want = naive_conv(&b["x"], &b["k"], p.bias.then(|| &b["b"]), &p.case());
        assert_close(&eval(&g, y, &b, INFER), &want, 1e-5, 1e-5, "conv");
    }

    #[test]
    fn conv_gradients_match_finite_differences(p in conv_cases()) {
        let Some((g, y, b)) = conv_graph(&p) else { return Ok(()) };
        let wrt: &[&str] = if p.bias { &["x", "k", "b"] } else { &["x", "k"] };
        check_gradients(&g, y, &b, wrt, INFER, 1e-2, 16);
    }
}

/// Found by the property test above: a 1×1 stride-1 convolution padded only after (bottom or
/// right) has more output pixels than input pixels, so the pointwise shortcut must not apply.
#[test]
fn one_by_one_convolution_padded_after_matches_naive() {
    for (bottom, right) in [(0, 1), (1, 0), (2, 3)] {
        let p = ConvParams {
            n: 2,
            hw: [2, 3],
            cg: 2,
            groups: 1,
            cog: 3,
            k: [1, 1],
            strides: [1, 1],
            dilation: [1, 1],
            padding: Padding::Explicit { top: 0, bottom, left: 0, right },
            bias: true,
        };
        let (g, y, b) = conv_graph(&p).unwrap();
        let want = naive_conv(&b["x"], &b["k"], Some(&b["b"]), &p.case());
        assert_eq!(want.shape(), &[2, 2 + bottom, 3 + right, 3]);
        assert_close(&eval(&g, y, &b, INFER), &want, 1e-5, 1e-5, "padded 1x1 conv");
    }
}

fn pool_graph(p: &PoolParams) -> Option<(Graph, NodeId, TensorMap)> {
    let mut g = Graph::new("pool");
    let x = g.input("x", &[p.hw[0], p.hw[1], p.c]).unwrap();
    let pool = Pool { window: p.window, strides: p.strides, padding: p.padding };
    let op = if p.max { Op::MaxPool(pool) } else { Op::AvgPool(pool) };
    let y = g.add("pool", op, &[x]).ok()?;
    let mut b = TensorMap::new();
    b.insert("x".into(), distinct(&[p.n, p.hw[0], p.hw[1], p.c], 5));
    Some((g, y, b))
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn pool_forward_matches_naive(p in pool_params()) {
        let Some((g, y, b)) = pool_graph(&p) else { return Ok(()) };
        let want = naive_pool(&b["x"], p.window, p.strides, p.padding, p.max);
        assert_close(&eval(&g, y, &b, INFER), &want, 1e-6, 1e-6, "pool");
    }

    #[test]
    fn pool_gradients_match_finite_differences(p in pool_params()) {
        let Some((g, y, b)) = pool_graph(&p) else { return Ok(()) };
        check_gradients(&g, y, &b, &["x"], INFER, 5e-3, 24);
    }

    #[test]
    fn dense_matches_naive_and_differentiates((lead, din, dout, rows, bias) in (prop::option::of(1usize..4), 1usize..12, 1usize..12, 1usize..5, any::<bool>())) {
        let mut g = Graph::new("dense");
        let per: Vec<usize> = lead.into_iter().chain([din]).collect();
        let x = g.input("x", &per).unwrap();
        let k = param(&mut g, "k", &[din, dout]);
        let mut inputs = vec![x, k];
        if bias {
            inputs.push(param(&mut g, "b", &[dout]));
        }
        let y = g.add("dense", Op::Dense, &inputs).unwrap();
        let mut shape = vec![rows];
        shape.extend(&per);
        let mut b = TensorMap::new();
        b.insert("x".into(), rand_tensor(&shape, 1));
        b.insert("k".into(), rand_tensor(&[din, dout], 2));
        b.insert("b".into(), rand_tensor(&[dout], 3));
        let got = eval(&g, y, &b, INFER);
        let want = naive_dense(&b["x"], &b["k"], bias.then(|| &b["b"]));
        assert_close(&got, &want, 1e-5, 1e-5, "dense");
        let wrt: &[&str] = if bias { &["x", "k", "b"] } else { &["x", "k"] };
        check_gradients(&g, y, &b, wrt, INFER, 1e-2, 16);
    }

    #[test]
    fn batch_norm_matches_naive_and_differentiates((rows, spatial, c, train) in (1usize..4, 1usize..4, 1usize..5, any::<bool>())) {
        let mut g = Graph::new("bn");
        let x = g.input("x", &[spatial, spatial, c]).unwrap();
        let bn = BatchNorm { momentum: 0.9, epsilon: 1e-3 };
        let y = g.batch_norm("bn", x, bn.clone()).unwrap();
        let mut b = TensorMap::new();
        let n = if train { rows + 1 } else { rows };
        b.insert("x".into(), rand_tensor(&[n, spatial, spatial, c], 1));
        b.insert("bn/gamma".into(), rand_tensor(&[c], 2) + 1.5);
        b.insert("bn/beta".into(), rand_tensor(&[c], 3));
        b.insert("bn/moving_mean".into(), rand_tensor(&[c], 4) * 0.1);
        b.insert("bn/moving_variance".into(), rand_tensor(&[c], 5) * 0.1 + 1.0);
        let opts = if train { TRAIN } else { INFER };
        let stats = (!train).then(|| (&b["bn/moving_mean"], &b["bn/moving_variance"]));
        let want = naive_batch_norm(&b["x"], &b["bn/gamma"], &b["bn/beta"], stats, 1e-3);
        let mut ev = systolic_compiler::reference::run(&g, &b, &[y], opts).unwrap();
        assert_close(&ev.take(y).unwrap(), &want, 1e-5, 1e-5, "batch norm");
        if train {
            // Moving statistics: momentum-weighted with the batch mean and unbiased variance.
            for (ch, (mean, var)) in naive_moments(&b["x"]).into_iter().enumerate() {
                let want_mean = 0.9 * b["bn/moving_mean"][[ch]] as f64 + 0.1 * mean;
                let want_var = 0.9 * b["bn/moving_variance"][[ch]] as f64 + 0.1 * var;
                prop_assert!((ev.updates["bn/moving_mean"][[ch]] as f64 - want_mean).abs() < 1e-6);
                prop_assert!((ev.updates["bn/moving_variance"][[ch]] as f64 - want_var).abs() < 1e-5);
            }
        } else {
            prop_assert!(ev.updates.is_empty());
        }
        check_gradients(&g, y, &b, &["x", "bn/gamma", "bn/beta"], opts, 1e-2, 16);
    }

    #[test]
    fn elementwise_ops_match_their_definitions((n, d, c) in (1usize..4, 1usize..5, 1usize..6)) {
        let mut g = Graph::new("ew");
        let a = g.input("a", &[d, c]).unwrap();
        let bb = g.input("b", &[d, c]).unwrap();
        let bias = param(&mut g, "bias", &[c]);
        let ops: Vec<(&str, NodeId)> = vec![
            ("add", g.add("add", Op::Add, &[a, bb]).unwrap()),
            ("mul", g.add("mul", Op::Mul, &[a, bb]).unwrap()),
            ("relu", g.add("relu", Op::Relu, &[a]).unwrap()),
            ("relu6", g.add("relu6", Op::Relu6, &[bb]).unwrap()),
            ("bias_add", g.add("bias_add", Op::BiasAdd, &[a, bias]).unwrap()),
            ("softmax", g.add("softmax", Op::Softmax, &[a]).unwrap()),
        ];
        let mut b = TensorMap::new();
        b.insert("a".into(), away_from_zero(&[n, d, c], 1) * 3.0);
        b.insert("b".into(), away_from_zero(&[n, d, c], 2) * 4.0 + 3.0);
        b.insert("bias".into(), rand_tensor(&[c], 3));
        let (av, bv) = (f64s(&b["a"]), f64s(&b["b"]));
        for (name, id) in &ops {
            let want: ArrayD<f64> = match *name {
                "add" => &av + &bv,
                "mul" => &av * &bv,
                "relu" => av.mapv(|v| v.max(0.0)),
                "relu6" => bv.mapv(|v| v.clamp(0.0, 6.0)),
                "bias_add" => &av + &f64s(&b["bias"]),
                _ => naive_softmax(&av),
            };
            assert_close(&eval(&g, *id, &b, INFER), &want, 1e-5, 1e-5, name);
            let wrt: &[&str] = match *name {
                "add" | "mul" => &["a", "b"],
                "relu" | "softmax" => &["a"],
                "relu6" => &["b"],
                _ => &["a", "bias"],
            };
            check_gradients(&g, *id, &b, wrt, INFER, 1e-2, 16);
        }
    }

    #[test]
    fn shape_ops_move_values_and_gradients((n, h, w, c1, c2) in (1usize..3, 1usize..4, 1usize..4, 1usize..4, 1usize..4)) {
        let mut g = Graph::new("shape");
        let a = g.input("a", &[h, w, c1]).unwrap();
        let bb = g.input("b", &[h, w, c2]).unwrap();
        let cat = g.concat("cat", &[a, bb], -1).unwrap();
        let flat = g.flatten("flat", a).unwrap();
        let re = g.reshape("re", a, &[-1, c1 as i64]).unwrap();
        let gap = g.global_avg_pool("gap", a).unwrap();
        let mut b = TensorMap::new();
        b.insert("a".into(), rand_tensor(&[n, h, w, c1], 1));
        b.insert("b".into(), rand_tensor(&[n, h, w, c2], 2));
        let (av, bv) = (&b["a"], &b["b"]);
        let want_cat = ndarray::concatenate(ndarray::Axis(3), &[av.view(), bv.view()]).unwrap();
        assert_close(&eval(&g, cat, &b, INFER), &f64s(&want_cat), 0.0, 0.0, "concat");
        let want_flat = av.clone().into_shape_with_order(IxDyn(&[n, h * w * c1])).unwrap();
        assert_close(&eval(&g, flat, &b, INFER), &f64s(&want_flat), 0.0, 0.0, "flatten");
        let want_re = av.clone().into_shape_with_order(IxDyn(&[n, h * w, c1])).unwrap();
        assert_close(&eval(&g, re, &b, INFER), &f64s(&want_re), 0.0, 0.0, "reshape");
        let want_gap = f64s(av).mean_axis(ndarray::Axis(1)).unwrap().mean_axis(ndarray::Axis(1)).unwrap();
        assert_close(&eval(&g, gap, &b, INFER), &want_gap, 1e-6, 1e-6, "global average pool");
        check_gradients(&g, cat, &b, &["a", "b"], INFER, 1e-2, 16);
        check_gradients(&g, flat, &b, &["a"], INFER, 1e-2, 16);
        check_gradients(&g, re, &b, &["a"], INFER, 1e-2, 16);
        check_gradients(&g, gap, &b, &["a"], INFER, 1e-2, 16);
    }

    #[test]
    fn cross_entropy_matches_its_definition((n, classes, smoothing) in (1usize..6, 2usize..8, prop_oneof![Just(0.0f32), 0.0f32..0.3])) {
        let mut g = Graph::new("sce");
        let z = g.input("z", &[classes]).unwrap();
        let y = g.labels("y").unwrap();
        let loss = g.softmax_cross_entropy("loss", z, y, smoothing).unwrap();
        let mut b = TensorMap::new();
        b.insert("z".into(), rand_tensor(&[n, classes], 1) * 3.0);
        b.insert("y".into(), labels(n, classes));
        let want = naive_cross_entropy(&b["z"], &b["y"], smoothing);
        let got = eval(&g, loss, &b, INFER);
        prop_assert!(got.ndim() == 0);
        prop_assert!((got.first().copied().unwrap() as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
        check_gradients(&g, loss, &b, &["z"], INFER, 1e-2, 32);
    }
}

#[test]
fn dropout_drops_at_its_rate_and_scales_the_rest() {
    let mut g = Graph::new("drop");
    let x = g.input("x", &[1000]).unwrap();
    let y = g.dropout("drop", x, 0.3, 42).unwrap();
    let mut b = TensorMap::new();
    b.insert("x".into(), Tensor::from_elem(vec![20, 1000], 1.0));
    assert_eq!(eval(&g, y, &b, INFER), b["x"], "identity at inference");
    let train = eval(&g, y, &b, TRAIN);
    let kept = train.iter().filter(|&&v| v != 0.0).count() as f64 / train.len() as f64;
    assert!((kept - 0.7).abs() < 0.01, "kept {kept}");
    assert!(train.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
    // The mask is a function of (seed, step): the same step repeats it, another step does not.
    assert_eq!(eval(&g, y, &b, TRAIN), train);
    assert_ne!(eval(&g, y, &b, RunOptions { step: 4, ..TRAIN }), train);
    b.insert("x".into(), rand_tensor(&[3, 1000], 9));
    check_gradients(&g, y, &b, &["x"], TRAIN, 1e-2, 32);
}

#[test]
fn depthwise_with_multiplier_matches_naive() {
    // Depthwise (one input channel per group) with two outputs per channel, strided and dilated.
    let p = ConvParams {
        n: 2,
        hw: [7, 6],
        cg: 1,
        groups: 5,
        cog: 2,
        k: [3, 3],
        strides: [2, 1],
        dilation: [1, 2],
        padding: Padding::Same,
        bias: true,
    };
    let (g, y, b) = conv_graph(&p).unwrap();
    let want = naive_conv(&b["x"], &b["k"], Some(&b["b"]), &p.case());
    assert_close(&eval(&g, y, &b, INFER), &want, 1e-5, 1e-5, "depthwise");
    check_gradients(&g, y, &b, &["x", "k", "b"], INFER, 1e-2, 64);
}

#[test]
fn large_convolutions_take_the_blocked_paths() {
    // Deep enough for several im2col blocks per image and a pointwise (1x1) fast path.
    for (k, cin, stride) in [(3, 64, 1), (1, 96, 1), (1, 32, 2), (5, 24, 2)] {
        let p = ConvParams {
            n: 2,
            hw: [20, 17],
            cg: cin,
            groups: 1,
            cog: 24,
            k: [k, k],
            strides: [stride, stride],
            dilation: [1, 1],
            padding: if k == 1 { Padding::Valid } else { Padding::Same },
            bias: false,
        };
        let (g, y, b) = conv_graph(&p).unwrap();
        assert_close(&eval(&g, y, &b, INFER), &naive_conv(&b["x"], &b["k"], None, &p.case()), 1e-4, 1e-4, "conv");
        check_gradients(&g, y, &b, &["x", "k"], INFER, 1e-2, 24);
    }
}

#[test]
fn max_pool_sends_the_gradient_to_the_first_of_tied_maxima() {
    let mut g = Graph::new("ties");
    let x = g.input("x", &[2, 2, 1]).unwrap();
    let y = g.max_pool("pool", x, Pool::default()).unwrap();
    let grads = systolic_compiler::autodiff::differentiate(&g, y, &[x]).unwrap();
    let mut b = TensorMap::new();
    b.insert("x".into(), Tensor::from_shape_vec(vec![1, 2, 2, 1], vec![1.0, 3.0, 3.0, 2.0]).unwrap());
    b.insert("pool/upstream".into(), Tensor::from_elem(vec![1, 1, 1, 1], 5.0));
    let ev = systolic_compiler::reference::run(&grads.graph, &b, &[grads.grads["x"]], INFER).unwrap();
    assert_eq!(ev.get(grads.grads["x"]).unwrap().as_slice().unwrap(), &[0.0, 5.0, 0.0, 0.0]);
}

/// One input normalised by two batch norms with different ε, summed: both share the batch's
/// moments and the upstream gradient, so the interpreter's shared per-channel sums must be
/// kept apart by ε (x̂ depends on it) — each γ's gradient against finite differences.
#[test]
fn batch_norms_of_one_input_keep_their_own_sums() {
    let mut g = Graph::new("two_bns");
    let x = g.input("x", &[2, 2, 3]).unwrap();
    let a = g.batch_norm("a", x, BatchNorm { momentum: 0.9, epsilon: 1e-3 }).unwrap();
    let b = g.batch_norm("b", x, BatchNorm { momentum: 0.9, epsilon: 0.5 }).unwrap();
    let y = g.add("y", Op::Add, &[a, b]).unwrap();
    let mut bind = TensorMap::new();
    bind.insert("x".into(), rand_tensor(&[3, 2, 2, 3], 1));
    for (name, seed) in [("a", 10), ("b", 20)] {
        bind.insert(format!("{name}/gamma"), rand_tensor(&[3], seed) + 1.5);
        bind.insert(format!("{name}/beta"), rand_tensor(&[3], seed + 1));
        bind.insert(format!("{name}/moving_mean"), rand_tensor(&[3], seed + 2) * 0.1);
        bind.insert(format!("{name}/moving_variance"), rand_tensor(&[3], seed + 3) * 0.1 + 1.0);
    }
    check_gradients(&g, y, &bind, &["x", "a/gamma", "b/gamma", "a/beta", "b/beta"], TRAIN, 1e-2, 36);
}
