//! Mixture-of-experts feed-forward: a router picks `top_k` experts per token, each expert is a
//! SwiGLU MLP, and an optional shared expert runs on every token.
//!
//! ```text
//! logits = x Wrᵀ                                   [T, E]   (router, kept in its stored format)
//! experts, weights = route(logits)                 [T, k] each (see `route`)
//! y[t] = Σ_j weights[t,j] · expert[experts[t,j]](x[t])  (+ shared(x[t]))
//! ```
//!
//! The experts run grouped: the tokens routed to an expert are gathered into one matrix, the
//! expert runs once over them, and its rows are scattered back weighted. A batch therefore
//! reads each chosen expert's weights once, and an expert no token chose is never read (with
//! memory-mapped weights, never even paged in). Under a memory bound the routed experts come from
//! an expert cache instead ([`crate::layers::ExpertCache`]): the hits run while the misses are
//! read, and the next mixture layer's likely experts are read ahead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pio_kernels::matmul::{self, Layout, WeightView};
use pio_kernels::{ops, parallel};

use crate::config::{Gating, MoeConfig};
use crate::layers::expert_cache::{parts_of, ExpertCache, Part};
use crate::layers::{Linear, Mlp};
use crate::weights::Checkpoint;
use crate::Result;

/// Routing: the chosen experts of one token and their weights, from its router logits.
///
/// - [`Gating::Softmax`] (Qwen3-MoE): `p = softmax(logits)`; the `top_k` largest `p`; weights
///   are those `p`, divided by their sum when `norm_topk_prob`.
/// - [`Gating::SigmoidGrouped`] (DeepSeek-V3 `noaux_tc`, GLM-4.7-Flash): `s = sigmoid(logits)`;
///   choice scores `c = s + bias`; the experts, split into `n_group` equal groups, score each
///   group as the sum of its two best `c`; the `topk_group` best groups stay and the others'
///   `c` become -inf (transformers 5.x); the `top_k` largest `c` are chosen; weights are their `s` (without the bias),
///   divided by `sum + 1e-20` when `norm_topk_prob`, times `routed_scaling_factor`.
///
/// Ties go to the lower index. `experts` and `weights` get `top_k` entries, best first.
pub fn route(
    gating: &Gating,
    top_k: usize,
    norm_topk_prob: bool,
    logits: &[f32],
    correction_bias: Option<&[f32]>,
    experts: &mut Vec<usize>,
    weights: &mut Vec<f32>,
) {
    experts.clear();
    weights.clear();
    let n = logits.len();
    match *gating {
        Gating::Softmax => {
            let mut p = logits.to_vec();
            ops::softmax(&mut p);
            top_k_indices(&p, top_k, experts);
            weights.extend(experts.iter().map(|&e| p[e]));
            if norm_topk_prob {
                let sum: f32 = weights.iter().sum();
                weights.iter_mut().for_each(|w| *w /= sum);
            }
        }
        Gating::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } => {
            let s: Vec<f32> = logits.iter().map(|&l| ops::sigmoid(l)).collect();
            let mut c: Vec<f32> = match correction_bias {
                Some(b) => s.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => s.clone(),
            };
            if n_group > 1 {
                let per = n / n_group;
                let group_scores: Vec<f32> = c
                    .chunks_exact(per)
                    .map(|g| {
                        let mut best = Vec::with_capacity(2);
                        top_k_indices(g, 2.min(per), &mut best);
                        best.iter().map(|&i| g[i]).sum()
                    })
                    .collect();
                let mut keep = Vec::with_capacity(topk_group);
                top_k_indices(&group_scores, topk_group, &mut keep);
                for (g, chunk) in c.chunks_exact_mut(per).enumerate() {
                    if !keep.contains(&g) {
                        chunk.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                    }
                }
            }
            top_k_indices(&c, top_k, experts);
            weights.extend(experts.iter().map(|&e| s[e]));
            if norm_topk_prob {
                let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            weights.iter_mut().for_each(|w| *w *= routed_scaling_factor);
        }
    }
}

