//! The engine on a tiny random-weight Qwen3: concurrent requests give exactly the greedy tokens
//! each gives alone (whatever the batch, the prefill chunking, prefix-cache hits or preemption),
//! a shared prefix is computed once, and cancelled requests give their blocks back.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pio_engine::engine::{Engine, EngineConfig, FinishReason, RequestParams};
use pio_engine::handle::{EngineHandle, Event};
use pio_engine::sampler::SamplingParams;
use pio_engine::EngineError;
use pio_model::{CausalLm, LoadedModel};

fn model() -> LoadedModel {
    model_of("qwen3")
}

fn model_of(name: &str) -> LoadedModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name);
    pio_model::load(&dir, &mut |_, _| {}).expect("tiny model loads")
}

/// The dense model, both mixture-of-experts families (GLM's cache holds latents) and the
/// hybrid with recurrent state (Qwen3-Next).
const FAMILIES: [&str; 4] = ["qwen3", "qwen3_moe", "glm4_moe_lite", "qwen3_next"];

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 7919)) % 500 + 3).collect()
}

fn config(num_blocks: usize, max_batch_tokens: usize) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks,
        max_num_seqs: 8,
        max_batch_tokens,
        max_model_len: 256.min(num_blocks * 16),
        prefix_caching: true,
        kv_cache_type: Default::default(),
        max_memory: None,
        spec: None,
    }
}

fn greedy(max_tokens: usize) -> RequestParams {
    RequestParams { max_tokens: Some(max_tokens), ..Default::default() }
}

/// Runs requests to completion; returns each one's tokens in submission order.
fn run_all(engine: &mut Engine<'_>, reqs: &[(Vec<u32>, RequestParams)]) -> Vec<Vec<u32>> {
    let ids: Vec<u64> = reqs.iter().map(|(p, r)| engine.add_request(p.clone(), r.clone()).expect("request")).collect();
    let mut out = vec![Vec::new(); reqs.len()];
    let mut finished = 0;
    while engine.has_work() {
        for o in engine.step().expect("step") {
            let i = ids.iter().position(|&id| id == o.id).expect("known id");
            out[i].extend(&o.token_ids);
            finished += o.finish_reason.is_some() as usize;
        }
    }
    assert_eq!(finished, reqs.len());
    out
}

fn alone(model: &dyn CausalLm, p: &[u32], r: &RequestParams) -> Vec<u32> {
    let mut engine = Engine::new(model, None, config(64, 1024)).expect("engine");
    run_all(&mut engine, &[(p.to_vec(), r.clone())]).remove(0)
}

#[test]
fn concurrent_requests_equal_each_alone() {
    for name in FAMILIES {
        concurrent_requests_equal_each_alone_for(name);
    }
}

fn concurrent_requests_equal_each_alone_for(name: &str) {
    let m = model_of(name);
    let reqs: Vec<(Vec<u32>, RequestParams)> =
        (0..8).map(|i| (prompt(5 + i * 9, i as u32), greedy(6 + i % 3 * 4))).collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(|(p, r)| alone(m.model.as_ref(), p, r)).collect();
    // A small token budget: prompts are chunked and share steps with other sequences' decodes.
    for budget in [7, 33, 1024] {
        let mut engine = Engine::new(m.model.as_ref(), None, config(64, budget)).expect("engine");
        assert_eq!(run_all(&mut engine, &reqs), want, "{name}: budget {budget}");
        assert_eq!(engine.metrics().kv_blocks_used.load(Ordering::Relaxed), 0);
    }
    // A cache too small for all of them: sequences are preempted and recomputed.
    let mut engine = Engine::new(m.model.as_ref(), None, config(12, 64)).expect("engine");
    assert_eq!(run_all(&mut engine, &reqs), want, "{name}: with preemption");
    assert!(engine.metrics().preemptions.load(Ordering::Relaxed) > 0, "the small cache should force preemption");
}

#[test]
fn a_shared_prefix_is_computed_once() {
    for name in FAMILIES {
        a_shared_prefix_is_computed_once_for(name);
    }
}

