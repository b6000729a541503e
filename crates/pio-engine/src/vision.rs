//! A request's images: their placeholders in the prompt, the vision tower's features (computed
//! once per image, a tower block at a time over the engine's steps, and kept while the request
//! lives), the multimodal rotary positions, and the spans the prefix cache keys blocks by.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use pio_model::config::VisionConfig;
use pio_model::image::PixelValues;
use pio_model::models::vision::{rope_positions, EncodeJob, ImageFeatures, VisionEncoder};
use pio_model::CausalLm;

use crate::kv_cache::ImageSpan;
use crate::{EngineError, Result};

/// What a request with images carries through the engine.
#[derive(Debug, Clone)]
pub(crate) struct VisionInputs {
    /// Per image, in prompt order.
    pub(crate) features: Vec<Arc<ImageFeatures>>,
    /// `(t, h, w)` rotary positions of the prompt's tokens.
    pub(crate) positions: Vec<[usize; 3]>,
    /// A token at index `p` past the prompt is at `p + delta` on every axis.
    pub(crate) delta: i64,
}

impl VisionInputs {
    /// The rotary position of token `p` of the sequence.
    pub(crate) fn position(&self, p: usize) -> [usize; 3] {
        match self.positions.get(p) {
            Some(&x) => x,
            None => [(p as i64 + self.delta).max(0) as usize; 3],
        }
    }
}

/// `<|vision_start|><|image_pad|><|vision_end|>` for each of `images` images that `ids` holds
/// no run of image tokens for: what goes before a prompt's text for the images it does not
/// place itself.
pub fn missing_placeholders(c: &VisionConfig, ids: &[u32], images: usize) -> Vec<u32> {
    let t = c.image_token_id;
    let runs = ids.iter().enumerate().filter(|&(i, &x)| x == t && (i == 0 || ids[i - 1] != t)).count();
    (runs..images).flat_map(|_| [c.vision_start_token_id, t, c.vision_end_token_id]).collect()
}

/// `prompt` with each run of `image_token` made as long as its image's token count
/// (`counts`, in order): a run already that long stays, a single token is repeated. Any other
/// run, or a number of runs other than the number of images, is an error.
pub fn expand_image_tokens(prompt: &[u32], image_token: u32, counts: &[usize]) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(prompt.len() + counts.iter().sum::<usize>());
    let mut images = counts.iter();
    let mut runs = 0;
    let mut i = 0;
    while i < prompt.len() {
        if prompt[i] != image_token {
            out.push(prompt[i]);
            i += 1;
            continue;
        }
        let run = prompt[i..].iter().take_while(|&&t| t == image_token).count();
        runs += 1;
        let Some(&n) = images.next() else {
            return Err(EngineError::Invalid(format!(
                "the prompt has more image placeholders than the {} images given",
                counts.len()
            )));
        };
        if run != 1 && run != n {
            return Err(EngineError::Invalid(format!(
                "image {runs} takes {n} tokens, but its placeholder run has {run} (give one, or exactly {n})"
            )));
        }
        out.extend(std::iter::repeat_n(image_token, n));
        i += run;
    }
    if runs != counts.len() {
        return Err(EngineError::Invalid(format!(
            "{} images but {runs} image placeholders in the prompt",
            counts.len()
        )));
    }
    Ok(out)
}

/// A hash of an image's content as the tower sees it (grid and values).
fn content_hash(p: &PixelValues) -> u64 {
    // SipHash with fixed keys: the same image hashes the same in every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.grid.hash(&mut h);
    for v in &p.data {
        v.to_bits().hash(&mut h);
    }
    h.finish()
}

/// The vision tower's outputs of the most recent images, by content hash: a conversation
/// resends its images every turn, and a server often sees one image in several requests.
#[derive(Debug, Default)]
pub(crate) struct FeatureCache {
    entries: std::collections::VecDeque<(u64, Arc<ImageFeatures>)>,
}

/// Images whose features [`FeatureCache`] keeps.
const CACHED_IMAGES: usize = 8;

impl FeatureCache {
    /// The features of the image with this hash, if kept (then the most recently used).
    fn get(&mut self, hash: u64) -> Option<Arc<ImageFeatures>> {
        // The most recently used at the back.
        let e = self.entries.iter().position(|(h, _)| *h == hash).and_then(|i| self.entries.remove(i))?;
        let f = e.1.clone();
        self.entries.push_back(e);
        Some(f)
    }

    fn put(&mut self, hash: u64, f: Arc<ImageFeatures>) {
        if self.entries.len() == CACHED_IMAGES {
            self.entries.pop_front();
        }
        self.entries.push_back((hash, f));
    }
}

/// A request's images on their way through the tower: the features of those done (or found in
/// the [`FeatureCache`]) and the one under way. The engine advances it between its steps
/// ([`PendingVision::advance`]) and queues the request once every image is done.
#[derive(Debug)]
pub(crate) struct PendingVision {
    images: Vec<Arc<PixelValues>>,
    hashes: Vec<u64>,
    features: Vec<Option<Arc<ImageFeatures>>>,
    /// The first image without features, part way through the tower.
    job: Option<(usize, EncodeJob)>,
    positions: Vec<[usize; 3]>,
    delta: i64,
}

