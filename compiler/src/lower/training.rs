//! The training step as one graph: forward, the loss, backward (from [`crate::autodiff`]) and
//! the optimizer's state, so that the passes lower a whole step into one program.
//!
//! What the program reads and writes beyond inference:
//! - `<labels>/one_hot`: the labels as a `[N, classes]` f32 one-hot matrix (the host encodes
//!   them, as a TPU input pipeline does; the vector unit has no integer gather);
//! - every trainable parameter, updated in place, and the optimizer's slots
//!   (`<param>/momentum`, `<param>/m`, `<param>/v`, `<param>/rms`) and shared state
//!   ([`crate::optimizer::ADAM_POWERS`], the global step [`crate::optimizer::STEP`] of a
//!   schedule), read and written;
//! - with dropout, [`DROPOUT_STEP`]: the step number masks are drawn for, advanced in place;
//! - outputs: the loss, each parameter's gradient as `<param>/grad`, the updated values, and
//!   batch norm's moving statistics (updated in place from the batch, as in a training run
//!   of the reference).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use systolic_simulator::executable::{Executable, Role};

use crate::autodiff;
use crate::error::{Error, Result};
use crate::graph::{Graph, Init, NodeId, Op, Parameter};
use crate::optimizer::Optimizer;
use crate::tensors::{Tensor, TensorMap};

/// The state holding the training step that dropout masks are drawn for (an integer-valued
/// f32, starting at 0 and advanced by each step; the reference's `RunOptions::step`).
pub const DROPOUT_STEP: &str = "dropout/step";

/// Appended to a parameter's name, its gradient among a training step's outputs
/// (`conv1/kernel/grad`).
pub const GRAD_SUFFIX: &str = "/grad";

/// Appended to the integer labels' name, the one-hot matrix a training step reads instead
/// (`labels/one_hot`: the host encodes labels, as a TPU input pipeline does).
pub const ONE_HOT_SUFFIX: &str = "/one_hot";

/// The gradient output of parameter `name`.
pub fn grad_name(name: &str) -> String {
    format!("{name}{GRAD_SUFFIX}")
}

/// How to train: the optimizer and the loss's label smoothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Training {
    pub optimizer: Optimizer,
    /// Used when the graph has no loss and one is added (see `Graph::with_classifier_loss`).
    pub label_smoothing: f32,
}

/// One parameter's update: its gradient and its optimizer slots.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub param: NodeId,
    pub grad: NodeId,
    pub slots: Vec<NodeId>,
}

/// One bucket of a sharded weight update: its parameters and their gradients, in the order
/// the backward pass finishes them, and the state each replica keeps for its shard — the
/// reduced gradient's shard, the parameters' shard, the optimizer's slots' shards — each
/// `[rows, 128]` f32, at least the longest of `replicas` shards of the bucket's elements.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardedUpdate {
    pub params: Vec<NodeId>,
    pub grads: Vec<NodeId>,
    pub grad_shard: NodeId,
    pub param_shard: NodeId,
    pub slots: Vec<NodeId>,
}

impl ShardedUpdate {
    /// The state the bucket adds (zeros before the first step).
    pub fn state(&self) -> impl Iterator<Item = &NodeId> {
        [&self.grad_shard, &self.param_shard].into_iter().chain(&self.slots)
    }
}

/// What the passes need to know of a prepared graph beyond its nodes (empty but for the
/// one-hot labels when compiling inference).
#[derive(Default)]
pub(super) struct Step {
    /// Each loss's integer labels -> the one-hot input the program reads instead.
    pub one_hot: BTreeMap<NodeId, NodeId>,
    pub updates: Vec<Update>,
    /// With the sharded weight update, its buckets (and no `updates`).
    pub sharded: Vec<ShardedUpdate>,
    /// State shared by all parameters, advanced once per step: Adam's powers, the global
    /// step of a schedule, then the dropout step counter.
    pub state: Vec<NodeId>,
    /// The training step dropout masks are drawn for ([`DROPOUT_STEP`]), when any dropout
    /// drops.
    pub dropout_step: Option<NodeId>,
    /// Names the executable gives its outputs where they differ from node names.
    pub output_names: BTreeMap<NodeId, String>,
}

/// The graph the passes compile: for inference, `graph` with one-hot inputs for any loss's
/// labels; for training, the whole step. `train_mode` (without a step): the forward pass with
/// batch statistics and dropout, and the state that needs.
/// `sharding`: (replicas, bucket bytes) for the sharded weight update.
pub(super) fn prepare(
    graph: &Graph,
    training: Option<&Training>,
    train_mode: bool,
    sharding: Option<(usize, u64)>,
) -> Result<(Graph, Step)> {
    match training {
        Some(t) => build(graph, t, sharding),
        None => {
            let mut g = graph.clone();
            let one_hot = add_one_hot(&mut g)?;
            let mut step = Step { one_hot, ..Step::default() };
            if train_mode {
                let mut outputs = g.outputs().to_vec();
                step.dropout_step = add_forward_state(&mut g, &mut step.state, &mut outputs)?;
                g.set_outputs(outputs);
            }
            Ok((g, step))
        }
    }
}

