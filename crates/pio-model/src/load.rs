//! Opening a model path: a GGUF file or a Hugging Face directory, with its tokenizer and
//! generation defaults.

use std::path::{Path, PathBuf};

use pio_kernels::DType;
use serde_json::Value;

use crate::config::{Arch, ModelConfig};
use crate::layers::{ExpertCache, ExpertCacheOptions};
use crate::models::decoder::DecoderModel;
use crate::models::CausalLm;
use crate::registry::{self, Family};
use crate::tokenizer::{GgufVocab, Tokenizer};
use crate::weights::gguf::{GgufFile, Value as GValue};
use crate::weights::{safetensors, Checkpoint};
use crate::{quantize, Error, Result};

/// Defaults a checkpoint carries for generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Token ids that end a sequence (generation_config.json, config.json, tokenizer, GGUF eos/eot).
    pub eos_token_ids: Vec<u32>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// What was loaded, for `--verbose` and reports.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// "gguf" or "safetensors".
    pub format: &'static str,
    pub arch: String,
    pub num_params: usize,
    /// (format, number of matrices, bytes).
    pub weight_types: Vec<(DType, usize, usize)>,
    pub weight_bytes: usize,
    /// Weight bytes read per decode token (the bandwidth roofline's numerator).
    pub decode_bytes_per_token: usize,
    /// The format the weights were quantized to at load ([`LoadOptions::quant`]) and the
    /// seconds that took; `None` when they are the checkpoint's.
    pub quantized: Option<(DType, f64)>,
    /// Matrices rearranged for the decode kernels at load ([`LoadOptions::repack`]): how many,
    /// their bytes (in memory of their own) and the seconds it took.
    pub repacked: Option<(usize, usize, f64)>,
    /// How the weights were fitted under [`LoadOptions::max_memory`] by streaming experts.
    pub streaming: Option<StreamingInfo>,
    /// The vision file a GGUF model's tower was read from ([`LoadOptions::mmproj`]).
    pub mmproj: Option<PathBuf>,
}

/// How a model was fitted under a memory bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamingInfo {
    /// The bound ([`LoadOptions::max_memory`]), when one was given.
    pub max_memory: Option<usize>,
    /// Weights kept in memory: everything but the routed experts (or the streamed layers).
    pub resident_bytes: usize,
    /// Left for the KV cache and scratch ([`memory_reserve`]) and the rest of the process
    /// ([`RUNTIME_ALLOWANCE`]).
    pub reserve_bytes: usize,
    /// All routed experts (0 when layers stream), and the slots of the cache that holds some
    /// of them (or the streamed layers).
    pub expert_bytes: usize,
    pub slots: usize,
    pub slot_bytes: usize,
    /// Dense models: (layers kept in memory, all layers); the others stream.
    pub streamed_layers: Option<(usize, usize)>,
    pub options: ExpertCacheOptions,
}

/// What a memory bound leaves for the KV cache and scratch (activations, logits): an eighth of
/// it, between 128 MiB and 2 GiB. Commands size their KV cache within it.
pub fn memory_reserve(max_memory: usize) -> usize {
    (max_memory / 8).clamp(128 << 20, 2 << 30)
}

/// What a memory bound also leaves for the rest of the process: the tokenizer (a 151k-token
/// vocabulary with its merges takes tens of MiB), code, the file's metadata, thread stacks.
/// Measured: Qwen2.5-Coder-0.5B under a 420 MiB bound peaked 150 MiB above its weights, ring
/// and KV cache before this allowance.
pub const RUNTIME_ALLOWANCE: usize = 128 << 20;

