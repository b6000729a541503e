//! Turning one row of logits into the next token.
//!
//! The building blocks are pure functions over a logits row (`&mut [f32]`, one entry per vocabulary
//! token): penalties ([`apply_repetition_penalty`], [`apply_presence_frequency_penalty`]),
//! [`apply_temperature`], the truncation filters ([`top_k_filter`], [`top_p_filter`],
//! [`min_p_filter`], which set removed logits to `-inf`), [`softmax_in_place`], [`argmax`] and
//! [`sample_from_logits`].
//!
//! [`Sampler`] chains them in vLLM's order — penalties, then greedy (temperature 0) or temperature →
//! top-k → top-p → min-p → categorical draw — with a seeded [`StdRng`] and reusable scratch buffers,
//! so that a call allocates nothing once the buffers have grown to the vocabulary size.
//!
//! NaN logits are treated as `-inf` everywhere: they are never picked unless nothing else can be,
//! and nothing here panics on them.

use std::cmp::Ordering;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use pio_kernels::{math, ops};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick the next token.
///
/// Defaults ([`Default`]): temperature 1.0, top_k 0 (off), top_p 1.0 (off), min_p 0.0 (off),
/// repetition_penalty 1.0 (off), presence_penalty 0.0, frequency_penalty 0.0, seed `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before sampling; 0 means greedy (argmax). Must be finite and >= 0.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits (ties with the k-th are kept too); 0 turns it off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `top_p`. In (0, 1]; 1 turns it off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's. In [0, 1]; 0
    /// turns it off.
    pub min_p: f32,
    /// Hugging Face / vLLM repetition penalty over prompt and output tokens: positive logits are
    /// divided by it, negative ones multiplied. Must be > 0; 1 turns it off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from the logit of every token already generated.
    /// In [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted from a token's logit once per time it was generated.
    /// In [-2, 2].
    pub frequency_penalty: f32,
    /// Seed of the random generator; `None` seeds it from OS entropy.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, everything else at its default.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Self::default() }
    }

    /// Whether these parameters pick the argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field's range; the error names the first offending field and its range.
    ///
    /// Rejected: temperature < 0 or not finite, top_p outside (0, 1], min_p outside [0, 1],
    /// repetition_penalty <= 0 or not finite, presence / frequency penalty not finite or outside
    /// [-2, 2] (the OpenAI range).
    pub fn validate(&self) -> Result<(), SamplingError> {
        let invalid = |msg: String| Err(SamplingError::Invalid(msg));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid(format!("temperature must be finite and >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid(format!("repetition_penalty must be finite and > 0, got {}", self.repetition_penalty));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !(-2.0..=2.0).contains(&value) {
                return invalid(format!("{name} must be in [-2, 2], got {value}"));
            }
        }
        Ok(())
    }
}

/// Why sampling parameters were refused.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// A parameter is out of range; the message names it and its allowed range.
    #[error("invalid sampling parameter: {0}")]
    Invalid(String),
}

/// Picks next tokens with fixed [`SamplingParams`] and its own random generator.
///
/// Keeps scratch buffers between calls, so one sampler per sequence (or per thread) avoids
/// per-token allocations.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Working copy of the logits row.
    work: Vec<f32>,
    /// Values reordered by top-k / top-p selection.
    scratch: Vec<f32>,
    /// Top-k survivors (about k of them): their token ids and logits.
    kept_ids: Vec<u32>,
    kept_logits: Vec<f32>,
    /// Bit set over the vocabulary: tokens already penalised.
    seen: Vec<u64>,
    /// The weights' sums per [`BLOCK`] values, for the draw.
    block_sums: Vec<f64>,
    /// Top-k candidates: `(token id, logit)`.
    candidates: Vec<(u32, f32)>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").field("params", &self.params).finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler for `params`, after [`SamplingParams::validate`].
    ///
    /// `seed: Some(s)` gives a reproducible [`StdRng::seed_from_u64`]; `None` seeds from OS
    /// entropy (through the standard library's randomly keyed hasher, plus the clock).
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(entropy_seed);
        Ok(Sampler {
            params,
            rng: StdRng::seed_from_u64(seed),
            work: Vec::new(),
            scratch: Vec::new(),
            seen: Vec::new(),
            kept_ids: Vec::new(),
            kept_logits: Vec::new(),
            block_sums: Vec::new(),
            candidates: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one row, one entry per vocabulary token).
    ///
    /// `prompt_ids` and `output_ids` feed the penalties (ids outside the vocabulary are ignored).
    /// Order, as in vLLM: repetition penalty → presence / frequency penalty → (temperature 0:
    /// argmax) → temperature → top-k → top-p → min-p → categorical draw. NaN logits count as
    /// `-inf`; if no logit is above `-inf` (or the row is empty) the answer is 0.
    pub fn sample(&mut self, logits: &[f32], prompt_ids: &[u32], output_ids: &[u32]) -> u32 {
        let p = &self.params;
        if p.is_greedy() && p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
            // Nothing changes the row: no working copy (`argmax` skips NaN and answers 0 for
            // an empty row).
            return argmax(logits);
        }
        let work = &mut self.work;
        work.clear();
        work.extend(logits.iter().map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v }));
        if work.is_empty() {
            return 0;
        }

        repetition_penalty_with(
            work,
            prompt_ids.iter().chain(output_ids).copied(),
            p.repetition_penalty,
            &mut self.seen,
        );
        presence_frequency_penalty_with(work, output_ids, p.presence_penalty, p.frequency_penalty, &mut self.seen);

        if p.is_greedy() {
            return argmax(work);
        }
        if p.temperature != 1.0 {
            // Shift by the max first: same distribution, and a tiny temperature cannot push
            // near-ties to +inf together (the max maps to 0, the rest below it).
            let max = max_ignoring_nan(work);
            if max.is_finite() {
                let t = p.temperature;
                work.iter_mut().for_each(|v| *v = (*v - max) / t);
            }
        }
        // Top-k: compact the survivors so that the later steps only touch about k values.
        let compacted = p.top_k > 0 && p.top_k < work.len();
        let row: &mut [f32] = if compacted {
            let kth = top_k_candidates(work, p.top_k, &mut self.candidates);
            self.kept_ids.clear();
            self.kept_logits.clear();
            for &(i, v) in self.candidates.iter().filter(|&&(_, v)| v >= kth) {
                self.kept_ids.push(i);
                self.kept_logits.push(v);
            }
            &mut self.kept_logits
        } else {
            work
        };
        top_p_filter_with(row, p.top_p, &mut self.scratch);
        min_p_filter(row, p.min_p);

        // (`work` has no NaN: mapped to `-inf` above.)
        let total = exp_weights_of_numbers(row, &mut self.block_sums);
        if total <= 0.0 || total.is_nan() {
            return 0;
        }
        let pick = draw_weights(row, &self.block_sums, total, &mut self.rng);
        if compacted {
            self.kept_ids.get(pick as usize).copied().unwrap_or(0)
        } else {
            pick
        }
    }
}

