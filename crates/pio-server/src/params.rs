//! Reading the sampling and stopping fields of a completion request.

use pio_engine::engine::RequestParams;
use pio_engine::guided::Guide;
use pio_engine::sampler::SamplingParams;
use pio_model::GenerationDefaults;
use serde_json::{Map, Value};

use crate::error::ApiError;

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

pub fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object().ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))
}

fn present<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

pub fn get_f32(o: &Map<String, Value>, key: &str) -> Result<Option<f32>, ApiError> {
    match present(o, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| ApiError::bad_param(key, format!("`{key}` must be a number"))),
    }
}

pub fn get_i64(o: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match present(o, key) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| ApiError::bad_param(key, format!("`{key}` must be an integer"))),
    }
}

/// A non-negative integer field.
pub fn get_usize(o: &Map<String, Value>, key: &str) -> Result<Option<usize>, ApiError> {
    match get_i64(o, key)? {
        None => Ok(None),
        Some(x) if x >= 0 => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::bad_param(key, format!("`{key}` must be >= 0, got {x}"))),
    }
}

pub fn get_bool(o: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match present(o, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::bad_param(key, format!("`{key}` must be true or false"))),
    }
}

/// `stop`: a string or an array of strings.
fn get_stop(o: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match present(o, "stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| ApiError::bad_param("stop", "`stop` must be a string or an array of strings")),
        Some(_) => Err(ApiError::bad_param("stop", "`stop` must be a string or an array of strings")),
    }
}

fn get_token_ids(o: &Map<String, Value>, key: &str) -> Result<Vec<u32>, ApiError> {
    match present(o, key) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| ApiError::bad_param(key, format!("`{key}` must be an array of token ids"))),
        Some(_) => Err(ApiError::bad_param(key, format!("`{key}` must be an array of token ids"))),
    }
}

