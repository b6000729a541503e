//! F32 / F16 / BF16 rows times f32 activations.
//!
//! Activations stay f32 so results match the float reference up to summation order, except
//! where a BF16 matrix asks for bf16-rounded activations and the CPU multiplies them faster
//! ([`bf16_activations`]: AVX-512 BF16's `vdpbf16ps`). Products go through tiles of rows x tokens
//! ([`gemm`], [`gemm_even_odd`], [`gemm_tiled`], [`gemm_bf16`]); single rows ([`dot`]) have
//! only the scalar reference. BF16 rows may be stored in rows or interleaved by groups of 16
//! rows and pairs of columns ([`tile_bf16`], which decode reads as one stream and whose tiles
//! need no horizontal sums); every tile gives the same bits from either.

use crate::cpu::SimdLevel;
use crate::dot::{Layout, GROUP_ROWS};
use crate::DType;

/// Dot of a stored F32/F16/BF16 row with `x`: [`dot_scalar`] at every level.
pub fn dot(_level: SimdLevel, dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    let elem = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        other => panic!("{other} is not a plain float format"),
    };
    assert_eq!(row.len(), x.len() * elem, "row and activation lengths differ");
    // Products of matrices go through the tiles ([`gemm`]), one token included, so single rows
    // have only the reference at every level.
    dot_scalar(dtype, row, x)
}

#[inline]
fn elem(dtype: DType, row: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]),
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])).to_f32(),
        _ => f32::from_bits((u16::from_le_bytes([row[2 * i], row[2 * i + 1]]) as u32) << 16),
    }
}

/// The reference: eight partial sums, like `ops::dot`.
pub fn dot_scalar(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let full = x.len() / 8 * 8;
    for i in (0..full).step_by(8) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += elem(dtype, row, i + k) * x[i + k];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (i, xi) in x.iter().enumerate().skip(full) {
        sum += elem(dtype, row, i) * xi;
    }
    sum
}

/// A batch-invariant tile of products (see [`super::gemm_f32`], which checked the shapes):
/// `out[t * ldo + r] = dot(row r, token t)`.
///
/// The SIMD levels compute register tiles of rows x tokens, each weight vector widened to f32
/// once and used for every token of the tile. Every (row, token) pair has one accumulator that
/// sees the same operations in every tile shape (one FMA per vector of columns in column order,
/// a zero-padded last vector, then a fixed horizontal sum), so outputs do not depend on the
/// batch. BF16 rows of widths [`tiles_bf16`] takes go through [`gemm_tiled`] instead (one
/// accumulator per (row, token) over the pairs of columns in order). The scalar level is the
/// plain per-pair [`dot_scalar`].
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    level: SimdLevel,
    dtype: DType,
    w: &[u8],
    nrows: usize,
    x: &[f32],
    ntok: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let rb = w.len() / nrows;
    let cols = x.len() / ntok;
    assert_eq!(rb, cols * dtype.row_bytes(1).unwrap_or(0), "row and activation widths differ");
    if tiles_bf16(level, dtype, cols) {
        return gemm_tiled(level, w, nrows, Layout::Rows, x, ntok, out, ldo);
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level` only names levels the CPU has (see `cpu`); shapes were checked above and
        // by `dot::gemm_f32`.
        SimdLevel::Avx512 | SimdLevel::Avx2 if dtype == DType::BF16 => EVEN_ODD.with_borrow_mut(|xp| {
            even_odd(x, ntok, cols, even_odd_group(level), xp);
            // SAFETY: as above; BF16 rows take the activations as `even_odd` lays them out
            // (`ntok` rows of `cols` rounded up to the level's group).
            unsafe {
                if level == SimdLevel::Avx512 {
                    x86::gemm_avx512(dtype, w, nrows, xp, ntok, out, ldo)
                } else {
                    x86::gemm_avx2(dtype, w, nrows, xp, ntok, out, ldo)
                }
            }
        }),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx512 => unsafe { x86::gemm_avx512(dtype, w, nrows, x, ntok, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::gemm_avx2(dtype, w, nrows, x, ntok, out, ldo) },
        _ => {
            for r in 0..nrows {
                let row = &w[r * rb..(r + 1) * rb];
                for t in 0..ntok {
                    out[t * ldo + r] = dot_scalar(dtype, row, &x[t * cols..(t + 1) * cols]);
                }
            }
        }
    }
}

/// Whether BF16 rows of `cols` at `level` go through the tiles of [`tile_bf16`]'s layout
/// ([`gemm_tiled`], and [`gemm_bf16`] for bf16 activations), in either layout: AVX2 and
/// AVX-512, widths [`interleaves_bf16`] takes.
pub fn tiles_bf16(level: SimdLevel, dtype: DType, cols: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && matches!(level, SimdLevel::Avx2 | SimdLevel::Avx512)
        && interleaves_bf16(dtype, cols)
}

/// A batch-invariant tile of BF16 rows of a width [`tiles_bf16`] takes, stored in `layout`,
/// times f32 activations `x` (`ntok` tokens, token-major): `out[t * ldo + r]`. Each (row,
/// token) sum is one f32 accumulator taking the pairs of columns in order (the even column's
/// FMA, then the odd one's), whatever the tile shape, so the same bits from any batch.
#[allow(clippy::too_many_arguments)]
pub fn gemm_tiled(
    level: SimdLevel,
    w: &[u8],
    nrows: usize,
    layout: Layout,
    x: &[f32],
    ntok: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if nrows == 0 || ntok == 0 {
        return;
    }
    let cols = bf16_cols(w.len(), nrows, layout);
    assert!(tiles_bf16(level, DType::BF16, cols), "no BF16 tiles of {cols} columns at {level:?}");
    assert!(x.len() == ntok * cols && ldo >= nrows && out.len() >= (ntok - 1) * ldo + nrows, "tile shapes");
    #[cfg(target_arch = "x86_64")]
    if layout == Layout::Rows && ntok == 1 {
        // SAFETY: `tiles_bf16` checked the level (one the CPU has); shapes above.
        unsafe {
            match level {
                SimdLevel::Avx512 => x86::rows_one_avx512(w, nrows, x, out),
                _ => x86::rows_one_avx2(w, nrows, x, out),
            }
        }
        return;
    }
    with_tiled(w, nrows, cols, layout, |w| match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `tiles_bf16` checked the level (one the CPU has); shapes above.
        SimdLevel::Avx512 => unsafe { x86::tiled_avx512(w, nrows, x, ntok, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        _ => unsafe { x86::tiled_avx2(w, nrows, x, ntok, out, ldo) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("BF16 tiles are x86 only: {}", w.len()),
    })
}

thread_local! {
    /// [`even_odd`]'s activations, reused across calls.
    static EVEN_ODD: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether BF16 rows of `cols` at `level` take their activations as [`to_even_odd`] lays them
/// out ([`gemm_even_odd`]): the BF16 row tiles of AVX2 and AVX-512, for widths [`tiles_bf16`]
/// does not take (with f32 activations, see [`bf16_activations`]). Callers that multiply many
/// row tiles by the same activations lay them out once.
pub fn even_odd_activations(level: SimdLevel, dtype: DType, cols: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && matches!(level, SimdLevel::Avx2 | SimdLevel::Avx512)
        && dtype == DType::BF16
        && !tiles_bf16(level, dtype, cols)
}

/// Columns per group of [`to_even_odd`]'s layout at `level`: one load of BF16 weights.
fn even_odd_group(level: SimdLevel) -> usize {
    if level == SimdLevel::Avx512 {
        32
    } else {
        16
    }
}

/// The length of one token's activations as [`to_even_odd`] lays them out at `level`.
pub fn even_odd_width(level: SimdLevel, cols: usize) -> usize {
    cols.div_ceil(even_odd_group(level)) * even_odd_group(level)
}

/// `x` (`ntok` rows of `cols`) laid out for [`gemm_even_odd`] at `level`.
pub fn to_even_odd(level: SimdLevel, x: &[f32], ntok: usize, cols: usize) -> Vec<f32> {
    let mut xp = Vec::new();
    even_odd(x, ntok, cols, even_odd_group(level), &mut xp);
    xp
}

/// [`gemm`] of BF16 rows (of a width [`even_odd_activations`] takes) with activations laid out
/// by [`to_even_odd`] (`ntok` rows of [`even_odd_width`]): the same bits as [`gemm`] gives.
#[allow(clippy::too_many_arguments)]
pub fn gemm_even_odd(level: SimdLevel, w: &[u8], nrows: usize, xp: &[f32], ntok: usize, out: &mut [f32], ldo: usize) {
    if nrows == 0 || ntok == 0 {
        return;
    }
    let cols = bf16_cols(w.len(), nrows, Layout::Rows);
    assert!(even_odd_activations(level, DType::BF16, cols), "no even/odd activations for {cols} columns at {level:?}");
    assert!(
        xp.len() == ntok * even_odd_width(level, cols) && ldo >= nrows && out.len() >= (ntok - 1) * ldo + nrows,
        "even/odd tile shapes"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `even_odd_activations` checked the level (one the CPU has); shapes above.
        SimdLevel::Avx512 => unsafe { x86::gemm_avx512(DType::BF16, w, nrows, xp, ntok, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        _ => unsafe { x86::gemm_avx2(DType::BF16, w, nrows, xp, ntok, out, ldo) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("even/odd activations are x86 only: {}", w.len()),
    }
}

/// `x` (`ntok` rows of `cols`) as the BF16 tiles read it: per `group` columns, the even ones then
/// the odd ones, each row zero-padded to a multiple of `group`. One load of `group` BF16
/// weights widens to its even weights with one shift and its odd ones with one mask, instead of
/// two byte shuffles (`vpmovzxwd`, one port on most x86 cores, which bounded decode).
fn even_odd(x: &[f32], ntok: usize, cols: usize, group: usize, xp: &mut Vec<f32>) {
    let padded = cols.div_ceil(group) * group;
    let half = group / 2;
    xp.clear();
    xp.resize(ntok * padded, 0.0);
    for (src, dst) in x.chunks_exact(cols.max(1)).zip(xp.chunks_exact_mut(padded.max(1))) {
        // Group by group, pair by pair (no index arithmetic per value: 3% of a BF16 prefill).
        for (s, d) in src.chunks(group).zip(dst.chunks_exact_mut(group)) {
            let (even, odd) = d.split_at_mut(half);
            for ((pair, e), o) in s.chunks(2).zip(even).zip(odd) {
                *e = pair[0];
                *o = pair.get(1).copied().unwrap_or(0.0);
            }
        }
    }
}

/// Whether BF16 rows at `level` multiply bf16-rounded activations with `vdpbf16ps` (AVX-512
/// BF16: two products per lane per instruction) when the matrix asks for it (`wanted`,
/// [`crate::matmul::WeightView::bf16_activations`]) and the CPU runs it faster than f32 FMAs
/// ([`crate::cpu::fast_bf16_dot`]). This is what llama.cpp (and any engine computing "in bf16")
/// does for BF16 weights: each activation loses its low 16 bits (relative error <= 2^-9). Other
/// levels and CPUs, and matrices that do not ask, keep f32 activations ([`gemm_even_odd`]), whose
/// results match an f32 computation over bf16 weights.
pub fn bf16_activations(level: SimdLevel, dtype: DType, wanted: bool) -> bool {
    wanted && has_bf16_dot(level, dtype) && crate::cpu::fast_bf16_dot()
}

/// Whether BF16 rows of `cols` columns can run on AMX tiles at `level` ([`gemm_bf16_amx`], which
/// takes [`to_bf16_pairs`]): AMX is on ([`crate::cpu::has_amx`]) and the width a multiple of 32.
/// [`crate::matmul`] uses them for matrices that ask for bf16 activations and have no one-token
/// products ([`crate::matmul::WeightView::prefill_only`]).
pub fn bf16_on_amx(level: SimdLevel, cols: usize) -> bool {
    level == SimdLevel::Avx512 && crate::cpu::has_amx() && cols.is_multiple_of(32) && cols > 0
}

/// Whether a BF16 matrix of `cols` columns has a [`tile_bf16`] layout ([`Layout::Interleaved`]).
pub fn interleaves_bf16(dtype: DType, cols: usize) -> bool {
    dtype == DType::BF16 && cols.is_multiple_of(32) && cols > 0
}

/// Where the two bytes of weight `(r, c)` lie in [`tile_bf16`]'s layout of rows of `cols` values.
pub fn tiled_bf16_at(cols: usize, r: usize, c: usize) -> usize {
    r / GROUP_ROWS * GROUP_ROWS * cols * 2 + c / 2 * 64 + r % GROUP_ROWS * 4 + c % 2 * 2
}

/// BF16 rows (`rows` x `cols`, one after another) in the layout the BF16 tiles of AVX2 and
/// AVX-512 read ([`Layout::Interleaved`]): groups of 16 rows (zero rows complete the last), and
/// in each group, pair by pair of columns, the 16 rows' pairs as 16 dwords (the even column in
/// the low half). One 64-byte load then holds two columns of 16 rows: a shift widens the even
/// column to f32 and a mask the odd one, each a vector of the 16 rows that a token's broadcast
/// value multiplies; the sums need no horizontal adds, and one token reads each group as one
/// stream. (`vdpbf16ps` takes the dwords as they are: its lanes multiply pairs.)
pub fn tile_bf16(rows: usize, cols: usize, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; tiled_bf16_bytes(rows, cols)];
    tile_bf16_into(rows, cols, data, &mut out);
    out
}

/// The bytes of a [`tile_bf16`] matrix.
pub fn tiled_bf16_bytes(rows: usize, cols: usize) -> usize {
    rows.div_ceil(GROUP_ROWS) * GROUP_ROWS * cols * 2
}

/// [`tile_bf16`] into `out`, which has [`tiled_bf16_bytes`] zero bytes (such as a
/// [`crate::huge::HugeArena`] buffer).
pub fn tile_bf16_into(rows: usize, cols: usize, data: &[u8], out: &mut [u8]) {
    check_rows(rows, cols, data);
    let groups = rows.div_ceil(GROUP_ROWS);
    assert_eq!(out.len(), tiled_bf16_bytes(rows, cols), "tiled BF16 size of {rows} x {cols}");
    let dst = crate::dot::SharedBytes(out.as_mut_ptr());
    let dst = &dst;
    crate::parallel::for_each_range(groups, data.len(), |g0, g1| {
        let gb = GROUP_ROWS * cols * 2;
        // SAFETY: groups `g0..g1` of `out` (whole groups of `gb` bytes) are this range's alone
        // while `out` is borrowed here.
        let part = unsafe { std::slice::from_raw_parts_mut(dst.0.add(g0 * gb), (g1 - g0) * gb) };
        tile_groups(data, rows, cols, g0, part);
    });
}

fn check_rows(rows: usize, cols: usize, data: &[u8]) {
    assert!(
        interleaves_bf16(DType::BF16, cols) && data.len() == rows * cols * 2,
        "{} bytes are not {rows} BF16 rows of {cols}",
        data.len()
    );
}

/// Groups `g0..` of [`tile_bf16`]'s layout of the rows `data` (`rows` x `cols`) into `out`
/// (whole groups; every byte written, rows past `rows` as zeros).
fn tile_groups(data: &[u8], rows: usize, cols: usize, g0: usize, out: &mut [u8]) {
    let rb = cols * 2;
    assert!(out.len().is_multiple_of(GROUP_ROWS * rb) && data.len() >= rows * rb);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the levels name what the CPU has; `out` holds whole groups (asserted), `data` the
    // rows, and only rows below `rows` are read.
    match crate::cpu::level() {
        SimdLevel::Avx512 => return unsafe { x86::tile_groups_avx512(data, rows, cols, g0, out) },
        SimdLevel::Avx2 => return unsafe { x86::tile_groups_avx2(data, rows, cols, g0, out) },
        SimdLevel::Scalar => {}
    }
    for (g, group) in out.chunks_exact_mut(GROUP_ROWS * rb).enumerate() {
        let r0 = (g0 + g) * GROUP_ROWS;
        // 16 pairs at a time (a line of each row, 1 KiB of the group), so the scattered writes
        // stay in L1 (pair by pair over whole rows, loading took 50% longer than row copies).
        for (b, block) in group.chunks_exact_mut(16 * 64).enumerate() {
            for i in 0..GROUP_ROWS {
                let line = if r0 + i < rows { &data[(r0 + i) * rb + 64 * b..][..64] } else { &[0; 64] };
                for (pair, dst) in line.chunks_exact(4).zip(block.chunks_exact_mut(64)) {
                    dst[4 * i..4 * i + 4].copy_from_slice(pair);
                }
            }
        }
    }
}

thread_local! {
    /// Rows laid out by [`tile_bf16`] for one call ([`with_tiled`]), reused across calls.
    static TILED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` over BF16 rows of `cols` (a width [`interleaves_bf16`] takes) in [`tile_bf16`]'s
/// layout: `w` itself if stored so, else `w`'s rows laid out so for this call (the same sums
/// from either layout, at one more pass over the weights for rows).
fn with_tiled<R>(w: &[u8], nrows: usize, cols: usize, layout: Layout, f: impl FnOnce(&[u8]) -> R) -> R {
    if layout == Layout::Interleaved {
        return f(w);
    }
    check_rows(nrows, cols, w);
    TILED.with_borrow_mut(|buf| {
        // Only grown: `tile_groups` writes every byte it is given.
        let len = nrows.div_ceil(GROUP_ROWS) * GROUP_ROWS * cols * 2;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        tile_groups(w, nrows, cols, 0, &mut buf[..len]);
        f(&buf[..len])
    })
}

/// Row `r`'s bytes from [`tile_bf16`]'s layout of rows of `cols` values, into `out` (`2 cols`).
pub fn tiled_row_bf16(data: &[u8], cols: usize, r: usize, out: &mut [u8]) {
    assert_eq!(out.len(), cols * 2);
    let at = tiled_bf16_at(cols, r, 0);
    for (p, pair) in out.chunks_exact_mut(4).enumerate() {
        pair.copy_from_slice(&data[at + 64 * p..][..4]);
    }
}

/// The first `nrows` rows of `cols` values of [`tile_bf16`]'s layout `w` (whole groups of 16
/// rows) restored into `buf` one after another, as [`Layout::Rows`] holds them, for the AMX
/// tiles. `buf` only grows: it is written, never cleared first.
pub fn restore_rows_bf16<'a>(w: &[u8], nrows: usize, cols: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
    let len = nrows * cols * 2;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let rows = &mut buf[..len];
    for (r, row) in rows.chunks_exact_mut(cols * 2).enumerate() {
        tiled_row_bf16(w, cols, r, row);
    }
    rows
}

