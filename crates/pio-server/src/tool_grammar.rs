//! `tool_choice: "required"` and a named function, enforced: a Lark grammar (llguidance's
//! dialect) that only lets the model write calls in its own family's markup, each naming one
//! of the request's tools with arguments valid under that tool's `parameters` schema, as
//! vLLM does for these choices with its structured-output backends.
//!
//! The grammar follows the markup the chat templates teach the models (see
//! [`ToolCallParser`]), so a forced call reads to the model like one it chose to make, and the
//! same parser turns it into OpenAI's `tool_calls`:
//! - `hermes`: `<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>`, the object held
//!   to a JSON schema with one branch per tool;
//! - `qwen3_coder`: `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n...
//!   </function>\n</tool_call>`, string values free text, others JSON under their schema;
//! - `glm47`: `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...</tool_call>`.
//!
//! In the last two, parameters come in the order of the schema's `properties`, the required
//! ones always and the others optionally. A model that reasons may first close (or open and
//! close) its `<think>` block.

use serde_json::{json, Value};

use crate::tool_parser::ToolCallParser;
use crate::wire::Tool;

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the tools are only shown to the model (its markup comes back as content).
    None,
    /// The model chooses (the default when tools are given).
    Auto,
    /// At least one call.
    Required,
    /// One call of this function.
    Function(String),
}

impl ToolChoice {
    /// Reads OpenAI's `tool_choice`: `"none"`, `"auto"`, `"required"` or
    /// `{"type": "function", "function": {"name": NAME}}`.
    pub fn from_json(v: &Value) -> Result<ToolChoice, String> {
        match v {
            Value::String(s) => match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                other => Err(format!(
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \
                     \"function\": {{\"name\": ...}}}}, got {other:?}"
                )),
            },
            Value::Object(o) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or(
                        "`tool_choice` as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )?;
                Ok(ToolChoice::Function(name.to_string()))
            }
            _ => Err("`tool_choice` must be a string or an object".into()),
        }
    }
}

/// One tool of a request: its function's name and parameters schema.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub parameters: Value,
}

/// Most tools one request may give.
pub const MAX_TOOLS: usize = 256;

/// Checks a request's `tools` (their shape is typed by [`Tool`]): names of letters, digits, `_`,
/// `-` and `.`, each once, and parameters that are an object schema. The messages say what is
/// wrong, for a 400 naming `tools`.
pub fn read_tools(tools: &[Tool]) -> Result<Vec<ToolSpec>, String> {
    if tools.len() > MAX_TOOLS {
        return Err(format!("at most {MAX_TOOLS} tools are accepted, {} were given", tools.len()));
    }
    let mut out: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let at = |what: &str| format!("`tools[{i}]`: {what}");
        let name = t.function.name.as_str();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            return Err(at("`function.name` must be a non-empty string of letters, digits, `_`, `-` and `.`"));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(at(&format!("the function `{name}` is given twice")));
        }
        let parameters = match &t.function.parameters {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(po)) => {
                match po.get("type") {
                    None => {}
                    Some(Value::String(s)) if s == "object" => {}
                    Some(_) => return Err(at("`function.parameters` must be a JSON schema of type \"object\"")),
                }
                if po.get("properties").is_some_and(|p| !p.is_object()) {
                    return Err(at("`function.parameters.properties` must be an object"));
                }
                p.clone()
            }
            Some(_) => return Err(at("`function.parameters` must be a JSON schema (an object)")),
        };
        out.push(ToolSpec { name: name.to_string(), parameters });
    }
    Ok(out)
}

/// How much reasoning may come before the calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reasoning {
    /// None: the answer starts with a call.
    Off,
    /// The prompt leaves a `<think>` block open: the answer first closes it.
    Open,
    /// The answer may start with a whole `<think>...</think>` block.
    Optional,
}

