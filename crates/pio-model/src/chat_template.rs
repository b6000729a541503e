//! Chat templates: renders a Hugging Face Jinja chat template the way transformers'
//! `apply_chat_template` does (`_compile_jinja_template` / `render_jinja_template`).
//!
//! The environment mirrors transformers' sandboxed jinja2 setup: `trim_blocks` and
//! `lstrip_blocks` on, loop controls, the globals `raise_exception(msg)` and
//! `strftime_now(fmt)`, and a `tojson` filter that behaves like Python's
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`
//! (Python's `", "` / `": "` separators, keys in insertion order, no HTML escaping).
//! Python string/dict methods (`startswith`, `split`, `strip`, `items`, ...) come from
//! `minijinja_contrib::pycompat`, and printed values follow Python's `str()` (`None`,
//! `True`, `['a', 'b']`, `{'k': 1}`, `1e+20`). Undefined variables follow jinja2's default
//! lenient `Undefined`: they print as nothing and are falsy, so an absent
//! `enable_thinking` is undefined rather than false.
//!
//! Rendering variables: `messages`, `tools` (`none` when not given, as transformers passes
//! `tools=None`), `documents` (`none`), `add_generation_prompt`, `bos_token`/`eos_token`
//! (only when known, as transformers' `special_tokens_map` omits unset tokens) and every
//! `chat_template_kwargs` entry at top level.

use std::fmt::Write as _;

use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde_json::Map;

use crate::error::{Error, Result};

/// Name under which the template is stored in its environment (shows up in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// Most instructions one rendering may run (minijinja's fuel): a template comes with a model
/// file, so one that loops without end must fail rather than hang the request (50 million
/// take about 2 s here, while Qwen3's template renders a 16-message conversation with tools in
/// 50 µs).
pub const TEMPLATE_FUEL: u64 = 50_000_000;

/// Longest rendered prompt, in bytes (far past any context we run: a million tokens are about
/// 4 MiB of text).
pub const MAX_TEMPLATE_OUTPUT: usize = 64 << 20;

/// A compiled chat template plus the BOS/EOS token strings it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    env: Environment<'static>,
    walks_parts: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. Syntax errors are reported as [`Error::Template`].
    pub fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Result<ChatTemplate> {
        let env = build_env(&source)?;
        let walks_parts = walks_content_lists(&source);
        Ok(ChatTemplate { source, bos_token, eos_token, env, walks_parts })
    }

    /// Whether the template renders a message's `content` given as a list of parts itself (it
    /// loops over it, as the Qwen-VL templates do): requests then keep their lists
    /// ([`ChatRequest::from_openai_json_with_images`]), as transformers' `apply_chat_template` and
    /// vLLM's "openai" content format hand them over.
    pub fn walks_content_parts(&self) -> bool {
        self.walks_parts
    }

    /// Renders the prompt for `req` (the text that is then tokenized, special tokens included).
    pub fn render(&self, req: &ChatRequest) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        let mut ctx: Vec<(String, Value)> = Vec::with_capacity(req.kwargs.len() + 6);
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token".into(), Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token".into(), Value::from(eos.as_str())));
        }
        const FIXED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];
        for (k, v) in &req.kwargs {
            if !FIXED.contains(&k.as_str()) {
                ctx.push((k.clone(), Value::from_serialize(v)));
            }
        }
        ctx.push(("messages".into(), Value::from_serialize(&req.messages)));
        ctx.push((
            "tools".into(),
            match &req.tools {
                Some(tools) => Value::from_serialize(tools),
                None => Value::from(()),
            },
        ));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push(("add_generation_prompt".into(), Value::from(req.add_generation_prompt)));
        // Later entries win: the fixed variables override same-named kwargs.
        let ctx: Value = ctx.into_iter().collect();
        let mut out = Capped(Vec::new());
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => {
                String::from_utf8(out.0).map_err(|e| Error::Template(format!("the template wrote invalid UTF-8: {e}")))
            }
            Err(_) if out.0.len() >= MAX_TEMPLATE_OUTPUT => {
                Err(Error::Template(format!("the rendered prompt is longer than {} MiB", MAX_TEMPLATE_OUTPUT >> 20)))
            }
            Err(e) => Err(template_err(e)),
        }
    }

    /// The template source as given (before any compatibility rewriting).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS token string passed to the template as `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token string passed to the template as `eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

/// The parts of an OpenAI chat-completions request body a template sees.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<serde_json::Value>,
    pub tools: Option<Vec<serde_json::Value>>,
    /// Default `true`.
    pub add_generation_prompt: bool,
    /// `chat_template_kwargs`, e.g. `enable_thinking`; passed to the template at top level.
    pub kwargs: Map<String, serde_json::Value>,
}

impl ChatRequest {
    /// Reads `messages` (required array of objects), `tools` (optional array),
    /// `add_generation_prompt` (optional bool, default true) and `chat_template_kwargs`
    /// (optional object) from a request body. `null` counts as absent for the optional
    /// fields. Tool-call `function.arguments` sent as a JSON string (as the OpenAI API does)
    /// are parsed into an object, as vLLM does, so templates that iterate over the
    /// arguments work.
    pub fn from_openai_json(body: &serde_json::Value) -> Result<ChatRequest> {
        Self::from_openai_json_with_images(body, None, false).map(|(r, _)| r)
    }

    /// [`ChatRequest::from_openai_json`] for a model that takes images: each
    /// `{"type": "image_url", "image_url": {"url": ...}}` part (or `"image_url": "..."`)
    /// becomes `image_placeholder` in the message's text, directly before what follows it (as
    /// Qwen-VL templates render image parts), and its URL is returned, in message order.
    /// Without a placeholder (a text model) image parts are refused. `keep_parts`, for a
    /// template that renders lists of parts itself ([`ChatTemplate::walks_content_parts`]): the
    /// parts are checked and the image URLs collected the same way, but each list stays as it
    /// is, so the template places its own vision tokens and joins the texts as it means to.
    pub fn from_openai_json_with_images(
        body: &serde_json::Value,
        image_placeholder: Option<&str>,
        keep_parts: bool,
    ) -> Result<(ChatRequest, Vec<String>)> {
        let mut urls = Vec::new();
        let obj = body.as_object().ok_or_else(|| Error::Template("request body must be a JSON object".into()))?;
        let messages = match obj.get("messages") {
            None | Some(serde_json::Value::Null) => {
                return Err(Error::Template("request body has no `messages` array".into()))
            }
            Some(serde_json::Value::Array(m)) => m,
            Some(other) => {
                return Err(Error::Template(format!("`messages` must be an array, got {}", json_type_name(other))))
            }
        };
        if messages.is_empty() {
            return Err(Error::Template("`messages` is empty".into()));
        }
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if !m.is_object() {
                return Err(Error::Template(format!("`messages[{i}]` must be an object, got {}", json_type_name(m))));
            }
            if !m.get("role").is_some_and(|r| r.is_string()) {
                return Err(Error::Template(format!("`messages[{i}].role` must be a string")));
            }
            let mut m = m.clone();
            join_text_parts(&mut m, i, image_placeholder, &mut urls, keep_parts)?;
            parse_tool_call_arguments(&mut m);
            out.push(m);
        }
        let tools = match obj.get("tools") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(t)) => Some(t.clone()),
            Some(other) => {
                return Err(Error::Template(format!("`tools` must be an array, got {}", json_type_name(other))))
            }
        };
        let add_generation_prompt = match obj.get("add_generation_prompt") {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Error::Template(format!(
                    "`add_generation_prompt` must be a boolean, got {}",
                    json_type_name(other)
                )))
            }
        };
        let kwargs = match obj.get("chat_template_kwargs") {
            None | Some(serde_json::Value::Null) => Map::new(),
            Some(serde_json::Value::Object(k)) => k.clone(),
            Some(other) => {
                return Err(Error::Template(format!(
                    "`chat_template_kwargs` must be an object, got {}",
                    json_type_name(other)
                )))
            }
        };
        Ok((ChatRequest { messages: out, tools, add_generation_prompt, kwargs }, urls))
    }

    /// One user message with the generation prompt.
    pub fn single_user(text: &str) -> ChatRequest {
        ChatRequest {
            messages: vec![serde_json::json!({"role": "user", "content": text})],
            tools: None,
            add_generation_prompt: true,
            kwargs: Map::new(),
        }
    }
}

fn json_type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `content` given as a list of parts (`[{"type": "text", "text": ...}, ...]`, as OpenAI allows)
/// becomes the parts' texts joined by newlines, as vLLM does for text-only models; an image
/// part becomes `image` (a model that takes images) joined to what follows without one, its
/// URL added to `urls`; other part types are refused. `keep`: the parts are checked and the
/// URLs collected, the list left as it is.
fn join_text_parts(
    message: &mut serde_json::Value,
    i: usize,
    image: Option<&str>,
    urls: &mut Vec<String>,
    keep: bool,
) -> Result<()> {
    let Some(serde_json::Value::Array(parts)) = message.get("content") else {
        return Ok(());
    };
    let mut text = String::new();
    let mut after_image = true;
    for (j, part) in parts.iter().enumerate() {
        match (part.get("type").and_then(|t| t.as_str()), part.get("text").and_then(|t| t.as_str())) {
            (Some("text"), Some(t)) => {
                if !after_image {
                    text.push('\n');
                }
                text.push_str(t);
                after_image = false;
            }
            (Some("image_url"), _) if image.is_some() => {
                let url = part.get("image_url").and_then(|u| u.get("url").or(Some(u))).and_then(|u| u.as_str());
                let Some(url) = url else {
                    return Err(Error::Template(format!(
                        "`messages[{i}].content[{j}].image_url` must be an object with a string `url`"
                    )));
                };
                urls.push(url.to_string());
                text.push_str(image.unwrap_or_default());
                after_image = true;
            }
            (Some(kind), _) if kind != "text" => {
                return Err(Error::Template(format!(
                    "`messages[{i}].content[{j}]`: content parts of type {kind:?} are not supported by this model"
                )))
            }
            _ => {
                return Err(Error::Template(format!(
                    "`messages[{i}].content[{j}]` must be an object with `type` \"text\" and a string `text`"
                )))
            }
        }
    }
    if !keep {
        message["content"] = serde_json::Value::String(text);
    }
    Ok(())
}

/// Whether `source` loops over a message's content (`{% for x in content %}`, `... in
/// message.content`, `... in message['content']`): a template that renders lists of parts.
/// A look at the tags, as vLLM's detection of the "openai" content format looks at the
/// template (its walk of the parsed template also follows assignments; these are the forms
/// the Qwen-VL and other multimodal templates use).
fn walks_content_lists(source: &str) -> bool {
    source.split("{%").skip(1).any(|tag| {
        let tag = tag.split("%}").next().unwrap_or("");
        let words: Vec<&str> =
            tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace()).split_whitespace().collect();
        match words.as_slice() {
            ["for", _, "in", target, ..] => {
                let t = target.trim_end_matches(['-', '+']);
                t == "content" || t.ends_with(".content") || t.ends_with("['content']") || t.ends_with("[\"content\"]")
            }
            _ => false,
        }
    })
}

