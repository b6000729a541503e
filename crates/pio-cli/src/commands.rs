//! The subcommands.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pio_engine::engine::{Engine, EngineConfig, RequestParams};
use pio_engine::generate::{generate, run_one, GenerateParams};
use pio_engine::sampler::SamplingParams;
use pio_model::chat_template::ChatRequest;
use pio_model::image::PixelValues;
use pio_model::{KvCacheType, LoadedModel, ModelInfo};
use serde_json::{json, Value};

use crate::args::{ChatArgs, Cli, Command, GenerateArgs, LogitsArgs, ModelArgs, SamplingArgs};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Logits(a) => cmd_logits(a),
        Command::Tokenize(a) => {
            let tok = pio_model::load_tokenizer(&a.model)?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading stdin")?;
            let ids = tok.encode(&text, a.add_special_tokens)?;
            out(&format!("{}\n", serde_json::to_string(&ids)?))
        }
        Command::Detokenize(a) => {
            let tok = pio_model::load_tokenizer(&a.model)?;
            if let Some(bad) = a.ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
                bail!("token id {bad} is outside the vocabulary ({} tokens)", tok.vocab_size());
            }
            out(&tok.decode(&a.ids, a.skip_special_tokens)?)
        }
        Command::Bench(a) => crate::bench::cmd_bench(a),
        Command::Perplexity(a) => crate::perplexity::cmd_perplexity(a),
        Command::Quantize(a) => crate::quantize::cmd_quantize(a),
        Command::Serve(a) => crate::serve::cmd_serve(a),
        Command::KvCache(a) => crate::kv_cache::cmd_kv_cache(a),
        Command::Bandwidth(a) => crate::bench::cmd_bandwidth(a),
        Command::Synth(a) => {
            let dtype = a.dtype;
            let start = Instant::now();
            let (config, _scratch) = synth_config(&a.config, &a.set)?;
            pio_model::synth::write_random_checkpoint_with(
                &config,
                a.tokenizer.as_deref(),
                &a.out,
                dtype,
                a.seed,
                a.mtp,
            )?;
            let params = pio_model::config::ModelConfig::from_hf_file(&config)?.num_params();
            let bytes: u64 = match std::fs::read_dir(&a.out) {
                Ok(entries) => entries.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum(),
                Err(_) => std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0),
            };
            eprintln!(
                "wrote {}: {:.1}M parameters ({dtype}), {:.1} MB in {:.1}s",
                a.out.display(),
                params as f64 / 1e6,
                bytes as f64 / 1e6,
                start.elapsed().as_secs_f64()
            );
            let mmproj = pio_model::mmproj::default_path(&a.out);
            if a.out.is_file() && mmproj.is_file() {
                let mb = std::fs::metadata(&mmproj).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
                eprintln!("wrote {} (the vision tower, llama.cpp's mmproj): {mb:.1} MB", mmproj.display());
            }
            Ok(())
        }
        Command::ChatTemplate(a) => {
            let tok = pio_model::load_tokenizer(&a.model)?;
            let template = tok
                .chat_template()
                .with_context(|| format!("{}: the tokenizer has no chat template", a.model.display()))?;
            let text =
                std::fs::read_to_string(&a.request).with_context(|| format!("reading {}", a.request.display()))?;
            let body: Value =
                serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", a.request.display()))?;
            // Image parts are shown as a template that walks the parts renders them (only the
            // tokenizer is loaded here: whether the model takes images is not known).
            let walks = template.walks_content_parts();
            let (req, _) = ChatRequest::from_openai_json_with_images(&body, walks.then_some(""), walks)?;
            out(&template.render(&req)?)
        }
    }
}

/// Writes to stdout and flushes (errors, e.g. a closed pipe, are returned).
pub(crate) fn out(s: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(s.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Loads a model with a progress bar on a terminal; prints details with `--verbose`.
pub(crate) fn load_model(args: &ModelArgs) -> Result<(LoadedModel, f64)> {
    let start = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(args.model.display().to_string());
        bar
    });
    let mut progress = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    let options = args.load_options();
    let loaded = pio_model::load_with(&args.model, &options, &mut progress);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let loaded = loaded?;
    let load_s = start.elapsed().as_secs_f64();
    if args.verbose {
        print_info(&loaded.info, load_s);
    }
    Ok((loaded, load_s))
}

