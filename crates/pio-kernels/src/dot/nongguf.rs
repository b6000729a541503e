//! INT8, INT4 and NF4 rows — the formats GGUF has no type for (layouts in [`DType`]) — dotted
//! with [`Q8Block`] activations.
//!
//! Every format reduces, per activation block `k` (32 values), to an exact integer sum
//! `sum_k = Σ q_w[i]·q_a[i]` and float scales:
//!
//! - INT8: `s · Σ_k d_a[k]·sum_k`, the row's one scale `s` applied once at the end.
//! - INT4: `Σ_k (d_g·d_a[k])·sum_k`, `q_w = u − 8`, `d_g` the scale of block `k`'s group of 128.
//! - NF4: `Σ_k (d_b/127·d_a[k])·sum_k` with `q_w = NF4_I8[u]`, the codebook ×127 rounded to
//!   integers ([`NF4_I8`]). This is how llama.cpp's IQ4_NL keeps a non-uniform 4-bit codebook
//!   in int8 so the products stay integer; the ÷127 is folded into the block's scale. Rounding
//!   the table moves a weight by at most 0.47/127 = 0.37% of its block's absmax, against up to
//!   15% (half the widest codebook gap) for NF4's own rounding; [`crate::quant`]'s dequantizer
//!   and `dot_row` keep the exact codebook.
//!
//! The SIMD versions:
//!
//! - INT8's quants are the stored bytes. INT4's and NF4's 4-bit codes are split as Q4_K's are:
//!   a run of 32 bytes holds 64 weights, its low nibbles one activation block and its high
//!   nibbles the next, so one 256-bit load and a shift feed two blocks with no shuffling.
//! - NF4 codes become int8 weights through [`NF4_I8`] with `vpshufb` (the 16 entries in every
//!   128-bit lane).
//! - Products multiply unsigned by signed bytes (`vpmaddubsw` + `vpmaddwd`, or with VNNI
//!   `vpdpbusd`). INT4's codes `u` are unsigned, and the offset is taken off exactly in
//!   integers (`Σ u·a − Σ 8·a`, as legacy Q4_0). INT8 and NF4 weights are signed, so their sign
//!   moves onto the activation (`|w|·(sign(w)·a)`); `|w| ≤ 128` and `|a| ≤ 127` cannot
//!   saturate an i16 pair sum.
//! - Each block's eight i32 sums are converted to f32 and fused-multiply-added with the block's
//!   scale into vector accumulators, reduced once per row.
//! - The Avx512 level runs these 256-bit kernels with VNNI's `vpdpbusd` (AVX-512 VL + VNNI), or
//!   the AVX2 ones on CPUs without VNNI: kernels with two activation blocks per 512-bit register
//!   measured slower (see `x86::wide`, kept in test builds). The AVX2 level runs them with
//!   AVX-VNNI's VEX-encoded `vpdpbusd` where the CPU has it ([`crate::cpu::has_avx_vnni`]).
//!
//! The integer sums are exact at every level; levels differ only in the order the float terms
//! are added. Tiles ([`super::gemm_q8`]) are one [`dot_q8`] per (row, token), so they are batch
//! invariant. Activation quants must lie in −127..=127, as [`crate::act::quantize_q8`] makes
//! them.

use crate::act::Q8Block;
use crate::cpu::SimdLevel;
use crate::DType;

/// [`crate::quant::NF4`] × 127, rounded to nearest: the int8 weights the kernels multiply.
pub const NF4_I8: [i8; 16] = [-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127];

/// The factor that takes [`NF4_I8`] back to the codebook's scale.
pub const NF4_I8_SCALE: f32 = 1.0 / 127.0;

