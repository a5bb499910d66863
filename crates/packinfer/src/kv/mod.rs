//! The managed KV pool: the library owns the KV cache. A pool is one allocation from the
//! context's backend, cut into pages of `page_size` tokens (every KV head, every layer);
//! sequences own lists of pages, share full pages copy-on-write (fork, reference counts), and
//! the plan of a step is derived from them (page tables, prefix groups). `layout` keeps each
//! execution group's pages in one run ("group-contiguous KV").
//!
//! Memory layout, in elements of the pool's K/V dtype (`shape.kv_dtype`):
//! `[layer][K | V][page][token in page][kv head][dim]`, i.e. per layer and per K/V an NHD cache;
//! a pool of fp8 K/V then keeps its dequantization scales, `[layer][K | V][kv head]` f32, after
//! the pages.
//! NHD rather than HND because the step's new K/V arrive token-major `[tokens, kv_heads,
//! head_dim]`: a token's row is one contiguous copy into its slot (slot = page * page_size +
//! token), and a page of one layer's K is one contiguous block, so moving a page is `2 * layers`
//! block copies. Layers are outermost so a group's run of pages is also contiguous memory within
//! each layer, which is what the kernel streams.
//!
//! Thread safety: every mutation takes the pool's mutex; a plan made from the pool is an owned
//! snapshot (page numbers copied), so reading it needs no lock.

mod batch;
mod layout;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::{Backend, KvMemory, RowConversion};
use crate::error::{Error, Result};
use crate::invalid;
use crate::plan::{Plan, PlanOptions};
use crate::types::{DType, KvLayout, KvScales, Shape};

pub use layout::{groups_of_plan, RelayoutReport};

/// Identifies a sequence of a pool. Ids are never reused, so a released id stays invalid.
pub type SeqId = u64;

/// What a pool is created with. The attention shape is the model's (query heads, mask and scale
/// included), so a plan made from the pool needs nothing but the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfig {
    /// Layers the pool holds K and V for.
    pub num_layers: u32,
    /// `sm_scale` 0 = `1/sqrt(head_dim)`.
    pub shape: Shape,
    /// Tokens per page.
    pub page_size: u32,
    /// Pages of the pool (every layer's K and V of `page_size` tokens each).
    pub num_pages: u32,
    /// δ: empty pages each member of a laid-out group keeps after its last page for future tokens.
    pub headroom_pages: u32,
}

impl PoolConfig {
    /// Bytes of one page across all layers, K and V.
    pub fn page_bytes_all_layers(&self) -> u64 {
        self.page_bytes() * 2 * self.num_layers as u64
    }
    /// Bytes of one page of one layer's K (or V).
    pub fn page_bytes(&self) -> u64 {
        self.page_size as u64 * self.row_bytes()
    }
    /// Bytes of one token's K (or V) row in one layer: `kv_heads * head_dim` elements of the
    /// K/V dtype (1 byte each in an fp8 pool).
    pub fn row_bytes(&self) -> u64 {
        self.shape.num_kv_heads as u64 * self.shape.head_dim as u64 * self.shape.kv_dtype.size_bytes() as u64
    }
    /// Bytes of the scales an fp8 pool keeps after its pages (`num_layers × 2 × num_kv_heads`
    /// f32); 0 for a pool of Q's dtype.
    pub fn scale_bytes(&self) -> u64 {
        if self.shape.kv_dtype == DType::Fp8E4m3 {
            self.num_layers as u64 * 2 * self.shape.num_kv_heads as u64 * 4
        } else {
            0
        }
    }
    /// Bytes of one token's K and V over all layers.
    pub fn token_bytes_all_layers(&self) -> u64 {
        self.row_bytes() * 2 * self.num_layers as u64
    }
    /// Pages that fit in `bytes` (for pools sized in bytes), beside the scales of an fp8 pool.
    pub fn pages_for_bytes(&self, bytes: u64) -> u64 {
        bytes.saturating_sub(self.scale_bytes()).checked_div(self.page_bytes_all_layers()).unwrap_or(0)
    }
    /// The shape plans are made with: `shape`, its scale resolved.
    pub fn shape(&self) -> Shape {
        let s = self.shape;
        Shape { sm_scale: if s.sm_scale == 0.0 { Shape::default_sm_scale(s.head_dim) } else { s.sm_scale }, ..s }
    }

