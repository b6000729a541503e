//! Splitting one operation across the machine's cores.
//!
//! A decode step runs hundreds of small operations (matrix-vector products of 0.1-5 MB,
//! attention), each split across the cores, so the cost of a split must stay in the low
//! microseconds. Callers see [`for_each_range`] (contiguous ranges, results in order) and
//! [`for_each_task`] (tasks claimed one by one from a shared counter, for uneven work).
//!
//! # The pool
//!
//! A [`ThreadPool`] of `threads - 1` persistent workers; the calling thread takes a share too.
//! Kernels use the pool installed on the calling thread ([`ThreadPool::install`]), else a
//! default one. Publishing a job is three atomic operations: the job's address, an `OPEN` bit in the
//! `active` word, and a bump of the generation counter. Workers spin on the generation for
//! 50 µs after their last job (the gaps between the operations of a decode step are
//! far shorter), then park so that an idle process burns no CPU; the caller unparks parked
//! workers when it publishes. Every thread, the caller included, claims tasks from the job's
//! atomic counter until none is left, so a worker that wakes late costs nothing but its share
//! of the parallelism: the caller runs what nobody claimed.
//!
//! A worker joins a job by incrementing `active` and leaves by decrementing it; a join that
//! finds `OPEN` clear touches nothing. The caller, after its own share, clears `OPEN` and waits
//! (spinning, then parked) until `active` is zero; only then does it return and the borrowed
//! closure go out of scope. Correctness never depends on a worker waking up, so a lost wake-up
//! can only cost speed, never hang.
//!
//! - A panic in a task is caught on the thread that ran it, the remaining tasks are skipped,
//!   and the first payload is re-raised on the caller ([`std::panic::resume_unwind`]) once every
//!   worker has left the job; the pool stays usable.
//! - One caller at a time: a call made while the pool is busy, from inside a task (nested) or
//!   from another thread, runs its tasks inline on the current thread instead of waiting, so
//!   nested calls cannot deadlock. [`for_each_range`] splits into the same ranges either way,
//!   so results do not depend on contention.
//!
//! # Measured overhead
//!
//! `cargo bench -p pio-kernels --bench parallel` on the 2-core development machine (a VM),
//! criterion medians: a split into 2 empty tasks (the pure overhead), a split into 2 tasks of
//! ~5 µs (ideal 5 µs, serial 10.2 µs), and both after 300 µs of idling (workers parked).
//!
//! | split                                     | empty       | 2 × 5 µs   | idle, empty | idle, 2 × 5 µs |
//! | ----------------------------------------- | ----------- | ---------- | ----------- | -------------- |
//! | this pool, [`for_each_task`]              | 0.56 µs     | 5.6 µs     | 0.9 µs      | 11.4 µs        |
//! | this pool, [`for_each_range`]             | 0.6-0.75 µs | 6.1-6.4 µs |             |                |
//! | rayon `ThreadPool::join` from outside     | 14 µs       | 21 µs      | 52 µs       | 60 µs          |
//! | rayon `ThreadPool::scope` from outside    | 13 µs       | 19 µs      |             |                |
//! | rayon `join` inside `ThreadPool::install` | 0.04 µs*    | 6.0 µs     |             | 11.7 µs        |
//! | `std::thread::scope`, a thread per range  | 75 µs       | 97 µs      | 75 µs       |                |
//!
//! \* Not a split: with nothing to do, the second half is popped back and run inline before
//! another worker steals it.
//!
//! Why not rayon: called from a thread outside its pool, as the engine's thread and the tests
//! call, a split costs 13-14 µs (the job is injected into a global queue and the caller blocks
//! on a mutex and condition variable), so splitting 2 × 5 µs takes twice as long as running it
//! serially. Only inside `install`, with the whole engine running on a rayon worker and every
//! kernel written as `join`/`par_iter`, does rayon match this pool (6.0 µs against 5.6 µs), and
//! after an idle pause both are bound by the same OS wake-up. This pool gets that best case
//! from any thread for ~300 lines of `std`, no dependency, contiguous ranges fixed by the
//! arguments, and one `unsafe` dereference. The up to ~0.2 µs (varying from run to run) that
//! [`for_each_range`] adds over [`for_each_task`] is its result slots (two allocations and a
//! mutex per range).
//!
//! A parked worker wakes in more than 5 µs on this machine, so the first split after an idle
//! pause runs mostly on the caller (11.4 µs, against 10.2 µs serial); within a decode step the
//! operations follow one another closely enough that workers stay in their spin window.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker spins on the generation counter before it parks.
const WORKER_SPIN: Duration = Duration::from_micros(50);

