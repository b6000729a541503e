//! Scalar reference for every storage format: decoding, encoding, and a row-times-vector dot.
//!
//! The block formats are GGML/GGUF's, byte for byte: all multi-byte fields are little-endian and
//! every `f16` is an IEEE half. Decoding follows llama.cpp's `dequantize_row_*` exactly, including
//! the order of float operations, so a tensor read from a GGUF file decodes to the same f32 values
//! llama.cpp would produce. Encoding is a plain, deterministic quantizer: the legacy 32-element
//! formats match llama.cpp's `quantize_row_*_ref` byte for byte; the K formats fit each
//! sub-block's scale (and min) from its min and max, quantize those to the format's 4/6/8 bits,
//! then choose every weight's quant against the *quantized* scales (no importance weighting and
//! no scale search, so they are a little less accurate than llama.cpp's K quantizers).
//!
//! INT8, INT4 and NF4 are not GGUF formats (see [`DType`] for their layouts); their encoders are
//! the plain absmax ones: INT8 and INT4 as Q8_0 and Q4_0 are (over a row and over 128 weights),
//! NF4 as bitsandbytes' `quantize_4bit` is (nearest codebook value of `x / absmax`).
//!
//! Nothing here is fast; SIMD kernels are tested against these functions.
//!
//! Layout notes shared by several formats:
//! - In the 32-element formats, byte `j` of `qs` holds element `j` in its low nibble and element
//!   `j + 16` in its high nibble.
//! - In Q4_K/Q5_K, each run of 32 `qs` bytes covers 64 elements: low nibbles are the first 32,
//!   high nibbles the next 32.
//! - In Q2_K/Q3_K, each run of 32 `qs` bytes covers 128 elements: bit pair `2s` of byte `l`
//!   holds element `32s + l`.

use half::{bf16, f16};

use crate::DType;

/// Weights per K-format super-block.
const QK_K: usize = 256;

/// Decodes `dst.len()` weights stored as `dtype` in `src` into `dst`.
///
/// `src` must hold exactly `dtype.row_bytes(dst.len())` bytes; anything else is a programming
/// error and panics.
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        dtype.row_bytes(dst.len()),
        Some(src.len()),
        "{dtype}: {} bytes do not hold {} weights",
        src.len(),
        dst.len()
    );
    match dtype {
        DType::F32 => {
            for (y, b) in dst.iter_mut().zip(src.as_chunks::<4>().0) {
                *y = f32::from_le_bytes(*b);
            }
        }
        DType::F16 => {
            for (y, b) in dst.iter_mut().zip(src.as_chunks::<2>().0) {
                *y = f16::from_le_bytes(*b).to_f32();
            }
        }
        DType::BF16 => {
            for (y, b) in dst.iter_mut().zip(src.as_chunks::<2>().0) {
                *y = bf16::from_le_bytes(*b).to_f32();
            }
        }
        DType::Q4_0 => decode_blocks(src, dst, dequant_q4_0),
        DType::Q4_1 => decode_blocks(src, dst, dequant_q4_1),
        DType::Q5_0 => decode_blocks(src, dst, dequant_q5_0),
        DType::Q5_1 => decode_blocks(src, dst, dequant_q5_1),
        DType::Q8_0 => decode_blocks(src, dst, dequant_q8_0),
        DType::Q2_K => decode_blocks(src, dst, dequant_q2_k),
        DType::Q3_K => decode_blocks(src, dst, dequant_q3_k),
        DType::Q4_K => decode_blocks(src, dst, dequant_q4_k),
        DType::Q5_K => decode_blocks(src, dst, dequant_q5_k),
        DType::Q6_K => decode_blocks(src, dst, dequant_q6_k),
        DType::INT8 => dequant_int8(src, dst),
        DType::INT4 => decode_blocks(src, dst, dequant_int4),
        DType::NF4 => decode_blocks(src, dst, dequant_nf4),
    }
}

/// Encodes `src` as `dtype` into `dst`.
///
/// `dst` must hold exactly `dtype.row_bytes(src.len())` bytes; anything else panics. Plain floats
/// are rounded to nearest, ties to even.
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) {
    assert_eq!(
        dtype.row_bytes(src.len()),
        Some(dst.len()),
        "{dtype}: {} bytes do not hold {} weights",
        dst.len(),
        src.len()
    );
    match dtype {
        DType::F32 => {
            for (b, x) in dst.as_chunks_mut::<4>().0.iter_mut().zip(src) {
                *b = x.to_le_bytes();
            }
        }
        DType::F16 => {
            for (b, x) in dst.as_chunks_mut::<2>().0.iter_mut().zip(src) {
                *b = f16::from_f32(*x).to_le_bytes();
            }
        }
        DType::BF16 => {
            for (b, x) in dst.as_chunks_mut::<2>().0.iter_mut().zip(src) {
                *b = bf16::from_f32(*x).to_le_bytes();
            }
        }
        DType::Q4_0 => encode_blocks(src, dst, quant_q4_0),
        DType::Q4_1 => encode_blocks(src, dst, quant_q4_1),
        DType::Q5_0 => encode_blocks(src, dst, quant_q5_0),
        DType::Q5_1 => encode_blocks(src, dst, quant_q5_1),
        DType::Q8_0 => encode_blocks(src, dst, quant_q8_0),
        DType::Q2_K => encode_blocks(src, dst, quant_q2_k),
        DType::Q3_K => encode_blocks(src, dst, quant_q3_k),
        DType::Q4_K => encode_blocks(src, dst, quant_q4_k),
        DType::Q5_K => encode_blocks(src, dst, quant_q5_k),
        DType::Q6_K => encode_blocks(src, dst, quant_q6_k),
        DType::INT8 => quant_int8(src, dst),
        DType::INT4 => encode_blocks(src, dst, quant_int4),
        DType::NF4 => encode_blocks(src, dst, quant_nf4),
    }
}

/// The `n` weights stored as `dtype` in `src`, decoded into a new vector.
///
/// `src` must hold exactly `dtype.row_bytes(n)` bytes.
pub fn dequantize(dtype: DType, src: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_row(dtype, src, &mut out);
    out
}

/// Weights decoded per step of [`dot_row`]: one K super-block, or eight 32-element blocks.
const DOT_CHUNK: usize = QK_K;

