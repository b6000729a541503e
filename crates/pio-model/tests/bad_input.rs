//! Broken checkpoints give errors that name the file and what is wrong — never a panic.

use std::path::{Path, PathBuf};

use pio_kernels::DType;
use pio_model::weights::gguf::{write_gguf, TensorToWrite, Value};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name)
}

/// A scratch copy of fixture `name`, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(name: &str, tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pio-bad-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(fixture(name).join(f), dir.join(f)).expect("copy fixture");
        }
        Scratch(dir)
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let path = self.0.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        f(&mut v);
        std::fs::write(&path, v.to_string()).expect("write");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_err(path: &Path) -> String {
    match pio_model::load(path, &mut |_, _| {}) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} does not mention {p:?}");
    }
}

#[test]
fn truncated_safetensors() {
    let s = Scratch::copy_of("qwen3", "trunc-st");
    let file = s.0.join("model.safetensors");
    let len = std::fs::metadata(&file).expect("meta").len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).expect("open");
    f.set_len(len / 2).expect("truncate");
    assert_mentions(&load_err(&s.0), &["model.safetensors", "not a valid safetensors file"]);
}

/// A sharded checkpoint's index names its shards; one that leads out of the model directory
/// (a path, `..`, an absolute path) is refused before anything is opened.
#[test]
fn shard_names_outside_the_model_directory_are_refused() {
    let s = Scratch::copy_of("qwen3", "index-escape");
    std::fs::rename(s.0.join("model.safetensors"), s.0.join("model-00001-of-00001.safetensors")).expect("rename");
    let index = |shard: &str| {
        let v = serde_json::json!({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors",
            "model.norm.weight": shard}});
        std::fs::write(s.0.join("model.safetensors.index.json"), v.to_string()).expect("write index");
    };
    for bad in ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""] {
        index(bad);
        assert_mentions(&load_err(&s.0), &["model.safetensors.index.json", "not a file name in the model directory"]);
    }
    index("model-00001-of-00001.safetensors");
    assert!(pio_model::load(&s.0, &mut |_, _| {}).is_ok());
}

