//! Real trained weights (SmolLM2-135M-Instruct Q4_1, Qwen2.5-Coder-0.5B-Instruct Q4_K_M)
//! against the float32 references in `testdata/real/` (see its README for the acceptance rule).
//!
//! The GGUF files come from `scripts/fetch-models.sh` (run by `.ci/run`). Outside CI a missing
//! file skips these tests with a printed reason; in CI it fails them.

use std::path::PathBuf;

use pio_engine::engine::{Engine, EngineConfig};
use pio_engine::generate::{generate, GenerateParams};
use pio_engine::sampler::SamplingParams;
use pio_model::chat_template::ChatRequest;
use serde_json::Value;

/// A reference position counts when its top-1 minus top-2 gap is at least this.
const DECIDED: f64 = 0.3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path(file: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("PIO_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let path = dir.join(file);
    if path.exists() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "{} is missing in CI: .ci/run must fetch it", path.display());
    eprintln!("skipping: {} not found (run scripts/fetch-models.sh)", path.display());
    None
}

fn reference(name: &str) -> Value {
    let path = root().join("testdata/real").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("reference file")).expect("reference JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Checks one reference file: prompt ids, teacher-forced top-1 on decided positions, greedy
/// tokens up to the first undecided step.
fn check(name: &str) {
    let r = reference(name);
    let Some(path) = model_path(r["model_file"].as_str().expect("model_file")) else { return };
    let loaded = pio_model::load(&path, &mut |_, _| {}).expect("model loads");
    let tok = loaded.tokenizer().expect("GGUF tokenizer");

    // 1. The prompt through the GGUF's own chat template and tokenizer.
    let prompt_text = r["prompt_text"].as_str().expect("prompt_text");
    let rendered = if r["chat"].as_bool().expect("chat") {
        let template = tok.chat_template().expect("GGUF chat template");
        template.render(&ChatRequest::single_user(prompt_text)).expect("template renders")
    } else {
        prompt_text.to_string()
    };
    assert_eq!(rendered, r["rendered_prompt"].as_str().expect("rendered"), "{name}: rendered prompt");
    let prompt = tok.encode(&rendered, true).expect("encode");
    assert_eq!(prompt, ids(&r["prompt_ids"]), "{name}: prompt ids");

    // 2. Teacher forcing: one pass over prompt + reference tokens.
    let greedy_ref = ids(&r["greedy_ids"]);
    let mut all = prompt.clone();
    all.extend(&greedy_ref);
    let vocab = loaded.model.shape().vocab_size;
    let cfg = EngineConfig::for_tokens(all.len() + 64, Default::default());
    let mut engine = Engine::new(loaded.model.as_ref(), Some(tok), cfg).expect("engine");
    let logits = engine.score(&[all.clone()], 0).expect("forward").remove(0);
    let (mut decided, mut agree) = (0, 0);
    for tf in r["teacher_forced"].as_array().expect("teacher_forced") {
        if tf["gap"].as_f64().expect("gap") < DECIDED {
            continue;
        }
        let pos = tf["pos"].as_u64().expect("pos") as usize;
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let top1 = row.iter().enumerate().fold(0, |b, (i, v)| if *v > row[b] { i } else { b });
        decided += 1;
        agree += usize::from(top1 as u64 == tf["top5_ids"][0].as_u64().expect("top1"));
    }
    let share = agree as f64 / decided as f64;
    eprintln!("{name}: teacher-forced top-1 agreement {agree}/{decided} = {share:.3}");
    assert!(share >= 0.97, "{name}: teacher-forced top-1 agreement {share:.3} < 0.97");

    // 3. Greedy, end-of-sequence ignored, up to the first undecided step.
    let params = GenerateParams {
        guide: None,
        sampling: SamplingParams::greedy(),
        max_tokens: greedy_ref.len(),
        stop_token_ids: loaded.generation.eos_token_ids.clone(),
        ignore_eos: true,
        stop: Vec::new(),
        attention_window: None,
        attention_sinks: None,
        images: Vec::new(),
    };
    let out = generate(&mut engine, &prompt, &params, &mut |_| {}).expect("generate");
    let margins: Vec<f64> =
        r["greedy_margins"].as_array().expect("margins").iter().map(|m| m.as_f64().expect("m")).collect();
    let must = margins.iter().position(|&m| m < DECIDED).unwrap_or(margins.len());
    assert_eq!(out.token_ids[..must], greedy_ref[..must], "{name}: greedy tokens (first {must} decided)");
    let same = out.token_ids.iter().zip(&greedy_ref).take_while(|(a, b)| a == b).count();
    eprintln!("{name}: greedy {same}/{} tokens equal the reference; text: {:?}", greedy_ref.len(), out.text);
    if same == greedy_ref.len() {
        assert_eq!(out.text, r["greedy_text"].as_str().expect("greedy_text"), "{name}: greedy text");
    }
}

#[test]
fn smollm2_story() {
    check("smollm2-story");
}

#[test]
fn smollm2_capital() {
    check("smollm2-capital");
}

#[test]
fn smollm2_haiku() {
    check("smollm2-haiku");
}

#[test]
fn qwen25_coder_fibonacci() {
    check("qwen2.5-coder-fibonacci");
}

#[test]
fn qwen25_coder_palindrome() {
    check("qwen2.5-coder-palindrome");
}

#[test]
fn qwen25_coder_hashmap() {
    check("qwen2.5-coder-hashmap");
}

#[test]
fn qwen25_gguf_tokenizer_matches_qwen3_reference_ids() {
    // Qwen2.5 and Qwen3 share vocabulary and merges; Qwen3 adds specials from id 151665 on.
    let Some(path) = model_path("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf") else { return };
    let tok = pio_model::load_tokenizer(&path).expect("GGUF tokenizer");
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("crates/pio-model/tests/data/tokenizer/qwen3_cases.json")).expect("cases"),
    )
    .expect("cases JSON");
    let mut checked = 0;
    for case in cases.as_array().expect("case list") {
        let want = ids(&case["ids"]);
        if want.iter().any(|&id| id >= 151665) {
            continue;
        }
        let text = case["text"].as_str().expect("text");
        assert_eq!(tok.encode(text, false).expect("encode"), want, "text {text:?}");
        assert_eq!(
            tok.decode(&want, false).expect("decode"),
            case["decoded"].as_str().expect("decoded"),
            "ids of {text:?}"
        );
        checked += 1;
    }
    assert!(checked > 10, "only {checked} cases checked");
}