fn print_info(info: &ModelInfo, load_s: f64) {
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    eprintln!("model:        {} ({})", info.path.display(), info.format);
    eprintln!("architecture: {}", info.arch);
    eprintln!("parameters:   {:.1} M", info.num_params as f64 / 1e6);
    let types: Vec<String> = info
        .weight_types
        .iter()
        .map(|(d, n, b)| format!("{d} x{n} ({:.1} MiB)", *b as f64 / (1 << 20) as f64))
        .collect();
    eprintln!("weights:      {}", types.join(", "));
    match info.quantized {
        None => eprintln!("weight bytes: {:.3} GiB (memory-mapped)", gib(info.weight_bytes)),
        Some((target, s)) => {
            eprintln!("weight bytes: {:.3} GiB (quantized to {target} at load in {s:.2} s)", gib(info.weight_bytes))
        }
    }
    if let Some((n, bytes, s)) = info.repacked {
        eprintln!(
            "repacked:     {n} matrices, {:.1} MiB, interleaved for decode in {s:.2} s",
            bytes as f64 / (1 << 20) as f64
        );
    }
    if let Some(st) = &info.streaming {
        match st.streamed_layers {
            Some((resident, total)) => eprintln!(
                "streaming:    layers {resident}..{total} from disk through {} slots of {:.1} MiB; {:.2} GiB of weights \
                 resident (layers 0..{resident}, head, embedding), {:.2} GiB kept for the KV cache, scratch and the rest of the process",
                st.slots,
                st.slot_bytes as f64 / (1 << 20) as f64,
                gib(st.resident_bytes),
                gib(st.reserve_bytes),
            ),
            None => eprintln!(
                "streaming:    routed experts from disk, {} slots of {:.2} MiB ({:.2} of {:.2} GiB of experts, {}, \
                 prefetch {}); {:.2} GiB of other weights resident, {:.2} GiB kept for the KV cache, scratch and the rest of the process",
                st.slots,
                st.slot_bytes as f64 / (1 << 20) as f64,
                gib(st.slots * st.slot_bytes),
                gib(st.expert_bytes),
                st.options.policy,
                if st.options.prefetch { "on" } else { "off" },
                gib(st.resident_bytes),
                gib(st.reserve_bytes),
            ),
        }
    }
    eprintln!("load time:    {load_s:.2} s");
    if let Some(rss) = resident_bytes() {
        eprintln!("resident:     {:.3} GiB (process RSS after load)", gib(rss));
    }
}

/// The process's resident memory, from /proc (Linux); `None` elsewhere.
fn resident_bytes() -> Option<usize> {
    proc_status_bytes("VmRSS:")
}

/// The process's peak resident memory, from /proc (Linux); `None` elsewhere.
pub(crate) fn peak_rss_bytes() -> Option<usize> {
    proc_status_bytes("VmHWM:")
}

fn proc_status_bytes(key: &str) -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Command-line sampling options over the checkpoint's defaults over our defaults.
fn resolve_params(s: &SamplingArgs, loaded: &LoadedModel) -> GenerateParams {
    let d = &loaded.generation;
    GenerateParams {
        sampling: SamplingParams {
            temperature: s.temperature.or(d.temperature).unwrap_or(0.8),
            top_k: s.top_k.or(d.top_k).unwrap_or(40),
            top_p: s.top_p.or(d.top_p).unwrap_or(0.95),
            min_p: s.min_p.or(d.min_p).unwrap_or(0.05),
            repetition_penalty: s.repetition_penalty.or(d.repetition_penalty).unwrap_or(1.0),
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
        },
        max_tokens: s.max_tokens,
        stop_token_ids: d.eos_token_ids.clone(),
        ignore_eos: s.ignore_eos,
        stop: s.stop.clone(),
        attention_window: s.attention_window,
        attention_sinks: s.attention_sinks,
        images: Vec::new(),
        guide: None,
    }
}

/// Why `loaded` takes no images, for an error message.
pub(crate) fn no_images(loaded: &LoadedModel) -> String {
    if loaded.info.arch == "qwen3vl" {
        "this Qwen3-VL GGUF model was loaded without its vision file: pass --mmproj PATH (its mmproj GGUF)".into()
    } else {
        "this model takes no images (text only)".into()
    }
}

/// The images at `paths`, decoded and laid out by `loaded`'s image processor (an error for a
/// model without a vision tower).
fn load_images(loaded: &LoadedModel, paths: &[PathBuf]) -> Result<Vec<Arc<PixelValues>>> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let vision = loaded.model.vision().with_context(|| format!("--image: {}", no_images(loaded)))?;
    paths
        .iter()
        .map(|p| {
            let img = pio_model::image::open(p)?;
            Ok(Arc::new(pio_model::image::preprocess(&img, vision.processor())?))
        })
        .collect()
}

