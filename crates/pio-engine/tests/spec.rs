//! Speculative decoding (n-gram proposals and draft models) on the tiny random-weight models:
//! the tokens are exactly those of decoding without it — greedy or seeded sampling, alone or
//! batched, with chunked prompts and preemption — and proposals are verified and accepted.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use pio_engine::engine::{Engine, EngineConfig, RequestParams};
use pio_engine::sampler::SamplingParams;
use pio_engine::spec::SpecConfig;
use pio_model::{CausalLm, LoadedModel};

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
    check_model(name, m.model.as_ref(), None, spec);
}

/// `model` with speculation (by `draft` where given) gives plain decoding's tokens.
fn check_model(name: &str, model: &dyn CausalLm, draft: Option<&dyn CausalLm>, spec: Option<SpecConfig>) {
    let engine = |cfg: EngineConfig| Engine::with_draft(model, None, cfg, draft).expect("engine");
    let reqs = requests();
    let want = plain_each(model, &reqs);
    // Each alone with speculation.
    let mut accepted = 0;
    for (r, w) in reqs.iter().zip(&want) {
        let mut e = engine(config(64, 1024, spec));
        assert_eq!(&run_all(&mut e, std::slice::from_ref(r)).remove(0), w, "{name}: alone");
        accepted += e.metrics().spec_accepted_tokens.load(Ordering::Relaxed);
    }
    // Batched, with a budget that chunks prompts and cuts proposals, and with a cache so
    // small that sequences are preempted.
    for (blocks, budget) in [(64, 1024), (64, 9), (10, 64)] {
        let mut e = engine(config(blocks, budget, spec));
        assert_eq!(run_all(&mut e, &reqs), want, "{name}: batched, {blocks} blocks, budget {budget}");
        assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0, "{name}: blocks left in use");
        let gen: usize = want.iter().map(Vec::len).sum();
        assert_eq!(e.metrics().generation_tokens.load(Ordering::Relaxed), gen as u64);
        if blocks == 10 {
            assert!(e.metrics().preemptions.load(Ordering::Relaxed) > 0, "{name}: the small cache should preempt");
        }
    }
    let drafted = {
        let mut e = engine(config(64, 1024, spec));
        run_all(&mut e, &reqs);
        e.metrics().spec_draft_tokens.load(Ordering::Relaxed)
    };
    // The random Qwen3-Next does not repeat itself, so its n-gram proposals (few) fail, and a
    // random draft of another family proposes nothing the target samples: acceptance with
    // recurrent state is checked with proposals that are partly right (below), and the draft's
    // rollback with a model drafting for itself.
    let random_draft = draft.is_some_and(|d| !std::ptr::addr_eq(d, model));
    if !name.starts_with("qwen3_next") && !random_draft {
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
        e.set_proposer(Some(Box::new(move |id: u64, tokens: &[u32], k: usize| {
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

/// A draft model proposing for every family (targets with recurrent state, MoE, MLA and
/// vision included): plain decoding's tokens, alone and batched, with chunked prompts and
/// preemption; the draft's cache rolls back what the target rejected.
#[test]
fn draft_model_speculation_gives_the_tokens_of_plain_decoding() {
    // Tiny random models of different families sharing the fixtures' 512-token vocabulary.
    let drafts = [("qwen3", "qwen2"), ("qwen3_moe", "qwen3"), ("glm4_moe_lite", "llama"), ("qwen3_next", "qwen3")];
    for (target, draft) in drafts {
        let (t, d) = (model_of(target), model_of(draft));
        for spec in [SpecConfig::draft(4), SpecConfig::draft(1)] {
            check_model(&format!("{target} drafted by {draft}"), t.model.as_ref(), Some(d.model.as_ref()), Some(spec));
        }
    }
    // Drafting for itself: greedy proposals, accepted by the greedy requests and in part by the
    // sampled ones, so the draft's cache is rolled back after partial acceptance.
    let q = model_of("qwen3");
    check_model("qwen3 drafted by itself", q.model.as_ref(), Some(q.model.as_ref()), Some(SpecConfig::draft(4)));
}

/// A model drafting for itself proposes exactly what greedy decoding then samples, so every
/// greedy proposal is accepted, and the accepted ones are what the step commits.
#[test]
fn a_model_drafting_for_itself_has_its_greedy_proposals_all_accepted() {
    for name in ["qwen3", "qwen2", "qwen3_vl"] {
        let m = model_of(name);
        let reqs: Vec<(Vec<u32>, RequestParams)> = (0..4)
            .map(|i| (prompt(15 + 9 * i, i as u32), RequestParams { max_tokens: Some(33), ..Default::default() }))
            .collect();
        let want = plain_each(m.model.as_ref(), &reqs);
        // Budget 20 runs the prompts in chunks, so proposals start while others prefill.
        for budget in [1024, 20] {
            let mut e = Engine::with_draft(
                m.model.as_ref(),
                None,
                config(64, budget, Some(SpecConfig::draft(5))),
                Some(m.model.as_ref()),
            )
            .expect("engine");
            assert_eq!(run_all(&mut e, &reqs), want, "{name}");
            let drafted = e.metrics().spec_draft_tokens.load(Ordering::Relaxed);
            let accepted = e.metrics().spec_accepted_tokens.load(Ordering::Relaxed);
            assert!(drafted > 0 && accepted == drafted, "{name}: {accepted} of {drafted} accepted");
            // Each verifying step commits its accepted tokens and one more.
            let steps = e.metrics().spec_drafts.load(Ordering::Relaxed);
            let generated = e.metrics().generation_tokens.load(Ordering::Relaxed);
            assert!(generated >= steps + accepted, "{name}: {generated} tokens from {steps} steps");
            assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0);
        }
    }
}

#[test]
fn draft_models_that_cannot_draft_are_refused() {
    let (q, next) = (model_of("qwen3"), model_of("qwen3_next"));
    let spec = Some(SpecConfig::draft(4));
    let err = |r: pio_engine::Result<Engine<'_>>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(Engine::with_draft(q.model.as_ref(), None, config(64, 64, spec), Some(next.model.as_ref())))
        .contains("recurrent state"));
    assert!(err(Engine::new(q.model.as_ref(), None, config(64, 64, spec))).contains("needs the draft model"));
    let ngram = Some(SpecConfig::ngram(4, 3, 1));
    assert!(err(Engine::with_draft(q.model.as_ref(), None, config(64, 64, ngram), Some(q.model.as_ref())))
        .contains("not set to use one"));
}

/// The draft's cache after proposals the target rejected: the next proposals are those of a
/// fresh draft (the rejected positions are recomputed), alone or beside another sequence, with
/// prompts run in chunks.
#[test]
fn a_draft_rolls_back_what_the_target_rejected() {
    use pio_engine::draft::DraftModel;
    use pio_engine::spec::{ProposalRequest, Propose};
    let m = model_of("qwen3");
    let model = m.model.as_ref();
    let cfg = config(64, 16, Some(SpecConfig::draft(4)));
    fn req(id: u64, tokens: &[u32], max: usize) -> ProposalRequest<'_> {
        ProposalRequest { id, tokens, max }
    }
    let (p, other) = (prompt(40, 1), prompt(23, 2));
    let mut draft = DraftModel::new(model, model, &cfg).expect("draft");
    let first = draft.propose(&[req(0, &p, 4)]).expect("propose").remove(0);
    assert_eq!(first.len(), 4);
    // The target kept the first proposal and sampled something else for the second.
    let mut next = p.clone();
    next.extend([first[0], (first[1] + 1) % 512]);
    let got = draft.propose(&[req(0, &next, 4), req(1, &other, 3)]).expect("propose");
    let fresh = |tokens: &[u32], max| {
        let mut d = DraftModel::new(model, model, &cfg).expect("draft");
        d.propose(&[req(7, tokens, max)]).expect("propose").remove(0)
    };
    assert_eq!(got, vec![fresh(&next, 4), fresh(&other, 3)]);
    // Everything accepted and one more token: the draft catches up from its proposals.
    let mut after = next.clone();
    after.extend(&got[0]);
    after.push(9);
    assert_eq!(draft.propose(&[req(0, &after, 2)]).expect("propose"), vec![fresh(&after, 2)]);
    // Tokens that differ further back than the last one (another history under the same id).
    let mut edited = after.clone();
    let n = edited.len();
    for t in &mut edited[..n - 2] {
        *t = (*t * 7 + 3) % 512;
    }
    assert_ne!(fresh(&edited, 3), fresh(&after, 3), "the edit should change the proposals");
    assert_eq!(draft.propose(&[req(0, &edited, 3)]).expect("propose"), vec![fresh(&edited, 3)]);
    // A released sequence starts over.
    draft.release(0);
    assert_eq!(draft.propose(&[req(0, &p, 4)]).expect("propose"), vec![first]);
}

/// The tiny GLM-4.7-Flash fixture's config with one MTP layer, written with random weights
/// (as a Hugging Face directory, or GGUF when `name` ends in `.gguf`) and loaded with it.
fn glm_with_mtp(name: &str) -> LoadedModel {
    with_mtp("glm4_moe_lite", name)
}

/// A tiny fixture's config (`family`) with one MTP layer, as [`glm_with_mtp`].
fn with_mtp(family: &str, name: &str) -> LoadedModel {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(family);
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pio-mtp-{}-{n}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("config.json")).expect("config")).expect("json");
    if family == "glm4_moe_lite" {
        cfg["num_nextn_predict_layers"] = 1.into();
    }
    let config = dir.join("config.json");
    std::fs::write(&config, cfg.to_string()).expect("write config");
    let out = dir.join(name);
    pio_model::synth::write_random_checkpoint_with(&config, None, &out, pio_kernels::DType::F32, 5, true)
        .expect("synth with MTP");
    let options = pio_model::LoadOptions { mtp: true, ..Default::default() };
    let m = pio_model::load_with(&out, &options, &mut |_, _| {}).expect("load with MTP");
    let _ = std::fs::remove_dir_all(&dir);
    m
}