/// The grammar that makes the answer calls of `tools` (only `only` when given), one call when
/// `one`, otherwise one or more.
pub fn call_grammar(
    parser: ToolCallParser,
    tools: &[ToolSpec],
    only: Option<&str>,
    one: bool,
    reasoning: Reasoning,
) -> Result<String, String> {
    let chosen: Vec<&ToolSpec> = tools.iter().filter(|t| only.is_none_or(|n| t.name == n)).collect();
    if chosen.is_empty() {
        return Err(match only {
            Some(n) => format!("`tool_choice` names the function `{n}`, which is not among `tools`"),
            None => "`tool_choice` \"required\" needs at least one tool in `tools`".into(),
        });
    }
    let mut g = String::new();
    g.push_str(match reasoning {
        Reasoning::Off => "start: calls\n",
        Reasoning::Open => "start: think_rest ws calls\n",
        Reasoning::Optional => "start: think? ws calls\n",
    });
    g.push_str("think[lazy]: /<think>(.|\\n)*<\\/think>/\n");
    g.push_str("think_rest[lazy]: /(.|\\n)*<\\/think>/\n");
    g.push_str("ws: /[ \\t\\n]*/\n");
    g.push_str(if one { "calls: call\n" } else { "calls: call (ws call)*\n" });
    let alts: Vec<String> = (0..chosen.len()).map(|i| format!("f{i}")).collect();
    match parser {
        ToolCallParser::Hermes => {
            // One JSON grammar per tool, so that each keeps its own `$defs` at its root.
            g.push_str(&format!("call: \"<tool_call>\\n\" ({}) \"\\n</tool_call>\"\n", alts.join(" | ")));
            for (i, t) in chosen.iter().enumerate() {
                let mut schema = json!({"type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                    "required": ["name", "arguments"], "additionalProperties": false});
                with_definitions(&mut schema, &t.parameters);
                g.push_str(&format!("f{i}: %json {schema}\n"));
            }
        }
        ToolCallParser::Qwen3Coder => {
            g.push_str(&format!("call: \"<tool_call>\\n\" ({}) \"</tool_call>\"\n", alts.join(" | ")));
            g.push_str("sval[lazy]: /(.|\\n)*\\n<\\/parameter>/\n");
            for (i, t) in chosen.iter().enumerate() {
                let mut rule = format!("f{i}: {} ", lit(&format!("<function={}>\n", t.name)));
                for (j, (key, schema, required)) in params(&t.parameters).into_iter().enumerate() {
                    let name = format!("f{i}p{j}");
                    let open = lit(&format!("<parameter={key}>\n"));
                    match value_rule(schema, &t.parameters) {
                        ArgValue::Text => g.push_str(&format!("{name}: {open} sval \"\\n\"\n")),
                        ArgValue::Rule(v) => g.push_str(&format!("{name}: {open} {v} \"\\n</parameter>\\n\"\n")),
                    }
                    rule.push_str(&name);
                    rule.push_str(if required { " " } else { "? " });
                }
                rule.push_str("\"</function>\\n\"\n");
                g.push_str(&rule);
            }
        }
        ToolCallParser::Glm47 => {
            g.push_str(&format!("call: \"<tool_call>\" ({}) \"</tool_call>\"\n", alts.join(" | ")));
            g.push_str("aval[lazy]: /(.|\\n)*<\\/arg_value>/\n");
            for (i, t) in chosen.iter().enumerate() {
                let mut rule = format!("f{i}: {} ", lit(&t.name));
                for (j, (key, schema, required)) in params(&t.parameters).into_iter().enumerate() {
                    let name = format!("f{i}p{j}");
                    let open = lit(&format!("<arg_key>{key}</arg_key><arg_value>"));
                    match value_rule(schema, &t.parameters) {
                        ArgValue::Text => g.push_str(&format!("{name}: {open} aval\n")),
                        ArgValue::Rule(v) => g.push_str(&format!("{name}: {open} {v} \"</arg_value>\"\n")),
                    }
                    rule.push_str(&name);
                    rule.push_str(if required { " " } else { "? " });
                }
                rule.push('\n');
                g.push_str(&rule);
            }
        }
    }
    Ok(g)
}

/// A Lark string literal (its escapes are JSON's).
fn lit(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The parameters of a `parameters` schema: (name, schema, required), in `properties` order.
fn params(schema: &Value) -> Vec<(&str, &Value, bool)> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map_or(Vec::new(), |r| r.iter().filter_map(Value::as_str).collect());
    let Some(props) = schema.get("properties").and_then(Value::as_object) else { return Vec::new() };
    props.iter().map(|(k, v)| (k.as_str(), v, required.contains(&k.as_str()))).collect()
}

/// How a parameter's value is written between its tags.
enum ArgValue {
    /// Free text up to the closing tag (a string parameter, as the templates write strings
    /// bare).
    Text,
    /// This grammar expression.
    Rule(String),
}

/// How parameter `schema` of a tool whose parameters are `parameters` is written.
fn value_rule(schema: &Value, parameters: &Value) -> ArgValue {
    // A string enum: one of its values, bare.
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.is_empty() && values.iter().all(Value::is_string) {
            let alts: Vec<String> = values.iter().filter_map(Value::as_str).map(lit).collect();
            return ArgValue::Rule(format!("({})", alts.join(" | ")));
        }
    }
    // A string (or a string or null, as optional parameters are often typed): bare text, as the
    // parsers read it.
    let string = match schema.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "string"),
        _ => false,
    };
    if string {
        return ArgValue::Text;
    }
    let mut schema = schema.clone();
    with_definitions(&mut schema, parameters);
    ArgValue::Rule(format!("%json {schema}"))
}

