//! Perplexity of a model over a token stream, and KL divergence against a reference run, the
//! way llama.cpp's `llama-perplexity` measures them (`--kl-divergence-base` / `--kl-divergence`).
//!
//! # Method (llama.cpp's)
//!
//! - The tokens are cut into non-overlapping chunks of `ctx` tokens (a tail shorter than `ctx`
//!   is left out). Every chunk starts from an empty cache; several chunks may run in one batched
//!   forward, each as its own sequence, and a chunk longer than the batch runs in pieces.
//! - When the tokenizer adds BOS, the first token of every chunk is replaced by BOS.
//! - Only the second half of a chunk is scored, so every scored token has at least `ctx/2`
//!   tokens of context: the logits at positions `ctx/2 ..= ctx-2` predict the tokens at
//!   `ctx/2+1 ..= ctx-1`, `ctx - 1 - ctx/2` tokens per chunk.
//! - A token's negative log-likelihood is `logsumexp(logits) - logits[token]`, summed in f64.
//!   PPL = exp(mean NLL), and its standard error is `PPL * sqrt(var(NLL) / (n - 1))`.
//!
//! # KL divergence against a reference ("base") run
//!
//! A base run writes, for every scored position, its whole next-token distribution (quantized
//! log-probabilities) to a base file; a later run of another model (say a quantized one) over the
//! same tokens reads it and reports, per position, `KL(base || model) = Σ p_base · (ln p_base -
//! ln p_model)`, whether both agree on the most likely token, and `Δp = p_model(token) -
//! p_base(token)` of the actual next token; then their means, standard errors and percentiles.
//!
//! # Base file format (version 1, all little-endian)
//!
//! ```text
//! header  b"PIOKLD01"                 magic and version
//!         u32 vocab_size              logits per row
//!         u32 ctx                     tokens per chunk
//!         u32 n_chunks
//!         u32 bos                     token written over each chunk's first token, or u32::MAX
//!         u32 tokens[n_chunks * ctx]  the evaluated tokens, as tokenized (before the BOS rule)
//! rows    n_chunks * (ctx - 1 - ctx/2) rows, chunk after chunk, position order, each
//!         u32 top_id                  the base's most likely token
//!         f32 step                    nats per quantization step
//!         f64 top_lp                  log p of top_id (<= 0)
//!         f64 target_lp               exact log p of the actual next token
//!         u16 q[vocab_size]           log p_i = top_lp - step * q_i;
//!                                     q_i = 65535: p_i < p_top * e^-24, taken as 0
//! ```
//!
//! Each row covers `range = min(top_lp - min log p, 24)` nats below the top token in 65534
//! steps, so `step <= 24/65534 = 3.66e-4` and every stored log-probability is within `step/2 <=
//! 1.83e-4` nats of the true one (a relative error of at most 0.0183% in p). Tokens more than 24
//! nats below the top one carry at most `vocab · e^-24 ≈ 4e-11 · vocab` of probability together
//! and are dropped. On reading, the stored distribution is renormalized over the tokens it keeps,
//! so KL stays >= 0 and the KL of a model against its own base is ~1e-8 (second order in the
//! rounding), not the first-order ~1e-4. A row takes `24 + 2 * vocab_size` bytes (llama.cpp's
//! takes `8 + 2 * vocab_size`; ours spends 16 more bytes on an exact target log-probability, so
//! the base PPL is exact, and an explicit top token).

use std::io::{Read, Write};
use std::time::Instant;

use pio_model::tokenizer::Tokenizer;
use pio_model::CausalLm;

use crate::engine::{Engine, EngineConfig, RequestParams};
use crate::{EngineError, Result};

/// The base file's first 8 bytes: format name and version.
pub const BASE_MAGIC: &[u8; 8] = b"PIOKLD01";
/// Bytes of the fixed part of the header (magic, vocab, ctx, n_chunks, bos).
pub const BASE_HEADER_BYTES: u64 = 8 + 4 * 4;
/// How far below the top token (in nats) a base row stores log-probabilities.
pub const BASE_RANGE_NATS: f64 = 24.0;
/// Quantized value of a token below the stored range.
const BELOW_RANGE: u16 = u16::MAX;
/// Steps across the stored range (`0..=MAX_STEP`).
const MAX_STEP: u16 = u16::MAX - 1;
/// Bytes of a row's fixed part (top_id, step, top_lp, target_lp).
const ROW_HEADER_BYTES: usize = 4 + 4 + 8 + 8;
/// Cache block size of the engine.
const BLOCK_SIZE: usize = 16;

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct PerplexityParams {
    /// Tokens per chunk (llama.cpp's `--ctx-size`; 512 there by default). At least 3.
    pub ctx: usize,
    /// At most this many chunks (`None`: every whole chunk the tokens hold).
    pub max_chunks: Option<usize>,
    /// Tokens per forward: `batch_tokens / ctx` chunks run together, and a chunk longer than
    /// this runs in pieces of `batch_tokens` over its cache (llama.cpp's `--batch-size`, 2048).
    pub batch_tokens: usize,
    /// Written over the first token of every chunk: the model's BOS when its tokenizer adds one.
    pub bos: Option<u32>,
    /// Element type of the KV cache.
    pub kv_cache_type: pio_model::KvCacheType,
    /// Score each chunk through a streaming window of this many tokens
    /// ([`crate::engine::RequestParams::attention_window`]) instead of full attention.
    pub attention_window: Option<usize>,
    /// The streaming window's sinks.
    pub attention_sinks: Option<usize>,
}