/// Speculation by the model's own MTP layer (GLM-4.7-Flash's, and Qwen3-Next's, whose
/// recurrent state is put back when a proposal fails): plain decoding's tokens, alone, batched,
/// with chunked prompts and preemption (the prefix cache off: the layer takes every position's
/// hidden state), from a Hugging Face directory and from GGUF alike.
#[test]
fn mtp_speculation_gives_the_tokens_of_plain_decoding() {
    for (family, name) in
        [("glm4_moe_lite", "hf"), ("glm4_moe_lite", "m.gguf"), ("qwen3_next", "hf"), ("qwen3_next", "m.gguf")]
    {
        let m = with_mtp(family, name);
        let name = format!("{family} {name}");
        let model = m.model.as_ref();
        let reqs = requests();
        let want = plain_each(model, &reqs);
        for (blocks, budget) in [(64, 1024), (64, 9), (10, 64)] {
            let cfg = EngineConfig { prefix_caching: false, ..config(blocks, budget, Some(SpecConfig::mtp(3))) };
            let mut e = Engine::new(model, None, cfg).expect("engine");
            assert_eq!(run_all(&mut e, &reqs), want, "{name}: {blocks} blocks, budget {budget}");
            assert!(e.metrics().spec_draft_tokens.load(Ordering::Relaxed) > 0, "{name}: nothing proposed");
            assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0);
        }
        // The prefix cache on, or a model without the layer loaded: refused, saying why.
        let err = |r: pio_engine::Result<Engine<'_>>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(Engine::new(model, None, config(64, 64, Some(SpecConfig::mtp(3))))).contains("prefix cache off"));
        let plain = model_of(family);
        let cfg = EngineConfig { prefix_caching: false, ..config(64, 64, Some(SpecConfig::mtp(3))) };
        assert!(err(Engine::new(plain.model.as_ref(), None, cfg)).contains("not loaded"));
    }
}

