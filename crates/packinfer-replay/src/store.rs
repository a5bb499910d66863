//! Where the replay keeps its KV cache. The engine loop talks to the small [`KvStore`] trait;
//! [`PoolStore`] implements it with the library's managed KV pool (`packinfer::kv::KvPool`):
//! sequences, copy-on-write forks of shared system prompts, K/V writes, plans made from the pool,
//! and the scheduler's steps (capacity, regroup, group-contiguous relayouts).
//!
//! What the pool does not do, and an engine's scheduler must, is admission control: an engine
//! admits a request only when it can promise room for the request's whole life, so a running
//! request never runs out of KV. The store keeps that promise (a page reservation per sequence).

use std::collections::HashMap;
use std::sync::Arc;

use packinfer::backend::Backend;
use packinfer::kv::{KvPool, PoolConfig, SeqId};
use packinfer::plan::scheduler::{Scheduler, StepDecision};
use packinfer::plan::{Plan, PlanOptions};
use packinfer::types::KvLayout;
use packinfer::{invalid, Result};

/// What a store reports about its memory after a step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StoreMetrics {
    pub pages_total: u32,
    pub pages_used: u32,
    pub page_size: u32,
    /// Token slots that hold K/V (a shared page's tokens count once).
    pub tokens_stored: u64,
    /// Tokens of every live sequence added up (a shared prefix counts once per sequence).
    pub tokens_logical: u64,
    /// Relayouts that moved pages, and the bytes they moved, since the store was created.
    pub relayouts: u64,
    pub bytes_moved: u64,
    /// KV bytes the last plan reads with prefix sharing and without it.
    pub step_read_bytes_shared: u64,
    pub step_read_bytes_unshared: u64,
}

impl StoreMetrics {
    /// Slots of the used pages that hold no token (partial last pages, headroom): internal
    /// fragmentation.
    pub fn fragmentation(&self) -> f64 {
        let slots = self.pages_used as u64 * self.page_size as u64;
        if slots == 0 {
            0.0
        } else {
            1.0 - self.tokens_stored as f64 / slots as f64
        }
    }
}

/// The KV operations of one engine, for every layer of one model shape. Sequences are named by
/// the caller's ids; element data is 16-bit (bf16 or f16 bit patterns), token-major
/// `[tokens, kv_heads, head_dim]`.
pub trait KvStore {
    /// Creates sequence `id` (a fork of shared sequence `prefix` when given, sharing its KV) and
    /// reserves room for it to grow to `final_len` tokens. `Ok(false)`: not enough memory can be
    /// promised now; nothing changed.
    fn admit(&mut self, id: u32, prefix: Option<u32>, final_len: u32) -> Result<bool>;
    /// Makes room for `n` more tokens at the end of `id`.
    fn append(&mut self, id: u32, n: u32) -> Result<()>;
    /// Writes K and V of the last `n` tokens of each `(id, n)` in `layer`; `k` and `v` point at
    /// those tokens in that order, `elems` elements each.
    ///
    /// # Safety
    /// `k` and `v` must address `elems` readable elements in the backend's memory (host memory
    /// on the CPU, device memory on CUDA), unchanged until the writes are done (on the CUDA
    /// backend they are queued on stream 0).
    unsafe fn write_kv(&mut self, layer: u32, tokens: &[(u32, u32)], k: u64, v: u64, elems: usize) -> Result<()>;
    /// The plan for one step: `(id, new tokens)` per request, the new tokens being the queries;
    /// made in `reuse`'s memory when given (an earlier step's plan, which nothing else holds).
    fn plan(&mut self, reuse: Option<Plan>, step: &[(u32, u32)], options: PlanOptions) -> Result<Plan>;
    /// The step's plan by the library's scheduler: capacity, regroup and relayout decided there,
    /// as an engine's scheduler handle does through the C API; made in `reuse`'s memory when
    /// given, as [`KvStore::plan`].
    fn schedule(
        &mut self,
        scheduler: &mut Scheduler,
        reuse: Option<Plan>,
        step: &[(u32, u32)],
        options: PlanOptions,
    ) -> Result<(Plan, StepDecision)>;
    /// Where `layer`'s K and V live, for the backend's run.
    fn layout(&self, layer: u32) -> Result<KvLayout>;
    /// Frees `id`'s KV (shared pages when their last user leaves).
    fn release(&mut self, id: u32) -> Result<()>;
    fn metrics(&self) -> StoreMetrics;
}

