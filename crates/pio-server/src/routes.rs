//! The route handlers.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, BoxStream, StreamExt};
use pio_engine::engine::{FinishReason, RequestOutput, RequestParams, TokenLogprob};
use pio_engine::guided::Guide;
use pio_engine::handle::{Event, RequestStream};
use pio_model::chat_template::ChatRequest;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::params::{self, CommonParams};
use crate::reasoning::{Part, ReasoningStream};
use crate::tool_grammar::{call_grammar, read_tools, Reasoning, ToolChoice};
use crate::tool_parser::{Delta, ToolCall, ToolCallParser, ToolCallStream};
use crate::AppState;

pub async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.engine.is_alive() {
        StatusCode::OK.into_response()
    } else {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, ..ApiError::internal("the engine has stopped") }
            .into_response()
    }
}

pub async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": s.created,
            "owned_by": "pio",
            "max_model_len": s.engine.config().max_model_len,
        }],
    }))
}

pub async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut text = s.engine.render_prometheus();
    text.push_str(&s.engine.metrics().render_vllm(&s.model_name));
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// A request's JSON body (400 when unreadable or malformed, 413 when too large).
fn read_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".to_string()
        } else {
            format!("could not read the request body: {r}")
        };
        ApiError { status, ..ApiError::bad_request(message) }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

/// vLLM's `/tokenize`: `{"prompt": TEXT, "add_special_tokens": true}` or `{"messages": [...],
/// "add_generation_prompt": true, ...}` (the chat template applied) -> `{"count", "max_model_len",
/// "tokens"}` (and `"token_strs"` with `"return_token_strs": true`).
pub async fn tokenize(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    tokenize_body(&s, body).unwrap_or_else(IntoResponse::into_response)
}

fn tokenize_body(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = read_json(body)?;
    let o = params::object(&body)?;
    let tokens = match (o.get("prompt"), o.get("messages")) {
        (Some(Value::String(text)), None) => {
            let special = params::get_bool(o, "add_special_tokens")?.unwrap_or(true);
            s.tokenizer.encode(text, special)?
        }
        (None, Some(_)) => chat_prompt(s, &body)?.0,
        _ => return Err(ApiError::bad_param("prompt", "give either `prompt` (a string) or `messages`")),
    };
    let mut v = json!({"count": tokens.len(), "max_model_len": s.engine.config().max_model_len, "tokens": tokens});
    if params::get_bool(o, "return_token_strs")?.unwrap_or(false) {
        let strs: Vec<Value> =
            tokens.iter().map(|&t| s.tokenizer.id_to_token(t).map_or(Value::Null, Value::String)).collect();
        v["token_strs"] = Value::Array(strs);
    }
    Ok(Json(v).into_response())
}

/// vLLM's `/detokenize`: `{"tokens": [ids]}` -> `{"prompt": TEXT}`.
pub async fn detokenize(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    detokenize_body(&s, body).unwrap_or_else(IntoResponse::into_response)
}

fn detokenize_body(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = read_json(body)?;
    let o = params::object(&body)?;
    let bad = || ApiError::bad_param("tokens", "`tokens` must be an array of token ids in the vocabulary");
    let ids: Vec<u32> = o
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    if ids.iter().any(|&t| s.tokenizer.id_to_token(t).is_none()) {
        return Err(bad());
    }
    Ok(Json(json!({"prompt": s.tokenizer.decode(&ids, false)?})).into_response())
}

/// `{"version": ...}`: this server's.
pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

pub async fn chat_completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    run(&s, body, Kind::Chat).await.unwrap_or_else(|e| logged(e, Kind::Chat))
}

pub async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    run(&s, body, Kind::Completion).await.unwrap_or_else(|e| logged(e, Kind::Completion))
}

/// A failed request's answer, logged with its cause (server errors as errors, the client's as
/// warnings).
fn logged(e: ApiError, kind: Kind) -> Response {
    let endpoint = kind.path();
    if e.status.is_server_error() {
        tracing::error!(endpoint, status = e.status.as_u16(), error = %e.message, "request failed");
    } else {
        tracing::warn!(endpoint, status = e.status.as_u16(), param = e.param.as_deref().unwrap_or(""), error = %e.message, "request refused");
    }
    e.into_response()
}

