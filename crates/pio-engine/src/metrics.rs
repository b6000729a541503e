//! Counters, gauges and histograms the engine keeps, rendered in Prometheus' text format.
//!
//! Written by the engine thread, read by anyone (the server's `/metrics`), so every field is an
//! atomic or behind a short lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A histogram over fixed bucket bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Debug, Default, Clone)]
struct HistogramData {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            inner: Mutex::new(HistogramData { counts: vec![0; bounds.len() + 1], ..Default::default() }),
        }
    }

    pub fn observe(&self, d: Duration) {
        let v = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        h.counts[i] += 1;
        h.sum += v;
        h.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    /// The mean observation in seconds (`None` before the first).
    pub fn mean(&self) -> Option<f64> {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (h.count > 0).then(|| h.sum / h.count as f64)
    }

    /// With `labels` (`key="value",...`, or none) on every sample.
    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let (pre, set) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cum = 0;
        for (i, &b) in self.bounds.iter().enumerate() {
            cum += h.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{pre}le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{{pre}le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{set} {}", h.sum);
        let _ = writeln!(out, "{name}_count{set} {}", h.count);
    }
}

const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5];
const DURATION_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0];

/// What the engine reports.
#[derive(Debug)]
pub struct Metrics {
    pub requests_running: AtomicUsize,
    pub requests_waiting: AtomicUsize,
    /// Requests submitted through the handle that the engine thread has not taken yet (reported
    /// as waiting too).
    pub requests_in_flight: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub prefix_cache_hit_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    /// Speculative decoding: tokens proposed and verified, and those of them accepted.
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    /// Speculative decoding: proposals verified (one per sequence per step that carried any).
    pub spec_drafts: AtomicU64,
    /// Speculative decoding: microseconds spent proposing (a draft model's forwards, the n-gram
    /// lookup).
    pub spec_propose_us: AtomicU64,
    /// Constrained decoding: microseconds spent on token masks and advancing grammars.
    pub guided_us: AtomicU64,
    /// Requests finished, by reason: stop, length, abort, error.
    pub finished: [AtomicU64; 4],
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_running: AtomicUsize::new(0),
            requests_waiting: AtomicUsize::new(0),
            requests_in_flight: AtomicUsize::new(0),
            kv_blocks_used: AtomicUsize::new(0),
            kv_blocks_total: AtomicUsize::new(0),
            prefix_cache_hit_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            spec_draft_tokens: AtomicU64::new(0),
            spec_accepted_tokens: AtomicU64::new(0),
            spec_drafts: AtomicU64::new(0),
            spec_propose_us: AtomicU64::new(0),
            guided_us: AtomicU64::new(0),
            finished: Default::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            request_duration: Histogram::new(DURATION_BUCKETS),
        }
    }
}

/// Speculative decoding's counters at one moment ([`Metrics::spec_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecCounts {
    /// Proposals verified (a sequence's tokens in one step).
    pub drafts: u64,
    /// Tokens proposed and verified.
    pub draft_tokens: u64,
    /// Of those, accepted.
    pub accepted_tokens: u64,
    /// Microseconds spent proposing.
    pub propose_us: u64,
}

impl SpecCounts {
    /// What was counted between `before` and `self`.
    pub fn since(&self, before: &SpecCounts) -> SpecCounts {
        SpecCounts {
            drafts: self.drafts - before.drafts,
            draft_tokens: self.draft_tokens - before.draft_tokens,
            accepted_tokens: self.accepted_tokens - before.accepted_tokens,
            propose_us: self.propose_us - before.propose_us,
        }
    }

    /// Accepted over proposed tokens (0 with none proposed).
    pub fn acceptance_rate(&self) -> f64 {
        if self.draft_tokens > 0 {
            self.accepted_tokens as f64 / self.draft_tokens as f64
        } else {
            0.0
        }
    }

    /// Tokens committed per verifying step: the accepted ones and the one sampled after them
    /// (0 with no step).
    pub fn mean_accepted_length(&self) -> f64 {
        if self.drafts > 0 {
            1.0 + self.accepted_tokens as f64 / self.drafts as f64
        } else {
            0.0
        }
    }
}

/// Labels of [`Metrics::finished`].
pub const FINISH_LABELS: [&str; 4] = ["stop", "length", "abort", "error"];

impl Metrics {
    /// Speculative decoding's counters now.
    pub fn spec_counts(&self) -> SpecCounts {
        SpecCounts {
            drafts: self.spec_drafts.load(Ordering::Relaxed),
            draft_tokens: self.spec_draft_tokens.load(Ordering::Relaxed),
            accepted_tokens: self.spec_accepted_tokens.load(Ordering::Relaxed),
            propose_us: self.spec_propose_us.load(Ordering::Relaxed),
        }
    }

