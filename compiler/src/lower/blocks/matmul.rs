//! Matmul blocks: `out = lhs · rhs` with weights stationary, operands streamed through VMEM in
//! blocks (transposed on the VPU where the kernel needs an operand's transpose).

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::lower::blocks::epilogue::{Operands, apply_epilogue, prepare_channels, residual_of};
use crate::lower::blocks::mxus::{mxus_for, split_rows};
use crate::lower::emitter::{BUFFERS, Emitted, Emitter, TARGET_ROWS, WEIGHT_BUDGET};
use crate::lower::kernel::Kernel;

/// A matmul operand as stored in HBM; `transposed` means the kernel uses its transpose (each
/// block is loaded as stored and turned on the VPU's transpose unit).
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub tile: Tile,
    pub transposed: bool,
}

impl Operand {
    /// Rows and columns of the operand as the matmul sees it.
    fn logical(&self) -> (usize, usize) {
        let (r, c) = (self.tile.rows as usize, self.tile.cols as usize);
        if self.transposed { (c, r) } else { (r, c) }
    }

    /// The stored block holding logical rows `r0..r0+rn` and columns `c0..c0+cn`.
    fn block(&self, r0: usize, rn: usize, c0: usize, cn: usize) -> Tile {
        if self.transposed { self.tile.rows(c0, cn).columns(r0, rn) } else { self.tile.rows(r0, rn).columns(c0, cn) }
    }
}

/// Loads a logical `rn × cn` block of `op` into `dst` (through `stage` when transposed);
/// returns the instruction after which `dst` holds it.
#[allow(clippy::too_many_arguments)] // the block, its buffers and what each must wait for
fn load_block(
    e: &mut Emitter,
    op: Operand,
    (r0, rn, c0, cn): (usize, usize, usize, usize),
    engine: u8,
    dst: Tile,
    stage: Option<Tile>,
    dst_free: &[u32],
    stage_free: &[u32],
) -> u32 {
    let src = op.block(r0, rn, c0, cn);
    match stage {
        Some(stage) if op.transposed => {
            let st = Tile { rows: cn as u32, cols: rn as u32, stride: rn as u32, ..stage };
            let load = e.push(Operation::dma(engine, src, st), stage_free);
            let mut deps = dst_free.to_vec();
            deps.push(load);
            e.push(Operation::Transpose { src: st, dst }, &deps)
        }
        _ => e.push(Operation::dma(engine, src, dst), dst_free),
    }
}

