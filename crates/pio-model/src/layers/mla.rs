//! Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash), with the up-projections
//! absorbed so the cache holds only the compressed latent and is never re-expanded.
//!
//! ```text
//! q      = q_b(rms_norm(q_a(x)))  (or q_proj(x))     [T, H, nope + rope]
//! kv     = kv_a_proj_with_mqa(x)                     [T, kv_lora + rope]
//! c      = rms_norm(kv[:kv_lora])                    [T, kv_lora]   the latent
//! k_pe   = rope(kv[kv_lora:])                        [T, rope]      shared by all heads
//! cache row = [c, k_pe]                              kv_lora + rope values per token and layer
//!
//! kv_b_proj holds per head W_UK [nope, kv_lora] and W_UV [v, kv_lora]:
//!   k_nope[h] = W_UK[h] c, value[h] = W_UV[h] c
//! score(h, p) = q_nope[h]·W_UK[h] c_p + rope(q_pe[h])·k_pe_p
//!             = [W_UK[h]ᵀ q_nope[h], rope(q_pe[h])] · [c_p, k_pe_p]       (absorbed query)
//! out[h] = W_UV[h] Σ_p softmax(scale·score)_p c_p                        (absorbed output)
//! o = o_proj(out)                                    [T, H·v] -> [T, hidden]
//! ```
//!
//! The rope part rotates adjacent pairs (the DeepSeek/GLM "interleaved" layout). `scale` is
//! `1/sqrt(nope + rope)`. Prefill and decode both take this path.

use pio_kernels::attention::QueryContext;
use pio_kernels::mla::{latent_attention, CodedLatentKvMut, LatentKvMut};
use pio_kernels::ops::{self, RopeLayout};
use pio_kernels::{quant, DType};

use crate::batch::ForwardBatch;
use crate::config::{MlaConfig, ModelConfig};
use crate::layers::kv_cache::LayerStore;
use crate::layers::{KvCache, Linear, RmsNorm};
use crate::weights::{Checkpoint, Storage, Tensor};
use crate::Result;

#[derive(Debug)]
pub struct LatentAttention {
    layer: usize,
    num_heads: usize,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    /// `[q_lora, hidden]` and its norm, with query compression.
    q_a: Option<(Linear, RmsNorm)>,
    /// `[H·(nope+rope), q_lora]` (or `[H·(nope+rope), hidden]` without compression).
    q_b_proj: Linear,
    /// `[kv_lora + rope, hidden]`.
    kv_a_proj: Linear,
    /// `[kv_lora]`.
    kv_a_layernorm: RmsNorm,
    /// Per head `W_UK[h]ᵀ`: `[kv_lora, nope]`.
    k_up_t: Vec<Linear>,
    /// Per head `W_UV[h]`: `[v, kv_lora]`.
    v_up: Vec<Linear>,
    /// `[hidden, H·v]`.
    o_proj: Linear,
    scale: f32,
    rope_layout: RopeLayout,
    /// `[rope / 2]`.
    inv_freq: Vec<f32>,
}