/// One line per finished request.
fn log_done(meta: &Meta, usage: &Usage, first_token: Option<Instant>, stream: bool) {
    let (prompt, _) = usage.totals();
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    tracing::info!(
        id = %meta.id,
        endpoint = meta.kind.path(),
        status = 200,
        stream,
        prompt_tokens = prompt,
        completion_tokens = usage.completion,
        ttft_ms = first_token.map_or(0.0, |t| ms(t - meta.started)),
        duration_ms = ms(meta.started.elapsed()),
        "request done"
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

/// One choice being produced: which prompt it answers and its stream.
struct Choice {
    index: usize,
    prompt: usize,
    stream: RequestStream,
}

async fn run(s: &Arc<AppState>, body: Result<Bytes, BytesRejection>, kind: Kind) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = read_json(body)?;
    let o = params::object(&body)?;
    match o.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if *m == s.model_name => {}
        Some(Value::String(m)) => {
            return Err(ApiError::not_found(
                format!("the model `{m}` does not exist; this server serves `{}`", s.model_name),
                "model_not_found",
            ))
        }
        Some(_) => return Err(ApiError::bad_param("model", "`model` must be a string")),
    }
    let mut images = Vec::new();
    let mut opens_reasoning = false;
    let (prompts, logprobs) = match kind {
        Kind::Chat => {
            let (ids, urls, opens) = chat_prompt(s, &body)?;
            opens_reasoning = opens;
            images = urls.iter().map(|u| crate::media::load_image(s, u)).collect::<Result<Vec<_>, _>>()?;
            (vec![ids], params::chat_logprobs(o)?)
        }
        Kind::Completion => {
            if params::get_bool(o, "echo")?.unwrap_or(false) {
                return Err(ApiError::bad_param("echo", "`echo` is not supported"));
            }
            (completion_prompts(s, o)?, params::completion_logprobs(o)?)
        }
    };
    refuse_unsupported(o, kind)?;
    let mut common = params::common(o, &s.defaults, logprobs)?;
    if kind == Kind::Chat {
        force_tool_calls(s, o, &mut common, opens_reasoning)?;
    }
    if common.include_usage && !common.stream {
        return Err(ApiError::bad_param("stream_options", "`stream_options` is only allowed with `stream: true`"));
    }
    let max_len = s.engine.config().max_model_len;
    // A streaming window (`attention_window`) runs past the context.
    let bounded = common.params.attention_window.is_none();
    for ids in prompts.iter().filter(|_| bounded) {
        let asked = ids.len().saturating_add(common.params.max_tokens.unwrap_or(1));
        if asked > max_len {
            let what = if kind == Kind::Chat { "messages" } else { "prompt" };
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad_param(
                    what,
                    format!(
                        "this model's maximum context length is {max_len} tokens, but {asked} were requested \
                         ({} in the {what}, {} in the completion)",
                        ids.len(),
                        asked - ids.len()
                    ),
                )
            });
        }
    }
    let mut choices = Vec::new();
    for (p, ids) in prompts.iter().enumerate() {
        for j in 0..common.n {
            let mut rp: RequestParams = common.params.clone();
            rp.images = images.clone();
            rp.sampling.seed = rp.sampling.seed.map(|seed| seed.wrapping_add(j as u64));
            // On an error the streams submitted so far are dropped, which cancels them.
            let stream = s.engine.submit(ids.clone(), rp).map_err(|e| {
                let mut e: ApiError = with_param(e.into(), kind);
                if e.message.starts_with("the guide does not compile") {
                    e.param = common.guide_field.map(str::to_string);
                }
                e
            })?;
            choices.push(Choice { index: choices.len(), prompt: p, stream });
        }
    }
    // Tool calls are parsed out of the answer when the request gives tools and may call them.
    let tools = match (kind, s.tool_parser, o.get("tools").and_then(Value::as_array)) {
        (Kind::Chat, Some(parser), Some(tools))
            if !tools.is_empty() && o.get("tool_choice") != Some(&json!("none")) =>
        {
            Some((parser, Arc::new(tools.clone())))
        }
        _ => None,
    };
    let meta = Meta {
        id: new_id(kind),
        created: unix_time(),
        model: s.model_name.clone(),
        kind,
        num_prompts: prompts.len(),
        tools,
        reasoning: (kind == Kind::Chat && s.reasoning_parser.is_some()).then_some(opens_reasoning),
        started,
    };
    if common.stream {
        Ok(stream_response(s.clone(), meta, choices, &common))
    } else {
        collect_response(s, meta, choices).await
    }
}

