//! Speculative decoding: proposals verified by the target model in one forward.
//!
//! Decode reads every weight once per step whether the step computes one position or a few,
//! so a sequence that carries `k` proposed tokens beside its last committed one gets the target
//! model's logits for all `k + 1` positions for about the price of one. The engine then samples
//! each position in order, exactly as it would have without proposals, and keeps the proposed
//! tokens while they equal what it sampled; the first sampled token that differs (or the one
//! after the last proposal) is committed too, and the rest of the step's positions are thrown
//! away (their KV slots are overwritten later).
//!
//! For proposals that are single tokens (n-gram lookup), sampling each position from the
//! target's distribution and accepting while it matches is the standard rejection rule: a
//! proposal `x` is kept with probability `p(x)`, and on rejection the token comes from `p`
//! without `x`. Since the sampler draws once per committed position in the same order either
//! way, outputs (greedy or seeded) are the same tokens as without speculation, as long as the
//! forward gives the same logits for a position computed beside others, which the kernels
//! guarantee (batch invariance).
//!
//! Proposers: [`ngram_propose`] (prompt lookup: the continuation of the latest earlier
//! occurrence of the sequence's last `n` tokens), a draft model ([`crate::draft::DraftModel`]),
//! or anything else that implements [`Propose`]. [`Adaptive`] shrinks a sequence's proposal
//! length while proposals are rejected, down to none for a while, so speculation costs little
//! where it does not hit.

use std::fmt;
use std::str::FromStr;

use crate::kv_cache::SeqId;
use crate::Result;

/// What proposes tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecMethod {
    /// Prompt lookup: match the last tokens against the prompt and the output so far.
    Ngram,
    /// A smaller model with the same vocabulary, decoding greedily ahead of the target.
    Draft,
    /// The model's own multi-token-prediction layer (GLM-4.7-Flash).
    Mtp,
}

impl FromStr for SpecMethod {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<SpecMethod, String> {
        match s {
            "ngram" => Ok(SpecMethod::Ngram),
            "draft" | "draft_model" => Ok(SpecMethod::Draft),
            "mtp" => Ok(SpecMethod::Mtp),
            _ => Err(format!("unknown speculation method {s:?} (available: ngram, draft, mtp)")),
        }
    }
}

impl fmt::Display for SpecMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpecMethod::Ngram => "ngram",
            SpecMethod::Draft => "draft",
            SpecMethod::Mtp => "mtp",
        })
    }
}

/// Speculative decoding settings of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecConfig {
    pub method: SpecMethod,
    /// Most tokens proposed per sequence per step.
    pub num_tokens: usize,
    /// Longest suffix matched by the n-gram proposer (it tries shorter ones down to `ngram_min`).
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl SpecConfig {
    /// N-gram lookup proposing up to `num_tokens` tokens, matching suffixes of `ngram_max`
    /// tokens down to `ngram_min`.
    pub fn ngram(num_tokens: usize, ngram_max: usize, ngram_min: usize) -> SpecConfig {
        let ngram_min = ngram_min.max(1);
        SpecConfig { method: SpecMethod::Ngram, num_tokens, ngram_max: ngram_max.max(ngram_min), ngram_min }
    }

    /// A draft model proposing up to `num_tokens` tokens (the engine is built with
    /// [`crate::engine::Engine::with_draft`]).
    pub fn draft(num_tokens: usize) -> SpecConfig {
        SpecConfig { method: SpecMethod::Draft, num_tokens, ngram_max: 0, ngram_min: 0 }
    }

    /// The model's multi-token-prediction layer proposing up to `num_tokens` tokens (the model
    /// loaded with [`pio_model::LoadOptions::mtp`]).
    pub fn mtp(num_tokens: usize) -> SpecConfig {
        SpecConfig { method: SpecMethod::Mtp, num_tokens, ngram_max: 0, ngram_min: 0 }
    }
}