/// `tool_calls[*].function.arguments` given as a JSON-encoded object string becomes the object.
fn parse_tool_call_arguments(message: &mut serde_json::Value) {
    let Some(calls) = message.get_mut("tool_calls").and_then(|c| c.as_array_mut()) else {
        return;
    };
    for call in calls {
        let Some(args) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) else {
            continue;
        };
        if let serde_json::Value::String(s) = args {
            if let Ok(parsed @ serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(s) {
                *args = parsed;
            }
        }
    }
}

/// A buffer that refuses to grow past [`MAX_TEMPLATE_OUTPUT`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_TEMPLATE_OUTPUT {
            self.0.resize(MAX_TEMPLATE_OUTPUT, 0);
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_err(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    Error::Template(msg)
}

fn build_env(source: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, _state, value| {
        let mut s = String::new();
        py_str(value, &mut s);
        out.write_str(&s).map_err(minijinja::Error::from)
    });
    env.add_filter("tojson", tojson_filter);
    env.add_filter("string", |v: Value| {
        let mut s = String::new();
        py_str(&v, &mut s);
        s
    });
    // jinja2's tests differ from minijinja's for `none` (not iterable in Python) and for
    // strings and dicts (sequences in Python: they have a length and `__getitem__`).
    env.add_test("iterable", |v: Value| v.kind() != ValueKind::None && v.try_iter().is_ok());
    env.add_test("sequence", |v: Value| match v.kind() {
        ValueKind::Seq | ValueKind::Map | ValueKind::String | ValueKind::Bytes => true,
        ValueKind::Undefined => true,
        ValueKind::Iterable => v.len().is_some(),
        _ => false,
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source)).map_err(template_err)?;
    Ok(env)
}

