//! The paged KV cache, described per layer.
//!
//! A model says what each of its layers keeps ([`CacheSpec`]): per token, keys and values of
//! standard attention, maybe behind a sliding window, or one latent row of multi-head latent
//! attention; per sequence, the fixed-size recurrent state of a linear-attention layer. The
//! engine sizes the cache from that (bytes per block summed over the layers, plus bytes per
//! state slot) and hands out blocks of one pool and state slots of another; [`KvCache`] stores
//! every layer's share of every block in the element types the user chose ([`KvCacheType`]),
//! as bytes plus a codec where they are not f32 or f16 (layouts in [`pio_kernels::attention`]
//! and [`pio_kernels::mla`]), and every recurrent layer's share of every slot in f32.

use half::f16;
use pio_kernels::attention::{KvCacheDtype, KvCacheType, KvElem, ANCHOR_BLOCK};
use pio_kernels::huge;

use crate::config::ModelConfig;

/// What one layer keeps in the cache for each token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCache {
    /// Keys and values of standard attention: a row of `head_dim` values per kv head each.
    /// With a sliding window the layer reads only the last `window` positions.
    Attention { num_kv_heads: usize, head_dim: usize, window: Option<usize> },
    /// One row of `width` values for keys and values alike (multi-head latent attention: the
    /// compressed K/V latent and the rotated shared key part), stored once for all heads.
    Latent { width: usize },
    /// Nothing per token: a fixed-size state per sequence (Gated DeltaNet), in f32. The last
    /// `conv_kernel - 1` inputs of the causal convolution over `conv_channels` channels, and a
    /// `key_dim × value_dim` matrix per value head.
    Recurrent { conv_channels: usize, conv_kernel: usize, num_heads: usize, key_dim: usize, value_dim: usize },
}

impl LayerCache {
    /// Bytes a block of `block_size` positions takes in this layer stored as `types`
    /// (block-format keys and latents keep an f16 anchor row per block and head).
    pub fn bytes_per_block(&self, types: KvCacheType, block_size: usize) -> usize {
        match *self {
            LayerCache::Attention { num_kv_heads, head_dim, .. } => {
                types.bytes_per_block(num_kv_heads, head_dim, block_size)
            }
            LayerCache::Latent { width } => {
                let anchors = if types.k.is_quantized() { 2 * width } else { 0 };
                block_size * types.k.row_bytes(width) + anchors
            }
            LayerCache::Recurrent { .. } => 0,
        }
    }

    /// f32 values of one sequence's state in this layer: (convolution, delta-rule) state (none
    /// for attention layers).
    pub fn state_len(&self) -> (usize, usize) {
        match *self {
            LayerCache::Recurrent { conv_channels, conv_kernel, num_heads, key_dim, value_dim } => {
                ((conv_kernel - 1) * conv_channels, num_heads * key_dim * value_dim)
            }
            _ => (0, 0),
        }
    }

    /// Whether this layer can be stored as `types`: an error naming the option if not.
    pub fn check(&self, types: KvCacheType) -> Result<(), String> {
        match *self {
            LayerCache::Attention { head_dim, .. } => types.check(head_dim),
            LayerCache::Latent { width } => {
                if types.k != types.v {
                    return Err(format!(
                        "--cache-type-k/--cache-type-v {types}: this model's multi-head latent attention \
                         cache holds one row per token for keys and values alike; give them one type"
                    ));
                }
                types
                    .check(width)
                    .map_err(|e| format!("{e} (the latent row of this model's multi-head latent attention)"))
            }
            // The recurrent state is always f32: it accumulates over the whole sequence.
            LayerCache::Recurrent { .. } => Ok(()),
        }
    }
}

/// What every layer of a model keeps, in layer order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    pub layers: Vec<LayerCache>,
}

