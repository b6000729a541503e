//! Gated DeltaNet linear attention (Qwen3-Next): a per-sequence recurrent state instead of a
//! growing KV cache.
//!
//! ```text
//! qkv, z, ba = h Wqkvᵀ, h Wzᵀ, h Wbaᵀ             [T, 2·nk·dk + nv·dv], [T, nv·dv], [T, 2·nv]
//! qkv = silu(causal_conv1d(qkv))                  depthwise, K taps, from the conv state
//! q, k = l2norm(q), l2norm(k) per key head;  q /= sqrt(dk)
//! β = σ(b);  g = -exp(A_log) · softplus(a + dt_bias)           per value head
//! o = gated_delta_rule(q, k, v, g, β)             value head h reads key head h / (nv/nk)
//! o = rms_norm(o) · w · silu(z)                   per value head, plain weight
//! out = o Woutᵀ
//! ```
//!
//! `in_proj_qkvz` of a Hugging Face checkpoint groups its rows per key head (`q, k, v, z` of key
//! head 0, then of key head 1, ...); at load its rows are regrouped into `qkv` (all q, all k,
//! all v: the convolution's channel order) and `z`, as llama.cpp's converter stores them
//! (`attn_qkv`, `attn_gate`). `in_proj_ba` keeps its per-key-head grouping (`b` then `a` of
//! each key head: the value heads of key head `g` are `g·r .. g·r + r`), as both store it.

use std::sync::Mutex;

use pio_kernels::{delta, ops, parallel};

use crate::batch::ForwardBatch;
use crate::config::{LinearAttnConfig, ModelConfig};
use crate::layers::kv_cache::{KvCache, LayerStore};
use crate::layers::{Linear, RmsNorm};
use crate::weights::Checkpoint;
use crate::{Error, Result};

/// One Gated DeltaNet layer.
#[derive(Debug)]
pub struct GatedDeltaNet {
    layer: usize,
    cfg: LinearAttnConfig,
    /// `[2·nk·dk + nv·dv, hidden]`: rows of q (all key heads), k, v (all value heads).
    in_proj_qkv: Linear,
    /// `[nv·dv, hidden]`.
    in_proj_z: Linear,
    /// `[2·nv, hidden]`: per key head, `b` then `a` of its value heads.
    in_proj_ba: Linear,
    /// `[K, C]`: tap `j` of every channel.
    conv_weight: Vec<f32>,
    /// `[nv]`: `-exp(A_log)`.
    a: Vec<f32>,
    /// `[nv]`.
    dt_bias: Vec<f32>,
    /// `[dv]`, plain weight (not zero-centred).
    norm: RmsNorm,
    /// `[hidden, nv·dv]`.
    out_proj: Linear,
    eps: f32,
}

