//! BF16 matrices times bf16 activations on Intel's AMX tiles ([`crate::cpu::has_amx`]).
//!
//! `tdpbf16ps` adds to a 16 x 16 tile of f32 sums the products of 16 rows of 32 bf16 (here 16
//! weight rows, as stored: a tile loads 64 bytes of each row) with 16 pairs of bf16 of 16
//! columns (here tokens: the activations transposed by pairs once per product,
//! [`crate::dot::float::to_bf16_pairs`]): 16 x 16 x 32 multiply-adds per instruction, one per
//! 7.5 ns on a Sapphire-Rapids-class core (1.1 T a second; its AVX-512 FMAs give about 80 G),
//! and about 3x the AVX-512 kernels over whole products (`benches/matmul.rs`). The sums stay in the tile along the
//! whole row and are stored once, so nothing per block slows it down (8-bit block formats, with
//! a scale per 32 weights, would store and rescale every 16 x 16 x 32 product: measured no
//! faster than the VNNI tiles, so they do not use AMX).
//!
//! Every (row, token) sum depends only on that row and that token and is accumulated block by
//! block in column order, whatever the tile's other rows and tokens: batch invariant like the
//! other kernels. Rust's `std::arch` has no stable AMX intrinsics, so the few tile
//! instructions are inline assembly.

use std::arch::asm;
use std::arch::x86_64::*;

/// The 64-byte operand of `ldtilecfg`: palette 1, then bytes per row and rows of each tile.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// The tile configuration of the BF16 products, loaded on this thread while the value lives:
/// tiles 0..=3 hold 16 weight rows x 32 bf16 (two row groups, two blocks), 4 and 5 sixteen
/// column pairs of 16 tokens (two blocks), 6 and 7 the f32 sums of the two row groups. Not
/// `Send`: the configuration is the thread's. Dropping it releases the tiles (`tilerelease`), so
/// a thread holds the 8 KiB tile state only inside a product.
struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// # Safety
    /// [`crate::cpu::amx_detected`] said this process may use AMX.
    #[inline(always)]
    unsafe fn new() -> Tiles {
        let mut c = Config { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            (c.colsb[t], c.rows[t]) = (64, 16);
        }
        // SAFETY: a valid palette-1 configuration; the caller checked the CPU and the OS.
        asm!("ldtilecfg [{}]", in(reg) &c as *const Config, options(nostack, readonly));
        Tiles(std::marker::PhantomData)
    }

    #[inline(always)]
    unsafe fn zero(&self) {
        asm!("tilezero tmm6", "tilezero tmm7", options(nostack, nomem));
    }

    /// Two blocks of 32 columns: weight rows at `w[g]` (two groups of 16 rows, `w_stride` bytes
    /// apart) times token pairs at `x` (16 pair rows, `x_stride` bytes apart), then the same
    /// for the next block at `w[2 + g]` and `x + x_step`, added to sum tiles 6 and 7 (one per
    /// row group). The two blocks load into different tiles (0, 1, 4 and 2, 3, 5): tiles are
    /// not renamed, so a load into a tile waits for the products reading it, and alternating
    /// lets one block's loads overlap the other's products (one-token products ran 1.6x faster
    /// so, 15 -> 25 GiB/s). `two`: both blocks, else only the first.
    #[inline(always)]
    unsafe fn blocks(
        &self,
        w: [*const u8; 4],
        w_stride: usize,
        x: *const u32,
        x_stride: usize,
        x_step: usize,
        two: bool,
    ) {
        if two {
            asm!(
                "tileloadd tmm0, [{w0} + {ws}]",
                "tileloadd tmm4, [{x} + {xs}]",
                "tileloadd tmm1, [{w1} + {ws}]",
                "tdpbf16ps tmm6, tmm0, tmm4",
                "tileloadd tmm2, [{w2} + {ws}]",
                "tileloadd tmm5, [{x2} + {xs}]",
                "tdpbf16ps tmm7, tmm1, tmm4",
                "tileloadd tmm3, [{w3} + {ws}]",
                "tdpbf16ps tmm6, tmm2, tmm5",
                "tdpbf16ps tmm7, tmm3, tmm5",
                w0 = in(reg) w[0], w1 = in(reg) w[1], w2 = in(reg) w[2], w3 = in(reg) w[3], ws = in(reg) w_stride,
                x = in(reg) x, x2 = in(reg) x.byte_add(x_step), xs = in(reg) x_stride,
                options(nostack, readonly),
            )
        } else {
            asm!(
                "tileloadd tmm0, [{w0} + {ws}]",
                "tileloadd tmm4, [{x} + {xs}]",
                "tileloadd tmm1, [{w1} + {ws}]",
                "tdpbf16ps tmm6, tmm0, tmm4",
                "tdpbf16ps tmm7, tmm1, tmm4",
                w0 = in(reg) w[0], w1 = in(reg) w[1], ws = in(reg) w_stride,
                x = in(reg) x, xs = in(reg) x_stride,
                options(nostack, readonly),
            )
        }
    }

    /// The two sum tiles to `c` (tile 6 at `c[0..256]`, 7 at `c[256..512]`, 16 rows x 16
    /// tokens, row major).
    #[inline(always)]
    unsafe fn store(&self, c: *mut f32) {
        asm!(
            "tilestored [{c} + {s}], tmm6",
            "tilestored [{c} + {s} + 1024], tmm7",
            c = in(reg) c, s = in(reg) 64usize,
            options(nostack),
        )
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `new` on this thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
    }
}