/// The MTP proposer fed hidden states step by step (its entries computed in pieces, its
/// chained ones recomputed) proposes what a fresh one fed everything at once proposes, and
/// its chain is the layer run on its own output.
#[test]
fn mtp_proposals_do_not_depend_on_how_the_steps_came() {
    use pio_engine::mtp::MtpProposer;
    use pio_engine::spec::{ProposalRequest, Propose};
    let m = glm_with_mtp("hf");
    let model = m.model.as_ref();
    let tokens = prompt(40, 3);
    // The target's hidden states of every position, from one forward.
    let hidden = {
        let mut cache = model.new_kv_cache(16, 8);
        let n = tokens.len();
        let batch = pio_model::ForwardBatch {
            token_ids: tokens.clone(),
            positions: (0..n).collect(),
            seq_indices: vec![0; n],
            slot_mapping: (0..n).collect(),
            block_tables: vec![(0..8).collect()],
            logits_indices: vec![n - 1],
            ..Default::default()
        };
        let (logits, hidden) = model.forward_with_hidden(&batch, &mut cache).expect("forward");
        // The logits are the plain forward's.
        let mut again = model.new_kv_cache(16, 8);
        assert_eq!(model.forward(&batch, &mut again).expect("forward"), logits);
        hidden
    };
    let w = hidden.len() / tokens.len();
    let cfg = EngineConfig { prefix_caching: false, ..config(64, 7, Some(SpecConfig::mtp(4))) };
    let req = |n: usize| [ProposalRequest { id: 0, tokens: &tokens[..n], max: 4 }];
    // Fed in pieces: a prompt of 20, then steps committing 3, 1 and 5 tokens.
    let mut stepped = MtpProposer::new(model, &cfg).expect("proposer");
    let mut got = Vec::new();
    let mut at = 0;
    for n in [20, 23, 24, 29] {
        // The forward of a step computes positions at..n-1 (the last token is only sampled).
        stepped.observe(0, at, &hidden[at * w..(n - 1) * w], w);
        at = n - 1;
        got = stepped.propose(&req(n)).expect("propose").remove(0);
        assert_eq!(got.len(), 4);
    }
    let mut fresh = MtpProposer::new(model, &cfg).expect("proposer");
    fresh.observe(0, 0, &hidden[..28 * w], w);
    assert_eq!(fresh.propose(&req(29)).expect("propose").remove(0), got);
    // A fresh one asked for one token at a time after committing the proposals it made agrees
    // on the first proposal (the chain starts where the target's hidden states end).
    let mut one = MtpProposer::new(model, &cfg).expect("proposer");
    one.observe(0, 0, &hidden[..28 * w], w);
    let first = one.propose(&[ProposalRequest { id: 0, tokens: &tokens[..29], max: 1 }]).expect("propose");
    assert_eq!(first[0], got[..1].to_vec());
}

