//! What Inference-PIO runs when. Everything that runs a model (the server, `pio generate`,
//! `pio chat`, `pio bench`, `pio perplexity`, the plugins and the tests) goes through one
//! [`engine::Engine`], so there is one allocation path for the KV cache.
//!
//! - [`engine::Engine`] owns the model's paged KV cache ([`pio_model::KvCache`]); each step
//!   the [`scheduler`] picks which tokens of which requests run (continuous batching, chunked
//!   prefill, preemption), `runner` lays them out as ONE flat [`pio_model::ForwardBatch`] for
//!   the model, and the engine samples, detokenizes and applies stop rules. A request may also ask for its
//!   prompt's logits (teacher forcing), or only those (scoring).
//! - [`kv_cache::KvCacheManager`] hands each sequence blocks from one [`block_pool::BlockPool`]
//!   and keeps the prefix cache over them; blocks behind every layer's sliding window return to
//!   the pool as a sequence advances.
//! - [`handle::EngineHandle`] runs an engine on its own thread for many concurrent callers
//!   (the server); [`plugin`] wraps a loaded model and an engine in the uniform model interface.
//! - [`sampler`] turns logits into tokens (pure functions plus a seeded RNG); [`stop`] finds
//!   stop strings in streamed text.
//! - [`generate`] runs one request to completion, streaming its text.
//! - [`perplexity`] scores a token stream chunk by chunk, each chunk a scoring request (PPL,
//!   and KL divergence against a reference run's stored distributions), as llama.cpp's
//!   `llama-perplexity`.
//! - [`metrics`] counts what the engine did, for the server's `/metrics`.
pub mod block_pool;
pub mod draft;
pub mod engine;
pub mod generate;
pub mod guided;
pub mod handle;
pub mod kv_cache;
pub mod metrics;
pub mod mtp;
pub mod perplexity;
pub mod plugin;
mod runner;
pub mod sampler;
pub mod scheduler;
pub mod spec;
pub mod stop;
pub mod vision;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] pio_model::Error),
    #[error(transparent)]
    Sampling(#[from] sampler::SamplingError),
    #[error("the KV cache is full: {needed} more blocks needed, {free} free")]
    OutOfCache { needed: usize, free: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("the prompt has {prompt} tokens, but the context holds {max_model_len} (prompt plus at least one generated token must fit)")]
    PromptTooLong { prompt: usize, max_model_len: usize },
    #[error("too many requests queued ({0}); try again later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
