//! A convolution as the lowering lays it out: the padded input staged in VMEM, output rows
//! streamed over the padded width, and the blocks of output rows a kernel works through.
//!
//! The reference's [`crate::reference::conv::ConvGeom`] describes the same convolution for
//! loops over NHWC arrays; both take padding and output size from
//! [`crate::graph::Conv2d::window`], so they cannot disagree on the geometry itself.

use systolic_simulator::isa::{DType, Space, Tile};

use crate::graph::Conv2d;

/// A convolution's geometry. `h` and `w` are the rows and columns the windows slide over: the
/// stored input's, or with input dilation `xs > 1` (the gradient of a strided convolution) the
/// virtual input with `xs − 1` zeros between stored pixels; `xh × xw` is what is stored.
pub(crate) struct ConvLayout {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub co: usize,
    pub groups: usize,
    /// Strides along rows and columns.
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
    pub hp: usize,
    /// Staged pixels per padded row: the padded width, rounded up so that `sw` divides
    /// `sh · wp` (then the output rows stream at one stride, see `wv`).
    pub wp: usize,
    /// Streamed (virtual) output rows per output image row: `sh · wp / sw` (= `wp` for equal
    /// strides). Output `(oh, ow)` is streamed row `oh · wv + ow`, and reads staged pixel
    /// `(oh · wv + ow) · sw = oh · sh · wp + ow · sw`, so one row stride serves every tap.
    pub wv: usize,
    /// Input dilation along rows and columns (zeros between stored pixels plus one).
    pub xsh: usize,
    pub xsw: usize,
    pub xh: usize,
    pub xw: usize,
    /// The window of the `oh × ow` output that the output tensor holds: rows `crop[0]..` and
    /// columns `crop[1]..` of `out_hw` (all of it but for a transposed convolution whose
    /// forward padding exceeded its kernel's reach).
    pub crop: [usize; 2],
    pub out_hw: [usize; 2],
    /// Staged by stride phase (space-to-depth, see [`ConvLayout::phased`]): each of the
    /// `sh × sw` phases of the padded input is a dense sub-image `wv` pixels wide.
    pub phases: bool,
}

impl ConvLayout {
    /// The geometry of a convolution of `x` `[n, h, w, c]` with a `[kh, kw, c/groups, co]`
    /// kernel.
    pub(crate) fn new(attrs: &Conv2d, x: &[usize], kernel: &[usize]) -> ConvLayout {
        let [n, h, w, c] = [x[0], x[1], x[2], x[3]];
        let [kh, kw, _, co] = [kernel[0], kernel[1], kernel[2], kernel[3]];
        let [sh, sw] = attrs.strides;
        let win = attrs.window([h, w], [kh, kw]).expect("checked when the node was added");
        let mut wp = w + win.pad_left + win.pad_right;
        while !(sh * wp).is_multiple_of(sw) {
            wp += 1;
        }
        ConvLayout {
            n,
            h,
            w,
            c,
            kh,
            kw,
            co,
            groups: attrs.groups,
            sh,
            sw,
            dh: attrs.dilation[0],
            dw: attrs.dilation[1],
            pt: win.pad_top,
            pl: win.pad_left,
            oh: win.out_h,
            ow: win.out_w,
            hp: h + win.pad_top + win.pad_bottom,
            wp,
            wv: sh * wp / sw,
            xsh: 1,
            xsw: 1,
            xh: h,
            xw: w,
            crop: [0, 0],
            out_hw: [win.out_h, win.out_w],
            phases: false,
        }
    }

    /// The geometry staged by stride phase: phase `(pr, pc)` holds padded pixels
    /// `(sh·i + pr, sw·j + pc)` as a dense image of `wv = ⌈wp / sw⌉` pixels per row, and tap
    /// (ki, kj) reads phase `(ki·dh mod sh, kj·dw mod sw)` from `(ki·dh div sh, kj·dw div sw)`
    /// with unit stride, so output rows stream over a phase's width instead of `sh·wp/sw`.
    pub(crate) fn phased(self) -> ConvLayout {
        ConvLayout { wv: self.wp.div_ceil(self.sw), phases: true, ..self }
    }

