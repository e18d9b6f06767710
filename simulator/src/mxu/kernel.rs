//! The fast bit-exact MXU product: `acc += A · B` ([`matmul`]) or `out = A · B` ([`matmul_into`],
//! the same bits as adding into zeros) under the numerics contract.
//!
//! For every output element and every (K-chunk, precision pass) in order, the chunk sum starts
//! at +0.0 and takes one f32 fused multiply-add per k in order (exact bf16 products, one rounding
//! per step), then is added to the accumulator. That is a blocked GEMM whose K-block is the
//! array's height: operands are packed once per (chunk, pass) with the bf16 rounding or split
//! applied, and a register-blocked micro-kernel computes `MR × NR` chunk sums at a time, a few
//! consecutive steps per call so that the tile it adds them into stays in L1.
//!
//! The micro-kernel is AVX-512 or AVX2 + FMA where the CPU has them and portable Rust
//! (`f32::mul_add`) elsewhere; all perform the same operations in the same order, so the bits
//! never depend on the machine, and tiles are independent, so they never depend on the thread
//! count.

use rayon::prelude::*;

use crate::numerics::{Precision, bf16, split};

/// Rows of the micro-kernel's register block.
const MR: usize = 12;
/// Columns of the micro-kernel's register block (two 16-lane vectors).
const NR: usize = 32;
/// Row strips per parallel task (96 rows).
const TASK_STRIPS_M: usize = 8;
/// Column strips per parallel task (256 columns).
const TASK_STRIPS_N: usize = 8;
/// Steps one micro-kernel call sums in turn for its tile, at most: the tile's accumulator
/// rows stay in L1 from one step's add to the next, and the calls' fixed costs (starting the
/// FMA chains, draining them into `c`) are shared.
const GROUP_STEPS: usize = 4;
/// The total depth of the steps one call sums, at most, so that a group's packed strips of A
/// and B stay in the caches while the task sweeps its tiles.
const GROUP_DEPTH: usize = 256;

/// A matrix's elements: f32 values, or the little-endian bytes of a simulated memory, which
/// the packing decodes as it reads them (so the functional engine multiplies tiles where they
/// are in VMEM, with no decoded copy of each operand).
#[derive(Clone, Copy)]
pub enum Elements<'a> {
    F32(&'a [f32]),
    /// f32 values, four little-endian bytes each.
    F32Bytes(&'a [u8]),
    /// bfloat16 values (an f32's upper half), two little-endian bytes each.
    Bf16Bytes(&'a [u8]),
}

impl Elements<'_> {
    /// Decodes elements `at .. at + dst.len()` into `dst`.
    #[inline]
    pub fn decode(&self, at: usize, dst: &mut [f32]) {
        match *self {
            Elements::F32(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
            Elements::F32Bytes(b) => {
                let src = b[4 * at..4 * (at + dst.len())].chunks_exact(4);
                dst.iter_mut().zip(src).for_each(|(d, b)| *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
            Elements::Bf16Bytes(b) => {
                let src = b[2 * at..2 * (at + dst.len())].chunks_exact(2);
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(d, b)| *d = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16));
            }
        }
    }

    /// Element `i`.
    #[inline]
    fn get(&self, i: usize) -> f32 {
        let mut v = [0f32];
        self.decode(i, &mut v);
        v[0]
    }

    /// `dst[j] = split(element at + j, part)`: a row rounded (or split) as it is packed.
    #[inline]
    fn load_rounded(&self, at: usize, dst: &mut [f32], part: u8) {
        match *self {
            Elements::F32(v) => round_into(dst, &v[at..at + dst.len()], part),
            _ => {
                self.decode(at, dst);
                round_in_place(dst, part);
            }
        }
    }
}

/// A row-major matrix view with a row stride.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: Elements<'a>,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a> Matrix<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Matrix { data: Elements::F32(data), rows, cols, stride: cols }
    }

    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data.get(r * self.stride + c)
    }
}

