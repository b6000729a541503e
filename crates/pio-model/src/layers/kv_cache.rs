//! The paged KV cache, described per layer.
//!
//! A model says what each of its layers keeps per token ([`CacheSpec`]: keys and values of
//! standard attention, maybe behind a sliding window, or one latent row of multi-head latent
//! attention); the engine sizes the cache from that (bytes per block summed over the layers) and
//! hands out blocks of one pool; [`KvCache`] stores every layer's share of every block in the
//! element types the user chose ([`KvCacheType`]), as bytes plus a codec where they are not
//! f32 or f16 (layouts in [`pio_kernels::attention`] and [`pio_kernels::mla`]).

use half::f16;
use pio_kernels::attention::{KvCacheDtype, KvCacheType, KvElem, ANCHOR_BLOCK};

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
            .map(|i| match &c.mla {
                Some(m) => LayerCache::Latent { width: m.cache_width() },
                None => LayerCache::Attention {
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
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<f16>, v: Vec<f16> },
    Coded { k: Vec<u8>, v: Vec<u8>, anchors: Vec<u16> },
}

impl KvCache {
    /// Panics if `types` cannot store some layer ([`CacheSpec::check`]).
    pub fn new(spec: &CacheSpec, block_size: usize, num_blocks: usize, types: KvCacheType) -> KvCache {
        if let Err(e) = spec.check(types) {
            panic!("{e}");
        }
        let positions = num_blocks * block_size;
        let layers = spec
            .layers
            .iter()
            .map(|l| {
                // (values per position in k, in v; f16 anchor values per block)
                let (row, rows, has_v) = match *l {
                    LayerCache::Attention { num_kv_heads, head_dim, .. } => (head_dim, num_kv_heads, true),
                    LayerCache::Latent { width } => (width, 1, false),
                };
                let v_rows = if has_v { rows } else { 0 };
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
                        anchors: vec![0u16; if types.k.is_quantized() { num_blocks * rows * row } else { 0 }],
                    },
                }
            })
            .collect();
        KvCache { block_size, num_blocks, spec: spec.clone(), types, layers }
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
            })
            .sum()
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
            let cache = KvCache::new(&spec, 16, 3, types);
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
