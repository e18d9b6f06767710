//! Shared test helpers: random tensors, naive (loop-by-loop, f64) versions of every op, and a
//! gradient checker that compares autodiff with central finite differences.
#![allow(dead_code)]

pub mod lowering;

use std::ops::Range;

use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use systolic_compiler::autodiff;
use systolic_compiler::graph::{Conv2d, Graph, Init, NodeId, Op, Padding, Parameter, Window2d};
use systolic_compiler::reference::{self, RunOptions};
use systolic_compiler::rng;
use systolic_compiler::zoo::{self, ZooOptions};
use systolic_compiler::{Tensor, TensorMap};

/// Uniform values in [-1, 1), deterministic in `seed`.
pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v = (0..n).map(|i| 2.0 * rng::uniform(seed, i as u64) - 1.0).collect();
    Tensor::from_shape_vec(shape.to_vec(), v).unwrap()
}

/// Values bounded away from 0 (|v| in [0.05, 1]), so ReLU kinks are far from finite-difference steps.
pub fn away_from_zero(shape: &[usize], seed: u64) -> Tensor {
    rand_tensor(shape, seed).mapv(|v| v.signum() * (0.05 + 0.95 * v.abs()))
}

/// Distinct values 0.02 apart in random order, so max-pool windows have no near-ties.
pub fn distinct(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by_key(|&i| rng::derive(seed, i as u64));
    let v = idx.iter().map(|&i| (i as f32 - n as f32 / 2.0) * 0.02).collect();
    Tensor::from_shape_vec(shape.to_vec(), v).unwrap()
}

/// Class ids `(7i + 3) mod classes` for a batch of `batch` examples.
pub fn labels(batch: usize, classes: usize) -> Tensor {
    Tensor::from_shape_vec(vec![batch], (0..batch).map(|i| ((i * 7 + 3) % classes) as f32).collect()).unwrap()
}

/// Every parameter of `g` initialised from `weights_seed`, and a random tensor (from
/// `inputs_seed`) for every Input at `batch` examples.
pub fn random_bindings(g: &Graph, batch: usize, weights_seed: u64, inputs_seed: u64) -> TensorMap {
    let mut b = g.init_parameters(weights_seed);
    for id in g.inputs() {
        let node = g.node(id);
        b.insert(node.name.clone(), rand_tensor(&node.shape.concrete(batch), inputs_seed));
    }
    b
}

/// A zoo model for `hw` x `hw` images and ten classes.
pub fn small_model(name: &str, hw: usize) -> Graph {
    zoo::build_with(name, ZooOptions { input_hw: Some([hw, hw]), classes: Some(10) }).unwrap()
}

/// Adds a trainable parameter initialised by `init`.
pub fn parameter(g: &mut Graph, name: &str, shape: &[usize], init: Init) -> systolic_compiler::Result<NodeId> {
    g.add(name, Op::Parameter(Parameter { shape: shape.to_vec(), init, trainable: true }), &[])
}

/// Adds convolution `name` of `x` as `p` describes it, with the kernel parameter `params[0]`
/// and, when `p.bias`, the bias parameter `params[1]`, both initialised by `init`. None when
/// `p` is not a valid convolution.
pub fn add_conv(g: &mut Graph, name: &str, params: [&str; 2], init: Init, x: NodeId, p: &ConvParams) -> Option<NodeId> {
    let k = parameter(g, params[0], &p.kernel_shape(), init.clone()).ok()?;
    let mut inputs = vec![x, k];
    if p.bias {
        inputs.push(parameter(g, params[1], &[p.filters()], init).ok()?);
    }
    g.add(name, Op::Conv2d(p.attrs()), &inputs).ok()
}

/// Evaluates one node of a graph.
pub fn eval(graph: &Graph, node: NodeId, bindings: &TensorMap, opts: RunOptions) -> Tensor {
    let mut ev = reference::run(graph, bindings, &[node], opts).unwrap();
    ev.take(node).unwrap()
}

/// Asserts two tensors are equal in shape and within `atol + rtol·|want|` elementwise.
pub fn assert_close(got: &Tensor, want: &ArrayD<f64>, atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        let tol = atol + rtol * w.abs();
        assert!((*g as f64 - w).abs() <= tol, "{what}: element {i}: got {g}, want {w} (tol {tol})");
    }
}

