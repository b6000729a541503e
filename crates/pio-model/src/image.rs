//! Images for the vision-language models: decoding, Qwen2-VL's `smart_resize`, the resize, the
//! normalization and the patch layout the vision tower reads, as transformers'
//! `Qwen2VLImageProcessor` (the one Qwen3-VL's processor uses) computes them.
//!
//! An image becomes `grid_t · grid_h · grid_w` patches (`grid_t` = 1 for an image: its one frame
//! is repeated `temporal_patch_size` times), each a row of `3 · temporal_patch_size ·
//! patch_size²` values ordered channel, frame, y, x. Rows come in merge-window order: each run of
//! `merge_size²` rows is one window of neighbouring patches, row-major inside it, and the
//! windows row-major over the image, so the merger can take consecutive rows.

use std::path::Path;

use crate::{Error, Result};

/// Longest side accepted from a file before any resizing: larger images are refused rather
/// than decoded (a 16384 x 16384 RGB image is already 768 MiB).
pub const MAX_SIDE: u32 = 16_384;

/// Most pixels accepted from a file before any resizing.
pub const MAX_DECODED_PIXELS: u64 = 64 << 20;

/// The widest aspect ratio `smart_resize` accepts, as transformers does.
const MAX_ASPECT: f64 = 200.0;