/// How long the caller spins waiting for the workers to leave a job before it parks.
const CALLER_SPIN: Duration = Duration::from_micros(50);

/// Below this much work (a rough count of operations) per thread, a split does not pay.
const MIN_WORK_PER_THREAD: usize = 1 << 16;

/// A set of threads the kernels split their work across: the calling thread and
/// `threads - 1` persistent workers. Cheap to clone (the clones share the workers); the workers
/// exit when the last clone is dropped.
///
/// Kernels run on the pool [installed](ThreadPool::install) on the calling thread, or else on
/// the default pool ([`ThreadPool::default_pool`]). So the thread count is the configuration of
/// whoever installs the pool (the CLI's `--threads`, an engine's spawner), not a process-wide
/// setting, and two engines in one process can run on pools of their own.
#[derive(Clone)]
pub struct ThreadPool(Arc<Pool>);

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool").field("threads", &self.threads()).finish()
    }
}

thread_local! {
    /// The pool [`ThreadPool::install`] made current on this thread.
    static CURRENT: std::cell::RefCell<Option<ThreadPool>> = const { std::cell::RefCell::new(None) };
    /// On a pool's worker thread, that pool's thread count (0 elsewhere): a split made from
    /// inside a task runs inline, over the ranges the pool would have used.
    static WORKER_OF: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller and `threads - 1` workers; 0 counts as 1).
    pub fn new(threads: usize) -> ThreadPool {
        ThreadPool(Arc::new(Pool::new(threads.max(1))))
    }

    /// The pool kernels use on a thread where none is installed: `PIO_THREADS` threads if that
    /// is set, else one per available core. Made at its first use.
    pub fn default_pool() -> ThreadPool {
        static DEFAULT: OnceLock<ThreadPool> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                let n = std::env::var("PIO_THREADS")
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                ThreadPool::new(n)
            })
            .clone()
    }

    /// Threads that take part in a split: the workers and the caller.
    pub fn threads(&self) -> usize {
        self.0.threads()
    }

    /// Runs `f` with this pool current on the calling thread: every kernel `f` calls there
    /// splits its work across this pool. The previous pool is current again afterwards (also
    /// if `f` panics).
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<ThreadPool>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let prev = self.0.take();
                CURRENT.with(|c| *c.borrow_mut() = prev);
            }
        }
        let prev = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        let _restore = Restore(prev);
        f()
    }

    /// The pool kernels called from this thread use: the installed one, else the default.
    pub fn current() -> ThreadPool {
        CURRENT.with(|c| c.borrow().clone()).unwrap_or_else(ThreadPool::default_pool)
    }
}

/// Number of threads a split on this thread is sized for: those of [`ThreadPool::current`] (on
/// a pool's worker, those of its pool, though such a split runs inline).
pub fn num_threads() -> usize {
    match WORKER_OF.with(|w| w.get()) {
        0 => ThreadPool::current().threads(),
        n => n,
    }
}

/// Runs `f(start, end)` over disjoint ranges covering `0..n`, in parallel when `work` (a rough
/// count of operations) is large enough to pay for the threads. Returns the per-range results
/// in order. The ranges depend only on `n`, `work` and [`num_threads`]; `n == 0` gives one call
/// `f(0, 0)`.
pub fn for_each_range<T: Send>(n: usize, work: usize, f: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    for_each_range_balanced(n, work, 1, f)
}

/// [`for_each_range`] in up to `per_thread` ranges per thread, which the threads claim one at a
/// time: a thread slowed down (by a neighbour on the machine, or by its share of the memory
/// bandwidth) takes fewer of them instead of keeping the others waiting at the end. The ranges
/// shrink as they go ([`tapered_bounds`]), so the last claimed are short.
pub fn for_each_range_balanced<T: Send>(
    n: usize,
    work: usize,
    per_thread: usize,
    f: impl Fn(usize, usize) -> T + Sync,
) -> Vec<T> {
    // Too little for two threads whatever the pool: one range here, without looking the pool up
    // (a decode's row-wise steps come through here several times a layer).
    if busy_threads(n, work, usize::MAX) == 1 {
        return vec![f(0, n)];
    }
    let bounds = |threads: usize| match busy_threads(n, work, threads) {
        1 => vec![0, n],
        busy => tapered_bounds(n, busy, per_thread.max(1)),
    };
    match WORKER_OF.with(|w| w.get()) {
        0 => {
            let pool = ThreadPool::current();
            split_bounds(Some(&pool.0), &bounds(pool.threads()), &f)
        }
        // Inline on a worker, in the same ranges (they depend only on `n`, `work` and
        // [`num_threads`]).
        threads => split_bounds(None, &bounds(threads), &f),
    }
}

