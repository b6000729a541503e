//! Turns sequences into a flat [`ForwardBatch`], runs the model, and keeps their cache blocks.

use pio_model::{CausalLm, ForwardBatch, KvCache};

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
        Runner { model, cache: model.new_kv_cache(block_size, num_blocks), pool: BlockPool::new(num_blocks) }
    }

    /// A runner with room for `num_tokens` tokens in blocks of 16.
    pub fn with_capacity(model: &'m dyn CausalLm, num_tokens: usize) -> Runner<'m> {
        const BLOCK_SIZE: usize = 16;
        Self::new(model, BLOCK_SIZE, num_tokens.div_ceil(BLOCK_SIZE).max(1))
    }

    pub fn model(&self) -> &'m dyn CausalLm {
        self.model
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
        let mut batch = ForwardBatch::default();
        let mut rows_per_seq = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let start = s.num_computed_tokens;
            for (pos, &id) in s.token_ids.iter().enumerate().skip(start) {
                batch.token_ids.push(id);
                batch.positions.push(pos);
                batch.seq_indices.push(i);
                batch.slot_mapping.push(s.block_table[pos / bs] as usize * bs + pos % bs);
            }
            let end = batch.token_ids.len();
            let new = s.token_ids.len().saturating_sub(start);
            let first = match logits {
                Logits::Last => end - new.min(1),
                Logits::All => end - new,
                Logits::From(p) => end - new + p.saturating_sub(start).min(new),
            };
            let rows = first..end;
            rows_per_seq.push(rows.len());
            batch.logits_indices.extend(rows);
            batch.block_tables.push(s.block_table.clone());
        }
        let out = self.model.forward(&batch, &mut self.cache)?;
        for s in seqs.iter_mut() {
            s.num_computed_tokens = s.token_ids.len();
        }
        let vocab = self.model.shape().vocab_size;
        let mut result = Vec::with_capacity(seqs.len());
        let mut off = 0;
        for rows in rows_per_seq {
            result.push(out[off * vocab..(off + rows) * vocab].to_vec());
            off += rows;
        }
        Ok(result)
    }

    /// Gives a finished sequence's blocks back.
    pub fn release(&mut self, seq: &mut Sequence) {
        self.pool.release(seq.block_table.drain(..));
        seq.num_computed_tokens = 0;
    }
}