/// How long `ids` is once the engine gives each image its tokens (a single placeholder grows to
/// the image's count), for the context checks; `ids.len()` when they do not match up (the
/// engine then says why).
fn expanded_len(loaded: &LoadedModel, ids: &[u32], images: &[Arc<PixelValues>]) -> usize {
    let Some(v) = loaded.model.vision().filter(|_| !images.is_empty()) else { return ids.len() };
    let counts: Vec<usize> = images.iter().map(|p| p.num_tokens(v.config().spatial_merge_size)).collect();
    pio_engine::vision::expand_image_tokens(ids, v.config().image_token_id, &counts).map_or(ids.len(), |e| e.len())
}

/// The `<|vision_start|><|image_pad|><|vision_end|>` tokens of each image `ids` holds no
/// placeholder for (vision-language models; none otherwise).
fn missing_image_placeholders(loaded: &LoadedModel, ids: &[u32], images: usize) -> Vec<u32> {
    let Some(v) = loaded.model.vision() else { return Vec::new() };
    pio_engine::vision::missing_placeholders(v.config(), ids, images)
}

/// The context a run gets: `--ctx-size`, else the model's length capped at 4096.
fn context_size(s: &SamplingArgs, loaded: &LoadedModel) -> usize {
    s.ctx_size.unwrap_or_else(|| loaded.model.shape().max_position_embeddings.min(4096))
}

fn cmd_generate(mut a: GenerateArgs) -> Result<()> {
    a.model.mtp = a.spec.mtp();
    let (loaded, load_s) = load_model(&a.model)?;
    let images = load_images(&loaded, &a.images)?;
    let prompt_ids = match (&a.prompt, &a.prompt_ids) {
        (_, Some(ids)) if a.chat => bail!("--chat needs --prompt text, not --prompt-ids"),
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let tok = loaded.tokenizer()?;
            if a.chat {
                let mut messages = Vec::new();
                if let Some(sys) = &a.system {
                    messages.push(json!({"role": "system", "content": sys}));
                }
                // The images' placeholders open the message, as Qwen-VL templates render image
                // parts before the text.
                let marks = tok.decode(&missing_image_placeholders(&loaded, &[], images.len()), false)?;
                messages.push(json!({"role": "user", "content": format!("{marks}{text}")}));
                let template = tok.chat_template().context("the model has no chat template")?;
                let rendered = template.render(&ChatRequest {
                    messages,
                    tools: None,
                    add_generation_prompt: true,
                    kwargs: Default::default(),
                })?;
                tok.encode(&rendered, false)?
            } else {
                let ids = tok.encode(text, true)?;
                let mut all = missing_image_placeholders(&loaded, &ids, images.len());
                all.extend(ids);
                all
            }
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let vocab = loaded.model.shape().vocab_size;
    if let Some(bad) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("prompt token id {bad} is outside the vocabulary ({vocab} tokens)");
    }
    // Text output needs the tokenizer; --json with --prompt-ids does not.
    let tokenizer = match (&loaded.tokenizer, a.json && a.sampling.stop.is_empty()) {
        (Ok(t), _) => Some(t),
        (Err(_), true) => None,
        (Err(e), false) => bail!("{e}"),
    };
    let mut params = resolve_params(&a.sampling, &loaded);
    params.guide = a.sampling.guide.guide()?;
    params.images = images;
    let ctx = context_size(&a.sampling, &loaded);
    let prompt_len = expanded_len(&loaded, &prompt_ids, &params.images);
    if prompt_len >= ctx && a.sampling.attention_window.is_none() {
        bail!("the prompt has {prompt_len} tokens, the context holds {ctx} (see --ctx-size)");
    }
    let mut cfg = EngineConfig::for_tokens(ctx, kv_cache_type(&a.model, &loaded)?);
    cfg.max_num_seqs = 1;
    cfg.max_model_len = ctx;
    cfg.max_memory = a.model.max_memory;
    cfg.spec = a.spec.config();
    let draft = a.spec.load_draft(&a.model, &loaded)?;
    let mut engine = Engine::with_draft(loaded.model.as_ref(), tokenizer, cfg, draft.as_deref())?;
    let mut write_err = None;
    let mut on_text = |s: &str| {
        if !a.json && write_err.is_none() {
            write_err = out(s).err();
        }
    };
    let output = generate(&mut engine, &prompt_ids, &params, &mut on_text)?;
    if let Some(e) = write_err {
        return Err(e);
    }
    let rate = |n: usize, d: std::time::Duration| if d.as_secs_f64() > 0.0 { n as f64 / d.as_secs_f64() } else { 0.0 };
    let prefill_tps = rate(prompt_len, output.prefill_time);
    let decode_tps = rate(output.num_decode_steps, output.decode_time);
    if a.json {
        let v = json!({
            "prompt_token_ids": prompt_ids,
            "token_ids": output.token_ids,
            "text": output.text,
            "finish_reason": output.finish_reason.as_str(),
            "timings": {"load_s": load_s, "prefill_tokens_per_s": prefill_tps, "decode_tokens_per_s": decode_tps},
            "spec": a.spec.config().map(|c| {
                let n = engine.metrics().spec_counts();
                json!({
                    "method": c.method.to_string(),
                    "drafts": n.drafts,
                    "draft_tokens": n.draft_tokens,
                    "accepted_tokens": n.accepted_tokens,
                })
            }),
        });
        out(&format!("{v}\n"))?;
    } else {
        out("\n")?;
    }
    if a.model.verbose {
        eprintln!(
            "prompt: {} tokens, {prefill_tps:.1} tok/s; generated: {} tokens, {decode_tps:.1} tok/s; KV cache {:.1} MiB; RSS {:.1} MiB; finish: {}",
            prompt_len,
            output.token_ids.len(),
            engine.cache_bytes() as f64 / (1 << 20) as f64,
            resident_bytes().unwrap_or(0) as f64 / (1 << 20) as f64,
            output.finish_reason.as_str()
        );
    }
    Ok(())
}

