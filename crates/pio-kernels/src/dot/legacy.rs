//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 rows (32-weight blocks) dotted with [`Q8Block`] activations.
//!
//! A weight block decodes to `w[i] = d_w * q_w[i]` (`+ m_w` for the `_1` formats) and an
//! activation block to `x[i] ≈ d_a * q_a[i]`, so one block contributes
//!
//! - `d_w·d_a · Σ q_w[i]·q_a[i]` for Q4_0 / Q5_0 / Q8_0, with `q_w` centred (Q4_0: nibble − 8,
//!   Q5_0: 5-bit value − 16, Q8_0: the signed byte), and
//! - `d_w·d_a · Σ q_w[i]·q_a[i] + m_w·s_a` for Q4_1 / Q5_1, with `q_w` unsigned and
//!   `s_a = d_a·Σ q_a` precomputed in the activation block.
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
/// `(d_w·d_a)·sum (+ m_w·s_a)` added in block order.
pub fn dot_scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    scalar_sum(dtype, row, act, false)
}

/// One (row, token) product exactly as every tile kernel ([`gemm`]) computes it, at every SIMD
/// level: per block the exact i32 sum of quant products, then in block order
/// `acc = fma(d_w·d_a, sum, acc)` and, for Q4_1 / Q5_1, `acc = fma(m_w, s_a, acc)` (f32, one
/// rounding per step).
pub fn tile_dot_scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    scalar_sum(dtype, row, act, true)
}

