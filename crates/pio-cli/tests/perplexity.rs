//! `pio perplexity` as a user runs it: on the tiny synthetic Qwen3 (no tokenizer, so token ids
//! come from a `--tokens` JSON file), and on SmolLM2 with the text corpus when it is present.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn synthetic() -> String {
    root().join("testdata/synthetic/qwen3").to_string_lossy().into_owned()
}

fn pio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pio")).args(args).output().expect("pio runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_of(o: &Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("one JSON object on stdout")
}

/// Exit 1 with `error: ...` mentioning `what`, and no panic.
fn assert_fails(o: &Output, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains(what), "stderr {err:?} does not mention {what:?}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}

/// A temporary file path unique to this process and `name`, removed on drop.
struct Temp(PathBuf);

impl Temp {
    fn new(name: &str) -> Temp {
        Temp(std::env::temp_dir().join(format!("pio-ppl-{}-{name}", std::process::id())))
    }
    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `n` token ids of the 512-token synthetic vocabulary, as a `--tokens` file.
fn token_file(name: &str, n: usize, seed: u32) -> Temp {
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + seed * 104_729 + 13) % 509).collect();
    let t = Temp::new(name);
    std::fs::write(&t.0, serde_json::to_string(&ids).expect("json")).expect("write tokens");
    t
}