    /// Checks the configuration and returns the pool's size in bytes.
    pub fn validate(&self) -> Result<u64> {
        if self.num_layers == 0 {
            return Err(invalid!("num_layers = 0; a pool holds at least one layer"));
        }
        if self.page_size == 0 {
            return Err(invalid!("page_size = 0; pages hold at least one token"));
        }
        if self.num_pages == 0 {
            return Err(invalid!(
                "num_pages = 0 (or capacity_bytes smaller than one page of {} bytes); a pool needs at least one page",
                self.page_bytes_all_layers()
            ));
        }
        if self.num_pages > i32::MAX as u32 {
            return Err(invalid!("num_pages = {} is more than the int32 page tables can address", self.num_pages));
        }
        if self.headroom_pages > self.num_pages {
            return Err(invalid!("headroom_pages = {} is more than the pool's {} pages", self.headroom_pages, self.num_pages));
        }
        self.shape().validate()?;
        (self.num_pages as u64)
            .checked_mul(self.page_bytes_all_layers())
            .and_then(|b| b.checked_add(self.scale_bytes()))
            .filter(|&b| b <= isize::MAX as u64)
            .ok_or_else(|| {
                invalid!("num_pages = {} pages of {} bytes overflow the address space", self.num_pages, self.page_bytes_all_layers())
            })
    }
}

/// A pool's counters, for the C API's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PoolStats {
    /// Pages of the pool.
    pub num_pages: u32,
    /// Pages some sequence holds (its tokens or its headroom).
    pub pages_used: u32,
    /// Pages no sequence holds.
    pub pages_free: u32,
    /// Live sequences.
    pub num_sequences: u32,
    /// Tokens of all sequences, a shared token counted once per sequence.
    pub tokens_logical: u64,
    /// Distinct stored tokens (a shared page's tokens counted once).
    pub tokens_stored: u64,
    /// Slots in used pages holding no token (partial last pages and headroom): internal fragmentation.
    pub slots_reserved_unused: u64,
    /// KV bytes (all layers, K and V) the last plan made from this pool reads, with prefix
    /// sharing (each shared prefix once per prefix group) and without (every request its own).
    pub step_read_bytes_shared: u64,
    /// See `step_read_bytes_shared`.
    pub step_read_bytes_unshared: u64,
    /// Relayouts that moved at least one page, and the pages and bytes they moved.
    pub relayouts: u64,
    /// See `relayouts`.
    pub relayout_pages_moved: u64,
    /// See `relayouts`.
    pub relayout_bytes_moved: u64,
    /// Pages copied because a sequence wrote into a page it shared (fork, truncate).
    pub cow_page_copies: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Sequence {
    /// Pages holding tokens `0..len`, `ceil(len / page_size)` of them.
    pub pages: Vec<u32>,
    /// Headroom: private empty pages, in order, that the next appends fill before allocating.
    pub reserved: Vec<u32>,
    pub len: u32,
    /// Placed by a relayout and not moved out of its run since.
    pub laid_out: bool,
    /// Laid out, then had to take a page outside its run (its headroom ran out).
    pub overflowed: bool,
}

/// Page bookkeeping and sequences; everything behind the pool's mutex.
#[derive(Debug, Clone)]
pub(crate) struct PoolState {
    /// Number of page-table references to each page (sequences' pages plus reserved pages).
    pub refcount: Vec<u32>,
    /// Pages with refcount 0, ordered so the allocator takes the lowest and finds runs.
    pub free: BTreeSet<u32>,
    pub seqs: BTreeMap<SeqId, Sequence>,
    pub next_id: SeqId,
    /// Content hash of a full page (the engine's, see `register_page_hashes`) -> that page.
    pub page_by_hash: std::collections::HashMap<u64, u32>,
    pub hash_of_page: std::collections::HashMap<u32, u64>,
    pub stats: PoolStats,
    pub page_size: u32,
    pub headroom_pages: u32,
    /// `fill_batch`'s buffers: batches are built under the pool's lock.
    pub(crate) batch_scratch: batch::BatchScratch,
}

/// A KV pool: configuration, its memory, and its state behind a mutex.
pub struct KvPool {
    config: PoolConfig,
    memory: Box<dyn KvMemory>,
    state: Mutex<PoolState>,
    /// Keeps the backend that allocated `memory` alive as long as the pool.
    backend: Arc<dyn Backend>,
    /// Bumped by every relayout that moves pages: plans made before it are stale. A relayout
    /// holds it (write) while it moves pages; a CPU run of a plan from the pool holds it (read)
    /// while it reads them (`Plan::pin_layout`).
    layout_generation: Arc<parking_lot::RwLock<u64>>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool").field("config", &self.config).finish_non_exhaustive()
    }
}

