//! Products of a stored weight matrix with a batch of f32 activations.

use crate::{parallel, quant, DType};

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
/// Split across threads by weight rows, so each core streams its own part of the matrix.
pub fn matmul(w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n * w.cols);
    assert_eq!(y.len(), n * w.rows);
    assert_eq!(w.data.len(), w.rows * w.row_bytes());
    let parts = parallel::for_each_range(w.rows, w.rows * w.cols * n.max(1), |r0, r1| {
        // [r1 - r0, n]: this range's outputs, row-major by weight row.
        let mut part = vec![0f32; (r1 - r0) * n];
        if n == 1 {
            for r in r0..r1 {
                part[r - r0] = quant::dot_row(w.dtype, w.row(r), x);
            }
        } else {
            // Decode each weight row once, then use it for every token.
            let mut row = vec![0f32; w.cols];
            for r in r0..r1 {
                w.dequantize_row(r, &mut row);
                for (t, xt) in x.chunks_exact(w.cols).enumerate() {
                    part[(r - r0) * n + t] = crate::ops::dot(&row, xt);
                }
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