/// Fields we do not implement are refused rather than silently ignored.
fn refuse_unsupported(o: &Map<String, Value>, kind: Kind) -> Result<(), ApiError> {
    let set = |k: &str| o.get(k).is_some_and(|v| !v.is_null());
    if kind == Kind::Completion && set("suffix") {
        return Err(ApiError::bad_param("suffix", "`suffix` is not supported"));
    }
    if o.get("best_of").and_then(Value::as_u64).is_some_and(|b| b > 1) {
        return Err(ApiError::bad_param("best_of", "`best_of` above 1 is not supported; use `n`"));
    }
    Ok(())
}

/// Checks `tools` and, for `tool_choice` `"required"` or a named function, holds the answer to
/// calls by a grammar (see [`crate::tool_grammar`]).
fn force_tool_calls(
    s: &AppState,
    o: &Map<String, Value>,
    common: &mut CommonParams,
    opens_reasoning: bool,
) -> Result<(), ApiError> {
    let tools = match o.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(t) => read_tools(t).map_err(|m| ApiError::bad_param("tools", m))?,
    };
    let choice = match o.get("tool_choice") {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(c) => ToolChoice::from_json(c).map_err(|m| ApiError::bad_param("tool_choice", m))?,
    };
    let only = match &choice {
        ToolChoice::None | ToolChoice::Auto => return Ok(()),
        ToolChoice::Required => None,
        ToolChoice::Function(name) => Some(name.as_str()),
    };
    let parser = s.tool_parser.ok_or_else(|| {
        ApiError::bad_param(
            "tool_choice",
            "this model's chat template writes no tool calls, so no call can be required of it \
             (start the server with --tool-call-parser to name the markup)",
        )
    })?;
    if let Some(field) = common.guide_field {
        return Err(ApiError::bad_param(field, format!("`{field}` cannot be combined with a required `tool_choice`")));
    }
    let reasoning = match (s.reasoning_parser.is_some(), opens_reasoning) {
        (false, _) => Reasoning::Off,
        (true, true) => Reasoning::Open,
        (true, false) => Reasoning::Optional,
    };
    let one = only.is_some() || params::get_bool(o, "parallel_tool_calls")? == Some(false);
    let grammar =
        call_grammar(parser, &tools, only, one, reasoning).map_err(|m| ApiError::bad_param("tool_choice", m))?;
    common.params.guide = Some(Guide::Lark(grammar));
    // What does not compile is a tool's parameters schema.
    common.guide_field = Some("tools");
    Ok(())
}

fn with_param(mut e: ApiError, kind: Kind) -> ApiError {
    if e.code == Some("context_length_exceeded") && kind == Kind::Completion {
        e.param = Some("prompt".into());
    }
    e
}

/// The chat template applied to the messages, as token ids, and the URLs of their images.
/// Also whether the prompt leaves the answer inside an open `<think>` block.
fn chat_prompt(s: &AppState, body: &Value) -> Result<(Vec<u32>, Vec<String>, bool), ApiError> {
    let placeholder = s.vision.as_ref().map(|v| v.placeholder.as_str());
    let (req, urls) = ChatRequest::from_openai_json_with_images(body, placeholder)?;
    let template =
        s.tokenizer.chat_template().ok_or_else(|| ApiError::bad_request("this model has no chat template"))?;
    let text = template.render(&req)?;
    Ok((s.tokenizer.encode(&text, false)?, urls, crate::reasoning::prompt_opens_reasoning(&text)))
}

/// `prompt`: a string, an array of strings, an array of token ids or an array of those.
fn completion_prompts(s: &AppState, o: &Map<String, Value>) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = || ApiError::bad_param("prompt", "`prompt` must be a string, an array of strings or of token ids");
    let ids = |v: &[Value]| -> Option<Vec<u32>> {
        v.iter().map(|x| x.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
    };
    let prompts = match o.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::bad_param("prompt", "`prompt` is required")),
        Some(Value::String(t)) => vec![s.tokenizer.encode(t, true)?],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad()),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().map(|t| s.tokenizer.encode(t.as_str().unwrap_or_default(), true)).collect::<Result<_, _>>()?
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![ids(a).ok_or_else(bad)?],
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => {
            a.iter().map(|p| p.as_array().and_then(|p| ids(p))).collect::<Option<Vec<_>>>().ok_or_else(bad)?
        }
        Some(_) => return Err(bad()),
    };
    Ok(prompts)
}