/// How [`load_with`] loads a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Quantize every matrix to this format at load, whatever the checkpoint holds (see
    /// [`crate::quantize`] for which format each matrix gets); `None` keeps the checkpoint's.
    pub quant: Option<DType>,
    /// Rearrange the matrices that have interleaved decode kernels (the GGUF block formats but
    /// Q2_K and Q3_K, and BF16) at load,
    /// as llama.cpp's repacking does (see [`DecoderModel::interleave_weights`]): faster decode,
    /// the same results, those matrices in memory of their own instead of mapped from the file.
    /// Only where the CPU runs the SIMD kernels; routed experts only when all of them take at
    /// most 80% of the memory available at load (otherwise they stay mapped, so a model larger
    /// than memory still pages them in and out).
    pub repack: bool,
    /// BF16 matrices multiply bf16-rounded activations where the CPU has AVX-512 BF16 and runs
    /// it faster than f32 FMAs (as llama.cpp does; see `pio_kernels::cpu::fast_bf16_dot`: not on
    /// Intel's cores). Off, or elsewhere: f32 activations, results that match an f32 computation
    /// over bf16 weights.
    pub bf16_activations: bool,
    /// Bytes the weights, KV cache and scratch may take together. When the model does not fit,
    /// its routed experts stream from disk through an expert cache sized to what is left after
    /// the other weights and [`memory_reserve`]; `None`: no bound (weights memory-mapped).
    pub max_memory: Option<usize>,
    /// How experts stream ([`ExpertCacheOptions::slots`] streams them whatever the bound).
    pub expert_cache: ExpertCacheOptions,
    /// The vision file (`mmproj`) of a vision-language GGUF model, as llama.cpp's `--mmproj`.
    /// `None`: `mmproj-<file name>` beside the model when there is one (what `pio synth` and
    /// `pio quantize` write), else the text model alone.
    pub mmproj: Option<PathBuf>,
    /// Load the multi-token-prediction layer (GLM-4.7-Flash's `nextn`) for speculative
    /// decoding ([`CausalLm::mtp_forward`]); otherwise it is skipped.
    pub mtp: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quant: None,
            repack: true,
            bf16_activations: true,
            max_memory: None,
            expert_cache: ExpertCacheOptions::default(),
            mmproj: None,
            mtp: false,
        }
    }
}

/// A model ready to run, with what it needs to turn text into tokens and back.
pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    /// The tokenizer, or why there is none (names the missing file).
    pub tokenizer: std::result::Result<Tokenizer, String>,
    pub generation: GenerationDefaults,
    pub info: ModelInfo,
}

impl LoadedModel {
    /// The tokenizer, or an error saying which file is missing.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().map_err(|e| Error::NoTokenizer(e.clone()))
    }
}

/// Loads the model at `path`. `progress(done, total)` is called as layers are built.
pub fn load(path: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel> {
    load_with(path, &LoadOptions::default(), progress)
}

/// [`load`] with options (load-time quantization).
pub fn load_with(path: &Path, options: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel> {
    if path.is_dir() {
        load_hf_dir(path, options, progress)
    } else {
        load_gguf(path, options, progress)
    }
}

/// Loads only the tokenizer of `path` (a GGUF file, or a directory with tokenizer files).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        Tokenizer::from_hf_dir(path)
    } else {
        let g = GgufFile::open(path)?;
        tokenizer_from_gguf(&g)
    }
}

/// The config of the Hugging Face model directory `dir` (raw and resolved), refusing
/// architectures we do not run.
pub(crate) fn read_hf_config(dir: &Path) -> Result<(Value, ModelConfig)> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::file(&config_path, "missing: a model directory needs config.json"));
    }
    let raw: Value = read_json(&config_path)?;
    let arch = raw
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .ok_or_else(|| Error::file(&config_path, "no \"architectures\" entry"))?;
    match registry::family_of_hf(arch) {
        Some(Family::Decoder) => {}
        None => {
            return Err(Error::file(
                &config_path,
                format!("unknown architecture {arch:?} (supported: {})", registry::supported_list(false)),
            ))
        }
    }
    Ok((raw, ModelConfig::from_hf_file(&config_path)?))
}

