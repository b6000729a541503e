//! Attention of a flat batch of query tokens over a paged KV cache.
//!
//! **Cache layout.** Per layer, keys and values live in separate buffers of one element type
//! ([`KvElem`]: f32, or f16 at half the memory, chosen by [`KvCacheDtype`]), in blocks of
//! `block_size` positions. A token's slot is `block * block_size + offset`; a sequence's block
//! table lists its blocks in position order.
//! - keys: `[num_blocks, num_kv_heads, head_dim, block_size]`, transposed inside each block so
//!   that one dimension of [`CHUNK`] consecutive positions is one vector;
//! - values: `[num_blocks, num_kv_heads, block_size, head_dim]`, so a kv head's rows for
//!   consecutive positions are contiguous (rows `num_kv_heads * head_dim` apart would all fall
//!   in the same L1 sets).
//!
//! [`PagedKvMut::write`] is the only writer (f16 rounds to nearest even); reading f16 back is
//! exact.
//!
//! **Kernel.** The CPU form of FlashAttention: keys are visited once, in chunks of [`CHUNK`]
//! positions, with an online softmax (a running maximum and sum per query row, the output
//! rescaled when the maximum grows), so no score matrix is ever materialised. One work item is
//! a run of up to [`QUERY_TILE`] consecutive query tokens of one sequence and one KV head,
//! covering every query head that shares it (GQA): `tokens * group` query rows. Per chunk the
//! item
//! 1. takes the chunk as f32: keys `[head_dim][16]`, values `[16][head_dim]` (an f32 cache whose
//!    blocks hold whole chunks is read in place, and so is such an f16 cache at the AVX2 and
//!    AVX-512 levels, whose kernels widen it in registers; otherwise the chunk is staged, which
//!    is where f16 is widened, once for all the item's rows);
//! 2. computes a row's 16 scores as one vector, `s += q[d] * kᵀ[d]` over `d` in order (into four
//!    accumulators by `d mod 4`, summed at the end), so no score needs a horizontal sum;
//! 3. updates the row's running maximum and sum and accumulates the values.
//!
//! Items are split across threads, so a single decoding sequence still uses every core.
//!
//! **Batch invariance.** The chunks are fixed by absolute position (0..16, 16..32, ...) and each
//! query row is computed by the same operations whatever else is in the batch or in its item,
//! so a token's output is bitwise the same alone, batched, or in any prefill chunking (at a
//! given SIMD level and cache element type).

use std::fmt;
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;

use crate::cpu::{self, SimdLevel};
use crate::parallel::{self, SharedOut};
use crate::DType;

mod coded_values;
mod q4_keys;

/// Key positions per online-softmax step.
pub const CHUNK: usize = 16;

/// Query tokens of one sequence that share each loaded chunk of keys and values.
pub const QUERY_TILE: usize = 16;

/// How many positions ahead of the chunk being read the kernel prefetches the cache.
const PREFETCH_AHEAD: usize = 2 * CHUNK;

/// How a KV cache stores one tensor kind (keys or values): a plain float type, or a GGUF block
/// format (blocks of 32 values along the head dimension, llama.cpp's layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvCacheDtype {
    /// 4 bytes an element, stored exactly.
    F32,
    /// 2 bytes an element, rounded to nearest even when written (llama.cpp's default too).
    #[default]
    F16,
    /// 2 bytes an element: f32's range, 8 bits of mantissa.
    BF16,
    /// 34 bytes per 32 values: an f16 scale and 32 signed bytes.
    Q8_0,
    /// 18 bytes per 32 values: an f16 scale and 32 4-bit values.
    Q4_0,
}

impl KvCacheDtype {
    pub const ALL: [KvCacheDtype; 5] =
        [KvCacheDtype::F32, KvCacheDtype::F16, KvCacheDtype::BF16, KvCacheDtype::Q8_0, KvCacheDtype::Q4_0];

    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::F32 => "f32",
            KvCacheDtype::F16 => "f16",
            KvCacheDtype::BF16 => "bf16",
            KvCacheDtype::Q8_0 => "q8_0",
            KvCacheDtype::Q4_0 => "q4_0",
        }
    }

    /// The weight format with the same encoding (its scalar codec is the reference).
    pub fn dtype(self) -> DType {
        match self {
            KvCacheDtype::F32 => DType::F32,
            KvCacheDtype::F16 => DType::F16,
            KvCacheDtype::BF16 => DType::BF16,
            KvCacheDtype::Q8_0 => DType::Q8_0,
            KvCacheDtype::Q4_0 => DType::Q4_0,
        }
    }

    /// A block format (scales shared by 32 values), as opposed to a plain float.
    pub fn is_quantized(self) -> bool {
        matches!(self, KvCacheDtype::Q8_0 | KvCacheDtype::Q4_0)
    }

    /// f16 values kept beside keys of this type per block and kv head of `head_dim` in standard
    /// attention ([`CodedKv`]): an anchor row for the block formats, and for Q4_0 a row of channel
    /// scales after it.
    pub fn key_side_len(self, head_dim: usize) -> usize {
        match self {
            KvCacheDtype::Q8_0 => head_dim,
            KvCacheDtype::Q4_0 => 2 * head_dim,
            _ => 0,
        }
    }

    /// Whether keys (and queries) of this type are Hadamard-rotated per head before they are
    /// stored ([`CodedKv`]): Q8_0. Q4_0 keys keep their channels, each with its own scale.
    pub fn rotates_keys(self) -> bool {
        self == KvCacheDtype::Q8_0
    }

    /// Whether rows of `n` values can be stored (the block formats need multiples of 32).
    pub fn fits(self, n: usize) -> bool {
        n.is_multiple_of(self.dtype().block_elems())
    }

    /// Bytes a row of `n` values takes (rounded up to whole blocks where `n` does not fit).
    pub fn row_bytes(self, n: usize) -> usize {
        let d = self.dtype();
        n.div_ceil(d.block_elems()) * d.block_bytes()
    }
}

impl fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A KV cache type that is none of [`KvCacheDtype::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown KV cache type {0:?} (expected f32, f16, bf16, q8_0 or q4_0)")]
pub struct UnknownKvCacheDtype(pub String);

impl FromStr for KvCacheDtype {
    type Err = UnknownKvCacheDtype;

    /// A name of [`KvCacheDtype::name`], in any case.
    fn from_str(s: &str) -> Result<KvCacheDtype, UnknownKvCacheDtype> {
        let t = s.trim().to_ascii_lowercase();
        KvCacheDtype::ALL.into_iter().find(|d| d.name() == t).ok_or_else(|| UnknownKvCacheDtype(s.to_string()))
    }
}

/// The block size [`KvCacheType::bytes_per_token`] counts anchors for (the engine's).
pub const ANCHOR_BLOCK: usize = 16;

/// How a KV cache stores keys and values (llama.cpp's `--cache-type-k` / `--cache-type-v`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KvCacheType {
    pub k: KvCacheDtype,
    pub v: KvCacheDtype,
}

impl KvCacheType {
    /// Keys and values both as `t`.
    pub fn both(t: KvCacheDtype) -> KvCacheType {
        KvCacheType { k: t, v: t }
    }

    /// Bytes one token's keys and values take in one layer of `num_kv_heads` heads of
    /// `head_dim`, in blocks of [`ANCHOR_BLOCK`] positions (block-format keys keep f16 rows per
    /// block and kv head beside them: [`KvCacheDtype::key_side_len`], [`CodedKv`]), rounded up.
    pub fn bytes_per_token(self, num_kv_heads: usize, head_dim: usize) -> usize {
        self.bytes_per_block(num_kv_heads, head_dim, ANCHOR_BLOCK).div_ceil(ANCHOR_BLOCK)
    }

    /// Bytes a block of `block_size` positions takes in one layer.
    pub fn bytes_per_block(self, num_kv_heads: usize, head_dim: usize, block_size: usize) -> usize {
        let rows = block_size * num_kv_heads * (self.k.row_bytes(head_dim) + self.v.row_bytes(head_dim));
        rows + 2 * num_kv_heads * self.k.key_side_len(head_dim)
    }

    /// An error naming the option when a head of `head_dim` values cannot be stored so.
    pub fn check(self, head_dim: usize) -> Result<(), String> {
        for (t, opt) in [(self.k, "--cache-type-k"), (self.v, "--cache-type-v")] {
            if !t.fits(head_dim) {
                return Err(format!(
                    "{opt} {t}: heads of {head_dim} values cannot be stored as {t} (it needs multiples of {})",
                    t.dtype().block_elems()
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for KvCacheType {
    /// `q8_0` when keys and values agree, else `q8_0/q4_0` (keys/values).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.k == self.v {
            write!(f, "{}", self.k)
        } else {
            write!(f, "{}/{}", self.k, self.v)
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// What the attention kernel reads a layer's cache through: chunk by chunk, as f32.
pub trait KvSource: Copy + Send + Sync {
    fn block_size(&self) -> usize;
    fn num_kv_heads(&self) -> usize;
    fn head_dim(&self) -> usize;
    /// Panics unless the buffers hold whole blocks.
    fn check(&self);
    /// Positions `p0..p0 + n` (`n <= CHUNK`) of kv head `g` of the sequence whose blocks are
    /// `table`, as f32: `(keys, ks, values, vs)` with key `j`'s dimension `d` at
    /// `keys[d * ks + j]` (`keys.len() >= (hd - 1) * ks + CHUNK`) and its values from
    /// `values[j * vs]`. Read in place where the cache holds exactly that, else staged into
    /// `kt` (`[hd, CHUNK]`, lanes past `n` zero) and `v` (`[CHUNK, hd]`).
    #[allow(clippy::too_many_arguments)]
    fn chunk<'s>(
        &'s self,
        level: SimdLevel,
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
        kt: &'s mut Vec<f32>,
        v: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize, &'s [f32], usize);

    /// Positions `p0..p0 + n` of kv head `g` in place as f16, laid out as [`KvSource::chunk`]'s
    /// (keys, key stride, values, value stride), where `level`'s kernels widen them in registers
    /// instead of staging them (at the AVX2 and AVX-512 levels). At AVX2 the staging was 13% of
    /// a 16-stream decode's profile (the scores it fed, two query rows per kv head, 2%); read in
    /// place, a Qwen3-0.6B-shaped decode at depth 2048 ran 23.6 -> 28.4 tok/s.
    #[allow(clippy::type_complexity)]
    fn chunk_f16(
        &self,
        _level: SimdLevel,
        _table: &[u32],
        _g: usize,
        _p0: usize,
        _n: usize,
    ) -> Option<(&[f16], usize, &[f16], usize)> {
        None
    }

    /// Asks the CPU to start loading positions `p0..p0 + CHUNK` of kv head `g` (a chunk the
    /// kernel reads soon). A sequence's blocks lie apart in the pool, a kv head's rows of
    /// consecutive blocks a whole block of all heads apart, so the hardware prefetchers, which
    /// follow runs of lines, miss the first lines of every chunk.
    fn prefetch(&self, _table: &[u32], _g: usize, _p0: usize) {}

    /// Positions `p0..p0 + CHUNK` of kv head `g` as one run of keys and one of values, each
    /// contiguous f16 in place, where the cache holds them so (f16, blocks of one chunk): the
    /// f16 score kernels then ask for them a line of each at a time between their products
    /// ([`Ahead`]) instead of in one burst ([`KvSource::prefetch`]).
    fn ahead_f16(&self, _table: &[u32], _g: usize, _p0: usize) -> Option<(&[f16], &[f16])> {
        None
    }

    /// Whether [`KvSource::int8_scores`] scores this cache's keys at `level`: block-format keys
    /// against an int8 query with integer dot products (as ik_llama.cpp does) instead of widening
    /// them. q8_0 keys where the CPU has VNNI (AVX2's byte products are no faster than the f32
    /// tile there); q4_0 tiles at every level. Every token of a level takes the same path, so
    /// outputs stay batch-invariant.
    fn int8_keys(&self, _level: SimdLevel) -> bool {
        false
    }

    /// With [`KvSource::int8_keys`]: whether [`KvSource::int8_scores`] reads the query rows as q8
    /// blocks ([`quantize_queries`], once per item), as q8_0 keys do; q4_0 keys fold each block's
    /// channel scales into the query first, and quantize it themselves.
    fn query_blocks(&self) -> bool {
        false
    }

    /// With [`KvSource::int8_keys`]: the scores of the `active` rows against positions `p0..p0 +
    /// n` (`-inf` past what a row sees), as [`scores`] writes them; `q` the rows as f32 (for the
    /// keys' anchors), `qi`/`qd` as offset q8 blocks ([`quantize_queries`]).
    #[allow(clippy::too_many_arguments)]
    fn int8_scores(
        &self,
        _level: SimdLevel,
        _table: &[u32],
        _g: usize,
        _p0: usize,
        _n: usize,
        _q: (&[f32], &[u8], &[f32]),
        _active: &[(usize, usize)],
        _scale: f32,
        _s: &mut [f32],
    ) {
        unreachable!("int8 scores only for block-format keys")
    }

    /// The value half of a chunk straight from the cache, where this cache does it faster than
    /// staging the values for the update (a few rows of block-format values): for each active
    /// row the online-softmax step of its scores `s` and the accumulation into `o`, bitwise as
    /// the staged update does them. `false` (nothing done) where it does not.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_values(
        &self,
        _level: SimdLevel,
        _table: &[u32],
        _g: usize,
        _p0: usize,
        _n: usize,
        _active: &[(usize, usize)],
        _s: &[f32],
        _m: &mut [f32],
        _l: &mut [f32],
        _o: &mut [f32],
    ) -> bool {
        false
    }

    /// Positions `p0..p0 + n` of kv head `g`'s values alone, as [`KvSource::chunk`] gives them.
    #[allow(clippy::too_many_arguments)]
    fn values<'s>(
        &'s self,
        level: SimdLevel,
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
        kt: &'s mut Vec<f32>,
        v: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        let (_, _, vc, vs) = self.chunk(level, table, g, p0, n, kt, v);
        (vc, vs)
    }
}

/// Rows of `hd` values (`q`, `[rows, hd]`) as q8 blocks of 32: `qi` the values plus 128 (as
/// unsigned bytes: `vpdpbusd` multiplies unsigned by signed), `qd` one scale per block (`max
/// |x| / 127`, values rounded to nearest, ties to even, in -127..=127). The same bytes at every
/// level.
pub fn quantize_queries(level: SimdLevel, q: &[f32], hd: usize, qi: &mut Vec<u8>, qd: &mut Vec<f32>) {
    qi.clear();
    qd.clear();
    #[cfg(target_arch = "x86_64")]
    if level == SimdLevel::Avx512 {
        qi.resize(q.len() / 32 * 32, 0);
        qd.resize(q.len() / 32, 0.0);
        // SAFETY: the level only names features the CPU has; `qi` and `qd` were sized above.
        unsafe { x86::quantize_queries_avx512(q, qi, qd) };
        return;
    }
    let _ = level;
    for blk in q.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        qd.push(d);
        qi.extend(blk.iter().map(|&x| ((x * inv).round_ties_even() as i32).clamp(-127, 127).wrapping_add(128) as u8));
    }
    debug_assert_eq!(qi.len(), q.len() - q.len() % hd.max(1));
}

/// One chunk of q8_0 keys to score: `keys` the `n` positions `p0..p0 + n`,
/// `anchors[blk_of[j]]` position j's block's anchor row (f16 bits); `q` the query rows as f32
/// (for the anchors), `qi`/`qd` as q8 blocks.
pub(crate) struct Int8Chunk<'a> {
    keys: Int8Keys<'a>,
    n: usize,
    blk_of: &'a [usize],
    anchors: &'a [&'a [u16]],
    q: &'a [f32],
    qi: &'a [u8],
    qd: &'a [f32],
    active: &'a [(usize, usize)],
    hd: usize,
    scale: f32,
}

/// Where a chunk's q8_0 keys are: a row per position, or one stored tile ([`CodedKv`]).
#[derive(Clone, Copy)]
pub(crate) enum Int8Keys<'a> {
    Rows(&'a [&'a [u8]]),
    Tile(&'a [u8]),
}

impl Int8Keys<'_> {
    /// Position `j`'s q8_0 row.
    fn row(&self, j: usize, hd: usize) -> Vec<u8> {
        match *self {
            Int8Keys::Rows(rows) => rows[j].to_vec(),
            Int8Keys::Tile(tile) => {
                let mut row = vec![0u8; hd / 32 * 34];
                tile_get(tile, j, hd, &mut row);
                row
            }
        }
    }
}