/// The per-block integer sums of every format, folded the [`dot_scalar`] way or (`fused`) the
/// [`tile_dot_scalar`] way.
fn scalar_sum(dtype: DType, row: &[u8], act: &[Q8Block], fused: bool) -> f32 {
    check(dtype, row, act);
    match dtype {
        DType::Q4_0 => scalar_blocks::<18>(row, act, Fold::new(fused, false), |b, y| {
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[2 + j];
                sum += ((q & 0x0F) as i32 - 8) * y[j] as i32 + ((q >> 4) as i32 - 8) * y[j + 16] as i32;
            }
            (f16_at(b, 0), 0.0, sum)
        }),
        DType::Q4_1 => scalar_blocks::<20>(row, act, Fold::new(fused, true), |b, y| {
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[4 + j];
                sum += (q & 0x0F) as i32 * y[j] as i32 + (q >> 4) as i32 * y[j + 16] as i32;
            }
            (f16_at(b, 0), f16_at(b, 2), sum)
        }),
        DType::Q5_0 => scalar_blocks::<22>(row, act, Fold::new(fused, false), |b, y| {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[6 + j];
                let lo = ((q & 0x0F) as u32 | ((qh >> j) & 1) << 4) as i32 - 16;
                let hi = ((q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
                sum += lo * y[j] as i32 + hi * y[j + 16] as i32;
            }
            (f16_at(b, 0), 0.0, sum)
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
/// block in block order, one more for the `_1` minimum) are IEEE operations on one vector lane
/// per (row, token), and a lane's operations never involve another lane. So an output is the
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
/// and for VNNI Q8_0's bytes + 128), and the offset `o` they carry (8, 16, 128) comes back
/// exactly through `Σ (q − o)·a = Σ q·a − o·Σ a`: `−o·Σ a` is computed once per activation
/// block and call, and starts that block's integer sum. Q4_1 / Q5_1 have no offset. Without
/// VNNI, Q8_0's full-range bytes would overflow the i16 pair sums that way; its weight sign
/// moves onto the activation instead (`|w|·(sign(w)·a)`), and for one or two tokens it skips
/// the transpose (multiplying rows in place and reducing them with a few shuffles is cheaper
/// when a block serves a single token; the sums, being exact, are the same).
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
    ntok: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if nrows == 0 || ntok == 0 {
        return;
    }
    let nb = act.len() / ntok;
    let packed = layout == Layout::Interleaved;
    if packed {
        assert!(
            matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0),
            "{dtype} is not a legacy block format"
        );
        crate::dot::check_interleaved(dtype, w.len(), nrows, nb);
    } else {
        check(dtype, &w[..w.len() / nrows], &act[..nb]);
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level` comes from `cpu::level()`, which only reports what the CPU has
        // (AVX2 + FMA + F16C); the checks above and `dot::gemm_q8` asserted the shapes and the
        // layout's size.
        SimdLevel::Avx2 => unsafe { tile_x86::gemm_avx2(dtype, w, nrows, packed, act, ntok, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (AVX-512 F/BW/VL/DQ + FMA + F16C); the VNNI kernels only run when
        // `has_avx512_vnni()` detected it.
        SimdLevel::Avx512 => unsafe {
            if crate::cpu::has_avx512_vnni() {
                tile_x86::gemm_avx512_vnni(dtype, w, nrows, packed, act, ntok, out, ldo)
            } else {
                tile_x86::gemm_avx512(dtype, w, nrows, packed, act, ntok, out, ldo)
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
        /// log2 of the offset `o` the stored (unsigned) quants carry: Q4_0: 8, Q5_0: 16, and
        /// Q8_0 when the VNNI kernel adds 128 to make its bytes unsigned; 0 for none.
        const OFFSET_LOG2: u32;
        /// An f16 minimum `m` follows `d` (Q4_1, Q5_1).
        const MIN: bool;
        /// Whole signed bytes (Q8_0).
        const BYTES: bool;
        /// How many 4-byte groups' `vpmaddubsw` outputs (i16 sums of two products) add up in
        /// i16 without overflow: 16 products of 4-bit quants (≤ 15·128 each) or 8 of 5-bit ones
        /// (≤ 31·128). Q8_0 does not use it.
        const I16_GROUPS: usize;
    }

    pub(super) struct Q4_0;
    pub(super) struct Q4_1;
    pub(super) struct Q5_0;
    pub(super) struct Q5_1;
    pub(super) struct Q8_0;

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

    /// A kernel of one format as the dispatchers below call it.
    type Kernel = unsafe fn(Tile<'_>);

    /// The kernel of `dtype` among one ISA's five.
    fn pick(dtype: DType, k: [Kernel; 5]) -> Kernel {
        match dtype {
            DType::Q4_0 => k[0],
            DType::Q4_1 => k[1],
            DType::Q5_0 => k[2],
            DType::Q5_1 => k[3],
            DType::Q8_0 => k[4],
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

    /// `−o·Σ q` for every activation block, `o = 1 << log2`: the offset's share of
    /// `Σ (q_w − o)·q_a = Σ q_w·q_a − o·Σ q_a`, exact in i32. It starts each block's integer
    /// sum, so the stored unsigned quants go into the products as they are.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn offset_terms(act: &[Q8Block], log2: u32) -> Vec<i32> {
        let mut out = vec![0i32; act.len()];
        let (quads, tail) = act.as_chunks::<4>();
        let (out_quads, out_tail) = out.as_chunks_mut::<4>();
        let shift = _mm_cvtsi32_si128(log2 as i32);
        for (a, o) in quads.iter().zip(out_quads) {
            // `vpsadbw` sums 8 unsigned bytes `q + 128` into each 64-bit lane ...
            let s: [__m256i; 4] = std::array::from_fn(|i| {
                let q = _mm256_loadu_si256(a[i].qs.as_ptr() as *const __m256i);
                _mm256_sad_epu8(_mm256_xor_si256(q, _mm256_set1_epi8(-128)), _mm256_setzero_si256())
            });
            // ... four blocks' four partial sums are added to one 64-bit lane per block ...
            let s01 = _mm256_add_epi64(_mm256_unpacklo_epi64(s[0], s[1]), _mm256_unpackhi_epi64(s[0], s[1]));
            let s23 = _mm256_add_epi64(_mm256_unpacklo_epi64(s[2], s[3]), _mm256_unpackhi_epi64(s[2], s[3]));
            let s = _mm256_add_epi64(
                _mm256_permute2x128_si256::<0x20>(s01, s23),
                _mm256_permute2x128_si256::<0x31>(s01, s23),
            );
            let s = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0)));
            // ... and −o·Σ q = (32·128 − Σ (q + 128)) << log2.
            let v = _mm_sll_epi32(_mm_sub_epi32(_mm_set1_epi32(32 * 128), s), shift);
            _mm_storeu_si128(o.as_mut_ptr() as *mut __m128i, v);
        }
        for (a, o) in tail.iter().zip(out_tail) {
            *o = -(a.qs.iter().map(|&q| q as i32).sum::<i32>() << log2);
        }
        out
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
        ntok: usize,
        out: &'a mut [f32],
        ldo: usize,
    }

    /// Bytes ahead of the interleaved block being read that [`walk`] prefetches (a single
    /// stream is followed too shallowly by the hardware to keep the memory busy); about what
    /// the K formats' four super-blocks ahead come to.
    const PREFETCH_BYTES: usize = 8192;

    /// The walk every kernel shares. For each group of `N` rows, each chunk of up to [`TOKENS`]
    /// tokens and each block: `unpack` the group's block once (given, for rows, the first row's
    /// block, the rows' byte offsets from it and the same as i32; for the interleaved layout,
    /// the 16-row group's block and the first row's lane in it) and let `prep` derive what the
    /// tokens share from it; then for each token `sum` gives the block's exact i32 sums (given
    /// the index of the token's activation block) and `finish` folds them into the token's f32
    /// accumulators, one lane per row.
    #[inline(always)]
    fn walk<const N: usize, B, P, S>(
        tile: Tile<'_>,
        bb: usize,
        unpack: impl Fn(*const u8, &[usize; N], &[i32; N], usize) -> B,
        prep: impl Fn(&B) -> P,
        sum: impl Fn(&B, &P, usize) -> S,
        finish: impl Fn(&mut [f32; N], S, &B, &Q8Block),
    ) {
        const G: usize = crate::dot::GROUP_ROWS;
        let nb = tile.act.len() / tile.ntok;
        let rb = nb * bb;
        let mut acc = [[0f32; N]; TOKENS];
        for r0 in (0..tile.nrows).step_by(N) {
            let live = (tile.nrows - r0).min(N);
            let (offs, idx) = row_offsets::<N>(live, rb);
            for t0 in (0..tile.ntok).step_by(TOKENS) {
                let acc = &mut acc[..(tile.ntok - t0).min(TOKENS)];
                acc.fill([0.0; N]);
                for b in 0..nb {
                    let blk = if tile.packed {
                        let at = ((r0 / G) * nb + b) * G * bb;
                        let ahead = tile.w.as_ptr().wrapping_add(at + PREFETCH_BYTES);
                        // Into L2, as the K formats' walk does (Qwen3-0.6B-shaped Q8_0 decoded
                        // 37.2 -> 41.0 tok/s at AVX-512, 29.5 -> 30.3 at AVX2 against L1).
                        for line in (0..G * bb).step_by(64) {
                            // SAFETY: a prefetch never faults, wherever it points.
                            unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line) as *const i8) };
                        }
                        unpack(tile.w[at..].as_ptr(), &offs, &idx, r0 % G)
                    } else {
                        unpack(tile.w[r0 * rb + b * bb..].as_ptr(), &offs, &idx, 0)
                    };
                    let pre = prep(&blk);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let at = (t0 + i) * nb + b;
                        finish(acc, sum(&blk, &pre, at), &blk, &tile.act[at]);
                    }
                }
                store(acc, live, tile.out, t0 * tile.ldo + r0, tile.ldo);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // AVX2: 8 rows per vector
    // ---------------------------------------------------------------------------------------

    /// One block of 8 rows, lane `r` = row `r`: `w[g]` = the row's quants `4g..4g+4` as bytes
    /// (unsigned as stored, or Q8_0's signed ones), `d` / `m` its scale / minimum.
    struct Block8 {
        w: [__m256i; 8],
        d: __m256,
        m: __m256,
    }

    /// 16 bytes at `at` of each of 8 rows as 4 vectors of dwords: vector `k`, lane `r` = dword `k`
    /// of row `r`.
    ///
    /// # Safety
    /// The CPU has AVX2; `base + offs[r] + at` holds 16 readable bytes for every `r`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn transpose8(base: *const u8, offs: &[usize; 8], at: usize) -> [__m256i; 4] {
        let ld = |r: usize| _mm_loadu_si128(base.add(offs[r] + at) as *const __m128i);
        // z[i] = [row i | row i + 4] (128-bit lanes); then a 4×4 dword transpose per lane.
        let z: [__m256i; 4] =
            std::array::from_fn(|i| _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(ld(i)), ld(i + 4)));
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

    /// Dwords 0 and 1 of each of 8 rows' blocks (`d`, then `m` or fifth bits): the first two
    /// vectors of a [`transpose8`] of the blocks' first 16 bytes. Measured cheaper than two
    /// 8-lane gathers (the AVX-512 kernels gather: there a 16-row transpose costs more).
    ///
    /// # Safety
    /// The CPU has AVX2; `base + offs[r]` holds 16 readable bytes for every `r`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn header8(base: *const u8, offs: &[usize; 8]) -> [__m256i; 2] {
        let ld = |r: usize| _mm_loadu_si128(base.add(offs[r]) as *const __m128i);
        let z: [__m256i; 4] =
            std::array::from_fn(|i| _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(ld(i)), ld(i + 4)));
        let a = _mm256_unpacklo_epi32(z[0], z[1]);
        let c = _mm256_unpacklo_epi32(z[2], z[3]);
        [_mm256_unpacklo_epi64(a, c), _mm256_unpackhi_epi64(a, c)]
    }

    /// The low 16 bits of each dword of `v` (each < 2^16), in order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn low_halves8(v: __m256i) -> __m128i {
        // Per 128-bit lane [v0..v3, v0..v3] as u16, then the two lanes' first halves.
        let p = _mm256_packus_epi32(v, v);
        _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(p))
    }

    /// The block of 8 rows at `base + offs[r]` unpacked.
    ///
    /// # Safety
    /// The CPU has AVX2 + FMA + F16C; `base + offs[r]` is a whole block of `F` for every `r`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack8<F: Fmt>(base: *const u8, offs: &[usize; 8]) -> Block8 {
        let [h0, h1] = header8(base, offs);
        let (d, m) = d_m8::<F>(h0);
        let mut q = [_mm256_setzero_si256(); 8];
        q[..4].copy_from_slice(&transpose8(base, offs, F::QS));
        if F::BYTES {
            q[4..].copy_from_slice(&transpose8(base, offs, F::QS + 16));
        }
        // Q5_1's fifth bits are dword 1; Q5_0's straddle dwords 0 and 1 (bytes 2..6).
        let qh = match F::QH {
            0 => _mm256_setzero_si256(),
            2 => _mm256_or_si256(_mm256_srli_epi32::<16>(h0), _mm256_slli_epi32::<16>(h1)),
            _ => h1,
        };
        block8::<F>(d, m, q, qh)
    }

    /// `d` (and `m` for the `_1` formats) from the dword holding them in each lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn d_m8<F: Fmt>(dm: __m256i) -> (__m256, __m256) {
        let d = _mm256_cvtph_ps(low_halves8(_mm256_and_si256(dm, _mm256_set1_epi32(0xFFFF))));
        let m = if F::MIN { _mm256_cvtph_ps(low_halves8(_mm256_srli_epi32::<16>(dm))) } else { _mm256_setzero_ps() };
        (d, m)
    }

    /// A block of 8 rows from its columns of quant dwords `q` (Q8_0: all 8; the nibble formats:
    /// the first 4) and the fifth bits `qh` (Q5_0 / Q5_1).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block8<F: Fmt>(d: __m256, m: __m256, q: [__m256i; 8], qh: __m256i) -> Block8 {
        if F::BYTES {
            return Block8 { w: q, d, m };
        }
        // Dword k of the packed bytes holds quants 4k..4k+4 in its low nibbles and
        // 16+4k..16+4k+4 in its high ones: groups k and k + 4.
        let mut w = [_mm256_setzero_si256(); 8];
        for (g, wg) in w.iter_mut().enumerate() {
            let x = if g < 4 { q[g] } else { _mm256_srli_epi32::<4>(q[g - 4]) };
            *wg = _mm256_and_si256(x, _mm256_set1_epi8(0x0F));
            if F::QH != 0 {
                // Fifth bits 4g..4g+4 (nibble g of qh): each byte of a dword picks the byte of
                // qh holding its bit, tests it, and sets 0x10 where it is set.
                let [i0, i1, i2, i3] = dword_byte_index(g / 2);
                let sel = _mm256_setr_epi32(i0, i1, i2, i3, i0, i1, i2, i3);
                let bit = _mm256_set1_epi32(nibble_bits(g));
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, sel), bit), bit);
                *wg = _mm256_or_si256(*wg, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
            }
        }
        Block8 { w, d, m }
    }

    /// The interleaved block of a 16-row group at `blk` (see [`crate::dot::interleave`]),
    /// rows `lane..lane + 8`, unpacked as [`unpack8`] unpacks rows: the same values, without
    /// the transposes.
    ///
    /// # Safety
    /// The CPU has AVX2 + FMA + F16C; `blk` is a whole interleaved block of `F`, `lane` 0 or 8.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn packed8<F: Fmt>(blk: *const u8, lane: usize) -> Block8 {
        let col = |off: usize, c: usize| _mm256_loadu_si256(blk.add(16 * off + 64 * c + 4 * lane) as *const __m256i);
        let (d, m) = if F::MIN {
            d_m8::<F>(col(0, 0))
        } else {
            (_mm256_cvtph_ps(_mm_loadu_si128(blk.add(2 * lane) as *const __m128i)), _mm256_setzero_ps())
        };
        let n = if F::BYTES { 8 } else { 4 };
        let mut q = [_mm256_setzero_si256(); 8];
        for (c, qc) in q.iter_mut().enumerate().take(n) {
            *qc = col(F::QS, c);
        }
        let qh = if F::QH != 0 { col(F::QH, 0) } else { _mm256_setzero_si256() };
        block8::<F>(d, m, q, qh)
    }

    /// Q8_0's block of 8 rows left in place for a token or two (see [`tile_avx2`]): `w[2i + h]`
    /// = `[row i | row i + 4]`, 16 quants each from byte `16h` (no transpose).
    ///
    /// # Safety
    /// As [`unpack8`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows8<F: Fmt>(base: *const u8, offs: &[usize; 8]) -> Block8 {
        let [dm, _] = header8(base, offs);
        let d = _mm256_cvtph_ps(low_halves8(_mm256_and_si256(dm, _mm256_set1_epi32(0xFFFF))));
        let ld = |r: usize, h: usize| _mm_loadu_si128(base.add(offs[r] + F::QS + 16 * h) as *const __m128i);
        let w = std::array::from_fn(|j| {
            let (i, h) = (j / 2, j % 2);
            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(ld(i, h)), ld(i + 4, h))
        });
        Block8 { w, d, m: _mm256_setzero_ps() }
    }

    /// Activation bytes `4g..4g+4` at `p` in every dword.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bcast8(p: *const i8, g: usize) -> __m256i {
        _mm256_set1_epi32((p.add(4 * g) as *const i32).read_unaligned())
    }

    /// `acc = fma(d_w·d_a, sum, acc)`, then `fma(m_w, s_a, acc)` for the `_1` formats: the float
    /// steps of [`super::tile_dot_scalar`], one lane per row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn finish8<F: Fmt>(acc: &mut [f32; 8], sum: __m256i, blk: &Block8, a: &Q8Block) {
        let scale = _mm256_mul_ps(blk.d, _mm256_set1_ps(a.d));
        let mut v = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), _mm256_loadu_ps(acc.as_ptr()));
        if F::MIN {
            v = _mm256_fmadd_ps(blk.m, _mm256_set1_ps(a.s), v);
        }
        _mm256_storeu_ps(acc.as_mut_ptr(), v);
    }

    /// # Safety
    /// The CPU has AVX2 + FMA + F16C; `w` holds `nrows` rows of `act.len() / ntok` blocks of
    /// `F`; `out` holds `(ntok - 1) * ldo + nrows` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<F: Fmt>(t: Tile<'_>) {
        let (act, ntok, packed) = (t.act, t.ntok, t.packed);
        let tile = t;
        let unpack = |p: *const u8, offs: &[usize; 8], _: &[i32; 8], lane: usize| {
            if packed {
                packed8::<F>(p, lane)
            } else {
                unpack8::<F>(p, offs)
            }
        };
        let ones = _mm256_set1_epi16(1);
        let finish = |acc: &mut [f32; 8], s: __m256i, blk: &Block8, a: &Q8Block| finish8::<F>(acc, s, blk, a);
        let abs = |blk: &Block8| blk.w.map(|x| _mm256_abs_epi8(x));
        if F::BYTES && ntok <= 2 && !packed {
            // Q8_0 for a token or two: transposing 32 bytes per row costs more than it saves, so
            // each row's quants stay in place and meet the activations broadcast per 128-bit
            // lane, `|w|·(sign(w)·a)` as below. Lane `(L, k)` of `v[i]` then holds row `i + 4L`'s
            // groups `k` and `k + 4`, and three `vphaddd` leave lane `r` with row `r`'s whole
            // block sum: exact, so the same as the transposed kernel's.
            let sum = |blk: &Block8, abs: &[__m256i; 8], at: usize| {
                let y = act[at].qs.as_ptr();
                let a: [__m256i; 2] = std::array::from_fn(|h| {
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(y.add(16 * h) as *const __m128i))
                });
                let v: [__m256i; 4] = std::array::from_fn(|i| {
                    let p = |h: usize| {
                        let j = 2 * i + h;
                        _mm256_madd_epi16(_mm256_maddubs_epi16(abs[j], _mm256_sign_epi8(a[h], blk.w[j])), ones)
                    };
                    _mm256_add_epi32(p(0), p(1))
                });
                _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]))
            };
            walk(tile, F::BB, |p, offs, _, _| rows8::<F>(p, offs), abs, sum, finish);
        } else if F::BYTES {
            // Q8_0: Σ |w|·(sign(w)·a) per group, each pair sum widened at once (|w| ≤ 128
            // leaves no room to add pair sums in i16).
            let sum = |blk: &Block8, abs: &[__m256i; 8], at: usize| {
                let y = act[at].qs.as_ptr();
                let mut s = _mm256_setzero_si256();
                for (g, (x, abs)) in blk.w.iter().zip(abs).enumerate() {
                    let a = _mm256_sign_epi8(bcast8(y, g), *x);
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(*abs, a), ones));
                }
                s
            };
            walk(tile, F::BB, unpack, abs, sum, finish);
        } else {
            // Unsigned quants times signed activations, pair sums added in i16 as far as they
            // cannot overflow, starting from the offset term.
            let offsets = if F::OFFSET_LOG2 != 0 { offset_terms(act, F::OFFSET_LOG2) } else { Vec::new() };
            let sum = |blk: &Block8, _: &(), at: usize| {
                let y = act[at].qs.as_ptr();
                let mut s = if F::OFFSET_LOG2 != 0 { _mm256_set1_epi32(offsets[at]) } else { _mm256_setzero_si256() };
                for h in (0..8).step_by(F::I16_GROUPS) {
                    let mut p = _mm256_maddubs_epi16(blk.w[h], bcast8(y, h));
                    for g in h + 1..h + F::I16_GROUPS {
                        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(blk.w[g], bcast8(y, g)));
                    }
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                }
                s
            };
            walk(tile, F::BB, unpack, |_| (), sum, finish);
        }
    }

    /// # Safety
    /// The CPU has AVX2 + FMA + F16C; the shapes are as [`super::gemm`] asserts.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx2(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        packed: bool,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let k = pick(
            dtype,
            [tile_avx2::<Q4_0>, tile_avx2::<Q4_1>, tile_avx2::<Q5_0>, tile_avx2::<Q5_1>, tile_avx2::<Q8_0>],
        );
        k(Tile { w, nrows, packed, act, ntok, out, ldo })
    }

    // ---------------------------------------------------------------------------------------
    // AVX-512: 16 rows per vector
    // ---------------------------------------------------------------------------------------

    /// One block of 16 rows, as [`Block8`].
    struct Block16 {
        w: [__m512i; 8],
        d: __m512,
        m: __m512,
    }

    /// As [`transpose8`], for 16 rows.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW; `base + offs[r] + at` holds 16 readable bytes for every `r`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn transpose16(base: *const u8, offs: &[usize; 16], at: usize) -> [__m512i; 4] {
        let ld = |r: usize| _mm_loadu_si128(base.add(offs[r] + at) as *const __m128i);
        // z[i] = [row i | row i + 4 | row i + 8 | row i + 12]; then a 4×4 transpose per lane.
        let z: [__m512i; 4] = std::array::from_fn(|i| {
            let v = _mm512_inserti32x4::<1>(_mm512_castsi128_si512(ld(i)), ld(i + 4));
            _mm512_inserti32x4::<3>(_mm512_inserti32x4::<2>(v, ld(i + 8)), ld(i + 12))
        });
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

    /// As [`unpack8`], for 16 rows; `d`, `m` and the fifth bits are gathered (`idx`: `offs` as
    /// i32).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + FMA + F16C; as [`unpack8`] otherwise.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn unpack16<F: Fmt>(base: *const u8, offs: &[usize; 16], idx: &[i32; 16]) -> Block16 {
        let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
        let (d, m) = d_m16::<F>(_mm512_i32gather_epi32::<1>(idx, base as *const i32));
        let mut q = [_mm512_setzero_si512(); 8];
        q[..4].copy_from_slice(&transpose16(base, offs, F::QS));
        if F::BYTES {
            q[4..].copy_from_slice(&transpose16(base, offs, F::QS + 16));
        }
        let qh = if F::QH != 0 {
            _mm512_i32gather_epi32::<1>(idx, base.add(F::QH) as *const i32)
        } else {
            _mm512_setzero_si512()
        };
        block16::<F>(d, m, q, qh)
    }

    /// As [`d_m8`], for 16 rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn d_m16<F: Fmt>(dm: __m512i) -> (__m512, __m512) {
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
        let m = if F::MIN {
            _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)))
        } else {
            _mm512_setzero_ps()
        };
        (d, m)
    }

    /// As [`block8`], for 16 rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn block16<F: Fmt>(d: __m512, m: __m512, q: [__m512i; 8], qh: __m512i) -> Block16 {
        if F::BYTES {
            return Block16 { w: q, d, m };
        }
        let mut w = [_mm512_setzero_si512(); 8];
        for (g, wg) in w.iter_mut().enumerate() {
            let x = if g < 4 { q[g] } else { _mm512_srli_epi32::<4>(q[g - 4]) };
            *wg = _mm512_and_si512(x, _mm512_set1_epi8(0x0F));
            if F::QH != 0 {
                // Fifth bits 4g..4g+4 as a byte mask (bit 4r + j: row r's quant 4g + j has it).
                let [i0, i1, i2, i3] = dword_byte_index(g / 2);
                let sel = _mm512_setr_epi32(i0, i1, i2, i3, i0, i1, i2, i3, i0, i1, i2, i3, i0, i1, i2, i3);
                let set = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, sel), _mm512_set1_epi32(nibble_bits(g)));
                *wg = _mm512_mask_add_epi8(*wg, set, *wg, _mm512_set1_epi8(0x10));
            }
        }
        Block16 { w, d, m }
    }

    /// As [`packed8`], for the 16 rows of the group.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + FMA + F16C; `blk` is a whole interleaved block of `F`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn packed16<F: Fmt>(blk: *const u8) -> Block16 {
        let col = |off: usize, c: usize| _mm512_loadu_si512(blk.add(16 * off + 64 * c) as *const _);
        let (d, m) = if F::MIN {
            d_m16::<F>(col(0, 0))
        } else {
            (_mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i)), _mm512_setzero_ps())
        };
        let n = if F::BYTES { 8 } else { 4 };
        let mut q = [_mm512_setzero_si512(); 8];
        for (c, qc) in q.iter_mut().enumerate().take(n) {
            *qc = col(F::QS, c);
        }
        let qh = if F::QH != 0 { col(F::QH, 0) } else { _mm512_setzero_si512() };
        block16::<F>(d, m, q, qh)
    }

    /// As [`rows8`], for 16 rows: `w[2i + h]` = `[row i | row i + 4 | row i + 8 | row i + 12]`.
    ///
    /// # Safety
    /// As [`unpack16`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn rows16<F: Fmt>(base: *const u8, offs: &[usize; 16], idx: &[i32; 16]) -> Block16 {
        let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
        let dm = _mm512_i32gather_epi32::<1>(idx, base as *const i32);
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
        let ld = |r: usize, h: usize| _mm_loadu_si128(base.add(offs[r] + F::QS + 16 * h) as *const __m128i);
        let w = std::array::from_fn(|j| {
            let (i, h) = (j / 2, j % 2);
            let v = _mm512_inserti32x4::<1>(_mm512_castsi128_si512(ld(i, h)), ld(i + 4, h));
            _mm512_inserti32x4::<3>(_mm512_inserti32x4::<2>(v, ld(i + 8, h)), ld(i + 12, h))
        });
        Block16 { w, d, m: _mm512_setzero_ps() }
    }

    /// Activation bytes `4g..4g+4` at `p` in every dword.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn bcast16(p: *const i8, g: usize) -> __m512i {
        _mm512_set1_epi32((p.add(4 * g) as *const i32).read_unaligned())
    }

    /// As [`finish8`], for 16 rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn finish16<F: Fmt>(acc: &mut [f32; 16], sum: __m512i, blk: &Block16, a: &Q8Block) {
        let scale = _mm512_mul_ps(blk.d, _mm512_set1_ps(a.d));
        let mut v = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), _mm512_loadu_ps(acc.as_ptr()));
        if F::MIN {
            v = _mm512_fmadd_ps(blk.m, _mm512_set1_ps(a.s), v);
        }
        _mm512_storeu_ps(acc.as_mut_ptr(), v);
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + FMA + F16C; shapes as for [`tile_avx2`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn tile_avx512<F: Fmt>(t: Tile<'_>) {
        let (act, ntok, packed) = (t.act, t.ntok, t.packed);
        let tile = t;
        let unpack = |p: *const u8, offs: &[usize; 16], idx: &[i32; 16], _: usize| {
            if packed {
                packed16::<F>(p)
            } else {
                unpack16::<F>(p, offs, idx)
            }
        };
        let ones = _mm512_set1_epi16(1);
        let finish = |acc: &mut [f32; 16], s: __m512i, blk: &Block16, a: &Q8Block| finish16::<F>(acc, s, blk, a);
        // Q8_0: |w|·(sign(w)·a) as in `tile_avx2`, the sign moved by a masked negate (there is
        // no 512-bit `vpsignb`).
        let signs = |blk: &Block16| (blk.w.map(|x| _mm512_abs_epi8(x)), blk.w.map(|x| _mm512_movepi8_mask(x)));
        if F::BYTES && ntok <= 2 && !packed {
            // For a token or two, rows in place as in `tile_avx2`: lane `(L, k)` of `v[i]` holds
            // row `i + 4L`'s groups `k` and `k + 4`, and two unpack-and-add rounds leave lane
            // `r` with row `r`'s sum.
            let sum = |_: &Block16, (abs, neg): &([__m512i; 8], [__mmask64; 8]), at: usize| {
                let y = act[at].qs.as_ptr();
                let a: [__m512i; 2] =
                    std::array::from_fn(|h| _mm512_broadcast_i32x4(_mm_loadu_si128(y.add(16 * h) as *const __m128i)));
                let v: [__m512i; 4] = std::array::from_fn(|i| {
                    let p = |h: usize| {
                        let j = 2 * i + h;
                        let y = _mm512_mask_sub_epi8(a[h], neg[j], _mm512_setzero_si512(), a[h]);
                        _mm512_madd_epi16(_mm512_maddubs_epi16(abs[j], y), ones)
                    };
                    _mm512_add_epi32(p(0), p(1))
                });
                // Per 128-bit lane [v0 k0+k2, v1 k0+k2, v0 k1+k3, v1 k1+k3], then the halves.
                let pair = |x, y| _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
                let (p01, p23) = (pair(v[0], v[1]), pair(v[2], v[3]));
                _mm512_add_epi32(_mm512_unpacklo_epi64(p01, p23), _mm512_unpackhi_epi64(p01, p23))
            };
            walk(tile, F::BB, |p, offs, idx, _| rows16::<F>(p, offs, idx), signs, sum, finish);
        } else if F::BYTES {
            let sum = |_: &Block16, (abs, neg): &([__m512i; 8], [__mmask64; 8]), at: usize| {
                let y = act[at].qs.as_ptr();
                let mut s = _mm512_setzero_si512();
                for (g, (abs, neg)) in abs.iter().zip(neg).enumerate() {
                    let a = bcast16(y, g);
                    let a = _mm512_mask_sub_epi8(a, *neg, _mm512_setzero_si512(), a);
                    s = _mm512_add_epi32(s, _mm512_madd_epi16(_mm512_maddubs_epi16(*abs, a), ones));
                }
                s
            };
            walk(tile, F::BB, unpack, signs, sum, finish);
        } else {
            // As in `tile_avx2`.
            let offsets = if F::OFFSET_LOG2 != 0 { offset_terms(act, F::OFFSET_LOG2) } else { Vec::new() };
            let sum = |blk: &Block16, _: &(), at: usize| {
                let y = act[at].qs.as_ptr();
                let mut s = if F::OFFSET_LOG2 != 0 { _mm512_set1_epi32(offsets[at]) } else { _mm512_setzero_si512() };
                for h in (0..8).step_by(F::I16_GROUPS) {
                    let mut p = _mm512_maddubs_epi16(blk.w[h], bcast16(y, h));
                    for g in h + 1..h + F::I16_GROUPS {
                        p = _mm512_add_epi16(p, _mm512_maddubs_epi16(blk.w[g], bcast16(y, g)));
                    }
                    s = _mm512_add_epi32(s, _mm512_madd_epi16(p, ones));
                }
                s
            };
            walk(tile, F::BB, unpack, |_| (), sum, finish);
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + VNNI + FMA + F16C; shapes as for [`tile_avx2`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn tile_avx512_vnni<F: Fmt>(t: Tile<'_>) {
        let (act, packed) = (t.act, t.packed);
        let tile = t;
        let unpack = |p: *const u8, offs: &[usize; 16], idx: &[i32; 16], _: usize| {
            if packed {
                packed16::<F>(p)
            } else {
                unpack16::<F>(p, offs, idx)
            }
        };
        let finish = |acc: &mut [f32; 16], s: __m512i, blk: &Block16, a: &Q8Block| finish16::<F>(acc, s, blk, a);
        // `vpdpbusd` needs unsigned weights: Q8_0's signed bytes get 128 added (an xor), which
        // its offset term takes back.
        let unsigned =
            |blk: &Block16| if F::BYTES { blk.w.map(|x| _mm512_xor_si512(x, _mm512_set1_epi8(-128))) } else { blk.w };
        let offsets = if F::OFFSET_LOG2 != 0 { offset_terms(act, F::OFFSET_LOG2) } else { Vec::new() };
        let sum = |_: &Block16, wu: &[__m512i; 8], at: usize| {
            // Two chains of four, so a token waits for half as many `vpdpbusd` latencies.
            let y = act[at].qs.as_ptr();
            let mut s0 = if F::OFFSET_LOG2 != 0 { _mm512_set1_epi32(offsets[at]) } else { _mm512_setzero_si512() };
            let mut s1 = _mm512_setzero_si512();
            for g in 0..4 {
                s0 = _mm512_dpbusd_epi32(s0, wu[g], bcast16(y, g));
                s1 = _mm512_dpbusd_epi32(s1, wu[g + 4], bcast16(y, g + 4));
            }
            _mm512_add_epi32(s0, s1)
        };
        walk(tile, F::BB, unpack, unsigned, sum, finish);
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + FMA + F16C; the shapes are as [`super::gemm`] asserts.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx512(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        packed: bool,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let k = pick(
            dtype,
            [tile_avx512::<Q4_0>, tile_avx512::<Q4_1>, tile_avx512::<Q5_0>, tile_avx512::<Q5_1>, tile_avx512::<Q8_0>],
        );
        k(Tile { w, nrows, packed, act, ntok, out, ldo })
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + VNNI + FMA + F16C; the shapes are as [`super::gemm`]
    /// asserts.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx512_vnni(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        packed: bool,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let k = pick(
            dtype,
            [
                tile_avx512_vnni::<Q4_0>,
                tile_avx512_vnni::<Q4_1>,
                tile_avx512_vnni::<Q5_0>,
                tile_avx512_vnni::<Q5_1>,
                tile_avx512_vnni::<Q8_0>,
            ],
        );
        k(Tile { w, nrows, packed, act, ntok, out, ldo })
    }

    /// A tile kernel set as the tests and the benchmark call it.
    #[cfg(test)]
    pub(super) type Gemm = unsafe fn(DType, &[u8], usize, bool, &[Q8Block], usize, &mut [f32], usize);

    /// Every x86 tile kernel set the CPU runs, by name.
    #[cfg(test)]
    pub(super) fn variants() -> Vec<(&'static str, Gemm)> {
        use crate::cpu::{detected, has_avx512_vnni, SimdLevel};
        let mut v: Vec<(&'static str, Gemm)> = Vec::new();
        if detected() >= SimdLevel::Avx2 {
            v.push(("avx2", gemm_avx2));
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
        let mut row = vec![0u8; blocks * dtype.block_bytes()];
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
                    gemm(level, dtype, w, nrows, Layout::Rows, act, ntok, out, ldo)
                }),
            ));
        }
        // The interleaved layout: the rows are rearranged inside the call.
        for level in SimdLevel::available() {
            v.push((
                format!("{level:?} interleaved"),
                Box::new(move |dtype, w, nrows, act, ntok, out, ldo| {
                    let packed = crate::dot::interleave(dtype, nrows, act.len() / ntok * 32, w);
                    gemm(level, dtype, &packed, nrows, Layout::Interleaved, act, ntok, out, ldo)
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
                            f(dtype, &p, nrows, true, act, ntok, out, ldo)
                        } else {
                            f(dtype, w, nrows, false, act, ntok, out, ldo)
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
                        f(dtype, w, nrows, packed, act, ntok, out, ldo)
                    }),
                    packed,
                ));
            }
        }
        let only = std::env::var("PIO_BENCH_FORMATS").unwrap_or_default();
        for cols in [896, 4864] {
            let blocks = cols / 32;
            for dtype in [DType::Q5_0, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_1] {
                if !only.is_empty() && !only.split(',').any(|f| f.eq_ignore_ascii_case(dtype.name())) {
                    continue;
                }
                for ntok in [1, 64] {
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
