//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 rows (32-weight blocks) dotted with [`Q8Block`] activations,
//! and the tiles that INT8, INT4 and NF4 share with them (see [`gemm`]).
//!
//! A weight block decodes to `w[i] = d_w * q_w[i]` (`+ m_w` for the `_1` formats) and an
//! activation block to `x[i] ≈ d_a * q_a[i]`, so one block contributes
//!
//! - `d_w·d_a · Σ q_w[i]·q_a[i]` for Q8_0 (`q_w` the signed byte), and
//! - `d_w·d_a · Σ q_w[i]·q_a[i] + m_w·s_a` for the nibble formats, with `q_w` unsigned as stored
//!   and `s_a = d_a·Σ q_a` precomputed in the activation block: `m_w` is Q4_1 / Q5_1's minimum,
//!   and for Q4_0 / Q5_0, whose weights are `d_w·(q_w − o)`, `−o·d_w` (`o` = 8, 16).
//!
//! The inner sum is exact integer arithmetic at every level.
//!
//! [`gemm`] computes tiles of many rows times many tokens (prefill, and decode over many rows)
//! with kernels that unpack a block of 8 or 16 rows once and reuse it for up to 64 tokens,
//! batch invariant and bitwise the same at every level (see its docs). Over matrices repacked at
//! load ([`Layout::Interleaved`], see [`crate::dot::interleave`]) it runs the same kernels: the
//! unpacking loads columns instead of transposing rows, and the walk prefetches ahead. Single
//! rows ([`dot_q8`]) have only the scalar reference: the tiles beat SIMD row dots (llama.cpp's
//! `ggml_vec_dot_q*_q8_*` shape, which this module had until the tiles replaced them) at every
//! token count, one included.
//!
//! Activation quants must lie in −127..=127, as [`crate::act::quantize_q8`] produces (−128
//! would overflow the sign trick in the SIMD tiles; the scalar reference accepts it).

use crate::act::Q8Block;
use crate::cpu::SimdLevel;
use crate::dot::nongguf::{NF4_I8, NF4_I8_SCALE};
use crate::dot::Layout;
use crate::DType;

/// Dot of one stored row of `dtype` (`act.len()` blocks of 32 weights) with `act`: the
/// reference, [`dot_scalar`], at every level. Products of matrices go through [`gemm`], whose
/// tile kernels are faster than row dots even for a single token (see `bench_gemm_ns_per_pair`),
/// so there are no SIMD row dots to keep beside them.
///
/// `dtype` must be one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
pub fn dot_q8(_level: SimdLevel, dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    dot_scalar(dtype, row, act)
}

/// Asserts `dtype` is a legacy block format and `row` holds exactly `act.len()` of its blocks.
fn check(dtype: DType, row: &[u8], act: &[Q8Block]) {
    match dtype {
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => {}
        other => panic!("{other} is not a legacy block format"),
    }
    assert_eq!(
        row.len(),
        act.len() * dtype.block_bytes(),
        "{dtype}: a row of {} bytes does not hold {} blocks",
        row.len(),
        act.len()
    );
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The reference: per block an exact i32 sum of quant products, then
/// `(d_w·d_a)·sum (+ m_w·s_a)` added in block order (Q4_0 / Q5_0: `sum` of the unsigned
/// quants, `m_w = −o·d_w` for their offset `o`, 8 or 16).
pub fn dot_scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    scalar_sum(dtype, row, act, false)
}

/// One (row, token) product exactly as every tile kernel ([`gemm`]) computes it, at every SIMD
/// level: per block the exact i32 sum of quant products, then in block order
/// `acc = fma(d_w·d_a, sum, acc)` and, for the nibble formats, `acc = fma(m_w, s_a, acc)` (f32,
/// one rounding per step; `m_w` is Q4_1 / Q5_1's minimum, or `−8·d_w` / `−16·d_w` for Q4_0 /
/// Q5_0, whose sums take the unsigned quants as stored).
pub fn tile_dot_scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    match dtype {
        DType::INT8 | DType::INT4 | DType::NF4 => chunked_tile_scalar(dtype, row, act),
        _ => scalar_sum(dtype, row, act, true),
    }
}

/// [`tile_dot_scalar`] of INT8, INT4 and NF4, whose scale serves a row, 4 or 2 Q8Blocks (the
/// tiles take them as Q8_0, Q4_0 and Q8_0 blocks that share it): per Q8Block the exact i32 sum,
/// then in block order INT8 as Q8_0 (`fma(s·d_a, Σ q·q_a)`, `s` the row's scale), INT4 as Q4_0
/// (`fma(d·d_a, Σ u·q_a)`, `fma(−8·d, s_a)`, `u` the unsigned code) and NF4 as Q8_0
/// (`fma((d/127)·d_a, Σ NF4_I8[u]·q_a)`).
fn chunked_tile_scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    crate::dot::nongguf::check(dtype, row, act);
    if dtype == DType::INT8 {
        let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
        let mut total = 0f32;
        for (q, a) in row[4..].chunks_exact(32).zip(act) {
            let sum: i32 = q.iter().zip(&a.qs).map(|(&w, &y)| (w as i8) as i32 * y as i32).sum();
            total = (s * a.d).mul_add(sum as f32, total);
        }
        return total;
    }
    let (chunk, bb) = (dtype.block_elems() / 32, dtype.block_bytes());
    let mut total = 0f32;
    for (b, a) in act.iter().enumerate() {
        let blk = &row[b / chunk * bb..][..bb];
        let (sub, d) = (b % chunk, f16_at(blk, 0));
        // Sub-block `sub`'s codes: nibble `sub % 2` of the 32 bytes of run `sub / 2`.
        let (run, shift) = (&blk[2 + 32 * (sub / 2)..][..32], 4 * (sub % 2));
        let code = |i: usize| (run[i] >> shift) & 0x0F;
        if dtype == DType::INT4 {
            let sum: i32 = a.qs.iter().enumerate().map(|(i, &y)| code(i) as i32 * y as i32).sum();
            total = (d * a.d).mul_add(sum as f32, total);
            total = (-8.0 * d).mul_add(a.s, total);
        } else {
            let sum: i32 = a.qs.iter().enumerate().map(|(i, &y)| NF4_I8[code(i) as usize] as i32 * y as i32).sum();
            total = (d * NF4_I8_SCALE * a.d).mul_add(sum as f32, total);
        }
    }
    total
}

/// The per-block integer sums of every format, folded the [`dot_scalar`] way or (`fused`) the
/// [`tile_dot_scalar`] way.
fn scalar_sum(dtype: DType, row: &[u8], act: &[Q8Block], fused: bool) -> f32 {
    check(dtype, row, act);
    match dtype {
        DType::Q4_0 => scalar_blocks::<18>(row, act, Fold::new(fused, true), |b, y| {
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[2 + j];
                sum += (q & 0x0F) as i32 * y[j] as i32 + (q >> 4) as i32 * y[j + 16] as i32;
            }
            let d = f16_at(b, 0);
            (d, -8.0 * d, sum)
        }),
        DType::Q4_1 => scalar_blocks::<20>(row, act, Fold::new(fused, true), |b, y| {
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[4 + j];
                sum += (q & 0x0F) as i32 * y[j] as i32 + (q >> 4) as i32 * y[j + 16] as i32;
            }
            (f16_at(b, 0), f16_at(b, 2), sum)
        }),
        DType::Q5_0 => scalar_blocks::<22>(row, act, Fold::new(fused, true), |b, y| {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[6 + j];
                let lo = ((q & 0x0F) as u32 | ((qh >> j) & 1) << 4) as i32;
                let hi = ((q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32;
                sum += lo * y[j] as i32 + hi * y[j + 16] as i32;
            }
            let d = f16_at(b, 0);
            (d, -16.0 * d, sum)
        }),
        DType::Q5_1 => scalar_blocks::<24>(row, act, Fold::new(fused, true), |b, y| {
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[8 + j];
                let lo = ((q & 0x0F) as u32 | ((qh >> j) & 1) << 4) as i32;
                let hi = ((q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32;
                sum += lo * y[j] as i32 + hi * y[j + 16] as i32;
            }
            (f16_at(b, 0), f16_at(b, 2), sum)
        }),
        DType::Q8_0 => scalar_blocks::<34>(row, act, Fold::new(fused, false), |b, y| {
            let sum = b[2..].iter().zip(y).map(|(&q, &a)| (q as i8) as i32 * a as i32).sum();
            (f16_at(b, 0), 0.0, sum)
        }),
        other => panic!("{other} is not a legacy block format"),
    }
}

/// How [`scalar_blocks`] adds up the per-block terms.
#[derive(Clone, Copy)]
enum Fold {
    /// `total += d_w·d_a·sum + m_w·s_a` ([`dot_scalar`]).
    Plain,
    /// `total = fma(d_w·d_a, sum, total)`, then `total = fma(m_w, s_a, total)` when the format
    /// has a minimum ([`tile_dot_scalar`]).
    Fused { min: bool },
}

impl Fold {
    fn new(fused: bool, min: bool) -> Fold {
        if fused {
            Fold::Fused { min }
        } else {
            Fold::Plain
        }
    }
}

/// Folds the blocks' `(d_w, m_w, sum)` (from `f`, given one weight block and the activation
/// quants) into one f32 the way `fold` says.
fn scalar_blocks<const BB: usize>(
    row: &[u8],
    act: &[Q8Block],
    fold: Fold,
    f: impl Fn(&[u8; BB], &[i8; 32]) -> (f32, f32, i32),
) -> f32 {
    let (blocks, rest) = row.as_chunks::<BB>();
    assert!(rest.is_empty() && blocks.len() == act.len());
    let mut total = 0f32;
    for (b, a) in blocks.iter().zip(act) {
        let (d, m, sum) = f(b, &a.qs);
        match fold {
            Fold::Plain => total += d * a.d * sum as f32 + m * a.s,
            Fold::Fused { min } => {
                total = (d * a.d).mul_add(sum as f32, total);
                if min {
                    total = m.mul_add(a.s, total);
                }
            }
        }
    }
    total
}

// =============================================================================================
// Tiles: many rows times many tokens
// =============================================================================================

