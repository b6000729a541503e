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
//! The inner sum is exact integer arithmetic at every level; levels differ only in the order
//! the per-block float terms are added.
//!
//! The SIMD versions follow llama.cpp's `ggml_vec_dot_q*_q8_*`:
//!
//! - Nibbles are unpacked into 32 bytes (low nibbles are elements 0..16, high nibbles 16..32,
//!   which is also the order of the activations), and the packed 5th bits are spread to one
//!   byte each (a shuffle/compare on AVX2, a 64-bit mask register on AVX-512).
//! - The byte products go through `vpmaddubsw` (unsigned × signed, pairs summed to i16) and
//!   `vpmaddwd` with ones (to i32), or with VNNI one `vpdpbusd` (unsigned × signed, groups of
//!   four summed into i32). Both need the *weight* operand unsigned: the `_1` formats are
//!   unsigned already; for signed weights the weight's sign is moved onto the activation
//!   (`|w| · (sign(w)·a)`, `vpsignb` on AVX2, an abs plus a masked negate on AVX-512). `|w| ≤
//!   128` and `|a| ≤ 127`, so no i16 pair sum can saturate.
//! - The eight i32 group sums of a block are converted to f32 and fused-multiply-added with the
//!   block's combined scale `d_w·d_a` into a vector accumulator, reduced once per row. The
//!   `_1` minimum term `m_w·s_a` is computed alongside the scale (F16C converts `d_w` and `m_w`
//!   together) and summed separately.
//! - AVX-512 handles two blocks per 512-bit register (four per loop iteration, in two
//!   accumulators), with a permute spreading the two blocks' scales over their halves.
//!
//! Activation quants must lie in −127..=127, as [`crate::act::quantize_q8`] produces (−128
//! would overflow the sign trick in the SIMD versions; the scalar one accepts it).

use crate::act::Q8Block;
use crate::cpu::SimdLevel;
use crate::DType;

