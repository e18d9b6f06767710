//! The f32 CPU reference: an interpreter that gives every op its meaning.
//!
//! Later backends (the simulated TPU) are judged against it, so it favours clear semantics —
//! f32 values, f64 accumulation in reductions, TensorFlow's conventions — while staying fast
//! enough to train small CNNs and run ResNet-50 (im2col + blocked GEMM, rayon).
//!
//! Determinism: every parallel loop either writes disjoint outputs or splits a reduction at
//! boundaries fixed by the shape and combines partials in order, so results are bit-identical
//! for any number of threads.

pub mod conv;
mod eval;
pub mod gemm;
pub mod loss;
pub mod memory;
pub mod norm;
pub mod pool;

use crate::autodiff::Gradients;
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::time::Instant;

use ndarray::Dimension;
use rayon::prelude::*;

use systolic_simulator::numerics::bf16;
use systolic_simulator::progress;

use crate::graph::{Graph, NodeId, Shape};
use crate::tensors::{Tensor, TensorMap};

/// Training or inference semantics for BatchNorm and Dropout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Inference,
    Training,
}

/// How to run a graph.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions<'a> {
    pub mode: Mode,
    /// The training step, mixed into dropout masks so that each step draws a new one.
    pub step: u64,
    /// bf16 storage, as a compiled program keeps activations: the values of these nodes (by
    /// name) are rounded to bf16 (nearest even) as soon as they are computed, so every use
    /// sees what a TPU reads back from HBM (`lower::Compiled::bf16_tensors` names them).
    /// None: every value stays f32.
    pub bf16: Option<&'a BTreeSet<String>>,
}

impl RunOptions<'_> {
    pub fn training(step: u64) -> Self {
        RunOptions { mode: Mode::Training, step, bf16: None }
    }
}

/// The result of a run: the fetched values and, in training mode, new values of the
/// non-trainable parameters (batch norm's moving statistics), by parameter name.
#[derive(Debug)]
pub struct Evaluation {
    values: Vec<Option<Tensor>>,
    pub updates: TensorMap,
    pub batch: usize,
    /// Wall-clock seconds each evaluated node took, in evaluation order.
    pub node_seconds: Vec<(NodeId, f64)>,
}

impl Evaluation {
    /// The value of a fetched node.
    pub fn get(&self, id: NodeId) -> Option<&Tensor> {
        self.values.get(id.index()).and_then(|v| v.as_ref())
    }

    /// Moves a fetched value out.
    pub fn take(&mut self, id: NodeId) -> Option<Tensor> {
        self.values.get_mut(id.index()).and_then(|v| v.take())
    }
}

/// Checks a bound tensor against the leaf it feeds; returns its batch size for batched leaves.
fn check_binding(graph: &Graph, id: NodeId, t: &Tensor) -> Result<Option<usize>> {
    let node = graph.node(id);
    let Shape { dims, batched } = &node.shape;
    let what = node.op.kind().to_ascii_lowercase();
    let fits = if *batched {
        t.ndim() == dims.len() + 1 && &t.shape()[1..] == dims.as_slice()
    } else {
        t.shape() == dims.as_slice()
    };
    if !fits {
        return Err(Error::binding(
            &node.name,
            format!("has shape {:?} but {what} '{}' takes {}", t.shape(), node.name, node.shape),
        ));
    }
    if *batched && t.shape()[0] == 0 {
        return Err(Error::binding(&node.name, "has a batch of zero examples; give at least one"));
    }
    let all_finite = match t.as_slice_memory_order() {
        Some(s) => s.par_iter().all(|v| v.is_finite()),
        None => t.iter().all(|v| v.is_finite()),
    };
    if all_finite {
        return Ok(batched.then(|| t.shape()[0]));
    }
    if let Some((at, v)) = t.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::binding(
            &node.name,
            format!("element {:?} is {v}; inputs and weights must be finite", at.slice()),
        ));
    }
    Ok(batched.then(|| t.shape()[0]))
}

