//! Checkpoint tensors, memory-mapped, under Hugging Face names.
//!
//! A [`Checkpoint`] is a bag of named [`Tensor`]s read from a safetensors directory or a GGUF
//! file. GGUF names are mapped to Hugging Face names (`blk.0.attn_q.weight` ->
//! `model.layers.0.self_attn.q_proj.weight`) by the table in [`names`], so models ask for one
//! spelling. Models [`Checkpoint::take`] what they use; whatever is left over is an error, so a
//! tensor the code does not understand is never silently ignored.

pub mod gguf;
pub mod names;
pub mod safetensors;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use memmap2::{Mmap, UncheckedAdvice};
use pio_kernels::huge::{HugeArena, HugeBytes};
use pio_kernels::matmul::{Layout, WeightView};
use pio_kernels::{dot, quant, DType};

use crate::{Error, Result};

/// Where a tensor's bytes live.
#[derive(Clone)]
pub enum Storage {
    /// A range of a memory-mapped file (no copy). `offset` is also the offset in the file
    /// `path` (mappings cover whole files), which streaming reads with `pread`.
    Mapped { map: Arc<Mmap>, path: Arc<PathBuf>, offset: usize, len: usize },
    /// Bytes owned in memory (converted or quantized at load).
    Owned(Arc<Vec<u8>>),
    /// A matrix rearranged at load for the decode kernels ([`Layout::Interleaved`], see
    /// [`Tensor::interleave`]), on huge pages; its bytes are not rows.
    Interleaved(Arc<HugeBytes>),
    /// Part `part` of what slot `slot` of a streaming cache holds: a layer read from disk for
    /// one forward (rows). Only valid while the forward that pinned the slot holds it (see
    /// [`crate::layers::ExpertCache::bytes`]).
    Pooled { cache: Arc<crate::layers::ExpertCache>, slot: usize, part: usize },
}

/// A tensor: format, shape (outermost first) and bytes.
#[derive(Clone)]
pub struct Tensor {
    pub dtype: DType,
    /// Outermost first: a matrix is `[rows, cols]`, as PyTorch writes it.
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}, {:?})", self.dtype, self.shape)
    }
}