/// A batch-invariant tile of products (see [`super::gemm_q8`], which checked the shapes):
/// `out[t * ldo + r] = row r · token t`, each computed exactly as [`tile_dot_scalar`] defines.
///
/// **Why the result cannot depend on the tile.** Per block, the sum of quant products is an
/// exact i32 however a kernel arranges it; the float steps that follow (`d_w·d_a`, one fma per
/// block in block order, one more for the nibble formats' `m_w·s_a`) are IEEE operations on
/// one vector lane per (row, token), and a lane's operations never involve another lane. So an output is the
/// same bits whatever the number of rows and tokens in the call, wherever it sits, and at every
/// SIMD level (the scalar level computes the same fused sequence). It may differ from
/// [`dot_q8`], which adds the blocks in another order, in the last bits.
///
/// **How the SIMD kernels go fast.** A block of 8 (AVX2) or 16 (AVX-512) rows is unpacked once
/// per chunk of up to 64 tokens into 8 vectors, vector `g` holding quants `4g..4g+4` of every
/// row (lane `r` = row `r`: a 4×4-dword transpose of the packed bytes within each 128-bit lane,
/// then nibbles and fifth bits spread to bytes). Each token then needs only 8 products of a
/// weight vector with its activation bytes `4g..4g+4` broadcast to every lane — `vpdpbusd`
/// with VNNI (the broadcast folded into it), else `vpmaddubsw` pair sums added in i16 as far as
/// they cannot overflow and widened once by `vpmaddwd` — and every lane holds its row's whole
/// block sum: no horizontal reduction, and one convert, scale and fma per vector for 8 or 16
/// (row, token) pairs.
///
/// **Offsets.** Both instructions multiply unsigned bytes (the weights here) by signed ones (the
/// activations). The quants go in unsigned as stored (Q4_0 nibbles 0..16, Q5_0 values 0..32,
/// and for VNNI Q8_0's bytes + 128). Q4_0 / Q5_0's offset `o` (8, 16) is a float term, as the
/// `_1` formats' minimum: `d·d_a·Σ (q − o)·a = d·d_a·Σ q·a − o·d·s_a` (`s_a = d_a·Σ a`), so the
/// integer sums are the same for every token and the VNNI walk keeps them in register tiles.
/// Q8_0's 128 under VNNI comes back exactly through `Σ (q − 128)·a = Σ q·a − 128·Σ a`:
/// `−128·Σ a` starts each block's integer sum, from `−Σ a` summed once per activation block and
/// product ([`crate::act::neg_sums`], which `matmul` passes to every tile; a tile called without
/// them sums the blocks itself). Without VNNI, Q8_0's full-range bytes would overflow the i16
/// pair sums that way; its weight sign moves onto the activation instead (`|w|·(sign(w)·a)`),
/// and for one or two tokens it skips the transpose (multiplying rows in place and reducing
/// them with a few shuffles is cheaper when a block serves a single token; the sums, being
/// exact, are the same).
///
/// **INT8, INT4 and NF4** (the formats quantized at load, [`crate::dot::nongguf`]) run on the
/// same tiles, over their interleaved layout only (rows are rearranged per call): INT4 as Q4_0
/// blocks that share a scale by four (its codes `u` unsigned, the 8 an `m·s_a` term), NF4 as Q8_0
/// blocks that share one by two (its codes looked up in [`NF4_I8`] with `vpshufb`, the scale
/// `d/127`), INT8 as Q8_0 blocks whose scale is the row's (kept per 16-row group ahead of its
/// blocks). Each Q8Block of a shared block takes nibble `k % 2` of the 8 dwords of run `k / 2`.
/// [`tile_dot_scalar`] gives their bits too.
///
/// Activation quants must lie in −127..=127, as [`crate::act::quantize_q8`] produces (only the
/// sign trick would overflow on −128).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    level: SimdLevel,
    dtype: DType,
    w: &[u8],
    nrows: usize,
    layout: Layout,
    act: &[Q8Block],
    sums: &[i32],
    ntok: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if nrows == 0 || ntok == 0 {
        return;
    }
    assert!(sums.is_empty() || sums.len() == act.len(), "one block sum per activation block, or none");
    let nb = act.len() / ntok;
    let packed = layout == Layout::Interleaved;
    let load_time = matches!(dtype, DType::INT8 | DType::INT4 | DType::NF4);
    if packed {
        assert!(
            load_time || matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0),
            "{dtype} is not a legacy block format"
        );
        crate::dot::check_interleaved(dtype, w.len(), nrows, nb);
    } else if load_time {
        crate::dot::nongguf::check(dtype, &w[..w.len() / nrows], &act[..nb]);
    } else {
        check(dtype, &w[..w.len() / nrows], &act[..nb]);
    }
    if load_time && !packed && level != SimdLevel::Scalar {
        // The SIMD tiles read INT8, INT4 and NF4 only interleaved (the layout they are repacked into
        // at load); rows (`--no-repack`) are rearranged for the call, so the bits are the same.
        let packed = crate::dot::interleave(dtype, nrows, nb * 32, w);
        return gemm(level, dtype, &packed, nrows, Layout::Interleaved, act, sums, ntok, out, ldo);
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level` comes from `cpu::level()`, which only reports what the CPU has
        // (AVX2 + FMA + F16C), and `has_avx_vnni()` detected AVX-VNNI; the checks above and
        // `dot::gemm_q8` asserted the shapes and the layout's size.
        SimdLevel::Avx2 => unsafe {
            if crate::cpu::has_avx_vnni() {
                tile_x86::gemm_avx2_vnni(dtype, w, nrows, packed, act, sums, ntok, out, ldo)
            } else {
                tile_x86::gemm_avx2(dtype, w, nrows, packed, act, sums, ntok, out, ldo)
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (AVX-512 F/BW/VL/DQ + FMA + F16C); the VNNI kernels only run when
        // `has_avx512_vnni()` detected it.
        SimdLevel::Avx512 => unsafe {
            if crate::cpu::has_avx512_vnni() {
                tile_x86::gemm_avx512_vnni(dtype, w, nrows, packed, act, sums, ntok, out, ldo)
            } else {
                tile_x86::gemm_avx512(dtype, w, nrows, packed, act, sums, ntok, out, ldo)
            }
        },
        // The reference restores an interleaved matrix's rows.
        _ if packed => {
            let rows = crate::dot::deinterleave(dtype, nrows, nb * 32, w);
            gemm_scalar(dtype, &rows, nrows, act, ntok, out, ldo)
        }
        _ => gemm_scalar(dtype, w, nrows, act, ntok, out, ldo),
    }
}

/// Whether [`gemm`] at `level` starts the integer sums of `dtype` from offset terms, and so
/// reads the activations' [`crate::act::neg_sums`]: the whole-byte formats made unsigned for
/// `vpdpbusd`.
pub fn uses_sums(level: SimdLevel, dtype: DType) -> bool {
    let vnni = match level {
        SimdLevel::Avx512 => crate::cpu::has_avx512_vnni(),
        SimdLevel::Avx2 => crate::cpu::has_avx_vnni(),
        _ => false,
    };
    vnni && matches!(dtype, DType::Q8_0 | DType::INT8 | DType::NF4)
}

/// The scalar level: [`tile_dot_scalar`] per (row, token).
#[allow(clippy::too_many_arguments)]
fn gemm_scalar(dtype: DType, w: &[u8], nrows: usize, act: &[Q8Block], ntok: usize, out: &mut [f32], ldo: usize) {
    let rb = w.len() / nrows;
    let nb = act.len() / ntok;
    for r in 0..nrows {
        for t in 0..ntok {
            out[t * ldo + r] = tile_dot_scalar(dtype, &w[r * rb..(r + 1) * rb], &act[t * nb..(t + 1) * nb]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod tile_x86 {
    use std::arch::x86_64::*;

    use super::Q8Block;
    use crate::DType;

    /// Tokens whose f32 accumulators a row group keeps (on the stack) while it walks the blocks:
    /// each unpacked weight block serves this many tokens.
    const TOKENS: usize = 64;

    // ---------------------------------------------------------------------------------------
    // Formats
    // ---------------------------------------------------------------------------------------

    /// What the tile kernels need to know of a block format.
    pub(super) trait Fmt {
        /// Bytes per block; `d` (f16) is always first.
        const BB: usize;
        /// Where the quants start: 16 bytes of nibble pairs, or 32 signed bytes for Q8_0.
        const QS: usize;
        /// Where the 32 fifth bits start (Q5_0 / Q5_1); 0 when there are none.
        const QH: usize;
        /// log2 of the offset `o` the stored (unsigned) quants carry: Q4_0: 8, Q5_0: 16 (an
        /// `m·s_a` term, [`has_m`]), and Q8_0 when the VNNI kernel adds 128 to make its bytes
        /// unsigned (an offset term, [`offset`]); 0 for none.
        const OFFSET_LOG2: u32;
        /// An f16 minimum `m` follows `d` (Q4_1, Q5_1).
        const MIN: bool;
        /// Whole signed bytes (Q8_0).
        const BYTES: bool;
        /// How many 4-byte groups' `vpmaddubsw` outputs (i16 sums of two products) add up in
        /// i16 without overflow: 16 products of 4-bit quants (≤ 15·128 each) or 8 of 5-bit ones
        /// (≤ 31·128). Q8_0 does not use it.
        const I16_GROUPS: usize;
        /// Q8Blocks per stored block: 1, or the 4 and 2 that share INT4's and NF4's scale.
        const CHUNK: usize = 1;
        /// The codes lie in runs (INT4, NF4): 32 bytes per row hold two Q8Blocks, the first in
        /// the low nibbles and the second in the high ones, so Q8Block `k` of a stored block takes
        /// nibble `k % 2` of the 8 dwords of run `k / 2`. Read from the interleaved layout only.
        const RUNS: bool = false;
        /// NF4: the codes index [`super::NF4_I8`] (signed bytes, taken as [`Fmt::BYTES`]) and
        /// the scale is `d / 127`.
        const TABLE: bool = false;
        /// INT8: one f32 scale per row, which the interleaved layout keeps per group of rows
        /// ahead of its blocks (`crate::dot::interleave`); blocks are the 32 codes alone.
        const ROW_SCALE: bool = false;
    }

    pub(super) struct Q4_0;
    pub(super) struct Q4_1;
    pub(super) struct Q5_0;
    pub(super) struct Q5_1;
    pub(super) struct Q8_0;
    pub(super) struct Int8;
    pub(super) struct Int4;
    pub(super) struct Nf4;

    impl Fmt for Q4_0 {
        const BB: usize = 18;
        const QS: usize = 2;
        const QH: usize = 0;
        const OFFSET_LOG2: u32 = 3;
        const MIN: bool = false;
        const BYTES: bool = false;
        const I16_GROUPS: usize = 8;
    }
    impl Fmt for Q4_1 {
        const BB: usize = 20;
        const QS: usize = 4;
        const QH: usize = 0;
        const OFFSET_LOG2: u32 = 0;
        const MIN: bool = true;
        const BYTES: bool = false;
        const I16_GROUPS: usize = 8;
    }
    impl Fmt for Q5_0 {
        const BB: usize = 22;
        const QS: usize = 6;
        const QH: usize = 2;
        const OFFSET_LOG2: u32 = 4;
        const MIN: bool = false;
        const BYTES: bool = false;
        const I16_GROUPS: usize = 4;
    }
    impl Fmt for Q5_1 {
        const BB: usize = 24;
        const QS: usize = 8;
        const QH: usize = 4;
        const OFFSET_LOG2: u32 = 0;
        const MIN: bool = true;
        const BYTES: bool = false;
        const I16_GROUPS: usize = 4;
    }
    impl Fmt for Q8_0 {
        const BB: usize = 34;
        const QS: usize = 2;
        const QH: usize = 0;
        const OFFSET_LOG2: u32 = 7;
        const MIN: bool = false;
        const BYTES: bool = true;
        const I16_GROUPS: usize = 1;
    }
    /// INT8 as Q8_0 blocks whose scale is the row's.
    impl Fmt for Int8 {
        const BB: usize = 32;
        const QS: usize = 0;
        const QH: usize = 0;
        const OFFSET_LOG2: u32 = 7;
        const MIN: bool = false;
        const BYTES: bool = true;
        const I16_GROUPS: usize = 1;
        const ROW_SCALE: bool = true;
    }
    /// INT4 as Q4_0 blocks that share a scale by four (an `m·s_a` term of `−8·d`).
    impl Fmt for Int4 {
        const BB: usize = 66;
        const QS: usize = 2;
        const QH: usize = 0;
        const OFFSET_LOG2: u32 = 3;
        const MIN: bool = false;
        const BYTES: bool = false;
        const I16_GROUPS: usize = 8;
        const CHUNK: usize = 4;
        const RUNS: bool = true;
    }
    /// NF4 as Q8_0 blocks that share a scale by two, the bytes looked up from the codes.
    impl Fmt for Nf4 {
        const BB: usize = 34;
        const QS: usize = 2;
        const QH: usize = 0;
        const OFFSET_LOG2: u32 = 7;
        const MIN: bool = false;
        const BYTES: bool = true;
        const I16_GROUPS: usize = 1;
        const CHUNK: usize = 2;
        const RUNS: bool = true;
        const TABLE: bool = true;
    }

    /// A kernel of one format as the dispatchers below call it.
    type Kernel = unsafe fn(Tile<'_>);

    /// The kernel of `dtype` among one ISA's eight.
    fn pick(dtype: DType, k: [Kernel; 8]) -> Kernel {
        match dtype {
            DType::Q4_0 => k[0],
            DType::Q4_1 => k[1],
            DType::Q5_0 => k[2],
            DType::Q5_1 => k[3],
            DType::Q8_0 => k[4],
            DType::INT4 => k[5],
            DType::NF4 => k[6],
            DType::INT8 => k[7],
            other => panic!("{other} is not a legacy block format"),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Shared pieces
    // ---------------------------------------------------------------------------------------

    /// Byte offsets of the `N` rows of a group from its first row, as usize and as i32 (for
    /// the gathers); rows past the last one (`live`) repeat it, so every load stays inside the
    /// matrix and the extra lanes' results are simply not stored.
    fn row_offsets<const N: usize>(live: usize, rb: usize) -> ([usize; N], [i32; N]) {
        assert!(rb <= i32::MAX as usize / N, "rows of {rb} bytes are too long for the tile kernels");
        let offs: [usize; N] = std::array::from_fn(|r| r.min(live - 1) * rb);
        (offs, offs.map(|o| o as i32))
    }

    /// The offset term of format `F` for an activation block whose quants sum to `−neg_sum`:
    /// `−o·Σ q_a`, `o = 1 << F::OFFSET_LOG2`, the offset's share of
    /// `Σ (q_w − o)·q_a = Σ q_w·q_a − o·Σ q_a`, exact in i32 (|Σ q_a| ≤ 32·127). It starts each
    /// block's integer sum, so the stored unsigned quants go into the products as they are.
    #[inline(always)]
    fn offset<F: Fmt>(neg_sum: i32) -> i32 {
        neg_sum << F::OFFSET_LOG2
    }

    /// Copies the first `live` lanes of each token's accumulator to `out` from `at`.
    fn store<const N: usize>(acc: &[[f32; N]], live: usize, out: &mut [f32], at: usize, ldo: usize) {
        for (i, a) in acc.iter().enumerate() {
            crate::dot::put(out, at + i * ldo, a, live);
        }
    }

    /// `vpshufb` indices copying byte `byte` of each dword to all four of its bytes.
    fn dword_byte_index(byte: usize) -> [i32; 4] {
        std::array::from_fn(|i| (4 * i as i32 + byte as i32) * 0x0101_0101)
    }

    /// Byte `j` of each dword tests bit `j` of nibble `g % 2` of a byte.
    fn nibble_bits(g: usize) -> i32 {
        (0x0804_0201u32 << (4 * (g % 2))) as i32
    }

    /// One call's operands, as [`super::gemm`] takes them; `packed`: `w` is in the interleaved
    /// layout ([`crate::dot::interleave`]).
    struct Tile<'a> {
        w: &'a [u8],
        nrows: usize,
        packed: bool,
        act: &'a [Q8Block],
        /// `−Σ q_a` per activation block ([`crate::act::neg_sums`]), or empty: then the walk
        /// computes them where its format needs them.
        sums: &'a [i32],
        ntok: usize,
        out: &'a mut [f32],
        ldo: usize,
    }

    /// Bytes ahead of the interleaved block being read that [`walk`] prefetches (a single
    /// stream is followed too shallowly by the hardware to keep the memory busy); about what
    /// the K formats' four super-blocks ahead come to.
    const PREFETCH_BYTES: usize = 8192;

    // ---------------------------------------------------------------------------------------
    // The tile, once for every vector width
    // ---------------------------------------------------------------------------------------

    /// One block of `N` rows, lane `r` = row `r`: `w[g]` = the row's quants `4g..4g+4` as bytes
    /// (unsigned as stored, or Q8_0's signed ones), `d` / `m` its scale / minimum.
    #[derive(Clone, Copy)]
    struct Block<I, P> {
        w: [I; 8],
        d: P,
        m: P,
    }

    /// What the tile needs of a vector width of `N` rows (lanes of 32 bits). The methods are
    /// `#[inline(always)]` without target features of their own: they are only called (inlined)
    /// from the `#[target_feature]` entry points below, which enable what each implementation
    /// uses (as `kquants`' `Isa`). The blocks stay in registers, unpacked once for every token
    /// of a chunk; the width-specific parts are the loads that transpose rows into columns, the
    /// header reads, the fifth bits and how Q8_0's signs move.
    trait Width<const N: usize> {
        type I: Copy;
        type P: Copy;
        /// What carries Q8_0's weight signs to the activations (`|w|·(sign(w)·a)`).
        type Sign: Copy;
        /// `vpdpbusd` is there: unsigned weights times signed activations, four products at a
        /// time, no i16 step.
        const VNNI: bool;
        unsafe fn zero() -> Self::I;
        unsafe fn set1_i8(x: i8) -> Self::I;
        unsafe fn set1_i32(x: i32) -> Self::I;
        unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn xor(a: Self::I, b: Self::I) -> Self::I;
        /// Logical right shift of each dword by 4.
        unsafe fn srl4(a: Self::I) -> Self::I;
        unsafe fn add_i16(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn add_i32(a: Self::I, b: Self::I) -> Self::I;
        /// `vpmaddubsw`: unsigned bytes of `a` times signed bytes of `b`, pairs added in i16.
        unsafe fn maddubs(a: Self::I, b: Self::I) -> Self::I;
        /// Pairs of i16 added into i32.
        unsafe fn widen(a: Self::I) -> Self::I;
        /// `s + Σ` of the four products of unsigned `a` and signed `b` bytes per dword (VNNI).
        unsafe fn dpbusd(s: Self::I, a: Self::I, b: Self::I) -> Self::I;
        /// Activation bytes `4g..4g+4` at `p` in every dword.
        unsafe fn bcast(p: *const i8, g: usize) -> Self::I;
        /// The 16 bytes at `p` in every 128-bit lane.
        unsafe fn bcast128(p: *const i8) -> Self::I;
        /// `vpshufb`: byte `i` of `t`'s 128-bit lane for each byte `i` (< 16) of `idx`.
        unsafe fn lookup(t: Self::I, idx: Self::I) -> Self::I;
        /// A placeholder where no sign is needed.
        unsafe fn no_sign() -> Self::Sign;
        /// `(|w|, the sign of w)` of signed bytes.
        unsafe fn signs(w: Self::I) -> (Self::I, Self::Sign);
        /// `a` with each byte negated where the weight's byte is negative (zeroed where it is 0).
        unsafe fn signed(a: Self::I, s: Self::Sign) -> Self::I;
        /// The block sums of rows left in place ([`Width::rows`]): `v[i]` has in lane `(L, k)`
        /// (128-bit lane `L`, dword `k`) a partial sum of row `i + 4L`; returns lane `r` = the
        /// whole sum of row `r`.
        unsafe fn reduce(v: [Self::I; 4]) -> Self::I;
        /// `wg` (quants `4g..4g+4` of each row, as bytes) with 0x10 added where the fifth bit,
        /// nibble `g` of each row's `qh` dword, is set.
        unsafe fn fifth(wg: Self::I, qh: Self::I, g: usize) -> Self::I;
        /// [`Width::fifth`] from the interleaved layout's fifth bits
        /// ([`crate::dot::spread_fifth_bits`]: quant `4g + k`'s is bit `g` of byte `k`).
        unsafe fn fifth_spread(wg: Self::I, qh: Self::I, g: usize) -> Self::I;
        unsafe fn zero_p() -> Self::P;
        unsafe fn set1_p(x: f32) -> Self::P;
        unsafe fn mul(a: Self::P, b: Self::P) -> Self::P;
        /// `a·b + c`, rounded once.
        unsafe fn fma(a: Self::P, b: Self::P, c: Self::P) -> Self::P;
        unsafe fn cvt(v: Self::I) -> Self::P;
        unsafe fn loadp(p: *const f32) -> Self::P;
        unsafe fn storep(p: *mut f32, v: Self::P);
        /// `4N` bytes.
        unsafe fn load(p: *const u8) -> Self::I;
        /// `N` f16 values at `p`, as f32.
        unsafe fn f16_load(p: *const u8) -> Self::P;
        /// The f16 in the low / high half of each dword, as f32.
        unsafe fn f16_lo(v: Self::I) -> Self::P;
        unsafe fn f16_hi(v: Self::I) -> Self::P;
        /// Of each row's block at `base + offs[r]` (`idx`: `offs` as i32): its first dword (`d`,
        /// then `m` for the `_1` formats) and its fifth bits (zero for formats without).
        unsafe fn header<F: Fmt>(base: *const u8, offs: &[usize; N], idx: &[i32; N]) -> (Self::I, Self::I);
        /// 16 bytes at `at` of each of the rows as 4 vectors of dwords: vector `k`, lane `r` =
        /// dword `k` of row `r`.
        unsafe fn transpose(base: *const u8, offs: &[usize; N], at: usize) -> [Self::I; 4];
        /// The 32 bytes from `at` of each row left in place: `w[2i + h]` holds rows `i`, `i + 4`,
        /// ... (one per 128-bit lane), 16 bytes each from `at + 16h`.
        unsafe fn rows(base: *const u8, offs: &[usize; N], at: usize) -> [Self::I; 8];
    }

    /// `d` and `m` (the `_1` formats' minimum, or Q4_0 / Q5_0's `−o·d`), from the dword holding
    /// them in each lane.
    #[inline(always)]
    unsafe fn d_m<V: Width<N>, F: Fmt, const N: usize>(dm: V::I) -> (V::P, V::P) {
        let d = V::f16_lo(dm);
        (d, if F::MIN { V::f16_hi(dm) } else { offset_m::<V, F, N>(d) })
    }

    /// The `m` of a format without a stored minimum, from its scale `d`: `−o·d` for Q4_0 /
    /// Q5_0 (exact: a power of two times an f16), none for Q8_0.
    #[inline(always)]
    unsafe fn offset_m<V: Width<N>, F: Fmt, const N: usize>(d: V::P) -> V::P {
        if has_m::<F>() {
            V::mul(d, V::set1_p(-((1u32 << F::OFFSET_LOG2) as f32)))
        } else {
            V::zero_p()
        }
    }

    /// Whether the format's blocks add an `m·s_a` term: the `_1` formats' minimum, or the
    /// offset of Q4_0 / Q5_0's unsigned quants (`Σ (q − o)·a·d·d_a = d·d_a·Σ q·a − o·d·s_a`).
    const fn has_m<F: Fmt>() -> bool {
        F::MIN || (F::OFFSET_LOG2 != 0 && !F::BYTES)
    }

    /// A block of `N` rows from its columns of quant dwords `q` (Q8_0: all 8; the nibble
    /// formats: the first 4) and the fifth bits `qh` (Q5_0 / Q5_1; `SPREAD`: in the interleaved
    /// layout's order).
    #[inline(always)]
    unsafe fn block<V: Width<N>, F: Fmt, const N: usize, const SPREAD: bool>(
        d: V::P,
        m: V::P,
        q: [V::I; 8],
        qh: V::I,
        sub: usize,
    ) -> Block<V::I, V::P> {
        if F::RUNS {
            // Nibble `sub % 2` of each dword of the run: quants 4g..4g+4 of the Q8Block.
            let mut w = [V::zero(); 8];
            let table = if F::TABLE { V::bcast128(super::NF4_I8.as_ptr()) } else { V::zero() };
            for (wg, &x) in w.iter_mut().zip(&q) {
                *wg = V::and(if sub % 2 == 1 { V::srl4(x) } else { x }, V::set1_i8(0x0F));
                if F::TABLE {
                    *wg = V::lookup(table, *wg);
                }
            }
            return Block { w, d, m };
        }
        if F::BYTES {
            return Block { w: q, d, m };
        }
        // Dword k of the packed bytes holds quants 4k..4k+4 in its low nibbles and
        // 16+4k..16+4k+4 in its high ones: groups k and k + 4.
        let mut w = [V::zero(); 8];
        for (g, wg) in w.iter_mut().enumerate() {
            let x = if g < 4 { q[g] } else { V::srl4(q[g - 4]) };
            *wg = V::and(x, V::set1_i8(0x0F));
            if F::QH != 0 {
                *wg = if SPREAD { V::fifth_spread(*wg, qh, g) } else { V::fifth(*wg, qh, g) };
            }
        }
        Block { w, d, m }
    }

    /// The blocks of `N` rows at `base + offs[r]`, unpacked.
    #[inline(always)]
    unsafe fn unpack<V: Width<N>, F: Fmt, const N: usize>(
        base: *const u8,
        offs: &[usize; N],
        idx: &[i32; N],
    ) -> Block<V::I, V::P> {
        let (dm, qh) = V::header::<F>(base, offs, idx);
        let (d, m) = d_m::<V, F, N>(dm);
        let mut q = [V::zero(); 8];
        q[..4].copy_from_slice(&V::transpose(base, offs, F::QS));
        if F::BYTES {
            q[4..].copy_from_slice(&V::transpose(base, offs, F::QS + 16));
        }
        block::<V, F, N, false>(d, m, q, qh, 0)
    }

    /// The interleaved block of a 16-row group at `blk` (see [`crate::dot::interleave`]), rows
    /// `lane..lane + N`, unpacked as [`unpack`] unpacks rows: the same values, without the
    /// transposes.
    ///
    /// INT4 and NF4 (`F::CHUNK` > 1): `blk` is the stored block, `sub` the Q8Block in it.
    /// INT8 (`F::ROW_SCALE`): `head` is its group's row scales.
    #[inline(always)]
    unsafe fn packed<V: Width<N>, F: Fmt, const N: usize>(
        blk: *const u8,
        head: *const u8,
        lane: usize,
        sub: usize,
    ) -> Block<V::I, V::P> {
        // Column `c` of the field at byte `off` of the row blocks.
        let col = |off: usize, c: usize| blk.add(16 * off + 64 * c + 4 * lane);
        let (d, m) = if F::ROW_SCALE {
            (V::loadp(head.add(4 * lane) as *const f32), V::zero_p())
        } else if F::MIN {
            d_m::<V, F, N>(V::load(col(0, 0)))
        } else {
            let d = V::f16_load(blk.add(2 * lane));
            // NF4: the f32 product `d · (1/127)`, as the scalar twin rounds it.
            let d = if F::TABLE { V::mul(d, V::set1_p(super::NF4_I8_SCALE)) } else { d };
            (d, offset_m::<V, F, N>(d))
        };
        let (n, qs) = if F::RUNS { (8, F::QS + 32 * (sub / 2)) } else { (if F::BYTES { 8 } else { 4 }, F::QS) };
        let mut q = [V::zero(); 8];
        for (c, qc) in q.iter_mut().enumerate().take(n) {
            *qc = V::load(col(qs, c));
        }
        let qh = if F::QH != 0 { V::load(col(F::QH, 0)) } else { V::zero() };
        block::<V, F, N, true>(d, m, q, qh, sub)
    }

    /// Q8_0's blocks of `N` rows left in place for a token or two (see [`tile`]).
    #[inline(always)]
    unsafe fn in_place<V: Width<N>, F: Fmt, const N: usize>(
        base: *const u8,
        offs: &[usize; N],
        idx: &[i32; N],
    ) -> Block<V::I, V::P> {
        let (dm, _) = V::header::<F>(base, offs, idx);
        Block { w: V::rows(base, offs, F::QS), d: V::f16_lo(dm), m: V::zero_p() }
    }

    /// `acc = fma(d_w·d_a, sum, acc)`, then `fma(m_w, s_a, acc)` for the nibble formats: the float
    /// steps of [`super::tile_dot_scalar`], one lane per row.
    #[inline(always)]
    unsafe fn finish<V: Width<N>, F: Fmt, const N: usize>(
        acc: &mut [f32; N],
        sum: V::I,
        blk: &Block<V::I, V::P>,
        a: &Q8Block,
    ) {
        V::storep(acc.as_mut_ptr(), fold::<V, F, N>(V::loadp(acc.as_ptr()), sum, blk.d, blk.m, a));
    }

    /// The float steps of [`finish`] on an accumulator `v` in a register: `d`, `m` the block's
    /// scale and minimum.
    #[inline(always)]
    unsafe fn fold<V: Width<N>, F: Fmt, const N: usize>(v: V::P, sum: V::I, d: V::P, m: V::P, a: &Q8Block) -> V::P {
        let v = V::fma(V::mul(d, V::set1_p(a.d)), V::cvt(sum), v);
        if has_m::<F>() {
            V::fma(m, V::set1_p(a.s), v)
        } else {
            v
        }
    }

    /// How a tile takes its integer sums: the nibble formats' `vpmaddubsw` pairs added in i16
    /// as far as they cannot overflow; Q8_0's `|w|·(sign(w)·a)`, transposed or, for a token or
    /// two, with the rows left in place; or `vpdpbusd` on unsigned weights.
    const NIBBLES: u8 = 0;
    const BYTES: u8 = 1;
    const BYTES_IN_PLACE: u8 = 2;
    const VNNI: u8 = 3;
    /// As `BYTES`, each token taking the signs itself: for a token or two in the interleaved
    /// layout, where the shared `|w|` and signs (16 registers) spilled, and the spills cost
    /// more than the work they save (Q8_0 at AVX2, one token: 30.4 ns per row-token
    /// pair at 896 columns, 26 after).
    const BYTES_FEW: u8 = 4;

    /// The tile kernel of format `F` at width `V`: `w` holds `nrows` rows of
    /// `act.len() / ntok` blocks of `F` (or their interleaved layout); `out` holds
    /// `(ntok - 1) * ldo + nrows` values.
    ///
    /// # Safety
    /// The CPU has what `V` uses, and the caller enables it (`#[target_feature]`).
    #[inline(always)]
    unsafe fn tile<V: Width<N>, F: Fmt, const N: usize>(t: Tile<'_>) {
        if V::VNNI {
            walk::<V, F, N, VNNI>(t)
        } else if !F::BYTES {
            walk::<V, F, N, NIBBLES>(t)
        } else if t.ntok <= 2 && !t.packed {
            // Q8_0 for a token or two: transposing 32 bytes per row costs more than it saves.
            walk::<V, F, N, BYTES_IN_PLACE>(t)
        } else if t.ntok <= 2 {
            walk::<V, F, N, BYTES_FEW>(t)
        } else {
            walk::<V, F, N, BYTES>(t)
        }
    }

    /// The walk of every tile (no closures: intrinsics inlined into a closure lose the entry
    /// point's target features). For each group of `N` rows, each chunk of up to [`TOKENS`]
    /// tokens and each block: the group's block is unpacked once, what the tokens share is
    /// derived from it, and each token's exact i32 block sums are folded into its f32
    /// accumulators, one lane per row.
    ///
    /// `vpdpbusd` tiles of several tokens take two groups at a time ([`groups`]): each token's
    /// broadcast activations then serve 32 rows. A broadcast costs a `vpdpbusd` slot of its own
    /// here (a loop of independent `vpdpbusd`s from memory broadcasts ran 1.32 a cycle on a
    /// Granite-Rapids-class core, 1.58 with each broadcast shared by two, 1.85 from registers).
    /// Every (row, token) takes the same operations either way, so the sums are the same bits.
    #[inline(always)]
    unsafe fn walk<V: Width<N>, F: Fmt, const N: usize, const KIND: u8>(tile: Tile<'_>) {
        let Tile { w, nrows, packed, act, sums, ntok, out, ldo } = tile;
        let nb = act.len() / ntok;
        let tiled = KIND == VNNI && !F::BYTES && ntok >= TILED_MIN_TOKENS;
        // The activations' sums, from the caller (once per product, not per tile) or made here.
        let owned;
        let sums = if !with_offsets::<F>(KIND) || !sums.is_empty() {
            sums
        } else {
            owned = crate::act::neg_sums(act);
            &owned[..]
        };
        // For a token or two (decode), both halves of an interleaved group at once when vectors
        // hold half a group: each line of a block is then read in one pass, not half of it in
        // each of two passes a group's walk apart (Q8_0 through VNNI excepted: measured no
        // faster). Many tokens, whose blocks come from L2, keep one half at a time.
        let halves = packed && N < crate::dot::GROUP_ROWS && ntok < PAIR_MIN_TOKENS && !(KIND == VNNI && F::BYTES);
        let pair_from = if N == crate::dot::GROUP_ROWS { WIDE_PAIR_MIN_TOKENS } else { PAIR_MIN_TOKENS };
        let pairs = (KIND == VNNI && ntok >= pair_from) || halves;
        let nta = ntok == 1 && crate::cpu::one_token_prefetch_nta();
        let walk = Walk { w, packed, act, ntok, nb, sums, nta };
        // The accumulators of a token chunk, for one group and for the second of a pair; only
        // the used ones are initialized, per chunk (zeroing 8 KiB per call would show in decode).
        let mut acc = [std::mem::MaybeUninit::<[f32; N]>::uninit(); TOKENS];
        let mut acc2 = [std::mem::MaybeUninit::<[f32; N]>::uninit(); TOKENS];
        let mut r0 = 0;
        while r0 < nrows {
            if tiled {
                groups_tiled::<V, F, N>(&walk, r0, nrows, &mut acc, out, ldo);
                r0 += N;
            } else if pairs && nrows - r0 > N {
                groups::<V, F, N, KIND, true>(&walk, r0, nrows, [&mut acc, &mut acc2], out, ldo);
                r0 += 2 * N;
            } else {
                groups::<V, F, N, KIND, false>(&walk, r0, nrows, [&mut acc, &mut acc2], out, ldo);
                r0 += N;
            }
        }
    }

    /// The first `n` accumulators of `buf`, zeroed (only those: zeroing all 64 per call would
    /// show in decode).
    fn zeroed<const N: usize>(buf: &mut [std::mem::MaybeUninit<[f32; N]>; TOKENS], n: usize) -> &mut [[f32; N]] {
        for a in &mut buf[..n] {
            a.write([0.0; N]);
        }
        // SAFETY: the first `n` were just written.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut [f32; N], n) }
    }

    /// Whether the integer sums of `KIND` start from the offset terms of format `F`
    /// ([`offset`]); known at compile time, so the walk's per-token branch goes.
    #[inline(always)]
    const fn with_offsets<F: Fmt>(kind: u8) -> bool {
        F::BYTES && kind == VNNI
    }

    /// Fewest tokens for which [`walk`] takes two row groups at a time: one or two tokens have
    /// few broadcasts to share, and a single group prefetches ahead more evenly.
    const PAIR_MIN_TOKENS: usize = 4;

    /// As [`PAIR_MIN_TOKENS`] for the AVX-512 `vpdpbusd` walk (16-row vectors) of Q8_0, and of
    /// the nibble formats below [`TILED_MIN_TOKENS`]. A batched decode step of 16 sequences
    /// reads its matrices from memory, and there two groups at a time lost, as the K formats'
    /// pairs did (`kquants::tiled`): Qwen3-0.6B-shaped Q8_0, `pio bench --batch 16
    /// --prompt-tokens 100 --gen-tokens 48`, Zen 5, alternated rounds, medians 389 tok/s paired
    /// from 4 tokens, 437 from 32 (8 rounds); 408 against 458 (4 more). AVX-VNNI's 8-row walk
    /// kept its pairs from 4 (from 32 it measured 235 against 240). Prefill chunks of 64
    /// tokens, read from L2, keep the pairs.
    const WIDE_PAIR_MIN_TOKENS: usize = 32;

    /// What every group of a [`walk`] shares.
    struct Walk<'a> {
        w: &'a [u8],
        packed: bool,
        act: &'a [Q8Block],
        ntok: usize,
        nb: usize,
        /// `−Σ q_a` per activation block where the format takes offset terms ([`offset`]).
        sums: &'a [i32],
        /// Whether prefetches are non-temporal (one token, where
        /// [`crate::cpu::one_token_prefetch_nta`] says so) rather than into L2 (see [`prefetch`]).
        nta: bool,
    }

    /// The group of `N` rows at `r0` (and with `TWO` the next one, which exists) times every
    /// token of the walk, stored to `out`.
    #[inline(always)]
    unsafe fn groups<V: Width<N>, F: Fmt, const N: usize, const KIND: u8, const TWO: bool>(
        walk: &Walk<'_>,
        r0: usize,
        nrows: usize,
        [acc_buf, acc2_buf]: [&mut [std::mem::MaybeUninit<[f32; N]>; TOKENS]; 2],
        out: &mut [f32],
        ldo: usize,
    ) {
        let nb = walk.nb;
        let rb = nb * F::BB;
        let live = [(nrows - r0).min(N), if TWO { (nrows - r0 - N).min(N) } else { 0 }];
        let (offs, idx) = row_offsets::<N>(live[0], rb);
        let (offs2, idx2) = if TWO { row_offsets::<N>(live[1], rb) } else { (offs, idx) };
        for t0 in (0..walk.ntok).step_by(TOKENS) {
            let n = (walk.ntok - t0).min(TOKENS);
            let acc = zeroed(acc_buf, n);
            let acc2 = if TWO { zeroed(acc2_buf, n) } else { &mut [][..] };
            let rows = Rows { r0, offs: &offs, idx: &idx, offs2: &offs2, idx2: &idx2 };
            if F::CHUNK > 1 && walk.packed {
                // By stored block, each Q8Block's place in it a constant: its run's loads
                // and nibble are then fixed, and the Q8Blocks of one run share its loads.
                for b in (0..nb).step_by(F::CHUNK) {
                    block_step::<V, F, N, KIND, TWO>(walk, &rows, b, 0, t0, n, acc, acc2);
                    block_step::<V, F, N, KIND, TWO>(walk, &rows, b + 1, 1, t0, n, acc, acc2);
                    if F::CHUNK > 2 {
                        block_step::<V, F, N, KIND, TWO>(walk, &rows, b + 2, 2, t0, n, acc, acc2);
                        block_step::<V, F, N, KIND, TWO>(walk, &rows, b + 3, 3, t0, n, acc, acc2);
                    }
                }
            } else {
                for b in 0..nb {
                    if TWO && KIND == BYTES_FEW && walk.packed && !F::TABLE {
                        bytes_few_pair::<V, F, N>(walk, r0, b, t0, n, acc, acc2);
                        continue;
                    }
                    block_step::<V, F, N, KIND, TWO>(walk, &rows, b, b % F::CHUNK, t0, n, acc, acc2);
                }
            }
            store(acc, live[0], out, t0 * ldo + r0, ldo);
            if TWO {
                store(acc2, live[1], out, t0 * ldo + r0 + N, ldo);
            }
        }
    }

    /// The rows of a [`groups`] call: the first group's at `r0`, and their offsets and lane
    /// indices in the row layout, for both groups.
    struct Rows<'a, const N: usize> {
        r0: usize,
        offs: &'a [usize; N],
        idx: &'a [i32; N],
        offs2: &'a [usize; N],
        idx2: &'a [i32; N],
    }

    /// Q8Block `b` (the `sub`-th of its stored block) of [`groups`]' rows times tokens
    /// `t0..t0 + n`, into their accumulators.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_step<V: Width<N>, F: Fmt, const N: usize, const KIND: u8, const TWO: bool>(
        walk: &Walk<'_>,
        rows: &Rows<'_, N>,
        b: usize,
        sub: usize,
        t0: usize,
        n: usize,
        acc: &mut [[f32; N]],
        acc2: &mut [[f32; N]],
    ) {
        let (act, nb, r0) = (walk.act, walk.nb, rows.r0);
        let blk = group_block::<V, F, N, KIND>(walk, r0, b, sub, rows.offs, rows.idx);
        let blk2 = if TWO { group_block::<V, F, N, KIND>(walk, r0 + N, b, sub, rows.offs2, rows.idx2) } else { blk };
        let (wa, sign) = shared::<V, F, N, KIND>(&blk);
        let (wa2, sign2) = if TWO { shared::<V, F, N, KIND>(&blk2) } else { (wa, sign) };
        for i in 0..n {
            let at = (t0 + i) * nb + b;
            // VNNI: its fields at a pointer plus constants ([`crate::dot::opaque`]); the other
            // kinds broadcast with separate loads, and AVX2's one-token walk measured 22%
            // slower through such a pointer (Q8_0 decode).
            let a = if KIND == VNNI { &*crate::dot::opaque(&act[at]) } else { &act[at] };
            let off = if with_offsets::<F>(KIND) { offset::<F>(walk.sums[at]) } else { 0 };
            let s = sum::<V, F, N, KIND>(&wa, &sign, a.qs.as_ptr(), off);
            finish::<V, F, N>(&mut acc[i], s, &blk, a);
            if TWO {
                let s = sum::<V, F, N, KIND>(&wa2, &sign2, a.qs.as_ptr(), off);
                finish::<V, F, N>(&mut acc2[i], s, &blk2, a);
            }
        }
    }

    /// Block `b` of both halves of the interleaved 16-row group at `r0` (vectors of `N = 8`
    /// rows) times tokens `t0..t0 + n`, Q8_0 without VNNI: column by column, each line of the
    /// block read once, the loads next to their products (unpacking both halves first spilled).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn bytes_few_pair<V: Width<N>, F: Fmt, const N: usize>(
        walk: &Walk<'_>,
        r0: usize,
        b: usize,
        t0: usize,
        n: usize,
        acc: &mut [[f32; N]],
        acc2: &mut [[f32; N]],
    ) {
        const G: usize = crate::dot::GROUP_ROWS;
        let nb = walk.nb;
        let (at, head, _) = located::<F>(nb, r0, b);
        let bytes = G * F::BB;
        let ahead = walk.w.as_ptr().wrapping_add(at + PREFETCH_BYTES);
        for line in (0..bytes).step_by(64) {
            prefetch(walk.nta, ahead.wrapping_add(line));
        }
        let blk = walk.w[at..at + bytes].as_ptr();
        let d = if F::ROW_SCALE {
            let head = walk.w[head..head + 4 * G].as_ptr() as *const f32;
            [V::loadp(head), V::loadp(head.add(N))]
        } else {
            [V::f16_load(blk), V::f16_load(blk.add(2 * N))]
        };
        let col = |c: usize, h: usize| blk.add(16 * F::QS + 64 * c + 4 * N * h);
        for i in 0..n {
            let a = &walk.act[(t0 + i) * nb + b];
            let y = a.qs.as_ptr();
            let mut s = [V::zero(); 2];
            for g in 0..8 {
                let x = V::bcast(y, g);
                for (h, s) in s.iter_mut().enumerate() {
                    let w = V::load(col(g, h));
                    let (abs, sign) = V::signs(w);
                    *s = V::add_i32(*s, V::widen(V::maddubs(abs, V::signed(x, sign))));
                }
            }
            let z = V::zero_p();
            V::storep(acc[i].as_mut_ptr(), fold::<V, F, N>(V::loadp(acc[i].as_ptr()), s[0], d[0], z, a));
            V::storep(acc2[i].as_mut_ptr(), fold::<V, F, N>(V::loadp(acc2[i].as_ptr()), s[1], d[1], z, a));
        }
    }

    /// Fewest tokens for which the VNNI walk of the nibble formats (all but Q8_0, whose offset
    /// term starts its integer sums) takes register tiles of [`TILE_TOKENS`] ([`groups_tiled`])
    /// instead of pairs of groups.
    /// `cargo bench -p pio-kernels --bench matmul -- 'matmul_Q(4_0|4_1|5_0|8_0)_n(16|64)/avx512$'`
    /// (one thread, GMAC/s, 2 alternated rounds, pairs -> tiles): Q4_1 n16 132 / 137 -> 139 /
    /// 144, n64 156 / 152 -> 167 / 175. With offset terms starting the integer sums (read per
    /// token and block) the tiles gained nothing or lost (Q8_0 n64 148 / 151 -> 137 / 146, Q5_0
    /// 145 / 149 -> 145 / 157), so Q8_0 keeps the pairs; Q4_0 / Q5_0, whose offset is now an
    /// `m·s_a` term as the `_1` formats' minimum ([`has_m`]), gained: Q5_0 n64 151 / 135 ->
    /// 162 / 159, Q4_0 152 / 146 -> 168 / 164.
    const TILED_MIN_TOKENS: usize = 8;
    /// Tokens per register tile of [`groups_tiled`].
    const TILE_TOKENS: usize = 8;
    /// Tokens per register tile of [`groups_tiled`] for 8-row vectors (AVX-VNNI, with 16
    /// registers). Nibble formats at 896 columns, 64 tokens (`bench_gemm_ns_per_pair`, ns per
    /// pair): 8.1-8.4 with pairs of groups, 7.1-7.7 with tiles of 4 tokens, 7.0-7.4 with 6.
    const NARROW_TILE_TOKENS: usize = 6;
    /// Blocks a [`groups_tiled`] pass unpacks before its tokens take them.
    const TILED_BLOCKS: usize = 8;

    /// The group of `N` rows at `r0` times every token, with `vpdpbusd`, for a nibble format
    /// (no offset terms in its integer sums): [`TILED_BLOCKS`] blocks are unpacked at a time,
    /// then each register tile of [`TILE_TOKENS`] tokens takes them with its accumulators in
    /// registers (not loaded and stored per block and token, as in [`groups`]), each column
    /// serving the tile's tokens.
    /// The same operations per (row, token) as [`groups`], so the same bits.
    #[inline(always)]
    unsafe fn groups_tiled<V: Width<N>, F: Fmt, const N: usize>(
        walk: &Walk<'_>,
        r0: usize,
        nrows: usize,
        acc_buf: &mut [std::mem::MaybeUninit<[f32; N]>; TOKENS],
        out: &mut [f32],
        ldo: usize,
    ) {
        let nb = walk.nb;
        let rb = nb * F::BB;
        let live = (nrows - r0).min(N);
        let (offs, idx) = row_offsets::<N>(live, rb);
        // Left uninitialized: a pass writes the blocks it reads, and zeroing these 4.5 KiB (and
        // the accumulators) per group showed as a `memset` taking 4-5% of a SmolLM2 prefill.
        let mut cols = [const { std::mem::MaybeUninit::<[V::I; 8]>::uninit() }; TILED_BLOCKS];
        let mut dm = [const { std::mem::MaybeUninit::<(V::P, V::P)>::uninit() }; TILED_BLOCKS];
        for t0 in (0..walk.ntok).step_by(TOKENS) {
            let n = (walk.ntok - t0).min(TOKENS);
            if nb == 0 {
                // No blocks: empty sums, which no pass below writes.
                store(zeroed(acc_buf, n), live, out, t0 * ldo + r0, ldo);
                continue;
            }
            let acc = &mut acc_buf[..n];
            for b0 in (0..nb).step_by(TILED_BLOCKS) {
                let nbk = (nb - b0).min(TILED_BLOCKS);
                for k in 0..nbk {
                    let blk = group_block::<V, F, N, VNNI>(walk, r0, b0 + k, (b0 + k) % F::CHUNK, &offs, &idx);
                    cols[k].write(shared::<V, F, N, VNNI>(&blk).0);
                    dm[k].write((blk.d, blk.m));
                }
                let (cols, dm) = (&cols, &dm);
                let mut t = 0;
                if N == crate::dot::GROUP_ROWS {
                    while t + TILE_TOKENS <= n {
                        let acc = &mut acc[t..t + TILE_TOKENS];
                        token_tile::<V, F, N, TILE_TOKENS>(walk, cols, dm, nbk, t0 + t, b0, acc);
                        t += TILE_TOKENS;
                    }
                } else {
                    while t + NARROW_TILE_TOKENS <= n {
                        let acc = &mut acc[t..t + NARROW_TILE_TOKENS];
                        token_tile::<V, F, N, NARROW_TILE_TOKENS>(walk, cols, dm, nbk, t0 + t, b0, acc);
                        t += NARROW_TILE_TOKENS;
                    }
                }
                for t in t..n {
                    token_tile::<V, F, N, 1>(walk, cols, dm, nbk, t0 + t, b0, &mut acc[t..t + 1]);
                }
            }
            // SAFETY: the pass of blocks 0.. (there was one: `nb > 0`) wrote all `n`.
            let acc = unsafe { std::slice::from_raw_parts(acc.as_ptr() as *const [f32; N], n) };
            store(acc, live, out, t0 * ldo + r0, ldo);
        }
    }

    /// Blocks `b0..b0 + nbk` (unpacked: `cols`, `dm`, whose first `nbk` are written) of tokens
    /// `t0..t0 + TT` into `acc`, which the pass of blocks 0.. starts from zero (and so need not
    /// hold anything before it) and the later ones read back.
    #[inline(always)]
    unsafe fn token_tile<V: Width<N>, F: Fmt, const N: usize, const TT: usize>(
        walk: &Walk<'_>,
        cols: &[std::mem::MaybeUninit<[V::I; 8]>; TILED_BLOCKS],
        dm: &[std::mem::MaybeUninit<(V::P, V::P)>; TILED_BLOCKS],
        nbk: usize,
        t0: usize,
        b0: usize,
        acc: &mut [std::mem::MaybeUninit<[f32; N]>],
    ) {
        let nb = walk.nb;
        // A zero start folds as a stored zero would: the same bits.
        let mut v: [V::P; TT] =
            std::array::from_fn(|t| if b0 == 0 { V::zero_p() } else { V::loadp(acc[t].as_ptr() as *const f32) });
        for k in 0..nbk {
            let at: [usize; TT] = std::array::from_fn(|t| (t0 + t) * nb + b0 + k);
            // Each token's fields at a pointer plus constants ([`crate::dot::opaque`]). In
            // bounds: tokens `t0..t0 + TT` and blocks `b0..b0 + nbk` lie in `act` (a bounds check
            // here measured 20-25% slower).
            let a: [&Q8Block; TT] = at.map(|at| &*crate::dot::opaque(walk.act.as_ptr().add(at)));
            let mut s: [V::I; TT] = [V::zero(); TT];
            // `k < nbk`: written by this pass (the caller's promise).
            for (g, &w) in cols[k].assume_init_ref().iter().enumerate() {
                for (s, a) in s.iter_mut().zip(&a) {
                    *s = V::dpbusd(*s, w, V::bcast(a.qs.as_ptr(), g));
                }
            }
            let (d, m) = dm[k].assume_init();
            for ((v, s), a) in v.iter_mut().zip(s).zip(&a) {
                *v = fold::<V, F, N>(*v, s, d, m, a);
            }
        }
        for (acc, v) in acc.iter_mut().zip(v) {
            V::storep(acc.as_mut_ptr() as *mut f32, v);
        }
    }

    /// Block `b` of the group of `N` rows at `r0`, unpacked (prefetching ahead in the
    /// interleaved layout).
    #[inline(always)]
    unsafe fn group_block<V: Width<N>, F: Fmt, const N: usize, const KIND: u8>(
        walk: &Walk<'_>,
        r0: usize,
        b: usize,
        sub: usize,
        offs: &[usize; N],
        idx: &[i32; N],
    ) -> Block<V::I, V::P> {
        const G: usize = crate::dot::GROUP_ROWS;
        let nb = walk.nb;
        if !walk.packed {
            let p = walk.w[r0 * nb * F::BB + b * F::BB..].as_ptr();
            return if KIND == BYTES_IN_PLACE {
                in_place::<V, F, N>(p, offs, idx)
            } else {
                unpack::<V, F, N>(p, offs, idx)
            };
        }
        let (at, head, next) = located::<F>(nb, r0, b);
        let bytes = G * F::BB;
        // Narrower vectors take a group in passes, each reading part of every line of a block.
        // Pass `k` asks for its share of the lines of the next group's same block, so those
        // arrive a pass or more early and each block's prefetches are a few, not a burst.
        let (passes, k) = (G / N, (r0 % G) / N);
        let share = bytes.div_ceil(64).div_ceil(passes) * 64;
        let ahead = if N < G { at + next + k * share } else { at + PREFETCH_BYTES };
        let ahead = walk.w.as_ptr().wrapping_add(ahead);
        // For several tokens into L2 (Qwen3-0.6B-shaped Q8_0 decoded 37.2 -> 41.0 tok/s at
        // AVX-512, 29.5 -> 30.3 at AVX2 against L1, Sapphire Rapids, before the one-token walk
        // went non-temporal where that is faster: see [`prefetch`]).
        if F::CHUNK == 1 {
            for line in (0..share.min(bytes - k * share)).step_by(64) {
                prefetch(walk.nta, ahead.wrapping_add(line));
            }
        } else if sub == 0 {
            // A block shared by Q8Blocks at its first one, a constant count of lines (a count
            // and offsets computed per Q8Block cost INT4 a fifth of its one-token time in
            // scalar work).
            for line in (0..share).step_by(64) {
                prefetch(walk.nta, ahead.wrapping_add(line));
            }
        }
        packed::<V, F, N>(walk.w[at..].as_ptr(), walk.w[head..].as_ptr(), r0 % G, sub)
    }

    /// Asks for the line at `p` (a prefetch never faults, wherever it points): non-temporally
    /// (into L1, past the other levels) for a single token where
    /// [`crate::cpu::one_token_prefetch_nta`] says so, as the K formats' one-token walk does
    /// (`kquants::tiled::Prefetch`), its weights being read once per call; else into L2, whose
    /// blocks each chunk of tokens reads again. Zen 5, one-token products of a
    /// Qwen3-0.6B-shaped step (`decode_products 2 12 q8_0`, runs alternated with the build
    /// before, probe 49-54 GB/s): Q8_0 45.1 -> 48.2 GB/s (medians of 4); whole decode
    /// (`scripts/bench-ab.sh`, probe below 65 GB/s) Qwen2.5-Coder-0.5B Q4_K_M (Q5_0 / Q8_0 and
    /// K formats) 110.4 -> 117.5 tok/s (8 runs each), SmolLM2 Q4_1 441.6 -> 444.2 (4).
    #[inline(always)]
    unsafe fn prefetch(nta: bool, p: *const u8) {
        if nta {
            _mm_prefetch::<_MM_HINT_NTA>(p as *const i8);
        } else {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
        }
    }

    /// Where Q8Block `b` of the interleaved group of row `r0` lies in a matrix of `nb`
    /// Q8Blocks per row: `(at, head, next)`, the byte offsets of its stored block and of its
    /// scales (INT8: the group's row scales; otherwise the stored block), and the distance to
    /// the next group's same block.
    #[inline(always)]
    fn located<F: Fmt>(nb: usize, r0: usize, b: usize) -> (usize, usize, usize) {
        const G: usize = crate::dot::GROUP_ROWS;
        if F::ROW_SCALE {
            let group = G * (4 + nb * F::BB);
            let head = (r0 / G) * group;
            (head + 4 * G + b * G * F::BB, head, group)
        } else {
            let nsb = nb / F::CHUNK;
            let at = ((r0 / G) * nsb + b / F::CHUNK) * G * F::BB;
            (at, at, nsb * G * F::BB)
        }
    }

    /// What the tokens share of a block: the weights as the products take them, and Q8_0's
    /// signs.
    #[inline(always)]
    unsafe fn shared<V: Width<N>, F: Fmt, const N: usize, const KIND: u8>(
        blk: &Block<V::I, V::P>,
    ) -> ([V::I; 8], [V::Sign; 8]) {
        let mut wa = blk.w;
        let mut sign = [V::no_sign(); 8];
        for g in 0..8 {
            if KIND == VNNI && F::BYTES {
                // `vpdpbusd` needs unsigned weights: Q8_0's signed bytes get 128 added (an
                // xor), which its offset term takes back.
                wa[g] = V::xor(blk.w[g], V::set1_i8(-128));
            } else if KIND == BYTES || KIND == BYTES_IN_PLACE {
                (wa[g], sign[g]) = V::signs(blk.w[g]);
            }
        }
        (wa, sign)
    }

    /// One token's exact i32 sums of a block of `N` rows: `wa` the weights as [`walk`] prepared
    /// them, `y` the token's 32 activation bytes, `off` its offset term (0 if none).
    #[inline(always)]
    // Group indices pick both the weights and the activation bytes.
    #[allow(clippy::needless_range_loop)]
    unsafe fn sum<V: Width<N>, F: Fmt, const N: usize, const KIND: u8>(
        wa: &[V::I; 8],
        sign: &[V::Sign; 8],
        y: *const i8,
        off: i32,
    ) -> V::I {
        match KIND {
            VNNI => {
                // Two chains of four, so a token waits for half as many `vpdpbusd` latencies.
                let mut s0 = V::set1_i32(off);
                let mut s1 = V::zero();
                for g in 0..4 {
                    s0 = V::dpbusd(s0, wa[g], V::bcast(y, g));
                    s1 = V::dpbusd(s1, wa[g + 4], V::bcast(y, g + 4));
                }
                V::add_i32(s0, s1)
            }
            BYTES_IN_PLACE => {
                // Each row's quants in place meet the activations broadcast per 128-bit lane;
                // the exact row sums come out of `reduce`, so the same as the transposed sums.
                let a = [V::bcast128(y), V::bcast128(y.add(16))];
                let mut v = [V::zero(); 4];
                for (i, v) in v.iter_mut().enumerate() {
                    let p0 = V::widen(V::maddubs(wa[2 * i], V::signed(a[0], sign[2 * i])));
                    let p1 = V::widen(V::maddubs(wa[2 * i + 1], V::signed(a[1], sign[2 * i + 1])));
                    *v = V::add_i32(p0, p1);
                }
                V::reduce(v)
            }
            BYTES => {
                // Each pair sum widened at once (|w| ≤ 128 leaves no room to add them in i16).
                let mut s = V::zero();
                for g in 0..8 {
                    let a = V::signed(V::bcast(y, g), sign[g]);
                    s = V::add_i32(s, V::widen(V::maddubs(wa[g], a)));
                }
                s
            }
            BYTES_FEW => {
                let mut s = V::zero();
                for (g, w) in wa.iter().enumerate() {
                    let (abs, sign) = V::signs(*w);
                    let a = V::signed(V::bcast(y, g), sign);
                    s = V::add_i32(s, V::widen(V::maddubs(abs, a)));
                }
                s
            }
            _ => {
                // Unsigned quants times signed activations (Q4_0 / Q5_0: their offset is an
                // `m·s_a` term, [`has_m`], not an offset term).
                let mut s = V::zero();
                for h in (0..8).step_by(F::I16_GROUPS) {
                    let mut p = V::maddubs(wa[h], V::bcast(y, h));
                    for g in h + 1..h + F::I16_GROUPS {
                        p = V::add_i16(p, V::maddubs(wa[g], V::bcast(y, g)));
                    }
                    s = V::add_i32(s, V::widen(p));
                }
                s
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // AVX2: 8 rows per vector
    // ---------------------------------------------------------------------------------------

    /// AVX2; `VNNI` takes the byte products with AVX-VNNI's 256-bit `vpdpbusd`.
    struct Ymm<const VNNI: bool>;

    /// Dwords 0 and 1 of each of 8 rows' blocks: the first two vectors of a transpose of the
    /// blocks' first 16 bytes. Measured cheaper than two 8-lane gathers (the AVX-512 kernels
    /// gather: there a 16-row transpose costs more).
    #[inline(always)]
    unsafe fn header8(base: *const u8, offs: &[usize; 8]) -> [__m256i; 2] {
        let z = pairs8(base, offs, 0);
        let a = _mm256_unpacklo_epi32(z[0], z[1]);
        let c = _mm256_unpacklo_epi32(z[2], z[3]);
        [_mm256_unpacklo_epi64(a, c), _mm256_unpackhi_epi64(a, c)]
    }

    /// `z[i]` = the 16 bytes at `at` of rows `i` and `i + 4` (128-bit lanes).
    #[inline(always)]
    unsafe fn pairs8(base: *const u8, offs: &[usize; 8], at: usize) -> [__m256i; 4] {
        let mut z = [_mm256_setzero_si256(); 4];
        for (i, z) in z.iter_mut().enumerate() {
            let lo = _mm_loadu_si128(base.add(offs[i] + at) as *const __m128i);
            let hi = _mm_loadu_si128(base.add(offs[i + 4] + at) as *const __m128i);
            *z = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi);
        }
        z
    }

    /// `z[i]` = the 16 bytes at `at` of rows `i`, `i + 4`, `i + 8` and `i + 12` (128-bit lanes).
    #[inline(always)]
    unsafe fn quads16(base: *const u8, offs: &[usize; 16], at: usize) -> [__m512i; 4] {
        let mut z = [_mm512_setzero_si512(); 4];
        for (i, z) in z.iter_mut().enumerate() {
            let ld = |r: usize| base.add(offs[r] + at) as *const __m128i;
            let v = _mm512_inserti32x4::<1>(_mm512_castsi128_si512(_mm_loadu_si128(ld(i))), _mm_loadu_si128(ld(i + 4)));
            *z = _mm512_inserti32x4::<3>(
                _mm512_inserti32x4::<2>(v, _mm_loadu_si128(ld(i + 8))),
                _mm_loadu_si128(ld(i + 12)),
            );
        }
        z
    }

    /// The low 16 bits of each dword of `v` (each < 2^16), in order.
    #[inline(always)]
    unsafe fn low_halves8(v: __m256i) -> __m128i {
        // Per 128-bit lane [v0..v3, v0..v3] as u16, then the two lanes' first halves.
        let p = _mm256_packus_epi32(v, v);
        _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(p))
    }

    impl<const VNNI: bool> Width<8> for Ymm<VNNI> {
        type I = __m256i;
        type P = __m256;
        /// `vpsignb` takes the weights' signs from the weights themselves.
        type Sign = __m256i;
        const VNNI: bool = VNNI;
        #[inline(always)]
        unsafe fn zero() -> __m256i {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn set1_i8(x: i8) -> __m256i {
            _mm256_set1_epi8(x)
        }
        #[inline(always)]
        unsafe fn set1_i32(x: i32) -> __m256i {
            _mm256_set1_epi32(x)
        }
        #[inline(always)]
        unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
            _mm256_and_si256(a, b)
        }
        #[inline(always)]
        unsafe fn xor(a: __m256i, b: __m256i) -> __m256i {
            _mm256_xor_si256(a, b)
        }
        #[inline(always)]
        unsafe fn srl4(a: __m256i) -> __m256i {
            _mm256_srli_epi32::<4>(a)
        }
        #[inline(always)]
        unsafe fn add_i16(a: __m256i, b: __m256i) -> __m256i {
            _mm256_add_epi16(a, b)
        }
        #[inline(always)]
        unsafe fn add_i32(a: __m256i, b: __m256i) -> __m256i {
            _mm256_add_epi32(a, b)
        }
        #[inline(always)]
        unsafe fn maddubs(a: __m256i, b: __m256i) -> __m256i {
            _mm256_maddubs_epi16(a, b)
        }
        #[inline(always)]
        unsafe fn widen(a: __m256i) -> __m256i {
            _mm256_madd_epi16(a, _mm256_set1_epi16(1))
        }
        #[inline(always)]
        unsafe fn dpbusd(s: __m256i, a: __m256i, b: __m256i) -> __m256i {
            // Only reached with `VNNI` (see `tile`), whose entry point enables AVX-VNNI.
            _mm256_dpbusd_avx_epi32(s, a, b)
        }
        #[inline(always)]
        unsafe fn bcast(p: *const i8, g: usize) -> __m256i {
            _mm256_set1_epi32((p.add(4 * g) as *const i32).read_unaligned())
        }
        #[inline(always)]
        unsafe fn bcast128(p: *const i8) -> __m256i {
            _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn lookup(t: __m256i, idx: __m256i) -> __m256i {
            _mm256_shuffle_epi8(t, idx)
        }
        #[inline(always)]
        unsafe fn no_sign() -> __m256i {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn signs(w: __m256i) -> (__m256i, __m256i) {
            (_mm256_abs_epi8(w), w)
        }
        #[inline(always)]
        unsafe fn signed(a: __m256i, w: __m256i) -> __m256i {
            _mm256_sign_epi8(a, w)
        }
        #[inline(always)]
        unsafe fn reduce(v: [__m256i; 4]) -> __m256i {
            // Lane (L, k) of v[i]: row i + 4L's groups k and k + 4; three `vphaddd` leave lane r
            // with row r.
            _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]))
        }
        #[inline(always)]
        unsafe fn fifth(wg: __m256i, qh: __m256i, g: usize) -> __m256i {
            // Each byte of a dword picks the byte of qh holding its bit, tests it, and sets
            // 0x10 where it is set.
            let [i0, i1, i2, i3] = dword_byte_index(g / 2);
            let sel = _mm256_setr_epi32(i0, i1, i2, i3, i0, i1, i2, i3);
            let bit = _mm256_set1_epi32(nibble_bits(g));
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, sel), bit), bit);
            _mm256_or_si256(wg, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
        }
        #[inline(always)]
        unsafe fn fifth_spread(wg: __m256i, qh: __m256i, g: usize) -> __m256i {
            // Bit g of each byte to bit 4: a dword shift moves bits across bytes only below bit
            // 4 (left, by at most 4) or above it (right, by at most 3), which the mask drops.
            let at4 = match g {
                0 => _mm256_slli_epi32::<4>(qh),
                1 => _mm256_slli_epi32::<3>(qh),
                2 => _mm256_slli_epi32::<2>(qh),
                3 => _mm256_slli_epi32::<1>(qh),
                4 => qh,
                5 => _mm256_srli_epi32::<1>(qh),
                6 => _mm256_srli_epi32::<2>(qh),
                _ => _mm256_srli_epi32::<3>(qh),
            };
            _mm256_or_si256(wg, _mm256_and_si256(at4, _mm256_set1_epi8(0x10)))
        }
        #[inline(always)]
        unsafe fn zero_p() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn set1_p(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn cvt(v: __m256i) -> __m256 {
            _mm256_cvtepi32_ps(v)
        }
        #[inline(always)]
        unsafe fn loadp(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn storep(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load(p: *const u8) -> __m256i {
            _mm256_loadu_si256(p as *const __m256i)
        }
        #[inline(always)]
        unsafe fn f16_load(p: *const u8) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn f16_lo(v: __m256i) -> __m256 {
            _mm256_cvtph_ps(low_halves8(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF))))
        }
        #[inline(always)]
        unsafe fn f16_hi(v: __m256i) -> __m256 {
            _mm256_cvtph_ps(low_halves8(_mm256_srli_epi32::<16>(v)))
        }
        #[inline(always)]
        unsafe fn header<F: Fmt>(base: *const u8, offs: &[usize; 8], _: &[i32; 8]) -> (__m256i, __m256i) {
            let [h0, h1] = header8(base, offs);
            // Q5_1's fifth bits are dword 1; Q5_0's straddle dwords 0 and 1 (bytes 2..6).
            let qh = match F::QH {
                0 => _mm256_setzero_si256(),
                2 => _mm256_or_si256(_mm256_srli_epi32::<16>(h0), _mm256_slli_epi32::<16>(h1)),
                _ => h1,
            };
            (h0, qh)
        }
        #[inline(always)]
        unsafe fn transpose(base: *const u8, offs: &[usize; 8], at: usize) -> [__m256i; 4] {
            // A 4×4 dword transpose per 128-bit lane.
            let z = pairs8(base, offs, at);
            let a = _mm256_unpacklo_epi32(z[0], z[1]);
            let b = _mm256_unpackhi_epi32(z[0], z[1]);
            let c = _mm256_unpacklo_epi32(z[2], z[3]);
            let d = _mm256_unpackhi_epi32(z[2], z[3]);
            [
                _mm256_unpacklo_epi64(a, c),
                _mm256_unpackhi_epi64(a, c),
                _mm256_unpacklo_epi64(b, d),
                _mm256_unpackhi_epi64(b, d),
            ]
        }
        #[inline(always)]
        unsafe fn rows(base: *const u8, offs: &[usize; 8], at: usize) -> [__m256i; 8] {
            let (z0, z1) = (pairs8(base, offs, at), pairs8(base, offs, at + 16));
            [z0[0], z1[0], z0[1], z1[1], z0[2], z1[2], z0[3], z1[3]]
        }
    }

    // ---------------------------------------------------------------------------------------
    // AVX-512: 16 rows per vector
    // ---------------------------------------------------------------------------------------

    /// AVX-512 F/BW; `VNNI` takes the byte products with `vpdpbusd`.
    struct Zmm<const VNNI: bool>;

    impl<const VNNI: bool> Width<16> for Zmm<VNNI> {
        type I = __m512i;
        type P = __m512;
        /// There is no 512-bit `vpsignb`: the sign is a mask for a masked negate.
        type Sign = __mmask64;
        const VNNI: bool = VNNI;
        #[inline(always)]
        unsafe fn zero() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn set1_i8(x: i8) -> __m512i {
            _mm512_set1_epi8(x)
        }
        #[inline(always)]
        unsafe fn set1_i32(x: i32) -> __m512i {
            _mm512_set1_epi32(x)
        }
        #[inline(always)]
        unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
            _mm512_and_si512(a, b)
        }
        #[inline(always)]
        unsafe fn xor(a: __m512i, b: __m512i) -> __m512i {
            _mm512_xor_si512(a, b)
        }
        #[inline(always)]
        unsafe fn srl4(a: __m512i) -> __m512i {
            _mm512_srli_epi32::<4>(a)
        }
        #[inline(always)]
        unsafe fn add_i16(a: __m512i, b: __m512i) -> __m512i {
            _mm512_add_epi16(a, b)
        }
        #[inline(always)]
        unsafe fn add_i32(a: __m512i, b: __m512i) -> __m512i {
            _mm512_add_epi32(a, b)
        }
        #[inline(always)]
        unsafe fn maddubs(a: __m512i, b: __m512i) -> __m512i {
            _mm512_maddubs_epi16(a, b)
        }
        #[inline(always)]
        unsafe fn widen(a: __m512i) -> __m512i {
            _mm512_madd_epi16(a, _mm512_set1_epi16(1))
        }
        #[inline(always)]
        unsafe fn dpbusd(s: __m512i, a: __m512i, b: __m512i) -> __m512i {
            _mm512_dpbusd_epi32(s, a, b)
        }
        #[inline(always)]
        unsafe fn bcast(p: *const i8, g: usize) -> __m512i {
            _mm512_set1_epi32((p.add(4 * g) as *const i32).read_unaligned())
        }
        #[inline(always)]
        unsafe fn bcast128(p: *const i8) -> __m512i {
            _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn lookup(t: __m512i, idx: __m512i) -> __m512i {
            _mm512_shuffle_epi8(t, idx)
        }
        #[inline(always)]
        unsafe fn no_sign() -> __mmask64 {
            0
        }
        #[inline(always)]
        unsafe fn signs(w: __m512i) -> (__m512i, __mmask64) {
            (_mm512_abs_epi8(w), _mm512_movepi8_mask(w))
        }
        #[inline(always)]
        unsafe fn signed(a: __m512i, neg: __mmask64) -> __m512i {
            // Where the weight is 0 its |w| is too, so `a` need not be zeroed there.
            _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a)
        }
        #[inline(always)]
        unsafe fn reduce(v: [__m512i; 4]) -> __m512i {
            // Per 128-bit lane [v0 k0+k2, v1 k0+k2, v0 k1+k3, v1 k1+k3], then the halves.
            let p01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
            let p23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
            _mm512_add_epi32(_mm512_unpacklo_epi64(p01, p23), _mm512_unpackhi_epi64(p01, p23))
        }
        #[inline(always)]
        unsafe fn fifth(wg: __m512i, qh: __m512i, g: usize) -> __m512i {
            // Fifth bits 4g..4g+4 as a byte mask (bit 4r + j: row r's quant 4g + j has it).
            let [i0, i1, i2, i3] = dword_byte_index(g / 2);
            let sel = _mm512_setr_epi32(i0, i1, i2, i3, i0, i1, i2, i3, i0, i1, i2, i3, i0, i1, i2, i3);
            let set = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, sel), _mm512_set1_epi32(nibble_bits(g)));
            _mm512_mask_add_epi8(wg, set, wg, _mm512_set1_epi8(0x10))
        }
        #[inline(always)]
        unsafe fn fifth_spread(wg: __m512i, qh: __m512i, g: usize) -> __m512i {
            let set = _mm512_test_epi8_mask(qh, _mm512_set1_epi8((1u8 << g) as i8));
            _mm512_mask_add_epi8(wg, set, wg, _mm512_set1_epi8(0x10))
        }
        #[inline(always)]
        unsafe fn zero_p() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn set1_p(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn cvt(v: __m512i) -> __m512 {
            _mm512_cvtepi32_ps(v)
        }
        #[inline(always)]
        unsafe fn loadp(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn storep(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load(p: *const u8) -> __m512i {
            _mm512_loadu_si512(p as *const _)
        }
        #[inline(always)]
        unsafe fn f16_load(p: *const u8) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn f16_lo(v: __m512i) -> __m512 {
            _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
        }
        #[inline(always)]
        unsafe fn f16_hi(v: __m512i) -> __m512 {
            _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v)))
        }
        #[inline(always)]
        unsafe fn header<F: Fmt>(base: *const u8, _: &[usize; 16], idx: &[i32; 16]) -> (__m512i, __m512i) {
            let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
            let dm = _mm512_i32gather_epi32::<1>(idx, base as *const i32);
            let qh = if F::QH != 0 {
                _mm512_i32gather_epi32::<1>(idx, base.add(F::QH) as *const i32)
            } else {
                _mm512_setzero_si512()
            };
            (dm, qh)
        }
        #[inline(always)]
        unsafe fn transpose(base: *const u8, offs: &[usize; 16], at: usize) -> [__m512i; 4] {
            // A 4×4 dword transpose per 128-bit lane.
            let z = quads16(base, offs, at);
            let a = _mm512_unpacklo_epi32(z[0], z[1]);
            let b = _mm512_unpackhi_epi32(z[0], z[1]);
            let c = _mm512_unpacklo_epi32(z[2], z[3]);
            let d = _mm512_unpackhi_epi32(z[2], z[3]);
            [
                _mm512_unpacklo_epi64(a, c),
                _mm512_unpackhi_epi64(a, c),
                _mm512_unpacklo_epi64(b, d),
                _mm512_unpackhi_epi64(b, d),
            ]
        }
        #[inline(always)]
        unsafe fn rows(base: *const u8, offs: &[usize; 16], at: usize) -> [__m512i; 8] {
            let (z0, z1) = (quads16(base, offs, at), quads16(base, offs, at + 16));
            [z0[0], z1[0], z0[1], z1[1], z0[2], z1[2], z0[3], z1[3]]
        }
    }

    // ---------------------------------------------------------------------------------------
    // Entry points: the tile compiled for each instruction set
    // ---------------------------------------------------------------------------------------

    /// # Safety
    /// The CPU has AVX2 + FMA + F16C; shapes as [`tile`] says.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<F: Fmt>(t: Tile<'_>) {
        tile::<Ymm<false>, F, 8>(t)
    }

    /// # Safety
    /// The CPU has AVX2 + AVX-VNNI + FMA + F16C; shapes as [`tile`] says.
    #[target_feature(enable = "avx2,avxvnni,fma,f16c")]
    unsafe fn tile_avx2_vnni<F: Fmt>(t: Tile<'_>) {
        tile::<Ymm<true>, F, 8>(t)
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + FMA + F16C; shapes as [`tile`] says.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn tile_avx512<F: Fmt>(t: Tile<'_>) {
        tile::<Zmm<false>, F, 16>(t)
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + VNNI + FMA + F16C; shapes as [`tile`] says.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn tile_avx512_vnni<F: Fmt>(t: Tile<'_>) {
        tile::<Zmm<true>, F, 16>(t)
    }

    /// The kernels of one instruction set, for each format.
    fn kernels<const AVX512: bool, const VNNI: bool>() -> [Kernel; 8] {
        macro_rules! each {
            ($tile:ident) => {
                [
                    $tile::<Q4_0>,
                    $tile::<Q4_1>,
                    $tile::<Q5_0>,
                    $tile::<Q5_1>,
                    $tile::<Q8_0>,
                    $tile::<Int4>,
                    $tile::<Nf4>,
                    $tile::<Int8>,
                ]
            };
        }
        match (AVX512, VNNI) {
            (false, false) => each!(tile_avx2),
            (false, true) => each!(tile_avx2_vnni),
            (true, false) => each!(tile_avx512),
            (true, true) => each!(tile_avx512_vnni),
        }
    }

    /// # Safety
    /// The CPU has AVX2 + FMA + F16C; the shapes are as [`super::gemm`] asserts.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx2(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        packed: bool,
        act: &[Q8Block],
        sums: &[i32],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        pick(dtype, kernels::<false, false>())(Tile { w, nrows, packed, act, sums, ntok, out, ldo })
    }

    /// # Safety
    /// The CPU has AVX2 + AVX-VNNI + FMA + F16C; the shapes are as [`super::gemm`] asserts.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx2_vnni(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        packed: bool,
        act: &[Q8Block],
        sums: &[i32],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        pick(dtype, kernels::<false, true>())(Tile { w, nrows, packed, act, sums, ntok, out, ldo })
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + FMA + F16C; the shapes are as [`super::gemm`] asserts.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx512(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        packed: bool,
        act: &[Q8Block],
        sums: &[i32],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        pick(dtype, kernels::<true, false>())(Tile { w, nrows, packed, act, sums, ntok, out, ldo })
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + VNNI + FMA + F16C; the shapes are as [`super::gemm`]
    /// asserts.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx512_vnni(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        packed: bool,
        act: &[Q8Block],
        sums: &[i32],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        pick(dtype, kernels::<true, true>())(Tile { w, nrows, packed, act, sums, ntok, out, ldo })
    }

    /// A tile kernel set as the tests and the benchmark call it.
    #[cfg(test)]
    pub(super) type Gemm = unsafe fn(DType, &[u8], usize, bool, &[Q8Block], &[i32], usize, &mut [f32], usize);

    /// Every x86 tile kernel set the CPU runs, by name.
    #[cfg(test)]
    pub(super) fn variants() -> Vec<(&'static str, Gemm)> {
        use crate::cpu::{avx_vnni_detected, detected, has_avx512_vnni, SimdLevel};
        let mut v: Vec<(&'static str, Gemm)> = Vec::new();
        if detected() >= SimdLevel::Avx2 {
            v.push(("avx2", gemm_avx2));
            if avx_vnni_detected() {
                v.push(("avx2+vnni", gemm_avx2_vnni));
            }
        }
        if detected() >= SimdLevel::Avx512 {
            v.push(("avx512", gemm_avx512));
            if has_avx512_vnni() {
                v.push(("avx512+vnni", gemm_avx512_vnni));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;
    use std::time::Instant;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::act::quantize_q8_vec;
    use crate::quant;

    const FORMATS: [DType; 5] = [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0];

    /// A block decoded independently of the kernels: `(d_w, m_w, q_w)` with `q_w` centred for
    /// the `_0` formats.
    fn decode(dtype: DType, b: &[u8]) -> (f64, f64, [i32; 32]) {
        let f = |at: usize| f16_at(b, at) as f64;
        let mut q = [0i32; 32];
        let (d, m) = match dtype {
            DType::Q4_0 | DType::Q4_1 => {
                let (off, base, m) = if dtype == DType::Q4_0 { (2, 8, 0.0) } else { (4, 0, f(2)) };
                for j in 0..16 {
                    q[j] = (b[off + j] & 15) as i32 - base;
                    q[j + 16] = (b[off + j] >> 4) as i32 - base;
                }
                (f(0), m)
            }
            DType::Q5_0 | DType::Q5_1 => {
                let (hoff, off, base, m) = if dtype == DType::Q5_0 { (2, 6, 16, 0.0) } else { (4, 8, 0, f(2)) };
                let qh = u32::from_le_bytes([b[hoff], b[hoff + 1], b[hoff + 2], b[hoff + 3]]);
                for j in 0..16 {
                    q[j] = ((b[off + j] & 15) as u32 | ((qh >> j) & 1) << 4) as i32 - base;
                    q[j + 16] = ((b[off + j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - base;
                }
                (f(0), m)
            }
            DType::Q8_0 => {
                for (qi, &v) in q.iter_mut().zip(&b[2..34]) {
                    *qi = v as i8 as i32;
                }
                (f(0), 0.0)
            }
            _ => unreachable!(),
        };
        (d, m, q)
    }

    /// `(exact value in f64, Σ_b |d_w·d_a|·Σ|q_w·q_a| + |m_w·s_a|)`: the scale float rounding
    /// errors are relative to (SIMD versions scale partial sums of a block before adding them,
    /// so a block whose partial sums cancel is only as accurate as those partial sums).
    fn exact(dtype: DType, row: &[u8], act: &[Q8Block]) -> (f64, f64) {
        let (mut sum, mut mag) = (0f64, 0f64);
        for (b, a) in row.chunks_exact(dtype.block_bytes()).zip(act) {
            let (d, m, q) = decode(dtype, b);
            let dot: i64 = q.iter().zip(&a.qs).map(|(&w, &x)| w as i64 * x as i64).sum();
            let abs_dot: i64 = q.iter().zip(&a.qs).map(|(&w, &x)| (w as i64 * x as i64).abs()).sum();
            let scale = d * a.d as f64;
            let u = m * a.s as f64;
            sum += scale * dot as f64 + u;
            mag += (scale * abs_dot as f64).abs() + u.abs();
        }
        (sum, mag)
    }

    fn random_row(rng: &mut StdRng, dtype: DType, blocks: usize) -> (Vec<f32>, Vec<u8>) {
        // Offsets and varying ranges per block so `_1` minimums and scales differ.
        let mut w = Vec::with_capacity(blocks * 32);
        for _ in 0..blocks {
            let scale = rng.random_range(0.01f32..2.0);
            let offset = rng.random_range(-1.0f32..1.0);
            w.extend((0..32).map(|_| offset + scale * rng.random_range(-1.0f32..1.0)));
        }
        let mut row = vec![0u8; dtype.row_bytes(blocks * 32).unwrap_or(0)];
        quant::quantize_row(dtype, &w, &mut row);
        (w, row)
    }

    fn random_act(rng: &mut StdRng, blocks: usize) -> Vec<f32> {
        let mut x = Vec::with_capacity(blocks * 32);
        for _ in 0..blocks {
            let scale = rng.random_range(0.1f32..3.0);
            x.extend((0..32).map(|_| scale * rng.random_range(-1.0f32..1.0)));
        }
        x
    }

    #[test]
    fn every_level_matches_scalar_and_scalar_is_exact() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for dtype in FORMATS {
            for blocks in [1, 2, 3, 4, 5, 7, 64] {
                for _ in 0..20 {
                    let (_, row) = random_row(&mut rng, dtype, blocks);
                    let act = quantize_q8_vec(&random_act(&mut rng, blocks));
                    let (want, mag) = exact(dtype, &row, &act);
                    let scalar = dot_scalar(dtype, &row, &act);
                    let tol = 1e-5 * mag + 1e-30;
                    assert!((scalar as f64 - want).abs() <= tol, "{dtype} {blocks} blocks: scalar {scalar} vs {want}");
                    for level in SimdLevel::available() {
                        let got = dot_q8(level, dtype, &row, &act);
                        assert!(
                            (got - scalar).abs() as f64 <= tol,
                            "{dtype} {blocks} blocks {level:?}: {got} vs scalar {scalar}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn scalar_matches_the_f32_reference_up_to_activation_rounding() {
        let mut rng = StdRng::seed_from_u64(42);
        for dtype in FORMATS {
            for blocks in [1, 3, 7, 64] {
                for _ in 0..20 {
                    let (_, row) = random_row(&mut rng, dtype, blocks);
                    let x = random_act(&mut rng, blocks);
                    let act = quantize_q8_vec(&x);
                    let w = quant::dequantize(dtype, &row, blocks * 32);
                    let want = quant::dot_row(dtype, &row, &x);
                    let got = dot_scalar(dtype, &row, &act);
                    // |x_i - d_a·q_a,i| ≤ d_a/2, so the products differ by at most
                    // Σ_b d_a,b/2 · Σ|w_i|; float rounding adds ~1e-6 of the magnitudes.
                    let mut bound = 0f64;
                    for ((wb, xb), a) in w.chunks(32).zip(x.chunks(32)).zip(&act) {
                        let sw: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                        let swx: f64 = wb.iter().zip(xb).map(|(a, b)| (a * b).abs() as f64).sum();
                        bound += a.d as f64 / 2.0 * sw + 1e-5 * swx;
                    }
                    bound += 1e-5 * exact(dtype, &row, &act).1;
                    let err = (got as f64 - want as f64).abs();
                    assert!(err <= bound, "{dtype} {blocks} blocks: {got} vs {want} (bound {bound})");
                }
            }
        }
    }

    /// Raw blocks of `dtype` with scale `d` (and min `m`), every quant byte `fill` (and qh
    /// `qh`).
    fn raw_block(dtype: DType, d: f32, m: f32, fill: u8, qh: u32) -> Vec<u8> {
        let mut b = vec![fill; dtype.block_bytes()];
        b[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        match dtype {
            DType::Q4_1 => b[2..4].copy_from_slice(&half::f16::from_f32(m).to_le_bytes()),
            DType::Q5_0 => b[2..6].copy_from_slice(&qh.to_le_bytes()),
            DType::Q5_1 => {
                b[2..4].copy_from_slice(&half::f16::from_f32(m).to_le_bytes());
                b[4..8].copy_from_slice(&qh.to_le_bytes());
            }
            _ => {}
        }
        b
    }

    #[test]
    fn extreme_blocks_are_exact() {
        let fills: &[u8] = &[0x00, 0xFF, 0x0F, 0xF0, 0x7F, 0x80, 0x81, 0x5A];
        let qhs = [0u32, u32::MAX, 0x5555_5555, 0xF0F0_0F0F];
        let acts: Vec<[i8; 32]> = vec![
            [127; 32],
            [-127; 32],
            std::array::from_fn(|i| if i % 2 == 0 { 127 } else { -127 }),
            std::array::from_fn(|i| (i as i32 * 8 - 127).clamp(-127, 127) as i8),
            [0; 32],
        ];
        for dtype in FORMATS {
            for &fill in fills {
                for &qh in &qhs {
                    // Up to 9 blocks mixing the activation patterns, so every SIMD path
                    // (quads, pairs, single) sees them.
                    for blocks in [1, 2, 3, 4, 9] {
                        let mut row = Vec::new();
                        let mut act = Vec::new();
                        for k in 0..blocks {
                            row.extend(raw_block(dtype, 1.0, if k % 2 == 0 { 0.5 } else { -2.0 }, fill, qh));
                            let qs = acts[k % acts.len()];
                            let sum: i32 = qs.iter().map(|&q| q as i32).sum();
                            act.push(Q8Block { d: 1.0, s: sum as f32, qs });
                        }
                        let (want, _) = exact(dtype, &row, &act);
                        for level in SimdLevel::available() {
                            let got = dot_q8(level, dtype, &row, &act);
                            assert_eq!(got as f64, want, "{dtype} fill {fill:#x} qh {qh:#x} {blocks} {level:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn empty_row_is_zero() {
        for dtype in FORMATS {
            for level in SimdLevel::available() {
                assert_eq!(dot_q8(level, dtype, &[], &[]), 0.0);
            }
        }
    }

    #[test]
    #[should_panic(expected = "does not hold")]
    fn wrong_length_panics() {
        dot_q8(SimdLevel::Scalar, DType::Q4_0, &[0; 17], &[Q8Block::default()]);
    }

    #[test]
    #[should_panic(expected = "not a legacy block format")]
    fn other_formats_panic() {
        dot_q8(SimdLevel::Scalar, DType::Q4_K, &[], &[]);
    }

    // -------------------------------------------------------------------------------------------
    // Tiles
    // -------------------------------------------------------------------------------------------

    /// A tile kernel under test: `(name, gemm)`.
    type GemmFn = Box<dyn Fn(DType, &[u8], usize, &[Q8Block], usize, &mut [f32], usize)>;

    /// Every level through [`gemm`], and every x86 kernel set the CPU runs directly (the AVX-512
    /// level dispatches to only one of its two).
    fn gemm_impls() -> Vec<(String, GemmFn)> {
        let mut v: Vec<(String, GemmFn)> = Vec::new();
        for level in SimdLevel::available() {
            v.push((
                format!("{level:?}"),
                Box::new(move |dtype, w, nrows, act, ntok, out, ldo| {
                    gemm(level, dtype, w, nrows, Layout::Rows, act, &[], ntok, out, ldo)
                }),
            ));
        }
        // The interleaved layout: the rows are rearranged inside the call.
        for level in SimdLevel::available() {
            v.push((
                format!("{level:?} interleaved"),
                Box::new(move |dtype, w, nrows, act, ntok, out, ldo| {
                    let packed = crate::dot::interleave(dtype, nrows, act.len() / ntok * 32, w);
                    gemm(level, dtype, &packed, nrows, Layout::Interleaved, act, &[], ntok, out, ldo)
                }),
            ));
        }
        #[cfg(target_arch = "x86_64")]
        for (name, f) in tile_x86::variants() {
            for packed in [false, true] {
                v.push((
                    format!("{name} packed {packed}"),
                    // SAFETY: `variants` lists only what the CPU runs; the tests pass whole rows
                    // and tokens and an output that holds the tile.
                    Box::new(move |dtype, w, nrows, act, ntok, out, ldo| unsafe {
                        if packed {
                            let p = crate::dot::interleave(dtype, nrows, act.len() / ntok * 32, w);
                            f(dtype, &p, nrows, true, act, &crate::act::neg_sums(act), ntok, out, ldo)
                        } else {
                            f(dtype, w, nrows, false, act, &[], ntok, out, ldo)
                        }
                    }),
                ));
            }
        }
        v
    }

    /// `nrows` random rows of `dtype` (concatenated) and `ntok` tokens' activations.
    fn random_tile(
        rng: &mut StdRng,
        dtype: DType,
        blocks: usize,
        nrows: usize,
        ntok: usize,
    ) -> (Vec<u8>, Vec<Q8Block>) {
        let mut w = Vec::new();
        for _ in 0..nrows {
            w.extend(random_row(rng, dtype, blocks).1);
        }
        let mut act = Vec::new();
        for _ in 0..ntok {
            act.extend(quantize_q8_vec(&random_act(rng, blocks)));
        }
        (w, act)
    }

    /// Rows `r0..r1` times tokens `t0..t1` of the tile, in one call with output stride `ldo`;
    /// returns `[t][r]`.
    #[allow(clippy::too_many_arguments)]
    fn sub_tile(
        f: &GemmFn,
        dtype: DType,
        w: &[u8],
        nrows: usize,
        act: &[Q8Block],
        ntok: usize,
        (r0, r1): (usize, usize),
        (t0, t1): (usize, usize),
        ldo: usize,
    ) -> Vec<Vec<f32>> {
        let (rb, nb) = (w.len() / nrows, act.len() / ntok);
        let (n, m) = (r1 - r0, t1 - t0);
        // NaN sentinels: whatever the kernel does not write must stay NaN.
        let mut out = vec![f32::NAN; (m - 1) * ldo + n + 3];
        f(dtype, &w[r0 * rb..r1 * rb], n, &act[t0 * nb..t1 * nb], m, &mut out, ldo);
        for t in 0..m {
            for i in n..ldo.min(out.len() - t * ldo) {
                assert!(out[t * ldo + i].is_nan(), "{dtype}: wrote past row {n} of token {t}");
            }
        }
        (0..m).map(|t| out[t * ldo..t * ldo + n].to_vec()).collect()
    }

    /// Asserts `got` (rows `r0..` times tokens `t0..` of a tile, `[t][r]`) has the bits of
    /// those outputs in `full`.
    fn assert_bits(got: &[Vec<f32>], full: &[Vec<f32>], (r0, t0): (usize, usize), what: &str) {
        for (t, row) in got.iter().enumerate() {
            for (r, v) in row.iter().enumerate() {
                let want = full[t0 + t][r0 + r];
                assert_eq!(v.to_bits(), want.to_bits(), "{what}: ({}, {}): {v} vs {want}", r0 + r, t0 + t);
            }
        }
    }

    #[test]
    fn gemm_is_bitwise_the_same_for_every_split_and_level() {
        let mut rng = StdRng::seed_from_u64(0x711e);
        // A 13 x 11 tile at awkward widths, and one spanning row groups and token chunks.
        for (nr, nt, blocks) in [(13, 11, 1), (13, 11, 3), (13, 11, 29), (37, 70, 2)] {
            for dtype in FORMATS {
                let (w, act) = random_tile(&mut rng, dtype, blocks, nr, nt);
                // The scalar level is the reference: every level and kernel set gives its bits.
                let want = sub_tile(&gemm_impls()[0].1, dtype, &w, nr, &act, nt, (0, nr), (0, nt), nr);
                for (name, f) in gemm_impls() {
                    let what = format!("{dtype} {nr} x {nt} x {blocks} blocks {name}");
                    let full = sub_tile(&f, dtype, &w, nr, &act, nt, (0, nr), (0, nt), nr + 2);
                    assert_bits(&full, &want, (0, 0), &format!("{what} vs scalar"));
                    // One pair at a time, then sub-tiles at odd offsets.
                    let mut splits: Vec<_> =
                        (0..nr).flat_map(|r| (0..nt).map(move |t| ((r, r + 1), (t, t + 1)))).collect();
                    splits.extend([
                        ((0, 5), (0, 3)),
                        ((5, nr), (0, 3)),
                        ((0, nr), (3, 4)),
                        ((0, 1), (4, nt)),
                        ((1, nr), (4, nt)),
                        ((4, 9), (6, 9)),
                        ((7, nr), (2, nt)),
                        ((nr - 1, nr), (0, nt)),
                    ]);
                    for ((r0, r1), (t0, t1)) in splits {
                        let got = sub_tile(&f, dtype, &w, nr, &act, nt, (r0, r1), (t0, t1), r1 - r0 + 1);
                        assert_bits(&got, &full, (r0, t0), &format!("{what}, rows {r0}..{r1} x tokens {t0}..{t1}"));
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_matches_the_exact_products() {
        let mut rng = StdRng::seed_from_u64(0x9e11);
        for dtype in FORMATS {
            for (blocks, nrows, ntok) in [(1, 1, 1), (1, 17, 3), (3, 9, 5), (29, 16, 2), (29, 21, 7), (2, 3, 70)] {
                let (w, act) = random_tile(&mut rng, dtype, blocks, nrows, ntok);
                let rb = w.len() / nrows;
                for (name, f) in gemm_impls() {
                    let mut out = vec![0f32; nrows * ntok];
                    f(dtype, &w, nrows, &act, ntok, &mut out, nrows);
                    for t in 0..ntok {
                        for r in 0..nrows {
                            let (want, mag) =
                                exact(dtype, &w[r * rb..(r + 1) * rb], &act[t * blocks..(t + 1) * blocks]);
                            let got = out[t * nrows + r];
                            assert!(
                                (got as f64 - want).abs() <= 1e-5 * mag + 1e-30,
                                "{dtype} {blocks} blocks {nrows}x{ntok} {name}: ({r}, {t}) {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_extreme_blocks_are_exact() {
        // Rows of saturated / alternating quants and fifth bits, tokens of ±127 and friends,
        // all scales 1 so every sum is an exactly representable integer (or half-integer).
        let fills: &[u8] = &[0x00, 0xFF, 0x0F, 0xF0, 0x7F, 0x80, 0x81, 0x5A];
        let qhs = [0u32, u32::MAX, 0x5555_5555, 0xF0F0_0F0F];
        let patterns: Vec<[i8; 32]> = vec![
            [127; 32],
            [-127; 32],
            std::array::from_fn(|i| if i % 2 == 0 { 127 } else { -127 }),
            std::array::from_fn(|i| (i as i32 * 8 - 127).clamp(-127, 127) as i8),
            [0; 32],
        ];
        let blocks = 5;
        for dtype in FORMATS {
            let mut w = Vec::new();
            let mut nrows = 0;
            for (i, &fill) in fills.iter().enumerate() {
                for (j, &qh) in qhs.iter().enumerate() {
                    for k in 0..blocks {
                        let m = if (i + j + k) % 2 == 0 { 0.5 } else { -2.0 };
                        w.extend(raw_block(
                            dtype,
                            1.0,
                            m,
                            if k == 3 { fills[(i + 1) % fills.len()] } else { fill },
                            qh,
                        ));
                    }
                    nrows += 1;
                }
            }
            let mut act = Vec::new();
            let ntok = patterns.len();
            for p in 0..ntok {
                for k in 0..blocks {
                    let qs = patterns[(p + k) % patterns.len()];
                    let sum: i32 = qs.iter().map(|&q| q as i32).sum();
                    act.push(Q8Block { d: 1.0, s: sum as f32, qs });
                }
            }
            let rb = w.len() / nrows;
            for (name, f) in gemm_impls() {
                let mut out = vec![0f32; nrows * ntok];
                f(dtype, &w, nrows, &act, ntok, &mut out, nrows);
                for t in 0..ntok {
                    for r in 0..nrows {
                        let (want, _) = exact(dtype, &w[r * rb..(r + 1) * rb], &act[t * blocks..(t + 1) * blocks]);
                        assert_eq!(out[t * nrows + r] as f64, want, "{dtype} {name}: row {r} token {t}");
                    }
                }
            }
        }
    }

    /// INT8, INT4 and NF4 through the tiles: every level and kernel set (interleaved; rows through
    /// [`gemm`], which rearranges them) gives the scalar twin's bits for every split, and the
    /// products are those of the formats' own reference ([`crate::dot::nongguf::dot_scalar`])
    /// up to float rounding.
    #[test]
    fn int8_int4_and_nf4_tiles_are_bitwise_and_close() {
        let mut rng = StdRng::seed_from_u64(0x4b17);
        for dtype in [DType::INT8, DType::INT4, DType::NF4] {
            for (nr, nt, blocks) in [(13, 11, 4), (21, 5, 12), (37, 70, 8), (16, 1, 36), (19, 2, 4)] {
                let cols = 32 * blocks;
                let mut w = Vec::new();
                for _ in 0..nr {
                    let x: Vec<f32> = random_act(&mut rng, blocks);
                    let mut row = vec![0u8; dtype.row_bytes(cols).unwrap()];
                    quant::quantize_row(dtype, &x, &mut row);
                    w.extend(row);
                }
                let act: Vec<Q8Block> = (0..nt).flat_map(|_| quantize_q8_vec(&random_act(&mut rng, blocks))).collect();
                let rb = w.len() / nr;
                let want = sub_tile(&gemm_impls()[0].1, dtype, &w, nr, &act, nt, (0, nr), (0, nt), nr);
                for t in 0..nt {
                    for r in 0..nr {
                        let (row, a) = (&w[r * rb..(r + 1) * rb], &act[t * blocks..(t + 1) * blocks]);
                        let reference = crate::dot::nongguf::dot_scalar(dtype, row, a);
                        // What the rounding is relative to: INT4's offset term is up to 8·d·s_a.
                        let mut wf = vec![0f32; cols];
                        quant::dequantize_row(dtype, row, &mut wf);
                        let wmax = wf.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let xsum: f32 =
                            a.iter().map(|b| b.d * b.qs.iter().map(|&q| (q as f32).abs()).sum::<f32>()).sum();
                        let mag = 16.0 * wmax * xsum;
                        let got = want[t][r];
                        assert!((got - reference).abs() <= 1e-5 * mag, "{dtype} ({r}, {t}): {got} vs {reference}");
                    }
                }
                for (name, f) in gemm_impls() {
                    if name.ends_with("packed false") {
                        // The raw kernels read these formats only interleaved.
                        continue;
                    }
                    let what = format!("{dtype} {nr} x {nt} x {blocks} blocks {name}");
                    let full = sub_tile(&f, dtype, &w, nr, &act, nt, (0, nr), (0, nt), nr + 2);
                    assert_bits(&full, &want, (0, 0), &format!("{what} vs scalar"));
                    for ((r0, r1), (t0, t1)) in
                        [((0, 1), (0, 1)), ((3, nr), (0, nt)), ((0, nr), (nt - 1, nt)), ((5, 9), (0, 1))]
                    {
                        let got = sub_tile(&f, dtype, &w, nr, &act, nt, (r0, r1), (t0, t1), r1 - r0 + 1);
                        assert_bits(&got, &full, (r0, t0), &format!("{what}, rows {r0}..{r1} x tokens {t0}..{t1}"));
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_of_empty_rows_is_zero() {
        for dtype in FORMATS {
            for (name, f) in gemm_impls() {
                let mut out = vec![1f32; 6];
                f(dtype, &[], 3, &[], 2, &mut out, 3);
                assert_eq!(out, [0.0; 6], "{dtype} {name}");
            }
        }
    }

    /// `cargo test --release -p pio-kernels dot::legacy -- --ignored --nocapture`
    ///
    /// ns per (row, token) pair of a 64-row matrix at the Qwen2.5-0.5B widths, called in
    /// 16-row tiles as `matmul` does, for 1 token (decode) and 64 (a prefill tile), for each of
    /// [`gemm`]'s kernels. (SIMD row dots, which the tiles replaced, measured slower at both
    /// token counts: e.g. Q8_0 896 columns 35 vs 31 ns at 1 token, AVX2.) The kernels
    /// take turns, ~3 ms each, for 25 rounds, and each keeps its fastest (other processes
    /// sharing the cores only ever slow a round down, and the turns spread that evenly).
    #[test]
    #[ignore]
    fn bench_gemm_ns_per_pair() {
        const ROWS: usize = 64;
        const TILE: usize = 16;
        const ROUNDS: usize = 25;
        let mut rng = StdRng::seed_from_u64(3);
        // (name, kernel, whether it reads the interleaved layout)
        let mut kernels: Vec<(String, GemmFn, bool)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        for (name, f) in tile_x86::variants() {
            for packed in [false, true] {
                kernels.push((
                    format!("{name}{}", if packed { "/il" } else { "" }),
                    // SAFETY: `variants` lists only what the CPU runs; shapes are whole tiles,
                    // in the layout `packed` says.
                    Box::new(move |dtype, w, nrows, act, ntok, out, ldo| unsafe {
                        f(dtype, w, nrows, packed, act, &[], ntok, out, ldo)
                    }),
                    packed,
                ));
            }
        }
        let only = std::env::var("PIO_BENCH_FORMATS").unwrap_or_default();
        for cols in [896, 4864] {
            let blocks = cols / 32;
            for dtype in
                [DType::Q5_0, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_1, DType::INT4, DType::NF4, DType::INT8]
            {
                if !only.is_empty() && !only.split(',').any(|f| f.eq_ignore_ascii_case(dtype.name())) {
                    continue;
                }
                let tokens = crate::dot::bench_tokens(&[1, 64]);
                // The formats quantized at load have tiles for the interleaved layout only.
                let rows_too = !matches!(dtype, DType::INT4 | DType::NF4 | DType::INT8);
                let kernels: Vec<_> = kernels.iter().filter(|(_, _, packed)| *packed || rows_too).collect();
                for &ntok in &tokens {
                    let (w, act) = random_tile(&mut rng, dtype, blocks, ROWS, ntok);
                    let rb = w.len() / ROWS;
                    let tiles: Vec<Vec<u8>> = (0..ROWS)
                        .step_by(TILE)
                        .map(|r0| crate::dot::interleave(dtype, TILE, cols, &w[r0 * rb..(r0 + TILE) * rb]))
                        .collect();
                    let mut out = vec![0f32; ROWS * ntok];
                    let mut run = |f: &GemmFn, packed: bool| {
                        for (i, r0) in (0..ROWS).step_by(TILE).enumerate() {
                            let w = if packed { &tiles[i][..] } else { &w[r0 * rb..(r0 + TILE) * rb] };
                            f(dtype, w, TILE, &act, ntok, &mut out[r0..], ROWS);
                        }
                        black_box(&mut out);
                    };
                    let iters: Vec<u32> = kernels
                        .iter()
                        .map(|(_, f, packed)| {
                            let t = Instant::now();
                            run(f, *packed);
                            (0.003 / t.elapsed().as_secs_f64().max(1e-7)).clamp(1.0, 100_000.0) as u32
                        })
                        .collect();
                    let mut best = vec![f64::MAX; kernels.len()];
                    for _ in 0..ROUNDS {
                        for ((_, f, packed), (&n, best)) in kernels.iter().zip(iters.iter().zip(&mut best)) {
                            let t = Instant::now();
                            for _ in 0..n {
                                run(f, *packed);
                            }
                            *best = best.min(t.elapsed().as_nanos() as f64 / n as f64 / (ROWS * ntok) as f64);
                        }
                    }
                    let mut line = format!("{dtype} {cols} cols, {ntok:2} tok, ns/pair:");
                    for ((name, _, _), best) in kernels.iter().zip(&best) {
                        line += &format!("  {name} {best:.2}");
                    }
                    println!("{line}");
                }
            }
        }
    }
}
