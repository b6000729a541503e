//! Model configuration: parsed once from `config.json` or GGUF metadata, validated, resolved.
//!
//! Every key either feeds [`DenseConfig`] or is on the list of keys known not to change the
//! math; any other key, and any value the code does not handle, is an error at load.

use std::path::Path;

use pio_kernels::ops::RopeLayout;
use serde_json::Value;

use crate::weights::gguf::GgufFile;
use crate::{Error, Result};

/// Which member of the dense family; decides biases and q/k norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseArch {
    /// `Qwen3ForCausalLM` / GGUF `qwen3`: per-head RMSNorm on q and k.
    Qwen3,
    /// `Qwen2ForCausalLM` / GGUF `qwen2`: biases on q, k, v.
    Qwen2,
    /// `LlamaForCausalLM` / GGUF `llama`.
    Llama,
}

/// The resolved shape and hyper-parameters of a dense decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseConfig {
    pub arch: DenseArch,
    /// The architecture string as the checkpoint wrote it.
    pub arch_name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_layout: RopeLayout,
    pub max_position_embeddings: usize,
    /// The LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Biases on gate, up and down projections.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE.
    pub qk_norm: bool,
}

/// Keys that do not change inference (bookkeeping, training-only, or token ids read elsewhere).
const INFORMATIONAL_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "is_llama_config",
    "transformers.js_config",
    "_name_or_path",
    "tokenizer_class",
    "max_window_layers",
];