fn raise_exception(message: Option<Value>) -> std::result::Result<Value, minijinja::Error> {
    let mut msg = String::new();
    if let Some(m) = &message {
        py_str(m, &mut msg);
    }
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// transformers registers a `{% generation %}...{% endgeneration %}` block tag (used to
/// track assistant tokens). It renders its body unchanged, so it is rewritten into
/// `{% if true %}...{% endif %}`, keeping any whitespace-control markers.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        // The closing `%}` after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = split_ws_marker_front(inner);
        let (body, trail) = split_ws_marker_back(body);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                let _ = write!(out, "{{%{lead} {r} {trail}%}}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn split_ws_marker_front(s: &str) -> (&str, &str) {
    match s.as_bytes().first() {
        Some(b'-') | Some(b'+') => (&s[..1], &s[1..]),
        _ => ("", s),
    }
}

fn split_ws_marker_back(s: &str) -> (&str, &str) {
    match s.as_bytes().last() {
        Some(b'-') | Some(b'+') => (&s[..s.len() - 1], &s[s.len() - 1..]),
        _ => (s, ""),
    }
}

// ---------------------------------------------------------------------------------------------
// Python `str()` / `repr()` of template values.

/// Appends Python's `str(value)` (what jinja2 prints for `{{ value }}`).
fn py_str(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        ValueKind::Number => py_number(v, out),
        ValueKind::Seq | ValueKind::Map => py_repr(v, out),
        ValueKind::Iterable if v.len().is_some() => py_repr(v, out),
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Appends Python's `repr(value)`.
fn py_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::String => py_repr_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(iter) = v.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = v.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&key, out);
                    out.push_str(": ");
                    let item = v.get_item(&key).unwrap_or_default();
                    py_repr(&item, out);
                }
            }
            out.push('}');
        }
        _ => py_str(v, out),
    }
}

