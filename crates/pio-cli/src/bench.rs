//! `pio bench`: prefill and decode speed of a model against this machine's memory-bandwidth
//! roofline.
//!
//! Decode reads every weight once per token, so `decode tok/s × weight bytes per token` cannot
//! exceed the memory read bandwidth; `roofline_fraction` says how close we are.

use std::time::Instant;

use anyhow::{bail, Result};
use pio_engine::engine::{Engine, EngineConfig, RequestParams};
use pio_engine::generate::GenerateParams;
use pio_engine::sampler::SamplingParams;
use serde_json::json;

use crate::args::BenchArgs;
use crate::commands::{load_model, out, peak_rss_bytes};

#[derive(Debug, clap::Args)]
pub struct BandwidthArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `pio bandwidth`: the probe of `pio bench`'s roofline alone (about a second and 1 GiB), so a
/// comparison can measure the machine right before and after another program's run: on a
/// shared host the bandwidth left to us changes for minutes at a time, and a decode figure
/// means little without the bandwidth it met.
pub fn cmd_bandwidth(a: BandwidthArgs) -> Result<()> {
    let threads = pio_kernels::parallel::num_threads();
    let bandwidth = pio_kernels::membw::read_bandwidth();
    if a.json {
        let v = json!({ "threads": threads, "mem_bandwidth_bytes_per_s": bandwidth });
        return out(&format!("{v}\n"));
    }
    out(&format!(
        "memory read bandwidth {:.1} GB/s ({threads} threads, best of 4 passes over 1 GiB)\n",
        bandwidth / 1e9
    ))
}

