//! Row-times-vector dot products and small row-by-token tiles ("gemm") for every weight
//! format, at every SIMD level.
//!
//! Block-quantized rows dot with activations quantized to 8 bits ([`Q8Block`], one per 32
//! values); plain-float rows (F32, F16, BF16) dot with f32 activations. Each format's file has
//! a scalar version (the reference for its SIMD twins) and AVX2 / AVX-512 versions.
//!
//! **Batch invariance.** [`gemm_q8`] and [`gemm_f32`] compute many (row, token) products at once
//! so a decoded weight block is reused across tokens, but every output is computed by the same
//! sequence of operations whatever the number of rows and tokens in the call and wherever the
//! pair sits in it. A token's result is therefore bitwise the same alone, in any batch, and
//! under any prefill chunking (at a given SIMD level).

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod float;
pub mod kquants;
pub mod legacy;
pub mod nongguf;

use crate::act::Q8Block;
use crate::cpu::SimdLevel;
use crate::DType;

/// How a matrix's stored rows are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// GGML's (and every checkpoint's): row after row.
    #[default]
    Rows,
    /// Groups of 16 rows with each block's fields side by side, for the decode kernels
    /// ([`interleave`]); the formats [`interleaves`] names. BF16: [`float::tile_bf16`]'s.
    Interleaved,
}

/// Whether rows of `dtype` dot with [`Q8Block`] activations (else with f32).
pub fn uses_q8_activations(dtype: DType) -> bool {
    !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Dot of one stored row of a block-quantized format with quantized activations
/// (`act.len() * 32` values).
pub fn dot_q8(level: SimdLevel, dtype: DType, row: &[u8], act: &[Q8Block]) -> f32 {
    match dtype {
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => legacy::dot_q8(level, dtype, row, act),
        DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K => kquants::dot_q8(level, dtype, row, act),
        DType::INT8 | DType::INT4 | DType::NF4 => nongguf::dot_q8(level, dtype, row, act),
        DType::F32 | DType::F16 | DType::BF16 => panic!("{dtype} rows dot with f32 activations"),
    }
}

/// Dot of one stored row of a plain-float format with f32 activations.
pub fn dot_f32(level: SimdLevel, dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    float::dot(level, dtype, row, x)
}

/// A tile of products of a block-quantized matrix with quantized activations:
/// `out[t * ldo + r] = dot_q8(row r, token t)` for `r < nrows`, `t < ntok`.
///
/// `w` holds `nrows` stored rows of `dtype` in `layout`: consecutive rows (`w.len() / nrows`
/// bytes each), or whole 16-row groups of the interleaved layout ([`interleave`]), which gives
/// bitwise the same outputs. `act` holds `ntok` tokens' activations, token-major
/// (`act.len() / ntok` blocks each, the row's width / 32), and `sums` their
/// [`crate::act::neg_sums`] (or nothing: the legacy formats' kernels then compute the ones
/// they need per call). Each output is bitwise independent of `nrows`, `ntok` and its place in
/// the tile (see the module docs); it may differ from [`dot_q8`] in the last bits.
#[allow(clippy::too_many_arguments)]
pub fn gemm_q8(
    level: SimdLevel,
    dtype: DType,
    w: &[u8],
    nrows: usize,
    layout: Layout,
    act: &[Q8Block],
    sums: &[i32],
    ntok: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if nrows == 0 || ntok == 0 {
        return;
    }
    // The formats' own `gemm`s check an interleaved matrix's size.
    check_tile(w.len(), nrows, layout, act.len(), ntok, out.len(), ldo);
    match dtype {
        DType::Q4_0
        | DType::Q4_1
        | DType::Q5_0
        | DType::Q5_1
        | DType::Q8_0
        | DType::INT8
        | DType::INT4
        | DType::NF4 => legacy::gemm(level, dtype, w, nrows, layout, act, sums, ntok, out, ldo),
        DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K => {
            kquants::gemm(level, dtype, w, nrows, layout, act, ntok, out, ldo)
        }
        DType::F32 | DType::F16 | DType::BF16 => panic!("{dtype} rows dot with f32 activations"),
    }
}

/// The interleaved size of `nrows` rows of `dtype` matching `act_blocks` blocks per token,
/// asserted (the formats' `gemm`s over [`Layout::Interleaved`]).
pub(crate) fn check_interleaved(dtype: DType, w_len: usize, nrows: usize, act_blocks: usize) {
    assert!(interleaves(dtype), "{dtype} has no interleaved layout");
    let cols = act_blocks * 32;
    assert_eq!(w_len, interleaved_bytes(dtype, nrows, cols), "{dtype}: interleaved size of {nrows} x {cols}");
}

/// A tile of products of a plain-float matrix with f32 activations: `out[t * ldo + r] =
/// dot_f32(row r, token t)`; `x` is `ntok` tokens of the row's width, token-major. Batch
/// invariant like [`gemm_q8`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    level: SimdLevel,
    dtype: DType,
    w: &[u8],
    nrows: usize,
    x: &[f32],
    ntok: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if nrows == 0 || ntok == 0 {
        return;
    }
    check_tile(w.len(), nrows, Layout::Rows, x.len(), ntok, out.len(), ldo);
    float::gemm(level, dtype, w, nrows, x, ntok, out, ldo)
}

