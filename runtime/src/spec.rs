//! What a model function returns, as TensorFlow's estimators define it: the [`Mode`] it is
//! called for, the model's graph, the loss, the train op (an optimizer to minimise the loss
//! with, wrapped in a [`CrossShardOptimizer`] to train on several replicas), the predictions,
//! and the host-side computations — `eval_metrics` over tensors gathered from every shard,
//! and a `host_call` every training step.
//!
//! [`EstimatorSpec`] is what an [`crate::Estimator`]'s model function returns;
//! [`TpuEstimatorSpec`] what a [`crate::TpuEstimator`]'s returns (TensorFlow's
//! `TPUEstimatorSpec`, whose metrics are a function and the tensors to feed it because a
//! TPU cannot run the host's stateful metric ops).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use systolic_compiler::optimizer::Optimizer;
use systolic_compiler::{Graph, TensorMap};
use systolic_simulator::isa::Reduction;

use crate::error::{Error, Result};

/// Why a model function is called (TensorFlow's `ModeKeys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Train,
    Eval,
    Predict,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Train => "train",
            Mode::Eval => "eval",
            Mode::Predict => "infer",
        })
    }
}

/// One value of a model function's `params`.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
}

/// The keys an estimator sets in `params` itself; a user's `params` holding one is an error,
/// as in TensorFlow.
pub const RESERVED_PARAMS: [&str; 2] = ["batch_size", "context"];

/// The `params` a model function and an input function receive: the user's values, and the
/// batch size the estimator chose for this call (per replica on a TPU, the whole batch on
/// the CPU) under the reserved key `batch_size`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    values: BTreeMap<String, Value>,
}

impl Params {
    pub fn new() -> Params {
        Params::default()
    }

    /// `params` with `key` set (the builder form of TensorFlow's `params` dict).
    pub fn with(mut self, key: &str, value: Value) -> Params {
        self.values.insert(key.to_string(), value);
        self
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// A number, or an error naming the key when it is missing or not a number.
    pub fn number(&self, key: &str) -> Result<f64> {
        match self.values.get(key) {
            Some(Value::Int(i)) => Ok(*i as f64),
            Some(Value::Float(x)) => Ok(*x),
            Some(other) => Err(Error::Input(format!("params['{key}'] is {other:?}: give a number"))),
            None => Err(Error::Input(format!("params has no '{key}'"))),
        }
    }

    /// The examples per call the estimator set (per replica on a TPU).
    pub fn batch_size(&self) -> Result<usize> {
        match self.values.get("batch_size") {
            Some(Value::Int(n)) if *n > 0 => Ok(*n as usize),
            _ => Err(Error::Input(
                "params has no batch_size: a TpuEstimator sets it from its batch sizes; with the CPU Estimator put it in params"
                    .into(),
            )),
        }
    }

    /// Refuses the keys the estimator sets itself.
    pub(crate) fn check_reserved(&self) -> Result<()> {
        let taken: Vec<&str> = RESERVED_PARAMS.iter().copied().filter(|k| self.values.contains_key(*k)).collect();
        if taken.is_empty() {
            return Ok(());
        }
        Err(Error::Config {
            field: "params".into(),
            reason: format!(
                "holds the reserved key(s) {taken:?}: the estimator sets them (give the global batch sizes to the estimator instead)"
            ),
        })
    }

    /// A copy with `batch_size` set by the estimator.
    pub(crate) fn with_batch_size(&self, n: usize) -> Params {
        self.clone().with("batch_size", Value::Int(n as i64))
    }
}

/// The loss a model trains and evaluates with: softmax cross-entropy of the model's first
/// output (the logits) against integer labels, as `Graph::with_classifier_loss` attaches it
/// — or the graph's own loss node if it has one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Loss {
    pub label_smoothing: f32,
}

/// TensorFlow's `tpu.CrossShardOptimizer`: the wrapped optimizer applies the gradient summed
/// (reduction `Sum`) or averaged (`Mean`, the default: each replica's loss scaled by
/// 1/replicas before the sum) over every replica, so the all-reduce is part of the step.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossShardOptimizer {
    pub optimizer: Optimizer,
    pub reduction: Reduction,
}

impl CrossShardOptimizer {
    pub fn new(optimizer: Optimizer) -> CrossShardOptimizer {
        CrossShardOptimizer { optimizer, reduction: Reduction::Mean }
    }

    pub fn with_reduction(mut self, reduction: Reduction) -> CrossShardOptimizer {
        self.reduction = reduction;
        self
    }
}

/// What a training step does after the gradients: an optimizer's update, with or without
/// the cross-replica reduction (`optimizer.minimize(loss)` in TensorFlow).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOp {
    pub optimizer: Optimizer,
    /// `Some` when wrapped in a [`CrossShardOptimizer`].
    pub cross_shard: Option<Reduction>,
}

impl From<Optimizer> for TrainOp {
    fn from(optimizer: Optimizer) -> TrainOp {
        TrainOp { optimizer, cross_shard: None }
    }
}

impl From<CrossShardOptimizer> for TrainOp {
    fn from(c: CrossShardOptimizer) -> TrainOp {
        TrainOp { optimizer: c.optimizer, cross_shard: Some(c.reduction) }
    }
}

