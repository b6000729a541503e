//! Which of two SIMD levels runs a one-token product, chosen by how fast each ran it lately.
//!
//! Decode's products read every weight once per token and are bound by memory; how fast a
//! kernel streams then depends on more than its instructions. On a Zen 5 host whose memory the
//! neighbours sometimes load (the two-thread read probe at 44-53 GB/s instead of 76-81, for
//! minutes at a time), the AVX-512 one-token kernels decoded Qwen3-0.6B-shaped Q4_K_M 3-9%
//! faster than the AVX2 ones while the memory was free and 10-12% slower while it was loaded
//! (Q8_0: 18% slower; `scripts/bench-ab.sh`, alternated runs grouped by the probe). Neither
//! level wins everywhere, and which one wins changes while a model runs.
//!
//! The block formats' products give the same bits at every SIMD level (integer block sums,
//! then the same lane-wise float steps: `dot::legacy` and `dot::kquants` test it), so a product
//! may run at either level without changing a result, and a decode may change level from one
//! token to the next. [`timed`] does that per call site (a shape of call: the same matrices of
//! every layer, or a set of experts): it times each call, runs the level that was faster, and
//! every [`PERIOD`] calls a burst of [`BURST`] at the other, whose mean time decides whether to
//! change (a site has a call per layer, so a change of which is faster is seen within about ten
//! tokens). The exploring calls cost 1/16 of the difference.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::cpu::SimdLevel;

/// Calls of a site per period: a burst of [`BURST`] at the level not chosen, then the chosen
/// one. A burst's mean is compared, not single calls: a call's time varies by 10% and more
/// from one to the next (how the two threads meet at the end of a product), as much as the
/// levels differ.
const PERIOD: u32 = 256;
const BURST: u32 = 16;
/// Sites a thread remembers before it forgets them all (a model has a few dozen).
const MAX_SITES: usize = 4096;
/// The other level's burst must take at most this fraction of the chosen level's average for
/// the choice to change, so that noise does not flip it back and forth.
const SWITCH_BELOW: f64 = 0.98;

/// The running measurements of one call site.
#[derive(Default)]
struct Site {
    calls: u32,
    /// Nanoseconds per call at the first and the second level: the chosen one's running
    /// average, the other's mean over its last burst (0: not yet run).
    ns: [f64; 2],
    /// The level currently chosen: 0 or 1.
    chosen: usize,
    /// The current burst's sum and count of calls.
    burst: (f64, u32),
}

impl Site {
    /// The level this call runs at: the first one for a burst, then the second for a burst,
    /// then the chosen one but for a burst of the other each period.
    fn pick(&mut self) -> usize {
        let at = match self.calls {
            n if n < BURST => 0,
            n if n < 2 * BURST => 1,
            n if n % PERIOD < BURST => 1 - self.chosen,
            _ => self.chosen,
        };
        // Past the first two bursts, counting wraps to the third period.
        self.calls = self.calls.checked_add(1).unwrap_or(2 * PERIOD);
        at
    }

    /// Folds a call's time at level `at` in, and at the end of a burst chooses again.
    fn record(&mut self, at: usize, ns: f64) {
        // A call the scheduler interrupted counts as at most twice the average.
        let avg = self.ns[self.chosen];
        let ns = if avg > 0.0 { ns.min(2.0 * avg) } else { ns };
        if at == self.chosen {
            // The mean of the first burst's calls, then a running average over about a burst.
            let weight = 1.0 / self.calls.clamp(1, BURST) as f64;
            self.ns[at] = if avg == 0.0 { ns } else { avg + (ns - avg) * weight };
            return;
        }
        self.burst = (self.burst.0 + ns, self.burst.1 + 1);
        if self.burst.1 < BURST {
            return;
        }
        self.ns[at] = self.burst.0 / BURST as f64;
        self.burst = (0.0, 0);
        if self.ns[at] < self.ns[self.chosen] * SWITCH_BELOW {
            self.chosen = at;
        }
    }
}

thread_local! {
    static SITES: RefCell<HashMap<u64, Site>> = RefCell::new(HashMap::new());
}

