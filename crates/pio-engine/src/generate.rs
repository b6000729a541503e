//! Generating one sequence through the [`Engine`]: the prompt (chunked as the engine's config
//! says), then a token per step, streamed as text.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pio_model::image::PixelValues;

use crate::engine::{Engine, RequestParams};
use crate::sampler::SamplingParams;
use crate::Result;

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Tokens that end generation (not included in the output).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past `stop_token_ids`.
    pub ignore_eos: bool,
    /// Strings that end generation (the text is cut before them). Needs a tokenizer.
    pub stop: Vec<String>,
    /// A streaming window ([`RequestParams::attention_window`]).
    pub attention_window: Option<usize>,
    /// Its sinks ([`RequestParams::attention_sinks`]).
    pub attention_sinks: Option<usize>,
    /// Images for the prompt's placeholders ([`RequestParams::images`]).
    pub images: Vec<Arc<PixelValues>>,
    /// What the output must match ([`RequestParams::guide`]).
    pub guide: Option<crate::guided::Guide>,
}

pub use crate::engine::FinishReason;

impl From<&GenerateParams> for RequestParams {
    fn from(p: &GenerateParams) -> RequestParams {
        RequestParams {
            sampling: p.sampling.clone(),
            max_tokens: Some(p.max_tokens.max(1)),
            eos_token_ids: p.stop_token_ids.clone(),
            ignore_eos: p.ignore_eos,
            stop: p.stop.clone(),
            attention_window: p.attention_window,
            attention_sinks: p.attention_sinks,
            images: p.images.clone(),
            guide: p.guide.clone(),
            ..Default::default()
        }
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub token_ids: Vec<u32>,
    /// Decoded text (empty without a tokenizer), cut at a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Tokens produced after the first (the ones decode_time covers).
    pub num_decode_steps: usize,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
}

/// Generates from `prompt` on `engine` (beside whatever else it holds; the run ends with
/// `Length` when the context is full). `on_text` receives each new piece of text as soon as it
/// is final (never part of a stop string or of an incomplete UTF-8 character); text needs the
/// engine's tokenizer.
pub fn generate(
    engine: &mut Engine<'_>,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    let request = RequestParams::from(params);
    if params.max_tokens == 0 {
        engine.validate(prompt, &request)?;
        return Ok(GenerateOutput {
            token_ids: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
            num_decode_steps: 0,
            num_cached_tokens: 0,
        });
    }
    run_one(engine, prompt, request, on_text)
}

/// Runs one request on `engine` (alone, or beside whatever else it holds) to completion.
pub fn run_one(
    engine: &mut Engine<'_>,
    prompt: &[u32],
    request: RequestParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    let start = Instant::now();
    let id = engine.add_request(prompt.to_vec(), request)?;
    let mut prefill_time = None;
    let mut token_ids = Vec::new();
    let mut text = String::new();
    let mut finish_reason = None;
    let mut num_cached_tokens = 0;
    while finish_reason.is_none() && engine.has_work() {
        for o in engine.step()?.into_iter().filter(|o| o.id == id) {
            prefill_time.get_or_insert_with(|| start.elapsed());
            token_ids.extend_from_slice(&o.token_ids);
            num_cached_tokens = o.num_cached_tokens;
            if !o.text.is_empty() {
                on_text(&o.text);
                text.push_str(&o.text);
            }
            finish_reason = o.finish_reason;
        }
    }
    let prefill_time = prefill_time.unwrap_or_else(|| start.elapsed());
    Ok(GenerateOutput {
        num_decode_steps: token_ids.len().saturating_sub(1),
        token_ids,
        text,
        finish_reason: finish_reason.unwrap_or(FinishReason::Length),
        prefill_time,
        decode_time: start.elapsed().saturating_sub(prefill_time),
        num_cached_tokens,
    })
}
