//! `pio synth`: random-weight checkpoints load, and the Hugging Face and GGUF outputs of one
//! seed compute the same model.

use std::path::{Path, PathBuf};

use pio_kernels::DType;
use pio_model::synth::{write_random_checkpoint, SynthFormat};
use pio_model::weights::gguf::{GgufFile, Value};
use pio_model::{ForwardBatch, LoadedModel};

fn fixture_config(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name).join("config.json")
}

fn qwen3_tokenizer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen3-tokenizer")
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pio-synth-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(path: &Path) -> LoadedModel {
    match pio_model::load(path, &mut |_, _| {}) {
        Ok(m) => m,
        Err(e) => panic!("{} does not load: {e}", path.display()),
    }
}

/// Logits of the 5 tokens `ids` of one sequence, run in one batch.
fn logits(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let n = ids.len();
    let batch = ForwardBatch {
        token_ids: ids.to_vec(),
        positions: (0..n).collect(),
        seq_indices: vec![0; n],
        slot_mapping: (0..n).collect(),
        block_tables: vec![vec![0]],
        logits_indices: (0..n).collect(),
        state_slots: vec![0],
        state_snapshots: Vec::new(),
        ..Default::default()
    };
    let mut cache = m.model.new_kv_cache(16, 4);
    m.model.forward(&batch, &mut cache).expect("forward")
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite() && y.is_finite(), "{what}: logit {i} not finite: {x} vs {y}");
        assert!((x - y).abs() <= 1e-4 * scale, "{what}: logit {i}: {x} vs {y} (max |logit| {scale})");
    }
}

fn write(config: &Path, tokenizer: Option<&Path>, out: &Path, dtype: DType, seed: u64) {
    if let Err(e) = write_random_checkpoint(config, tokenizer, out, dtype, seed) {
        panic!("synth {} -> {}: {e}", config.display(), out.display());
    }
}

#[test]
fn hf_dir_and_gguf_compute_the_same_model() {
    let ids = [3u32, 17, 200, 511, 42];
    for (name, arch) in [("qwen3", "qwen3"), ("qwen2", "qwen2"), ("llama", "llama")] {
        let s = Scratch::new(&format!("same-{name}"));
        let (dir, gguf) = (s.path("hf"), s.path("model.gguf"));
        assert_eq!(SynthFormat::from_path(&dir), SynthFormat::HfDir);
        assert_eq!(SynthFormat::from_path(&gguf), SynthFormat::Gguf);
        write(&fixture_config(name), None, &dir, DType::F32, 5);
        write(&fixture_config(name), None, &gguf, DType::F32, 5);
        let (a, b) = (load(&dir), load(&gguf));
        assert_eq!(a.info.format, "safetensors");
        assert_eq!(b.info.format, "gguf");
        assert_eq!(a.info.num_params, b.info.num_params, "{name}");
        let g = GgufFile::open(&gguf).expect("open");
        assert_eq!(g.get_str("general.architecture").expect("arch"), arch);
        assert_eq!(g.get("general.file_type"), Some(&Value::U32(0)));
        assert_eq!(g.get("general.alignment"), Some(&Value::U32(32)));
        assert_eq!(g.tensors["output_norm.weight"].dtype, DType::F32);
        let (la, lb) = (logits(&a, &ids), logits(&b, &ids));
        assert_eq!(la.len(), 5 * 512);
        assert_close(&la, &lb, name);
        // Random weights are not degenerate: the logits vary.
        let spread = la.iter().fold(f32::MIN, |m, &x| m.max(x)) - la.iter().fold(f32::MAX, |m, &x| m.min(x));
        assert!(spread > 1.0, "{name}: logits spread {spread}");
        // The directory has what a checkpoint needs.
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            assert!(dir.join(f).is_file(), "{name}: {f} missing");
        }
        assert_eq!(a.generation.eos_token_ids, vec![2]);
    }
}

