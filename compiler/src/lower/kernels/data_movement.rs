//! Data movement: concatenation and slicing along any axis, one strided DMA each way.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{NodeId, Op};
use crate::lower::emitter::{Emitted, Emitter};
use crate::lower::kernel::{Kernel, Place};

/// The indices `a0..a0+len` along `axis` of the tensor at `p`, for every index of the axes
/// before it: `outer` rows of `len · inner` contiguous elements, `dim · inner` apart. Concat
/// and slice along any axis are one strided DMA each way.
fn axis_block(p: &Place, axis: usize, a0: usize, len: usize) -> Tile {
    let outer: usize = p.shape[..axis].iter().product();
    let inner: usize = p.shape[axis + 1..].iter().product();
    Tile {
        space: p.tile.space,
        offset: p.tile.offset + (a0 * inner) as u64 * p.tile.dtype.size(),
        rows: outer as u32,
        cols: (len * inner) as u32,
        stride: (p.shape[axis] * inner) as u32,
        dtype: p.tile.dtype,
    }
}

/// The axis of the concrete (batched) shape a per-example `axis` attribute names.
fn batched_axis(e: &Emitter, node: NodeId, axis: i64, rank: usize) -> Result<usize> {
    crate::graph::per_example_axis(axis, rank).map(|a| a + 1).map_err(|why| e.unsupported(node, why))
}

pub(crate) fn concat(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let graph = e.graph;
    let n = graph.node(node);
    let Op::Concat(attrs) = &n.op else { unreachable!("a Concat main") };
    let y = e.place(kernel.output);
    let axis = batched_axis(e, node, attrs.axis, y.shape.len())?;
    let mut a0 = 0;
    for (i, &input) in n.inputs.iter().enumerate() {
        let x = e.place(input);
        let len = x.shape[axis];
        e.push(Operation::dma(i as u8, axis_block(x, axis, 0, len), axis_block(y, axis, a0, len)), &[]);
        a0 += len;
    }
    let what = format!("{} inputs along axis {axis}", n.inputs.len());
    Ok(Emitted::new("strided DMA into slices of the output", what, 0))
}

/// `Slice` (the gradient of a concatenation): one strided DMA.
pub(crate) fn slice(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let Op::Slice(attrs) = &n.op else { unreachable!("a Slice main") };
    let (x, y) = (e.place(n.inputs[0]), e.place(kernel.output));
    let axis = batched_axis(e, node, attrs.axis, x.shape.len())?;
    e.push(Operation::dma(0, axis_block(x, axis, attrs.start, attrs.len), axis_block(y, axis, 0, attrs.len)), &[]);
    let what = format!("{} of {} along axis {axis}", attrs.len, x.shape[axis]);
    Ok(Emitted::new("strided DMA of a slice", what, 0))
}
