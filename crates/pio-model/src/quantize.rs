//! Quantizing a checkpoint's matrices: at load time ([`crate::LoadOptions::quant`]) and into a
//! GGUF file llama.cpp can read ([`write_quantized_gguf`], `pio quantize`).
//!
//! Which format each tensor gets ([`tensor_type`]) follows llama.cpp's `llama-quantize` with a
//! pure type (no per-layer mixes):
//!
//! - every matrix — attention q/k/v/o, MLP gate/up/down, and an untied token embedding — gets
//!   the target format;
//! - the output matrix — `lm_head`, or the token embedding when the two are tied — keeps more
//!   bits, as llama.cpp's `output.weight` does: Q6_K for every target below 8 bits, the target
//!   itself for Q8_0, INT8 and the float formats. (The embedding stays readable in any format:
//!   the model gathers its rows by decoding them.)
//! - a row width the format's block does not divide falls back as llama.cpp's "incompatible
//!   tensor" rule does — Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0 (llama.cpp
//!   picks IQ4_NL, which we do not have), and likewise INT4/NF4 → Q5_0 — and to F16 when not
//!   even that fits (widths that are not a multiple of 32);
//! - 1-D tensors (norms, biases) are left as they are; the model reads them as f32;
//! - mixture-of-experts routers (`mlp.gate.weight`, llama.cpp's `ffn_gate_inp`) are left as
//!   they are, and stored F32 in GGUF, as `llama-quantize` never quantizes them.
//!
//! A matrix already in its format is kept as it is (still memory-mapped); any other is decoded
//! row by row to f32 and encoded with [`pio_kernels::quant`], rows split across the cores, into
//! memory the model owns. Load-time quantization and the GGUF writer share this code, so a
//! model loaded with `--quant q4_0` and the file `pio quantize --quant q4_0` writes hold the
//! same bytes and compute the same logits.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pio_kernels::{parallel, quant, DType};

use crate::config::{Arch, ModelConfig};
use crate::load::{gguf_config, read_hf_config};
use crate::models::decoder::DecoderModel;
use crate::synth::{gguf_arch, hf_gguf_metadata, is_router, model_name, permute_rows, split_kv_b};
use crate::weights::gguf::{write_gguf_with, GgufFile, TensorHeader, Value};
use crate::weights::names::{hf_expert_to_gguf, hf_to_gguf};
use crate::weights::{safetensors, Checkpoint, Storage, Tensor};
use crate::{Error, Result};

/// The format a matrix of `cols` columns gets when the model is quantized to `target`;
/// `output` for the LM head (or the embedding standing in for it). See the module docs.
pub fn tensor_type(target: DType, cols: usize, output: bool) -> DType {
    let below_8_bits = !matches!(target, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0 | DType::INT8);
    let mut dtype = if output && below_8_bits { DType::Q6_K } else { target };
    // Terminates: every chain ends in F16, which fits any width.
    while dtype.row_bytes(cols).is_none() {
        dtype = match dtype {
            DType::Q4_K | DType::INT4 | DType::NF4 => DType::Q5_0,
            DType::Q5_K => DType::Q5_1,
            DType::Q6_K => DType::Q8_0,
            DType::Q2_K | DType::Q3_K => DType::Q4_0,
            _ => DType::F16,
        };
    }
    dtype
}

/// `llama_ftype` (`general.file_type`) of a model whose matrices are mostly `dtype`: what
/// llama.cpp prints as the file's type. K formats map to their `_S` (small, fewest upgrades)
/// variant; formats without a GGUF type to 0 (all F32), never written.
pub fn llama_file_type(dtype: DType) -> u32 {
    match dtype {
        DType::F32 | DType::INT8 | DType::INT4 | DType::NF4 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 7,
        DType::Q5_0 => 8,
        DType::Q5_1 => 9,
        DType::Q2_K => 10,
        DType::Q3_K => 11,
        DType::Q4_K => 14,
        DType::Q5_K => 16,
        DType::Q6_K => 18,
        DType::BF16 => 32,
    }
}

/// Weights converted per task: enough to amortize a task, small enough to balance the cores.
const WEIGHTS_PER_TASK: usize = 1 << 16;

