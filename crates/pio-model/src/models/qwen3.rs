//! The dense decoder family: Qwen3, Qwen2(.5) and Llama (SmolLM2) differ only by config.
//!
//! ```text
//! x = embed_tokens[ids]                                   [T, hidden]
//! for each layer:
//!     h = rms_norm(x)
//!     q, k, v = h Wqᵀ (+bq), h Wkᵀ (+bk), h Wvᵀ (+bv)      [T, heads*hd], [T, kv*hd] ×2
//!     q, k = rms_norm_per_head(q), rms_norm_per_head(k)   (Qwen3 only)
//!     o = attention(rope(q), rope(k), v)                  [T, heads*hd]   (paged cache)
//!     x = x + o Woᵀ
//!     h = rms_norm(x)
//!     x = x + (silu(h Wgᵀ) * (h Wuᵀ)) Wdᵀ                 [T, inter] -> [T, hidden]
//! logits = rms_norm(x)[rows] Wheadᵀ                       [R, vocab]
//! ```

use pio_kernels::ops;

use super::{CausalLm, ModelShape};
use crate::batch::ForwardBatch;
use crate::config::DenseConfig;
use crate::layers::{Attention, KvCache, Linear, RmsNorm};
use crate::weights::{Checkpoint, Tensor};
use crate::{Error, Result};

/// A dense Qwen3 / Qwen2 / Llama model.
#[derive(Debug)]
pub struct DenseModel {
    pub config: DenseConfig,
    /// `[vocab, hidden]`.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; shares `embed_tokens`' storage when tied.
    lm_head: Linear,
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

#[derive(Debug)]
struct SelfAttention {
    /// `[heads*hd, hidden]`, `[kv*hd, hidden]`, `[kv*hd, hidden]`, `[hidden, heads*hd]`.
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// `[hd]` each, Qwen3 only.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    attn: Attention,
}

#[derive(Debug)]
struct Mlp {
    /// `[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`.
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DenseModel {
    /// Builds the model from `ckpt`, taking every tensor the config implies; leftovers are an
    /// error.
    pub fn load(
        config: DenseConfig,
        mut ckpt: Checkpoint,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<DenseModel> {
        let c = &config;
        let (h, q, kv) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let embed_tokens = ckpt.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let inv_freq = ops::rope_inv_freq(c.rope_theta, c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            progress(i, c.num_layers);
            let p = format!("model.layers.{i}");
            let norm = |ck: &mut Checkpoint, name: &str, dim| {
                RmsNorm::load(ck, &format!("{p}.{name}.weight"), dim, c.rms_norm_eps)
            };
            let linear = |ck: &mut Checkpoint, name: &str, i, o, b| Linear::load(ck, &format!("{p}.{name}"), i, o, b);
            let self_attn = SelfAttention {
                q_proj: linear(&mut ckpt, "self_attn.q_proj", h, q, c.qkv_bias)?,
                k_proj: linear(&mut ckpt, "self_attn.k_proj", h, kv, c.qkv_bias)?,
                v_proj: linear(&mut ckpt, "self_attn.v_proj", h, kv, c.qkv_bias)?,
                o_proj: linear(&mut ckpt, "self_attn.o_proj", q, h, c.o_bias)?,
                q_norm: c.qk_norm.then(|| norm(&mut ckpt, "self_attn.q_norm", c.head_dim)).transpose()?,
                k_norm: c.qk_norm.then(|| norm(&mut ckpt, "self_attn.k_norm", c.head_dim)).transpose()?,
                attn: Attention {
                    layer: i,
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                    scale: 1.0 / (c.head_dim as f32).sqrt(),
                    rope_layout: c.rope_layout,
                    inv_freq: inv_freq.clone(),
                },
            };
            layers.push(DecoderLayer {
                input_layernorm: norm(&mut ckpt, "input_layernorm", h)?,
                self_attn,
                post_attention_layernorm: norm(&mut ckpt, "post_attention_layernorm", h)?,
                mlp: Mlp {
                    gate_proj: linear(&mut ckpt, "mlp.gate_proj", h, c.intermediate_size, c.mlp_bias)?,
                    up_proj: linear(&mut ckpt, "mlp.up_proj", h, c.intermediate_size, c.mlp_bias)?,
                    down_proj: linear(&mut ckpt, "mlp.down_proj", c.intermediate_size, h, c.mlp_bias)?,
                },
            });
        }
        let norm = RmsNorm::load(&mut ckpt, "model.norm.weight", h, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints also save the head; the embedding is what is used.
            ckpt.discard("lm_head.weight");
            Linear { weight: embed_tokens.clone(), bias: None }
        } else {
            Linear::load(&mut ckpt, "lm_head", h, c.vocab_size, false)?
        };
        ckpt.finish()?;
        progress(c.num_layers, c.num_layers);
        Ok(DenseModel { config, embed_tokens, layers, norm, lm_head })
    }

    /// Every weight tensor with its name, for reports.
    pub fn weight_dtypes(&self) -> Vec<(pio_kernels::DType, usize)> {
        let mut all = vec![(self.embed_tokens.dtype, self.embed_tokens.bytes().len())];
        for l in &self.layers {
            let a = &l.self_attn;
            for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]
            {
                all.push((lin.dtype(), lin.weight.bytes().len()));
            }
        }
        if !self.config.tie_word_embeddings {
            all.push((self.lm_head.dtype(), self.lm_head.weight.bytes().len()));
        }
        all
    }

    /// Weight bytes one decode step reads: every layer matrix and the LM head (the embedding
    /// contributes one row, ignored).
    pub fn decode_bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flat_map(|l| {
                let a = &l.self_attn;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]
            })
            .map(|lin| lin.weight.bytes().len())
            .sum();
        layers + self.lm_head.weight.bytes().len()
    }
}

