//! Random-weight checkpoints at real shapes, for benchmarking without downloads.
//!
//! [`write_random_checkpoint`] reads a Hugging Face `config.json` of a supported model (dense,
//! Qwen3-MoE, GLM-4.7-Flash) and writes every tensor the model takes, filled with seeded
//! random numbers:
//!
//! - matrices (routers included) uniform in `±sqrt(3 / fan_in)` (fan_in = columns), so a
//!   matrix times a unit-variance vector gives unit-variance outputs and activations stay
//!   finite through any number of layers;
//! - biases (and the sigmoid routers' `e_score_correction_bias`) uniform in `±0.02`; norm
//!   weights 1.0.
//!
//! Mixtures of experts get every expert (`mlp.experts.{e}.*`), the shared expert and, per
//! `sparse_layers`, dense layers. Multi-token-prediction layers (`num_nextn_predict_layers`)
//! are not written unless asked for ([`write_random_checkpoint_with`], `pio synth --mtp`:
//! GLM-4.7-Flash's one): the directory keeps `config.json` as it is (the loader skips MTP
//! layers unless told to load them), and GGUF files say `nextn_predict_layers` 0 (1 with the
//! layer, which llama.cpp's `deepseek2` loader does not take).
//!
//! Each tensor's numbers depend only on the seed and its Hugging Face name, so the same seed
//! gives the same model as a Hugging Face directory and as GGUF in a float type (llama q/k rows
//! are permuted for GGUF as llama.cpp's `convert_hf_to_gguf.py` does, experts are stacked, MLA's
//! `kv_b_proj` is split per head into `attn_k_b`/`attn_v_b`, and biases and routers are rounded
//! to the matrices' type before they are stored as F32, so both compute the same function).
//!
//! Outputs ([`SynthFormat`], chosen from the path):
//!
//! - a directory: `config.json` (copied), `model.safetensors` (BF16, F16 or F32),
//!   `generation_config.json` (bos and eos from the config) and the tokenizer files of
//!   `tokenizer_dir`;
//! - a `.gguf` file loadable by llama.cpp: the hyper-parameters its loader reads, matrices in
//!   the chosen type — a float type, or a block format (Q4_K, Q8_0, ...) with each matrix
//!   typed as `pio quantize` types it, generated in f32 and encoded, so that a 30B model need
//!   never exist in BF16 — routers and 1-D tensors in F32, and (with `tokenizer_dir`) the
//!   tokenizer as `convert_hf_to_gguf.py` writes a gpt2-style byte-level BPE vocabulary.
//!
//! Numbers are generated in chunks of [`CHUNK`] values, each from its own splitmix64 stream,
//! on all cores, and converted to the stored type chunk by chunk: no f32 copy of the model is
//! made, and at most one tensor's bytes (one expert stack) are in memory at a time.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pio_kernels::{quant, DType};
use serde_json::Value as Json;

use crate::config::{Arch, Gating, ModelConfig};
use crate::mmproj;
use crate::weights::gguf::{write_gguf_with, TensorHeader, Value};
use crate::weights::names::{hf_expert_to_gguf, hf_to_gguf};
use crate::{Error, Result};

/// What [`write_random_checkpoint`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    /// A Hugging Face model directory (`config.json` + `model.safetensors` + tokenizer).
    HfDir,
    /// One GGUF file.
    Gguf,
}

impl SynthFormat {
    /// `Gguf` when `out` ends in `.gguf` (any case), else `HfDir`.
    pub fn from_path(out: &Path) -> SynthFormat {
        match out.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("gguf") => SynthFormat::Gguf,
            _ => SynthFormat::HfDir,
        }
    }
}

/// Writes a random-weight checkpoint of the model `config_path` describes to `out` (a
/// directory, or a GGUF file when `out` ends in `.gguf`), with matrices stored as `dtype` and
/// numbers drawn from `seed`. A directory takes BF16, F16 or F32; a GGUF file also any block
/// format GGUF has a type for (Q4_K, Q8_0, ...), each matrix then getting the format
/// [`crate::quantize::tensor_type`] gives it, as `pio quantize` would. `tokenizer_dir` (with
/// `tokenizer.json`, optionally `tokenizer_config.json` and `chat_template.jinja`) is shipped
/// with the model.
pub fn write_random_checkpoint(
    config_path: &Path,
    tokenizer_dir: Option<&Path>,
    out: &Path,
    dtype: DType,
    seed: u64,
) -> Result<()> {
    write_random_checkpoint_with(config_path, tokenizer_dir, out, dtype, seed, false)
}

/// [`write_random_checkpoint`], with a multi-token-prediction layer when `mtp` (GLM-4.7-Flash,
/// whose config must say `num_nextn_predict_layers` >= 1): `model.layers.{N}` (`blk.N.nextn.*`
/// and the layer's usual names in GGUF, `nextn_predict_layers` 1), as the released checkpoint
/// has it. llama.cpp's `deepseek2` loader does not take such a file.
pub fn write_random_checkpoint_with(
    config_path: &Path,
    tokenizer_dir: Option<&Path>,
    out: &Path,
    dtype: DType,
    seed: u64,
    mtp: bool,
) -> Result<()> {
    let format = SynthFormat::from_path(out);
    match format {
        SynthFormat::HfDir if !is_float(dtype) => {
            return Err(Error::file(
                out,
                format!(
                    "cannot write {dtype} weights to a Hugging Face directory: only BF16, F16 and F32 \
                     (block formats only to a .gguf file)"
                ),
            ))
        }
        SynthFormat::Gguf if dtype.ggml_id().is_none() => {
            return Err(Error::file(out, format!("cannot write {dtype} weights: GGUF has no type for {dtype}")))
        }
        _ => {}
    }
    let config = ModelConfig::from_hf_file(config_path)?;
    let raw_config = read_json(config_path)?;
    let tokenizer = tokenizer_dir.map(TokenizerFiles::read).transpose()?;
    if let Some(t) = &tokenizer {
        t.check_fits(config.vocab_size)?;
    }
    let mtp_ok = match config.arch {
        Arch::Glm4MoeLite => config.num_nextn_predict_layers > 0,
        Arch::Qwen3Next => true,
        _ => false,
    };
    if mtp && !mtp_ok {
        return Err(Error::file(
            config_path,
            "a multi-token-prediction layer is written for Qwen3-Next, and for GLM-4.7-Flash configs with \
             num_nextn_predict_layers >= 1, only",
        ));
    }
    let specs = tensor_specs(&config, mtp);
    match format {
        SynthFormat::HfDir => write_hf_dir(config_path, &raw_config, tokenizer.as_ref(), &specs, out, dtype, seed),
        SynthFormat::Gguf => {
            let name = format!("{} (random weights)", model_name(config_path, &config));
            let file_type = crate::quantize::llama_file_type(dtype);
            let mut metadata = gguf_metadata(config_path, &config, &raw_config, tokenizer.as_ref(), &name, file_type)?;
            if mtp {
                let arch = gguf_arch(&config);
                for (key, value) in &mut metadata {
                    if *key == format!("{arch}.block_count") {
                        *value = Value::U32(u32::try_from(config.num_layers + 1).unwrap_or(u32::MAX));
                    }
                }
                let key = format!("{arch}.nextn_predict_layers");
                metadata.retain(|(k, _)| *k != key);
                metadata.push((key, Value::U32(1)));
            }
            let (vision, text): (Vec<Spec>, Vec<Spec>) =
                specs.into_iter().partition(|s| s.name.starts_with("model.visual."));
            write_gguf_file(out, &metadata, &config, &text, dtype, seed)?;
            if let Some(v) = &config.vision {
                let processor = crate::image::ImageProcessorConfig::from_json(
                    &processor_json(config_path, &raw_config)?.to_string(),
                )?;
                write_mmproj(&mmproj::default_path(out), v, &processor, &name, &vision, dtype, seed)?;
            }
            Ok(())
        }
    }
}

/// The metadata of a GGUF file holding the Hugging Face model whose `config.json` is
/// `config_path`, as `convert_hf_to_gguf.py` writes it: `general.*` (with `general.name` =
/// `name` and `general.file_type` = `file_type`, a `llama_ftype`), the `{arch}.*`
/// hyper-parameters, and the tokenizer of `tokenizer_dir` (`tokenizer.ggml.model = "none"`
/// without one). `pio quantize` writes these too.
pub fn hf_gguf_metadata(
    config_path: &Path,
    tokenizer_dir: Option<&Path>,
    name: &str,
    file_type: u32,
) -> Result<Vec<(String, Value)>> {
    let config = ModelConfig::from_hf_file(config_path)?;
    let raw_config = read_json(config_path)?;
    let tokenizer = tokenizer_dir.map(TokenizerFiles::read).transpose()?;
    if let Some(t) = &tokenizer {
        t.check_fits(config.vocab_size)?;
    }
    gguf_metadata(config_path, &config, &raw_config, tokenizer.as_ref(), name, file_type)
}

