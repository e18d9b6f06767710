//! A memory space's bytes, and the ways instructions reach them: decoded copies
//! ([`Memory::read`], [`Memory::write`]) for the general case, and views of the bytes where
//! they lie ([`Memory::views`], [`transfer`]) for the common one, so a DMA, a VPU operation or
//! a matmul moves each element once instead of through a decoded vector. Both give the same
//! bits: a view decodes and encodes exactly as `read` and `write` do.

use std::ops::Range;

use crate::isa::{DType, Tile};
use crate::mxu::kernel::Elements;
use crate::numerics::bf16_bits;

/// One memory space's bytes (f32 or bf16 elements, little-endian).
#[derive(Clone, Debug, Default)]
pub(super) struct Memory {
    pub(super) bytes: Vec<u8>,
}

/// The bytes a tile spans, from its first element to the end of its last row.
pub(super) fn span(t: &Tile) -> Range<usize> {
    let (start, end) = t.span();
    start as usize..end as usize
}

/// Byte range of row `r` of `t`.
fn row(t: &Tile, r: usize) -> Range<usize> {
    let size = t.dtype.size() as usize;
    let start = t.offset as usize + r * t.stride as usize * size;
    start..start + t.cols as usize * size
}

/// A memory's bytes read as elements of `dtype` (f32 values in place where aligned).
pub(super) fn elements(dtype: DType, bytes: &[u8]) -> Elements<'_> {
    match dtype {
        DType::F32 => as_f32(bytes).map_or(Elements::F32Bytes(bytes), Elements::F32),
        DType::Bf16 => Elements::Bf16Bytes(bytes),
    }
}

/// A view's source: a tile apart from the destination, or the destination itself (read in
/// place).
pub(super) enum Source<'m> {
    Apart(&'m [u8]),
    InPlace,
}

impl<'m> Source<'m> {
    /// The values of f32 tile `t` this source gives: `Some(None)` when they are already in
    /// the destination, `Some(Some(values))` when apart, `None` when the tile has no f32 view.
    pub(super) fn f32s(self, t: &Tile) -> Option<Option<&'m [f32]>> {
        match self {
            Source::InPlace => Some(None),
            Source::Apart(bytes) => f32s(t, bytes).map(Some),
        }
    }
}

impl Memory {
    /// Grows the memory to `end` bytes; bytes never written read as zero.
    pub(super) fn ensure(&mut self, end: u64) {
        if self.bytes.len() < end as usize {
            self.bytes.resize(end as usize, 0);
        }
    }

    /// Reads a tile as row-major f32 values.
    pub(super) fn read(&self, t: &Tile) -> Vec<f32> {
        let (cols, size) = (t.cols as usize, t.dtype.size() as usize);
        let mut out = vec![0f32; t.elements() as usize];
        for (r, values) in out.chunks_exact_mut(cols).enumerate() {
            let bytes = row(t, r);
            // Bytes never written read as zero (memory grows on demand).
            let have = self.bytes.len().saturating_sub(bytes.start).min(cols * size) / size;
            if have > 0 {
                elements(t.dtype, &self.bytes[bytes.start..bytes.start + have * size]).decode(0, &mut values[..have]);
            }
        }
        out
    }

    /// Stores row-major `values` into a tile (rounded to bf16 for bf16 tiles).
    pub(super) fn write(&mut self, t: &Tile, values: &[f32]) {
        self.ensure(t.span().1);
        for (r, values) in values.chunks_exact(t.cols as usize).enumerate().take(t.rows as usize) {
            encode(values, &mut self.bytes[row(t, r)], t.dtype);
        }
    }

    /// `dst`'s bytes, mutable, beside each source's, shared — when every source lies apart
    /// from `dst` or is `dst` itself ([`Source::InPlace`]). `None` when a source overlaps `dst`
    /// otherwise (the caller then copies). Grows the memory over all the tiles first.
    pub(super) fn views<const N: usize>(
        &mut self,
        dst: &Tile,
        sources: [&Tile; N],
    ) -> Option<(&mut [u8], [Source<'_>; N])> {
        let d = span(dst);
        let overlaps = |s: &Range<usize>| s.start < d.end && d.start < s.end;
        if sources.iter().any(|s| *s != dst && overlaps(&span(s))) {
            return None;
        }
        self.ensure(sources.iter().chain([&dst]).map(|t| t.span().1).max().unwrap_or(0));
        let (before, rest) = self.bytes.split_at_mut(d.start);
        let (region, after) = rest.split_at_mut(d.len());
        let (before, after) = (&*before, &*after);
        let views = sources.map(|s| {
            if s == dst {
                return Source::InPlace;
            }
            let r = span(s);
            Source::Apart(if r.end <= d.start { &before[r] } else { &after[r.start - d.end..r.end - d.end] })
        });
        Some((region, views))
    }
}

/// `values` into one row's bytes in `dtype` (f32 rounded to bf16 for bf16 rows).
fn encode(values: &[f32], bytes: &mut [u8], dtype: DType) {
    match dtype {
        DType::F32 => bytes.chunks_exact_mut(4).zip(values).for_each(|(b, v)| b.copy_from_slice(&v.to_le_bytes())),
        DType::Bf16 => {
            bytes.chunks_exact_mut(2).zip(values).for_each(|(b, &v)| b.copy_from_slice(&bf16_bits(v).to_le_bytes()))
        }
    }
}

/// The values of f32 tile `t` from its span's bytes (`(rows - 1) · stride + cols` values, row
/// `r` at `r · stride`): `None` for a bf16 tile, on a big-endian host, or when the bytes are
/// not aligned for f32.
pub(super) fn f32s<'m>(t: &Tile, bytes: &'m [u8]) -> Option<&'m [f32]> {
    (t.dtype == DType::F32).then(|| as_f32(bytes)).flatten()
}

