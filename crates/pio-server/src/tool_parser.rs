//! Tool calls in a model's output, per model family (as vLLM's `--tool-call-parser`s).
//!
//! Every family we run wraps a call in `<tool_call>` ... `</tool_call>`; what is inside differs:
//! - `hermes` (Qwen3, Qwen2.5): `{"name": NAME, "arguments": {...}}`;
//! - `qwen3_coder` (Qwen3-Coder, Qwen3-Coder-Next):
//!   `<function=NAME><parameter=KEY>VALUE</parameter>...</function>`, values typed by the tool's
//!   JSON schema (a `"5"` for an integer parameter is the number 5);
//! - `glm47` (GLM-4.5 to 4.7): `NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...`,
//!   values typed by the schema the same way.
//!
//! [`ToolCallStream`] takes the text as it is generated and splits it into content and calls:
//! content is passed on at once except what could be the start of a `<tool_call>` tag, a call is
//! given whole once its closing tag arrives. A call whose markup does not parse, or one the
//! generation ends inside of, goes back as content, so a model that writes broken markup has
//! its text returned rather than an error. [`parse`](ToolCallParser::parse) runs the same over
//! a whole answer.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::tool_grammar::ToolSpec;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// How a family writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallParser {
    Hermes,
    Qwen3Coder,
    Glm47,
}

impl ToolCallParser {
    pub const NAMES: [&'static str; 3] = ["hermes", "qwen3_coder", "glm47"];

    /// The parser a chat template's way of rendering tool calls implies (`None`: it renders
    /// none).
    pub fn for_template(source: &str) -> Option<ToolCallParser> {
        if !source.contains(OPEN) {
            return None;
        }
        Some(if source.contains("<function=") {
            ToolCallParser::Qwen3Coder
        } else if source.contains("<arg_key>") {
            ToolCallParser::Glm47
        } else {
            ToolCallParser::Hermes
        })
    }

    /// The content and the calls of a whole answer (`tools`: the request's `tools`).
    pub fn parse(self, text: &str, tools: &[ToolSpec]) -> Parsed {
        let mut s = ToolCallStream::new(self, tools.to_vec());
        let mut deltas = s.push(text);
        deltas.extend(s.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for d in deltas {
            match d {
                Delta::Content(c) => content.push_str(&c),
                Delta::Call(c) => calls.push(c),
            }
        }
        let content = content.trim();
        Parsed { content: (!content.is_empty()).then(|| content.to_string()), calls }
    }

    /// A call's body (what is between the tags), or `None` when it does not parse.
    fn parse_call(self, body: &str, tools: &[ToolSpec]) -> Option<ToolCall> {
        match self {
            ToolCallParser::Hermes => {
                let v: Value = serde_json::from_str(body.trim()).ok()?;
                let name = v.get("name")?.as_str()?.to_string();
                let args = match v.get("arguments").or_else(|| v.get("parameters")) {
                    None | Some(Value::Null) => "{}".to_string(),
                    // Some models write the arguments as a JSON string already.
                    Some(Value::String(s)) => {
                        serde_json::from_str::<Value>(s).ok().filter(Value::is_object)?;
                        s.clone()
                    }
                    Some(a @ Value::Object(_)) => a.to_string(),
                    Some(_) => return None,
                };
                Some(ToolCall { name, arguments: args })
            }
            ToolCallParser::Qwen3Coder => {
                let body = body.trim();
                let rest = body.strip_prefix("<function=")?;
                let (name, rest) = rest.split_once('>')?;
                let inner = rest.trim_end().strip_suffix("</function>")?;
                let name = name.trim().to_string();
                let mut args = Map::new();
                let mut rest = inner.trim_start();
                while !rest.is_empty() {
                    let r = rest.strip_prefix("<parameter=")?;
                    let (key, r) = r.split_once('>')?;
                    let (value, r) = r.split_once("</parameter>")?;
                    // The template puts the value on lines of its own.
                    let value = value.strip_prefix('\n').unwrap_or(value);
                    let value = value.strip_suffix('\n').unwrap_or(value);
                    let key = key.trim();
                    args.insert(key.to_string(), typed(value, param_type(tools, &name, key)));
                    rest = r.trim_start();
                }
                Some(ToolCall { name, arguments: Value::Object(args).to_string() })
            }
            ToolCallParser::Glm47 => {
                let (name, mut rest) = match body.find("<arg_key>") {
                    Some(at) => (&body[..at], &body[at..]),
                    None => (body, ""),
                };
                let name = name.trim();
                if name.is_empty() || name.contains('<') {
                    return None;
                }
                let mut args = Map::new();
                rest = rest.trim();
                while !rest.is_empty() {
                    let r = rest.strip_prefix("<arg_key>")?;
                    let (key, r) = r.split_once("</arg_key>")?;
                    let r = r.trim_start().strip_prefix("<arg_value>")?;
                    let (value, r) = r.split_once("</arg_value>")?;
                    let key = key.trim();
                    args.insert(key.to_string(), typed(value, param_type(tools, name, key)));
                    rest = r.trim();
                }
                Some(ToolCall { name: name.to_string(), arguments: Value::Object(args).to_string() })
            }
        }
    }
}

impl FromStr for ToolCallParser {
    type Err = String;

    fn from_str(s: &str) -> Result<ToolCallParser, String> {
        match s {
            "hermes" => Ok(ToolCallParser::Hermes),
            "qwen3_coder" => Ok(ToolCallParser::Qwen3Coder),
            "glm47" | "glm45" => Ok(ToolCallParser::Glm47),
            _ => Err(format!("unknown tool-call parser {s:?} (known: {})", ToolCallParser::NAMES.join(", "))),
        }
    }
}

impl fmt::Display for ToolCallParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ToolCallParser::Hermes => "hermes",
            ToolCallParser::Qwen3Coder => "qwen3_coder",
            ToolCallParser::Glm47 => "glm47",
        })
    }
}