/// `acc (m × n, row stride ldc) += A (m × k) · B (k × n)` with K-chunks of `chunk` (the MXU's rows)
/// and the passes of `precision`. Follows the contract bit for bit; parallel over output tiles.
pub fn matmul(a: Matrix, b: Matrix, acc: &mut [f32], ldc: usize, chunk: usize, precision: Precision) {
    product(a, b, acc, ldc, chunk, precision, false);
}

/// `out (m × n, row stride ldc) = A · B`: [`matmul`] into an accumulator of +0.0, bit for bit,
/// without reading `out` (BLAS's `beta = 0`): the first step stores `+0.0 + sum` where the
/// others add, so no pass zeroes `out` first and its old values are never loaded.
pub fn matmul_into(a: Matrix, b: Matrix, out: &mut [f32], ldc: usize, chunk: usize, precision: Precision) {
    product(a, b, out, ldc, chunk, precision, true);
}

/// [`matmul`] (`overwrite` false) or [`matmul_into`] (true).
fn product(a: Matrix, b: Matrix, acc: &mut [f32], ldc: usize, chunk: usize, precision: Precision, overwrite: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert!(chunk > 0 && ldc >= n, "bad chunk or stride");
    assert!(m == 0 || n == 0 || (m - 1) * ldc + n <= acc.len(), "accumulator too small");
    if overwrite && k == 0 {
        (0..m).for_each(|r| acc[r * ldc..r * ldc + n].fill(0.0));
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let passes = precision.passes();
    let chunks = k.div_ceil(chunk);
    let (strips_m, strips_n) = (m.div_ceil(MR), n.div_ceil(NR));
    // B is packed once per (chunk, pass) step, with the bf16 rounding or split applied, into
    // strips of NR columns; A is packed by each task for its own rows, just before use.
    let steps: Vec<Step> = (0..chunks)
        .flat_map(|c| passes.iter().map(move |&(pa, pb)| Step { k0: c * chunk, kc: chunk.min(k - c * chunk), pa, pb }))
        .collect();
    // Every packed strip starts on a 64-byte boundary, so no 16-lane load splits a cache line.
    let sizes: Vec<usize> = steps.iter().map(|s| (strips_n * s.kc * NR).div_ceil(16) * 16).collect();
    let total: usize = sizes.iter().sum();
    // Taken out of the thread-local while in use: a nested call (rayon may run one on this
    // thread while it waits) finds it empty and allocates its own. Fresh multi-megabyte
    // buffers cost more in page faults than the packing itself.
    let mut buf = WORKSPACE.take();
    if buf.len() < total + 16 {
        buf = vec![0f32; total + 16];
    }
    {
        let start = buf.as_ptr().align_offset(64).min(16);
        let mut rest = &mut buf[start..start + total];
        let mut views: Vec<&mut [f32]> = Vec::with_capacity(steps.len());
        for &size in &sizes {
            let (view, tail) = rest.split_at_mut(size);
            rest = tail;
            views.push(view);
        }
        views.par_iter_mut().zip(&steps).for_each(|(view, st)| pack_b(b, st.k0, st.kc, st.pb, view));
        let packed: Vec<(&Step, &[f32])> = steps.iter().zip(views.iter().map(|v| &v[..])).collect();
        multiply(a, &packed, m, n, strips_m, strips_n, acc, ldc, overwrite);
    }
    WORKSPACE.set(buf);
}

/// Bytes [`matmul`] allocates beside its operands: B packed for every (chunk, pass) step and
/// one A panel per thread and step of a group (for the host's memory check).
pub fn workspace_bytes(m: usize, k: usize, n: usize, chunk: usize, precision: Precision) -> u64 {
    let chunk = chunk.max(1);
    let strips_n = n.div_ceil(NR) as u64;
    let steps = (k.div_ceil(chunk) * precision.passes().len()) as u64;
    let packed_b = steps * (strips_n * chunk.min(k) as u64 * NR as u64).div_ceil(16) * 16;
    let threads = rayon::current_num_threads() as u64;
    let group = GROUP_STEPS.min(steps as usize) as u64;
    let a_panels =
        threads.min(m.div_ceil(MR * TASK_STRIPS_M).max(1) as u64) * group * (TASK_STRIPS_M * chunk * MR) as u64;
    4 * (packed_b + a_panels + 32)
}

/// One (K-chunk, precision pass) step of the product.
struct Step {
    k0: usize,
    kc: usize,
    pa: u8,
    pb: u8,
}

/// Packs rows `r0 ..` (at most `strips` strips of MR) of one chunk of A for one split part:
/// each strip `MR × kc`, row after row (the micro-kernels broadcast down a column, `kc`
/// apart), padded with zero rows. Rounding a row is one vectorised pass; an interleaved
/// (k-major) strip cost as much again for the narrow products of convolutions.
fn pack_a(a: Matrix, r0: usize, strips: usize, st: &Step, out: &mut [f32]) {
    let kc = st.kc;
    for (i, dst) in out.chunks_exact_mut(kc).take(strips * MR).enumerate() {
        let i = r0 + i;
        if i < a.rows {
            a.data.load_rounded(i * a.stride + st.k0, dst, st.pa);
        } else {
            dst.fill(0.0);
        }
    }
}

/// `dst[i] = split(src[i], part)`, specialised so the common case vectorises.
fn round_into(dst: &mut [f32], src: &[f32], part: u8) {
    match part {
        0 => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = bf16(v)),
        _ => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = split(v, part)),
    }
}

