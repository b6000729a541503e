//! The engine loop: `step()` = schedule -> one batched forward -> sample -> update and report.
//!
//! [`Engine`] is the synchronous core, driven by one thread. [`crate::handle::EngineHandle`] runs
//! it on its own thread and lets many callers submit requests and receive their token streams.
//!
//! Because the forward is batch-invariant (every token's logits are bitwise the same alone, in
//! any batch and under any prefill chunking; see `pio_kernels::matmul` and
//! `pio_kernels::attention`), a request's greedy output does not depend on what else runs with
//! it, on chunked prefill, on prefix-cache hits or on preemption and recomputation.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pio_model::image::PixelValues;
use pio_model::tokenizer::Tokenizer;
use pio_model::{CausalLm, KvCache, KvCacheType};

use crate::kv_cache::{KvCacheManager, SeqId};
use crate::metrics::Metrics;
use crate::runner::{forward, forward_hidden, SeqSlice};
use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::StateCopy;
use crate::scheduler::{Scheduler, SchedulerConfig, Sequence, Streaming};
use crate::spec::{Adaptive, ProposalRequest, Propose, SpecConfig, SpecMethod};
use crate::stop::StopStrings;
use crate::vision::VisionInputs;
use crate::{EngineError, Result};

/// Sizes and limits of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV cache block.
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub num_blocks: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one forward (prompts longer than this are prefilled in chunks).
    pub max_batch_tokens: usize,
    /// Longest sequence (prompt + output); at most what the cache holds.
    pub max_model_len: usize,
    /// Reuse the K/V of shared prompt prefixes.
    pub prefix_caching: bool,
    /// Element type of the KV cache.
    pub kv_cache_type: KvCacheType,
    /// The memory bound the model was loaded under ([`pio_model::LoadOptions::max_memory`]): a
    /// KV cache (recurrent state included) larger than what the bound keeps for the cache and
    /// scratch ([`pio_model::memory_reserve`]) is refused.
    pub max_memory: Option<usize>,
    /// Speculative decoding ([`crate::spec`]); `None`: off. Streaming windows decode without
    /// it.
    pub spec: Option<SpecConfig>,
}

impl EngineConfig {
    /// Recurrent-state slots for `model` (0 when it keeps no per-sequence state): one per
    /// running sequence, and with prefix caching two more each, for its checkpoint and for a
    /// snapshot in the prefix cache.
    pub fn state_slots(&self, model: &dyn CausalLm) -> usize {
        match (model.cache_spec().has_state(), self.prefix_caching) {
            (false, _) => 0,
            (true, false) => self.max_num_seqs,
            (true, true) => 3 * self.max_num_seqs,
        }
    }

    /// Room for `num_tokens` tokens in blocks of 16, everything else at its default: 64
    /// sequences, 512 tokens per forward, the prefix cache off (tests, tools and benchmarks
    /// that run known sequences; a server takes [`for_model`](Self::for_model)).
    pub fn for_tokens(num_tokens: usize, kv_cache_type: KvCacheType) -> EngineConfig {
        let block_size = 16;
        let num_blocks = num_tokens.div_ceil(block_size).max(1);
        EngineConfig {
            block_size,
            num_blocks,
            max_num_seqs: 64,
            max_batch_tokens: 512,
            max_model_len: num_blocks * block_size,
            prefix_caching: false,
            kv_cache_type,
            max_memory: None,
            spec: None,
        }
    }

    /// A config for `model` whose cache takes at most `kv_cache_bytes` (recurrent state
    /// included, at most half of it, which caps the running sequences), with the context capped
    /// at `max_model_len` (and at the model's own length and what the cache holds).
    pub fn for_model(
        model: &dyn CausalLm,
        kv_cache_type: KvCacheType,
        kv_cache_bytes: usize,
        max_model_len: usize,
    ) -> Result<EngineConfig> {
        model.check_kv_cache_type(kv_cache_type).map_err(EngineError::Invalid)?;
        let block_size = 16;
        // Recurrent state (three slots per sequence: its own, its checkpoint, a snapshot) takes
        // at most half the budget, which also caps the sequences running at once.
        let mut max_num_seqs = 64;
        let per_seq = 3 * model.cache_spec().state_bytes_per_seq();
        if let Some(fit) = (kv_cache_bytes / 2).checked_div(per_seq) {
            if fit == 0 {
                return Err(EngineError::Invalid(format!(
                    "a cache budget of {kv_cache_bytes} bytes is too small for this model: a sequence's recurrent \
                     state takes {} bytes in each of 3 slots (its own, a checkpoint, a prefix-cache snapshot), \
                     which may use half the budget; give at least {} bytes",
                    per_seq / 3,
                    2 * per_seq
                )));
            }
            max_num_seqs = fit.min(max_num_seqs);
        }
        let state_bytes = max_num_seqs * per_seq;
        let kv_cache_bytes = kv_cache_bytes.saturating_sub(state_bytes);
        // One pool of blocks, each holding every layer's share (the model's cache spec).
        let per_block = model.cache_spec().bytes_per_block(kv_cache_type, block_size).max(1);
        let num_blocks = kv_cache_bytes / per_block;
        if num_blocks == 0 {
            return Err(EngineError::Invalid(format!(
                "a KV cache of {kv_cache_bytes} bytes holds no block of {block_size} tokens ({per_block} bytes)"
            )));
        }
        let max_model_len = max_model_len.min(model.shape().max_position_embeddings);
        // Sliding windows everywhere: the cache needs to hold the window, not the context.
        let max_model_len = match model.attention_window() {
            Some(_) => max_model_len,
            None => max_model_len.min(num_blocks * block_size),
        };
        Ok(EngineConfig {
            block_size,
            num_blocks,
            max_num_seqs,
            max_batch_tokens: 512,
            max_model_len,
            prefix_caching: true,
            kv_cache_type,
            max_memory: None,
            spec: None,
        })
    }
}

/// What a request is checked against: the engine's sizes and what the model can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub cfg: EngineConfig,
    pub vocab_size: usize,
    pub has_tokenizer: bool,
    /// [`CausalLm::can_shift_positions`].
    pub can_shift_positions: bool,
    /// [`CausalLm::attention_window`].
    pub model_window: Option<usize>,
}

