//! Products of a stored weight matrix with a batch of f32 activations.

use crate::act::{self, Q8Block};
use crate::cpu::{self, SimdLevel};
use crate::dot::float;
use crate::{adapt, dot, parallel, quant, DType};

pub use crate::dot::Layout;

/// A weight matrix `[rows, cols]` in any [`DType`], borrowed from its storage.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// `rows * dtype.row_bytes(cols)` bytes in [`Layout::Rows`];
    /// [`dot::interleaved_bytes`] in [`Layout::Interleaved`].
    pub data: &'a [u8],
    pub layout: Layout,
    /// BF16 only: multiply bf16-rounded activations where the CPU can ([`float::bf16_activations`]).
    pub bf16_activations: bool,
    /// Every product of this matrix has many tokens (a vision tower's, which has no decode):
    /// with `bf16_activations`, BF16 may then run on AMX tiles ([`float::bf16_on_amx`]), about
    /// 3x the products of the AVX-512 kernels. Not for matrices that also decode: AMX's sums
    /// differ in the last bits from the other kernels', so for batch invariance a decode would
    /// have to run on the tiles too, and one token streams slower through them than through
    /// FMAs (every matrix of a Qwen3-0.6B-shaped BF16 model on the tiles: 512-token prefill
    /// 139-150 -> 308-312 tok/s, decode 21.6-23.5 -> 19.7-20.4).
    pub prefill_only: bool,
}

impl<'a> WeightView<'a> {
    /// A matrix of rows in GGML's layout.
    pub fn rows(dtype: DType, rows: usize, cols: usize, data: &'a [u8]) -> WeightView<'a> {
        WeightView { dtype, rows, cols, data, layout: Layout::Rows, bf16_activations: false, prefill_only: false }
    }

    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    /// The stored bytes of row `r` (rows in [`Layout::Rows`] only).
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert_eq!(self.layout, Layout::Rows, "rows of an interleaved matrix are not contiguous");
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// The bytes this matrix must have in its layout.
    pub fn expected_bytes(&self) -> usize {
        match self.layout {
            Layout::Rows => self.rows * self.row_bytes(),
            Layout::Interleaved => dot::interleaved_bytes(self.dtype, self.rows, self.cols),
        }
    }

    /// Row `r` decoded to f32 into `out` (`cols` long), in either layout.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self.layout {
            Layout::Rows => quant::dequantize_row(self.dtype, self.row(r), out),
            Layout::Interleaved if self.dtype == DType::BF16 => {
                // 64 bytes at a time through the stack: a lookup per token allocates nothing.
                assert!(r < self.rows && out.len() == self.cols, "row {r} of {} x {}", self.rows, self.cols);
                let mut block = [0u8; 64];
                for (b, o) in out.chunks_exact_mut(32).enumerate() {
                    for (p, pair) in block.chunks_exact_mut(4).enumerate() {
                        let at = float::tiled_bf16_at(self.cols, r, 32 * b + 2 * p);
                        pair.copy_from_slice(&self.data[at..at + 4]);
                    }
                    quant::dequantize_row(self.dtype, &block, o);
                }
            }
            Layout::Interleaved => {
                // Block by block through a stack buffer: a lookup per token allocates nothing.
                assert!(r < self.rows && out.len() == self.cols, "row {r} of {} x {}", self.rows, self.cols);
                // A block as a one-block row (INT8's carries its row's scale).
                let be = self.dtype.block_elems();
                let bb = self.dtype.row_bytes(be).unwrap_or(0);
                let mut block = [0u8; 256];
                assert!(bb <= block.len(), "{} blocks of {bb} bytes", self.dtype);
                for (b, o) in out.chunks_exact_mut(be).enumerate() {
                    dot::interleaved_block(self.dtype, self.cols, self.data, r, b, &mut block[..bb]);
                    quant::dequantize_row(self.dtype, &block[..bb], o);
                }
            }
        }
    }
}

/// Tokens per tile: their activations (a few KiB each) stay in L2 while a thread's rows stream by.
const TOKENS_PER_TILE: usize = 64;
/// Rows per tile: their stored bytes (up to a few hundred KiB) stay in L2 while a token tile
/// streams by, and the kernels' per-call work on the activations (such as the offset sums of the
/// legacy formats) is shared by all of them. 128 measured 12-20% faster prefill than 16 on
/// Qwen3-0.6B-shaped Q8_0 / Q4_K_M files.
const ROWS_PER_TILE: usize = 128;
const _: () = assert!(ROWS_PER_TILE.is_multiple_of(dot::GROUP_ROWS));
/// Ranges of row groups per thread in a split by rows, claimed one at a time (see
/// [`parallel::for_each_range_balanced`]): at least this many, more for large products
/// ([`row_split_rounds`]).
const ROW_SPLITS_PER_THREAD: usize = 4;
/// Work (multiply-adds) of the last ranges a row split hands out, where the product is large
/// enough: how long the other threads may wait at its end. A decode's LM head (Qwen3-0.6B's:
/// 155 M multiply-adds) in four tapered rounds ended on ranges of 8 MB of Q6_K, so a thread
/// finishing first waited up to a third of a millisecond per token.
const TAIL_WORK: usize = 1 << 17;
/// The fewest row groups a range takes from an extra round (a prefill's tiles of
/// [`ROWS_PER_TILE`] rows).
const MIN_RANGE_GROUPS: usize = ROWS_PER_TILE / dot::GROUP_ROWS;