impl GatedDeltaNet {
    /// Takes `{p}.in_proj_qkvz` (or its split `in_proj_qkv` and `in_proj_z`), `in_proj_ba`,
    /// `conv1d.weight` (`[C, 1, K]` or `[C, K]`), `A_log` (or `ssm_a`, already `-exp(A_log)`),
    /// `dt_bias`, `norm.weight` and `out_proj` of layer `layer`.
    pub fn load(ckpt: &mut Checkpoint, p: &str, layer: usize, c: &ModelConfig) -> Result<GatedDeltaNet> {
        let la = c.linear_attn.clone().ok_or_else(|| Error::Config("no linear attention in this config".into()))?;
        let h = c.hidden_size;
        let (nk, nv, dk, dv) = (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim);
        let channels = la.conv_channels();
        let fused = format!("{p}.in_proj_qkvz.weight");
        let (in_proj_qkv, in_proj_z) = if ckpt.contains(&fused) {
            let w = ckpt.take(&fused, &[2 * nk * dk + 2 * nv * dv, h])?;
            let (qkv, z) = la.qkvz_split();
            (Linear::new(w.gather_outer(&qkv), None), Linear::new(w.gather_outer(&z), None))
        } else {
            (
                Linear::load(ckpt, &format!("{p}.in_proj_qkv"), h, channels, false)?,
                Linear::load(ckpt, &format!("{p}.in_proj_z"), h, nv * dv, false)?,
            )
        };
        let in_proj_ba = Linear::load(ckpt, &format!("{p}.in_proj_ba"), h, 2 * nv, false)?;
        let conv_name = format!("{p}.conv1d.weight");
        let k = la.conv_kernel;
        let conv = match ckpt.shape(&conv_name) {
            Some([_, 1, _]) => ckpt.take(&conv_name, &[channels, 1, k])?,
            _ => ckpt.take(&conv_name, &[channels, k])?,
        }
        .to_f32_vec();
        // [C, K] -> [K, C].
        let mut conv_weight = vec![0f32; k * channels];
        for ch in 0..channels {
            for j in 0..k {
                conv_weight[j * channels + ch] = conv[ch * k + j];
            }
        }
        let a_log = format!("{p}.A_log");
        let a = if ckpt.contains(&a_log) {
            ckpt.take(&a_log, &[nv])?.to_f32_vec().iter().map(|x| -x.exp()).collect()
        } else {
            ckpt.take(&format!("{p}.ssm_a"), &[nv])?.to_f32_vec()
        };
        Ok(GatedDeltaNet {
            layer,
            in_proj_qkv,
            in_proj_z,
            in_proj_ba,
            conv_weight,
            a,
            dt_bias: ckpt.take(&format!("{p}.dt_bias"), &[nv])?.to_f32_vec(),
            norm: RmsNorm::load(ckpt, &format!("{p}.norm.weight"), dv, c.rms_norm_eps)?,
            out_proj: Linear::load(ckpt, &format!("{p}.out_proj"), nv * dv, h, false)?,
            eps: c.rms_norm_eps,
            cfg: la,
        })
    }

    /// The layer's matrices, for reports and load-time changes.
    pub fn linears(&self) -> [&Linear; 4] {
        [&self.in_proj_qkv, &self.in_proj_z, &self.in_proj_ba, &self.out_proj]
    }