/// `out[at..at + live] = lanes[..live]`: a whole tile (`live == N`) as a copy of constant length,
/// which compiles to a few vector moves instead of a `memcpy` call per token (5% of a prefill).
#[inline(always)]
pub(crate) fn put<const N: usize>(out: &mut [f32], at: usize, lanes: &[f32; N], live: usize) {
    if live == N {
        out[at..at + N].copy_from_slice(lanes);
    } else {
        out[at..at + live].copy_from_slice(&lanes[..live]);
    }
}

/// `p` unchanged, but computed out of the optimizer's sight. The tiles address each token's
/// activations through such a pointer, so that a broadcast operand is the pointer plus a
/// constant: given the tokens' pointers as offsets from one base, the compiler addresses them
/// as base + index, and a micro-fused broadcast-and-multiply with an index register is split
/// in two at rename (Q4_K tiles at AVX-512 VNNI: ~15% more products per second without).
#[inline(always)]
// The block neither reads nor writes through `p`: it only claims to change the register.
#[allow(clippy::pointers_in_nomem_asm_block)]
pub(crate) fn opaque<T>(mut p: *const T) -> *const T {
    // SAFETY: an empty instruction template; it reads and writes nothing but the register.
    unsafe { std::arch::asm!("/* {0} */", inout(reg) p, options(pure, nomem, nostack, preserves_flags)) };
    p
}

/// Rows per group of the interleaved layout.
pub const GROUP_ROWS: usize = 16;

/// Whether `dtype` has kernels for the interleaved layout ([`interleave`]).
pub fn interleaves(dtype: DType) -> bool {
    segments(dtype).is_some() || dtype == DType::INT8
}

/// The fields of a block as the interleaved layout stores them: `(offset, width)` with
/// widths of 2 (an f16 scale: the 16 rows' values side by side) or a multiple of 4 (dwords: one
/// 64-byte column of the 16 rows per dword).
fn segments(dtype: DType) -> Option<&'static [(usize, usize)]> {
    Some(match dtype {
        DType::Q4_0 => &[(0, 2), (2, 16)],
        DType::Q4_1 => &[(0, 4), (4, 16)],
        DType::Q5_0 => &[(0, 2), (2, 4), (6, 16)],
        DType::Q5_1 => &[(0, 4), (4, 4), (8, 16)],
        DType::Q8_0 => &[(0, 2), (2, 32)],
        DType::INT4 => &[(0, 2), (2, 64)],
        DType::NF4 => &[(0, 2), (2, 32)],
        DType::Q4_K => &[(0, 144)],
        DType::Q5_K => &[(0, 176)],
        DType::Q6_K => &[(0, 208), (208, 2)],
        _ => return None,
    })
}

