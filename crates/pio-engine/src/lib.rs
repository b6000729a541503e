//! What Inference-PIO runs when.
pub mod sampler;
pub mod stop;