/// A sequence of the pool and the pages promised to it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: SeqId,
    reserved_pages: u32,
}

/// The library's managed KV pool, with per-sequence page reservations for admission.
pub struct PoolStore {
    pool: KvPool,
    seqs: HashMap<u32, Entry>,
    /// Pages promised to live sequences, used or not.
    committed: u64,
    /// The last step's (sequence, new tokens), kept for its allocation.
    requests: Vec<(SeqId, u32)>,
}

impl PoolStore {
    pub fn new(backend: Arc<dyn Backend>, config: PoolConfig) -> Result<Self> {
        if config.shape.dtype.size_bytes() != 2 {
            return Err(packinfer::unsupported!("dtype = {}: the replay writes 16-bit K/V (bf16, f16)", config.shape.dtype.name()));
        }
        Ok(PoolStore { pool: KvPool::new(backend, config)?, seqs: HashMap::new(), committed: 0, requests: Vec::new() })
    }

    /// Pages a sequence of `final_len` tokens may hold beyond the `shared_len` tokens of whole
    /// pages it shares: its own pages plus the headroom a relayout gives each group member.
    pub fn pages_to_reserve(config: &PoolConfig, final_len: u32, shared_len: u32) -> u32 {
        let shared_pages = shared_len / config.page_size;
        final_len.div_ceil(config.page_size) - shared_pages + config.headroom_pages
    }

    fn entry(&self, id: u32) -> Result<Entry> {
        self.seqs.get(&id).copied().ok_or_else(|| invalid!("sequence {id} does not exist in the replay's KV store"))
    }
}

impl KvStore for PoolStore {
    fn admit(&mut self, id: u32, prefix: Option<u32>, final_len: u32) -> Result<bool> {
        if self.seqs.contains_key(&id) {
            return Err(invalid!("sequence {id} already exists in the replay's KV store"));
        }
        let parent = prefix.map(|p| self.entry(p)).transpose()?;
        let prefix_len = parent.map(|p| self.pool.sequence_len(p.seq)).transpose()?.unwrap_or(0);
        if final_len < prefix_len {
            return Err(invalid!("final_len = {final_len} is shorter than the shared prefix of {prefix_len} tokens"));
        }
        let need = Self::pages_to_reserve(self.pool.config(), final_len, prefix_len);
        if self.committed + need as u64 > self.pool.config().num_pages as u64 {
            return Ok(false);
        }
        let seq = match parent {
            Some(p) => self.pool.fork(p.seq, prefix_len, 0)?,
            None => self.pool.create_sequence(),
        };
        self.committed += need as u64;
        self.seqs.insert(id, Entry { seq, reserved_pages: need });
        Ok(true)
    }

    fn append(&mut self, id: u32, n: u32) -> Result<()> {
        let e = self.entry(id)?;
        self.pool.append(e.seq, n, 0)?;
        Ok(())
    }

    unsafe fn write_kv(&mut self, layer: u32, tokens: &[(u32, u32)], k: u64, v: u64, elems: usize) -> Result<()> {
        let c = self.pool.config();
        let row = (c.shape.num_kv_heads * c.shape.head_dim) as usize;
        let total: usize = tokens.iter().map(|t| t.1 as usize).sum();
        if elems != total * row {
            return Err(invalid!("K/V data of {elems} elements for {total} tokens of {row} elements"));
        }
        let seqs = tokens.iter().map(|&(id, n)| Ok((self.entry(id)?.seq, n))).collect::<Result<Vec<_>>>()?;
        // SAFETY: k and v hold `total` rows of `row` 16-bit elements, token-major (the caller's
        // promise, the count checked).
        unsafe { self.pool.write_kv(layer, &seqs, k, v, row as i64, 0) }
    }

    fn plan(&mut self, reuse: Option<Plan>, step: &[(u32, u32)], options: PlanOptions) -> Result<Plan> {
        let mut reqs = std::mem::take(&mut self.requests);
        reqs.clear();
        for &(id, n) in step {
            reqs.push((self.entry(id)?.seq, n));
        }
        let plan = match reuse {
            Some(mut plan) => self.pool.replan(&mut plan, reqs.iter().copied(), None, options).map(|()| plan),
            None => self.pool.plan(&reqs, None, options),
        };
        self.requests = reqs;
        plan
    }

