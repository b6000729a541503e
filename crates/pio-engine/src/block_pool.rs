//! Fixed-size KV cache blocks: reference counts, prefix-cache hashes and LRU eviction.
//!
//! A block is *in use* while some sequence holds it (`ref_cnt > 0`) and *free* otherwise. A free
//! block may still hold valid K/V of a full block of tokens (it is *cached*): a later sequence
//! with the same prefix takes it back ([`BlockPool::touch`]) instead of recomputing it. Free
//! blocks wait in a queue ordered by when they were freed; allocation takes the least recently
//! freed block and forgets whatever it cached (LRU eviction).
//!
//! A cached block is found by its [`BlockHash`]: the hash of its parent block's hash and its own
//! token ids, so equal hashes mean equal whole prefixes. The pool also keeps each cached block's
//! parent hash and tokens and compares them on lookup, so a 64-bit hash collision cannot hand a
//! sequence another prefix's K/V.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

/// Identifies a full block of tokens together with everything before it.
pub type BlockHash = u64;

/// What a cached block holds: its prefix (as the parent's hash) and its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    ref_cnt: u32,
    /// Set while the block is in the prefix cache.
    cached: Option<(BlockHash, BlockKey)>,
}

/// The pool of `num_blocks` blocks.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    free: FreeQueue,
    cache: HashMap<BlockHash, u32>,
    hasher: RandomState,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> BlockPool {
        assert!(num_blocks < u32::MAX as usize, "too many blocks");
        BlockPool {
            blocks: vec![BlockMeta::default(); num_blocks],
            free: FreeQueue::new(num_blocks),
            cache: HashMap::new(),
            // Keyed per process, so clients cannot construct colliding prompts.
            hasher: RandomState::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks no sequence holds (cached ones included: they are evicted on demand).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks some sequence holds.
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.free.len()
    }

    /// Blocks in the prefix cache (in use or free).
    pub fn num_cached(&self) -> usize {
        self.cache.len()
    }

    /// Whether a block hashed `hash` is in the prefix cache.
    pub fn is_cached(&self, hash: BlockHash) -> bool {
        self.cache.contains_key(&hash)
    }

    pub fn ref_cnt(&self, block: u32) -> u32 {
        self.blocks[block as usize].ref_cnt
    }

    /// The hash of a full block of `tokens` following the block hashed `parent`.
    pub fn hash_block(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut h = self.hasher.build_hasher();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// The cached block holding `tokens` after the block hashed `parent`, if any.
    pub fn lookup(&self, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) -> Option<u32> {
        let &b = self.cache.get(&hash)?;
        let (_, key) = self.blocks[b as usize].cached.as_ref()?;
        (key.parent == parent && *key.tokens == *tokens).then_some(b)
    }

    /// Takes a reference to each block (cached blocks found by [`lookup`](Self::lookup)); a free
    /// one leaves the free queue.
    pub fn touch(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let meta = &mut self.blocks[b as usize];
            if meta.ref_cnt == 0 {
                self.free.remove(b);
            }
            meta.ref_cnt += 1;
        }
    }

    /// `n` fresh blocks (each with one reference), evicting the least recently freed cached
    /// blocks; `None`, taking nothing, when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.free.pop_front()?;
            let meta = &mut self.blocks[b as usize];
            if let Some((hash, _)) = meta.cached.take() {
                self.cache.remove(&hash);
            }
            meta.ref_cnt = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Drops one reference to each block; a block nobody holds joins the back of the free
    /// queue, in the order given (so give a sequence's blocks last-first: its tail, the least
    /// likely to be shared, is then evicted first).
    pub fn free(&mut self, blocks: impl IntoIterator<Item = u32>) {
        for b in blocks {
            let meta = &mut self.blocks[b as usize];
            debug_assert!(meta.ref_cnt > 0, "block {b} freed twice");
            meta.ref_cnt = meta.ref_cnt.saturating_sub(1);
            if meta.ref_cnt == 0 {
                // A cached block waits at the back, evicted last (LRU); one that holds nothing
                // reusable is taken again first, so a running workload keeps reusing the same
                // (resident) memory instead of walking through the whole cache.
                if meta.cached.is_some() {
                    self.free.push_back(b);
                } else {
                    self.free.push_front(b);
                }
            }
        }
    }

    /// Enters a held block, now full with `tokens` after the block hashed `parent`, into the
    /// prefix cache. Returns false (caching nothing) when the block is cached already or another
    /// block already caches the same prefix (two sequences computed it at once).
    pub fn cache_block(&mut self, block: u32, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) -> bool {
        if self.cache.contains_key(&hash) || self.blocks[block as usize].cached.is_some() {
            return false;
        }
        self.blocks[block as usize].cached = Some((hash, BlockKey { parent, tokens: tokens.into() }));
        self.cache.insert(hash, block);
        true
    }

    /// Empties the prefix cache (blocks in use keep their contents but are no longer shared).
    pub fn reset_prefix_cache(&mut self) {
        for meta in &mut self.blocks {
            meta.cached = None;
        }
        self.cache.clear();
    }
}

/// A doubly linked list over block ids with O(1) push, pop and removal from the middle (a
/// cached block taken back by a prefix hit leaves the queue wherever it is).
#[derive(Debug)]
struct FreeQueue {
    /// `prev[b]`, `next[b]` for blocks, and the sentinel at index `n`.
    prev: Vec<u32>,
    next: Vec<u32>,
    in_queue: Vec<bool>,
    len: usize,
}

