//! The CUDA backend. The CUDA libraries are loaded at run time (cudarc's dynamic loading), so
//! the library builds and loads on machines without them; `open` says `NoDevice` there.
//!
//! Kernels (`kernels/*.cu`) are compiled by NVRTC for the device's exact architecture and cached
//! (`compile`); a launch (`launch`) holds the uploaded work list and runs on the caller's stream
//! with the caller's pointers, pushing the device's primary context around every call.

// Implementation details: the public face of this backend is `CudaBackend` (and the `Backend`
// trait); the workspace's tests reach the rest through `crate::testing`.
pub(crate) mod calibrate;
// Reachable only through `testing`. A few of its items have no doc comment yet; they are left
// for whoever next edits compile.rs (concurrent work there), hence the allow.
#[allow(missing_docs)]
pub(crate) mod compile;
pub(crate) mod driver;
pub(crate) mod kv;
pub(crate) mod kv_memory;
pub(crate) mod launch;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys;
use parking_lot::Mutex;

use self::compile::{KernelCache, Unit, Variant};
use self::driver::{Device, Module};
use super::{Backend, BackendChoice, BackendKind, BoundPlan, LaunchCapacity, Scratch};
use crate::error::{Error, Result};
use crate::plan::{DeviceProfile, Plan};
use crate::types::{Batch, DType, Shape};

/// Checks that the driver and NVRTC can be loaded and that `ordinal` exists.
pub(crate) fn probe(ordinal: u32) -> Result<()> {
    // The driver first: without a device there is no reason to load NVRTC (a large C++ library
    // whose load-time allocations would outlive it).
    Device::open(ordinal)?;
    compile::require_nvrtc()
}

/// `Unsupported` unless the attention kernels take `head_dim` and `dtype`.
pub(crate) fn check_kernel_shape(head_dim: u32, dtype: DType) -> Result<()> {
    if !compile::HEAD_DIMS.contains(&head_dim) {
        return Err(crate::unsupported!("head_dim = {head_dim} is not supported by the CUDA kernels (64, 96, 128, 192, 256)"));
    }
    if !compile::DTYPES.contains(&dtype) {
        return Err(crate::unsupported!("dtype = {} is not supported by the CUDA kernels (f16, bf16)", dtype.name()));
    }
    Ok(())
}

/// `Unsupported` for a plan the kernels would compute wrongly: a custom mask whose bits the
/// kernels' 32-bit bit offsets cannot address (over 512 MiB), or a custom mask over an fp8 cache
/// (the masked kernel reads 16-bit K/V, the fp8 one applies no mask).
pub(crate) fn check_kernel_plan(shape: &Shape, batch: &Batch) -> Result<()> {
    if batch.has_custom_mask() && shape.kv_dtype == DType::Fp8E4m3 {
        return Err(crate::unsupported!(
            "the batch has a custom mask and kv_dtype = {}: the CUDA kernels do not apply custom masks over fp8 caches yet (the CPU backend does)",
            shape.kv_dtype.name()
        ));
    }
    if !mask_addressable(batch.custom_mask.len()) {
        return Err(crate::unsupported!(
            "the batch's custom mask has {} bytes; the CUDA kernels address at most 2^32 mask bits (512 MiB)",
            batch.custom_mask.len()
        ));
    }
    Ok(())
}

/// Whether the kernels' 32-bit bit offsets reach every bit of a custom mask of `bytes` bytes.
fn mask_addressable(bytes: usize) -> bool {
    bytes as u64 * 8 <= 1u64 << 32
}

/// Opens the CUDA backend on `choice.device_ordinal`.
pub(crate) fn open(choice: &BackendChoice) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(CudaBackend::new(choice)?))
}

/// The attention module of one variant, loaded into the context.
pub(crate) struct LoadedAttention {
    /// Rows of a tile (16 per warp) and threads of a CTA.
    pub block_m: u32,
    pub threads: u32,
    pub attention: sys::CUfunction,
    pub merge: sys::CUfunction,
    pub smem_bytes: u32,
    /// Keys per inner step, and whether this is the warp-specialised kernel (which copies runs
    /// of consecutive K/V rows by TMA, in boxes of `block_n` rows).
    pub block_n: u32,
    pub warp_specialized: bool,
    /// Whether the kernel moves whole one-request Q and O tiles by TMA (`Unit::qo_tma`).
    pub qo_tma: bool,
    /// Attention CTAs resident per SM (from the occupancy calculator); the grid is SMs × this.
    pub ctas_per_sm: u32,
    pub registers: i32,
    pub local_bytes: i32,
    _module: Module,
}