/// What the processor does to an image (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    /// Bounds on the resized image's pixel count (`size.shortest_edge` / `size.longest_edge`, or
    /// the older `min_pixels` / `max_pixels`, which win where both are given).
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ImageProcessorConfig {
    /// Parses a `preprocessor_config.json`. Values the code does not implement (a resample
    /// filter other than bicubic, a zero patch size) are errors, not ignored.
    pub fn from_json(text: &str) -> Result<ImageProcessorConfig> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("preprocessor config: {e}")))?;
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        let uint = |k: &str, default: Option<usize>| -> Result<usize> {
            match field(k) {
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| Error::Config(format!("preprocessor config: `{k}` is not a whole number: {x}"))),
                None => default.ok_or_else(|| Error::Config(format!("preprocessor config: `{k}` is missing"))),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match field(k) {
                None => Ok(true),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| Error::Config(format!("preprocessor config: `{k}` is not true or false: {x}"))),
            }
        };
        let triple = |k: &str| -> Result<[f32; 3]> {
            let Some(x) = field(k) else { return Err(Error::Config(format!("preprocessor config: `{k}` is missing"))) };
            let vals: Option<Vec<f32>> =
                x.as_array().map(|a| a.iter().filter_map(|n| n.as_f64().map(|f| f as f32)).collect());
            match vals.as_deref() {
                Some(&[a, b, c]) => Ok([a, b, c]),
                _ => Err(Error::Config(format!("preprocessor config: `{k}` is not three numbers: {x}"))),
            }
        };
        let size = field("size");
        let size_key = |k: &str| size.and_then(|s| s.get(k)).and_then(|x| x.as_u64()).map(|n| n as usize);
        let min_pixels = match field("min_pixels") {
            Some(_) => uint("min_pixels", None)?,
            None => size_key("shortest_edge")
                .ok_or_else(|| Error::Config("preprocessor config: no `size.shortest_edge` or `min_pixels`".into()))?,
        };
        let max_pixels = match field("max_pixels") {
            Some(_) => uint("max_pixels", None)?,
            None => size_key("longest_edge")
                .ok_or_else(|| Error::Config("preprocessor config: no `size.longest_edge` or `max_pixels`".into()))?,
        };
        if let Some(r) = field("resample") {
            if r.as_u64() != Some(3) {
                return Err(Error::Config(format!(
                    "preprocessor config: resample {r} (only 3, bicubic, is implemented)"
                )));
            }
        }
        let cfg = ImageProcessorConfig {
            patch_size: uint("patch_size", None)?,
            temporal_patch_size: uint("temporal_patch_size", Some(2))?,
            merge_size: uint("merge_size", Some(2))?,
            min_pixels,
            max_pixels,
            do_resize: flag("do_resize")?,
            do_rescale: flag("do_rescale")?,
            rescale_factor: match field("rescale_factor") {
                None => 1.0 / 255.0,
                Some(x) => x.as_f64().ok_or_else(|| {
                    Error::Config(format!("preprocessor config: `rescale_factor` is not a number: {x}"))
                })? as f32,
            },
            do_normalize: flag("do_normalize")?,
            image_mean: triple("image_mean")?,
            image_std: triple("image_std")?,
        };
        if cfg.patch_size == 0 || cfg.temporal_patch_size == 0 || cfg.merge_size == 0 {
            return Err(Error::Config(format!(
                "preprocessor config: patch {}, temporal patch {}, merge {} must all be positive",
                cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
            )));
        }
        if cfg.min_pixels > cfg.max_pixels {
            return Err(Error::Config(format!(
                "preprocessor config: min pixels {} above max pixels {}",
                cfg.min_pixels, cfg.max_pixels
            )));
        }
        if cfg.image_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(Error::Config(format!("preprocessor config: image_std {:?}", cfg.image_std)));
        }
        Ok(cfg)
    }

    /// Reads `preprocessor_config.json` from a model directory.
    pub fn load(dir: &Path) -> Result<ImageProcessorConfig> {
        let path = dir.join("preprocessor_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        ImageProcessorConfig::from_json(&text).map_err(|e| Error::file(&path, e.to_string()))
    }

    /// The side lengths are rounded to multiples of this: a merge window of patches.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// The bytes of a `data:<type>;base64,<payload>` URL (whitespace in the payload ignored).
pub fn data_url_bytes(url: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(Error::Image("not a data: URL".into()));
    };
    let Some((_, payload)) = rest.split_once(";base64,") else {
        return Err(Error::Image("an image data: URL must be base64 (data:image/png;base64,...)".into()));
    };
    let payload: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(payload.as_bytes())
        .map_err(|e| Error::Image(format!("the image data: URL is not valid base64: {e}")))
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes a PNG, JPEG or WebP file's bytes to RGB (an alpha channel is dropped, grey is
/// replicated, as PIL's `convert("RGB")`). Refuses images above [`MAX_SIDE`] or
/// [`MAX_DECODED_PIXELS`] before decoding them.
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    let bad = |msg: String| Error::Image(msg);
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read the image: {e}")))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        Some(other) => return Err(bad(format!("{other:?} images are not supported (PNG, JPEG and WebP are)"))),
        None => return Err(bad("not a PNG, JPEG or WebP image".into())),
    }
    let (w, h) = reader.into_dimensions().map_err(|e| bad(format!("cannot read the image: {e}")))?;
    if w == 0 || h == 0 {
        return Err(bad(format!("the image is {w} x {h} pixels")));
    }
    if w > MAX_SIDE || h > MAX_SIDE || u64::from(w) * u64::from(h) > MAX_DECODED_PIXELS {
        return Err(bad(format!(
            "the image is {w} x {h} pixels; at most {MAX_SIDE} a side and {MAX_DECODED_PIXELS} pixels are accepted"
        )));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read the image: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(4 * MAX_DECODED_PIXELS * 2);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    let rgb = img.to_rgb8();
    Ok(RgbImage { width: rgb.width() as usize, height: rgb.height() as usize, data: rgb.into_raw() })
}

/// Reads and decodes an image file ([`decode`]).
pub fn open(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes).map_err(|e| Error::file(path, e.to_string()))
}

