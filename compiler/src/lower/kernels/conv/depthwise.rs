//! Depthwise convolutions on the VPU: one input channel per output channel is a matmul of
//! depth 1, which would waste all but one row of the array, so each tap is one multiply-add
//! of the staged view by the tap's weight row, over a block of channels.

use systolic_simulator::isa::*;

use crate::lower::emitter::Emitter;
use crate::lower::kernels::conv::work::{BlockWork, Computed};

/// The taps' multiply-adds into the block's accumulator, in order.
pub(crate) fn compute(e: &mut Emitter, w: &BlockWork) -> Computed {
    let g = w.g;
    let mut last = None;
    for i in 0..g.kh {
        for j in 0..g.kw {
            let tap = i * g.kw + j;
            let a = g.tap_view(w.stage, i, j, w.c0, w.nbw, w.m_blk);
            let wrow = Tile { offset: w.weights.offset + (tap * w.nbw * 4) as u64, rows: 1, ..w.weights };
            let deps: Vec<u32> = match last {
                Some(l) => vec![l],
                None => w.deps.clone(),
            };
            let op = if tap == 0 {
                Operation::Binary { op: BinaryOp::Mul, a, b: wrow, dst: w.acc }
            } else {
                Operation::MulAdd { a, b: wrow, acc: w.acc }
            };
            last = Some(e.push(op, &deps));
        }
    }
    let last: Vec<u32> = last.into_iter().collect();
    Computed { readers: last.clone(), producers: last }
}