fn load_hf_dir(dir: &Path, options: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel> {
    let (raw, config) = read_hf_config(dir)?;
    let mut ckpt = safetensors::load_dir(dir)?;
    let quantized = quantize_at_load(&mut ckpt, &config, options);
    let processor = config.vision.as_ref().map(|_| crate::image::ImageProcessorConfig::load(dir)).transpose()?;
    let mut model = DecoderModel::load_multimodal_with(config.clone(), ckpt, processor, options.mtp, progress)?;
    model.set_bf16_activations(options.bf16_activations);
    let streaming = fit_in_memory(&mut model, options)?;
    let repacked = repack_at_load(&mut model, options, streaming.is_none());
    model.populate_stream_caches();
    let tokenizer = Tokenizer::from_hf_dir(dir).map_err(|e| e.to_string());
    let mut generation = GenerationDefaults::default();
    add_eos_ids(&mut generation.eos_token_ids, raw.get("eos_token_id"));
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let g: Value = read_json(&gen_path)?;
        add_eos_ids(&mut generation.eos_token_ids, g.get("eos_token_id"));
        let f = |k: &str| g.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
        // Sampling defaults apply only when the checkpoint asks to sample.
        if g.get("do_sample").and_then(|v| v.as_bool()).unwrap_or(false) {
            generation.temperature = f("temperature");
            generation.top_p = f("top_p");
            generation.min_p = f("min_p");
            generation.top_k = g.get("top_k").and_then(|v| v.as_u64()).map(|v| v as usize);
        }
        generation.repetition_penalty = f("repetition_penalty");
    }
    if let Ok(t) = &tokenizer {
        for id in t.eos_token_ids() {
            if !generation.eos_token_ids.contains(&id) {
                generation.eos_token_ids.push(id);
            }
        }
    }
    let info = model_info(dir, "safetensors", &config, &model, quantized, repacked, streaming);
    Ok(LoadedModel { model: Box::new(model), tokenizer, generation, info })
}

/// The config of GGUF file `g`, refusing architectures we do not run.
pub(crate) fn gguf_config(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g.get_str("general.architecture")?;
    if registry::family_of_gguf(arch).is_none() {
        return Err(Error::file(
            &g.path,
            format!("unknown architecture {arch:?} (supported: {})", registry::supported_list(true)),
        ));
    }
    ModelConfig::from_gguf(g)
}

/// Quantizes `ckpt` in place when `options` ask for it: (format, seconds).
fn quantize_at_load(ckpt: &mut Checkpoint, config: &ModelConfig, options: &LoadOptions) -> Option<(DType, f64)> {
    let target = options.quant?;
    let start = std::time::Instant::now();
    quantize::quantize_checkpoint(ckpt, target, config.tie_word_embeddings);
    Some((target, start.elapsed().as_secs_f64()))
}

/// Rearranges the model's matrices when `options` ask for it and the CPU runs the SIMD kernels
/// (the scalar level would have to restore the rows on every product): (matrices, bytes,
/// seconds), or `None` when nothing was rearranged.
fn repack_at_load(
    model: &mut DecoderModel,
    options: &LoadOptions,
    experts_resident: bool,
) -> Option<(usize, usize, f64)> {
    if !options.repack || pio_kernels::cpu::level() < pio_kernels::cpu::SimdLevel::Avx2 {
        return None;
    }
    let start = std::time::Instant::now();
    // Routed experts too when their copies fit comfortably in the memory available now: the
    // copies cannot be evicted as mapped file pages can, so a model near or above the size of
    // memory keeps its experts mapped (Qwen3-Coder-30B-A3B-shaped Q4_K decoded 10.3 -> 11.4
    // tok/s with them repacked, 2 threads, AVX-512).
    let experts = model.moe_stats().map_or(0, |s| s.expert_bytes_total as usize);
    let experts_fit =
        experts_resident && experts > 0 && available_memory().is_some_and(|avail| experts <= avail / 10 * 8);
    let (count, bytes) = model.interleave_weights(experts_fit);
    (count > 0).then(|| (count, bytes, start.elapsed().as_secs_f64()))
}

