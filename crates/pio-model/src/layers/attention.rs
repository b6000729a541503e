//! Causal self-attention over the paged KV cache — the only code that touches the cache.

use half::f16;
use pio_kernels::attention::{
    paged_attention, CodedKvMut, KvCacheDtype, KvCacheType, KvElem, PagedKvMut, QueryContext,
};
use pio_kernels::ops::{self, RopeLayout};

use crate::batch::ForwardBatch;

/// The K/V of every layer, in fixed-size blocks of `block_size` positions, stored as
/// [`KvCacheType`] says (layout in [`pio_kernels::attention`]). A "contiguous cache" is one big
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
    Coded { data: &'a mut [u8], anchors: &'a mut [u16], dtype: KvCacheDtype },
}

/// Per layer: keys and values, `num_blocks * block_size * num_kv_heads * head_dim` each (f32
/// and f16 alike for both: the kernels' typed layout); or encoded rows of any other types.
#[derive(Debug)]
enum KvLayers {
    F32(Vec<(Vec<f32>, Vec<f32>)>),
    F16(Vec<(Vec<f16>, Vec<f16>)>),
    Coded { types: KvCacheType, layers: Vec<CodedLayer> },
}

/// One layer of a coded cache: key rows, value rows, and the keys' anchors (see
/// [`pio_kernels::attention::CodedKv`]).
#[derive(Debug)]
struct CodedLayer {
    k: Vec<u8>,
    v: Vec<u8>,
    anchors: Vec<u16>,
}