/// What a training-mode forward pass changes: the dropout step counter (when any dropout
/// drops), appended to `state`, and batch norm's moving statistics; both become outputs.
fn add_forward_state(g: &mut Graph, state: &mut Vec<NodeId>, outputs: &mut Vec<NodeId>) -> Result<Option<NodeId>> {
    // Dropout draws each step's mask from the step number, kept on the device.
    let drops = g.nodes().any(|(_, n)| matches!(&n.op, Op::Dropout(d) if d.rate > 0.0));
    let dropout_step = if drops {
        let name = reserved(g, DROPOUT_STEP.to_string())?;
        let p = Parameter { shape: vec![1], init: Init::Constant(0.0), trainable: false };
        let id = g.add(name, Op::Parameter(p), &[])?;
        state.push(id);
        Some(id)
    } else {
        None
    };
    outputs.extend(state.iter().copied());
    // Batch norm's moving statistics, updated in place by the forward pass.
    for (_, node) in g.nodes() {
        if let Op::BatchNorm(_) = node.op {
            for &s in &node.inputs[3..5] {
                if !outputs.contains(&s) {
                    outputs.push(s);
                }
            }
        }
    }
    Ok(dropout_step)
}

/// Builds the training graph of `graph` for `t`.
fn build(graph: &Graph, t: &Training, sharding: Option<(usize, u64)>) -> Result<(Graph, Step)> {
    t.optimizer.check()?;
    let (g, loss) = graph.with_classifier_loss(t.label_smoothing)?;
    let params = g.trainable_parameters();
    if params.is_empty() {
        return Err(Error::Graph {
            graph: graph.name().to_string(),
            reason: "has no trainable parameters: there is no training step to compile".into(),
        });
    }
    let grads = autodiff::differentiate(&g, loss, &params)?;
    let mut g = grads.graph;

    let one_hot = add_one_hot(&mut g)?;
    let mut updates = Vec::new();
    let mut outputs = vec![loss];
    let mut output_names = BTreeMap::new();
    for &p in &params {
        let pname = g.node(p).name.clone();
        // A parameter the loss does not depend on has a zero gradient: nothing to update.
        let Some(&grad) = grads.grads.get(&pname) else { continue };
        let shape = g.node(p).shape.dims.clone();
        let mut slots = Vec::new();
        if sharding.is_none() {
            for slot in t.optimizer.slots() {
                let name = reserved(&g, format!("{pname}/{slot}"))?;
                let init = slot_init(&t.optimizer, slot);
                slots.push(g.add(
                    name,
                    Op::Parameter(Parameter { shape: shape.clone(), init, trainable: false }),
                    &[],
                )?);
            }
        }
        outputs.push(grad);
        output_names.insert(grad, grad_name(&pname));
        updates.push(Update { param: p, grad, slots });
    }
    let sharded = match sharding {
        Some((replicas, bucket_bytes)) => {
            shard_buckets(&mut g, t, std::mem::take(&mut updates), replicas, bucket_bytes)?
        }
        None => Vec::new(),
    };
    let mut state = Vec::new();
    for (name, value) in t.optimizer.initial_state() {
        let name = reserved(&g, name.to_string())?;
        let init = Init::Constant(value);
        state.push(g.add(name, Op::Parameter(Parameter { shape: vec![1], init, trainable: false }), &[])?);
    }
    for u in &updates {
        outputs.push(u.param);
        outputs.extend(u.slots.iter().copied());
    }
    for s in &sharded {
        outputs.extend(s.params.iter().copied());
        outputs.extend(s.state().copied());
    }
    let dropout_step = add_forward_state(&mut g, &mut state, &mut outputs)?;
    g.set_outputs(outputs);
    Ok((g, Step { one_hot, updates, sharded, state, dropout_step, output_names }))
}

