//! Which cache blocks each sequence holds, and the prefix cache over them.
//!
//! The manager hands blocks to sequences as their token count grows, finds the longest cached
//! prefix of a new sequence (whole blocks only), and enters blocks into the prefix cache once
//! every token in them has been computed. It knows nothing of tensors: the K/V themselves live in
//! the model's [`pio_model::KvCache`], addressed by the block ids handed out here.
//!
//! A model with recurrent layers also keeps a state per sequence, in a slot of its own. Cached
//! blocks are then only half a prefix: a hit also needs the recurrent state at its end. So each
//! running sequence keeps a checkpoint: a second slot holding its state at its latest block
//! boundary (taken during the forward that crosses it, see [`KvCacheManager::plan_snapshot`]).
//! When its prompt is done, and when it finishes or is preempted, the checkpoint becomes a
//! snapshot of the prefix cache, keyed by the hash of the block it ends at; a prefix hit is
//! taken only as far as the longest cached run of blocks that ends at a snapshot, and starts
//! from a copy of it. Snapshots live in the same slots: one goes when the block it ends at is
//! evicted, and the least recently used one gives its slot up when a sequence needs one.

use std::collections::HashMap;

use crate::block_pool::{BlockHash, BlockPool};

/// A sequence's identity, as the engine numbers requests.
pub type SeqId = u64;

/// The run of placeholder tokens `start..start + len` an image stands for, and a hash of the
/// image's content: the prefix cache keys a block by its tokens and by the images they stand
/// for, so prompts with different images never share blocks and the same image does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpan {
    pub start: usize,
    pub len: usize,
    pub hash: u64,
}

/// The parent a block's key chains from: the hash of the block before it, mixed with the
/// block's image salt when it has one (so the pool's keys need nothing new: a different image
/// is a different parent).
fn salted(pool: &BlockPool, prev: Option<BlockHash>, salt: u64) -> Option<BlockHash> {
    if salt == 0 {
        return prev;
    }
    // Three "tokens" no block of real ones matches in length.
    Some(pool.hash_block(prev, &[(salt >> 32) as u32, salt as u32, u32::MAX]))
}

/// What block `i` (of `block_size` tokens) holds of the images in `images`: 0 when no image
/// token, else a hash of each overlapping image's hash and where the block starts in it.
fn block_salt(images: &[ImageSpan], i: usize, block_size: usize) -> u64 {
    use std::hash::{Hash, Hasher};
    let (lo, hi) = (i * block_size, (i + 1) * block_size);
    let mut seen = false;
    // SipHash with fixed keys: the same salt for the same images in every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for im in images.iter().filter(|im| im.start < hi && im.start + im.len > lo) {
        seen = true;
        (im.hash, lo as i64 - im.start as i64).hash(&mut h);
    }
    if seen {
        h.finish().max(1)
    } else {
        0
    }
}

#[derive(Debug, Default)]
struct SeqBlocks {
    blocks: Vec<u32>,
    /// Leading blocks already returned to the pool (behind a sliding window): their entries
    /// stay in `blocks`, so positions still index the table, but are never read again.
    released: usize,
    /// Hashes of the sequence's first `hashes.len()` full blocks (those already cached or hit).
    hashes: Vec<BlockHash>,
    /// The sequence's recurrent-state slot (models with recurrent layers).
    slot: Option<u32>,
    /// Its checkpoint slot, and the block boundary whose state it holds (`None`: not written).
    checkpoint: Option<(u32, Option<usize>)>,
}

/// The longest cached prefix of a sequence, found by [`KvCacheManager::find_cached_prefix`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CachedPrefix {
    pub blocks: Vec<u32>,
    pub hashes: Vec<BlockHash>,
    /// The snapshot slot holding the recurrent state at the end of `blocks` (models with
    /// recurrent layers), to copy into the sequence's own slot before it runs.
    pub state: Option<u32>,
}

impl CachedPrefix {
    pub fn num_tokens(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }
}

/// Blocks per sequence over one [`BlockPool`], and a state slot per sequence where the model
/// keeps recurrent state.
#[derive(Debug)]
pub struct KvCacheManager {
    block_size: usize,
    pool: BlockPool,
    prefix_caching: bool,
    seqs: HashMap<SeqId, SeqBlocks>,
    /// Free state slots (none: the model keeps no per-sequence state), lowest last.
    free_slots: Vec<u32>,
    num_slots: usize,
    /// Prefix-cache snapshots of recurrent state: the hash of the block they end at -> (slot,
    /// last use).
    snapshots: HashMap<BlockHash, (u32, u64)>,
    clock: u64,
}