/// The fields every answer and chunk repeats.
#[derive(Debug, Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    num_prompts: usize,
    /// How to find tool calls in the answers, and the request's tools.
    tools: Option<(ToolCallParser, Arc<Vec<Value>>)>,
    /// With a reasoning parser: whether the prompt leaves the answer inside a `<think>` block.
    reasoning: Option<bool>,
    /// When the request arrived.
    started: Instant,
}

impl Meta {
    /// What splits a chat answer into reasoning, content and tool calls (`None`: nothing to
    /// split).
    fn splitter(&self) -> Option<Splitter> {
        if self.tools.is_none() && self.reasoning.is_none() {
            return None;
        }
        Some(Splitter {
            reasoning: self.reasoning.map(ReasoningStream::new),
            tools: self.tools.as_ref().map(|(p, tools)| ToolCallStream::new(*p, tools.to_vec())),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }
}

/// Token counts for `usage`.
#[derive(Debug, Clone, Default)]
struct Usage {
    /// Per prompt: (tokens, cached tokens), from its first output.
    prompts: Vec<Option<(usize, usize)>>,
    completion: usize,
}

impl Usage {
    fn new(num_prompts: usize) -> Usage {
        Usage { prompts: vec![None; num_prompts], completion: 0 }
    }

    fn add(&mut self, prompt: usize, o: &RequestOutput) {
        if let Some(p) = self.prompts.get_mut(prompt) {
            p.get_or_insert((o.num_prompt_tokens, o.num_cached_tokens));
        }
        self.completion += o.token_ids.len();
    }

    /// Prompt tokens and cached prompt tokens.
    fn totals(&self) -> (usize, usize) {
        (self.prompts.iter().flatten().map(|p| p.0).sum(), self.prompts.iter().flatten().map(|p| p.1).sum())
    }

    fn json(&self) -> Value {
        let (prompt, cached) = self.totals();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.completion,
            "total_tokens": prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Abort => "stop",
    }
}

/// Log-probabilities in the endpoint's format, for `text_offset` starting at `offset`.
struct LogprobWriter {
    kind: Kind,
    entries: Vec<Value>,
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

impl LogprobWriter {
    fn new(kind: Kind) -> LogprobWriter {
        LogprobWriter {
            kind,
            entries: Vec::new(),
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top: Vec::new(),
            offsets: Vec::new(),
        }
    }

    fn push(&mut self, s: &AppState, lps: &[TokenLogprob], mut offset: usize) {
        let piece = |t: u32| s.tokenizer.decode(&[t], false).unwrap_or_default();
        for lp in lps {
            let tok = piece(lp.token);
            match self.kind {
                Kind::Chat => {
                    let top: Vec<Value> = lp
                        .top
                        .iter()
                        .map(|&(t, l)| {
                            let p = piece(t);
                            json!({"token": p, "logprob": l, "bytes": p.as_bytes()})
                        })
                        .collect();
                    self.entries.push(
                        json!({"token": tok, "logprob": lp.logprob, "bytes": tok.as_bytes(), "top_logprobs": top}),
                    );
                }
                Kind::Completion => {
                    // As vLLM: the sampled token is always among the alternatives listed.
                    let mut top = Map::new();
                    for &(t, l) in &lp.top {
                        top.insert(piece(t), json!(l));
                    }
                    top.entry(tok.clone()).or_insert(json!(lp.logprob));
                    self.offsets.push(offset);
                    offset += tok.len();
                    self.tokens.push(json!(tok));
                    self.token_logprobs.push(json!(lp.logprob));
                    self.top.push(Value::Object(top));
                }
            }
        }
    }

    fn json(self) -> Value {
        match self.kind {
            Kind::Chat => json!({"content": self.entries}),
            Kind::Completion => json!({
                "tokens": self.tokens,
                "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top,
                "text_offset": self.offsets,
            }),
        }
    }
}

async fn collect_response(s: &Arc<AppState>, meta: Meta, choices: Vec<Choice>) -> Result<Response, ApiError> {
    let mut usage = Usage::new(meta.num_prompts);
    let mut out = Vec::with_capacity(choices.len());
    let mut first_token = None;
    for mut c in choices {
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        let mut lp = LogprobWriter::new(meta.kind);
        let mut any_logprobs = false;
        while let Some(e) = c.stream.recv().await {
            match e {
                Event::Output(o) => {
                    usage.add(c.prompt, &o);
                    if first_token.is_none() && !o.token_ids.is_empty() {
                        first_token = Some(Instant::now());
                    }
                    if !o.logprobs.is_empty() {
                        any_logprobs = true;
                        lp.push(s, &o.logprobs, text.len());
                    }
                    text.push_str(&o.text);
                    if let Some(r) = o.finish_reason {
                        finish = r;
                    }
                }
                Event::Error(e) => return Err(ApiError::internal(e)),
            }
        }
        let logprobs = if any_logprobs { lp.json() } else { Value::Null };
        out.push(match meta.kind {
            Kind::Chat => {
                let (reasoning, text) = match meta.reasoning {
                    Some(inside) => ReasoningStream::split(inside, &text),
                    None => (None, text),
                };
                let mut message = json!({"role": "assistant", "content": text});
                let mut reason = finish_str(finish);
                if let Some((parser, tools)) = &meta.tools {
                    let parsed = parser.parse(&text, tools);
                    message["content"] = json!(parsed.content);
                    if !parsed.calls.is_empty() {
                        message["tool_calls"] = parsed.calls.iter().map(tool_call_json).collect();
                        if finish != FinishReason::Length {
                            reason = "tool_calls";
                        }
                    }
                }
                if let Some(r) = reasoning {
                    message["reasoning_content"] = json!(r);
                }
                json!({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": reason})
            }
            Kind::Completion => json!({
                "index": c.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_str(finish),
            }),
        });
    }
    log_done(&meta, &usage, first_token, false);
    Ok(Json(json!({
        "id": meta.id,
        "object": meta.object(false),
        "created": meta.created,
        "model": meta.model,
        "choices": out,
        "usage": usage.json(),
    }))
    .into_response())
}

fn stream_response(s: Arc<AppState>, meta: Meta, choices: Vec<Choice>, common: &CommonParams) -> Response {
    let include_usage = common.include_usage;
    let usage = Arc::new(Mutex::new(Usage::new(meta.num_prompts)));
    let first_token: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let chunk = {
        let meta = meta.clone();
        move |choices: Value, usage: Option<Value>| -> SseEvent {
            let mut v = json!({
                "id": meta.id,
                "object": meta.object(true),
                "created": meta.created,
                "model": meta.model,
                "choices": choices,
            });
            if include_usage {
                v["usage"] = usage.unwrap_or(Value::Null);
            }
            SseEvent::default().data(v.to_string())
        }
    };
    // Chat streams open each choice with the assistant role.
    let first: Vec<SseEvent> = match meta.kind {
        Kind::Chat => choices
            .iter()
            .map(|c| {
                chunk(
                    json!([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                        "finish_reason": null}]),
                    None,
                )
            })
            .collect(),
        Kind::Completion => Vec::new(),
    };
    let num_choices = choices.len();
    let merged = stream::select_all(choices.into_iter().map(|c| {
        let (index, prompt) = (c.index, c.prompt);
        stream::unfold(c.stream, |mut rs| async move { rs.recv().await.map(|e| (e, rs)) })
            .map(move |e| (index, prompt, e))
            .boxed()
    }));
    let body = {
        let (usage, chunk, s, first) = (usage.clone(), chunk.clone(), s.clone(), first_token.clone());
        let kind = meta.kind;
        // Text streamed so far per choice: completions' `text_offset` counts from its start.
        let mut offsets = vec![0usize; num_choices];
        // Per choice, what splits reasoning and tool calls out of the text.
        let mut splitters: Vec<Option<Splitter>> = (0..num_choices).map(|_| meta.splitter()).collect();
        merged.flat_map(move |(index, prompt, e)| match e {
            Event::Output(o) => {
                if let Ok(mut u) = usage.lock() {
                    u.add(prompt, &o);
                }
                if !o.token_ids.is_empty() {
                    if let Ok(mut f) = first.lock() {
                        f.get_or_insert_with(Instant::now);
                    }
                }
                let offset = offsets.get(index).copied().unwrap_or(0);
                if let Some(off) = offsets.get_mut(index) {
                    *off += o.text.len();
                }
                let logprobs = if o.logprobs.is_empty() {
                    Value::Null
                } else {
                    let mut w = LogprobWriter::new(kind);
                    w.push(&s, &o.logprobs, offset);
                    w.json()
                };
                let finish = o.finish_reason.map(finish_str);
                let events = match (kind, splitters.get_mut(index).and_then(Option::as_mut)) {
                    (Kind::Chat, Some(sp)) => split_chunks(sp, index, &o, logprobs)
                        .into_iter()
                        .map(|choice| chunk(json!([choice]), None))
                        .collect(),
                    (Kind::Chat, None) => {
                        let delta = if o.text.is_empty() { json!({}) } else { json!({"content": o.text}) };
                        let choice =
                            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish});
                        vec![chunk(json!([choice]), None)]
                    }
                    (Kind::Completion, _) => {
                        let choice =
                            json!({"index": index, "text": o.text, "logprobs": logprobs, "finish_reason": finish});
                        vec![chunk(json!([choice]), None)]
                    }
                };
                stream::iter(events)
            }
            Event::Error(e) => stream::iter(vec![SseEvent::default().data(ApiError::internal(e).body().to_string())]),
        })
    };
    let tail = stream::once(async move {
        let mut events = Vec::new();
        if let (Ok(u), Ok(f)) = (usage.lock(), first_token.lock()) {
            log_done(&meta, &u, *f, true);
        }
        if include_usage {
            let u = usage.lock().map(|u| u.json()).unwrap_or(Value::Null);
            events.push(chunk(json!([]), Some(u)));
        }
        events.push(SseEvent::default().data("[DONE]"));
        stream::iter(events)
    })
    .flatten();
    let all: BoxStream<'static, Result<SseEvent, Infallible>> =
        stream::iter(first).chain(body).chain(tail).map(Ok).boxed();
    Sse::new(all).keep_alive(KeepAlive::default()).into_response()
}

/// Splits a chat answer as it streams: reasoning first (with a reasoning parser), then the
/// content's tool calls (with a tool parser).
struct Splitter {
    reasoning: Option<ReasoningStream>,
    tools: Option<ToolCallStream>,
}

impl Splitter {
    /// The deltas `text` completes (`done`: the answer ends with it).
    fn push(&mut self, text: &str, done: bool) -> Vec<Value> {
        let parts = match &mut self.reasoning {
            Some(r) => {
                let mut p = r.push(text);
                if done {
                    p.extend(r.finish());
                }
                p
            }
            None => vec![Part::Content(text.to_string())],
        };
        let mut out = Vec::new();
        let mut calls = Vec::new();
        for p in parts {
            match p {
                Part::Reasoning(r) => out.push(json!({"reasoning_content": r})),
                Part::Content(c) => match &mut self.tools {
                    Some(ts) => calls.extend(ts.push(&c)),
                    None if c.is_empty() => {}
                    None => out.push(json!({"content": c})),
                },
            }
        }
        if let Some(ts) = &mut self.tools {
            if done {
                calls.extend(ts.finish());
            }
            // Calls are numbered from those given before this output.
            let mut next_call = ts.num_calls() - calls.iter().filter(|d| matches!(d, Delta::Call(_))).count();
            for d in calls {
                out.push(match d {
                    Delta::Content(c) => json!({"content": c}),
                    Delta::Call(c) => {
                        let mut call = tool_call_json(&c);
                        call["index"] = json!(next_call);
                        next_call += 1;
                        json!({"tool_calls": [call]})
                    }
                });
            }
        }
        out
    }

    fn num_calls(&self) -> usize {
        self.tools.as_ref().map_or(0, ToolCallStream::num_calls)
    }
}

/// The chunks' choices for one output of a chat answer that is split: a delta per piece of
/// reasoning, of content and per call (calls given whole: name and arguments in one delta), the
/// output's logprobs on the first, its finish reason (`tool_calls` once a call was made) on the
/// last.
fn split_chunks(sp: &mut Splitter, index: usize, o: &RequestOutput, logprobs: Value) -> Vec<Value> {
    let mut choices: Vec<Value> = sp
        .push(&o.text, o.finish_reason.is_some())
        .into_iter()
        .map(|delta| json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": null}))
        .collect();
    if choices.is_empty() && (!logprobs.is_null() || o.finish_reason.is_some()) {
        choices.push(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": null}));
    }
    if let Some(first) = choices.first_mut() {
        first["logprobs"] = logprobs;
    }
    if let (Some(last), Some(r)) = (choices.last_mut(), o.finish_reason) {
        last["finish_reason"] =
            json!(if sp.num_calls() > 0 && r != FinishReason::Length { "tool_calls" } else { finish_str(r) });
    }
    choices
}

/// A call as OpenAI's `tool_calls` entry, with a fresh id.
fn tool_call_json(c: &ToolCall) -> Value {
    json!({"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

fn new_call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("call_{nanos:x}{n:04x}")
}

fn new_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{nanos:x}{n:04x}")
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
