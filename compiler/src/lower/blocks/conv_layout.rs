//! A convolution as the lowering lays it out: the padded input staged in VMEM, output rows
//! streamed over the padded width, and the blocks of output rows a kernel works through.
//!
//! The reference's [`crate::reference::conv::ConvGeom`] describes the same convolution for
//! loops over NHWC arrays; both take padding and output size from
//! [`crate::graph::Conv2d::window`], so they cannot disagree on the geometry itself.

use systolic_simulator::isa::{DType, Space, Tile};

use crate::graph::Conv2d;

/// A convolution's geometry: the input `h × w` the windows slide over, the kernel, strides,
/// dilation and padding, the output, and how the lowering lays the input out in VMEM.
#[derive(Clone)]
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
    pub pr: usize,
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
    /// The window of the `oh × ow` output that the output tensor holds: rows `crop[0]..` and
    /// columns `crop[1]..` of `out_hw` (all of it but for a transposed convolution whose
    /// forward padding exceeded its kernel's reach).
    pub crop: [usize; 2],
    pub out_hw: [usize; 2],
    /// Where the window lands in the output tensor (None: the tensor is the window).
    pub scatter: Option<Scatter>,
    /// Staged by stride phase (space-to-depth, see [`ConvLayout::phased`]): each of the
    /// `sh × sw` phases of the padded input is a dense sub-image `wv` pixels wide.
    pub phases: bool,
    /// Staged as the im2col matrix itself, gathered from HBM (see [`ConvLayout::gathered`]).
    pub gathered: bool,
    /// Images side by side in each staged row (see [`ConvLayout::packed`]); 0: one image a slot.
    pub packed: usize,
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
            pr: win.pad_right,
            oh: win.out_h,
            ow: win.out_w,
            hp: h + win.pad_top + win.pad_bottom,
            wp,
            wv: sh * wp / sw,
            crop: [0, 0],
            out_hw: [win.out_h, win.out_w],
            scatter: None,
            phases: false,
            gathered: false,
            packed: 0,
        }
    }

    /// The geometry staged by stride phase: phase `(pr, pc)` holds padded pixels
    /// `(sh·i + pr, sw·j + pc)` as a dense image of `wv = ⌈wp / sw⌉` pixels per row, and tap
    /// (ki, kj) reads phase `(ki·dh mod sh, kj·dw mod sw)` from `(ki·dh div sh, kj·dw div sw)`
    /// with unit stride, so output rows stream over a phase's width instead of `sh·wp/sw`.
    pub(crate) fn phased(self) -> ConvLayout {
        ConvLayout { wv: self.wp.div_ceil(self.sw), phases: true, ..self }
    }

    /// The geometry staged as its im2col matrix: one row per output pixel (`wv = ow`,
    /// `hv = oh`: no padded-width rows), columns (tap, channel) in tap order, gathered from HBM
    /// by one strided DMA per image and tap with zeros where a window reaches the padding. On
    /// small maps the padded width and height are most of the rows a shifted layout streams
    /// (a 7×7 map padded to 9×9: 81 rows for 49 outputs); gathered, every streamed row is an
    /// output, for `taps` times the input's HBM reads.
    pub(crate) fn gathered(self) -> ConvLayout {
        ConvLayout { wv: self.ow, gathered: true, ..self }
    }

    /// Whether the gathered layout pays for a convolution with `cg` input channels per group
    /// on an `array_rows`-deep MXU: ungrouped, several taps; a block of whole
    /// output rows at least `array_rows` long fits `buffers` times in half of `vmem_bytes`;
    /// and it streams at least 10% fewer row-passes than the best of shifted matmuls and
    /// im2col over the padded width (or over the stride phases, where those pay).
    pub(crate) fn gather_pays(&self, cg: usize, array_rows: usize, buffers: usize, vmem_bytes: u64) -> bool {
        if self.groups != 1 || self.taps() < 2 || self.phases || self.gathered {
            return false;
        }
        let padded_rows = self.hv() * if self.phases_pay() { self.wp.div_ceil(self.sw) } else { self.wv };
        let folded = (self.taps() * cg).div_ceil(array_rows);
        let current = (self.taps() * cg.div_ceil(array_rows)).min(folded) * padded_rows;
        let gathered = folded * self.oh * self.ow;
        let block_rows = array_rows.div_ceil(self.ow).min(self.oh) * self.ow;
        let matrix = (block_rows * self.taps() * self.c * 4 * buffers) as u64;
        matrix <= vmem_bytes / 2 && 10 * gathered < 9 * current
    }

    /// Pixels one image takes in a packed row: its width and the wider of its side paddings,
    /// which the images on either side of it share; staged by phase, a phase's width.
    pub(crate) fn pitch(&self) -> usize {
        if self.phases { self.wp.div_ceil(self.sw) } else { self.w + self.pl.max(self.pr) }
    }

    /// The geometry with `k` whole images side by side in each staged row (stride 1): image
    /// `j`'s pixel (r, c) sits at padded row `pt + r`, column `j·pitch + pl + c`. Neighbours
    /// share the zeros between them, and a row's last image reads into the next row's left
    /// padding. Output (j, o_r, o_c) is streamed row `o_r·wv + j·pitch + o_c`, so each output
    /// row streams `k·pitch` pixels for `k·ow` outputs and no padding rows stream at all: a
    /// 3×3 layer on a 7×7 map streams 8 rows per 7 outputs, where one image a slot streams 81
    /// per 49.
    ///
    /// Staged by phase, each phase holds the images' phase rows side by side (`k` phase widths
    /// per row), and only output rows stream: the halo rows of a phase image no longer do.
    pub(crate) fn packed(self, k: usize) -> ConvLayout {
        let wv = k * self.pitch();
        if self.phases {
            return ConvLayout { wv, packed: k, ..self };
        }
        ConvLayout { wp: wv, wv, packed: k, ..self }
    }

    /// Whether packing images side by side streams at least 10% fewer rows than one image a
    /// slot: unpacked, over the padded width (stride 1) or by phase, with every output column
    /// and the columns its taps read within the image's pitch (padding on both sides wider
    /// than the kernel's reach would put outputs in the neighbour's).
    pub(crate) fn packing_pays(&self) -> bool {
        let reach = if self.phases { (self.kw - 1) * self.dw / self.sw } else { 0 };
        (self.phases || (self.sh == 1 && self.sw == 1))
            && !self.gathered
            && self.packed == 0
            && self.ow + reach <= self.pitch()
            && 10 * self.oh * self.pitch() < 9 * self.hv() * self.wv
    }

    /// Where image `img` of a whole-image block starts among the block's streamed rows.
    pub(crate) fn image_offset(&self, img: usize) -> usize {
        if self.packed > 0 { img * self.pitch() } else { img * self.hv() * self.wv }
    }

    /// The streamed rows after which the output columns repeat: a packed image's pitch, else
    /// an output row.
    pub(crate) fn column_period(&self) -> usize {
        if self.packed > 0 { self.pitch() } else { self.wv }
    }

    /// The im2col matrix a gathered stage buffer holds for `rows` output pixels.
    pub(crate) fn matrix(&self, stage: Tile, rows: usize) -> Tile {
        let k = self.taps() * self.c;
        Tile { offset: stage.offset, rows: rows as u32, cols: k as u32, stride: k as u32, ..stage }
    }

    /// Whether staging by phase streams fewer rows than the strided layout (a stride above 1).
    pub(crate) fn phases_pay(&self) -> bool {
        !self.phases && !self.gathered && (self.sh > 1 || self.sw > 1) && self.wp.div_ceil(self.sw) < self.wv
    }

    /// Pixels of a staging buffer of `stage_rows` rows (padded rows, each phase's rows, or the
    /// gathered matrix's rows, `taps` pixels each).
    pub(crate) fn stage_pixels(&self, stage_rows: usize) -> usize {
        if self.gathered {
            stage_rows * self.taps()
        } else if self.phases {
            self.sh * self.sw * stage_rows * self.wv
        } else {
            stage_rows * self.wp
        }
    }

    /// The phases of rows and of columns some tap reads (the others are never staged).
    pub(crate) fn phase_read(&self, pr: usize, pc: usize) -> bool {
        (0..self.kh).any(|i| (i * self.dh) % self.sh == pr) && (0..self.kw).any(|j| (j * self.dw) % self.sw == pc)
    }

    /// Rows per image slot and per block, and the blocks themselves, for a block size of
    /// about `target` streamed rows: whole images when one fits, else bands of output rows.
    pub(crate) fn blocks(&self, target: usize) -> PixelBlocks {
        if self.packed > 0 {
            // Blocks of `packed` images side by side, one padded image height (and a row for
            // the last image's reach into the next row).
            let k = self.packed;
            let blocks = (0..self.n)
                .step_by(k)
                .map(|n0| Block { n0, images: k.min(self.n - n0), oh0: 0, bh: self.oh })
                .collect();
            let stage_rows = if self.phases { self.oh + self.phase_halo() } else { self.hp + 1 };
            return PixelBlocks { blocks, m_rows: self.oh * self.wv, stage_rows, whole: true };
        }
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
                stage_rows: if self.gathered {
                    imgs * per_image
                } else if self.phases {
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
            let stage_rows = if self.gathered {
                bh * self.wv
            } else if self.phases {
                bh + self.phase_halo()
            } else {
                self.sh * bh + self.halo()
            };
            PixelBlocks { blocks, m_rows: bh * self.wv, stage_rows, whole: false }
        }
    }

    /// Streamed rows of block `b`.
    pub(crate) fn block_rows(&self, b: &Block, whole: bool) -> usize {
        if self.packed > 0 {
            self.oh * self.wv
        } else if whole {
            b.images * self.hv() * self.wv
        } else {
            b.bh * self.wv
        }
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
    /// buffer may have filled with data).
    pub(crate) fn band_needs_fill(&self, b: &Block) -> bool {
        b.oh0 * self.sh < self.pt || (b.oh0 + b.bh - 1) * self.sh + (self.kh - 1) * self.dh >= self.pt + self.h
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
    /// The convolution's multiply-adds with `cg` input channels per group (each of its
    /// gradients repeats them).
    pub(crate) fn macs(&self, cg: usize) -> u64 {
        (self.n * self.oh * self.ow * self.taps() * cg * self.co) as u64
    }
    pub(crate) fn taps(&self) -> usize {
        self.kh * self.kw
    }
    /// Output rows per image slot: the slot holds `sh · hv ≥ hp` padded rows (gathered or
    /// packed: the output rows themselves).
    pub(crate) fn hv(&self) -> usize {
        if self.gathered || self.packed > 0 { self.oh } else { self.hp.div_ceil(self.sh) }
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

/// An output window spread over a larger tensor: window pixel `(r, c)` is pixel
/// `(at[0] + step[0]·r, at[1] + step[1]·c)` of a tensor `dims[0] × dims[1]` pixels per image.
/// One stride phase of a strided convolution's input gradient is such a window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scatter {
    pub dims: [usize; 2],
    pub step: [usize; 2],
    pub at: [usize; 2],
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
