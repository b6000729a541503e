//! A draft model as speculative proposer: a smaller model with the same vocabulary, beside the
//! target, with its own paged KV cache, run batched for every sequence that wants proposals.
//!
//! Each engine step, [`DraftModel::propose`] brings each sequence's draft cache up to the
//! sequence's committed tokens (the first time the whole prompt, later the one or two tokens
//! the target committed since; prompts are run in chunks of at most `max_batch_tokens` over
//! all sequences together), then decodes greedily one token at a time, all sequences in one
//! forward per token, up to each sequence's proposal length. What the target rejected is rolled
//! back by remembering which tokens the draft cache holds: the next call keeps the longest
//! common prefix of those and the sequence's tokens and overwrites the rest.
//!
//! The draft's proposals are verified by the target like any other (`crate::spec`), so the
//! output is the target's whatever the draft proposes; a better draft only makes it faster.

use std::collections::HashMap;
use std::path::Path;

use pio_model::tokenizer::Tokenizer;
use pio_model::{CausalLm, KvCache, KvCacheType, LoadOptions};

use crate::engine::EngineConfig;
use crate::kv_cache::{CachedPrefix, KvCacheManager, SeqId};
use crate::runner::{forward, SeqSlice};
use crate::sampler::argmax;
use crate::spec::{ProposalRequest, Propose};
use crate::{EngineError, Result};

/// A draft model with its cache, proposing for the sequences of one engine.
pub struct DraftModel<'m> {
    model: &'m dyn CausalLm,
    cache: KvCache,
    kv: KvCacheManager,
    /// Per sequence, the tokens whose keys and values the draft cache holds, in order.
    held: HashMap<SeqId, Vec<u32>>,
    max_batch_tokens: usize,
    vocab: usize,
}

impl<'m> DraftModel<'m> {
    /// A draft for `target` under the engine config `cfg`: its cache holds as many tokens as the
    /// target's (`cfg.num_blocks` blocks of `cfg.block_size`), in the target's KV cache type when
    /// the draft takes it, else in the draft's default.
    ///
    /// Errors: the vocabularies differ in size, or the draft keeps recurrent state or a sliding
    /// window (its proposals could not be rolled back by overwriting its cache).
    pub fn new(model: &'m dyn CausalLm, target: &dyn CausalLm, cfg: &EngineConfig) -> Result<DraftModel<'m>> {
        let (vocab, target_vocab) = (model.shape().vocab_size, target.shape().vocab_size);
        if vocab != target_vocab {
            return Err(EngineError::Invalid(format!(
                "the draft model's vocabulary has {vocab} tokens and the target's {target_vocab}: a draft model must \
                 share the target's tokenizer"
            )));
        }
        if model.cache_spec().has_state() {
            return Err(EngineError::Invalid(
                "the draft model keeps recurrent state (linear attention), which cannot be rolled back when a \
                 proposal is rejected: use a draft with attention layers only"
                    .into(),
            ));
        }
        if model.attention_window().is_some() {
            return Err(EngineError::Invalid(
                "the draft model has a sliding window on every layer: use a draft with full attention".into(),
            ));
        }
        let types = if model.check_kv_cache_type(cfg.kv_cache_type).is_ok() {
            cfg.kv_cache_type
        } else {
            KvCacheType::default()
        };
        Ok(DraftModel {
            model,
            cache: model.new_kv_cache_with(cfg.block_size, cfg.num_blocks, types, 0),
            kv: KvCacheManager::new(cfg.block_size, cfg.num_blocks, false),
            held: HashMap::new(),
            max_batch_tokens: cfg.max_batch_tokens.max(1),
            vocab,
        })
    }

    /// Bytes the draft's KV cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.nbytes()
    }

