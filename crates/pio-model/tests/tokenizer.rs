//! Tokenizer tests against the Hugging Face `tokenizers` reference ids for the Qwen3 tokenizer
//! (`tests/data/tokenizer/qwen3_cases.json`), through both loaders: the Hugging Face directory
//! and a GGUF-style vocabulary rebuilt from the same `tokenizer.json`.

use std::path::PathBuf;

use pio_model::error::Error;
use pio_model::tokenizer::{token_type, GgufVocab, Tokenizer};
use serde::Deserialize;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn qwen3_dir() -> PathBuf {
    data_dir().join("qwen3-tokenizer")
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    ids_with_special: Vec<u32>,
    decoded: String,
}

fn cases() -> Vec<Case> {
    let path = data_dir().join("tokenizer/qwen3_cases.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A GGUF vocabulary as `convert_hf_to_gguf.py` would write it for `tokenizer.json`: tokens
/// ordered by id, merges as `"a b"`, special added tokens as control tokens, other added
/// tokens as user-defined ones (or all added tokens as control when `all_control`).
fn gguf_vocab_from_tokenizer_json(all_control: bool) -> GgufVocab {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(qwen3_dir().join("tokenizer.json")).unwrap()).unwrap();
    let model = &json["model"];
    let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
    let mut put = |id: usize, text: &str, ty: i32| {
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((text.to_string(), ty));
    };
    for (text, id) in model["vocab"].as_object().unwrap() {
        put(id.as_u64().unwrap() as usize, text, token_type::NORMAL);
    }
    for t in json["added_tokens"].as_array().unwrap() {
        let special = t["special"].as_bool().unwrap();
        let ty = if special || all_control { token_type::CONTROL } else { token_type::USER_DEFINED };
        put(t["id"].as_u64().unwrap() as usize, t["content"].as_str().unwrap(), ty);
    }
    let (mut tokens, mut token_types) = (Vec::new(), Vec::new());
    for (i, slot) in by_id.into_iter().enumerate() {
        let (text, ty) = slot.unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED));
        tokens.push(text);
        token_types.push(ty);
    }
    let merges = model["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(pair) => {
                format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap())
            }
            other => panic!("unexpected merge {other}"),
        })
        .collect();
    let id = |t: &str| tokens.iter().position(|x| x == t).map(|i| i as u32);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(qwen3_dir().join("tokenizer_config.json")).unwrap()).unwrap();
    GgufVocab {
        model: "gpt2".into(),
        pre: Some("qwen2".into()),
        bos_token_id: id("<|endoftext|>"),
        eos_token_id: id("<|im_end|>"),
        eot_token_id: None,
        add_bos_token: false,
        chat_template: config["chat_template"].as_str().map(str::to_string),
        tokens,
        token_types,
        merges,
    }
}

#[test]
fn hf_dir_matches_reference_ids() {
    let tok = Tokenizer::from_hf_dir(&qwen3_dir()).unwrap();
    for case in cases() {
        assert_eq!(tok.encode(&case.text, false).unwrap(), case.ids, "ids of {:?}", case.text);
        assert_eq!(
            tok.encode(&case.text, true).unwrap(),
            case.ids_with_special,
            "ids with special tokens of {:?}",
            case.text
        );
        assert_eq!(tok.decode(&case.ids, false).unwrap(), case.decoded, "decode of {:?}", case.text);
    }
}

