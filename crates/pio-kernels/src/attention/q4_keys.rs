//! Scores of a tile of q4_0 keys ([`super::CodedKv`]) against int8 queries, with integer dot
//! products of the stored nibbles, as llama.cpp and ik_llama.cpp score q4_0 against q8_0 —
//! never widening the keys to f32.
//!
//! A q4_0 key of a cache block is `anchor[c] + scale[c] · d_b · (nibble - 8)` for channel `c` in
//! block `b` (32 channels), so a query row's score is
//! `q · anchor + Σ_b d_b · Σ_{c ∈ b} (q[c] · scale[c]) · (nibble[c] - 8)`. Per cache block, each
//! query row's `q ∘ scale` is quantized to int8 blocks of 32 (`qi`, one f32 scale `dq` each);
//! then per block `Σ qi · nibble` is an exact integer sum (`vpmaddubsw` or VNNI `vpdpbusd`, the
//! nibbles the unsigned operand), less `8 Σ qi`.
//!
//! Every level computes the same integers and accumulates the blocks in the same order with
//! fused multiply-adds; only `q · anchor` sums in a level's own order. Prefill and decode take
//! this same path, so scores are batch-invariant.

use std::cell::RefCell;

use half::f16;
use half::slice::HalfBitsSliceExt;

use super::{KvElem, CHUNK};
use crate::cpu::SimdLevel;

/// The largest head dimension scored here (the f32 tile takes larger ones).
pub(crate) const MAX_HD: usize = 256;

/// One query row prepared against one cache block's channel scales and anchor.
pub(crate) struct Q4Query {
    /// `q ∘ scale` as int8, per block of 32 channels.
    qi: [i8; MAX_HD],
    /// Each block's scale: `max |q ∘ scale| / 127`.
    dq: [f32; MAX_HD / 32],
    /// Each block's `8 Σ qi` (the nibbles' offset).
    bias: [i32; MAX_HD / 32],
    /// `q · anchor`.
    qa: f32,
}

impl Q4Query {
    const ZERO: Q4Query = Q4Query { qi: [0; MAX_HD], dq: [0.0; MAX_HD / 32], bias: [0; MAX_HD / 32], qa: 0.0 };
}

impl Default for Q4Query {
    fn default() -> Q4Query {
        Q4Query::ZERO
    }
}

/// [`scores`]' buffers, per thread: built on the stack they were zeroed (3 KiB) for every chunk.
struct Scratch {
    /// The block's anchor row and channel scales, widened.
    wide: [f32; 2 * MAX_HD],
    /// Up to four rows prepared at once, and their dots.
    prep: [Q4Query; 4],
    f: [[f32; CHUNK]; 4],
}

thread_local! {
    static SCRATCH: RefCell<Scratch> =
        const { RefCell::new(Scratch { wide: [0.0; 2 * MAX_HD], prep: [Q4Query::ZERO; 4], f: [[0.0; CHUNK]; 4] }) };
}

/// Below this a block of `q ∘ scale` quantizes to zeros (`127 / max` would overflow).
const TINY: f32 = 1e-30;

/// Prepares query row `q` (`hd` values, a multiple of 32 up to [`MAX_HD`]) against a block's
/// anchor row and channel scales, widened (`side`: `2 hd` values): the same bytes at every
/// level (products rounded once, `d = max / 127`, values times `127 / max` rounded to nearest
/// even).
pub(crate) fn prepare(level: SimdLevel, q: &[f32], side: &[f32], out: &mut Q4Query) {
    let hd = q.len();
    assert!(hd.is_multiple_of(32) && hd <= MAX_HD && side.len() == 2 * hd, "a query row of whole blocks");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has; sizes asserted above.
        SimdLevel::Avx512 => unsafe { x86::prepare_avx512(q, side, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::prepare_avx2(q, side, out) },
        _ => prepare_scalar(q, side, out),
    }
}