#[test]
fn garbage_safetensors_header() {
    let s = Scratch::copy_of("qwen3", "garbage-st");
    std::fs::write(s.0.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").expect("write");
    assert_mentions(&load_err(&s.0), &["model.safetensors"]);
}

#[test]
fn missing_tensor() {
    let s = Scratch::copy_of("qwen3", "missing");
    s.edit_config(|c| c["num_hidden_layers"] = 4.into());
    assert_mentions(&load_err(&s.0), &["missing tensor", "model.layers.3."]);
}

#[test]
fn shape_that_does_not_match_the_config() {
    let s = Scratch::copy_of("qwen3", "shape");
    s.edit_config(|c| c["intermediate_size"] = 200.into());
    assert_mentions(&load_err(&s.0), &["mlp.gate_proj.weight", "shape", "[200, 128]"]);
}

#[test]
fn unknown_architecture_and_config_values() {
    let s = Scratch::copy_of("qwen3", "arch");
    s.edit_config(|c| c["architectures"] = serde_json::json!(["FooForCausalLM"]));
    assert_mentions(&load_err(&s.0), &["config.json", "unknown architecture", "FooForCausalLM"]);
    s.edit_config(|c| {
        c["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    });
    assert_mentions(&load_err(&s.0), &["config.json", "rope_scaling"]);
    s.edit_config(|c| {
        c["rope_scaling"] = serde_json::Value::Null;
        c["use_sliding_window"] = true.into();
        c["sliding_window"] = serde_json::Value::Null;
    });
    // Sliding-window layers without a window.
    assert_mentions(&load_err(&s.0), &["config.json", "sliding_window"]);
    s.edit_config(|c| {
        c["use_sliding_window"] = false.into();
        c["layer_types"] = serde_json::json!(["full_attention", "chunked_attention"]);
    });
    assert_mentions(&load_err(&s.0), &["layer_types", "chunked_attention"]);
    s.edit_config(|c| {
        c["layer_types"] = serde_json::Value::Null;
        c["some_new_knob"] = 3.into();
    });
    assert_mentions(&load_err(&s.0), &["unknown config key", "some_new_knob"]);
}

#[test]
fn malformed_config_json() {
    let s = Scratch::copy_of("qwen3", "json");
    std::fs::write(s.0.join("config.json"), "{\"architectures\": [").expect("write");
    assert_mentions(&load_err(&s.0), &["config.json", "malformed JSON"]);
}

#[test]
fn missing_tokenizer_is_named_but_weights_still_load() {
    let s = Scratch::copy_of("qwen3", "notok");
    let loaded = pio_model::load(&s.0, &mut |_, _| {}).expect("weights load without tokenizer");
    let Err(err) = loaded.tokenizer() else { panic!("a tokenizer appeared") };
    assert_mentions(&err.to_string(), &["tokenizer.json"]);
    let Err(err) = pio_model::load_tokenizer(&s.0) else { panic!("a tokenizer appeared") };
    let err = err.to_string();
    assert_mentions(&err, &["tokenizer.json"]);
}

#[test]
fn missing_directory_or_file() {
    let err = load_err(Path::new("/nonexistent/model.gguf"));
    assert_mentions(&err, &["/nonexistent/model.gguf"]);
}

fn tiny_gguf(path: &Path, arch: &str) {
    let data = vec![0u8; 64 * 4];
    let metadata = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(1)),
    ];
    let tensors =
        [TensorToWrite { name: "token_embd.weight".into(), dtype: DType::F32, shape: vec![8, 8], data: &data }];
    write_gguf(path, &metadata, &tensors).expect("write gguf");
}

#[test]
fn gguf_bad_magic_truncated_and_unknown_arch() {
    let dir = std::env::temp_dir().join(format!("pio-bad-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad-magic.gguf");
    std::fs::write(&bad, b"GGML\x03\x00\x00\x00").expect("write");
    assert_mentions(&load_err(&bad), &["bad-magic.gguf", "not a GGUF file"]);

    let short = dir.join("short.gguf");
    std::fs::write(&short, b"GG").expect("write");
    assert_mentions(&load_err(&short), &["short.gguf", "too short"]);

    let trunc = dir.join("truncated.gguf");
    tiny_gguf(&trunc, "llama");
    let len = std::fs::metadata(&trunc).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&trunc).expect("open").set_len(len - 100).expect("truncate");
    assert_mentions(&load_err(&trunc), &["truncated.gguf", "token_embd.weight", "truncated"]);

    let header = dir.join("header.gguf");
    tiny_gguf(&header, "llama");
    let bytes = std::fs::read(&header).expect("read");
    std::fs::write(&header, &bytes[..40]).expect("write");
    assert_mentions(&load_err(&header), &["header.gguf", "truncated"]);

    let unknown = dir.join("unknown.gguf");
    tiny_gguf(&unknown, "mamba9");
    assert_mentions(&load_err(&unknown), &["unknown.gguf", "unknown architecture", "mamba9"]);

    let incomplete = dir.join("incomplete.gguf");
    tiny_gguf(&incomplete, "llama");
    assert_mentions(&load_err(&incomplete), &["incomplete.gguf", "missing"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mixture_and_latent_config_errors() {
    let s = Scratch::copy_of("qwen3_moe", "moe");
    s.edit_config(|c| c["num_experts_per_tok"] = 9.into());
    assert_mentions(&load_err(&s.0), &["config.json", "9 per token"]);
    s.edit_config(|c| {
        c["num_experts_per_tok"] = 2.into();
        c["num_experts"] = 9.into();
    });
    // One expert more than the checkpoint has: the router's shape says so first.
    assert_mentions(&load_err(&s.0), &["mlp.gate.weight", "[9, 128]"]);

    let s = Scratch::copy_of("glm4_moe_lite", "glm");
    s.edit_config(|c| c["topk_method"] = "greedy".into());
    assert_mentions(&load_err(&s.0), &["topk_method", "noaux_tc"]);
    s.edit_config(|c| {
        c["topk_method"] = "noaux_tc".into();
        c["n_group"] = 3.into();
    });
    assert_mentions(&load_err(&s.0), &["n_group 3"]);
    s.edit_config(|c| {
        c["n_group"] = 2.into();
        c["mlp_layer_types"] = serde_json::json!(["dense", "sparse"]);
    });
    assert_mentions(&load_err(&s.0), &["mlp_layer_types"]);
    // The same layer kinds spelled out load the same model as first_k_dense_replace.
    s.edit_config(|c| c["mlp_layer_types"] = serde_json::json!(["dense", "sparse", "sparse"]));
    assert!(pio_model::load(&s.0, &mut |_, _| {}).is_ok());
    s.edit_config(|c| c["kv_lora_rank"] = 16.into());
    assert_mentions(&load_err(&s.0), &["kv_a_proj_with_mqa", "shape"]);
}

/// Qwen3-Next configs and checkpoints we cannot run are refused by name: a layer pattern that is
/// not linear/full attention, value heads that are not a multiple of the key heads, a
/// convolution kernel out of range, a linear-attention tensor of the wrong shape; the layer kinds
/// spelled out per layer load the same model as the interval.
#[test]
fn hybrid_config_and_tensor_errors() {
    let s = Scratch::copy_of("qwen3_next", "next");
    s.edit_config(|c| {
        c.as_object_mut().expect("object").remove("full_attention_interval");
        c["layer_types"] =
            serde_json::json!(["linear_attention", "linear_attention", "sliding_attention", "full_attention"]);
    });
    assert_mentions(&load_err(&s.0), &["config.json", "layer_types"]);
    s.edit_config(|c| {
        c["layer_types"] =
            serde_json::json!(["linear_attention", "linear_attention", "linear_attention", "full_attention"]);
    });
    assert!(pio_model::load(&s.0, &mut |_, _| {}).is_ok(), "layer_types as the interval");
    s.edit_config(|c| c["linear_num_value_heads"] = 3.into());
    assert_mentions(&load_err(&s.0), &["value heads a multiple of key heads"]);
    s.edit_config(|c| {
        c["linear_num_value_heads"] = 4.into();
        c["linear_conv_kernel_dim"] = 1.into();
    });
    assert_mentions(&load_err(&s.0), &["linear_conv_kernel_dim 1"]);
    s.edit_config(|c| c["linear_conv_kernel_dim"] = 3.into());
    assert_mentions(&load_err(&s.0), &["linear_attn.conv1d.weight", "shape"]);
    s.edit_config(|c| {
        c["linear_conv_kernel_dim"] = 4.into();
        c["linear_key_head_dim"] = 8.into();
    });
    assert_mentions(&load_err(&s.0), &["in_proj_qkvz", "shape"]);
}

#[test]
fn mtp_layers_are_skipped_and_other_leftovers_are_errors() {
    // A checkpoint with one multi-token-prediction layer after the decoder layers: its
    // tensors are skipped by name; the same tensors without num_nextn_predict_layers are
    // reported as unused.
    let s = Scratch::copy_of("glm4_moe_lite", "mtp");
    let path = s.0.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    let extra: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.2."))
        .map(|(n, t)| (n.replace("model.layers.2.", "model.layers.3."), t.clone()))
        .collect();
    tensors.extend(extra);
    let data = safetensors::tensor::serialize(tensors, None).expect("serialize");
    std::fs::write(&path, data).expect("write");
    assert_mentions(&load_err(&s.0), &["does not use", "model.layers.3."]);
    s.edit_config(|c| c["num_nextn_predict_layers"] = 1.into());
    assert!(pio_model::load(&s.0, &mut |_, _| {}).is_ok());

    // Qwen3-Next's `mtp.*` module is skipped by name; another leftover is still an error.
    let s = Scratch::copy_of("qwen3_next", "next-mtp");
    let path = s.0.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    let norm = tensors.iter().find(|(n, _)| n == "model.norm.weight").expect("norm").1.clone();
    tensors.push(("mtp.norm.weight".into(), norm.clone()));
    tensors.push(("mtp.layers.0.input_layernorm.weight".into(), norm.clone()));
    let data = safetensors::tensor::serialize(tensors.clone(), None).expect("serialize");
    std::fs::write(&path, data).expect("write");
    assert!(pio_model::load(&s.0, &mut |_, _| {}).is_ok(), "mtp.* skipped");
    tensors.push(("model.extra.weight".into(), norm));
    let data = safetensors::tensor::serialize(tensors, None).expect("serialize");
    std::fs::write(&path, data).expect("write");
    assert_mentions(&load_err(&s.0), &["does not use", "model.extra.weight"]);
}

/// A GGUF file damaged at random (truncated anywhere, bytes of its header overwritten, a length
/// field set huge): loading it gives an error or a model, never a panic. 200 seeded damages of
/// a tiny model with the real Qwen3 tokenizer synthesized as GGUF (the header holds the
/// metadata, the vocabulary and the tensor table, where a parser is most easily fooled).
#[test]
fn randomly_damaged_gguf_files_never_panic() {
    let dir = std::env::temp_dir().join(format!("pio-fuzz-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good.gguf");
    // The tiny Qwen3 with the real Qwen3 vocabulary, so the header holds a whole tokenizer.
    let tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen3-tokenizer");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("qwen3").join("config.json")).expect("config")).expect("json");
    cfg["vocab_size"] = 151936.into();
    let config = dir.join("config.json");
    std::fs::write(&config, cfg.to_string()).expect("write config");
    pio_model::synth::write_random_checkpoint(&config, Some(&tokenizer), &good, DType::Q8_0, 1).expect("synth");
    let bytes = std::fs::read(&good).expect("read");
    // The header (metadata, vocabulary, merges, tensor table) ends where the tensor data
    // starts: the first tensor's bytes are the embedding's, the file's last few MB.
    let header = bytes.len() / 2;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    let path = dir.join("damaged.gguf");
    for i in 0..200 {
        let mut b = bytes.clone();
        match i % 4 {
            0 => b.truncate(next(b.len())),
            1 => {
                for _ in 0..1 + next(8) {
                    let at = next(header);
                    b[at] = next(256) as u8;
                }
            }
            2 => {
                // A u64 length or count somewhere in the header set huge.
                let at = 8 + next(header.saturating_sub(16));
                b[at..at + 8].copy_from_slice(&(u64::MAX >> next(40)).to_le_bytes());
            }
            _ => {
                let at = next(header);
                b.truncate(at.max(24));
                b.extend_from_slice(&bytes[at..(at + 64).min(bytes.len())]);
            }
        }
        std::fs::write(&path, &b).expect("write");
        let outcome = std::panic::catch_unwind(|| {
            if let Ok(m) = pio_model::load(&path, &mut |_, _| {}) {
                // What loads must run a token without panicking too.
                let mut cache = m.model.new_kv_cache(16, 1);
                let batch = pio_model::ForwardBatch {
                    token_ids: vec![1],
                    positions: vec![0],
                    seq_indices: vec![0],
                    slot_mapping: vec![0],
                    block_tables: vec![vec![0]],
                    logits_indices: vec![0],
                    ..Default::default()
                };
                let _ = m.model.forward(&batch, &mut cache);
            }
        });
        assert!(outcome.is_ok(), "damage {i} (kind {}) panicked", i % 4);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF header's every length and count is checked against the file before anything is
/// allocated: a metadata array or string claiming more than the file holds, arrays nested too
/// deep, tensor dimensions whose product overflows, more tensors than the header can list.
#[test]
fn gguf_lengths_and_counts_are_bounded_by_the_file() {
    let dir = std::env::temp_dir().join(format!("pio-gguf-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.gguf");
    let header = |n_tensors: u64, n_kv: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    };
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
    // An array of 2^40 u32s in a file of a few dozen bytes.
    let mut b = header(0, 1);
    string(&mut b, "x");
    b.extend(9u32.to_le_bytes());
    b.extend(4u32.to_le_bytes());
    b.extend((1u64 << 40).to_le_bytes());
    cases.push((b, "exceeds the file"));
    // A string of 2^62 bytes.
    let mut b = header(0, 1);
    string(&mut b, "x");
    b.extend(8u32.to_le_bytes());
    b.extend((1u64 << 62).to_le_bytes());
    cases.push((b, "exceeds the file"));
    // Arrays of arrays of arrays of arrays.
    let mut b = header(0, 1);
    string(&mut b, "x");
    b.extend(9u32.to_le_bytes());
    for _ in 0..4 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    b.extend(4u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(7u32.to_le_bytes());
    cases.push((b, "nested too deeply"));
    // A tensor of 2^40 x 2^40 elements.
    let mut b = header(1, 0);
    string(&mut b, "t");
    b.extend(2u32.to_le_bytes());
    b.extend((1u64 << 40).to_le_bytes());
    b.extend((1u64 << 40).to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    cases.push((b, "overflow"));
    // 2^60 tensors announced, none there.
    cases.push((header(1 << 60, 0), "truncated"));
    for (bytes, what) in cases {
        std::fs::write(&path, &bytes).expect("write");
        let err = match pio_model::weights::gguf::GgufFile::open(&path) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => e.to_string(),
        };
        assert_mentions(&err, &["bad.gguf", what]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
