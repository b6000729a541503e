//! The value half of one chunk for a few query rows (decode), straight from q8_0 or q4_0 value
//! rows ([`super::CodedKv`]): each block is widened in registers and multiplied into the rows'
//! accumulators at once, instead of being staged as f32 rows and read back per row.
//!
//! Bitwise the staged path: a block-format value is `q · d`, a small integer times an f16 scale,
//! exact in f32 whichever way it is computed; the rows' online-softmax step is the same
//! function, and each accumulator takes the same fused multiply-adds in position order. So a
//! token gets the same bits whether its chunk goes through here (a few rows, decode) or through
//! the staged path (many rows, prefill), and outputs stay batch-invariant.

use super::CHUNK;
use crate::cpu::SimdLevel;

/// The most active rows of a chunk this path takes; more share the staged rows better.
pub(crate) const MAX_ROWS: usize = 4;

/// Whether [`accumulate`] takes values of this kind at `level`.
pub(crate) fn takes(level: SimdLevel, hd: usize, rows: usize) -> bool {
    matches!(level, SimdLevel::Avx2 | SimdLevel::Avx512) && hd.is_multiple_of(32) && rows <= MAX_ROWS
}

/// For each active row `(i, seen)`: the online-softmax step of its scores `s[i * CHUNK..]` (as
/// the staged update does it), then `o[i * hd..] = o · corr + Σ_{j < seen} p_j · value_j` with
/// `rows[j]` position `j`'s value row (q8_0 when `q8`, else q4_0).
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate(
    level: SimdLevel,
    q8: bool,
    rows: &[&[u8]],
    hd: usize,
    active: &[(usize, usize)],
    s: &[f32],
    m: &mut [f32],
    l: &mut [f32],
    o: &mut [f32],
) {
    let bb = if q8 { 34 } else { 18 };
    assert!(takes(level, hd, active.len()), "a level and rows this path takes");
    assert!(rows.len() <= CHUNK && rows.iter().all(|r| r.len() == hd / 32 * bb), "whole value rows");
    assert!(
        active.iter().all(|&(i, seen)| seen <= rows.len() && (i + 1) * CHUNK <= s.len() && (i + 1) * hd <= o.len()),
        "rows in range"
    );
    // The softmax step of every row first: (corr, weights, seen, output offset).
    let mut steps: [(f32, [f32; CHUNK], usize, usize); MAX_ROWS] = [(0.0, [0.0; CHUNK], 0, 0); MAX_ROWS];
    let mut k = 0;
    for &(i, seen) in active {
        let (si, (mi, li)) = (&s[i * CHUNK..(i + 1) * CHUNK], (&mut m[i], &mut l[i]));
        let step = match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level only names features the CPU has; `si` holds CHUNK scores.
            SimdLevel::Avx512 => unsafe { super::x86::softmax_row_avx512(si, mi, li) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            SimdLevel::Avx2 => unsafe { super::x86::softmax_row_avx2(si, mi, li) },
            _ => unreachable!("taken at AVX2 and AVX-512 only"),
        };
        if let Some((corr, p)) = step {
            steps[k] = (corr, p, seen, i * hd);
            k += 1;
        }
    }
    let (mut pairs, op) = (steps[..k].chunks_exact(2), o.as_mut_ptr());
    for two in &mut pairs {
        // SAFETY: the level's features are present; the rows are whole blocks (asserted) and
        // each output row `off..off + hd` lies in `o` (asserted), the two distinct (distinct
        // active rows).
        unsafe { rows_at(level, q8, rows, hd, two, op) };
    }
    if let one @ [_] = pairs.remainder() {
        // SAFETY: as above.
        unsafe { rows_at(level, q8, rows, hd, one, op) };
    }
}

