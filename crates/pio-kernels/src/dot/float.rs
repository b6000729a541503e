//! F32 / F16 / BF16 rows times f32 activations.
//!
//! Activations stay f32 so results match the float reference up to summation order. (AVX-512
//! BF16's `vdpbf16ps` would round activations to bf16 as well; a bf16 row widened to f32 by a
//! shift costs one extra instruction per 16 weights and keeps full precision.)

use crate::cpu::SimdLevel;
use crate::DType;

/// Dot of a stored F32/F16/BF16 row with `x`.
pub fn dot(level: SimdLevel, dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    let elem = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        other => panic!("{other} is not a plain float format"),
    };
    assert_eq!(row.len(), x.len() * elem, "row and activation lengths differ");
    match level {
        SimdLevel::Scalar => dot_scalar(dtype, row, x),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level` comes from `cpu::level()`, which only reports what the CPU has; the
        // lengths were checked above.
        SimdLevel::Avx2 => unsafe { x86::dot_avx2(dtype, row, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx512 => unsafe { x86::dot_avx512(dtype, row, x) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => dot_scalar(dtype, row, x),
    }
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{elem, DType};

    /// 8 weights at element `i` widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(dtype: DType, p: *const u8, i: usize) -> __m256 {
        match dtype {
            DType::F32 => _mm256_loadu_ps(p.add(4 * i) as *const f32),
            DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i)),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                p.add(2 * i) as *const __m128i
            )))),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` holds `x.len()` elements of `dtype`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
        let (p, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let n = x.len();
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let j = i + 8 * k;
                *a = _mm256_fmadd_ps(load8(dtype, p, j), _mm256_loadu_ps(xp.add(j)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load8(dtype, p, i), _mm256_loadu_ps(xp.add(i)), acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum256(v);
        for (j, xj) in x.iter().enumerate().skip(i) {
            sum += elem(dtype, row, j) * xj;
        }
        sum
    }

    /// 16 weights at element `i` widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load16(dtype: DType, p: *const u8, i: usize) -> __m512 {
        match dtype {
            DType::F32 => _mm512_loadu_ps(p.add(4 * i) as *const f32),
            DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * i) as *const __m256i)),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                p.add(2 * i) as *const __m256i
            )))),
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL, FMA and F16C; `row` holds `x.len()` elements of `dtype`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub unsafe fn dot_avx512(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
        let (p, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let n = x.len();
        let mut i = 0;
        while i + 64 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let j = i + 16 * k;
                *a = _mm512_fmadd_ps(load16(dtype, p, j), _mm512_loadu_ps(xp.add(j)), *a);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(load16(dtype, p, i), _mm512_loadu_ps(xp.add(i)), acc[0]);
            i += 16;
        }
        let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut sum = _mm512_reduce_add_ps(v);
        for (j, xj) in x.iter().enumerate().skip(i) {
            sum += elem(dtype, row, j) * xj;
        }
        sum
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
}