impl KvCacheManager {
    pub fn new(block_size: usize, num_blocks: usize, prefix_caching: bool) -> KvCacheManager {
        assert!(block_size > 0);
        KvCacheManager {
            block_size,
            pool: BlockPool::new(num_blocks),
            prefix_caching,
            seqs: HashMap::new(),
            free_slots: Vec::new(),
            num_slots: 0,
            snapshots: HashMap::new(),
            clock: 0,
        }
    }

    /// Gives every sequence one of `num_slots` recurrent-state slots while it holds blocks: a
    /// sequence is only admitted when one is free (or a snapshot gives its slot up). With
    /// prefix caching, the other slots hold checkpoints and snapshots.
    pub fn with_state_slots(mut self, num_slots: usize) -> KvCacheManager {
        self.num_slots = num_slots;
        self.free_slots = (0..num_slots as u32).rev().collect();
        self
    }

    /// Recurrent-state snapshots the prefix cache holds.
    pub fn num_snapshots(&self) -> usize {
        self.snapshots.len()
    }

    /// Frees the slots of snapshots whose last block has left the prefix cache (evicted to make
    /// room): a hit can no longer reach them.
    fn drop_stale_snapshots(&mut self) {
        let pool = &self.pool;
        let stale: Vec<BlockHash> = self.snapshots.keys().filter(|h| !pool.is_cached(**h)).copied().collect();
        for h in stale {
            if let Some((slot, _)) = self.snapshots.remove(&h) {
                self.free_slots.push(slot);
            }
        }
    }

    /// A free state slot, or the slot of the least recently used snapshot.
    fn take_slot(&mut self) -> Option<u32> {
        if let Some(s) = self.free_slots.pop() {
            return Some(s);
        }
        let (&hash, _) = self.snapshots.iter().min_by_key(|(_, &(_, used))| used)?;
        self.snapshots.remove(&hash).map(|(slot, _)| slot)
    }

    /// The state slot `id` holds, if any.
    pub fn state_slot(&self, id: SeqId) -> Option<u32> {
        self.seqs.get(&id).and_then(|s| s.slot)
    }

