//! INT8, INT4 and NF4 rows — the formats GGUF has no type for (layouts in [`DType`]) — dotted
//! with [`Q8Block`] activations: the reference.
//!
//! Every format reduces, per activation block `k` (32 values), to an exact integer sum
//! `sum_k = Σ q_w[i]·q_a[i]` and float scales:
//!
//! - INT8: `s · Σ_k d_a[k]·sum_k`, the row's one scale `s` applied once at the end.
//! - INT4: `Σ_k (d_g·d_a[k])·sum_k`, `q_w = u − 8`, `d_g` the scale of block `k`'s group of 128.
//! - NF4: `Σ_k (d_b/127·d_a[k])·sum_k` with `q_w = NF4_I8[u]`, the codebook ×127 rounded to
//!   integers ([`NF4_I8`]). This is how llama.cpp's IQ4_NL keeps a non-uniform 4-bit codebook
//!   in int8 so the products stay integer; the ÷127 is folded into the block's scale. Rounding
//!   the table moves a weight by at most 0.47/127 = 0.37% of its block's absmax, against up to
//!   15% (half the widest codebook gap) for NF4's own rounding; [`crate::quant`]'s dequantizer
//!   and `dot_row` keep the exact codebook.
//!
//! Products of matrices ([`super::gemm_q8`]) go through the legacy formats' tiles
//! ([`super::legacy`]): INT8 as Q8_0 blocks whose scale is the row's, INT4 as Q4_0 blocks
//! sharing a scale by four, NF4 as Q8_0 blocks sharing one by two, its codes looked up with
//! `vpshufb`, over matrices interleaved at load. Those tiles beat the SIMD row dots this module
//! had at every token count, one included (Qwen3-0.6B-shaped, quantized at load, decode at 2
//! threads: INT8 23 -> 43 tok/s, see the README), so there are none to keep beside them. The
//! integer sums are exact either way; the tiles fold the float terms in another order
//! ([`super::legacy::tile_dot_scalar`]). Activation quants must lie in −127..=127, as
//! [`crate::act::quantize_q8`] makes them.

use crate::act::Q8Block;
use crate::cpu::SimdLevel;
use crate::DType;

/// [`crate::quant::NF4`] × 127, rounded to nearest: the int8 weights the kernels multiply.
pub const NF4_I8: [i8; 16] = [-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127];

/// The factor that takes [`NF4_I8`] back to the codebook's scale.
pub const NF4_I8_SCALE: f32 = 1.0 / 127.0;

/// Dot of one stored INT8, INT4 or NF4 row (`act.len()` blocks of 32 weights) with `act`: the
/// reference, [`dot_scalar`], at every level (products of matrices go through the tiles, see the
/// module docs).
pub fn dot_q8(_level: SimdLevel, dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    dot_scalar(dtype, row, act)
}

/// Asserts `dtype` is INT8, INT4 or NF4 and `row` holds exactly `act.len() * 32` of its
/// weights (INT4 rows are whole groups of 128, NF4 rows whole blocks of 64).
pub(super) fn check(dtype: DType, row: &[u8], act: &[Q8Block]) {
    assert!(matches!(dtype, DType::INT8 | DType::INT4 | DType::NF4), "{dtype} is not INT8, INT4 or NF4");
    assert_eq!(
        dtype.row_bytes(act.len() * 32),
        Some(row.len()),
        "{dtype}: a row of {} bytes does not hold {} activation blocks",
        row.len(),
        act.len()
    );
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The exact integer sum of 32 weights (`w(i)`) times a block's activation quants.
fn block_sum(a: &Q8Block, w: impl Fn(usize) -> i32) -> i32 {
    a.qs.iter().enumerate().map(|(i, &y)| w(i) * y as i32).sum()
}

/// The reference: per activation block the exact i32 sum, then the float terms of the module
/// docs added in block order (INT8's row scale multiplied last).
pub fn dot_scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    check(dtype, row, act);
    scalar(dtype, row, act)
}