/// Qwen2-VL's `smart_resize`: the `(height, width)` nearest `(h, w)` whose sides are multiples
/// of `factor` and whose area lies in `[min_pixels, max_pixels]`, keeping the aspect ratio as
/// well as those allow. Rounds half to even, as Python's `round` does (a side of 80 with factor
/// 32 gives 64).
pub fn smart_resize(h: usize, w: usize, factor: usize, min_pixels: usize, max_pixels: usize) -> Result<(usize, usize)> {
    if h == 0 || w == 0 || factor == 0 {
        return Err(Error::Image(format!("cannot resize a {w} x {h} image to multiples of {factor}")));
    }
    let (hf, wf, f) = (h as f64, w as f64, factor as f64);
    if hf.max(wf) / hf.min(wf) > MAX_ASPECT {
        return Err(Error::Image(format!("the image is {w} x {h} pixels: its aspect ratio is above {MAX_ASPECT}")));
    }
    let mut hb = ((hf / f).round_ties_even() * f) as usize;
    let mut wb = ((wf / f).round_ties_even() * f) as usize;
    if hb * wb > max_pixels {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        hb = factor.max(((hf / beta / f).floor() * f) as usize);
        wb = factor.max(((wf / beta / f).floor() * f) as usize);
    } else if hb * wb < min_pixels {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        hb = ((hf * beta / f).ceil() * f) as usize;
        wb = ((wf * beta / f).ceil() * f) as usize;
    }
    Ok((hb, wb))
}

/// Resizes with the antialiased bicubic filter torchvision's and PIL's bicubic resize use:
/// Keys' cubic with a = −0.5, its support widened by the scale when shrinking, horizontal pass
/// then vertical (vertical first for a wider, shorter image, as Pillow 13), each rounded to 8
/// bits with PIL's 22-bit fixed-point weights.
///
/// Written here rather than taken from the `image` crate: its Catmull-Rom resize (the same
/// kernel) keeps the intermediate in f32, and where the cubic overshoots (sharp edges, when
/// enlarging) that differs from PIL and torchvision by up to 13 levels; this matches PIL.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    if img.data.len() != img.width * img.height * 3 || img.width == 0 || img.height == 0 || width == 0 || height == 0 {
        return Err(Error::Image(format!("cannot resize {} x {} to {width} x {height}", img.width, img.height)));
    }
    if (width, height) == (img.width, img.height) {
        return Ok(img.clone());
    }
    // Pillow (13) shrinks first when one axis grows and the other shrinks: a wider, shorter
    // image takes its vertical pass first (measured against Pillow on every mix of directions).
    if width > img.width && height < img.height {
        return Ok(horizontal(&vertical(img, height), width));
    }
    let wide = if width != img.width { horizontal(img, width) } else { img.clone() };
    Ok(if height != img.height { vertical(&wide, height) } else { wide })
}

/// `img` resampled to `width` columns (rows unchanged).
fn horizontal(img: &RgbImage, width: usize) -> RgbImage {
    let taps = Taps::new(img.width, width);
    let mut out = vec![0u8; width * img.height * 3];
    for (src, dst) in img.data.chunks_exact(img.width * 3).zip(out.chunks_exact_mut(width * 3)) {
        for (x, px) in dst.chunks_exact_mut(3).enumerate() {
            let (first, w) = taps.at(x);
            for (c, v) in px.iter_mut().enumerate() {
                *v = taps.apply(w, |k| src[(first + k) * 3 + c]);
            }
        }
    }
    RgbImage { width, height: img.height, data: out }
}

/// `img` resampled to `height` rows (columns unchanged).
fn vertical(img: &RgbImage, height: usize) -> RgbImage {
    let taps = Taps::new(img.height, height);
    let row = img.width * 3;
    let mut out = vec![0u8; row * height];
    for (y, dst) in out.chunks_exact_mut(row).enumerate() {
        let (first, w) = taps.at(y);
        for (i, v) in dst.iter_mut().enumerate() {
            *v = taps.apply(w, |k| img.data[(first + k) * row + i]);
        }
    }
    RgbImage { width: img.width, height, data: out }
}

/// PIL's resampling taps along one axis: for each output index, the first input index and
/// the fixed-point weights of the inputs from there.
struct Taps {
    first: Vec<usize>,
    /// `len` weights per output, zero past each output's own count.
    weights: Vec<i64>,
    len: usize,
}

