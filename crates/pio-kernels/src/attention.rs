//! Attention of a flat batch of query tokens over a paged KV cache.
//!
//! Cache layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]` f32, keys and
//! values in separate buffers. A token's slot is `block * block_size + offset`; a sequence's
//! block table lists its blocks in position order.
//!
//! The kernel is the CPU form of FlashAttention: keys are visited once, in chunks of
//! [`CHUNK`] positions, with an online softmax (a running maximum and sum per query row, the
//! output rescaled when the maximum grows), so no score matrix is ever materialised. One work
//! item is one query token and one KV head, covering every query head that shares the KV head
//! (GQA): the keys and values read for the item serve all of them. Items are split across
//! threads, so a single decoding sequence still uses every core.
//!
//! **Batch invariance.** The chunks are fixed by absolute position (0..16, 16..32, ...) and each
//! query row is computed by the same operations whatever else is in the batch, so a token's
//! output is bitwise the same alone, batched, or in any prefill chunking (at a given SIMD level).

use crate::cpu::{self, SimdLevel};
use crate::parallel;

/// Key positions per online-softmax step.
pub const CHUNK: usize = 16;

/// One layer's paged cache, borrowed for reading.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// What each query token attends to.
#[derive(Debug, Clone, Copy)]
pub struct QueryContext<'a> {
    /// Blocks of the token's sequence, in position order.
    pub block_table: &'a [u32],
    /// Number of cached positions the token sees (its position + 1: causal).
    pub context_len: usize,
}