fn a_shared_prefix_is_computed_once_for(name: &str) {
    let m = model_of(name);
    let system = prompt(40, 99);
    let with = |tail: &[u32]| system.iter().chain(tail).copied().collect::<Vec<u32>>();
    let (a, b) = (with(&[7, 8, 9]), with(&[10, 11]));
    let mut engine = Engine::new(m.model.as_ref(), None, config(64, 1024)).expect("engine");
    let first = run_all(&mut engine, &[(a.clone(), greedy(4))]);
    assert_eq!(engine.metrics().prefix_cache_hit_tokens.load(Ordering::Relaxed), 0);
    let second = run_all(&mut engine, &[(b.clone(), greedy(4))]);
    // 40 shared tokens = 2 whole blocks of 16.
    assert_eq!(engine.metrics().prefix_cache_hit_tokens.load(Ordering::Relaxed), 32);
    assert_eq!(first[0], alone(m.model.as_ref(), &a, &greedy(4)));
    assert_eq!(second[0], alone(m.model.as_ref(), &b, &greedy(4)));
}

#[test]
fn stop_tokens_min_tokens_and_lengths() {
    let m = model();
    let p = prompt(10, 3);
    let free = alone(m.model.as_ref(), &p, &greedy(8));
    // The third token as a stop token: generation ends before it.
    let r = RequestParams { stop_token_ids: vec![free[2]], ..greedy(8) };
    let mut engine = Engine::new(m.model.as_ref(), None, config(64, 1024)).expect("engine");
    let id = engine.add_request(p.clone(), r.clone()).expect("add");
    let mut got = Vec::new();
    let mut reason = None;
    while engine.has_work() {
        for o in engine.step().expect("step") {
            assert_eq!(o.id, id);
            got.extend(o.token_ids);
            reason = o.finish_reason.or(reason);
        }
    }
    assert_eq!(reason, Some(FinishReason::Stop));
    assert_eq!(got, free[..2].to_vec());
    // min_tokens masks the stop token until then: a different token comes instead.
    let masked = alone(m.model.as_ref(), &p, &RequestParams { min_tokens: 3, ..r.clone() });
    assert_eq!(masked[..2], free[..2]);
    assert_ne!(masked[2], free[2]);
    // A prompt that fills the context is refused, with the lengths.
    let mut engine = Engine::new(m.model.as_ref(), None, config(64, 1024)).expect("engine");
    match engine.add_request(prompt(256, 1), greedy(1)) {
        Err(EngineError::PromptTooLong { prompt: 256, max_model_len: 256 }) => {}
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    // Without max_tokens, generation runs to the end of the context.
    let out = run_all(&mut engine, &[(prompt(250, 1), RequestParams::default())]);
    assert_eq!(out[0].len(), 6);
}

#[test]
fn seeded_sampling_and_logprobs() {
    let m = model();
    let p = prompt(12, 5);
    let sampled = RequestParams {
        sampling: SamplingParams { temperature: 1.0, seed: Some(42), ..Default::default() },
        logprobs: Some(3),
        ..greedy(5)
    };
    let a = alone(m.model.as_ref(), &p, &sampled);
    let mut engine = Engine::new(m.model.as_ref(), None, config(64, 1024)).expect("engine");
    engine.add_request(prompt(30, 8), greedy(9)).expect("add");
    engine.add_request(p.clone(), sampled.clone()).expect("add");
    let mut got = Vec::new();
    while engine.has_work() {
        for o in engine.step().expect("step") {
            if o.id == 1 {
                assert_eq!(o.logprobs.len(), o.token_ids.len());
                for (t, lp) in o.token_ids.iter().zip(&o.logprobs) {
                    assert_eq!(lp.token, *t);
                    assert_eq!(lp.top.len(), 3);
                    assert!(lp.logprob <= 0.0 && lp.top[0].1 >= lp.logprob);
                }
                got.extend(o.token_ids);
            }
        }
    }
    assert_eq!(got, a, "a seeded request samples the same tokens batched");
}

#[test]
fn the_handle_streams_and_frees_blocks_of_dropped_requests() {
    let m = model();
    let model: Arc<dyn CausalLm> = Arc::from(m.model);
    let handle = EngineHandle::spawn(model.clone(), None, config(64, 64), 2).expect("spawn");
    let want = alone(model.as_ref(), &prompt(20, 1), &greedy(10));
    let mut s = handle.submit(prompt(20, 1), greedy(10)).expect("submit");
    let mut got = Vec::new();
    while let Some(e) = s.blocking_recv() {
        match e {
            Event::Output(o) => got.extend(o.token_ids),
            Event::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, want);
    // A long request dropped after its first token: its blocks come back.
    let mut s = handle.submit(prompt(30, 2), greedy(200)).expect("submit");
    assert!(matches!(s.blocking_recv(), Some(Event::Output(_))));
    drop(s);
    let metrics = handle.metrics().clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metrics.kv_blocks_used.load(Ordering::Relaxed) != 0 || metrics.requests_running.load(Ordering::Relaxed) != 0 {
        assert!(std::time::Instant::now() < deadline, "blocks were not freed");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(metrics.finished[2].load(Ordering::Relaxed), 1, "one abort");
    // Invalid requests are refused at submission.
    assert!(matches!(handle.submit(Vec::new(), greedy(1)), Err(EngineError::Invalid(_))));
    let bad = RequestParams { sampling: SamplingParams { top_p: 0.0, ..Default::default() }, ..greedy(1) };
    assert!(matches!(handle.submit(prompt(3, 0), bad), Err(EngineError::Sampling(_))));
    drop(handle);
    // No room in the queue at all: every request is turned away.
    let handle = EngineHandle::spawn(model, None, config(64, 64), 0).expect("spawn");
    assert!(matches!(handle.submit(prompt(3, 0), greedy(1)), Err(EngineError::QueueFull(_))));
}

/// A model whose every layer has a sliding window (the qwen2-swa fixture with
/// `max_window_layers: 0`: window 8 everywhere) generates past what its cache holds: blocks
/// behind the window go back to the pool, and the tokens are those of a plain forward over the
/// whole sequence, which never releases anything.
#[test]
fn sliding_window_models_release_blocks_and_outgrow_the_cache() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic/qwen2-swa");
    let dir = std::env::temp_dir().join(format!("pio-swa-all-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for f in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).expect("read")).expect("json");
    json["max_window_layers"] = 0.into();
    std::fs::write(dir.join("config.json"), json.to_string()).expect("write config");
    let loaded = pio_model::load(&dir, &mut |_, _| {}).expect("loads");
    let _ = std::fs::remove_dir_all(&dir);
    let model = loaded.model.as_ref();
    assert_eq!(model.attention_window(), Some(8));

    let (prompt, new) = (prompt(20, 5), 60);
    // 10 blocks of 4 tokens: 40 positions, for a sequence of 80.
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: 10,
        max_num_seqs: 2,
        max_batch_tokens: 8,
        max_model_len: 200,
        prefix_caching: true,
        kv_cache_type: Default::default(),
        max_memory: None,
        spec: None,
    };
    let mut engine = Engine::new(model, None, cfg).expect("engine");
    let params = RequestParams { max_tokens: Some(new), ignore_eos: true, ..Default::default() };
    let id = engine.add_request(prompt.clone(), params).expect("request");
    let (mut got, mut most): (Vec<u32>, usize) = (Vec::new(), 0);
    while engine.has_work() {
        for o in engine.step().expect("step") {
            assert_eq!(o.id, id);
            got.extend(&o.token_ids);
        }
        most = most.max(engine.metrics().kv_blocks_used.load(Ordering::Relaxed));
    }
    // The reference: one teacher-forced forward over the whole sequence (which releases
    // nothing) takes the same greedy choice at every position.
    assert_eq!(got.len(), new);
    let mut all = prompt.clone();
    all.extend(&got);
    let mut full = Engine::new(model, None, EngineConfig::for_tokens(128, Default::default())).expect("engine");
    let logits = full.score(&[all], prompt.len() - 1).expect("forward").remove(0);
    let vocab = model.shape().vocab_size;
    let want: Vec<u32> = logits.chunks_exact(vocab).take(new).map(pio_engine::sampler::argmax).collect();
    assert_eq!(got, want, "the same greedy tokens as the full forward");
    // The window (8) plus a forward's tokens (8) and a block either side.
    assert!((3..=6).contains(&most), "3 to 6 of 10 blocks held at once, got {most}");

    // Without the window the same cache is too small for such a request.
    let plain = model_of("qwen2");
    assert!(Engine::new(plain.model.as_ref(), None, cfg).is_err());
}

/// Prompt logits (teacher forcing): every position from the asked one on comes back once, in
/// order, with the bits of a one-forward scoring run, even when the prompt is chunked, shares
/// its steps with decodes, sits in the prefix cache, or is preempted and recomputed; the
/// request still generates after its prompt.
#[test]
fn prompt_logits_come_back_once_whatever_the_schedule() {
    for name in ["qwen3", "qwen3_next"] {
        prompt_logits_come_back_once_for(name);
    }
}

fn prompt_logits_come_back_once_for(name: &str) {
    let m = model_of(name);
    let model = m.model.as_ref();
    let vocab = model.shape().vocab_size;
    let p = prompt(70, 3);
    let want =
        Engine::new(model, None, config(64, 1024)).expect("engine").score(std::slice::from_ref(&p), 40).expect("score");
    assert_eq!(want[0].len(), (p.len() - 40) * vocab);

    // A tight cache (preemptions), a small budget (chunks) and the same prompt twice (prefix
    // cache hits that must not skip the wanted positions).
    let mut engine = Engine::new(model, None, config(9, 24)).expect("engine");
    let with_logits = RequestParams { prompt_logits: Some(40), ..greedy(8) };
    let ids: Vec<u64> = [(p.clone(), greedy(40)), (p.clone(), with_logits.clone()), (p.clone(), with_logits)]
        .into_iter()
        .map(|(pr, r)| engine.add_request(pr, r).expect("request"))
        .collect();
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); 3];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); 3];
    let mut preempted = 0;
    while engine.has_work() {
        for o in engine.step().expect("step") {
            let i = ids.iter().position(|&id| id == o.id).expect("known id");
            rows[i].extend_from_slice(&o.prompt_logits);
            tokens[i].extend(&o.token_ids);
        }
        preempted = engine.metrics().preemptions.load(Ordering::Relaxed);
    }
    assert!(preempted > 0, "the cache is small enough to preempt");
    assert!(rows[0].is_empty(), "no prompt logits unless asked");
    for i in 1..3 {
        assert!(
            rows[i].iter().zip(&want[0]).all(|(a, b)| a.to_bits() == b.to_bits()) && rows[i].len() == want[0].len()
        );
        assert_eq!(tokens[i], alone(model, &p, &greedy(8)), "request {i} generates as without prompt logits");
    }
}

