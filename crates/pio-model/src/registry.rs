//! Which architectures we run: a data table from checkpoint architecture strings to families.

/// A family of models that share one model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `models::decoder`: Qwen3, Qwen2, Llama, Qwen3-MoE, GLM-4.7-Flash, Qwen3-Next, Qwen3-VL.
    Decoder,
}

/// (Hugging Face `architectures[0]`, GGUF `general.architecture`, family).
pub const ARCHITECTURES: &[(&str, &str, Family)] = &[
    ("Qwen3ForCausalLM", "qwen3", Family::Decoder),
    ("Qwen2ForCausalLM", "qwen2", Family::Decoder),
    ("LlamaForCausalLM", "llama", Family::Decoder),
    ("Qwen3MoeForCausalLM", "qwen3moe", Family::Decoder),
    // llama.cpp writes GLM-4.7-Flash as its DeepSeek-V2/V3 architecture.
    ("Glm4MoeLiteForCausalLM", "deepseek2", Family::Decoder),
    ("Qwen3NextForCausalLM", "qwen3next", Family::Decoder),
    // The text model and its vision tower (a GGUF pair: `qwen3vl` and an mmproj file).
    ("Qwen3VLForConditionalGeneration", "qwen3vl", Family::Decoder),
];

/// The family of a Hugging Face architecture string.
pub fn family_of_hf(arch: &str) -> Option<Family> {
    ARCHITECTURES.iter().find(|(hf, _, _)| *hf == arch).map(|(_, _, f)| *f)
}

/// The family of a GGUF architecture string.
pub fn family_of_gguf(arch: &str) -> Option<Family> {
    ARCHITECTURES.iter().find(|(_, g, _)| *g == arch).map(|(_, _, f)| *f)
}

/// Comma-separated list for error messages.
pub fn supported_list(gguf: bool) -> String {
    let names: Vec<&str> = ARCHITECTURES.iter().map(|(hf, g, _)| if gguf { *g } else { *hf }).collect();
    names.join(", ")
}
