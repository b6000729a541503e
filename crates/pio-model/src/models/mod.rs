//! Model families. Each file is the math of one family over the shared layers.

pub mod decoder;
pub mod vision;

use pio_kernels::attention::KvCacheType;

use crate::batch::ForwardBatch;
use crate::layers::{CacheSpec, ExpertCacheStats, KvCache, MoeStats};
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
    /// default element type (f16), with one state slot where the model keeps recurrent state.
    fn new_kv_cache(&self, block_size: usize, num_blocks: usize) -> KvCache {
        self.new_kv_cache_with(block_size, num_blocks, KvCacheType::default(), 1)
    }

    /// What each layer keeps in the cache.
    fn cache_spec(&self) -> &CacheSpec;

    /// As [`forward`](Self::forward), also returning every batch token's final hidden state
    /// (after the final norm, `[num_tokens, hidden]`), which a multi-token-prediction module
    /// takes.
    fn forward_with_hidden(&self, _batch: &ForwardBatch, _cache: &mut KvCache) -> Result<(Vec<f32>, Vec<f32>)> {
        Err(crate::Error::Config("this model does not give its hidden states".into()))
    }

    /// What its multi-token-prediction module keeps in its own cache (one layer), when the
    /// module is loaded ([`crate::LoadOptions::mtp`]): GLM-4.7-Flash's `nextn` layer. From the
    /// target's final hidden state at position `i` and the token at `i + 1` it predicts the
    /// token at `i + 2` through one decoder layer; chained on its own hidden output it proposes
    /// further tokens (speculative decoding, as vLLM's MTP).
    fn mtp_cache_spec(&self) -> Option<&CacheSpec> {
        None
    }

    /// Runs the multi-token-prediction module over `batch`, whose token `j` is the token after
    /// the position of `hidden` row `j` and runs at that position (its K/V go to `cache`, made
    /// from [`mtp_cache_spec`](Self::mtp_cache_spec)); returns the logits of
    /// `batch.logits_indices` and those rows' hidden states (to chain on).
    fn mtp_forward(
        &self,
        _batch: &ForwardBatch,
        _hidden: &[f32],
        _cache: &mut KvCache,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Err(crate::Error::Config("this model has no multi-token-prediction module loaded".into()))
    }

    /// Bytes one token's keys and values take across all layers, stored as `types`.
    fn kv_bytes_per_token(&self, types: KvCacheType) -> usize {
        self.cache_spec().bytes_per_token(types)
    }

    /// Whether this model's cache can be stored as `types`: an error naming the option if not.
    fn check_kv_cache_type(&self, types: KvCacheType) -> std::result::Result<(), String> {
        self.cache_spec().check(types)
    }

    /// How far back any layer attends: `Some(w)` when every layer has a sliding window (the
    /// largest), so positions more than `w` behind the newest are never read again; `None`
    /// when some layer sees the whole context.
    fn attention_window(&self) -> Option<usize> {
        self.cache_spec().window()
    }

    /// Whether [`CausalLm::shift_positions`] works for this model.
    fn can_shift_positions(&self) -> bool {
        false
    }

    /// Moves the cached keys in `blocks` back by `delta` positions: every layer's rotary keys
    /// are re-rotated for their new positions (what a streaming window does after dropping
    /// `delta` tokens before them, as llama.cpp's context shift). Nothing else changes.
    fn shift_positions(&self, _cache: &mut KvCache, _blocks: &[u32], _delta: usize) -> Result<()> {
        Err(crate::Error::Batch("this model cannot shift cached positions".into()))
    }

    /// The vision tower of a vision-language model (`None`: the model takes text only).
    fn vision(&self) -> Option<&vision::VisionEncoder> {
        None
    }

    /// What the mixture-of-experts layers did since load (`None`: the model has none).
    fn moe_stats(&self) -> Option<MoeStats> {
        None
    }

    /// What the expert cache did since load (`None`: the experts do not stream from disk).
    fn expert_cache_stats(&self) -> Option<ExpertCacheStats> {
        None
    }

    /// Benchmarks of the expert cache only: each mixture layer draws its tokens' experts from a
    /// Zipf law with exponent `zipf` (0: uniform) over its own shuffled ranking, instead of
    /// asking its router (so the outputs are no longer the model's); `None` restores the
    /// routers. Returns whether the model has mixture layers.
    fn set_synthetic_routing(&mut self, _zipf: Option<f64>) -> bool {
        false
    }

    /// The disk read bandwidth the expert cache gets, bytes/s (see
    /// [`crate::layers::ExpertCache::probe_read_bandwidth`]); `None` without one.
    fn probe_disk_bandwidth(&self) -> Option<f64> {
        None
    }

    /// As [`CausalLm::new_kv_cache`], storing keys and values as `types` (which
    /// [`CausalLm::check_kv_cache_type`] accepts; panics otherwise), with `state_slots`
    /// per-sequence states (where the model has recurrent layers).
    fn new_kv_cache_with(
        &self,
        block_size: usize,
        num_blocks: usize,
        types: KvCacheType,
        state_slots: usize,
    ) -> KvCache {
        KvCache::new(self.cache_spec(), block_size, num_blocks, types, state_slots)
    }
}