fn py_number(v: &Value, out: &mut String) {
    if v.is_integer() {
        if let Ok(i) = i128::try_from(v.clone()) {
            let _ = write!(out, "{i}");
            return;
        }
        if let Ok(u) = u128::try_from(v.clone()) {
            let _ = write!(out, "{u}");
            return;
        }
    }
    match f64::try_from(v.clone()) {
        Ok(f) => out.push_str(&py_float_repr(f)),
        Err(_) => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form when the decimal
/// exponent is below -4 or at least 16.
fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut s = String::new();
    if x < 0.0 {
        s.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                s.push_str(&digits);
                s.extend(std::iter::repeat_n('0', int_len - digits.len()));
                s.push_str(".0");
            } else {
                s.push_str(&digits[..int_len]);
                s.push('.');
                s.push_str(&digits[int_len..]);
            }
        } else {
            s.push_str("0.");
            s.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            s.push_str(&digits);
        }
    } else {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(s, "e{sign}{:02}", exp.abs());
    }
    s
}

/// Python's `repr(str)`: single quotes unless the text has a `'` and no `"`.
fn py_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if py_is_printable(c) => out.push(c),
            c => {
                let cp = c as u32;
                let _ = if cp <= 0xff {
                    write!(out, "\\x{cp:02x}")
                } else if cp <= 0xffff {
                    write!(out, "\\u{cp:04x}")
                } else {
                    write!(out, "\\U{cp:08x}")
                };
            }
        }
    }
    out.push(quote);
}

/// An approximation of Python's `str.isprintable` for one character: control, format,
/// separator (other than the ASCII space) and private-use characters are not printable.
fn py_is_printable(c: char) -> bool {
    let cp = c as u32;
    !(cp < 0x20
        || (0x7f..=0xa0).contains(&cp)
        || cp == 0xad
        || cp == 0x1680
        || (0x2000..=0x200f).contains(&cp)
        || (0x2028..=0x202f).contains(&cp)
        || (0x205f..=0x206f).contains(&cp)
        || cp == 0x3000
        || (0xd800..=0xf8ff).contains(&cp)
        || cp == 0xfeff
        || (0xfff9..=0xfffb).contains(&cp)
        || (0xf0000..=0x10ffff).contains(&cp))
}