/// Copies the definitions of `parameters` (`$defs`, `definitions`) to the root of `schema`, a
/// schema built from parts of it, so its `#/$defs/...` references still resolve.
fn with_definitions(schema: &mut Value, parameters: &Value) {
    for key in ["$defs", "definitions"] {
        if let (Some(defs), Some(o)) = (parameters.get(key), schema.as_object_mut()) {
            o.entry(key).or_insert_with(|| defs.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::OnceLock;

    use pio_engine::guided::{Guide, GuideFactory};
    use pio_model::tokenizer::Tokenizer;

    use super::*;

    fn tokenizer() -> &'static (Tokenizer, GuideFactory) {
        static T: OnceLock<(Tokenizer, GuideFactory)> = OnceLock::new();
        T.get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pio-model/tests/data/qwen3-tokenizer");
            let tok = Tokenizer::from_hf_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
            let eos = tok.eos_token_ids()[0];
            let f = GuideFactory::new(&tok, tok.vocab_size(), eos).unwrap_or_else(|e| panic!("{e}"));
            (tok, f)
        })
    }

    /// Whether the grammar lets the model write exactly `text` (token by token, then end).
    fn accepts(grammar: &str, text: &str) -> bool {
        let (tok, f) = tokenizer();
        let mut g = f.matcher(&Guide::Lark(grammar.to_string())).unwrap_or_else(|e| panic!("{e}\n{grammar}"));
        let eos = tok.eos_token_ids()[0];
        let mut logits = vec![0f32; tok.vocab_size()];
        for t in tok.encode(text, false).unwrap_or_else(|e| panic!("{e}")) {
            logits.fill(0.0);
            if g.mask(&mut logits, |x| x == eos).is_err() || !logits[t as usize].is_finite() {
                return false;
            }
            if g.consume(t).is_err() {
                return false;
            }
        }
        logits.fill(0.0);
        match g.mask(&mut logits, |x| x == eos) {
            Ok(true) => logits[eos as usize].is_finite(),
            Ok(false) => true,
            Err(_) => false,
        }
    }

    fn list(v: Value) -> Vec<Tool> {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    fn tools() -> Vec<ToolSpec> {
        read_tools(&list(json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}}},
            {"type": "function", "function": {"name": "now"}}
        ])))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn hermes_calls_are_held_to_the_tools() {
        let g = call_grammar(ToolCallParser::Hermes, &tools(), None, false, Reasoning::Off).unwrap_or_default();
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
        assert!(accepts(&g, call), "{g}");
        assert!(accepts(&g, &format!("{call}\n<tool_call>\n{{\"name\": \"now\", \"arguments\": {{}}}}\n</tool_call>")));
        assert!(!accepts(&g, "The weather is nice."));
        assert!(!accepts(&g, "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"));
        // A required parameter missing, a value outside the enum.
        assert!(!accepts(
            &g,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        ));
        assert!(!accepts(
            &g,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"kelvin\"}}\n</tool_call>"
        ));
        // Named: only that function, once.
        let g = call_grammar(ToolCallParser::Hermes, &tools(), Some("now"), true, Reasoning::Off).unwrap_or_default();
        assert!(accepts(&g, "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"));
        assert!(!accepts(&g, call));
        assert!(!accepts(&g, "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"));
    }

    #[test]
    fn qwen3_coder_and_glm_calls_are_held_to_the_tools() {
        let t = tools();
        let g = call_grammar(ToolCallParser::Qwen3Coder, &t, None, false, Reasoning::Off).unwrap_or_default();
        let call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>";
        assert!(accepts(&g, call), "{g}");
        let parsed = ToolCallParser::Qwen3Coder.parse(call, &t);
        assert_eq!(parsed.calls.len(), 1);
        assert_eq!(
            serde_json::from_str::<Value>(&parsed.calls[0].arguments).ok(),
            Some(json!({"city": "New\nYork", "days": 3, "unit": "celsius"}))
        );
        assert!(accepts(&g, "<tool_call>\n<function=now>\n</function>\n</tool_call>"));
        assert!(!accepts(
            &g,
            "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>"
        ));
        assert!(!accepts(
            &g,
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
        ));
        let g = call_grammar(ToolCallParser::Glm47, &t, None, true, Reasoning::Off).unwrap_or_default();
        assert!(accepts(&g, "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value><arg_key>unit</arg_key><arg_value>celsius</arg_value></tool_call>"), "{g}");
        assert!(!accepts(&g, "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>"));
        assert!(!accepts(&g, "Sure."));
    }

    #[test]
    fn references_and_nullable_strings() {
        let t = read_tools(&list(json!([{"type": "function", "function": {"name": "book", "parameters": {
            "type": "object",
            "$defs": {"date": {"type": "object", "properties": {"day": {"type": "integer"}}, "required": ["day"]}},
            "properties": {"when": {"$ref": "#/$defs/date"}, "note": {"type": ["string", "null"]}},
            "required": ["when"]}}}])))
        .unwrap_or_else(|e| panic!("{e}"));
        let g = call_grammar(ToolCallParser::Hermes, &t, None, true, Reasoning::Off).unwrap_or_default();
        assert!(
            accepts(&g, "<tool_call>\n{\"name\": \"book\", \"arguments\": {\"when\": {\"day\": 3}}}\n</tool_call>"),
            "{g}"
        );
        assert!(!accepts(
            &g,
            "<tool_call>\n{\"name\": \"book\", \"arguments\": {\"when\": {\"day\": \"x\"}}}\n</tool_call>"
        ));
        let g = call_grammar(ToolCallParser::Qwen3Coder, &t, None, true, Reasoning::Off).unwrap_or_default();
        let call = "<tool_call>\n<function=book>\n<parameter=when>\n{\"day\": 3}\n</parameter>\n<parameter=note>\nby the window\n</parameter>\n</function>\n</tool_call>";
        assert!(accepts(&g, call), "{g}");
        let args = &ToolCallParser::Qwen3Coder.parse(call, &t).calls[0].arguments;
        assert_eq!(
            serde_json::from_str::<Value>(args).ok(),
            Some(json!({"when": {"day": 3}, "note": "by the window"}))
        );
    }

    #[test]
    fn reasoning_may_come_first() {
        let call = "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let g = call_grammar(ToolCallParser::Hermes, &tools(), None, false, Reasoning::Optional).unwrap_or_default();
        assert!(accepts(&g, call));
        assert!(accepts(&g, &format!("<think>\nThe user wants the time.\n</think>\n\n{call}")));
        assert!(!accepts(&g, "<think>\nhm\n</think>\n\nIt is noon."));
        let g = call_grammar(ToolCallParser::Hermes, &tools(), None, false, Reasoning::Open).unwrap_or_default();
        assert!(accepts(&g, &format!("Time, then.\n</think>\n\n{call}")));
        assert!(!accepts(&g, call));
    }

    #[test]
    fn bad_tools_and_choices_are_refused() {
        for bad in [json!({}), json!([{"type": "function"}]), json!([{"type": "retrieval", "function": {"name": "x"}}])]
        {
            assert!(serde_json::from_value::<Vec<Tool>>(bad.clone()).is_err(), "{bad}");
        }
        for bad in [
            json!([{"type": "function", "function": {"name": "a b"}}]),
            json!([{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]),
            json!([{"type": "function", "function": {"name": "x"}}, {"type": "function", "function": {"name": "x"}}]),
        ] {
            assert!(read_tools(&list(bad.clone())).is_err(), "{bad}");
        }
        let many: Vec<Value> =
            (0..=MAX_TOOLS).map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}})).collect();
        assert!(read_tools(&list(Value::Array(many))).is_err_and(|e| e.contains("at most")));
        for bad in [json!("always"), json!(3), json!({"type": "function"}), json!({"function": {"name": "x"}})] {
            assert!(ToolChoice::from_json(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            ToolChoice::from_json(&json!({"type": "function", "function": {"name": "now"}})),
            Ok(ToolChoice::Function("now".into()))
        );
        assert!(call_grammar(ToolCallParser::Hermes, &tools(), Some("nope"), true, Reasoning::Off).is_err());
        assert!(call_grammar(ToolCallParser::Hermes, &[], None, false, Reasoning::Off).is_err());
    }
}
