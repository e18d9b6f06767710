//! VMEM within one kernel: a bump allocator, and the block sizes every kernel aims for.

use systolic_simulator::isa::{DType, Space, Tile};

/// Rows of a block's matmul (the streamed LHS rows) the tiling aims for.
pub(crate) const TARGET_ROWS: usize = 2048;

/// Copies of each block buffer: while one block computes, the next is loading and the one
/// before is storing, so DMA latency stays off the critical path.
pub(crate) const BUFFERS: usize = 3;

/// VMEM set aside for one of a kernel's two weight buffers (2.5 MiB).
pub(crate) const WEIGHT_BUDGET: u64 = 5 << 19;

/// A bump allocator over one kernel's VMEM.
pub(crate) struct Vmem {
    next: u64,
    capacity: u64,
}

impl Vmem {
    pub(crate) fn new(capacity: u64) -> Vmem {
        Vmem { next: 0, capacity }
    }

    /// `BUFFERS` tiles of `rows × cols`: a ring, so block i+1 loads while block i computes.
    pub(crate) fn ring(&mut self, rows: usize, cols: usize) -> Option<Vec<Tile>> {
        self.ring_of(BUFFERS, rows, cols)
    }

    /// `n` tiles of `rows × cols`, for a kernel whose rings are another depth.
    pub(crate) fn ring_of(&mut self, n: usize, rows: usize, cols: usize) -> Option<Vec<Tile>> {
        (0..n).map(|_| self.alloc(rows, cols)).collect()
    }

    /// Bytes not yet allocated.
    pub(crate) fn remaining(&self) -> u64 {
        self.capacity.saturating_sub(self.next)
    }

    pub(crate) fn alloc(&mut self, rows: usize, cols: usize) -> Option<Tile> {
        let at = self.next.div_ceil(512) * 512;
        let end = at + (rows * cols * 4) as u64;
        if end > self.capacity {
            return None;
        }
        self.next = end;
        Some(Tile::new(Space::Vmem, at, rows, cols, DType::F32))
    }
}