impl PerplexityParams {
    /// llama.cpp's defaults: ctx 512, batches of 2048 tokens, all chunks.
    pub fn new(ctx: usize, bos: Option<u32>) -> PerplexityParams {
        PerplexityParams {
            ctx,
            max_chunks: None,
            batch_tokens: 2048,
            bos,
            kv_cache_type: Default::default(),
            attention_window: None,
            attention_sinks: None,
        }
    }

    /// Scored tokens per chunk.
    pub fn scored_per_chunk(&self) -> usize {
        self.ctx.saturating_sub(1 + self.ctx / 2)
    }

    /// Chunks evaluated over `num_tokens` tokens.
    pub fn num_chunks(&self, num_tokens: usize) -> usize {
        let n = num_tokens / self.ctx.max(1);
        self.max_chunks.map_or(n, |m| n.min(m))
    }

    /// Chunks that share one forward.
    pub fn chunks_per_forward(&self) -> usize {
        (self.batch_tokens / self.ctx.max(1)).max(1)
    }
}

/// The header of a base file: what the reference run evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseHeader {
    pub vocab_size: usize,
    pub ctx: usize,
    pub n_chunks: usize,
    /// Token written over each chunk's first token, if any.
    pub bos: Option<u32>,
    /// `n_chunks * ctx` tokens as tokenized.
    pub tokens: Vec<u32>,
}

impl BaseHeader {
    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        row_bytes(self.vocab_size)
    }

    /// Scored rows per chunk.
    pub fn rows_per_chunk(&self) -> usize {
        self.ctx.saturating_sub(1 + self.ctx / 2)
    }

    /// The size a complete file with this header has.
    pub fn file_len(&self) -> u64 {
        BASE_HEADER_BYTES
            + 4 * self.tokens.len() as u64
            + (self.n_chunks * self.rows_per_chunk()) as u64 * self.row_bytes() as u64
    }

    /// Writes the header.
    pub fn write(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(BASE_HEADER_BYTES as usize + 4 * self.tokens.len());
        buf.extend_from_slice(BASE_MAGIC);
        for v in [self.vocab_size as u32, self.ctx as u32, self.n_chunks as u32, self.bos.unwrap_or(u32::MAX)] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        for t in &self.tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        w.write_all(&buf)
    }

    /// Reads a header, leaving `r` at the first row.
    pub fn read(r: &mut dyn Read) -> Result<BaseHeader> {
        let truncated = |what: &str| EngineError::Invalid(format!("the base file is truncated ({what})"));
        let mut fixed = [0u8; BASE_HEADER_BYTES as usize];
        read_full(r, &mut fixed).map_err(io_err)?.then_some(()).ok_or_else(|| truncated("in its header"))?;
        if &fixed[..8] != BASE_MAGIC {
            return Err(EngineError::Invalid(if fixed[..6] == BASE_MAGIC[..6] {
                format!("the base file has format {:?}; this pio reads PIOKLD01", String::from_utf8_lossy(&fixed[..8]))
            } else {
                "not a pio KL-divergence base file (it does not start with PIOKLD01)".into()
            }));
        }
        let word =
            |i: usize| u32::from_le_bytes([fixed[8 + 4 * i], fixed[9 + 4 * i], fixed[10 + 4 * i], fixed[11 + 4 * i]]);
        let (vocab_size, ctx, n_chunks, bos) = (word(0) as usize, word(1) as usize, word(2) as usize, word(3));
        if vocab_size == 0 || ctx < 3 || n_chunks == 0 {
            return Err(EngineError::Invalid(format!(
                "the base file's header is invalid (vocab {vocab_size}, ctx {ctx}, {n_chunks} chunks)"
            )));
        }
        let num_tokens = n_chunks.checked_mul(ctx).filter(|&n| n <= u32::MAX as usize).ok_or_else(|| {
            EngineError::Invalid(format!("the base file's header is invalid ({n_chunks} chunks of {ctx})"))
        })?;
        // `take` grows the buffer as bytes arrive, so a corrupt count cannot allocate gigabytes.
        let mut bytes = Vec::new();
        r.take(4 * num_tokens as u64).read_to_end(&mut bytes).map_err(io_err)?;
        if bytes.len() != 4 * num_tokens {
            return Err(truncated("in its token list"));
        }
        let tokens = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(BaseHeader { vocab_size, ctx, n_chunks, bos: (bos != u32::MAX).then_some(bos), tokens })
    }

    /// Checks that a run of a model with `vocab_size` logits over `tokens` with `params`
    /// evaluates what this base did; returns the number of chunks to compare (the base's, or
    /// fewer when the tokens or `params.max_chunks` give fewer).
    pub fn check(&self, vocab_size: usize, tokens: &[u32], params: &PerplexityParams) -> Result<usize> {
        if self.vocab_size != vocab_size {
            return Err(EngineError::Invalid(format!(
                "the base file has a vocabulary of {} tokens, this model has {vocab_size}",
                self.vocab_size
            )));
        }
        if self.ctx != params.ctx {
            return Err(EngineError::Invalid(format!(
                "the base file was made with a context of {} tokens, this run uses {}",
                self.ctx, params.ctx
            )));
        }
        if self.bos != params.bos {
            let show = |b: Option<u32>| b.map_or("no BOS".to_string(), |b| format!("BOS {b}"));
            return Err(EngineError::Invalid(format!(
                "the base file starts chunks with {}, this run with {}",
                show(self.bos),
                show(params.bos)
            )));
        }
        let n = params.num_chunks(tokens.len()).min(self.n_chunks);
        if n == 0 {
            return Err(EngineError::Invalid(format!(
                "{} tokens are fewer than one chunk of {} tokens",
                tokens.len(),
                params.ctx
            )));
        }
        let len = n * self.ctx;
        if let Some(i) = (0..len).find(|&i| tokens[i] != self.tokens[i]) {
            return Err(EngineError::Invalid(format!(
                "the tokens differ from the base file's at token {i} (chunk {}): base {}, this run {}",
                i / self.ctx + 1,
                self.tokens[i],
                tokens[i]
            )));
        }
        Ok(n)
    }
}