/// Activations rounded to bf16 and transposed by pairs of columns for [`gemm_bf16_amx`]
/// ([`to_bf16_pairs`]).
pub struct Bf16Pairs {
    buf: Vec<u32>,
    /// Where the first pair row starts in `buf`: 64-byte aligned.
    start: usize,
    /// Tokens per pair row: the tokens rounded up to 16, so every tile row (16 tokens) is one
    /// aligned cache line (a tile load of lines split across two ran at half the speed).
    pub(crate) stride: usize,
    pub(crate) ntok: usize,
    pub(crate) cols: usize,
}

impl Bf16Pairs {
    /// Pair row `p` (columns `2p`, `2p + 1`) of tokens `t..`.
    pub(crate) fn at(&self, p: usize, t: usize) -> *const u32 {
        self.buf[self.start + p * self.stride + t..].as_ptr()
    }
}

/// `x` (`ntok` tokens of `cols` values, token-major) rounded to bf16 and transposed by pairs of
/// columns: pair row `p` holds columns `2p` (low half) and `2p + 1` of every token, then zeros
/// up to a multiple of 16 tokens; 16 more zeros follow the last row.
pub fn to_bf16_pairs(x: &[f32], ntok: usize, cols: usize) -> Bf16Pairs {
    assert!(cols.is_multiple_of(2) && x.len() == ntok * cols, "{ntok} tokens of {cols} columns");
    let stride = ntok.next_multiple_of(16);
    // 16 zeros after the last row: a tile row of 16 tokens from any token reads inside.
    let len = cols / 2 * stride + 16;
    let mut buf = vec![0u32; len + 15];
    let start = (16 - (buf.as_ptr() as usize / 4) % 16) % 16;
    buf.truncate(start + len);
    let out = &mut buf[start..start + cols / 2 * stride];
    #[cfg(target_arch = "x86_64")]
    if cols.is_multiple_of(32) && crate::cpu::level() == SimdLevel::Avx512 && crate::cpu::has_avx512_bf16() {
        // SAFETY: the CPU has AVX-512 F and BF16 (checked); `out` is aligned and sized above.
        unsafe { crate::dot::amx::bf16_pairs(x, ntok, cols, out, stride) };
        return Bf16Pairs { buf, start, stride, ntok, cols };
    }
    // Blocks of 16 tokens x 16 pairs, so both the reads and the writes run along lines.
    for t0 in (0..ntok).step_by(16) {
        for p0 in (0..cols / 2).step_by(16) {
            for t in t0..(t0 + 16).min(ntok) {
                let row = &x[t * cols..(t + 1) * cols];
                for p in p0..(p0 + 16).min(cols / 2) {
                    let lo = half::bf16::from_f32(row[2 * p]).to_bits();
                    let hi = half::bf16::from_f32(row[2 * p + 1]).to_bits();
                    out[p * stride + t] = lo as u32 | (hi as u32) << 16;
                }
            }
        }
    }
    Bf16Pairs { buf, start, stride, ntok, cols }
}

/// [`gemm_bf16`] on AMX tiles, where [`bf16_on_amx`] says: BF16 rows `w` (one after another)
/// times tokens `t0..t1` of `xt`, `out[(t - t0) * ldo + r]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_amx(
    level: SimdLevel,
    w: &[u8],
    nrows: usize,
    xt: &Bf16Pairs,
    tokens: (usize, usize),
    out: &mut [f32],
    ldo: usize,
) {
    assert!(nrows > 0 && w.len().is_multiple_of(nrows) && bf16_on_amx(level, w.len() / nrows / 2));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `bf16_on_amx` checked `has_amx()` (the CPU and the OS); `gemm_bf16` checks shapes.
    unsafe {
        crate::dot::amx::gemm_bf16(w, nrows, xt, tokens, out, ldo)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AMX is x86-64 only: {} {:?} {} {}", xt.ntok, tokens, out.len(), ldo)
}

/// Whether [`gemm_bf16`] can run at `level`: BF16 rows, AVX-512 with BF16.
pub fn has_bf16_dot(level: SimdLevel, dtype: DType) -> bool {
    dtype == DType::BF16 && level == SimdLevel::Avx512 && crate::cpu::has_avx512_bf16()
}

/// `x` rounded to bf16 (to nearest even), as the bits [`gemm_bf16`] takes.
pub fn to_bf16(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}

/// A batch-invariant tile of BF16 rows (in either layout, as [`gemm_tiled`]) times bf16
/// activations `xb` (`ntok` tokens, token-major): `out[t * ldo + r]`. Only where
/// [`bf16_activations`] says so. Widths [`interleaves_bf16`] takes run on [`tile_bf16`]'s
/// layout, one `vdpbf16ps` per pair of columns for 16 rows; other widths on row tiles.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    level: SimdLevel,
    w: &[u8],
    nrows: usize,
    layout: Layout,
    xb: &[u16],
    ntok: usize,
    out: &mut [f32],
    ldo: usize,
) {
    assert!(has_bf16_dot(level, DType::BF16), "vdpbf16ps is not available at {level:?}");
    assert!(nrows > 0 && ntok > 0 && xb.len().is_multiple_of(ntok));
    assert_eq!(bf16_cols(w.len(), nrows, layout), xb.len() / ntok, "row and activation widths differ");
    assert!(ldo >= nrows && out.len() >= (ntok - 1) * ldo + nrows);
    let cols = xb.len() / ntok;
    #[cfg(target_arch = "x86_64")]
    if interleaves_bf16(DType::BF16, cols) && layout == Layout::Rows && ntok == 1 {
        // SAFETY: `has_bf16_dot` checked the CPU has AVX-512 F/BW/VL and BF16; shapes above.
        unsafe { x86::rows_one_bf16_avx512(w, nrows, xb, out) }
    } else if interleaves_bf16(DType::BF16, cols) {
        // SAFETY: as above.
        with_tiled(w, nrows, cols, layout, |w| unsafe { x86::tiled_bf16_avx512(w, nrows, xb, ntok, out, ldo) })
    } else {
        // SAFETY: as above (rows: other widths are never interleaved).
        unsafe { x86::gemm_bf16_avx512(w, nrows, xb, ntok, out, ldo) }
    }
}