impl DenseConfig {
    /// Reads and validates `config.json` in `dir`.
    pub fn from_hf_file(path: &Path) -> Result<DenseConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("malformed JSON: {e}")))?;
        Self::from_hf_json(&json).map_err(|e| match e {
            Error::Config(msg) => Error::file(path, format!("unsupported model config: {msg}")),
            other => other,
        })
    }

    /// Validates a parsed `config.json`.
    pub fn from_hf_json(json: &Value) -> Result<DenseConfig> {
        let obj = json.as_object().ok_or_else(|| cfg("config.json is not a JSON object"))?;
        let arch_name = obj
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or_else(|| cfg("no \"architectures\" entry"))?
            .to_string();
        let arch = match arch_name.as_str() {
            "Qwen3ForCausalLM" => DenseArch::Qwen3,
            "Qwen2ForCausalLM" => DenseArch::Qwen2,
            "LlamaForCausalLM" => DenseArch::Llama,
            other => return Err(cfg(format!("unknown architecture {other:?}"))),
        };
        let mut used: Vec<&str> = INFORMATIONAL_KEYS.to_vec();
        let mut get = |key: &'static str| {
            used.push(key);
            obj.get(key).filter(|v| !v.is_null())
        };
        let usize_of = |key: &str, v: Option<&Value>| -> Result<Option<usize>> {
            v.map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| cfg(format!("{key} must be a non-negative integer, got {v}")))
            })
            .transpose()
        };
        let req = |key: &str, v: Option<usize>| v.ok_or_else(|| cfg(format!("missing {key:?}")));
        let f32_of = |key: &str, v: Option<&Value>| -> Result<Option<f32>> {
            v.map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| cfg(format!("{key} must be a number, got {v}"))))
                .transpose()
        };
        let bool_of = |key: &str, v: Option<&Value>| -> Result<Option<bool>> {
            v.map(|v| v.as_bool().ok_or_else(|| cfg(format!("{key} must be true or false, got {v}")))).transpose()
        };

        let hidden_size = req("hidden_size", usize_of("hidden_size", get("hidden_size"))?)?;
        let num_heads = req("num_attention_heads", usize_of("num_attention_heads", get("num_attention_heads"))?)?;
        let num_kv_heads = usize_of("num_key_value_heads", get("num_key_value_heads"))?.unwrap_or(num_heads);
        let head_dim = match usize_of("head_dim", get("head_dim"))? {
            Some(h) => h,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let hidden_act = get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(cfg(format!("hidden_act {hidden_act:?} (only \"silu\" is supported)")));
        }
        if let Some(rs) = get("rope_scaling") {
            return Err(cfg(format!("rope_scaling {rs} (only null is supported)")));
        }
        if bool_of("use_sliding_window", get("use_sliding_window"))?.unwrap_or(false) {
            return Err(cfg("use_sliding_window: true is not supported"));
        }
        // Only read when use_sliding_window is true, which is rejected above.
        get("sliding_window");
        if let Some(tp) = usize_of("pretraining_tp", get("pretraining_tp"))? {
            if tp != 1 {
                return Err(cfg(format!("pretraining_tp {tp} (only 1 is supported)")));
            }
        }
        if bool_of("rope_interleaved", get("rope_interleaved"))?.unwrap_or(false) {
            return Err(cfg("rope_interleaved: true is not supported"));
        }
        if let Some(types) = get("layer_types") {
            let all_full = types.as_array().is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")));
            if !all_full {
                return Err(cfg(format!("layer_types {types} (only full_attention is supported)")));
            }
        }
        let attention_bias = bool_of("attention_bias", get("attention_bias"))?.unwrap_or(false);
        let mlp_bias = bool_of("mlp_bias", get("mlp_bias"))?.unwrap_or(false);
        let (qkv_bias, o_bias, qk_norm) = match arch {
            DenseArch::Qwen3 => (attention_bias, attention_bias, true),
            // Qwen2 hard-codes q/k/v biases and has no attention_bias key.
            DenseArch::Qwen2 => (true, false, false),
            DenseArch::Llama => (attention_bias, attention_bias, false),
        };
        if mlp_bias && arch != DenseArch::Llama {
            return Err(cfg("mlp_bias is only defined for LlamaForCausalLM"));
        }
        let config = DenseConfig {
            arch,
            arch_name,
            vocab_size: req("vocab_size", usize_of("vocab_size", get("vocab_size"))?)?,
            hidden_size,
            intermediate_size: req("intermediate_size", usize_of("intermediate_size", get("intermediate_size"))?)?,
            num_layers: req("num_hidden_layers", usize_of("num_hidden_layers", get("num_hidden_layers"))?)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f32_of("rms_norm_eps", get("rms_norm_eps"))?.unwrap_or(1e-6),
            rope_theta: f32_of("rope_theta", get("rope_theta"))?.unwrap_or(10000.0),
            rope_layout: RopeLayout::SplitHalves,
            max_position_embeddings: usize_of("max_position_embeddings", get("max_position_embeddings"))?
                .unwrap_or(2048),
            // transformers' Qwen2/Qwen3/Llama configs default to untied.
            tie_word_embeddings: bool_of("tie_word_embeddings", get("tie_word_embeddings"))?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
        };
        if let Some(key) = obj.keys().find(|k| !used.contains(&k.as_str())) {
            if key == "quantization_config" {
                return Err(cfg("pre-quantized checkpoints (quantization_config) are not supported"));
            }
            return Err(cfg(format!("unknown config key {key:?}")));
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads the config of a GGUF file of arch `llama`, `qwen2` or `qwen3`.
    pub fn from_gguf(g: &GgufFile) -> Result<DenseConfig> {
        let arch_name = g.get_str("general.architecture")?.to_string();
        let (arch, rope_layout) = match arch_name.as_str() {
            "qwen3" => (DenseArch::Qwen3, RopeLayout::SplitHalves),
            "qwen2" => (DenseArch::Qwen2, RopeLayout::SplitHalves),
            // convert_hf_to_gguf permutes llama q/k rows so adjacent pairs rotate together.
            "llama" => (DenseArch::Llama, RopeLayout::Interleaved),
            other => return Err(Error::file(&g.path, format!("unknown architecture {other:?}"))),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let num_heads = g.get_usize(&key("attention.head_count"))?;
        let hidden_size = g.get_usize(&key("embedding_length"))?;
        let head_dim = match g.get(&key("attention.key_length")) {
            Some(v) => v.as_u64().map_or(0, |v| v as usize),
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        if let Some(v) = g.get(&key("attention.value_length")).and_then(|v| v.as_u64()) {
            if v as usize != head_dim {
                return Err(Error::file(&g.path, "attention.value_length differs from key_length"));
            }
        }
        if let Some(v) = g.get(&key("rope.dimension_count")).and_then(|v| v.as_u64()) {
            if v as usize != head_dim {
                return Err(Error::file(&g.path, format!("partial rotary ({v} of {head_dim} dims) is not supported")));
            }
        }
        if let Some(t) = g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            if t != "none" {
                return Err(Error::file(&g.path, format!("rope scaling {t:?} is not supported")));
            }
        }
        let vocab_size = match g.get(&key("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => g.get("tokenizer.ggml.tokens").and_then(|t| t.as_array()).map_or(0, |a| a.len()),
        };
        let qkv_bias = arch == DenseArch::Qwen2 || g.tensors.contains_key("blk.0.attn_q.bias");
        let config = DenseConfig {
            arch,
            arch_name: arch_name.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: g.get_usize(&key("feed_forward_length"))?,
            num_layers: g.get_usize(&key("block_count"))?,
            num_heads,
            num_kv_heads: g
                .get(&key("attention.head_count_kv"))
                .and_then(|v| v.as_u64())
                .map_or(num_heads, |v| v as usize),
            head_dim,
            rms_norm_eps: g
                .get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .ok_or_else(|| Error::file(&g.path, "missing attention.layer_norm_rms_epsilon"))?
                as f32,
            rope_theta: g.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0) as f32,
            rope_layout,
            max_position_embeddings: g.get(&key("context_length")).and_then(|v| v.as_u64()).unwrap_or(2048) as usize,
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            qkv_bias,
            o_bias: g.tensors.contains_key("blk.0.attn_output.bias"),
            mlp_bias: false,
            qk_norm: arch == DenseArch::Qwen3,
        };
        config.validate().map_err(|e| Error::file(&g.path, e.to_string()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((k, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(cfg(format!("{k} must be positive")));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(cfg(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(cfg(format!("head_dim {} must be even for RoPE", self.head_dim)));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(cfg("rms_norm_eps and rope_theta must be positive"));
        }
        Ok(())
    }

    /// Number of parameters (embedding counted once when tied).
    pub fn num_params(&self) -> usize {
        let (h, q, kv) = (self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}

fn cfg(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}
