//! Qwen3-VL against transformers (float32) on the tiny fixture's image case: the M-RoPE
//! positions, the logits of a prompt with an image (vision tower, merger, DeepStack, M-RoPE),
//! its greedy continuation, and the image prompt batched with a text prompt.

use std::path::PathBuf;

use pio_model::image::{open, preprocess};
use pio_model::models::vision::{rope_positions, ImageFeatures};
use pio_model::{CausalLm, ForwardBatch, KvCache, KvCacheDtype, KvCacheType, VisualEmbeds};
use safetensors::SafeTensors;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic/qwen3_vl")
}

struct Reference(Vec<u8>);

impl Reference {
    fn open() -> Reference {
        Reference(std::fs::read(fixture().join("reference.safetensors")).expect("reference file"))
    }

    fn i64s(&self, key: &str) -> Vec<i64> {
        let st = SafeTensors::deserialize(&self.0).expect("reference parses");
        let t = st.tensor(key).expect(key);
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        self.i64s(key).into_iter().map(|v| v as u32).collect()
    }

    fn f32s(&self, key: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.0).expect("reference parses");
        let t = st.tensor(key).expect(key);
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    }
}

fn load() -> pio_model::LoadedModel {
    let options = pio_model::LoadOptions { bf16_activations: false, ..Default::default() };
    pio_model::load_with(&fixture(), &options, &mut |_, _| {}).expect("fixture loads")
}

const BLOCK: usize = 16;

/// One sequence's part of a batch: tokens `start..` of `ids` over cache blocks `table`.
struct Seq<'a> {
    ids: &'a [u32],
    start: usize,
    table: Vec<u32>,
    /// M-RoPE positions of all of `ids` (`None`: text, positions on all axes).
    mrope: Option<&'a [[usize; 3]]>,
    image: Option<&'a ImageFeatures>,
}

/// Runs the sequences as one batch and returns each one's logits for its tokens in the batch.
fn forward(model: &dyn CausalLm, cache: &mut KvCache, seqs: &[Seq<'_>], image_token: u32) -> Vec<Vec<f32>> {
    let mut b = ForwardBatch::default();
    let mut visual = VisualEmbeds::default();
    let any_mrope = seqs.iter().any(|s| s.mrope.is_some());
    let hidden = model.vision().expect("vision tower").config().out_hidden_size;
    let mut counts = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        // Image tokens before `start` were run already: this batch's take the features after them.
        let mut image_row = s.ids[..s.start].iter().filter(|&&t| t == image_token).count();
        for p in s.start..s.ids.len() {
            let row = b.token_ids.len();
            b.token_ids.push(s.ids[p]);
            b.positions.push(p);
            b.seq_indices.push(i);
            b.slot_mapping.push(s.table[p / BLOCK] as usize * BLOCK + p % BLOCK);
            b.logits_indices.push(row);
            if any_mrope {
                b.mrope_positions.push(s.mrope.map_or([p; 3], |m| m[p]));
            }
            if let (Some(f), true) = (s.image, s.ids[p] == image_token) {
                visual.rows.push(row);
                visual.embeds.extend_from_slice(&f.embeds[image_row * hidden..(image_row + 1) * hidden]);
                visual.deepstack.resize(f.deepstack.len(), Vec::new());
                for (d, ds) in visual.deepstack.iter_mut().zip(&f.deepstack) {
                    d.extend_from_slice(&ds[image_row * hidden..(image_row + 1) * hidden]);
                }
                image_row += 1;
            }
        }
        counts.push(s.ids.len() - s.start);
        b.block_tables.push(s.table.clone());
    }
    if !visual.rows.is_empty() {
        b.visual = Some(visual);
    }
    let out = model.forward(&b, cache).expect("forward");
    let vocab = model.shape().vocab_size;
    let mut at = 0;
    counts
        .into_iter()
        .map(|n| {
            let rows = out[at * vocab..(at + n) * vocab].to_vec();
            at += n;
            rows
        })
        .collect()
}

fn f32_cache(model: &dyn CausalLm) -> KvCache {
    model.new_kv_cache_with(BLOCK, 16, KvCacheType::both(KvCacheDtype::F32), 0)
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
        as u32
}

