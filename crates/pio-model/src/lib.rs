//! What Inference-PIO computes.
pub mod chat_template;
pub mod error;
pub mod tokenizer;

pub use error::{Error, Result};