fn scalar(dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    let mut total = 0f32;
    match dtype {
        DType::INT8 => {
            let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
            for (q, a) in row[4..].chunks_exact(32).zip(act) {
                total += a.d * block_sum(a, |i| (q[i] as i8) as i32) as f32;
            }
            return total * s;
        }
        DType::INT4 => {
            for (g, a4) in row.chunks_exact(66).zip(act.chunks_exact(4)) {
                let d = f16_at(g, 0);
                for (k, a) in a4.iter().enumerate() {
                    let (run, shift) = (&g[2 + 32 * (k / 2)..], 4 * (k % 2));
                    total += (d * a.d) * block_sum(a, |i| ((run[i] >> shift) & 0x0F) as i32 - 8) as f32;
                }
            }
        }
        DType::NF4 => {
            for (b, a2) in row.chunks_exact(34).zip(act.chunks_exact(2)) {
                let d = f16_at(b, 0) * NF4_I8_SCALE;
                for (k, a) in a2.iter().enumerate() {
                    let shift = 4 * k;
                    total += (d * a.d) * block_sum(a, |i| NF4_I8[((b[2 + i] >> shift) & 0x0F) as usize] as i32) as f32;
                }
            }
        }
        other => panic!("{other} is not INT8, INT4 or NF4"),
    }
    total
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::act::quantize_q8_vec;
    use crate::dot::Layout;
    use crate::quant;

    const FORMATS: [DType; 3] = [DType::INT8, DType::INT4, DType::NF4];

    /// Row widths with odd and even block counts, one group, many, and a long row.
    fn widths(dtype: DType) -> Vec<usize> {
        match dtype {
            DType::INT8 => vec![32, 64, 96, 224, 4096 + 32 * 5],
            DType::INT4 => vec![128, 256, 384, 4096 + 128],
            _ => vec![64, 128, 192, 320, 4096 + 64],
        }
    }

    fn random_row(rng: &mut StdRng, dtype: DType, n: usize) -> Vec<u8> {
        let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.1f32..3.0)).collect();
        let mut row = vec![0u8; dtype.row_bytes(n).unwrap()];
        quant::quantize_row(dtype, &w, &mut row);
        row
    }

    fn random_act(rng: &mut StdRng, n: usize) -> Vec<Q8Block> {
        let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        // Some blocks with a single large value, so quants of ±127 next to small ones occur.
        for b in (0..n / 32).step_by(3) {
            x[32 * b + b % 32] = if b % 2 == 0 { 40.0 } else { -40.0 };
        }
        quantize_q8_vec(&x)
    }

    /// The dot in f64 from the weights as the kernels see them (INT8's quants, INT4's u − 8,
    /// NF4's table values) and the activation quants: (value, Σ|terms|).
    fn exact(dtype: DType, row: &[u8], act: &[Q8Block]) -> (f64, f64) {
        let n = act.len() * 32;
        let (mut sum, mut mag) = (0f64, 0f64);
        for i in 0..n {
            let (k, j) = (i / 32, i % 32);
            let w = match dtype {
                DType::INT8 => {
                    let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]) as f64;
                    s * (row[4 + i] as i8) as f64
                }
                DType::INT4 => {
                    let (g, e) = (i / 128, i % 128);
                    let b = &row[66 * g..];
                    let q = b[2 + 32 * (e / 64) + e % 32] >> (4 * ((e % 64) / 32));
                    f16_at(b, 0) as f64 * ((q & 0x0F) as f64 - 8.0)
                }
                _ => {
                    let (blk, e) = (i / 64, i % 64);
                    let b = &row[34 * blk..];
                    let q = (b[2 + e % 32] >> (4 * (e / 32))) & 0x0F;
                    f16_at(b, 0) as f64 * NF4_I8[q as usize] as f64 / 127.0
                }
            };
            let t = w * act[k].d as f64 * act[k].qs[j] as f64;
            sum += t;
            mag += t.abs();
        }
        (sum, mag)
    }

    #[test]
    fn every_level_matches_scalar_and_scalar_is_exact() {
        let mut rng = StdRng::seed_from_u64(11);
        for dtype in FORMATS {
            for n in widths(dtype) {
                for _ in 0..4 {
                    let row = random_row(&mut rng, dtype, n);
                    let act = random_act(&mut rng, n);
                    let (want, mag) = exact(dtype, &row, &act);
                    let reference = dot_scalar(dtype, &row, &act);
                    // Float terms in another order: a few roundings of the running sum.
                    let tol = 1e-5 * mag.max(1e-20);
                    assert!((reference as f64 - want).abs() <= tol, "{dtype} n={n}: scalar {reference} vs {want}");
                    for level in SimdLevel::available() {
                        let got = dot_q8(level, dtype, &row, &act);
                        assert!((got - reference).abs() as f64 <= tol, "{dtype} n={n} {level:?}: {got} vs {reference}");
                    }
                }
            }
        }
    }

    /// Against `quant::dot_row` over the activations as they were quantized: INT8 and INT4
    /// differ by float rounding only; NF4 by its int8 table's rounding too, at most 0.47/127 of
    /// each block's scale per |activation|.
    #[test]
    fn scalar_matches_the_f32_codec() {
        let mut rng = StdRng::seed_from_u64(12);
        for dtype in FORMATS {
            for n in widths(dtype) {
                let row = random_row(&mut rng, dtype, n);
                let act = random_act(&mut rng, n);
                let x: Vec<f32> = act.iter().flat_map(|a| a.qs.map(|q| a.d * q as f32)).collect();
                let want = quant::dot_row(dtype, &row, &x) as f64;
                let got = dot_scalar(dtype, &row, &act) as f64;
                let wd = quant::dequantize(dtype, &row, n);
                let mag: f64 = wd.iter().zip(&x).map(|(w, x)| (*w as f64 * *x as f64).abs()).sum();
                let table_err: f64 = if dtype == DType::NF4 {
                    (0..n)
                        .map(|i| f16_at(&row[34 * (i / 64)..], 0).abs() as f64 * 0.47 / 127.0 * x[i].abs() as f64)
                        .sum()
                } else {
                    0.0
                };
                let tol = 1e-5 * mag + table_err;
                assert!((got - want).abs() <= tol, "{dtype} n={n}: {got} vs {want} (tol {tol})");
            }
        }
    }

    #[test]
    fn nf4_table_is_the_codebook_times_127() {
        for (t, c) in NF4_I8.iter().zip(quant::NF4) {
            assert_eq!(*t as f32, (c * 127.0).round(), "{c}");
            assert!((*t as f32 - c * 127.0).abs() <= 0.47);
        }
    }

    /// Through the tiles at every level, rows and interleaved.
    #[test]
    fn extreme_rows_are_exact() {
        // Largest weights against activations of ±127: no i16 saturation anywhere.
        let act: Vec<Q8Block> = (0..8)
            .map(|k| {
                let q = if k % 2 == 0 { 127 } else { -127 };
                Q8Block { d: 1.0, s: 32.0 * q as f32, qs: [q; 32] }
            })
            .collect();
        let n = 256;
        let mut int8 = 1f32.to_le_bytes().to_vec();
        int8.extend((0..n).map(|i| if i % 3 == 0 { 0x81 } else { 0x7F })); // -127 / 127
        let mut int4 = Vec::new();
        for _ in 0..2 {
            int4.extend([0x00, 0x3C]); // d = 1
            int4.extend([0x0Fu8; 64]); // low nibbles 15 (q = 7), high nibbles 0 (q = -8)
        }
        let mut nf4 = Vec::new();
        for _ in 0..4 {
            nf4.extend([0x00, 0x3C]);
            nf4.extend([0x0Fu8; 32]); // low nibbles code 15 (+127), high nibbles code 0 (-127)
        }
        for (dtype, row) in [(DType::INT8, int8), (DType::INT4, int4), (DType::NF4, nf4)] {
            let (want, _) = exact(dtype, &row, &act);
            let packed = super::super::interleave(dtype, 1, n, &row);
            for level in SimdLevel::available() {
                for (layout, w) in [(Layout::Rows, &row), (Layout::Interleaved, &packed)] {
                    let mut out = [0f32];
                    super::super::gemm_q8(level, dtype, w, 1, layout, &act, &[], 1, &mut out, 1);
                    let got = out[0] as f64;
                    assert!((got - want).abs() <= 1e-6 * want.abs(), "{dtype} {level:?} {layout:?}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn matmul_is_close_to_the_f32_reference_and_batch_invariant() {
        use crate::matmul::{matmul_at, WeightView};
        let mut rng = StdRng::seed_from_u64(14);
        let (rows, cols, n) = (19, 384, 9);
        for dtype in FORMATS {
            let data: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut rng, dtype, cols)).collect();
            let w = WeightView::rows(dtype, rows, cols, &data);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            for level in SimdLevel::available() {
                let mut y = vec![0f32; n * rows];
                matmul_at(level, w, &x, n, &mut y);
                for t in 0..n {
                    let mut one = vec![0f32; rows];
                    matmul_at(level, w, &x[t * cols..(t + 1) * cols], 1, &mut one);
                    let xt = &x[t * cols..(t + 1) * cols];
                    for r in 0..rows {
                        assert_eq!(one[r].to_bits(), y[t * rows + r].to_bits(), "{dtype} {level:?}: token {t} alone");
                        let want = quant::dot_row(dtype, w.row(r), xt);
                        // Q8 activations round each x by up to 1/254 of its block's max.
                        let wd = quant::dequantize(dtype, w.row(r), cols);
                        let bound: f32 = wd
                            .chunks(32)
                            .zip(xt.chunks(32))
                            .map(|(wb, xb)| {
                                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                                wb.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0
                            })
                            .sum();
                        let got = y[t * rows + r];
                        assert!((got - want).abs() <= bound * 1.01 + 1e-4, "{dtype} {level:?}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic]
    fn wrong_length_panics() {
        let act = vec![Q8Block::default(); 4];
        dot_q8(SimdLevel::Scalar, DType::INT4, &[0u8; 65], &act);
    }

    #[test]
    #[should_panic]
    fn other_formats_panic() {
        let act = vec![Q8Block::default(); 1];
        dot_q8(SimdLevel::Scalar, DType::Q8_0, &[0u8; 34], &act);
    }
}
