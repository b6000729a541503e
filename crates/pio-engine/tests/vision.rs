//! Requests with images through the engine, on the tiny Qwen3-VL fixture: the greedy
//! continuation transformers gives, whatever the batch, the prefill chunking and the prefix
//! cache; one placeholder or the expanded run alike; the prefix cache shares blocks between
//! prompts with the same image and never between different images; the tower runs a block at a
//! time between other streams' steps; bad requests are errors.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pio_engine::engine::{Engine, EngineConfig, RequestParams};
use pio_model::image::{open, preprocess, PixelValues, RgbImage};
use pio_model::{CausalLm, LoadedModel};
use safetensors::SafeTensors;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name)
}

fn load(name: &str) -> LoadedModel {
    let options = pio_model::LoadOptions { bf16_activations: false, ..Default::default() };
    pio_model::load_with(&dir(name), &options, &mut |_, _| {}).expect("fixture loads")
}

fn reference_ids(key: &str) -> Vec<u32> {
    let bytes = std::fs::read(dir("qwen3_vl").join("reference.safetensors")).expect("reference");
    let st = SafeTensors::deserialize(&bytes).expect("parses");
    let t = st.tensor(key).expect(key);
    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32).collect()
}

fn config(max_batch_tokens: usize) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks: 32,
        max_num_seqs: 8,
        max_batch_tokens,
        max_model_len: 256,
        prefix_caching: true,
        kv_cache_type: pio_model::KvCacheType::both(pio_model::KvCacheDtype::F32),
        max_memory: None,
        spec: None,
    }
}

fn pixels(model: &dyn CausalLm, img: &RgbImage) -> Arc<PixelValues> {
    Arc::new(preprocess(img, model.vision().expect("vision").processor()).expect("pixels"))
}

fn image() -> RgbImage {
    open(&dir("qwen3_vl").join("image.png")).expect("image")
}

/// The fixture's image mirrored left to right: the same size, other content.
fn mirrored() -> RgbImage {
    let img = image();
    let mut data = img.data.clone();
    for row in data.chunks_exact_mut(img.width * 3) {
        let px: Vec<[u8; 3]> = row.chunks_exact(3).rev().map(|p| [p[0], p[1], p[2]]).collect();
        row.copy_from_slice(&px.concat());
    }
    RgbImage { data, ..img }
}

fn greedy(n: usize, images: Vec<Arc<PixelValues>>) -> RequestParams {
    RequestParams { max_tokens: Some(n), ignore_eos: true, images, ..Default::default() }
}

/// Runs requests to completion; each one's tokens and cached prompt tokens, in order.
fn run_all(engine: &mut Engine<'_>, reqs: &[(Vec<u32>, RequestParams)]) -> Vec<(Vec<u32>, usize)> {
    let ids: Vec<u64> = reqs.iter().map(|(p, r)| engine.add_request(p.clone(), r.clone()).expect("request")).collect();
    let mut out = vec![(Vec::new(), 0); reqs.len()];
    while engine.has_work() {
        for o in engine.step().expect("step") {
            let i = ids.iter().position(|&id| id == o.id).expect("known id");
            out[i].0.extend(&o.token_ids);
            out[i].1 = o.num_cached_tokens;
        }
    }
    out
}

#[test]
fn image_request_gives_the_greedy_tokens_of_transformers() {
    let m = load("qwen3_vl");
    let model = m.model.as_ref();
    let prompt = reference_ids("image_input_ids");
    let want = reference_ids("image_greedy_ids");
    let px = pixels(model, &image());
    // The prompt as transformers' processor expands it, and with one placeholder for the image.
    let single: Vec<u32> =
        prompt.iter().enumerate().filter(|&(i, &t)| t != 5 || prompt[i - 1] != 5).map(|(_, &t)| t).collect();
    assert_eq!(single.len(), prompt.len() - 5);
    for p in [&prompt, &single] {
        for budget in [512, 7] {
            let mut e = Engine::new(model, None, config(budget)).expect("engine");
            let got = run_all(&mut e, &[(p.clone(), greedy(want.len(), vec![px.clone()]))]);
            assert_eq!(got[0].0, want, "budget {budget}, prompt of {}", p.len());
        }
    }
    // Speculative decoding after an image (M-RoPE positions of proposals): the same tokens.
    let spec = EngineConfig { spec: Some(pio_engine::spec::SpecConfig::ngram(4, 3, 1)), ..config(512) };
    let mut e = Engine::new(model, None, spec).expect("engine");
    let got = run_all(&mut e, &[(prompt.clone(), greedy(want.len(), vec![px.clone()]))]);
    assert_eq!(got[0].0, want, "with speculation");
    assert!(e.metrics().spec_draft_tokens.load(Ordering::Relaxed) > 0, "no proposals were verified");
}