    /// State slots not held by any sequence.
    pub fn num_free_slots(&self) -> usize {
        self.free_slots.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks a sequence of `num_tokens` tokens needs.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The blocks `id` holds, in position order (empty if none).
    pub fn block_table(&self, id: SeqId) -> &[u32] {
        self.seqs.get(&id).map_or(&[], |s| &s.blocks)
    }

    /// The longest run of whole cached blocks at the start of `tokens`, leaving at least one
    /// token to compute (the step that computes it produces the next token's logits). Takes no
    /// references: pass the result to [`allocate`](Self::allocate).
    /// `images`: the image placeholders among `tokens`.
    pub fn find_cached_prefix(&self, tokens: &[u32], images: &[ImageSpan], max_blocks: usize) -> CachedPrefix {
        let mut found = CachedPrefix::default();
        if !self.prefix_caching {
            return found;
        }
        let max_blocks = max_blocks.min(tokens.len().saturating_sub(1) / self.block_size);
        let mut prev = None;
        for (i, chunk) in tokens.chunks_exact(self.block_size).take(max_blocks).enumerate() {
            let parent = salted(&self.pool, prev, block_salt(images, i, self.block_size));
            let hash = self.pool.hash_block(parent, chunk);
            let Some(b) = self.pool.lookup(hash, parent, chunk) else { break };
            found.blocks.push(b);
            found.hashes.push(hash);
            prev = Some(hash);
        }
        if self.num_slots > 0 {
            // Only as far as a snapshot of the recurrent state reaches.
            let keep = (1..=found.hashes.len()).rev().find(|&k| self.snapshots.contains_key(&found.hashes[k - 1]));
            found.blocks.truncate(keep.unwrap_or(0));
            found.hashes.truncate(keep.unwrap_or(0));
            found.state = keep.and_then(|k| self.snapshots.get(&found.hashes[k - 1])).map(|&(slot, _)| slot);
        }
        found
    }

    /// Gives `id` (which holds `num_computed` computed tokens, or none yet with `prefix` its
    /// cache hit) enough blocks for `num_computed + prefix tokens + num_new` tokens. Returns
    /// false, changing nothing, when too few blocks are free.
    pub fn allocate(&mut self, id: SeqId, prefix: &CachedPrefix, total_tokens: usize) -> bool {
        let held = self.seqs.get(&id).map_or(0, |s| s.blocks.len());
        debug_assert!(prefix.blocks.is_empty() || held == 0, "a prefix hit is only for a sequence holding nothing");
        let have = held + prefix.blocks.len();
        let need = self.blocks_for(total_tokens).saturating_sub(have);
        // Hit blocks that nobody holds sit in the free queue: taking them shrinks it too.
        let revived = prefix.blocks.iter().filter(|&&b| self.pool.ref_cnt(b) == 0).count();
        if need + revived > self.pool.num_free() {
            return false;
        }
        let needs_slot = self.num_slots > 0 && self.seqs.get(&id).is_none_or(|s| s.slot.is_none());
        if needs_slot && self.free_slots.is_empty() && self.snapshots.is_empty() {
            return false;
        }
        if let Some(hash) = prefix.hashes.last().filter(|_| prefix.state.is_some()) {
            // The snapshot about to be restored is the most recently used.
            self.clock += 1;
            if let Some(entry) = self.snapshots.get_mut(hash) {
                entry.1 = self.clock;
            }
        }
        self.pool.touch(&prefix.blocks);
        let Some(fresh) = self.pool.allocate(need) else {
            // Unreachable after the check above; undo the touch to stay consistent.
            self.pool.free(prefix.blocks.iter().rev().copied());
            return false;
        };
        if need > 0 {
            self.drop_stale_snapshots();
        }
        let slot = if needs_slot { self.take_slot() } else { None };
        let s = self.seqs.entry(id).or_default();
        if needs_slot {
            s.slot = slot;
        }
        s.blocks.extend_from_slice(&prefix.blocks);
        s.hashes.extend_from_slice(&prefix.hashes);
        s.blocks.extend(fresh);
        true
    }

    /// Enters `id`'s blocks whose tokens (`tokens[..num_computed]`) are all computed into the
    /// prefix cache (`images`: the image placeholders among them).
    pub fn cache_computed(&mut self, id: SeqId, tokens: &[u32], images: &[ImageSpan], num_computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let Some(s) = self.seqs.get_mut(&id) else { return };
        let full = (num_computed.min(tokens.len()) / self.block_size).min(s.blocks.len());
        for i in s.hashes.len()..full {
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let parent =
                salted(&self.pool, i.checked_sub(1).map(|p| s.hashes[p]), block_salt(images, i, self.block_size));
            let hash = self.pool.hash_block(parent, chunk);
            self.pool.cache_block(s.blocks[i], hash, parent, chunk);
            s.hashes.push(hash);
        }
    }

    /// Gives back every block of `id` (cached ones stay findable until evicted) and its state
    /// slot; its checkpoint stays as a snapshot.
    pub fn free(&mut self, id: SeqId) {
        self.register_checkpoint(id);
        if let Some(s) = self.seqs.remove(&id) {
            self.pool.free(s.blocks.into_iter().skip(s.released).rev());
            self.free_slots.extend(s.slot);
            self.free_slots.extend(s.checkpoint.map(|(slot, _)| slot));
        }
    }

    /// Where the forward that runs `id`'s tokens `start..end` should snapshot its recurrent
    /// state, and into which slot: the last block boundary in `start + 1..=end`, when it is past
    /// the sequence's checkpoint (`None`: no boundary is crossed, no slot is free, or the model
    /// keeps no state or the prefix cache is off). Call [`snapshot_taken`](Self::snapshot_taken)
    /// once that forward ran.
    pub fn plan_snapshot(&mut self, id: SeqId, start: usize, end: usize) -> Option<(usize, u32)> {
        if self.num_slots == 0 || !self.prefix_caching {
            return None;
        }
        let at = end / self.block_size * self.block_size;
        let current = self.seqs.get(&id)?.checkpoint;
        if at <= start || current.is_some_and(|(_, pos)| pos == Some(at)) {
            return None;
        }
        let slot = match current {
            Some((slot, _)) => slot,
            None => self.take_slot()?,
        };
        let s = self.seqs.get_mut(&id)?;
        // Not valid until the forward wrote it.
        s.checkpoint = Some((slot, None));
        Some((at, slot))
    }

    /// The snapshot planned by [`plan_snapshot`](Self::plan_snapshot) at `pos` was written.
    pub fn snapshot_taken(&mut self, id: SeqId, pos: usize) {
        if let Some((_, p)) = self.seqs.get_mut(&id).and_then(|s| s.checkpoint.as_mut()) {
            *p = Some(pos);
        }
    }

    /// Moves `id`'s checkpoint into the prefix cache's snapshots (when it holds a state at a
    /// block boundary whose blocks are cached, and no snapshot of that prefix exists yet).
    pub fn register_checkpoint(&mut self, id: SeqId) {
        let Some(s) = self.seqs.get_mut(&id) else { return };
        let Some((slot, Some(pos))) = s.checkpoint else { return };
        let Some(&hash) = (pos / self.block_size).checked_sub(1).and_then(|b| s.hashes.get(b)) else { return };
        self.clock += 1;
        match self.snapshots.get_mut(&hash) {
            Some(entry) => entry.1 = self.clock,
            None => {
                self.snapshots.insert(hash, (slot, self.clock));
                s.checkpoint = None;
            }
        }
    }

    /// Returns to the pool the blocks of `id` that lie wholly before position `pos` (nothing
    /// will read them again: they are behind every layer's window).
    pub fn release_before(&mut self, id: SeqId, pos: usize) {
        let Some(s) = self.seqs.get_mut(&id) else { return };
        let upto = (pos / self.block_size).min(s.blocks.len());
        if upto > s.released {
            self.pool.free(s.blocks[s.released..upto].iter().rev().copied());
            s.released = upto;
        }
    }

    /// Returns `count` blocks of `id`, from table index `at` on, to the pool and closes the gap
    /// in its table (a streaming window dropping its oldest blocks after the sinks). The
    /// sequence must not be in the prefix cache.
    pub fn drop_blocks(&mut self, id: SeqId, at: usize, count: usize) {
        let Some(s) = self.seqs.get_mut(&id) else { return };
        debug_assert!(s.hashes.len() <= at && s.released <= at, "dropping cached or released blocks");
        let end = (at + count).min(s.blocks.len());
        if at < end {
            let gone: Vec<u32> = s.blocks.drain(at..end).collect();
            self.pool.free(gone.into_iter().rev());
        }
    }

    /// Blocks `id` holds in the pool (not counting released ones).
    pub fn resident_blocks(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.blocks.len() - s.released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    #[test]
    fn allocation_grows_with_the_sequence() {
        let mut kv = KvCacheManager::new(4, 4, true);
        assert!(kv.allocate(1, &CachedPrefix::default(), 5));
        assert_eq!(kv.block_table(1).len(), 2);
        assert!(kv.allocate(1, &CachedPrefix::default(), 8));
        assert_eq!(kv.block_table(1).len(), 2);
        assert!(kv.allocate(1, &CachedPrefix::default(), 9));
        assert_eq!(kv.block_table(1).len(), 3);
        // Two blocks more than are free: nothing changes.
        assert!(!kv.allocate(1, &CachedPrefix::default(), 20));
        assert_eq!(kv.block_table(1).len(), 3);
        kv.free(1);
        assert_eq!(kv.pool().num_free(), 4);
    }

    #[test]
    fn a_shared_prefix_is_found_after_it_is_computed() {
        let mut kv = KvCacheManager::new(4, 8, true);
        let a = toks(10, 100);
        assert_eq!(kv.find_cached_prefix(&a, &[], usize::MAX), CachedPrefix::default());
        assert!(kv.allocate(1, &CachedPrefix::default(), a.len()));
        // Not computed yet: nothing to find.
        assert!(kv.find_cached_prefix(&a, &[], usize::MAX).blocks.is_empty());
        kv.cache_computed(1, &a, &[], 6);
        let mut b = a[..8].to_vec();
        b.extend([7, 7, 7]);
        assert_eq!(kv.find_cached_prefix(&b, &[], usize::MAX).blocks, kv.block_table(1)[..1].to_vec());
        kv.cache_computed(1, &a, &[], 10);
        let hit = kv.find_cached_prefix(&b, &[], usize::MAX);
        assert_eq!(hit.blocks, kv.block_table(1)[..2].to_vec());
        assert_eq!(hit.num_tokens(4), 8);
        assert!(kv.allocate(2, &hit, b.len()));
        assert_eq!(kv.block_table(2)[..2], kv.block_table(1)[..2]);
        assert_eq!(kv.pool().ref_cnt(kv.block_table(1)[0]), 2);
        // A prompt that is exactly the cached blocks still leaves its last token to compute.
        assert_eq!(kv.find_cached_prefix(&a[..8], &[], usize::MAX).blocks.len(), 1);
        assert_eq!(kv.find_cached_prefix(&a[..9], &[], usize::MAX).blocks.len(), 2);
    }

    #[test]
    fn freed_prefix_blocks_are_revived_and_count_against_the_free_pool() {
        let mut kv = KvCacheManager::new(2, 3, true);
        let a = toks(5, 0);
        assert!(kv.allocate(1, &CachedPrefix::default(), 5));
        kv.cache_computed(1, &a, &[], 5);
        kv.free(1);
        assert_eq!(kv.pool().num_free(), 3);
        let hit = kv.find_cached_prefix(&a, &[], usize::MAX);
        assert_eq!(hit.blocks.len(), 2);
        // The hit revives 2 free blocks, and 5 tokens need 3: fits exactly.
        assert!(kv.allocate(2, &hit, 5));
        assert_eq!(kv.pool().num_free(), 0);
        kv.free(2);
        // Revived blocks plus new ones beyond the pool: refused, nothing taken.
        let hit = kv.find_cached_prefix(&toks(7, 0), &[], usize::MAX);
        assert_eq!(hit.blocks.len(), 2);
        assert!(!kv.allocate(3, &hit, 7));
        assert_eq!(kv.pool().num_free(), 3);
        assert!(kv.block_table(3).is_empty());
    }

    /// A recurrent-state checkpoint becomes a snapshot when its sequence goes, a hit reaches only
    /// as far as a snapshot, and a snapshot goes with the block it ends at.
    #[test]
    fn state_snapshots_bound_prefix_hits_and_leave_with_their_blocks() {
        let mut kv = KvCacheManager::new(4, 6, true).with_state_slots(3);
        let a = toks(11, 0);
        assert!(kv.allocate(1, &CachedPrefix::default(), 11));
        assert_eq!(kv.state_slot(1), Some(0));
        // The forward over 0..11 checkpoints the state at 8, into a second slot.
        let (pos, slot) = kv.plan_snapshot(1, 0, 11).expect("a boundary is crossed");
        assert_eq!((pos, slot), (8, 1));
        kv.cache_computed(1, &a, &[], 11);
        kv.snapshot_taken(1, 8);
        assert!(kv.plan_snapshot(1, 8, 11).is_none(), "no boundary in 9..=11");
        // Cached blocks without a snapshot are no hit.
        let hit = kv.find_cached_prefix(&a, &[], usize::MAX);
        assert!(hit.blocks.is_empty() && hit.state.is_none());
        kv.free(1);
        assert_eq!(kv.num_snapshots(), 1);
        // Two whole blocks cached, and the state at their end.
        let hit = kv.find_cached_prefix(&toks(13, 0), &[], usize::MAX);
        assert_eq!((hit.blocks.len(), hit.state), (2, Some(1)));
        // Cut short, the hit has no state for its end: nothing.
        let cut = kv.find_cached_prefix(&toks(13, 0), &[], 1);
        assert!(cut.blocks.is_empty() && cut.state.is_none());
        // Filling the pool evicts the cached blocks, and the snapshot with them.
        assert!(kv.allocate(2, &CachedPrefix::default(), 24));
        assert_eq!(kv.num_snapshots(), 0);
        assert_eq!(kv.num_free_slots(), 2, "the snapshot's slot is free again");
    }

    #[test]
    fn prefix_caching_off_finds_nothing() {
        let mut kv = KvCacheManager::new(2, 4, false);
        let a = toks(5, 0);
        assert!(kv.allocate(1, &CachedPrefix::default(), 5));
        kv.cache_computed(1, &a, &[], 5);
        assert!(kv.find_cached_prefix(&a, &[], usize::MAX).blocks.is_empty());
        assert_eq!(kv.pool().num_cached(), 0);
    }
}
