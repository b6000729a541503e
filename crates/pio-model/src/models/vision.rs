//! Qwen3-VL's vision tower: image patches in, one vector per merged window of patches out
//! (what replaces the prompt's `<|image_pad|>` tokens), plus the DeepStack features the text
//! model adds after its first layers.
//!
//! ```text
//! x = patches Wpatchᵀ + b                  [N, hidden]    (the Conv3d over one patch)
//! x += bilinear(pos_embed, grid)           learned square grid, interpolated to the image's
//! for each block b:
//!     h = layer_norm(x)
//!     q, k, v = split(h Wqkvᵀ + bqkv)       [N, heads*hd] each
//!     q, k = rope_2d(q), rope_2d(k)         first half of the rotary frequencies by the
//!                                           patch's row, second half by its column
//!     x += attention(q, k, v) Wprojᵀ + b    every patch of a frame sees every other
//!     x += fc2(gelu_tanh(fc1(layer_norm(x))))
//!     if b is a DeepStack block: ds_b = merger_b(x)   (layer norm after the merge)
//! out = merger(x)                          layer_norm each patch, concatenate the merge
//!                                          window's patches, fc2(gelu(fc1(.)))  [N/4, out]
//! ```
//!
//! The patches come in merge-window order ([`crate::image`]), so a window is consecutive rows.

use pio_kernels::ops::{self, RopeLayout};

use crate::config::VisionConfig;
use crate::image::{ImageProcessorConfig, PixelValues};
use crate::layers::Linear;
use crate::weights::Checkpoint;
use crate::{Error, Result};

/// `nn.LayerNorm` epsilon of every norm in the tower.
const LAYER_NORM_EPS: f32 = 1e-6;

/// Base of the 2-D rotary frequencies.
const ROPE_THETA: f32 = 10000.0;

/// The vision tower of a Qwen3-VL model.
#[derive(Debug)]
pub struct VisionEncoder {
    config: VisionConfig,
    /// How images become this tower's patches.
    processor: ImageProcessorConfig,
    /// The patch Conv3d as a matrix: `[hidden, channels * frames * patch²]`.
    patch_embed: Linear,
    /// `[side * side, hidden]` learned position embeddings.
    pos_embed: Vec<f32>,
    blocks: Vec<VisionBlock>,
    merger: Merger,
    /// One per DeepStack block, in `deepstack_visual_indexes` order.
    deepstack: Vec<Merger>,
    /// `[head_dim / 4]` rotary frequencies, shared by rows and columns.
    inv_freq: Vec<f32>,
}

#[derive(Debug)]
struct VisionBlock {
    norm1: LayerNorm,
    /// `[3 * hidden, hidden]`: q, k, v of every head.
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Merges each window of `merge²` patches into one token of the text model's width.
#[derive(Debug)]
struct Merger {
    /// Over each patch, or (DeepStack's, as wide as `fc1`'s input) over the concatenated window.
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug)]
struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// What the tower made of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFeatures {
    /// `[tokens, out_hidden]`: one vector per merge window, in the order of the image tokens.
    pub embeds: Vec<f32>,
    /// `[deepstack layers][tokens, out_hidden]`.
    pub deepstack: Vec<Vec<f32>>,
    /// `(t, h, w)` of the image in patches.
    pub grid: [usize; 3],
    /// Width of each token's vector (the text model's hidden size).
    pub hidden: usize,
}

impl ImageFeatures {
    /// Image tokens: merge windows.
    pub fn num_tokens(&self) -> usize {
        self.embeds.len() / self.hidden.max(1)
    }
}

/// One image part way through the tower ([`VisionEncoder::begin`]): the hidden states after
/// `next` blocks and the DeepStack features taken so far.
#[derive(Debug)]
pub struct EncodeJob {
    grid: [usize; 3],
    x: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    next: usize,
    deepstack: Vec<(usize, Vec<f32>)>,
}

