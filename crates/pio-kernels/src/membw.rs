//! The machine's memory read bandwidth, measured: the physical limit of decode speed.

use crate::parallel;

/// Bytes per second the kernel threads ([`parallel::num_threads`]) read from a buffer larger
/// than the caches, best of several passes. Takes about a second and 1 GiB of memory.
pub fn read_bandwidth() -> f64 {
    // 1 GiB: virtual machines may report a last-level cache of hundreds of MiB.
    const BYTES: usize = 1 << 30;
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let mut best = 0f64;
    for _ in 0..4 {
        let start = std::time::Instant::now();
        let sums = parallel::for_each_range(buf.len(), usize::MAX, |a, b| sum_u64(&buf[a..b]));
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sums);
        best = best.max(BYTES as f64 / secs);
    }
    best
}

/// Sum with independent accumulators so the loop is bound by loads, not by the adds. Each
/// 64-byte line read asks for the line 8 KiB ahead into L2, as the decode kernels do. Without
/// it, on the hardware prefetchers alone, this loop read 21-28 GB/s (median 22) where it now
/// reads 27 (2 threads, Sapphire Rapids), less than decode of the Qwen3-4B-shaped Q4_K_M file
/// streamed (25 GB/s), so the roofline came out below what decode reached.
fn sum_u64(v: &[u64]) -> u64 {
    const AHEAD: usize = 8192;
    let mut acc = [0u64; 8];
    let (chunks, rest) = v.as_chunks::<8>();
    for c in chunks {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch never faults, wherever it points; SSE is part of x86-64.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            _mm_prefetch::<_MM_HINT_T1>((c.as_ptr() as *const i8).wrapping_add(AHEAD));
        }
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().chain(rest).fold(0u64, |a, &b| a.wrapping_add(b))
}