#[test]
fn same_seed_same_files_other_seed_other_weights() {
    let s = Scratch::new("seed");
    let cfg = fixture_config("qwen2");
    for (i, seed) in [(0, 1u64), (1, 1), (2, 2)] {
        write(&cfg, None, &s.path(&format!("m{i}.gguf")), DType::BF16, seed);
        write(&cfg, None, &s.path(&format!("d{i}")), DType::BF16, seed);
    }
    let read = |p: PathBuf| std::fs::read(p).expect("read");
    assert_eq!(read(s.path("m0.gguf")), read(s.path("m1.gguf")));
    assert_eq!(read(s.path("d0/model.safetensors")), read(s.path("d1/model.safetensors")));
    assert_ne!(read(s.path("m0.gguf")), read(s.path("m2.gguf")));
    assert_ne!(read(s.path("d0/model.safetensors")), read(s.path("d2/model.safetensors")));
    let g0 = GgufFile::open(&s.path("m0.gguf")).expect("open");
    let g2 = GgufFile::open(&s.path("m2.gguf")).expect("open");
    for name in ["token_embd.weight", "blk.1.ffn_down.weight", "blk.0.attn_q.bias"] {
        let (a, b) = (g0.tensor(name).expect("tensor"), g2.tensor(name).expect("tensor"));
        assert_ne!(a.bytes(), b.bytes(), "{name}");
    }
    // Norms are 1, biases small, matrices within ±sqrt(3/fan_in).
    let f32s = |name: &str| g0.tensor(name).expect("tensor").to_f32_vec();
    assert!(f32s("blk.0.attn_norm.weight").iter().all(|&x| x == 1.0));
    assert!(f32s("blk.0.attn_k.bias").iter().all(|x| x.abs() <= 0.02));
    let down = f32s("blk.0.ffn_down.weight");
    let bound = (3.0f32 / 256.0).sqrt() * 1.01;
    assert!(down.iter().all(|x| x.abs() <= bound));
    let var = down.iter().map(|x| x * x).sum::<f32>() / down.len() as f32;
    assert!((var * 256.0 - 1.0).abs() < 0.05, "fan_in * variance {}", var * 256.0);
}

#[test]
fn bf16_and_f16_outputs_load_and_run() {
    let s = Scratch::new("bf16");
    for (dtype, file_type) in [(DType::BF16, 32u32), (DType::F16, 1)] {
        let (dir, gguf) = (s.path(&format!("hf-{dtype}")), s.path(&format!("m-{dtype}.gguf")));
        write(&fixture_config("llama"), None, &dir, dtype, 9);
        write(&fixture_config("llama"), None, &gguf, dtype, 9);
        let (a, b) = (load(&dir), load(&gguf));
        assert!(a.info.weight_types.iter().all(|w| w.0 == dtype), "{:?}", a.info.weight_types);
        assert!(b.info.weight_types.iter().all(|w| w.0 == dtype), "{:?}", b.info.weight_types);
        let g = GgufFile::open(&gguf).expect("open");
        assert_eq!(g.get("general.file_type"), Some(&Value::U32(file_type)));
        assert_eq!(g.tensors["blk.0.attn_norm.weight"].dtype, DType::F32);
        let ids = [1u32, 2, 3, 4, 5];
        let (la, lb) = (logits(&a, &ids), logits(&b, &ids));
        // Same stored values; only the order of float operations may differ.
        assert_close(&la, &lb, &format!("llama {dtype}"));
    }
}