/// Prefetches the cache lines of `bytes` (a hint: never faults, changes no values).
fn prefetch_lines<T>(bytes: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = bytes.as_ptr() as *const i8;
        for line in (0..std::mem::size_of_val(bytes)).step_by(64) {
            // SAFETY: a prefetch reads nothing architecturally and cannot fault; SSE is in the
            // x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// A chunk's key and value runs to prefetch, a line of each per call of [`Ahead::line`] with
/// the line's index: the score kernels call it once per 64 bytes of keys they read, so the
/// loads are asked for across the chunk's products. Asked for all at once (as
/// [`KvSource::prefetch`] does), 128 lines per chunk of a 128-wide head wait on the core's few
/// line-fill buffers and the kernel computes nothing meanwhile (the weight kernels' lesson).
#[derive(Clone, Copy)]
struct Ahead {
    k: *const i8,
    v: *const i8,
    /// Lines in each run; none past them are asked for.
    lines: usize,
}

impl Ahead {
    /// Nothing to prefetch.
    const NONE: Ahead = Ahead { k: std::ptr::null(), v: std::ptr::null(), lines: 0 };

    /// The runs `k`, `v` (as many lines of each as the shorter has).
    fn new(k: &[f16], v: &[f16]) -> Ahead {
        let lines = std::mem::size_of_val(k).min(std::mem::size_of_val(v)) / 64;
        Ahead { k: k.as_ptr() as *const i8, v: v.as_ptr() as *const i8, lines }
    }

    /// Asks for line `i` of both runs, if they have it.
    #[inline(always)]
    fn line(&self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        if i < self.lines {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: a prefetch reads nothing architecturally and cannot fault; SSE is in the
            // x86-64 baseline.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(self.k.wrapping_add(64 * i));
                _mm_prefetch::<_MM_HINT_T0>(self.v.wrapping_add(64 * i));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = i;
    }
}

/// Whether block-format keys are stored in tiles ([`CodedKv`]): blocks of whole chunks.
fn tiled(types: KvCacheType, block_size: usize) -> bool {
    types.k.is_quantized() && block_size.is_multiple_of(CHUNK)
}

/// Position `j`'s row (`hd / 32` q8_0 or q4_0 blocks: an f16 scale, then 32 or 16 bytes) out of
/// a tile of CHUNK positions: each block's bytes as 4-byte groups of the 16 positions, all
/// blocks', then the blocks' scales of the 16 positions.
fn tile_get(tile: &[u8], j: usize, hd: usize, row: &mut [u8]) {
    let nb = hd / 32;
    let bb = row.len() / nb.max(1);
    let groups = (bb - 2) / 4;
    let scales = CHUNK * nb * (bb - 2);
    for (b, blk) in row.chunks_exact_mut(bb).enumerate() {
        let at = scales + (b * CHUNK + j) * 2;
        blk[..2].copy_from_slice(&tile[at..at + 2]);
        for w in 0..groups {
            let at = ((groups * b + w) * CHUNK + j) * 4;
            blk[2 + 4 * w..6 + 4 * w].copy_from_slice(&tile[at..at + 4]);
        }
    }
}

/// [`tile_get`]'s inverse: stores position `j`'s row into its tile.
fn tile_put(tile: &mut [u8], j: usize, hd: usize, row: &[u8]) {
    let nb = hd / 32;
    let bb = row.len() / nb.max(1);
    let groups = (bb - 2) / 4;
    let scales = CHUNK * nb * (bb - 2);
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let at = scales + (b * CHUNK + j) * 2;
        tile[at..at + 2].copy_from_slice(&blk[..2]);
        for w in 0..groups {
            let at = ((groups * b + w) * CHUNK + j) * 4;
            tile[at..at + 4].copy_from_slice(&blk[2 + 4 * w..6 + 4 * w]);
        }
    }
}

/// The stored bytes of key row `r` (`[blocks, kv heads, block_size]` order) into `row`.
fn key_get(k: &[u8], tiled: bool, r: usize, hd: usize, row: &mut [u8]) {
    let rb = row.len();
    if tiled {
        let t = r / CHUNK;
        tile_get(&k[t * CHUNK * rb..(t + 1) * CHUNK * rb], r % CHUNK, hd, row);
    } else {
        row.copy_from_slice(&k[r * rb..(r + 1) * rb]);
    }
}

/// [`key_get`]'s inverse.
fn key_put(k: &mut [u8], tiled: bool, r: usize, hd: usize, row: &[u8]) {
    let rb = row.len();
    if tiled {
        let t = r / CHUNK;
        tile_put(&mut k[t * CHUNK * rb..(t + 1) * CHUNK * rb], r % CHUNK, hd, row);
    } else {
        k[r * rb..(r + 1) * rb].copy_from_slice(row);
    }
}

/// The scalar reference of the VNNI tile ([`KvSource::int8_scores`] of one chunk).
fn int8_scores_scalar(c: &Int8Chunk<'_>, s: &mut [f32]) {
    let (hd, n) = (c.hd, c.n);
    let nb = hd / 32;
    for &(i, seen) in c.active {
        let q = &c.q[i * hd..(i + 1) * hd];
        let qa: Vec<f32> = c
            .anchors
            .iter()
            .map(|a| q.iter().zip(a.iter()).map(|(x, &h)| x * f16::from_bits(h).to_f32()).sum())
            .collect();
        let (qi, qd) = (&c.qi[i * hd..(i + 1) * hd], &c.qd[i * nb..(i + 1) * nb]);
        for j in 0..CHUNK {
            s[i * CHUNK + j] = if j < seen.min(n) {
                (qa[c.blk_of[j]] + dot_q8_scalar(&c.keys.row(j, hd), qi, qd)) * c.scale
            } else {
                f32::NEG_INFINITY
            };
        }
    }
}

/// `Σ_b d_k[b] · qd[b] · Σ_t q[32b + t] · k[b][t]` over the q8_0 blocks of `row`, `qi` the
/// query offset by 128 (exact integer block sums, f32 across blocks in order).
fn dot_q8_scalar(row: &[u8], qi: &[u8], qd: &[f32]) -> f32 {
    let mut acc = 0f32;
    for ((blk, qb), &dq) in row.chunks_exact(34).zip(qi.chunks_exact(32)).zip(qd) {
        let dk = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let isum: i32 = blk[2..].iter().zip(qb).map(|(&k, &q)| i32::from(k as i8) * (i32::from(q) - 128)).sum();
        acc += dk * dq * isum as f32;
    }
    acc
}

/// An element of the KV cache: `f32` or `half::f16`.
pub trait KvElem: Copy + Send + Sync + fmt::Debug + 'static + sealed::Sealed {
    const DTYPE: KvCacheDtype;

    /// `n` zeros, from zeroed pages (memory never written costs no resident set).
    fn zeros(n: usize) -> Vec<Self>;

    /// `dst[i] = src[i]` in this type (f16: rounded to nearest even, as `f16::from_f32`).
    fn from_f32s(src: &[f32], dst: &mut [Self]);

    fn to_f32(self) -> f32;

    /// `dst[r * width + c] = src[r * stride + c]` as f32 (exact), for `r < rows`, `c < width`.
    fn widen_rows(level: SimdLevel, src: &[Self], stride: usize, rows: usize, width: usize, dst: &mut [f32]);

    /// The buffer itself when it holds f32 (then read in place, never staged).
    fn as_f32s(buf: &[Self]) -> Option<&[f32]>;

    /// The buffer itself when it holds f16 (which the AVX2 and AVX-512 kernels read in place).
    fn as_f16s(_buf: &[Self]) -> Option<&[f16]> {
        None
    }
}

impl KvElem for f32 {
    const DTYPE: KvCacheDtype = KvCacheDtype::F32;

    fn zeros(n: usize) -> Vec<f32> {
        vec![0.0; n]
    }

    fn from_f32s(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn to_f32(self) -> f32 {
        self
    }

    fn widen_rows(_: SimdLevel, src: &[f32], stride: usize, rows: usize, width: usize, dst: &mut [f32]) {
        for r in 0..rows {
            dst[r * width..(r + 1) * width].copy_from_slice(&src[r * stride..r * stride + width]);
        }
    }

    fn as_f32s(buf: &[f32]) -> Option<&[f32]> {
        Some(buf)
    }
}

impl KvElem for f16 {
    const DTYPE: KvCacheDtype = KvCacheDtype::F16;

    fn zeros(n: usize) -> Vec<f16> {
        vec![0u16; n].reinterpret_into()
    }

    fn from_f32s(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }

    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn widen_rows(level: SimdLevel, src: &[f16], stride: usize, rows: usize, width: usize, dst: &mut [f32]) {
        if rows == 0 || width == 0 {
            return;
        }
        assert!(src.len() >= (rows - 1) * stride + width && dst.len() >= rows * width);
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level only names features the CPU has (AVX-512 F); bounds asserted above.
            SimdLevel::Avx512 => unsafe { x86::widen_f16_avx512(src, stride, rows, width, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX2 level implies F16C; bounds asserted above.
            SimdLevel::Avx2 => unsafe { x86::widen_f16_f16c(src, stride, rows, width, dst) },
            _ => {
                for r in 0..rows {
                    for (d, s) in dst[r * width..(r + 1) * width].iter_mut().zip(&src[r * stride..r * stride + width]) {
                        *d = s.to_f32();
                    }
                }
            }
        }
    }

    fn as_f32s(_: &[f16]) -> Option<&[f32]> {
        None
    }

    fn as_f16s(buf: &[f16]) -> Option<&[f16]> {
        Some(buf)
    }
}

/// One layer's paged cache, borrowed for reading (layout in the module docs).
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a, T = f32> {
    /// `[num_blocks, num_kv_heads, head_dim, block_size]`.
    pub k: &'a [T],
    /// `[num_blocks, num_kv_heads, block_size, head_dim]`.
    pub v: &'a [T],
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's paged cache, borrowed for writing (layout in the module docs).
#[derive(Debug)]
pub struct PagedKvMut<'a, T> {
    /// `[num_blocks, num_kv_heads, head_dim, block_size]`.
    pub k: &'a mut [T],
    /// `[num_blocks, num_kv_heads, block_size, head_dim]`.
    pub v: &'a mut [T],
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<T: KvElem> PagedKvMut<'_, T> {
    /// Stores token `t`'s keys `k[t]` and values `v[t]` in slot `slots[t]`; `k` and `v` are
    /// `[tokens, num_kv_heads * head_dim]`.
    pub fn write(&mut self, slots: &[usize], k: &[f32], v: &[f32]) {
        let (bs, kd) = (self.block_size, self.num_kv_heads * self.head_dim);
        assert!(k.len() == slots.len() * kd && v.len() == k.len(), "keys and values are [tokens, kv heads * head dim]");
        let hd = self.head_dim;
        let mut row = T::zeros(kd);
        for (t, &slot) in slots.iter().enumerate() {
            let (block, off) = (slot / bs, slot % bs);
            // Within the block, head g's value row at ((g * bs + offset) * hd), its key
            // dimension d at ((g * hd + d) * bs + offset).
            let (kb, vb) = (
                &mut self.k[block * kd * bs..(block + 1) * kd * bs],
                &mut self.v[block * kd * bs..(block + 1) * kd * bs],
            );
            for (g, src) in v[t * kd..(t + 1) * kd].chunks_exact(hd.max(1)).enumerate() {
                T::from_f32s(src, &mut vb[(g * bs + off) * hd..(g * bs + off + 1) * hd]);
            }
            T::from_f32s(&k[t * kd..(t + 1) * kd], &mut row);
            for (i, &x) in row.iter().enumerate() {
                kb[i * bs + off] = x;
            }
        }
    }

    /// Replaces every key row (`head_dim` values of one kv head at one position) in `blocks`
    /// by `f` of it, as f32 (a position shift re-rotates the kept keys this way).
    pub fn map_keys(&mut self, blocks: &[u32], f: &mut dyn FnMut(&mut [f32])) {
        let (bs, hd, nkv) = (self.block_size, self.head_dim, self.num_kv_heads);
        let mut row = vec![0f32; hd];
        let mut enc = T::zeros(hd);
        for &b in blocks {
            for g in 0..nkv {
                // Key dimension d of position `off` at ((b * nkv + g) * hd + d) * bs + off.
                let base = (b as usize * nkv + g) * hd * bs;
                for off in 0..bs {
                    for (d, x) in row.iter_mut().enumerate() {
                        *x = self.k[base + d * bs + off].to_f32();
                    }
                    f(&mut row);
                    T::from_f32s(&row, &mut enc);
                    for (d, &x) in enc.iter().enumerate() {
                        self.k[base + d * bs + off] = x;
                    }
                }
            }
        }
    }

    pub fn view(&self) -> PagedKv<'_, T> {
        PagedKv {
            k: self.k,
            v: self.v,
            block_size: self.block_size,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

impl<T: KvElem> PagedKv<'_, T> {
    /// Positions `p0..p0 + n` of kv head `g` as [`KvSource::chunk`] lays them out, read in place
    /// from `k` and `v` (this cache's keys and values, seen as their element type). A chunk lies
    /// inside one block when blocks are whole chunks (both start at multiples of CHUNK).
    #[allow(clippy::type_complexity)]
    fn in_place<'s, E>(
        &self,
        k: &'s [E],
        v: &'s [E],
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
    ) -> (&'s [E], usize, &'s [E], usize) {
        let (hd, bs) = (self.head_dim, self.block_size);
        debug_assert!(bs.is_multiple_of(CHUNK));
        let kd = self.num_kv_heads * hd;
        let (b, off) = (table[p0 / bs] as usize, p0 % bs);
        let kb = (b * kd + g * hd) * bs + off;
        let vb = (b * kd + g * hd) * bs + off * hd;
        (&k[kb..kb + (hd - 1) * bs + CHUNK], bs, &v[vb..vb + n * hd], hd)
    }
}

impl<T: KvElem> KvSource for PagedKv<'_, T> {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    fn head_dim(&self) -> usize {
        self.head_dim
    }
    fn check(&self) {
        let whole = self.block_size * self.num_kv_heads * self.head_dim.max(1);
        assert!(
            self.block_size > 0 && self.k.len() == self.v.len() && self.k.len().is_multiple_of(whole),
            "keys and values must be whole blocks"
        );
    }
    fn prefetch(&self, table: &[u32], g: usize, p0: usize) {
        let (hd, bs) = (self.head_dim, self.block_size);
        if hd == 0 || !bs.is_multiple_of(CHUNK) {
            return;
        }
        let Some(&b) = table.get(p0 / bs) else { return };
        let (kd, off) = (self.num_kv_heads * hd, p0 % bs);
        let base = (b as usize * kd + g * hd) * bs;
        if let Some(k) = self.k.get(base + off..base + (hd - 1) * bs + off + CHUNK) {
            if bs == CHUNK {
                prefetch_lines(k);
            } else {
                for d in 0..hd {
                    prefetch_lines(&k[d * bs..d * bs + CHUNK]);
                }
            }
        }
        if let Some(v) = self.v.get(base + off * hd..base + (off + CHUNK) * hd) {
            prefetch_lines(v);
        }
    }
    fn ahead_f16(&self, table: &[u32], g: usize, p0: usize) -> Option<(&[f16], &[f16])> {
        let (hd, bs) = (self.head_dim, self.block_size);
        if bs != CHUNK || !p0.is_multiple_of(CHUNK) {
            return None;
        }
        let base = (*table.get(p0 / bs)? as usize * self.num_kv_heads + g) * hd * bs;
        Some((T::as_f16s(self.k)?.get(base..base + hd * bs)?, T::as_f16s(self.v)?.get(base..base + CHUNK * hd)?))
    }
    fn chunk_f16(
        &self,
        level: SimdLevel,
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
    ) -> Option<(&[f16], usize, &[f16], usize)> {
        if !matches!(level, SimdLevel::Avx2 | SimdLevel::Avx512) || !self.block_size.is_multiple_of(CHUNK) {
            return None;
        }
        Some(self.in_place(T::as_f16s(self.k)?, T::as_f16s(self.v)?, table, g, p0, n))
    }
    fn chunk<'s>(
        &'s self,
        level: SimdLevel,
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
        kt: &'s mut Vec<f32>,
        v: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize, &'s [f32], usize) {
        let hd = self.head_dim;
        match (self.block_size.is_multiple_of(CHUNK), T::as_f32s(self.k), T::as_f32s(self.v)) {
            (true, Some(kf), Some(vf)) => self.in_place(kf, vf, table, g, p0, n),
            _ => {
                stage(level, *self, table, g, p0, n, kt, v);
                (&kt[..], CHUNK, &v[..n * hd], hd)
            }
        }
    }
}

/// One layer's cache in any [`KvCacheDtype`] for keys and values (each its own), borrowed for
/// reading. Both are `[num_blocks, num_kv_heads, block_size, row]`: one encoded row of
/// `head_dim` values per position and kv head, a kv head's positions contiguous in a block.
///
/// **Anchored keys.** Where keys are in a block format, each block keeps, per kv head, f16 rows
/// beside its keys (`anchors`, `[num_blocks, num_kv_heads, side]` with `side` =
/// [`KvCacheDtype::key_side_len`]). The first is an anchor, and the block's rows hold each key
/// minus it; a key is read back as anchor + decoded difference. The anchor is the mean of the
/// previous block's keys (as stored) when the writer names that block
/// ([`CodedKvMut::write_after`]), else the block's own first key. Small models' keys have a few
/// channels hundreds of times larger than the rest (in Qwen2.5-0.5B, the slowly rotating RoPE
/// pairs carry the key bias: near-constant across positions), and one scale per 32 values set by
/// them leaves the others a few levels; differences from nearby keys are small in exactly those
/// channels.
///
/// **Channel scales (Q4_0 keys).** Q4_0 keys keep a second row: a scale per channel, the square
/// root of that channel's root-mean-square distance of the previous block's keys (as stored)
/// from the anchor (floored at 1/16 of their mean before the root; all ones for a sequence's
/// first block). A row is stored as Q4_0 of `(key - anchor) / scale`, read back as `anchor +
/// scale * decoded`. A channel's error then grows with how much that channel moves. That is what
/// attention needs in Qwen2.5-Coder-0.5B's first layer: the queries' weight sits in the channels
/// where keys barely move from one position to the next, and the keys' movement in the fast RoPE
/// pairs the queries hardly read. Equal errors everywhere (one scale per 32 values, or Q8_0's
/// Hadamard rotation, which spreads the channels evenly) cost 8x more there. Scales proportional
/// to the movement cost other models' layers, where queries read every channel alike; the
/// square root is the compromise that measured best on both real models (q4_0 keys' KL
/// divergence 0.064 -> 0.024 on Qwen2.5-Coder, 0.042 -> 0.032 on SmolLM2 against the rotation).
/// Q8_0 keys have 256 levels to spare and keep the rotation.
///
/// **Tiles.** Where a block holds whole chunks of [`CHUNK`] positions (the engine's blocks of
/// 16), block-format keys are stored transposed, a tile per chunk and kv head: each 32-value
/// block's bytes as 4-byte groups of the 16 positions (all blocks in turn), then the blocks'
/// scales of the 16 positions. Same bytes as the rows, in the order the kernels read them: the
/// VNNI scores of q8_0 keys load a group of 16 positions as it is, and the f32 path decodes a
/// tile straight into the transposed chunk it scores. Smaller blocks keep rows.
///
/// Anchors and scales depend only on the sequence's earlier keys, so a block's bytes do not
/// depend on how its positions were batched or chunked.
#[derive(Debug, Clone, Copy)]
pub struct CodedKv<'a> {
    pub k: &'a [u8],
    pub v: &'a [u8],
    /// f16 bits, `key_side_len` per block and kv head; empty unless keys are in a block format.
    pub anchors: &'a [u16],
    pub types: KvCacheType,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// [`CodedKv`] borrowed for writing.
#[derive(Debug)]
pub struct CodedKvMut<'a> {
    pub k: &'a mut [u8],
    pub v: &'a mut [u8],
    pub anchors: &'a mut [u16],
    pub types: KvCacheType,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl CodedKvMut<'_> {
    /// Encodes token `t`'s keys `k[t]` and values `v[t]` into slot `slots[t]`; `k` and `v` are
    /// `[tokens, num_kv_heads * head_dim]`.
    pub fn write(&mut self, slots: &[usize], k: &[f32], v: &[f32]) {
        self.write_after(slots, &[], k, v)
    }

    /// [`CodedKvMut::write`], where `prev[t]` (if given) is the block before token `t`'s in its
    /// sequence: a block's anchor (and channel scales) then come from that block's keys instead
    /// of its own first key (and ones).
    pub fn write_after(&mut self, slots: &[usize], prev: &[Option<usize>], k: &[f32], v: &[f32]) {
        let (bs, nkv, hd) = (self.block_size, self.num_kv_heads, self.head_dim);
        assert!(
            k.len() == slots.len() * nkv * hd && v.len() == k.len(),
            "keys and values are [tokens, kv heads * head dim]"
        );
        let (krb, vrb) = (self.types.k.row_bytes(hd), self.types.v.row_bytes(hd));
        let side = self.types.k.key_side_len(hd);
        let (mut diff, mut rows, mut mean) = (vec![0f32; hd], vec![0f32; bs * hd], vec![0f32; hd]);
        let mut prev_side = vec![0u16; side];
        let tiled = tiled(self.types, bs);
        let mut kbytes = vec![0u8; krb];
        for (t, &slot) in slots.iter().enumerate() {
            let (block, off) = (slot / bs, slot % bs);
            for g in 0..nkv {
                let row = (block * nkv + g) * bs + off;
                let src = &k[t * nkv * hd + g * hd..][..hd];
                if side == 0 {
                    encode_row(self.types.k, src, &mut self.k[row * krb..(row + 1) * krb]);
                } else {
                    let at = (block * nkv + g) * side;
                    if off == 0 {
                        match prev.get(t).copied().flatten() {
                            Some(pb) => {
                                // The previous block's keys, as stored.
                                prev_side.copy_from_slice(&self.anchors[(pb * nkv + g) * side..][..side]);
                                for (o, key) in rows.chunks_exact_mut(hd).enumerate() {
                                    let r = (pb * nkv + g) * bs + o;
                                    key_get(self.k, tiled, r, hd, &mut kbytes);
                                    decode_row(SimdLevel::Scalar, self.types.k, &kbytes, Some(&prev_side), key);
                                }
                                mean.fill(0.0);
                                for key in rows.chunks_exact(hd) {
                                    for (m, &x) in mean.iter_mut().zip(key) {
                                        *m += x / bs as f32;
                                    }
                                }
                                let here = &mut self.anchors[at..at + side];
                                let (anchor, scales) = here.split_at_mut(hd);
                                set_anchor(anchor, &mean);
                                if !scales.is_empty() {
                                    set_channel_scales(scales, &rows, anchor);
                                }
                            }
                            None => {
                                let (anchor, scales) = self.anchors[at..at + side].split_at_mut(hd);
                                set_anchor(anchor, src);
                                scales.fill(f16::ONE.to_bits());
                            }
                        }
                    }
                    encode_diff(self.types.k, src, &self.anchors[at..at + side], &mut diff, &mut kbytes);
                    key_put(self.k, tiled, row, hd, &kbytes);
                }
                let vsrc = &v[t * nkv * hd + g * hd..][..hd];
                encode_row(self.types.v, vsrc, &mut self.v[row * vrb..(row + 1) * vrb]);
            }
        }
    }

    /// Replaces every key row in `blocks` by `f` of it (a linear map: a position shift's
    /// re-rotation). Block-format keys are decoded, mapped and encoded again against their
    /// block's anchor mapped the same way (and channel scales measured again on the mapped
    /// keys), so each key is requantized once per call.
    pub fn map_keys(&mut self, blocks: &[u32], f: &mut dyn FnMut(&mut [f32])) {
        let (bs, nkv, hd) = (self.block_size, self.num_kv_heads, self.head_dim);
        let krb = self.types.k.row_bytes(hd);
        let side = self.types.k.key_side_len(hd);
        let tiled = tiled(self.types, bs);
        let (mut scratch, mut gathered) = (Vec::new(), vec![0u8; if tiled { bs * krb } else { 0 }]);
        for &b in blocks {
            for g in 0..nkv {
                let (first, at) = ((b as usize * nkv + g) * bs, (b as usize * nkv + g) * side);
                let anchor = if side > 0 { Some(&mut self.anchors[at..at + side]) } else { None };
                if tiled {
                    // Rows out of their tiles, remapped, and back.
                    for (o, row) in gathered.chunks_exact_mut(krb).enumerate() {
                        key_get(self.k, true, first + o, hd, row);
                    }
                    remap_rows(self.types.k, &mut gathered, anchor, hd, f, &mut scratch);
                    for (o, row) in gathered.chunks_exact(krb).enumerate() {
                        key_put(self.k, true, first + o, hd, row);
                    }
                } else {
                    let rows = &mut self.k[first * krb..(first + bs) * krb];
                    remap_rows(self.types.k, rows, anchor, hd, f, &mut scratch);
                }
            }
        }
    }

    pub fn view(&self) -> CodedKv<'_> {
        CodedKv {
            k: self.k,
            v: self.v,
            anchors: self.anchors,
            types: self.types,
            block_size: self.block_size,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

impl CodedKv<'_> {
    /// The key and value of kv head `g` stored in `slot`, decoded (`k` and `v` hold `head_dim`).
    pub fn read(&self, slot: usize, g: usize, k: &mut [f32], v: &mut [f32]) {
        self.read_at(SimdLevel::Scalar, slot, g, k, v)
    }

    /// Positions `p0..p0 + n` of kv head `g`'s values, decoded into `v` as `[n, head_dim]`.
    fn decode_values(&self, level: SimdLevel, table: &[u32], g: usize, p0: usize, n: usize, v: &mut Vec<f32>) {
        let hd = self.head_dim;
        v.resize(CHUNK * hd, 0.0);
        for j in 0..n {
            let row = self.value_row(table, g, p0 + j);
            decode_row(level, self.types.v, row, None, &mut v[j * hd..(j + 1) * hd]);
        }
    }

    /// The stored value row of kv head `g` at position `pos` of the sequence whose blocks are
    /// `table`.
    fn value_row(&self, table: &[u32], g: usize, pos: usize) -> &[u8] {
        let (bs, vrb) = (self.block_size, self.types.v.row_bytes(self.head_dim));
        let r = (table[pos / bs] as usize * self.num_kv_heads + g) * bs + pos % bs;
        &self.v[r * vrb..(r + 1) * vrb]
    }

    /// Where block-format keys are tiled ([`tiled`]): the stored tile of kv head `g` holding
    /// positions `p0..p0 + CHUNK` (`p0` a multiple of CHUNK), and its block's side rows (anchor,
    /// then channel scales for Q4_0).
    fn key_tile(&self, table: &[u32], g: usize, p0: usize) -> (&[u8], &[u16]) {
        let (hd, bs, nkv) = (self.head_dim, self.block_size, self.num_kv_heads);
        let (krb, side) = (self.types.k.row_bytes(hd), self.types.k.key_side_len(hd));
        let b = table[p0 / bs] as usize;
        let r0 = (b * nkv + g) * bs + p0 % bs;
        (&self.k[r0 * krb..(r0 + CHUNK) * krb], &self.anchors[(b * nkv + g) * side..][..side])
    }

    /// [`CodedKv::read`] with the SIMD level's decoders: the same bits at every level.
    fn read_at(&self, level: SimdLevel, slot: usize, g: usize, k: &mut [f32], v: &mut [f32]) {
        let (hd, bs, nkv) = (self.head_dim, self.block_size, self.num_kv_heads);
        let (krb, vrb) = (self.types.k.row_bytes(hd), self.types.v.row_bytes(hd));
        let side = self.types.k.key_side_len(hd);
        let (block, off) = (slot / bs, slot % bs);
        let r = (block * nkv + g) * bs + off;
        let anchor = (side > 0).then(|| &self.anchors[(block * nkv + g) * side..][..side]);
        if tiled(self.types, bs) {
            let mut row = [0u8; 34 * 8];
            // (Q4_0 rows are smaller than Q8_0 ones.)
            let mut heap = Vec::new();
            let row = if krb <= row.len() {
                &mut row[..krb]
            } else {
                heap.resize(krb, 0);
                &mut heap[..]
            };
            key_get(self.k, true, r, hd, row);
            decode_row(level, self.types.k, row, anchor, k);
        } else {
            decode_row(level, self.types.k, &self.k[r * krb..(r + 1) * krb], anchor, k);
        }
        decode_row(level, self.types.v, &self.v[r * vrb..(r + 1) * vrb], None, v);
    }
}

