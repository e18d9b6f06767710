//! LARS's trust ratio on the VPU: a first pass over the parameter and its gradient for their
//! sums of squares, then the ratio as a [`crate::optimizer::Scalars`] program.
//!
//! The sums follow [`crate::optimizer::Optimizer::sum_of_squares`]'s order whatever the
//! block size: each block's rows are summed across their columns into one column of row sums
//! for the whole parameter, which is summed down once at the end.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::lower::blocks::rows::rows_per_block;
use crate::lower::emitter::{BUFFERS, Emitter, Vmem};
use crate::lower::kernel::Kernel;
use crate::lower::kernels::optimizer::scalars::{self, Factor};
use crate::optimizer::Optimizer;

/// `lr · ratio` for the parameter `p` with gradient `g` (both in HBM, rows × cols).
pub(crate) fn scaled_rate(
    e: &mut Emitter,
    vmem: &mut Vmem,
    kernel: &Kernel,
    opt: &Optimizer,
    (p, g): (Tile, Tile),
    rate: Factor,
) -> Result<Factor> {
    let (rows, c) = (p.rows as usize, p.cols as usize);
    let oom = |e: &Emitter| e.vmem_error(kernel, "LARS's row sums");
    let mut alloc = |e: &Emitter, r: usize, c: usize| vmem.alloc(r, c).ok_or_else(|| oom(e));
    let sums = [alloc(e, rows, 1)?, alloc(e, rows, 1)?];
    let totals = [alloc(e, 1, 1)?, alloc(e, 1, 1)?];
    let rb = rows_per_block(e, rows, c, 2 * BUFFERS);
    let rings = [ring(e, vmem, kernel, rb, c)?, ring(e, vmem, kernel, rb, c)?];
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let k = b % BUFFERS;
        let mut reduced = Vec::new();
        for (i, src) in [p, g].into_iter().enumerate() {
            let t = Tile { rows: rn as u32, ..rings[i][k] };
            let l = e.push(Operation::dma(i as u8, src.rows(r0, rn), t), &free[k]);
            let sq = e.push(Operation::Binary { op: BinaryOp::Mul, a: t, b: t, dst: t }, &[l]);
            let dst = sums[i].rows(r0, rn);
            reduced.push(e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: t, dst }, &[sq]));
        }
        free[k] = reduced;
    }
    let all: Vec<u32> = free.into_iter().flatten().collect();
    let mut inputs = Vec::new();
    for (sum, total) in sums.into_iter().zip(totals) {
        let op = Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: sum, dst: total };
        inputs.push((total, e.push(op, &all)));
    }
    inputs.push(rate.register(e, vmem, kernel)?);
    let (t, ready) = scalars::emit(e, vmem, kernel, &opt.lars_rate(), &inputs)?;
    Ok(Factor::Tile(t, ready))
}

fn ring(e: &Emitter, vmem: &mut Vmem, kernel: &Kernel, rows: usize, cols: usize) -> Result<Vec<Tile>> {
    vmem.ring(rows, cols).ok_or_else(|| e.vmem_error(kernel, "LARS's blocks"))
}
