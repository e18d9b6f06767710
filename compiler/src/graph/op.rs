//! The closed set of operations and their attributes.
//!
//! `Op` is a closed enum on purpose: every backend (reference, autodiff, lowering, cost model)
//! matches it exhaustively, so adding an op fails to compile until every backend handles it.
//! Attributes are small structs with serde defaults, so hand-written model files only state what
//! differs from the usual.

use serde::{Deserialize, Serialize};

/// Spatial padding of a convolution or pooling window (TensorFlow's conventions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Padding {
    /// No padding: windows must fit inside the input.
    #[default]
    Valid,
    /// Output size `ceil(in / stride)`; the extra padding goes after (bottom/right), as in TF.
    Same,
    /// Explicit zero padding on each side (PyTorch style), in pixels.
    Explicit { top: usize, bottom: usize, left: usize, right: usize },
}

/// Padding resolved against a concrete input size: pixels added on each side and the output size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window2d {
    pub out_h: usize,
    pub out_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
}

impl Padding {
    /// Resolves the padding for an `in_hw` input, an effective (dilated) window and strides.
    pub fn resolve(&self, in_hw: [usize; 2], window: [usize; 2], strides: [usize; 2]) -> Result<Window2d, String> {
        let axis = |i: usize, before: usize, after: usize| -> Result<usize, String> {
            let padded = in_hw[i] + before + after;
            if padded < window[i] {
                let dim = if i == 0 { "height" } else { "width" };
                return Err(format!(
                    "input {dim} {} (padded to {padded}) is smaller than the window {}; use SAME padding or a larger input",
                    in_hw[i], window[i]
                ));
            }
            Ok((padded - window[i]) / strides[i] + 1)
        };
        match *self {
            Padding::Valid => Ok(Window2d {
                out_h: axis(0, 0, 0)?,
                out_w: axis(1, 0, 0)?,
                pad_top: 0,
                pad_left: 0,
                pad_bottom: 0,
                pad_right: 0,
            }),
            Padding::Same => {
                let mut pads = [(0, 0); 2];
                let mut outs = [0; 2];
                for i in 0..2 {
                    let out = in_hw[i].div_ceil(strides[i]);
                    let total = ((out.max(1) - 1) * strides[i] + window[i]).saturating_sub(in_hw[i]);
                    pads[i] = (total / 2, total - total / 2);
                    outs[i] = out;
                }
                if outs[0] == 0 || outs[1] == 0 {
                    return Err("input has an empty spatial dimension".into());
                }
                Ok(Window2d {
                    out_h: outs[0],
                    out_w: outs[1],
                    pad_top: pads[0].0,
                    pad_bottom: pads[0].1,
                    pad_left: pads[1].0,
                    pad_right: pads[1].1,
                })
            }
            Padding::Explicit { top, bottom, left, right } => Ok(Window2d {
                out_h: axis(0, top, bottom)?,
                out_w: axis(1, left, right)?,
                pad_top: top,
                pad_left: left,
                pad_bottom: bottom,
                pad_right: right,
            }),
        }
    }
}

/// Convolution attributes. The kernel (HWIO: `[kh, kw, cin / groups, cout]`) and the optional
/// bias are the node's second and third inputs, so their shapes say the kernel size and filters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Conv2d {
    pub strides: [usize; 2],
    pub padding: Padding,
    pub dilation: [usize; 2],
    /// Channel groups: 1 is a dense conv, `cin` is depthwise.
    pub groups: usize,
}

impl Default for Conv2d {
    fn default() -> Self {
        Conv2d { strides: [1, 1], padding: Padding::Valid, dilation: [1, 1], groups: 1 }
    }
}

impl Conv2d {
    /// The dilated window size for a `[kh, kw]` kernel.
    pub fn effective_window(&self, kernel_hw: [usize; 2]) -> [usize; 2] {
        [(kernel_hw[0] - 1) * self.dilation[0] + 1, (kernel_hw[1] - 1) * self.dilation[1] + 1]
    }

    /// Resolves output size and padding for an input of `in_hw` and a kernel of `kernel_hw`.
    pub fn window(&self, in_hw: [usize; 2], kernel_hw: [usize; 2]) -> Result<Window2d, String> {
        self.padding.resolve(in_hw, self.effective_window(kernel_hw), self.strides)
    }
}

