//! One sampled token from a row of logits as wide as Qwen3's vocabulary (151936), the serial
//! work a decode step does after the model: temperature 1 with no truncation (what `pio bench`
//! samples with), top-k 40 / top-p 0.95 (llama.cpp's defaults), and greedy.
//! `cargo bench -p pio-engine --bench sampler`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pio_engine::sampler::{Sampler, SamplingParams};

const VOCAB: usize = 151_936;

fn bench(c: &mut Criterion) {
    // Logits spread like a model's: mostly far below the top, a few near it (a cheap
    // deterministic pattern).
    let logits: Vec<f32> = (0..VOCAB).map(|i| ((i * 2_654_435_761) % 10_007) as f32 / 10_007.0 * 20.0 - 15.0).collect();
    let mut g = c.benchmark_group(format!("sample_vocab{VOCAB}"));
    for (name, params) in [
        ("temperature1", SamplingParams { seed: Some(1), ..SamplingParams::default() }),
        ("top_k40_top_p0.95", SamplingParams { seed: Some(1), top_k: 40, top_p: 0.95, ..SamplingParams::default() }),
        ("greedy", SamplingParams::greedy()),
    ] {
        let Ok(mut sampler) = Sampler::new(params) else { panic!("valid sampling parameters") };
        g.bench_function(name, |b| b.iter(|| sampler.sample(black_box(&logits), &[], &[])));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