/// Bounds of `0..n` in `rounds` rounds of `busy` ranges each, claimed in order: round `r`
/// (before the last) covers half of what the earlier rounds left, the last round the rest, so
/// the ranges shrink and the last ones claimed (which decide how long the others wait at the
/// end) are small while the count of claims stays `busy * rounds`. Empty ranges are dropped.
fn tapered_bounds(n: usize, busy: usize, rounds: usize) -> Vec<usize> {
    let mut bounds = vec![0];
    for r in 0..rounds {
        let from = bounds[bounds.len() - 1];
        let to = if r + 1 == rounds { n } else { from + (n - from) / 2 };
        for i in 1..=busy {
            let b = from + (to - from) * i / busy;
            if b > bounds[bounds.len() - 1] {
                bounds.push(b);
            }
        }
    }
    if bounds.len() == 1 {
        bounds.push(n);
    }
    bounds
}

/// Of `threads`, how many a split of `n` items and `work` operations keeps busy: at most one per
/// item and per [`MIN_WORK_PER_THREAD`] operations, at least one.
fn busy_threads(n: usize, work: usize, threads: usize) -> usize {
    threads.min(n.max(1)).min(work / MIN_WORK_PER_THREAD).max(1)
}

/// Runs `f(r0, rows)` over disjoint ranges of the rows of `K` buffers at once, in parallel
/// when `work` (a rough count of operations, as [`for_each_range`]) pays for the threads: buffer
/// `i` holds rows of `widths[i]` values, every buffer the same number of rows, and `rows[i]` is
/// rows `r0..` of buffer `i` (the same rows of each). For the row-wise steps between the
/// products (norms, rotations, activations, residual adds): done on the calling thread alone
/// for a prefill, they kept the other waiting.
pub fn for_each_rows_mut<const K: usize>(
    bufs: [&mut [f32]; K],
    widths: [usize; K],
    work: usize,
    f: impl Fn(usize, [&mut [f32]; K]) + Sync,
) {
    let n = match widths.first() {
        Some(&w) if w > 0 => bufs[0].len() / w,
        _ => 0,
    };
    for (b, &w) in bufs.iter().zip(&widths) {
        assert!(w > 0 && b.len() == n * w, "buffers of different row counts");
    }
    let mut bufs = bufs;
    let ptrs: [SharedOut; K] = std::array::from_fn(|i| SharedOut(bufs[i].as_mut_ptr(), bufs[i].len()));
    for_each_range(n, work, |r0, r1| {
        let rows: [&mut [f32]; K] = std::array::from_fn(|i| {
            let w = widths[i];
            assert!(r1 * w <= ptrs[i].1);
            // SAFETY: in bounds (asserted); the ranges `r0..r1` are disjoint, so no two threads
            // touch the same rows, and `bufs` stay borrowed mutably by this call throughout.
            unsafe { std::slice::from_raw_parts_mut(ptrs[i].0.add(r0 * w), (r1 - r0) * w) }
        });
        f(r0, rows)
    });
}

/// Runs `f(i)` for every `i` in `0..n_tasks`, each exactly once, on the calling thread and the
/// current pool's workers, which claim tasks one at a time (so uneven tasks balance
/// themselves). Returns when all have run; a panic in a task is re-raised here.
pub fn for_each_task(n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    if WORKER_OF.with(|w| w.get()) != 0 {
        return (0..n_tasks).for_each(f);
    }
    ThreadPool::current().0.run(n_tasks, f)
}