    /// The scalar figures: (our name, vLLM's name, type, help, value); a name left empty is not
    /// rendered under that scheme.
    fn figures(&self) -> Vec<(&'static str, &'static str, &'static str, &'static str, String)> {
        let ld = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let lq = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let waiting = ld(&self.requests_waiting) + ld(&self.requests_in_flight);
        let usage = ld(&self.kv_blocks_used) as f64 / ld(&self.kv_blocks_total).max(1) as f64;
        vec![
            (
                "pio_num_requests_running",
                "vllm:num_requests_running",
                "gauge",
                "Requests in the running batch.",
                ld(&self.requests_running).to_string(),
            ),
            (
                "pio_num_requests_waiting",
                "vllm:num_requests_waiting",
                "gauge",
                "Requests queued for admission.",
                waiting.to_string(),
            ),
            (
                "pio_kv_cache_blocks_used",
                "",
                "gauge",
                "KV cache blocks held by requests.",
                ld(&self.kv_blocks_used).to_string(),
            ),
            (
                "pio_kv_cache_blocks_total",
                "",
                "gauge",
                "KV cache blocks in the pool.",
                ld(&self.kv_blocks_total).to_string(),
            ),
            ("", "vllm:kv_cache_usage_perc", "gauge", "KV cache usage (1 = all blocks in use).", usage.to_string()),
            (
                "",
                "vllm:prefix_cache_queries_total",
                "counter",
                "Prompt tokens looked up in the prefix cache.",
                lq(&self.prompt_tokens),
            ),
            (
                "pio_prefix_cache_hit_tokens_total",
                "vllm:prefix_cache_hits_total",
                "counter",
                "Prompt tokens served from the prefix cache.",
                lq(&self.prefix_cache_hit_tokens),
            ),
            (
                "pio_prompt_tokens_total",
                "vllm:prompt_tokens_total",
                "counter",
                "Prompt tokens of admitted requests.",
                lq(&self.prompt_tokens),
            ),
            (
                "pio_generation_tokens_total",
                "vllm:generation_tokens_total",
                "counter",
                "Tokens generated.",
                lq(&self.generation_tokens),
            ),
            (
                "pio_num_preemptions_total",
                "vllm:num_preemptions_total",
                "counter",
                "Sequences preempted for lack of KV blocks.",
                lq(&self.preemptions),
            ),
            // vLLM's names, under our prefix too.
            (
                "pio_spec_decode_num_drafts_total",
                "vllm:spec_decode_num_drafts_total",
                "counter",
                "Speculative proposals verified (a sequence's tokens in one step).",
                lq(&self.spec_drafts),
            ),
            (
                "pio_spec_decode_num_draft_tokens_total",
                "vllm:spec_decode_num_draft_tokens_total",
                "counter",
                "Speculative tokens proposed and verified.",
                lq(&self.spec_draft_tokens),
            ),
            (
                "pio_spec_decode_num_accepted_tokens_total",
                "vllm:spec_decode_num_accepted_tokens_total",
                "counter",
                "Speculative tokens accepted.",
                lq(&self.spec_accepted_tokens),
            ),
            (
                "pio_spec_decode_propose_seconds_total",
                "",
                "counter",
                "Time spent proposing speculative tokens (a draft model's forwards, the n-gram lookup).",
                (self.spec_propose_us.load(Ordering::Relaxed) as f64 / 1e6).to_string(),
            ),
            (
                "pio_guided_decoding_seconds_total",
                "",
                "counter",
                "Time spent on constrained decoding: computing token masks and advancing grammars.",
                (self.guided_us.load(Ordering::Relaxed) as f64 / 1e6).to_string(),
            ),
        ]
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        self.render(false, "")
    }

    /// The same figures under vLLM's names (`vllm:*`, labeled `model_name`), so dashboards made
    /// for vLLM read this server too.
    pub fn render_vllm(&self, model_name: &str) -> String {
        let name = model_name.replace('\\', "\\\\").replace('"', "\\\"");
        self.render(true, &format!("model_name=\"{name}\""))
    }