fn prepare_scalar(q: &[f32], side: &[f32], out: &mut Q4Query) {
    let (anchor, scales) = side.split_at(q.len());
    let mut x = [0f32; 32];
    for (b, (qb, sb)) in q.chunks_exact(32).zip(scales.chunks_exact(32)).enumerate() {
        for ((x, &q), &s) in x.iter_mut().zip(qb).zip(sb) {
            *x = q * s;
        }
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = if amax > TINY { 127.0 / amax } else { 0.0 };
        let mut sum = 0;
        for (qi, &v) in out.qi[32 * b..32 * b + 32].iter_mut().zip(&x) {
            *qi = ((v * inv).round_ties_even() as i32).clamp(-127, 127) as i8;
            sum += i32::from(*qi);
        }
        out.dq[b] = amax / 127.0;
        out.bias[b] = 8 * sum;
    }
    out.qa = q.iter().zip(anchor).map(|(&q, &a)| q * a).sum();
}

/// Scores of the `active` rows (`(row, seen)`) of `q` (`[rows, hd]`) against a tile of q4_0
/// keys (`n` of its CHUNK positions valid) with `side` its anchor row and channel scales:
/// `s[row * CHUNK + j] = scale · q[row] · key_j` for `j < seen`, `-inf` past it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores(
    level: SimdLevel,
    tile: &[u8],
    hd: usize,
    side: &[u16],
    q: &[f32],
    active: &[(usize, usize)],
    n: usize,
    scale: f32,
    s: &mut [f32],
) {
    assert!(
        hd.is_multiple_of(32) && hd <= MAX_HD && tile.len() == CHUNK * hd / 32 * 18 && side.len() == 2 * hd,
        "a whole tile of q4_0 keys with its anchor and channel scales"
    );
    SCRATCH.with_borrow_mut(|Scratch { wide, prep, f }| {
        let wide = &mut wide[..2 * hd];
        f16::widen_rows(level, side.reinterpret_cast(), 2 * hd, 1, 2 * hd, wide);
        rows_scores(level, tile, hd, wide, q, active, n, scale, s, prep, f);
    });
}

