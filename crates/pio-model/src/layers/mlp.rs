//! The SwiGLU feed-forward block: dense layers, each expert of a mixture, shared experts.

use pio_kernels::ops;

use crate::layers::Linear;
use crate::weights::Checkpoint;
use crate::Result;

/// `down(silu(gate(x)) * up(x))`, `[n, hidden] -> [n, hidden]`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`.
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// Takes `{prefix}.{gate,up,down}_proj.weight` (and biases when `bias`).
    pub fn load(ckpt: &mut Checkpoint, prefix: &str, hidden: usize, inter: usize, bias: bool) -> Result<Mlp> {
        Ok(Mlp {
            gate_proj: Linear::load(ckpt, &format!("{prefix}.gate_proj"), hidden, inter, bias)?,
            up_proj: Linear::load(ckpt, &format!("{prefix}.up_proj"), hidden, inter, bias)?,
            down_proj: Linear::load(ckpt, &format!("{prefix}.down_proj"), inter, hidden, bias)?,
        })
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let [mut gate, up]: [Vec<f32>; 2] = Linear::forward_many(&[&self.gate_proj, &self.up_proj], x)
            .try_into()
            .unwrap_or_else(|_| unreachable!("two projections in, two out"));
        ops::swiglu(&mut gate, &up);
        self.down_proj.forward(&gate)
    }

    /// The three matrices.
    pub fn linears(&self) -> [&Linear; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    /// The three matrices, to rearrange at load.
    pub fn linears_mut(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }

    /// Weight bytes of the three matrices.
    pub fn weight_bytes(&self) -> usize {
        self.linears().iter().map(|l| l.weight.bytes().len()).sum()
    }
}
