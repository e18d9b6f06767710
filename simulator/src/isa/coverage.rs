//! Which bytes of an earlier access later writes have overwritten: lets the validator forget
//! accesses whose every byte has been rewritten by writes ordered after them (any later access
//! that meets the old one then meets one of those writes, and is checked against it).
//!
//! The bytes of a tile are kept in the tile's own frame — rows of `stride` bytes, each `width`
//! bytes wide — as a few rectangles (row range × byte-column range). Column strips written by
//! im2col copies, rows written by DMAs and whole-buffer fills all subtract exactly. A write that
//! would fragment the set further than [`MAX_RECTS`] is ignored: the set then over-approximates
//! what is uncovered, which only delays forgetting, never forgets too early.

use super::Tile;

/// Rectangles kept per access.
const MAX_RECTS: usize = 4;

/// Rows `r0..r1`, byte columns `c0..c1`, in a frame's coordinates.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rect {
    r0: u64,
    r1: u64,
    c0: u64,
    c1: u64,
}

impl Rect {
    fn is_empty(&self) -> bool {
        self.r0 >= self.r1 || self.c0 >= self.c1
    }

    fn intersect(&self, o: &Rect) -> Rect {
        Rect { r0: self.r0.max(o.r0), r1: self.r1.min(o.r1), c0: self.c0.max(o.c0), c1: self.c1.min(o.c1) }
    }
}

/// The not-yet-overwritten bytes of one tile.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Uncovered {
    /// Byte address of row 0, column 0.
    origin: u64,
    /// Bytes from one row to the next (`u64::MAX` for a single-row frame).
    pitch: u64,
    rects: [Rect; MAX_RECTS],
    len: u8,
}

