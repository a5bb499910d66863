//! Kernel compilation: the CUDA sources embedded in the binary, compiled by NVRTC into a cubin
//! for one exact architecture, specialised per variant, cached on disk and in memory. Needs no
//! device (only libnvrtc), so CI compiles every variant without a GPU.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::nvrtc::sys as nvrtc;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::types::DType;

/// The shared work-list header (the C mirrors of the plan's and the launch's structs).
pub const WORK_CUH: &str = include_str!("../../../kernels/work.cuh");
/// The attention unit's translation unit: it includes the headers of `HEADERS`.
pub const ATTENTION_CU: &str = include_str!("../../../kernels/attention.cu");
pub const KV_CU: &str = include_str!("../../../kernels/kv.cu");
/// Every kernel header, by the name the sources `#include` it by. NVRTC gets no include path
/// (the sources are embedded in the binary): each program is handed all of them by name, and
/// each is part of every unit's cache key.
pub const HEADERS: [(&str, &str); 10] = [
    ("work.cuh", WORK_CUH),
    ("config.cuh", include_str!("../../../kernels/config.cuh")),
    ("ptx.cuh", include_str!("../../../kernels/ptx.cuh")),
    ("mask.cuh", include_str!("../../../kernels/mask.cuh")),
    ("tile.cuh", include_str!("../../../kernels/tile.cuh")),
    ("softmax.cuh", include_str!("../../../kernels/softmax.cuh")),
    ("attend.cuh", include_str!("../../../kernels/attend.cuh")),
    ("attention_plain.cuh", include_str!("../../../kernels/attention_plain.cuh")),
    ("attention_ws.cuh", include_str!("../../../kernels/attention_ws.cuh")),
    ("merge.cuh", include_str!("../../../kernels/merge.cuh")),
];

/// Warps of an attention CTA, each owning 16 rows of the Q tile (so the planner's `block_m` is
/// 16 × this). 8 unless `PACKINFER_TILE_WARPS` says 4 (a tuning knob read when a context opens):
/// 128-row tiles halve the K/V traffic per FLOP, which prefill needs; 64-row tiles leave two CTAs
/// per SM, which decode prefers (docs/performance-log.md#tile-warps).
pub const DEFAULT_TILE_WARPS: u32 = 8;

/// The tile warps a new context uses.
pub fn tile_warps_from_env() -> u32 {
    match std::env::var("PACKINFER_TILE_WARPS").ok().as_deref() {
        Some("4") => 4,
        Some("8") => 8,
        _ => DEFAULT_TILE_WARPS,
    }
}
/// When a context runs the warp-specialised attention kernel (see `Unit::warp_specialized`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Specialize {
    /// For launches whose plan it suits (`CudaBackend::bind_cuda` says which).
    Auto,
    /// For every launch where it exists (the long-prefill form, also for short batches).
    Always,
    /// Never: every launch runs the plain kernel (short batches too, whose kernel is a
    /// warp-specialised one).
    Never,
}

/// `PACKINFER_WARP_SPECIALIZED=1` (always) or `=0` (never), read when a context opens; auto otherwise.
pub fn specialize_from_env() -> Specialize {
    match std::env::var("PACKINFER_WARP_SPECIALIZED").ok().as_deref() {
        Some("1") => Specialize::Always,
        Some("0") => Specialize::Never,
        _ => Specialize::Auto,
    }
}

/// Attention CTAs per SM of the short-prefill kernel (one consumer warpgroup and a producer
/// each); the planner gives short batches this many workers per SM
/// (docs/performance-log.md#short-prefill-ctas).
pub const SHORT_PREFILL_CTAS: u32 = 2;

/// Head dims the GPU kernels take. 96 (Phi-3) and 192 run the plain kernel with mma.sync
/// everywhere (wgmma and the warp-specialised kernels need multiples of 64 up to 128); 96 is
/// stored in 128-dim shared-memory tiles.
pub const HEAD_DIMS: [u32; 5] = [64, 96, 128, 192, 256];

/// Whether the wgmma kernels (and so the warp-specialised ones) exist for `head_dim` on Hopper:
/// whole 64-dim column blocks, accumulators that fit beside 64-key blocks (config.cuh).
fn wgmma_head_dim(head_dim: u32) -> bool {
    head_dim <= 128 && head_dim.is_multiple_of(64)
}
/// Element types the GPU kernels take.
pub const DTYPES: [DType; 2] = [DType::F16, DType::Bf16];

