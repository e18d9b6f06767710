//! Dense layers and their gradients on the MXU, and bias gradients (sums over rows).

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{NodeId, Op};
use crate::lower::blocks::matmul::{Operand, matmul_kernel};
use crate::lower::blocks::rows::rows_per_block;
use crate::lower::emitter::{BUFFERS, Emitted, Emitter};
use crate::lower::kernel::{Epilogue, Kernel};

pub(crate) fn dense(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let mut kernel = kernel.clone();
    if n.inputs.len() > 2 {
        kernel.epilogue.insert(0, Epilogue::Bias(n.inputs[2]));
    }
    let lhs = Operand { tile: e.place(n.inputs[0]).tile, transposed: false };
    let rhs = Operand { tile: e.place(n.inputs[1]).tile, transposed: false };
    matmul_kernel(e, &kernel, lhs, rhs, e.place(kernel.output).tile)
}

/// `DenseBackpropInput` (`dy · Wᵀ`) and `DenseBackpropKernel` (`xᵀ · dy`) on the MXU.
pub(crate) fn dense_grad(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let (a, b) = (e.place(n.inputs[0]).tile, e.place(n.inputs[1]).tile);
    let out = e.place(kernel.output).tile;
    let (Op::DenseBackpropInput | Op::DenseBackpropKernel) = n.op else { unreachable!("a dense gradient") };
    // DenseBackpropInput: dy [rows x out] · (W [in x out])ᵀ; DenseBackpropKernel:
    // (x [rows x in])ᵀ · dy [rows x out].
    let input = matches!(n.op, Op::DenseBackpropInput);
    matmul_kernel(e, kernel, Operand { tile: a, transposed: !input }, Operand { tile: b, transposed: input }, out)
}

/// Sums over rows (`BiasAddGrad`): partial sums per block of rows, added in block order.
pub(crate) fn column_sums(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let x = e.place(e.graph.node(node).inputs[0]).tile;
    let out = e.place(kernel.output).tile;
    let (rows, c) = (x.rows as usize, x.cols as usize);
    let rb = rows_per_block(e, rows, c, BUFFERS);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let bufs = vmem.ring(rb, c).ok_or_else(|| oom(e))?;
    let (part, total) = (vmem.alloc(1, c).ok_or_else(|| oom(e))?, vmem.alloc(1, c).ok_or_else(|| oom(e))?);
    let mut last = e.push(Operation::Fill { dst: total, value: 0.0 }, &[]);
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let p = b % BUFFERS;
        let t = Tile { rows: rn as u32, ..bufs[p] };
        let load = e.push(Operation::dma(0, x.rows(r0, rn), t), &free[p]);
        let s = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: t, dst: part }, &[load, last]);
        last = e.push(Operation::Binary { op: BinaryOp::Add, a: total, b: part, dst: total }, &[s]);
        free[p] = vec![s];
    }
    e.push(Operation::dma(2, total, out), &[last]);
    Ok(Emitted::new(format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c} to {c}"), 0))
}