impl KvPool {
    /// Validates `config` and allocates the pool's memory once from `backend`. A pool of fp8
    /// K/V gets scales 1 ([`KvPool::with_scales`] sets others).
    pub fn new(backend: Arc<dyn Backend>, config: PoolConfig) -> Result<KvPool> {
        KvPool::with_scales(backend, config, &[])
    }

    /// [`KvPool::new`] for a pool of fp8 K/V (`config.shape.kv_dtype` = [`DType::Fp8E4m3`]) with
    /// its dequantization scales: `[layer][K, V][kv head]`, `num_layers × 2 × num_kv_heads`
    /// positive finite f32 (empty: all 1). Writes store `x / scale` as e4m3 (rounded to
    /// nearest even, saturated to ±448); runs read `e4m3 × scale` ([`KvPool::kv_scales`]).
    /// Fixed for the pool's life, as the values it stores depend on them.
    pub fn with_scales(backend: Arc<dyn Backend>, config: PoolConfig, kv_head_scales: &[f32]) -> Result<KvPool> {
        let bytes = config.validate()?;
        let want = config.scale_bytes() as usize / 4;
        if !kv_head_scales.is_empty() {
            if want == 0 {
                return Err(invalid!(
                    "kv_head_scales has {} entries, but the pool's K and V are {}: scales apply to an fp8_e4m3 pool only",
                    kv_head_scales.len(),
                    config.shape.kv_dtype.name()
                ));
            }
            if kv_head_scales.len() != want {
                return Err(invalid!(
                    "kv_head_scales has {} entries; a pool of num_layers = {} and num_kv_heads = {} needs num_layers × 2 × num_kv_heads = {want}",
                    kv_head_scales.len(),
                    config.num_layers,
                    config.shape.num_kv_heads
                ));
            }
            if let Some((i, x)) = kv_head_scales.iter().enumerate().find(|(_, x)| !(x.is_finite() && **x > 0.0)) {
                return Err(invalid!("kv_head_scales[{i}] = {x} must be positive and finite"));
            }
        }
        if backend.kind() == crate::backend::BackendKind::Cuda {
            // A pool the kernels cannot read would fail only at the first launch; say it now.
            crate::backend::cuda::check_kernel_shape(config.shape.head_dim, config.shape.dtype)
                .map_err(|e| crate::unsupported!("a KV pool on the CUDA backend: {e}"))?;
        }
        let memory = backend.alloc_kv(bytes as usize)?;
        if want > 0 {
            let ones = vec![1.0f32; want];
            let scales = if kv_head_scales.is_empty() { &ones } else { kv_head_scales };
            let bytes: Vec<u8> = scales.iter().flat_map(|x| x.to_ne_bytes()).collect();
            memory.write_from_host(config.num_pages as u64 * config.page_bytes_all_layers(), &bytes)?;
        }
        let n = config.num_pages;
        let state = PoolState {
            refcount: vec![0; n as usize],
            free: (0..n).collect(),
            seqs: BTreeMap::new(),
            next_id: 1,
            page_by_hash: Default::default(),
            hash_of_page: Default::default(),
            stats: PoolStats::default(),
            page_size: config.page_size,
            headroom_pages: config.headroom_pages,
            batch_scratch: Default::default(),
        };
        Ok(KvPool { config, memory, state: Mutex::new(state), backend, layout_generation: Arc::default() })
    }

    /// What the pool was created with.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }
    /// The pool's one allocation (device memory on CUDA); `kv_layout` describes where a
    /// layer's K and V live in it.
    pub fn memory(&self) -> &dyn KvMemory {
        &*self.memory
    }

    /// Byte offset of layer `layer`'s K (`v = false`) or V region in the allocation.
    fn region_offset(&self, layer: u32, v: bool) -> u64 {
        let region = self.config.num_pages as u64 * self.config.page_bytes();
        (2 * layer as u64 + v as u64) * region
    }

    /// The layout descriptor of one layer: what `packinfer_run` reads this layer's KV through.
    pub fn kv_layout(&self, layer: u32) -> Result<KvLayout> {
        if layer >= self.config.num_layers {
            return Err(invalid!("layer = {layer} but the pool has {} layers", self.config.num_layers));
        }
        let (h, d) = (self.config.shape.num_kv_heads as i64, self.config.shape.head_dim as i64);
        let base = self.memory.base();
        Ok(KvLayout {
            k: base + self.region_offset(layer, false),
            v: base + self.region_offset(layer, true),
            stride_page: self.config.page_size as i64 * h * d,
            stride_token: h * d,
            stride_head: d,
            stride_dim: 1,
        })
    }