/// Which attention kernel a unit builds (one `packed_attention` per module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Every warp loads and computes (any architecture, head_dim, tile size).
    Plain,
    /// A producer warpgroup feeds consumer warpgroups through mbarriers, by TMA where K/V rows
    /// are consecutive (Hopper, head_dim <= 128): long prefills.
    WarpSpecialized,
    /// The warp-specialised kernel with one consumer warpgroup: 64-row tiles over 32-key blocks
    /// in rings of four, `SHORT_PREFILL_CTAS` CTAs per SM, whole one-request Q and O tiles moved
    /// by TMA (Hopper, head_dim <= 128): batches of short prompts, whose tiles wait on memory more
    /// than they compute; faster on them than the plain 4-warp kernel it replaced
    /// (docs/performance-log.md#short-prefill-ctas).
    ShortPrefill,
    /// The plain kernel that also applies custom masks (`PI_CUSTOM_MASK`): a launch whose plans
    /// may carry masks runs it for them. Built apart so the other kernels' code, and their
    /// registers, are what they were without masks (the mask test made the plain 8-warp kernel
    /// spill).
    Masked,
    /// The plain kernel over K/V caches of fp8 e4m3 codes (`-DPI_KV_FP8=1`, any architecture and
    /// head_dim): blocks are copied as bytes, half those of a 16-bit cache, and converted to Q's
    /// type in shared memory before the MMAs. Plans with an fp8 cache run it, and only it.
    PlainFp8,
}

impl Variant {
    pub fn all() -> [Variant; 5] {
        [Variant::Plain, Variant::WarpSpecialized, Variant::ShortPrefill, Variant::Masked, Variant::PlainFp8]
    }
}

/// One compiled module: what it is specialised for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// `packed_attention` + `merge_partials` for one head_dim, dtype, CTA size (warps) and
    /// variant; a variant that does not exist for the rest is the plain kernel (`variant_on`).
    Attention { head_dim: u32, dtype: DType, warps: u32, variant: Variant },
    /// `append_kv` + `copy_pages` (element-type agnostic 16-bit moves).
    Kv,
}

impl Unit {
    /// Every unit a CUDA context with `warps`-warp attention CTAs of `variant` can need.
    pub fn all(warps: u32, variant: Variant) -> Vec<Unit> {
        let mut v: Vec<Unit> = HEAD_DIMS
            .iter()
            .flat_map(|&d| DTYPES.iter().map(move |&t| Unit::Attention { head_dim: d, dtype: t, warps, variant }))
            .collect();
        v.push(Unit::Kv);
        v
    }

    pub fn name(&self) -> String {
        match self {
            Unit::Attention { head_dim, dtype, warps, variant } => {
                let suffix = match variant {
                    Variant::Plain => "",
                    Variant::WarpSpecialized => "-ws",
                    Variant::ShortPrefill => "-short",
                    Variant::Masked => "-mask",
                    Variant::PlainFp8 => "-fp8",
                };
                format!("attention-d{head_dim}-{}-w{warps}{suffix}", dtype.name())
            }
            Unit::Kv => "kv".into(),
        }
    }

    /// Keys per inner step: 128 in the 8-warp warp-specialised kernel (its consumers then issue
    /// half the per-block instructions per key: the output rescale, descriptors, barrier waits),
    /// 32 in the short-prefill kernel and above head_dim 128 (192, 256) (so the K/V stages and the accumulators
    /// fit), 64 elsewhere (docs/performance-log.md#block-n-stages).
    pub fn block_n(&self, arch: &str) -> u32 {
        match *self {
            Unit::Attention { warps: 8, .. } if self.warp_specialized(arch) => 128,
            Unit::Attention { .. } if self.variant_on(arch) == Variant::ShortPrefill => 32,
            Unit::Attention { head_dim, .. } if head_dim > 128 => 32,
            _ => 64,
        }
    }

    /// Whether this unit is the warp-specialised kernel: asked for, on Hopper at head_dim <= 128
    /// (where wgmma runs). A producer warpgroup streams the tiles to the `warps` consumer warps
    /// through mbarriers, by TMA where K/V rows are consecutive.
    pub fn warp_specialized(&self, arch: &str) -> bool {
        matches!(self.variant_on(arch), Variant::WarpSpecialized | Variant::ShortPrefill)
    }

