//! The decoder-only transformer every supported family is a configuration of.
//!
//! Qwen3, Qwen2(.5) and Llama (SmolLM2) differ only by biases and q/k norms; Qwen3-MoE swaps
//! the MLP of its sparse layers for a mixture of experts; GLM-4.7-Flash also swaps standard
//! attention for multi-head latent attention ([`crate::layers::mla`]); Qwen3-Next swaps three of
//! every four attention layers for Gated DeltaNet linear attention
//! ([`crate::layers::delta_net`]), gates the fourth's output and rotates only part of each
//! head. The layer loop is the same for all of them, so they share this file; each kind of
//! block lives in `layers/`.
//!
//! ```text
//! x = embed_tokens[ids]                                   [T, hidden]
//! for each layer:
//!     h = rms_norm(x)
//!     x = x + attention(h)      standard (below), latent (layers/mla.rs) or linear
//!                               (layers/delta_net.rs)
//!     h = rms_norm(x)
//!     x = x + ffn(h)            dense SwiGLU MLP (layers/mlp.rs) or mixture (layers/moe.rs)
//! logits = rms_norm(x)[rows] Wheadᵀ                       [R, vocab]
//!
//! standard attention:
//!     q, k, v = h Wqᵀ (+bq), h Wkᵀ (+bk), h Wvᵀ (+bv)      [T, heads*hd], [T, kv*hd] ×2
//!     q, k = rms_norm_per_head(q), rms_norm_per_head(k)   (Qwen3, Qwen3-MoE, Qwen3-Next)
//!     o = attention(rope(q), rope(k), v)                  [T, heads*hd]   (paged cache; rope
//!                                                         on the first rotary_dim of each head)
//!     o = o * sigmoid(gate)     Qwen3-Next: q_proj yields [q, gate] per head, [T, heads*2*hd]
//!     out = o Woᵀ
//! ```

use std::sync::Arc;

use pio_kernels::dot::float::bf16_on_amx;
use pio_kernels::ops;

use super::vision::VisionEncoder;
use super::{CausalLm, ModelShape};
use crate::batch::ForwardBatch;
use crate::config::ModelConfig;
use crate::image::ImageProcessorConfig;
use crate::layers::expert_cache::{parts_of, ExpertFiles, Part};
use crate::layers::mla::LatentAttention;
use crate::layers::{
    Attention, CacheSpec, EvictionPolicy, ExpertCache, ExpertCacheOptions, ExpertCacheStats, GatedDeltaNet, KvCache,
    LayerCache, Linear, Mlp, MoeStats, RmsNorm, SparseMoe,
};
use crate::weights::{Checkpoint, Storage, Tensor};
use crate::{Error, Result};

/// A decoder-only model of any supported family.
#[derive(Debug)]
pub struct DecoderModel {
    pub config: ModelConfig,
    /// `[vocab, hidden]`.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; shares `embed_tokens`' storage when tied.
    lm_head: Linear,
    /// What each layer keeps in the KV cache.
    cache_spec: CacheSpec,
    /// The routed experts' cache when they stream from disk ([`DecoderModel::stream_experts`]).
    expert_cache: Option<Arc<ExpertCache>>,
    /// Layers streamed from disk ([`DecoderModel::stream_layers`]).
    layer_stream: Option<LayerStream>,
    /// The vision tower of a vision-language model (Qwen3-VL).
    vision: Option<VisionEncoder>,
    /// The multi-token-prediction layer, when loaded for speculative decoding.
    mtp: Option<MtpHead>,
}

/// A multi-token-prediction layer (GLM-4.7-Flash's `nextn`, Qwen3-Next's `mtp.*`, as vLLM runs them):
/// `eh_proj(cat(enorm(embed(token)), hnorm(hidden)))` through a decoder layer with a cache of
/// its own, then `norm` and the model's LM head.
#[derive(Debug)]
struct MtpHead {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    /// `[hidden, 2 * hidden]`.
    eh_proj: Linear,
    layer: DecoderLayer,
    /// The shared head's norm (`shared_head.norm`).
    norm: RmsNorm,
    cache_spec: CacheSpec,
    /// DeepSeek's MTP as vLLM runs it (GLM): no embedding at position 0, and the hidden state
    /// it chains on is taken before `norm`; Qwen3-Next's takes it after.
    deepseek: bool,
}

/// The last layers of a dense model read from disk for every forward, through a ring of slots:
/// while one layer computes, the next ones load.
#[derive(Debug)]
struct LayerStream {
    cache: Arc<ExpertCache>,
    /// Layers from this one on stream; those before it stay in memory.
    first: usize,
    /// Layers that stream (the cache's items).
    count: usize,
}

/// Streamed layers read ahead of the one computing (the ring has one slot more).
pub const LAYERS_AHEAD: usize = 2;

/// A streamed layer for one forward: a copy of the layer whose matrices are the slot's bytes,
/// and the pin that keeps them there until it is dropped.
struct StreamedLayer {
    layer: DecoderLayer,
    cache: Arc<ExpertCache>,
    slot: usize,
}

impl Drop for StreamedLayer {
    fn drop(&mut self) {
        self.cache.unpin(&[self.slot]);
    }
}