fn gguf_metadata(
    config_path: &Path,
    c: &ModelConfig,
    raw_config: &Json,
    tokenizer: Option<&TokenizerFiles>,
    name: &str,
    file_type: u32,
) -> Result<Vec<(String, Value)>> {
    if let Some(why) = gguf_unsupported(c) {
        return Err(Error::file(config_path, why));
    }
    let mut metadata = model_metadata(c, name, file_type);
    match tokenizer {
        Some(t) => metadata.extend(t.gguf_metadata(c, raw_config)?),
        None => metadata.push(("tokenizer.ggml.model".into(), Value::String("none".into()))),
    }
    Ok(metadata)
}

/// The model's name for `general.name`: the directory holding its config, else the
/// architecture.
pub(crate) fn model_name(config_path: &Path, c: &ModelConfig) -> String {
    config_path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| c.arch_name.clone())
}

// ---------------------------------------------------------------------------------------------
// Tensors and their numbers.

/// How a tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    /// Uniform in ±sqrt(3 / fan-in), the fan-in being every dimension after the first.
    Matrix,
    /// Uniform in ±[`BIAS_BOUND`].
    Bias,
    /// All 1.0.
    Norm,
    /// All 0.0: a unit scale for a zero-centred norm (`(1 + w)`, Qwen3-Next).
    ZeroNorm,
}

const BIAS_BOUND: f32 = 0.02;

/// Values per random stream; also the unit of work of a thread.
const CHUNK: usize = 1 << 16;

/// One tensor of the model, by Hugging Face name, shape outermost first.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl Spec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor `DecoderModel::load` takes for `c`, in load order: experts one matrix each
/// (`mlp.experts.{e}.*`), latent attention with the unsplit `kv_b_proj`; no multi-token
/// prediction layers.
fn tensor_specs(c: &ModelConfig, mtp: bool) -> Vec<Spec> {
    let h = c.hidden_size;
    // Qwen3-Next's norms scale by `1 + w`.
    let norm = if c.zero_centred_norms { Init::ZeroNorm } else { Init::Norm };
    let mut specs =
        vec![Spec { name: "model.embed_tokens.weight".into(), shape: vec![c.vocab_size, h], init: Init::Matrix }];
    for i in 0..c.num_layers {
        let linear = c.linear_attn.as_ref().filter(|la| la.layers[i]);
        specs.extend(layer_specs(c, i, linear, c.is_sparse_layer(i)));
    }
    if mtp {
        // One multi-token-prediction layer after the decoder layers, of the last layer's kind.
        let i = c.num_layers;
        specs.extend(layer_specs(c, i, None, i > 0 && c.is_sparse_layer(i - 1)));
        for (name, shape, init) in [
            ("enorm.weight", vec![h], norm),
            ("hnorm.weight", vec![h], norm),
            ("eh_proj.weight", vec![h, 2 * h], Init::Matrix),
            ("shared_head.norm.weight", vec![h], norm),
        ] {
            specs.push(Spec { name: format!("model.layers.{i}.{name}"), shape, init });
        }
    }
    specs.push(Spec { name: "model.norm.weight".into(), shape: vec![h], init: norm });
    if let Some(v) = &c.vision {
        // A vision-language checkpoint: the text model under `model.language_model`, the tower
        // under `model.visual`.
        for s in &mut specs {
            s.name = s.name.replacen("model.", "model.language_model.", 1);
        }
        specs.extend(vision_specs(v));
    }
    if !c.tie_word_embeddings {
        specs.push(Spec { name: "lm_head.weight".into(), shape: vec![c.vocab_size, h], init: Init::Matrix });
    }
    specs
}

/// The name a Hugging Face checkpoint stores tensor `name` under: Qwen3-Next keeps its MTP
/// layer (layer `num_layers` here, as in GGUF) under `mtp.*`. The numbers still come from
/// `name`, so both formats hold the same model.
fn hf_stored_name(c: &ModelConfig, name: &str) -> String {
    if c.arch == Arch::Qwen3Next {
        let n = c.num_layers;
        for (from, to) in [
            (format!("model.layers.{n}.eh_proj."), "mtp.fc."),
            (format!("model.layers.{n}.enorm."), "mtp.pre_fc_norm_embedding."),
            (format!("model.layers.{n}.hnorm."), "mtp.pre_fc_norm_hidden."),
            (format!("model.layers.{n}.shared_head.norm."), "mtp.norm."),
            (format!("model.layers.{n}."), "mtp.layers.0."),
        ] {
            if let Some(rest) = name.strip_prefix(&from) {
                return format!("{to}{rest}");
            }
        }
    }
    name.to_string()
}

