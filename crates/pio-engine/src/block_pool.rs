//! Fixed-size KV cache blocks: which are free, handed out and given back.

/// A free list over `num_blocks` block ids.
#[derive(Debug)]
pub struct BlockPool {
    num_blocks: usize,
    /// Free block ids; the next allocation pops from the end.
    free: Vec<u32>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> BlockPool {
        BlockPool { num_blocks, free: (0..num_blocks as u32).rev().collect() }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// `n` blocks, or `None` (taking nothing) when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n).into_iter().rev().collect())
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_reuses_released_blocks() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3).unwrap_or_default();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1);
        pool.release(a);
        assert_eq!(pool.num_free(), 4);
        let b = pool.allocate(4).unwrap_or_default();
        let mut sorted = b.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
    }
}
