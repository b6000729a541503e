//! Turns the scheduled slices of sequences into one flat [`ForwardBatch`] (token ids,
//! positions, cache slots, block tables, which rows' logits to keep), runs the model over the
//! engine's cache, and splits the logits back per sequence.

use pio_model::{CausalLm, ForwardBatch, KvCache, StateSnapshot, VisualEmbeds};

use crate::kv_cache::ImageSpan;
use crate::vision::VisionInputs;
use crate::{EngineError, Result};

/// Tokens `start..start + num_tokens` of one sequence, to run in a batch.
pub(crate) struct SeqSlice<'a> {
    pub(crate) token_ids: &'a [u32],
    pub(crate) start: usize,
    pub(crate) num_tokens: usize,
    /// The sequence's blocks, covering at least `start + num_tokens - shift` positions.
    pub(crate) block_table: &'a [u32],
    /// Tokens dropped before these (a streaming window): position `p` runs at `p - shift`.
    pub(crate) shift: usize,
    /// The first position whose logits are wanted (the slice's end: none).
    pub(crate) logits_from: usize,
    /// The sequence's recurrent-state slot (models with recurrent layers).
    pub(crate) state_slot: Option<u32>,
    /// Copy its state after the tokens before this position into this slot.
    pub(crate) snapshot: Option<(usize, u32)>,
    /// The sequence's images and where their placeholders are (vision-language requests).
    pub(crate) vision: Option<(&'a VisionInputs, &'a [ImageSpan])>,
}

impl<'a> SeqSlice<'a> {
    /// Tokens `start..start + num_tokens` of a plain text sequence (no window, state or
    /// images), as a proposer runs them over its own cache.
    pub(crate) fn text(
        token_ids: &'a [u32],
        start: usize,
        num_tokens: usize,
        logits_from: usize,
        block_table: &'a [u32],
    ) -> SeqSlice<'a> {
        SeqSlice {
            token_ids,
            start,
            num_tokens,
            block_table,
            shift: 0,
            logits_from,
            state_slot: None,
            snapshot: None,
            vision: None,
        }
    }
}

