//! What Inference-PIO runs when.
//!
//! - [`runner::Runner`] owns the paged KV cache ([`pio_model::KvCache`]) and its
//!   [`block_pool::BlockPool`]; it turns [`runner::Sequence`]s into one flat
//!   [`pio_model::ForwardBatch`] per step and runs the model.
//! - [`sampler`] turns logits into tokens (pure functions plus a seeded RNG).
//! - [`generate`] drives one sequence: the whole prompt in one forward, then one token per
//!   step, streaming text and honouring stop tokens and [`stop`] strings.
//! - [`perplexity`] scores a token stream chunk by chunk (PPL, and KL divergence against a
//!   reference run's stored distributions), as llama.cpp's `llama-perplexity`.
pub mod block_pool;
pub mod engine;
pub mod generate;
pub mod handle;
pub mod kv_cache;
pub mod metrics;
pub mod perplexity;
pub mod plugin;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod stop;

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
