//! The matrix products of a Qwen3-0.6B-shaped Q4_K_M decode step alone — no attention, norms
//! or sampling — against the memory-bandwidth probe: how much of the roofline the products and
//! their splits across threads reach by themselves.
//!
//! 28 layers of q/k/v (one split), o, gate/up (one split) and down in Q4_K, then a Q6_K LM
//! head of 151936 rows, all interleaved on huge pages as a loaded model holds them (375 MB).
//! Prints GB/s per kind of product, medians over the passes, then the probe.
//!
//! `cargo run --release -p pio-kernels --example decode_products [-- THREADS [PASSES [FORMAT]]]`
//! (`PIO_SIMD=avx2` for the AVX2 kernels). FORMAT, a block format's name (`q8_0`, `q6_k`, ...)
//! or `bf16` (tiled, times bf16 activations where the CPU has AVX-512 BF16), stores every
//! matrix, the LM head too, in that format instead. `PIO_BENCH_SHAPE=qwen3-4b`
//! takes Qwen3-4B's 36 layers and widths instead (2.3 GB). `PIO_BENCH_LEVELS=avx512,avx2`
//! alternates the levels named pass by pass (each level's figures then met the same machine; at
//! AVX-512 the one-token products run at whichever level was faster of late, see
//! `pio_kernels::adapt`).

use std::time::Instant;

use pio_kernels::cpu::SimdLevel;
use pio_kernels::huge::{HugeArena, HugeBytes};
use pio_kernels::matmul::{matmul_many_at, Layout, WeightView};
use pio_kernels::parallel::ThreadPool;
use pio_kernels::{dot, membw, quant, DType};

const HEAD_ROWS: usize = 151_936;

