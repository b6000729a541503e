//! The model's own multi-token-prediction layer as speculative proposer (GLM-4.7-Flash's
//! `nextn` layer; vLLM's `method: "mtp"`).
//!
//! The MTP layer's entry at position `i` is computed from the target's final hidden state at
//! `i` and the token at `i + 1`, and predicts the token at `i + 2`; it attends over its own
//! earlier entries, kept in a paged cache of its own. The engine hands this proposer the
//! target's hidden states of every committed position as the forwards compute them
//! ([`Propose::observe`]). Each step, for a sequence of `n` committed tokens the layer catches
//! up to entry `n - 2` (whose prediction is the first proposal), then chains on its own hidden
//! output: the entry at `n - 2 + j` takes the layer's hidden state of the entry before and
//! proposal `j`, and gives proposal `j + 1`. Chained entries are recomputed from the target's
//! hidden states once those exist, so nothing needs rolling back.
//!
//! A prompt position served from the prefix cache has no hidden state, so the engine runs the
//! MTP layer with the prefix cache off.

use std::collections::HashMap;

use pio_model::{CausalLm, KvCache};

use crate::engine::EngineConfig;
use crate::kv_cache::{CachedPrefix, KvCacheManager, SeqId};
use crate::runner::{forward_mtp, SeqSlice};
use crate::sampler::argmax;
use crate::spec::{ProposalRequest, Propose};
use crate::{EngineError, Result};

/// What the proposer keeps per sequence.
#[derive(Debug, Default)]
struct MtpSeq {
    /// Entries `0..valid` are computed from the target's hidden states.
    valid: usize,
    /// The target's hidden states of positions `first..first + rows` not yet run.
    first: usize,
    pending: Vec<f32>,
}

/// A model's MTP layer with its cache, proposing for the sequences of one engine.
pub struct MtpProposer<'m> {
    model: &'m dyn CausalLm,
    cache: KvCache,
    kv: KvCacheManager,
    seqs: HashMap<SeqId, MtpSeq>,
    max_batch_tokens: usize,
    /// Width of the hidden states (known from the first ones observed).
    width: usize,
}

impl<'m> MtpProposer<'m> {
    /// The MTP layer of `model` (loaded with [`pio_model::LoadOptions::mtp`]), with a cache of
    /// as many positions as the engine's.
    pub fn new(model: &'m dyn CausalLm, cfg: &EngineConfig) -> Result<MtpProposer<'m>> {
        let spec = model.mtp_cache_spec().ok_or_else(|| {
            EngineError::Invalid(
                "speculation by MTP needs the model's multi-token-prediction layer, which is not loaded (load \
                 options: mtp)"
                    .into(),
            )
        })?;
        if cfg.prefix_caching {
            return Err(EngineError::Invalid(
                "speculation by MTP needs the prefix cache off: the MTP layer takes the hidden state of every \
                 prompt position"
                    .into(),
            ));
        }
        let cache = KvCache::new(spec, cfg.block_size, cfg.num_blocks, cfg.kv_cache_type, 0);
        Ok(MtpProposer {
            model,
            cache,
            kv: KvCacheManager::new(cfg.block_size, cfg.num_blocks, false),
            seqs: HashMap::new(),
            max_batch_tokens: cfg.max_batch_tokens.max(1),
            width: 0,
        })
    }

    /// Bytes the MTP layer's cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.nbytes()
    }
}

