//! Command-line arguments, as the user types them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use pio_kernels::attention::{KvCacheDtype, KvCacheType};
use pio_kernels::DType;

#[derive(Debug, Parser)]
#[command(name = "pio", version, about = "Run large language models on the machine you have")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Threads for the kernels (default: all cores; also PIO_THREADS).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// An interactive conversation through the model's chat template (stdin may be piped).
    Chat(ChatArgs),
    /// Write the logits of one batched forward over the given sequences to a safetensors file.
    Logits(LogitsArgs),
    /// Print the token ids of the text on stdin as a JSON array.
    Tokenize(TokenizeArgs),
    /// Print the text of token ids.
    Detokenize(DetokenizeArgs),
    /// Print the prompt the chat template renders for an OpenAI chat-completions request body.
    ChatTemplate(ChatTemplateArgs),
    /// Measure prefill and decode speed against the machine's memory-bandwidth roofline.
    Bench(BenchArgs),
    /// Perplexity over a text file, and KL divergence against a reference run (as llama-perplexity).
    Perplexity(crate::perplexity::PerplexityArgs),
    /// Write a random-weight checkpoint with a real config (a HF directory, or GGUF if OUT ends in .gguf).
    Synth(SynthArgs),
    /// Quantize a model's weights and write them as a GGUF file (llama.cpp reads it too).
    Quantize(QuantizeArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(crate::serve::ServeArgs),
    /// The KV cache a model's config implies: bytes per token for each cache type, and the
    /// tokens a memory budget holds.
    KvCache(crate::kv_cache::KvCacheArgs),
    /// The memory read bandwidth the kernel threads reach now: the probe `pio bench` divides
    /// a decode's bytes by for its roofline.
    Bandwidth(crate::bench::BandwidthArgs),
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The vision file (mmproj GGUF) of a vision-language GGUF model, as llama.cpp's --mmproj.
    /// Unset: `mmproj-<model file name>` beside the model when there is one (what `pio synth`
    /// and `pio quantize` write), else text only.
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    /// Print the architecture, parameter count, weight types and memory used.
    #[arg(long)]
    pub verbose: bool,
    /// Quantize the weights at load: q8_0, q6_k, q5_k, q5_0, q4_k, q4_0, nf4, int8, int4, bf16,
    /// f16 (any format name); the LM head keeps Q6_K below 8 bits, as llama-quantize does.
    #[arg(long, value_parser = parse_quant)]
    pub quant: Option<DType>,
    /// Keep every matrix in the file's row layout instead of rearranging the block-quantized
    /// and BF16 ones at load for faster decode (as llama.cpp's --no-repack; the results are the
    /// same).
    #[arg(long)]
    pub no_repack: bool,
    /// BF16 weights multiply bf16-rounded activations where the CPU has AVX-512 BF16 (twice the
    /// f32 rate, as llama.cpp does); false keeps f32 activations, for results that match an f32
    /// computation over bf16 weights.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "PIO_BF16_ACTIVATIONS",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub bf16_activations: bool,
    /// Storage of the KV cache's keys and values both: f16 (llama.cpp's default), f32, bf16,
    /// q8_0 (about half of f16) or q4_0 (about a quarter). The block formats rotate each head by
    /// a Hadamard transform first, so a few outlier channels do not take the precision of the
    /// rest.
    #[arg(long, default_value_t = KvCacheDtype::F16)]
    pub kv_cache_dtype: KvCacheDtype,
    /// Storage of the keys alone (as llama.cpp's -ctk), overriding --kv-cache-dtype.
    #[arg(long, visible_alias = "ctk")]
    pub cache_type_k: Option<KvCacheDtype>,
    /// Storage of the values alone (as llama.cpp's -ctv), overriding --kv-cache-dtype.
    #[arg(long, visible_alias = "ctv")]
    pub cache_type_v: Option<KvCacheDtype>,
    /// Memory the weights, KV cache and scratch may take together (e.g. 16GiB). A mixture-of-
    /// experts model that does not fit streams its routed experts from disk through a cache of
    /// what is left after the other weights and an eighth of the bound (128 MiB to 2 GiB) kept
    /// for the KV cache and scratch. Unset: no bound, weights memory-mapped.
    #[arg(long, value_parser = crate::serve::parse_size)]
    pub max_memory: Option<usize>,
    /// Which streamed expert leaves the cache for another: frequency (least often used, counts
    /// halved as they age; measured better) or lru (least recently used).
    #[arg(long, default_value_t = pio_model::EvictionPolicy::default())]
    pub expert_cache_policy: pio_model::EvictionPolicy,
    /// Do not read the next layer's likely experts ahead (its router applied to the current
    /// layer's input) while a layer computes.
    #[arg(long)]
    pub no_expert_prefetch: bool,
    /// Streamed expert reads in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub expert_io_threads: u16,
    /// Stream the routed experts through a cache of exactly N experts, whatever --max-memory
    /// says (for measuring the cache).
    #[arg(long)]
    pub expert_cache_slots: Option<usize>,
    /// Dense models: keep the first N layers in memory and stream the others from disk, whatever
    /// --max-memory says (for measuring layer streaming).
    #[arg(long)]
    pub resident_layers: Option<usize>,
    /// Load the multi-token-prediction layer (set by `--spec mtp`).
    #[arg(skip)]
    pub mtp: bool,
}

