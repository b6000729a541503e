//! The uniform plugin interface on the real SmolLM2-135M-Instruct (fetched by
//! scripts/fetch-models.sh; skipped outside CI without it, required in CI).

use std::path::PathBuf;

use pio_engine::engine::{Engine, EngineConfig, FinishReason, RequestParams};
use pio_engine::generate::{generate, GenerateParams};
use pio_engine::plugin::{EnginePlugin, ModelPlugin};
use pio_engine::sampler::SamplingParams;
use serde_json::json;

fn model_path() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::var_os("PIO_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "{} is missing in CI: .ci/run must fetch it", path.display());
    eprintln!("skipping: {} not found (run scripts/fetch-models.sh)", path.display());
    None
}

#[test]
fn one_interface_loads_generates_chats_and_reports() {
    let Some(path) = model_path() else { return };
    let plugin: Box<dyn ModelPlugin> =
        Box::new(EnginePlugin::load(&path, &Default::default(), 64 << 20, 2048).expect("plugin loads"));
    let ids = plugin.tokenize("The capital of France is").expect("tokenize");
    assert_eq!(plugin.detokenize(&ids).expect("detokenize"), "The capital of France is");
    assert!(plugin.detokenize(&[u32::MAX]).is_err());

    let greedy = RequestParams { max_tokens: Some(12), ..Default::default() };
    let out = plugin.generate_text("The capital of France is", &greedy).expect("generate_text");
    assert_eq!(out.prompt_tokens, ids.len());
    assert!(!out.token_ids.is_empty() && out.token_ids.len() <= 12);
    // The same greedy tokens as the plain generate() path on the same model.
    let loaded = pio_model::load(&path, &mut |_, _| {}).expect("load");
    let tok = loaded.tokenizer().expect("tokenizer");
    let mut engine = Engine::new(loaded.model.as_ref(), Some(tok), EngineConfig::for_tokens(64, Default::default()))
        .expect("engine");
    let params = GenerateParams {
        guide: None,
        sampling: SamplingParams::greedy(),
        max_tokens: 12,
        stop_token_ids: loaded.generation.eos_token_ids.clone(),
        ignore_eos: false,
        stop: Vec::new(),
        attention_window: None,
        attention_sinks: None,
        images: Vec::new(),
    };
    let want = generate(&mut engine, &ids, &params, &mut |_| {}).expect("generate");
    assert_eq!(out.token_ids, want.token_ids);
    assert_eq!(out.text, want.text);

    let messages = [json!({"role": "user", "content": "Say hello."})];
    let chat = plugin.chat_completion(&messages, &greedy).expect("chat_completion");
    assert!(!chat.text.is_empty());
    assert!(matches!(chat.finish_reason, FinishReason::Stop | FinishReason::Length));
    // The same conversation again comes from the prefix cache.
    let again = plugin.chat_completion(&messages, &greedy).expect("chat_completion");
    assert_eq!(again.text, chat.text);
    assert!(again.cached_tokens > 0);
    assert!(plugin.chat_completion(&[], &greedy).is_err());

    let r = plugin.report();
    assert_eq!(r.info.arch, "llama");
    assert!(r.generated_tokens >= (out.token_ids.len() + chat.token_ids.len()) as u64);
    assert!(r.prefix_cache_hit_tokens > 0 && r.kv_cache_bytes > 0 && r.kv_blocks_used == 0);
    plugin.unload();
}

