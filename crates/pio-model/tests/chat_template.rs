//! Chat-template tests: byte-for-byte equality with transformers' `apply_chat_template` output
//! for the Qwen3 template (`tests/data/chat_template/qwen3_cases.json`) and the GLM-4.7-Flash
//! template (`glm47_cases.json`), plus request parsing and error surfacing.

use std::path::PathBuf;

use pio_model::chat_template::{ChatRequest, ChatTemplate};
use pio_model::error::Error;
use pio_model::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn read_json(rel: &str) -> Value {
    serde_json::from_slice(&std::fs::read(data_dir().join(rel)).unwrap()).unwrap()
}

/// The request of one fixture case: messages, add_generation_prompt, optional tools and
/// optional enable_thinking (passed as a chat_template_kwargs entry only when present).
fn request_of(case: &Value) -> ChatRequest {
    let mut kwargs = serde_json::Map::new();
    if let Some(t) = case.get("enable_thinking") {
        kwargs.insert("enable_thinking".into(), t.clone());
    }
    ChatRequest {
        messages: case["messages"].as_array().unwrap().clone(),
        tools: case.get("tools").map(|t| t.as_array().unwrap().clone()),
        add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
        kwargs,
    }
}

fn qwen3_template() -> ChatTemplate {
    let config = read_json("qwen3-tokenizer/tokenizer_config.json");
    ChatTemplate::new(config["chat_template"].as_str().unwrap().to_string(), None, Some("<|im_end|>".into())).unwrap()
}

#[test]
fn qwen3_cases_render_like_transformers() {
    let template = qwen3_template();
    let cases = read_json("chat_template/qwen3_cases.json");
    let cases = cases.as_array().unwrap();
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let rendered = template.render(&request_of(case)).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "qwen3 case {i}");
    }
}

#[test]
fn qwen3_template_from_tokenizer_dir() {
    let tok = Tokenizer::from_hf_dir(&data_dir().join("qwen3-tokenizer")).unwrap();
    let template = tok.chat_template().unwrap();
    assert_eq!(template.eos_token(), Some("<|im_end|>"));
    assert_eq!(template.bos_token(), None);
    let rendered = template.render(&ChatRequest::single_user("Hello!")).unwrap();
    assert_eq!(rendered, "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn glm47_cases_render_like_transformers() {
    let source =
        std::fs::read_to_string(data_dir().join("chat_template/chat_template.from_dart_comment.jinja")).unwrap();
    let template = ChatTemplate::new(source, None, Some("<|endoftext|>".into())).unwrap();
    let fixture = read_json("chat_template/glm47_cases.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let rendered = template.render(&request_of(case)).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "glm47 case {i}");
    }
}

#[test]
fn openai_body_is_parsed() {
    let body = json!({
        "model": "x",
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
            ]}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        "chat_template_kwargs": {"enable_thinking": false},
    });
    let req = ChatRequest::from_openai_json(&body).unwrap();
    assert_eq!(req.messages.len(), 2);
    assert!(req.add_generation_prompt);
    assert_eq!(req.tools.as_ref().map(Vec::len), Some(1));
    assert_eq!(req.kwargs.get("enable_thinking"), Some(&json!(false)));
    assert_eq!(
        req.messages[1]["tool_calls"][0]["function"]["arguments"],
        json!({"city": "Paris"}),
        "JSON-string arguments are parsed into an object"
    );

    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": false});
    let req = ChatRequest::from_openai_json(&body).unwrap();
    assert!(!req.add_generation_prompt);
    assert!(req.tools.is_none());
    assert!(req.kwargs.is_empty());
    assert_eq!(qwen3_template().render(&req).unwrap(), "<|im_start|>user\nHi<|im_end|>\n");
}

#[test]
fn malformed_bodies_are_errors() {
    for body in [
        json!({}),
        json!({"messages": null}),
        json!({"messages": "hello"}),
        json!({"messages": {"role": "user"}}),
        json!({"messages": ["hello"]}),
        json!({"messages": [], "tools": {}}),
        json!({"messages": [], "add_generation_prompt": "yes"}),
        json!({"messages": [], "chat_template_kwargs": [1]}),
        json!([1, 2]),
    ] {
        let err = ChatRequest::from_openai_json(&body).unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{body}: {err:?}");
    }
    let err = ChatRequest::from_openai_json(&json!({"messages": 3})).unwrap_err();
    assert!(err.to_string().contains("messages"), "{err}");
    for (body, what) in [
        (json!({"messages": []}), "empty"),
        (json!({"messages": [{"content": "hi"}]}), "role"),
        (json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}), "image_url"),
        (json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}), "text"),
    ] {
        let err = ChatRequest::from_openai_json(&body).unwrap_err();
        assert!(err.to_string().contains(what), "{body}: {err}");
    }
}

#[test]
fn text_content_parts_are_joined() {
    let body = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]}]});
    let req = ChatRequest::from_openai_json(&body).unwrap();
    assert_eq!(req.messages[0]["content"], "Say\nhi");
}

