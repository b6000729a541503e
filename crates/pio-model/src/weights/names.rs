//! GGUF tensor names -> Hugging Face names. A data table, as in llama.cpp's `llama-arch.cpp`.

/// Per-layer names: GGUF suffix after `blk.N.` -> Hugging Face suffix after `model.layers.N.`.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    // Mixture of experts (the fused `ffn_*_exps` stacks are in `FUSED_EXPERTS`).
    ("ffn_gate_inp.weight", "mlp.gate.weight"),
    ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight"),
    // Multi-head latent attention (llama.cpp `deepseek2`).
    ("attn_q_a.weight", "self_attn.q_a_proj.weight"),
    ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn_q_b.weight", "self_attn.q_b_proj.weight"),
    ("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn_kv_b.weight", "self_attn.kv_b_proj.weight"),
    // llama.cpp's per-head split of kv_b_proj: `[H, kv_lora, nope]` (W_UK transposed per head)
    // and `[H, v, kv_lora]`, flattened to matrices on load.
    ("attn_k_b.weight", "self_attn.k_b_proj.weight"),
    ("attn_v_b.weight", "self_attn.v_b_proj.weight"),
    // Qwen3-Next (llama.cpp `qwen3next`): its norm after attention, the shared expert in the
    // singular and its gate, and Gated DeltaNet, whose `in_proj_qkvz` the converter splits into
    // `attn_qkv` (q, k, v rows of all heads) and `attn_gate` (z), and whose `A_log` it stores as
    // `ssm_a` = -exp(A_log) (older files keep the unsplit `ssm_in`).
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight"),
    ("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
    ("ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight"),
    ("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight"),
    ("attn_qkv.weight", "linear_attn.in_proj_qkv.weight"),
    ("attn_gate.weight", "linear_attn.in_proj_z.weight"),
    ("ssm_in.weight", "linear_attn.in_proj_qkvz.weight"),
    ("ssm_ba.weight", "linear_attn.in_proj_ba.weight"),
    ("ssm_conv1d.weight", "linear_attn.conv1d.weight"),
    ("ssm_dt.bias", "linear_attn.dt_bias"),
    ("ssm_a", "linear_attn.ssm_a"),
    ("ssm_norm.weight", "linear_attn.norm.weight"),
    ("ssm_out.weight", "linear_attn.out_proj.weight"),
    // Multi-token-prediction (`nextn`) layers after the decoder layers (llama.cpp's GLM-4.5).
    ("nextn.eh_proj.weight", "eh_proj.weight"),
    ("nextn.enorm.weight", "enorm.weight"),
    ("nextn.hnorm.weight", "hnorm.weight"),
    ("nextn.shared_head_norm.weight", "shared_head.norm.weight"),
    ("nextn.shared_head_head.weight", "shared_head.head.weight"),
    ("nextn.embed_tokens.weight", "embed_tokens.weight"),
];

/// Names one architecture spells its own way when written: (GGUF architecture, GGUF suffix,
/// Hugging Face suffix). Read in either spelling.
const ARCH_LAYER_NAMES: &[(&str, &str, &str)] =
    &[("qwen3next", "post_attention_norm.weight", "post_attention_layernorm.weight")];

/// GGUF stacks of all experts of a layer, `[experts, rows, cols]`, and the Hugging Face name
/// of one expert's matrix (`{e}` is the expert index).
pub const FUSED_EXPERTS: &[(&str, &str)] = &[
    ("ffn_gate_exps.weight", "mlp.experts.{e}.gate_proj.weight"),
    ("ffn_up_exps.weight", "mlp.experts.{e}.up_proj.weight"),
    ("ffn_down_exps.weight", "mlp.experts.{e}.down_proj.weight"),
];

/// Layer index and Hugging Face expert-name pattern of GGUF tensor `name` when it is a fused
/// expert stack.
pub fn fused_experts(name: &str) -> Option<(usize, &'static str)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = FUSED_EXPERTS.iter().find(|(g, _)| *g == suffix)?;
    Some((layer, hf))
}

/// The GGUF stack name and expert index of a Hugging Face per-expert matrix name
/// (`model.layers.3.mlp.experts.7.up_proj.weight` -> (`blk.3.ffn_up_exps.weight`, 7)).
pub fn hf_expert_to_gguf(name: &str) -> Option<(String, usize)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once(".mlp.experts.")?;
    let layer: usize = layer.parse().ok()?;
    let (expert, suffix) = rest.split_once('.')?;
    let expert: usize = expert.parse().ok()?;
    let (g, _) = FUSED_EXPERTS.iter().find(|(_, hf)| hf.strip_prefix("mlp.experts.{e}.") == Some(suffix))?;
    Some((format!("blk.{layer}.{g}"), expert))
}

/// Whole-model names.
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The Hugging Face name of GGUF tensor `name`, or `None` if the table does not know it.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == name) {
        return Some((*hf).to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The GGUF name of Hugging Face tensor `name` in a file of GGUF architecture `arch`, or
/// `None` if the table does not know it.
pub fn hf_to_gguf(name: &str, arch: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, hf)| *hf == name) {
        return Some((*g).to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let own = ARCH_LAYER_NAMES.iter().find(|(a, _, hf)| *a == arch && *hf == suffix).map(|(_, g, _)| g);
    let g = own.or_else(|| LAYER_NAMES.iter().find(|(_, hf)| *hf == suffix).map(|(g, _)| g))?;
    Some(format!("blk.{layer}.{g}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_layer_and_global_names() {
        assert_eq!(gguf_to_hf("blk.12.attn_q.weight").as_deref(), Some("model.layers.12.self_attn.q_proj.weight"));
        assert_eq!(gguf_to_hf("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(gguf_to_hf("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
        assert_eq!(fused_experts("blk.4.ffn_down_exps.weight"), Some((4, "mlp.experts.{e}.down_proj.weight")));
        assert_eq!(
            hf_expert_to_gguf("model.layers.3.mlp.experts.17.up_proj.weight"),
            Some(("blk.3.ffn_up_exps.weight".to_string(), 17))
        );
        assert_eq!(hf_expert_to_gguf("model.layers.3.mlp.shared_experts.up_proj.weight"), None);
        for name in
            ["model.layers.3.mlp.down_proj.weight", "model.norm.weight", "model.layers.0.self_attn.k_norm.weight"]
        {
            assert_eq!(hf_to_gguf(name, "qwen3").and_then(|g| gguf_to_hf(&g)).as_deref(), Some(name));
        }
        assert_eq!(
            hf_to_gguf("model.layers.2.post_attention_layernorm.weight", "qwen3next").as_deref(),
            Some("blk.2.post_attention_norm.weight")
        );
        assert_eq!(gguf_to_hf("blk.2.ssm_a").as_deref(), Some("model.layers.2.linear_attn.ssm_a"));
    }
}
