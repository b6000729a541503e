//! Constrained ("guided") decoding: a request's output held to a JSON schema, any JSON object,
//! a regular expression, one of a list of strings or a Lark grammar, as vLLM's structured
//! outputs and llama.cpp's grammars do.
//!
//! The grammar is compiled by `llguidance` (the engine llama.cpp and vLLM use) against the
//! tokenizer's token bytes; each step the request's [`Guide`] gives the tokens the grammar
//! allows next (a mask computed on the CPU beside the forward's results), the sampler draws
//! among them only, and the sampled token advances the grammar. Masks are per sequence, so a
//! guided request batched with others changes nothing for them; with speculation each verified
//! position is masked in turn, so only tokens the grammar allows are committed.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use pio_model::tokenizer::Tokenizer;

use crate::{EngineError, Result};

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Guide {
    /// A JSON document valid under this JSON schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object.
    JsonObject,
    /// The whole output matches this regular expression.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect, as llama.cpp's `--grammar` takes GBNF).
    Lark(String),
}

impl Guide {
    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Guide::JsonSchema(s) => TopLevelGrammar::from_json_schema(s.clone()),
            Guide::JsonObject => TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"})),
            Guide::Regex(r) => TopLevelGrammar::from_regex(r),
            Guide::Choice(c) => {
                if c.is_empty() {
                    return Err(EngineError::Invalid("guided choice needs at least one string".into()));
                }
                let alts: Vec<String> = c.iter().map(|s| regex_escape(s)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alts.join("|")))
            }
            Guide::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// `s` as a regular expression matching it literally.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Compiles guides against one tokenizer (built once per engine: it walks the vocabulary).
pub struct GuideFactory {
    factory: ParserFactory,
    vocab: usize,
}

impl GuideFactory {
    /// For `tokenizer`, whose model has `vocab_size` logits (ids past the tokenizer's are never
    /// allowed), with `eos` the token that ends a finished output.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos: u32) -> Result<GuideFactory> {
        let json = tokenizer
            .inner()
            .to_string(false)
            .map_err(|e| EngineError::Invalid(format!("guided decoding: reading the tokenizer: {e}")))?;
        let json: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| EngineError::Invalid(format!("guided decoding: reading the tokenizer: {e}")))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| EngineError::Invalid(format!("guided decoding: this tokenizer is not supported: {e}")))?;
        words.resize(vocab_size.max(words.len()), Vec::new());
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| EngineError::Invalid(format!("guided decoding: {e}")))?;
        factory.quiet();
        Ok(GuideFactory { factory, vocab: vocab_size })
    }

    /// A fresh matcher for `guide`; errors name what does not compile.
    pub fn matcher(&self, guide: &Guide) -> Result<GuideState> {
        let parser = self
            .factory
            .create_parser(guide.grammar()?)
            .map_err(|e| EngineError::Invalid(format!("the guide does not compile: {e}")))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(EngineError::Invalid(format!("the guide does not compile: {e}")));
        }
        Ok(GuideState { matcher: m, vocab: self.vocab })
    }
}

/// A [`GuideFactory`] made at first use, shared by its clones (an engine and its handle: the
/// handle checks a request's grammar before queueing it, the engine runs it; the vocabulary is
/// walked once).
#[derive(Clone, Default)]
pub struct Guides(Arc<std::sync::OnceLock<std::result::Result<GuideFactory, String>>>);

impl Guides {
    /// A matcher for `guide` over `tokenizer` (the model's, with `vocab_size` logits).
    pub fn matcher(&self, tokenizer: Option<&Tokenizer>, vocab_size: usize, guide: &Guide) -> Result<GuideState> {
        let factory = self.0.get_or_init(|| {
            let tok = tokenizer.ok_or("guided decoding needs the model's tokenizer")?;
            let eos = tok.eos_token_ids().first().copied().unwrap_or(0);
            GuideFactory::new(tok, vocab_size, eos).map_err(|e| e.to_string())
        });
        factory.as_ref().map_err(|e| EngineError::Invalid(e.clone()))?.matcher(guide)
    }
}

/// One request's place in its grammar.
pub struct GuideState {
    matcher: Matcher,
    vocab: usize,
}

impl GuideState {
    /// Sets the logits of every token the grammar does not allow next to -inf; when the
    /// grammar is complete, the tokens `is_stop` says end the request are allowed. False when
    /// the grammar allows nothing more (the output is complete).
    pub fn mask(&mut self, logits: &mut [f32], is_stop: impl Fn(u32) -> bool) -> Result<bool> {
        if self.matcher.is_stopped() {
            return Ok(false);
        }
        let mask = self.matcher.compute_mask().map_err(|e| EngineError::Invalid(format!("guided decoding: {e}")))?;
        let done = self.matcher.is_accepting().unwrap_or(false);
        let n = logits.len().min(self.vocab);
        for (t, v) in logits.iter_mut().enumerate().take(n) {
            let allowed = mask.is_allowed(t as u32) || (done && is_stop(t as u32));
            if !allowed {
                *v = f32::NEG_INFINITY;
            }
        }
        Ok(true)
    }

    /// Advances the grammar by the sampled token (end tokens are not fed).
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| EngineError::Invalid(format!("guided decoding: {e}")))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}