    /// Every figure under our names or vLLM's, with `labels` on every sample.
    fn render(&self, vllm: bool, labels: &str) -> String {
        let mut s = String::new();
        let set = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let pre = if labels.is_empty() { String::new() } else { format!("{labels},") };
        for (ours, theirs, kind, help, v) in self.figures() {
            let name = if vllm { theirs } else { ours };
            if !name.is_empty() {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{set} {v}");
            }
        }
        let name = if vllm { "vllm:request_success_total" } else { "pio_request_success_total" };
        let _ = writeln!(s, "# HELP {name} Finished requests by reason.\n# TYPE {name} counter");
        for (label, v) in FINISH_LABELS.iter().zip(&self.finished) {
            let _ = writeln!(s, "{name}{{{pre}finished_reason=\"{label}\"}} {}", v.load(Ordering::Relaxed));
        }
        let p = if vllm { "vllm:" } else { "pio_" };
        let e2e = if vllm { "vllm:e2e_request_latency_seconds" } else { "pio_request_duration_seconds" };
        self.time_to_first_token.render(
            &mut s,
            &format!("{p}time_to_first_token_seconds"),
            "Time to first token.",
            labels,
        );
        self.inter_token_latency.render(
            &mut s,
            &format!("{p}inter_token_latency_seconds"),
            "Time between tokens.",
            labels,
        );
        self.request_duration.render(&mut s, e2e, "Arrival to finish.", labels);
        s
    }
}

/// An expert cache's counters (see [`pio_model::ExpertCacheStats`]) in Prometheus text format.
pub fn render_expert_cache(c: &pio_model::ExpertCacheStats) -> String {
    let metrics: [(&str, &str, &str, String); 9] = [
        ("hits_total", "counter", "Routed experts found in the expert cache.", c.hits.to_string()),
        ("misses_total", "counter", "Routed experts read from disk when asked for.", c.misses.to_string()),
        ("prefetches_total", "counter", "Routed experts read ahead of being asked for.", c.prefetches.to_string()),
        ("prefetch_hits_total", "counter", "Prefetched experts that were then asked for.", c.prefetch_hits.to_string()),
        ("read_bytes_total", "counter", "Bytes of routed experts read from disk.", c.bytes_read.to_string()),
        (
            "read_busy_seconds_total",
            "counter",
            "Seconds with at least one expert read in flight.",
            c.read_busy_s.to_string(),
        ),
        ("wait_seconds_total", "counter", "Seconds forwards waited for expert reads.", c.wait_s.to_string()),
        ("slots", "gauge", "Experts the cache holds at once.", c.slots.to_string()),
        ("slot_bytes", "gauge", "Bytes of one expert slot.", c.slot_bytes.to_string()),
    ];
    let mut s = String::new();
    for (name, kind, help, v) in metrics {
        let _ = writeln!(
            s,
            "# HELP pio_expert_cache_{name} {help}\n# TYPE pio_expert_cache_{name} {kind}\npio_expert_cache_{name} {v}"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.kv_blocks_total.store(10, Ordering::Relaxed);
        m.prompt_tokens.fetch_add(7, Ordering::Relaxed);
        m.time_to_first_token.observe(Duration::from_millis(30));
        m.time_to_first_token.observe(Duration::from_secs(100));
        let s = m.render_prometheus();
        assert!(s.contains("pio_kv_cache_blocks_total 10\n"));
        assert!(s.contains("pio_prompt_tokens_total 7\n"));
        assert!(s.contains("pio_time_to_first_token_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(s.contains("pio_time_to_first_token_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(s.contains("pio_time_to_first_token_seconds_bucket{le=\"80\"} 1\n"));
        assert!(s.contains("pio_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(s.contains("pio_time_to_first_token_seconds_count 2\n"));
        let v = m.render_vllm("my \"model\"");
        let l = "model_name=\"my \\\"model\\\"\"";
        assert!(v.contains(&format!("vllm:prompt_tokens_total{{{l}}} 7\n")), "{v}");
        assert!(v.contains(&format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.05\"}} 1\n")), "{v}");
        assert!(v.contains(&format!("vllm:time_to_first_token_seconds_count{{{l}}} 2\n")), "{v}");
        assert!(v.contains(&format!("vllm:kv_cache_usage_perc{{{l}}} 0\n")), "{v}");
    }

    #[test]
    fn renders_the_expert_cache() {
        let c = pio_model::ExpertCacheStats { hits: 5, misses: 3, bytes_read: 1024, slots: 7, ..Default::default() };
        let s = render_expert_cache(&c);
        assert!(s.contains("pio_expert_cache_hits_total 5\n"));
        assert!(s.contains("pio_expert_cache_misses_total 3\n"));
        assert!(s.contains("pio_expert_cache_read_bytes_total 1024\n"));
        assert!(s.contains("# TYPE pio_expert_cache_slots gauge\npio_expert_cache_slots 7\n"));
    }
}
