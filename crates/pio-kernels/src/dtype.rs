//! Element and block formats a weight can be stored in.
//!
//! The numbering of [`DType::from_ggml`] follows GGUF's `ggml_type` ids so tensors read from a
//! GGUF file map one-to-one. Block formats store `block_elems()` weights in `block_bytes()`
//! bytes; a row of a matrix is always a whole number of blocks, after a per-row prefix of
//! `row_prefix_bytes()` bytes (only INT8 has one: its per-row scale).
//!
//! INT8, INT4 and NF4 are formats GGUF has no type for (llama.cpp could not read them): they
//! exist for load-time quantization (`pio --quant`), and [`DType::ggml_id`] is `None` for them.

/// Storage format of a tensor.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 32 weights: f16 scale d, 16 bytes of 4-bit quants; w = d * (q - 8).
    Q4_0,
    /// 32 weights: f16 scale d, f16 min m, 16 bytes of 4-bit quants; w = d * q + m.
    Q4_1,
    /// 32 weights: f16 d, 4 bytes of 5th bits, 16 bytes of low nibbles; w = d * (q - 16).
    Q5_0,
    /// 32 weights: f16 d, f16 m, 4 bytes of 5th bits, 16 bytes of low nibbles; w = d * q + m.
    Q5_1,
    /// 32 weights: f16 d, 32 signed bytes; w = d * q.
    Q8_0,
    /// 256 weights in 16 sub-blocks of 16, 2-bit quants, 4-bit scales and mins.
    Q2_K,
    /// 256 weights in 16 sub-blocks of 16, 3-bit quants, 6-bit scales.
    Q3_K,
    /// 256 weights in 8 sub-blocks of 32, 4-bit quants, 6-bit scales and mins.
    Q4_K,
    /// 256 weights in 8 sub-blocks of 32, 5-bit quants, 6-bit scales and mins.
    Q5_K,
    /// 256 weights in 16 sub-blocks of 16, 6-bit quants, 8-bit scales.
    Q6_K,
    /// Symmetric per-row int8 (not in GGUF): a row of n weights (n a multiple of 32) is an f32
    /// scale s (4 bytes, little-endian) then n signed bytes q in -127..=127; w = s * q.
    INT8,
    /// Symmetric int4 in groups of 128 (not in GGUF), 66 bytes: f16 d, then 64 bytes of 4-bit
    /// codes u in two runs of 32 bytes, each run holding 64 weights (low nibbles the first 32,
    /// high nibbles the next 32); w = d * (u - 8), so q = u - 8 lies in -8..=7.
    INT4,
    /// QLoRA's NormalFloat4 in blocks of 64 (not in GGUF), 34 bytes: f16 absmax d, then 32
    /// bytes of 4-bit codes u (low nibbles weights 0..32, high nibbles 32..64);
    /// `w = d * NF4[u]` with the 16-value codebook [`crate::quant::NF4`].
    NF4,
}

impl DType {
    /// Every format, for tests and listings.
    pub const ALL: [DType; 16] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::INT8,
        DType::INT4,
        DType::NF4,
    ];

    /// The format with GGUF `ggml_type` id `id`, if we support it.
    pub fn from_ggml(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            6 => DType::Q5_0,
            7 => DType::Q5_1,
            8 => DType::Q8_0,
            10 => DType::Q2_K,
            11 => DType::Q3_K,
            12 => DType::Q4_K,
            13 => DType::Q5_K,
            14 => DType::Q6_K,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// GGUF `ggml_type` id, or `None` for the formats GGUF has no type for (INT8, INT4, NF4).
    pub fn ggml_id(self) -> Option<u32> {
        Some(match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q2_K => 10,
            DType::Q3_K => 11,
            DType::Q4_K => 12,
            DType::Q5_K => 13,
            DType::Q6_K => 14,
            DType::BF16 => 30,
            DType::INT8 | DType::INT4 | DType::NF4 => return None,
        })
    }

    /// Weights per block (1 for plain floats). INT8 has no inline scales; its "block" is the
    /// 32 weights one activation block covers, so its rows are multiples of 32.
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::INT8 => 32,
            DType::NF4 => 64,
            DType::INT4 => 128,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::INT8 => 32,
            DType::INT4 => 66,
            DType::NF4 => 34,
        }
    }

    /// Bytes every row starts with before its blocks: INT8's f32 scale, else none.
    pub fn row_prefix_bytes(self) -> usize {
        match self {
            DType::INT8 => 4,
            _ => 0,
        }
    }

    /// Bytes of a row of `n` weights, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_elems())
            .then(|| self.row_prefix_bytes() + n / self.block_elems() * self.block_bytes())
    }

    /// Bits per weight, for reports (INT8's per-row scale not counted: 8).
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_elems() as f64
    }

    /// The format called `name` as [`DType::name`] spells it, in any case (`q4_k`, `NF4`).
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name().eq_ignore_ascii_case(name.trim()))
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::INT8 => "INT8",
            DType::INT4 => "INT4",
            DType::NF4 => "NF4",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ggml_ids_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_name(&d.name().to_ascii_lowercase()), Some(d));
            match d.ggml_id() {
                Some(id) => assert_eq!(DType::from_ggml(id), Some(d)),
                None => assert!(matches!(d, DType::INT8 | DType::INT4 | DType::NF4)),
            }
        }
        assert_eq!(DType::from_name("q4_k_m"), None);
    }

    #[test]
    fn int8_rows_carry_their_scale() {
        assert_eq!(DType::INT8.row_bytes(64), Some(4 + 64));
        assert_eq!(DType::INT8.row_bytes(48), None);
        assert_eq!(DType::INT4.row_bytes(256), Some(2 * 66));
        assert_eq!(DType::NF4.row_bytes(192), Some(3 * 34));
        assert_eq!(DType::INT4.bits_per_weight(), 4.125);
        assert_eq!(DType::NF4.bits_per_weight(), 4.25);
    }
}