/// One call: the function's name and its arguments as JSON text (OpenAI's `arguments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A whole answer split: its content (`None` when only whitespace is left) and calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// What a piece of generated text becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Content(String),
    Call(ToolCall),
}

/// Splits text into content and calls as it arrives.
#[derive(Debug)]
pub struct ToolCallStream {
    parser: ToolCallParser,
    tools: Vec<ToolSpec>,
    /// Text not passed on yet: a possible start of `<tool_call>`, or a call's body so far.
    held: String,
    in_call: bool,
    calls: usize,
    /// Whitespace after a call, given only if text follows before the next call.
    pending: String,
    /// Text other than whitespace came since the last call.
    segment_has_text: bool,
}

impl ToolCallStream {
    pub fn new(parser: ToolCallParser, tools: Vec<ToolSpec>) -> ToolCallStream {
        ToolCallStream {
            parser,
            tools,
            held: String::new(),
            in_call: false,
            calls: 0,
            pending: String::new(),
            segment_has_text: false,
        }
    }

    /// Calls given so far.
    pub fn num_calls(&self) -> usize {
        self.calls
    }

    /// The deltas `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.held.find(CLOSE) else { break };
                let body: String = self.held[..end].to_string();
                self.held.drain(..end + CLOSE.len());
                self.in_call = false;
                match self.parser.parse_call(&body, &self.tools) {
                    Some(call) => {
                        self.calls += 1;
                        self.segment_has_text = false;
                        out.push(Delta::Call(call));
                    }
                    None => self.content(&mut out, format!("{OPEN}{body}{CLOSE}")),
                }
            } else if let Some(at) = self.held.find(OPEN) {
                let before: String = self.held[..at].to_string();
                self.held.drain(..at + OPEN.len());
                self.in_call = true;
                self.content(&mut out, before);
                // Whitespace alone between two calls is dropped.
                self.pending.clear();
            } else {
                // Keep back what could be the start of the tag.
                let keep = (1..OPEN.len()).rev().find(|&n| self.held.ends_with(&OPEN[..n])).unwrap_or(0);
                let cut = self.held.len() - keep;
                let text: String = self.held.drain(..cut).collect();
                self.content(&mut out, text);
                break;
            }
        }
        out
    }

    /// What is left at the end of the generation: held text, or an unfinished call, as
    /// content.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        let text = if std::mem::take(&mut self.in_call) { format!("{OPEN}{held}") } else { held };
        self.content(&mut out, text);
        out
    }

    /// Content, except whitespace alone between or after calls (held in `pending` until text
    /// follows, so that where the text is split does not matter).
    fn content(&mut self, out: &mut Vec<Delta>, text: String) {
        if text.is_empty() {
            return;
        }
        if self.calls > 0 && !self.segment_has_text {
            if text.trim().is_empty() {
                self.pending.push_str(&text);
                return;
            }
            self.segment_has_text = true;
            let text = std::mem::take(&mut self.pending) + &text;
            out.push(Delta::Content(text));
            return;
        }
        out.push(Delta::Content(text));
    }
}

