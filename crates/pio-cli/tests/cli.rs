//! The `pio` binary as a user runs it.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use safetensors::SafeTensors;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("testdata/synthetic").join(name)
}

fn tokenizer_dir() -> PathBuf {
    root().join("crates/pio-model/tests/data/qwen3-tokenizer")
}

fn pio(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pio"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pio runs");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("pio finishes")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 1 with `error: ...` mentioning `what`, and no panic.
fn assert_fails(o: &Output, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains(what), "stderr {err:?} does not mention {what:?}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}

fn reference(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name).join("reference.safetensors")).expect("reference")
}

fn ids_of(st: &SafeTensors<'_>, key: &str) -> Vec<u32> {
    st.tensor(key)
        .expect(key)
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8")) as u32)
        .collect()
}

fn f32s_of(st: &SafeTensors<'_>, key: &str) -> Vec<f32> {
    st.tensor(key).expect(key).data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect()
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn logits_runs_all_sequences_in_one_batch_and_matches_reference() {
    // A dense family and both mixture-of-experts families (softmax routing; latent attention
    // with sigmoid grouped routing).
    for name in ["qwen2", "qwen3_moe", "glm4_moe_lite", "qwen3_next"] {
        logits_match_reference(name);
    }
}

fn logits_match_reference(name: &str) {
    let bytes = reference(name);
    let r = SafeTensors::deserialize(&bytes).expect("reference");
    let out = std::env::temp_dir().join(format!("pio-cli-logits-{name}-{}.safetensors", std::process::id()));
    let (a, b) = (ids_of(&r, "input_ids"), ids_of(&r, "batch2_input_ids"));
    let model = fixture(name);
    let o = pio(
        &[
            "logits",
            "--model",
            model.to_str().expect("path"),
            "--token-ids",
            &csv(&a),
            "--token-ids",
            &csv(&b),
            "--out",
            out.to_str().expect("path"),
            "--kv-cache-dtype",
            "f32",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let written = std::fs::read(&out).expect("logits file");
    let _ = std::fs::remove_file(&out);
    let w = SafeTensors::deserialize(&written).expect("valid safetensors");
    for (key, want) in [("logits_0", "logits"), ("logits_1", "batch2_logits")] {
        let t = w.tensor(key).expect(key);
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let want = f32s_of(&r, want);
        assert_eq!(t.shape(), &[want.len() / 512, 512]);
        let got = f32s_of(&w, key);
        // With an f32 KV cache (pio-engine's tests/parity.rs bounds the default f16 one).
        let bound = 1e-4 * want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = got.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= bound, "{name} {key}: diff {diff}");
    }
}

#[test]
fn generate_json_from_prompt_ids_without_tokenizer() {
    for name in ["llama", "qwen3_moe", "glm4_moe_lite", "qwen3_next"] {
        greedy_ids_match_reference(name);
    }
}

fn greedy_ids_match_reference(name: &str) {
    let bytes = reference(name);
    let r = SafeTensors::deserialize(&bytes).expect("reference");
    let want = ids_of(&r, "greedy_ids");
    let model = fixture(name);
    let o = pio(
        &[
            "generate",
            "--model",
            model.to_str().expect("path"),
            "--prompt-ids",
            &csv(&ids_of(&r, "input_ids")),
            "--temperature",
            "0",
            "--max-tokens",
            &want.len().to_string(),
            "--ignore-eos",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    let got: Vec<u32> =
        v["token_ids"].as_array().expect("token_ids").iter().map(|x| x.as_u64().expect("id") as u32).collect();
    assert_eq!(got, want, "{name}: greedy tokens");
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["prompt_token_ids"].as_array().map(Vec::len), Some(16));
    for k in ["load_s", "prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(v["timings"][k].as_f64().is_some_and(|x| x >= 0.0), "timings.{k}");
    }
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let model = fixture("qwen3");
    let run = |seed: &str| {
        let o = pio(
            &[
                "generate",
                "--model",
                model.to_str().expect("path"),
                "--prompt-ids",
                "5,6,7,8",
                "--temperature",
                "1.0",
                "--top-k",
                "0",
                "--top-p",
                "1",
                "--min-p",
                "0",
                "--seed",
                seed,
                "--max-tokens",
                "16",
                "--ignore-eos",
                "--json",
            ],
            None,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).expect("json");
        v["token_ids"].clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn text_output_without_tokenizer_names_the_missing_file() {
    let model = fixture("qwen3");
    assert_fails(
        &pio(&["generate", "--model", model.to_str().expect("path"), "--prompt", "hello"], None),
        "tokenizer.json",
    );
    assert_fails(
        &pio(&["generate", "--model", model.to_str().expect("path"), "--prompt-ids", "5,6"], None),
        "tokenizer.json",
    );
}

#[test]
fn bad_inputs_fail_cleanly() {
    let model = fixture("qwen3");
    let m = model.to_str().expect("path");
    assert_fails(
        &pio(&["generate", "--model", "/no/such/model.gguf", "--prompt-ids", "1"], None),
        "/no/such/model.gguf",
    );
    assert_fails(
        &pio(&["generate", "--model", m, "--prompt-ids", "5,99999", "--json"], None),
        "outside the vocabulary",
    );
    assert_fails(
        &pio(&["generate", "--model", m, "--prompt-ids", "5,6", "--json", "--temperature=-1"], None),
        "temperature",
    );
    assert_fails(
        &pio(&["generate", "--model", m, "--prompt-ids", &csv(&[5; 40]), "--json", "--ctx-size", "32"], None),
        "context",
    );
    assert_fails(
        &pio(&["logits", "--model", m, "--token-ids", "5,x", "--out", "/tmp/x.safetensors"], None),
        "bad token id",
    );
    // Usage errors exit 1 too, not clap's 2.
    assert_fails(&pio(&["generate", "--model", m, "--quant", "q9_9", "--prompt-ids", "5"], None), "unknown format");
    assert_fails(&pio(&["no-such-command"], None), "unrecognized subcommand");
}

#[test]
fn tokenize_and_detokenize_round_trip() {
    let dir = tokenizer_dir();
    let d = dir.to_str().expect("path");
    let o = pio(&["tokenize", "--model", d], Some("Hello world<|im_end|>"));
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<u32> = serde_json::from_str(stdout(&o).trim()).expect("JSON array");
    assert_eq!(ids, vec![9707, 1879, 151645]);
    let o = pio(&["detokenize", "--model", d, "--ids", &csv(&ids)], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "Hello world<|im_end|>");
    assert_fails(&pio(&["detokenize", "--model", d, "--ids", "99999999"], None), "outside the vocabulary");
}

#[test]
fn chat_template_renders_a_request_file() {
    let dir = tokenizer_dir();
    let req = std::env::temp_dir().join(format!("pio-cli-req-{}.json", std::process::id()));
    std::fs::write(
        &req,
        r#"{"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"enable_thinking": false}}"#,
    )
    .expect("write");
    let o =
        pio(&["chat-template", "--model", dir.to_str().expect("path"), "--request", req.to_str().expect("path")], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
    std::fs::write(&req, "{\"messages\": [").expect("write");
    assert_fails(
        &pio(
            &["chat-template", "--model", dir.to_str().expect("path"), "--request", req.to_str().expect("path")],
            None,
        ),
        "malformed JSON",
    );
    let _ = std::fs::remove_file(&req);
}

/// The fetched SmolLM2 file; `None` (skip) outside CI when it is not there.
fn smollm2() -> Option<PathBuf> {
    let dir = std::env::var_os("PIO_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let model = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.exists() {
        assert!(std::env::var_os("CI").is_none(), "{} missing in CI", model.display());
        eprintln!("skipping: {} not found (run scripts/fetch-models.sh)", model.display());
        return None;
    }
    Some(model)
}

/// The default model, when fetched: coherent chat text through the README's command.
#[test]
fn generate_and_chat_with_smollm2() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().expect("path");
    // Greedy: the reference's first six steps are decided (margins >= 0.3), the seventh is not.
    let o = pio(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "Once upon a time, there was a little robot who",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(" had a special ability to make "), "{}", stdout(&o));
    let o = pio(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "8",
            "--stop",
            " the",
            "--seed",
            "1",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert!(!v["text"].as_str().expect("text").contains(" the"));
    // Two turns through piped stdin: a reply to each, each ended by a newline.
    let o = pio(&["chat", "--model", m, "--temperature", "0", "--max-tokens", "10"], Some("Hello!\nTell me a joke.\n"));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.lines().filter(|l| !l.trim().is_empty()).count() >= 2, "{text}");
}

#[test]
fn bench_reports_the_kv_cache_it_ran_with() {
    let model = fixture("qwen3");
    let run = |dtype: &str| {
        let args = ["bench", "--model", model.to_str().expect("path"), "--prompt-tokens", "8", "--gen-tokens", "2"];
        let o = pio(&[&args[..], &["--repeats", "1", "--json", "--kv-cache-dtype", dtype]].concat(), None);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
        assert_eq!(v["kv_cache_dtype"], dtype);
        v["kv_cache_bytes"].as_u64().expect("kv_cache_bytes")
    };
    let (f16, f32) = (run("f16"), run("f32"));
    assert!(f16 > 0 && f32 == 2 * f16, "f16 {f16} bytes, f32 {f32} bytes");
    let o = pio(&["bench", "--model", model.to_str().expect("path"), "--kv-cache-dtype", "q8"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("expected f32, f16, bf16, q8_0 or q4_0"), "{}", stderr(&o));
    // This fixture's heads hold 48 values: not whole blocks of 32.
    let o = pio(&["bench", "--model", model.to_str().expect("path"), "--cache-type-v", "q4_0"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--cache-type-v q4_0: heads of 48 values"), "{}", stderr(&o));
    // A model with heads of 32: keys and values each their own type, reported as such.
    let llama = fixture("llama");
    let args = ["bench", "--model", llama.to_str().expect("path"), "--prompt-tokens", "8", "--gen-tokens", "2"];
    let o = pio(&[&args[..], &["--repeats", "1", "--json", "--ctk", "q8_0", "--ctv", "q4_0"]].concat(), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    assert_eq!(
        (&v["kv_cache_dtype"], &v["cache_type_k"], &v["cache_type_v"]),
        (&"q8_0/q4_0".into(), &"q8_0".into(), &"q4_0".into())
    );
}

/// `--attention-window` streams a generation past `--ctx-size`; bad windows exit 1 naming the
/// option.
#[test]
fn generate_streams_past_the_context_with_attention_sinks() {
    let model = fixture("qwen3");
    let m = model.to_str().expect("path");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--prompt-ids", "1,2,3,4,5,6,7,8", "--temperature", "0"];
        args.extend_from_slice(&["--max-tokens", "120", "--ignore-eos", "--json", "--ctx-size", "48"]);
        args.extend_from_slice(extra);
        pio(&args, None)
    };
    let o = run(&["--attention-window", "48", "--attention-sinks", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    assert_eq!(v["token_ids"].as_array().map(Vec::len), Some(120), "120 tokens through a 48-token cache");
    // Without the window the context ends generation.
    let o = run(&[]);
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    assert_eq!(v["token_ids"].as_array().map(Vec::len), Some(40));
    assert_fails(&run(&["--attention-window", "48", "--attention-sinks", "48"]), "attention_sinks");
    assert_fails(&run(&["--attention-window", "8"]), "attention_window (8) must be at least 32");
    assert_fails(&run(&["--attention-sinks", "4"]), "needs attention_window");
    assert_fails(&run(&["--attention-window", "64"]), "larger than the context");
}

/// `pio kv-cache` reads a config alone and sizes the cache per type.
#[test]
fn kv_cache_reports_bytes_per_token_and_capacity() {
    let config = fixture("qwen2").join("config.json");
    let o = pio(&["kv-cache", "--config", config.to_str().expect("path"), "--kv-cache-mem", "1MiB", "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    let c: Value = serde_json::from_slice(&std::fs::read(&config).expect("config")).expect("json");
    let (layers, kv) =
        (c["num_hidden_layers"].as_u64().expect("layers"), c["num_key_value_heads"].as_u64().expect("kv"));
    let hd = c["hidden_size"].as_u64().expect("hidden") / c["num_attention_heads"].as_u64().expect("heads");
    let f16 = &v["types"][1];
    assert_eq!(f16["cache_type_k"], "f16");
    let per_token = layers * kv * hd * 2 * 2;
    assert_eq!(f16["bytes_per_token"].as_f64(), Some(per_token as f64));
    assert_eq!(f16["tokens"].as_u64(), Some((1 << 20) / (16 * per_token) * 16));
    assert_fails(&pio(&["kv-cache", "--config", "/nonexistent/config.json"], None), "/nonexistent");
    assert_fails(
        &pio(&["kv-cache", "--config", config.to_str().expect("path"), "--kv-cache-mem", "lots"], None),
        "lots",
    );
}

#[test]
fn images_on_the_command_line() {
    // The fixture's image prompt with one placeholder: `pio generate --image` gives
    // transformers' greedy tokens, `pio logits --image` its logits (first sequence), and an
    // image for a text model or a file that is no image fails cleanly.
    let bytes = reference("qwen3_vl");
    let r = SafeTensors::deserialize(&bytes).expect("reference");
    let ids = ids_of(&r, "image_input_ids");
    let single: Vec<u32> =
        ids.iter().enumerate().filter(|&(i, &t)| t != 5 || ids[i - 1] != 5).map(|(_, &t)| t).collect();
    let (model, image) = (fixture("qwen3_vl"), fixture("qwen3_vl").join("image.png"));
    let (model, image) = (model.to_str().expect("path"), image.to_str().expect("path"));
    let want = ids_of(&r, "image_greedy_ids");
    let n = want.len().to_string();
    let args = ["generate", "--model", model, "--image", image, "--temperature", "0", "--ignore-eos", "--json"];
    let o = pio(&[&args[..], &["--prompt-ids", &csv(&single), "--max-tokens", &n]].concat(), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    let got: Vec<u32> =
        v["token_ids"].as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect();
    assert_eq!(got, want);

    let out = std::env::temp_dir().join(format!("pio-cli-image-logits-{}.safetensors", std::process::id()));
    let o = pio(
        &[
            "logits",
            "--model",
            model,
            "--image",
            image,
            "--token-ids",
            &csv(&ids),
            "--token-ids",
            &csv(&ids_of(&r, "input_ids")),
            "--out",
            out.to_str().expect("path"),
            "--kv-cache-dtype",
            "f32",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let written = std::fs::read(&out).expect("logits file");
    let _ = std::fs::remove_file(&out);
    let w = SafeTensors::deserialize(&written).expect("valid safetensors");
    for (key, want) in [("logits_0", "image_logits"), ("logits_1", "logits")] {
        let (got, want) = (f32s_of(&w, key), f32s_of(&r, want));
        let bound = 1e-4 * want.iter().fold(1f32, |m, v| m.max(v.abs()));
        assert_eq!(got.len(), want.len(), "{key}");
        let diff = got.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= bound, "{key}: diff {diff}");
    }

    let text = fixture("qwen3");
    let o = pio(
        &["generate", "--model", text.to_str().expect("path"), "--image", image, "--prompt-ids", "1,2", "--json"],
        None,
    );
    assert_fails(&o, "takes no images");
    let cargo = root().join("Cargo.toml");
    let o = pio(&[&args[..], &["--prompt-ids", "1,2", "--image", cargo.to_str().expect("path")]].concat(), None);
    assert_fails(&o, "not a PNG, JPEG or WebP image");
    let o = pio(&[&args[..], &["--prompt-ids", &csv(&ids[..9])]].concat(), None);
    assert_fails(&o, "placeholder");
}

#[test]
fn gguf_pair_with_mmproj_on_the_command_line() {
    // `pio quantize` writes the fixture as llama.cpp's pair (text model + mmproj); `pio generate
    // --mmproj` on it gives transformers' greedy tokens of the image prompt, and the text file
    // without its vision file says what is missing.
    let dir = std::env::temp_dir().join(format!("pio-cli-mmproj-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let text = dir.join("vl.gguf");
    let (text_s, model) = (text.to_str().expect("path"), fixture("qwen3_vl"));
    let o = pio(&["quantize", "--model", model.to_str().expect("path"), "--quant", "f32", "--out", text_s], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("mmproj-vl.gguf"), "{}", stderr(&o));
    let mmproj = dir.join("vision.gguf");
    std::fs::rename(dir.join("mmproj-vl.gguf"), &mmproj).expect("rename");

    let bytes = reference("qwen3_vl");
    let r = SafeTensors::deserialize(&bytes).expect("reference");
    let ids = ids_of(&r, "image_input_ids");
    let want = ids_of(&r, "image_greedy_ids");
    let image = model.join("image.png");
    let args = [
        "generate",
        "--model",
        text_s,
        "--image",
        image.to_str().expect("path"),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--prompt-ids",
        &csv(&ids),
        "--max-tokens",
        &want.len().to_string(),
    ];
    let o = pio(&[&args[..], &["--mmproj", mmproj.to_str().expect("path")]].concat(), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    let got: Vec<u32> =
        v["token_ids"].as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect();
    assert_eq!(got, want);
    let o = pio(&args, None);
    assert_fails(&o, "--mmproj");
    let o = pio(&[&args[..], &["--mmproj", text_s]].concat(), None);
    assert_fails(&o, "\"clip\"");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_attaches_images_with_a_command() {
    // A tiny Qwen3-VL with the real Qwen3 tokenizer (its vision tokens), written by pio synth.
    let dir = std::env::temp_dir().join(format!("pio-cli-vision-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut c: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen3_vl").join("config.json")).expect("config"))
            .expect("json");
    c["text_config"]["vocab_size"] = 151936.into();
    for (k, v) in [("image_token_id", 151655), ("video_token_id", 151656)] {
        c[k] = v.into();
    }
    c["vision_start_token_id"] = 151652.into();
    c["vision_end_token_id"] = 151653.into();
    std::fs::write(dir.join("config.json"), c.to_string()).expect("config");
    let model = dir.join("model");
    let (config, tok, m) = (dir.join("config.json"), tokenizer_dir(), model.to_str().expect("path").to_string());
    let o = pio(
        &["synth", "--config", config.to_str().expect("p"), "--tokenizer", tok.to_str().expect("p"), "--out", &m],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let image = fixture("qwen3_vl").join("image.png");
    let image = image.to_str().expect("path");
    let common = ["--model", &m, "--temperature", "0", "--max-tokens", "5", "--ignore-eos"];
    let alone =
        pio(&[&["generate", "--chat", "--prompt", "What is this?", "--image", image][..], &common].concat(), None);
    assert!(alone.status.success(), "{}", stderr(&alone));
    let script = format!("/image {image}\nWhat is this?\n/image /no/such.png\nAnd this?\n");
    let o = pio(&[&["chat", "--verbose"][..], &common].concat(), Some(&script));
    assert!(o.status.success(), "{}", stderr(&o));
    let replies: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0], stdout(&alone).trim_end_matches('\n'), "the first turn is generate --chat --image");
    let err = stderr(&o);
    assert!(err.contains("error: /no/such.png"), "{err}");
    // The second turn finds the first, image included, in the prefix cache.
    let cached: Vec<usize> = err
        .lines()
        .filter_map(|l| l.split(" from the prefix cache").next()?.rsplit('(').next()?.parse().ok())
        .collect();
    assert!(cached.len() == 2 && cached[1] >= 64, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--spec draft --draft-model`: transformers' greedy tokens with a draft of another family and
/// with the model drafting for itself (every proposal accepted); `bench` reports acceptance;
/// a missing or unusable draft exits 1 saying why.
#[test]
fn generate_and_bench_with_a_draft_model() {
    let bytes = reference("qwen3");
    let r = SafeTensors::deserialize(&bytes).expect("reference");
    let want = ids_of(&r, "greedy_ids");
    let model = fixture("qwen3");
    let m = model.to_str().expect("path");
    let run = |extra: &[&str]| {
        let n = want.len().to_string();
        let args = ["generate", "--model", m, "--prompt-ids", &csv(&ids_of(&r, "input_ids")), "--temperature", "0"];
        let o = pio(&[&args[..], &["--max-tokens", &n, "--ignore-eos", "--json"], extra].concat(), None);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<Value>(&stdout(&o)).expect("one JSON object")
    };
    for (draft, all_accepted) in [(fixture("llama"), false), (model.clone(), true)] {
        let v = run(&["--spec", "draft", "--spec-tokens", "4", "--draft-model", draft.to_str().expect("path")]);
        let got: Vec<u32> =
            v["token_ids"].as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect();
        assert_eq!(got, want, "drafted by {}", draft.display());
        assert_eq!(v["spec"]["method"], "draft");
        let (drafted, accepted) = (&v["spec"]["draft_tokens"], &v["spec"]["accepted_tokens"]);
        assert!(drafted.as_u64().is_some_and(|d| d > 0), "{v}");
        if all_accepted {
            assert_eq!(drafted, accepted, "{v}");
        }
    }
    let args = ["bench", "--model", m, "--prompt-tokens", "8", "--gen-tokens", "16", "--repeats", "1", "--json"];
    let o = pio(&[&args[..], &["--temperature", "0", "--spec", "draft", "--draft-model", m]].concat(), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    assert_eq!(v["spec"]["method"], "draft");
    assert_eq!(v["spec"]["acceptance_rate"].as_f64(), Some(1.0), "{v}");
    let fails = |extra: &[&str], what: &str| {
        let o = pio(&[&["generate", "--model", m, "--prompt-ids", "1,2,3", "--json"][..], extra].concat(), None);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(what), "{}", stderr(&o));
    };
    fails(&["--spec", "draft"], "--spec draft needs --draft-model PATH");
    fails(&["--draft-model", m], "--draft-model is used by --spec draft");
    let next = fixture("qwen3_next");
    fails(&["--spec", "draft", "--draft-model", next.to_str().expect("path")], "recurrent state");
    fails(&["--spec", "draft", "--draft-model", "/nonexistent/draft.gguf"], "loading the draft model");
}

/// `pio synth --mtp` writes GLM-4.7-Flash's MTP layer; `--spec mtp` loads it and gives the
/// tokens of plain decoding (GGUF and a directory alike); a model without one says so.
#[test]
fn generate_with_the_models_own_mtp_layer() {
    let dir = std::env::temp_dir().join(format!("pio-cli-mtp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(fixture("glm4_moe_lite").join("config.json")).expect("config"))
            .expect("json");
    cfg["num_nextn_predict_layers"] = 1.into();
    let config = dir.join("config.json");
    std::fs::write(&config, cfg.to_string()).expect("write config");
    for out in [dir.join("m.gguf"), dir.join("hf")] {
        let (c, o) = (config.to_str().expect("path"), out.to_str().expect("path"));
        let r = pio(&["synth", "--config", c, "--out", o, "--dtype", "f32", "--mtp"], None);
        assert!(r.status.success(), "{}", stderr(&r));
        let run = |extra: &[&str]| {
            let args = ["generate", "--model", o, "--prompt-ids", "5,6,7,8,9,10,11", "--max-tokens", "24"];
            let r = pio(&[&args[..], &["--temperature", "0", "--ignore-eos", "--json"], extra].concat(), None);
            assert!(r.status.success(), "{}", stderr(&r));
            serde_json::from_str::<Value>(&stdout(&r)).expect("one JSON object")
        };
        let (plain, mtp) = (run(&[]), run(&["--spec", "mtp", "--spec-tokens", "2"]));
        assert_eq!(plain["token_ids"], mtp["token_ids"], "{o}");
        assert!(mtp["spec"]["draft_tokens"].as_u64().is_some_and(|d| d > 0), "{mtp}");
    }
    let plain = fixture("glm4_moe_lite");
    let r = pio(&["generate", "--model", plain.to_str().expect("path"), "--prompt-ids", "1,2", "--spec", "mtp"], None);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    assert!(stderr(&r).contains("no multi-token-prediction layer"), "{}", stderr(&r));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Constrained decoding from the command line, on the real SmolLM2: `generate --json-schema`
/// writes JSON valid under the schema, `--regex` text matching it, and `bench --json-schema`
/// reports the share of the decode spent on masks and grammars.
#[test]
fn constrained_generate_and_bench() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().expect("path");
    let schema = std::env::temp_dir().join(format!("pio-cli-schema-{}.json", std::process::id()));
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": false}"#,
    )
    .expect("write schema");
    let s = schema.to_str().expect("path");
    let o = pio(
        &[
            "generate",
            "--model",
            m,
            "--chat",
            "--prompt",
            "Describe a person.",
            "--max-tokens",
            "60",
            "--seed",
            "3",
            "--json-schema",
            s,
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    assert!(v["name"].is_string() && v["age"].is_i64() && v.as_object().is_some_and(|o| o.len() == 2), "{v}");
    let o = pio(
        &["generate", "--model", m, "--prompt", "The year is", "--max-tokens", "8", "--regex", " [0-9]{4}\\."],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let t = text.trim_end_matches('\n');
    assert!(
        t.len() == 6 && t.starts_with(' ') && t.ends_with('.') && t[1..5].bytes().all(|b| b.is_ascii_digit()),
        "{t:?}"
    );
    let args = ["bench", "--model", m, "--prompt-tokens", "8", "--gen-tokens", "16", "--repeats", "1", "--batch", "2"];
    let o = pio(&[&args[..], &["--json", "--json-schema", s]].concat(), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    for key in ["decode_guided_fraction", "batch_decode_guided_fraction"] {
        assert!(v["guided"][key].as_f64().is_some_and(|f| f > 0.0 && f < 1.0), "{key}: {v}");
    }
    let _ = std::fs::remove_file(&schema);
}

/// `pio bandwidth` measures the machine alone, at the thread count asked for.
#[test]
fn bandwidth_probe_alone() {
    let o = pio(&["--threads", "1", "bandwidth", "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    assert_eq!(v["threads"].as_u64(), Some(1));
    let bw = v["mem_bandwidth_bytes_per_s"].as_f64().expect("a number");
    // Any machine that runs this reads between 100 MB/s and 10 TB/s.
    assert!((1e8..1e13).contains(&bw), "{bw}");
    let o = pio(&["bandwidth"], None);
    assert!(o.status.success() && stdout(&o).contains("GB/s"), "{}", stderr(&o));
}
