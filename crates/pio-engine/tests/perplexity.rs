//! `pio_engine::perplexity` on the tiny synthetic Qwen3 (`testdata/synthetic/qwen3`, vocab 512,
//! no tokenizer: token ids are fed directly): its PPL equals exp(mean NLL) computed here from
//! full logits of plain forwards, whatever the batching, and a base file written by a run gives
//! KL 0 against the same model.

use std::path::PathBuf;

use pio_engine::engine::{Engine, EngineConfig};
use pio_engine::perplexity::{perplexity, BaseHeader, KlMode, PerplexityParams, PerplexityReport};
use pio_model::LoadedModel;

const VOCAB: usize = 512;

fn load(name: &str) -> LoadedModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic").join(name);
    pio_model::load(&dir, &mut |_, _| {}).expect("synthetic model loads")
}

/// Deterministic pseudo-random token ids in the vocabulary, with some repetition to learn from.
fn tokens(n: usize) -> Vec<u32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 5 == 4 {
                7
            } else {
                (x % VOCAB as u64) as u32
            }
        })
        .collect()
}

/// exp(mean NLL) over the second half of each chunk, from full logits of one forward per chunk,
/// with f64 log-softmax written out here.
fn reference_ppl(loaded: &LoadedModel, tokens: &[u32], ctx: usize, chunks: usize, bos: Option<u32>) -> f64 {
    let (mut nll, mut n) = (0.0f64, 0usize);
    for c in 0..chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let cfg = EngineConfig { max_batch_tokens: ctx, ..EngineConfig::for_tokens(ctx, Default::default()) };
        let mut engine = Engine::new(loaded.model.as_ref(), None, cfg).expect("engine");
        let logits = engine.score(&[chunk], 0).expect("forward").remove(0);
        assert_eq!(logits.len(), ctx * VOCAB);
        for pos in ctx / 2..ctx - 1 {
            let row = &logits[pos * VOCAB..(pos + 1) * VOCAB];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let target = tokens[c * ctx + pos + 1] as usize;
            nll += lse - row[target] as f64;
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

fn run(loaded: &LoadedModel, tokens: &[u32], params: &PerplexityParams, kl: KlMode<'_>) -> PerplexityReport {
    let mut seen = Vec::new();
    let report =
        perplexity(loaded.model.as_ref(), tokens, params, kl, &mut |p| seen.push((p.chunk, p.ppl))).expect("runs");
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), (1..=report.chunks).collect::<Vec<_>>());
    assert_eq!(seen.last().map(|s| s.1), Some(report.ppl));
    report
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn ppl_is_exp_mean_nll_of_full_logits_whatever_the_batching() {
    let loaded = load("qwen3");
    let ctx = 32;
    let toks = tokens(3 * ctx + 11); // the 11-token tail is left out
    let want = reference_ppl(&loaded, &toks, ctx, 3, None);
    // Two chunks per forward then one; one chunk per forward; each chunk in pieces of 10.
    for batch_tokens in [64, 32, 10] {
        let params = PerplexityParams { batch_tokens, ..PerplexityParams::new(ctx, None) };
        let r = run(&loaded, &toks, &params, KlMode::Off);
        assert_eq!((r.ctx, r.chunks, r.tokens_scored), (ctx, 3, 3 * (ctx - 1 - ctx / 2)));
        assert!(close(r.ppl, want, 1e-5), "batch {batch_tokens}: {} vs {want}", r.ppl);
        assert!(close(r.nll_mean.exp(), r.ppl, 1e-12));
        assert!(r.ppl_stderr > 0.0 && r.ppl_stderr < r.ppl, "{}", r.ppl_stderr);
        assert!(r.kl.is_none());
    }
    // A random model over random tokens is near-uniform: PPL near the vocabulary size.
    assert!(want > 100.0 && want < 3000.0, "{want}");
    // --chunks and the BOS rule.
    let params = PerplexityParams { max_chunks: Some(2), ..PerplexityParams::new(ctx, Some(1)) };
    let r = run(&loaded, &toks, &params, KlMode::Off);
    assert_eq!(r.chunks, 2);
    let want = reference_ppl(&loaded, &toks, ctx, 2, Some(1));
    assert!(close(r.ppl, want, 1e-5), "{} vs {want}", r.ppl);
}

#[test]
fn a_base_compared_with_its_own_model_gives_zero_kl() {
    let loaded = load("qwen3");
    let ctx = 24;
    let toks = tokens(4 * ctx);
    let params = PerplexityParams { batch_tokens: 48, ..PerplexityParams::new(ctx, Some(1)) };
    let mut base = Vec::new();
    let written = run(&loaded, &toks, &params, KlMode::WriteBase(&mut base));
    let header = BaseHeader::read(&mut base.as_slice()).expect("header");
    assert_eq!((header.vocab_size, header.ctx, header.n_chunks, header.bos), (VOCAB, ctx, 4, Some(1)));
    assert_eq!(header.tokens, toks);
    assert_eq!(header.file_len(), base.len() as u64);
    let rows = &base[(header.file_len() - 4 * 11 * header.row_bytes() as u64) as usize..];

    let cmp = run(&loaded, &toks, &params, KlMode::Compare { header: &header, rows: &mut &rows[..] });
    let kl = cmp.kl.expect("KL report");
    let s = kl.summary;
    assert_eq!(cmp.ppl, written.ppl);
    assert!(s.kl_mean >= 0.0 && s.kl_mean < 1e-6, "{}", s.kl_mean);
    assert!(kl.kl.max < 1e-5, "{}", kl.kl.max);
    assert_eq!(s.same_top_p, 1.0);
    assert!(close(s.base_ppl, written.ppl, 1e-12), "{} vs {}", s.base_ppl, written.ppl);
    assert!(s.ln_ppl_ratio.abs() < 1e-12 && close(s.ppl_ratio, 1.0, 1e-12));
    assert!(s.rms_dp < 1e-12, "{}", s.rms_dp);

    // Another model over the same tokens: KL > 0.
    let other = load("qwen3-bf16-untied");
    let cmp = run(&other, &toks, &params, KlMode::Compare { header: &header, rows: &mut &rows[..] });
    let s = cmp.kl.expect("KL report").summary;
    assert!(s.kl_mean > 1e-3, "{}", s.kl_mean);
    assert!(close(s.ppl_ratio, cmp.ppl / s.base_ppl, 1e-9));

    // A truncated base, different tokens, another context: clear errors.
    let err = |kl: KlMode<'_>, toks: &[u32], params: &PerplexityParams| {
        perplexity(loaded.model.as_ref(), toks, params, kl, &mut |_| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let cut = &rows[..rows.len() - 100];
    let e = err(KlMode::Compare { header: &header, rows: &mut &cut[..] }, &toks, &params);
    assert!(e.contains("truncated (in chunk 4)"), "{e}");
    let mut changed = toks.clone();
    changed[30] += 1;
    let e = err(KlMode::Compare { header: &header, rows: &mut &rows[..] }, &changed, &params);
    assert!(e.contains("differ") && e.contains("token 30"), "{e}");
    let other_ctx = PerplexityParams::new(16, Some(1));
    let e = err(KlMode::Compare { header: &header, rows: &mut &rows[..] }, &toks, &other_ctx);
    assert!(e.contains("context of 24"), "{e}");
    let e = err(KlMode::Off, &toks[..ctx - 1], &params);
    assert!(e.contains("fewer than one chunk"), "{e}");
}
