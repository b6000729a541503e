//! Attention of a flat batch of query tokens over a paged KV cache.
//!
//! Cache layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]` f32, keys and
//! values in separate buffers. A token's slot is `block * block_size + offset`; a sequence's
//! block table lists its blocks in position order.

use crate::{ops, parallel};

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
/// `q` and `out` are `[tokens, num_heads * head_dim]`.
pub fn paged_attention(
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
    assert!(num_heads.is_multiple_of(kv.num_kv_heads));
    let group = num_heads / kv.num_kv_heads;
    let kv_row = kv.num_kv_heads * hd;
    let work: usize = queries.iter().map(|c| c.context_len * row).sum();
    let parts = parallel::for_each_range(queries.len(), work * 2, |t0, t1| {
        let mut part = vec![0f32; (t1 - t0) * row];
        let mut scores = Vec::new();
        for t in t0..t1 {
            let ctx = queries[t];
            scores.resize(ctx.context_len, 0.0);
            for h in 0..num_heads {
                let kvh = h / group;
                let qh = &q[t * row + h * hd..t * row + (h + 1) * hd];
                for (p, s) in scores.iter_mut().enumerate() {
                    let slot = slot_of(ctx.block_table, kv.block_size, p);
                    let k = &kv.k[slot * kv_row + kvh * hd..slot * kv_row + (kvh + 1) * hd];
                    *s = ops::dot(qh, k) * scale;
                }
                ops::softmax(&mut scores);
                let o = &mut part[(t - t0) * row + h * hd..(t - t0) * row + (h + 1) * hd];
                for (p, &s) in scores.iter().enumerate() {
                    let slot = slot_of(ctx.block_table, kv.block_size, p);
                    ops::axpy(s, &kv.v[slot * kv_row + kvh * hd..slot * kv_row + (kvh + 1) * hd], o);
                }
            }
        }
        (t0, part)
    });
    for (t0, part) in parts {
        out[t0 * row..t0 * row + part.len()].copy_from_slice(&part);
    }
}

#[inline]
fn slot_of(block_table: &[u32], block_size: usize, pos: usize) -> usize {
    block_table[pos / block_size] as usize * block_size + pos % block_size
}