/// Max |a - b| within `1e-4 · max(1, max|want|)`.
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bound = 1e-4 * want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= bound, "{what}: max abs diff {diff} > bound {bound}");
}

fn image_features(model: &dyn CausalLm) -> ImageFeatures {
    let vision = model.vision().expect("a vision tower");
    let pixels = preprocess(&open(&fixture().join("image.png")).expect("image"), vision.processor()).expect("pixels");
    assert_eq!(pixels.grid, [1, 6, 4]);
    vision.encode(&pixels).expect("encode")
}

#[test]
fn rope_positions_match_transformers() {
    let r = Reference::open();
    let ids = r.ids("image_input_ids");
    let (pos, delta) = rope_positions(&ids, 5, &[[1, 6, 4]], 2).expect("positions");
    let want = r.i64s("image_position_ids");
    let n = ids.len();
    for (t, p) in pos.iter().enumerate() {
        let w = [want[t], want[n + t], want[2 * n + t]];
        assert_eq!(p.map(|v| v as i64), w, "token {t}");
    }
    // 4 text, start, 6 image tokens at 5 + (0, 0..3, 0..2), end at 8, 6 text: last at 14.
    assert_eq!(delta, 15 - n as i64);
    // Tokens and grids that do not agree.
    assert!(rope_positions(&ids, 5, &[], 2).is_err(), "an image run without a grid");
    assert!(rope_positions(&ids, 5, &[[1, 6, 4], [1, 2, 2]], 2).is_err(), "a grid without a run");
    assert!(rope_positions(&ids, 5, &[[1, 8, 4]], 2).is_err(), "a run shorter than its image");
}

#[test]
fn image_prompt_logits_and_greedy_match_transformers() {
    let loaded = load();
    let model = loaded.model.as_ref();
    let r = Reference::open();
    let ids = r.ids("image_input_ids");
    let feats = image_features(model);
    assert_eq!(feats.num_tokens(), 6);
    assert_eq!(feats.deepstack.len(), 2);
    let (pos, delta) = rope_positions(&ids, 5, &[feats.grid], 2).expect("positions");
    let mut cache = f32_cache(model);
    let table: Vec<u32> = (0..4).collect();
    let seq = Seq { ids: &ids, start: 0, table: table.clone(), mrope: Some(&pos), image: Some(&feats) };
    let logits = forward(model, &mut cache, &[seq], 5).remove(0);
    assert_close("image logits", &logits, &r.f32s("image_logits"));

    // Greedy: each new token at its index + delta on every axis.
    let want = r.ids("image_greedy_ids");
    let vocab = model.shape().vocab_size;
    let mut seq_ids = ids.clone();
    let mut positions = pos.clone();
    let mut next = argmax(&logits[(ids.len() - 1) * vocab..]);
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(next);
        let p = seq_ids.len();
        seq_ids.push(next);
        let m = (p as i64 + delta) as usize;
        positions.push([m; 3]);
        let s = Seq { ids: &seq_ids, start: p, table: table.clone(), mrope: Some(&positions), image: None };
        next = argmax(&forward(model, &mut cache, &[s], 5).remove(0));
    }
    assert_eq!(got, want, "greedy continuation of the image prompt");
}

#[test]
fn image_prompt_batched_with_text_equals_each_alone() {
    let loaded = load();
    let model = loaded.model.as_ref();
    let r = Reference::open();
    let image_ids = r.ids("image_input_ids");
    let text_ids = r.ids("input_ids");
    let feats = image_features(model);
    let (pos, _) = rope_positions(&image_ids, 5, &[feats.grid], 2).expect("positions");
    let image_seq = |table: Vec<u32>| Seq { ids: &image_ids, start: 0, table, mrope: Some(&pos), image: Some(&feats) };
    let text_seq = |table: Vec<u32>| Seq { ids: &text_ids, start: 0, table, mrope: None, image: None };
    let alone_image = forward(model, &mut f32_cache(model), &[image_seq(vec![0, 1])], 5).remove(0);
    let alone_text = forward(model, &mut f32_cache(model), &[text_seq(vec![0, 1])], 5).remove(0);
    let both = forward(model, &mut f32_cache(model), &[text_seq(vec![2, 3]), image_seq(vec![5, 4])], 5);
    assert_eq!(both[0], alone_text, "the text prompt beside an image prompt");
    assert_eq!(both[1], alone_image, "the image prompt beside a text prompt");
    assert_close("text logits", &alone_text, &r.f32s("logits"));
    // The image matters.
    let blind = forward(
        model,
        &mut f32_cache(model),
        &[Seq { ids: &image_ids, start: 0, table: vec![0, 1], mrope: Some(&pos), image: None }],
        5,
    )
    .remove(0);
    assert_ne!(blind, alone_image);
}