impl PendingVision {
    /// Runs tower blocks for the images still missing, one at a time, as long as `more()`
    /// says (asked after each block, so at least one runs per call while any is left); true
    /// once every image has its features. Finished images go into `cache`, and an image found
    /// there (another request encoded it meanwhile) is not run again.
    pub(crate) fn advance(
        &mut self,
        tower: &VisionEncoder,
        cache: &mut FeatureCache,
        mut more: impl FnMut() -> bool,
    ) -> Result<bool> {
        loop {
            let Some(i) = self.features.iter().position(Option::is_none) else {
                return Ok(true);
            };
            if self.job.as_ref().is_none_or(|(j, _)| *j != i) {
                if let Some(f) = cache.get(self.hashes[i]) {
                    self.features[i] = Some(f);
                    continue;
                }
                self.job = Some((i, tower.begin(&self.images[i])?));
            }
            if let Some((_, job)) = self.job.take_if(|(_, job)| tower.run_block(job)) {
                let f = Arc::new(tower.finish(job));
                cache.put(self.hashes[i], f.clone());
                self.features[i] = Some(f);
            }
            if self.features.iter().all(Option::is_some) {
                return Ok(true);
            }
            if !more() {
                return Ok(false);
            }
        }
    }

    /// Takes what [`FeatureCache`] has of the images (running no tower block); true if that
    /// was all of them.
    pub(crate) fn take_cached(&mut self, cache: &mut FeatureCache) -> bool {
        for (f, &h) in self.features.iter_mut().zip(&self.hashes) {
            if f.is_none() {
                *f = cache.get(h);
            }
        }
        self.features.iter().all(Option::is_some)
    }

    /// What the request carries once [`advance`](Self::advance) returned true.
    pub(crate) fn into_inputs(self) -> Result<VisionInputs> {
        let features = self
            .features
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| EngineError::Invalid("an image was not encoded".into()))?;
        Ok(VisionInputs { features, positions: self.positions, delta: self.delta })
    }
}

/// Readies a request's `images` for `model`: expands their placeholders in `prompt`, has
/// `check` look at the expanded prompt, checks that the tower takes each image, and computes the
/// prompt's rotary positions and image spans. The tower itself runs later, through
/// [`PendingVision::advance`] (a prompt too long for the context costs no tower time). A text
/// prompt to any model passes through (`None`).
pub(crate) fn prepare(
    model: &dyn CausalLm,
    prompt: Vec<u32>,
    images: Vec<Arc<PixelValues>>,
    check: impl FnOnce(&[u32]) -> Result<()>,
) -> Result<(Vec<u32>, Option<PendingVision>, Vec<ImageSpan>)> {
    let Some(vision) = model.vision() else {
        if images.is_empty() {
            check(&prompt)?;
            return Ok((prompt, None, Vec::new()));
        }
        return Err(EngineError::Invalid("this model takes no images".into()));
    };
    let c = vision.config();
    let token = c.image_token_id;
    if images.is_empty() {
        if prompt.contains(&token) {
            return Err(EngineError::Invalid("the prompt has image placeholders but no images were given".into()));
        }
        check(&prompt)?;
        return Ok((prompt, None, Vec::new()));
    }
    let merge = c.spatial_merge_size;
    let counts: Vec<usize> = images.iter().map(|p| p.num_tokens(merge)).collect();
    let prompt = expand_image_tokens(&prompt, token, &counts)?;
    check(&prompt)?;
    for p in &images {
        vision.check(p)?;
    }
    let hashes: Vec<u64> = images.iter().map(|p| content_hash(p)).collect();
    let grids: Vec<[usize; 3]> = images.iter().map(|p| p.grid).collect();
    let (positions, delta) = rope_positions(&prompt, token, &grids, merge)?;
    let mut spans = Vec::with_capacity(images.len());
    let mut i = 0;
    for (&hash, &n) in hashes.iter().zip(&counts) {
        while prompt[i] != token {
            i += 1;
        }
        spans.push(ImageSpan { start: i, len: n, hash });
        i += n;
    }
    let features = vec![None; images.len()];
    Ok((prompt, Some(PendingVision { images, hashes, features, job: None, positions, delta }), spans))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_once() {
        assert_eq!(expand_image_tokens(&[1, 9, 2], 9, &[3]).ok(), Some(vec![1, 9, 9, 9, 2]));
        assert_eq!(expand_image_tokens(&[1, 9, 9, 9, 2], 9, &[3]).ok(), Some(vec![1, 9, 9, 9, 2]));
        assert_eq!(expand_image_tokens(&[9, 2, 9], 9, &[2, 1]).ok(), Some(vec![9, 9, 2, 9]));
        assert!(expand_image_tokens(&[1, 9, 9, 2], 9, &[3]).is_err(), "a run of neither 1 nor 3");
        assert!(expand_image_tokens(&[1, 2], 9, &[3]).is_err(), "an image without a placeholder");
        assert!(expand_image_tokens(&[9, 2, 9], 9, &[1]).is_err(), "a placeholder without an image");
    }
}