impl Propose for MtpProposer<'_> {
    fn wants_hidden(&self) -> bool {
        true
    }

    fn observe(&mut self, id: SeqId, first: usize, hidden: &[f32], width: usize) {
        if hidden.is_empty() || width == 0 {
            return;
        }
        self.width = width;
        let s = self.seqs.entry(id).or_default();
        let end = s.first + s.pending.len() / width.max(1);
        if s.pending.is_empty() || first != end {
            // A recomputation (preemption) starts over; a gap can only be bridged by one.
            s.first = first;
            s.pending.clear();
        }
        s.pending.extend_from_slice(hidden);
        // Rows of entries already computed are not needed.
        if width > 0 && s.valid > s.first {
            let drop = (s.valid - s.first).min(s.pending.len() / width);
            s.pending.drain(..drop * width);
            s.first += drop;
        }
    }

    fn propose(&mut self, reqs: &[ProposalRequest<'_>]) -> Result<Vec<Vec<u32>>> {
        let mut out = vec![Vec::new(); reqs.len()];
        let h = self.width;
        if h == 0 {
            return Ok(out);
        }
        // Each sequence's tokens shifted by one (the MTP entry at `i` takes the token at
        // `i + 1`), and where its catch-up starts.
        let mut shifted: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
        let mut active = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let n = r.tokens.len();
            let Some(s) = self.seqs.get(&r.id) else { continue };
            // Entries up to n - 2 need the hidden states of positions valid..=n-2.
            let have = s.first + s.pending.len() / h;
            if r.max == 0 || n < 2 || s.first > s.valid.min(n - 2) || have < n - 1 {
                continue;
            }
            if !self.kv.allocate(r.id, &CachedPrefix::default(), n - 2 + r.max) {
                continue;
            }
            shifted[i] = r.tokens[1..].to_vec();
            active.push(i);
        }
        // Catch up to entry n - 2, in forwards of at most `max_batch_tokens`; the chunk that
        // reaches it gives the first proposal and the hidden state to chain on.
        let mut chain: Vec<Vec<f32>> = vec![Vec::new(); reqs.len()];
        let mut next: Vec<usize> = active.iter().map(|&i| self.seqs.get(&reqs[i].id).map_or(0, |s| s.valid)).collect();
        loop {
            let mut budget = self.max_batch_tokens;
            let (mut slices, mut hidden, mut ran) = (Vec::new(), Vec::new(), Vec::new());
            for (a, &i) in active.iter().enumerate() {
                let end = reqs[i].tokens.len() - 1;
                if next[a] >= end || budget == 0 {
                    continue;
                }
                let Some(s) = self.seqs.get(&reqs[i].id) else { continue };
                let take = (end - next[a]).min(budget);
                budget -= take;
                let from = (next[a] - s.first) * h;
                hidden.extend_from_slice(&s.pending[from..from + take * h]);
                slices.push(SeqSlice::text(&shifted[i], next[a], take, end - 1, self.kv.block_table(reqs[i].id)));
                ran.push((a, take));
            }
            if slices.is_empty() {
                break;
            }
            let (rows, hid) = forward_mtp(self.model, &mut self.cache, &slices, &hidden)?;
            drop(slices);
            for (((a, take), row), hrow) in ran.into_iter().zip(rows).zip(hid) {
                next[a] += take;
                if !row.is_empty() {
                    out[active[a]].push(argmax(&row));
                    chain[active[a]] = hrow;
                }
            }
        }
        for &i in &active {
            if let Some(s) = self.seqs.get_mut(&reqs[i].id) {
                s.valid = reqs[i].tokens.len() - 1;
            }
        }
        // Then chained, one entry per sequence per forward.
        loop {
            let mut ran = Vec::new();
            let mut hidden = Vec::new();
            for &i in &active {
                let Some(&last) = out[i].last() else { continue };
                if out[i].len() < reqs[i].max && chain[i].len() == h {
                    shifted[i].push(last);
                    hidden.extend_from_slice(&chain[i]);
                    ran.push(i);
                }
            }
            if ran.is_empty() {
                break;
            }
            let slices: Vec<SeqSlice<'_>> = ran
                .iter()
                .map(|&i| {
                    let at = shifted[i].len() - 1;
                    SeqSlice::text(&shifted[i], at, 1, at, self.kv.block_table(reqs[i].id))
                })
                .collect();
            let (rows, hid) = forward_mtp(self.model, &mut self.cache, &slices, &hidden)?;
            drop(slices);
            for ((i, row), hrow) in ran.into_iter().zip(rows).zip(hid) {
                out[i].push(argmax(&row));
                chain[i] = hrow;
            }
        }
        Ok(out)
    }

    fn release(&mut self, id: SeqId) {
        self.kv.free(id);
        self.seqs.remove(&id);
    }
}