impl RequestLimits {
    pub fn new(cfg: EngineConfig, model: &dyn CausalLm, has_tokenizer: bool) -> RequestLimits {
        RequestLimits {
            cfg,
            vocab_size: model.shape().vocab_size,
            has_tokenizer,
            can_shift_positions: model.can_shift_positions(),
            model_window: model.attention_window(),
        }
    }

    /// The streaming window a request asks for, checked: `None` without one.
    pub fn streaming(&self, params: &RequestParams) -> Result<Option<Streaming>> {
        let bs = self.cfg.block_size;
        let Some(window) = params.attention_window else {
            if params.attention_sinks.is_some() {
                return Err(EngineError::Invalid("attention_sinks needs attention_window".into()));
            }
            return Ok(None);
        };
        let sinks = params.attention_sinks.unwrap_or(0);
        if sinks >= window {
            return Err(EngineError::Invalid(format!(
                "attention_sinks ({sinks}) must be smaller than attention_window ({window})"
            )));
        }
        let sink_blocks = sinks.div_ceil(bs);
        let least = (sink_blocks + 2) * bs;
        if window < least {
            return Err(EngineError::Invalid(format!(
                "attention_window ({window}) must be at least {least} tokens: the sinks' blocks and two more \
                 blocks of {bs}"
            )));
        }
        if window > self.cfg.max_model_len {
            return Err(EngineError::Invalid(format!(
                "attention_window ({window}) is larger than the context the cache holds ({})",
                self.cfg.max_model_len
            )));
        }
        if self.model_window.is_some() {
            return Err(EngineError::Invalid(
                "attention_window: every layer of this model has a sliding window already, so its cache \
                 stays bounded without one"
                    .into(),
            ));
        }
        if !self.can_shift_positions {
            return Err(EngineError::Invalid("attention_window: this model cannot shift cached positions".into()));
        }
        let window_blocks = window / bs;
        let drop_blocks = ((window_blocks - sink_blocks) / 4).max(1);
        Ok(Some(Streaming { sink_blocks, window_blocks, drop_blocks }))
    }
}

