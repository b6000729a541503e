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
            done = unsafe { x86::columns_avx512(state, q, k, v, decay, beta, out, dk, dv, 0) };
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

    /// One register of f32 lanes at an instruction set. The methods are `#[inline(always)]`
    /// without target features of their own: they are only called (inlined) from the
    /// `#[target_feature]` entry points below, which enable what each implementation uses.
    trait Lanes {
        type V: Copy;
        /// Lanes per register.
        const W: usize;
        /// Registers of columns one token at a time walks together (each needs three live
        /// registers: `Sᵀk`, δ and `Sᵀq`).
        const WIDEST: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn set1(x: f32) -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
        /// `a·b + c`, rounded once.
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        /// `c − a·b`, rounded once.
        unsafe fn fnmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        /// [`group`] at this instruction set, as a function of its own (compiled with its
        /// target features, like the entry points).
        #[allow(clippy::too_many_arguments)]
        unsafe fn group<const N: usize>(
            state: &mut [f32],
            buf: Option<&mut [f32]>,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            decay: &[f32],
            beta: &[f32],
            out: &mut [f32],
            dk: usize,
            dv_state: usize,
            c0: usize,
        );
    }

    struct Avx512;
    struct Avx2;

    impl Lanes for Avx512 {
        type V = __m512;
        const W: usize = 16;
        const WIDEST: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn set1(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn group<const N: usize>(
            state: &mut [f32],
            buf: Option<&mut [f32]>,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            decay: &[f32],
            beta: &[f32],
            out: &mut [f32],
            dk: usize,
            dv_state: usize,
            c0: usize,
        ) {
            group512::<N>(state, buf, q, k, v, decay, beta, out, dk, dv_state, c0)
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn group512<const N: usize>(
        state: &mut [f32],
        buf: Option<&mut [f32]>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        decay: &[f32],
        beta: &[f32],
        out: &mut [f32],
        dk: usize,
        dv_state: usize,
        c0: usize,
    ) {
        group::<Avx512, N>(state, buf, q, k, v, decay, beta, out, dk, dv_state, c0)
    }

    impl Lanes for Avx2 {
        type V = __m256;
        const W: usize = 8;
        // 16 registers in all.
        const WIDEST: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn set1(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn group<const N: usize>(
            state: &mut [f32],
            buf: Option<&mut [f32]>,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            decay: &[f32],
            beta: &[f32],
            out: &mut [f32],
            dk: usize,
            dv_state: usize,
            c0: usize,
        ) {
            group256::<N>(state, buf, q, k, v, decay, beta, out, dk, dv_state, c0)
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group256<const N: usize>(
        state: &mut [f32],
        buf: Option<&mut [f32]>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        decay: &[f32],
        beta: &[f32],
        out: &mut [f32],
        dk: usize,
        dv_state: usize,
        c0: usize,
    ) {
        group::<Avx2, N>(state, buf, q, k, v, decay, beta, out, dk, dv_state, c0)
    }

    /// Runs of at least this many tokens work on buffered copies of the state's columns.
    const BUFFER_FROM_TOKENS: usize = 4;
    /// Registers of columns per buffered group: `d_k` rows of them stay in L1 (32 KiB at 16
    /// lanes and `d_k` = 128).
    const BUFFERED: usize = 4;

    /// Columns `from..` in whole registers (16 lanes), see [`columns`]. Returns the columns done.
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
        from: usize,
    ) -> usize {
        columns::<Avx512>(state, q, k, v, decay, beta, out, dk, dv, from)
    }

    /// As [`columns_avx512`] in registers of 8 lanes.
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
        columns::<Avx2>(state, q, k, v, decay, beta, out, dk, dv, from)
    }

    /// Columns `from..` in whole registers, in groups that walk the state row by row: each
    /// token reads a group's rows once for `Sᵀk` and once more to update them and read `Sᵀq`,
    /// through contiguous memory. One token streams through the state in place, up to
    /// `I::WIDEST` registers at a time; a run of tokens works on a copy of each group of
    /// [`BUFFERED`] registers in a buffer of its own, `d_k` short rows that stay in L1 for the
    /// whole run, instead of the state's rows a row apart, where every few rows alias a store
    /// still in flight at 4 KiB. Every column's sums run in one chain over the rows in order, so
    /// a column's result does not depend on how many tokens a call has, on the group it falls
    /// in, or on the buffer. Returns the columns done.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn columns<I: Lanes>(
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
        let end = from + (dv - from) / I::W * I::W;
        let long = decay.len() >= BUFFER_FROM_TOKENS && dk <= 256;
        let widest = if long { BUFFERED } else { I::WIDEST };
        let mut buf = if long { vec![0f32; dk * BUFFERED * I::W] } else { Vec::new() };
        let mut c0 = from;
        while c0 < end {
            let n = ((end - c0) / I::W).min(widest);
            let b = if long { Some(&mut buf[..dk * I::W * n]) } else { None };
            match n {
                8 => I::group::<8>(state, b, q, k, v, decay, beta, out, dk, dv, c0),
                7 => I::group::<7>(state, b, q, k, v, decay, beta, out, dk, dv, c0),
                6 => I::group::<6>(state, b, q, k, v, decay, beta, out, dk, dv, c0),
                5 => I::group::<5>(state, b, q, k, v, decay, beta, out, dk, dv, c0),
                4 => I::group::<4>(state, b, q, k, v, decay, beta, out, dk, dv, c0),
                3 => I::group::<3>(state, b, q, k, v, decay, beta, out, dk, dv, c0),
                2 => I::group::<2>(state, b, q, k, v, decay, beta, out, dk, dv, c0),
                _ => I::group::<1>(state, b, q, k, v, decay, beta, out, dk, dv, c0),
            }
            c0 += n * I::W;
        }
        end - from
    }

    /// `N` registers of columns from `c0`, every token in turn; in `buf` (`d_k` rows of `N`
    /// registers) when given, copied in and back out. The arithmetic is the same either way.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn group<I: Lanes, const N: usize>(
        state: &mut [f32],
        buf: Option<&mut [f32]>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        decay: &[f32],
        beta: &[f32],
        out: &mut [f32],
        dk: usize,
        dv_state: usize,
        c0: usize,
    ) {
        let width = I::W * N;
        let buffered = buf.is_some();
        let (s, dv) = match buf {
            Some(b) => {
                for i in 0..dk {
                    let src = state.as_ptr().add(i * dv_state + c0);
                    b[i * width..(i + 1) * width].copy_from_slice(std::slice::from_raw_parts(src, width));
                }
                (b.as_mut_ptr(), width)
            }
            None => (state.as_mut_ptr().add(c0), dv_state),
        };
        for t in 0..decay.len() {
            let (qt, kt) = (q.as_ptr().add(t * dk), k.as_ptr().add(t * dk));
            let eg = I::set1(decay[t]);
            let mut acc = [I::zero(); N];
            for i in 0..dk {
                let (row, kb) = (s.add(i * dv), I::set1(*kt.add(i)));
                for (u, a) in acc.iter_mut().enumerate() {
                    *a = I::fma(I::load(row.add(I::W * u)), kb, *a);
                }
            }
            let bt = I::set1(beta[t]);
            let vt = v.as_ptr().add(t * dv_state + c0);
            let mut delta = [I::zero(); N];
            for (u, d) in delta.iter_mut().enumerate() {
                *d = I::mul(I::fnmadd(eg, acc[u], I::load(vt.add(I::W * u))), bt);
            }
            let mut o = [I::zero(); N];
            for i in 0..dk {
                let (row, kb, qb) = (s.add(i * dv), I::set1(*kt.add(i)), I::set1(*qt.add(i)));
                for (u, a) in o.iter_mut().enumerate() {
                    let x = I::fma(kb, delta[u], I::mul(I::load(row.add(I::W * u)), eg));
                    I::store(row.add(I::W * u), x);
                    *a = I::fma(x, qb, *a);
                }
            }
            let ot = out.as_mut_ptr().add(t * dv_state + c0);
            for (u, a) in o.iter().enumerate() {
                I::store(ot.add(I::W * u), *a);
            }
        }
        if buffered {
            for i in 0..dk {
                let dst = state.as_mut_ptr().add(i * dv_state + c0);
                std::ptr::copy_nonoverlapping(s.add(i * dv), dst, width);
            }
        }
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