/// Runs `graph` and returns the values of `fetch`. `bindings` gives every needed Input and
/// Parameter by node name; other tensors in it are ignored.
pub fn run(graph: &Graph, bindings: &TensorMap, fetch: &[NodeId], opts: RunOptions) -> Result<Evaluation> {
    // Only what the fetched values depend on runs; in training mode the batch norms among them
    // also report their moving-statistics updates.
    let needed = graph.ancestors(fetch);
    let mut fetched = vec![false; graph.len()];
    for &f in fetch {
        fetched[f.index()] = true;
    }

    // Bind leaves and find the batch size.
    // Bound tensors are borrowed (copied only if not in standard layout); computed ones owned.
    let mut values: Vec<Option<Cow<Tensor>>> = vec![None; graph.len()];
    let mut batch: Option<(usize, String)> = None;
    for (id, node) in graph.nodes() {
        if !needed[id.index()] || !node.op.is_leaf() {
            continue;
        }
        let t = bindings.get(&node.name).ok_or_else(|| {
            let what = node.op.kind().to_ascii_lowercase();
            Error::binding(
                &node.name,
                format!("is missing: {what} '{}' needs a {} tensor of that name", node.name, node.shape),
            )
        })?;
        if let Some(b) = check_binding(graph, id, t)? {
            match &batch {
                Some((b0, first)) if *b0 != b => {
                    return Err(Error::binding(
                        &node.name,
                        format!("has a batch of {b} but '{first}' has {b0}; every input needs the same batch"),
                    ));
                }
                None => batch = Some((b, node.name.clone())),
                _ => {}
            }
        }
        values[id.index()] = Some(if t.is_standard_layout() {
            Cow::Borrowed(t)
        } else {
            Cow::Owned(t.as_standard_layout().into_owned())
        });
    }
    let batch = batch.map_or(1, |(b, _)| b);
    // The bound tensors exist; what the run computes is checked before it is allocated.
    memory::check(graph, fetch, batch, memory::Leaves::Allocated)?;

    // The last consumer of each value, to free activations as soon as they are dead.
    let mut last_use = vec![0usize; graph.len()];
    for (id, node) in graph.nodes() {
        if needed[id.index()] {
            for &i in &node.inputs {
                last_use[i.index()] = id.index();
            }
        }
    }

    let mut updates = TensorMap::new();
    let mut node_seconds = Vec::new();
    let mut memo = eval::Memo::default();
    let total = graph.nodes().filter(|(id, node)| needed[id.index()] && !node.op.is_leaf()).count() as u64;
    for (id, node) in graph.nodes() {
        if !needed[id.index()] || node.op.is_leaf() {
            continue;
        }
        progress::report("CPU reference (nodes)", node_seconds.len() as u64, total);
        let start = Instant::now();
        // An elementwise node whose first input dies here (computed, not fetched, used once
        // by it) writes into that input's buffer.
        let first = node.inputs.first().copied();
        let in_place = first.is_some_and(|i0| {
            eval::writes_in_place(&node.op)
                && last_use[i0.index()] == id.index()
                && !fetched[i0.index()]
                && matches!(values[i0.index()], Some(Cow::Owned(_)))
                && node.inputs.iter().filter(|&&j| j == i0).count() == 1
        });
        let out = if let (true, Some(i0)) = (in_place, first) {
            let Some(Cow::Owned(x)) = values[i0.index()].take() else { unreachable!("checked above") };
            let rest: Vec<&Tensor> = node.inputs[1..]
                .iter()
                .map(|&i| values[i.index()].as_deref().expect("inputs are evaluated before use"))
                .collect();
            eval::eval_into(graph, id, x, &rest, opts, &mut memo)?
        } else {
            let inputs: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|&i| values[i.index()].as_deref().expect("inputs are evaluated before use"))
                .collect();
            eval::eval(graph, id, &inputs, opts, &mut memo)?
        };
        for (pid, t) in out.updates {
            updates.insert(graph.node(pid).name.clone(), t);
        }
        let mut value = out.value;
        if opts.bf16.is_some_and(|names| names.contains(&node.name)) {
            value.par_mapv_inplace(bf16);
        }
        values[id.index()] = Some(Cow::Owned(value));
        node_seconds.push((id, start.elapsed().as_secs_f64()));
        for &i in &node.inputs {
            if last_use[i.index()] == id.index() && !fetched[i.index()] {
                values[i.index()] = None;
            }
        }
    }
    progress::report("CPU reference (nodes)", total, total);
    let values = values.into_iter().enumerate().map(|(i, v)| v.filter(|_| fetched[i]).map(Cow::into_owned)).collect();
    Ok(Evaluation { values, updates, batch, node_seconds })
}

/// Runs the graph's declared outputs and returns them by node name.
pub fn run_outputs(graph: &Graph, bindings: &TensorMap, opts: RunOptions) -> Result<(TensorMap, TensorMap)> {
    let outputs = graph.outputs().to_vec();
    let mut ev = run(graph, bindings, &outputs, opts)?;
    let mut out = TensorMap::new();
    for id in outputs {
        let t = ev.take(id).expect("fetched outputs are kept");
        out.insert(graph.node(id).name.clone(), t);
    }
    Ok((out, ev.updates))
}

/// The value of a differentiated root and its gradients, by the names of the nodes they are
/// gradients of (zeros for requested nodes the root does not depend on).
#[derive(Debug)]
pub struct GradientValues {
    pub root: Tensor,
    pub grads: TensorMap,
    /// New values of non-trainable parameters (training mode).
    pub updates: TensorMap,
    pub batch: usize,
    /// Host seconds per node of the differentiated graph, in evaluation order.
    pub node_seconds: Vec<(NodeId, f64)>,
}

/// Runs a graph built by [`crate::autodiff::differentiate`] and collects the gradients by name.
pub fn run_gradients(grads: &Gradients, bindings: &TensorMap, opts: RunOptions) -> Result<GradientValues> {
    let mut fetch = vec![grads.root];
    fetch.extend(grads.grads.values().copied());
    let mut ev = run(&grads.graph, bindings, &fetch, opts)?;
    let mut out = TensorMap::new();
    for (name, &id) in &grads.grads {
        out.insert(name.clone(), ev.get(id).expect("gradients are fetched").clone());
    }
    for name in &grads.unconnected {
        let node = grads.graph.node(grads.graph.expect(name)?);
        out.insert(name.clone(), Tensor::zeros(node.shape.concrete(ev.batch)));
    }
    let root = ev.take(grads.root).expect("the root is fetched");
    let (updates, node_seconds) = (std::mem::take(&mut ev.updates), std::mem::take(&mut ev.node_seconds));
    Ok(GradientValues { root, grads: out, updates, batch: ev.batch, node_seconds })
}