/// What a request asks for, beyond its prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestParams {
    pub sampling: SamplingParams,
    /// Most new tokens (`None`: until the context is full).
    pub max_tokens: Option<usize>,
    /// No stop (token or string) before this many tokens.
    pub min_tokens: usize,
    /// The model's end-of-sequence tokens (ignored with `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// More tokens that end generation (never ignored).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Strings that end generation; the text is cut before them.
    pub stop: Vec<String>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`: -100 bans a token,
    /// 100 all but forces it); the reported log-probabilities are the model's, before it.
    pub logit_bias: Vec<(u32, f32)>,
    /// Constrained decoding: what the output must match ([`crate::guided`]); it then ends
    /// with an end token once the grammar is complete.
    pub guide: Option<crate::guided::Guide>,
    /// Report the sampled token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Return the logits of every prompt position from this one on (teacher forcing:
    /// perplexity, parity checks), in [`RequestOutput::prompt_logits`] as they are computed.
    /// Those positions are computed even when the prefix cache holds them. With
    /// `max_tokens: Some(0)` the request only scores its prompt.
    pub prompt_logits: Option<usize>,
    /// Streaming past the context (StreamingLLM attention sinks): the sequence keeps at most
    /// this many tokens in its cache, the first [`attention_sinks`](Self::attention_sinks) and
    /// the most recent, dropping the oldest others block by block (a quarter of the window at a
    /// time) and re-rotating the kept keys for their new positions, so it may generate without
    /// end in bounded memory. Whole blocks: the window rounds down and the sinks up to
    /// multiples of the block size. Off the prefix cache.
    pub attention_window: Option<usize>,
    /// Tokens at the start a streaming window always keeps (needs `attention_window`).
    pub attention_sinks: Option<usize>,
    /// The request's images, laid out by the model's image processor, in the order of their
    /// placeholders in the prompt (vision-language models): each run of the image token, one
    /// token or already as many as the image takes, stands for the next image.
    pub images: Vec<Arc<PixelValues>>,
}

impl Default for RequestParams {
    fn default() -> Self {
        RequestParams {
            sampling: SamplingParams::greedy(),
            max_tokens: None,
            min_tokens: 0,
            eos_token_ids: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            stop: Vec::new(),
            logit_bias: Vec::new(),
            guide: None,
            logprobs: None,
            prompt_logits: None,
            attention_window: None,
            attention_sinks: None,
            images: Vec::new(),
        }
    }
}

/// Why a request ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Cancelled by its caller.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// A token's log-probability (natural log, over the model's raw distribution) and the most
/// likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What one step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub id: SeqId,
    /// Tokens generated in this step (none when the step only finished the request).
    pub token_ids: Vec<u32>,
    /// Text that became final in this step (never part of a stop string or of an incomplete
    /// UTF-8 character). Empty without a tokenizer.
    pub text: String,
    /// One per token in `token_ids`, when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub num_prompt_tokens: usize,
    /// Tokens generated so far.
    pub num_generated_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
    /// With [`RequestParams::prompt_logits`]: the logits rows (`vocab` each, in position order)
    /// of the prompt positions this step computed, continuing the previous output's.
    pub prompt_logits: Vec<f32>,
}

/// Per-request state beyond what the scheduler keeps.
struct RequestState {
    params: RequestParams,
    max_tokens: usize,
    sampler: Sampler,
    text: TextState,
    arrival: Instant,
    last_token: Option<Instant>,
    /// Still counted as waiting in the metrics.
    queued: bool,
    /// Prompt positions whose logits were returned (a preempted request recomputes them
    /// without returning them again).
    logits_sent: usize,
    /// The request's images, made ready for the model.
    vision: Option<VisionInputs>,
    /// Its speculative proposal length.
    spec: Adaptive,
    /// Where its output is in its grammar (guided requests).
    guide: Option<crate::guided::GuideState>,
}

/// The engine core: a model, its paged KV cache, the scheduler and the requests.
pub struct Engine<'m> {
    model: &'m dyn CausalLm,
    tokenizer: Option<&'m Tokenizer>,
    /// What requests are checked against (the config and what the model can do).
    limits: RequestLimits,
    cache: KvCache,
    sched: Scheduler,
    reqs: HashMap<SeqId, RequestState>,
    metrics: Arc<Metrics>,
    next_id: SeqId,
    /// The vision tower's outputs of recent images.
    image_features: crate::vision::FeatureCache,
    /// Requests whose images are going through the tower, oldest first, with their sequences
    /// (queued in the scheduler once every image is done).
    encoding: std::collections::VecDeque<(SeqId, crate::vision::PendingVision, Sequence)>,
    /// How long a step may spend in the tower while other sequences run (at least one block).
    encode_slice: Duration,
    /// Proposes tokens instead of the n-gram lookup ([`Engine::set_proposer`]).
    proposer: Option<Proposer<'m>>,
    /// Compiles guided requests' grammars (made at the first one: it walks the vocabulary).
    guides: crate::guided::Guides,
}

/// A speculative proposer ([`crate::spec::Propose`]; a closure of (sequence id, its tokens, the
/// most tokens wanted) is one).
pub type Proposer<'m> = Box<dyn Propose + 'm>;

/// [`Engine::set_encode_slice`]'s default: a tower block of a 1024 x 1024 image is ~1.7 s on
/// 2 cores and the whole tower 24 of them, so other streams see a pause of at most a block per
/// step instead of the whole tower; a small image's blocks (~0.1 s) run a few per step.
const ENCODE_SLICE: Duration = Duration::from_millis(100);

impl<'m> Engine<'m> {
    /// An engine for `model`. Speculation by a draft model (`cfg.spec` of
    /// [`SpecMethod::Draft`]) takes [`with_draft`](Self::with_draft) instead.
    pub fn new(model: &'m dyn CausalLm, tokenizer: Option<&'m Tokenizer>, cfg: EngineConfig) -> Result<Engine<'m>> {
        Self::with_draft(model, tokenizer, cfg, None)
    }

    /// An engine for `model` whose speculative proposals come from `draft` (a smaller model
    /// with the same vocabulary, with its own KV cache of as many tokens as the target's),
    /// which `cfg.spec` must ask for ([`SpecMethod::Draft`]); `None` as [`new`](Self::new).
    pub fn with_draft(
        model: &'m dyn CausalLm,
        tokenizer: Option<&'m Tokenizer>,
        cfg: EngineConfig,
        draft: Option<&'m dyn CausalLm>,
    ) -> Result<Engine<'m>> {
        let wants_draft = cfg.spec.is_some_and(|s| s.method == SpecMethod::Draft);
        let proposer: Option<Proposer<'m>> = match (draft, wants_draft) {
            (Some(d), true) => Some(Box::new(crate::draft::DraftModel::new(d, model, &cfg)?)),
            (None, false) if cfg.spec.is_some_and(|s| s.method == SpecMethod::Mtp) => {
                Some(Box::new(crate::mtp::MtpProposer::new(model, &cfg)?))
            }
            (None, false) => None,
            (None, true) => {
                return Err(EngineError::Invalid("speculation by a draft model needs the draft model".into()))
            }
            (Some(_), false) => {
                return Err(EngineError::Invalid(
                    "a draft model was given, but speculation is not set to use one (method draft)".into(),
                ))
            }
        };
        model.check_kv_cache_type(cfg.kv_cache_type).map_err(EngineError::Invalid)?;
        if cfg.block_size == 0 || cfg.num_blocks == 0 || cfg.max_num_seqs == 0 || cfg.max_batch_tokens == 0 {
            return Err(EngineError::Invalid(format!("engine sizes must be positive: {cfg:?}")));
        }
        // A model whose every layer has a sliding window keeps only the window's blocks (and a
        // forward's worth), so its sequences may outgrow the cache.
        let window = model.attention_window();
        let holds = cfg.block_size * cfg.num_blocks;
        let needs = match window {
            Some(w) => cfg.max_model_len.min(w + cfg.max_batch_tokens + 2 * cfg.block_size),
            None => cfg.max_model_len,
        };
        if cfg.max_model_len == 0 || needs > holds {
            return Err(EngineError::Invalid(format!(
                "max_model_len {} must be in 1..={holds} (what the KV cache holds{})",
                cfg.max_model_len,
                if window.is_some() { ", beyond a sliding window and a forward's tokens" } else { "" }
            )));
        }
        let state_slots = cfg.state_slots(model);
        let sched = Scheduler::new(
            SchedulerConfig { max_num_seqs: cfg.max_num_seqs, max_batch_tokens: cfg.max_batch_tokens, window },
            KvCacheManager::new(cfg.block_size, cfg.num_blocks, cfg.prefix_caching).with_state_slots(state_slots),
        );
        let metrics = Arc::new(Metrics::default());
        metrics.kv_blocks_total.store(cfg.num_blocks, Ordering::Relaxed);
        if let Some(max) = cfg.max_memory {
            let spec = model.cache_spec();
            let bytes = cfg.num_blocks * spec.bytes_per_block(cfg.kv_cache_type, cfg.block_size)
                + state_slots * spec.state_bytes_per_seq();
            let reserve = pio_model::memory_reserve(max);
            if bytes > reserve {
                return Err(EngineError::Invalid(format!(
                    "the KV cache needs {:.1} MiB, more than the {:.1} MiB a memory bound of {:.2} GiB keeps for the KV \
                     cache and scratch (an eighth of the bound, 128 MiB to 2 GiB): shorten the context or raise \
                     --max-memory",
                    bytes as f64 / (1 << 20) as f64,
                    reserve as f64 / (1 << 20) as f64,
                    max as f64 / (1u64 << 30) as f64
                )));
            }
        }
        let cache = model.new_kv_cache_with(cfg.block_size, cfg.num_blocks, cfg.kv_cache_type, state_slots);
        let limits = RequestLimits::new(cfg, model, tokenizer.is_some());
        Ok(Engine {
            model,
            tokenizer,
            limits,
            cache,
            sched,
            reqs: HashMap::new(),
            metrics,
            next_id: 0,
            image_features: Default::default(),
            encoding: Default::default(),
            encode_slice: ENCODE_SLICE,
            proposer,
            guides: Default::default(),
        })
    }

    pub fn config(&self) -> EngineConfig {
        self.limits.cfg
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Shares an existing metrics sink (the handle's) instead of the engine's own.
    /// Shares a grammar compiler (the handle's) instead of the engine's own.
    pub fn set_guides(&mut self, guides: crate::guided::Guides) {
        self.guides = guides;
    }

    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        metrics.kv_blocks_total.store(self.limits.cfg.num_blocks, Ordering::Relaxed);
        self.metrics = metrics;
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_work() || !self.encoding.is_empty()
    }

    /// Replaces the proposer of speculative decoding (the n-gram lookup, or the draft model;
    /// `EngineConfig::spec` still sets the most tokens per proposal and turns it on) with
    /// another; `None` goes back to the n-gram lookup.
    pub fn set_proposer(&mut self, proposer: Option<Proposer<'m>>) {
        self.proposer = proposer;
    }

    /// How long one [`step`](Self::step) may spend in the vision tower while other sequences
    /// are running: it runs tower blocks (at least one) of the oldest request still encoding
    /// until this has passed, then the batch. Without other sequences the tower runs through.
    /// The features do not depend on it.
    pub fn set_encode_slice(&mut self, slice: Duration) {
        self.encode_slice = slice;
    }

    pub fn num_requests(&self) -> usize {
        self.reqs.len()
    }

    /// Makes the whole KV cache resident now (see [`KvCache::prefault`]).
    pub fn prefault_cache(&mut self) {
        self.cache.prefault();
    }

    /// Bytes the KV cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.nbytes()
    }

    /// What requests are checked against.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// Checks a request without queueing it.
    pub fn validate(&self, prompt: &[u32], params: &RequestParams) -> Result<()> {
        validate_request(&self.limits, prompt, params)
    }

    /// Queues a request; its id comes back in every [`RequestOutput`] for it.
    pub fn add_request(&mut self, prompt: Vec<u32>, params: RequestParams) -> Result<SeqId> {
        let id = self.next_id;
        self.add_request_with_id(id, prompt, params)?;
        Ok(id)
    }

    /// As [`add_request`](Self::add_request) with the caller's id (which must be unused).
    pub fn add_request_with_id(&mut self, id: SeqId, prompt: Vec<u32>, mut params: RequestParams) -> Result<()> {
        if self.reqs.contains_key(&id) {
            return Err(EngineError::Invalid(format!("request id {id} is in use")));
        }
        if !params.images.is_empty() && params.attention_window.is_some() {
            return Err(EngineError::Invalid("a streaming window (attention_window) cannot take images".into()));
        }
        // Placeholders expanded and the request checked; the vision tower runs in the steps
        // (once per image, its features living as long as the request).
        let images = std::mem::take(&mut params.images);
        let limits = &self.limits;
        let (prompt, mut pending, images) =
            crate::vision::prepare(self.model, prompt, images, |p| validate_request(limits, p, &params))?;
        self.next_id = self.next_id.max(id + 1);
        let sampler = Sampler::new(params.sampling.clone())?;
        let guide = match &params.guide {
            Some(g) => Some(self.guides.matcher(self.tokenizer, self.model.shape().vocab_size, g)?),
            None => None,
        };
        let streaming = self.limits.streaming(&params)?;
        // A streaming window has no length limit beyond the caller's.
        let room =
            if streaming.is_some() { usize::MAX } else { self.limits.cfg.max_model_len.saturating_sub(prompt.len()) };
        let max_tokens = params.max_tokens.map_or(room, |m| m.min(room));
        let text = TextState::new(StopStrings::new(params.stop.clone()));
        let mut seq = Sequence::new(id, prompt);
        seq.logits_from = params.prompt_logits;
        seq.streaming = streaming;
        seq.images = images;
        // Images found in the feature cache need no tower time: such a request is queued now.
        let vision = match pending.take() {
            Some(mut p) => {
                if p.take_cached(&mut self.image_features) {
                    Some(p.into_inputs()?)
                } else {
                    pending = Some(p);
                    None
                }
            }
            None => None,
        };
        self.reqs.insert(
            id,
            RequestState {
                params,
                max_tokens,
                sampler,
                text,
                arrival: Instant::now(),
                last_token: None,
                queued: true,
                logits_sent: 0,
                vision,
                spec: Adaptive::new(self.limits.cfg.spec.map_or(0, |c| c.num_tokens)),
                guide,
            },
        );
        match pending {
            Some(p) => self.encoding.push_back((id, p, seq)),
            None => self.sched.add(seq),
        }
        self.metrics.requests_waiting.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs the vision tower now for every request waiting on it (which [`step`](Self::step)
    /// otherwise spreads over its steps while other sequences run); their sequences are queued.
    pub fn encode_images(&mut self) -> Result<()> {
        self.advance_encoding(false)
    }

    /// Runs the vision tower for the requests waiting on it, oldest first: through, unless
    /// `share` and other sequences are running; then blocks until
    /// [`set_encode_slice`](Self::set_encode_slice)'s time is spent. A request whose images are
    /// all done joins the scheduler's queue.
    fn advance_encoding(&mut self, share: bool) -> Result<()> {
        let Some(tower) = self.model.vision() else {
            return Ok(());
        };
        let (mut others, start, slice) = (share && self.sched.has_work(), Instant::now(), self.encode_slice);
        while let Some((_, pending, _)) = self.encoding.front_mut() {
            if !pending.advance(tower, &mut self.image_features, || !others || start.elapsed() < slice)? {
                return Ok(());
            }
            if let Some((id, pending, seq)) = self.encoding.pop_front() {
                if let Some(r) = self.reqs.get_mut(&id) {
                    r.vision = Some(pending.into_inputs()?);
                    self.sched.add(seq);
                    // The next request's tower shares the step with this one's prefill.
                    others = share;
                }
            }
            if others && start.elapsed() >= slice {
                break;
            }
        }
        Ok(())
    }

    /// Removes a request and frees its blocks; false if it is not (or no longer) here.
    pub fn abort(&mut self, id: SeqId) -> bool {
        // A request still in the vision tower has no sequence in the scheduler yet.
        let known = self.reqs.contains_key(&id);
        self.finish(id, FinishReason::Abort);
        known
    }

    /// Teacher forcing: the logits (`[rows, vocab]` flattened) of every position from `from` on
    /// of each token sequence, run as scoring requests until all are done (batched as the
    /// config allows). The engine must hold no other request.
    pub fn score(&mut self, seqs: &[Vec<u32>], from: usize) -> Result<Vec<Vec<f32>>> {
        let params = RequestParams { max_tokens: Some(0), prompt_logits: Some(from), ..Default::default() };
        self.score_with(seqs, &params)
    }

    /// [`score`](Self::score) with requests of `params` (which must have `max_tokens: Some(0)`
    /// and `prompt_logits`), e.g. through a streaming window.
    pub fn score_with(&mut self, seqs: &[Vec<u32>], params: &RequestParams) -> Result<Vec<Vec<f32>>> {
        if self.has_work() {
            return Err(EngineError::Invalid("scoring needs an idle engine".into()));
        }
        if params.max_tokens != Some(0) || params.prompt_logits.is_none() {
            return Err(EngineError::Invalid("scoring requests take max_tokens 0 and prompt_logits".into()));
        }
        for s in seqs {
            self.validate(s, params)?;
        }
        let ids = seqs.iter().map(|s| self.add_request(s.clone(), params.clone())).collect::<Result<Vec<_>>>()?;
        let mut out: HashMap<SeqId, Vec<f32>> = ids.iter().map(|&id| (id, Vec::new())).collect();
        while self.has_work() {
            for o in self.step()? {
                if let Some(rows) = out.get_mut(&o.id) {
                    rows.extend_from_slice(&o.prompt_logits);
                }
            }
        }
        Ok(ids.iter().map(|id| out.remove(id).unwrap_or_default()).collect())
    }

    /// Runs one step and returns what each request it touched produced: a token for every
    /// sequence that reached its end this step (decoding, or the last chunk of its prompt).
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        self.advance_encoding(true)?;
        self.propose()?;
        let plan = self.sched.schedule();
        self.metrics.preemptions.fetch_add(plan.preempted.len() as u64, Ordering::Relaxed);
        self.metrics.prefix_cache_hit_tokens.fetch_add(plan.prefix_hit_tokens as u64, Ordering::Relaxed);
        if plan.scheduled.is_empty() {
            self.publish_gauges();
            return Ok(Vec::new());
        }
        for s in &plan.scheduled {
            if let Some(r) = self.reqs.get_mut(&s.id) {
                if r.queued {
                    r.queued = false;
                    self.metrics.requests_waiting.fetch_sub(1, Ordering::Relaxed);
                    let prompt = self.sched.get(s.id).map_or(0, |q| q.num_prompt_tokens);
                    self.metrics.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
                }
            }
        }
        for &id in &plan.preempted {
            if let Some(r) = self.reqs.get_mut(&id) {
                if !r.queued {
                    r.queued = true;
                    self.metrics.requests_waiting.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let vocab = self.model.shape().vocab_size;
        for sh in &plan.shifts {
            if plan.scheduled.iter().any(|s| s.id == sh.id) {
                let blocks = self.sched.kv().block_table(sh.id).get(sh.first_block..).unwrap_or(&[]);
                self.model.shift_positions(&mut self.cache, blocks, sh.delta)?;
            }
        }
        for c in &plan.state_copies {
            if let StateCopy::Restore { id, from } = *c {
                let to = self
                    .sched
                    .kv()
                    .state_slot(id)
                    .ok_or_else(|| EngineError::Invalid(format!("sequence {id} has no state slot")))?;
                self.cache.copy_state(from as usize, to as usize)?;
            }
        }
        // Recurrent state of sequences verifying proposals, as it was before them: put back if
        // a proposal fails (the accepted tokens then run again to bring it forward).
        let mut saved_states = Vec::new();
        if self.model.cache_spec().has_state() {
            for s in &plan.scheduled {
                let drafting = s.samples && self.sched.get(s.id).is_some_and(|q| q.num_draft > 0);
                let Some(slot) = self.sched.kv().state_slot(s.id).filter(|_| drafting) else { continue };
                let mut buf = Vec::new();
                self.cache.save_state(slot as usize, &mut buf)?;
                saved_states.push((s.id, s.start, buf));
            }
        }
        let logits = {
            let kv = self.sched.kv();
            let mut slices = Vec::with_capacity(plan.scheduled.len());
            for s in &plan.scheduled {
                let seq =
                    self.sched.get(s.id).ok_or_else(|| EngineError::Invalid(format!("lost sequence {}", s.id)))?;
                let end = s.start + s.num_tokens;
                // Rows from the first wanted prompt position, else only the sampled one.
                let wanted = self.reqs.get(&s.id).and_then(|r| r.params.prompt_logits.map(|p| p.max(r.logits_sent)));
                let mut logits_from = wanted.filter(|&p| p < seq.num_prompt_tokens).unwrap_or(end);
                if s.samples {
                    // Proposals: a row for each, and one for the token before them.
                    logits_from = logits_from.min(end - 1 - seq.num_draft);
                }
                slices.push(SeqSlice {
                    token_ids: &seq.token_ids,
                    start: s.start,
                    num_tokens: s.num_tokens,
                    block_table: kv.block_table(s.id),
                    shift: seq.shift,
                    logits_from,
                    state_slot: kv.state_slot(s.id),
                    snapshot: plan.state_copies.iter().find_map(|c| match *c {
                        StateCopy::Snapshot { id, position, to } if id == s.id => Some((position, to)),
                        _ => None,
                    }),
                    vision: self.reqs.get(&s.id).and_then(|r| r.vision.as_ref()).map(|v| (v, &seq.images[..])),
                });
            }
            if self.proposer.as_ref().is_some_and(|p| p.wants_hidden()) {
                forward_hidden(self.model, &mut self.cache, &slices)?
            } else {
                (forward(self.model, &mut self.cache, &slices)?, Vec::new())
            }
        };
        let (logits, hidden) = logits;
        self.sched.complete(&plan);
        let mut outputs = Vec::new();
        for (k, (s, mut rows)) in plan.scheduled.iter().zip(logits).enumerate() {
            // Positions of the slice committed by this step (all but rejected proposals).
            let mut committed = s.num_tokens;
            let end = s.start + s.num_tokens;
            // The prompt positions among the rows go back to the caller.
            let mut prompt_logits = Vec::new();
            if let Some(r) = self.reqs.get_mut(&s.id) {
                let num_prompt = self.sched.get(s.id).map_or(0, |q| q.num_prompt_tokens);
                let first = end - rows.len() / vocab;
                let prompt_end = end.min(num_prompt);
                if r.params.prompt_logits.is_some() && prompt_end > first {
                    prompt_logits = rows[..(prompt_end - first) * vocab].to_vec();
                    r.logits_sent = prompt_end;
                }
            }
            let num_draft = self.sched.get(s.id).map_or(0, |q| q.num_draft);
            if s.samples && num_draft > 0 {
                let at = rows.len().saturating_sub((num_draft + 1) * vocab);
                let (out, accepted) = self.verify(s.id, &mut rows[at..], prompt_logits)?;
                outputs.extend(out);
                committed = s.num_tokens - num_draft + accepted;
                if accepted < num_draft {
                    if let Some((_, start, saved)) = saved_states.iter().find(|(id, _, _)| *id == s.id) {
                        if let Some(slot) = self.sched.kv().state_slot(s.id) {
                            self.cache.restore_state(slot as usize, saved)?;
                            self.sched.rewind_computed(s.id, *start);
                            committed = 0;
                        }
                    }
                }
            } else if s.samples {
                let at = rows.len().saturating_sub(vocab);
                if let Some(out) = self.sample_one(s.id, &mut rows[at..], prompt_logits)? {
                    outputs.push(out);
                }
            } else if !prompt_logits.is_empty() {
                if let Some(out) = self.progress(s.id, prompt_logits) {
                    outputs.push(out);
                }
            }
            // The hidden states of the committed positions, for a proposer that takes them (a
            // finished request's proposer state is already gone).
            if let (Some(h), Some(p)) = (hidden.get(k), self.proposer.as_mut()) {
                let width = h.len() / s.num_tokens.max(1);
                if self.reqs.contains_key(&s.id) && width > 0 {
                    p.observe(s.id, s.start, &h[..committed * width], width);
                }
            }
        }
        self.publish_gauges();
        Ok(outputs)
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.requests_running.store(self.sched.num_running(), Ordering::Relaxed);
        m.kv_blocks_used.store(self.sched.kv().pool().num_used(), Ordering::Relaxed);
    }

    /// An output carrying only prompt logits (a step part-way through the prompt).
    fn progress(&self, id: SeqId, prompt_logits: Vec<f32>) -> Option<RequestOutput> {
        let seq = self.sched.get(id)?;
        Some(RequestOutput {
            id,
            token_ids: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            finish_reason: None,
            num_prompt_tokens: seq.num_prompt_tokens,
            num_generated_tokens: seq.num_generated(),
            num_cached_tokens: seq.num_cached_tokens,
            prompt_logits,
        })
    }

    /// Gives each decoding sequence the tokens its proposer offers (speculative decoding). A
    /// model with recurrent state has its state saved before the step and put back when a
    /// proposal fails; the accepted tokens then run again in the next step (recomputing from the
    /// last committed token rather than keeping a state per proposed position).
    fn propose(&mut self) -> Result<()> {
        let Some(cfg) = self.limits.cfg.spec else { return Ok(()) };
        if cfg.num_tokens == 0 {
            return Ok(());
        }
        let max_len = self.limits.cfg.max_model_len;
        let mut wants = Vec::new();
        for (&id, r) in self.reqs.iter_mut() {
            let Some(seq) = self.sched.get(id).filter(|q| q.takes_draft()) else { continue };
            // Room: the request's remaining tokens less the one the step samples anyway, and
            // the context.
            let left = r.max_tokens.saturating_sub(seq.num_generated() + 1);
            let room = max_len.saturating_sub(seq.token_ids.len() + 1);
            let k = r.spec.take_len().min(left).min(room);
            if k > 0 {
                wants.push(ProposalRequest { id, tokens: &seq.token_ids, max: k });
            }
        }
        if wants.is_empty() {
            return Ok(());
        }
        // In id order, so a batched proposer sees the same batch whatever the map's order.
        wants.sort_by_key(|w| w.id);
        let start = Instant::now();
        let drafts = match self.proposer.as_mut() {
            Some(p) => p.propose(&wants)?,
            None => wants
                .iter()
                .map(|w| crate::spec::ngram_propose(w.tokens, cfg.ngram_max, cfg.ngram_min, w.max))
                .collect(),
        };
        self.metrics.spec_propose_us.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        let chosen: Vec<(SeqId, usize)> = wants.iter().map(|w| (w.id, w.max)).collect();
        for ((id, k), mut draft) in chosen.into_iter().zip(drafts) {
            draft.truncate(k);
            self.sched.propose(id, &draft);
        }
        Ok(())
    }

    /// Samples the rows of a step that verified proposals: position by position, as decoding
    /// without them would, keeping each proposal while it equals the sampled token; the first
    /// token that differs (or the one after the last proposal) ends the step. One output with
    /// every committed token, and the number of proposals accepted.
    fn verify(
        &mut self,
        id: SeqId,
        rows: &mut [f32],
        prompt_logits: Vec<f32>,
    ) -> Result<(Option<RequestOutput>, usize)> {
        let vocab = self.model.shape().vocab_size;
        let draft = self.sched.take_draft(id);
        let mut merged: Option<RequestOutput> = None;
        let mut accepted = 0;
        let mut prompt_logits = Some(prompt_logits);
        for (i, row) in rows.chunks_exact_mut(vocab).enumerate() {
            let Some(out) = self.sample_one(id, row, prompt_logits.take().unwrap_or_default())? else { break };
            let (token, done) = (out.token_ids.last().copied(), out.finish_reason.is_some());
            merged = Some(match merged.take() {
                None => out,
                Some(mut m) => {
                    m.token_ids.extend(out.token_ids);
                    m.text.push_str(&out.text);
                    m.logprobs.extend(out.logprobs);
                    m.finish_reason = out.finish_reason;
                    m.num_generated_tokens = out.num_generated_tokens;
                    m
                }
            });
            match draft.get(i) {
                Some(&d) if !done && token == Some(d) => {
                    accepted += 1;
                    self.sched.accept_computed(id);
                }
                _ => break,
            }
        }
        let m = &self.metrics;
        m.spec_drafts.fetch_add(1, Ordering::Relaxed);
        m.spec_draft_tokens.fetch_add(draft.len() as u64, Ordering::Relaxed);
        m.spec_accepted_tokens.fetch_add(accepted as u64, Ordering::Relaxed);
        if let (Some(r), Some(cfg)) = (self.reqs.get_mut(&id), self.limits.cfg.spec) {
            r.spec.update(draft.len(), accepted, cfg.num_tokens);
        }
        Ok((merged, accepted))
    }

    /// Samples the next token of `id` from its logits row and decides whether it is finished.
    fn sample_one(&mut self, id: SeqId, logits: &mut [f32], prompt_logits: Vec<f32>) -> Result<Option<RequestOutput>> {
        let (Some(r), Some(seq)) = (self.reqs.get_mut(&id), self.sched.get(id)) else { return Ok(None) };
        if r.max_tokens == 0 {
            // Scoring only: the prompt is done.
            let out = self
                .progress(id, prompt_logits)
                .map(|o| RequestOutput { finish_reason: Some(FinishReason::Length), ..o });
            self.finish(id, FinishReason::Length);
            return Ok(out);
        }
        let num_prompt = seq.num_prompt_tokens;
        let (prompt, generated) = seq.token_ids.split_at(num_prompt);
        let n_gen = generated.len();
        let p = &r.params;
        let stops_allowed = n_gen >= p.min_tokens;
        let is_stop_token = |t: u32| (!p.ignore_eos && p.eos_token_ids.contains(&t)) || p.stop_token_ids.contains(&t);
        let logprobs = p.logprobs.map(|n| (n, log_softmax(logits)));
        for &(t, b) in &p.logit_bias {
            if let Some(v) = logits.get_mut(t as usize) {
                *v += b;
            }
        }
        let mut guided = Duration::ZERO;
        if let Some(g) = r.guide.as_mut() {
            // Only what the grammar allows; its end tokens once it is complete.
            let start = Instant::now();
            g.mask(logits, |t| p.eos_token_ids.contains(&t) || p.stop_token_ids.contains(&t))?;
            guided += start.elapsed();
        }
        if !stops_allowed {
            for t in p.eos_token_ids.iter().chain(&p.stop_token_ids) {
                if let Some(v) = logits.get_mut(*t as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        let token = r.sampler.sample(logits, prompt, generated);
        let guide_done = match r.guide.as_mut() {
            Some(g) if !is_stop_token(token) => {
                let start = Instant::now();
                g.consume(token)?;
                guided += start.elapsed();
                g.is_stopped()
            }
            _ => false,
        };
        if r.guide.is_some() {
            self.metrics.guided_us.fetch_add(guided.as_micros() as u64, Ordering::Relaxed);
        }
        let lp = logprobs.map(|(n, lsm)| token_logprob(&lsm, token, n));
        let now = Instant::now();
        match r.last_token {
            None => self.metrics.time_to_first_token.observe(now - r.arrival),
            Some(t) => self.metrics.inter_token_latency.observe(now - t),
        }
        r.last_token = Some(now);
        let mut out = RequestOutput {
            id,
            token_ids: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            finish_reason: None,
            num_prompt_tokens: num_prompt,
            num_generated_tokens: n_gen,
            num_cached_tokens: seq.num_cached_tokens,
            prompt_logits,
        };
        if stops_allowed && is_stop_token(token) {
            out.finish_reason = Some(FinishReason::Stop);
        } else {
            self.sched.append_token(id, token);
            self.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
            out.token_ids.push(token);
            out.logprobs.extend(lp);
            out.num_generated_tokens += 1;
            if let (Some(tok), Some(seq)) = (self.tokenizer, self.sched.get(id)) {
                let ids = &seq.token_ids[seq.num_prompt_tokens..];
                let hit = r.text.push(tok, ids, stops_allowed, &mut out.text)?;
                if hit {
                    out.finish_reason = Some(FinishReason::Stop);
                }
            }
            let streams = r.params.attention_window.is_some();
            if out.finish_reason.is_none() && guide_done {
                // The grammar allows nothing more: the output is complete.
                out.finish_reason = Some(FinishReason::Stop);
            }
            if out.finish_reason.is_none()
                && (out.num_generated_tokens >= r.max_tokens
                    || (!streams && num_prompt + out.num_generated_tokens >= self.limits.cfg.max_model_len))
            {
                out.finish_reason = Some(FinishReason::Length);
            }
        }
        if let Some(reason) = out.finish_reason {
            if reason != FinishReason::Stop || !r.text.stopped {
                if let (Some(tok), Some(seq)) = (self.tokenizer, self.sched.get(id)) {
                    let ids = &seq.token_ids[seq.num_prompt_tokens..];
                    r.text.flush(tok, ids, &mut out.text)?;
                }
            }
            self.finish(id, reason);
        }
        Ok(Some(out))
    }

    /// Drops a request (counting it in the metrics); returns its sequence.
    fn finish(&mut self, id: SeqId, reason: FinishReason) -> Option<Sequence> {
        let r = self.reqs.remove(&id)?;
        if r.queued {
            self.metrics.requests_waiting.fetch_sub(1, Ordering::Relaxed);
        }
        let label = match reason {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Abort => 2,
        };
        self.metrics.finished[label].fetch_add(1, Ordering::Relaxed);
        self.metrics.request_duration.observe(r.arrival.elapsed());
        self.encoding.retain(|(e, _, _)| *e != id);
        if let Some(p) = self.proposer.as_mut() {
            p.release(id);
        }
        let seq = self.sched.remove(id);
        self.publish_gauges();
        seq
    }
}

/// The checks [`Engine::add_request`] makes, usable before a request reaches the engine thread.
pub fn validate_request(limits: &RequestLimits, prompt: &[u32], params: &RequestParams) -> Result<()> {
    let (cfg, vocab_size) = (&limits.cfg, limits.vocab_size);
    let streams = limits.streaming(params)?.is_some();
    if prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    // A prompt that is only scored need not leave room for a token.
    let scores_only = params.max_tokens == Some(0) && params.prompt_logits.is_some();
    if !streams && (prompt.len() > cfg.max_model_len || (prompt.len() == cfg.max_model_len && !scores_only)) {
        return Err(EngineError::PromptTooLong { prompt: prompt.len(), max_model_len: cfg.max_model_len });
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(EngineError::Invalid(format!("prompt token id {bad} is outside the vocabulary ({vocab_size})")));
    }
    if !params.stop.is_empty() && !limits.has_tokenizer {
        return Err(EngineError::Invalid("stop strings need a tokenizer".into()));
    }
    if params.max_tokens == Some(0) && !scores_only {
        return Err(EngineError::Invalid("max_tokens must be at least 1 (0 only to score a prompt)".into()));
    }
    if let Some(p) = params.prompt_logits {
        if p >= prompt.len() {
            return Err(EngineError::Invalid(format!(
                "prompt logits from position {p}, but the prompt has {} tokens",
                prompt.len()
            )));
        }
    }
    if let Some(&(t, b)) =
        params.logit_bias.iter().find(|&&(t, b)| t as usize >= vocab_size || !(-100.0..=100.0).contains(&b))
    {
        return Err(EngineError::Invalid(format!(
            "logit_bias: token {t} with bias {b}: tokens must be in the vocabulary ({vocab_size}) and biases in [-100, 100]"
        )));
    }
    if let Some(n) = params.logprobs {
        if n > 20 {
            return Err(EngineError::Invalid(format!("at most 20 top logprobs, asked for {n}")));
        }
    }
    params.sampling.validate()?;
    Ok(())
}

/// `log_softmax` of a logits row (NaN counts as `-inf`).
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let sum: f64 = logits.iter().filter(|v| !v.is_nan()).map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v - lse }).collect()
}

fn token_logprob(lsm: &[f32], token: u32, n: usize) -> TokenLogprob {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n);
    if n > 0 {
        for (i, &v) in lsm.iter().enumerate() {
            if top.len() < n || v > top[n - 1].1 {
                let at = top.partition_point(|&(_, x)| x >= v);
                top.insert(at, (i as u32, v));
                top.truncate(n);
            }
        }
    }
    TokenLogprob { token, logprob: lsm.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY), top }
}

/// Incremental detokenization with stop strings: each step decodes only a short window of the
/// newest tokens (as Hugging Face TGI does), and searches for stop strings only in text not yet
/// streamed.
struct TextState {
    stops: StopStrings,
    /// `ids[prefix_offset..read_offset]` decode to text already accounted for; decoding from
    /// `prefix_offset` gives the tokenizer the context it needs (spaces, byte fallback).
    prefix_offset: usize,
    read_offset: usize,
    /// All decoded text; `text[..emitted]` has been streamed.
    text: String,
    emitted: usize,
    stopped: bool,
}

impl TextState {
    fn new(stops: StopStrings) -> TextState {
        TextState { stops, prefix_offset: 0, read_offset: 0, text: String::new(), emitted: 0, stopped: false }
    }

    /// Takes the generated ids so far (the newest last), appends newly final text to `out`;
    /// true when a stop string was found (checked only when `stops_allowed`).
    fn push(&mut self, tok: &Tokenizer, ids: &[u32], stops_allowed: bool, out: &mut String) -> Result<bool> {
        // An incomplete UTF-8 character decodes to U+FFFD until its last byte arrives.
        if self.decode_new(tok, ids, false)? {
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
        }
        if stops_allowed {
            if let Some(at) = self.stops.find(&self.text[self.emitted..]) {
                out.push_str(&self.text[self.emitted..self.emitted + at]);
                self.emitted += at;
                self.stopped = true;
                return Ok(true);
            }
        }
        let pending = &self.text[self.emitted..];
        let end = self.emitted + pending.len() - self.stops.holdback(pending);
        out.push_str(&self.text[self.emitted..end]);
        self.emitted = end;
        Ok(false)
    }

    /// Appends the text `ids[read_offset..]` adds after the window's context; false (appending
    /// nothing) when there is none yet, or, unless `partial`, when it ends in an incomplete
    /// character.
    fn decode_new(&mut self, tok: &Tokenizer, ids: &[u32], partial: bool) -> Result<bool> {
        let before = tok.decode(&ids[self.prefix_offset..self.read_offset], false)?;
        let now = tok.decode(&ids[self.prefix_offset..], false)?;
        let ready =
            now.len() > before.len() && (partial || !now.ends_with('\u{FFFD}')) && now.is_char_boundary(before.len());
        if ready {
            self.text.push_str(&now[before.len()..]);
        }
        Ok(ready)
    }

    /// At the end: decodes whatever is left (an incomplete character as U+FFFD) and emits the
    /// held-back text, cut at a stop string.
    fn flush(&mut self, tok: &Tokenizer, ids: &[u32], out: &mut String) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.decode_new(tok, ids, true)?;
        let pending = &self.text[self.emitted..];
        let end = self.stops.find(pending).unwrap_or(pending.len());
        out.push_str(&pending[..end]);
        self.emitted += end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let lsm = log_softmax(&[1.0, 3.0, 2.0, f32::NAN]);
        let total: f32 = lsm.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let lp = token_logprob(&lsm, 2, 2);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(lp.logprob, lsm[2]);
        assert!(token_logprob(&lsm, 0, 0).top.is_empty());
    }
}
