//! The gated delta rule of one Gated DeltaNet head at Qwen3-Next's shape (d_k = d_v = 128), per
//! SIMD level: one decode token, and a 512-token prompt run through the recurrence in one call.
//! `cargo bench -p pio-kernels --bench delta [-- FILTER]`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pio_kernels::cpu::SimdLevel;
use pio_kernels::delta::{gated_delta_rule_at, l2_normalize_rows};

const DK: usize = 128;
const DV: usize = 128;

/// q, k, v, decay and beta of `t` tokens.
type Inputs = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn inputs(t: usize) -> Inputs {
    let pattern = |n: usize, s: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * 2654435761 + s) % 1000) as f32 / 500.0 - 1.0).collect()
    };
    let (mut q, mut k) = (pattern(t * DK, 1), pattern(t * DK, 2));
    l2_normalize_rows(&mut q, DK, 1e-6);
    l2_normalize_rows(&mut k, DK, 1e-6);
    let decay = vec![0.97f32; t];
    let beta = vec![0.5f32; t];
    (q, k, pattern(t * DV, 3), decay, beta)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("gated_delta_rule_128x128");
    for level in SimdLevel::available() {
        for t in [1usize, 512] {
            let (q, k, v, decay, beta) = inputs(t);
            let mut state = vec![0f32; DK * DV];
            let mut out = vec![0f32; t * DV];
            g.bench_function(format!("{}_tokens{t}", level.name()), |b| {
                b.iter(|| {
                    gated_delta_rule_at(level, &mut state, &q, &k, &v, &decay, &beta, &mut out);
                    black_box(&out);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
