//! Causal self-attention over the paged KV cache — the only code that touches the cache.

use half::f16;
use pio_kernels::attention::{paged_attention, KvCacheDtype, KvElem, PagedKvMut, QueryContext};
use pio_kernels::ops::{self, RopeLayout};

use crate::batch::ForwardBatch;

/// The K/V of every layer, in fixed-size blocks of `block_size` positions, as f32 or f16
/// ([`KvCacheDtype`]; layout in [`pio_kernels::attention`]). A "contiguous cache" is one big
/// block table; there is no other cache.
#[derive(Debug)]
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// A latent cache (multi-head latent attention): one row of `head_dim` values per token,
    /// held where keys are, with no values (see [`KvCache::new_latent`]).
    latent: bool,
    layers: KvLayers,
}

/// One layer of a latent cache, to write and read.
pub(crate) enum LatentLayerMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

/// Per layer: keys and values, `num_blocks * block_size * num_kv_heads * head_dim` each.
#[derive(Debug)]
enum KvLayers {
    F32(Vec<(Vec<f32>, Vec<f32>)>),
    F16(Vec<(Vec<f16>, Vec<f16>)>),
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        dtype: KvCacheDtype,
    ) -> KvCache {
        fn layers<T: KvElem>(num_layers: usize, len: usize) -> Vec<(Vec<T>, Vec<T>)> {
            (0..num_layers).map(|_| (T::zeros(len), T::zeros(len))).collect()
        }
        let len = num_blocks * block_size * num_kv_heads * head_dim;
        let layers = match dtype {
            KvCacheDtype::F32 => KvLayers::F32(layers(num_layers, len)),
            KvCacheDtype::F16 => KvLayers::F16(layers(num_layers, len)),
        };
        KvCache { block_size, num_blocks, num_kv_heads, head_dim, latent: false, layers }
    }

    /// A cache for multi-head latent attention: per layer and token one row of `width` values
    /// (the compressed K/V latent and the rotated shared key part), stored once for all heads.
    /// `num_kv_heads` is 1 and `head_dim` is `width`.
    pub fn new_latent(
        num_layers: usize,
        width: usize,
        block_size: usize,
        num_blocks: usize,
        dtype: KvCacheDtype,
    ) -> KvCache {
        fn layers<T: KvElem>(num_layers: usize, len: usize) -> Vec<(Vec<T>, Vec<T>)> {
            (0..num_layers).map(|_| (T::zeros(len), Vec::new())).collect()
        }
        let len = num_blocks * block_size * width;
        let layers = match dtype {
            KvCacheDtype::F32 => KvLayers::F32(layers(num_layers, len)),
            KvCacheDtype::F16 => KvLayers::F16(layers(num_layers, len)),
        };
        KvCache { block_size, num_blocks, num_kv_heads: 1, head_dim: width, latent: true, layers }
    }

    /// Bytes one token occupies across all layers of a latent cache of `width`.
    pub fn latent_bytes_per_token(num_layers: usize, width: usize, dtype: KvCacheDtype) -> usize {
        num_layers * width * dtype.size_bytes()
    }

    pub fn is_latent(&self) -> bool {
        self.latent
    }

    pub fn num_layers(&self) -> usize {
        match &self.layers {
            KvLayers::F32(l) => l.len(),
            KvLayers::F16(l) => l.len(),
        }
    }

    /// Layer `layer` of a latent cache.
    pub(crate) fn latent_layer_mut(&mut self, layer: usize) -> LatentLayerMut<'_> {
        match &mut self.layers {
            KvLayers::F32(l) => LatentLayerMut::F32(&mut l[layer].0),
            KvLayers::F16(l) => LatentLayerMut::F16(&mut l[layer].0),
        }
    }

    pub fn dtype(&self) -> KvCacheDtype {
        match self.layers {
            KvLayers::F32(_) => KvCacheDtype::F32,
            KvLayers::F16(_) => KvCacheDtype::F16,
        }
    }

    /// Bytes held by the cache.
    pub fn nbytes(&self) -> usize {
        let elems = match &self.layers {
            KvLayers::F32(l) => l.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
            KvLayers::F16(l) => l.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
        };
        elems * self.dtype().size_bytes()
    }

    /// Touches every page of the cache now, so its memory is resident from the start and the
    /// process's RSS does not creep up as blocks are first used (a long-running server's memory
    /// is then fixed at start, as vLLM's and llama-server's are).
    pub fn prefault(&mut self) {
        fn touch<T: Copy>(v: &mut [T]) {
            let step = (4096 / std::mem::size_of::<T>().max(1)).max(1);
            for i in (0..v.len()).step_by(step) {
                let x = v[i];
                // SAFETY: `i` is in bounds; a volatile store of the value already there keeps the
                // compiler from dropping a write whose only effect is faulting the page in.
                unsafe { std::ptr::write_volatile(&mut v[i], x) };
            }
        }
        match &mut self.layers {
            KvLayers::F32(l) => l.iter_mut().for_each(|(k, v)| {
                touch(k);
                touch(v)
            }),
            KvLayers::F16(l) => l.iter_mut().for_each(|(k, v)| {
                touch(k);
                touch(v)
            }),
        }
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(num_layers: usize, num_kv_heads: usize, head_dim: usize, dtype: KvCacheDtype) -> usize {
        2 * num_layers * num_kv_heads * head_dim * dtype.size_bytes()
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
        let bs = cache.block_size;
        match &mut cache.layers {
            KvLayers::F32(l) => self.attend(&mut l[self.layer], bs, q, k, v, batch),
            KvLayers::F16(l) => self.attend(&mut l[self.layer], bs, q, k, v, batch),
        }
    }

    /// Writes `k`, `v` into this layer's cache at the batch's slots and attends `q` over it.
    fn attend<T: KvElem>(
        &self,
        (kc, vc): &mut (Vec<T>, Vec<T>),
        block_size: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        batch: &ForwardBatch,
    ) -> Vec<f32> {
        let mut kv = PagedKvMut { k: kc, v: vc, block_size, num_kv_heads: self.num_kv_heads, head_dim: self.head_dim };
        kv.write(&batch.slot_mapping, k, v);
        let queries: Vec<QueryContext> = batch
            .positions
            .iter()
            .zip(&batch.seq_indices)
            .map(|(&pos, &s)| QueryContext { block_table: &batch.block_tables[s], context_len: pos + 1 })
            .collect();
        let mut out = vec![0f32; q.len()];
        paged_attention(q, self.num_heads, kv.view(), &queries, self.scale, &mut out);
        out
    }
}
