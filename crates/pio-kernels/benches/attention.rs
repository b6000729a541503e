//! `paged_attention` at Qwen3-0.6B's shape (16 query heads, 8 kv heads, head_dim 128, blocks of
//! 16) per cache element type: decode (one query over 4096 cached positions) and a causal
//! prefill of 512 tokens; and `latent_attention` at DeepSeek-V2-Lite's shape (20 heads sharing
//! rows of 576 = 512 + 64, f16, blocks of 16), one decode token over 512 and 4096 positions;
//! and decode over 4096 and 16384 positions and a 512-token prefill of q8_0 and q4_0 caches (f16
//! at 16384 beside them).
//! `cargo bench -p pio-kernels --bench attention [-- FILTER]`; threads follow `PIO_THREADS`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use half::f16;
use pio_kernels::attention::{
    paged_attention, CodedKvMut, KvCacheDtype, KvCacheType, KvElem, PagedKv, PagedKvMut, QueryContext,
};
use pio_kernels::mla::{latent_attention, LatentKvMut};

const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BLOCK: usize = 16;

fn run<T: KvElem>(c: &mut Criterion) {
    let ctx = 4096;
    let kd = KV_HEADS * HEAD_DIM;
    let (mut k, mut v) = (T::zeros(ctx * kd), T::zeros(ctx * kd));
    // A cheap deterministic pattern: speed does not depend on values.
    let x: Vec<f32> = (0..ctx * kd).map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0).collect();
    let slots: Vec<usize> = (0..ctx).collect();
    PagedKvMut { k: &mut k, v: &mut v, block_size: BLOCK, num_kv_heads: KV_HEADS, head_dim: HEAD_DIM }
        .write(&slots, &x, &x);
    let kv = PagedKv { k: &k, v: &v, block_size: BLOCK, num_kv_heads: KV_HEADS, head_dim: HEAD_DIM };
    // Blocks in reverse order, so reads are not one sequential stream.
    let table: Vec<u32> = (0..(ctx / BLOCK) as u32).rev().collect();
    let row = HEADS * HEAD_DIM;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let mut g = c.benchmark_group(format!("attention_{}", T::DTYPE));
    for (name, queries) in [
        ("decode_ctx4096", vec![QueryContext::causal(&table, ctx)]),
        ("prefill_512", (0..512).map(|p| QueryContext::causal(&table[..32], p + 1)).collect()),
    ] {
        let q: Vec<f32> = (0..queries.len() * row).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
        let mut out = vec![0f32; q.len()];
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| paged_attention(black_box(&q), HEADS, kv, &queries, scale, &mut out))
        });
    }
    g.finish();
}

/// One decode token over 4096 and 16384 positions of a cache in each block format (and f16
/// for comparison, through the same coded path's typed twin above).
fn coded(c: &mut Criterion) {
    let ctx = 16384;
    let kd = KV_HEADS * HEAD_DIM;
    let x: Vec<f32> = (0..ctx * kd).map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0).collect();
    let slots: Vec<usize> = (0..ctx).collect();
    let table: Vec<u32> = (0..(ctx / BLOCK) as u32).rev().collect();
    let q: Vec<f32> = (0..HEADS * HEAD_DIM).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let mut out = vec![0f32; q.len()];
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    for t in [KvCacheDtype::Q8_0, KvCacheDtype::Q4_0] {
        let types = KvCacheType::both(t);
        let rows = ctx * KV_HEADS;
        let (mut k, mut v) = (vec![0u8; rows * t.row_bytes(HEAD_DIM)], vec![0u8; rows * t.row_bytes(HEAD_DIM)]);
        let mut anchors = vec![0u16; ctx / BLOCK * KV_HEADS * t.key_side_len(HEAD_DIM)];
        let mut kv = CodedKvMut {
            k: &mut k,
            v: &mut v,
            anchors: &mut anchors,
            types,
            block_size: BLOCK,
            num_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
        };
        kv.write(&slots, &x, &x);
        let mut g = c.benchmark_group(format!("attention_{t}"));
        for len in [4096, 16384] {
            let queries = [QueryContext::causal(&table[table.len() - len / BLOCK..], len)];
            g.bench_function(BenchmarkId::from_parameter(format!("decode_ctx{len}")), |b| {
                b.iter(|| paged_attention(black_box(&q), HEADS, kv.view(), &queries, scale, &mut out))
            });
        }
        let queries: Vec<QueryContext> = (0..512).map(|p| QueryContext::causal(&table[..32], p + 1)).collect();
        let qp: Vec<f32> = (0..512 * HEADS * HEAD_DIM).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
        let mut outp = vec![0f32; qp.len()];
        g.bench_function(BenchmarkId::from_parameter("prefill_512"), |b| {
            b.iter(|| paged_attention(black_box(&qp), HEADS, kv.view(), &queries, scale, &mut outp))
        });
        g.finish();
    }
    let (mut k, mut v) = (f16::zeros(ctx * kd), f16::zeros(ctx * kd));
    PagedKvMut { k: &mut k, v: &mut v, block_size: BLOCK, num_kv_heads: KV_HEADS, head_dim: HEAD_DIM }
        .write(&slots, &x, &x);
    let kv = PagedKv { k: &k, v: &v, block_size: BLOCK, num_kv_heads: KV_HEADS, head_dim: HEAD_DIM };
    let queries = [QueryContext::causal(&table, ctx)];
    c.bench_function("attention_f16/decode_ctx16384", |b| {
        b.iter(|| paged_attention(black_box(&q), HEADS, kv, &queries, scale, &mut out))
    });
}

fn latent(c: &mut Criterion) {
    let (heads, width, value_width, ctx) = (20, 576, 512, 4096);
    let mut data = f16::zeros(ctx * width);
    let x: Vec<f32> = (0..ctx * width).map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0).collect();
    let slots: Vec<usize> = (0..ctx).collect();
    let mut kv = LatentKvMut { data: &mut data, block_size: BLOCK, width };
    kv.write(&slots, &x);
    let table: Vec<u32> = (0..(ctx / BLOCK) as u32).rev().collect();
    let q: Vec<f32> = (0..heads * width).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let mut out = vec![0f32; heads * value_width];
    let scale = 1.0 / (192f32).sqrt();
    let mut g = c.benchmark_group("latent_f16");
    for len in [512, 4096] {
        let queries = [QueryContext::causal(&table, len)];
        g.bench_function(BenchmarkId::from_parameter(format!("decode_ctx{len}")), |b| {
            b.iter(|| latent_attention(black_box(&q), heads, kv.view(), &queries, value_width, scale, &mut out))
        });
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    run::<f32>(c);
    run::<f16>(c);
    coded(c);
    latent(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