/// Calls run at each level of [`pair`] since the process started: `[wider, narrower]`.
static CALLS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// The two levels a product at `level` may run at, where there is a choice: AVX-512 and AVX2
/// (a CPU with AVX-512 has AVX2).
pub(crate) fn pair(level: SimdLevel) -> Option<[SimdLevel; 2]> {
    (level == SimdLevel::Avx512).then_some([SimdLevel::Avx512, SimdLevel::Avx2])
}

/// Runs `run` at one of `levels` for call site `key`: the one faster of late, or now and then
/// the other (see the module docs). `run` must compute the same results at both.
pub(crate) fn timed<R>(key: u64, levels: [SimdLevel; 2], run: impl FnOnce(SimdLevel) -> R) -> R {
    let at = SITES.with_borrow_mut(|sites| {
        if sites.len() >= MAX_SITES && !sites.contains_key(&key) {
            sites.clear();
        }
        sites.entry(key).or_default().pick()
    });
    let start = Instant::now();
    let out = run(levels[at]);
    let ns = start.elapsed().as_nanos() as f64;
    SITES.with_borrow_mut(|sites| {
        if let Some(site) = sites.get_mut(&key) {
            site.record(at, ns);
        }
    });
    CALLS[at].fetch_add(1, Ordering::Relaxed);
    out
}

/// How many one-token products ran at the wider and at the narrower level of [`pair`] so far
/// (`pio bench` reports it).
pub fn calls_by_level() -> [u64; 2] {
    [CALLS[0].load(Ordering::Relaxed), CALLS[1].load(Ordering::Relaxed)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a site the times `ns_of(level)` for `calls` calls; returns how many ran at each.
    fn drive(site: &mut Site, calls: u32, ns_of: impl Fn(usize) -> f64) -> [u32; 2] {
        let mut count = [0; 2];
        for _ in 0..calls {
            let at = site.pick();
            count[at] += 1;
            site.record(at, ns_of(at));
        }
        count
    }

    #[test]
    fn runs_the_faster_level_and_follows_a_change() {
        let mut site = Site::default();
        // The second level 10% faster: after the first two bursts it runs all but the
        // exploring bursts.
        let count = drive(&mut site, 4 * PERIOD, |at| if at == 0 { 110.0 } else { 100.0 });
        assert_eq!(site.chosen, 1);
        assert_eq!(count[0], BURST + 3 * BURST, "{count:?}");
        // Now the first is 10% faster: its next burst finds it.
        let count = drive(&mut site, 2 * PERIOD, |at| if at == 0 { 90.0 } else { 100.0 });
        assert_eq!(site.chosen, 0);
        assert!(count[1] <= PERIOD, "{count:?}");
    }

    #[test]
    fn a_difference_within_the_margin_or_one_slow_call_does_not_switch() {
        let mut site = Site::default();
        drive(&mut site, 4 * PERIOD, |at| if at == 0 { 100.0 } else { 99.0 });
        assert_eq!(site.chosen, 0, "1% is within the margin");
        // One call 50x slower (the thread was descheduled) moves the average by at most 1/16.
        site.record(0, 5000.0);
        assert!(site.ns[0] <= 100.0 + 100.0 / BURST as f64 + 1e-9, "{}", site.ns[0]);
        // Noise of +-10% call to call around a 5% difference: the burst means still tell.
        let noisy = |at: usize, i: u32| {
            (if at == 0 { 100.0 } else { 95.0 }) * (1.0 + 0.1 * ((i * 7919 % 21) as f64 / 10.0 - 1.0))
        };
        for i in 0..8 * PERIOD {
            let at = site.pick();
            site.record(at, noisy(at, i));
        }
        assert_eq!(site.chosen, 1);
    }

    #[test]
    fn only_avx512_has_a_pair() {
        assert_eq!(pair(SimdLevel::Avx512), Some([SimdLevel::Avx512, SimdLevel::Avx2]));
        assert_eq!(pair(SimdLevel::Avx2), None);
        assert_eq!(pair(SimdLevel::Scalar), None);
    }
}