/// One metric's contribution from one evaluation step: a sum and the count it is over; the
/// estimator reports `Σ sum / Σ count` over the steps (TensorFlow's streaming `mean`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricUpdate {
    pub sum: f64,
    pub count: f64,
}

/// A metric function: from the tensors gathered from every shard for one step (by name),
/// each metric's update.
pub type MetricFn = Arc<dyn Fn(&TensorMap) -> Result<Vec<(String, MetricUpdate)>> + Send + Sync>;

/// TensorFlow's `eval_metrics = (metric_fn, tensors)`: `tensors` are gathered from every
/// shard to the host each evaluation step and `metric_fn` runs there. The names are the
/// model's outputs, its inputs, or the labels.
#[derive(Clone)]
pub struct EvalMetrics {
    pub metric_fn: MetricFn,
    pub tensors: Vec<String>,
}

impl fmt::Debug for EvalMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EvalMetrics {{ tensors: {:?} }}", self.tensors)
    }
}

/// A host call: the global step and the tensors gathered for one training step.
pub type HostFn = Arc<dyn Fn(u64, &TensorMap) -> Result<()> + Send + Sync>;

/// TensorFlow's `host_call = (fn, tensors)`: run on the host after every training step with
/// the named tensors of that step — `loss`, a gradient (`<param>/grad`), an input or the
/// labels, and `global_step`.
#[derive(Clone)]
pub struct HostCall {
    pub host_fn: HostFn,
    pub tensors: Vec<String>,
}

impl fmt::Debug for HostCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostCall {{ tensors: {:?} }}", self.tensors)
    }
}

/// TensorFlow's `EstimatorSpec`: what the CPU [`crate::Estimator`]'s model function returns.
#[derive(Clone, Debug)]
pub struct EstimatorSpec {
    pub mode: Mode,
    /// The model: its inputs are the features (by name), its first output the logits.
    pub model: Graph,
    /// The outputs `predict` returns; empty: every output of the model.
    pub predictions: Vec<String>,
    /// Required in `Train` and `Eval`.
    pub loss: Option<Loss>,
    /// Required in `Train`.
    pub train_op: Option<TrainOp>,
    /// Metrics beyond the loss and top-1 / top-5 accuracy, computed on the host.
    pub eval_metrics: Option<EvalMetrics>,
}

impl EstimatorSpec {
    /// A spec for `mode` with the model and nothing else set.
    pub fn new(mode: Mode, model: Graph) -> EstimatorSpec {
        EstimatorSpec { mode, model, predictions: Vec::new(), loss: None, train_op: None, eval_metrics: None }
    }
}

/// TensorFlow's `TPUEstimatorSpec`: an [`EstimatorSpec`] whose metrics are
/// `(metric_fn, tensors)` and which may carry a `host_call`.
#[derive(Clone, Debug)]
pub struct TpuEstimatorSpec {
    pub mode: Mode,
    pub model: Graph,
    pub predictions: Vec<String>,
    pub loss: Option<Loss>,
    pub train_op: Option<TrainOp>,
    pub eval_metrics: Option<EvalMetrics>,
    pub host_call: Option<HostCall>,
}

impl TpuEstimatorSpec {
    pub fn new(mode: Mode, model: Graph) -> TpuEstimatorSpec {
        TpuEstimatorSpec {
            mode,
            model,
            predictions: Vec::new(),
            loss: None,
            train_op: None,
            eval_metrics: None,
            host_call: None,
        }
    }

    /// The CPU form (TensorFlow's `as_estimator_spec`, used when `use_tpu` is false) and
    /// the host call, which the CPU estimator runs the same way.
    pub fn as_estimator_spec(&self) -> (EstimatorSpec, Option<HostCall>) {
        let spec = EstimatorSpec {
            mode: self.mode,
            model: self.model.clone(),
            predictions: self.predictions.clone(),
            loss: self.loss,
            train_op: self.train_op.clone(),
            eval_metrics: self.eval_metrics.clone(),
        };
        (spec, self.host_call.clone())
    }
}

/// Checks a spec against the mode it was asked for: the fields the mode needs, the
/// prediction and metric names the model has.
pub(crate) fn check(spec: &EstimatorSpec, asked: Mode) -> Result<()> {
    let fail = |reason: String| Err(Error::Config { field: "model_fn".into(), reason });
    if spec.mode != asked {
        return fail(format!("was called for mode {asked} but returned a spec for mode {}", spec.mode));
    }
    if matches!(asked, Mode::Train | Mode::Eval) && spec.loss.is_none() {
        return fail(format!("mode {asked} needs a loss in the spec"));
    }
    if asked == Mode::Train && spec.train_op.is_none() {
        return fail(
            "mode train needs a train_op in the spec (an optimizer, in a CrossShardOptimizer on a TPU)".into(),
        );
    }
    let outputs: Vec<&str> = spec.model.outputs().iter().map(|&o| spec.model.node(o).name.as_str()).collect();
    if outputs.is_empty() {
        return fail(format!("model '{}' has no outputs", spec.model.name()));
    }
    for p in &spec.predictions {
        if !outputs.contains(&p.as_str()) {
            return fail(format!("prediction '{p}' is not an output of the model: outputs are {outputs:?}"));
        }
    }
    Ok(())
}