/// `out = lhs · rhs` (then the kernel's epilogue), weights stationary: for each block of rows
/// and each block of output columns, K blocks accumulate on the MXUs, rows split across them.
pub(crate) fn matmul_kernel(
    e: &mut Emitter,
    kernel: &Kernel,
    lhs: Operand,
    rhs: Operand,
    out: Tile,
) -> Result<Emitted> {
    let (rows, fin) = lhs.logical();
    let (k_rhs, fout) = rhs.logical();
    debug_assert_eq!(fin, k_rhs, "matmul operands agree on K");
    let cols = e.m.core.mxu.cols;
    let array_rows = e.m.core.mxu.rows;
    let (mut nb, mut mb) = (fout.min(4 * cols), rows.min(TARGET_ROWS));
    // K blocks: weights kb x nb and inputs mb x kb within budget.
    let kb_budget = (WEIGHT_BUDGET / 4) as usize / nb.max(mb);
    let mut kb = fin.min((kb_budget / array_rows).max(1) * array_rows);
    // Every ring (inputs, weights, accumulators, residuals, transpose staging) within VMEM:
    // fewer rows per block first, then fewer output columns, then a shallower K block.
    let extra_rows = residual_of(kernel).is_some() as usize;
    let need = |nb: usize, mb: usize, kb: usize| {
        let staged = if lhs.transposed { kb * mb } else { 0 } + if rhs.transposed { nb * kb } else { 0 };
        (BUFFERS * 4 * (mb * kb + kb * nb + (1 + extra_rows) * mb * nb + staged) + 8 * fout * 4) as u64
    };
    while need(nb, mb, kb) > e.m.core.vmem_bytes - 16 * 512 {
        if mb > array_rows {
            mb = (mb / 2).max(array_rows);
        } else if nb > cols {
            nb = (nb / 2).max(cols);
        } else if kb > array_rows {
            kb = (kb / 2).max(array_rows);
        } else {
            break;
        }
    }
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "input, weight and accumulator blocks");
    let mut bufs = |n: usize, r: usize, c: usize, e: &Emitter| -> Result<Vec<Tile>> {
        (0..n).map(|_| vmem.alloc(r, c)).collect::<Option<_>>().ok_or_else(|| oom(e))
    };
    let xb = bufs(BUFFERS, mb, kb, e)?;
    let wb = bufs(BUFFERS, kb, nb, e)?;
    let acc = bufs(BUFFERS, mb, nb, e)?;
    let res = bufs(if residual_of(kernel).is_some() { BUFFERS } else { 0 }, mb, nb, e)?;
    let xs_stage = bufs(if lhs.transposed { BUFFERS } else { 0 }, kb, mb, e)?;
    let ws_stage = bufs(if rhs.transposed { BUFFERS } else { 0 }, nb, kb, e)?;
    let ch = prepare_channels(e, kernel, fout, &mut vmem)?;
    let precision = e.opts.precision;
    let mut buf_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut x_stage_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut w_stage_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut acc_free: Vec<Option<u32>> = vec![None; BUFFERS];
    let mut res_free: Vec<Option<u32>> = vec![None; BUFFERS];
    let (mut step, mut block) = (0usize, 0usize);
    for r0 in (0..rows).step_by(mb) {
        let rn = mb.min(rows - r0);
        for c0 in (0..fout).step_by(nb) {
            let cn = nb.min(fout - c0);
            let ap = block % BUFFERS;
            block += 1;
            let accp = Tile { rows: rn as u32, cols: cn as u32, stride: cn as u32, ..acc[ap] };
            let split = split_rows(rn, mxus_for(e.m, rn));
            let mut last_per_mxu: Vec<Option<u32>> = vec![None; split.len()];
            for k0 in (0..fin).step_by(kb) {
                let kn = kb.min(fin - k0);
                let p = step % BUFFERS;
                step += 1;
                let xd = Tile { rows: rn as u32, cols: kn as u32, stride: kn as u32, ..xb[p] };
                let wd = Tile { rows: kn as u32, cols: cn as u32, stride: cn as u32, ..wb[p] };
                let xst = xs_stage.get(p).copied();
                let wst = ws_stage.get(p).copied();
                let dx = load_block(e, lhs, (r0, rn, k0, kn), 0, xd, xst, &buf_readers[p], &x_stage_readers[p]);
                let dw = load_block(e, rhs, (k0, kn, c0, cn), 1, wd, wst, &buf_readers[p], &w_stage_readers[p]);
                if lhs.transposed {
                    x_stage_readers[p] = vec![dx];
                }
                if rhs.transposed {
                    w_stage_readers[p] = vec![dw];
                }
                let mut readers = Vec::new();
                for (x_i, &(s0, sn)) in split.iter().enumerate() {
                    // K blocks accumulate on one MXU in program order: no dependency needed.
                    let mut deps = vec![dx, dw];
                    if k0 == 0 {
                        deps.extend(acc_free[ap]);
                    }
                    let id = e.push(
                        Operation::MatMul {
                            mxu: x_i as u8,
                            lhs: xd.rows(s0, sn),
                            rhs: wd,
                            out: accp.rows(s0, sn),
                            accumulate: k0 > 0,
                            precision,
                        },
                        &deps,
                    );
                    last_per_mxu[x_i] = Some(id);
                    readers.push(id);
                }
                buf_readers[p] = readers;
            }
            let producers: Vec<u32> = last_per_mxu.iter().flatten().copied().collect();
            let residual = match residual_of(kernel) {
                Some(r) => {
                    let resp = Tile { rows: rn as u32, cols: cn as u32, stride: cn as u32, ..res[ap] };
                    let deps: Vec<u32> = res_free[ap].into_iter().collect();
                    let loaded = e.push(Operation::dma(1, e.place(r).tile.rows(r0, rn).columns(c0, cn), resp), &deps);
                    Some((resp, loaded))
                }
                None => None,
            };
            let done = apply_epilogue(e, kernel, &ch, accp, c0, Operands { residual, mask: None }, producers);
            if residual.is_some() {
                res_free[ap] = Some(done);
            }
            acc_free[ap] = Some(e.push(Operation::dma(2, accp, out.rows(r0, rn).columns(c0, cn)), &[done]));
        }
    }
    let useful = (rows * fin * fout) as u64;
    let turned = match (lhs.transposed, rhs.transposed) {
        (false, false) => "",
        (true, false) => "; input blocks transposed on the VPU",
        (false, true) => "; weight blocks transposed on the VPU",
        (true, true) => "; both operands transposed on the VPU",
    };
    Ok(Emitted::new(
        format!("row blocks of {mb}, {nb} outputs and {kb} inputs per block{turned}"),
        format!("M {rows} x K {fin} x N {fout}"),
        useful,
    ))
}