impl LayerStream {
    /// Layer `i` (`home`, whose matrices are mapped and never read) from its slot, reading it if
    /// the prefetch has not, and starts reading the layers after it (past the last, the first
    /// streamed ones, for the next forward).
    fn load(&self, i: usize, home: &DecoderLayer) -> Result<StreamedLayer> {
        let cache = &self.cache;
        let item = i - self.first;
        let n = self.count;
        let slot = cache.pin(0, &[item])[0].1;
        let ahead: Vec<usize> = (1..=LAYERS_AHEAD).map(|d| (item + d) % n).filter(|&x| x != item).collect();
        cache.prefetch(0, &ahead, LAYERS_AHEAD);
        // One slot: this returns once it is read (or failed).
        if let Err(e) = cache.wait_ready(&[slot]) {
            cache.unpin(&[slot]);
            return Err(e);
        }
        let mut layer = home.clone_dense().ok_or_else(|| Error::Config("only dense layers stream".into()))?;
        for (part, l) in layer.linears_mut(false).into_iter().enumerate() {
            l.weight.storage = Storage::Pooled { cache: cache.clone(), slot, part };
        }
        Ok(StreamedLayer { layer, cache: cache.clone(), slot })
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: AttentionBlock,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

#[derive(Debug)]
enum AttentionBlock {
    Standard(SelfAttention),
    Latent(LatentAttention),
    Linear(GatedDeltaNet),
}

// One per layer, built once: the size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

#[derive(Debug, Clone)]
struct SelfAttention {
    /// `[heads*hd, hidden]`, `[kv*hd, hidden]`, `[kv*hd, hidden]`, `[hidden, heads*hd]`.
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// `[hd]` each, Qwen3 only.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// `q_proj` yields a gate after each head's query (`[heads*2*hd, hidden]`): the output is
    /// `o * sigmoid(gate)` (Qwen3-Next).
    output_gate: bool,
    attn: Attention,
}

impl DecoderLayer {
    /// A copy of a dense layer with standard attention (the kind that streams); `None` for
    /// other kinds.
    fn clone_dense(&self) -> Option<DecoderLayer> {
        let (AttentionBlock::Standard(a), FeedForward::Dense(m)) = (&self.self_attn, &self.mlp) else { return None };
        Some(DecoderLayer {
            input_layernorm: self.input_layernorm.clone(),
            self_attn: AttentionBlock::Standard(a.clone()),
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            mlp: FeedForward::Dense(m.clone()),
        })
    }

    /// The layer's matrices (routers and experts included), in a fixed order.
    fn linears(&self) -> Vec<&Linear> {
        let mut all = Vec::new();
        match &self.self_attn {
            AttentionBlock::Standard(a) => all.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]),
            AttentionBlock::Latent(a) => all.extend(a.linears()),
            AttentionBlock::Linear(a) => all.extend(a.linears()),
        }
        match &self.mlp {
            FeedForward::Dense(m) => all.extend(m.linears()),
            FeedForward::Sparse(m) => all.extend(m.linears()),
        }
        all
    }

    /// As [`DecoderLayer::linears`], to change (routed experts only with `routed_experts`).
    fn linears_mut(&mut self, routed_experts: bool) -> Vec<&mut Linear> {
        let mut all: Vec<&mut Linear> = Vec::new();
        match &mut self.self_attn {
            AttentionBlock::Standard(a) => all.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]),
            AttentionBlock::Latent(a) => all.extend(a.linears_mut()),
            AttentionBlock::Linear(a) => all.extend(a.linears_mut()),
        }
        match &mut self.mlp {
            FeedForward::Dense(m) => all.extend(m.linears_mut()),
            FeedForward::Sparse(m) => all.extend(m.linears_mut(routed_experts)),
        }
        all
    }

    /// Weight bytes of the layer's matrices.
    fn weight_bytes(&self) -> usize {
        self.linears().iter().map(|l| l.weight.bytes().len()).sum()
    }
}

impl DecoderModel {
    /// Builds the model from `ckpt`, taking every tensor the config implies; leftovers are an
    /// error.
    pub fn load(config: ModelConfig, ckpt: Checkpoint, progress: &mut dyn FnMut(usize, usize)) -> Result<DecoderModel> {
        Self::load_multimodal(config, ckpt, None, progress)
    }

