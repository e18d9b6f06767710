//! Shifted matmuls: the input band is staged in VMEM with its zero padding, and each kernel
//! tap (i, j) is one matmul whose left operand is the staging buffer read with a row stride of
//! `stride × channels`, starting `(i·dh·Wp + j·dw)` pixels in. The output rows run over the
//! padded width (`Wp` per output row), so the `Wp − OW` extra columns (and, for whole-image
//! blocks, the extra rows) are computed and dropped: reported as padding waste.

use systolic_simulator::isa::*;

use crate::lower::blocks::mxus::{mxus_for, split_rows};
use crate::lower::emitter::Emitter;
use crate::lower::kernels::conv::work::{BlockWork, Computed};

/// One matmul per tap and MXU into the block's accumulator.
pub(crate) fn compute(e: &mut Emitter, w: &BlockWork) -> Computed {
    let g = w.g;
    let cg = w.cg;
    let split = split_rows(w.m_blk, mxus_for(e.m, w.m_blk));
    let mut last_per_mxu = vec![None; split.len()];
    for i in 0..g.kh {
        for j in 0..g.kw {
            let tap = i * g.kw + j;
            let rhs = Tile { rows: cg as u32, ..w.weights }.rows(0, cg);
            let rhs = Tile { offset: w.weights.offset + (tap * cg * w.nbw * 4) as u64, ..rhs };
            for (x_i, &(r0, rn)) in split.iter().enumerate() {
                let lhs = g.tap_view(w.stage, i, j, w.group * cg, cg, w.m_blk).rows(r0, rn);
                let out = w.acc.rows(r0, rn);
                // Taps accumulate on one MXU in program order (units run in order), so the
                // chain needs no dependency and the passes pipeline.
                let op =
                    Operation::MatMul { mxu: x_i as u8, lhs, rhs, out, accumulate: tap > 0, precision: w.precision };
                last_per_mxu[x_i] = Some(e.push(op, &w.deps));
            }
        }
    }
    let last: Vec<u32> = last_per_mxu.iter().flatten().copied().collect();
    Computed { readers: last.clone(), producers: last }
}
