//! K-format rows (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; 256-weight super-blocks) times 8-bit
//! activations ([`Q8Block`], one per 32 values, so eight per super-block).
//!
//! The layouts are GGML's (see [`crate::quant`]). Every sum of weight quant times activation
//! quant is exact in integers; floats only enter per 32 activations, where the activation scale
//! changes:
//! - Q4_K / Q5_K: a 32-wide sub-block `j` lines up with Q8Block `j`, giving
//!   `d·sc_j·d_a·Σ q·q_a − dmin·m_j·s_a` (the min folds in through `s_a = d_a·Σ q_a`).
//! - Q6_K / Q3_K: 16-wide sub-blocks with signed scales, two per Q8Block (both halves share
//!   `d_a`): `d·d_a·(sc_lo·Σ_lo q·q_a + sc_hi·Σ_hi q·q_a)`, with q the centred quant.
//! - Q2_K: 16-wide sub-blocks with a scale and a min each:
//!   `d·d_a·Σ_half sc·Σ q·q_a − dmin·d_a·Σ_half m·Σ q_a`.
//!
//! Single rows ([`dot_q8`]): Q3_K and Q2_K have AVX2 row dots in llama.cpp's shape (`maddubs`
//! multiplies the unsigned weight quants by the signed activation quants into i16 pairs, centred
//! formats subtract `maddubs(offset, q_a)`, `madd` with the 16-wide sub-block scales widens to
//! i32, one FMA per Q8Block applies the float scale), at both SIMD levels. Q4_K, Q5_K and Q6_K
//! have only the scalar reference: their products go through the tiles below, which beat the
//! row dots this module had at every token count, one included.
//!
//! [`gemm`] computes tiles of rows x tokens (prefill, and decode's 16-row tiles): for Q4_K,
//! Q5_K and Q6_K, each super-block of 16 rows is transposed and unpacked once into columns with
//! one row per 32-bit lane, then meets every token of the tile, 16 rows per instruction, with
//! floats applied once per (Q8Block, token) for all 16 rows (see `tiled`). Q3_K and Q2_K use one
//! [`dot_q8`] per pair. [`gemm`] does the same over matrices repacked at load
//! ([`super::interleave`]), whose columns are plain loads. A single token (decode) skips the
//! unpacked buffer: Q4_K and Q6_K super-blocks are unpacked in registers and used at once (8 rows
//! per AVX2 register, 16 per AVX-512 one), with the tile's float steps, so the bits are the same,
//! and the next memory is prefetched (the hardware follows one interleaved stream, or short expert
//! rows, too shallowly).

use crate::act::Q8Block;
use crate::cpu::SimdLevel;
use crate::dot::Layout;
use crate::DType;

/// Weights per super-block.
const QK_K: usize = 256;
/// Q8Blocks per super-block.
const ACT_PER_SUPER: usize = QK_K / 32;

/// Dot of one stored K-format row with quantized activations: `row` holds `act.len() / 8`
/// super-blocks of `dtype`.
pub fn dot_q8(level: SimdLevel, dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    assert!(
        matches!(dtype, DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K),
        "{dtype} is not a K format"
    );
    assert!(act.len().is_multiple_of(ACT_PER_SUPER), "{} activation blocks are not whole super-blocks", act.len());
    assert_eq!(
        row.len(),
        act.len() / ACT_PER_SUPER * dtype.block_bytes(),
        "{dtype}: {} bytes do not hold {} weights",
        row.len(),
        act.len() * 32
    );
    match level {
        // Q4_K, Q5_K and Q6_K products go through the tiles (`tiled`), which beat row dots at
        // every token count, so only the scalar reference dots their single rows.
        _ if matches!(dtype, DType::Q4_K | DType::Q5_K | DType::Q6_K) => dot_scalar(dtype, row, act),
        SimdLevel::Scalar => dot_scalar(dtype, row, act),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level` comes from `cpu::level()` (or `SimdLevel::available()`), which only
        // reports what the CPU has (AVX2, FMA and F16C at both levels); lengths were asserted
        // above.
        SimdLevel::Avx2 | SimdLevel::Avx512 => unsafe { x86::dot_avx2(dtype, row, act) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => dot_scalar(dtype, row, act),
    }
}

/// The scalar reference: integer sums per sub-block, floats per Q8Block. Lengths must already
/// match (see [`dot_q8`]).
pub fn dot_scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    match dtype {
        DType::Q4_K => q4_k_scalar(row, act),
        DType::Q6_K => q6_k_scalar(row, act),
        DType::Q5_K => q5_k_scalar(row, act),
        DType::Q3_K => q3_k_scalar(row, act),
        DType::Q2_K => q2_k_scalar(row, act),
        other => panic!("{other} is not a K format"),
    }
}

/// The f16 at byte `at` of `b`, as f32.
#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K `scales` field (12 bytes),
/// unpacked with word operations (llama.cpp's `kmask` trick): for j < 4 the low 6 bits of bytes
/// j and j+4; for j >= 4 the nibbles of byte j+4 plus the top two bits of bytes j-4 and j.
#[inline]
fn k4_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3F3F_3F3F;
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let w0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let w1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let w2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let sc_lo = w0 & LOW6;
    let sc_hi = (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4);
    let m_lo = w1 & LOW6;
    let m_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4);
    let (a, b) = (sc_lo.to_le_bytes(), sc_hi.to_le_bytes());
    let (c, e) = (m_lo.to_le_bytes(), m_hi.to_le_bytes());
    ([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]], [c[0], c[1], c[2], c[3], e[0], e[1], e[2], e[3]])
}

/// The sixteen signed 6-bit Q3_K scales from their 12 packed bytes: scale j has its low nibble
/// in byte `j % 8` (low nibble for j < 8, high for j >= 8) and its top two bits in byte
/// `8 + j % 4` at bit `2 * (j / 4)`; stored with a +32 bias.
#[inline]
fn q3_k_scales(s: &[u8; 12]) -> [i8; 16] {
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let w0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let w1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let hi = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let words = [
        (w0 & LOW4) | ((hi & LOW2) << 4),
        (w1 & LOW4) | (((hi >> 2) & LOW2) << 4),
        ((w0 >> 4) & LOW4) | (((hi >> 4) & LOW2) << 4),
        ((w1 >> 4) & LOW4) | (((hi >> 6) & LOW2) << 4),
    ];
    let mut out = [0i8; 16];
    for (o, w) in out.as_chunks_mut::<4>().0.iter_mut().zip(words) {
        *o = w.to_le_bytes().map(|v| v as i8 - 32);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Scalar
// ---------------------------------------------------------------------------------------------
//
// Each Q8Block's 32 weight quants are decoded into an array first, so the integer dot below is
// a plain loop the compiler can vectorize for whatever target this is built for.

/// Σ `q[l] * a[l]` over two 16-lane halves.
#[inline]
fn dot16x2(q: &[i8; 32], a: &[i8; 32]) -> [i32; 2] {
    let half =
        |r: std::ops::Range<usize>| -> i32 { q[r.clone()].iter().zip(&a[r]).map(|(&q, &a)| q as i32 * a as i32).sum() };
    [half(0..16), half(16..32)]
}

/// Σ `q[l] * a[l]`.
#[inline]
fn dot32(q: &[i8; 32], a: &[i8; 32]) -> i32 {
    q.iter().zip(a).map(|(&q, &a)| q as i32 * a as i32).sum()
}

/// Q4_K, 144 bytes: `d`, `dmin`, 12 bytes of scales/mins, 128 bytes of nibbles (32 bytes per 64
/// weights, low nibbles first).
fn q4_k_scalar(row: &[u8], act: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.as_chunks::<144>().0.iter().zip(act.as_chunks::<ACT_PER_SUPER>().0) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, m) = k4_scales_mins(b[4..16].try_into().expect("12 bytes"));
        let qs = &b[16..144];
        let (mut sumf, mut summ) = (0f32, 0f32);
        for (j, a) in a.iter().enumerate() {
            let (bytes, shift) = (&qs[32 * (j / 2)..32 * (j / 2) + 32], 4 * (j % 2));
            let q: [i8; 32] = std::array::from_fn(|l| ((bytes[l] >> shift) & 0x0F) as i8);
            sumf += (sc[j] as i32 * dot32(&q, &a.qs)) as f32 * a.d;
            summ += m[j] as f32 * a.s;
        }
        sum += d * sumf - dmin * summ;
    }
    sum
}

/// Q5_K, 176 bytes: as Q4_K plus `qh: [u8; 32]` before the nibbles (bit j of byte l is the
/// fifth bit of weight 32j + l).
fn q5_k_scalar(row: &[u8], act: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.as_chunks::<176>().0.iter().zip(act.as_chunks::<ACT_PER_SUPER>().0) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, m) = k4_scales_mins(b[4..16].try_into().expect("12 bytes"));
        let qh = &b[16..48];
        let qs = &b[48..176];
        let (mut sumf, mut summ) = (0f32, 0f32);
        for (j, a) in a.iter().enumerate() {
            let (bytes, shift) = (&qs[32 * (j / 2)..32 * (j / 2) + 32], 4 * (j % 2));
            let q: [i8; 32] = std::array::from_fn(|l| (((bytes[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4)) as i8);
            sumf += (sc[j] as i32 * dot32(&q, &a.qs)) as f32 * a.d;
            summ += m[j] as f32 * a.s;
        }
        sum += d * sumf - dmin * summ;
    }
    sum
}

/// Q6_K, 210 bytes: `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d`. Per 128 weights,
/// weight 32k + l has its low nibble in `ql[32*(k%2) + l]` (low nibble for k < 2) and its top
/// two bits at bit 2k of `qh[l]`; w = d·sc·(q − 32).
fn q6_k_scalar(row: &[u8], act: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.as_chunks::<210>().0.iter().zip(act.as_chunks::<ACT_PER_SUPER>().0) {
        let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        let mut sumf = 0f32;
        for (bi, a) in a.iter().enumerate() {
            let (h, k) = (bi / 4, bi % 4);
            let lows = &ql[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
            let highs = &qh[32 * h..32 * h + 32];
            let (ls, hs) = (4 * (k / 2), 2 * k);
            let q: [i8; 32] =
                std::array::from_fn(|l| (((lows[l] >> ls) & 0x0F) | (((highs[l] >> hs) & 3) << 4)) as i8 - 32);
            let s = dot16x2(&q, &a.qs);
            sumf += (sc[2 * bi] as i8 as i32 * s[0] + sc[2 * bi + 1] as i8 as i32 * s[1]) as f32 * a.d;
        }
        sum += d * sumf;
    }
    sum
}

/// Q3_K, 110 bytes: `hmask: [u8; 32]`, `qs: [u8; 64]`, 12 bytes of 6-bit scales, `d`. Weight
/// 128h + 32s + l has its low two bits at bits 2s of `qs[32h + l]` and its high bit at bit
/// 4h + s of `hmask[l]`; w = d·sc·(low − 4·!high).
fn q3_k_scalar(row: &[u8], act: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.as_chunks::<110>().0.iter().zip(act.as_chunks::<ACT_PER_SUPER>().0) {
        let (hmask, qs) = (&b[0..32], &b[32..96]);
        let sc = q3_k_scales(b[96..108].try_into().expect("12 bytes"));
        let d = f16_at(b, 108);
        let mut sumf = 0f32;
        for (bi, a) in a.iter().enumerate() {
            let (low, shift) = (&qs[32 * (bi / 4)..32 * (bi / 4) + 32], 2 * (bi % 4));
            let q: [i8; 32] =
                std::array::from_fn(|l| ((low[l] >> shift) & 3) as i8 - 4 * (((hmask[l] >> bi) & 1) ^ 1) as i8);
            let s = dot16x2(&q, &a.qs);
            sumf += (sc[2 * bi] as i32 * s[0] + sc[2 * bi + 1] as i32 * s[1]) as f32 * a.d;
        }
        sum += d * sumf;
    }
    sum
}

/// Q2_K, 84 bytes: `scales: [u8; 16]` (low nibble scale, high nibble min, per 16 weights),
/// `qs: [u8; 64]` (as Q3_K), `d`, `dmin`; w = d·sc·q − dmin·m.
fn q2_k_scalar(row: &[u8], act: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.as_chunks::<84>().0.iter().zip(act.as_chunks::<ACT_PER_SUPER>().0) {
        let (scales, qs) = (&b[0..16], &b[16..80]);
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        let (mut sumf, mut summ) = (0f32, 0f32);
        for (bi, a) in a.iter().enumerate() {
            let (bytes, shift) = (&qs[32 * (bi / 4)..32 * (bi / 4) + 32], 2 * (bi % 4));
            let q: [i8; 32] = std::array::from_fn(|l| ((bytes[l] >> shift) & 3) as i8);
            let sq = dot16x2(&q, &a.qs);
            let sa = dot16x2(&[1; 32], &a.qs);
            let (lo, hi) = (scales[2 * bi], scales[2 * bi + 1]);
            sumf += ((lo & 0x0F) as i32 * sq[0] + (hi & 0x0F) as i32 * sq[1]) as f32 * a.d;
            summ += ((lo >> 4) as i32 * sa[0] + (hi >> 4) as i32 * sa[1]) as f32 * a.d;
        }
        sum += d * sumf - dmin * summ;
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// x86-64: AVX2 and AVX-512
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    use super::{q3_k_scales, DType, Q8Block, ACT_PER_SUPER};

    /// A kernel for one format: row bytes and activations of matching lengths.
    #[cfg(test)]
    pub(super) type Kernel = unsafe fn(&[u8], &[Q8Block]) -> f32;

    /// Q3_K and Q2_K rows, which have no tiled kernels (the others dot through the tiles).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` holds `act.len() / 8` super-blocks of `dtype`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        match dtype {
            DType::Q3_K => q3_k_avx2(row, act),
            DType::Q2_K => q2_k_avx2(row, act),
            other => panic!("{other} has no row-dot kernel"),
        }
    }

    /// Every x86 row-dot kernel of `dtype` this CPU runs, by name, for tests.
    #[cfg(test)]
    pub(super) fn kernels(dtype: DType) -> Vec<(&'static str, Kernel)> {
        let avx2 = crate::cpu::detected() >= crate::cpu::SimdLevel::Avx2;
        match dtype {
            DType::Q3_K if avx2 => vec![("q3_k_avx2", q3_k_avx2 as Kernel)],
            DType::Q2_K if avx2 => vec![("q2_k_avx2", q2_k_avx2 as Kernel)],
            _ => Vec::new(),
        }
    }

    // --- Shared helpers -----------------------------------------------------------------------

    /// The f16 whose bits are `b[at..at + 2]` (little-endian), as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The 32 activation quants of `a`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_q8(a: &Q8Block) -> __m256i {
        _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i)
    }

    /// 32 bytes at `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load32(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The `d` and `s` fields of eight activation blocks, as two vectors.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_ds(a: &[Q8Block; ACT_PER_SUPER]) -> (__m256, __m256) {
        // (d, s) are the first 8 bytes of each (8-aligned) block.
        let pair = |i: usize| -> *const f64 { &a[i].d as *const f32 as *const f64 };
        let x01 = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(pair(0)), pair(1)));
        let x23 = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(pair(2)), pair(3)));
        let x45 = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(pair(4)), pair(5)));
        let x67 = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(pair(6)), pair(7)));
        let lo = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(x01), x45);
        let hi = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(x23), x67);
        (_mm256_shuffle_ps::<0b10_00_10_00>(lo, hi), _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi))
    }

    /// `v` with bit `from` of every byte moved to bit `to` (other bits are garbage; 16-bit
    /// shifts, so only bits that stay inside their byte are meaningful).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn move_bit(v: __m256i, from: usize, to: usize) -> __m256i {
        if from < to {
            _mm256_sll_epi16(v, _mm_cvtsi32_si128((to - from) as i32))
        } else if from > to {
            _mm256_srl_epi16(v, _mm_cvtsi32_si128((from - to) as i32))
        } else {
            v
        }
    }

    /// Byte shuffles splatting i16 lane `bi` within each 128-bit lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn word_splats() -> [__m256i; 8] {
        std::array::from_fn(|bi| _mm256_set1_epi16((2 * bi as i16) | ((2 * bi as i16 + 1) << 8)))
    }

    /// Sixteen signed per-16-weight scales (bytes of `v`) as i16 in the layout
    /// [`word_splats`] reads: even scales in the low 128-bit lane, odd scales in the high one,
    /// so splatting lane `bi` gives the two scales of Q8Block `bi`, one per 16-weight half.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scales_even_odd(v: __m128i) -> __m256i {
        let even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(v, even_odd))
    }

    // --- Q4_K and Q5_K --------------------------------------------------------------------------

    // --- Q6_K ----------------------------------------------------------------------------------

    // --- Q3_K ----------------------------------------------------------------------------------

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q3_k_avx2(row: &[u8], act: &[Q8Block]) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm256_set1_epi8(4);
        let splats = word_splats();
        let splats = black_box(&splats);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut dscale = [0f32; 8];
        for (b, a) in row.as_chunks::<110>().0.iter().zip(act.as_chunks::<ACT_PER_SUPER>().0) {
            let p = b.as_ptr();
            let d = _mm256_set1_ps(f16_at(b, 108));
            let (da, _) = load_ds(a);
            _mm256_storeu_ps(dscale.as_mut_ptr(), _mm256_mul_ps(da, d));
            let dscale = black_box(&dscale);
            let sc = q3_k_scales(b[96..108].try_into().expect("12 bytes"));
            let scales = scales_even_odd(_mm_loadu_si128(sc.as_ptr() as *const __m128i));
            let hmask = load32(p);
            for h in 0..2 {
                let q2 = load32(p.add(32 + 32 * h));
                for (s, acc) in acc.iter_mut().enumerate() {
                    let bi = 4 * h + s;
                    let av = load_q8(&a[bi]);
                    // Weight 128h + 32s + l: q = low − 4·!high, with low at bits 2s of the qs
                    // byte and high at bit bi of the hmask byte.
                    let low = _mm256_and_si256(move_bit(q2, 2 * s, 0), m3);
                    let minus = _mm256_andnot_si256(move_bit(hmask, bi, 2), m4);
                    let prod = _mm256_sub_epi16(_mm256_maddubs_epi16(low, av), _mm256_maddubs_epi16(minus, av));
                    let v = _mm256_madd_epi16(prod, _mm256_shuffle_epi8(scales, splats[bi]));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_broadcast_ss(&dscale[bi]), *acc);
                }
            }
        }
        hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    // --- Q2_K ----------------------------------------------------------------------------------

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q2_k_avx2(row: &[u8], act: &[Q8Block]) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi8(1);
        let n4 = _mm_set1_epi8(0x0F);
        let splats = word_splats();
        let splats = black_box(&splats);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut acc_min = [_mm256_setzero_ps(); 2];
        // d·d_a (0..8) and dmin·d_a (8..16) per Q8Block.
        let mut dscale = [0f32; 16];
        for (b, a) in row.as_chunks::<84>().0.iter().zip(act.as_chunks::<ACT_PER_SUPER>().0) {
            let p = b.as_ptr();
            let (da, _) = load_ds(a);
            _mm256_storeu_ps(dscale.as_mut_ptr(), _mm256_mul_ps(da, _mm256_set1_ps(f16_at(b, 80))));
            _mm256_storeu_ps(dscale.as_mut_ptr().add(8), _mm256_mul_ps(da, _mm256_set1_ps(f16_at(b, 82))));
            let dscale = black_box(&dscale);
            let packed = _mm_loadu_si128(p as *const __m128i);
            let scales = scales_even_odd(_mm_and_si128(packed, n4));
            let mins = scales_even_odd(_mm_and_si128(_mm_srli_epi16::<4>(packed), n4));
            for h in 0..2 {
                let q2 = load32(p.add(16 + 32 * h));
                for s in 0..4 {
                    let bi = 4 * h + s;
                    let av = load_q8(&a[bi]);
                    let q = _mm256_and_si256(move_bit(q2, 2 * s, 0), m3);
                    let vq = _mm256_madd_epi16(_mm256_maddubs_epi16(q, av), _mm256_shuffle_epi8(scales, splats[bi]));
                    let vm = _mm256_madd_epi16(_mm256_maddubs_epi16(ones, av), _mm256_shuffle_epi8(mins, splats[bi]));
                    let i = s % 2;
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(vq), _mm256_broadcast_ss(&dscale[bi]), acc[i]);
                    acc_min[i] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(vm), _mm256_broadcast_ss(&dscale[8 + bi]), acc_min[i]);
                }
            }
        }
        hsum_ps(_mm256_add_ps(acc[0], acc[1])) - hsum_ps(_mm256_add_ps(acc_min[0], acc_min[1]))
    }
}