    /// Blocks for `total` tokens of `id`; when too few are free, the caches of sequences that
    /// want no proposals this step (waiting, preempted) are dropped first.
    fn reserve(&mut self, id: SeqId, total: usize, wanted: &[ProposalRequest<'_>]) -> bool {
        if self.kv.allocate(id, &CachedPrefix::default(), total) {
            return true;
        }
        let idle: Vec<SeqId> = self.held.keys().filter(|s| wanted.iter().all(|w| w.id != **s)).copied().collect();
        for s in idle {
            self.release(s);
        }
        self.kv.allocate(id, &CachedPrefix::default(), total)
    }
}

/// Loads the draft model at `path` with the target's load options (but no memory bound: a
/// draft is small, and streaming it from disk would cost more than it saves) and checks that
/// its tokenizer is the target's (`None`: the target runs token ids without a tokenizer; only
/// the vocabulary sizes are compared, by [`DraftModel::new`]).
pub fn load_draft(path: &Path, options: &LoadOptions, target: Option<&Tokenizer>) -> Result<Box<dyn CausalLm>> {
    let options = LoadOptions { max_memory: None, ..options.clone() };
    let loaded = pio_model::load_with(path, &options, &mut |_, _| {})?;
    match (target, &loaded.tokenizer) {
        (Some(target), Ok(t)) => check_tokenizers(target, t)?,
        (Some(_), Err(e)) => {
            return Err(EngineError::Invalid(format!(
                "the draft model {}: {e} (a draft must be checked against the target's tokenizer)",
                path.display()
            )))
        }
        (None, _) => {}
    }
    Ok(loaded.model)
}

/// A draft's tokenizer must give every token the id the target's gives it: the tokens of every
/// id both have are equal (one may have a few more special tokens at the end, as Qwen3's has
/// over Qwen2.5's).
pub fn check_tokenizers(target: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let (n, m) = (target.vocab_size(), draft.vocab_size());
    if n.abs_diff(m) > 128 {
        return Err(EngineError::Invalid(format!(
            "the draft's tokenizer has {m} tokens and the target's {n}: a draft must share the target's tokenizer"
        )));
    }
    for id in 0..n.min(m) as u32 {
        let (a, b) = (target.id_to_token(id), draft.id_to_token(id));
        if a != b {
            return Err(EngineError::Invalid(format!(
                "the draft's tokenizer differs from the target's at id {id} ({b:?} against {a:?}): a draft must \
                 share the target's tokenizer"
            )));
        }
    }
    Ok(())
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Propose for DraftModel<'_> {
    fn propose(&mut self, reqs: &[ProposalRequest<'_>]) -> Result<Vec<Vec<u32>>> {
        let mut out = vec![Vec::new(); reqs.len()];
        // (request, first token the draft cache lacks).
        let mut active: Vec<(usize, usize)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if r.max == 0 || r.tokens.is_empty() || r.tokens.iter().any(|&t| t as usize >= self.vocab) {
                continue;
            }
            // Keep what still matches (at least the last token runs again, for its logits).
            let held = self.held.entry(r.id).or_default();
            let keep = common_prefix(held, r.tokens).min(r.tokens.len() - 1);
            held.truncate(keep);
            // Room for the tokens and every proposal but the last (never run through the draft).
            if !self.reserve(r.id, r.tokens.len() + r.max - 1, reqs) {
                continue;
            }
            if let Some(held) = self.held.get_mut(&r.id) {
                held.extend_from_slice(&r.tokens[keep..]);
                active.push((i, keep));
            }
        }
        let DraftModel { model, cache, kv, held, max_batch_tokens, .. } = self;
        // Catch up with the committed tokens, in forwards of at most `max_batch_tokens`; the
        // chunk that reaches a sequence's last token gives its first proposal.
        let mut next: Vec<usize> = active.iter().map(|&(_, keep)| keep).collect();
        loop {
            let mut budget = *max_batch_tokens;
            let mut slices = Vec::new();
            let mut ran = Vec::new();
            for (a, &(i, _)) in active.iter().enumerate() {
                let tokens = held.get(&reqs[i].id).map_or(&[][..], |h| &h[..]);
                if next[a] >= tokens.len() || budget == 0 {
                    continue;
                }
                let n = (tokens.len() - next[a]).min(budget);
                budget -= n;
                slices.push(SeqSlice::text(tokens, next[a], n, tokens.len() - 1, kv.block_table(reqs[i].id)));
                ran.push((a, n));
            }
            if slices.is_empty() {
                break;
            }
            let rows = forward(*model, cache, &slices)?;
            drop(slices);
            for ((a, n), row) in ran.into_iter().zip(rows) {
                next[a] += n;
                if !row.is_empty() {
                    out[active[a].0].push(argmax(&row));
                }
            }
        }
        // Then one token at a time, every sequence that wants more in one forward.
        loop {
            let mut ran = Vec::new();
            for &(i, _) in &active {
                let (Some(&last), Some(h)) = (out[i].last(), held.get_mut(&reqs[i].id)) else { continue };
                if out[i].len() < reqs[i].max {
                    h.push(last);
                    ran.push(i);
                }
            }
            if ran.is_empty() {
                break;
            }
            let slices: Vec<SeqSlice<'_>> = ran
                .iter()
                .map(|&i| {
                    let tokens = held.get(&reqs[i].id).map_or(&[][..], |h| &h[..]);
                    let at = tokens.len().saturating_sub(1);
                    SeqSlice::text(tokens, at, 1, at, kv.block_table(reqs[i].id))
                })
                .collect();
            let rows = forward(*model, cache, &slices)?;
            drop(slices);
            for (i, row) in ran.into_iter().zip(rows) {
                out[i].push(argmax(&row));
            }
        }
        Ok(out)
    }

    fn release(&mut self, id: SeqId) {
        self.kv.free(id);
        self.held.remove(&id);
    }
}
