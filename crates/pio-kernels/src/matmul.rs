//! Products of a stored weight matrix with a batch of f32 activations.

use crate::act::{self, Q8Block};
use crate::cpu::{self, SimdLevel};
use crate::{dot, parallel, quant, DType};

/// A row-major weight matrix `[rows, cols]` in any [`DType`], borrowed from its storage.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// `rows * dtype.row_bytes(cols)` bytes.
    pub data: &'a [u8],
}

impl<'a> WeightView<'a> {
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    /// The stored bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Row `r` decoded to f32 into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        quant::dequantize_row(self.dtype, self.row(r), out);
    }
}

/// `y[t, r] = sum_c w[r, c] * x[t, c]` for `n` tokens: x is `[n, cols]`, y is `[n, rows]`.
///
/// Block-quantized weights dot with activations quantized once per call to 8 bits
/// ([`Q8Block`]); float weights dot with f32 activations. Split across threads by weight rows,
/// so each core streams its own part of the matrix; every weight row is used for all `n`
/// tokens while it is in cache.
pub fn matmul(w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_at(cpu::level(), w, x, n, y)
}

/// [`matmul`] at an explicit SIMD level (tests and benchmarks).
pub fn matmul_at(level: SimdLevel, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n * w.cols);
    assert_eq!(y.len(), n * w.rows);
    assert_eq!(w.data.len(), w.rows * w.row_bytes());
    let acts: Vec<Q8Block> = if dot::uses_q8_activations(w.dtype) { act::quantize_q8_vec(x) } else { Vec::new() };
    let blocks_per_row = w.cols / 32;
    let parts = parallel::for_each_range(w.rows, w.rows * w.cols * n.max(1), |r0, r1| {
        // [r1 - r0, n]: this range's outputs, row-major by weight row.
        let mut part = vec![0f32; (r1 - r0) * n];
        for r in r0..r1 {
            let row = w.row(r);
            for t in 0..n {
                part[(r - r0) * n + t] = if acts.is_empty() {
                    dot::dot_f32(level, w.dtype, row, &x[t * w.cols..(t + 1) * w.cols])
                } else {
                    dot::dot_q8(level, w.dtype, row, &acts[t * blocks_per_row..(t + 1) * blocks_per_row])
                };
            }
        }
        (r0, r1, part)
    });
    for (r0, r1, part) in parts {
        for r in r0..r1 {
            for t in 0..n {
                y[t * w.rows + r] = part[(r - r0) * n + t];
            }
        }
    }
}
