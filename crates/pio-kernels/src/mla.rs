//! Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash) in its absorbed decode form,
//! over a paged cache of latent rows.
//!
//! **Cache layout.** Per layer, one buffer of [`KvElem`]s (f32, or f16 at half the memory) holding
//! `num_blocks * block_size` rows of `width` values, token-major: the row of slot
//! `block * block_size + offset` is `data[slot * width..(slot + 1) * width]`. A row is the
//! compressed latent (`kv_lora_rank` values) followed by the rotated shared key (`qk_rope_dim`):
//! every head reads the same row, as its key (all `width` values) and as its value (the first
//! `value_width`). It is MQA with key width `width` and value = a prefix of the key.
//!
//! **Kernel.** `out[t, h] = softmax_p(scale * q[t, h] · c_p) c_p[..value_width]` with an online
//! softmax, visiting positions in chunks of [`CHUNK`] fixed by absolute position (0..16, 16..32,
//! ...). One work item is one query token and a group of its heads; per chunk the item
//! 1. takes the chunk's rows as f32 `[n, width]` (an f32 cache whose block holds the whole chunk
//!    is read in place; otherwise the rows are staged, which is where f16 is widened, once for
//!    all the item's heads);
//! 2. computes the scores `[heads, CHUNK]`: SIMD dot products, 4 heads x 4 positions at a time
//!    sharing their loads, reduced 16 (AVX2: 8) at once into one vector;
//! 3. updates each head's running maximum and sum and rescales and accumulates its
//!    `value_width` output, 4 (AVX2: 2) heads at a time sharing each loaded row.
//!
//! Decode has few tokens and many heads (DeepSeek-V2-Lite / GLM-4.7-Flash: 20 heads of width
//! 576 = 512 + 64), so the heads of a token are split into groups until every thread has an item;
//! a prefill has enough tokens and keeps all heads in one item.
//!
//! **Batch invariance.** A head's result is computed by the same operations whichever group or
//! batch it is in, so a token's output is bitwise the same alone, batched, or in any prefill
//! chunking (at a given SIMD level and cache element type).

use crate::attention::{KvCacheDtype, KvElem, QueryContext};
use crate::cpu::{self, SimdLevel};
use crate::parallel::{self, SharedOut};

/// Positions per online-softmax step.
pub const CHUNK: usize = 16;

/// One layer's latent cache, borrowed for reading (layout in the module docs).
#[derive(Debug, Clone, Copy)]
pub struct LatentKv<'a, T = f32> {
    /// `[num_blocks * block_size, width]`.
    pub data: &'a [T],
    /// Positions per block.
    pub block_size: usize,
    /// Values per row: the latent and the rotated key (`kv_lora_rank + qk_rope_dim`).
    pub width: usize,
}

/// One layer's latent cache, borrowed for writing (layout in the module docs).
#[derive(Debug)]
pub struct LatentKvMut<'a, T> {
    /// `[num_blocks * block_size, width]`.
    pub data: &'a mut [T],
    /// Positions per block.
    pub block_size: usize,
    /// Values per row.
    pub width: usize,
}

impl<T: KvElem> LatentKvMut<'_, T> {
    /// Stores row `t` of `rows` (`[slots.len(), width]`) in slot `slots[t]` (f16: rounded to
    /// nearest even).
    pub fn write(&mut self, slots: &[usize], rows: &[f32]) {
        let w = self.width;
        assert_eq!(rows.len(), slots.len() * w, "rows are [slots, width]");
        if w == 0 {
            return;
        }
        for (src, &slot) in rows.chunks_exact(w).zip(slots) {
            T::from_f32s(src, &mut self.data[slot * w..(slot + 1) * w]);
        }
    }

    /// Replaces every row in `blocks` by `f` of it, as f32 (a position shift's re-rotation).
    pub fn map_rows(&mut self, blocks: &[u32], f: &mut dyn FnMut(&mut [f32])) {
        let (w, bs) = (self.width, self.block_size);
        let mut row = vec![0f32; w];
        for &b in blocks {
            for slot in b as usize * bs..(b as usize + 1) * bs {
                let dst = &mut self.data[slot * w..(slot + 1) * w];
                for (x, s) in row.iter_mut().zip(dst.iter()) {
                    *x = s.to_f32();
                }
                f(&mut row);
                T::from_f32s(&row, dst);
            }
        }
    }

    pub fn view(&self) -> LatentKv<'_, T> {
        LatentKv { data: self.data, block_size: self.block_size, width: self.width }
    }
}

/// What the latent kernel reads a layer's cache through: rows of a chunk, as f32.
pub trait LatentSource: Copy + Send + Sync {
    fn block_size(&self) -> usize;
    fn width(&self) -> usize;
    /// Blocks the cache holds (panics unless its buffers are whole blocks).
    fn num_blocks(&self) -> usize;
    /// Positions `p0..p0 + n` of the sequence whose blocks are `table`, as f32 rows
    /// `[n, width]`: in place where the cache holds them so, else decoded into `buf`.
    fn rows<'s>(&'s self, level: SimdLevel, table: &[u32], p0: usize, n: usize, buf: &'s mut Vec<f32>) -> &'s [f32];
}

impl<T: KvElem> LatentSource for LatentKv<'_, T> {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn width(&self) -> usize {
        self.width
    }
    fn num_blocks(&self) -> usize {
        let whole = self.block_size * self.width.max(1);
        assert!(self.block_size > 0 && self.data.len().is_multiple_of(whole), "the cache must be whole blocks");
        self.data.len() / whole
    }
    fn rows<'s>(&'s self, level: SimdLevel, table: &[u32], p0: usize, n: usize, buf: &'s mut Vec<f32>) -> &'s [f32] {
        chunk_rows(level, *self, table, p0, n, buf)
    }
}

