//! Which tokens of which sequences run in the next forward.
//!
//! There are no prefill and decode phases. Each sequence has `token_ids` (prompt, then generated
//! tokens) and `num_computed_tokens` (those whose K/V are in the cache); a step runs some of the
//! rest. Each step fills a token budget: first the running sequences that are decoding (one
//! token each), then running sequences part-way through their prompt, then waiting sequences in
//! arrival order (a prompt larger than what is left of the budget runs in chunks over several
//! steps: chunked prefill). A waiting sequence starts after its longest cached prefix. When the
//! cache runs out of blocks, the most recently admitted running sequence is preempted: its
//! blocks are freed and it goes back to the front of the queue, to be recomputed later (its
//! prefix blocks usually still cached).
//!
//! Pure bookkeeping: no tensors, no model.

use std::collections::{HashMap, VecDeque};

use crate::kv_cache::{CachedPrefix, ImageSpan, KvCacheManager, SeqId};

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one forward.
    pub max_batch_tokens: usize,
    /// The model's attention reach ([`pio_model::CausalLm::attention_window`]): blocks wholly
    /// behind it are returned to the pool as a sequence advances.
    pub window: Option<usize>,
}

/// A streaming window (attention sinks, StreamingLLM): the sequence keeps its first
/// `sink_blocks` blocks and its most recent tokens, `window_blocks` blocks in all. When they are
/// full, the oldest `drop_blocks` blocks after the sinks go back to the pool and the positions
/// after them close up: the cache positions of the kept tokens drop by `drop_blocks` blocks, and
/// their keys are re-rotated for it (the [`StepPlan::shifts`]). Prefix caching is off for such a
/// sequence (its blocks change after they are written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streaming {
    pub sink_blocks: usize,
    pub window_blocks: usize,
    pub drop_blocks: usize,
}

/// Keys to re-rotate before the step's forward: `id`'s blocks from `first_block` on (of its
/// table after the drop) moved back by `delta` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyShift {
    pub id: SeqId,
    pub first_block: usize,
    pub delta: usize,
}

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt followed by generated tokens.
    pub token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed_tokens: usize,
    /// Times this sequence was preempted.
    pub num_preemptions: usize,
    /// Prompt tokens that came from the prefix cache at its (last) admission.
    pub num_cached_tokens: usize,
    /// Positions from here on are computed, never taken from the prefix cache (their logits
    /// are wanted).
    pub logits_from: Option<usize>,
    pub streaming: Option<Streaming>,
    /// Tokens dropped from the middle of a streaming sequence's cache: a token at position `p`
    /// past the dropped ones sits at cache position `p - shift` (and is rotated for it).
    pub shift: usize,
    /// The runs of image placeholders in the prompt (vision-language models).
    pub images: Vec<ImageSpan>,
    /// Proposed tokens at the end of `token_ids` (speculative decoding), not yet committed:
    /// they run in the next step beside the last committed token and never enter the prefix
    /// cache until [`Scheduler::take_draft`] gives them back and the engine accepts them.
    pub num_draft: usize,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>) -> Sequence {
        Sequence {
            id,
            num_prompt_tokens: prompt.len(),
            token_ids: prompt,
            num_computed_tokens: 0,
            num_preemptions: 0,
            num_cached_tokens: 0,
            logits_from: None,
            streaming: None,
            images: Vec::new(),
            shift: 0,
            num_draft: 0,
        }
    }

    pub fn num_generated(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    /// Whether it can take proposals: decoding (every token but its last computed), none yet,
    /// not a streaming window.
    pub fn takes_draft(&self) -> bool {
        self.token_ids.len() == self.num_computed_tokens + 1 && self.num_draft == 0 && self.streaming.is_none()
    }

    /// Drops the last `n` proposed tokens.
    fn drop_draft(&mut self, n: usize) {
        let n = n.min(self.num_draft);
        self.token_ids.truncate(self.token_ids.len() - n);
        self.num_draft -= n;
    }
}

/// One sequence's share of a step: tokens `start..start + num_tokens` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    pub start: usize,
    pub num_tokens: usize,
    /// The step reaches the sequence's last token, so it yields logits for the next one.
    pub samples: bool,
}

