//! Gated DeltaNet (Qwen3-Next linear attention): the causal depthwise convolution in front of
//! it and the gated delta rule, over a per-sequence state instead of a KV cache.
//!
//! ```text
//! conv:   y_t[c] = silu(Σ_j w[j][c] · x_{t-K+1+j}[c])       K taps, x before the sequence
//!                                                           start come from the conv state
//! delta:  S_t = e^{g_t} S_{t-1}                              S: [d_k, d_v] per value head
//!         δ_t = β_t (v_t - S_tᵀ k_t)
//!         S_t = S_t + k_t δ_tᵀ
//!         o_t = S_tᵀ q_t
//! ```
//!
//! The rule runs token by token (its recurrent form) for prompts and decoding alike. On a CPU
//! the state of one head (128 × 128 f32) stays in L1 across a whole prompt, column tile by
//! column tile, so the recurrence costs ~4 flops per state element per token, a few percent of
//! the projections around it; the chunked form GPUs use trades that for matrix products with
//! more flops, and would make a token's output depend on where its chunk starts. Token by token,
//! a sequence's outputs are the same however a prompt is split across steps and whatever else
//! is in the batch.

use crate::cpu::SimdLevel;

/// The gated delta rule of one value head of one sequence over `T` tokens, from `state` (`[d_k,
/// d_v]`, row `i` for key dimension `i`), which it leaves at the state after the last token.
/// `q`, `k`: `[T, d_k]` (L2-normalized, `q` also scaled by `1/sqrt(d_k)`); `v`, `out`: `[T,
/// d_v]`; `decay`: `[T]`, `e^{g_t}`; `beta`: `[T]`.
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_rule(
    state: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    decay: &[f32],
    beta: &[f32],
    out: &mut [f32],
) {
    gated_delta_rule_at(crate::cpu::level(), state, q, k, v, decay, beta, out)
}

/// [`gated_delta_rule`] at an explicit SIMD level.
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_rule_at(
    level: SimdLevel,
    state: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    decay: &[f32],
    beta: &[f32],
    out: &mut [f32],
) {
    let t = decay.len();
    assert!(t > 0 && beta.len() == t, "one decay and one beta per token");
    let (dk, dv) = (k.len() / t, v.len() / t);
    assert!(
        dk > 0 && dv > 0 && q.len() == t * dk && k.len() == t * dk && v.len() == t * dv && out.len() == t * dv,
        "q, k: [T, d_k]; v, out: [T, d_v]"
    );
    assert_eq!(state.len(), dk * dv, "state is [d_k, d_v]");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if level == SimdLevel::Avx512 {
            // SAFETY: the level only names features the CPU has; shapes were checked above.
            done = unsafe { x86::columns_avx512(state, q, k, v, decay, beta, out, dk, dv) };
        }
        if level != SimdLevel::Scalar {
            // SAFETY: as above (AVX-512 machines have AVX2 and FMA).
            done += unsafe { x86::columns_avx2(state, q, k, v, decay, beta, out, dk, dv, done) };
        }
    }
    columns_scalar(state, q, k, v, decay, beta, out, dk, dv, done);
}

/// Columns `from..d_v` of the rule, one at a time (tails the vector tiles leave, and the scalar
/// level). Column `j` of the state evolves on its own: `δ_t[j]` reads only column `j`.
#[allow(clippy::too_many_arguments)]
fn columns_scalar(
    state: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    decay: &[f32],
    beta: &[f32],
    out: &mut [f32],
    dk: usize,
    dv: usize,
    from: usize,
) {
    for j in from..dv {
        for t in 0..decay.len() {
            let (qt, kt) = (&q[t * dk..(t + 1) * dk], &k[t * dk..(t + 1) * dk]);
            let eg = decay[t];
            let mut mem = 0f32;
            for i in 0..dk {
                mem += state[i * dv + j] * kt[i];
            }
            let delta = (v[t * dv + j] - eg * mem) * beta[t];
            let mut o = 0f32;
            for i in 0..dk {
                let s = state[i * dv + j] * eg + kt[i] * delta;
                state[i * dv + j] = s;
                o += s * qt[i];
            }
            out[t * dv + j] = o;
        }
    }
}