/// Bytes of a `rows` x `cols` matrix of `dtype` in the interleaved layout: whole groups of
/// [`GROUP_ROWS`] (the rows after the last one are zeros).
pub fn interleaved_bytes(dtype: DType, rows: usize, cols: usize) -> usize {
    rows.div_ceil(GROUP_ROWS) * GROUP_ROWS * dtype.row_bytes(cols).unwrap_or(0)
}

/// Where INT8's interleaved layout puts byte `k` of row `r`'s stored bytes (its f32 scale, then
/// its codes), in a matrix `cols` wide: per group of 16 rows, the 16 scales side by side (row
/// `i`'s at `4i`), then block by block of 32 codes, dword `c` of a block as a 64-byte column
/// (row `i`'s at `64c + 4i`), as the legacy formats' fields.
fn int8_packed_at(cols: usize, r: usize, k: usize) -> usize {
    let (g, i) = (r / GROUP_ROWS, r % GROUP_ROWS);
    let group = g * GROUP_ROWS * (4 + cols);
    match k.checked_sub(4) {
        None => group + 4 * i + k,
        Some(q) => group + 4 * GROUP_ROWS + q / 32 * 32 * GROUP_ROWS + (q % 32) / 4 * 64 + 4 * i + q % 4,
    }
}

/// The bytes of `out`, written by several threads at once, each its own disjoint part.
pub(crate) struct SharedBytes(pub(crate) *mut u8);

// SAFETY: each range of the split writes only its own groups' bytes, while `out` is borrowed by
// the function running the split.
unsafe impl Sync for SharedBytes {}

/// Copies group blocks between the two layouts, split across threads: `pack` reads rows from
/// `src` and writes interleaved blocks to `dst`, otherwise the other way round. Dword fields move
/// four bytes at a time, f16 fields two; fifth bits are reordered on the way ([`spread_fifth_bits`]).
fn shuffle(dtype: DType, rows: usize, cols: usize, src: &[u8], dst: &mut [u8], pack: bool) {
    if dtype == DType::INT8 {
        let rb = 4 + cols;
        let (rows_len, packed_len) = (rows * rb, interleaved_bytes(dtype, rows, cols));
        let (src_len, dst_len) = if pack { (rows_len, packed_len) } else { (packed_len, rows_len) };
        assert!(src.len() == src_len && dst.len() == dst_len, "{dtype}: {rows} x {cols} in the wrong sizes");
        // Dword by dword (one thread: a single pass over a matrix that is quantized at load).
        for r in 0..rows {
            for k in (0..rb).step_by(4) {
                let at = int8_packed_at(cols, r, k);
                let (from, to) = if pack { (r * rb + k, at) } else { (at, r * rb + k) };
                dst[to..to + 4].copy_from_slice(&src[from..from + 4]);
            }
        }
        return;
    }
    let (bb, blocks) = (dtype.block_bytes(), cols / dtype.block_elems());
    let rb = blocks * bb;
    let fields = segments(dtype).unwrap_or_else(|| panic!("{dtype} has no interleaved layout"));
    let (rows_len, packed_len) = (rows * rb, interleaved_bytes(dtype, rows, cols));
    let (src_len, dst_len) = if pack { (rows_len, packed_len) } else { (packed_len, rows_len) };
    assert!(src.len() == src_len && dst.len() == dst_len, "{dtype}: {rows} x {cols} in the wrong sizes");
    let out = SharedBytes(dst.as_mut_ptr());
    let out = &out;
    let n = rows.div_ceil(GROUP_ROWS) * blocks;
    crate::parallel::for_each_range(n, n * GROUP_ROWS * bb, |g0, g1| {
        for g in g0..g1 {
            let (r, b) = (g / blocks * GROUP_ROWS, g % blocks);
            let group = g * GROUP_ROWS * bb;
            // Q6_K's quants are re-encoded on the way in, restored on the way out.
            let mut recoded = [0u8; 210];
            for i in 0..GROUP_ROWS.min(rows - r) {
                let row = (r + i) * rb + b * bb;
                // Packing reads the row's block from `src`, or re-encoded from `recoded`.
                let (from_bytes, from_row) = if pack && dtype == DType::Q6_K {
                    recoded.copy_from_slice(&src[row..row + bb]);
                    recode_q6k(&mut recoded);
                    (&recoded[..], 0)
                } else {
                    (src, row)
                };
                for &(o, w) in fields {
                    let unit = if w == 2 { 2 } else { 4 };
                    for k in (0..w).step_by(unit) {
                        let at = group + packed_offset(o, w, k, i);
                        let (from, to) = if pack { (from_row + o + k, at) } else { (at, row + o + k) };
                        if Some(o) == fifth_bits_at(dtype) {
                            let x = u32::from_le_bytes([
                                from_bytes[from],
                                from_bytes[from + 1],
                                from_bytes[from + 2],
                                from_bytes[from + 3],
                            ]);
                            let y = if pack { spread_fifth_bits(x) } else { gather_fifth_bits(x) }.to_le_bytes();
                            // SAFETY: as the copy below.
                            unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), out.0.add(to), 4) };
                            continue;
                        }
                        // SAFETY: `from + unit` lies in `from_bytes` and `to + unit` in `dst`
                        // (both sizes were asserted against the layouts above); `to` lies in this
                        // range's groups (packing) or their rows (unpacking), which no other range
                        // writes.
                        unsafe { std::ptr::copy_nonoverlapping(from_bytes.as_ptr().add(from), out.0.add(to), unit) };
                    }
                }
                if !pack && dtype == DType::Q6_K {
                    // SAFETY: the row's block lies in `dst` and in this range's rows (as above).
                    restore_q6k(unsafe { std::slice::from_raw_parts_mut(out.0.add(row), bb) });
                }
            }
        }
    });
}

