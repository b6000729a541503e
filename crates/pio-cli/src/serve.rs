//! `pio serve`: the OpenAI-compatible server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use pio_engine::engine::EngineConfig;
use pio_engine::handle::EngineHandle;
use pio_server::tool_parser::ToolCallParser;
use pio_server::{AppState, HttpConfig};

use crate::args::ModelArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spec: crate::args::SpecArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one; the address is printed either way).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "PIO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model name clients use (default: the file or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// KV cache memory, allocated and made resident at start, e.g. 2GiB, 512MiB, 1000000
    /// (default: a quarter of the available RAM, at most 2 GiB and at most what max-num-seqs
    /// full contexts need).
    #[arg(long, value_parser = parse_size)]
    pub kv_cache_mem: Option<usize>,
    /// Longest sequence, prompt plus output (default: the model's, at most 32768).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most requests waiting for admission; beyond it requests get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queued_requests: usize,
    /// Most tokens per forward; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Do not reuse the KV of shared prompt prefixes.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Largest request body (default: 4 MiB, 32 MiB for a model that takes images).
    #[arg(long, value_parser = parse_size)]
    pub max_body_bytes: Option<usize>,
    /// Serve `file://` image URLs from under this directory (vision-language models; without
    /// it they are refused). Images are never fetched over http(s).
    #[arg(long, value_name = "DIR")]
    pub allowed_local_media_path: Option<std::path::PathBuf>,
    /// Most tokens one image may take once the image processor has sized it (a token per 32 x
    /// 32 pixels for Qwen3-VL; 4096 is about 2048 x 2048); larger images are refused with 400.
    #[arg(long, default_value_t = 4096)]
    pub max_image_tokens: usize,
    /// How the model writes tool calls, parsed into `tool_calls` for chat requests with
    /// `tools`: hermes (Qwen3, Qwen2.5), qwen3_coder (Qwen3-Coder, Qwen3-Coder-Next), glm47
    /// (GLM-4.5 to 4.7), or none (calls stay text). Default: what the chat template writes.
    #[arg(long, value_name = "NAME")]
    pub tool_call_parser: Option<String>,
    /// Split a thinking model's reasoning (`<think>`...`</think>`) from its answer into
    /// `reasoning_content`: qwen3, deepseek_r1, glm45 or glm47 (the same markup). Default: none.
    #[arg(long, value_name = "NAME", value_parser = parse_reasoning_parser)]
    pub reasoning_parser: Option<pio_server::reasoning::ReasoningParser>,
    /// Log level of the server's log on stderr (a line per request, a stats line every 10 s
    /// while busy, failures with their cause): error, warn, info, debug, trace. `RUST_LOG`
    /// takes precedence.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Let web pages of these origins call the API (CORS), e.g.
    /// `--allowed-origins http://localhost:3000`; `*` allows any. Repeatable; off by default.
    #[arg(long, value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// Most open connections; one more is answered 503 and closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (slow ones are disconnected).
    #[arg(long, default_value_t = 30.0)]
    pub header_read_timeout: f64,
    /// Seconds a client has to send a request's body after its headers (408 after that).
    #[arg(long, default_value_t = 60.0)]
    pub body_read_timeout: f64,
    /// On SIGTERM or Ctrl-C: seconds running requests may go on before they are aborted (new
    /// connections are refused and /health answers 503 meanwhile).
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

fn parse_reasoning_parser(s: &str) -> Result<pio_server::reasoning::ReasoningParser, String> {
    s.parse()
}

/// `1234`, `64KiB`, `512MiB`, `2GiB`, `1.5G` (binary units either way).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 2GiB, 512MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    Ok((num * mult as f64) as usize)
}

/// MemAvailable from /proc/meminfo.
fn available_ram() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<usize>().ok()? * 1024)
}

