//! Turns the scheduled slices of sequences into one flat [`ForwardBatch`] (token ids,
//! positions, cache slots, block tables, which rows' logits to keep), runs the model over the
//! engine's cache, and splits the logits back per sequence.

use pio_model::{CausalLm, ForwardBatch, KvCache, StateSnapshot};

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
}

/// Runs the slices of several sequences as ONE flat batch over `cache` and returns each one's
/// logits rows (`[rows, vocab]` flattened) for positions `logits_from.max(start)..end`.
pub(crate) fn forward(model: &dyn CausalLm, cache: &mut KvCache, slices: &[SeqSlice<'_>]) -> Result<Vec<Vec<f32>>> {
    let bs = cache.block_size;
    let mut batch = ForwardBatch::default();
    let mut rows_per_seq = Vec::with_capacity(slices.len());
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
    if !batch.state_slots.is_empty() && batch.state_slots.len() != slices.len() {
        return Err(EngineError::Invalid("some sequences of a batch have a state slot and some not".into()));
    }
    let out = model.forward(&batch, cache)?;
    let vocab = model.shape().vocab_size;
    let mut result = Vec::with_capacity(slices.len());
    let mut off = 0;
    for rows in rows_per_seq {
        result.push(out[off * vocab..(off + rows) * vocab].to_vec());
        off += rows;
    }
    Ok(result)
}