// SAFETY: function handles of a module this value owns, of a context every use makes current.
unsafe impl Send for LoadedAttention {}
// SAFETY: `&LoadedAttention` only reads the handles; launching a function concurrently is allowed.
unsafe impl Sync for LoadedAttention {}

/// The KV-maintenance module, loaded into the context.
pub(crate) struct LoadedKv {
    pub append: sys::CUfunction,
    pub copy_pages: sys::CUfunction,
    /// The KV pool's byte moves (`kv_memory`).
    pub scatter_rows: sys::CUfunction,
    pub copy_ranges: sys::CUfunction,
    /// An fp8 pool's writes: rows converted to e4m3 on the way (`KvMemory::write_rows_fp8`).
    pub scatter_rows_fp8: sys::CUfunction,
    _module: Module,
}

// SAFETY: as for LoadedAttention.
unsafe impl Send for LoadedKv {}
// SAFETY: as for LoadedAttention.
unsafe impl Sync for LoadedKv {}

/// What every launch of a context shares. Field order is drop order: modules before the device
/// releases its primary context.
pub(crate) struct Shared {
    attention: Mutex<HashMap<Unit, Arc<LoadedAttention>>>,
    kv: Mutex<Option<Arc<LoadedKv>>>,
    pub cache: KernelCache,
    /// Warps of an attention CTA (16 tile rows each).
    pub tile_warps: u32,
    /// Batches whose query rows see fewer keys than this on average are planned with 64-row
    /// tiles (see `profile_for`).
    pub short_batch_keys: f64,
    /// When attention runs the warp-specialised kernel.
    pub specialize: compile::Specialize,
    pub dev: Device,
}

impl Shared {
    fn is_short(&self, shape: &Shape, batch: &Batch) -> bool {
        crate::plan::cost::mean_visible_keys(batch, shape.causal) < self.short_batch_keys
    }

    /// The attention kernel (variant, warps per CTA) a launch created for `plan` runs; a launch
    /// created with a capacity (`capacity_launch`), whose later plans may differ, never takes the
    /// 4-warp or short-prefill kernels. The one place this choice is made.
    pub(crate) fn kernel_choice(&self, plan: &Plan, capacity_launch: bool) -> (Variant, u32) {
        // Head sizes that are no power of two (96, 192) run the context's 8-warp tiles only: the
        // 4-warp d96 kernel faulted on the H100 (docs/performance-log.md#head-dims-96-192).
        let narrow =
            !capacity_launch && self.tile_warps > 4 && plan.shape.head_dim.is_power_of_two() && plan.items.iter().all(|i| i.num_rows <= 64);
        let short = narrow && self.is_short(&plan.shape, &plan.batch);
        let variant = match self.specialize {
            // fp8 caches have one kernel, chosen by the plan's kv_dtype (fixed at plan time).
            _ if plan.shape.kv_dtype == DType::Fp8E4m3 => Variant::PlainFp8,
            compile::Specialize::Always => Variant::WarpSpecialized,
            compile::Specialize::Auto if short => Variant::ShortPrefill,
            compile::Specialize::Auto if !narrow && suits_warp_specialized(&plan.shape, &plan.batch) => Variant::WarpSpecialized,
            _ => Variant::Plain,
        };
        (variant, if narrow { 4 } else { self.tile_warps })
    }
    /// The attention kernels for (head_dim, dtype) with the context's tile size.
    pub fn attention(&self, head_dim: u32, dtype: DType) -> Result<Arc<LoadedAttention>> {
        let variant = if self.specialize == compile::Specialize::Always { Variant::WarpSpecialized } else { Variant::Plain };
        self.attention_with(head_dim, dtype, self.tile_warps, variant)
    }