/// Matrix `t` (`[rows, cols]`) stored as `dtype`: `t` itself when it already is, else every row
/// decoded to f32 and encoded, in parallel, into owned memory.
///
/// `t`'s bytes must be `rows` rows of `t.dtype` and `cols` a whole number of `dtype` blocks
/// (as [`tensor_type`] chooses); anything else panics.
pub fn convert_matrix(t: &Tensor, dtype: DType) -> Tensor {
    if t.dtype == dtype {
        return t.clone();
    }
    let src = t.matrix();
    let (rows, cols) = (src.rows, src.cols);
    let rb = dtype.row_bytes(cols).unwrap_or_else(|| panic!("{dtype} cannot hold rows of {cols}"));
    assert_eq!(src.data.len(), rows * src.row_bytes(), "{} bytes are not {rows} rows of {}", src.data.len(), t.dtype);
    let mut out = vec![0u8; rows * rb];
    let rows_per_task = (WEIGHTS_PER_TASK / cols.max(1)).max(1);
    // Each task owns one chunk of output rows; the mutex only hands it over.
    let chunks: Vec<Mutex<&mut [u8]>> = out.chunks_mut(rows_per_task * rb.max(1)).map(Mutex::new).collect();
    parallel::for_each_task(chunks.len(), &|i| {
        let mut dst = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = vec![0f32; cols];
        for (j, dst_row) in dst.chunks_exact_mut(rb.max(1)).enumerate() {
            src.dequantize_row(i * rows_per_task + j, &mut buf);
            quant::quantize_row(dtype, &buf, dst_row);
        }
    });
    drop(chunks);
    Tensor { dtype, shape: t.shape.clone(), storage: Storage::Owned(Arc::new(out)) }
}

/// Converts every matrix of `ckpt` (Hugging Face names) to the format [`tensor_type`] gives it
/// for `target`; `tied` says the embedding doubles as the LM head (a saved `lm_head.weight`
/// is then dropped, as the model would drop it). 1-D tensors and mixture-of-experts routers
/// (`mlp.gate.weight`, kept exact as llama.cpp keeps them) are left alone.
pub fn quantize_checkpoint(ckpt: &mut Checkpoint, target: DType, tied: bool) {
    if tied {
        ckpt.discard("lm_head.weight");
    }
    for (name, t) in ckpt.tensors_mut() {
        let [_, cols] = t.shape[..] else { continue };
        // A vision tower's position embeddings are a table read once per image, not a product.
        if is_router(name) || name.ends_with("conv1d.weight") || name.ends_with("pos_embed.weight") {
            continue;
        }
        let embedding = name == "model.embed_tokens.weight" || name == "model.language_model.embed_tokens.weight";
        let output = name == "lm_head.weight" || (tied && embedding);
        let dtype = tensor_type(target, cols, output);
        // A tensor whose bytes do not match its shape is left for the model's checks to report.
        if t.dtype.row_bytes(cols).is_some_and(|rb| rb * t.shape[0] == t.bytes().len()) {
            *t = convert_matrix(t, dtype);
        }
    }
}

/// What [`write_quantized_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeSummary {
    /// The matrices by format: (format, number of matrices, bytes).
    pub weight_types: Vec<(DType, usize, usize)>,
    /// Size of the file written.
    pub file_bytes: u64,
    /// The vision file written beside a vision-language model's (llama.cpp's mmproj) and its size.
    pub mmproj: Option<(PathBuf, u64)>,
}

/// A vision-language checkpoint split into its tower (`model.visual.*`) and its text model
/// (`model.language_model.*` renamed to a text model's `model.*`).
fn split_vision(ckpt: Checkpoint) -> (Checkpoint, Checkpoint) {
    let (mut tower, mut text) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    for (name, t) in ckpt.tensors() {
        if name.starts_with("model.visual.") {
            tower.insert(name.to_string(), t.clone());
        } else {
            text.insert(name.replacen("model.language_model.", "model.", 1), t.clone());
        }
    }
    (Checkpoint::new(ckpt.path.clone(), tower), Checkpoint::new(ckpt.path.clone(), text))
}

