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
///
/// The sum of squares runs in 16 lanes in a fixed order, so the result is the same bits at every
/// SIMD level; the SIMD levels are the same code compiled for wider registers.
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    assert!(dim > 0 && x.len().is_multiple_of(dim));
    let level = crate::cpu::level();
    // Rows are independent: the threads take ranges of them (a prefill's; one row stays here).
    let work = 4 * x.len();
    crate::parallel::for_each_rows_mut([x], [dim], work, |_, [rows]| rms_norm_rows_at(level, rows, weight, eps));
}

fn rms_norm_rows_at(level: crate::cpu::SimdLevel, x: &mut [f32], weight: &[f32], eps: f32) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has.
        crate::cpu::SimdLevel::Avx512 => unsafe { rms_norm_avx512(x, weight, eps) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        crate::cpu::SimdLevel::Avx2 => unsafe { rms_norm_avx2(x, weight, eps) },
        _ => rms_norm_generic(x, weight, eps),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rms_norm_avx512(x: &mut [f32], weight: &[f32], eps: f32) {
    rms_norm_generic(x, weight, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rms_norm_avx2(x: &mut [f32], weight: &[f32], eps: f32) {
    rms_norm_generic(x, weight, eps)
}

#[inline(always)]
fn rms_norm_generic(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in x.chunks_exact_mut(dim) {
        let mut acc = [0f32; 16];
        let (chunks, rest) = row.as_chunks::<16>();
        for c in chunks {
            for i in 0..16 {
                acc[i] += c[i] * c[i];
            }
        }
        let mut sum = acc.iter().sum::<f32>();
        for v in rest {
            sum += v * v;
        }
        let inv = 1.0 / (sum / dim as f32 + eps).sqrt();
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
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    rope_angles(pos, inv_freq, &mut cos, &mut sin);
    rope_heads_with(x, head_dim, &cos, &sin, layout);
}

/// The cosines and sines of position `pos`'s angles (`pos * inv_freq[i]` in f32, as
/// transformers computes them), computed once per token and shared by all its q and k heads.
pub fn rope_angles(pos: usize, inv_freq: &[f32], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    cos.clear();
    sin.clear();
    for &f in inv_freq {
        let (s, c) = (pos as f32 * f).sin_cos();
        cos.push(c);
        sin.push(s);
    }
}

/// [`rope_heads`] with the angles from [`rope_angles`].
pub fn rope_heads_with(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let half = cos.len();
    assert!(sin.len() == half && 2 * half <= head_dim && x.len().is_multiple_of(head_dim));
    for head in x.chunks_exact_mut(head_dim) {
        match layout {
            RopeLayout::SplitHalves => {
                let (lo, hi) = head[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (lo[i], hi[i]);
                    lo[i] = x0 * cos[i] - x1 * sin[i];
                    hi[i] = x1 * cos[i] + x0 * sin[i];
                }
            }
            RopeLayout::Interleaved => {
                for (i, pair) in head[..2 * half].chunks_exact_mut(2).enumerate() {
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * cos[i] - x1 * sin[i];
                    pair[1] = x1 * cos[i] + x0 * sin[i];
                }
            }
        }
    }
}

/// Inverse frequencies `theta^(-2i/rot_dims)` for `i < rot_dims/2`, in float32 as transformers
/// computes them.
pub fn rope_inv_freq(theta: f32, rot_dims: usize) -> Vec<f32> {
    (0..rot_dims / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / rot_dims as f32)).collect()
}

/// sigmoid(x) = 1 / (1 + e^-x).
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SiLU(x) = x * sigmoid(x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU: `gate[i] = silu(gate[i]) * up[i]`, in place in `gate`. The SIMD levels use the
/// vector `exp` of [`crate::attention`] (within a few ulp of `f32::exp`).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    swiglu_at(crate::cpu::level(), gate, up)
}

/// [`swiglu`] at an explicit SIMD level.
pub fn swiglu_at(level: crate::cpu::SimdLevel, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    if gate.len().is_multiple_of(16) {
        // Many tokens' worth split across the threads in whole vectors of 16 (so every element
        // takes the vector path it takes unsplit: the same bits).
        let work = 16 * gate.len();
        crate::parallel::for_each_rows_mut([gate], [16], work, |r0, [g]| {
            swiglu_serial(level, g, &up[16 * r0..16 * r0 + g.len()])
        });
    } else {
        swiglu_serial(level, gate, up)
    }
}

fn swiglu_serial(level: crate::cpu::SimdLevel, gate: &mut [f32], up: &[f32]) {
    let done = match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has; lengths are equal.
        crate::cpu::SimdLevel::Avx512 => unsafe { simd::swiglu_avx512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        crate::cpu::SimdLevel::Avx2 => unsafe { simd::swiglu_avx2(gate, up) },
        _ => 0,
    };
    for (g, u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = silu(*g) * u;
    }
}

/// SiLU in place: `x[i] = x[i] * sigmoid(x[i])` (the vector `exp` as [`swiglu`]).
pub fn silu_in_place(x: &mut [f32]) {
    silu_in_place_at(crate::cpu::level(), x)
}

/// [`silu_in_place`] at an explicit SIMD level.
pub fn silu_in_place_at(level: crate::cpu::SimdLevel, x: &mut [f32]) {
    let done = match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has.
        crate::cpu::SimdLevel::Avx512 => unsafe { simd::silu_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        crate::cpu::SimdLevel::Avx2 => unsafe { simd::silu_avx2(x) },
        _ => 0,
    };
    for v in &mut x[done..] {
        *v = silu(*v);
    }
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`), written as the equal
/// `x * sigmoid(2z)`, `z = sqrt(2/pi) (x + 0.044715 x³)`: `0.5 (1 + tanh z) = sigmoid(2z)`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    x / (1.0 + (-GELU_2C * (x + 0.044715 * x * x * x)).exp())
}

/// `2 sqrt(2 / pi)`.
const GELU_2C: f32 = 2.0 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;

/// [`gelu_tanh`] in place (the vector `exp` as [`swiglu`]).
pub fn gelu_tanh_in_place(x: &mut [f32]) {
    gelu_tanh_in_place_at(crate::cpu::level(), x)
}

/// [`gelu_tanh_in_place`] at an explicit SIMD level.
pub fn gelu_tanh_in_place_at(level: crate::cpu::SimdLevel, x: &mut [f32]) {
    let done = match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has.
        crate::cpu::SimdLevel::Avx512 => unsafe { simd::gelu_tanh_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        crate::cpu::SimdLevel::Avx2 => unsafe { simd::gelu_tanh_avx2(x) },
        _ => 0,
    };
    for v in &mut x[done..] {
        *v = gelu_tanh(*v);
    }
}

/// `out = softmax(scale * x)` for `scale > 0` (exact: the max subtracted, [`crate::math::exp`] or its vector
/// forms, then normalized); `out` has `x.len()` values. For the attention of an encoder, whose
/// rows of scores come from a matrix product: the scalar loop, a reduction, does not vectorise.
pub fn softmax_scaled_into(x: &[f32], scale: f32, out: &mut [f32]) {
    softmax_scaled_into_at(crate::cpu::level(), x, scale, out)
}

/// [`softmax_scaled_into`] at an explicit SIMD level.
pub fn softmax_scaled_into_at(level: crate::cpu::SimdLevel, x: &[f32], scale: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale;
    let (done, mut sum) = match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has; lengths are equal.
        crate::cpu::SimdLevel::Avx512 => unsafe {
            simd::exp_scaled_avx512(x.as_ptr(), x.len(), scale, max, out.as_mut_ptr())
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        crate::cpu::SimdLevel::Avx2 => unsafe {
            simd::exp_scaled_avx2(x.as_ptr(), x.len(), scale, max, out.as_mut_ptr())
        },
        _ => (0, 0.0),
    };
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = crate::math::exp(v * scale - max);
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `x[i] = exp(x[i] - max)` in place ([`crate::math::exp`] or its vector forms), for `max` at
/// least every value of `x` (`-inf` entries become 0); `sums` gets one sum per `block` values
/// (summed in f32 within a block, the blocks' sums kept in f64). For a sampler's row of logits
/// as wide as a vocabulary: written out here because the plain loop only vectorises to the
/// portable build's SSE2, without FMA, at 5x the time of AVX2 (`cargo bench -p pio-engine
/// --bench sampler`).
pub fn exp_shifted_in_place(x: &mut [f32], max: f32, block: usize, sums: &mut Vec<f64>) {
    exp_shifted_in_place_at(crate::cpu::level(), x, max, block, sums)
}

/// [`exp_shifted_in_place`] at an explicit SIMD level.
pub fn exp_shifted_in_place_at(
    level: crate::cpu::SimdLevel,
    x: &mut [f32],
    max: f32,
    block: usize,
    sums: &mut Vec<f64>,
) {
    assert!(block > 0, "blocks of at least one value");
    sums.clear();
    for chunk in x.chunks_mut(block) {
        // The scaled kernels in place with scale 1 (`x * 1 - max` rounds once, as `x - max`).
        let (p, n) = (chunk.as_mut_ptr(), chunk.len());
        let (done, mut sum) = match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level only names features the CPU has; `p` holds `n` values.
            crate::cpu::SimdLevel::Avx512 => unsafe { simd::exp_scaled_avx512(p, n, 1.0, max, p) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            crate::cpu::SimdLevel::Avx2 => unsafe { simd::exp_scaled_avx2(p, n, 1.0, max, p) },
            _ => (0, 0.0),
        };
        // A map, then a sum over independent lanes: fused, the serial sum kept the map from
        // vectorising at all.
        let rest = &mut chunk[done..];
        for v in rest.iter_mut() {
            *v = crate::math::exp(*v - max);
        }
        let mut lanes = [0f32; 8];
        for part in rest.chunks(8) {
            for (l, &v) in lanes.iter_mut().zip(part) {
                *l += v;
            }
        }
        sum += lanes.iter().sum::<f32>();
        sums.push(f64::from(sum));
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use crate::math::x86::{exp256, exp512};

    /// `out[i] = exp(x[i] * scale - max)` for `i < n` over whole vectors of 16; returns how
    /// many it did and their sum. `x` may be `out` (in place): each vector is read before it is
    /// written.
    ///
    /// # Safety
    /// AVX-512 F; `x` readable and `out` writable for `n` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_scaled_avx512(x: *const f32, n: usize, scale: f32, max: f32, out: *mut f32) -> (usize, f32) {
        let n = n / 16 * 16;
        let (s, m) = (_mm512_set1_ps(scale), _mm512_set1_ps(-max));
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let e = exp512(_mm512_fmadd_ps(_mm512_loadu_ps(x.add(i)), s, m));
            acc = _mm512_add_ps(acc, e);
            _mm512_storeu_ps(out.add(i), e);
            i += 16;
        }
        (n, _mm512_reduce_add_ps(acc))
    }

    /// `out[i] = exp(x[i] * scale - max)` for `i < n` over whole vectors of 8; returns how many
    /// it did and their sum. `x` may be `out`, as for [`exp_scaled_avx512`].
    ///
    /// # Safety
    /// AVX2 and FMA; `x` readable and `out` writable for `n` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_scaled_avx2(x: *const f32, n: usize, scale: f32, max: f32, out: *mut f32) -> (usize, f32) {
        let n = n / 8 * 8;
        let (s, m) = (_mm256_set1_ps(scale), _mm256_set1_ps(-max));
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            let e = exp256(_mm256_fmadd_ps(_mm256_loadu_ps(x.add(i)), s, m));
            acc = _mm256_add_ps(acc, e);
            _mm256_storeu_ps(out.add(i), e);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        (n, lanes.iter().sum())
    }

    /// GELU (tanh) over whole vectors of 16; returns how many elements it did.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_tanh_avx512(x: &mut [f32]) -> usize {
        let n = x.len() / 16 * 16;
        let p = x.as_mut_ptr();
        let (one, k, c) = (_mm512_set1_ps(1.0), _mm512_set1_ps(0.044715), _mm512_set1_ps(-super::GELU_2C));
        let mut i = 0;
        while i < n {
            let v = _mm512_loadu_ps(p.add(i));
            let cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
            let e = exp512(_mm512_mul_ps(c, _mm512_fmadd_ps(k, cube, v)));
            _mm512_storeu_ps(p.add(i), _mm512_div_ps(v, _mm512_add_ps(one, e)));
            i += 16;
        }
        n
    }

    /// GELU (tanh) over whole vectors of 8; returns how many elements it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh_avx2(x: &mut [f32]) -> usize {
        let n = x.len() / 8 * 8;
        let p = x.as_mut_ptr();
        let (one, k, c) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.044715), _mm256_set1_ps(-super::GELU_2C));
        let mut i = 0;
        while i < n {
            let v = _mm256_loadu_ps(p.add(i));
            let cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
            let e = exp256(_mm256_mul_ps(c, _mm256_fmadd_ps(k, cube, v)));
            _mm256_storeu_ps(p.add(i), _mm256_div_ps(v, _mm256_add_ps(one, e)));
            i += 8;
        }
        n
    }

    /// SwiGLU over whole vectors of 16; returns how many elements it did.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn swiglu_avx512(gate: &mut [f32], up: &[f32]) -> usize {
        let n = gate.len() / 16 * 16;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let x = _mm512_loadu_ps(g.add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let silu = _mm512_div_ps(x, _mm512_add_ps(one, e));
            _mm512_storeu_ps(g.add(i), _mm512_mul_ps(silu, _mm512_loadu_ps(u.add(i))));
            i += 16;
        }
        n
    }

    /// SiLU over whole vectors of 16; returns how many elements it did.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_avx512(x: &mut [f32]) -> usize {
        let n = x.len() / 16 * 16;
        let p = x.as_mut_ptr();
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let v = _mm512_loadu_ps(p.add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), v));
            _mm512_storeu_ps(p.add(i), _mm512_div_ps(v, _mm512_add_ps(one, e)));
            i += 16;
        }
        n
    }

    /// SiLU over whole vectors of 8; returns how many elements it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_avx2(x: &mut [f32]) -> usize {
        let n = x.len() / 8 * 8;
        let p = x.as_mut_ptr();
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let v = _mm256_loadu_ps(p.add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), v));
            _mm256_storeu_ps(p.add(i), _mm256_div_ps(v, _mm256_add_ps(one, e)));
            i += 8;
        }
        n
    }

    /// SwiGLU over whole vectors of 8; returns how many elements it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu_avx2(gate: &mut [f32], up: &[f32]) -> usize {
        let n = gate.len() / 8 * 8;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let x = _mm256_loadu_ps(g.add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(g.add(i), _mm256_mul_ps(silu, _mm256_loadu_ps(u.add(i))));
            i += 8;
        }
        n
    }
}