#[test]
fn scoring_requests_are_checked() {
    let m = model();
    let mut engine = Engine::new(m.model.as_ref(), None, config(8, 64)).expect("engine");
    let p = prompt(20, 1);
    let zero = RequestParams { max_tokens: Some(0), ..Default::default() };
    assert!(engine.add_request(p.clone(), zero.clone()).is_err(), "max_tokens 0 without prompt logits");
    let past = RequestParams { prompt_logits: Some(20), ..zero.clone() };
    assert!(engine.add_request(p.clone(), past).is_err(), "prompt logits past the prompt");
    // A scoring request may fill the whole context; a generating one may not.
    let full = prompt(128, 2);
    assert!(engine.add_request(full.clone(), greedy(1)).is_err());
    let scored = engine.score(&[full], 127).expect("scores a full context");
    assert_eq!(scored[0].len(), m.model.shape().vocab_size);
    engine.add_request(p, greedy(2)).expect("request");
    assert!(engine.score(&[prompt(5, 3)], 0).is_err(), "scoring needs an idle engine");
}

fn streaming(max_tokens: usize, window: usize, sinks: usize) -> RequestParams {
    RequestParams {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        attention_window: Some(window),
        attention_sinks: Some(sinks),
        ..Default::default()
    }
}

/// A streaming window (attention sinks) generates far past what the cache holds, holding at
/// most its window's blocks; until the window first fills its tokens are those of plain
/// attention, and after, the same whether it runs alone, beside others with chunked prefill, or
/// preempted and recomputed (for the dense model and the latent-cache one).
#[test]
fn streaming_windows_generate_past_the_cache_in_bounded_memory() {
    for name in ["qwen3", "glm4_moe_lite"] {
        let m = model_of(name);
        let model = m.model.as_ref();
        let (p, window, new) = (prompt(40, 9), 64, 300);
        let params = streaming(new, window, 4);
        // 6 blocks of 16 (96 positions) for 340 tokens.
        let cfg = EngineConfig { max_num_seqs: 4, ..config(6, 32) };
        let mut engine = Engine::new(model, None, cfg).expect("engine");
        let id = engine.add_request(p.clone(), params.clone()).expect("request");
        let (mut got, mut most): (Vec<u32>, usize) = (Vec::new(), 0);
        while engine.has_work() {
            for o in engine.step().expect("step") {
                assert_eq!(o.id, id);
                got.extend(&o.token_ids);
            }
            most = most.max(engine.metrics().kv_blocks_used.load(Ordering::Relaxed));
        }
        assert_eq!(got.len(), new, "{name}: generates past the cache");
        assert!(most <= window / 16, "{name}: at most the window's 4 blocks held, got {most}");
        // Plain attention agrees until the window first fills (prompt 40 + 24 tokens).
        let plain = alone(model, &p, &greedy(30));
        assert_eq!(got[..24], plain[..24], "{name}: same tokens before the first drop");
        assert_ne!(got[..30], plain[..30], "{name}: the window changes what follows");

        // Beside other requests, with a long prompt (past the window) chunked, in a cache that
        // preempts: the same tokens.
        let long = prompt(150, 4);
        let want_long = {
            let mut e = Engine::new(model, None, config(8, 512)).expect("engine");
            run_all(&mut e, &[(long.clone(), streaming(40, window, 4))]).remove(0)
        };
        let mut e = Engine::new(model, None, EngineConfig { max_num_seqs: 4, ..config(9, 24) }).expect("engine");
        let reqs = vec![
            (p.clone(), params.clone()),
            (long.clone(), streaming(40, window, 4)),
            (prompt(30, 5), greedy(40)),
            (prompt(20, 6), greedy(50)),
        ];
        let outs = run_all(&mut e, &reqs);
        assert!(e.metrics().preemptions.load(Ordering::Relaxed) > 0, "{name}: the cache is tight enough to preempt");
        assert_eq!(outs[0], got, "{name}: streaming beside others");
        assert_eq!(outs[1], want_long, "{name}: a streamed long prompt, chunked");
    }
}

