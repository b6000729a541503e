//! Generating one sequence: prompt in one forward, then a token per step, streamed as text.

use std::time::{Duration, Instant};

use pio_model::tokenizer::Tokenizer;

use crate::runner::{Logits, Runner, Sequence};
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopStrings;
use crate::{EngineError, Result};

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
}

/// Why generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
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
}

/// Generates from `prompt` with `runner` (whose cache must hold prompt + max_tokens, else the
/// run ends with `Length` when the cache is full). `on_text` receives each new piece of text as
/// soon as it is final (never part of a stop string or of an incomplete UTF-8 character).
pub fn generate(
    runner: &mut Runner<'_>,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    if prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if !params.stop.is_empty() && tokenizer.is_none() {
        return Err(EngineError::Invalid("stop strings need a tokenizer".into()));
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let stops = StopStrings::new(params.stop.clone());
    let mut seq = Sequence::new(prompt.to_vec());
    let mut stream = TextStream::default();
    let start = Instant::now();
    let mut prefill_time = Duration::ZERO;
    let mut finish_reason = FinishReason::Length;
    let mut generated: Vec<u32> = Vec::new();
    let result = (|| -> Result<()> {
        while generated.len() < params.max_tokens {
            let logits = match runner.step(&mut [&mut seq], Logits::Last) {
                Ok(mut l) => l.pop().unwrap_or_default(),
                // The cache is the context: when it is full, generation ends by length.
                Err(EngineError::OutOfCache { .. }) if !generated.is_empty() => break,
                Err(e) => return Err(e),
            };
            if generated.is_empty() {
                prefill_time = start.elapsed();
            }
            let token = sampler.sample(&logits, prompt, &generated);
            if !params.ignore_eos && params.stop_token_ids.contains(&token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            generated.push(token);
            seq.token_ids.push(token);
            if let Some(tok) = tokenizer {
                if stream.push(tok, &generated, &stops, on_text)? {
                    finish_reason = FinishReason::Stop;
                    break;
                }
            }
        }
        Ok(())
    })();
    runner.release(&mut seq);
    result?;
    if let Some(tok) = tokenizer {
        stream.flush(tok, &generated, &stops, on_text)?;
    }
    let total = start.elapsed();
    Ok(GenerateOutput {
        num_decode_steps: generated.len().saturating_sub(1),
        token_ids: generated,
        text: stream.text,
        finish_reason,
        prefill_time,
        decode_time: total.saturating_sub(prefill_time),
    })
}

/// Incremental detokenization with stop strings.
#[derive(Debug, Default)]
struct TextStream {
    /// Final text so far (emitted).
    text: String,
    stopped: bool,
}

impl TextStream {
    /// Decodes `ids`, emits what became final; returns true when a stop string was hit.
    fn push(
        &mut self,
        tok: &Tokenizer,
        ids: &[u32],
        stops: &StopStrings,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<bool> {
        let full = tok.decode(ids, false)?;
        if let Some(at) = stops.find(&full) {
            self.emit(&full[..at], on_text);
            self.stopped = true;
            return Ok(true);
        }
        // An incomplete UTF-8 character decodes to U+FFFD until its last byte arrives.
        let mut end = full.len() - stops.holdback(&full);
        if full[..end].ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        self.emit(&full[..end], on_text);
        Ok(false)
    }

    /// Emits whatever was held back at the end of generation.
    fn flush(
        &mut self,
        tok: &Tokenizer,
        ids: &[u32],
        stops: &StopStrings,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        let full = tok.decode(ids, false)?;
        let end = stops.find(&full).unwrap_or(full.len());
        self.emit(&full[..end], on_text);
        Ok(())
    }

    fn emit(&mut self, upto: &str, on_text: &mut dyn FnMut(&str)) {
        // Earlier text is final, so `upto` extends it; anything else means the decoder
        // rewrote the past (never expected) and is not re-emitted.
        if let Some(new) = upto.strip_prefix(self.text.as_str()) {
            if !new.is_empty() {
                on_text(new);
                self.text.push_str(new);
            }
        }
    }
}
