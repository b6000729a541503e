//! The GGUF path against the same transformers references: the HF fixtures rewritten as GGUF
//! files the way llama.cpp's converter writes them (llama: q/k rows permuted for adjacent-pair
//! RoPE; qwen2: as is), then run and compared.

use std::path::{Path, PathBuf};

use pio_engine::engine::{Engine, EngineConfig};
use pio_model::weights::gguf::{write_gguf, TensorToWrite, Value};
use pio_model::weights::{names, safetensors as st_loader};
use pio_model::{KvCacheDtype, KvCacheType};
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name)
}

/// Rows of each head reordered as convert_hf_to_gguf's `permute`: new row `2j + i` of a head
/// is old row `i * head_dim/2 + j`.
fn permute_rows(data: &[u8], rows: usize, row_bytes: usize, head_dim: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    let half = head_dim / 2;
    for r in 0..rows {
        let (head, k) = (r / head_dim, r % head_dim);
        let (j, i) = (k / 2, k % 2);
        let src = head * head_dim + i * half + j;
        out[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    out
}

fn convert(name: &str, arch: &str, out: &Path) {
    let dir = fixture(name);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("json");
    let u = |k: &str| cfg[k].as_u64().expect(k) as u32;
    let head_dim = cfg["head_dim"].as_u64().map_or(u("hidden_size") / u("num_attention_heads"), |h| h as u32) as usize;
    let ckpt = st_loader::load_dir(&dir).expect("fixture loads");
    let mut owned = Vec::new();
    for (n, t) in ckpt.tensors() {
        let mut bytes = t.bytes().to_vec();
        if arch == "llama" && (n.ends_with("q_proj.weight") || n.ends_with("k_proj.weight")) {
            let row_bytes = bytes.len() / t.shape[0];
            bytes = permute_rows(&bytes, t.shape[0], row_bytes, head_dim);
        }
        owned.push((names::hf_to_gguf(n, arch).expect("known name"), t.dtype, t.shape.clone(), bytes));
    }
    let tensors: Vec<TensorToWrite> = owned
        .iter()
        .map(|(n, d, s, b)| TensorToWrite { name: n.clone(), dtype: *d, shape: s.clone(), data: b })
        .collect();
    let k = |s: &str| format!("{arch}.{s}");
    let metadata = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        (k("block_count"), Value::U32(u("num_hidden_layers"))),
        (k("context_length"), Value::U32(u("max_position_embeddings"))),
        (k("embedding_length"), Value::U32(u("hidden_size"))),
        (k("feed_forward_length"), Value::U32(u("intermediate_size"))),
        (k("attention.head_count"), Value::U32(u("num_attention_heads"))),
        (k("attention.head_count_kv"), Value::U32(u("num_key_value_heads"))),
        (k("attention.key_length"), Value::U32(head_dim as u32)),
        (k("attention.value_length"), Value::U32(head_dim as u32)),
        (k("rope.dimension_count"), Value::U32(head_dim as u32)),
        (k("rope.freq_base"), Value::F32(cfg["rope_theta"].as_f64().expect("theta") as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg["rms_norm_eps"].as_f64().expect("eps") as f32)),
        (k("vocab_size"), Value::U32(u("vocab_size"))),
    ];
    write_gguf(out, &metadata, &tensors).expect("write gguf");
}

fn reference_logits(name: &str) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).expect("reference");
    let st = SafeTensors::deserialize(&bytes).expect("parses");
    let ids = st
        .tensor("input_ids")
        .expect("ids")
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8")) as u32)
        .collect();
    let logits = st
        .tensor("logits")
        .expect("logits")
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    (ids, logits)
}

#[test]
fn gguf_llama_and_qwen2_match_transformers() {
    let tmp = std::env::temp_dir().join(format!("pio-gguf-parity-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    for (name, arch) in [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")] {
        let path = tmp.join(format!("{name}.gguf"));
        convert(name, arch, &path);
        let loaded = pio_model::load(&path, &mut |_, _| {}).expect("gguf loads");
        let (ids, want) = reference_logits(name);
        let model = loaded.model.as_ref();
        // An f32 cache, as transformers computes (tests/parity.rs bounds the default f16 one).
        let cfg = EngineConfig::for_tokens(32, KvCacheType::both(KvCacheDtype::F32));
        let mut engine = Engine::new(model, None, cfg).expect("engine");
        let got = engine.score(&[ids], 0).expect("forward").remove(0);
        let max_ref = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-4 * max_ref, "{name} as GGUF {arch}: max abs diff {diff}");
    }
    // GGUF v2 has the same layout as v3 (64-bit counts); only the version field differs.
    let v3 = std::fs::read(tmp.join("llama.gguf")).expect("read");
    let mut v2 = v3.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2_path = tmp.join("llama-v2.gguf");
    std::fs::write(&v2_path, v2).expect("write");
    assert!(pio_model::load(&v2_path, &mut |_, _| {}).is_ok(), "GGUF v2 loads");
    let mut v1 = v3;
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&v2_path, v1).expect("write");
    let Err(e) = pio_model::load(&v2_path, &mut |_, _| {}) else { panic!("GGUF v1 must be refused") };
    assert!(e.to_string().contains("unsupported GGUF version 1"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
}