/// Qwen3-Next (recurrent state) through the same interface: a tiny random-weight model with
/// the real Qwen3 tokenizer and chat template; the repeated conversation resumes from the
/// prefix cache's state snapshot.
#[test]
fn the_hybrid_model_runs_through_the_same_interface() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!("pio-plugin-next-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("testdata/synthetic/qwen3_next/config.json")).expect("config"))
            .expect("json");
    cfg["vocab_size"] = 151936.into();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write");
    let model = dir.join("model");
    let tokenizer = root.join("crates/pio-model/tests/data/qwen3-tokenizer");
    pio_model::synth::write_random_checkpoint(
        &dir.join("config.json"),
        Some(&tokenizer),
        &model,
        pio_kernels::DType::BF16,
        5,
    )
    .expect("synth");
    let plugin: Box<dyn ModelPlugin> =
        Box::new(EnginePlugin::load(&model, &Default::default(), 64 << 20, 2048).expect("plugin loads"));
    let greedy = RequestParams { max_tokens: Some(6), ignore_eos: true, ..Default::default() };
    let out = plugin.generate_text("The capital of France is", &greedy).expect("generate_text");
    assert_eq!(out.token_ids.len(), 6);
    let messages = [
        json!({"role": "system", "content": "You are a helpful assistant who answers briefly."}),
        json!({"role": "user", "content": "Name three prime numbers, please."}),
    ];
    let chat = plugin.chat_completion(&messages, &greedy).expect("chat_completion");
    let again = plugin.chat_completion(&messages, &greedy).expect("chat_completion");
    assert_eq!(again.token_ids, chat.token_ids);
    assert!(again.cached_tokens >= 16, "the second request resumes from a snapshot: {}", again.cached_tokens);
    let r = plugin.report();
    assert_eq!(r.info.arch, "Qwen3NextForCausalLM");
    plugin.unload();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vision_model_takes_images_through_the_plugin() {
    use base64::Engine as _;
    // A tiny random-weight Qwen3-VL with the real Qwen3 tokenizer (its vision tokens).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!("pio-plugin-vision-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let fixture = root.join("testdata/synthetic/qwen3_vl");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).expect("config")).expect("json");
    c["text_config"]["vocab_size"] = 151936.into();
    for (k, v) in [("image_token_id", 151655), ("video_token_id", 151656), ("vision_start_token_id", 151652)] {
        c[k] = v.into();
    }
    c["vision_end_token_id"] = 151653.into();
    std::fs::write(dir.join("config.json"), c.to_string()).expect("config");
    let tokenizer = root.join("crates/pio-model/tests/data/qwen3-tokenizer");
    pio_model::synth::write_random_checkpoint(
        &dir.join("config.json"),
        Some(&tokenizer),
        &dir.join("model"),
        pio_kernels::DType::F32,
        3,
    )
    .expect("synth");
    let plugin = EnginePlugin::load(&dir.join("model"), &Default::default(), 64 << 20, 1024).expect("plugin loads");
    let png = std::fs::read(fixture.join("image.png")).expect("image");
    let image = plugin.image(&png).expect("an image");
    assert!(plugin.image(b"not an image").is_err());
    let greedy = RequestParams { max_tokens: Some(5), ignore_eos: true, ..Default::default() };

    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    let messages = [json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]})];
    let chat = plugin.chat_completion(&messages, &greedy).expect("chat with an image");
    let text_only = plugin
        .chat_completion(&[json!({"role": "user", "content": "What is this?"})], &greedy)
        .expect("chat without one");
    // The image's tokens (the 64 x 96 image scaled up to the processor's minimum) are in the prompt.
    assert!(
        chat.prompt_tokens >= text_only.prompt_tokens + 60,
        "{} vs {}",
        chat.prompt_tokens,
        text_only.prompt_tokens
    );
    assert_eq!(chat.token_ids.len(), 5);

    // generate_text: the image goes before the text without a placeholder, or where one stands.
    let with_image = RequestParams { images: vec![image.clone()], ..greedy.clone() };
    let a = plugin.generate_text("Describe:", &with_image).expect("generate with an image");
    let b = plugin.generate_text("<|vision_start|><|image_pad|><|vision_end|>Describe:", &with_image).expect("placed");
    assert_eq!(a.token_ids, b.token_ids);
    assert_eq!(a.prompt_tokens, b.prompt_tokens);
    let far = json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]});
    assert!(plugin.chat_completion(&[far], &greedy).is_err(), "no network fetches");
    Box::new(plugin).unload();
    let _ = std::fs::remove_dir_all(&dir);
}
