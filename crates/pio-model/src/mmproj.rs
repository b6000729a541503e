//! Qwen3-VL's vision tower as llama.cpp keeps it: a second GGUF file beside the text model's
//! (`mmproj`, `general.architecture = "clip"`, `clip.projector_type = "qwen3vl_merger"`), read
//! with `--mmproj PATH` as llama.cpp's tools do, and written by `pio synth` and `pio quantize`
//! so that `llama-mtmd-cli` runs the same files.
//!
//! What differs from the Hugging Face checkpoint (`model.visual.*`), as llama.cpp's converter
//! writes it:
//! - names: `v.blk.N.{ln1, attn_qkv, attn_out, ln2, ffn_up, ffn_down}`, `v.post_ln` and
//!   `mm.0` / `mm.2` for the merger, `v.deepstack.L.{norm, fc1, fc2}` where `L` is the ViT block
//!   the DeepStack merger reads (not its index in the list);
//! - the patch Conv3d `[hidden, 3, frames, p, p]` is one 2-D kernel per frame:
//!   `v.patch_embd.weight`, `v.patch_embd.weight.1`;
//! - types: 1-D tensors and the position embeddings F32; the patch kernels F16 when the file is
//!   F16, else F32; the other matrices in the file's type (f32, f16, bf16 or q8_0: what the
//!   converter's `--outtype` offers; a text model in a smaller format gets an F16 mmproj, as
//!   llama.cpp's model pages pair them);
//! - the image processor's mean and std are in the file; its pixel bounds the converter does not
//!   write. We write them under llama.cpp's keys for them (`clip.vision.image_min_pixels`,
//!   `image_max_pixels`, which its Qwen-VL projectors ignore: they use fixed token bounds) and
//!   read a file without them with the bounds Qwen3-VL's `preprocessor_config.json` ships, so
//!   a GGUF pair gives the same image tokens as the Hugging Face directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pio_kernels::DType;

use crate::config::{ModelConfig, VisionConfig};
use crate::image::ImageProcessorConfig;
use crate::weights::gguf::{GgufFile, Value};
use crate::weights::{Checkpoint, Storage, Tensor};
use crate::{Error, Result};

/// `clip.projector_type` of a Qwen3-VL vision file.
pub const PROJECTOR_TYPE: &str = "qwen3vl_merger";

/// Pixel bounds of Qwen3-VL's image processor (`size.shortest_edge` / `size.longest_edge` of
/// its `preprocessor_config.json`), which the mmproj file does not carry.
const MIN_PIXELS: usize = 65_536;
const MAX_PIXELS: usize = 16_777_216;

/// The layer norm epsilon our vision tower uses (`nn.LayerNorm(eps=1e-6)`).
const LAYER_NORM_EPS: f32 = 1e-6;

/// Per-block names: clip suffix after `v.blk.N.` -> Hugging Face suffix after `blocks.N.`.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("ln1", "norm1"),
    ("attn_qkv", "attn.qkv"),
    ("attn_out", "attn.proj"),
    ("ln2", "norm2"),
    ("ffn_up", "mlp.linear_fc1"),
    ("ffn_down", "mlp.linear_fc2"),
];

/// Whole-tower names (each with `.weight` and `.bias`): clip -> Hugging Face after `model.visual.`.
const TOWER_NAMES: &[(&str, &str)] = &[
    ("v.patch_embd", "patch_embed.proj"),
    ("v.position_embd", "pos_embed"),
    ("v.post_ln", "merger.norm"),
    ("mm.0", "merger.linear_fc1"),
    ("mm.2", "merger.linear_fc2"),
];

/// DeepStack merger names: clip suffix after `v.deepstack.L.` -> Hugging Face suffix after
/// `deepstack_merger_list.j.`.
const DEEPSTACK_NAMES: &[(&str, &str)] = &[("norm", "norm"), ("fc1", "linear_fc1"), ("fc2", "linear_fc2")];

const HF_PREFIX: &str = "model.visual.";