    /// The scales one layer's runs read the pool's K/V with ([`crate::types::RunArgs::kv_scales`]):
    /// addresses of the layer's per-head K and V scales in the pool's memory for an fp8 pool,
    /// [`KvScales::NONE`] for a pool of Q's dtype.
    pub fn kv_scales(&self, layer: u32) -> Result<KvScales> {
        if layer >= self.config.num_layers {
            return Err(invalid!("layer = {layer} but the pool has {} layers", self.config.num_layers));
        }
        if self.config.shape.kv_dtype != DType::Fp8E4m3 {
            return Ok(KvScales::NONE);
        }
        let heads = self.config.shape.num_kv_heads as u64 * 4;
        let at = self.memory.base() + self.config.num_pages as u64 * self.config.page_bytes_all_layers() + 2 * layer as u64 * heads;
        Ok(KvScales { k_scale: 1.0, v_scale: 1.0, k_head_scales: at, v_head_scales: at + heads })
    }

    /// Creates an empty sequence.
    pub fn create_sequence(&self) -> SeqId {
        let mut s = self.state.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.seqs.insert(id, Sequence::default());
        id
    }

    /// Tokens stored for `seq`.
    pub fn sequence_len(&self, seq: SeqId) -> Result<u32> {
        Ok(self.state.lock().seq(seq)?.len)
    }

    /// Pages holding `seq`'s tokens, in order (a copy).
    pub fn sequence_pages(&self, seq: SeqId) -> Result<Vec<u32>> {
        Ok(self.state.lock().seq(seq)?.pages.clone())
    }

    /// Reserves `n` more tokens at the end of `seq` and returns their slots (`page * page_size
    /// + token in page`), where their K/V go. Takes headroom pages first, then free pages; a
    /// partly filled last page that is shared is first copied (copy-on-write). If the pages do
    /// not fit, returns `PoolExhausted` and changes nothing. A copy-on-write copy is enqueued on
    /// `stream`. The slots stay valid until the next relayout that moves pages.
    pub fn append(&self, seq: SeqId, n: u32, stream: u64) -> Result<Vec<u64>> {
        let mut s = self.state.lock();
        s.append(self, seq, n, stream)
    }

    /// A new sequence holding `parent`'s first `prefix_len` tokens: it shares the parent's full
    /// pages (reference counted) and gets a copy of the partly covered page, if any, enqueued on
    /// `stream`.
    pub fn fork(&self, parent: SeqId, prefix_len: u32, stream: u64) -> Result<SeqId> {
        let mut s = self.state.lock();
        s.fork(self, parent, prefix_len, stream)
    }

    /// Shortens `seq` to `len` tokens; pages no longer needed (and its headroom) return to the
    /// pool when no other sequence uses them.
    pub fn truncate(&self, seq: SeqId, len: u32) -> Result<()> {
        self.state.lock().truncate(seq, len)
    }

    /// Releases `seq`; its pages return when their last reference goes. The id becomes invalid.
    pub fn release(&self, seq: SeqId) -> Result<()> {
        let mut s = self.state.lock();
        let q = s.seq(seq)?.clone();
        for &p in q.pages.iter().chain(&q.reserved) {
            s.unref(p);
        }
        s.seqs.remove(&seq);
        Ok(())
    }

