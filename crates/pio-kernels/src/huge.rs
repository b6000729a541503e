//! Memory for the matrices decode streams, on transparent huge pages.
//!
//! Decode reads every weight once per token. With 4 KiB pages that is a TLB miss (a page walk,
//! two-level under a hypervisor) every 64 cache lines, and the hardware prefetchers stop at
//! every page boundary. `MADV_HUGEPAGE` asks the kernel for 2 MiB pages instead, but only whole,
//! aligned 2 MiB ranges get them: a matrix allocated on its own (Qwen3-0.6B's are 0.5-1.7 MB,
//! a mixture's experts smaller still) gets none. So the matrices of a model are placed one
//! after another in large aligned chunks ([`HugeArena`]), each advised before anything is
//! written to it. Qwen3-0.6B-shaped Q4_K_M: 126 MB of its 390 MB of weights were on huge pages
//! (the LM head), and its decode at 2 threads went from 45-50 to 54-55 tok/s at AVX2 and 55-58
//! to 59-61 at AVX-512 with all of them there (`pio bench`, 3 alternated rounds).

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// The huge page size the chunks are aligned to.
const HUGE: usize = 2 << 20;

/// Bytes per chunk; larger requests get a chunk of their own. Above glibc's largest dynamic
/// mmap threshold (32 MiB), so every chunk is a fresh mapping, never reused heap pages that
/// were already faulted in as small ones.
const CHUNK: usize = 64 << 20;

/// Where each allocation starts within a chunk (cache lines).
const ALIGN: usize = 64;

/// One aligned allocation, advised for huge pages; freed when its last [`HugeBytes`] goes.
struct Chunk {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: a chunk is plain memory; the `HugeBytes` carved from it own disjoint ranges, and only
// they read or write it.
unsafe impl Send for Chunk {}
// SAFETY: as above; `&Chunk` gives no access to the memory by itself.
unsafe impl Sync for Chunk {}

impl Chunk {
    fn new(len: usize) -> Chunk {
        let len = len.next_multiple_of(HUGE);
        let layout = Layout::from_size_align(len, HUGE).unwrap_or_else(|_| panic!("a chunk of {len} bytes"));
        // SAFETY: `layout` has a non-zero size (`len` >= HUGE).
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // The allocation just made, which nothing has touched: whole huge pages.
        advise_range(ptr as usize, len);
        Chunk { ptr, layout }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `Chunk::new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Asks for huge pages under the whole 2 MiB pages inside `buf`, a large buffer not yet written
/// (zeroed pages the kernel maps on first touch, as `vec![0; n]` of a large `n` gets): those
/// pages are then mapped huge when first touched. Smaller buffers, and the ends of larger ones,
/// keep small pages.
pub fn advise<T>(buf: &[T]) {
    advise_range(buf.as_ptr() as usize, std::mem::size_of_val(buf));
}

/// `MADV_HUGEPAGE` on the whole 2 MiB pages inside the `len` bytes at address `start`, which
/// belong to one allocation of the caller's.
fn advise_range(start: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let (a, b) = (start.next_multiple_of(HUGE), (start + len) / HUGE * HUGE);
        if a < b {
            // SAFETY: `a..b` lies inside the caller's allocation; the advice only changes how the
            // kernel backs those pages, never what they hold (an error, such as huge pages being
            // off, leaves them as they are).
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}

/// Zeroed byte buffers placed one after another in huge-page chunks. Drop the arena once the
/// buffers are made: each chunk lives as long as some buffer in it does.
#[derive(Default)]
pub struct HugeArena {
    /// The chunk being filled and how much of it is used.
    current: Option<(Arc<Chunk>, usize)>,
}

impl HugeArena {
    pub fn new() -> HugeArena {
        HugeArena::default()
    }

    /// `len` zero bytes of their own.
    pub fn zeroed(&mut self, len: usize) -> HugeBytes {
        if len == 0 {
            return HugeBytes { chunk: None, offset: 0, len: 0 };
        }
        let (chunk, offset) = if len > CHUNK / 2 {
            // A large buffer gets a chunk of its own, and the current one keeps its room.
            (Arc::new(Chunk::new(len)), 0)
        } else {
            let (chunk, offset) = match self.current.take() {
                Some((chunk, used)) if used + len <= chunk.layout.size() => (chunk, used),
                _ => (Arc::new(Chunk::new(CHUNK)), 0),
            };
            self.current = Some((Arc::clone(&chunk), (offset + len).next_multiple_of(ALIGN)));
            (chunk, offset)
        };
        // SAFETY: `offset..offset + len` lies inside the chunk (checked above, or a new chunk of
        // at least `len`), and no other buffer has it: the arena hands each range out once.
        unsafe { std::ptr::write_bytes(chunk.ptr.add(offset), 0, len) };
        HugeBytes { chunk: Some(chunk), offset, len }
    }
}

/// A byte buffer in a [`HugeArena`] chunk, the only owner of its range.
pub struct HugeBytes {
    chunk: Option<Arc<Chunk>>,
    offset: usize,
    len: usize,
}

impl Deref for HugeBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.chunk {
            // SAFETY: the range lies inside the chunk, which this buffer keeps alive, and only
            // this buffer reaches it (shared here through `&self`).
            Some(c) => unsafe { std::slice::from_raw_parts(c.ptr.add(self.offset), self.len) },
            None => &[],
        }
    }
}

impl DerefMut for HugeBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &self.chunk {
            // SAFETY: as in `deref`, and `&mut self` makes this the only access.
            Some(c) => unsafe { std::slice::from_raw_parts_mut(c.ptr.add(self.offset), self.len) },
            None => &mut [],
        }
    }
}

impl std::fmt::Debug for HugeBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_disjoint_aligned_and_outlive_the_arena() {
        let mut arena = HugeArena::new();
        let sizes = [1usize, 100, 4096, 3 << 20, 0, CHUNK / 2 + 1, 17, CHUNK / 2, CHUNK / 2];
        let mut bufs: Vec<HugeBytes> = sizes.iter().map(|&n| arena.zeroed(n)).collect();
        drop(arena);
        for (i, (b, &n)) in bufs.iter_mut().zip(&sizes).enumerate() {
            assert_eq!(b.len(), n);
            assert!(b.iter().all(|&x| x == 0), "buffer {i} is not zeroed");
            if n > 0 {
                assert_eq!(b.as_ptr() as usize % ALIGN, 0, "buffer {i}");
            }
            b.fill(i as u8 + 1);
        }
        // No buffer wrote over another.
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8 + 1), "buffer {i} was overwritten");
        }
        // Small buffers share a chunk; one above half a chunk has its own.
        let same = |a: &HugeBytes, b: &HugeBytes| match (&a.chunk, &b.chunk) {
            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
            _ => false,
        };
        assert!(same(&bufs[0], &bufs[1]) && same(&bufs[1], &bufs[2]) && same(&bufs[2], &bufs[3]));
        assert!(!same(&bufs[5], &bufs[6]) && same(&bufs[3], &bufs[6]));
        // The second half chunk does not fit in what the first left: a new chunk.
        assert!(same(&bufs[6], &bufs[7]) && !same(&bufs[7], &bufs[8]));
    }

    #[test]
    fn advice_keeps_contents_of_any_buffer() {
        for n in [0usize, 1, 4095, 3 << 20, (5 << 20) + 7] {
            let mut v = vec![0u8; n];
            advise(&v);
            v.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
            advise(&v[n / 3..]);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u8), "{n}");
        }
    }
}
