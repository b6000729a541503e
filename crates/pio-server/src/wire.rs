//! The wire format: OpenAI's chat completion and completion requests, responses and streaming
//! chunks (with vLLM's extensions), and vLLM's `/tokenize` and `/detokenize`, as typed structs.
//!
//! Requests are read with [`parse`]: a field of the wrong type is a 400 naming the field (the
//! path inside it is in the message, kept by `serde_path_to_error`); fields we do not know are
//! ignored, as OpenAI's and vLLM's servers do. What types cannot say (ranges, combinations) is
//! checked by [`crate::params`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::tool_grammar::ToolChoice;

/// Reads a request of type `T` from its JSON body.
pub fn parse<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A missing field is reported at the object holding it.
        let missing = inner.strip_prefix("missing field `").and_then(|r| r.split('`').next()).map(str::to_string);
        let field = match path.split(['.', '[']).next() {
            Some(f) if !f.is_empty() && f != "?" => Some(f.to_string()),
            _ => missing.clone(),
        };
        // Rust's names of the number types, in the API's words.
        let mut inner = inner;
        for (rust, api) in [
            ("expected f32", "expected a number"),
            ("expected f64", "expected a number"),
            ("expected usize", "expected a non-negative integer"),
            ("expected u32", "expected a non-negative integer"),
            ("expected u64", "expected a non-negative integer"),
            ("expected i64", "expected an integer"),
        ] {
            inner = inner.replace(rust, api);
        }
        let message = match (path.as_str(), &missing) {
            (".", Some(m)) => format!("`{m}` is required"),
            (".", None) => inner,
            (p, _) => format!("`{p}`: {inner}"),
        };
        ApiError { param: field, ..ApiError::bad_request(message) }
    })
}

/// The sampling, stopping and output fields both completion endpoints take.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    /// Chat's newer name for `max_tokens` (wins when both are given).
    pub max_completion_tokens: Option<usize>,
    pub min_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// -1 or 0: off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub n: Option<usize>,
    pub best_of: Option<usize>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<OneOrMany>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    /// Token ids (as strings) to biases in [-100, 100].
    pub logit_bias: Option<Map<String, Value>>,
    pub response_format: Option<ResponseFormat>,
    /// vLLM's: a JSON schema (an object, or the same as a string).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    /// A Lark grammar.
    pub guided_grammar: Option<String>,
    /// Ours: attend to the last this many positions only (a streaming window).
    pub attention_window: Option<usize>,
    /// Ours: with a window, keep the first this many positions too.
    pub attention_sinks: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Value")]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<Value> for OneOrMany {
    type Error = &'static str;

    fn try_from(v: Value) -> Result<OneOrMany, &'static str> {
        const BAD: &str = "must be a string or an array of strings";
        match v {
            Value::String(s) => Ok(OneOrMany::One(s)),
            v => serde_json::from_value(v).map(OneOrMany::Many).map_err(|_| BAD),
        }
    }
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<Map<String, Value>>,
    /// The output always follows the schema here, strict or not.
    pub strict: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// Rendered by the model's chat template, which reads each message's fields (see
    /// `pio_model::chat_template::ChatRequest`), as are `chat_template_kwargs`,
    /// `add_generation_prompt` and `continue_final_message`.
    pub messages: Vec<Value>,
    /// The fields both endpoints share (read from the same object by [`Self::from_json`]).
    #[serde(skip)]
    pub sampling: SamplingFields,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
}

/// One of a chat request's `tools`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: ToolKind,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolKind {
    Function,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

// The shared fields are read in a second pass over the same object rather than through
// `#[serde(flatten)]`, which buffers the object and so loses the path of a field's error.
impl ChatCompletionRequest {
    pub fn from_json(body: &Value) -> Result<ChatCompletionRequest, ApiError> {
        Ok(ChatCompletionRequest { sampling: parse(body)?, ..parse(body)? })
    }
}

impl CompletionRequest {
    pub fn from_json(body: &Value) -> Result<CompletionRequest, ApiError> {
        Ok(CompletionRequest { sampling: parse(body)?, ..parse(body)? })
    }
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ToolChoice, D::Error> {
        ToolChoice::from_json(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Prompt>,
    /// The fields both endpoints share (read from the same object by [`Self::from_json`]).
    #[serde(skip)]
    pub sampling: SamplingFields,
    /// Alternatives per token, 0..=20.
    pub logprobs: Option<usize>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
}

/// A completion's `prompt`: a string, strings, token ids or lists of token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Value")]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    Batch(Vec<Vec<u32>>),
}

impl TryFrom<Value> for Prompt {
    type Error = &'static str;

    fn try_from(v: Value) -> Result<Prompt, &'static str> {
        const BAD: &str = "must be a string, an array of strings, an array of token ids or an array of those";
        let first = match &v {
            Value::String(_) => None,
            Value::Array(a) => a.first().cloned(),
            _ => return Err(BAD),
        };
        match (v, first) {
            (Value::String(s), _) => Ok(Prompt::Text(s)),
            (v, None | Some(Value::String(_))) => serde_json::from_value(v).map(Prompt::Texts).map_err(|_| BAD),
            (v, Some(Value::Array(_))) => serde_json::from_value(v).map(Prompt::Batch).map_err(|_| BAD),
            (v, Some(_)) => serde_json::from_value(v).map(Prompt::Ids).map_err(|_| BAD),
        }
    }
}

