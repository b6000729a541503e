//! Activations quantized on the fly to 8 bits, for integer dot products with block-quantized
//! weights (the way llama.cpp's `q8_0`/`q8_1`/`q8_K` activations work).
//!
//! One [`Q8Block`] per 32 activations: `x[i] ≈ d * qs[i]`, plus `s = d * Σ qs` so formats with
//! a per-block minimum (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K) fold the minimum in with one multiply.
//! A per-32 scale is finer than llama.cpp's per-256 `q8_K`, so it is at least as accurate.

/// 32 activations as signed bytes with one f32 scale.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C, align(8))]
pub struct Q8Block {
    /// Scale: `x ≈ d * q`.
    pub d: f32,
    /// `d * Σ qs`.
    pub s: f32,
    pub qs: [i8; 32],
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks), rounding to nearest
/// (ties to even) with `d = max|x| / 127`. The same code is compiled for AVX2 / AVX-512 where the
/// CPU has them (it vectorizes there), so every level gives the same bytes.
pub fn quantize_q8(x: &[f32], out: &mut [Q8Block]) {
    assert!(x.len().is_multiple_of(32) && out.len() == x.len() / 32);
    match crate::cpu::level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has.
        crate::cpu::SimdLevel::Avx512 => unsafe { quantize_q8_avx512(x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        crate::cpu::SimdLevel::Avx2 => unsafe { quantize_q8_avx2(x, out) },
        _ => quantize_q8_generic(x, out),
    }
}

/// As [`quantize_q8_generic`], written out in AVX-512: the same IEEE operations (the maximum is
/// exact in any order, `vcvtps2dq` rounds to nearest even under the default rounding mode, the
/// integer sum is exact), so the same bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_q8_avx512(x: &[f32], out: &mut [Q8Block]) {
    use std::arch::x86_64::*;
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let v0 = _mm512_loadu_ps(xb.as_ptr());
        let v1 = _mm512_loadu_ps(xb.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm512_set1_ps(id);
        let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv));
        let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
        _mm_storeu_si128(b.qs.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(b.qs.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(q1));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// As [`quantize_q8_avx512`], in AVX2 (the generic code's maximum, a sequential `f32::max`
/// fold, does not vectorize, and a prefill spent 5% of its time there).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_avx2(x: &[f32], out: &mut [Q8Block]) {
    use std::arch::x86_64::*;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xb.as_ptr().add(8 * i)));
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], idv)));
        // Saturating packs interleave the 128-bit lanes; the dword permute restores the order.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, p);
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        b.d = d;
        b.s = d * _mm_cvtsi128_si32(s) as f32;
    }
}

#[inline(always)]
fn quantize_q8_generic(x: &[f32], out: &mut [Q8Block]) {
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// `−Σ qs` of every block: with an offset `o`, `Σ (q_w − o)·q_a = Σ q_w·q_a − o·Σ q_a`, so the
/// `vpdpbusd` tiles of the whole-byte formats (Q8_0, INT8, NF4, their bytes made unsigned by
/// adding `o` = 128) start each block's exact integer sum from `o` times this.
/// [`crate::matmul`] computes them once per product and input, for all the threads' tiles.
pub fn neg_sums(blocks: &[Q8Block]) -> Vec<i32> {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::level() >= crate::cpu::SimdLevel::Avx2 {
        // SAFETY: the level only names features the CPU has.
        return unsafe { neg_sums_avx2(blocks) };
    }
    blocks.iter().map(neg_sum).collect()
}

/// `−Σ qs` of one block.
fn neg_sum(b: &Q8Block) -> i32 {
    -b.qs.iter().map(|&q| q as i32).sum::<i32>()
}

/// [`neg_sums`] in AVX2 (the same exact integers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn neg_sums_avx2(blocks: &[Q8Block]) -> Vec<i32> {
    use std::arch::x86_64::*;
    let mut out = vec![0i32; blocks.len()];
    let (quads, tail) = blocks.as_chunks::<4>();
    let (out_quads, out_tail) = out.as_chunks_mut::<4>();
    for (a, o) in quads.iter().zip(out_quads) {
        // `vpsadbw` sums 8 unsigned bytes `q + 128` into each 64-bit lane ...
        let s: [__m256i; 4] = std::array::from_fn(|i| {
            let q = _mm256_loadu_si256(a[i].qs.as_ptr() as *const __m256i);
            _mm256_sad_epu8(_mm256_xor_si256(q, _mm256_set1_epi8(-128)), _mm256_setzero_si256())
        });
        // ... four blocks' four partial sums are added to one 64-bit lane per block ...
        let s01 = _mm256_add_epi64(_mm256_unpacklo_epi64(s[0], s[1]), _mm256_unpackhi_epi64(s[0], s[1]));
        let s23 = _mm256_add_epi64(_mm256_unpacklo_epi64(s[2], s[3]), _mm256_unpackhi_epi64(s[2], s[3]));
        let s =
            _mm256_add_epi64(_mm256_permute2x128_si256::<0x20>(s01, s23), _mm256_permute2x128_si256::<0x31>(s01, s23));
        let s = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0)));
        // ... and −Σ q = 32·128 − Σ (q + 128).
        _mm_storeu_si128(o.as_mut_ptr() as *mut __m128i, _mm_sub_epi32(_mm_set1_epi32(32 * 128), s));
    }
    for (a, o) in tail.iter().zip(out_tail) {
        *o = neg_sum(a);
    }
    out
}