impl Taps {
    /// Fractional bits of the weights (PIL: 32 − 8 − 2 for 8-bit images).
    const BITS: u32 = 22;

    fn new(input: usize, output: usize) -> Taps {
        // Keys' cubic, a = −0.5, support 2.
        fn cubic(x: f64) -> f64 {
            const A: f64 = -0.5;
            let x = x.abs();
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
        let scale = input as f64 / output as f64;
        let filter_scale = scale.max(1.0);
        let support = 2.0 * filter_scale;
        let len = support.ceil() as usize * 2 + 1;
        let mut first = Vec::with_capacity(output);
        let mut weights = vec![0i64; output * len];
        for (o, w) in weights.chunks_exact_mut(len).enumerate() {
            let center = (o as f64 + 0.5) * scale;
            // PIL truncates toward zero here (`(int)`), then clamps to the input.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(input as i64).max(lo as i64) as usize;
            let tap = |i: usize| cubic((i as f64 - center + 0.5) / filter_scale);
            let total: f64 = (lo..hi).take(len).map(tap).sum();
            for (dst, i) in w.iter_mut().zip(lo..hi) {
                let k = if total != 0.0 { tap(i) / total } else { 0.0 };
                // PIL rounds half away from zero.
                *dst = (k * (1i64 << Self::BITS) as f64).round() as i64;
            }
            first.push(lo);
        }
        Taps { first, weights, len }
    }

    /// The first input index and the weights of output `o`.
    fn at(&self, o: usize) -> (usize, &[i64]) {
        (self.first[o], &self.weights[o * self.len..(o + 1) * self.len])
    }

    /// `Σ w_k · value(k)` over the nonzero weights, rounded and clamped to 8 bits.
    fn apply(&self, w: &[i64], value: impl Fn(usize) -> u8) -> u8 {
        let mut acc = 1i64 << (Self::BITS - 1);
        for (k, &wk) in w.iter().enumerate() {
            if wk != 0 {
                acc += wk * i64::from(value(k));
            }
        }
        (acc >> Self::BITS).clamp(0, 255) as u8
    }
}

/// An image as the vision tower takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// `[grid_t · grid_h · grid_w, 3 · temporal_patch_size · patch_size²]`, rows in merge-window
    /// order (module docs).
    pub data: Vec<f32>,
    /// `(grid_t, grid_h, grid_w)` in patches.
    pub grid: [usize; 3],
    /// Values per row.
    pub row_len: usize,
}

impl PixelValues {
    pub fn num_patches(&self) -> usize {
        self.grid.iter().product()
    }

    /// How many `<|image_pad|>` tokens stand for this image: a token per merge window.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size).max(1)
    }
}

