//! What to compile for.

use systolic_simulator::Machine;
use systolic_simulator::isa::{DType, Reduction};
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
    /// How activations, the values kept for the backward pass and activation gradients are
    /// stored in HBM: `Bf16` as a TPU trains (rounded to nearest even on store, widened on
    /// load), or `F32`. Parameters, optimizer state, statistics, the loss and weight gradients
    /// are always f32.
    pub activations: DType,
    /// Data parallelism: the program is one replica's step at `batch` examples, and the
    /// training step all-reduces each gradient over groups of this many consecutive cores
    /// before the update (1: no collectives).
    pub replicas: usize,
    /// How gradients are combined over the replicas: `Mean` (TensorFlow's
    /// `CrossShardOptimizer` default) or `Sum`.
    pub gradient_reduction: Reduction,
    /// Gradients are all-reduced in buckets of about this many bytes, each issued as soon as
    /// the backward pass has made its last gradient, so it overlaps the rest of the backward
    /// pass.
    pub bucket_bytes: u64,
    /// Batch norm in training normalises with the statistics of this many consecutive
    /// replicas' examples (their sums all-reduced in the step, as the large-batch ResNet-50
    /// recipes on pods do); 1: each replica's own examples, as TensorFlow does by default.
    pub batch_norm_group: usize,
    /// The sharded weight update (Xu et al., 2020, "Automatic Cross-Replica Sharding of
    /// Weight Update in Data-Parallel Training"): each bucket's gradients are reduce-scattered,
    /// each replica updates its shard of the parameters with its shard of the optimizer's
    /// slots, and the parameters are all-gathered — 1/`replicas` of the update's work and
    /// slots per replica, the same bytes on the network as the all-reduce.
    pub sharded_update: bool,
}

/// 25 MiB: PyTorch DistributedDataParallel's default bucket (`bucket_cap_mb=25`), large
/// enough that a bucket's all-reduce is bandwidth-bound on a pod, small enough that ResNet-50's
/// ~100 MB of gradients make four buckets that overlap the backward pass.
pub const BUCKET_BYTES: u64 = 25 << 20;

impl Options {
    /// Inference on `machine` at `batch` examples per core and `precision`, activations stored
    /// as [`Options::default_activations`] says.
    pub fn new(machine: Machine, batch: usize, precision: Precision) -> Options {
        Options {
            machine,
            batch,
            precision,
            training: None,
            train_mode: false,
            activations: Self::default_activations(precision),
            replicas: 1,
            gradient_reduction: Reduction::Mean,
            bucket_bytes: BUCKET_BYTES,
            batch_norm_group: 1,
            sharded_update: false,
        }
    }

    /// bf16 at DEFAULT precision (one bf16 pass, as a TPU trains); f32 where the user asks the
    /// MXU for more (HIGH, HIGHEST).
    pub fn default_activations(precision: Precision) -> DType {
        match precision {
            Precision::Default => DType::Bf16,
            Precision::High | Precision::Highest => DType::F32,
        }
    }
}