impl LatentAttention {
    /// Takes `{p}.q_a_proj`, `{p}.q_a_layernorm`, `{p}.q_b_proj` (or `{p}.q_proj`),
    /// `{p}.kv_a_proj_with_mqa`, `{p}.kv_a_layernorm`, `{p}.o_proj` and the up-projections:
    /// `{p}.kv_b_proj` (Hugging Face), or the per-head split `{p}.k_b_proj` `[H·kv_lora, nope]`
    /// and `{p}.v_b_proj` `[H·v, kv_lora]` (llama.cpp's `attn_k_b` / `attn_v_b`).
    pub fn load(ckpt: &mut Checkpoint, p: &str, layer: usize, c: &ModelConfig, m: &MlaConfig) -> Result<Self> {
        let (h, nh) = (c.hidden_size, c.num_heads);
        let (nope, rope, v, r) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank);
        // transformers' DeepSeek-V3 attention: `attention_bias` puts biases on q_a_proj,
        // kv_a_proj_with_mqa and o_proj only.
        let linear = |ck: &mut Checkpoint, name: &str, i, o, bias| Linear::load(ck, &format!("{p}.{name}"), i, o, bias);
        let (q_a, q_b_proj) = match m.q_lora_rank {
            Some(ql) => {
                let a = linear(ckpt, "q_a_proj", h, ql, c.qkv_bias)?;
                let norm = RmsNorm::load(ckpt, &format!("{p}.q_a_layernorm.weight"), ql, m.latent_norm_eps)?;
                (Some((a, norm)), linear(ckpt, "q_b_proj", ql, nh * m.qk_head_dim(), false)?)
            }
            None => (None, linear(ckpt, "q_proj", h, nh * m.qk_head_dim(), false)?),
        };
        let kv_a_proj = linear(ckpt, "kv_a_proj_with_mqa", h, r + rope, c.qkv_bias)?;
        let kv_a_layernorm = RmsNorm::load(ckpt, &format!("{p}.kv_a_layernorm.weight"), r, m.latent_norm_eps)?;
        let (k_up_t, v_up) = if ckpt.contains(&format!("{p}.kv_b_proj.weight")) {
            let kv_b = ckpt.take(&format!("{p}.kv_b_proj.weight"), &[nh * (nope + v), r])?;
            let per = nope + v;
            let k_up_t = (0..nh).map(|hh| transposed(&kv_b.slice_outer(hh * per, nope))).collect();
            let v_up = (0..nh).map(|hh| Linear::new(kv_b.slice_outer(hh * per + nope, v), None)).collect();
            (k_up_t, v_up)
        } else {
            let k_b = ckpt.take(&format!("{p}.k_b_proj.weight"), &[nh * r, nope])?;
            let v_b = ckpt.take(&format!("{p}.v_b_proj.weight"), &[nh * v, r])?;
            let k_up_t = (0..nh).map(|hh| Linear::new(k_b.slice_outer(hh * r, r), None)).collect();
            let v_up = (0..nh).map(|hh| Linear::new(v_b.slice_outer(hh * v, v), None)).collect();
            (k_up_t, v_up)
        };
        let o_proj = linear(ckpt, "o_proj", nh * v, h, c.o_bias)?;
        Ok(LatentAttention {
            layer,
            num_heads: nh,
            kv_lora_rank: r,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: v,
            q_a,
            q_b_proj,
            kv_a_proj,
            kv_a_layernorm,
            k_up_t,
            v_up,
            o_proj,
            scale: 1.0 / (m.qk_head_dim() as f32).sqrt(),
            rope_layout: c.rope_layout,
            inv_freq: ops::rope_inv_freq(c.rope_theta, rope),
        })
    }

    /// Every matrix, for weight reports and the decode roofline.
    /// Every matrix, to rearrange at load.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut all: Vec<&mut Linear> = Vec::new();
        if let Some((a, _)) = &mut self.q_a {
            all.push(a);
        }
        all.extend([&mut self.q_b_proj, &mut self.kv_a_proj]);
        all.extend(self.k_up_t.iter_mut());
        all.extend(self.v_up.iter_mut());
        all.push(&mut self.o_proj);
        all
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut all: Vec<&Linear> = Vec::new();
        if let Some((a, _)) = &self.q_a {
            all.push(a);
        }
        all.extend([&self.q_b_proj, &self.kv_a_proj]);
        all.extend(self.k_up_t.iter());
        all.extend(self.v_up.iter());
        all.push(&self.o_proj);
        all
    }

    /// `x`: `[T, hidden]` -> `[T, hidden]`, writing each token's latent row into the cache.
    /// Re-rotates the rotary part of this layer's cached rows in `blocks` from position `p` to
    /// `p - delta` (the latent part has no position).
    pub fn shift_keys(&self, cache: &mut KvCache, blocks: &[u32], delta: usize) {
        let (r, rope) = (self.kv_lora_rank, self.qk_rope_head_dim);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        ops::rope_angles(delta, &self.inv_freq, &mut cos, &mut sin);
        sin.iter_mut().for_each(|s| *s = -*s);
        let layout = self.rope_layout;
        let block_size = cache.block_size;
        let width = r + rope;
        let mut shift = |row: &mut [f32]| ops::rope_heads_with(&mut row[r..], rope, &cos, &sin, layout);
        let dtype = cache.types().k;
        match cache.layer_mut(self.layer) {
            LayerStore::Coded { k: data, anchors, .. } => {
                // Stored Hadamard-rotated in blocks (see `forward`): undo, shift, redo.
                let rotate = dtype.is_quantized();
                let block = ops::hadamard_block(r).min(ops::hadamard_block(rope));
                let mut kv = CodedLatentKvMut { data, anchors, dtype, block_size, width };
                kv.map_rows(blocks, &mut |row| {
                    if rotate {
                        ops::hadamard_blocks(row, block);
                    }
                    shift(row);
                    if rotate {
                        ops::hadamard_blocks(row, block);
                    }
                });
            }
            LayerStore::F32 { k: data, .. } => LatentKvMut { data, block_size, width }.map_rows(blocks, &mut shift),
            LayerStore::F16 { k: data, .. } => LatentKvMut { data, block_size, width }.map_rows(blocks, &mut shift),
            // The model checks that the cache was made from its spec: an attention layer
            // never holds a recurrent state.
            LayerStore::State { .. } => unreachable!("layer {} holds a recurrent state", self.layer),
        }
    }

    pub fn forward(&self, x: &[f32], batch: &ForwardBatch, cache: &mut KvCache) -> Vec<f32> {
        let n = batch.num_tokens();
        let (nh, r, nope, rope, v) =
            (self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim);
        let (qk, width) = (nope + rope, r + rope);
        let (q, kv) = match &self.q_a {
            Some((q_a, norm)) => {
                let [mut qa, kv]: [Vec<f32>; 2] = Linear::forward_many(&[q_a, &self.kv_a_proj], x)
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("two projections in, two out"));
                norm.forward_in_place(&mut qa);
                (self.q_b_proj.forward(&qa), kv)
            }
            None => {
                let [q, kv]: [Vec<f32>; 2] = Linear::forward_many(&[&self.q_b_proj, &self.kv_a_proj], x)
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("two projections in, two out"));
                (q, kv)
            }
        };

        // Cache rows [c, rope(k_pe)] and query rows [W_UKᵀ q_nope, rope(q_pe)] per head.
        let mut rows = kv;
        let mut queries = vec![0f32; n * nh * width];
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for (t, &pos) in batch.positions.iter().enumerate() {
            let row = &mut rows[t * width..(t + 1) * width];
            self.kv_a_layernorm.forward_in_place(&mut row[..r]);
            ops::rope_angles(pos, &self.inv_freq, &mut cos, &mut sin);
            ops::rope_heads_with(&mut row[r..], rope, &cos, &sin, self.rope_layout);
            for hh in 0..nh {
                let src = &q[(t * nh + hh) * qk + nope..(t * nh + hh + 1) * qk];
                let dst = &mut queries[(t * nh + hh) * width + r..(t * nh + hh + 1) * width];
                dst.copy_from_slice(src);
                ops::rope_heads_with(dst, rope, &cos, &sin, self.rope_layout);
            }
        }
        // Absorbed queries: every head's W_UK[h]ᵀ on its q_nope, in one parallel pass.
        let q_nope: Vec<Vec<f32>> = (0..nh)
            .map(|hh| (0..n).flat_map(|t| &q[(t * nh + hh) * qk..(t * nh + hh) * qk + nope]).copied().collect())
            .collect();
        let absorbed = per_head(&self.k_up_t, &q_nope, n);
        for (hh, a) in absorbed.iter().enumerate() {
            for t in 0..n {
                queries[(t * nh + hh) * width..(t * nh + hh) * width + r].copy_from_slice(&a[t * r..(t + 1) * r]);
            }
        }

        // Attention over the latent cache: [T, H, kv_lora].
        let contexts: Vec<QueryContext> = batch
            .positions
            .iter()
            .zip(&batch.seq_indices)
            .map(|(&pos, &s)| QueryContext::causal(&batch.block_tables[s], pos + 1))
            .collect();
        let mut latent_out = vec![0f32; n * nh * r];
        let block_size = cache.block_size;
        let dtype = cache.types().k;
        match cache.layer_mut(self.layer) {
            LayerStore::Coded { k: data, anchors, .. } => {
                // As the block-format keys of standard attention: rows and queries rotated alike
                // (the scores do not change), the latent part of the output rotated back. The
                // Hadamard blocks divide both the latent and the rotary part.
                let rotate = dtype.is_quantized();
                let block = ops::hadamard_block(r).min(ops::hadamard_block(width - r));
                if rotate {
                    ops::hadamard_blocks(&mut rows, block);
                    ops::hadamard_blocks(&mut queries, block);
                }
                let mut kv = CodedLatentKvMut { data, anchors, dtype, block_size, width };
                kv.write(&batch.slot_mapping, &rows);
                latent_attention(&queries, nh, kv.view(), &contexts, r, self.scale, &mut latent_out);
                if rotate {
                    ops::hadamard_blocks(&mut latent_out, block);
                }
            }
            LayerStore::F32 { k: data, .. } => {
                let mut kv = LatentKvMut { data, block_size, width };
                kv.write(&batch.slot_mapping, &rows);
                latent_attention(&queries, nh, kv.view(), &contexts, r, self.scale, &mut latent_out);
            }
            LayerStore::F16 { k: data, .. } => {
                let mut kv = LatentKvMut { data, block_size, width };
                kv.write(&batch.slot_mapping, &rows);
                latent_attention(&queries, nh, kv.view(), &contexts, r, self.scale, &mut latent_out);
            }
            // The model checks that the cache was made from its spec: an attention layer
            // never holds a recurrent state.
            LayerStore::State { .. } => unreachable!("layer {} holds a recurrent state", self.layer),
        }

        // Per head W_UV (one parallel pass), then the output projection.
        let latents: Vec<Vec<f32>> = (0..nh)
            .map(|hh| (0..n).flat_map(|t| &latent_out[(t * nh + hh) * r..(t * nh + hh + 1) * r]).copied().collect())
            .collect();
        let values = per_head(&self.v_up, &latents, n);
        let mut o = vec![0f32; n * nh * v];
        for (hh, vals) in values.iter().enumerate() {
            for t in 0..n {
                o[(t * nh + hh) * v..(t * nh + hh + 1) * v].copy_from_slice(&vals[t * v..(t + 1) * v]);
            }
        }
        self.o_proj.forward(&o)
    }
}