/// One layer's latent cache as encoded rows of any [`KvCacheDtype`] (`[num_blocks *
/// block_size]` rows of `row_bytes(width)`), borrowed for reading. Block-format rows are
/// differences from the block's anchor, its first row in f16 (`anchors`, `[num_blocks,
/// width]`), as [`crate::attention::CodedKv`]'s keys.
#[derive(Debug, Clone, Copy)]
pub struct CodedLatentKv<'a> {
    pub data: &'a [u8],
    /// f16 bits; empty unless `dtype` is a block format.
    pub anchors: &'a [u16],
    pub dtype: KvCacheDtype,
    pub block_size: usize,
    pub width: usize,
}

/// [`CodedLatentKv`] borrowed for writing.
#[derive(Debug)]
pub struct CodedLatentKvMut<'a> {
    pub data: &'a mut [u8],
    pub anchors: &'a mut [u16],
    pub dtype: KvCacheDtype,
    pub block_size: usize,
    pub width: usize,
}

impl CodedLatentKvMut<'_> {
    /// Encodes row `t` of `rows` (`[slots.len(), width]`) into slot `slots[t]`.
    pub fn write(&mut self, slots: &[usize], rows: &[f32]) {
        let (w, bs) = (self.width, self.block_size);
        assert_eq!(rows.len(), slots.len() * w, "rows are [slots, width]");
        let rb = self.dtype.row_bytes(w);
        let mut diff = vec![0f32; w];
        for (src, &slot) in rows.chunks_exact(w.max(1)).zip(slots) {
            let dst = &mut self.data[slot * rb..(slot + 1) * rb];
            if self.dtype.is_quantized() {
                let anchor = &mut self.anchors[slot / bs * w..][..w];
                if slot % bs == 0 {
                    crate::attention::set_anchor(anchor, src);
                }
                crate::attention::encode_diff(self.dtype, src, anchor, &mut diff, dst);
            } else {
                crate::attention::encode_row(self.dtype, src, dst);
            }
        }
    }

    /// Replaces every row in `blocks` by `f` of it (a linear map: a position shift's
    /// re-rotation); block formats are re-encoded against their anchor mapped the same way.
    pub fn map_rows(&mut self, blocks: &[u32], f: &mut dyn FnMut(&mut [f32])) {
        let (w, bs) = (self.width, self.block_size);
        let rb = self.dtype.row_bytes(w);
        let mut scratch = Vec::new();
        for &b in blocks {
            let b = b as usize;
            let anchor = if self.dtype.is_quantized() { Some(&mut self.anchors[b * w..(b + 1) * w]) } else { None };
            let rows = &mut self.data[b * bs * rb..(b + 1) * bs * rb];
            crate::attention::remap_rows(self.dtype, rows, anchor, w, f, &mut scratch);
        }
    }

    pub fn view(&self) -> CodedLatentKv<'_> {
        CodedLatentKv {
            data: self.data,
            anchors: self.anchors,
            dtype: self.dtype,
            block_size: self.block_size,
            width: self.width,
        }
    }
}

impl CodedLatentKv<'_> {
    /// The row stored in `slot`, decoded.
    pub fn read(&self, level: SimdLevel, slot: usize, out: &mut [f32]) {
        let (w, rb) = (self.width, self.dtype.row_bytes(self.width));
        let anchor = self.dtype.is_quantized().then(|| &self.anchors[slot / self.block_size * w..][..w]);
        crate::attention::decode_row(level, self.dtype, &self.data[slot * rb..(slot + 1) * rb], anchor, out);
    }
}

impl LatentSource for CodedLatentKv<'_> {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn width(&self) -> usize {
        self.width
    }
    fn num_blocks(&self) -> usize {
        let rb = self.dtype.row_bytes(self.width);
        let whole = self.block_size * rb.max(1);
        assert!(
            self.block_size > 0
                && self.dtype.fits(self.width)
                && self.data.len().is_multiple_of(whole)
                && self.anchors.len()
                    == if self.dtype.is_quantized() { self.data.len() / whole * self.width } else { 0 },
            "the cache must be whole blocks, with an anchor row per block for block formats"
        );
        self.data.len() / whole
    }
    fn rows<'s>(&'s self, level: SimdLevel, table: &[u32], p0: usize, n: usize, buf: &'s mut Vec<f32>) -> &'s [f32] {
        let (w, bs) = (self.width, self.block_size);
        buf.resize(CHUNK * w, 0.0);
        for j in 0..n {
            let p = p0 + j;
            self.read(level, table[p / bs] as usize * bs + p % bs, &mut buf[j * w..(j + 1) * w]);
        }
        &buf[..n * w]
    }
}