/// A model's decode step: layers, hidden width, and per product its name, input width and the
/// rows of the matrices split together.
struct Shape {
    layers: usize,
    hidden: usize,
    products: [(&'static str, usize, [usize; 3]); 4],
}

/// Qwen3-0.6B (rows of 0 are no matrix).
const QWEN3_06B: Shape = Shape {
    layers: 28,
    hidden: 1024,
    products: [
        ("q/k/v", 1024, [2048, 1024, 1024]),
        ("o", 2048, [1024, 0, 0]),
        ("gate/up", 1024, [3072, 3072, 0]),
        ("down", 3072, [1024, 0, 0]),
    ],
};

/// Qwen3-4B.
const QWEN3_4B: Shape = Shape {
    layers: 36,
    hidden: 2560,
    products: [
        ("q/k/v", 2560, [4096, 1024, 1024]),
        ("o", 4096, [2560, 0, 0]),
        ("gate/up", 2560, [9728, 9728, 0]),
        ("down", 9728, [2560, 0, 0]),
    ],
};

/// A `rows x cols` matrix in the interleaved layout (a repeated pattern: speed does not depend on
/// the values).
fn matrix(arena: &mut HugeArena, dtype: DType, rows: usize, cols: usize) -> HugeBytes {
    let rb = dtype.row_bytes(cols).expect("a block format or BF16");
    let w: Vec<f32> = (0..16 * cols).map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0).collect();
    let mut group = vec![0u8; 16 * rb];
    for (src, dst) in w.chunks_exact(cols).zip(group.chunks_exact_mut(rb)) {
        quant::quantize_row(dtype, src, dst);
    }
    let stored: Vec<u8> = (0..rows / 16).flat_map(|_| group.iter().copied()).collect();
    if dtype == DType::BF16 {
        // The tiles a loaded model keeps BF16 in.
        let mut out = arena.zeroed(dot::float::tiled_bf16_bytes(rows, cols));
        dot::float::tile_bf16_into(rows, cols, &stored, &mut out);
        return out;
    }
    let mut out = arena.zeroed(dot::interleaved_bytes(dtype, rows, cols));
    dot::interleave_into(dtype, rows, cols, &stored, &mut out);
    out
}

fn view(dtype: DType, rows: usize, cols: usize, data: &[u8]) -> WeightView<'_> {
    // BF16 with bf16 activations where the CPU multiplies them (as `pio` runs it by default).
    WeightView {
        layout: Layout::Interleaved,
        bf16_activations: dtype == DType::BF16,
        ..WeightView::rows(dtype, rows, cols, data)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let usage = || -> ! {
        eprintln!("usage: decode_products [THREADS [PASSES [FORMAT]]] (whole numbers; a block format's name or bf16)");
        std::process::exit(2);
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let Ok(args) = raw.iter().take(2).map(|a| a.parse::<usize>()).collect::<Result<Vec<usize>, _>>() else { usage() };
    let threads = args.first().copied().unwrap_or(2);
    let passes = args.get(1).copied().unwrap_or(10).max(1);
    let (body, head_format) = match raw.get(2) {
        None => (DType::Q4_K, DType::Q6_K),
        Some(name) => match DType::from_name(name)
            .filter(|&d| d == DType::BF16 || (d.ggml_id().is_some() && d.block_elems() > 1))
        {
            Some(d) => (d, d),
            None => usage(),
        },
    };
    let shape = match std::env::var("PIO_BENCH_SHAPE").as_deref() {
        Err(_) | Ok("qwen3-0.6b") => QWEN3_06B,
        Ok("qwen3-4b") => QWEN3_4B,
        Ok(other) => {
            eprintln!("PIO_BENCH_SHAPE: qwen3-0.6b or qwen3-4b, not {other}");
            std::process::exit(2);
        }
    };
    let products: Vec<(&str, usize, Vec<usize>)> = shape
        .products
        .iter()
        .map(|&(name, cols, rows)| (name, cols, rows.into_iter().filter(|&r| r > 0).collect()))
        .collect();
    let hidden = shape.hidden;
    // `PIO_BENCH_LEVELS=avx512,avx2`: several levels, alternated.
    let levels: Vec<SimdLevel> = match std::env::var("PIO_BENCH_LEVELS") {
        Err(_) => vec![pio_kernels::cpu::level()],
        Ok(names) => names
            .split(',')
            .map(|n| match SimdLevel::parse(n).filter(|l| SimdLevel::available().contains(l)) {
                Some(l) => l,
                None => {
                    eprintln!("PIO_BENCH_LEVELS: {n} is not a level this CPU has");
                    std::process::exit(2);
                }
            })
            .collect(),
    };
    ThreadPool::new(threads).install(|| {
        let mut arena = HugeArena::new();
        let layers: Vec<Vec<Vec<HugeBytes>>> = (0..shape.layers)
            .map(|_| {
                let product = |(_, cols, rows): &(&str, usize, Vec<usize>)| {
                    rows.iter().map(|&r| matrix(&mut arena, body, r, *cols)).collect()
                };
                products.iter().map(product).collect()
            })
            .collect();
        let head = matrix(&mut arena, head_format, HEAD_ROWS, hidden);
        let inputs: Vec<Vec<f32>> = products.iter().map(|&(_, cols, _)| vec![0.1; cols]).collect();
        // Seconds and bytes per kind of product (the head last), per pass, per level: the
        // levels alternate pass by pass, so that each meets the same machine.
        let kinds = products.len() + 1;
        let mut rates: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); kinds + 1]; levels.len()];
        for pass in 0..passes + 1 {
            for (&level, rates) in levels.iter().zip(&mut rates) {
                let (mut secs, mut bytes) = (vec![0f64; kinds], vec![0usize; kinds]);
                for layer in &layers {
                    for (k, ((_, cols, rows), mats)) in products.iter().zip(layer).enumerate() {
                        let views: Vec<_> = rows.iter().zip(mats).map(|(&r, m)| view(body, r, *cols, m)).collect();
                        let t = Instant::now();
                        std::hint::black_box(matmul_many_at(level, &views, &inputs[k], 1));
                        secs[k] += t.elapsed().as_secs_f64();
                        bytes[k] += mats.iter().map(|m| m.len()).sum::<usize>();
                    }
                }
                let t = Instant::now();
                let head = [view(head_format, HEAD_ROWS, hidden, &head)];
                std::hint::black_box(matmul_many_at(level, &head, &inputs[0], 1));
                secs[kinds - 1] += t.elapsed().as_secs_f64();
                bytes[kinds - 1] += head[0].data.len();
                // The first pass warms up.
                if pass > 0 {
                    for k in 0..kinds {
                        rates[k].push(bytes[k] as f64 / secs[k] / 1e9);
                    }
                    rates[kinds].push(bytes.iter().sum::<usize>() as f64 / secs.iter().sum::<f64>() / 1e9);
                }
            }
        }
        for (level, rates) in levels.iter().zip(rates) {
            if levels.len() > 1 {
                println!("at {}:", level.name());
            }
            let names = products.iter().map(|p| p.0).chain(["LM head", "all"]);
            for (name, r) in names.zip(rates) {
                println!("{name:8} {:5.1} GB/s", median(r));
            }
        }
        let [wide, narrow] = pio_kernels::adapt::calls_by_level();
        if wide + narrow > 0 {
            println!("calls at AVX-512 / AVX2 (the faster of late): {wide} / {narrow}");
        }
        println!("probe    {:5.1} GB/s ({threads} threads)", membw::read_bandwidth() / 1e9);
    });
}