#[test]
fn image_prompt_split_across_forwards_matches_one_pass() {
    // The prompt's image tokens split between two forwards (chunked prefill): the second
    // takes the features of the image tokens after the first's.
    let loaded = load();
    let model = loaded.model.as_ref();
    let r = Reference::open();
    let ids = r.ids("image_input_ids");
    let feats = image_features(model);
    let (pos, _) = rope_positions(&ids, 5, &[feats.grid], 2).expect("positions");
    let mut cache = f32_cache(model);
    let first = &ids[..8];
    let a = forward(
        model,
        &mut cache,
        &[Seq { ids: first, start: 0, table: vec![0, 1], mrope: Some(&pos[..8]), image: Some(&feats) }],
        5,
    )
    .remove(0);
    let b = forward(
        model,
        &mut cache,
        &[Seq { ids: &ids, start: 8, table: vec![0, 1], mrope: Some(&pos), image: Some(&feats) }],
        5,
    )
    .remove(0);
    let joined: Vec<f32> = a.into_iter().chain(b).collect();
    assert_close("split image prompt", &joined, &r.f32s("image_logits"));
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pio-vision-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn gguf_pair_matches_the_directory_and_transformers() {
    // The fixture written as llama.cpp's pair (text model + mmproj), in F32: the same image
    // features as the directory's, bit for bit, and transformers' logits.
    let s = Scratch::new("pair");
    let text = s.0.join("fixture-f32.gguf");
    let summary = pio_model::quantize::write_quantized_gguf(&fixture(), pio_kernels::DType::F32, &text).expect("write");
    let (mmproj, _) = summary.mmproj.expect("an mmproj file beside the text model");
    assert_eq!(mmproj, s.0.join("mmproj-fixture-f32.gguf"));
    let options = pio_model::LoadOptions { bf16_activations: false, mmproj: Some(mmproj), ..Default::default() };
    let pair = pio_model::load_with(&text, &options, &mut |_, _| {}).expect("the pair loads");
    let dir = load();
    let (a, b) = (pair.model.as_ref(), dir.model.as_ref());
    assert_eq!(a.vision().expect("tower").config(), b.vision().expect("tower").config());
    assert_eq!(a.vision().expect("tower").processor(), b.vision().expect("tower").processor());
    let feats = image_features(a);
    assert_eq!(feats, image_features(b), "image features from the mmproj file");

    let r = Reference::open();
    let ids = r.ids("image_input_ids");
    let (pos, _) = rope_positions(&ids, 5, &[feats.grid], 2).expect("positions");
    let seq = Seq { ids: &ids, start: 0, table: vec![0, 1], mrope: Some(&pos), image: Some(&feats) };
    let logits = forward(a, &mut f32_cache(a), &[seq], 5).remove(0);
    assert_close("image logits from the GGUF pair", &logits, &r.f32s("image_logits"));

    // Without its mmproj the text file is a text model (the default path is found, so move it).
    std::fs::rename(s.0.join("mmproj-fixture-f32.gguf"), s.0.join("elsewhere.gguf")).expect("rename");
    let alone = pio_model::load_with(&text, &Default::default(), &mut |_, _| {}).expect("text alone loads");
    assert!(alone.model.vision().is_none());
    // An mmproj for a model that takes no images, and a text file given as the mmproj.
    let bad = pio_model::LoadOptions { mmproj: Some(text.clone()), ..Default::default() };
    let e = pio_model::load_with(&text, &bad, &mut |_, _| {}).err().expect("a text file is no mmproj").to_string();
    assert!(e.contains("\"clip\""), "{e}");
}