impl ModelArgs {
    /// The load options these arguments ask for.
    pub fn load_options(&self) -> pio_model::LoadOptions {
        pio_model::LoadOptions {
            quant: self.quant,
            repack: !self.no_repack,
            bf16_activations: self.bf16_activations,
            max_memory: self.max_memory,
            expert_cache: pio_model::ExpertCacheOptions {
                policy: self.expert_cache_policy,
                prefetch: !self.no_expert_prefetch,
                slots: self.expert_cache_slots,
                io_threads: self.expert_io_threads as usize,
                direct_io: true,
                resident_layers: self.resident_layers,
            },
            mmproj: self.mmproj.clone(),
            mtp: self.mtp,
        }
    }

    /// The cache types these options ask for.
    pub fn kv_cache_type(&self) -> KvCacheType {
        KvCacheType {
            k: self.cache_type_k.unwrap_or(self.kv_cache_dtype),
            v: self.cache_type_v.unwrap_or(self.kv_cache_dtype),
        }
    }
}

/// `uniform` (exponent 0) or `zipf:S`.
fn parse_routing(s: &str) -> Result<f64, String> {
    if s == "uniform" {
        return Ok(0.0);
    }
    s.strip_prefix("zipf:")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| format!("{s:?}: expected uniform or zipf:S with S >= 0 (e.g. zipf:1.0)"))
}

/// A weight format by name (`q4_k`, `NF4`, ...).
fn parse_quant(s: &str) -> Result<DType, String> {
    DType::from_name(s).ok_or_else(|| {
        let names: Vec<String> = DType::ALL.iter().map(|d| d.name().to_ascii_lowercase()).collect();
        format!("unknown format (known: {})", names.join(", "))
    })
}

#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy. Default: the checkpoint's, else 0.8.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the K most likely tokens (0: off). Default: the checkpoint's, else 40.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling (1: off). Default: the checkpoint's, else 0.95.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens below P times the top probability (0: off). Default: the checkpoint's, else 0.05.
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalize tokens already seen (1: off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// OpenAI presence penalty.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// OpenAI frequency penalty.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Context length (prompt + generated). Default: the model's, at most 4096.
    #[arg(long)]
    pub ctx_size: Option<usize>,
    /// Stream past the context: keep at most this many tokens in the cache (the sinks and the
    /// most recent), dropping older ones a quarter of the window at a time and re-rotating the
    /// kept keys, so generation can go on without end in bounded memory (whole blocks of 16).
    #[arg(long)]
    pub attention_window: Option<usize>,
    /// With --attention-window: tokens at the start always kept (StreamingLLM's attention
    /// sinks; rounded up to a block of 16).
    #[arg(long)]
    pub attention_sinks: Option<usize>,
    #[command(flatten)]
    pub guide: GuideArgs,
}