pub fn cmd_bench(mut a: BenchArgs) -> Result<()> {
    a.model.mtp = a.spec.mtp();
    if a.prompt_tokens == 0 || a.batch == 0 {
        bail!("--prompt-tokens and --batch must be positive");
    }
    let (mut loaded, load_s) = load_model(&a.model)?;
    if a.synthetic_routing.is_some() && !loaded.model.set_synthetic_routing(a.synthetic_routing) {
        bail!("--synthetic-routing: the model has no mixture-of-experts layers");
    }
    let shape = loaded.model.shape();
    // The disk's bandwidth is probed before and after the runs (a shared disk's varies); the
    // higher figure is the roofline's denominator.
    let disk_before = loaded.model.probe_disk_bandwidth();
    // Measure once the expert cache's memory is faulted in (it is, in the background, from
    // load on): the steady state a server runs in.
    while loaded.model.expert_cache_stats().is_some_and(|c| !c.populated) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Token ids drawn from the vocabulary with a fixed stride: speed does not depend on them.
    let tokens = |n: usize| -> Vec<u32> { (0..n).map(|i| ((i * 7919 + 13) % shape.vocab_size) as u32).collect() };
    let prompt = tokens(a.prompt_tokens);
    let ctx = (a.prompt_tokens.max(a.depth) + a.gen_tokens + 16) * a.batch;
    let mut cfg = EngineConfig::for_tokens(ctx, crate::commands::kv_cache_type(&a.model, &loaded)?);
    cfg.max_num_seqs = a.batch;
    cfg.max_batch_tokens = a.prompt_tokens * a.batch;
    cfg.max_memory = a.model.max_memory;
    cfg.spec = a.spec.config();
    let draft = a.spec.load_draft(&a.model, &loaded)?;
    // A constraint needs the tokenizer (its grammar is compiled against the token bytes).
    let guide = a.guide.guide()?;
    let tokenizer = match (&guide, &loaded.tokenizer) {
        (None, _) => None,
        (Some(_), Ok(t)) => Some(t),
        (Some(_), Err(e)) => bail!("constrained decoding needs the model's tokenizer: {e}"),
    };
    let mut engine = Engine::with_draft(loaded.model.as_ref(), tokenizer, cfg, draft.as_deref())?;
    let one_token = RequestParams { max_tokens: Some(1), ignore_eos: true, ..Default::default() };

    // Prefill: `batch` prompts in one forward (which also samples each one's first token),
    // best of `repeats`.
    let mut prefill_s = f64::INFINITY;
    let cache_start = loaded.model.expert_cache_stats();
    let mut prefill_cache = None;
    for _ in 0..a.repeats.max(1) {
        for _ in 0..a.batch {
            engine.add_request(prompt.clone(), one_token.clone())?;
        }
        let start = Instant::now();
        let done = engine.step()?;
        prefill_s = prefill_s.min(start.elapsed().as_secs_f64());
        if done.len() != a.batch || engine.has_work() {
            bail!("the {} prompts did not run in one forward", a.batch);
        }
        // The expert cache over the first prefill (later ones find the same experts).
        if prefill_cache.is_none() {
            prefill_cache = cache_start.zip(loaded.model.expert_cache_stats()).map(|(b, e)| e.since(&b));
        }
    }
    let prefill_tps = (a.prompt_tokens * a.batch) as f64 / prefill_s;
    let image = match &a.image {
        Some(path) => Some(bench_image(&a, &loaded, path, &prompt)?),
        None => None,
    };

    // Decode: one sequence, end-of-sequence ignored; best of `repeats`.
    // Sampled at temperature 1 (`--temperature`) with a fixed seed rather than greedy: a random-weight model's
    // greedy continuation soon repeats one token, so a mixture would route every step to the
    // same experts (an expert cache would hit nearly always); sampled tokens vary from step to
    // step as llama-bench's random tokens do. The sampler's cost is in the figure, as it is
    // in any real decode.
    let params = GenerateParams {
        guide: guide.clone(),
        sampling: SamplingParams { seed: Some(1), temperature: a.temperature, ..SamplingParams::default() },
        max_tokens: a.gen_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: true,
        stop: Vec::new(),
        attention_window: None,
        attention_sinks: None,
        images: Vec::new(),
    };
    let deep = tokens(a.depth);
    let decode_prompt = if a.depth > 0 { &deep[..] } else { &prompt[..prompt.len().min(16)] };
    let mut decode_tps: f64 = 0.0;
    // Mixture-of-experts models: what the decode steps read of the routed experts.
    let moe_before = loaded.model.moe_stats();
    let mut decode_steps = 0u64;
    let mut decode_cache: Option<pio_model::ExpertCacheStats> = None;
    // Speculative decoding over the decode runs.
    let mut spec = pio_engine::metrics::SpecCounts::default();
    // Constrained decoding: seconds on masks and grammars over the timed decode steps, and those
    // steps' seconds.
    let guided_s = |e: &Engine| e.metrics().guided_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6;
    let (mut decode_guided_s, mut decode_s) = (0.0, 0.0);
    // Which SIMD level ran the decode steps' one-token products (`pio_kernels::adapt`).
    let levels_before = pio_kernels::adapt::calls_by_level();
    for _ in 0..a.repeats.max(1) {
        // As `generate` (the same request and timing: decode is what follows the first
        // token), stepping here so the expert cache is counted over the decode steps alone.
        let id = engine.add_request(decode_prompt.to_vec(), RequestParams::from(&params))?;
        let mut first = false;
        while !first && engine.has_work() {
            first = engine.step()?.iter().any(|o| o.id == id && !o.token_ids.is_empty());
        }
        let cache_before = loaded.model.expert_cache_stats();
        let spec_before = engine.metrics().spec_counts();
        let guided_before = guided_s(&engine);
        let start = Instant::now();
        let mut steps = 0;
        while engine.has_work() {
            steps += engine.step()?.iter().filter(|o| o.id == id).map(|o| o.token_ids.len()).sum::<usize>();
        }
        let elapsed = start.elapsed().as_secs_f64();
        decode_guided_s += guided_s(&engine) - guided_before;
        decode_s += elapsed;
        let d = engine.metrics().spec_counts().since(&spec_before);
        spec.drafts += d.drafts;
        spec.draft_tokens += d.draft_tokens;
        spec.accepted_tokens += d.accepted_tokens;
        spec.propose_us += d.propose_us;
        if let (Some(b), Some(e)) = (cache_before, loaded.model.expert_cache_stats()) {
            let d = e.since(&b);
            decode_cache = Some(match decode_cache {
                None => d,
                Some(mut acc) => {
                    acc.add(&d);
                    acc
                }
            });
        }
        decode_steps += steps as u64;
        if steps > 0 {
            decode_tps = decode_tps.max(steps as f64 / elapsed);
        }
    }
    let levels_after = pio_kernels::adapt::calls_by_level();
    let decode_levels = [levels_after[0] - levels_before[0], levels_after[1] - levels_before[1]];
    let decode_levels = (decode_levels.iter().sum::<u64>() > 0).then_some(decode_levels);
    // Each generate call also runs its prompt once; that forward is counted too, so the
    // fraction is over every forward of the decode phase (the prompt is at most 16 tokens).
    let moe = match (moe_before, loaded.model.moe_stats()) {
        (Some(b), Some(e)) if decode_steps > 0 => {
            let d = e.since(&b);
            Some((d.fraction_read_per_forward(), d.expert_bytes_total))
        }
        _ => None,
    };

    // Batched decode: `batch` sequences (16-token prompts, each its own) stepping one token
    // each per forward, greedy: aggregate tokens/s over `gen_tokens` steps, best of `repeats`.
    let mut batch_decode_tps: Option<f64> = None;
    let (mut batch_guided_s, mut batch_s) = (0.0, 0.0);
    if a.batch > 1 {
        let request = RequestParams {
            max_tokens: Some(a.gen_tokens + 1),
            ignore_eos: true,
            guide: guide.clone(),
            ..Default::default()
        };
        for _ in 0..a.repeats.max(1) {
            for i in 0..a.batch {
                let mut p = decode_prompt.to_vec();
                let by = i % p.len().max(1);
                p.rotate_left(by);
                engine.add_request(p, request.clone())?;
            }
            // The prompts and first tokens (untimed), then `gen_tokens` steps of `batch` tokens.
            let mut started = std::collections::HashSet::new();
            while started.len() < a.batch && engine.has_work() {
                started.extend(engine.step()?.iter().filter(|o| !o.token_ids.is_empty()).map(|o| o.id));
            }
            let guided_before = guided_s(&engine);
            let start = Instant::now();
            let mut generated = 0;
            while engine.has_work() {
                generated += engine.step()?.iter().map(|o| o.token_ids.len()).sum::<usize>();
            }
            let elapsed = start.elapsed().as_secs_f64();
            batch_guided_s += guided_s(&engine) - guided_before;
            batch_s += elapsed;
            let tps = generated as f64 / elapsed;
            batch_decode_tps = Some(batch_decode_tps.map_or(tps, |b: f64| b.max(tps)));
        }
    }

    // Before the bandwidth probe, whose 1 GiB buffer would otherwise be the peak.
    let peak_rss = peak_rss_bytes().unwrap_or(0);
    let bandwidth = pio_kernels::membw::read_bandwidth();
    let disk_bandwidth = match (disk_before, loaded.model.probe_disk_bandwidth()) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    // Streamed experts: per decode token, bytes read from disk and the disk's roofline.
    let streaming = decode_cache.filter(|_| decode_steps > 0).map(|c| {
        let per_token = c.bytes_read as f64 / decode_steps as f64;
        let disk_roofline = disk_bandwidth.map(|bw| per_token * decode_tps / bw);
        (c, per_token, disk_roofline)
    });
    let bytes_per_token = loaded.info.decode_bytes_per_token;
    let roofline_tps = bandwidth / bytes_per_token as f64;
    let expert_cache = loaded.info.streaming.map(|s| {
        json!({
            "slots": s.slots,
            "slot_bytes": s.slot_bytes,
            "policy": s.options.policy.to_string(),
            "prefetch": s.options.prefetch && a.synthetic_routing.is_none(),
            "resident_weight_bytes": s.resident_bytes,
            "streamed_layers": s.streamed_layers.map(|(resident, total)| total - resident),
            "direct_io": loaded.model.expert_cache_stats().map(|c| c.direct_io),
            "disk_read_bytes_per_s": disk_bandwidth,
            "prefill_hit_rate": prefill_cache.map(|c| c.hit_rate()),
            "prefill_disk_bytes_per_token": prefill_cache.map(|c| c.bytes_read as f64 / (a.prompt_tokens * a.batch) as f64),
            "decode_hit_rate": streaming.map(|s| s.0.hit_rate()),
            "decode_hits": streaming.map(|s| s.0.hits),
            "decode_misses": streaming.map(|s| s.0.misses),
            "decode_prefetches": streaming.map(|s| s.0.prefetches),
            "decode_prefetch_hits": streaming.map(|s| s.0.prefetch_hits),
            "decode_disk_bytes_per_token": streaming.map(|s| s.1),
            "decode_read_hidden_fraction": streaming.map(|s| s.0.hidden_fraction()),
            "disk_roofline_fraction": streaming.and_then(|s| s.2),
            "decode_disk_read_bytes_per_s": streaming.map(|s| s.1 * decode_tps),
        })
    });
    let spec_json = a.spec.config().map(|c| {
        json!({
            "method": c.method.to_string(),
            "num_tokens": c.num_tokens,
            "ngram_max": (c.method == pio_engine::spec::SpecMethod::Ngram).then_some(c.ngram_max),
            "draft_model": a.spec.draft_model.as_ref().map(|p| p.display().to_string()),
            "drafts": spec.drafts,
            "draft_tokens": spec.draft_tokens,
            "accepted_tokens": spec.accepted_tokens,
            "acceptance_rate": spec.acceptance_rate(),
            "mean_accepted_length": spec.mean_accepted_length(),
            "propose_s": spec.propose_us as f64 / 1e6,
        })
    });
    let v = json!({
        "model": a.model.model.display().to_string(),
        "arch": loaded.info.arch,
        "threads": pio_kernels::parallel::num_threads(),
        "simd": pio_kernels::cpu::label(),
        "load_s": load_s,
        "quant": loaded.info.quantized.map(|(d, _)| d.name()),
        "repacked_bytes": loaded.info.repacked.map(|r| r.1),
        "prompt_tokens": a.prompt_tokens,
        "batch": a.batch,
        "gen_tokens": a.gen_tokens,
        "depth": a.depth,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps,
        "batch_decode_tokens_per_s": batch_decode_tps,
        "decode_products_by_level": decode_levels.map(|[wide, narrow]| json!({"avx512": wide, "avx2": narrow})),
        "spec": spec_json,
        "guided": guide.as_ref().map(|_| json!({
            "decode_tokens": decode_steps,
            "decode_guided_fraction": decode_guided_s / decode_s.max(1e-9),
            "batch_decode_guided_fraction": (a.batch > 1).then(|| batch_guided_s / batch_s.max(1e-9)),
        })),
        "peak_rss_bytes": peak_rss,
        "kv_cache_dtype": a.model.kv_cache_type().to_string(),
        "cache_type_k": a.model.kv_cache_type().k.name(),
        "cache_type_v": a.model.kv_cache_type().v.name(),
        "kv_cache_bytes": engine.cache_bytes(),
        "weight_bytes_per_token": bytes_per_token,
        "mem_bandwidth_bytes_per_s": bandwidth,
        "decode_roofline_tokens_per_s": roofline_tps,
        "roofline_fraction": decode_tps / roofline_tps,
        "expert_fraction_read_per_decode_step": moe.map(|m| m.0),
        "expert_bytes_total": moe.map(|m| m.1),
        "max_memory": loaded.info.streaming.and_then(|s| s.max_memory),
        "synthetic_routing_zipf": a.synthetic_routing,
        "expert_cache": expert_cache,
        "image": image.as_ref().map(|i| json!({
            "width": i.size.0,
            "height": i.size.1,
            "patches": i.patches,
            "tokens": i.tokens,
            "preprocess_s": i.preprocess_s,
            "encode_s": i.encode_s,
            "prompt_tokens": i.prompt_tokens,
            "prefill_tokens_per_s": i.prefill_tps,
        })),
    });
    if a.json {
        out(&format!("{v}\n"))
    } else {
        out(&format!(
            "{}: {} threads, {}\n  prefill {:>8.1} tok/s ({} x {} tokens)\n  decode  {:>8.1} tok/s ({} tokens)\n  roofline {:.1} tok/s = {:.1} GB/s read / {:.1} MB per token -> {:.0}% achieved\n  peak RSS {:.1} MiB, KV cache {:.1} MiB ({})\n",
            loaded.info.arch,
            pio_kernels::parallel::num_threads(),
            pio_kernels::cpu::label(),
            prefill_tps,
            a.batch,
            a.prompt_tokens,
            decode_tps,
            a.gen_tokens,
            roofline_tps,
            bandwidth / 1e9,
            bytes_per_token as f64 / 1e6,
            100.0 * decode_tps / roofline_tps,
            peak_rss as f64 / (1 << 20) as f64,
            engine.cache_bytes() as f64 / (1 << 20) as f64,
            a.model.kv_cache_type(),
        ))?;
        if let (Some(c), true) = (a.spec.config(), spec.drafts > 0) {
            out(&format!(
                "  speculative decoding ({}, up to {} tokens): {} of {} proposed tokens accepted ({:.1}%), {:.2} tokens per verifying step, proposing {:.2} ms per verifying step\n",
                c.method,
                c.num_tokens,
                spec.accepted_tokens,
                spec.draft_tokens,
                100.0 * spec.acceptance_rate(),
                spec.mean_accepted_length(),
                spec.propose_us as f64 / 1e3 / spec.drafts as f64,
            ))?;
        }
        if let Some([wide, narrow]) = decode_levels {
            out(&format!(
                "  decode products at AVX-512 / AVX2 (the faster of late): {:.0}% / {:.0}% of {}\n",
                100.0 * wide as f64 / (wide + narrow) as f64,
                100.0 * narrow as f64 / (wide + narrow) as f64,
                wide + narrow,
            ))?;
        }
        if let Some(tps) = batch_decode_tps {
            out(&format!("  batched decode {:>8.1} tok/s ({} sequences, one token each per step)\n", tps, a.batch))?;
        }
        if guide.is_some() {
            out(&format!(
                "  constrained decoding: {:.1}% of the decode time on token masks and grammars{}\n",
                100.0 * decode_guided_s / decode_s.max(1e-9),
                if a.batch > 1 {
                    format!(", {:.1}% of the batched decode's", 100.0 * batch_guided_s / batch_s.max(1e-9))
                } else {
                    String::new()
                },
            ))?;
        }
        if let Some(i) = &image {
            out(&format!(
                "  image {}x{} -> {} patches, {} tokens: preprocess {:.1} ms, vision tower {:.3} s ({:.0} patches/s); prefill of its prompt {:>8.1} tok/s ({} tokens)\n",
                i.size.0,
                i.size.1,
                i.patches,
                i.tokens,
                1e3 * i.preprocess_s,
                i.encode_s,
                i.patches as f64 / i.encode_s,
                i.prefill_tps,
                i.prompt_tokens,
            ))?;
        }
        if let (Some(info), Some(p)) = (loaded.info.streaming, prefill_cache) {
            let what = match info.streamed_layers {
                Some((resident, total)) => format!("layers {resident}..{total} streamed, ring of"),
                None => "expert cache:".to_string(),
            };
            out(&format!(
                "  {what} {} slots x {:.2} MiB ({}, prefetch {}, {}); prefill hit rate {:.1}%, {:.2} MB read per token\n",
                info.slots,
                info.slot_bytes as f64 / (1 << 20) as f64,
                info.options.policy,
                match (info.options.prefetch, a.synthetic_routing) {
                    (_, Some(_)) => "off: synthetic routing",
                    (true, None) => "on",
                    (false, None) => "off",
                },
                if p.direct_io { "direct I/O" } else { "buffered I/O" },
                100.0 * p.hit_rate(),
                p.bytes_read as f64 / (a.prompt_tokens * a.batch) as f64 / 1e6,
            ))?;
        }
        if let Some((c, per_token, disk_roofline)) = streaming {
            out(&format!(
                "  decode from disk: hit rate {:.1}% ({} hits, {} misses; {} prefetched, {} of them used), {:.1} MB read per token, {:.0}% of reading hidden behind compute\n",
                100.0 * c.hit_rate(),
                c.hits,
                c.misses,
                c.prefetches,
                c.prefetch_hits,
                per_token / 1e6,
                100.0 * c.hidden_fraction(),
            ))?;
            if let (Some(bw), Some(f)) = (disk_bandwidth, disk_roofline) {
                out(&format!(
                    "  disk roofline: {:.2} GB/s read (best of two probes; decode read {:.2} GB/s) / {:.1} MB per token = {:.2} tok/s -> {:.0}% achieved\n",
                    bw / 1e9,
                    per_token * decode_tps / 1e9,
                    per_token / 1e6,
                    bw / per_token.max(1.0),
                    100.0 * f
                ))?;
            }
        }
        if let Some((fraction, total)) = moe {
            out(&format!(
                "  experts: {:.1}% of the {:.1} GB of routed-expert weights read per decode step\n",
                100.0 * fraction,
                total as f64 / 1e9
            ))?;
        }
        Ok(())
    }
}

