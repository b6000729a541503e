//! BF16 weights with bf16-rounded activations (`vdpbf16ps`, the default where the CPU has
//! AVX-512 BF16 and runs it faster than f32 FMAs): how far the logits move from transformers' f32 computation, and that a batch
//! still equals each prompt alone bitwise.

use std::path::PathBuf;

use pio_engine::engine::{Engine, EngineConfig};
use pio_kernels::cpu::{self, SimdLevel};
use pio_kernels::dot::float;
use pio_kernels::DType;
use safetensors::SafeTensors;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic/qwen3-bf16-untied")
}

fn reference(key: &str) -> Vec<u8> {
    let bytes = std::fs::read(fixture().join("reference.safetensors")).expect("reference file");
    let st = SafeTensors::deserialize(&bytes).expect("reference parses");
    st.tensor(key).expect(key).data().to_vec()
}

#[test]
fn bf16_activations_stay_near_the_f32_reference() {
    if !float::bf16_activations(cpu::level(), DType::BF16, true) {
        eprintln!("skipped: bf16 activations need AVX-512 BF16 faster than f32 FMAs (level {})", cpu::level().name());
        return;
    }
    assert_eq!(cpu::level(), SimdLevel::Avx512);
    let loaded = pio_model::load(&fixture(), &mut |_, _| {}).expect("fixture loads");
    let model = loaded.model.as_ref();
    let inputs = ["input_ids", "batch1_input_ids", "batch2_input_ids", "batch3_input_ids"];
    let outputs = ["logits", "batch1_logits", "batch2_logits", "batch3_logits"];
    let prompts: Vec<Vec<u32>> = inputs
        .iter()
        .map(|key| {
            reference(key).chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32).collect()
        })
        .collect();
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let logits = score(model, 256, std::slice::from_ref(p)).remove(0);
        let want: Vec<f32> =
            reference(outputs[i]).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        assert_eq!(logits.len(), want.len());
        let max_ref = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = logits.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // Measured 8.4e-3 · max|ref| on this fixture; f32 activations stay under 1e-3.
        assert!(diff <= 2e-2 * max_ref, "prompt {i}: max abs diff {diff} vs max |ref| {max_ref}");
        alone.push(logits);
    }
    let batched = score(model, 1024, &prompts);
    for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert!(b.iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()), "prompt {i}: batched differs from alone");
    }
    // The load option really switches: f32 activations give other logits.
    let options = pio_model::LoadOptions { bf16_activations: false, ..Default::default() };
    let f32_model = pio_model::load_with(&fixture(), &options, &mut |_, _| {}).expect("fixture loads");
    let f32_logits = score(f32_model.model.as_ref(), 256, &prompts[..1]).remove(0);
    assert!(f32_logits.iter().zip(&alone[0]).any(|(x, y)| x != y), "bf16_activations: false changed nothing");
}

/// Teacher-forced logits of each sequence, all in one forward, over room for `tokens` tokens.
fn score(model: &dyn pio_model::CausalLm, tokens: usize, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mut engine = Engine::new(model, None, EngineConfig::for_tokens(tokens, Default::default())).expect("engine");
    engine.score(seqs, 0).expect("forward")
}
