//! Systolic's runtime: what runs a model's steps, whatever runs them.
//!
//! A [`Backend`] holds a model's state (parameters, optimizer slots, batch norm's moving
//! statistics) and runs training steps and predictions on batches: the f32 CPU reference
//! ([`backend::Cpu`]), one simulated core or a whole simulated slice
//! ([`backend::Simulated`], which compile the step, bind tensors by name, run the functional
//! engines and report simulated time). [`session`] owns the conventions a compiled step's
//! tensors follow (gradient and one-hot names, the loss, the state the lowering adds), so no
//! caller spells them out. TensorFlow's estimator API (issue 10) builds on these.

pub mod augment;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod estimator;
pub mod input;
pub mod metrics;
pub mod session;
pub mod spec;

pub use backend::{Backend, Settings, StepOutput, Target, backend};
pub use config::{CheckpointEvery, InputPipeline, IterationsPerLoop, RunConfig, TpuConfig};
pub use error::{Error, Result};
pub use estimator::{
    Estimator, EvalReport, HookAction, LoopReport, TpuEstimator, TpuEstimatorArgs, TrainReport, TrainingHook, WarmStart,
};
pub use input::{Examples, Input, InputContext, InputFn};
pub use spec::{
    CrossShardOptimizer, EstimatorSpec, EvalMetrics, HostCall, Loss, MetricUpdate, Mode, Params, TpuEstimatorSpec,
    TrainOp, Value,
};
