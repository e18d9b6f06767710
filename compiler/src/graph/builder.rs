//! A builder that reads like Keras' functional API: each layer method takes a name and its
//! input, creates the layer's parameters (`<name>/kernel`, `<name>/bias`, ...) and returns the
//! layer's output node. A layer is checked before anything is added, so a failed call leaves the
//! graph as it was.
//!
//! ```
//! use systolic_compiler::graph::{ConvSpec, Graph, Pool};
//! let mut g = Graph::new("tiny");
//! let x = g.input("image", &[28, 28, 1])?;
//! let x = g.conv2d("conv1", x, ConvSpec::new(8, 3).same())?;
//! let x = g.relu("relu1", x)?;
//! let x = g.max_pool("pool1", x, Pool::default())?;
//! let x = g.flatten("flatten", x)?;
//! let logits = g.dense("logits", x, 10)?;
//! g.add_output(logits);
//! assert_eq!(g.node(logits).shape.dims, vec![10]);
//! # Ok::<(), systolic_compiler::Error>(())
//! ```

use super::op::*;
use super::{Graph, NodeId, Shape};
use crate::error::{Error, Result};

/// A convolution layer: filters, kernel size, attributes, bias and initialisers.
#[derive(Clone, Debug)]
pub struct ConvSpec {
    /// Output channels; for a depthwise spec, the depth multiplier.
    pub filters: usize,
    pub kernel: [usize; 2],
    pub conv: Conv2d,
    /// Depthwise: one group per input channel, `filters` outputs per channel.
    pub depthwise: bool,
    pub use_bias: bool,
    pub kernel_init: Init,
    pub bias_init: Init,
}

impl ConvSpec {
    /// A `kernel`×`kernel` convolution with `filters` outputs, stride 1, VALID padding, a bias and
    /// Glorot-uniform weights (Keras' defaults).
    pub fn new(filters: usize, kernel: usize) -> ConvSpec {
        ConvSpec {
            filters,
            kernel: [kernel, kernel],
            conv: Conv2d::default(),
            depthwise: false,
            use_bias: true,
            kernel_init: Init::GlorotUniform,
            bias_init: Init::Zeros,
        }
    }

    /// A depthwise `kernel`×`kernel` convolution (depth multiplier 1).
    pub fn depthwise(kernel: usize) -> ConvSpec {
        ConvSpec { depthwise: true, ..ConvSpec::new(1, kernel) }
    }

    pub fn kernel_hw(mut self, kh: usize, kw: usize) -> Self {
        self.kernel = [kh, kw];
        self
    }

    pub fn stride(mut self, s: usize) -> Self {
        self.conv.strides = [s, s];
        self
    }

    /// Different strides along rows (`sh`) and columns (`sw`).
    pub fn stride_hw(mut self, sh: usize, sw: usize) -> Self {
        self.conv.strides = [sh, sw];
        self
    }

    pub fn padding(mut self, p: Padding) -> Self {
        self.conv.padding = p;
        self
    }

    /// SAME padding.
    pub fn same(self) -> Self {
        self.padding(Padding::Same)
    }

    /// Symmetric explicit padding of `p` pixels (PyTorch's `padding=p`).
    pub fn pad(self, p: usize) -> Self {
        self.padding(Padding::Explicit { top: p, bottom: p, left: p, right: p })
    }

    pub fn dilation(mut self, d: usize) -> Self {
        self.conv.dilation = [d, d];
        self
    }

    pub fn groups(mut self, g: usize) -> Self {
        self.conv.groups = g;
        self
    }

    pub fn no_bias(mut self) -> Self {
        self.use_bias = false;
        self
    }

    pub fn kernel_init(mut self, init: Init) -> Self {
        self.kernel_init = init;
        self
    }
}

/// A dense layer: units, bias and initialisers.
#[derive(Clone, Debug)]
pub struct DenseSpec {
    pub units: usize,
    pub use_bias: bool,
    pub kernel_init: Init,
    pub bias_init: Init,
}

impl DenseSpec {
    pub fn new(units: usize) -> DenseSpec {
        DenseSpec { units, use_bias: true, kernel_init: Init::GlorotUniform, bias_init: Init::Zeros }
    }