#[test]
fn streaming_windows_are_checked() {
    let m = model();
    let mut engine = Engine::new(m.model.as_ref(), None, config(8, 64)).expect("engine");
    let p = prompt(20, 1);
    let bad = [
        (RequestParams { attention_sinks: Some(4), ..greedy(4) }, "needs attention_window"),
        (streaming(4, 64, 64), "smaller than attention_window"),
        (streaming(4, 16, 0), "at least 32"),
        (streaming(4, 40, 4), "at least 48"),
        (streaming(4, 1024, 4), "larger than the context"),
    ];
    for (params, msg) in bad {
        let e = engine.add_request(p.clone(), params).expect_err("refused");
        assert!(e.to_string().contains(msg), "{e}");
    }
    // A prompt longer than the context streams.
    engine.add_request(prompt(300, 2), streaming(4, 64, 4)).expect("streams a long prompt");
    assert!(engine.add_request(prompt(300, 2), greedy(4)).is_err());
}

/// A chat with a model that keeps recurrent state: each turn's prompt repeats the conversation
/// so far, and its prefill resumes from the previous turn's checkpoint, computing only the new
/// tokens and the previous turn's last partial block; the replies are those of a fresh engine.
#[test]
fn the_next_chat_turn_resumes_from_the_recurrent_state_snapshot() {
    let m = model_of("qwen3_next");
    let model = m.model.as_ref();
    let mut engine = Engine::new(model, None, config(64, 1024)).expect("engine");
    let metrics = engine.metrics().clone();
    let computed =
        || metrics.prompt_tokens.load(Ordering::Relaxed) - metrics.prefix_cache_hit_tokens.load(Ordering::Relaxed);
    let mut conversation = prompt(37, 5);
    let mut before = 0;
    for turn in 0..4 {
        let reply = run_all(&mut engine, &[(conversation.clone(), greedy(9))]).remove(0);
        assert_eq!(reply, alone(model, &conversation, &greedy(9)), "turn {turn}: as a fresh engine");
        let prefilled = computed() - before;
        before = computed();
        if turn > 0 {
            // The previous turn computed all but its last token: its state at its last block
            // boundary was kept, so at most a block's worth of it comes back.
            let new = 9 + 6;
            assert!(prefilled < new + 16, "turn {turn}: prefilled {prefilled} tokens for {new} new ones");
        }
        conversation.extend(&reply);
        conversation.extend(prompt(6, 100 + turn));
    }
    assert!(engine.metrics().prefix_cache_hit_tokens.load(Ordering::Relaxed) > 0);
}