#[test]
fn hf_dir_special_tokens_and_metadata() {
    let tok = Tokenizer::from_hf_dir(&qwen3_dir()).unwrap();
    assert_eq!(tok.vocab_size(), 151_669);
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let think = tok.token_to_id("<think>").unwrap();
    assert_eq!((im_start, im_end, think), (151_644, 151_645, 151_667));
    assert_eq!(tok.id_to_token(im_end).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.bos_token_id(), None);
    assert_eq!(tok.eos_token_ids(), vec![im_end]);
    assert!(tok.is_special(im_start));
    assert!(!tok.is_special(think), "<think> is an added token but not a special one");
    assert!(!tok.is_special(tok.token_to_id("Hello").unwrap()));
    assert!(tok.chat_template().is_some());

    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&im_start));
    assert_eq!(ids.last(), Some(&im_end));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn gguf_vocab_matches_reference_ids() {
    let vocab = gguf_vocab_from_tokenizer_json(false);
    let n_tokens = vocab.tokens.len();
    let gguf = Tokenizer::from_gguf_vocab(vocab).unwrap();
    let hf = Tokenizer::from_hf_dir(&qwen3_dir()).unwrap();
    assert_eq!(gguf.vocab_size(), n_tokens);
    assert_eq!(gguf.vocab_size(), hf.vocab_size());
    for case in cases() {
        assert_eq!(gguf.encode(&case.text, false).unwrap(), case.ids, "ids of {:?}", case.text);
        assert_eq!(
            gguf.encode(&case.text, true).unwrap(),
            case.ids_with_special,
            "ids with special tokens of {:?} (add_bos_token false: no BOS)",
            case.text
        );
        assert_eq!(gguf.decode(&case.ids, false).unwrap(), case.decoded, "decode of {:?}", case.text);
        assert_eq!(
            gguf.decode(&case.ids, true).unwrap(),
            hf.decode(&case.ids, true).unwrap(),
            "decode skipping special tokens of {:?}",
            case.text
        );
    }
    for id in [151_643, 151_644, 151_645, 151_667, 9707] {
        assert_eq!(gguf.is_special(id), hf.is_special(id), "is_special({id})");
        assert_eq!(gguf.id_to_token(id), hf.id_to_token(id));
    }
    assert_eq!(gguf.eos_token_ids(), vec![151_645]);
    let template = gguf.chat_template().unwrap();
    assert_eq!(template.eos_token(), Some("<|im_end|>"));
}

#[test]
fn gguf_vocab_all_added_tokens_as_control() {
    let gguf = Tokenizer::from_gguf_vocab(gguf_vocab_from_tokenizer_json(true)).unwrap();
    for case in cases() {
        assert_eq!(gguf.encode(&case.text, false).unwrap(), case.ids, "ids of {:?}", case.text);
    }
    assert!(gguf.is_special(151_667));
}

#[test]
fn gguf_bos_and_eot() {
    let mut vocab = gguf_vocab_from_tokenizer_json(false);
    vocab.add_bos_token = true;
    vocab.eot_token_id = Some(151_643);
    let gguf = Tokenizer::from_gguf_vocab(vocab).unwrap();
    let bos = gguf.bos_token_id().unwrap();
    assert_eq!(gguf.encode("Hello, world!", true).unwrap(), vec![bos, 9707, 11, 1879, 0]);
    assert_eq!(gguf.encode("Hello, world!", false).unwrap(), vec![9707, 11, 1879, 0]);
    assert_eq!(gguf.eos_token_ids(), vec![151_645, 151_643]);
}

#[test]
fn gguf_smollm_and_gpt2_pre_tokenizers_build() {
    // A tiny byte-level vocabulary: all 256 byte symbols plus a few merges.
    let mut tokens: Vec<String> = Vec::new();
    for b in 0u8..=255 {
        let c = match b {
            b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff => char::from(b),
            _ => {
                let k = tokens.iter().filter(|t| t.chars().next().unwrap() as u32 >= 256).count();
                char::from_u32(256 + k as u32).unwrap()
            }
        };
        tokens.push(c.to_string());
    }
    tokens.extend(["12".to_string(), "Ġa".to_string(), "<|end|>".to_string()]);
    let merges = vec!["1 2".to_string(), "Ġ a".to_string()];
    let mut token_types = vec![token_type::NORMAL; tokens.len()];
    *token_types.last_mut().unwrap() = token_type::CONTROL;
    let base = GgufVocab {
        model: "gpt2".into(),
        tokens,
        token_types,
        merges,
        eos_token_id: Some(258),
        ..GgufVocab::default()
    };
    let smollm = Tokenizer::from_gguf_vocab(GgufVocab { pre: Some("smollm".into()), ..base.clone() }).unwrap();
    let gpt2 = Tokenizer::from_gguf_vocab(GgufVocab { pre: Some("gpt2".into()), ..base.clone() }).unwrap();
    let llama = Tokenizer::from_gguf_vocab(GgufVocab { pre: Some("llama-bpe".into()), ..base.clone() }).unwrap();
    let default = Tokenizer::from_gguf_vocab(GgufVocab { pre: None, ..base }).unwrap();
    // smollm isolates digits so "12" cannot merge; gpt2 keeps the number together.
    assert_eq!(smollm.encode("12 a<|end|>", false).unwrap(), vec![u32::from(b'1'), u32::from(b'2'), 257, 258]);
    assert_eq!(gpt2.encode("12 a<|end|>", false).unwrap(), vec![256, 257, 258]);
    assert_eq!(llama.encode("12 a<|end|>", false).unwrap(), vec![256, 257, 258]);
    assert_eq!(default.encode("12 a", false).unwrap(), vec![256, 257]);
    assert_eq!(gpt2.decode(&[256, 257, 258], false).unwrap(), "12 a<|end|>");
    assert_eq!(gpt2.decode(&[256, 257, 258], true).unwrap(), "12 a");
    assert_eq!(gpt2.eos_token_ids(), vec![258]);
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let dir = data_dir().join("no-such-tokenizer-dir");
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(msg.contains(&dir.join("tokenizer.json").display().to_string()), "{msg}");
}