/// The JSON schema type of parameter `key` of tool `name` (the first non-null one of a list).
fn param_type<'a>(tools: &'a [ToolSpec], name: &str, key: &str) -> Option<&'a str> {
    let f = tools.iter().find(|t| t.name == name)?;
    match f.parameters.get("properties")?.get(key)?.get("type")? {
        Value::String(t) => Some(t),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null"),
        _ => None,
    }
}

/// A parameter's text as the JSON value its schema type asks for; text that is not one stays
/// a string. Without a known type: JSON if it parses as an object or array, else the text.
fn typed(value: &str, ty: Option<&str>) -> Value {
    let v = value.trim();
    let parsed = || serde_json::from_str::<Value>(v).ok();
    let out = match ty {
        Some("string") => None,
        Some("integer") => v.parse::<i64>().ok().map(Value::from),
        Some("number") => parsed().filter(Value::is_number),
        Some("boolean") => match v.to_ascii_lowercase().as_str() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        Some("object") => parsed().filter(Value::is_object),
        Some("array") => parsed().filter(Value::is_array),
        Some("null") => (v == "null").then_some(Value::Null),
        _ => parsed().filter(|p| p.is_object() || p.is_array()),
    };
    out.unwrap_or_else(|| Value::String(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<ToolSpec> {
        vec![
            ToolSpec {
                name: "get_weather".into(),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"},
                    "days": {"type": "integer"}, "metric": {"type": "boolean"}, "hours": {"type": ["array", "null"]},
                    "zip": {"type": "string"}}}),
            },
            ToolSpec {
                name: "add".into(),
                parameters: json!({"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}),
            },
        ]
    }

    fn args(c: &ToolCall) -> Value {
        serde_json::from_str(&c.arguments).expect("arguments are JSON")
    }

    /// The answer whole, and streamed one character at a time, give the same content and calls.
    fn both(p: ToolCallParser, text: &str) -> Parsed {
        let whole = p.parse(text, &tools());
        let mut s = ToolCallStream::new(p, tools());
        let mut deltas = Vec::new();
        for ch in text.chars() {
            deltas.extend(s.push(&ch.to_string()));
        }
        deltas.extend(s.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for d in deltas {
            match d {
                Delta::Content(c) => {
                    assert!(!c.contains(OPEN) || whole.content.as_deref().is_some_and(|w| w.contains(OPEN)));
                    content.push_str(&c);
                }
                Delta::Call(c) => calls.push(c),
            }
        }
        let content = content.trim();
        assert_eq!(Parsed { content: (!content.is_empty()).then(|| content.to_string()), calls }, whole, "{text}");
        whole
    }

    /// Found by fuzzing: whitespace after a call, then text, kept its whitespace when whole and
    /// lost it when streamed in pieces.
    #[test]
    fn whitespace_after_a_call_then_text_streams_as_it_reads_whole() {
        let p = ToolCallParser::Glm47;
        let text = "<tool_call>add<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>\n  Done:\n ok \n<tool_call>add</tool_call> \n";
        let r = both(p, text);
        assert_eq!((r.content.as_deref(), r.calls.len()), (Some("Done:\n ok"), 2));
        // Whitespace alone between and after calls is dropped, however it arrives.
        let r = both(p, "<tool_call>add</tool_call>\n \n<tool_call>add</tool_call>\n");
        assert_eq!((r.content, r.calls.len()), (None, 2));
    }

    #[test]
    fn hermes_calls() {
        let p = ToolCallParser::Hermes;
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2.5}}\n</tool_call>";
        let r = both(p, text);
        assert_eq!(r.content.as_deref(), Some("Let me check."));
        assert_eq!(r.calls.len(), 2);
        assert_eq!((r.calls[0].name.as_str(), args(&r.calls[0])), ("get_weather", json!({"city": "Paris", "days": 3})));
        assert_eq!((r.calls[1].name.as_str(), args(&r.calls[1])), ("add", json!({"a": 1, "b": 2.5})));
        // Arguments already a JSON string; no content at all.
        let r = both(p, "<tool_call>{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>");
        assert_eq!((r.content, args(&r.calls[0])), (None, json!({"a": 1})));
    }

    #[test]
    fn qwen3_coder_calls_typed_by_the_schema() {
        let p = ToolCallParser::Qwen3Coder;
        let text = "I'll look it up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n<parameter=days>\n5\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n<parameter=zip>\n02134\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=add>\n<parameter=a>\n1.5\n</parameter>\n<parameter=b>\n-2\n</parameter>\n</function>\n</tool_call>";
        let r = both(p, text);
        assert_eq!(r.content.as_deref(), Some("I'll look it up."));
        assert_eq!(
            args(&r.calls[0]),
            json!({"city": "San Francisco, CA", "days": 5, "metric": true, "hours": [1, 2], "zip": "02134"})
        );
        assert_eq!((r.calls[1].name.as_str(), args(&r.calls[1])), ("add", json!({"a": 1.5, "b": -2})));
        // A value that does not fit its type stays text; a multi-line value keeps its lines.
        let r = both(p, "<tool_call>\n<function=get_weather>\n<parameter=days>\nsoon\n</parameter>\n<parameter=city>\nline 1\nline 2\n</parameter>\n</function>\n</tool_call>");
        assert_eq!(args(&r.calls[0]), json!({"days": "soon", "city": "line 1\nline 2"}));
    }

    #[test]
    fn glm_calls_typed_by_the_schema() {
        let p = ToolCallParser::Glm47;
        let text = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call><tool_call>add\n<arg_key>a</arg_key>\n<arg_value>3</arg_value>\n<arg_key>b</arg_key>\n<arg_value>4.25</arg_value>\n</tool_call>";
        let r = both(p, text);
        assert_eq!(r.content, None);
        assert_eq!(
            (r.calls[0].name.as_str(), args(&r.calls[0])),
            ("get_weather", json!({"city": "Beijing", "days": 2}))
        );
        assert_eq!(args(&r.calls[1]), json!({"a": 3, "b": 4.25}));
        // A call without arguments.
        let r = both(p, "<tool_call>get_time</tool_call>");
        assert_eq!((r.calls[0].name.as_str(), args(&r.calls[0])), ("get_time", json!({})));
    }

    #[test]
    fn broken_markup_comes_back_as_content() {
        for (p, text) in [
            (ToolCallParser::Hermes, "Sure <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1</tool_call> ok"),
            (ToolCallParser::Hermes, "Cut short <tool_call>{\"name\": \"add\""),
            (ToolCallParser::Qwen3Coder, "<tool_call><function=add><parameter=a>1</function></tool_call>"),
            (ToolCallParser::Glm47, "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>"),
        ] {
            let r = both(p, text);
            assert!(r.calls.is_empty(), "{text}");
            assert_eq!(r.content.as_deref(), Some(text.trim()), "{text}");
        }
        // A good call beside a broken one keeps the good one.
        let r = both(
            ToolCallParser::Hermes,
            "<tool_call>{\"name\": \"add\", \"arguments\": {}}</tool_call><tool_call>nonsense</tool_call>",
        );
        assert_eq!(r.calls.len(), 1);
        assert_eq!(r.content.as_deref(), Some("<tool_call>nonsense</tool_call>"));
    }

    #[test]
    fn text_without_calls_streams_through_except_a_possible_tag() {
        let mut s = ToolCallStream::new(ToolCallParser::Hermes, Vec::new());
        assert_eq!(s.push("a < b and <tool"), vec![Delta::Content("a < b and ".into())]);
        assert_eq!(s.push("kit>"), vec![Delta::Content("<toolkit>".into())]);
        assert_eq!(s.push("x <"), vec![Delta::Content("x ".into())]);
        assert_eq!(s.finish(), vec![Delta::Content("<".into())]);
        assert_eq!(s.num_calls(), 0);
    }

    #[test]
    fn parsers_by_name_and_by_template() {
        assert_eq!("qwen3_coder".parse(), Ok(ToolCallParser::Qwen3Coder));
        assert_eq!("glm45".parse(), Ok(ToolCallParser::Glm47));
        assert!("mistral".parse::<ToolCallParser>().unwrap_err().contains("known: hermes"));
        assert_eq!(ToolCallParser::for_template("{{ x }}"), None);
        assert_eq!(ToolCallParser::for_template("<tool_call>\n{\"name\": ..."), Some(ToolCallParser::Hermes));
        assert_eq!(ToolCallParser::for_template("<tool_call>\n<function="), Some(ToolCallParser::Qwen3Coder));
        assert_eq!(ToolCallParser::for_template("<tool_call>{{ n }}<arg_key>"), Some(ToolCallParser::Glm47));
    }
}
