//! `y = x Wᵀ + b` with `W` in any storage format.

use pio_kernels::{matmul, ops, DType};

use crate::weights::{Checkpoint, Tensor};
use crate::Result;

/// A projection `[in_features] -> [out_features]`. The weight's format (F32, BF16, Q4_K, ...)
/// is a property of the weight tensor, not of the model.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`.
    pub bias: Option<Vec<f32>>,
    /// BF16 weights only: multiply bf16-rounded activations where the CPU has AVX-512 BF16
    /// (see [`pio_kernels::dot::float::bf16_activations`]); chosen at load
    /// ([`crate::LoadOptions::bf16_activations`]).
    pub bf16_activations: bool,
    /// Every product has many tokens: a vision tower's matrices (see
    /// [`pio_kernels::matmul::WeightView::prefill_only`]).
    pub prefill_only: bool,
}

impl Linear {
    /// A projection with f32 activations.
    pub fn new(weight: Tensor, bias: Option<Vec<f32>>) -> Linear {
        Linear { weight, bias, bf16_activations: false, prefill_only: false }
    }

    /// The weight as the kernels take it.
    pub fn view(&self) -> matmul::WeightView<'_> {
        matmul::WeightView {
            bf16_activations: self.bf16_activations,
            prefill_only: self.prefill_only,
            ..self.weight.matrix()
        }
    }

    /// Takes `{prefix}.weight` (and `{prefix}.bias` when `bias`) from the checkpoint.
    pub fn load(
        ckpt: &mut Checkpoint,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = ckpt.take(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias = if bias { Some(ckpt.take(&format!("{prefix}.bias"), &[out_features])?.to_f32_vec()) } else { None };
        Ok(Linear::new(weight, bias))
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape[0]
    }

    pub fn dtype(&self) -> DType {
        self.weight.dtype
    }

    /// `x`: `[n, in_features]` -> `[n, out_features]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.in_features();
        let mut y = vec![0f32; n * self.out_features()];
        matmul::matmul(self.view(), x, n, &mut y);
        if let Some(b) = &self.bias {
            ops::add_bias_rows(&mut y, b);
        }
        y
    }

    /// Several projections of the same input (q/k/v, gate/up) in one threaded pass: see
    /// [`matmul::matmul_many`]. Each output equals its own [`Linear::forward`] bitwise.
    pub fn forward_many(layers: &[&Linear], x: &[f32]) -> Vec<Vec<f32>> {
        let Some(first) = layers.first() else { return Vec::new() };
        let n = x.len() / first.in_features();
        let views: Vec<_> = layers.iter().map(|l| l.view()).collect();
        let mut ys = matmul::matmul_many(&views, x, n);
        for (y, l) in ys.iter_mut().zip(layers) {
            if let Some(b) = &l.bias {
                ops::add_bias_rows(y, b);
            }
        }
        ys
    }

    /// Projections each with its own input: `layers[i]` applied to `inputs[input_of[i]]`
    /// (`(x, n)`, `x` being `[n, in_features]`), all in one threaded pass (see
    /// [`matmul::matmul_multi`]): the experts of a mixture, the heads of latent attention.
    /// Each output equals its own [`Linear::forward`] bitwise.
    pub fn forward_each(layers: &[&Linear], input_of: &[usize], inputs: &[(&[f32], usize)]) -> Vec<Vec<f32>> {
        let views: Vec<_> = layers.iter().map(|l| l.view()).collect();
        let mut ys = matmul::matmul_multi(&views, input_of, inputs);
        for (y, l) in ys.iter_mut().zip(layers) {
            if let Some(b) = &l.bias {
                ops::add_bias_rows(y, b);
            }
        }
        ys
    }
}
