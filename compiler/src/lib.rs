//! Systolic's compiler crate: the graph IR and everything that reads it.
//!
//! - [`graph`]: the typed IR (NHWC f32, HWIO kernels) on petgraph, its builder and RON files;
//! - [`tensors`]: named tensors and their safetensors files;
//! - [`zoo`]: reference CNNs (simple_cnn … resnet50, mobilenet_v1);
//! - [`reference`]: the f32 CPU interpreter, the executable meaning of every op;
//! - [`autodiff`]: reverse-mode differentiation as a graph transformation;
//! - [`cost`]: FLOP and parameter counts per node;
//! - [`optimizer`]: SGD, momentum (Nesterov), Adam, RMSProp and LARS as f32 update rules, with
//!   weight decay and learning-rate schedules;
//! - [`lower`]: graphs to simulator executables (fusion, layout, storage, allocation, tiling, scheduling).
//!
//! The compiler knows nothing of estimators or command lines; it depends only on the simulator.

pub mod autodiff;
pub mod cost;
pub mod error;
pub mod graph;
pub mod lower;
pub mod optimizer;
pub mod reference;
/// Counter-based random numbers, shared with the simulator (dropout masks must agree).
pub use systolic_simulator::rng;
pub mod tensors;
pub mod zoo;

pub use error::{Error, Result};
pub use graph::{Graph, Node, NodeId, Op, Shape};
pub use tensors::{Tensor, TensorMap};
