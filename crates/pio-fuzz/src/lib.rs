//! Fuzz targets: every parser a file, a request or a model's output reaches, as a function of
//! arbitrary bytes that must never panic (an error is fine), plus invariants where there are
//! some (a stream split anywhere gives what the whole text gives).
//!
//! The same targets run two ways: coverage-guided by libFuzzer through cargo-fuzz (the crate in
//! `fuzz/`, nightly Rust; `scripts/fuzz.sh`), and by [`driver`], a mutational fuzzer without
//! coverage feedback that runs on stable Rust, which is what CI runs (`tests/smoke.rs`).
//! [`seeds`] gives each target's seed corpus from the repository's test data; inputs that once
//! crashed a target stay in `crates/pio-fuzz/regressions/<target>/` and are replayed first.

pub mod driver;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pio_model::chat_template::{ChatRequest, ChatTemplate};
use pio_model::weights::gguf::{self, GgufFile, Value as GValue};
use pio_server::reasoning::{Part, ReasoningStream};
use pio_server::tool_grammar::{call_grammar, read_tools, Reasoning, ToolChoice, ToolSpec};
use pio_server::tool_parser::{Delta, ToolCallParser, ToolCallStream};
use pio_server::wire::{ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest};
use serde_json::{json, Value};

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "gguf",
        about: "a GGUF file: header, metadata, tensor table, config, tokenizer, loading",
        run: gguf,
    },
    Target { name: "safetensors", about: "a safetensors file: header and tensor bounds", run: safetensors },
    Target { name: "safetensors_index", about: "a sharded checkpoint's index JSON", run: safetensors_index },
    Target { name: "config", about: "a Hugging Face config.json (and a preprocessor config)", run: config },
    Target { name: "chat_template", about: "a hostile chat template, rendered", run: chat_template },
    Target { name: "request", about: "the server's request bodies (chat, completion, tokenize)", run: request },
    Target { name: "tool_parser", about: "the tool-call parsers, streamed in pieces and whole", run: tool_parser },
    Target { name: "reasoning", about: "the reasoning parser, streamed in pieces and whole", run: reasoning },
    Target { name: "image", about: "an image file: decoding, resizing, patches", run: image },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The repository's root (the fuzz crate is only built from a checkout).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where this process's scratch files go (on tmpfs when there is one).
fn scratch_root() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    base.join(format!("pio-fuzz-{}", std::process::id()))
}

/// A scratch path of this process and thread (targets that read files write their input
/// there).
fn scratch(name: &str) -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let dir = scratch_root().join(thread);
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}

/// Removes this process's scratch files.
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch_root());
}

// -----------------------------------------------------------------------------------------
// Targets

fn gguf(data: &[u8]) {
    let path = scratch("model.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(g) = GgufFile::open(&path) else { return };
    let _ = pio_model::config::ModelConfig::from_gguf(&g);
    let _ = g.checkpoint();
    if let Ok(tok) = pio_model::load::tokenizer_from_gguf(&g) {
        if let Ok(ids) = tok.encode("Hello, <|im_start|>world! 123", true) {
            let _ = tok.decode(&ids, false);
        }
        if let Some(t) = tok.chat_template() {
            let _ = t.render(&ChatRequest::single_user("Hi"));
        }
    }
    drop(g);
    // What loads must also take a token.
    if let Ok(m) = pio_model::load(&path, &mut |_, _| {}) {
        let mut cache = m.model.new_kv_cache(16, 1);
        let batch = pio_model::ForwardBatch {
            token_ids: vec![0],
            positions: vec![0],
            seq_indices: vec![0],
            slot_mapping: vec![0],
            block_tables: vec![vec![0]],
            logits_indices: vec![0],
            ..Default::default()
        };
        let _ = m.model.forward(&batch, &mut cache);
    }
}

fn safetensors(data: &[u8]) {
    let path = scratch("model.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let mut out = std::collections::BTreeMap::new();
    if pio_model::weights::safetensors::load_file(&path, &mut out).is_ok() {
        for t in out.values() {
            if t.numel() <= 1 << 16 {
                let _ = t.to_f32_vec();
            }
        }
    }
}

fn safetensors_index(data: &[u8]) {
    // A directory with the index and one small valid shard beside it.
    let dir = scratch("sharded");
    let _ = std::fs::create_dir_all(&dir);
    let shard = dir.join("model-00001-of-00001.safetensors");
    if !shard.exists() && std::fs::write(&shard, tiny_safetensors()).is_err() {
        return;
    }
    if std::fs::write(dir.join("model.safetensors.index.json"), data).is_err() {
        return;
    }
    let _ = pio_model::weights::safetensors::load_dir(&dir);
}

fn config(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    if let Ok(c) = pio_model::config::ModelConfig::from_hf_json(&v) {
        // The sizes derived from it.
        let _ = (c.num_params(), c.num_active_params(), c.mla.as_ref().map(|m| (m.qk_head_dim(), m.cache_width())));
    }
    let _ = pio_model::image::ImageProcessorConfig::from_json(&String::from_utf8_lossy(data));
}

fn chat_template(data: &[u8]) {
    let source = String::from_utf8_lossy(data).into_owned();
    let Ok(t) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())) else { return };
    let _ = t.render(&sample_chat());
}

