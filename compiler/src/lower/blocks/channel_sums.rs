//! Per-channel sums of a convolution's output for the batch norm after it (batch statistics),
//! accumulated on the VPU block by block while the MXU works, so the batch norm needs no pass
//! of its own over the output.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::lower::blocks::conv_layout::{Block, ConvLayout};
use crate::lower::emitter::{Emitter, Vmem};
use crate::lower::kernel::Kernel;

/// Per-channel sums of a convolution's output for the batch norm after it (batch statistics):
/// `Σ(x − K)` and `Σ(x − K)²` over the valid output pixels, with `K` the first pixel (the
/// shift `batch_norm` uses) — or, with statistics over a group of replicas, the batch norm's
/// moving mean, which every member shares — accumulated block by block on the VPU while the
/// MXU works, then written to HBM as `[K; Σ; Σ²]` rows.
pub(crate) struct ChannelSums {
    at: u64,
    work: Tile,
    shift: Tile,
    sum: Tile,
    sum_sq: Tile,
    part: Tile,
    /// The last instruction of the chain (the VPU runs it in order; the dependency keeps the
    /// shared vectors ordered for the validator).
    last: Option<u32>,
    /// Channel blocks whose sums are started (by their first block).
    shifted: Vec<bool>,
    /// The load of a shift shared by a group of replicas (the moving mean), if any: the
    /// first blocks then keep it rather than take their first pixel.
    common_shift: Option<u32>,
    nb: usize,
}

impl ChannelSums {
    pub(crate) fn new(
        e: &mut Emitter,
        kernel: &Kernel,
        at: u64,
        m_rows: usize,
        nb: usize,
        co: usize,
        vmem: &mut Vmem,
    ) -> Result<Self> {
        let oom = |e: &Emitter| e.vmem_error(kernel, "channel-sum buffers");
        let work = vmem.alloc(m_rows, nb).ok_or_else(|| oom(e))?;
        let mut vec = || vmem.alloc(1, co);
        let (shift, sum, sum_sq, part) = (vec(), vec(), vec(), vec());
        let [shift, sum, sum_sq, part] = [shift, sum, sum_sq, part].map(|t| t.ok_or_else(|| oom(e)));
        let shift = shift?;
        let moving_mean = kernel.stats_for.map(|bn| e.graph.node(bn).inputs[3]);
        let common_shift = match moving_mean {
            Some(mm) if e.opts.batch_norm_group > 1 => Some(e.push(Operation::dma(1, e.place(mm).tile, shift), &[])),
            _ => None,
        };
        Ok(ChannelSums {
            at,
            work,
            shift,
            common_shift,
            sum: sum?,
            sum_sq: sum_sq?,
            part: part?,
            last: None,
            shifted: vec![false; co.div_ceil(nb)],
            nb,
        })
    }

    /// Adds the valid pixels of `acc` (block `blk`, channels `c0..`) after `ready`; returns the
    /// instruction after which `acc` is no longer read.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_block(
        &mut self,
        e: &mut Emitter,
        g: &ConvLayout,
        blk: &Block,
        whole: bool,
        acc: Tile,
        c0: usize,
        ready: u32,
    ) -> u32 {
        let (m, nbw) = (acc.rows as usize, acc.cols as usize);
        let cols = |t: Tile| t.columns(c0, nbw);
        let mut deps = vec![ready];
        deps.extend(self.last);
        let first = !self.shifted[c0 / self.nb];
        if first {
            self.shifted[c0 / self.nb] = true;
            if let Some(loaded) = self.common_shift {
                deps.push(loaded);
            } else {
                // The block's first streamed row is output pixel (n0, 0, 0): the shift.
                let s =
                    e.push(Operation::Unary { op: UnaryOp::Copy, src: acc.rows(0, 1), dst: cols(self.shift) }, &deps);
                deps = vec![s];
            }
        }
        let work = Tile { rows: m as u32, cols: nbw as u32, stride: nbw as u32, ..self.work };
        let sub = e.push(Operation::Binary { op: BinaryOp::Sub, a: acc, b: cols(self.shift), dst: work }, &deps);
        // Zero what is not an output pixel: the columns past OW of every streamed row (of every
        // packed image), and in whole-image blocks the rows past OH of every image slot.
        let mut last = sub;
        let period = g.column_period();
        if period > g.ow {
            let t = Tile {
                offset: work.offset + (g.ow * nbw * 4) as u64,
                rows: (m / period) as u32,
                cols: ((period - g.ow) * nbw) as u32,
                stride: (period * nbw) as u32,
                ..work
            };
            last = e.push(Operation::Fill { dst: t, value: 0.0 }, &[last]);
        }
        if whole && g.hv() > g.oh {
            let t = Tile {
                offset: work.offset + (g.oh * g.wv * nbw * 4) as u64,
                rows: blk.images as u32,
                cols: ((g.hv() - g.oh) * g.wv * nbw) as u32,
                stride: (g.hv() * g.wv * nbw) as u32,
                ..work
            };
            last = e.push(Operation::Fill { dst: t, value: 0.0 }, &[last]);
        }
        let part = cols(self.part);
        let r = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: work, dst: part }, &[last]);
        let a = if first {
            e.push(Operation::Unary { op: UnaryOp::Copy, src: part, dst: cols(self.sum) }, &[r])
        } else {
            e.push(Operation::Binary { op: BinaryOp::Add, a: cols(self.sum), b: part, dst: cols(self.sum) }, &[r])
        };
        let sq = e.push(Operation::Binary { op: BinaryOp::Mul, a: work, b: work, dst: work }, &[a]);
        let r = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: work, dst: part }, &[sq]);
        let b = if first {
            e.push(Operation::Unary { op: UnaryOp::Copy, src: part, dst: cols(self.sum_sq) }, &[r])
        } else {
            e.push(Operation::Binary { op: BinaryOp::Add, a: cols(self.sum_sq), b: part, dst: cols(self.sum_sq) }, &[r])
        };
        self.last = Some(b);
        sub
    }

    /// Writes `[K; Σ; Σ²]` to HBM.
    pub(crate) fn store(self, e: &mut Emitter) {
        let c = self.sum.cols as usize;
        let after: Vec<u32> = self.last.into_iter().collect();
        for (row, t) in [self.shift, self.sum, self.sum_sq].into_iter().enumerate() {
            let dst = Tile::new(Space::Hbm, self.at + (row * c * 4) as u64, 1, c, DType::F32);
            e.push(Operation::dma(2, t, dst), &after);
        }
    }
}