/// Constrained decoding.
#[derive(Debug, Args, Clone, Default)]
pub struct GuideArgs {
    /// Constrained decoding: the output is a JSON document valid under this JSON schema (a
    /// file).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["regex", "grammar"])]
    pub json_schema: Option<PathBuf>,
    /// Constrained decoding: the output matches this regular expression.
    #[arg(long, value_name = "REGEX", conflicts_with = "grammar")]
    pub regex: Option<String>,
    /// Constrained decoding: the output follows this Lark grammar (a file; llguidance's
    /// dialect).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
}

impl GuideArgs {
    /// The constraint these options ask for.
    pub fn guide(&self) -> anyhow::Result<Option<pio_engine::guided::Guide>> {
        use anyhow::Context;
        use pio_engine::guided::Guide;
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        Ok(if let Some(p) = &self.json_schema {
            let schema: serde_json::Value =
                serde_json::from_str(&read(p)?).with_context(|| format!("{}: not JSON", p.display()))?;
            Some(Guide::JsonSchema(schema))
        } else if let Some(r) = &self.regex {
            Some(Guide::Regex(r.clone()))
        } else if let Some(p) = &self.grammar {
            Some(Guide::Lark(read(p)?))
        } else {
            None
        })
    }
}

/// Speculative decoding.
#[derive(Debug, Args, Clone)]
pub struct SpecArgs {
    /// Speculative decoding: `ngram` (prompt lookup: the tokens that followed the latest earlier
    /// occurrence of the last few tokens are proposed and verified in one forward), `draft`
    /// (a smaller model with the same tokenizer, --draft-model, decodes ahead) or `mtp` (the
    /// model's own multi-token-prediction layer: GLM-4.7-Flash). The output is
    /// the same tokens as without it; proposals that keep failing are shortened down to none.
    #[arg(long, value_name = "METHOD")]
    pub spec: Option<pio_engine::spec::SpecMethod>,
    /// The draft model of `--spec draft` (a GGUF file or a Hugging Face directory, loaded with
    /// the target's options; its KV cache holds as many tokens as the target's).
    #[arg(long, value_name = "PATH")]
    pub draft_model: Option<std::path::PathBuf>,
    /// Most tokens proposed per sequence per step.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub spec_tokens: u16,
    /// Longest run of last tokens the n-gram proposer matches.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub spec_ngram: u16,
    /// Shortest run of last tokens the n-gram proposer matches (shorter matches propose
    /// nothing: they are rarely right).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub spec_ngram_min: u16,
}

impl SpecArgs {
    /// The engine's speculative decoding settings (`None`: off).
    pub fn config(&self) -> Option<pio_engine::spec::SpecConfig> {
        self.spec.map(|method| match method {
            pio_engine::spec::SpecMethod::Ngram => pio_engine::spec::SpecConfig::ngram(
                self.spec_tokens as usize,
                self.spec_ngram as usize,
                self.spec_ngram_min as usize,
            ),
            pio_engine::spec::SpecMethod::Draft => pio_engine::spec::SpecConfig::draft(self.spec_tokens as usize),
            pio_engine::spec::SpecMethod::Mtp => pio_engine::spec::SpecConfig::mtp(self.spec_tokens as usize),
        })
    }

    /// Whether the model's multi-token-prediction layer is asked for (`--spec mtp`): it is then
    /// loaded, and the prefix cache is off (the layer needs every prompt position's hidden
    /// state).
    pub fn mtp(&self) -> bool {
        self.spec == Some(pio_engine::spec::SpecMethod::Mtp)
    }

