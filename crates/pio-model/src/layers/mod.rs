//! Building blocks shared by every model: projections over any weight format, normalization,
//! attention over the paged cache.

pub mod attention;
pub mod linear;
pub mod norm;

pub use attention::{Attention, KvCache};
pub use linear::Linear;
pub use norm::RmsNorm;
