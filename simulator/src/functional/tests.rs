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

/// A DMA between tiles of one type moves bytes as they are (docs/isa.md): a bf16 signalling
/// NaN stays signalling within a memory and between memories; a conversion quiets it.
#[test]
fn same_type_dmas_move_bytes_and_conversions_round() {
    let machine = presets::preset("v2-8").unwrap();
    let snan: u16 = 0x7F81; // bf16 signalling NaN (quiet bit clear, payload 1)
    let tile = |space, offset, dtype| Tile { space, offset, rows: 1, cols: 1, stride: 1, dtype };
    for views in [true, false] {
        let mut f = Functional::new(&machine);
        f.views = views;
        f.hbm.bytes = snan.to_le_bytes().to_vec();
        let (src, within, across) =
            (tile(Space::Hbm, 0, DType::Bf16), tile(Space::Hbm, 64, DType::Bf16), tile(Space::Vmem, 0, DType::Bf16));
        let wide = tile(Space::Vmem, 64, DType::F32);
        for dst in [within, across, wide] {
            f.execute(&Operation::Dma { engine: 0, src, dst, repeat: None }).unwrap();
        }
        assert_eq!(f.hbm.bytes[64..66], snan.to_le_bytes(), "views {views}: within HBM");
        assert_eq!(f.vmem.bytes[0..2], snan.to_le_bytes(), "views {views}: HBM to VMEM");
        // Widened to f32 exactly: the same NaN, its payload in the upper half.
        assert_eq!(f.vmem.bytes[64..68], ((snan as u32) << 16).to_le_bytes(), "views {views}: widened");
    }
}

/// Tiles large enough for the parallel pieces of the views (DMA rows, VPU rows), and operand
/// bytes that are not aligned for f32 (the byte-wise fallbacks): the same bytes as the copies.
#[test]
fn large_and_misaligned_tiles_give_the_bits_of_decoded_copies() {
    let machine = presets::preset("v2-8").unwrap();
    let mut g = Gen(11);
    let (rows, cols) = (300, 260); // 78,000 elements: above every parallel threshold
    let region = |g: &mut Gen| (0..4 * rows * (cols + 8) * 3).map(|_| g.next() as u8).collect::<Vec<u8>>();
    let big = |space, offset, dtype, stride| Tile { space, offset, rows, cols, stride, dtype };
    let span = (rows * (cols + 8) * 4) as u64;
    let ops = [
        Operation::Dma {
            engine: 0,
            src: big(Space::Hbm, 0, DType::Bf16, cols + 3),
            dst: big(Space::Vmem, 8, DType::F32, cols + 8),
            repeat: None,
        },
        Operation::Dma {
            engine: 0,
            src: big(Space::Vmem, 0, DType::F32, cols),
            dst: big(Space::Hbm, 2, DType::Bf16, cols + 1),
            repeat: None,
        },
        Operation::Unary {
            op: UnaryOp::Relu,
            src: big(Space::Vmem, 0, DType::F32, cols + 2),
            dst: big(Space::Vmem, span, DType::F32, cols + 5),
        },
        Operation::Binary {
            op: BinaryOp::Mul,
            a: big(Space::Vmem, 0, DType::F32, cols + 4),
            b: Tile { rows: 1, ..big(Space::Vmem, span, DType::F32, cols) },
            dst: big(Space::Vmem, 0, DType::F32, cols + 4),
        },
    ];
    for op in ops {
        let (hbm, vmem) = (region(&mut g), region(&mut g));
        let mut engines = [true, false].map(|views| {
            let mut f = Functional::new(&machine);
            (f.hbm.bytes, f.vmem.bytes, f.views) = (hbm.clone(), vmem.clone(), views);
            f
        });
        let mut program = Program::new("large");
        program.push(op.clone(), &[]);
        program.validate(&machine).unwrap();
        for f in &mut engines {
            f.execute(&op).unwrap();
        }
        assert!(
            engines[0].hbm.bytes == engines[1].hbm.bytes && engines[0].vmem.bytes == engines[1].vmem.bytes,
            "{op:?}"
        );
    }
    // Rows decoded from bytes that start off f32 alignment: the byte-wise paths.
    let bytes: Vec<u8> = (0..4 * 64 + 1).map(|_| g.next() as u8).collect();
    let (odd, tile) = (&bytes[1..], Tile::new(Space::Hbm, 0, 8, 8, DType::F32));
    let mut by_bytes = [0u8; 2 * 64 + 1];
    assert!(memory::transfer(odd, &mut by_bytes[1..], &tile, &Tile { dtype: DType::Bf16, ..tile }));
    let values: Vec<f32> = odd.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let rounded: Vec<u8> = values.iter().flat_map(|&v| crate::numerics::bf16_bits(v).to_le_bytes()).collect();
    assert_eq!(by_bytes[1..], rounded[..]);
    let mut decoded = vec![0f32; 64];
    memory::elements(DType::F32, odd).decode(0, &mut decoded);
    assert_eq!(
        decoded.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}
