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
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { max_body_bytes: 4 << 20, allowed_origins: Vec::new() }
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
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let router = Router::new()
        .route("/health", get(routes::health))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such route", "not_found") })
        .layer(DefaultBodyLimit::max(http.max_body_bytes))
        .with_state(state);
    // Outermost: a browser's preflight is answered before the API key is asked for.
    match cors(&http.allowed_origins) {
        Some(c) => router.layer(c),
        None => router,
    }
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
pub async fn serve(
    state: Arc<AppState>,
    http: HttpConfig,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    on_listening(listener.local_addr()?);
    tokio::spawn(log_stats(state.clone(), std::time::Duration::from_secs(10)));
    axum::serve(listener, router(state, http)).with_graceful_shutdown(shutdown_signal()).await
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