    /// The variant this unit builds on `arch`: the one asked for where it exists (Hopper,
    /// head_dim <= 128; the short-prefill kernel with 4 warps), else the plain kernel. The fp8
    /// kernel exists everywhere.
    pub fn variant_on(&self, arch: &str) -> Variant {
        match *self {
            Unit::Attention { variant: Variant::Masked, .. } => Variant::Masked,
            Unit::Attention { variant: Variant::PlainFp8, .. } => Variant::PlainFp8,
            Unit::Attention { head_dim, warps, variant, .. } => {
                let exists = arch == "sm_90a"
                    && wgmma_head_dim(head_dim)
                    && match variant {
                        Variant::ShortPrefill => warps == 4,
                        _ => true,
                    };
                if exists {
                    variant
                } else {
                    Variant::Plain
                }
            }
            Unit::Kv => Variant::Plain,
        }
    }

    /// Whether the kernel moves whole one-request Q and O tiles by TMA: the short-prefill
    /// kernel, whose tiles wait on memory; the plain kernels got slower with it
    /// (docs/performance-log.md#qo-tma).
    pub fn qo_tma(&self, arch: &str) -> bool {
        self.variant_on(arch) == Variant::ShortPrefill
    }

    /// The unit that is built for this one on `arch`: the same with `variant_on`'s variant (one
    /// cache entry and one compile per kernel actually built).
    pub fn built_on(&self, arch: &str) -> Unit {
        match *self {
            Unit::Attention { head_dim, dtype, warps, .. } => Unit::Attention { head_dim, dtype, warps, variant: self.variant_on(arch) },
            Unit::Kv => Unit::Kv,
        }
    }

    /// Threads of an attention CTA: 32 per warp, and the producer warpgroup where there is one.
    pub fn threads(&self, arch: &str) -> u32 {
        match *self {
            Unit::Attention { warps, .. } => 32 * warps + if self.warp_specialized(arch) { 128 } else { 0 },
            Unit::Kv => 256,
        }
    }

    /// K/V stages of the shared-memory ring(s). The warp-specialised kernel: two per ring (of
    /// 128 keys with 8 warps; of 64 with 4, which keeps two CTAs per SM beside two Q slots),
    /// four of 32 keys in the short-prefill kernel (two did as well). Otherwise five for
    /// the 8-warp wgmma kernel on Hopper (its pipelined loop keeps three blocks of loads in
    /// flight, and a stage is refilled only after the PV that read it has finished); two
    /// elsewhere: the 4-warp kernel keeps two CTAs per SM that way, head_dim 256 has no room,
    /// and sm_80 is not measured. Measurements: docs/performance-log.md#block-n-stages.
    /// The fp8 kernel's ring holds bytes (half a 16-bit stage each): three stages up to head_dim
    /// 128 keep two 4-warp CTAs per SM, two above (unmeasured: docs/performance-log.md#fp8-kernels).
    pub fn stages(&self, arch: &str) -> u32 {
        match *self {
            Unit::Attention { head_dim, variant: Variant::PlainFp8, .. } if head_dim <= 128 => 3,
            Unit::Attention { variant: Variant::PlainFp8, .. } => 2,
            Unit::Attention { .. } if self.variant_on(arch) == Variant::ShortPrefill => 4,
            Unit::Attention { .. } if self.warp_specialized(arch) => 2,
            Unit::Attention { head_dim, warps: 8, .. } if arch == "sm_90a" && wgmma_head_dim(head_dim) => 5,
            _ => 2,
        }
    }

    /// Dynamic shared memory an attention launch asks for: the kernel's struct plus 1024 bytes,
    /// so that it can start its swizzled tiles on a 1024-byte boundary wherever the base lands.
    pub fn smem_bytes(&self, arch: &str) -> u32 {
        self.smem_struct_bytes(arch) + 1024
    }

