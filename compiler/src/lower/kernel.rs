//! What flows between the lowering's passes: fused kernels (a main operation and its
//! epilogue), where each tensor lives, and the report of each emitted kernel.

use std::fmt;
use std::ops::Range;

use serde::Serialize;
use systolic_simulator::isa::Tile;

use crate::graph::{Graph, NodeId};
use crate::lower::training::{ShardedUpdate, Update};

/// An elementwise step applied in a kernel's epilogue.
#[derive(Clone, Debug, PartialEq)]
pub enum Epilogue {
    /// Adds a `[C]` parameter.
    Bias(NodeId),
    /// Batch norm with moving statistics; the node's inputs give the parameters.
    BatchNorm(NodeId),
    /// Batch norm with the batch's statistics (training): a pass over the kernel's input
    /// computes them first, so it is only ever the first step of a pointwise kernel.
    BatchNormTrain(NodeId),
    /// Adds a tensor of the kernel's output shape.
    Residual(NodeId),
    /// Multiplies by a tensor of the kernel's output shape (`Mul`). A kernel has at most one
    /// such tensor operand (this or `Residual`).
    Product(NodeId),
    /// `ReluGrad` / `Relu6Grad` of the value so far (a gradient) by the activation `y`: the
    /// mask applied where the gradient is made, so it is not written and read back. Only in
    /// a convolution input gradient's epilogue.
    Mask {
        y: NodeId,
        relu6: bool,
    },
    Relu,
    Relu6,
}

/// What a kernel computes before its epilogue.
#[derive(Clone, Debug, PartialEq)]
pub enum Main {
    Conv(NodeId),
    Dense(NodeId),
    MaxPool(NodeId),
    AvgPool(NodeId),
    GlobalAvgPool(NodeId),
    Softmax(NodeId),
    Concat(NodeId),
    /// A slice along one axis (a concatenation's gradient).
    Slice(NodeId),
    /// Only an epilogue, applied to an existing tensor.
    Pointwise {
        input: NodeId,
    },
    /// The same bytes under another shape (reshape, flatten, dropout at inference).
    View(NodeId),
    // ---- training ----
    /// Softmax cross-entropy: the mean loss, from logits and one-hot labels.
    Loss(NodeId),
    /// The loss's gradient with respect to the logits.
    LossGrad(NodeId),
    /// `DenseBackpropInput` (`dy · Wᵀ`) or `DenseBackpropKernel` (`xᵀ · dy`).
    MatMulT(NodeId),
    /// `BiasAddGrad`: sums over every row.
    ColumnSums(NodeId),
    /// `SoftmaxGrad`: `y · (dy − Σ dy·y)` per row.
    SoftmaxGrad(NodeId),
    /// `ReluGrad` or `Relu6Grad`: `dy` where the activation was in its active range.
    Mask(NodeId),
    /// `MaxPoolGrad`, `AvgPoolGrad` or `GlobalAvgPoolGrad` on the VPU.
    PoolGrad(NodeId),
    /// `Conv2dBackpropInput`: stride-1 convolutions of the gradient with the flipped,
    /// transposed kernel (one per stride phase of the input for a strided convolution).
    ConvGradInput(NodeId),
    /// `Conv2dBackpropFilter`: per tap, `dyᵀ · x_tap` accumulated over blocks of pixels.
    ConvGradFilter(NodeId),
    /// A batch norm's gradients with batch statistics in one kernel: a pass of sums, then the
    /// input gradient; the gamma and beta gradients come from the sums.
    BatchNormGrad(BatchNormGrad),
    /// `BatchNormGradGamma`: one pass of sums.
    BatchNormGradGamma(NodeId),
    /// Dropout in a training step (forward, or the same mask on the gradient): the mask drawn
    /// on the VPU from the step number.
    Dropout(NodeId),
    /// The optimizer's update of one parameter (in place) and its slots.
    Update(Update),
    /// One bucket of a sharded weight update: this replica's shard of the parameters taken,
    /// updated from the reduce-scattered gradient shard with the slots' shards, all-gathered.
    ShardedUpdate(ShardedUpdate),
    /// The optimizer's shared state after the step (Adam's powers).
    Advance(Vec<NodeId>),
}

/// The nodes of one batch norm's gradient kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormGrad {
    /// The `BatchNormGradInput` node (the kernel's output).
    pub input: NodeId,
    /// `BatchNormGradGamma` on the same `x` and `dy`.
    pub gamma: Option<NodeId>,
    /// `BiasAddGrad` of the same `dy` (beta's gradient).
    pub beta: Option<NodeId>,
    /// A `ReluGrad` / `Relu6Grad` that makes `dy` and feeds only this kernel: applied to each
    /// block as it loads, so the masked gradient never goes to HBM.
    pub mask: Option<NodeId>,
}

/// A group of nodes computed by one block of instructions.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub main: Main,
    pub epilogue: Vec<Epilogue>,
    /// Every graph node the kernel computes, in order.
    pub nodes: Vec<NodeId>,
    /// The node whose value the kernel writes to HBM.
    pub output: NodeId,
    /// Further nodes it writes (a fused batch-norm gradient's gamma and beta gradients).
    pub also: Vec<NodeId>,
    /// A convolution whose output feeds this batch norm (batch statistics): its epilogue also
    /// sums the output per channel, so the batch norm skips its own pass of sums.
    pub stats_for: Option<NodeId>,
}

