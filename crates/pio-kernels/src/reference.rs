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
