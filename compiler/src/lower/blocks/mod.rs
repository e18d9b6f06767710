//! The blocks layer: pieces kernels are built from — staging a convolution's input with its
//! zero fill, matmul blocks, row streaming, epilogues, per-channel sums and batch statistics.
//! Blocks emit through the [`crate::lower::emitter::Emitter`].

pub(crate) mod batch_stats;
pub(crate) mod channel_sums;
pub(crate) mod conv_layout;
pub(crate) mod epilogue;
pub(crate) mod matmul;
pub(crate) mod mxus;
pub(crate) mod rows;
pub(crate) mod staging;