#[test]
fn image_parts_become_placeholders_for_a_vision_model_only() {
    let body = json!({"messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:a"}},
            {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": "data:b"},
            {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///c"}}]}]});
    let (req, urls) = ChatRequest::from_openai_json_with_images(&body, Some("<I>"), false).unwrap();
    assert_eq!(req.messages[0]["content"], "<I>and<I>?");
    assert_eq!(req.messages[2]["content"], "<I>");
    assert_eq!(urls, ["data:a", "data:b", "file:///c"]);
    let err = ChatRequest::from_openai_json(&body).unwrap_err();
    assert!(err.to_string().contains("\"image_url\" are not supported by this model"), "{err}");
    let bad = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"u": 1}}]}]});
    assert!(ChatRequest::from_openai_json_with_images(&bad, Some("<I>"), false).is_err());
}

/// A template that walks lists of parts itself, in the Qwen-VL templates' way (written for this
/// test: a string is written as it is, a list part by part, an image as its vision tokens).
const PARTS_TEMPLATE: &str = "{%- macro render(content) %}{%- if content is string %}{{- content }}\
    {%- else %}{%- for item in content %}{%- if 'image_url' in item or item.type == 'image' %}[img]\
    {%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}\
    {%- for m in messages %}<{{ m.role }}>{{ render(m.content) }};{%- endfor %}";

#[test]
fn a_template_that_walks_content_lists_gets_them() {
    let template = ChatTemplate::new(PARTS_TEMPLATE.into(), None, None).unwrap();
    assert!(template.walks_content_parts());
    let body = json!({"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "A"},
            {"type": "text", "text": "B"},
            {"type": "image_url", "image_url": {"url": "data:a"}},
            {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "ok"}]});
    // The parts reach the template as a list: its own join (none) and its own image marks.
    let (req, urls) = ChatRequest::from_openai_json_with_images(&body, Some("<I>"), true).unwrap();
    assert_eq!(template.render(&req).unwrap(), "<user>AB[img]?;<assistant>ok;");
    assert_eq!(urls, ["data:a"]);
    // Joined for a template that does not walk them.
    let (req, _) = ChatRequest::from_openai_json_with_images(&body, Some("<I>"), false).unwrap();
    assert_eq!(template.render(&req).unwrap(), "<user>A\nB<I>?;<assistant>ok;");
    // Parts are checked either way; images only for a model that takes them.
    let bad = json!({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]});
    assert!(ChatRequest::from_openai_json_with_images(&bad, Some("<I>"), true).is_err());
    assert!(ChatRequest::from_openai_json_with_images(&body, None, true).is_err());
    // The loop forms that count, and templates that only read `content` as a string.
    for (source, walks) in [
        ("{% for c in message['content'] %}{{ c.text }}{% endfor %}", true),
        ("{%- for part in m.content -%}{{ part.text }}{%- endfor %}", true),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", false),
        ("{% for c in contents %}{% endfor %}{{ content }}", false),
    ] {
        assert_eq!(ChatTemplate::new(source.into(), None, None).unwrap().walks_content_parts(), walks, "{source}");
    }
    // The Qwen3 template (the text model's) reads a list as no text: it keeps the join.
    let tok = Tokenizer::from_hf_dir(&data_dir().join("qwen3-tokenizer")).unwrap();
    assert!(!tok.chat_template().unwrap().walks_content_parts());
}

#[test]
fn raise_exception_surfaces_as_error() {
    let template = ChatTemplate::new(
        "{% if messages[0].role != 'system' %}{{ raise_exception('System message required!') }}{% endif %}ok".into(),
        None,
        None,
    )
    .unwrap();
    let err = template.render(&ChatRequest::single_user("hi")).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err:?}");
    assert!(err.to_string().contains("System message required!"), "{err}");
}

#[test]
fn syntax_error_is_a_template_error() {
    let err = ChatTemplate::new("{% for m in messages %}".into(), None, None).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err:?}");
}

#[test]
fn undefined_and_kwargs_follow_jinja2() {
    let template = ChatTemplate::new(
        "{{ enable_thinking is defined }}|{{ enable_thinking }}|{{ tools is none }}|{{ bos_token }}|{{ eos_token }}|{{ x | tojson if x is defined }}".into(),
        Some("<s>".into()),
        None,
    )
    .unwrap();
    let mut req = ChatRequest::single_user("hi");
    assert_eq!(template.render(&req).unwrap(), "False||True|<s>||");
    req.kwargs.insert("enable_thinking".into(), json!(true));
    req.kwargs.insert("x".into(), json!({"k": "<&>"}));
    assert_eq!(template.render(&req).unwrap(), "True|True|True|<s>||{\"k\": \"<&>\"}");
}

#[test]
fn python_string_methods_and_strftime() {
    let template = ChatTemplate::new(
        "{{ '  a,b  '.strip().split(',') | join('+') }}|{{ 'xyz'.startswith('x') }}|{{ 'a-b'.replace('-', '_') }}|{{ strftime_now('%Y') | length }}".into(),
        None,
        None,
    )
    .unwrap();
    assert_eq!(template.render(&ChatRequest::single_user("hi")).unwrap(), "a+b|True|a_b|4");
}
