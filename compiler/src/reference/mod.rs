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
pub mod norm;
pub mod pool;

use crate::error::{Error, Result};
use ndarray::Dimension;

use crate::graph::{Graph, NodeId, Op, Shape};
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
pub struct RunOptions {
    pub mode: Mode,
    /// The training step, mixed into dropout masks so that each step draws a new one.
    pub step: u64,
}

impl RunOptions {
    pub fn training(step: u64) -> Self {
        RunOptions {
            mode: Mode::Training,
            step,
        }
    }
}

/// The result of a run: the fetched values and, in training mode, new values of the
/// non-trainable parameters (batch norm's moving statistics), by parameter name.
#[derive(Debug)]
pub struct Evaluation {
    values: Vec<Option<Tensor>>,
    pub updates: TensorMap,
    pub batch: usize,
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
    let what = if matches!(node.op, Op::Input(_)) {
        "input"
    } else {
        "parameter"
    };
    let fits = if *batched {
        t.ndim() == dims.len() + 1 && &t.shape()[1..] == dims.as_slice()
    } else {
        t.shape() == dims.as_slice()
    };
    if !fits {
        return Err(Error::binding(
            &node.name,
            format!(
                "has shape {:?} but {what} '{}' takes {}",
                t.shape(),
                node.name,
                node.shape
            ),
        ));
    }
    if *batched && t.shape()[0] == 0 {
        return Err(Error::binding(
            &node.name,
            "has a batch of zero examples; give at least one",
        ));
    }
    if let Some((at, v)) = t.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::binding(
            &node.name,
            format!(
                "element {:?} is {v}; inputs and weights must be finite",
                at.slice()
            ),
        ));
    }
    Ok(batched.then(|| t.shape()[0]))
}

/// Runs `graph` and returns the values of `fetch`. `bindings` gives every needed Input and
/// Parameter by node name; other tensors in it are ignored.
pub fn run(
    graph: &Graph,
    bindings: &TensorMap,
    fetch: &[NodeId],
    opts: RunOptions,
) -> Result<Evaluation> {
    // Only what the fetched values depend on runs; in training mode the batch norms among them
    // also report their moving-statistics updates.
    let needed = graph.ancestors(fetch);
    let mut fetched = vec![false; graph.len()];
    for &f in fetch {
        fetched[f.index()] = true;
    }

    // Bind leaves and find the batch size.
    let mut values: Vec<Option<Tensor>> = vec![None; graph.len()];
    let mut batch: Option<(usize, String)> = None;
    for (id, node) in graph.nodes() {
        if !needed[id.index()] || !node.op.is_leaf() {
            continue;
        }
        let t = bindings.get(&node.name).ok_or_else(|| {
            let what = if matches!(node.op, Op::Input(_)) {
                "input"
            } else {
                "parameter"
            };
            Error::binding(
                &node.name,
                format!(
                    "is missing: {what} '{}' needs a {} tensor of that name",
                    node.name, node.shape
                ),
            )
        })?;
        if let Some(b) = check_binding(graph, id, t)? {
            match &batch {
                Some((b0, first)) if *b0 != b => {
                    return Err(Error::binding(
                        &node.name,
                        format!(
                            "has a batch of {b} but '{first}' has {b0}; every input needs the same batch"
                        ),
                    ));
                }
                None => batch = Some((b, node.name.clone())),
                _ => {}
            }
        }
        values[id.index()] = Some(t.as_standard_layout().into_owned());
    }
    let batch = batch.map_or(1, |(b, _)| b);

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
    for (id, node) in graph.nodes() {
        if !needed[id.index()] || node.op.is_leaf() {
            continue;
        }
        let out = {
            let inputs: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|&i| {
                    values[i.index()]
                        .as_ref()
                        .expect("inputs are evaluated before use")
                })
                .collect();
            eval::eval(graph, id, &inputs, opts)?
        };
        for (pid, t) in out.updates {
            updates.insert(graph.node(pid).name.clone(), t);
        }
        values[id.index()] = Some(out.value);
        for &i in &node.inputs {
            if last_use[i.index()] == id.index() && !fetched[i.index()] {
                values[i.index()] = None;
            }
        }
    }
    Ok(Evaluation {
        values,
        updates,
        batch,
    })
}

/// Runs the graph's declared outputs and returns them by node name.
pub fn run_outputs(
    graph: &Graph,
    bindings: &TensorMap,
    opts: RunOptions,
) -> Result<(TensorMap, TensorMap)> {
    let outputs = graph.outputs().to_vec();
    let mut ev = run(graph, bindings, &outputs, opts)?;
    let mut out = TensorMap::new();
    for id in outputs {
        let t = ev.take(id).expect("fetched outputs are kept");
        out.insert(graph.node(id).name.clone(), t);
    }
    Ok((out, ev.updates))
}