fn cmd_chat(mut a: ChatArgs) -> Result<()> {
    a.model.mtp = a.spec.mtp();
    let (loaded, _) = load_model(&a.model)?;
    let tok = loaded.tokenizer()?;
    let template = tok.chat_template().context("the model has no chat template")?;
    let mut params = resolve_params(&a.sampling, &loaded);
    params.guide = a.sampling.guide.guide()?;
    let ctx = context_size(&a.sampling, &loaded);
    // One engine for the whole conversation: each turn's prompt starts with the previous turns,
    // whose K/V the prefix cache still holds.
    let cfg = EngineConfig {
        block_size: 16,
        num_blocks: ctx.div_ceil(16),
        max_num_seqs: 1,
        max_batch_tokens: 512,
        max_model_len: ctx,
        // (The MTP layer needs every prompt position's hidden state.)
        prefix_caching: !a.spec.mtp(),
        kv_cache_type: kv_cache_type(&a.model, &loaded)?,
        max_memory: a.model.max_memory,
        spec: a.spec.config(),
    };
    let draft = a.spec.load_draft(&a.model, &loaded)?;
    let mut engine = Engine::with_draft(loaded.model.as_ref(), Some(tok), cfg, draft.as_deref())?;
    let mut messages = Vec::new();
    if let Some(sys) = &a.system {
        messages.push(json!({"role": "system", "content": sys}));
    }
    let interactive = std::io::stdin().is_terminal();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    // Images of the conversation so far, and those `/image` attached to the next message.
    let (mut images, mut pending) = (Vec::new(), Vec::new());
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/exit" || line == "/quit" {
            break;
        }
        if let Some(path) = line.strip_prefix("/image ") {
            // A bad path is reported and the conversation goes on.
            match load_images(&loaded, &[PathBuf::from(path.trim())]) {
                Ok(mut px) => {
                    pending.append(&mut px);
                    if interactive {
                        eprintln!("(image attached to your next message)");
                    }
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        let marks = tok.decode(&missing_image_placeholders(&loaded, &[], pending.len()), false)?;
        images.append(&mut pending);
        messages.push(json!({"role": "user", "content": format!("{marks}{line}")}));
        let prompt = template.render(&ChatRequest {
            messages: messages.clone(),
            tools: None,
            add_generation_prompt: true,
            kwargs: Default::default(),
        })?;
        let ids = tok.encode(&prompt, false)?;
        let len = expanded_len(&loaded, &ids, &images);
        if len >= ctx && a.sampling.attention_window.is_none() {
            bail!("the conversation has {len} tokens, the context holds {ctx} (see --ctx-size)");
        }
        let mut write_err = None;
        let request = RequestParams { images: images.clone(), ..RequestParams::from(&params) };
        let output = run_one(&mut engine, &ids, request, &mut |s| {
            if write_err.is_none() {
                write_err = out(s).err();
            }
        })?;
        if let Some(e) = write_err {
            return Err(e);
        }
        out("\n")?;
        if a.model.verbose {
            eprintln!(
                "prompt: {} tokens ({} from the prefix cache); generated: {} tokens; finish: {}",
                len,
                output.num_cached_tokens,
                output.token_ids.len(),
                output.finish_reason.as_str()
            );
        }
        messages.push(json!({"role": "assistant", "content": output.text}));
    }
    Ok(())
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let seqs: Vec<Vec<u32>> = a
        .token_ids
        .iter()
        .map(|s| {
            s.split(',')
                .map(|t| t.trim().parse::<u32>().with_context(|| format!("bad token id {t:?} in --token-ids {s:?}")))
                .collect::<Result<Vec<u32>>>()
        })
        .collect::<Result<_>>()?;
    if seqs.iter().any(|s| s.is_empty()) {
        bail!("--token-ids needs at least one id");
    }
    let (loaded, _) = load_model(&a.model)?;
    let shape = loaded.model.shape();
    for s in &seqs {
        if let Some(bad) = s.iter().find(|&&id| id as usize >= shape.vocab_size) {
            bail!("token id {bad} is outside the vocabulary ({} tokens)", shape.vocab_size);
        }
    }
    // Every sequence in one forward.
    let total: usize = seqs.iter().map(|s| s.len().div_ceil(16) * 16).sum();
    let mut cfg = EngineConfig::for_tokens(total, kv_cache_type(&a.model, &loaded)?);
    cfg.max_batch_tokens = total;
    // No more running sequences (nor recurrent-state slots) than there are sequences.
    cfg.max_num_seqs = seqs.len().max(1);
    cfg.max_memory = a.model.max_memory;
    let images = load_images(&loaded, &a.images)?;
    let extra: usize = images.iter().map(|p| p.num_patches()).sum();
    if extra > 0 {
        // The first sequence's placeholders expand: room for at most every patch as a token.
        cfg = EngineConfig::for_tokens(total + extra, cfg.kv_cache_type);
        cfg.max_batch_tokens = total + extra;
        cfg.max_num_seqs = seqs.len().max(1);
        cfg.max_memory = a.model.max_memory;
    }
    let mut engine = Engine::new(loaded.model.as_ref(), None, cfg)?;
    let logits = if images.is_empty() {
        engine.score(&seqs, 0)?
    } else {
        // The first sequence with the images, each scored as `score` does.
        let score = RequestParams { max_tokens: Some(0), prompt_logits: Some(0), ..Default::default() };
        let first = RequestParams { images, ..score.clone() };
        let ids = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| engine.add_request(s.clone(), if i == 0 { first.clone() } else { score.clone() }))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        while engine.has_work() {
            for o in engine.step()? {
                if let Some(i) = ids.iter().position(|&id| id == o.id) {
                    rows[i].extend_from_slice(&o.prompt_logits);
                }
            }
        }
        rows
    };
    write_logits(&a.out, &logits, shape.vocab_size)
}

