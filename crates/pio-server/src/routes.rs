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
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::params::{self, CommonParams};
use crate::reasoning::{Part, ReasoningStream};
use crate::tool_grammar::{call_grammar, read_tools, Reasoning, ToolChoice, ToolSpec};
use crate::tool_parser::{Delta, ToolCall, ToolCallParser, ToolCallStream};
use crate::wire::{
    self, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionRequest, ChatDelta, ChatLogprob, ChatLogprobs,
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
    FunctionCall, ModelCard, ModelList, Prompt, PromptTokensDetails, SamplingFields, TokenizeRequest, TokenizeResponse,
    ToolCallOut, ToolKind, TopLogprob, Usage, Version,
};
use crate::{AppState, Phase};

/// What a request still running when the shutdown timeout ends gets.
const ABORTED: &str = "the server is shutting down: the request was aborted";

pub async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.lifecycle.phase() != Phase::Serving {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, ..ApiError::internal("the server is shutting down") }
            .into_response()
    } else if s.engine.is_alive() {
        StatusCode::OK.into_response()
    } else {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, ..ApiError::internal("the engine has stopped") }
            .into_response()
    }
}

pub async fn models(State(s): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: s.model_name.clone(),
            object: "model",
            created: s.created,
            owned_by: "pio",
            max_model_len: s.engine.config().max_model_len,
        }],
    })
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
    let req: TokenizeRequest = wire::parse(&body)?;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(text), None) => s.tokenizer.encode(text, req.add_special_tokens.unwrap_or(true))?,
        (None, Some(_)) => chat_prompt(s, &body)?.0,
        _ => return Err(ApiError::bad_param("prompt", "give either `prompt` (a string) or `messages`")),
    };
    let token_strs =
        req.return_token_strs.unwrap_or(false).then(|| tokens.iter().map(|&t| s.tokenizer.id_to_token(t)).collect());
    let max_model_len = s.engine.config().max_model_len;
    Ok(Json(TokenizeResponse { count: tokens.len(), max_model_len, tokens, token_strs }).into_response())
}

/// vLLM's `/detokenize`: `{"tokens": [ids]}` -> `{"prompt": TEXT}`.
pub async fn detokenize(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    detokenize_body(&s, body).unwrap_or_else(IntoResponse::into_response)
}

fn detokenize_body(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: DetokenizeRequest = wire::parse(&read_json(body)?)?;
    if let Some(t) = req.tokens.iter().find(|&&t| s.tokenizer.id_to_token(t).is_none()) {
        return Err(ApiError::bad_param("tokens", format!("`tokens`: {t} is not in the vocabulary")));
    }
    Ok(Json(DetokenizeResponse { prompt: s.tokenizer.decode(&req.tokens, false)? }).into_response())
}

/// `{"version": ...}`: this server's.
pub async fn version() -> Json<Version> {
    Json(Version { version: env!("CARGO_PKG_VERSION") })
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
fn log_done(meta: &Meta, usage: &Counts, first_token: Option<Instant>, stream: bool) {
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
    // Counted as running (a shutdown waits for it) until its answer is written.
    let running = s.lifecycle.enter();
    let body = read_json(body)?;
    let mut images = Vec::new();
    let mut tools = None;
    let mut opens_reasoning = false;
    let (prompts, common) = match kind {
        Kind::Chat => {
            let req = ChatCompletionRequest::from_json(&body)?;
            check_model(s, &req.sampling)?;
            let (ids, urls, opens) = chat_prompt(s, &body)?;
            opens_reasoning = opens;
            images = urls.iter().map(|u| crate::media::load_image(s, u)).collect::<Result<Vec<_>, _>>()?;
            let logprobs = params::chat_logprobs(req.logprobs, req.top_logprobs)?;
            let mut common = params::common(&req.sampling, &s.defaults, logprobs)?;
            tools = chat_tools(s, &req, &mut common, opens)?;
            (vec![ids], common)
        }
        Kind::Completion => {
            let req = CompletionRequest::from_json(&body)?;
            check_model(s, &req.sampling)?;
            if req.echo == Some(true) {
                return Err(ApiError::bad_param("echo", "`echo` is not supported"));
            }
            if req.suffix.is_some() {
                return Err(ApiError::bad_param("suffix", "`suffix` is not supported"));
            }
            let prompts = completion_prompts(s, req.prompt.as_ref())?;
            let logprobs = params::completion_logprobs(req.logprobs)?;
            (prompts, params::common(&req.sampling, &s.defaults, logprobs)?)
        }
    };
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
        Ok(stream_response(s.clone(), meta, choices, &common, running))
    } else {
        collect_response(s, meta, choices).await
    }
}

