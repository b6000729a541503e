//! A mutational fuzzer for stable Rust: no coverage feedback (libFuzzer, through cargo-fuzz,
//! is what finds deep paths), but the same targets over many random mutations of their seeds,
//! which is what CI can run on every change.
//!
//! Each execution takes an input from the corpus (the seeds, and now and then an input it
//! made), applies 1 to 8 mutations (bit flips, interesting integers written over a 1, 2, 4 or
//! 8-byte field, bytes inserted, deleted, duplicated or spliced from another input, a
//! truncation, a token of the target's syntax inserted) and runs the target under
//! `catch_unwind`. A panic is a crash: the input is written to `target/fuzz-crashes/` and
//! returned.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Target;

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub execs: u64,
    pub secs: f64,
    pub corpus: usize,
    /// The slowest execution, in seconds.
    pub slowest: f64,
}

/// A panicking input.
#[derive(Debug, Clone)]
pub struct Crash {
    pub input: Vec<u8>,
    pub message: String,
    /// Where the input was written.
    pub saved: Option<PathBuf>,
}

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens of each target's syntax, inserted whole by one of the mutations.
fn dictionary(target: &str) -> &'static [&'static [u8]] {
    match target {
        "gguf" => &[b"GGUF", b"tokenizer.ggml.tokens", b"general.architecture", b"qwen3", b"general.alignment"],
        "chat_template" => &[
            b"{%",
            b"%}",
            b"{{",
            b"}}",
            b"for ",
            b" in ",
            b"endfor",
            b"if ",
            b"endif",
            b"range(",
            b"macro",
            b"messages",
            b"|tojson",
            b"loop.index",
            b"namespace(",
            b"set ",
            b"raise_exception(",
            b"*",
        ],
        "request" | "config" | "safetensors_index" => &[
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b":",
            b",",
            b"null",
            b"-1",
            b"1e999",
            b"\"messages\"",
            b"\"tools\"",
            b"\"weight_map\"",
            b"\"../\"",
            b"\"content\"",
            b"\"type\"",
            b"\"function\"",
            b"\"parameters\"",
        ],
        "tool_parser" => &[
            b"<tool_call>",
            b"</tool_call>",
            b"<function=",
            b"</function>",
            b"<parameter=",
            b"</parameter>",
            b"<arg_key>",
            b"</arg_key>",
            b"<arg_value>",
            b"</arg_value>",
            b"{\"name\": ",
            b"\"arguments\"",
        ],
        "reasoning" => &[b"<think>", b"</think>", b"\n\n", b"<", b"</"],
        "safetensors" => &[b"\"dtype\"", b"\"shape\"", b"\"data_offsets\"", b"F32", b"BF16", b"I64"],
        _ => &[],
    }
}

const INTERESTING: [u64; 12] =
    [0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 1 << 32, u64::MAX >> 1, u64::MAX];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    for _ in 0..1 + rng.below(8) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                input[at] = rng.next() as u8;
            }
            2 if len > 0 => {
                // An interesting integer over a field of 1, 2, 4 or 8 bytes.
                let width = [1, 2, 4, 8][rng.below(4)].min(len);
                let at = rng.below(len - width + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                input[at..at + width].copy_from_slice(&v[..width]);
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                input.drain(at..at + n);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let copy = input[at..at + n].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - from).min(256));
                    let to = rng.below(len + 1);
                    input.splice(to..to, other[from..from + n].iter().copied());
                }
            }
            7 if len > 0 => input.truncate(rng.below(len)),
            8 if !dict.is_empty() => {
                let word = dict[rng.below(dict.len())];
                let at = rng.below(len + 1);
                input.splice(at..at, word.iter().copied());
            }
            _ => {}
        }
    }
    input.truncate(1 << 22);
}

/// Runs `target` for `duration` from `seeds`; the first panicking input, if any, is the error.
pub fn fuzz(target: &Target, seeds: Vec<Vec<u8>>, duration: Duration, seed: u64) -> Result<Stats, Crash> {
    let message: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
    let hook_message = message.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut m) = hook_message.lock() {
            *m = info.to_string();
        }
    }));
    let run = |input: &[u8]| catch_unwind(AssertUnwindSafe(|| (target.run)(input))).is_err();
    let result = (|| {
        let start = Instant::now();
        let mut stats = Stats { execs: 0, secs: 0.0, corpus: 0, slowest: 0.0 };
        let crash = |input: Vec<u8>| {
            let message = message.lock().map(|m| m.clone()).unwrap_or_default();
            let saved = save(target.name, &input);
            Crash { input, message, saved }
        };
        // The seeds as they are first (the regression inputs among them).
        for s in &seeds {
            stats.execs += 1;
            if run(s) {
                return Err(crash(s.clone()));
            }
        }
        let mut corpus = if seeds.is_empty() { vec![Vec::new()] } else { seeds.clone() };
        let dict = dictionary(target.name);
        let mut rng = Rng(seed | 1);
        while start.elapsed() < duration {
            let mut input = corpus[rng.below(corpus.len())].clone();
            mutate(&mut rng, &mut input, &corpus, dict);
            let t = Instant::now();
            stats.execs += 1;
            if run(&input) {
                return Err(crash(input));
            }
            stats.slowest = stats.slowest.max(t.elapsed().as_secs_f64());
            // Without coverage, keep a few mutants at random so mutations stack.
            if rng.below(64) == 0 && corpus.len() < 4096 {
                corpus.push(input);
            }
        }
        stats.secs = start.elapsed().as_secs_f64();
        stats.corpus = corpus.len();
        Ok(stats)
    })();
    std::panic::set_hook(previous);
    crate::remove_scratch();
    result
}

/// Writes a crashing input under `target/fuzz-crashes/<target>/`.
fn save(target: &str, input: &[u8]) -> Option<PathBuf> {
    let dir = crate::repo_root().join("target/fuzz-crashes").join(target);
    std::fs::create_dir_all(&dir).ok()?;
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let path = dir.join(format!("crash-{hash:016x}"));
    std::fs::write(&path, input).ok()?;
    Some(path)
}
