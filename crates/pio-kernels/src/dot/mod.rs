//! Row-times-vector dot products for every weight format, at every SIMD level.
//!
//! Block-quantized rows dot with activations quantized to 8 bits ([`Q8Block`], one per 32
//! values); plain-float rows (F32, F16, BF16) dot with f32 activations. Each format's file has
//! a scalar version (the reference for its SIMD twins) and AVX2 / AVX-512 versions.

pub mod float;
pub mod kquants;
pub mod legacy;

use crate::act::Q8Block;
use crate::cpu::SimdLevel;
use crate::DType;

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
        DType::F32 | DType::F16 | DType::BF16 => panic!("{dtype} rows dot with f32 activations"),
    }
}

/// Dot of one stored row of a plain-float format with f32 activations.
pub fn dot_f32(level: SimdLevel, dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    float::dot(level, dtype, row, x)
}