/// The length of the Hadamard blocks [`hadamard_rows`] rotates rows of `n` values by: the
/// largest power of two dividing `n`, at most 256.
pub fn hadamard_block(n: usize) -> usize {
    if n == 0 {
        return 1;
    }
    (1usize << n.trailing_zeros()).min(256)
}

/// Rotates every consecutive block of [`hadamard_block`]`(n)` values of each row of `n` values of
/// `x` by the normalised Walsh-Hadamard matrix `H / sqrt(len)`: orthogonal and its own inverse,
/// so dot products between rows rotated alike are unchanged, while a few large channels spread
/// over the whole block. The KV cache's block formats store keys (and values) so, which keeps
/// one scale per 32 values from being set by a single outlier channel (QuaRot, SpinQuant).
///
/// A fast transform: `len · log2(len)` additions per block. Rounding differs from the exact
/// rotation only by f32 rounding, the same for every row, so batch invariance holds.
pub fn hadamard_rows(x: &mut [f32], n: usize) {
    assert!(x.len().is_multiple_of(n.max(1)), "rows of {n} values");
    hadamard_blocks(x, hadamard_block(n))
}

/// [`hadamard_rows`] over consecutive blocks of `len` values (a power of two dividing
/// `x.len()`).
pub fn hadamard_blocks(x: &mut [f32], len: usize) {
    if len < 2 {
        return;
    }
    assert!(len.is_power_of_two() && x.len().is_multiple_of(len), "blocks of {len} values");
    let norm = 1.0 / (len as f32).sqrt();
    for blk in x.chunks_exact_mut(len) {
        let mut h = 1;
        while h < len {
            for i in (0..len).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (blk[j], blk[j + h]);
                    blk[j] = a + b;
                    blk[j + h] = a - b;
                }
            }
            h *= 2;
        }
        for v in blk.iter_mut() {
            *v *= norm;
        }
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
    let work = x.len();
    crate::parallel::for_each_rows_mut([x], [1], work, |r0, [x]| {
        for (a, b) in x.iter_mut().zip(&y[r0..]) {
            *a += b;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_is_its_own_inverse_keeps_dot_products_and_spreads_outliers() {
        for n in [32usize, 64, 96, 128, 80] {
            let len = hadamard_block(n);
            assert!(n.is_multiple_of(len) && len.is_power_of_two());
            let a: Vec<f32> = (0..2 * n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let mut b: Vec<f32> = (0..2 * n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.7).collect();
            b[3] = 100.0; // one outlier channel
            let (mut ra, mut rb) = (a.clone(), b.clone());
            hadamard_rows(&mut ra, n);
            hadamard_rows(&mut rb, n);
            for r in 0..2 {
                let (x, y) = (r * n, (r + 1) * n);
                let (d0, d1) = (dot(&a[x..y], &b[x..y]), dot(&ra[x..y], &rb[x..y]));
                assert!((d0 - d1).abs() <= 1e-3 * d0.abs().max(1.0), "n={n}: {d0} vs {d1}");
            }
            // The outlier's block has no value near 100 left.
            assert!(rb[..len].iter().all(|v| v.abs() < 100.0 / (len as f32).sqrt() + 10.0), "n={n}");
            hadamard_rows(&mut rb, n);
            for (x, y) in rb.iter().zip(&b) {
                assert!((x - y).abs() < 1e-4 * y.abs().max(1.0), "n={n}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn scaled_softmax_matches_the_plain_one_at_every_level() {
        for n in [1usize, 7, 16, 37, 300] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 29 % 17) as f32 - 8.0) * 1.7).collect();
            let mut want: Vec<f32> = x.iter().map(|v| v * 0.125).collect();
            softmax(&mut want);
            for level in crate::cpu::SimdLevel::available() {
                let mut got = vec![0f32; n];
                softmax_scaled_into_at(level, &x, 0.125, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-6 + 1e-5 * w, "{level:?} n={n}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn shifted_exp_in_place_matches_std_exp_and_sums_by_block_at_every_level() {
        for n in [0usize, 1, 7, 16, 37, 300, 1000] {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 29 % 17) as f32 - 8.0) * 3.1).collect();
            if n > 5 {
                x[5] = f32::NEG_INFINITY;
            }
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for level in crate::cpu::SimdLevel::available() {
                let mut got = x.clone();
                let mut sums = vec![7.0];
                exp_shifted_in_place_at(level, &mut got, max, 48, &mut sums);
                assert_eq!(sums.len(), n.div_ceil(48), "{level:?} n={n}");
                for (i, (g, v)) in got.iter().zip(&x).enumerate() {
                    let want = (v - max).exp();
                    assert!(
                        (g - want).abs() <= 4.0 * f32::EPSILON * want + 1e-37,
                        "{level:?} n={n} [{i}]: {g} vs {want}"
                    );
                }
                for (b, s) in sums.iter().enumerate() {
                    let want: f64 = got[b * 48..((b + 1) * 48).min(n)].iter().map(|&v| f64::from(v)).sum();
                    assert!((s - want).abs() <= 1e-6 * want, "{level:?} n={n} block {b}: {s} vs {want}");
                }
            }
        }
    }

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
    fn swiglu_levels_match_the_scalar_formula() {
        let n = 1000 + 13;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let up: Vec<f32> = (0..n).map(|i| 1.0 - (i % 7) as f32 * 0.3).collect();
        for level in crate::cpu::SimdLevel::available() {
            let mut g = gate.clone();
            swiglu_at(level, &mut g, &up);
            for i in 0..n {
                let want = silu(gate[i]) * up[i];
                assert!((g[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "{level:?} {i}: {} vs {want}", g[i]);
            }
        }
    }

    #[test]
    fn row_steps_split_across_threads_give_the_bits_of_one_thread() {
        // A prefill's worth (split across the pool) against the same rows one at a time (one
        // thread each): swiglu, the norm and the residual add.
        let (rows, w) = (300, 1536);
        let x: Vec<f32> = (0..rows * w).map(|i| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0).collect();
        let y: Vec<f32> = (0..rows * w).map(|i| ((i * 40503) % 997) as f32 / 300.0 - 1.5).collect();
        let weight: Vec<f32> = (0..w).map(|i| 0.5 + (i % 13) as f32 * 0.1).collect();
        for level in crate::cpu::SimdLevel::available() {
            let (mut g, mut n, mut a) = (x.clone(), x.clone(), x.clone());
            crate::parallel::ThreadPool::new(2).install(|| {
                swiglu_at(level, &mut g, &y);
                if level == crate::cpu::level() {
                    rms_norm_rows(&mut n, &weight, 1e-6);
                }
                add_in_place(&mut a, &y);
            });
            for r in 0..rows {
                let at = r * w..(r + 1) * w;
                let mut gr = x[at.clone()].to_vec();
                swiglu_at(level, &mut gr, &y[at.clone()]);
                assert!(gr.iter().zip(&g[at.clone()]).all(|(p, q)| p.to_bits() == q.to_bits()), "{level:?} {r}");
                if level == crate::cpu::level() {
                    let mut nr = x[at.clone()].to_vec();
                    rms_norm_rows(&mut nr, &weight, 1e-6);
                    assert!(nr.iter().zip(&n[at.clone()]).all(|(p, q)| p.to_bits() == q.to_bits()), "norm {r}");
                }
                let ar: Vec<f32> = x[at.clone()].iter().zip(&y[at.clone()]).map(|(p, q)| p + q).collect();
                assert_eq!(ar, a[at]);
            }
        }
    }

    #[test]
    fn silu_levels_match_the_scalar_formula() {
        let x: Vec<f32> = (0..1013).map(|i| (i as f32 - 500.0) * 0.05).collect();
        for level in crate::cpu::SimdLevel::available() {
            let mut y = x.clone();
            silu_in_place_at(level, &mut y);
            for (a, &b) in y.iter().zip(&x) {
                let want = silu(b);
                assert!((a - want).abs() <= 1e-6 * (1.0 + want.abs()), "{level:?} {b}: {a} vs {want}");
            }
        }
    }

    #[test]
    fn gelu_tanh_levels_match_the_tanh_formula() {
        // Against the textbook form, in f64: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
        let x: Vec<f32> = (0..1013).map(|i| (i as f32 - 500.0) * 0.03).chain([-200.0, 200.0]).collect();
        for level in crate::cpu::SimdLevel::available() {
            let mut y = x.clone();
            gelu_tanh_in_place_at(level, &mut y);
            for (a, &b) in y.iter().zip(&x) {
                let v = b as f64;
                let want = 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
                assert!((*a as f64 - want).abs() <= 2e-6 * (1.0 + want.abs()), "{level:?} {b}: {a} vs {want}");
            }
        }
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
