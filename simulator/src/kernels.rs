//! Small programs built from the ISA: the building blocks of the `mxu` command and of tests.

use crate::config::Machine;
use crate::error::{Error, Result};
use crate::isa::*;
use crate::numerics::Precision;

/// A matmul program and where its operands live.
#[derive(Clone, Debug)]
pub struct MatmulProgram {
    pub program: Program,
    /// `m × k` left operand in VMEM.
    pub a: Tile,
    /// `k × n` right operand (the weights) in VMEM.
    pub b: Tile,
    /// `m × n` f32 result in VMEM.
    pub c: Tile,
}

/// Rounds `x` up to a multiple of `to`.
fn align(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// `C = A · B` with all three operands resident in VMEM; the weight columns are split over the
/// core's MXUs in whole array-width blocks. Operands are bf16 in DEFAULT precision and f32 in
/// HIGH/HIGHEST (which need the f32 values to split them).
pub fn matmul(machine: &Machine, m: usize, k: usize, n: usize, precision: Precision) -> Result<MatmulProgram> {
    if m == 0 || k == 0 || n == 0 {
        return Err(Error::Data(format!("a {m}x{k}x{n} matmul has an empty dimension; give M, K and N of at least 1")));
    }
    if [m, k, n].iter().any(|&d| d > u32::MAX as usize) {
        return Err(Error::Data(format!(
            "a {m}x{k}x{n} matmul has a dimension beyond 2^32 - 1, more than a tile can describe"
        )));
    }
    let dtype = if precision == Precision::Default { DType::Bf16 } else { DType::F32 };
    let a = Tile::new(Space::Vmem, 0, m, k, dtype);
    let b_at = align(a.span().1, 512);
    let b = Tile::new(Space::Vmem, b_at, k, n, dtype);
    let c_at = align(b.span().1, 512);
    let c = Tile::new(Space::Vmem, c_at, m, n, DType::F32);
    let needed = c.span().1;
    if needed > machine.core.vmem_bytes {
        return Err(Error::Data(format!(
            "A, B and C of a {m}x{k}x{n} matmul need {needed} bytes of VMEM but {} cores have {} (core.vmem_bytes): \
             lower M, K or N, or raise the VMEM with --set core.vmem_bytes=...",
            machine.name, machine.core.vmem_bytes
        )));
    }
    let cols = machine.core.mxu.cols;
    let blocks = n.div_ceil(cols);
    let per_mxu = blocks.div_ceil(machine.core.mxu.count);
    let mut program = Program::new(format!("matmul {m}x{k}x{n} {}", precision.name()));
    for (x, first) in (0..blocks).step_by(per_mxu).enumerate() {
        let c0 = first * cols;
        let width = (per_mxu * cols).min(n - c0);
        program.push(
            Operation::MatMul {
                mxu: x as u8,
                lhs: a,
                rhs: b.columns(c0, width),
                out: c.columns(c0, width),
                accumulate: false,
                precision,
            },
            &[],
        );
    }
    Ok(MatmulProgram { program, a, b, c })
}