/// A seed from OS entropy without needing rand's `os_rng` feature: std keys every
/// [`RandomState`] from OS randomness (and varies the keys per instance); mixing in the clock
/// covers platforms where it cannot.
fn entropy_seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.finish()
}

/// Index of the largest logit; the lowest index wins ties. NaN counts as `-inf`; an empty row or
/// one with nothing above `-inf` gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    // Two simple passes (a lane-parallel max, then its first position) beat one serial loop.
    let max = max_ignoring_nan(logits);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Hugging Face / vLLM repetition penalty: for each distinct token in `ids` (pass prompt and
/// output together), a positive logit is divided by `penalty` and a negative one multiplied by it.
/// A token appearing several times is penalised once; ids outside `logits` are ignored;
/// `penalty == 1` changes nothing.
pub fn apply_repetition_penalty(logits: &mut [f32], ids: &[u32], penalty: f32) {
    repetition_penalty_with(logits, ids.iter().copied(), penalty, &mut Vec::new());
}

fn repetition_penalty_with(logits: &mut [f32], ids: impl Iterator<Item = u32>, penalty: f32, seen: &mut Vec<u64>) {
    if penalty == 1.0 || logits.is_empty() {
        return;
    }
    reset_bits(seen, logits.len());
    for id in ids {
        let i = id as usize;
        if i < logits.len() && insert_bit(seen, i) {
            let v = &mut logits[i];
            *v = if *v > 0.0 { *v / penalty } else { *v * penalty };
        }
    }
}

/// OpenAI presence / frequency penalties over the generated tokens only:
/// `logit -= frequency * count + presence * (count > 0)` for every token of `output_ids`.
/// Negative values encourage repetition instead. Ids outside `logits` are ignored.
pub fn apply_presence_frequency_penalty(logits: &mut [f32], output_ids: &[u32], presence: f32, frequency: f32) {
    presence_frequency_penalty_with(logits, output_ids, presence, frequency, &mut Vec::new());
}

fn presence_frequency_penalty_with(
    logits: &mut [f32],
    output_ids: &[u32],
    presence: f32,
    frequency: f32,
    seen: &mut Vec<u64>,
) {
    if (presence == 0.0 && frequency == 0.0) || logits.is_empty() || output_ids.is_empty() {
        return;
    }
    reset_bits(seen, logits.len());
    for &id in output_ids {
        let i = id as usize;
        if i < logits.len() {
            logits[i] -= frequency;
            if insert_bit(seen, i) {
                logits[i] -= presence;
            }
        }
    }
}

fn reset_bits(bits: &mut Vec<u64>, n: usize) {
    bits.clear();
    bits.resize(n.div_ceil(64), 0);
}

/// Sets bit `i`; true when it was not set before. `i` must be below the size given to
/// [`reset_bits`].
fn insert_bit(bits: &mut [u64], i: usize) -> bool {
    let (word, mask) = (i / 64, 1u64 << (i % 64));
    let fresh = bits[word] & mask == 0;
    bits[word] |= mask;
    fresh
}

/// Divides every logit by `temperature`.
///
/// `temperature == 0` instead keeps only the [`argmax`] (every other logit becomes `-inf`);
/// negative or non-finite temperatures leave the logits unchanged.
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature == 0.0 {
        let best = argmax(logits) as usize;
        for (i, v) in logits.iter_mut().enumerate() {
            if i != best {
                *v = f32::NEG_INFINITY;
            }
        }
    } else if temperature.is_finite() && temperature > 0.0 && temperature != 1.0 {
        logits.iter_mut().for_each(|v| *v /= temperature);
    }
}

/// Descending order for selection; callers map NaN away first.
fn descending(a: &f32, b: &f32) -> Ordering {
    b.total_cmp(a)
}

/// Whether `v` falls below `threshold` or is NaN (filtered out either way).
fn below(v: f32, threshold: f32) -> bool {
    v.is_nan() || v < threshold
}