pub fn f64s(t: &Tensor) -> ArrayD<f64> {
    t.mapv(|v| v as f64)
}

/// Resolves padding exactly as the IR defines it (restated here so tests do not trust the code).
pub fn pads(p: Padding, in_hw: [usize; 2], win: [usize; 2], s: [usize; 2]) -> Window2d {
    match p {
        Padding::Valid => Window2d {
            out_h: (in_hw[0] - win[0]) / s[0] + 1,
            out_w: (in_hw[1] - win[1]) / s[1] + 1,
            pad_top: 0,
            pad_left: 0,
            pad_bottom: 0,
            pad_right: 0,
        },
        Padding::Same => {
            let oh = in_hw[0].div_ceil(s[0]);
            let ow = in_hw[1].div_ceil(s[1]);
            let th = ((oh - 1) * s[0] + win[0]).saturating_sub(in_hw[0]);
            let tw = ((ow - 1) * s[1] + win[1]).saturating_sub(in_hw[1]);
            Window2d {
                out_h: oh,
                out_w: ow,
                pad_top: th / 2,
                pad_bottom: th - th / 2,
                pad_left: tw / 2,
                pad_right: tw - tw / 2,
            }
        }
        Padding::Explicit { top, bottom, left, right } => Window2d {
            out_h: (in_hw[0] + top + bottom - win[0]) / s[0] + 1,
            out_w: (in_hw[1] + left + right - win[1]) / s[1] + 1,
            pad_top: top,
            pad_left: left,
            pad_bottom: bottom,
            pad_right: right,
        },
    }
}

pub struct ConvCase {
    pub strides: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    pub padding: Padding,
}

/// Direct convolution in f64: y[n,oh,ow,o] = Σ_{i,j,ci} x[n, oh·s+i·d-pt, ow·s+j·d-pl, g·cg+ci] · k[i,j,ci,o].
pub fn naive_conv(x: &Tensor, k: &Tensor, bias: Option<&Tensor>, c: &ConvCase) -> ArrayD<f64> {
    let (n, h, w, cin) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (kh, kw, cg, co) = (k.shape()[0], k.shape()[1], k.shape()[2], k.shape()[3]);
    let eff = [(kh - 1) * c.dilation[0] + 1, (kw - 1) * c.dilation[1] + 1];
    let win = pads(c.padding, [h, w], eff, c.strides);
    let cog = co / c.groups;
    assert_eq!(cg * c.groups, cin);
    let mut y = ArrayD::<f64>::zeros(IxDyn(&[n, win.out_h, win.out_w, co]));
    for b in 0..n {
        for oh in 0..win.out_h {
            for ow in 0..win.out_w {
                for o in 0..co {
                    let g = o / cog;
                    let mut acc = bias.map_or(0.0, |bt| bt[[o]] as f64);
                    for i in 0..kh {
                        for j in 0..kw {
                            let ih = (oh * c.strides[0] + i * c.dilation[0]) as isize - win.pad_top as isize;
                            let iw = (ow * c.strides[1] + j * c.dilation[1]) as isize - win.pad_left as isize;
                            if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                continue;
                            }
                            for ci in 0..cg {
                                acc += x[[b, ih as usize, iw as usize, g * cg + ci]] as f64 * k[[i, j, ci, o]] as f64;
                            }
                        }
                    }
                    y[[b, oh, ow, o]] = acc;
                }
            }
        }
    }
    y
}

/// Direct pooling in f64; average pooling divides by the taps inside the image.
pub fn naive_pool(x: &Tensor, window: [usize; 2], strides: [usize; 2], padding: Padding, max: bool) -> ArrayD<f64> {
    let (n, h, w, c) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let win = pads(padding, [h, w], window, strides);
    let mut y = ArrayD::<f64>::zeros(IxDyn(&[n, win.out_h, win.out_w, c]));
    for b in 0..n {
        for oh in 0..win.out_h {
            for ow in 0..win.out_w {
                for ch in 0..c {
                    let mut best = f64::NEG_INFINITY;
                    let (mut sum, mut count) = (0.0, 0.0);
                    for i in 0..window[0] {
                        for j in 0..window[1] {
                            let ih = (oh * strides[0] + i) as isize - win.pad_top as isize;
                            let iw = (ow * strides[1] + j) as isize - win.pad_left as isize;
                            if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                continue;
                            }
                            let v = x[[b, ih as usize, iw as usize, ch]] as f64;
                            best = best.max(v);
                            sum += v;
                            count += 1.0;
                        }
                    }
                    y[[b, oh, ow, ch]] = if max { best } else { sum / count };
                }
            }
        }
    }
    y
}