/// [`round_into`] in place.
fn round_in_place(v: &mut [f32], part: u8) {
    match part {
        0 => v.iter_mut().for_each(|x| *x = bf16(*x)),
        _ => v.iter_mut().for_each(|x| *x = split(*x, part)),
    }
}

thread_local! {
    /// Packing space of the calling thread, kept between calls.
    static WORKSPACE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs the micro-kernel over every output tile and step. Tasks are blocks of rows (and, when
/// there are few rows, of columns too); for each group of steps, each packs its rows of A for
/// the group's steps and sweeps its columns, one call per tile summing the group's steps.
#[allow(clippy::too_many_arguments)] // the operands and their shapes
fn multiply(
    a: Matrix,
    packed: &[(&Step, &[f32])],
    m: usize,
    n: usize,
    strips_m: usize,
    strips_n: usize,
    acc: &mut [f32],
    ldc: usize,
    overwrite: bool,
) {
    // Tasks of at most TASK_STRIPS_M row strips, at least four per thread and as many on every
    // thread, their sizes differing by one strip at most: eleven tasks of 96 rows on two
    // threads keep one idle for a twelfth of the product. Which task computes a tile does not
    // change its bits.
    let threads = rayon::current_num_threads().max(1);
    let rounds = strips_m.div_ceil(TASK_STRIPS_M * threads).max(4);
    let tasks_m = (rounds * threads).min(strips_m);
    let row_strips = |t: usize| strips_m * t / tasks_m..strips_m * (t + 1) / tasks_m;
    let per_task = strips_m.div_ceil(tasks_m);
    let tasks_n = if tasks_m >= 4 { 1 } else { strips_n.div_ceil(TASK_STRIPS_N) };
    let cols_per_task = strips_n.div_ceil(tasks_n);
    let out = SharedOut(acc.as_mut_ptr(), acc.len());
    let kernel = select_kernel();
    let kc_max = packed.iter().map(|(st, _)| st.kc).max().unwrap_or(0);
    // Consecutive steps summed by one call: at most GROUP_STEPS of them, GROUP_DEPTH deep.
    let (mut groups, mut depth): (Vec<std::ops::Range<usize>>, usize) = (Vec::new(), 0);
    for (i, (st, _)) in packed.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if g.len() < GROUP_STEPS && depth + st.kc <= GROUP_DEPTH => {
                g.end = i + 1;
                depth += st.kc;
            }
            _ => {
                groups.push(i..i + 1);
                depth = st.kc;
            }
        }
    }
    let group_steps = groups.iter().map(|g| g.len()).max().unwrap_or(1);
    let a_step = per_task * kc_max * MR;
    (0..tasks_m * tasks_n).into_par_iter().for_each(|task| {
        let (tm, tn) = (task / tasks_n, task % tasks_n);
        let rows = row_strips(tm);
        let cols = tn * cols_per_task..((tn + 1) * cols_per_task).min(strips_n);
        let mut a_buf = vec![0f32; group_steps * a_step + 16];
        let a_start = a_buf.as_ptr().align_offset(64).min(16);
        let a_pack = &mut a_buf[a_start..a_start + group_steps * a_step];
        for (g, steps) in groups.iter().enumerate() {
            let group = &packed[steps.clone()];
            for ((st, _), a_pack) in group.iter().zip(a_pack.chunks_exact_mut(a_step)) {
                pack_a(a, rows.start * MR, rows.len(), st, a_pack);
            }
            let first = overwrite && g == 0;
            for sj in cols.clone() {
                let n_valid = NR.min(n - sj * NR);
                for (s, si) in rows.clone().enumerate() {
                    let m_valid = MR.min(m - si * MR);
                    let mut strips = [Strips { kc: 0, a: &[], b: &[] }; GROUP_STEPS];
                    for ((slot, &(st, pb)), a_pack) in strips.iter_mut().zip(group).zip(a_pack.chunks_exact(a_step)) {
                        let kc = st.kc;
                        *slot = Strips {
                            kc,
                            a: &a_pack[s * kc * MR..(s + 1) * kc * MR],
                            b: &pb[sj * kc * NR..(sj + 1) * kc * NR],
                        };
                    }
                    // SAFETY: tasks cover disjoint (row strip, column strip) tiles, so no two
                    // threads touch the same accumulator element; `tile` checks bounds.
                    unsafe {
                        kernel(
                            &strips[..group.len()],
                            out.tile(si * MR, sj * NR, m_valid, n_valid, ldc),
                            ldc,
                            m_valid,
                            n_valid,
                            first,
                        )
                    };
                }
            }
        }
    });
}