/// Recurrent state to move before or during a step's forward (models with recurrent layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateCopy {
    /// Before the forward: `id` starts from the prefix cache's snapshot in slot `from`.
    Restore { id: SeqId, from: u32 },
    /// During the forward: `id`'s state after its tokens before `position` goes to slot `to`
    /// (its checkpoint).
    Snapshot { id: SeqId, position: usize, to: u32 },
}

/// What one step runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub scheduled: Vec<Scheduled>,
    /// Sequences preempted while planning (their blocks are free again).
    pub preempted: Vec<SeqId>,
    /// Prompt tokens found in the prefix cache by sequences admitted this step.
    pub prefix_hit_tokens: usize,
    /// Streaming sequences whose kept keys move back before this step (only those still
    /// scheduled count).
    pub shifts: Vec<KeyShift>,
    /// Recurrent-state copies, restores first.
    pub state_copies: Vec<StateCopy>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.num_tokens).sum()
    }
}

/// The waiting queue, the running set, and the cache blocks they hold.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// In admission order.
    running: Vec<SeqId>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, kv: KvCacheManager) -> Scheduler {
        assert!(cfg.max_num_seqs > 0 && cfg.max_batch_tokens > 0);
        Scheduler { cfg, kv, seqs: HashMap::new(), waiting: VecDeque::new(), running: Vec::new() }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Queues a sequence (its id must be new).
    pub fn add(&mut self, seq: Sequence) {
        debug_assert!(!self.seqs.contains_key(&seq.id));
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// Removes a sequence wherever it is and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = self.seqs.remove(&id)?;
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.kv.free(id);
        Some(seq)
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_batch_tokens;
        // Decoding sequences first, then those part-way through their prompt; each group in
        // admission order.
        let remaining = |s: &Sequence| s.token_ids.len() - s.num_computed_tokens;
        let mut order: Vec<SeqId> = self.running.clone();
        order.sort_by_key(|id| self.seqs.get(id).is_some_and(|s| remaining(s) - s.num_draft > 1));
        for id in order {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted for an earlier sequence in this loop
            }
            let bs = self.kv.block_size();
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            // Proposals beyond the budget are dropped: a step runs all of a sequence's or none.
            seq.drop_draft(remaining(seq).saturating_sub(budget));
            let (start, mut n, mut len) = (seq.num_computed_tokens, remaining(seq).min(budget), seq.token_ids.len());
            if let Some(st) = seq.streaming {
                // A full window drops its oldest blocks after the sinks first.
                if start - seq.shift >= st.window_blocks * bs {
                    self.kv.drop_blocks(id, st.sink_blocks, st.drop_blocks);
                    seq.shift += st.drop_blocks * bs;
                    plan.shifts.push(KeyShift { id, first_block: st.sink_blocks, delta: st.drop_blocks * bs });
                }
                n = n.min(st.window_blocks * bs - (start - seq.shift));
            }
            let shift = seq.shift;
            loop {
                if self.kv.allocate(id, &CachedPrefix::default(), start - shift + n) {
                    let samples = start + n == len;
                    plan.scheduled.push(Scheduled { id, start, num_tokens: n, samples });
                    budget -= n;
                    break;
                }
                // Out of blocks: proposals go first.
                if let Some(seq) = self.seqs.get_mut(&id).filter(|s| s.num_draft > 0) {
                    n -= seq.num_draft;
                    len -= seq.num_draft;
                    seq.drop_draft(seq.num_draft);
                    continue;
                }
                // Out of blocks: preempt the most recently admitted sequence (maybe this one).
                let Some(victim) = self.running.pop() else { break };
                self.preempt(victim);
                plan.preempted.push(victim);
                if let Some(i) = plan.scheduled.iter().position(|s| s.id == victim) {
                    budget += plan.scheduled.remove(i).num_tokens;
                }
                if victim == id {
                    break;
                }
            }
        }
        // Admit waiting sequences while the budget, the sequence cap and the blocks allow (none
        // if this step had to preempt: the cache is already too tight).
        while plan.preempted.is_empty() && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let Some(seq) = self.seqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            // Positions whose logits are wanted are computed; a streaming window's blocks change.
            let max_blocks = match (seq.streaming, seq.logits_from) {
                (Some(_), _) => 0,
                (None, Some(from)) => from / self.kv.block_size(),
                (None, None) => usize::MAX,
            };
            let prefix = self.kv.find_cached_prefix(&seq.token_ids, &seq.images, max_blocks);
            let hit = prefix.num_tokens(self.kv.block_size());
            let mut n = (seq.token_ids.len() - hit).min(budget);
            if let Some(st) = seq.streaming {
                n = n.min(st.window_blocks * self.kv.block_size());
            }
            if !self.kv.allocate(id, &prefix, hit + n) {
                break;
            }
            let samples = hit + n == seq.token_ids.len();
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.num_computed_tokens = hit;
                seq.num_cached_tokens = hit.min(seq.num_prompt_tokens);
            }
            self.waiting.pop_front();
            self.running.push(id);
            if let (Some(from), true) = (prefix.state, hit > 0) {
                plan.state_copies.push(StateCopy::Restore { id, from });
            }
            plan.scheduled.push(Scheduled { id, start: hit, num_tokens: n, samples });
            plan.prefix_hit_tokens += hit;
            budget -= n;
        }
        // Checkpoints of recurrent state at the block boundaries the step crosses (among
        // committed tokens: a state past a proposal may not stand).
        for s in &plan.scheduled {
            let draft = self.seqs.get(&s.id).map_or(0, |q| q.num_draft);
            if let Some((position, to)) = self.kv.plan_snapshot(s.id, s.start, s.start + s.num_tokens - draft) {
                plan.state_copies.push(StateCopy::Snapshot { id: s.id, position, to });
            }
        }
        plan
    }

    /// Marks the planned tokens computed (after the forward ran) and caches the blocks they
    /// filled.
    pub fn complete(&mut self, plan: &StepPlan) {
        for s in &plan.scheduled {
            if let Some(seq) = self.seqs.get_mut(&s.id) {
                seq.num_computed_tokens = s.start + s.num_tokens;
                if seq.streaming.is_none() {
                    let committed = &seq.token_ids[..seq.token_ids.len() - seq.num_draft];
                    self.kv.cache_computed(s.id, committed, &seq.images, seq.num_computed_tokens);
                }
                for c in &plan.state_copies {
                    if let StateCopy::Snapshot { id, position, .. } = *c {
                        if id == s.id {
                            self.kv.snapshot_taken(id, position);
                        }
                    }
                }
                // The end of a prompt is where a request sharing it resumes: its checkpoint (at
                // the prompt's last block boundary, taken in this step or an earlier chunk)
                // goes to the prefix cache.
                if s.start < seq.num_prompt_tokens && seq.num_computed_tokens >= seq.num_prompt_tokens {
                    self.kv.register_checkpoint(s.id);
                }
                if let Some(w) = self.cfg.window {
                    // The next token (position `num_computed_tokens`) sees from `+ 1 - w` on.
                    let first_seen = (seq.num_computed_tokens + 1).saturating_sub(w);
                    self.kv.release_before(s.id, first_seen);
                }
            }
        }
    }

    /// Appends a sampled token to a sequence.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.token_ids.push(token);
        }
    }

    /// Gives a running sequence that [takes proposals](Sequence::takes_draft) tokens to verify
    /// in the next step. Returns whether it took them.
    pub fn propose(&mut self, id: SeqId, draft: &[u32]) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else { return false };
        if draft.is_empty() || !seq.takes_draft() || !self.running.contains(&id) {
            return false;
        }
        seq.token_ids.extend_from_slice(draft);
        seq.num_draft = draft.len();
        true
    }

    /// Takes back a sequence's proposals after the step that verified them: the sequence ends
    /// at its committed tokens again, all computed. The engine then appends the tokens it
    /// samples and marks each accepted proposal computed ([`accept_computed`](Self::accept_computed)).
    pub fn take_draft(&mut self, id: SeqId) -> Vec<u32> {
        let Some(seq) = self.seqs.get_mut(&id) else { return Vec::new() };
        let committed = seq.token_ids.len() - seq.num_draft;
        let draft = seq.token_ids.split_off(committed);
        seq.num_draft = 0;
        seq.num_computed_tokens = seq.num_computed_tokens.min(committed);
        draft
    }

    /// Sets how many of `id`'s tokens count as computed back to `n` (a model with recurrent
    /// state whose state went back to before a step that verified proposals: those tokens run
    /// again, the accepted ones among them, to bring the state forward).
    pub fn rewind_computed(&mut self, id: SeqId, n: usize) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed_tokens = seq.num_computed_tokens.min(n);
        }
    }

    /// One more token of `id` has its K/V in the cache: an accepted proposal, computed in the
    /// step that verified it.
    pub fn accept_computed(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed_tokens = (seq.num_computed_tokens + 1).min(seq.token_ids.len());
            if seq.streaming.is_none() {
                self.kv.cache_computed(id, &seq.token_ids, &seq.images, seq.num_computed_tokens);
            }
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.kv.free(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.drop_draft(seq.num_draft);
            seq.num_computed_tokens = 0;
            seq.shift = 0;
            seq.num_preemptions += 1;
        }
        self.waiting.push_front(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_num_seqs: usize, max_batch_tokens: usize, block_size: usize, blocks: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig { max_num_seqs, max_batch_tokens, window: None },
            KvCacheManager::new(block_size, blocks, true),
        )
    }

    fn prompt(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    /// Runs a plan as the engine would: complete it, and give every sampling sequence a token.
    fn run(s: &mut Scheduler, plan: &StepPlan) {
        s.complete(plan);
        for x in &plan.scheduled {
            if x.samples {
                s.append_token(x.id, 9999);
            }
        }
    }

    fn shares(plan: &StepPlan) -> Vec<(SeqId, usize, usize)> {
        plan.scheduled.iter().map(|s| (s.id, s.start, s.num_tokens)).collect()
    }

    #[test]
    fn long_prompts_are_chunked_to_the_budget() {
        let mut s = sched(4, 8, 4, 64);
        s.add(Sequence::new(1, prompt(20, 0)));
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 0, 8)]);
        assert!(!p.scheduled[0].samples);
        run(&mut s, &p);
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 8, 8)]);
        run(&mut s, &p);
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 16, 4)]);
        assert!(p.scheduled[0].samples);
        run(&mut s, &p);
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 20, 1)]);
    }

    #[test]
    fn decodes_go_first_and_new_prompts_fill_the_rest() {
        let mut s = sched(8, 10, 4, 64);
        s.add(Sequence::new(1, prompt(3, 0)));
        let p = s.schedule();
        run(&mut s, &p);
        s.add(Sequence::new(2, prompt(30, 100)));
        s.add(Sequence::new(3, prompt(5, 200)));
        let p = s.schedule();
        // 1 decodes (1 token), 2 takes the other 9; 3 waits for budget.
        assert_eq!(shares(&p), vec![(1, 3, 1), (2, 0, 9)]);
        run(&mut s, &p);
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 4, 1), (2, 9, 9)]);
        run(&mut s, &p);
        // Sequence 2 still prefilling: the decode still goes first.
        let p = s.schedule();
        assert_eq!(p.scheduled[0], Scheduled { id: 1, start: 5, num_tokens: 1, samples: true });
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn the_sequence_cap_holds_back_admissions() {
        let mut s = sched(2, 100, 4, 64);
        for id in 1..=3 {
            s.add(Sequence::new(id, prompt(4, id as u32 * 10)));
        }
        let p = s.schedule();
        assert_eq!(p.scheduled.len(), 2);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
        run(&mut s, &p);
        s.remove(1);
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(2, 4, 1), (3, 0, 4)]);
    }

    #[test]
    fn the_newest_sequence_is_preempted_when_blocks_run_out_and_resumes_later() {
        // 4 blocks of 2 tokens: two sequences of 3 tokens take 2 blocks each.
        let mut s = sched(4, 100, 2, 4);
        s.add(Sequence::new(1, prompt(3, 0)));
        s.add(Sequence::new(2, prompt(3, 10)));
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 0, 3), (2, 0, 3)]);
        run(&mut s, &p);
        // Both now have 4 tokens (fits), then 5: sequence 1 needs a third block.
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 3, 1), (2, 3, 1)]);
        run(&mut s, &p);
        let p = s.schedule();
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(shares(&p), vec![(1, 4, 1)]);
        assert_eq!(s.get(2).map(|q| (q.num_computed_tokens, q.num_preemptions)), Some((0, 1)));
        run(&mut s, &p);
        s.remove(1);
        // Sequence 2 comes back, recomputing its 5 tokens after its first block, still cached
        // (its second block was the first one evicted, for sequence 1).
        let p = s.schedule();
        assert_eq!(p.prefix_hit_tokens, 2);
        assert_eq!(shares(&p), vec![(2, 2, 3)]);
        assert!(p.scheduled[0].samples);
    }

    #[test]
    fn a_lone_sequence_that_outgrows_the_cache_preempts_itself() {
        let mut s = sched(4, 100, 2, 2);
        s.add(Sequence::new(1, prompt(4, 0)));
        let p = s.schedule();
        run(&mut s, &p);
        let p = s.schedule();
        assert_eq!(p.preempted, vec![1]);
        assert!(p.scheduled.is_empty());
        assert_eq!(s.num_waiting(), 1);
        // It cannot come back until blocks free up.
        let p = s.schedule();
        assert!(p.scheduled.is_empty());
    }

    #[test]
    fn a_shared_prefix_is_computed_once() {
        let mut s = sched(4, 100, 4, 64);
        let system = prompt(12, 500);
        let mut a = system.clone();
        a.extend([1, 2, 3]);
        let mut b = system.clone();
        b.extend([4, 5]);
        s.add(Sequence::new(1, a));
        let p = s.schedule();
        run(&mut s, &p);
        s.add(Sequence::new(2, b));
        let p = s.schedule();
        assert_eq!(p.prefix_hit_tokens, 12);
        assert_eq!(shares(&p), vec![(1, 15, 1), (2, 12, 2)]);
        assert_eq!(s.get(2).map(|q| q.num_cached_tokens), Some(12));
        assert_eq!(s.kv().block_table(1)[..3], s.kv().block_table(2)[..3]);
    }

    #[test]
    fn removing_frees_blocks_and_queue_places() {
        let mut s = sched(4, 100, 4, 8);
        s.add(Sequence::new(1, prompt(10, 0)));
        s.add(Sequence::new(2, prompt(10, 50)));
        let p = s.schedule();
        run(&mut s, &p);
        s.add(Sequence::new(3, prompt(3, 90)));
        assert!(s.remove(3).is_some());
        assert!(s.remove(1).is_some());
        assert!(s.remove(1).is_none());
        assert_eq!((s.num_running(), s.num_waiting()), (1, 0));
        assert_eq!(s.kv().pool().num_used(), 3);
        s.remove(2);
        assert_eq!(s.kv().pool().num_used(), 0);
        assert!(!s.has_work());
    }

    #[test]
    fn proposals_run_with_the_last_token_and_are_cut_to_the_budget() {
        let mut s = sched(4, 6, 4, 64);
        s.add(Sequence::new(1, prompt(6, 0)));
        // Not decoding yet: nothing to propose for.
        assert!(!s.propose(1, &[7]));
        let p = s.schedule();
        run(&mut s, &p);
        assert!(s.propose(1, &[1, 2, 3, 4, 5, 6, 7]));
        assert!(!s.propose(1, &[8]), "one proposal at a time");
        let p = s.schedule();
        // Budget 6: the last committed token and 5 of the 7 proposals.
        assert_eq!(shares(&p), vec![(1, 6, 6)]);
        assert!(p.scheduled[0].samples);
        assert_eq!(s.get(1).map(|q| q.num_draft), Some(5));
        s.complete(&p);
        // Proposals never enter the prefix cache: blocks 0..1 hold committed tokens only.
        assert_eq!(s.take_draft(1), vec![1, 2, 3, 4, 5]);
        let q = s.get(1).expect("sequence");
        assert_eq!((q.token_ids.len(), q.num_computed_tokens, q.num_draft), (7, 7, 0));
        assert_eq!(s.kv().find_cached_prefix(&prompt(6, 0), &[], usize::MAX).blocks.len(), 1);
        // Two proposals accepted (the engine appends them as sampled tokens).
        for t in [1, 2] {
            s.append_token(1, t);
            s.accept_computed(1);
        }
        s.append_token(1, 9);
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 9, 1)]);
    }

    #[test]
    fn preemption_drops_proposals() {
        let mut s = sched(4, 64, 4, 3);
        s.add(Sequence::new(1, prompt(11, 0)));
        let p = s.schedule();
        run(&mut s, &p);
        // 12 tokens in 3 blocks of 4: proposals would need a fourth block.
        assert!(s.propose(1, &[1, 2, 3]));
        let p = s.schedule();
        assert_eq!(shares(&p), vec![(1, 11, 1)], "the proposals go before anything is preempted");
        assert!(p.preempted.is_empty());
        assert_eq!(s.get(1).map(|q| (q.num_draft, q.token_ids.len())), Some((0, 12)));
    }
}