/// `f` over the ranges `bounds[t]..bounds[t + 1]`, results in order; on `pool`, or inline
/// without one.
fn split_bounds<T: Send, F: Fn(usize, usize) -> T + Sync>(pool: Option<&Pool>, bounds: &[usize], f: &F) -> Vec<T> {
    let parts = bounds.len().saturating_sub(1);
    if parts <= 1 {
        return vec![f(bounds.first().copied().unwrap_or(0), bounds.last().copied().unwrap_or(0))];
    }
    let slots: Vec<Mutex<Option<T>>> = (0..parts).map(|_| Mutex::new(None)).collect();
    let task = |t: usize| {
        let r = f(bounds[t], bounds[t + 1]);
        *lock(&slots[t]) = Some(r);
    };
    match pool {
        Some(pool) => pool.run(parts, &task),
        None => (0..parts).for_each(task),
    }
    // `run` returned normally, so every task ran and every slot is full.
    slots.into_iter().filter_map(|s| s.into_inner().unwrap_or_else(PoisonError::into_inner)).collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bit of [`Shared::active`] set while a job is open to joining workers; the bits below count
/// the workers inside the job.
const OPEN: usize = 1 << (usize::BITS - 1);

/// A persistent set of worker threads and the caller's side of the hand-off.
struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// The state the caller and the workers share.
struct Shared {
    /// Held by the one caller whose job is published (see [`Busy`]).
    busy: AtomicBool,
    /// Bumped once per published job (and on shutdown): what idle workers wait on.
    generation: AtomicUsize,
    /// [`OPEN`] while the current job may be joined, plus the number of workers inside it.
    active: AtomicUsize,
    /// The current job, valid while `OPEN` is set or any worker that joined it is inside.
    job: AtomicPtr<Job<'static>>,
    /// Workers parked or about to park.
    sleepers: AtomicUsize,
    /// The caller is parked (or about to) waiting for `active` to reach zero.
    caller_parked: AtomicBool,
    /// The caller to unpark when the last worker leaves a closed job.
    caller: Mutex<Option<thread::Thread>>,
    /// Workers exit at their next wake-up (set only when a [`Pool`] is dropped).
    shutdown: AtomicBool,
}

/// One call's tasks, on the caller's stack.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n_tasks: usize,
    /// The next task to claim; values past `n_tasks` mean none is left.
    next: AtomicUsize,
    /// The first panic payload of any task.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// Workers share a `Job` by reference.
const _: fn() = || {
    fn sync<T: Sync>() {}
    sync::<Job<'static>>();
};

impl Job<'_> {
    /// Claims and runs tasks until none is left. Never unwinds: a panic is stored in `panic`
    /// and skips the tasks not yet claimed.
    fn work(&self) {
        let result = panic::catch_unwind(AssertUnwindSafe(|| loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n_tasks {
                break;
            }
            (self.f)(i);
        }));
        if let Err(payload) = result {
            self.next.store(self.n_tasks, Ordering::Relaxed);
            let mut first = lock(&self.panic);
            if first.is_none() {
                *first = Some(payload);
            } else {
                // Dropping a payload could itself panic; a second payload is not worth that.
                std::mem::forget(payload);
            }
        }
    }
}