    /// The attention kernel's shared-memory struct (`Smem` in `kernels/attention_plain.cuh` and
    /// `kernels/attention_ws.cuh`, which assert the same):
    /// the Q tile and the K/V stages (swizzled, no padding), then the row table (24 bytes a
    /// row), the segment table (16 bytes a row), the next work item (32 bytes), and the drawn group
    /// number padded to 16 bytes. The warp-specialised kernel has two item
    /// slots (Q tile, row table, 16 chunks of 24 bytes, the 32-byte item), one segment table,
    /// 8-byte mbarriers (two per slot, four per stage) and 16 bytes of flags.
    fn smem_struct_bytes(&self, arch: &str) -> u32 {
        match *self {
            Unit::Attention { head_dim, warps, .. } => {
                // Tiles are whole 64-dim column blocks (PI_HEAD_DIM_TILE in config.cuh).
                let head_dim = head_dim.next_multiple_of(64);
                let block_m = 16 * warps;
                let stages = self.stages(arch);
                let kv = if self.variant_on(arch) == Variant::PlainFp8 {
                    // One converted 16-bit K and V block, and the stages of bytes.
                    2 * self.block_n(arch) * head_dim * 2 + 2 * stages * self.block_n(arch) * head_dim
                } else {
                    2 * stages * self.block_n(arch) * head_dim * 2
                };
                if self.warp_specialized(arch) {
                    2 * (block_m * head_dim * 2 + block_m * 24 + 16 * 24 + 32) + kv + block_m * 16 + 8 * (4 + 4 * stages) + 16
                } else {
                    block_m * head_dim * 2 + kv + block_m * (24 + 16) + 32 + 16
                }
            }
            Unit::Kv => 0,
        }
    }

    /// The translation unit NVRTC compiles (with `HEADERS`).
    fn source(&self) -> &'static str {
        match self {
            Unit::Attention { .. } => ATTENTION_CU,
            Unit::Kv => KV_CU,
        }
    }

    fn defines(&self, arch: &str) -> Vec<String> {
        match *self {
            Unit::Attention { head_dim, dtype, warps, .. } => {
                let mut d = vec![
                    format!("-DPI_HEAD_DIM={head_dim}"),
                    format!("-DPI_BF16={}", (dtype == DType::Bf16) as u32),
                    format!("-DPI_BLOCK_N={}", self.block_n(arch)),
                    format!("-DPI_WARPS={warps}"),
                    format!("-DPI_STAGES={}", self.stages(arch)),
                    format!("-DPI_SMEM_BYTES={}", self.smem_struct_bytes(arch)),
                    format!("-DPI_WS={}", self.warp_specialized(arch) as u32),
                    format!("-DPI_QO_TMA={}", self.qo_tma(arch) as u32),
                ];
                // Only where set: the 16-bit kernels' options (and cache keys) stay as they were.
                match self.variant_on(arch) {
                    Variant::PlainFp8 => d.push("-DPI_KV_FP8=1".into()),
                    Variant::Masked => d.push("-DPI_CUSTOM_MASK=1".into()),
                    _ => {}
                }
                d
            }
            Unit::Kv => vec![],
        }
    }
}

/// The NVRTC architecture for a compute capability: the arch-specific target on Hopper (so
/// wgmma/TMA are available), the plain one elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// A compiled unit.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Arc<Vec<u8>>,
    /// NVRTC's program log (ptxas' register/spill report among it); empty for a cache hit.
    pub log: String,
    pub from_disk: bool,
}

/// Whether libnvrtc can be loaded (checked before any cudarc NVRTC call, which would panic).
pub fn nvrtc_present() -> bool {
    // SAFETY: only dlopens the library.
    unsafe { nvrtc::is_culib_present() }
}