/// Writes the tower `tower` (Hugging Face names) as the mmproj file of a text model quantized
/// to `target`, through a partial file renamed into place.
fn write_mmproj(
    out: &Path,
    v: &crate::config::VisionConfig,
    processor: &crate::image::ImageProcessorConfig,
    name: &str,
    tower: &Checkpoint,
    target: DType,
) -> Result<()> {
    let file_type = crate::mmproj::file_type_for(target);
    let metadata = crate::mmproj::metadata(v, processor, name, llama_file_type(file_type));
    let shapes: Vec<(String, Vec<usize>)> = tower.tensors().map(|(n, t)| (n.to_string(), t.shape.clone())).collect();
    let planned = crate::mmproj::plan(v, &shapes, file_type)?;
    let headers: Vec<TensorHeader> =
        planned.iter().map(|t| TensorHeader { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let tmp = partial_path(out);
    write_gguf_with(&tmp, &metadata, &headers, &mut |i| {
        let t = &planned[i];
        // `plan` names only tensors of `tower`.
        let values = tower.tensors().find(|(n, _)| *n == t.hf).map_or_else(Vec::new, |(_, x)| x.to_f32_vec());
        Cow::Owned(crate::mmproj::encode(t, &values))
    })?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(out, e)
    })
}

/// Quantizes the model at `input` (a Hugging Face directory or a GGUF file) to `target` and
/// writes it to `out` as a GGUF file that our loader and llama.cpp read: llama.cpp tensor names,
/// 1-D tensors and routers in F32, llama's q/k rows permuted as `convert_hf_to_gguf.py` does,
/// experts fused into `[experts, rows, cols]` stacks (`ffn_*_exps`), latent attention's
/// `kv_b_proj` split per head into `attn_k_b`/`attn_v_b` before quantizing (so, unlike the other
/// matrices, those two differ from what load-time quantization of `kv_b_proj` holds), and the
/// metadata `convert_hf_to_gguf.py` writes (with the directory's tokenizer, if it has one) or,
/// for GGUF input, the input's metadata with the new file type.
///
/// Formats GGUF has no type for (NF4, INT8, INT4) are refused before anything is read. The file
/// is written next to `out` and renamed into place, so a failure leaves no partial `out`.
pub fn write_quantized_gguf(input: &Path, target: DType, out: &Path) -> Result<QuantizeSummary> {
    if target.ggml_id().is_none() {
        return Err(Error::file(
            out,
            format!(
                "{target} has no GGUF type, so llama.cpp could not read the file; \
                 quantize to {target} at load time instead (--quant {})",
                target.name().to_ascii_lowercase()
            ),
        ));
    }
    if out.exists() && out.canonicalize().ok() == input.canonicalize().ok() {
        return Err(Error::file(out, "is the input model; choose another --out"));
    }
    let mut vision = None;
    let (config, mut ckpt, metadata, permute) = if input.is_dir() {
        let (_, config) = read_hf_config(input)?;
        let config_path = input.join("config.json");
        let tokenizer = input.join("tokenizer.json").is_file().then_some(input);
        let name = model_name(&config_path, &config);
        let metadata = hf_gguf_metadata(&config_path, tokenizer, &name, llama_file_type(target))?;
        let permute = config.arch == Arch::Llama;
        let mut ckpt = safetensors::load_dir(input)?;
        if let Some(v) = &config.vision {
            // The tower goes to its own file (llama.cpp's mmproj), the text model to `out` under
            // a text model's names.
            let processor = crate::image::ImageProcessorConfig::load(input)?;
            let (tower, text) = split_vision(ckpt);
            vision = Some((v.clone(), processor, tower, name));
            ckpt = text;
        }
        (config, ckpt, metadata, permute)
    } else {
        let g = GgufFile::open(input)?;
        let config = gguf_config(&g)?;
        // A vision-language model's vision file beside it (llama.cpp's mmproj, named as
        // `default_path` names it) is quantized along with it, so the pair stays a pair.
        let mmproj = crate::mmproj::default_path(input);
        if g.get_str("general.architecture").ok() == Some("qwen3vl") && mmproj.is_file() {
            let f = crate::mmproj::read(&mmproj, &g, &config)?;
            let name = g.get_str("general.name").unwrap_or("Qwen3-VL").to_string();
            vision = Some((f.config, f.processor, f.checkpoint, name));
        }
        (config, g.checkpoint(), carried_metadata(&g, target), false)
    };
    if let Some(a) = &config.mla {
        ckpt = split_kv_b_proj(ckpt, config.num_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank);
    }
    let mut config = config;
    if config.linear_attn.is_some() && input.is_dir() {
        ckpt = qwen3next_to_llama_layout(ckpt, &config);
        config.zero_centred_norms = false;
    }
    quantize_checkpoint(&mut ckpt, target, config.tie_word_embeddings);

    // Building the model checks every tensor's name and shape, so a file we write is one we
    // can load. It only borrows the (mapped or owned) bytes.
    let copy = Checkpoint::new(ckpt.path.clone(), ckpt.tensors().map(|(n, t)| (n.to_string(), t.clone())).collect());
    let text_config = ModelConfig { vision: None, ..config.clone() };
    DecoderModel::load(text_config, copy, &mut |_, _| {})?;

    let mut files: Vec<FileTensor<'_>> = Vec::new();
    let mut stacks: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (name, t) in ckpt.tensors() {
        // Qwen3-Next's multi-token-prediction module is not written (ik_llama.cpp cannot load
        // a file that has it; the model skips it).
        if config.arch == Arch::Qwen3Next && name.starts_with("mtp.") {
            continue;
        }
        if let Some((stack, e)) = hf_expert_to_gguf(name) {
            let i = *stacks.entry(stack.clone()).or_insert_with(|| {
                files.push(FileTensor {
                    name: stack,
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: Data::Stack(Vec::new()),
                });
                files.len() - 1
            });
            let Data::Stack(experts) = &mut files[i].data else { unreachable!("stacks hold experts") };
            experts.push((e, t));
            continue;
        }
        // Names llama.cpp has and our table does not (`blk.N.nextn.*` of MTP layers) stay.
        let gguf_name = hf_to_gguf(name, gguf_arch(&config))
            .or_else(|| (input.is_file() && name.starts_with("blk.")).then(|| name.to_string()))
            .ok_or_else(|| Error::file(input, format!("tensor {name:?} has no llama.cpp name")))?;
        let (dtype, mut data) = if (t.shape.len() == 1 || is_router(name)) && t.dtype != DType::F32 {
            let f32s: Vec<u8> = t.to_f32_vec().iter().flat_map(|v| v.to_le_bytes()).collect();
            (DType::F32, Cow::Owned(f32s))
        } else {
            (t.dtype, Cow::Borrowed(t.bytes()))
        };
        let qk = ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"].iter().any(|s| name.ends_with(s));
        if permute && qk {
            data = Cow::Owned(permute_rows(&data, t.shape[0], config.head_dim));
        }
        // llama.cpp's per-head 3-D `attn_k_b` [H, kv_lora, nope] and `attn_v_b` [H, v, kv_lora].
        let mut shape = t.shape.clone();
        let per_head = name.ends_with("k_b_proj.weight") || name.ends_with("v_b_proj.weight");
        if let (&[rows, cols], true) = (&t.shape[..], per_head) {
            let heads = config.num_heads;
            shape = vec![heads, rows / heads.max(1), cols];
        }
        files.push(FileTensor { name: gguf_name, dtype, shape, data: Data::Bytes(data) });
    }
    for f in &mut files {
        let Data::Stack(experts) = &mut f.data else { continue };
        experts.sort_by_key(|(e, _)| *e);
        let in_order =
            experts.iter().enumerate().all(|(i, (e, t))| *e == i && t.dtype == f.dtype && t.shape == f.shape);
        if !in_order {
            return Err(Error::file(input, format!("{}: experts are missing or differ in format or shape", f.name)));
        }
        f.shape.insert(0, experts.len());
    }
    let mut weight_types: Vec<(DType, usize, usize)> = Vec::new();
    for f in files.iter().filter(|f| f.shape.len() >= 2) {
        let len = f.shape.iter().rev().skip(1).product::<usize>()
            * f.dtype.row_bytes(f.shape[f.shape.len() - 1]).unwrap_or(0);
        match weight_types.iter_mut().find(|(d, _, _)| *d == f.dtype) {
            Some(e) => (e.1, e.2) = (e.1 + 1, e.2 + len),
            None => weight_types.push((f.dtype, 1, len)),
        }
    }
    files.sort_by_key(|t| gguf_order(&t.name));
    let headers: Vec<TensorHeader> =
        files.iter().map(|t| TensorHeader { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();

    let tmp = partial_path(out);
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_gguf_with(&tmp, &metadata, &headers, &mut |i| match &files[i].data {
        Data::Bytes(b) => Cow::Borrowed(&b[..]),
        Data::Stack(experts) => {
            let mut all = Vec::with_capacity(experts.iter().map(|(_, t)| t.bytes().len()).sum());
            for (_, t) in experts {
                all.extend_from_slice(t.bytes());
            }
            Cow::Owned(all)
        }
    })?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(out, e)
    })?;
    let file_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    let mmproj = match vision {
        None => None,
        Some((v, processor, tower, name)) => {
            let path = crate::mmproj::default_path(out);
            write_mmproj(&path, &v, &processor, &name, &tower, target)?;
            let bytes = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
            Some((path, bytes))
        }
    };
    Ok(QuantizeSummary { weight_types, file_bytes, mmproj })
}