impl CacheSpec {
    /// The spec a decoder of this config implies: a latent row per layer with multi-head latent
    /// attention, else keys and values with each layer's sliding window.
    pub fn from_config(c: &ModelConfig) -> CacheSpec {
        let layers = (0..c.num_layers)
            .map(|i| match (&c.mla, &c.linear_attn) {
                (_, Some(la)) if la.layers[i] => LayerCache::Recurrent {
                    conv_channels: la.conv_channels(),
                    conv_kernel: la.conv_kernel,
                    num_heads: la.num_value_heads,
                    key_dim: la.key_head_dim,
                    value_dim: la.value_head_dim,
                },
                (Some(m), _) => LayerCache::Latent { width: m.cache_width() },
                (None, _) => LayerCache::Attention {
                    num_kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                    window: c.sliding_window.get(i).copied().flatten(),
                },
            })
            .collect();
        CacheSpec { layers }
    }

    /// Bytes a block of `block_size` positions takes across all layers.
    pub fn bytes_per_block(&self, types: KvCacheType, block_size: usize) -> usize {
        self.layers.iter().map(|l| l.bytes_per_block(types, block_size)).sum()
    }

    /// Bytes of one sequence's recurrent state across all layers (0 without recurrent layers).
    pub fn state_bytes_per_seq(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let (conv, delta) = l.state_len();
                4 * (conv + delta)
            })
            .sum()
    }

    /// Whether some layer keeps a per-sequence state (a sequence then needs a state slot).
    pub fn has_state(&self) -> bool {
        self.layers.iter().any(|l| matches!(l, LayerCache::Recurrent { .. }))
    }

    /// Bytes one token takes across all layers (anchors spread over blocks of
    /// [`ANCHOR_BLOCK`]), rounded up.
    pub fn bytes_per_token(&self, types: KvCacheType) -> usize {
        self.bytes_per_block(types, ANCHOR_BLOCK).div_ceil(ANCHOR_BLOCK)
    }

    /// Whether every layer can be stored as `types` (the first layer's error if not).
    pub fn check(&self, types: KvCacheType) -> Result<(), String> {
        self.layers.iter().try_for_each(|l| l.check(types))
    }

    /// How far back any layer attends: `Some(w)` when every layer has a sliding window (the
    /// largest), `None` when some layer sees the whole context.
    pub fn window(&self) -> Option<usize> {
        let mut most = None;
        for l in &self.layers {
            match *l {
                LayerCache::Attention { window: Some(w), .. } => most = Some(most.map_or(w, |m: usize| m.max(w))),
                _ => return None,
            }
        }
        most
    }
}

/// The cache itself: every layer's share of `num_blocks` blocks of `block_size` positions, as
/// its [`LayerCache`] says, stored as [`KvCacheType`] says. A "contiguous cache" is one big
/// block table; there is no other cache.
#[derive(Debug)]
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Per-sequence state slots of the recurrent layers (0 when none has one).
    pub num_state_slots: usize,
    spec: CacheSpec,
    types: KvCacheType,
    layers: Vec<LayerStore>,
}

/// One layer's storage. Standard attention: keys and values, `num_blocks * block_size *
/// num_kv_heads * head_dim` each when both are f32 or both f16 (the kernels' typed layout),
/// else encoded rows (keys, values and the keys' anchors: [`pio_kernels::attention::CodedKv`]).
/// Latent attention: the rows in `k` (`v` empty), typed or encoded
/// ([`pio_kernels::mla::CodedLatentKv`]).
#[derive(Debug)]
pub(crate) enum LayerStore {
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    F16 {
        k: Vec<f16>,
        v: Vec<f16>,
    },
    Coded {
        k: Vec<u8>,
        v: Vec<u8>,
        anchors: Vec<u16>,
    },
    /// A recurrent layer: per slot, its convolution state and its delta-rule state.
    State {
        conv: Vec<f32>,
        delta: Vec<f32>,
    },
}