impl LayerNorm {
    fn load(ckpt: &mut Checkpoint, prefix: &str, dim: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: ckpt.take(&format!("{prefix}.weight"), &[dim])?.to_f32_vec(),
            bias: ckpt.take(&format!("{prefix}.bias"), &[dim])?.to_f32_vec(),
        })
    }

    /// Each row of `x` (rows of `weight.len()`) normalized to zero mean and unit variance
    /// (biased), then scaled and shifted, as `nn.LayerNorm` in f32.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let dim = self.weight.len();
        let mut y = vec![0f32; x.len()];
        for (row, out) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
            let mean = row.iter().sum::<f32>() / dim as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
            let inv = 1.0 / (var + LAYER_NORM_EPS).sqrt();
            for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(&self.weight).zip(&self.bias) {
                *o = (v - mean) * inv * w + b;
            }
        }
        y
    }
}

impl Merger {
    fn load(ckpt: &mut Checkpoint, prefix: &str, c: &VisionConfig, postshuffle: bool) -> Result<Merger> {
        let wide = c.hidden_size * c.merge_unit();
        Ok(Merger {
            norm: LayerNorm::load(ckpt, &format!("{prefix}.norm"), if postshuffle { wide } else { c.hidden_size })?,
            fc1: Linear::load(ckpt, &format!("{prefix}.linear_fc1"), wide, wide, true)?,
            fc2: Linear::load(ckpt, &format!("{prefix}.linear_fc2"), wide, c.out_hidden_size, true)?,
        })
    }

    /// `x`: `[patches, hidden]` in merge-window order -> `[windows, out_hidden]`. The rows of
    /// a window are consecutive, so `[patches, hidden]` is `[windows, merge² * hidden]` as it is.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        // The norm's width decides: per patch or per window, the rows are the same values.
        let mut h = self.fc1.forward(&self.norm.forward(x));
        h.iter_mut().for_each(|v| *v = gelu_erf(*v));
        self.fc2.forward(&h)
    }
}

impl VisionBlock {
    fn load(ckpt: &mut Checkpoint, prefix: &str, c: &VisionConfig) -> Result<VisionBlock> {
        let h = c.hidden_size;
        let linear = |ck: &mut Checkpoint, name: &str, i, o| Linear::load(ck, &format!("{prefix}.{name}"), i, o, true);
        Ok(VisionBlock {
            norm1: LayerNorm::load(ckpt, &format!("{prefix}.norm1"), h)?,
            qkv: linear(ckpt, "attn.qkv", h, 3 * h)?,
            proj: linear(ckpt, "attn.proj", h, h)?,
            norm2: LayerNorm::load(ckpt, &format!("{prefix}.norm2"), h)?,
            fc1: linear(ckpt, "mlp.linear_fc1", h, c.intermediate_size)?,
            fc2: linear(ckpt, "mlp.linear_fc2", c.intermediate_size, h)?,
        })
    }
}