    /// [`DecoderModel::load`] for any model, a vision-language one included: its vision tower
    /// (`model.visual.*`) takes images as `processor` says, and its text model's tensors are
    /// the usual ones under `model.language_model.`.
    pub fn load_multimodal(
        config: ModelConfig,
        ckpt: Checkpoint,
        processor: Option<ImageProcessorConfig>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<DecoderModel> {
        Self::load_multimodal_with(config, ckpt, processor, false, progress)
    }

    /// [`DecoderModel::load_multimodal`], with the multi-token-prediction layer when `mtp`
    /// (which the checkpoint must have); without, MTP layers are skipped.
    pub fn load_multimodal_with(
        config: ModelConfig,
        mut ckpt: Checkpoint,
        processor: Option<ImageProcessorConfig>,
        mtp: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<DecoderModel> {
        let vision = match (&config.vision, processor) {
            (None, _) => None,
            (Some(vc), Some(p)) => {
                ckpt.rename_prefix("model.language_model.", "model.");
                Some(VisionEncoder::load(&mut ckpt, "model.visual", vc, p)?)
            }
            (Some(_), None) => {
                return Err(Error::Config(
                    "a vision-language model needs its image processor's config (preprocessor_config.json)".into(),
                ))
            }
        };
        let c = &config;
        let h = c.hidden_size;
        let embed_tokens = ckpt.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            progress(i, c.num_layers);
            let p = format!("model.layers.{i}");
            let norm = |ck: &mut Checkpoint, name: &str, dim| load_norm(ck, &format!("{p}.{name}.weight"), dim, c);
            let linear = c.linear_attn.as_ref().is_some_and(|la| la.layers[i]);
            let self_attn = match &c.mla {
                _ if linear => {
                    AttentionBlock::Linear(GatedDeltaNet::load(&mut ckpt, &format!("{p}.linear_attn"), i, c)?)
                }
                None => AttentionBlock::Standard(SelfAttention::load(&mut ckpt, &p, i, c)?),
                Some(mla) => {
                    AttentionBlock::Latent(LatentAttention::load(&mut ckpt, &format!("{p}.self_attn"), i, c, mla)?)
                }
            };
            let mlp = match &c.moe {
                Some(moe) if c.is_sparse_layer(i) => {
                    FeedForward::Sparse(SparseMoe::load(&mut ckpt, &format!("{p}.mlp"), h, moe)?)
                }
                _ => FeedForward::Dense(Mlp::load(&mut ckpt, &format!("{p}.mlp"), h, c.intermediate_size, c.mlp_bias)?),
            };
            layers.push(DecoderLayer {
                input_layernorm: norm(&mut ckpt, "input_layernorm", h)?,
                self_attn,
                post_attention_layernorm: norm(&mut ckpt, "post_attention_layernorm", h)?,
                mlp,
            });
        }
        // Multi-token-prediction layers follow the decoder layers; they only serve speculative
        // decoding: the first is loaded when asked for, the others are skipped by name.
        use crate::config::Arch;
        if mtp && c.arch == Arch::Qwen3Next && ckpt.contains("mtp.fc.weight") {
            // Qwen3-Next's Hugging Face names for what GGUF (and GLM) keep as layer N.
            let n = c.num_layers;
            for (from, to) in [
                ("mtp.layers.0.".to_string(), format!("model.layers.{n}.")),
                ("mtp.fc.".into(), format!("model.layers.{n}.eh_proj.")),
                ("mtp.pre_fc_norm_embedding.".into(), format!("model.layers.{n}.enorm.")),
                ("mtp.pre_fc_norm_hidden.".into(), format!("model.layers.{n}.hnorm.")),
                ("mtp.norm.".into(), format!("model.layers.{n}.shared_head.norm.")),
            ] {
                ckpt.rename_prefix(&from, &to);
            }
        }
        let has_mtp = ckpt.contains(&format!("model.layers.{}.eh_proj.weight", c.num_layers));
        let mtp = match (mtp, c.arch) {
            (false, _) => None,
            (true, Arch::Glm4MoeLite | Arch::Qwen3Next) if has_mtp => Some(MtpHead::load(&mut ckpt, c, c.num_layers)?),
            (true, Arch::Glm4MoeLite | Arch::Qwen3Next) => {
                return Err(Error::Config("the checkpoint has no multi-token-prediction layer".into()))
            }
            (true, arch) => {
                return Err(Error::Config(format!(
                    "multi-token prediction is not supported for {arch:?} (GLM-4.7-Flash's and Qwen3-Next's are)"
                )))
            }
        };
        let first_skipped = c.num_layers + usize::from(mtp.is_some());
        for i in first_skipped..c.num_layers + c.num_nextn_predict_layers {
            // Hugging Face names, and GGUF names the table does not map (`blk.N.nextn.*`).
            let (hf, gguf) = (format!("model.layers.{i}."), format!("blk.{i}."));
            let names: Vec<String> =
                ckpt.names().filter(|n| n.starts_with(&hf) || n.starts_with(&gguf)).map(str::to_string).collect();
            for n in names {
                ckpt.discard(&n);
            }
        }
        // Qwen3-Next keeps its multi-token-prediction module under `mtp.*` (transformers skips
        // it on load too).
        if c.arch == crate::config::Arch::Qwen3Next {
            let names: Vec<String> = ckpt.names().filter(|n| n.starts_with("mtp.")).map(str::to_string).collect();
            for n in names {
                ckpt.discard(&n);
            }
        }
        let norm = load_norm(&mut ckpt, "model.norm.weight", h, c)?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints also save the head; the embedding is what is used.
            ckpt.discard("lm_head.weight");
            Linear::new(embed_tokens.clone(), None)
        } else {
            Linear::load(&mut ckpt, "lm_head", h, c.vocab_size, false)?
        };
        ckpt.finish()?;
        progress(c.num_layers, c.num_layers);
        let cache_spec = CacheSpec::from_config(&config);
        Ok(DecoderModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cache_spec,
            expert_cache: None,
            layer_stream: None,
            vision,
            mtp,
        })
    }

    /// Every layer matrix (routers and experts included).
    fn linears(&self) -> Vec<&Linear> {
        self.layers.iter().flat_map(DecoderLayer::linears).collect()
    }

    /// Rearranges every matrix whose format has interleaved decode kernels into that layout
    /// ([`crate::weights::Tensor::interleave`]): attention, dense MLPs, shared experts, routers
    /// and the LM head (a tied head gets a copy; the embedding keeps its rows). Routed experts
    /// only with `routed_experts`: they otherwise stay mapped and are read only when chosen.
    /// Layers that stream from disk ([`DecoderModel::stream_layers`]) are left alone.
    /// Returns how many matrices and bytes were rearranged.
    pub fn interleave_weights(&mut self, routed_experts: bool) -> (usize, usize) {
        let (mut count, mut bytes) = (0, 0);
        // Streamed layers are read from disk in rows for every forward: their mapped matrices
        // are never touched.
        let streamed = self.layer_stream.as_ref().map_or(self.layers.len(), |s| s.first);
        let mut matrices: Vec<&mut Linear> = vec![&mut self.lm_head];
        for l in &mut self.layers[..streamed] {
            matrices.extend(l.linears_mut(routed_experts));
        }
        // The MTP layer runs once per proposed token: as fast as the others.
        if let Some(m) = &mut self.mtp {
            matrices.push(&mut m.eh_proj);
            matrices.extend(m.layer.linears_mut(routed_experts));
        }
        // One arena for all of them (the chunks stay while their matrices do).
        let mut arena = pio_kernels::huge::HugeArena::new();
        for l in matrices {
            if l.weight.interleave(&mut arena) {
                count += 1;
                bytes += l.weight.bytes().len();
            }
        }
        // The vision tower's BF16 matrices, except those that run on AMX tiles (which read
        // rows): in the layout the BF16 tiles read, which they would otherwise lay out for
        // every product ([`pio_kernels::dot::float::gemm_tiled`]).
        let level = pio_kernels::cpu::level();
        for l in self.vision.iter_mut().flat_map(VisionEncoder::linears_mut) {
            let amx =
                l.prefill_only && l.bf16_activations && bf16_on_amx(level, l.weight.shape.last().copied().unwrap_or(0));
            if !amx && l.weight.dtype == pio_kernels::DType::BF16 && l.weight.interleave(&mut arena) {
                count += 1;
                bytes += l.weight.bytes().len();
            }
        }
        // A tied embedding reads its rows from the head's repacked copy. Reading them from the
        // mapped file instead mapped a whole 2 MiB page-cache folio per row looked up, and a
        // 512-token prompt left 100 MB of the Qwen3-0.6B's Q6_K embedding resident beside the
        // copy.
        if self.config.tie_word_embeddings && !self.lm_head.weight.is_rows() {
            self.embed_tokens = self.lm_head.weight.clone();
        }
        (count, bytes)
    }

    /// Where every mixture layer's routed experts lie on disk: the files, and per mixture layer
    /// per expert its gate, up and down matrices. `None` when the model has no mixture layers;
    /// an error when some expert is in memory (quantized at load).
    pub fn expert_parts(&self) -> Result<Option<ExpertFiles>> {
        let mut files = Vec::new();
        let mut experts = Vec::new();
        for l in &self.layers {
            if let FeedForward::Sparse(m) = &l.mlp {
                experts.push(m.expert_parts(&mut files).ok_or_else(|| {
                    Error::Config(
                        "the routed experts are in memory (quantized at load?), so they cannot stream from \
                         disk: quantize the file with `pio quantize` and load that instead"
                            .into(),
                    )
                })?);
            }
        }
        Ok((!experts.is_empty()).then_some((files, experts)))
    }

    /// Reads the routed experts through an expert cache of `slots` slots instead of from the
    /// mapped file: they are never paged in, and only `slots` of them are in memory at once.
    /// The results are the same bits.
    pub fn stream_experts(&mut self, slots: usize, options: ExpertCacheOptions) -> Result<Arc<ExpertCache>> {
        let Some((files, experts)) = self.expert_parts()? else {
            return Err(Error::Config("the model has no routed experts to stream".into()));
        };
        let cache = Arc::new(ExpertCache::new(files, experts, slots, options)?);
        let sparse = self.layers.iter_mut().filter_map(|l| match &mut l.mlp {
            FeedForward::Sparse(m) => Some(m),
            FeedForward::Dense(_) => None,
        });
        for (i, m) in sparse.enumerate() {
            m.stream(cache.clone(), i);
        }
        self.expert_cache = Some(cache.clone());
        // Everything else is read from memory from now on, never from the mapped file.
        self.own_head_and_embedding();
        for l in self.linears_mut(false) {
            l.weight.own();
        }
        Ok(cache)
    }

    /// Starts faulting in the memory of the streaming caches in the background (see
    /// [`ExpertCache::populate_in_background`]).
    pub fn populate_stream_caches(&self) {
        let layers = self.layer_stream.as_ref().map(|s| &s.cache);
        for c in self.expert_cache.iter().chain(layers) {
            c.populate_in_background();
        }
    }

    /// Copies the LM head and the embedding into memory (one copy when they are tied).
    fn own_head_and_embedding(&mut self) {
        self.lm_head.weight.own();
        if self.config.tie_word_embeddings {
            self.embed_tokens = self.lm_head.weight.clone();
        } else {
            self.embed_tokens.own();
        }
    }

    /// Weight bytes of each layer's matrices, and of what every forward reads besides them
    /// (embedding, unless tied, and LM head).
    pub fn layer_bytes(&self) -> (Vec<usize>, usize) {
        let head = self.lm_head.weight.bytes().len();
        let embed = if self.config.tie_word_embeddings { 0 } else { self.embed_tokens.bytes().len() };
        (self.layers.iter().map(DecoderLayer::weight_bytes).collect(), head + embed)
    }

    /// The bytes of one slot of a layer stream starting at layer `first` (the largest streamed
    /// layer, each matrix 4 KiB-aligned), or why those layers cannot stream.
    pub fn layer_slot_bytes(&self, first: usize) -> Result<usize> {
        Ok(ExpertCache::slot_bytes_for(&[self.layer_parts(first, &mut Vec::new())?]))
    }

    fn layer_parts(&self, first: usize, files: &mut Vec<std::path::PathBuf>) -> Result<Vec<Vec<Part>>> {
        self.layers[first..]
            .iter()
            .map(|l| {
                if l.clone_dense().is_none() {
                    return Err(Error::Config(
                        "only dense layers with standard attention stream from disk (mixture models stream their \
                         experts)"
                            .into(),
                    ));
                }
                parts_of(l.linears().iter().map(|x| &x.weight), files).ok_or_else(|| {
                    Error::Config(
                        "the layers are in memory (quantized at load?), so they cannot stream from disk: quantize \
                         the file with `pio quantize` and load that instead"
                            .into(),
                    )
                })
            })
            .collect()
    }

    /// Keeps layers `..first` in memory and reads layers `first..` from disk for every forward,
    /// through a ring of [`LAYERS_AHEAD`] + 1 slots (the next layers load while one computes).
    /// Everything that stays is copied into memory. The results are the same bits.
    pub fn stream_layers(&mut self, first: usize, options: ExpertCacheOptions) -> Result<Arc<ExpertCache>> {
        if first >= self.layers.len() {
            return Err(Error::Config(format!("no layer from {first} on to stream")));
        }
        let mut files = Vec::new();
        let parts = self.layer_parts(first, &mut files)?;
        let options = ExpertCacheOptions { policy: EvictionPolicy::Lru, prefetch: true, ..options };
        let cache = Arc::new(ExpertCache::new(files, vec![parts], LAYERS_AHEAD + 1, options)?);
        self.own_head_and_embedding();
        for l in &mut self.layers[..first] {
            for x in l.linears_mut(true) {
                x.weight.own();
            }
        }
        self.layer_stream = Some(LayerStream { cache: cache.clone(), first, count: self.layers.len() - first });
        Ok(cache)
    }

    /// Has every BF16 matrix multiply bf16-rounded activations where the CPU can (`on`), or f32
    /// ones (see [`Linear::bf16_activations`]).
    pub fn set_bf16_activations(&mut self, on: bool) {
        for l in self.linears_mut(true) {
            l.bf16_activations = on;
        }
        for l in self.vision.iter_mut().flat_map(VisionEncoder::linears_mut) {
            l.bf16_activations = on;
        }
    }

    /// The LM head and every layer matrix (routed experts only with `routed_experts`), to
    /// change at load.
    fn linears_mut(&mut self, routed_experts: bool) -> Vec<&mut Linear> {
        let mut all: Vec<&mut Linear> = vec![&mut self.lm_head];
        for l in &mut self.layers {
            all.extend(l.linears_mut(routed_experts));
        }
        if let Some(m) = &mut self.mtp {
            all.push(&mut m.eh_proj);
            all.extend(m.layer.linears_mut(routed_experts));
        }
        all
    }

    /// Format and bytes of every weight matrix, for reports.
    pub fn weight_dtypes(&self) -> Vec<(pio_kernels::DType, usize)> {
        let mut all = vec![(self.embed_tokens.dtype, self.embed_tokens.bytes().len())];
        all.extend(self.linears().iter().map(|l| (l.dtype(), l.weight.bytes().len())));
        let vision = self.vision.iter().flat_map(VisionEncoder::linears);
        all.extend(vision.map(|l| (l.dtype(), l.weight.bytes().len())));
        if !self.config.tie_word_embeddings {
            all.push((self.lm_head.dtype(), self.lm_head.weight.bytes().len()));
        }
        all
    }

    /// Weight bytes one decode step reads: every layer matrix (of a mixture, the router, the
    /// `top_k` routed experts and the shared expert) and the LM head (the embedding contributes
    /// one row, ignored).
    pub fn decode_bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let attn: usize = match &l.self_attn {
                    AttentionBlock::Standard(a) => {
                        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].iter().map(|x| x.weight.bytes().len()).sum()
                    }
                    AttentionBlock::Latent(a) => a.linears().iter().map(|x| x.weight.bytes().len()).sum(),
                    AttentionBlock::Linear(a) => a.linears().iter().map(|x| x.weight.bytes().len()).sum(),
                };
                let ffn = match &l.mlp {
                    FeedForward::Dense(m) => m.weight_bytes(),
                    FeedForward::Sparse(m) => m.decode_bytes_per_token(),
                };
                attn + ffn
            })
            .sum();
        layers + self.lm_head.weight.bytes().len()
    }
}