impl SelfAttention {
    fn forward(&self, x: &[f32], batch: &ForwardBatch, cache: &mut KvCache) -> Vec<f32> {
        let [mut q, mut k, v]: [Vec<f32>; 3] = Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)
            .try_into()
            .unwrap_or_else(|_| unreachable!("three projections in, three out"));
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            // Per-head norm: rows of head_dim.
            qn.forward_in_place(&mut q);
            kn.forward_in_place(&mut k);
        }
        let o = self.attn.forward(&mut q, &mut k, &v, batch, cache);
        self.o_proj.forward(&o)
    }
}

impl Mlp {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let [mut gate, up]: [Vec<f32>; 2] = Linear::forward_many(&[&self.gate_proj, &self.up_proj], x)
            .try_into()
            .unwrap_or_else(|_| unreachable!("two projections in, two out"));
        ops::swiglu(&mut gate, &up);
        self.down_proj.forward(&gate)
    }
}

impl CausalLm for DenseModel {
    fn shape(&self) -> ModelShape {
        let c = &self.config;
        ModelShape {
            vocab_size: c.vocab_size,
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            max_position_embeddings: c.max_position_embeddings,
        }
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        batch.validate(cache.block_size, cache.num_blocks)?;
        if cache.num_kv_heads != c.num_kv_heads || cache.head_dim != c.head_dim {
            return Err(Error::Batch("KV cache was made for another model shape".into()));
        }
        let h = c.hidden_size;
        let embed = self.embed_tokens.matrix();
        let mut x = vec![0f32; batch.num_tokens() * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(&batch.token_ids) {
            if id as usize >= c.vocab_size {
                return Err(Error::Batch(format!("token id {id} is outside the vocabulary ({})", c.vocab_size)));
            }
            embed.dequantize_row(id as usize, row);
        }
        for layer in &self.layers {
            let hn = layer.input_layernorm.forward(&x);
            let attn = layer.self_attn.forward(&hn, batch, cache);
            ops::add_in_place(&mut x, &attn);
            let hn = layer.post_attention_layernorm.forward(&x);
            let mlp = layer.mlp.forward(&hn);
            ops::add_in_place(&mut x, &mlp);
        }
        let mut rows = Vec::with_capacity(batch.logits_indices.len() * h);
        for &i in &batch.logits_indices {
            rows.extend_from_slice(&x[i * h..(i + 1) * h]);
        }
        self.norm.forward_in_place(&mut rows);
        Ok(self.lm_head.forward(&rows))
    }
}
