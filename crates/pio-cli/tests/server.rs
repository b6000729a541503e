//! `pio serve` as clients use it: raw HTTP for every error case, a client that disconnects
//! mid-stream (its KV blocks come back, seen through /metrics), the CLI and the server agreeing
//! on greedy text, and the official `openai` Python client (scripts/openai_client_test.py) when
//! `PIO_TEST_PYTHON` names a Python that has it (`scripts/test.sh` installs it; required in CI).
//!
//! The model is the real SmolLM2-135M-Instruct (fetched by scripts/fetch-models.sh); without it
//! these tests skip outside CI and fail in CI.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A real model under `models/` (or `$PIO_MODELS_DIR`); `None` (skip) outside CI when it is
/// not fetched.
fn real_model(file: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("PIO_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let path = dir.join(file);
    if path.exists() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "{} is missing in CI: .ci/run must fetch it", path.display());
    eprintln!("skipping: {} not found (run scripts/fetch-models.sh)", path.display());
    None
}

fn model_path() -> Option<PathBuf> {
    real_model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The model whose chat template writes tool calls (hermes), for the agent checks.
fn agent_model_path() -> Option<PathBuf> {
    real_model("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
}

/// A running `pio serve`, killed on drop.
struct Server {
    child: Child,
    port: u16,
    /// Its log lines so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    fn start(model: &PathBuf, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pio"))
            .args(["serve", "--model"])
            .arg(model)
            .args(["--port", "0", "--threads", "2"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pio serve starts");
        let mut line = String::new();
        let stderr = child.stderr.take().expect("stderr");
        let mut reader = BufReader::new(stderr);
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read stderr");
            assert!(n > 0, "pio serve exited before listening");
            if line.starts_with("serving ") {
                break;
            }
        }
        let port = line
            .split("http://127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        // Keep draining stderr so the server never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in reader.lines().map_while(Result::ok) {
                if let Ok(mut v) = sink.lock() {
                    v.push(l);
                }
            }
        });
        Server { child, port, log }
    }

    /// Waits up to 5 s for a log line containing every one of `parts`.
    fn wait_log(&self, parts: &[&str]) -> String {
        for _ in 0..100 {
            let found =
                self.log.lock().ok().and_then(|v| v.iter().find(|l| parts.iter().all(|p| l.contains(p))).cloned());
            if let Some(l) = found {
                return l;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no log line with {parts:?} in {:?}", self.log.lock().map(|v| v.clone()));
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        s
    }

    /// One request; returns (status, headers and body as text).
    fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut s = self.connect();
        s.write_all(request).expect("send");
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, text)
    }

    fn request(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
        .into_bytes();
        for h in headers {
            req.extend_from_slice(h.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        self.raw(&req)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        (status, body_json(&text))
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.request("GET", "/metrics", &[], b"");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn body_json(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// An OpenAI error object with this status, type, and a message mentioning `what`.
fn assert_error(status: u16, v: &Value, want_status: u16, kind: &str, what: &str) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(msg.contains(what), "{msg:?} does not mention {what:?}");
}

#[test]
fn errors_come_back_in_openai_format_with_the_right_status() {
    let Some(model) = model_path() else { return };
    let srv = Server::start(&model, &["--max-model-len", "64", "--max-body-bytes", "2048"]);
    let (s, v) = {
        let (s, t) = srv.request("POST", "/v1/chat/completions", &[], b"{\"messages\": [");
        (s, body_json(&t))
    };
    assert_error(s, &v, 400, "invalid_request_error", "malformed JSON");
    let (s, v) = srv.post("/v1/chat/completions", &json!({"model": "gpt-9", "messages": []}));
    assert_error(s, &v, 404, "invalid_request_error", "gpt-9");
    assert_eq!(v["error"]["code"], "model_not_found");
    let long = "word ".repeat(200);
    let (s, v) = srv.post("/v1/completions", &json!({"prompt": long, "max_tokens": 4}));
    assert_error(s, &v, 400, "invalid_request_error", "64");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Refusals are logged with their cause; finished requests with their figures.
    srv.wait_log(&["WARN", "request refused", "status=400", "maximum context length"]);
    let (s, _) = srv.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 3}));
    assert_eq!(s, 200);
    let line = srv.wait_log(&["INFO", "request done", "endpoint=\"/v1/completions\"", "completion_tokens=3"]);
    assert!(line.contains("ttft_ms=") && line.contains("duration_ms="), "{line}");
    for bad in [
        json!({"prompt": "hi", "temperature": -0.5}),
        json!({"prompt": "hi", "top_p": 1.5}),
        json!({"prompt": "hi", "max_tokens": 0}),
        json!({"prompt": "hi", "n": 0}),
        json!({"prompt": "hi", "logprobs": 50}),
        json!({"prompt": "hi", "temperature": "warm"}),
        json!({"prompt": 42}),
        json!({"prompt": "hi", "max_tokens": i64::MAX}),
    ] {
        let (s, v) = srv.post("/v1/completions", &bad);
        assert_error(s, &v, 400, "invalid_request_error", "");
    }
    let (s, v) = srv.post("/v1/chat/completions", &json!({"messages": "hello"}));
    assert_error(s, &v, 400, "invalid_request_error", "messages");
    let big = json!({"prompt": "x".repeat(4096)});
    let (s, v) = srv.post("/v1/completions", &big);
    assert_error(s, &v, 413, "invalid_request_error", "too large");
    let (s, v) = {
        let (s, t) = srv.request("GET", "/v1/nothing", &[], b"");
        (s, body_json(&t))
    };
    assert_error(s, &v, 404, "invalid_request_error", "route");
    // A streaming window (vLLM-style extension fields) runs past the context; bad ones are 400s.
    let streamed = json!({"prompt": long, "max_tokens": 80, "temperature": 0, "ignore_eos": true,
        "attention_window": 48, "attention_sinks": 4});
    let (s, v) = srv.post("/v1/completions", &streamed);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 80);
    for (bad, what) in [
        (json!({"prompt": "hi", "attention_window": 48, "attention_sinks": 48}), "attention_sinks"),
        (json!({"prompt": "hi", "attention_window": 8}), "attention_window"),
        (json!({"prompt": "hi", "attention_sinks": 4}), "attention_window"),
        (json!({"prompt": "hi", "attention_window": "wide"}), "attention_window"),
    ] {
        let (s, v) = srv.post("/v1/completions", &bad);
        assert_error(s, &v, 400, "invalid_request_error", what);
    }
    // The server is still fine.
    let (s, v) = srv.post("/v1/completions", &json!({"prompt": "The sky is", "max_tokens": 3, "temperature": 0}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[test]
fn api_key_guards_everything_but_health_and_the_queue_cap_answers_429() {
    let Some(model) = model_path() else { return };
    let srv = Server::start(&model, &["--api-key", "s3cret", "--max-num-seqs", "1", "--max-queued-requests", "1"]);
    assert_eq!(srv.request("GET", "/health", &[], b"").0, 200);
    let (s, t) = srv.request("GET", "/v1/models", &[], b"");
    assert_error(s, &body_json(&t), 401, "authentication_error", "API key");
    assert_eq!(srv.request("GET", "/metrics", &["Authorization: Bearer nope"], b"").0, 401);
    let auth = ["Authorization: Bearer s3cret"];
    let (s, t) = srv.request("GET", "/v1/models", &auth, b"");
    assert_eq!(s, 200, "{t}");
    // A long stream occupies the one running slot; one more request may wait; a third is refused.
    let stream_req = |prompt: &str| {
        let body = json!({"prompt": prompt, "max_tokens": 3000, "ignore_eos": true, "stream": true}).to_string();
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut a = srv.connect();
    a.write_all(stream_req("Once upon a time").as_bytes()).expect("send a");
    let mut first = [0u8; 256];
    let n = a.read(&mut first).expect("a answers");
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let metric = |name: &str| {
        let (_, text) = srv.request("GET", "/metrics", &auth, b"");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    while metric("pio_num_requests_running") != 1.0 {
        assert!(Instant::now() < deadline, "request a never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut b = srv.connect();
    b.write_all(stream_req("In a hole in the ground").as_bytes()).expect("send b");
    while metric("pio_num_requests_waiting") != 1.0 {
        assert!(Instant::now() < deadline, "request b never queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    let body = json!({"prompt": "Hello", "max_tokens": 2}).to_string();
    let auth_hdr = ["Authorization: Bearer s3cret"];
    let (s, t) = srv.request("POST", "/v1/completions", &auth_hdr, body.as_bytes());
    assert_error(s, &body_json(&t), 429, "rate_limit_error", "queued");
    // Both clients hang up: everything is freed.
    drop(a);
    drop(b);
    while metric("pio_kv_cache_blocks_used") != 0.0 || metric("pio_num_requests_running") != 0.0 {
        assert!(Instant::now() < deadline, "blocks were not freed after the clients left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_gives_its_blocks_back() {
    let Some(model) = model_path() else { return };
    let srv = Server::start(&model, &[]);
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 3000,
        "ignore_eos": true, "stream": true})
    .to_string();
    let mut s = srv.connect();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut events = 0;
    let mut line = String::new();
    while events < 5 {
        line.clear();
        assert!(reader.read_line(&mut line).expect("read") > 0, "stream ended early");
        if line.starts_with("data: {") {
            events += 1;
        }
    }
    assert!(srv.metric("pio_kv_cache_blocks_used") > 0.0);
    drop(reader);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(20);
    while srv.metric("pio_kv_cache_blocks_used") != 0.0 || srv.metric("pio_num_requests_running") != 0.0 {
        assert!(Instant::now() < deadline, "the disconnected request kept its blocks");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, text) = srv.request("GET", "/metrics", &[], b"");
    assert!(text.contains("pio_request_success_total{finished_reason=\"abort\"} 1"), "{text}");
    // Five events: the role chunk, then at least four tokens.
    assert!(srv.metric("pio_generation_tokens_total") >= 4.0);
}

#[test]
fn cli_and_server_agree_on_greedy_chat_and_streaming_matches() {
    let Some(model) = model_path() else { return };
    let prompt = "Write one sentence about the sea.";
    let cli = Command::new(env!("CARGO_BIN_EXE_pio"))
        .args(["generate", "--chat", "--temperature", "0", "--max-tokens", "24", "--prompt", prompt, "--model"])
        .arg(&model)
        .output()
        .expect("pio generate");
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let cli_text = String::from_utf8_lossy(&cli.stdout).trim_end_matches('\n').to_string();
    let srv = Server::start(&model, &["--max-batch-tokens", "7"]);
    let req = json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 24});
    let (s, v) = srv.post("/v1/chat/completions", &req);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(cli_text.as_str()));
    // Streamed, the deltas add up to the same text; usage comes last, then [DONE].
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (s, text) = srv.request("POST", "/v1/chat/completions", &[], sreq.to_string().as_bytes());
    assert_eq!(s, 200);
    let datas: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = datas.iter().filter_map(|d| serde_json::from_str(d).ok()).collect();
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, cli_text);
    let usage = &chunks.last().expect("chunks")["usage"];
    assert_eq!(usage["completion_tokens"], v["usage"]["completion_tokens"]);
    // The second identical prompt came from the prefix cache.
    assert!(usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) > 0, "{usage}");
}

#[test]
fn the_official_openai_client_works() {
    let Some(model) = model_path() else { return };
    let Some(python) = std::env::var_os("PIO_TEST_PYTHON") else {
        assert!(std::env::var_os("CI").is_none(), "CI must set PIO_TEST_PYTHON (scripts/test.sh does)");
        eprintln!("skipping: set PIO_TEST_PYTHON to a Python with the `openai` package");
        return;
    };
    let out = Command::new(python)
        .arg(root().join("scripts/openai_client_test.py"))
        .arg("--pio")
        .arg(env!("CARGO_BIN_EXE_pio"))
        .arg("--model")
        .arg(&model)
        .args(agent_model_path().map(|p| [PathBuf::from("--agent-model"), p]).into_iter().flatten())
        .output()
        .expect("python runs");
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai client test failed:\n{log}");
}

/// A tiny random-weight Qwen3-VL with the real Qwen3 tokenizer (its vocabulary and vision
/// tokens), written by `pio synth` into `dir`.
fn synth_vision_model(dir: &std::path::Path) -> PathBuf {
    let mut c: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("testdata/synthetic/qwen3_vl/config.json")).expect("fixture config"),
    )
    .expect("json");
    c["text_config"]["vocab_size"] = 151936.into();
    for (k, v) in [("image_token_id", 151655), ("video_token_id", 151656), ("vision_start_token_id", 151652)] {
        c[k] = v.into();
    }
    c["vision_end_token_id"] = 151653.into();
    std::fs::create_dir_all(dir).expect("dir");
    let config = dir.join("config.json");
    std::fs::write(&config, c.to_string()).expect("config");
    let model = dir.join("model");
    let tokenizer = root().join("crates/pio-model/tests/data/qwen3-tokenizer");
    let o = Command::new(env!("CARGO_BIN_EXE_pio"))
        .args(["synth", "--dtype", "f32", "--config"])
        .arg(&config)
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--out")
        .arg(&model)
        .output()
        .expect("pio synth");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    model
}

#[test]
fn chat_with_image_parts() {
    use base64::Engine as _;
    let dir = std::env::temp_dir().join(format!("pio-server-vision-{}", std::process::id()));
    let model = synth_vision_model(&dir);
    let media = dir.join("media");
    std::fs::create_dir_all(&media).expect("media dir");
    let png = root().join("testdata/synthetic/qwen3_vl/image.png");
    std::fs::copy(&png, media.join("image.png")).expect("copy image");
    let server = Server::start(&model, &["--allowed-local-media-path", media.to_str().expect("path")]);
    let data = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&png).expect("image"));
    let chat = |url: &str, stream: bool| {
        json!({
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in the picture?"},
            ]}],
            "max_tokens": 6, "temperature": 0, "stream": stream, "ignore_eos": true,
        })
    };
    let data_url = format!("data:image/png;base64,{data}");
    let (status, v) = server.post("/v1/chat/completions", &chat(&data_url, false));
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    // 64 x 96 pixels, scaled up to the processor's minimum: hundreds of image tokens.
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(prompt_tokens > 60, "prompt tokens {prompt_tokens}");
    assert_eq!(v["usage"]["completion_tokens"], 6);

    // The same image from the allowed directory, and streamed: the same answer.
    let file_url = format!("file://{}", media.join("image.png").display());
    let (status, v) = server.post("/v1/chat/completions", &chat(&file_url, false));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
    let (status, raw) =
        server.request("POST", "/v1/chat/completions", &[], chat(&data_url, true).to_string().as_bytes());
    assert_eq!(status, 200);
    let streamed: String = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text);
    assert!(raw.contains("data: [DONE]"));
    // The same image again: the prefix cache serves its blocks.
    let before = server.metric("pio_prefix_cache_hit_tokens_total");
    let (status, _) = server.post("/v1/chat/completions", &chat(&data_url, false));
    assert_eq!(status, 200);
    assert!(server.metric("pio_prefix_cache_hit_tokens_total") > before, "the same image reuses its blocks");

    for (url, what) in [
        ("https://example.com/cat.png".to_string(), "data: URL"),
        ("data:image/png;base64,@@@@".to_string(), "base64"),
        (
            format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(b"not an image")),
            "image",
        ),
        (format!("file://{}", png.display()), "allowed media directory"),
        ("ftp://x/y.png".to_string(), "scheme"),
    ] {
        let (status, v) = server.post("/v1/chat/completions", &chat(&url, false));
        assert_error(status, &v, 400, "invalid_request_error", what);
    }
    drop(server);
    // An image taking more tokens than the server allows.
    let small = Server::start(&model, &["--max-image-tokens", "16"]);
    let (status, v) = small.post("/v1/chat/completions", &chat(&data_url, false));
    assert_error(status, &v, 400, "invalid_request_error", "--max-image-tokens 16");
    drop(small);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Structured outputs: `response_format` with a JSON schema gives JSON that validates, whole
