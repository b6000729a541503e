//! The OpenAI-compatible HTTP API over an [`EngineHandle`].
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streaming as server-sent events
//! ending with `data: [DONE]`, or one JSON answer), `GET /v1/models`, `POST /tokenize` and
//! `POST /detokenize` (vLLM's shapes), `GET /version`, `GET /health`,
//! `GET /metrics` (Prometheus text). Chat requests with `tools` get the model's tool calls back
//! as `tool_calls` ([`tool_parser`]); with a reasoning parser, a thinking model's reasoning comes
//! back as `reasoning_content` ([`reasoning`]). With an API key every route but `/health` wants
//! `Authorization: Bearer <key>`. Errors use OpenAI's error JSON. A client that goes away
//! mid-request drops its [`pio_engine::handle::RequestStream`]s, which cancels them and frees
//! their KV blocks at the engine's next step.

pub mod error;
mod media;
pub mod params;
pub mod reasoning;
mod routes;
pub mod tool_grammar;
pub mod tool_parser;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use pio_engine::handle::EngineHandle;
use pio_model::tokenizer::Tokenizer;
use pio_model::GenerationDefaults;

use crate::error::ApiError;

/// What the server needs besides the engine.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// The name clients pass as `model`.
    pub model_name: String,
    pub defaults: GenerationDefaults,
    pub api_key: Option<String>,
    /// Unix time the server started (`created` of `/v1/models`).
    pub created: u64,
    /// Images in chat messages, for a model that takes them (`None`: text only).
    pub vision: Option<VisionServing>,
    /// How the model writes tool calls: a chat request with `tools` gets its calls back as
    /// `tool_calls` (`None`: as text).
    pub tool_parser: Option<tool_parser::ToolCallParser>,
    /// How the model marks its reasoning: chat answers then carry it as `reasoning_content`
    /// (`None`: it stays in the content).
    pub reasoning_parser: Option<reasoning::ReasoningParser>,
    /// Where the server is in its life: serving, draining or aborting what still runs.
    pub lifecycle: Lifecycle,
}

/// A server's phase, shared by the connection loop and the handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Asked to stop: no new connections, `/health` answers 503, running requests finish.
    Draining,
    /// The drain timed out: running requests end now (a final error event, or a 503).
    Aborting,
}

/// The server's [`Phase`], watched by every running request, and how many completion
/// requests are running (until their answer is written or their client goes away).
#[derive(Clone)]
pub struct Lifecycle {
    phase: Arc<tokio::sync::watch::Sender<Phase>>,
    running: Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            phase: Arc::new(tokio::sync::watch::Sender::new(Phase::Serving)),
            running: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }
}

impl Lifecycle {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn set(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// A watch for [`Phase::Aborting`], kept by a request for its whole life (one subscription,
    /// not one per event).
    pub fn abort_watch(&self) -> AbortWatch {
        AbortWatch(self.phase.subscribe())
    }

    /// Counts a request as running until the guard is dropped.
    pub fn enter(&self) -> Running {
        self.running.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Running(self.running.clone())
    }

    /// Requests running now.
    pub fn running(&self) -> usize {
        self.running.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// See [`Lifecycle::abort_watch`].
pub struct AbortWatch(tokio::sync::watch::Receiver<Phase>);

impl AbortWatch {
    /// Resolves once running requests must end ([`Phase::Aborting`]).
    pub async fn aborting(&mut self) {
        let _ = self.0.wait_for(|p| *p == Phase::Aborting).await;
    }
}

/// A running request, counted by [`Lifecycle::running`] while it lives.
pub struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How chat requests' image parts reach a vision-language model.
pub struct VisionServing {
    /// What an image part becomes in the text the chat template renders.
    pub placeholder: String,
    /// How images become the vision tower's patches.
    pub processor: pio_model::image::ImageProcessorConfig,
    /// `file://` image URLs are read only from under this directory (as vLLM's
    /// `--allowed-local-media-path`); `None` refuses them.
    pub allowed_local_media_path: Option<std::path::PathBuf>,
    /// Most tokens one image may take once processed (its vision-tower time grows with their
    /// square); larger images are refused.
    pub max_image_tokens: usize,
}

/// Limits of the HTTP layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Browser origins allowed to call the API (CORS; `*`: any); none: no CORS headers, so
    /// browsers keep pages of other origins out.
    pub allowed_origins: Vec<String>,
    /// Most open connections; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (a connection that dribbles them is
    /// closed: slowloris).
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in (408 after it).
    pub body_read_timeout: Duration,
    /// On SIGTERM or Ctrl-C, how long running requests may go on before they are aborted.
    pub shutdown_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 4 << 20,
            allowed_origins: Vec::new(),
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// The CORS layer `origins` ask for (`None`: none given).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
    )
}

/// All routes over `state`.
pub fn router(state: Arc<AppState>, http: HttpConfig) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/version", get(routes::version))
        .route("/metrics", get(routes::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), refuse_when_draining))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let router = Router::new()
        .route("/health", get(routes::health))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such route", "not_found") })
        .layer(middleware::from_fn_with_state((http.body_read_timeout, http.max_body_bytes), read_body_within))
        .layer(DefaultBodyLimit::max(http.max_body_bytes))
        .with_state(state);
    // Outermost: a browser's preflight is answered before the API key is asked for.
    match cors(&http.allowed_origins) {
        Some(c) => router.layer(c),
        None => router,
    }
}