/// Dot product of one stored row (`x.len()` weights as `dtype`) with `x`.
///
/// Decodes a chunk at a time into a stack buffer and accumulates in eight f32 partial sums.
pub fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(
        dtype.row_bytes(x.len()),
        Some(row.len()),
        "{dtype}: {} bytes do not hold {} weights",
        row.len(),
        x.len()
    );
    if dtype == DType::INT8 {
        // One scale for the whole row: no chunks to decode.
        return dot_int8(row, x);
    }
    // A chunk is a whole number of blocks for every other format, so only the last may be
    // shorter, and then it is still whole blocks.
    let chunk_bytes = dtype.row_bytes(DOT_CHUNK).expect("DOT_CHUNK is whole blocks");
    let mut buf = [0f32; DOT_CHUNK];
    let mut acc = [0f32; 8];
    let mut tail = 0f32;
    for (xs, bytes) in x.chunks(DOT_CHUNK).zip(row.chunks(chunk_bytes)) {
        let w = &mut buf[..xs.len()];
        dequantize_row(dtype, bytes, w);
        let (w8, wr) = w.as_chunks::<8>();
        let (x8, xr) = xs.as_chunks::<8>();
        for (a, b) in w8.iter().zip(x8) {
            for k in 0..8 {
                acc[k] += a[k] * b[k];
            }
        }
        for (a, b) in wr.iter().zip(xr) {
            tail += a * b;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// INT8's row dot: its scale times the dot of its quants with `x` (eight partial sums).
fn dot_int8(row: &[u8], x: &[f32]) -> f32 {
    let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
    let mut acc = [0f32; 8];
    // Rows are multiples of 32 weights, so there is no remainder.
    for (q, xs) in row[4..].as_chunks::<8>().0.iter().zip(x.as_chunks::<8>().0) {
        for k in 0..8 {
            acc[k] += (q[k] as i8) as f32 * xs[k];
        }
    }
    (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) * s
}

/// Runs `f` on each `BB`-byte block of `src` and its `BE` weights in `dst`.
fn decode_blocks<const BB: usize, const BE: usize>(src: &[u8], dst: &mut [f32], f: fn(&[u8; BB], &mut [f32; BE])) {
    let (blocks, rest) = src.as_chunks::<BB>();
    let (outs, out_rest) = dst.as_chunks_mut::<BE>();
    assert!(rest.is_empty() && out_rest.is_empty() && blocks.len() == outs.len());
    for (b, y) in blocks.iter().zip(outs) {
        f(b, y);
    }
}

/// Runs `f` on each `BE` weights of `src` and its `BB`-byte block in `dst`.
fn encode_blocks<const BB: usize, const BE: usize>(src: &[f32], dst: &mut [u8], f: fn(&[f32; BE], &mut [u8; BB])) {
    let (xs, rest) = src.as_chunks::<BE>();
    let (blocks, block_rest) = dst.as_chunks_mut::<BB>();
    assert!(rest.is_empty() && block_rest.is_empty() && xs.len() == blocks.len());
    for (x, b) in xs.iter().zip(blocks) {
        f(x, b);
    }
}

fn read_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn write_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// `v` rounded to the nearest integer, ties to even (llama.cpp's `nearest_int`).
fn nearest(v: f32) -> i32 {
    v.round_ties_even() as i32
}

// ---------------------------------------------------------------------------------------------
// 32-element formats
// ---------------------------------------------------------------------------------------------

/// Q4_0, 18 bytes: `d: f16`, `qs: [u8; 16]` (4-bit q, element j low / j+16 high); w = d*(q-8).
fn dequant_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = read_f16(b, 0);
    for (j, &q) in b[2..].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1, 20 bytes: `d: f16`, `m: f16`, `qs: [u8; 16]` (as Q4_0); w = d*q + m.
fn dequant_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = read_f16(b, 0);
    let m = read_f16(b, 2);
    for (j, &q) in b[4..].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0, 22 bytes: `d: f16`, `qh: u32` (bit i = 5th bit of element i), `qs: [u8; 16]` (low
/// nibbles as Q4_0); w = d*(q-16).
fn dequant_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = read_f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1, 24 bytes: `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]` (as Q5_0); w = d*q + m.
fn dequant_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = read_f16(b, 0);
    let m = read_f16(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((q & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// Q8_0, 34 bytes: `d: f16`, `qs: [i8; 32]`; w = d*q.
fn dequant_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = read_f16(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..]) {
        *y = (q as i8) as f32 * d;
    }
}

/// The signed value with the largest magnitude in `x` (the first one on ties), or 0.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Q4_0 encoder: the largest-magnitude weight maps to q = 0 (d = max / -8).
fn quant_q4_0(x: &[f32; 32], b: &mut [u8; 18]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    for j in 0..16 {
        let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = lo | (hi << 4);
    }
}

/// Q4_1 encoder: m = min, d = (max - min) / 15.
fn quant_q4_1(x: &[f32; 32], b: &mut [u8; 20]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    write_f16(b, 2, min);
    for j in 0..16 {
        let lo = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let hi = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        b[4 + j] = lo | (hi << 4);
    }
}

/// Q5_0 encoder: the largest-magnitude weight maps to q = 0 (d = max / -16).
fn quant_q5_0(x: &[f32; 32], b: &mut [u8; 22]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let lo = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let hi = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        b[6 + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
        qh |= ((lo as u32 >> 4) & 1) << j;
        qh |= ((hi as u32 >> 4) & 1) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// Q5_1 encoder: m = min, d = (max - min) / 31.
fn quant_q5_1(x: &[f32; 32], b: &mut [u8; 24]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    write_f16(b, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        let lo = (((x[j] - min) * id + 0.5) as u8).min(31);
        let hi = (((x[j + 16] - min) * id + 0.5) as u8).min(31);
        b[8 + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
        qh |= ((lo as u32 >> 4) & 1) << j;
        qh |= ((hi as u32 >> 4) & 1) << (j + 16);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// Q8_0 encoder: d = absmax / 127, q = round(x / d) (half away from zero).
fn quant_q8_0(x: &[f32; 32], b: &mut [u8; 34]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    for (q, &v) in b[2..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

// ---------------------------------------------------------------------------------------------
// K formats (256-element super-blocks)
// ---------------------------------------------------------------------------------------------

/// Q2_K, 84 bytes: `scales: [u8; 16]` (low nibble: scale, high: min, one per 16 weights),
/// `qs: [u8; 64]` (2-bit q), `d: f16`, `dmin: f16`; w = d*sc*q - dmin*m.
fn dequant_q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = read_f16(b, 80);
    let dmin = read_f16(b, 82);
    for (e, y) in y.iter_mut().enumerate() {
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        let q = (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
        *y = dl * q as f32 - ml;
    }
}

/// The 16 signed 6-bit Q3_K scales from their 12 packed bytes: scale j has its low nibble in
/// byte `j % 8` (low nibble for j < 8, high for j >= 8) and its top two bits in byte
/// `8 + j % 4` at bit `2 * (j / 4)`; stored with a +32 bias.
fn unpack_q3_k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = ((low | (high << 4)) as i8) - 32;
    }
    out
}

/// Inverse of [`unpack_q3_k_scales`]; each scale must lie in -32..=31.
fn pack_q3_k_scales(scales: &[i8; 16], s: &mut [u8]) {
    s[..12].fill(0);
    for (j, &sc) in scales.iter().enumerate() {
        let l = (sc as i32 + 32) as u8;
        if j < 8 {
            s[j] |= l & 0x0F;
        } else {
            s[j - 8] |= (l & 0x0F) << 4;
        }
        s[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
    }
}

/// Q3_K, 110 bytes: `hmask: [u8; 32]` (bit e/32 of byte e%32 is element e's high bit h),
/// `qs: [u8; 64]` (low 2 bits q, as Q2_K), `scales: [u8; 12]` (16 6-bit, +32 bias), `d: f16`;
/// w = d*sc*(q - if h {0} else {4}).
fn dequant_q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = unpack_q3_k_scales(&b[96..108]);
    let d_all = read_f16(b, 108);
    for (e, y) in y.iter_mut().enumerate() {
        let dl = d_all * scales[e / 16] as f32;
        let low = ((qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3) as i32;
        let high_set = hmask[e % 32] & (1 << (e / 32)) != 0;
        let q = low - if high_set { 0 } else { 4 };
        *y = dl * q as f32;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K `scales` field: for j < 4 the
/// low 6 bits of bytes j and j+4; for j >= 4 the nibbles of byte j+4 plus the top two bits of
/// bytes j-4 (scale) and j (min).
fn k4_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Inverse of [`k4_scale_min`] for all eight sub-blocks; values must be below 64.
fn pack_k4_scale_min(scales: &[u8; 8], mins: &[u8; 8], s: &mut [u8]) {
    s[..12].fill(0);
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            s[j] |= ls;
            s[j + 4] |= lm;
        } else {
            s[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
}

/// Q4_K, 144 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]` (8 6-bit scales and mins),
/// `qs: [u8; 128]` (4-bit q; 32 bytes per 64 weights, low nibbles first); w = d*sc*q - dmin*m.
fn dequant_q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = read_f16(b, 0);
    let dmin = read_f16(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (sub, ys) in y.as_chunks_mut::<32>().0.iter_mut().enumerate() {
        let (sc, m) = k4_scale_min(sub, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let shift = 4 * (sub % 2);
        for (y, &q) in ys.iter_mut().zip(bytes) {
            *y = d1 * ((q >> shift) & 0x0F) as f32 - m1;
        }
    }
}

/// Q5_K, 176 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]` (as Q4_K), `qh: [u8; 32]` (bit
/// e/32 of byte e%32 is element e's 5th bit), `qs: [u8; 128]` (as Q4_K); w = d*sc*q - dmin*m.
fn dequant_q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = read_f16(b, 0);
    let dmin = read_f16(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (sub, ys) in y.as_chunks_mut::<32>().0.iter_mut().enumerate() {
        let (sc, m) = k4_scale_min(sub, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let shift = 4 * (sub % 2);
        for ((y, &q), &h) in ys.iter_mut().zip(bytes).zip(qh) {
            let high = if h & (1 << sub) != 0 { 16 } else { 0 };
            *y = d1 * (((q >> shift) & 0x0F) + high) as f32 - m1;
        }
    }
}

/// Q6_K, 210 bytes: `ql: [u8; 128]` (low 4 bits), `qh: [u8; 64]` (high 2 bits),
/// `scales: [i8; 16]` (one per 16 weights), `d: f16`; w = d*sc*(q - 32). Per 128 weights, 64 ql
/// bytes and 32 qh bytes: element 32k + l has its low bits in ql[l + 32*(k%2)] (low nibble for
/// k < 2) and its high bits at bit 2k of qh[l].
fn dequant_q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = read_f16(b, 208);
    for (e, y) in y.iter_mut().enumerate() {
        let (half, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let low = (ql[64 * half + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
        let high = (qh[32 * half + l] >> (2 * k)) & 3;
        let q = (low | (high << 4)) as i32 - 32;
        *y = d * (scales[e / 16] as i8) as f32 * q as f32;
    }
}

/// A sub-block fitted as `w = scale * q - min` with q in 0..=nmax and min >= 0 (the range is
/// widened to include zero, as llama.cpp does). Returns `(scale, min)`.
fn fit_min_max(x: &[f32], nmax: f32) -> (f32, f32) {
    let (lo, hi) = min_max(x);
    let lo = lo.min(0.0);
    ((hi - lo) / nmax, -lo)
}

/// The signed scale `s` of smallest magnitude with every `x / s` in -nneg..=npos: the sign is
/// chosen so the longer side of the quant range (-nneg) covers the longer side of the data.
fn fit_symmetric(x: &[f32], nneg: f32, npos: f32) -> f32 {
    let (lo, hi) = min_max(x);
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let positive = (-lo / nneg).max(hi / npos);
    let negative = (hi / nneg).max(-lo / npos);
    if positive <= negative {
        positive
    } else {
        -negative
    }
}

/// `v` as an f16 no smaller in magnitude than `v` (so a block scale rounded to f16 never forces
/// the largest sub-block scale past its code range), returned as f32.
fn f16_not_smaller(v: f32) -> f32 {
    let h = f16::from_f32(v);
    if h.to_f32().abs() < v.abs() && h.is_finite() {
        f16::from_bits(h.to_bits() + 1).to_f32()
    } else {
        h.to_f32()
    }
}

/// Quantizes non-negative `values` to 0..=nmax against a common step `max / nmax`; returns the
/// step as stored (f16-rounded) and the quantized values.
fn quantize_scales<const N: usize>(values: &[f32; N], nmax: u8) -> (f32, [u8; N]) {
    let max = values.iter().fold(0f32, |a, &v| a.max(v));
    let step = f16_not_smaller(max / nmax as f32);
    let inv = inverse_or_zero(step);
    let mut q = [0u8; N];
    for (q, &v) in q.iter_mut().zip(values) {
        *q = nearest(v * inv).clamp(0, nmax as i32) as u8;
    }
    (step, q)
}

/// Quantizes `x` (one sub-block) to 0..=nmax as `d*q - m`, against already quantized d and m.
fn quants_with_min(x: &[f32], d: f32, m: f32, nmax: i32, out: &mut [u8]) {
    let id = inverse_or_zero(d);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = nearest((v + m) * id).clamp(0, nmax) as u8;
    }
}

/// Quantizes `x` (one sub-block) to -nneg..=npos as `d*q`, against an already quantized d.
fn quants_symmetric(x: &[f32], d: f32, nneg: i32, npos: i32, out: &mut [i8]) {
    let id = inverse_or_zero(d);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = nearest(v * id).clamp(-nneg, npos) as i8;
    }
}

/// Sub-block scales, mins and quants shared by the Q4_K and Q5_K encoders: returns d, dmin, the
/// 6-bit scales and mins, and each weight's quant in 0..=nmax.
fn fit_k4(x: &[f32; 256], nmax: u8) -> (f32, f32, [u8; 8], [u8; 8], [u8; 256]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (sub, xs) in x.as_chunks::<32>().0.iter().enumerate() {
        (scales[sub], mins[sub]) = fit_min_max(xs, nmax as f32);
    }
    let (d, ls) = quantize_scales(&scales, 63);
    let (dmin, lm) = quantize_scales(&mins, 63);
    let mut q = [0u8; 256];
    for (sub, (xs, qs)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        let sd = d * ls[sub] as f32;
        let sm = dmin * lm[sub] as f32;
        quants_with_min(xs, sd, sm, nmax as i32, qs);
    }
    (d, dmin, ls, lm, q)
}

/// Q2_K encoder: per 16 weights a min/max fit with 4-bit scale and min.
fn quant_q2_k(x: &[f32; 256], b: &mut [u8; 84]) {
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    for (sub, xs) in x.as_chunks::<16>().0.iter().enumerate() {
        (scales[sub], mins[sub]) = fit_min_max(xs, 3.0);
    }
    let (d, ls) = quantize_scales(&scales, 15);
    let (dmin, lm) = quantize_scales(&mins, 15);
    let mut q = [0u8; 256];
    for (sub, (xs, qs)) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)).enumerate() {
        let sd = d * ls[sub] as f32;
        let sm = dmin * lm[sub] as f32;
        quants_with_min(xs, sd, sm, 3, qs);
        b[sub] = ls[sub] | (lm[sub] << 4);
    }
    let qs = &mut b[16..80];
    qs.fill(0);
    for (e, &v) in q.iter().enumerate() {
        qs[32 * (e / 128) + e % 32] |= v << (2 * ((e % 128) / 32));
    }
    write_f16(b, 80, d);
    write_f16(b, 82, dmin);
}

/// Q3_K encoder: per 16 weights the smallest signed scale whose -4..=3 range covers them; the
/// 16 scales are stored as 6-bit signed values, the largest-magnitude one mapping to -32.
fn quant_q3_k(x: &[f32; 256], b: &mut [u8; 110]) {
    let mut scales = [0f32; 16];
    for (s, xs) in scales.iter_mut().zip(x.as_chunks::<16>().0) {
        *s = fit_symmetric(xs, 4.0, 3.0);
    }
    let d = f16_not_smaller(signed_absmax(&scales) / -32.0);
    let mut ls = [0i8; 16];
    quants_symmetric(&scales, d, 32, 31, &mut ls);
    let mut q = [0i8; 256];
    for (sub, (xs, qs)) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)).enumerate() {
        quants_symmetric(xs, d * ls[sub] as f32, 4, 3, qs);
    }
    b[..96].fill(0);
    let (hmask, qs) = b[..96].split_at_mut(32);
    for (e, &v) in q.iter().enumerate() {
        let u = (v + 4) as u8;
        if u > 3 {
            hmask[e % 32] |= 1 << (e / 32);
        }
        qs[32 * (e / 128) + e % 32] |= (u & 3) << (2 * ((e % 128) / 32));
    }
    pack_q3_k_scales(&ls, &mut b[96..108]);
    write_f16(b, 108, d);
}

/// Q4_K encoder: per 32 weights a min/max fit with 6-bit scale and min.
fn quant_q4_k(x: &[f32; 256], b: &mut [u8; 144]) {
    let (d, dmin, ls, lm, q) = fit_k4(x, 15);
    write_f16(b, 0, d);
    write_f16(b, 2, dmin);
    pack_k4_scale_min(&ls, &lm, &mut b[4..16]);
    let qs = &mut b[16..144];
    qs.fill(0);
    for (e, &v) in q.iter().enumerate() {
        qs[32 * (e / 64) + e % 32] |= v << (4 * ((e / 32) % 2));
    }
}

/// Q5_K encoder: per 32 weights a min/max fit with 6-bit scale and min.
fn quant_q5_k(x: &[f32; 256], b: &mut [u8; 176]) {
    let (d, dmin, ls, lm, q) = fit_k4(x, 31);
    write_f16(b, 0, d);
    write_f16(b, 2, dmin);
    pack_k4_scale_min(&ls, &lm, &mut b[4..16]);
    b[16..176].fill(0);
    let (qh, qs) = b[16..176].split_at_mut(32);
    for (e, &v) in q.iter().enumerate() {
        qs[32 * (e / 64) + e % 32] |= (v & 0x0F) << (4 * ((e / 32) % 2));
        qh[e % 32] |= (v >> 4) << (e / 32);
    }
}

/// Q6_K encoder: per 16 weights the smallest signed scale whose -32..=31 range covers them; the
/// 16 scales are stored as i8, the largest-magnitude one mapping to -128.
fn quant_q6_k(x: &[f32; 256], b: &mut [u8; 210]) {
    let mut scales = [0f32; 16];
    for (s, xs) in scales.iter_mut().zip(x.as_chunks::<16>().0) {
        *s = fit_symmetric(xs, 32.0, 31.0);
    }
    let d = f16_not_smaller(signed_absmax(&scales) / -128.0);
    let mut ls = [0i8; 16];
    quants_symmetric(&scales, d, 128, 127, &mut ls);
    let mut q = [0i8; 256];
    for (sub, (xs, qs)) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)).enumerate() {
        quants_symmetric(xs, d * ls[sub] as f32, 32, 31, qs);
    }
    b[..192].fill(0);
    let (ql, qh) = b[..192].split_at_mut(128);
    for (e, &v) in q.iter().enumerate() {
        let u = (v + 32) as u8;
        let (half, k, l) = (e / 128, (e % 128) / 32, e % 32);
        ql[64 * half + 32 * (k % 2) + l] |= (u & 0x0F) << (4 * (k / 2));
        qh[32 * half + l] |= (u >> 4) << (2 * k);
    }
    for (s, &l) in b[192..208].iter_mut().zip(&ls) {
        *s = l as u8;
    }
    write_f16(b, 208, d);
}

// ---------------------------------------------------------------------------------------------
// Formats GGUF has no type for: INT8 (per row), INT4 (per 128), NF4 (per 64)
// ---------------------------------------------------------------------------------------------

/// QLoRA's NormalFloat4 values as bitsandbytes' `csrc/kernels.cu` spells them (Dettmers et al.
/// 2023, "QLoRA"): quantiles of a standard normal normalized to [-1, 1], with an exact 0 at code
/// 7 and 8 positive / 7 negative values. Each is an f32 value, so [`NF4`] holds them exactly.
const NF4_F64: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The NF4 codebook: `w = d * NF4[code]`.
pub const NF4: [f32; 16] = {
    let mut v = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        v[i] = NF4_F64[i] as f32;
        i += 1;
    }
    v
};

/// The decision thresholds of the NF4 encoder: midpoints of neighbouring [`NF4`] values,
/// computed in f64 and rounded once, which are the constants of bitsandbytes' `dQuantizeNF4`
/// (e.g. 0.03979014977812767 between codes 7 and 8).
const NF4_MIDPOINTS: [f32; 15] = {
    let mut m = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = ((NF4_F64[i] + NF4_F64[i + 1]) * 0.5) as f32;
        i += 1;
    }
    m
};

/// The NF4 code of a weight normalized by its block's absmax: the nearest codebook value, a
/// tie going to the lower one (`v > midpoint` to go up, as bitsandbytes compares).
fn nf4_code(v: f32) -> u8 {
    NF4_MIDPOINTS.iter().filter(|&&m| v > m).count() as u8
}

/// INT8 row: `s: f32`, `q: [i8; n]`; w = s*q.
fn dequant_int8(src: &[u8], dst: &mut [f32]) {
    let (s, qs) = src.split_at(4);
    let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    for (y, &q) in dst.iter_mut().zip(qs) {
        *y = (q as i8) as f32 * s;
    }
}

/// INT8 encoder: s = absmax of the row / 127, q = round(x / s) (half away from zero), as Q8_0
/// does per 32 weights. The scale stays f32: one per row costs nothing.
fn quant_int8(src: &[f32], dst: &mut [u8]) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let s = amax / 127.0;
    let id = inverse_or_zero(s);
    let (head, qs) = dst.split_at_mut(4);
    head.copy_from_slice(&s.to_le_bytes());
    for (q, &v) in qs.iter_mut().zip(src) {
        *q = ((v * id).round().clamp(-127.0, 127.0) as i8) as u8;
    }
}

/// INT4, 66 bytes: `d: f16`, `qs: [u8; 64]`: byte `32r + l` holds weight `64r + l` in its low
/// nibble and `64r + 32 + l` in its high nibble; w = d*(u-8).
fn dequant_int4(b: &[u8; 66], y: &mut [f32; 128]) {
    let d = read_f16(b, 0);
    for (i, &q) in b[2..].iter().enumerate() {
        let (r, l) = (i / 32, i % 32);
        y[64 * r + l] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[64 * r + 32 + l] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// INT4 encoder: Q4_0's rule over 128 weights. The largest-magnitude weight maps to q = -8
/// (d = max / -8), so it is exact and all 16 codes are used: a step of absmax/8 rather than
/// the absmax/7 of a [-7, 7] code, at the price of clamping to 7 the weights of the other sign
/// beyond 7/8 of the max. Quants are rounded (half up) against the stored f16 d.
fn quant_int4(x: &[f32; 128], b: &mut [u8; 66]) {
    let d = f16::from_f32(signed_absmax(x) / -8.0).to_f32();
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    let code = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    for i in 0..64 {
        let (r, l) = (i / 32, i % 32);
        b[2 + i] = code(x[64 * r + l]) | (code(x[64 * r + 32 + l]) << 4);
    }
}

/// NF4, 34 bytes: `d: f16` (the block's absmax), `qs: [u8; 32]`: byte `l` holds weight `l` in
/// its low nibble and `32 + l` in its high nibble; w = NF4[u]*d.
fn dequant_nf4(b: &[u8; 34], y: &mut [f32; 64]) {
    let d = read_f16(b, 0);
    for (l, &q) in b[2..].iter().enumerate() {
        y[l] = NF4[(q & 0x0F) as usize] * d;
        y[l + 32] = NF4[(q >> 4) as usize] * d;
    }
}

/// NF4 encoder: d = absmax (f16), each weight the nearest codebook value of `x / d`.
fn quant_nf4(x: &[f32; 64], b: &mut [u8; 34]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = f16::from_f32(amax).to_f32();
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    for l in 0..32 {
        b[2 + l] = nf4_code(x[l] * id) | (nf4_code(x[l + 32] * id) << 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const F16_ONE: [u8; 2] = [0x00, 0x3C];
    const F16_HALF: [u8; 2] = [0x00, 0x38];
    const F16_QUARTER: [u8; 2] = [0x00, 0x34];
    const F16_MINUS_ONE: [u8; 2] = [0x00, 0xBC];

    fn decode_one(dtype: DType, block: &[u8]) -> Vec<f32> {
        assert_eq!(block.len(), dtype.block_bytes());
        dequantize(dtype, block, dtype.block_elems())
    }

    fn assert_values(dtype: DType, got: &[f32], want: impl Fn(usize) -> f32) {
        for (i, &g) in got.iter().enumerate() {
            assert_eq!(g, want(i), "{dtype} element {i}");
        }
    }

    /// Packs 32 4-bit quants the 32-element way: byte j = element j | element j+16 << 4.
    fn pack_nibbles_32(q: &[u8; 32]) -> [u8; 16] {
        std::array::from_fn(|j| q[j] | (q[j + 16] << 4))
    }

    #[test]
    fn block_sizes_match_dtype() {
        let sizes = [
            (DType::Q4_0, 18),
            (DType::Q4_1, 20),
            (DType::Q5_0, 22),
            (DType::Q5_1, 24),
            (DType::Q8_0, 34),
            (DType::Q2_K, 84),
            (DType::Q3_K, 110),
            (DType::Q4_K, 144),
            (DType::Q5_K, 176),
            (DType::Q6_K, 210),
            (DType::INT8, 32),
            (DType::INT4, 66),
            (DType::NF4, 34),
        ];
        for (dt, bytes) in sizes {
            assert_eq!(dt.block_bytes(), bytes, "{dt}");
        }
    }

    #[test]
    fn plain_floats_decode_little_endian() {
        let src = [0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0];
        assert_eq!(dequantize(DType::F32, &src, 2), [1.0, -2.0]);
        let src = [0x00, 0x3C, 0x00, 0xC0, 0x00, 0x35];
        assert_eq!(dequantize(DType::F16, &src, 3), [1.0, -2.0, 0.3125]);
        let src = [0x80, 0x3F, 0x00, 0xC0, 0xA0, 0x3E];
        assert_eq!(dequantize(DType::BF16, &src, 3), [1.0, -2.0, 0.3125]);
    }

    #[test]
    fn plain_floats_round_to_nearest_even() {
        // 1 + 2^-11 is halfway between two f16 values; even mantissa is 1.0.
        let mut out = [0u8; 4];
        quantize_row(DType::F16, &[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)], &mut out);
        assert_eq!(out, [0x00, 0x3C, 0x02, 0x3C]);
        quantize_row(DType::BF16, &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)], &mut out);
        assert_eq!(out, [0x80, 0x3F, 0x82, 0x3F]);
    }

    #[test]
    fn q4_0_hand_block() {
        let q: [u8; 32] = std::array::from_fn(|i| (i * 7 % 16) as u8);
        let mut b = F16_HALF.to_vec();
        b.extend(pack_nibbles_32(&q));
        let got = decode_one(DType::Q4_0, &b);
        assert_values(DType::Q4_0, &got, |i| 0.5 * (q[i] as f32 - 8.0));
        // Element 1 is the low nibble of byte 1 (7 → -0.5); element 16 the high nibble of byte 0.
        assert_eq!(got[1], -0.5);
        assert_eq!(got[16], 0.5 * ((16 * 7 % 16) as f32 - 8.0));
    }

    #[test]
    fn q4_1_hand_block() {
        let q: [u8; 32] = std::array::from_fn(|i| ((i * 5 + 3) % 16) as u8);
        let mut b = F16_HALF.to_vec();
        b.extend(F16_MINUS_ONE);
        b.extend(pack_nibbles_32(&q));
        let got = decode_one(DType::Q4_1, &b);
        assert_values(DType::Q4_1, &got, |i| 0.5 * q[i] as f32 - 1.0);
    }

    /// 5-bit quants in the Q5_0/Q5_1 layout: (qh as little-endian u32, qs).
    fn pack_q5(q: &[u8; 32]) -> ([u8; 4], [u8; 16]) {
        let low: [u8; 32] = std::array::from_fn(|i| q[i] & 0x0F);
        let mut qh = 0u32;
        for (i, &v) in q.iter().enumerate() {
            if v & 0x10 != 0 {
                qh |= 1 << i;
            }
        }
        (qh.to_le_bytes(), pack_nibbles_32(&low))
    }

    #[test]
    fn q5_0_hand_block() {
        let q: [u8; 32] = std::array::from_fn(|i| ((i * 13 + 1) % 32) as u8);
        let (qh, qs) = pack_q5(&q);
        let mut b = F16_ONE.to_vec();
        b.extend(qh);
        b.extend(qs);
        let got = decode_one(DType::Q5_0, &b);
        assert_values(DType::Q5_0, &got, |i| q[i] as f32 - 16.0);
        // Literal check: qh bit 31 set and nibble 0xF → element 31 is 31 - 16.
        let mut b = vec![0x00, 0x3C, 0x00, 0x00, 0x00, 0x80];
        b.extend([0u8; 15]);
        b.push(0xF0);
        let got = decode_one(DType::Q5_0, &b);
        assert_eq!(got[31], 15.0);
        assert_eq!(got[15], -16.0);
    }

    #[test]
    fn q5_1_hand_block() {
        let q: [u8; 32] = std::array::from_fn(|i| ((i * 11 + 7) % 32) as u8);
        let (qh, qs) = pack_q5(&q);
        let mut b = F16_QUARTER.to_vec();
        b.extend(F16_MINUS_ONE);
        b.extend(qh);
        b.extend(qs);
        let got = decode_one(DType::Q5_1, &b);
        assert_values(DType::Q5_1, &got, |i| 0.25 * q[i] as f32 - 1.0);
    }

    #[test]
    fn q8_0_hand_block() {
        let mut b = F16_QUARTER.to_vec();
        b.extend((0..32).map(|i| (i as i8 * 4 - 64) as u8));
        let got = decode_one(DType::Q8_0, &b);
        assert_values(DType::Q8_0, &got, |i| 0.25 * (i as f32 * 4.0 - 64.0));
    }

    /// Packs 6-bit scales and mins the Q4_K/Q5_K way (12 bytes).
    fn pack_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for k in 0..4 {
            s[k] = sc[k] | ((sc[k + 4] >> 4) << 6);
            s[k + 4] = m[k] | ((m[k + 4] >> 4) << 6);
            s[k + 8] = (sc[k + 4] & 0x0F) | ((m[k + 4] & 0x0F) << 4);
        }
        s
    }

    const K_SC: [u8; 8] = [1, 10, 33, 63, 17, 40, 5, 62];
    const K_M: [u8; 8] = [0, 63, 7, 32, 48, 3, 21, 60];

    #[test]
    fn q4_k_hand_block() {
        let q: [u8; 256] = std::array::from_fn(|i| ((i * 5 + 3) % 16) as u8);
        let mut qs = [0u8; 128];
        for (i, &v) in q.iter().enumerate() {
            // 64 weights per 32 bytes: the first 32 in low nibbles, the next 32 in high.
            let (chunk, l) = (i / 64, i % 64);
            qs[32 * chunk + l % 32] |= if l < 32 { v } else { v << 4 };
        }
        let mut b = F16_ONE.to_vec();
        b.extend(F16_HALF);
        b.extend(pack_k4(&K_SC, &K_M));
        b.extend(qs);
        let got = decode_one(DType::Q4_K, &b);
        assert_values(DType::Q4_K, &got, |i| K_SC[i / 32] as f32 * q[i] as f32 - 0.5 * K_M[i / 32] as f32);
        // Literal scale bytes: byte 0 = 0x41 gives scale 0 = 1 and the top bits 01 of scale 4,
        // whose low nibble is byte 8's low nibble.
        let mut b = vec![0x00, 0x3C, 0x00, 0x00, 0x41, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0];
        b.extend([0x11u8; 128]);
        let got = decode_one(DType::Q4_K, &b);
        assert_eq!(got[0], 1.0);
        assert_eq!(got[4 * 32], 0x12 as f32);
        assert_eq!(got[32], 0.0);
    }

    #[test]
    fn q5_k_hand_block() {
        let q: [u8; 256] = std::array::from_fn(|i| ((i * 7 + 2) % 32) as u8);
        let mut qh = [0u8; 32];
        let mut qs = [0u8; 128];
        for (i, &v) in q.iter().enumerate() {
            let (chunk, l) = (i / 64, i % 64);
            let low = v & 0x0F;
            qs[32 * chunk + l % 32] |= if l < 32 { low } else { low << 4 };
            qh[i % 32] |= (v >> 4) << (i / 32);
        }
        let mut b = F16_HALF.to_vec();
        b.extend(F16_QUARTER);
        b.extend(pack_k4(&K_SC, &K_M));
        b.extend(qh);
        b.extend(qs);
        let got = decode_one(DType::Q5_K, &b);
        assert_values(DType::Q5_K, &got, |i| 0.5 * K_SC[i / 32] as f32 * q[i] as f32 - 0.25 * K_M[i / 32] as f32);
    }

    #[test]
    fn q6_k_hand_block() {
        let q: [u8; 256] = std::array::from_fn(|i| ((i * 11 + 5) % 64) as u8);
        let sc: [i8; 16] = std::array::from_fn(|j| (j as i8 - 7) * 9);
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (i, &v) in q.iter().enumerate() {
            // Per 128 weights: 64 ql bytes, 32 qh bytes; weight 32k + l.
            let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
            let byte = 64 * h + l + if k % 2 == 1 { 32 } else { 0 };
            ql[byte] |= if k < 2 { v & 0x0F } else { (v & 0x0F) << 4 };
            qh[32 * h + l] |= (v >> 4) << (2 * k);
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(sc.map(|s| s as u8));
        b.extend(F16_HALF);
        let got = decode_one(DType::Q6_K, &b);
        assert_values(DType::Q6_K, &got, |i| 0.5 * sc[i / 16] as f32 * (q[i] as f32 - 32.0));
    }

    #[test]
    fn q2_k_hand_block() {
        let q: [u8; 256] = std::array::from_fn(|i| ((i * 3 + i / 7) % 4) as u8);
        let sc: [u8; 16] = std::array::from_fn(|j| ((j * 5 + 1) % 16) as u8);
        let m: [u8; 16] = std::array::from_fn(|j| ((j * 3 + 2) % 16) as u8);
        let mut qs = [0u8; 64];
        for (i, &v) in q.iter().enumerate() {
            // Per 128 weights, 32 bytes: weight 32s + l at bits 2s of byte l.
            let (h, s, l) = (i / 128, (i % 128) / 32, i % 32);
            qs[32 * h + l] |= v << (2 * s);
        }
        let mut b: Vec<u8> = (0..16).map(|j| sc[j] | (m[j] << 4)).collect();
        b.extend(qs);
        b.extend(F16_HALF);
        b.extend(F16_QUARTER);
        let got = decode_one(DType::Q2_K, &b);
        assert_values(DType::Q2_K, &got, |i| 0.5 * sc[i / 16] as f32 * q[i] as f32 - 0.25 * m[i / 16] as f32);
    }

    #[test]
    fn q3_k_hand_block() {
        // Signed 3-bit quants -4..=3, stored as 2 low bits plus an hmask bit meaning "no -4".
        let q: [i8; 256] = std::array::from_fn(|i| ((i * 5 + i / 9) % 8) as i8 - 4);
        let sc: [i8; 16] = std::array::from_fn(|j| (j as i8 * 7 + 3) % 64 - 32);
        let mut hmask = [0u8; 32];
        let mut qs = [0u8; 64];
        for (i, &v) in q.iter().enumerate() {
            let u = (v + 4) as u8;
            let (h, s, l) = (i / 128, (i % 128) / 32, i % 32);
            qs[32 * h + l] |= (u & 3) << (2 * s);
            if u >= 4 {
                hmask[i % 32] |= 1 << (i / 32);
            }
        }
        let mut scales = [0u8; 12];
        for (j, &s) in sc.iter().enumerate() {
            let u = (s + 32) as u8;
            scales[j % 8] |= (u & 0x0F) << if j < 8 { 0 } else { 4 };
            scales[8 + j % 4] |= (u >> 4) << (2 * (j / 4));
        }
        let mut b = hmask.to_vec();
        b.extend(qs);
        b.extend(scales);
        b.extend(F16_HALF);
        let got = decode_one(DType::Q3_K, &b);
        assert_values(DType::Q3_K, &got, |i| 0.5 * sc[i / 16] as f32 * q[i] as f32);
        // Literal bytes, d = 1: scale 0 = (0x0 | 0b10 << 4) - 32 = 0; scale 4 = (0x0 | 0b00 << 4)
        // - 32 = -32; scale 12 = (0x5 from byte 4's high nibble | 0b11 << 4 from byte 8's bits
        // 6..8) - 32 = 21.
        let mut b = vec![0xFFu8; 32];
        b.extend([0u8; 64]);
        b.extend([0x00, 0, 0, 0, 0x50, 0, 0, 0, 0xC2, 0, 0, 0]);
        b.extend(F16_ONE);
        b[32] = 0x10; // element 64 (bits 4..6 of qs[0]): q = 1 → -32
        b[32 + 32] = 0x30; // element 192 (bits 4..6 of qs[32]): q = 3 → 63
        b[5] = !(1 << 2); // element 69 (hmask[5] bit 2) loses its high bit: q = 0 - 4 → 128
        let got = decode_one(DType::Q3_K, &b);
        assert_eq!(got[64], -32.0);
        assert_eq!(got[192], 63.0);
        assert_eq!(got[69], 128.0);
        assert_eq!(got[65], 0.0);
        assert!(got[..16].iter().all(|&v| v == 0.0));
    }

    /// `n` samples of uniform[-1, 1] from a fixed seed.
    fn random_row(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn round_trip(dtype: DType, x: &[f32]) -> Vec<f32> {
        let mut bytes = vec![0u8; dtype.row_bytes(x.len()).unwrap()];
        quantize_row(dtype, x, &mut bytes);
        dequantize(dtype, &bytes, x.len())
    }

    /// (max abs error, rms error) bounds for uniform[-1, 1] data; a layout or scale mistake shows
    /// up as errors of order 1.
    fn bounds(dtype: DType) -> (f32, f32) {
        match dtype {
            DType::F32 => (0.0, 0.0),
            DType::F16 => (1.0 / 2048.0, 3e-4),
            DType::BF16 => (1.0 / 256.0, 2.5e-3),
            DType::Q8_0 => (0.0045, 0.0025),
            DType::Q4_0 => (0.13, 0.045),
            DType::Q4_1 => (0.075, 0.04),
            DType::Q5_0 => (0.066, 0.022),
            DType::Q5_1 => (0.037, 0.02),
            DType::Q2_K => (0.5, 0.2),
            DType::Q3_K => (0.2, 0.1),
            DType::Q4_K => (0.09, 0.045),
            DType::Q5_K => (0.045, 0.022),
            DType::Q6_K => (0.021, 0.01),
            // Half a step of absmax/127 (the scale is f32).
            DType::INT8 => (0.004, 0.0025),
            // As Q4_0: a step of absmax/8, and up to a step where the other sign clamps at 7.
            DType::INT4 => (0.13, 0.045),
            // Half the widest codebook gap (-1 .. -0.696) is 0.152; uniform data, which NF4 is
            // not shaped for, puts many weights in the wide outer gaps.
            DType::NF4 => (0.155, 0.06),
        }
    }

    fn errors(x: &[f32], y: &[f32]) -> (f32, f32) {
        let max = x.iter().zip(y).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        let ss: f32 = x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum();
        (max, (ss / x.len() as f32).sqrt())
    }

    #[test]
    fn round_trip_every_dtype() {
        for (k, dtype) in DType::ALL.into_iter().enumerate() {
            let blocks = if dtype.block_elems() == QK_K { 2 } else { 3 };
            let n = blocks * dtype.block_elems().max(32);
            let x = random_row(n, 42 + k as u64);
            let y = round_trip(dtype, &x);
            let (max_err, rms) = errors(&x, &y);
            let (max_bound, rms_bound) = bounds(dtype);
            assert!(
                max_err <= max_bound && rms <= rms_bound,
                "{dtype}: max err {max_err} (bound {max_bound}), rms {rms} (bound {rms_bound})"
            );
            if dtype == DType::F16 || dtype == DType::BF16 {
                let rel = if dtype == DType::F16 { 2f32.powi(-11) } else { 2f32.powi(-8) };
                for (a, b) in x.iter().zip(&y) {
                    assert!((a - b).abs() <= a.abs() * rel, "{dtype}: {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn round_trip_scales_with_magnitude() {
        // Same data at three magnitudes, one per block: errors scale with each block's range.
        // (INT8 has one scale per row, so its errors follow the row's range: next test.)
        for dtype in DType::ALL.into_iter().filter(|&d| d != DType::INT8) {
            let be = dtype.block_elems().max(32);
            let mut x = random_row(3 * be, 7);
            for (b, chunk) in x.chunks_mut(be).enumerate() {
                let s = [0.01f32, 1.0, 30.0][b];
                chunk.iter_mut().for_each(|v| *v *= s);
            }
            let y = round_trip(dtype, &x);
            for (b, (xs, ys)) in x.chunks(be).zip(y.chunks(be)).enumerate() {
                let s = [0.01f32, 1.0, 30.0][b];
                let (max_err, _) = errors(xs, ys);
                let bound = bounds(dtype).0 * s * 1.05;
                assert!(max_err <= bound, "{dtype} block {b}: {max_err} > {bound}");
            }
        }
    }

    #[test]
    fn int8_error_follows_the_row_range() {
        for s in [0.01f32, 1.0, 30.0] {
            let x: Vec<f32> = random_row(96, 8).iter().map(|v| v * s).collect();
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (max_err, _) = errors(&x, &round_trip(DType::INT8, &x));
            assert!(max_err <= amax / 254.0 * 1.0001, "scale {s}: {max_err}");
        }
    }

    #[test]
    fn zeros_and_constants_round_trip() {
        for dtype in DType::ALL {
            let n = dtype.block_elems().max(32);
            let zeros = vec![0f32; n];
            assert_eq!(round_trip(dtype, &zeros), zeros, "{dtype}");
            let y = round_trip(dtype, &vec![0.75f32; n]);
            for v in y {
                assert!((v - 0.75).abs() < 0.01, "{dtype}: constant 0.75 -> {v}");
            }
            let y = round_trip(dtype, &vec![-0.75f32; n]);
            for v in y {
                assert!((v + 0.75).abs() < 0.01, "{dtype}: constant -0.75 -> {v}");
            }
        }
    }

    #[test]
    fn q8_0_encoder_matches_reference_rounding() {
        // absmax 127 → d = 1: quants are round-half-away-from-zero of the inputs.
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = -127.0;
        x[4] = 0.49;
        let mut b = [0u8; 34];
        quantize_row(DType::Q8_0, &x, &mut b);
        assert_eq!(&b[..2], &F16_ONE);
        assert_eq!(&b[2..7], &[127, 3, (-3i8) as u8, (-127i8) as u8, 0]);
    }

    #[test]
    fn q4_0_encoder_maps_extreme_to_zero_code() {
        let mut x = [0f32; 32];
        x[20] = -4.0; // d = 0.5
        x[3] = 1.0;
        let mut b = [0u8; 18];
        quantize_row(DType::Q4_0, &x, &mut b);
        assert_eq!(&b[..2], &F16_HALF);
        assert_eq!(b[2 + 4] >> 4, 0); // element 20: high nibble of byte 4
        assert_eq!(b[2 + 3] & 0x0F, 10); // element 3: 1.0 / 0.5 + 8
        assert_eq!(b[2] & 0x0F, 8);
    }

    #[test]
    fn dot_row_matches_dequantized_dot() {
        for (k, dtype) in DType::ALL.into_iter().enumerate() {
            // 3 super-blocks plus, where blocks allow it, a partial dot chunk.
            let n = if dtype.block_elems() == QK_K { 3 * QK_K } else { 3 * QK_K + 96 + 4 };
            let n = n - n % dtype.block_elems();
            let w = random_row(n, 100 + k as u64);
            let x = random_row(n, 200 + k as u64);
            let mut bytes = vec![0u8; dtype.row_bytes(n).unwrap()];
            quantize_row(dtype, &w, &mut bytes);
            let wd = dequantize(dtype, &bytes, n);
            let exact: f64 = wd.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = wd.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            let got = dot_row(dtype, &bytes, &x) as f64;
            assert!((got - exact).abs() <= 1e-4 * scale.max(1e-6), "{dtype}: dot_row {got}, dequantized dot {exact}");
        }
    }

    #[test]
    fn int8_hand_row() {
        let mut b = 0.25f32.to_le_bytes().to_vec();
        b.extend((0..32i32).map(|i| (i * 8 - 127) as i8 as u8));
        assert_eq!(b.len(), DType::INT8.row_bytes(32).unwrap());
        let got = dequantize(DType::INT8, &b, 32);
        assert_values(DType::INT8, &got, |i| 0.25 * (i as f32 * 8.0 - 127.0));
        // Literal: scale 2.0 (0x40000000), byte 0xFF is -1.
        let mut b = vec![0x00, 0x00, 0x00, 0x40, 0xFF, 0x01];
        b.extend([0u8; 30]);
        assert_eq!(&dequantize(DType::INT8, &b, 32)[..3], &[-2.0, 2.0, 0.0]);
    }

    #[test]
    fn int8_encoder_uses_a_row_scale() {
        let mut x = vec![0f32; 64];
        x[40] = -254.0; // s = 2
        x[0] = 3.0; // 1.5 → 2 (half away from zero)
        x[1] = -3.0;
        x[2] = 0.9; // 0.45 → 0
        let mut b = vec![0u8; 68];
        quantize_row(DType::INT8, &x, &mut b);
        assert_eq!(f32::from_le_bytes([b[0], b[1], b[2], b[3]]), 2.0);
        assert_eq!(&b[4..7], &[2, (-2i8) as u8, 0]);
        assert_eq!(b[4 + 40] as i8, -127);
    }

    #[test]
    fn int4_hand_block() {
        let u: [u8; 128] = std::array::from_fn(|i| ((i * 7 + i / 5) % 16) as u8);
        let mut b = F16_HALF.to_vec();
        // Two runs of 32 bytes: weight 64r + l low, 64r + 32 + l high.
        b.extend((0..64).map(|i| u[64 * (i / 32) + i % 32] | (u[64 * (i / 32) + 32 + i % 32] << 4)));
        let got = decode_one(DType::INT4, &b);
        assert_values(DType::INT4, &got, |i| 0.5 * (u[i] as f32 - 8.0));
        // Literal: byte 0 = 0x1F: weight 0 is 15 - 8, weight 32 is 1 - 8; byte 32 = 0x08:
        // weight 64 is 0, weight 96 is -8.
        let mut b = F16_ONE.to_vec();
        b.extend([0x88u8; 64]);
        b[2] = 0x1F;
        b[2 + 32] = 0x08;
        let got = decode_one(DType::INT4, &b);
        assert_eq!((got[0], got[32], got[64], got[96], got[1]), (7.0, -7.0, 0.0, -8.0, 0.0));
    }

    #[test]
    fn int4_encoder_maps_extreme_to_minus_eight() {
        let mut x = [0f32; 128];
        x[100] = 4.0; // d = -0.5: code 0 is +4
        x[3] = 1.0; // 1 / -0.5 + 8 = 6
        x[70] = -3.9; // 7.8 + 8 = 15.8 → clamped to 15, i.e. -3.5
        let mut b = [0u8; 66];
        quantize_row(DType::INT4, &x, &mut b);
        assert_eq!(&b[..2], &[0x00, 0xB8]); // f16 -0.5
        assert_eq!(b[2 + 32 + 4] >> 4, 0); // weight 100: run 1, l = 4, high nibble
        assert_eq!(b[2 + 3] & 0x0F, 6);
        assert_eq!(b[2 + 32 + 6] & 0x0F, 15); // weight 70: run 1, l = 6, low nibble
        let y = dequantize(DType::INT4, &b, 128);
        assert_eq!((y[100], y[3], y[70], y[0]), (4.0, 1.0, -3.5, 0.0));
    }

    #[test]
    fn nf4_codebook_is_bitsandbytes() {
        assert_eq!(NF4[7], 0.0);
        assert!(NF4.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((NF4[0], NF4[15]), (-1.0, 1.0));
        // bitsandbytes' dQuantizeNF4 thresholds, as f32.
        for (i, t) in
            [(0, -0.8480964004993439f64), (6, -0.04552501812577248), (7, 0.03979014977812767), (14, 0.8614784181118011)]
        {
            assert_eq!(NF4_MIDPOINTS[i], t as f32, "threshold {i}");
        }
    }

    #[test]
    fn nf4_hand_block() {
        let u: [u8; 64] = std::array::from_fn(|i| ((i * 5 + 3) % 16) as u8);
        let mut b = [0x00, 0x40].to_vec(); // f16 2.0
        b.extend((0..32).map(|l| u[l] | (u[l + 32] << 4)));
        let got = decode_one(DType::NF4, &b);
        assert_values(DType::NF4, &got, |i| NF4[u[i] as usize] * 2.0);
        // Literal: byte 0 = 0xF0: weight 0 is -2 (code 0), weight 32 is +2 (code 15).
        let mut b = vec![0x00, 0x40, 0xF0];
        b.extend([0x77u8; 31]);
        let got = decode_one(DType::NF4, &b);
        assert_eq!((got[0], got[32], got[1]), (-2.0, 2.0, 0.0));
    }

    #[test]
    fn nf4_encoder_picks_the_nearest_code() {
        let mut x = [0f32; 64];
        x[10] = -2.0; // absmax 2: code 0
        x[0] = 2.0 * NF4[12]; // exactly on a code
        x[1] = 2.0 * NF4_MIDPOINTS[7]; // on the 0 / 0.0796 midpoint: the lower code
        x[2] = 2.0 * NF4_MIDPOINTS[7] * 1.01; // just above it
        x[33] = 1.9; // above the 0.7230 / 1.0 midpoint (0.861): code 15
        let mut b = [0u8; 34];
        quantize_row(DType::NF4, &x, &mut b);
        assert_eq!(&b[..2], &[0x00, 0x40]);
        let codes: Vec<u8> = (0..4).map(|l| b[2 + l] & 0x0F).collect();
        assert_eq!(codes, [12, 7, 8, 7]);
        assert_eq!(b[2 + 10] & 0x0F, 0);
        assert_eq!(b[2 + 1] >> 4, 15);
        let y = dequantize(DType::NF4, &b, 64);
        assert_eq!((y[0], y[10], y[33]), (2.0 * NF4[12], -2.0, 2.0));
    }

    #[test]
    #[should_panic]
    fn dequantize_row_rejects_wrong_length() {
        let mut out = [0f32; 32];
        dequantize_row(DType::Q4_0, &[0u8; 17], &mut out);
    }

    #[test]
    #[should_panic]
    fn dequantize_row_rejects_partial_block() {
        let mut out = [0f32; 16];
        dequantize_row(DType::Q4_0, &[0u8; 9], &mut out);
    }
}