// ---------------------------------------------------------------------------------------------
// `tojson`: Python `json.dumps`.

struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, the
/// signature transformers gives it (positional arguments are taken in that order).
fn tojson_filter(value: Value, args: Rest<Value>) -> std::result::Result<Value, minijinja::Error> {
    let (positional, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > NAMES.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments besides the value",
        ));
    }
    let mut opts: [Option<Value>; 4] = Default::default();
    for (i, v) in positional.iter().enumerate() {
        opts[i] = Some(v.clone());
    }
    for (i, name) in NAMES.iter().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if opts[i].is_some() {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson got multiple values for argument '{name}'"),
                ));
            }
            opts[i] = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = opts;
    let indent = match present_arg(&indent) {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().into()),
        Some(v) => {
            let n = if v.kind() == ValueKind::Bool {
                i64::from(v.is_true())
            } else {
                i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")
                })?
            };
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    let (item_sep, key_sep) = match present_arg(&separators) {
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_string(), b.as_str().unwrap_or_default().to_string())
                }
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let opts = JsonOptions {
        ensure_ascii: present_arg(&ensure_ascii).is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: present_arg(&sort_keys).is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    json_dump(&value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

/// An argument given and neither `none` nor undefined.
fn present_arg(v: &Option<Value>) -> Option<&Value> {
    v.as_ref().filter(|v| !v.is_none() && !v.is_undefined())
}

fn not_serializable(v: &Value) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, format!("Object of type {} is not JSON serializable", v.kind()))
}

fn json_dump(v: &Value, o: &JsonOptions, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => json_number(v, out),
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                json_newline(o, level + 1, out);
                json_dump(item, o, level + 1, out)?;
            }
            json_newline(o, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                json_newline(o, level + 1, out);
                json_str(key, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                json_dump(item, o, level + 1, out)?;
            }
            json_newline(o, level, out);
            out.push('}');
        }
        _ => return Err(not_serializable(v)),
    }
    Ok(())
}

fn json_newline(o: &JsonOptions, level: usize, out: &mut String) {
    if let Some(indent) = &o.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

/// Python's `json.dumps` key conversion: str, int, float, bool and None keys are allowed.
fn json_key(k: &Value) -> std::result::Result<String, minijinja::Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Number => {
            let mut s = String::new();
            json_number(k, &mut s);
            s
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("keys must be str, int, float, bool or None, not {}", k.kind()),
            ))
        }
    })
}

fn json_number(v: &Value, out: &mut String) {
    if !v.is_integer() {
        if let Ok(f) = f64::try_from(v.clone()) {
            if f.is_nan() {
                out.push_str("NaN");
            } else if f.is_infinite() {
                out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
            } else {
                out.push_str(&py_float_repr(f));
            }
            return;
        }
    }
    py_number(v, out);
}

/// A JSON string literal the way Python's encoder writes it.
fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// `strftime_now`

/// `datetime.now().strftime(format)`. The clock is read as UTC (there is no time-zone
/// database here; servers normally run in UTC).
fn strftime_now(format: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&format, secs)
}