/// `anchor` (f16 bits) = `x` rounded to f16.
pub(crate) fn set_anchor(anchor: &mut [u16], x: &[f32]) {
    for (a, &x) in anchor.iter_mut().zip(x) {
        *a = f16::from_f32(x).to_bits();
    }
}

/// `scales` (f16 bits, one per channel) for a block anchored at `anchor` (f16 bits), from
/// `rows` (`[n, scales.len()]`, keys as stored): each channel's root-mean-square distance from
/// the anchor, at least 1/16 of the channels' root-mean-square (a channel the rows left still
/// may move); all ones where nothing moved.
pub(crate) fn set_channel_scales(scales: &mut [u16], rows: &[f32], anchor: &[u16]) {
    let w = scales.len();
    let n = rows.len() / w.max(1);
    let mut ms = vec![0f32; w];
    for row in rows.chunks_exact(w.max(1)) {
        for ((m, &x), &a) in ms.iter_mut().zip(row).zip(anchor) {
            let d = x - f16::from_bits(a).to_f32();
            *m += d * d;
        }
    }
    let total = ms.iter().sum::<f32>() / (n * w).max(1) as f32;
    let floor = total.sqrt() / 16.0;
    for (s, m) in scales.iter_mut().zip(ms) {
        let x = (m / n.max(1) as f32).sqrt().max(floor).sqrt();
        // Finite and positive, so that `(key - anchor) / scale` is defined.
        let h = f16::from_f32(x);
        *s = if x > 0.0 && h.is_finite() && h.to_f32() > 0.0 { h.to_bits() } else { f16::ONE.to_bits() };
    }
}

/// Encodes `(src - anchor) / scale` into `dst`, with `side` (f16 bits) the anchor row, then the
/// channel scales if it holds two rows; `diff` is scratch of `src.len()`.
pub(crate) fn encode_diff(t: KvCacheDtype, src: &[f32], side: &[u16], diff: &mut [f32], dst: &mut [u8]) {
    let n = src.len();
    let (anchor, scales) = side.split_at(n);
    for ((d, &x), &a) in diff.iter_mut().zip(src).zip(anchor) {
        *d = x - f16::from_bits(a).to_f32();
    }
    for (d, &s) in diff.iter_mut().zip(scales) {
        *d /= f16::from_bits(s).to_f32();
    }
    encode_row(t, diff, dst);
}

/// Replaces each of the encoded rows of `width` values in `rows` (of type `t`, stored as
/// differences from `side`'s anchor when it is given, and scaled by its channel scales if it
/// holds them) by `f` of it, re-encoding them against the anchor mapped by `f` too (`f` linear:
/// a position shift's re-rotation) and channel scales measured on the mapped rows. `scratch` is
/// reused.
pub(crate) fn remap_rows(
    t: KvCacheDtype,
    rows: &mut [u8],
    mut side: Option<&mut [u16]>,
    width: usize,
    f: &mut dyn FnMut(&mut [f32]),
    scratch: &mut Vec<f32>,
) {
    let rb = t.row_bytes(width);
    let n = rows.len() / rb.max(1);
    scratch.resize((n + 2) * width, 0.0);
    let (decoded, rest) = scratch.split_at_mut(n * width);
    let (a, diff) = rest.split_at_mut(width);
    for (row, out) in rows.chunks_exact(rb.max(1)).zip(decoded.chunks_exact_mut(width.max(1))) {
        decode_row(SimdLevel::Scalar, t, row, side.as_deref(), out);
        f(out);
    }
    if let Some(side) = side.as_deref_mut() {
        let (anchor, scales) = side.split_at_mut(width);
        for (x, &h) in a.iter_mut().zip(anchor.iter()) {
            *x = f16::from_bits(h).to_f32();
        }
        f(a);
        set_anchor(anchor, a);
        if !scales.is_empty() {
            set_channel_scales(scales, decoded, anchor);
        }
    }
    for (row, x) in rows.chunks_exact_mut(rb.max(1)).zip(decoded.chunks_exact(width.max(1))) {
        match side.as_deref() {
            Some(side) => encode_diff(t, x, side, diff, row),
            None => encode_row(t, x, row),
        }
    }
}

