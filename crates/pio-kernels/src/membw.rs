//! The machine's memory read bandwidth, measured: the physical limit of decode speed.

use crate::parallel;

/// Bytes per second the kernel threads ([`parallel::num_threads`]) read from a buffer larger
/// than the caches, best of several passes. Takes about a second and 1 GiB of memory.
pub fn read_bandwidth() -> f64 {
    // 1 GiB: virtual machines may report a last-level cache of hundreds of MiB.
    const BYTES: usize = 1 << 30;
    // On huge pages where the kernel allows them, as the weights decode streams are (see
    // [`crate::huge`]): on 4 KiB pages this read 29.5-30.8 GB/s where it reads 31.2-32.8 (2
    // threads, Sapphire Rapids VM, 3 alternated runs), a roofline decode could not be held to.
    let mut bytes = crate::huge::HugeArena::new().zeroed(BYTES);
    // SAFETY: every bit pattern is a valid u64; `align_to` puts any unaligned bytes in the
    // head and tail (none: the buffer starts a huge page).
    let (_, buf, _) = unsafe { bytes.align_to_mut::<u64>() };
    for (i, v) in buf.iter_mut().enumerate() {
        *v = i as u64;
    }
    let buf: &[u64] = buf;
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