/// The tensors of decoder layer `i` (`linear`: its Gated DeltaNet config, if it is one;
/// `sparse`: a mixture of experts).
fn layer_specs(c: &ModelConfig, i: usize, linear: Option<&crate::config::LinearAttnConfig>, sparse: bool) -> Vec<Spec> {
    let (h, inter) = (c.hidden_size, c.intermediate_size);
    let norm = if c.zero_centred_norms { Init::ZeroNorm } else { Init::Norm };
    {
        let p = format!("model.layers.{i}");
        let mut layer: Vec<(String, Vec<usize>, Init)> = Vec::new();
        let mut push = |name: &str, shape: Vec<usize>, init| layer.push((name.to_string(), shape, init));
        push("input_layernorm.weight", vec![h], norm);
        match (&c.mla, linear) {
            (_, Some(la)) => {
                let (nk, nv, dk, dv) = (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim);
                push("linear_attn.in_proj_qkvz.weight", vec![2 * nk * dk + 2 * nv * dv, h], Init::Matrix);
                push("linear_attn.in_proj_ba.weight", vec![2 * nv, h], Init::Matrix);
                push("linear_attn.conv1d.weight", vec![la.conv_channels(), 1, la.conv_kernel], Init::Matrix);
                push("linear_attn.dt_bias", vec![nv], Init::Bias);
                push("linear_attn.A_log", vec![nv], Init::Bias);
                push("linear_attn.norm.weight", vec![dv], Init::Norm);
                push("linear_attn.out_proj.weight", vec![h, nv * dv], Init::Matrix);
            }
            (None, None) => {
                let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
                let q_rows = if c.attn_output_gate { 2 * q } else { q };
                for (proj, rows, cols, bias) in [
                    ("self_attn.q_proj", q_rows, h, c.qkv_bias),
                    ("self_attn.k_proj", kv, h, c.qkv_bias),
                    ("self_attn.v_proj", kv, h, c.qkv_bias),
                    ("self_attn.o_proj", h, q, c.o_bias),
                ] {
                    push(&format!("{proj}.weight"), vec![rows, cols], Init::Matrix);
                    if bias {
                        push(&format!("{proj}.bias"), vec![rows], Init::Bias);
                    }
                }
                if c.qk_norm {
                    push("self_attn.q_norm.weight", vec![c.head_dim], norm);
                    push("self_attn.k_norm.weight", vec![c.head_dim], norm);
                }
            }
            (Some(a), None) => {
                let (nh, r) = (c.num_heads, a.kv_lora_rank);
                match a.q_lora_rank {
                    Some(ql) => {
                        push("self_attn.q_a_proj.weight", vec![ql, h], Init::Matrix);
                        if c.qkv_bias {
                            push("self_attn.q_a_proj.bias", vec![ql], Init::Bias);
                        }
                        push("self_attn.q_a_layernorm.weight", vec![ql], Init::Norm);
                        push("self_attn.q_b_proj.weight", vec![nh * a.qk_head_dim(), ql], Init::Matrix);
                    }
                    None => push("self_attn.q_proj.weight", vec![nh * a.qk_head_dim(), h], Init::Matrix),
                }
                push("self_attn.kv_a_proj_with_mqa.weight", vec![a.cache_width(), h], Init::Matrix);
                if c.qkv_bias {
                    push("self_attn.kv_a_proj_with_mqa.bias", vec![a.cache_width()], Init::Bias);
                }
                push("self_attn.kv_a_layernorm.weight", vec![r], Init::Norm);
                push("self_attn.kv_b_proj.weight", vec![nh * (a.qk_nope_head_dim + a.v_head_dim), r], Init::Matrix);
                push("self_attn.o_proj.weight", vec![h, nh * a.v_head_dim], Init::Matrix);
                if c.o_bias {
                    push("self_attn.o_proj.bias", vec![h], Init::Bias);
                }
            }
        }
        push("post_attention_layernorm.weight", vec![h], norm);
        let mlp = |push: &mut dyn FnMut(&str, Vec<usize>, Init), prefix: &str, inter: usize, bias: bool| {
            for (proj, rows, cols) in [("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)] {
                push(&format!("{prefix}.{proj}.weight"), vec![rows, cols], Init::Matrix);
                if bias {
                    push(&format!("{prefix}.{proj}.bias"), vec![rows], Init::Bias);
                }
            }
        };
        match &c.moe {
            Some(m) if sparse => {
                push("mlp.gate.weight", vec![m.num_experts, h], Init::Matrix);
                if matches!(m.gating, Gating::SigmoidGrouped { .. }) {
                    push("mlp.gate.e_score_correction_bias", vec![m.num_experts], Init::Bias);
                }
                for e in 0..m.num_experts {
                    mlp(&mut push, &format!("mlp.experts.{e}"), m.moe_intermediate_size, false);
                }
                if m.shared_intermediate_size > 0 && m.shared_expert_gate {
                    mlp(&mut push, "mlp.shared_expert", m.shared_intermediate_size, false);
                    push("mlp.shared_expert_gate.weight", vec![1, h], Init::Matrix);
                } else if m.shared_intermediate_size > 0 {
                    mlp(&mut push, "mlp.shared_experts", m.shared_intermediate_size, false);
                }
            }
            _ => mlp(&mut push, "mlp", inter, c.mlp_bias),
        }
        layer.into_iter().map(|(name, shape, init)| Spec { name: format!("{p}.{name}"), shape, init }).collect()
    }
}

/// The tensors of a Qwen3-VL vision tower (`model.visual.*`), as `VisionEncoder::load` takes them.
fn vision_specs(v: &crate::config::VisionConfig) -> Vec<Spec> {
    let (h, wide) = (v.hidden_size, v.hidden_size * v.merge_unit());
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init| out.push(Spec { name, shape, init });
    let p = "model.visual";
    let conv = vec![h, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size];
    push(format!("{p}.patch_embed.proj.weight"), conv, Init::Matrix);
    push(format!("{p}.patch_embed.proj.bias"), vec![h], Init::Bias);
    push(format!("{p}.pos_embed.weight"), vec![v.num_position_embeddings, h], Init::Matrix);
    let linear = |push: &mut dyn FnMut(String, Vec<usize>, Init), name: String, rows: usize, cols: usize| {
        push(format!("{name}.weight"), vec![rows, cols], Init::Matrix);
        push(format!("{name}.bias"), vec![rows], Init::Bias);
    };
    let layer_norm = |push: &mut dyn FnMut(String, Vec<usize>, Init), name: String, dim: usize| {
        push(format!("{name}.weight"), vec![dim], Init::Norm);
        push(format!("{name}.bias"), vec![dim], Init::Bias);
    };
    for i in 0..v.depth {
        let b = format!("{p}.blocks.{i}");
        layer_norm(&mut push, format!("{b}.norm1"), h);
        linear(&mut push, format!("{b}.attn.qkv"), 3 * h, h);
        linear(&mut push, format!("{b}.attn.proj"), h, h);
        layer_norm(&mut push, format!("{b}.norm2"), h);
        linear(&mut push, format!("{b}.mlp.linear_fc1"), v.intermediate_size, h);
        linear(&mut push, format!("{b}.mlp.linear_fc2"), h, v.intermediate_size);
    }
    let mergers = std::iter::once((format!("{p}.merger"), h))
        .chain((0..v.deepstack_visual_indexes.len()).map(|k| (format!("{p}.deepstack_merger_list.{k}"), wide)));
    for (m, norm) in mergers {
        layer_norm(&mut push, format!("{m}.norm"), norm);
        linear(&mut push, format!("{m}.linear_fc1"), wide, wide);
        linear(&mut push, format!("{m}.linear_fc2"), v.out_hidden_size, wide);
    }
    out
}

/// splitmix64: one step of the stream whose state is `state`.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of tensor `name`'s numbers: the run's seed mixed with the name's FNV-1a hash.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    let mut s = seed ^ h.rotate_left(17);
    splitmix64(&mut s)
}

/// Fills `dst` with uniform values in `±bound` from the stream of chunk `chunk` of a tensor.
fn fill_uniform(tseed: u64, chunk: usize, bound: f32, dst: &mut [f32]) {
    let mut state = tseed ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    splitmix64(&mut state);
    // 24 random bits per value: u in [0, 1) exactly representable, then scaled to ±bound.
    let scale = 2.0 * bound / (1u32 << 24) as f32;
    let mut pairs = dst.chunks_exact_mut(2);
    for pair in &mut pairs {
        let r = splitmix64(&mut state);
        pair[0] = ((r >> 40) as u32) as f32 * scale - bound;
        pair[1] = (((r >> 8) & 0xFF_FFFF) as u32) as f32 * scale - bound;
    }
    if let [last] = pairs.into_remainder() {
        *last = ((splitmix64(&mut state) >> 40) as u32) as f32 * scale - bound;
    }
}

/// Bytes of a tensor of `shape` stored as `dtype` (its rows whole blocks).
fn encoded_len(shape: &[usize], dtype: DType) -> usize {
    let cols = shape.last().copied().unwrap_or(1);
    let rb = dtype.row_bytes(cols).unwrap_or_else(|| panic!("{dtype} cannot hold rows of {cols}"));
    rb * shape.iter().rev().skip(1).product::<usize>()
}

/// The bytes of tensor `spec` stored as `dtype`, rows in Hugging Face order.
fn tensor_bytes(spec: &Spec, dtype: DType, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; encoded_len(&spec.shape, dtype)];
    fill_tensor(spec, dtype, seed, &mut out);
    out
}

/// Writes tensor `spec` stored as `dtype` into `out` (exactly its encoded length). Values are
/// generated [`CHUNK`] at a time and encoded chunk by chunk; as every chunk starts on a block
/// boundary (`CHUNK` is a multiple of every block) and rows are whole blocks, a block format
/// gets the bytes it would get from encoding the f32 tensor row by row.
fn fill_tensor(spec: &Spec, dtype: DType, seed: u64, out: &mut [u8]) {
    let n = spec.numel();
    debug_assert_eq!(out.len(), encoded_len(&spec.shape, dtype));
    let bound = match spec.init {
        Init::Norm | Init::ZeroNorm => {
            let v = vec![if matches!(spec.init, Init::Norm) { 1.0f32 } else { 0.0 }; n];
            quant::quantize_row(dtype, &v, out);
            return;
        }
        Init::Bias => BIAS_BOUND,
        Init::Matrix => (3.0 / spec.shape.iter().skip(1).product::<usize>().max(1) as f64).sqrt() as f32,
    };
    let (block_elems, block_bytes) = (dtype.block_elems(), dtype.block_bytes());
    let chunk_bytes = CHUNK / block_elems * block_bytes;
    let tseed = tensor_seed(seed, &spec.name);
    let chunks: Vec<(usize, &mut [u8])> = out.chunks_mut(chunk_bytes).enumerate().collect();
    let fill = |group: Vec<(usize, &mut [u8])>| {
        let mut vals = vec![0f32; CHUNK];
        for (i, bytes) in group {
            let vals = &mut vals[..bytes.len() / block_bytes * block_elems];
            fill_uniform(tseed, i, bound, vals);
            quant::quantize_row(dtype, vals, bytes);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(chunks.len() / 4).max(1);
    if threads == 1 {
        fill(chunks);
        return;
    }
    let per = chunks.len().div_ceil(threads);
    let mut groups: Vec<Vec<(usize, &mut [u8])>> = Vec::with_capacity(threads);
    for c in chunks {
        match groups.last_mut() {
            Some(g) if g.len() < per => g.push(c),
            _ => groups.push(vec![c]),
        }
    }
    std::thread::scope(|s| {
        for g in groups {
            s.spawn(|| fill(g));
        }
    });
}

/// Permutes the rows of a q or k projection (weight or bias) so that each head's rotation
/// pairs are adjacent, as `convert_hf_to_gguf.py` does for llama: row `h*hd + 2j + i` of the
/// result is row `h*hd + i*hd/2 + j` of `data`.
pub(crate) fn permute_rows(data: &[u8], rows: usize, head_dim: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows.max(1);
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for (r, dst) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (head, k) = (r / head_dim, r % head_dim);
        let src = head * head_dim + (k % 2) * half + k / 2;
        dst.copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directory.

fn safetensors_dtype(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    }
}

/// A tensor whose bytes are generated when the safetensors writer asks for them.
struct LazyTensor<'a> {
    spec: &'a Spec,
    dtype: DType,
    seed: u64,
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors_dtype(self.dtype)
    }

    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(tensor_bytes(self.spec, self.dtype, self.seed))
    }

    fn data_len(&self) -> usize {
        self.spec.numel() * self.dtype.block_bytes()
    }
}

