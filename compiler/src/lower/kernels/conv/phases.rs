//! Strided convolutions by phase (space-to-depth). With a stride above 1 the shifted matmuls
//! would stream `sh·wp/sw` rows per output row over a strided view of the padded input and
//! throw most of them away. Instead the `sh × sw` phases of the padded input are staged as dense
//! sub-images (phase `(pr, pc)` holds padded pixels `(sh·i + pr, sw·j + pc)`, gathered by a
//! strided DMA, see `blocks::staging`), and tap (ki, kj) is one matmul over phase
//! `(ki·dh mod sh, kj·dw mod sw)` from offset `(ki·dh div sh, kj·dw div sw)` with unit stride:
//! output rows stream over a phase's width, about `wp / sw`. The layout is
//! [`ConvLayout::phased`]; depthwise convolutions on the VPU read it the same way, and im2col
//! copies its taps' phases into columns ordered by phase.

use crate::lower::blocks::conv_layout::ConvLayout;
use crate::lower::emitter::Emitter;
use crate::lower::kernels::conv::shifted;
use crate::lower::kernels::conv::work::{BlockWork, Computed};

/// Whether the convolution `g` (not yet phased) streams fewer rows staged by phase.
pub(crate) fn pays(g: &ConvLayout) -> bool {
    g.phases_pay()
}

/// One matmul per tap and MXU into the block's accumulator, each over its tap's phase (the
/// layout's tap views address the phases).
pub(crate) fn compute(e: &mut Emitter, w: &BlockWork) -> Computed {
    debug_assert!(w.g.phases, "a phased layout");
    shifted::compute(e, w)
}