/// A prompt prefilled in chunks whose last block boundary falls in an earlier chunk still
/// leaves its state there for a request that shares it, while it is still decoding.
#[test]
fn a_chunked_prompt_leaves_its_state_for_a_concurrent_request() {
    let m = model_of("qwen3_next");
    let model = m.model.as_ref();
    let system = prompt(40, 7);
    let with = |tail: &[u32]| system.iter().chain(tail).copied().collect::<Vec<u32>>();
    let (a, b) = (with(&[7, 8, 9]), with(&[10, 11]));
    // 33 tokens per step: a's prompt runs as 0..33 (crossing 32) and 33..43 (crossing none).
    let mut engine = Engine::new(model, None, config(64, 33)).expect("engine");
    let ida = engine.add_request(a.clone(), greedy(12)).expect("a");
    let mut got_a = Vec::new();
    while got_a.is_empty() {
        for o in engine.step().expect("step") {
            got_a.extend(o.token_ids);
        }
    }
    let idb = engine.add_request(b.clone(), greedy(4)).expect("b");
    let mut got_b = Vec::new();
    while engine.has_work() {
        for o in engine.step().expect("step") {
            if o.id == ida {
                got_a.extend(o.token_ids);
            } else if o.id == idb {
                got_b.extend(o.token_ids);
            }
        }
    }
    assert_eq!(engine.metrics().prefix_cache_hit_tokens.load(Ordering::Relaxed), 32);
    assert_eq!(got_a, alone(model, &a, &greedy(12)));
    assert_eq!(got_b, alone(model, &b, &greedy(4)));
}