/// Largest value, ignoring NaN; `-inf` when there is none.
fn max_ignoring_nan(values: &[f32]) -> f32 {
    // `v > m` is false for NaN.
    lane_fold(values, f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

/// Smallest value above `-inf`, ignoring NaN; `+inf` when there is none.
fn min_above_neg_inf(values: &[f32]) -> f32 {
    lane_fold(values, f32::INFINITY, |m, v| if v > f32::NEG_INFINITY && v < m { v } else { m })
}

/// Folds `values` with `f` over independent lanes (so the compiler can vectorise), then folds the
/// lanes. `f` must be associative and commutative, with `init` as its identity.
#[inline]
fn lane_fold(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [init; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = f(*m, v);
        }
    }
    lanes.iter().chain(rest).fold(init, |m, &v| f(m, v))
}

/// Keeps the `k` highest logits and sets the rest to `-inf`. Logits tied with the k-th highest
/// are kept too (as vLLM does), so a few more than `k` may survive. NaN is removed; `k == 0` or
/// `k >= logits.len()` changes nothing.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let kth = top_k_candidates(logits, k, &mut Vec::new());
    for v in logits.iter_mut() {
        if below(*v, kth) {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// The `k`-th largest of `values` (1-based, `0 < k <= len`; NaN counts as `-inf`), leaving in
/// `candidates` every `(index, value)` at or above it, in index order.
///
/// One pass that skips whole chunks below a running threshold (the `k`-th largest of the
/// candidates so far, which never exceeds the answer): `select_nth` over a full copy of a
/// vocabulary-wide row took ~200 us for Qwen3's 151936 logits (`cargo bench -p pio-engine
/// --bench sampler`), and a decode step waits on it.
fn top_k_candidates(values: &[f32], k: usize, candidates: &mut Vec<(u32, f32)>) -> f32 {
    const CHUNK: usize = 16;
    candidates.clear();
    if k == 0 {
        return f32::INFINITY;
    }
    let mut threshold = f32::NEG_INFINITY;
    // Candidates before the next selection; raised when ties keep many at the threshold.
    let mut cap = (2 * k).max(256);
    // Selects the k-th largest of the candidates and keeps only those at or above it.
    let select = |candidates: &mut Vec<(u32, f32)>| -> f32 {
        let kth = candidates.select_nth_unstable_by(k - 1, |a, b| descending(&a.1, &b.1)).1 .1;
        candidates.retain(|&(_, v)| v >= kth);
        kth
    };
    for (c, chunk) in values.chunks(CHUNK).enumerate() {
        // `>=` is false for NaN, which thus never joins.
        if lane_fold(chunk, f32::NEG_INFINITY, |m, v| if v > m { v } else { m }) < threshold {
            continue;
        }
        for (i, &v) in chunk.iter().enumerate() {
            if v >= threshold {
                candidates.push(((c * CHUNK + i) as u32, v));
            }
        }
        if candidates.len() >= cap {
            threshold = select(candidates);
            cap = cap.max(2 * candidates.len());
        }
    }
    if candidates.len() < k {
        // Fewer than k numbers: the rest are NaN, which count as -inf.
        candidates.sort_unstable_by_key(|&(i, _)| i);
        return f32::NEG_INFINITY;
    }
    let kth = select(candidates);
    candidates.sort_unstable_by_key(|&(i, _)| i);
    kth
}

/// Nucleus filter: keeps the smallest set of highest-probability tokens whose cumulative
/// probability (softmax of `logits`) reaches `p`, and sets the rest to `-inf`. The most likely
/// token is always kept, and so are tokens tied with the last one kept. `p >= 1` (or NaN)
/// changes nothing. Only as many candidates as needed are sorted.
pub fn top_p_filter(logits: &mut [f32], p: f32) {
    top_p_filter_with(logits, p, &mut Vec::new());
}

fn top_p_filter_with(logits: &mut [f32], p: f32, scratch: &mut Vec<f32>) {
    if p >= 1.0 || p.is_nan() {
        return;
    }
    let max = max_ignoring_nan(logits);
    if max == f32::NEG_INFINITY {
        return;
    }
    if max == f32::INFINITY {
        // The +inf entries hold all the probability.
        logits.iter_mut().filter(|v| **v != f32::INFINITY).for_each(|v| *v = f32::NEG_INFINITY);
        return;
    }
    let weight = |v: f32| f64::from(math::exp(v - max));
    let min = min_above_neg_inf(logits);
    let mut threshold = min;
    if logits.len() <= SMALL_ROW {
        // Few enough to sort them all.
        scratch.clear();
        scratch.extend(logits.iter().copied().filter(|&v| v > f32::NEG_INFINITY));
        scratch.sort_unstable_by(descending);
        let target = f64::from(p) * scratch.iter().map(|&v| weight(v)).sum::<f64>();
        let mut cumulative = 0.0f64;
        for &v in scratch.iter() {
            cumulative += weight(v);
            threshold = v;
            if cumulative >= target {
                break;
            }
        }
    } else {
        threshold = top_p_threshold_bucketed(logits, p, max, min, scratch).unwrap_or(min);
    }
    for v in logits.iter_mut() {
        if below(*v, threshold) {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// Rows up to this long are filtered by a full sort; longer ones go through buckets.
const SMALL_ROW: usize = 2048;

/// Top-p threshold over a long row without sorting it: buckets the candidates by logit (bucket 0
/// holds the highest) and adds up each bucket's probability mass in one vectorised O(vocab) pass;
/// only the bucket where the cumulative mass crosses `p` is sorted. `None` when rounding keeps
/// the cumulative mass short of the target (then everything stays).
fn top_p_threshold_bucketed(logits: &[f32], p: f32, max: f32, min: f32, scratch: &mut Vec<f32>) -> Option<f32> {
    const BUCKETS: usize = 1024;
    // exp(x) is 0 here below -87: candidates further down carry no mass.
    const SPAN: f32 = 88.0;
    let span = (max - min).min(SPAN);
    if span.is_nan() || span <= 0.0 {
        // All candidates tie with the max: they all stay.
        return None;
    }
    let scale = BUCKETS as f32 / span;
    // `as usize` saturates (and maps NaN to 0), so this never leaves the array.
    let bucket = |v: f32| (((max - v) * scale) as usize).min(BUCKETS - 1);
    let weight = |v: f32| f64::from(math::exp(v - max));

    let mut mass = [0.0f64; BUCKETS];
    let mut total = 0.0f64;
    let mut buf = [0.0f32; BLOCK];
    for block in logits.chunks(BLOCK) {
        // -inf and NaN weigh 0 (and land in some bucket harmlessly).
        let weights = weights_into(block, |v| math::exp(v - max), &mut buf);
        for (&v, &w) in block.iter().zip(weights) {
            mass[bucket(v)] += f64::from(w);
        }
        total += sum_f64(weights);
    }
    let target = f64::from(p) * total;
    let mut cumulative = 0.0f64;
    let crossing = mass.iter().position(|&m| {
        let reached = cumulative + m >= target;
        if !reached {
            cumulative += m;
        }
        reached
    })?;

    // A cheap range test (with half a bucket of slack) before the exact bucket check.
    let hi = max - (crossing as f32 - 0.5) / scale;
    let lo = if crossing == BUCKETS - 1 { f32::NEG_INFINITY } else { max - (crossing as f32 + 1.5) / scale };
    scratch.clear();
    scratch.extend(
        logits.iter().copied().filter(|&v| v >= lo && v <= hi && v > f32::NEG_INFINITY && bucket(v) == crossing),
    );
    scratch.sort_unstable_by(descending);
    for &v in scratch.iter() {
        cumulative += weight(v);
        if cumulative >= target {
            return Some(v);
        }
    }
    // Rounding left the sorted bucket just short of the target: keep all of it.
    scratch.last().copied()
}

/// Drops tokens whose probability is below `min_p` times the most likely token's (sets their
/// logits to `-inf`); the most likely token always stays. `min_p <= 0` changes nothing; values
/// above 1 act as 1. NaN is removed.
pub fn min_p_filter(logits: &mut [f32], min_p: f32) {
    if min_p <= 0.0 || min_p.is_nan() {
        return;
    }
    let max = max_ignoring_nan(logits);
    if max == f32::NEG_INFINITY {
        return;
    }
    if max == f32::INFINITY {
        logits.iter_mut().filter(|v| **v != f32::INFINITY).for_each(|v| *v = f32::NEG_INFINITY);
        return;
    }
    // p_i < min_p * p_max  <=>  logit_i - logit_max < ln(min_p)
    let log_min_p = min_p.min(1.0).ln();
    for v in logits.iter_mut() {
        if below(*v - max, log_min_p) {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// Replaces logits by their softmax probabilities (numerically stable, summed in f64).
///
/// NaN and `-inf` get probability 0; if some logits are `+inf` they share the mass equally. If
/// nothing is above `-inf`, every entry becomes 0 (there is no distribution).
pub fn softmax_in_place(logits: &mut [f32]) {
    let total = exp_weights_in_place(logits, &mut Vec::new());
    if total > 0.0 {
        let inv = (1.0 / total) as f32;
        logits.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Unnormalised softmax: each logit becomes `exp(logit - max)` (`+inf` entries become 1 and the
/// rest 0 when there are any; NaN and `-inf` become 0), and `block_sums` the sums of its blocks
/// of [`BLOCK`] weights. Returns the sum, 0 when nothing is above `-inf`.
fn exp_weights_in_place(logits: &mut [f32], block_sums: &mut Vec<f64>) -> f64 {
    // NaN would stay NaN through the vector `exp`: it weighs 0, as `-inf` does.
    logits.iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = f32::NEG_INFINITY);
    exp_weights_of_numbers(logits, block_sums)
}

/// [`exp_weights_in_place`] of logits without NaN (a sampler's working row).
fn exp_weights_of_numbers(logits: &mut [f32], block_sums: &mut Vec<f64>) -> f64 {
    block_sums.clear();
    let max = max_ignoring_nan(logits);
    if max == f32::NEG_INFINITY {
        logits.fill(0.0);
        block_sums.resize(logits.len().div_ceil(BLOCK), 0.0);
        return 0.0;
    }
    if max == f32::INFINITY {
        logits.iter_mut().for_each(|v| *v = inf_weight(*v));
        block_sums.extend(logits.chunks(BLOCK).map(sum_f64));
    } else {
        ops::exp_shifted_in_place(logits, max, BLOCK, block_sums);
    }
    block_sums.iter().sum()
}

/// Weight of a logit when the row's max is `+inf`: the `+inf` entries share all the mass.
#[inline]
fn inf_weight(v: f32) -> f32 {
    if v == f32::INFINITY {
        1.0
    } else {
        0.0
    }
}

/// Values are turned into weights a block at a time, into a stack buffer: a plain map loop
/// vectorises where an exp fused into a reduction or a walk would not.
const BLOCK: usize = 256;

/// Writes `weight(v)` for each value of `block` (at most [`BLOCK`] long) into `buf` and returns
/// that part of it.
#[inline]
fn weights_into<'b>(block: &[f32], weight: impl Fn(f32) -> f32, buf: &'b mut [f32; BLOCK]) -> &'b [f32] {
    let out = &mut buf[..block.len()];
    for (o, &v) in out.iter_mut().zip(block) {
        *o = weight(v);
    }
    out
}

/// Sum of `values` accumulated in f64 over independent lanes (so the loop vectorises; the result
/// differs from a serial sum only in the last bits).
#[inline]
fn sum_f64(values: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0.0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (acc, &v) in lanes.iter_mut().zip(chunk) {
            *acc += f64::from(v);
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&v| f64::from(v)).sum::<f64>()
}

/// Sum of `weight(v)` over `values`, in f64.
fn sum_weights(values: &[f32], weight: impl Fn(f32) -> f32 + Copy) -> f64 {
    let mut buf = [0.0f32; BLOCK];
    values.chunks(BLOCK).map(|block| sum_f64(weights_into(block, weight, &mut buf))).sum()
}

/// Draws a token from the categorical distribution `softmax(logits)`, without allocating.
///
/// NaN counts as `-inf`; if some logits are `+inf`, one of them is drawn uniformly; if nothing is
/// above `-inf` (or the row is empty) the answer is 0, deterministically, without using `rng`.
pub fn sample_from_logits<R: Rng + ?Sized>(logits: &[f32], rng: &mut R) -> u32 {
    let max = max_ignoring_nan(logits);
    if max == f32::NEG_INFINITY {
        0
    } else if max == f32::INFINITY {
        draw(logits, inf_weight, sum_weights(logits, inf_weight), rng)
    } else {
        let weight = |v: f32| math::exp(v - max);
        draw(logits, weight, sum_weights(logits, weight), rng)
    }
}

/// Picks the index where the cumulative `weight` passes a uniform draw in `[0, total)`.
///
/// Skips whole blocks by their (vectorised) sums and walks only the block holding the draw.
fn draw<R: Rng + ?Sized>(values: &[f32], weight: impl Fn(f32) -> f32 + Copy, total: f64, rng: &mut R) -> u32 {
    if total <= 0.0 || total.is_nan() {
        return 0;
    }
    let target = rng.random::<f64>() * total;
    let mut buf = [0.0f32; BLOCK];
    let mut cumulative = 0.0f64;
    let mut last_positive = 0usize;
    for (b, block) in values.chunks(BLOCK).enumerate() {
        let weights = weights_into(block, weight, &mut buf);
        let block_sum = sum_f64(weights);
        if block_sum > 0.0 {
            if let Some(i) = weights.iter().rposition(|&w| w > 0.0) {
                last_positive = b * BLOCK + i;
            }
        }
        if cumulative + block_sum <= target {
            cumulative += block_sum;
            continue;
        }
        if let Some(i) = walk_block(weights, target, &mut cumulative) {
            return (b * BLOCK + i) as u32;
        }
        // Rounding: the serial walk fell just short of the block's sum.
        break;
    }
    // Rounding left the target at or past the total: take the last token with any mass seen.
    last_positive as u32
}

/// Within the block holding the draw: the position where the cumulative weight, continued
/// from `cumulative`, passes `target`; `None` when rounding leaves it short.
fn walk_block(weights: &[f32], target: f64, cumulative: &mut f64) -> Option<usize> {
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            *cumulative += f64::from(w);
            if target < *cumulative {
                return Some(i);
            }
        }
    }
    None
}

/// [`draw`] over weights already computed (`values`), with their sums per [`BLOCK`] values
/// (`block_sums`, as [`exp_weights_in_place`] leaves them): skips whole blocks by those sums
/// and walks only the block holding the draw.
fn draw_weights<R: Rng + ?Sized>(values: &[f32], block_sums: &[f64], total: f64, rng: &mut R) -> u32 {
    if total <= 0.0 || total.is_nan() {
        return 0;
    }
    let target = rng.random::<f64>() * total;
    let mut cumulative = 0.0f64;
    // The last block seen with any mass.
    let mut last_block = None;
    for (b, (block, &block_sum)) in values.chunks(BLOCK).zip(block_sums).enumerate() {
        if block_sum > 0.0 {
            last_block = Some(b);
        }
        if cumulative + block_sum <= target {
            cumulative += block_sum;
            continue;
        }
        if let Some(i) = walk_block(block, target, &mut cumulative) {
            return (b * BLOCK + i) as u32;
        }
        // Rounding: the serial walk fell just short of the block's sum.
        break;
    }
    // Rounding left the target at or past the total: take the last token with any mass seen.
    let last = last_block.and_then(|b| {
        let block = values.chunks(BLOCK).nth(b)?;
        Some(b * BLOCK + block.iter().rposition(|&w| w > 0.0)?)
    });
    last.unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG_INF: f32 = f32::NEG_INFINITY;

    fn kept(logits: &[f32]) -> Vec<usize> {
        logits.iter().enumerate().filter(|(_, v)| **v > NEG_INF).map(|(i, _)| i).collect()
    }

    fn log_probs(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).expect("valid params")
    }

    fn seeded(seed: u64) -> SamplingParams {
        SamplingParams { seed: Some(seed), ..SamplingParams::default() }
    }

    /// Deterministic, well-spread values without ties.
    fn spread(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919) % 10007) as f32 * 0.001).collect()
    }

    #[test]
    fn defaults_and_greedy() {
        let d = SamplingParams::default();
        assert_eq!(d.temperature, 1.0);
        assert_eq!(d.top_k, 0);
        assert_eq!(d.top_p, 1.0);
        assert_eq!(d.min_p, 0.0);
        assert_eq!(d.repetition_penalty, 1.0);
        assert_eq!(d.seed, None);
        assert!(d.validate().is_ok());
        let g = SamplingParams::greedy();
        assert!(g.is_greedy());
        assert_eq!(SamplingParams { temperature: 1.0, ..g }, d);
    }

    #[test]
    fn argmax_lowest_index_wins_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[-5.0, -1.0, -1.0]), 1);
        assert_eq!(argmax(&[7.0]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn argmax_ignores_nan() {
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[NEG_INF, NEG_INF, NEG_INF]), 0);
        assert_eq!(argmax(&[NEG_INF, f32::NAN, -1e30]), 2);
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut logits = [2.0, -2.0, 1.0, 0.5, 0.0];
        // Token 0 appears twice but is penalised once; 99 is outside the vocab and ignored.
        apply_repetition_penalty(&mut logits, &[0, 1, 0, 4, 99], 2.0);
        assert_eq!(logits, [1.0, -4.0, 1.0, 0.5, 0.0]);

        let mut logits = [2.0, -2.0];
        apply_repetition_penalty(&mut logits, &[0, 1], 0.5);
        assert_eq!(logits, [4.0, -1.0]);

        let mut logits = [2.0, -2.0];
        apply_repetition_penalty(&mut logits, &[0, 1], 1.0);
        assert_eq!(logits, [2.0, -2.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_follow_openai() {
        let mut logits = [1.0, 1.0, 1.0, -1.0];
        apply_presence_frequency_penalty(&mut logits, &[0, 0, 2, 3, 3, 3, 42], 0.5, 0.25);
        // 0: 2 times, 2: once, 3: 3 times, 1: never.
        assert_eq!(logits, [0.0, 1.0, 0.25, -2.25]);

        // Negative penalties encourage repetition.
        let mut logits = [1.0, -1.0, 0.0];
        apply_presence_frequency_penalty(&mut logits, &[0, 1, 1], -0.5, -1.0);
        assert_eq!(logits, [2.5, 1.5, 0.0]);
    }

    #[test]
    fn temperature_scales_and_zero_keeps_argmax() {
        let mut logits = [2.0, -4.0, 1.0];
        apply_temperature(&mut logits, 2.0);
        assert_eq!(logits, [1.0, -2.0, 0.5]);
        apply_temperature(&mut logits, 0.0);
        assert_eq!(logits, [1.0, NEG_INF, NEG_INF]);
        let mut logits = [2.0, -4.0];
        apply_temperature(&mut logits, -1.0);
        assert_eq!(logits, [2.0, -4.0]);
    }

    #[test]
    fn top_k_keeps_k_highest() {
        let mut logits = [1.0, 5.0, 3.0, 4.0, 2.0];
        top_k_filter(&mut logits, 2);
        assert_eq!(kept(&logits), vec![1, 3]);
        assert_eq!(logits[1], 5.0);

        let mut logits = [1.0, 5.0, 3.0];
        top_k_filter(&mut logits, 0);
        assert_eq!(kept(&logits), vec![0, 1, 2]);
        top_k_filter(&mut logits, 3);
        assert_eq!(kept(&logits), vec![0, 1, 2]);

        // NaN never survives and never counts among the top.
        let mut logits = [f32::NAN, 1.0, 2.0, f32::NAN];
        top_k_filter(&mut logits, 1);
        assert_eq!(kept(&logits), vec![2]);
    }

    #[test]
    fn top_k_candidates_are_exact_on_ties_orders_and_nan() {
        let n = 5_000;
        let patterns: Vec<(&str, Vec<f32>)> = vec![
            ("ascending", (0..n).map(|i| i as f32 * 0.01).collect()),
            ("descending", (0..n).map(|i| -(i as f32)).collect()),
            ("few values", (0..n).map(|i| (i * 7 % 5) as f32).collect()),
            ("spread", spread(n)),
            (
                "nan and -inf",
                (0..n)
                    .map(|i| match i % 3 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        _ => (i % 11) as f32,
                    })
                    .collect(),
            ),
        ];
        for (name, values) in &patterns {
            let as_number = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
            let mut sorted: Vec<f32> = values.iter().map(|&v| as_number(v)).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for k in [1, 2, 7, 300, 2_000, n - 1, n] {
                let mut candidates = Vec::new();
                let kth = top_k_candidates(values, k, &mut candidates);
                assert_eq!(kth, sorted[k - 1], "{name}, k = {k}");
                let want: Vec<(u32, f32)> =
                    values.iter().enumerate().filter(|&(_, &v)| v >= kth).map(|(i, &v)| (i as u32, v)).collect();
                assert_eq!(candidates, want, "{name}, k = {k}");
            }
        }
    }

    #[test]
    fn top_k_on_a_large_vocab_matches_a_full_sort() {
        let logits = spread(10_000);
        for k in [1, 10, 100, 5_000] {
            let mut filtered = logits.clone();
            top_k_filter(&mut filtered, k);
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let mut expected = order[..k].to_vec();
            expected.sort();
            assert_eq!(kept(&filtered), expected, "k = {k}");
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        let logits = log_probs(&[0.5, 0.3, 0.15, 0.05]);
        let cases: [(f32, &[usize]); 5] =
            [(0.4, &[0]), (0.75, &[0, 1]), (0.9, &[0, 1, 2]), (0.99, &[0, 1, 2, 3]), (1e-6, &[0])];
        for (p, expected) in cases {
            let mut filtered = logits.clone();
            top_p_filter(&mut filtered, p);
            assert_eq!(kept(&filtered), expected, "p = {p}");
        }
        // Order in the row does not matter.
        let mut shuffled = log_probs(&[0.05, 0.3, 0.5, 0.15]);
        top_p_filter(&mut shuffled, 0.75);
        assert_eq!(kept(&shuffled), vec![1, 2]);
        // p = 1 is off.
        let mut all = logits.clone();
        top_p_filter(&mut all, 1.0);
        assert_eq!(kept(&all), vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_p_on_a_large_vocab_matches_a_full_sort() {
        let logits: Vec<f32> = spread(10_000).iter().map(|v| v * 3.0).collect();
        let max = logits.iter().copied().fold(NEG_INF, f32::max);
        let total: f64 = logits.iter().map(|&v| f64::from((v - max).exp())).sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        for p in [0.01f32, 0.3, 0.9, 0.999] {
            let mut cumulative = 0.0;
            let mut count = 0;
            for &i in &order {
                cumulative += f64::from((logits[i] - max).exp());
                count += 1;
                if cumulative >= f64::from(p) * total {
                    break;
                }
            }
            let mut expected = order[..count].to_vec();
            expected.sort();
            let mut filtered = logits.clone();
            top_p_filter(&mut filtered, p);
            assert_eq!(kept(&filtered), expected, "p = {p}");
        }
    }

    #[test]
    fn min_p_drops_tokens_below_fraction_of_max() {
        let logits = log_probs(&[0.5, 0.3, 0.15, 0.05]);
        let mut filtered = logits.clone();
        min_p_filter(&mut filtered, 0.2); // cut at 0.1
        assert_eq!(kept(&filtered), vec![0, 1, 2]);
        let mut filtered = logits.clone();
        min_p_filter(&mut filtered, 0.5); // cut at 0.25
        assert_eq!(kept(&filtered), vec![0, 1]);
        let mut filtered = logits.clone();
        min_p_filter(&mut filtered, 1.0);
        assert_eq!(kept(&filtered), vec![0]);
        let mut filtered = logits.clone();
        min_p_filter(&mut filtered, 0.0);
        assert_eq!(kept(&filtered), vec![0, 1, 2, 3]);
    }

    #[test]
    fn softmax_normalises_and_handles_infinities() {
        let mut logits = [1.0, 2.0, 3.0, NEG_INF, f32::NAN];
        softmax_in_place(&mut logits);
        let sum: f32 = logits.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!(logits[2] > logits[1] && logits[1] > logits[0]);
        assert_eq!(logits[3], 0.0);
        assert_eq!(logits[4], 0.0);
        assert!((logits[1] / logits[0] - std::f32::consts::E).abs() < 1e-4);

        let mut logits = [1.0, f32::INFINITY, 0.0, f32::INFINITY];
        softmax_in_place(&mut logits);
        assert_eq!(logits, [0.0, 0.5, 0.0, 0.5]);

        let mut logits = [NEG_INF, f32::NAN];
        softmax_in_place(&mut logits);
        assert_eq!(logits, [0.0, 0.0]);

        // Huge logits do not overflow.
        let mut logits = [1e30, 1e30 - 1e24, -1e30];
        softmax_in_place(&mut logits);
        assert!(logits.iter().all(|p| p.is_finite()));
    }

    #[test]
    fn sample_from_logits_matches_distribution() {
        let probs = [0.2f32, 0.5, 0.3];
        let logits = log_probs(&probs);
        let mut rng = StdRng::seed_from_u64(7);
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[sample_from_logits(&logits, &mut rng) as usize] += 1;
        }
        for (count, p) in counts.iter().zip(probs) {
            let freq = *count as f32 / n as f32;
            assert!((freq - p).abs() < 0.03, "counts {counts:?}");
        }
    }

    #[test]
    fn draws_across_blocks_of_a_large_vocab() {
        let mut logits = vec![NEG_INF; 1000];
        let picks = [(10usize, 0.2f32), (500, 0.5), (999, 0.3)];
        for (i, p) in picks {
            logits[i] = p.ln();
        }
        let mut s = sampler(seeded(11));
        let mut rng = StdRng::seed_from_u64(11);
        let n = 20_000;
        let (mut from_sampler, mut from_fn) = ([0usize; 1000], [0usize; 1000]);
        for _ in 0..n {
            from_sampler[s.sample(&logits, &[], &[]) as usize] += 1;
            from_fn[sample_from_logits(&logits, &mut rng) as usize] += 1;
        }
        for counts in [from_sampler, from_fn] {
            assert_eq!(counts.iter().sum::<usize>(), n);
            for (i, p) in picks {
                let freq = counts[i] as f32 / n as f32;
                assert!((freq - p).abs() < 0.03, "token {i}: {freq}");
            }
        }
        // All the mass on the very last token.
        let mut last = vec![NEG_INF; 777];
        last[776] = -3.0;
        assert_eq!(sample_from_logits(&last, &mut rng), 776);
    }

    #[test]
    fn sample_from_logits_edge_cases() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample_from_logits(&[], &mut rng), 0);
        assert_eq!(sample_from_logits(&[f32::NAN, f32::NAN], &mut rng), 0);
        assert_eq!(sample_from_logits(&[NEG_INF, NEG_INF, NEG_INF], &mut rng), 0);
        for _ in 0..100 {
            assert_eq!(sample_from_logits(&[f32::NAN, 0.0, NEG_INF], &mut rng), 1);
            let t = sample_from_logits(&[1.0, f32::INFINITY, 0.0, f32::INFINITY], &mut rng);
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn sampler_frequencies_match_a_known_distribution() {
        let probs = [0.2f32, 0.5, 0.3];
        // An offset changes nothing after softmax.
        let logits: Vec<f32> = log_probs(&probs).iter().map(|v| v + 3.0).collect();
        let mut s = sampler(seeded(1234));
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits, &[], &[]) as usize] += 1;
        }
        for (count, p) in counts.iter().zip(probs) {
            let freq = *count as f32 / n as f32;
            assert!((freq - p).abs() < 0.03, "counts {counts:?}");
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let flat = vec![0.0f32; 100];
        let draws = |seed: u64| {
            let mut s = sampler(seeded(seed));
            (0..50).map(|_| s.sample(&flat, &[], &[])).collect::<Vec<u32>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
        // Unseeded samplers work and differ from each other.
        let mut a = sampler(SamplingParams::default());
        let mut b = sampler(SamplingParams::default());
        let da: Vec<u32> = (0..50).map(|_| a.sample(&flat, &[], &[])).collect();
        let db: Vec<u32> = (0..50).map(|_| b.sample(&flat, &[], &[])).collect();
        assert!(da.iter().all(|&t| t < 100));
        assert_ne!(da, db);
    }

    #[test]
    fn small_temperature_concentrates_on_argmax() {
        let logits = [1.0, 2.0, 1.9, -3.0];
        for temperature in [0.01, 1e-30] {
            let mut s = sampler(SamplingParams { temperature, ..seeded(3) });
            for _ in 0..1000 {
                assert_eq!(s.sample(&logits, &[], &[]), 1, "temperature {temperature}");
            }
        }
        // While temperature 1 spreads out.
        let mut s = sampler(seeded(3));
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits, &[], &[])).collect();
        assert!(picks.contains(&2) && picks.contains(&0));
    }

    #[test]
    fn greedy_sampler_picks_argmax_after_penalties() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[3.0, 2.0, 1.0], &[], &[]), 0);
        assert_eq!(s.sample(&[3.0, 3.0, 1.0], &[], &[]), 0);

        let mut s = sampler(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() });
        // 3.0 / 2 = 1.5 < 2.0; the prompt counts too.
        assert_eq!(s.sample(&[3.0, 2.0, 1.0], &[0], &[]), 1);
        assert_eq!(s.sample(&[3.0, 2.0, 1.0], &[], &[0, 0]), 1);
        // Negative logits get more negative: -1 * 2 = -2 < -1.5.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0], &[]), 1);

        let mut s =
            sampler(SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.25, ..SamplingParams::greedy() });
        // 3 - 2 * 0.5 - 0.25 = 1.75 < 2.0; prompt tokens are not penalised.
        assert_eq!(s.sample(&[3.0, 2.0], &[], &[0, 0]), 1);
        assert_eq!(s.sample(&[3.0, 2.0], &[0, 0, 0], &[]), 0);
    }

    #[test]
    fn sampler_applies_truncation_filters() {
        let logits = [0.0, 10.0, 9.5, 0.0, 9.0, 0.0];
        let mut s = sampler(SamplingParams { top_k: 2, ..seeded(5) });
        let mut seen = [false; 6];
        for _ in 0..500 {
            seen[s.sample(&logits, &[], &[]) as usize] = true;
        }
        assert_eq!(seen, [false, true, true, false, false, false]);

        let logits = log_probs(&[0.5, 0.3, 0.15, 0.05]);
        let mut s = sampler(SamplingParams { top_p: 0.75, ..seeded(5) });
        let mut seen = [false; 4];
        for _ in 0..500 {
            seen[s.sample(&logits, &[], &[]) as usize] = true;
        }
        assert_eq!(seen, [true, true, false, false]);

        let mut s = sampler(SamplingParams { min_p: 0.2, ..seeded(5) });
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits, &[], &[]) as usize] = true;
        }
        assert_eq!(seen, [true, true, true, false]);
    }

    #[test]
    fn sampler_draws_only_what_the_filter_chain_keeps() {
        let logits: Vec<f32> = spread(5_000).iter().map(|v| v * 2.0).collect();
        let cases = [(20, 0.5, 0.0), (300, 0.95, 0.0), (0, 0.3, 0.0), (100, 1.0, 0.3), (4_000, 0.9, 0.01)];
        for (top_k, top_p, min_p) in cases {
            let mut expected = logits.clone();
            top_k_filter(&mut expected, top_k);
            top_p_filter(&mut expected, top_p);
            min_p_filter(&mut expected, min_p);
            let expected = kept(&expected);
            assert!(!expected.is_empty());
            let mut s = sampler(SamplingParams { top_k, top_p, min_p, ..seeded(21) });
            let mut drawn = vec![false; logits.len()];
            for _ in 0..3_000 {
                let t = s.sample(&logits, &[], &[]) as usize;
                assert!(expected.binary_search(&t).is_ok(), "{top_k} {top_p} {min_p}: drew {t}");
                drawn[t] = true;
            }
            // The most likely survivor shows up.
            assert!(drawn[argmax(&logits) as usize]);
        }
    }

    #[test]
    fn sampler_never_panics_on_nan() {
        for params in [SamplingParams::greedy(), seeded(9)] {
            let mut s = sampler(SamplingParams { top_k: 2, top_p: 0.9, min_p: 0.1, ..params });
            assert_eq!(s.sample(&[f32::NAN, f32::NAN, f32::NAN], &[0], &[1]), 0);
            assert_eq!(s.sample(&[NEG_INF, f32::NAN], &[], &[]), 0);
            assert_eq!(s.sample(&[], &[], &[]), 0);
            for _ in 0..100 {
                assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN, -50.0], &[], &[]), 1);
                let t = s.sample(&[0.0, f32::INFINITY, f32::NAN, f32::INFINITY], &[], &[]);
                assert!(t == 1 || t == 3);
            }
        }
    }

    #[test]
    fn validate_rejects_out_of_range_values() {
        let d = SamplingParams::default();
        let cases = [
            (SamplingParams { temperature: -0.1, ..d.clone() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..d.clone() }, "temperature"),
            (SamplingParams { temperature: f32::INFINITY, ..d.clone() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..d.clone() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..d.clone() }, "top_p"),
            (SamplingParams { top_p: f32::NAN, ..d.clone() }, "top_p"),
            (SamplingParams { min_p: -0.1, ..d.clone() }, "min_p"),
            (SamplingParams { min_p: 1.1, ..d.clone() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..d.clone() }, "repetition_penalty"),
            (SamplingParams { repetition_penalty: -1.0, ..d.clone() }, "repetition_penalty"),
            (SamplingParams { repetition_penalty: f32::NAN, ..d.clone() }, "repetition_penalty"),
            (SamplingParams { presence_penalty: 2.5, ..d.clone() }, "presence_penalty"),
            (SamplingParams { presence_penalty: f32::NAN, ..d.clone() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: -2.5, ..d.clone() }, "frequency_penalty"),
            (SamplingParams { frequency_penalty: f32::INFINITY, ..d.clone() }, "frequency_penalty"),
        ];
        for (params, field) in cases {
            let err = params.validate().expect_err(field);
            let msg = err.to_string();
            assert!(msg.starts_with("invalid sampling parameter: "), "{msg}");
            assert!(msg.contains(field), "{msg} should name {field}");
            assert!(Sampler::new(params).is_err());
        }
        let edges = [
            SamplingParams { temperature: 0.0, top_p: 1.0, min_p: 1.0, ..d.clone() },
            SamplingParams { top_p: 1e-6, min_p: 0.0, repetition_penalty: 1e-3, ..d.clone() },
            SamplingParams { presence_penalty: -2.0, frequency_penalty: 2.0, ..d.clone() },
        ];
        for params in edges {
            assert!(params.validate().is_ok(), "{params:?}");
        }
    }
}