    /// Whether staging by phase streams fewer rows than the strided layout: a stride above 1
    /// and a stored (not dilated) input.
    pub(crate) fn phases_pay(&self) -> bool {
        !self.phases
            && self.xsh == 1
            && self.xsw == 1
            && (self.sh > 1 || self.sw > 1)
            && self.wp.div_ceil(self.sw) < self.wv
    }

    /// Pixels of a staging buffer of `stage_rows` rows (padded rows, or each phase's rows).
    pub(crate) fn stage_pixels(&self, stage_rows: usize) -> usize {
        if self.phases { self.sh * self.sw * stage_rows * self.wv } else { stage_rows * self.wp }
    }

    /// The phases of rows and of columns some tap reads (the others are never staged).
    pub(crate) fn phase_read(&self, pr: usize, pc: usize) -> bool {
        (0..self.kh).any(|i| (i * self.dh) % self.sh == pr) && (0..self.kw).any(|j| (j * self.dw) % self.sw == pc)
    }

    /// The geometry over `x` dilated by `[xsh, xsw]` (zeros between stored pixels), for the
    /// transposed convolution of a strided one.
    pub(crate) fn dilated(attrs: &Conv2d, x: &[usize], kernel: &[usize], [xsh, xsw]: [usize; 2]) -> ConvLayout {
        let virt = [x[0], (x[1] - 1) * xsh + 1, (x[2] - 1) * xsw + 1, x[3]];
        let g = ConvLayout::new(attrs, &virt, kernel);
        ConvLayout { xsh, xsw, xh: x[1], xw: x[2], ..g }
    }

    /// Rows per image slot and per block, and the blocks themselves, for a block size of
    /// about `target` streamed rows: whole images when one fits, else bands of output rows.
    pub(crate) fn blocks(&self, target: usize) -> PixelBlocks {
        let per_image = self.hv() * self.wv;
        if per_image <= target {
            let imgs = (target / per_image).clamp(1, self.n);
            let blocks = (0..self.n)
                .step_by(imgs)
                .map(|n0| Block { n0, images: imgs.min(self.n - n0), oh0: 0, bh: self.oh })
                .collect();
            PixelBlocks {
                blocks,
                m_rows: imgs * per_image,
                stage_rows: if self.phases {
                    imgs * self.hv() + self.phase_halo()
                } else {
                    imgs * self.sh * self.hv() + self.halo()
                },
                whole: true,
            }
        } else {
            let bh = (target / self.wv).clamp(1, self.oh);
            let blocks = (0..self.n)
                .flat_map(|n0| {
                    (0..self.oh).step_by(bh).map(move |oh0| Block { n0, images: 1, oh0, bh: bh.min(self.oh - oh0) })
                })
                .collect();
            let stage_rows = if self.phases { bh + self.phase_halo() } else { self.sh * bh + self.halo() };
            PixelBlocks { blocks, m_rows: bh * self.wv, stage_rows, whole: false }
        }
    }

    /// Streamed rows of block `b`.
    pub(crate) fn block_rows(&self, b: &Block, whole: bool) -> usize {
        if whole { b.images * self.hv() * self.wv } else { b.bh * self.wv }
    }

    /// The staged pixels tap (i, j) reads for `rows` output rows: channels `ch0..ch0+chs` of
    /// `stage` (the whole staging buffer), one pixel every `sw` — or, staged by phase, every
    /// pixel of the tap's phase from its offset.
    pub(crate) fn tap_view(&self, stage: Tile, i: usize, j: usize, ch0: usize, chs: usize, rows: usize) -> Tile {
        let (pixel, step) = if self.phases {
            let ((ai, pr), (aj, pc)) =
                ((i * self.dh / self.sh, i * self.dh % self.sh), (j * self.dw / self.sw, j * self.dw % self.sw));
            let len = stage.rows as usize / (self.sh * self.sw);
            ((pr * self.sw + pc) * len + ai * self.wv + aj, 1)
        } else {
            (i * self.dh * self.wp + j * self.dw, self.sw)
        };
        Tile {
            space: Space::Vmem,
            offset: stage.offset + ((pixel * self.c + ch0) * 4) as u64,
            rows: rows as u32,
            cols: chs as u32,
            stride: (step * self.c) as u32,
            dtype: DType::F32,
        }
    }