/// What a run does besides scoring.
pub enum KlMode<'a> {
    /// Perplexity only.
    Off,
    /// Write a base file (header and rows) to this writer.
    WriteBase(&'a mut dyn Write),
    /// Compare with a base whose header was read ([`BaseHeader::read`]); `rows` is positioned
    /// at its first row.
    Compare { header: &'a BaseHeader, rows: &'a mut dyn Read },
}

/// Percentiles of a per-token figure (llama.cpp's linear interpolation).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quantiles {
    pub min: f64,
    pub p0_1: f64,
    pub p1: f64,
    pub p5: f64,
    pub p10: f64,
    pub p25: f64,
    pub median: f64,
    pub p75: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Quantiles {
    /// The quantiles of `values` (sorted here).
    pub fn of(values: &mut [f64]) -> Quantiles {
        values.sort_by(f64::total_cmp);
        let q = |f: f64| quantile(values, f);
        Quantiles {
            min: q(0.0),
            p0_1: q(0.001),
            p1: q(0.01),
            p5: q(0.05),
            p10: q(0.1),
            p25: q(0.25),
            median: q(0.5),
            p75: q(0.75),
            p90: q(0.9),
            p95: q(0.95),
            p99: q(0.99),
            p99_9: q(0.999),
            max: q(1.0),
        }
    }
}

/// Running comparison figures (what llama.cpp prints per chunk and in its summary).
/// Probabilities (`*_dp`, `same_top_p`) are fractions, not percentages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KlSummary {
    /// PPL of the base run over the same tokens (from its exact stored log-probabilities).
    pub base_ppl: f64,
    pub base_ppl_stderr: f64,
    /// Correlation of the two runs' per-token NLL.
    pub ppl_correlation: f64,
    /// `ln(PPL / PPL(base))` = mean NLL difference.
    pub ln_ppl_ratio: f64,
    pub ln_ppl_ratio_stderr: f64,
    pub ppl_ratio: f64,
    pub ppl_ratio_stderr: f64,
    /// `PPL - PPL(base)`.
    pub ppl_diff: f64,
    pub ppl_diff_stderr: f64,
    /// Mean `KL(base || model)` per token, in nats.
    pub kl_mean: f64,
    pub kl_stderr: f64,
    /// Mean `p_model(token) - p_base(token)` of the actual next token.
    pub mean_dp: f64,
    pub mean_dp_stderr: f64,
    /// Root mean square of that difference.
    pub rms_dp: f64,
    pub rms_dp_stderr: f64,
    /// Fraction of positions where both runs' most likely token is the same.
    pub same_top_p: f64,
    pub same_top_p_stderr: f64,
}

/// The comparison with a base run.
#[derive(Debug, Clone, PartialEq)]
pub struct KlReport {
    pub summary: KlSummary,
    /// Per-token KL divergence.
    pub kl: Quantiles,
    /// Per-token `p_model(token) - p_base(token)`.
    pub dp: Quantiles,
}

/// The result of [`perplexity`].
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityReport {
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub nll_mean: f64,
    /// `exp(nll_mean)`.
    pub ppl: f64,
    pub ppl_stderr: f64,
    /// With [`KlMode::Compare`].
    pub kl: Option<KlReport>,
    /// Wall time of the forwards and the scoring.
    pub seconds: f64,
}

/// Figures after each chunk, for progress output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkProgress {
    /// Chunks done (1-based number of the last one).
    pub chunk: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub kl: Option<KlSummary>,
    /// Wall time so far.
    pub seconds: f64,
}