    /// Writes one layer's K and V of the step's new tokens: for each `(seq, n)` of `tokens`, the
    /// last `n` tokens of `seq` (which `append` reserved), in that order, rows of `k` and `v`
    /// being `[total tokens, kv_heads, head_dim]` of Q's dtype (`shape.dtype`) with
    /// `src_stride_token` elements between tokens. An fp8 pool stores each element x of KV head
    /// h as e4m3(x / scale) with the layer's scale of h (rounded to nearest even, saturated).
    ///
    /// # Safety
    /// `k` and `v` must address that many rows in memory of the pool's kind (host on CPU).
    pub unsafe fn write_kv(&self, layer: u32, tokens: &[(SeqId, u32)], k: u64, v: u64, src_stride_token: i64, stream: u64) -> Result<()> {
        if layer >= self.config.num_layers {
            return Err(invalid!("layer = {layer} but the pool has {} layers", self.config.num_layers));
        }
        let row_elems = (self.config.shape.num_kv_heads * self.config.shape.head_dim) as i64;
        if src_stride_token < row_elems {
            return Err(invalid!(
                "src_stride_token = {src_stride_token} is smaller than a token's row of num_kv_heads * head_dim = {row_elems} elements"
            ));
        }
        let mut s = self.state.lock();
        let slots = s.slots_of_last(tokens)?;
        if slots.is_empty() {
            return Ok(());
        }
        if k == 0 || v == 0 {
            return Err(invalid!("k or v is a null pointer but {} tokens are to be written", slots.len()));
        }
        // A page whose content changes no longer matches the hash registered for it. Once per
        // page, and not at all while no hash is registered (this runs per layer per step).
        if !s.hash_of_page.is_empty() {
            let ps = self.config.page_size as u64;
            let mut last = None;
            for &slot in &slots {
                let page = (slot / ps) as u32;
                if last != Some(page) {
                    s.forget_hash(page);
                    last = Some(page);
                }
            }
        }
        let row = self.config.row_bytes();
        let shape = &self.config.shape;
        let stride = src_stride_token as u64 * shape.dtype.size_bytes() as u64;
        let scales = self.kv_scales(layer)?;
        for (src, is_v) in [(k, false), (v, true)] {
            let region = self.region_offset(layer, is_v);
            let dst: Vec<u64> = slots.iter().map(|&slot| region + slot * row).collect();
            if shape.kv_dtype == DType::Fp8E4m3 {
                let rows = RowConversion {
                    src_dtype: shape.dtype,
                    num_kv_heads: shape.num_kv_heads,
                    head_dim: shape.head_dim,
                    head_scales: if is_v { scales.v_head_scales } else { scales.k_head_scales } - self.memory.base(),
                };
                // SAFETY: as below; the scales are this layer's, inside the allocation.
                unsafe { self.memory.write_rows_fp8(src, stride, &rows, &dst, stream)? };
            } else {
                // SAFETY: the rows at `src` are the caller's (this function's contract); every
                // destination is a reserved, unshared slot of this layer's region.
                unsafe { self.memory.write_rows(src, stride, row, &dst, stream)? };
            }
        }
        Ok(())
    }