/// The Hugging Face name (`model.visual.*`) of clip tensor `name`; `deepstack` lists the ViT
/// blocks DeepStack mergers read, in order. The patch kernels of frames after the first
/// (`v.patch_embd.weight.1`) have none: they are parts of one Hugging Face tensor.
pub fn to_hf(name: &str, deepstack: &[usize]) -> Option<String> {
    let (stem, kind) = name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = if let Some((_, hf)) = TOWER_NAMES.iter().find(|(c, _)| *c == stem) {
        (*hf).to_string()
    } else if let Some(rest) = stem.strip_prefix("v.blk.") {
        let (block, suffix) = rest.split_once('.')?;
        let block: usize = block.parse().ok()?;
        let (_, hf) = BLOCK_NAMES.iter().find(|(c, _)| *c == suffix)?;
        format!("blocks.{block}.{hf}")
    } else if let Some(rest) = stem.strip_prefix("v.deepstack.") {
        let (layer, suffix) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let j = deepstack.iter().position(|&l| l == layer)?;
        let (_, hf) = DEEPSTACK_NAMES.iter().find(|(c, _)| *c == suffix)?;
        format!("deepstack_merger_list.{j}.{hf}")
    } else {
        return None;
    };
    Some(format!("{HF_PREFIX}{hf}.{kind}"))
}

