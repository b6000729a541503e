//! What Inference-PIO computes.
pub mod batch;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod image;
pub mod layers;
pub mod load;
pub mod mmproj;
pub mod models;
pub mod quantize;
pub mod registry;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use batch::{ForwardBatch, StateSnapshot, VisualEmbeds};
pub use error::{Error, Result};
pub use layers::{CacheSpec, EvictionPolicy, ExpertCacheOptions, ExpertCacheStats, KvCache, LayerCache};
pub use load::{
    available_memory, load, load_tokenizer, load_with, memory_reserve, GenerationDefaults, LoadOptions, LoadedModel,
    ModelInfo, StreamingInfo,
};
pub use models::{CausalLm, ModelShape};
pub use pio_kernels::attention::{KvCacheDtype, KvCacheType};
