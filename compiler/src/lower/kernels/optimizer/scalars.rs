//! The update's per-step scalars on the VPU: the learning rate from the global step, and
//! [`Scalars`] programs emitted as 1×1 instructions, one register each.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::NodeId;
use crate::lower::emitter::{Emitter, Vmem};
use crate::lower::kernel::Kernel;
use crate::optimizer::{Optimizer, ScalarOp, Scalars};

/// A scalar an update multiplies by: a constant, or a 1×1 VMEM tile and the instruction after
/// which it holds its value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Factor {
    Const(f32),
    Tile(Tile, u32),
}

/// A tile of one `rows` × 1 column broadcasting the scalar at `t` (row stride 0).
fn scalar_column(t: Tile, rows: u32) -> Tile {
    Tile { rows, cols: 1, stride: 0, ..t }
}

impl Factor {
    /// `dst = src · factor` (as the reference's `x * factor`), after `deps`.
    pub(crate) fn scale(self, e: &mut Emitter, src: Tile, dst: Tile, deps: &[u32]) -> u32 {
        match self {
            Factor::Const(c) => e.push(Operation::Unary { op: UnaryOp::Scale(c), src, dst }, deps),
            Factor::Tile(t, ready) => {
                let mut deps = deps.to_vec();
                deps.push(ready);
                let b = scalar_column(t, src.rows);
                e.push(Operation::Binary { op: BinaryOp::Mul, a: src, b, dst }, &deps)
            }
        }
    }

    /// The factor in a register, for programs that take it as an input.
    pub(crate) fn register(self, e: &mut Emitter, vmem: &mut Vmem, kernel: &Kernel) -> Result<(Tile, u32)> {
        match self {
            Factor::Tile(t, ready) => Ok((t, ready)),
            Factor::Const(value) => {
                let t = vmem.alloc(1, 1).ok_or_else(|| e.vmem_error(kernel, "scalars"))?;
                Ok((t, e.push(Operation::Fill { dst: t, value }, &[])))
            }
        }
    }
}

/// Loads the one-element state tensor `node` into a VMEM register on DMA engine `engine`.
pub(crate) fn load(e: &mut Emitter, vmem: &mut Vmem, kernel: &Kernel, node: NodeId, engine: u8) -> Result<(Tile, u32)> {
    let t = vmem.alloc(1, 1).ok_or_else(|| e.vmem_error(kernel, "scalars"))?;
    let hbm = e.place(node).tile;
    Ok((t, e.push(Operation::dma(engine, hbm, t), &[])))
}

/// `program` on `inputs` (a register each, with the instruction after which it is ready):
/// the result's register.
pub(crate) fn emit(
    e: &mut Emitter,
    vmem: &mut Vmem,
    kernel: &Kernel,
    program: &Scalars,
    inputs: &[(Tile, u32)],
) -> Result<(Tile, u32)> {
    let regs = vmem.alloc(1, program.ops.len().max(1)).ok_or_else(|| e.vmem_error(kernel, "scalars"))?;
    let mut at: Vec<(Tile, u32)> = inputs.to_vec();
    for (i, op) in program.ops.iter().enumerate() {
        let dst = Tile { offset: regs.offset + 4 * i as u64, cols: 1, stride: 1, ..regs };
        let ready = match *op {
            ScalarOp::Fill(value) => e.push(Operation::Fill { dst, value }, &[]),
            ScalarOp::Unary(op, x) => e.push(Operation::Unary { op, src: at[x].0, dst }, &[at[x].1]),
            ScalarOp::Binary(op, a, b) => {
                e.push(Operation::Binary { op, a: at[a].0, b: at[b].0, dst }, &[at[a].1, at[b].1])
            }
        };
        at.push((dst, ready));
    }
    Ok(at[program.result()])
}

/// The step's learning rate: the constant, or the schedule's program on the global step.
pub(crate) fn rate(e: &mut Emitter, vmem: &mut Vmem, kernel: &Kernel, opt: &Optimizer) -> Result<Factor> {
    let Some(i) = opt.step_index() else { return Ok(Factor::Const(opt.learning_rate())) };
    let step = load(e, vmem, kernel, e.extras.state[i], 2)?;
    let (t, ready) = emit(e, vmem, kernel, &opt.schedule.program(), &[step])?;
    Ok(Factor::Tile(t, ready))
}
