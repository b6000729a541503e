//! `pio perplexity`: perplexity of a model over a text file, and KL divergence against a
//! reference run, as llama.cpp's `llama-perplexity` (`--kl-divergence-base` / `--kl-divergence`).
//! The method and the base-file format are documented in [`pio_engine::perplexity`].

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use pio_engine::perplexity::{
    chunk_bos, perplexity, tokenize_text, BaseHeader, ChunkProgress, KlMode, PerplexityParams, PerplexityReport,
};
use serde_json::{json, Value};

use crate::args::ModelArgs;
use crate::commands::{load_model, out};

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score (as llama.cpp, one trailing newline is dropped). Optional with
    /// --kl-divergence, whose base file holds the tokens.
    #[arg(long, short = 'f', conflicts_with = "tokens")]
    pub file: Option<PathBuf>,
    /// Score a JSON array of token ids (what `pio tokenize` prints) instead of --file text,
    /// e.g. for a model without a tokenizer.
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Tokens per chunk; the second half of each chunk is scored [default: 512, or the base's].
    #[arg(long, visible_alias = "ctx-size", short = 'c')]
    pub ctx: Option<usize>,
    /// Score at most this many chunks (default: all whole chunks).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Tokens per forward: BATCH_TOKENS / CTX chunks run together (longer chunks run in pieces).
    #[arg(long, short = 'b', default_value_t = 2048)]
    pub batch_tokens: usize,
    /// Also write the model's next-token distributions at every scored position to OUT, the
    /// reference for a later --kl-divergence run.
    #[arg(long, value_name = "OUT", conflicts_with = "kl_divergence")]
    pub kl_divergence_base: Option<PathBuf>,
    /// Compare with the reference run stored in BASE (by --kl-divergence-base): KL divergence,
    /// same top token, Δp and both PPLs, over the tokens BASE holds.
    #[arg(long, value_name = "BASE")]
    pub kl_divergence: Option<PathBuf>,
    /// Print one JSON object (probabilities as fractions) instead of llama.cpp-style text.
    #[arg(long)]
    pub json: bool,
    /// Score each chunk through a streaming window of this many tokens (attention sinks plus
    /// the most recent tokens; see `pio generate --help`) instead of full attention.
    #[arg(long)]
    pub attention_window: Option<usize>,
    /// With --attention-window: tokens at the start of each chunk always kept.
    #[arg(long)]
    pub attention_sinks: Option<usize>,
}