/// How to find tool calls in the answers, and the request's tools.
type CallParsing = (ToolCallParser, Arc<Vec<ToolSpec>>);

/// A request for another model than the one served is a 404.
fn check_model(s: &AppState, f: &SamplingFields) -> Result<(), ApiError> {
    match &f.model {
        Some(m) if *m != s.model_name => Err(ApiError::not_found(
            format!("the model `{m}` does not exist; this server serves `{}`", s.model_name),
            "model_not_found",
        )),
        _ => Ok(()),
    }
}

/// Checks `tools` and says how to find calls in the answer (`None`: tool calls are not parsed:
/// no tools, no parser, or `tool_choice` `"none"`); for `tool_choice` `"required"` or a named
/// function, holds the answer to calls by a grammar (see [`crate::tool_grammar`]).
fn chat_tools(
    s: &AppState,
    req: &ChatCompletionRequest,
    common: &mut CommonParams,
    opens_reasoning: bool,
) -> Result<Option<CallParsing>, ApiError> {
    let tools = read_tools(req.tools.as_deref().unwrap_or_default()).map_err(|m| ApiError::bad_param("tools", m))?;
    let only = match req.tool_choice.as_ref().unwrap_or(&ToolChoice::Auto) {
        ToolChoice::None => return Ok(None),
        ToolChoice::Auto => return Ok(s.tool_parser.filter(|_| !tools.is_empty()).map(|p| (p, Arc::new(tools)))),
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
    let one = only.is_some() || req.parallel_tool_calls == Some(false);
    let grammar =
        call_grammar(parser, &tools, only, one, reasoning).map_err(|m| ApiError::bad_param("tool_choice", m))?;
    common.params.guide = Some(Guide::Lark(grammar));
    // What does not compile is a tool's parameters schema.
    common.guide_field = Some("tools");
    Ok(Some((parser, Arc::new(tools))))
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
    let template =
        s.tokenizer.chat_template().ok_or_else(|| ApiError::bad_request("this model has no chat template"))?;
    let (req, urls) = ChatRequest::from_openai_json_with_images(body, placeholder, template.walks_content_parts())?;
    let text = template.render(&req)?;
    Ok((s.tokenizer.encode(&text, false)?, urls, crate::reasoning::prompt_opens_reasoning(&text)))
}

/// `prompt`: a string, an array of strings, an array of token ids or an array of those.
fn completion_prompts(s: &AppState, prompt: Option<&Prompt>) -> Result<Vec<Vec<u32>>, ApiError> {
    let empty = || ApiError::bad_param("prompt", "`prompt` must not be empty");
    Ok(match prompt {
        None => return Err(ApiError::bad_param("prompt", "`prompt` is required")),
        Some(Prompt::Text(t)) => vec![s.tokenizer.encode(t, true)?],
        Some(Prompt::Texts(ts)) if ts.is_empty() => return Err(empty()),
        Some(Prompt::Texts(ts)) => ts.iter().map(|t| s.tokenizer.encode(t, true)).collect::<Result<_, _>>()?,
        Some(Prompt::Ids(ids)) => vec![ids.clone()],
        Some(Prompt::Batch(b)) if b.is_empty() => return Err(empty()),
        Some(Prompt::Batch(b)) => b.clone(),
    })
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
    tools: Option<CallParsing>,
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

    /// A whole answer (`chunk`: false) or a stream chunk.
    fn completion<C>(&self, choices: Vec<C>, usage: Option<Option<Usage>>, chunk: bool) -> Completion<C> {
        Completion {
            id: self.id.clone(),
            object: self.object(chunk),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn answer<C>(&self, choices: Vec<C>, usage: Option<Option<Usage>>) -> Completion<C> {
        self.completion(choices, usage, false)
    }

    /// A stream chunk as an event.
    fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<Option<Usage>>) -> SseEvent {
        SseEvent::default().data(serde_json::to_string(&self.completion(choices, usage, true)).unwrap_or_default())
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
struct Counts {
    /// Per prompt: (tokens, cached tokens), from its first output.
    prompts: Vec<Option<(usize, usize)>>,
    completion: usize,
}

impl Counts {
    fn new(num_prompts: usize) -> Counts {
        Counts { prompts: vec![None; num_prompts], completion: 0 }
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

    fn usage(&self) -> Usage {
        let (prompt, cached) = self.totals();
        Usage {
            prompt_tokens: prompt,
            completion_tokens: self.completion,
            total_tokens: prompt + self.completion,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: cached },
        }
    }
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Abort => "stop",
    }
}

/// Log-probabilities in the endpoint's format.
enum LogprobWriter {
    Chat(ChatLogprobs),
    Completion(CompletionLogprobs),
}

impl LogprobWriter {
    fn new(kind: Kind) -> LogprobWriter {
        match kind {
            Kind::Chat => LogprobWriter::Chat(ChatLogprobs::default()),
            Kind::Completion => LogprobWriter::Completion(CompletionLogprobs::default()),
        }
    }

    /// Adds `lps`, the first at `offset` bytes into the choice's text (completions'
    /// `text_offset`).
    fn push(&mut self, s: &AppState, lps: &[TokenLogprob], mut offset: usize) {
        let piece = |t: u32| s.tokenizer.decode(&[t], false).unwrap_or_default();
        for lp in lps {
            let token = piece(lp.token);
            match self {
                LogprobWriter::Chat(c) => {
                    let top_logprobs = lp
                        .top
                        .iter()
                        .map(|&(t, logprob)| {
                            let token = piece(t);
                            TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob }
                        })
                        .collect();
                    c.content.push(ChatLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob: lp.logprob,
                        top_logprobs,
                    });
                }
                LogprobWriter::Completion(c) => {
                    // As vLLM: the sampled token is always among the alternatives listed.
                    let mut top = Map::new();
                    for &(t, l) in &lp.top {
                        top.insert(piece(t), json!(l));
                    }
                    top.entry(token.clone()).or_insert(json!(lp.logprob));
                    c.text_offset.push(offset);
                    offset += token.len();
                    c.tokens.push(token);
                    c.token_logprobs.push(lp.logprob);
                    c.top_logprobs.push(top);
                }
            }
        }
    }

    fn chat(self) -> Option<ChatLogprobs> {
        match self {
            LogprobWriter::Chat(c) => Some(c),
            LogprobWriter::Completion(_) => None,
        }
    }

    fn completion(self) -> Option<CompletionLogprobs> {
        match self {
            LogprobWriter::Completion(c) => Some(c),
            LogprobWriter::Chat(_) => None,
        }
    }
}

/// One choice's whole answer.
struct Answer {
    index: usize,
    text: String,
    finish: FinishReason,
    logprobs: Option<LogprobWriter>,
}

async fn collect_response(s: &Arc<AppState>, meta: Meta, choices: Vec<Choice>) -> Result<Response, ApiError> {
    let mut counts = Counts::new(meta.num_prompts);
    let mut answers = Vec::with_capacity(choices.len());
    let mut first_token = None;
    let mut abort = s.lifecycle.abort_watch();
    for mut c in choices {
        let mut a = Answer { index: c.index, text: String::new(), finish: FinishReason::Length, logprobs: None };
        loop {
            let e = tokio::select! {
                e = c.stream.recv() => e,
                _ = abort.aborting() => {
                    return Err(ApiError { status: StatusCode::SERVICE_UNAVAILABLE, ..ApiError::internal(ABORTED) });
                }
            };
            let Some(e) = e else { break };
            match e {
                Event::Output(o) => {
                    counts.add(c.prompt, &o);
                    if first_token.is_none() && !o.token_ids.is_empty() {
                        first_token = Some(Instant::now());
                    }
                    if !o.logprobs.is_empty() {
                        a.logprobs.get_or_insert_with(|| LogprobWriter::new(meta.kind)).push(
                            s,
                            &o.logprobs,
                            a.text.len(),
                        );
                    }
                    a.text.push_str(&o.text);
                    if let Some(r) = o.finish_reason {
                        a.finish = r;
                    }
                }
                Event::Error(e) => return Err(ApiError::internal(e)),
            }
        }
        answers.push(a);
    }
    log_done(&meta, &counts, first_token, false);
    let usage = Some(Some(counts.usage()));
    Ok(match meta.kind {
        Kind::Chat => {
            Json(meta.answer(answers.into_iter().map(|a| chat_choice(&meta, a)).collect(), usage)).into_response()
        }
        Kind::Completion => {
            let choices = answers
                .into_iter()
                .map(|a| CompletionChoice {
                    index: a.index,
                    text: a.text,
                    logprobs: a.logprobs.and_then(LogprobWriter::completion),
                    finish_reason: Some(finish_str(a.finish)),
                })
                .collect();
            Json(meta.answer(choices, usage)).into_response()
        }
    })
}

/// A whole chat answer split into reasoning, content and tool calls.
fn chat_choice(meta: &Meta, a: Answer) -> ChatChoice {
    let (reasoning_content, text) = match meta.reasoning {
        Some(inside) => ReasoningStream::split(inside, &a.text),
        None => (None, a.text),
    };
    let mut finish_reason = finish_str(a.finish);
    let mut message =
        AssistantMessage { role: "assistant", content: Some(text), reasoning_content, tool_calls: Vec::new() };
    if let Some((parser, tools)) = &meta.tools {
        let parsed = parser.parse(message.content.as_deref().unwrap_or_default(), tools);
        message.content = parsed.content;
        if !parsed.calls.is_empty() {
            message.tool_calls = parsed.calls.iter().map(|c| tool_call_out(c, None)).collect();
            if a.finish != FinishReason::Length {
                finish_reason = "tool_calls";
            }
        }
    }
    ChatChoice { index: a.index, message, logprobs: a.logprobs.and_then(LogprobWriter::chat), finish_reason }
}

fn stream_response(
    s: Arc<AppState>,
    meta: Meta,
    choices: Vec<Choice>,
    common: &CommonParams,
    running: crate::Running,
) -> Response {
    let include_usage = common.include_usage;
    let counts = Arc::new(Mutex::new(Counts::new(meta.num_prompts)));
    let first_token: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    // Every chunk carries `usage` with `include_usage` (null but on the last).
    let no_usage = include_usage.then_some(None);
    // Chat streams open each choice with the assistant role.
    let first: Vec<SseEvent> = match meta.kind {
        Kind::Chat => choices
            .iter()
            .map(|c| {
                let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..ChatDelta::default() };
                meta.chunk(
                    vec![ChatChunkChoice { index: c.index, delta, logprobs: None, finish_reason: None }],
                    no_usage,
                )
            })
            .collect(),
        Kind::Completion => Vec::new(),
    };
    let num_choices = choices.len();
    let merged = stream::select_all(choices.into_iter().map(|c| {
        let (index, prompt) = (c.index, c.prompt);
        // Past the shutdown timeout: one error event, and the request is dropped (cancelled).
        stream::unfold(Some((c.stream, s.lifecycle.abort_watch())), |state| async move {
            let (mut rs, mut abort) = state?;
            tokio::select! {
                e = rs.recv() => e.map(|e| (e, Some((rs, abort)))),
                _ = abort.aborting() => Some((Event::Error(ABORTED.to_string()), None)),
            }
        })
        .map(move |e| (index, prompt, e))
        .boxed()
    }));
    let body = {
        let (counts, s, first, meta) = (counts.clone(), s.clone(), first_token.clone(), meta.clone());
        // Text streamed so far per choice: completions' `text_offset` counts from its start.
        let mut offsets = vec![0usize; num_choices];
        // Per choice, what splits reasoning and tool calls out of the text.
        let mut splitters: Vec<Option<Splitter>> = (0..num_choices).map(|_| meta.splitter()).collect();
        merged.flat_map(move |(index, prompt, e)| match e {
            Event::Output(o) => {
                if let Ok(mut u) = counts.lock() {
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
                let logprobs = (!o.logprobs.is_empty()).then(|| {
                    let mut w = LogprobWriter::new(meta.kind);
                    w.push(&s, &o.logprobs, offset);
                    w
                });
                let finish_reason = o.finish_reason.map(finish_str);
                let events = match (meta.kind, splitters.get_mut(index).and_then(Option::as_mut)) {
                    (Kind::Chat, Some(sp)) => split_chunks(sp, index, &o, logprobs.and_then(LogprobWriter::chat))
                        .into_iter()
                        .map(|choice| meta.chunk(vec![choice], no_usage))
                        .collect(),
                    (Kind::Chat, None) => {
                        let content = (!o.text.is_empty()).then(|| o.text.clone());
                        let choice = ChatChunkChoice {
                            index,
                            delta: ChatDelta { content, ..ChatDelta::default() },
                            logprobs: logprobs.and_then(LogprobWriter::chat),
                            finish_reason,
                        };
                        vec![meta.chunk(vec![choice], no_usage)]
                    }
                    (Kind::Completion, _) => {
                        let choice = CompletionChoice {
                            index,
                            text: o.text.clone(),
                            logprobs: logprobs.and_then(LogprobWriter::completion),
                            finish_reason,
                        };
                        vec![meta.chunk(vec![choice], no_usage)]
                    }
                };
                stream::iter(events)
            }
            Event::Error(e) => stream::iter(vec![SseEvent::default().data(ApiError::internal(e).body().to_string())]),
        })
    };
    let tail = stream::once(async move {
        // The request stops counting as running once its last events are out (or its client
        // has gone, which drops this).
        let _running = running;
        let mut events = Vec::new();
        if let (Ok(u), Ok(f)) = (counts.lock(), first_token.lock()) {
            log_done(&meta, &u, *f, true);
        }
        if include_usage {
            let usage = counts.lock().ok().map(|u| u.usage());
            events.push(meta.chunk(Vec::<ChatChunkChoice>::new(), Some(usage)));
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
    fn push(&mut self, text: &str, done: bool) -> Vec<ChatDelta> {
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
        let content = |c: String| ChatDelta { content: Some(c), ..ChatDelta::default() };
        let mut out = Vec::new();
        let mut calls = Vec::new();
        for p in parts {
            match p {
                Part::Reasoning(r) => out.push(ChatDelta { reasoning_content: Some(r), ..ChatDelta::default() }),
                Part::Content(c) => match &mut self.tools {
                    Some(ts) => calls.extend(ts.push(&c)),
                    None if c.is_empty() => {}
                    None => out.push(content(c)),
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
                    Delta::Content(c) => content(c),
                    Delta::Call(c) => {
                        let call = tool_call_out(&c, Some(next_call));
                        next_call += 1;
                        ChatDelta { tool_calls: Some(vec![call]), ..ChatDelta::default() }
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
fn split_chunks(
    sp: &mut Splitter,
    index: usize,
    o: &RequestOutput,
    logprobs: Option<ChatLogprobs>,
) -> Vec<ChatChunkChoice> {
    let mut choices: Vec<ChatChunkChoice> = sp
        .push(&o.text, o.finish_reason.is_some())
        .into_iter()
        .map(|delta| ChatChunkChoice { index, delta, logprobs: None, finish_reason: None })
        .collect();
    if choices.is_empty() && (logprobs.is_some() || o.finish_reason.is_some()) {
        choices.push(ChatChunkChoice { index, delta: ChatDelta::default(), logprobs: None, finish_reason: None });
    }
    if let Some(first) = choices.first_mut() {
        first.logprobs = logprobs;
    }
    if let (Some(last), Some(r)) = (choices.last_mut(), o.finish_reason) {
        last.finish_reason =
            Some(if sp.num_calls() > 0 && r != FinishReason::Length { "tool_calls" } else { finish_str(r) });
    }
    choices
}

/// A call as OpenAI's `tool_calls` entry, with a fresh id (`index`: its place in a stream).
fn tool_call_out(c: &ToolCall, index: Option<usize>) -> ToolCallOut {
    ToolCallOut {
        index,
        id: new_call_id(),
        kind: ToolKind::Function,
        function: FunctionCall { name: c.name.clone(), arguments: c.arguments.clone() },
    }
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