/// The columns of `nrows` BF16 rows held in `len` bytes in `layout` (whole groups of 16 rows
/// of a multiple of 32 columns in [`Layout::Interleaved`]), asserted.
fn bf16_cols(len: usize, nrows: usize, layout: Layout) -> usize {
    let stored = match layout {
        Layout::Rows => nrows,
        Layout::Interleaved => nrows.div_ceil(GROUP_ROWS) * GROUP_ROWS,
    };
    let cols = len / stored / 2;
    assert!(len == stored * cols * 2, "{len} bytes are not {nrows} BF16 rows in {layout:?}");
    assert!(layout == Layout::Rows || cols.is_multiple_of(32), "interleaved BF16 rows of {cols} columns");
    cols
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{DType, GROUP_ROWS};

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The element type of a row, as a const parameter so each tile kernel is specialised.
    const F32: u8 = 0;
    const F16: u8 = 1;
    const BF16: u8 = 2;

    #[inline(always)]
    unsafe fn widen16<const D: u8>(p: *const u8) -> __m512 {
        match D {
            F32 => _mm512_loadu_ps(p as *const f32),
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                p as *const __m256i,
            )))),
        }
    }

    #[inline(always)]
    unsafe fn widen8<const D: u8>(p: *const u8) -> __m256 {
        match D {
            F32 => _mm256_loadu_ps(p as *const f32),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                p as *const __m128i,
            )))),
        }
    }

    const R1_AVX512: usize = 8;
    const R1_AVX2: usize = 6;

    /// Walks a `nrows x ntok` block of rows in tiles of `R` rows x (`T` or 1) tokens. Rows past
    /// the end of a partial row tile repeat the tile's first row and their results are dropped,
    /// so every written output comes from the same per-accumulator code.
    macro_rules! tile_driver {
        ($name:ident, $kernel:ident, $feat:literal, $r:literal, $t:literal, $r1:ident) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(
                dtype: DType,
                w: &[u8],
                nrows: usize,
                x: &[f32],
                ntok: usize,
                out: &mut [f32],
                ldo: usize,
            ) {
                match dtype {
                    DType::F32 => drive::<F32>(w, nrows, x, ntok, out, ldo),
                    DType::F16 => drive::<F16>(w, nrows, x, ntok, out, ldo),
                    _ => drive::<BF16>(w, nrows, x, ntok, out, ldo),
                }

                #[target_feature(enable = $feat)]
                unsafe fn drive<const D: u8>(
                    w: &[u8],
                    nrows: usize,
                    x: &[f32],
                    ntok: usize,
                    out: &mut [f32],
                    ldo: usize,
                ) {
                    let rb = w.len() / nrows;
                    // The weights' columns; the activations' stride may be padded (BF16).
                    let cols = rb / if D == F32 { 4 } else { 2 };
                    let xs_stride = x.len() / ntok;
                    let row = |r: usize| w.as_ptr().add(r * rb);
                    if ntok == 1 {
                        // Decode: more rows per tile, so more accumulator chains and more
                        // streams from memory at once (a pair's operations are the same).
                        let mut r0 = 0;
                        while r0 < nrows {
                            let live = (nrows - r0).min($r1);
                            let rows: [*const u8; $r1] =
                                std::array::from_fn(|i| row(r0 + if i < live { i } else { 0 }));
                            // The next tile's rows, a line ahead of each as this one reads it.
                            let sums = $kernel::<D, $r1, 1>(rows, [x.as_ptr()], cols, $r1 * rb);
                            crate::dot::put(out, r0, &sums[0], live);
                            r0 += $r1;
                        }
                        return;
                    }
                    // Token tiles outside, row tiles inside: a tile's tokens (f32, up to twice the
                    // bytes of its BF16 or F16 rows) stay in L1 while the rows stream from L2.
                    let row_tile = |r0: usize| {
                        let live = (nrows - r0).min($r);
                        let rows: [*const u8; $r] = std::array::from_fn(|i| row(r0 + if i < live { i } else { 0 }));
                        (rows, live)
                    };
                    let mut t0 = 0;
                    while t0 + $t <= ntok {
                        let xs: [*const f32; $t] = std::array::from_fn(|j| x.as_ptr().add((t0 + j) * xs_stride));
                        for r0 in (0..nrows).step_by($r) {
                            let (rows, live) = row_tile(r0);
                            let sums = $kernel::<D, $r, $t>(rows, xs, cols, 0);
                            for (j, row_sums) in sums.iter().enumerate() {
                                for i in 0..live {
                                    out[(t0 + j) * ldo + r0 + i] = row_sums[i];
                                }
                            }
                        }
                        t0 += $t;
                    }
                    while t0 < ntok {
                        for r0 in (0..nrows).step_by($r) {
                            let (rows, live) = row_tile(r0);
                            let sums = $kernel::<D, $r, 1>(rows, [x.as_ptr().add(t0 * xs_stride)], cols, 0);
                            for i in 0..live {
                                out[t0 * ldo + r0 + i] = sums[0][i];
                            }
                        }
                        t0 += 1;
                    }
                }
            }
        };
    }

    /// Asks for the line `at` bytes past each row into L2 (a prefetch never faults, wherever it
    /// points). The one-token tiles call it once per line they read, with `at` reaching into the
    /// next tile's rows. The hardware prefetchers alone kept float decode at 65-88% of the read
    /// bandwidth; with it, Qwen3-0.6B-shaped BF16 decoded 19.5 -> 22.1 tok/s (AVX-512) and
    /// 16.1 -> 19.9 (AVX2), F16 18.0 -> 22.0 and 16.7 -> 21.7 (2 threads, Sapphire Rapids).
    #[inline(always)]
    unsafe fn prefetch_lines<const R: usize>(rows: &[*const u8; R], at: usize) {
        prefetch_lines_with::<R, _MM_HINT_T1>(rows, at)
    }

    /// [`prefetch_lines`] with hint `H`.
    #[inline(always)]
    unsafe fn prefetch_lines_with<const R: usize, const H: i32>(rows: &[*const u8; R], at: usize) {
        for row in rows {
            _mm_prefetch::<H>(row.wrapping_add(at) as *const i8);
        }
    }

    /// Sums of `R` rows times `T` tokens, `[token][row]`, 16 columns per FMA.
    #[inline(always)]
    unsafe fn tile512<const D: u8, const R: usize, const T: usize>(
        rows: [*const u8; R],
        xs: [*const f32; T],
        cols: usize,
        ahead: usize,
    ) -> [[f32; R]; T] {
        if D == BF16 {
            return tile512_bf16::<R, T>(rows, xs, cols, ahead);
        }
        let esz = if D == F32 { 4 } else { 2 };
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        let full = cols / 16 * 16;
        let mut c = 0;
        while c < full {
            if ahead != 0 && (c * esz) % 64 == 0 {
                prefetch_lines(&rows, c * esz + ahead);
            }
            let wv: [__m512; R] = std::array::from_fn(|i| widen16::<D>(rows[i].add(c * esz)));
            for j in 0..T {
                let xv = _mm512_loadu_ps(xs[j].add(c));
                for i in 0..R {
                    acc[j][i] = _mm512_fmadd_ps(wv[i], xv, acc[j][i]);
                }
            }
            c += 16;
        }
        if full < cols {
            // The last partial vector, zero-padded through stack copies.
            let n = cols - full;
            let mut wpad = [[0u8; 64]; R];
            for i in 0..R {
                std::ptr::copy_nonoverlapping(rows[i].add(full * esz), wpad[i].as_mut_ptr(), n * esz);
            }
            for j in 0..T {
                let mut xpad = [0f32; 16];
                std::ptr::copy_nonoverlapping(xs[j].add(full), xpad.as_mut_ptr(), n);
                let xv = _mm512_loadu_ps(xpad.as_ptr());
                for i in 0..R {
                    acc[j][i] = _mm512_fmadd_ps(widen16::<D>(wpad[i].as_ptr()), xv, acc[j][i]);
                }
            }
        }
        let mut sums = [[0f32; R]; T];
        for j in 0..T {
            for i in 0..R {
                sums[j][i] = _mm512_reduce_add_ps(acc[j][i]);
            }
        }
        sums
    }

    /// [`tile512`] of BF16 rows, 32 columns per step against [`super::even_odd`]'s activations
    /// (groups of 32): a 64-byte load of a row gives its even columns (shifted up) and its odd
    /// ones (masked), and each accumulator takes both FMAs, even first: the same operations in
    /// every tile shape. (`vpmovzxwd` and a shift per 16 weights, as `widen16` does, put a byte
    /// shuffle on every vector; here the widening is one shift or one `and` per 16 weights.)
    #[inline(always)]
    unsafe fn tile512_bf16<const R: usize, const T: usize>(
        rows: [*const u8; R],
        xs: [*const f32; T],
        cols: usize,
        ahead: usize,
    ) -> [[f32; R]; T] {
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let widen = |raw: __m512i| {
            (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw)), _mm512_castsi512_ps(_mm512_and_si512(raw, hi)))
        };
        let full = cols / 32 * 32;
        let mut c = 0;
        while c < full {
            if ahead != 0 {
                prefetch_lines(&rows, 2 * c + ahead);
            }
            let w: [(__m512, __m512); R] =
                std::array::from_fn(|i| widen(_mm512_loadu_si512(rows[i].add(2 * c) as *const _)));
            for j in 0..T {
                let (xe, xo) = (_mm512_loadu_ps(xs[j].add(c)), _mm512_loadu_ps(xs[j].add(c + 16)));
                for i in 0..R {
                    acc[j][i] = _mm512_fmadd_ps(w[i].1, xo, _mm512_fmadd_ps(w[i].0, xe, acc[j][i]));
                }
            }
            c += 32;
        }
        if full < cols {
            // The last partial group, zero-padded through stack copies (the activations are
            // padded already).
            let mut wpad = [[0u8; 64]; R];
            for i in 0..R {
                std::ptr::copy_nonoverlapping(rows[i].add(2 * full), wpad[i].as_mut_ptr(), 2 * (cols - full));
            }
            for j in 0..T {
                let (xe, xo) = (_mm512_loadu_ps(xs[j].add(full)), _mm512_loadu_ps(xs[j].add(full + 16)));
                for i in 0..R {
                    let (we, wo) = widen(_mm512_loadu_si512(wpad[i].as_ptr() as *const _));
                    acc[j][i] = _mm512_fmadd_ps(wo, xo, _mm512_fmadd_ps(we, xe, acc[j][i]));
                }
            }
        }
        let mut sums = [[0f32; R]; T];
        for j in 0..T {
            for i in 0..R {
                sums[j][i] = _mm512_reduce_add_ps(acc[j][i]);
            }
        }
        sums
    }

    /// Sums of `R` rows times `T` tokens, `[token][row]`, 8 columns per FMA.
    #[inline(always)]
    unsafe fn tile256<const D: u8, const R: usize, const T: usize>(
        rows: [*const u8; R],
        xs: [*const f32; T],
        cols: usize,
        ahead: usize,
    ) -> [[f32; R]; T] {
        if D == BF16 {
            return tile256_bf16::<R, T>(rows, xs, cols, ahead);
        }
        let esz = if D == F32 { 4 } else { 2 };
        let mut acc = [[_mm256_setzero_ps(); R]; T];
        let full = cols / 8 * 8;
        let mut c = 0;
        while c < full {
            if ahead != 0 && (c * esz) % 64 == 0 {
                prefetch_lines(&rows, c * esz + ahead);
            }
            let wv: [__m256; R] = std::array::from_fn(|i| widen8::<D>(rows[i].add(c * esz)));
            for j in 0..T {
                let xv = _mm256_loadu_ps(xs[j].add(c));
                for i in 0..R {
                    acc[j][i] = _mm256_fmadd_ps(wv[i], xv, acc[j][i]);
                }
            }
            c += 8;
        }
        if full < cols {
            let n = cols - full;
            let mut wpad = [[0u8; 32]; R];
            for i in 0..R {
                std::ptr::copy_nonoverlapping(rows[i].add(full * esz), wpad[i].as_mut_ptr(), n * esz);
            }
            for j in 0..T {
                let mut xpad = [0f32; 8];
                std::ptr::copy_nonoverlapping(xs[j].add(full), xpad.as_mut_ptr(), n);
                let xv = _mm256_loadu_ps(xpad.as_ptr());
                for i in 0..R {
                    acc[j][i] = _mm256_fmadd_ps(widen8::<D>(wpad[i].as_ptr()), xv, acc[j][i]);
                }
            }
        }
        let mut sums = [[0f32; R]; T];
        for j in 0..T {
            for i in 0..R {
                sums[j][i] = hsum256(acc[j][i]);
            }
        }
        sums
    }

    /// 32 bytes at `p`, loaded again even where the compiler holds them in a register already.
    #[target_feature(enable = "avx")]
    #[inline]
    unsafe fn reload(p: *const u8) -> __m256i {
        let raw: __m256i;
        // SAFETY: the caller's `p` is readable for 32 bytes; the load is unaligned.
        unsafe {
            std::arch::asm!(
                "vmovdqu {raw}, ymmword ptr [{p}]",
                raw = out(ymm_reg) raw,
                p = in(reg) p,
                options(readonly, nostack, preserves_flags)
            );
        }
        raw
    }

    /// [`tile256`] of BF16 rows, 16 columns per step against [`super::even_odd`]'s activations:
    /// a 32-byte load of a row gives its even columns (shifted up) and its odd ones (masked), and
    /// each accumulator takes both FMAs, even first: the same operations in every tile shape.
    #[inline(always)]
    unsafe fn tile256_bf16<const R: usize, const T: usize>(
        rows: [*const u8; R],
        xs: [*const f32; T],
        cols: usize,
        ahead: usize,
    ) -> [[f32; R]; T] {
        let mut acc = [[_mm256_setzero_ps(); R]; T];
        let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let widen = |raw: __m256i| {
            (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw)), _mm256_castsi256_ps(_mm256_and_si256(raw, hi)))
        };
        let full = cols / 16 * 16;
        let mut c = 0;
        while c < full {
            if ahead != 0 && (2 * c) % 64 == 0 {
                prefetch_lines(&rows, 2 * c + ahead);
            }
            if T == 1 {
                // One token (decode): both halves of each row from one load; R rows of two
                // vectors and R accumulators fit the registers.
                let xe = _mm256_loadu_ps(xs[0].add(c));
                let xo = _mm256_loadu_ps(xs[0].add(c + 8));
                for i in 0..R {
                    let (we, wo) = widen(_mm256_loadu_si256(rows[i].add(2 * c) as *const __m256i));
                    acc[0][i] = _mm256_fmadd_ps(wo, xo, _mm256_fmadd_ps(we, xe, acc[0][i]));
                }
                c += 16;
                continue;
            }
            // Many tokens: the even columns of every row, then the odd ones, each row's 32 bytes
            // loaded twice (from L1), so R x T accumulators, R widened rows and one token vector
            // fit the 16 registers. The second load is `reload`: a plain one the compiler merges
            // with the first and keeps both halves live, spilling accumulators (prefill of the
            // Qwen3-0.6B-shaped BF16 file 165 -> 118 tok/s).
            let we: [__m256; R] = std::array::from_fn(|i| {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_loadu_si256(rows[i].add(2 * c) as *const __m256i)))
            });
            for j in 0..T {
                let xe = _mm256_loadu_ps(xs[j].add(c));
                for i in 0..R {
                    acc[j][i] = _mm256_fmadd_ps(we[i], xe, acc[j][i]);
                }
            }
            let wo: [__m256; R] =
                std::array::from_fn(|i| _mm256_castsi256_ps(_mm256_and_si256(reload(rows[i].add(2 * c)), hi)));
            for j in 0..T {
                let xo = _mm256_loadu_ps(xs[j].add(c + 8));
                for i in 0..R {
                    acc[j][i] = _mm256_fmadd_ps(wo[i], xo, acc[j][i]);
                }
            }
            c += 16;
        }
        if full < cols {
            // The last partial group, zero-padded through stack copies (the activations are
            // padded already).
            let mut wpad = [[0u8; 32]; R];
            for i in 0..R {
                std::ptr::copy_nonoverlapping(rows[i].add(2 * full), wpad[i].as_mut_ptr(), 2 * (cols - full));
            }
            for j in 0..T {
                let (xe, xo) = (_mm256_loadu_ps(xs[j].add(full)), _mm256_loadu_ps(xs[j].add(full + 8)));
                for i in 0..R {
                    let (we, wo) = widen(_mm256_loadu_si256(wpad[i].as_ptr() as *const __m256i));
                    acc[j][i] = _mm256_fmadd_ps(wo, xo, _mm256_fmadd_ps(we, xe, acc[j][i]));
                }
            }
        }
        let mut sums = [[0f32; R]; T];
        for j in 0..T {
            for i in 0..R {
                sums[j][i] = hsum256(acc[j][i]);
            }
        }
        sums
    }

    // 3 rows x 8 tokens: 24 accumulators, 6 widened halves of rows and the token vectors fill
    // the 32 zmm registers, and a row's widening (a shift and an `and` per 32 BF16 weights)
    // serves 8 tokens instead of 4 (`cargo bench ... matmul_BF16-tiled_n64/avx512`, 2 threads,
    // Granite-Rapids-class: 98.5 -> 122 GMAC/s; 2 x 8: 112; rows layout 119 -> 131; F16 114 ->
    // 119).
    tile_driver!(gemm_avx512, tile512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c", 3, 8, R1_AVX512);
    // 3 rows x 4 tokens: 12 accumulators, 3 widened rows and a token vector fill the 16 ymm
    // registers (2 x 4 left FMA ports idle: Qwen3-0.6B-shaped BF16 prefill at AVX2 138 -> 163
    // tok/s; 4 x 3 and 6 x 2 spill, 139 and 122).
    tile_driver!(gemm_avx2, tile256, "avx2,fma,f16c", 3, 4, R1_AVX2);

    /// Sums of `R` BF16 rows times `T` bf16 tokens, `[token][row]`, 32 columns per `vdpbf16ps`.
    #[inline(always)]
    unsafe fn tile_bf16<const R: usize, const T: usize>(
        rows: [*const u8; R],
        xs: [*const u16; T],
        cols: usize,
        ahead: usize,
    ) -> [[f32; R]; T] {
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        let full = cols / 32 * 32;
        let mut c = 0;
        while c < full {
            if ahead != 0 {
                prefetch_lines(&rows, 2 * c + ahead);
            }
            let wv: [__m512bh; R] =
                std::array::from_fn(|i| std::mem::transmute(_mm512_loadu_si512(rows[i].add(2 * c) as *const _)));
            for j in 0..T {
                let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(xs[j].add(c) as *const _));
                for i in 0..R {
                    acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[i], xv);
                }
            }
            c += 32;
        }
        if full < cols {
            // The last partial vector, zero-padded through stack copies.
            let n = cols - full;
            let mut wpad = [[0u16; 32]; R];
            for i in 0..R {
                std::ptr::copy_nonoverlapping(rows[i].add(2 * full), wpad[i].as_mut_ptr() as *mut u8, 2 * n);
            }
            for j in 0..T {
                let mut xpad = [0u16; 32];
                std::ptr::copy_nonoverlapping(xs[j].add(full), xpad.as_mut_ptr(), n);
                let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(xpad.as_ptr() as *const _));
                for i in 0..R {
                    let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(wpad[i].as_ptr() as *const _));
                    acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv, xv);
                }
            }
        }
        let mut sums = [[0f32; R]; T];
        for j in 0..T {
            for i in 0..R {
                sums[j][i] = _mm512_reduce_add_ps(acc[j][i]);
            }
        }
        sums
    }

    /// [`tile_bf16`] over rows (widths the tiled layout does not take; see
    /// [`super::gemm_bf16`]).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and BF16; shapes as [`super::gemm_bf16`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn gemm_bf16_avx512(w: &[u8], nrows: usize, xb: &[u16], ntok: usize, out: &mut [f32], ldo: usize) {
        const R: usize = 4;
        const T: usize = 4;
        let rb = w.len() / nrows;
        let cols = xb.len() / ntok;
        let row = |r: usize| w.as_ptr().add(r * rb);
        if ntok == 1 {
            // Decode: more rows per tile, as in `tile_driver` (a pair's operations are the same).
            let mut r0 = 0;
            while r0 < nrows {
                let live = (nrows - r0).min(R1_AVX512);
                let rows: [*const u8; R1_AVX512] = std::array::from_fn(|i| row(r0 + if i < live { i } else { 0 }));
                // The next tile's rows, a line ahead of each as this one reads it.
                let sums = tile_bf16::<R1_AVX512, 1>(rows, [xb.as_ptr()], cols, R1_AVX512 * rb);
                crate::dot::put(out, r0, &sums[0], live);
                r0 += R1_AVX512;
            }
            return;
        }
        let mut r0 = 0;
        while r0 < nrows {
            // Rows past the end of a partial tile repeat its first row; their sums are dropped.
            let live = (nrows - r0).min(R);
            let rows: [*const u8; R] = std::array::from_fn(|i| row(r0 + if i < live { i } else { 0 }));
            let mut t0 = 0;
            while t0 + T <= ntok {
                let xs: [*const u16; T] = std::array::from_fn(|j| xb.as_ptr().add((t0 + j) * cols));
                let sums = tile_bf16::<R, T>(rows, xs, cols, 0);
                for (j, row_sums) in sums.iter().enumerate() {
                    crate::dot::put(out, (t0 + j) * ldo + r0, row_sums, live);
                }
                t0 += T;
            }
            while t0 < ntok {
                let sums = tile_bf16::<R, 1>(rows, [xb.as_ptr().add(t0 * cols)], cols, 0);
                crate::dot::put(out, t0 * ldo + r0, &sums[0], live);
                t0 += 1;
            }
            r0 += R;
        }
    }

    /// The tiles of [`super::tile_bf16`]'s layout: `NG` groups of 16 rows times `T` tokens, each
    /// group's sums for a token one vector (lane `i`: the group's row `i`), accumulated pair of
    /// columns by pair in order. The same operations per (row, token) in every tile shape, so
    /// tiles of any `NG` and `T` give the same bits.
    trait Tiles {
        /// An activation value as the tiles read it (f32, or bf16 bits).
        type X: Copy;
        /// One group's 16 sums for one token.
        type V: Copy;
        /// Zero sums.
        ///
        /// # Safety
        /// The CPU has what the implementation uses, and the caller enables it.
        unsafe fn zero() -> Self::V;
        /// `acc` plus the products of `pairs` pairs of columns.
        ///
        /// # Safety
        /// As [`Tiles::zero`]; `groups[g]` points at `pairs` x 64 bytes and `xs[j]` at `2 pairs`
        /// values.
        unsafe fn tile<const NG: usize, const T: usize, const H: i32>(
            groups: [*const u8; NG],
            xs: [*const Self::X; T],
            pairs: usize,
            acc: [[Self::V; NG]; T],
        ) -> [[Self::V; NG]; T];
        /// Writes the first `live` (1..=16) sums of `v` to `out..`.
        ///
        /// # Safety
        /// As [`Tiles::tile`]; `out` is valid for `live` writes.
        unsafe fn store(v: Self::V, out: *mut f32, live: usize);
        /// 16 pairs of columns of 16 rows (64 bytes at each of `rows`) as the tiled layout holds
        /// them: dword `16k + i` of `dst` = dword `k` of row `i`.
        ///
        /// # Safety
        /// As [`Tiles::zero`]; `rows[i]` valid for 64 bytes, `dst` for 1 KiB.
        unsafe fn lay_out(rows: &[*const u8; GROUP_ROWS], dst: *mut u8);
    }

    /// The 64 bytes at `off` of rows `r0..r0 + 16` of `w` (rows of `rb` bytes) as
    /// [`Tiles::lay_out`] takes them: rows from `nrows` on read zeros (whose sums are dropped).
    ///
    /// # Safety
    /// `off + 64 <= rb` and `w` holds `nrows` rows.
    #[inline(always)]
    unsafe fn row_lines(w: &[u8], rb: usize, nrows: usize, r0: usize, off: usize) -> [*const u8; GROUP_ROWS] {
        static ZEROS: [u8; 64] = [0; 64];
        std::array::from_fn(|i| if r0 + i < nrows { w.as_ptr().add((r0 + i) * rb + off) } else { ZEROS.as_ptr() })
    }

    /// [`Tiles::lay_out`] at AVX-512: one 16 x 16 dword transpose.
    #[inline(always)]
    unsafe fn lay_out_512(rows: &[*const u8; GROUP_ROWS], dst: *mut u8) {
        let r = std::array::from_fn(|i| _mm512_loadu_si512(rows[i] as *const _));
        for (k, v) in crate::dot::kquants::tiled::transpose_16x16(r).into_iter().enumerate() {
            _mm512_storeu_si512(dst.add(64 * k) as *mut _, v);
        }
    }

    /// f32 activations at AVX-512: a 64-byte load of a group widens to its even column (a shift)
    /// and its odd one (a mask), each token's two values are broadcast, and each accumulator
    /// takes the even FMA, then the odd one.
    struct Avx512F32;

    /// How far past the line a one-token tile is reading, in each of its groups, it asks for
    /// another (into L2). Decode of the Qwen3-0.6B-shaped BF16 file (`pio bench --prompt-tokens
    /// 8`, medians of 3-6 alternated runs, an Emerald Rapids VM): without, 8.6 / 8.2 tok/s at
    /// AVX-512 / AVX2 on one thread and 14.5 / 14.1 on two; 4096 bytes ahead 9.9 / 9.0 and
    /// 15.2 / 15.1; 8192 read 9.3 / 8.6 on one thread, and on two 2048 and 8192 were within
    /// noise of 4096.
    const ONE_TOKEN_AHEAD: usize = 4096;

    /// For one token, asks for each group's line [`ONE_TOKEN_AHEAD`] bytes past pair `p`'s
    /// ([`prefetch_lines`], as the row-major one-token tiles do): a decode step streams each group from memory
    /// once, `NG` interleaved streams the hardware prefetchers follow too shallowly (as the K
    /// and legacy formats' walks do for theirs). Over [`rows_one`]'s L1 buffers, which prefetch
    /// the rows themselves, the line asked for is on the stack and costs a cache hit.
    ///
    /// With hint `H`: the tiled entry points ask with `_MM_HINT_NTA` for one token where
    /// [`crate::cpu::one_token_prefetch_nta`] says so, as the K and legacy formats' one-token
    /// walks do. Products of a Qwen3-0.6B-shaped BF16 decode step alone (`decode_products 2 8
    /// bf16`, the hint switched pass by pass in one process, 2 threads, Zen 5), NTA against L2:
    /// AVX-512 (bf16 activations) +1-3% where the probe read 72-75 GB/s, level at 45-47; AVX2
    /// level at 72-75, +3.5% at 45-47.
    ///
    /// That instance also walks 2 groups at a time rather than 4 (fewer streams; the same
    /// bits). The same step, variants alternated pass by pass, GB/s with 4 / 2 / 1 groups:
    /// bf16 activations at AVX-512 49.7 / 49.6 / 50.4, 47.4 / 48.6 / 47.9, 50.5 / 51.9 / 52.4
    /// where the probe read about 50, 67.8 / 73.3 (4 / 2) where it read more; f32 activations
    /// at AVX-512 61.6 / 69.1 / 64.1 (free), 46.2 / 47.4 / 49.7 and 46.5 / 47.9 / 49.9 (loaded);
    /// at AVX2 61.1 / 64.0 / 62.1 and 60.7 / 64.1 / 60.5 (free), 43.3 / 45.2 / 49.4 (loaded).
    /// Two beats four everywhere but once (bf16, 49.6 against 49.7) and is best where the memory
    /// is free; one is best for f32 activations where it is loaded (4-8% ahead of two), but its
    /// single chain per token falls behind two when the memory is free.
    #[inline(always)]
    unsafe fn one_token_prefetch<const NG: usize, const T: usize, const H: i32>(groups: &[*const u8; NG], p: usize) {
        if T == 1 {
            prefetch_lines_with::<NG, H>(groups, 64 * p + ONE_TOKEN_AHEAD);
        }
    }

    impl Tiles for Avx512F32 {
        type X = f32;
        type V = __m512;

        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }

        #[inline(always)]
        unsafe fn tile<const NG: usize, const T: usize, const H: i32>(
            groups: [*const u8; NG],
            xs: [*const f32; T],
            pairs: usize,
            mut acc: [[__m512; NG]; T],
        ) -> [[__m512; NG]; T] {
            let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
            for p in 0..pairs {
                one_token_prefetch::<NG, T, H>(&groups, p);
                let w: [(__m512, __m512); NG] = std::array::from_fn(|g| {
                    let raw = _mm512_loadu_si512(groups[g].add(64 * p) as *const _);
                    (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw)), _mm512_castsi512_ps(_mm512_and_si512(raw, hi)))
                });
                for j in 0..T {
                    let (xe, xo) = (_mm512_set1_ps(*xs[j].add(2 * p)), _mm512_set1_ps(*xs[j].add(2 * p + 1)));
                    for g in 0..NG {
                        acc[j][g] = _mm512_fmadd_ps(w[g].1, xo, _mm512_fmadd_ps(w[g].0, xe, acc[j][g]));
                    }
                }
            }
            acc
        }

        #[inline(always)]
        unsafe fn store(v: __m512, out: *mut f32, live: usize) {
            _mm512_mask_storeu_ps(out, (u32::MAX >> (32 - live)) as u16, v);
        }

        #[inline(always)]
        unsafe fn lay_out(rows: &[*const u8; GROUP_ROWS], dst: *mut u8) {
            lay_out_512(rows, dst)
        }
    }

    /// [`Avx512F32`] at AVX2: each group as two vectors of 8 rows (the first and last 32 bytes of
    /// its 64). Per pair, the even columns of the group's halves (shifted) meet every token's
    /// even value, then the odd ones (masked, from a second load: [`reload`]) the odd values, so
    /// a tile of 1 x 5 holds its 10 accumulators, 2 widened halves, a broadcast and the mask in
    /// the 16 registers (the even and odd halves of both at once spilled accumulators).
    struct Avx2F32;

    impl Tiles for Avx2F32 {
        type X = f32;
        type V = [__m256; 2];

        #[inline(always)]
        unsafe fn zero() -> [__m256; 2] {
            [_mm256_setzero_ps(); 2]
        }

        #[inline(always)]
        unsafe fn tile<const NG: usize, const T: usize, const H: i32>(
            groups: [*const u8; NG],
            xs: [*const f32; T],
            pairs: usize,
            mut acc: [[[__m256; 2]; NG]; T],
        ) -> [[[__m256; 2]; NG]; T] {
            let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
            for p in 0..pairs {
                one_token_prefetch::<NG, T, H>(&groups, p);
                for g in 0..NG {
                    let at = |h: usize| groups[g].add(64 * p + 32 * h);
                    let we: [__m256; 2] = std::array::from_fn(|h| {
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_loadu_si256(at(h) as *const __m256i)))
                    });
                    for j in 0..T {
                        let xe = _mm256_set1_ps(*xs[j].add(2 * p));
                        for h in 0..2 {
                            acc[j][g][h] = _mm256_fmadd_ps(we[h], xe, acc[j][g][h]);
                        }
                    }
                    let wo: [__m256; 2] =
                        std::array::from_fn(|h| _mm256_castsi256_ps(_mm256_and_si256(reload(at(h)), hi)));
                    for j in 0..T {
                        let xo = _mm256_set1_ps(*xs[j].add(2 * p + 1));
                        for h in 0..2 {
                            acc[j][g][h] = _mm256_fmadd_ps(wo[h], xo, acc[j][g][h]);
                        }
                    }
                }
            }
            acc
        }

        #[inline(always)]
        unsafe fn store(v: [__m256; 2], out: *mut f32, live: usize) {
            if live == GROUP_ROWS {
                _mm256_storeu_ps(out, v[0]);
                _mm256_storeu_ps(out.add(8), v[1]);
            } else {
                let mut all = [0f32; GROUP_ROWS];
                _mm256_storeu_ps(all.as_mut_ptr(), v[0]);
                _mm256_storeu_ps(all.as_mut_ptr().add(8), v[1]);
                std::ptr::copy_nonoverlapping(all.as_ptr(), out, live);
            }
        }

        #[inline(always)]
        unsafe fn lay_out(rows: &[*const u8; GROUP_ROWS], dst: *mut u8) {
            // Four 8 x 8 transposes: rows 8h.., dwords 8q...
            for h in 0..2 {
                for q in 0..2 {
                    let t = crate::dot::kquants::tiled::transpose_8x8(&rows[8 * h..8 * h + 8], 32 * q);
                    for (c, v) in t.into_iter().enumerate() {
                        _mm256_storeu_si256(dst.add(4 * (GROUP_ROWS * (8 * q + c) + 8 * h)) as *mut __m256i, v);
                    }
                }
            }
        }
    }

    /// bf16 activations at AVX-512 BF16: one `vdpbf16ps` per pair of columns, 16 rows' pairs
    /// times a token's pair broadcast.
    struct Avx512Bf16;

    impl Tiles for Avx512Bf16 {
        type X = u16;
        type V = __m512;

        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }

        #[inline(always)]
        unsafe fn tile<const NG: usize, const T: usize, const H: i32>(
            groups: [*const u8; NG],
            xs: [*const u16; T],
            pairs: usize,
            mut acc: [[__m512; NG]; T],
        ) -> [[__m512; NG]; T] {
            for p in 0..pairs {
                one_token_prefetch::<NG, T, H>(&groups, p);
                let w: [__m512bh; NG] =
                    std::array::from_fn(|g| std::mem::transmute(_mm512_loadu_si512(groups[g].add(64 * p) as *const _)));
                for j in 0..T {
                    let pair = std::ptr::read_unaligned(xs[j].add(2 * p) as *const i32);
                    let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    for g in 0..NG {
                        acc[j][g] = _mm512_dpbf16_ps(acc[j][g], w[g], xv);
                    }
                }
            }
            acc
        }

        #[inline(always)]
        unsafe fn store(v: __m512, out: *mut f32, live: usize) {
            Avx512F32::store(v, out, live)
        }

        #[inline(always)]
        unsafe fn lay_out(rows: &[*const u8; GROUP_ROWS], dst: *mut u8) {
            lay_out_512(rows, dst)
        }
    }

    /// `out[t * ldo + r]` for the `nrows` rows of `w` (in [`super::tile_bf16`]'s layout) and
    /// the `ntok` tokens of `x` (token-major): token tiles of `T`, then `T2`, then single
    /// tokens, outside (their activations stay in L1 while the groups stream from L2); inside,
    /// tiles of `NG` groups (`NG1` for single tokens: one token's groups are its only
    /// independent chains), then single groups.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn drive<K: Tiles, const NG: usize, const T: usize, const T2: usize, const NG1: usize, const H: i32>(
        w: &[u8],
        nrows: usize,
        x: &[K::X],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let groups = nrows.div_ceil(GROUP_ROWS);
        let pairs = w.len() / groups / 64;
        assert!(w.len() == groups * pairs * 64 && x.len() == ntok * 2 * pairs);
        assert!(ldo >= nrows && out.len() >= (ntok - 1) * ldo + nrows);
        let group = |g: usize| w.as_ptr().add(g * pairs * 64);
        let token = |t: usize| x.as_ptr().add(t * 2 * pairs);
        let out = out.as_mut_ptr();
        #[inline(always)]
        unsafe fn run<K: Tiles, const NG: usize, const T: usize, const H: i32>(
            g0: usize,
            t0: usize,
            group: impl Fn(usize) -> *const u8,
            token: impl Fn(usize) -> *const K::X,
            pairs: usize,
            nrows: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let acc = K::tile::<NG, T, H>(
                std::array::from_fn(|g| group(g0 + g)),
                std::array::from_fn(|j| token(t0 + j)),
                pairs,
                [[K::zero(); NG]; T],
            );
            for (j, sums) in acc.iter().enumerate() {
                for (g, &v) in sums.iter().enumerate() {
                    let r = (g0 + g) * GROUP_ROWS;
                    // SAFETY: rows `r..r + live` of token `t0 + j` lie in `out` (asserted above).
                    K::store(v, out.add((t0 + j) * ldo + r), (nrows - r).min(GROUP_ROWS));
                }
            }
        }
        #[inline(always)]
        unsafe fn tokens<K: Tiles, const NG: usize, const T: usize, const H: i32>(
            t0: usize,
            groups: usize,
            group: impl Fn(usize) -> *const u8 + Copy,
            token: impl Fn(usize) -> *const K::X + Copy,
            pairs: usize,
            nrows: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let mut g0 = 0;
            while g0 + NG <= groups {
                run::<K, NG, T, H>(g0, t0, group, token, pairs, nrows, out, ldo);
                g0 += NG;
            }
            while g0 < groups {
                run::<K, 1, T, H>(g0, t0, group, token, pairs, nrows, out, ldo);
                g0 += 1;
            }
        }
        let mut t0 = 0;
        while t0 + T <= ntok {
            tokens::<K, NG, T, H>(t0, groups, group, token, pairs, nrows, out, ldo);
            t0 += T;
        }
        while t0 + T2 <= ntok {
            tokens::<K, NG, T2, H>(t0, groups, group, token, pairs, nrows, out, ldo);
            t0 += T2;
        }
        while t0 < ntok {
            tokens::<K, NG1, 1, H>(t0, groups, group, token, pairs, nrows, out, ldo);
            t0 += 1;
        }
    }

    /// [`drive`] for one token over rows stored one after another (a width the tiled layout
    /// takes): `NG` groups at a time, each 16 pairs of columns of their 16 rows transposed
    /// ([`Tiles::lay_out`]) into a buffer in L1 first, so the same operations (and bits) as
    /// from the tiled layout without a pass over the whole matrix (`--no-repack` decode of the
    /// Qwen3-0.6B-shaped BF16 file, 2 threads: 6.8 tok/s laying out whole row tiles per call;
    /// 13.0 this way with the dwords placed one by one at AVX-512, 5.7-6.2 at AVX2; with the
    /// transposes 15.7 and 14.1, and 19.0-19.5 and 17.2-17.7 with the rows prefetched; 4
    /// groups at a time: 11.3-11.5; the row tiles before the tiled layout read 20).
    #[inline(always)]
    unsafe fn rows_one<K: Tiles, const NG: usize>(w: &[u8], nrows: usize, x: &[K::X], out: &mut [f32]) {
        #[repr(C, align(64))]
        struct Block([u32; 16 * GROUP_ROWS]);
        let rb = w.len() / nrows;
        let pairs = rb / 4;
        assert!(w.len() == nrows * rb && pairs.is_multiple_of(16) && x.len() == 2 * pairs && out.len() >= nrows);
        // Each of the 16 rows is its own stream, which the hardware prefetchers follow too
        // shallowly: each row's line 4 blocks ahead is asked for (one token, Qwen3-0.6B-shaped
        // BF16, 2 threads: 15.7 -> 19.0-19.5 tok/s at AVX-512, 14.1 -> 17.2-17.7 at AVX2; at
        // 64, 128, 512, 1024 and 2048 bytes ahead AVX-512 read 14.4, 16.1, 17.8, 15.1, 13.4).
        const AHEAD: usize = 256;
        let mut bufs: [Block; NG] = std::array::from_fn(|_| Block([0; 16 * GROUP_ROWS]));
        for g0 in (0..nrows.div_ceil(GROUP_ROWS)).step_by(NG) {
            let mut acc = [[K::zero(); NG]; 1];
            for p0 in (0..pairs).step_by(16) {
                for (g, buf) in bufs.iter_mut().enumerate() {
                    // A line (16 pairs) of each of the group's rows, transposed into place.
                    let rows = row_lines(w, rb, nrows, (g0 + g) * GROUP_ROWS, 4 * p0);
                    for &r in &rows {
                        // A prefetch never faults, wherever it points.
                        _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(AHEAD) as *const i8);
                    }
                    K::lay_out(&rows, buf.0.as_mut_ptr() as *mut u8);
                }
                let groups: [*const u8; NG] = std::array::from_fn(|g| bufs[g].0.as_ptr() as *const u8);
                acc = K::tile::<NG, 1, _MM_HINT_T1>(groups, [x.as_ptr().add(2 * p0)], 16, acc);
            }
            for (g, &v) in acc[0].iter().enumerate() {
                let r = (g0 + g) * GROUP_ROWS;
                if r < nrows {
                    // SAFETY: rows `r..r + live` lie in `out` (asserted above).
                    K::store(v, out.as_mut_ptr().add(r), (nrows - r).min(GROUP_ROWS));
                }
            }
        }
    }

    /// [`super::tile_groups`] with [`Tiles::lay_out`]'s transposes (loading the Qwen3-0.6B-shaped
    /// BF16 file: see the README; `--no-repack` prefill lays out rows this way per call).
    #[inline(always)]
    unsafe fn tile_groups_with<K: Tiles>(data: &[u8], rows: usize, cols: usize, g0: usize, out: &mut [u8]) {
        let rb = cols * 2;
        for (g, group) in out.chunks_exact_mut(GROUP_ROWS * rb).enumerate() {
            for (b, block) in group.chunks_exact_mut(16 * 64).enumerate() {
                K::lay_out(&row_lines(data, rb, rows, (g0 + g) * GROUP_ROWS, 64 * b), block.as_mut_ptr());
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL; `out` holds whole groups of `cols`, `data` `rows` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn tile_groups_avx512(data: &[u8], rows: usize, cols: usize, g0: usize, out: &mut [u8]) {
        tile_groups_with::<Avx512F32>(data, rows, cols, g0, out)
    }

    /// # Safety
    /// The CPU has AVX2; as [`tile_groups_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_groups_avx2(data: &[u8], rows: usize, cols: usize, g0: usize, out: &mut [u8]) {
        tile_groups_with::<Avx2F32>(data, rows, cols, g0, out)
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL; shapes as [`super::gemm_tiled`] checks (one token, rows).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn rows_one_avx512(w: &[u8], nrows: usize, x: &[f32], out: &mut [f32]) {
        rows_one::<Avx512F32, 1>(w, nrows, x, out)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; shapes as [`super::gemm_tiled`] checks (one token, rows).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_one_avx2(w: &[u8], nrows: usize, x: &[f32], out: &mut [f32]) {
        rows_one::<Avx2F32, 1>(w, nrows, x, out)
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and BF16; shapes as [`super::gemm_bf16`] checks (one token,
    /// rows).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn rows_one_bf16_avx512(w: &[u8], nrows: usize, xb: &[u16], out: &mut [f32]) {
        rows_one::<Avx512Bf16, 4>(w, nrows, xb, out)
    }

    /// Groups a one-token tile walks at a time in the instance that prefetches non-temporally
    /// (4 otherwise; see [`one_token_prefetch`] for the measurements).
    const NTA_GROUPS: usize = 2;

    /// [`drive`] over tiles `$k` (register tiles of `$ng` groups x `$t` tokens, then `$t2`;
    /// `$ng1` groups for a single token), in an entry point with `$features`. For one token where
    /// [`crate::cpu::one_token_prefetch_nta`] says so, a function of its own instead, which
    /// prefetches with `_MM_HINT_NTA` and walks [`NTA_GROUPS`] groups at a time.
    macro_rules! drive_by_hint {
        ($features:literal, $k:ty, [$ng:literal, $t:literal, $t2:literal, $ng1:literal],
         $w:expr, $nrows:expr, $x:expr, $ntok:expr, $out:expr, $ldo:expr) => {{
            #[target_feature(enable = $features)]
            #[inline(never)]
            unsafe fn one(w: &[u8], nrows: usize, x: &[<$k as Tiles>::X], out: &mut [f32], ldo: usize) {
                drive::<$k, $ng, $t, $t2, NTA_GROUPS, _MM_HINT_NTA>(w, nrows, x, 1, out, ldo)
            }
            if $ntok == 1 && crate::cpu::one_token_prefetch_nta() {
                one($w, $nrows, $x, $out, $ldo)
            } else {
                drive::<$k, $ng, $t, $t2, $ng1, _MM_HINT_T1>($w, $nrows, $x, $ntok, $out, $ldo)
            }
        }};
    }

    // 2 groups x 12 tokens: 24 accumulators, 4 widened vectors, 2 broadcasts and the mask in
    // the 32 registers; each broadcast serves 2 groups, each widening 12 tokens.
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL; shapes as [`super::gemm_tiled`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn tiled_avx512(w: &[u8], nrows: usize, x: &[f32], ntok: usize, out: &mut [f32], ldo: usize) {
        drive_by_hint!("avx512f,avx512bw,avx512vl,avx2,fma", Avx512F32, [2, 12, 4, 4], w, nrows, x, ntok, out, ldo)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; shapes as [`super::gemm_tiled`] checks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tiled_avx2(w: &[u8], nrows: usize, x: &[f32], ntok: usize, out: &mut [f32], ldo: usize) {
        if ntok >= WIDEN_MIN_TOKENS {
            widened_avx2(w, nrows, x, ntok, out, ldo)
        } else {
            drive_by_hint!("avx2,fma", Avx2F32, [1, 5, 4, 4], w, nrows, x, ntok, out, ldo)
        }
    }

    /// Fewest tokens for which [`tiled_avx2`] widens each group's weights once ([`widened_avx2`])
    /// rather than per register tile of tokens.
    const WIDEN_MIN_TOKENS: usize = 8;
    /// Pairs of columns per block that [`widened_avx2`] widens at a time (8 KiB of f32, in L1).
    const WIDEN_PAIRS: usize = 64;

    /// [`drive`]'s products at AVX2 for many tokens: each group's BF16 weights are widened to
    /// f32 once per call, a block of [`WIDEN_PAIRS`] pairs at a time into a buffer in L1, and
    /// every token's register tile then takes them from there. [`Avx2F32::tile`] widens per tile
    /// of 5 tokens, a shift or a mask per vector beside each 10 FMAs, on the ports the FMAs use
    /// (and its loads, 24 per 20 FMAs, bound Zen 3); here a pair costs 4 loads and 10 broadcasts
    /// per 20 FMAs. Each (row, token) accumulator takes the pairs in order, the even column's FMA
    /// then the odd one's, and goes through memory only whole between blocks: the same bits.
    #[inline(always)]
    unsafe fn widened_avx2(w: &[u8], nrows: usize, x: &[f32], ntok: usize, out: &mut [f32], ldo: usize) {
        const T: usize = 5;
        let groups = nrows.div_ceil(GROUP_ROWS);
        let pairs = w.len() / groups / 64;
        assert!(w.len() == groups * pairs * 64 && x.len() == ntok * 2 * pairs);
        assert!(ldo >= nrows && out.len() >= (ntok - 1) * ldo + nrows);
        /// Pair `p` of a block: the even column of rows 0..8 and 8..16, then the odd one's.
        #[repr(C, align(64))]
        struct Block([[__m256; 4]; WIDEN_PAIRS]);
        let mut buf = Block([[_mm256_setzero_ps(); 4]; WIDEN_PAIRS]);
        // Every token's accumulators for the group: written whole by the first block.
        let mut acc = vec![[_mm256_setzero_ps(); 2]; ntok];
        let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        #[inline(always)]
        unsafe fn tokens<const T: usize>(
            buf: &[[__m256; 4]],
            x: *const f32,
            stride: usize,
            first: bool,
            acc: &mut [[__m256; 2]],
        ) {
            let mut v: [[__m256; 2]; T] =
                std::array::from_fn(|j| if first { [_mm256_setzero_ps(); 2] } else { acc[j] });
            for (p, wv) in buf.iter().enumerate() {
                for (j, v) in v.iter_mut().enumerate() {
                    let xe = _mm256_set1_ps(*x.add(j * stride + 2 * p));
                    v[0] = _mm256_fmadd_ps(wv[0], xe, v[0]);
                    v[1] = _mm256_fmadd_ps(wv[1], xe, v[1]);
                }
                for (j, v) in v.iter_mut().enumerate() {
                    let xo = _mm256_set1_ps(*x.add(j * stride + 2 * p + 1));
                    v[0] = _mm256_fmadd_ps(wv[2], xo, v[0]);
                    v[1] = _mm256_fmadd_ps(wv[3], xo, v[1]);
                }
            }
            acc[..T].copy_from_slice(&v);
        }
        for g in 0..groups {
            let gw = w.as_ptr().add(g * pairs * 64);
            for p0 in (0..pairs).step_by(WIDEN_PAIRS) {
                let np = (pairs - p0).min(WIDEN_PAIRS);
                for (p, b) in buf.0[..np].iter_mut().enumerate() {
                    let at = gw.add(64 * (p0 + p));
                    let lo = _mm256_loadu_si256(at as *const __m256i);
                    let up = _mm256_loadu_si256(at.add(32) as *const __m256i);
                    *b = [
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(lo)),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(up)),
                        _mm256_castsi256_ps(_mm256_and_si256(lo, hi)),
                        _mm256_castsi256_ps(_mm256_and_si256(up, hi)),
                    ];
                }
                let (blk, first) = (&buf.0[..np], p0 == 0);
                let xt = |t: usize| x.as_ptr().add(t * 2 * pairs + 2 * p0);
                let mut t = 0;
                while t + T <= ntok {
                    tokens::<T>(blk, xt(t), 2 * pairs, first, &mut acc[t..t + T]);
                    t += T;
                }
                // The rest in one tile (single tokens wait on their two FMA chains).
                let acc = &mut acc[t..];
                match ntok - t {
                    0 => {}
                    1 => tokens::<1>(blk, xt(t), 2 * pairs, first, acc),
                    2 => tokens::<2>(blk, xt(t), 2 * pairs, first, acc),
                    3 => tokens::<3>(blk, xt(t), 2 * pairs, first, acc),
                    _ => tokens::<4>(blk, xt(t), 2 * pairs, first, acc),
                }
            }
            let r = g * GROUP_ROWS;
            for (t, &v) in acc.iter().enumerate() {
                // SAFETY: rows `r..r + live` of token `t` lie in `out` (asserted above).
                Avx2F32::store(v, out.as_mut_ptr().add(t * ldo + r), (nrows - r).min(GROUP_ROWS));
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and BF16; shapes as [`super::gemm_bf16`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn tiled_bf16_avx512(w: &[u8], nrows: usize, xb: &[u16], ntok: usize, out: &mut [f32], ldo: usize) {
        drive_by_hint!("avx512f,avx512bw,avx512vl,avx512bf16", Avx512Bf16, [4, 6, 2, 4], w, nrows, xb, ntok, out, ldo)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::quant;

    #[test]
    fn every_level_matches_the_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for n in [1, 7, 8, 15, 16, 33, 64, 100, 1000] {
                let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut row = vec![0u8; dtype.row_bytes(n).unwrap_or(0)];
                quant::quantize_row(dtype, &w, &mut row);
                let want = quant::dot_row(dtype, &row, &x);
                let scale: f32 = quant::dequantize(dtype, &row, n).iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                for level in SimdLevel::available() {
                    let got = dot(level, dtype, &row, &x);
                    assert!((got - want).abs() <= 1e-5 * scale.max(1.0), "{dtype} n={n} {level:?}: {got} vs {want}");
                }
            }
        }
    }

    /// A measurement, not a check: GB/s of one-token products over a 512 MiB BF16 matrix (2048
    /// columns, past any cache): the interleaved layout loading puts BF16 in (`tiled16`:
    /// [`tile_bf16`], what decode reads), and row-major walks and other layouts (groups of 6 rows
    /// interleaved by 16 columns, with and without software prefetch); 1 and 2 threads, 5
    /// alternated passes each.
    /// `cargo test --release -p pio-kernels --lib bench_bf16_decode -- --ignored --nocapture`
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn bench_bf16_decode_layouts() {
        use std::arch::x86_64::*;
        const COLS: usize = 2048;
        const ROWS: usize = 131072;
        const R: usize = 6;
        let rb = COLS * 2;
        let w: Vec<u8> = (0..ROWS * rb).map(|i| ((i * 2654435761usize) >> 13) as u8 & 0x3f).collect();
        let x: Vec<f32> = (0..COLS).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
        let xeo = to_even_odd(SimdLevel::Avx2, &x, 1, COLS);
        // Interleaved: per group of R rows, per 16 columns, the R rows' 32 bytes.
        let mut il = vec![0u8; ROWS * rb];
        for g in 0..ROWS / R {
            for c in 0..COLS / 16 {
                for i in 0..R {
                    let src = &w[(g * R + i) * rb + c * 32..][..32];
                    il[g * R * rb + (c * R + i) * 32..][..32].copy_from_slice(src);
                }
            }
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn il_kernel(w: &[u8], rows: usize, xeo: &[f32], out: &mut [f32], ahead: usize) {
            let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
            let rb = COLS * 2;
            for g in 0..rows / R {
                let mut p = w.as_ptr().add(g * R * rb);
                let mut acc = [_mm256_setzero_ps(); R];
                for c in 0..COLS / 16 {
                    let xe = _mm256_loadu_ps(xeo.as_ptr().add(16 * c));
                    let xo = _mm256_loadu_ps(xeo.as_ptr().add(16 * c + 8));
                    if ahead != 0 {
                        for k in 0..R * 32 / 64 {
                            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(ahead + 64 * k) as *const i8);
                        }
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let raw = _mm256_loadu_si256(p.add(32 * i) as *const __m256i);
                        let we = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw));
                        let wo = _mm256_castsi256_ps(_mm256_and_si256(raw, hi));
                        *a = _mm256_fmadd_ps(wo, xo, _mm256_fmadd_ps(we, xe, *a));
                    }
                    p = p.add(R * 32);
                }
                for i in 0..R {
                    let mut t = [0f32; 8];
                    _mm256_storeu_ps(t.as_mut_ptr(), acc[i]);
                    out[g * R + i] = t.iter().sum();
                }
            }
        }
        // The row-major walk with `RR` rows at once, prefetching the next tile as `gemm` does.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn rm_kernel<const RR: usize>(w: &[u8], rows: usize, xeo: &[f32], out: &mut [f32], pf: bool) {
            let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
            let rb = COLS * 2;
            for g in 0..rows / RR {
                let base = w.as_ptr().add(g * RR * rb);
                let mut acc = [_mm256_setzero_ps(); RR];
                for c in 0..COLS / 16 {
                    let xe = _mm256_loadu_ps(xeo.as_ptr().add(16 * c));
                    let xo = _mm256_loadu_ps(xeo.as_ptr().add(16 * c + 8));
                    if pf && c % 2 == 0 {
                        for i in 0..RR {
                            _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(i * rb + 32 * c + RR * rb) as *const i8);
                        }
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let raw = _mm256_loadu_si256(base.add(i * rb + 32 * c) as *const __m256i);
                        let we = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw));
                        let wo = _mm256_castsi256_ps(_mm256_and_si256(raw, hi));
                        *a = _mm256_fmadd_ps(wo, xo, _mm256_fmadd_ps(we, xe, *a));
                    }
                }
                for i in 0..RR {
                    let mut t = [0f32; 8];
                    _mm256_storeu_ps(t.as_mut_ptr(), acc[i]);
                    out[g * RR + i] = t.iter().sum();
                }
            }
        }
        let half = ROWS / 2 / 48 * 48;
        type Kernel<'a> = &'a (dyn Fn(&[u8], usize, &mut [f32]) + Sync);
        let run = |name: &str, threads: usize, f: Kernel<'_>, data: &[u8]| {
            let mut out = vec![0f32; ROWS];
            let t0 = std::time::Instant::now();
            if threads == 1 {
                f(data, ROWS, &mut out);
            } else {
                let (o1, o2) = out.split_at_mut(half);
                std::thread::scope(|sc| {
                    sc.spawn(|| f(&data[..half * rb], half, o1));
                    f(&data[half * rb..], ROWS - half, o2);
                });
            }
            let gbs = (ROWS * rb) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            std::hint::black_box(&out);
            (name.to_string(), threads, gbs)
        };
        let il16 =
            |d: &[u8], n: usize, o: &mut [f32]| gemm_tiled(SimdLevel::Avx2, d, n, Layout::Interleaved, &x, 1, o, n);
        let tiled = tile_bf16(ROWS, COLS, &w);
        let il0 = |d: &[u8], n: usize, o: &mut [f32]| unsafe { il_kernel(d, n, &xeo, o, 0) };
        let il1 = |d: &[u8], n: usize, o: &mut [f32]| unsafe { il_kernel(d, n, &xeo, o, 1024) };
        let il4 = |d: &[u8], n: usize, o: &mut [f32]| unsafe { il_kernel(d, n, &xeo, o, 4096) };
        let rm2 = |d: &[u8], n: usize, o: &mut [f32]| unsafe { rm_kernel::<2>(d, n, &xeo, o, true) };
        let rm3 = |d: &[u8], n: usize, o: &mut [f32]| unsafe { rm_kernel::<3>(d, n, &xeo, o, true) };
        let rm4 = |d: &[u8], n: usize, o: &mut [f32]| unsafe { rm_kernel::<4>(d, n, &xeo, o, true) };
        let rm8 = |d: &[u8], n: usize, o: &mut [f32]| unsafe { rm_kernel::<8>(d, n, &xeo, o, true) };
        let rm4n = |d: &[u8], n: usize, o: &mut [f32]| unsafe { rm_kernel::<4>(d, n, &xeo, o, false) };
        let mut res: Vec<(String, usize, f64)> = Vec::new();
        for _ in 0..5 {
            for threads in [1, 2] {
                res.push(run("tiled16", threads, &il16, &tiled));
                res.push(run("rm2", threads, &rm2, &w));
                res.push(run("rm3", threads, &rm3, &w));
                res.push(run("rm4", threads, &rm4, &w));
                res.push(run("rm8", threads, &rm8, &w));
                res.push(run("rm4-nopf", threads, &rm4n, &w));
                res.push(run("il-nopf", threads, &il0, &il));
                res.push(run("il-pf1k", threads, &il1, &il));
                res.push(run("il-pf4k", threads, &il4, &il));
            }
        }
        for name in ["tiled16", "rm2", "rm3", "rm4", "rm8", "rm4-nopf", "il-nopf", "il-pf1k", "il-pf4k"] {
            for threads in [1, 2] {
                let mut v: Vec<f64> = res.iter().filter(|r| r.0 == name && r.1 == threads).map(|r| r.2).collect();
                v.sort_by(f64::total_cmp);
                println!("{name} t{threads}: median {:.1} GB/s, best {:.1} ({v:.1?})", v[v.len() / 2], v[v.len() - 1]);
            }
        }
    }

    /// A random `[rows, cols]` matrix stored as `dtype` and `[ntok, cols]` activations.
    fn random_tile(
        rng: &mut rand::rngs::StdRng,
        dtype: DType,
        rows: usize,
        ntok: usize,
        cols: usize,
    ) -> (Vec<u8>, Vec<f32>) {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x: Vec<f32> = (0..ntok * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let rb = dtype.row_bytes(cols).unwrap_or(0);
        let mut stored = vec![0u8; rows * rb];
        for (src, dst) in w.chunks_exact(cols).zip(stored.chunks_exact_mut(rb)) {
            quant::quantize_row(dtype, src, dst);
        }
        (stored, x)
    }

    #[test]
    fn gemm_matches_the_reference_at_every_level() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for cols in [1, 7, 16, 33, 100, 264] {
                let (rows, ntok) = (13, 11);
                let (w, x) = random_tile(&mut rng, dtype, rows, ntok, cols);
                let rb = w.len() / rows;
                for level in SimdLevel::available() {
                    let mut out = vec![f32::NAN; ntok * rows];
                    gemm(level, dtype, &w, rows, &x, ntok, &mut out, rows);
                    for t in 0..ntok {
                        for r in 0..rows {
                            let xr = &x[t * cols..(t + 1) * cols];
                            let want = quant::dot_row(dtype, &w[r * rb..(r + 1) * rb], xr);
                            let got = out[t * rows + r];
                            assert!(
                                (got - want).abs() <= 1e-5 * cols as f32,
                                "{dtype} {level:?} cols={cols} ({r},{t}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_is_batch_invariant() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (rows, ntok, cols) = (13, 11, 71);
            let (w, x) = random_tile(&mut rng, dtype, rows, ntok, cols);
            let rb = w.len() / rows;
            for level in SimdLevel::available() {
                let mut whole = vec![0f32; ntok * rows];
                gemm(level, dtype, &w, rows, &x, ntok, &mut whole, rows);
                // One pair at a time.
                for t in 0..ntok {
                    for r in 0..rows {
                        let mut one = [0f32];
                        gemm(level, dtype, &w[r * rb..(r + 1) * rb], 1, &x[t * cols..(t + 1) * cols], 1, &mut one, 1);
                        assert_eq!(one[0].to_bits(), whole[t * rows + r].to_bits(), "{dtype} {level:?} ({r},{t})");
                    }
                }
                // A 5 x 3 sub-tile at an offset.
                let (r0, t0) = (6, 7);
                let mut sub = vec![0f32; 3 * 5];
                gemm(level, dtype, &w[r0 * rb..(r0 + 5) * rb], 5, &x[t0 * cols..(t0 + 3) * cols], 3, &mut sub, 5);
                for t in 0..3 {
                    for r in 0..5 {
                        assert_eq!(sub[t * 5 + r].to_bits(), whole[(t0 + t) * rows + r0 + r].to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_paths_give_gemms_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let levels = SimdLevel::available();
        for &level in levels.iter().filter(|&&l| matches!(l, SimdLevel::Avx2 | SimdLevel::Avx512)) {
            for cols in [1, 7, 16, 17, 31, 32, 33, 64, 264, 1024] {
                // Tiles of 12 and 4 tokens and single ones, of 2 groups and single ones.
                for (rows, ntok) in [(13, 1), (13, 2), (37, 5), (40, 11), (50, 17), (13, 30)] {
                    let (w, x) = random_tile(&mut rng, DType::BF16, rows, ntok, cols);
                    let mut want = vec![0f32; ntok * rows];
                    gemm(level, DType::BF16, &w, rows, &x, ntok, &mut want, rows);
                    let mut got = vec![f32::NAN; ntok * rows];
                    if even_odd_activations(level, DType::BF16, cols) {
                        let xp = to_even_odd(level, &x, ntok, cols);
                        gemm_even_odd(level, &w, rows, &xp, ntok, &mut got, rows);
                        assert_eq!(bits(&got), bits(&want), "{level:?} cols={cols} ntok={ntok}");
                        continue;
                    }
                    assert!(tiles_bf16(level, DType::BF16, cols));
                    let tiled = tile_bf16(rows, cols, &w);
                    gemm_tiled(level, &tiled, rows, Layout::Interleaved, &x, ntok, &mut got, rows);
                    assert_eq!(bits(&got), bits(&want), "{level:?} cols={cols} ntok={ntok} tiled");
                    // Each token alone, and rows from a later group on with a wider output.
                    let rb = 2 * cols;
                    for t in 0..ntok {
                        let mut one = vec![0f32; rows];
                        gemm(level, DType::BF16, &w, rows, &x[t * cols..(t + 1) * cols], 1, &mut one, rows);
                        assert_eq!(bits(&one), bits(&want[t * rows..(t + 1) * rows]), "{level:?} {cols}: token {t}");
                    }
                    let (r0, ldo) = (16, rows + 5);
                    if rows > r0 {
                        let n = rows - r0;
                        let mut part = vec![f32::NAN; (ntok - 1) * ldo + n];
                        gemm(level, DType::BF16, &w[r0 * rb..], n, &x, ntok, &mut part, ldo);
                        for t in 0..ntok {
                            assert_eq!(bits(&part[t * ldo..t * ldo + n]), bits(&want[t * rows + r0..(t + 1) * rows]));
                            if t + 1 < ntok {
                                assert!(part[t * ldo + n..(t + 1) * ldo].iter().all(|v| v.is_nan()), "wrote past {n}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tiled_bf16_rows_read_back_as_stored() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        for (rows, cols) in [(1, 32), (13, 64), (37, 96), (48, 1024)] {
            let (w, _) = random_tile(&mut rng, DType::BF16, rows, 1, cols);
            let rb = 2 * cols;
            let tiled = tile_bf16(rows, cols, &w);
            assert_eq!(tiled.len(), rows.div_ceil(GROUP_ROWS) * GROUP_ROWS * rb);
            let mut row = vec![0u8; rb];
            for r in 0..rows {
                tiled_row_bf16(&tiled, cols, r, &mut row);
                assert_eq!(row, w[r * rb..(r + 1) * rb], "{rows} x {cols}: row {r}");
                for c in [0, 1, cols - 1] {
                    let at = tiled_bf16_at(cols, r, c);
                    assert_eq!(tiled[at..at + 2], w[r * rb + 2 * c..r * rb + 2 * c + 2]);
                }
            }
            let mut buf = Vec::new();
            assert_eq!(restore_rows_bf16(&tiled, rows, cols, &mut buf), &w[..]);
            // The padding rows of the last group are zeros.
            let padded = rows.div_ceil(GROUP_ROWS) * GROUP_ROWS;
            for r in rows..padded {
                tiled_row_bf16(&tiled, cols, r, &mut row);
                assert!(row.iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn bf16_pairs_hold_each_tokens_rounded_pairs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        for (ntok, cols) in [(1, 32), (5, 64), (16, 96), (37, 1024), (3, 34)] {
            let x: Vec<f32> = (0..ntok * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            let xt = to_bf16_pairs(&x, ntok, cols);
            assert!(xt.stride >= ntok && xt.stride.is_multiple_of(16));
            for t in 0..ntok {
                for p in 0..cols / 2 {
                    let want = to_bf16(&x[t * cols + 2 * p..t * cols + 2 * p + 2]);
                    // SAFETY: `at` points inside the pairs for p < cols / 2, t < ntok.
                    let got = unsafe { *xt.at(p, t) };
                    assert_eq!(got, want[0] as u32 | (want[1] as u32) << 16, "{ntok} x {cols}: pair {p} of token {t}");
                }
            }
        }
    }

    #[test]
    fn amx_bf16_gemm_matches_the_reference_and_is_batch_invariant() {
        let level = SimdLevel::Avx512;
        if !bf16_on_amx(level, 32) {
            eprintln!("skipped: no AMX-BF16 here (or PIO_SIMD caps it)");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for (cols, rows, ntok) in [(32, 1, 1), (64, 13, 5), (96, 37, 37), (1024, 16, 16), (256, 64, 70), (160, 33, 3)] {
            let (w, x) = random_tile(&mut rng, DType::BF16, rows, ntok, cols);
            let rb = w.len() / rows;
            let xr: Vec<f32> = to_bf16(&x).iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
            let xt = to_bf16_pairs(&x, ntok, cols);
            // An output stride past the rows, and an output that ends at the last row.
            let ldo = rows + 3;
            let mut whole = vec![f32::NAN; (ntok - 1) * ldo + rows];
            gemm_bf16_amx(level, &w, rows, &xt, (0, ntok), &mut whole, ldo);
            for t in 0..ntok {
                for r in 0..rows {
                    let want = quant::dot_row(DType::BF16, &w[r * rb..(r + 1) * rb], &xr[t * cols..(t + 1) * cols]);
                    let got = whole[t * ldo + r];
                    assert!((got - want).abs() <= 1e-5 * cols as f32, "{cols} cols ({r}, {t}): {got} vs {want}");
                }
                for r in rows..ldo.min(whole.len() - t * ldo) {
                    assert!(whole[t * ldo + r].is_nan(), "wrote past row {rows} of token {t}");
                }
            }
            // Each token alone, each row alone, and a later range of the tokens with whole row
            // groups: the same bits.
            for t in 0..ntok {
                let one_t = to_bf16_pairs(&x[t * cols..(t + 1) * cols], 1, cols);
                let mut out = vec![0f32; rows];
                gemm_bf16_amx(level, &w, rows, &one_t, (0, 1), &mut out, rows);
                for r in 0..rows {
                    assert_eq!(out[r].to_bits(), whole[t * ldo + r].to_bits(), "{cols} cols: token {t} alone, row {r}");
                    let mut single = [0f32];
                    gemm_bf16_amx(level, &w[r * rb..(r + 1) * rb], 1, &one_t, (0, 1), &mut single, 1);
                    assert_eq!(single[0].to_bits(), out[r].to_bits(), "{cols} cols: ({r}, {t}) alone");
                }
            }
            let (t0, r0) = (ntok / 3, rows / 16 / 2 * 16);
            let mut part = vec![0f32; (ntok - t0) * (rows - r0)];
            gemm_bf16_amx(level, &w[r0 * rb..], rows - r0, &xt, (t0, ntok), &mut part, rows - r0);
            for t in t0..ntok {
                for r in r0..rows {
                    let got = part[(t - t0) * (rows - r0) + r - r0];
                    assert_eq!(got.to_bits(), whole[t * ldo + r].to_bits(), "{cols} cols: ({r}, {t}) in a part");
                }
            }
        }
    }

    #[test]
    fn bf16_gemm_matches_the_reference_and_is_batch_invariant() {
        let Some(level) = SimdLevel::available().into_iter().find(|&l| has_bf16_dot(l, DType::BF16)) else {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for cols in [1, 31, 32, 33, 100, 264] {
            let (rows, ntok) = (13, 11);
            let (w, x) = random_tile(&mut rng, DType::BF16, rows, ntok, cols);
            let rb = w.len() / rows;
            let xb = to_bf16(&x);
            let xr: Vec<f32> = xb.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
            let mut whole = vec![0f32; ntok * rows];
            gemm_bf16(level, &w, rows, Layout::Rows, &xb, ntok, &mut whole, rows);
            if interleaves_bf16(DType::BF16, cols) {
                let tiled = tile_bf16(rows, cols, &w);
                for n in [ntok, 1] {
                    let mut got = vec![f32::NAN; n * rows];
                    gemm_bf16(level, &tiled, rows, Layout::Interleaved, &xb[..n * cols], n, &mut got, rows);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&whole[..n * rows]), "cols={cols} {n} tokens interleaved");
                }
            }
            for t in 0..ntok {
                for r in 0..rows {
                    let want = quant::dot_row(DType::BF16, &w[r * rb..(r + 1) * rb], &xr[t * cols..(t + 1) * cols]);
                    let got = whole[t * rows + r];
                    assert!((got - want).abs() <= 1e-5 * cols as f32, "cols={cols} ({r},{t}): {got} vs {want}");
                    let mut one = [0f32];
                    let row = &w[r * rb..(r + 1) * rb];
                    gemm_bf16(level, row, 1, Layout::Rows, &xb[t * cols..(t + 1) * cols], 1, &mut one, 1);
                    assert_eq!(one[0].to_bits(), got.to_bits(), "cols={cols} ({r},{t}) alone");
                }
            }
        }
    }
}
