//! Plain scalar versions of the kernels: the oracles their fast paths are tested against, on
//! random inputs, at every dispatch level. Written for clarity (f64 sums, two-pass softmax, no
//! blocking or paging), never for speed.

/// Multi-head latent attention of one query token ([`crate::mla::latent_attention`]) over its
/// context given as plain rows: `rows[p]` is position `p`'s latent row (`width` values), `q` is
/// `[num_heads, width]`. Returns `[num_heads, value_width]`:
/// `out[h] = sum_p softmax_p(scale * q[h] · rows[p]) rows[p][..value_width]`, zeros for an empty
/// context. Sums in f64.
pub fn latent_attention(q: &[f32], num_heads: usize, rows: &[Vec<f32>], value_width: usize, scale: f32) -> Vec<f32> {
    let width = q.len().checked_div(num_heads).unwrap_or(0);
    assert_eq!(q.len(), num_heads * width, "q is [heads, width]");
    assert!(value_width <= width && rows.iter().all(|r| r.len() == width), "rows are [context, width]");
    let mut out = vec![0f32; num_heads * value_width];
    if rows.is_empty() {
        return out;
    }
    for (qh, oh) in q.chunks_exact(width.max(1)).zip(out.chunks_exact_mut(value_width.max(1))) {
        let s: Vec<f64> = rows
            .iter()
            .map(|r| qh.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64)
            .collect();
        let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
        let z: f64 = e.iter().sum();
        for (d, o) in oh.iter_mut().enumerate() {
            *o = (e.iter().zip(rows).map(|(p, r)| p * r[d] as f64).sum::<f64>() / z) as f32;
        }
    }
    out
}

/// The gated delta rule of one head over `T` tokens, straight from its definition (each token:
/// decay the state, read `Sᵀk` with f64 sums, write `k δᵀ`, read `Sᵀq`): returns the outputs
/// (`[T, d_v]`) and the final state (`[d_k, d_v]`). See [`crate::delta::gated_delta_rule`].
pub fn gated_delta_rule(
    state: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    decay: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let t = decay.len();
    let (dk, dv) = (k.len() / t, v.len() / t);
    let mut s = state.to_vec();
    let mut out = vec![0f32; t * dv];
    for n in 0..t {
        let (qt, kt, vt) = (&q[n * dk..(n + 1) * dk], &k[n * dk..(n + 1) * dk], &v[n * dv..(n + 1) * dv]);
        s.iter_mut().for_each(|x| *x *= decay[n]);
        for j in 0..dv {
            let mem: f64 = (0..dk).map(|i| s[i * dv + j] as f64 * kt[i] as f64).sum();
            let delta = (vt[j] as f64 - mem) * beta[n] as f64;
            for i in 0..dk {
                s[i * dv + j] = (s[i * dv + j] as f64 + kt[i] as f64 * delta) as f32;
            }
            out[n * dv + j] = (0..dk).map(|i| s[i * dv + j] as f64 * qt[i] as f64).sum::<f64>() as f32;
        }
    }
    (out, s)
}
