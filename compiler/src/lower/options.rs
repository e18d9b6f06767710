//! What to compile for.

use systolic_simulator::Machine;
use systolic_simulator::numerics::Precision;

use crate::lower::training::Training;

/// What to compile for.
#[derive(Clone, Debug)]
pub struct Options {
    pub machine: Machine,
    /// Examples per core.
    pub batch: usize,
    pub precision: Precision,
    /// Lower the training step (forward, backward, update) with these settings, rather than
    /// inference.
    pub training: Option<Training>,
    /// Without `training`: the forward pass in training mode — batch norm with the batch's
    /// statistics (moving statistics updated in place and output), dropout with the mask of
    /// the step in `dropout/step` (advanced by the program) — as `run --train-mode` does.
    pub train_mode: bool,
}