/// The accumulator shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);

// SAFETY: every task writes a disjoint set of elements (see `matmul`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A pointer to element (r, c), after checking the whole tile lies inside the buffer.
    fn tile(&self, r: usize, c: usize, rows: usize, cols: usize, ldc: usize) -> *mut f32 {
        assert!((r + rows - 1) * ldc + c + cols <= self.1, "tile outside the accumulator");
        // SAFETY: the offset is within the allocation (checked above).
        unsafe { self.0.add(r * ldc + c) }
    }
}

/// Packs one chunk of B for one split part: column strip after strip, each `kc × NR`, padded
/// with zeros.
fn pack_b(b: Matrix, k0: usize, kc: usize, part: u8, out: &mut [f32]) {
    // Round whole rows (vectorised), then copy NR-wide pieces into their strips.
    let strips = b.cols.div_ceil(NR);
    let mut row = vec![0f32; strips * NR];
    for kk in 0..kc {
        b.data.load_rounded((k0 + kk) * b.stride, &mut row[..b.cols], part);
        for (s, piece) in row.chunks_exact(NR).enumerate() {
            out[(s * kc + kk) * NR..(s * kc + kk + 1) * NR].copy_from_slice(piece);
        }
    }
}

/// One step's packed strips for one tile: `a` holds `MR × kc` values (row after row), `b`
/// `kc × NR`.
#[derive(Clone, Copy)]
struct Strips<'a> {
    kc: usize,
    a: &'a [f32],
    b: &'a [f32],
}

/// For each step in order, `c[r][j] += Σ_k a[r][k] · b[k][j]` for an `m_valid × n_valid` tile
/// from the step's packed strips: the chunk sum from +0.0 in k order with FMAs, then one add
/// into the accumulator — or, for the first step when `first`, `c[r][j] = +0.0 + Σ`, the same
/// bits as adding into +0.0, without reading `c`.
type Kernel = unsafe fn(&[Strips], *mut f32, usize, usize, usize, bool);

/// Which micro-kernel runs: chosen from the CPU, or forced (tests run every one they can).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// The fastest the CPU supports.
    Auto,
    /// Plain Rust with `f32::mul_add`.
    Portable,
    /// The hand-written AVX2 + FMA kernel.
    Avx2,
    /// The hand-written AVX-512 kernel.
    Avx512,
}