/// A memory budget sizes the recurrent state with the KV cache: it caps the running sequences,
/// and one too small for a single sequence's state is refused by name.
#[test]
fn the_budget_holds_the_recurrent_state_too() {
    let m = model_of("qwen3_next");
    let model = m.model.as_ref();
    let per_seq = model.cache_spec().state_bytes_per_seq();
    assert!(per_seq > 0);
    let cfg = EngineConfig::for_model(model, Default::default(), 1 << 20, 256).expect("config");
    assert_eq!(cfg.max_num_seqs, (512 << 10) / (3 * per_seq));
    let engine = Engine::new(model, None, cfg).expect("engine");
    assert!(engine.cache_bytes() <= 1 << 20, "{} bytes", engine.cache_bytes());
    let err = EngineConfig::for_model(model, Default::default(), 4 * per_seq, 256).expect_err("too small").to_string();
    assert!(err.contains("recurrent state"), "{err}");
}

/// `logit_bias`: +100 all but forces a token, -100 keeps the greedy one out; the reported
/// log-probabilities stay the model's; out-of-range biases and tokens are refused.
#[test]
fn logit_bias_moves_the_sampled_tokens() {
    let m = model();
    let p = prompt(12, 4);
    let plain = alone(m.model.as_ref(), &p, &greedy(6));
    let forced = RequestParams { logit_bias: vec![(77, 100.0)], ..greedy(6) };
    assert_eq!(alone(m.model.as_ref(), &p, &forced), vec![77; 6]);
    let banned = RequestParams { logit_bias: vec![(plain[0], -100.0)], ..greedy(1) };
    assert_ne!(alone(m.model.as_ref(), &p, &banned)[0], plain[0]);
    // Log-probabilities are the model's: the forced token's is what plain decoding reports.
    let mut e = Engine::new(m.model.as_ref(), None, config(64, 512)).expect("engine");
    let with_lp = |bias: Vec<(u32, f32)>| RequestParams { logit_bias: bias, logprobs: Some(1), ..greedy(1) };
    let id = e.add_request(p.clone(), with_lp(vec![(plain[0], 5.0)])).expect("request");
    let id2 = e.add_request(p.clone(), with_lp(Vec::new())).expect("request");
    let mut lps = std::collections::HashMap::new();
    while e.has_work() {
        for o in e.step().expect("step") {
            lps.insert(o.id, o.logprobs.first().map(|l| l.logprob));
        }
    }
    assert_eq!(lps[&id], lps[&id2]);
    for bad in [vec![(1u32, 100.5f32)], vec![(1_000_000, 1.0)]] {
        let r = RequestParams { logit_bias: bad, ..greedy(1) };
        assert!(e.add_request(p.clone(), r).is_err());
    }
}