impl MtpHead {
    /// Layer `i` of the checkpoint (the first after the decoder layers) as an MTP layer: a
    /// decoder layer of the last layer's kind (its attention at layer 0 of a cache of its own)
    /// with `enorm`, `hnorm`, `eh_proj` and `shared_head.norm`. The layer's copies of the
    /// embedding and the head, where a checkpoint has them, are the model's and are not kept.
    fn load(ckpt: &mut Checkpoint, c: &ModelConfig, i: usize) -> Result<MtpHead> {
        let (p, h) = (format!("model.layers.{i}"), c.hidden_size);
        let norm = |ck: &mut Checkpoint, name: &str| load_norm(ck, &format!("{p}.{name}.weight"), h, c);
        let (self_attn, cache) = match &c.mla {
            Some(mla) => (
                AttentionBlock::Latent(LatentAttention::load(ckpt, &format!("{p}.self_attn"), 0, c, mla)?),
                LayerCache::Latent { width: mla.cache_width() },
            ),
            None => (
                AttentionBlock::Standard(SelfAttention::load(ckpt, &p, 0, c)?),
                LayerCache::Attention { num_kv_heads: c.num_kv_heads, head_dim: c.head_dim, window: None },
            ),
        };
        let sparse = c.num_layers > 0 && c.is_sparse_layer(c.num_layers - 1);
        let mlp = match &c.moe {
            Some(moe) if sparse => FeedForward::Sparse(SparseMoe::load(ckpt, &format!("{p}.mlp"), h, moe)?),
            _ => FeedForward::Dense(Mlp::load(ckpt, &format!("{p}.mlp"), h, c.intermediate_size, c.mlp_bias)?),
        };
        let layer = DecoderLayer {
            input_layernorm: norm(ckpt, "input_layernorm")?,
            self_attn,
            post_attention_layernorm: norm(ckpt, "post_attention_layernorm")?,
            mlp,
        };
        let head = MtpHead {
            enorm: norm(ckpt, "enorm")?,
            hnorm: norm(ckpt, "hnorm")?,
            eh_proj: Linear::load(ckpt, &format!("{p}.eh_proj"), 2 * h, h, false)?,
            layer,
            norm: norm(ckpt, "shared_head.norm")?,
            cache_spec: CacheSpec { layers: vec![cache] },
            deepseek: c.arch != crate::config::Arch::Qwen3Next,
        };
        ckpt.discard(&format!("{p}.embed_tokens.weight"));
        ckpt.discard(&format!("{p}.shared_head.head.weight"));
        Ok(head)
    }
}