/// The whole processor: resize (when the config asks and the size changes), rescale,
/// normalize, repeat the frame and lay the patches out.
pub fn preprocess(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<PixelValues> {
    if img.data.len() != img.width * img.height * 3 {
        return Err(Error::Image(format!(
            "{} bytes are not a {} x {} RGB image",
            img.data.len(),
            img.width,
            img.height
        )));
    }
    let factor = cfg.factor();
    let (h, w) = if cfg.do_resize {
        smart_resize(img.height, img.width, factor, cfg.min_pixels, cfg.max_pixels)?
    } else {
        (img.height, img.width)
    };
    if h % factor != 0 || w % factor != 0 || h == 0 || w == 0 {
        return Err(Error::Image(format!(
            "a {w} x {h} image is not made of whole {factor} x {factor} merge windows (resizing is off)"
        )));
    }
    let resized;
    let img = if (w, h) != (img.width, img.height) {
        resized = resize_bicubic(img, w, h)?;
        &resized
    } else {
        img
    };
    // value = (u8 · rescale − mean) / std, per channel, in f32 as the processor computes it.
    let scale = if cfg.do_rescale { cfg.rescale_factor } else { 1.0 };
    let (mean, std) = if cfg.do_normalize { (cfg.image_mean, cfg.image_std) } else { ([0.0; 3], [1.0; 3]) };
    let lut: [[f32; 256]; 3] = std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 * scale - mean[c]) / std[c]));
    let (p, tp, m) = (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size);
    let (gh, gw) = (h / p, w / p);
    let row_len = 3 * tp * p * p;
    let mut data = Vec::with_capacity(gh * gw * row_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for (c, lut) in lut.iter().enumerate() {
                        // Every frame is the image itself.
                        for _ in 0..tp {
                            for y in y0..y0 + p {
                                let row = &img.data[(y * w + x0) * 3..(y * w + x0 + p) * 3];
                                data.extend(row.chunks_exact(3).map(|px| lut[usize::from(px[c])]));
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(PixelValues { data, grid: [1, gh, gw], row_len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthetic/qwen3_vl")
    }

    #[test]
    fn smart_resize_matches_the_processor() {
        // Within bounds: rounded to multiples of 32, halves to even.
        assert_eq!(smart_resize(96, 64, 32, 4096, 16384).ok(), Some((96, 64)));
        assert_eq!(smart_resize(80, 80, 32, 0, 1 << 20).ok(), Some((64, 64)));
        assert_eq!(smart_resize(112, 48, 32, 0, 1 << 20).ok(), Some((128, 64)));
        assert_eq!(smart_resize(100, 100, 32, 0, 1 << 20).ok(), Some((96, 96)));
        // Too many pixels: scaled down, floored, at least one factor a side.
        assert_eq!(smart_resize(1000, 2000, 32, 0, 65536).ok(), Some((160, 352)));
        // One side held at a factor: the area may then stay above the bound, as in transformers.
        assert_eq!(smart_resize(32, 6000, 32, 0, 65536).ok(), Some((32, 3488)));
        // Too few: scaled up, ceiled.
        assert_eq!(smart_resize(20, 30, 32, 65536, 1 << 24).ok(), Some((224, 320)));
        // 1024 x 768 stays (the real model's bounds).
        assert_eq!(smart_resize(768, 1024, 32, 65536, 16_777_216).ok(), Some((768, 1024)));
        assert!(smart_resize(10, 2500, 32, 0, 1 << 24).is_err(), "aspect ratio above 200");
        assert!(smart_resize(0, 10, 32, 0, 1 << 24).is_err());
    }

    #[test]
    fn config_reads_the_fixture_and_refuses_what_it_cannot_do() {
        let cfg = ImageProcessorConfig::load(&fixture()).expect("fixture config");
        assert_eq!((cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size), (16, 2, 2));
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (4096, 16384));
        assert_eq!((cfg.image_mean, cfg.image_std), ([0.5; 3], [0.5; 3]));
        let base: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture().join("preprocessor_config.json")).expect("read"))
                .expect("json");
        let with = |k: &str, v: serde_json::Value| {
            let mut c = base.clone();
            c[k] = v;
            ImageProcessorConfig::from_json(&c.to_string())
        };
        assert!(with("resample", 2.into()).is_err(), "bilinear is not implemented");
        assert!(with("patch_size", 0.into()).is_err());
        assert!(with("image_std", serde_json::json!([0.5, 0.0, 0.5])).is_err());
        assert!(with("image_mean", serde_json::json!([0.5, 0.5])).is_err());
        let legacy = with("min_pixels", 1000.into()).expect("legacy keys");
        assert_eq!(legacy.min_pixels, 1000);
        assert!(ImageProcessorConfig::from_json("{").is_err());
    }

    /// The fixture's `image.png` (64 wide, 96 high: no resize) gives transformers'
    /// `image_pixel_values` and grid.
    #[test]
    fn fixture_image_gives_the_reference_pixel_values() {
        let cfg = ImageProcessorConfig::load(&fixture()).expect("config");
        let img = open(&fixture().join("image.png")).expect("image");
        assert_eq!((img.width, img.height), (64, 96));
        let px = preprocess(&img, &cfg).expect("preprocess");
        assert_eq!(px.grid, [1, 6, 4]);
        assert_eq!(px.num_tokens(cfg.merge_size), 6);
        let bytes = std::fs::read(fixture().join("reference.safetensors")).expect("reference");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let t = st.tensor("image_pixel_values").expect("image_pixel_values");
        assert_eq!(t.shape(), &[24, 1536]);
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let want: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(px.data.len(), want.len());
        let worst = px.data.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "largest difference {worst}");
        let grid = st.tensor("image_grid_thw").expect("grid");
        let g: Vec<i64> =
            grid.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
        assert_eq!(g, vec![1, 6, 4]);
    }

    /// An image that `smart_resize` changes (151 x 101 -> 160 x 96: wider and shorter, which
    /// Pillow resamples vertically first) gives what transformers' Qwen2-VL processor gives
    /// (`testdata/images/make_processor_ref.py`, its PIL backend): the same grid and values.
    #[test]
    fn a_resized_image_gives_the_processor_pixel_values() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images");
        let cfg = ImageProcessorConfig::load(&fixture()).expect("config");
        let px = preprocess(&open(&dir.join("resize_src.png")).expect("image"), &cfg).expect("preprocess");
        let bytes = std::fs::read(dir.join("processor_resize_src.safetensors")).expect("reference");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let t = st.tensor("pixel_values").expect("pixel_values");
        let want: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let grid = st.tensor("image_grid_thw").expect("grid");
        let g: Vec<i64> =
            grid.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
        assert_eq!(g, vec![1, 6, 10]);
        assert_eq!(px.grid, [1, 6, 10]);
        assert_eq!(px.data.len(), want.len());
        let worst = px.data.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "largest difference {worst}");
    }

    #[test]
    fn resizing_keeps_flat_colours_and_sizes() {
        let img = RgbImage { width: 50, height: 30, data: [10u8, 200, 77].repeat(50 * 30) };
        for (w, h) in [(64, 32), (32, 32), (100, 64)] {
            let out = resize_bicubic(&img, w, h).expect("resize");
            assert_eq!((out.width, out.height, out.data.len()), (w, h, w * h * 3));
            assert!(out.data.chunks_exact(3).all(|p| p == [10, 200, 77]), "{w} x {h}");
        }
        // A 50 x 30 image: under the fixture's 4096 pixels, so scaled up to 96 x 64.
        let cfg = ImageProcessorConfig::load(&fixture()).expect("config");
        let px = preprocess(&img, &cfg).expect("preprocess");
        assert_eq!(px.grid, [1, 4, 6]);
        assert_eq!(px.data.len(), 24 * px.row_len);
        let v = (10.0 / 255.0 - 0.5) / 0.5;
        assert!((px.data[0] - v).abs() < 1e-6);
    }

    /// Pillow's BICUBIC resizes (`testdata/images/make_resize_refs.py`), enlarging, shrinking and
    /// both at once, reproduced exactly.
    #[test]
    fn resize_matches_pillow() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images");
        let src = open(&dir.join("resize_src.png")).expect("source");
        for (w, h) in [(224, 160), (64, 32), (96, 150), (160, 96)] {
            let want = open(&dir.join(format!("resize_pil_{w}x{h}.png"))).expect("reference");
            let got = resize_bicubic(&src, w, h).expect("resize");
            assert_eq!((got.width, got.height), (want.width, want.height));
            let worst = got.data.iter().zip(&want.data).map(|(a, b)| a.abs_diff(*b)).max();
            assert_eq!(worst, Some(0), "{w} x {h}");
        }
    }

    #[test]
    fn bad_images_are_errors() {
        assert!(decode(b"").is_err());
        assert!(decode(b"not an image at all").is_err());
        let png = std::fs::read(fixture().join("image.png")).expect("png");
        let cut = decode(&png[..png.len() / 2]).expect_err("truncated");
        assert!(cut.to_string().contains("image"), "{cut}");
        // A GIF header: recognised, not supported.
        let gif = decode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;");
        assert!(gif.is_err());
    }
}