    pub fn no_bias(mut self) -> Self {
        self.use_bias = false;
        self
    }

    pub fn kernel_init(mut self, init: Init) -> Self {
        self.kernel_init = init;
        self
    }
}

impl From<usize> for DenseSpec {
    fn from(units: usize) -> DenseSpec {
        DenseSpec::new(units)
    }
}

fn param(shape: Vec<usize>, init: Init) -> Parameter {
    Parameter { shape, init, trainable: true }
}

fn frozen(shape: Vec<usize>, init: Init) -> Parameter {
    Parameter { shape, init, trainable: false }
}

impl Graph {
    /// A batched f32 input; `shape` is one example's shape.
    pub fn input(&mut self, name: &str, shape: &[usize]) -> Result<NodeId> {
        self.add(name, Op::Input(Input { shape: shape.to_vec(), dtype: DType::F32 }), &[])
    }

    /// A batched input of integer class ids (one per example).
    pub fn labels(&mut self, name: &str) -> Result<NodeId> {
        self.add(name, Op::Input(Input { shape: vec![], dtype: DType::I32 }), &[])
    }

    /// Checks that `op` applied to `x` and parameters of `param_shapes` is well-formed, then adds
    /// the parameters (named `<name>/<param>`) and the layer node.
    fn layer(&mut self, name: &str, op: Op, x: NodeId, params: Vec<(&str, Parameter)>) -> Result<NodeId> {
        let shapes: Vec<Shape> = params.iter().map(|(_, p)| Shape::fixed(p.shape.clone())).collect();
        let mut operands = vec![&self.node(x).shape];
        operands.extend(shapes.iter());
        if let Err(reason) = op.infer_shape(&operands) {
            return Err(Error::Node {
                node: name.to_string(),
                op: op.kind(),
                reason: format!("{reason} (input: {} {})", self.node(x).name, self.node(x).shape),
            });
        }
        for (suffix, _) in &params {
            let pname = format!("{name}/{suffix}");
            if self.find(&pname).is_some() {
                return Err(Error::Node {
                    node: name.to_string(),
                    op: op.kind(),
                    reason: format!("parameter name '{pname}' is taken; choose another layer name"),
                });
            }
        }
        let mut inputs = vec![x];
        for (suffix, p) in params {
            inputs.push(self.add(format!("{name}/{suffix}"), Op::Parameter(p), &[])?);
        }
        self.add(name, op, &inputs)
    }

    fn channels(&self, x: NodeId, layer: &str, kind: &'static str) -> Result<usize> {
        let s = &self.node(x).shape;
        s.dims.last().copied().filter(|_| s.batched).ok_or_else(|| Error::Node {
            node: layer.to_string(),
            op: kind,
            reason: format!("input {} {s} has no channel axis", self.node(x).name),
        })
    }

    /// A 2-D convolution (with `<name>/kernel` and, if used, `<name>/bias`).
    pub fn conv2d(&mut self, name: &str, x: NodeId, spec: ConvSpec) -> Result<NodeId> {
        let cin = self.channels(x, name, "Conv2d")?;
        let mut conv = spec.conv.clone();
        let (per_group, filters) = if spec.depthwise {
            conv.groups = cin;
            (1, cin * spec.filters)
        } else {
            (cin / conv.groups.max(1), spec.filters)
        };
        let mut params =
            vec![("kernel", param(vec![spec.kernel[0], spec.kernel[1], per_group, filters], spec.kernel_init))];
        if spec.use_bias {
            params.push(("bias", param(vec![filters], spec.bias_init)));
        }
        self.layer(name, Op::Conv2d(conv), x, params)
    }

    /// A dense layer on the last axis (with `<name>/kernel` and, if used, `<name>/bias`).
    pub fn dense(&mut self, name: &str, x: NodeId, spec: impl Into<DenseSpec>) -> Result<NodeId> {
        let spec = spec.into();
        let din = self.channels(x, name, "Dense")?;
        let mut params = vec![("kernel", param(vec![din, spec.units], spec.kernel_init))];
        if spec.use_bias {
            params.push(("bias", param(vec![spec.units], spec.bias_init)));
        }
        self.layer(name, Op::Dense, x, params)
    }

