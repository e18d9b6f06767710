//! im2col: when the channels are few (the 3-channel first layer), the taps are folded into K.
//! The VPU copies each tap's view of the staged input into the columns of one matrix and a
//! single matmul of depth `taps × channels` replaces `taps` shallow ones. The next block's
//! copies are issued right after this block's matmuls, so the VPU fills the next matrix while
//! the MXU works on this one. A strided convolution reads its input staged by phase (see
//! [`crate::lower::kernels::conv::phases`]): the matrix has about `1/sw` of the rows, its
//! columns follow the phases ([`ConvLayout::im2col_taps`]) and the weights load in that order.

use systolic_simulator::isa::*;

use crate::lower::blocks::conv_layout::ConvLayout;
use crate::lower::blocks::mxus::{mxus_for, split_rows};
use crate::lower::blocks::staging::im2col_copies;
use crate::lower::emitter::{BUFFERS, Emitter, Vmem};
use crate::lower::kernels::conv::work::{BlockWork, Computed};

/// The im2col matrices (a ring) and who reads each.
pub(crate) struct Im2col {
    cols: Vec<Tile>,
    /// Per matrix: the matmuls that read it last.
    readers: Vec<Vec<u32>>,
    /// Per work item: its copies, when issued ahead by the item before.
    copies: Vec<Option<u32>>,
}

impl Im2col {
    /// VMEM of one matrix for `m_rows` streamed rows.
    pub(crate) fn bytes_per_buffer(m_rows: usize, taps: usize, c: usize) -> u64 {
        (m_rows * taps * c * 4) as u64
    }

    pub(crate) fn new(vmem: &mut Vmem, m_rows: usize, taps: usize, c: usize) -> Option<Im2col> {
        let cols = (0..BUFFERS).map(|_| vmem.alloc(m_rows, taps * c)).collect::<Option<Vec<Tile>>>()?;
        Some(Im2col { cols, readers: vec![Vec::new(); BUFFERS], copies: Vec::new() })
    }

    /// A channel block's weights `src` (HWIO rows) into `dst` with their rows in the order of
    /// the im2col columns of a phased layout: one DMA per tap, then a barrier.
    pub(crate) fn load_phased_weights(
        e: &mut Emitter,
        g: &ConvLayout,
        src: Tile,
        dst: Tile,
        cg: usize,
        deps: &[u32],
    ) -> u32 {
        let ids: Vec<u32> = (g.im2col_taps().iter().enumerate())
            .map(|(k, &(i, j))| {
                e.push(Operation::dma(1, src.rows((i * g.kw + j) * cg, cg), dst.rows(k * cg, cg)), deps)
            })
            .collect();
        e.push(Operation::Barrier, &ids)
    }

    /// The block's copies (unless issued ahead), one matmul per MXU, then the next block's copies.
    pub(crate) fn compute(&mut self, e: &mut Emitter, w: &BlockWork) -> Computed {
        let (g, p) = (w.g, w.wi % BUFFERS);
        let cols_t = Tile { rows: w.m_blk as u32, ..self.cols[p] };
        let copied = match self.copies.get(w.wi).copied().flatten() {
            Some(c) => c,
            None => {
                let after = e.after_all(w.staged, &self.readers[p]);
                im2col_copies(e, g, w.stage, cols_t, after, w.m_blk)
            }
        };
        let mut readers = vec![copied];
        let split = split_rows(w.m_blk, mxus_for(e.m, w.m_blk));
        let rhs = Tile { rows: (g.taps() * g.c) as u32, ..w.weights };
        let mut producers = Vec::new();
        for (x_i, &(r0, rn)) in split.iter().enumerate() {
            let mut deps = vec![copied, w.wload];
            deps.extend(w.acc_free);
            let lhs = cols_t.rows(r0, rn);
            let out = w.acc.rows(r0, rn);
            let op = Operation::MatMul { mxu: x_i as u8, lhs, rhs, out, accumulate: false, precision: w.precision };
            producers.push(e.push(op, &deps));
        }
        // The next use of these columns must wait for these matmuls.
        readers.extend(producers.iter().copied());
        self.readers[p] = producers.clone();
        // The next block's copies, now, ahead of this block's epilogue on the VPU.
        if let Some(next) = &w.next {
            let np = (w.wi + 1) % BUFFERS;
            let next_cols = Tile { rows: next.m_blk as u32, ..self.cols[np] };
            let after = e.after_all(next.staged, &self.readers[np]);
            self.copies.resize(w.wi + 2, None);
            self.copies[w.wi + 1] = Some(im2col_copies(e, g, next.stage, next_cols, after, next.m_blk));
        }
        Computed { readers, producers }
    }
}