    fn schedule(
        &mut self,
        scheduler: &mut Scheduler,
        reuse: Option<Plan>,
        step: &[(u32, u32)],
        options: PlanOptions,
    ) -> Result<(Plan, StepDecision)> {
        let reqs = step.iter().map(|&(id, n)| Ok((self.entry(id)?.seq, n))).collect::<Result<Vec<_>>>()?;
        match reuse {
            Some(mut plan) => scheduler.step_into(&self.pool, &reqs, options, 0, &mut plan).map(|d| (plan, d)),
            None => scheduler.step(&self.pool, &reqs, options, 0),
        }
    }

    fn layout(&self, layer: u32) -> Result<KvLayout> {
        self.pool.kv_layout(layer)
    }

    fn release(&mut self, id: u32) -> Result<()> {
        let e = self.entry(id)?;
        self.pool.release(e.seq)?;
        self.seqs.remove(&id);
        self.committed -= e.reserved_pages as u64;
        Ok(())
    }

    fn metrics(&self) -> StoreMetrics {
        let s = self.pool.stats();
        StoreMetrics {
            pages_total: s.num_pages,
            pages_used: s.pages_used,
            page_size: self.pool.config().page_size,
            tokens_stored: s.tokens_stored,
            tokens_logical: s.tokens_logical,
            relayouts: s.relayouts,
            bytes_moved: s.relayout_bytes_moved,
            step_read_bytes_shared: s.step_read_bytes_shared,
            step_read_bytes_unshared: s.step_read_bytes_unshared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packinfer::backend::cpu::CpuBackend;
    use packinfer::types::{DType, Shape};

    fn config(num_pages: u32, headroom_pages: u32) -> PoolConfig {
        PoolConfig {
            num_layers: 2,
            shape: Shape {
                num_qo_heads: 2,
                num_kv_heads: 1,
                head_dim: 8,
                dtype: DType::Bf16,
                kv_dtype: DType::Bf16,
                causal: true,
                sm_scale: 0.0,
            },
            page_size: 4,
            num_pages,
            headroom_pages,
        }
    }

    fn store(num_pages: u32, headroom_pages: u32) -> PoolStore {
        PoolStore::new(Arc::new(CpuBackend::new(1)), config(num_pages, headroom_pages)).unwrap()
    }

    #[test]
    fn forks_share_whole_pages_and_everything_is_freed() {
        let mut s = store(16, 0);
        assert!(s.admit(100, None, 10).unwrap());
        s.append(100, 10).unwrap();
        let data: Vec<u16> = (0..80).collect();
        let p = data.as_ptr() as u64;
        // SAFETY: `data` holds the 80 elements (10 tokens of 8) read, on the host (a CPU pool).
        unsafe { s.write_kv(1, &[(100, 10)], p, p, 80) }.unwrap();
        assert!(s.admit(1, Some(100), 13).unwrap());
        let m = s.metrics();
        // 3 pages of the prompt + its partial last page copied for the fork.
        assert_eq!((m.pages_used, m.tokens_stored, m.tokens_logical), (4, 12, 20));
        s.append(1, 3).unwrap();
        // SAFETY: as above: 24 of data's 80 elements.
        unsafe { s.write_kv(0, &[(1, 3)], p, p, 24) }.unwrap();
        // SAFETY: refused before any read (8 elements cannot be 3 tokens).
        assert!(unsafe { s.write_kv(0, &[(1, 3)], p, p, 8) }.is_err(), "wrong data length");
        s.release(1).unwrap();
        s.release(100).unwrap();
        assert_eq!((s.metrics().pages_used, s.committed), (0, 0));
        assert!(s.release(1).is_err());
    }

    #[test]
    fn admission_keeps_reservations_including_headroom() {
        let mut s = store(8, 1);
        assert!(s.admit(0, None, 9).unwrap()); // 3 pages + 1 headroom
        assert!(!s.admit(1, None, 13).unwrap()); // 4 + 1 more do not fit
        assert!(s.admit(2, None, 12).unwrap()); // 3 + 1 do
        assert_eq!(s.committed, 8);
        s.release(0).unwrap();
        assert!(s.admit(1, None, 12).unwrap());
    }
}
