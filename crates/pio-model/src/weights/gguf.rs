//! GGUF v2/v3 files: metadata, tensor directory, and memory-mapped tensor data.
//!
//! Written by hand: the format is a short header of length-prefixed values, and we need exact
//! bounds checks with errors that name the file and the tensor, which the crates we looked at
//! do not give.
//!
//! Layout: magic `GGUF`, version u32, tensor count u64, metadata count u64; metadata entries
//! (key string, type u32, value); tensor infos (name, n_dims u32, dims u64 × n_dims with the
//! innermost first, ggml type u32, offset u64); padding to `general.alignment` (default 32);
//! tensor data, each tensor at its offset from the start of the data section.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use pio_kernels::DType;

use super::{Storage, Tensor};
use crate::{Error, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    /// Dimensions outermost first (the reverse of GGUF's order), e.g. `[rows, cols]`.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub nbytes: usize,
}

/// An open GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensor names in file order.
    pub tensor_order: Vec<String>,
    mmap: Arc<Mmap>,
    /// `path`, shared by the tensors (streaming reads them with `pread`).
    shared_path: Arc<PathBuf>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`; every offset and size is checked against the file's length.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; like every mmap-based loader we assume the file is
        // not truncated by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mmap = Arc::new(mmap);
        let err = |msg: String| Error::file(path, msg);
        let mut r = Reader { buf: &mmap, pos: 0 };
        let magic = r.bytes(4).map_err(|_| err("file is too short to be GGUF".into()))?;
        if magic != b"GGUF" {
            return Err(err(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
        }
        let version = r.u32().map_err(&err)?;
        if version == 0x0300_0000 || version == 0x0200_0000 {
            return Err(err("big-endian GGUF files are not supported".into()));
        }
        if !(2..=3).contains(&version) {
            return Err(err(format!("unsupported GGUF version {version} (supported: 2, 3)")));
        }
        let num_tensors = r.u64().map_err(&err)?;
        let num_kv = r.u64().map_err(&err)?;
        let mut metadata = HashMap::new();
        for _ in 0..num_kv {
            let key = r.string().map_err(|m| err(format!("metadata: {m}")))?;
            let ty = r.u32().map_err(&err)?;
            let value = r.value(ty, 0).map_err(|m| err(format!("metadata {key:?}: {m}")))?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::new();
        for i in 0..num_tensors {
            let name = r.string().map_err(|m| err(format!("tensor info {i}: {m}")))?;
            let n_dims = r.u32().map_err(&err)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(err(format!("tensor {name:?}: {n_dims} dimensions (expected 1 to 4)")));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(r.u64().map_err(&err)?);
            }
            let ty = r.u32().map_err(&err)?;
            let offset = r.u64().map_err(&err)?;
            infos.push((name, dims, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| err(format!("bad general.alignment {v:?}")))?,
        } as usize;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = HashMap::new();
        let mut tensor_order = Vec::new();
        for (name, dims, ty, offset) in infos {
            let dtype =
                DType::from_ggml(ty).ok_or_else(|| err(format!("tensor {name:?}: unsupported ggml type {ty}")))?;
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| err(format!("tensor {name:?}: dimensions {dims:?} overflow")))?;
            let inner = dims[0] as usize;
            let nbytes = dtype.row_bytes(inner).map(|rb| rb * (numel / inner.max(1))).ok_or_else(|| {
                err(format!("tensor {name:?}: row of {inner} is not a whole number of {dtype} blocks"))
            })?;
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .filter(|s| s % alignment == 0 || offset == 0)
                .ok_or_else(|| err(format!("tensor {name:?}: bad offset {offset}")))?;
            if start.checked_add(nbytes).is_none_or(|end| end > mmap.len()) {
                return Err(err(format!(
                    "tensor {name:?} ({nbytes} bytes at offset {start}) lies past the end of the file ({} bytes): the file is truncated",
                    mmap.len()
                )));
            }
            let shape = dims.iter().rev().map(|&d| d as usize).collect();
            tensor_order.push(name.clone());
            tensors.insert(name, TensorInfo { dtype, shape, offset: start, nbytes });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            tensor_order,
            mmap,
            shared_path: Arc::new(path.to_path_buf()),
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string metadata value, or an error naming the key.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::file(&self.path, format!("missing string metadata {key:?}")))
    }

    /// An integer metadata value, or an error naming the key.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        self.get(key)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| Error::file(&self.path, format!("missing integer metadata {key:?}")))
    }

    /// The tensor called `name`, borrowing the file's mapping.
    pub fn tensor(&self, name: &str) -> Option<Tensor> {
        let info = self.tensors.get(name)?;
        Some(Tensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            storage: Storage::Mapped {
                map: self.mmap.clone(),
                path: self.shared_path.clone(),
                offset: info.offset,
                len: info.nbytes,
            },
        })
    }
}

/// Bounds-checked little-endian reader over the header.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("header is truncated (wanted {n} bytes at offset {})", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self) -> Result<usize, String> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.buf.len())
            .ok_or_else(|| format!("length {n} at offset {} exceeds the file", self.pos - 8))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.len()?;
        let b = self.bytes(n)?;
        // Some converters wrote invalid UTF-8 in token strings; keep them lossily.
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deeply".into());
                }
                let item_ty = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            _ => return Err(format!("unknown value type {ty}")),
        })
    }
}

impl GgufFile {
    /// All tensors under Hugging Face names (unknown GGUF names kept as they are, so that
    /// [`Checkpoint::finish`](super::Checkpoint::finish) reports them).
    ///
    /// A fused expert stack (`blk.N.ffn_up_exps.weight`, `[experts, rows, cols]`) becomes one
    /// matrix per expert (`model.layers.N.mlp.experts.E.up_proj.weight`), each a view of its
    /// part of the mapping; llama.cpp's 3-D per-head `attn_k_b`/`attn_v_b` become matrices.
    pub fn checkpoint(&self) -> super::Checkpoint {
        let mut tensors = std::collections::BTreeMap::new();
        for name in &self.tensor_order {
            let Some(t) = self.tensor(name) else { continue };
            if let (Some((layer, pattern)), &[experts, rows, cols]) = (super::names::fused_experts(name), &t.shape[..])
            {
                for e in 0..experts {
                    let mut one = t.slice_outer(e, 1);
                    one.shape = vec![rows, cols];
                    let hf = pattern.replace("{e}", &e.to_string());
                    tensors.insert(format!("model.layers.{layer}.{hf}"), one);
                }
                continue;
            }
            let hf = super::names::gguf_to_hf(name).unwrap_or_else(|| name.clone());
            let mut t = t;
            if let [a, b, c] = t.shape[..] {
                if hf.ends_with("k_b_proj.weight") || hf.ends_with("v_b_proj.weight") {
                    t.shape = vec![a * b, c];
                }
            }
            tensors.insert(hf, t);
        }
        super::Checkpoint::new(self.path.clone(), tensors)
    }
}

/// A tensor to write: name, format, shape (outermost first) and its encoded bytes.
pub struct TensorToWrite<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// A tensor's header entry: name, format and shape (outermost first); its bytes come later.
pub struct TensorHeader {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Writes a GGUF v3 file with `metadata` (in order) and `tensors`, each tensor's data aligned
/// to `general.alignment` when `metadata` sets it, else 32 bytes. Only the header is built in
/// memory; tensor data is streamed to the file. A tensor in a format GGUF has no type for
/// (INT8, INT4, NF4) is an error naming it, and a failed write removes the partial file.
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[TensorToWrite<'_>]) -> Result<()> {
    let headers: Vec<TensorHeader> =
        tensors.iter().map(|t| TensorHeader { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    for (t, h) in tensors.iter().zip(&headers) {
        if encoded_len(h) != Some(t.data.len()) {
            return Err(Error::file(
                path,
                format!("tensor {:?}: {} bytes do not match {} {:?}", t.name, t.data.len(), t.dtype, t.shape),
            ));
        }
    }
    write_gguf_with(path, metadata, &headers, &mut |i| Cow::Borrowed(tensors[i].data))
}

/// [`write_gguf`] with each tensor's bytes produced only when it is written (`data(i)` for
/// `tensors[i]`), so a writer need not hold every tensor at once.
pub fn write_gguf_with<'a>(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorHeader],
    data: &mut dyn FnMut(usize) -> Cow<'a, [u8]>,
) -> Result<()> {
    let align = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => 32,
        Some((_, v)) => v
            .as_u64()
            .and_then(|a| usize::try_from(a).ok())
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| Error::file(path, format!("bad general.alignment {v:?}")))?,
    };
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend_from_slice(&value_type(value).to_le_bytes());
        put_value(&mut header, value);
    }
    let mut offset = 0usize;
    let mut lens = Vec::with_capacity(tensors.len());
    for t in tensors {
        let len = encoded_len(t).ok_or_else(|| {
            Error::file(path, format!("tensor {:?}: shape {:?} is not whole {} rows", t.name, t.shape, t.dtype))
        })?;
        let id = t.dtype.ggml_id().ok_or_else(|| {
            Error::file(path, format!("tensor {:?}: {} has no GGUF type (llama.cpp cannot read it)", t.name, t.dtype))
        })?;
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&id.to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += len.div_ceil(align) * align;
        lens.push(len);
    }
    header.resize(header.len().div_ceil(align) * align, 0);
    let mut write = || -> std::io::Result<()> {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        w.write_all(&header)?;
        let zeros = vec![0u8; align];
        for (i, (t, &len)) in tensors.iter().zip(&lens).enumerate() {
            let bytes = data(i);
            if bytes.len() != len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("tensor {:?}: {} bytes do not match {} {:?}", t.name, bytes.len(), t.dtype, t.shape),
                ));
            }
            w.write_all(&bytes)?;
            w.write_all(&zeros[..len.div_ceil(align) * align - len])?;
        }
        w.flush()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(path);
        Error::io(path, e)
    })
}

/// The encoded size of a tensor of this format and shape, if its rows are whole blocks.
fn encoded_len(t: &TensorHeader) -> Option<usize> {
    t.shape.last().and_then(|&c| t.dtype.row_bytes(c)).map(|rb| rb * t.shape.iter().rev().skip(1).product::<usize>())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An empty array is written as an array of u8.
            out.extend_from_slice(&items.first().map_or(0, value_type).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