/// Where bytes `k..` of field `(o, w)` (see `segments`) of row `i`'s block lie in its group's
/// interleaved block: an f16 field's 16 values side by side, a dword field's dword `k / 4` as a
/// 64-byte column.
fn packed_offset(o: usize, w: usize, k: usize, i: usize) -> usize {
    if w == 2 {
        GROUP_ROWS * o + 2 * i
    } else {
        GROUP_ROWS * o + 16 * k + 4 * i
    }
}

/// A row-major matrix (`rows` rows of `cols` in GGML's layout) rearranged for the decode
/// kernels: groups of 16 rows, and within a group block by block, each block's fields
/// (see `segments`) side by side for the 16 rows: dword `c` of a field at bytes `64c + 4i` (row
/// `i`), an f16 scale at `2i`. A kernel then loads a column (one dword of 16 rows) with one
/// instruction instead of transposing rows on every call, as llama.cpp's and ik_llama.cpp's
/// repacked formats do; products are bitwise the same as from the rows, and the size is the
/// same but for the zero rows that complete the last group. INT8 keeps each group's 16 row
/// scales (f32) side by side ahead of its blocks of 32 codes; Q6_K's quants are re-encoded
/// ([`recode_q6k`]), Q5_0's and Q5_1's fifth bits reordered ([`spread_fifth_bits`]).
pub fn interleave(dtype: DType, rows: usize, cols: usize, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; interleaved_bytes(dtype, rows, cols)];
    interleave_into(dtype, rows, cols, data, &mut out);
    out
}

/// [`interleave`] into `out`, which has [`interleaved_bytes`] zero bytes (such as a
/// [`crate::huge::HugeArena`] buffer: decode streams these matrices).
pub fn interleave_into(dtype: DType, rows: usize, cols: usize, data: &[u8], out: &mut [u8]) {
    let rb = dtype.row_bytes(cols).unwrap_or(0);
    assert_eq!(data.len(), rows * rb, "{dtype}: {} bytes are not {rows} rows of {cols}", data.len());
    assert_eq!(out.len(), interleaved_bytes(dtype, rows, cols), "{dtype}: interleaved size of {rows} x {cols}");
    shuffle(dtype, rows, cols, data, out, true);
}