impl Tensor {
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, offset, len, .. } => &map[*offset..*offset + *len],
            Storage::Owned(v) => v,
            Storage::Interleaved(v) => v,
            Storage::Pooled { cache, slot, part } => cache.bytes(*slot, *part),
        }
    }

    /// Whether the bytes are whole rows ([`Layout::Rows`]) rather than an interleaved matrix.
    pub fn is_rows(&self) -> bool {
        !matches!(self.storage, Storage::Interleaved(_))
    }

    /// Rearranges a matrix whose format has interleaved kernels (the GGUF block formats but
    /// Q2_K and Q3_K, INT8, INT4 and NF4; BF16 of a multiple of 32 columns) into that layout, in memory of its own, and lets go of the mapped file pages it was read from (so
    /// they are not resident twice). Products are bitwise the same; decode reads one stream
    /// of columns instead of transposing 16 rows on every call. Returns whether it did.
    ///
    /// The copy is placed in `arena`, beside the model's other rearranged matrices, so that
    /// all of them sit on huge pages (see [`pio_kernels::huge`]).
    pub fn interleave(&mut self, arena: &mut HugeArena) -> bool {
        let (&[rows, cols], true) = (&self.shape[..], self.is_rows()) else { return false };
        let packed = if dot::interleaves(self.dtype) {
            let mut out = arena.zeroed(dot::interleaved_bytes(self.dtype, rows, cols));
            dot::interleave_into(self.dtype, rows, cols, self.bytes(), &mut out);
            out
        } else if dot::float::interleaves_bf16(self.dtype, cols) {
            let mut out = arena.zeroed(dot::float::tiled_bf16_bytes(rows, cols));
            dot::float::tile_bf16_into(rows, cols, self.bytes(), &mut out);
            out
        } else {
            return false;
        };
        if let Storage::Mapped { map, offset, len, .. } = &self.storage {
            // SAFETY: the mapping is private and read-only, so dropping its pages only means a
            // later access reads them from the file again (the embedding shares a tied head's
            // pages and does). A failure only leaves the pages resident.
            let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, *offset, *len) };
        }
        self.storage = Storage::Interleaved(Arc::new(packed));
        true
    }

    /// Copies a mapped tensor's bytes into memory of its own and lets go of the file pages (so
    /// nothing reads the file for it again: a file changed or truncated after loading cannot
    /// fault). Returns whether it copied.
    pub fn own(&mut self) -> bool {
        let Storage::Mapped { map, offset, len, .. } = &self.storage else { return false };
        let bytes = map[*offset..*offset + *len].to_vec();
        // SAFETY: as in `interleave`: private read-only mapping, only advice.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, *offset, *len) };
        self.storage = Storage::Owned(Arc::new(bytes));
        true
    }

    /// The file, offset and length of a mapped tensor's bytes (`None` for bytes in memory).
    pub fn file_range(&self) -> Option<(&std::path::Path, u64, usize)> {
        match &self.storage {
            Storage::Mapped { path, offset, len, .. } => Some((path.as_path(), *offset as u64, *len)),
            Storage::Owned(_) | Storage::Interleaved(_) | Storage::Pooled { .. } => None,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// All elements decoded to f32 (for small tensors: norms, biases).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        assert!(self.is_rows(), "an interleaved matrix has no rows to decode");
        let cols = self.shape.last().copied().unwrap_or(1).max(1);
        quant::dequantize(self.dtype, self.bytes(), self.numel().max(cols) / cols * cols)
    }

    /// Outer slices `start..start + count` of the tensor (rows of a matrix, matrices of a 3-D
    /// stack such as GGUF's fused experts), sharing a mapped file's bytes (owned bytes are
    /// copied). Every outer slice holds whole rows, so this is exact in any block format.
    /// Panics when the range is out of bounds.
    pub fn slice_outer(&self, start: usize, count: usize) -> Tensor {
        assert!(self.is_rows(), "an interleaved matrix has no rows to slice");
        let outer = self.shape.first().copied().unwrap_or(1).max(1);
        assert!(start + count <= outer, "slice {start}+{count} of {outer}");
        let per = self.bytes().len() / outer;
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = count;
        }
        let storage = match &self.storage {
            Storage::Mapped { map, path, offset, .. } => {
                Storage::Mapped { map: map.clone(), path: path.clone(), offset: offset + start * per, len: count * per }
            }
            Storage::Owned(_) | Storage::Interleaved(_) | Storage::Pooled { .. } => {
                Storage::Owned(Arc::new(self.bytes()[start * per..(start + count) * per].to_vec()))
            }
        };
        Tensor { dtype: self.dtype, shape, storage }
    }

    /// The outer slices (rows of a matrix) in `ranges`, concatenated in that order into a tensor
    /// of its own (copied). Exact in any block format, as [`Tensor::slice_outer`]. Panics when a
    /// range is out of bounds.
    pub fn gather_outer(&self, ranges: &[std::ops::Range<usize>]) -> Tensor {
        assert!(self.is_rows(), "an interleaved matrix has no rows to gather");
        let outer = self.shape.first().copied().unwrap_or(1).max(1);
        let per = self.bytes().len() / outer;
        let mut bytes = Vec::new();
        let mut count = 0;
        for r in ranges {
            assert!(r.start <= r.end && r.end <= outer, "rows {r:?} of {outer}");
            bytes.extend_from_slice(&self.bytes()[r.start * per..r.end * per]);
            count += r.len();
        }
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = count;
        }
        Tensor { dtype: self.dtype, shape, storage: Storage::Owned(Arc::new(bytes)) }
    }

    /// The tensor as a matrix `[rows, cols]` (1-D tensors are one row), in its layout, with f32
    /// activations (see [`crate::layers::Linear::view`]).
    pub fn matrix(&self) -> WeightView<'_> {
        let cols = self.shape.last().copied().unwrap_or(1);
        let layout = if self.is_rows() { Layout::Rows } else { Layout::Interleaved };
        let rows = self.numel() / cols.max(1);
        WeightView {
            dtype: self.dtype,
            rows,
            cols,
            data: self.bytes(),
            layout,
            bf16_activations: false,
            prefill_only: false,
        }
    }
}

/// The tensors of one checkpoint, by Hugging Face name.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file or directory they came from (for error messages).
    pub path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    pub fn new(path: PathBuf, tensors: BTreeMap<String, Tensor>) -> Self {
        Checkpoint { path, tensors }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of tensor `name`, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Every tensor with its name, in name order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Every tensor with its name, in name order, to convert in place (load-time quantization).
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.tensors.iter_mut().map(|(n, t)| (n.as_str(), t))
    }

    /// Removes and returns tensor `name`, checking its shape; errors name the file and tensor.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(name).ok_or_else(|| Error::file(&self.path, format!("missing tensor {name:?}")))?;
        if t.shape != shape {
            return Err(Error::file(
                &self.path,
                format!("tensor {name:?} has shape {:?}, the config implies {shape:?}", t.shape),
            ));
        }
        Ok(t)
    }

    /// Like [`take`](Self::take) for a tensor that may be absent.
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Renames every tensor whose name starts with `from` to start with `to` instead (a
    /// checkpoint that nests the usual names under a prefix).
    pub fn rename_prefix(&mut self, from: &str, to: &str) {
        let names: Vec<String> = self.tensors.keys().filter(|n| n.starts_with(from)).cloned().collect();
        for n in names {
            if let Some(t) = self.tensors.remove(&n) {
                self.tensors.insert(format!("{to}{}", &n[from.len()..]), t);
            }
        }
    }

    /// Drops a tensor the model knowingly does not use (e.g. a saved copy of tied embeddings).
    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Errors if any tensor was not taken: the checkpoint holds something the config does not
    /// explain.
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = self.tensors.keys().map(String::as_str).take(8).collect();
        Err(Error::file(
            &self.path,
            format!(
                "{} tensor(s) the model config does not use, e.g. {names:?}: unsupported architecture variant",
                self.tensors.len()
            ),
        ))
    }
}
