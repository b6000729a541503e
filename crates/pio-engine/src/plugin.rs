//! The uniform model-plugin interface: load, generate_text, chat_completion, tokenize,
//! detokenize, unload, report.
//!
//! Every model family implements [`pio_model::CausalLm`]; [`EnginePlugin`] wraps any of them
//! with its tokenizer and an [`EngineHandle`], so a library user drives every family the same
//! way, through the same engine the server and the CLI use (batching, prefix cache, sampling).
//! Calls may come from many threads at once; they are batched together.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pio_model::chat_template::ChatRequest;
use pio_model::config::VisionConfig;
use pio_model::image::{ImageProcessorConfig, PixelValues};
use pio_model::tokenizer::Tokenizer;
use pio_model::{CausalLm, GenerationDefaults, KvCacheType, LoadOptions, ModelInfo};

use crate::engine::{EngineConfig, FinishReason, RequestParams};
use crate::handle::{EngineHandle, Event, RequestStream};
use crate::{EngineError, Result};

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// What a plugin reports about itself and what it has done.
#[derive(Debug, Clone)]
pub struct PluginReport {
    pub info: ModelInfo,
    pub kv_cache_bytes: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub max_model_len: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub preemptions: u64,
    /// Speculative decoding: tokens proposed and verified, and those accepted.
    pub spec_draft_tokens: u64,
    pub spec_accepted_tokens: u64,
    /// Means over the requests so far, in seconds (`None` before the first).
    pub mean_time_to_first_token: Option<f64>,
    pub mean_inter_token_latency: Option<f64>,
}

/// The interface every model offers.
pub trait ModelPlugin: Send + Sync {
    /// Continues `prompt` (tokenized with the model's BOS rule). A vision-language model takes
    /// `params.images` ([`ModelPlugin::image`]) for the prompt's `<|image_pad|>` placeholders;
    /// images without one go before the text.
    fn generate_text(&self, prompt: &str, params: &RequestParams) -> Result<Completion>;
    /// Answers OpenAI-style `messages` through the model's chat template. A vision-language
    /// model also takes their `image_url` parts, as `data:` URLs.
    fn chat_completion(&self, messages: &[serde_json::Value], params: &RequestParams) -> Result<Completion>;
    /// An encoded image (PNG, JPEG or WebP) laid out for the model's vision tower, for
    /// [`RequestParams::images`]; an error for a model that takes no images.
    fn image(&self, encoded: &[u8]) -> Result<Arc<PixelValues>>;
    fn tokenize(&self, text: &str) -> Result<Vec<u32>>;
    fn detokenize(&self, ids: &[u32]) -> Result<String>;
    fn report(&self) -> PluginReport;
    /// Stops the engine and frees the weights and the cache.
    fn unload(self: Box<Self>);
}

/// How [`EnginePlugin::load_with`] loads a model and sizes its engine.
#[derive(Debug, Clone)]
pub struct PluginOptions {
    pub load: LoadOptions,
    /// Storage of the cached keys and values.
    pub kv_cache_type: KvCacheType,
    /// The KV cache's memory; `None`: room for two contexts of `max_model_len` tokens (more
    /// shorter ones), within a quarter of the memory available and 1 GiB, and at least 1024
    /// tokens. The engine touches all of it at start.
    pub kv_cache_bytes: Option<usize>,
    /// The longest context (prompt and output); `None`: the model's, at most 32768.
    pub max_model_len: Option<usize>,
    /// Sequences run at once (more wait).
    pub max_num_seqs: usize,
    /// Threads for the kernels; `None`: the default pool (all cores, or `PIO_THREADS`).
    pub threads: Option<usize>,
    /// Speculative decoding ([`crate::spec`]); `None`: off.
    pub spec: Option<crate::spec::SpecConfig>,
    /// The draft model of speculation by a draft ([`crate::spec::SpecMethod::Draft`]): a
    /// smaller model with the same tokenizer, loaded with the same options.
    pub draft_model: Option<std::path::PathBuf>,
}

impl Default for PluginOptions {
    fn default() -> Self {
        PluginOptions {
            load: LoadOptions::default(),
            kv_cache_type: KvCacheType::default(),
            kv_cache_bytes: None,
            max_model_len: None,
            max_num_seqs: 16,
            threads: None,
            spec: None,
            draft_model: None,
        }
    }
}

/// Any [`CausalLm`] behind the engine.
pub struct EnginePlugin {
    engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    defaults: GenerationDefaults,
    info: ModelInfo,
    kv_cache_bytes: usize,
    /// A vision-language model's image processor and vision tokens.
    vision: Option<(ImageProcessorConfig, VisionConfig)>,
}