fn request(data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(data) else { return };
    let defaults = pio_model::GenerationDefaults::default();
    if let Ok(r) = ChatCompletionRequest::from_json(&body) {
        let logprobs = pio_server::params::chat_logprobs(r.logprobs, r.top_logprobs).ok().flatten();
        let _ = pio_server::params::common(&r.sampling, &defaults, logprobs);
        if let Ok(tools) = read_tools(r.tools.as_deref().unwrap_or_default()) {
            let only = match &r.tool_choice {
                Some(ToolChoice::Function(n)) => Some(n.as_str()),
                _ => None,
            };
            for p in [ToolCallParser::Hermes, ToolCallParser::Qwen3Coder, ToolCallParser::Glm47] {
                let _ = call_grammar(p, &tools, only, false, Reasoning::Optional);
            }
        }
    }
    // Content lists joined, and kept as they are (as for a template that walks them).
    for keep in [false, true] {
        if let Ok((req, _urls)) = ChatRequest::from_openai_json_with_images(&body, Some("<|image_pad|>"), keep) {
            if let Some(t) = qwen3_template() {
                let _ = t.render(&req);
            }
        }
    }
    if let Ok(r) = CompletionRequest::from_json(&body) {
        let logprobs = pio_server::params::completion_logprobs(r.logprobs).ok().flatten();
        let _ = pio_server::params::common(&r.sampling, &defaults, logprobs);
    }
    let _ = pio_server::wire::parse::<TokenizeRequest>(&body);
    let _ = pio_server::wire::parse::<DetokenizeRequest>(&body);
}

/// Splits `text` at char boundaries into pieces whose lengths `seed` decides.
fn pieces(text: &str, mut seed: u8) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        seed = seed.wrapping_mul(73).wrapping_add(41);
        let mut n = 1 + (seed as usize % 7);
        while n < rest.len() && !rest.is_char_boundary(n) {
            n += 1;
        }
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

fn tool_parser(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else { return };
    let parser = [ToolCallParser::Hermes, ToolCallParser::Qwen3Coder, ToolCallParser::Glm47][head as usize % 3];
    let text = String::from_utf8_lossy(rest);
    let tools = sample_tools();
    let whole = parser.parse(&text, &tools);
    let mut s = ToolCallStream::new(parser, tools.clone());
    let mut deltas = Vec::new();
    for p in pieces(&text, head) {
        deltas.extend(s.push(p));
    }
    deltas.extend(s.finish());
    let (mut content, mut calls) = (String::new(), Vec::new());
    for d in deltas {
        match d {
            Delta::Content(c) => content.push_str(&c),
            Delta::Call(c) => calls.push(c),
        }
    }
    let content = content.trim();
    assert_eq!(whole.calls, calls, "calls streamed in pieces differ from the whole text's: {text:?}");
    assert_eq!(
        whole.content.as_deref().unwrap_or(""),
        content,
        "content streamed in pieces differs from the whole text's: {text:?}"
    );
    for c in &whole.calls {
        assert!(serde_json::from_str::<Value>(&c.arguments).is_ok_and(|v| v.is_object()), "{c:?}");
    }
}

fn reasoning(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else { return };
    let inside = head & 1 == 1;
    let text = String::from_utf8_lossy(rest);
    let join = |parts: Vec<Part>| {
        let (mut r, mut c) = (String::new(), String::new());
        for p in parts {
            match p {
                Part::Reasoning(x) => r.push_str(&x),
                Part::Content(x) => c.push_str(&x),
            }
        }
        (r, c)
    };
    let mut s = ReasoningStream::new(inside);
    let mut whole = s.push(&text);
    whole.extend(s.finish());
    let mut s = ReasoningStream::new(inside);
    let mut streamed = Vec::new();
    for p in pieces(&text, head) {
        streamed.extend(s.push(p));
    }
    streamed.extend(s.finish());
    assert_eq!(join(whole), join(streamed), "streamed in pieces differs from the whole text: {text:?}");
    let _ = ReasoningStream::split(inside, &text);
}

