//! Systolic: a TPU-style accelerator toolchain.
//!
//! This facade re-exports the workspace's crates so users depend on one package:
//! [`compiler`] (graph IR, model zoo, CPU reference, autodiff) and [`simulator`] (machines,
//! ISA, bit-exact MXU, PE-level array, timing). The runtime joins as it lands. The `systolic` binary (src/main.rs) is the command line over all of it.

pub use systolic_compiler as compiler;
pub use systolic_runtime as runtime;
pub use systolic_simulator as simulator;

#[doc(hidden)]
pub mod fuzz;
