//! Row streaming: tensors of equal rows through VMEM in blocks, `BUFFERS` deep.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::lower::emitter::{BUFFERS, Emitter};
use crate::lower::kernel::Kernel;

/// Rows per block so that `arrays` row-blocks of `cols` f32 values fit in a quarter of VMEM.
pub(crate) fn rows_per_block(e: &Emitter, rows: usize, cols: usize, arrays: usize) -> usize {
    let budget = (e.m.core.vmem_bytes / 4) as usize;
    (budget / (arrays * cols.max(1) * 4)).clamp(1, rows.max(1))
}

/// A block of rows handed to a [`map_rows`] body: the loaded input tiles, in order, the work
/// tiles (`scratch` columns), the block's first row, and the loads to wait for.
pub(crate) struct RowBlock {
    pub(crate) inputs: Vec<Tile>,
    pub(crate) scratch: Vec<Tile>,
    pub(crate) r0: usize,
    pub(crate) loaded: Vec<u32>,
}

/// Streams `inputs` (tensors of equal rows) through VMEM in blocks of rows, `BUFFERS` deep:
/// `body` computes a block's result in one of its tiles and returns that tile with the
/// instruction after which it holds the result; it is stored to the same rows of `out`.
/// Returns the block height.
pub(crate) fn map_rows(
    e: &mut Emitter,
    kernel: &Kernel,
    inputs: &[Tile],
    scratch: &[usize],
    out: Tile,
    mut body: impl FnMut(&mut Emitter, &RowBlock) -> (Tile, u32),
) -> Result<usize> {
    let rows = inputs[0].rows as usize;
    let cols: usize = inputs.iter().map(|t| t.cols as usize).sum::<usize>() + scratch.iter().sum::<usize>();
    let rb = rows_per_block(e, rows, cols, BUFFERS);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let widths = inputs.iter().map(|t| t.cols as usize).chain(scratch.iter().copied());
    let rings: Vec<Vec<Tile>> = widths.map(|c| vmem.ring(rb, c).ok_or_else(|| oom(e))).collect::<Result<_>>()?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let p = b % BUFFERS;
        let tiles: Vec<Tile> = rings.iter().map(|r| Tile { rows: rn as u32, ..r[p] }).collect();
        let (loaded_tiles, scratch_tiles) = tiles.split_at(inputs.len());
        let loaded = inputs
            .iter()
            .zip(loaded_tiles)
            .enumerate()
            .map(|(i, (src, &dst))| e.push(Operation::dma(i as u8, src.rows(r0, rn), dst), &free[p]))
            .collect();
        let block = RowBlock { inputs: loaded_tiles.to_vec(), scratch: scratch_tiles.to_vec(), r0, loaded };
        let (result, ready) = body(e, &block);
        let store = e.push(Operation::dma(2, result, out.rows(r0, rn)), &[ready]);
        free[p] = vec![ready, store];
    }
    Ok(rb)
}