/// `out[t, h, :] = sum_p softmax_p(scale * q[t, h] · c_p) c_p[..value_width]` over the positions
/// `p < queries[t].context_len` of token `t`'s sequence, `c_p` its cached row (all heads share
/// it). `q` is `[tokens, num_heads, width]`, `out` `[tokens, num_heads, value_width]` (fully
/// overwritten), `value_width <= width`. A token with an empty context gets zeros.
pub fn latent_attention<S: LatentSource>(
    q: &[f32],
    num_heads: usize,
    cache: S,
    queries: &[QueryContext<'_>],
    value_width: usize,
    scale: f32,
    out: &mut [f32],
) {
    latent_attention_at(cpu::level(), q, num_heads, cache, queries, value_width, scale, out)
}

/// [`latent_attention`] at an explicit SIMD level (tests and benchmarks).
#[allow(clippy::too_many_arguments)]
pub fn latent_attention_at<S: LatentSource>(
    level: SimdLevel,
    q: &[f32],
    num_heads: usize,
    cache: S,
    queries: &[QueryContext<'_>],
    value_width: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (w, vw, bs) = (cache.width(), value_width, cache.block_size());
    assert!(vw <= w, "value width {vw} exceeds the row width {w}");
    assert_eq!(q.len(), queries.len() * num_heads * w, "q is [tokens, heads, width]");
    assert_eq!(out.len(), queries.len() * num_heads * vw, "out is [tokens, heads, value width]");
    let num_blocks = cache.num_blocks();
    for ctx in queries {
        assert_eq!(ctx.start, 0, "latent attention has no sliding windows");
        let used = ctx.context_len.div_ceil(bs);
        assert!(used <= ctx.block_table.len(), "context runs past the block table");
        assert!(ctx.block_table[..used].iter().all(|&b| (b as usize) < num_blocks), "block out of the cache");
    }
    if out.is_empty() {
        // No heads, no tokens, or no value: nothing to compute (and `w >= vw > 0` below).
        return;
    }
    // AVX2 handles rows of whole 8-lane vectors only.
    let level = match level {
        SimdLevel::Avx2 if !(w.is_multiple_of(8) && vw.is_multiple_of(8)) => SimdLevel::Scalar,
        l => l,
    };
    // Split each token's heads into `num_groups` groups of `group` (the last may be smaller) so
    // that there are at least as many items as threads when there are enough heads.
    let nt = queries.len();
    let threads = parallel::num_threads();
    let group = num_heads.div_ceil(threads.div_ceil(nt).clamp(1, num_heads));
    let num_groups = num_heads.div_ceil(group);
    let heads_of = |g: usize| group.min(num_heads - g * group);
    // Item `it` is token `it / num_groups`, group `it % num_groups`. Items cost in proportion to
    // their context and heads, so threads get ranges of equal total cost (as `paged_attention`).
    let n_items = nt * num_groups;
    let cost = |it: usize| (queries[it / num_groups].context_len + CHUNK) * heads_of(it % num_groups);
    let parts = threads.min(n_items).max(1);
    let bounds = parallel::balanced_bounds(n_items, parts, cost);
    let work: usize = queries.iter().map(|c| c.context_len * num_heads * (w + vw)).sum();
    let shared = SharedOut(out.as_mut_ptr(), out.len());
    parallel::for_each_range(parts, work, |p0, p1| {
        let shared = &shared;
        let mut scratch = Scratch::default();
        for it in bounds[p0]..bounds[p1] {
            let (t, g) = (it / num_groups, it % num_groups);
            let (h0, nh) = (g * group, heads_of(g));
            let row = t * num_heads + h0;
            let (at, len) = (row * vw, nh * vw);
            assert!(at + len <= shared.1);
            // SAFETY: in bounds (asserted), and items cover disjoint (token, head group) pairs, so
            // this is the only live reference to these `len` floats while `out` is borrowed by
            // `latent_attention_at`, which outlives `for_each_range`.
            let o = unsafe { std::slice::from_raw_parts_mut(shared.0.add(at), len) };
            let qg = &q[row * w..(row + nh) * w];
            attend(level, qg, nh, &cache, queries[t], vw, scale, &mut scratch, o);
        }
    });
}

/// Per-thread buffers reused across items.
#[derive(Default)]
struct Scratch {
    /// A staged chunk of rows, `[CHUNK, width]`.
    c: Vec<f32>,
    /// The chunk's scores, then their exponentials, `[heads, CHUNK]` (`-inf`/0 past the chunk).
    s: Vec<f32>,
    /// Running maximum of each head.
    m: Vec<f32>,
    /// Running softmax denominator of each head.
    l: Vec<f32>,
    /// Each head's rescaling of its accumulator for the current chunk.
    corr: Vec<f32>,
}

/// One item: `heads` query rows `q` (`[heads, width]`) of one token against its context,
/// written normalised to `o` (`[heads, vw]`).
#[allow(clippy::too_many_arguments)]
fn attend<S: LatentSource>(
    level: SimdLevel,
    q: &[f32],
    heads: usize,
    cache: &S,
    ctx: QueryContext<'_>,
    vw: usize,
    scale: f32,
    scratch: &mut Scratch,
    o: &mut [f32],
) {
    let w = cache.width();
    let Scratch { c, s, m, l, corr } = scratch;
    o.fill(0.0);
    if ctx.context_len == 0 {
        return;
    }
    for (v, n) in [(&mut *m, f32::NEG_INFINITY), (&mut *l, 0.0), (&mut *corr, 1.0)] {
        v.clear();
        v.resize(heads, n);
    }
    s.resize(heads * CHUNK, 0.0);
    let mut p0 = 0;
    while p0 < ctx.context_len {
        let n = (ctx.context_len - p0).min(CHUNK);
        let rows = cache.rows(level, ctx.block_table, p0, n, c);
        scores(level, q, heads, rows, w, n, scale, s);
        softmax_step(level, s, heads, n, m, l, corr);
        accumulate(level, s, corr, heads, rows, w, n, o, vw);
        p0 += n;
    }
    for (acc, &l) in o.chunks_exact_mut(vw).zip(l.iter()) {
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for v in acc {
            *v *= inv;
        }
    }
}

/// Positions `p0..p0 + n` of a sequence as f32 rows `[n, width]`: read in place from an f32
/// cache when one block holds them all, otherwise copied (widened) into `buf`.
fn chunk_rows<'s, T: KvElem>(
    level: SimdLevel,
    cache: LatentKv<'s, T>,
    table: &[u32],
    p0: usize,
    n: usize,
    buf: &'s mut Vec<f32>,
) -> &'s [f32] {
    let (w, bs) = (cache.width, cache.block_size);
    let slot = |p: usize| table[p / bs] as usize * bs + p % bs;
    if let Some(f) = T::as_f32s(cache.data) {
        if p0 / bs == (p0 + n - 1) / bs {
            let at = slot(p0) * w;
            return &f[at..at + n * w];
        }
    }
    buf.resize(CHUNK * w, 0.0);
    let mut j = 0;
    while j < n {
        // A run of positions inside one block is contiguous in the cache.
        let p = p0 + j;
        let run = (bs - p % bs).min(n - j);
        let at = slot(p) * w;
        T::widen_rows(level, &cache.data[at..at + run * w], run * w, 1, run * w, &mut buf[j * w..(j + run) * w]);
        j += run;
    }
    &buf[..n * w]
}

