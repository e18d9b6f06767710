//! Convolutions on small maps over their im2col matrix gathered from HBM
//! ([`ConvLayout::gathered`]): the staging DMAs place each tap's pixels in its columns, so a
//! block is one matmul of depth `taps × channels` per MXU over exactly the block's output
//! pixels — no padded-width rows, no VPU copies.

use systolic_simulator::isa::*;

use crate::lower::blocks::mxus::{mxus_for, split_rows};
use crate::lower::kernels::conv::work::{BlockWork, Computed};

/// One matmul per MXU over its share of the block's rows of the matrix.
pub(crate) fn compute(e: &mut crate::lower::emitter::Emitter, w: &BlockWork) -> Computed {
    let g = w.g;
    debug_assert!(g.gathered, "a gathered layout");
    let matrix = g.matrix(w.stage, w.m_blk);
    let rhs = Tile { rows: (g.taps() * g.c) as u32, ..w.weights };
    let mut producers = Vec::new();
    for (x_i, &(r0, rn)) in split_rows(w.m_blk, mxus_for(e.m, w.m_blk)).iter().enumerate() {
        let op = Operation::MatMul {
            mxu: x_i as u8,
            lhs: matrix.rows(r0, rn),
            rhs,
            out: w.acc.rows(r0, rn),
            accumulate: false,
            precision: w.precision,
        };
        producers.push(e.push(op, &w.deps));
    }
    Computed { readers: producers.clone(), producers }
}