/// A cache-line aligned buffer of the two sum tiles.
#[repr(C, align(64))]
struct Sums([[f32; 16]; 32]);

/// Rows a group of the tiles covers.
const G: usize = 16;

/// `out[(t - t0) * ldo + r] = Σ_c w[r][c] · x[t][c]` for the `nrows` BF16 rows of `w` and
/// tokens `t0..t1` of `xt`. The columns are a multiple of 32. `w` holds the rows one after
/// another.
///
/// # Safety
/// [`crate::cpu::amx_detected`] is true (AMX-TILE, AMX-BF16, AVX-512, granted by Linux).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn gemm_bf16(
    w: &[u8],
    nrows: usize,
    xt: &crate::dot::float::Bf16Pairs,
    (t0, t1): (usize, usize),
    out: &mut [f32],
    ldo: usize,
) {
    let rb = w.len() / nrows;
    let cols = rb / 2;
    assert!(w.len() == nrows * rb && cols.is_multiple_of(32) && cols > 0, "{nrows} rows of {rb} bytes");
    // Where block `b` of a group starts, and the bytes between its 16 rows.
    let (block_step, w_stride) = (64, rb);
    // Tile rows of 16 tokens from `t0 + 16 k` stay inside the pairs: `to_bf16_pairs` puts 16
    // zeros after the last row.
    assert!(t0 < t1 && t1 <= xt.ntok && xt.cols == cols, "tokens {t0}..{t1} of {} x {}", xt.ntok, xt.cols);
    assert!(ldo >= nrows && out.len() >= (t1 - t0 - 1) * ldo + nrows);
    // A last group of fewer than 16 rows is read from a zero-padded copy: tile loads read all 16.
    let whole = nrows / G;
    let pad: Vec<u8> = if !nrows.is_multiple_of(G) {
        let mut p = vec![0u8; G * rb];
        p[..(nrows - whole * G) * rb].copy_from_slice(&w[whole * G * rb..]);
        p
    } else {
        Vec::new()
    };
    let group = |g: usize| if g < whole { w.as_ptr().add(g * G * rb) } else { pad.as_ptr() };
    let groups = nrows.div_ceil(G);
    let ntt = (t1 - t0).div_ceil(16);
    let blocks = cols / 32;
    let x_stride = xt.stride * 4;
    let tiles = Tiles::new();
    let mut sums = Sums([[0.0; 16]; 32]);
    for g in (0..groups).step_by(2) {
        // An odd last group is computed twice (in both row tiles); the copy is not stored.
        let gs = [g, (g + 1).min(groups - 1)];
        let ws = gs.map(group);
        for tt in 0..ntt {
            let x = xt.at(0, t0 + 16 * tt);
            tiles.zero();
            for b in (0..blocks).step_by(2) {
                // The same lines of the next pass's rows, into L2, as the one-token FMA tiles
                // prefetch (a tile load waits on its 16 lines about one after another). Into
                // L1 a few blocks ahead instead, or as well, measured slower.
                for r in 0..2 * G {
                    let at = (2 * G + r) * rb + 64 * b;
                    let p = ws[0].wrapping_add(at);
                    _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64) as *const i8);
                }
                let w = [ws[0], ws[1], ws[0].add(block_step), ws[1].add(block_step)].map(|p| p.add(block_step * b));
                let step = 16 * xt.stride * 4;
                tiles.blocks(w, w_stride, x.add(16 * b * xt.stride), x_stride, step, b + 1 < blocks);
            }
            tiles.store(sums.0.as_mut_ptr() as *mut f32);
            for (gi, &gg) in gs.iter().enumerate() {
                if gi == 1 && gg == gs[0] {
                    continue;
                }
                let live = (nrows - gg * G).min(G);
                for n in 0..(t1 - t0 - 16 * tt).min(16) {
                    let at = (16 * tt + n) * ldo + gg * G;
                    for (m, o) in out[at..at + live].iter_mut().enumerate() {
                        *o = sums.0[16 * gi + m][n];
                    }
                }
            }
        }
    }
}