/// `s[h * CHUNK + j] = scale * q[h] · rows[j]` for `j < n`, `-inf` for `n <= j < CHUNK`.
/// `q` is `[heads, w]`, `rows` `[n, w]`.
#[allow(clippy::too_many_arguments)]
fn scores(level: SimdLevel, q: &[f32], heads: usize, rows: &[f32], w: usize, n: usize, scale: f32, s: &mut [f32]) {
    assert!((1..=CHUNK).contains(&n) && q.len() >= heads * w && rows.len() >= n * w && s.len() >= heads * CHUNK);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has; extents asserted above.
        SimdLevel::Avx512 => unsafe { x86::scores_avx512(q, heads, rows, w, n, scale, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (`w` is a multiple of 8 at this level).
        SimdLevel::Avx2 => unsafe { x86::scores_avx2(q, heads, rows, w, n, scale, s) },
        _ => {
            for (qh, sh) in q.chunks_exact(w).zip(s.chunks_exact_mut(CHUNK)).take(heads) {
                for (j, sj) in sh.iter_mut().enumerate() {
                    *sj =
                        if j < n { scale * crate::ops::dot(qh, &rows[j * w..(j + 1) * w]) } else { f32::NEG_INFINITY };
                }
            }
        }
    }
    for sh in s.chunks_exact_mut(CHUNK).take(heads) {
        sh[n..].fill(f32::NEG_INFINITY);
    }
}

/// Online-softmax step of every head over one chunk's scores `s` (`-inf` past the chunk):
/// the new maximum `m`, the rescaling `corr` of the accumulator and of `l`, and the
/// exponentials `p_j = exp(s_j - m)` written over `s` (0 past the chunk). A head whose scores
/// are all `-inf` keeps its state (`corr` 1, `p` 0).
fn softmax_step(
    level: SimdLevel,
    s: &mut [f32],
    heads: usize,
    n: usize,
    m: &mut [f32],
    l: &mut [f32],
    corr: &mut [f32],
) {
    for h in 0..heads {
        let sh = &mut s[h * CHUNK..(h + 1) * CHUNK];
        let mx = sh[..n].iter().copied().fold(m[h], f32::max);
        if mx == f32::NEG_INFINITY {
            sh.fill(0.0);
            corr[h] = 1.0;
            continue;
        }
        let sum = match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level only names features the CPU has; `sh` holds CHUNK scores.
            SimdLevel::Avx512 => unsafe { x86::exp_sub_avx512(sh, mx, &mut corr[h], m[h]) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            SimdLevel::Avx2 => unsafe { x86::exp_sub_avx2(sh, mx, &mut corr[h], m[h]) },
            _ => {
                // exp(0) = 1 exactly when the maximum holds; exp(-inf) = 0 when nothing was seen yet.
                corr[h] = if mx == m[h] { 1.0 } else { (m[h] - mx).exp() };
                let mut sum = 0.0;
                for x in sh.iter_mut() {
                    *x = (*x - mx).exp();
                    sum += *x;
                }
                sum
            }
        };
        l[h] = l[h] * corr[h] + sum;
        m[h] = mx;
    }
}

/// `o[h] = o[h] * corr[h] + sum_{j < n} p[h, j] rows[j][..vw]` for every head, `j` in order.
/// `p` is `[heads, CHUNK]`, `rows` `[n, w]`, `o` `[heads, vw]`.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    level: SimdLevel,
    p: &[f32],
    corr: &[f32],
    heads: usize,
    rows: &[f32],
    w: usize,
    n: usize,
    o: &mut [f32],
    vw: usize,
) {
    assert!(
        (1..=CHUNK).contains(&n)
            && vw <= w
            && p.len() >= heads * CHUNK
            && corr.len() >= heads
            && rows.len() >= n * w
            && o.len() >= heads * vw
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has; extents asserted above.
        SimdLevel::Avx512 => unsafe { x86::accumulate_avx512(p, corr, heads, rows, w, n, o, vw) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (`vw` is a multiple of 8 at this level).
        SimdLevel::Avx2 => unsafe { x86::accumulate_avx2(p, corr, heads, rows, w, n, o, vw) },
        _ => {
            for h in 0..heads {
                let acc = &mut o[h * vw..(h + 1) * vw];
                for a in acc.iter_mut() {
                    *a *= corr[h];
                }
                for j in 0..n {
                    crate::ops::axpy(p[h * CHUNK + j], &rows[j * w..j * w + vw], acc);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHUNK;
    use crate::math::x86::{exp256, exp512};

    /// Lane `i` of the result is the sum of the lanes of `a[i]`. Every sum is formed by the same
    /// additions whatever the lane, so a score does not depend on its neighbours.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum16(a: [__m512; 16]) -> __m512 {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for each pair (a, b).
        let t: [__m512; 8] = std::array::from_fn(|i| {
            _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]))
        });
        // Per 128-bit lane: the lane's sums of a[4i..4i + 4].
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)))
        });
        // 128-bit lanes (0 + 1) and (2 + 3) of u0, u1 (and u2, u3), then their sum.
        let w01 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(u[0], u[1]), _mm512_shuffle_f32x4::<0xDD>(u[0], u[1]));
        let w23 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(u[2], u[3]), _mm512_shuffle_f32x4::<0xDD>(u[2], u[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(w01, w23), _mm512_shuffle_f32x4::<0xDD>(w01, w23))
    }

    /// [`super::scores`] with 16 lanes: blocks of up to 4 heads x 4 positions.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores_avx512(q: &[f32], heads: usize, rows: &[f32], w: usize, n: usize, scale: f32, s: &mut [f32]) {
        assert!((1..=CHUNK).contains(&n) && q.len() >= heads * w && rows.len() >= n * w && s.len() >= heads * CHUNK);
        let mut h = 0;
        while h < heads {
            let r = (heads - h).min(4);
            for j in (0..n).step_by(4) {
                // Positions past the chunk read row 0 (results dropped).
                let cp: [*const f32; 4] =
                    std::array::from_fn(|k| rows.as_ptr().add(if j + k < n { (j + k) * w } else { 0 }));
                let qp = q.as_ptr().add(h * w);
                let v = match r {
                    4 => scores_block_avx512::<4>(qp, cp, w),
                    3 => scores_block_avx512::<3>(qp, cp, w),
                    2 => scores_block_avx512::<2>(qp, cp, w),
                    _ => scores_block_avx512::<1>(qp, cp, w),
                };
                let mut lanes = [0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_mul_ps(v, _mm512_set1_ps(scale)));
                for i in 0..r {
                    for k in 0..4.min(n - j) {
                        s[(h + i) * CHUNK + j + k] = lanes[i * 4 + k];
                    }
                }
            }
            h += r;
        }
    }

    /// Dots of `R` query rows (`qp`, `w` apart) with 4 cache rows `cp`, `w` long: lane
    /// `i * 4 + k` is `q_i · c_k` (lanes past `R` rows are 0).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_block_avx512<const R: usize>(qp: *const f32, cp: [*const f32; 4], w: usize) -> __m512 {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut d = 0;
        while d + 16 <= w {
            let c: [__m512; 4] = std::array::from_fn(|k| _mm512_loadu_ps(cp[k].add(d)));
            for (i, ai) in acc.iter_mut().enumerate() {
                let qv = _mm512_loadu_ps(qp.add(i * w + d));
                for (a, ck) in ai.iter_mut().zip(&c) {
                    *a = _mm512_fmadd_ps(qv, *ck, *a);
                }
            }
            d += 16;
        }
        if d < w {
            let mask = ((1u32 << (w - d)) - 1) as __mmask16;
            let c: [__m512; 4] = std::array::from_fn(|k| _mm512_maskz_loadu_ps(mask, cp[k].add(d)));
            for (i, ai) in acc.iter_mut().enumerate() {
                let qv = _mm512_maskz_loadu_ps(mask, qp.add(i * w + d));
                for (a, ck) in ai.iter_mut().zip(&c) {
                    *a = _mm512_fmadd_ps(qv, *ck, *a);
                }
            }
        }
        let mut all = [_mm512_setzero_ps(); 16];
        for (i, ai) in acc.iter().enumerate() {
            all[i * 4..i * 4 + 4].copy_from_slice(ai);
        }
        hsum16(all)
    }

    /// `s[j] = exp(s[j] - mx)` over the CHUNK scores (`-inf` gives 0), their sum returned, and
    /// `corr = exp(m - mx)` (exactly 1 when the maximum holds).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_sub_avx512(s: &mut [f32], mx: f32, corr: &mut f32, m: f32) -> f32 {
        assert!(s.len() >= CHUNK);
        *corr = if mx == m { 1.0 } else { _mm512_cvtss_f32(exp512(_mm512_set1_ps(m - mx))) };
        let p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s.as_ptr()), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(s.as_mut_ptr(), p);
        _mm512_reduce_add_ps(p)
    }

    /// [`super::accumulate`] with 16 lanes: blocks of up to 4 heads x 64 values in registers
    /// while the rows stream past; any `vw` (a masked tail).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn accumulate_avx512(
        p: &[f32],
        corr: &[f32],
        heads: usize,
        rows: &[f32],
        w: usize,
        n: usize,
        o: &mut [f32],
        vw: usize,
    ) {
        assert!(
            (1..=CHUNK).contains(&n)
                && vw <= w
                && p.len() >= heads * CHUNK
                && corr.len() >= heads
                && rows.len() >= n * w
                && o.len() >= heads * vw
        );
        let mut h = 0;
        while h < heads {
            let r = (heads - h).min(4);
            let (op, pp, cr) = (o.as_mut_ptr().add(h * vw), p.as_ptr().add(h * CHUNK), &corr[h..h + r]);
            match r {
                4 => accumulate_heads_avx512::<4>(op, pp, cr, rows.as_ptr(), w, n, vw),
                3 => accumulate_heads_avx512::<3>(op, pp, cr, rows.as_ptr(), w, n, vw),
                2 => accumulate_heads_avx512::<2>(op, pp, cr, rows.as_ptr(), w, n, vw),
                _ => accumulate_heads_avx512::<1>(op, pp, cr, rows.as_ptr(), w, n, vw),
            }
            h += r;
        }
    }

    /// `R` heads' accumulators (`op`, `vw` apart; weights `pp`, CHUNK apart) over all `vw` values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn accumulate_heads_avx512<const R: usize>(
        op: *mut f32,
        pp: *const f32,
        corr: &[f32],
        cp: *const f32,
        w: usize,
        n: usize,
        vw: usize,
    ) {
        let cv: [__m512; R] = std::array::from_fn(|i| _mm512_set1_ps(corr[i]));
        let mut d = 0;
        while d + 64 <= vw {
            accumulate_block_avx512::<R, 4>(op.add(d), pp, cv, cp.add(d), w, n, vw, 0xFFFF);
            d += 64;
        }
        if d + 32 <= vw {
            accumulate_block_avx512::<R, 2>(op.add(d), pp, cv, cp.add(d), w, n, vw, 0xFFFF);
            d += 32;
        }
        if d + 16 <= vw {
            accumulate_block_avx512::<R, 1>(op.add(d), pp, cv, cp.add(d), w, n, vw, 0xFFFF);
            d += 16;
        }
        if d < vw {
            let mask = ((1u32 << (vw - d)) - 1) as __mmask16;
            accumulate_block_avx512::<R, 1>(op.add(d), pp, cv, cp.add(d), w, n, vw, mask);
        }
    }

    /// `acc_i[..16 * NV] = acc_i * corr_i + sum_j p_i[j] * row_j[..16 * NV]` for `R` heads, the
    /// last vector limited to `last` lanes.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn accumulate_block_avx512<const R: usize, const NV: usize>(
        op: *mut f32,
        pp: *const f32,
        corr: [__m512; R],
        cp: *const f32,
        w: usize,
        n: usize,
        vw: usize,
        last: __mmask16,
    ) {
        let mask = |v: usize| if v + 1 == NV { last } else { 0xFFFF };
        let mut a: [[__m512; NV]; R] = std::array::from_fn(|i| {
            std::array::from_fn(|v| _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(v), op.add(i * vw + 16 * v)), corr[i]))
        });
        for j in 0..n {
            let row = cp.add(j * w);
            let c: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(mask(v), row.add(16 * v)));
            for (i, ai) in a.iter_mut().enumerate() {
                let pv = _mm512_set1_ps(*pp.add(i * CHUNK + j));
                for (av, cv) in ai.iter_mut().zip(&c) {
                    *av = _mm512_fmadd_ps(pv, *cv, *av);
                }
            }
        }
        for (i, ai) in a.iter().enumerate() {
            for (v, av) in ai.iter().enumerate() {
                _mm512_mask_storeu_ps(op.add(i * vw + 16 * v), mask(v), *av);
            }
        }
    }

    /// Lane `i` of the result is the sum of the lanes of `a[i]`, by the same additions for every
    /// lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum8(a: [__m256; 8]) -> __m256 {
        let t: [__m256; 4] = std::array::from_fn(|i| {
            _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]))
        });
        let u: [__m256; 2] = std::array::from_fn(|i| {
            let (x, y) = (_mm256_castps_pd(t[2 * i]), _mm256_castps_pd(t[2 * i + 1]));
            _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)))
        });
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u[0], u[1]), _mm256_permute2f128_ps::<0x31>(u[0], u[1]))
    }

    /// [`super::scores`] with 8 lanes: blocks of up to 2 heads x 4 positions; `w` is a multiple
    /// of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores_avx2(q: &[f32], heads: usize, rows: &[f32], w: usize, n: usize, scale: f32, s: &mut [f32]) {
        assert!(
            w.is_multiple_of(8)
                && (1..=CHUNK).contains(&n)
                && q.len() >= heads * w
                && rows.len() >= n * w
                && s.len() >= heads * CHUNK
        );
        let mut h = 0;
        while h < heads {
            let r = (heads - h).min(2);
            for j in (0..n).step_by(4) {
                let cp: [*const f32; 4] =
                    std::array::from_fn(|k| rows.as_ptr().add(if j + k < n { (j + k) * w } else { 0 }));
                let qp = q.as_ptr().add(h * w);
                let v = if r == 2 { scores_block_avx2::<2>(qp, cp, w) } else { scores_block_avx2::<1>(qp, cp, w) };
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(v, _mm256_set1_ps(scale)));
                for i in 0..r {
                    for k in 0..4.min(n - j) {
                        s[(h + i) * CHUNK + j + k] = lanes[i * 4 + k];
                    }
                }
            }
            h += r;
        }
    }

    /// As [`scores_block_avx512`] with 8 lanes: lane `i * 4 + k` is `q_i · c_k`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_block_avx2<const R: usize>(qp: *const f32, cp: [*const f32; 4], w: usize) -> __m256 {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut d = 0;
        while d + 8 <= w {
            let c: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(cp[k].add(d)));
            for (i, ai) in acc.iter_mut().enumerate() {
                let qv = _mm256_loadu_ps(qp.add(i * w + d));
                for (a, ck) in ai.iter_mut().zip(&c) {
                    *a = _mm256_fmadd_ps(qv, *ck, *a);
                }
            }
            d += 8;
        }
        let mut all = [_mm256_setzero_ps(); 8];
        for (i, ai) in acc.iter().enumerate() {
            all[i * 4..i * 4 + 4].copy_from_slice(ai);
        }
        hsum8(all)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// As [`exp_sub_avx512`] with two 8-lane halves.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_avx2(s: &mut [f32], mx: f32, corr: &mut f32, m: f32) -> f32 {
        assert!(s.len() >= CHUNK);
        *corr = if mx == m { 1.0 } else { _mm256_cvtss_f32(exp256(_mm256_set1_ps(m - mx))) };
        let mv = _mm256_set1_ps(mx);
        let p0 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr()), mv));
        let p1 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(8)), mv));
        _mm256_storeu_ps(s.as_mut_ptr(), p0);
        _mm256_storeu_ps(s.as_mut_ptr().add(8), p1);
        hsum(_mm256_add_ps(p0, p1))
    }

    /// [`super::accumulate`] with 8 lanes: blocks of up to 2 heads x 32 values; `vw` is a
    /// multiple of 8.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate_avx2(
        p: &[f32],
        corr: &[f32],
        heads: usize,
        rows: &[f32],
        w: usize,
        n: usize,
        o: &mut [f32],
        vw: usize,
    ) {
        assert!(
            vw.is_multiple_of(8)
                && (1..=CHUNK).contains(&n)
                && vw <= w
                && p.len() >= heads * CHUNK
                && corr.len() >= heads
                && rows.len() >= n * w
                && o.len() >= heads * vw
        );
        let mut h = 0;
        while h < heads {
            let r = (heads - h).min(2);
            let (op, pp, cr) = (o.as_mut_ptr().add(h * vw), p.as_ptr().add(h * CHUNK), &corr[h..h + r]);
            let cp = rows.as_ptr();
            let mut d = 0;
            while d < vw {
                let nv = ((vw - d) / 8).min(4);
                match (r, nv) {
                    (2, 4) => accumulate_block_avx2::<2, 4>(op.add(d), pp, cr, cp.add(d), w, n, vw),
                    (2, 3) => accumulate_block_avx2::<2, 3>(op.add(d), pp, cr, cp.add(d), w, n, vw),
                    (2, 2) => accumulate_block_avx2::<2, 2>(op.add(d), pp, cr, cp.add(d), w, n, vw),
                    (2, _) => accumulate_block_avx2::<2, 1>(op.add(d), pp, cr, cp.add(d), w, n, vw),
                    (_, 4) => accumulate_block_avx2::<1, 4>(op.add(d), pp, cr, cp.add(d), w, n, vw),
                    (_, 3) => accumulate_block_avx2::<1, 3>(op.add(d), pp, cr, cp.add(d), w, n, vw),
                    (_, 2) => accumulate_block_avx2::<1, 2>(op.add(d), pp, cr, cp.add(d), w, n, vw),
                    _ => accumulate_block_avx2::<1, 1>(op.add(d), pp, cr, cp.add(d), w, n, vw),
                }
                d += 8 * nv;
            }
            h += r;
        }
    }

    /// As [`accumulate_block_avx512`] with 8-lane vectors and no tail.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_block_avx2<const R: usize, const NV: usize>(
        op: *mut f32,
        pp: *const f32,
        corr: &[f32],
        cp: *const f32,
        w: usize,
        n: usize,
        vw: usize,
    ) {
        let mut a: [[__m256; NV]; R] = std::array::from_fn(|i| {
            let c = _mm256_set1_ps(corr[i]);
            std::array::from_fn(|v| _mm256_mul_ps(_mm256_loadu_ps(op.add(i * vw + 8 * v)), c))
        });
        for j in 0..n {
            let row = cp.add(j * w);
            let c: [__m256; NV] = std::array::from_fn(|v| _mm256_loadu_ps(row.add(8 * v)));
            for (i, ai) in a.iter_mut().enumerate() {
                let pv = _mm256_set1_ps(*pp.add(i * CHUNK + j));
                for (av, cv) in ai.iter_mut().zip(&c) {
                    *av = _mm256_fmadd_ps(pv, *cv, *av);
                }
            }
        }
        for (i, ai) in a.iter().enumerate() {
            for (v, av) in ai.iter().enumerate() {
                _mm256_storeu_ps(op.add(i * vw + 8 * v), *av);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::reference;

    /// Sequences of the given lengths in a paged latent cache of element type `T`.
    struct Case<T> {
        data: Vec<T>,
        bs: usize,
        w: usize,
        tables: Vec<Vec<u32>>,
    }

    impl<T: KvElem> Case<T> {
        /// Blocks in a shuffled order; every slot outside the sequences holds NaN, which no
        /// output may see.
        fn new(rng: &mut rand::rngs::StdRng, lens: &[usize], bs: usize, w: usize) -> Case<T> {
            let blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 3;
            let mut free: Vec<u32> = (0..blocks as u32).collect();
            for i in (1..free.len()).rev() {
                free.swap(i, rng.random_range(0..=i));
            }
            let tables: Vec<Vec<u32>> =
                lens.iter().map(|l| (0..l.div_ceil(bs)).map(|_| free.pop().unwrap_or(0)).collect()).collect();
            let mut c = Case { data: T::zeros(blocks * bs * w), bs, w, tables };
            let slots: Vec<usize> = (0..blocks * bs).collect();
            c.kv_mut().write(&slots, &vec![f32::NAN; slots.len() * w]);
            for (s, &len) in lens.iter().enumerate() {
                let slots: Vec<usize> = (0..len).map(|p| c.slot(s, p)).collect();
                let rows: Vec<f32> = (0..len * w).map(|_| rng.random_range(-2.0..2.0)).collect();
                c.kv_mut().write(&slots, &rows);
            }
            c
        }

        fn slot(&self, s: usize, pos: usize) -> usize {
            self.tables[s][pos / self.bs] as usize * self.bs + pos % self.bs
        }

        fn kv(&self) -> LatentKv<'_, T> {
            LatentKv { data: &self.data, block_size: self.bs, width: self.w }
        }

        fn kv_mut(&mut self) -> LatentKvMut<'_, T> {
            LatentKvMut { data: &mut self.data, block_size: self.bs, width: self.w }
        }

        /// The stored (for f16: rounded) rows of a sequence's first `len` positions, as f32.
        fn rows(&self, s: usize, len: usize) -> Vec<Vec<f32>> {
            (0..len)
                .map(|p| {
                    let at = self.slot(s, p) * self.w;
                    self.data[at..at + self.w].iter().map(|x| x.to_f32()).collect()
                })
                .collect()
        }
    }

    fn bits_equal(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Every level against the reference over the stored rows, for a batch of queries of
    /// several sequences and context lengths (one empty); and the same bits for each query
    /// alone (where its heads are split into groups across threads).
    fn check_levels<T: KvElem>(seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let shapes =
            [(1, 40, 32), (3, 40, 32), (20, 40, 32), (3, 44, 36), (1, 576, 512), (3, 576, 512), (20, 576, 512)];
        let lens = [1usize, 17, 40, 100];
        for (heads, w, vw) in shapes {
            for bs in [1, 5, 16] {
                let c = Case::<T>::new(&mut rng, &lens, bs, w);
                // (sequence, context length): first, middle and last positions, and an empty one.
                let mut queries: Vec<(usize, usize)> = Vec::new();
                for (s, &len) in lens.iter().enumerate() {
                    for ctx in [1, len / 2 + 1, len] {
                        if queries.last() != Some(&(s, ctx)) {
                            queries.push((s, ctx));
                        }
                    }
                }
                queries.insert(2, (0, 0));
                let ctxs: Vec<QueryContext> =
                    queries.iter().map(|&(s, len)| QueryContext::causal(&c.tables[s], len)).collect();
                let (qrow, orow) = (heads * w, heads * vw);
                let q: Vec<f32> = (0..queries.len() * qrow).map(|_| rng.random_range(-1.0..1.0)).collect();
                // Peaky enough that the running maximum moves and rescales the accumulators.
                let scale = 4.0 / (w as f32).sqrt();
                let want: Vec<f32> = queries
                    .iter()
                    .enumerate()
                    .flat_map(|(t, &(s, len))| {
                        reference::latent_attention(&q[t * qrow..(t + 1) * qrow], heads, &c.rows(s, len), vw, scale)
                    })
                    .collect();
                for level in SimdLevel::available() {
                    let what = format!("{:?} {level:?} heads={heads} w={w} vw={vw} bs={bs}", T::DTYPE);
                    let mut out = vec![f32::NAN; queries.len() * orow];
                    latent_attention_at(level, &q, heads, c.kv(), &ctxs, vw, scale, &mut out);
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        let (t, h, d) = (i / orow, i % orow / vw, i % vw);
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what} t={t} h={h} d={d}: {a} vs {b}");
                    }
                    for (t, ctx) in ctxs.iter().enumerate() {
                        let mut one = vec![f32::NAN; orow];
                        latent_attention_at(
                            level,
                            &q[t * qrow..(t + 1) * qrow],
                            heads,
                            c.kv(),
                            &[*ctx],
                            vw,
                            scale,
                            &mut one,
                        );
                        assert!(bits_equal(&one, &out[t * orow..(t + 1) * orow]), "{what}: query {t} alone differs");
                    }
                }
            }
        }
    }

    /// A coded latent cache of every type gives the same bits as an f32 cache of its decoded
    /// rows, at every level, and decodes to what was written within the codec's precision.
    #[test]
    fn coded_latent_caches_match_an_f32_cache_of_their_decoded_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for (heads, w, vw, bs) in [(4, 96, 64, 16), (3, 64, 32, 5)] {
            let lens = [1usize, 21, 40];
            let c = Case::<f32>::new(&mut rng, &lens, bs, w);
            let blocks = c.data.len() / (bs * w);
            for dtype in KvCacheDtype::ALL {
                let mut data = vec![0u8; blocks * bs * dtype.row_bytes(w)];
                let mut anchors = vec![0u16; if dtype.is_quantized() { blocks * w } else { 0 }];
                let mut coded =
                    CodedLatentKvMut { data: &mut data, anchors: &mut anchors, dtype, block_size: bs, width: w };
                for (s, &len) in lens.iter().enumerate() {
                    for (p, row) in c.rows(s, len).iter().enumerate() {
                        coded.write(&[c.slot(s, p)], row);
                    }
                }
                let mut dec = c.data.clone();
                // Root-mean-square error per row: q4_0's least-squares scales may clip a value.
                let err = if dtype == KvCacheDtype::Q4_0 { 0.3 } else { 0.03 };
                for (s, &len) in lens.iter().enumerate() {
                    for (p, row) in c.rows(s, len).iter().enumerate() {
                        let slot = c.slot(s, p);
                        let mut back = vec![0f32; w];
                        coded.view().read(SimdLevel::Scalar, slot, &mut back);
                        let rms = (back.iter().zip(row).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / w as f32).sqrt();
                        assert!(rms <= err, "{dtype}: decoded row off by {rms} (rms)");
                        dec[slot * w..(slot + 1) * w].copy_from_slice(&back);
                    }
                }
                let f32_kv = LatentKv { data: &dec[..], block_size: bs, width: w };
                let ctxs: Vec<QueryContext> =
                    lens.iter().enumerate().map(|(s, &len)| QueryContext::causal(&c.tables[s], len)).collect();
                let q: Vec<f32> = (0..ctxs.len() * heads * w).map(|_| rng.random_range(-1.0..1.0)).collect();
                for level in SimdLevel::available() {
                    let mut want = vec![0f32; ctxs.len() * heads * vw];
                    latent_attention_at(level, &q, heads, f32_kv, &ctxs, vw, 0.125, &mut want);
                    let mut got = vec![0f32; want.len()];
                    latent_attention_at(level, &q, heads, coded.view(), &ctxs, vw, 0.125, &mut got);
                    assert!(bits_equal(&got, &want), "{dtype} {level:?}: differs from the decoded f32 cache");
                }
            }
        }
    }

    #[test]
    fn mla_every_level_matches_the_reference_f32() {
        check_levels::<f32>(11);
    }

    #[test]
    fn mla_every_level_matches_the_reference_f16() {
        check_levels::<f16>(12);
    }

    #[test]
    fn mla_empty_context_gives_zeros() {
        let kv = LatentKv::<f16> { data: &[], block_size: 16, width: 8 };
        let q = vec![1f32; 2 * 8];
        let mut out = vec![f32::NAN; 2 * 4];
        latent_attention(&q, 2, kv, &[QueryContext::causal(&[], 0)], 4, 1.0, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn mla_one_position_returns_its_value() {
        let (w, vw) = (24, 16);
        let row: Vec<f32> = (0..w).map(|i| i as f32 * 0.25 - 1.0).collect();
        let mut data = vec![0f32; 4 * w];
        LatentKvMut { data: &mut data, block_size: 2, width: w }.write(&[3], &row);
        let q = vec![0.5f32; 3 * w];
        for level in SimdLevel::available() {
            let mut out = vec![f32::NAN; 3 * vw];
            let kv = LatentKv { data: &data, block_size: 2, width: w };
            latent_attention_at(level, &q, 3, kv, &[QueryContext::causal(&[1], 2)], vw, 0.1, &mut out);
            // Slot 2 (zeros) and slot 3 (the row) with their softmax weights.
            let s = 0.1 * row.iter().sum::<f32>() * 0.5;
            let p = 1.0 / (1.0 + (-s).exp());
            for (d, o) in out.iter().enumerate() {
                assert!((o - p * row[d % vw]).abs() < 1e-5, "{level:?} {d}: {o}");
            }
        }
    }
}