/// Dot of one stored INT8, INT4 or NF4 row (`act.len()` blocks of 32 weights) with `act`.
///
/// `level` must be one the CPU runs (as [`crate::cpu::level`] reports).
pub fn dot_q8(level: SimdLevel, dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    check(dtype, row, act);
    match level {
        SimdLevel::Scalar => scalar(dtype, row, act),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level` comes from `cpu::level()`, which only reports what the CPU has
        // (AVX2 + FMA + F16C), and `has_avx_vnni()` detected AVX-VNNI; `check` asserted `row`
        // holds `act.len()` blocks of `dtype`.
        SimdLevel::Avx2 => unsafe {
            if crate::cpu::has_avx_vnni() {
                x86::dot_avx2_vnni(dtype, row, act)
            } else {
                x86::dot_avx2(dtype, row, act)
            }
        },
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
        _ => scalar(dtype, row, act),
    }
}

/// Asserts `dtype` is INT8, INT4 or NF4 and `row` holds exactly `act.len() * 32` of its
/// weights (INT4 rows are whole groups of 128, NF4 rows whole blocks of 64).
fn check(dtype: DType, row: &[u8], act: &[Q8Block]) {
    assert!(matches!(dtype, DType::INT8 | DType::INT4 | DType::NF4), "{dtype} is not INT8, INT4 or NF4");
    assert_eq!(
        dtype.row_bytes(act.len() * 32),
        Some(row.len()),
        "{dtype}: a row of {} bytes does not hold {} activation blocks",
        row.len(),
        act.len()
    );
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The exact integer sum of 32 weights (`w(i)`) times a block's activation quants.
fn block_sum(a: &Q8Block, w: impl Fn(usize) -> i32) -> i32 {
    a.qs.iter().enumerate().map(|(i, &y)| w(i) * y as i32).sum()
}

/// The reference: per activation block the exact i32 sum, then the float terms of the module
/// docs added in block order (INT8's row scale multiplied last).
pub fn dot_scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    check(dtype, row, act);
    scalar(dtype, row, act)
}

fn scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    let mut total = 0f32;
    match dtype {
        DType::INT8 => {
            let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
            for (q, a) in row[4..].chunks_exact(32).zip(act) {
                total += a.d * block_sum(a, |i| (q[i] as i8) as i32) as f32;
            }
            return total * s;
        }
        DType::INT4 => {
            for (g, a4) in row.chunks_exact(66).zip(act.chunks_exact(4)) {
                let d = f16_at(g, 0);
                for (k, a) in a4.iter().enumerate() {
                    let (run, shift) = (&g[2 + 32 * (k / 2)..], 4 * (k % 2));
                    total += (d * a.d) * block_sum(a, |i| ((run[i] >> shift) & 0x0F) as i32 - 8) as f32;
                }
            }
        }
        DType::NF4 => {
            for (b, a2) in row.chunks_exact(34).zip(act.chunks_exact(2)) {
                let d = f16_at(b, 0) * NF4_I8_SCALE;
                for (k, a) in a2.iter().enumerate() {
                    let shift = 4 * k;
                    total += (d * a.d) * block_sum(a, |i| NF4_I8[((b[2 + i] >> shift) & 0x0F) as usize] as i32) as f32;
                }
            }
        }
        other => panic!("{other} is not INT8, INT4 or NF4"),
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Q8Block, NF4_I8, NF4_I8_SCALE};
    use crate::DType;

    // ---------------------------------------------------------------------------------------
    // Helpers
    // ---------------------------------------------------------------------------------------

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The f16 at `p` (little-endian) as f32 in all 8 lanes.
    ///
    /// Block scales are converted as vectors: converting one lane only lets the compiler load
    /// the 2 bytes into a register whose other lanes it considers free, and it once picked an
    /// accumulator, chaining every block to the previous block's fma (2.6x slower NF4).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(p as *const i16)))
    }

    /// The 32 activation quants of a block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn act256(a: &Q8Block) -> __m256i {
        _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i)
    }

    /// 32 bytes at `p` split into their low nibbles and their high nibbles.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles256(p: *const u8) -> (__m256i, __m256i) {
        let v = _mm256_loadu_si256(p as *const __m256i);
        let m = _mm256_set1_epi8(0x0F);
        (_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16::<4>(v), m))
    }

    // ---------------------------------------------------------------------------------------
    // Products: sums of 4 adjacent byte products as i32 (8 lanes per block). `signed`: weights
    // signed, |w|·(sign(w)·y). `off8`: weights unsigned codes u standing for u − 8.
    // ---------------------------------------------------------------------------------------

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn signed256(w: __m256i, y: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// Pair sums are at most 15·127·2 in magnitude, so the i16 difference is exact.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn off8_256(u: __m256i, y: __m256i) -> __m256i {
        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(u, y), _mm256_maddubs_epi16(_mm256_set1_epi8(8), y));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn signed256_vnni(w: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    unsafe fn off8_256_vnni(u: __m256i, y: __m256i) -> __m256i {
        let z = _mm256_setzero_si256();
        _mm256_sub_epi32(_mm256_dpbusd_epi32(z, u, y), _mm256_dpbusd_epi32(z, _mm256_set1_epi8(8), y))
    }

    #[inline]
    #[target_feature(enable = "avx2,avxvnni,fma,f16c")]
    unsafe fn signed256_avxvnni(w: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w))
    }

    #[inline]
    #[target_feature(enable = "avx2,avxvnni,fma,f16c")]
    unsafe fn off8_256_avxvnni(u: __m256i, y: __m256i) -> __m256i {
        let z = _mm256_setzero_si256();
        _mm256_sub_epi32(_mm256_dpbusd_avx_epi32(z, u, y), _mm256_dpbusd_avx_epi32(z, _mm256_set1_epi8(8), y))
    }

    // ---------------------------------------------------------------------------------------
    // 256-bit: one activation block per register, two accumulators. One macro body,
    // instantiated with `vpmaddubsw` products (AVX2) and with 256-bit VNNI ones.
    // ---------------------------------------------------------------------------------------

    /// [`NF4_I8`] in both 128-bit lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nf4_table256() -> __m256i {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(NF4_I8.as_ptr() as *const __m128i))
    }

    macro_rules! kernels256 {
        ($feat:literal, $int8:ident, $int4:ident, $nf4_block:ident, $nf4:ident, $signed:ident, $off8:ident) => {
            /// # Safety
            /// The CPU has the features named; `row` is an INT8 row of `act.len()` blocks.
            #[target_feature(enable = $feat)]
            unsafe fn $int8(row: &[u8], act: &[Q8Block]) -> f32 {
                let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
                let q = row.as_ptr().add(4);
                let term = |k: usize, a: &Q8Block| {
                    let w = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                    (_mm256_set1_ps(a.d), _mm256_cvtepi32_ps($signed(w, act256(a))))
                };
                let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let (pairs, tail) = act.as_chunks::<2>();
                for (j, [a0, a1]) in pairs.iter().enumerate() {
                    let (d0, p0) = term(2 * j, a0);
                    let (d1, p1) = term(2 * j + 1, a1);
                    acc0 = _mm256_fmadd_ps(d0, p0, acc0);
                    acc1 = _mm256_fmadd_ps(d1, p1, acc1);
                }
                if let [a] = tail {
                    let (d, p) = term(act.len() - 1, a);
                    acc0 = _mm256_fmadd_ps(d, p, acc0);
                }
                hsum256(_mm256_add_ps(acc0, acc1)) * s
            }

            /// # Safety
            /// The CPU has the features named; `row` is an INT4 row of `act.len()` blocks.
            #[target_feature(enable = $feat)]
            unsafe fn $int4(row: &[u8], act: &[Q8Block]) -> f32 {
                let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for (g, a) in row.as_chunks::<66>().0.iter().zip(act.as_chunks::<4>().0) {
                    let d = f16x8(g.as_ptr());
                    for r in 0..2 {
                        let (lo, hi) = nibbles256(g.as_ptr().add(2 + 32 * r));
                        let (a0, a1) = (&a[2 * r], &a[2 * r + 1]);
                        let p0 = _mm256_cvtepi32_ps($off8(lo, act256(a0)));
                        let p1 = _mm256_cvtepi32_ps($off8(hi, act256(a1)));
                        acc0 = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a0.d)), p0, acc0);
                        acc1 = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a1.d)), p1, acc1);
                    }
                }
                hsum256(_mm256_add_ps(acc0, acc1))
            }

            /// One NF4 block (34 bytes at `b`) against its two activation blocks, into `acc`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn $nf4_block(b: *const u8, a: &[Q8Block; 2], table: __m256i, acc: &mut [__m256; 2]) {
                let d = _mm256_mul_ps(f16x8(b), _mm256_set1_ps(NF4_I8_SCALE));
                let (lo, hi) = nibbles256(b.add(2));
                let p0 = _mm256_cvtepi32_ps($signed(_mm256_shuffle_epi8(table, lo), act256(&a[0])));
                let p1 = _mm256_cvtepi32_ps($signed(_mm256_shuffle_epi8(table, hi), act256(&a[1])));
                acc[0] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a[0].d)), p0, acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a[1].d)), p1, acc[1]);
            }

            /// # Safety
            /// The CPU has the features named; `row` is an NF4 row of `act.len()` blocks.
            #[target_feature(enable = $feat)]
            unsafe fn $nf4(row: &[u8], act: &[Q8Block]) -> f32 {
                let table = nf4_table256();
                let mut acc = [_mm256_setzero_ps(); 2];
                for (b, a) in row.as_chunks::<34>().0.iter().zip(act.as_chunks::<2>().0) {
                    $nf4_block(b.as_ptr(), a, table, &mut acc);
                }
                hsum256(_mm256_add_ps(acc[0], acc[1]))
            }
        };
    }

    kernels256!("avx2,fma,f16c", int8_avx2, int4_avx2, nf4_block256, nf4_avx2, signed256, off8_256);
    kernels256!(
        "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c",
        int8_avx2_vnni,
        int4_avx2_vnni,
        nf4_block256_vnni,
        nf4_avx2_vnni,
        signed256_vnni,
        off8_256_vnni
    );

    kernels256!(
        "avx2,avxvnni,fma,f16c",
        int8_avxvnni,
        int4_avxvnni,
        nf4_block256_avxvnni,
        nf4_avxvnni,
        signed256_avxvnni,
        off8_256_avxvnni
    );

    /// # Safety
    /// The CPU has AVX2, AVX-VNNI, FMA and F16C; `row` holds `act.len()` blocks of `dtype`.
    #[target_feature(enable = "avx2,avxvnni,fma,f16c")]
    pub(super) unsafe fn dot_avx2_vnni(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        match dtype {
            DType::INT8 => int8_avxvnni(row, act),
            DType::INT4 => int4_avxvnni(row, act),
            DType::NF4 => nf4_avxvnni(row, act),
            other => panic!("{other} is not INT8, INT4 or NF4"),
        }
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` holds `act.len()` blocks of `dtype`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        match dtype {
            DType::INT8 => int8_avx2(row, act),
            DType::INT4 => int4_avx2(row, act),
            DType::NF4 => nf4_avx2(row, act),
            other => panic!("{other} is not INT8, INT4 or NF4"),
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ, FMA and F16C; `row` holds `act.len()` blocks of `dtype`.
    ///
    /// Without VNNI the AVX2 kernels: the 512-bit ones (`wide`, test builds) measured 10-20% slower.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    pub(super) unsafe fn dot_avx512(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        dot_avx2(dtype, row, act)
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ + VNNI, FMA and F16C; `row` holds `act.len()` blocks of
    /// `dtype`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_avx512_vnni(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
        match dtype {
            DType::INT8 => int8_avx2_vnni(row, act),
            DType::INT4 => int4_avx2_vnni(row, act),
            DType::NF4 => nf4_avx2_vnni(row, act),
            other => panic!("{other} is not INT8, INT4 or NF4"),
        }
    }

    /// A kernel set as the tests call it.
    #[cfg(test)]
    pub(super) type Kernel = unsafe fn(DType, &[u8], &[Q8Block]) -> f32;

    /// Every x86 kernel set the CPU runs, by name: what the levels dispatch to (`avx2`, and
    /// `avx512+vnni`, which the level list reaches only on CPUs with VNNI), and the 512-bit
    /// shapes the dispatcher does not use.
    #[cfg(test)]
    pub(super) fn variants() -> Vec<(&'static str, Kernel)> {
        use crate::cpu::{avx_vnni_detected, detected, has_avx512_vnni, SimdLevel};
        let mut v: Vec<(&'static str, Kernel)> = Vec::new();
        if detected() >= SimdLevel::Avx2 {
            v.push(("avx2", dot_avx2));
            if avx_vnni_detected() {
                v.push(("avx2+vnni", dot_avx2_vnni));
            }
        }
        if detected() >= SimdLevel::Avx512 {
            v.push(("512bit", wide::dot_512));
            if has_avx512_vnni() {
                v.push(("avx512+vnni", dot_avx512_vnni));
                v.push(("512bit-vnni", wide::dot_512_vnni));
            }
        }
        v
    }

    /// Two activation blocks per 512-bit register: a shape the dispatcher does not use. On a
    /// Sapphire Rapids core (`bench_ns_per_row`, ns per 4096-weight row) the 256-bit kernels
    /// won — INT8 / INT4 / NF4: AVX2 107 / 121 / 140, 512-bit 127 / 133 / 170, 512-bit VNNI
    /// 114 / 123 / 164, 256-bit VNNI 93 / 107 / 129 — as the weights need little unpacking and
    /// joining two blocks' activations and scales into one register costs shuffles on the port
    /// `vpshufb` needs. Kept in test builds so the tests cover and the benchmark re-measures it.
    #[cfg(test)]
    mod wide {
        use super::*;

        /// The f16s at `p0` and `p1` as `[d0 × 8, d1 × 8]`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        unsafe fn f16x16(p0: *const u8, p1: *const u8) -> __m512 {
            let h0 = _mm_set1_epi16(std::ptr::read_unaligned(p0 as *const i16));
            let h1 = _mm_set1_epi16(std::ptr::read_unaligned(p1 as *const i16));
            _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(h0), h1))
        }

        /// Two blocks' activation quants side by side.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        unsafe fn act512(a0: &Q8Block, a1: &Q8Block) -> __m512i {
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(act256(a0)), act256(a1))
        }

        /// `[s0 × 8, s1 × 8]`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        unsafe fn scales2(s0: f32, s1: f32) -> __m512 {
            _mm512_insertf32x8::<1>(_mm512_castps256_ps512(_mm256_set1_ps(s0)), _mm256_set1_ps(s1))
        }

        /// [`nibbles256`] of a 512-bit register.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        unsafe fn nibbles512(v: __m512i) -> (__m512i, __m512i) {
            let m = _mm512_set1_epi8(0x0F);
            (_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16::<4>(v), m))
        }

        /// `y` negated where `w` is negative (AVX-512 has no `vpsignb`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        unsafe fn sign512(y: __m512i, w: __m512i) -> __m512i {
            _mm512_mask_sub_epi8(y, _mm512_movepi8_mask(w), _mm512_setzero_si512(), y)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        unsafe fn signed512(w: __m512i, y: __m512i) -> __m512i {
            let p = _mm512_maddubs_epi16(_mm512_abs_epi8(w), sign512(y, w));
            _mm512_madd_epi16(p, _mm512_set1_epi16(1))
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        unsafe fn off8_512(u: __m512i, y: __m512i) -> __m512i {
            let p = _mm512_sub_epi16(_mm512_maddubs_epi16(u, y), _mm512_maddubs_epi16(_mm512_set1_epi8(8), y));
            _mm512_madd_epi16(p, _mm512_set1_epi16(1))
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
        unsafe fn signed512_vnni(w: __m512i, y: __m512i) -> __m512i {
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sign512(y, w))
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
        unsafe fn off8_512_vnni(u: __m512i, y: __m512i) -> __m512i {
            let z = _mm512_setzero_si512();
            _mm512_sub_epi32(_mm512_dpbusd_epi32(z, u, y), _mm512_dpbusd_epi32(z, _mm512_set1_epi8(8), y))
        }

        // One macro body, instantiated with `vpmaddubsw` products and with VNNI ones.

        macro_rules! kernels512 {
            ($feat:literal, $int8:ident, $int4:ident, $nf4:ident, $signed:ident, $off8:ident) => {
                /// # Safety
                /// The CPU has the features named; `row` is an INT8 row of `act.len()` blocks.
                #[target_feature(enable = $feat)]
                unsafe fn $int8(row: &[u8], act: &[Q8Block]) -> f32 {
                    let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
                    let q = row.as_ptr().add(4);
                    // Blocks 2j and 2j + 1: 64 contiguous quant bytes.
                    let pair = |j: usize, a0: &Q8Block, a1: &Q8Block| {
                        let w = _mm512_loadu_si512(q.add(64 * j) as *const _);
                        (scales2(a0.d, a1.d), _mm512_cvtepi32_ps($signed(w, act512(a0, a1))))
                    };
                    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    let (quads, rest) = act.as_chunks::<4>();
                    for (j, [a0, a1, a2, a3]) in quads.iter().enumerate() {
                        let (d0, p0) = pair(2 * j, a0, a1);
                        let (d1, p1) = pair(2 * j + 1, a2, a3);
                        acc0 = _mm512_fmadd_ps(d0, p0, acc0);
                        acc1 = _mm512_fmadd_ps(d1, p1, acc1);
                    }
                    let done = 4 * quads.len();
                    let (pairs, tail) = rest.as_chunks::<2>();
                    if let Some([a0, a1]) = pairs.first() {
                        let (d, p) = pair(done / 2, a0, a1);
                        acc0 = _mm512_fmadd_ps(d, p, acc0);
                    }
                    let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
                    if let [a] = tail {
                        let w = _mm256_loadu_si256(q.add(32 * (act.len() - 1)) as *const __m256i);
                        let p = _mm256_mul_ps(_mm256_set1_ps(a.d), _mm256_cvtepi32_ps(signed256(w, act256(a))));
                        total += hsum256(p);
                    }
                    total * s
                }

                /// # Safety
                /// The CPU has the features named; `row` is an INT4 row of `act.len()` blocks.
                #[target_feature(enable = $feat)]
                unsafe fn $int4(row: &[u8], act: &[Q8Block]) -> f32 {
                    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    for (g, a) in row.as_chunks::<66>().0.iter().zip(act.as_chunks::<4>().0) {
                        let d = f16x16(g.as_ptr(), g.as_ptr());
                        // Low nibbles: [blocks 0 | 2] of the group, high nibbles: [blocks 1 | 3].
                        let (lo, hi) = nibbles512(_mm512_loadu_si512(g.as_ptr().add(2) as *const _));
                        let p0 = _mm512_cvtepi32_ps($off8(lo, act512(&a[0], &a[2])));
                        let p1 = _mm512_cvtepi32_ps($off8(hi, act512(&a[1], &a[3])));
                        acc0 = _mm512_fmadd_ps(_mm512_mul_ps(d, scales2(a[0].d, a[2].d)), p0, acc0);
                        acc1 = _mm512_fmadd_ps(_mm512_mul_ps(d, scales2(a[1].d, a[3].d)), p1, acc1);
                    }
                    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
                }

                /// # Safety
                /// The CPU has the features named; `row` is an NF4 row of `act.len()` blocks.
                #[target_feature(enable = $feat)]
                unsafe fn $nf4(row: &[u8], act: &[Q8Block]) -> f32 {
                    let table = _mm512_broadcast_i32x4(_mm_loadu_si128(NF4_I8.as_ptr() as *const __m128i));
                    let (blocks, _) = row.as_chunks::<34>();
                    let (acts, _) = act.as_chunks::<4>();
                    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    // Blocks 2j and 2j + 1 (activation blocks 4j..4j + 4).
                    for (b, a) in blocks.as_chunks::<2>().0.iter().zip(acts) {
                        let (p0, p1) = (b[0].as_ptr(), b[1].as_ptr());
                        let q0 = _mm256_loadu_si256(p0.add(2) as *const __m256i);
                        let q1 = _mm256_loadu_si256(p1.add(2) as *const __m256i);
                        let (lo, hi) = nibbles512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(q0), q1));
                        let (w_lo, w_hi) = (_mm512_shuffle_epi8(table, lo), _mm512_shuffle_epi8(table, hi));
                        let d = _mm512_mul_ps(f16x16(p0, p1), _mm512_set1_ps(NF4_I8_SCALE));
                        let s_lo = _mm512_cvtepi32_ps($signed(w_lo, act512(&a[0], &a[2])));
                        let s_hi = _mm512_cvtepi32_ps($signed(w_hi, act512(&a[1], &a[3])));
                        acc0 = _mm512_fmadd_ps(_mm512_mul_ps(d, scales2(a[0].d, a[2].d)), s_lo, acc0);
                        acc1 = _mm512_fmadd_ps(_mm512_mul_ps(d, scales2(a[1].d, a[3].d)), s_hi, acc1);
                    }
                    let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
                    if blocks.len() % 2 == 1 {
                        let n = blocks.len() - 1;
                        let mut acc = [_mm256_setzero_ps(); 2];
                        let a = [act[2 * n], act[2 * n + 1]];
                        nf4_block256(blocks[n].as_ptr(), &a, nf4_table256(), &mut acc);
                        total += hsum256(_mm256_add_ps(acc[0], acc[1]));
                    }
                    total
                }
            };
        }

        kernels512!(
            "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c",
            int8_avx512,
            int4_avx512,
            nf4_avx512,
            signed512,
            off8_512
        );
        kernels512!(
            "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c",
            int8_avx512_vnni,
            int4_avx512_vnni,
            nf4_avx512_vnni,
            signed512_vnni,
            off8_512_vnni
        );

        /// # Safety
        /// As [`super::dot_avx512`].
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
        pub unsafe fn dot_512(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
            match dtype {
                DType::INT8 => int8_avx512(row, act),
                DType::INT4 => int4_avx512(row, act),
                DType::NF4 => nf4_avx512(row, act),
                other => panic!("{other} is not INT8, INT4 or NF4"),
            }
        }

        /// # Safety
        /// As [`super::dot_avx512_vnni`].
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")]
        pub unsafe fn dot_512_vnni(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
            match dtype {
                DType::INT8 => int8_avx512_vnni(row, act),
                DType::INT4 => int4_avx512_vnni(row, act),
                DType::NF4 => nf4_avx512_vnni(row, act),
                other => panic!("{other} is not INT8, INT4 or NF4"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::act::quantize_q8_vec;
    use crate::quant;

    const FORMATS: [DType; 3] = [DType::INT8, DType::INT4, DType::NF4];

    /// Row widths with odd and even block counts, one group, many, and a long row.
    fn widths(dtype: DType) -> Vec<usize> {
        match dtype {
            DType::INT8 => vec![32, 64, 96, 224, 4096 + 32 * 5],
            DType::INT4 => vec![128, 256, 384, 4096 + 128],
            _ => vec![64, 128, 192, 320, 4096 + 64],
        }
    }

    fn random_row(rng: &mut StdRng, dtype: DType, n: usize) -> Vec<u8> {
        let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.1f32..3.0)).collect();
        let mut row = vec![0u8; dtype.row_bytes(n).unwrap()];
        quant::quantize_row(dtype, &w, &mut row);
        row
    }

    fn random_act(rng: &mut StdRng, n: usize) -> Vec<Q8Block> {
        let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        // Some blocks with a single large value, so quants of ±127 next to small ones occur.
        for b in (0..n / 32).step_by(3) {
            x[32 * b + b % 32] = if b % 2 == 0 { 40.0 } else { -40.0 };
        }
        quantize_q8_vec(&x)
    }

    /// The dot in f64 from the weights as the kernels see them (INT8's quants, INT4's u − 8,
    /// NF4's table values) and the activation quants: (value, Σ|terms|).
    fn exact(dtype: DType, row: &[u8], act: &[Q8Block]) -> (f64, f64) {
        let n = act.len() * 32;
        let (mut sum, mut mag) = (0f64, 0f64);
        for i in 0..n {
            let (k, j) = (i / 32, i % 32);
            let w = match dtype {
                DType::INT8 => {
                    let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]) as f64;
                    s * (row[4 + i] as i8) as f64
                }
                DType::INT4 => {
                    let (g, e) = (i / 128, i % 128);
                    let b = &row[66 * g..];
                    let q = b[2 + 32 * (e / 64) + e % 32] >> (4 * ((e % 64) / 32));
                    f16_at(b, 0) as f64 * ((q & 0x0F) as f64 - 8.0)
                }
                _ => {
                    let (blk, e) = (i / 64, i % 64);
                    let b = &row[34 * blk..];
                    let q = (b[2 + e % 32] >> (4 * (e / 32))) & 0x0F;
                    f16_at(b, 0) as f64 * NF4_I8[q as usize] as f64 / 127.0
                }
            };
            let t = w * act[k].d as f64 * act[k].qs[j] as f64;
            sum += t;
            mag += t.abs();
        }
        (sum, mag)
    }

    #[test]
    fn every_level_matches_scalar_and_scalar_is_exact() {
        let mut rng = StdRng::seed_from_u64(11);
        for dtype in FORMATS {
            for n in widths(dtype) {
                for _ in 0..4 {
                    let row = random_row(&mut rng, dtype, n);
                    let act = random_act(&mut rng, n);
                    let (want, mag) = exact(dtype, &row, &act);
                    let reference = dot_scalar(dtype, &row, &act);
                    // Float terms in another order: a few roundings of the running sum.
                    let tol = 1e-5 * mag.max(1e-20);
                    assert!((reference as f64 - want).abs() <= tol, "{dtype} n={n}: scalar {reference} vs {want}");
                    for level in SimdLevel::available() {
                        let got = dot_q8(level, dtype, &row, &act);
                        assert!((got - reference).abs() as f64 <= tol, "{dtype} n={n} {level:?}: {got} vs {reference}");
                    }
                    #[cfg(target_arch = "x86_64")]
                    for (name, kernel) in x86::variants() {
                        // SAFETY: `variants` lists only kernels the CPU runs; the row fits `act`.
                        let got = unsafe { kernel(dtype, &row, &act) };
                        assert!((got - reference).abs() as f64 <= tol, "{dtype} n={n} {name}: {got} vs {reference}");
                    }
                }
            }
        }
    }

    /// Against `quant::dot_row` over the activations as they were quantized: INT8 and INT4
    /// differ by float rounding only; NF4 by its int8 table's rounding too, at most 0.47/127 of
    /// each block's scale per |activation|.
    #[test]
    fn scalar_matches_the_f32_codec() {
        let mut rng = StdRng::seed_from_u64(12);
        for dtype in FORMATS {
            for n in widths(dtype) {
                let row = random_row(&mut rng, dtype, n);
                let act = random_act(&mut rng, n);
                let x: Vec<f32> = act.iter().flat_map(|a| a.qs.map(|q| a.d * q as f32)).collect();
                let want = quant::dot_row(dtype, &row, &x) as f64;
                let got = dot_scalar(dtype, &row, &act) as f64;
                let wd = quant::dequantize(dtype, &row, n);
                let mag: f64 = wd.iter().zip(&x).map(|(w, x)| (*w as f64 * *x as f64).abs()).sum();
                let table_err: f64 = if dtype == DType::NF4 {
                    (0..n)
                        .map(|i| f16_at(&row[34 * (i / 64)..], 0).abs() as f64 * 0.47 / 127.0 * x[i].abs() as f64)
                        .sum()
                } else {
                    0.0
                };
                let tol = 1e-5 * mag + table_err;
                assert!((got - want).abs() <= tol, "{dtype} n={n}: {got} vs {want} (tol {tol})");
            }
        }
    }

    #[test]
    fn nf4_table_is_the_codebook_times_127() {
        for (t, c) in NF4_I8.iter().zip(quant::NF4) {
            assert_eq!(*t as f32, (c * 127.0).round(), "{c}");
            assert!((*t as f32 - c * 127.0).abs() <= 0.47);
        }
    }

    #[test]
    fn extreme_rows_are_exact() {
        // Largest weights against activations of ±127: no i16 saturation anywhere.
        let act: Vec<Q8Block> =
            (0..8).map(|k| Q8Block { d: 1.0, s: 0.0, qs: [if k % 2 == 0 { 127 } else { -127 }; 32] }).collect();
        let n = 256;
        let mut int8 = 1f32.to_le_bytes().to_vec();
        int8.extend((0..n).map(|i| if i % 3 == 0 { 0x81 } else { 0x7F })); // -127 / 127
        let mut int4 = Vec::new();
        for _ in 0..2 {
            int4.extend([0x00, 0x3C]); // d = 1
            int4.extend([0x0Fu8; 64]); // low nibbles 15 (q = 7), high nibbles 0 (q = -8)
        }
        let mut nf4 = Vec::new();
        for _ in 0..4 {
            nf4.extend([0x00, 0x3C]);
            nf4.extend([0x0Fu8; 32]); // low nibbles code 15 (+127), high nibbles code 0 (-127)
        }
        for (dtype, row) in [(DType::INT8, int8), (DType::INT4, int4), (DType::NF4, nf4)] {
            let (want, _) = exact(dtype, &row, &act);
            for level in SimdLevel::available() {
                let got = dot_q8(level, dtype, &row, &act) as f64;
                assert!((got - want).abs() <= 1e-6 * want.abs(), "{dtype} {level:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn matmul_is_close_to_the_f32_reference_and_batch_invariant() {
        use crate::matmul::{matmul_at, WeightView};
        let mut rng = StdRng::seed_from_u64(14);
        let (rows, cols, n) = (19, 384, 9);
        for dtype in FORMATS {
            let data: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut rng, dtype, cols)).collect();
            let w = WeightView::rows(dtype, rows, cols, &data);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            for level in SimdLevel::available() {
                let mut y = vec![0f32; n * rows];
                matmul_at(level, w, &x, n, &mut y);
                for t in 0..n {
                    let mut one = vec![0f32; rows];
                    matmul_at(level, w, &x[t * cols..(t + 1) * cols], 1, &mut one);
                    let xt = &x[t * cols..(t + 1) * cols];
                    for r in 0..rows {
                        assert_eq!(one[r].to_bits(), y[t * rows + r].to_bits(), "{dtype} {level:?}: token {t} alone");
                        let want = quant::dot_row(dtype, w.row(r), xt);
                        // Q8 activations round each x by up to 1/254 of its block's max.
                        let wd = quant::dequantize(dtype, w.row(r), cols);
                        let bound: f32 = wd
                            .chunks(32)
                            .zip(xt.chunks(32))
                            .map(|(wb, xb)| {
                                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                                wb.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0
                            })
                            .sum();
                        let got = y[t * rows + r];
                        assert!((got - want).abs() <= bound * 1.01 + 1e-4, "{dtype} {level:?}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// `cargo test --release -p pio-kernels dot::nongguf -- --ignored --nocapture`
    ///
    /// ns per 4096-weight row (fastest of 10 rounds of 1000 calls), with Q4_0 and Q8_0 through
    /// [`super::super::dot_q8`] for comparison.
    #[test]
    #[ignore]
    fn bench_ns_per_row() {
        use std::hint::black_box;
        use std::time::Instant;
        const N: usize = 4096;
        let mut rng = StdRng::seed_from_u64(1);
        let act = random_act(&mut rng, N);
        for dtype in [DType::INT8, DType::INT4, DType::NF4, DType::Q8_0, DType::Q4_0] {
            let row = random_row(&mut rng, dtype, N);
            let mut line = format!("{dtype} ({N} weights), ns/row:");
            let mut time = |name: &str, f: &dyn Fn() -> f32| {
                let mut best = f64::MAX;
                for _ in 0..10 {
                    let t = Instant::now();
                    for _ in 0..1000 {
                        black_box(f());
                    }
                    best = best.min(t.elapsed().as_nanos() as f64 / 1000.0);
                }
                line += &format!("  {name} {best:.0}");
            };
            for level in SimdLevel::available() {
                time(level.name(), &|| super::super::dot_q8(level, dtype, black_box(&row), black_box(&act)));
            }
            #[cfg(target_arch = "x86_64")]
            if FORMATS.contains(&dtype) {
                for (name, kernel) in x86::variants() {
                    // SAFETY: `variants` lists only kernels the CPU runs; the row fits `act`.
                    time(name, &|| unsafe { kernel(dtype, black_box(&row), black_box(&act)) });
                }
            }
            println!("{line}");
        }
    }

    #[test]
    #[should_panic]
    fn wrong_length_panics() {
        let act = vec![Q8Block::default(); 4];
        dot_q8(SimdLevel::Scalar, DType::INT4, &[0u8; 65], &act);
    }

    #[test]
    #[should_panic]
    fn other_formats_panic() {
        let act = vec![Q8Block::default(); 1];
        dot_q8(SimdLevel::Scalar, DType::Q8_0, &[0u8; 34], &act);
    }
}