impl DecoderLayer {
    /// `x += attn(norm(x)); x += mlp(norm(x))` over `batch` (`next`: the next sparse layer, whose
    /// experts may be prefetched).
    fn forward(
        &self,
        x: &mut [f32],
        batch: &ForwardBatch,
        cache: &mut KvCache,
        next: Option<&SparseMoe>,
    ) -> Result<()> {
        let hn = self.input_layernorm.forward(x);
        let attn = match &self.self_attn {
            AttentionBlock::Standard(a) => a.forward(&hn, batch, cache),
            AttentionBlock::Latent(a) => a.forward(&hn, batch, cache),
            AttentionBlock::Linear(a) => a.forward(&hn, batch, cache)?,
        };
        ops::add_in_place(x, &attn);
        let hn = self.post_attention_layernorm.forward(x);
        let mlp = match &self.mlp {
            FeedForward::Dense(m) => m.forward(&hn),
            FeedForward::Sparse(m) => m.forward(&hn, next)?,
        };
        ops::add_in_place(x, &mlp);
        Ok(())
    }
}

impl SelfAttention {
    fn load(ckpt: &mut Checkpoint, p: &str, layer: usize, c: &ModelConfig) -> Result<SelfAttention> {
        let (h, q, kv) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let linear = |ck: &mut Checkpoint, name: &str, i, o, b| Linear::load(ck, &format!("{p}.{name}"), i, o, b);
        let norm = |ck: &mut Checkpoint, name: &str| load_norm(ck, &format!("{p}.{name}.weight"), c.head_dim, c);
        let q_rows = if c.attn_output_gate { 2 * q } else { q };
        Ok(SelfAttention {
            q_proj: linear(ckpt, "self_attn.q_proj", h, q_rows, c.qkv_bias)?,
            k_proj: linear(ckpt, "self_attn.k_proj", h, kv, c.qkv_bias)?,
            v_proj: linear(ckpt, "self_attn.v_proj", h, kv, c.qkv_bias)?,
            o_proj: linear(ckpt, "self_attn.o_proj", q, h, c.o_bias)?,
            q_norm: c.qk_norm.then(|| norm(ckpt, "self_attn.q_norm")).transpose()?,
            k_norm: c.qk_norm.then(|| norm(ckpt, "self_attn.k_norm")).transpose()?,
            output_gate: c.attn_output_gate,
            attn: Attention {
                layer,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
                rope_layout: c.rope_layout,
                inv_freq: ops::rope_inv_freq(c.rope_theta, c.rotary_dim),
                window: c.sliding_window.get(layer).copied().flatten(),
                mrope_section: c.mrope_section,
            },
        })
    }

