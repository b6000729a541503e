//! Which SIMD instruction sets the kernels may use: detected once, optionally capped by
//! `PIO_SIMD=scalar|avx2|avxvnni|avx512|amx` so every level can be tested and benchmarked on one
//! machine. `amx` is the AVX-512 level plus Intel's AMX tile multiplier ([`has_amx`]), the default
//! where the CPU and the kernel offer it; `avx512` then means AVX-512 without AMX. Likewise
//! `avxvnni` is the AVX2 level plus AVX-VNNI ([`has_avx_vnni`]: the 256-bit `vpdpbusd` of
//! Intel's client cores since Alder Lake, which have no AVX-512), the default where the CPU has
//! it and no AVX-512; `avx2` then means plain AVX2, as on AMD's Zen 2 and Zen 3.

use std::sync::OnceLock;

/// A dispatch level. Each level implies the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Plain Rust; the reference every other level is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/DQ (+ VNNI and BF16 when [`has_avx512_vnni`] / [`has_avx512_bf16`]).
    Avx512,
}

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Parses `scalar`, `avx2`, `avxvnni` (the AVX2 level, with [`has_avx_vnni`]), `avx512` or
    /// `amx` (the AVX-512 level, with [`has_amx`]).
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" | "avxvnni" => Some(SimdLevel::Avx2),
            "avx512" | "amx" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// Every level this CPU can run, lowest first (for tests and benchmarks).
    pub fn available() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= detected()).collect()
    }
}

/// The best level the CPU supports.
pub fn detected() -> SimdLevel {
    static L: OnceLock<SimdLevel> = OnceLock::new();
    *L.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    use std::arch::is_x86_feature_detected as has;
    if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") && has!("fma") && has!("f16c") {
        SimdLevel::Avx512
    } else if has!("avx2") && has!("fma") && has!("f16c") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Scalar
}

/// The level kernels use: the detected one, capped by `PIO_SIMD` if set (an unknown value or
/// one above what the CPU has is ignored with a message on stderr).
pub fn level() -> SimdLevel {
    static L: OnceLock<SimdLevel> = OnceLock::new();
    *L.get_or_init(|| match std::env::var("PIO_SIMD") {
        Err(_) => detected(),
        Ok(v) => match SimdLevel::parse(&v) {
            Some(l)
                if l <= detected()
                    && (!v.trim().eq_ignore_ascii_case("amx") || amx_detected())
                    && (!v.trim().eq_ignore_ascii_case("avxvnni") || avx_vnni_detected()) =>
            {
                l
            }
            _ => {
                eprintln!(
                    "warning: PIO_SIMD={v:?} is not one of scalar|avx2|avxvnni|avx512|amx this CPU runs; using {}",
                    detected().name()
                );
                detected()
            }
        },
    })
}

/// The name of what the kernels run: [`level`]'s, or `avxvnni` / `amx` where [`has_avx_vnni`] /
/// [`has_amx`] add to it.
pub fn label() -> &'static str {
    if has_avx_vnni() {
        "avxvnni"
    } else if has_amx() {
        "amx"
    } else {
        level().name()
    }
}

/// The AVX2-level kernels use AVX-VNNI (the VEX-encoded 256-bit `vpdpbusd`): the CPU has it, the
/// level is AVX2 (AVX-512 CPUs run their own VNNI at the AVX-512 level), and `PIO_SIMD` is unset
/// or `avxvnni` (`avx2` asks for plain AVX2).
pub fn has_avx_vnni() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| extension_asked("avxvnni") && level() == SimdLevel::Avx2 && avx_vnni_detected())
}

/// `PIO_SIMD` leaves the level's extension `name` on: it is unset (extensions are the default
/// where the CPU has them) or names it.
fn extension_asked(name: &str) -> bool {
    std::env::var("PIO_SIMD").map_or(true, |v| v.trim().eq_ignore_ascii_case(name))
}