    /// The draft model `--spec draft` asks for, loaded like the target (`model`) and checked
    /// against its tokenizer; `None` without `--spec draft`.
    pub fn load_draft(
        &self,
        model: &ModelArgs,
        target: &pio_model::LoadedModel,
    ) -> anyhow::Result<Option<Box<dyn pio_model::CausalLm>>> {
        use anyhow::Context;
        let wants = self.spec == Some(pio_engine::spec::SpecMethod::Draft);
        match (&self.draft_model, wants) {
            (None, false) => Ok(None),
            (None, true) => anyhow::bail!("--spec draft needs --draft-model PATH"),
            (Some(_), false) => anyhow::bail!("--draft-model is used by --spec draft"),
            (Some(path), true) => {
                let draft = pio_engine::draft::load_draft(path, &model.load_options(), target.tokenizer.as_ref().ok())
                    .with_context(|| format!("loading the draft model {}", path.display()))?;
                Ok(Some(draft))
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the chat template as one user message.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// An image (PNG, JPEG or WebP) for a vision-language model; repeat for more. Each stands
    /// for the next `<|image_pad|>` of the prompt (one, or already as many as the image takes);
    /// a --prompt without enough of them gets the missing images before its text.
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A sequence as comma-separated token ids (repeat for more sequences).
    #[arg(long = "token-ids", required = true)]
    pub token_ids: Vec<String>,
    /// An image for the first sequence's `<|image_pad|>` placeholders (vision-language models;
    /// repeat for more).
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// Output safetensors file: logits_0, logits_1, ... each [len, vocab] float32.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Add the tokenizer's special tokens (e.g. BOS) as the model expects them.
    #[arg(long)]
    pub add_special_tokens: bool,
}

#[derive(Debug, Args)]
pub struct DetokenizeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    /// Leave special tokens out of the text.
    #[arg(long)]
    pub skip_special_tokens: bool,
}

#[derive(Debug, Args)]
pub struct ChatTemplateArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A JSON file with an OpenAI chat-completions request body.
    #[arg(long)]
    pub request: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to decode for the decode measurement.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Decode after a context of this many tokens (as llama-bench's -d), so attention over a
    /// long cache is part of the measured step; 0 decodes after a 16-token prompt.
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    /// Prompts run together in the prefill forward; above 1, also a batched decode of this many
    /// sequences stepping together (aggregate tokens/s).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Runs of each measurement; the best is reported.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Mixture-of-experts models: draw each token's experts at random instead of asking the
    /// router, to measure the expert cache and disk under a stated routing skew: `uniform`, or
    /// `zipf:S` (a Zipf law with exponent S over a shuffled ranking per layer). A random-weight
    /// model's own routing says nothing about a trained model's. The outputs are no longer the
    /// model's.
    #[arg(long, value_parser = parse_routing)]
    pub synthetic_routing: Option<f64>,
    /// Vision-language models: also time this image through the image processor and the vision
    /// tower, and the prefill of a prompt of its tokens before the --prompt-tokens ones.
    #[arg(long, value_name = "PATH")]
    pub image: Option<std::path::PathBuf>,
    /// Temperature of the decode runs (seeded); 0 decodes greedily, as speculative decoding
    /// is usually measured.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Decode under this constraint (every sequence, one and batched), to measure what
    /// constrained decoding costs.
    #[command(flatten)]
    pub guide: GuideArgs,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// A Hugging Face config.json of a supported architecture.
    #[arg(long)]
    pub config: PathBuf,
    /// A directory with tokenizer.json (and tokenizer_config.json) to ship with the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output: a directory, or a .gguf file.
    #[arg(long)]
    pub out: PathBuf,
    /// Storage type of the matrices: bf16, f16 or f32; for a .gguf output also a GGUF block
    /// format (q4_k, q8_0, q6_k, q4_0, ...), typed per matrix as `pio quantize` does.
    #[arg(long, default_value = "bf16", value_parser = parse_quant)]
    pub dtype: DType,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override a top-level key of the config, e.g. `--set num_experts=128` (the value is read
    /// as JSON, else as a string); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Also write the multi-token-prediction layer (GLM-4.7-Flash), for `--spec mtp`
    /// (llama.cpp does not load such a file).
    #[arg(long)]
    pub mtp: bool,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A GGUF file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Format of the matrices: q8_0, q6_k, q5_k, q5_0, q4_k, q4_0, bf16, f16, ... (nf4, int8 and
    /// int4 have no GGUF type: use them with --quant at load time).
    #[arg(long, value_parser = parse_quant)]
    pub quant: DType,
    /// Output GGUF file.
    #[arg(long)]
    pub out: PathBuf,
}