impl EnginePlugin {
    /// Loads the checkpoint at `path` (a GGUF file or a Hugging Face directory with its
    /// tokenizer) and starts its engine with a KV cache of `kv_cache_bytes` and contexts of at
    /// most `max_model_len` tokens.
    pub fn load(path: &Path, options: &LoadOptions, kv_cache_bytes: usize, max_model_len: usize) -> Result<Self> {
        let options = PluginOptions {
            load: options.clone(),
            kv_cache_bytes: Some(kv_cache_bytes),
            max_model_len: Some(max_model_len),
            ..Default::default()
        };
        Self::load_with(path, &options)
    }

    /// [`EnginePlugin::load`] with every option: the KV cache's type and size, the threads
    /// (a pool of their own for the load and the engine's kernels).
    pub fn load_with(path: &Path, options: &PluginOptions) -> Result<Self> {
        if options.threads == Some(0) || options.max_num_seqs == 0 || options.max_model_len == Some(0) {
            return Err(EngineError::Invalid("threads, max_num_seqs and max_model_len must be at least 1".into()));
        }
        let pool = match options.threads {
            Some(n) => pio_kernels::parallel::ThreadPool::new(n),
            None => pio_kernels::parallel::ThreadPool::default_pool(),
        };
        pool.install(|| {
            // Speculation by MTP loads the model's MTP layer.
            let mtp = options.spec.is_some_and(|s| s.method == crate::spec::SpecMethod::Mtp);
            let load = pio_model::LoadOptions { mtp: options.load.mtp || mtp, ..options.load.clone() };
            let loaded = pio_model::load_with(path, &load, &mut |_, _| {})?;
            let tokenizer = Arc::new(loaded.tokenizer()?.clone());
            let model: Arc<dyn CausalLm> = Arc::from(loaded.model);
            let max_model_len =
                options.max_model_len.unwrap_or_else(|| model.shape().max_position_embeddings.clamp(1, 32768));
            let kv_type = options.kv_cache_type;
            let per_token = model.kv_bytes_per_token(kv_type);
            let kv_cache_bytes = options.kv_cache_bytes.unwrap_or_else(|| {
                let want = per_token.saturating_mul(max_model_len).saturating_mul(2);
                let avail = (pio_model::available_memory().unwrap_or(4 << 30) / 4).min(1 << 30);
                want.min(avail).max(per_token * 16 * 64)
            });
            // (`for_model` checks that the model can store its cache as `kv_type`.)
            let mut cfg = EngineConfig::for_model(model.as_ref(), kv_type, kv_cache_bytes, max_model_len)?;
            cfg.max_num_seqs = cfg.max_num_seqs.min(options.max_num_seqs);
            cfg.spec = options.spec;
            // The MTP layer needs every prompt position's hidden state.
            cfg.prefix_caching &= !mtp;
            let kv_cache_bytes = per_token * cfg.block_size * cfg.num_blocks;
            let vision = model.vision().map(|v| (v.processor().clone(), v.config().clone()));
            let draft = match &options.draft_model {
                Some(p) => Some(Arc::from(crate::draft::load_draft(p, &options.load, Some(&tokenizer))?)),
                None => None,
            };
            let engine = EngineHandle::spawn_with_draft(model, Some(tokenizer.clone()), cfg, usize::MAX, draft)?;
            Ok(EnginePlugin {
                engine,
                tokenizer,
                defaults: loaded.generation,
                info: loaded.info,
                kv_cache_bytes,
                vision,
            })
        })
    }

