//! Causal self-attention over the paged KV cache — the only code that touches the cache.

use pio_kernels::attention::{paged_attention, CodedKvMut, KvElem, PagedKvMut, QueryContext};
use pio_kernels::ops::{self, RopeLayout};
use pio_kernels::parallel;

use crate::batch::ForwardBatch;
use crate::layers::kv_cache::{KvCache, LayerStore};

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
    /// A sliding window: each position sees itself and the `w - 1` before it (`None`: all).
    pub window: Option<usize>,
    /// Multimodal rotary positions (see [`crate::config::ModelConfig::mrope_section`]): tokens
    /// turn by the batch's `mrope_positions` where it has them.
    pub mrope_section: Option<[usize; 3]>,
}

/// [`ops::rope_angles`] of an M-RoPE position: frequency `i` turns by the position on its
/// axis ([`crate::config::mrope_axis`]), `pos * inv_freq[i]` in f32 as transformers computes it.
pub fn mrope_angles(pos: &[usize; 3], section: &[usize; 3], inv_freq: &[f32], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    cos.clear();
    sin.clear();
    for (i, &f) in inv_freq.iter().enumerate() {
        let (s, c) = (pos[crate::config::mrope_axis(i, section)] as f32 * f).sin_cos();
        cos.push(c);
        sin.push(s);
    }
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
        // Token by token, a prefill's tokens in ranges across the threads.
        let work = 4 * (q.len() + k.len());
        parallel::for_each_rows_mut([&mut *q, &mut *k], [qd, kd], work, |t0, [q, k]| {
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for (i, (q, k)) in q.chunks_exact_mut(qd).zip(k.chunks_exact_mut(kd)).enumerate() {
                let t = t0 + i;
                match (&self.mrope_section, batch.mrope_positions.get(t)) {
                    (Some(section), Some(p)) => mrope_angles(p, section, &self.inv_freq, &mut cos, &mut sin),
                    _ => ops::rope_angles(batch.positions[t], &self.inv_freq, &mut cos, &mut sin),
                }
                ops::rope_heads_with(q, self.head_dim, &cos, &sin, self.rope_layout);
                ops::rope_heads_with(k, self.head_dim, &cos, &sin, self.rope_layout);
            }
        });
        let bs = cache.block_size;
        let types = cache.types();
        match cache.layer_mut(self.layer) {
            LayerStore::F32 { k: kc, v: vc } => self.attend(kc, vc, bs, q, k, v, batch),
            LayerStore::F16 { k: kc, v: vc } => self.attend(kc, vc, bs, q, k, v, batch),
            LayerStore::Coded { k: kc, v: vc, anchors } => {
                // Block formats hold one scale per 32 values, which a few outlier channels (small
                // Qwen models have keys hundreds of times larger in some channels) would set for
                // all the others. Rotating each head by a Hadamard transform spreads them out:
                // q8_0 keys and the queries alike, so the scores are unchanged (q4_0 keys keep
                // their channels, each with its own scale: `CodedKv`); values before they are
                // stored, and the outputs back after (the transform is its own inverse).
                if types.k.rotates_keys() {
                    ops::hadamard_rows(q, self.head_dim);
                    ops::hadamard_rows(k, self.head_dim);
                }
                let rotated;
                let v = if types.v.is_quantized() {
                    let mut r = v.to_vec();
                    ops::hadamard_rows(&mut r, self.head_dim);
                    rotated = r;
                    &rotated[..]
                } else {
                    v
                };
                let mut kv = CodedKvMut {
                    k: kc,
                    v: vc,
                    anchors,
                    types,
                    block_size: bs,
                    num_kv_heads: self.num_kv_heads,
                    head_dim: self.head_dim,
                };
                let prev: Vec<Option<usize>> = batch
                    .positions
                    .iter()
                    .zip(&batch.seq_indices)
                    .map(|(&p, &s)| (p / bs).checked_sub(1).map(|i| batch.block_tables[s][i] as usize))
                    .collect();
                kv.write_after(&batch.slot_mapping, &prev, k, v);
                let mut out = vec![0f32; q.len()];
                paged_attention(q, self.num_heads, kv.view(), &self.queries(batch), self.scale, &mut out);
                if types.v.is_quantized() {
                    ops::hadamard_rows(&mut out, self.head_dim);
                }
                out
            }
            // The model checks that the cache was made from its spec: an attention layer
            // never holds a recurrent state.
            LayerStore::State { .. } => unreachable!("layer {} holds a recurrent state", self.layer),
        }
    }

    /// Re-rotates this layer's cached keys in `blocks` from position `p` to `p - delta` (a
    /// rotation by `-delta`, in the space the cache stores them in).
    pub fn shift_keys(&self, cache: &mut KvCache, blocks: &[u32], delta: usize) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        ops::rope_angles(delta, &self.inv_freq, &mut cos, &mut sin);
        sin.iter_mut().for_each(|s| *s = -*s);
        let hd = self.head_dim;
        let layout = self.rope_layout;
        let bs = cache.block_size;
        let types = cache.types();
        let nkv = self.num_kv_heads;
        match cache.layer_mut(self.layer) {
            LayerStore::F32 { k, v } => {
                let mut kv = PagedKvMut { k, v, block_size: bs, num_kv_heads: nkv, head_dim: hd };
                kv.map_keys(blocks, &mut |row| ops::rope_heads_with(row, hd, &cos, &sin, layout));
            }
            LayerStore::F16 { k, v } => {
                let mut kv = PagedKvMut { k, v, block_size: bs, num_kv_heads: nkv, head_dim: hd };
                kv.map_keys(blocks, &mut |row| ops::rope_heads_with(row, hd, &cos, &sin, layout));
            }
            LayerStore::Coded { k, v, anchors } => {
                // q8_0 keys are stored Hadamard-rotated (see `forward`): undo, rotate the
                // positions, redo.
                let hadamard = types.k.rotates_keys();
                let mut kv = CodedKvMut { k, v, anchors, types, block_size: bs, num_kv_heads: nkv, head_dim: hd };
                kv.map_keys(blocks, &mut |row| {
                    if hadamard {
                        ops::hadamard_rows(row, hd);
                    }
                    ops::rope_heads_with(row, hd, &cos, &sin, layout);
                    if hadamard {
                        ops::hadamard_rows(row, hd);
                    }
                });
            }
            // The model checks that the cache was made from its spec: an attention layer
            // never holds a recurrent state.
            LayerStore::State { .. } => unreachable!("layer {} holds a recurrent state", self.layer),
        }
    }

    /// Each query token's context: its sequence's blocks, and the positions up to its own.
    fn queries<'b>(&self, batch: &'b ForwardBatch) -> Vec<QueryContext<'b>> {
        batch
            .positions
            .iter()
            .zip(&batch.seq_indices)
            .map(|(&pos, &s)| QueryContext::windowed(&batch.block_tables[s], pos + 1, self.window))
            .collect()
    }

    /// Writes `k`, `v` into this layer's cache at the batch's slots and attends `q` over it.
    #[allow(clippy::too_many_arguments)]
    fn attend<T: KvElem>(
        &self,
        kc: &mut [T],
        vc: &mut [T],
        block_size: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        batch: &ForwardBatch,
    ) -> Vec<f32> {
        let mut kv = PagedKvMut { k: kc, v: vc, block_size, num_kv_heads: self.num_kv_heads, head_dim: self.head_dim };
        kv.write(&batch.slot_mapping, k, v);
        let mut out = vec![0f32; q.len()];
        paged_attention(q, self.num_heads, kv.view(), &self.queries(batch), self.scale, &mut out);
        out
    }
}