/// `out[t, h, :] = softmax(scale * q[t, h] · K[ctx]) V[ctx]` for every query token `t` and head
/// `h`; query head `h` reads kv head `h / (num_heads / num_kv_heads)` (GQA/MQA).
/// `q` and `out` are `[tokens, num_heads * head_dim]`. A token with an empty context gets zeros.
pub fn paged_attention(
    q: &[f32],
    num_heads: usize,
    kv: PagedKv<'_>,
    queries: &[QueryContext<'_>],
    scale: f32,
    out: &mut [f32],
) {
    paged_attention_at(cpu::level(), q, num_heads, kv, queries, scale, out)
}

/// [`paged_attention`] at an explicit SIMD level (tests and benchmarks).
pub fn paged_attention_at(
    level: SimdLevel,
    q: &[f32],
    num_heads: usize,
    kv: PagedKv<'_>,
    queries: &[QueryContext<'_>],
    scale: f32,
    out: &mut [f32],
) {
    let hd = kv.head_dim;
    let row = num_heads * hd;
    assert_eq!(q.len(), queries.len() * row);
    assert_eq!(out.len(), q.len());
    assert!(kv.num_kv_heads > 0 && num_heads.is_multiple_of(kv.num_kv_heads));
    let group = num_heads / kv.num_kv_heads;
    let nkv = kv.num_kv_heads;
    for ctx in queries {
        assert!(ctx.context_len <= ctx.block_table.len() * kv.block_size, "context runs past the block table");
    }
    let work: usize = queries.iter().map(|c| c.context_len * row * 2).sum();
    // Runs of up to QUERY_TILE consecutive query tokens of one sequence: a run reads each chunk
    // of keys and values once for all its tokens (and all the query heads sharing the kv head).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for t in 0..queries.len() {
        match runs.last_mut() {
            Some((s, e))
                if *e == t && t - *s < QUERY_TILE && std::ptr::eq(queries[*s].block_table, queries[t].block_table) =>
            {
                *e = t + 1
            }
            _ => runs.push((t, t + 1)),
        }
    }
    // Item `it` is (kv head it / runs, run it % runs): a thread's consecutive items share a kv
    // head, whose keys and values then stay in cache.
    let nr = runs.len();
    let n_items = nr * nkv;
    // Items cost in proportion to their tokens' contexts (a causal prefill's last tokens see the
    // whole prompt, its first ones almost nothing), so the threads get ranges of equal total
    // context rather than equal item counts.
    let cost = |it: usize| {
        let (s, e) = runs[it % nr];
        queries[s..e].iter().map(|c| c.context_len + CHUNK).sum::<usize>()
    };
    let total: usize = (0..n_items).map(cost).sum();
    let parts = parallel::num_threads().min(n_items).max(1);
    let mut bounds = Vec::with_capacity(parts + 1);
    bounds.push(0);
    let mut acc = 0;
    for it in 0..n_items {
        acc += cost(it);
        // Close part `bounds.len() - 1` once it holds its share of the total.
        if bounds.len() < parts && acc * parts >= total * bounds.len() {
            bounds.push(it + 1);
        }
    }
    while bounds.len() <= parts {
        bounds.push(n_items);
    }
    // An item's query rows: token-major, then the `group` heads of kv head `g`, `hd` each.
    let item = group * hd;
    let parts = parallel::for_each_range(parts, work, |p0, p1| {
        let (i0, i1) = (bounds[p0], bounds[p1]);
        let mut pieces = Vec::with_capacity(i1 - i0);
        let mut scratch = Scratch::default();
        for it in i0..i1 {
            let (g, (s, e)) = (it / nr, runs[it % nr]);
            scratch.q.clear();
            for t in s..e {
                scratch.q.extend_from_slice(&q[t * row + g * item..t * row + (g + 1) * item]);
            }
            let mut o = vec![0f32; (e - s) * item];
            attend(level, group, kv, g, &queries[s..e], scale, &mut o, &mut scratch);
            pieces.push((g, s, o));
        }
        pieces
    });
    for (g, s, o) in parts.into_iter().flatten() {
        for (k, rows) in o.chunks_exact(item).enumerate() {
            let t = s + k;
            out[t * row + g * item..t * row + (g + 1) * item].copy_from_slice(rows);
        }
    }
}

/// Query tokens of one sequence that share each loaded chunk of keys and values.
const QUERY_TILE: usize = 16;

/// Per-thread buffers reused across items.
#[derive(Default)]
struct Scratch {
    /// The item's query rows, `[tokens, group, hd]`.
    q: Vec<f32>,
    /// Running maximum of each query row.
    m: Vec<f32>,
    /// Running softmax denominator of each query row.
    l: Vec<f32>,
}

/// One item: the query rows in `scratch.q` (`ctxs.len()` tokens of one sequence x `group` heads)
/// against kv head `g`, written normalised to `o`. Each row sees exactly the keys of its own
/// context, chunk by chunk, with the same operations as if it were alone.
#[allow(clippy::too_many_arguments)]
fn attend(
    level: SimdLevel,
    group: usize,
    kv: PagedKv<'_>,
    g: usize,
    ctxs: &[QueryContext<'_>],
    scale: f32,
    o: &mut [f32],
    scratch: &mut Scratch,
) {
    let hd = kv.head_dim;
    let kv_row = kv.num_kv_heads * hd;
    let rows = ctxs.len() * group;
    o.fill(0.0);
    scratch.m.clear();
    scratch.m.resize(rows, f32::NEG_INFINITY);
    scratch.l.clear();
    scratch.l.resize(rows, 0.0);
    let Some(longest) = ctxs.iter().map(|c| c.context_len).max() else { return };
    let table = ctxs[0].block_table;
    let mut offs = [0usize; CHUNK];
    let mut p0 = 0;
    while p0 < longest {
        let n = (longest - p0).min(CHUNK);
        for (j, off) in offs.iter_mut().enumerate().take(n) {
            let pos = p0 + j;
            let slot = table[pos / kv.block_size] as usize * kv.block_size + pos % kv.block_size;
            *off = slot * kv_row + g * hd;
        }
        check_offsets(kv, &offs[..n]);
        for (t, ctx) in ctxs.iter().enumerate() {
            if ctx.context_len <= p0 {
                continue;
            }
            // This token sees the first `seen` keys of the chunk.
            let seen = (ctx.context_len - p0).min(n);
            for i in t * group..(t + 1) * group {
                let q = &scratch.q[i * hd..(i + 1) * hd];
                let acc = &mut o[i * hd..(i + 1) * hd];
                let (m, l) = (&mut scratch.m[i], &mut scratch.l[i]);
                match level {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the level only names features the CPU has; `check_offsets` asserted
                    // that every offset starts a whole head row inside both cache buffers.
                    SimdLevel::Avx512 if hd == 128 => unsafe {
                        x86::chunk_avx512_regs::<8>(q, kv.k, kv.v, &offs[..seen], scale, m, l, acc)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    SimdLevel::Avx512 if hd == 64 => unsafe {
                        x86::chunk_avx512_regs::<4>(q, kv.k, kv.v, &offs[..seen], scale, m, l, acc)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    SimdLevel::Avx512 if hd.is_multiple_of(16) => unsafe {
                        x86::chunk_avx512(q, kv.k, kv.v, &offs[..seen], scale, m, l, acc)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    SimdLevel::Avx2 | SimdLevel::Avx512 if hd.is_multiple_of(8) => unsafe {
                        x86::chunk_avx2(q, kv.k, kv.v, &offs[..seen], scale, m, l, acc)
                    },
                    _ => chunk_scalar(q, kv.k, kv.v, &offs[..seen], scale, m, l, acc),
                }
            }
        }
        p0 += n;
    }
    for i in 0..rows {
        let l = scratch.l[i];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for v in &mut o[i * hd..(i + 1) * hd] {
            *v *= inv;
        }
    }
}

/// Every offset starts a whole head row inside both cache buffers.
fn check_offsets(kv: PagedKv<'_>, offs: &[usize]) {
    let len = kv.k.len().min(kv.v.len());
    for &off in offs {
        assert!(off + kv.head_dim <= len, "cache slot out of range");
    }
}

/// One chunk of keys for one query row: scores, online-softmax update of `m`/`l`, and the
/// rescaled accumulation of values into `acc` (unnormalised).
#[allow(clippy::too_many_arguments)]
fn chunk_scalar(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    offs: &[usize],
    scale: f32,
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
) {
    let hd = q.len();
    let mut s = [0f32; CHUNK];
    for (sj, &off) in s.iter_mut().zip(offs) {
        *sj = crate::ops::dot(q, &k[off..off + hd]) * scale;
    }
    let s = &mut s[..offs.len()];
    let mx = s.iter().copied().fold(*m, f32::max);
    if mx == f32::NEG_INFINITY {
        return;
    }
    let corr = if *m == f32::NEG_INFINITY { 0.0 } else { (*m - mx).exp() };
    *l *= corr;
    for a in acc.iter_mut() {
        *a *= corr;
    }
    for (sj, &off) in s.iter_mut().zip(offs) {
        let p = (*sj - mx).exp();
        *l += p;
        crate::ops::axpy(p, &v[off..off + hd], acc);
    }
    *m = mx;
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::CHUNK;

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

    /// As [`super::chunk_scalar`], 16 lanes wide: `q.len()` is a multiple of 16 and every
    /// offset starts a head row inside `k` and `v`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn chunk_avx512(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        offs: &[usize],
        scale: f32,
        m: &mut f32,
        l: &mut f32,
        acc: &mut [f32],
    ) {
        let hd = q.len();
        let n = offs.len();
        let qp = q.as_ptr();
        let mut s = [f32::NEG_INFINITY; CHUNK];
        for (j, &off) in offs.iter().enumerate() {
            let kp = k.as_ptr().add(off);
            // Two accumulators; the same order for every score.
            let mut a0 = _mm512_setzero_ps();
            let mut a1 = _mm512_setzero_ps();
            let mut d = 0;
            while d + 32 <= hd {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(d)), _mm512_loadu_ps(kp.add(d)), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(d + 16)), _mm512_loadu_ps(kp.add(d + 16)), a1);
                d += 32;
            }
            if d < hd {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(d)), _mm512_loadu_ps(kp.add(d)), a0);
            }
            s[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
        }
        let sv = _mm512_loadu_ps(s.as_ptr());
        let mx = _mm512_reduce_max_ps(sv).max(*m);
        if mx == f32::NEG_INFINITY {
            return;
        }
        let corr = if *m == f32::NEG_INFINITY { 0.0 } else { (*m - mx).exp() };
        let p = super::x86::exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mx)));
        let mut pj = [0f32; CHUNK];
        _mm512_storeu_ps(pj.as_mut_ptr(), p);
        // Lanes past `n` hold exp(-inf) = 0, so the sum is over the chunk's keys only.
        *l = *l * corr + _mm512_reduce_add_ps(p);
        let cv = _mm512_set1_ps(corr);
        let ap = acc.as_mut_ptr();
        let mut d = 0;
        while d < hd {
            let mut a = _mm512_mul_ps(_mm512_loadu_ps(ap.add(d)), cv);
            for (j, &off) in offs.iter().enumerate().take(n) {
                a = _mm512_fmadd_ps(_mm512_set1_ps(pj[j]), _mm512_loadu_ps(v.as_ptr().add(off + d)), a);
            }
            _mm512_storeu_ps(ap.add(d), a);
            d += 16;
        }
        *m = mx;
    }

    /// As [`chunk_avx512`] for a head of `16 * NV` dimensions (64 or 128): the query row and the
    /// output accumulator live in registers, each value row is read once with its probability
    /// broadcast once, and each score is one horizontal sum.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn chunk_avx512_regs<const NV: usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        offs: &[usize],
        scale: f32,
        m: &mut f32,
        l: &mut f32,
        acc: &mut [f32],
    ) {
        debug_assert!(q.len() == 16 * NV && acc.len() == 16 * NV);
        let qv: [__m512; NV] = std::array::from_fn(|i| _mm512_loadu_ps(q.as_ptr().add(16 * i)));
        let mut s = [f32::NEG_INFINITY; CHUNK];
        for (j, &off) in offs.iter().enumerate() {
            let kp = k.as_ptr().add(off);
            let mut a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp));
            for (i, qi) in qv.iter().enumerate().skip(1) {
                a = _mm512_fmadd_ps(*qi, _mm512_loadu_ps(kp.add(16 * i)), a);
            }
            s[j] = _mm512_reduce_add_ps(a) * scale;
        }
        let sv = _mm512_loadu_ps(s.as_ptr());
        let mx = _mm512_reduce_max_ps(sv).max(*m);
        if mx == f32::NEG_INFINITY {
            return;
        }
        let corr = if *m == f32::NEG_INFINITY { 0.0 } else { (*m - mx).exp() };
        let p = exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mx)));
        let mut pj = [0f32; CHUNK];
        _mm512_storeu_ps(pj.as_mut_ptr(), p);
        *l = *l * corr + _mm512_reduce_add_ps(p);
        let cv = _mm512_set1_ps(corr);
        let mut av: [__m512; NV] =
            std::array::from_fn(|i| _mm512_mul_ps(_mm512_loadu_ps(acc.as_ptr().add(16 * i)), cv));
        for (j, &off) in offs.iter().enumerate() {
            let pv = _mm512_set1_ps(pj[j]);
            let vp = v.as_ptr().add(off);
            for (i, a) in av.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vp.add(16 * i)), *a);
            }
        }
        for (i, a) in av.iter().enumerate() {
            _mm512_storeu_ps(acc.as_mut_ptr().add(16 * i), *a);
        }
        *m = mx;
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

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// As [`super::chunk_scalar`], 8 lanes wide: `q.len()` is a multiple of 8 and every offset
    /// starts a head row inside `k` and `v`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chunk_avx2(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        offs: &[usize],
        scale: f32,
        m: &mut f32,
        l: &mut f32,
        acc: &mut [f32],
    ) {
        let hd = q.len();
        let qp = q.as_ptr();
        let mut s = [f32::NEG_INFINITY; CHUNK];
        for (j, &off) in offs.iter().enumerate() {
            let kp = k.as_ptr().add(off);
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            let mut d = 0;
            while d + 16 <= hd {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(d)), _mm256_loadu_ps(kp.add(d)), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(d + 8)), _mm256_loadu_ps(kp.add(d + 8)), a1);
                d += 16;
            }
            if d < hd {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(d)), _mm256_loadu_ps(kp.add(d)), a0);
            }
            s[j] = hsum(_mm256_add_ps(a0, a1)) * scale;
        }
        let mx = s.iter().copied().fold(*m, f32::max);
        if mx == f32::NEG_INFINITY {
            return;
        }
        let corr = if *m == f32::NEG_INFINITY { 0.0 } else { (*m - mx).exp() };
        let mxv = _mm256_set1_ps(mx);
        let p0 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr()), mxv));
        let p1 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(8)), mxv));
        let mut pj = [0f32; CHUNK];
        _mm256_storeu_ps(pj.as_mut_ptr(), p0);
        _mm256_storeu_ps(pj.as_mut_ptr().add(8), p1);
        *l = *l * corr + hsum(_mm256_add_ps(p0, p1));
        let cv = _mm256_set1_ps(corr);
        let ap = acc.as_mut_ptr();
        let mut d = 0;
        while d < hd {
            let mut a = _mm256_mul_ps(_mm256_loadu_ps(ap.add(d)), cv);
            for (j, &off) in offs.iter().enumerate() {
                a = _mm256_fmadd_ps(_mm256_set1_ps(pj[j]), _mm256_loadu_ps(v.as_ptr().add(off + d)), a);
            }
            _mm256_storeu_ps(ap.add(d), a);
            d += 8;
        }
        *m = mx;
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Two-pass softmax attention over a dense cache, in f64.
    fn reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let s: Vec<f64> = k
            .iter()
            .map(|kr| q.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64)
            .collect();
        let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..q.len()).map(|d| (e.iter().zip(v).map(|(p, vr)| p * vr[d] as f64).sum::<f64>() / z) as f32).collect()
    }

    struct Case {
        k: Vec<f32>,
        v: Vec<f32>,
        tables: Vec<Vec<u32>>,
    }

    /// `seqs` sequences of the given lengths in a shuffled paged cache.
    fn case(rng: &mut rand::rngs::StdRng, lens: &[usize], bs: usize, nkv: usize, hd: usize) -> Case {
        let blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 3;
        let mut free: Vec<u32> = (0..blocks as u32).collect();
        // A fixed shuffle so tables are not in order.
        for i in (1..free.len()).rev() {
            free.swap(i, rng.random_range(0..=i));
        }
        let tables = lens.iter().map(|l| (0..l.div_ceil(bs)).map(|_| free.pop().unwrap_or(0)).collect()).collect();
        let n = blocks * bs * nkv * hd;
        let k = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let v = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Case { k, v, tables }
    }

    #[test]
    fn every_level_matches_the_reference_and_batches_do_not_matter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (heads, nkv, hd, bs) in [(4, 2, 16, 16), (7, 1, 64, 16), (2, 2, 128, 8), (3, 3, 24, 5)] {
            let lens = [1usize, 17, 40];
            let c = case(&mut rng, &lens, bs, nkv, hd);
            let kv = PagedKv { k: &c.k, v: &c.v, block_size: bs, num_kv_heads: nkv, head_dim: hd };
            // Every position of every sequence as a query (a causal prefill of all three).
            let mut queries = Vec::new();
            for (s, &len) in lens.iter().enumerate() {
                for p in 0..len {
                    queries.push((s, p));
                }
            }
            let row = heads * hd;
            let q: Vec<f32> = (0..queries.len() * row).map(|_| rng.random_range(-1.0..1.0)).collect();
            let ctxs: Vec<QueryContext> =
                queries.iter().map(|&(s, p)| QueryContext { block_table: &c.tables[s], context_len: p + 1 }).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            for level in SimdLevel::available() {
                let mut out = vec![f32::NAN; q.len()];
                paged_attention_at(level, &q, heads, kv, &ctxs, scale, &mut out);
                for (t, &(s, p)) in queries.iter().enumerate() {
                    for h in 0..heads {
                        let g = h / (heads / nkv);
                        let slot = |pos: usize| c.tables[s][pos / bs] as usize * bs + pos % bs;
                        let kr: Vec<Vec<f32>> = (0..=p)
                            .map(|pos| c.k[(slot(pos) * nkv + g) * hd..(slot(pos) * nkv + g + 1) * hd].to_vec())
                            .collect();
                        let vr: Vec<Vec<f32>> = (0..=p)
                            .map(|pos| c.v[(slot(pos) * nkv + g) * hd..(slot(pos) * nkv + g + 1) * hd].to_vec())
                            .collect();
                        let want = reference(&q[t * row + h * hd..t * row + (h + 1) * hd], &kr, &vr, scale);
                        let got = &out[t * row + h * hd..t * row + (h + 1) * hd];
                        for (a, b) in got.iter().zip(&want) {
                            assert!((a - b).abs() <= 2e-5, "{level:?} heads={heads} hd={hd} t={t} h={h}: {a} vs {b}");
                        }
                    }
                }
                // Each query alone gives the same bits as in the batch.
                for (t, ctx) in ctxs.iter().enumerate() {
                    let mut one = vec![0f32; row];
                    paged_attention_at(level, &q[t * row..(t + 1) * row], heads, kv, &[*ctx], scale, &mut one);
                    assert!(
                        one.iter().zip(&out[t * row..(t + 1) * row]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{level:?}: query {t} alone differs from the batch"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_context_gives_zeros() {
        let kv = PagedKv { k: &[], v: &[], block_size: 16, num_kv_heads: 1, head_dim: 16 };
        let q = vec![1f32; 16];
        let mut out = vec![f32::NAN; 16];
        paged_attention(&q, 1, kv, &[QueryContext { block_table: &[], context_len: 0 }], 1.0, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
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
