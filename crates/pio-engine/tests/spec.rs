//! Speculative decoding (n-gram proposals) on the tiny random-weight models: the tokens are
//! exactly those of decoding without it — greedy or seeded sampling, alone or batched, with
//! chunked prompts and preemption — and proposals are verified and accepted.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use pio_engine::engine::{Engine, EngineConfig, RequestParams};
use pio_engine::sampler::SamplingParams;
use pio_engine::spec::SpecConfig;
use pio_model::LoadedModel;

fn model_of(name: &str) -> LoadedModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name);
    pio_model::load(&dir, &mut |_, _| {}).expect("tiny model loads")
}

/// A prompt that repeats itself, so the n-gram proposer finds matches from the first step.
fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i % 11).wrapping_mul(2654435761).wrapping_add(seed * 7919) % 500 + 3).collect()
}

fn config(num_blocks: usize, max_batch_tokens: usize, spec: Option<SpecConfig>) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks,
        max_num_seqs: 8,
        max_batch_tokens,
        max_model_len: 256.min(num_blocks * 16),
        prefix_caching: true,
        kv_cache_type: Default::default(),
        max_memory: None,
        spec,
    }
}

fn run_all(engine: &mut Engine<'_>, reqs: &[(Vec<u32>, RequestParams)]) -> Vec<Vec<u32>> {
    let ids: Vec<u64> = reqs.iter().map(|(p, r)| engine.add_request(p.clone(), r.clone()).expect("request")).collect();
    let mut out = vec![Vec::new(); reqs.len()];
    while engine.has_work() {
        for o in engine.step().expect("step") {
            let i = ids.iter().position(|&id| id == o.id).expect("known id");
            out[i].extend(&o.token_ids);
        }
    }
    out
}

/// Each request's tokens, run alone without speculation.
fn plain_each(model: &dyn pio_model::CausalLm, reqs: &[(Vec<u32>, RequestParams)]) -> Vec<Vec<u32>> {
    reqs.iter()
        .map(|r| {
            let mut e = Engine::new(model, None, config(64, 1024, None)).expect("engine");
            run_all(&mut e, std::slice::from_ref(r)).remove(0)
        })
        .collect()
}

fn requests() -> Vec<(Vec<u32>, RequestParams)> {
    (0..6)
        .map(|i| {
            let sampling = if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                SamplingParams { temperature: 0.9, top_k: 20, seed: Some(7 + i as u64), ..Default::default() }
            };
            (
                prompt(20 + i * 7, i as u32),
                RequestParams { max_tokens: Some(24 + i * 3), sampling, ..Default::default() },
            )
        })
        .collect()
}

#[test]
fn ngram_speculation_gives_the_tokens_of_plain_decoding() {
    for spec in [SpecConfig::ngram(4, 3, 1), SpecConfig::ngram(8, 5, 3)] {
        for name in ["qwen3", "qwen3_moe", "glm4_moe_lite", "qwen2", "qwen3_vl", "qwen3_next"] {
            check_family(name, Some(spec));
        }
    }
}

fn check_family(name: &str, spec: Option<SpecConfig>) {
    let m = model_of(name);
    let reqs = requests();
    let want = plain_each(m.model.as_ref(), &reqs);
    // Each alone with speculation.
    let mut accepted = 0;
    for (r, w) in reqs.iter().zip(&want) {
        let mut e = Engine::new(m.model.as_ref(), None, config(64, 1024, spec)).expect("engine");
        assert_eq!(&run_all(&mut e, std::slice::from_ref(r)).remove(0), w, "{name}: alone");
        accepted += e.metrics().spec_accepted_tokens.load(Ordering::Relaxed);
    }
    // Batched, with a budget that chunks prompts and cuts proposals, and with a cache so
    // small that sequences are preempted.
    for (blocks, budget) in [(64, 1024), (64, 9), (10, 64)] {
        let mut e = Engine::new(m.model.as_ref(), None, config(blocks, budget, spec)).expect("engine");
        assert_eq!(run_all(&mut e, &reqs), want, "{name}: batched, {blocks} blocks, budget {budget}");
        assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0, "{name}: blocks left in use");
        let gen: usize = want.iter().map(Vec::len).sum();
        assert_eq!(e.metrics().generation_tokens.load(Ordering::Relaxed), gen as u64);
        if blocks == 10 {
            assert!(e.metrics().preemptions.load(Ordering::Relaxed) > 0, "{name}: the small cache should preempt");
        }
    }
    let drafted = {
        let mut e = Engine::new(m.model.as_ref(), None, config(64, 1024, spec)).expect("engine");
        run_all(&mut e, &reqs);
        e.metrics().spec_draft_tokens.load(Ordering::Relaxed)
    };
    // The random Qwen3-Next does not repeat itself, so its n-gram proposals (few) fail:
    // acceptance with recurrent state is checked with proposals that are partly right (below).
    if name != "qwen3_next" {
        assert!(drafted > 0 && accepted > 0, "{name}: {drafted} proposed, {accepted} accepted alone");
    }
}

/// Proposals that are right for a while and then wrong, on every family (Qwen3-Next's
/// recurrent state is put back and the accepted tokens run again): the same tokens, and
/// proposals accepted in part.
#[test]
fn partly_right_proposals_give_the_tokens_of_plain_decoding() {
    for name in ["qwen3", "glm4_moe_lite", "qwen3_next"] {
        let m = model_of(name);
        let reqs: Vec<(Vec<u32>, RequestParams)> = (0..3)
            .map(|i| (prompt(17 + 5 * i, i as u32), RequestParams { max_tokens: Some(30), ..Default::default() }))
            .collect();
        let want = plain_each(m.model.as_ref(), &reqs);
        let prompts: Vec<usize> = reqs.iter().map(|r| r.0.len()).collect();
        let oracle = want.clone();
        let mut calls = 0usize;
        let spec = Some(SpecConfig::ngram(4, 3, 1));
        let mut e = Engine::new(m.model.as_ref(), None, config(64, 1024, spec)).expect("engine");
        // Request i has id i: the continuation plain decoding gives, its last token wrong every
        // other time.
        e.set_proposer(Some(Box::new(move |id, tokens, k| {
            let (i, generated) = (id as usize, tokens.len() - prompts[id as usize]);
            let mut draft: Vec<u32> = oracle[i].iter().skip(generated).take(k).copied().collect();
            calls += 1;
            if calls.is_multiple_of(2) {
                if let Some(last) = draft.last_mut() {
                    *last = (*last + 1) % 500;
                }
            }
            draft
        })));
        assert_eq!(run_all(&mut e, &reqs), want, "{name}");
        let accepted = e.metrics().spec_accepted_tokens.load(Ordering::Relaxed);
        let drafted = e.metrics().spec_draft_tokens.load(Ordering::Relaxed);
        assert!(accepted > 0 && accepted < drafted, "{name}: {accepted} of {drafted} accepted");
        assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0);
    }
}