impl Uncovered {
    /// All bytes of `t`. Tiles whose rows overlap (sliding-window reads) are framed as their
    /// whole span, one row.
    pub fn of(t: &Tile) -> Uncovered {
        let size = t.dtype.size();
        let (s, e) = t.span();
        let (pitch, rows, width) = if t.rows <= 1 || t.stride < t.cols {
            (u64::MAX, 1, e - s)
        } else {
            (t.stride as u64 * size, t.rows as u64, t.cols as u64 * size)
        };
        let empty = Rect { r0: 0, r1: 0, c0: 0, c1: 0 };
        let mut rects = [empty; MAX_RECTS];
        rects[0] = Rect { r0: 0, r1: rows, c0: 0, c1: width };
        Uncovered { origin: s, pitch, rects, len: 1 }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes the bytes `w` writes, where they can be expressed exactly in this frame.
    pub fn subtract(&mut self, w: &Tile) {
        let size = w.dtype.size();
        let w_pitch = w.stride as u64 * size;
        let w_width = w.cols as u64 * size;
        if w.rows <= 1 || w.stride == w.cols {
            let (s, e) = w.span();
            self.subtract_interval(s, e);
        } else if w_pitch == self.pitch && w.offset >= self.origin {
            // Same row pitch: the write is one rectangle in this frame, unless its rows wrap.
            let d = w.offset - self.origin;
            let (r0, c0) = (d / self.pitch, d % self.pitch);
            if c0 + w_width <= self.pitch {
                self.subtract_rect(Rect { r0, r1: r0 + w.rows as u64, c0, c1: c0 + w_width });
            }
        } else if w.rows <= 8 {
            for r in 0..w.rows as u64 {
                let s = w.offset + r * w_pitch;
                self.subtract_interval(s, s + w_width);
            }
        }
    }

    /// Removes the byte interval `[s, e)`: up to three rectangles in this frame (the tail of
    /// one row, whole rows, the head of another).
    fn subtract_interval(&mut self, s: u64, e: u64) {
        let (s, e) = (s.max(self.origin) - self.origin, e.saturating_sub(self.origin));
        if s >= e {
            return;
        }
        if self.pitch == u64::MAX {
            return self.subtract_rect(Rect { r0: 0, r1: 1, c0: s, c1: e });
        }
        let p = self.pitch;
        let (rs, cs) = (s / p, s % p);
        let (re, ce) = ((e - 1) / p, (e - 1) % p + 1);
        if rs == re {
            return self.subtract_rect(Rect { r0: rs, r1: rs + 1, c0: cs, c1: ce });
        }
        self.subtract_rect(Rect { r0: rs, r1: rs + 1, c0: cs, c1: p });
        self.subtract_rect(Rect { r0: rs + 1, r1: re, c0: 0, c1: p });
        self.subtract_rect(Rect { r0: re, r1: re + 1, c0: 0, c1: ce });
    }

    fn subtract_rect(&mut self, cut: Rect) {
        if cut.is_empty() {
            return;
        }
        let empty = Rect { r0: 0, r1: 0, c0: 0, c1: 0 };
        let mut out = [empty; MAX_RECTS];
        let mut n = 0;
        for p in &self.rects[..self.len as usize] {
            let i = p.intersect(&cut);
            let pieces = if i.is_empty() {
                [*p, empty, empty, empty]
            } else {
                [
                    Rect { r1: i.r0, ..*p },
                    Rect { r0: i.r1, ..*p },
                    Rect { r0: i.r0, r1: i.r1, c1: i.c0, ..*p },
                    Rect { r0: i.r0, r1: i.r1, c0: i.c1, ..*p },
                ]
            };
            for piece in pieces.into_iter().filter(|r| !r.is_empty()) {
                if n == MAX_RECTS {
                    return; // Too fragmented: keep the larger set (still sound).
                }
                out[n] = piece;
                n += 1;
            }
        }
        self.rects = out;
        self.len = n as u8;
    }

    /// Whether byte `b` is still counted as uncovered.
    #[cfg(test)]
    fn contains(&self, b: u64) -> bool {
        if b < self.origin {
            return false;
        }
        let d = b - self.origin;
        let (r, c) = if self.pitch == u64::MAX { (0, d) } else { (d / self.pitch, d % self.pitch) };
        self.rects[..self.len as usize].iter().any(|x| x.r0 <= r && r < x.r1 && x.c0 <= c && c < x.c1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::testing::{bytes, numbers};
    use crate::isa::{DType, Space};

    /// Against byte sets: every byte no write touched stays uncovered (soundness), and the
    /// common patterns (strips, rows, whole buffers) empty the set exactly.
    #[test]
    fn uncovered_bytes_match_brute_force() {
        let mut next = numbers(99);
        let mut emptied = 0;
        for _ in 0..5_000 {
            let tile = |write: bool, next: &mut dyn FnMut(u64) -> u64| {
                let dtype = if next(3) == 0 { DType::Bf16 } else { DType::F32 };
                let cols = 1 + next(8) as u32;
                let stride = if write { cols + next(4) as u32 } else { (cols + next(5) as u32).saturating_sub(2) };
                let stride = if next(3) == 0 { 8 } else { stride }.max(if write { cols } else { 0 });
                Tile { space: Space::Vmem, offset: next(48) * 4, rows: 1 + next(6) as u32, cols, stride, dtype }
            };
            let a = tile(false, &mut next);
            let mut left = bytes(&a);
            let mut u = Uncovered::of(&a);
            for _ in 0..1 + next(12) {
                let w = tile(true, &mut next);
                for b in bytes(&w) {
                    left.remove(&b);
                }
                u.subtract(&w);
                for &b in &left {
                    assert!(u.contains(b), "byte {b} of {a:?} is not overwritten but was dropped ({u:?})");
                }
            }
            if u.is_empty() {
                emptied += 1;
            }
        }
        assert!(emptied > 500, "only {emptied} of 5000 access sets were ever emptied");
    }

    #[test]
    fn column_strips_and_rows_cover_a_matrix() {
        let m = Tile { space: Space::Vmem, offset: 1024, rows: 100, cols: 36, stride: 36, dtype: DType::F32 };
        let mut u = Uncovered::of(&m);
        for tap in 0..9 {
            assert!(!u.is_empty());
            u.subtract(&m.columns(tap * 4, 4));
        }
        assert!(u.is_empty(), "nine column strips cover the im2col matrix");
        // A sliding-window read is covered by the rows written into its span.
        let window = Tile { space: Space::Vmem, offset: 0, rows: 50, cols: 64, stride: 16, dtype: DType::F32 };
        let mut u = Uncovered::of(&window);
        let (_, end) = window.span();
        for r in 0..end.div_ceil(256) {
            u.subtract(&Tile { space: Space::Vmem, offset: r * 256, rows: 1, cols: 64, stride: 64, dtype: DType::F32 });
        }
        assert!(u.is_empty());
    }
}
