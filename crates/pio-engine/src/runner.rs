//! Turns sequences into a flat [`ForwardBatch`], runs the model, and keeps their cache blocks.

use pio_model::{CausalLm, ForwardBatch, KvCache, KvCacheType};

use crate::block_pool::BlockPool;
use crate::{EngineError, Result};

/// One sequence's tokens and how far the cache has caught up with them.
#[derive(Debug, Clone, Default)]
pub struct Sequence {
    /// Prompt followed by generated tokens.
    pub token_ids: Vec<u32>,
    /// Tokens whose K/V are in the cache; the next forward runs `token_ids[num_computed_tokens..]`.
    pub num_computed_tokens: usize,
    /// Cache blocks holding this sequence, in position order.
    pub block_table: Vec<u32>,
}

impl Sequence {
    pub fn new(token_ids: Vec<u32>) -> Sequence {
        Sequence { token_ids, ..Default::default() }
    }
}

/// Which logits a step returns for each sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's row (sampling the next token).
    Last,
    /// Every token run in this step (teacher forcing, parity checks).
    All,
    /// The tokens run in this step at positions `>= p` (perplexity scores a chunk's second half).
    From(usize),
}

/// Owns the paged KV cache and its block pool for one model.
pub struct Runner<'m> {
    model: &'m dyn CausalLm,
    cache: KvCache,
    pool: BlockPool,
}

impl<'m> Runner<'m> {
    /// A runner whose cache holds `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: &'m dyn CausalLm, block_size: usize, num_blocks: usize) -> Runner<'m> {
        Self::with_dtype(model, block_size, num_blocks, KvCacheType::default())
    }

    /// [`new`](Self::new) with the cache's element type.
    pub fn with_dtype(model: &'m dyn CausalLm, block_size: usize, num_blocks: usize, dtype: KvCacheType) -> Runner<'m> {
        Runner {
            model,
            cache: model.new_kv_cache_with(block_size, num_blocks, dtype),
            pool: BlockPool::new(num_blocks),
        }
    }

    /// A runner with room for `num_tokens` tokens in blocks of 16.
    pub fn with_capacity(model: &'m dyn CausalLm, num_tokens: usize) -> Runner<'m> {
        Self::with_capacity_dtype(model, num_tokens, KvCacheType::default())
    }

    /// [`with_capacity`](Self::with_capacity) with the cache's element type.
    pub fn with_capacity_dtype(model: &'m dyn CausalLm, num_tokens: usize, dtype: KvCacheType) -> Runner<'m> {
        const BLOCK_SIZE: usize = 16;
        Self::with_dtype(model, BLOCK_SIZE, num_tokens.div_ceil(BLOCK_SIZE).max(1), dtype)
    }

    pub fn model(&self) -> &'m dyn CausalLm {
        self.model
    }

    /// The cache, for an [`crate::engine::Engine`] to run over.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    pub fn cache_bytes(&self) -> usize {
        self.cache.nbytes()
    }

    /// Runs every uncomputed token of every sequence in ONE forward and returns the requested
    /// logits, per sequence: `[rows, vocab]` flattened.
    pub fn step(&mut self, seqs: &mut [&mut Sequence], logits: Logits) -> Result<Vec<Vec<f32>>> {
        let bs = self.cache.block_size;
        // Blocks first, so a failure leaves every sequence as it was.
        let need: usize = seqs.iter().map(|s| s.token_ids.len().div_ceil(bs).saturating_sub(s.block_table.len())).sum();
        if need > self.pool.num_free() {
            return Err(EngineError::OutOfCache { needed: need, free: self.pool.num_free() });
        }
        for s in seqs.iter_mut() {
            let n = s.token_ids.len().div_ceil(bs).saturating_sub(s.block_table.len());
            let blocks = self.pool.allocate(n).ok_or(EngineError::OutOfCache { needed: n, free: 0 })?;
            s.block_table.extend(blocks);
        }
        let slices: Vec<SeqSlice<'_>> = seqs
            .iter()
            .map(|s| SeqSlice {
                token_ids: &s.token_ids,
                start: s.num_computed_tokens,
                num_tokens: s.token_ids.len().saturating_sub(s.num_computed_tokens),
                block_table: &s.block_table,
                logits,
            })
            .collect();
        let out = forward(self.model, &mut self.cache, &slices)?;
        for s in seqs.iter_mut() {
            s.num_computed_tokens = s.token_ids.len();
        }
        Ok(out)
    }

    /// Gives a finished sequence's blocks back.
    pub fn release(&mut self, seq: &mut Sequence) {
        self.pool.free(seq.block_table.drain(..).rev());
        seq.num_computed_tokens = 0;
    }
}

/// Tokens `start..start + num_tokens` of one sequence, to run in a batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqSlice<'a> {
    pub token_ids: &'a [u32],
    pub start: usize,
    pub num_tokens: usize,
    /// The sequence's blocks, covering at least `start + num_tokens` positions.
    pub block_table: &'a [u32],
    pub logits: Logits,
}

/// Runs the slices of several sequences as ONE flat batch over `cache` and returns each one's
/// requested logits (`[rows, vocab]` flattened; `Logits::Last` gives the row of the slice's
/// last token).
pub fn forward(model: &dyn CausalLm, cache: &mut KvCache, slices: &[SeqSlice<'_>]) -> Result<Vec<Vec<f32>>> {
    let bs = cache.block_size;
    let mut batch = ForwardBatch::default();
    let mut rows_per_seq = Vec::with_capacity(slices.len());
    for (i, s) in slices.iter().enumerate() {
        let end_pos = s.start + s.num_tokens;
        if end_pos > s.token_ids.len() || end_pos > s.block_table.len() * bs {
            return Err(EngineError::Invalid(format!(
                "slice {}..{end_pos} runs past its {} tokens or {} blocks",
                s.start,
                s.token_ids.len(),
                s.block_table.len()
            )));
        }
        for pos in s.start..end_pos {
            batch.token_ids.push(s.token_ids[pos]);
            batch.positions.push(pos);
            batch.seq_indices.push(i);
            batch.slot_mapping.push(s.block_table[pos / bs] as usize * bs + pos % bs);
        }
        let end = batch.token_ids.len();
        let new = s.num_tokens;
        let first = match s.logits {
            Logits::Last => end - new.min(1),
            Logits::All => end - new,
            Logits::From(p) => end - new + p.saturating_sub(s.start).min(new),
        };
        let rows = first..end;
        rows_per_seq.push(rows.len());
        batch.logits_indices.extend(rows);
        batch.block_tables.push(s.block_table.to_vec());
    }
    let out = model.forward(&batch, cache)?;
    let vocab = model.shape().vocab_size;
    let mut result = Vec::with_capacity(slices.len());
    let mut off = 0;
    for rows in rows_per_seq {
        result.push(out[off * vocab..(off + rows) * vocab].to_vec());
        off += rows;
    }
    Ok(result)
}