    pub fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.in_proj_qkv, &mut self.in_proj_z, &mut self.in_proj_ba, &mut self.out_proj]
    }

    /// `x`: `[T, hidden]` -> `[T, hidden]`, each sequence continuing from its state slot (from
    /// an empty state where its first token here is at position 0).
    pub fn forward(&self, x: &[f32], batch: &ForwardBatch, cache: &mut KvCache) -> Result<Vec<f32>> {
        let la = &self.cfg;
        let (nk, nv, dk, dv) = (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim);
        let r = la.value_heads_per_key_head();
        let channels = la.conv_channels();
        let n = batch.num_tokens();
        let runs = sequence_runs(batch, cache.num_state_slots)?;
        let [qkv, z, ba]: [Vec<f32>; 3] =
            Linear::forward_many(&[&self.in_proj_qkv, &self.in_proj_z, &self.in_proj_ba], x)
                .try_into()
                .unwrap_or_else(|_| unreachable!("three projections in, three out"));
        let LayerStore::State { conv: conv_state, delta: delta_state } = cache.layer_mut(self.layer) else {
            return Err(Error::Batch(format!("layer {} has no recurrent state in this cache", self.layer)));
        };
        let (conv_len, delta_len) = ((la.conv_kernel - 1) * channels, nv * dk * dv);
        // The convolution, sequence by sequence, from each one's state (a snapshot of it taken
        // where asked).
        let mut mixed = vec![0f32; n * channels];
        for run in &runs {
            let slot = run.slot;
            if run.fresh {
                conv_state[slot * conv_len..(slot + 1) * conv_len].fill(0.0);
                delta_state[slot * delta_len..(slot + 1) * delta_len].fill(0.0);
            }
            let split = run.snapshot.map_or(run.len, |(at, _)| at);
            for (a, b) in [(0, split), (split, run.len)] {
                if a < b {
                    let rows = (run.start + a) * channels..(run.start + b) * channels;
                    let state = &mut conv_state[slot * conv_len..(slot + 1) * conv_len];
                    delta::causal_conv1d_silu(
                        &self.conv_weight,
                        la.conv_kernel,
                        state,
                        &qkv[rows.clone()],
                        &mut mixed[rows],
                    );
                }
                if let (Some((_, to)), true) = (run.snapshot, b == split) {
                    conv_state.copy_within(slot * conv_len..(slot + 1) * conv_len, to * conv_len);
                }
            }
        }
        // q, k: L2-normalized per key head, q scaled; β and the decay per value head.
        let (qk_width, scale) = (nk * dk, 1.0 / (dk as f32).sqrt());
        let mut q = Vec::with_capacity(n * qk_width);
        let mut k = Vec::with_capacity(n * qk_width);
        for row in mixed.chunks_exact(channels) {
            q.extend_from_slice(&row[..qk_width]);
            k.extend_from_slice(&row[qk_width..2 * qk_width]);
        }
        delta::l2_normalize_rows(&mut q, dk, 1e-6);
        delta::l2_normalize_rows(&mut k, dk, 1e-6);
        q.iter_mut().for_each(|v| *v *= scale);
        let (mut beta, mut decay) = (vec![0f32; n * nv], vec![0f32; n * nv]);
        for t in 0..n {
            let row = &ba[t * 2 * nv..(t + 1) * 2 * nv];
            for g in 0..nk {
                for j in 0..r {
                    let head = g * r + j;
                    let (b, a) = (row[g * 2 * r + j], row[g * 2 * r + r + j]);
                    beta[t * nv + head] = ops::sigmoid(b);
                    decay[t * nv + head] = (self.a[head] * softplus(a + self.dt_bias[head])).exp();
                }
            }
        }
        // The delta rule: one task per (sequence, value head), each on its own state.
        let mut slots: Vec<Option<&mut [f32]>> = delta_state.chunks_exact_mut(delta_len).map(Some).collect();
        let mut take = |slot: usize| slots[slot].take().ok_or_else(|| Error::Batch(format!("state slot {slot} twice")));
        let mut tasks = Vec::with_capacity(runs.len() * nv);
        for run in &runs {
            let state = take(run.slot)?;
            let mut snap: Vec<Option<&mut [f32]>> = match run.snapshot {
                Some((_, to)) => take(to)?.chunks_exact_mut(dk * dv).map(Some).collect(),
                None => (0..nv).map(|_| None).collect(),
            };
            for (head, s) in state.chunks_exact_mut(dk * dv).enumerate() {
                tasks.push((run, head, Mutex::new((s, snap[head].take()))));
            }
        }
        let per_task = |i: usize| -> Vec<f32> {
            let (run, head, state) = &tasks[i];
            let (kh, t0, len) = (head / r, run.start, run.len);
            let gather = |src: &[f32], width: usize, off: usize, d: usize| -> Vec<f32> {
                (t0..t0 + len).flat_map(|t| &src[t * width + off..t * width + off + d]).copied().collect()
            };
            let (qh, kh_) = (gather(&q, qk_width, kh * dk, dk), gather(&k, qk_width, kh * dk, dk));
            let vh = gather(&mixed, channels, 2 * qk_width + head * dv, dv);
            let dh: Vec<f32> = (t0..t0 + len).map(|t| decay[t * nv + head]).collect();
            let bh: Vec<f32> = (t0..t0 + len).map(|t| beta[t * nv + head]).collect();
            let mut out = vec![0f32; len * dv];
            let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
            let (s, snap) = &mut *guard;
            // Token by token, so splitting the run at the snapshot changes no bits.
            let split = run.snapshot.map_or(len, |(at, _)| at);
            for (a, b) in [(0, split), (split, len)] {
                if a < b {
                    delta::gated_delta_rule(
                        s,
                        &qh[a * dk..b * dk],
                        &kh_[a * dk..b * dk],
                        &vh[a * dv..b * dv],
                        &dh[a..b],
                        &bh[a..b],
                        &mut out[a * dv..b * dv],
                    );
                }
                if let (Some(to), true) = (snap.as_deref_mut(), b == split) {
                    to.copy_from_slice(s);
                }
            }
            out
        };
        let work = n * nv * dk * dv * 4;
        let outs: Vec<Vec<f32>> =
            parallel::for_each_range(tasks.len(), work, |a, b| (a..b).map(per_task).collect::<Vec<_>>())
                .into_iter()
                .flatten()
                .collect();
        // Gated norm per value head, then the output projection.
        let mut o = vec![0f32; n * nv * dv];
        for ((run, head, _), out) in tasks.iter().zip(&outs) {
            for (i, row) in out.chunks_exact(dv).enumerate() {
                let t = run.start + i;
                o[(t * nv + head) * dv..(t * nv + head + 1) * dv].copy_from_slice(row);
            }
        }
        ops::rms_norm_rows(&mut o, &self.norm.weight, self.eps);
        let mut gate = z;
        ops::silu_in_place(&mut gate);
        o.iter_mut().zip(&gate).for_each(|(o, g)| *o *= g);
        Ok(self.out_proj.forward(&o))
    }
}