impl Kernel {
    /// The tensors (graph nodes) the kernel reads, excluding parameters.
    pub fn inputs(&self, graph: &Graph) -> Vec<NodeId> {
        let mut out = Vec::new();
        match &self.main {
            Main::Conv(n)
            | Main::Dense(n)
            | Main::MaxPool(n)
            | Main::AvgPool(n)
            | Main::GlobalAvgPool(n)
            | Main::Softmax(n)
            | Main::Dropout(n)
            | Main::Slice(n)
            | Main::View(n) => out.push(graph.node(*n).inputs[0]),
            Main::Concat(n)
            | Main::MatMulT(n)
            | Main::SoftmaxGrad(n)
            | Main::Mask(n)
            | Main::PoolGrad(n)
            | Main::ConvGradInput(n)
            | Main::ConvGradFilter(n)
            | Main::BatchNormGradGamma(n) => out.extend(graph.node(*n).inputs.iter().copied()),
            Main::BatchNormGrad(g) => {
                let ins = &graph.node(g.input).inputs;
                out.extend(ins[..4].iter().copied());
                match g.mask {
                    Some(m) => out.extend(graph.node(m).inputs.iter().copied()),
                    None => out.push(ins[4]),
                }
            }
            Main::Pointwise { input } => out.push(*input),
            // The labels are read as their one-hot input, a leaf.
            Main::Loss(n) | Main::LossGrad(n) | Main::ColumnSums(n) => out.push(graph.node(*n).inputs[0]),
            Main::Update(u) => out.push(u.grad),
            Main::ShardedUpdate(s) => out.push(s.grad_shard),
            Main::Advance(_) => {}
        }
        for e in &self.epilogue {
            match e {
                Epilogue::Residual(r) | Epilogue::Product(r) | Epilogue::Mask { y: r, .. } => out.push(*r),
                Epilogue::Bias(_) | Epilogue::BatchNorm(_) | Epilogue::BatchNormTrain(_) => {}
                Epilogue::Relu | Epilogue::Relu6 => {}
            }
        }
        out
    }

    /// Whether the kernel writes a new tensor (views alias one, updates write in place).
    pub fn allocates(&self) -> bool {
        self.main.storage() == Storage::New
    }

    /// A short description of the kernel's ops (`Conv2d+BatchNorm+Relu`).
    pub fn ops(&self, graph: &Graph) -> String {
        self.nodes.iter().map(|&n| graph.node(n).op.kind()).collect::<Vec<_>>().join("+")
    }
}

/// Where a kernel's result lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A new tensor in HBM.
    New,
    /// The bytes of the node's input, under the node's shape.
    View,
    /// Tensors that exist already, rewritten in place (parameters, optimizer state).
    InPlace,
}

impl Main {
    /// Where the kernel's result lives.
    pub fn storage(&self) -> Storage {
        match self {
            Main::View(_) => Storage::View,
            Main::Update(_) | Main::ShardedUpdate(_) | Main::Advance(_) => Storage::InPlace,
            Main::Conv(_)
            | Main::Dense(_)
            | Main::MaxPool(_)
            | Main::AvgPool(_)
            | Main::GlobalAvgPool(_)
            | Main::Softmax(_)
            | Main::Concat(_)
            | Main::Slice(_)
            | Main::Pointwise { .. }
            | Main::Loss(_)
            | Main::LossGrad(_)
            | Main::MatMulT(_)
            | Main::ColumnSums(_)
            | Main::SoftmaxGrad(_)
            | Main::Mask(_)
            | Main::PoolGrad(_)
            | Main::ConvGradInput(_)
            | Main::ConvGradFilter(_)
            | Main::BatchNormGrad(_)
            | Main::BatchNormGradGamma(_)
            | Main::Dropout(_) => Storage::New,
        }
    }
}

impl fmt::Display for Main {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// The compiler's account of one kernel: what it computes, how it was tiled, and its estimate.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub name: String,
    pub ops: String,
    /// How the kernel was lowered (conv strategy, block sizes, unit).
    pub strategy: String,
    /// The matmul shape after padding to the array, e.g. `M 928 x K 64→128 x N 64→128 (9 taps)`.
    pub padded: String,
    /// MXU passes (weight tiles streamed).
    pub mxu_passes: u64,
    /// FLOPs of the graph nodes (2 per multiply-add).
    pub flops: u64,
    /// Multiply-adds the graph asks for.
    pub useful_macs: u64,
    /// Multiply-adds the MXU performs, padding included (`passes × rows × cols × streamed rows`).
    pub padded_macs: u64,
    /// Fraction of the MXU work on the PEs the operands occupy that multiplies padding: zeros
    /// the mapping put into the streamed rows or the weight tiles (padded pixels, rows over the
    /// padded width, contraction rows rounded up to a pass).
    pub padding_waste: f64,
    /// Fraction of the array's PEs the passes' operands occupy (SCALE-Sim's mapping
    /// efficiency): a layer with 64 channels fills half of a 128-wide array whatever the
    /// mapping. The passes' utilisation is `(1 − padding_waste) · array_fill`.
    pub array_fill: f64,
    /// Estimated cycles of each resource.
    pub mxu_cycles: u64,
    pub hbm_bytes: u64,
    pub dma_cycles: u64,
    pub vpu_cycles: u64,
    /// The compiler's estimate for the kernel (the slowest resource, plus what does not overlap).
    pub estimate_cycles: u64,
    /// The kernel's instructions in the program.
    pub instructions: Range<usize>,
}

/// Where a tensor lives: its logical shape and its HBM tile (shared by views).
#[derive(Clone, Debug)]
pub(crate) struct Place {
    pub shape: Vec<usize>,
    pub tile: Tile,
}

/// A tensor's 2-D view: all dimensions but the last as rows.
pub(crate) fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        None => (1, 1),
        Some((&last, rest)) => (rest.iter().product::<usize>().max(1), last),
    }
}