#[test]
fn base_then_compare_with_the_same_model_gives_zero_kl() {
    let m = synthetic();
    let toks = token_file("same.json", 3 * 24 + 5, 0);
    let base = Temp::new("same.kld");
    let args = ["perplexity", "--model", &m, "--tokens", toks.path(), "--ctx", "24", "--batch-tokens", "48"];
    let written = json_of(&pio(&[&args[..], &["--kl-divergence-base", base.path(), "--json"]].concat()));
    assert_eq!(written["chunks"], 3);
    assert_eq!(written["tokens_scored"], 3 * 11);
    assert_eq!(written["kl_divergence_base"], base.path());
    let ppl = written["ppl"].as_f64().expect("ppl");
    assert!(ppl > 1.0 && written["ppl_stderr"].as_f64().is_some_and(|s| s > 0.0), "{written}");

    // Tokens from the base file itself, or checked against the same --tokens.
    for extra in [&[][..], &["--tokens", toks.path()][..]] {
        let v =
            json_of(&pio(&[&["perplexity", "--model", &m, "--kl-divergence", base.path(), "--json"], extra].concat()));
        assert_eq!(v["ppl"].as_f64(), Some(ppl), "{v}");
        assert_eq!(v["base_ppl"].as_f64(), Some(ppl), "{v}");
        assert!(v["kl_mean"].as_f64().is_some_and(|k| (0.0..1e-6).contains(&k)), "{v}");
        assert!(v["kl_max"].as_f64().is_some_and(|k| k < 1e-5), "{v}");
        assert_eq!(v["same_top_p"].as_f64(), Some(1.0), "{v}");
        assert_eq!(v["ppl_ratio"].as_f64(), Some(1.0), "{v}");
        for k in ["kl_median", "kl_p99", "kl_p90", "rms_dp", "ln_ppl_ratio", "tokens_scored"] {
            assert!(v[k].is_number(), "{k} missing: {v}");
        }
    }

    // Text output: llama.cpp's running PPL, final estimate, and comparison summary.
    let o = pio(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("[1]") && text.contains(",[3]"), "{text}");
    assert!(text.contains("Final estimate: PPL = "), "{text}");
    let o = pio(&["perplexity", "--model", &m, "--kl-divergence", base.path()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for want in ["Mean    KLD:   0.000000", "Same top p: 100.000 ± 0.000 %", "Median  KLD:", "RMS Δp    :"] {
        assert!(text.contains(want), "{want:?} missing from {text}");
    }
}

#[test]
fn errors_are_clear() {
    let m = synthetic();
    let m = m.as_str();
    let toks = token_file("err.json", 2 * 24, 1);
    let t = toks.path();
    let base = Temp::new("err.kld");
    let o = pio(&["perplexity", "--model", m, "--tokens", t, "--ctx", "24", "--kl-divergence-base", base.path()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&base.0).expect("base file");

    assert_fails(&pio(&["perplexity", "--model", m, "--file", "/no/such/text.txt"]), "/no/such/text.txt");
    assert_fails(&pio(&["perplexity", "--model", m]), "--file");
    assert_fails(&pio(&["perplexity", "--model", m, "--kl-divergence", "/no/such/base.kld"]), "/no/such/base.kld");
    assert_fails(&pio(&["perplexity", "--model", "/no/such/model.gguf", "--tokens", t]), "/no/such/model.gguf");
    // Text needs a tokenizer, which the synthetic model has not.
    let text = Temp::new("err.txt");
    std::fs::write(&text.0, "Some text.\n").expect("write");
    assert_fails(&pio(&["perplexity", "--model", m, "--file", text.path()]), "tokenizer.json");
    assert_fails(&pio(&["perplexity", "--model", m, "--tokens", text.path()]), "JSON array of token ids");
    // Too short for one chunk; bad options.
    assert_fails(&pio(&["perplexity", "--model", m, "--tokens", t, "--ctx", "64"]), "fewer than one chunk of 64");
    assert_fails(&pio(&["perplexity", "--model", m, "--tokens", t, "--ctx", "2"]), "at least 3");
    assert_fails(&pio(&["perplexity", "--model", m, "--tokens", t, "--batch-tokens", "0"]), "--batch-tokens");
    let big = Temp::new("big.json");
    std::fs::write(&big.0, "[1, 2, 600]").expect("write");
    assert_fails(&pio(&["perplexity", "--model", m, "--tokens", big.path(), "--ctx", "3"]), "outside");

    // Mismatched context, tokens, vocabulary; truncated, padded and foreign base files.
    let kl =
        |extra: &[&str], base: &str| pio(&[&["perplexity", "--model", m, "--kl-divergence", base], extra].concat());
    assert_fails(&kl(&["--ctx", "16"], base.path()), "context of 24");
    let other = token_file("other.json", 2 * 24, 2);
    assert_fails(&kl(&["--tokens", other.path()], base.path()), "differ from the base file's at token 0");
    let bad = Temp::new("bad.kld");
    std::fs::write(&bad.0, &bytes[..bytes.len() - 1000]).expect("write");
    assert_fails(&kl(&[], bad.path()), "truncated");
    std::fs::write(&bad.0, &bytes[..20]).expect("write");
    assert_fails(&kl(&[], bad.path()), "truncated");
    std::fs::write(&bad.0, [&bytes[..], b"extra"].concat()).expect("write");
    assert_fails(&kl(&[], bad.path()), "5 bytes more");
    std::fs::write(&bad.0, b"GGUF this is not a base file at all").expect("write");
    assert_fails(&kl(&[], bad.path()), "not a pio KL-divergence base file");
    // A well-formed base for a 100-token vocabulary.
    let mut foreign = b"PIOKLD01".to_vec();
    for v in [100u32, 24, 1, u32::MAX] {
        foreign.extend(v.to_le_bytes());
    }
    foreign.extend((0..24u32).flat_map(u32::to_le_bytes));
    foreign.resize(foreign.len() + 11 * (24 + 2 * 100), 0);
    std::fs::write(&bad.0, &foreign).expect("write");
    assert_fails(&kl(&[], bad.path()), "vocabulary of 100 tokens, this model has 512");
}

/// The default model, when fetched, over the repository's text corpus.
#[test]
fn smollm2_over_the_corpus() {
    let dir = std::env::var_os("PIO_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let model = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.exists() {
        assert!(std::env::var_os("CI").is_none(), "{} missing in CI", model.display());
        eprintln!("skipping: {} not found (run scripts/fetch-models.sh)", model.display());
        return;
    }
    let corpus = root().join("testdata/corpus/public-domain-english.txt");
    let o = pio(&[
        "perplexity",
        "--model",
        model.to_str().expect("path"),
        "--file",
        corpus.to_str().expect("path"),
        "--ctx",
        "128",
        "--chunks",
        "3",
        "--json",
    ]);
    let v = json_of(&o);
    assert_eq!((v["chunks"].as_u64(), v["tokens_scored"].as_u64()), (Some(3), Some(3 * 63)));
    // Trained English text: far below the 49152-token vocabulary (about 30 at this context).
    let ppl = v["ppl"].as_f64().expect("ppl");
    assert!((10.0..80.0).contains(&ppl), "{v}");
}
