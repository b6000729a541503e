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
//! memory-mapped weights, never even paged in).

use std::sync::atomic::{AtomicU64, Ordering};

use pio_kernels::{ops, parallel};

use crate::config::{Gating, MoeConfig};
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
        })
    }

    /// `x`: `[n, hidden]` -> `[n, hidden]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let h = self.router.in_features();
        let n = x.len() / h;
        let logits = self.router.forward(x);
        let num_experts = self.experts.len();
        // Per expert: (token, weight) of every token routed to it.
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); num_experts];
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
        // Gather each chosen expert's tokens; the shared expert takes them all.
        let active: Vec<(&Mlp, &Vec<(usize, f32)>)> =
            self.experts.iter().zip(&routed).filter(|(_, tokens)| !tokens.is_empty()).collect();
        let runs = active.len() as u64;
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
        let mut mlps: Vec<&Mlp> = active.iter().map(|(m, _)| *m).collect();
        let mut inputs: Vec<(&[f32], usize)> =
            gathered.iter().zip(&active).map(|(g, (_, tokens))| (g.as_slice(), tokens.len())).collect();
        if let Some(shared) = &self.shared_expert {
            mlps.push(shared);
            inputs.push((x, n));
        }
        // Every expert's gate and up in one parallel pass, then every down projection in another.
        let gate_up: Vec<&Linear> = mlps.iter().flat_map(|m| [&m.gate_proj, &m.up_proj]).collect();
        let pair_input: Vec<usize> = (0..gate_up.len()).map(|i| i / 2).collect();
        let mut ys = Linear::forward_each(&gate_up, &pair_input, &inputs).into_iter();
        let mut acts = Vec::with_capacity(mlps.len());
        while let (Some(mut gate), Some(up)) = (ys.next(), ys.next()) {
            ops::swiglu(&mut gate, &up);
            acts.push(gate);
        }
        let act_inputs: Vec<(&[f32], usize)> = acts.iter().zip(&inputs).map(|(a, &(_, n))| (a.as_slice(), n)).collect();
        let downs: Vec<&Linear> = mlps.iter().map(|m| &m.down_proj).collect();
        let own_input: Vec<usize> = (0..downs.len()).collect();
        let down = Linear::forward_each(&downs, &own_input, &act_inputs);

        // Each token's weighted expert rows, summed in expert order (as the experts ran), tokens
        // split across the cores.
        let mut from: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); n];
        for (e, (_, tokens)) in active.iter().enumerate() {
            for (i, &(t, w)) in tokens.iter().enumerate() {
                from[t].push((e, i, w));
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
        if self.shared_expert.is_some() {
            if let Some(shared_out) = down.last() {
                match &self.shared_expert_gate {
                    None => ops::add_in_place(&mut out, shared_out),
                    Some(w) => {
                        for ((o, s), xt) in
                            out.chunks_exact_mut(h).zip(shared_out.chunks_exact(h)).zip(x.chunks_exact(h))
                        {
                            let g = ops::sigmoid(ops::dot(xt, w));
                            ops::axpy(g, s, o);
                        }
                    }
                }
            }
        }
        self.counters.forwards.fetch_add(1, Ordering::Relaxed);
        self.counters.tokens.fetch_add(n as u64, Ordering::Relaxed);
        self.counters.expert_runs.fetch_add(runs, Ordering::Relaxed);
        out
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
        };
        let x: Vec<f32> = (0..7 * h).map(|_| lcg(&mut seed)).collect();
        let batched = moe.forward(&x);
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