static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

impl KernelChoice {
    /// Whether this CPU can run the choice.
    pub fn available(self) -> bool {
        match self {
            KernelChoice::Auto | KernelChoice::Portable => true,
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Forces a micro-kernel for every later product in this process (`Auto` restores the
/// default). Results must not change: tests use this to hold every kernel to the same bits.
pub fn force_kernel(choice: KernelChoice) {
    assert!(choice.available(), "{choice:?} is not available on this CPU");
    FORCED.store(choice as u8, std::sync::atomic::Ordering::SeqCst);
}

fn choice() -> KernelChoice {
    let forced = FORCED.load(std::sync::atomic::Ordering::SeqCst);
    let all = [KernelChoice::Auto, KernelChoice::Portable, KernelChoice::Avx2, KernelChoice::Avx512];
    match all[forced as usize] {
        KernelChoice::Auto => {
            if KernelChoice::Avx512.available() {
                KernelChoice::Avx512
            } else if KernelChoice::Avx2.available() {
                KernelChoice::Avx2
            } else {
                KernelChoice::Portable
            }
        }
        c => c,
    }
}

fn select_kernel() -> Kernel {
    match choice() {
        #[cfg(target_arch = "x86_64")]
        KernelChoice::Avx512 => avx512::kernel,
        #[cfg(target_arch = "x86_64")]
        KernelChoice::Avx2 => avx2::kernel,
        _ => portable,
    }
}

/// The portable micro-kernel (also the definition the vector kernels must equal).
///
/// # Safety
/// `c` must point to an `m_valid × n_valid` tile with row stride `ldc` inside one allocation.
unsafe fn portable(steps: &[Strips], c: *mut f32, ldc: usize, m_valid: usize, n_valid: usize, first: bool) {
    for (i, &Strips { kc, a, b }) in steps.iter().enumerate() {
        let store = first && i == 0;
        let mut acc = [[0f32; NR]; MR];
        for kk in 0..kc {
            let bk = &b[kk * NR..(kk + 1) * NR];
            for (r, row) in acc.iter_mut().enumerate() {
                let av = a[r * kc + kk];
                for (x, &bv) in row.iter_mut().zip(bk) {
                    *x = av.mul_add(bv, *x);
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(m_valid) {
            for (j, v) in row.iter().enumerate().take(n_valid) {
                // SAFETY: inside the tile the caller guarantees.
                unsafe {
                    let p = c.add(r * ldc + j);
                    *p = if store { 0.0 } else { *p } + v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, NR, Strips};

    /// A sub-tile of the 12 × 32 tile: 6 rows × 16 columns, whose chunk sums are 12 of the 16
    /// YMM registers; two hold a packed B row's 16 values and one the broadcast A value, so
    /// nothing spills (the 6 × 16 shape of BLIS's Haswell kernel).
    const ROWS: usize = 6;
    const COLS: usize = 16;

    /// The AVX2 + FMA micro-kernel: the 12 × 32 tile as four 6 × 16 sub-tiles, each summing
    /// every step's chunk in registers and adding it into `c` before the next step (so the
    /// sub-tile's accumulator rows stay in L1). Every sum is the portable kernel's: from
    /// +0.0, one FMA per k in k order, then one add into `c`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every step's `a` holds `MR × kc` (row after row) and
    /// `b` `kc × NR` packed values; `c` points to an `m_valid × n_valid` tile with row stride
    /// `ldc` inside one allocation.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel(steps: &[Strips], c: *mut f32, ldc: usize, m_valid: usize, n_valid: usize, first: bool) {
        assert!(MR.is_multiple_of(ROWS) && NR.is_multiple_of(COLS));
        assert!(steps.iter().all(|s| s.a.len() >= s.kc * MR && s.b.len() >= s.kc * NR));
        for r0 in (0..m_valid.min(MR)).step_by(ROWS) {
            for c0 in (0..n_valid.min(NR)).step_by(COLS) {
                for (i, &Strips { kc, a, b }) in steps.iter().enumerate() {
                    let (ap, bp, first) = (a.as_ptr(), b.as_ptr(), first && i == 0);
                    // Twelve named accumulators: in an array LLVM splits the loop in two halves that
                    // each broadcast A again.
                    let z = _mm256_setzero_ps();
                    let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
                    let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
                    // The accumulator rows this sub-tile adds into at its end: fetched while the
                    // chunk is summed, so the add does not wait on memory (a wide C leaves the
                    // caches between chunks).
                    for r in 0..if first || i > 0 { 0 } else { (m_valid - r0).min(ROWS) } {
                        // SAFETY: a prefetch never faults; the address is inside the caller's tile.
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(c.add((r0 + r) * ldc + c0).cast()) };
                    }
                    // Two pointers and one stride reach the six rows of A (rows 0-2 from `a0`,
                    // 3-5 from `a3`, `kc` and `2 kc` apart), all advancing one element per k, so
                    // each broadcast is one load with a fixed address form; four k per iteration.
                    // SAFETY (the block): kk < kc, r0 + 6 <= MR and c0 + 16 <= NR, so every read
                    // is inside `a` and `b`.
                    let (mut a0, mut a3, mut bk) = unsafe { (ap.add(r0 * kc), ap.add((r0 + 3) * kc), bp.add(c0)) };
                    // One row of the sub-tile for one k: A's value broadcast, times both B vectors.
                    macro_rules! row {
                        ($a:expr, $b0:ident, $b1:ident, $lo:ident, $hi:ident) => {
                            let x = _mm256_broadcast_ss(&*$a);
                            $lo = _mm256_fmadd_ps(x, $b0, $lo);
                            $hi = _mm256_fmadd_ps(x, $b1, $hi);
                        };
                    }
                    macro_rules! step {
                        ($d:expr) => {
                            unsafe {
                                let (b0, b1) = (_mm256_loadu_ps(bk.add($d * NR)), _mm256_loadu_ps(bk.add($d * NR + 8)));
                                row!(a0.add($d), b0, b1, c00, c01);
                                row!(a0.add(kc + $d), b0, b1, c10, c11);
                                row!(a0.add(2 * kc + $d), b0, b1, c20, c21);
                                row!(a3.add($d), b0, b1, c30, c31);
                                row!(a3.add(kc + $d), b0, b1, c40, c41);
                                row!(a3.add(2 * kc + $d), b0, b1, c50, c51);
                            }
                        };
                    }
                    for _ in 0..kc / 4 {
                        step!(0);
                        step!(1);
                        step!(2);
                        step!(3);
                        unsafe {
                            (a0, a3, bk) = (a0.add(4), a3.add(4), bk.add(4 * NR));
                        }
                    }
                    for _ in 0..kc % 4 {
                        step!(0);
                        unsafe {
                            (a0, a3, bk) = (a0.add(1), a3.add(1), bk.add(NR));
                        }
                    }
                    let acc = [[c00, c01], [c10, c11], [c20, c21], [c30, c31], [c40, c41], [c50, c51]];
                    let cols = (n_valid - c0).min(COLS);
                    if cols == COLS {
                        // A full row of the sub-tile: one vector add per 8 columns, the same
                        // `c + sum` per element as below (c = +0.0 on a first step).
                        for (r, row) in acc.iter().enumerate().take(m_valid - r0) {
                            // SAFETY: 16 columns of row r0 + r inside the tile the caller guarantees.
                            unsafe {
                                let p = c.add((r0 + r) * ldc + c0);
                                let old = |p: *mut f32| if first { _mm256_setzero_ps() } else { _mm256_loadu_ps(p) };
                                _mm256_storeu_ps(p, _mm256_add_ps(old(p), row[0]));
                                _mm256_storeu_ps(p.add(8), _mm256_add_ps(old(p.add(8)), row[1]));
                            }
                        }
                        continue;
                    }
                    for (r, row) in acc.iter().enumerate().take(m_valid - r0) {
                        let mut sums = [0f32; COLS];
                        // SAFETY: 16 lanes into a local array of 16.
                        unsafe {
                            _mm256_storeu_ps(sums.as_mut_ptr(), row[0]);
                            _mm256_storeu_ps(sums.as_mut_ptr().add(8), row[1]);
                        }
                        for (j, v) in sums.iter().enumerate().take(cols) {
                            // SAFETY: inside the tile the caller guarantees.
                            unsafe {
                                let p = c.add((r0 + r) * ldc + c0 + j);
                                *p = if first { 0.0 } else { *p } + v;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR, Strips};

    /// The AVX-512 micro-kernel: each step's 12 × 32 chunk sums in 24 registers, added into
    /// `c` before the next step.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every step's `a` holds `MR × kc` (row after row) and `b`
    /// `kc × NR` packed values, `b` 64-byte aligned; `c` points to an `m_valid × n_valid` tile
    /// with row stride `ldc` inside one allocation.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel(steps: &[Strips], c: *mut f32, ldc: usize, m_valid: usize, n_valid: usize, first: bool) {
        for (i, st) in steps.iter().enumerate() {
            // SAFETY: the caller's guarantees, step by step.
            unsafe { sum_step(st.kc, st.a, st.b, c, ldc, m_valid, n_valid, first && i == 0) };
        }
    }

    /// One step of [`kernel`].
    ///
    /// # Safety
    /// As [`kernel`]'s, for this step's `a` and `b`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)] // a step's strips and the tile
    unsafe fn sum_step(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        m_valid: usize,
        n_valid: usize,
        first: bool,
    ) {
        assert!(a.len() >= kc * MR && b.len() >= kc * NR && (b.as_ptr() as usize).is_multiple_of(64));
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let step = |acc: &mut [[__m512; 2]; MR], kk: usize| {
            // SAFETY: kk < kc, so these reads are inside `a` and `b` (asserted above); `b` is
            // 64-byte aligned and each packed row is 128 bytes.
            unsafe {
                let b0 = _mm512_load_ps(bp.add(kk * NR));
                let b1 = _mm512_load_ps(bp.add(kk * NR + 16));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r * kc + kk));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
            }
        };
        let mut kk = 0;
        while kk + 2 <= kc {
            step(&mut acc, kk);
            step(&mut acc, kk + 1);
            kk += 2;
        }
        if kk < kc {
            step(&mut acc, kk);
        }
        let mask =
            |lanes: usize| -> __mmask16 { if lanes >= 16 { 0xFFFF } else { ((1u32 << lanes) - 1) as __mmask16 } };
        let (m0, m1) = (mask(n_valid), mask(n_valid.saturating_sub(16)));
        for (r, row) in acc.iter().enumerate().take(m_valid) {
            // SAFETY: masked loads and stores touch only the tile's first n_valid columns.
            unsafe {
                let p = c.add(r * ldc);
                // c = +0.0 on a first step: the same `c + sum`, without reading c.
                let old = |m, p| if first { _mm512_setzero_ps() } else { _mm512_maskz_loadu_ps(m, p) };
                let c0 = old(m0, p);
                _mm512_mask_storeu_ps(p, m0, _mm512_add_ps(c0, row[0]));
                if n_valid > 16 {
                    let c1 = old(m1, p.add(16));
                    _mm512_mask_storeu_ps(p.add(16), m1, _mm512_add_ps(c1, row[1]));
                }
            }
        }
    }
}

/// The contract written as plainly as possible: the definition the tests hold the fast kernel to.
pub fn matmul_reference(a: Matrix, b: Matrix, acc: &mut [f32], ldc: usize, chunk: usize, precision: Precision) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    for k0 in (0..k).step_by(chunk.max(1)) {
        for &(pa, pb) in precision.passes() {
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0f32;
                    for kk in k0..(k0 + chunk).min(k) {
                        s = split(a.at(i, kk), pa).mul_add(split(b.at(kk, j), pb), s);
                    }
                    acc[i * ldc + j] += s;
                }
            }
        }
    }
}