/// One or two rows' accumulation at `level`.
///
/// # Safety
/// The level's features are present; `rows` hold whole blocks; each step's output row lies in
/// the buffer `o` points to, and the steps' rows are distinct.
unsafe fn rows_at(
    level: SimdLevel,
    q8: bool,
    rows: &[&[u8]],
    hd: usize,
    steps: &[(f32, [f32; CHUNK], usize, usize)],
    o: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use x86::*;
        match (level, q8, steps.len()) {
            (SimdLevel::Avx512, true, 2) => rows_avx512::<2, true>(rows, hd, steps, o),
            (SimdLevel::Avx512, true, _) => rows_avx512::<1, true>(rows, hd, steps, o),
            (SimdLevel::Avx512, false, 2) => rows_avx512::<2, false>(rows, hd, steps, o),
            (SimdLevel::Avx512, false, _) => rows_avx512::<1, false>(rows, hd, steps, o),
            (_, true, 2) => rows_avx2::<2, true>(rows, hd, steps, o),
            (_, true, _) => rows_avx2::<1, true>(rows, hd, steps, o),
            (_, false, 2) => rows_avx2::<2, false>(rows, hd, steps, o),
            (_, false, _) => rows_avx2::<1, false>(rows, hd, steps, o),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (level, q8, rows, hd, steps, o);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHUNK;

    /// Block `b`'s f16 scale, broadcast.
    #[inline(always)]
    unsafe fn scale(blk: *const u8) -> __m128 {
        let bits = u16::from_le_bytes([*blk, *blk.add(1)]);
        _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)))
    }

    /// A q4_0 block's 32 values as signed bytes: values 0..16 (the low nibbles) and 16..32.
    #[inline(always)]
    unsafe fn q4_values(blk: *const u8) -> (__m128i, __m128i) {
        let (mask, eight) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(8));
        let x = _mm_loadu_si128(blk.add(2) as *const __m128i);
        (_mm_sub_epi8(_mm_and_si128(x, mask), eight), _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(x), mask), eight))
    }

    /// R rows with 8-lane vectors: per block of 32 values, each row's four accumulators stay in
    /// registers while the positions' blocks are widened once for both rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2<const R: usize, const Q8: bool>(
        rows: &[&[u8]],
        hd: usize,
        steps: &[(f32, [f32; CHUNK], usize, usize)],
        o: *mut f32,
    ) {
        let bb = if Q8 { 34 } else { 18 };
        let most = steps.iter().map(|s| s.2).max().unwrap_or(0);
        for b in 0..hd / 32 {
            let mut a: [[__m256; 4]; R] = std::array::from_fn(|r| {
                let (corr, ap) = (_mm256_set1_ps(steps[r].0), o.add(steps[r].3 + 32 * b));
                std::array::from_fn(|k| _mm256_mul_ps(_mm256_loadu_ps(ap.add(8 * k)), corr))
            });
            for (j, row) in rows.iter().enumerate().take(most) {
                let blk = row.as_ptr().add(bb * b);
                let d = _mm256_broadcastss_ps(scale(blk));
                let q: [__m256i; 4] = if Q8 {
                    std::array::from_fn(|k| _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * k) as *const __m128i)))
                } else {
                    let (lo, hi) = q4_values(blk);
                    [
                        _mm256_cvtepi8_epi32(lo),
                        _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo)),
                        _mm256_cvtepi8_epi32(hi),
                        _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi)),
                    ]
                };
                let v = q.map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
                for r in 0..R {
                    if j < steps[r].2 {
                        let p = _mm256_set1_ps(steps[r].1[j]);
                        for k in 0..4 {
                            a[r][k] = _mm256_fmadd_ps(p, v[k], a[r][k]);
                        }
                    }
                }
            }
            for r in 0..R {
                let ap = o.add(steps[r].3 + 32 * b);
                for (k, ak) in a[r].iter().enumerate() {
                    _mm256_storeu_ps(ap.add(8 * k), *ak);
                }
            }
        }
    }

    /// [`rows_avx2`] with 16-lane vectors.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn rows_avx512<const R: usize, const Q8: bool>(
        rows: &[&[u8]],
        hd: usize,
        steps: &[(f32, [f32; CHUNK], usize, usize)],
        o: *mut f32,
    ) {
        let bb = if Q8 { 34 } else { 18 };
        let most = steps.iter().map(|s| s.2).max().unwrap_or(0);
        for b in 0..hd / 32 {
            let mut a: [[__m512; 2]; R] = std::array::from_fn(|r| {
                let (corr, ap) = (_mm512_set1_ps(steps[r].0), o.add(steps[r].3 + 32 * b));
                std::array::from_fn(|k| _mm512_mul_ps(_mm512_loadu_ps(ap.add(16 * k)), corr))
            });
            for (j, row) in rows.iter().enumerate().take(most) {
                let blk = row.as_ptr().add(bb * b);
                let d = _mm512_broadcastss_ps(scale(blk));
                let q: [__m512i; 2] = if Q8 {
                    std::array::from_fn(|k| {
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2 + 16 * k) as *const __m128i))
                    })
                } else {
                    let (lo, hi) = q4_values(blk);
                    [_mm512_cvtepi8_epi32(lo), _mm512_cvtepi8_epi32(hi)]
                };
                let v = q.map(|q| _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
                for r in 0..R {
                    if j < steps[r].2 {
                        let p = _mm512_set1_ps(steps[r].1[j]);
                        for k in 0..2 {
                            a[r][k] = _mm512_fmadd_ps(p, v[k], a[r][k]);
                        }
                    }
                }
            }
            for r in 0..R {
                let ap = o.add(steps[r].3 + 32 * b);
                for (k, ak) in a[r].iter().enumerate() {
                    _mm512_storeu_ps(ap.add(16 * k), *ak);
                }
            }
        }
    }
}
