//! The views (instructions working on the memories' bytes where they lie) against the decoded
//! copies they replace: random single instructions — strided and sliding-window tiles,
//! broadcasts, in place or apart, f32 and bf16, DMAs between and within memories, repeated
//! DMAs, matmuls at every precision — on random bytes (NaNs, infinities and subnormals
//! among them); both engines' memories must be equal byte for byte afterwards.

use super::*;
use crate::config::presets;
use crate::numerics::Precision;

/// Bytes of each memory the cases use (tiles may reach a little past it).
const REGION: u64 = 2048;

/// A small deterministic generator (SplitMix64 steps).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        crate::rng::mix64(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below((hi - lo + 1) as u64) as u32
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn dtype(&mut self) -> DType {
        if self.one_in(3) { DType::Bf16 } else { DType::F32 }
    }

    /// A `rows × cols` tile somewhere in the region, of `dtype` or either type; a read tile
    /// may slide (stride < cols).
    fn tile(&mut self, space: Space, rows: u32, cols: u32, dtype: Option<DType>, written: bool) -> Tile {
        let dtype = dtype.unwrap_or_else(|| self.dtype());
        let stride = if !written && self.one_in(5) { self.range(1, cols) } else { cols + self.range(0, 2) };
        let offset = self.below(REGION / dtype.size()) * dtype.size();
        Tile { space, offset, rows, cols, stride, dtype }
    }

    fn space(&mut self) -> Space {
        if self.one_in(2) { Space::Hbm } else { Space::Vmem }
    }
}

fn operation(g: &mut Gen) -> Operation {
    let (rows, cols) = (g.range(1, 9), g.range(1, 12));
    let vmem = Space::Vmem;
    match g.below(5) {
        0 => {
            let (s, d) = (g.space(), g.space());
            let src = g.tile(s, rows, cols, None, false);
            let dst = g.tile(d, rows, cols, None, true);
            let repeat = g.one_in(3).then(|| Repeat {
                count: g.range(1, 3),
                src_step: g.below(64) * 4,
                dst_step: g.below(64) * 4,
            });
            Operation::Dma { engine: 0, src, dst, repeat }
        }
        1 => {
            let (m, k, n) =
                (g.range(1, 20), if g.one_in(4) { g.range(120, 300) } else { g.range(1, 40) }, g.range(1, 40));
            let lhs = g.tile(vmem, m, k, None, false);
            let rhs = g.tile(vmem, k, n, None, false);
            let out = g.tile(vmem, m, n, Some(DType::F32), true);
            let precision = [Precision::Default, Precision::High, Precision::Highest][g.below(3) as usize];
            Operation::MatMul { mxu: 0, lhs, rhs, out, accumulate: g.one_in(2), precision }
        }
        2 => {
            let ops = [
                UnaryOp::Copy,
                UnaryOp::Relu,
                UnaryOp::Relu6,
                UnaryOp::Neg,
                UnaryOp::Exp,
                UnaryOp::Sqrt,
                UnaryOp::Reciprocal,
                UnaryOp::Scale(0.37),
                UnaryOp::AddScalar(-1.5),
            ];
            let src = g.tile(vmem, rows, cols, None, false);
            let dst = if g.one_in(3) {
                Tile { stride: src.stride.max(cols), ..src }
            } else {
                g.tile(vmem, rows, cols, None, true)
            };
            Operation::Unary { op: ops[g.below(ops.len() as u64) as usize], src, dst }
        }
        3 => {
            let ops = [
                BinaryOp::Add,
                BinaryOp::Sub,
                BinaryOp::Mul,
                BinaryOp::Max,
                BinaryOp::MaskPositive,
                BinaryOp::MaskRelu6,
            ];
            let a = g.tile(vmem, rows, cols, None, false);
            let dst = if g.one_in(2) {
                Tile { stride: a.stride.max(cols), ..a }
            } else {
                g.tile(vmem, rows, cols, None, true)
            };
            let b = match g.below(4) {
                0 => g.tile(vmem, 1, cols, None, false),
                1 => g.tile(vmem, rows, 1, None, false),
                2 => dst,
                _ => g.tile(vmem, rows, cols, None, false),
            };
            Operation::Binary { op: ops[g.below(ops.len() as u64) as usize], a, b, dst }
        }
        _ => {
            let value = [0.0, -0.0, 1.5, -3.25e-39, f32::INFINITY, 6.0e4][g.below(6) as usize];
            Operation::Fill { dst: g.tile(vmem, rows, cols, None, true), value }
        }
    }
}

/// Memories' bytes, zero-extended to `len` (bytes never written read as zero).
fn padded(m: &Memory, len: usize) -> Vec<u8> {
    let mut b = m.bytes.clone();
    b.resize(len.max(b.len()), 0);
    b
}

#[test]
fn views_give_the_bits_of_decoded_copies() {
    let machine = presets::preset("v2-8").unwrap();
    let mut g = Gen(7);
    let mut ran = std::collections::BTreeMap::<&str, u32>::new();
    for case in 0..6000 {
        let op = operation(&mut g);
        let mut program = Program::new("case");
        program.push(op.clone(), &[]);
        if program.validate(&machine).is_err() {
            continue;
        }
        let bytes = |g: &mut Gen| (0..REGION as usize + 512).map(|_| g.next() as u8).collect::<Vec<u8>>();
        let (hbm, vmem) = (bytes(&mut g), bytes(&mut g));
        let mut engines = [true, false].map(|views| {
            let mut f = Functional::new(&machine);
            (f.hbm.bytes, f.vmem.bytes, f.views) = (hbm.clone(), vmem.clone(), views);
            f
        });
        let results = engines.each_mut().map(|f| f.execute(&op));
        assert_eq!(results[0], results[1], "case {case}: {op:?}");
        let [fast, copies] = &engines;
        for (name, a, b) in [("HBM", &fast.hbm, &copies.hbm), ("VMEM", &fast.vmem, &copies.vmem)] {
            let len = a.bytes.len().max(b.bytes.len());
            assert!(padded(a, len) == padded(b, len), "case {case}: {name} differs after {op:?}");
        }
        *ran.entry(op.name()).or_default() += 1;
    }
    // Every kind ran often enough for the test to mean something.
    for kind in ["dma", "matmul", "unary", "binary", "fill"] {
        assert!(ran.get(kind).copied().unwrap_or(0) >= 100, "only {ran:?} cases were valid programs");
    }
}