/// `x / sqrt(Σ x² + eps)` over every row of `dim` values (FLA's and transformers' `l2norm`,
/// eps 1e-6), in place.
pub fn l2_normalize_rows(x: &mut [f32], dim: usize, eps: f32) {
    for row in x.chunks_exact_mut(dim) {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss + eps).sqrt();
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// The causal depthwise convolution of one sequence's `T` new inputs `x` (`[T, C]`) with
/// `weight` (`[K, C]`: tap `j` of every channel, tap `K-1` on the newest input), continuing from
/// `state` (`[K-1, C]`, the inputs before `x`, oldest first: zeros at a sequence start), which
/// it leaves holding the last `K-1` inputs. Writes `silu(conv)` to `out` (`[T, C]`).
pub fn causal_conv1d_silu(weight: &[f32], taps: usize, state: &mut [f32], x: &[f32], out: &mut [f32]) {
    let c = weight.len().checked_div(taps).unwrap_or(0);
    assert!(c > 0 && weight.len() == taps * c && state.len() == (taps - 1) * c, "weight [K, C], state [K-1, C]");
    assert!(x.len().is_multiple_of(c) && out.len() == x.len(), "x, out: [T, C]");
    // One buffer [state; x], so every token's window is `K` consecutive rows.
    let mut all = Vec::with_capacity(state.len() + x.len());
    all.extend_from_slice(state);
    all.extend_from_slice(x);
    for (t, o) in out.chunks_exact_mut(c).enumerate() {
        o.fill(0.0);
        for (j, w) in weight.chunks_exact(c).enumerate() {
            let xin = &all[(t + j) * c..(t + j + 1) * c];
            for ((o, w), x) in o.iter_mut().zip(w).zip(xin) {
                *o += w * x;
            }
        }
        crate::ops::silu_in_place(o);
    }
    let keep = state.len();
    state.copy_from_slice(&all[all.len() - keep..]);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Columns `0..d_v / 16 * 16` in tiles of 16 (one register wide): each tile of the state
    /// (`d_k` rows of 64 bytes) stays in L1 across all `T` tokens. Returns the columns done.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn columns_avx512(
        state: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        decay: &[f32],
        beta: &[f32],
        out: &mut [f32],
        dk: usize,
        dv: usize,
    ) -> usize {
        let tiles = dv / 16;
        let s = state.as_mut_ptr();
        for tile in 0..tiles {
            let j0 = tile * 16;
            for t in 0..decay.len() {
                let (qt, kt) = (q.as_ptr().add(t * dk), k.as_ptr().add(t * dk));
                let eg = _mm512_set1_ps(decay[t]);
                // Sᵀk over this tile's columns, four partial sums.
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i + 4 <= dk {
                    for (u, a) in acc.iter_mut().enumerate() {
                        let row = _mm512_loadu_ps(s.add((i + u) * dv + j0));
                        *a = _mm512_fmadd_ps(row, _mm512_set1_ps(*kt.add(i + u)), *a);
                    }
                    i += 4;
                }
                while i < dk {
                    let row = _mm512_loadu_ps(s.add(i * dv + j0));
                    acc[0] = _mm512_fmadd_ps(row, _mm512_set1_ps(*kt.add(i)), acc[0]);
                    i += 1;
                }
                let mem = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                let vt = _mm512_loadu_ps(v.as_ptr().add(t * dv + j0));
                let delta = _mm512_mul_ps(_mm512_fnmadd_ps(eg, mem, vt), _mm512_set1_ps(beta[t]));
                // S = e^g S + k δᵀ, and o = Sᵀq, in one pass.
                let mut o = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i + 4 <= dk {
                    for (u, a) in o.iter_mut().enumerate() {
                        let p = s.add((i + u) * dv + j0);
                        let row = _mm512_fmadd_ps(
                            _mm512_set1_ps(*kt.add(i + u)),
                            delta,
                            _mm512_mul_ps(_mm512_loadu_ps(p), eg),
                        );
                        _mm512_storeu_ps(p, row);
                        *a = _mm512_fmadd_ps(row, _mm512_set1_ps(*qt.add(i + u)), *a);
                    }
                    i += 4;
                }
                while i < dk {
                    let p = s.add(i * dv + j0);
                    let row = _mm512_fmadd_ps(_mm512_set1_ps(*kt.add(i)), delta, _mm512_mul_ps(_mm512_loadu_ps(p), eg));
                    _mm512_storeu_ps(p, row);
                    o[0] = _mm512_fmadd_ps(row, _mm512_set1_ps(*qt.add(i)), o[0]);
                    i += 1;
                }
                let o = _mm512_add_ps(_mm512_add_ps(o[0], o[1]), _mm512_add_ps(o[2], o[3]));
                _mm512_storeu_ps(out.as_mut_ptr().add(t * dv + j0), o);
            }
        }
        tiles * 16
    }

    /// As [`columns_avx512`] in tiles of 8, over columns `from..` (whole tiles only). Returns the
    /// columns done.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns_avx2(
        state: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        decay: &[f32],
        beta: &[f32],
        out: &mut [f32],
        dk: usize,
        dv: usize,
        from: usize,
    ) -> usize {
        let tiles = (dv - from) / 8;
        let s = state.as_mut_ptr();
        for tile in 0..tiles {
            let j0 = from + tile * 8;
            for t in 0..decay.len() {
                let (qt, kt) = (q.as_ptr().add(t * dk), k.as_ptr().add(t * dk));
                let eg = _mm256_set1_ps(decay[t]);
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 4 <= dk {
                    for (u, a) in acc.iter_mut().enumerate() {
                        let row = _mm256_loadu_ps(s.add((i + u) * dv + j0));
                        *a = _mm256_fmadd_ps(row, _mm256_set1_ps(*kt.add(i + u)), *a);
                    }
                    i += 4;
                }
                while i < dk {
                    let row = _mm256_loadu_ps(s.add(i * dv + j0));
                    acc[0] = _mm256_fmadd_ps(row, _mm256_set1_ps(*kt.add(i)), acc[0]);
                    i += 1;
                }
                let mem = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                let vt = _mm256_loadu_ps(v.as_ptr().add(t * dv + j0));
                let delta = _mm256_mul_ps(_mm256_fnmadd_ps(eg, mem, vt), _mm256_set1_ps(beta[t]));
                let mut o = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 4 <= dk {
                    for (u, a) in o.iter_mut().enumerate() {
                        let p = s.add((i + u) * dv + j0);
                        let row = _mm256_fmadd_ps(
                            _mm256_set1_ps(*kt.add(i + u)),
                            delta,
                            _mm256_mul_ps(_mm256_loadu_ps(p), eg),
                        );
                        _mm256_storeu_ps(p, row);
                        *a = _mm256_fmadd_ps(row, _mm256_set1_ps(*qt.add(i + u)), *a);
                    }
                    i += 4;
                }
                while i < dk {
                    let p = s.add(i * dv + j0);
                    let row = _mm256_fmadd_ps(_mm256_set1_ps(*kt.add(i)), delta, _mm256_mul_ps(_mm256_loadu_ps(p), eg));
                    _mm256_storeu_ps(p, row);
                    o[0] = _mm256_fmadd_ps(row, _mm256_set1_ps(*qt.add(i)), o[0]);
                    i += 1;
                }
                let o = _mm256_add_ps(_mm256_add_ps(o[0], o[1]), _mm256_add_ps(o[2], o[3]));
                _mm256_storeu_ps(out.as_mut_ptr().add(t * dv + j0), o);
            }
        }
        tiles * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every level against the reference, for shapes with whole 16-wide tiles, an 8-wide tail,
    /// a scalar tail and a key dimension that is not a multiple of 4; over a run of tokens in
    /// one call and token by token (the two must agree bitwise: prompts and decoding share the
    /// code).
    #[test]
    fn delta_rule_matches_the_reference_at_every_level() {
        for (dk, dv, t) in [(16, 16, 5), (32, 40, 9), (7, 27, 3), (128, 128, 4)] {
            let mut q = rand(t * dk, 1);
            let mut k = rand(t * dk, 2);
            l2_normalize_rows(&mut q, dk, 1e-6);
            l2_normalize_rows(&mut k, dk, 1e-6);
            q.iter_mut().for_each(|x| *x /= (dk as f32).sqrt());
            let v = rand(t * dv, 3);
            let decay: Vec<f32> = rand(t, 4).iter().map(|x| (-(x.abs() * 2.0)).exp()).collect();
            let beta: Vec<f32> = rand(t, 5).iter().map(|x| 1.0 / (1.0 + (-x * 3.0).exp())).collect();
            let s0 = rand(dk * dv, 6);
            let (want_out, want_s) = reference::gated_delta_rule(&s0, &q, &k, &v, &decay, &beta);
            for level in SimdLevel::available() {
                let mut s = s0.clone();
                let mut out = vec![0f32; t * dv];
                gated_delta_rule_at(level, &mut s, &q, &k, &v, &decay, &beta, &mut out);
                let close =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()));
                assert!(close(&out, &want_out), "{level:?} {dk}x{dv}: outputs");
                assert!(close(&s, &want_s), "{level:?} {dk}x{dv}: state");
                // Token by token.
                let mut s1 = s0.clone();
                let mut out1 = vec![0f32; t * dv];
                for i in 0..t {
                    gated_delta_rule_at(
                        level,
                        &mut s1,
                        &q[i * dk..(i + 1) * dk],
                        &k[i * dk..(i + 1) * dk],
                        &v[i * dv..(i + 1) * dv],
                        &decay[i..i + 1],
                        &beta[i..i + 1],
                        &mut out1[i * dv..(i + 1) * dv],
                    );
                }
                assert_eq!(out1, out, "{level:?}: token by token differs from one call");
                assert_eq!(s1, s, "{level:?}: state token by token");
            }
        }
    }

    #[test]
    fn conv_continues_from_its_state() {
        let (c, taps, t) = (24, 4, 7);
        let w = rand(taps * c, 7);
        let x = rand(t * c, 8);
        let mut state = vec![0f32; (taps - 1) * c];
        let mut out = vec![0f32; t * c];
        causal_conv1d_silu(&w, taps, &mut state, &x, &mut out);
        // The reference: zero history, direct sum, then silu.
        for tt in 0..t {
            for ch in 0..c {
                let mut acc = 0f64;
                for j in 0..taps {
                    let src = tt as isize + j as isize - (taps as isize - 1);
                    if src >= 0 {
                        acc += w[j * c + ch] as f64 * x[src as usize * c + ch] as f64;
                    }
                }
                let want = acc / (1.0 + (-acc).exp());
                assert!((out[tt * c + ch] as f64 - want).abs() < 1e-5, "t {tt} c {ch}");
            }
        }
        // Split into 3 + 1 + 3 tokens: the same outputs, bitwise, and the same final state.
        let mut s2 = vec![0f32; (taps - 1) * c];
        let mut out2 = vec![0f32; t * c];
        for (a, b) in [(0, 3), (3, 4), (4, 7)] {
            causal_conv1d_silu(&w, taps, &mut s2, &x[a * c..b * c], &mut out2[a * c..b * c]);
        }
        assert_eq!(out2, out);
        assert_eq!(s2, state);
        assert_eq!(&state[..], &x[(t - taps + 1) * c..]);
    }
}
