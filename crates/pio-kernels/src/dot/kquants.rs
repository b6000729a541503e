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
//! The SIMD versions follow llama.cpp's technique: `maddubs` multiplies the unsigned weight
//! quants by the signed activation quants into i16 pairs (centred formats subtract
//! `maddubs(offset, q_a)`), `madd` with the 16-wide sub-block scales (or with ones) widens to
//! i32, and one FMA per Q8Block applies the float scale. With AVX-512 VNNI, `vpdpbusd` does the
//! multiply and the widening in one instruction.
//!
//! AVX-512 (512-bit, two Q8Blocks per register) is used for Q4_K and Q6_K, where it measured
//! faster than AVX2 on a Sapphire Rapids core; Q5_K, Q3_K and Q2_K run their AVX2 code at the
//! AVX-512 level.

use crate::act::Q8Block;
use crate::cpu::SimdLevel;
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
        SimdLevel::Scalar => dot_scalar(dtype, row, act),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level` comes from `cpu::level()` (or `SimdLevel::available()`), which only
        // reports what the CPU has; lengths were asserted above.
        SimdLevel::Avx2 => unsafe { x86::dot_avx2(dtype, row, act) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx512 => unsafe { x86::dot_avx512(dtype, row, act) },
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

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` holds `act.len() / 8` super-blocks of `dtype`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        match dtype {
            DType::Q4_K => q4_k_avx2(row, act),
            DType::Q6_K => q6_k_avx2(row, act),
            DType::Q5_K => q5_k_avx2(row, act),
            DType::Q3_K => q3_k_avx2(row, act),
            DType::Q2_K => q2_k_avx2(row, act),
            other => panic!("{other} is not a K format"),
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ, FMA and F16C; `row` holds `act.len() / 8` super-blocks
    /// of `dtype`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub unsafe fn dot_avx512(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        // Measured per 4096-weight row on a Sapphire Rapids core (see the module docs): Q4_K and
        // Q5_K gain from VNNI but not from 512-bit registers (twice the work per instruction,
        // but two vector ports instead of three, and the two activation blocks of a register
        // cost an insert); Q6_K gains from both. Q3_K and Q2_K have no AVX-512 versions.
        let vnni = crate::cpu::has_avx512_vnni();
        match dtype {
            // The VNNI kernels run only when the CPU has AVX-512 VNNI.
            DType::Q4_K if vnni => q4_k_vnni(row, act),
            DType::Q5_K if vnni => q5_k_vnni(row, act),
            DType::Q6_K if vnni => q6_k_avx512_vnni(row, act),
            DType::Q6_K => q6_k_avx512(row, act),
            _ => dot_avx2(dtype, row, act),
        }
    }

    /// Every x86 kernel of `dtype` this CPU runs, by name, for tests.
    #[cfg(test)]
    pub(super) fn kernels(dtype: DType) -> Vec<(&'static str, Kernel)> {
        let level = crate::cpu::detected();
        let vnni = crate::cpu::has_avx512_vnni();
        let mut out: Vec<(&'static str, Kernel)> = Vec::new();
        let mut add = |ok: bool, name, f: Kernel| {
            if ok {
                out.push((name, f));
            }
        };
        let avx2 = level >= crate::cpu::SimdLevel::Avx2;
        let avx512 = level >= crate::cpu::SimdLevel::Avx512;
        match dtype {
            DType::Q4_K => {
                add(avx2, "q4_k_avx2", q4_k_avx2);
                add(avx512 && vnni, "q4_k_vnni", q4_k_vnni);
            }
            DType::Q5_K => {
                add(avx2, "q5_k_avx2", q5_k_avx2);
                add(avx512 && vnni, "q5_k_vnni", q5_k_vnni);
            }
            DType::Q6_K => {
                add(avx2, "q6_k_avx2", q6_k_avx2);
                add(avx512, "q6_k_avx512", q6_k_avx512);
                add(avx512 && vnni, "q6_k_avx512_vnni", q6_k_avx512_vnni);
            }
            DType::Q3_K => add(avx2, "q3_k_avx2", q3_k_avx2),
            DType::Q2_K => add(avx2, "q2_k_avx2", q2_k_avx2),
            _ => {}
        }
        out
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

    /// Σ of each four unsigned `q` bytes times signed `a` bytes, as i32 (`q` at most 127, so
    /// the i16 pair sums of `maddubs` do not saturate).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot4(q: __m256i, a: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), _mm256_set1_epi16(1))
    }

    /// [`dot4`] in one VNNI instruction.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn dot4_vnni(q: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, a)
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

    /// `(d, dmin)` of a Q4_K/Q5_K super-block at `p`, each broadcast.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn d_dmin(p: *const u8) -> (__m256, __m256) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        (_mm256_broadcastss_ps(v), _mm256_broadcastss_ps(_mm_movehdup_ps(v)))
    }

    /// The eight 6-bit scales (bytes 0..8) and eight 6-bit mins (bytes 8..16) of the 12-byte
    /// Q4_K/Q5_K `scales` field at `p` (16 bytes are read), as [`super::k4_scales_mins`] does
    /// in scalar code: with words w0..w2, scales are `w0 & 0x3F..` and `(w2 & 0x0F..) |
    /// (w0 >> 2) & 0x30..`, mins `w1 & 0x3F..` and `(w2 >> 4 & 0x0F..) | (w1 >> 2) & 0x30..`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn k4_scales_mins_vec(p: *const u8) -> __m128i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let low = _mm_srlv_epi32(_mm_shuffle_epi32::<0b10_01_10_00>(v), _mm_setr_epi32(0, 0, 0, 4));
        let low = _mm_and_si128(low, _mm_setr_epi32(0x3F3F_3F3F, 0x0F0F_0F0F, 0x3F3F_3F3F, 0x0F0F_0F0F));
        let high = _mm_srli_epi32::<2>(_mm_shuffle_epi32::<0b01_00_00_00>(v));
        let high = _mm_and_si128(high, _mm_setr_epi32(0, 0x3030_3030, 0, 0x3030_3030));
        _mm_or_si128(low, high)
    }

    /// Q4_K (`$q5 = false`, 144-byte blocks) or Q5_K (`$q5 = true`, 176-byte blocks with the
    /// 32 `qh` bytes before the nibbles) with 256-bit vectors; `$dot4` is [`dot4`] or
    /// [`dot4_vnni`]. A 32-wide sub-block is one Q8Block: one integer dot, one FMA.
    macro_rules! k4_256 {
        ($row:expr, $act:expr, $bytes:literal, $q5:literal, $dot4:ident) => {{
            let m4 = _mm256_set1_epi8(0x0F);
            let m16 = _mm256_set1_epi8(0x10);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut acc_min = _mm256_setzero_ps();
            let mut scale = [0f32; 8];
            for (b, a) in $row.as_chunks::<$bytes>().0.iter().zip($act.as_chunks::<ACT_PER_SUPER>().0) {
                let p = b.as_ptr();
                let (d, dmin) = d_dmin(p);
                let sm = k4_scales_mins_vec(p.add(4));
                let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm));
                let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(sm, sm)));
                let (da, sa) = load_ds(a);
                // d·sc_j·d_a_j per sub-block, read back as broadcasts from memory: a load port
                // rather than a shuffle each (`black_box` keeps the compiler from forwarding the
                // stored vector into register shuffles).
                _mm256_storeu_ps(scale.as_mut_ptr(), _mm256_mul_ps(_mm256_mul_ps(sc, d), da));
                let scale = black_box(&scale);
                acc_min = _mm256_fmadd_ps(_mm256_mul_ps(m, dmin), sa, acc_min);
                let qh = if $q5 { load32(p.add(16)) } else { _mm256_setzero_si256() };
                let qs = p.add(if $q5 { 48 } else { 16 });
                for k in 0..4 {
                    let q = load32(qs.add(32 * k));
                    let mut lo = _mm256_and_si256(q, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    if $q5 {
                        // Bit j of qh is the fifth bit of sub-block j.
                        lo = _mm256_or_si256(lo, _mm256_and_si256(move_bit(qh, 2 * k, 4), m16));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(move_bit(qh, 2 * k + 1, 4), m16));
                    }
                    let p0 = $dot4(lo, load_q8(&a[2 * k]));
                    let p1 = $dot4(hi, load_q8(&a[2 * k + 1]));
                    let (i0, i1) = (2 * (k % 2), 2 * (k % 2) + 1);
                    acc[i0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(&scale[2 * k]), acc[i0]);
                    acc[i1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(&scale[2 * k + 1]), acc[i1]);
                }
            }
            let acc = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            hsum_ps(acc) - hsum_ps(acc_min)
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k_avx2(row: &[u8], act: &[Q8Block]) -> f32 {
        k4_256!(row, act, 144, false, dot4)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    unsafe fn q4_k_vnni(row: &[u8], act: &[Q8Block]) -> f32 {
        k4_256!(row, act, 144, false, dot4_vnni)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_k_avx2(row: &[u8], act: &[Q8Block]) -> f32 {
        k4_256!(row, act, 176, true, dot4)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    unsafe fn q5_k_vnni(row: &[u8], act: &[Q8Block]) -> f32 {
        k4_256!(row, act, 176, true, dot4_vnni)
    }

    // --- Q6_K ----------------------------------------------------------------------------------

    /// The four 32-weight runs of 6-bit Q6_K quants (0..=63) of a 128-weight half, from its 64
    /// `ql` bytes (two registers) and 32 `qh` bytes: run k takes nibble k/2 of `ql[k % 2]` and
    /// bits 2k..2k+2 of `qh` (moved to bits 4..6 with 16-bit shifts; stray bits are masked).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q6_k_quants(ql0: __m256i, ql1: __m256i, qh: __m256i) -> [__m256i; 4] {
        let m4 = _mm256_set1_epi8(0x0F);
        let m30 = _mm256_set1_epi8(0x30);
        let low = |v: __m256i| _mm256_and_si256(v, m4);
        let high = |v: __m256i| _mm256_and_si256(v, m30);
        [
            _mm256_or_si256(low(ql0), high(_mm256_slli_epi16::<4>(qh))),
            _mm256_or_si256(low(ql1), high(_mm256_slli_epi16::<2>(qh))),
            _mm256_or_si256(low(_mm256_srli_epi16::<4>(ql0)), high(qh)),
            _mm256_or_si256(low(_mm256_srli_epi16::<4>(ql1)), high(_mm256_srli_epi16::<2>(qh))),
        ]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_avx2(row: &[u8], act: &[Q8Block]) -> f32 {
        let m32 = _mm256_set1_epi8(32);
        let splats = word_splats();
        // Kept in memory: one `vpshufb` with a memory operand per Q8Block (the compiler would
        // otherwise rewrite the constant shuffles as two or three).
        let splats = black_box(&splats);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut dscale = [0f32; 8];
        for (b, a) in row.as_chunks::<210>().0.iter().zip(act.as_chunks::<ACT_PER_SUPER>().0) {
            let p = b.as_ptr();
            let d = _mm256_set1_ps(f16_at(b, 208));
            let (da, _) = load_ds(a);
            _mm256_storeu_ps(dscale.as_mut_ptr(), _mm256_mul_ps(da, d));
            let dscale = black_box(&dscale);
            let scales = scales_even_odd(_mm_loadu_si128(p.add(192) as *const __m128i));
            for h in 0..2 {
                let q = q6_k_quants(load32(p.add(64 * h)), load32(p.add(64 * h + 32)), load32(p.add(128 + 32 * h)));
                for (k, &q) in q.iter().enumerate() {
                    let bi = 4 * h + k;
                    let av = load_q8(&a[bi]);
                    // Σ (q − 32)·a per pair, |.| ≤ 2·32·128: no i16 saturation.
                    let prod = _mm256_sub_epi16(_mm256_maddubs_epi16(q, av), _mm256_maddubs_epi16(m32, av));
                    let s = _mm256_madd_epi16(prod, _mm256_shuffle_epi8(scales, splats[bi]));
                    acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(&dscale[bi]), acc[k]);
                }
            }
        }
        hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    /// Two 32-byte activation blocks in one 512-bit register.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn load_q8_pair(a0: &Q8Block, a1: &Q8Block) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load_q8(a0)), load_q8(a1))
    }

    /// Σ of each four `(q − 32)·a` (q unsigned 6-bit, a signed), as i32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot4_off32_512(q: __m512i, a: __m512i) -> __m512i {
        let m32 = _mm512_set1_epi8(32);
        // |Σ pair| ≤ 2·32·128: no i16 saturation.
        let prod = _mm512_sub_epi16(_mm512_maddubs_epi16(q, a), _mm512_maddubs_epi16(m32, a));
        _mm512_madd_epi16(prod, _mm512_set1_epi16(1))
    }

    /// [`dot4_off32_512`] with VNNI.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dot4_off32_512_vnni(q: __m512i, a: __m512i) -> __m512i {
        let zero = _mm512_setzero_si512();
        _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, q, a), _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(32), a))
    }

    /// Q6_K with 512-bit vectors: two Q8Blocks (64 weights) per step; i32 lanes 4i..4i+4 of a
    /// step hold its 16-weight sub-block i, scaled in float.
    macro_rules! q6_k_512 {
        ($row:expr, $act:expr, $dot4:ident) => {{
            let m4 = _mm512_set1_epi8(0x0F);
            let m30 = _mm512_set1_epi8(0x30);
            // qh bits 2k..2k+2 to bits 4..6: << 4, << 2 (runs 0, 1), then >> 0, >> 2 (runs 2, 3).
            let shl01 = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
            let shr23 = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
            let dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            let pick: [__m512i; 4] = std::array::from_fn(|j| {
                let j = 4 * j as i32;
                let (a, b, c, d) = (j, j + 1, j + 2, j + 3);
                _mm512_setr_epi32(a, a, a, a, b, b, b, b, c, c, c, c, d, d, d, d)
            });
            let mut acc = [_mm512_setzero_ps(); 2];
            for (b, a) in $row.as_chunks::<210>().0.iter().zip($act.as_chunks::<ACT_PER_SUPER>().0) {
                let p = b.as_ptr();
                let d = _mm512_set1_ps(f16_at(b, 208));
                let (da, _) = load_ds(a);
                let da = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(da));
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(192) as *const __m128i)));
                // d·d_a·sc for the 16 sub-blocks.
                let scale = _mm512_mul_ps(_mm512_mul_ps(sc, d), da);
                for h in 0..2 {
                    let ql = _mm512_loadu_si512(p.add(64 * h) as *const _);
                    let qh = _mm512_broadcast_i64x4(load32(p.add(128 + 32 * h)));
                    // (nibbles & 0x0F) | high bits, as one ternary-logic instruction.
                    let q = [
                        _mm512_ternarylogic_epi32::<0xEC>(ql, _mm512_and_si512(_mm512_sllv_epi16(qh, shl01), m30), m4),
                        _mm512_ternarylogic_epi32::<0xEC>(
                            _mm512_srli_epi16::<4>(ql),
                            _mm512_and_si512(_mm512_srlv_epi16(qh, shr23), m30),
                            m4,
                        ),
                    ];
                    for (i, &q) in q.iter().enumerate() {
                        let bi = 4 * h + 2 * i;
                        let s = $dot4(q, load_q8_pair(&a[bi], &a[bi + 1]));
                        let f = _mm512_permutexvar_ps(pick[2 * h + i], scale);
                        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), f, acc[i]);
                    }
                }
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
        }};
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn q6_k_avx512(row: &[u8], act: &[Q8Block]) -> f32 {
        q6_k_512!(row, act, dot4_off32_512)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    unsafe fn q6_k_avx512_vnni(row: &[u8], act: &[Q8Block]) -> f32 {
        q6_k_512!(row, act, dot4_off32_512_vnni)
    }

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

    #[test]
    #[ignore = "benchmark: cargo test --release -p pio-kernels dot::kquants -- --ignored --nocapture"]
    fn bench_ns_per_row() {
        const N: usize = 4096;
        const ITERS: u32 = 10_000;
        let mut rng = StdRng::seed_from_u64(15);
        for dtype in FORMATS {
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