impl VisionEncoder {
    /// Takes the tower's tensors under `prefix` (`model.visual`) from the checkpoint.
    pub fn load(
        ckpt: &mut Checkpoint,
        prefix: &str,
        config: &VisionConfig,
        processor: ImageProcessorConfig,
    ) -> Result<VisionEncoder> {
        let c = config;
        if (processor.patch_size, processor.temporal_patch_size, processor.merge_size)
            != (c.patch_size, c.temporal_patch_size, c.spatial_merge_size)
        {
            return Err(Error::Config(format!(
                "the image processor's patch {}, temporal patch {} and merge {} differ from the vision tower's \
                 {}, {} and {}",
                processor.patch_size,
                processor.temporal_patch_size,
                processor.merge_size,
                c.patch_size,
                c.temporal_patch_size,
                c.spatial_merge_size
            )));
        }
        let h = c.hidden_size;
        let conv = [h, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size];
        let mut weight = ckpt.take(&format!("{prefix}.patch_embed.proj.weight"), &conv)?;
        // The kernel covers the whole patch with stride equal to it: a matrix over the patch's
        // values, which the rows lay out in the kernel's (channel, frame, y, x) order.
        weight.shape = vec![h, c.patch_len()];
        let bias = ckpt.take(&format!("{prefix}.patch_embed.proj.bias"), &[h])?.to_f32_vec();
        let patch_embed = Linear::new(weight, Some(bias));
        let pos_embed = ckpt.take(&format!("{prefix}.pos_embed.weight"), &[c.num_position_embeddings, h])?.to_f32_vec();
        let blocks = (0..c.depth)
            .map(|i| VisionBlock::load(ckpt, &format!("{prefix}.blocks.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        let merger = Merger::load(ckpt, &format!("{prefix}.merger"), c, false)?;
        let deepstack = (0..c.deepstack_visual_indexes.len())
            .map(|i| Merger::load(ckpt, &format!("{prefix}.deepstack_merger_list.{i}"), c, true))
            .collect::<Result<Vec<_>>>()?;
        let mut tower = VisionEncoder {
            config: c.clone(),
            processor,
            patch_embed,
            pos_embed,
            blocks,
            merger,
            deepstack,
            inv_freq: ops::rope_inv_freq(ROPE_THETA, c.head_dim() / 2),
        };
        // Every product of the tower has an image's patches as its tokens (no decode), so its
        // BF16 matrices may run on AMX tiles.
        for l in tower.linears_mut() {
            l.prefill_only = true;
        }
        Ok(tower)
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// How images are turned into this tower's patches.
    pub fn processor(&self) -> &ImageProcessorConfig {
        &self.processor
    }

    /// The tower's matrices, for load-time changes (BF16 activations).
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut all = vec![&mut self.patch_embed];
        for b in &mut self.blocks {
            all.extend([&mut b.qkv, &mut b.proj, &mut b.fc1, &mut b.fc2]);
        }
        for m in std::iter::once(&mut self.merger).chain(&mut self.deepstack) {
            all.extend([&mut m.fc1, &mut m.fc2]);
        }
        all
    }

    /// The tower's matrices.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut all = vec![&self.patch_embed];
        for b in &self.blocks {
            all.extend([&b.qkv, &b.proj, &b.fc1, &b.fc2]);
        }
        for m in std::iter::once(&self.merger).chain(&self.deepstack) {
            all.extend([&m.fc1, &m.fc2]);
        }
        all
    }

    /// Runs the tower over one image's patches.
    pub fn encode(&self, pixels: &PixelValues) -> Result<ImageFeatures> {
        Ok(self.finish(self.begin(pixels)?))
    }

    /// Checks that the tower takes `pixels`: a grid of whole merge windows, rows of its patch
    /// length. [`encode`](Self::encode) and [`begin`](Self::begin) fail exactly when this does.
    pub fn check(&self, pixels: &PixelValues) -> Result<()> {
        let c = &self.config;
        let [t, gh, gw] = pixels.grid;
        let m = c.spatial_merge_size;
        let n = pixels.num_patches();
        if n == 0 || !gh.is_multiple_of(m) || !gw.is_multiple_of(m) {
            return Err(Error::Image(format!(
                "a grid of {t} x {gh} x {gw} patches: need at least one, and height and width in multiples of {m}"
            )));
        }
        if pixels.row_len != c.patch_len() || pixels.data.len() != n * c.patch_len() {
            return Err(Error::Image(format!(
                "{} values in rows of {} for {n} patches: the tower takes rows of {}",
                pixels.data.len(),
                pixels.row_len,
                c.patch_len()
            )));
        }
        Ok(())
    }

    /// Starts encoding one image: its patches embedded, with their positions, ready for the
    /// first block. The tower then runs a block per [`run_block`](Self::run_block), so a caller
    /// (the engine) can spread a large image over many steps; the result is the same however
    /// the blocks are spread.
    pub fn begin(&self, pixels: &PixelValues) -> Result<EncodeJob> {
        self.check(pixels)?;
        let mut x = self.patch_embed.forward(&pixels.data);
        let pos = self.position_embeddings(pixels.grid);
        ops::add_in_place(&mut x, &pos);
        let (cos, sin) = self.rotary(pixels.grid);
        Ok(EncodeJob { grid: pixels.grid, x, cos, sin, next: 0, deepstack: Vec::with_capacity(self.deepstack.len()) })
    }

    /// Runs the next block of `job`; true once every block has run (then nothing is left to
    /// do but [`finish`](Self::finish)).
    pub fn run_block(&self, job: &mut EncodeJob) -> bool {
        let Some(b) = self.blocks.get(job.next) else {
            return true;
        };
        let [_, gh, gw] = job.grid;
        let x = &mut job.x;
        let a = self.attention(b, &b.norm1.forward(x), &job.cos, &job.sin, gh * gw);
        ops::add_in_place(x, &a);
        let mut f = b.fc1.forward(&b.norm2.forward(x));
        ops::gelu_tanh_in_place(&mut f);
        ops::add_in_place(x, &b.fc2.forward(&f));
        if let Some(k) = self.config.deepstack_visual_indexes.iter().position(|&d| d == job.next) {
            job.deepstack.push((k, self.deepstack[k].forward(x)));
        }
        job.next += 1;
        job.next == self.blocks.len()
    }

    /// The features of a job whose blocks have all run ([`run_block`](Self::run_block)
    /// returned true); runs any that have not.
    pub fn finish(&self, mut job: EncodeJob) -> ImageFeatures {
        while !self.run_block(&mut job) {}
        job.deepstack.sort_by_key(|(k, _)| *k);
        debug_assert_eq!(job.x.len(), job.grid.iter().product::<usize>() * self.config.hidden_size);
        ImageFeatures {
            embeds: self.merger.forward(&job.x),
            deepstack: job.deepstack.into_iter().map(|(_, d)| d).collect(),
            grid: job.grid,
            hidden: self.config.out_hidden_size,
        }
    }

    /// The tower's blocks: the steps of an [`EncodeJob`].
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Attention of one block over `h` (`[patches, hidden]`): each frame of `frame` patches
    /// attends within itself, every patch to every patch.
    fn attention(&self, b: &VisionBlock, h: &[f32], cos: &[f32], sin: &[f32], frame: usize) -> Vec<f32> {
        let c = &self.config;
        let (hid, heads, hd) = (c.hidden_size, c.num_heads, c.head_dim());
        let n = h.len() / hid;
        let qkv = b.qkv.forward(h);
        let (mut q, mut k, mut v) = (vec![0f32; n * hid], vec![0f32; n * hid], vec![0f32; n * hid]);
        for (t, row) in qkv.chunks_exact(3 * hid).enumerate() {
            q[t * hid..(t + 1) * hid].copy_from_slice(&row[..hid]);
            k[t * hid..(t + 1) * hid].copy_from_slice(&row[hid..2 * hid]);
            v[t * hid..(t + 1) * hid].copy_from_slice(&row[2 * hid..]);
        }
        let half = hd / 2;
        for t in 0..n {
            let (cs, sn) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            ops::rope_heads_with(&mut q[t * hid..(t + 1) * hid], hd, cs, sn, RopeLayout::SplitHalves);
            ops::rope_heads_with(&mut k[t * hid..(t + 1) * hid], hd, cs, sn, RopeLayout::SplitHalves);
        }
        // Each frame, head by head, as two matrix products (every query sees every key of its
        // frame: no mask, so the scores of a block of queries are one product with the keys as
        // the matrix) and an exact softmax between them. The paged decode kernel took each
        // query alone: at 1024 x 1024 pixels (4096 patches) 45% of the tower's time.
        let mut out = vec![0f32; n * hid];
        // On AMX tiles (keys, values and probabilities rounded to bf16) where the CPU has them,
        // unless the tower's weights are F32 or bf16 activations were turned off: those, and
        // CPUs without AMX, take f32 products.
        let level = pio_kernels::cpu::level();
        let on_amx = b.qkv.dtype() != pio_kernels::DType::F32
            && b.qkv.bf16_activations
            && b.qkv.prefill_only
            && pio_kernels::dot::float::bf16_on_amx(level, hd)
            && pio_kernels::dot::float::bf16_on_amx(level, frame.next_multiple_of(32));
        let scale = 1.0 / (hd as f32).sqrt();
        // Buffers for one block of queries; the columns of `probs` after the keys stay zero.
        let kp = frame.next_multiple_of(32);
        let mut queries = Vec::with_capacity(ATTN_QUERIES * hd);
        let mut scores = vec![0f32; ATTN_QUERIES * frame];
        let mut probs = vec![0f32; ATTN_QUERIES * kp];
        let mut o = vec![0f32; ATTN_QUERIES * hd];
        for f0 in (0..n).step_by(frame) {
            for h in 0..heads {
                let at = |t: usize| (f0 + t) * hid + h * hd;
                let head = HeadOperands::new(on_amx, frame, hd, |t| &k[at(t)..at(t) + hd], |t| &v[at(t)..at(t) + hd]);
                for q0 in (0..frame).step_by(ATTN_QUERIES) {
                    let qn = ATTN_QUERIES.min(frame - q0);
                    queries.clear();
                    (q0..q0 + qn).for_each(|t| queries.extend_from_slice(&q[at(t)..at(t) + hd]));
                    head.scores(&queries, qn, &mut scores[..qn * frame]);
                    softmax_rows(&scores[..qn * frame], frame, scale, &mut probs[..qn * kp]);
                    head.values(&probs[..qn * kp], qn, &mut o[..qn * hd]);
                    for (i, row) in o[..qn * hd].chunks_exact(hd).enumerate() {
                        out[at(q0 + i)..at(q0 + i) + hd].copy_from_slice(row);
                    }
                }
            }
        }
        b.proj.forward(&out)
    }

    /// `[patches, hidden]` position embeddings of a `(t, h, w)` grid in merge-window order: the
    /// learned square grid resampled bilinearly (corners aligned) to `h x w`, as transformers'
    /// `fast_pos_embed_interpolate`.
    fn position_embeddings(&self, [t, gh, gw]: [usize; 3]) -> Vec<f32> {
        let c = &self.config;
        let hid = c.hidden_size;
        let side = c.num_position_embeddings.isqrt();
        let (hs, ws) = (linspace(side, gh), linspace(side, gw));
        // The image's grid in raster order.
        let mut raster = vec![0f32; gh * gw * hid];
        for (i, &y) in hs.iter().enumerate() {
            let (y0, dy) = (y as usize, y - (y as usize) as f32);
            let y1 = (y0 + 1).min(side - 1);
            for (j, &xw) in ws.iter().enumerate() {
                let (x0, dx) = (xw as usize, xw - (xw as usize) as f32);
                let x1 = (x0 + 1).min(side - 1);
                let corners = [
                    (y0 * side + x0, (1.0 - dy) * (1.0 - dx)),
                    (y0 * side + x1, (1.0 - dy) * dx),
                    (y1 * side + x0, dy * (1.0 - dx)),
                    (y1 * side + x1, dy * dx),
                ];
                // transformers sums the four weighted corners in this order.
                let out = &mut raster[(i * gw + j) * hid..(i * gw + j + 1) * hid];
                for (k, (idx, w)) in corners.iter().enumerate() {
                    let e = &self.pos_embed[idx * hid..(idx + 1) * hid];
                    for (o, &v) in out.iter_mut().zip(e) {
                        *o = if k == 0 { v * w } else { *o + v * w };
                    }
                }
            }
        }
        let m = c.spatial_merge_size;
        let mut out = Vec::with_capacity(t * gh * gw * hid);
        for _ in 0..t {
            for (y, x) in merge_window_order(gh, gw, m) {
                out.extend_from_slice(&raster[(y * gw + x) * hid..(y * gw + x + 1) * hid]);
            }
        }
        out
    }

    /// Per patch (merge-window order), the cosines and sines of its `head_dim / 2` rotary
    /// angles: the first half turn by its row, the second by its column.
    fn rotary(&self, [t, gh, gw]: [usize; 3]) -> (Vec<f32>, Vec<f32>) {
        let q = self.inv_freq.len();
        let n = t * gh * gw;
        let (mut cos, mut sin) = (Vec::with_capacity(n * 2 * q), Vec::with_capacity(n * 2 * q));
        for _ in 0..t {
            for (y, x) in merge_window_order(gh, gw, self.config.spatial_merge_size) {
                for p in [y, x] {
                    for &f in &self.inv_freq {
                        let (s, c) = (p as f32 * f).sin_cos();
                        cos.push(c);
                        sin.push(s);
                    }
                }
            }
        }
        (cos, sin)
    }
}

/// Queries whose scores one product computes: `[256, patches]` f32 (4 MiB at 4096 patches).
const ATTN_QUERIES: usize = 256;

/// One head's keys and values as the attention's two products take them (`frame` keys of `hd`
/// values; `kp` = `frame` rounded up to 32, the probabilities' row length, whose columns after
/// the keys are zero).
enum HeadOperands {
    /// BF16 matrices of rows on AMX tiles (activations rounded to bf16 there too): the keys,
    /// and Vᵀ with its keys padded to `kp` with zeros.
    Amx { keys: Vec<u8>, vt: Vec<u8>, frame: usize, hd: usize, kp: usize },
    /// f32 outer products ([`pio_kernels::matmul::matmul_kn`], which suits the short head
    /// dimension: 1.2-1.4x the row-dot tiles at AVX2): the keys transposed (`[hd, frame]`), the
    /// values as they are (`[kp, hd]`, zero rows after the keys).
    F32 { kt: Vec<f32>, vp: Vec<f32>, frame: usize, hd: usize, kp: usize },
}

impl HeadOperands {
    fn new<'a>(
        amx: bool,
        frame: usize,
        hd: usize,
        key: impl Fn(usize) -> &'a [f32],
        value: impl Fn(usize) -> &'a [f32],
    ) -> HeadOperands {
        let kp = frame.next_multiple_of(32);
        if amx {
            let keys: Vec<f32> = (0..frame).flat_map(|t| key(t).iter().copied()).collect();
            let mut vt = vec![0f32; hd * kp];
            for t in 0..frame {
                for (d, &x) in value(t).iter().enumerate() {
                    vt[d * kp + t] = x;
                }
            }
            let bf16 = |x: &[f32]| {
                let mut b = vec![0u8; x.len() * 2];
                pio_kernels::quant::quantize_row(pio_kernels::DType::BF16, x, &mut b);
                b
            };
            return HeadOperands::Amx { keys: bf16(&keys), vt: bf16(&vt), frame, hd, kp };
        }
        let (mut kt, mut vp) = (vec![0f32; hd * frame], vec![0f32; kp * hd]);
        for t in 0..frame {
            for (d, &x) in key(t).iter().enumerate() {
                kt[d * frame + t] = x;
            }
            vp[t * hd..(t + 1) * hd].copy_from_slice(value(t));
        }
        HeadOperands::F32 { kt, vp, frame, hd, kp }
    }

    /// A BF16 matrix of rows on the AMX tiles.
    fn amx_view(bytes: &[u8], rows: usize, cols: usize) -> pio_kernels::matmul::WeightView<'_> {
        pio_kernels::matmul::WeightView {
            bf16_activations: true,
            prefill_only: true,
            ..pio_kernels::matmul::WeightView::rows(pio_kernels::DType::BF16, rows, cols, bytes)
        }
    }