/// `logit_bias`: token ids (as strings, OpenAI's form) to biases in [-100, 100].
fn get_logit_bias(o: &Map<String, Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad =
        || ApiError::bad_param("logit_bias", "`logit_bias` must map token ids (as strings) to numbers in [-100, 100]");
    match present(o, "logit_bias") {
        None => Ok(Vec::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let t = k.trim().parse::<u32>().map_err(|_| bad())?;
                let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(bad)?;
                Ok((t, b as f32))
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// Constrained decoding: OpenAI's `response_format` (`json_object`, `json_schema`) or vLLM's
/// `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark), at most one.
fn get_guide(o: &Map<String, Value>) -> Result<Option<(&'static str, Guide)>, ApiError> {
    let mut found: Vec<(&'static str, Guide)> = Vec::new();
    if let Some(rf) = present(o, "response_format") {
        let bad = || {
            ApiError::bad_param(
                "response_format",
                "`response_format` must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \
                 \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
            )
        };
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => found.push(("response_format", Guide::JsonObject)),
            Some("json_schema") => {
                let schema =
                    rf.get("json_schema").and_then(|j| j.get("schema")).filter(|s| s.is_object()).ok_or_else(bad)?;
                found.push(("response_format", Guide::JsonSchema(schema.clone())));
            }
            _ => return Err(bad()),
        }
    }
    if let Some(v) = present(o, "guided_json") {
        let schema = match v {
            Value::String(s) => serde_json::from_str::<Value>(s).ok(),
            v => Some(v.clone()),
        }
        .filter(Value::is_object)
        .ok_or_else(|| ApiError::bad_param("guided_json", "`guided_json` must be a JSON schema (an object)"))?;
        found.push(("guided_json", Guide::JsonSchema(schema)));
    }
    if let Some(v) = present(o, "guided_regex") {
        let r = v.as_str().ok_or_else(|| ApiError::bad_param("guided_regex", "`guided_regex` must be a string"))?;
        found.push(("guided_regex", Guide::Regex(r.to_string())));
    }
    if let Some(v) = present(o, "guided_choice") {
        let bad = || ApiError::bad_param("guided_choice", "`guided_choice` must be a non-empty array of strings");
        let c: Vec<String> = v
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(bad)?
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        found.push(("guided_choice", Guide::Choice(c)));
    }
    if let Some(v) = present(o, "guided_grammar") {
        let g = v.as_str().ok_or_else(|| ApiError::bad_param("guided_grammar", "`guided_grammar` must be a string"))?;
        found.push(("guided_grammar", Guide::Lark(g.to_string())));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(ApiError::bad_param(found[1].0, "give at most one of response_format and the guided_* fields")),
    }
}

/// Reads the sampling, stopping and streaming fields; `logprobs` is what the endpoint read
/// (chat: `logprobs` + `top_logprobs`; completions: the integer `logprobs`).
pub fn common(
    o: &Map<String, Value>,
    defaults: &GenerationDefaults,
    logprobs: Option<usize>,
) -> Result<CommonParams, ApiError> {
    let max_tokens = match get_usize(o, "max_completion_tokens")? {
        Some(m) => Some(m),
        None => get_usize(o, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad_param("max_tokens", "`max_tokens` must be at least 1"));
    }
    let top_k = match get_i64(o, "top_k")? {
        None => defaults.top_k.unwrap_or(0),
        Some(k) if k <= 0 => 0, // -1 and 0 both mean off, as in vLLM
        Some(k) => k as usize,
    };
    let sampling = SamplingParams {
        temperature: get_f32(o, "temperature")?.or(defaults.temperature).unwrap_or(1.0),
        top_k,
        top_p: get_f32(o, "top_p")?.or(defaults.top_p).unwrap_or(1.0),
        min_p: get_f32(o, "min_p")?.or(defaults.min_p).unwrap_or(0.0),
        repetition_penalty: get_f32(o, "repetition_penalty")?.or(defaults.repetition_penalty).unwrap_or(1.0),
        presence_penalty: get_f32(o, "presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: get_f32(o, "frequency_penalty")?.unwrap_or(0.0),
        seed: get_i64(o, "seed")?.map(|s| s as u64),
    };
    sampling.validate().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let n = get_usize(o, "n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad_param("n", format!("`n` must be in 1..={MAX_N}, got {n}")));
    }
    let stream = get_bool(o, "stream")?.unwrap_or(false);
    let include_usage = match present(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => get_bool(so, "include_usage")?.unwrap_or(false),
        Some(_) => return Err(ApiError::bad_param("stream_options", "`stream_options` must be an object")),
    };
    let guide = get_guide(o)?;
    let params = RequestParams {
        sampling,
        max_tokens,
        min_tokens: get_usize(o, "min_tokens")?.unwrap_or(0),
        eos_token_ids: defaults.eos_token_ids.clone(),
        stop_token_ids: get_token_ids(o, "stop_token_ids")?,
        ignore_eos: get_bool(o, "ignore_eos")?.unwrap_or(false),
        stop: get_stop(o)?,
        logit_bias: get_logit_bias(o)?,
        guide: guide.clone().map(|(_, g)| g),
        logprobs,
        prompt_logits: None,
        attention_window: get_usize(o, "attention_window")?,
        attention_sinks: get_usize(o, "attention_sinks")?,
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
pub fn chat_logprobs(o: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    let on = get_bool(o, "logprobs")?.unwrap_or(false);
    let top = get_usize(o, "top_logprobs")?;
    match (on, top) {
        (_, Some(t)) if t > MAX_TOP_LOGPROBS => {
            Err(ApiError::bad_param("top_logprobs", format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}")))
        }
        (false, Some(t)) if t > 0 => Err(ApiError::bad_param("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
        (false, _) => Ok(None),
        (true, t) => Ok(Some(t.unwrap_or(0))),
    }
}

/// Completions' integer `logprobs` (0..=20).
pub fn completion_logprobs(o: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    match get_usize(o, "logprobs")? {
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
        common(object(&v)?, &GenerationDefaults::default(), None)
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
        ] {
            let e = parse(body.clone()).err().unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}");
        }
        let o = json!({"logprobs": false, "top_logprobs": 2});
        assert!(chat_logprobs(object(&o).unwrap_or_else(|e| panic!("{e:?}"))).is_err());
        let o = json!({"logprobs": true, "top_logprobs": 2});
        assert_eq!(chat_logprobs(object(&o).unwrap_or_else(|e| panic!("{e:?}"))).ok(), Some(Some(2)));
    }
}
