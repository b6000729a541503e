//! The hot loops of Inference-PIO.
pub mod dtype;
pub mod quant;

pub use dtype::DType;
