//! The kernels layer: one module per op family, and the dispatcher — the only `match` from a
//! fused kernel's kind to the function that emits it.

pub(crate) mod batch_norm;
pub(crate) mod conv;
pub(crate) mod conv_grad;
pub(crate) mod data_movement;
pub(crate) mod dense;
pub(crate) mod elementwise;
pub(crate) mod optimizer;
pub(crate) mod pooling;
pub(crate) mod softmax;

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::lower::emitter::{Emitted, Emitter};
use crate::lower::kernel::{Epilogue, Kernel, Main};
use crate::lower::options::Options;

/// Emits `kernel` through `e`: the one place a kernel's kind picks its emitter.
pub(crate) fn emit(e: &mut Emitter, kernel: &Kernel) -> Result<Emitted> {
    match &kernel.main {
        Main::Conv(n) => conv::conv(e, kernel, *n),
        Main::ConvGradInput(n) => conv_grad::input(e, kernel, *n),
        Main::ConvGradFilter(n) => conv_grad::filter(e, kernel, *n),
        Main::Dense(n) => dense::dense(e, kernel, *n),
        Main::MatMulT(n) => dense::dense_grad(e, kernel, *n),
        Main::ColumnSums(n) => dense::column_sums(e, kernel, *n),
        Main::MaxPool(n) | Main::AvgPool(n) => pooling::pool(e, kernel, *n),
        Main::GlobalAvgPool(n) => pooling::global_avg_pool(e, kernel, *n),
        Main::PoolGrad(n) => pooling::pool_grad(e, kernel, *n),
        Main::Pointwise { input } => elementwise::pointwise(e, kernel, *input),
        Main::Mask(n) => elementwise::mask(e, kernel, *n),
        Main::Dropout(n) => elementwise::dropout(e, kernel, *n),
        Main::Softmax(n) => softmax::softmax(e, kernel, *n),
        Main::SoftmaxGrad(n) => softmax::softmax_grad(e, kernel, *n),
        Main::Loss(n) => softmax::loss(e, kernel, *n),
        Main::LossGrad(n) => softmax::loss_grad(e, kernel, *n),
        Main::BatchNormGrad(g) => batch_norm::grad(e, kernel, g),
        Main::BatchNormGradGamma(n) => batch_norm::grad_gamma(e, kernel, *n),
        Main::Concat(n) => data_movement::concat(e, kernel, *n),
        Main::Slice(n) => data_movement::slice(e, kernel, *n),
        Main::Update(u) => optimizer::update(e, kernel, u),
        Main::ShardedUpdate(s) => optimizer::sharded_update(e, kernel, s),
        Main::Advance(state) => optimizer::advance(e, kernel, state),
        Main::View(_) => unreachable!("views emit nothing: the tiling pass skips them"),
    }
}

/// HBM scratch `kernel` needs beyond graph tensors, as its family declares it (the allocation
/// pass places it, live only during the kernel); with batch norm over groups of replicas, room
/// for the sums the group all-reduces.
pub(crate) fn scratch_bytes(graph: &Graph, kernel: &Kernel, opts: &Options) -> u64 {
    let group_sums = |bn: NodeId| batch_norm::group_scratch_bytes(graph, bn, opts);
    let statistics: u64 = match &kernel.main {
        Main::BatchNormGrad(g) => group_sums(g.input),
        Main::BatchNormGradGamma(n) => group_sums(*n),
        _ => kernel
            .epilogue
            .iter()
            .map(|step| if let Epilogue::BatchNormTrain(bn) = step { group_sums(*bn) } else { 0 })
            .sum(),
    };
    // No family with scratch of its own has batch statistics: the group's sums are the whole
    // scratch of the kernels that need them (`batch_stats::Group` finds them at its start).
    let family = family_scratch_bytes(graph, kernel);
    debug_assert!(statistics == 0 || family == 0, "{}: two kinds of scratch", kernel.name);
    statistics + family
}

fn family_scratch_bytes(graph: &Graph, kernel: &Kernel) -> u64 {
    match &kernel.main {
        Main::ConvGradInput(n) => conv_grad::input_scratch_bytes(graph, *n),
        Main::Conv(_)
        | Main::ConvGradFilter(_)
        | Main::Dense(_)
        | Main::MatMulT(_)
        | Main::ColumnSums(_)
        | Main::MaxPool(_)
        | Main::AvgPool(_)
        | Main::GlobalAvgPool(_)
        | Main::PoolGrad(_)
        | Main::Pointwise { .. }
        | Main::Mask(_)
        | Main::Dropout(_)
        | Main::Softmax(_)
        | Main::SoftmaxGrad(_)
        | Main::Loss(_)
        | Main::LossGrad(_)
        | Main::BatchNormGrad(_)
        | Main::BatchNormGradGamma(_)
        | Main::Concat(_)
        | Main::Slice(_)
        | Main::Update(_)
        | Main::ShardedUpdate(_)
        | Main::Advance(_)
        | Main::View(_) => 0,
    }
}