#[test]
fn gguf_carries_the_tokenizer_as_llama_cpp_converts_it() {
    let s = Scratch::new("tok");
    // The small qwen3 fixture with the real vocabulary size and special ids.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_config("qwen3")).expect("read")).expect("json");
    cfg["vocab_size"] = 151936.into();
    cfg["tie_word_embeddings"] = true.into();
    cfg["bos_token_id"] = 151643.into();
    cfg["eos_token_id"] = 151645.into();
    let cfg_path = s.path("config.json");
    std::fs::write(&cfg_path, cfg.to_string()).expect("write config");
    let gguf = s.path("tok.gguf");
    write(&cfg_path, Some(&qwen3_tokenizer()), &gguf, DType::BF16, 0);

    let tok = pio_model::load_tokenizer(&gguf).expect("tokenizer from GGUF");
    assert_eq!(tok.encode("Hello world<|im_end|>", false).expect("encode"), vec![9707, 1879, 151645]);
    assert_eq!(tok.encode("Hello world<|im_end|>", true).expect("encode"), vec![9707, 1879, 151645]);
    assert!(tok.chat_template().is_some(), "no chat template");
    assert_eq!(tok.vocab_size(), 151936);

    let g = GgufFile::open(&gguf).expect("open");
    let str_of = |k: &str| g.get(k).and_then(Value::as_str).map(str::to_string);
    let u_of = |k: &str| g.get(k).and_then(Value::as_u64);
    assert_eq!(str_of("tokenizer.ggml.model").as_deref(), Some("gpt2"));
    assert_eq!(str_of("tokenizer.ggml.pre").as_deref(), Some("qwen2"));
    assert_eq!(u_of("tokenizer.ggml.bos_token_id"), Some(151643));
    assert_eq!(u_of("tokenizer.ggml.eos_token_id"), Some(151645));
    assert_eq!(u_of("tokenizer.ggml.padding_token_id"), Some(151643));
    assert_eq!(g.get("tokenizer.ggml.add_bos_token"), Some(&Value::Bool(false)));
    let tokens = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).expect("tokens");
    let types = g.get("tokenizer.ggml.token_type").and_then(Value::as_array).expect("types");
    assert_eq!(tokens.len(), 151936);
    assert_eq!(types.len(), 151936);
    let at = |i: usize| (tokens[i].as_str().expect("str"), types[i].as_i64().expect("int"));
    assert_eq!(at(9707), ("Hello", 1));
    assert_eq!(at(151645), ("<|im_end|>", 3));
    assert_eq!(at(151657), ("<tool_call>", 4));
    assert_eq!(at(151935), ("[PAD151935]", 5));
    let merges = g.get("tokenizer.ggml.merges").and_then(Value::as_array).expect("merges");
    assert_eq!(merges[0].as_str(), Some("Ġ Ġ"));
    assert!(str_of("tokenizer.chat_template").is_some_and(|t| t.contains("<|im_start|>")));

    // The model runs on the tokenizer's ids; the directory output ships the tokenizer files.
    let m = load(&gguf);
    assert_eq!(m.generation.eos_token_ids, vec![151645]);
    let l = logits(&m, &[9707, 1879, 151645, 151644, 0]);
    assert!(l.iter().all(|x| x.is_finite()));
    let dir = s.path("hf");
    write(&cfg_path, Some(&qwen3_tokenizer()), &dir, DType::BF16, 0);
    let d = load(&dir);
    let t = d.tokenizer().expect("tokenizer");
    assert_eq!(t.encode("Hello world<|im_end|>", false).expect("encode"), vec![9707, 1879, 151645]);
    assert!(t.chat_template().is_some());
    assert_close(&logits(&d, &[9707, 1879, 151645, 151644, 0]), &l, "qwen3 tokenizer-sized");
}