/// Streams from disk what [`LoadOptions::max_memory`] leaves no room for (or what
/// [`ExpertCacheOptions::slots`] / [`ExpertCacheOptions::resident_layers`] ask): a mixture's
/// routed experts through an expert cache of what the bound leaves after the other weights and
/// [`memory_reserve`]; a dense model's last layers through a ring of slots, keeping as many
/// leading layers as fit. A bound too small for what must stay is an error that says how much
/// is needed.
fn fit_in_memory(model: &mut DecoderModel, options: &LoadOptions) -> Result<Option<StreamingInfo>> {
    let eo = options.expert_cache;
    if options.max_memory.is_none() && eo.slots.is_none() && eo.resident_layers.is_none() {
        return Ok(None);
    }
    let weights: usize = model.weight_dtypes().iter().map(|(_, b)| b).sum();
    let expert_bytes = model.moe_stats().map_or(0, |s| s.expert_bytes_total as usize);
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    // Kept out of the weights' share: the KV cache and scratch, and the rest of the process.
    let reserve_bytes = options.max_memory.map_or(0, |m| memory_reserve(m) + RUNTIME_ALLOWANCE);
    let (layer_bytes, always_resident) = model.layer_bytes();
    let too_small = |max: usize, needed: usize, what: &str| {
        Error::Config(format!(
            "--max-memory {:.2} GiB is too small for this model: {what}, and {:.2} GiB is kept for the KV cache, \
             scratch, tokenizer and code; give at least {:.2} GiB",
            gib(max),
            gib(reserve_bytes),
            gib(needed + reserve_bytes) + 0.01
        ))
    };
    let info = |cache: std::sync::Arc<ExpertCache>, resident_bytes, expert_bytes, streamed_layers| {
        Some(StreamingInfo {
            max_memory: options.max_memory,
            resident_bytes,
            reserve_bytes,
            expert_bytes,
            slots: cache.num_slots(),
            slot_bytes: cache.slot_bytes(),
            streamed_layers,
            options: eo,
        })
    };
    // Dense layers: the first `resident` stay, the rest stream through a ring of slots.
    let stream_layers = |model: &mut DecoderModel, resident: usize| -> Result<Option<StreamingInfo>> {
        // Streaming checks `resident` against the layers first.
        let cache = model.stream_layers(resident, eo)?;
        let kept = always_resident + layer_bytes[..resident].iter().sum::<usize>();
        Ok(info(cache, kept, 0, Some((resident, layer_bytes.len()))))
    };
    let stream_experts = |model: &mut DecoderModel, slots: usize| -> Result<Option<StreamingInfo>> {
        Ok(info(model.stream_experts(slots, eo)?, weights - expert_bytes, expert_bytes, None))
    };
    if let Some(resident) = eo.resident_layers {
        return stream_layers(model, resident);
    }
    if let Some(slots) = eo.slots {
        return stream_experts(model, slots);
    }
    let Some(max) = options.max_memory else { return Ok(None) };
    if weights + reserve_bytes <= max {
        return Ok(None);
    }
    if expert_bytes > 0 {
        let resident = weights - expert_bytes;
        let Some(left) = max.checked_sub(resident + reserve_bytes) else {
            let what = format!("{:.2} GiB of weights besides the routed experts must stay in memory", gib(resident));
            return Err(too_small(max, resident, &what));
        };
        let slot_bytes = match model.expert_parts()? {
            Some((_, experts)) => ExpertCache::slot_bytes_for(&experts).max(1),
            None => 1,
        };
        let slots = left / slot_bytes;
        if slots == 0 {
            let what = format!(
                "not one routed expert ({slot_bytes} bytes) fits beside {:.2} GiB of other weights",
                gib(resident)
            );
            return Err(too_small(max, resident + slot_bytes, &what));
        }
        return stream_experts(model, slots);
    }
    // A dense model: as many leading layers stay as fit beside the head, the embedding and a
    // ring of slots for the others.
    let ring = (crate::models::decoder::LAYERS_AHEAD + 1) * model.layer_slot_bytes(0)?;
    let fixed = always_resident + ring;
    let Some(mut budget) = max.checked_sub(fixed + reserve_bytes) else {
        let what = format!(
            "the LM head and embedding ({:.2} GiB) stay in memory beside {} streamed layers ({:.2} GiB)",
            gib(always_resident),
            crate::models::decoder::LAYERS_AHEAD + 1,
            gib(ring)
        );
        return Err(too_small(max, fixed, &what));
    };
    let mut resident = 0;
    while resident + 1 < layer_bytes.len() && layer_bytes[resident] <= budget {
        budget -= layer_bytes[resident];
        resident += 1;
    }
    stream_layers(model, resident)
}