/// vLLM's `POST /tokenize`: a `prompt`, or chat `messages` (the template applied).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub prompt: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub add_special_tokens: Option<bool>,
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<Option<String>>>,
}

/// vLLM's `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Version {
    pub version: &'static str,
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// A chat completion, or (as `chat.completion.chunk`) one chunk of its stream; a completion
/// (`text_completion`), whole or a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct Completion<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    /// Whole answers: always. Chunks: only with `stream_options.include_usage`, null but on the
    /// last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice of a whole chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// Null when the answer is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A call the model made (`index` in stream deltas only).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: ToolKind,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// One choice of a chat stream chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chat chunk adds to its choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One choice of a completion, whole (`finish_reason` always set) or of a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// Chat's `logprobs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// Completions' `logprobs` (the legacy shape).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per token: its alternatives' text to log-probability.
    pub top_logprobs: Vec<Map<String, Value>>,
    pub text_offset: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err<T: std::fmt::Debug>(read: fn(&Value) -> Result<T, ApiError>, v: Value) -> ApiError {
        read(&v).err().unwrap_or_else(|| panic!("{v} accepted"))
    }

    #[test]
    fn type_errors_name_the_field_and_the_path() {
        let e = err(ChatCompletionRequest::from_json, json!({"messages": [], "temperature": "hot"}));
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.starts_with("`temperature`"), "{}", e.message);
        let e = err(ChatCompletionRequest::from_json, json!({"messages": [], "stream_options": {"include_usage": 1}}));
        assert_eq!(e.param.as_deref(), Some("stream_options"));
        assert!(e.message.contains("stream_options.include_usage"), "{}", e.message);
        let e = err(ChatCompletionRequest::from_json, json!({"messages": [], "tools": [{"type": "retrieval"}]}));
        assert_eq!(e.param.as_deref(), Some("tools"));
        let e = err(ChatCompletionRequest::from_json, json!({"temperature": 1}));
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("messages"), "`messages` is required"));
        let e = err(parse::<DetokenizeRequest>, json!({"tokens": [1, -2]}));
        assert_eq!(e.param.as_deref(), Some("tokens"));
        assert!(e.message.contains("tokens[1]"), "{}", e.message);
        assert_eq!(err(CompletionRequest::from_json, json!([1])).param, None);
        let e = err(CompletionRequest::from_json, json!({"prompt": [1, "a"]}));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("array of token ids"), "{}", e.message);
        let e = err(CompletionRequest::from_json, json!({"prompt": "x", "stop": [1]}));
        assert_eq!(e.message, "`stop`: must be a string or an array of strings");
        let e = err(CompletionRequest::from_json, json!({"prompt": "x", "n": 1.5}));
        assert!(e.message.ends_with("expected a non-negative integer"), "{}", e.message);
    }

    #[test]
    fn reads_the_shapes_of_each_field() {
        let r = CompletionRequest::from_json(&json!({"prompt": [[1, 2], [3]], "stop": ["a", "b"], "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "unknown_field": true}))
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(r.prompt, Some(Prompt::Batch(vec![vec![1, 2], vec![3]])));
        for (v, p) in [
            (json!("a"), Prompt::Text("a".into())),
            (json!(["a", "b"]), Prompt::Texts(vec!["a".into(), "b".into()])),
            (json!([5, 6]), Prompt::Ids(vec![5, 6])),
            (json!([]), Prompt::Texts(vec![])),
        ] {
            assert_eq!(Prompt::try_from(v), Ok(p));
        }
        assert_eq!(r.sampling.stop, Some(OneOrMany::Many(vec!["a".into(), "b".into()])));
        assert_eq!(r.sampling.temperature, Some(0.0));
        assert!(matches!(r.sampling.response_format, Some(ResponseFormat::JsonSchema { .. })));
        let r = ChatCompletionRequest::from_json(&json!({"messages": [{"role": "user", "content": "hi"}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}, "temperature": null}))
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(r.tool_choice, Some(ToolChoice::Function("f".into())));
        assert_eq!(r.sampling.temperature, None);
    }

    #[test]
    fn answers_serialize_as_openai_s() {
        let u = Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: 0 },
        };
        let chunk = Completion {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta { content: Some("x".into()), ..ChatDelta::default() },
                logprobs: None,
                finish_reason: None,
            }],
            usage: Some(None),
        };
        assert_eq!(
            serde_json::to_value(&chunk).unwrap_or_default(),
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "usage": null,
                "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": null, "finish_reason": null}]})
        );
        let whole = Completion { usage: Some(Some(u)), choices: Vec::<CompletionChoice>::new(), ..chunk.clone_meta() };
        assert_eq!(serde_json::to_value(&whole).unwrap_or_default()["usage"]["total_tokens"], 5);
    }

    impl<C> Completion<C> {
        fn clone_meta<D>(&self) -> Completion<D> {
            Completion {
                id: self.id.clone(),
                object: self.object,
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: None,
            }
        }
    }
}
