//! Model configuration: parsed once from `config.json` or GGUF metadata, validated, resolved.
//!
//! Every key either feeds [`ModelConfig`] or is on the list of keys known not to change the
//! math; any other key, and any value the code does not handle, is an error at load.

use std::path::Path;

use pio_kernels::ops::RopeLayout;
use serde_json::Value;

use crate::weights::gguf::GgufFile;
use crate::{Error, Result};

/// Which architecture; decides biases, q/k norms, the attention kind and the feed-forward kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `Qwen3ForCausalLM` / GGUF `qwen3`: per-head RMSNorm on q and k.
    Qwen3,
    /// `Qwen2ForCausalLM` / GGUF `qwen2`: biases on q, k, v.
    Qwen2,
    /// `LlamaForCausalLM` / GGUF `llama`.
    Llama,
    /// `Qwen3MoeForCausalLM` / GGUF `qwen3moe`: Qwen3 attention, softmax-routed experts.
    Qwen3Moe,
    /// `Glm4MoeLiteForCausalLM` / GGUF `deepseek2`: multi-head latent attention, sigmoid-routed
    /// experts with a shared expert (DeepSeek-V3 style).
    Glm4MoeLite,
    /// `Qwen3NextForCausalLM` / GGUF `qwen3next`: Gated DeltaNet linear attention in three of
    /// every four layers, gated full attention with partial rotary in the fourth, softmax-routed
    /// experts with a sigmoid-gated shared expert, zero-centred RMSNorms (`(1 + w)`).
    Qwen3Next,
    /// `Qwen3VLForConditionalGeneration`: a Qwen3 text model with interleaved M-RoPE and
    /// DeepStack, fed by a ViT ([`VisionConfig`]).
    Qwen3Vl,
}

/// How a mixture-of-experts layer picks and weighs its experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gating {
    /// Qwen3-MoE: softmax over all experts, top-k, renormalized when `norm_topk_prob`.
    Softmax,
    /// DeepSeek-V3 `noaux_tc`: sigmoid scores; experts are chosen by score + correction bias
    /// within the `topk_group` best of `n_group` groups; weights are the plain scores,
    /// renormalized when `norm_topk_prob`, times `routed_scaling_factor`.
    SigmoidGrouped { n_group: usize, topk_group: usize, routed_scaling_factor: f32 },
}

/// The mixture-of-experts part of a config.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Hidden width of one expert's SwiGLU MLP.
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub gating: Gating,
    /// Hidden width of the always-on shared expert (0: none).
    pub shared_intermediate_size: usize,
    /// The shared expert's output is scaled by `sigmoid(x · w)` per token (Qwen3-Next's
    /// `shared_expert_gate`).
    pub shared_expert_gate: bool,
    /// Per layer: true when its feed-forward is the mixture, false for a dense MLP of
    /// `intermediate_size`.
    pub sparse_layers: Vec<bool>,
}

/// Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query compression; `None`: a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed K/V latent the cache stores.
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Epsilon of the q_a and kv_a RMSNorms: transformers builds them with its class default
    /// (1e-6), llama.cpp with `rms_norm_eps`.
    pub latent_norm_eps: f32,
}

impl MlaConfig {
    /// Width of one query/key head: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values one token's cache entry holds: the latent and the rotated shared key part.
    pub fn cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// Gated DeltaNet linear attention (Qwen3-Next).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearAttnConfig {
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// Taps of the causal depthwise convolution over q, k and v.
    pub conv_kernel: usize,
    /// Per layer: true for linear attention, false for full attention.
    pub layers: Vec<bool>,
}

impl LinearAttnConfig {
    /// Channels of the convolution: q and k of every key head, v of every value head.
    pub fn conv_channels(&self) -> usize {
        2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim
    }

    /// Value heads per key head.
    pub fn value_heads_per_key_head(&self) -> usize {
        self.num_value_heads / self.num_key_heads.max(1)
    }

    /// Rows of `in_proj_qkvz` (Hugging Face: per key head `q (dk), k (dk), v (r·dv), z (r·dv)`)
    /// regrouped as llama.cpp's converter splits it: those of `in_proj_qkv` (q of every key
    /// head, then k, then v: the convolution's channel order) and those of `in_proj_z`.
    pub fn qkvz_split(&self) -> (Vec<std::ops::Range<usize>>, Vec<std::ops::Range<usize>>) {
        let (dk, dv, r) = (self.key_head_dim, self.value_head_dim, self.value_heads_per_key_head());
        let per = 2 * dk + 2 * r * dv;
        let part = |off: usize, len: usize| (0..self.num_key_heads).map(move |g| g * per + off..g * per + off + len);
        let qkv = part(0, dk).chain(part(dk, dk)).chain(part(2 * dk, r * dv)).collect();
        (qkv, part(2 * dk + r * dv, r * dv).collect())
    }
}

/// The resolved shape and hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
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
    /// Mixture-of-experts feed-forward (`None`: every layer is a dense MLP).
    pub moe: Option<MoeConfig>,
    /// Multi-head latent attention (`None`: standard attention; `head_dim` is then the q/k/v
    /// head width, with MLA it is `qk_head_dim`).
    pub mla: Option<MlaConfig>,
    /// Trailing multi-token-prediction layers the checkpoint stores after the decoder layers
    /// (GLM-4.7-Flash `num_nextn_predict_layers`; in GGUF `nextn_predict_layers`, Qwen3-Next's
    /// too); skipped at load unless speculation by MTP asks for the first.
    pub num_nextn_predict_layers: usize,
    /// Per layer: the sliding window (a position sees itself and the `w - 1` before it), or
    /// `None` for full attention.
    pub sliding_window: Vec<Option<usize>>,
    /// Leading dimensions of each q/k head that RoPE rotates (`head_dim` unless the config has
    /// a `partial_rotary_factor`).
    pub rotary_dim: usize,
    /// Full attention's `q_proj` also yields a per-head output gate: `o * sigmoid(gate)`.
    pub attn_output_gate: bool,
    /// RMSNorm weights are stored zero-centred and applied as `(1 + w)` (Qwen3-Next's
    /// checkpoints; llama.cpp's converter folds the 1 in, so GGUF files store `1 + w`).
    pub zero_centred_norms: bool,
    /// Gated DeltaNet layers (`None`: every layer is attention).
    pub linear_attn: Option<LinearAttnConfig>,
    /// Multimodal rotary positions (Qwen3-VL): frequency `i` of each head turns by the
    /// temporal, height or width position of its token, interleaved as [`mrope_axis`] says;
    /// the sections count the frequencies of each axis.
    pub mrope_section: Option<[usize; 3]>,
    /// The vision tower of a vision-language model (`None`: text only).
    pub vision: Option<VisionConfig>,
}