const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// A C/glibc-style `strftime` for a UTC timestamp (supports the `-` no-padding flag).
fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + u32::from(month > 2 && is_leap(year));
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, v: i64, width: usize| {
            let _ = if no_pad { write!(out, "{v}") } else { write!(out, "{v:0width$}") };
        };
        match spec {
            'Y' => {
                let _ = write!(out, "{year}");
            }
            'y' => num(&mut out, year.rem_euclid(100), 2),
            'm' => num(&mut out, i64::from(month), 2),
            'd' => num(&mut out, i64::from(day), 2),
            'e' => {
                let _ = if no_pad { write!(out, "{day}") } else { write!(out, "{day:2}") };
            }
            'H' => num(&mut out, hour, 2),
            'I' => num(&mut out, hour12, 2),
            'M' => num(&mut out, minute, 2),
            'S' => num(&mut out, second, 2),
            'j' => num(&mut out, i64::from(yday), 3),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(month_name),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'A' => out.push_str(weekday_name),
            'a' => out.push_str(&weekday_name[..3]),
            'w' => {
                let _ = write!(out, "{weekday}");
            }
            'u' => {
                let _ = write!(out, "{}", if weekday == 0 { 7 } else { weekday });
            }
            'F' => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            'T' => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            'D' => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            'c' => {
                let _ = write!(
                    out,
                    "{} {} {day:2} {hour:02}:{minute:02}:{second:02} {year}",
                    &weekday_name[..3],
                    &month_name[..3]
                );
            }
            'x' => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            'X' => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            // A naive datetime has no zone: Python prints nothing for these.
            'Z' | 'z' => {}
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (100.0, "100.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.25, "-2.25"),
            (1e100, "1e+100"),
            (123456.789, "123456.789"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn strftime_known_date() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(strftime("%A %B %-d, %j %p %I %%", t), "Thursday February 29, 060 PM 01 %");
    }

    #[test]
    fn tojson_like_python() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(ensure_ascii=True) }}|{{ x | tojson(sort_keys=true, separators=[',', ':']) }}"
                .into(),
            None,
            None,
        )
        .unwrap();
        let mut req = ChatRequest::single_user("hi");
        req.kwargs.insert("x".into(), serde_json::json!({"b": [1, 2.5, null, true], "a": "<é>\n", "e": {}, "l": []}));
        let out = t.render(&req).unwrap();
        let parts: Vec<&str> = out.split('|').collect();
        assert_eq!(parts[0], r#"{"b": [1, 2.5, null, true], "a": "<é>\n", "e": {}, "l": []}"#);
        assert_eq!(
            parts[1],
            "{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": \"<é>\\n\",\n  \"e\": {},\n  \"l\": []\n}"
        );
        assert_eq!(parts[2], r#"{"b": [1, 2.5, null, true], "a": "<\u00e9>\n", "e": {}, "l": []}"#);
        assert_eq!(parts[3], r#"{"a":"<é>\n","b":[1,2.5,null,true],"e":{},"l":[]}"#);
    }

    #[test]
    fn prints_like_python() {
        let t =
            ChatTemplate::new("{{ n }} {{ t }} {{ l }} {{ d }} {{ f }} [{{ missing }}]".into(), None, None).unwrap();
        let mut req = ChatRequest::single_user("hi");
        req.kwargs.insert("n".into(), serde_json::Value::Null);
        req.kwargs.insert("t".into(), serde_json::json!(true));
        req.kwargs.insert("l".into(), serde_json::json!(["a", "it's", 1]));
        req.kwargs.insert("d".into(), serde_json::json!({"k": 1.0}));
        req.kwargs.insert("f".into(), serde_json::json!(1e20));
        assert_eq!(t.render(&req).unwrap(), r#"None True ['a', "it's", 1] {'k': 1.0} 1e+20 []"#);
    }

    #[test]
    fn generation_tags_are_transparent() {
        let src = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(src.into(), None, None).unwrap();
        assert_eq!(t.render(&ChatRequest::single_user("x")).unwrap(), "x");
    }

    /// A template that loops without end, or writes without end, fails with a clear error.
    #[test]
    fn runaway_templates_are_stopped() {
        let forever = "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}";
        let e = ChatTemplate::new(forever.into(), None, None).unwrap().render(&ChatRequest::single_user("x"));
        assert!(e.as_ref().is_err_and(|e| e.to_string().contains("fuel")), "{e:?}");
        let huge = "{% for i in range(1000) %}{{ 'x' * 1000000 }}{% endfor %}";
        let e = ChatTemplate::new(huge.into(), None, None).unwrap().render(&ChatRequest::single_user("x"));
        assert!(e.as_ref().is_err_and(|e| e.to_string().contains("longer than")), "{e:?}");
    }

    /// Found by fuzzing: `{%}` (the `%` of the opening `{%` taken for the closing `%}`) made the
    /// rewriting slice backwards and panic.
    #[test]
    fn a_tag_whose_marks_overlap_is_a_syntax_error_not_a_panic() {
        for src in ["{%}", "{%}{% endmacro %}", "x{%}}{{ 1 }}", "{%%}", "{%-%}"] {
            assert!(ChatTemplate::new(src.into(), None, None).is_err(), "{src:?}");
        }
    }
}
