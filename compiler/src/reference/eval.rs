//! Evaluation of one node from its input values: the dispatch from [`Op`] to the kernels.

use std::collections::HashMap;

use ndarray::{Axis, Zip};
use rayon::prelude::*;

use super::conv::ConvGeom;
use super::pool::PoolGeom;
use super::{Mode, RunOptions, conv, gemm, loss, norm, pool};
use crate::error::Result;
use crate::graph::{Graph, NodeId, Op, Pool, per_example_axis};
use crate::rng;
use crate::tensors::Tensor;

/// A node's value and the parameter updates it makes (batch norm's moving statistics).
pub struct Output {
    pub value: Tensor,
    pub updates: Vec<(NodeId, Tensor)>,
}

impl From<Tensor> for Output {
    fn from(value: Tensor) -> Self {
        Output { value, updates: Vec::new() }
    }
}

fn slice(t: &mut Tensor) -> &mut [f32] {
    t.as_slice_mut().expect("the interpreter keeps every tensor in standard layout")
}

fn data(t: &Tensor) -> &[f32] {
    t.as_slice().expect("the interpreter keeps every tensor in standard layout")
}

fn tensor(shape: Vec<usize>, values: Vec<f32>) -> Tensor {
    Tensor::from_shape_vec(shape, values).expect("kernels return one value per element")
}

fn dims4(t: &Tensor) -> [usize; 4] {
    let s = t.shape();
    [s[0], s[1], s[2], s[3]]
}

fn last(t: &Tensor) -> usize {
    *t.shape().last().unwrap_or(&1)
}

fn pool_geom(p: &Pool, x: [usize; 4]) -> PoolGeom {
    let [n, h, w, c] = x;
    let win = p.resolve([h, w]).expect("shapes were checked when the node was added");
    PoolGeom { n, h, w, c, kh: p.window[0], kw: p.window[1], sh: p.strides[0], sw: p.strides[1], win }
}

fn with_batch(batch: usize, dims: &[usize]) -> Vec<usize> {
    std::iter::once(batch).chain(dims.iter().copied()).collect()
}