    /// Where tap (i, j) reads a phased layout: its phase of rows and of columns, and its
    /// offset in rows and columns of that phase.
    pub(crate) fn phase_of(&self, i: usize, j: usize) -> [usize; 4] {
        let (a, b) = (i * self.dh, j * self.dw);
        [a % self.sh, b % self.sw, a / self.sh, b / self.sw]
    }

    /// The taps in the order of their im2col columns: row by row, or, staged by phase, by
    /// phase then offset, so the taps of one phase row are consecutive columns (one copy)
    /// whose weights load in the same order.
    pub(crate) fn im2col_taps(&self) -> Vec<(usize, usize)> {
        let mut taps: Vec<(usize, usize)> = (0..self.kh).flat_map(|i| (0..self.kw).map(move |j| (i, j))).collect();
        if self.phases {
            taps.sort_by_key(|&(i, j)| self.phase_of(i, j));
        }
        taps
    }

    /// Whether band `b`'s valid outputs read padding rows (which an earlier band of the same
    /// buffer may have filled with data), or stored rows land where another band left zeros.
    pub(crate) fn band_needs_fill(&self, b: &Block) -> bool {
        self.xsh > 1
            || self.xsw > 1
            || b.oh0 * self.sh < self.pt
            || (b.oh0 + b.bh - 1) * self.sh + (self.kh - 1) * self.dh >= self.pt + self.h
    }

    pub(crate) fn cog(&self) -> usize {
        self.co / self.groups
    }
    /// One input and one output channel per group (kernel `[kh, kw, cg = 1, co]`): the VPU's.
    /// A depth multiplier above 1 is a grouped convolution on the MXU with K = 1.
    pub(crate) fn depthwise(&self, cg: usize) -> bool {
        self.groups > 1 && cg == 1 && self.cog() == 1
    }
    /// Whether folding the taps into K (im2col) needs fewer `array_rows`-deep passes than one
    /// shallow matmul per tap (the 3-channel first layer).
    pub(crate) fn im2col_pays(&self, cg: usize, array_rows: usize) -> bool {
        self.groups == 1
            && self.taps() > 1
            && (self.taps() * cg).div_ceil(array_rows) < self.taps() * cg.div_ceil(array_rows)
    }
    pub(crate) fn taps(&self) -> usize {
        self.kh * self.kw
    }
    /// Output rows per image slot: the slot holds `sh · hv ≥ hp` padded rows.
    pub(crate) fn hv(&self) -> usize {
        self.hp.div_ceil(self.sh)
    }
    /// Padded rows past the last streamed row that taps can reach.
    pub(crate) fn halo(&self) -> usize {
        (self.kh - 1) * self.dh + 2
    }
    /// Rows of each phase past the last streamed row that taps can reach.
    pub(crate) fn phase_halo(&self) -> usize {
        (self.kh - 1) * self.dh / self.sh + 2
    }
}

/// How a convolution's output rows are cut into blocks (see [`ConvLayout::blocks`]).
pub(crate) struct PixelBlocks {
    pub blocks: Vec<Block>,
    /// Streamed rows of a full block (rows over the padded width).
    pub m_rows: usize,
    /// Padded input rows a block stages.
    pub stage_rows: usize,
    pub whole: bool,
}

/// A block of output rows: `images` whole images from `n0`, or one band of image `n0`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub n0: usize,
    pub images: usize,
    pub oh0: usize,
    pub bh: usize,
}