/// Max- or average-pooling attributes. Average pooling divides by the number of input pixels
/// inside the window (padding excluded), as TensorFlow does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Pool {
    pub window: [usize; 2],
    pub strides: [usize; 2],
    pub padding: Padding,
}

impl Default for Pool {
    fn default() -> Self {
        Pool { window: [2, 2], strides: [2, 2], padding: Padding::Valid }
    }
}

impl Pool {
    /// Resolves padding and output size. A pooling window must overlap the image everywhere,
    /// so explicit padding must be smaller than the window (convolutions have no such limit).
    pub fn resolve(&self, in_hw: [usize; 2]) -> Result<Window2d, String> {
        if let Padding::Explicit { top, bottom, left, right } = self.padding
            && (top >= self.window[0] || bottom >= self.window[0] || left >= self.window[1] || right >= self.window[1])
        {
            return Err(format!(
                "explicit pooling padding {top},{bottom},{left},{right} must be smaller than the window {}x{} on each side",
                self.window[0], self.window[1]
            ));
        }
        self.padding.resolve(in_hw, self.window, self.strides)
    }
}

/// Batch normalisation over the last (channel) axis. Inputs: x, gamma, beta, moving_mean,
/// moving_variance. In training mode it normalises with the batch statistics and updates the
/// moving ones as `moving = momentum * moving + (1 - momentum) * batch` (Keras' convention; the
/// variance update uses the unbiased batch variance, as TF's fused batch norm and PyTorch do).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchNorm {
    pub momentum: f32,
    pub epsilon: f32,
}

impl Default for BatchNorm {
    fn default() -> Self {
        BatchNorm { momentum: 0.99, epsilon: 1e-3 }
    }
}

/// Inverted dropout: in training, zero each element with probability `rate` and scale the rest
/// by `1 / (1 - rate)`; identity at inference. The mask is a pure function of (seed, step,
/// element), so every backend draws the same one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dropout {
    pub rate: f32,
    pub seed: u64,
}

impl Default for Dropout {
    fn default() -> Self {
        Dropout { rate: 0.5, seed: 0 }
    }
}

/// Reshape of each example (the batch dimension is kept); one entry may be -1 (inferred).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reshape {
    pub shape: Vec<i64>,
}

/// Concatenation along `axis` of the batched tensor (negative counts from the end; 0, the
/// batch axis, is not allowed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concat {
    pub axis: i64,
}

impl Default for Concat {
    fn default() -> Self {
        Concat { axis: -1 }
    }
}

/// Mean over the batch of the cross-entropy between `softmax(logits)` and integer labels,
/// optionally smoothed: the target is `(1 - s) * onehot + s / classes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SoftmaxCrossEntropy {
    pub label_smoothing: f32,
}

/// The element type an Input carries. Labels are integer class ids (stored as I32/I64 in
/// safetensors files); inside the interpreter every tensor is f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DType {
    #[default]
    F32,
    I32,
}

/// A graph input: the shape of one example (the batch dimension is added at run time).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub shape: Vec<usize>,
    #[serde(default)]
    pub dtype: DType,
}

/// How a parameter is initialised. Glorot/He/LeCun use fan-in and fan-out from the HWIO (or
/// `[in, out]`) shape; the normal variants are truncated at two standard deviations (as Keras).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f32),
    Uniform { low: f32, high: f32 },
    Normal { mean: f32, stddev: f32 },
    GlorotUniform,
    GlorotNormal,
    HeUniform,
    HeNormal,
}

/// A parameter tensor of fixed shape (no batch dimension). Non-trainable parameters (batch norm's
/// moving statistics) are updated by the forward pass in training mode, never by an optimizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parameter {
    pub shape: Vec<usize>,
    pub init: Init,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub trainable: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The input-gradient of a convolution: `dy` and the kernel give `dx` of an input of `input_shape`
/// (`[h, w, c]`; the stride makes the input size ambiguous from `dy` alone).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvBackpropInput {
    pub conv: Conv2d,
    pub input_shape: [usize; 3],
}

/// The kernel-gradient of a convolution: `x` and `dy` give `dkernel` of `kernel_shape` (HWIO).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvBackpropFilter {
    pub conv: Conv2d,
    pub kernel_shape: [usize; 4],
}

/// The gradient of an average pool (or global average pool) with respect to its input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolGrad {
    pub pool: Pool,
    pub input_shape: [usize; 3],
}