/// Rounds of a split of `units` row groups and `work` multiply-adds across `threads`: each
/// round after the first halves the ranges (see [`parallel::for_each_range_balanced`]), so
/// rounds are added until the last ranges hold about [`TAIL_WORK`], as long as they keep
/// [`MIN_RANGE_GROUPS`]. Claims grow with the logarithm of the work.
fn row_split_rounds(units: usize, work: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let mut rounds = ROW_SPLITS_PER_THREAD;
    while rounds < 16 && work >> (rounds - 1) > threads * TAIL_WORK && units >> rounds >= threads * MIN_RANGE_GROUPS {
        rounds += 1;
    }
    rounds
}
/// Calls whose every input has at least this many tokens, and whose every matrix fits in half
/// an L2 cache, split the tokens across the threads (see `matmul_multi_raw`).
const TOKEN_SPLIT_MIN: usize = 2 * TOKENS_PER_TILE;

/// `y[t, r] = sum_c w[r, c] * x[t, c]` for `n` tokens: x is `[n, cols]`, y is `[n, rows]`.
///
/// Block-quantized weights dot with activations quantized once per call to 8 bits
/// ([`Q8Block`]); float weights dot with f32 activations (bf16-rounded ones for BF16 weights
/// where the matrix asks for them and [`float::bf16_activations`] allows). Split across threads by weight rows, so each core
/// streams its own part of the matrix (by tokens when there are many); within a thread, tiles of rows x tokens reuse each
/// decoded weight block for several tokens. Each output is bitwise independent of `n` and of
/// the other tokens (see [`dot`]).
pub fn matmul(w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_at(cpu::level(), w, x, n, y)
}

/// [`matmul`] at an explicit SIMD level (tests and benchmarks).
pub fn matmul_at(level: SimdLevel, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_many_into(level, &[w], x, n, &mut [y]);
}

