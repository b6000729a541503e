//! Checking the sampling and stopping fields of a completion request (typed in
//! [`crate::wire`]) and turning them into the engine's parameters.

use pio_engine::engine::RequestParams;
use pio_engine::guided::Guide;
use pio_engine::sampler::SamplingParams;
use pio_model::GenerationDefaults;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::wire::{OneOrMany, ResponseFormat, SamplingFields};

/// The fields both endpoints share.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonParams {
    pub params: RequestParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// The field the constraint came from (named when it does not compile).
    pub guide_field: Option<&'static str>,
}

/// Most choices per request.
pub const MAX_N: usize = 16;
/// Most alternatives per token in logprobs.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings per request, and the longest one in bytes (each is checked against the
/// text after every token).
pub const MAX_STOP_STRINGS: usize = 64;
pub const MAX_STOP_BYTES: usize = 4096;
/// Most entries of `stop_token_ids`, of `logit_bias` and of `guided_choice`.
pub const MAX_TOKEN_LIST: usize = 1024;

/// `logit_bias`: token ids (as strings, OpenAI's form) to biases in [-100, 100].
fn logit_bias(m: Option<&Map<String, Value>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad =
        || ApiError::bad_param("logit_bias", "`logit_bias` must map token ids (as strings) to numbers in [-100, 100]");
    let Some(m) = m else { return Ok(Vec::new()) };
    m.iter()
        .map(|(k, v)| {
            let t = k.trim().parse::<u32>().map_err(|_| bad())?;
            let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(bad)?;
            Ok((t, b as f32))
        })
        .collect()
}

/// Constrained decoding: OpenAI's `response_format` (`json_object`, `json_schema`) or vLLM's
/// `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark), at most one.
fn guide(f: &SamplingFields) -> Result<Option<(&'static str, Guide)>, ApiError> {
    let mut found: Vec<(&'static str, Guide)> = Vec::new();
    match &f.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => found.push(("response_format", Guide::JsonObject)),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema.schema.clone().ok_or_else(|| {
                ApiError::bad_param("response_format", "`response_format.json_schema.schema` is required")
            })?;
            found.push(("response_format", Guide::JsonSchema(Value::Object(schema))));
        }
    }
    if let Some(v) = &f.guided_json {
        let schema = match v {
            Value::String(s) => serde_json::from_str::<Value>(s).ok(),
            v => Some(v.clone()),
        }
        .filter(Value::is_object)
        .ok_or_else(|| ApiError::bad_param("guided_json", "`guided_json` must be a JSON schema (an object)"))?;
        found.push(("guided_json", Guide::JsonSchema(schema)));
    }
    if let Some(r) = &f.guided_regex {
        found.push(("guided_regex", Guide::Regex(r.clone())));
    }
    if let Some(c) = &f.guided_choice {
        if c.is_empty() {
            return Err(ApiError::bad_param("guided_choice", "`guided_choice` must be a non-empty array of strings"));
        }
        found.push(("guided_choice", Guide::Choice(c.clone())));
    }
    if let Some(g) = &f.guided_grammar {
        found.push(("guided_grammar", Guide::Lark(g.clone())));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(ApiError::bad_param(found[1].0, "give at most one of response_format and the guided_* fields")),
    }
}

/// Checks the sampling, stopping and streaming fields and turns them into the engine's request
/// parameters; `logprobs` is what the endpoint read (chat: `logprobs` + `top_logprobs`;
/// completions: the integer `logprobs`).
pub fn common(
    f: &SamplingFields,
    defaults: &GenerationDefaults,
    logprobs: Option<usize>,
) -> Result<CommonParams, ApiError> {
    let max_tokens = f.max_completion_tokens.or(f.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::bad_param("max_tokens", "`max_tokens` must be at least 1"));
    }
    let top_k = match f.top_k {
        None => defaults.top_k.unwrap_or(0),
        Some(k) if k <= 0 => 0, // -1 and 0 both mean off, as in vLLM
        Some(k) => k as usize,
    };
    let sampling = SamplingParams {
        temperature: f.temperature.or(defaults.temperature).unwrap_or(1.0),
        top_k,
        top_p: f.top_p.or(defaults.top_p).unwrap_or(1.0),
        min_p: f.min_p.or(defaults.min_p).unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.or(defaults.repetition_penalty).unwrap_or(1.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        seed: f.seed.map(|s| s as u64),
    };
    sampling.validate().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let n = f.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad_param("n", format!("`n` must be in 1..={MAX_N}, got {n}")));
    }
    if f.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::bad_param("best_of", "`best_of` above 1 is not supported; use `n`"));
    }
    let stream = f.stream.unwrap_or(false);
    let include_usage = f.stream_options.as_ref().and_then(|so| so.include_usage).unwrap_or(false);
    if include_usage && !stream {
        return Err(ApiError::bad_param("stream_options", "`stream_options` is only allowed with `stream: true`"));
    }
    let stop = match &f.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::bad_param("stop", format!("at most {MAX_STOP_STRINGS} stop strings are accepted")));
    }
    if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_param("stop", format!("a stop string may be at most {MAX_STOP_BYTES} bytes long")));
    }
    for (field, n) in [
        ("stop_token_ids", f.stop_token_ids.as_ref().map_or(0, Vec::len)),
        ("logit_bias", f.logit_bias.as_ref().map_or(0, Map::len)),
        ("guided_choice", f.guided_choice.as_ref().map_or(0, Vec::len)),
    ] {
        if n > MAX_TOKEN_LIST {
            return Err(ApiError::bad_param(field, format!("`{field}` may have at most {MAX_TOKEN_LIST} entries")));
        }
    }
    let guide = guide(f)?;
    let params = RequestParams {
        sampling,
        max_tokens,
        min_tokens: f.min_tokens.unwrap_or(0),
        eos_token_ids: defaults.eos_token_ids.clone(),
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        stop,
        logit_bias: logit_bias(f.logit_bias.as_ref())?,
        guide: guide.clone().map(|(_, g)| g),
        logprobs,
        prompt_logits: None,
        attention_window: f.attention_window,
        attention_sinks: f.attention_sinks,
        images: Vec::new(),
    };
    if let (Some(max), min) = (params.max_tokens, params.min_tokens) {
        if min > max {
            return Err(ApiError::bad_param(
                "min_tokens",
                format!("`min_tokens` ({min}) exceeds `max_tokens` ({max})"),
            ));
        }
    }
    Ok(CommonParams { params, n, stream, include_usage, guide_field: guide.map(|(f, _)| f) })
}