/// `NoDevice` when libnvrtc cannot be loaded.
pub fn require_nvrtc() -> Result<()> {
    if nvrtc_present() {
        Ok(())
    } else {
        Err(Error::NoDevice("the NVRTC library (libnvrtc.so) could not be loaded on this machine".into()))
    }
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let r = unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::NoDevice(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

fn options(unit: Unit, arch: &str) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture={arch}"), "-std=c++17".into(), "--ptxas-options=-v".into(), "-lineinfo".into()];
    o.extend(unit.defines(arch));
    // Development knob for kernel experiments (e.g. "-DPI_Q_REGS=0"); part of the cache key.
    if let Ok(extra) = std::env::var("PACKINFER_KERNEL_DEFINES") {
        o.extend(extra.split_whitespace().filter(|d| d.starts_with("-D")).map(String::from));
    }
    o
}

/// FNV-1a, 64 bits: a hash that is the same in every build (std's hasher promises no stability).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The cache file name of `unit` for `arch`: keyed by the source, every header, the options and
/// NVRTC's version, so any change to one of them is a different file.
pub fn cache_file_name(unit: Unit, arch: &str, nvrtc: (i32, i32)) -> String {
    let key = cache_key(unit.source(), &HEADERS, &options(unit, arch), nvrtc);
    format!("{}-{arch}-nvrtc{}.{}-{key:016x}.cubin", unit.name(), nvrtc.0, nvrtc.1)
}

fn cache_key(source: &str, headers: &[(&str, &str)], options: &[String], nvrtc: (i32, i32)) -> u64 {
    let opts = options.join(" ");
    let version = format!("{}.{}", nvrtc.0, nvrtc.1);
    let mut parts: Vec<&[u8]> = vec![source.as_bytes()];
    for (name, text) in headers {
        parts.extend([name.as_bytes(), text.as_bytes()]);
    }
    parts.extend([opts.as_bytes(), version.as_bytes()]);
    fnv1a(&parts)
}

/// Compiles `unit` for `arch` with NVRTC. A compile error is [`Error::Compile`] with the log.
pub fn compile(unit: Unit, arch: &str) -> Result<Compiled> {
    compile_with(&unit.name(), unit.source(), &options(unit, arch), arch)
}

/// Compiles a free-standing source (tests' layout probes) with the common options; it may
/// include the kernel headers.
pub fn compile_source(name: &str, source: &str, arch: &str) -> Result<Compiled> {
    let opts = vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()];
    compile_with(name, source, &opts, arch)
}

fn compile_with(unit_name: &str, source: &str, options: &[String], arch: &str) -> Result<Compiled> {
    nvrtc_version()?;
    let src = CString::new(source).map_err(|_| Error::Internal("kernel source contains a NUL byte".into()))?;
    let name = CString::new(format!("{unit_name}.cu")).unwrap();
    let opts: Vec<CString> = options.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let header_names: Vec<CString> = HEADERS.iter().map(|(n, _)| CString::new(*n).unwrap()).collect();
    let header_texts: Vec<CString> = HEADERS
        .iter()
        .map(|(n, t)| CString::new(*t).map_err(|_| Error::Internal(format!("kernel header {n} contains a NUL byte"))))
        .collect::<Result<_>>()?;
    let name_ptrs: Vec<*const std::ffi::c_char> = header_names.iter().map(|n| n.as_ptr()).collect();
    let text_ptrs: Vec<*const std::ffi::c_char> = header_texts.iter().map(|t| t.as_ptr()).collect();
    let check = |r: nvrtc::nvrtcResult, what: &str| {
        if r == nvrtc::nvrtcResult::NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(Error::Compile(format!("{what} failed for {unit_name} ({arch}): {r:?}")))
        }
    };
    let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: the strings outlive the program, which is destroyed below on every path.
    unsafe {
        check(
            nvrtc::nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), HEADERS.len() as i32, text_ptrs.as_ptr(), name_ptrs.as_ptr()),
            "nvrtcCreateProgram",
        )?;
        let compiled = nvrtc::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let mut log_size = 0usize;
        let mut log = String::new();
        if nvrtc::nvrtcGetProgramLogSize(prog, &mut log_size) == nvrtc::nvrtcResult::NVRTC_SUCCESS && log_size > 1 {
            let mut buf = vec![0u8; log_size];
            if nvrtc::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut _) == nvrtc::nvrtcResult::NVRTC_SUCCESS {
                log = String::from_utf8_lossy(&buf[..log_size - 1]).into_owned();
            }
        }
        let result = (|| {
            if compiled != nvrtc::nvrtcResult::NVRTC_SUCCESS {
                return Err(Error::Compile(format!("NVRTC could not compile {unit_name} for {arch} ({compiled:?}):\n{log}")));
            }
            let mut size = 0usize;
            check(nvrtc::nvrtcGetCUBINSize(prog, &mut size), "nvrtcGetCUBINSize")?;
            let mut cubin = vec![0u8; size];
            check(nvrtc::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _), "nvrtcGetCUBIN")?;
            Ok(Compiled { cubin: Arc::new(cubin), log: log.clone(), from_disk: false })
        })();
        nvrtc::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// Where compiled kernels are kept: the directory given, else `$PACKINFER_CACHE_DIR`, else