/// Evaluates `model` over `tokens` (see the module docs for the method). `on_chunk` is called
/// after every chunk, in order.
pub fn perplexity(
    model: &dyn CausalLm,
    tokens: &[u32],
    params: &PerplexityParams,
    mut kl: KlMode<'_>,
    on_chunk: &mut dyn FnMut(&ChunkProgress),
) -> Result<PerplexityReport> {
    let start = Instant::now();
    let vocab = model.shape().vocab_size;
    let ctx = params.ctx;
    if ctx < 3 {
        return Err(EngineError::Invalid(format!("the context must be at least 3 tokens (got {ctx})")));
    }
    if params.batch_tokens == 0 {
        return Err(EngineError::Invalid("the batch must hold at least one token".into()));
    }
    if params.max_chunks == Some(0) {
        return Err(EngineError::Invalid("at least one chunk is needed".into()));
    }
    if let Some(bad) = tokens.iter().chain(params.bos.as_ref()).find(|&&t| t as usize >= vocab) {
        return Err(EngineError::Invalid(format!("token id {bad} is outside the vocabulary ({vocab} tokens)")));
    }
    let n_chunks = match &kl {
        KlMode::Compare { header, .. } => header.check(vocab, tokens, params)?,
        _ => params.num_chunks(tokens.len()),
    };
    if n_chunks == 0 {
        return Err(EngineError::Invalid(format!("{} tokens are fewer than one chunk of {ctx} tokens", tokens.len())));
    }
    if let KlMode::WriteBase(w) = &mut kl {
        let header =
            BaseHeader { vocab_size: vocab, ctx, n_chunks, bos: params.bos, tokens: tokens[..n_chunks * ctx].to_vec() };
        header.write(*w).map_err(|e| EngineError::Invalid(format!("writing the base file: {e}")))?;
    }

    let first = ctx / 2;
    let scored = params.scored_per_chunk();
    let per_forward = params.chunks_per_forward();
    let piece = ctx.min(params.batch_tokens);
    // A streaming window holds at most its own tokens of a chunk.
    let held = params.attention_window.map_or(ctx, |w| w.min(ctx));
    let cfg = EngineConfig {
        block_size: BLOCK_SIZE,
        num_blocks: per_forward * held.div_ceil(BLOCK_SIZE),
        max_num_seqs: per_forward,
        max_batch_tokens: per_forward * piece,
        max_model_len: held,
        prefix_caching: false,
        kv_cache_type: params.kv_cache_type,
        max_memory: None,
        spec: None,
    };
    let mut engine = Engine::new(model, None, cfg)?;
    let mut acc = Accumulator::default();
    let mut base_rows = Vec::new();
    for group_start in (0..n_chunks).step_by(per_forward) {
        let group = group_start..(group_start + per_forward).min(n_chunks);
        let chunk_tokens = |c: usize| &tokens[c * ctx..(c + 1) * ctx];
        // Each chunk is a request of its own, fed `piece` tokens per forward; the logits of
        // positions >= first come back (the last one predicts past the chunk and is not used).
        let chunks: Vec<Vec<u32>> = group
            .clone()
            .map(|c| {
                let mut t = chunk_tokens(c).to_vec();
                if let Some(bos) = params.bos {
                    t[0] = bos;
                }
                t
            })
            .collect();
        let request = RequestParams {
            max_tokens: Some(0),
            prompt_logits: Some(first),
            attention_window: params.attention_window,
            attention_sinks: params.attention_sinks,
            ..Default::default()
        };
        let logits = engine.score_with(&chunks, &request)?;
        for (l, c) in logits.iter().zip(group.clone()) {
            let rows = l.get(..scored * vocab).ok_or_else(|| {
                EngineError::Invalid(format!("the model returned {} logits for chunk {}", l.len(), c + 1))
            })?;
            let targets = &chunk_tokens(c)[first + 1..];
            match &mut kl {
                KlMode::Off => acc.add(&score_rows(rows, vocab, targets, RowMode::Plain, c)?),
                KlMode::WriteBase(w) => {
                    let scores = score_rows(rows, vocab, targets, RowMode::Write, c)?;
                    for s in &scores {
                        w.write_all(&s.base_row)
                            .map_err(|e| EngineError::Invalid(format!("writing the base file: {e}")))?;
                    }
                    acc.add(&scores);
                }
                KlMode::Compare { header, rows: r } => {
                    base_rows.resize(scored * header.row_bytes(), 0);
                    if !read_full(*r, &mut base_rows).map_err(io_err)? {
                        return Err(EngineError::Invalid(format!("the base file is truncated (in chunk {})", c + 1)));
                    }
                    acc.add(&score_rows(rows, vocab, targets, RowMode::Compare(&base_rows), c)?);
                }
            }
            let (ppl, ppl_stderr) = acc.ppl();
            on_chunk(&ChunkProgress {
                chunk: c + 1,
                chunks: n_chunks,
                tokens_scored: acc.n,
                ppl,
                ppl_stderr,
                kl: acc.compared.then(|| acc.kl_summary()),
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }
    if let KlMode::WriteBase(w) = &mut kl {
        w.flush().map_err(|e| EngineError::Invalid(format!("writing the base file: {e}")))?;
    }
    let (ppl, ppl_stderr) = acc.ppl();
    let kl = acc.compared.then(|| KlReport {
        summary: acc.kl_summary(),
        kl: Quantiles::of(&mut acc.kl_values),
        dp: Quantiles::of(&mut acc.dp_values),
    });
    Ok(PerplexityReport {
        ctx,
        chunks: n_chunks,
        tokens_scored: acc.n,
        nll_mean: acc.nll / acc.n.max(1) as f64,
        ppl,
        ppl_stderr,
        kl,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Tokenizes a text file's contents as llama-perplexity does (one trailing newline dropped, the
/// tokenizer's special tokens added) and returns the tokens with the BOS rule for
/// [`PerplexityParams::bos`] ([`chunk_bos`]).
pub fn tokenize_text(tok: &Tokenizer, text: &str) -> Result<(Vec<u32>, Option<u32>)> {
    let ids = tok.encode(text.strip_suffix('\n').unwrap_or(text), true)?;
    let bos = chunk_bos(tok, &ids);
    Ok((ids, bos))
}

/// The token to start every chunk with: the tokenizer's BOS when the token stream starts with
/// it (the tokenizer adds one), else none.
pub fn chunk_bos(tok: &Tokenizer, ids: &[u32]) -> Option<u32> {
    tok.bos_token_id().filter(|b| ids.first() == Some(b))
}

/// `logsumexp(logits)` in f64, and the index of the largest logit (the first on ties).
/// Not finite when a logit is NaN or all are -inf.
pub fn log_sum_exp(logits: &[f32]) -> (f64, usize) {
    let (mut imax, mut max) = (0, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > max {
            (imax, max) = (i, v);
        }
    }
    let m = max as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - m).exp()).sum();
    (m + sum.ln(), imax)
}

/// `KL(base || model) = Σ p_b (ln p_b - ln p_m)` over the tokens `base_lp` keeps (finite
/// entries), where `ln p_m = logits - lse` ([`log_sum_exp`] of `logits`).
pub fn kl_divergence(base_lp: &[f64], logits: &[f32], lse: f64) -> f64 {
    base_lp.iter().zip(logits).filter(|(b, _)| b.is_finite()).map(|(&b, &l)| b.exp() * (b - (l as f64 - lse))).sum()
}

/// Linear interpolation between the sorted `values` at `fraction` of the way (llama.cpp's).
pub fn quantile(sorted: &[f64], fraction: f64) -> f64 {
    let (Some(&lo), Some(&hi)) = (sorted.first(), sorted.last()) else { return f64::NAN };
    if fraction <= 0.0 {
        return lo;
    }
    if fraction >= 1.0 {
        return hi;
    }
    let p = fraction * (sorted.len() - 1) as f64;
    let i = p as usize;
    let f = p - i as f64;
    (1.0 - f) * sorted[i] + f * sorted[(i + 1).min(sorted.len() - 1)]
}

/// Mean of `n` values from their sum and sum of squares, and the standard error of that mean
/// (`sqrt(var / (n - 1))`, 0 when it cannot be estimated).
pub fn mean_and_stderr(sum: f64, sum2: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    let var = sum2 / n as f64 - mean * mean;
    (mean, if var > 0.0 && n > 1 { (var / (n - 1) as f64).sqrt() } else { 0.0 })
}

/// Bytes of one base-file row for a vocabulary of `vocab` tokens.
pub fn row_bytes(vocab: usize) -> usize {
    ROW_HEADER_BYTES + 2 * vocab
}

/// Quantizes one row of logits (see the module docs) into `out` (cleared first).
/// `lse` and `top` are [`log_sum_exp`]'s; `target` is the actual next token.
pub fn quantize_row(logits: &[f32], lse: f64, top: usize, target: u32, out: &mut Vec<u8>) {
    let lp = |i: usize| logits[i] as f64 - lse;
    let top_lp = lp(top);
    let min_logit = logits.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let range = (top_lp - (min_logit as f64 - lse)).min(BASE_RANGE_NATS);
    // The step as stored (f32) is the one quantizing, so reading reproduces it exactly.
    let step = (range / MAX_STEP as f64) as f32;
    let inv = if step > 0.0 { 1.0 / step as f64 } else { 0.0 };
    out.clear();
    out.extend_from_slice(&(top as u32).to_le_bytes());
    out.extend_from_slice(&step.to_le_bytes());
    out.extend_from_slice(&top_lp.to_le_bytes());
    out.extend_from_slice(&lp(target as usize).to_le_bytes());
    for &v in logits {
        let below = top_lp - (v as f64 - lse);
        let q = if below > range { BELOW_RANGE } else { ((below * inv).round() as u16).min(MAX_STEP) };
        out.extend_from_slice(&q.to_le_bytes());
    }
}

/// One row of a base file, read.
#[derive(Debug, Clone, Copy)]
pub struct BaseRow<'a> {
    pub top_id: u32,
    pub step: f32,
    pub top_lp: f64,
    pub target_lp: f64,
    /// `2 * vocab` bytes of little-endian u16.
    q: &'a [u8],
}

impl<'a> BaseRow<'a> {
    /// Parses a row of [`row_bytes`]`(vocab)` bytes.
    pub fn parse(bytes: &'a [u8]) -> BaseRow<'a> {
        let f = |i: usize| [bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]];
        let d = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            f64::from_le_bytes(b)
        };
        BaseRow {
            top_id: u32::from_le_bytes(f(0)),
            step: f32::from_le_bytes(f(4)),
            top_lp: d(8),
            target_lp: d(16),
            q: &bytes[ROW_HEADER_BYTES..],
        }
    }

    /// The stored log-probabilities as written (`-inf` below the range), not renormalized.
    pub fn raw_log_probs(&self, out: &mut Vec<f64>) {
        out.clear();
        let step = self.step as f64;
        out.extend(self.q.chunks_exact(2).map(|c| match u16::from_le_bytes([c[0], c[1]]) {
            BELOW_RANGE => f64::NEG_INFINITY,
            q => self.top_lp - step * q as f64,
        }));
    }

    /// The stored log-probabilities renormalized over the tokens kept (they sum to 1 in p).
    pub fn log_probs(&self, out: &mut Vec<f64>) {
        self.raw_log_probs(out);
        let z: f64 = out.iter().map(|&lp| (lp - self.top_lp).exp()).sum();
        let shift = self.top_lp + z.ln();
        out.iter_mut().for_each(|lp| *lp -= shift);
    }
}

/// What to do with each row besides scoring it.
#[derive(Clone, Copy)]
enum RowMode<'a> {
    Plain,
    Write,
    /// The chunk's base rows, `rows * row_bytes` bytes.
    Compare(&'a [u8]),
}

/// The figures of one scored position.
#[derive(Debug, Default)]
struct RowScore {
    nll: f64,
    /// With a base: KL, the base's NLL, whether the top tokens agree.
    kl: Option<(f64, f64, bool)>,
    /// The quantized row, when writing a base.
    base_row: Vec<u8>,
}

/// Scores rows of logits (`[targets.len(), vocab]`) against their targets, in parallel.
fn score_rows(logits: &[f32], vocab: usize, targets: &[u32], mode: RowMode<'_>, chunk: usize) -> Result<Vec<RowScore>> {
    let n = targets.len();
    let parts = pio_kernels::parallel::for_each_range(n, n * vocab * 8, |lo, hi| {
        let mut lp = Vec::new();
        (lo..hi)
            .map(|i| {
                let row = &logits[i * vocab..(i + 1) * vocab];
                let (lse, top) = log_sum_exp(row);
                if !lse.is_finite() {
                    return Err(EngineError::Invalid(format!(
                        "the model's logits are not finite (chunk {}, row {i})",
                        chunk + 1
                    )));
                }
                let target = targets[i];
                let mut s = RowScore { nll: lse - row[target as usize] as f64, ..Default::default() };
                match mode {
                    RowMode::Plain => {}
                    RowMode::Write => quantize_row(row, lse, top, target, &mut s.base_row),
                    RowMode::Compare(bytes) => {
                        let rb = row_bytes(vocab);
                        let base = BaseRow::parse(&bytes[i * rb..(i + 1) * rb]);
                        base.log_probs(&mut lp);
                        s.kl = Some((kl_divergence(&lp, row, lse), -base.target_lp, base.top_id as usize == top));
                    }
                }
                Ok(s)
            })
            .collect::<Result<Vec<RowScore>>>()
    });
    let mut out = Vec::with_capacity(n);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Running sums over scored tokens (llama.cpp's), and the per-token values for percentiles.
#[derive(Debug, Default)]
struct Accumulator {
    n: usize,
    nll: f64,
    nll2: f64,
    /// Whether the rows had a base to compare with.
    compared: bool,
    base: f64,
    base2: f64,
    nll_base: f64,
    kl: f64,
    kl2: f64,
    dp: f64,
    dp2: f64,
    dp4: f64,
    same_top: usize,
    kl_values: Vec<f64>,
    dp_values: Vec<f64>,
}

impl Accumulator {
    fn add(&mut self, rows: &[RowScore]) {
        for r in rows {
            self.n += 1;
            self.nll += r.nll;
            self.nll2 += r.nll * r.nll;
            if let Some((kl, nll_base, same_top)) = r.kl {
                self.compared = true;
                self.base += nll_base;
                self.base2 += nll_base * nll_base;
                self.nll_base += r.nll * nll_base;
                self.kl += kl;
                self.kl2 += kl * kl;
                let dp = (-r.nll).exp() - (-nll_base).exp();
                self.dp += dp;
                self.dp2 += dp * dp;
                self.dp4 += dp * dp * dp * dp;
                self.same_top += same_top as usize;
                self.kl_values.push(kl);
                self.dp_values.push(dp);
            }
        }
    }

    /// PPL and its standard error.
    fn ppl(&self) -> (f64, f64) {
        let (mean, se) = mean_and_stderr(self.nll, self.nll2, self.n);
        let ppl = mean.exp();
        (ppl, ppl * se)
    }

    fn kl_summary(&self) -> KlSummary {
        let n = self.n;
        let (ln_ppl, ln_ppl_se) = mean_and_stderr(self.nll, self.nll2, n);
        let (ln_base, ln_base_se) = mean_and_stderr(self.base, self.base2, n);
        // Covariance of the two means (as llama.cpp: of the values, over n - 1).
        let cov = if n > 1 { (self.nll_base / n as f64 - ln_ppl * ln_base) / (n - 1) as f64 } else { 0.0 };
        let (ppl, base_ppl) = (ln_ppl.exp(), ln_base.exp());
        let (ppl_se, base_se) = (ppl * ln_ppl_se, base_ppl * ln_base_se);
        let ln_ratio = ln_ppl - ln_base;
        // Identical runs make this 0 up to rounding, which may dip below it.
        let ln_ratio_se = (ln_ppl_se * ln_ppl_se + ln_base_se * ln_base_se - 2.0 * cov).max(0.0).sqrt();
        let ratio = ln_ratio.exp();
        let (kl_mean, kl_stderr) = mean_and_stderr(self.kl, self.kl2, n);
        let (mean_dp, mean_dp_stderr) = mean_and_stderr(self.dp, self.dp2, n);
        let (mse, mse_se) = mean_and_stderr(self.dp2, self.dp4, n);
        let rms_dp = mse.sqrt();
        let same = if n > 0 { self.same_top as f64 / n as f64 } else { 0.0 };
        KlSummary {
            base_ppl,
            base_ppl_stderr: base_se,
            ppl_correlation: if ln_ppl_se > 0.0 && ln_base_se > 0.0 { cov / (ln_ppl_se * ln_base_se) } else { 0.0 },
            ln_ppl_ratio: ln_ratio,
            ln_ppl_ratio_stderr: ln_ratio_se,
            ppl_ratio: ratio,
            ppl_ratio_stderr: ratio * ln_ratio_se,
            ppl_diff: ppl - base_ppl,
            ppl_diff_stderr: (ppl_se * ppl_se + base_se * base_se - 2.0 * ppl * base_ppl * cov).max(0.0).sqrt(),
            kl_mean,
            kl_stderr,
            mean_dp,
            mean_dp_stderr,
            rms_dp,
            rms_dp_stderr: if rms_dp > 0.0 { 0.5 / rms_dp * mse_se } else { 0.0 },
            same_top_p: same,
            same_top_p_stderr: if n > 1 { (same * (1.0 - same) / (n - 1) as f64).sqrt() } else { 0.0 },
        }
    }
}

/// Fills `buf` from `r`; false when the stream ended first.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn io_err(e: std::io::Error) -> EngineError {
    EngineError::Invalid(format!("reading the base file: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits whose softmax is `p` (plus an arbitrary shift, which softmax ignores).
    fn logits_of(p: &[f64], shift: f64) -> Vec<f32> {
        p.iter().map(|&x| (x.ln() + shift) as f32).collect()
    }

    #[test]
    fn log_sum_exp_is_stable_and_finds_the_top() {
        let (lse, top) = log_sum_exp(&[1000.0, 1000.0 + 2f32.ln(), 1000.0]);
        assert_eq!(top, 1);
        assert!((lse - (1000.0 + 4f64.ln())).abs() < 1e-4, "{lse}");
        assert!(!log_sum_exp(&[1.0, f32::NAN]).0.is_finite());
        assert!(!log_sum_exp(&[f32::NEG_INFINITY; 2]).0.is_finite());
    }

    #[test]
    fn kl_of_identical_distributions_is_zero() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37 % 11) as f32) * 0.3 - 1.0).collect();
        let (lse, _) = log_sum_exp(&logits);
        let lp: Vec<f64> = logits.iter().map(|&l| l as f64 - lse).collect();
        assert!(kl_divergence(&lp, &logits, lse).abs() < 1e-12);
    }

    #[test]
    fn kl_of_a_hand_computed_three_token_case() {
        // base (0.5, 0.25, 0.25), model (0.25, 0.5, 0.25):
        // KL = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln 1 = 0.25 ln 2.
        let base = [0.5, 0.25, 0.25];
        let model = logits_of(&[0.25, 0.5, 0.25], 3.0);
        let (lse, top) = log_sum_exp(&model);
        assert_eq!(top, 1);
        let base_lp: Vec<f64> = base.iter().map(|p: &f64| p.ln()).collect();
        let kl = kl_divergence(&base_lp, &model, lse);
        assert!((kl - 0.25 * 2f64.ln()).abs() < 1e-6, "{kl}");
        // The model's NLL of token 0 is ln 4.
        assert!((lse - model[0] as f64 - 4f64.ln()).abs() < 1e-6);
        // And the other way round: 0.25 ln(0.25/0.5) + 0.5 ln(0.5/0.25) = 0.25 ln 2 too.
        let (blse, _) = log_sum_exp(&logits_of(&base, -1.0));
        let model_lp: Vec<f64> = model.iter().map(|&l| l as f64 - lse).collect();
        let back = kl_divergence(&model_lp, &logits_of(&base, -1.0), blse);
        assert!((back - 0.25 * 2f64.ln()).abs() < 1e-6, "{back}");
    }

    #[test]
    fn statistics_of_a_three_token_run() {
        // NLLs ln 2, ln 4, ln 8: mean 2 ln 2, PPL 4; var = (ln 2)^2 * 2/3, stderr sqrt(var/2).
        let mut acc = Accumulator::default();
        let rows: Vec<RowScore> =
            [2f64, 4.0, 8.0].iter().map(|x| RowScore { nll: x.ln(), ..Default::default() }).collect();
        acc.add(&rows);
        let (ppl, se) = acc.ppl();
        assert!((ppl - 4.0).abs() < 1e-12, "{ppl}");
        let want_se = 4.0 * (2f64.ln().powi(2) * 2.0 / 3.0 / 2.0).sqrt();
        assert!((se - want_se).abs() < 1e-12, "{se} vs {want_se}");
    }

    #[test]
    fn comparison_figures_of_a_hand_computed_case() {
        // Three positions; the model's and base's NLL and KL given, top tokens agree twice.
        let mut acc = Accumulator::default();
        let rows = [(0.5f64, 0.4f64, 0.01f64, true), (1.0, 1.2, 0.02, true), (2.0, 2.0, 0.03, false)];
        acc.add(
            &rows
                .iter()
                .map(|&(nll, base, kl, same)| RowScore { nll, kl: Some((kl, base, same)), ..Default::default() })
                .collect::<Vec<_>>(),
        );
        let s = acc.kl_summary();
        assert!((s.kl_mean - 0.02).abs() < 1e-12);
        assert!((s.same_top_p - 2.0 / 3.0).abs() < 1e-12);
        let ln_ratio = (0.5 + 1.0 + 2.0 - 0.4 - 1.2 - 2.0) / 3.0;
        assert!((s.ln_ppl_ratio - ln_ratio).abs() < 1e-12);
        assert!((s.ppl_ratio - f64::exp(ln_ratio)).abs() < 1e-12);
        let dps: Vec<f64> = rows.iter().map(|r| (-r.0).exp() - (-r.1).exp()).collect();
        let rms = (dps.iter().map(|d| d * d).sum::<f64>() / 3.0).sqrt();
        assert!((s.rms_dp - rms).abs() < 1e-12);
        assert!((s.base_ppl - f64::exp(3.6 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn quantiles_interpolate_like_llama_cpp() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        let q = Quantiles::of(&mut v);
        assert_eq!((q.min, q.max), (1.0, 4.0));
        assert!((q.median - 2.5).abs() < 1e-12);
        assert!((q.p90 - 3.7).abs() < 1e-12);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn stored_log_probs_round_trip_within_half_a_step() {
        // A peaked row spanning more than the stored range, and a flat one.
        let wide: Vec<f32> = (0..1001).map(|i| 12.0 - 0.03 * i as f32 + ((i * 7919) % 13) as f32 * 0.01).collect();
        let flat: Vec<f32> = (0..7).map(|i| 0.5 + 0.1 * (i % 3) as f32).collect();
        let same = vec![2.0f32; 5];
        for logits in [wide, flat, same] {
            let (lse, top) = log_sum_exp(&logits);
            let mut bytes = Vec::new();
            quantize_row(&logits, lse, top, 3, &mut bytes);
            assert_eq!(bytes.len(), row_bytes(logits.len()));
            let row = BaseRow::parse(&bytes);
            assert_eq!(row.top_id as usize, top);
            assert_eq!(row.target_lp, logits[3] as f64 - lse);
            assert!(row.step as f64 <= BASE_RANGE_NATS / MAX_STEP as f64 * (1.0 + 1e-6));
            let mut raw = Vec::new();
            row.raw_log_probs(&mut raw);
            for (i, (&got, &l)) in raw.iter().zip(&logits).enumerate() {
                let want = l as f64 - lse;
                if got.is_finite() {
                    let err = (got - want).abs();
                    assert!(err <= row.step as f64 / 2.0 + 1e-9, "token {i}: {got} vs {want}");
                } else {
                    assert!(want < row.top_lp - BASE_RANGE_NATS, "token {i} dropped at {want}");
                }
            }
            // Renormalized, the stored distribution sums to 1 and is ~0 KL from the original.
            let mut lp = Vec::new();
            row.log_probs(&mut lp);
            let total: f64 = lp.iter().map(|x| x.exp()).sum();
            assert!((total - 1.0).abs() < 1e-12, "{total}");
            let kl = kl_divergence(&lp, &logits, lse);
            assert!((0.0..1e-7).contains(&kl), "{kl}");
        }
    }

    #[test]
    fn header_round_trips_and_rejects_what_it_cannot_use() {
        let h = BaseHeader { vocab_size: 10, ctx: 4, n_chunks: 2, bos: Some(1), tokens: (0..8).collect() };
        let mut bytes = Vec::new();
        h.write(&mut bytes).expect("write");
        assert_eq!(bytes.len() as u64, BASE_HEADER_BYTES + 32);
        assert_eq!(h.file_len(), bytes.len() as u64 + 2 * h.row_bytes() as u64);
        let back = BaseHeader::read(&mut bytes.as_slice()).expect("read");
        assert_eq!(back, h);
        let msg = |r: Result<BaseHeader>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(BaseHeader::read(&mut &bytes[..30])).contains("truncated"));
        assert!(msg(BaseHeader::read(&mut &b"GGUF\x03\0\0\0more bytes than that....."[..])).contains("not a pio"));
        let tokens: Vec<u32> = (0..8).collect();
        let mut params = PerplexityParams::new(4, Some(1));
        assert_eq!(h.check(10, &tokens, &params).ok(), Some(2));
        assert_eq!(h.check(10, &tokens[..5], &params).ok(), Some(1));
        let err = |r: Result<usize>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(h.check(11, &tokens, &params)).contains("vocabulary"));
        let mut other = tokens.clone();
        other[6] = 9;
        assert!(err(h.check(10, &other, &params)).contains("at token 6 (chunk 2)"));
        params.bos = None;
        assert!(err(h.check(10, &tokens, &params)).contains("BOS"));
        params = PerplexityParams::new(8, Some(1));
        assert!(err(h.check(10, &tokens, &params)).contains("context"));
    }
}
