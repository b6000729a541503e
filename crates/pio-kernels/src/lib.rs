//! The hot loops of Inference-PIO, knowing nothing of models or requests.
//!
//! - [`DType`]: the storage formats a weight can have (plain floats and GGUF block formats).
//! - [`quant`]: the scalar reference codecs of every block format, and a row-times-vector dot.
//! - [`act`]: activations quantized to 8 bits for integer dot products.
//! - [`adapt`]: which of two SIMD levels runs a decode step's products, by their measured speed.
//! - [`cpu`]: which SIMD level the kernels dispatch to (detected; `PIO_SIMD` caps it).
//! - [`delta`]: Gated DeltaNet's causal convolution and gated delta rule over a per-sequence
//!   state.
//! - [`dot`]: row-times-vector dots per format and SIMD level.
//! - [`huge`]: memory on transparent huge pages for the matrices decode streams.
//! - [`matmul`]: a weight matrix in any format times a batch of f32 activations.
//! - [`attention`]: a flat batch of queries over a paged KV cache of f32 or f16
//!   ([`attention::KvCacheDtype`]).
//! - [`membw`]: the machine's measured memory read bandwidth (the decode roofline).
//! - [`mla`]: multi-head latent attention (DeepSeek-V2/V3 absorbed form) over a paged latent
//!   cache.
//! - [`ops`]: RMSNorm, RoPE, SwiGLU, softmax and friends.
//! - [`parallel`]: how an operation is split across cores.
//! - [`reference`]: plain scalar oracles the fast kernels are tested against.
pub mod act;
pub mod adapt;
pub mod attention;
pub mod cpu;
pub mod delta;
pub mod dot;
pub mod dtype;
pub mod huge;
pub mod math;
pub mod matmul;
pub mod membw;
pub mod mla;
pub mod ops;
pub mod parallel;
pub mod quant;
pub mod reference;

pub use dtype::DType;
