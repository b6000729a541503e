//! The hot loops of Inference-PIO, knowing nothing of models or requests.
//!
//! - [`DType`]: the storage formats a weight can have (plain floats and GGUF block formats).
//! - [`quant`]: decoding/encoding of every block format, and a row-times-vector dot.
//! - [`matmul`]: a weight matrix in any format times a batch of f32 activations.
//! - [`attention`]: a flat batch of queries over a paged KV cache.
//! - [`ops`]: RMSNorm, RoPE, SwiGLU, softmax and friends.
//! - [`parallel`]: how an operation is split across cores.
//!
//! Everything here is the scalar reference; SIMD paths will be checked against it.
pub mod attention;
pub mod dtype;
pub mod matmul;
pub mod ops;
pub mod parallel;
pub mod quant;

pub use dtype::DType;