pub fn cmd_perplexity(a: PerplexityArgs) -> Result<()> {
    if a.batch_tokens == 0 {
        bail!("--batch-tokens must be at least 1");
    }
    if a.chunks == Some(0) {
        bail!("--chunks must be at least 1");
    }
    if let Some(ctx) = a.ctx.filter(|&c| c < 3) {
        bail!("--ctx {ctx}: a chunk needs at least 3 tokens (the second half is scored)");
    }
    // Everything that can be checked before the model loads is.
    let base = match &a.kl_divergence {
        Some(path) => Some(open_base(path)?),
        None => None,
    };
    let input = match (&a.file, &a.tokens) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading --file {}", path.display()))?;
            Input::Text(text)
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading --tokens {}", path.display()))?;
            let ids: Vec<u32> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON array of token ids", path.display()))?;
            Input::Ids(ids)
        }
        (None, None) => match &base {
            Some((h, _)) => Input::Base(h.tokens.clone(), h.bos),
            None => bail!("give the text to score with --file (or token ids with --tokens)"),
        },
    };
    let ctx = match (&base, a.ctx) {
        (Some((h, _)), Some(ctx)) if ctx != h.ctx => {
            bail!("--ctx {ctx} differs from the base file's context of {} tokens", h.ctx)
        }
        (Some((h, _)), _) => h.ctx,
        (None, ctx) => ctx.unwrap_or(512),
    };

    let (loaded, _) = load_model(&a.model)?;
    let shape = loaded.model.shape();
    // Tokens, and whether chunks start with BOS: they do when the token stream does (the
    // tokenizer adds one), as llama.cpp's rule for tokenizers that add BOS.
    let (tokens, bos, source) = match input {
        Input::Text(text) => {
            let (ids, bos) = tokenize_text(loaded.tokenizer()?, &text)?;
            (ids, bos, display(&a.file))
        }
        Input::Ids(ids) => {
            let bos = loaded.tokenizer.as_ref().ok().and_then(|t| chunk_bos(t, &ids));
            (ids, bos, display(&a.tokens))
        }
        Input::Base(tokens, bos) => (tokens, bos, display(&a.kl_divergence)),
    };
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= shape.vocab_size) {
        bail!("{source}: token id {bad} is outside the model's vocabulary ({} tokens)", shape.vocab_size);
    }
    if tokens.len() < ctx {
        bail!(
            "{source} has {} tokens, fewer than one chunk of {ctx} (give a longer text or a smaller --ctx)",
            tokens.len()
        );
    }
    if ctx > shape.max_position_embeddings && a.attention_window.is_none() {
        eprintln!(
            "warning: --ctx {ctx} is longer than the model's trained context ({})",
            shape.max_position_embeddings
        );
    }
    let params = PerplexityParams {
        ctx,
        max_chunks: a.chunks,
        batch_tokens: a.batch_tokens,
        bos,
        kv_cache_type: crate::commands::kv_cache_type(&a.model, &loaded)?,
        attention_window: a.attention_window,
        attention_sinks: a.attention_sinks,
    };
    let n_chunks = params.num_chunks(tokens.len());
    if let Some((h, _)) = &base {
        h.check(shape.vocab_size, &tokens, &params).with_context(|| match &a.kl_divergence {
            Some(p) => format!("{} does not match this run", p.display()),
            None => String::new(),
        })?;
    }
    if !a.json {
        eprintln!(
            "perplexity: {} tokens, {} chunks of {ctx} ({} scored per chunk), {} chunks per forward{}",
            tokens.len(),
            base.as_ref().map_or(n_chunks, |(h, _)| n_chunks.min(h.n_chunks)),
            params.scored_per_chunk(),
            params.chunks_per_forward(),
            if bos.is_some() { ", BOS at each chunk start" } else { "" }
        );
    }

    let report = match (&a.kl_divergence_base, base) {
        (Some(path), _) => write_base(path, &loaded, &tokens, &params, a.json)?,
        (None, Some((header, mut rows))) => {
            let mut progress = kl_progress(a.json);
            let kl = KlMode::Compare { header: &header, rows: &mut rows };
            let r = perplexity(loaded.model.as_ref(), &tokens, &params, kl, &mut progress);
            progress_end(a.json)?;
            r?
        }
        (None, None) => {
            let mut progress = ppl_progress(a.json);
            let r = perplexity(loaded.model.as_ref(), &tokens, &params, KlMode::Off, &mut progress);
            progress_end(a.json)?;
            r?
        }
    };
    if a.json {
        let mut v = report_json(&report);
        v["model"] = json!(a.model.model.display().to_string());
        if let Some(p) = &a.kl_divergence_base {
            v["kl_divergence_base"] = json!(p.display().to_string());
        }
        out(&format!("{v}\n"))
    } else {
        out(&report_text(&report))
    }
}

/// Where the tokens come from.
enum Input {
    Text(String),
    Ids(Vec<u32>),
    /// The base file's own tokens and BOS.
    Base(Vec<u32>, Option<u32>),
}

fn display(path: &Option<PathBuf>) -> String {
    path.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
}