    /// The attention kernels for (head_dim, dtype) with `warps`-warp CTAs of `variant` (the plain
    /// kernel where that variant does not exist): loaded on first use, compiled if not cached.
    pub fn attention_with(&self, head_dim: u32, dtype: DType, warps: u32, variant: Variant) -> Result<Arc<LoadedAttention>> {
        check_kernel_shape(head_dim, dtype)?;
        let unit = Unit::Attention { head_dim, dtype, warps, variant }.built_on(self.cache.arch());
        let mut map = self.attention.lock();
        if let Some(k) = map.get(&unit) {
            return Ok(k.clone());
        }
        let smem = unit.smem_bytes(self.cache.arch());
        if smem > self.dev.max_smem_optin {
            return Err(crate::unsupported!(
                "{} needs {smem} bytes of shared memory; this device allows {}",
                unit.name(),
                self.dev.max_smem_optin
            ));
        }
        let cubin = self.cache.get(unit)?.cubin;
        let _g = self.dev.enter()?;
        let module = Module::load(&self.dev, &cubin, &unit.name())?;
        let attention = module.function("packed_attention")?;
        let merge = module.function("merge_partials")?;
        use cudarc::driver::result::{function, occupancy};
        use sys::CUfunction_attribute::*;
        // SAFETY: valid function handles of a loaded module; the context is current.
        let (ctas_per_sm, registers, local_bytes) = unsafe {
            function::set_function_attribute(attention, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(|e| driver::device_err("cuFuncSetAttribute(max dynamic shared memory)", e))?;
            let ctas = occupancy::max_active_block_per_multiprocessor(attention, unit.threads(self.cache.arch()) as i32, smem as usize)
                .map_err(|e| driver::device_err("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?;
            let regs = function::get_function_attribute(attention, CU_FUNC_ATTRIBUTE_NUM_REGS).unwrap_or(-1);
            let local = function::get_function_attribute(attention, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES).unwrap_or(-1);
            (ctas, regs, local)
        };
        if ctas_per_sm < 1 {
            return Err(Error::Device(format!("{} cannot run on this device: no CTA fits an SM", unit.name())));
        }
        let k = Arc::new(LoadedAttention {
            block_m: 16 * warps,
            threads: unit.threads(self.cache.arch()),
            attention,
            merge,
            smem_bytes: smem,
            block_n: unit.block_n(self.cache.arch()),
            warp_specialized: unit.warp_specialized(self.cache.arch()),
            qo_tma: unit.qo_tma(self.cache.arch()),
            ctas_per_sm: (ctas_per_sm as u32).min(4),
            registers,
            local_bytes,
            _module: module,
        });
        map.insert(unit, k.clone());
        Ok(k)
    }

    pub fn kv(&self) -> Result<Arc<LoadedKv>> {
        let mut slot = self.kv.lock();
        if let Some(k) = slot.as_ref() {
            return Ok(k.clone());
        }
        let cubin = self.cache.get(Unit::Kv)?.cubin;
        let _g = self.dev.enter()?;
        let module = Module::load(&self.dev, &cubin, "kv")?;
        let k = Arc::new(LoadedKv {
            append: module.function("append_kv")?,
            copy_pages: module.function("copy_pages")?,
            scatter_rows: module.function("scatter_rows")?,
            copy_ranges: module.function("copy_ranges")?,
            scatter_rows_fp8: module.function("scatter_rows_fp8")?,
            _module: module,
        });
        *slot = Some(k.clone());
        Ok(k)
    }
}

/// The CUDA backend: one device's primary context, the kernels compiled for it (NVRTC, cached
/// on disk), its cost profile. Open it with [`crate::backend::open`] or [`CudaBackend::new`].
pub struct CudaBackend {
    shared: Arc<Shared>,
    /// The calibrated profile stored beside the kernel cache, if any (read at open, replaced by
    /// `calibrate_profile`).
    stored: Mutex<Option<DeviceProfile>>,
}

impl CudaBackend {
    /// Opens device `choice.device_ordinal`: `NoDevice` with the reason when the driver, NVRTC or
    /// the device is missing.
    pub fn new(choice: &BackendChoice) -> Result<CudaBackend> {
        let dev = Device::open(choice.device_ordinal)?;
        compile::require_nvrtc()?;
        let arch = compile::arch_for(dev.cc.0, dev.cc.1);
        let cache = KernelCache::new(&arch, compile::default_cache_dir(choice.kernel_cache_dir.as_deref()))?;
        let mut b = CudaBackend {
            shared: Arc::new(Shared {
                attention: Mutex::new(HashMap::new()),
                kv: Mutex::new(None),
                cache,
                tile_warps: compile::tile_warps_from_env(),
                short_batch_keys: short_batch_keys_from_env(),
                specialize: compile::specialize_from_env(),
                dev,
            }),
            stored: Mutex::new(None),
        };
        *b.stored.get_mut() = b.stored_profile();
        Ok(b)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    pub(crate) fn device(&self) -> &Device {
        &self.shared.dev
    }

    /// Binds with a concrete type (tests use the grid and capacity).
    ///
    /// A launch made without a capacity (`None`) whose tiles all have at most 64 rows
    /// (decode-heavy batches) runs the 4-warp kernel: two CTAs per SM stream K/V faster there
    /// (docs/performance-log.md#narrow-decode). Launches with a capacity (even an all-zero
    /// one, "the first plan's counts") always run the context's tile size, so any plan within
    /// it can be uploaded later.
    ///
    /// The warp-specialised kernel (Hopper) runs plans that suit it (`suits_warp_specialized`)
    /// where the run's cache allows TMA, unless `PACKINFER_WARP_SPECIALIZED` says always or
    /// never. Either kernel computes any plan, so a plan uploaded later by `update` is right on
    /// whichever the first one chose.
    pub(crate) fn bind_cuda(
        &self,
        plan: Arc<Plan>,
        stream: u64,
        scratch: Option<Scratch>,
        capacity: Option<&LaunchCapacity>,
    ) -> Result<launch::CudaBound> {
        // First: what follows reads the plan's batch, and the kernels trust every index in it.
        plan.check_consistent()?;
        check_kernel_plan(&plan.shape, &plan.batch)?;
        let (variant, warps) = self.shared.kernel_choice(&plan, capacity.is_some());
        if warps == 4 && !plan.shape.head_dim.is_power_of_two() {
            return Err(crate::unsupported!(
                "head_dim = {} runs on 8-warp tiles only, and PACKINFER_TILE_WARPS asks for 4",
                plan.shape.head_dim
            ));
        }
        let kernels = self.shared.attention_with(plan.shape.head_dim, plan.shape.dtype, warps, variant)?;
        // Chosen by the plan, the specialised kernel keeps the plain one at hand for runs whose
        // cache has no row view for TMA (the layout comes with each run).
        let plain = if kernels.warp_specialized && self.shared.specialize == compile::Specialize::Auto {
            Some(self.shared.attention_with(plan.shape.head_dim, plan.shape.dtype, warps, Variant::Plain)?)
        } else {
            None
        };
        // A launch whose plans may carry custom masks keeps the masked kernel of its tile size
        // for them (the others leave the mask code out; an fp8 launch takes no masked plan).
        let capacity_launch = capacity.is_some();
        let capacity = capacity.copied().unwrap_or_default().max(&LaunchCapacity::of(&plan));
        let masked = if capacity.mask_bytes > 0 && plan.shape.kv_dtype != DType::Fp8E4m3 {
            Some(self.shared.attention_with(plan.shape.head_dim, plan.shape.dtype, warps, Variant::Masked)?)
        } else {
            None
        };
        let kernels = launch::Kernels { chosen: kernels, plain, masked, choice: (variant, warps), capacity_launch };
        launch::CudaBound::new(self.shared.clone(), kernels, plan, stream, scratch, &capacity)
    }
}

/// Query rows must see this many keys on average for the warp-specialised kernel to pay off
/// (docs/performance-log.md#warp-specialized-choice).
pub(crate) const SPECIALIZED_MIN_KEYS_PER_ROW: f64 = 1024.0;
/// And this share of consecutive page pairs (its producer copies runs of consecutive K/V rows by
/// TMA; elsewhere by cp.async, which cannot keep its consumers fed).
pub(crate) const SPECIALIZED_MIN_CONSECUTIVE: f64 = 0.9;

/// Whether a batch runs faster on the warp-specialised kernel: prefill rows only (no decodes,
/// whose tiles are mostly empty rows for its 64-row warpgroups), seeing many keys each, over K/V
/// whose pages mostly follow each other (a ragged prefill, or pages allocated in order). Faster
/// there; slower on decode (W2, W4), scattered pages (W3), short prompts (W5) and on steps of
/// chunked prefill beside a few dozen decodes (docs/performance-log.md#warp-specialized-choice).
pub(crate) fn suits_warp_specialized(shape: &Shape, b: &Batch) -> bool {
    let any_decode = (0..b.len()).any(|r| b.q_len(r) == 1);
    if any_decode || crate::plan::cost::mean_visible_keys(b, shape.causal) < SPECIALIZED_MIN_KEYS_PER_ROW {
        return false;
    }
    let (mut pairs, mut consecutive) = (0usize, 0usize);
    for r in 0..b.len() {
        let pages = &b.kv_page_indices[b.kv_indptr[r] as usize..b.kv_indptr[r + 1] as usize];
        pairs += pages.len().saturating_sub(1);
        consecutive += pages.windows(2).filter(|w| w[1] == w[0] + 1).count();
    }
    pairs > 0 && consecutive as f64 >= SPECIALIZED_MIN_CONSECUTIVE * pairs as f64
}

/// `plan::cost::SHORT_BATCH_KEYS_PER_ROW`, unless `PACKINFER_SHORT_BATCH_KEYS` says otherwise (a
/// tuning knob read when a context opens; 0 plans every batch with the context's tile height).
fn short_batch_keys_from_env() -> f64 {
    std::env::var("PACKINFER_SHORT_BATCH_KEYS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(crate::plan::cost::SHORT_BATCH_KEYS_PER_ROW)
}

impl CudaBackend {
    /// Whether a batch is short: its query rows see fewer keys on average than the context's
    /// threshold (`PACKINFER_SHORT_BATCH_KEYS`, default `plan::cost::SHORT_BATCH_KEYS_PER_ROW`).
    fn is_short(&self, shape: &Shape, batch: &Batch) -> bool {
        self.shared.is_short(shape, batch)
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn device_name(&self) -> String {
        self.shared.dev.name.clone()
    }
    fn profile(&self) -> DeviceProfile {
        if let Some(p) = self.stored.lock().as_ref() {
            return p.clone();
        }
        let dev = &self.shared.dev;
        // Uncalibrated: the planner's Hopper defaults, with this kernel's tile height and
        // resident CTAs (one per SM with 8-warp tiles, 255 registers × 256 threads; two with
        // 4-warp tiles). CTAs steal groups, so the count only guides how many groups to form.
        DeviceProfile {
            block_m: 16 * self.shared.tile_warps,
            ..DeviceProfile::hopper(dev.sm_count * if self.shared.tile_warps > 4 { 1 } else { 2 })
        }
    }
    /// Short batches (few keys per query row: short prompts) get 64-row tiles and a worker per
    /// CTA of the short-prefill kernel (`SHORT_PREFILL_CTAS` per SM; the plain 4-warp kernel that
    /// runs them elsewhere holds as many), so that an uncapacitated launch runs several tiles per
    /// SM, whose start-of-tile latencies overlap (see `plan::cost::SHORT_BATCH_KEYS_PER_ROW`).
    fn profile_for(&self, shape: &Shape, batch: &Batch) -> DeviceProfile {
        let p = self.profile();
        if self.is_short(shape, batch) && p.block_m > 64 && shape.group_size() <= 64 {
            DeviceProfile { block_m: 64, num_workers: p.num_workers * compile::SHORT_PREFILL_CTAS, ..p }
        } else {
            p
        }
    }
    fn bind(&self, plan: Arc<Plan>, stream: u64, scratch: Option<Scratch>) -> Result<Box<dyn BoundPlan>> {
        Ok(Box::new(self.bind_cuda(plan, stream, scratch, None)?))
    }
    fn bind_with_capacity(
        &self,
        plan: Arc<Plan>,
        stream: u64,
        scratch: Option<Scratch>,
        capacity: &LaunchCapacity,
    ) -> Result<Box<dyn BoundPlan>> {
        Ok(Box::new(self.bind_cuda(plan, stream, scratch, Some(capacity))?))
    }
    /// One `cuMemAlloc` of `bytes` in the device's primary context, freed when the pool drops.
    fn alloc_kv(&self, bytes: usize) -> Result<Box<dyn super::KvMemory>> {
        Ok(Box::new(kv_memory::DeviceKvMemory::new(self.shared.clone(), bytes)?))
    }
    fn calibrate_profile(&self) -> Result<DeviceProfile> {
        let (profile, _) = self.calibrate()?;
        *self.stored.lock() = Some(profile.clone());
        Ok(profile)
    }
    /// Compiles (or loads from the disk cache) and loads every kernel variant a launch may
    /// pick: both tile sizes (the narrow one serves decode-heavy launches), the warp-specialised
    /// and short-prefill kernels as the context allows, the fp8 kernel, and the KV kernels.
    fn precompile(&self) -> Result<()> {
        use compile::Specialize;
        let warps = if self.shared.tile_warps > 4 { vec![self.shared.tile_warps, 4] } else { vec![4] };
        let variants: Vec<Variant> = match self.shared.specialize {
            Specialize::Auto => Variant::all().to_vec(),
            Specialize::Always => vec![Variant::WarpSpecialized, Variant::Masked, Variant::PlainFp8],
            Specialize::Never => vec![Variant::Plain, Variant::Masked, Variant::PlainFp8],
        };
        // Specialised launches run the context's tile size; short-prefill ones 4 warps. A variant
        // that does not exist here builds the plain kernel (once).
        let arch = self.shared.cache.arch();
        let mut units: Vec<Unit> = Vec::new();
        for w in warps {
            for &v in &variants {
                if (v == Variant::WarpSpecialized && w != self.shared.tile_warps) || (v == Variant::ShortPrefill && w != 4) {
                    continue;
                }
                for unit in Unit::all(w, v) {
                    let built = unit.built_on(arch);
                    if !units.contains(&built) {
                        units.push(built);
                    }
                }
            }
        }
        // Compile in parallel, then load each module (from the cache) on this thread.
        self.shared.cache.prepare(&units)?;
        for unit in units {
            match unit {
                Unit::Attention { head_dim, dtype, warps, variant } => drop(self.shared.attention_with(head_dim, dtype, warps, variant)?),
                Unit::Kv => drop(self.shared.kv()?),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_take_custom_masks_their_bit_offsets_reach() {
        let mut batch = Batch {
            qo_indptr: vec![0, 1],
            kv_indptr: vec![0, 1],
            kv_page_indices: vec![0],
            kv_last_page_len: vec![3],
            page_size: 16,
            num_pages: 1,
            prefix_groups: vec![],
            custom_mask: vec![0b101],
            mask_indptr: vec![0, 1],
        };
        let shape = Shape {
            num_qo_heads: 1,
            num_kv_heads: 1,
            head_dim: 128,
            dtype: DType::Bf16,
            kv_dtype: DType::Bf16,
            causal: true,
            sm_scale: 0.1,
        };
        batch.validate(true).unwrap();
        check_kernel_plan(&shape, &batch).unwrap();
        assert!(mask_addressable(1 << 29));
        assert!(!mask_addressable((1 << 29) + 1));
        batch.custom_mask.clear();
        batch.mask_indptr.clear();
        check_kernel_plan(&shape, &batch).unwrap();
    }

    #[test]
    fn kernels_take_an_fp8_cache() {
        let batch = Batch {
            qo_indptr: vec![0, 1],
            kv_indptr: vec![0, 1],
            kv_page_indices: vec![0],
            kv_last_page_len: vec![3],
            page_size: 16,
            num_pages: 1,
            prefix_groups: vec![],
            custom_mask: vec![],
            mask_indptr: vec![],
        };
        for dtype in [DType::F16, DType::Bf16] {
            let shape =
                Shape { num_qo_heads: 4, num_kv_heads: 1, head_dim: 128, dtype, kv_dtype: DType::Fp8E4m3, causal: true, sm_scale: 0.1 };
            shape.validate().unwrap();
            check_kernel_plan(&shape, &batch).unwrap();
        }
    }
}