fn write_logits(path: &Path, logits: &[Vec<f32>], vocab: usize) -> Result<()> {
    let bytes: Vec<Vec<u8>> = logits.iter().map(|l| l.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let mut views = Vec::new();
    for (i, (l, b)) in logits.iter().zip(&bytes).enumerate() {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![l.len() / vocab, vocab], b)?;
        views.push((format!("logits_{i}"), view));
    }
    safetensors::tensor::serialize_to_file(views, None, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The KV cache types the options ask for, checked against the model: an error naming the
/// option when the model's heads cannot be stored so.
pub fn kv_cache_type(a: &ModelArgs, loaded: &LoadedModel) -> Result<KvCacheType> {
    let t = a.kv_cache_type();
    loaded.model.check_kv_cache_type(t).map_err(anyhow::Error::msg)?;
    Ok(t)
}

/// The config `pio synth` builds from: `path` itself, or with `--set KEY=VALUE` overrides a
/// copy in a scratch directory named as `path`'s own (the model's name comes from it), removed
/// when the returned guard drops.
fn synth_config(path: &std::path::Path, set: &[String]) -> Result<(std::path::PathBuf, Option<ScratchDir>)> {
    if set.is_empty() {
        return Ok((path.to_path_buf(), None));
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut json: Value = serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", path.display()))?;
    let obj = json.as_object_mut().with_context(|| format!("{}: not a JSON object", path.display()))?;
    for kv in set {
        let (k, v) = kv.split_once('=').with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        if !obj.contains_key(k) {
            bail!("--set {k}: {} has no key {k:?}", path.display());
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        obj.insert(k.to_string(), value);
    }
    let name = path.parent().and_then(|p| p.file_name()).map_or_else(|| "model".into(), |n| n.to_os_string());
    let scratch = ScratchDir(std::env::temp_dir().join(format!("pio-synth-{}", std::process::id())));
    let dir = scratch.0.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join("config.json");
    std::fs::write(&out, json.to_string()).with_context(|| format!("writing {}", out.display()))?;
    Ok((out, Some(scratch)))
}

/// A directory removed when dropped.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
