//! The HTTP API's tool calls, reasoning, `/tokenize`, `/detokenize` and `/version`, over a model
//! that writes a scripted answer (a stand-in for a trained model: the tiny random ones never
//! write tool-call markup, and the small real one does not follow the format). The real Qwen3
//! tokenizer and chat template.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use pio_engine::engine::EngineConfig;
use pio_engine::handle::EngineHandle;
use pio_model::chat_template::ChatRequest;
use pio_model::tokenizer::Tokenizer;
use pio_model::{CacheSpec, CausalLm, ForwardBatch, GenerationDefaults, KvCache, LayerCache, ModelShape};
use pio_server::tool_parser::ToolCallParser;
use pio_server::{AppState, HttpConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

/// Writes `script` after a prompt of `prompt_len` tokens: position `p` predicts
/// `script[p + 1 - prompt_len]`, then the end-of-sequence token.
struct ScriptedLm {
    script: Vec<u32>,
    prompt_len: usize,
    eos: u32,
    vocab: usize,
    spec: CacheSpec,
}

impl CausalLm for ScriptedLm {
    fn shape(&self) -> ModelShape {
        ModelShape {
            vocab_size: self.vocab,
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 8,
            max_position_embeddings: 4096,
        }
    }

    fn forward(&self, batch: &ForwardBatch, _cache: &mut KvCache) -> pio_model::Result<Vec<f32>> {
        let mut out = vec![0.0; batch.logits_indices.len() * self.vocab];
        for (row, &i) in batch.logits_indices.iter().enumerate() {
            let next = (batch.positions[i] + 1).checked_sub(self.prompt_len).and_then(|k| self.script.get(k));
            out[row * self.vocab + next.copied().unwrap_or(self.eos) as usize] = 10.0;
        }
        Ok(out)
    }

    fn cache_spec(&self) -> &CacheSpec {
        &self.spec
    }
}

fn tokenizer() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pio-model/tests/data/qwen3-tokenizer");
    Tokenizer::from_hf_dir(&dir).expect("the Qwen3 tokenizer")
}

fn request(stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": "Weather in Paris and in Rome?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}],
        "temperature": 0,
        "stream": stream,
    })
}

/// An app over a model that answers the request with `answer`.
fn app(answer: &str, parser: Option<ToolCallParser>) -> axum::Router {
    app_with(answer, parser, HttpConfig::default())
}

fn app_with(answer: &str, parser: Option<ToolCallParser>, http: HttpConfig) -> axum::Router {
    let tok = tokenizer();
    let template = tok.chat_template().expect("a chat template");
    let prompt = template.render(&ChatRequest::from_openai_json(&request(false)).expect("request")).expect("render");
    let prompt_len = tok.encode(&prompt, false).expect("encode").len();
    let eos = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
    let model = ScriptedLm {
        script: tok.encode(answer, false).expect("encode"),
        prompt_len,
        eos,
        vocab: 151936,
        spec: CacheSpec { layers: vec![LayerCache::Attention { num_kv_heads: 1, head_dim: 8, window: None }] },
    };
    let tok = Arc::new(tok);
    let cfg = EngineConfig::for_tokens(2048, Default::default());
    let engine = EngineHandle::spawn(Arc::new(model), Some(tok.clone()), cfg, 16).expect("engine");
    let state = AppState {
        engine,
        tokenizer: tok,
        model_name: "scripted".into(),
        defaults: GenerationDefaults { eos_token_ids: vec![eos], ..Default::default() },
        api_key: None,
        created: 0,
        vision: None,
        tool_parser: parser,
        reasoning_parser: Some(pio_server::reasoning::ReasoningParser::Think),
        lifecycle: Default::default(),
    };
    pio_server::router(Arc::new(state), http)
}