/// The buckets of a sharded weight update: `updates` in the order the backward pass makes
/// their gradients (autodiff adds them last layer first), a bucket closing at `bucket_bytes`;
/// each with its shard state (`shard<b>/gradient`, `shard<b>/parameter`, `shard<b>/<slot>`).
fn shard_buckets(
    g: &mut Graph,
    t: &Training,
    mut updates: Vec<Update>,
    replicas: usize,
    bucket_bytes: u64,
) -> Result<Vec<ShardedUpdate>> {
    updates.sort_by_key(|u| u.grad.index());
    let elements = |g: &Graph, u: &Update| g.node(u.param).shape.dims.iter().product::<usize>();
    let mut buckets: Vec<Vec<Update>> = Vec::new();
    let mut bytes = u64::MAX;
    for u in updates {
        if bytes >= bucket_bytes {
            buckets.push(Vec::new());
            bytes = 0;
        }
        bytes += elements(g, &u) as u64 * 4;
        buckets.last_mut().expect("a bucket is open").push(u);
    }
    let mut out = Vec::new();
    for (b, members) in buckets.into_iter().enumerate() {
        let total: usize = members.iter().map(|u| elements(g, u)).sum();
        let rows = total.div_ceil(replicas).div_ceil(128).max(1);
        let mut state = |name: &str, init: Init| -> Result<NodeId> {
            let name = reserved(g, format!("shard{b}/{name}"))?;
            let p = Parameter { shape: vec![rows, 128], init, trainable: false };
            g.add(name, Op::Parameter(p), &[])
        };
        let grad_shard = state("gradient", Init::Zeros)?;
        let param_shard = state("parameter", Init::Zeros)?;
        let slots = t.optimizer.slots().iter().map(|s| state(s, slot_init(&t.optimizer, s))).collect::<Result<_>>()?;
        out.push(ShardedUpdate {
            params: members.iter().map(|u| u.param).collect(),
            grads: members.iter().map(|u| u.grad).collect(),
            grad_shard,
            param_shard,
            slots,
        });
    }
    Ok(out)
}

/// Where an optimizer slot starts (RMSProp's mean square at 1, the rest at 0).
fn slot_init(optimizer: &Optimizer, slot: &str) -> Init {
    let v = optimizer.slot_initial_value(slot);
    if v == 0.0 { Init::Zeros } else { Init::Constant(v) }
}

/// `name`, unless the graph already has a node of that name.
fn reserved(g: &Graph, name: String) -> Result<String> {
    match g.find(&name) {
        None => Ok(name),
        Some(_) => Err(Error::Graph {
            graph: g.name().to_string(),
            reason: format!("node name '{name}' is reserved for the lowering; rename that node"),
        }),
    }
}

/// Adds a one-hot f32 input (`<labels>/one_hot`, `[N, classes]`) for the labels of every loss
/// in `g`; returns labels -> one-hot input. The program reads the one-hot input instead of the
/// integer labels.
pub(super) fn add_one_hot(g: &mut Graph) -> Result<BTreeMap<NodeId, NodeId>> {
    let mut one_hot = BTreeMap::new();
    let losses: Vec<NodeId> = g
        .node_ids()
        .filter(|&id| matches!(g.node(id).op, Op::SoftmaxCrossEntropy(_) | Op::SoftmaxCrossEntropyGrad(_)))
        .collect();
    for id in losses {
        let (logits, labels) = (g.node(id).inputs[0], g.node(id).inputs[1]);
        if one_hot.contains_key(&labels) {
            continue;
        }
        let classes = *g.node(logits).shape.dims.last().expect("logits have a class axis");
        let name = reserved(g, format!("{}{ONE_HOT_SUFFIX}", g.node(labels).name))?;
        let input = g.input(&name, &[classes])?;
        one_hot.insert(labels, input);
    }
    Ok(one_hot)
}

/// The one-hot `[N, classes]` encoding of integer labels `[N]`, as a training executable reads
/// them (`<labels>/one_hot`); labels that are not class ids are refused, naming `name`.
pub fn one_hot(name: &str, labels: &Tensor, classes: usize) -> Result<Tensor> {
    let data = labels.as_slice().ok_or_else(|| Error::binding(name, "labels must be a contiguous tensor"))?;
    let ids = crate::reference::loss::check_labels(name, data, classes)?;
    let mut v = vec![0f32; ids.len() * classes];
    for (row, id) in ids.into_iter().enumerate() {
        v[row * classes + id] = 1.0;
    }
    Ok(Tensor::from_shape_vec(vec![v.len() / classes.max(1), classes], v).expect("rows x classes values"))
}

/// The one-hot inputs an executable reads (`<labels>/one_hot`), encoded from `labels` (integer
/// class ids by the labels' node name).
pub fn one_hot_feed(executable: &Executable, labels: &TensorMap) -> Result<TensorMap> {
    let mut feed = TensorMap::new();
    for b in &executable.bindings {
        if b.role == Role::Output {
            continue;
        }
        if let Some(source) = b.name.strip_suffix(ONE_HOT_SUFFIX) {
            let t = labels
                .get(source)
                .ok_or_else(|| Error::binding(source, "the training step needs these labels (integer class ids)"))?;
            feed.insert(b.name.clone(), one_hot(source, t, b.shape[1])?);
        }
    }
    Ok(feed)
}