/// Indices of the `k` largest values, largest first, ties to the lower index (NaN never wins).
/// `k` passes over `values`: `k` is at most a few dozen.
fn top_k_indices(values: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    for _ in 0..k.min(values.len()) {
        let mut best: Option<usize> = None;
        for (i, &v) in values.iter().enumerate() {
            if out.contains(&i) {
                continue;
            }
            match best {
                Some(b) if v.partial_cmp(&values[b]) != Some(std::cmp::Ordering::Greater) => {}
                Some(_) => best = Some(i),
                None if !v.is_nan() => best = Some(i),
                None => {}
            }
        }
        // Only NaNs left: take the lowest unused index so the count is still k.
        let pick = best.or_else(|| (0..values.len()).find(|i| !out.contains(i)));
        match pick {
            Some(i) => out.push(i),
            None => break,
        }
    }
}

/// Counts of what the experts did, summed over forwards (for `pio bench`).
#[derive(Debug, Default)]
struct Counters {
    tokens: AtomicU64,
    /// Experts run (each reads its weights once), summed over forwards.
    expert_runs: AtomicU64,
    forwards: AtomicU64,
}

/// Totals over every mixture layer of a model, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MoeStats {
    /// Forward passes and tokens seen (per layer, summed over layers).
    pub forwards: u64,
    pub tokens: u64,
    /// Expert weight bytes read, summed over forwards and layers.
    pub expert_bytes_read: u64,
    /// Bytes of all routed experts of all mixture layers.
    pub expert_bytes_total: u64,
    /// Mixture layers.
    pub layers: u64,
}

impl MoeStats {
    /// What happened between `before` (an earlier snapshot of the same model) and `self`.
    pub fn since(&self, before: &MoeStats) -> MoeStats {
        MoeStats {
            forwards: self.forwards - before.forwards,
            tokens: self.tokens - before.tokens,
            expert_bytes_read: self.expert_bytes_read - before.expert_bytes_read,
            expert_bytes_total: self.expert_bytes_total,
            layers: self.layers,
        }
    }

    /// Fraction of all routed-expert weights one forward reads, on average.
    pub fn fraction_read_per_forward(&self) -> f64 {
        if self.forwards == 0 || self.expert_bytes_total == 0 {
            return 0.0;
        }
        // forwards counts per layer; the total covers all layers.
        let per_layer_forwards = self.forwards as f64 / self.layers.max(1) as f64;
        self.expert_bytes_read as f64 / per_layer_forwards / self.expert_bytes_total as f64
    }

    pub fn add(&mut self, o: &MoeStats) {
        self.forwards += o.forwards;
        self.tokens += o.tokens;
        self.expert_bytes_read += o.expert_bytes_read;
        self.expert_bytes_total += o.expert_bytes_total;
        self.layers += o.layers;
    }
}

/// A mixture-of-experts feed-forward layer.
#[derive(Debug)]
pub struct SparseMoe {
    /// `[num_experts, hidden]`.
    pub router: Linear,
    /// `[num_experts]`, sigmoid gating only: added to the scores to choose experts.
    pub correction_bias: Option<Vec<f32>>,
    pub experts: Vec<Mlp>,
    pub shared_expert: Option<Mlp>,
    /// `[hidden]`: the shared expert's output is scaled by `sigmoid(x · gate)` (Qwen3-Next).
    pub shared_expert_gate: Option<Vec<f32>>,
    pub gating: Gating,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    counters: Counters,
    /// Routed experts read through an expert cache instead of the mapped file.
    stream: Option<Streamed>,
    /// Benchmarks only: experts drawn at random instead of chosen by the router.
    synthetic_routing: Option<SyntheticRouting>,
}

/// Experts drawn from a Zipf law over a random ranking of them (exponent 0: uniform), in place
/// of the router's choice: a routing trace with a stated skew for measuring an expert cache on
/// random-weight models, whose own routing says nothing about a trained model's. The outputs
/// are no longer the model's.
#[derive(Debug)]
struct SyntheticRouting {
    /// Expert of each rank.
    expert_of_rank: Vec<usize>,
    /// Cumulative probability of ranks 0..=r.
    cdf: Vec<f64>,
    state: std::sync::Mutex<u64>,
}

impl SyntheticRouting {
    fn new(num_experts: usize, zipf: f64, seed: u64) -> SyntheticRouting {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut expert_of_rank: Vec<usize> = (0..num_experts).collect();
        for i in (1..num_experts).rev() {
            expert_of_rank.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        let weights: Vec<f64> = (1..=num_experts).map(|r| (r as f64).powf(-zipf)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights.iter().map(|w| {
            acc += w / total;
            acc
        });
        SyntheticRouting { expert_of_rank, cdf: cdf.collect(), state: std::sync::Mutex::new(next()) }
    }

    /// `k` distinct experts.
    fn draw(&self, k: usize) -> Vec<usize> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let k = k.min(self.cdf.len());
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            let u = (*state >> 11) as f64 / (1u64 << 53) as f64;
            let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1);
            let e = self.expert_of_rank[rank];
            if !out.contains(&e) {
                out.push(e);
            }
        }
        out
    }
}