/// The rows of an [`interleave`]d matrix, in GGML's layout again.
pub fn deinterleave(dtype: DType, rows: usize, cols: usize, data: &[u8]) -> Vec<u8> {
    let rb = dtype.row_bytes(cols).unwrap_or(0);
    assert_eq!(data.len(), interleaved_bytes(dtype, rows, cols), "{dtype}: interleaved size of {rows} x {cols}");
    let mut out = vec![0u8; rows * rb];
    shuffle(dtype, rows, cols, data, &mut out, false);
    out
}

/// Block `b` of row `r` of an [`interleave`]d matrix `cols` wide, in GGML's layout, into `out`
/// (one block's bytes): what a lookup of one row (an embedding shared with a repacked LM head)
/// reads, block by block, without restoring the matrix.
///
/// INT8, whose scale is the row's: `out` holds the block as a one-block row (the scale, then the
/// 32 codes: 36 bytes), what [`crate::quant::dequantize_row`] reads.
pub fn interleaved_block(dtype: DType, cols: usize, data: &[u8], r: usize, b: usize, out: &mut [u8]) {
    if dtype == DType::INT8 {
        assert_eq!(out.len(), 36, "{dtype}: a block with its row's scale is 36 bytes");
        assert!(b < cols / 32, "block {b} of a row of {}", cols / 32);
        assert!(int8_packed_at(cols, r | (GROUP_ROWS - 1), 4 + cols - 1) < data.len(), "row {r} is past the matrix");
        for k in (0..36).step_by(4) {
            let at = int8_packed_at(cols, r, if k < 4 { k } else { 32 * b + k });
            out[k..k + 4].copy_from_slice(&data[at..at + 4]);
        }
        return;
    }
    let (bb, blocks) = (dtype.block_bytes(), cols / dtype.block_elems());
    let fields = segments(dtype).unwrap_or_else(|| panic!("{dtype} has no interleaved layout"));
    assert_eq!(out.len(), bb, "{dtype}: a block is {bb} bytes");
    assert!(b < blocks, "block {b} of a row of {blocks}");
    let (g, i) = (r / GROUP_ROWS, r % GROUP_ROWS);
    let group = (g * blocks + b) * GROUP_ROWS * bb;
    assert!(group + GROUP_ROWS * bb <= data.len(), "row {r} is past the interleaved matrix");
    for &(o, w) in fields {
        let unit = if w == 2 { 2 } else { 4 };
        for k in (0..w).step_by(unit) {
            let at = group + packed_offset(o, w, k, i);
            out[o + k..o + k + unit].copy_from_slice(&data[at..at + unit]);
        }
        if Some(o) == fifth_bits_at(dtype) {
            let x = u32::from_le_bytes([out[o], out[o + 1], out[o + 2], out[o + 3]]);
            out[o..o + 4].copy_from_slice(&gather_fifth_bits(x).to_le_bytes());
        }
    }
    if dtype == DType::Q6_K {
        restore_q6k(out);
    }
}

/// Where the fifth bits of a Q5_0 / Q5_1 block start. The interleaved layout stores them
/// [`spread_fifth_bits`]: there the bit of quant `4g + k` is bit `g` of byte `k`, the byte that
/// holds that quant's nibble in the kernels' group `g`, so one shift per group puts every
/// fifth bit in place (GGML's order needs a byte shuffle, a test and a compare per group:
/// Q5_0 one-token tiles at AVX2 took 173 instead of 201 ns per row of 4864 columns).
fn fifth_bits_at(dtype: DType) -> Option<usize> {
    match dtype {
        DType::Q5_0 => Some(2),
        DType::Q5_1 => Some(4),
        _ => None,
    }
}