    fn forward(&self, x: &[f32], batch: &ForwardBatch, cache: &mut KvCache) -> Vec<f32> {
        let [mut q, mut k, v]: [Vec<f32>; 3] = Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)
            .try_into()
            .unwrap_or_else(|_| unreachable!("three projections in, three out"));
        // A gated q_proj: each head's query is followed by its gate.
        let mut gate = Vec::new();
        if self.output_gate {
            let hd = self.attn.head_dim;
            let mut query = Vec::with_capacity(q.len() / 2);
            gate.reserve(q.len() / 2);
            for pair in q.chunks_exact(2 * hd) {
                query.extend_from_slice(&pair[..hd]);
                gate.extend_from_slice(&pair[hd..]);
            }
            q = query;
        }
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            // Per-head norm: rows of head_dim.
            qn.forward_in_place(&mut q);
            kn.forward_in_place(&mut k);
        }
        let mut o = self.attn.forward(&mut q, &mut k, &v, batch, cache);
        if self.output_gate {
            for (o, g) in o.iter_mut().zip(&gate) {
                *o *= ops::sigmoid(*g);
            }
        }
        self.o_proj.forward(&o)
    }
}

/// An RMSNorm weight; zero-centred checkpoints (Qwen3-Next: `(1 + w)`) get the 1 folded in.
fn load_norm(ckpt: &mut Checkpoint, name: &str, dim: usize, c: &ModelConfig) -> Result<RmsNorm> {
    let mut norm = RmsNorm::load(ckpt, name, dim, c.rms_norm_eps)?;
    if c.zero_centred_norms {
        norm.weight.iter_mut().for_each(|w| *w += 1.0);
    }
    Ok(norm)
}

impl CausalLm for DecoderModel {
    fn shape(&self) -> ModelShape {
        let c = &self.config;
        ModelShape {
            vocab_size: c.vocab_size,
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            max_position_embeddings: c.max_position_embeddings,
        }
    }

    fn cache_spec(&self) -> &CacheSpec {
        &self.cache_spec
    }

    fn can_shift_positions(&self) -> bool {
        // A recurrent state holds every token it has seen: dropping some is not possible.
        !self.cache_spec.has_state()
    }

    fn shift_positions(&self, cache: &mut KvCache, blocks: &[u32], delta: usize) -> Result<()> {
        if let Some(b) = blocks.iter().find(|&&b| b as usize >= cache.num_blocks) {
            return Err(Error::Batch(format!("block {b} is outside the cache ({} blocks)", cache.num_blocks)));
        }
        if cache.spec() != &self.cache_spec {
            return Err(Error::Batch("KV cache was made for another model shape".into()));
        }
        if !self.can_shift_positions() {
            return Err(Error::Batch("a model with recurrent state cannot shift cached positions".into()));
        }
        for layer in &self.layers {
            match &layer.self_attn {
                AttentionBlock::Standard(a) => a.attn.shift_keys(cache, blocks, delta),
                AttentionBlock::Latent(a) => a.shift_keys(cache, blocks, delta),
                AttentionBlock::Linear(_) => {}
            }
        }
        Ok(())
    }

    fn vision(&self) -> Option<&VisionEncoder> {
        self.vision.as_ref()
    }

    fn moe_stats(&self) -> Option<MoeStats> {
        let mut total: Option<MoeStats> = None;
        for l in &self.layers {
            if let FeedForward::Sparse(m) = &l.mlp {
                total.get_or_insert_with(MoeStats::default).add(&m.stats());
            }
        }
        total
    }

    fn expert_cache_stats(&self) -> Option<ExpertCacheStats> {
        self.expert_cache.as_ref().or(self.layer_stream.as_ref().map(|s| &s.cache)).map(|c| c.stats())
    }