/// Each routed expert's down-projection rows, and the shared expert's.
type ExpertOutputs = (Vec<Vec<f32>>, Option<Vec<f32>>);

/// A mixture layer's place in an expert cache.
#[derive(Debug)]
struct Streamed {
    cache: Arc<ExpertCache>,
    layer: usize,
}

/// The three matrices of an MLP as the kernels take them.
fn mlp_views(m: &Mlp) -> [WeightView<'_>; 3] {
    [m.gate_proj.view(), m.up_proj.view(), m.down_proj.view()]
}

/// Runs SwiGLU MLPs, `mlps[i]` over `inputs[i]` (`(x, n)`), all gate/up products in one
/// threaded pass and all down products in another; returns each MLP's output. (The MLPs of a
/// mixture have no biases.)
fn run_mlps(mlps: &[[WeightView<'_>; 3]], inputs: &[(&[f32], usize)]) -> Vec<Vec<f32>> {
    let gate_up: Vec<WeightView<'_>> = mlps.iter().flat_map(|m| [m[0], m[1]]).collect();
    let pair_input: Vec<usize> = (0..gate_up.len()).map(|i| i / 2).collect();
    let mut ys = matmul::matmul_multi(&gate_up, &pair_input, inputs).into_iter();
    let mut acts = Vec::with_capacity(mlps.len());
    while let (Some(mut gate), Some(up)) = (ys.next(), ys.next()) {
        ops::swiglu(&mut gate, &up);
        acts.push(gate);
    }
    let act_inputs: Vec<(&[f32], usize)> = acts.iter().zip(inputs).map(|(a, &(_, n))| (a.as_slice(), n)).collect();
    let downs: Vec<WeightView<'_>> = mlps.iter().map(|m| m[2]).collect();
    let own_input: Vec<usize> = (0..downs.len()).collect();
    matmul::matmul_multi(&downs, &own_input, &act_inputs)
}

impl SparseMoe {
    /// Takes `{prefix}.gate.weight` (the router), `{prefix}.gate.e_score_correction_bias`
    /// (sigmoid gating), `{prefix}.experts.{e}.{gate,up,down}_proj.weight` and, with a shared
    /// expert, `{prefix}.shared_experts.*` (or `shared_expert.*`, Qwen3-Next's spelling) and
    /// its gate `{prefix}.shared_expert_gate.weight` (`[1, hidden]` or `[hidden]`).
    pub fn load(ckpt: &mut Checkpoint, prefix: &str, hidden: usize, c: &MoeConfig) -> Result<SparseMoe> {
        let router = Linear::load(ckpt, &format!("{prefix}.gate"), hidden, c.num_experts, false)?;
        let correction_bias = match c.gating {
            Gating::SigmoidGrouped { .. } => {
                Some(ckpt.take(&format!("{prefix}.gate.e_score_correction_bias"), &[c.num_experts])?.to_f32_vec())
            }
            Gating::Softmax => None,
        };
        let experts = (0..c.num_experts)
            .map(|e| Mlp::load(ckpt, &format!("{prefix}.experts.{e}"), hidden, c.moe_intermediate_size, false))
            .collect::<Result<Vec<_>>>()?;
        let singular = ckpt.contains(&format!("{prefix}.shared_expert.up_proj.weight"));
        let shared_prefix = format!("{prefix}.{}", if singular { "shared_expert" } else { "shared_experts" });
        let shared_expert = (c.shared_intermediate_size > 0)
            .then(|| Mlp::load(ckpt, &shared_prefix, hidden, c.shared_intermediate_size, false))
            .transpose()?;
        let shared_expert_gate = if c.shared_expert_gate && c.shared_intermediate_size > 0 {
            let name = format!("{prefix}.shared_expert_gate.weight");
            let shape: &[usize] = if ckpt.shape(&name) == Some(&[hidden]) { &[hidden] } else { &[1, hidden] };
            Some(ckpt.take(&name, shape)?.to_f32_vec())
        } else {
            None
        };
        Ok(SparseMoe {
            router,
            correction_bias,
            experts,
            shared_expert,
            shared_expert_gate,
            gating: c.gating,
            top_k: c.top_k,
            norm_topk_prob: c.norm_topk_prob,
            counters: Counters::default(),
            stream: None,
            synthetic_routing: None,
        })
    }

    /// The experts `tokens` chose, each with its tokens: `(expert, [(token, weight)])`, in
    /// expert order.
    fn route_tokens(&self, x: &[f32]) -> Vec<(usize, Vec<(usize, f32)>)> {
        let logits = self.router.forward(x);
        let num_experts = self.experts.len();
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); num_experts];
        if let Some(synthetic) = &self.synthetic_routing {
            for t in 0..logits.len() / num_experts.max(1) {
                for e in synthetic.draw(self.top_k) {
                    routed[e].push((t, 1.0 / self.top_k as f32));
                }
            }
            return routed.into_iter().enumerate().filter(|(_, tokens)| !tokens.is_empty()).collect();
        }
        let (mut chosen, mut weights) = (Vec::with_capacity(self.top_k), Vec::with_capacity(self.top_k));
        for (t, row) in logits.chunks_exact(num_experts).enumerate() {
            route(
                &self.gating,
                self.top_k,
                self.norm_topk_prob,
                row,
                self.correction_bias.as_deref(),
                &mut chosen,
                &mut weights,
            );
            for (&e, &w) in chosen.iter().zip(&weights) {
                routed[e].push((t, w));
            }
        }
        routed.into_iter().enumerate().filter(|(_, tokens)| !tokens.is_empty()).collect()
    }

    /// `x`: `[n, hidden]` -> `[n, hidden]`. `next`: the next mixture layer, whose likely
    /// experts a streamed layer starts reading (see [`SparseMoe::stream`]).
    pub fn forward(&self, x: &[f32], next: Option<&SparseMoe>) -> Result<Vec<f32>> {
        let h = self.router.in_features();
        let n = x.len() / h;
        let active = self.route_tokens(x);
        // Copies of the routed rows, experts split across the cores (a 512-token prompt of a
        // 10-of-128 mixture copies 40 MB per layer).
        let copied: usize = active.iter().map(|(_, tokens)| tokens.len() * h).sum();
        let gathered: Vec<Vec<f32>> = parallel::for_each_range(active.len(), copied, |a, b| {
            active[a..b]
                .iter()
                .map(|(_, tokens)| {
                    let mut rows = Vec::with_capacity(tokens.len() * h);
                    for &(t, _) in tokens.iter() {
                        rows.extend_from_slice(&x[t * h..(t + 1) * h]);
                    }
                    rows
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect();
        let inputs: Vec<(&[f32], usize)> =
            gathered.iter().zip(&active).map(|(g, (_, tokens))| (g.as_slice(), tokens.len())).collect();
        // Each expert's down projection over its tokens, and the shared expert's over all.
        let (down, shared_out) = match &self.stream {
            None => {
                let mut views: Vec<[WeightView<'_>; 3]> =
                    active.iter().map(|(e, _)| mlp_views(&self.experts[*e])).collect();
                let mut all_inputs = inputs.clone();
                if let Some(shared) = &self.shared_expert {
                    views.push(mlp_views(shared));
                    all_inputs.push((x, n));
                }
                let mut down = run_mlps(&views, &all_inputs);
                let shared_out = self.shared_expert.as_ref().and_then(|_| down.pop());
                (down, shared_out)
            }
            Some(stream) => self.run_streamed(stream, &active, &inputs, x, next)?,
        };

        // Each token's weighted expert rows, summed in expert order, tokens split across the
        // cores.
        let mut from: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); n];
        for (a, (_, tokens)) in active.iter().enumerate() {
            for (i, &(t, w)) in tokens.iter().enumerate() {
                from[t].push((a, i, w));
            }
        }
        let mut out = vec![0f32; n * h];
        let rows: Vec<std::sync::Mutex<&mut [f32]>> = out.chunks_exact_mut(h).map(std::sync::Mutex::new).collect();
        parallel::for_each_range(n, copied, |a, b| {
            for t in a..b {
                let mut row = rows[t].lock().unwrap_or_else(|e| e.into_inner());
                for &(e, i, w) in &from[t] {
                    ops::axpy(w, &down[e][i * h..(i + 1) * h], &mut row);
                }
            }
        });
        drop(rows);
        if let Some(shared_out) = &shared_out {
            match &self.shared_expert_gate {
                None => ops::add_in_place(&mut out, shared_out),
                Some(w) => {
                    for ((o, s), xt) in out.chunks_exact_mut(h).zip(shared_out.chunks_exact(h)).zip(x.chunks_exact(h)) {
                        let g = ops::sigmoid(ops::dot(xt, w));
                        ops::axpy(g, s, o);
                    }
                }
            }
        }
        self.counters.forwards.fetch_add(1, Ordering::Relaxed);
        self.counters.tokens.fetch_add(n as u64, Ordering::Relaxed);
        self.counters.expert_runs.fetch_add(active.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// The experts of `active` from the expert cache: pins what fits, computes the hits (and
    /// the shared expert) while the misses are read, then each group of misses as it arrives;
    /// again until every expert ran. Each expert's output is the same bits as from resident
    /// weights (products do not depend on what else runs beside them).
    fn run_streamed(
        &self,
        stream: &Streamed,
        active: &[(usize, Vec<(usize, f32)>)],
        inputs: &[(&[f32], usize)],
        x: &[f32],
        next: Option<&SparseMoe>,
    ) -> Result<ExpertOutputs> {
        let cache = &*stream.cache;
        let mut down: Vec<Option<Vec<f32>>> = vec![None; active.len()];
        let mut shared_out = None;
        let mut shared_pending = self.shared_expert.is_some();
        let mut pending: Vec<usize> = (0..active.len()).collect();
        let mut prefetched = false;
        while !pending.is_empty() || shared_pending {
            let wanted: Vec<usize> = pending.iter().map(|&a| active[a].0).collect();
            let pinned: Vec<(usize, usize)> = if wanted.is_empty() {
                Vec::new()
            } else {
                cache.pin(stream.layer, &wanted).into_iter().map(|(i, slot)| (pending[i], slot)).collect()
            };
            if !prefetched {
                prefetched = true;
                if let Some(next) = next.filter(|_| cache.options.prefetch) {
                    next.prefetch_for(x, cache);
                }
            }
            let mut waiting = pinned;
            let result = (|| -> Result<()> {
                loop {
                    let slots: Vec<usize> = waiting.iter().map(|p| p.1).collect();
                    let ready = if slots.is_empty() { Vec::new() } else { cache.wait_ready(&slots)? };
                    let group: Vec<(usize, usize)> = ready.iter().map(|&i| waiting[i]).collect();
                    let mut views: Vec<[WeightView<'_>; 3]> = group
                        .iter()
                        .map(|&(a, slot)| {
                            let mlp = &self.experts[active[a].0];
                            let v = mlp_views(mlp);
                            [0, 1, 2].map(|j| WeightView { data: cache.bytes(slot, j), layout: Layout::Rows, ..v[j] })
                        })
                        .collect();
                    let mut group_inputs: Vec<(&[f32], usize)> = group.iter().map(|&(a, _)| inputs[a]).collect();
                    if shared_pending {
                        if let Some(shared) = &self.shared_expert {
                            views.push(mlp_views(shared));
                            group_inputs.push((x, x.len() / self.router.in_features()));
                        }
                    }
                    if !views.is_empty() {
                        let mut outs = run_mlps(&views, &group_inputs);
                        if std::mem::take(&mut shared_pending) {
                            shared_out = outs.pop();
                        }
                        for (&(a, _), y) in group.iter().zip(outs) {
                            down[a] = Some(y);
                        }
                    }
                    cache.unpin(&group.iter().map(|g| g.1).collect::<Vec<_>>());
                    let mut i = 0;
                    waiting.retain(|_| {
                        i += 1;
                        !ready.contains(&(i - 1))
                    });
                    if waiting.is_empty() {
                        return Ok(());
                    }
                }
            })();
            if let Err(e) = result {
                cache.unpin(&waiting.iter().map(|g| g.1).collect::<Vec<_>>());
                return Err(e);
            }
            pending.retain(|&a| down[a].is_none());
        }
        let down = down.into_iter().map(|d| d.unwrap_or_default()).collect();
        Ok((down, shared_out))
    }

    /// Starts reading the experts this layer's router picks for `x` (the previous layer's
    /// input: the residual stream changes little from one layer to the next), at most a quarter
    /// of the cache's slots.
    fn prefetch_for(&self, x: &[f32], cache: &ExpertCache) {
        let Some(stream) = &self.stream else { return };
        // Synthetic routing draws at random: there is nothing to predict from, and a guess
        // would only take disk bandwidth from the reads asked for.
        if self.synthetic_routing.is_some() {
            return;
        }
        let mut experts: Vec<(usize, usize)> =
            self.route_tokens(x).into_iter().map(|(e, tokens)| (tokens.len(), e)).collect();
        // The most wanted first.
        experts.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let ids: Vec<usize> = experts.into_iter().map(|(_, e)| e).collect();
        cache.prefetch(stream.layer, &ids, (cache.num_slots() / 4).max(1));
    }

    /// Benchmarks only: draws each token's experts from a Zipf law with exponent `zipf` over a
    /// ranking of the experts shuffled by `seed` (0: uniform), with equal weights, instead of
    /// asking the router; `None` restores the router.
    pub fn set_synthetic_routing(&mut self, zipf: Option<f64>, seed: u64) {
        self.synthetic_routing = zipf.map(|z| SyntheticRouting::new(self.experts.len(), z, seed));
    }

    /// Reads this layer's routed experts through `cache` (as its streamed layer `layer`)
    /// instead of from their mapped file.
    pub fn stream(&mut self, cache: Arc<ExpertCache>, layer: usize) {
        self.stream = Some(Streamed { cache, layer });
    }

    /// Where each routed expert's gate, up and down matrices lie on disk (`file` indexes
    /// `files`, which grows with files not seen before), or `None` when some expert is in
    /// memory (quantized or rearranged at load).
    pub fn expert_parts(&self, files: &mut Vec<std::path::PathBuf>) -> Option<Vec<Vec<Part>>> {
        self.experts.iter().map(|e| parts_of(e.linears().map(|l| &l.weight), files)).collect()
    }

    /// Bytes of one routed expert's weights (all experts have the same shape and format
    /// unless a loader mixed formats; then the mean).
    fn expert_bytes(&self) -> u64 {
        let total: usize = self.experts.iter().map(Mlp::weight_bytes).sum();
        (total / self.experts.len().max(1)) as u64
    }

    /// What this layer's experts did since load.
    pub fn stats(&self) -> MoeStats {
        let per_expert = self.expert_bytes();
        MoeStats {
            forwards: self.counters.forwards.load(Ordering::Relaxed),
            tokens: self.counters.tokens.load(Ordering::Relaxed),
            expert_bytes_read: self.counters.expert_runs.load(Ordering::Relaxed) * per_expert,
            expert_bytes_total: per_expert * self.experts.len() as u64,
            layers: 1,
        }
    }

    /// Weight bytes one token reads: router, `top_k` experts, shared expert.
    pub fn decode_bytes_per_token(&self) -> usize {
        self.router.weight.bytes().len()
            + self.top_k * self.expert_bytes() as usize
            + self.shared_expert.as_ref().map_or(0, Mlp::weight_bytes)
    }

    /// Every matrix, for weight reports.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        std::iter::once(&self.router)
            .chain(self.experts.iter().flat_map(|e| e.linears()))
            .chain(self.shared_expert.iter().flat_map(|e| e.linears()))
    }

    /// The router and shared expert (read every step), and the routed experts when `routed`,
    /// to rearrange at load.
    pub fn linears_mut(&mut self, routed: bool) -> impl Iterator<Item = &mut Linear> {
        let experts = if routed { &mut self.experts[..] } else { &mut [] };
        std::iter::once(&mut self.router)
            .chain(experts.iter_mut().flat_map(|e| e.linears_mut()))
            .chain(self.shared_expert.iter_mut().flat_map(|e| e.linears_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scalar reference: sort every (value, index) pair by value descending, index ascending.
    fn reference_top_k(values: &[f32], k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx
    }

    /// Scalar reference routing written straight from the formulas, sorting instead of
    /// selecting.
    fn reference_route(
        gating: &Gating,
        top_k: usize,
        norm: bool,
        logits: &[f32],
        bias: Option<&[f32]>,
    ) -> (Vec<usize>, Vec<f32>) {
        match *gating {
            Gating::Softmax => {
                let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = logits.iter().map(|&l| ((l - m) as f64).exp()).collect();
                let z: f64 = e.iter().sum();
                let p: Vec<f32> = e.iter().map(|v| (v / z) as f32).collect();
                let idx = reference_top_k(&p, top_k);
                let mut w: Vec<f32> = idx.iter().map(|&i| p[i]).collect();
                if norm {
                    let s: f32 = w.iter().sum();
                    w.iter_mut().for_each(|x| *x /= s);
                }
                (idx, w)
            }
            Gating::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } => {
                let s: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
                let mut c: Vec<f32> = s.iter().enumerate().map(|(i, v)| v + bias.map_or(0.0, |b| b[i])).collect();
                let per = logits.len() / n_group;
                let gs: Vec<f32> = (0..n_group)
                    .map(|g| {
                        let grp = &c[g * per..(g + 1) * per];
                        reference_top_k(grp, 2.min(per)).iter().map(|&i| grp[i]).sum()
                    })
                    .collect();
                let keep = reference_top_k(&gs, topk_group);
                for (i, v) in c.iter_mut().enumerate() {
                    if !keep.contains(&(i / per)) {
                        *v = f32::NEG_INFINITY;
                    }
                }
                let idx = reference_top_k(&c, top_k);
                let mut w: Vec<f32> = idx.iter().map(|&i| s[i]).collect();
                if norm {
                    let sum: f32 = w.iter().sum::<f32>() + 1e-20;
                    w.iter_mut().for_each(|x| *x /= sum);
                }
                w.iter_mut().for_each(|x| *x *= routed_scaling_factor);
                (idx, w)
            }
        }
    }

    fn check(gating: Gating, top_k: usize, norm: bool, logits: &[f32], bias: Option<&[f32]>) -> Vec<usize> {
        let (mut e, mut w) = (Vec::new(), Vec::new());
        route(&gating, top_k, norm, logits, bias, &mut e, &mut w);
        let (re, rw) = reference_route(&gating, top_k, norm, logits, bias);
        assert_eq!(e, re, "experts for {logits:?}");
        for (a, b) in w.iter().zip(&rw) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "weights {w:?} vs {rw:?}");
        }
        e
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }

    #[test]
    fn softmax_routing_matches_reference() {
        let mut seed = 1;
        for norm in [false, true] {
            for _ in 0..200 {
                let logits: Vec<f32> = (0..16).map(|_| lcg(&mut seed)).collect();
                check(Gating::Softmax, 4, norm, &logits, None);
            }
        }
        // Normalized weights of the chosen experts sum to one.
        let (mut e, mut w) = (Vec::new(), Vec::new());
        route(&Gating::Softmax, 2, true, &[0.1, 3.0, -1.0, 2.0], None, &mut e, &mut w);
        assert_eq!(e, vec![1, 3]);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        assert_eq!(check(Gating::Softmax, 2, true, &[1.0, 2.0, 2.0, 2.0, 0.0], None), vec![1, 2]);
        let g = Gating::SigmoidGrouped { n_group: 1, topk_group: 1, routed_scaling_factor: 1.0 };
        assert_eq!(check(g, 3, true, &[0.5; 6], None), vec![0, 1, 2]);
        // Tied groups: the lower group wins.
        let g = Gating::SigmoidGrouped { n_group: 2, topk_group: 1, routed_scaling_factor: 1.0 };
        assert_eq!(check(g, 2, true, &[0.0, 1.0, 0.0, 1.0], None), vec![1, 0]);
    }

    #[test]
    fn grouped_routing_with_correction_bias_matches_reference() {
        let mut seed = 7;
        for (n_group, topk_group, top_k) in [(1, 1, 4), (2, 1, 2), (4, 2, 4), (8, 3, 6)] {
            let g = Gating::SigmoidGrouped { n_group, topk_group, routed_scaling_factor: 1.8 };
            for _ in 0..200 {
                let logits: Vec<f32> = (0..32).map(|_| lcg(&mut seed)).collect();
                let bias: Vec<f32> = (0..32).map(|_| 0.3 * lcg(&mut seed)).collect();
                let e = check(g, top_k, true, &logits, Some(&bias));
                // Every chosen expert lies in one of the topk_group kept groups.
                let mut groups: Vec<usize> = e.iter().map(|&i| i / (32 / n_group)).collect();
                groups.dedup();
                groups.sort();
                groups.dedup();
                assert!(groups.len() <= topk_group);
            }
        }
    }

    #[test]
    fn correction_bias_changes_the_choice_but_not_the_weights() {
        let g = Gating::SigmoidGrouped { n_group: 1, topk_group: 1, routed_scaling_factor: 2.0 };
        let logits = [2.0, 1.0, 0.0, -1.0];
        let bias = [0.0, 0.0, 0.0, 5.0];
        let (mut e, mut w) = (Vec::new(), Vec::new());
        route(&g, 2, false, &logits, Some(&bias), &mut e, &mut w);
        assert_eq!(e, vec![3, 0]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((w[0] - 2.0 * sig(-1.0)).abs() < 1e-6 && (w[1] - 2.0 * sig(2.0)).abs() < 1e-6);
        check(g, 2, true, &logits, Some(&bias));
    }

    #[test]
    fn synthetic_routing_draws_distinct_experts_with_the_stated_skew() {
        let counts = |zipf: f64| {
            let r = SyntheticRouting::new(64, zipf, 5);
            let mut n = vec![0usize; 64];
            for _ in 0..4000 {
                let d = r.draw(8);
                let mut u = d.clone();
                u.sort();
                u.dedup();
                assert_eq!(u.len(), 8, "distinct: {d:?}");
                d.iter().for_each(|&e| n[e] += 1);
            }
            r.expert_of_rank.iter().map(|&e| n[e]).collect::<Vec<usize>>()
        };
        // Uniform: every expert near 4000 * 8 / 64 = 500.
        assert!(counts(0.0).iter().all(|&c| (380..620).contains(&c)));
        // Zipf 1.2: the top-ranked expert is drawn far more often than the last.
        let z = counts(1.2);
        assert!(z[0] > 5 * z[63] && z[0] > z[8], "{z:?}");
    }

    /// A tiny mixture with f32 weights: the grouped forward of a batch equals running every
    /// token alone through its chosen experts, including an expert only one token uses.
    #[test]
    fn grouped_forward_equals_per_token_forward() {
        use crate::weights::{Storage, Tensor};
        use std::sync::Arc;
        let (h, inter, ne) = (8, 6, 5);
        let mut seed = 3;
        let mut mat = |rows: usize, cols: usize| {
            let v: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed) * 0.5).collect();
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Linear::new(
                Tensor {
                    dtype: pio_kernels::DType::F32,
                    shape: vec![rows, cols],
                    storage: Storage::Owned(Arc::new(bytes)),
                },
                None,
            )
        };
        let mut mlp = || Mlp { gate_proj: mat(inter, h), up_proj: mat(inter, h), down_proj: mat(h, inter) };
        let experts: Vec<Mlp> = (0..ne).map(|_| mlp()).collect();
        let shared_expert = Some(mlp());
        let moe = SparseMoe {
            router: mat(ne, h),
            correction_bias: Some(vec![0.1, -0.2, 0.0, 0.3, -0.1]),
            experts,
            shared_expert,
            shared_expert_gate: None,
            gating: Gating::SigmoidGrouped { n_group: 1, topk_group: 1, routed_scaling_factor: 1.5 },
            top_k: 2,
            norm_topk_prob: true,
            counters: Counters::default(),
            stream: None,
            synthetic_routing: None,
        };
        let x: Vec<f32> = (0..7 * h).map(|_| lcg(&mut seed)).collect();
        let batched = moe.forward(&x, None).unwrap();
        let mut uses = vec![0; ne];
        for t in 0..7 {
            let xt = &x[t * h..(t + 1) * h];
            let logits = moe.router.forward(xt);
            let (mut e, mut w) = (Vec::new(), Vec::new());
            route(&moe.gating, 2, true, &logits, moe.correction_bias.as_deref(), &mut e, &mut w);
            let mut want = moe.shared_expert.as_ref().map(|s| s.forward(xt)).unwrap_or_else(|| vec![0.0; h]);
            for (&ei, &wi) in e.iter().zip(&w) {
                uses[ei] += 1;
                for (o, y) in want.iter_mut().zip(moe.experts[ei].forward(xt)) {
                    *o += wi * y;
                }
            }
            for (a, b) in batched[t * h..(t + 1) * h].iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "token {t}: {a} vs {b}");
            }
        }
        assert!(uses.contains(&1), "some expert should serve exactly one token: {uses:?}");
        let stats = moe.stats();
        assert_eq!(stats.tokens, 7);
        assert_eq!(stats.expert_bytes_read, uses.iter().filter(|&&u| u > 0).count() as u64 * moe.expert_bytes());
    }
}