impl KvCache {
    /// `num_blocks` blocks of `block_size` positions, and `state_slots` per-sequence states
    /// where the spec has recurrent layers. Panics if `types` cannot store some layer
    /// ([`CacheSpec::check`]).
    pub fn new(
        spec: &CacheSpec,
        block_size: usize,
        num_blocks: usize,
        types: KvCacheType,
        state_slots: usize,
    ) -> KvCache {
        if let Err(e) = spec.check(types) {
            panic!("{e}");
        }
        let positions = num_blocks * block_size;
        let num_state_slots = if spec.has_state() { state_slots } else { 0 };
        let layers = spec
            .layers
            .iter()
            .map(|l| {
                // (values per position in k, in v; f16 anchor values per block)
                let (row, rows, has_v) = match *l {
                    LayerCache::Attention { num_kv_heads, head_dim, .. } => (head_dim, num_kv_heads, true),
                    LayerCache::Latent { width } => (width, 1, false),
                    LayerCache::Recurrent { .. } => {
                        let (conv, delta) = l.state_len();
                        return LayerStore::State {
                            conv: f32::zeros(num_state_slots * conv),
                            delta: f32::zeros(num_state_slots * delta),
                        };
                    }
                };
                let v_rows = if has_v { rows } else { 0 };
                // f16 rows kept per block and head beside block-format keys (anchors, scales).
                let side = match *l {
                    LayerCache::Attention { head_dim, .. } => types.k.key_side_len(head_dim),
                    _ if types.k.is_quantized() => row,
                    _ => 0,
                };
                match (types.k, types.v) {
                    (KvCacheDtype::F32, KvCacheDtype::F32) => LayerStore::F32 {
                        k: f32::zeros(positions * rows * row),
                        v: f32::zeros(positions * v_rows * row),
                    },
                    (KvCacheDtype::F16, KvCacheDtype::F16) => LayerStore::F16 {
                        k: f16::zeros(positions * rows * row),
                        v: f16::zeros(positions * v_rows * row),
                    },
                    _ => LayerStore::Coded {
                        k: vec![0u8; positions * rows * types.k.row_bytes(row)],
                        v: vec![0u8; positions * v_rows * types.v.row_bytes(row)],
                        anchors: vec![0u16; num_blocks * rows * side],
                    },
                }
            })
            .collect::<Vec<_>>();
        // Decode reads a sequence's keys and values chunk by chunk, a head's chunks a block of
        // all heads apart: on small pages each chunk is a TLB miss and a run the hardware
        // prefetchers start over.
        for layer in &layers {
            match layer {
                LayerStore::F32 { k, v } => {
                    huge::advise(k);
                    huge::advise(v);
                }
                LayerStore::F16 { k, v } => {
                    huge::advise(k);
                    huge::advise(v);
                }
                LayerStore::Coded { k, v, .. } => {
                    huge::advise(k);
                    huge::advise(v);
                }
                LayerStore::State { .. } => {}
            }
        }
        KvCache { block_size, num_blocks, num_state_slots, spec: spec.clone(), types, layers }
    }

    /// What each layer keeps.
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// How keys and values are stored.
    pub fn types(&self) -> KvCacheType {
        self.types
    }