    /// Copies whole pages (every layer, K and V) `src -> dst`.
    fn copy_pages(&self, pairs: &[(u32, u32)], stream: u64) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let pb = self.config.page_bytes();
        let mut ranges = Vec::with_capacity(pairs.len() * 2 * self.config.num_layers as usize);
        for layer in 0..self.config.num_layers {
            for v in [false, true] {
                let region = self.region_offset(layer, v);
                ranges.extend(pairs.iter().map(|&(s, d)| (region + s as u64 * pb, region + d as u64 * pb)));
            }
        }
        self.memory.copy_ranges(&ranges, pb, stream)
    }

    /// Registers the engine's content hashes of `seq`'s first `hashes.len()` full pages (a
    /// chained hash of the tokens up to the page's end, as vLLM and SGLang compute it), so a
    /// later `match_prefix` of another sequence with the same prompt can share the pages. A hash
    /// already registered for another page keeps that page.
    pub fn register_page_hashes(&self, seq: SeqId, hashes: &[u64]) -> Result<()> {
        let mut s = self.state.lock();
        let ps = self.config.page_size;
        let q = s.seq(seq)?;
        let full = (q.len / ps) as usize;
        if hashes.len() > full {
            return Err(invalid!(
                "{} hashes given but sequence {seq} has only {full} full pages ({} tokens, page_size {ps})",
                hashes.len(),
                q.len
            ));
        }
        let pages: Vec<u32> = q.pages[..hashes.len()].to_vec();
        for (&p, &h) in pages.iter().zip(hashes) {
            if s.page_by_hash.contains_key(&h) || s.hash_of_page.contains_key(&p) {
                continue;
            }
            s.page_by_hash.insert(h, p);
            s.hash_of_page.insert(p, h);
        }
        Ok(())
    }

    /// For an empty `seq`: attaches the registered pages whose hashes are the leading entries of
    /// `hashes`, shared (reference counted), and returns how many tokens they hold. The engine
    /// then appends and writes only the rest of its prompt.
    pub fn match_prefix(&self, seq: SeqId, hashes: &[u64]) -> Result<u32> {
        let mut s = self.state.lock();
        let q = s.seq(seq)?;
        if q.len != 0 || !q.reserved.is_empty() {
            return Err(invalid!("sequence {seq} already holds {} tokens; match_prefix needs an empty sequence", q.len));
        }
        let pages: Vec<u32> = hashes.iter().map_while(|h| s.page_by_hash.get(h).copied()).collect();
        for &p in &pages {
            s.refcount[p as usize] += 1;
        }
        let tokens = pages.len() as u32 * self.config.page_size;
        let q = s.seqs.get_mut(&seq).unwrap();
        q.pages = pages;
        q.len = tokens;
        Ok(tokens)
    }

    /// Plans one step from the pool: `requests` are (sequence, new query tokens), whose tokens
    /// were already appended. Builds the batch (page tables in the pool's numbering, prefix
    /// groups from shared leading pages) and plans it with `profile`, or where that is `None`
    /// with the pool's backend's profile for this batch (`Backend::profile_for`: on the GPU,
    /// batches of short prompts get narrow tiles and several workers per SM).
    pub fn plan(&self, requests: &[(SeqId, u32)], profile: Option<&crate::plan::DeviceProfile>, options: PlanOptions) -> Result<Plan> {
        let mut plan = Plan::empty(self.config.shape(), options.clone(), 0);
        self.replan(&mut plan, requests.iter().copied(), profile, options)?;
        Ok(plan)
    }

    /// [`KvPool::plan`] into an existing plan (from this pool or not), as [`Plan::rebuild`]
    /// does: the batch is written into the plan's own and planned in its memory, so once the
    /// plan has held a step as large (and the pool has built one), re-planning allocates
    /// nothing. `requests` are read twice (an iterator, so a caller with separate id and token
    /// arrays zips them without copying). On error the plan holds an empty batch, as after a
    /// failed [`Plan::rebuild`].
    pub fn replan(
        &self,
        plan: &mut Plan,
        requests: impl ExactSizeIterator<Item = (SeqId, u32)> + Clone,
        profile: Option<&crate::plan::DeviceProfile>,
        options: PlanOptions,
    ) -> Result<()> {
        self.replan_scaled(plan, requests, profile, options, 1.0).map(|_| ())
    }

    /// [`KvPool::replan`] at `capacity_factor` × the automatic capacity where `options` leave
    /// it automatic, in one planning pass; returns the automatic capacity (0: none).
    pub(crate) fn replan_scaled(
        &self,
        plan: &mut Plan,
        requests: impl ExactSizeIterator<Item = (SeqId, u32)> + Clone,
        profile: Option<&crate::plan::DeviceProfile>,
        options: PlanOptions,
        capacity_factor: f64,
    ) -> Result<f64> {
        let mut seen = 0;
        let automatic = plan.rebuild_scaled(
            self.config.shape(),
            options,
            |batch, spare| {
                let mut s = self.state.lock();
                let (shared, unshared) = s.fill_batch(self, requests, batch, spare)?;
                s.stats.step_read_bytes_shared = shared;
                s.stats.step_read_bytes_unshared = unshared;
                // Read under the lock a relayout holds while it moves pages.
                seen = *self.layout_generation.read_recursive();
                Ok(None)
            },
            |shape, batch| match profile {
                Some(p) => p.clone(),
                None => self.backend.profile_for(shape, batch),
            },
            capacity_factor,
        )?;
        plan.pool_layout = Some(crate::plan::LayoutStamp { generation: self.layout_generation.clone(), seen });
        Ok(automatic)
    }

    /// Group-contiguous layout: see `layout.rs`. `groups` are the plan's execution groups, as
    /// sequence ids; `regroup` is the regroup trigger's verdict for this step.
    pub fn relayout(&self, groups: &[Vec<SeqId>], regroup: bool, stream: u64) -> Result<RelayoutReport> {
        self.state.lock().relayout(self, groups, regroup, stream)
    }

    /// Pages that `relayout(groups, regroup, _)` would copy at most, moving nothing (what a
    /// scheduler weighs before deciding to move them).
    pub fn relayout_estimate(&self, groups: &[Vec<SeqId>], regroup: bool) -> Result<u64> {
        self.state.lock().relayout_estimate(groups, regroup)
    }

    /// The cost model of the pool's backend (the profile a plan's group costs are in).
    pub fn profile(&self) -> crate::plan::DeviceProfile {
        self.backend.profile()
    }

    /// The pool's counters now.
    pub fn stats(&self) -> PoolStats {
        let s = self.state.lock();
        s.compute_stats(&self.config)
    }

    /// Reads token `token` of `seq` in `layer` back as (K row, V row) bytes, under the pool's
    /// lock. Host memory only (the CPU backend): for tests (`testing::read_token_host`).
    pub(crate) fn read_token_host(&self, seq: SeqId, layer: u32, token: u32) -> Result<(Vec<u8>, Vec<u8>)> {
        if self.backend.kind() != crate::backend::BackendKind::Cpu {
            return Err(crate::unsupported!(
                "read_token_host reads host memory; this pool lives on the {} backend",
                self.backend.device_name()
            ));
        }
        self.kv_layout(layer)?;
        let s = self.state.lock();
        let q = s.seq(seq)?;
        if token >= q.len {
            return Err(invalid!("token = {token} but sequence {seq} holds {} tokens", q.len));
        }
        let ps = self.config.page_size;
        let slot = q.pages[(token / ps) as usize] as u64 * ps as u64 + (token % ps) as u64;
        let row = self.config.row_bytes();
        let read = |v: bool| {
            let at = self.memory.base() + self.region_offset(layer, v) + slot * row;
            // SAFETY: host memory of the pool; the slot is inside the allocation.
            unsafe { std::slice::from_raw_parts(at as *const u8, row as usize).to_vec() }
        };
        Ok((read(false), read(true)))
    }

    /// A copy of the state, for invariant checks in tests (`testing::pool_snapshot`).
    pub(crate) fn debug_snapshot(&self) -> crate::testing::PoolSnapshot {
        let s = self.state.lock();
        crate::testing::PoolSnapshot {
            refcount: s.refcount.clone(),
            free: s.free.iter().copied().collect(),
            seqs: s.seqs.iter().map(|(&id, q)| (id, q.pages.clone(), q.reserved.clone(), q.len)).collect(),
        }
    }
}

