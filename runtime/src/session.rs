//! The conventions of a compiled step's tensors, in one place: how gradients, one-hot labels
//! and the loss are named, and which state a training step adds to a model's parameters.

use systolic_compiler::lower::training;
use systolic_compiler::{Graph, Tensor, TensorMap};
use systolic_simulator::executable::Executable;

use crate::error::{Error, Result};

/// A training step's output holding the loss (the mean over this replica's examples).
pub const LOSS: &str = "loss";

/// Appended to a parameter's name, its gradient among a step's outputs (`conv1/kernel/grad`);
/// appended to the integer labels' name, the one-hot matrix a compiled step reads for them.
pub use training::{GRAD_SUFFIX, ONE_HOT_SUFFIX, grad_name};

/// The step number dropout masks are drawn for, kept on the device and advanced by the step.
pub const DROPOUT_STEP: &str = training::DROPOUT_STEP;

/// Replica `r`'s own value of state `name` where it differs from replica 0's (batch norm's
/// moving statistics on a slice), as [`crate::Backend::state`] and checkpoints name it.
pub fn replica_state(r: usize, name: &str) -> String {
    format!("replica{r}/{name}")
}

/// The replica and state name of a [`replica_state`] name; `None` for any other name.
pub fn replica_of(key: &str) -> Option<(usize, &str)> {
    let (replica, name) = key.split_once('/')?;
    Some((replica.strip_prefix("replica")?.parse().ok()?, name))
}

/// The model's inputs in `batch` by name (the labels are not among them), each checked for
/// its batch size.
pub fn inputs<'a>(model: &Graph, batch: &'a TensorMap, examples: usize) -> Result<Vec<(String, &'a Tensor)>> {
    model
        .inputs()
        .into_iter()
        .map(|id| {
            let name = &model.node(id).name;
            let t = batch.get(name).ok_or_else(|| Error::Input(format!("the batch has no input '{name}'")))?;
            if t.shape().first() != Some(&examples) {
                return Err(Error::Input(format!(
                    "input '{name}' has shape {:?}: give {examples} examples, the batch size the backend runs",
                    t.shape()
                )));
            }
            let want = &model.node(id).shape.dims;
            if t.shape()[1..] != want[..] {
                return Err(Error::Input(format!(
                    "input '{name}' holds examples of shape {:?} but model '{}' takes {want:?}: give data of that shape",
                    &t.shape()[1..],
                    model.name()
                )));
            }
            if let Some(v) = t.iter().find(|v| !v.is_finite()) {
                return Err(Error::Input(format!("input '{name}' holds {v}: inputs must be finite numbers")));
            }
            Ok((name.clone(), t))
        })
        .collect()
}

/// The one-hot matrices a compiled step reads, from the integer labels in `batch`.
pub fn one_hot_labels(executable: &Executable, batch: &TensorMap) -> Result<TensorMap> {
    Ok(training::one_hot_feed(executable, batch)?)
}

/// A one-element tensor: how a step's scalar state (a counter, Adam's powers) and scalar
/// results (the loss, the global step) are held.
pub fn scalar(v: f32) -> Tensor {
    Tensor::from_shape_vec(vec![1], vec![v]).expect("one value")
}

/// `name` from a state, which must have `shape` (the model's).
pub fn state_tensor<'a>(state: &'a TensorMap, name: &str, shape: &[usize]) -> Result<&'a Tensor> {
    let t = state.get(name).ok_or_else(|| Error::Input(format!("the state has no parameter '{name}'")))?;
    if t.shape() != shape {
        return Err(Error::Input(format!("state '{name}' has shape {:?} but the model's is {shape:?}", t.shape())));
    }
    Ok(t)
}