/// `x` quantized into a new vector of blocks; a long `x` (a prefill's activations) is split
/// across the threads.
pub fn quantize_q8_vec(x: &[f32]) -> Vec<Q8Block> {
    let blocks = x.len() / 32;
    // One vector the threads fill in place (a vector per thread, then a copy into one, cost 1-2%
    // of a SmolLM2 prefill). Each thread initializes its own range just before quantizing into
    // it: filled with defaults up front, on the calling thread alone while the others waited,
    // it took 1.3% of a Qwen2.5-Coder-0.5B prefill.
    let mut out: Vec<Q8Block> = Vec::with_capacity(blocks);
    let shared = SharedBlocks(out.as_mut_ptr(), blocks);
    crate::parallel::for_each_range(blocks, x.len() * 4, |b0, b1| {
        let shared = &shared;
        assert!(b0 <= b1 && b1 <= shared.1);
        // SAFETY: `out`'s capacity is `blocks`, which `b0..b1` lies inside (asserted); the ranges
        // of the split are disjoint and the vector is not touched otherwise until the split
        // returns; every block of the range is written before the slice over it is made.
        let part = unsafe {
            let p = shared.0.add(b0);
            for i in 0..b1 - b0 {
                p.add(i).write(Q8Block::default());
            }
            std::slice::from_raw_parts_mut(p, b1 - b0)
        };
        quantize_q8(&x[b0 * 32..b1 * 32], part);
    });
    // SAFETY: the ranges of the split cover `0..blocks`, each block written above.
    unsafe { out.set_len(blocks) };
    out
}

/// `(pointer, length)` of the blocks [`quantize_q8_vec`]'s threads fill, each its own range.
struct SharedBlocks(*mut Q8Block, usize);

// SAFETY: the threads write disjoint ranges while `quantize_q8_vec` holds the vector.
unsafe impl Sync for SharedBlocks {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_below_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 31.5) / 7.0).collect();
        let q = quantize_q8_vec(&x);
        for (b, xb) in q.iter().zip(x.chunks_exact(32)) {
            let mut sum = 0.0;
            for (&qi, &xi) in b.qs.iter().zip(xb) {
                assert!((qi as f32 * b.d - xi).abs() <= b.d * 0.5 + 1e-6);
                sum += qi as f32;
            }
            assert!((b.s - b.d * sum).abs() < 1e-4);
        }
        let zero = quantize_q8_vec(&[0.0; 32]);
        assert_eq!((zero[0].d, zero[0].s, zero[0].qs), (0.0, 0.0, [0; 32]));
    }

    #[test]
    fn split_quantization_matches_one_range() {
        // Long enough for every thread of a pool of three to take a range (with a remainder):
        // each range is initialized and filled by its own thread.
        let x: Vec<f32> = (0..32 * 3001).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let mut one = vec![Q8Block::default(); x.len() / 32];
        quantize_q8(&x, &mut one);
        let split = crate::parallel::ThreadPool::new(3).install(|| quantize_q8_vec(&x));
        assert_eq!(split.len(), one.len());
        for (a, b) in split.iter().zip(&one) {
            assert_eq!((a.d.to_bits(), a.s.to_bits(), a.qs), (b.d.to_bits(), b.s.to_bits(), b.qs));
        }
    }

    #[test]
    fn neg_sums_are_the_negated_quant_sums() {
        // Extremes (every quant ±127) and a tail past the last whole group of four blocks.
        for n in [0usize, 1, 4, 7, 9] {
            let mut blocks: Vec<Q8Block> = (0..n)
                .map(|b| Q8Block {
                    qs: std::array::from_fn(|i| ((b * 31 + i * 17) % 255) as i32 as i8),
                    ..Default::default()
                })
                .collect();
            if n > 2 {
                blocks[1].qs = [127; 32];
                blocks[2].qs = [-127; 32];
            }
            let want: Vec<i32> = blocks.iter().map(|b| -b.qs.iter().map(|&q| q as i32).sum::<i32>()).collect();
            assert_eq!(neg_sums(&blocks), want, "{n} blocks");
        }
    }

    #[test]
    fn every_level_gives_the_same_bytes() {
        // Awkward values: ties at .5 steps, zeros, a huge block, a tiny one.
        let mut x: Vec<f32> = (0..32 * 40).map(|i| ((i * 7919 % 1001) as f32 - 500.0) / 13.0).collect();
        x[32..64].iter_mut().enumerate().for_each(|(i, v)| *v = (i as f32 - 16.0) * 0.5 * (127.0 / 8.0));
        x[64..96].fill(0.0);
        x[96..128].iter_mut().for_each(|v| *v *= 1e30);
        x[128..160].iter_mut().for_each(|v| *v *= 1e-30);
        let mut want = vec![Q8Block::default(); 40];
        quantize_q8_generic(&x, &mut want);
        #[cfg(target_arch = "x86_64")]
        for level in crate::cpu::SimdLevel::available() {
            let mut got = vec![Q8Block::default(); 40];
            match level {
                // SAFETY: `available` lists only levels this CPU runs.
                crate::cpu::SimdLevel::Avx512 => unsafe { quantize_q8_avx512(&x, &mut got) },
                // SAFETY: as above.
                crate::cpu::SimdLevel::Avx2 => unsafe { quantize_q8_avx2(&x, &mut got) },
                crate::cpu::SimdLevel::Scalar => quantize_q8_generic(&x, &mut got),
            }
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((g.d.to_bits(), g.s.to_bits(), g.qs), (w.d.to_bits(), w.s.to_bits(), w.qs), "{level:?}");
            }
        }
    }
}