/// `log(1 + e^x)`, linear above 20 as PyTorch's `softplus`.
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// The tokens of one sequence in a batch: `len` rows from `start`, its state slot, whether it
/// starts from an empty state (its first token here is at position 0), and a snapshot to take
/// after its first `at` tokens into slot `to` (`(at, to)`, `1 <= at <= len`).
#[derive(Debug)]
struct Run {
    start: usize,
    len: usize,
    slot: usize,
    fresh: bool,
    snapshot: Option<(usize, usize)>,
}

/// Each sequence's tokens as one contiguous run of consecutive positions (what the recurrence
/// needs; the engine batches sequences so), with its state slot and snapshot, all checked
/// against the cache's `num_slots` slots.
fn sequence_runs(batch: &ForwardBatch, num_slots: usize) -> Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    let mut seen = vec![false; batch.block_tables.len().max(batch.state_slots.len())];
    for t in 0..batch.num_tokens() {
        let seq = batch.seq_indices[t];
        if let Some(last) = runs.last_mut() {
            if batch.seq_indices[last.start] == seq {
                if batch.positions[t] != batch.positions[t - 1] + 1 {
                    return Err(Error::Batch(format!("token {t}: a recurrent layer needs consecutive positions")));
                }
                last.len += 1;
                continue;
            }
        }
        if seen.get(seq).copied().unwrap_or(true) {
            return Err(Error::Batch(format!("sequence {seq}'s tokens are not one run, or it has no state slot")));
        }
        seen[seq] = true;
        let slot = *batch.state_slots.get(seq).ok_or_else(|| {
            Error::Batch(format!("sequence {seq} has no state slot (the model keeps recurrent state)"))
        })? as usize;
        if slot >= num_slots {
            return Err(Error::Batch(format!("state slot {slot} is outside the cache ({num_slots} slots)")));
        }
        runs.push(Run { start: t, len: 1, slot, fresh: batch.positions[t] == 0, snapshot: None });
    }
    for snap in &batch.state_snapshots {
        let run = runs
            .iter_mut()
            .find(|r| batch.seq_indices[r.start] == snap.seq)
            .ok_or_else(|| Error::Batch(format!("a snapshot of sequence {} that is not in the batch", snap.seq)))?;
        let first = batch.positions[run.start];
        let to = snap.slot as usize;
        if snap.position <= first || snap.position > first + run.len || to >= num_slots || to == run.slot {
            return Err(Error::Batch(format!(
                "snapshot at position {} into slot {to}: sequence {} runs positions {first}..{} in slot {} of {num_slots}",
                snap.position,
                snap.seq,
                first + run.len,
                run.slot
            )));
        }
        if run.snapshot.replace((snap.position - first, to)).is_some() {
            return Err(Error::Batch(format!("two snapshots of sequence {}", snap.seq)));
        }
    }
    // Every slot written belongs to one sequence or one snapshot.
    let mut used = vec![false; num_slots];
    for slot in runs.iter().flat_map(|r| std::iter::once(r.slot).chain(r.snapshot.map(|(_, to)| to))) {
        if std::mem::replace(&mut used[slot], true) {
            return Err(Error::Batch(format!("state slot {slot} is used twice in one batch")));
        }
    }
    Ok(runs)
}