/// Reads the whole request body within the time allowed (408 after it, 413 past the size
/// limit), so a client that sends its body slowly cannot hold a handler.
async fn read_body_within(State((timeout, limit)): State<(Duration, usize)>, req: Request, next: Next) -> Response {
    use axum::http::StatusCode;
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let status = if too_large { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::BAD_REQUEST };
            let message = if too_large {
                "the request body is too large".to_string()
            } else {
                format!("could not read the request body: {e}")
            };
            ApiError { status, ..ApiError::bad_request(message) }.into_response()
        }
        Err(_) => ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            ..ApiError::bad_request(format!("the request body did not arrive within {} s", timeout.as_secs_f64()))
        }
        .into_response(),
    }
}

/// Once the server is shutting down, new requests get 503 (running ones go on).
async fn refuse_when_draining(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.lifecycle.phase() != Phase::Serving && req.uri().path() != "/metrics" {
        return ApiError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::internal("the server is shutting down")
        }
        .into_response();
    }
    next.run(req).await
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given =
            req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Serves until Ctrl-C (or SIGTERM). `on_listening` gets the bound address (port 0 picks one).
///
/// Connections beyond [`HttpConfig::max_connections`] are answered 503 and closed; a client
/// has [`HttpConfig::header_read_timeout`] to send its headers. On the signal the server stops
/// accepting, `/health` answers 503, idle connections close and running requests finish for up
/// to [`HttpConfig::shutdown_timeout`]; then they are aborted (a final error event, or a 503)
/// and it returns.
pub async fn serve(
    state: Arc<AppState>,
    http: HttpConfig,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    on_listening(listener.local_addr()?);
    tokio::spawn(log_stats(state.clone(), Duration::from_secs(10)));
    let service = hyper_util::service::TowerToHyperService::new(router(state.clone(), http.clone()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let max = http.max_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let permits = Arc::new(tokio::sync::Semaphore::new(max));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(http.header_read_timeout);
    let accept = |accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>| {
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                return false;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service.clone()));
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(refuse_connection(stream, max));
            }
        }
        true
    };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if !accept(accepted) {
                    // Out of descriptors, say: wait a little rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ = &mut signal => break,
        }
    }
    // Draining: connections are still accepted, but new requests and /health get 503 while
    // the running ones finish.
    state.lifecycle.set(Phase::Draining);
    let lifecycle = state.lifecycle.clone();
    let busy = move || lifecycle.running();
    tracing::info!(running = busy(), timeout_s = http.shutdown_timeout.as_secs_f64(), "shutting down: draining");
    let drained = async {
        while busy() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::pin!(drained);
    let deadline = tokio::time::sleep(http.shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if !accept(accepted) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ = &mut drained => {
                tracing::info!("every request finished");
                break;
            }
            _ = &mut deadline => {
                tracing::warn!(running = busy(), "shutdown timeout: aborting the requests still running");
                state.lifecycle.set(Phase::Aborting);
                break;
            }
        }
    }
    drop(listener);
    // The last events written, idle connections closed.
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after 5 s; closing them");
    }
    Ok(())
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse_connection(mut stream: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let e = ApiError {
        status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
        ..ApiError::internal(format!("too many open connections (at most {max}); try again later"))
    };
    let body = e.body().to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Every `every` while there is work: one line of the engine's state and throughput since the
/// last (vLLM's periodic stats).
async fn log_stats(state: Arc<AppState>, every: std::time::Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = state.engine.metrics().clone();
    let read =
        || (m.prompt_tokens.load(Relaxed), m.generation_tokens.load(Relaxed), m.prefix_cache_hit_tokens.load(Relaxed));
    let mut last = read();
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    loop {
        interval.tick().await;
        let now = read();
        let (running, waiting) = (m.requests_running.load(Relaxed), m.requests_waiting.load(Relaxed));
        if now == last && running == 0 && waiting == 0 {
            continue;
        }
        let secs = every.as_secs_f64();
        let (prompt, generated, hits) = (now.0 - last.0, now.1 - last.1, now.2 - last.2);
        let kv = 100.0 * m.kv_blocks_used.load(Relaxed) as f64 / m.kv_blocks_total.load(Relaxed).max(1) as f64;
        let one = |x: f64| (x * 10.0).round() / 10.0;
        tracing::info!(
            running,
            waiting,
            kv_cache_usage_pct = one(kv),
            prefix_cache_hit_rate_pct = one(100.0 * hits as f64 / prompt.max(1) as f64),
            prompt_tokens_per_s = one(prompt as f64 / secs),
            generation_tokens_per_s = one(generated as f64 / secs),
            "engine"
        );
        last = now;
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