/// N-gram speculation on a code-editing prompt (`crates/pio-cli/tests/data/spec/`): the same
/// tokens as plain decoding, greedy and seeded, on both real models; proposals are accepted.
#[test]
fn ngram_speculation_gives_the_same_tokens_on_real_models() {
    let task = std::fs::read_to_string(root().join("crates/pio-cli/tests/data/spec/rename_5.txt")).expect("prompt");
    for file in ["Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let Some(path) = model_path(file) else { return };
        let loaded = pio_model::load(&path, &mut |_, _| {}).expect("model loads");
        let tok = loaded.tokenizer().expect("GGUF tokenizer");
        let template = tok.chat_template().expect("GGUF chat template");
        let rendered = template.render(&ChatRequest::single_user(&task)).expect("template renders");
        let prompt = tok.encode(&rendered, true).expect("encode");
        for sampling in
            [SamplingParams::greedy(), SamplingParams { temperature: 0.7, seed: Some(3), ..Default::default() }]
        {
            let params = GenerateParams {
                guide: None,
                sampling,
                max_tokens: 160,
                stop_token_ids: loaded.generation.eos_token_ids.clone(),
                ignore_eos: false,
                stop: Vec::new(),
                attention_window: None,
                attention_sinks: None,
                images: Vec::new(),
            };
            let run = |spec| {
                let cfg = EngineConfig { spec, ..EngineConfig::for_tokens(prompt.len() + 200, Default::default()) };
                let mut engine = Engine::new(loaded.model.as_ref(), Some(tok), cfg).expect("engine");
                let out = generate(&mut engine, &prompt, &params, &mut |_| {}).expect("generate");
                (out.token_ids, engine.metrics().spec_accepted_tokens.load(std::sync::atomic::Ordering::Relaxed))
            };
            let (plain, _) = run(None);
            let (spec, accepted) = run(Some(pio_engine::spec::SpecConfig::ngram(8, 5, 3)));
            assert_eq!(spec, plain, "{file}: speculative tokens");
            assert!(accepted > 0, "{file}: no proposal was accepted on a code-editing prompt");
        }
    }
}