    /// `qn` queries (`[qn, hd]`) times the keys: `out` `[qn, frame]`.
    fn scores(&self, queries: &[f32], qn: usize, out: &mut [f32]) {
        match self {
            HeadOperands::Amx { keys, frame, hd, .. } => {
                pio_kernels::matmul::matmul(Self::amx_view(keys, *frame, *hd), queries, qn, out)
            }
            HeadOperands::F32 { kt, frame, hd, .. } => {
                pio_kernels::matmul::matmul_kn(queries, qn, *hd, kt, *frame, out)
            }
        }
    }

    /// `qn` rows of probabilities (`[qn, kp]`) times the values: `out` `[qn, hd]`.
    fn values(&self, probs: &[f32], qn: usize, out: &mut [f32]) {
        match self {
            HeadOperands::Amx { vt, hd, kp, .. } => {
                pio_kernels::matmul::matmul(Self::amx_view(vt, *hd, *kp), probs, qn, out)
            }
            HeadOperands::F32 { vp, hd, kp, .. } => pio_kernels::matmul::matmul_kn(probs, qn, *kp, vp, *hd, out),
        }
    }
}

/// `scores` (`[queries, keys]`) scaled, each row's softmax written to the rows of `probs`
/// (`padded` columns each, the columns after the keys left zero), rows split across the threads.
fn softmax_rows(scores: &[f32], keys: usize, scale: f32, probs: &mut [f32]) {
    let rows = scores.len() / keys.max(1);
    let padded = probs.len() / rows.max(1);
    let (dst, len) = (probs.as_mut_ptr() as usize, probs.len());
    pio_kernels::parallel::for_each_range(rows, rows * keys, |r0, r1| {
        assert!(r1 * padded <= len);
        // SAFETY: `probs` is borrowed mutably for this call; the threads' row ranges are
        // disjoint, so each writes only its own rows `r0..r1`, which lie inside it (asserted).
        let mine = unsafe { std::slice::from_raw_parts_mut((dst as *mut f32).add(r0 * padded), (r1 - r0) * padded) };
        for (row, p) in scores[r0 * keys..r1 * keys].chunks_exact(keys).zip(mine.chunks_exact_mut(padded)) {
            pio_kernels::ops::softmax_scaled_into(row, scale, &mut p[..keys]);
        }
    });
}