async fn post(app: axum::Router, body: Value) -> String {
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.oneshot(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

const ANSWER: &str = "I will check both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";

fn args(call: &Value) -> Value {
    serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments string")).expect("JSON arguments")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_come_back_as_tool_calls_whole_and_streamed() {
    let tok = tokenizer();
    assert_eq!(
        ToolCallParser::for_template(tok.chat_template().expect("template").source()),
        Some(ToolCallParser::Hermes)
    );
    let v: Value =
        serde_json::from_str(&post(app(ANSWER, Some(ToolCallParser::Hermes)), request(false)).await).expect("JSON");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["content"], "I will check both.");
    let calls = choice["message"]["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 2);
    assert_eq!((&calls[0]["type"], &calls[0]["function"]["name"]), (&json!("function"), &json!("get_weather")));
    assert_eq!((args(&calls[0]), args(&calls[1])), (json!({"city": "Paris", "days": 2}), json!({"city": "Rome"})));
    assert!(calls[0]["id"].as_str().is_some_and(|id| id.starts_with("call_")) && calls[0]["id"] != calls[1]["id"]);

    // Streamed: content deltas, then one delta per call with its index, then `tool_calls`.
    let text = post(app(ANSWER, Some(ToolCallParser::Hermes)), request(true)).await;
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let content: String = deltas.iter().filter_map(|d| d["content"].as_str()).collect();
    assert_eq!(content.trim(), "I will check both.");
    assert!(!content.contains("<tool_call>"), "{content:?}");
    let calls: Vec<&Value> = deltas.iter().filter_map(|d| d["tool_calls"].as_array()).flatten().collect();
    assert_eq!(calls.len(), 2);
    assert_eq!((&calls[0]["index"], &calls[1]["index"]), (&json!(0), &json!(1)));
    assert_eq!(args(calls[1]), json!({"city": "Rome"}));
    let finishes: Vec<&Value> =
        chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finishes, vec![&json!("tool_calls")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_parser_or_with_tool_choice_none_the_markup_stays_text() {
    let plain = |v: &Value| v["choices"][0]["message"]["content"].as_str().map(str::to_string);
    let v: Value = serde_json::from_str(&post(app(ANSWER, None), request(false)).await).expect("JSON");
    assert_eq!(plain(&v).as_deref(), Some(ANSWER));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut req = request(false);
    req["tool_choice"] = json!("none");
    let v: Value = serde_json::from_str(&post(app(ANSWER, Some(ToolCallParser::Hermes)), req).await).expect("JSON");
    assert_eq!(plain(&v).as_deref(), Some(ANSWER));
    // Broken markup under `auto`: the text comes back.
    let broken = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \n</tool_call>";
    let v: Value =
        serde_json::from_str(&post(app(broken, Some(ToolCallParser::Hermes)), request(false)).await).expect("JSON");
    assert_eq!(plain(&v).as_deref(), Some(broken));
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
}

/// With a reasoning parser, a thinking answer's reasoning comes back as `reasoning_content`
/// (whole, and streamed as deltas of its own), before the content and the tool calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_comes_back_apart_from_content_and_calls() {
    let answer = format!("<think>\nThe user wants two cities.\n</think>\n\n{ANSWER}");
    let v: Value =
        serde_json::from_str(&post(app(&answer, Some(ToolCallParser::Hermes)), request(false)).await).expect("JSON");
    let message = &v["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "The user wants two cities.", "{v}");
    assert_eq!(message["content"], "I will check both.");
    assert_eq!(message["tool_calls"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");

    let text = post(app(&answer, Some(ToolCallParser::Hermes)), request(true)).await;
    let deltas: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).expect("chunk JSON")["choices"][0]["delta"].clone())
        .collect();
    let reasoning: String = deltas.iter().filter_map(|d| d["reasoning_content"].as_str()).collect();
    let content: String = deltas.iter().filter_map(|d| d["content"].as_str()).collect();
    assert_eq!(reasoning.trim(), "The user wants two cities.");
    assert_eq!(content.trim(), "I will check both.");
    assert!(!content.contains("think") && !reasoning.contains("think"), "{content:?} {reasoning:?}");
    let calls = deltas.iter().filter_map(|d| d["tool_calls"].as_array()).flatten().count();
    assert_eq!(calls, 2);
    // The reasoning comes before any content.
    let first_content = deltas.iter().position(|d| d["content"].as_str().is_some_and(|c| !c.is_empty()));
    let last_reasoning = deltas.iter().rposition(|d| d["reasoning_content"].is_string());
    assert!(last_reasoning < first_content, "{deltas:?}");

    // Without thinking, no `reasoning_content`.
    let v: Value = serde_json::from_str(&post(app("Plain answer.", None), request(false)).await).expect("JSON");
    assert!(v["choices"][0]["message"].get("reasoning_content").is_none(), "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Plain answer.");
}

async fn call(app: axum::Router, req: Request<Body>) -> (u16, Value) {
    let resp = app.oneshot(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).expect("JSON body"))
}

fn json_post(path: &str, body: Value) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string())).expect("request")
}