// ---------------------------------------------------------------------------------------------
// Tiles of rows x tokens
// ---------------------------------------------------------------------------------------------

/// A batch-invariant tile of products (see [`super::gemm_q8`], which checked the shapes):
/// `out[t * ldo + r] = row r · token t`.
///
/// Q4_K, Q5_K and Q6_K have tiled kernels at the AVX2 and AVX-512 levels (see `tiled`): each
/// super-block of 16 rows is unpacked once and used for every token of the call. Q3_K, Q2_K and
/// the scalar level (the reference) compute one [`dot_q8`] per pair. Either way an output does
/// not depend on the number of rows or tokens in the call, nor on its place in the tile, nor on
/// `layout` (the interleaved one is read without transposes; the scalar level restores rows).
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
    assert!(
        matches!(dtype, DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K),
        "{dtype} is not a K format"
    );
    assert!(nb.is_multiple_of(ACT_PER_SUPER), "{nb} activation blocks per token are not whole super-blocks");
    let interleaved = layout == Layout::Interleaved;
    if interleaved {
        super::check_interleaved(dtype, w.len(), nrows, nb);
    } else {
        let rb = nb / ACT_PER_SUPER * dtype.block_bytes();
        assert_eq!(w.len() / nrows, rb, "{dtype}: row and activation widths differ");
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(dtype, DType::Q4_K | DType::Q5_K | DType::Q6_K) {
        match level {
            // SAFETY (all three): `level` only names levels the CPU has (see `cpu`), VNNI was
            // checked; shapes and the layout's size were checked above and by `dot::gemm_q8`
            // (`out` is also indexed with bounds checks).
            SimdLevel::Avx512 if crate::cpu::has_avx512_vnni() => {
                return unsafe { tiled::gemm_avx512_vnni(dtype, w, nrows, interleaved, act, ntok, out, ldo) }
            }
            SimdLevel::Avx512 => {
                return unsafe { tiled::gemm_avx512(dtype, w, nrows, interleaved, act, ntok, out, ldo) }
            }
            SimdLevel::Avx2 if crate::cpu::has_avx_vnni() => {
                return unsafe { tiled::gemm_avx2_vnni(dtype, w, nrows, interleaved, act, ntok, out, ldo) }
            }
            SimdLevel::Avx2 => return unsafe { tiled::gemm_avx2(dtype, w, nrows, interleaved, act, ntok, out, ldo) },
            SimdLevel::Scalar => {}
        }
    }
    if interleaved {
        // The reference (and Q3_K/Q2_K, which have no interleaved kernels) restores the rows.
        let rows = super::deinterleave(dtype, nrows, nb * 32, w);
        return gemm(level, dtype, &rows, nrows, Layout::Rows, act, ntok, out, ldo);
    }
    super::gemm_q8_by_dots(level, dtype, w, nrows, act, ntok, out, ldo)
}

/// Tiled Q4_K / Q5_K / Q6_K products on x86-64.
///
/// **Layout.** Rows go 16 at a time (8 in AVX2's one-token kernels), one per 32-bit lane of a
/// *column*: one register at AVX-512, two at AVX2. For each super-block, the rows' packed quants
/// are transposed (16 x 16 dword transposes at AVX-512, 8 x 8 ones at AVX2: a dword of packed bytes
/// holds the same four weight positions in every row) and unpacked so that column
/// `8 * j + g` holds, in lane `i`, the four weights of row `i` that meet bytes `4g..4g + 4` of
/// Q8Block `j`. That costs a few operations per row and super-block, about what one row's
/// [`dot_q8`] spends unpacking, and is then reused by every token of the call (up to 64 at a
/// time).
///
/// **Products.** A token's four activation bytes, broadcast to all lanes, meet a column with one
/// `vpdpbusd` (VNNI) or `pmaddubsw` + `pmaddwd`: 16 rows advance at once and lane `i` ends with
/// row `i`'s exact integer sum for the Q8Block; nothing is reduced horizontally. Floats enter once
/// per (Q8Block, token) for all 16 rows: Q4_K/Q5_K add `cvt(Σ q·q_a)·(d·sc_j)·d_a − (dmin·m_j)·s_a`,
/// Q6_K `(cvt(Σ_lo)·(d·sc_lo) + cvt(Σ_hi)·(d·sc_hi))·d_a`, with the per-row factors `d·sc` (exact
/// products of an f16 and a 6- or 8-bit integer) prepared per super-block. Each token's
/// accumulator is one float vector; tokens run `TT` at a time (8 at AVX-512, 2 or 4 at AVX2) in a
/// register tile ([`Isa::dot_tile`]): each column is loaded once and meets the `TT` tokens'
/// broadcasts before the next, and at AVX2 one broadcast serves the column's two registers. With
/// VNNI and 16 tokens or more, Q6_K takes two row groups at a time, a broadcast serving both.
///
/// **Q6_K's −32.** `Σ q_a(q − 32)` per 16-weight half is computed one of two ways, chosen by the
/// number of tokens: with few, the columns hold `q` and each sum starts from `−32·Σ q_a`
/// (16 half sums per token and super-block); with many, the columns hold `q − 32` as signed bytes
/// and the activations are made unsigned (`q_a + 128`, one xor per 32), so `vpdpbusd` computes
/// `Σ (q_a + 128)(q − 32) = Σ q_a(q − 32) + 128·Σ(q − 32)`, whose second term depends only on
/// the row and is subtracted from where each sum starts. Both give the same exact integer.
///
/// **Batch invariance.** Every operation is lane-wise, and the float operations an output sees
/// (per super-block in order, per Q8Block in order: the same conversion, multiplies and FMAs on
/// the same values) do not depend on the tile's shape, the pair's place in it, the register tile
/// of tokens, or which rows share its row group. Integer sums are exact, so their order and
/// method are free.
#[cfg(target_arch = "x86_64")]
pub(crate) mod tiled {
    use std::arch::x86_64::*;

    use super::{DType, Q8Block, ACT_PER_SUPER};

    /// Rows per row group: one per 32-bit lane of a column.
    const ROWS: usize = 16;
    /// Tokens whose accumulators stay live while a super-block's unpacked weights are reused.
    const TOKENS: usize = 64;

