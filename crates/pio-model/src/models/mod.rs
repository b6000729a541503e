//! Model families. Each file is the math of one family over the shared layers.

pub mod decoder;

use pio_kernels::attention::KvCacheDtype;

use crate::batch::ForwardBatch;
use crate::layers::{KvCache, MoeStats};
use crate::Result;

/// What the engine needs to know to size a cache and drive a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub vocab_size: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
}

/// A causal language model: token batch in, logits out.
pub trait CausalLm: Send + Sync {
    fn shape(&self) -> ModelShape;

    /// Runs `batch` through the model, writing its K/V into `cache`, and returns
    /// `[batch.logits_indices.len(), vocab_size]` logits.
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Vec<f32>>;

    /// A cache of `num_blocks` blocks of `block_size` tokens shaped for this model, in the
    /// default element type (f16).
    fn new_kv_cache(&self, block_size: usize, num_blocks: usize) -> KvCache {
        self.new_kv_cache_with(block_size, num_blocks, KvCacheDtype::default())
    }

    /// Bytes one token's keys and values take across all layers, stored as `dtype`.
    fn kv_bytes_per_token(&self, dtype: KvCacheDtype) -> usize {
        let s = self.shape();
        KvCache::bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim, dtype)
    }

    /// What the mixture-of-experts layers did since load (`None`: the model has none).
    fn moe_stats(&self) -> Option<MoeStats> {
        None
    }

    /// As [`CausalLm::new_kv_cache`], storing keys and values as `dtype`.
    fn new_kv_cache_with(&self, block_size: usize, num_blocks: usize, dtype: KvCacheDtype) -> KvCache {
        let s = self.shape();
        KvCache::new(s.num_layers, s.num_kv_heads, s.head_dim, block_size, num_blocks, dtype)
    }
}