fn image(data: &[u8]) {
    let Ok(img) = pio_model::image::decode(data) else { return };
    let cfg = vl_processor();
    let Ok((h, w)) = pio_model::image::smart_resize(img.height, img.width, cfg.factor(), cfg.min_pixels, 1 << 16)
    else {
        return;
    };
    if let Ok(small) = pio_model::image::resize_bicubic(&img, w, h) {
        let _ = pio_model::image::preprocess(&small, cfg);
    }
}

// -----------------------------------------------------------------------------------------
// Fixed inputs of the targets

fn sample_chat() -> ChatRequest {
    let body = json!({
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}}}}],
        "chat_template_kwargs": {"enable_thinking": false}
    });
    ChatRequest::from_openai_json(&body).unwrap_or_else(|_| ChatRequest::single_user("Hi"))
}

fn sample_tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "get_weather".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"},
                "days": {"type": "integer"}, "metric": {"type": "boolean"}, "hours": {"type": ["array", "null"]}}}),
        },
        ToolSpec { name: "add".into(), parameters: json!({"type": "object", "properties": {"a": {"type": "number"}}}) },
    ]
}

/// The real Qwen3 chat template.
fn qwen3_template() -> Option<&'static ChatTemplate> {
    static T: OnceLock<Option<ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        let path = repo_root().join("crates/pio-model/tests/data/qwen3-tokenizer/tokenizer_config.json");
        let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let source = v.get("chat_template")?.as_str()?.to_string();
        ChatTemplate::new(source, None, Some("<|im_end|>".into())).ok()
    })
    .as_ref()
}

/// Qwen3-VL's image preprocessing.
fn vl_processor() -> &'static pio_model::image::ImageProcessorConfig {
    static C: OnceLock<pio_model::image::ImageProcessorConfig> = OnceLock::new();
    C.get_or_init(|| {
        let text = r#"{"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "size": {"shortest_edge": 65536, "longest_edge": 16777216}}"#;
        pio_model::image::ImageProcessorConfig::from_json(text).unwrap_or_else(|e| panic!("the fixed config: {e}"))
    })
}

/// A safetensors file of two small tensors.
pub fn tiny_safetensors() -> Vec<u8> {
    let header = json!({
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
        "__metadata__": {"format": "pt"}
    })
    .to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    out
}

/// GPT-2's byte-level alphabet: the character each byte is written as.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// A GGUF file with a small byte-level BPE tokenizer and a chat template, no tensors.
fn tokenizer_gguf(path: &Path) -> pio_model::Result<()> {
    let chars = byte_chars();
    let mut tokens: Vec<GValue> = chars.iter().map(|c| GValue::String(c.to_string())).collect();
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"];
    for m in merges {
        tokens.push(GValue::String(m.replace(' ', "")));
    }
    tokens.push(GValue::String("<|im_start|>".into()));
    tokens.push(GValue::String("<|im_end|>".into()));
    let n = tokens.len();
    let types: Vec<GValue> = (0..n).map(|i| GValue::I32(if i >= n - 2 { 3 } else { 1 })).collect();
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let md = vec![
        ("general.architecture".to_string(), GValue::String("qwen3".into())),
        ("tokenizer.ggml.model".to_string(), GValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), GValue::String("qwen2".into())),
        ("tokenizer.ggml.tokens".to_string(), GValue::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), GValue::Array(types)),
        (
            "tokenizer.ggml.merges".to_string(),
            GValue::Array(merges.iter().map(|m| GValue::String(m.to_string())).collect()),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), GValue::U32(n as u32 - 1)),
        ("tokenizer.chat_template".to_string(), GValue::String(template.into())),
    ];
    gguf::write_gguf(path, &md, &[])
}