/// Guided decoding on both real models: JSON under a schema (greedy and sampled, with n-gram
/// speculation giving the same tokens as without), a regex, a choice; a guided request batched
/// with an unguided one leaves the unguided one's tokens as they are alone.
#[test]
fn guided_outputs_match_their_grammar_on_real_models() {
    use pio_engine::engine::RequestParams;
    use pio_engine::guided::Guide;
    let schema = serde_json::json!({"type": "object", "properties": {"city": {"type": "string"},
        "population": {"type": "integer"}}, "required": ["city", "population"], "additionalProperties": false});
    for file in ["Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let Some(path) = model_path(file) else { return };
        let loaded = pio_model::load(&path, &mut |_, _| {}).expect("model loads");
        let tok = loaded.tokenizer().expect("GGUF tokenizer");
        let template = tok.chat_template().expect("GGUF chat template");
        let chat = |text: &str| {
            let rendered = template.render(&ChatRequest::single_user(text)).expect("template renders");
            tok.encode(&rendered, true).expect("encode")
        };
        let eos = loaded.generation.eos_token_ids.clone();
        let req = |guide: Option<Guide>, sampling: SamplingParams| RequestParams {
            guide,
            sampling,
            max_tokens: Some(60),
            eos_token_ids: eos.clone(),
            ..Default::default()
        };
        let run = |reqs: &[(Vec<u32>, RequestParams)], spec| -> Vec<Vec<u32>> {
            let cfg = EngineConfig { spec, ..EngineConfig::for_tokens(4096, Default::default()) };
            let mut e = Engine::new(loaded.model.as_ref(), Some(tok), cfg).expect("engine");
            let ids: Vec<u64> =
                reqs.iter().map(|(p, r)| e.add_request(p.clone(), r.clone()).expect("request")).collect();
            let mut out = vec![Vec::new(); reqs.len()];
            while e.has_work() {
                for o in e.step().expect("step") {
                    out[ids.iter().position(|&i| i == o.id).expect("id")].extend(o.token_ids);
                }
            }
            out
        };
        let city = chat("Name a large city and its population, as JSON.");
        for sampling in
            [SamplingParams::greedy(), SamplingParams { temperature: 1.0, seed: Some(5), ..Default::default() }]
        {
            let r = (city.clone(), req(Some(Guide::JsonSchema(schema.clone())), sampling.clone()));
            let plain = run(std::slice::from_ref(&r), None).remove(0);
            let text = tok.decode(&plain, true).expect("decode");
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: not JSON ({e}): {text:?}"));
            assert!(
                v["city"].is_string() && v["population"].is_i64() && v.as_object().map(|o| o.len()) == Some(2),
                "{file}: {text}"
            );
            let spec = run(std::slice::from_ref(&r), Some(pio_engine::spec::SpecConfig::ngram(4, 3, 1))).remove(0);
            assert_eq!(spec, plain, "{file}: guided tokens with speculation");
        }
        let yes_no = (
            chat("Is water wet? Answer yes or no."),
            req(Some(Guide::Regex("(yes|no)".into())), SamplingParams::greedy()),
        );
        let choice = (
            chat("Pick a fruit."),
            req(Some(Guide::Choice(vec!["apple".into(), "pear".into()])), SamplingParams::greedy()),
        );
        let free = (chat("Say hello."), req(None, SamplingParams::greedy()));
        let alone = run(std::slice::from_ref(&free), None).remove(0);
        let batched = run(&[yes_no, choice, free], None);
        let text = |ids: &[u32]| tok.decode(ids, true).expect("decode");
        assert!(["yes", "no"].contains(&text(&batched[0]).as_str()), "{file}: {:?}", text(&batched[0]));
        assert!(["apple", "pear"].contains(&text(&batched[1]).as_str()), "{file}: {:?}", text(&batched[1]));
        assert_eq!(batched[2], alone, "{file}: the unguided request beside guided ones");
    }
}