    /// Columns at one instruction set: `I` holds `LANES` lanes of 32 bits (or 4 bytes each), `F`
    /// as many floats, lane `i` belonging to row `i` of the row group.
    ///
    /// The methods are `#[inline(always)]` without target features of their own: they are only
    /// called (inlined) from the `#[target_feature]` entry points below, which enable what each
    /// implementation uses.
    trait Isa {
        type I: Copy;
        type F: Copy;
        /// Rows per column (lanes of 32 bits); at most [`ROWS`].
        const LANES: usize;
        /// Whether a 16-column transpose fits in registers beside the products (the one-token
        /// kernels then unpack 16 columns at a time, else 8).
        const WIDE: bool;
        unsafe fn zero_i() -> Self::I;
        unsafe fn zero_f() -> Self::F;
        unsafe fn set1_i8(x: i8) -> Self::I;
        unsafe fn set1_i32(x: i32) -> Self::I;
        unsafe fn set1_f(x: f32) -> Self::F;
        /// 64 bytes.
        unsafe fn load(p: *const u8) -> Self::I;
        unsafe fn store(p: *mut u8, v: Self::I);
        unsafe fn loadf(p: *const f32) -> Self::F;
        unsafe fn storef(p: *mut f32, v: Self::F);
        unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn add_i8(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn sub_i8(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn sub_i32(a: Self::I, b: Self::I) -> Self::I;
        /// Logical shifts of 32-bit lanes (the count is a constant once inlined).
        unsafe fn srl(v: Self::I, n: u32) -> Self::I;
        unsafe fn sll(v: Self::I, n: u32) -> Self::I;
        /// Arithmetic right shift of 32-bit lanes.
        unsafe fn sra(v: Self::I, n: u32) -> Self::I;
        unsafe fn cvt(v: Self::I) -> Self::F;
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
        /// `a·b + c`, rounded once.
        unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
        /// `c − a·b`, rounded once.
        unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
        /// The f16 in the low (`lo`) or high half of each lane, as f32.
        unsafe fn f16_lo(v: Self::I) -> Self::F;
        unsafe fn f16_hi(v: Self::I) -> Self::F;
        /// 16 f16 values at `p`, as f32.
        unsafe fn f16_load(p: *const u16) -> Self::F;
        /// Σ of the four unsigned bytes of each lane.
        unsafe fn hsum_bytes(v: Self::I) -> Self::I;
        /// Whether [`Isa::nibble_dot8`] and [`Isa::q6k_dot8`] are this ISA's own: the one-token
        /// Q4_K and Q6_K walks then read the interleaved layout's columns through them instead
        /// of [`Isa::dot_cols`].
        const ASM_ONE_TOKEN: bool = false;
        /// Σ over the 8 columns at `p`, `p + 64`, ... (one Q8Block's, in the interleaved layout)
        /// of the products of their low nibbles (`HI`: high nibbles), unsigned, with the four
        /// signed bytes at `a + 4g` broadcast: the same sums as masking the columns and
        /// [`Isa::dot_cols`]`::<8, 8, false>` from zero.
        #[inline(always)]
        unsafe fn nibble_dot8<const HI: bool>(_p: *const u8, _a: *const u8) -> Self::I {
            unreachable!("only where ASM_ONE_TOKEN")
        }
        /// Q6_K's Q8Block `k` (0..4) of a 128-weight half: its 8 re-encoded columns
        /// ([`q6k_col`]) from the `ql` columns at `ql`, `ql + 64`, ... and the `qh` ones at `qh`,
        /// ..., times the four signed bytes at `a + 4g`: `(lo + Σ_{g<4}, hi + Σ_{g≥4})`, the sums
        /// of [`Isa::dot_cols`]`::<4, 2, false>` from `lo` and `hi`.
        #[inline(always)]
        unsafe fn q6k_dot8<const K: usize>(
            _ql: *const u8,
            _qh: *const u8,
            _a: *const u8,
            _lo: Self::I,
            _hi: Self::I,
        ) -> (Self::I, Self::I) {
            unreachable!("only where ASM_ONE_TOKEN")
        }
        /// `init + Σ_g` over `N` groups of (the four byte products of column `cols[g]` with the
        /// four bytes at `a + 4g`, broadcast): weights unsigned and activations signed,
        /// or the other way round with `FLIP`. The non-VNNI form sums `I16` groups of
        /// `pmaddubsw` pairs in i16 before widening; the caller picks `I16` so they cannot
        /// saturate.
        unsafe fn dot_cols<const N: usize, const I16: usize, const FLIP: bool>(
            init: Self::I,
            cols: &[Self::I; N],
            a: *const u8,
        ) -> Self::I;
        /// [`Isa::dot_cols`] for `TT` tokens and `G` row groups at once, with group `k`'s column
        /// `g` at `w[k] + 64g`, token `t` from `init[k][t]` with its bytes at `a[t]`: each column
        /// is loaded once and meets every token's broadcast before the next column, and each
        /// broadcast meets the `G` groups' columns, so a product costs one load (the broadcast)
        /// or, for two groups, half of one.
        #[inline(always)]
        unsafe fn dot_tile<const N: usize, const I16: usize, const TT: usize, const FLIP: bool, const G: usize>(
            init: [[Self::I; TT]; G],
            w: [*const u8; G],
            a: &[*const u8; TT],
        ) -> [[Self::I; TT]; G] {
            let mut sum = init;
            for g0 in (0..N).step_by(I16) {
                let mut s = [[Self::zero_i(); TT]; G];
                for g in g0..(g0 + I16).min(N) {
                    let wv: [Self::I; G] = std::array::from_fn(|k| Self::load(w[k].add(64 * g)));
                    for (t, &a) in a.iter().enumerate() {
                        // The same broadcast for every group (one load, as the loads are
                        // identical and nothing is stored between them).
                        for (s, &wv) in s.iter_mut().zip(&wv) {
                            s[t] = Self::dot_acc::<FLIP>(s[t], wv, a.add(4 * g));
                        }
                    }
                }
                for (sum, s) in sum.iter_mut().zip(s) {
                    for (sum, s) in sum.iter_mut().zip(s) {
                        *sum = Self::widen_add(*sum, s);
                    }
                }
            }
            sum
        }
        /// One group's products added to a partial sum: `s + wv · (the 4 bytes at a,
        /// broadcast)`, in i16 pairs (`pmaddubsw`) or, with VNNI, in i32; the weights are the
        /// unsigned operand, or the activations with `FLIP`.
        unsafe fn dot_acc<const FLIP: bool>(s: Self::I, wv: Self::I, a: *const u8) -> Self::I;
        /// `sum + s` with `s` from [`Isa::dot_acc`] widened to i32 where it is i16.
        unsafe fn widen_add(sum: Self::I, s: Self::I) -> Self::I;
        /// Column `c` = dword `c` (bytes `off + 4c..`) of each of the 16 rows: 64 bytes read per
        /// row. The 16 rows' loads go out together: issuing them row group by row group (8
        /// rows, then 8) measured up to 30% slower when decoding from memory, as the hardware
        /// prefetchers follow the interleaved streams less well.
        unsafe fn transpose(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 16];
        /// As [`Isa::transpose`] for 8 dwords (32 bytes read per row).
        unsafe fn transpose8(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 8];
        /// As [`Isa::transpose`] for 4 dwords (16 bytes read per row).
        unsafe fn gather4(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 4];
    }

    // --- AVX-512: one 512-bit register per column ----------------------------------------------

    /// AVX-512 F/BW columns; `VNNI` uses `vpdpbusd` for the byte products.
    struct Zmm<const VNNI: bool>;

    /// 16 x 16 dword transpose: `out[c]` lane `i` = `r[i]` dword `c` (also the attention
    /// kernel's key transpose).
    #[inline(always)]
    pub(crate) unsafe fn transpose_16x16(r: [__m512i; 16]) -> [__m512i; 16] {
        // Per 128-bit lane L, u[4q + m] = rows 4q..4q+4 at dword 4L + m.
        let mut u = [_mm512_setzero_si512(); 16];
        for q in 0..4 {
            let (r0, r1, r2, r3) = (r[4 * q], r[4 * q + 1], r[4 * q + 2], r[4 * q + 3]);
            let t0 = _mm512_unpacklo_epi32(r0, r1);
            let t1 = _mm512_unpackhi_epi32(r0, r1);
            let t2 = _mm512_unpacklo_epi32(r2, r3);
            let t3 = _mm512_unpackhi_epi32(r2, r3);
            u[4 * q] = _mm512_unpacklo_epi64(t0, t2);
            u[4 * q + 1] = _mm512_unpackhi_epi64(t0, t2);
            u[4 * q + 2] = _mm512_unpacklo_epi64(t1, t3);
            u[4 * q + 3] = _mm512_unpackhi_epi64(t1, t3);
        }
        // out[4L + m] = 128-bit lane L of u[m], u[4 + m], u[8 + m], u[12 + m].
        let mut out = [_mm512_setzero_si512(); 16];
        for m in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[m], u[4 + m]);
            let v1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[m], u[4 + m]);
            let v2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[8 + m], u[12 + m]);
            let v3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[8 + m], u[12 + m]);
            out[m] = _mm512_shuffle_i32x4::<0b10_00_10_00>(v0, v2);
            out[4 + m] = _mm512_shuffle_i32x4::<0b11_01_11_01>(v0, v2);
            out[8 + m] = _mm512_shuffle_i32x4::<0b10_00_10_00>(v1, v3);
            out[12 + m] = _mm512_shuffle_i32x4::<0b11_01_11_01>(v1, v3);
        }
        out
    }

    impl<const VNNI: bool> Isa for Zmm<VNNI> {
        type I = __m512i;
        type F = __m512;
        const LANES: usize = 16;
        const WIDE: bool = true;
        #[inline(always)]
        unsafe fn zero_i() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn zero_f() -> __m512 {
            _mm512_setzero_ps()
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
        unsafe fn set1_f(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const u8) -> __m512i {
            _mm512_loadu_si512(p as *const _)
        }
        #[inline(always)]
        unsafe fn store(p: *mut u8, v: __m512i) {
            _mm512_storeu_si512(p as *mut _, v)
        }
        #[inline(always)]
        unsafe fn loadf(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn storef(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
            _mm512_and_si512(a, b)
        }
        #[inline(always)]
        unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
            _mm512_or_si512(a, b)
        }
        #[inline(always)]
        unsafe fn add_i8(a: __m512i, b: __m512i) -> __m512i {
            _mm512_add_epi8(a, b)
        }
        #[inline(always)]
        unsafe fn sub_i8(a: __m512i, b: __m512i) -> __m512i {
            _mm512_sub_epi8(a, b)
        }
        #[inline(always)]
        unsafe fn sub_i32(a: __m512i, b: __m512i) -> __m512i {
            _mm512_sub_epi32(a, b)
        }
        #[inline(always)]
        unsafe fn srl(v: __m512i, n: u32) -> __m512i {
            _mm512_srlv_epi32(v, _mm512_set1_epi32(n as i32))
        }
        #[inline(always)]
        unsafe fn sll(v: __m512i, n: u32) -> __m512i {
            _mm512_sllv_epi32(v, _mm512_set1_epi32(n as i32))
        }
        #[inline(always)]
        unsafe fn sra(v: __m512i, n: u32) -> __m512i {
            _mm512_srav_epi32(v, _mm512_set1_epi32(n as i32))
        }
        #[inline(always)]
        unsafe fn cvt(v: __m512i) -> __m512 {
            _mm512_cvtepi32_ps(v)
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
        unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fnmadd_ps(a, b, c)
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
        unsafe fn f16_load(p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn hsum_bytes(v: __m512i) -> __m512i {
            if VNNI {
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_set1_epi8(1))
            } else {
                _mm512_madd_epi16(_mm512_maddubs_epi16(v, _mm512_set1_epi8(1)), _mm512_set1_epi16(1))
            }
        }
        #[inline(always)]
        unsafe fn dot_acc<const FLIP: bool>(s: __m512i, wv: __m512i, a: *const u8) -> __m512i {
            let av = _mm512_set1_epi32((a as *const i32).read_unaligned());
            let (u, v) = if FLIP { (av, wv) } else { (wv, av) };
            if VNNI {
                _mm512_dpbusd_epi32(s, u, v)
            } else {
                _mm512_add_epi16(s, _mm512_maddubs_epi16(u, v))
            }
        }
        #[inline(always)]
        unsafe fn widen_add(sum: __m512i, s: __m512i) -> __m512i {
            if VNNI {
                _mm512_add_epi32(sum, s)
            } else {
                _mm512_add_epi32(sum, _mm512_madd_epi16(s, _mm512_set1_epi16(1)))
            }
        }
        #[inline(always)]
        unsafe fn dot_cols<const N: usize, const I16: usize, const FLIP: bool>(
            init: __m512i,
            cols: &[__m512i; N],
            a: *const u8,
        ) -> __m512i {
            let av = |g: usize| _mm512_set1_epi32((a.add(4 * g) as *const i32).read_unaligned());
            if VNNI {
                let mut c = [init, _mm512_setzero_si512()];
                for (g, &wv) in cols.iter().enumerate() {
                    c[g % 2] = if FLIP {
                        _mm512_dpbusd_epi32(c[g % 2], av(g), wv)
                    } else {
                        _mm512_dpbusd_epi32(c[g % 2], wv, av(g))
                    };
                }
                _mm512_add_epi32(c[0], c[1])
            } else {
                let ones = _mm512_set1_epi16(1);
                let mut sum = init;
                for g0 in (0..N).step_by(I16) {
                    let mut s = _mm512_setzero_si512();
                    for (g, &wv) in cols.iter().enumerate().skip(g0).take(I16) {
                        let p = if FLIP { _mm512_maddubs_epi16(av(g), wv) } else { _mm512_maddubs_epi16(wv, av(g)) };
                        s = _mm512_add_epi16(s, p);
                    }
                    sum = _mm512_add_epi32(sum, _mm512_madd_epi16(s, ones));
                }
                sum
            }
        }
        #[inline(always)]
        unsafe fn transpose(rows: &[*const u8; ROWS], off: usize) -> [__m512i; 16] {
            transpose_16x16(std::array::from_fn(|i| _mm512_loadu_si512(rows[i].add(off) as *const _)))
        }
        #[inline(always)]
        unsafe fn transpose8(rows: &[*const u8; ROWS], off: usize) -> [__m512i; 8] {
            // The upper halves (zero) only reach columns 8..16, which are dropped.
            let t = transpose_16x16(std::array::from_fn(|i| {
                _mm512_zextsi256_si512(_mm256_loadu_si256(rows[i].add(off) as *const __m256i))
            }));
            std::array::from_fn(|c| t[c])
        }
        #[inline(always)]
        unsafe fn gather4(rows: &[*const u8; ROWS], off: usize) -> [__m512i; 4] {
            // x[i] holds rows i, 4 + i, 8 + i, 12 + i in its four 128-bit lanes; then a 4 x 4
            // transpose within each lane.
            let x: [__m512i; 4] = std::array::from_fn(|i| {
                let l = |k: usize| _mm_loadu_si128(rows[4 * k + i].add(off) as *const __m128i);
                let v = _mm512_castsi128_si512(l(0));
                let v = _mm512_inserti32x4::<1>(v, l(1));
                let v = _mm512_inserti32x4::<2>(v, l(2));
                _mm512_inserti32x4::<3>(v, l(3))
            });
            let t0 = _mm512_unpacklo_epi32(x[0], x[1]);
            let t1 = _mm512_unpackhi_epi32(x[0], x[1]);
            let t2 = _mm512_unpacklo_epi32(x[2], x[3]);
            let t3 = _mm512_unpackhi_epi32(x[2], x[3]);
            [
                _mm512_unpacklo_epi64(t0, t2),
                _mm512_unpackhi_epi64(t0, t2),
                _mm512_unpacklo_epi64(t1, t3),
                _mm512_unpackhi_epi64(t1, t3),
            ]
        }
    }

    // --- AVX2: one 256-bit register per column (8 rows) -------------------------------------

    /// 8 x 8 dword transpose of 32 bytes at `off` of rows `r[0..8]`: `out[c]` lane `i` = row `i`
    /// dword `c`.
    #[inline(always)]
    pub(crate) unsafe fn transpose_8x8(r: &[*const u8], off: usize) -> [__m256i; 8] {
        let r: [__m256i; 8] = std::array::from_fn(|i| _mm256_loadu_si256(r[i].add(off) as *const __m256i));
        // Per 128-bit lane L, u[4q + m] = rows 4q..4q+4 at dword 4L + m.
        let mut u = [_mm256_setzero_si256(); 8];
        for q in 0..2 {
            let (r0, r1, r2, r3) = (r[4 * q], r[4 * q + 1], r[4 * q + 2], r[4 * q + 3]);
            let t0 = _mm256_unpacklo_epi32(r0, r1);
            let t1 = _mm256_unpackhi_epi32(r0, r1);
            let t2 = _mm256_unpacklo_epi32(r2, r3);
            let t3 = _mm256_unpackhi_epi32(r2, r3);
            u[4 * q] = _mm256_unpacklo_epi64(t0, t2);
            u[4 * q + 1] = _mm256_unpackhi_epi64(t0, t2);
            u[4 * q + 2] = _mm256_unpacklo_epi64(t1, t3);
            u[4 * q + 3] = _mm256_unpackhi_epi64(t1, t3);
        }
        let mut out = [_mm256_setzero_si256(); 8];
        for m in 0..4 {
            out[m] = _mm256_permute2x128_si256::<0x20>(u[m], u[4 + m]);
            out[4 + m] = _mm256_permute2x128_si256::<0x31>(u[m], u[4 + m]);
        }
        out
    }

    /// 4 x 8 dword transpose of 16 bytes at `off` of rows `r[0..8]`.
    #[inline(always)]
    unsafe fn gather4_8(r: &[*const u8], off: usize) -> [__m256i; 4] {
        // x[i] holds rows i and 4 + i in its two 128-bit lanes; then a 4 x 4 transpose within
        // each lane.
        let x: [__m256i; 4] = std::array::from_fn(|i| {
            let l = |k: usize| _mm_loadu_si128(r[4 * k + i].add(off) as *const __m128i);
            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(l(0)), l(1))
        });
        let t0 = _mm256_unpacklo_epi32(x[0], x[1]);
        let t1 = _mm256_unpackhi_epi32(x[0], x[1]);
        let t2 = _mm256_unpacklo_epi32(x[2], x[3]);
        let t3 = _mm256_unpackhi_epi32(x[2], x[3]);
        [
            _mm256_unpacklo_epi64(t0, t2),
            _mm256_unpackhi_epi64(t0, t2),
            _mm256_unpacklo_epi64(t1, t3),
            _mm256_unpackhi_epi64(t1, t3),
        ]
    }

    /// The low 16 bits of each lane of `v` (at most 0xFFFF), packed and converted from f16.
    #[inline(always)]
    unsafe fn f16_of_low_words(v: __m256i) -> __m256 {
        _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)))
    }

    // --- AVX2: two 256-bit registers per column (rows 0..8, 8..16) -----------------------------

    /// Columns of 16 rows in two registers, for tiles of many tokens: with register tiles of
    /// 2 tokens (Q6_K: 4), a broadcast serves two products and a column load two tokens. Q4_K
    /// tiles of 64 tokens at 1024-3072 columns measured 15% fewer ns per pair than 8-row columns
    /// with one token per pass (and 4% fewer than 8-row columns in 4-token register tiles); 4
    /// tokens here spill (8 i16 sums beside 8 float accumulators).
    struct Ymm<const VNNI: bool>;
    /// `[Ymm8::f(a[0], b[0], ..), Ymm8::f(a[1], b[1], ..)]`: an operation of [`Ymm8`] on each half
    /// of a two-register column.
    macro_rules! halves {
        ($f:ident($($a:expr),*)) => {
            [Ymm8::<VNNI>::$f($($a[0]),*), Ymm8::<VNNI>::$f($($a[1]),*)]
        };
    }

    /// Two [`Ymm8`] columns side by side (rows 0..8, 8..16): every operation is Ymm8's on each
    /// half, and a broadcast activation serves both.
    impl<const VNNI: bool> Isa for Ymm<VNNI> {
        type I = [__m256i; 2];
        type F = [__m256; 2];
        const LANES: usize = 16;
        const WIDE: bool = false;
        #[inline(always)]
        unsafe fn zero_i() -> Self::I {
            [Ymm8::<VNNI>::zero_i(); 2]
        }
        #[inline(always)]
        unsafe fn zero_f() -> Self::F {
            [Ymm8::<VNNI>::zero_f(); 2]
        }
        #[inline(always)]
        unsafe fn set1_i8(x: i8) -> Self::I {
            [Ymm8::<VNNI>::set1_i8(x); 2]
        }
        #[inline(always)]
        unsafe fn set1_i32(x: i32) -> Self::I {
            [Ymm8::<VNNI>::set1_i32(x); 2]
        }
        #[inline(always)]
        unsafe fn set1_f(x: f32) -> Self::F {
            [Ymm8::<VNNI>::set1_f(x); 2]
        }
        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self::I {
            [Ymm8::<VNNI>::load(p), Ymm8::<VNNI>::load(p.add(32))]
        }
        #[inline(always)]
        unsafe fn store(p: *mut u8, v: Self::I) {
            Ymm8::<VNNI>::store(p, v[0]);
            Ymm8::<VNNI>::store(p.add(32), v[1]);
        }
        #[inline(always)]
        unsafe fn loadf(p: *const f32) -> Self::F {
            [Ymm8::<VNNI>::loadf(p), Ymm8::<VNNI>::loadf(p.add(8))]
        }
        #[inline(always)]
        unsafe fn storef(p: *mut f32, v: Self::F) {
            Ymm8::<VNNI>::storef(p, v[0]);
            Ymm8::<VNNI>::storef(p.add(8), v[1]);
        }
        #[inline(always)]
        unsafe fn and(a: Self::I, b: Self::I) -> Self::I {
            halves!(and(a, b))
        }
        #[inline(always)]
        unsafe fn or(a: Self::I, b: Self::I) -> Self::I {
            halves!(or(a, b))
        }
        #[inline(always)]
        unsafe fn add_i8(a: Self::I, b: Self::I) -> Self::I {
            halves!(add_i8(a, b))
        }
        #[inline(always)]
        unsafe fn sub_i8(a: Self::I, b: Self::I) -> Self::I {
            halves!(sub_i8(a, b))
        }
        #[inline(always)]
        unsafe fn sub_i32(a: Self::I, b: Self::I) -> Self::I {
            halves!(sub_i32(a, b))
        }
        #[inline(always)]
        unsafe fn srl(v: Self::I, n: u32) -> Self::I {
            [Ymm8::<VNNI>::srl(v[0], n), Ymm8::<VNNI>::srl(v[1], n)]
        }
        #[inline(always)]
        unsafe fn sll(v: Self::I, n: u32) -> Self::I {
            [Ymm8::<VNNI>::sll(v[0], n), Ymm8::<VNNI>::sll(v[1], n)]
        }
        #[inline(always)]
        unsafe fn sra(v: Self::I, n: u32) -> Self::I {
            [Ymm8::<VNNI>::sra(v[0], n), Ymm8::<VNNI>::sra(v[1], n)]
        }
        #[inline(always)]
        unsafe fn cvt(v: Self::I) -> Self::F {
            halves!(cvt(v))
        }
        #[inline(always)]
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F {
            halves!(mul(a, b))
        }
        #[inline(always)]
        unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            halves!(fma(a, b, c))
        }
        #[inline(always)]
        unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            halves!(fnmadd(a, b, c))
        }
        #[inline(always)]
        unsafe fn f16_lo(v: Self::I) -> Self::F {
            halves!(f16_lo(v))
        }
        #[inline(always)]
        unsafe fn f16_hi(v: Self::I) -> Self::F {
            halves!(f16_hi(v))
        }
        #[inline(always)]
        unsafe fn f16_load(p: *const u16) -> Self::F {
            [Ymm8::<VNNI>::f16_load(p), Ymm8::<VNNI>::f16_load(p.add(8))]
        }
        #[inline(always)]
        unsafe fn hsum_bytes(v: Self::I) -> Self::I {
            halves!(hsum_bytes(v))
        }
        #[inline(always)]
        unsafe fn dot_acc<const FLIP: bool>(s: Self::I, wv: Self::I, a: *const u8) -> Self::I {
            // One broadcast for both halves.
            let av = _mm256_set1_epi32((a as *const i32).read_unaligned());
            [Ymm8::<VNNI>::mac::<FLIP>(s[0], wv[0], av), Ymm8::<VNNI>::mac::<FLIP>(s[1], wv[1], av)]
        }
        #[inline(always)]
        unsafe fn widen_add(sum: Self::I, s: Self::I) -> Self::I {
            halves!(widen_add(sum, s))
        }
        #[inline(always)]
        unsafe fn dot_cols<const N: usize, const I16: usize, const FLIP: bool>(
            init: Self::I,
            cols: &[Self::I; N],
            a: *const u8,
        ) -> Self::I {
            let mut out = init;
            for (h, o) in out.iter_mut().enumerate() {
                let half: [__m256i; N] = std::array::from_fn(|g| cols[g][h]);
                *o = Ymm8::<VNNI>::dot_cols::<N, I16, FLIP>(init[h], &half, a);
            }
            out
        }
        #[inline(always)]
        unsafe fn transpose(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 16] {
            let mut out = [Self::zero_i(); 16];
            for d in 0..2 {
                for h in 0..2 {
                    for (c, v) in transpose_8x8(&rows[8 * h..], off + 32 * d).into_iter().enumerate() {
                        out[8 * d + c][h] = v;
                    }
                }
            }
            out
        }
        #[inline(always)]
        unsafe fn transpose8(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 8] {
            let (a, b) = (transpose_8x8(&rows[..8], off), transpose_8x8(&rows[8..], off));
            std::array::from_fn(|c| [a[c], b[c]])
        }
        #[inline(always)]
        unsafe fn gather4(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 4] {
            let (a, b) = (gather4_8(&rows[..8], off), gather4_8(&rows[8..], off));
            std::array::from_fn(|c| [a[c], b[c]])
        }
    }

    /// The high nibbles' shift of both columns of a [`nibble_pair`] (`true`), or nothing.
    macro_rules! nibble_shift {
        (false) => {
            ""
        };
        (true) => {
            "vpsrlw {t0}, {t0}, 4\nvpsrlw {t1}, {t1}, 4\n"
        };
    }

    /// Two columns of [`nibble_dot8_avx2`]'s template (bytes `$c0`, `$c1` of `{p}`, masked from
    /// memory, shifted down for the high nibbles; activation bytes `$a0`, `$a1` of `{a}`),
    /// multiplied and added to the i16 sum `{acc}` (which the first pair starts).
    macro_rules! nibble_pair {
        ($hi:tt, $first:tt, $c0:literal, $c1:literal, $a0:literal, $a1:literal) => {
            concat!(
                "vpand {t0}, {m}, ymmword ptr [{p} + ", $c0, "]\n",
                "vpand {t1}, {m}, ymmword ptr [{p} + ", $c1, "]\n",
                nibble_shift!($hi),
                "vpbroadcastd {b0}, dword ptr [{a} + ", $a0, "]\n",
                "vpbroadcastd {b1}, dword ptr [{a} + ", $a1, "]\n",
                nibble_pair!(@sum $first),
                "vpaddw {acc}, {acc}, {t1}\n",
            )
        };
        (@sum true) => {
            "vpmaddubsw {acc}, {t0}, {b0}\nvpmaddubsw {t1}, {t1}, {b1}\n"
        };
        (@sum false) => {
            "vpmaddubsw {t0}, {t0}, {b0}\nvpmaddubsw {t1}, {t1}, {b1}\nvpaddw {acc}, {acc}, {t0}\n"
        };
    }

    /// [`nibble_dot8_avx2`]'s assembly for the low (`false`) or high nibbles.
    macro_rules! nibble_asm {
        ($hi:tt, $p:expr, $a:expr, $mask:expr, $ones:expr, $out:ident) => {
            std::arch::asm!(
                nibble_pair!($hi, true, "0", "64", "0", "4"),
                nibble_pair!($hi, false, "128", "192", "8", "12"),
                nibble_pair!($hi, false, "256", "320", "16", "20"),
                nibble_pair!($hi, false, "384", "448", "24", "28"),
                "vpmaddwd {acc}, {acc}, {ones}",
                p = in(reg) $p,
                a = in(reg) $a,
                m = in(ymm_reg) $mask,
                ones = in(ymm_reg) $ones,
                acc = out(ymm_reg) $out,
                t0 = out(ymm_reg) _,
                t1 = out(ymm_reg) _,
                b0 = out(ymm_reg) _,
                b1 = out(ymm_reg) _,
                options(pure, readonly, nostack, preserves_flags),
            )
        };
    }

    /// [`Isa::nibble_dot8`] at AVX2 without VNNI, in assembly: each column is masked (and
    /// shifted) straight from memory, multiplied and added in i16 as it comes, so the walk holds
    /// 7 registers where the intrinsics held the 8 columns, the mask and the header's factors
    /// in AVX2's 16 and spilled (186 stack accesses a super-block of 16 rows, beside 128
    /// `pmaddubsw`; 109 now, around the float steps), or, with the columns and the mask hidden
    /// from LLVM to stop that, went through the stack for them. The i16 sums cannot wrap: 8
    /// columns of pairs of at most 15·128 each. Zen 5 at `PIO_SIMD=avx2`, binaries before and
    /// after alternated: the products of a Qwen3-0.6B-shaped Q4_K_M decode step alone
    /// (`decode_products 1 20`) 24.8 / 25.9 / 25.3 -> 28.4 / 29.0 / 28.7 GB/s on one thread (2
    /// threads, memory-bound: 41.8-43.3 -> 42.8-43.9); whole decode on one thread (`pio bench
    /// --threads 1 --gen-tokens 64`) Qwen3-0.6B-shaped Q4_K_M 65.8 / 60.9 / 64.3 -> 69.3 / 70.5
    /// / 68.0 tok/s, Qwen3-4B-shaped 10.6 / 10.9 / 10.4 -> 11.5 / 11.7 / 11.7.
    ///
    /// # Safety
    /// The CPU has AVX2; the 32 bytes at `p + 64c` (c < 8) and the 32 at `a` are readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn nibble_dot8_avx2<const HI: bool>(p: *const u8, a: *const u8) -> __m256i {
        // The low nibbles masked, the high ones masked and shifted (as 16-bit lanes: the masks
        // keep bits from crossing bytes), straight from memory (VEX has no memory form of a
        // shift by an immediate; EVEX's needs AVX-512). Two columns at a time: mask (shift)
        // both, broadcast both activations, multiply both, add both to the i16 sum.
        let mask = _mm256_set1_epi8(if HI { 0xF0u8 as i8 } else { 0x0F });
        let ones = _mm256_set1_epi16(1);
        let out: __m256i;
        if HI {
            nibble_asm!(true, p, a, mask, ones, out);
        } else {
            nibble_asm!(false, p, a, mask, ones, out);
        }
        out
    }

    /// One column of [`q6k_dot8_avx2`]'s template for Q8Block `K` (`k01`, `k2`, `k3`): built
    /// into `$x` (with `$y` for `K` >= 2) from the dwords at byte `$off` of `{ql}` and `{qh}`.
    macro_rules! q6k_col {
        (k01, $x:literal, $y:literal, $off:literal) => {
            concat!("vpand {", $x, "}, {ma}, ymmword ptr [{ql} + ", $off, "]\n")
        };
        (k2, $x:literal, $y:literal, $off:literal) => {
            concat!("vpand {", $x, "}, {ma}, ymmword ptr [{qh} + ", $off, "]\n", q6k_col!(@top, $x, $y, $off))
        };
        (k3, $x:literal, $y:literal, $off:literal) => {
            concat!(
                "vpand {", $x, "}, {ma}, ymmword ptr [{qh} + ", $off, "]\n",
                "vpsrld {", $x, "}, {", $x, "}, 4\n",
                q6k_col!(@top, $x, $y, $off),
            )
        };
        // The top two bits, `(ql & 0xC0) >> 2`, or'ed in.
        (@top, $x:literal, $y:literal, $off:literal) => {
            concat!(
                "vpand {", $y, "}, {mb}, ymmword ptr [{ql} + ", $off, "]\n",
                "vpsrld {", $y, "}, {", $y, "}, 2\n",
                "vpor {", $x, "}, {", $x, "}, {", $y, "}\n",
            )
        };
    }

    /// Two columns of [`q6k_dot8_avx2`]'s template (bytes `$c0`, `$c1`, activation bytes `$a0`,
    /// `$a1` of `{a}`): multiplied, summed in i16, widened and added to `{$acc}`.
    macro_rules! q6k_pair {
        ($k:tt, $acc:literal, $c0:literal, $c1:literal, $a0:literal, $a1:literal) => {
            concat!(
                q6k_col!($k, "x0", "y0", $c0),
                q6k_col!($k, "x1", "y1", $c1),
                "vpbroadcastd {b0}, dword ptr [{a} + ",
                $a0,
                "]\n",
                "vpbroadcastd {b1}, dword ptr [{a} + ",
                $a1,
                "]\n",
                "vpmaddubsw {x0}, {x0}, {b0}\n",
                "vpmaddubsw {x1}, {x1}, {b1}\n",
                "vpaddw {x0}, {x0}, {x1}\n",
                "vpmaddwd {x0}, {x0}, {ones}\n",
                "vpaddd {",
                $acc,
                "}, {",
                $acc,
                "}, {x0}\n",
            )
        };
    }

    /// [`q6k_dot8_avx2`]'s assembly for one kind of Q8Block (`k01`, `k2`, `k3`).
    macro_rules! q6k_asm {
        ($k:tt, $ql:expr, $qh:expr, $a:expr, $ma:expr, $mb:expr, $ones:expr, $lo:ident, $hi:ident) => {
            std::arch::asm!(
                // Every operand is named in every template (`ql` alone leaves these out).
                "/* {qh} {mb} {y0} {y1} */",
                q6k_pair!($k, "lo", "0", "64", "0", "4"),
                q6k_pair!($k, "lo", "128", "192", "8", "12"),
                q6k_pair!($k, "hi", "256", "320", "16", "20"),
                q6k_pair!($k, "hi", "384", "448", "24", "28"),
                ql = in(reg) $ql,
                qh = in(reg) $qh,
                a = in(reg) $a,
                ma = in(ymm_reg) $ma,
                mb = in(ymm_reg) $mb,
                ones = in(ymm_reg) $ones,
                lo = inout(ymm_reg) $lo,
                hi = inout(ymm_reg) $hi,
                x0 = out(ymm_reg) _,
                x1 = out(ymm_reg) _,
                y0 = out(ymm_reg) _,
                y1 = out(ymm_reg) _,
                b0 = out(ymm_reg) _,
                b1 = out(ymm_reg) _,
                options(pure, readonly, nostack, preserves_flags),
            )
        };
    }

    /// [`Isa::q6k_dot8`] at AVX2 without VNNI, in assembly, for the reason of
    /// [`nibble_dot8_avx2`] (the intrinsics' walk went to the stack about 270 times a
    /// super-block of 16 rows). Each column is built from memory: `ql & 0x3F` for `K` < 2,
    /// else the nibble of `qh` (`qh & 0x0F`, or `(qh & 0xF0) >> 4`) or'ed with `(ql & 0xC0) >>
    /// 2` (each mask first, so no bit crosses a byte in the 32-bit shifts). Two columns' products
    /// (at most 2·63·128 each) are summed in i16, then widened. Zen 5 at `PIO_SIMD=avx2`, one
    /// thread, alternated with the build before: the Q6_K LM head of `decode_products 1 12`
    /// 29.4 / 29.1 / 27.3 -> 32.4 / 31.5 / 31.3 GB/s; whole decode (`pio bench --threads 1
    /// --gen-tokens 64`) Qwen3-0.6B-shaped Q4_K_M 67.6 / 68.8 / 69.9 -> 70.2 / 72.9 / 77.0 tok/s,
    /// Qwen3-4B-shaped (Q6_K for the LM head, `attn_v` and half the `ffn_down`) 11.0 / 11.3 /
    /// 11.8 -> 12.6 / 13.0 / 13.0.
    ///
    /// # Safety
    /// The CPU has AVX2; the 32 bytes at `ql + 64c` (c < 8), at `qh + 64c` where `K` >= 2, and
    /// at `a` are readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn q6k_dot8_avx2<const K: usize>(
        ql: *const u8,
        qh: *const u8,
        a: *const u8,
        lo: __m256i,
        hi: __m256i,
    ) -> (__m256i, __m256i) {
        let (ma, mb) = match K {
            0 | 1 => (0x3F, 0),
            2 => (0x0F, 0xC0u8 as i8),
            _ => (0xF0u8 as i8, 0xC0u8 as i8),
        };
        let (ma, mb, ones) = (_mm256_set1_epi8(ma), _mm256_set1_epi8(mb), _mm256_set1_epi16(1));
        let (mut lo, mut hi) = (lo, hi);
        match K {
            0 | 1 => q6k_asm!(k01, ql, qh, a, ma, mb, ones, lo, hi),
            2 => q6k_asm!(k2, ql, qh, a, ma, mb, ones, lo, hi),
            _ => q6k_asm!(k3, ql, qh, a, ma, mb, ones, lo, hi),
        }
        (lo, hi)
    }

    /// Columns of 8 rows in one register (a 16-row group is two of them), for the one-token
    /// kernels, which unpack and multiply in registers, where 16-row columns would need 32
    /// registers for a 16-dword transpose (AVX2 has 16).
    struct Ymm8<const VNNI: bool>;

    impl<const VNNI: bool> Ymm8<VNNI> {
        /// `s` plus the byte products of `wv` with `av` (weights unsigned and activations signed,
        /// or the other way round with `FLIP`): in i32 with VNNI, else as `pmaddubsw` i16 pairs.
        #[inline(always)]
        unsafe fn mac<const FLIP: bool>(s: __m256i, wv: __m256i, av: __m256i) -> __m256i {
            let (u, v) = if FLIP { (av, wv) } else { (wv, av) };
            if VNNI {
                _mm256_dpbusd_avx_epi32(s, u, v)
            } else {
                _mm256_add_epi16(s, _mm256_maddubs_epi16(u, v))
            }
        }
    }

    impl<const VNNI: bool> Isa for Ymm8<VNNI> {
        type I = __m256i;
        type F = __m256;
        const LANES: usize = 8;
        const WIDE: bool = false;
        #[inline(always)]
        unsafe fn zero_i() -> Self::I {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn zero_f() -> Self::F {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn set1_i8(x: i8) -> Self::I {
            _mm256_set1_epi8(x)
        }
        #[inline(always)]
        unsafe fn set1_i32(x: i32) -> Self::I {
            _mm256_set1_epi32(x)
        }
        #[inline(always)]
        unsafe fn set1_f(x: f32) -> Self::F {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self::I {
            _mm256_loadu_si256(p as *const __m256i)
        }
        #[inline(always)]
        unsafe fn store(p: *mut u8, v: Self::I) {
            _mm256_storeu_si256(p as *mut __m256i, v)
        }
        #[inline(always)]
        unsafe fn loadf(p: *const f32) -> Self::F {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn storef(p: *mut f32, v: Self::F) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn and(a: Self::I, b: Self::I) -> Self::I {
            _mm256_and_si256(a, b)
        }
        #[inline(always)]
        unsafe fn or(a: Self::I, b: Self::I) -> Self::I {
            _mm256_or_si256(a, b)
        }
        #[inline(always)]
        unsafe fn add_i8(a: Self::I, b: Self::I) -> Self::I {
            _mm256_add_epi8(a, b)
        }
        #[inline(always)]
        unsafe fn sub_i8(a: Self::I, b: Self::I) -> Self::I {
            _mm256_sub_epi8(a, b)
        }
        #[inline(always)]
        unsafe fn sub_i32(a: Self::I, b: Self::I) -> Self::I {
            _mm256_sub_epi32(a, b)
        }
        #[inline(always)]
        unsafe fn srl(v: Self::I, n: u32) -> Self::I {
            _mm256_srlv_epi32(v, _mm256_set1_epi32(n as i32))
        }
        #[inline(always)]
        unsafe fn sll(v: Self::I, n: u32) -> Self::I {
            _mm256_sllv_epi32(v, _mm256_set1_epi32(n as i32))
        }
        #[inline(always)]
        unsafe fn sra(v: Self::I, n: u32) -> Self::I {
            _mm256_srav_epi32(v, _mm256_set1_epi32(n as i32))
        }
        #[inline(always)]
        unsafe fn cvt(v: Self::I) -> Self::F {
            _mm256_cvtepi32_ps(v)
        }
        #[inline(always)]
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            _mm256_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn f16_lo(v: Self::I) -> Self::F {
            f16_of_low_words(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)))
        }
        #[inline(always)]
        unsafe fn f16_hi(v: Self::I) -> Self::F {
            f16_of_low_words(_mm256_srli_epi32::<16>(v))
        }
        #[inline(always)]
        unsafe fn f16_load(p: *const u16) -> Self::F {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn hsum_bytes(v: Self::I) -> Self::I {
            if VNNI {
                _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), v, _mm256_set1_epi8(1))
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(v, _mm256_set1_epi8(1)), _mm256_set1_epi16(1))
            }
        }
        #[inline(always)]
        unsafe fn dot_acc<const FLIP: bool>(s: Self::I, wv: Self::I, a: *const u8) -> Self::I {
            Self::mac::<FLIP>(s, wv, _mm256_set1_epi32((a as *const i32).read_unaligned()))
        }
        #[inline(always)]
        unsafe fn widen_add(sum: Self::I, s: Self::I) -> Self::I {
            if VNNI {
                _mm256_add_epi32(sum, s)
            } else {
                _mm256_add_epi32(sum, _mm256_madd_epi16(s, _mm256_set1_epi16(1)))
            }
        }
        const ASM_ONE_TOKEN: bool = !VNNI;
        #[inline(always)]
        unsafe fn nibble_dot8<const HI: bool>(p: *const u8, a: *const u8) -> Self::I {
            nibble_dot8_avx2::<HI>(p, a)
        }
        #[inline(always)]
        unsafe fn q6k_dot8<const K: usize>(
            ql: *const u8,
            qh: *const u8,
            a: *const u8,
            lo: Self::I,
            hi: Self::I,
        ) -> (Self::I, Self::I) {
            q6k_dot8_avx2::<K>(ql, qh, a, lo, hi)
        }
        #[inline(always)]
        unsafe fn dot_cols<const N: usize, const I16: usize, const FLIP: bool>(
            init: Self::I,
            cols: &[Self::I; N],
            a: *const u8,
        ) -> Self::I {
            let av = |g: usize| _mm256_set1_epi32((a.add(4 * g) as *const i32).read_unaligned());
            if VNNI {
                // Two chains, so consecutive `vpdpbusd`s do not wait on each other.
                let mut c = [init, _mm256_setzero_si256()];
                for (g, &wv) in cols.iter().enumerate() {
                    c[g % 2] = Self::mac::<FLIP>(c[g % 2], wv, av(g));
                }
                return _mm256_add_epi32(c[0], c[1]);
            }
            let mut sum = init;
            for g0 in (0..N).step_by(I16) {
                let mut s = _mm256_setzero_si256();
                for (g, &wv) in cols.iter().enumerate().skip(g0).take(I16) {
                    s = Self::mac::<FLIP>(s, wv, av(g));
                }
                sum = Self::widen_add(sum, s);
            }
            sum
        }
        #[inline(always)]
        unsafe fn transpose(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 16] {
            let (a, b) = (transpose_8x8(&rows[..8], off), transpose_8x8(&rows[..8], off + 32));
            std::array::from_fn(|c| if c < 8 { a[c] } else { b[c - 8] })
        }
        #[inline(always)]
        unsafe fn transpose8(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 8] {
            transpose_8x8(&rows[..8], off)
        }
        #[inline(always)]
        unsafe fn gather4(rows: &[*const u8; ROWS], off: usize) -> [Self::I; 4] {
            gather4_8(&rows[..8], off)
        }
    }

    // --- Where a row group's super-block comes from -------------------------------------------

    /// One super-block of a row group as the unpacking reads it: dwords of the stored block, one
    /// row per lane, by byte offset `off` (a multiple of 4) within the block.
    trait Src: Copy {
        /// Whether loading the same columns again is cheap (plain loads, no transpose).
        const RELOAD: bool;
        /// Whether Q6_K's quants are re-encoded ([`super::recode_q6k`]: the interleaved layout)
        /// rather than GGML's.
        const RECODED: bool;
        /// The same block through a pointer the compiler cannot see through, so its loads are
        /// issued again rather than merged with earlier ones (where [`Src::RELOAD`]).
        fn opaque(self) -> Self;
        /// Dwords `off / 4 ..+ 16`.
        unsafe fn cols16<S: Isa>(self, off: usize) -> [S::I; 16];
        /// Dwords `off / 4 ..+ 8`.
        unsafe fn cols8<S: Isa>(self, off: usize) -> [S::I; 8];
        /// Dwords `off / 4 ..+ 4`.
        unsafe fn cols4<S: Isa>(self, off: usize) -> [S::I; 4];
        /// The f16 at byte `off` of each row (the low half of its dword), as f32.
        unsafe fn f16<S: Isa>(self, off: usize) -> S::F;
        /// Where [`Src::RELOAD`]: the first of the columns of dwords `off / 4 ..` (64 bytes apart).
        unsafe fn col_ptr<S: Isa>(self, _off: usize) -> *const u8 {
            unreachable!("columns in memory only where RELOAD")
        }
    }

    /// Rows in GGML's layout, each through its own pointer, transposed on the fly.
    #[derive(Clone, Copy)]
    struct RowPtrs([*const u8; ROWS]);

    impl Src for RowPtrs {
        const RELOAD: bool = false;
        const RECODED: bool = false;
        #[inline(always)]
        fn opaque(self) -> Self {
            self
        }
        #[inline(always)]
        unsafe fn cols16<S: Isa>(self, off: usize) -> [S::I; 16] {
            S::transpose(&self.0, off)
        }
        #[inline(always)]
        unsafe fn cols8<S: Isa>(self, off: usize) -> [S::I; 8] {
            S::transpose8(&self.0, off)
        }
        #[inline(always)]
        unsafe fn cols4<S: Isa>(self, off: usize) -> [S::I; 4] {
            S::gather4(&self.0, off)
        }
        #[inline(always)]
        unsafe fn f16<S: Isa>(self, off: usize) -> S::F {
            let mut bits = [0u16; ROWS];
            for (b, p) in bits.iter_mut().zip(self.0) {
                *b = (p.add(off) as *const u16).read_unaligned();
            }
            S::f16_load(bits.as_ptr())
        }
    }

    /// A block of the interleaved layout (see [`super::interleave`]): dword `c` of the 16 rows
    /// is the 64 bytes at `64c` (from the block's start), so columns are plain loads; Q6_K's
    /// `d` follows as 16 f16 side by side. `lane`: the first row this ISA's lanes take (8 for
    /// rows 8..16 of an 8-lane ISA).
    #[derive(Clone, Copy)]
    struct Packed {
        block: *const u8,
        lane: usize,
    }

    impl Packed {
        #[inline(always)]
        unsafe fn cols<S: Isa, const N: usize>(self, off: usize) -> [S::I; N] {
            let mut out = [S::zero_i(); N];
            for (c, o) in out.iter_mut().enumerate() {
                *o = S::load(self.block.add(ROWS * off + 64 * c + 4 * self.lane));
            }
            out
        }
    }

    impl Src for Packed {
        const RELOAD: bool = true;
        const RECODED: bool = true;
        #[inline(always)]
        fn opaque(self) -> Self {
            Packed { block: std::hint::black_box(self.block), lane: self.lane }
        }
        #[inline(always)]
        unsafe fn cols16<S: Isa>(self, off: usize) -> [S::I; 16] {
            self.cols::<S, 16>(off)
        }
        #[inline(always)]
        unsafe fn cols8<S: Isa>(self, off: usize) -> [S::I; 8] {
            self.cols::<S, 8>(off)
        }
        #[inline(always)]
        unsafe fn cols4<S: Isa>(self, off: usize) -> [S::I; 4] {
            self.cols::<S, 4>(off)
        }
        #[inline(always)]
        unsafe fn f16<S: Isa>(self, off: usize) -> S::F {
            S::f16_load((self.block.add(ROWS * off) as *const u16).add(self.lane))
        }
        #[inline(always)]
        unsafe fn col_ptr<S: Isa>(self, off: usize) -> *const u8 {
            self.block.add(ROWS * off + 4 * self.lane)
        }
    }

    /// A matrix of `nrows` rows, by row group and super-block.
    trait Mat: Copy {
        type Src: Src;
        /// Whether the one-token kernels walk 16-row groups whole when their ISA has fewer lanes.
        const GROUPED: bool;
        /// Super-block `s` of rows `r0..r0 + LANES` (`live` of them real; the other lanes
        /// compute something that is dropped).
        unsafe fn block(self, r0: usize, live: usize, s: usize) -> Self::Src;
        /// The memory the one-token walk reads a little later, to ask for early while it reads
        /// super-block `s` of the `step` rows from `r0` (start and bytes): the hardware follows a
        /// single interleaved stream, or rows of a few super-blocks (experts), too shallowly to
        /// keep the memory busy.
        unsafe fn ahead(self, r0: usize, step: usize, s: usize) -> (*const u8, usize);
    }

    /// Prefetches a region a few lines at a time with hint `H`, spread over a super-block's
    /// products (a prefetch never faults, wherever it points).
    ///
    /// The hint `H`: the many-token tiles ask into L2, whose blocks every token tile reads again.
    /// The one-token walk asks non-temporally (`_MM_HINT_NTA`, into L1 and past the other
    /// levels) on AMD's cores and into L2 on Intel's ([`crate::cpu::one_token_prefetch_nta`]).
    /// On Sapphire Rapids, to L2 rather than L1: a burst of L1 prefetches waits on the few L1
    /// fill buffers (to L2, Qwen3-4B-shaped Q4_K_M decoded 7.07 -> 7.21 tok/s at AVX2 and 8.74
    /// -> 9.31 at AVX-512). On Zen 5, non-temporal rather than to L2: the products of a
    /// Qwen3-4B-shaped decode step alone (`PIO_BENCH_SHAPE=qwen3-4b decode_products 2 6`, AVX2,
    /// runs alternated with the build before, probe 52 GB/s) streamed 42.4 -> 46.2 GB/s
    /// (medians of 4); alternated pass by pass in one process, `_MM_HINT_T0` read as fast as
    /// NTA (it is L1 that counts); whole decode (`scripts/bench-ab.sh --rounds 6`, against the build before, medians of
    /// runs below / above 65 GB/s): Qwen3-4B-shaped Q4_K_M 17.2 -> 17.9 / 22.0 -> 22.8 tok/s,
    /// Qwen3-0.6B-shaped 94.7 -> 106.6 / 116.5 -> 121.3 (AVX2: 17.8 -> 18.3, 93.9 -> 98.9).
    /// Spread rather than in one burst per super-block: a burst of 36-53 prefetches still
    /// stalled the core on them (about 45% of the one-token kernel's samples sat on
    /// `prefetcht1`), so a core either computed or waited on memory, hardly both.
    struct Prefetch<const H: i32> {
        next: *const u8,
        end: *const u8,
        /// Lines per [`Prefetch::some`].
        per: usize,
        /// Whether `per` is a constant and the lines run out exactly (see [`Prefetch::fixed`]).
        fixed: bool,
    }

    impl<const H: i32> Prefetch<H> {
        /// `bytes` from `p`, asked for over `calls` calls of [`Prefetch::some`].
        #[inline(always)]
        fn new((p, bytes): (*const u8, usize), calls: usize) -> Self {
            Prefetch {
                next: p,
                end: p.wrapping_add(bytes),
                per: bytes.div_ceil(64).div_ceil(calls.max(1)),
                fixed: false,
            }
        }

        /// `lines` from `p` over `calls` calls, both constants where this is inlined: the
        /// lines that do not divide evenly now, then the same count per call, straight-line
        /// prefetches with no bounds check. In the one-token kernels, the runtime count and
        /// its checks were 7 short loops per super-block (about 70 scalar instructions beside
        /// 64 `pmaddubsw` at AVX2).
        #[inline(always)]
        unsafe fn fixed(p: *const u8, lines: usize, calls: usize) -> Self {
            let per = lines / calls;
            let mut next = p;
            for _ in 0..lines - per * calls {
                _mm_prefetch::<H>(next as *const i8);
                next = next.wrapping_add(64);
            }
            Prefetch { next, end: next, per, fixed: true }
        }

        /// The next few lines.
        #[inline(always)]
        unsafe fn some(&mut self) {
            if self.fixed {
                for _ in 0..self.per {
                    _mm_prefetch::<H>(self.next as *const i8);
                    if H == _MM_HINT_NTA {
                        _mm_prefetch::<_MM_HINT_T1>(self.next.wrapping_add(FAR_AHEAD) as *const i8);
                    }
                    self.next = self.next.wrapping_add(64);
                }
                return;
            }
            for _ in 0..self.per {
                if self.next >= self.end {
                    return;
                }
                _mm_prefetch::<H>(self.next as *const i8);
                self.next = self.next.wrapping_add(64);
            }
        }
    }

    /// How many super-blocks of a row group ahead the interleaved kernels prefetch: 4 decoded
    /// Qwen3-0.6B-shaped Q4_K_M 15-25% faster than 1 or 2 and as fast as 6-12, at both ISAs
    /// (2 threads, Sapphire Rapids), and 8 was no better than 4 with the L2 hint.
    const PREFETCH_BLOCKS: usize = 4;

    /// How far past each line the one-token walk asks for non-temporally it also asks for a
    /// line into L2 (`_MM_HINT_T1`), where it prefetches non-temporally at all: the L1 requests
    /// then mostly find their lines in L2, and the core keeps more of memory's latency covered
    /// than its few L1 fill buffers allow. Zen 5, products of a Qwen3-0.6B-shaped Q4_K_M step
    /// alone (`decode_products 2 6`, AVX-512, the level chosen per call; runs alternated with
    /// the build before): memory loaded (probe 46-48 GB/s) all products 31.3-37.5 -> 37.6-39.7
    /// GB/s, LM head (Q6_K) 29.5-33.8 -> 34.2-39.1; memory free (probe 75-78) all 38.0-52.3
    /// -> 44.7-51.5, LM head 47.1-52.1 -> 56.9-57.4; 4096 bytes measured as 8192, 12288 and
    /// more no faster. At AVX2 alone no change (40-47 GB/s either way); at AVX-512 the per-call
    /// choice (`pio_kernels::adapt`) now takes the AVX-512 kernels for 59-74% of the calls
    /// (6-17% before). Whole decode, Qwen3-4B-shaped Q4_K_M (`pio bench --prompt-tokens 16
    /// --gen-tokens 128`, memory loaded): 17.0 / 15.6 / 17.0 -> 17.3 / 16.8 / 17.6 tok/s;
    /// Qwen3-0.6B-shaped: no change beyond the noise (88-103 tok/s either way). The legacy
    /// formats' one-token walk measured slower with it (Q8_0 with memory free, 67-68 -> 58-61
    /// GB/s) and does without.
    const FAR_AHEAD: usize = 8192;

    /// GGML's layout: row `r` at `w + r·rb`, super-blocks of `bb` bytes.
    #[derive(Clone, Copy)]
    struct RowMajor {
        w: *const u8,
        rb: usize,
        bb: usize,
    }

    impl Mat for RowMajor {
        type Src = RowPtrs;
        const GROUPED: bool = false;
        #[inline(always)]
        unsafe fn block(self, r0: usize, live: usize, s: usize) -> RowPtrs {
            let mut rows = [self.w; ROWS];
            for (i, p) in rows.iter_mut().enumerate() {
                // Lanes past the end of a partial row group repeat its first row.
                *p = self.w.add((r0 + if i < live { i } else { 0 }) * self.rb + s * self.bb);
            }
            RowPtrs(rows)
        }
        #[inline(always)]
        unsafe fn ahead(self, r0: usize, step: usize, s: usize) -> (*const u8, usize) {
            // The rows of a walk step are contiguous: while this step reads its super-block `s`,
            // ask for the same share of the next step's rows.
            (self.w.wrapping_add((r0 + step) * self.rb + s * step * self.bb), step * self.bb)
        }
    }

    /// The interleaved layout: group `g`'s super-block `s` is the `16·bb` bytes at
    /// `w + (g·supers + s)·16·bb`.
    #[derive(Clone, Copy)]
    struct Interleaved {
        w: *const u8,
        supers: usize,
        bb: usize,
    }

    impl Mat for Interleaved {
        type Src = Packed;
        const GROUPED: bool = true;
        #[inline(always)]
        unsafe fn block(self, r0: usize, _live: usize, s: usize) -> Packed {
            let (g, lane) = (r0 / ROWS, r0 % ROWS);
            Packed { block: self.w.add((g * self.supers + s) * ROWS * self.bb), lane }
        }
        #[inline(always)]
        unsafe fn ahead(self, r0: usize, _step: usize, s: usize) -> (*const u8, usize) {
            let bytes = ROWS * self.bb;
            // An ISA with fewer lanes than a group walks it in passes, each reading part of every
            // line: the first pass asks for the lines, the later ones find them in L2.
            let at = self.w.wrapping_add((r0 / ROWS * self.supers + s + PREFETCH_BLOCKS) * bytes);
            (at, if r0.is_multiple_of(ROWS) { bytes } else { 0 })
        }
    }

    // --- Unpacking one super-block of a row group ---------------------------------------------

    /// Repeats `$body` with `$i` bound to each listed value: index arithmetic, shift counts and
    /// branches on `$i` then fold at compile time (LLVM does not fully unroll loops this big,
    /// and a rolled loop keeps the transposed columns in memory, indexed at run time).
    macro_rules! unroll {
        ($i:ident in [$($n:literal),*] $body:block) => {
            $({
                let $i: usize = $n;
                $body
            })*
        };
    }

    /// One super-block of a row group, unpacked (see the module docs). Written in full by each
    /// format's `unpack_*` before the products read it.
    #[repr(C, align(64))]
    struct Unpacked {
        /// Column `8 * j + g`: lane `i` holds row `i`'s weights at bytes `4g..4g + 4` of Q8Block
        /// `j`.
        w: [[u8; 64]; 64],
        /// Per-row float factors: Q4_K/Q5_K `d·sc_j` at `j` and `dmin·m_j` at `8 + j`; Q6_K `d·sc`
        /// of the 16-weight half `h` of Q8Block `j` at `2j + h`.
        f: [[f32; ROWS]; 16],
        /// Q6_K with signed weights: `−128·Σ (q − 32)` over half `2j + h`, where its sums start.
        c: [[i32; ROWS]; 16],
    }

    impl Unpacked {
        /// Uninitialized, as a zeroed buffer would cost a 6 KiB memset per call (noticeable in
        /// decode's 16 x 1 tiles); every byte is written before it is read.
        const fn uninit() -> std::mem::MaybeUninit<Unpacked> {
            std::mem::MaybeUninit::uninit()
        }
        #[inline(always)]
        unsafe fn col(p: *mut Unpacked, i: usize) -> *mut u8 {
            (std::ptr::addr_of_mut!((*p).w) as *mut u8).add(64 * i)
        }
        #[inline(always)]
        unsafe fn factor(p: *mut Unpacked, i: usize) -> *mut f32 {
            (std::ptr::addr_of_mut!((*p).f) as *mut f32).add(ROWS * i)
        }
        #[inline(always)]
        unsafe fn corr(p: *mut Unpacked, i: usize) -> *mut u8 {
            (std::ptr::addr_of_mut!((*p).c) as *mut u8).add(4 * ROWS * i)
        }
    }

    /// Byte `b` of each lane, zero-extended.
    #[inline(always)]
    unsafe fn byte_u<S: Isa>(v: S::I, b: usize) -> S::I {
        S::and(S::srl(v, 8 * b as u32), S::set1_i32(0xFF))
    }

    /// Byte `b` of each lane, sign-extended.
    #[inline(always)]
    unsafe fn byte_s<S: Isa>(v: S::I, b: usize) -> S::I {
        S::sra(S::sll(v, 24 - 8 * b as u32), 24)
    }

    /// The per-row factors of Q4_K/Q5_K from the first 16 bytes of each row's super-block
    /// (`h[0]` = `d`, `dmin`; `h[1..4]` = the 12 packed scale bytes), unpacked with the word
    /// operations of [`super::k4_scales_mins`].
    #[inline(always)]
    unsafe fn k4_factors<S: Isa>(h: [S::I; 4], un: *mut Unpacked) {
        let (sc, m, d, dmin) = k4_header::<S>(h);
        unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
            let (dsc, dmm) = k4_factor::<S>(&sc, &m, d, dmin, j);
            S::storef(Unpacked::factor(un, j), dsc);
            S::storef(Unpacked::factor(un, 8 + j), dmm);
        });
    }

    type K4Header<S> = ([<S as Isa>::I; 2], [<S as Isa>::I; 2], <S as Isa>::F, <S as Isa>::F);

    /// The scales and mins of a Q4_K/Q5_K super-block, one 6-bit value per byte (`sc[j / 4]`
    /// byte `j % 4`, the same for `m`), and `d`, `dmin`.
    #[inline(always)]
    unsafe fn k4_header<S: Isa>(h: [S::I; 4]) -> K4Header<S> {
        let (d, dmin) = (S::f16_lo(h[0]), S::f16_hi(h[0]));
        let (low6, low4, top2) = (S::set1_i32(0x3F3F_3F3F), S::set1_i32(0x0F0F_0F0F), S::set1_i32(0x3030_3030));
        let sc = [S::and(h[1], low6), S::or(S::and(h[3], low4), S::and(S::srl(h[1], 2), top2))];
        let m = [S::and(h[2], low6), S::or(S::and(S::srl(h[3], 4), low4), S::and(S::srl(h[2], 2), top2))];
        (sc, m, d, dmin)
    }

    /// `(d·sc_j, dmin·m_j)` for sub-block `j`.
    #[inline(always)]
    unsafe fn k4_factor<S: Isa>(sc: &[S::I; 2], m: &[S::I; 2], d: S::F, dmin: S::F, j: usize) -> (S::F, S::F) {
        let (sc_j, m_j) = (S::cvt(byte_u::<S>(sc[j / 4], j % 4)), S::cvt(byte_u::<S>(m[j / 4], j % 4)));
        (S::mul(d, sc_j), S::mul(dmin, m_j))
    }

    /// Q4_K, 144 bytes: `d`, `dmin`, 12 bytes of scales/mins, 128 bytes of nibbles (32 bytes per
    /// 64 weights: low nibbles Q8Block 2k, high nibbles 2k + 1).
    #[inline(always)]
    unsafe fn unpack_q4k<S: Isa, R: Src>(src: R, un: *mut Unpacked) {
        k4_factors::<S>(src.cols4::<S>(0), un);
        let m4 = S::set1_i8(0x0F);
        unroll!(half in [0, 1] {
            let q = src.cols16::<S>(16 + 64 * half);
            unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                // Nibble dword c: group c % 8 of chunk k = c / 8.
                let c = 16 * half + i;
                let (k, g) = (c / 8, c % 8);
                S::store(Unpacked::col(un, 8 * (2 * k) + g), S::and(q[i], m4));
                S::store(Unpacked::col(un, 8 * (2 * k + 1) + g), S::and(S::srl(q[i], 4), m4));
            });
        });
    }

    /// The two Q5_K columns of nibble dword `n` (`v`), with their fifth bits from the `qh`
    /// dwords.
    #[inline(always)]
    unsafe fn q5k_cols<S: Isa>(un: *mut Unpacked, qh: &[S::I; 8], n: usize, v: S::I) {
        let (k, g) = (n / 8, n % 8);
        let (m4, m16) = (S::set1_i8(0x0F), S::set1_i8(0x10));
        unroll!(e in [0, 1] {
            let j = 2 * k + e;
            let low = S::and(S::srl(v, 4 * e as u32), m4);
            // Bit j of each qh byte to bit 4 (32-bit shifts only move other bytes' bits into
            // other positions of this byte, which the mask drops).
            let high = if j < 4 { S::sll(qh[g], 4 - j as u32) } else { S::srl(qh[g], j as u32 - 4) };
            S::store(Unpacked::col(un, 8 * j + g), S::or(low, S::and(high, m16)));
        });
    }

    /// Q5_K, 176 bytes: as Q4_K with `qh: [u8; 32]` before the nibbles (bit j of byte l is the
    /// fifth bit of weight 32j + l).
    #[inline(always)]
    unsafe fn unpack_q5k<S: Isa, R: Src>(src: R, un: *mut Unpacked) {
        k4_factors::<S>(src.cols4::<S>(0), un);
        // Dwords from byte 16: qh (8), then the nibbles (32), in chunks of 16, 16 and 8.
        let a = src.cols16::<S>(16);
        let qh: [S::I; 8] = std::array::from_fn(|g| a[g]);
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
            q5k_cols::<S>(un, &qh, i, a[8 + i]);
        });
        let b = src.cols16::<S>(80);
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            q5k_cols::<S>(un, &qh, 8 + i, b[i]);
        });
        let c = src.cols8::<S>(144);
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
            q5k_cols::<S>(un, &qh, 24 + i, c[i]);
        });
    }

    /// Q6_K, 210 bytes: `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d`. Per 128
    /// weights h, weight 32k + l has its low nibble in `ql[64h + 32(k % 2) + l]` (low nibble for
    /// k < 2) and its top two bits at bit 2k of `qh[32h + l]` (the interleaved layout holds the
    /// same bytes re-encoded: [`q6k_col`]); w = d·sc·(q − 32). Columns hold `q` (0..64), or with
    /// `SIGNED` `q − 32` and the sums' starting values.
    #[inline(always)]
    unsafe fn unpack_q6k<S: Isa, R: Src, const SIGNED: bool>(src: R, un: *mut Unpacked) {
        let sc = src.cols4::<S>(192);
        let d = src.f16::<S>(208);
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            S::storef(Unpacked::factor(un, i), S::mul(d, S::cvt(byte_s::<S>(sc[i / 4], i % 4))));
        });
        let qh = src.cols16::<S>(128);
        let m32 = S::set1_i8(32);
        unroll!(h in [0, 1] {
            let ql = src.cols16::<S>(64 * h);
            unroll!(k in [0, 1, 2, 3] {
                let j = 4 * h + k;
                // Σ q per 16-weight half, in bytes (at most 4 · 63 per lane byte).
                let mut sums = [S::zero_i(); 2];
                unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
                    let q = q6k_col::<S, R>(k, ql[8 * (k % 2) + g], qh[8 * h + g]);
                    if SIGNED {
                        sums[g / 4] = S::add_i8(sums[g / 4], q);
                        S::store(Unpacked::col(un, 8 * j + g), S::sub_i8(q, m32));
                    } else {
                        S::store(Unpacked::col(un, 8 * j + g), q);
                    }
                });
                if SIGNED {
                    unroll!(e in [0, 1] {
                        // −128·Σ (q − 32) = 65536 − 128·Σ q.
                        let c = S::sub_i32(S::set1_i32(65536), S::sll(S::hsum_bytes(sums[e]), 7));
                        S::store(Unpacked::corr(un, 2 * j + e), c);
                    });
                }
            });
        });
    }

    /// Column `q` (0..64) of Q8Block `k` of a 128-weight half of a Q6_K super-block, from its
    /// `ql` dword (of `ql[32(k % 2)..]`) and its `qh` dword, in the layout `R` reads. Re-encoded
    /// (interleaved), 2.75 operations per column instead of 4.25: a one-token Q6_K product of
    /// 16 x 3072 in cache (`bench_gemm_ns_per_pair`, 3 alternated runs) 135 -> 113 ns per row at
    /// AVX2, 77.5 -> 68 at AVX-512; streaming 23 MiB 236 -> 221 at AVX2.
    #[inline(always)]
    unsafe fn q6k_col<S: Isa, R: Src>(k: usize, ql: S::I, qh: S::I) -> S::I {
        let (m4, m30) = (S::set1_i8(0x0F), S::set1_i8(0x30));
        if R::RECODED {
            // `w_k` whole in `ql` for k < 2; otherwise its low bits in a nibble of `qh`, its top
            // two at bits 6..8 of `ql` (a 32-bit shift moves other bytes' bits only into bits
            // the mask drops).
            if k < 2 {
                S::and(ql, S::set1_i8(0x3F))
            } else {
                S::or(S::and(if k == 2 { qh } else { S::srl(qh, 4) }, m4), S::and(S::srl(ql, 2), m30))
            }
        } else {
            let low = S::and(if k < 2 { ql } else { S::srl(ql, 4) }, m4);
            // Bits 2k..2k+2 of qh to bits 4..6.
            let high = if k < 2 { S::sll(qh, 4 - 2 * k as u32) } else { S::srl(qh, 2 * k as u32 - 4) };
            S::or(low, S::and(high, m30))
        }
    }

    // --- Products for a register tile of TT tokens --------------------------------------------

    /// Q4_K / Q5_K: adds one super-block of `G` row groups (unpacked at `un[k]`) to their
    /// accumulators `acc[k]` of `TT` tokens, `a[t]` pointing at token t's eight Q8Blocks. `I16`:
    /// groups summed in i16 without the AVX-512 VNNI (weights < 16: 8 groups,
    /// |Σ| ≤ 8·2·15·128; < 32: 4 groups).
    #[inline(always)]
    unsafe fn compute_k4<S: Isa, const I16: usize, const TT: usize, const G: usize>(
        un: [*mut Unpacked; G],
        a: [*const Q8Block; TT],
        acc: [&mut [S::F; TT]; G],
    ) {
        // Each token's broadcasts at its own pointer plus a constant ([`crate::dot::opaque`];
        // hence also the unrolled loop).
        let a = a.map(crate::dot::opaque);
        let mut v: [[S::F; TT]; G] = std::array::from_fn(|k| *acc[k]);
        unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
            // Σ q·q_a is exact (|.| ≤ 32·31·128 < 2^24, so is its conversion).
            let f: [(S::F, S::F); G] =
                un.map(|u| (S::loadf(Unpacked::factor(u, j)), S::loadf(Unpacked::factor(u, 8 + j))));
            let qs = a.map(|a| (*a.add(j)).qs.as_ptr() as *const u8);
            let i = S::dot_tile::<8, I16, TT, false, G>([[S::zero_i(); TT]; G], un.map(|u| Unpacked::col(u, 8 * j) as *const u8), &qs);
            for (k, (v, i)) in v.iter_mut().zip(i).enumerate() {
                let (dsc, dmm) = f[k];
                for ((v, a), i) in v.iter_mut().zip(&a).zip(i) {
                    let b = &*a.add(j);
                    // + d·sc_j·d_a·Σ q·q_a − dmin·m_j·s_a
                    *v = S::fma(S::cvt(i), S::mul(dsc, S::set1_f(b.d)), *v);
                    *v = S::fnmadd(dmm, S::set1_f(b.s), *v);
                }
            }
        });
        for (acc, v) in acc.into_iter().zip(v) {
            *acc = v;
        }
    }

    /// −32·Σ q_a over each 16-byte half of a token's eight Q8Blocks, at `4i + 2h + e` for
    /// Q8Block `2i + e` and half `h` (as i64; the low 32 bits are the value).
    #[inline(always)]
    unsafe fn q6k_offsets(a: *const Q8Block) -> [i64; 16] {
        let (flip, zero) = (_mm256_set1_epi8(-128), _mm256_setzero_si256());
        let mut out = [0i64; 16];
        for i in 0..ACT_PER_SUPER / 2 {
            // psadbw: Σ of each 8 unsigned bytes, here q_a + 128.
            let p = _mm256_loadu_si256((*a.add(2 * i)).qs.as_ptr() as *const __m256i);
            let q = _mm256_loadu_si256((*a.add(2 * i + 1)).qs.as_ptr() as *const __m256i);
            let p = _mm256_sad_epu8(_mm256_xor_si256(p, flip), zero);
            let q = _mm256_sad_epu8(_mm256_xor_si256(q, flip), zero);
            // [lo(2i), lo(2i + 1), hi(2i), hi(2i + 1)], each Σ q_a + 16·128.
            let s = _mm256_add_epi64(_mm256_unpacklo_epi64(p, q), _mm256_unpackhi_epi64(p, q));
            let v = _mm256_sub_epi64(_mm256_set1_epi64x(65536), _mm256_slli_epi64::<5>(s));
            _mm256_storeu_si256(out.as_mut_ptr().add(4 * i) as *mut __m256i, v);
        }
        out
    }

    /// Q6_K: as [`compute_k4`]. With `SIGNED` columns the activations are made unsigned (see the
    /// module docs); otherwise each half's sum starts from `−32·Σ q_a` ([`q6k_offsets`]). Both
    /// give the same exact integers.
    #[inline(always)]
    unsafe fn compute_q6k<S: Isa, const SIGNED: bool, const TT: usize, const G: usize>(
        un: [*mut Unpacked; G],
        a: [*const Q8Block; TT],
        acc: [&mut [S::F; TT]; G],
    ) {
        // SIGNED: q_a + 128 = q_a ^ 0x80 as unsigned bytes, 32 per Q8Block.
        let mut ax = [[0u8; 32 * ACT_PER_SUPER]; TT];
        // Otherwise: the starting values.
        let mut offs = [[0i64; 16]; TT];
        for ((x, o), a) in ax.iter_mut().zip(&mut offs).zip(&a) {
            if SIGNED {
                let flip = _mm256_set1_epi8(-128);
                for j in 0..ACT_PER_SUPER {
                    let q = _mm256_loadu_si256((*a.add(j)).qs.as_ptr() as *const __m256i);
                    _mm256_storeu_si256(x.as_mut_ptr().add(32 * j) as *mut __m256i, _mm256_xor_si256(q, flip));
                }
            } else {
                *o = q6k_offsets(*a);
            }
        }
        // Read back from memory as broadcasts, rather than extracted from the registers that
        // wrote them (shuffles, on the busiest port).
        let (ax, offs) = (std::hint::black_box(&ax), std::hint::black_box(&offs));
        let mut v: [[S::F; TT]; G] = std::array::from_fn(|k| *acc[k]);
        for j in 0..ACT_PER_SUPER {
            // Σ q_a·(q − 32) per half: exact, |.| ≤ 16·32·128. Without VNNI, two groups of
            // pairs per i16: 2·2·255·32 or 2·2·63·128 at most.
            let (lo, hi) = if SIGNED {
                let x: [*const u8; TT] = std::array::from_fn(|t| ax[t].as_ptr().add(32 * j));
                let x16 = x.map(|x| x.add(16));
                let init = |e: usize| un.map(|u| [S::load(Unpacked::corr(u, 2 * j + e)); TT]);
                (
                    S::dot_tile::<4, 2, TT, true, G>(init(0), un.map(|u| Unpacked::col(u, 8 * j) as *const u8), &x),
                    S::dot_tile::<4, 2, TT, true, G>(
                        init(1),
                        un.map(|u| Unpacked::col(u, 8 * j + 4) as *const u8),
                        &x16,
                    ),
                )
            } else {
                let b: [&[i64]; TT] = std::array::from_fn(|t| &offs[t][4 * (j / 2) + j % 2..]);
                let q: [*const u8; TT] = a.map(|a| (*a.add(j)).qs.as_ptr() as *const u8);
                let q16 = q.map(|q| q.add(16));
                let init = |e: usize| [b.map(|b| S::set1_i32(b[2 * e] as i32)); G];
                (
                    S::dot_tile::<4, 2, TT, false, G>(init(0), un.map(|u| Unpacked::col(u, 8 * j) as *const u8), &q),
                    S::dot_tile::<4, 2, TT, false, G>(
                        init(1),
                        un.map(|u| Unpacked::col(u, 8 * j + 4) as *const u8),
                        &q16,
                    ),
                )
            };
            for (k, ((v, lo), hi)) in v.iter_mut().zip(lo).zip(hi).enumerate() {
                let (flo, fhi) =
                    (S::loadf(Unpacked::factor(un[k], 2 * j)), S::loadf(Unpacked::factor(un[k], 2 * j + 1)));
                for (((v, a), lo), hi) in v.iter_mut().zip(&a).zip(lo).zip(hi) {
                    // + (d·sc_lo·Σ_lo + d·sc_hi·Σ_hi)·d_a
                    let u = S::fma(S::cvt(hi), fhi, S::mul(S::cvt(lo), flo));
                    *v = S::fma(u, S::set1_f((*a.add(j)).d), *v);
                }
            }
        }
        for (acc, v) in acc.into_iter().zip(v) {
            *acc = v;
        }
    }

    // --- One token: unpacked in registers ------------------------------------------------------

    /// Q4_K, one token: adds Q8Block `j0 + e` of a super-block (the low nibbles of the 8 columns
    /// `q` for `e` = 0, the high ones for 1) to `v`, with the float steps of [`compute_k4`] on
    /// the same values, so the same bits as the tile.
    #[inline(always)]
    unsafe fn one_q4k_nibbles<S: Isa, const H: i32>(
        q: &[S::I; 8],
        j0: usize,
        e: usize,
        h: &K4Header<S>,
        a: *const Q8Block,
        v: &mut S::F,
        pf: &mut Prefetch<H>,
    ) {
        // At AVX2 the mask is opaque to the compiler: short of registers, it otherwise rebuilt it
        // from the constant before every column (`vpbroadcastb`: a load and a shuffle) rather
        // than keep it in one. A one-token Q4_K product of 16 rows in cache
        // (`bench_gemm_ns_per_pair`, 3 alternated runs): 28.9 -> 26.3 ns per row of 1024
        // columns, 78.8 -> 72 of 3072, 127.5 -> 116 of 4864 at AVX2 (the same masks kept opaque
        // in the Q6_K walk changed nothing there).
        let m4 = if S::WIDE { S::set1_i8(0x0F) } else { std::hint::black_box(S::set1_i8(0x0F)) };
        pf.some();
        let j = j0 + e;
        // (Loops rather than `map`, whose closure LLVM leaves out of line.)
        let mut cols = *q;
        for c in cols.iter_mut() {
            *c = S::and(if e == 0 { *c } else { S::srl(*c, 4) }, m4);
        }
        let i = S::dot_cols::<8, 8, false>(S::zero_i(), &cols, (*a.add(j)).qs.as_ptr() as *const u8);
        one_q4k_sum::<S>(i, j, h, a, v);
    }

    /// [`one_q4k_nibbles`] through [`Isa::nibble_dot8`]: Q8Block `j`'s columns (its low
    /// nibbles, or with `HI` its high ones) from `p`, the interleaved layout's.
    #[inline(always)]
    unsafe fn one_q4k_nibbles_at<S: Isa, const H: i32, const HI: bool>(
        p: *const u8,
        j: usize,
        h: &K4Header<S>,
        a: *const Q8Block,
        v: &mut S::F,
        pf: &mut Prefetch<H>,
    ) {
        pf.some();
        let i = S::nibble_dot8::<HI>(p, (*a.add(j)).qs.as_ptr() as *const u8);
        one_q4k_sum::<S>(i, j, h, a, v);
    }

    /// Adds Q8Block `j`'s integer sums `i` to `v`, with the float steps of [`compute_k4`].
    #[inline(always)]
    unsafe fn one_q4k_sum<S: Isa>(i: S::I, j: usize, (sc, m, d, dmin): &K4Header<S>, a: *const Q8Block, v: &mut S::F) {
        let b = &*a.add(j);
        let (dsc, dmm) = k4_factor::<S>(sc, m, *d, *dmin, j);
        *v = S::fma(S::cvt(i), S::mul(dsc, S::set1_f(b.d)), *v);
        *v = S::fnmadd(dmm, S::set1_f(b.s), *v);
    }

    /// [`one_q4k_nibbles`] for both nibbles of the columns `q`: Q8Blocks `j0` and `j0 + 1`.
    #[inline(always)]
    unsafe fn one_q4k_pair<S: Isa, const H: i32>(
        q: &[S::I; 8],
        j0: usize,
        h: &K4Header<S>,
        a: *const Q8Block,
        v: &mut S::F,
        pf: &mut Prefetch<H>,
    ) {
        one_q4k_nibbles::<S, H>(q, j0, 0, h, a, v, pf);
        one_q4k_nibbles::<S, H>(q, j0, 1, h, a, v, pf);
    }

    /// Q4_K, one token: adds one super-block of `S::LANES` rows to `v` (`a`: its 8 Q8Blocks).
    #[inline(always)]
    unsafe fn one_q4k<S: Isa, R: Src, const H: i32>(src: R, a: *const Q8Block, v: &mut S::F, pf: &mut Prefetch<H>) {
        let h = k4_header::<S>(src.cols4::<S>(0));
        if S::WIDE {
            unroll!(half in [0, 1] {
                let q = src.cols16::<S>(16 + 64 * half);
                one_q4k_pair::<S, H>(&std::array::from_fn(|c| q[c]), 4 * half, &h, a, v, pf);
                one_q4k_pair::<S, H>(&std::array::from_fn(|c| q[8 + c]), 4 * half + 2, &h, a, v, pf);
            });
        } else {
            unroll!(k in [0, 1, 2, 3] {
                // The block's and the activations' pointers hidden from the optimizer per
                // chunk of 64 weights: seeing through them, LLVM hoisted the super-block's 64
                // activation broadcasts ahead of the products and kept them, and columns, on
                // the stack.
                let (src, a) = (src.opaque(), crate::dot::opaque(a));
                if R::RELOAD && S::ASM_ONE_TOKEN {
                    let p = src.col_ptr::<S>(16 + 32 * k);
                    one_q4k_nibbles_at::<S, H, false>(p, 2 * k, &h, a, v, pf);
                    one_q4k_nibbles_at::<S, H, true>(p, 2 * k + 1, &h, a, v, pf);
                } else if R::RELOAD {
                    // The high nibbles from a second load of the columns (from L1), so the
                    // first load's 8 registers are free after the low nibbles' products: held
                    // for both, they spilled the masks and the factors. Decode streaming 23 MiB
                    // (`bench_gemm_ns_per_pair`, best of 5 alternated): 94.4 -> 86.8 ns per row
                    // of 3072 columns; Qwen3-0.6B-shaped Q4_K_M decode +3% at 2 threads, +4% at
                    // one (medians of alternated rounds).
                    one_q4k_nibbles::<S, H>(&src.cols8::<S>(16 + 32 * k), 2 * k, 0, &h, a, v, pf);
                    one_q4k_nibbles::<S, H>(&src.opaque().cols8::<S>(16 + 32 * k), 2 * k, 1, &h, a, v, pf);
                } else {
                    one_q4k_pair::<S, H>(&src.cols8::<S>(16 + 32 * k), 2 * k, &h, a, v, pf);
                }
            });
        }
    }

    /// Q6_K, one token: adds one super-block of `S::LANES` rows to `v`, with unsigned columns
    /// and each half's sum starting from `−32·Σ q_a` (`offs`, [`q6k_offsets`]), and the float
    /// steps of [`compute_q6k`].
    #[inline(always)]
    unsafe fn one_q6k<S: Isa, R: Src, const H: i32>(
        src: R,
        a: *const Q8Block,
        offs: &[i64; 16],
        v: &mut S::F,
        pf: &mut Prefetch<H>,
    ) {
        let sc = src.cols4::<S>(192);
        let d = src.f16::<S>(208);
        let factor = |i: usize| S::mul(d, S::cvt(byte_s::<S>(sc[i / 4], i % 4)));
        let qh_all = if S::WIDE { src.cols16::<S>(128) } else { [S::zero_i(); 16] };
        unroll!(h in [0, 1] {
            let qh: [S::I; 8] =
                if S::WIDE { std::array::from_fn(|g| qh_all[8 * h + g]) } else { src.cols8::<S>(128 + 32 * h) };
            let ql_all = if S::WIDE { src.cols16::<S>(64 * h) } else { [S::zero_i(); 16] };
            // Each Q8Block's term, in any order; they join `v` in order below.
            let mut u = [S::zero_f(); 4];
            unroll!(kk in [0, 1] {
                let ql: [S::I; 8] = if S::WIDE {
                    std::array::from_fn(|g| ql_all[8 * kk + g])
                } else {
                    src.cols8::<S>(64 * h + 32 * kk)
                };
                unroll!(hi in [0, 1] {
                    pf.some();
                    let k = kk + 2 * hi;
                    let j = 4 * h + k;
                    // Narrow ISAs load the columns again for each Q8Block where that is a plain
                    // load (see `one_q4k`), rather than hold 16 registers of them: cache-resident
                    // one-token tile 41 -> 36.5 ns per row of 1024 columns, 125 -> 114 at 3072,
                    // streaming 23 MiB 150 -> 146 (`bench_gemm_ns_per_pair`, 5 alternated runs).
                    let (b, q) = (&offs[4 * (j / 2) + j % 2..], (*a.add(j)).qs.as_ptr() as *const u8);
                    if S::ASM_ONE_TOKEN && R::RELOAD && R::RECODED {
                        let (ql, qh) = (src.col_ptr::<S>(64 * h + 32 * kk), src.col_ptr::<S>(128 + 32 * h));
                        let (lo, hi) = (S::set1_i32(b[0] as i32), S::set1_i32(b[2] as i32));
                        let (lo, hi) = match k {
                            0 => S::q6k_dot8::<0>(ql, qh, q, lo, hi),
                            1 => S::q6k_dot8::<1>(ql, qh, q, lo, hi),
                            2 => S::q6k_dot8::<2>(ql, qh, q, lo, hi),
                            _ => S::q6k_dot8::<3>(ql, qh, q, lo, hi),
                        };
                        u[k] = S::fma(S::cvt(hi), factor(2 * j + 1), S::mul(S::cvt(lo), factor(2 * j)));
                    } else {
                        let (ql, qh) = if !S::WIDE && R::RELOAD && (hi == 1 || kk == 1) {
                            (src.opaque().cols8::<S>(64 * h + 32 * kk), src.opaque().cols8::<S>(128 + 32 * h))
                        } else {
                            (ql, qh)
                        };
                        let mut cols = [S::zero_i(); 8];
                        for g in 0..8 {
                            cols[g] = q6k_col::<S, R>(k, ql[g], qh[g]);
                        }
                        let lo_cols: [S::I; 4] = std::array::from_fn(|g| cols[g]);
                        let hi_cols: [S::I; 4] = std::array::from_fn(|g| cols[4 + g]);
                        let lo = S::dot_cols::<4, 2, false>(S::set1_i32(b[0] as i32), &lo_cols, q);
                        let hi = S::dot_cols::<4, 2, false>(S::set1_i32(b[2] as i32), &hi_cols, q.add(16));
                        u[k] = S::fma(S::cvt(hi), factor(2 * j + 1), S::mul(S::cvt(lo), factor(2 * j)));
                    }
                });
            });
            unroll!(k in [0, 1, 2, 3] {
                *v = S::fma(u[k], S::set1_f((*a.add(4 * h + k)).d), *v);
            });
        });
    }

    /// A single token's products (decode): row groups of `S::LANES`, each super-block unpacked
    /// in registers and used at once, bitwise the same as [`drive`] (the same float steps).
    #[inline(always)]
    unsafe fn drive_one<S: Isa, M: Mat, const FMT: u8, const H: i32>(
        m: M,
        nrows: usize,
        act: &[Q8Block],
        out: &mut [f32],
    ) {
        let supers = act.len() / ACT_PER_SUPER;
        // (A loop: intrinsics inlined into a closure lose this function's target features.)
        let mut offs: Vec<[i64; 16]> = Vec::new();
        if FMT != Q4K {
            for s in 0..supers {
                offs.push(q6k_offsets(act.as_ptr().add(s * ACT_PER_SUPER)));
            }
        }
        // Whole 16-row groups, one accumulator per `S::LANES` rows (so an interleaved group is
        // read once, in order), or `S::LANES` rows at a time.
        let step = if M::GROUPED { ROWS } else { S::LANES };
        for r0 in (0..nrows).step_by(step) {
            let live = (nrows - r0).min(step);
            let mut lanes = [0f32; ROWS];
            // A const count of parts, so the accumulators live in registers: indexed by a
            // runtime part, they went through the stack on every Q8Block (a store-to-load
            // forward in each accumulator's chain). A one-token Q6_K product of 64 x 3072 from
            // L2, best of 100 x 2000 calls, 3 alternated runs: 145.5 -> 138.2 ns per row at AVX2,
            // 80.8 -> 77.0 at AVX-512; Q4_K unchanged (90.4 / 89.2, 43.7 / 43.3).
            if live > S::LANES {
                walk_one::<S, M, FMT, 2, H>(m, nrows, r0, step, act, &offs, &mut lanes);
            } else {
                walk_one::<S, M, FMT, 1, H>(m, nrows, r0, step, act, &offs, &mut lanes);
            }
            crate::dot::put(out, r0, &lanes, live);
        }
    }

    /// [`drive_one`]'s walk of one step of rows from `r0`, in `P` parts of `S::LANES` rows, into
    /// `lanes`.
    #[inline(always)]
    unsafe fn walk_one<S: Isa, M: Mat, const FMT: u8, const P: usize, const H: i32>(
        m: M,
        nrows: usize,
        r0: usize,
        step: usize,
        act: &[Q8Block],
        offs: &[[i64; 16]],
        lanes: &mut [f32; ROWS],
    ) {
        let supers = act.len() / ACT_PER_SUPER;
        let mut v = [S::zero_f(); P];
        for s in 0..supers {
            // `Prefetch::some` calls per super-block of `S::LANES` rows: one per Q8Block.
            // The bytes `ahead` gives, as a constant (the format's, not `m`'s block size): a
            // step's share of a super-block.
            let bb = if FMT == Q4K { DType::Q4_K } else { DType::Q6_K }.block_bytes();
            let lines = (step * bb).div_ceil(64);
            let mut pf = Prefetch::<H>::fixed(m.ahead(r0, step, s).0, lines, P * ACT_PER_SUPER);
            let a = act.as_ptr().add(s * ACT_PER_SUPER);
            // Unrolled: as a loop over `v`, LLVM kept the accumulators in memory, indexed by
            // the part (a store-to-load forward in each Q8Block's chain).
            unroll!(h in [0, 1] {
                if h < P {
                    if h > 0 && FMT != Q4K {
                        // A compiler barrier: Q6_K's second part is not interleaved with the
                        // first (AVX2, in cache: 2-4% fewer ns per row than without).
                        std::arch::asm!("", options(nostack, preserves_flags));
                    }
                    let r = r0 + h * S::LANES;
                    let src = m.block(r, (nrows - r).min(S::LANES), s);
                    if FMT == Q4K {
                        one_q4k::<S, M::Src, H>(src, a, &mut v[h], &mut pf);
                    } else {
                        one_q6k::<S, M::Src, H>(src, a, offs.get_unchecked(s), &mut v[h], &mut pf);
                    }
                }
            });
        }
        for (h, v) in v.iter().enumerate() {
            S::storef(lanes.as_mut_ptr().add(h * S::LANES), *v);
        }
    }

    /// Formats, as const parameters so each kernel is specialised.
    const Q4K: u8 = 0;
    const Q5K: u8 = 1;
    /// Q6_K with unsigned columns, for a few tokens: a token costs 16 half sums per super-block.
    const Q6K: u8 = 2;
    /// Q6_K with signed columns, for many tokens: a row costs a few more operations per
    /// super-block, a token one xor per Q8Block.
    const Q6K_SIGNED: u8 = 3;
    /// Tokens from which Q6_K uses signed columns.
    const Q6K_SIGNED_FROM: usize = 8;

    #[inline(always)]
    unsafe fn unpack<S: Isa, R: Src, const FMT: u8>(src: R, un: *mut Unpacked) {
        match FMT {
            Q4K => unpack_q4k::<S, R>(src, un),
            Q5K => unpack_q5k::<S, R>(src, un),
            Q6K => unpack_q6k::<S, R, false>(src, un),
            _ => unpack_q6k::<S, R, true>(src, un),
        }
    }

    #[inline(always)]
    unsafe fn compute<S: Isa, const FMT: u8, const TT: usize, const G: usize>(
        un: [*mut Unpacked; G],
        a: [*const Q8Block; TT],
        acc: [&mut [S::F; TT]; G],
    ) {
        match FMT {
            Q4K => compute_k4::<S, 8, TT, G>(un, a, acc),
            Q5K => compute_k4::<S, 4, TT, G>(un, a, acc),
            Q6K => compute_q6k::<S, false, TT, G>(un, a, acc),
            _ => compute_q6k::<S, true, TT, G>(un, a, acc),
        }
    }

    /// Fewest tokens for which [`drive`] takes two row groups at a time. From 16, a batched
    /// decode step of 16 sequences (Qwen3-0.6B shape, its matrices read from memory, not from
    /// L2) lost to it: Q4_K's groups paired ran it 485 -> 430 tok/s (`pio bench --batch 16`),
    /// Q6_K's (a third of such a step is its 151936-row LM head) 547 -> 445 on Zen 5 (5
    /// alternated rounds, medians; 562 with Q6_K's single groups in 4-token tiles instead of 8).
    /// One thread, 3072 x 1024 from L2, Q6_K paired by 64 tokens ran 125-127 GMAC/s against
    /// 108-112 alone.
    const PAIR_MIN_TOKENS: usize = 32;

    /// The whole tile: row groups of 16, token chunks of [`TOKENS`], super-blocks in order, and
    /// register tiles of `TT` tokens (then single tokens). With `TT2` > 0 and at least
    /// [`PAIR_MIN_TOKENS`] tokens, two row groups go together in register tiles of `TT2` tokens,
    /// so each activation broadcast serves 32 rows (as the legacy formats' walk does). The
    /// AVX-512 VNNI kernel pairs Q6_K's groups (4 tokens per register tile; 2, 3 and 6 measured
    /// slower) and Q4_K's (2 tokens: see [`gemm_avx512_vnni`]).
    #[inline(always)]
    unsafe fn drive<S: Isa, M: Mat, const FMT: u8, const TT: usize, const TT2: usize>(
        m: M,
        nrows: usize,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let mut r0 = 0;
        while r0 < nrows {
            if TT2 > 0 && ntok >= PAIR_MIN_TOKENS && nrows - r0 > S::LANES {
                drive_groups::<S, M, FMT, TT2, 2>(m, r0, nrows, act, ntok, out, ldo);
                r0 += 2 * S::LANES;
            } else {
                drive_groups::<S, M, FMT, TT, 1>(m, r0, nrows, act, ntok, out, ldo);
                r0 += S::LANES;
            }
        }
    }

    /// The `G` row groups from `r0` (which exist) times every token.
    #[inline(always)]
    unsafe fn drive_groups<S: Isa, M: Mat, const FMT: u8, const TT: usize, const G: usize>(
        m: M,
        r0: usize,
        nrows: usize,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let nb = act.len() / ntok;
        let mut un = [const { Unpacked::uninit() }; G];
        let un: [*mut Unpacked; G] = std::array::from_fn(|k| un[k].as_mut_ptr());
        // Accumulators of a token chunk; only the used ones are initialized (a 4 KiB memset per
        // decode tile would show).
        let mut acc_buf = [const { std::mem::MaybeUninit::<[S::F; TOKENS]>::uninit() }; G];
        let acc_ptr: [*mut S::F; G] = std::array::from_fn(|k| acc_buf[k].as_mut_ptr() as *mut S::F);
        // Lanes past the end of a partial row group are dropped.
        let live: [usize; G] = std::array::from_fn(|k| (nrows - r0 - k * S::LANES).min(S::LANES));
        for t0 in (0..ntok).step_by(TOKENS) {
            let tn = (ntok - t0).min(TOKENS);
            for p in acc_ptr {
                for t in 0..tn {
                    p.add(t).write(S::zero_f());
                }
            }
            for s in 0..nb / ACT_PER_SUPER {
                // Memory read a little later, asked for a part before each token tile's
                // products, as in the one-token walk: batched decode (8-16 tokens) read its
                // weights from memory while computing only partly overlapped.
                let mut pf: [Prefetch<_MM_HINT_T1>; G] =
                    std::array::from_fn(|k| Prefetch::new(m.ahead(r0 + k * S::LANES, S::LANES, s), tn / TT + tn % TT));
                for k in 0..G {
                    unpack::<S, M::Src, FMT>(m.block(r0 + k * S::LANES, live[k], s), un[k]);
                }
                let a0 = act.as_ptr().add(t0 * nb + s * ACT_PER_SUPER);
                let mut t = 0;
                while t + TT <= tn {
                    pf.iter_mut().for_each(|pf| pf.some());
                    // SAFETY: tokens `t..t + TT` of each group's initialized accumulators.
                    let tiles = acc_ptr.map(|p| &mut *(p.add(t) as *mut [S::F; TT]));
                    compute::<S, FMT, TT, G>(un, std::array::from_fn(|k| a0.add((t + k) * nb)), tiles);
                    t += TT;
                }
                for t in t..tn {
                    pf.iter_mut().for_each(|pf| pf.some());
                    let tiles = acc_ptr.map(|p| &mut *(p.add(t) as *mut [S::F; 1]));
                    compute::<S, FMT, 1, G>(un, [a0.add(t * nb)], tiles);
                }
            }
            for (k, p) in acc_ptr.into_iter().enumerate() {
                for t in 0..tn {
                    let mut lanes = [0f32; ROWS];
                    S::storef(lanes.as_mut_ptr(), *p.add(t));
                    let o = (t0 + t) * ldo + r0 + k * S::LANES;
                    crate::dot::put(out, o, &lanes, live[k]);
                }
            }
        }
    }

    /// The tile of `dtype` over `m`, for more than one token (see [`one_token`] for one).
    #[inline(always)]
    unsafe fn by_format<
        S: Isa,
        M: Mat,
        const TT: usize,
        const TT_PAIR: usize,
        const TT6: usize,
        const TT6_PAIR: usize,
    >(
        dtype: DType,
        m: M,
        nrows: usize,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        match dtype {
            DType::Q4_K => drive::<S, M, Q4K, TT, TT_PAIR>(m, nrows, act, ntok, out, ldo),
            DType::Q5_K => drive::<S, M, Q5K, TT, 0>(m, nrows, act, ntok, out, ldo),
            DType::Q6_K if ntok >= Q6K_SIGNED_FROM => {
                drive::<S, M, Q6K_SIGNED, TT6, TT6_PAIR>(m, nrows, act, ntok, out, ldo)
            }
            DType::Q6_K => drive::<S, M, Q6K, TT6, TT6_PAIR>(m, nrows, act, ntok, out, ldo),
            other => panic!("{other} has no tiled kernel"),
        }
    }

    /// The matrix `w` of `nrows` rows as the kernels walk it.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn with_layout<S: Isa, const TT: usize, const TT_PAIR: usize, const TT6: usize, const TT6_PAIR: usize>(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        interleaved: bool,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let supers = act.len() / ntok / ACT_PER_SUPER;
        let bb = dtype.block_bytes();
        if interleaved {
            let m = Interleaved { w: w.as_ptr(), supers, bb };
            by_format::<S, _, TT, TT_PAIR, TT6, TT6_PAIR>(dtype, m, nrows, act, ntok, out, ldo)
        } else {
            let m = RowMajor { w: w.as_ptr(), rb: w.len() / nrows, bb };
            by_format::<S, _, TT, TT_PAIR, TT6, TT6_PAIR>(dtype, m, nrows, act, ntok, out, ldo)
        }
    }

    /// A single token's product ([`drive_one`]) at `S`, for each layout and format.
    #[inline(always)]
    unsafe fn one_token<S: Isa, const H: i32>(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        interleaved: bool,
        act: &[Q8Block],
        out: &mut [f32],
    ) {
        let supers = act.len() / ACT_PER_SUPER;
        let bb = dtype.block_bytes();
        let q4k = dtype == DType::Q4_K;
        if interleaved {
            let m = Interleaved { w: w.as_ptr(), supers, bb };
            if q4k {
                drive_one::<S, _, Q4K, H>(m, nrows, act, out)
            } else {
                drive_one::<S, _, Q6K, H>(m, nrows, act, out)
            }
        } else {
            let m = RowMajor { w: w.as_ptr(), rb: w.len() / nrows, bb };
            if q4k {
                drive_one::<S, _, Q4K, H>(m, nrows, act, out)
            } else {
                drive_one::<S, _, Q6K, H>(m, nrows, act, out)
            }
        }
    }

    /// Generates the one-token entry point `$name` at ISA `$isa` with `$features`: a function
    /// of its own, so that its registers are allocated apart from the many-token tiles' (inlined
    /// into one function, AVX2's 16 registers spilled in the one-token loops). It prefetches
    /// with `_MM_HINT_NTA` where [`crate::cpu::one_token_prefetch_nta`] says so, else into L2:
    /// an instance per hint, each with it as a constant.
    macro_rules! one_token_fn {
        ($name:ident, $isa:ty, $features:literal) => {
            #[target_feature(enable = $features)]
            #[inline(never)]
            unsafe fn $name(dtype: DType, w: &[u8], nrows: usize, interleaved: bool, act: &[Q8Block], out: &mut [f32]) {
                #[target_feature(enable = $features)]
                #[inline(never)]
                unsafe fn at<const H: i32>(
                    dtype: DType,
                    w: &[u8],
                    nrows: usize,
                    interleaved: bool,
                    act: &[Q8Block],
                    out: &mut [f32],
                ) {
                    one_token::<$isa, H>(dtype, w, nrows, interleaved, act, out)
                }
                if crate::cpu::one_token_prefetch_nta() {
                    at::<_MM_HINT_NTA>(dtype, w, nrows, interleaved, act, out)
                } else {
                    at::<_MM_HINT_T1>(dtype, w, nrows, interleaved, act, out)
                }
            }
        };
    }

    one_token_fn!(one_avx2, Ymm8<false>, "avx2,fma,f16c");
    one_token_fn!(one_avx2_vnni, Ymm8<true>, "avx2,fma,f16c,avxvnni");
    one_token_fn!(one_avx512, Zmm<false>, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");
    one_token_fn!(one_avx512_vnni, Zmm<true>, "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c");

    /// Whether [`one_token`] takes the product (a single token of Q4_K or Q6_K).
    fn is_one_token(dtype: DType, ntok: usize) -> bool {
        ntok == 1 && matches!(dtype, DType::Q4_K | DType::Q6_K)
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `dtype` is Q4_K, Q5_K or Q6_K and the shapes are as
    /// [`super::gemm`] checks (`nrows`, `ntok` > 0; `w` in the layout `interleaved` says).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_avx2(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        interleaved: bool,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        if is_one_token(dtype, ntok) {
            return one_avx2(dtype, w, nrows, interleaved, act, out);
        }
        with_layout::<Ymm<false>, 2, 0, 4, 0>(dtype, w, nrows, interleaved, act, ntok, out, ldo)
    }

    /// # Safety
    /// As [`gemm_avx2`], with AVX-VNNI (`vpdpbusd` on 256-bit registers, VEX-encoded: Intel's
    /// cores since Alder Lake and Sapphire Rapids, AMD's since Zen 5).
    ///
    /// Register tiles of 3 tokens: without the i16 sums of `pmaddubsw`, a third token's
    /// accumulators fit in AVX2's 16 registers. Q4_K, 64 tokens, 1024 / 3072 / 4864 columns
    /// (`bench_gemm_ns_per_pair`, ns per pair): 2 tokens 7.8 / 24.0 / 37.9, 3 tokens 7.3 / 22.2 /
    /// 34.2, 4 tokens 11.3 / 33.7 / 53.3 (spilling). Q6_K keeps 4 (3 and 2 were no faster).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn gemm_avx2_vnni(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        interleaved: bool,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        if is_one_token(dtype, ntok) {
            return one_avx2_vnni(dtype, w, nrows, interleaved, act, out);
        }
        with_layout::<Ymm<true>, 3, 0, 4, 0>(dtype, w, nrows, interleaved, act, ntok, out, ldo)
    }

    /// # Safety
    /// As [`gemm_avx2`], with AVX-512 F/BW/VL/DQ.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub unsafe fn gemm_avx512(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        interleaved: bool,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        if is_one_token(dtype, ntok) {
            return one_avx512(dtype, w, nrows, interleaved, act, out);
        }
        with_layout::<Zmm<false>, 8, 0, 8, 0>(dtype, w, nrows, interleaved, act, ntok, out, ldo)
    }

    /// # Safety
    /// As [`gemm_avx512`], with AVX-512 VNNI.
    ///
    /// Q4_K in register tiles of 4 tokens, two row groups at a time in tiles of 2 from
    /// [`PAIR_MIN_TOKENS`] tokens; Q6_K in tiles of 4, paired in tiles of 4. For Q4_K (Zen 5,
    /// 2 threads, interleaved matrices through `matmul`, GMAC/s, one process alternating the
    /// variants, medians of 9): 3072 x 1024 by 64 tokens 497 with 8-token tiles, 547 with 4,
    /// 582 paired by 2 (570 by 3, 344 by 4: spilling); 9728 x 2560 by 512: 536 / 608 / 642;
    /// 2560 x 9728 by 512: 420 / 513 / 553; 4096 x 2560 by 16: 471 / 522 / 529. Eight tokens'
    /// accumulators, with the float steps' operands, had spilled to the stack (64 stores a
    /// super-block); 5 tokens measured as 4, 6 as 8.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn gemm_avx512_vnni(
        dtype: DType,
        w: &[u8],
        nrows: usize,
        interleaved: bool,
        act: &[Q8Block],
        ntok: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        if is_one_token(dtype, ntok) {
            return one_avx512_vnni(dtype, w, nrows, interleaved, act, out);
        }
        with_layout::<Zmm<true>, 4, 2, 4, 4>(dtype, w, nrows, interleaved, act, ntok, out, ldo)
    }

    /// A tiled kernel: `(dtype, w, nrows, interleaved, act, ntok, out, ldo)`.
    #[cfg(test)]
    pub(super) type Gemm = unsafe fn(DType, &[u8], usize, bool, &[Q8Block], usize, &mut [f32], usize);

    /// Every tiled kernel this CPU runs, by name, for tests.
    #[cfg(test)]
    pub(super) fn kernels() -> Vec<(&'static str, Gemm)> {
        use crate::cpu::{avx_vnni_detected, detected, has_avx512_vnni, SimdLevel};
        let mut out: Vec<(&'static str, Gemm)> = Vec::new();
        if detected() >= SimdLevel::Avx2 {
            out.push(("gemm_avx2", gemm_avx2));
            if avx_vnni_detected() {
                out.push(("gemm_avx2_vnni", gemm_avx2_vnni));
            }
        }
        if detected() >= SimdLevel::Avx512 {
            out.push(("gemm_avx512", gemm_avx512));
            if has_avx512_vnni() {
                out.push(("gemm_avx512_vnni", gemm_avx512_vnni));
            }
        }
        out
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

    const FORMATS: [DType; 5] = [DType::Q4_K, DType::Q6_K, DType::Q5_K, DType::Q3_K, DType::Q2_K];

    fn random_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    fn quantized_row(dtype: DType, w: &[f32]) -> Vec<u8> {
        let mut row = vec![0u8; dtype.row_bytes(w.len()).unwrap()];
        quant::quantize_row(dtype, w, &mut row);
        row
    }

    fn dequantized_act(act: &[Q8Block]) -> Vec<f32> {
        act.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect()
    }

    /// Byte offsets of the f16 `d` and (if any) `dmin` fields of one super-block.
    fn scale_fields(dtype: DType) -> (usize, Option<usize>) {
        match dtype {
            DType::Q4_K | DType::Q5_K => (0, Some(2)),
            DType::Q6_K => (208, None),
            DType::Q3_K => (108, None),
            DType::Q2_K => (80, Some(82)),
            _ => unreachable!(),
        }
    }

    /// Σ |term| of the dot in f64, counting a format's scaled quants and its mins separately
    /// (their float products are what the kernels round), for relative tolerances.
    fn magnitude(dtype: DType, row: &[u8], x: &[f32]) -> f64 {
        let w = quant::dequantize(dtype, row, x.len());
        let (_, dmin_at) = scale_fields(dtype);
        let mut no_min = row.to_vec();
        if let Some(at) = dmin_at {
            for blk in no_min.chunks_mut(dtype.block_bytes()) {
                blk[at..at + 2].fill(0);
            }
        }
        let wq = quant::dequantize(dtype, &no_min, x.len());
        w.iter()
            .zip(&wq)
            .zip(x)
            .map(|((&w, &q), &x)| ((q as f64).abs() + (q - w).abs() as f64) * (x as f64).abs())
            .sum()
    }

    fn exact_dot(dtype: DType, row: &[u8], x: &[f32]) -> f64 {
        let w = quant::dequantize(dtype, row, x.len());
        w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    /// Every level against the scalar version, and the scalar version against the exact dot of
    /// the dequantized row with the dequantized activations.
    fn check_levels(dtype: DType, row: &[u8], act: &[Q8Block], what: &str) {
        let x = dequantized_act(act);
        let scale = magnitude(dtype, row, &x).max(1e-30);
        let want = dot_q8(SimdLevel::Scalar, dtype, row, act);
        let exact = exact_dot(dtype, row, &x);
        assert!(
            (want as f64 - exact).abs() <= 1e-5 * scale,
            "{dtype} {what}: scalar {want} vs exact {exact} (magnitude {scale})"
        );
        for level in SimdLevel::available() {
            let got = dot_q8(level, dtype, row, act);
            assert!(
                (got as f64 - want as f64).abs() <= 1e-5 * scale,
                "{dtype} {what} {level:?}: {got} vs scalar {want} (magnitude {scale})"
            );
        }
        // Every kernel the CPU runs, including those its dispatch does not pick.
        #[cfg(target_arch = "x86_64")]
        for (name, kernel) in x86::kernels(dtype) {
            // SAFETY: `kernels` lists only what the CPU runs; `dot_q8` above checked lengths.
            let got = unsafe { kernel(row, act) };
            assert!(
                (got as f64 - want as f64).abs() <= 1e-5 * scale,
                "{dtype} {what} {name}: {got} vs scalar {want} (magnitude {scale})"
            );
        }
    }

    /// A super-block of random bytes with sane f16 scale fields.
    fn random_block(rng: &mut StdRng, dtype: DType) -> Vec<u8> {
        let mut b: Vec<u8> = (0..dtype.block_bytes()).map(|_| rng.random()).collect();
        let (d_at, dmin_at) = scale_fields(dtype);
        for at in std::iter::once(d_at).chain(dmin_at) {
            let v = half::f16::from_f32(rng.random_range(-0.01f32..0.01));
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn random_act(rng: &mut StdRng, blocks: usize) -> Vec<Q8Block> {
        (0..blocks)
            .map(|_| {
                let qs: [i8; 32] = std::array::from_fn(|_| rng.random_range(-127..=127));
                let d = rng.random_range(0.0f32..0.05);
                Q8Block { d, s: d * qs.iter().map(|&q| q as i32).sum::<i32>() as f32, qs }
            })
            .collect()
    }

    #[test]
    fn levels_match_scalar_on_quantized_rows() {
        let mut rng = StdRng::seed_from_u64(11);
        for dtype in FORMATS {
            for supers in [1, 2, 5] {
                let n = supers * QK_K;
                let row = quantized_row(dtype, &random_vec(&mut rng, n, 1.0));
                let act = quantize_q8_vec(&random_vec(&mut rng, n, 3.0));
                check_levels(dtype, &row, &act, &format!("{supers} super-blocks"));
            }
        }
    }

    #[test]
    fn levels_match_scalar_on_random_bytes() {
        // Random bytes reach every scale, min and quant code, including negative Q3_K/Q6_K
        // scales and Q4_K/Q5_K mins.
        let mut rng = StdRng::seed_from_u64(12);
        for dtype in FORMATS {
            for supers in [1, 2, 5] {
                for _ in 0..20 {
                    let row: Vec<u8> = (0..supers).flat_map(|_| random_block(&mut rng, dtype)).collect();
                    let act = random_act(&mut rng, supers * ACT_PER_SUPER);
                    check_levels(dtype, &row, &act, &format!("random bytes, {supers} super-blocks"));
                }
            }
        }
    }

    #[test]
    fn scalar_matches_float_reference_within_activation_rounding() {
        let mut rng = StdRng::seed_from_u64(13);
        for dtype in FORMATS {
            for supers in [1, 2, 5] {
                let n = supers * QK_K;
                let row = quantized_row(dtype, &random_vec(&mut rng, n, 1.0));
                let x = random_vec(&mut rng, n, 2.0);
                let act = quantize_q8_vec(&x);
                let got = dot_q8(SimdLevel::Scalar, dtype, &row, &act);
                let want = quant::dot_row(dtype, &row, &x);
                // Each activation moved by at most half its block's step.
                let w = quant::dequantize(dtype, &row, n);
                let rounding: f32 =
                    w.chunks(32).zip(&act).map(|(w, a)| a.d * 0.5 * w.iter().map(|v| v.abs()).sum::<f32>()).sum();
                let scale: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                assert!(
                    (got - want).abs() <= rounding + 1e-5 * scale,
                    "{dtype} {supers}: {got} vs {want} (rounding bound {rounding})"
                );
                assert!((got - want).abs() <= 1e-2 * scale, "{dtype} {supers}: {got} vs {want} (Σ|wx| {scale})");
            }
        }
    }

    #[test]
    fn extreme_blocks() {
        for dtype in FORMATS {
            let bb = dtype.block_bytes();
            let (d_at, dmin_at) = scale_fields(dtype);
            for fill in [0x00u8, 0xFF, 0x80, 0x7F, 0xAA, 0x55] {
                for d in [1.0f32, -1.0, 65504.0, 6.0e-8] {
                    let mut block = vec![fill; bb];
                    for at in std::iter::once(d_at).chain(dmin_at) {
                        block[at..at + 2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                    }
                    let row = [block.clone(), block].concat();
                    for q in [127i8, -127, 1, 0] {
                        let act: Vec<Q8Block> = (0..2 * ACT_PER_SUPER)
                            .map(|i| {
                                let qs: [i8; 32] = std::array::from_fn(|l| if (l + i) % 3 == 0 { -q } else { q });
                                let d = 1.0 / 127.0;
                                Q8Block { d, s: d * qs.iter().map(|&v| v as i32).sum::<i32>() as f32, qs }
                            })
                            .collect();
                        check_levels(dtype, &row, &act, &format!("fill {fill:#x}, d {d}, q {q}"));
                        let same: Vec<Q8Block> =
                            act.iter().map(|b| Q8Block { s: b.d * 32.0 * q as f32, qs: [q; 32], ..*b }).collect();
                        check_levels(dtype, &row, &same, &format!("fill {fill:#x}, d {d}, all q {q}"));
                    }
                }
            }
        }
    }

    #[test]
    fn unpacked_scales_match_the_layout() {
        let mut rng = StdRng::seed_from_u64(14);
        for _ in 0..100 {
            let s: [u8; 12] = std::array::from_fn(|_| rng.random());
            let (sc, m) = k4_scales_mins(&s);
            for j in 0..8 {
                let want = if j < 4 {
                    (s[j] & 63, s[j + 4] & 63)
                } else {
                    ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
                };
                assert_eq!((sc[j], m[j]), want, "Q4_K scale/min {j} of {s:?}");
            }
            let q3 = q3_k_scales(&s);
            for (j, &v) in q3.iter().enumerate() {
                let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
                let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
                assert_eq!(v, (low | (high << 4)) as i8 - 32, "Q3_K scale {j} of {s:?}");
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
    #[should_panic]
    fn rejects_partial_super_block() {
        dot_q8(SimdLevel::Scalar, DType::Q4_K, &[0; 144], &[Q8Block::default(); 4]);
    }

    #[test]
    #[should_panic]
    fn rejects_wrong_row_length() {
        dot_q8(SimdLevel::Scalar, DType::Q6_K, &[0; 209], &[Q8Block::default(); 8]);
    }

    /// A tile's products: `(w, nrows, act, ntok, out, ldo)`.
    type GemmFn = Box<dyn Fn(&[u8], usize, &[Q8Block], usize, &mut [f32], usize)>;

    /// Every way the CPU can compute a tile of `dtype`: `gemm` at each level, and each tiled
    /// kernel directly (including those the dispatch does not pick, e.g. AVX-512 without VNNI).
    fn gemm_variants(dtype: DType) -> Vec<(String, GemmFn)> {
        let mut out: Vec<(String, GemmFn)> = Vec::new();
        for level in SimdLevel::available() {
            out.push((
                format!("gemm {level:?}"),
                Box::new(move |w, nrows, act, ntok, o, ldo| {
                    gemm(level, dtype, w, nrows, Layout::Rows, act, ntok, o, ldo)
                }),
            ));
        }
        if !crate::dot::interleaves(dtype) {
            return out;
        }
        // The interleaved layout: the rows are rearranged inside the call.
        for level in SimdLevel::available() {
            out.push((
                format!("gemm_interleaved {level:?}"),
                Box::new(move |w, nrows, act, ntok, o, ldo| {
                    let packed = crate::dot::interleave(dtype, nrows, act.len() / ntok * 32, w);
                    gemm(level, dtype, &packed, nrows, Layout::Interleaved, act, ntok, o, ldo)
                }),
            ));
        }
        #[cfg(target_arch = "x86_64")]
        for (name, kernel) in tiled::kernels() {
            for interleaved in [false, true] {
                out.push((
                    format!("{name} interleaved {interleaved}"),
                    Box::new(move |w, nrows, act, ntok, o, ldo| {
                        assert!(nrows > 0 && ntok > 0 && o.len() >= (ntok - 1) * ldo + nrows);
                        let packed;
                        let w = if interleaved {
                            packed = crate::dot::interleave(dtype, nrows, act.len() / ntok * 32, w);
                            &packed[..]
                        } else {
                            w
                        };
                        // SAFETY: `kernels` lists only what the CPU runs; the tests pass whole
                        // super-blocks of matching widths, and the output was checked above.
                        unsafe { kernel(dtype, w, nrows, interleaved, act, ntok, o, ldo) }
                    }),
                ));
            }
        }
        out
    }

    /// `nrows` rows of `supers` super-blocks (quantized from random floats, or random bytes with
    /// sane scale fields) and `ntok` tokens of random activations.
    fn random_tile(
        rng: &mut StdRng,
        dtype: DType,
        nrows: usize,
        ntok: usize,
        supers: usize,
        bytes: bool,
    ) -> (Vec<u8>, Vec<Q8Block>) {
        let n = supers * QK_K;
        let w: Vec<u8> = (0..nrows)
            .flat_map(|_| {
                if bytes {
                    (0..supers).flat_map(|_| random_block(rng, dtype)).collect::<Vec<u8>>()
                } else {
                    quantized_row(dtype, &random_vec(rng, n, 1.0))
                }
            })
            .collect();
        let act = if bytes { random_act(rng, ntok * n / 32) } else { quantize_q8_vec(&random_vec(rng, ntok * n, 3.0)) };
        (w, act)
    }

    #[test]
    fn gemm_matches_scalar_dots() {
        let mut rng = StdRng::seed_from_u64(17);
        // One partial row group; then two groups and a partial one (with 5 tokens, Q6_K's
        // unsigned columns; with 11, its signed ones; with 33, the paired row groups' register
        // tiles of Q4_K and Q6_K and a token left over).
        for (dtype, (nrows, ntok, ldo)) in
            FORMATS.into_iter().flat_map(|d| [(13, 11, 15), (45, 5, 47), (45, 11, 47), (45, 33, 47)].map(|s| (d, s)))
        {
            for supers in [1, 2, 7] {
                for bytes in [false, true] {
                    let (w, act) = random_tile(&mut rng, dtype, nrows, ntok, supers, bytes);
                    let (rb, nb) = (w.len() / nrows, act.len() / ntok);
                    for (name, f) in gemm_variants(dtype) {
                        let mut out = vec![f32::NAN; (ntok - 1) * ldo + nrows];
                        f(&w, nrows, &act, ntok, &mut out, ldo);
                        for t in 0..ntok {
                            let a = &act[t * nb..(t + 1) * nb];
                            let x = dequantized_act(a);
                            for r in 0..nrows {
                                let row = &w[r * rb..(r + 1) * rb];
                                let want = dot_q8(SimdLevel::Scalar, dtype, row, a);
                                let got = out[t * ldo + r];
                                let scale = magnitude(dtype, row, &x).max(1e-30);
                                assert!(
                                    (got as f64 - want as f64).abs() <= 1e-5 * scale,
                                    "{dtype} {name} {supers} super-blocks, bytes {bytes}, ({r},{t}): {got} vs \
                                     scalar {want} (magnitude {scale})"
                                );
                            }
                            // The stride's gap is left alone.
                            if t + 1 < ntok {
                                assert!(out[t * ldo + nrows..(t + 1) * ldo].iter().all(|v| v.is_nan()));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_matches_scalar_on_extreme_blocks() {
        for dtype in FORMATS {
            let bb = dtype.block_bytes();
            let (d_at, dmin_at) = scale_fields(dtype);
            for fill in [0x00u8, 0xFF, 0x80, 0x7F, 0xAA, 0x55] {
                for d in [1.0f32, -1.0, 65504.0, 6.0e-8] {
                    let mut block = vec![fill; bb];
                    for at in std::iter::once(d_at).chain(dmin_at) {
                        block[at..at + 2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                    }
                    let w = [block.clone(), block.clone(), block.clone(), block].concat();
                    let act: Vec<Q8Block> = [127i8, -127, 1, 0]
                        .into_iter()
                        .flat_map(|q| {
                            (0..2 * ACT_PER_SUPER).map(move |i| {
                                let qs: [i8; 32] = std::array::from_fn(|l| if (l + i) % 3 == 0 { -q } else { q });
                                let d = 1.0 / 127.0;
                                Q8Block { d, s: d * qs.iter().map(|&v| v as i32).sum::<i32>() as f32, qs }
                            })
                        })
                        .collect();
                    let (nrows, ntok, nb) = (2, 4, 2 * ACT_PER_SUPER);
                    let rb = w.len() / nrows;
                    for (name, f) in gemm_variants(dtype) {
                        let mut out = vec![0f32; nrows * ntok];
                        f(&w, nrows, &act, ntok, &mut out, nrows);
                        for t in 0..ntok {
                            let a = &act[t * nb..(t + 1) * nb];
                            for r in 0..nrows {
                                let row = &w[r * rb..(r + 1) * rb];
                                let want = dot_q8(SimdLevel::Scalar, dtype, row, a);
                                let scale = magnitude(dtype, row, &dequantized_act(a)).max(1e-30);
                                let got = out[t * nrows + r];
                                assert!(
                                    (got as f64 - want as f64).abs() <= 1e-5 * scale,
                                    "{dtype} {name} fill {fill:#x}, d {d} ({r},{t}): {got} vs scalar {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_is_batch_invariant() {
        let mut rng = StdRng::seed_from_u64(18);
        // Sub-tiles (first row, rows, first token, tokens) of 13 rows (one partial group) and of
        // 45 (two groups at a time, then a partial one).
        type SubTiles = &'static [(usize, usize, usize, usize)];
        let shapes: [(usize, SubTiles); 2] = [
            (13, &[(6, 5, 7, 3), (1, 12, 0, 11), (0, 13, 5, 1), (12, 1, 2, 9)]),
            (45, &[(6, 37, 7, 4), (0, 45, 2, 6), (16, 29, 0, 11), (3, 33, 1, 9)]),
        ];
        for (dtype, (nrows, subs)) in FORMATS.into_iter().flat_map(|d| shapes.map(|s| (d, s))) {
            let (ntok, supers) = (11, 3);
            let (w, act) = random_tile(&mut rng, dtype, nrows, ntok, supers, true);
            let (rb, nb) = (w.len() / nrows, act.len() / ntok);
            for (name, f) in gemm_variants(dtype) {
                let mut whole = vec![0f32; ntok * nrows];
                f(&w, nrows, &act, ntok, &mut whole, nrows);
                let at = |r: usize, t: usize| whole[t * nrows + r].to_bits();
                // One pair at a time.
                for t in 0..ntok {
                    for r in 0..nrows {
                        let mut one = [0f32];
                        f(&w[r * rb..(r + 1) * rb], 1, &act[t * nb..(t + 1) * nb], 1, &mut one, 1);
                        assert_eq!(one[0].to_bits(), at(r, t), "{dtype} {name} ({r},{t}) alone");
                    }
                }
                // Sub-tiles at offsets, into a wider output.
                for &(r0, nr, t0, nt) in subs {
                    let ldo = nr + 3;
                    let mut sub = vec![0f32; (nt - 1) * ldo + nr];
                    f(&w[r0 * rb..(r0 + nr) * rb], nr, &act[t0 * nb..(t0 + nt) * nb], nt, &mut sub, ldo);
                    for t in 0..nt {
                        for r in 0..nr {
                            assert_eq!(
                                sub[t * ldo + r].to_bits(),
                                at(r0 + r, t0 + t),
                                "{dtype} {name} ({},{}) in a {nr} x {nt} tile at ({r0},{t0})",
                                r0 + r,
                                t0 + t
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_is_batch_invariant_past_one_token_chunk() {
        // 70 tokens (more than a kernel keeps at once) x 17 rows (two row groups).
        let mut rng = StdRng::seed_from_u64(19);
        for dtype in [DType::Q4_K, DType::Q6_K, DType::Q5_K] {
            let (nrows, ntok) = (17, 70);
            let (w, act) = random_tile(&mut rng, dtype, nrows, ntok, 1, true);
            let (rb, nb) = (w.len() / nrows, act.len() / ntok);
            for (name, f) in gemm_variants(dtype) {
                let mut whole = vec![0f32; ntok * nrows];
                f(&w, nrows, &act, ntok, &mut whole, nrows);
                for t in 0..ntok {
                    let mut col = vec![0f32; nrows];
                    f(&w, nrows, &act[t * nb..(t + 1) * nb], 1, &mut col, nrows);
                    for r in 0..nrows {
                        assert_eq!(col[r].to_bits(), whole[t * nrows + r].to_bits(), "{dtype} {name} ({r},{t})");
                    }
                }
                let mut one = [0f32];
                f(&w[16 * rb..17 * rb], 1, &act[69 * nb..70 * nb], 1, &mut one, 1);
                assert_eq!(one[0].to_bits(), whole[69 * nrows + 16].to_bits(), "{dtype} {name} (16,69) alone");
            }
        }
    }

    #[test]
    fn simd_levels_give_the_same_bits() {
        // The float steps are lane-wise and the same at every SIMD level, so any level may take
        // any product of a batch (decode at one width, prefill at another) without changing a bit.
        let mut rng = StdRng::seed_from_u64(23);
        for dtype in FORMATS {
            for ntok in [1, 2, 5, 19] {
                let nrows = 37;
                let (w, act) = random_tile(&mut rng, dtype, nrows, ntok, 3, ntok % 2 == 1);
                let mut first: Option<(String, Vec<u32>)> = None;
                let mut compared = 0;
                for (name, f) in gemm_variants(dtype) {
                    if name.contains("Scalar") {
                        continue;
                    }
                    compared += 1;
                    let mut out = vec![0f32; ntok * nrows];
                    f(&w, nrows, &act, ntok, &mut out, nrows);
                    let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    match &first {
                        None => first = Some((name, bits)),
                        Some((n0, b0)) => assert!(b0 == &bits, "{dtype} {ntok} tokens: {name} differs from {n0}"),
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if crate::cpu::detected() >= SimdLevel::Avx2 {
                    assert!(compared >= 2, "{dtype}: only {compared} SIMD variants");
                }
            }
        }
    }

    #[test]
    fn gemm_of_empty_rows_is_zero() {
        for dtype in FORMATS {
            for (name, f) in gemm_variants(dtype) {
                let mut out = [f32::NAN; 6];
                f(&[], 3, &[], 2, &mut out, 3);
                assert_eq!(out, [0.0; 6], "{dtype} {name}");
            }
        }
    }

    /// The fastest of `rounds` timings of `f`, in ns per call.
    fn best_ns(rounds: usize, calls: usize, mut f: impl FnMut()) -> f64 {
        let mut ns = f64::INFINITY;
        for _ in 0..rounds {
            let t = Instant::now();
            for _ in 0..calls {
                f();
            }
            ns = ns.min(t.elapsed().as_nanos() as f64 / calls as f64);
        }
        ns
    }

    #[test]
    #[ignore = "benchmark: cargo test --release -p pio-kernels dot::kquants -- --ignored --nocapture"]
    fn bench_gemm_ns_per_pair() {
        // A matmul tile (16 rows x 1 or 64 tokens) at Qwen3-0.6B widths: ns per (row, token)
        // for the tiled kernel ("gemm") and for one `dot_q8` per pair ("dots"), both hot in
        // cache; then decode streaming a matrix far larger than L2, ns per row.
        const ROWS: usize = 16;
        let mut rng = StdRng::seed_from_u64(16);
        let only: Option<DType> =
            std::env::var("PIO_BENCH_DTYPE").ok().and_then(|v| FORMATS.into_iter().find(|d| d.to_string() == v));
        for dtype in FORMATS.into_iter().filter(|&d| only.is_none_or(|o| o == d)) {
            for cols in [1024, 3072, 4864] {
                let w: Vec<u8> =
                    (0..ROWS).flat_map(|_| quantized_row(dtype, &random_vec(&mut rng, cols, 1.0))).collect();
                let tokens = crate::dot::bench_tokens(&[1, 8, 16, 64]);
                for &ntok in &tokens {
                    let act = quantize_q8_vec(&random_vec(&mut rng, cols * ntok, 1.0));
                    let mut out = vec![0f32; ROWS * ntok];
                    let mut line = format!("{dtype} {cols:>4} cols, {ntok:>2} tok, ns/pair:");
                    for level in SimdLevel::available().into_iter().filter(|&l| l != SimdLevel::Scalar) {
                        let calls = (200_000 / (cols / 256 * ntok * ROWS)).max(1);
                        let pairs = (ROWS * ntok) as f64;
                        let dots = best_ns(10, calls, || {
                            crate::dot::gemm_q8_by_dots(
                                level,
                                dtype,
                                black_box(&w),
                                ROWS,
                                black_box(&act),
                                ntok,
                                &mut out,
                                ROWS,
                            )
                        }) / pairs;
                        let tiled = best_ns(10, calls, || {
                            gemm(level, dtype, black_box(&w), ROWS, Layout::Rows, black_box(&act), ntok, &mut out, ROWS)
                        }) / pairs;
                        let packed = crate::dot::interleave(dtype, ROWS, cols, &w);
                        let inter = best_ns(10, calls, || {
                            gemm(
                                level,
                                dtype,
                                black_box(&packed),
                                ROWS,
                                Layout::Interleaved,
                                black_box(&act),
                                ntok,
                                &mut out,
                                ROWS,
                            )
                        }) / pairs;
                        black_box(&out);
                        line += &format!(
                            "  {} dots {dots:6.1} gemm {tiled:6.1} ({:.1}x) interleaved {inter:6.1}",
                            level.name(),
                            dots / tiled
                        );
                    }
                    println!("{line}");
                }
            }
            // Decode streaming ~23 MiB of weights (16-row tiles, as matmul runs them), or
            // `PIO_BENCH_MIB` MiB: 23 MiB sits in a 32 MiB L3 (Zen 5), where the line reads
            // 38.8 ns per Q4_K row at AVX-512 against 52-54 from 255 MiB.
            let cols = 3072;
            let rb = dtype.row_bytes(cols).unwrap();
            let mib: usize = std::env::var("PIO_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
            let rows = ((mib << 20) / rb / ROWS).max(1) * ROWS;
            let row0 = quantized_row(dtype, &random_vec(&mut rng, cols, 1.0));
            let w: Vec<u8> = (0..rows).flat_map(|_| row0.iter().copied()).collect();
            let act = quantize_q8_vec(&random_vec(&mut rng, cols, 1.0));
            let mut out = [0f32; ROWS];
            let mut line = format!("{dtype} decode {rows} x {cols} ({} MiB), ns/row:", w.len() >> 20);
            for level in SimdLevel::available().into_iter().filter(|&l| l != SimdLevel::Scalar) {
                let run = |tiled: bool, out: &mut [f32; ROWS]| {
                    for tile in w.chunks_exact(ROWS * rb) {
                        if tiled {
                            gemm(level, dtype, black_box(tile), ROWS, Layout::Rows, black_box(&act), 1, out, ROWS);
                        } else {
                            crate::dot::gemm_q8_by_dots(
                                level,
                                dtype,
                                black_box(tile),
                                ROWS,
                                black_box(&act),
                                1,
                                out,
                                ROWS,
                            );
                        }
                    }
                };
                let packed = crate::dot::interleave(dtype, rows, cols, &w);
                let run_packed = |out: &mut [f32; ROWS]| {
                    for tile in packed.chunks_exact(packed.len() / (rows / ROWS)) {
                        gemm(level, dtype, black_box(tile), ROWS, Layout::Interleaved, black_box(&act), 1, out, ROWS);
                    }
                };
                // Alternating, so neither side always runs first.
                let (mut dots, mut tiled, mut inter) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
                for _ in 0..5 {
                    dots = dots.min(best_ns(2, 1, || run(false, &mut out)) / rows as f64);
                    tiled = tiled.min(best_ns(2, 1, || run(true, &mut out)) / rows as f64);
                    inter = inter.min(best_ns(2, 1, || run_packed(&mut out)) / rows as f64);
                }
                black_box(&out);
                line += &format!("  {} dots {dots:6.1} gemm {tiled:6.1} interleaved {inter:6.1}", level.name());
            }
            println!("{line}");
        }
    }

    #[test]
    #[ignore = "benchmark: cargo test --release -p pio-kernels dot::kquants -- --ignored --nocapture"]
    fn bench_ns_per_row() {
        const N: usize = 4096;
        const ITERS: u32 = 10_000;
        let mut rng = StdRng::seed_from_u64(15);
        // The formats with SIMD row dots (the others dot rows only in the scalar reference).
        for dtype in [DType::Q3_K, DType::Q2_K] {
            let row = quantized_row(dtype, &random_vec(&mut rng, N, 1.0));
            let act = quantize_q8_vec(&random_vec(&mut rng, N, 1.0));
            let mut line = format!("{dtype} {N}-long row:");
            for level in SimdLevel::available() {
                // Ten batches of ITERS / 10; the fastest batch is the least disturbed.
                let mut sink = 0f32;
                let mut ns = f64::INFINITY;
                for _ in 0..10 {
                    let t = Instant::now();
                    for _ in 0..ITERS / 10 {
                        sink += dot_q8(level, dtype, black_box(&row), black_box(&act));
                    }
                    ns = ns.min(t.elapsed().as_nanos() as f64 / (ITERS / 10) as f64);
                }
                black_box(sink);
                line += &format!("  {} {ns:.0} ns", level.name());
            }
            println!("{line}");
        }
    }
}
