//! Routed experts streamed from disk (`--max-memory`, `LoadOptions::expert_cache`) compute the
//! same bits as resident ones on every mixture family, from safetensors (unaligned offsets) and
//! from a quantized GGUF file, under batching, chunked prefill and preemption, with a cache of
//! two experts; so do a dense model's streamed layers (none, one or all but one resident); a file
//! truncated after loading fails the requests with a clear error.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use pio_engine::engine::{Engine, EngineConfig, RequestParams};
use pio_kernels::DType;
use pio_model::{EvictionPolicy, ExpertCacheOptions, LoadOptions, LoadedModel};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name)
}

fn load(path: &Path, cache: Option<ExpertCacheOptions>) -> LoadedModel {
    let options = LoadOptions { expert_cache: cache.unwrap_or_default(), ..Default::default() };
    pio_model::load_with(path, &options, &mut |_, _| {}).expect("model loads")
}

fn streamed(slots: usize, policy: EvictionPolicy, prefetch: bool) -> ExpertCacheOptions {
    ExpertCacheOptions { slots: Some(slots), policy, prefetch, io_threads: 3, ..Default::default() }
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 7919)) % 500 + 3).collect()
}

/// Three requests (two share a prompt) through an engine with a small cache and a small token
/// budget: prompt logits and greedy tokens of each, and the preemptions seen.
fn run(loaded: &LoadedModel) -> (Vec<Vec<f32>>, Vec<Vec<u32>>, u64) {
    let cfg = EngineConfig {
        block_size: 16,
        num_blocks: 9,
        max_num_seqs: 8,
        max_batch_tokens: 24,
        max_model_len: 144,
        prefix_caching: true,
        kv_cache_type: Default::default(),
        max_memory: None,
        spec: None,
    };
    let mut engine = Engine::new(loaded.model.as_ref(), None, cfg).expect("engine");
    let reqs = [(prompt(70, 3), 12), (prompt(45, 8), 20), (prompt(70, 3), 30)];
    let ids: Vec<u64> = reqs
        .iter()
        .map(|(p, n)| {
            let params = RequestParams { max_tokens: Some(*n), prompt_logits: Some(30), ..Default::default() };
            engine.add_request(p.clone(), params).expect("request")
        })
        .collect();
    let mut logits = vec![Vec::new(); reqs.len()];
    let mut tokens = vec![Vec::new(); reqs.len()];
    while engine.has_work() {
        for o in engine.step().expect("step") {
            let i = ids.iter().position(|&id| id == o.id).expect("known id");
            logits[i].extend_from_slice(&o.prompt_logits);
            tokens[i].extend(&o.token_ids);
        }
    }
    (logits, tokens, engine.metrics().preemptions.load(Ordering::Relaxed))
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn check_family(path: &Path) {
    let resident = load(path, None);
    assert!(resident.info.streaming.is_none());
    let (want_logits, want_tokens, preempted) = run(&resident);
    assert!(preempted > 0, "the cache is small enough to preempt");
    for (slots, policy, prefetch) in
        [(2, EvictionPolicy::Lru, true), (2, EvictionPolicy::Frequency, false), (5, EvictionPolicy::Frequency, true)]
    {
        let s = load(path, Some(streamed(slots, policy, prefetch)));
        let info = s.info.streaming.expect("experts stream");
        assert_eq!(info.slots, slots);
        let (logits, tokens, _) = run(&s);
        for (i, (a, b)) in logits.iter().zip(&want_logits).enumerate() {
            assert!(
                same_bits(a, b),
                "{}: request {i}'s prompt logits differ ({slots} slots, {policy})",
                path.display()
            );
        }
        assert_eq!(tokens, want_tokens, "{}: {slots} slots, {policy}", path.display());
        let st = s.model.expert_cache_stats().expect("cache stats");
        assert!(st.misses > 0 && st.bytes_read > 0, "{st:?}");
        assert!(st.hits + st.misses > 0);
        // With two slots both are pinned by the layer that prefetches: nothing is free to read
        // ahead into.
        if prefetch && slots > 2 {
            assert!(st.prefetches > 0, "{st:?}");
        } else if !prefetch {
            assert_eq!(st.prefetches, 0);
        }
    }
}

#[test]
fn streamed_experts_compute_the_same_bits_as_resident_ones() {
    for name in ["qwen3_moe", "glm4_moe_lite", "qwen3_next"] {
        check_family(&fixture(name));
    }
}

#[test]
fn streamed_experts_from_a_quantized_gguf_compute_the_same_bits() {
    let out = std::env::temp_dir().join(format!("pio-streaming-{}-q4k.gguf", std::process::id()));
    pio_model::quantize::write_quantized_gguf(&fixture("qwen3_next"), DType::Q4_K, &out).expect("quantize");
    check_family(&out);
    std::fs::remove_file(&out).expect("remove");
}

#[test]
fn a_memory_bound_streams_only_when_the_model_does_not_fit() {
    let path = fixture("qwen3_moe");
    // A generous bound: nothing changes.
    let roomy = LoadOptions { max_memory: Some(8 << 30), ..Default::default() };
    let m = pio_model::load_with(&path, &roomy, &mut |_, _| {}).expect("loads");
    assert!(m.info.streaming.is_none());
    // A dense model that does not fit is refused with what it needs.
    let tight = LoadOptions { max_memory: Some(1 << 20), ..Default::default() };
    let err = pio_model::load_with(&fixture("qwen3"), &tight, &mut |_, _| {}).err().expect("refused").to_string();
    assert!(err.contains("--max-memory") && err.contains("give at least"), "{err}");
    // The engine refuses, before allocating it, a KV cache larger than what the bound keeps for
    // the cache and scratch.
    let cfg = EngineConfig { max_memory: Some(1 << 30), ..EngineConfig::for_tokens(50_000_000, Default::default()) };
    let err = Engine::new(m.model.as_ref(), None, cfg).err().expect("refused").to_string();
    assert!(err.contains("--max-memory") && err.contains("KV cache"), "{err}");
    let cfg = EngineConfig { max_memory: Some(1 << 30), ..EngineConfig::for_tokens(4096, Default::default()) };
    assert!(Engine::new(m.model.as_ref(), None, cfg).is_ok());
    // Experts quantized at load live in memory: they cannot stream.
    let quant = LoadOptions { quant: Some(DType::Q8_0), expert_cache: streamed(2, EvictionPolicy::Lru, true), ..roomy };
    let err = pio_model::load_with(&path, &quant, &mut |_, _| {}).err().expect("refused").to_string();
    assert!(err.contains("pio quantize"), "{err}");
}

#[test]
fn a_file_truncated_after_loading_fails_the_requests_not_the_process() {
    truncated_after_loading("qwen3_moe", streamed(2, EvictionPolicy::Lru, false));
    truncated_after_loading("qwen3", layers_streamed(1));
}

fn truncated_after_loading(name: &str, options: ExpertCacheOptions) {
    let out = std::env::temp_dir().join(format!("pio-streaming-{}-trunc-{name}", std::process::id()));
    std::fs::create_dir_all(&out).expect("dir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), out.join(f)).expect("copy");
    }
    let m = load(&out, Some(options));
    let len = std::fs::metadata(out.join("model.safetensors")).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(out.join("model.safetensors"))
        .expect("open")
        .set_len(len / 3)
        .expect("truncate");
    let mut engine =
        Engine::new(m.model.as_ref(), None, EngineConfig::for_tokens(256, Default::default())).expect("engine");
    let err = engine.score(&[prompt(40, 1)], 0).expect_err("a read past the end fails").to_string();
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    std::fs::remove_dir_all(&out).expect("remove");
}

fn layers_streamed(resident: usize) -> ExpertCacheOptions {
    ExpertCacheOptions { resident_layers: Some(resident), ..Default::default() }
}

fn check_dense(path: &Path) {
    let resident = load(path, None);
    let (want_logits, want_tokens, preempted) = run(&resident);
    assert!(preempted > 0, "the cache is small enough to preempt");
    let layers = resident.model.shape().num_layers;
    for keep in [1, 0, layers - 1] {
        let s = load(path, Some(layers_streamed(keep)));
        let info = s.info.streaming.expect("layers stream");
        assert_eq!(info.streamed_layers, Some((keep, layers)));
        let (logits, tokens, _) = run(&s);
        for (i, (a, b)) in logits.iter().zip(&want_logits).enumerate() {
            assert!(same_bits(a, b), "{}: request {i}'s prompt logits differ ({keep} resident)", path.display());
        }
        assert_eq!(tokens, want_tokens, "{}: {keep} resident", path.display());
        let st = s.model.expert_cache_stats().expect("stream stats");
        // Every forward reads every streamed layer, ahead of its turn when there are others.
        assert!(st.bytes_read > 0, "{st:?}");
        if layers - keep > 1 {
            assert!(st.prefetches > 0 && st.prefetch_hits > 0, "{st:?}");
        }
    }
}

#[test]
fn streamed_dense_layers_compute_the_same_bits_as_resident_ones() {
    check_dense(&fixture("qwen3"));
    let out = std::env::temp_dir().join(format!("pio-streaming-{}-dense-q4k.gguf", std::process::id()));
    pio_model::quantize::write_quantized_gguf(&fixture("qwen3"), DType::Q4_K, &out).expect("quantize");
    check_dense(&out);
    std::fs::remove_file(&out).expect("remove");
}