/// Q6_K's quants as the interleaved layout stores them. GGML keeps weight `128h + 32k + l`'s low
/// four bits in a nibble of `ql[64h + 32(k % 2) + l]` and its top two at bit `2k` of
/// `qh[32h + l]`, so every weight takes four or five operations to rebuild. Here the same three
/// bytes hold, for the four weights `w_k` (6 bits each) of `(h, l)`:
/// `ql[64h + l] = w_0 | (w_2 >> 4) << 6`, `ql[64h + 32 + l] = w_1 | (w_3 >> 4) << 6`,
/// `qh[32h + l] = (w_2 & 15) | (w_3 & 15) << 4`: `w_0`, `w_1` are one mask away, `w_2`, `w_3` four
/// or five operations (2.75 per weight instead of 4.25). Scales and `d` are unchanged.
pub(crate) fn recode_q6k(block: &mut [u8]) {
    map_q6k_trios(block, |x, y, z| {
        let w = [x & 15 | (z & 3) << 4, y & 15 | (z >> 2 & 3) << 4, x >> 4 | (z >> 4 & 3) << 4, y >> 4 | (z >> 6) << 4];
        (w[0] | (w[2] >> 4) << 6, w[1] | (w[3] >> 4) << 6, w[2] & 15 | (w[3] & 15) << 4)
    });
}

/// The inverse of [`recode_q6k`]: GGML's bytes again.
pub(crate) fn restore_q6k(block: &mut [u8]) {
    map_q6k_trios(block, |x, y, z| {
        let w = [x & 63, y & 63, z & 15 | (x >> 6) << 4, z >> 4 | (y >> 6) << 4];
        (
            w[0] & 15 | (w[2] & 15) << 4,
            w[1] & 15 | (w[3] & 15) << 4,
            w[0] >> 4 | (w[1] >> 4) << 2 | (w[2] >> 4) << 4 | (w[3] >> 4) << 6,
        )
    });
}

/// Replaces each byte trio `(ql[64h + l], ql[64h + 32 + l], qh[32h + l])` of a Q6_K block (the
/// four weights `128h + 32k + l`) by `f` of it.
fn map_q6k_trios(block: &mut [u8], f: impl Fn(u8, u8, u8) -> (u8, u8, u8)) {
    for h in 0..2 {
        for l in 0..32 {
            let (a, b, c) = (64 * h + l, 64 * h + 32 + l, 128 + 32 * h + l);
            (block[a], block[b], block[c]) = f(block[a], block[b], block[c]);
        }
    }
}

/// GGML's fifth bits (bit `j` of quant `j`) to the interleaved order: bit `4m + k` moves to bit
/// `8k + m` (a transpose of the 8 x 4 bit matrix).
pub(crate) fn spread_fifth_bits(x: u32) -> u32 {
    // Nibble `m` (bits 4m..4m+4) goes to bit m of bytes 0..3: times 0x00204081, bit k of the
    // nibble lands at 8k (the other products fall off the byte boundaries the mask keeps).
    (0..8).fold(0, |y, m| y | ((((x >> (4 * m)) & 0xF) * 0x0020_4081) & 0x0101_0101) << m)
}

/// The inverse of [`spread_fifth_bits`].
pub(crate) fn gather_fifth_bits(y: u32) -> u32 {
    // Bit m of bytes 0..3 to nibble m: times 0x01020408, the bit of byte k lands at 24 + k (the
    // 16 products all land on different bits, so nothing carries).
    (0..8).fold(0, |x, m| x | (((u64::from(y >> m & 0x0101_0101) * 0x0102_0408) >> 24 & 0xF) as u32) << (4 * m))
}

fn check_tile(w_len: usize, nrows: usize, layout: Layout, act_len: usize, ntok: usize, out_len: usize, ldo: usize) {
    if layout == Layout::Rows {
        assert!(w_len.is_multiple_of(nrows), "{w_len} weight bytes are not {nrows} equal rows");
    }
    assert!(act_len.is_multiple_of(ntok), "{act_len} activations are not {ntok} equal tokens");
    assert!(ldo >= nrows, "output stride {ldo} is shorter than {nrows} rows");
    assert!(out_len >= (ntok - 1) * ldo + nrows, "output of {out_len} cannot hold {ntok} x {nrows} at stride {ldo}");
}