/// Runs the slices of several sequences as ONE flat batch over `cache` and returns each one's
/// logits rows (`[rows, vocab]` flattened) for positions `logits_from.max(start)..end`.
pub(crate) fn forward(model: &dyn CausalLm, cache: &mut KvCache, slices: &[SeqSlice<'_>]) -> Result<Vec<Vec<f32>>> {
    let (batch, rows_per_seq) = build(slices, cache.block_size)?;
    let out = model.forward(&batch, cache)?;
    Ok(split(out, &rows_per_seq, model.shape().vocab_size))
}

/// Rows per slice (`[rows, width]` flattened each).
pub(crate) type PerSeq = Vec<Vec<f32>>;

/// As [`forward`], also returning each slice's final hidden states (every position of it,
/// `[num_tokens, hidden]` flattened).
pub(crate) fn forward_hidden(
    model: &dyn CausalLm,
    cache: &mut KvCache,
    slices: &[SeqSlice<'_>],
) -> Result<(PerSeq, PerSeq)> {
    let (batch, rows_per_seq) = build(slices, cache.block_size)?;
    let (out, hidden) = model.forward_with_hidden(&batch, cache)?;
    let tokens: Vec<usize> = slices.iter().map(|s| s.num_tokens).collect();
    let width = hidden.len() / batch.num_tokens().max(1);
    Ok((split(out, &rows_per_seq, model.shape().vocab_size), split(hidden, &tokens, width)))
}

/// Runs the slices through `model`'s multi-token-prediction layer over its `cache`, with
/// `hidden` one row per batch token (slice by slice); returns each slice's logits rows and their
/// hidden states.
pub(crate) fn forward_mtp(
    model: &dyn CausalLm,
    cache: &mut KvCache,
    slices: &[SeqSlice<'_>],
    hidden: &[f32],
) -> Result<(PerSeq, PerSeq)> {
    let (batch, rows_per_seq) = build(slices, cache.block_size)?;
    let (out, hidden_out) = model.mtp_forward(&batch, hidden, cache)?;
    let width = hidden.len() / batch.num_tokens().max(1);
    Ok((split(out, &rows_per_seq, model.shape().vocab_size), split(hidden_out, &rows_per_seq, width)))
}

/// `out` cut into consecutive pieces of `rows` rows of `width`.
fn split(out: Vec<f32>, rows: &[usize], width: usize) -> Vec<Vec<f32>> {
    if let [r] = rows {
        if r * width == out.len() {
            // One piece (a single sequence's decode step): the vector itself, not a copy of
            // its vocabulary-wide row.
            return vec![out];
        }
    }
    let mut result = Vec::with_capacity(rows.len());
    let mut off = 0;
    for &r in rows {
        result.push(out.get(off * width..(off + r) * width).map(<[f32]>::to_vec).unwrap_or_default());
        off += r;
    }
    result
}

/// The flat batch of `slices`, and how many logits rows each slice has in it.
fn build(slices: &[SeqSlice<'_>], bs: usize) -> Result<(ForwardBatch, Vec<usize>)> {
    let mut batch = ForwardBatch::default();
    let mut rows_per_seq = Vec::with_capacity(slices.len());
    // Multimodal rotary positions for every token once any sequence has images.
    let mrope = slices.iter().any(|s| s.vision.is_some());
    let mut visual = VisualEmbeds::default();
    for (i, s) in slices.iter().enumerate() {
        let end_pos = s.start + s.num_tokens;
        if end_pos > s.token_ids.len() || s.start < s.shift || end_pos - s.shift > s.block_table.len() * bs {
            return Err(EngineError::Invalid(format!(
                "slice {}..{end_pos} runs past its {} tokens or {} blocks",
                s.start,
                s.token_ids.len(),
                s.block_table.len()
            )));
        }
        for pos in s.start..end_pos {
            let at = pos - s.shift;
            if mrope {
                batch.mrope_positions.push(s.vision.map_or([at; 3], |(v, _)| v.position(pos)));
            }
            if let Some((v, spans)) = s.vision {
                if let Some((k, span)) =
                    spans.iter().enumerate().find(|(_, sp)| (sp.start..sp.start + sp.len).contains(&pos))
                {
                    add_image_row(&mut visual, &v.features[k], pos - span.start, batch.token_ids.len())?;
                }
            }
            batch.token_ids.push(s.token_ids[pos]);
            batch.positions.push(at);
            batch.seq_indices.push(i);
            batch.slot_mapping.push(s.block_table[at / bs] as usize * bs + at % bs);
        }
        let end = batch.token_ids.len();
        let first = end - (end_pos - s.logits_from.clamp(s.start, end_pos));
        rows_per_seq.push(end - first);
        batch.logits_indices.extend(first..end);
        batch.block_tables.push(s.block_table.to_vec());
        batch.state_slots.extend(s.state_slot);
        if let Some((position, slot)) = s.snapshot {
            batch.state_snapshots.push(StateSnapshot { seq: i, position: position - s.shift, slot });
        }
    }
    if !visual.rows.is_empty() {
        batch.visual = Some(visual);
    }
    if !batch.state_slots.is_empty() && batch.state_slots.len() != slices.len() {
        return Err(EngineError::Invalid("some sequences of a batch have a state slot and some not".into()));
    }
    Ok((batch, rows_per_seq))
}

/// Adds token `i` of an image's features as batch token `row`'s.
fn add_image_row(
    visual: &mut VisualEmbeds,
    f: &pio_model::models::vision::ImageFeatures,
    i: usize,
    row: usize,
) -> Result<()> {
    let h = f.hidden;
    if (i + 1) * h > f.embeds.len() || f.deepstack.iter().any(|d| d.len() != f.embeds.len()) {
        return Err(EngineError::Invalid(format!("image token {i} is past the image's features")));
    }
    visual.rows.push(row);
    visual.embeds.extend_from_slice(&f.embeds[i * h..(i + 1) * h]);
    if visual.deepstack.len() < f.deepstack.len() {
        visual.deepstack.resize(f.deepstack.len(), Vec::new());
    }
    for (d, ds) in visual.deepstack.iter_mut().zip(&f.deepstack) {
        d.extend_from_slice(&ds[i * h..(i + 1) * h]);
    }
    Ok(())
}