/// One sequence asking for proposals.
#[derive(Debug, Clone, Copy)]
pub struct ProposalRequest<'a> {
    pub id: SeqId,
    /// Its tokens: prompt and output so far.
    pub tokens: &'a [u32],
    /// The most tokens wanted.
    pub max: usize,
}

/// What proposes tokens for speculative decoding, for all sequences of a step at once.
pub trait Propose: Send {
    /// Up to `max` tokens to follow each request's tokens (fewer, or none, are fine).
    fn propose(&mut self, reqs: &[ProposalRequest<'_>]) -> Result<Vec<Vec<u32>>>;

    /// The sequence `id` is gone: drop what is kept for it.
    fn release(&mut self, _id: SeqId) {}

    /// Whether it takes the target's final hidden states ([`observe`](Self::observe)).
    fn wants_hidden(&self) -> bool {
        false
    }

    /// The target's final hidden states (rows of `width`) of `id`'s committed positions
    /// `first..`, as a forward computed them.
    fn observe(&mut self, _id: SeqId, _first: usize, _hidden: &[f32], _width: usize) {}
}

/// A function of (sequence id, tokens, most wanted) proposes for one sequence at a time.
impl<F: FnMut(SeqId, &[u32], usize) -> Vec<u32> + Send> Propose for F {
    fn propose(&mut self, reqs: &[ProposalRequest<'_>]) -> Result<Vec<Vec<u32>>> {
        Ok(reqs.iter().map(|r| self(r.id, r.tokens, r.max)).collect())
    }
}

/// Up to `k` tokens proposed to follow `tokens`: for `n` from `n_max` down to `n_min`, the
/// tokens that followed the latest earlier occurrence of the last `n` tokens (vLLM's `ngram`,
/// llama.cpp's prompt lookup). Empty when nothing matches.
pub fn ngram_propose(tokens: &[u32], n_max: usize, n_min: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (n_min.max(1)..=n_max).rev() {
        if n >= len {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Latest occurrence that ends before the suffix itself, so something follows it.
        for start in (0..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                let to = (from + k).min(len);
                return tokens[from..to].to_vec();
            }
        }
    }
    Vec::new()
}

/// A sequence's proposal length, adapted to how its proposals fare: halved when a step
/// accepts none, doubled (up to the configured most) when a step accepts all. At zero the
/// sequence proposes nothing for a pause, then tries one token; each failed try doubles the
/// pause (from [`Adaptive::PAUSE`] up to [`Adaptive::MAX_PAUSE`] steps), and any accepted token
/// resets it. So text that proposals rarely match pays for a failed verification at most every
/// `MAX_PAUSE` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptive {
    k: usize,
    paused: usize,
    pause: usize,
}

impl Adaptive {
    /// The first pause after the length fell to zero. On the code-editing prompts of
    /// `crates/pio-cli/tests/data/spec/` (Qwen2.5-Coder-0.5B Q4_K_M, 2 threads, AVX2) 4 steps
    /// decoded faster than 16 (1.81x against 1.60x plain decode, median of five).
    pub const PAUSE: usize = 4;
    /// The longest pause.
    pub const MAX_PAUSE: usize = 64;

    /// The first proposal's length (at most the configured most): a sequence earns longer ones
    /// by having all of them accepted. Starting at the most (8), a short answer that proposals
    /// rarely match paid for a few long failed verifications: SmolLM2-135M Q4_1, the
    /// `--open-ended` prompts of `scripts/bench-spec.py`, worst prompt 0.96x plain decode,
    /// 1.01x from 2; the code-editing prompts (Qwen2.5-Coder-0.5B Q4_K_M, AVX-512) 2.78x and
    /// 2.68x, per prompt either way (medians of 3 rounds each).
    pub const START: usize = 2;

    pub fn new(max: usize) -> Adaptive {
        Adaptive { k: max.min(Self::START), paused: 0, pause: Self::PAUSE }
    }

    /// Tokens to propose this step (counts a paused step).
    pub fn take_len(&mut self) -> usize {
        if self.k == 0 {
            self.paused += 1;
            if self.paused >= self.pause {
                self.paused = 0;
                self.k = 1;
            }
            return 0;
        }
        self.k
    }

    /// Records a verified proposal of `proposed` tokens of which the first `accepted` held.
    pub fn update(&mut self, proposed: usize, accepted: usize, max: usize) {
        if proposed == 0 {
            return;
        }
        if accepted == 0 {
            if self.k == 1 {
                // A failed try after a pause (or a run of failures down to one token).
                self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
            }
            self.k /= 2;
        } else {
            self.pause = Self::PAUSE;
            if accepted == proposed {
                self.k = (self.k * 2).clamp(1, max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_what_followed_the_latest_match_of_the_longest_suffix() {
        // ... 1 2 3 [4 5 6] ... 9 2 3 [7 8] ... 1 2 3 -> the 3-gram matches at the start.
        let t = [1, 2, 3, 4, 5, 6, 9, 2, 3, 7, 8, 1, 2, 3];
        assert_eq!(ngram_propose(&t, 3, 1, 2), vec![4, 5]);
        // With bigrams only, the latest "2 3" is followed by 7 8.
        assert_eq!(ngram_propose(&t, 2, 1, 4), vec![7, 8, 1, 2]);
        // The continuation stops at the end of the sequence.
        assert_eq!(ngram_propose(&[5, 6, 5], 1, 1, 4), vec![6, 5]);
        assert!(ngram_propose(&[1, 2, 3], 3, 1, 4).is_empty());
        assert!(ngram_propose(&t, 3, 1, 0).is_empty());
        assert!(ngram_propose(&[], 3, 1, 4).is_empty());
    }

    #[test]
    fn adaptive_length_shrinks_to_a_growing_pause_and_recovers() {
        // Starting short, and growing on proposals accepted whole, up to the most.
        assert_eq!(Adaptive::new(1).take_len(), 1);
        let mut a = Adaptive::new(4);
        assert_eq!(a.take_len(), Adaptive::START);
        a.update(2, 2, 4);
        assert_eq!(a.take_len(), 4);
        a.update(4, 4, 4);
        assert_eq!(a.take_len(), 4);
        a.update(4, 0, 4);
        assert_eq!(a.take_len(), 2);
        a.update(2, 0, 4);
        a.update(1, 0, 4);
        assert_eq!(a.k, 0);
        // Paused: nothing for `PAUSE * 2` steps (the failure at one token doubled it), then one.
        for _ in 0..Adaptive::PAUSE * 2 {
            assert_eq!(a.take_len(), 0);
        }
        assert_eq!(a.take_len(), 1);
        a.update(1, 0, 4);
        let waited = std::iter::from_fn(|| Some(a.take_len())).take_while(|&k| k == 0).count();
        assert_eq!(waited, Adaptive::PAUSE * 4);
        // Success resets the pause and grows the length back.
        a.update(1, 1, 4);
        assert_eq!(a.pause, Adaptive::PAUSE);
        a.update(2, 2, 4);
        assert_eq!(a.take_len(), 4);
        a.update(4, 2, 4);
        assert_eq!(a.take_len(), 4);
        // The pause stops growing.
        for _ in 0..10 {
            a.k = 1;
            a.update(1, 0, 4);
        }
        assert_eq!(a.pause, Adaptive::MAX_PAUSE);
    }

    #[test]
    fn methods_parse() {
        assert_eq!("ngram".parse::<SpecMethod>(), Ok(SpecMethod::Ngram));
        assert_eq!("draft".parse::<SpecMethod>(), Ok(SpecMethod::Draft));
        assert_eq!("mtp".parse::<SpecMethod>(), Ok(SpecMethod::Mtp));
        assert!("foo".parse::<SpecMethod>().is_err());
    }
}