/// A dense layer in f64 over the last axis: `y[r, o] = bias[o] + Σ_i x[r, i] · k[i, o]`.
pub fn naive_dense(x: &Tensor, k: &Tensor, bias: Option<&Tensor>) -> ArrayD<f64> {
    let (din, dout) = (k.shape()[0], k.shape()[1]);
    let flat = x.len() / din;
    let mut want = vec![0f64; flat * dout];
    for r in 0..flat {
        for o in 0..dout {
            let mut acc = bias.map_or(0.0, |b| b[[o]] as f64);
            for i in 0..din {
                acc += x.as_slice().unwrap()[r * din + i] as f64 * k[[i, o]] as f64;
            }
            want[r * dout + o] = acc;
        }
    }
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().unwrap() = dout;
    ArrayD::from_shape_vec(IxDyn(&out_shape), want).unwrap()
}

/// Softmax in f64 over the last axis.
pub fn naive_softmax(x: &ArrayD<f64>) -> ArrayD<f64> {
    let mut s = x.clone();
    for mut row in s.rows_mut() {
        let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - m).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    s
}

/// The mean over the batch of the cross-entropy between `softmax(logits)` (`[N, classes]`) and
/// integer `labels` smoothed by `smoothing`, in f64.
pub fn naive_cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f32) -> f64 {
    let classes = logits.shape()[1];
    let zs = f64s(logits);
    let mut want = 0.0;
    for (r, row) in zs.rows().into_iter().enumerate() {
        let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = m + row.mapv(|v| (v - m).exp()).sum().ln();
        for (k, &v) in row.iter().enumerate() {
            let q = if k == labels[[r]] as usize { 1.0 - smoothing as f64 } else { 0.0 }
                + smoothing as f64 / classes as f64;
            want += q * (lse - v);
        }
    }
    want / zs.shape()[0] as f64
}

/// The mean and the unbiased variance of each channel (last axis) of `x`, in f64.
pub fn naive_moments(x: &Tensor) -> Vec<(f64, f64)> {
    let c = *x.shape().last().unwrap();
    let m = x.len() / c;
    (0..c)
        .map(|ch| {
            let vals: Vec<f64> = x.iter().skip(ch).step_by(c).map(|&v| v as f64).collect();
            let mean = vals.iter().sum::<f64>() / m as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (m as f64 - 1.0);
            (mean, var)
        })
        .collect()
}

/// Batch norm in f64 over the last axis, with batch statistics or the given moving ones.
pub fn naive_batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> ArrayD<f64> {
    let c = *x.shape().last().unwrap();
    let rows = x.len() / c;
    let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut y = ArrayD::<f64>::zeros(IxDyn(x.shape()));
    for ch in 0..c {
        let (mean, var) = match stats {
            Some((m, v)) => (m[[ch]] as f64, v[[ch]] as f64),
            None => {
                let mean = (0..rows).map(|r| xs[r * c + ch]).sum::<f64>() / rows as f64;
                let var = (0..rows).map(|r| (xs[r * c + ch] - mean).powi(2)).sum::<f64>() / rows as f64;
                (mean, var)
            }
        };
        for r in 0..rows {
            let v = (xs[r * c + ch] - mean) / (var + eps).sqrt() * gamma[[ch]] as f64 + beta[[ch]] as f64;
            y.as_slice_mut().unwrap()[r * c + ch] = v;
        }
    }
    y
}

/// The central difference quotient of `objective` in element `i` of the bound tensor `name`.
fn central_difference(
    objective: &impl Fn(&TensorMap) -> f64,
    bindings: &TensorMap,
    name: &str,
    i: usize,
    eps: f32,
) -> f64 {
    let mut plus = bindings.clone();
    plus.get_mut(name).unwrap().as_slice_mut().unwrap()[i] += eps;
    let mut minus = bindings.clone();
    minus.get_mut(name).unwrap().as_slice_mut().unwrap()[i] -= eps;
    (objective(&plus) - objective(&minus)) / (2.0 * eps as f64)
}