/// The gradient of a global average pool: spreads `dy / (h * w)` over an `input_hw` image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalPoolGrad {
    pub input_hw: [usize; 2],
}

/// The slice `[start, start + len)` along `axis` of the batched tensor (the gradient of Concat).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub axis: i64,
    pub start: usize,
    pub len: usize,
}

/// Every operation of the IR. The first group is the model vocabulary; the second holds the
/// backward operations that [`crate::autodiff`] emits (they may also appear in files).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    // ---- model vocabulary ----
    /// A batched graph input (images, labels).
    Input(Input),
    /// A named parameter tensor (`<layer>/<param>`).
    Parameter(Parameter),
    /// Inputs: x `[N, H, W, Cin]`, kernel `[kh, kw, Cin / groups, Cout]`, optional bias `[Cout]`.
    Conv2d(Conv2d),
    MaxPool(Pool),
    AvgPool(Pool),
    /// Mean over H and W: `[N, H, W, C] -> [N, C]`.
    GlobalAvgPool,
    /// Inputs: x `[N, ..., in]`, kernel `[in, out]`, optional bias `[out]`; acts on the last axis.
    Dense,
    /// Inputs: x `[N, ..., C]`, bias `[C]`.
    BiasAdd,
    /// Elementwise sum of two tensors of one shape.
    Add,
    /// Elementwise product of two tensors of one shape.
    Mul,
    Relu,
    Relu6,
    BatchNorm(BatchNorm),
    Dropout(Dropout),
    /// `[N, ...] -> [N, prod(...)]`.
    Flatten,
    Reshape(Reshape),
    Concat(Concat),
    /// Softmax over the last axis.
    Softmax,
    /// Inputs: logits `[N, classes]`, labels `[N]` (integer ids). Output: a scalar, the mean loss.
    SoftmaxCrossEntropy(SoftmaxCrossEntropy),

    // ---- backward operations (emitted by autodiff) ----
    /// Inputs: dy, kernel.
    Conv2dBackpropInput(ConvBackpropInput),
    /// Inputs: x, dy.
    Conv2dBackpropFilter(ConvBackpropFilter),
    /// Inputs: x, dy. The gradient goes to the first maximum of each window.
    MaxPoolGrad(Pool),
    /// Inputs: dy.
    AvgPoolGrad(PoolGrad),
    /// Inputs: dy `[N, C]`; output `[N, H, W, C]`.
    GlobalAvgPoolGrad(GlobalPoolGrad),
    /// Inputs: dy, kernel. `dx = dy · kernelᵀ`.
    DenseBackpropInput,
    /// Inputs: x, dy. `dkernel = xᵀ · dy` summed over every leading axis.
    DenseBackpropKernel,
    /// Inputs: dy. Sum over every axis but the last (bias and beta gradients).
    BiasAddGrad,
    /// Inputs: the activation's output `y` (or its input: the masks agree), dy. `dy` where
    /// `y > 0`. Autodiff passes `y`, as TensorFlow does, so the input need not be kept.
    ReluGrad,
    /// Inputs: `y` (or the input), dy. `dy` where `0 < y < 6`.
    Relu6Grad,
    /// Inputs: x, gamma, moving_mean, moving_variance, dy. Uses batch statistics in training.
    BatchNormGradInput(BatchNorm),
    /// Inputs: x, moving_mean, moving_variance, dy. `sum(dy * x_hat)` per channel.
    BatchNormGradGamma(BatchNorm),
    /// Inputs: y (the softmax output), dy.
    SoftmaxGrad,
    /// Inputs: logits, labels. The gradient of the mean loss with respect to the logits.
    SoftmaxCrossEntropyGrad(SoftmaxCrossEntropy),
    Slice(Slice),
}