/// The (temporal, height, width) rotary positions of a prompt's tokens, as transformers'
/// `get_rope_index` computes them for images: text runs on from the previous token on all three
/// axes; the `t · h · w / merge²` image tokens of the `i`-th run of `image_token_id` (in
/// `grids[i]`'s patches) take `base + (frame, row, column)` of their merge window, `base` the
/// position after the text before them; text after an image goes on from the image's largest
/// position + 1. Returns the positions and `delta`: the position of a token generated after
/// the prompt is its index + `delta` on every axis.
pub fn rope_positions(
    ids: &[u32],
    image_token_id: u32,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<(Vec<[usize; 3]>, i64)> {
    let mut out = Vec::with_capacity(ids.len());
    let mut next = 0usize;
    let mut images = grids.iter();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image_token_id {
            out.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let Some(&[t, h, w]) = images.next() else {
            return Err(Error::Batch(format!("more images in the prompt than the {} given", grids.len())));
        };
        let (h, w) = (h / merge.max(1), w / merge.max(1));
        let count = t * h * w;
        let run = ids[i..].iter().take_while(|&&id| id == image_token_id).count();
        if run < count || count == 0 {
            return Err(Error::Batch(format!(
                "an image of {count} tokens ({t} x {h} x {w}) has {run} image tokens in the prompt"
            )));
        }
        for ft in 0..t {
            for y in 0..h {
                for x in 0..w {
                    out.push([next + ft, next + y, next + x]);
                }
            }
        }
        next += t.max(h).max(w);
        i += count;
    }
    if images.next().is_some() {
        return Err(Error::Batch(format!("{} images for fewer runs of image tokens in the prompt", grids.len())));
    }
    Ok((out, next as i64 - ids.len() as i64))
}

/// `(row, column)` of each patch of an `h x w` grid in merge-window order: windows of `m x m`
/// row-major over the grid, patches row-major inside each.
fn merge_window_order(h: usize, w: usize, m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..h / m).flat_map(move |by| {
        (0..w / m).flat_map(move |bx| (0..m).flat_map(move |iy| (0..m).map(move |ix| (by * m + iy, bx * m + ix))))
    })
}