/// Central finite differences against autodiff for node `out` with respect to the named leaves.
///
/// For a scalar loss node the checked function is the loss; otherwise it is `Σ u ⊙ out` for a
/// random upstream `u`. Up to `samples` coordinates of each tensor are probed with step `eps`.
pub fn check_gradients(
    graph: &Graph,
    out: NodeId,
    bindings: &TensorMap,
    wrt: &[&str],
    opts: RunOptions,
    eps: f32,
    samples: usize,
) {
    let ids: Vec<NodeId> = wrt.iter().map(|n| graph.find(n).unwrap()).collect();
    let grads = autodiff::differentiate(graph, out, &ids).unwrap();
    let mut b = bindings.clone();
    // The upstream gradient has the value's concrete shape: evaluate once to learn it.
    let value = eval(graph, out, bindings, opts);
    let upstream = grads.upstream.map(|id| (id, rand_tensor(value.shape(), 99)));
    if let Some((id, u)) = &upstream {
        b.insert(grads.graph.node(*id).name.clone(), u.clone());
    }
    let fetch: Vec<NodeId> = wrt.iter().filter_map(|n| grads.grads.get(*n).copied()).collect();
    let ev = reference::run(&grads.graph, &b, &fetch, opts).unwrap();
    let objective = |bind: &TensorMap| -> f64 {
        let v = eval(graph, out, bind, opts);
        match &upstream {
            Some((_, u)) => v.iter().zip(u.iter()).map(|(a, b)| *a as f64 * *b as f64).sum(),
            None => v.iter().map(|a| *a as f64).sum(),
        }
    };
    for name in wrt {
        let analytic = match grads.grads.get(*name) {
            Some(&id) => ev.get(id).unwrap().clone(),
            None => Tensor::zeros(bindings[*name].raw_dim()),
        };
        let base = &bindings[*name];
        assert_eq!(analytic.shape(), base.shape(), "gradient shape of {name}");
        let n = base.len();
        let picks: Vec<usize> = if n <= samples {
            (0..n).collect()
        } else {
            (0..samples).map(|i| (rng::derive(7, i as u64) % n as u64) as usize).collect()
        };
        let base_value = objective(bindings);
        // The absolute floor scales with the tensor's largest gradient, so small gradients are
        // checked too (a fixed floor would let wrong gradients of small magnitude pass).
        let scale = analytic.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        // f32 rounding in the forward pass puts ~1e-6 relative noise on the objective, which
        // the difference quotient divides by 2·eps.
        let noise = base_value.abs() * 3e-6 / eps as f64;
        let floor = 1e-3 * scale + noise + 1e-6;
        let close = |a: f64, b: f64| (a - b).abs() <= floor + 2e-2 * a.abs().max(b.abs());
        for &i in &picks {
            let fd = central_difference(&objective, bindings, name, i, eps);
            let an = analytic.as_slice().unwrap()[i] as f64;
            assert!(close(fd, an), "d/d {name}[{i}]: autodiff {an}, finite differences {fd}");
        }
    }
}

/// Finite differences against autodiff for a whole network, judged per tensor over its probed
/// coordinates together: ReLU and max-pool kinks and f32 rounding make single coordinates
/// unreliable, but a wrong gradient cannot match the difference quotients in direction and
/// size. Requires, for every tensor, a cosine of at least 0.98 and norms within 10%.
pub fn check_gradient_direction(
    graph: &Graph,
    out: NodeId,
    bindings: &TensorMap,
    wrt: &[&str],
    opts: RunOptions,
    eps: f32,
    samples: usize,
) {
    let ids: Vec<NodeId> = wrt.iter().map(|n| graph.find(n).unwrap()).collect();
    let grads = autodiff::differentiate(graph, out, &ids).unwrap();
    assert!(grads.upstream.is_none(), "direction checks need a scalar loss");
    let ev = reference::run(&grads.graph, bindings, &grads.grads.values().copied().collect::<Vec<_>>(), opts).unwrap();
    let objective = |bind: &TensorMap| -> f64 { eval(graph, out, bind, opts).iter().map(|a| *a as f64).sum() };
    for name in wrt {
        let analytic = ev.get(grads.grads[*name]).unwrap().clone();
        let n = analytic.len();
        let (mut dot, mut nf, mut na) = (0f64, 0f64, 0f64);
        for s in 0..samples.min(n) {
            let i = if n <= samples { s } else { (rng::derive(11, s as u64) % n as u64) as usize };
            let fd = central_difference(&objective, bindings, name, i, eps);
            let an = analytic.as_slice().unwrap()[i] as f64;
            dot += fd * an;
            nf += fd * fd;
            na += an * an;
        }
        let cosine = dot / (nf.sqrt() * na.sqrt()).max(1e-300);
        let ratio = nf.sqrt() / na.sqrt().max(1e-300);
        assert!(
            cosine > 0.98 && (ratio - 1.0).abs() < 0.1,
            "{name}: finite differences vs autodiff: cosine {cosine}, norm ratio {ratio}"
        );
    }
}

