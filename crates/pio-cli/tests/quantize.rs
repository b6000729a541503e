//! `pio quantize` and `--quant` as a user runs them.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic/qwen3")
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pio-cli-quantize-{}-{name}", std::process::id()))
}

fn pio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pio")).args(args).output().expect("pio runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 1 with `error: ...` mentioning `what`, and no panic.
fn assert_fails(o: &Output, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains(what), "stderr {err:?} does not mention {what:?}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}

const IDS: &str = "1,17,300,42,5,99,250,7,3,480,64,128";

/// `pio logits` of IDS for `model` (with extra arguments), as the bytes of the written file.
fn logits(model: &str, extra: &[&str], name: &str) -> Vec<u8> {
    let out = temp(name);
    let mut args = vec!["logits", "--model", model, "--token-ids", IDS, "--out", out.to_str().expect("path")];
    args.extend_from_slice(extra);
    let o = pio(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).expect("logits file");
    let _ = std::fs::remove_file(&out);
    bytes
}

#[test]
fn quantized_gguf_gives_the_logits_of_load_time_quantization() {
    let model = fixture();
    let model = model.to_str().expect("path");
    for quant in ["q8_0", "q4_0"] {
        let gguf = temp(&format!("{quant}.gguf"));
        let o = pio(&["quantize", "--model", model, "--quant", quant, "--out", gguf.to_str().expect("path")]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains(&quant.to_ascii_uppercase()), "{}", stderr(&o));
        let from_file = logits(gguf.to_str().expect("path"), &[], &format!("{quant}-file.st"));
        let at_load = logits(model, &["--quant", quant], &format!("{quant}-load.st"));
        assert_eq!(from_file, at_load, "{quant}: logits differ");
        let float = logits(model, &[], &format!("{quant}-float.st"));
        assert_ne!(from_file, float, "{quant}: quantization changed nothing");
        let _ = std::fs::remove_file(&gguf);
    }
}

#[test]
fn verbose_shows_the_weight_types_after_quantization() {
    let model = fixture();
    let o = pio(&[
        "generate",
        "--model",
        model.to_str().expect("path"),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "2",
        "--json",
        "--verbose",
        "--quant",
        "q4_k",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let weights = err.lines().find(|l| l.starts_with("weights:")).expect("weights line");
    for t in ["Q4_K x3", "Q5_0 x18", "Q8_0 x1"] {
        assert!(weights.contains(t), "{weights}");
    }
    assert!(err.contains("quantized to Q4_K at load"), "{err}");
}

#[test]
fn formats_without_a_gguf_type_are_refused() {
    let out = temp("nf4.gguf");
    let o = pio(&[
        "quantize",
        "--model",
        fixture().to_str().expect("path"),
        "--quant",
        "nf4",
        "--out",
        out.to_str().expect("path"),
    ]);
    assert_fails(&o, "NF4 has no GGUF type");
    assert!(!out.exists());
}

#[test]
fn bad_quant_names_and_paths_are_errors() {
    let model = fixture();
    let model = model.to_str().expect("path");
    let o = pio(&["generate", "--model", model, "--prompt-ids", "1", "--quant", "q4_k_m"]);
    assert!(!o.status.success());
    assert!(stderr(&o).starts_with("error: ") && stderr(&o).contains("unknown format"), "{}", stderr(&o));
    let out = temp("missing.gguf");
    let o =
        pio(&["quantize", "--model", "/nonexistent/model", "--quant", "q8_0", "--out", out.to_str().expect("path")]);
    assert_fails(&o, "/nonexistent/model");
    assert!(!out.exists());
}
