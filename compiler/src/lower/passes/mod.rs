//! The passes, one module each, in the order [`crate::lower::pipeline`] runs them.

pub(crate) mod allocation;
pub(crate) mod collectives;
pub(crate) mod fusion;
pub(crate) mod layout;
pub(crate) mod scheduling;
pub(crate) mod storage;
pub(crate) mod tiling;
