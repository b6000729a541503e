//! Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use pio_kernels::DType;
use safetensors::{Dtype, SafeTensors};

use super::{Checkpoint, Storage, Tensor};
use crate::{Error, Result};

/// Maps every safetensors file of the model directory `dir`.
pub fn load_dir(dir: &Path) -> Result<Checkpoint> {
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&index, format!("malformed JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "no \"weight_map\" object"))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if shards.is_empty() {
            return Err(Error::file(&index, "empty \"weight_map\""));
        }
        // Shards are files beside the index: a name that leads elsewhere is refused.
        if let Some(bad) = shards.iter().find(|s| {
            let p = Path::new(s);
            s.is_empty()
                || p.components().count() != 1
                || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
        }) {
            return Err(Error::file(&index, format!("shard {bad:?} is not a file name in the model directory")));
        }
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else if single.exists() {
        vec![single]
    } else {
        return Err(Error::file(dir, "no model.safetensors or model.safetensors.index.json in the model directory"));
    };
    let mut tensors = BTreeMap::new();
    for file in &files {
        load_file(file, &mut tensors)?;
    }
    Ok(Checkpoint::new(dir.to_path_buf(), tensors))
}

/// Adds the tensors of one safetensors file to `out`.
pub fn load_file(path: &Path, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping; we assume no other process truncates the file meanwhile.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    // `deserialize` checks the header and that every tensor lies inside the buffer.
    let st =
        SafeTensors::deserialize(&map).map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let base = map.as_ptr() as usize;
    let shared_path = Arc::new(path.to_path_buf());
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => return Err(Error::file(path, format!("tensor {name:?}: unsupported dtype {other:?}"))),
        };
        let data = view.data();
        let offset = data.as_ptr() as usize - base;
        let tensor = Tensor {
            dtype,
            shape: view.shape().to_vec(),
            storage: Storage::Mapped { map: map.clone(), path: shared_path.clone(), offset, len: data.len() },
        };
        if out.insert(name.clone(), tensor).is_some() {
            return Err(Error::file(path, format!("tensor {name:?} appears in more than one shard")));
        }
    }
    Ok(())
}