/// [`crate::dot::float::to_bf16_pairs`]'s body with AVX-512 BF16: for each 16 tokens x 16
/// pairs, the tokens' 32 values rounded to bf16 pairs (`vcvtne2ps2bf16`, to nearest even;
/// denormals become zero, as AMX takes bf16 denormals anyway) and the 16 x 16 dwords transposed.
/// `out[p * stride + t]`; `cols` a multiple of 32, `stride` of 16 and `out` 64-byte aligned.
///
/// # Safety
/// The CPU has AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn bf16_pairs(x: &[f32], ntok: usize, cols: usize, out: &mut [u32], stride: usize) {
    assert!(cols.is_multiple_of(32) && stride.is_multiple_of(16) && stride >= ntok);
    assert!(x.len() == ntok * cols && out.len() >= cols / 2 * stride && (out.as_ptr() as usize).is_multiple_of(64));
    for t0 in (0..ntok).step_by(16) {
        for c0 in (0..cols).step_by(32) {
            let v: [__m512i; 16] = std::array::from_fn(|i| {
                if t0 + i < ntok {
                    let p = x.as_ptr().add((t0 + i) * cols + c0);
                    // Element 2k (low half of dword k) is column c0 + 2k: `b`'s values go low.
                    let hi = _mm512_loadu_ps(p.add(16));
                    let lo = _mm512_loadu_ps(p);
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
                } else {
                    _mm512_setzero_si512()
                }
            });
            for (k, row) in transpose16(v).iter().enumerate() {
                _mm512_store_si512(out.as_mut_ptr().add((c0 / 2 + k) * stride + t0) as *mut _, *row);
            }
        }
    }
}

/// A 16 x 16 transpose of dwords: `out[c]` holds dword `c` of every row.
#[inline(always)]
unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Within 128-bit lanes: pairs of rows by dwords, then fours by quadwords. `b[4k + m]`, lane
    // `l`: rows 4k..4k+4 at column 4l + m.
    let a: [__m512i; 16] = std::array::from_fn(|i| {
        let j = i / 2 * 2;
        if i % 2 == 1 {
            _mm512_unpackhi_epi32(r[j], r[j + 1])
        } else {
            _mm512_unpacklo_epi32(r[j], r[j + 1])
        }
    });
    let b: [__m512i; 16] = std::array::from_fn(|i| {
        let q = i / 4 * 4;
        match i % 4 {
            0 => _mm512_unpacklo_epi64(a[q], a[q + 2]),
            1 => _mm512_unpackhi_epi64(a[q], a[q + 2]),
            2 => _mm512_unpacklo_epi64(a[q + 1], a[q + 3]),
            _ => _mm512_unpackhi_epi64(a[q + 1], a[q + 3]),
        }
    });
    // Then a 4 x 4 transpose of the 128-bit lanes of b[m], b[4 + m], b[8 + m], b[12 + m].
    let mut out = [_mm512_setzero_si512(); 16];
    for m in 0..4 {
        let (b0, b1, b2, b3) = (b[m], b[4 + m], b[8 + m], b[12 + m]);
        let c0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(b0, b1);
        let c1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(b0, b1);
        let c2 = _mm512_shuffle_i32x4::<0b10_00_10_00>(b2, b3);
        let c3 = _mm512_shuffle_i32x4::<0b11_01_11_01>(b2, b3);
        out[m] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c0, c2);
        out[8 + m] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c0, c2);
        out[4 + m] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c1, c3);
        out[12 + m] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c1, c3);
    }
    out
}