    /// The checkpoint's generation defaults (its end-of-sequence tokens and sampling values).
    pub fn defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    /// `prompt` tokenized (with the model's BOS rule) after the placeholders of any of
    /// `images` images it has none for (vision-language models).
    pub fn text_prompt(&self, prompt: &str, images: usize) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(prompt, true)?;
        let mut all = self.placeholders(&ids, images);
        all.extend(ids);
        Ok(all)
    }

    /// OpenAI-style `messages` rendered by the model's chat template (with the generation
    /// prompt) and tokenized; their `image_url` parts (`data:` URLs) are decoded into
    /// `params.images`.
    pub fn chat_prompt(&self, messages: &[serde_json::Value], params: &mut RequestParams) -> Result<Vec<u32>> {
        let template = self
            .tokenizer
            .chat_template()
            .ok_or_else(|| EngineError::Invalid("the model has no chat template".into()))?;
        let body = serde_json::json!({ "messages": messages });
        let placeholder = match self.vision {
            Some(_) => Some(self.tokenizer.decode(&self.placeholders(&[], 1), false)?),
            None => None,
        };
        let (request, urls) =
            ChatRequest::from_openai_json_with_images(&body, placeholder.as_deref(), template.walks_content_parts())?;
        let text = template.render(&request)?;
        for url in &urls {
            if !url.starts_with("data:") {
                return Err(EngineError::Invalid(
                    "the plugin takes images inline, as data: URLs (or through RequestParams::images with generate_text)"
                        .into(),
                ));
            }
            params.images.push(self.image(&pio_model::image::data_url_bytes(url)?)?);
        }
        Ok(self.tokenizer.encode(&text, false)?)
    }

    /// Queues `prompt` (token ids, as [`EnginePlugin::text_prompt`] or
    /// [`EnginePlugin::chat_prompt`] make them) and returns its outputs as they come; with the
    /// model's end-of-sequence tokens when `params` has none. Dropping the stream early
    /// cancels the request.
    pub fn submit(&self, prompt: Vec<u32>, params: &RequestParams) -> Result<RequestStream> {
        self.engine.submit(prompt, self.with_eos(params))
    }

    /// [`crate::vision::missing_placeholders`] (none for a text model).
    fn placeholders(&self, ids: &[u32], images: usize) -> Vec<u32> {
        let Some((_, c)) = &self.vision else { return Vec::new() };
        crate::vision::missing_placeholders(c, ids, images)
    }

    /// `params` with the model's end-of-sequence tokens when the caller gave none.
    fn with_eos(&self, params: &RequestParams) -> RequestParams {
        let mut p = params.clone();
        if p.eos_token_ids.is_empty() {
            p.eos_token_ids = self.defaults.eos_token_ids.clone();
        }
        p
    }

    fn run(&self, prompt: Vec<u32>, params: &RequestParams) -> Result<Completion> {
        let prompt_tokens = prompt.len();
        let mut stream = self.submit(prompt, params)?;
        let mut out = Completion {
            text: String::new(),
            token_ids: Vec::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens,
            cached_tokens: 0,
        };
        while let Some(e) = stream.blocking_recv() {
            match e {
                Event::Output(o) => {
                    out.text.push_str(&o.text);
                    out.token_ids.extend(o.token_ids);
                    out.cached_tokens = o.num_cached_tokens;
                    // Image placeholders grow to the images' token counts in the engine.
                    out.prompt_tokens = o.num_prompt_tokens;
                    if let Some(r) = o.finish_reason {
                        out.finish_reason = r;
                    }
                }
                Event::Error(e) => return Err(EngineError::Invalid(e)),
            }
        }
        Ok(out)
    }
}

impl ModelPlugin for EnginePlugin {
    fn generate_text(&self, prompt: &str, params: &RequestParams) -> Result<Completion> {
        self.run(self.text_prompt(prompt, params.images.len())?, params)
    }

    fn chat_completion(&self, messages: &[serde_json::Value], params: &RequestParams) -> Result<Completion> {
        let mut params = params.clone();
        let prompt = self.chat_prompt(messages, &mut params)?;
        self.run(prompt, &params)
    }

    fn image(&self, encoded: &[u8]) -> Result<Arc<PixelValues>> {
        let Some((processor, _)) = &self.vision else {
            return Err(EngineError::Invalid("this model takes no images".into()));
        };
        let img = pio_model::image::decode(encoded)?;
        Ok(Arc::new(pio_model::image::preprocess(&img, processor)?))
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, true)?)
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.tokenizer.vocab_size()) {
            return Err(EngineError::Invalid(format!("token id {bad} is outside the vocabulary")));
        }
        Ok(self.tokenizer.decode(ids, false)?)
    }

    fn report(&self) -> PluginReport {
        let m = self.engine.metrics();
        let cfg = self.engine.config();
        PluginReport {
            info: self.info.clone(),
            kv_cache_bytes: self.kv_cache_bytes,
            kv_blocks_total: cfg.num_blocks,
            kv_blocks_used: m.kv_blocks_used.load(Ordering::Relaxed),
            max_model_len: cfg.max_model_len,
            prompt_tokens: m.prompt_tokens.load(Ordering::Relaxed),
            generated_tokens: m.generation_tokens.load(Ordering::Relaxed),
            prefix_cache_hit_tokens: m.prefix_cache_hit_tokens.load(Ordering::Relaxed),
            preemptions: m.preemptions.load(Ordering::Relaxed),
            spec_draft_tokens: m.spec_counts().draft_tokens,
            spec_accepted_tokens: m.spec_counts().accepted_tokens,
            mean_time_to_first_token: m.time_to_first_token.mean(),
            mean_inter_token_latency: m.inter_token_latency.mean(),
        }
    }

    fn unload(self: Box<Self>) {
        // Dropping the handle stops and joins the engine thread, which owns the model and cache.
        drop(self);
    }
}