impl Op {
    /// The op's name as printed in tables and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input(_) => "Input",
            Op::Parameter(_) => "Parameter",
            Op::Conv2d(_) => "Conv2d",
            Op::MaxPool(_) => "MaxPool",
            Op::AvgPool(_) => "AvgPool",
            Op::GlobalAvgPool => "GlobalAvgPool",
            Op::Dense => "Dense",
            Op::BiasAdd => "BiasAdd",
            Op::Add => "Add",
            Op::Mul => "Mul",
            Op::Relu => "Relu",
            Op::Relu6 => "Relu6",
            Op::BatchNorm(_) => "BatchNorm",
            Op::Dropout(_) => "Dropout",
            Op::Flatten => "Flatten",
            Op::Reshape(_) => "Reshape",
            Op::Concat(_) => "Concat",
            Op::Softmax => "Softmax",
            Op::SoftmaxCrossEntropy(_) => "SoftmaxCrossEntropy",
            Op::Conv2dBackpropInput(_) => "Conv2dBackpropInput",
            Op::Conv2dBackpropFilter(_) => "Conv2dBackpropFilter",
            Op::MaxPoolGrad(_) => "MaxPoolGrad",
            Op::AvgPoolGrad(_) => "AvgPoolGrad",
            Op::GlobalAvgPoolGrad(_) => "GlobalAvgPoolGrad",
            Op::DenseBackpropInput => "DenseBackpropInput",
            Op::DenseBackpropKernel => "DenseBackpropKernel",
            Op::BiasAddGrad => "BiasAddGrad",
            Op::ReluGrad => "ReluGrad",
            Op::Relu6Grad => "Relu6Grad",
            Op::BatchNormGradInput(_) => "BatchNormGradInput",
            Op::BatchNormGradGamma(_) => "BatchNormGradGamma",
            Op::SoftmaxGrad => "SoftmaxGrad",
            Op::SoftmaxCrossEntropyGrad(_) => "SoftmaxCrossEntropyGrad",
            Op::Slice(_) => "Slice",
        }
    }

    /// Inputs and Parameters are the graph's leaves: they take values from bindings.
    pub fn is_leaf(&self) -> bool {
        match self {
            Op::Input(_) | Op::Parameter(_) => true,
            Op::Conv2d(_)
            | Op::MaxPool(_)
            | Op::AvgPool(_)
            | Op::GlobalAvgPool
            | Op::Dense
            | Op::BiasAdd
            | Op::Add
            | Op::Mul
            | Op::Relu
            | Op::Relu6
            | Op::BatchNorm(_)
            | Op::Dropout(_)
            | Op::Flatten
            | Op::Reshape(_)
            | Op::Concat(_)
            | Op::Softmax
            | Op::SoftmaxCrossEntropy(_)
            | Op::Conv2dBackpropInput(_)
            | Op::Conv2dBackpropFilter(_)
            | Op::MaxPoolGrad(_)
            | Op::AvgPoolGrad(_)
            | Op::GlobalAvgPoolGrad(_)
            | Op::DenseBackpropInput
            | Op::DenseBackpropKernel
            | Op::BiasAddGrad
            | Op::ReluGrad
            | Op::Relu6Grad
            | Op::BatchNormGradInput(_)
            | Op::BatchNormGradGamma(_)
            | Op::SoftmaxGrad
            | Op::SoftmaxCrossEntropyGrad(_)
            | Op::Slice(_) => false,
        }
    }

    /// The number of inputs the op accepts, as an inclusive range.
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Input(_) | Op::Parameter(_) => (0, 0),
            Op::Conv2d(_) | Op::Dense => (2, 3),
            Op::Concat(_) => (1, usize::MAX),
            Op::BatchNorm(_) | Op::BatchNormGradInput(_) => (5, 5),
            Op::BatchNormGradGamma(_) => (4, 4),
            Op::BiasAdd
            | Op::Add
            | Op::Mul
            | Op::SoftmaxCrossEntropy(_)
            | Op::Conv2dBackpropInput(_)
            | Op::Conv2dBackpropFilter(_)
            | Op::MaxPoolGrad(_)
            | Op::DenseBackpropInput
            | Op::DenseBackpropKernel
            | Op::ReluGrad
            | Op::Relu6Grad
            | Op::SoftmaxGrad
            | Op::SoftmaxCrossEntropyGrad(_) => (2, 2),
            Op::MaxPool(_)
            | Op::AvgPool(_)
            | Op::GlobalAvgPool
            | Op::Relu
            | Op::Relu6
            | Op::Dropout(_)
            | Op::Flatten
            | Op::Reshape(_)
            | Op::Softmax
            | Op::AvgPoolGrad(_)
            | Op::GlobalAvgPoolGrad(_)
            | Op::BiasAddGrad
            | Op::Slice(_) => (1, 1),
        }
    }
}