/// Opens a base file: its header, and a reader at its first row. A file shorter or longer
/// than its header says is refused here, before the model loads.
fn open_base(path: &Path) -> Result<(BaseHeader, BufReader<File>)> {
    let file = File::open(path).with_context(|| format!("opening --kl-divergence {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let header = BaseHeader::read(&mut r).with_context(|| format!("{}", path.display()))?;
    let want = header.file_len();
    if len < want {
        bail!(
            "{}: the base file is truncated: {len} bytes, its header ({} chunks of {}, vocabulary {}) needs {want}",
            path.display(),
            header.n_chunks,
            header.ctx,
            header.vocab_size
        );
    }
    if len > want {
        bail!("{}: {} bytes more than its header accounts for (not a complete base file)", path.display(), len - want);
    }
    Ok((header, r))
}

/// A perplexity run that also writes the base file (removed again if the run fails).
fn write_base(
    path: &Path,
    loaded: &pio_model::LoadedModel,
    tokens: &[u32],
    params: &PerplexityParams,
    json: bool,
) -> Result<PerplexityReport> {
    let file = File::create(path).with_context(|| format!("creating --kl-divergence-base {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut progress = ppl_progress(json);
    let result = perplexity(loaded.model.as_ref(), tokens, params, KlMode::WriteBase(&mut w), &mut progress)
        .map_err(anyhow::Error::from)
        .and_then(|r| {
            w.flush().with_context(|| format!("writing {}", path.display()))?;
            Ok(r)
        });
    progress_end(json)?;
    if result.is_err() {
        drop(w);
        let _ = std::fs::remove_file(path);
    } else if !json {
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        eprintln!("wrote {} ({:.1} MB)", path.display(), bytes as f64 / 1e6);
    }
    result
}

/// llama.cpp's running PPL: `[1]12.3456,[2]11.2345,...` on stdout as chunks finish.
fn ppl_progress(json: bool) -> impl FnMut(&ChunkProgress) {
    move |p: &ChunkProgress| {
        if !json {
            // A closed stdout shows up again at the final print.
            let _ = out(&format!("[{}]{:.4},", p.chunk, p.ppl));
        }
    }
}

/// llama.cpp's per-chunk comparison table, on stdout as chunks finish.
fn kl_progress(json: bool) -> impl FnMut(&ChunkProgress) {
    move |p: &ChunkProgress| {
        let Some(k) = p.kl.filter(|_| !json) else { return };
        let mut s = String::new();
        if p.chunk == 1 {
            s.push_str("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p\n");
        }
        s.push_str(&format!(
            "{:4}    {:9.4} ± {:9.4}    {:10.5} ± {:10.5}    {:10.5} ± {:10.5}    {:6.3} ± {:6.3} %    {:6.3} ± {:6.3} %\n",
            p.chunk,
            p.ppl,
            p.ppl_stderr,
            k.ln_ppl_ratio,
            k.ln_ppl_ratio_stderr,
            k.kl_mean,
            k.kl_stderr,
            100.0 * k.rms_dp,
            100.0 * k.rms_dp_stderr,
            100.0 * k.same_top_p,
            100.0 * k.same_top_p_stderr
        ));
        let _ = out(&s);
    }
}

fn progress_end(json: bool) -> Result<()> {
    if json {
        Ok(())
    } else {
        out("\n")
    }
}

/// The final figures as llama.cpp prints them.
fn report_text(r: &PerplexityReport) -> String {
    let mut s = format!(
        "Final estimate: PPL = {:.4} +/- {:.5}   ({} tokens scored in {} chunks of {}, {:.1} s)\n",
        r.ppl, r.ppl_stderr, r.tokens_scored, r.chunks, r.ctx, r.seconds
    );
    let Some(kl) = &r.kl else { return s };
    let k = &kl.summary;
    s.push_str("\n====== Perplexity statistics ======\n");
    s.push_str(&format!("Mean PPL(Q)                   : {:10.6} ± {:10.6}\n", r.ppl, r.ppl_stderr));
    s.push_str(&format!("Mean PPL(base)                : {:10.6} ± {:10.6}\n", k.base_ppl, k.base_ppl_stderr));
    s.push_str(&format!("Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2}%\n", 100.0 * k.ppl_correlation));
    s.push_str(&format!("Mean ln(PPL(Q)/PPL(base))     : {:10.6} ± {:10.6}\n", k.ln_ppl_ratio, k.ln_ppl_ratio_stderr));
    s.push_str(&format!("Mean PPL(Q)/PPL(base)         : {:10.6} ± {:10.6}\n", k.ppl_ratio, k.ppl_ratio_stderr));
    s.push_str(&format!("Mean PPL(Q)-PPL(base)         : {:10.6} ± {:10.6}\n", k.ppl_diff, k.ppl_diff_stderr));
    s.push_str("\n====== KL divergence statistics ======\n");
    s.push_str(&format!("Mean    KLD: {:10.6} ± {:10.6}\n", k.kl_mean, k.kl_stderr));
    let q = &kl.kl;
    for (name, v) in [
        ("Maximum", q.max),
        ("99.9%  ", q.p99_9),
        ("99.0%  ", q.p99),
        ("95.0%  ", q.p95),
        ("90.0%  ", q.p90),
        ("Median ", q.median),
        ("10.0%  ", q.p10),
        (" 5.0%  ", q.p5),
        (" 1.0%  ", q.p1),
        (" 0.1%  ", q.p0_1),
        ("Minimum", q.min),
    ] {
        s.push_str(&format!("{name} KLD: {v:10.6}\n"));
    }
    s.push_str("\n====== Token probability statistics ======\n");
    s.push_str(&format!("Mean    Δp: {:6.3} ± {:5.3} %\n", 100.0 * k.mean_dp, 100.0 * k.mean_dp_stderr));
    let q = &kl.dp;
    for (name, v) in [
        ("Maximum", q.max),
        ("99.9%  ", q.p99_9),
        ("99.0%  ", q.p99),
        ("95.0%  ", q.p95),
        ("90.0%  ", q.p90),
        ("75.0%  ", q.p75),
        ("Median ", q.median),
        ("25.0%  ", q.p25),
        ("10.0%  ", q.p10),
        (" 5.0%  ", q.p5),
        (" 1.0%  ", q.p1),
        (" 0.1%  ", q.p0_1),
        ("Minimum", q.min),
    ] {
        s.push_str(&format!("{name} Δp: {:6.3}%\n", 100.0 * v));
    }
    s.push_str(&format!("RMS Δp    : {:6.3} ± {:5.3} %\n", 100.0 * k.rms_dp, 100.0 * k.rms_dp_stderr));
    s.push_str(&format!("Same top p: {:6.3} ± {:5.3} %\n", 100.0 * k.same_top_p, 100.0 * k.same_top_p_stderr));
    s
}

/// The report as one flat JSON object (probabilities as fractions, KL in nats).
fn report_json(r: &PerplexityReport) -> Value {
    let mut v = json!({
        "ctx": r.ctx,
        "chunks": r.chunks,
        "tokens_scored": r.tokens_scored,
        "nll_mean": r.nll_mean,
        "ppl": r.ppl,
        "ppl_stderr": r.ppl_stderr,
        "seconds": r.seconds,
    });
    if let Some(kl) = &r.kl {
        let k = &kl.summary;
        let fields = [
            ("base_ppl", k.base_ppl),
            ("base_ppl_stderr", k.base_ppl_stderr),
            ("ppl_correlation", k.ppl_correlation),
            ("ln_ppl_ratio", k.ln_ppl_ratio),
            ("ln_ppl_ratio_stderr", k.ln_ppl_ratio_stderr),
            ("ppl_ratio", k.ppl_ratio),
            ("ppl_ratio_stderr", k.ppl_ratio_stderr),
            ("ppl_diff", k.ppl_diff),
            ("ppl_diff_stderr", k.ppl_diff_stderr),
            ("kl_mean", k.kl_mean),
            ("kl_stderr", k.kl_stderr),
            ("kl_min", kl.kl.min),
            ("kl_median", kl.kl.median),
            ("kl_p90", kl.kl.p90),
            ("kl_p95", kl.kl.p95),
            ("kl_p99", kl.kl.p99),
            ("kl_p99_9", kl.kl.p99_9),
            ("kl_max", kl.kl.max),
            ("mean_dp", k.mean_dp),
            ("mean_dp_stderr", k.mean_dp_stderr),
            ("rms_dp", k.rms_dp),
            ("rms_dp_stderr", k.rms_dp_stderr),
            ("dp_min", kl.dp.min),
            ("dp_median", kl.dp.median),
            ("dp_max", kl.dp.max),
            ("same_top_p", k.same_top_p),
            ("same_top_p_stderr", k.same_top_p_stderr),
        ];
        for (name, x) in fields {
            v[name] = json!(x);
        }
    }
    v
}