/// Bytes of memory the system could give this process now without swapping (Linux's
/// `MemAvailable`: free memory plus what the page cache could drop); `None` where unknown.
pub fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn load_gguf(path: &Path, options: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let mut config = gguf_config(&g)?;
    let mut ckpt = g.checkpoint();
    let mut processor = None;
    let mmproj = match &options.mmproj {
        Some(p) if config.arch != Arch::Qwen3Vl => {
            return Err(Error::file(
                p,
                format!("--mmproj: the model {} ({}) takes no images", path.display(), config.arch_name),
            ))
        }
        Some(p) => Some(p.clone()),
        None => Some(crate::mmproj::default_path(path)).filter(|p| config.arch == Arch::Qwen3Vl && p.is_file()),
    };
    if let Some(mp) = &mmproj {
        let vision = crate::mmproj::read(mp, &g, &config)?;
        let mut all: std::collections::BTreeMap<String, crate::weights::Tensor> =
            ckpt.tensors().map(|(n, t)| (n.to_string(), t.clone())).collect();
        all.extend(vision.checkpoint.tensors().map(|(n, t)| (n.to_string(), t.clone())));
        ckpt = crate::weights::Checkpoint::new(path.to_path_buf(), all);
        config.vision = Some(vision.config);
        processor = Some(vision.processor);
    }
    let quantized = quantize_at_load(&mut ckpt, &config, options);
    let mut model = DecoderModel::load_multimodal_with(config.clone(), ckpt, processor, options.mtp, progress)?;
    model.set_bf16_activations(options.bf16_activations);
    let streaming = fit_in_memory(&mut model, options)?;
    let repacked = repack_at_load(&mut model, options, streaming.is_none());
    model.populate_stream_caches();
    let tokenizer = tokenizer_from_gguf(&g).map_err(|e| e.to_string());
    let mut generation = GenerationDefaults::default();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = g.get(key).and_then(GValue::as_u64) {
            if !generation.eos_token_ids.contains(&(id as u32)) {
                generation.eos_token_ids.push(id as u32);
            }
        }
    }
    // A GGUF file carries no generation_config: the sampling its publisher recommends, where
    // known by its name.
    let mut name: Vec<&str> =
        ["general.basename", "general.name", "general.finetune"].iter().filter_map(|k| g.get_str(k).ok()).collect();
    name.extend(path.file_name().and_then(|n| n.to_str()));
    recommended_sampling(&name.join(" "), &mut generation);
    let mut info = model_info(path, "gguf", &config, &model, quantized, repacked, streaming);
    info.mmproj = mmproj;
    Ok(LoadedModel { model: Box::new(model), tokenizer, generation, info })
}

/// Fills `g`'s sampling values with what the publisher of the model named `name` (a GGUF
/// file's `general.basename`, `general.name`, `general.finetune` and file name) recommends, where that is
/// known: a model card or the `generation_config.json` of the original checkpoint. A small
/// instruct model sampled at the CLI's generic defaults (temperature 0.8) can drift into
/// repeating itself; SmolLM2-135M-Instruct did on one seed of two.
fn recommended_sampling(name: &str, g: &mut GenerationDefaults) {
    let n = name.to_ascii_lowercase();
    // (temperature, top_k, top_p, min_p, repetition_penalty)
    let (t, k, p, m, r) = if n.contains("smollm2") {
        // HuggingFaceTB/SmolLM2-*-Instruct model cards.
        (0.2, None, 0.9, None, None)
    } else if n.contains("qwen3") && n.contains("coder") {
        // Qwen3-Coder cards ("best practices").
        (0.7, Some(20), 0.8, None, Some(1.05))
    } else if n.contains("qwen3") && n.contains("2507") {
        // Qwen3-*-Instruct-2507 cards.
        (0.7, Some(20), 0.8, Some(0.0), None)
    } else if n.contains("qwen3") {
        // Qwen3 cards, thinking mode (the default of their chat template).
        (0.6, Some(20), 0.95, Some(0.0), None)
    } else if n.contains("qwen2.5") && n.contains("instruct") {
        // Qwen2.5 Instruct generation_config.json.
        (0.7, Some(20), 0.8, None, Some(1.05))
    } else {
        return;
    };
    g.temperature = g.temperature.or(Some(t));
    g.top_k = g.top_k.or(k);
    g.top_p = g.top_p.or(Some(p));
    g.min_p = g.min_p.or(m);
    g.repetition_penalty = g.repetition_penalty.or(r);
}