fn write_hf_dir(
    config_path: &Path,
    raw_config: &Json,
    tokenizer: Option<&TokenizerFiles>,
    specs: &[Spec],
    out: &Path,
    dtype: DType,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    copy_file(config_path, &out.join("config.json"))?;
    if raw_config.get("vision_config").is_some() {
        let (src, dst) = (config_path.with_file_name("preprocessor_config.json"), out.join("preprocessor_config.json"));
        if src.is_file() {
            copy_file(&src, &dst)?;
        } else {
            let json = processor_json(config_path, raw_config)?;
            std::fs::write(&dst, format!("{json:#}\n")).map_err(|e| Error::io(&dst, e))?;
        }
    }
    let mut gen = serde_json::Map::new();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = raw_config.get(key).filter(|v| !v.is_null()) {
            gen.insert(key.into(), v.clone());
        }
    }
    let gen_path = out.join("generation_config.json");
    let text = serde_json::to_string_pretty(&Json::Object(gen))
        .map_err(|e| Error::file(&gen_path, format!("cannot serialize: {e}")))?;
    std::fs::write(&gen_path, text + "\n").map_err(|e| Error::io(&gen_path, e))?;
    if let Some(t) = tokenizer {
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "chat_template.json",
            "special_tokens_map.json",
        ] {
            let src = t.dir.join(name);
            if src.is_file() {
                copy_file(&src, &out.join(name))?;
            }
        }
    }
    let st_path = out.join("model.safetensors");
    let c = ModelConfig::from_hf_file(config_path)?;
    let tensors = specs.iter().map(|s| (hf_stored_name(&c, &s.name), LazyTensor { spec: s, dtype, seed }));
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(tensors, Some(info), &st_path)
        .map_err(|e| Error::file(&st_path, format!("cannot write: {e}")))
}

/// The image processor's config of a vision-language model: `preprocessor_config.json` beside
/// its config, or the one Qwen3-VL ships.
fn processor_json(config_path: &Path, raw_config: &Json) -> Result<Json> {
    let src = config_path.with_file_name("preprocessor_config.json");
    if src.is_file() {
        return read_json(&src);
    }
    let v = &raw_config["vision_config"];
    Ok(serde_json::json!({
        "size": {"longest_edge": 16_777_216, "shortest_edge": 65_536},
        "patch_size": v["patch_size"],
        "temporal_patch_size": v["temporal_patch_size"],
        "merge_size": v["spatial_merge_size"],
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }))
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    std::fs::copy(src, dst).map_err(|e| Error::file(dst, format!("cannot copy {}: {e}", src.display())))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GGUF.

/// The GGUF architecture name of `c`.
pub(crate) fn gguf_arch(c: &ModelConfig) -> &'static str {
    match c.arch {
        Arch::Qwen3 => "qwen3",
        Arch::Qwen2 => "qwen2",
        Arch::Llama => "llama",
        Arch::Qwen3Moe => "qwen3moe",
        Arch::Glm4MoeLite => "deepseek2",
        Arch::Qwen3Next => "qwen3next",
        Arch::Qwen3Vl => "qwen3vl",
    }
}

/// Why llama.cpp's architecture for `c` cannot hold the model, if it cannot: its `qwen3moe`
/// graph makes every layer a mixture and always renormalizes the routing weights.
fn gguf_unsupported(c: &ModelConfig) -> Option<String> {
    if let (Some(la), Some(m)) = (&c.linear_attn, &c.moe) {
        if la.key_head_dim != la.value_head_dim {
            return Some("llama.cpp's qwen3next takes the value head width for the key head width: linear_key_head_dim and linear_value_head_dim must be equal".into());
        }
        if !m.norm_topk_prob {
            return Some("llama.cpp's qwen3next always renormalizes the routing weights: norm_topk_prob false cannot be written to GGUF".into());
        }
        if !m.sparse_layers.iter().all(|&s| s) || m.shared_intermediate_size == 0 {
            return Some("llama.cpp's qwen3next makes every layer a mixture with a shared expert".into());
        }
    }
    let m = c.moe.as_ref()?;
    match c.arch {
        Arch::Qwen3Moe if !m.sparse_layers.iter().all(|&s| s) => Some(
            "llama.cpp's qwen3moe makes every layer a mixture of experts: dense layers (mlp_only_layers, \
             decoder_sparse_step) cannot be written to GGUF"
                .into(),
        ),
        Arch::Qwen3Moe if !m.norm_topk_prob => {
            Some("llama.cpp's qwen3moe always renormalizes the routing weights: norm_topk_prob false cannot be written to GGUF".into())
        }
        Arch::Glm4MoeLite if m.sparse_layers.windows(2).any(|w| w[0] && !w[1]) => {
            Some("deepseek2 GGUF files hold dense layers only before the first sparse one".into())
        }
        _ => None,
    }
}

/// `general.*` and `{arch}.*` keys, as `convert_hf_to_gguf.py` writes them (plus
/// `general.alignment`, and `{arch}.vocab_size` for every architecture).
///
/// Mixtures of experts get `expert_count`, `expert_used_count` and
/// `expert_feed_forward_length`; `deepseek2` (GLM-4.7-Flash) gets the latent attention keys as
/// the converter writes them (`head_count_kv` 1, `key_length`/`value_length` the latent widths,
/// the per-head widths in `*_mla`), the routing keys (with `expert_gating_func` 2, sigmoid,
/// written out rather than left to llama.cpp's shape-based guess) and `nextn_predict_layers` 0:
/// no multi-token-prediction layers are written, so `block_count` is the decoder layers alone.
fn model_metadata(c: &ModelConfig, name: &str, file_type: u32) -> Vec<(String, Value)> {
    let arch = gguf_arch(c);
    let u32_of = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".to_string(), Value::String("model".into())),
        ("general.name".to_string(), Value::String(name.to_string())),
        ("general.alignment".to_string(), Value::U32(GGUF_ALIGN as u32)),
        (k("vocab_size"), u32_of(c.vocab_size)),
        (k("block_count"), u32_of(c.num_layers)),
        (k("context_length"), u32_of(c.max_position_embeddings)),
        (k("embedding_length"), u32_of(c.hidden_size)),
        (k("feed_forward_length"), u32_of(c.intermediate_size)),
        (k("attention.head_count"), u32_of(c.num_heads)),
    ];
    match &c.mla {
        None => m.extend([
            (k("attention.head_count_kv"), u32_of(c.num_kv_heads)),
            (k("rope.freq_base"), Value::F32(c.rope_theta)),
            (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps)),
            (k("attention.key_length"), u32_of(c.head_dim)),
            (k("attention.value_length"), u32_of(c.head_dim)),
        ]),
        Some(a) => {
            m.extend([
                (k("attention.head_count_kv"), u32_of(1)),
                (k("rope.freq_base"), Value::F32(c.rope_theta)),
                (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps)),
            ]);
            if let Some(ql) = a.q_lora_rank {
                m.push((k("attention.q_lora_rank"), u32_of(ql)));
            }
            m.extend([
                (k("attention.kv_lora_rank"), u32_of(a.kv_lora_rank)),
                (k("attention.key_length"), u32_of(a.cache_width())),
                (k("attention.value_length"), u32_of(a.kv_lora_rank)),
                (k("attention.key_length_mla"), u32_of(a.qk_head_dim())),
                (k("attention.value_length_mla"), u32_of(a.v_head_dim)),
                (k("rope.dimension_count"), u32_of(a.qk_rope_head_dim)),
            ]);
        }
    }
    if c.arch == Arch::Llama {
        m.push((k("rope.dimension_count"), u32_of(c.head_dim)));
    }
    if let Some(moe) = &c.moe {
        m.extend([
            (k("expert_count"), u32_of(moe.num_experts)),
            (k("expert_used_count"), u32_of(moe.top_k)),
            (k("expert_feed_forward_length"), u32_of(moe.moe_intermediate_size)),
        ]);
        if let Gating::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } = moe.gating {
            let leading_dense = moe.sparse_layers.iter().take_while(|&&s| !s).count();
            m.extend([
                (k("leading_dense_block_count"), u32_of(leading_dense)),
                (k("expert_shared_count"), u32_of(moe.shared_intermediate_size / moe.moe_intermediate_size)),
                (k("expert_weights_scale"), Value::F32(routed_scaling_factor)),
                (k("expert_weights_norm"), Value::Bool(moe.norm_topk_prob)),
                (k("expert_gating_func"), Value::U32(LLAMA_GATING_SIGMOID)),
                (k("expert_group_count"), u32_of(n_group)),
                (k("expert_group_used_count"), u32_of(topk_group)),
            ]);
        }
    }
    if c.arch == Arch::Glm4MoeLite {
        m.push((k("nextn_predict_layers"), u32_of(0)));
    }
    if let Some([t, h, w]) = c.mrope_section {
        // llama.cpp's four sections, the fourth unused by Qwen3-VL.
        let sections = [t, h, w, 0].map(|n| Value::I32(i32::try_from(n).unwrap_or(i32::MAX)));
        m.push((k("rope.dimension_sections"), Value::Array(sections.to_vec())));
        let deepstack = c.vision.as_ref().map_or(0, |v| v.deepstack_visual_indexes.len());
        m.push((k("n_deepstack_layers"), u32_of(deepstack)));
        // Ours, not llama.cpp's (which finds these tokens by name in the vocabulary): so that a
        // file without a vocabulary (a test model's) still says which tokens are the image's.
        if let Some(v) = &c.vision {
            for (key, id) in mmproj::token_keys(v) {
                m.push((k(key), Value::U32(id)));
            }
        }
    }
    if let (Some(la), Some(moe)) = (&c.linear_attn, &c.moe) {
        m.extend([
            (k("rope.dimension_count"), u32_of(c.rotary_dim)),
            (k("expert_shared_feed_forward_length"), u32_of(moe.shared_intermediate_size)),
            (k("ssm.conv_kernel"), u32_of(la.conv_kernel)),
            (k("ssm.state_size"), u32_of(la.key_head_dim)),
            (k("ssm.group_count"), u32_of(la.num_key_heads)),
            (k("ssm.time_step_rank"), u32_of(la.num_value_heads)),
            (k("ssm.inner_size"), u32_of(la.num_value_heads * la.value_head_dim)),
        ]);
        // Every n-th layer full attention, as the converter writes it; any other pattern per layer.
        match full_attention_interval(&la.layers) {
            Some(n) => m.push((k("full_attention_interval"), u32_of(n))),
            None => m.push((
                k("attention.recurrent_layers"),
                Value::Array(la.layers.iter().map(|&l| Value::Bool(l)).collect()),
            )),
        }
    }
    m.push(("general.file_type".to_string(), Value::U32(file_type)));
    m.push(("general.quantization_version".to_string(), Value::U32(2)));
    m
}