/// `ckpt` with every latent attention `kv_b_proj` replaced by llama.cpp's per-head split
/// (`k_b_proj` `[H·kv_lora, nope]`, `v_b_proj` `[H·v, kv_lora]`, in f32, see
/// [`split_kv_b`]), so that each half is quantized along its own rows as llama.cpp stores it.
fn split_kv_b_proj(ckpt: Checkpoint, heads: usize, nope: usize, v: usize, r: usize) -> Checkpoint {
    let path = ckpt.path.clone();
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in ckpt.tensors() {
        let Some(prefix) = name.strip_suffix("kv_b_proj.weight").filter(|_| t.shape == [heads * (nope + v), r]) else {
            tensors.insert(name.to_string(), t.clone());
            continue;
        };
        let (k_b, v_b) = split_kv_b(&t.to_f32_vec(), heads, nope, v, r);
        tensors.insert(format!("{prefix}k_b_proj.weight"), f32_tensor(k_b, vec![heads * r, nope]));
        tensors.insert(format!("{prefix}v_b_proj.weight"), f32_tensor(v_b, vec![heads * v, r]));
    }
    Checkpoint::new(path, tensors)
}

/// A tensor of `vals` in F32, in memory of its own.
fn f32_tensor(vals: Vec<f32>, shape: Vec<usize>) -> Tensor {
    Tensor {
        dtype: DType::F32,
        shape,
        storage: Storage::Owned(Arc::new(vals.iter().flat_map(|x| x.to_le_bytes()).collect())),
    }
}