/// Applies `f` elementwise to two same-shaped tensors, in parallel.
fn zip_map(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Tensor {
    let mut out = Tensor::zeros(a.raw_dim());
    Zip::from(&mut out).and(a).and(b).par_for_each(|o, &x, &y| *o = f(x, y));
    out
}

fn add_bias(y: &mut [f32], bias: &[f32]) {
    let c = bias.len();
    y.par_chunks_mut(c * 64).for_each(|block| {
        for row in block.chunks_exact_mut(c) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    });
}

/// Values several nodes of one run compute from the same tensors, computed once by the first
/// node that needs them exactly as each would, so sharing them changes no bit: batch norm's
/// batch moments (its forward pass and both gradients in training), `Σ dy · x̂` (γ's and the
/// input's gradient) and `Σ dy` (β's gradient, a BiasAddGrad, and the input's). Keyed by the
/// nodes they are computed from, whose values never change within a run.
#[derive(Default)]
pub struct Memo {
    moments: HashMap<NodeId, (Vec<f64>, Vec<f64>)>,
    /// By (x, dy, ε's bits): x̂ depends on ε.
    sum_xhat_dy: HashMap<(NodeId, NodeId, u32), Vec<f64>>,
    sum_dy: HashMap<NodeId, Vec<f64>>,
}

impl Memo {
    /// The batch moments of node `x`, whose value is `values` with `c` channels.
    fn moments(&mut self, x: NodeId, values: &[f32], c: usize) -> &(Vec<f64>, Vec<f64>) {
        self.moments.entry(x).or_insert_with(|| norm::moments(values, c))
    }

    /// `Σ dy` per channel of node `dy`, whose value is `values`.
    fn sum_dy(&mut self, dy: NodeId, values: &[f32], c: usize) -> Vec<f64> {
        self.sum_dy.entry(dy).or_insert_with(|| norm::sum_dy(values, c)).clone()
    }

    /// `Σ dy · x̂` per channel of nodes `x` and `dy` (values `xv`, `dyv`) under `stats`: shared
    /// in training, where `stats` are x's batch moments with ε; at inference x̂ comes from each
    /// batch norm's own moving statistics, so it is computed afresh.
    #[allow(clippy::too_many_arguments)] // the two nodes, their values and the statistics
    fn sum_xhat_dy(
        &mut self,
        (x, dy): (NodeId, NodeId),
        (xv, dyv): (&[f32], &[f32]),
        c: usize,
        stats: &norm::Stats,
        eps: f32,
        training: bool,
    ) -> Vec<f64> {
        if !training {
            return norm::sum_xhat_dy(xv, dyv, c, stats);
        }
        self.sum_xhat_dy.entry((x, dy, eps.to_bits())).or_insert_with(|| norm::sum_xhat_dy(xv, dyv, c, stats)).clone()
    }
}

/// Evaluates node `id` of `graph` on `inputs` (the values of its input nodes, in order),
/// reusing what `memo` holds from earlier nodes of the same run.
pub fn eval(graph: &Graph, id: NodeId, inputs: &[&Tensor], opts: RunOptions, memo: &mut Memo) -> Result<Output> {
    let node = graph.node(id);
    let training = opts.mode == Mode::Training;
    let x = inputs.first().copied();
    let x = || x.expect("arity was checked when the node was added");
    let batch = x().shape().first().copied().unwrap_or(1);
    Ok(match &node.op {
        Op::Input(_) | Op::Parameter(_) => unreachable!("leaves are bound, not evaluated"),
        Op::Conv2d(c) => {
            let g = ConvGeom::new(c, dims4(x()), dims4(inputs[1]));
            let mut y = conv::forward(&g, data(x()), data(inputs[1]));
            if let Some(b) = inputs.get(2) {
                add_bias(&mut y, data(b));
            }
            tensor(vec![g.n, g.win.out_h, g.win.out_w, g.co], y).into()
        }
        Op::MaxPool(p) => {
            let g = pool_geom(p, dims4(x()));
            tensor(vec![g.n, g.win.out_h, g.win.out_w, g.c], pool::max_forward(&g, data(x()))).into()
        }
        Op::AvgPool(p) => {
            let g = pool_geom(p, dims4(x()));
            tensor(vec![g.n, g.win.out_h, g.win.out_w, g.c], pool::avg_forward(&g, data(x()))).into()
        }
        Op::GlobalAvgPool => {
            let [n, h, w, c] = dims4(x());
            tensor(vec![n, c], pool::global_avg_forward(n, h * w, c, data(x()))).into()
        }
        Op::Dense => {
            let (din, dout) = (inputs[1].shape()[0], inputs[1].shape()[1]);
            let rows = x().len() / din;
            let mut y = vec![0f32; rows * dout];
            gemm::par_matmul(
                rows,
                din,
                dout,
                gemm::MatRef::rows(data(x()), din),
                gemm::MatRef::rows(data(inputs[1]), dout),
                &mut y,
            );
            if let Some(b) = inputs.get(2) {
                add_bias(&mut y, data(b));
            }
            let mut shape = x().shape().to_vec();
            *shape.last_mut().expect("dense input has a feature axis") = dout;
            tensor(shape, y).into()
        }
        // Elementwise nodes: computed in a copy of x, as the interpreter computes them in x's
        // own buffer when x dies here (one definition of each).
        Op::BiasAdd | Op::Add | Op::Mul | Op::Relu | Op::Relu6 | Op::BatchNorm(_) => {
            return eval_into(graph, id, x().clone(), &inputs[1..], opts, memo);
        }
        Op::Dropout(d) => {
            if !training || d.rate == 0.0 {
                x().clone().into()
            } else {
                let key = rng::derive(d.seed, opts.step);
                let rate = d.rate;
                let y: Vec<f32> = data(x())
                    .par_iter()
                    .enumerate()
                    .map(|(i, &v)| v * rng::dropout_scale(rate, key, i as u64))
                    .collect();
                tensor(x().shape().to_vec(), y).into()
            }
        }
        Op::Flatten => {
            let per = x().len() / batch;
            tensor(vec![batch, per], data(x()).to_vec()).into()
        }
        Op::Reshape(_) => tensor(with_batch(batch, &node.shape.dims), data(x()).to_vec()).into(),
        Op::Concat(c) => {
            let axis = per_example_axis(c.axis, x().ndim()).expect("checked when added") + 1;
            let views: Vec<_> = inputs.iter().map(|t| t.view()).collect();
            ndarray::concatenate(Axis(axis), &views)
                .expect("shapes checked when added")
                .as_standard_layout()
                .into_owned()
                .into()
        }
        Op::Softmax => tensor(x().shape().to_vec(), loss::softmax(data(x()), last(x()))).into(),
        Op::SoftmaxCrossEntropy(sce) => {
            let c = last(x());
            let labels = loss::check_labels(&graph.node(node.inputs[1]).name, data(inputs[1]), c)?;
            Tensor::from_elem(vec![], loss::cross_entropy(data(x()), &labels, c, sce.label_smoothing)).into()
        }
        Op::SoftmaxCrossEntropyGrad(sce) => {
            let c = last(x());
            let labels = loss::check_labels(&graph.node(node.inputs[1]).name, data(inputs[1]), c)?;
            tensor(x().shape().to_vec(), loss::cross_entropy_grad(data(x()), &labels, c, sce.label_smoothing)).into()
        }
        Op::Conv2dBackpropInput(b) => {
            let [h, w, c] = b.input_shape;
            let g = ConvGeom::new(&b.conv, [batch, h, w, c], dims4(inputs[1]));
            tensor(vec![batch, h, w, c], conv::backprop_input(&g, data(x()), data(inputs[1]))).into()
        }
        Op::Conv2dBackpropFilter(b) => {
            let g = ConvGeom::new(&b.conv, dims4(x()), b.kernel_shape);
            tensor(b.kernel_shape.to_vec(), conv::backprop_filter(&g, data(x()), data(inputs[1]))).into()
        }
        Op::MaxPoolGrad(p) => {
            let g = pool_geom(p, dims4(x()));
            tensor(x().shape().to_vec(), pool::max_backward(&g, data(x()), data(inputs[1]))).into()
        }
        Op::AvgPoolGrad(pg) => {
            let [h, w, c] = pg.input_shape;
            let g = pool_geom(&pg.pool, [batch, h, w, c]);
            tensor(vec![batch, h, w, c], pool::avg_backward(&g, data(x()))).into()
        }
        Op::GlobalAvgPoolGrad(gg) => {
            let [h, w] = gg.input_hw;
            let c = last(x());
            tensor(vec![batch, h, w, c], pool::global_avg_backward(batch, h * w, c, data(x()))).into()
        }
        Op::DenseBackpropInput => {
            let (din, dout) = (inputs[1].shape()[0], inputs[1].shape()[1]);
            let rows = x().len() / dout;
            let mut dx = vec![0f32; rows * din];
            let wt = gemm::MatRef::rows(data(inputs[1]), dout).t();
            gemm::par_matmul(rows, dout, din, gemm::MatRef::rows(data(x()), dout), wt, &mut dx);
            let mut shape = x().shape().to_vec();
            *shape.last_mut().expect("dy has a feature axis") = din;
            tensor(shape, dx).into()
        }
        Op::DenseBackpropKernel => {
            let (din, dout) = (last(x()), last(inputs[1]));
            let rows = x().len() / din;
            tensor(vec![din, dout], gemm::par_matmul_tn(rows, din, dout, data(x()), data(inputs[1]))).into()
        }
        Op::BiasAddGrad => {
            let c = last(x());
            let sums = memo.sum_dy(node.inputs[0], data(x()), c);
            tensor(vec![c], sums.into_iter().map(|s| s as f32).collect()).into()
        }
        Op::ReluGrad => zip_map(x(), inputs[1], |v, d| if v > 0.0 { d } else { 0.0 }).into(),
        Op::Relu6Grad => zip_map(x(), inputs[1], |v, d| if v > 0.0 && v < 6.0 { d } else { 0.0 }).into(),
        Op::BatchNormGradInput(bn) => {
            let c = last(x());
            let (xv, dy) = (data(x()), data(inputs[4]));
            let stats = bn_stats(memo, node.inputs[0], xv, c, data(inputs[2]), data(inputs[3]), bn.epsilon, training);
            let dx = if training {
                let nodes = (node.inputs[0], node.inputs[4]);
                let sum_xhat_dy = memo.sum_xhat_dy(nodes, (xv, dy), c, &stats, bn.epsilon, true);
                let sum_dy = memo.sum_dy(node.inputs[4], dy, c);
                norm::grad_input(xv, dy, c, &stats, data(inputs[1]), Some((&sum_dy, &sum_xhat_dy)))
            } else {
                norm::grad_input(xv, dy, c, &stats, data(inputs[1]), None)
            };
            tensor(x().shape().to_vec(), dx).into()
        }
        Op::BatchNormGradGamma(bn) => {
            let c = last(x());
            let (xv, dy) = (data(x()), data(inputs[3]));
            let stats = bn_stats(memo, node.inputs[0], xv, c, data(inputs[1]), data(inputs[2]), bn.epsilon, training);
            let sums = memo.sum_xhat_dy((node.inputs[0], node.inputs[3]), (xv, dy), c, &stats, bn.epsilon, training);
            tensor(vec![c], sums.into_iter().map(|s| s as f32).collect()).into()
        }
        Op::SoftmaxGrad => {
            tensor(x().shape().to_vec(), loss::softmax_grad(data(x()), data(inputs[1]), last(x()))).into()
        }
        Op::Slice(s) => {
            let axis = per_example_axis(s.axis, x().ndim()).expect("checked when added") + 1;
            x().slice_axis(Axis(axis), (s.start..s.start + s.len).into()).as_standard_layout().into_owned().into()
        }
    })
}

/// Whether [`eval_into`] can compute `op` in its first input's buffer: elementwise ops whose
/// output has that input's shape.
pub fn writes_in_place(op: &Op) -> bool {
    matches!(op, Op::Relu | Op::Relu6 | Op::Add | Op::Mul | Op::BiasAdd | Op::BatchNorm(_))
}

/// Evaluates a node [`writes_in_place`] accepts into `x`, its first input's value (which dies
/// here, or is a copy when [`eval`] calls this): the definition of these elementwise ops.
pub fn eval_into(
    graph: &Graph,
    id: NodeId,
    mut x: Tensor,
    rest: &[&Tensor],
    opts: RunOptions,
    memo: &mut Memo,
) -> Result<Output> {
    let node = graph.node(id);
    let c = last(&x);
    let mut updates = Vec::new();
    match &node.op {
        Op::Relu => x.par_mapv_inplace(|v| v.max(0.0)),
        Op::Relu6 => x.par_mapv_inplace(|v| v.clamp(0.0, 6.0)),
        Op::Add => Zip::from(&mut x).and(rest[0]).par_for_each(|o, &b| *o += b),
        Op::Mul => Zip::from(&mut x).and(rest[0]).par_for_each(|o, &b| *o *= b),
        Op::BiasAdd => add_bias(slice(&mut x), data(rest[0])),
        Op::BatchNorm(bn) => {
            let (gamma, beta, mm, mv) = (data(rest[0]), data(rest[1]), data(rest[2]), data(rest[3]));
            if opts.mode == Mode::Training {
                let (mean, var) = memo.moments(node.inputs[0], data(&x), c).clone();
                let rows = (x.len() / c) as f64;
                let bessel = if rows > 1.0 { rows / (rows - 1.0) } else { 1.0 };
                let m = bn.momentum as f64;
                let new_mean: Vec<f32> = (0..c).map(|i| (m * mm[i] as f64 + (1.0 - m) * mean[i]) as f32).collect();
                let new_var: Vec<f32> =
                    (0..c).map(|i| (m * mv[i] as f64 + (1.0 - m) * var[i] * bessel) as f32).collect();
                let stats = norm::Stats::new(mean, &var, bn.epsilon);
                norm::forward_in_place(slice(&mut x), c, &stats, gamma, beta);
                updates = vec![(node.inputs[3], tensor(vec![c], new_mean)), (node.inputs[4], tensor(vec![c], new_var))];
            } else {
                let mean = mm.iter().map(|&v| v as f64).collect();
                let var: Vec<f64> = mv.iter().map(|&v| v as f64).collect();
                norm::forward_in_place(slice(&mut x), c, &norm::Stats::new(mean, &var, bn.epsilon), gamma, beta);
            }
        }
        _ => {
            let mut inputs = vec![&x];
            inputs.extend_from_slice(rest);
            return eval(graph, id, &inputs, opts, memo);
        }
    }
    Ok(Output { value: x, updates })
}

/// Batch statistics of node `x` (value `xv`) in training, moving statistics in inference.
#[allow(clippy::too_many_arguments)] // the node, its value and the batch norm's operands
fn bn_stats(
    memo: &mut Memo,
    x: NodeId,
    xv: &[f32],
    c: usize,
    moving_mean: &[f32],
    moving_var: &[f32],
    eps: f32,
    training: bool,
) -> norm::Stats {
    if training {
        let (mean, var) = memo.moments(x, xv, c);
        norm::Stats::new(mean.clone(), var, eps)
    } else {
        let var: Vec<f64> = moving_var.iter().map(|&v| v as f64).collect();
        norm::Stats::new(moving_mean.iter().map(|&v| v as f64).collect(), &var, eps)
    }
}
