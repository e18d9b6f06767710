//! Systolic's simulator: the hardware half of the toolchain. It knows nothing of graphs.
//!
//! - [`config`]: machines (cores, chips, hosts, slices) and the Cloud-TPU-named presets;
//! - [`numerics`]: bf16 rounding and the precision passes (the MXU contract);
//! - [`mxu`]: the matrix unit — bit-exact fast matmul, its timing model, and the PE-level
//!   systolic array that is the oracle for both;
//! - [`isa`]: per-core programs as data, and their validator;
//! - [`functional`]: runs programs on real data;
//! - [`host`]: the host's memory budget, checked before engines allocate;
//! - [`progress`]: progress reports of long runs, for a program to show;
//! - [`timing`]: runs programs on the clock: cycles, busy time and utilisation per unit;
//! - [`trace`]: Chrome trace-event JSON of a timed run;
//! - [`kernels`]: small programs built from the ISA (one matmul, for the `mxu` command);
//! - [`executable`]: a program plus the HBM places of the tensors the host exchanges;
//! - [`pod`]: slices of many chips (so far their topology: chips, hosts and ICI links).

pub mod config;
pub mod error;
pub mod executable;
pub mod functional;
pub mod host;
pub mod isa;
pub mod kernels;
pub mod mxu;
pub mod numerics;
pub mod pod;
pub mod progress;
pub mod rng;
pub mod timing;
pub mod trace;

pub use config::Machine;
pub use error::{Error, Result};