/// `$HOME/.cache/packinfer`; `None` when none of those exists (memory cache only).
pub fn default_cache_dir(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = given {
        return Some(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("PACKINFER_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(d.into());
    }
    std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| PathBuf::from(h).join(".cache/packinfer"))
}

/// Compiled cubins of one architecture, in memory and on disk.
pub struct KernelCache {
    arch: String,
    nvrtc: (i32, i32),
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<Unit, Arc<Vec<u8>>>>,
}

impl KernelCache {
    pub fn new(arch: &str, dir: Option<PathBuf>) -> Result<KernelCache> {
        Ok(KernelCache { arch: arch.into(), nvrtc: nvrtc_version()?, dir, memory: Mutex::new(HashMap::new()) })
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The cubin of `unit`: from memory, else from disk, else compiled (and written to disk; a
    /// disk that cannot be written only costs the next process a compile).
    pub fn get(&self, unit: Unit) -> Result<Compiled> {
        if let Some(c) = self.memory.lock().get(&unit) {
            return Ok(Compiled { cubin: c.clone(), log: String::new(), from_disk: false });
        }
        let path = self.dir.as_ref().map(|d| d.join(cache_file_name(unit, &self.arch, self.nvrtc)));
        let compiled = match path.as_ref().and_then(|p| std::fs::read(p).ok()).filter(|b| !b.is_empty()) {
            Some(bytes) => Compiled { cubin: Arc::new(bytes), log: String::new(), from_disk: true },
            None => {
                let c = compile(unit, &self.arch)?;
                if let Some(p) = &path {
                    write_atomically(p, &c.cubin);
                }
                c
            }
        };
        self.memory.lock().insert(unit, compiled.cubin.clone());
        Ok(compiled)
    }

    /// Makes every unit of `units` cached (`get`), compiling the missing ones on up to one
    /// thread per core: NVRTC compiles separate programs concurrently, so a context's
    /// `precompile` waits for about the longest compiles rather than their sum. The first error
    /// is returned once every thread has finished.
    pub fn prepare(&self, units: &[Unit]) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, units.len().max(1));
        let next = AtomicUsize::new(0);
        let first_error = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while let Some(&unit) = units.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if let Err(e) = self.get(unit) {
                            first_error.lock().get_or_insert(e);
                        }
                    }
                });
            }
        });
        first_error.into_inner().map_or(Ok(()), Err)
    }
}

/// Writes through a temporary file and a rename, so a concurrent reader never sees half a cubin.
/// The temporary name is unique per call (process id and a counter): two threads of one process
/// writing the same unit must not share one.
fn write_atomically(path: &Path, bytes: &[u8]) {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.{}.{n}.tmp", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names a source includes (`#include "name"`).
    fn includes(text: &str) -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.trim_start().strip_prefix("#include"))
            .map(|rest| rest.trim().trim_start_matches('"').split('"').next().unwrap())
            .collect()
    }

    /// NVRTC finds a header only by the exact name it is handed, so every include must name one
    /// of `HEADERS`, and every header must be reached from a translation unit (else it is dead,
    /// yet still part of every cache key).
    #[test]
    fn every_include_names_a_header_and_every_header_is_included() {
        let known: Vec<&str> = HEADERS.iter().map(|(n, _)| *n).collect();
        let mut reached: Vec<&str> = Vec::new();
        let mut todo: Vec<&str> = [ATTENTION_CU, KV_CU].into_iter().flat_map(includes).collect();
        while let Some(name) = todo.pop() {
            assert!(known.contains(&name), "#include \"{name}\" names no entry of compile::HEADERS");
            if !reached.contains(&name) {
                reached.push(name);
                todo.extend(includes(HEADERS.iter().find(|(n, _)| *n == name).unwrap().1));
            }
        }
        for name in known {
            assert!(reached.contains(&name), "{name} is in compile::HEADERS but no kernel source includes it");
        }
    }

    /// A change to any one header is a different cache file, for every unit.
    #[test]
    fn cache_key_covers_every_header() {
        let opts = vec!["-DPI_HEAD_DIM=128".to_string()];
        let base = cache_key(ATTENTION_CU, &HEADERS, &opts, (13, 0));
        for i in 0..HEADERS.len() {
            let mut changed = HEADERS;
            let text = format!("{} ", HEADERS[i].1);
            changed[i].1 = &text;
            assert_ne!(cache_key(ATTENTION_CU, &changed, &opts, (13, 0)), base, "{} is not in the key", HEADERS[i].0);
            assert_ne!(
                cache_key(KV_CU, &changed, &[], (13, 0)),
                cache_key(KV_CU, &HEADERS, &[], (13, 0)),
                "{} is not in the kv key",
                HEADERS[i].0
            );
        }
    }
}
