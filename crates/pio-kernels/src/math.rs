//! The one `exp` of the kernels and the sampler: Cephes' `expf` (range reduction
//! `x = n·ln2 + r` with `|r| <= ln2/2`, ln2 split into an exact high part and a low remainder,
//! and a degree-7 polynomial for `e^r`), as a branch-free scalar function that loops over a
//! vocabulary vectorise, and in 8 and 16 lanes for the attention softmax and SwiGLU. All three
//! give exactly 0 far below the smallest normal result and for `-inf`.

/// `e^x` for `x <= 88` (softmax arguments `v - max <= 0`), within a few ulp of
/// [`f32::exp`] but branch-free, so that loops over a vocabulary vectorise: Cephes' `expf`, range
/// reduction `x = n ln2 + r` with `|r| <= ln2 / 2` and a degree-7 polynomial for `e^r`.
/// Gives exactly 0 below -87 (where `e^x` is at most ~1.6e-38) and for `-inf` and NaN, so those
/// carry no probability mass; `exp(0) == 1` exactly.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    /// 1.5 * 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Not `clamp`: `max` maps NaN to the bound, which keeps the integer part below in range.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(-87.0).min(88.0);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let poly =
        (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r
            + 0.5)
            * (r * r)
            + r
            + 1.0;
    // The low mantissa bits of `t` hold n in [-126, 127]; build 2^n directly.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits(((n_int + 127) << 23) as u32);
    if x >= -87.0 {
        poly * two_n
    } else {
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// `e^x` for 16 lanes: `x = n·ln2 + r` with `|r| <= ln2/2`, a degree-6 polynomial for
    /// `e^r` (Cephes' coefficients, relative error ~2 ulp), and `vscalefps` for the `2^n`.
    /// Lanes below -104 give 0; `-inf` gives 0.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp512(x: __m512) -> __m512 {
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.7));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        // r = x - n·ln2 in two steps (ln2 split into an exact high part and a low remainder).
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_65));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let r2 = _mm512_mul_ps(r, r);
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        let e = _mm512_scalef_ps(e, n);
        // Far below the smallest normal (and -inf, and NaN-free masked lanes) -> exactly 0.
        let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-104.0));
        _mm512_mask_blend_ps(tiny, e, _mm512_setzero_ps())
    }

    /// `e^x` for 8 lanes, as [`exp512`] but building `2^n` in the exponent bits; lanes below
    /// -87.3 (where `2^n` would leave the normal range) give 0.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.3));
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.3));
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_65));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_blendv_ps(_mm256_mul_ps(e, pow2n), _mm256_setzero_ps(), tiny)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::SimdLevel;

    #[test]
    fn scalar_exp_matches_std_exp() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (fast, exact) = (exp(x), x.exp());
            assert!((fast - exact).abs() <= 3e-7 * exact, "x = {x}: {fast} vs {exact}");
            x += 0.001_37;
        }
        for x in [0.0f32, -1e-9, -0.5, -1.0, -10.0, -86.9] {
            let (fast, exact) = (exp(x), x.exp());
            assert!((fast - exact).abs() <= 3e-7 * exact, "x = {x}: {fast} vs {exact}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::NAN), 0.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_is_close_to_std() {
        if !SimdLevel::available().contains(&SimdLevel::Avx2) {
            return;
        }
        use std::arch::x86_64::*;
        let mut xs: Vec<f32> = (-2000..=880).map(|i| i as f32 * 0.1).collect();
        xs.extend([f32::NEG_INFINITY, -0.0, 0.0, 1e-8, -1e-8]);
        while !xs.len().is_multiple_of(8) {
            xs.push(0.0);
        }
        for c in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA are present (checked above).
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), x86::exp256(_mm256_loadu_ps(c.as_ptr()))) };
            for (x, g) in c.iter().zip(got) {
                let want = x.exp();
                if *x < -87.0 {
                    assert!(g.abs() <= 2e-38, "exp({x}) = {g}");
                } else {
                    assert!((g - want).abs() <= 4.0 * f32::EPSILON * want, "exp({x}) = {g}, want {want}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_close_to_std() {
        if SimdLevel::available().last() != Some(&SimdLevel::Avx512) {
            return;
        }
        use std::arch::x86_64::*;
        let mut xs: Vec<f32> = (-2000..=880).map(|i| i as f32 * 0.1).collect();
        xs.extend([f32::NEG_INFINITY, -0.0, 0.0, 1e-8, -1e-8]);
        while !xs.len().is_multiple_of(16) {
            xs.push(0.0);
        }
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 F is present (checked above).
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), x86::exp512(_mm512_loadu_ps(c.as_ptr()))) };
            for (x, g) in c.iter().zip(got) {
                let want = x.exp();
                if *x < -87.0 {
                    assert!(g.abs() <= 1e-37, "exp({x}) = {g}");
                } else {
                    assert!((g - want).abs() <= 4.0 * f32::EPSILON * want, "exp({x}) = {g}, want {want}");
                }
            }
        }
    }
}