/// The simplest batch-invariant tile: one [`dot_q8`] per (row, token). Formats without a tiled
/// kernel use it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_q8_by_dots(
    level: SimdLevel,
    dtype: DType,
    w: &[u8],
    nrows: usize,
    act: &[Q8Block],
    ntok: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let rb = w.len() / nrows;
    let nb = act.len() / ntok;
    for r in 0..nrows {
        let row = &w[r * rb..(r + 1) * rb];
        for t in 0..ntok {
            out[t * ldo + r] = dot_q8(level, dtype, row, &act[t * nb..(t + 1) * nb]);
        }
    }
}

/// Token counts a kernel benchmark runs: `PIO_BENCH_TOKENS` (comma-separated), else `default`.
#[cfg(test)]
pub(crate) fn bench_tokens(default: &[usize]) -> Vec<usize> {
    std::env::var("PIO_BENCH_TOKENS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifth_bits_spread_and_gather() {
        for x in [0u32, 1, 0x8000_0000, 0xFFFF_FFFF, 0x1234_5678, 0xDEAD_BEEF, 0x0F0F_0F0F] {
            let y = spread_fifth_bits(x);
            assert_eq!(gather_fifth_bits(y), x, "{x:#x}");
            assert_eq!(y.count_ones(), x.count_ones());
            for j in 0..32 {
                assert_eq!(x >> j & 1, y >> (8 * (j % 4) + j / 4) & 1, "{x:#x} bit {j}");
            }
        }
    }

    #[test]
    fn recoded_q6k_holds_each_weight_where_the_kernels_read_it() {
        // 6-bit quants in GGML's Q6_K layout, then re-encoded.
        let q: Vec<u8> = (0..256).map(|i| ((i * 37 + 11) % 64) as u8).collect();
        let mut block = [0u8; 210];
        for (i, &q) in q.iter().enumerate() {
            let (h, k, l) = (i / 128, i % 128 / 32, i % 32);
            block[64 * h + 32 * (k % 2) + l] |= (q & 15) << (4 * (k / 2));
            block[128 + 32 * h + l] |= (q >> 4) << (2 * k);
        }
        let ggml = block;
        recode_q6k(&mut block);
        for (i, &q) in q.iter().enumerate() {
            let (h, k, l) = (i / 128, i % 128 / 32, i % 32);
            let (x, c) = (block[64 * h + 32 * (k % 2) + l], block[128 + 32 * h + l]);
            let got = if k < 2 { x & 63 } else { (c >> (4 * (k - 2))) & 15 | (x >> 6) << 4 };
            assert_eq!(got, q, "weight {i}");
        }
        restore_q6k(&mut block);
        assert_eq!(block, ggml);
    }

    #[test]
    fn interleaved_rows_are_the_rows() {
        let formats: Vec<DType> = DType::ALL.into_iter().filter(|&d| interleaves(d)).collect();
        assert_eq!(formats.len(), 11, "{formats:?}");
        for dtype in formats {
            let (rows, cols) = (37, 512);
            let rb = dtype.row_bytes(cols).unwrap_or(0);
            // Arbitrary bytes: the layout moves bytes and recodes bits, and never reads them as
            // numbers.
            let data: Vec<u8> = (0..rows * rb).map(|i| (i * 131 % 251) as u8).collect();
            let packed = interleave(dtype, rows, cols, &data);
            assert_eq!(deinterleave(dtype, rows, cols, &packed), data, "{dtype}");
            // A block as a one-block row (INT8: with its row's scale first).
            let (be, pre) = (dtype.block_elems(), dtype.row_prefix_bytes());
            let bb = dtype.row_bytes(be).unwrap_or(0);
            let mut block = vec![0u8; bb];
            for r in 0..rows {
                for b in 0..cols / be {
                    interleaved_block(dtype, cols, &packed, r, b, &mut block);
                    let row = &data[r * rb..(r + 1) * rb];
                    let want = [&row[..pre], &row[pre + b * (bb - pre)..pre + (b + 1) * (bb - pre)]].concat();
                    assert_eq!(block, want, "{dtype} row {r} block {b}");
                }
            }
        }
    }
}