/// and streamed, at temperature 0 and 1; `guided_choice` one of its strings; a schema or regex
/// that does not compile is a 400 naming the field.
#[test]
fn structured_outputs_follow_their_schema() {
    let Some(model) = model_path() else { return };
    let srv = Server::start(&model, &[]);
    let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "age", "tags"], "additionalProperties": false});
    let valid = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
        let o = v.as_object().unwrap_or_else(|| panic!("not an object: {text}"));
        assert!(o.len() == 3 && o["name"].is_string() && o["age"].is_i64(), "{text}");
        assert!(o["tags"].as_array().is_some_and(|t| t.len() <= 3 && t.iter().all(Value::is_string)), "{text}");
    };
    for temperature in [0.0, 1.0] {
        let req = json!({"messages": [{"role": "user", "content": "Describe a fictional person."}],
            "temperature": temperature, "seed": 3, "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}});
        let (s, v) = srv.post("/v1/chat/completions", &req);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        valid(v["choices"][0]["message"]["content"].as_str().expect("content"));
        let mut sreq = req.clone();
        sreq["stream"] = json!(true);
        let (s, text) = srv.request("POST", "/v1/chat/completions", &[], sreq.to_string().as_bytes());
        assert_eq!(s, 200);
        let streamed: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .collect();
        valid(&streamed);
    }
    let req = json!({"messages": [{"role": "user", "content": "Pick a color."}], "temperature": 1, "max_tokens": 10,
        "guided_choice": ["red", "green", "blue"]});
    let (s, v) = srv.post("/v1/chat/completions", &req);
    assert_eq!(s, 200, "{v}");
    let c = v["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(["red", "green", "blue"].contains(&c), "{c:?}");
    for (field, bad) in [
        ("guided_regex", json!("(unclosed")),
        ("response_format", json!({"type": "json_schema"})),
        ("guided_choice", json!([])),
    ] {
        let mut req = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        req[field] = bad;
        let (s, v) = srv.post("/v1/chat/completions", &req);
        assert_eq!(s, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
}

/// Sends SIGTERM to the server.
fn terminate(srv: &Server) {
    let ok = Command::new("kill").args(["-TERM", &srv.child.id().to_string()]).status().expect("kill runs");
    assert!(ok.success());
}

/// Reads a streamed answer to its end: its `data:` payloads.
fn read_events(mut s: TcpStream) -> Vec<String> {
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp).lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

fn streaming_completion(srv: &Server, max_tokens: usize) -> TcpStream {
    let body = json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": true, "ignore_eos": true,
        "temperature": 0})
    .to_string();
    let mut s = srv.connect();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    // The first bytes: the request is running.
    let mut first = [0u8; 1];
    s.read_exact(&mut first).expect("a first byte");
    s
}

/// SIGTERM: running requests finish (all their tokens) while new requests and /health get
/// 503, then the server exits 0; past `--shutdown-timeout` what still runs gets a final error
/// event and the server exits 0 all the same.
#[test]
fn shutdown_drains_running_requests_then_aborts_them_at_the_timeout() {
    let Some(model) = model_path() else { return };
    let mut srv = Server::start(&model, &["--shutdown-timeout", "60"]);
    let s = streaming_completion(&srv, 300);
    terminate(&srv);
    srv.wait_log(&["shutting down: draining"]);
    let (status, text) = srv.request("GET", "/health", &[], b"");
    assert_eq!(status, 503, "{text}");
    let (status, v) = srv.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("shutting down")), "{v}");
    let events = read_events(s);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let tokens = events.iter().filter(|e| e.contains("\"text\"")).count();
    assert_eq!(tokens, 300, "every token of the running request");
    let status = srv.child.wait().expect("exits");
    assert!(status.success(), "{status:?}");
    srv.wait_log(&["every request finished"]);

    let mut srv = Server::start(&model, &["--shutdown-timeout", "0.5", "--max-model-len", "8192"]);
    let s = streaming_completion(&srv, 8000);
    let start = std::time::Instant::now();
    terminate(&srv);
    let events = read_events(s);
    assert!(start.elapsed() < Duration::from_secs(20), "aborted at the timeout");
    let n = events.len();
    assert!(n >= 2 && events[n - 1] == "[DONE]", "{:?}", &events[n.saturating_sub(3)..]);
    assert!(events[n - 2].contains("\"error\"") && events[n - 2].contains("shutting down"), "{}", events[n - 2]);
    assert!(srv.child.wait().expect("exits").success());
    srv.wait_log(&["shutdown timeout: aborting"]);
}