/// Dot of one stored row of `dtype` (`act.len()` blocks of 32 weights) with `act`.
///
/// `level` must be one the CPU runs (as [`crate::cpu::level`] reports); `dtype` must be one of
/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
pub fn dot_q8(level: SimdLevel, dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    check(dtype, row, act);
    match level {
        SimdLevel::Scalar => dot_scalar(dtype, row, act),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level` comes from `cpu::level()`, which only reports what the CPU has
        // (AVX2 + FMA + F16C); `check` asserted `row` holds `act.len()` blocks of `dtype`.
        SimdLevel::Avx2 => unsafe { x86::dot_avx2(dtype, row, act) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (AVX-512 F/BW/VL/DQ + FMA + F16C); the VNNI variant only runs when
        // `has_avx512_vnni()` detected it.
        SimdLevel::Avx512 => unsafe {
            if crate::cpu::has_avx512_vnni() {
                x86::dot_avx512_vnni(dtype, row, act)
            } else {
                x86::dot_avx512(dtype, row, act)
            }
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => dot_scalar(dtype, row, act),
    }
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
    check(dtype, row, act);
    match dtype {
        DType::Q4_0 => scalar_blocks::<18>(row, act, |b, y| {
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[2 + j];
                sum += ((q & 0x0F) as i32 - 8) * y[j] as i32 + ((q >> 4) as i32 - 8) * y[j + 16] as i32;
            }
            (f16_at(b, 0), 0.0, sum)
        }),
        DType::Q4_1 => scalar_blocks::<20>(row, act, |b, y| {
            let mut sum = 0i32;
            for j in 0..16 {
                let q = b[4 + j];
                sum += (q & 0x0F) as i32 * y[j] as i32 + (q >> 4) as i32 * y[j + 16] as i32;
            }
            (f16_at(b, 0), f16_at(b, 2), sum)
        }),
        DType::Q5_0 => scalar_blocks::<22>(row, act, |b, y| {
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
        DType::Q5_1 => scalar_blocks::<24>(row, act, |b, y| {
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
        DType::Q8_0 => scalar_blocks::<34>(row, act, |b, y| {
            let sum = b[2..].iter().zip(y).map(|(&q, &a)| (q as i8) as i32 * a as i32).sum();
            (f16_at(b, 0), 0.0, sum)
        }),
        other => panic!("{other} is not a legacy block format"),
    }
}

/// Sums `(d_w·d_a)·sum + m_w·s_a` over the blocks, where `f` gives `(d_w, m_w, sum)` of one
/// weight block and the activation quants.
fn scalar_blocks<const BB: usize>(
    row: &[u8],
    act: &[Q8Block],
    f: impl Fn(&[u8; BB], &[i8; 32]) -> (f32, f32, i32),
) -> f32 {
    let (blocks, rest) = row.as_chunks::<BB>();
    assert!(rest.is_empty() && blocks.len() == act.len());
    let mut total = 0f32;
    for (b, a) in blocks.iter().zip(act) {
        let (d, m, sum) = f(b, &a.qs);
        total += d * a.d * sum as f32 + m * a.s;
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Q8Block;
    use crate::DType;

    // ---------------------------------------------------------------------------------------
    // Scales
    // ---------------------------------------------------------------------------------------

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Lanes 1 + 3 of `v`: where [`scales`] / [`scales2`] put the `m_w·s_a` terms.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn odd_lanes(v: __m128) -> f32 {
        let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_shuffle_ps::<1>(s, s))
    }

    /// `[d_w·d_a, m_w·s_a, 0, 0]` from the block's f16 `d` (low half of `dm`) and `m` (high
    /// half; 0 for the `_0` formats).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(dm: u32, a: &Q8Block) -> __m128 {
        let w = _mm_cvtph_ps(_mm_cvtsi32_si128(dm as i32));
        // `d` and `s` are the first 8 bytes of the `repr(C)` block.
        let x = _mm_castpd_ps(_mm_load_sd(a as *const Q8Block as *const f64));
        _mm_mul_ps(w, x)
    }

    /// [`scales`] of two blocks, in lanes 0, 1 (first) and 2, 3 (second).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales2(dm0: u32, dm1: u32, a0: &Q8Block, a1: &Q8Block) -> __m128 {
        let w = _mm_cvtph_ps(_mm_cvtsi64_si128((dm0 as u64 | (dm1 as u64) << 32) as i64));
        let x = _mm_loadh_pd(_mm_load_sd(a0 as *const Q8Block as *const f64), a1 as *const Q8Block as *const f64);
        _mm_mul_ps(w, _mm_castpd_ps(x))
    }

    /// [`scales`] of eight consecutive blocks of `BB` bytes, block `k` in lanes `2k`, `2k + 1`.
    /// For the `_0` formats the odd lanes hold garbage (the two bytes after `d` read as `m`).
    ///
    /// # Safety
    /// `row` points at 8 blocks of `BB ≥ 4` bytes, `act` at 8 activation blocks.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn scales8<const BB: i32>(row: *const u8, act: *const Q8Block) -> __m512 {
        let at = _mm256_setr_epi32(0, BB, 2 * BB, 3 * BB, 4 * BB, 5 * BB, 6 * BB, 7 * BB);
        let w = _mm512_cvtph_ps(_mm256_i32gather_epi32::<1>(row as *const i32, at));
        const Q8: i32 = (size_of::<Q8Block>() / 8) as i32;
        let at = _mm256_setr_epi32(0, Q8, 2 * Q8, 3 * Q8, 4 * Q8, 5 * Q8, 6 * Q8, 7 * Q8);
        let x = _mm512_i32gather_pd::<8>(at, act as *const f64);
        _mm512_mul_ps(w, _mm512_castpd_ps(x))
    }

    /// Two blocks' scales `[s0, _, s1, _]` spread to `[s0 × 8, s1 × 8]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn spread2(s: __m128) -> __m512 {
        let idx = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s))
    }

    /// Blocks `2j` and `2j + 1` of [`scales8`] spread to `[s_2j × 8, s_2j+1 × 8]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn spread8<const J: i32>(s: __m512) -> __m512 {
        let (a, b) = (4 * J, 4 * J + 2);
        _mm512_permutexvar_ps(_mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a), s)
    }

    // ---------------------------------------------------------------------------------------
    // Quants
    // ---------------------------------------------------------------------------------------

    /// The 32 activation quants of a block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn act256(a: &Q8Block) -> __m256i {
        _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i)
    }

    /// The activation quants of two blocks.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn act512(a0: &Q8Block, a1: &Q8Block) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(act256(a0)), act256(a1))
    }

    /// 16 bytes at `p` split into nibbles: low nibbles in bytes 0..16, high nibbles in 16..32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        let b = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16::<4>(t));
        _mm256_and_si256(b, _mm256_set1_epi8(0x0F))
    }

    /// Two blocks' 16 nibble bytes (at `p0`, `p1`) split as [`nibbles`] does, side by side.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn nibbles2(p0: *const u8, p1: *const u8) -> __m512i {
        // [b0, b0, b1, b1] in 128-bit lanes, then lanes 1 and 3 shifted right by 4.
        let z = _mm512_broadcast_i32x4(_mm_loadu_si128(p0 as *const __m128i));
        let z = _mm512_mask_broadcast_i32x4(z, 0xFF00, _mm_loadu_si128(p1 as *const __m128i));
        let z = _mm512_srlv_epi64(z, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
        _mm512_and_si512(z, _mm512_set1_epi8(0x0F))
    }

    /// 0x10 in byte `i` where bit `i` of `qh` is set, else 0 (after llama.cpp's
    /// `bytes_from_bits_32`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fifth_bits(qh: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10))
    }

    // ---------------------------------------------------------------------------------------
    // Products: each returns the sums of 4 adjacent products as f32 (8 lanes per block).
    // `u8`: weights unsigned. `off`: weights unsigned and stored with an offset `o` (Q4_0: 8,
    // Q5_0: 16), Σ(q−o)·y = Σq·y − Σo·y. `i8`: weights signed, |w|·(sign(w)·y).
    // ---------------------------------------------------------------------------------------

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot256_u8(x: __m256i, y: __m256i) -> __m256 {
        let p = _mm256_maddubs_epi16(x, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }

    /// Pair sums are at most 31·127·2 in magnitude, so the i16 difference is exact.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot256_off(x: __m256i, y: __m256i, o: __m256i) -> __m256 {
        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(x, y), _mm256_maddubs_epi16(o, y));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot256_i8(x: __m256i, y: __m256i) -> __m256 {
        dot256_u8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn dot256_u8_vnni(x: __m256i, y: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn dot256_off_vnni(x: __m256i, y: __m256i, o: __m256i) -> __m256 {
        let zero = _mm256_setzero_si256();
        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_dpbusd_epi32(zero, x, y), _mm256_dpbusd_epi32(zero, o, y)))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn dot256_i8_vnni(x: __m256i, y: __m256i) -> __m256 {
        dot256_u8_vnni(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn dot512_u8(x: __m512i, y: __m512i) -> __m512 {
        let p = _mm512_maddubs_epi16(x, y);
        _mm512_cvtepi32_ps(_mm512_madd_epi16(p, _mm512_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn dot512_off(x: __m512i, y: __m512i, o: __m512i) -> __m512 {
        let p = _mm512_sub_epi16(_mm512_maddubs_epi16(x, y), _mm512_maddubs_epi16(o, y));
        _mm512_cvtepi32_ps(_mm512_madd_epi16(p, _mm512_set1_epi16(1)))
    }

    /// `y` negated where `x` is negative (AVX-512 has no `vpsignb`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn sign512(y: __m512i, x: __m512i) -> __m512i {
        _mm512_mask_sub_epi8(y, _mm512_movepi8_mask(x), _mm512_setzero_si512(), y)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn dot512_i8(x: __m512i, y: __m512i) -> __m512 {
        dot512_u8(_mm512_abs_epi8(x), sign512(y, x))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn dot512_u8_vnni(x: __m512i, y: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), x, y))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn dot512_off_vnni(x: __m512i, y: __m512i, o: __m512i) -> __m512 {
        let zero = _mm512_setzero_si512();
        _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_dpbusd_epi32(zero, x, y), _mm512_dpbusd_epi32(zero, o, y)))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn dot512_i8_vnni(x: __m512i, y: __m512i) -> __m512 {
        let o = _mm512_set1_epi8(-128);
        dot512_off_vnni(_mm512_xor_si512(x, o), y, o)
    }

    // ---------------------------------------------------------------------------------------
    // Per-format decoding: `dm` (f16 d, and m in the high half for `_1`), and the 32 weight
    // quants of one block as bytes (`x256`) or of two blocks (`x512`): unsigned, and stored
    // with offset `OFFSET` (0 for none), or signed when `SIGNED`.
    // ---------------------------------------------------------------------------------------

    mod q4_0 {
        use super::*;
        pub const BB: usize = 18;
        pub const OFFSET: i8 = 8;
        pub const SIGNED: bool = false;
        pub const MIN: bool = false;
        #[inline]
        pub fn dm(b: &[u8; BB]) -> u32 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn x256(b: &[u8; BB]) -> __m256i {
            nibbles(b.as_ptr().add(2))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        pub unsafe fn x512(b0: &[u8; BB], b1: &[u8; BB]) -> __m512i {
            nibbles2(b0.as_ptr().add(2), b1.as_ptr().add(2))
        }
    }

    mod q4_1 {
        use super::*;
        pub const BB: usize = 20;
        pub const OFFSET: i8 = 0;
        pub const SIGNED: bool = false;
        pub const MIN: bool = true;
        #[inline]
        pub fn dm(b: &[u8; BB]) -> u32 {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn x256(b: &[u8; BB]) -> __m256i {
            nibbles(b.as_ptr().add(4))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        pub unsafe fn x512(b0: &[u8; BB], b1: &[u8; BB]) -> __m512i {
            nibbles2(b0.as_ptr().add(4), b1.as_ptr().add(4))
        }
    }

    mod q5_0 {
        use super::*;
        pub const BB: usize = 22;
        pub const OFFSET: i8 = 16;
        pub const SIGNED: bool = false;
        pub const MIN: bool = false;
        #[inline]
        pub fn dm(b: &[u8; BB]) -> u32 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        }
        #[inline]
        fn qh(b: &[u8; BB]) -> u32 {
            u32::from_le_bytes([b[2], b[3], b[4], b[5]])
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn x256(b: &[u8; BB]) -> __m256i {
            _mm256_or_si256(nibbles(b.as_ptr().add(6)), fifth_bits(qh(b)))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        pub unsafe fn x512(b0: &[u8; BB], b1: &[u8; BB]) -> __m512i {
            let n = nibbles2(b0.as_ptr().add(6), b1.as_ptr().add(6));
            let set: __mmask64 = qh(b0) as u64 | (qh(b1) as u64) << 32;
            _mm512_mask_add_epi8(n, set, n, _mm512_set1_epi8(0x10))
        }
    }

    mod q5_1 {
        use super::*;
        pub const BB: usize = 24;
        pub const OFFSET: i8 = 0;
        pub const SIGNED: bool = false;
        pub const MIN: bool = true;
        #[inline]
        pub fn dm(b: &[u8; BB]) -> u32 {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        #[inline]
        fn qh(b: &[u8; BB]) -> u32 {
            u32::from_le_bytes([b[4], b[5], b[6], b[7]])
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn x256(b: &[u8; BB]) -> __m256i {
            _mm256_or_si256(nibbles(b.as_ptr().add(8)), fifth_bits(qh(b)))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        pub unsafe fn x512(b0: &[u8; BB], b1: &[u8; BB]) -> __m512i {
            let n = nibbles2(b0.as_ptr().add(8), b1.as_ptr().add(8));
            let set: __mmask64 = qh(b0) as u64 | (qh(b1) as u64) << 32;
            _mm512_mask_add_epi8(n, set, n, _mm512_set1_epi8(0x10))
        }
    }

    mod q8_0 {
        use super::*;
        pub const BB: usize = 34;
        pub const OFFSET: i8 = 0;
        pub const SIGNED: bool = true;
        pub const MIN: bool = false;
        #[inline]
        pub fn dm(b: &[u8; BB]) -> u32 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn x256(b: &[u8; BB]) -> __m256i {
            _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i)
        }
        /// Only the 512-bit Q8_0 kernels use it, and the dispatcher does not (see below).
        #[cfg(test)]
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        pub unsafe fn x512(b0: &[u8; BB], b1: &[u8; BB]) -> __m512i {
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(x256(b0)), x256(b1))
        }
    }

    // ---------------------------------------------------------------------------------------
    // Kernels
    // ---------------------------------------------------------------------------------------

    /// One block's 8 f32 partial sums (of 4 products each).
    macro_rules! block256 {
        ($fmt:ident, $b:expr, $a:expr, $u8:ident, $off:ident, $i8:ident) => {
            if $fmt::OFFSET != 0 {
                $off($fmt::x256($b), act256($a), _mm256_set1_epi8($fmt::OFFSET))
            } else if $fmt::SIGNED {
                $i8($fmt::x256($b), act256($a))
            } else {
                $u8($fmt::x256($b), act256($a))
            }
        };
    }

    /// Two blocks' 16 f32 partial sums.
    macro_rules! block512 {
        ($fmt:ident, $b0:expr, $b1:expr, $a0:expr, $a1:expr, $u8:ident, $off:ident, $i8:ident) => {
            if $fmt::OFFSET != 0 {
                $off($fmt::x512($b0, $b1), act512($a0, $a1), _mm512_set1_epi8($fmt::OFFSET))
            } else if $fmt::SIGNED {
                $i8($fmt::x512($b0, $b1), act512($a0, $a1))
            } else {
                $u8($fmt::x512($b0, $b1), act512($a0, $a1))
            }
        };
    }

    /// One block per step, two steps per iteration into two accumulators.
    macro_rules! body256 {
        ($fmt:ident, $row:ident, $act:ident, $u8:ident, $off:ident, $i8:ident) => {{
            let (blocks, _) = $row.as_chunks::<{ $fmt::BB }>();
            let (pairs, tail) = blocks.as_chunks::<2>();
            let (act_pairs, act_tail) = $act.as_chunks::<2>();
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut mins = _mm_setzero_ps();
            for ([b0, b1], [a0, a1]) in pairs.iter().zip(act_pairs) {
                let s = scales2($fmt::dm(b0), $fmt::dm(b1), a0, a1);
                let s0 = _mm256_broadcastss_ps(s);
                let s1 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), _mm256_set1_epi32(2));
                acc0 = _mm256_fmadd_ps(s0, block256!($fmt, b0, a0, $u8, $off, $i8), acc0);
                acc1 = _mm256_fmadd_ps(s1, block256!($fmt, b1, a1, $u8, $off, $i8), acc1);
                if $fmt::MIN {
                    mins = _mm_add_ps(mins, s);
                }
            }
            for (b, a) in tail.iter().zip(act_tail) {
                let s = scales($fmt::dm(b), a);
                acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s), block256!($fmt, b, a, $u8, $off, $i8), acc0);
                if $fmt::MIN {
                    mins = _mm_add_ps(mins, s);
                }
            }
            let mut total = hsum256(_mm256_add_ps(acc0, acc1));
            if $fmt::MIN {
                total += odd_lanes(mins);
            }
            total
        }};
    }

    /// Eight blocks per iteration (scales of all eight from two gathers, then two blocks per
    /// 512-bit step into two accumulators); what is left in pairs, then a last odd block
    /// through the 256-bit step.
    macro_rules! body512 {
        ($fmt:ident, $row:ident, $act:ident, $u8:ident, $off:ident, $i8:ident,
         $u8_256:ident, $off_256:ident, $i8_256:ident) => {{
            let (blocks, _) = $row.as_chunks::<{ $fmt::BB }>();
            let (octs, tail) = blocks.as_chunks::<8>();
            let (act_octs, act_tail) = $act.as_chunks::<8>();
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            let mut mins8 = _mm512_setzero_ps();
            for (b, a) in octs.iter().zip(act_octs) {
                let s = scales8::<{ $fmt::BB as i32 }>(b.as_ptr() as *const u8, a.as_ptr());
                if $fmt::MIN {
                    mins8 = _mm512_add_ps(mins8, s);
                }
                let [b0, b1, b2, b3, b4, b5, b6, b7] = b;
                let [a0, a1, a2, a3, a4, a5, a6, a7] = a;
                acc0 = _mm512_fmadd_ps(spread8::<0>(s), block512!($fmt, b0, b1, a0, a1, $u8, $off, $i8), acc0);
                acc1 = _mm512_fmadd_ps(spread8::<1>(s), block512!($fmt, b2, b3, a2, a3, $u8, $off, $i8), acc1);
                acc0 = _mm512_fmadd_ps(spread8::<2>(s), block512!($fmt, b4, b5, a4, a5, $u8, $off, $i8), acc0);
                acc1 = _mm512_fmadd_ps(spread8::<3>(s), block512!($fmt, b6, b7, a6, a7, $u8, $off, $i8), acc1);
            }
            let (pairs, tail) = tail.as_chunks::<2>();
            let (act_pairs, act_tail) = act_tail.as_chunks::<2>();
            let mut mins = _mm_setzero_ps();
            for ([b0, b1], [a0, a1]) in pairs.iter().zip(act_pairs) {
                let s = scales2($fmt::dm(b0), $fmt::dm(b1), a0, a1);
                acc0 = _mm512_fmadd_ps(spread2(s), block512!($fmt, b0, b1, a0, a1, $u8, $off, $i8), acc0);
                if $fmt::MIN {
                    mins = _mm_add_ps(mins, s);
                }
            }
            let mut acc = _mm256_setzero_ps();
            for (b, a) in tail.iter().zip(act_tail) {
                let s = scales($fmt::dm(b), a);
                let p = block256!($fmt, b, a, $u8_256, $off_256, $i8_256);
                acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(s), p, acc);
                if $fmt::MIN {
                    mins = _mm_add_ps(mins, s);
                }
            }
            let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + hsum256(acc);
            if $fmt::MIN {
                total += _mm512_mask_reduce_add_ps(0xAAAA, mins8) + odd_lanes(mins);
            }
            total
        }};
    }

    /// Kernel functions of each shape, named `$name`, for format module `$fmt`.
    macro_rules! kernel_avx2 {
        ($fmt:ident, $name:ident) => {
            /// # Safety
            /// The CPU has AVX2, FMA and F16C; `row` holds `act.len()` blocks.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name(row: &[u8], act: &[Q8Block]) -> f32 {
                body256!($fmt, row, act, dot256_u8, dot256_off, dot256_i8)
            }
        };
    }

    macro_rules! kernel_avx2_vnni {
        ($fmt:ident, $name:ident) => {
            /// # Safety
            /// The CPU has AVX-512 F/BW/VL/DQ + VNNI, FMA and F16C; `row` holds `act.len()` blocks.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
            unsafe fn $name(row: &[u8], act: &[Q8Block]) -> f32 {
                body256!($fmt, row, act, dot256_u8_vnni, dot256_off_vnni, dot256_i8_vnni)
            }
        };
    }

    macro_rules! kernel_avx512 {
        ($fmt:ident, $name:ident) => {
            /// # Safety
            /// The CPU has AVX-512 F/BW/VL/DQ, FMA and F16C; `row` holds `act.len()` blocks.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
            unsafe fn $name(row: &[u8], act: &[Q8Block]) -> f32 {
                body512!($fmt, row, act, dot512_u8, dot512_off, dot512_i8, dot256_u8, dot256_off, dot256_i8)
            }
        };
    }

    macro_rules! kernel_avx512_vnni {
        ($fmt:ident, $name:ident) => {
            /// # Safety
            /// The CPU has AVX-512 F/BW/VL/DQ + VNNI, FMA and F16C; `row` holds `act.len()` blocks.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
            unsafe fn $name(row: &[u8], act: &[Q8Block]) -> f32 {
                body512!(
                    $fmt,
                    row,
                    act,
                    dot512_u8_vnni,
                    dot512_off_vnni,
                    dot512_i8_vnni,
                    dot256_u8_vnni,
                    dot256_off_vnni,
                    dot256_i8_vnni
                )
            }
        };
    }

    // What the dispatcher uses, chosen by measurement on a Sapphire Rapids core (ns per
    // 4096-weight row, see `bench_ns_per_row`). The other shapes exist in test builds only,
    // so the tests check them and the benchmark can re-measure them on other CPUs.
    //
    // - Q4_0 / Q4_1 / Q5_0 / Q5_1: 512-bit, two blocks per register, is 15-30% faster than
    //   AVX2; with VNNI about the same again or a little better. 256-bit VNNI lies between.
    // - Q8_0: its quants need no unpacking, so the per-block scale work dominates and the
    //   512-bit kernels (gathers, permutes, `vpinserti64x4`) are no faster than AVX2 (non-VNNI
    //   512-bit was ~10% slower). The Avx512 level therefore runs the AVX2 kernel, or with VNNI
    //   the same 256-bit kernel with `vpdpbusd` (~8% faster than AVX2).
    kernel_avx2!(q4_0, q4_0_avx2);
    kernel_avx2!(q4_1, q4_1_avx2);
    kernel_avx2!(q5_0, q5_0_avx2);
    kernel_avx2!(q5_1, q5_1_avx2);
    kernel_avx2!(q8_0, q8_0_avx2);
    kernel_avx512!(q4_0, q4_0_avx512);
    kernel_avx512!(q4_1, q4_1_avx512);
    kernel_avx512!(q5_0, q5_0_avx512);
    kernel_avx512!(q5_1, q5_1_avx512);
    kernel_avx512_vnni!(q4_0, q4_0_avx512_vnni);
    kernel_avx512_vnni!(q4_1, q4_1_avx512_vnni);
    kernel_avx512_vnni!(q5_0, q5_0_avx512_vnni);
    kernel_avx512_vnni!(q5_1, q5_1_avx512_vnni);
    kernel_avx2_vnni!(q8_0, q8_0_avx2_vnni);

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` holds `act.len()` blocks of `dtype`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        match dtype {
            DType::Q4_0 => q4_0_avx2(row, act),
            DType::Q4_1 => q4_1_avx2(row, act),
            DType::Q5_0 => q5_0_avx2(row, act),
            DType::Q5_1 => q5_1_avx2(row, act),
            DType::Q8_0 => q8_0_avx2(row, act),
            other => panic!("{other} is not a legacy block format"),
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ, FMA and F16C; `row` holds `act.len()` blocks of `dtype`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    pub(super) unsafe fn dot_avx512(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        match dtype {
            DType::Q4_0 => q4_0_avx512(row, act),
            DType::Q4_1 => q4_1_avx512(row, act),
            DType::Q5_0 => q5_0_avx512(row, act),
            DType::Q5_1 => q5_1_avx512(row, act),
            // Not faster at 512 bits on this machine (see above).
            DType::Q8_0 => q8_0_avx2(row, act),
            other => panic!("{other} is not a legacy block format"),
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + VNNI, FMA and F16C; `row` holds `act.len()` blocks of
    /// `dtype`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_avx512_vnni(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        match dtype {
            DType::Q4_0 => q4_0_avx512_vnni(row, act),
            DType::Q4_1 => q4_1_avx512_vnni(row, act),
            DType::Q5_0 => q5_0_avx512_vnni(row, act),
            DType::Q5_1 => q5_1_avx512_vnni(row, act),
            // 256-bit VNNI beats 512-bit for Q8_0 on this machine (see above).
            DType::Q8_0 => q8_0_avx2_vnni(row, act),
            other => panic!("{other} is not a legacy block format"),
        }
    }

    /// A kernel set as the tests and the benchmark call it.
    #[cfg(test)]
    pub(super) type Kernel = unsafe fn(DType, &[u8], &[Q8Block]) -> f32;

    /// Every x86 kernel set the CPU runs, by name: what each level dispatches to, and the
    /// shapes the dispatcher does not use.
    #[cfg(test)]
    pub(super) fn variants() -> Vec<(&'static str, Kernel)> {
        use crate::cpu::{detected, has_avx512_vnni, SimdLevel};
        let mut v: Vec<(&'static str, Kernel)> = Vec::new();
        if detected() >= SimdLevel::Avx2 {
            v.push(("avx2", dot_avx2));
        }
        if detected() >= SimdLevel::Avx512 {
            v.push(("avx512", dot_avx512));
            v.push(("all-512bit", alternatives::dot_512));
            if has_avx512_vnni() {
                v.push(("avx512+vnni", dot_avx512_vnni));
                v.push(("all-512bit-vnni", alternatives::dot_512_vnni));
                v.push(("all-256bit-vnni", alternatives::dot_256_vnni));
            }
        }
        v
    }

    #[cfg(test)]
    mod alternatives {
        use super::*;
        kernel_avx512!(q8_0, q8_0_avx512);
        kernel_avx512_vnni!(q8_0, q8_0_avx512_vnni);
        kernel_avx2_vnni!(q4_0, q4_0_avx2_vnni);
        kernel_avx2_vnni!(q4_1, q4_1_avx2_vnni);
        kernel_avx2_vnni!(q5_0, q5_0_avx2_vnni);
        kernel_avx2_vnni!(q5_1, q5_1_avx2_vnni);

        /// Every format through 512-bit kernels (Q8_0's is not dispatched).
        ///
        /// # Safety
        /// As [`super::dot_avx512`].
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        pub unsafe fn dot_512(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
            match dtype {
                DType::Q8_0 => q8_0_avx512(row, act),
                _ => dot_avx512(dtype, row, act),
            }
        }

        /// Every format through 512-bit VNNI kernels (Q8_0's is not dispatched).
        ///
        /// # Safety
        /// As [`super::dot_avx512_vnni`].
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
        pub unsafe fn dot_512_vnni(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
            match dtype {
                DType::Q8_0 => q8_0_avx512_vnni(row, act),
                _ => dot_avx512_vnni(dtype, row, act),
            }
        }

        /// Every format through 256-bit VNNI kernels (only Q8_0's is dispatched).
        ///
        /// # Safety
        /// As [`super::dot_avx512_vnni`].
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
        pub unsafe fn dot_256_vnni(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
            match dtype {
                DType::Q4_0 => q4_0_avx2_vnni(row, act),
                DType::Q4_1 => q4_1_avx2_vnni(row, act),
                DType::Q5_0 => q5_0_avx2_vnni(row, act),
                DType::Q5_1 => q5_1_avx2_vnni(row, act),
                _ => dot_avx512_vnni(dtype, row, act),
            }
        }
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
                    #[cfg(target_arch = "x86_64")]
                    for (name, f) in x86::variants() {
                        // SAFETY: `variants` lists only what the CPU runs; lengths match.
                        let got = unsafe { f(dtype, &row, &act) };
                        assert!(
                            (got - scalar).abs() as f64 <= tol,
                            "{dtype} {blocks} blocks {name}: {got} vs {scalar}"
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
                        #[cfg(target_arch = "x86_64")]
                        for (name, f) in x86::variants() {
                            // SAFETY: `variants` lists only what the CPU runs; lengths match.
                            let got = unsafe { f(dtype, &row, &act) };
                            assert_eq!(got as f64, want, "{dtype} fill {fill:#x} qh {qh:#x} {blocks} {name}");
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

    /// `cargo test --release -p pio-kernels dot::legacy -- --ignored --nocapture`
    ///
    /// ns per 4096-weight row: 10 rounds of 1000 calls, the fastest round (other processes
    /// sharing the cores only ever slow a round down). `avx2` and `avx512` / `avx512+vnni` are
    /// what the levels dispatch to; `all-*` run every format through one kernel shape.
    #[test]
    #[ignore]
    fn bench_ns_per_row() {
        const N: usize = 4096;
        const ROUNDS: u32 = 10;
        const ITERS: u32 = 1000;
        let mut rng = StdRng::seed_from_u64(1);
        let act = quantize_q8_vec(&random_act(&mut rng, N / 32));
        for dtype in FORMATS {
            let (_, row) = random_row(&mut rng, dtype, N / 32);
            let mut line = format!("{dtype} ({N} weights), ns/row:");
            let mut time = |name: &str, f: &dyn Fn() -> f32| {
                for _ in 0..ITERS {
                    black_box(f());
                }
                let mut best = f64::MAX;
                for _ in 0..ROUNDS {
                    let t = Instant::now();
                    for _ in 0..ITERS {
                        black_box(f());
                    }
                    best = best.min(t.elapsed().as_nanos() as f64 / ITERS as f64);
                }
                line += &format!("  {name} {best:.0}");
            };
            time("scalar", &|| dot_q8(SimdLevel::Scalar, dtype, black_box(&row), black_box(&act)));
            #[cfg(target_arch = "x86_64")]
            for (name, f) in x86::variants() {
                // SAFETY: `variants` lists only what the CPU runs; lengths match.
                time(name, &|| unsafe { f(dtype, black_box(&row), black_box(&act)) });
            }
            println!("{line}");
        }
    }
}