    /// Layer `layer`'s storage.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> &mut LayerStore {
        &mut self.layers[layer]
    }

    /// Bytes held by the cache.
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerStore::F32 { k, v } => 4 * (k.len() + v.len()),
                LayerStore::F16 { k, v } => 2 * (k.len() + v.len()),
                LayerStore::Coded { k, v, anchors } => k.len() + v.len() + 2 * anchors.len(),
                LayerStore::State { conv, delta } => 4 * (conv.len() + delta.len()),
            })
            .sum()
    }

    /// Copies slot `from`'s state into slot `to` in every recurrent layer (a prefix snapshot
    /// taken or restored). Slots out of range are an error.
    pub fn copy_state(&mut self, from: usize, to: usize) -> crate::Result<()> {
        if from >= self.num_state_slots || to >= self.num_state_slots {
            return Err(crate::Error::Batch(format!(
                "state slots {from} -> {to}: the cache has {}",
                self.num_state_slots
            )));
        }
        for (l, store) in self.spec.layers.iter().zip(&mut self.layers) {
            let (cl, dl) = l.state_len();
            if let LayerStore::State { conv, delta } = store {
                conv.copy_within(from * cl..(from + 1) * cl, to * cl);
                delta.copy_within(from * dl..(from + 1) * dl, to * dl);
            }
        }
        Ok(())
    }

    /// Appends slot `slot`'s recurrent state (every recurrent layer's, in layer order) to
    /// `out`, for [`restore_state`](Self::restore_state).
    pub fn save_state(&self, slot: usize, out: &mut Vec<f32>) -> crate::Result<()> {
        if slot >= self.num_state_slots {
            return Err(crate::Error::Batch(format!("state slot {slot}: the cache has {}", self.num_state_slots)));
        }
        for (l, store) in self.spec.layers.iter().zip(&self.layers) {
            let (cl, dl) = l.state_len();
            if let LayerStore::State { conv, delta } = store {
                out.extend_from_slice(&conv[slot * cl..(slot + 1) * cl]);
                out.extend_from_slice(&delta[slot * dl..(slot + 1) * dl]);
            }
        }
        Ok(())
    }

    /// Puts back a state [`save_state`](Self::save_state) took into slot `slot`.
    pub fn restore_state(&mut self, slot: usize, saved: &[f32]) -> crate::Result<()> {
        let want: usize = self
            .spec
            .layers
            .iter()
            .zip(&self.layers)
            .filter(|(_, s)| matches!(s, LayerStore::State { .. }))
            .map(|(l, _)| l.state_len().0 + l.state_len().1)
            .sum();
        if slot >= self.num_state_slots || saved.len() != want {
            return Err(crate::Error::Batch(format!(
                "restoring state slot {slot} ({} values, {want} expected; the cache has {} slots)",
                saved.len(),
                self.num_state_slots
            )));
        }
        let mut at = 0;
        for (l, store) in self.spec.layers.iter().zip(&mut self.layers) {
            let (cl, dl) = l.state_len();
            if let LayerStore::State { conv, delta } = store {
                conv[slot * cl..(slot + 1) * cl].copy_from_slice(&saved[at..at + cl]);
                delta[slot * dl..(slot + 1) * dl].copy_from_slice(&saved[at + cl..at + cl + dl]);
                at += cl + dl;
            }
        }
        Ok(())
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
        for l in &mut self.layers {
            match l {
                LayerStore::F32 { k, v } => {
                    touch(k);
                    touch(v)
                }
                LayerStore::F16 { k, v } => {
                    touch(k);
                    touch(v)
                }
                LayerStore::Coded { k, v, anchors } => {
                    touch(k);
                    touch(v);
                    touch(anchors)
                }
                LayerStore::State { conv, delta } => {
                    touch(conv);
                    touch(delta)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q8: KvCacheType = KvCacheType { k: KvCacheDtype::Q8_0, v: KvCacheDtype::Q8_0 };
    const F16: KvCacheType = KvCacheType { k: KvCacheDtype::F16, v: KvCacheDtype::F16 };

    #[test]
    fn the_cache_holds_what_the_spec_says() {
        let spec = CacheSpec {
            layers: vec![
                LayerCache::Attention { num_kv_heads: 2, head_dim: 64, window: None },
                LayerCache::Attention { num_kv_heads: 2, head_dim: 64, window: Some(8) },
                LayerCache::Latent { width: 96 },
            ],
        };
        for types in [F16, Q8] {
            let cache = KvCache::new(&spec, 16, 3, types, 2);
            assert_eq!(cache.nbytes(), 3 * spec.bytes_per_block(types, 16), "{types}");
        }
        // f16: 2 layers x 2 heads x 64 x (k + v) x 2 bytes + one latent row of 96 x 2 bytes.
        assert_eq!(spec.bytes_per_token(F16), 2 * 2 * 64 * 2 * 2 + 96 * 2);
        // q8_0: 34 bytes per 32 values, plus an f16 anchor row per block of 16 for keys.
        assert_eq!(spec.bytes_per_block(Q8, 16), 2 * (16 * 2 * 2 * 68 + 2 * 2 * 64) + 16 * 102 + 2 * 96);
        // One full-attention layer: no window for the model.
        assert_eq!(spec.window(), None);
        let swa = CacheSpec { layers: vec![spec.layers[1]; 2] };
        assert_eq!(swa.window(), Some(8));
        // The latent row needs one type for keys and values, and every layer must fit.
        assert!(spec.check(KvCacheType { k: KvCacheDtype::Q8_0, v: KvCacheDtype::F16 }).is_err());
        let odd = CacheSpec { layers: vec![LayerCache::Attention { num_kv_heads: 1, head_dim: 48, window: None }] };
        assert!(odd.check(Q8).unwrap_err().contains("--cache-type-k q8_0"));
    }
}