#[test]
fn unknown_pre_tokenizer_is_named() {
    let vocab = GgufVocab {
        model: "gpt2".into(),
        pre: Some("frobnicator-7".into()),
        tokens: vec!["a".into()],
        ..GgufVocab::default()
    };
    let err = Tokenizer::from_gguf_vocab(vocab).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
    assert!(err.to_string().contains("frobnicator-7"), "{err}");
}

#[test]
fn unknown_model_is_named() {
    let vocab = GgufVocab {
        model: "llama".into(),
        pre: Some("qwen2".into()),
        tokens: vec!["a".into()],
        ..GgufVocab::default()
    };
    let err = Tokenizer::from_gguf_vocab(vocab).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
    assert!(err.to_string().contains("'llama'"), "{err}");
}

#[test]
fn duplicate_gguf_token_is_an_error() {
    let vocab = GgufVocab {
        model: "gpt2".into(),
        pre: Some("gpt2".into()),
        tokens: vec!["a".into(), "b".into(), "a".into()],
        ..GgufVocab::default()
    };
    let err = Tokenizer::from_gguf_vocab(vocab).unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");
}

/// A scratch copy of the Qwen3 tokenizer directory with a custom `tokenizer_config.json`.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str, config: &serde_json::Value) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("pio-tokenizer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(qwen3_dir().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn hf_config_variants() {
    let config = serde_json::json!({
        "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": true},
        "eos_token": "<|im_end|>",
        "add_bos_token": true,
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "{{ bos_token }}D"}
        ]
    });
    let dir = ScratchDir::new("variants", &config);
    let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert_eq!(tok.bos_token_id(), Some(151_643));
    assert_eq!(tok.encode("Hello, world!", true).unwrap(), vec![151_643, 9707, 11, 1879, 0]);
    assert_eq!(tok.encode("Hello, world!", false).unwrap(), vec![9707, 11, 1879, 0]);
    let req = pio_model::chat_template::ChatRequest::single_user("x");
    assert_eq!(tok.chat_template().unwrap().render(&req).unwrap(), "<|endoftext|>D");

    // chat_template.jinja overrides the config's template.
    std::fs::write(dir.0.join("chat_template.jinja"), "J{{ eos_token }}\n").unwrap();
    let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert_eq!(tok.chat_template().unwrap().render(&req).unwrap(), "J<|im_end|>");
}

#[test]
fn malformed_tokenizer_config_names_the_path() {
    let dir = ScratchDir::new("malformed", &serde_json::json!({}));
    let cfg = dir.0.join("tokenizer_config.json");
    std::fs::write(&cfg, "{ not json").unwrap();
    let err = Tokenizer::from_hf_dir(&dir.0).unwrap_err();
    assert!(matches!(err, Error::File { .. }), "{err:?}");
    assert!(err.to_string().contains(&cfg.display().to_string()), "{err}");
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<pio_model::chat_template::ChatTemplate>();
}