/// Chat's `logprobs` (bool) and `top_logprobs` (0..=20).
pub fn chat_logprobs(on: Option<bool>, top: Option<usize>) -> Result<Option<usize>, ApiError> {
    match (on.unwrap_or(false), top) {
        (_, Some(t)) if t > MAX_TOP_LOGPROBS => {
            Err(ApiError::bad_param("top_logprobs", format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}")))
        }
        (false, Some(t)) if t > 0 => Err(ApiError::bad_param("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
        (false, _) => Ok(None),
        (true, t) => Ok(Some(t.unwrap_or(0))),
    }
}

/// Completions' integer `logprobs` (0..=20).
pub fn completion_logprobs(logprobs: Option<usize>) -> Result<Option<usize>, ApiError> {
    match logprobs {
        Some(t) if t > MAX_TOP_LOGPROBS => {
            Err(ApiError::bad_param("logprobs", format!("`logprobs` must be at most {MAX_TOP_LOGPROBS}")))
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<CommonParams, ApiError> {
        common(&crate::wire::parse::<SamplingFields>(&v)?, &GenerationDefaults::default(), None)
    }

    #[test]
    fn reads_fields_and_defaults() {
        let p = parse(json!({"max_tokens": 5, "temperature": 0, "stop": "x", "top_k": -1, "seed": 3, "n": 2,
            "stream": true, "stream_options": {"include_usage": true}, "stop_token_ids": [7], "ignore_eos": true,
            "min_tokens": 2}))
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(p.params.max_tokens, Some(5));
        assert_eq!(p.params.sampling.temperature, 0.0);
        assert_eq!(p.params.sampling.top_k, 0);
        assert_eq!(p.params.stop, vec!["x".to_string()]);
        assert_eq!((p.n, p.stream, p.include_usage), (2, true, true));
        assert_eq!(p.params.stop_token_ids, vec![7]);
        assert!(p.params.ignore_eos);
        let d = parse(json!({})).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((d.params.sampling.temperature, d.params.sampling.top_p, d.n), (1.0, 1.0, 1));
        let m = parse(json!({"max_tokens": 5, "max_completion_tokens": 9})).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(m.params.max_tokens, Some(9));
        let b = parse(json!({"logit_bias": {"15": -100, "7": 2.5}})).unwrap_or_else(|e| panic!("{e:?}"));
        let mut bias = b.params.logit_bias.clone();
        bias.sort_by_key(|x| x.0);
        assert_eq!(bias, vec![(7, 2.5), (15, -100.0)]);
        for bad in [json!({"logit_bias": {"x": 1}}), json!({"logit_bias": {"3": 101}}), json!({"logit_bias": [1]})] {
            assert!(parse(bad).is_err());
        }
    }

    #[test]
    fn refuses_bad_values_naming_the_field() {
        for (body, param) in [
            (json!({"temperature": -1}), None),
            (json!({"temperature": "hot"}), Some("temperature")),
            (json!({"top_p": 0}), None),
            (json!({"max_tokens": 0}), Some("max_tokens")),
            (json!({"max_tokens": -3}), Some("max_tokens")),
            (json!({"n": 0}), Some("n")),
            (json!({"stop": [1]}), Some("stop")),
            (json!({"presence_penalty": 3}), None),
            (json!({"stream": "yes"}), Some("stream")),
            (json!({"min_tokens": 9, "max_tokens": 2}), Some("min_tokens")),
            (json!({"stop": vec!["x"; MAX_STOP_STRINGS + 1]}), Some("stop")),
            (json!({"stop": "y".repeat(MAX_STOP_BYTES + 1)}), Some("stop")),
            (json!({"stop_token_ids": vec![1; MAX_TOKEN_LIST + 1]}), Some("stop_token_ids")),
            (json!({"guided_choice": vec!["a"; MAX_TOKEN_LIST + 1]}), Some("guided_choice")),
        ] {
            let e = parse(body.clone()).err().unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}");
        }
        assert!(chat_logprobs(Some(false), Some(2)).is_err());
        assert!(chat_logprobs(Some(true), Some(21)).is_err());
        assert_eq!(chat_logprobs(Some(true), Some(2)).ok(), Some(Some(2)));
    }
}
