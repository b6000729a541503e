//! Throughput of `matmul` per weight format and SIMD level, at Qwen3-0.6B's MLP shape
//! (3072 x 1024): decode (1 token, bandwidth-bound: GB/s of weights), 16 sequences decoded
//! together (or a speculative verification) and prefill (16 and 64 tokens, compute-bound:
//! GMAC/s). `BF16xbf16`: BF16 weights times bf16-rounded activations, on AMX
//! tiles where the CPU has them (as a vision tower's matrices).
//! Also a vision tower's attention products (`attention_products`).
//! `cargo bench -p pio-kernels --bench matmul [-- FILTER]`; threads follow `PIO_THREADS`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pio_kernels::cpu::SimdLevel;
use pio_kernels::matmul::{matmul_at, Layout, WeightView};
use pio_kernels::{quant, DType};

const ROWS: usize = 3072;
const COLS: usize = 1024;

fn weights(dtype: DType) -> Vec<u8> {
    // A cheap deterministic pattern: speed does not depend on values.
    let w: Vec<f32> = (0..ROWS * COLS).map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0).collect();
    let rb = dtype.row_bytes(COLS).unwrap_or(0);
    let mut out = vec![0u8; ROWS * rb];
    for (src, dst) in w.chunks_exact(COLS).zip(out.chunks_exact_mut(rb)) {
        quant::quantize_row(dtype, src, dst);
    }
    out
}

fn bench(c: &mut Criterion) {
    // BF16 in rows and interleaved (the layout decode loads it in), with f32 activations and
    // with bf16 ones where the CPU multiplies those faster (`vdpbf16ps` on AMD; AMX tiles on
    // Intel, as the vision tower's matrices).
    let formats = [
        (DType::BF16, false, false),
        (DType::BF16, false, true),
        (DType::BF16, true, false),
        (DType::BF16, true, true),
        (DType::F16, false, false),
        (DType::Q8_0, false, false),
        (DType::Q4_0, false, false),
        (DType::Q4_1, false, false),
        (DType::Q5_0, false, false),
        (DType::Q4_K, false, false),
        (DType::Q6_K, false, false),
        // Interleaved as a model holds them (Q4_0 for comparison with INT4 and NF4; Q5_0, most of
        // Qwen2.5-Coder-0.5B's Q4_K_M file, whose 896 columns take no K format), and the
        // formats quantized at load.
        (DType::Q4_0, false, true),
        (DType::Q5_0, false, true),
        (DType::INT8, false, true),
        (DType::INT4, false, true),
        (DType::NF4, false, true),
    ];
    for (dtype, bf16_act, tiled) in formats {
        let mut data = weights(dtype);
        if tiled && dtype == DType::BF16 {
            data = pio_kernels::dot::float::tile_bf16(ROWS, COLS, &data);
        } else if tiled {
            data = pio_kernels::dot::interleave(dtype, ROWS, COLS, &data);
        }
        // `prefill_only` with bf16 activations: AMX too where the CPU has it (as a vision
        // tower's BF16 matrices).
        let w = WeightView {
            bf16_activations: bf16_act,
            prefill_only: bf16_act,
            layout: if tiled { Layout::Interleaved } else { Layout::Rows },
            ..WeightView::rows(dtype, ROWS, COLS, &data)
        };
        let name = format!("{dtype}{}{}", if bf16_act { "xbf16" } else { "" }, if tiled { "-tiled" } else { "" });
        for n in [1usize, 16, 64] {
            let mut g = c.benchmark_group(format!("matmul_{name}_n{n}"));
            if n == 1 {
                g.throughput(Throughput::Bytes(data.len() as u64));
            } else {
                g.throughput(Throughput::Elements((ROWS * COLS * n) as u64));
            }
            let x: Vec<f32> = (0..n * COLS).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
            let mut y = vec![0f32; n * ROWS];
            for level in SimdLevel::available() {
                if level == SimdLevel::Scalar && (n > 1 || tiled) {
                    continue;
                }
                g.bench_with_input(BenchmarkId::from_parameter(level.name()), &level, |b, &level| {
                    b.iter(|| matmul_at(level, w, black_box(&x), n, &mut y))
                });
            }
            g.finish();
        }
    }
}

/// A vision tower's attention products at 4096 patches, one head (64 dims), 256 queries: the
/// scores (queries times keys) and the values' sums (probabilities times values), through
/// `matmul`'s row-dot tiles (keys, and values transposed, as the matrix) and through
/// `matmul_kn`'s outer products (keys transposed, values as they are). GMAC/s.
fn attention_products(c: &mut Criterion) {
    let (m, k, n) = (256usize, 64usize, 4096usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
    let keys: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
    let mut kt = vec![0f32; k * n];
    for t in 0..n {
        for d in 0..k {
            kt[d * n + t] = keys[t * k + d];
        }
    }
    let probs: Vec<f32> = (0..m * n).map(|i| (i % 11) as f32 * 0.01).collect();
    let bytes = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let (kb, vtb) = (bytes(&keys), bytes(&kt));
    let mut g = c.benchmark_group("attention_products_4096x64");
    g.throughput(Throughput::Elements((m * k * n) as u64));
    let mut scores = vec![0f32; m * n];
    let mut o = vec![0f32; m * k];
    g.bench_function("scores_matmul", |b| {
        b.iter(|| pio_kernels::matmul::matmul(WeightView::rows(DType::F32, n, k, &kb), black_box(&a), m, &mut scores))
    });
    g.bench_function("scores_matmul_kn", |b| {
        b.iter(|| pio_kernels::matmul::matmul_kn(black_box(&a), m, k, &kt, n, &mut scores))
    });
    g.bench_function("values_matmul", |b| {
        b.iter(|| pio_kernels::matmul::matmul(WeightView::rows(DType::F32, k, n, &vtb), black_box(&probs), m, &mut o))
    });
    g.bench_function("values_matmul_kn", |b| {
        b.iter(|| pio_kernels::matmul::matmul_kn(black_box(&probs), m, n, &keys, k, &mut o))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench, attention_products
}
criterion_main!(benches);
