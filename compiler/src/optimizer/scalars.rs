//! Straight-line programs over scalars in the vector unit's operations: how a step derives
//! its learning rate from the step count, and LARS its trust ratio from two norms.
//!
//! One program is both the reference (evaluated here with the functional engine's own
//! element functions) and what the lowering emits as 1×1 VPU instructions, so the device's
//! rate has the reference's bits by construction, whatever the formula.

use systolic_simulator::functional::{binary, unary};
use systolic_simulator::isa::{BinaryOp, UnaryOp};

/// A register of a [`Scalars`] program: an input, or the result of one operation.
pub type Reg = usize;

/// One operation; it writes the next register.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalarOp {
    Fill(f32),
    Unary(UnaryOp, Reg),
    Binary(BinaryOp, Reg, Reg),
}

/// Registers `0..inputs` hold the inputs; operation `i` writes register `inputs + i` (each
/// register is written once); the result is the last register.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalars {
    pub inputs: usize,
    pub ops: Vec<ScalarOp>,
    /// The register holding 1.0, once a select has filled it.
    one: Option<Reg>,
}

impl Scalars {
    pub fn new(inputs: usize) -> Scalars {
        Scalars { inputs, ops: Vec::new(), one: None }
    }

    fn push(&mut self, op: ScalarOp) -> Reg {
        self.ops.push(op);
        self.inputs + self.ops.len() - 1
    }

    pub fn fill(&mut self, value: f32) -> Reg {
        self.push(ScalarOp::Fill(value))
    }

    pub fn unary(&mut self, op: UnaryOp, x: Reg) -> Reg {
        self.push(ScalarOp::Unary(op, x))
    }

    pub fn binary(&mut self, op: BinaryOp, a: Reg, b: Reg) -> Reg {
        self.push(ScalarOp::Binary(op, a, b))
    }

    /// `c - x` (as `-x + c`, which rounds the same).
    pub fn subtract_from(&mut self, c: f32, x: Reg) -> Reg {
        let n = self.unary(UnaryOp::Scale(-1.0), x);
        self.unary(UnaryOp::AddScalar(c), n)
    }

    /// A register holding 1.0 (filled once).
    pub fn one(&mut self) -> Reg {
        match self.one {
            Some(r) => r,
            None => {
                let r = self.fill(1.0);
                self.one = Some(r);
                r
            }
        }
    }

    /// `then` where `cond > 0`, else `otherwise`, exactly: the VPU has no select, but masks
    /// give each value or 0, and adding 0 changes nothing.
    pub fn select(&mut self, cond: Reg, then: Reg, otherwise: Reg) -> Reg {
        let one = self.one();
        let taken = self.binary(BinaryOp::MaskPositive, cond, then);
        let is = self.binary(BinaryOp::MaskPositive, cond, one);
        let is_not = self.subtract_from(1.0, is);
        let left = self.binary(BinaryOp::MaskPositive, is_not, otherwise);
        self.binary(BinaryOp::Add, taken, left)
    }

    /// The register holding the result.
    pub fn result(&self) -> Reg {
        (self.inputs + self.ops.len()).saturating_sub(1)
    }

    /// The result for `inputs` (one value per input register).
    pub fn eval(&self, inputs: &[f32]) -> f32 {
        assert_eq!(inputs.len(), self.inputs, "a scalar program's inputs");
        let mut regs = inputs.to_vec();
        for op in &self.ops {
            let v = match *op {
                ScalarOp::Fill(v) => v,
                ScalarOp::Unary(op, x) => unary(op, regs[x]),
                ScalarOp::Binary(op, a, b) => binary(op, regs[a], regs[b]),
            };
            regs.push(v);
        }
        regs[self.result()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_takes_either_value_exactly() {
        let mut s = Scalars::new(3);
        s.select(0, 1, 2);
        let (a, b) = (0.1f32 + 0.2, f32::MAX);
        assert_eq!(s.eval(&[1.0, a, b]), a);
        assert_eq!(s.eval(&[0.0, a, b]), b);
        assert_eq!(s.eval(&[-3.0, a, b]), b);
        assert_eq!(s.eval(&[1e-30, f32::INFINITY, b]), f32::INFINITY);
    }
}