pub fn cmd_serve(mut a: ServeArgs) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => tracing_subscriber::EnvFilter::try_new(v).context("RUST_LOG")?,
        _ => tracing_subscriber::EnvFilter::try_new(format!("pio_server={}", a.log_level))
            .with_context(|| format!("--log-level {}", a.log_level))?,
    };
    // A second server in the same process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    // `Some(None)`: "none" was asked for.
    let chosen_parser = match a.tool_call_parser.as_deref() {
        None => None,
        Some("none") => Some(None),
        Some(name) => {
            Some(Some(name.parse::<ToolCallParser>().map_err(|e| anyhow::anyhow!("--tool-call-parser: {e}"))?))
        }
    };
    a.model.mtp = a.spec.mtp();
    let (loaded, _) = crate::commands::load_model(&a.model)?;
    let draft: Option<Arc<dyn pio_model::CausalLm>> = a.spec.load_draft(&a.model, &loaded)?.map(Arc::from);
    let dtype = crate::commands::kv_cache_type(&a.model, &loaded)?;
    let tokenizer = Arc::new(loaded.tokenizer()?.clone());
    let model: Arc<dyn pio_model::CausalLm> = Arc::from(loaded.model);
    let max_model_len = a.max_model_len.unwrap_or_else(|| model.shape().max_position_embeddings.min(32768));
    let per_token = model.kv_bytes_per_token(dtype);
    let kv_bytes = match a.kv_cache_mem {
        Some(b) => b,
        None => {
            let want = per_token.saturating_mul(max_model_len).saturating_mul(a.max_num_seqs);
            // Like vLLM's CPU backend (VLLM_CPU_KVCACHE_SPACE, 4 GiB) but smaller: enough for
            // many long requests (18k tokens of Qwen3-0.6B in f16), without claiming a large
            // share of a small machine for a small model.
            let avail = (available_ram().unwrap_or(4 << 30) / 4).min(2 << 30);
            // Under --max-memory: half of what the bound keeps for the KV cache and scratch.
            let avail = a.model.max_memory.map_or(avail, |m| avail.min(pio_model::memory_reserve(m) / 2));
            want.min(avail).max(per_token * 16 * 64)
        }
    };
    let mut cfg = EngineConfig::for_model(model.as_ref(), dtype, kv_bytes, max_model_len)?;
    cfg.max_memory = a.model.max_memory;
    // With recurrent state the budget decides how many sequences fit.
    let state_per_seq = model.cache_spec().state_bytes_per_seq();
    cfg.max_num_seqs = if state_per_seq > 0 { a.max_num_seqs.min(cfg.max_num_seqs) } else { a.max_num_seqs };
    cfg.max_batch_tokens = a.max_batch_tokens;
    // The MTP layer needs every prompt position's hidden state.
    cfg.prefix_caching = !a.no_prefix_caching && !a.spec.mtp();
    cfg.spec = a.spec.config();
    if a.max_num_seqs == 0 || a.max_batch_tokens == 0 {
        bail!("--max-num-seqs and --max-batch-tokens must be at least 1");
    }
    let model_ref = model.clone();
    let engine = EngineHandle::spawn_with_draft(model, Some(tokenizer.clone()), cfg, a.max_queued_requests, draft)?;
    let model_name = a.served_model_name.clone().unwrap_or_else(|| {
        let p = &a.model.model;
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string());
        name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
    });
    if let Some(dir) = &a.allowed_local_media_path {
        if !dir.is_dir() {
            bail!("--allowed-local-media-path {}: not a directory", dir.display());
        }
    }
    let vision = match model_ref.vision() {
        None if a.allowed_local_media_path.is_some() => {
            bail!("--allowed-local-media-path: this model takes no images")
        }
        None => None,
        Some(v) => {
            let ids = pio_engine::vision::missing_placeholders(v.config(), &[], 1);
            Some(pio_server::VisionServing {
                placeholder: tokenizer.decode(&ids, false).context("the vision tokens of the tokenizer")?,
                processor: v.processor().clone(),
                allowed_local_media_path: a.allowed_local_media_path.clone(),
                max_image_tokens: a.max_image_tokens,
            })
        }
    };
    let has_vision = vision.is_some();
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let tool_parser = match chosen_parser {
        Some(p) => p,
        None => tokenizer.chat_template().and_then(|t| ToolCallParser::for_template(t.source())),
    };
    let state_app = Arc::new(AppState {
        engine,
        tokenizer,
        model_name: model_name.clone(),
        defaults: loaded.generation.clone(),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        created,
        vision,
        tool_parser,
        reasoning_parser: a.reasoning_parser,
        lifecycle: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let default_body = if has_vision { 32 << 20 } else { 4 << 20 };
    let http = HttpConfig {
        max_body_bytes: a.max_body_bytes.unwrap_or(default_body),
        allowed_origins: a.allowed_origins.clone(),
        max_connections: a.max_connections,
        header_read_timeout: seconds(a.header_read_timeout, "--header-read-timeout")?,
        body_read_timeout: seconds(a.body_read_timeout, "--body-read-timeout")?,
        shutdown_timeout: seconds(a.shutdown_timeout, "--shutdown-timeout")?,
    };
    let addr = SocketAddr::new(a.host, a.port);
    let kv_mib = cfg.num_blocks * cfg.block_size * per_token / (1 << 20);
    let state = match state_per_seq {
        0 => String::new(),
        b => format!(
            ", {} recurrent-state slots of {:.2} MiB for {} sequences",
            cfg.state_slots(model_ref.as_ref()),
            b as f64 / (1 << 20) as f64,
            cfg.max_num_seqs
        ),
    };
    rt.block_on(pio_server::serve(state_app, http, addr, |bound| {
        eprintln!(
            "serving {model_name} on http://{bound} (context {} tokens, KV cache {} blocks of {} = {kv_mib} MiB {dtype}{state}{}{})",
            cfg.max_model_len,
            cfg.num_blocks,
            cfg.block_size,
            tool_parser.map(|p| format!(", tool calls parsed as {p}")).unwrap_or_default(),
            if a.api_key.is_some() { ", API key required" } else { "" }
        );
    }))
    .with_context(|| format!("serving on {addr}"))?;
    Ok(())
}

/// A non-negative number of seconds.
fn seconds(s: f64, flag: &str) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s).map_err(|_| anyhow::anyhow!("{flag}: {s} is not a number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}
