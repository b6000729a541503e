//! Element and block formats a weight can be stored in.
//!
//! The numbering of [`DType::from_ggml`] follows GGUF's `ggml_type` ids so tensors read from a
//! GGUF file map one-to-one. Block formats store `block_elems()` weights in `block_bytes()`
//! bytes; a row of a matrix is always a whole number of blocks.

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
}

impl DType {
    /// Every format, for tests and listings.
    pub const ALL: [DType; 13] = [
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

    /// GGUF `ggml_type` id.
    pub fn ggml_id(self) -> u32 {
        match self {
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
        }
    }

    /// Weights per block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
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
        }
    }

    /// Bytes of a row of `n` weights, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_elems()).then(|| n / self.block_elems() * self.block_bytes())
    }

    /// Bits per weight, for reports.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_elems() as f64
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
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