impl KvCache {
    /// Panics if `types` cannot store heads of `head_dim` ([`KvCacheType::check`]).
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        types: KvCacheType,
    ) -> KvCache {
        fn layers<T: KvElem>(num_layers: usize, len: usize) -> Vec<(Vec<T>, Vec<T>)> {
            (0..num_layers).map(|_| (T::zeros(len), T::zeros(len))).collect()
        }
        if let Err(e) = types.check(head_dim) {
            panic!("{e}");
        }
        let len = num_blocks * block_size * num_kv_heads * head_dim;
        let layers = match (types.k, types.v) {
            (KvCacheDtype::F32, KvCacheDtype::F32) => KvLayers::F32(layers(num_layers, len)),
            (KvCacheDtype::F16, KvCacheDtype::F16) => KvLayers::F16(layers(num_layers, len)),
            _ => {
                let rows = num_blocks * block_size * num_kv_heads;
                let (k, v) = (rows * types.k.row_bytes(head_dim), rows * types.v.row_bytes(head_dim));
                let a = if types.k.is_quantized() { num_blocks * num_kv_heads * head_dim } else { 0 };
                let layer = || CodedLayer { k: vec![0u8; k], v: vec![0u8; v], anchors: vec![0u16; a] };
                KvLayers::Coded { types, layers: (0..num_layers).map(|_| layer()).collect() }
            }
        };
        KvCache { block_size, num_blocks, num_kv_heads, head_dim, latent: false, layers }
    }

    /// A cache for multi-head latent attention: per layer and token one row of `width` values
    /// (the compressed K/V latent and the rotated shared key part), stored once for all heads,
    /// as `dtype` (block formats with an anchor row per block, as keys are). `num_kv_heads` is
    /// 1 and `head_dim` is `width`. Panics where [`KvCache::latent_supports`] says no.
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
        if let Err(e) = KvCache::latent_supports(KvCacheType::both(dtype), width) {
            panic!("{e}");
        }
        let len = num_blocks * block_size * width;
        let layers = match dtype {
            KvCacheDtype::F32 => KvLayers::F32(layers(num_layers, len)),
            KvCacheDtype::F16 => KvLayers::F16(layers(num_layers, len)),
            _ => {
                let bytes = num_blocks * block_size * dtype.row_bytes(width);
                let a = if dtype.is_quantized() { num_blocks * width } else { 0 };
                let layer = || CodedLayer { k: vec![0u8; bytes], v: Vec::new(), anchors: vec![0u16; a] };
                KvLayers::Coded { types: KvCacheType::both(dtype), layers: (0..num_layers).map(|_| layer()).collect() }
            }
        };
        KvCache { block_size, num_blocks, num_kv_heads: 1, head_dim: width, latent: true, layers }
    }

    /// Whether a latent cache of rows of `width` can be stored as `types`: one type for its
    /// single row (keys and values alike), which must fit the row.
    pub fn latent_supports(types: KvCacheType, width: usize) -> Result<(), String> {
        if types.k != types.v {
            return Err(format!(
                "--cache-type-k/--cache-type-v {types}: this model's multi-head latent attention cache \
                 holds one row per token for keys and values alike; give them one type"
            ));
        }
        types.check(width).map_err(|e| format!("{e} (the latent row of this model's multi-head latent attention)"))
    }

    /// Bytes one token occupies across all layers of a latent cache of `width` (block formats'
    /// anchors counted for blocks of [`pio_kernels::attention::ANCHOR_BLOCK`]).
    pub fn latent_bytes_per_token(num_layers: usize, width: usize, dtype: KvCacheDtype) -> usize {
        const B: usize = pio_kernels::attention::ANCHOR_BLOCK;
        let anchors = if dtype.is_quantized() { 2 * width } else { 0 };
        num_layers * (B * dtype.row_bytes(width) + anchors).div_ceil(B)
    }

    pub fn is_latent(&self) -> bool {
        self.latent
    }

    pub fn num_layers(&self) -> usize {
        match &self.layers {
            KvLayers::F32(l) => l.len(),
            KvLayers::F16(l) => l.len(),
            KvLayers::Coded { layers, .. } => layers.len(),
        }
    }

    /// Layer `layer` of a latent cache.
    pub(crate) fn latent_layer_mut(&mut self, layer: usize) -> LatentLayerMut<'_> {
        match &mut self.layers {
            KvLayers::F32(l) => LatentLayerMut::F32(&mut l[layer].0),
            KvLayers::F16(l) => LatentLayerMut::F16(&mut l[layer].0),
            KvLayers::Coded { types, layers } => {
                let l = &mut layers[layer];
                LatentLayerMut::Coded { data: &mut l.k, anchors: &mut l.anchors, dtype: types.k }
            }
        }
    }

    /// How keys and values are stored.
    pub fn types(&self) -> KvCacheType {
        match self.layers {
            KvLayers::F32(_) => KvCacheType::both(KvCacheDtype::F32),
            KvLayers::F16(_) => KvCacheType::both(KvCacheDtype::F16),
            KvLayers::Coded { types, .. } => types,
        }
    }

    /// Bytes held by the cache.
    pub fn nbytes(&self) -> usize {
        match &self.layers {
            KvLayers::F32(l) => l.iter().map(|(k, v)| 4 * (k.len() + v.len())).sum(),
            KvLayers::F16(l) => l.iter().map(|(k, v)| 2 * (k.len() + v.len())).sum(),
            KvLayers::Coded { layers, .. } => layers.iter().map(|l| l.k.len() + l.v.len() + 2 * l.anchors.len()).sum(),
        }
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
            KvLayers::Coded { layers, .. } => layers.iter_mut().for_each(|l| {
                touch(&mut l.k);
                touch(&mut l.v);
                touch(&mut l.anchors)
            }),
        }
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(num_layers: usize, num_kv_heads: usize, head_dim: usize, types: KvCacheType) -> usize {
        num_layers * types.bytes_per_token(num_kv_heads, head_dim)
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
    /// A sliding window: each position sees itself and the `w - 1` before it (`None`: all).
    pub window: Option<usize>,
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
            KvLayers::Coded { types, layers } => {
                let types = *types;
                // Block formats hold one scale per 32 values, which a few outlier channels (small
                // Qwen models have keys hundreds of times larger in some channels) would set for
                // all the others. Rotating each head by a Hadamard transform spreads them out:
                // keys and queries alike, so the scores are unchanged; values before they are
                // stored, and the outputs back after (the transform is its own inverse).
                if types.k.is_quantized() {
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
                let l = &mut layers[self.layer];
                let mut kv = CodedKvMut {
                    k: &mut l.k,
                    v: &mut l.v,
                    anchors: &mut l.anchors,
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
        match &mut cache.layers {
            KvLayers::F32(l) => {
                let (k, v) = &mut l[self.layer];
                let mut kv = PagedKvMut { k, v, block_size: bs, num_kv_heads: self.num_kv_heads, head_dim: hd };
                kv.map_keys(blocks, &mut |row| ops::rope_heads_with(row, hd, &cos, &sin, layout));
            }
            KvLayers::F16(l) => {
                let (k, v) = &mut l[self.layer];
                let mut kv = PagedKvMut { k, v, block_size: bs, num_kv_heads: self.num_kv_heads, head_dim: hd };
                kv.map_keys(blocks, &mut |row| ops::rope_heads_with(row, hd, &cos, &sin, layout));
            }
            KvLayers::Coded { types, layers } => {
                // Block-format keys are stored Hadamard-rotated (see `forward`): undo, rotate the
                // positions, redo.
                let hadamard = types.k.is_quantized();
                let l = &mut layers[self.layer];
                let mut kv = CodedKvMut {
                    k: &mut l.k,
                    v: &mut l.v,
                    anchors: &mut l.anchors,
                    types: *types,
                    block_size: bs,
                    num_kv_heads: self.num_kv_heads,
                    head_dim: hd,
                };
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
        let mut out = vec![0f32; q.len()];
        paged_attention(q, self.num_heads, kv.view(), &self.queries(batch), self.scale, &mut out);
        out
    }
}
