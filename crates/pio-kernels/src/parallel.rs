//! Splitting one operation across the machine's cores.
//!
//! Scoped threads spawned per call: simple and correct, ~10-30 µs per split. A persistent pool
//! with cheaper hand-off replaces this when the fast kernels land; callers only see
//! [`for_each_range`].

use std::sync::OnceLock;

/// Number of worker threads: `PIO_THREADS` if set, else the available cores.
pub fn num_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("PIO_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// Runs `f(start, end)` over disjoint ranges covering `0..n`, in parallel when `work` (a rough
/// count of operations) is large enough to pay for the threads. Returns the per-range results
/// in order.
pub fn for_each_range<T: Send>(n: usize, work: usize, f: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    const MIN_WORK_PER_THREAD: usize = 1 << 16;
    let threads = num_threads().min(n.max(1)).min(work / MIN_WORK_PER_THREAD).max(1);
    if threads == 1 {
        return vec![f(0, n)];
    }
    let chunk = n.div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (a, b) = ((t * chunk).min(n), ((t + 1) * chunk).min(n));
                s.spawn(move || f(a, b))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}