/// `n` when layer `i` is linear exactly when `(i + 1) % n != 0` (Qwen3-Next's
/// `full_attention_interval`).
fn full_attention_interval(linear: &[bool]) -> Option<usize> {
    let n = linear.iter().position(|&l| !l)? + 1;
    linear.iter().enumerate().all(|(i, &l)| l != (i + 1).is_multiple_of(n)).then_some(n)
}

/// llama.cpp's `LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID`.
const LLAMA_GATING_SIGMOID: u32 = 2;

const GGUF_ALIGN: usize = 32;

/// The file format of a matrix of the model written with matrices of `target`: a router
/// (`mlp.gate.weight`) F32 as llama.cpp keeps it, the LM head (or the embedding standing in for
/// it) and every other matrix as [`crate::quantize::tensor_type`] chooses.
pub(crate) fn matrix_type(name: &str, cols: usize, target: DType, tied: bool) -> DType {
    if is_router(name) || name.ends_with("conv1d.weight") {
        return DType::F32;
    }
    let output = name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight");
    crate::quantize::tensor_type(target, cols, output)
}

/// A mixture-of-experts router (Hugging Face name), or Qwen3-Next's shared-expert gate (a
/// router of one), which llama.cpp's converter also keeps F32.
pub(crate) fn is_router(name: &str) -> bool {
    name.ends_with("mlp.gate.weight") || name.ends_with("mlp.shared_expert_gate.weight")
}

/// llama.cpp's per-head split of a latent attention `kv_b_proj` (`[H·(nope + v), r]`, each
/// head's `nope` key rows then its `v` value rows), as `convert_hf_to_gguf.py` writes them:
/// `attn_k_b` `[H, r, nope]` (each head's key rows transposed) and `attn_v_b` `[H, v, r]` (its
/// value rows as they are).
pub(crate) fn split_kv_b(kv_b: &[f32], heads: usize, nope: usize, v: usize, r: usize) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(kv_b.len(), heads * (nope + v) * r, "kv_b_proj is not [{heads}·({nope} + {v}), {r}]");
    let mut k_b = vec![0f32; heads * r * nope];
    let mut v_b = Vec::with_capacity(heads * v * r);
    for (h, head) in kv_b.chunks_exact((nope + v) * r).enumerate() {
        let k_t = &mut k_b[h * r * nope..(h + 1) * r * nope];
        for (j, row) in head[..nope * r].chunks_exact(r).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                k_t[i * nope + j] = x;
            }
        }
        v_b.extend_from_slice(&head[nope * r..]);
    }
    (k_b, v_b)
}

/// Encodes `vals` as `dtype` (rows of `cols`), rows split across the cores.
pub(crate) fn encode_parallel(dtype: DType, vals: &[f32], cols: usize) -> Vec<u8> {
    let rb = dtype.row_bytes(cols).unwrap_or_else(|| panic!("{dtype} cannot hold rows of {cols}"));
    let rows = vals.len() / cols.max(1);
    let mut out = vec![0u8; rows * rb];
    let rows_per_task = (CHUNK / cols.max(1)).max(1);
    let chunks: Vec<std::sync::Mutex<&mut [u8]>> =
        out.chunks_mut(rows_per_task * rb.max(1)).map(std::sync::Mutex::new).collect();
    pio_kernels::parallel::for_each_task(chunks.len(), &|i| {
        let mut dst = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
        let start = i * rows_per_task * cols;
        let n = dst.len() / rb.max(1) * cols;
        quant::quantize_row(dtype, &vals[start..start + n], &mut dst);
    });
    drop(chunks);
    out
}

/// A change applied to every value of a tensor on its way into a GGUF file.
type ValueMap = fn(f32) -> f32;