#[test]
fn errors_name_the_file() {
    let s = Scratch::new("err");
    let msg = |r: pio_model::Result<()>| match r {
        Ok(()) => panic!("should fail"),
        Err(e) => e.to_string(),
    };
    let cfg = fixture_config("qwen3");
    let out = s.path("x.gguf");

    let missing = s.path("nope/config.json");
    let e = msg(write_random_checkpoint(&missing, None, &out, DType::F32, 0));
    assert!(e.contains("nope/config.json"), "{e}");

    let bad = s.path("bad.json");
    std::fs::write(&bad, r#"{"architectures": ["GPT2LMHeadModel"]}"#).expect("write");
    let e = msg(write_random_checkpoint(&bad, None, &out, DType::F32, 0));
    assert!(e.contains("bad.json") && e.contains("GPT2LMHeadModel"), "{e}");

    // Block formats only go to GGUF, and only those GGUF has a type for.
    let e = msg(write_random_checkpoint(&cfg, None, &s.path("qdir"), DType::Q4_0, 0));
    assert!(e.contains("Q4_0") && e.contains("qdir"), "{e}");
    let e = msg(write_random_checkpoint(&cfg, None, &out, DType::INT8, 0));
    assert!(e.contains("INT8") && e.contains("x.gguf"), "{e}");

    let e = msg(write_random_checkpoint(&cfg, Some(&s.0), &out, DType::F32, 0));
    assert!(e.contains("tokenizer.json"), "{e}");

    // The qwen3 tokenizer does not fit a 512-token model.
    let e = msg(write_random_checkpoint(&cfg, Some(&qwen3_tokenizer()), &out, DType::F32, 0));
    assert!(e.contains("tokenizer.json") && e.contains("vocab_size"), "{e}");

    let file = s.path("a-file");
    std::fs::write(&file, "x").expect("write");
    let e = msg(write_random_checkpoint(&cfg, None, &file.join("m.gguf"), DType::F32, 0));
    assert!(e.contains("a-file"), "{e}");
    let e = msg(write_random_checkpoint(&cfg, None, &file.join("dir"), DType::F32, 0));
    assert!(e.contains("a-file"), "{e}");
}

/// A copy of fixture `name`'s config with `edits` applied, written to `dir/config.json`.
fn edited_config(s: &Scratch, name: &str, edits: &[(&str, serde_json::Value)]) -> PathBuf {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_config(name)).expect("read")).expect("json");
    for (k, v) in edits {
        cfg[*k] = v.clone();
    }
    let dir = s.path(&format!("cfg-{name}"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("config.json");
    std::fs::write(&path, cfg.to_string()).expect("write config");
    path
}

/// The tiny mixtures, as GGUF can hold them: Qwen3-MoE with every layer sparse (llama.cpp's
/// qwen3moe has no dense layers); GLM-4.7-Flash with rms_norm_eps 1e-6, the latent norms' eps
/// in transformers (llama.cpp uses rms_norm_eps for them), and an MTP layer in the config
/// (not written).
fn moe_configs(s: &Scratch) -> Vec<(&'static str, &'static str, PathBuf)> {
    vec![
        ("qwen3_moe", "qwen3moe", edited_config(s, "qwen3_moe", &[("mlp_only_layers", serde_json::json!([]))])),
        (
            "glm4_moe_lite",
            "deepseek2",
            edited_config(
                s,
                "glm4_moe_lite",
                &[("rms_norm_eps", serde_json::json!(1e-6)), ("num_nextn_predict_layers", serde_json::json!(1))],
            ),
        ),
        ("qwen3_next", "qwen3next", fixture_config("qwen3_next")),
    ]
}

#[test]
fn moe_hf_dir_and_gguf_compute_the_same_model() {
    let ids = [3u32, 17, 200, 511, 42];
    let s = Scratch::new("moe");
    for (name, arch, cfg) in moe_configs(&s) {
        let (dir, gguf) = (s.path(&format!("hf-{name}")), s.path(&format!("{name}.gguf")));
        write(&cfg, None, &dir, DType::F32, 11);
        write(&cfg, None, &gguf, DType::F32, 11);
        let (a, b) = (load(&dir), load(&gguf));
        assert_eq!(a.info.num_params, b.info.num_params, "{name}");
        let (la, lb) = (logits(&a, &ids), logits(&b, &ids));
        assert_eq!(la.len(), 5 * 512);
        assert_close(&la, &lb, name);
        let spread = la.iter().fold(f32::MIN, |m, &x| m.max(x)) - la.iter().fold(f32::MAX, |m, &x| m.min(x));
        assert!(spread > 1.0, "{name}: logits spread {spread}");

        let g = GgufFile::open(&gguf).expect("open");
        let u = |k: &str| g.get(&format!("{arch}.{k}")).and_then(Value::as_u64);
        assert_eq!(g.get_str("general.architecture").expect("arch"), arch);
        assert_eq!(u("block_count"), Some(if arch == "qwen3next" { 4 } else { 3 }));
        assert_eq!(u("expert_count"), Some(8));
        assert_eq!(u("expert_used_count"), Some(2));
        // Experts fused into [experts, rows, cols] stacks; routers F32.
        let t = |n: &str| g.tensors.get(n).unwrap_or_else(|| panic!("{name}: no {n}"));
        let inter = u("expert_feed_forward_length").expect("expert width") as usize;
        assert_eq!(t("blk.1.ffn_gate_exps.weight").shape, [8, inter, 128]);
        assert_eq!(t("blk.1.ffn_down_exps.weight").shape, [8, 128, inter]);
        assert_eq!(t("blk.1.ffn_gate_inp.weight").dtype, DType::F32);
        assert!(!g.tensors.keys().any(|k| k.contains("experts")), "{name}: per-expert tensors left");
        if arch == "deepseek2" {
            // As convert_hf_to_gguf.py writes GLM-4.7-Flash, with sigmoid routing explicit and
            // no MTP layer.
            assert_eq!(u("attention.head_count_kv"), Some(1));
            assert_eq!(u("attention.key_length"), Some(32 + 8));
            assert_eq!(u("attention.value_length"), Some(32));
            assert_eq!(u("attention.key_length_mla"), Some(24));
            assert_eq!(u("attention.value_length_mla"), Some(24));
            assert_eq!(u("rope.dimension_count"), Some(8));
            assert_eq!(u("leading_dense_block_count"), Some(1));
            assert_eq!(u("expert_gating_func"), Some(2));
            assert_eq!(u("expert_group_count"), Some(2));
            assert_eq!(u("nextn_predict_layers"), Some(0));
            assert_eq!(g.get("deepseek2.expert_weights_norm"), Some(&Value::Bool(true)));
            assert_eq!(t("blk.0.attn_k_b.weight").shape, [4, 32, 16]);
            assert_eq!(t("blk.0.attn_v_b.weight").shape, [4, 24, 32]);
            assert!(!g.tensors.contains_key("blk.0.attn_kv_b.weight"));
            assert_eq!(t("blk.1.exp_probs_b.bias").dtype, DType::F32);
            assert!(g.tensors.contains_key("blk.0.ffn_gate.weight"), "dense first layer");
            assert!(g.tensors.contains_key("blk.1.ffn_up_shexp.weight"));
        }
        if arch == "qwen3next" {
            // As convert_hf_to_gguf.py writes Qwen3-Next: in_proj_qkvz split into attn_qkv
            // (2 key heads of 16 for q and k, 4 value heads of 16) and attn_gate; A as -exp;
            // the convolution [channels, taps] in F32; norms with 1 + w folded in (not
            // Gated DeltaNet's own); every 4th layer full attention with a gated q_proj.
            assert_eq!(u("ssm.conv_kernel"), Some(4));
            assert_eq!(u("ssm.state_size"), Some(16));
            assert_eq!(u("ssm.group_count"), Some(2));
            assert_eq!(u("ssm.time_step_rank"), Some(4));
            assert_eq!(u("ssm.inner_size"), Some(64));
            assert_eq!(u("full_attention_interval"), Some(4));
            assert_eq!(u("rope.dimension_count"), Some(8));
            assert_eq!(u("expert_shared_feed_forward_length"), Some(64));
            assert_eq!(t("blk.0.attn_qkv.weight").shape, [2 * 2 * 16 + 64, 128]);
            assert_eq!(t("blk.0.attn_gate.weight").shape, [64, 128]);
            assert_eq!(t("blk.0.ssm_ba.weight").shape, [8, 128]);
            assert_eq!(
                (t("blk.0.ssm_conv1d.weight").dtype, &t("blk.0.ssm_conv1d.weight").shape[..]),
                (DType::F32, &[128usize, 4][..])
            );
            assert_eq!(t("blk.0.ffn_gate_inp_shexp.weight").dtype, DType::F32);
            assert_eq!(t("blk.3.attn_q.weight").shape, [2 * 4 * 32, 128]);
            let vals = |n: &str| g.tensor(n).expect("tensor").to_f32_vec();
            assert!(vals("blk.0.ssm_a").iter().all(|&a| a < 0.0));
            assert!(vals("blk.3.post_attention_norm.weight").iter().all(|&w| w == 1.0), "1 + 0 folded in");
            assert!(vals("blk.3.attn_q_norm.weight").iter().all(|&w| w == 1.0));
            assert!(vals("blk.0.ssm_norm.weight").iter().all(|&w| w == 1.0), "plain weight of one");
            assert!(!g.tensors.keys().any(|k| k.contains("ffn_norm") || k.contains("ssm_in")));
        }
    }
}

#[test]
fn moe_block_formats_load_and_match_pio_quantize() {
    let ids = [1u32, 2, 3, 4, 5];
    let s = Scratch::new("moe-q8");
    for (name, _, cfg) in moe_configs(&s) {
        let q = s.path(&format!("{name}-q8_0.gguf"));
        write(&cfg, None, &q, DType::Q8_0, 3);
        let m = load(&q);
        let types: Vec<DType> = m.info.weight_types.iter().map(|w| w.0).collect();
        assert!(types.contains(&DType::Q8_0) && types.contains(&DType::F32), "{name}: {types:?}");
        let g = GgufFile::open(&q).expect("open");
        assert_eq!(g.get("general.file_type"), Some(&Value::U32(7)));
        assert_eq!(g.tensors["blk.1.ffn_up_exps.weight"].dtype, DType::Q8_0);
        assert_eq!(g.tensors["blk.1.ffn_gate_inp.weight"].dtype, DType::F32);
        let l = logits(&m, &ids);
        assert!(l.iter().all(|x| x.is_finite()), "{name}");
        let spread = l.iter().fold(f32::MIN, |m, &x| m.max(x)) - l.iter().fold(f32::MAX, |m, &x| m.min(x));
        assert!(spread > 1.0, "{name}: logits spread {spread}");

        // `pio quantize` of the F32 directory and of the F32 GGUF of the same seed writes the
        // same tensors: experts stacked, routers F32, kv_b split before quantizing.
        let (dir, gguf) = (s.path(&format!("hf-{name}")), s.path(&format!("{name}-f32.gguf")));
        write(&cfg, None, &dir, DType::F32, 3);
        write(&cfg, None, &gguf, DType::F32, 3);
        for input in [&dir, &gguf] {
            let out = s.path(&format!("{name}-requant.gguf"));
            pio_model::quantize::write_quantized_gguf(input, DType::Q8_0, &out).expect("quantize");
            let r = GgufFile::open(&out).expect("open");
            let mut names: Vec<&String> = r.tensors.keys().collect();
            names.sort();
            let mut want: Vec<&String> = g.tensors.keys().collect();
            want.sort();
            assert_eq!(names, want, "{name} from {}", input.display());
            for n in want {
                let (a, b) = (&g.tensors[n], &r.tensors[n]);
                assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{name} {n}");
                let (ta, tb) = (g.tensor(n).expect("t"), r.tensor(n).expect("t"));
                assert!(ta.bytes() == tb.bytes(), "{name} {n} from {}: bytes differ", input.display());
            }
            assert_close(&logits(&load(&out), &ids), &l, name);
        }

        // Load-time quantization keeps the routers exact.
        let opts = pio_model::LoadOptions { quant: Some(DType::Q8_0), ..Default::default() };
        let lq = pio_model::load_with(&dir, &opts, &mut |_, _| {}).expect("load --quant");
        assert!(lq.info.weight_types.iter().any(|w| w.0 == DType::F32), "{name}: {:?}", lq.info.weight_types);
    }
}

#[test]
fn moe_layouts_gguf_cannot_hold_are_refused() {
    let s = Scratch::new("moe-err");
    // The fixture has a dense layer (mlp_only_layers [1]): fine as a directory, not as GGUF.
    let cfg = fixture_config("qwen3_moe");
    write(&cfg, None, &s.path("hf"), DType::BF16, 0);
    load(&s.path("hf"));
    let e = match write_random_checkpoint(&cfg, None, &s.path("m.gguf"), DType::BF16, 0) {
        Ok(()) => panic!("should fail"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("mlp_only_layers") && e.contains("config.json"), "{e}");
}

#[test]
fn latent_attention_with_biases_and_without_query_compression_loads_and_runs() {
    // DeepSeek-V3 variants: `attention_bias` (biases on q_a, kv_a and o) and `q_lora_rank: null`
    // (a plain q_proj). Written by synth as a Hugging Face directory, then run.
    let dir = std::env::temp_dir().join(format!("pio-synth-mla-variants-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let src =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic/glm4_moe_lite/config.json");
    for (tag, edit) in
        [("bias", ("attention_bias", serde_json::json!(true))), ("noq", ("q_lora_rank", serde_json::Value::Null))]
    {
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&src).expect("config")).expect("json");
        c[edit.0] = edit.1;
        let cfg = dir.join(format!("{tag}.json"));
        std::fs::write(&cfg, c.to_string()).expect("write config");
        let out = dir.join(tag);
        pio_model::synth::write_random_checkpoint(&cfg, None, &out, pio_kernels::DType::F32, 1).expect("synth");
        let m = pio_model::load(&out, &mut |_, _| {}).expect("loads");
        let logits = last_logits(m.model.as_ref());
        assert_eq!(logits.len(), 512);
        assert!(logits.iter().all(|v| v.is_finite()), "{tag}: finite logits");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One forward of a short prompt over a fresh cache, without the engine: the last logits.
fn last_logits(model: &dyn pio_model::CausalLm) -> Vec<f32> {
    let ids = vec![5u32, 6, 7, 8, 9];
    let n = ids.len();
    let mut cache = model.new_kv_cache(16, 1);
    let batch = ForwardBatch {
        token_ids: ids,
        positions: (0..n).collect(),
        seq_indices: vec![0; n],
        slot_mapping: (0..n).collect(),
        block_tables: vec![vec![0]],
        logits_indices: vec![n - 1],
        state_slots: vec![0],
        state_snapshots: Vec::new(),
        ..Default::default()
    };
    model.forward(&batch, &mut cache).expect("forward")
}

#[test]
fn vision_language_gguf_is_a_pair_llama_cpp_reads() {
    // Qwen3-VL to GGUF: the text model (`qwen3vl`, M-RoPE sections, DeepStack count) and an
    // mmproj file beside it with the converter's names and types; loaded together, the tower
    // sees an image as the directory written from the same seed does (F16 matrices there).
    let s = Scratch::new("vl-pair");
    let cfg = fixture_config("qwen3_vl");
    write(&cfg, None, &s.path("hf"), DType::F32, 3);
    write(&cfg, None, &s.path("m.gguf"), DType::Q4_K, 3);
    let text = GgufFile::open(&s.path("m.gguf")).expect("text file");
    assert_eq!(text.get_str("general.architecture").expect("arch"), "qwen3vl");
    let sections = text.get("qwen3vl.rope.dimension_sections").and_then(Value::as_array).expect("sections");
    assert_eq!(sections.iter().map(|v| v.as_u64().expect("int")).collect::<Vec<_>>(), vec![6, 5, 5, 0]);
    assert_eq!(text.get("qwen3vl.n_deepstack_layers").and_then(Value::as_u64), Some(2));
    assert!(text.tensors.keys().all(|n| !n.starts_with("v.") && !n.contains("visual")));
    let vision = GgufFile::open(&s.path("mmproj-m.gguf")).expect("mmproj file");
    assert_eq!(vision.get_str("general.architecture").expect("arch"), "clip");
    assert_eq!(vision.get_str("clip.projector_type").expect("projector"), "qwen3vl_merger");
    for (name, dtype) in [
        ("v.blk.0.attn_qkv.weight", DType::F16),
        ("mm.0.weight", DType::F16),
        ("v.deepstack.1.fc2.weight", DType::F16),
        // An F16 file keeps its patch kernels F16 (any other type: F32).
        ("v.patch_embd.weight", DType::F16),
        ("v.patch_embd.weight.1", DType::F16),
        ("v.position_embd.weight", DType::F32),
        ("v.blk.1.ln2.bias", DType::F32),
    ] {
        assert_eq!(vision.tensors.get(name).map(|t| t.dtype), Some(dtype), "{name}");
    }

    let image = pio_model::image::open(&cfg.with_file_name("image.png")).expect("image");
    let features = |m: &LoadedModel| {
        let v = m.model.vision().expect("a vision tower");
        v.encode(&pio_model::image::preprocess(&image, v.processor()).expect("pixels")).expect("encode")
    };
    let b = features(&load(&s.path("hf")));
    let close = |a: &pio_model::models::vision::ImageFeatures, tol: f32| {
        assert_eq!((a.grid, a.deepstack.len()), (b.grid, b.deepstack.len()));
        let scale = b.embeds.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.embeds.iter().zip(&b.embeds).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= tol * scale, "merged features differ by {diff} (scale {scale})");
    };
    close(&features(&load(&s.path("m.gguf"))), 1e-2);

    // `pio quantize` of the pair quantizes its mmproj too (to mmproj-<out>), the tower to Q8_0.
    let summary = pio_model::quantize::write_quantized_gguf(&s.path("m.gguf"), DType::Q8_0, &s.path("q8.gguf"))
        .expect("quantize the pair");
    assert_eq!(summary.mmproj.as_ref().map(|(p, _)| p.clone()), Some(s.path("mmproj-q8.gguf")));
    let vision = GgufFile::open(&s.path("mmproj-q8.gguf")).expect("quantized mmproj");
    assert_eq!(vision.tensors.get("v.blk.0.attn_qkv.weight").map(|t| t.dtype), Some(DType::Q8_0));
    close(&features(&load(&s.path("q8.gguf"))), 3e-2);
}