/// Connections past `--max-connections` get 503; a client that dribbles its headers is cut
/// off at `--header-read-timeout`, one that does not send its body gets 408 at
/// `--body-read-timeout`; normal clients are served throughout.
#[test]
fn connection_cap_and_slow_clients() {
    let Some(model) = model_path() else { return };
    let srv =
        Server::start(&model, &["--max-connections", "3", "--header-read-timeout", "1", "--body-read-timeout", "1"]);
    let mut slow_headers = srv.connect();
    slow_headers.write_all(b"GET /health HTTP/1.1\r\nHo").expect("send");
    let mut slow_body = srv.connect();
    slow_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro")
        .expect("send");
    std::thread::sleep(Duration::from_millis(200));
    // Two of three taken: a normal request is served, on the third.
    let (status, _) = srv.request("GET", "/health", &[], b"");
    assert_eq!(status, 200);
    // The cap reached (a held connection, once the last one's slot is back), one more is
    // refused.
    std::thread::sleep(Duration::from_millis(300));
    let mut held = srv.connect();
    std::thread::sleep(Duration::from_millis(200));
    held.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    assert!(held.read(&mut [0u8; 16]).is_err(), "the held connection is open and silent");
    let (status, text) = srv.request("GET", "/health", &[], b"");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("too many open connections"), "{text}");
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = slow_headers.read_to_end(&mut buf);
    assert!(buf.is_empty() && start.elapsed() < Duration::from_secs(5), "{buf:?}");
    let mut buf = Vec::new();
    let _ = slow_body.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 1 s"), "{text}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let (status, v) = srv.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(status, 200, "{v}");
}