/// A Qwen3-Next checkpoint in llama.cpp's `qwen3next` layout, as its converter writes it:
/// `in_proj_qkvz` split into `in_proj_qkv` (q, k, v rows of all heads: the convolution's
/// channels) and `in_proj_z`; `A_log` stored as `ssm_a` = `-exp(A_log)`; the convolution as
/// `[channels, taps]`; every zero-centred norm (all but Gated DeltaNet's own) with its `1 + w`
/// folded in. Changed tensors are F32.
fn qwen3next_to_llama_layout(ckpt: Checkpoint, config: &ModelConfig) -> Checkpoint {
    let path = ckpt.path.clone();
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in ckpt.tensors() {
        let la = config.linear_attn.as_ref();
        if let (Some(prefix), Some(la)) = (name.strip_suffix("in_proj_qkvz.weight"), la) {
            let (qkv, z) = la.qkvz_split();
            if t.shape.first() == Some(&(la.conv_channels() + la.num_value_heads * la.value_head_dim)) {
                tensors.insert(format!("{prefix}in_proj_qkv.weight"), t.gather_outer(&qkv));
                tensors.insert(format!("{prefix}in_proj_z.weight"), t.gather_outer(&z));
                continue;
            }
        }
        if let Some(prefix) = name.strip_suffix("A_log") {
            tensors.insert(
                format!("{prefix}ssm_a"),
                f32_tensor(t.to_f32_vec().iter().map(|x| -x.exp()).collect(), t.shape.clone()),
            );
            continue;
        }
        if let ([ch, 1, taps], true) = (&t.shape[..], name.ends_with("conv1d.weight")) {
            tensors.insert(name.to_string(), f32_tensor(t.to_f32_vec(), vec![*ch, *taps]));
            continue;
        }
        let zero_centred = t.shape.len() == 1
            && (name.ends_with("layernorm.weight") || name.ends_with("_norm.weight") || name == "model.norm.weight");
        if zero_centred {
            tensors.insert(
                name.to_string(),
                f32_tensor(t.to_f32_vec().iter().map(|x| 1.0 + x).collect(), t.shape.clone()),
            );
            continue;
        }
        tensors.insert(name.to_string(), t.clone());
    }
    Checkpoint::new(path, tensors)
}

/// A tensor as it goes into the file: GGUF name, format, shape, and bytes.
struct FileTensor<'a> {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Data<'a>,
}