/// Releases [`Shared::busy`] when dropped, also while unwinding.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Pool {
    /// A pool for `threads` threads in all: the caller and `threads - 1` workers (fewer if the
    /// system refuses to spawn them).
    fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            busy: AtomicBool::new(false),
            generation: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            caller_parked: AtomicBool::new(false),
            caller: Mutex::new(None),
            shutdown: AtomicBool::new(false),
        });
        let workers = (1..threads)
            .map_while(|i| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("pio-worker-{i}"))
                    .spawn(move || {
                        WORKER_OF.with(|w| w.set(threads));
                        shared.worker_loop()
                    })
                    .ok()
            })
            .collect();
        Pool { shared, workers }
    }

    /// Threads that take part in a job: the workers and the caller.
    fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..n_tasks` on the caller and the workers; inline if
    /// there is nothing to share or the pool is busy (nested or concurrent calls).
    fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks <= 1 || self.workers.is_empty() {
            return (0..n_tasks).for_each(f);
        }
        let sh = &*self.shared;
        if sh.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return (0..n_tasks).for_each(f);
        }
        let _busy = Busy(&sh.busy);

        let job = Job { f, n_tasks, next: AtomicUsize::new(0), panic: Mutex::new(None) };
        // Only the lifetime changes; workers dereference this only while the job is alive (see
        // `Shared::help`).
        sh.job.store(std::ptr::from_ref(&job).cast_mut().cast::<Job<'static>>(), Ordering::Relaxed);
        // Release: a worker whose join observes OPEN also sees `job` and its contents.
        sh.active.fetch_or(OPEN, Ordering::Release);
        sh.generation.fetch_add(1, Ordering::SeqCst);
        // SeqCst pairs with the sleepers' increment-then-check in `wait_for_job`: either they
        // see the new generation, or we see them and unpark them (an unpark before the park
        // makes the park return at once). Waking more workers than there are tasks is useless.
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            self.workers.iter().take(n_tasks - 1).for_each(|w| w.thread().unpark());
        }

        job.work();

        // Close the job, then wait until every worker that joined it has left.
        sh.active.fetch_and(!OPEN, Ordering::AcqRel);
        sh.wait_until_idle();
        sh.job.store(std::ptr::null_mut(), Ordering::Relaxed);

        let payload = job.panic.into_inner().unwrap_or_else(PoisonError::into_inner);
        if let Some(payload) = payload {
            panic::resume_unwind(payload);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            // A worker never unwinds (tasks' panics are caught), so there is nothing to report.
            let _ = w.join();
        }
    }
}

impl Shared {
    fn worker_loop(&self) {
        // The generation the pool was created with, not the current one: a worker that starts
        // late must still see a shutdown (or a job) published before it ran.
        let mut seen = 0;
        loop {
            seen = self.wait_for_job(seen);
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            self.help();
        }
    }

    /// Waits until the generation differs from `seen` and returns it: spinning for
    /// [`WORKER_SPIN`], then parked.
    fn wait_for_job(&self, seen: usize) -> usize {
        let mut g = seen;
        if spin_until(WORKER_SPIN, || {
            g = self.generation.load(Ordering::Acquire);
            g != seen
        }) {
            return g;
        }
        loop {
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            if self.generation.load(Ordering::SeqCst) == seen {
                thread::park();
            }
            self.sleepers.fetch_sub(1, Ordering::Relaxed);
            let g = self.generation.load(Ordering::Acquire);
            if g != seen {
                return g;
            }
        }
    }

    /// Joins the current job if it is still open, works on it, and leaves.
    fn help(&self) {
        // Acquire: pairs with the caller's release of OPEN, publishing `job`.
        let joined = self.active.fetch_add(1, Ordering::Acquire);
        if joined & OPEN != 0 {
            let job = self.job.load(Ordering::Relaxed);
            // SAFETY: `job` points to the `Job` on the stack of the caller in `Pool::run`, which
            // stored it before setting OPEN. We joined while OPEN was set, so our count in
            // `active` is part of what the caller waits for after closing the job: it does not
            // return, and the `Job` and the closure it borrows stay alive and in place, until
            // `active` reads zero, which cannot happen before our `leave` below, after our last
            // use of `job`. Nor can another job be published meanwhile (that too needs `active`
            // at zero first), so this is the job we joined. The `'static` is a lie never acted
            // on: the reference does not escape this block. Everything the workers touch in a
            // `Job` is `Sync`.
            if let Some(job) = unsafe { job.as_ref() } {
                job.work();
            }
        }
        self.leave();
    }

    fn leave(&self) {
        // SeqCst pairs with the caller's flag-then-check in `wait_until_idle`.
        let before = self.active.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.caller_parked.swap(false, Ordering::SeqCst) {
            if let Some(caller) = lock(&self.caller).as_ref() {
                caller.unpark();
            }
        }
    }

    /// The caller's wait for `active` to reach zero: spinning for [`CALLER_SPIN`], then parked.
    fn wait_until_idle(&self) {
        // Acquire: the workers' writes (results, panics) happen before their leave.
        if spin_until(CALLER_SPIN, || self.active.load(Ordering::Acquire) == 0) {
            return;
        }
        *lock(&self.caller) = Some(thread::current());
        loop {
            // Re-armed on every round: a stale unpark from a previous job may have cleared it.
            self.caller_parked.store(true, Ordering::SeqCst);
            if self.active.load(Ordering::SeqCst) == 0 {
                self.caller_parked.store(false, Ordering::Relaxed);
                return;
            }
            thread::park();
        }
    }
}

/// Spins until `done()` holds (returning true) or `limit` has passed (returning false).
#[inline]
fn spin_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    if done() {
        return true;
    }
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        std::hint::spin_loop();
        if done() {
            return true;
        }
        spins = spins.wrapping_add(1);
        // The clock costs tens of nanoseconds: read it now and then.
        if spins.is_multiple_of(64) && start.elapsed() >= limit {
            return false;
        }
    }
}