/// Where a GGUF tensor's numbers come from.
enum Source<'a> {
    /// One Hugging Face tensor (rows permuted for llama's adjacent-pair RoPE when `permute`).
    One { spec: &'a Spec, permute: bool },
    /// Experts `0..` of a layer stacked: `[experts, rows, cols]`.
    Stack(Vec<&'a Spec>),
    /// The `attn_k_b` (`false`) or `attn_v_b` (`true`) half of a `kv_b_proj` split per head;
    /// `dims` = (heads, nope, v, kv_lora_rank).
    KvB { spec: &'a Spec, value: bool, dims: (usize, usize, usize, usize) },
    /// Rows of one Hugging Face matrix, these ranges in this order (Qwen3-Next's
    /// `in_proj_qkvz` split into `attn_qkv` and `attn_gate`).
    Rows { spec: &'a Spec, ranges: Vec<std::ops::Range<usize>> },
    /// One Hugging Face tensor with `map` applied to every value, stored F32 (a zero-centred
    /// norm's `1 + w`; `A_log` stored as `-exp(A_log)`).
    Map { spec: &'a Spec, map: ValueMap },
}

/// One tensor as it lies in the GGUF file.
struct GgufTensor<'a> {
    header: TensorHeader,
    source: Source<'a>,
}

/// The bytes of `spec` stored as `dtype` for a model whose matrices are `target`. With a float
/// target the numbers are those of the Hugging Face output (generated in `target`, widened
/// where stored wider: 1-D tensors and routers); with a block format each is generated in f32
/// and encoded once.
fn stored_bytes(spec: &Spec, dtype: DType, target: DType, seed: u64, out: &mut [u8]) {
    if dtype == target || !is_float(target) {
        return fill_tensor(spec, dtype, seed, out);
    }
    let data = tensor_bytes(spec, target, seed);
    let vals = quant::dequantize(target, &data, spec.numel());
    quant::quantize_row(dtype, &vals, out);
}

/// The values of `spec` as f32, as [`stored_bytes`] would generate them for `target`.
fn values_f32(spec: &Spec, target: DType, seed: u64) -> Vec<f32> {
    let gen = if is_float(target) { target } else { DType::F32 };
    quant::dequantize(gen, &tensor_bytes(spec, gen, seed), spec.numel())
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The tensors of the GGUF file for `specs`: llama.cpp names, experts fused into
/// `ffn_*_exps` stacks, `kv_b_proj` split into `attn_k_b`/`attn_v_b`, routers and 1-D tensors
/// F32, matrices as [`matrix_type`] gives them for `target`.
fn gguf_tensors<'a>(out: &Path, c: &ModelConfig, specs: &'a [Spec], target: DType) -> Result<Vec<GgufTensor<'a>>> {
    let mut tensors: Vec<GgufTensor<'a>> = Vec::with_capacity(specs.len());
    let mut stacks: HashMap<String, usize> = HashMap::new();
    for spec in specs {
        // A vision-language model's text tensors, under the names of a text model.
        let spec_name = spec.name.replacen("model.language_model.", "model.", 1);
        let dtype = match spec.shape[..] {
            [_, cols] => matrix_type(&spec_name, cols, target, c.tie_word_embeddings),
            _ => DType::F32,
        };
        if let Some((stack, e)) = hf_expert_to_gguf(&spec_name) {
            let i = *stacks.entry(stack.clone()).or_insert_with(|| {
                let [rows, cols] = spec.shape[..] else { unreachable!("experts are matrices") };
                tensors.push(GgufTensor {
                    header: TensorHeader { name: stack, dtype, shape: vec![0, rows, cols] },
                    source: Source::Stack(Vec::new()),
                });
                tensors.len() - 1
            });
            let t = &mut tensors[i];
            let Source::Stack(list) = &mut t.source else { unreachable!() };
            if list.len() != e || spec.shape[..] != t.header.shape[1..] {
                return Err(Error::file(out, format!("expert tensor {:?} is out of order", spec.name)));
            }
            list.push(spec);
            t.header.shape[0] += 1;
            continue;
        }
        if let (Some(a), Some(prefix)) = (&c.mla, spec_name.strip_suffix("kv_b_proj.weight")) {
            let (nh, r, nope, v) = (c.num_heads, a.kv_lora_rank, a.qk_nope_head_dim, a.v_head_dim);
            for (half, value, shape) in [("k_b_proj", false, vec![nh, r, nope]), ("v_b_proj", true, vec![nh, v, r])] {
                let hf = format!("{prefix}{half}.weight");
                let name = hf_to_gguf(&hf, gguf_arch(c))
                    .ok_or_else(|| Error::file(out, format!("{hf:?} has no GGUF name")))?;
                let dtype = crate::quantize::tensor_type(target, shape[2], false);
                tensors.push(GgufTensor {
                    header: TensorHeader { name, dtype, shape },
                    source: Source::KvB { spec, value, dims: (nh, nope, v, r) },
                });
            }
            continue;
        }
        if let Some(la) = c.linear_attn.as_ref() {
            // llama.cpp's qwen3next layout of Gated DeltaNet and of the zero-centred norms.
            if let Some(prefix) = spec_name.strip_suffix("in_proj_qkvz.weight") {
                let (qkv, z) = la.qkvz_split();
                let z_rows = la.num_value_heads * la.value_head_dim;
                for (half, ranges, rows) in [("in_proj_qkv", qkv, la.conv_channels()), ("in_proj_z", z, z_rows)] {
                    let hf = format!("{prefix}{half}.weight");
                    let name = hf_to_gguf(&hf, gguf_arch(c))
                        .ok_or_else(|| Error::file(out, format!("{hf:?} has no GGUF name")))?;
                    tensors.push(GgufTensor {
                        header: TensorHeader { name, dtype, shape: vec![rows, spec.shape[1]] },
                        source: Source::Rows { spec, ranges },
                    });
                }
                continue;
            }
            let map: Option<(String, ValueMap)> = if let Some(prefix) = spec_name.strip_suffix("A_log") {
                Some((format!("{prefix}ssm_a"), |x| -x.exp()))
            } else if matches!(spec.init, Init::ZeroNorm) {
                Some((spec_name.clone(), |x| 1.0 + x))
            } else {
                None
            };
            if let Some((hf, map)) = map {
                let name = hf_to_gguf(&hf, gguf_arch(c))
                    .ok_or_else(|| Error::file(out, format!("{hf:?} has no GGUF name")))?;
                tensors.push(GgufTensor {
                    header: TensorHeader { name, dtype: DType::F32, shape: spec.shape.clone() },
                    source: Source::Map { spec, map },
                });
                continue;
            }
        }
        let name = hf_to_gguf(&spec_name, gguf_arch(c)).ok_or_else(|| {
            Error::file(out, format!("tensor {:?} has no GGUF name (mlp_bias is not supported in GGUF)", spec.name))
        })?;
        let permute = c.arch == Arch::Llama
            && ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"].iter().any(|s| spec_name.ends_with(s));
        // A depthwise convolution is stored [channels, taps].
        let shape = match spec.shape[..] {
            [ch, 1, taps] if spec_name.ends_with("conv1d.weight") => vec![ch, taps],
            _ => spec.shape.clone(),
        };
        tensors.push(GgufTensor { header: TensorHeader { name, dtype, shape }, source: Source::One { spec, permute } });
    }
    Ok(tensors)
}

impl GgufTensor<'_> {
    /// The stored bytes, generated now.
    fn bytes(&self, c: &ModelConfig, target: DType, seed: u64) -> Vec<u8> {
        let dtype = self.header.dtype;
        let mut out = vec![0u8; encoded_len(&self.header.shape, dtype)];
        match &self.source {
            Source::One { spec, permute } => {
                stored_bytes(spec, dtype, target, seed, &mut out);
                if *permute {
                    out = permute_rows(&out, spec.shape[0], c.head_dim);
                }
            }
            Source::Stack(experts) => {
                let per = out.len() / experts.len().max(1);
                for (spec, dst) in experts.iter().zip(out.chunks_exact_mut(per.max(1))) {
                    stored_bytes(spec, dtype, target, seed, dst);
                }
            }
            Source::Rows { spec, ranges } => {
                let mut whole = vec![0u8; encoded_len(&spec.shape, dtype)];
                stored_bytes(spec, dtype, target, seed, &mut whole);
                let row = whole.len() / spec.shape[0].max(1);
                out.clear();
                for r in ranges {
                    out.extend_from_slice(&whole[r.start * row..r.end * row]);
                }
            }
            Source::Map { spec, map } => {
                let vals: Vec<f32> = values_f32(spec, target, seed).into_iter().map(map).collect();
                quant::quantize_row(DType::F32, &vals, &mut out);
            }
            Source::KvB { spec, value, dims: (heads, nope, v, r) } => {
                let kv_b = values_f32(spec, target, seed);
                let (k_b, v_b) = split_kv_b(&kv_b, *heads, *nope, *v, *r);
                let cols = self.header.shape[2];
                out = encode_parallel(dtype, if *value { &v_b } else { &k_b }, cols);
            }
        }
        out
    }
}

/// Writes the GGUF file, generating each tensor's bytes only when it is written (a 0.6B model
/// in BF16 is 1.2 GB, a 30B mixture in Q4_K 17 GB).
fn write_gguf_file(
    out: &Path,
    metadata: &[(String, Value)],
    c: &ModelConfig,
    specs: &[Spec],
    dtype: DType,
    seed: u64,
) -> Result<()> {
    let tensors = gguf_tensors(out, c, specs, dtype)?;
    let headers: Vec<TensorHeader> = tensors
        .iter()
        .map(|t| TensorHeader { name: t.header.name.clone(), dtype: t.header.dtype, shape: t.header.shape.clone() })
        .collect();
    create_parent(out)?;
    write_gguf_with(out, metadata, &headers, &mut |i| Cow::Owned(tensors[i].bytes(c, dtype, seed)))
}

/// Writes the vision tower `specs` of `v` as llama.cpp's mmproj file of a text model written
/// with matrices of `target` (see [`mmproj::file_type_for`]).
fn write_mmproj(
    out: &Path,
    v: &crate::config::VisionConfig,
    processor: &crate::image::ImageProcessorConfig,
    name: &str,
    specs: &[Spec],
    target: DType,
    seed: u64,
) -> Result<()> {
    let file_type = mmproj::file_type_for(target);
    let metadata = mmproj::metadata(v, processor, name, crate::quantize::llama_file_type(file_type));
    let shapes: Vec<(String, Vec<usize>)> = specs.iter().map(|s| (s.name.clone(), s.shape.clone())).collect();
    let planned = mmproj::plan(v, &shapes, file_type)?;
    let headers: Vec<TensorHeader> =
        planned.iter().map(|t| TensorHeader { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let by_name: HashMap<&str, &Spec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    create_parent(out)?;
    write_gguf_with(out, &metadata, &headers, &mut |i| {
        let t = &planned[i];
        // `plan` names only tensors of `specs`.
        let values = by_name.get(t.hf.as_str()).map_or_else(Vec::new, |spec| values_f32(spec, target, seed));
        Cow::Owned(mmproj::encode(t, &values))
    })
}

fn create_parent(out: &Path) -> Result<()> {
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => std::fs::create_dir_all(p).map_err(|e| Error::io(p, e)),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer.

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("malformed JSON: {e}")))
}

/// The tokenizer files of a directory, parsed.
struct TokenizerFiles {
    dir: PathBuf,
    json_path: PathBuf,
    /// `tokenizer.json`.
    json: Json,
    /// `tokenizer_config.json`, or `Null` when absent.
    config: Json,
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TT_NORMAL: i32 = 1;
const TT_CONTROL: i32 = 3;
const TT_USER_DEFINED: i32 = 4;
const TT_UNUSED: i32 = 5;

// Split regexes of the pre-tokenizers llama.cpp knows by name (tokenizer.json form).
const RE_QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl TokenizerFiles {
    fn read(dir: &Path) -> Result<TokenizerFiles> {
        let json_path = dir.join("tokenizer.json");
        if !json_path.is_file() {
            return Err(Error::file(&json_path, "missing: the tokenizer directory needs tokenizer.json"));
        }
        let json = read_json(&json_path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = if cfg_path.is_file() { read_json(&cfg_path)? } else { Json::Null };
        Ok(TokenizerFiles { dir: dir.to_path_buf(), json_path, json, config })
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::file(&self.json_path, msg)
    }

    /// Every token by id: the model's vocabulary and the added tokens.
    fn tokens_by_id(&self) -> Result<HashMap<usize, String>> {
        let vocab = self
            .json
            .pointer("/model/vocab")
            .and_then(Json::as_object)
            .ok_or_else(|| self.err("no model.vocab object"))?;
        let mut by_id = HashMap::with_capacity(vocab.len() + 64);
        for (tok, id) in vocab {
            let id = id.as_u64().ok_or_else(|| self.err(format!("token {tok:?} has a non-integer id {id}")))?;
            by_id.insert(id as usize, tok.clone());
        }
        for a in self.added_tokens() {
            by_id.insert(a.id, a.content.clone());
        }
        Ok(by_id)
    }

    fn added_tokens(&self) -> Vec<AddedToken> {
        let Some(list) = self.json.get("added_tokens").and_then(Json::as_array) else {
            return Vec::new();
        };
        list.iter()
            .filter_map(|a| {
                Some(AddedToken {
                    id: a.get("id")?.as_u64()? as usize,
                    content: a.get("content")?.as_str()?.to_string(),
                    special: a.get("special").and_then(Json::as_bool).unwrap_or(false),
                })
            })
            .collect()
    }

    /// Errors when a token id does not fit a model of `vocab_size` rows (as the converter does).
    fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let by_id = self.tokens_by_id()?;
        if let Some(max) = by_id.keys().max().filter(|&&m| m >= vocab_size) {
            return Err(self.err(format!(
                "token id {max} does not fit the config's vocab_size {vocab_size}: the tokenizer belongs to another model"
            )));
        }
        Ok(())
    }

    /// `tokenizer.ggml.pre` for this tokenizer: from its split rules where they are known to
    /// llama.cpp, else from the architecture.
    fn pre_name(&self, c: &ModelConfig) -> Result<&'static str> {
        let mut regexes = Vec::new();
        let mut digits = false;
        let mut byte_level_regex = false;
        let mut other = false;
        let mut stack: Vec<&Json> = self.json.get("pre_tokenizer").into_iter().collect();
        while let Some(p) = stack.pop() {
            match p.get("type").and_then(Json::as_str) {
                Some("Sequence") => {
                    stack.extend(p.get("pretokenizers").and_then(Json::as_array).into_iter().flatten().rev())
                }
                Some("Split") => match p.pointer("/pattern/Regex").and_then(Json::as_str) {
                    Some(re) => regexes.push(re),
                    None => other = true,
                },
                Some("Digits") => digits = p.get("individual_digits").and_then(Json::as_bool).unwrap_or(false),
                Some("ByteLevel") => {
                    byte_level_regex |= p.get("use_regex").and_then(Json::as_bool).unwrap_or(true);
                }
                _ => other = true,
            }
        }
        let known = match (regexes.as_slice(), digits, byte_level_regex, other) {
            ([re], false, false, false) if *re == RE_QWEN2 => Some("qwen2"),
            ([re], false, false, false) if *re == RE_QWEN35 => Some("qwen35"),
            ([re], false, false, false) if *re == RE_LLAMA3 => Some("llama-bpe"),
            ([], true, true, false) => Some("smollm"),
            ([], false, true, false) => Some("gpt2"),
            _ => None,
        };
        match (known, c.arch) {
            (Some(k), _) => Ok(k),
            (None, Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe | Arch::Qwen3Next | Arch::Qwen3Vl) => Ok("qwen2"),
            (None, Arch::Llama | Arch::Glm4MoeLite) => {
                Err(self
                    .err("pre-tokenizer not recognized (known: Qwen2, Qwen3.5, Llama 3, SmolLM and GPT-2 split rules)"))
            }
        }
    }

    /// The `tokenizer.*` keys as `convert_hf_to_gguf.py` writes them for a gpt2-style BPE
    /// vocabulary (`_set_vocab_gpt2` + `gguf.SpecialVocab`).
    fn gguf_metadata(&self, c: &ModelConfig, raw_config: &Json) -> Result<Vec<(String, Value)>> {
        let model = self.json.get("model").ok_or_else(|| self.err("no model"))?;
        let model_type = model.get("type").and_then(Json::as_str).unwrap_or("BPE");
        if model_type != "BPE" || model.get("byte_fallback").and_then(Json::as_bool).unwrap_or(false) {
            return Err(self.err(format!(
                "only byte-level BPE tokenizers (gpt2-style) can be written to GGUF, not {model_type}{}",
                if model_type == "BPE" { " with byte_fallback" } else { "" }
            )));
        }
        let pre = self.pre_name(c)?;

        // Tokens in id order, padded to vocab_size, typed as get_vocab_base does.
        let by_id = self.tokens_by_id()?;
        let added: HashMap<String, bool> = self.added_tokens().into_iter().map(|a| (a.content, a.special)).collect();
        let mut tokens = Vec::with_capacity(c.vocab_size);
        let mut types = Vec::with_capacity(c.vocab_size);
        for i in 0..c.vocab_size {
            match by_id.get(&i) {
                None => {
                    tokens.push(Value::String(format!("[PAD{i}]")));
                    types.push(Value::I32(TT_UNUSED));
                }
                Some(tok) => match added.get(tok) {
                    Some(&special) if special || looks_special(tok) => {
                        tokens.push(Value::String(tok.clone()));
                        types.push(Value::I32(TT_CONTROL));
                    }
                    Some(_) => {
                        tokens.push(Value::String(tok.replace('\u{2581}', " ")));
                        types.push(Value::I32(TT_USER_DEFINED));
                    }
                    None => {
                        tokens.push(Value::String(tok.clone()));
                        types.push(Value::I32(TT_NORMAL));
                    }
                },
            }
        }

        let merges = self.merges()?;
        let mut m = vec![
            ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ];
        if c.arch == Arch::Llama {
            if let Some(b) = self.config.get("add_prefix_space").and_then(Json::as_bool) {
                m.push(("tokenizer.ggml.add_space_prefix".to_string(), Value::Bool(b)));
            }
        }
        m.push(("tokenizer.ggml.merges".to_string(), Value::Array(merges.into_iter().map(Value::String).collect())));

        // Special tokens: tokenizer_config.json's {typ}_token among the added tokens first,
        // then config.json's {typ}_token_id.
        let added_list = self.added_tokens();
        let mut contents: HashMap<&str, String> = HashMap::new();
        for typ in SPECIAL_TYPES {
            if let Some(s) = token_content(&self.config, &format!("{typ}_token")) {
                contents.insert(typ, s);
            }
        }
        if !contents.contains_key("bos") {
            if let Some(cls) = contents.get("cls").cloned() {
                contents.insert("bos", cls);
            }
        }
        if !contents.contains_key("eos") {
            if let Some(sep) = contents.get("sep").cloned() {
                contents.insert("eos", sep);
            }
        }
        let add_flags = self.add_special_flags(&mut contents);
        let mut ids: Vec<(&str, usize)> = Vec::new();
        for typ in SPECIAL_TYPES {
            let from_tokenizer =
                contents.get(typ).and_then(|s| added_list.iter().find(|a| &a.content == s)).map(|a| a.id);
            let from_config = raw_config.get(format!("{typ}_token_id")).and_then(Json::as_u64).map(|v| v as usize);
            if let Some(id) = from_tokenizer.or(from_config).filter(|&id| id < c.vocab_size) {
                ids.push((typ, id));
            }
        }
        for (typ, id) in &ids {
            if let Some(key) = special_key(typ) {
                m.push((key.to_string(), Value::U32(*id as u32)));
            }
        }
        let has_bos = ids.iter().any(|(t, _)| *t == "bos");
        for (typ, on) in add_flags {
            // Our loader (and llama.cpp, sensibly) needs a BOS id to add one.
            let on = on && (typ != "bos" || has_bos);
            m.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(on)));
        }
        m.extend(self.chat_template_metadata()?);
        m.extend(self.normalizer_metadata());
        Ok(m)
    }

    /// `model.merges` as "a b" strings (pairs with spaces inside get them as U+0120).
    fn merges(&self) -> Result<Vec<String>> {
        let Some(list) = self.json.pointer("/model/merges").and_then(Json::as_array) else {
            return Ok(Vec::new());
        };
        list.iter()
            .enumerate()
            .map(|(i, m)| match m {
                Json::String(s) => Ok(s.clone()),
                Json::Array(pair) if pair.len() == 2 => {
                    let part = |v: &Json| v.as_str().map(|s| s.replace(' ', "\u{0120}"));
                    match (part(&pair[0]), part(&pair[1])) {
                        (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                        _ => Err(self.err(format!("merge #{i} is not a pair of strings"))),
                    }
                }
                _ => Err(self.err(format!("merge #{i} is neither a string nor a pair"))),
            })
            .collect()
    }

    /// Whether BOS/EOS/SEP are added around a sequence: the post-processor first, then
    /// `tokenizer_config.json`'s `add_{typ}_token` (as `SpecialVocab` does, simplified).
    fn add_special_flags(&self, contents: &mut HashMap<&'static str, String>) -> Vec<(&'static str, bool)> {
        let mut flags: Vec<(&'static str, bool)> = Vec::new();
        let set_default = |flags: &mut Vec<(&'static str, bool)>, typ: &'static str, v: bool| {
            if !flags.iter().any(|(t, _)| *t == typ) {
                flags.push((typ, v));
            }
        };
        let set = |flags: &mut Vec<(&'static str, bool)>, typ: &'static str, v: bool| {
            flags.retain(|(t, _)| *t != typ);
            flags.push((typ, v));
        };
        if let Some(pp) = self.json.get("post_processor").filter(|p| !p.is_null()) {
            let procs: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
                Some(list) => list.iter().collect(),
                None => vec![pp],
            };
            for p in procs {
                match p.get("type").and_then(Json::as_str) {
                    Some("ByteLevel") => {
                        set_default(&mut flags, "bos", false);
                        set_default(&mut flags, "eos", false);
                    }
                    Some("RobertaProcessing") => {
                        for typ in ["bos", "eos", "sep"] {
                            set(&mut flags, typ, true);
                        }
                    }
                    Some("TemplateProcessing") => {
                        let single = p.get("single").and_then(Json::as_array).map(Vec::as_slice).unwrap_or(&[]);
                        let special = |e: Option<&Json>| {
                            e.and_then(|e| e.pointer("/SpecialToken/id")).and_then(Json::as_str).map(str::to_string)
                        };
                        if single.len() > 1 {
                            if let Some(first) = special(single.first()) {
                                if !contents.contains_key("bos") {
                                    contents.insert("bos", first.clone());
                                }
                                let on = contents.get("bos") == Some(&first) || contents.get("cls") == Some(&first);
                                set(&mut flags, "bos", on);
                            }
                            if let Some(last) = special(single.last()) {
                                set(&mut flags, "eos", contents.get("eos") == Some(&last));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        for typ in ["bos", "eos", "sep"] {
            if let Some(b) = self.config.get(format!("add_{typ}_token")).and_then(Json::as_bool) {
                set_default(&mut flags, typ, b);
            }
        }
        flags
    }

    /// `tokenizer.chat_template` (and named templates) from `tokenizer_config.json`, else
    /// `chat_template.jinja`, else `chat_template.json`, as `SpecialVocab` reads them.
    fn chat_template_metadata(&self) -> Result<Vec<(String, Value)>> {
        let jinja = self.dir.join("chat_template.jinja");
        let json = self.dir.join("chat_template.json");
        let template = match self.config.get("chat_template").filter(|v| !v.is_null()) {
            Some(t) => Some(t.clone()),
            None if jinja.is_file() => {
                Some(Json::String(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?))
            }
            None if json.is_file() => read_json(&json)?.get("chat_template").cloned(),
            None => None,
        };
        let mut m = Vec::new();
        match template {
            Some(Json::String(s)) => m.push(("tokenizer.chat_template".to_string(), Value::String(s))),
            Some(Json::Array(list)) => {
                let mut names = Vec::new();
                let mut default = None;
                for entry in &list {
                    let name = entry.get("name").and_then(Json::as_str).unwrap_or("");
                    let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
                    let Some(t) = entry.get("template").and_then(Json::as_str) else { continue };
                    if name.is_empty() {
                        continue;
                    }
                    if name == "default" {
                        default = Some(t.to_string());
                    } else {
                        m.push((format!("tokenizer.chat_template.{name}"), Value::String(t.to_string())));
                        names.push(Value::String(name));
                    }
                }
                if !names.is_empty() {
                    m.push(("tokenizer.chat_templates".to_string(), Value::Array(names)));
                }
                if let Some(t) = default {
                    m.push(("tokenizer.chat_template".to_string(), Value::String(t)));
                }
            }
            _ => {}
        }
        Ok(m)
    }

    /// `tokenizer.ggml.normalizer.*` flags from the normalizer (Lowercase, StripAccents).
    fn normalizer_metadata(&self) -> Vec<(String, Value)> {
        let (mut lower, mut strip) = (None, None);
        let mut stack: Vec<&Json> = self.json.get("normalizer").into_iter().collect();
        while let Some(n) = stack.pop() {
            match n.get("type").and_then(Json::as_str) {
                Some("Lowercase") => lower = Some(true),
                Some("StripAccents") => strip = Some(true),
                Some("BertNormalizer") => {
                    lower = n.get("lowercase").and_then(Json::as_bool).or(lower);
                    strip = n.get("strip_accents").and_then(Json::as_bool).or(strip);
                }
                Some("Sequence") => stack.extend(n.get("normalizers").and_then(Json::as_array).into_iter().flatten()),
                _ => {}
            }
        }
        let mut m = Vec::new();
        if let Some(b) = lower {
            m.push(("tokenizer.ggml.normalizer.lowercase".to_string(), Value::Bool(b)));
        }
        if let Some(b) = strip {
            m.push(("tokenizer.ggml.normalizer.strip_accents".to_string(), Value::Bool(b)));
        }
        m
    }
}

struct AddedToken {
    id: usize,
    content: String,
    special: bool,
}

/// The special-token kinds `gguf.SpecialVocab` looks for, in its order.
const SPECIAL_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// The GGUF key of a special-token kind (`cls` has none in gguf-py).
fn special_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        _ => return None,
    })
}

/// `convert_hf_to_gguf.py`'s `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// A `{typ}_token` entry of `tokenizer_config.json`: a string or an AddedToken object.
fn token_content(cfg: &Json, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_matches_converter() {
        // 1 head of 4 rows, 1 byte per row: rows [0 1 2 3] -> [0 2 1 3].
        assert_eq!(permute_rows(&[0, 1, 2, 3], 4, 4), vec![0, 2, 1, 3]);
        // 2 heads of 4.
        assert_eq!(permute_rows(&[0, 1, 2, 3, 4, 5, 6, 7], 8, 4), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn uniform_values_are_bounded_and_centered() {
        let mut v = vec![0f32; CHUNK];
        fill_uniform(7, 3, 0.5, &mut v);
        assert!(v.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 0.25 / 3.0).abs() < 0.005, "var {var}");
    }

    #[test]
    fn format_from_path() {
        assert_eq!(SynthFormat::from_path(Path::new("/tmp/a.gguf")), SynthFormat::Gguf);
        assert_eq!(SynthFormat::from_path(Path::new("/tmp/a.GGUF")), SynthFormat::Gguf);
        assert_eq!(SynthFormat::from_path(Path::new("/tmp/a")), SynthFormat::HfDir);
    }
}