/// Which axis of an M-RoPE position (0: temporal, 1: height, 2: width) turns frequency `i`,
/// as transformers' `apply_interleaved_mrope` lays them out: height and width take every third
/// frequency from 1 and 2 for their sections' counts, the temporal axis the rest.
pub fn mrope_axis(i: usize, section: &[usize; 3]) -> usize {
    match i % 3 {
        1 if i < 3 * section[1] => 1,
        2 if i < 3 * section[2] => 2,
        _ => 0,
    }
}

/// Qwen3-VL's vision tower and the token ids that place images in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    /// Patches per side of the square window one LLM token merges.
    pub spatial_merge_size: usize,
    /// Width of the merged tokens: the text model's hidden size.
    pub out_hidden_size: usize,
    /// Learned position embeddings, a square grid, bilinearly interpolated to each image's.
    pub num_position_embeddings: usize,
    /// Blocks whose outputs, merged, are added to the text model's hidden states after its
    /// first layers (DeepStack): the `i`-th listed after text layer `i`.
    pub deepstack_visual_indexes: Vec<usize>,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

impl VisionConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Values in one patch: channels x frames x pixels.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one LLM token.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Parameters of the tower and its mergers.
    pub fn num_params(&self) -> usize {
        let (h, i, w) = (self.hidden_size, self.intermediate_size, self.hidden_size * self.merge_unit());
        let block = 4 * h + 3 * h * h + 3 * h + h * h + h + 2 * h * i + i + h;
        let merger = |norm: usize| 2 * norm + w * w + w + w * self.out_hidden_size + self.out_hidden_size;
        h * self.patch_len()
            + h
            + self.num_position_embeddings * h
            + self.depth * block
            + merger(h)
            + self.deepstack_visual_indexes.len() * merger(w)
    }

    /// Reads `vision_config` and the token ids of a Qwen3-VL `config.json`.
    fn from_hf(top: &serde_json::Map<String, Value>, text_hidden: usize, text_layers: usize) -> Result<VisionConfig> {
        let v = top.get("vision_config").and_then(Value::as_object).ok_or_else(|| cfg("missing \"vision_config\""))?;
        const KNOWN: &[&str] = &[
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "out_hidden_size",
            "num_position_embeddings",
            "deepstack_visual_indexes",
            "hidden_act",
            "model_type",
            "initializer_range",
            "dtype",
            "torch_dtype",
        ];
        if let Some(k) = v.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(cfg(format!("unknown vision_config key {k:?}")));
        }
        let num = |obj: &serde_json::Map<String, Value>, key: &str| -> Result<usize> {
            let x = obj.get(key).ok_or_else(|| cfg(format!("missing {key:?}")))?;
            x.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| cfg(format!("{key} must be a non-negative integer, got {x}")))
        };
        let id = |key: &str| -> Result<u32> {
            let n = num(top, key)?;
            u32::try_from(n).map_err(|_| cfg(format!("{key} {n} is not a token id")))
        };
        let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu_pytorch_tanh");
        if act != "gelu_pytorch_tanh" {
            return Err(cfg(format!("vision hidden_act {act:?} (only \"gelu_pytorch_tanh\" is supported)")));
        }
        let deepstack = match v.get("deepstack_visual_indexes") {
            None => Vec::new(),
            Some(x) => x
                .as_array()
                .and_then(|a| a.iter().map(|i| i.as_u64().map(|i| i as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| cfg(format!("deepstack_visual_indexes must be a list of block indices, got {x}")))?,
        };
        let c = VisionConfig {
            depth: num(v, "depth")?,
            hidden_size: num(v, "hidden_size")?,
            intermediate_size: num(v, "intermediate_size")?,
            num_heads: num(v, "num_heads")?,
            in_channels: v.get("in_channels").map_or(Ok(3), |_| num(v, "in_channels"))?,
            patch_size: num(v, "patch_size")?,
            temporal_patch_size: num(v, "temporal_patch_size")?,
            spatial_merge_size: num(v, "spatial_merge_size")?,
            out_hidden_size: num(v, "out_hidden_size")?,
            num_position_embeddings: num(v, "num_position_embeddings")?,
            deepstack_visual_indexes: deepstack,
            image_token_id: id("image_token_id")?,
            video_token_id: id("video_token_id")?,
            vision_start_token_id: id("vision_start_token_id")?,
            vision_end_token_id: id("vision_end_token_id")?,
        };
        c.validate(text_hidden, text_layers)?;
        Ok(c)
    }

    pub(crate) fn validate(&self, text_hidden: usize, text_layers: usize) -> Result<()> {
        let sizes = [
            self.depth,
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.in_channels,
            self.patch_size,
            self.temporal_patch_size,
            self.spatial_merge_size,
            self.num_position_embeddings,
        ];
        if sizes.contains(&0) {
            return Err(cfg("vision_config sizes must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) || !self.head_dim().is_multiple_of(4) {
            return Err(cfg(format!(
                "vision hidden_size {} over {} heads: each head needs a multiple of 4 dimensions (2-D rotary)",
                self.hidden_size, self.num_heads
            )));
        }
        let side = self.num_position_embeddings.isqrt();
        if side * side != self.num_position_embeddings {
            return Err(cfg(format!("num_position_embeddings {} is not a square grid", self.num_position_embeddings)));
        }
        if self.out_hidden_size != text_hidden {
            return Err(cfg(format!(
                "vision out_hidden_size {} differs from the text hidden_size {text_hidden}",
                self.out_hidden_size
            )));
        }
        if self.deepstack_visual_indexes.iter().any(|&i| i >= self.depth)
            || self.deepstack_visual_indexes.len() > text_layers
        {
            return Err(cfg(format!(
                "deepstack_visual_indexes {:?}: blocks of {} and at most one per text layer ({text_layers})",
                self.deepstack_visual_indexes, self.depth
            )));
        }
        Ok(())
    }
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
];

impl ModelConfig {
    /// Reads and validates `config.json` in `dir`.
    pub fn from_hf_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("malformed JSON: {e}")))?;
        Self::from_hf_json(&json).map_err(|e| match e {
            Error::Config(msg) => Error::file(path, format!("unsupported model config: {msg}")),
            other => other,
        })
    }

    /// Validates a parsed `config.json`.
    pub fn from_hf_json(json: &Value) -> Result<ModelConfig> {
        let obj = json.as_object().ok_or_else(|| cfg("config.json is not a JSON object"))?;
        let arch_name = obj
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or_else(|| cfg("no \"architectures\" entry"))?
            .to_string();
        if arch_name == "Qwen3VLForConditionalGeneration" {
            return Self::from_hf_qwen3_vl(obj);
        }
        let arch = match arch_name.as_str() {
            "Qwen3ForCausalLM" => Arch::Qwen3,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen3MoeForCausalLM" => Arch::Qwen3Moe,
            "Glm4MoeLiteForCausalLM" => Arch::Glm4MoeLite,
            "Qwen3NextForCausalLM" => Arch::Qwen3Next,
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
        let use_sliding_window = bool_of("use_sliding_window", get("use_sliding_window"))?.unwrap_or(false);
        let window = usize_of("sliding_window", get("sliding_window"))?;
        let max_window_layers = usize_of("max_window_layers", get("max_window_layers"))?;
        if let Some(tp) = usize_of("pretraining_tp", get("pretraining_tp"))? {
            if tp != 1 {
                return Err(cfg(format!("pretraining_tp {tp} (only 1 is supported)")));
            }
        }
        if bool_of("rope_interleaved", get("rope_interleaved"))?.unwrap_or(false) {
            return Err(cfg("rope_interleaved: true is not supported"));
        }
        // Qwen3-Next's `layer_types` name linear and full attention layers (read below).
        let layer_types = if arch == Arch::Qwen3Next { None } else { get("layer_types").cloned() };
        let attention_bias = bool_of("attention_bias", get("attention_bias"))?.unwrap_or(false);
        let mlp_bias = bool_of("mlp_bias", get("mlp_bias"))?.unwrap_or(false);
        let (qkv_bias, o_bias, qk_norm) = match arch {
            Arch::Qwen3 | Arch::Qwen3Moe | Arch::Qwen3Next | Arch::Qwen3Vl => (attention_bias, attention_bias, true),
            // DeepSeek-V3 attention: biases on q_a, kv_a and o (attention_bias), never q_b/kv_b.
            Arch::Glm4MoeLite => (attention_bias, attention_bias, false),
            // Qwen2 hard-codes q/k/v biases and has no attention_bias key.
            Arch::Qwen2 => (true, false, false),
            Arch::Llama => (attention_bias, attention_bias, false),
        };
        if mlp_bias && arch != Arch::Llama {
            return Err(cfg("mlp_bias is only defined for LlamaForCausalLM"));
        }
        let num_layers = req("num_hidden_layers", usize_of("num_hidden_layers", get("num_hidden_layers"))?)?;
        // Sliding-window layers, as transformers reads Qwen2/Qwen3 configs: `layer_types` where
        // given, else with `use_sliding_window` the layers from `max_window_layers` on (28 when
        // unset, transformers' default).
        let sliding = |w: Option<usize>| -> Result<usize> {
            match w {
                Some(w) if w > 0 => Ok(w),
                Some(_) => Err(cfg("sliding_window must be positive")),
                None => Err(cfg("sliding-window layers need \"sliding_window\"")),
            }
        };
        let sliding_window: Vec<Option<usize>> = match &layer_types {
            Some(types) => {
                let list = types.as_array().filter(|a| a.len() == num_layers).ok_or_else(|| {
                    cfg(format!("layer_types must list one type for each of {num_layers} layers, got {types}"))
                })?;
                list.iter()
                    .map(|t| match t.as_str() {
                        Some("full_attention") => Ok(None),
                        Some("sliding_attention") => sliding(window).map(Some),
                        _ => Err(cfg(format!(
                            "layer_types entry {t} (expected \"full_attention\" or \"sliding_attention\")"
                        ))),
                    })
                    .collect::<Result<_>>()?
            }
            None if use_sliding_window => {
                let w = sliding(window)?;
                let from = max_window_layers.unwrap_or(28);
                (0..num_layers).map(|i| (i >= from).then_some(w)).collect()
            }
            None => vec![None; num_layers],
        };
        let mut linear_attn = None;
        let mut rotary_dim = head_dim;
        if arch == Arch::Qwen3Next {
            let u = |key: &'static str, v: Option<&Value>| -> Result<usize> { req(key, usize_of(key, v)?) };
            let interval = usize_of("full_attention_interval", get("full_attention_interval"))?;
            // transformers 5 may save the kinds per layer instead of the interval.
            let layers: Vec<bool> = match (get("layer_types"), interval) {
                (Some(types), _) => {
                    let kinds: Option<Vec<bool>> = types.as_array().filter(|a| a.len() == num_layers).and_then(|a| {
                        a.iter()
                            .map(|t| match t.as_str() {
                                Some("linear_attention") => Some(true),
                                Some("full_attention") => Some(false),
                                _ => None,
                            })
                            .collect()
                    });
                    kinds.ok_or_else(|| {
                        cfg(format!(
                            "layer_types must list \"linear_attention\" or \"full_attention\" for each of {num_layers} layers, got {types}"
                        ))
                    })?
                }
                (None, Some(n)) if n > 0 => (0..num_layers).map(|i| (i + 1) % n != 0).collect(),
                (None, Some(_)) => return Err(cfg("full_attention_interval must be positive")),
                (None, None) => return Err(cfg("missing \"full_attention_interval\" (or \"layer_types\")")),
            };
            let la = LinearAttnConfig {
                num_key_heads: u("linear_num_key_heads", get("linear_num_key_heads"))?,
                num_value_heads: u("linear_num_value_heads", get("linear_num_value_heads"))?,
                key_head_dim: u("linear_key_head_dim", get("linear_key_head_dim"))?,
                value_head_dim: u("linear_value_head_dim", get("linear_value_head_dim"))?,
                conv_kernel: u("linear_conv_kernel_dim", get("linear_conv_kernel_dim"))?,
                layers,
            };
            linear_attn = Some(la);
            let factor = f32_of("partial_rotary_factor", get("partial_rotary_factor"))?.unwrap_or(1.0);
            if !(factor > 0.0 && factor <= 1.0) {
                return Err(cfg(format!("partial_rotary_factor {factor} must be in (0, 1]")));
            }
            // transformers: int(head_dim * factor).
            rotary_dim = (head_dim as f32 * factor) as usize;
        }
        let (moe, mla, num_nextn_predict_layers, head_dim, rope_layout) = match arch {
            Arch::Qwen3 | Arch::Qwen2 | Arch::Llama | Arch::Qwen3Vl => {
                (None, None, 0, head_dim, RopeLayout::SplitHalves)
            }
            Arch::Qwen3Moe | Arch::Qwen3Next => {
                for (key, want) in [("qkv_bias", false), ("use_qk_norm", true)] {
                    if let Some(v) = bool_of(key, get(key))? {
                        if v != want {
                            return Err(cfg(format!("{key}: {v} is not supported for Qwen3MoeForCausalLM")));
                        }
                    }
                }
                if let Some(n) = usize_of("shared_experts_intermediate_size", get("shared_experts_intermediate_size"))?
                {
                    if n != 0 {
                        return Err(cfg(format!(
                            "shared_experts_intermediate_size {n} (Qwen3-MoE has no shared expert)"
                        )));
                    }
                }
                // Qwen3-Next: one shared expert behind a sigmoid gate.
                let shared = if arch == Arch::Qwen3Next {
                    req(
                        "shared_expert_intermediate_size",
                        usize_of("shared_expert_intermediate_size", get("shared_expert_intermediate_size"))?,
                    )?
                } else {
                    0
                };
                get("output_router_logits");
                get("router_aux_loss_coef");
                let num_experts = req("num_experts", usize_of("num_experts", get("num_experts"))?)?;
                let step = usize_of("decoder_sparse_step", get("decoder_sparse_step"))?.unwrap_or(1);
                let mlp_only: Vec<usize> = match get("mlp_only_layers") {
                    None => Vec::new(),
                    Some(v) => v
                        .as_array()
                        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| cfg(format!("mlp_only_layers must be a list of layer indices, got {v}")))?,
                };
                // transformers: sparse when not listed, experts exist and (i + 1) % step == 0.
                let sparse_layers = (0..num_layers)
                    .map(|i| !mlp_only.contains(&i) && num_experts > 0 && step > 0 && (i + 1) % step == 0)
                    .collect();
                let moe = MoeConfig {
                    num_experts,
                    top_k: req("num_experts_per_tok", usize_of("num_experts_per_tok", get("num_experts_per_tok"))?)?,
                    moe_intermediate_size: req(
                        "moe_intermediate_size",
                        usize_of("moe_intermediate_size", get("moe_intermediate_size"))?,
                    )?,
                    norm_topk_prob: bool_of("norm_topk_prob", get("norm_topk_prob"))?.unwrap_or(false),
                    gating: Gating::Softmax,
                    shared_intermediate_size: shared,
                    shared_expert_gate: shared > 0,
                    sparse_layers,
                };
                (Some(moe), None, 0, head_dim, RopeLayout::SplitHalves)
            }
            Arch::Glm4MoeLite => {
                // Training-only (load balancing) and parallelism settings.
                for k in ["output_router_logits", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "ep_size"] {
                    get(k);
                }
                if let Some(f) = usize_of("moe_layer_freq", get("moe_layer_freq"))? {
                    if f != 1 {
                        return Err(cfg(format!("moe_layer_freq {f} (only 1 is supported)")));
                    }
                }
                if let Some(m) = get("topk_method").map(|v| v.as_str().unwrap_or_default().to_string()) {
                    if m != "noaux_tc" {
                        return Err(cfg(format!("topk_method {m:?} (only \"noaux_tc\" is supported)")));
                    }
                }
                if let Some(f) = get("scoring_func").map(|v| v.as_str().unwrap_or_default().to_string()) {
                    if f != "sigmoid" {
                        return Err(cfg(format!("scoring_func {f:?} (only \"sigmoid\" is supported)")));
                    }
                }
                if let Some(p) = f32_of("partial_rotary_factor", get("partial_rotary_factor"))? {
                    if p != 1.0 {
                        return Err(cfg(format!("partial_rotary_factor {p} (only 1.0 is supported)")));
                    }
                }
                let u = |key: &'static str, v: Option<&Value>| -> Result<usize> { req(key, usize_of(key, v)?) };
                let mla = MlaConfig {
                    q_lora_rank: usize_of("q_lora_rank", get("q_lora_rank"))?,
                    kv_lora_rank: u("kv_lora_rank", get("kv_lora_rank"))?,
                    qk_nope_head_dim: u("qk_nope_head_dim", get("qk_nope_head_dim"))?,
                    qk_rope_head_dim: u("qk_rope_head_dim", get("qk_rope_head_dim"))?,
                    v_head_dim: u("v_head_dim", get("v_head_dim"))?,
                    latent_norm_eps: 1e-6,
                };
                let num_experts = u("n_routed_experts", get("n_routed_experts"))?;
                let moe_inter = u("moe_intermediate_size", get("moe_intermediate_size"))?;
                let first_dense = usize_of("first_k_dense_replace", get("first_k_dense_replace"))?.unwrap_or(0);
                let moe = MoeConfig {
                    num_experts,
                    top_k: u("num_experts_per_tok", get("num_experts_per_tok"))?,
                    moe_intermediate_size: moe_inter,
                    norm_topk_prob: bool_of("norm_topk_prob", get("norm_topk_prob"))?.unwrap_or(true),
                    gating: Gating::SigmoidGrouped {
                        n_group: usize_of("n_group", get("n_group"))?.unwrap_or(1),
                        topk_group: usize_of("topk_group", get("topk_group"))?.unwrap_or(1),
                        routed_scaling_factor: f32_of("routed_scaling_factor", get("routed_scaling_factor"))?
                            .unwrap_or(1.0),
                    },
                    shared_intermediate_size: moe_inter
                        * usize_of("n_shared_experts", get("n_shared_experts"))?.unwrap_or(0),
                    shared_expert_gate: false,
                    sparse_layers: (0..num_layers).map(|i| i >= first_dense).collect(),
                };
                let nextn = usize_of("num_nextn_predict_layers", get("num_nextn_predict_layers"))?.unwrap_or(0);
                let qk = mla.qk_head_dim();
                // transformers 5 may save the per-layer kinds instead of first_k_dense_replace.
                let mut moe = moe;
                if let Some(types) = get("mlp_layer_types") {
                    let kinds: Option<Vec<bool>> = types.as_array().and_then(|a| {
                        a.iter()
                            .map(|t| match t.as_str() {
                                Some("sparse") => Some(true),
                                Some("dense") => Some(false),
                                _ => None,
                            })
                            .collect()
                    });
                    match kinds {
                        Some(k) if k.len() == num_layers => moe.sparse_layers = k,
                        _ => {
                            return Err(cfg(format!(
                                "mlp_layer_types must list \"dense\" or \"sparse\" for each of {num_layers} layers, got {types}"
                            )))
                        }
                    }
                }
                // DeepSeek-V3's rotary part rotates adjacent pairs unless told otherwise.
                let interleave = bool_of("rope_interleave", get("rope_interleave"))?.unwrap_or(true);
                let layout = if interleave { RopeLayout::Interleaved } else { RopeLayout::SplitHalves };
                (Some(moe), Some(mla), nextn, qk, layout)
            }
        };
        let config = ModelConfig {
            arch,
            arch_name,
            vocab_size: req("vocab_size", usize_of("vocab_size", get("vocab_size"))?)?,
            hidden_size,
            intermediate_size: req("intermediate_size", usize_of("intermediate_size", get("intermediate_size"))?)?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f32_of("rms_norm_eps", get("rms_norm_eps"))?.unwrap_or(1e-6),
            rope_theta: f32_of("rope_theta", get("rope_theta"))?.unwrap_or(10000.0),
            rope_layout,
            max_position_embeddings: usize_of("max_position_embeddings", get("max_position_embeddings"))?
                .unwrap_or(2048),
            // transformers' Qwen2/Qwen3/Llama configs default to untied.
            tie_word_embeddings: bool_of("tie_word_embeddings", get("tie_word_embeddings"))?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            moe,
            mla,
            num_nextn_predict_layers,
            sliding_window,
            rotary_dim,
            attn_output_gate: arch == Arch::Qwen3Next,
            zero_centred_norms: arch == Arch::Qwen3Next,
            linear_attn,
            mrope_section: None,
            vision: None,
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

    /// A Qwen3-VL `config.json`: its `text_config` read as a Qwen3 config (with the M-RoPE
    /// sections of its `rope_scaling`), its `vision_config`, and the token ids at the top.
    fn from_hf_qwen3_vl(obj: &serde_json::Map<String, Value>) -> Result<ModelConfig> {
        const TOP: &[&str] = &[
            "architectures",
            "model_type",
            "dtype",
            "torch_dtype",
            "transformers_version",
            "text_config",
            "vision_config",
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "tie_word_embeddings",
        ];
        if let Some(k) = obj.keys().find(|k| !TOP.contains(&k.as_str())) {
            return Err(cfg(format!("unknown config key {k:?}")));
        }
        let mut text =
            obj.get("text_config").and_then(Value::as_object).cloned().ok_or_else(|| cfg("missing \"text_config\""))?;
        let rope = text.remove("rope_scaling").or_else(|| text.remove("rope_parameters"));
        let rope = rope.as_ref().and_then(Value::as_object).ok_or_else(|| {
            cfg("text_config needs rope_scaling with mrope_section (Qwen3-VL's multimodal rotary positions)")
        })?;
        for (k, v) in rope {
            match (k.as_str(), v) {
                ("mrope_interleaved", Value::Bool(true)) | ("mrope_section", _) => {}
                ("rope_type", Value::String(t)) if t == "default" => {}
                ("rope_theta", _) => {
                    text.entry("rope_theta").or_insert_with(|| v.clone());
                }
                _ => return Err(cfg(format!("rope_scaling {k}: {v} is not supported (interleaved M-RoPE only)"))),
            }
        }
        if rope.get("mrope_interleaved") != Some(&Value::Bool(true)) {
            return Err(cfg("rope_scaling must have mrope_interleaved: true (Qwen3-VL's layout)"));
        }
        let section: [usize; 3] = rope
            .get("mrope_section")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| cfg("mrope_section must list three frequency counts"))?;
        text.insert("architectures".into(), Value::from(vec![Value::from("Qwen3ForCausalLM")]));
        // The head ties to the embedding as the top level says.
        if let Some(t) = obj.get("tie_word_embeddings") {
            text.insert("tie_word_embeddings".into(), t.clone());
        }
        let mut c = Self::from_hf_json(&Value::Object(text)).map_err(|e| match e {
            Error::Config(m) => cfg(format!("text_config: {m}")),
            other => other,
        })?;
        if 2 * section.iter().sum::<usize>() != c.rotary_dim {
            return Err(cfg(format!(
                "mrope_section {section:?} covers {} frequencies, the heads have {}",
                section.iter().sum::<usize>(),
                c.rotary_dim / 2
            )));
        }
        c.arch = Arch::Qwen3Vl;
        c.arch_name = "Qwen3VLForConditionalGeneration".into();
        c.mrope_section = Some(section);
        c.vision = Some(VisionConfig::from_hf(obj, c.hidden_size, c.num_layers)?);
        Ok(c)
    }

    /// Reads the config of a GGUF file of arch `llama`, `qwen2` or `qwen3`.
    pub fn from_gguf(g: &GgufFile) -> Result<ModelConfig> {
        let arch_name = g.get_str("general.architecture")?.to_string();
        let (arch, rope_layout) = match arch_name.as_str() {
            "qwen3" => (Arch::Qwen3, RopeLayout::SplitHalves),
            "qwen2" => (Arch::Qwen2, RopeLayout::SplitHalves),
            // convert_hf_to_gguf permutes llama q/k rows so adjacent pairs rotate together.
            "llama" => (Arch::Llama, RopeLayout::Interleaved),
            "qwen3moe" => (Arch::Qwen3Moe, RopeLayout::SplitHalves),
            "deepseek2" => return Self::from_gguf_deepseek2(g),
            "qwen3next" => return Self::from_gguf_qwen3next(g),
            // Qwen3-VL's text model: Qwen3 with multimodal rotary sections (its vision tower is
            // the mmproj file, `crate::mmproj`).
            "qwen3vl" => (Arch::Qwen3, RopeLayout::SplitHalves),
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
        let qkv_bias = arch == Arch::Qwen2 || g.tensors.contains_key("blk.0.attn_q.bias");
        let num_layers = g.get_usize(&key("block_count"))?;
        let moe = match arch {
            // llama.cpp's qwen3moe graph: softmax gating, weights renormalized, every layer sparse.
            Arch::Qwen3Moe => Some(MoeConfig {
                num_experts: g.get_usize(&key("expert_count"))?,
                top_k: g.get_usize(&key("expert_used_count"))?,
                moe_intermediate_size: g.get_usize(&key("expert_feed_forward_length"))?,
                norm_topk_prob: true,
                gating: Gating::Softmax,
                shared_intermediate_size: 0,
                shared_expert_gate: false,
                sparse_layers: vec![true; num_layers],
            }),
            _ => None,
        };
        let intermediate_size = match (&moe, g.get(&key("feed_forward_length")).and_then(|v| v.as_u64())) {
            (_, Some(v)) => v as usize,
            (Some(m), None) => m.moe_intermediate_size,
            (None, None) => g.get_usize(&key("feed_forward_length"))?,
        };
        let config = ModelConfig {
            arch,
            arch_name: arch_name.clone(),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
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
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
            moe,
            mla: None,
            num_nextn_predict_layers: 0,
            sliding_window: vec![None; num_layers],
            rotary_dim: head_dim,
            attn_output_gate: false,
            zero_centred_norms: false,
            linear_attn: None,
            mrope_section: None,
            vision: None,
        };
        let mut config = config;
        if arch_name == "qwen3vl" {
            config.arch = Arch::Qwen3Vl;
            config.mrope_section = Some(Self::gguf_mrope_section(g, config.rotary_dim)?);
        }
        config.validate().map_err(|e| Error::file(&g.path, e.to_string()))?;
        Ok(config)
    }

    /// `qwen3vl.rope.dimension_sections` (t, h, w and a fourth section llama.cpp keeps for
    /// other models, which must be empty): frequencies per axis, covering the rotary width.
    fn gguf_mrope_section(g: &GgufFile, rotary_dim: usize) -> Result<[usize; 3]> {
        let key = "qwen3vl.rope.dimension_sections";
        let a = g.get(key).and_then(|v| v.as_array()).ok_or_else(|| Error::file(&g.path, format!("missing {key}")))?;
        let n: Option<Vec<usize>> = a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect();
        match n.as_deref() {
            Some(&[t, h, w, 0] | &[t, h, w]) if 2 * (t + h + w) == rotary_dim => Ok([t, h, w]),
            _ => Err(Error::file(
                &g.path,
                format!(
                    "{key} {a:?}: three sections covering the {} rotary frequencies (and an empty fourth)",
                    rotary_dim / 2
                ),
            )),
        }
    }

    /// Qwen3-Next as llama.cpp's `qwen3next` writes it: Gated DeltaNet sizes in `ssm.*`
    /// (`state_size` the key head width, `group_count` the key heads, `time_step_rank` the value
    /// heads, `inner_size` all value heads' width), linear layers from `attention.recurrent_layers`
    /// or else every layer but each `full_attention_interval`-th (4 when unset); the norms'
    /// `1 + w` folded in; `block_count` includes `nextn_predict_layers` MTP layers; the routing
    /// weights always renormalized (llama.cpp's graph does); a layer without a router is dense.
    fn from_gguf_qwen3next(g: &GgufFile) -> Result<ModelConfig> {
        let key = |k: &str| format!("qwen3next.{k}");
        let opt = |k: &str| g.get(&key(k)).and_then(|v| v.as_u64()).map(|v| v as usize);
        let file_err = |msg: String| Error::file(&g.path, msg);
        let nextn = opt("nextn_predict_layers").unwrap_or(0);
        let block_count = g.get_usize(&key("block_count"))?;
        let num_layers = block_count
            .checked_sub(nextn)
            .ok_or_else(|| file_err(format!("nextn_predict_layers {nextn} exceeds block_count {block_count}")))?;
        let num_heads = g.get_usize(&key("attention.head_count"))?;
        let hidden_size = g.get_usize(&key("embedding_length"))?;
        let head_dim = opt("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        if let Some(v) = opt("attention.value_length") {
            if v != head_dim {
                return Err(file_err("attention.value_length differs from key_length".into()));
            }
        }
        if let Some(t) = g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            if t != "none" {
                return Err(file_err(format!("rope scaling {t:?} is not supported")));
            }
        }
        let value_heads = g.get_usize(&key("ssm.time_step_rank"))?;
        let inner = g.get_usize(&key("ssm.inner_size"))?;
        if value_heads == 0 || !inner.is_multiple_of(value_heads) {
            return Err(file_err(format!(
                "ssm.inner_size {inner} is not a multiple of ssm.time_step_rank {value_heads}"
            )));
        }
        let layers: Vec<bool> = match g.get(&key("attention.recurrent_layers")).and_then(|v| v.as_array()) {
            Some(a) => {
                let kinds: Option<Vec<bool>> = a.iter().take(num_layers).map(|v| v.as_bool()).collect();
                kinds.filter(|k| k.len() == num_layers).ok_or_else(|| {
                    file_err(format!("attention.recurrent_layers must hold a boolean for each of {num_layers} layers"))
                })?
            }
            None => {
                let n = opt("full_attention_interval").unwrap_or(4);
                if n == 0 {
                    return Err(file_err("full_attention_interval must be positive".into()));
                }
                (0..num_layers).map(|i| (i + 1) % n != 0).collect()
            }
        };
        let linear_attn = LinearAttnConfig {
            num_key_heads: g.get_usize(&key("ssm.group_count"))?,
            num_value_heads: value_heads,
            key_head_dim: g.get_usize(&key("ssm.state_size"))?,
            value_head_dim: inner / value_heads,
            conv_kernel: g.get_usize(&key("ssm.conv_kernel"))?,
            layers,
        };
        let moe_inter = g.get_usize(&key("expert_feed_forward_length"))?;
        let shared = opt("expert_shared_feed_forward_length").unwrap_or(0);
        let moe = MoeConfig {
            num_experts: g.get_usize(&key("expert_count"))?,
            top_k: g.get_usize(&key("expert_used_count"))?,
            moe_intermediate_size: moe_inter,
            norm_topk_prob: true,
            gating: Gating::Softmax,
            shared_intermediate_size: shared,
            shared_expert_gate: shared > 0,
            sparse_layers: (0..num_layers)
                .map(|i| g.tensors.contains_key(&format!("blk.{i}.ffn_gate_inp.weight")))
                .collect(),
        };
        let vocab_size = match opt("vocab_size") {
            Some(v) => v,
            None => g.get("tokenizer.ggml.tokens").and_then(|t| t.as_array()).map_or(0, |a| a.len()),
        };
        let config = ModelConfig {
            arch: Arch::Qwen3Next,
            arch_name: "qwen3next".into(),
            vocab_size,
            hidden_size,
            intermediate_size: opt("feed_forward_length").unwrap_or(moe_inter).max(1),
            num_layers,
            num_heads,
            num_kv_heads: opt("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: g
                .get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .ok_or_else(|| file_err("missing attention.layer_norm_rms_epsilon".into()))?
                as f32,
            rope_theta: g.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0) as f32,
            rope_layout: RopeLayout::SplitHalves,
            max_position_embeddings: opt("context_length").unwrap_or(2048),
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: true,
            moe: Some(moe),
            mla: None,
            num_nextn_predict_layers: nextn,
            sliding_window: vec![None; num_layers],
            rotary_dim: opt("rope.dimension_count").unwrap_or(head_dim),
            attn_output_gate: true,
            zero_centred_norms: false,
            linear_attn: Some(linear_attn),
            mrope_section: None,
            vision: None,
        };
        config.validate().map_err(|e| Error::file(&g.path, e.to_string()))?;
        Ok(config)
    }

    /// GLM-4.7-Flash (and DeepSeek-V3-style models) as llama.cpp's `deepseek2` writes them:
    /// `block_count` includes the `nextn_predict_layers` MTP layers; `head_count_kv` is 1 and
    /// `key_length`/`value_length` are the latent widths, the per-head widths being the
    /// `*_mla` keys (older files without them store per-head widths directly); `kv_b` comes
    /// split per head as `attn_k_b`/`attn_v_b`. The q_a/kv_a norms use `rms_norm_eps`, as
    /// llama.cpp computes them.
    fn from_gguf_deepseek2(g: &GgufFile) -> Result<ModelConfig> {
        let key = |k: &str| format!("deepseek2.{k}");
        let opt = |k: &str| g.get(&key(k)).and_then(|v| v.as_u64()).map(|v| v as usize);
        let file_err = |msg: String| Error::file(&g.path, msg);
        let num_heads = g.get_usize(&key("attention.head_count"))?;
        let rope = g.get_usize(&key("rope.dimension_count"))?;
        let kv_lora_rank = g.get_usize(&key("attention.kv_lora_rank"))?;
        let (qk_head_dim, v_head_dim) = match (opt("attention.key_length_mla"), opt("attention.value_length_mla")) {
            (Some(k), Some(v)) => (k, v),
            _ => (g.get_usize(&key("attention.key_length"))?, g.get_usize(&key("attention.value_length"))?),
        };
        let qk_nope_head_dim = qk_head_dim
            .checked_sub(rope)
            .ok_or_else(|| file_err(format!("key length {qk_head_dim} is shorter than the rope part {rope}")))?;
        let nextn = opt("nextn_predict_layers").unwrap_or(0);
        let block_count = g.get_usize(&key("block_count"))?;
        let num_layers = block_count
            .checked_sub(nextn)
            .ok_or_else(|| file_err(format!("nextn_predict_layers {nextn} exceeds block_count {block_count}")))?;
        let vocab_size = match opt("vocab_size") {
            Some(v) => v,
            None => g.get("tokenizer.ggml.tokens").and_then(|t| t.as_array()).map_or(0, |a| a.len()),
        };
        // llama.cpp: 1 softmax, 2 sigmoid; GLM-4.7-Flash files omit the key and llama.cpp
        // infers sigmoid from their shape (47 layers, vocabulary 154880).
        let gating_func =
            opt("expert_gating_func").unwrap_or(if vocab_size == 154880 && num_layers == 47 { 2 } else { 1 });
        if gating_func != 2 {
            return Err(file_err(format!(
                "expert_gating_func {gating_func}: only sigmoid (2) routing is supported for deepseek2 (DeepSeek-V3, GLM-4.7-Flash)"
            )));
        }
        let rms_norm_eps =
            g.get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .ok_or_else(|| file_err("missing attention.layer_norm_rms_epsilon".into()))? as f32;
        let first_dense = opt("leading_dense_block_count").unwrap_or(0);
        let moe_inter = g.get_usize(&key("expert_feed_forward_length"))?;
        let moe = MoeConfig {
            num_experts: g.get_usize(&key("expert_count"))?,
            top_k: g.get_usize(&key("expert_used_count"))?,
            moe_intermediate_size: moe_inter,
            norm_topk_prob: g.get(&key("expert_weights_norm")).and_then(|v| v.as_bool()).unwrap_or(false),
            gating: Gating::SigmoidGrouped {
                n_group: opt("expert_group_count").unwrap_or(1).max(1),
                topk_group: opt("expert_group_used_count").unwrap_or(1).max(1),
                routed_scaling_factor: g.get(&key("expert_weights_scale")).and_then(|v| v.as_f64()).unwrap_or(1.0)
                    as f32,
            },
            shared_intermediate_size: moe_inter * opt("expert_shared_count").unwrap_or(0),
            shared_expert_gate: false,
            sparse_layers: (0..num_layers).map(|i| i >= first_dense).collect(),
        };
        if let Some(t) = g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            if t != "none" {
                return Err(file_err(format!("rope scaling {t:?} is not supported")));
            }
        }
        let config = ModelConfig {
            arch: Arch::Glm4MoeLite,
            arch_name: "deepseek2".into(),
            vocab_size,
            hidden_size: g.get_usize(&key("embedding_length"))?,
            intermediate_size: opt("feed_forward_length").unwrap_or(moe_inter),
            num_layers,
            num_heads,
            num_kv_heads: num_heads,
            head_dim: qk_head_dim,
            rms_norm_eps,
            rope_theta: g.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0) as f32,
            // llama.cpp rotates adjacent pairs for deepseek2 and its converter does not permute.
            rope_layout: RopeLayout::Interleaved,
            max_position_embeddings: opt("context_length").unwrap_or(2048),
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            moe: Some(moe),
            mla: Some(MlaConfig {
                q_lora_rank: opt("attention.q_lora_rank"),
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim: rope,
                v_head_dim,
                latent_norm_eps: rms_norm_eps,
            }),
            num_nextn_predict_layers: nextn,
            sliding_window: vec![None; num_layers],
            rotary_dim: rope,
            attn_output_gate: false,
            zero_centred_norms: false,
            linear_attn: None,
            mrope_section: None,
            vision: None,
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
        if self.mla.is_some() && self.sliding_window.iter().any(Option::is_some) {
            return Err(cfg("sliding-window layers with multi-head latent attention are not supported"));
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
        if self.mla.is_none()
            && (self.rotary_dim == 0 || self.rotary_dim > self.head_dim || !self.rotary_dim.is_multiple_of(2))
        {
            return Err(cfg(format!(
                "the rotary part of each head ({} of head_dim {}) must be even and in 2..=head_dim",
                self.rotary_dim, self.head_dim
            )));
        }
        if let Some(la) = &self.linear_attn {
            let dims = [la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim];
            if dims.contains(&0) || !la.num_value_heads.is_multiple_of(la.num_key_heads) {
                return Err(cfg(format!(
                    "linear attention with {} key heads of {} and {} value heads of {}: need positive sizes and \
                     value heads a multiple of key heads",
                    la.num_key_heads, la.key_head_dim, la.num_value_heads, la.value_head_dim
                )));
            }
            if !(2..=8).contains(&la.conv_kernel) {
                return Err(cfg(format!("linear_conv_kernel_dim {} (supported: 2 to 8)", la.conv_kernel)));
            }
            if la.layers.len() != self.num_layers {
                return Err(cfg("linear attention layer list does not match num_hidden_layers"));
            }
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(cfg("rms_norm_eps and rope_theta must be positive"));
        }
        if let Some(m) = &self.moe {
            if m.num_experts == 0 || m.top_k == 0 || m.top_k > m.num_experts || m.moe_intermediate_size == 0 {
                return Err(cfg(format!(
                    "{} experts, {} per token, moe_intermediate_size {}: need 0 < per token <= experts and a \
                     positive width",
                    m.num_experts, m.top_k, m.moe_intermediate_size
                )));
            }
            if m.sparse_layers.len() != self.num_layers {
                return Err(cfg("sparse layer list does not match num_hidden_layers"));
            }
            if let Gating::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } = m.gating {
                if n_group == 0 || !m.num_experts.is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
                    return Err(cfg(format!(
                        "n_group {n_group}, topk_group {topk_group}: need n_group to divide {} experts and \
                         0 < topk_group <= n_group",
                        m.num_experts
                    )));
                }
                if m.top_k > topk_group * (m.num_experts / n_group) {
                    return Err(cfg(format!("{} experts per token do not fit in {topk_group} groups", m.top_k)));
                }
                if !routed_scaling_factor.is_finite() {
                    return Err(cfg("routed_scaling_factor must be a finite number"));
                }
                // Each group scores as the sum of its two best experts.
                if m.num_experts / n_group < 2 && n_group > 1 {
                    return Err(cfg("grouped routing needs at least two experts per group"));
                }
            }
        }
        if let Some(a) = &self.mla {
            if a.kv_lora_rank == 0 || a.qk_rope_head_dim == 0 || a.v_head_dim == 0 || a.q_lora_rank == Some(0) {
                return Err(cfg("kv_lora_rank, qk_rope_head_dim, v_head_dim and q_lora_rank must be positive"));
            }
            if !a.qk_rope_head_dim.is_multiple_of(2) {
                return Err(cfg(format!("qk_rope_head_dim {} must be even for RoPE", a.qk_rope_head_dim)));
            }
            if self.num_kv_heads != self.num_heads {
                return Err(cfg("latent attention needs num_key_value_heads == num_attention_heads"));
            }
        }
        Ok(())
    }

    /// Layer `i`'s feed-forward is a mixture of experts.
    pub fn is_sparse_layer(&self, i: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.sparse_layers.get(i).copied().unwrap_or(false))
    }

    /// Number of parameters (embedding counted once when tied; MTP layers not counted).
    pub fn num_params(&self) -> usize {
        self.count_params(false)
    }

    /// Parameters one token computes with: only its routed experts of each mixture.
    pub fn num_active_params(&self) -> usize {
        self.count_params(true)
    }

    fn count_params(&self, active_only: bool) -> usize {
        let (h, q, kv) = (self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let attn = match &self.mla {
            None => {
                h * q
                    + 2 * h * kv
                    + q * h
                    + if self.qkv_bias { q + 2 * kv } else { 0 }
                    + if self.qk_norm { 2 * self.head_dim } else { 0 }
            }
            Some(a) => {
                let nh = self.num_heads;
                let q_part = match a.q_lora_rank {
                    Some(r) => h * r + r + r * nh * a.qk_head_dim(),
                    None => h * nh * a.qk_head_dim(),
                };
                q_part
                    + h * a.cache_width()
                    + a.kv_lora_rank
                    + a.kv_lora_rank * nh * (a.qk_nope_head_dim + a.v_head_dim)
                    + nh * a.v_head_dim * h
            }
        };
        let dense_mlp = 3 * h * self.intermediate_size;
        let layers: usize = (0..self.num_layers)
            .map(|i| {
                let ffn = match &self.moe {
                    Some(m) if self.is_sparse_layer(i) => {
                        let experts = if active_only { m.top_k } else { m.num_experts };
                        m.num_experts * h
                            + if matches!(m.gating, Gating::SigmoidGrouped { .. }) { m.num_experts } else { 0 }
                            + experts * 3 * h * m.moe_intermediate_size
                            + 3 * h * m.shared_intermediate_size
                    }
                    _ => dense_mlp,
                };
                attn + ffn + 2 * h
            })
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        // The vision tower runs once per image, not per token.
        let vision = if active_only { 0 } else { self.vision.as_ref().map_or(0, VisionConfig::num_params) };
        self.vocab_size * h + layers + h + head + vision
    }
}

fn cfg(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}