impl PoolState {
    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or_else(|| invalid!("sequence id {id} is not a live sequence of this pool (never created, or released)"))
    }

    fn alloc(&mut self) -> u32 {
        let p = self.free.pop_first().expect("caller checked that a free page exists");
        self.refcount[p as usize] = 1;
        p
    }

    fn unref(&mut self, p: u32) {
        let rc = &mut self.refcount[p as usize];
        debug_assert!(*rc > 0, "page {p} released more often than referenced");
        *rc -= 1;
        if *rc == 0 {
            self.free.insert(p);
            self.forget_hash(p);
        }
    }

    /// Drops `page`'s registered content hash, if any: the page is about to change.
    fn forget_hash(&mut self, page: u32) {
        if let Some(h) = self.hash_of_page.remove(&page) {
            self.page_by_hash.remove(&h);
        }
    }

    fn exhausted(&self, what: String, need: usize) -> Error {
        Error::PoolExhausted(format!(
            "{what} needs {need} free page(s) but the pool has {} of {}; nothing was changed",
            self.free.len(),
            self.refcount.len()
        ))
    }

    fn append(&mut self, pool: &KvPool, id: SeqId, n: u32, stream: u64) -> Result<Vec<u64>> {
        let ps = pool.config.page_size;
        let q = self.seq(id)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let new_len = q
            .len
            .checked_add(n)
            .filter(|&l| l <= i32::MAX as u32)
            .ok_or_else(|| invalid!("n = {n} tokens would make sequence {id} longer than {} tokens", i32::MAX))?;
        let need_pages = new_len.div_ceil(ps) as usize - q.pages.len();
        let partial_last = q.len % ps != 0;
        let cow = partial_last && self.refcount[*q.pages.last().unwrap() as usize] > 1;
        let from_reserved = need_pages.min(q.reserved.len());
        let fresh = need_pages - from_reserved + cow as usize;
        if fresh > self.free.len() {
            return Err(self.exhausted(format!("appending n = {n} tokens to sequence {id}"), fresh));
        }
        // Check done; from here on nothing fails except the device copy, which comes first.
        if cow {
            let old = *q.pages.last().unwrap();
            let new = self.alloc();
            if let Err(e) = pool.copy_pages(&[(old, new)], stream) {
                self.unref(new);
                return Err(e);
            }
            self.unref(old);
            *self.seqs.get_mut(&id).unwrap().pages.last_mut().unwrap() = new;
            self.stats.cow_page_copies += 1;
        }
        // The last page is written in place (it was not shared, or its copy replaced it): its
        // content no longer matches a registered hash of the full page it was, if it ever was one
        // for another sequence (fork, then truncate of the child, then the parent registers).
        if !cow && partial_last {
            let last = *self.seqs[&id].pages.last().unwrap();
            self.forget_hash(last);
        }
        let reserved: Vec<u32> = self.seqs.get_mut(&id).unwrap().reserved.drain(..from_reserved).collect();
        let fresh_pages: Vec<u32> = (0..need_pages - from_reserved).map(|_| self.alloc()).collect();
        let q = self.seqs.get_mut(&id).unwrap();
        q.pages.extend(reserved);
        if !fresh_pages.is_empty() && q.laid_out {
            q.overflowed = true;
        }
        q.pages.extend(fresh_pages);
        let start = q.len;
        q.len = new_len;
        Ok((start..new_len).map(|t| q.pages[(t / ps) as usize] as u64 * ps as u64 + (t % ps) as u64).collect())
    }

    fn fork(&mut self, pool: &KvPool, parent: SeqId, prefix_len: u32, stream: u64) -> Result<SeqId> {
        let ps = pool.config.page_size;
        let p = self.seq(parent)?;
        if prefix_len > p.len {
            return Err(invalid!("prefix_len = {prefix_len} is beyond parent sequence {parent}'s {} tokens", p.len));
        }
        let full = (prefix_len / ps) as usize;
        let partial = !prefix_len.is_multiple_of(ps);
        if partial && self.free.is_empty() {
            return Err(
                self.exhausted(format!("forking sequence {parent} at prefix_len = {prefix_len} (its partly covered page is copied)"), 1)
            );
        }
        let mut pages: Vec<u32> = p.pages[..full].to_vec();
        let partial_src = partial.then(|| p.pages[full]);
        if let Some(src) = partial_src {
            let new = self.alloc();
            if let Err(e) = pool.copy_pages(&[(src, new)], stream) {
                self.unref(new);
                return Err(e);
            }
            self.stats.cow_page_copies += 1;
            pages.push(new);
        }
        for &pg in &pages[..full] {
            self.refcount[pg as usize] += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, Sequence { pages, reserved: Vec::new(), len: prefix_len, laid_out: false, overflowed: false });
        Ok(id)
    }

    fn truncate(&mut self, id: SeqId, len: u32) -> Result<()> {
        let q = self.seq(id)?;
        if len > q.len {
            return Err(invalid!("len = {len} is longer than sequence {id}'s {} tokens; truncate only shortens", q.len));
        }
        let keep = len.div_ceil(self.page_size) as usize;
        let mut q = self.seqs.remove(&id).unwrap();
        if !len.is_multiple_of(self.page_size) {
            // The last kept page is now partial: its next tokens may be written in place, so it
            // no longer matches the content hash of a full page.
            self.forget_hash(q.pages[keep - 1]);
        }
        for &p in q.pages[keep..].iter().chain(&q.reserved) {
            self.unref(p);
        }
        q.pages.truncate(keep);
        q.reserved.clear();
        q.len = len;
        self.seqs.insert(id, q);
        Ok(())
    }

    /// Slots of the last `n` tokens of each `(seq, n)`, checking that each is writable: inside
    /// the sequence and in a page no other sequence uses.
    fn slots_of_last(&self, tokens: &[(SeqId, u32)]) -> Result<Vec<u64>> {
        let ps = self.page_size;
        let mut slots = Vec::new();
        for (i, &(id, n)) in tokens.iter().enumerate() {
            let q = self.seq(id)?;
            if n > q.len {
                return Err(invalid!("num_tokens[{i}] = {n} but sequence {id} holds only {} tokens (append them first)", q.len));
            }
            for t in q.len - n..q.len {
                let page = q.pages[(t / ps) as usize];
                let rc = self.refcount[page as usize];
                if rc != 1 {
                    return Err(invalid!(
                        "token {t} of sequence {id} is in page {page}, which {rc} sequences share; shared K/V are written once, by the sequence that stored them first"
                    ));
                }
                slots.push(page as u64 * ps as u64 + (t % ps) as u64);
            }
        }
        Ok(slots)
    }

    fn compute_stats(&self, config: &PoolConfig) -> PoolStats {
        let ps = config.page_size as u64;
        let mut fill = vec![0u32; self.refcount.len()];
        let mut logical = 0u64;
        for q in self.seqs.values() {
            logical += q.len as u64;
            for (i, &p) in q.pages.iter().enumerate() {
                let in_page = (q.len as u64 - i as u64 * ps).min(ps) as u32;
                fill[p as usize] = fill[p as usize].max(in_page);
            }
        }
        let stored: u64 = fill.iter().map(|&f| f as u64).sum();
        let used = self.refcount.len() - self.free.len();
        PoolStats {
            num_pages: self.refcount.len() as u32,
            pages_used: used as u32,
            pages_free: self.free.len() as u32,
            num_sequences: self.seqs.len() as u32,
            tokens_logical: logical,
            tokens_stored: stored,
            slots_reserved_unused: used as u64 * ps - stored,
            ..self.stats
        }
    }
}