#[test]
fn image_requests_batched_with_text_equal_each_alone() {
    let m = load("qwen3_vl");
    let model = m.model.as_ref();
    let prompt = reference_ids("image_input_ids");
    let text = reference_ids("input_ids");
    let (a, b) = (pixels(model, &image()), pixels(model, &mirrored()));
    let reqs = vec![
        (text.clone(), greedy(9, vec![])),
        (prompt.clone(), greedy(12, vec![a.clone()])),
        (prompt.clone(), greedy(10, vec![b.clone()])),
        (text[..7].to_vec(), greedy(5, vec![])),
    ];
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| {
            run_all(&mut Engine::new(model, None, config(512)).expect("engine"), std::slice::from_ref(r)).remove(0).0
        })
        .collect();
    assert_ne!(alone[1][..10], alone[2][..], "the two images give different continuations");
    for budget in [512, 11] {
        let mut e = Engine::new(model, None, config(budget)).expect("engine");
        let got: Vec<Vec<u32>> = run_all(&mut e, &reqs).into_iter().map(|(t, _)| t).collect();
        assert_eq!(got, alone, "budget {budget}");
        assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn text_streams_keep_decoding_while_an_image_goes_through_the_tower() {
    let m = load("qwen3_vl");
    let model = m.model.as_ref();
    let blocks = model.vision().expect("vision").num_blocks();
    assert!(blocks >= 2, "the fixture's tower has {blocks} blocks");
    let prompt = reference_ids("image_input_ids");
    let text = reference_ids("input_ids");
    let px = pixels(model, &image());
    let want_text =
        run_all(&mut Engine::new(model, None, config(512)).expect("engine"), &[(text.clone(), greedy(12, vec![]))]);
    let want_image = reference_ids("image_greedy_ids");

    let mut e = Engine::new(model, None, config(512)).expect("engine");
    // One tower block per step while another sequence runs.
    e.set_encode_slice(Duration::ZERO);
    let t = e.add_request(text, greedy(12, vec![])).expect("text request");
    let mut text_ids: Vec<u32> = e.step().expect("step").iter().flat_map(|o| o.token_ids.clone()).collect();
    assert_eq!(text_ids.len(), 1, "the text prompt's prefill");
    // A request aborted while its image is part way through the tower leaves nothing behind.
    let gone = e.add_request(prompt.clone(), greedy(4, vec![pixels(model, &mirrored())])).expect("image request");
    let v = e.add_request(prompt, greedy(want_image.len(), vec![px.clone()])).expect("second image request");
    let (mut image_ids, mut text_before_image, mut steps) = (Vec::<u32>::new(), 0, 0);
    while e.has_work() {
        let out = e.step().expect("step");
        steps += 1;
        if steps == 1 {
            assert!(e.abort(gone), "the first image request is still in the tower");
        }
        for o in out {
            assert_ne!(o.id, gone, "an aborted request produces nothing");
            if o.id == t {
                text_ids.extend(&o.token_ids);
                if image_ids.is_empty() {
                    text_before_image += o.token_ids.len();
                }
            } else if o.id == v {
                image_ids.extend(&o.token_ids);
            }
        }
    }
    // One block of the aborted image, then the other image's blocks, one per step, each step
    // also decoding the text stream.
    assert!(
        text_before_image >= blocks,
        "{text_before_image} text tokens before the image's first, with a tower of {blocks} blocks run one per step"
    );
    assert_eq!(text_ids, want_text[0].0, "the text stream is its own");
    assert_eq!(image_ids, want_image, "the image request still gives transformers' tokens");
    assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0);
    assert_eq!(e.num_requests(), 0);
}

#[test]
fn the_prefix_cache_shares_an_image_and_never_two() {
    let m = load("qwen3_vl");
    let model = m.model.as_ref();
    // 18 prompt tokens: the first block of 16 holds the image's.
    let prompt = reference_ids("image_input_ids");
    let (a, b) = (pixels(model, &image()), pixels(model, &mirrored()));
    let mut e = Engine::new(model, None, config(512)).expect("engine");
    let first = run_all(&mut e, &[(prompt.clone(), greedy(6, vec![a.clone()]))]).remove(0);
    let same = run_all(&mut e, &[(prompt.clone(), greedy(6, vec![a.clone()]))]).remove(0);
    assert_eq!(same, (first.0.clone(), 16), "the same image hits the cached block");
    let other = run_all(&mut e, &[(prompt.clone(), greedy(6, vec![b.clone()]))]).remove(0);
    assert_eq!(other.1, 0, "another image must not reuse the block");
    let fresh = run_all(&mut Engine::new(model, None, config(512)).expect("engine"), &[(prompt, greedy(6, vec![b]))]);
    assert_eq!(other.0, fresh[0].0, "the other image's output is its own");
}

#[test]
fn bad_image_requests_are_errors() {
    let m = load("qwen3_vl");
    let model = m.model.as_ref();
    let prompt = reference_ids("image_input_ids");
    let px = pixels(model, &image());
    let mut e = Engine::new(model, None, config(512)).expect("engine");
    let err = |p: &[u32], r: RequestParams, e: &mut Engine<'_>| {
        e.add_request(p.to_vec(), r).expect_err("refused").to_string()
    };
    assert!(err(&prompt, greedy(4, vec![]), &mut e).contains("no images"));
    assert!(err(&prompt, greedy(4, vec![px.clone(), px.clone()]), &mut e).contains("image"));
    assert!(err(&prompt[..9], greedy(4, vec![px.clone()]), &mut e).contains("placeholder"));
    // The expanded prompt is checked against the context (before the tower runs).
    let mut small = Engine::new(model, None, EngineConfig { max_model_len: 16, ..config(512) }).expect("engine");
    let single: Vec<u32> =
        prompt.iter().enumerate().filter(|&(i, &t)| t != 5 || prompt[i - 1] != 5).map(|(_, &t)| t).collect();
    let e2 = small.add_request(single, greedy(1, vec![px.clone()])).expect_err("too long once expanded");
    assert!(matches!(e2, pio_engine::EngineError::PromptTooLong { prompt: 18, .. }), "{e2}");
    let text = load("qwen3");
    let mut t = Engine::new(text.model.as_ref(), None, config(512)).expect("engine");
    assert!(err(&[1, 2, 3], greedy(4, vec![px]), &mut t).contains("takes no images"));
    assert!(!e.has_work() && !t.has_work());
}
