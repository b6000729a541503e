//! RMSNorm.

use pio_kernels::ops;

use crate::weights::Checkpoint;
use crate::Result;

/// `x / sqrt(mean(x²) + eps) * weight` over rows of `weight.len()`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[dim]`.
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(ckpt: &mut Checkpoint, name: &str, dim: usize, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: ckpt.take(name, &[dim])?.to_f32_vec(), eps })
    }

    /// Normalizes every row of `x` in place.
    pub fn forward_in_place(&self, x: &mut [f32]) {
        ops::rms_norm_rows(x, &self.weight, self.eps);
    }

    /// Returns the normalized copy of `x`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        self.forward_in_place(&mut y);
        y
    }
}