impl FreeQueue {
    /// A queue holding `0..n` in order.
    fn new(n: usize) -> FreeQueue {
        let s = n as u32;
        let mut q = FreeQueue { prev: vec![s; n + 1], next: vec![s; n + 1], in_queue: vec![false; n], len: 0 };
        for b in 0..s {
            q.push_back(b);
        }
        q
    }

    fn len(&self) -> usize {
        self.len
    }

    fn sentinel(&self) -> u32 {
        (self.prev.len() - 1) as u32
    }

    fn push_back(&mut self, b: u32) {
        debug_assert!(!self.in_queue[b as usize]);
        let s = self.sentinel();
        let last = self.prev[s as usize];
        self.next[last as usize] = b;
        self.prev[b as usize] = last;
        self.next[b as usize] = s;
        self.prev[s as usize] = b;
        self.in_queue[b as usize] = true;
        self.len += 1;
    }

    fn push_front(&mut self, b: u32) {
        debug_assert!(!self.in_queue[b as usize]);
        let s = self.sentinel();
        let first = self.next[s as usize];
        self.prev[first as usize] = b;
        self.next[b as usize] = first;
        self.prev[b as usize] = s;
        self.next[s as usize] = b;
        self.in_queue[b as usize] = true;
        self.len += 1;
    }

    fn remove(&mut self, b: u32) {
        if !self.in_queue[b as usize] {
            return;
        }
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.in_queue[b as usize] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let b = self.next[self.sentinel() as usize];
        if b == self.sentinel() {
            return None;
        }
        self.remove(b);
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_reuses_freed_blocks() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3).unwrap_or_default();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(pool.allocate(2).is_none());
        assert_eq!((pool.num_free(), pool.num_used()), (1, 3));
        pool.free(a.iter().rev().copied());
        assert_eq!(pool.num_free(), 4);
        // Uncached blocks come back first, the last freed first (0, freed after 1 and 2); 3
        // (never used) after them.
        assert_eq!(pool.allocate(4).unwrap_or_default(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn cached_blocks_are_taken_after_uncached_ones() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(4).unwrap_or_default();
        let hash = pool.hash_block(None, &[1, 2]);
        assert!(pool.cache_block(a[1], hash, None, &[1, 2]));
        pool.free(a.iter().copied());
        // Uncached 3, 2, 0 (the last freed first), then the cached block 1, evicted last.
        assert_eq!(pool.allocate(4).unwrap_or_default(), vec![3, 2, 0, 1]);
    }

    #[test]
    fn shared_blocks_are_freed_when_the_last_holder_lets_go() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate(1).unwrap_or_default();
        pool.touch(&a);
        assert_eq!(pool.ref_cnt(a[0]), 2);
        pool.free(a.clone());
        assert_eq!(pool.num_free(), 1);
        pool.free(a.clone());
        assert_eq!(pool.num_free(), 2);
    }

    #[test]
    fn a_freed_cached_block_is_found_and_taken_back_until_evicted() {
        let mut pool = BlockPool::new(3);
        let b = pool.allocate(1).unwrap_or_default()[0];
        let h = pool.hash_block(None, &[1, 2, 3, 4]);
        assert!(pool.cache_block(b, h, None, &[1, 2, 3, 4]));
        // A second block with the same content is not cached twice.
        let other = pool.allocate(1).unwrap_or_default()[0];
        assert!(!pool.cache_block(other, h, None, &[1, 2, 3, 4]));
        pool.free([other, b]);
        assert_eq!(pool.lookup(h, None, &[1, 2, 3, 4]), Some(b));
        // Same hash, different tokens or parent (a collision): no hit.
        assert_eq!(pool.lookup(h, None, &[1, 2, 3, 5]), None);
        assert_eq!(pool.lookup(h, Some(7), &[1, 2, 3, 4]), None);
        pool.touch(&[b]);
        assert_eq!((pool.ref_cnt(b), pool.num_free()), (1, 2));
        pool.free([b]);
        // Allocation takes the never-used block, then `other`, and only then evicts `b`.
        let got = pool.allocate(2).unwrap_or_default();
        assert!(!got.contains(&b));
        assert_eq!(pool.lookup(h, None, &[1, 2, 3, 4]), Some(b));
        assert_eq!(pool.allocate(1).unwrap_or_default(), vec![b]);
        assert_eq!(pool.lookup(h, None, &[1, 2, 3, 4]), None);
        assert_eq!(pool.num_cached(), 0);
    }

    #[test]
    fn hashes_chain_through_the_parent() {
        let pool = BlockPool::new(1);
        let a = pool.hash_block(None, &[1, 2]);
        let b = pool.hash_block(Some(a), &[3, 4]);
        assert_ne!(b, pool.hash_block(None, &[3, 4]));
        assert_eq!(b, pool.hash_block(Some(a), &[3, 4]));
    }

    #[test]
    fn free_queue_removes_from_the_middle() {
        let mut q = FreeQueue::new(5);
        q.remove(2);
        q.remove(2);
        assert_eq!(q.len(), 4);
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_front()).collect();
        assert_eq!(order, vec![0, 1, 3, 4]);
        assert_eq!(q.len(), 0);
    }
}