/// Rebuilds the tokenizer a GGUF file carries in its metadata.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tokenizer> {
    let strings = |key: &str| -> Result<Vec<String>> {
        match g.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| Error::file(&g.path, format!("{key} is not an array of strings"))),
        }
    };
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(GValue::as_str)
        .ok_or_else(|| Error::file(&g.path, "no tokenizer in this GGUF file (tokenizer.ggml.model missing)"))?
        .to_string();
    let tokens = strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(Error::file(&g.path, "tokenizer.ggml.tokens is missing or empty"));
    }
    let token_types = match g.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|t| t.as_i64().map(|t| t as i32)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Error::file(&g.path, "tokenizer.ggml.token_type is not an array of integers"))?,
    };
    let id = |key: &str| g.get(key).and_then(GValue::as_u64).map(|v| v as u32);
    let vocab = GgufVocab {
        model,
        pre: g.get("tokenizer.ggml.pre").and_then(GValue::as_str).map(str::to_string),
        tokens,
        token_types,
        merges: strings("tokenizer.ggml.merges")?,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        eot_token_id: id("tokenizer.ggml.eot_token_id"),
        add_bos_token: g.get("tokenizer.ggml.add_bos_token").and_then(GValue::as_bool).unwrap_or(false),
        chat_template: g.get("tokenizer.chat_template").and_then(GValue::as_str).map(str::to_string),
    };
    Tokenizer::from_gguf_vocab(vocab).map_err(|e| Error::file(&g.path, e.to_string()))
}

fn model_info(
    path: &Path,
    format: &'static str,
    config: &ModelConfig,
    model: &DecoderModel,
    quantized: Option<(DType, f64)>,
    repacked: Option<(usize, usize, f64)>,
    streaming: Option<StreamingInfo>,
) -> ModelInfo {
    let mut weight_types: Vec<(DType, usize, usize)> = Vec::new();
    for (dtype, bytes) in model.weight_dtypes() {
        match weight_types.iter_mut().find(|(d, _, _)| *d == dtype) {
            Some(e) => {
                e.1 += 1;
                e.2 += bytes;
            }
            None => weight_types.push((dtype, 1, bytes)),
        }
    }
    ModelInfo {
        path: path.to_path_buf(),
        format,
        arch: config.arch_name.clone(),
        num_params: config.num_params(),
        weight_bytes: weight_types.iter().map(|w| w.2).sum(),
        decode_bytes_per_token: model.decode_bytes_per_token(),
        weight_types,
        quantized,
        repacked,
        streaming,
        mmproj: None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("malformed JSON: {e}")))
}

fn add_eos_ids(ids: &mut Vec<u32>, v: Option<&Value>) {
    let mut push = |v: &Value| {
        if let Some(id) = v.as_u64() {
            if !ids.contains(&(id as u32)) {
                ids.push(id as u32);
            }
        }
    };
    match v {
        Some(Value::Array(a)) => a.iter().for_each(&mut push),
        Some(v) => push(v),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_sampling_by_gguf_name() {
        let of = |name: &str| {
            let mut g = GenerationDefaults::default();
            recommended_sampling(name, &mut g);
            (g.temperature, g.top_k, g.top_p, g.min_p, g.repetition_penalty)
        };
        // The fetched SmolLM2 file's `general.basename`, `general.name`, `general.finetune`.
        let smollm2 = (Some(0.2), None, Some(0.9), None, None);
        assert_eq!(of("smollm2 Smollm2 135M 8k Lc100K Mix1 Ep2 8k-lc100k-mix1-ep2"), smollm2);
        assert_eq!(
            of("Qwen2.5-Coder Qwen2.5 Coder 0.5B Instruct AWQ Instruct-AWQ"),
            (Some(0.7), Some(20), Some(0.8), None, Some(1.05))
        );
        assert_eq!(of("Qwen3 Qwen3 4B Instruct 2507 Instruct-2507"), (Some(0.7), Some(20), Some(0.8), Some(0.0), None));
        assert_eq!(of("Llama-3.2 Llama 3.2 1B Instruct"), (None, None, None, None, None));
        // The checkpoint's own values win.
        let mut g = GenerationDefaults { temperature: Some(1.0), ..Default::default() };
        recommended_sampling("Qwen3 0.6B", &mut g);
        assert_eq!((g.temperature, g.top_k), (Some(1.0), Some(20)));
    }
}