/// Head `h`'s matrix applied to head `h`'s `[n, cols]` input, all heads in one threaded pass.
fn per_head(linears: &[Linear], inputs: &[Vec<f32>], n: usize) -> Vec<Vec<f32>> {
    let layers: Vec<&Linear> = linears.iter().collect();
    let input_of: Vec<usize> = (0..layers.len()).collect();
    let inputs: Vec<(&[f32], usize)> = inputs.iter().map(|x| (x.as_slice(), n)).collect();
    Linear::forward_each(&layers, &input_of, &inputs)
}

/// `[rows, cols]` matrix `t` transposed to `[cols, rows]`: F32 stays F32 and BF16 stays BF16
/// (exact); any other format becomes F16 (these matrices are small: kv_lora × nope per head).
fn transposed(t: &Tensor) -> Linear {
    let m = t.matrix();
    let (rows, cols) = (m.rows, m.cols);
    let mut vals = vec![0f32; rows * cols];
    for (r, row) in vals.chunks_exact_mut(cols).enumerate() {
        m.dequantize_row(r, row);
    }
    let mut tr = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            tr[c * rows + r] = vals[r * cols + c];
        }
    }
    let dtype = match t.dtype {
        DType::F32 => DType::F32,
        DType::BF16 => DType::BF16,
        _ => DType::F16,
    };
    let mut bytes = vec![0u8; rows * cols * dtype.block_bytes()];
    quant::quantize_row(dtype, &tr, &mut bytes);
    Linear::new(Tensor { dtype, shape: vec![cols, rows], storage: Storage::Owned(std::sync::Arc::new(bytes)) }, None)
}
