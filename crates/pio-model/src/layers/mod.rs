//! Building blocks shared by every model: projections over any weight format, normalization,
//! the paged KV cache as each layer describes it (`kv_cache`), attention over it (standard and
//! latent), Gated DeltaNet linear attention over a per-sequence state, the SwiGLU MLP and the
//! mixture of experts.

pub mod attention;
pub mod delta_net;
pub mod expert_cache;
pub mod kv_cache;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod norm;

pub use attention::Attention;
pub use delta_net::GatedDeltaNet;
pub use expert_cache::{EvictionPolicy, ExpertCache, ExpertCacheOptions, ExpertCacheStats};
pub use kv_cache::{CacheSpec, KvCache, LayerCache};
pub use linear::Linear;
pub use mlp::Mlp;
pub use moe::{MoeStats, SparseMoe};
pub use norm::RmsNorm;