/// Splits items `0..n_items` into `parts` consecutive ranges of about equal total `cost`:
/// returns `parts + 1` bounds, range `i` being `bounds[i]..bounds[i + 1]`. For work whose items
/// cost very differently (attention over contexts of different lengths).
pub(crate) fn balanced_bounds(n_items: usize, parts: usize, cost: impl Fn(usize) -> usize) -> Vec<usize> {
    let total: usize = (0..n_items).map(&cost).sum();
    let mut bounds = Vec::with_capacity(parts + 1);
    bounds.push(0);
    let mut acc = 0;
    for it in 0..n_items {
        acc += cost(it);
        // Close part `bounds.len() - 1` once it holds its share of the total.
        if bounds.len() < parts && acc * parts >= total * bounds.len() {
            bounds.push(it + 1);
        }
    }
    while bounds.len() <= parts {
        bounds.push(n_items);
    }
    bounds
}

/// An output buffer every thread of a split writes at once, each only its own disjoint rows:
/// `(pointer, length)` of a `&mut [f32]` the caller holds borrowed for the whole split.
pub(crate) struct SharedOut(pub *mut f32, pub usize);

// SAFETY: users write disjoint ranges, only while the caller's `&mut [f32]` is borrowed by the
// function running the split (which outlives it).
unsafe impl Sync for SharedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// `f` over `parts` equal ranges of `0..n` (lengths differ by at most one), as
    /// [`for_each_range`] splits, results in order; on `pool`, or inline without one.
    fn split_ranges<T: Send, F: Fn(usize, usize) -> T + Sync>(
        pool: Option<&Pool>,
        n: usize,
        parts: usize,
        f: &F,
    ) -> Vec<T> {
        if parts <= 1 {
            return vec![f(0, n)];
        }
        let bounds: Vec<usize> = (0..=parts).map(|t| t * (n / parts) + t.min(n % parts)).collect();
        split_bounds(pool, &bounds, f)
    }

    /// Checks that `split_ranges` over `parts` covers `0..n` exactly once, in order.
    fn check_ranges(pool: &Pool, n: usize, parts: usize) {
        let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        let ranges = split_ranges(Some(pool), n, parts, &|a, b| {
            for h in &hits[a..b] {
                h.fetch_add(1, Ordering::Relaxed);
            }
            (a, b)
        });
        assert_eq!(ranges.len(), parts.max(1), "n={n} parts={parts}");
        assert_eq!(ranges.first().map(|r| r.0), Some(0));
        assert_eq!(ranges.last().map(|r| r.1), Some(n));
        for w in ranges.windows(2) {
            assert_eq!(w[0].1, w[1].0, "n={n} parts={parts}: {ranges:?}");
        }
        for (a, b) in &ranges {
            assert!(a <= b);
            // Balanced: lengths differ by at most one.
            assert!(b - a <= n.div_ceil(parts.max(1)), "n={n} parts={parts}: {ranges:?}");
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n} parts={parts}");
    }

    #[test]
    fn rows_of_several_buffers_are_each_visited_once_with_their_index() {
        let n = 1000;
        let (mut a, mut b) = (vec![0f32; 3 * n], vec![0f32; 5 * n]);
        let calls = AtomicU32::new(0);
        ThreadPool::new(3).install(|| {
            for_each_rows_mut([&mut a, &mut b], [3, 5], usize::MAX, |r0, [x, y]| {
                calls.fetch_add(1, Ordering::Relaxed);
                assert_eq!(x.len() / 3, y.len() / 5, "the same rows of each");
                for (i, (x, y)) in x.chunks_exact_mut(3).zip(y.chunks_exact_mut(5)).enumerate() {
                    x.iter_mut().for_each(|v| *v += (r0 + i) as f32);
                    y.iter_mut().for_each(|v| *v += (r0 + i) as f32 + 0.5);
                }
            });
        });
        assert_eq!(calls.load(Ordering::Relaxed), 3, "split across the pool");
        assert!(a.chunks_exact(3).enumerate().all(|(r, x)| x.iter().all(|&v| v == r as f32)));
        assert!(b.chunks_exact(5).enumerate().all(|(r, y)| y.iter().all(|&v| v == r as f32 + 0.5)));
        // Little work: one call on this thread; no rows: one empty call.
        let mut c = vec![1f32; 8];
        let one = AtomicU32::new(0);
        for_each_rows_mut([&mut c], [2], 10, |r0, [x]| {
            assert_eq!((r0, x.len()), (0, 8));
            one.fetch_add(1, Ordering::Relaxed);
        });
        for_each_rows_mut([&mut [][..]], [4], usize::MAX, |_, [x]| {
            assert!(x.is_empty());
            one.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(one.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn parallel_installed_pool_is_current_until_the_scope_ends() {
        let outside = num_threads();
        assert_eq!(outside, ThreadPool::default_pool().threads());
        let three = ThreadPool::new(3);
        let five = ThreadPool::new(5);
        three.install(|| {
            assert_eq!(num_threads(), 3);
            assert_eq!(for_each_range(30, usize::MAX, |a, b| (a, b)).len(), 3);
            five.install(|| assert_eq!(num_threads(), 5));
            assert_eq!(num_threads(), 3);
            // Inside a task on a worker: sized for the worker's pool, run inline.
            let inner =
                for_each_range(3, usize::MAX, |_, _| (num_threads(), for_each_range(9, usize::MAX, |a, b| b - a)));
            assert!(inner.iter().all(|(n, v)| *n == 3 && v.len() == 3 && v.iter().sum::<usize>() == 9));
            let r = panic::catch_unwind(AssertUnwindSafe(|| five.install(|| panic!("inside"))));
            assert!(r.is_err());
            assert_eq!(num_threads(), 3);
        });
        assert_eq!(num_threads(), outside);
        assert_eq!(ThreadPool::new(0).threads(), 1);
        // Another thread does not see this thread's pool.
        three.install(|| thread::scope(|s| s.spawn(|| assert_eq!(num_threads(), outside)).join().ok()));
    }

    #[test]
    fn parallel_ranges_cover_every_index_once_in_order() {
        for threads in [1, 2, 3, 4, 7, 8] {
            let pool = Pool::new(threads);
            assert_eq!(pool.threads(), threads);
            for n in [0, 1, 2, 3, 5, 7, 8, 9, 16, 31, 100, 1000, 4097] {
                // As `for_each_range` caps it, and uncapped (empty ranges when n < parts).
                check_ranges(&pool, n, threads.min(n.max(1)));
                check_ranges(&pool, n, threads);
                check_ranges(&pool, n, 3 * threads + 1);
            }
        }
    }

    #[test]
    fn parallel_tasks_run_exactly_once() {
        for threads in [1, 2, 3, 5] {
            let pool = Pool::new(threads);
            for n in [0, 1, 2, 3, 4, 10, 333] {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads={threads} n={n}");
            }
        }
    }

    #[test]
    fn parallel_global_entry_points() {
        assert!(num_threads() >= 1);
        assert_eq!(for_each_range(0, usize::MAX, |a, b| (a, b)), vec![(0, 0)]);
        assert_eq!(for_each_range(1, usize::MAX, |a, b| (a, b)), vec![(0, 1)]);
        // Too little work: one range.
        assert_eq!(for_each_range(1000, 10, |a, b| (a, b)), vec![(0, 1000)]);
        let n = 12345;
        let parts = for_each_range(n, usize::MAX, |a, b| (a..b).sum::<usize>());
        assert_eq!(parts.len(), num_threads().min(n));
        assert_eq!(parts.iter().sum::<usize>(), n * (n - 1) / 2);
        let hits: Vec<AtomicU32> = (0..100).map(|_| AtomicU32::new(0)).collect();
        for_each_task(100, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn parallel_panic_reraises_on_caller_and_pool_survives() {
        for threads in [2, 3] {
            let pool = Pool::new(threads);
            for bad in 0..threads {
                let r = panic::catch_unwind(AssertUnwindSafe(|| {
                    split_ranges(Some(&pool), 100, threads, &|a, _b| {
                        if a == bad * (100 / threads) + bad.min(100 % threads) {
                            panic!("task {bad} failed");
                        }
                        a
                    })
                }));
                let payload = r.expect_err("the panic must reach the caller");
                let msg = payload.downcast_ref::<String>().map(String::as_str).unwrap_or("");
                assert_eq!(msg, format!("task {bad} failed"));
                // Still works, and still in parallel.
                check_ranges(&pool, 1000, threads);
            }
            // Every task panicking.
            let r = panic::catch_unwind(AssertUnwindSafe(|| pool.run(50, &|_| panic!("all"))));
            assert!(r.is_err());
            check_ranges(&pool, 77, threads);
        }
    }

    #[test]
    fn parallel_nested_calls_run_inline() {
        let pool = Pool::new(3);
        let outer = split_ranges(Some(&pool), 30, 3, &|a, b| {
            let inner = split_ranges(Some(&pool), b - a, 3, &|c, d| (a + c..a + d).sum::<usize>());
            assert_eq!(inner.len(), 3);
            inner.iter().sum::<usize>()
        });
        assert_eq!(outer.iter().sum::<usize>(), (0..30).sum::<usize>());
        // Through the global pool too, and nested panics still reach the caller.
        let total = for_each_range(64, usize::MAX, |a, b| {
            for_each_range(b - a, usize::MAX, |c, d| (a + c..a + d).sum::<usize>()).iter().sum::<usize>()
        });
        assert_eq!(total.iter().sum::<usize>(), (0..64).sum::<usize>());
        let r = panic::catch_unwind(|| {
            for_each_range(8, usize::MAX, |a, _| for_each_task(4, &|i| assert!(a + i < a + 3, "inner")))
        });
        assert!(r.is_err());
        assert_eq!(for_each_range(4, usize::MAX, |a, b| b - a).iter().sum::<usize>(), 4);
    }

    #[test]
    fn parallel_many_small_jobs_complete() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        for i in 0..10_000 {
            pool.run(2, &|t| {
                sum.fetch_add(t + 1, Ordering::Relaxed);
            });
            // Now and then let the worker fall asleep, to cross the park/unpark path too.
            if i % 1000 == 999 {
                thread::sleep(WORKER_SPIN * 3);
            }
        }
        assert_eq!(sum.load(Ordering::Relaxed), 30_000);
        let ranges: usize =
            (0..10_000).map(|i| split_ranges(Some(&pool), i % 5, 2, &|a, b| b - a).iter().sum::<usize>()).sum();
        assert_eq!(ranges, (0..10_000).map(|i| i % 5).sum::<usize>());
    }

    #[test]
    fn parallel_pools_shut_down() {
        // Dropped at once (workers may not have started yet), after a job, and after idling.
        for i in 0..200 {
            let pool = Pool::new(2 + i % 3);
            if i % 2 == 1 {
                check_ranges(&pool, 10, pool.threads());
            }
            if i % 50 == 0 {
                thread::sleep(WORKER_SPIN * 3);
            }
        }
    }

    #[test]
    fn parallel_concurrent_callers() {
        let pool = Pool::new(3);
        thread::scope(|s| {
            for k in 0..4 {
                let pool = &pool;
                s.spawn(move || {
                    for n in 0..500 {
                        let v = split_ranges(Some(pool), n + k, 3, &|a, b| (a..b).sum::<usize>());
                        assert_eq!(v.iter().sum::<usize>(), (0..n + k).sum::<usize>());
                    }
                });
            }
        });
    }

    #[test]
    fn parallel_workers_really_share() {
        // With an idle, parked worker, a job whose tasks wait for each other still completes:
        // the worker wakes and takes the second task.
        let pool = Pool::new(2);
        thread::sleep(WORKER_SPIN * 4);
        let seen = AtomicUsize::new(0);
        let ids = Mutex::new(Vec::new());
        pool.run(2, &|_| {
            seen.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                std::hint::spin_loop();
            }
            lock(&ids).push(thread::current().id());
        });
        let ids = lock(&ids);
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
    }

    #[test]
    fn tapered_bounds_shrink_and_cover() {
        assert_eq!(tapered_bounds(64, 2, 4), vec![0, 16, 32, 40, 48, 52, 56, 60, 64]);
        assert_eq!(tapered_bounds(0, 2, 4), vec![0, 0]);
        assert_eq!(tapered_bounds(1, 2, 4), vec![0, 1]);
        for n in 0..300 {
            for busy in 1..5 {
                for rounds in 1..6 {
                    let b = tapered_bounds(n, busy, rounds);
                    assert_eq!((b[0], b[b.len() - 1]), (0, n), "n={n} busy={busy} rounds={rounds}");
                    assert!(b.len() <= busy * rounds + 1);
                    // Strictly increasing (no empty range) unless there is nothing to split.
                    assert!(n == 0 || b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
                    // Each round's ranges are no larger than the first round's.
                    let first = b[1] - b[0];
                    assert!(b.windows(2).all(|w| w[1] - w[0] <= first.max(1) + 1), "{b:?}");
                }
            }
        }
        // Through the pool: every item once, in order.
        let pool = ThreadPool::new(2);
        let hits: Vec<AtomicU32> = (0..1000).map(|_| AtomicU32::new(0)).collect();
        let ranges = pool.install(|| {
            for_each_range_balanced(1000, usize::MAX / 2, 4, |a, b| {
                hits[a..b].iter().for_each(|h| {
                    h.fetch_add(1, Ordering::Relaxed);
                });
                (a, b)
            })
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        assert_eq!(ranges.len(), 8);
        assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0 && w[0].1 - w[0].0 + 1 >= w[1].1 - w[1].0));
    }
}