/// The clip name of Hugging Face tensor `name` (`model.visual.*`), the inverse of [`to_hf`].
/// The patch Conv3d's weight maps to the first frame's kernel, `v.patch_embd.weight`.
pub fn from_hf(name: &str, deepstack: &[usize]) -> Option<String> {
    let rest = name.strip_prefix(HF_PREFIX)?;
    let (stem, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let clip = if let Some((c, _)) = TOWER_NAMES.iter().find(|(_, hf)| *hf == stem) {
        (*c).to_string()
    } else if let Some(rest) = stem.strip_prefix("blocks.") {
        let (block, suffix) = rest.split_once('.')?;
        let block: usize = block.parse().ok()?;
        let (c, _) = BLOCK_NAMES.iter().find(|(_, hf)| *hf == suffix)?;
        format!("v.blk.{block}.{c}")
    } else if let Some(rest) = stem.strip_prefix("deepstack_merger_list.") {
        let (j, suffix) = rest.split_once('.')?;
        let layer = *deepstack.get(j.parse::<usize>().ok()?)?;
        let (c, _) = DEEPSTACK_NAMES.iter().find(|(_, hf)| *hf == suffix)?;
        format!("v.deepstack.{layer}.{c}")
    } else {
        return None;
    };
    Some(format!("{clip}.{kind}"))
}

/// The name of frame `frame`'s patch kernel: `v.patch_embd.weight`, then `.weight.1`, ...
fn patch_kernel_name(frame: usize) -> String {
    match frame {
        0 => "v.patch_embd.weight".to_string(),
        f => format!("v.patch_embd.weight.{f}"),
    }
}

/// Keys (after `qwen3vl.`) of the text file holding the image, video, vision start and vision
/// end token ids: ours, not llama.cpp's, which finds the tokens by name in the vocabulary.
const TOKEN_KEYS: [&str; 4] = ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"];

/// The [`TOKEN_KEYS`] and their ids for `v`.
pub fn token_keys(v: &VisionConfig) -> [(&'static str, u32); 4] {
    let ids = [v.image_token_id, v.video_token_id, v.vision_start_token_id, v.vision_end_token_id];
    [0, 1, 2, 3].map(|i| (TOKEN_KEYS[i], ids[i]))
}

/// Where llama.cpp's tools and ours look for the vision file of text model `text` when none
/// is named: `mmproj-<file name>` beside it (what `pio synth` and `pio quantize` write).
pub fn default_path(text: &Path) -> PathBuf {
    let name = text.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    text.with_file_name(format!("mmproj-{name}"))
}

/// The vision tower of an mmproj file: its config, its image processor and its tensors under
/// Hugging Face names.
pub struct VisionFile {
    pub config: VisionConfig,
    pub processor: ImageProcessorConfig,
    pub checkpoint: Checkpoint,
}

/// Reads the mmproj file `path` for the text model of GGUF file `text` (whose vocabulary
/// names the image and vision marker tokens) and config `text_config`.
pub fn read(path: &Path, text: &GgufFile, text_config: &ModelConfig) -> Result<VisionFile> {
    let g = GgufFile::open(path)?;
    let err = |msg: String| Error::file(path, msg);
    let arch = g.get_str("general.architecture")?;
    if arch != "clip" {
        return Err(err(format!("general.architecture is {arch:?}: an mmproj file is \"clip\"")));
    }
    if g.get("clip.has_vision_encoder").and_then(Value::as_bool) != Some(true) {
        return Err(err("has no vision encoder (clip.has_vision_encoder)".into()));
    }
    let projector = g.get_str("clip.projector_type")?;
    if projector != PROJECTOR_TYPE {
        return Err(err(format!("projector {projector:?}: only {PROJECTOR_TYPE:?} (Qwen3-VL) is supported")));
    }
    let num = |k: &str| g.get_usize(&format!("clip.vision.{k}"));
    if let Some(eps) = g.get("clip.vision.attention.layer_norm_epsilon").and_then(Value::as_f64) {
        if (eps as f32 - LAYER_NORM_EPS).abs() > 1e-9 {
            return Err(err(format!("layer norm epsilon {eps} (the tower implements {LAYER_NORM_EPS})")));
        }
    }
    if g.get("clip.use_gelu").and_then(Value::as_bool) == Some(false) {
        return Err(err("clip.use_gelu is false: Qwen3-VL's tower uses GELU".into()));
    }
    let depth = num("block_count")?;
    let hidden_size = num("embedding_length")?;
    // The DeepStack blocks are the ones with mergers (llama.cpp counts the tensors too).
    let mut deepstack: Vec<usize> = g
        .tensor_order
        .iter()
        .filter_map(|n| n.strip_prefix("v.deepstack.")?.strip_suffix(".fc1.weight")?.parse().ok())
        .collect();
    deepstack.sort_unstable();
    deepstack.dedup();
    if let Some(&l) = deepstack.iter().find(|&&l| l >= depth) {
        return Err(err(format!("a DeepStack merger reads block {l} of {depth}")));
    }
    let frames = (0..).take_while(|&f| g.tensors.contains_key(&patch_kernel_name(f))).count();
    let pos = g.tensors.get("v.position_embd.weight").ok_or_else(|| err("missing v.position_embd.weight".into()))?;
    // The token ids: our keys in the text file, else the vocabulary's tokens by name.
    let tokens = text.get("tokenizer.ggml.tokens").and_then(Value::as_array);
    let token = |key: &str, s: &str| -> Result<u32> {
        if let Some(id) = text.get(&format!("qwen3vl.{key}")).and_then(Value::as_u64) {
            return u32::try_from(id)
                .map_err(|_| Error::file(&text.path, format!("qwen3vl.{key} {id} is not a token id")));
        }
        let id = tokens.and_then(|t| t.iter().position(|v| v.as_str() == Some(s)));
        id.map(|i| i as u32).ok_or_else(|| Error::file(&text.path, format!("no {s} token in the vocabulary")))
    };
    let config = VisionConfig {
        depth,
        hidden_size,
        intermediate_size: num("feed_forward_length")?,
        num_heads: num("attention.head_count")?,
        in_channels: 3,
        patch_size: num("patch_size")?,
        temporal_patch_size: frames,
        spatial_merge_size: g.get("clip.vision.spatial_merge_size").and_then(Value::as_u64).unwrap_or(2) as usize,
        out_hidden_size: num("projection_dim")?,
        num_position_embeddings: pos.shape.first().copied().unwrap_or(0),
        deepstack_visual_indexes: deepstack.clone(),
        image_token_id: token(TOKEN_KEYS[0], "<|image_pad|>")?,
        video_token_id: token(TOKEN_KEYS[1], "<|video_pad|>")?,
        vision_start_token_id: token(TOKEN_KEYS[2], "<|vision_start|>")?,
        vision_end_token_id: token(TOKEN_KEYS[3], "<|vision_end|>")?,
    };
    config.validate(text_config.hidden_size, text_config.num_layers).map_err(|e| err(e.to_string()))?;
    let text_deepstack = text.get("qwen3vl.n_deepstack_layers").and_then(Value::as_u64).unwrap_or(0) as usize;
    if text_deepstack != deepstack.len() {
        return Err(err(format!(
            "{} DeepStack mergers for a text model that adds {text_deepstack} (qwen3vl.n_deepstack_layers): not \
             the pair of files written together",
            deepstack.len()
        )));
    }
    let triple = |k: &str| -> Result<[f32; 3]> {
        let a = g.get(&format!("clip.vision.{k}")).and_then(Value::as_array);
        let v: Option<Vec<f32>> = a.map(|a| a.iter().filter_map(|x| x.as_f64().map(|f| f as f32)).collect());
        match v.as_deref() {
            Some(&[a, b, c]) if [a, b, c].iter().all(|x| x.is_finite()) => Ok([a, b, c]),
            _ => Err(err(format!("clip.vision.{k} is not three numbers"))),
        }
    };
    let processor = ImageProcessorConfig {
        patch_size: config.patch_size,
        temporal_patch_size: frames,
        merge_size: config.spatial_merge_size,
        min_pixels: g.get("clip.vision.image_min_pixels").and_then(Value::as_u64).map_or(MIN_PIXELS, |n| n as usize),
        max_pixels: g.get("clip.vision.image_max_pixels").and_then(Value::as_u64).map_or(MAX_PIXELS, |n| n as usize),
        do_resize: true,
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: triple("image_mean")?,
        image_std: triple("image_std")?,
    };
    if processor.image_std.contains(&0.0) {
        return Err(err("clip.vision.image_std has a zero".into()));
    }
    if processor.min_pixels > processor.max_pixels || processor.max_pixels == 0 {
        return Err(err(format!("image pixel bounds {}..{} are empty", processor.min_pixels, processor.max_pixels)));
    }

    let mut tensors = BTreeMap::new();
    for name in &g.tensor_order {
        if name.starts_with("v.patch_embd.weight") {
            continue;
        }
        let hf =
            to_hf(name, &deepstack).ok_or_else(|| err(format!("tensor {name:?} is not part of Qwen3-VL's tower")))?;
        let t = g.tensor(name).ok_or_else(|| err(format!("tensor {name:?} vanished")))?;
        tensors.insert(hf, t);
    }
    let kernels: Vec<Tensor> = (0..frames).filter_map(|f| g.tensor(&patch_kernel_name(f))).collect();
    if kernels.is_empty() {
        return Err(err("missing the patch kernel v.patch_embd.weight".into()));
    }
    let conv = join_frames(&kernels).map_err(err)?;
    tensors.insert(format!("{HF_PREFIX}patch_embed.proj.weight"), conv);
    Ok(VisionFile { config, processor, checkpoint: Checkpoint::new(path.to_path_buf(), tensors) })
}

/// One Conv3d weight `[out, channels, frames, p, p]` from the per-frame kernels
/// `[out, channels, p, p]` (one format and shape each): each `(out, channel)`'s `p²` values of
/// every frame in turn.
fn join_frames(kernels: &[Tensor]) -> std::result::Result<Tensor, String> {
    let first = &kernels[0];
    let [out, ch, p, q] = first.shape[..] else {
        return Err(format!("the patch kernel has shape {:?}, not [out, channels, p, p]", first.shape));
    };
    if let Some(k) = kernels.iter().find(|k| k.dtype != first.dtype || k.shape != first.shape) {
        return Err(format!(
            "the patch kernels differ: {} {:?} and {} {:?}",
            first.dtype, first.shape, k.dtype, k.shape
        ));
    }
    let plane = first
        .dtype
        .row_bytes(p * q)
        .ok_or_else(|| format!("{} blocks do not divide a {p} x {q} kernel", first.dtype))?;
    let planes = out * ch;
    if kernels.iter().any(|k| k.bytes().len() != planes * plane) {
        return Err("the patch kernels' bytes do not match their shape".into());
    }
    let mut joined = Vec::with_capacity(planes * plane * kernels.len());
    for i in 0..planes {
        for k in kernels {
            joined.extend_from_slice(&k.bytes()[i * plane..(i + 1) * plane]);
        }
    }
    Ok(Tensor {
        dtype: first.dtype,
        shape: vec![out, ch, kernels.len(), p, q],
        storage: Storage::Owned(Arc::new(joined)),
    })
}

/// The `general.*` and `clip.*` keys of the mmproj file of `v` (processed as `p` says), as
/// llama.cpp's converter writes them.
pub fn metadata(v: &VisionConfig, p: &ImageProcessorConfig, name: &str, file_type: u32) -> Vec<(String, Value)> {
    let u32_of = |n: usize| Value::U32(u32::try_from(n).unwrap_or(u32::MAX));
    let floats = |a: [f32; 3]| Value::Array(a.iter().map(|&x| Value::F32(x)).collect());
    let s = |k: &str| format!("clip.vision.{k}");
    vec![
        ("general.architecture".into(), Value::String("clip".into())),
        ("general.type".into(), Value::String("mmproj".into())),
        ("general.name".into(), Value::String(name.to_string())),
        ("general.alignment".into(), Value::U32(32)),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("clip.has_vision_encoder".into(), Value::Bool(true)),
        ("clip.projector_type".into(), Value::String(PROJECTOR_TYPE.into())),
        (s("projection_dim"), u32_of(v.out_hidden_size)),
        (s("image_size"), u32_of(v.num_position_embeddings.isqrt() * v.patch_size)),
        (s("patch_size"), u32_of(v.patch_size)),
        (s("embedding_length"), u32_of(v.hidden_size)),
        (s("feed_forward_length"), u32_of(v.intermediate_size)),
        (s("block_count"), u32_of(v.depth)),
        (s("attention.head_count"), u32_of(v.num_heads)),
        (s("image_mean"), floats(p.image_mean)),
        (s("image_std"), floats(p.image_std)),
        (s("image_min_pixels"), u32_of(p.min_pixels)),
        (s("image_max_pixels"), u32_of(p.max_pixels)),
        ("clip.use_gelu".into(), Value::Bool(true)),
        (s("spatial_merge_size"), u32_of(v.spatial_merge_size)),
        (s("attention.layer_norm_epsilon"), Value::F32(LAYER_NORM_EPS)),
        (
            s("is_deepstack_layers"),
            Value::Array((0..v.depth).map(|i| Value::Bool(v.deepstack_visual_indexes.contains(&i))).collect()),
        ),
    ]
}

/// The type of the mmproj file's matrices when the text model is written as `target`.
pub fn file_type_for(target: DType) -> DType {
    match target {
        DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0 => target,
        _ => DType::F16,
    }
}

/// One tensor of the mmproj file: its clip name, type and shape, and what it holds: the
/// Hugging Face tensor `hf` (`model.visual.*`) whole, or one frame of the patch Conv3d.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub hf: String,
    pub frame: Option<usize>,
}

/// The mmproj tensors of a tower whose Hugging Face tensors are `hf` (name, shape), for a file
/// of type `file_type` (see [`file_type_for`]); a name the table does not know is an error.
pub fn plan(v: &VisionConfig, hf: &[(String, Vec<usize>)], file_type: DType) -> Result<Vec<PlannedTensor>> {
    let mut out = Vec::with_capacity(hf.len() + 1);
    let patch = format!("{HF_PREFIX}patch_embed.proj.weight");
    for (name, shape) in hf {
        if *name == patch {
            let [o, c, t, p, q] = shape[..] else {
                return Err(Error::Config(format!("{name} has shape {shape:?}, not a Conv3d's")));
            };
            // The converter keeps the patch kernels F16 in an F16 file and F32 in any other.
            let dtype = if file_type == DType::F16 { DType::F16 } else { DType::F32 };
            out.extend((0..t).map(|f| PlannedTensor {
                name: patch_kernel_name(f),
                dtype,
                shape: vec![o, c, p, q],
                hf: name.clone(),
                frame: Some(f),
            }));
            continue;
        }
        let clip = from_hf(name, &v.deepstack_visual_indexes)
            .ok_or_else(|| Error::Config(format!("{name} has no name in an mmproj file")))?;
        let dtype = match shape[..] {
            [_, cols] if !clip.starts_with("v.position_embd") => crate::quantize::tensor_type(file_type, cols, false),
            _ => DType::F32,
        };
        out.push(PlannedTensor { name: clip, dtype, shape: shape.clone(), hf: name.clone(), frame: None });
    }
    Ok(out)
}

/// The bytes of `t`, given the values of its whole Hugging Face tensor.
pub fn encode(t: &PlannedTensor, values: &[f32]) -> Vec<u8> {
    let numel: usize = t.shape.iter().product();
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    let vals: Vec<f32> = match t.frame {
        None => values.to_vec(),
        Some(f) => {
            // `[out, ch, frames, p, q]` -> this frame's `[out, ch, p, q]`.
            let plane = t.shape[2] * t.shape[3];
            let frames = values.len() / numel.max(1);
            values.chunks_exact(plane * frames.max(1)).flat_map(|c| &c[f * plane..(f + 1) * plane]).copied().collect()
        }
    };
    crate::synth::encode_parallel(t.dtype, &vals, cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let ds = [5, 11, 17];
        for (clip, hf) in [
            ("v.blk.3.attn_qkv.weight", "model.visual.blocks.3.attn.qkv.weight"),
            ("v.blk.23.ffn_down.bias", "model.visual.blocks.23.mlp.linear_fc2.bias"),
            ("v.post_ln.weight", "model.visual.merger.norm.weight"),
            ("mm.2.bias", "model.visual.merger.linear_fc2.bias"),
            ("v.deepstack.11.fc1.weight", "model.visual.deepstack_merger_list.1.linear_fc1.weight"),
            ("v.position_embd.weight", "model.visual.pos_embed.weight"),
            ("v.patch_embd.bias", "model.visual.patch_embed.proj.bias"),
        ] {
            assert_eq!(to_hf(clip, &ds).as_deref(), Some(hf), "{clip}");
            assert_eq!(from_hf(hf, &ds).as_deref(), Some(clip), "{hf}");
        }
        assert_eq!(to_hf("v.deepstack.4.fc1.weight", &ds), None);
        assert_eq!(to_hf("v.blk.x.ln1.weight", &ds), None);
        assert_eq!(from_hf("model.visual.deepstack_merger_list.3.norm.weight", &ds), None);
        assert_eq!(default_path(Path::new("/m/qwen3vl.gguf")), PathBuf::from("/m/mmproj-qwen3vl.gguf"));
    }

    #[test]
    fn frames_split_and_join_back() {
        // [out 2, ch 3, frames 2, 4 x 4] in F32.
        let vals: Vec<f32> = (0..2 * 3 * 2 * 16).map(|i| i as f32).collect();
        let shape = vec![2, 3, 2, 4, 4];
        let cfg = VisionConfig {
            depth: 0,
            hidden_size: 2,
            intermediate_size: 2,
            num_heads: 1,
            in_channels: 3,
            patch_size: 4,
            temporal_patch_size: 2,
            spatial_merge_size: 2,
            out_hidden_size: 2,
            num_position_embeddings: 4,
            deepstack_visual_indexes: vec![],
            image_token_id: 0,
            video_token_id: 0,
            vision_start_token_id: 0,
            vision_end_token_id: 0,
        };
        let planned = plan(&cfg, &[(format!("{HF_PREFIX}patch_embed.proj.weight"), shape)], DType::BF16).expect("plan");
        assert_eq!(planned.len(), 2);
        assert_eq!(planned[1].name, "v.patch_embd.weight.1");
        let kernels: Vec<Tensor> = planned
            .iter()
            .map(|t| Tensor {
                dtype: t.dtype,
                shape: t.shape.clone(),
                storage: Storage::Owned(Arc::new(encode(t, &vals))),
            })
            .collect();
        // Frame 1 of (out 0, channel 0) starts at value 16.
        assert_eq!(kernels[1].to_f32_vec()[0], 16.0);
        let joined = join_frames(&kernels).expect("join");
        assert_eq!(joined.shape, vec![2, 3, 2, 4, 4]);
        assert_eq!(joined.to_f32_vec(), vals);
    }
}