/// Encodes a row of `t` for the cache: [`crate::quant::quantize_row`], except that Q4_0 blocks
/// take the scale of least squared error (searched around the largest value's, each candidate's
/// levels then refitted) instead of mapping the largest value to -8. Same layout, same decoder;
/// on Qwen2.5-Coder-0.5B's keys it cuts the q4_0 cache's KL divergence by a third.
pub(crate) fn encode_row(t: KvCacheDtype, src: &[f32], dst: &mut [u8]) {
    if t != KvCacheDtype::Q4_0 {
        return crate::quant::quantize_row(t.dtype(), src, dst);
    }
    assert!(src.len().is_multiple_of(32) && dst.len() == t.row_bytes(src.len()), "whole Q4_0 blocks");
    for (x, b) in src.chunks_exact(32).zip(dst.chunks_exact_mut(18)) {
        let d = q4_0_scale(x);
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let q = |v: f32| (level4(v * id) as i32 + 8) as u8;
        for j in 0..16 {
            b[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
        }
    }
}

/// `x` rounded to the nearest Q4_0 level: clamped to -8..=7 (NaN to -8), then rounded half to
/// even by adding and taking away 1.5 x 2^23. By hand because `f32::round` is a libm call on
/// the x86-64 baseline, and encoding a row tries dozens of scales (it was half of a q4_0
/// prefill's time).
#[inline]
#[allow(clippy::manual_clamp)] // `clamp` keeps NaN; this maps it to -8.
fn level4(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let c = x.max(-8.0).min(7.0);
    (c + MAGIC) - MAGIC
}

/// The f16-representable scale `d` minimising `Σ (x - d·q)²` over levels `q = clamp(round(x /
/// d), -8, 7)`, among candidates around the largest value mapping to -8 or to 7 (60% to 100% of
/// it, in steps of 2.5%), each also refitted by least squares for its levels.
fn q4_0_scale(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
    if m == 0.0 {
        return 0.0;
    }
    let x2: f32 = x.iter().map(|v| v * v).sum();
    // All candidates at once, one per lane ([`level_sums`]); then, per candidate, its squared
    // error (from Σ x·q and Σ q·q, no second pass) and its scale of least squares.
    let mut d = [0f32; SCALE_LANES];
    for (i, base) in [m / -8.0, m / 7.0].into_iter().enumerate() {
        for k in 0..SCALE_STEPS {
            d[i * SCALE_STEPS + k] = f16::from_f32(base * (0.6 + 0.025 * k as f32)).to_f32();
        }
    }
    let errors = |d: &[f32; SCALE_LANES], refit: &mut [f32; SCALE_LANES]| -> [f32; SCALE_LANES] {
        let (mut xq, mut qq) = ([0f32; SCALE_LANES], [0f32; SCALE_LANES]);
        level_sums(cpu::level(), x, d, &mut xq, &mut qq);
        let mut err = [x2; SCALE_LANES];
        for c in 0..SCALE_LANES {
            let d = d[c];
            if d != 0.0 {
                err[c] = x2 - 2.0 * d * xq[c] + d * d * qq[c];
                refit[c] = if qq[c] > 0.0 { xq[c] / qq[c] } else { d };
            } else {
                refit[c] = d;
            }
        }
        err
    };
    let mut refit = [0f32; SCALE_LANES];
    let e1 = errors(&d, &mut refit);
    let d2 = refit.map(|r| f16::from_f32(r).to_f32());
    let e2 = errors(&d2, &mut refit);
    let mut best = (f32::INFINITY, 0f32);
    for c in 0..2 * SCALE_STEPS {
        for (e, d) in [(e1[c], d[c]), (e2[c], d2[c])] {
            if e < best.0 {
                best = (e, d);
            }
        }
    }
    best.1
}

/// Candidate scales per side of [`q4_0_scale`] (60%..=100% of the largest value's, by 2.5%).
const SCALE_STEPS: usize = 17;
/// Both sides' candidates, padded to whole vectors of 16 (unused lanes hold scale 0).
const SCALE_LANES: usize = 48;

/// For each candidate scale `d[c]` (0: skipped), `xq[c] = Σ x·q` and `qq[c] = Σ q·q` over `x`
/// with `q = level4(x / d[c])`, summed in `x`'s order. Lanes are independent and each adds in
/// the same order at every level, so the vector builds (the same code compiled for wider
/// registers) give the scalar bits.
fn level_sums(
    level: SimdLevel,
    x: &[f32],
    d: &[f32; SCALE_LANES],
    xq: &mut [f32; SCALE_LANES],
    qq: &mut [f32; SCALE_LANES],
) {
    let id = d.map(|d| if d == 0.0 { 0.0 } else { 1.0 / d });
    #[inline(always)]
    fn sums(x: &[f32], id: &[f32; SCALE_LANES], xq: &mut [f32; SCALE_LANES], qq: &mut [f32; SCALE_LANES]) {
        for &v in x {
            for c in 0..SCALE_LANES {
                let q = level4(v * id[c]);
                xq[c] += v * q;
                qq[c] += q * q;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn sums_avx512(
            x: &[f32],
            id: &[f32; SCALE_LANES],
            xq: &mut [f32; SCALE_LANES],
            qq: &mut [f32; SCALE_LANES],
        ) {
            sums(x, id, xq, qq)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn sums_avx2(
            x: &[f32],
            id: &[f32; SCALE_LANES],
            xq: &mut [f32; SCALE_LANES],
            qq: &mut [f32; SCALE_LANES],
        ) {
            sums(x, id, xq, qq)
        }
        match level {
            // SAFETY: the level only names features the CPU has.
            SimdLevel::Avx512 => return unsafe { sums_avx512(x, &id, xq, qq) },
            // SAFETY: as above.
            SimdLevel::Avx2 => return unsafe { sums_avx2(x, &id, xq, qq) },
            _ => {}
        }
    }
    sums(x, &id, xq, qq)
}

/// `dst` = the row `src` of `t` decoded, then times the channel scales and plus the anchor of
/// `side` where given (f16 bits: the anchor row, then the scales if it holds two rows): as
/// [`crate::quant::dequantize_row`], then an f32 multiply and an f32 add, bitwise, at every level.
pub(crate) fn decode_row(level: SimdLevel, t: KvCacheDtype, src: &[u8], side: Option<&[u16]>, dst: &mut [f32]) {
    let n = dst.len();
    assert!(src.len() == t.row_bytes(n) && side.is_none_or(|a| a.len() == n || a.len() == 2 * n), "row sizes");
    let (anchor, scales) = match side {
        Some(side) => {
            let (a, s) = side.split_at(n);
            (Some(a), (!s.is_empty()).then_some(s))
        }
        None => (None, None),
    };
    match (level, t) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has; sizes asserted above (whole blocks).
        (SimdLevel::Avx512, KvCacheDtype::Q8_0 | KvCacheDtype::Q4_0) => unsafe {
            x86::decode_row_avx512(t == KvCacheDtype::Q8_0, src, anchor, scales, dst)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (the AVX2 level implies F16C).
        (SimdLevel::Avx2, KvCacheDtype::Q8_0 | KvCacheDtype::Q4_0) => unsafe {
            x86::decode_row_avx2(t == KvCacheDtype::Q8_0, src, anchor, scales, dst)
        },
        _ => {
            crate::quant::dequantize_row(t.dtype(), src, dst);
            if let Some(s) = scales {
                for (x, &s) in dst.iter_mut().zip(s) {
                    *x *= f16::from_bits(s).to_f32();
                }
            }
            if let Some(a) = anchor {
                for (x, &a) in dst.iter_mut().zip(a) {
                    *x += f16::from_bits(a).to_f32();
                }
            }
        }
    }
}

/// `kt[d * CHUNK + j]` = key `j` of a tile of keys of type `t` ([`CodedKv`]) decoded, channel
/// `d`, with `side` (anchor row, then channel scales if it holds two): bitwise [`decode_row`] of
/// each position, transposed.
fn decode_tile(level: SimdLevel, t: KvCacheDtype, tile: &[u8], hd: usize, side: &[u16], kt: &mut [f32]) {
    let rb = t.row_bytes(hd);
    assert!(
        t.is_quantized() && hd.is_multiple_of(32) && tile.len() == CHUNK * rb && kt.len() >= hd * CHUNK,
        "a whole tile of block-format rows"
    );
    assert!(side.len() == hd || side.len() == 2 * hd, "an anchor row, then maybe channel scales");
    let (anchor, scales) = side.split_at(hd);
    match (level, t) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has; sizes asserted above.
        (SimdLevel::Avx512, KvCacheDtype::Q8_0) => unsafe { x86::decode_tile_avx512(tile, hd, anchor, kt) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (the AVX2 level implies F16C).
        (SimdLevel::Avx2, KvCacheDtype::Q8_0) => unsafe { x86::decode_tile_avx2(tile, hd, anchor, kt) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (SimdLevel::Avx512, KvCacheDtype::Q4_0) if scales.len() == hd => unsafe {
            x86::decode_tile_q4_avx512(tile, hd, anchor, scales, kt)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (SimdLevel::Avx2, KvCacheDtype::Q4_0) if scales.len() == hd => unsafe {
            x86::decode_tile_q4_avx2(tile, hd, anchor, scales, kt)
        },
        _ => {
            let (mut row, mut key) = (vec![0u8; rb], vec![0f32; hd]);
            for j in 0..CHUNK {
                tile_get(tile, j, hd, &mut row);
                decode_row(SimdLevel::Scalar, t, &row, Some(side), &mut key);
                for (d, &x) in key.iter().enumerate() {
                    kt[d * CHUNK + j] = x;
                }
            }
        }
    }
}

impl KvSource for CodedKv<'_> {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    fn head_dim(&self) -> usize {
        self.head_dim
    }
    fn prefetch(&self, table: &[u32], g: usize, p0: usize) {
        let (hd, bs, nkv) = (self.head_dim, self.block_size, self.num_kv_heads);
        let Some(&b) = table.get(p0 / bs) else { return };
        let (krb, vrb) = (self.types.k.row_bytes(hd), self.types.v.row_bytes(hd));
        let r0 = (b as usize * nkv + g) * bs + p0 % bs;
        let r1 = r0 + CHUNK.min(bs - p0 % bs);
        if let Some(k) = self.k.get(r0 * krb..r1 * krb) {
            prefetch_lines(k);
        }
        if let Some(v) = self.v.get(r0 * vrb..r1 * vrb) {
            prefetch_lines(v);
        }
        let side = self.types.k.key_side_len(hd);
        if let Some(a) = self.anchors.get((b as usize * nkv + g) * side..(b as usize * nkv + g + 1) * side) {
            prefetch_lines(a);
        }
    }
    fn int8_keys(&self, level: SimdLevel) -> bool {
        let hd = self.head_dim;
        match self.types.k {
            KvCacheDtype::Q8_0 => {
                hd.is_multiple_of(32) && hd <= 256 && level == SimdLevel::Avx512 && crate::cpu::has_avx512_vnni()
            }
            // Q4_0 tiles at every level: four channels a byte product (`vpmaddubsw` too) against
            // eight f32 operations a value to widen them.
            KvCacheDtype::Q4_0 => hd.is_multiple_of(32) && hd <= q4_keys::MAX_HD && tiled(self.types, self.block_size),
            _ => false,
        }
    }
    fn query_blocks(&self) -> bool {
        self.types.k == KvCacheDtype::Q8_0
    }
    fn int8_scores(
        &self,
        level: SimdLevel,
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
        (q, qi, qd): (&[f32], &[u8], &[f32]),
        active: &[(usize, usize)],
        scale: f32,
        s: &mut [f32],
    ) {
        let (hd, bs, nkv) = (self.head_dim, self.block_size, self.num_kv_heads);
        let krb = self.types.k.row_bytes(hd);
        let side = self.types.k.key_side_len(hd);
        if self.types.k == KvCacheDtype::Q4_0 {
            // A stored tile of one block ([`KvSource::int8_keys`]), against the block's side rows.
            let (tile, side) = self.key_tile(table, g, p0);
            return q4_keys::scores(level, tile, hd, side, q, active, n, scale, s);
        }
        let mut rows: [&[u8]; CHUNK] = [&[]; CHUNK];
        let mut blk_of = [0usize; CHUNK];
        let mut anchors: [&[u16]; CHUNK] = [&[]; CHUNK];
        let (keys, nblocks) = if tiled(self.types, bs) {
            // The chunk is one stored tile of one block.
            let (tile, side) = self.key_tile(table, g, p0);
            anchors[0] = &side[..hd];
            (Int8Keys::Tile(tile), 1)
        } else {
            // The chunk's key rows, and for each the index of its block among the chunk's
            // distinct blocks, whose anchors follow.
            let mut blocks: [usize; CHUNK] = [usize::MAX; CHUNK];
            let mut nblocks = 0;
            for j in 0..n {
                let pos = p0 + j;
                let b = table[pos / bs] as usize;
                if nblocks == 0 || blocks[nblocks - 1] != b {
                    blocks[nblocks] = b;
                    nblocks += 1;
                }
                blk_of[j] = nblocks - 1;
                let r = (b * nkv + g) * bs + pos % bs;
                rows[j] = &self.k[r * krb..(r + 1) * krb];
            }
            for (a, &b) in anchors.iter_mut().zip(&blocks[..nblocks]) {
                *a = &self.anchors[(b * nkv + g) * side..][..hd];
            }
            (Int8Keys::Rows(&rows[..n]), nblocks)
        };
        let chunk =
            Int8Chunk { keys, n, blk_of: &blk_of[..n], anchors: &anchors[..nblocks], q, qi, qd, active, hd, scale };
        #[cfg(target_arch = "x86_64")]
        if level == SimdLevel::Avx512 && crate::cpu::has_avx512_vnni() {
            // SAFETY: the CPU has AVX-512 with VNNI (checked just above); the keys (a tile or
            // rows) and the queries are whole q8_0 blocks (the callee checks).
            return unsafe { x86::int8_tile_vnni(&chunk, s) };
        }
        int8_scores_scalar(&chunk, s);
    }
    fn accumulate_values(
        &self,
        level: SimdLevel,
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
        active: &[(usize, usize)],
        s: &[f32],
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
    ) -> bool {
        let hd = self.head_dim;
        if !self.types.v.is_quantized() || !coded_values::takes(level, hd, active.len()) {
            return false;
        }
        let mut rows: [&[u8]; CHUNK] = [&[]; CHUNK];
        for (j, row) in rows.iter_mut().enumerate().take(n) {
            *row = self.value_row(table, g, p0 + j);
        }
        let q8 = self.types.v == KvCacheDtype::Q8_0;
        coded_values::accumulate(level, q8, &rows[..n], hd, active, s, m, l, o);
        true
    }
    fn values<'s>(
        &'s self,
        level: SimdLevel,
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
        _kt: &'s mut Vec<f32>,
        v: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        self.decode_values(level, table, g, p0, n, v);
        (&v[..n * self.head_dim], self.head_dim)
    }
    fn check(&self) {
        let rows = self.block_size * self.num_kv_heads;
        let (krb, vrb) = (self.types.k.row_bytes(self.head_dim), self.types.v.row_bytes(self.head_dim));
        assert!(
            rows > 0
                && self.types.k.fits(self.head_dim)
                && self.types.v.fits(self.head_dim)
                && self.k.len().is_multiple_of(rows * krb.max(1))
                && self.k.len() / krb.max(1) == self.v.len() / vrb.max(1)
                && self.anchors.len()
                    == self.k.len() / krb.max(1) / self.block_size * self.types.k.key_side_len(self.head_dim),
            "keys and values must be whole blocks, with side rows per block and kv head for block-format keys"
        );
    }
    fn chunk<'s>(
        &'s self,
        level: SimdLevel,
        table: &[u32],
        g: usize,
        p0: usize,
        n: usize,
        kt: &'s mut Vec<f32>,
        v: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize, &'s [f32], usize) {
        let (hd, bs) = (self.head_dim, self.block_size);
        kt.resize(hd * CHUNK, 0.0);
        v.resize(CHUNK * hd, 0.0);
        if tiled(self.types, bs) {
            // Block-format keys stored transposed: decoded straight into `kt`.
            let (tile, side) = self.key_tile(table, g, p0);
            decode_tile(level, self.types.k, tile, hd, side, kt);
            if n < CHUNK {
                for d in 0..hd {
                    kt[d * CHUNK + n..(d + 1) * CHUNK].fill(0.0);
                }
            }
            self.decode_values(level, table, g, p0, n, v);
            return (&kt[..], CHUNK, &v[..n * hd], hd);
        }
        // Where vectors transpose whole tiles: the keys decoded as rows, then transposed.
        let tiles = match level {
            SimdLevel::Avx512 => hd.is_multiple_of(16) && hd <= 256,
            SimdLevel::Avx2 => hd.is_multiple_of(8) && hd <= 256,
            _ => false,
        };
        if tiles {
            thread_local! {
                /// The chunk's keys as rows, `[CHUNK, hd]`, before the transpose.
                static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            return ROWS.with_borrow_mut(|rows| {
                rows.resize(CHUNK * hd, 0.0);
                for j in 0..n {
                    let pos = p0 + j;
                    let slot = table[pos / bs] as usize * bs + pos % bs;
                    self.read_at(level, slot, g, &mut rows[j * hd..(j + 1) * hd], &mut v[j * hd..(j + 1) * hd]);
                }
                rows[n * hd..].fill(0.0);
                match level {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the level only names features the CPU has; `rows` holds CHUNK rows of
                    // `hd` (a multiple of 16) and `kt` `hd * CHUNK` values.
                    SimdLevel::Avx512 => unsafe { x86::transpose_chunk_avx512(rows, hd, kt) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above, `hd` a multiple of 8.
                    SimdLevel::Avx2 => unsafe { x86::transpose_chunk_avx2(rows, hd, kt) },
                    _ => unreachable!("tiles are only taken at the levels above"),
                }
                (&kt[..], CHUNK, &v[..n * hd], hd)
            });
        }
        let mut row = [0f32; 1024];
        let mut heap = Vec::new();
        let key: &mut [f32] = if hd <= row.len() {
            &mut row[..hd]
        } else {
            heap.resize(hd, 0.0);
            &mut heap
        };
        for j in 0..CHUNK {
            if j >= n {
                for d in 0..hd {
                    kt[d * CHUNK + j] = 0.0;
                }
                continue;
            }
            let pos = p0 + j;
            let slot = table[pos / bs] as usize * bs + pos % bs;
            self.read_at(level, slot, g, key, &mut v[j * hd..(j + 1) * hd]);
            for (d, &x) in key.iter().enumerate() {
                kt[d * CHUNK + j] = x;
            }
        }
        (&kt[..], CHUNK, &v[..n * hd], hd)
    }
}

/// What each query token attends to.
#[derive(Debug, Clone, Copy)]
pub struct QueryContext<'a> {
    /// Blocks of the token's sequence, in position order.
    pub block_table: &'a [u32],
    /// Number of cached positions the token sees (its position + 1: causal).
    pub context_len: usize,
    /// The first position it sees: 0, or where a sliding window starts (the window is
    /// `start..context_len`).
    pub start: usize,
}

impl<'a> QueryContext<'a> {
    /// Causal attention over `0..context_len`.
    pub fn causal(block_table: &'a [u32], context_len: usize) -> QueryContext<'a> {
        QueryContext { block_table, context_len, start: 0 }
    }

    /// Causal attention over the last `window` of `0..context_len` (all of it for `None`).
    pub fn windowed(block_table: &'a [u32], context_len: usize, window: Option<usize>) -> QueryContext<'a> {
        let start = window.map_or(0, |w| context_len.saturating_sub(w));
        QueryContext { block_table, context_len, start }
    }
}

/// `out[t, h, :] = softmax(scale * q[t, h] · K[ctx]) V[ctx]` for every query token `t` and head
/// `h`; query head `h` reads kv head `h / (num_heads / num_kv_heads)` (GQA/MQA).
/// `q` and `out` are `[tokens, num_heads * head_dim]`. A token with an empty context gets zeros.
pub fn paged_attention<S: KvSource>(
    q: &[f32],
    num_heads: usize,
    kv: S,
    queries: &[QueryContext<'_>],
    scale: f32,
    out: &mut [f32],
) {
    paged_attention_at(cpu::level(), q, num_heads, kv, queries, scale, out)
}

/// [`paged_attention`] at an explicit SIMD level (tests and benchmarks).
pub fn paged_attention_at<S: KvSource>(
    level: SimdLevel,
    q: &[f32],
    num_heads: usize,
    kv: S,
    queries: &[QueryContext<'_>],
    scale: f32,
    out: &mut [f32],
) {
    let hd = kv.head_dim();
    let row = num_heads * hd;
    assert_eq!(q.len(), queries.len() * row);
    assert_eq!(out.len(), q.len());
    let nkv = kv.num_kv_heads();
    assert!(nkv > 0 && num_heads.is_multiple_of(nkv));
    kv.check();
    let group = num_heads / nkv;
    for ctx in queries {
        assert!(ctx.context_len <= ctx.block_table.len() * kv.block_size(), "context runs past the block table");
    }
    // AVX2 handles rows of whole 8-lane vectors only.
    let level = match level {
        SimdLevel::Avx2 if !hd.is_multiple_of(8) => SimdLevel::Scalar,
        l => l,
    };
    let work: usize = queries.iter().map(|c| c.context_len * row * 2).sum();
    // Runs of up to QUERY_TILE consecutive query tokens of one sequence: a run reads each chunk
    // of keys and values once for all its tokens (and all the query heads sharing the kv head).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for t in 0..queries.len() {
        match runs.last_mut() {
            Some((s, e))
                if *e == t && t - *s < QUERY_TILE && std::ptr::eq(queries[*s].block_table, queries[t].block_table) =>
            {
                *e = t + 1
            }
            _ => runs.push((t, t + 1)),
        }
    }
    // Item `it` is (kv head it / runs, run it % runs): a thread's consecutive items share a kv
    // head, whose keys and values then stay in cache.
    let nr = runs.len();
    let n_items = nr * nkv;
    // Items cost in proportion to their tokens' contexts (a causal prefill's last tokens see the
    // whole prompt, its first ones almost nothing), so the threads get ranges of equal total
    // context rather than equal item counts.
    let cost = |it: usize| {
        let (s, e) = runs[it % nr];
        queries[s..e].iter().map(|c| c.context_len.saturating_sub(c.start) + CHUNK).sum::<usize>()
    };
    let parts = parallel::num_threads().min(n_items).max(1);
    let bounds = parallel::balanced_bounds(n_items, parts, cost);
    // An item's query rows: token-major, then the `group` heads of kv head `g`, `hd` each.
    let item = group * hd;
    let out = SharedOut(out.as_mut_ptr(), out.len());
    parallel::for_each_range(parts, work, |p0, p1| {
        let out = &out;
        let mut scratch = Scratch::default();
        for it in bounds[p0]..bounds[p1] {
            let (g, (s, e)) = (it / nr, runs[it % nr]);
            scratch.q.clear();
            for t in s..e {
                scratch.q.extend_from_slice(&q[t * row + g * item..t * row + (g + 1) * item]);
            }
            attend(level, group, &kv, g, &queries[s..e], scale, &mut scratch);
            for (k, rows) in scratch.o.chunks_exact(item).enumerate() {
                let at = (s + k) * row + g * item;
                assert!(at + item <= out.1);
                // SAFETY: in bounds (asserted), and items cover disjoint (token, kv head) pairs,
                // so no other thread touches these `item` floats while `out` is borrowed here.
                unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), out.0.add(at), item) };
            }
        }
    });
}

/// Per-thread buffers reused across items.
#[derive(Default)]
struct Scratch {
    /// The item's query rows, `[tokens, group, hd]`.
    q: Vec<f32>,
    /// Running maximum of each query row.
    m: Vec<f32>,
    /// Running softmax denominator of each query row.
    l: Vec<f32>,
    /// The chunk's scores, `[rows, CHUNK]`, `-inf` past what the row sees.
    s: Vec<f32>,
    /// A staged chunk of keys, `[hd, CHUNK]`.
    kt: Vec<f32>,
    /// A staged chunk of values, `[CHUNK, hd]`.
    v: Vec<f32>,
    /// The rows that see part of the current chunk, and how many of its keys: (row, seen).
    active: Vec<(usize, usize)>,
    /// The item's output rows, `[tokens, group, hd]`.
    o: Vec<f32>,
    /// The query rows as q8 blocks (values, scales), for q8_0 keys.
    qi: Vec<u8>,
    qd: Vec<f32>,
}

/// One item: the query rows in `scratch.q` (`ctxs.len()` tokens of one sequence x `group` heads)
/// against kv head `g`, written normalised to `scratch.o`. Each row sees exactly the keys of its own
/// context, chunk by chunk, with the same operations as if it were alone.
fn attend<S: KvSource>(
    level: SimdLevel,
    group: usize,
    kv: &S,
    g: usize,
    ctxs: &[QueryContext<'_>],
    scale: f32,
    scratch: &mut Scratch,
) {
    let hd = kv.head_dim();
    let rows = ctxs.len() * group;
    let Scratch { q, m, l, s, kt, v, active, o, qi, qd } = scratch;
    // q8_0 keys: the query rows as q8 blocks, once per item.
    let int8 = kv.int8_keys(level);
    if int8 && kv.query_blocks() {
        quantize_queries(level, q, hd, qi, qd);
    }
    o.clear();
    o.resize(rows * hd, 0.0);
    m.clear();
    m.resize(rows, f32::NEG_INFINITY);
    l.clear();
    l.resize(rows, 0.0);
    s.resize(rows * CHUNK, 0.0);
    let Some(longest) = ctxs.iter().map(|c| c.context_len).max() else { return };
    if hd == 0 {
        return;
    }
    let table = ctxs[0].block_table;
    // Chunks stay at multiples of CHUNK (batch invariance): from the one holding the earliest
    // position any token sees.
    let first = ctxs.iter().map(|c| c.start.min(c.context_len)).min().unwrap_or(0);
    let mut p0 = first / CHUNK * CHUNK;
    while p0 < longest {
        let n = (longest - p0).min(CHUNK);
        let in_place = if int8 { None } else { kv.chunk_f16(level, table, g, p0, n) };
        // The chunk after next: asked for by the f16 kernels as they go where it is two runs,
        // else here at once.
        let mut ahead = Ahead::NONE;
        if p0 + PREFETCH_AHEAD < longest {
            match in_place.as_ref().and_then(|_| kv.ahead_f16(table, g, p0 + PREFETCH_AHEAD)) {
                Some((k, v)) => ahead = Ahead::new(k, v),
                None => kv.prefetch(table, g, p0 + PREFETCH_AHEAD),
            }
        }
        // The chunk as f32: key j's dimension d at kc[d * ks + j], its value at vc[j * vs ..].
        active.clear();
        for (t, ctx) in ctxs.iter().enumerate() {
            if ctx.context_len > p0 && ctx.start < p0 + n {
                // This token sees the first `seen` keys of the chunk.
                let seen = (ctx.context_len - p0).min(n);
                active.extend((t * group..(t + 1) * group).map(|i| (i, seen)));
            }
        }
        // A sliding window that starts inside the chunk: the keys before it are not seen.
        let hide_before_window = |s: &mut [f32]| {
            for &(i, _) in active.iter() {
                let from = ctxs[i / group].start.saturating_sub(p0);
                s[i * CHUNK..i * CHUNK + from].fill(f32::NEG_INFINITY);
            }
        };
        #[cfg(target_arch = "x86_64")]
        if let Some((kh, ks, vh, vs)) = in_place {
            assert!(kh.len() >= (hd - 1) * ks + CHUNK, "key chunk out of range");
            // SAFETY: `chunk_f16` answers only at the AVX2 and AVX-512 levels, so the CPU has
            // that level's features (F16C and FMA included); the keys' length is asserted
            // above, and the callees slice `q`, `s`, `m`, `l`, `o` and check the values against
            // `active` (`hd` is a multiple of 8 at the AVX2 level).
            unsafe {
                if level == SimdLevel::Avx512 {
                    x86::scores_avx512(q, hd, active, kh, ks, scale, s, ahead);
                    hide_before_window(s);
                    x86::update_avx512(active, s, vh, vs, m, l, o, hd);
                } else {
                    x86::scores_avx2(q, hd, active, kh, ks, scale, s, ahead);
                    hide_before_window(s);
                    x86::update_avx2(active, s, vh, vs, m, l, o, hd);
                }
            }
            p0 += n;
            continue;
        }
        let staged = if int8 {
            kv.int8_scores(level, table, g, p0, n, (q, qi, qd), active, scale, s);
            None
        } else {
            let (kc, ks, vc, vs) = kv.chunk(level, table, g, p0, n, kt, v);
            scores(level, q, hd, active, kc, ks, scale, s);
            Some((vc, vs))
        };
        hide_before_window(s);
        let (vc, vs) = match staged {
            Some(staged) => staged,
            None if kv.accumulate_values(level, table, g, p0, n, active, s, m, l, o) => {
                p0 += n;
                continue;
            }
            None => kv.values(level, table, g, p0, n, kt, v),
        };
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level only names features the CPU has; the callee checks bounds.
            SimdLevel::Avx512 => unsafe { x86::update_avx512(active, s, vc, vs, m, l, o, hd) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (`hd` is a multiple of 8 at this level).
            SimdLevel::Avx2 => unsafe { x86::update_avx2(active, s, vc, vs, m, l, o, hd) },
            _ => {
                for &(i, seen) in active.iter() {
                    let (si, acc) = (&s[i * CHUNK..(i + 1) * CHUNK], &mut o[i * hd..(i + 1) * hd]);
                    update_scalar(si, seen, vc, vs, &mut m[i], &mut l[i], acc);
                }
            }
        }
        p0 += n;
    }
    for i in 0..rows {
        let l = l[i];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for v in &mut o[i * hd..(i + 1) * hd] {
            *v *= inv;
        }
    }
}

/// Copies (widening to f32) positions `p0..p0 + n` of kv head `g`: keys to `kt` as
/// `[hd, CHUNK]` (lanes past `n` zero), values to `v` as `[n, hd]`.
#[allow(clippy::too_many_arguments)]
fn stage<T: KvElem>(
    level: SimdLevel,
    kv: PagedKv<'_, T>,
    table: &[u32],
    g: usize,
    p0: usize,
    n: usize,
    kt: &mut Vec<f32>,
    v: &mut Vec<f32>,
) {
    let (hd, bs) = (kv.head_dim, kv.block_size);
    let kd = kv.num_kv_heads * hd;
    kt.resize(hd * CHUNK, 0.0);
    v.resize(CHUNK * hd, 0.0);
    if bs.is_multiple_of(CHUNK) {
        // One block holds the chunk: `hd` rows of CHUNK keys, `n` contiguous value rows.
        let (b, off) = (table[p0 / bs] as usize, p0 % bs);
        let kb = (b * kd + g * hd) * bs + off;
        T::widen_rows(level, &kv.k[kb..kb + (hd - 1) * bs + CHUNK], bs, hd, CHUNK, kt);
        let vb = (b * kd + g * hd) * bs + off * hd;
        T::widen_rows(level, &kv.v[vb..vb + n * hd], n * hd, 1, n * hd, v);
        return;
    }
    for j in 0..CHUNK {
        if j >= n {
            for d in 0..hd {
                kt[d * CHUNK + j] = 0.0;
            }
            continue;
        }
        let pos = p0 + j;
        let (b, off) = (table[pos / bs] as usize, pos % bs);
        let kb = (b * kd + g * hd) * bs + off;
        for d in 0..hd {
            kt[d * CHUNK + j] = kv.k[kb + d * bs].to_f32();
        }
        let vb = (b * kd + g * hd) * bs + off * hd;
        T::widen_rows(level, &kv.v[vb..vb + hd], hd, 1, hd, &mut v[j * hd..(j + 1) * hd]);
    }
}

/// Scores of the `active` rows (`(row, seen)`) of `q` (`[rows, hd]`) against one chunk of keys
/// (`kt[d * ks + j]`, `kt.len() >= (hd - 1) * ks + CHUNK`): `s[row] = scale * q[row] · k_j` for
/// `j < seen`, `-inf` past it.
#[allow(clippy::too_many_arguments)]
fn scores(
    level: SimdLevel,
    q: &[f32],
    hd: usize,
    active: &[(usize, usize)],
    kt: &[f32],
    ks: usize,
    scale: f32,
    s: &mut [f32],
) {
    assert!(kt.len() >= (hd - 1) * ks + CHUNK, "key chunk out of range");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level only names features the CPU has; `kt` was checked above and the
        // callee slices rows of `q` and `s` with bounds checks.
        SimdLevel::Avx512 => unsafe { x86::scores_avx512(q, hd, active, kt, ks, scale, s, Ahead::NONE) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::scores_avx2(q, hd, active, kt, ks, scale, s, Ahead::NONE) },
        _ => {
            for &(i, seen) in active {
                let mut acc = [0f32; CHUNK];
                for (d, &qd) in q[i * hd..(i + 1) * hd].iter().enumerate() {
                    for (a, &k) in acc.iter_mut().zip(&kt[d * ks..d * ks + CHUNK]) {
                        *a += qd * k;
                    }
                }
                for (j, (sj, a)) in s[i * CHUNK..(i + 1) * CHUNK].iter_mut().zip(acc).enumerate() {
                    *sj = if j < seen { a * scale } else { f32::NEG_INFINITY };
                }
            }
        }
    }
}

/// Asserts that every active row `(i, seen)` of a chunk update lies in its buffers: scores
/// `s[i * CHUNK..]`, values up to position `seen` (`v`: length and row stride), output
/// `o[i * hd..]`, and `m[i]` / `l[i]` (`ml`: the shorter of the two).
fn check_active(active: &[(usize, usize)], s: usize, (v, vs): (usize, usize), o: usize, ml: usize, hd: usize) {
    for &(i, seen) in active {
        assert!(
            (i + 1) * CHUNK <= s
                && (1..=CHUNK).contains(&seen)
                && v >= (seen - 1) * vs + hd
                && (i + 1) * hd <= o
                && i < ml,
            "active row out of range"
        );
    }
}

/// The runs `k..e` of up to `max` consecutive rows of `group` that are `live` (bit `k`) and
/// have seen the same number of keys, in order: the rows that can share value vectors.
fn runs(group: &[(usize, usize)], live: u32, max: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut k = 0;
    std::iter::from_fn(move || {
        while k < group.len() && live & (1 << k) == 0 {
            k += 1;
        }
        if k >= group.len() {
            return None;
        }
        let mut e = k + 1;
        while e < group.len() && e - k < max && live & (1 << e) != 0 && group[e].1 == group[k].1 {
            e += 1;
        }
        let run = (k, e);
        k = e;
        Some(run)
    })
}

/// One chunk for one query row: online-softmax update of `m`/`l` from the row's scores `s`
/// (`-inf` past `seen`), and the rescaled accumulation of the values (`v[j * vs..][..hd]`) into
/// `acc` (unnormalised).
fn update_scalar(s: &[f32], seen: usize, v: &[f32], vs: usize, m: &mut f32, l: &mut f32, acc: &mut [f32]) {
    let hd = acc.len();
    let s = &s[..seen];
    let mx = s.iter().copied().fold(*m, f32::max);
    if mx == f32::NEG_INFINITY {
        return;
    }
    let corr = if *m == f32::NEG_INFINITY { 0.0 } else { (*m - mx).exp() };
    *l *= corr;
    for a in acc.iter_mut() {
        *a *= corr;
    }
    for (j, &sj) in s.iter().enumerate() {
        let p = (sj - mx).exp();
        *l += p;
        crate::ops::axpy(p, &v[j * vs..j * vs + hd], acc);
    }
    *m = mx;
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::CHUNK;
    use crate::math::x86::{exp256, exp512};

    /// What the AVX2 score and value kernels read: f32 (staged, or an f32 cache) or an f16 cache
    /// read in place and widened in registers (exactly, so the same products as from a staged
    /// copy, without writing and reading that copy).
    pub trait Lanes8: Copy {
        /// 8 consecutive values at `p`, as f32 (inlined into callers with AVX2 and F16C).
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Lanes8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Lanes8 for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    /// [`Lanes8`] for the AVX-512 kernels: 16 values at `p`, or the lanes of `mask` (zero
    /// elsewhere), as f32 (inlined into callers with AVX-512 F/BW/VL).
    pub trait Lanes16: Copy {
        unsafe fn load16(p: *const Self) -> __m512;
        unsafe fn load16_masked(mask: __mmask16, p: *const Self) -> __m512;
    }

    impl Lanes16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load16_masked(mask: __mmask16, p: *const f32) -> __m512 {
            _mm512_maskz_loadu_ps(mask, p)
        }
    }

    impl Lanes16 for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load16_masked(mask: __mmask16, p: *const f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
        }
    }

    /// [`super::quantize_queries`], 32 values per step: the same bytes (`vcvtps2dq` rounds to
    /// nearest even, as `round_ties_even`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_queries_avx512(q: &[f32], qi: &mut [u8], qd: &mut [f32]) {
        assert!(qi.len() == qd.len() * 32 && q.len() >= qi.len());
        let sign = _mm512_set1_ps(-0.0);
        for (b, d) in qd.iter_mut().enumerate() {
            let (x0, x1) = (_mm512_loadu_ps(q.as_ptr().add(32 * b)), _mm512_loadu_ps(q.as_ptr().add(32 * b + 16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
            *d = amax / 127.0;
            let inv = _mm512_set1_ps(if *d > 0.0 { 1.0 / *d } else { 0.0 });
            let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
            let off = _mm512_set1_epi32(128);
            for (h, x) in [x0, x1].into_iter().enumerate() {
                let v = _mm512_cvtps_epi32(_mm512_mul_ps(x, inv));
                let v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lo), hi), off);
                _mm_storeu_si128(qi.as_mut_ptr().add(32 * b + 16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(v));
            }
        }
    }

    /// [`super::KvSource::int8_scores`] of one chunk with AVX-512 VNNI, as an int8 tile: the
    /// chunk's q8_0 keys transposed so each register holds one 4-byte group of all 16
    /// positions, then per query row and block eight `vpdpbusd` of the broadcast query group
    /// (offset by 128, unsigned) against them; the offset comes back off as 128 x the keys'
    /// block sums, and the block's integer sums are scaled (16 key scales x the query's) into
    /// 16 f32 lanes, one per position.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub unsafe fn int8_tile_vnni(c: &super::Int8Chunk<'_>, s: &mut [f32]) {
        const MAX_GROUPS: usize = 64;
        let (hd, n) = (c.hd, c.n);
        let (nb, ng) = (hd / 32, hd / 4);
        assert!(ng <= MAX_GROUPS && hd.is_multiple_of(32) && n <= CHUNK);
        assert!(c.anchors.iter().all(|a| a.len() == hd));
        assert!(c.blk_of.len() == n && c.blk_of.iter().all(|&b| b < c.anchors.len()));
        // kq[w] lane j = position j's dword w (bytes 4w..4w+4 of its key); zero past n for rows.
        let mut kq = [_mm512_setzero_si512(); MAX_GROUPS];
        // Per block: the 16 key scales.
        let mut dk = [_mm512_setzero_ps(); MAX_GROUPS / 8];
        match c.keys {
            super::Int8Keys::Tile(tile) => {
                // Stored transposed already: a load per group, the scales after the values.
                assert!(tile.len() == CHUNK * nb * 34);
                for (w, k) in kq.iter_mut().enumerate().take(ng) {
                    *k = _mm512_loadu_si512(tile.as_ptr().add(64 * w) as *const _);
                }
                for (b, d) in dk.iter_mut().enumerate().take(nb) {
                    let at = tile.as_ptr().add(CHUNK * hd + 32 * b);
                    *d = _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i));
                }
            }
            super::Int8Keys::Rows(keys) => {
                assert!(keys.len() == n && keys.iter().all(|k| k.len() == nb * 34));
                int8_rows_vnni(keys, nb, &mut kq, &mut dk);
            }
        }
        // Per block: 128 x the keys' sums (the query's offset).
        let mut off = [_mm512_setzero_si512(); MAX_GROUPS / 8];
        let ones = _mm512_set1_epi8(1);
        for (b, o) in off.iter_mut().enumerate().take(nb) {
            let mut sum = _mm512_setzero_si512();
            for k in &kq[8 * b..8 * b + 8] {
                sum = _mm512_dpbusd_epi32(sum, ones, *k);
            }
            *o = _mm512_slli_epi32::<7>(sum);
        }
        score_rows_vnni(c, &kq, &dk, &off, s);
    }

    /// [`int8_tile_vnni`]'s keys from rows: each pair of blocks as a 16 x 16 dword transpose,
    /// and the scales gathered.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn int8_rows_vnni(keys: &[&[u8]], nb: usize, kq: &mut [__m512i], dk: &mut [__m512]) {
        let n = keys.len();
        for b0 in (0..nb).step_by(2) {
            let two = b0 + 1 < nb;
            let mut r = [_mm512_setzero_si512(); 16];
            for (j, r) in r.iter_mut().enumerate().take(n) {
                let k = keys[j].as_ptr().add(34 * b0 + 2);
                let lo = _mm256_loadu_si256(k as *const __m256i);
                let hi = if two { _mm256_loadu_si256(k.add(34) as *const __m256i) } else { _mm256_setzero_si256() };
                *r = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            }
            let cols = crate::dot::kquants::tiled::transpose_16x16(r);
            let groups = if two { 16 } else { 8 };
            kq[8 * b0..8 * b0 + groups].copy_from_slice(&cols[..groups]);
        }
        for (b, d) in dk.iter_mut().enumerate().take(nb) {
            let mut bits = [0u16; CHUNK];
            for (j, x) in bits.iter_mut().enumerate().take(n) {
                *x = u16::from_le_bytes([keys[j][34 * b], keys[j][34 * b + 1]]);
            }
            *d = _mm512_cvtph_ps(_mm256_loadu_si256(bits.as_ptr() as *const __m256i));
        }
    }

    /// [`int8_tile_vnni`]'s scores of each active query row against the chunk's keys `kq`
    /// (scales `dk`, offsets `off` per block).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn score_rows_vnni(c: &super::Int8Chunk<'_>, kq: &[__m512i], dk: &[__m512], off: &[__m512i], s: &mut [f32]) {
        let (hd, n) = (c.hd, c.n);
        let nb = hd / 32;
        assert!(kq.len() >= hd / 4 && dk.len() >= nb && off.len() >= nb);
        for &(i, seen) in c.active {
            let (qi, qd, qf) = (&c.qi[i * hd..(i + 1) * hd], &c.qd[i * nb..(i + 1) * nb], &c.q[i * hd..(i + 1) * hd]);
            assert!(qi.len() == hd && qd.len() == nb && qf.len() == hd);
            // Per block, four independent chains of two `vpdpbusd` (its latency, not its
            // throughput, would bound one chain of eight); blocks into two f32 chains.
            let qp = qi.as_ptr() as *const i32;
            let mut acc = [_mm512_setzero_ps(); 2];
            for b in 0..nb {
                let mut isum = [_mm512_setzero_si512(); 4];
                for t in 0..8 {
                    let w = 8 * b + t;
                    // In bounds: `qi` holds `hd` bytes, w < hd / 4.
                    let qw = std::ptr::read_unaligned(qp.add(w));
                    isum[t % 4] = _mm512_dpbusd_epi32(isum[t % 4], _mm512_set1_epi32(qw), kq[w]);
                }
                let total = _mm512_add_epi32(_mm512_add_epi32(isum[0], isum[1]), _mm512_add_epi32(isum[2], isum[3]));
                let total = _mm512_sub_epi32(total, off[b]);
                let scale = _mm512_mul_ps(dk[b], _mm512_set1_ps(qd[b]));
                acc[b % 2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), scale, acc[b % 2]);
            }
            let acc = _mm512_add_ps(acc[0], acc[1]);
            // Query . anchor per distinct block of the chunk.
            let mut qa = [0f32; CHUNK];
            for (a, x) in c.anchors.iter().zip(qa.iter_mut()) {
                let mut sacc = _mm512_setzero_ps();
                for d in (0..hd).step_by(16) {
                    let av = _mm512_cvtph_ps(_mm256_loadu_si256(a.as_ptr().add(d) as *const __m256i));
                    sacc = _mm512_fmadd_ps(_mm512_loadu_ps(qf.as_ptr().add(d)), av, sacc);
                }
                *x = _mm512_reduce_add_ps(sacc);
            }
            let mut out = [0f32; CHUNK];
            _mm512_storeu_ps(out.as_mut_ptr(), acc);
            let row = &mut s[i * CHUNK..(i + 1) * CHUNK];
            for (j, (sj, &x)) in row.iter_mut().zip(&out).enumerate() {
                *sj = if j < seen.min(n) { (qa[c.blk_of[j]] + x) * c.scale } else { f32::NEG_INFINITY };
            }
        }
    }

    /// `dst[r * width + c] = src[r * stride + c]` widened; the caller checked both extents.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn widen_f16_avx512(src: &[f16], stride: usize, rows: usize, width: usize, dst: &mut [f32]) {
        let (sp, dp) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
        for r in 0..rows {
            let (s, d) = (sp.add(r * stride), dp.add(r * width));
            let mut c = 0;
            while c + 16 <= width {
                _mm512_storeu_ps(d.add(c), _mm512_cvtph_ps(_mm256_loadu_si256(s.add(c) as *const __m256i)));
                c += 16;
            }
            if c < width {
                let mask = (1u16 << (width - c)) - 1;
                let h = _mm256_maskz_loadu_epi16(mask, s.add(c) as *const i16);
                _mm512_mask_storeu_ps(d.add(c), mask, _mm512_cvtph_ps(h));
            }
        }
    }

    /// [`super::decode_row`] of Q8_0 (`q8`) or Q4_0 rows, 16 values at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn decode_row_avx512(
        q8: bool,
        src: &[u8],
        anchor: Option<&[u16]>,
        scales: Option<&[u16]>,
        dst: &mut [f32],
    ) {
        let bb = if q8 { 34 } else { 18 };
        for (b, (blk, y)) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(32)).enumerate() {
            // The scale through F16C: `half`'s portable conversion costs more than the block.
            let d =
                _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes([blk[0], blk[1]])))));
            let q: [__m512i; 2] = if q8 {
                let lo = _mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i);
                let hi = _mm_loadu_si128(blk.as_ptr().add(18) as *const __m128i);
                [_mm512_cvtepi8_epi32(lo), _mm512_cvtepi8_epi32(hi)]
            } else {
                let x = _mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i);
                let m = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(x, m);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), m);
                let eight = _mm512_set1_epi32(8);
                [_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight), _mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight)]
            };
            for (h, q) in q.into_iter().enumerate() {
                let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
                if let Some(s) = scales {
                    let s = _mm256_loadu_si256(s.as_ptr().add(32 * b + 16 * h) as *const __m256i);
                    v = _mm512_mul_ps(v, _mm512_cvtph_ps(s));
                }
                if let Some(a) = anchor {
                    let a = _mm256_loadu_si256(a.as_ptr().add(32 * b + 16 * h) as *const __m256i);
                    v = _mm512_add_ps(v, _mm512_cvtph_ps(a));
                }
                _mm512_storeu_ps(y.as_mut_ptr().add(16 * h), v);
            }
        }
    }

    /// [`decode_row_avx512`] with 8 lanes.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn decode_row_avx2(
        q8: bool,
        src: &[u8],
        anchor: Option<&[u16]>,
        scales: Option<&[u16]>,
        dst: &mut [f32],
    ) {
        let bb = if q8 { 34 } else { 18 };
        for (b, (blk, y)) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(32)).enumerate() {
            let d =
                _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes([blk[0], blk[1]])))));
            let mut q = [_mm256_setzero_si256(); 4];
            if q8 {
                for (i, q) in q.iter_mut().enumerate() {
                    *q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.as_ptr().add(2 + 8 * i) as *const __m128i));
                }
            } else {
                let x = _mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i);
                let m = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(x, m);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), m);
                let eight = _mm256_set1_epi32(8);
                // Values 0..16 are the low nibbles, 16..32 the high ones.
                for (i, half) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)].into_iter().enumerate() {
                    q[i] = _mm256_sub_epi32(_mm256_cvtepu8_epi32(half), eight);
                }
            }
            for (i, q) in q.into_iter().enumerate() {
                let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                if let Some(s) = scales {
                    let s = _mm_loadu_si128(s.as_ptr().add(32 * b + 8 * i) as *const __m128i);
                    v = _mm256_mul_ps(v, _mm256_cvtph_ps(s));
                }
                if let Some(a) = anchor {
                    let a = _mm_loadu_si128(a.as_ptr().add(32 * b + 8 * i) as *const __m128i);
                    v = _mm256_add_ps(v, _mm256_cvtph_ps(a));
                }
                _mm256_storeu_ps(y.as_mut_ptr().add(8 * i), v);
            }
        }
    }

    /// [`super::decode_tile`] of Q4_0 keys with channel scales: per 4-byte group of a block
    /// (channels 4w..4w+4 in the low nibbles, 16 more in the high ones), the 16 positions'
    /// dwords in one register, each nibble shifted out.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn decode_tile_q4_avx512(tile: &[u8], hd: usize, anchor: &[u16], scales: &[u16], kt: &mut [f32]) {
        let (tp, kp) = (tile.as_ptr(), kt.as_mut_ptr());
        let (mask, eight) = (_mm512_set1_epi32(0x0F), _mm512_set1_epi32(8));
        for b in 0..hd / 32 {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(CHUNK * hd / 2 + 32 * b) as *const __m256i));
            let (mut af, mut sf) = ([0f32; 32], [0f32; 32]);
            for h in 0..2 {
                let a = _mm256_loadu_si256(anchor.as_ptr().add(32 * b + 16 * h) as *const __m256i);
                _mm512_storeu_ps(af.as_mut_ptr().add(16 * h), _mm512_cvtph_ps(a));
                let s = _mm256_loadu_si256(scales.as_ptr().add(32 * b + 16 * h) as *const __m256i);
                _mm512_storeu_ps(sf.as_mut_ptr().add(16 * h), _mm512_cvtph_ps(s));
            }
            for w in 0..4 {
                let x = _mm512_loadu_si512(tp.add(64 * (4 * b + w)) as *const _);
                for k in 0..8 {
                    // Nibble k of each dword: byte k / 2, low (value 4w + k/2) or high (+16).
                    let q = _mm512_and_si512(_mm512_srlv_epi32(x, _mm512_set1_epi32(4 * k as i32)), mask);
                    let c = 4 * w + k / 2 + 16 * (k % 2);
                    let v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, eight)), d);
                    let v = _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(sf[c])), _mm512_set1_ps(af[c]));
                    _mm512_storeu_ps(kp.add((32 * b + c) * CHUNK), v);
                }
            }
        }
    }

    /// [`decode_tile_q4_avx512`] with 8 lanes (positions 0..8, then 8..16).
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn decode_tile_q4_avx2(tile: &[u8], hd: usize, anchor: &[u16], scales: &[u16], kt: &mut [f32]) {
        let (tp, kp) = (tile.as_ptr(), kt.as_mut_ptr());
        let (mask, eight) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(8));
        for b in 0..hd / 32 {
            let at = tp.add(CHUNK * hd / 2 + 32 * b);
            let d = [
                _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(at.add(16) as *const __m128i)),
            ];
            let (mut af, mut sf) = ([0f32; 32], [0f32; 32]);
            for h in 0..4 {
                let a = _mm_loadu_si128(anchor.as_ptr().add(32 * b + 8 * h) as *const __m128i);
                _mm256_storeu_ps(af.as_mut_ptr().add(8 * h), _mm256_cvtph_ps(a));
                let s = _mm_loadu_si128(scales.as_ptr().add(32 * b + 8 * h) as *const __m128i);
                _mm256_storeu_ps(sf.as_mut_ptr().add(8 * h), _mm256_cvtph_ps(s));
            }
            for w in 0..4 {
                for (h, d) in d.iter().enumerate() {
                    let x = _mm256_loadu_si256(tp.add(64 * (4 * b + w) + 32 * h) as *const __m256i);
                    for k in 0..8 {
                        let q = _mm256_and_si256(_mm256_srlv_epi32(x, _mm256_set1_epi32(4 * k as i32)), mask);
                        let c = 4 * w + k / 2 + 16 * (k % 2);
                        let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight)), *d);
                        let v = _mm256_add_ps(_mm256_mul_ps(v, _mm256_set1_ps(sf[c])), _mm256_set1_ps(af[c]));
                        _mm256_storeu_ps(kp.add((32 * b + c) * CHUNK + 8 * h), v);
                    }
                }
            }
        }
    }

    /// [`super::decode_tile`]: per group of 4 channels, the 16 positions' dwords in one
    /// register, each channel's byte shifted out and sign-extended.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn decode_tile_avx512(tile: &[u8], hd: usize, anchor: &[u16], kt: &mut [f32]) {
        let (tp, kp) = (tile.as_ptr(), kt.as_mut_ptr());
        for b in 0..hd / 32 {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(CHUNK * hd + 32 * b) as *const __m256i));
            // The block's 32 anchor values through F16C (`half`'s portable conversion is slow).
            let mut af = [0f32; 32];
            for h in 0..2 {
                let a = _mm256_loadu_si256(anchor.as_ptr().add(32 * b + 16 * h) as *const __m256i);
                _mm512_storeu_ps(af.as_mut_ptr().add(16 * h), _mm512_cvtph_ps(a));
            }
            for w in 8 * b..8 * b + 8 {
                let x = _mm512_loadu_si512(tp.add(64 * w) as *const _);
                let q = [
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(x)),
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<16>(x)),
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<8>(x)),
                    _mm512_srai_epi32::<24>(x),
                ];
                for (r, q) in q.into_iter().enumerate() {
                    let c = 4 * w + r;
                    let a = _mm512_set1_ps(af[c - 32 * b]);
                    let v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d), a);
                    _mm512_storeu_ps(kp.add(c * CHUNK), v);
                }
            }
        }
    }

    /// [`decode_tile_avx512`] with 8 lanes (positions 0..8, then 8..16).
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn decode_tile_avx2(tile: &[u8], hd: usize, anchor: &[u16], kt: &mut [f32]) {
        let (tp, kp) = (tile.as_ptr(), kt.as_mut_ptr());
        for b in 0..hd / 32 {
            let at = tp.add(CHUNK * hd + 32 * b);
            let d = [
                _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(at.add(16) as *const __m128i)),
            ];
            let mut af = [0f32; 32];
            for h in 0..4 {
                let a = _mm_loadu_si128(anchor.as_ptr().add(32 * b + 8 * h) as *const __m128i);
                _mm256_storeu_ps(af.as_mut_ptr().add(8 * h), _mm256_cvtph_ps(a));
            }
            for w in 8 * b..8 * b + 8 {
                for (h, d) in d.iter().enumerate() {
                    let x = _mm256_loadu_si256(tp.add(64 * w + 32 * h) as *const __m256i);
                    let q = [
                        _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(x)),
                        _mm256_srai_epi32::<24>(_mm256_slli_epi32::<16>(x)),
                        _mm256_srai_epi32::<24>(_mm256_slli_epi32::<8>(x)),
                        _mm256_srai_epi32::<24>(x),
                    ];
                    for (r, q) in q.into_iter().enumerate() {
                        let c = 4 * w + r;
                        let a = _mm256_set1_ps(af[c - 32 * b]);
                        let v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), *d), a);
                        _mm256_storeu_ps(kp.add(c * CHUNK + 8 * h), v);
                    }
                }
            }
        }
    }

    /// `kt[d * CHUNK + j] = rows[j * hd + d]` for the CHUNK (16) rows of `hd` values (a
    /// multiple of 16), as 16 x 16 tiles transposed in registers.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose_chunk_avx512(rows: &[f32], hd: usize, kt: &mut [f32]) {
        assert!(rows.len() >= CHUNK * hd && kt.len() >= hd * CHUNK && hd.is_multiple_of(16));
        for d0 in (0..hd).step_by(16) {
            let mut r = [_mm512_setzero_si512(); 16];
            for (j, r) in r.iter_mut().enumerate() {
                *r = _mm512_castps_si512(_mm512_loadu_ps(rows.as_ptr().add(j * hd + d0)));
            }
            let cols = crate::dot::kquants::tiled::transpose_16x16(r);
            for (c, x) in cols.into_iter().enumerate() {
                _mm512_storeu_ps(kt.as_mut_ptr().add((d0 + c) * CHUNK), _mm512_castsi512_ps(x));
            }
        }
    }

    /// [`transpose_chunk_avx512`] as 8 x 8 tiles (`hd` a multiple of 8).
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose_chunk_avx2(rows: &[f32], hd: usize, kt: &mut [f32]) {
        assert!(rows.len() >= CHUNK * hd && kt.len() >= hd * CHUNK && hd.is_multiple_of(8));
        for d0 in (0..hd).step_by(8) {
            for j0 in (0..CHUNK).step_by(8) {
                let mut r = [_mm256_setzero_si256(); 8];
                for (j, r) in r.iter_mut().enumerate() {
                    *r = _mm256_castps_si256(_mm256_loadu_ps(rows.as_ptr().add((j0 + j) * hd + d0)));
                }
                // Per 128-bit lane L, u[4q + m] = rows 4q..4q+4 at column 4L + m.
                let mut u = [_mm256_setzero_si256(); 8];
                for q in 0..2 {
                    let (r0, r1, r2, r3) = (r[4 * q], r[4 * q + 1], r[4 * q + 2], r[4 * q + 3]);
                    let t0 = _mm256_unpacklo_epi32(r0, r1);
                    let t1 = _mm256_unpackhi_epi32(r0, r1);
                    let t2 = _mm256_unpacklo_epi32(r2, r3);
                    let t3 = _mm256_unpackhi_epi32(r2, r3);
                    u[4 * q] = _mm256_unpacklo_epi64(t0, t2);
                    u[4 * q + 1] = _mm256_unpackhi_epi64(t0, t2);
                    u[4 * q + 2] = _mm256_unpacklo_epi64(t1, t3);
                    u[4 * q + 3] = _mm256_unpackhi_epi64(t1, t3);
                }
                let out = kt.as_mut_ptr().add(d0 * CHUNK + j0);
                for m in 0..4 {
                    let lo = _mm256_permute2x128_si256::<0x20>(u[m], u[4 + m]);
                    let hi = _mm256_permute2x128_si256::<0x31>(u[m], u[4 + m]);
                    _mm256_storeu_ps(out.add(m * CHUNK), _mm256_castsi256_ps(lo));
                    _mm256_storeu_ps(out.add((4 + m) * CHUNK), _mm256_castsi256_ps(hi));
                }
            }
        }
    }

    /// As [`widen_f16_avx512`] with F16C's 8 lanes.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16_f16c(src: &[f16], stride: usize, rows: usize, width: usize, dst: &mut [f32]) {
        let (sp, dp) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
        for r in 0..rows {
            let (s, d) = (sp.add(r * stride), dp.add(r * width));
            let mut c = 0;
            while c + 8 <= width {
                _mm256_storeu_ps(d.add(c), _mm256_cvtph_ps(_mm_loadu_si128(s.add(c) as *const __m128i)));
                c += 8;
            }
            while c < width {
                *d.add(c) = f16::from_bits(*s.add(c)).to_f32();
                c += 1;
            }
        }
    }

    /// [`super::scores`] with 16 lanes: rows four at a time share each key vector.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores_avx512<K: Lanes16>(
        q: &[f32],
        hd: usize,
        active: &[(usize, usize)],
        kt: &[K],
        ks: usize,
        scale: f32,
        s: &mut [f32],
        ahead: super::Ahead,
    ) {
        // The first block of rows asks for the chunk `ahead`, the others nothing.
        let mut ahead = ahead;
        let mut blocks = active.chunks_exact(4);
        for b in &mut blocks {
            scores_rows_avx512::<4, K>(q, hd, b, kt, ks, scale, s, ahead);
            ahead = super::Ahead::NONE;
        }
        match blocks.remainder() {
            r @ [_] => scores_rows_avx512::<1, K>(q, hd, r, kt, ks, scale, s, ahead),
            r @ [_, _] => scores_rows_avx512::<2, K>(q, hd, r, kt, ks, scale, s, ahead),
            r @ [_, _, _] => scores_rows_avx512::<3, K>(q, hd, r, kt, ks, scale, s, ahead),
            _ => {}
        }
    }

    /// `R` rows' scores. Each row's arithmetic is fixed: accumulator `d mod 4` takes
    /// `q[d] * kt[d]` for `d` in order, then `(a0 + a1) + (a2 + a3)`, times `scale`; which rows
    /// share the block does not change it.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores_rows_avx512<const R: usize, K: Lanes16>(
        q: &[f32],
        hd: usize,
        rows: &[(usize, usize)],
        kt: &[K],
        ks: usize,
        scale: f32,
        s: &mut [f32],
        ahead: super::Ahead,
    ) {
        let qp: [*const f32; R] = std::array::from_fn(|r| q[rows[r].0 * hd..(rows[r].0 + 1) * hd].as_ptr());
        let kp = kt.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut d = 0;
        while d + 4 <= hd {
            // Four dimensions of 16 f16 keys: two lines.
            ahead.line(d / 2);
            ahead.line(d / 2 + 1);
            let k: [__m512; 4] = std::array::from_fn(|a| K::load16(kp.add((d + a) * ks)));
            for (ar, qr) in acc.iter_mut().zip(&qp) {
                for (a, (aa, ka)) in ar.iter_mut().zip(&k).enumerate() {
                    *aa = _mm512_fmadd_ps(_mm512_set1_ps(*qr.add(d + a)), *ka, *aa);
                }
            }
            d += 4;
        }
        while d < hd {
            let k = K::load16(kp.add(d * ks));
            for r in 0..R {
                acc[r][d % 4] = _mm512_fmadd_ps(_mm512_set1_ps(*qp[r].add(d)), k, acc[r][d % 4]);
            }
            d += 1;
        }
        for r in 0..R {
            let (i, seen) = rows[r];
            let [a0, a1, a2, a3] = acc[r];
            let sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
            let keep = ((1u32 << seen) - 1) as __mmask16;
            let v = _mm512_mask_blend_ps(
                keep,
                _mm512_set1_ps(f32::NEG_INFINITY),
                _mm512_mul_ps(sum, _mm512_set1_ps(scale)),
            );
            _mm512_storeu_ps(s[i * CHUNK..(i + 1) * CHUNK].as_mut_ptr(), v);
        }
    }

    /// The online-softmax step and the value accumulation of each active row `(i, seen)`:
    /// scores `s[i * CHUNK..]`, running maximum and sum `m[i]`, `l[i]`, output row `o[i * hd..]`.
    ///
    /// Rows go in groups of 16. A full enough group takes its softmax step at once, one lane per
    /// row ([`softmax_rows_avx512`]); a small one row by row ([`softmax_row_avx512`]). Both
    /// compute each row with the same operations, so a row's bits do not depend on its group.
    /// Then up to four rows with the same `seen` share each value vector they read
    /// ([`accumulate_rows_avx512`]).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn update_avx512<E: Lanes16>(
        active: &[(usize, usize)],
        s: &[f32],
        v: &[E],
        vs: usize,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
        hd: usize,
    ) {
        super::check_active(active, s.len(), (v.len(), vs), o.len(), m.len().min(l.len()), hd);
        if let [(i, seen)] = *active {
            // One row (a decode without grouped heads): straight through.
            update_row_avx512(
                &s[i * CHUNK..(i + 1) * CHUNK],
                seen,
                v,
                vs,
                &mut m[i],
                &mut l[i],
                &mut o[i * hd..(i + 1) * hd],
            );
            return;
        }
        for group in active.chunks(16) {
            // `w[j * js + k * ks]`: weight of key j for the group's row k. Left uninitialised
            // (zeroing it cost a one-row decode 15-20% of its attention): the accumulation reads
            // only what the softmax step wrote, keys `j < seen` of live rows.
            let mut w = std::mem::MaybeUninit::<[f32; 16 * CHUNK]>::uninit();
            let w = w.as_mut_ptr() as *mut f32;
            let mut corr = [0f32; 16];
            let (live, js, ks) = if group.len() >= 8 {
                (softmax_rows_avx512(group, s, m, l, w, &mut corr), 16, 1)
            } else {
                let mut live = 0u32;
                for (k, &(i, _)) in group.iter().enumerate() {
                    if let Some((c, p)) = softmax_row_avx512(&s[i * CHUNK..(i + 1) * CHUNK], &mut m[i], &mut l[i]) {
                        // `k < 16`: inside `w`.
                        std::ptr::copy_nonoverlapping(p.as_ptr(), w.add(k * CHUNK), CHUNK);
                        corr[k] = c;
                        live |= 1 << k;
                    }
                }
                (live, 1, CHUNK)
            };
            // Runs of up to four live rows with the same `seen`.
            for (k, e) in super::runs(group, live, 4) {
                let seen = group[k].1;
                let rows = |r: usize| {
                    let kk = k + r.min(e - k - 1);
                    (o.as_mut_ptr().add(group[kk].0 * hd), w.add(kk * ks) as *const f32, _mm512_set1_ps(corr[kk]))
                };
                match e - k {
                    4 => accumulate_rows_avx512::<4, E>(std::array::from_fn(rows), v.as_ptr(), vs, js, seen, hd),
                    3 => accumulate_rows_avx512::<3, E>(std::array::from_fn(rows), v.as_ptr(), vs, js, seen, hd),
                    2 => accumulate_rows_avx512::<2, E>(std::array::from_fn(rows), v.as_ptr(), vs, js, seen, hd),
                    _ => accumulate_rows_avx512::<1, E>(std::array::from_fn(rows), v.as_ptr(), vs, js, seen, hd),
                }
            }
        }
    }

    /// 16 vectors transposed: lane `k` of output `j` is lane `j` of input `k`. The same
    /// permutation as the key transpose (`kquants::tiled::transpose_16x16`) in the float
    /// domain: going through that one with casts made 512-token prefill attention 15-40%
    /// slower (criterion `attention_f32/prefill_512`, alternated).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        // Pairs of rows interleaved, then 4x4 blocks within each 128-bit lane: `b[4k + c]`'s
        // lane L holds column 4L + c of rows 4k..4k + 4 ...
        let mut b = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let x0 = _mm512_unpacklo_ps(r[4 * k], r[4 * k + 1]);
            let x1 = _mm512_unpackhi_ps(r[4 * k], r[4 * k + 1]);
            let y0 = _mm512_unpacklo_ps(r[4 * k + 2], r[4 * k + 3]);
            let y1 = _mm512_unpackhi_ps(r[4 * k + 2], r[4 * k + 3]);
            b[4 * k] = _mm512_shuffle_ps::<0x44>(x0, y0);
            b[4 * k + 1] = _mm512_shuffle_ps::<0xEE>(x0, y0);
            b[4 * k + 2] = _mm512_shuffle_ps::<0x44>(x1, y1);
            b[4 * k + 3] = _mm512_shuffle_ps::<0xEE>(x1, y1);
        }
        // ... then the 128-bit lanes of b[c], b[4 + c], b[8 + c], b[12 + c] transposed.
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let t0 = _mm512_shuffle_f32x4::<0x44>(b[c], b[4 + c]);
            let t1 = _mm512_shuffle_f32x4::<0xEE>(b[c], b[4 + c]);
            let t2 = _mm512_shuffle_f32x4::<0x44>(b[8 + c], b[12 + c]);
            let t3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + c], b[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(t0, t2);
            out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(t0, t2);
            out[8 + c] = _mm512_shuffle_f32x4::<0x88>(t1, t3);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(t1, t3);
        }
        out
    }

    /// [`softmax_row_avx512`] for up to 16 rows `(i, _)` at once, lane `k` = `rows[k]`: each
    /// lane takes the same operations as that function does for its row (the maximum is exact
    /// in any order, `exp` works lane by lane, the sum follows the same tree). Writes key `j`'s
    /// weight for row `k` to `w[16 * j + k]` (`w` writable for `16 * CHUNK` values) and its
    /// correction to `corr[k]`; returns the rows
    /// that have seen something as a bit mask (the others are left as they were).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn softmax_rows_avx512(
        rows: &[(usize, usize)],
        s: &[f32],
        m: &mut [f32],
        l: &mut [f32],
        w: *mut f32,
        corr: &mut [f32; 16],
    ) -> u32 {
        assert!(rows.len() <= 16 && rows.iter().all(|&(i, _)| (i + 1) * CHUNK <= s.len() && i < m.len().min(l.len())));
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let by_row: [__m512; 16] = std::array::from_fn(|k| match rows.get(k) {
            Some(&(i, _)) => _mm512_loadu_ps(s.as_ptr().add(i * CHUNK)),
            None => ninf,
        });
        let (mut m0, mut l0) = ([f32::NEG_INFINITY; 16], [0f32; 16]);
        for (k, &(i, _)) in rows.iter().enumerate() {
            (m0[k], l0[k]) = (m[i], l[i]);
        }
        let (mold, lold) = (_mm512_loadu_ps(m0.as_ptr()), _mm512_loadu_ps(l0.as_ptr()));
        let by_key = transpose16(&by_row);
        let mx = by_key.iter().fold(mold, |a, &b| _mm512_max_ps(a, b));
        let live = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(mx, ninf) as u32 & ((1u32 << rows.len()) - 1);
        // exp(m_old - m) where the maximum moved, exactly 1 where it held (as the row version).
        let same = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(mx, mold);
        let c = _mm512_mask_blend_ps(same, exp512(_mm512_sub_ps(mold, mx)), _mm512_set1_ps(1.0));
        let p: [__m512; CHUNK] = std::array::from_fn(|j| exp512(_mm512_sub_ps(by_key[j], mx)));
        // The sum tree of `sum16`: (j, j + 8), then (j, j + 4), (j, j + 2), (0, 1).
        let q: [__m512; 8] = std::array::from_fn(|j| _mm512_add_ps(p[j], p[j + 8]));
        let q: [__m512; 4] = std::array::from_fn(|j| _mm512_add_ps(q[j], q[j + 4]));
        let q: [__m512; 2] = std::array::from_fn(|j| _mm512_add_ps(q[j], q[j + 2]));
        let total = _mm512_add_ps(q[0], q[1]);
        let lnew = _mm512_add_ps(_mm512_mul_ps(lold, c), total);
        for (j, pj) in p.iter().enumerate() {
            _mm512_storeu_ps(w.add(16 * j), *pj);
        }
        _mm512_storeu_ps(corr.as_mut_ptr(), c);
        let (mut m1, mut l1) = ([0f32; 16], [0f32; 16]);
        _mm512_storeu_ps(m1.as_mut_ptr(), mx);
        _mm512_storeu_ps(l1.as_mut_ptr(), lnew);
        for (k, &(i, _)) in rows.iter().enumerate() {
            if live & (1 << k) != 0 {
                (m[i], l[i]) = (m1[k], l1[k]);
            }
        }
        live
    }

    /// Lanes `j` and `j + 8`, then `j` and `j + 4`, `j` and `j + 2`, and the last two: the sum
    /// every softmax step of this module takes of its 16 weights.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum16(p: __m512) -> f32 {
        let h = _mm256_add_ps(
            _mm512_castps512_ps256(p),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(p))),
        );
        let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps::<1>(q, q)))
    }

    /// One row's [`super::update_scalar`] with 16 lanes; any `acc.len()` (a masked tail): bitwise
    /// what [`update_avx512`] does for it among others, with less bookkeeping (a one-row decode
    /// took 15-20% longer through the groups).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn update_row_avx512<E: Lanes16>(
        s: &[f32],
        seen: usize,
        v: &[E],
        vs: usize,
        m: &mut f32,
        l: &mut f32,
        acc: &mut [f32],
    ) {
        let hd = acc.len();
        assert!(s.len() >= CHUNK && (1..=CHUNK).contains(&seen) && v.len() >= (seen - 1) * vs + hd);
        let Some((corr, pj)) = softmax_row_avx512(s, m, l) else { return };
        let cv = _mm512_set1_ps(corr);
        let (ap, vp) = (acc.as_mut_ptr(), v.as_ptr());
        // Blocks of up to 8 vectors of `acc` stay in registers while the keys stream past, so
        // the accumulations into them are independent chains.
        let mut d = 0;
        while d + 128 <= hd {
            accumulate_avx512::<8, E>(ap.add(d), vp.add(d), vs, &pj[..seen], cv);
            d += 128;
        }
        for w in [4, 2, 1] {
            if d + 16 * w <= hd {
                match w {
                    4 => accumulate_avx512::<4, E>(ap.add(d), vp.add(d), vs, &pj[..seen], cv),
                    2 => accumulate_avx512::<2, E>(ap.add(d), vp.add(d), vs, &pj[..seen], cv),
                    _ => accumulate_avx512::<1, E>(ap.add(d), vp.add(d), vs, &pj[..seen], cv),
                }
                d += 16 * w;
            }
        }
        if d < hd {
            let mask = ((1u32 << (hd - d)) - 1) as __mmask16;
            let mut a = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, ap.add(d)), cv);
            for (j, &p) in pj.iter().enumerate().take(seen) {
                a = _mm512_fmadd_ps(_mm512_set1_ps(p), E::load16_masked(mask, vp.add(j * vs + d)), a);
            }
            _mm512_mask_storeu_ps(ap.add(d), mask, a);
        }
    }

    /// `acc[..16 * NV] = acc * corr + sum_j p[j] * v[j * vs..][..16 * NV]`, `j` in order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn accumulate_avx512<const NV: usize, E: Lanes16>(
        ap: *mut f32,
        vp: *const E,
        vs: usize,
        p: &[f32],
        corr: __m512,
    ) {
        let mut a: [__m512; NV] = std::array::from_fn(|i| _mm512_mul_ps(_mm512_loadu_ps(ap.add(16 * i)), corr));
        for (j, &pj) in p.iter().enumerate() {
            let (pv, row) = (_mm512_set1_ps(pj), vp.add(j * vs));
            for (i, ai) in a.iter_mut().enumerate() {
                *ai = _mm512_fmadd_ps(pv, E::load16(row.add(16 * i)), *ai);
            }
        }
        for (i, ai) in a.iter().enumerate() {
            _mm512_storeu_ps(ap.add(16 * i), *ai);
        }
    }

    /// The online-softmax step of one row's chunk of scores `s` (`-inf` past what it sees): the
    /// running maximum `m` and denominator `l` updated, and the factor the accumulated values
    /// take (`exp(m_old - m)`) with the chunk's weights `exp(s - m)`; `None` (nothing changed)
    /// while the row has seen nothing.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn softmax_row_avx512(s: &[f32], m: &mut f32, l: &mut f32) -> Option<(f32, [f32; CHUNK])> {
        assert!(s.len() >= CHUNK);
        let sv = _mm512_loadu_ps(s.as_ptr());
        let mx = _mm512_reduce_max_ps(sv).max(*m);
        if mx == f32::NEG_INFINITY {
            return None;
        }
        // exp(0) = 1 exactly when the maximum holds; exp(-inf) = 0 when nothing was seen yet.
        let corr = if mx == *m { 1.0 } else { _mm512_cvtss_f32(exp512(_mm512_set1_ps(*m - mx))) };
        // Lanes past `seen` hold exp(-inf) = 0, so the sum is over the seen keys only.
        let p = exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mx)));
        let mut pj = [0f32; CHUNK];
        _mm512_storeu_ps(pj.as_mut_ptr(), p);
        *l = *l * corr + sum16(p);
        *m = mx;
        Some((corr, pj))
    }

    /// For each of `R` rows `(out, weights, corr)`: `out[..hd] = out * corr + Σ_{j < seen}
    /// weights[j * js] · v[j * vs..][..hd]`, `j` in order, one fused multiply-add per step (so a
    /// row's bits do not depend on the rows beside it). The rows share each value vector: 4 x 4
    /// accumulators per 64 columns, then narrower blocks and a masked tail.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn accumulate_rows_avx512<const R: usize, E: Lanes16>(
        rows: [(*mut f32, *const f32, __m512); R],
        v: *const E,
        vs: usize,
        js: usize,
        seen: usize,
        hd: usize,
    ) {
        // `MASKED`: the lanes of `mask` only (the tail of a row); otherwise plain loads and
        // stores, which the multiply-adds take as memory operands (masked ones cost a one-row
        // decode 20%).
        #[inline(always)]
        unsafe fn block<const R: usize, const NV: usize, const MASKED: bool, E: Lanes16>(
            rows: &[(*mut f32, *const f32, __m512); R],
            v: *const E,
            vs: usize,
            js: usize,
            seen: usize,
            d: usize,
            mask: __mmask16,
        ) {
            let load = |p: *const f32| if MASKED { _mm512_maskz_loadu_ps(mask, p) } else { _mm512_loadu_ps(p) };
            let mut a: [[__m512; NV]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|i| _mm512_mul_ps(load(rows[r].0.add(d + 16 * i)), rows[r].2))
            });
            for j in 0..seen {
                let mut vv = [_mm512_setzero_ps(); NV];
                for (i, x) in vv.iter_mut().enumerate() {
                    let p = v.add(j * vs + d + 16 * i);
                    *x = if MASKED { E::load16_masked(mask, p) } else { E::load16(p) };
                }
                for r in 0..R {
                    let pv = _mm512_set1_ps(*rows[r].1.add(j * js));
                    for i in 0..NV {
                        a[r][i] = _mm512_fmadd_ps(pv, vv[i], a[r][i]);
                    }
                }
            }
            for (row, ar) in rows.iter().zip(&a) {
                for (i, ai) in ar.iter().enumerate() {
                    if MASKED {
                        _mm512_mask_storeu_ps(row.0.add(d + 16 * i), mask, *ai);
                    } else {
                        _mm512_storeu_ps(row.0.add(d + 16 * i), *ai);
                    }
                }
            }
        }
        let mut d = 0;
        if R == 1 {
            // A row alone: eight vectors, so eight independent chains keep both FMA ports busy.
            while d + 128 <= hd {
                block::<R, 8, false, E>(&rows, v, vs, js, seen, d, !0);
                d += 128;
            }
        }
        while d + 64 <= hd {
            block::<R, 4, false, E>(&rows, v, vs, js, seen, d, !0);
            d += 64;
        }
        if d + 32 <= hd {
            block::<R, 2, false, E>(&rows, v, vs, js, seen, d, !0);
            d += 32;
        }
        if d + 16 <= hd {
            block::<R, 1, false, E>(&rows, v, vs, js, seen, d, !0);
            d += 16;
        }
        if d < hd {
            block::<R, 1, true, E>(&rows, v, vs, js, seen, d, ((1u32 << (hd - d)) - 1) as __mmask16);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// [`super::scores`] with two 8-lane halves per row: rows two at a time, two accumulators
    /// (`d mod 2`) per half.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores_avx2<K: Lanes8>(
        q: &[f32],
        hd: usize,
        active: &[(usize, usize)],
        kt: &[K],
        ks: usize,
        scale: f32,
        s: &mut [f32],
        ahead: super::Ahead,
    ) {
        // The first block of rows asks for the chunk `ahead`, the others nothing.
        let mut ahead = ahead;
        let mut blocks = active.chunks_exact(2);
        for b in &mut blocks {
            scores_rows_avx2::<2, K>(q, hd, b, kt, ks, scale, s, ahead);
            ahead = super::Ahead::NONE;
        }
        if let r @ [_] = blocks.remainder() {
            scores_rows_avx2::<1, K>(q, hd, r, kt, ks, scale, s, ahead);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores_rows_avx2<const R: usize, K: Lanes8>(
        q: &[f32],
        hd: usize,
        rows: &[(usize, usize)],
        kt: &[K],
        ks: usize,
        scale: f32,
        s: &mut [f32],
        ahead: super::Ahead,
    ) {
        let qp: [*const f32; R] = std::array::from_fn(|r| q[rows[r].0 * hd..(rows[r].0 + 1) * hd].as_ptr());
        let kp = kt.as_ptr();
        // acc[r][a][h]: row r, accumulator d mod 2, lanes 8h..8h+8.
        let mut acc = [[[_mm256_setzero_ps(); 2]; 2]; R];
        // Two dimensions per step, so `d mod 2` is a constant and the accumulators stay in
        // registers (indexed at run time they lived on the stack, one store-to-load round trip
        // per multiply-add).
        let step = |acc: &mut [[[__m256; 2]; 2]; R], d: usize, e: usize| {
            let k0 = K::load8(kp.add(d * ks));
            let k1 = K::load8(kp.add(d * ks + 8));
            for r in 0..R {
                let qv = _mm256_set1_ps(*qp[r].add(d));
                let a = &mut acc[r][e];
                a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
                a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
            }
        };
        let mut d = 0;
        while d + 2 <= hd {
            // Two dimensions of 16 f16 keys: a line.
            ahead.line(d / 2);
            step(&mut acc, d, 0);
            step(&mut acc, d + 1, 1);
            d += 2;
        }
        if d < hd {
            step(&mut acc, d, 0);
        }
        let sc = _mm256_set1_ps(scale);
        for r in 0..R {
            let (i, seen) = rows[r];
            let out = &mut s[i * CHUNK..(i + 1) * CHUNK];
            for (h, (a0, a1)) in acc[r][0].iter().zip(&acc[r][1]).enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), _mm256_mul_ps(_mm256_add_ps(*a0, *a1), sc));
            }
            for x in &mut out[seen..] {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// As [`update_avx512`], 8 lanes wide: groups of 8 rows ([`softmax_rows_avx2`] for a full
    /// enough one), then two rows at a time share each value vector; `hd` is a multiple of 8.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn update_avx2<E: Lanes8>(
        active: &[(usize, usize)],
        s: &[f32],
        v: &[E],
        vs: usize,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
        hd: usize,
    ) {
        super::check_active(active, s.len(), (v.len(), vs), o.len(), m.len().min(l.len()), hd);
        assert!(hd.is_multiple_of(8));
        if let [(i, seen)] = *active {
            // One row (a decode without grouped heads): straight through.
            update_row_avx2(
                &s[i * CHUNK..(i + 1) * CHUNK],
                seen,
                v,
                vs,
                &mut m[i],
                &mut l[i],
                &mut o[i * hd..(i + 1) * hd],
            );
            return;
        }
        for group in active.chunks(8) {
            // `w[j * js + k * ks]`: weight of key j for the group's row k. Left uninitialised
            // (zeroing it cost a one-row decode 15-20% of its attention): the accumulation reads
            // only what the softmax step wrote, keys `j < seen` of live rows.
            let mut w = std::mem::MaybeUninit::<[f32; 8 * CHUNK]>::uninit();
            let w = w.as_mut_ptr() as *mut f32;
            let mut corr = [0f32; 8];
            let (live, js, ks) = if group.len() >= 4 {
                (softmax_rows_avx2(group, s, m, l, w, &mut corr), 8, 1)
            } else {
                let mut live = 0u32;
                for (k, &(i, _)) in group.iter().enumerate() {
                    if let Some((c, p)) = softmax_row_avx2(&s[i * CHUNK..(i + 1) * CHUNK], &mut m[i], &mut l[i]) {
                        // `k < 8`: inside `w`.
                        std::ptr::copy_nonoverlapping(p.as_ptr(), w.add(k * CHUNK), CHUNK);
                        corr[k] = c;
                        live |= 1 << k;
                    }
                }
                (live, 1, CHUNK)
            };
            for (k, e) in super::runs(group, live, 2) {
                let seen = group[k].1;
                let rows = |r: usize| {
                    let kk = k + r.min(e - k - 1);
                    (o.as_mut_ptr().add(group[kk].0 * hd), w.add(kk * ks) as *const f32, _mm256_set1_ps(corr[kk]))
                };
                if e - k == 2 {
                    accumulate_rows_avx2::<2, E>(std::array::from_fn(rows), v.as_ptr(), vs, js, seen, hd);
                } else {
                    accumulate_rows_avx2::<1, E>(std::array::from_fn(rows), v.as_ptr(), vs, js, seen, hd);
                }
            }
        }
    }

    /// As [`accumulate_rows_avx512`] with 8-lane vectors: 2 x 4 accumulators per 32 columns
    /// (eight independent chains keep both FMA ports busy), then narrower blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn accumulate_rows_avx2<const R: usize, E: Lanes8>(
        rows: [(*mut f32, *const f32, __m256); R],
        v: *const E,
        vs: usize,
        js: usize,
        seen: usize,
        hd: usize,
    ) {
        #[inline(always)]
        unsafe fn block<const R: usize, const NV: usize, E: Lanes8>(
            rows: &[(*mut f32, *const f32, __m256); R],
            v: *const E,
            vs: usize,
            js: usize,
            seen: usize,
            d: usize,
        ) {
            let mut a: [[__m256; NV]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|i| _mm256_mul_ps(_mm256_loadu_ps(rows[r].0.add(d + 8 * i)), rows[r].2))
            });
            for j in 0..seen {
                let vv: [__m256; NV] = std::array::from_fn(|i| E::load8(v.add(j * vs + d + 8 * i)));
                for r in 0..R {
                    let pv = _mm256_set1_ps(*rows[r].1.add(j * js));
                    for i in 0..NV {
                        a[r][i] = _mm256_fmadd_ps(pv, vv[i], a[r][i]);
                    }
                }
            }
            for (row, ar) in rows.iter().zip(&a) {
                for (i, ai) in ar.iter().enumerate() {
                    _mm256_storeu_ps(row.0.add(d + 8 * i), *ai);
                }
            }
        }
        let mut d = 0;
        if R == 1 {
            while d + 64 <= hd {
                block::<R, 8, E>(&rows, v, vs, js, seen, d);
                d += 64;
            }
        }
        while d + 32 <= hd {
            block::<R, 4, E>(&rows, v, vs, js, seen, d);
            d += 32;
        }
        if d + 16 <= hd {
            block::<R, 2, E>(&rows, v, vs, js, seen, d);
            d += 16;
        }
        if d + 8 <= hd {
            block::<R, 1, E>(&rows, v, vs, js, seen, d);
        }
    }

    /// Two groups of 8 vectors transposed: lane `k` of output `j` is lane `j % 8` of input `k`'s
    /// half `j / 8`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn transpose8x16(r: &[[__m256; 2]; 8]) -> [__m256; 16] {
        let mut out = [_mm256_setzero_ps(); 16];
        for h in 0..2 {
            // `b[4k + c]`'s 128-bit lane L holds column 4L + c of rows 4k..4k + 4.
            let mut b = [_mm256_setzero_ps(); 8];
            for k in 0..2 {
                let x0 = _mm256_unpacklo_ps(r[4 * k][h], r[4 * k + 1][h]);
                let x1 = _mm256_unpackhi_ps(r[4 * k][h], r[4 * k + 1][h]);
                let y0 = _mm256_unpacklo_ps(r[4 * k + 2][h], r[4 * k + 3][h]);
                let y1 = _mm256_unpackhi_ps(r[4 * k + 2][h], r[4 * k + 3][h]);
                b[4 * k] = _mm256_shuffle_ps::<0x44>(x0, y0);
                b[4 * k + 1] = _mm256_shuffle_ps::<0xEE>(x0, y0);
                b[4 * k + 2] = _mm256_shuffle_ps::<0x44>(x1, y1);
                b[4 * k + 3] = _mm256_shuffle_ps::<0xEE>(x1, y1);
            }
            for c in 0..4 {
                out[8 * h + c] = _mm256_permute2f128_ps::<0x20>(b[c], b[4 + c]);
                out[8 * h + 4 + c] = _mm256_permute2f128_ps::<0x31>(b[c], b[4 + c]);
            }
        }
        out
    }

    /// [`softmax_row_avx2`] for up to 8 rows at once, lane `k` = `rows[k]`, as
    /// [`softmax_rows_avx512`] (weights to `w[8 * j + k]`, `w` writable for `8 * CHUNK` values).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax_rows_avx2(
        rows: &[(usize, usize)],
        s: &[f32],
        m: &mut [f32],
        l: &mut [f32],
        w: *mut f32,
        corr: &mut [f32; 8],
    ) -> u32 {
        assert!(rows.len() <= 8 && rows.iter().all(|&(i, _)| (i + 1) * CHUNK <= s.len() && i < m.len().min(l.len())));
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let by_row: [[__m256; 2]; 8] = std::array::from_fn(|k| match rows.get(k) {
            Some(&(i, _)) => {
                let p = s.as_ptr().add(i * CHUNK);
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
            }
            None => [ninf, ninf],
        });
        let (mut m0, mut l0) = ([f32::NEG_INFINITY; 8], [0f32; 8]);
        for (k, &(i, _)) in rows.iter().enumerate() {
            (m0[k], l0[k]) = (m[i], l[i]);
        }
        let (mold, lold) = (_mm256_loadu_ps(m0.as_ptr()), _mm256_loadu_ps(l0.as_ptr()));
        let by_key = transpose8x16(&by_row);
        let mx = by_key.iter().fold(mold, |a, &b| _mm256_max_ps(a, b));
        let live = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_OQ>(mx, ninf)) as u32 & ((1u32 << rows.len()) - 1);
        let same = _mm256_cmp_ps::<_CMP_EQ_OQ>(mx, mold);
        let c = _mm256_blendv_ps(exp256(_mm256_sub_ps(mold, mx)), _mm256_set1_ps(1.0), same);
        let p: [__m256; CHUNK] = std::array::from_fn(|j| exp256(_mm256_sub_ps(by_key[j], mx)));
        // The tree of `hsum(p0 + p1)`: (j, j + 8), (j, j + 4), (j, j + 2), (0, 1).
        let q: [__m256; 8] = std::array::from_fn(|j| _mm256_add_ps(p[j], p[j + 8]));
        let q: [__m256; 4] = std::array::from_fn(|j| _mm256_add_ps(q[j], q[j + 4]));
        let q: [__m256; 2] = std::array::from_fn(|j| _mm256_add_ps(q[j], q[j + 2]));
        let total = _mm256_add_ps(q[0], q[1]);
        let lnew = _mm256_add_ps(_mm256_mul_ps(lold, c), total);
        for (j, pj) in p.iter().enumerate() {
            _mm256_storeu_ps(w.add(8 * j), *pj);
        }
        _mm256_storeu_ps(corr.as_mut_ptr(), c);
        let (mut m1, mut l1) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(m1.as_mut_ptr(), mx);
        _mm256_storeu_ps(l1.as_mut_ptr(), lnew);
        for (k, &(i, _)) in rows.iter().enumerate() {
            if live & (1 << k) != 0 {
                (m[i], l[i]) = (m1[k], l1[k]);
            }
        }
        live
    }

    /// [`update_row_avx512`] with 8 lanes: `acc.len()` is a multiple of 8.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn update_row_avx2<E: Lanes8>(
        s: &[f32],
        seen: usize,
        v: &[E],
        vs: usize,
        m: &mut f32,
        l: &mut f32,
        acc: &mut [f32],
    ) {
        let hd = acc.len();
        assert!(
            s.len() >= CHUNK && (1..=CHUNK).contains(&seen) && hd.is_multiple_of(8) && v.len() >= (seen - 1) * vs + hd
        );
        let Some((corr, pj)) = softmax_row_avx2(s, m, l) else { return };
        let cv = _mm256_set1_ps(corr);
        let (ap, vp) = (acc.as_mut_ptr(), v.as_ptr());
        // Eight independent accumulation chains keep both FMA ports busy (four left them half
        // idle on the FMA latency: 13% faster prefill attention).
        let mut d = 0;
        while d + 64 <= hd {
            accumulate_avx2::<8, E>(ap.add(d), vp.add(d), vs, &pj[..seen], cv);
            d += 64;
        }
        for w in [4, 2, 1] {
            if d + 8 * w <= hd {
                match w {
                    4 => accumulate_avx2::<4, E>(ap.add(d), vp.add(d), vs, &pj[..seen], cv),
                    2 => accumulate_avx2::<2, E>(ap.add(d), vp.add(d), vs, &pj[..seen], cv),
                    _ => accumulate_avx2::<1, E>(ap.add(d), vp.add(d), vs, &pj[..seen], cv),
                }
                d += 8 * w;
            }
        }
    }

    /// As [`accumulate_avx512`] with 8-lane vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn accumulate_avx2<const NV: usize, E: Lanes8>(
        ap: *mut f32,
        vp: *const E,
        vs: usize,
        p: &[f32],
        corr: __m256,
    ) {
        let mut a: [__m256; NV] = std::array::from_fn(|i| _mm256_mul_ps(_mm256_loadu_ps(ap.add(8 * i)), corr));
        for (j, &pj) in p.iter().enumerate() {
            let (pv, row) = (_mm256_set1_ps(pj), vp.add(j * vs));
            for (i, ai) in a.iter_mut().enumerate() {
                *ai = _mm256_fmadd_ps(pv, E::load8(row.add(8 * i)), *ai);
            }
        }
        for (i, ai) in a.iter().enumerate() {
            _mm256_storeu_ps(ap.add(8 * i), *ai);
        }
    }

    /// [`softmax_row_avx512`] with 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn softmax_row_avx2(s: &[f32], m: &mut f32, l: &mut f32) -> Option<(f32, [f32; CHUNK])> {
        assert!(s.len() >= CHUNK);
        // The maximum is exact in any order; the scores are never NaN for finite q and k.
        let sm = _mm256_max_ps(_mm256_loadu_ps(s.as_ptr()), _mm256_loadu_ps(s.as_ptr().add(8)));
        let sm = _mm_max_ps(_mm256_castps256_ps128(sm), _mm256_extractf128_ps::<1>(sm));
        let sm = _mm_max_ps(sm, _mm_movehl_ps(sm, sm));
        let mx = _mm_cvtss_f32(_mm_max_ss(sm, _mm_movehdup_ps(sm))).max(*m);
        if mx == f32::NEG_INFINITY {
            return None;
        }
        // exp(0) = 1 exactly when the maximum holds; exp(-inf) = 0 when nothing was seen yet.
        let corr = if mx == *m { 1.0 } else { _mm256_cvtss_f32(exp256(_mm256_set1_ps(*m - mx))) };
        let mxv = _mm256_set1_ps(mx);
        let p0 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr()), mxv));
        let p1 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(8)), mxv));
        let mut pj = [0f32; CHUNK];
        _mm256_storeu_ps(pj.as_mut_ptr(), p0);
        _mm256_storeu_ps(pj.as_mut_ptr().add(8), p1);
        *l = *l * corr + hsum(_mm256_add_ps(p0, p1));
        *m = mx;
        Some((corr, pj))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// q8_0 keys scored against an int8 query by the VNNI tile: within rounding of the scalar
    /// reference, and within the query's int8 rounding of the exact f32 scores of the decoded
    /// keys; positions a row does not see are -inf.
    #[test]
    fn int8_scores_match_the_scalar_reference_and_the_decoded_keys() {
        // Blocks of 4 keep rows; blocks of 16 store tiles.
        for bs in [4, 16] {
            int8_scores_match_at(bs);
        }
    }

    fn int8_scores_match_at(bs: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (nkv, hd, blocks) = (2usize, 64usize, 6usize);
        let types = KvCacheType { k: KvCacheDtype::Q8_0, v: KvCacheDtype::F16 };
        let rows = blocks * bs * nkv;
        let (mut k, mut v) = (vec![0u8; rows * 68], vec![0u8; rows * 128]);
        let mut anchors = vec![0u16; blocks * nkv * hd];
        let mut kv = CodedKvMut {
            k: &mut k,
            v: &mut v,
            anchors: &mut anchors,
            types,
            block_size: bs,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let table: Vec<u32> = vec![3, 0, 5, 1, 4, 2];
        let len = if bs == 4 { 22 } else { 90 };
        let slots: Vec<usize> = (0..len).map(|p| table[p / bs] as usize * bs + p % bs).collect();
        let keys: Vec<f32> = (0..len * nkv * hd).map(|_| rng.random_range(-2.0..2.0)).collect();
        let prev: Vec<Option<usize>> = (0..len).map(|p| (p / bs).checked_sub(1).map(|i| table[i] as usize)).collect();
        kv.write_after(&slots, &prev, &keys, &keys);
        let view = kv.view();
        let nrows = 3;
        let q: Vec<f32> = (0..nrows * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (mut qi, mut qd) = (Vec::new(), Vec::new());
        quantize_queries(SimdLevel::Scalar, &q, hd, &mut qi, &mut qd);
        for level in SimdLevel::available() {
            let (mut qi2, mut qd2) = (Vec::new(), Vec::new());
            quantize_queries(level, &q, hd, &mut qi2, &mut qd2);
            assert!(
                qi2 == qi && qd2.iter().zip(&qd).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{level:?}: the query's bytes"
            );
        }
        let g = 1;
        if !view.int8_keys(SimdLevel::Avx512) || !SimdLevel::available().contains(&SimdLevel::Avx512) {
            eprintln!("skipping: no AVX-512 VNNI here");
            return;
        }
        let nb = hd / 32;
        for p0 in [0, 16, 80] {
            if p0 >= len {
                continue;
            }
            let n = (len - p0).min(CHUNK);
            // As `attend` passes them: a row sees at most the chunk's `n` positions.
            let active = [(0usize, n), (1, 9.min(n)), (2, 1)];
            let mut got = vec![0f32; nrows * CHUNK];
            view.int8_scores(SimdLevel::Avx512, &table, g, p0, n, (&q, &qi, &qd), &active, 0.5, &mut got);
            for &(i, seen) in &active {
                for j in 0..CHUNK {
                    let gv = got[i * CHUNK + j];
                    if j >= seen {
                        assert_eq!(gv, f32::NEG_INFINITY, "row {i} pos {j}: unseen");
                        continue;
                    }
                    let slot = slots[p0 + j];
                    let (b, r) = (slot / bs, (slot / bs * nkv + g) * bs + slot % bs);
                    let anchor = &view.anchors[(b * nkv + g) * hd..][..hd];
                    let qa: f32 =
                        q[i * hd..(i + 1) * hd].iter().zip(anchor).map(|(x, &a)| x * f16::from_bits(a).to_f32()).sum();
                    let mut row = vec![0u8; 68];
                    key_get(view.k, tiled(types, bs), r, hd, &mut row);
                    let dot = dot_q8_scalar(&row, &qi[i * hd..(i + 1) * hd], &qd[i * nb..(i + 1) * nb]);
                    let want = (qa + dot) * 0.5;
                    assert!((gv - want).abs() <= 1e-4 * (1.0 + want.abs()), "row {i} pos {j}: {gv} vs {want}");
                    // Against the exact score of the decoded key.
                    let (mut kr, mut vr) = (vec![0f32; hd], vec![0f32; hd]);
                    view.read(slot, g, &mut kr, &mut vr);
                    let exact: f32 = 0.5 * q[i * hd..(i + 1) * hd].iter().zip(&kr).map(|(a, b)| a * b).sum::<f32>();
                    assert!((gv - exact).abs() <= 0.05, "row {i} pos {j}: {gv} vs exact {exact}");
                }
            }
        }
    }

    use super::*;

    /// Two-pass softmax attention over a dense cache, in f64.
    fn reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let s: Vec<f64> = k
            .iter()
            .map(|kr| q.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64)
            .collect();
        let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..q.len()).map(|d| (e.iter().zip(v).map(|(p, vr)| p * vr[d] as f64).sum::<f64>() / z) as f32).collect()
    }

    /// Sequences of the given lengths in a paged cache of element type `T`.
    struct Case<T> {
        k: Vec<T>,
        v: Vec<T>,
        bs: usize,
        nkv: usize,
        hd: usize,
        tables: Vec<Vec<u32>>,
    }

    impl<T: KvElem> Case<T> {
        /// Blocks in a shuffled order; every slot outside the sequences holds NaN, which no
        /// output may see.
        fn new(rng: &mut rand::rngs::StdRng, lens: &[usize], bs: usize, nkv: usize, hd: usize) -> Case<T> {
            let blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 3;
            let mut free: Vec<u32> = (0..blocks as u32).collect();
            for i in (1..free.len()).rev() {
                free.swap(i, rng.random_range(0..=i));
            }
            let tables: Vec<Vec<u32>> =
                lens.iter().map(|l| (0..l.div_ceil(bs)).map(|_| free.pop().unwrap_or(0)).collect()).collect();
            let kd = nkv * hd;
            let mut c = Case { k: T::zeros(blocks * bs * kd), v: T::zeros(blocks * bs * kd), bs, nkv, hd, tables };
            let slots: Vec<usize> = (0..blocks * bs).collect();
            let nan = vec![f32::NAN; slots.len() * kd];
            c.kv_mut().write(&slots, &nan, &nan);
            for (s, &len) in lens.iter().enumerate() {
                let slots: Vec<usize> = (0..len).map(|p| c.slot(s, p)).collect();
                let k: Vec<f32> = (0..len * kd).map(|_| rng.random_range(-2.0..2.0)).collect();
                let v: Vec<f32> = (0..len * kd).map(|_| rng.random_range(-1.0..1.0)).collect();
                c.kv_mut().write(&slots, &k, &v);
            }
            c
        }

        fn slot(&self, s: usize, pos: usize) -> usize {
            self.tables[s][pos / self.bs] as usize * self.bs + pos % self.bs
        }

        fn kv(&self) -> PagedKv<'_, T> {
            PagedKv { k: &self.k, v: &self.v, block_size: self.bs, num_kv_heads: self.nkv, head_dim: self.hd }
        }

        fn kv_mut(&mut self) -> PagedKvMut<'_, T> {
            PagedKvMut {
                k: &mut self.k,
                v: &mut self.v,
                block_size: self.bs,
                num_kv_heads: self.nkv,
                head_dim: self.hd,
            }
        }

        /// Stored keys and values of kv head `g` at a sequence's position, read back as f32.
        fn row(&self, s: usize, pos: usize, g: usize) -> (Vec<f32>, Vec<f32>) {
            let (slot, kd, hd) = (self.slot(s, pos), self.nkv * self.hd, self.hd);
            let (b, off) = (slot / self.bs, slot % self.bs);
            let k = (0..hd).map(|d| self.k[(b * kd + g * hd + d) * self.bs + off].to_f32()).collect();
            let v = (0..hd).map(|d| self.v[(b * kd + g * hd) * self.bs + off * hd + d].to_f32()).collect();
            (k, v)
        }
    }

    fn bits_equal(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Every level against the f64 reference over the stored (for f16: rounded) keys and values,
    /// and the same bits for each query alone, in any split of the prefill, and batched with
    /// other sequences.
    fn check_levels<T: KvElem>(seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let shapes = [
            (4, 2, 16, 16),
            (7, 1, 64, 16),
            (2, 2, 128, 8),
            (3, 3, 24, 5),
            (16, 8, 128, 16),
            (8, 2, 64, 32),
            (4, 4, 80, 16),
            (8, 4, 96, 16),
            (8, 2, 40, 16),
            (4, 1, 40, 5),
        ];
        for (heads, nkv, hd, bs) in shapes {
            let lens = [1usize, 17, 40, 33];
            let c = Case::<T>::new(&mut rng, &lens, bs, nkv, hd);
            // Every position of every sequence as a query (a causal prefill of all of them).
            let mut queries = Vec::new();
            for (s, &len) in lens.iter().enumerate() {
                for p in 0..len {
                    queries.push((s, p));
                }
            }
            let row = heads * hd;
            let q: Vec<f32> = (0..queries.len() * row).map(|_| rng.random_range(-1.0..1.0)).collect();
            let ctxs: Vec<QueryContext> =
                queries.iter().map(|&(s, p)| QueryContext::causal(&c.tables[s], p + 1)).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            for level in SimdLevel::available() {
                let what = format!("{:?} {level:?} heads={heads} kv={nkv} hd={hd} bs={bs}", T::DTYPE);
                let mut out = vec![f32::NAN; q.len()];
                paged_attention_at(level, &q, heads, c.kv(), &ctxs, scale, &mut out);
                for (t, &(s, p)) in queries.iter().enumerate() {
                    for h in 0..heads {
                        let g = h / (heads / nkv);
                        let (kr, vr): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (0..=p).map(|pos| c.row(s, pos, g)).unzip();
                        let want = reference(&q[t * row + h * hd..t * row + (h + 1) * hd], &kr, &vr, scale);
                        let got = &out[t * row + h * hd..t * row + (h + 1) * hd];
                        for (a, b) in got.iter().zip(&want) {
                            assert!((a - b).abs() <= 2e-5, "{what} t={t} h={h}: {a} vs {b}");
                        }
                    }
                }
                // Each query alone gives the same bits as in the batch.
                for (t, ctx) in ctxs.iter().enumerate() {
                    let mut one = vec![0f32; row];
                    paged_attention_at(level, &q[t * row..(t + 1) * row], heads, c.kv(), &[*ctx], scale, &mut one);
                    assert!(bits_equal(&one, &out[t * row..(t + 1) * row]), "{what}: query {t} alone differs");
                }
                // The prefill in pieces of 5 tokens, each piece a batch of its own.
                for (piece, qs) in ctxs.chunks(5).zip(q.chunks(5 * row)) {
                    let t0 = (qs.as_ptr() as usize - q.as_ptr() as usize) / 4 / row;
                    let mut o = vec![0f32; qs.len()];
                    paged_attention_at(level, qs, heads, c.kv(), piece, scale, &mut o);
                    assert!(bits_equal(&o, &out[t0 * row..t0 * row + o.len()]), "{what}: piece at {t0} differs");
                }
                // Queries interleaved across sequences (every third token first).
                let order: Vec<usize> =
                    (0..ctxs.len()).step_by(3).chain((0..ctxs.len()).filter(|t| t % 3 != 0)).collect();
                let mixed_q: Vec<f32> = order.iter().flat_map(|&t| q[t * row..(t + 1) * row].iter().copied()).collect();
                let mixed_ctx: Vec<QueryContext> = order.iter().map(|&t| ctxs[t]).collect();
                let mut mixed = vec![0f32; mixed_q.len()];
                paged_attention_at(level, &mixed_q, heads, c.kv(), &mixed_ctx, scale, &mut mixed);
                for (i, &t) in order.iter().enumerate() {
                    assert!(
                        bits_equal(&mixed[i * row..(i + 1) * row], &out[t * row..(t + 1) * row]),
                        "{what}: query {t} reordered differs"
                    );
                }
            }
        }
    }

    #[test]
    fn every_level_matches_the_reference_and_batches_do_not_matter_f32() {
        check_levels::<f32>(5);
    }

    #[test]
    fn every_level_matches_the_reference_and_batches_do_not_matter_f16() {
        check_levels::<f16>(6);
    }

    /// A coded cache (every pair of key and value types) gives the same bits as an f32 cache
    /// holding its decoded values, at every level, alone or batched; and decodes to what was
    /// written within the codec's precision.
    #[test]
    fn coded_caches_match_an_f32_cache_of_their_decoded_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (heads, nkv, hd, bs) in [(4, 2, 64, 16), (8, 4, 128, 16), (2, 1, 32, 5), (6, 3, 96, 32)] {
            let lens = [1usize, 23, 40];
            let c = Case::<f32>::new(&mut rng, &lens, bs, nkv, hd);
            let blocks = c.k.len() / (bs * nkv * hd);
            for k_type in KvCacheDtype::ALL {
                for v_type in KvCacheDtype::ALL {
                    let types = KvCacheType { k: k_type, v: v_type };
                    let mut kbuf = vec![0u8; blocks * bs * nkv * k_type.row_bytes(hd)];
                    let mut vbuf = vec![0u8; blocks * bs * nkv * v_type.row_bytes(hd)];
                    let mut abuf = vec![0u16; blocks * nkv * k_type.key_side_len(hd)];
                    let mut coded = CodedKvMut {
                        k: &mut kbuf,
                        v: &mut vbuf,
                        anchors: &mut abuf,
                        types,
                        block_size: bs,
                        num_kv_heads: nkv,
                        head_dim: hd,
                    };
                    // Written in position order, a token at a time (as decoding does), anchored on
                    // the previous block where there is one.
                    let prev = |s: usize, p: usize| (p / bs).checked_sub(1).map(|i| c.tables[s][i] as usize);
                    for (s, &len) in lens.iter().enumerate() {
                        for p in 0..len {
                            let (mut k, mut v) = (Vec::new(), Vec::new());
                            for g in 0..nkv {
                                let (kr, vr) = c.row(s, p, g);
                                k.extend(kr);
                                v.extend(vr);
                            }
                            coded.write_after(&[c.slot(s, p)], &[prev(s, p)], &k, &v);
                        }
                    }
                    // The same cache as f32: what the coded one decodes to.
                    let (mut dk, mut dv) = (c.k.clone(), c.v.clone());
                    let err = |t: KvCacheDtype| match t {
                        KvCacheDtype::F32 => 0.0,
                        KvCacheDtype::F16 => 2e-3,
                        KvCacheDtype::BF16 => 1e-2,
                        KvCacheDtype::Q8_0 => 2e-2,
                        KvCacheDtype::Q4_0 => 0.3,
                    };
                    for (s, &len) in lens.iter().enumerate() {
                        for p in 0..len {
                            let slot = c.slot(s, p);
                            let (mut k, mut v) = (Vec::new(), Vec::new());
                            for g in 0..nkv {
                                let (mut kr, mut vr) = (vec![0f32; hd], vec![0f32; hd]);
                                coded.view().read(slot, g, &mut kr, &mut vr);
                                let (k0, v0) = c.row(s, p, g);
                                // Keys within 2, values within 1: errors relative to those ranges.
                                for (a, b) in kr.iter().zip(&k0) {
                                    assert!((a - b).abs() <= 4.0 * err(k_type) + 1e-6, "{types} key {a} vs {b}");
                                }
                                for (a, b) in vr.iter().zip(&v0) {
                                    assert!((a - b).abs() <= 2.0 * err(v_type) + 1e-6, "{types} value {a} vs {b}");
                                }
                                k.extend(kr);
                                v.extend(vr);
                            }
                            PagedKvMut { k: &mut dk, v: &mut dv, block_size: bs, num_kv_heads: nkv, head_dim: hd }
                                .write(&[slot], &k, &v);
                        }
                    }
                    let f32_kv = PagedKv { k: &dk, v: &dv, block_size: bs, num_kv_heads: nkv, head_dim: hd };
                    let ctxs: Vec<QueryContext> = lens
                        .iter()
                        .enumerate()
                        .flat_map(|(s, &len)| (0..len).map(move |p| (s, p)))
                        .map(|(s, p)| QueryContext::causal(&c.tables[s], p + 1))
                        .collect();
                    let row = heads * hd;
                    let q: Vec<f32> = (0..ctxs.len() * row).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let scale = 1.0 / (hd as f32).sqrt();
                    for level in SimdLevel::available() {
                        let what = format!("{types} {level:?} heads={heads} kv={nkv} hd={hd} bs={bs}");
                        let mut want = vec![0f32; q.len()];
                        paged_attention_at(level, &q, heads, f32_kv, &ctxs, scale, &mut want);
                        let mut got = vec![0f32; q.len()];
                        paged_attention_at(level, &q, heads, coded.view(), &ctxs, scale, &mut got);
                        if coded.view().int8_keys(level) {
                            // q8_0 keys score an int8 query (rounded to 1/254 of each block's
                            // largest value): close to the f32 cache, not equal.
                            let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                            assert!(diff <= 2e-2, "{what}: {diff} from the decoded f32 cache");
                        } else {
                            assert!(bits_equal(&got, &want), "{what}: differs from the decoded f32 cache");
                        }
                        assert!(got.iter().all(|x| x.is_finite()), "{what}: saw an unwritten slot");
                        let t = ctxs.len() - 1;
                        let mut one = vec![0f32; row];
                        paged_attention_at(level, &q[t * row..], heads, coded.view(), &ctxs[t..], scale, &mut one);
                        assert!(bits_equal(&one, &got[t * row..]), "{what}: the last query alone differs");
                    }
                    // Writing a whole sequence at once gives the same bytes as a token at a time.
                    let (mut k2, mut v2, mut a2) =
                        (vec![0u8; kbuf.len()], vec![0u8; vbuf.len()], vec![0u16; abuf.len()]);
                    let mut once = CodedKvMut {
                        k: &mut k2,
                        v: &mut v2,
                        anchors: &mut a2,
                        types,
                        block_size: bs,
                        num_kv_heads: nkv,
                        head_dim: hd,
                    };
                    for (s, &len) in lens.iter().enumerate() {
                        let slots: Vec<usize> = (0..len).map(|p| c.slot(s, p)).collect();
                        let prevs: Vec<Option<usize>> = (0..len).map(|p| prev(s, p)).collect();
                        let (mut k, mut v) = (Vec::new(), Vec::new());
                        for p in 0..len {
                            for g in 0..nkv {
                                let (kr, vr) = c.row(s, p, g);
                                k.extend(kr);
                                v.extend(vr);
                            }
                        }
                        once.write_after(&slots, &prevs, &k, &v);
                    }
                    assert!(k2 == kbuf && v2 == vbuf && a2 == abuf, "{types}: batched writes differ");
                }
            }
        }
    }

    #[test]
    fn q4_0_scale_search_matches_one_candidate_at_a_time() {
        // The search as first written: one candidate scale at a time, scalar.
        fn one_at_a_time(x: &[f32]) -> f32 {
            let m = x.iter().copied().fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
            if m == 0.0 {
                return 0.0;
            }
            let x2: f32 = x.iter().map(|v| v * v).sum();
            let pass = |d: f32| -> (f32, f32, f32) {
                let d = f16::from_f32(d).to_f32();
                if d == 0.0 {
                    return (x2, d, d);
                }
                let id = 1.0 / d;
                let (mut xq, mut qq) = (0f32, 0f32);
                for &v in x {
                    let q = level4(v * id);
                    xq += v * q;
                    qq += q * q;
                }
                (x2 - 2.0 * d * xq + d * d * qq, d, if qq > 0.0 { xq / qq } else { d })
            };
            let mut best = (f32::INFINITY, 0f32);
            for base in [m / -8.0, m / 7.0] {
                for k in 0..=16 {
                    let (e, d, refit) = pass(base * (0.6 + 0.025 * k as f32));
                    let (e2, d2, _) = pass(refit);
                    for (e, d) in [(e, d), (e2, d2)] {
                        if e < best.0 {
                            best = (e, d);
                        }
                    }
                }
            }
            best.1
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(41);
        for case in 0..3000 {
            let mag = [1e-6f32, 1e-3, 1.0, 40.0, 6e4][case % 5];
            let mut x: Vec<f32> = (0..32).map(|_| rng.random_range(-mag..mag)).collect();
            if case % 7 == 0 {
                x[case % 32] *= 30.0;
            }
            if case % 11 == 0 {
                x[..20].fill(0.0);
            }
            assert_eq!(q4_0_scale(&x).to_bits(), one_at_a_time(&x).to_bits(), "case {case}: {x:?}");
            let d = std::array::from_fn(|c| if c < 34 { (c as f32 + 1.0) * mag / 40.0 } else { 0.0 });
            let (mut want_xq, mut want_qq) = ([0f32; SCALE_LANES], [0f32; SCALE_LANES]);
            level_sums(SimdLevel::Scalar, &x, &d, &mut want_xq, &mut want_qq);
            for level in SimdLevel::available() {
                let (mut xq, mut qq) = ([0f32; SCALE_LANES], [0f32; SCALE_LANES]);
                level_sums(level, &x, &d, &mut xq, &mut qq);
                assert!(bits_equal(&xq, &want_xq) && bits_equal(&qq, &want_qq), "case {case} {level:?}");
            }
        }
        assert_eq!(q4_0_scale(&[0.0; 32]), 0.0);
    }

    /// Q4_0 keys: channels that move little (beside a large bias, as the slow RoPE pairs of
    /// small Qwen models carry) are read back closer than channels that move a lot, once a block
    /// has measured them. With one error for all channels (what a scale per 32 values or a
    /// rotation gives) the still channels would get the moving ones' error.
    #[test]
    fn q4_0_keys_err_less_where_channels_move_less() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let (bs, hd, len) = (16, 64, 64);
        let types = KvCacheType { k: KvCacheDtype::Q4_0, v: KvCacheDtype::F16 };
        let blocks = len / bs;
        let (mut kbuf, mut vbuf) = (vec![0u8; len * types.k.row_bytes(hd)], vec![0u8; len * types.v.row_bytes(hd)]);
        let mut side = vec![0u16; blocks * types.k.key_side_len(hd)];
        let mut kv = CodedKvMut {
            k: &mut kbuf,
            v: &mut vbuf,
            anchors: &mut side,
            types,
            block_size: bs,
            num_kv_heads: 1,
            head_dim: hd,
        };
        // Even channels: 40 +- 0.5. Odd channels: +- 8.
        let keys: Vec<Vec<f32>> = (0..len)
            .map(|_| {
                (0..hd)
                    .map(|c| if c % 2 == 0 { 40.0 + rng.random_range(-0.5..0.5) } else { rng.random_range(-8.0..8.0) })
                    .collect()
            })
            .collect();
        for (p, key) in keys.iter().enumerate() {
            let prev = (p / bs).checked_sub(1);
            kv.write_after(&[p], &[prev], key, &vec![0.0; hd]);
        }
        let (mut still, mut moving) = (0f32, 0f32);
        let (mut k, mut v) = (vec![0f32; hd], vec![0f32; hd]);
        for (p, key) in keys.iter().enumerate().skip(bs) {
            kv.view().read(p, 0, &mut k, &mut v);
            for (c, (a, b)) in k.iter().zip(key).enumerate() {
                if c % 2 == 0 {
                    still += (a - b).abs();
                } else {
                    moving += (a - b).abs();
                }
            }
        }
        assert!(still < moving / 2.5, "still channels' error {still} vs moving ones' {moving}");
    }

    /// Sliding windows: each query sees only its last `w` positions, matching the reference
    /// over them at every level, and the same bits alone as batched with full-attention queries.
    #[test]
    fn sliding_windows_see_only_their_positions() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for (heads, nkv, hd, bs) in [(4, 2, 64, 16), (2, 1, 40, 5), (8, 4, 128, 32)] {
            let lens = [70usize, 33];
            let c = Case::<f16>::new(&mut rng, &lens, bs, nkv, hd);
            let row = heads * hd;
            let scale = 1.0 / (hd as f32).sqrt();
            for w in [1usize, 5, 16, 17, 40, 100] {
                let queries: Vec<(usize, usize)> =
                    lens.iter().enumerate().flat_map(|(s, &len)| (0..len).map(move |p| (s, p))).collect();
                let ctxs: Vec<QueryContext> =
                    queries.iter().map(|&(s, p)| QueryContext::windowed(&c.tables[s], p + 1, Some(w))).collect();
                let q: Vec<f32> = (0..ctxs.len() * row).map(|_| rng.random_range(-1.0..1.0)).collect();
                for level in SimdLevel::available() {
                    let what = format!("{level:?} heads={heads} kv={nkv} hd={hd} bs={bs} w={w}");
                    let mut out = vec![f32::NAN; q.len()];
                    paged_attention_at(level, &q, heads, c.kv(), &ctxs, scale, &mut out);
                    for (t, &(s, p)) in queries.iter().enumerate() {
                        for h in 0..heads {
                            let g = h / (heads / nkv);
                            let from = (p + 1).saturating_sub(w);
                            let (kr, vr): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                                (from..=p).map(|pos| c.row(s, pos, g)).unzip();
                            let want = reference(&q[t * row + h * hd..t * row + (h + 1) * hd], &kr, &vr, scale);
                            let got = &out[t * row + h * hd..t * row + (h + 1) * hd];
                            for (a, b) in got.iter().zip(&want) {
                                assert!((a - b).abs() <= 2e-5, "{what} t={t} h={h}: {a} vs {b}");
                            }
                        }
                    }
                    // Alone, and batched beside full-attention queries of the other sequence.
                    for (t, ctx) in ctxs.iter().enumerate().step_by(7) {
                        let mut one = vec![0f32; row];
                        paged_attention_at(level, &q[t * row..(t + 1) * row], heads, c.kv(), &[*ctx], scale, &mut one);
                        assert!(bits_equal(&one, &out[t * row..(t + 1) * row]), "{what}: query {t} alone differs");
                        let other = QueryContext::causal(&c.tables[1 - queries[t].0], 20);
                        let mut two = vec![0f32; 2 * row];
                        let qq: Vec<f32> = q[t * row..(t + 1) * row].iter().chain(&q[..row]).copied().collect();
                        paged_attention_at(level, &qq, heads, c.kv(), &[*ctx, other], scale, &mut two);
                        assert!(
                            bits_equal(&two[..row], &out[t * row..(t + 1) * row]),
                            "{what}: query {t} batched differs"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn cache_types_parse_size_and_check_head_sizes() {
        for t in KvCacheDtype::ALL {
            assert_eq!(t.name().parse::<KvCacheDtype>(), Ok(t));
            assert_eq!(t.name().to_uppercase().parse::<KvCacheDtype>(), Ok(t));
        }
        assert!("q4_k".parse::<KvCacheDtype>().is_err());
        assert_eq!(KvCacheDtype::Q8_0.row_bytes(128), 4 * 34);
        assert_eq!(KvCacheDtype::Q4_0.row_bytes(64), 2 * 18);
        assert_eq!(KvCacheDtype::BF16.row_bytes(64), 128);
        // Rows of keys and values, and an f16 anchor row per block of 16 for the keys.
        assert_eq!(KvCacheType::both(KvCacheDtype::Q8_0).bytes_per_token(8, 128), 8 * 2 * 4 * 34 + 8 * 128 * 2 / 16);
        assert_eq!(KvCacheType::both(KvCacheDtype::F16).bytes_per_token(8, 128), 8 * 2 * 128 * 2);
        assert!(KvCacheType::both(KvCacheDtype::Q4_0).check(128).is_ok());
        let e = KvCacheType { k: KvCacheDtype::F16, v: KvCacheDtype::Q4_0 }.check(80).unwrap_err();
        assert!(e.contains("--cache-type-v") && e.contains("q4_0"), "{e}");
        assert_eq!(KvCacheType { k: KvCacheDtype::Q8_0, v: KvCacheDtype::Q4_0 }.to_string(), "q8_0/q4_0");
    }

    #[test]
    fn f16_and_f32_caches_agree_to_f16_precision() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (heads, nkv, hd, bs, len) = (8, 4, 64, 16, 70);
        let s: u64 = rng.random();
        let c32 = Case::<f32>::new(&mut rand::rngs::StdRng::seed_from_u64(s), &[len], bs, nkv, hd);
        let c16 = Case::<f16>::new(&mut rand::rngs::StdRng::seed_from_u64(s), &[len], bs, nkv, hd);
        let row = heads * hd;
        let q: Vec<f32> = (0..len * row).map(|_| rng.random_range(-1.0..1.0)).collect();
        let ctxs: Vec<QueryContext> = (0..len).map(|p| QueryContext::causal(&c32.tables[0], p + 1)).collect();
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        paged_attention(&q, heads, c32.kv(), &ctxs, 0.125, &mut a);
        paged_attention(&q, heads, c16.kv(), &ctxs, 0.125, &mut b);
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff > 0.0 && diff < 2e-3, "max |f32 - f16| = {diff}");
    }

    #[test]
    fn writes_round_to_nearest_even_and_read_back_exactly() {
        let xs: Vec<f32> = [0.0, -0.0, 1.0, 65504.0, 70000.0, -1e-8, 1e-5, 0.1, 1.0 + 1.0 / 4096.0, f32::INFINITY]
            .into_iter()
            .chain((0..1000).map(|i| (i as f32 - 500.0) * 0.0137))
            .collect();
        let mut h = f16::zeros(xs.len());
        f16::from_f32s(&xs, &mut h);
        for (x, y) in xs.iter().zip(&h) {
            assert_eq!(y.to_bits(), f16::from_f32(*x).to_bits(), "{x}");
        }
        for level in SimdLevel::available() {
            let mut back = vec![f32::NAN; xs.len()];
            f16::widen_rows(level, &h, 0, 1, h.len(), &mut back);
            assert!(h.iter().zip(&back).all(|(a, b)| a.to_f32().to_bits() == b.to_bits()), "{level:?}");
        }
        assert!(f16::zeros(100).iter().all(|z| z.to_bits() == 0));
    }

    #[test]
    fn dtype_names_parse() {
        assert_eq!("f16".parse(), Ok(KvCacheDtype::F16));
        assert_eq!(" F32 ".parse(), Ok(KvCacheDtype::F32));
        assert_eq!(KvCacheDtype::default(), KvCacheDtype::F16);
        let e = "f8".parse::<KvCacheDtype>().unwrap_err();
        assert!(e.to_string().contains("expected f32, f16, bf16, q8_0 or q4_0"), "{e}");
    }

    #[test]
    fn empty_context_gives_zeros() {
        let kv = PagedKv::<f32> { k: &[], v: &[], block_size: 16, num_kv_heads: 1, head_dim: 16 };
        let q = vec![1f32; 16];
        let mut out = vec![f32::NAN; 16];
        paged_attention(&q, 1, kv, &[QueryContext::causal(&[], 0)], 1.0, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }

    /// The runs `ahead_f16` names are the keys and values `in_place` reads for that chunk.
    #[test]
    fn ahead_runs_are_the_chunk_read_in_place() {
        let (bs, nkv, hd, blocks) = (CHUNK, 3, 32, 5);
        let n = blocks * bs * nkv * hd;
        let k: Vec<f16> = (0..n).map(|i| f16::from_f32(i as f32)).collect();
        let v: Vec<f16> = (0..n).map(|i| f16::from_f32(-(i as f32))).collect();
        let kv = PagedKv { k: &k, v: &v, block_size: bs, num_kv_heads: nkv, head_dim: hd };
        let table = [4u32, 0, 2];
        for g in 0..nkv {
            for p0 in (0..table.len() * bs).step_by(CHUNK) {
                let (rk, rv) = kv.ahead_f16(&table, g, p0).expect("f16 blocks of one chunk");
                let (ik, ks, iv, _) = kv.in_place(&k, &v, &table, g, p0, CHUNK);
                assert_eq!(ks, bs);
                assert_eq!((rk.as_ptr(), rk.len()), (ik.as_ptr(), hd * bs));
                assert_eq!((rv.as_ptr(), rv.len()), (iv.as_ptr(), iv.len()));
            }
        }
        // Past the table, or blocks of two chunks: none.
        assert!(kv.ahead_f16(&table, 0, table.len() * bs).is_none());
        let wide = PagedKv { k: &k, v: &v, block_size: 2 * CHUNK, num_kv_heads: nkv, head_dim: hd };
        assert!(wide.ahead_f16(&table, 0, 0).is_none());
    }
}