/// `/tokenize` (a prompt, or chat messages through the template), `/detokenize` and `/version`,
/// in vLLM's shapes; bad input gets 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_detokenize_and_version() {
    let tok = tokenizer();
    let want = tok.encode("Hello world", true).expect("encode");
    let (st, v) =
        call(app("x", None), json_post("/tokenize", json!({"prompt": "Hello world", "return_token_strs": true}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tokens"], json!(want));
    assert_eq!(v["count"], json!(want.len()));
    assert_eq!(v["token_strs"].as_array().map(Vec::len), Some(want.len()));
    assert!(v["max_model_len"].as_u64().is_some_and(|n| n > 0));
    let (st, v) =
        call(app("x", None), json_post("/tokenize", json!({"messages": [{"role": "user", "content": "Hi"}]}))).await;
    assert_eq!(st, 200, "{v}");
    let rendered =
        tok.decode(&serde_json::from_value::<Vec<u32>>(v["tokens"].clone()).expect("ids"), false).expect("decode");
    assert!(
        rendered.contains("<|im_start|>user\nHi<|im_end|>") && rendered.ends_with("<|im_start|>assistant\n"),
        "{rendered:?}"
    );
    let (st, v) = call(app("x", None), json_post("/detokenize", json!({"tokens": want}))).await;
    assert_eq!((st, v["prompt"].as_str()), (200, Some("Hello world")), "{v}");
    for (path, body) in [
        ("/detokenize", json!({"tokens": [999999999]})),
        ("/detokenize", json!({"tokens": "a"})),
        ("/tokenize", json!({"text": 1})),
    ] {
        let (st, v) = call(app("x", None), json_post(path, body)).await;
        assert_eq!(st, 400, "{path}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    let (st, v) = call(app("x", None), Request::get("/version").body(Body::empty()).expect("request")).await;
    assert_eq!((st, v["version"].as_str()), (200, Some(env!("CARGO_PKG_VERSION"))));
    // `/metrics` has vLLM's names beside ours.
    let resp =
        app("x", None).oneshot(Request::get("/metrics").body(Body::empty()).expect("request")).await.expect("response");
    let text = String::from_utf8(resp.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8");
    assert!(text.contains("pio_num_requests_running 0\n"), "{text}");
    assert!(text.contains("vllm:num_requests_running{model_name=\"scripted\"} 0\n"), "{text}");
    assert!(text.contains("vllm:e2e_request_latency_seconds_count{model_name=\"scripted\"}"), "{text}");
}

/// CORS only for the origins asked for; preflights are answered before the API key is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_only_for_allowed_origins() {
    let preflight = |origin: &str| {
        Request::options("/v1/chat/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .body(Body::empty())
            .expect("request")
    };
    let http = HttpConfig { allowed_origins: vec!["http://localhost:3000".into()], ..HttpConfig::default() };
    let resp = app_with("x", None, http.clone()).oneshot(preflight("http://localhost:3000")).await.expect("response");
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(
        resp.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("http://localhost:3000")
    );
    let resp = app_with("x", None, http).oneshot(preflight("http://evil.example")).await.expect("response");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let resp = app("x", None).oneshot(preflight("http://localhost:3000")).await.expect("response");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}
