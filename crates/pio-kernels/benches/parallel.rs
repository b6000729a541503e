//! Overhead of splitting one operation across the cores: `pio_kernels::parallel` against rayon
//! and a scoped thread per range (the previous implementation).
//!
//! `cargo bench -p pio-kernels --bench parallel`. Groups:
//! - `split_empty`: one split into `num_threads()` empty tasks, back to back (workers awake).
//! - `split_5us`: `num_threads()` tasks of ~5 µs each; the ideal is 5 µs, serial is
//!   `num_threads() * 5` µs.
//! - `split_after_idle`: an empty split after 300 µs of idling, so that workers have gone to
//!   sleep and must be woken (the first operation of a decode step after a pause); empty, and
//!   with `num_threads()` tasks of ~5 µs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pio_kernels::parallel;

const TASK: Duration = Duration::from_micros(5);
const IDLE: Duration = Duration::from_micros(300);

/// Busy for `d` (a stand-in for a share of a small kernel).
fn busy(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn rayon_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(parallel::num_threads()).build().expect("rayon pool")
}

/// The previous implementation: a scoped thread per range.
fn thread_scope(n: usize, f: impl Fn(usize) + Sync) {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        for h in handles {
            let _ = h.join();
        }
    });
}

/// Rayon from a thread outside its pool (how the engine's thread would call it): the first
/// half on the calling side of the scope, the others spawned.
fn rayon_scope(pool: &rayon::ThreadPool, n: usize, f: impl Fn(usize) + Sync) {
    let f = &f;
    pool.scope(|s| {
        for i in 1..n {
            s.spawn(move |_| f(i));
        }
        f(0);
    });
}

/// Times `iters` calls of `op` run inside the rayon pool (`install`), so `rayon::join` takes
/// its fast path: the second half is pushed on the local deque and stolen (or run) from there.
fn inside_rayon(pool: &rayon::ThreadPool, iters: u64, op: impl Fn() + Sync + Send) -> Duration {
    pool.install(|| {
        let start = Instant::now();
        for _ in 0..iters {
            op();
        }
        start.elapsed()
    })
}

fn split_empty(c: &mut Criterion) {
    let n = parallel::num_threads();
    let pool = rayon_pool();
    let mut g = c.benchmark_group(format!("split_empty/{n}_threads"));
    g.bench_function("pio_for_each_task", |b| {
        b.iter(|| {
            parallel::for_each_task(n, &|i| {
                black_box(i);
            })
        })
    });
    g.bench_function("pio_for_each_range", |b| {
        b.iter(|| parallel::for_each_range(n, usize::MAX, |a, e| black_box(a + e)))
    });
    g.bench_function("rayon_pool_join_from_outside", |b| b.iter(|| pool.join(|| black_box(1), || black_box(2))));
    g.bench_function("rayon_pool_scope_from_outside", |b| {
        b.iter(|| {
            rayon_scope(&pool, n, |i| {
                black_box(i);
            })
        })
    });
    g.bench_function("rayon_join_inside_install", |b| {
        b.iter_custom(|iters| {
            inside_rayon(&pool, iters, || {
                black_box(rayon::join(|| black_box(1), || black_box(2)));
            })
        })
    });
    g.bench_function("std_thread_scope_spawn", |b| {
        b.iter(|| {
            thread_scope(n, |i| {
                black_box(i);
            })
        })
    });
    g.finish();
}

fn split_5us(c: &mut Criterion) {
    let n = parallel::num_threads();
    let pool = rayon_pool();
    let mut g = c.benchmark_group(format!("split_5us/{n}_threads"));
    g.bench_function("serial", |b| b.iter(|| (0..n).for_each(|_| busy(TASK))));
    g.bench_function("pio_for_each_task", |b| b.iter(|| parallel::for_each_task(n, &|_| busy(TASK))));
    g.bench_function("pio_for_each_range", |b| b.iter(|| parallel::for_each_range(n, usize::MAX, |_, _| busy(TASK))));
    g.bench_function("rayon_pool_join_from_outside", |b| b.iter(|| pool.join(|| busy(TASK), || busy(TASK))));
    g.bench_function("rayon_pool_scope_from_outside", |b| b.iter(|| rayon_scope(&pool, n, |_| busy(TASK))));
    g.bench_function("rayon_join_inside_install", |b| {
        b.iter_custom(|iters| {
            inside_rayon(&pool, iters, || {
                rayon::join(|| busy(TASK), || busy(TASK));
            })
        })
    });
    g.bench_function("std_thread_scope_spawn", |b| b.iter(|| thread_scope(n, |_| busy(TASK))));
    g.finish();
}

/// Times each of `iters` calls of `op` after [`IDLE`] of sleep (not timed).
fn after_idle(iters: u64, op: impl Fn()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        std::thread::sleep(IDLE);
        let start = Instant::now();
        op();
        total += start.elapsed();
    }
    total
}

fn split_after_idle(c: &mut Criterion) {
    let n = parallel::num_threads();
    let pool = rayon_pool();
    let mut g = c.benchmark_group(format!("split_after_idle/{n}_threads"));
    g.sample_size(20);
    g.bench_function("pio_for_each_task", |b| {
        b.iter_custom(|iters| {
            after_idle(iters, || {
                parallel::for_each_task(n, &|i| {
                    black_box(i);
                })
            })
        })
    });
    g.bench_function("rayon_pool_join_from_outside", |b| {
        b.iter_custom(|iters| {
            after_idle(iters, || {
                pool.join(|| black_box(1), || black_box(2));
            })
        })
    });
    g.bench_function("std_thread_scope_spawn", |b| {
        b.iter_custom(|iters| {
            after_idle(iters, || {
                thread_scope(n, |i| {
                    black_box(i);
                })
            })
        })
    });
    // With work to share, a late worker shows: the caller runs the unclaimed tasks itself.
    g.bench_function("5us_serial", |b| b.iter_custom(|iters| after_idle(iters, || (0..n).for_each(|_| busy(TASK)))));
    g.bench_function("5us_pio_for_each_task", |b| {
        b.iter_custom(|iters| after_idle(iters, || parallel::for_each_task(n, &|_| busy(TASK))))
    });
    g.bench_function("5us_rayon_pool_join_from_outside", |b| {
        b.iter_custom(|iters| {
            after_idle(iters, || {
                pool.join(|| busy(TASK), || busy(TASK));
            })
        })
    });
    g.bench_function("5us_rayon_join_inside_install", |b| {
        b.iter_custom(|iters| {
            pool.install(|| {
                after_idle(iters, || {
                    rayon::join(|| busy(TASK), || busy(TASK));
                })
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = split_empty, split_5us, split_after_idle
}
criterion_main!(benches);