/// The CPU has AVX-VNNI (and the AVX2 level).
pub(crate) fn avx_vnni_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: OnceLock<bool> = OnceLock::new();
        *V.get_or_init(|| detected() >= SimdLevel::Avx2 && std::arch::is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-512 VNNI (`vpdpbusd`) is available.
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: OnceLock<bool> = OnceLock::new();
        *V.get_or_init(|| std::arch::is_x86_feature_detected!("avx512vnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Intel's AMX tiles with BF16 products (`tdpbf16ps`: a 16 x 16 tile of f32 sums of 32 bf16
/// products per instruction) are available to the kernels: the CPU has AMX-TILE and AMX-BF16,
/// Linux granted this process the tile state, the level is AVX-512 (with BF16) and `PIO_SIMD`
/// is unset or `amx`.
pub fn has_amx() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| extension_asked("amx") && level() == SimdLevel::Avx512 && amx_detected())
}

/// The CPU has AMX-TILE and AMX-BF16 (and AVX-512 BF16) and the kernel lets this process use
/// them: Linux (5.16 and later) hands out the 8 KiB tile state only to a process that asks for
/// it (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), for all its threads. Without
/// that the first tile instruction faults (llama.cpp's AMX kernels die so on such a VM), so
/// nothing uses AMX unless the request succeeded.
pub(crate) fn amx_detected() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            if detected() < SimdLevel::Avx512 || !has_avx512_bf16() {
                return false;
            }
            // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512, checked first.
            #[allow(unused_unsafe)]
            let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
            let (bf16, tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
            if !tile || !bf16 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl with this request only changes which XSAVE features the
            // process may use; it reads no memory of ours.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// AVX-512 BF16 (`vdpbf16ps`) is available.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: OnceLock<bool> = OnceLock::new();
        *V.get_or_init(|| std::arch::is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether `vdpbf16ps` (32 products per 512-bit instruction) outruns f32 FMAs (16 each) on this
/// CPU, so BF16 weights are worth multiplying with bf16-rounded activations
/// ([`crate::dot::float::bf16_activations`]). Not on Intel's cores: an Emerald Rapids core ran
/// 1.28 G `vdpbf16ps` (zmm) a second against 5.3 G `vfmadd231ps` (one every two cycles against
/// two a cycle), so it computes half the products of the FMAs. Elsewhere (AMD's Zen 4 and 5)
/// it is kept, as before: not measured here.
pub fn fast_bf16_dot() -> bool {
    cfg!(target_arch = "x86_64") && !is_intel()
}

/// Whether the one-token products prefetch their weights non-temporally (into L1, past the
/// other caches) rather than into L2: they read each weight once per token. Measured faster on
/// AMD's Zen 5 (`dot::kquants::tiled::Prefetch`, `dot::float`'s one-token tiles); Intel's cores keep L2, which a Sapphire
/// Rapids VM measured faster than L1 (`_MM_HINT_T0`) and where the non-temporal hint was not
/// measured.
pub fn one_token_prefetch_nta() -> bool {
    cfg!(target_arch = "x86_64") && !is_intel()
}

/// Whether the CPU is Intel's (its CPUID vendor string).
fn is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: OnceLock<bool> = OnceLock::new();
        *V.get_or_init(|| {
            // SAFETY: CPUID leaf 0 (the vendor string) exists on every x86-64 CPU.
            #[allow(unused_unsafe)]
            let id = unsafe { std::arch::x86_64::__cpuid(0) };
            // "GenuineIntel": "Genu" in EBX, "ineI" in EDX, "ntel" in ECX.
            id.ebx == u32::from_le_bytes(*b"Genu") && id.edx == u32::from_le_bytes(*b"ineI")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Bytes of one core's L2 cache, as Linux reports it (`/sys/devices/system/cpu/cpu0/cache`);
/// 512 KiB, the smallest of the x86 cores we target (Zen 3), where it cannot be read.
pub fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| {
        (0..8)
            .find_map(|i| {
                let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
                let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
                if level.trim() != "2" {
                    return None;
                }
                parse_cache_size(&std::fs::read_to_string(format!("{dir}/size")).ok()?)
            })
            .unwrap_or(512 << 10)
    })
}

/// `2048K`, `1M`, `512` (bytes) as sysfs writes cache sizes.
fn parse_cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => s.split_at(at),
        None => (s, ""),
    };
    let n: usize = digits.parse().ok()?;
    match unit {
        "" => Some(n),
        "K" => n.checked_mul(1 << 10),
        "M" => n.checked_mul(1 << 20),
        _ => None,
    }
}

#[cfg(test)]
mod cache_tests {
    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(super::parse_cache_size("2048K\n"), Some(2 << 20));
        assert_eq!(super::parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(super::parse_cache_size("512"), Some(512));
        assert_eq!(super::parse_cache_size("12Q"), None);
        assert_eq!(super::parse_cache_size(""), None);
        assert!(super::l2_bytes() >= 64 << 10);
    }
}

#[cfg(test)]
mod level_tests {
    use super::*;

    #[test]
    fn levels_parse_with_their_extensions() {
        assert_eq!(SimdLevel::parse("scalar"), Some(SimdLevel::Scalar));
        assert_eq!(SimdLevel::parse(" AVX2 "), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse("avxvnni"), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse("avx512"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("amx"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("avx10"), None);
    }

    #[test]
    fn extensions_only_at_their_level() {
        // AVX-VNNI is only used at the AVX2 level, AMX only at the AVX-512 one.
        assert!(!has_avx_vnni() || level() == SimdLevel::Avx2);
        assert!(!has_amx() || level() == SimdLevel::Avx512);
        assert!(!has_avx_vnni() || avx_vnni_detected());
        let label = label();
        assert!(["scalar", "avx2", "avxvnni", "avx512", "amx"].contains(&label), "{label}");
    }
}