/// Sampling with speculation draws from the target's distribution: the second and the third
/// generated token over 3000 seeded requests with a draft (the model drafting greedily for itself, so proposals
/// are often accepted and often rejected) and over 3000 other seeds without, compared by a
/// two-sample chi-square test per token at a false-alarm rate of 0.1% in all (categories with
/// fewer than 10 draws pooled). With fixed seeds the test is deterministic; the rate says how unlikely a
/// failure would be for a correct rule and other seeds.
#[test]
fn sampled_tokens_follow_the_same_distribution_with_speculation() {
    let m = model_of("qwen3");
    let model = m.model.as_ref();
    let draws = 3000u64;
    let prompt = prompt(12, 9);
    let third = |spec: Option<SpecConfig>, seed0: u64| -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        for chunk in (0..draws).collect::<Vec<_>>().chunks(250) {
            let reqs: Vec<(Vec<u32>, RequestParams)> = chunk
                .iter()
                .map(|&i| {
                    let sampling =
                        SamplingParams { temperature: 1.0, top_k: 6, seed: Some(seed0 + i), ..Default::default() };
                    (prompt.clone(), RequestParams { max_tokens: Some(3), sampling, ..Default::default() })
                })
                .collect();
            let cfg = EngineConfig { max_num_seqs: 64, ..config(256, 1024, spec) };
            let draft = spec.map(|_| model);
            let mut e = Engine::with_draft(model, None, cfg, draft).expect("engine");
            out.extend(run_all(&mut e, &reqs).into_iter().map(|t| (t[1], t[2])));
            if spec.is_some() {
                let (d, a) = (
                    e.metrics().spec_draft_tokens.load(Ordering::Relaxed),
                    e.metrics().spec_accepted_tokens.load(Ordering::Relaxed),
                );
                assert!(a > 0 && a < d, "{a} of {d} proposals accepted: the test needs both outcomes");
            }
        }
        out
    };
    let with = third(Some(SpecConfig::draft(3)), 0);
    let without = third(None, 1_000_000);
    // The second token and the third, each tested at 0.05% (0.1% together).
    for (which, pick) in [("second", 0usize), ("third", 1)] {
        let token = |p: &(u32, u32)| if pick == 0 { p.0 } else { p.1 };
        let mut counts: std::collections::BTreeMap<u32, (f64, f64)> = Default::default();
        for p in &with {
            counts.entry(token(p)).or_default().0 += 1.0;
        }
        for p in &without {
            counts.entry(token(p)).or_default().1 += 1.0;
        }
        // Pool the rare categories.
        let (mut cats, mut rare) = (Vec::new(), (0.0, 0.0));
        for (_, (a, b)) in counts {
            if a + b < 10.0 {
                rare = (rare.0 + a, rare.1 + b);
            } else {
                cats.push((a, b));
            }
        }
        if rare.0 + rare.1 > 0.0 {
            cats.push(rare);
        }
        assert!(cats.len() >= 3, "{which}: too few categories to test: {cats:?}");
        // Equal sample sizes: sum (a - b)^2 / (a + b), chi-square with k - 1 degrees of freedom.
        let stat: f64 = cats.iter().map(|(a, b)| (a - b) * (a - b) / (a + b)).sum();
        let df = (cats.len() - 1) as f64;
        // The 99.95% quantile (Wilson-Hilferty), z = 3.2905.
        let crit = df * (1.0 - 2.0 / (9.0 * df) + 3.2905 * (2.0 / (9.0 * df)).sqrt()).powi(3);
        assert!(stat < crit, "{which} token: chi-square {stat:.1} >= {crit:.1} ({df} degrees of freedom): {cats:?}");
    }
}