/// Several matrices with the same input width applied to the same `x` (q/k/v, gate/up): one
/// split across threads and one activation quantization for all of them, instead of one per
/// matrix — a decode step is mostly such hand-offs for small models. Returns each `[n, rows_i]`.
/// Each output is bitwise the same as [`matmul`] of its matrix alone.
pub fn matmul_many(ws: &[WeightView<'_>], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    matmul_many_at(cpu::level(), ws, x, n)
}

/// [`matmul_many`] at an explicit SIMD level.
pub fn matmul_many_at(level: SimdLevel, ws: &[WeightView<'_>], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    if let Some(cols) = ws.first().map(|w| w.cols) {
        for w in ws {
            assert_eq!(w.cols, cols, "matrices of one group share their input width");
        }
    }
    matmul_multi_new(level, ws, &vec![0; ws.len()], &[(x, n)])
}

/// [`matmul_many_at`] into caller-provided outputs, `ys[i]` being `[n, rows_i]`.
fn matmul_many_into(level: SimdLevel, ws: &[WeightView<'_>], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
    let Some(cols) = ws.first().map(|w| w.cols) else { return };
    for w in ws {
        assert_eq!(w.cols, cols, "matrices of one group share their input width");
    }
    let input_of = vec![0; ws.len()];
    matmul_multi_into(level, ws, &input_of, &[(x, n)], ys);
}

/// Several matrices, each with its own input: matrix `i` multiplies `inputs[input_of[i]]`
/// (`(x, n)`, `x` being `[n, cols_i]`), and the result `i` is `[n, rows_i]`. One split across
/// threads for all of them and one activation quantization per input: the experts of a
/// mixture-of-experts layer (each with the tokens routed to it) run as one parallel pass.
/// Each output is bitwise the same as [`matmul`] of its matrix and input alone.
pub fn matmul_multi(ws: &[WeightView<'_>], input_of: &[usize], inputs: &[(&[f32], usize)]) -> Vec<Vec<f32>> {
    matmul_multi_new(cpu::level(), ws, input_of, inputs)
}

/// [`matmul_multi`]'s results in new vectors, which the threads fill in place: zeroing them
/// first (as `vec![0.0; len]` does) cost 2-3% of a prefill.
fn matmul_multi_new(
    level: SimdLevel,
    ws: &[WeightView<'_>],
    input_of: &[usize],
    inputs: &[(&[f32], usize)],
) -> Vec<Vec<f32>> {
    assert_eq!(input_of.len(), ws.len());
    let lens: Vec<usize> = ws.iter().zip(input_of).map(|(w, &i)| inputs[i].1 * w.rows).collect();
    let mut ys: Vec<Vec<f32>> = lens.iter().map(|&len| Vec::with_capacity(len)).collect();
    let outs = ys.iter_mut().zip(&lens).map(|(y, &len)| (y.as_mut_ptr() as usize, len)).collect();
    // SAFETY: each vector has room for its `len` values and nothing else refers to it.
    unsafe { matmul_multi_raw(level, ws, input_of, inputs, outs) };
    for (y, len) in ys.iter_mut().zip(lens) {
        // SAFETY: `matmul_multi_raw` returned, so it wrote all `len` values.
        unsafe { y.set_len(len) };
    }
    ys
}

/// [`matmul_multi`] into caller-provided outputs, `ys[i]` being `[n_i, rows_i]`.
fn matmul_multi_into(
    level: SimdLevel,
    ws: &[WeightView<'_>],
    input_of: &[usize],
    inputs: &[(&[f32], usize)],
    ys: &mut [&mut [f32]],
) {
    let outs = ys.iter_mut().map(|y| (y.as_mut_ptr() as usize, y.len())).collect();
    // SAFETY: each output is borrowed mutably for this call and holds `len` values.
    unsafe { matmul_multi_raw(level, ws, input_of, inputs, outs) }
}

/// One input's activations as the matrices reading it take them: quantized to 8 bits, rounded
/// to bf16 (token-major, or transposed by pairs for AMX), or f32 laid out even/odd.
struct Prepared {
    acts: Vec<Q8Block>,
    /// `acts`' [`act::neg_sums`], where a matrix's tiles start from offset terms.
    sums: Vec<i32>,
    xb: Vec<u16>,
    xeo: Vec<f32>,
    xt: Option<float::Bf16Pairs>,
}

/// The products, written to `outs[i]` = (address, length) of output `i`; returns only after
/// every value of every output has been written.
///
/// # Safety
/// Each `outs[i]` is valid for writes of `len` f32 values, and nothing else reads or writes
/// those values during the call.
unsafe fn matmul_multi_raw(
    level: SimdLevel,
    ws: &[WeightView<'_>],
    input_of: &[usize],
    inputs: &[(&[f32], usize)],
    outs: Vec<(usize, usize)>,
) {
    // One token through block-format matrices (a decode step): at whichever of two levels ran
    // this call site faster lately, as both give the same bits (see `adapt`).
    if let (Some(levels), Some(first)) = (adapt::pair(level), ws.first()) {
        if inputs.iter().all(|&(_, n)| n == 1) && ws.iter().all(|w| dot::uses_q8_activations(w.dtype)) {
            // A site is a shape of call (the same matrices of every layer; a set of experts),
            // so that it gathers many calls per token.
            let key = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (first.dtype, first.rows, first.cols, ws.len(), inputs.len()).hash(&mut h);
                h.finish()
            };
            // SAFETY: the caller's promise on `outs`, passed on.
            return adapt::timed(key, levels, |at| unsafe { matmul_multi_at(at, ws, input_of, inputs, outs) });
        }
    }
    // SAFETY: as above.
    unsafe { matmul_multi_at(level, ws, input_of, inputs, outs) }
}

/// [`matmul_multi_raw`] at `level`.
///
/// # Safety
/// As [`matmul_multi_raw`].
unsafe fn matmul_multi_at(
    level: SimdLevel,
    ws: &[WeightView<'_>],
    input_of: &[usize],
    inputs: &[(&[f32], usize)],
    outs: Vec<(usize, usize)>,
) {
    assert_eq!(outs.len(), ws.len());
    assert_eq!(input_of.len(), ws.len());
    for ((w, &(_, len)), &i) in ws.iter().zip(&outs).zip(input_of) {
        let (x, n) = inputs[i];
        assert_eq!(w.data.len(), w.expected_bytes(), "{} matrix of {} x {} in {:?}", w.dtype, w.rows, w.cols, w.layout);
        assert!(
            w.layout == Layout::Rows || dot::interleaves(w.dtype) || float::interleaves_bf16(w.dtype, w.cols),
            "{} x {} of {} cannot be interleaved",
            w.rows,
            w.cols,
            w.dtype
        );
        assert_eq!(len, n * w.rows);
        assert_eq!(x.len(), n * w.cols, "input {i} is not [n, cols] for a matrix of {} columns", w.cols);
    }
    // Split in groups of 16 rows (the interleaved layout's unit), weighted by the work each
    // costs (its columns times its tokens), so threads get equal shares when experts see
    // different numbers of tokens.
    const G: usize = dot::GROUP_ROWS;
    let total: usize = ws.iter().map(|w| w.rows.div_ceil(G)).sum();
    let work: usize = ws.iter().zip(input_of).map(|(w, &i)| w.rows * w.cols * inputs[i].1).sum();
    if total == 0 || work == 0 {
        // No columns (or no rows, or no tokens): the products are empty sums.
        for &(y, len) in &outs {
            // SAFETY: the caller's promise on `outs`.
            unsafe { std::ptr::write_bytes(y as *mut f32, 0, len) };
        }
        return;
    }
    // Per input: Q8 activations, bf16 activations (token-major, or by pairs for AMX) and
    // even/odd f32 ones, made only when some matrix needs them.
    let on_amx = |w: &WeightView<'_>| {
        w.dtype == DType::BF16 && w.bf16_activations && w.prefill_only && float::bf16_on_amx(level, w.cols)
    };
    let prepared: Vec<Prepared> = inputs
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let users = || ws.iter().zip(input_of).filter(move |(_, &j)| j == i).map(|(w, _)| w);
            let acts =
                if users().any(|w| dot::uses_q8_activations(w.dtype)) { act::quantize_q8_vec(x) } else { Vec::new() };
            // Once here rather than per tile: each of a matrix's row tiles would sum every block.
            let sums =
                if users().any(|w| dot::legacy::uses_sums(level, w.dtype)) { act::neg_sums(&acts) } else { Vec::new() };
            let xb = if users().any(|w| float::bf16_activations(level, w.dtype, w.bf16_activations) && !on_amx(w)) {
                float::to_bf16(x)
            } else {
                Vec::new()
            };
            let xt = users().find(|w| on_amx(w)).map(|w| float::to_bf16_pairs(x, inputs[i].1, w.cols));
            let xeo = match users().find(|w| {
                !on_amx(w)
                    && float::even_odd_activations(level, w.dtype, w.cols)
                    && !float::bf16_activations(level, w.dtype, w.bf16_activations)
            }) {
                Some(w) => float::to_even_odd(level, x, inputs[i].1, w.cols),
                None => Vec::new(),
            };
            Prepared { acts, sums, xb, xeo, xt }
        })
        .collect();
    // Unit `u` of the split is row group `u - starts[i]` of matrix `i`.
    let starts: Vec<usize> = ws
        .iter()
        .scan(0, |acc, w| {
            let s = *acc;
            *acc += w.rows.div_ceil(G);
            Some(s)
        })
        .collect();
    // One tile: rows `ra..rz` of matrix `i` times its tokens `t0..t1`, to `out[(t - t0) * ldo +
    // (r - ra)]`.
    // The stored bytes of rows `ra..rz` of matrix `i` (row tiles start at whole groups in the
    // interleaved layout: ROWS_PER_TILE is a multiple of G).
    let stored = |i: usize, (ra, rz): (usize, usize)| {
        let w = &ws[i];
        match w.layout {
            Layout::Rows => &w.data[ra * w.row_bytes()..rz * w.row_bytes()],
            Layout::Interleaved => {
                let group_bytes = dot::interleaved_bytes(w.dtype, G, w.cols);
                &w.data[ra / G * group_bytes..rz.div_ceil(G) * group_bytes]
            }
        }
    };
    // Interleaved BF16 on AMX is read in rows, restored here once per row tile for all the
    // call's tokens.
    let restores = |i: usize| {
        let w = &ws[i];
        w.dtype == DType::BF16 && w.layout == Layout::Interleaved && on_amx(w)
    };
    // One tile: rows `ra..rz` of matrix `i` (`restored`: those rows restored in rows) times its
    // tokens `t0..t1`, to `out[(t - t0) * ldo + (r - ra)]`.
    let tile = |i: usize,
                (t0, t1): (usize, usize),
                (ra, rz): (usize, usize),
                restored: Option<&[u8]>,
                out: &mut [f32],
                ldo: usize| {
        let w = &ws[i];
        let (x, _) = inputs[input_of[i]];
        let Prepared { acts, sums, xb, xeo, xt } = &prepared[input_of[i]];
        let (cols, nb) = (w.cols, w.cols / 32);
        let (rows, layout) = match restored {
            Some(rows) => (rows, Layout::Rows),
            None => (stored(i, (ra, rz)), w.layout),
        };
        if dot::uses_q8_activations(w.dtype) {
            let acts = &acts[t0 * nb..t1 * nb];
            let sums = if sums.is_empty() { &[][..] } else { &sums[t0 * nb..t1 * nb] };
            dot::gemm_q8(level, w.dtype, rows, rz - ra, layout, acts, sums, t1 - t0, out, ldo);
        } else if let Some(xt) = xt.as_ref().filter(|_| on_amx(w)) {
            // Interleaved rows come restored ([`float::restore_rows_bf16`]).
            assert_eq!(layout, Layout::Rows);
            float::gemm_bf16_amx(level, rows, rz - ra, xt, (t0, t1), out, ldo);
        } else if float::bf16_activations(level, w.dtype, w.bf16_activations) {
            float::gemm_bf16(level, rows, rz - ra, layout, &xb[t0 * cols..t1 * cols], t1 - t0, out, ldo);
        } else if float::tiles_bf16(level, w.dtype, cols) {
            float::gemm_tiled(level, rows, rz - ra, layout, &x[t0 * cols..t1 * cols], t1 - t0, out, ldo);
        } else if float::even_odd_activations(level, w.dtype, cols) {
            let padded = float::even_odd_width(level, cols);
            float::gemm_even_odd(level, rows, rz - ra, &xeo[t0 * padded..t1 * padded], t1 - t0, out, ldo);
        } else if layout == Layout::Interleaved {
            // Interleaved BF16 at the scalar level (only where a caller asks for it: loading
            // interleaves only at AVX2 and up): its rows restored for the reference tile.
            let mut restored = vec![0u8; (rz - ra) * w.row_bytes()];
            for (r, row) in restored.chunks_exact_mut(w.row_bytes()).enumerate() {
                float::tiled_row_bf16(rows, cols, r, row);
            }
            dot::gemm_f32(level, w.dtype, &restored, rz - ra, &x[t0 * cols..t1 * cols], t1 - t0, out, ldo);
        } else {
            dot::gemm_f32(level, w.dtype, rows, rz - ra, &x[t0 * cols..t1 * cols], t1 - t0, out, ldo);
        }
    };
    if inputs.iter().all(|&(_, n)| n >= TOKEN_SPLIT_MIN) && ws.iter().all(|w| w.data.len() <= cpu::l2_bytes() / 2) {
        // Many tokens (a prefill) of small matrices: each thread takes a range of every input's
        // tokens, all rows, and its tiles write straight into the outputs, whose token ranges
        // are its alone. (Split by rows, the threads' outputs interleave, so each goes through a
        // buffer and a copy: 4% of a SmolLM2 prefill.) A thread then reads the whole matrix per
        // token tile: from L2 while it fits there. A larger one is split by rows, so each
        // thread's half may stay in L2 (Qwen3-0.6B's 3.3 MB Q8_0 MLP matrices ran 10-25% slower
        // split by tokens on a 2 MiB L2).
        let parts = parallel::num_threads();
        parallel::for_each_range(parts, work, |p0, p1| {
            RESTORED.with_borrow_mut(|buf| {
                for (i, w) in ws.iter().enumerate() {
                    let n = inputs[input_of[i]].1;
                    let (ta, tb) = (n * p0 / parts, n * p1 / parts);
                    let (y, len) = outs[i];
                    // The whole matrix (at most half an L2) restored once for this thread's tokens.
                    let restored = match restores(i) && ta < tb {
                        true => Some(float::restore_rows_bf16(w.data, w.rows, w.cols, buf)),
                        false => None,
                    };
                    for t0 in (ta..tb).step_by(TOKENS_PER_TILE) {
                        let t1 = (t0 + TOKENS_PER_TILE).min(tb);
                        for ra in (0..w.rows).step_by(ROWS_PER_TILE) {
                            let rz = (ra + ROWS_PER_TILE).min(w.rows);
                            let (at, end) = (t0 * w.rows + ra, (t1 - 1) * w.rows + rz);
                            assert!(end <= len);
                            // SAFETY: output `i` is ours to write for this whole call (the caller's
                            // promise); `at..end` lies inside it (asserted) and within tokens
                            // `ta..tb`, which no other thread's range overlaps (the parts' ranges
                            // are disjoint), and this thread's earlier slices are dropped.
                            let out = unsafe { std::slice::from_raw_parts_mut((y as *mut f32).add(at), end - at) };
                            let rb = 2 * w.cols;
                            tile(i, (t0, t1), (ra, rz), restored.map(|r| &r[ra * rb..rz * rb]), out, w.rows);
                        }
                    }
                }
            })
        });
        return;
    }
    // Each thread writes its rows of every output itself (so the copy-out is split across the
    // threads too), through `outs`: `part` (tokens `t0..t1` of rows `ra..rz` of matrix `i`,
    // token-major) to its place in output `i`.
    let copy_out = |i: usize, (t0, t1): (usize, usize), (ra, rz): (usize, usize), part: &[f32]| {
        let (y, len) = outs[i];
        let width = rz - ra;
        for t in t0..t1 {
            let at = t * ws[i].rows + ra;
            assert!(at + width <= len);
            let src = &part[(t - t0) * width..(t - t0 + 1) * width];
            // SAFETY: output `i` is ours to write for this whole call (the caller's promise);
            // `at + width <= len` keeps the write inside it; and the ranges of row groups the
            // threads get are disjoint (rows `ra..rz` lie in this thread's), so no two threads
            // write the same element. Every (token, row) is written once: the ranges cover every
            // row group, each with all its tokens.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), (y as *mut f32).add(at), width) };
        }
    };
    let rounds = row_split_rounds(total, work, parallel::num_threads());
    parallel::for_each_range_balanced(total, work, rounds, |u0, u1| {
        SCRATCH.with_borrow_mut(|part| {
            for (i, w) in ws.iter().enumerate() {
                let (a, b) = (u0.max(starts[i]), u1.min(starts[i] + w.rows.div_ceil(G)));
                if a >= b {
                    continue;
                }
                let n = inputs[input_of[i]].1;
                let (r0, r1) = ((a - starts[i]) * G, ((b - starts[i]) * G).min(w.rows));
                let width = r1 - r0;
                // One token tile's outputs of these rows, token-major; they stay in L2 until
                // copied out.
                if part.len() < TOKENS_PER_TILE * width {
                    part.resize(TOKENS_PER_TILE * width, 0.0);
                }
                if restores(i) {
                    // Row tiles outside, each restored once, then every token tile against it
                    // (from L2), its outputs copied out at once.
                    RESTORED.with_borrow_mut(|buf| {
                        for ra in (r0..r1).step_by(ROWS_PER_TILE) {
                            let rz = (ra + ROWS_PER_TILE).min(r1);
                            let restored = float::restore_rows_bf16(stored(i, (ra, rz)), rz - ra, w.cols, buf);
                            for t0 in (0..n).step_by(TOKENS_PER_TILE) {
                                let t1 = (t0 + TOKENS_PER_TILE).min(n);
                                tile(i, (t0, t1), (ra, rz), Some(restored), part, rz - ra);
                                copy_out(i, (t0, t1), (ra, rz), part);
                            }
                        }
                    });
                    continue;
                }
                for t0 in (0..n).step_by(TOKENS_PER_TILE) {
                    let t1 = (t0 + TOKENS_PER_TILE).min(n);
                    for ra in (r0..r1).step_by(ROWS_PER_TILE) {
                        let rz = (ra + ROWS_PER_TILE).min(r1);
                        tile(i, (t0, t1), (ra, rz), None, &mut part[ra - r0..], width);
                    }
                    copy_out(i, (t0, t1), (r0, r1), part);
                }
            }
        })
    });
}

/// `out[i * n + j] = Σ_c a[i * k + c] · bt[c * n + j]`: `m` rows of `a` (`[m, k]`) times the
/// `n` columns of `bt` (`[k, n]`, the second operand transposed), for products whose shared
/// dimension is short, such as a vision tower's queries times its keys (`k` = head_dim = 64):
/// there [`matmul`]'s row-dot tiles spend about as much on their horizontal sums and set-up as
/// on the products. Register tiles of 6 rows x 16 columns take one FMA per term instead (the
/// outer-product form of BLAS kernels); each output sums its terms in order of `c`. Split across
/// the threads by rows of `a`. Not batch-invariant across levels (the scalar level rounds each
/// product before adding): for products computed once per input, as the tower's.
pub fn matmul_kn(a: &[f32], m: usize, k: usize, bt: &[f32], n: usize, out: &mut [f32]) {
    matmul_kn_at(cpu::level(), a, m, k, bt, n, out)
}

/// [`matmul_kn`] at `level`.
pub fn matmul_kn_at(level: SimdLevel, a: &[f32], m: usize, k: usize, bt: &[f32], n: usize, out: &mut [f32]) {
    assert!(a.len() == m * k && bt.len() == k * n && out.len() == m * n, "matmul_kn shapes");
    if m == 0 || n == 0 {
        return;
    }
    let dst = out.as_mut_ptr() as usize;
    parallel::for_each_range(m, m * n * k.max(1), |i0, i1| {
        // SAFETY: `out` is borrowed mutably for this call and the threads' row ranges are
        // disjoint, so each writes only its own rows `i0..i1`, which lie inside it (`out` holds
        // `m * n`).
        let rows = unsafe { std::slice::from_raw_parts_mut((dst as *mut f32).add(i0 * n), (i1 - i0) * n) };
        let a = &a[i0 * k..i1 * k];
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `level` comes from `cpu::level()` (or a caller's level at or below it),
            // which reports AVX2 + FMA only where the CPU has them; shapes asserted above.
            SimdLevel::Avx2 | SimdLevel::Avx512 => unsafe { kn_x86::run(a, i1 - i0, k, bt, n, rows) },
            _ => kn_scalar(a, i1 - i0, k, bt, n, rows),
        }
    });
}

fn kn_scalar(a: &[f32], m: usize, k: usize, bt: &[f32], n: usize, out: &mut [f32]) {
    for i in 0..m {
        let row = &mut out[i * n..(i + 1) * n];
        row.fill(0.0);
        for c in 0..k {
            let x = a[i * k + c];
            for (o, &b) in row.iter_mut().zip(&bt[c * n..(c + 1) * n]) {
                *o += x * b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kn_x86 {
    use std::arch::x86_64::*;

    /// [`super::matmul_kn`]'s rows `0..m` at AVX2: column blocks of 16 outside (a block's `k`
    /// lines of `bt` stay in L1 while the rows go by), row blocks of 6 inside.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(a: &[f32], m: usize, k: usize, bt: &[f32], n: usize, out: &mut [f32]) {
        let full = n / 16 * 16;
        // A column block's `k` rows of 16 copied together: read in place they lie `4n` bytes
        // apart, and at n = 4096 all map to the same L1 sets (the kernel ran at 60% of the
        // row-dot tiles' rate that way).
        let mut panel = vec![0f32; 16 * k];
        for j0 in (0..full).step_by(16) {
            for (c, p) in panel.chunks_exact_mut(16).enumerate() {
                p.copy_from_slice(&bt[c * n + j0..c * n + j0 + 16]);
            }
            let mut i0 = 0;
            while i0 + 6 <= m {
                tile::<6>(a, i0, k, &panel, n, j0, out);
                i0 += 6;
            }
            match m - i0 {
                1 => tile::<1>(a, i0, k, &panel, n, j0, out),
                2 => tile::<2>(a, i0, k, &panel, n, j0, out),
                3 => tile::<3>(a, i0, k, &panel, n, j0, out),
                4 => tile::<4>(a, i0, k, &panel, n, j0, out),
                5 => tile::<5>(a, i0, k, &panel, n, j0, out),
                _ => {}
            }
        }
        // The last columns (fewer than 16), in the same order of terms with one FMA each.
        for i in 0..m {
            for j in full..n {
                let mut s = 0f32;
                for c in 0..k {
                    s = a[i * k + c].mul_add(bt[c * n + j], s);
                }
                out[i * n + j] = s;
            }
        }
    }

    /// Rows `i0..i0 + R` times the 16 columns of `panel` (`[k, 16]`: columns `j0..j0 + 16`):
    /// `R x 2` accumulators.
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        a: &[f32],
        i0: usize,
        k: usize,
        panel: &[f32],
        n: usize,
        j0: usize,
        out: &mut [f32],
    ) {
        assert!((i0 + R) * k <= a.len() && panel.len() == 16 * k && (i0 + R - 1) * n + j0 + 16 <= out.len());
        let (pa, pb) = (a.as_ptr().add(i0 * k), panel.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..k {
            let b0 = _mm256_loadu_ps(pb.add(16 * c));
            let b1 = _mm256_loadu_ps(pb.add(16 * c + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*pa.add(r * k + c));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add((i0 + r) * n + j0);
            _mm256_storeu_ps(o, acc[0]);
            _mm256_storeu_ps(o.add(8), acc[1]);
        }
    }
}

thread_local! {
    /// Each thread's buffer for one token tile of a matrix's outputs, reused from call to call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's interleaved BF16 rows restored in rows, reused from call to call.
    static RESTORED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn stored(rng: &mut rand::rngs::StdRng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let rb = dtype.row_bytes(cols).unwrap_or(0);
        let mut out = vec![0u8; rows * rb];
        for (src, dst) in w.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
            quant::quantize_row(dtype, src, dst);
        }
        out
    }

    #[test]
    fn large_products_split_into_more_rounds_with_short_tails() {
        // Decode products of Qwen3-0.6B's layers keep four or five rounds.
        for (rows, cols) in [(1024, 2048), (4096, 1024), (6144, 1024), (1024, 3072)] {
            let rounds = row_split_rounds(rows / 16, rows * cols, 2);
            assert!((ROW_SPLITS_PER_THREAD..=ROW_SPLITS_PER_THREAD + 1).contains(&rounds), "{rows} x {cols}: {rounds}");
        }
        // Its LM head ends on ranges of about TAIL_WORK, still whole tiles' worth of groups.
        let (units, work) = (151_936 / 16, 151_936 * 1024);
        let rounds = row_split_rounds(units, work, 2);
        assert!(rounds > ROW_SPLITS_PER_THREAD, "{rounds}");
        let last = units / (2 << (rounds - 1));
        assert!(last >= MIN_RANGE_GROUPS / 2 && work / units * last <= 4 * TAIL_WORK, "{rounds} {last}");
        // A prefill's ranges keep at least a row tile's groups.
        let rounds = row_split_rounds(384, 6144 * 1024 * 512, 2);
        assert!(384 / (2 << (rounds - 1)) >= MIN_RANGE_GROUPS, "{rounds}");
        // One thread, or nothing to split, stays at the minimum.
        assert_eq!(row_split_rounds(0, 0, 1), ROW_SPLITS_PER_THREAD);
    }

    #[test]
    fn one_token_products_keep_their_bits_whichever_level_runs_them() {
        // Enough calls of one site for both levels' bursts and an exploring one (at AVX-512;
        // elsewhere the level is fixed): every call gives the bits of the batched product.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, cols, n) = (40, 512, 3);
        for dtype in [DType::Q8_0, DType::Q5_0, DType::Q4_K, DType::Q6_K] {
            let data = stored(&mut rng, dtype, rows, cols);
            let packed = dot::interleave(dtype, rows, cols, &data);
            let w = WeightView { layout: Layout::Interleaved, ..WeightView::rows(dtype, rows, cols, &packed) };
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let level = cpu::level();
            let batch = matmul_many_at(level, &[w, w], &x, n);
            let before = adapt::calls_by_level();
            for call in 0..300 {
                let t = call % n;
                let one = matmul_many_at(level, &[w, w], &x[t * cols..(t + 1) * cols], 1);
                for y in [&one[0], &one[1]] {
                    assert!(
                        y.iter().zip(&batch[0][t * rows..(t + 1) * rows]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype}: call {call}, token {t} differs from the batch"
                    );
                }
            }
            let after = adapt::calls_by_level();
            if adapt::pair(level).is_some() {
                // Other tests' products count too, so only a lower bound: both levels ran.
                assert!(after[0] > before[0] && after[1] > before[1], "{before:?} -> {after:?}");
            }
        }
    }

    #[test]
    fn matmul_is_batch_invariant_and_close_to_the_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // More tokens than TOKEN_SPLIT_MIN: the threads split them (70 alone: by rows).
        let (rows, cols, n) = (37, 256, 150);
        for dtype in [DType::F32, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q5_0, DType::Q4_K, DType::Q6_K] {
            let data = stored(&mut rng, dtype, rows, cols);
            let w = WeightView::rows(dtype, rows, cols, &data);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            for level in SimdLevel::available() {
                let mut y = vec![0f32; n * rows];
                matmul_at(level, w, &x, n, &mut y);
                for t in [0, 1, 63, 64, 69, 74, 75, 149] {
                    let mut one = vec![0f32; rows];
                    matmul_at(level, w, &x[t * cols..(t + 1) * cols], 1, &mut one);
                    assert!(
                        one.iter().zip(&y[t * rows..(t + 1) * rows]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype} {level:?}: token {t} alone differs from the batch"
                    );
                    for r in 0..rows {
                        let want = quant::dot_row(dtype, w.row(r), &x[t * cols..(t + 1) * cols]);
                        let got = y[t * rows + r];
                        // Q8 activations and bf16 activations round x; floats only reorder.
                        let tol = if dtype == DType::F32 { 1e-4 } else { 0.05 };
                        assert!(
                            (got - want).abs() <= tol * (1.0 + want.abs()),
                            "{dtype} {level:?} ({r},{t}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn prefill_only_bf16_runs_on_amx_batch_invariant_and_close() {
        let level = SimdLevel::Avx512;
        if !float::bf16_on_amx(level, 64) {
            eprintln!("skipped: no AMX-BF16 here (or PIO_SIMD caps it)");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        // A small matrix (tokens split across threads) and a larger one (rows split), with a
        // last partial row group; then a width AMX does not take (the AVX-512 BF16 kernel).
        for (rows, cols, n) in [(40, 64, 150), (300, 2048, 70), (24, 48, 20)] {
            let data = stored(&mut rng, DType::BF16, rows, cols);
            let w = WeightView {
                bf16_activations: true,
                prefill_only: true,
                ..WeightView::rows(DType::BF16, rows, cols, &data)
            };
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut all = vec![0f32; n * rows];
            matmul_at(level, w, &x, n, &mut all);
            for t in [0, n / 2, n - 1] {
                let mut one = vec![0f32; rows];
                matmul_at(level, w, &x[t * cols..(t + 1) * cols], 1, &mut one);
                // Rounded to bf16 where the matrix runs on AMX (or `vdpbf16ps`), else f32.
                let xt = &x[t * cols..(t + 1) * cols];
                let xr: Vec<f32> =
                    if float::bf16_on_amx(level, cols) || float::bf16_activations(level, DType::BF16, true) {
                        float::to_bf16(xt).iter().map(|&b| f32::from_bits((b as u32) << 16)).collect()
                    } else {
                        xt.to_vec()
                    };
                for r in 0..rows {
                    let got = all[t * rows + r];
                    assert_eq!(got.to_bits(), one[r].to_bits(), "{rows} x {cols}: ({r}, {t}) alone");
                    let want = w.row(r).chunks_exact(2).zip(&xr).map(|(b, &v)| {
                        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64 * v as f64
                    });
                    let want: f64 = want.sum();
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * cols as f64,
                        "{rows} x {cols}: ({r}, {t}) {got} vs {want}"
                    );
                }
            }
            // In the tiles' own layout: the same bits, and the same rows read back.
            if float::bf16_on_amx(level, cols) {
                let tiled = float::tile_bf16(rows, cols, &data);
                let wt = WeightView { layout: Layout::Interleaved, data: &tiled, ..w };
                let mut again = vec![0f32; n * rows];
                matmul_at(level, wt, &x, n, &mut again);
                assert!(again.iter().zip(&all).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows} x {cols}: tiled");
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                wt.dequantize_row(rows - 1, &mut a);
                w.dequantize_row(rows - 1, &mut b);
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn matrices_with_their_own_inputs_equal_each_alone() {
        // The experts of a mixture: different widths, token counts and formats in one pass.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let shapes =
            [(DType::Q4_K, 24, 256, 0), (DType::Q8_0, 17, 256, 0), (DType::Q4_K, 40, 512, 1), (DType::F32, 9, 64, 2)];
        let ns = [3usize, 1, 70];
        let cols_of = [256usize, 512, 64];
        let xs: Vec<Vec<f32>> =
            ns.iter().zip(cols_of).map(|(&n, c)| (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
        let datas: Vec<Vec<u8>> = shapes.iter().map(|&(d, r, c, _)| stored(&mut rng, d, r, c)).collect();
        let ws: Vec<WeightView> = shapes
            .iter()
            .zip(&datas)
            .map(|(&(dtype, rows, cols, _), data)| WeightView::rows(dtype, rows, cols, data))
            .collect();
        let input_of: Vec<usize> = shapes.iter().map(|s| s.3).collect();
        let inputs: Vec<(&[f32], usize)> = xs.iter().zip(ns).map(|(x, n)| (x.as_slice(), n)).collect();
        let ys = matmul_multi(&ws, &input_of, &inputs);
        for (i, w) in ws.iter().enumerate() {
            let (x, n) = inputs[input_of[i]];
            let mut alone = vec![0f32; n * w.rows];
            matmul(*w, x, n, &mut alone);
            assert!(alone.iter().zip(&ys[i]).all(|(a, b)| a.to_bits() == b.to_bits()), "matrix {i}");
        }
    }

    #[test]
    fn interleaved_matrices_give_the_same_bits_as_their_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        // Row counts around the 16-row groups and the 128-row tiles; one matrix per format.
        let shapes = [
            (DType::Q4_K, 37, 512),
            (DType::Q6_K, 16, 256),
            (DType::Q5_K, 129, 256),
            (DType::Q4_K, 300, 256),
            (DType::Q8_0, 37, 96),
            (DType::Q4_0, 17, 64),
            (DType::Q4_1, 140, 32),
            (DType::Q5_0, 33, 160),
            (DType::Q5_1, 8, 64),
            (DType::BF16, 37, 96),
            (DType::BF16, 300, 256),
            (DType::BF16, 13, 32),
        ];
        let datas: Vec<Vec<u8>> = shapes.iter().map(|&(d, r, c)| stored(&mut rng, d, r, c)).collect();
        let packed: Vec<Vec<u8>> = shapes
            .iter()
            .zip(&datas)
            .map(
                |(&(d, r, c), data)| {
                    if d == DType::BF16 {
                        float::tile_bf16(r, c, data)
                    } else {
                        dot::interleave(d, r, c, data)
                    }
                },
            )
            .collect();
        for n in [1usize, 3, 70, 130] {
            let xs: Vec<Vec<f32>> =
                shapes.iter().map(|&(_, _, c)| (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
            for level in SimdLevel::available() {
                let view = |i: usize, layout: Layout| {
                    let (dtype, rows, cols) = shapes[i];
                    let data = if layout == Layout::Rows { &datas[i] } else { &packed[i] };
                    // The last BF16 matrix with bf16 activations (`vdpbf16ps` where the CPU has it).
                    let bf16_activations = i == shapes.len() - 1;
                    WeightView { dtype, rows, cols, data, layout, bf16_activations, prefill_only: false }
                };
                for i in 0..shapes.len() {
                    let (mut a, mut b) = (vec![0f32; n * shapes[i].1], vec![0f32; n * shapes[i].1]);
                    matmul_at(level, view(i, Layout::Rows), &xs[i], n, &mut a);
                    matmul_at(level, view(i, Layout::Interleaved), &xs[i], n, &mut b);
                    assert!(
                        a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{:?} n {n} {level:?}",
                        shapes[i]
                    );
                }
                // Mixed layouts in one pass, each with its own input.
                let ws: Vec<WeightView> = (0..shapes.len())
                    .map(|i| view(i, if i % 2 == 0 { Layout::Interleaved } else { Layout::Rows }))
                    .collect();
                let inputs: Vec<(&[f32], usize)> = xs.iter().map(|x| (x.as_slice(), n)).collect();
                let input_of: Vec<usize> = (0..shapes.len()).collect();
                let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.rows]).collect();
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                matmul_multi_into(level, &ws, &input_of, &inputs, &mut outs);
                for (i, y) in ys.iter().enumerate() {
                    let mut alone = vec![0f32; n * shapes[i].1];
                    matmul_at(level, view(i, Layout::Rows), &xs[i], n, &mut alone);
                    assert!(alone.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()), "multi {i} n {n} {level:?}");
                }
            }
        }
    }

    #[test]
    fn matmul_kn_matches_the_plain_sums_at_every_level() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Row counts around the 6-row tiles, column counts around the 16-column ones.
        for (m, k, n) in [(1, 64, 16), (7, 64, 37), (13, 5, 48), (256, 64, 130), (4, 1, 3), (0, 8, 8), (3, 0, 17)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bt: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want: Vec<f64> =
                (0..m * n).map(|o| (0..k).map(|c| a[o / n * k + c] as f64 * bt[c * n + o % n] as f64).sum()).collect();
            for level in SimdLevel::available() {
                let mut out = vec![f32::NAN; m * n];
                matmul_kn_at(level, &a, m, k, &bt, n, &mut out);
                for (o, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-5 * (k as f64).max(1.0),
                        "{level:?} {m}x{k}x{n} at {o}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_group_equals_its_matrices_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (cols, n) = (512, 5);
        let shapes = [(DType::Q4_K, 40), (DType::Q6_K, 24), (DType::BF16, 9)];
        let datas: Vec<Vec<u8>> = shapes.iter().map(|&(d, r)| stored(&mut rng, d, r, cols)).collect();
        let ws: Vec<WeightView> =
            shapes.iter().zip(&datas).map(|(&(dtype, rows), data)| WeightView::rows(dtype, rows, cols, data)).collect();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let group = matmul_many(&ws, &x, n);
        for (w, got) in ws.iter().zip(&group) {
            let mut alone = vec![0f32; n * w.rows];
            matmul(*w, &x, n, &mut alone);
            assert!(alone.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits()), "{}", w.dtype);
        }
    }

    #[test]
    fn new_outputs_are_fully_written() {
        // No columns: empty sums, so zeros (the outputs start uninitialized).
        let ws = [WeightView::rows(DType::F32, 3, 0, &[]), WeightView::rows(DType::F32, 2, 0, &[])];
        assert_eq!(matmul_many(&ws, &[], 4), vec![vec![0.0; 12], vec![0.0; 8]]);
        // No tokens, or a matrix of no rows beside one with rows.
        assert_eq!(matmul_many(&ws, &[], 0), vec![Vec::<f32>::new(), Vec::new()]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let data = stored(&mut rng, DType::Q8_0, 35, 64);
        let ws = [WeightView::rows(DType::Q8_0, 0, 64, &[]), WeightView::rows(DType::Q8_0, 35, 64, &data)];
        let x: Vec<f32> = (0..3 * 64).map(|_| rng.random_range(-1.0..1.0)).collect();
        let got = matmul_multi(&ws, &[0, 0], &[(&x, 3)]);
        let mut want = vec![f32::NAN; 3 * 35];
        matmul(ws[1], &x, 3, &mut want);
        assert!(got[0].is_empty() && got[1] == want);
    }
}