    /// Batch normalisation over channels: trainable `gamma`, `beta`; frozen `moving_mean`,
    /// `moving_variance`.
    pub fn batch_norm(&mut self, name: &str, x: NodeId, bn: BatchNorm) -> Result<NodeId> {
        let c = self.channels(x, name, "BatchNorm")?;
        let params = vec![
            ("gamma", param(vec![c], Init::Ones)),
            ("beta", param(vec![c], Init::Zeros)),
            ("moving_mean", frozen(vec![c], Init::Zeros)),
            ("moving_variance", frozen(vec![c], Init::Ones)),
        ];
        self.layer(name, Op::BatchNorm(bn), x, params)
    }

    /// A learned bias on the last axis (`<name>/bias`).
    pub fn bias_add(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
        let c = self.channels(x, name, "BiasAdd")?;
        self.layer(name, Op::BiasAdd, x, vec![("bias", param(vec![c], Init::Zeros))])
    }

    pub fn relu(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
        self.add(name, Op::Relu, &[x])
    }

    pub fn relu6(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
        self.add(name, Op::Relu6, &[x])
    }

    pub fn softmax(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
        self.add(name, Op::Softmax, &[x])
    }

    pub fn max_pool(&mut self, name: &str, x: NodeId, pool: Pool) -> Result<NodeId> {
        self.add(name, Op::MaxPool(pool), &[x])
    }

    pub fn avg_pool(&mut self, name: &str, x: NodeId, pool: Pool) -> Result<NodeId> {
        self.add(name, Op::AvgPool(pool), &[x])
    }

    pub fn global_avg_pool(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
        self.add(name, Op::GlobalAvgPool, &[x])
    }

    pub fn dropout(&mut self, name: &str, x: NodeId, rate: f32, seed: u64) -> Result<NodeId> {
        self.add(name, Op::Dropout(Dropout { rate, seed }), &[x])
    }

    pub fn flatten(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
        self.add(name, Op::Flatten, &[x])
    }

    pub fn reshape(&mut self, name: &str, x: NodeId, shape: &[i64]) -> Result<NodeId> {
        self.add(name, Op::Reshape(Reshape { shape: shape.to_vec() }), &[x])
    }

    pub fn add_op(&mut self, name: &str, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.add(name, Op::Add, &[a, b])
    }

    pub fn mul(&mut self, name: &str, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.add(name, Op::Mul, &[a, b])
    }

    pub fn concat(&mut self, name: &str, xs: &[NodeId], axis: i64) -> Result<NodeId> {
        self.add(name, Op::Concat(Concat { axis }), xs)
    }

    /// The mean softmax cross-entropy of `logits` against integer `labels`.
    pub fn softmax_cross_entropy(
        &mut self,
        name: &str,
        logits: NodeId,
        labels: NodeId,
        label_smoothing: f32,
    ) -> Result<NodeId> {
        self.add(name, Op::SoftmaxCrossEntropy(SoftmaxCrossEntropy { label_smoothing }), &[logits, labels])
    }

    /// A copy of this classifier with a `labels` input and a `loss` node
    /// (SoftmaxCrossEntropy on the first output), unless it already has a loss. Returns the
    /// graph and its loss node.
    pub fn with_classifier_loss(&self, label_smoothing: f32) -> Result<(Graph, NodeId)> {
        if let Some(loss) = self.loss_node() {
            if label_smoothing != 0.0 {
                return Err(self.graph_error(format!(
                    "already has a loss (node '{}'), so a label smoothing of {label_smoothing} would be ignored; \
                     set label_smoothing on that node in the model file instead",
                    self.node(loss).name
                )));
            }
            return Ok((self.clone(), loss));
        }
        let &logits = self.outputs.first().ok_or_else(|| self.graph_error("has no outputs to attach a loss to"))?;
        let mut g = self.clone();
        let free = |g: &Graph, base: &str| {
            std::iter::once(base.to_string())
                .chain((1..).map(|i| format!("{base}_{i}")))
                .find(|n| g.find(n).is_none())
                .expect("some suffix is free")
        };
        let labels = g.labels(&free(&g, "labels"))?;
        let loss = g.softmax_cross_entropy(&free(&g, "loss"), logits, labels, label_smoothing)?;
        Ok((g, loss))
    }
}
