//! Causal self-attention over the paged KV cache — the only code that touches the cache.

use pio_kernels::attention::{paged_attention, PagedKv, QueryContext};
use pio_kernels::ops::{self, RopeLayout};

use crate::batch::ForwardBatch;

/// The K/V of every layer, in fixed-size blocks: per layer `[num_blocks, block_size,
/// num_kv_heads, head_dim]` f32 for keys and for values. A "contiguous cache" is one big block
/// table; there is no other cache.
#[derive(Debug)]
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Per layer: (keys, values).
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> KvCache {
        let len = num_blocks * block_size * num_kv_heads * head_dim;
        KvCache {
            block_size,
            num_blocks,
            num_kv_heads,
            head_dim,
            layers: (0..num_layers).map(|_| (vec![0f32; len], vec![0f32; len])).collect(),
        }
    }

    /// Bytes held by the cache.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.len() + v.len()) * 4).sum()
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(num_layers: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * num_kv_heads * head_dim * 4
    }
}

/// Rotary embedding and scaled dot-product attention of one layer.
#[derive(Debug, Clone)]
pub struct Attention {
    pub layer: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub rope_layout: RopeLayout,
    /// `[head_dim / 2]` RoPE inverse frequencies.
    pub inv_freq: Vec<f32>,
}

impl Attention {
    /// Rotates `q` (`[tokens, num_heads * head_dim]`) and `k` (`[tokens, num_kv_heads *
    /// head_dim]`) by their positions, writes `k`, `v` into the cache slots, and returns
    /// `[tokens, num_heads * head_dim]` attention outputs.
    pub fn forward(
        &self,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        batch: &ForwardBatch,
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let (qd, kd) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for (t, &pos) in batch.positions.iter().enumerate() {
            ops::rope_angles(pos, &self.inv_freq, &mut cos, &mut sin);
            ops::rope_heads_with(&mut q[t * qd..(t + 1) * qd], self.head_dim, &cos, &sin, self.rope_layout);
            ops::rope_heads_with(&mut k[t * kd..(t + 1) * kd], self.head_dim, &cos, &sin, self.rope_layout);
        }
        let (kc, vc) = &mut cache.layers[self.layer];
        for (t, &slot) in batch.slot_mapping.iter().enumerate() {
            kc[slot * kd..(slot + 1) * kd].copy_from_slice(&k[t * kd..(t + 1) * kd]);
            vc[slot * kd..(slot + 1) * kd].copy_from_slice(&v[t * kd..(t + 1) * kd]);
        }
        let queries: Vec<QueryContext> = batch
            .positions
            .iter()
            .zip(&batch.seq_indices)
            .map(|(&pos, &s)| QueryContext { block_table: &batch.block_tables[s], context_len: pos + 1 })
            .collect();
        let kv = PagedKv {
            k: kc,
            v: vc,
            block_size: cache.block_size,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        };
        let mut out = vec![0f32; q.len()];
        paged_attention(q, self.num_heads, kv, &queries, self.scale, &mut out);
        out
    }
}
