//! The flat batch a forward pass runs over.

use crate::{Error, Result};

/// The tokens of one or more sequences, concatenated, and where their K/V go.
///
/// The scheduler/runner builds this; the model reads token ids and positions, and only the
/// attention layer reads the cache fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardBatch {
    /// `[num_tokens]` token ids, sequence after sequence.
    pub token_ids: Vec<u32>,
    /// `[num_tokens]` absolute position of each token in its sequence.
    pub positions: Vec<usize>,
    /// `[num_tokens]` index into `block_tables` of each token's sequence.
    pub seq_indices: Vec<usize>,
    /// `[num_tokens]` cache slot (`block * block_size + offset`) each token's K/V is written to.
    pub slot_mapping: Vec<usize>,
    /// `[num_seqs][blocks]` each sequence's cache blocks in position order; a token at position
    /// `p` attends to positions `0..=p` of its sequence through this table.
    pub block_tables: Vec<Vec<u32>>,
    /// Rows (token indices) whose logits are wanted, in output order.
    pub logits_indices: Vec<usize>,
    /// `[num_seqs]` each sequence's state slot in the cache, for models with recurrent layers
    /// (empty otherwise). A sequence's tokens must then be one run of consecutive positions; it
    /// continues from its slot's state, or from an empty one where its first token is at
    /// position 0.
    pub state_slots: Vec<u32>,
    /// Copies of recurrent state to take during the forward (prefix-cache snapshots).
    pub state_snapshots: Vec<StateSnapshot>,
    /// `[num_tokens]` (temporal, height, width) rotary positions, for models with multimodal
    /// rotary positions (Qwen3-VL). Empty: every token turns by its `positions` entry on all
    /// three axes (text, where the three agree).
    pub mrope_positions: Vec<[usize; 3]>,
    /// Image features for the batch's image-placeholder tokens (vision-language models).
    pub visual: Option<VisualEmbeds>,
}

/// What a vision tower made of a batch's image tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VisualEmbeds {
    /// The tokens (indices into the batch) the features belong to.
    pub rows: Vec<usize>,
    /// `[rows, hidden]`: these replace the tokens' embeddings.
    pub embeds: Vec<f32>,
    /// `[deepstack layers][rows, hidden]`: entry `i` is added to the tokens' hidden states
    /// after text layer `i` (DeepStack).
    pub deepstack: Vec<Vec<f32>>,
}

/// Copy sequence `seq`'s recurrent state, as it stands after its tokens before `position`,
/// into state slot `slot`. `position` must lie in `first + 1 ..= last + 1` of the sequence's
/// positions in the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSnapshot {
    pub seq: usize,
    pub position: usize,
    pub slot: u32,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Checks lengths and that every slot and position lies in the cache (`num_blocks` blocks
    /// of `block_size`).
    pub fn validate(&self, block_size: usize, num_blocks: usize) -> Result<()> {
        let n = self.token_ids.len();
        if self.positions.len() != n || self.seq_indices.len() != n || self.slot_mapping.len() != n {
            return Err(Error::Batch("token_ids, positions, seq_indices and slot_mapping differ in length".into()));
        }
        for t in 0..n {
            let seq = self.seq_indices[t];
            let table = self
                .block_tables
                .get(seq)
                .ok_or_else(|| Error::Batch(format!("token {t}: sequence {seq} has no block table")))?;
            let pos = self.positions[t];
            let block = table.get(pos / block_size).ok_or_else(|| {
                Error::Batch(format!("token {t}: position {pos} is past its block table ({} blocks)", table.len()))
            })?;
            let slot = *block as usize * block_size + pos % block_size;
            if *block as usize >= num_blocks || slot != self.slot_mapping[t] {
                return Err(Error::Batch(format!(
                    "token {t}: slot {} does not match block table entry {block} (cache has {num_blocks} blocks)",
                    self.slot_mapping[t]
                )));
            }
        }
        if !self.mrope_positions.is_empty() && self.mrope_positions.len() != n {
            return Err(Error::Batch(format!(
                "{} multimodal rotary positions for {n} tokens",
                self.mrope_positions.len()
            )));
        }
        if let Some(v) = &self.visual {
            if let Some(&r) = v.rows.iter().find(|&&r| r >= n) {
                return Err(Error::Batch(format!("image features for token {r} of {n}")));
            }
        }
        if let Some(&i) = self.logits_indices.iter().find(|&&i| i >= n) {
            return Err(Error::Batch(format!("logits index {i} out of {n} tokens")));
        }
        Ok(())
    }
}