/// `torch.linspace(0, side - 1, steps)` in f32, as torch computes it: from the start for the
/// first half of the steps, back from the end for the rest.
fn linspace(side: usize, steps: usize) -> Vec<f32> {
    let end = (side - 1) as f32;
    if steps <= 1 {
        return vec![0.0; steps];
    }
    let step = end / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { step * i as f32 } else { end - step * (steps - 1 - i) as f32 }).collect()
}

/// Exact GELU, `x Φ(x)` (`nn.GELU()`); `erf` from `libm`, which std does not have.
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch() {
        // torch.linspace(0, 7, 6) and (0, 47, 5).
        let close = |a: Vec<f32>, b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(linspace(8, 6), &[0.0, 1.4, 2.8, 4.2, 5.6, 7.0]));
        assert_eq!(linspace(48, 5), vec![0.0, 11.75, 23.5, 35.25, 47.0]);
        assert_eq!(linspace(8, 1), vec![0.0]);
    }

    #[test]
    fn merge_windows_are_row_major_inside_and_out() {
        let order: Vec<_> = merge_window_order(2, 4, 2).collect();
        assert_eq!(order, vec![(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
    }

    #[test]
    fn gelus_at_known_points() {
        assert!((gelu_erf(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((ops::gelu_tanh(1.0) - 0.841_192).abs() < 1e-6);
        assert_eq!(gelu_erf(0.0), 0.0);
    }
}
