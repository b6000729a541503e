//! Element-wise and row-wise operations: norms, RoPE, activations, softmax.
//!
//! Scalar for now; every function here is the reference its SIMD twin will be tested against.

/// Dot product of two f32 slices, with eight partial sums so the compiler can vectorize it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// RMSNorm of each row of `x` (rows of `weight.len()`), in place: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    assert_eq!(x.len() % dim, 0);
    for row in x.chunks_exact_mut(dim) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// RMSNorm of each row of `x` written to `out` (same shape).
pub fn rms_norm_rows_into(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rms_norm_rows(out, weight, eps);
}

/// How a head's dimensions are paired for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Dimension `i` pairs with `i + rot/2` (`rotate_half`, GPT-NeoX; Hugging Face Llama/Qwen).
    SplitHalves,
    /// Dimension `2i` pairs with `2i + 1` (GPT-J; llama.cpp's layout for `llama` GGUF files,
    /// whose q/k rows were permuted at conversion).
    Interleaved,
}

/// Rotates the first `rot_dims` dimensions of every head in `x` ([num_heads * head_dim]) by the
/// angles of position `pos`. `inv_freq` has `rot_dims / 2` entries: `theta^(-2i/rot_dims)`.
pub fn rope_heads(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32], layout: RopeLayout) {
    let half = inv_freq.len();
    assert!(2 * half <= head_dim && x.len().is_multiple_of(head_dim));
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &f) in inv_freq.iter().enumerate() {
            // f32 angle as transformers computes it (pos * inv_freq in float32).
            let angle = pos as f32 * f;
            let (sin, cos) = angle.sin_cos();
            let (a, b) = match layout {
                RopeLayout::SplitHalves => (i, i + half),
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x1 * cos + x0 * sin;
        }
    }
}

/// Inverse frequencies `theta^(-2i/rot_dims)` for `i < rot_dims/2`, in float32 as transformers
/// computes them.
pub fn rope_inv_freq(theta: f32, rot_dims: usize) -> Vec<f32> {
    (0..rot_dims / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / rot_dims as f32)).collect()
}

/// SiLU(x) = x * sigmoid(x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU: `gate[i] = silu(gate[i]) * up[i]`, in place in `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// Softmax in place. `-inf` entries get probability 0; an all `-inf` row stays all zero.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Adds `bias` to every row of `x`.
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_on_awkward_lengths() {
        for n in [0, 1, 7, 8, 9, 33] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn rope_layouts_rotate_the_right_pairs() {
        let inv = rope_inv_freq(10000.0, 4);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        rope_heads(&mut x, 4, 1, &inv, RopeLayout::SplitHalves);
        // dim 0 pairs with dim 2, angle 1 rad
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        let mut y = vec![1.0, 0.0, 0.0, 0.0];
        rope_heads(&mut y, 4, 1, &inv, RopeLayout::Interleaved);
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[1] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(y[2], 0.0);
    }

    #[test]
    fn rms_norm_unit_rows() {
        let mut x = vec![3.0, 4.0];
        rms_norm_rows(&mut x, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn softmax_handles_masked_entries() {
        let mut x = vec![0.0, f32::NEG_INFINITY, 0.0];
        softmax(&mut x);
        assert_eq!(x, vec![0.5, 0.0, 0.5]);
        let mut all = vec![f32::NEG_INFINITY; 3];
        softmax(&mut all);
        assert_eq!(all, vec![0.0; 3]);
    }
}