/// [`scores`] with the side rows widened (`wide`) and its buffers.
#[allow(clippy::too_many_arguments)]
fn rows_scores(
    level: SimdLevel,
    tile: &[u8],
    hd: usize,
    wide: &[f32],
    q: &[f32],
    active: &[(usize, usize)],
    n: usize,
    scale: f32,
    s: &mut [f32],
    prep: &mut [Q4Query; 4],
    f: &mut [[f32; CHUNK]; 4],
) {
    // Rows four at a time: their preparations are independent chains (a reduction and a
    // division each) for the core to overlap, then their dots two by two.
    for rows in active.chunks(4) {
        for (p, &(i, _)) in prep.iter_mut().zip(rows) {
            prepare(level, &q[i * hd..(i + 1) * hd], wide, p);
        }
        for (p, fr) in prep[..rows.len()].chunks(2).zip(f.chunks_mut(2)) {
            let fr = &mut fr[..p.len()];
            match level {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the level only names features the CPU has; the tile's size was asserted.
                SimdLevel::Avx512 => unsafe { x86::dots_avx512(tile, hd, p, fr) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                SimdLevel::Avx2 => unsafe { x86::dots_avx2(tile, hd, p, fr) },
                _ => dots_scalar(tile, hd, p, fr),
            }
        }
        for ((p, fr), &(i, seen)) in prep.iter().zip(f.iter()).zip(rows) {
            let (out, seen) = (&mut s[i * CHUNK..(i + 1) * CHUNK], seen.min(n));
            for (sj, &fj) in out.iter_mut().zip(fr) {
                *sj = (p.qa + fj) * scale;
            }
            out[seen..].fill(f32::NEG_INFINITY);
        }
    }
}

/// The scalar reference of the dots: `f[r][j] = Σ_b d_jb · dq_b · (Σ qi · nibble - 8 Σ qi)`,
/// one fused multiply-add per block in block order.
fn dots_scalar(tile: &[u8], hd: usize, qs: &[Q4Query], f: &mut [[f32; CHUNK]]) {
    let nb = hd / 32;
    for (q, f) in qs.iter().zip(f.iter_mut()) {
        for (j, fj) in f.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..nb {
                let at = CHUNK * hd / 2 + 32 * b + 2 * j;
                let dk = f16::from_le_bytes([tile[at], tile[at + 1]]).to_f32();
                let mut dot = 0i32;
                for w in 0..4 {
                    let at = 64 * (4 * b + w) + 4 * j;
                    for t in 0..4 {
                        let byte = tile[at + t];
                        let c = 32 * b + 4 * w + t;
                        dot += i32::from(byte & 0x0F) * i32::from(q.qi[c]);
                        dot += i32::from(byte >> 4) * i32::from(q.qi[c + 16]);
                    }
                }
                acc = ((dot - q.bias[b]) as f32).mul_add(dk * q.dq[b], acc);
            }
            *fj = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Q4Query, CHUNK};

    /// Lane `k` of the result is the maximum (`max`) or sum (`add`) of `v[k]`'s eight lanes.
    #[inline(always)]
    unsafe fn across4(v: [__m256; 4], f: impl Fn(__m256, __m256) -> __m256) -> __m128 {
        let a = f(_mm256_unpacklo_ps(v[0], v[1]), _mm256_unpackhi_ps(v[0], v[1]));
        let b = f(_mm256_unpacklo_ps(v[2], v[3]), _mm256_unpackhi_ps(v[2], v[3]));
        // a: (v0, v1, v0, v1) per lane half, b: (v2, v3, v2, v3).
        let c = f(_mm256_shuffle_ps::<0x44>(a, b), _mm256_shuffle_ps::<0xEE>(a, b));
        let c = f(c, _mm256_permute2f128_ps::<0x01>(c, c));
        _mm256_castps256_ps128(c)
    }

    /// [`super::prepare`] with 8-lane vectors, four blocks at a time (their maxima and sums
    /// reduced together, one division for the four): the same bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn prepare_avx2(q: &[f32], side: &[f32], out: &mut Q4Query) {
        let hd = q.len();
        let (qp, ap, sp) = (q.as_ptr(), side.as_ptr(), side.as_ptr().add(hd));
        let sign = _mm256_set1_ps(-0.0);
        // vpackssdw / vpacksswb interleave the 128-bit lanes: this puts the dwords back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut qa = [_mm256_setzero_ps(); 2];
        // Four blocks at a time (`hd` is a multiple of 32: a last group of fewer blocks pads
        // with zero maxima, whose lanes are not stored).
        for b0 in (0..hd / 32).step_by(4) {
            let nb = (hd / 32 - b0).min(4);
            let mut mx = [_mm256_setzero_ps(); 4];
            for (bi, m) in mx.iter_mut().enumerate().take(nb) {
                for k in 0..4 {
                    let at = 32 * (b0 + bi) + 8 * k;
                    let qv = _mm256_loadu_ps(qp.add(at));
                    qa[k % 2] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(ap.add(at)), qa[k % 2]);
                    let x = _mm256_mul_ps(qv, _mm256_loadu_ps(sp.add(at)));
                    *m = _mm256_max_ps(*m, _mm256_andnot_ps(sign, x));
                }
            }
            let amax = across4(mx, |a, b| _mm256_max_ps(a, b));
            let big = _mm_cmpgt_ps(amax, _mm_set1_ps(super::TINY));
            let inv = _mm_and_ps(_mm_div_ps(_mm_set1_ps(127.0), amax), big);
            let d = _mm_div_ps(amax, _mm_set1_ps(127.0));
            let (mut invs, mut ds) = ([0f32; 4], [0f32; 4]);
            _mm_storeu_ps(invs.as_mut_ptr(), inv);
            _mm_storeu_ps(ds.as_mut_ptr(), d);
            let mut sums = [_mm256_setzero_ps(); 4];
            for (bi, sum) in sums.iter_mut().enumerate().take(nb) {
                let b = b0 + bi;
                let iv = _mm256_set1_ps(invs[bi]);
                let v: [__m256i; 4] = std::array::from_fn(|k| {
                    let at = 32 * b + 8 * k;
                    let x = _mm256_mul_ps(_mm256_loadu_ps(qp.add(at)), _mm256_loadu_ps(sp.add(at)));
                    _mm256_cvtps_epi32(_mm256_mul_ps(x, iv))
                });
                let t = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
                *sum = _mm256_castsi256_ps(t);
                // |x · 127 / max| <= 127 rounded: the saturating packs never clip.
                let w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
                let w = _mm256_permutevar8x32_epi32(w, order);
                _mm256_storeu_si256(out.qi.as_mut_ptr().add(32 * b) as *mut __m256i, w);
            }
            let total = _mm_castps_si128(across4(sums, |a, b| {
                _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)))
            }));
            let mut bias = [0i32; 4];
            _mm_storeu_si128(bias.as_mut_ptr() as *mut __m128i, _mm_slli_epi32::<3>(total));
            out.dq[b0..b0 + nb].copy_from_slice(&ds[..nb]);
            out.bias[b0..b0 + nb].copy_from_slice(&bias[..nb]);
        }
        let s = _mm256_add_ps(qa[0], qa[1]);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        out.qa = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }

    /// [`super::prepare`] with 16-lane vectors, four blocks at a time: `q ∘ scale` stays in
    /// registers between finding the blocks' maxima and quantizing. The same bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub unsafe fn prepare_avx512(q: &[f32], side: &[f32], out: &mut Q4Query) {
        let hd = q.len();
        let (qp, ap, sp) = (q.as_ptr(), side.as_ptr(), side.as_ptr().add(hd));
        let sign = _mm512_set1_ps(-0.0);
        let half = |v: __m512| _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
        let mut qa = [_mm512_setzero_ps(); 2];
        for b0 in (0..hd / 32).step_by(4) {
            let nb = (hd / 32 - b0).min(4);
            let mut x = [[_mm512_setzero_ps(); 2]; 4];
            let mut mx = [_mm256_setzero_ps(); 4];
            for bi in 0..nb {
                for k in 0..2 {
                    let at = 32 * (b0 + bi) + 16 * k;
                    let qv = _mm512_loadu_ps(qp.add(at));
                    qa[k] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(ap.add(at)), qa[k]);
                    x[bi][k] = _mm512_mul_ps(qv, _mm512_loadu_ps(sp.add(at)));
                }
                let m = _mm512_max_ps(_mm512_andnot_ps(sign, x[bi][0]), _mm512_andnot_ps(sign, x[bi][1]));
                mx[bi] = half(m);
            }
            let amax = across4(mx, |a, b| _mm256_max_ps(a, b));
            let big = _mm_cmpgt_ps(amax, _mm_set1_ps(super::TINY));
            let inv = _mm_and_ps(_mm_div_ps(_mm_set1_ps(127.0), amax), big);
            let d = _mm_div_ps(amax, _mm_set1_ps(127.0));
            let (mut invs, mut ds) = ([0f32; 4], [0f32; 4]);
            _mm_storeu_ps(invs.as_mut_ptr(), inv);
            _mm_storeu_ps(ds.as_mut_ptr(), d);
            let mut sums = [_mm256_setzero_si256(); 4];
            for bi in 0..nb {
                let iv = _mm512_set1_ps(invs[bi]);
                let v = x[bi].map(|x| _mm512_cvtps_epi32(_mm512_mul_ps(x, iv)));
                let t = _mm512_add_epi32(v[0], v[1]);
                sums[bi] = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64::<1>(t));
                for (k, v) in v.into_iter().enumerate() {
                    let at = out.qi.as_mut_ptr().add(32 * (b0 + bi) + 16 * k);
                    _mm_storeu_si128(at as *mut __m128i, _mm512_cvtepi32_epi8(v));
                }
            }
            let total = _mm_castps_si128(across4(sums.map(|v| _mm256_castsi256_ps(v)), |a, b| {
                _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)))
            }));
            let mut bias = [0i32; 4];
            _mm_storeu_si128(bias.as_mut_ptr() as *mut __m128i, _mm_slli_epi32::<3>(total));
            out.dq[b0..b0 + nb].copy_from_slice(&ds[..nb]);
            out.bias[b0..b0 + nb].copy_from_slice(&bias[..nb]);
        }
        out.qa = _mm512_reduce_add_ps(_mm512_add_ps(qa[0], qa[1]));
    }

    /// The broadcast dword of `qi` at byte `at`.
    #[inline(always)]
    unsafe fn qword(q: &Q4Query, at: usize) -> i32 {
        debug_assert!(at + 4 <= q.qi.len());
        std::ptr::read_unaligned(q.qi.as_ptr().add(at) as *const i32)
    }

    /// [`super::dots_scalar`] for up to two query rows with 8-lane vectors: per block and half
    /// of the tile (positions 0..8, 8..16), the four groups' low and high nibbles against the
    /// broadcast query groups with `vpmaddubsw` (at most 8 · 2 · 15 · 127 = 30480: exact in 16
    /// bits), then `vpmaddwd` into each position's dword.
    ///
    /// With AVX-VNNI ([`crate::cpu::has_avx_vnni`]) the 256-bit `vpdpbusd` takes the products
    /// ([`dots_avx2_vnni`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_avx2(tile: &[u8], hd: usize, qs: &[Q4Query], f: &mut [[f32; CHUNK]]) {
        if crate::cpu::has_avx_vnni() {
            return dots_avx2_vnni(tile, hd, qs, f);
        }
        match qs.len() {
            2 => dots_rows_256::<2, false>(tile, hd, qs, f),
            1 => dots_rows_256::<1, false>(tile, hd, qs, f),
            _ => unreachable!("one or two rows at a time"),
        }
    }

    /// [`dots_avx2`] with AVX-VNNI's `vpdpbusd` (the nibbles unsigned, the query bytes signed):
    /// the same exact integers in i32 directly.
    ///
    /// # Safety
    /// The CPU has AVX2, AVX-VNNI, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn dots_avx2_vnni(tile: &[u8], hd: usize, qs: &[Q4Query], f: &mut [[f32; CHUNK]]) {
        match qs.len() {
            2 => dots_rows_256::<2, true>(tile, hd, qs, f),
            1 => dots_rows_256::<1, true>(tile, hd, qs, f),
            _ => unreachable!("one or two rows at a time"),
        }
    }

    /// The rows' dots with 8-lane vectors, without (`VNNI` false) or with AVX-VNNI; inlined into
    /// [`dots_avx2`] and [`dots_avx2_vnni`], which enable what it uses.
    #[inline(always)]
    unsafe fn dots_rows_256<const R: usize, const VNNI: bool>(
        tile: &[u8],
        hd: usize,
        qs: &[Q4Query],
        f: &mut [[f32; CHUNK]],
    ) {
        assert!(qs.len() == R && f.len() == R && tile.len() == CHUNK * hd / 32 * 18 && hd <= super::MAX_HD);
        let tp = tile.as_ptr();
        let (mask, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..hd / 32 {
            let at = tp.add(CHUNK * hd / 2 + 32 * b);
            let dk = [
                _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(at.add(16) as *const __m128i)),
            ];
            // isum[r][h][e]: row r, positions 8h..8h+8; each broadcast query group serves both
            // halves. With VNNI, i32 sums of the low (e = 0) and high nibbles in separate chains
            // (for `vpdpbusd`'s latency); without, one i16 sum in e = 0.
            let mut isum = [[[_mm256_setzero_si256(); 2]; 2]; R];
            for w in 0..4 {
                let x: [__m256i; 2] =
                    std::array::from_fn(|h| _mm256_loadu_si256(tp.add(64 * (4 * b + w) + 32 * h) as *const __m256i));
                // (Written out rather than `map`: a closure would lose the entry points' target
                // features.)
                let lo = [_mm256_and_si256(x[0], mask), _mm256_and_si256(x[1], mask)];
                let hi = [
                    _mm256_and_si256(_mm256_srli_epi16::<4>(x[0]), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(x[1]), mask),
                ];
                for r in 0..R {
                    let ql = _mm256_set1_epi32(qword(&qs[r], 32 * b + 4 * w));
                    let qh = _mm256_set1_epi32(qword(&qs[r], 32 * b + 16 + 4 * w));
                    for h in 0..2 {
                        let s = &mut isum[r][h];
                        if VNNI {
                            s[0] = _mm256_dpbusd_avx_epi32(s[0], lo[h], ql);
                            s[1] = _mm256_dpbusd_avx_epi32(s[1], hi[h], qh);
                        } else {
                            let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], ql), _mm256_maddubs_epi16(hi[h], qh));
                            s[0] = _mm256_add_epi16(s[0], p);
                        }
                    }
                }
            }
            for r in 0..R {
                let (bias, sc) = (_mm256_set1_epi32(qs[r].bias[b]), _mm256_set1_ps(qs[r].dq[b]));
                for h in 0..2 {
                    let s = isum[r][h];
                    let t = if VNNI { _mm256_add_epi32(s[0], s[1]) } else { _mm256_madd_epi16(s[0], ones) };
                    let t = _mm256_sub_epi32(t, bias);
                    acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dk[h], sc), acc[r][h]);
                }
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(f[r].as_mut_ptr(), acc[r][0]);
            _mm256_storeu_ps(f[r].as_mut_ptr().add(8), acc[r][1]);
        }
    }

    /// [`super::dots_scalar`] for up to two query rows with 16-lane vectors: `vpdpbusd` where the
    /// CPU has VNNI, else `vpmaddubsw` and `vpmaddwd` as at AVX2.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn dots_avx512(tile: &[u8], hd: usize, qs: &[Q4Query], f: &mut [[f32; CHUNK]]) {
        let vnni = crate::cpu::has_avx512_vnni();
        match (qs.len(), vnni) {
            (2, true) => dots_rows_vnni::<2>(tile, hd, qs, f),
            (1, true) => dots_rows_vnni::<1>(tile, hd, qs, f),
            (2, false) => dots_rows_avx512::<2>(tile, hd, qs, f),
            (1, false) => dots_rows_avx512::<1>(tile, hd, qs, f),
            _ => unreachable!("one or two rows at a time"),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn dots_rows_vnni<const R: usize>(tile: &[u8], hd: usize, qs: &[Q4Query], f: &mut [[f32; CHUNK]]) {
        assert!(qs.len() == R && f.len() == R && tile.len() == CHUNK * hd / 32 * 18 && hd <= super::MAX_HD);
        let tp = tile.as_ptr();
        let mask = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..hd / 32 {
            let dk = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(CHUNK * hd / 2 + 32 * b) as *const __m256i));
            // Two chains per row (the low and the high nibbles), for `vpdpbusd`'s latency.
            let mut isum = [[_mm512_setzero_si512(); 2]; R];
            for w in 0..4 {
                let x = _mm512_loadu_si512(tp.add(64 * (4 * b + w)) as *const _);
                let lo = _mm512_and_si512(x, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
                for r in 0..R {
                    let ql = _mm512_set1_epi32(qword(&qs[r], 32 * b + 4 * w));
                    let qh = _mm512_set1_epi32(qword(&qs[r], 32 * b + 16 + 4 * w));
                    isum[r][0] = _mm512_dpbusd_epi32(isum[r][0], lo, ql);
                    isum[r][1] = _mm512_dpbusd_epi32(isum[r][1], hi, qh);
                }
            }
            for r in 0..R {
                let t = _mm512_add_epi32(isum[r][0], isum[r][1]);
                let t = _mm512_sub_epi32(t, _mm512_set1_epi32(qs[r].bias[b]));
                let sc = _mm512_mul_ps(dk, _mm512_set1_ps(qs[r].dq[b]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(f[r].as_mut_ptr(), acc[r]);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn dots_rows_avx512<const R: usize>(tile: &[u8], hd: usize, qs: &[Q4Query], f: &mut [[f32; CHUNK]]) {
        assert!(qs.len() == R && f.len() == R && tile.len() == CHUNK * hd / 32 * 18 && hd <= super::MAX_HD);
        let tp = tile.as_ptr();
        let (mask, ones) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi16(1));
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..hd / 32 {
            let dk = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(CHUNK * hd / 2 + 32 * b) as *const __m256i));
            let mut isum = [_mm512_setzero_si512(); R];
            for w in 0..4 {
                let x = _mm512_loadu_si512(tp.add(64 * (4 * b + w)) as *const _);
                let lo = _mm512_and_si512(x, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
                for r in 0..R {
                    let ql = _mm512_set1_epi32(qword(&qs[r], 32 * b + 4 * w));
                    let qh = _mm512_set1_epi32(qword(&qs[r], 32 * b + 16 + 4 * w));
                    let p = _mm512_add_epi16(_mm512_maddubs_epi16(lo, ql), _mm512_maddubs_epi16(hi, qh));
                    isum[r] = _mm512_add_epi16(isum[r], p);
                }
            }
            for r in 0..R {
                let t = _mm512_sub_epi32(_mm512_madd_epi16(isum[r], ones), _mm512_set1_epi32(qs[r].bias[b]));
                let sc = _mm512_mul_ps(dk, _mm512_set1_ps(qs[r].dq[b]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(f[r].as_mut_ptr(), acc[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Every level prepares the same bytes, and its dots are bitwise the scalar reference's (the
    /// same integers, the same fused multiply-adds in the same order).
    #[test]
    fn every_level_prepares_the_same_bytes_and_the_same_dots() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for hd in [32usize, 64, 128, 256] {
            let tile: Vec<u8> = (0..CHUNK * hd / 32 * 18).map(|_| rng.random()).collect();
            // Finite positive f16 scales in the tile's scale slots.
            let mut tile = tile;
            for b in 0..hd / 32 * CHUNK {
                let d = f16::from_f32(rng.random_range(0.001..0.5)).to_le_bytes();
                tile[CHUNK * hd / 2 + 2 * b..][..2].copy_from_slice(&d);
            }
            let anchor: Vec<u16> = (0..hd).map(|_| f16::from_f32(rng.random_range(-3.0..3.0)).to_bits()).collect();
            let chs: Vec<u16> = (0..hd).map(|_| f16::from_f32(rng.random_range(0.05..4.0)).to_bits()).collect();
            let side: Vec<f32> = anchor.iter().chain(&chs).map(|&h| f16::from_bits(h).to_f32()).collect();
            let bits: Vec<u16> = anchor.iter().chain(&chs).copied().collect();
            for level in SimdLevel::available() {
                let mut wide = vec![0f32; 2 * hd];
                f16::widen_rows(level, bits.reinterpret_cast(), 2 * hd, 1, 2 * hd, &mut wide);
                assert_eq!(wide, side, "{level:?}: widened side rows");
            }
            let rows: Vec<Vec<f32>> = (0..3)
                .map(|r| (0..hd).map(|_| if r == 2 { 0.0 } else { rng.random_range(-2.0..2.0) }).collect())
                .collect();
            let want: Vec<(Q4Query, [f32; CHUNK])> = rows
                .iter()
                .map(|q| {
                    let mut p = Q4Query::default();
                    prepare(SimdLevel::Scalar, q, &side, &mut p);
                    let mut f = [[0f32; CHUNK]];
                    dots_scalar(&tile, hd, std::slice::from_ref(&p), &mut f);
                    (p, f[0])
                })
                .collect();
            for level in SimdLevel::available() {
                let mut p = [Q4Query::default(), Q4Query::default()];
                for (q, (w, _)) in rows.iter().zip(&want) {
                    prepare(level, q, &side, &mut p[0]);
                    assert_eq!(p[0].qi, w.qi, "{level:?} hd {hd}: query bytes");
                    assert_eq!(p[0].bias, w.bias, "{level:?} hd {hd}: offsets");
                    assert!(p[0].dq.iter().zip(&w.dq).all(|(a, b)| a.to_bits() == b.to_bits()), "{level:?}: scales");
                    assert!((p[0].qa - w.qa).abs() <= 1e-4 * (1.0 + w.qa.abs()), "{level:?}: q . anchor");
                }
                for pair in [[0usize, 1], [1, 2]] {
                    for (r, &i) in pair.iter().enumerate() {
                        prepare(level, &rows[i], &side, &mut p[r]);
                    }
                    let mut f = [[0f32; CHUNK]; 2];
                    match level {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `available()` lists only levels the CPU has; a whole tile.
                        SimdLevel::Avx512 => unsafe { x86::dots_avx512(&tile, hd, &p, &mut f) },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: as above.
                        SimdLevel::Avx2 => unsafe { x86::dots_avx2(&tile, hd, &p, &mut f) },
                        _ => dots_scalar(&tile, hd, &p, &mut f),
                    }
                    for (r, &i) in pair.iter().enumerate() {
                        let same = f[r].iter().zip(&want[i].1).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{level:?} hd {hd} row {i}: {:?} vs {:?}", f[r], want[i].1);
                    }
                    // AVX-VNNI wherever the CPU has it, whatever the process's level.
                    #[cfg(target_arch = "x86_64")]
                    if level == SimdLevel::Avx2 && crate::cpu::avx_vnni_detected() {
                        let mut f = [[0f32; CHUNK]; 2];
                        // SAFETY: the CPU has AVX2 (the level) and AVX-VNNI (just checked).
                        unsafe { x86::dots_avx2_vnni(&tile, hd, &p, &mut f) };
                        for (r, &i) in pair.iter().enumerate() {
                            let same = f[r].iter().zip(&want[i].1).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "AVX-VNNI hd {hd} row {i}: {:?} vs {:?}", f[r], want[i].1);
                        }
                    }
                }
            }
        }
    }
}