/// What `--image` measured.
struct ImageBench {
    size: (usize, usize),
    patches: usize,
    tokens: usize,
    preprocess_s: f64,
    encode_s: f64,
    prompt_tokens: usize,
    prefill_tps: f64,
}

/// The image at `path` through the processor and the vision tower (best of `--repeats`), then
/// the prefill of its tokens followed by `text` in one forward (best of `--repeats`).
fn bench_image(
    a: &BenchArgs,
    loaded: &pio_model::LoadedModel,
    path: &std::path::Path,
    text: &[u32],
) -> Result<ImageBench> {
    let model = loaded.model.as_ref();
    let Some(vision) = model.vision() else { bail!("--image: {}", crate::commands::no_images(loaded)) };
    let img = pio_model::image::open(path)?;
    let (mut preprocess_s, mut encode_s) = (f64::INFINITY, f64::INFINITY);
    let mut pixels = None;
    for _ in 0..a.repeats.max(1) {
        let start = Instant::now();
        let p = pio_model::image::preprocess(&img, vision.processor())?;
        preprocess_s = preprocess_s.min(start.elapsed().as_secs_f64());
        let start = Instant::now();
        vision.encode(&p)?;
        encode_s = encode_s.min(start.elapsed().as_secs_f64());
        pixels = Some(p);
    }
    let Some(pixels) = pixels else { bail!("no repeats") };
    let c = vision.config();
    let tokens = pixels.num_tokens(c.spatial_merge_size);
    let mut prompt = pio_engine::vision::missing_placeholders(c, &[], 1);
    prompt.extend_from_slice(text);
    let prompt_tokens = prompt.len() - 1 + tokens;
    let patches = pixels.num_patches();
    let mut cfg = EngineConfig::for_tokens(prompt_tokens + 16, crate::commands::kv_cache_type(&a.model, loaded)?);
    cfg.max_batch_tokens = prompt_tokens;
    cfg.max_num_seqs = 1;
    let mut engine = Engine::new(model, None, cfg)?;
    let params = RequestParams {
        max_tokens: Some(1),
        ignore_eos: true,
        images: vec![std::sync::Arc::new(pixels)],
        ..Default::default()
    };
    let mut prefill_s = f64::INFINITY;
    for _ in 0..a.repeats.max(1) {
        engine.add_request(prompt.clone(), params.clone())?;
        // The tower, timed above, outside the prefill's time.
        engine.encode_images()?;
        let start = Instant::now();
        let done = engine.step()?;
        prefill_s = prefill_s.min(start.elapsed().as_secs_f64());
        if done.len() != 1 || engine.has_work() {
            bail!("the image prompt did not run in one forward");
        }
    }
    Ok(ImageBench {
        size: (img.width, img.height),
        patches,
        tokens,
        preprocess_s,
        encode_s,
        prompt_tokens,
        prefill_tps: prompt_tokens as f64 / prefill_s,
    })
}