/// A file tensor's bytes: borrowed from the checkpoint unless converted or permuted, or the
/// experts of a stack (by index), concatenated when written.
enum Data<'a> {
    Bytes(Cow<'a, [u8]>),
    Stack(Vec<(usize, &'a Tensor)>),
}

/// A GGUF input's metadata for the quantized file: every key (`general.architecture` first, the
/// rest sorted), with `general.file_type` and `general.quantization_version` set for `target`
/// and `general.alignment` at the 32 bytes we write.
fn carried_metadata(g: &GgufFile, target: DType) -> Vec<(String, Value)> {
    const REPLACED: [&str; 3] = ["general.file_type", "general.quantization_version", "general.alignment"];
    let mut keys: Vec<&String> = g.metadata.keys().filter(|k| !REPLACED.contains(&k.as_str())).collect();
    keys.sort_by_key(|k| (k.as_str() != "general.architecture", k.as_str()));
    let mut m: Vec<(String, Value)> = keys.into_iter().map(|k| (k.clone(), g.metadata[k].clone())).collect();
    m.push(("general.alignment".into(), Value::U32(32)));
    m.push(("general.file_type".into(), Value::U32(llama_file_type(target))));
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m
}

/// Sort key putting tensors in llama.cpp's order: `token_embd`, then block by block, then the
/// rest (`output_norm`, `output`).
fn gguf_order(name: &str) -> (usize, String) {
    let rank = if name.starts_with("token_embd.") {
        0
    } else if let Some(layer) = name.strip_prefix("blk.").and_then(|r| r.split('.').next()?.parse::<usize>().ok()) {
        1 + layer
    } else {
        usize::MAX
    };
    (rank, name.to_string())
}

/// `out` with `.partial` appended to its file name.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_llama_quantize() {
        // Layer matrices get the target; widths the block does not divide fall back.
        assert_eq!(tensor_type(DType::Q4_K, 1024, false), DType::Q4_K);
        assert_eq!(tensor_type(DType::Q4_K, 1152, false), DType::Q5_0);
        assert_eq!(tensor_type(DType::Q6_K, 1152, false), DType::Q8_0);
        assert_eq!(tensor_type(DType::INT4, 192, false), DType::Q5_0);
        assert_eq!(tensor_type(DType::NF4, 96, false), DType::Q5_0);
        assert_eq!(tensor_type(DType::Q4_0, 100, false), DType::F16);
        assert_eq!(tensor_type(DType::INT8, 100, false), DType::F16);
        assert_eq!(tensor_type(DType::BF16, 100, false), DType::BF16);
        // The output keeps 6 bits below 8-bit targets.
        assert_eq!(tensor_type(DType::Q4_0, 1024, true), DType::Q6_K);
        assert_eq!(tensor_type(DType::NF4, 1024, true), DType::Q6_K);
        assert_eq!(tensor_type(DType::Q4_K, 128, true), DType::Q8_0);
        assert_eq!(tensor_type(DType::Q8_0, 1024, true), DType::Q8_0);
        assert_eq!(tensor_type(DType::INT8, 1024, true), DType::INT8);
        assert_eq!(tensor_type(DType::F16, 1024, true), DType::F16);
    }

    #[test]
    fn convert_matrix_matches_the_codec_row_by_row() {
        let (rows, cols) = (37, 256);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor { dtype: DType::F32, shape: vec![rows, cols], storage: Storage::Owned(Arc::new(bytes)) };
        for dtype in [DType::Q4_K, DType::INT8, DType::NF4, DType::BF16] {
            let q = convert_matrix(&t, dtype);
            assert_eq!((q.dtype, &q.shape), (dtype, &t.shape));
            let rb = dtype.row_bytes(cols).unwrap();
            for r in 0..rows {
                let mut want = vec![0u8; rb];
                quant::quantize_row(dtype, &w[r * cols..(r + 1) * cols], &mut want);
                assert_eq!(&q.bytes()[r * rb..(r + 1) * rb], &want[..], "{dtype} row {r}");
            }
            // Already in the format: the same storage, no copy.
            let again = convert_matrix(&q, dtype);
            assert_eq!(again.bytes().as_ptr(), q.bytes().as_ptr());
        }
    }

    #[test]
    fn order_is_llama_cpp_s() {
        let mut names = vec![
            "output.weight",
            "blk.10.attn_q.weight",
            "output_norm.weight",
            "blk.2.ffn_up.weight",
            "token_embd.weight",
        ];
        names.sort_by_key(|n| gguf_order(n));
        assert_eq!(
            names,
            ["token_embd.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight", "output.weight", "output_norm.weight"]
        );
    }
}