/// A tiny Qwen3 (one layer, 256 tokens) as GGUF, written by `pio synth`'s writer.
fn model_gguf(path: &Path) -> pio_model::Result<()> {
    let root = repo_root();
    let mut cfg: Value = serde_json::from_slice(
        &std::fs::read(root.join("testdata/synthetic/qwen3/config.json")).map_err(|e| pio_model::Error::io(path, e))?,
    )
    .map_err(|e| pio_model::Error::file(path, e.to_string()))?;
    cfg["num_hidden_layers"] = 1.into();
    cfg["vocab_size"] = 256.into();
    let config = path.with_extension("json");
    std::fs::write(&config, cfg.to_string()).map_err(|e| pio_model::Error::io(&config, e))?;
    pio_model::synth::write_random_checkpoint(&config, None, path, pio_kernels::DType::Q8_0, 1)
}

/// The seed corpus of target `name`: the repository's test data of its kind and inputs written
/// for it.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    let root = repo_root();
    let read = |p: &str| std::fs::read(root.join(p)).ok();
    let files = |dir: &str, ext: &str| -> Vec<Vec<u8>> {
        let mut paths: Vec<PathBuf> =
            std::fs::read_dir(root.join(dir)).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        paths.sort();
        paths.into_iter().filter(|p| p.to_string_lossy().ends_with(ext)).filter_map(|p| std::fs::read(p).ok()).collect()
    };
    let mut out: Vec<Vec<u8>> = match name {
        "gguf" => {
            let mut v = Vec::new();
            for (file, write) in [("tok.gguf", tokenizer_gguf as fn(&Path) -> _), ("model.gguf", model_gguf)] {
                let p = scratch(&format!("seed-{file}"));
                if write(&p).is_ok() {
                    v.extend(std::fs::read(&p).ok());
                }
            }
            v
        }
        "safetensors" => vec![tiny_safetensors()],
        "safetensors_index" => vec![
            json!({"metadata": {"total_size": 32}, "weight_map": {"a": "model-00001-of-00001.safetensors",
                "b": "model-00001-of-00001.safetensors"}})
            .to_string()
            .into_bytes(),
        ],
        "config" => {
            let mut v: Vec<Vec<u8>> = ["glm4_moe_lite", "llama", "qwen2", "qwen2-swa", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_vl"]
                .iter()
                .filter_map(|f| read(&format!("testdata/synthetic/{f}/config.json")))
                .collect();
            v.extend(read("testdata/synthetic/qwen3_vl/preprocessor_config.json"));
            v
        }
        "chat_template" => {
            let mut v: Vec<Vec<u8>> = qwen3_template().map(|t| t.source().as_bytes().to_vec()).into_iter().collect();
            v.extend(read("crates/pio-model/tests/data/chat_template/chat_template.from_dart_comment.jinja"));
            v.push(b"{% for i in range(100) %}{% for j in range(100) %}{{ i * j }}{% endfor %}{% endfor %}".to_vec());
            v.push(b"{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".to_vec());
            v.push(b"{{ 'ab' * 1000 }}{{ messages | tojson }}{{ raise_exception('no') }}".to_vec());
            v
        }
        "request" => vec![
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0.5,
                "stop": ["a", "b"], "logprobs": true, "top_logprobs": 2, "stream": true,
                "stream_options": {"include_usage": true}, "logit_bias": {"5": -100}})
            .to_string()
            .into_bytes(),
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "string", "enum": ["x", "y"]}},
                    "required": ["a"]}}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}})
            .to_string()
            .into_bytes(),
            json!({"prompt": [[1, 2], [3]], "n": 2, "logprobs": 3, "guided_regex": "[a-z]+", "seed": 4})
                .to_string()
                .into_bytes(),
            json!({"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": true,
                "return_token_strs": true, "tokens": [1, 2, 3]})
            .to_string()
            .into_bytes(),
        ],
        "tool_parser" => vec![
            b"\x00Sure.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>".to_vec(),
            b"\x01<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>".to_vec(),
            b"\x02<tool_call>add<arg_key>a</arg_key><arg_value>1.5</arg_value></tool_call> done".to_vec(),
        ],
        "reasoning" => vec![
            b"\x00<think>\nLet me see.\n</think>\n\nThe answer.".to_vec(),
            b"\x01thinking inside</think>answer".to_vec(),
            b"\x00  <thi".to_vec(),
        ],
        "image" => {
            let mut v = files("testdata/images", ".png");
            v.truncate(3);
            v
        }
        _ => Vec::new(),
    };
    out.extend(regressions(name));
    out
}

/// Inputs that once crashed target `name` (kept in the repository).
pub fn regressions(name: &str) -> Vec<Vec<u8>> {
    let dir = repo_root().join("crates/pio-fuzz/regressions").join(name);
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    paths.sort();
    paths.into_iter().filter_map(|p| std::fs::read(p).ok()).collect()
}