// ---- property-test strategies ----

pub fn padding_strategy(max_pad: usize) -> impl Strategy<Value = Padding> {
    prop_oneof![
        Just(Padding::Valid),
        Just(Padding::Same),
        (0..=max_pad, 0..=max_pad, 0..=max_pad, 0..=max_pad).prop_map(|(top, bottom, left, right)| Padding::Explicit {
            top,
            bottom,
            left,
            right
        }),
    ]
}

/// A random convolution: `n` images of `hw` with `cg · groups` channels, `cog · groups` filters
/// of size `k`, strides, dilation, padding and an optional bias.
#[derive(Debug, Clone)]
pub struct ConvParams {
    pub n: usize,
    pub hw: [usize; 2],
    pub cg: usize,
    pub groups: usize,
    pub cog: usize,
    pub k: [usize; 2],
    pub strides: [usize; 2],
    pub dilation: [usize; 2],
    pub padding: Padding,
    pub bias: bool,
}

impl ConvParams {
    /// Input channels.
    pub fn channels(&self) -> usize {
        self.cg * self.groups
    }

    /// Output channels.
    pub fn filters(&self) -> usize {
        self.cog * self.groups
    }

    /// The kernel's HWIO shape.
    pub fn kernel_shape(&self) -> [usize; 4] {
        [self.k[0], self.k[1], self.cg, self.filters()]
    }

    /// The IR's attributes.
    pub fn attrs(&self) -> Conv2d {
        Conv2d { strides: self.strides, padding: self.padding, dilation: self.dilation, groups: self.groups }
    }

    /// The geometry [`naive_conv`] takes.
    pub fn case(&self) -> ConvCase {
        ConvCase { strides: self.strides, dilation: self.dilation, groups: self.groups, padding: self.padding }
    }
}

/// Where the suites' random convolutions differ: image height and width, channels per group,
/// strides. Every suite draws 1-2 images, 1-3 groups of 1-3 filters, kernels of 1-3, dilation
/// 1-2, any padding up to 2 and a bias or not.
pub struct ConvRanges {
    pub hw: Range<usize>,
    pub cg: Range<usize>,
    pub strides: Range<usize>,
}

pub fn conv_params(r: ConvRanges) -> impl Strategy<Value = ConvParams> {
    (
        (1usize..3, r.hw.clone(), r.hw),
        (r.cg, 1usize..4, 1usize..4),
        (1usize..4, 1usize..4),
        (r.strides.clone(), r.strides),
        (1usize..3, 1usize..3),
        padding_strategy(2),
        any::<bool>(),
    )
        .prop_map(|((n, h, w), (cg, groups, cog), (kh, kw), (sh, sw), (dh, dw), padding, bias)| ConvParams {
            n,
            hw: [h, w],
            cg,
            groups,
            cog,
            k: [kh, kw],
            strides: [sh, sw],
            dilation: [dh, dw],
            padding,
            bias,
        })
}

pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

#[derive(Debug, Clone)]
pub struct PoolParams {
    pub n: usize,
    pub hw: [usize; 2],
    pub c: usize,
    pub window: [usize; 2],
    pub strides: [usize; 2],
    pub padding: Padding,
    pub max: bool,
}

pub fn pool_params() -> impl Strategy<Value = PoolParams> {
    (
        (1usize..3, 1usize..9, 1usize..9, 1usize..4),
        (1usize..4, 1usize..4, 1usize..4, 1usize..4),
        padding_strategy(2),
        any::<bool>(),
    )
        .prop_map(|((n, h, w, c), (wh, ww, sh, sw), padding, max)| PoolParams {
            n,
            hw: [h, w],
            c,
            window: [wh, ww],
            strides: [sh, sw],
            padding,
            max,
        })
}