/// [`f32s`], mutable.
pub(super) fn f32s_mut<'m>(t: &Tile, bytes: &'m mut [u8]) -> Option<&'m mut [f32]> {
    (t.dtype == DType::F32).then(|| as_f32_mut(bytes)).flatten()
}

/// Bytes as f32 values, whatever the tile's type: see [`f32s`].
fn as_f32(bytes: &[u8]) -> Option<&[f32]> {
    cfg!(target_endian = "little").then(|| bytemuck::try_cast_slice(bytes).ok()).flatten()
}

fn as_f32_mut(bytes: &mut [u8]) -> Option<&mut [f32]> {
    cfg!(target_endian = "little").then(|| bytemuck::try_cast_slice_mut(bytes).ok()).flatten()
}

/// Destination units per parallel piece of a transfer (elements, or bytes on the byte-wise
/// paths): smaller transfers run on one thread.
const TRANSFER_PIECE: usize = 1 << 16;

/// A DMA from `src` (in `src_mem`) to `dst` (in `dst_mem`, a different memory or a tile apart
/// from `src`), row by row: bytes as they are between tiles of one type, bf16 widened to f32
/// exactly, f32 rounded to bf16 as [`Memory::write`] rounds — what reading then writing
/// gives, with no vector between, large ones in pieces of rows on every thread. False, with
/// nothing done, when the source's bytes do not all exist yet (the caller's read then
/// supplies the zeros).
pub(super) fn transfer(src_mem: &[u8], dst_mem: &mut [u8], src: &Tile, dst: &Tile) -> bool {
    let (s, d) = (span(src), span(dst));
    if s.end > src_mem.len() || d.end > dst_mem.len() {
        return false;
    }
    let (from, to) = (&src_mem[s], &mut dst_mem[d]);
    let shape = |t: &Tile, unit: usize| (t.cols as usize * unit, t.stride as usize * unit);
    let rows = src.rows as usize;
    match (src.dtype, dst.dtype) {
        (a, b) if a == b => {
            let size = a.size() as usize;
            by_rows(from, shape(src, size), to, shape(dst, size), rows, |f, t| t.copy_from_slice(f));
        }
        (DType::Bf16, DType::F32) => {
            let wide = |h: u16| f32::from_bits((h as u32) << 16);
            match (as_u16(from), as_f32_mut(to)) {
                (Some(f), Some(t)) => by_rows(f, shape(src, 1), t, shape(dst, 1), rows, |f, t| {
                    t.iter_mut().zip(f).for_each(|(d, &h)| *d = wide(h))
                }),
                _ => by_rows(from, shape(src, 2), to, shape(dst, 4), rows, |f, t| {
                    let pairs = t.chunks_exact_mut(4).zip(f.chunks_exact(2));
                    pairs.for_each(|(d, h)| d.copy_from_slice(&wide(u16::from_le_bytes([h[0], h[1]])).to_le_bytes()))
                }),
            }
        }
        (DType::F32, DType::Bf16) => match (as_f32(from), as_u16_mut(to)) {
            (Some(f), Some(t)) => by_rows(f, shape(src, 1), t, shape(dst, 1), rows, |f, t| {
                t.iter_mut().zip(f).for_each(|(d, &v)| *d = bf16_bits(v))
            }),
            _ => by_rows(from, shape(src, 4), to, shape(dst, 2), rows, |f, t| {
                let values: Vec<f32> =
                    f.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                encode(&values, t, DType::Bf16)
            }),
        },
        _ => unreachable!("two element types"),
    }
    true
}

/// `f(source row, destination row)` for `rows` rows of spans given as (row length, stride)
/// in units of their slices; large spans in pieces of whole rows on every thread (each row
/// written once, so the bits do not depend on the split).
fn by_rows<S: Sync, D: Send>(
    from: &[S],
    (from_len, from_stride): (usize, usize),
    to: &mut [D],
    (to_len, to_stride): (usize, usize),
    rows: usize,
    f: impl Fn(&[S], &mut [D]) + Sync,
) {
    use rayon::prelude::*;
    let per_piece = (TRANSFER_PIECE / to_len.max(1)).max(1);
    let piece = |(p, chunk): (usize, &mut [D])| {
        for (i, row) in chunk.chunks_mut(to_stride).enumerate() {
            f(&from[(p * per_piece + i) * from_stride..][..from_len], &mut row[..to_len]);
        }
    };
    if rows > per_piece {
        to.par_chunks_mut(per_piece * to_stride).enumerate().for_each(piece);
    } else {
        piece((0, to));
    }
}

fn as_u16(bytes: &[u8]) -> Option<&[u16]> {
    cfg!(target_endian = "little").then(|| bytemuck::try_cast_slice(bytes).ok()).flatten()
}

fn as_u16_mut(bytes: &mut [u8]) -> Option<&mut [u16]> {
    cfg!(target_endian = "little").then(|| bytemuck::try_cast_slice_mut(bytes).ok()).flatten()
}