    fn set_synthetic_routing(&mut self, zipf: Option<f64>) -> bool {
        let mut any = false;
        for (i, l) in self.layers.iter_mut().enumerate() {
            if let FeedForward::Sparse(m) = &mut l.mlp {
                m.set_synthetic_routing(zipf, i as u64 + 1);
                any = true;
            }
        }
        any
    }

    fn probe_disk_bandwidth(&self) -> Option<f64> {
        // 2 GiB or 3 s: enough to get past a disk's burst cache on this kind of VM.
        let cache = self.expert_cache.as_ref().or(self.layer_stream.as_ref().map(|s| &s.cache));
        cache.map(|c| c.probe_read_bandwidth(2 << 30, 3.0))
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Vec<f32>> {
        Ok(self.run(batch, cache, false)?.0)
    }

    fn forward_with_hidden(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<(Vec<f32>, Vec<f32>)> {
        let (logits, hidden) = self.run(batch, cache, true)?;
        Ok((logits, hidden.unwrap_or_default()))
    }

    fn mtp_cache_spec(&self) -> Option<&CacheSpec> {
        self.mtp.as_ref().map(|m| &m.cache_spec)
    }

    fn mtp_forward(&self, batch: &ForwardBatch, hidden: &[f32], cache: &mut KvCache) -> Result<(Vec<f32>, Vec<f32>)> {
        let m =
            self.mtp.as_ref().ok_or_else(|| Error::Config("the multi-token-prediction layer is not loaded".into()))?;
        batch.validate(cache.block_size, cache.num_blocks)?;
        if cache.spec() != &m.cache_spec {
            return Err(Error::Batch("KV cache was made for another shape than the MTP layer's".into()));
        }
        let (h, n) = (self.config.hidden_size, batch.num_tokens());
        if hidden.len() != n * h {
            return Err(Error::Batch(format!("{} hidden values for {n} tokens of width {h}", hidden.len())));
        }
        // The embedding of the token after each hidden state's position (none at position 0,
        // as vLLM's MTP does), normed; the hidden states normed; side by side.
        let embed = self.embed_tokens.matrix();
        let mut e = vec![0f32; n * h];
        for ((row, &id), &pos) in e.chunks_exact_mut(h).zip(&batch.token_ids).zip(&batch.positions) {
            if id as usize >= self.config.vocab_size {
                return Err(Error::Batch(format!("token id {id} is outside the vocabulary")));
            }
            if pos > 0 || !m.deepseek {
                embed.dequantize_row(id as usize, row);
            }
        }
        m.enorm.forward_in_place(&mut e);
        let mut hn = hidden.to_vec();
        m.hnorm.forward_in_place(&mut hn);
        let mut cat = Vec::with_capacity(2 * n * h);
        for (er, hr) in e.chunks_exact(h).zip(hn.chunks_exact(h)) {
            cat.extend_from_slice(er);
            cat.extend_from_slice(hr);
        }
        let mut x = m.eh_proj.forward(&cat);
        m.layer.forward(&mut x, batch, cache, None)?;
        let mut rows = Vec::with_capacity(batch.logits_indices.len() * h);
        for &i in &batch.logits_indices {
            rows.extend_from_slice(&x[i * h..(i + 1) * h]);
        }
        let before = m.deepseek.then(|| rows.clone());
        m.norm.forward_in_place(&mut rows);
        let logits = self.lm_head.forward(&rows);
        Ok((logits, before.unwrap_or(rows)))
    }
}

impl DecoderModel {
    /// The forward: logits of `batch.logits_indices`, and with `want_hidden` every token's final
    /// hidden state (after the final norm).
    fn run(
        &self,
        batch: &ForwardBatch,
        cache: &mut KvCache,
        want_hidden: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let c = &self.config;
        batch.validate(cache.block_size, cache.num_blocks)?;
        if cache.spec() != &self.cache_spec {
            return Err(Error::Batch("KV cache was made for another model shape".into()));
        }
        let h = c.hidden_size;
        let embed = self.embed_tokens.matrix();
        let mut x = vec![0f32; batch.num_tokens() * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(&batch.token_ids) {
            if id as usize >= c.vocab_size {
                return Err(Error::Batch(format!("token id {id} is outside the vocabulary ({})", c.vocab_size)));
            }
            embed.dequantize_row(id as usize, row);
        }
        let visual = batch.visual.as_ref();
        if let Some(v) = visual {
            let rows = v.rows.len() * h;
            if v.embeds.len() != rows || v.deepstack.iter().any(|d| d.len() != rows) {
                return Err(Error::Batch(format!(
                    "image features of {} and {:?} values for {} tokens of width {h}",
                    v.embeds.len(),
                    v.deepstack.iter().map(Vec::len).collect::<Vec<_>>(),
                    v.rows.len()
                )));
            }
            if v.deepstack.len() > self.layers.len() {
                return Err(Error::Batch(format!(
                    "{} DeepStack features for {} layers",
                    v.deepstack.len(),
                    self.layers.len()
                )));
            }
            for (j, &r) in v.rows.iter().enumerate() {
                x[r * h..(r + 1) * h].copy_from_slice(&v.embeds[j * h..(j + 1) * h]);
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            // A streamed layer computes from its slot; the pin goes at the end of the iteration.
            let streamed = match &self.layer_stream {
                Some(ls) if i >= ls.first => Some(ls.load(i, layer)?),
                _ => None,
            };
            let layer = streamed.as_ref().map_or(layer, |s| &s.layer);
            let next = self.layers[i + 1..].iter().find_map(|l| match &l.mlp {
                FeedForward::Sparse(m) => Some(m),
                FeedForward::Dense(_) => None,
            });
            layer.forward(&mut x, batch, cache, next)?;
            // DeepStack: the vision tower's features of layer `i` join the image tokens.
            if let Some((v, ds)) = visual.and_then(|v| Some((v, v.deepstack.get(i)?))) {
                for (j, &r) in v.rows.iter().enumerate() {
                    ops::add_in_place(&mut x[r * h..(r + 1) * h], &ds[j * h..(j + 1) * h]);
                }
            }
        }
        if want_hidden {
            self.norm.forward_in_place(&mut x);
        }
        let mut rows = Vec::with_capacity(batch.logits_indices.len() * h);
        for &i in &batch.logits_indices {
            rows.extend_from_slice(&x[i * h..(i + 1) * h]);
        }
        if !want_hidden {
            self.norm.forward_in_place(&mut rows);
        }
        let logits = self.lm_head.forward(&rows);
        Ok((logits, want_hidden.then_some(x)))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use pio_kernels::attention::{KvCacheDtype, KvCacheType};

    use super::*;

    fn fixture(name: &str) -> DecoderModel {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name);
        load_dir(&dir)
    }

    fn load_dir(dir: &Path) -> DecoderModel {
        let config = ModelConfig::from_hf_file(&dir.join("config.json")).expect("config");
        let ckpt = crate::weights::safetensors::load_dir(dir).expect("checkpoint");
        DecoderModel::load(config, ckpt, &mut |_, _| {}).expect("model")
    }

    /// Layer 0's attention over `table`: writes the rows' K/V at `positions` and returns its
    /// outputs.
    fn attend(
        m: &DecoderModel,
        cache: &mut KvCache,
        table: &[u32],
        positions: std::ops::Range<usize>,
        x: &[f32],
    ) -> Vec<f32> {
        let bs = cache.block_size;
        let n = positions.len();
        let batch = ForwardBatch {
            token_ids: vec![0; n],
            slot_mapping: positions.clone().map(|p| table[p / bs] as usize * bs + p % bs).collect(),
            positions: positions.collect(),
            seq_indices: vec![0; n],
            block_tables: vec![table.to_vec()],
            logits_indices: Vec::new(),
            state_slots: Vec::new(),
            state_snapshots: Vec::new(),
            ..Default::default()
        };
        match &m.layers[0].self_attn {
            AttentionBlock::Standard(a) => a.forward(x, &batch, cache),
            AttentionBlock::Latent(a) => a.forward(x, &batch, cache),
            AttentionBlock::Linear(a) => a.forward(x, &batch, cache).expect("linear attention"),
        }
    }

    /// Keys written at positions `delta + i`, then shifted back by `delta`, attend as keys
    /// written at `i` (standard and latent attention, every cache type the model takes): a
    /// query at the next position gets the same output from both, up to the cache type's
    /// rounding, and without the shift a different one.
    #[test]
    fn shifted_keys_attend_as_if_written_at_their_new_positions() {
        // GLM with a latent row of 64 + 32, which the block formats fit.
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic/glm4_moe_lite");
        let dir = std::env::temp_dir().join(format!("pio-shift-mla-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("config.json")).expect("read")).expect("json");
        json["kv_lora_rank"] = 64.into();
        json["qk_rope_head_dim"] = 32.into();
        std::fs::write(dir.join("config.json"), json.to_string()).expect("write config");
        crate::synth::write_random_checkpoint(
            &dir.join("config.json"),
            None,
            &dir.join("model"),
            pio_kernels::DType::F32,
            7,
        )
        .expect("synth");
        let wide_glm = load_dir(&dir.join("model"));
        let _ = std::fs::remove_dir_all(&dir);
        let models = [
            ("qwen3", fixture("qwen3")),
            ("qwen2", fixture("qwen2")),
            ("glm4_moe_lite", fixture("glm4_moe_lite")),
            ("glm-64+32", wide_glm),
        ];
        let mut block_formats = 0;
        for (name, m) in models {
            let h = m.config.hidden_size;
            let (bs, n, delta) = (16, 20, 32);
            let x: Vec<f32> = (0..(n + 1) * h).map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0).collect();
            for t in KvCacheDtype::ALL {
                let types = KvCacheType::both(t);
                if m.check_kv_cache_type(types).is_err() {
                    continue;
                }
                block_formats += usize::from(t.is_quantized());
                let mut a = m.new_kv_cache_with(bs, 8, types, 0);
                attend(&m, &mut a, &[0, 1], 0..n, &x[..n * h]);
                let want = attend(&m, &mut a, &[0, 1], n..n + 1, &x[n * h..]);
                // The same rows two blocks later (blocks 6 and 7 stand for the dropped ones).
                let run_shifted = |shift: bool| {
                    let mut b = m.new_kv_cache_with(bs, 8, types, 0);
                    attend(&m, &mut b, &[6, 7, 2, 3], delta..delta + n, &x[..n * h]);
                    if shift {
                        m.shift_positions(&mut b, &[2, 3], delta).expect("shift");
                    }
                    attend(&m, &mut b, &[2, 3], n..n + 1, &x[n * h..])
                };
                let max = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let diff = |got: &[f32]| got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / max;
                let bound = match t {
                    KvCacheDtype::F32 => 1e-5,
                    KvCacheDtype::F16 => 2e-3,
                    KvCacheDtype::BF16 => 2e-2,
                    KvCacheDtype::Q8_0 => 3e-2,
                    KvCacheDtype::Q4_0 => 0.3,
                };
                let (shifted, unshifted) = (diff(&run_shifted(true)), diff(&run_shifted(false)));
                assert!(shifted <= bound, "{name} {t}: shifted keys off by {shifted:.2e} (bound {bound:.0e})");
                assert!(unshifted > 2.0 * shifted.max(1e-4), "{name} {t}: the shift must matter ({unshifted:.2e})");
            }
        }
        assert_eq!(block_formats, 4, "q8_0 and q4_0 on standard and latent attention");
    }
}
