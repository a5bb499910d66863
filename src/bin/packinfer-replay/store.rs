//! Where the replay keeps its KV cache. The engine loop talks to the small [`KvStore`] trait, so
//! the same loop runs on any store. [`PagedStore`] is the plain paged cache an engine without
//! PackInfer's managed pool would have: a free list of fixed-size pages in host memory, whole-page
//! prefix sharing by reference count (a fork copies only the prompt's partial last page), and
//! CSR page tables handed to `Plan::build`.

use packinfer::plan::{DeviceProfile, Plan, PlanOptions};
use packinfer::types::{Batch, KvLayout, PrefixGroup, Shape};
use packinfer::{invalid, Error, Result};

/// What a store reports about its memory after a step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StoreMetrics {
    pub pages_total: u32,
    pub pages_used: u32,
    pub page_size: u32,
    /// Token slots that hold K/V (a shared prefix page counts once).
    pub tokens_stored: u64,
    /// Tokens of every live sequence added up (a shared prefix counts once per sequence).
    pub tokens_logical: u64,
    /// Times the store re-laid out its KV, and the bytes that moved doing it.
    pub regroups: u64,
    pub bytes_moved: u64,
}

impl StoreMetrics {
    /// Slots of the used pages that hold no token (half-filled last pages): internal fragmentation.
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
    /// reserves room for it to grow to `final_len` tokens. `Ok(false)`: not enough free memory
    /// now; nothing changed.
    fn admit(&mut self, id: u32, prefix: Option<u32>, final_len: u32) -> Result<bool>;
    /// Makes room for `n` more tokens at the end of `id`.
    fn append(&mut self, id: u32, n: u32) -> Result<()>;
    /// Tokens in `id` now.
    fn len(&self, id: u32) -> Result<u32>;
    /// Writes K and V of tokens `first ..` of `id` in `layer`.
    fn write_kv(&mut self, layer: u32, id: u32, first: u32, k: &[u16], v: &[u16]) -> Result<()>;
    /// The plan for one step: `(id, new tokens)` per request, the new tokens being the queries.
    fn plan(&mut self, step: &[(u32, u32)], profile: &DeviceProfile, options: PlanOptions) -> Result<Plan>;
    /// Where `layer`'s K and V live, for the backend's run.
    fn layout(&self, layer: u32) -> KvLayout;
    /// Frees `id`'s KV (shared pages when their last user leaves).
    fn release(&mut self, id: u32) -> Result<()>;
    fn metrics(&self) -> StoreMetrics;
}

#[derive(Debug, Clone)]
struct Sequence {
    pages: Vec<u32>,
    len: u32,
    /// Leading pages shared with the sequence it was forked from (not this one's to reserve).
    shared_pages: u32,
    /// Pages this sequence may still need beyond `shared_pages`, set at admission.
    reserved_pages: u32,
    /// The shared sequence it was forked from.
    prefix: Option<u32>,
}

/// A paged KV cache in host memory (the CPU backend reads it directly), NHD layout.
pub struct PagedStore {
    shape: Shape,
    layers: u32,
    page_size: u32,
    num_pages: u32,
    /// Per layer, K then V: `num_pages × page_size × kv_heads × head_dim` elements each.
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
    free: Vec<u32>,
    refs: Vec<u32>,
    seqs: std::collections::HashMap<u32, Sequence>,
    /// Pages promised to live sequences, allocated or not.
    committed: u64,
}

/// Bytes one token of K and V takes over all layers.
pub fn bytes_per_token(shape: &Shape, layers: u32) -> u64 {
    2 * layers as u64 * shape.num_kv_heads as u64 * shape.head_dim as u64 * shape.dtype.size_bytes() as u64
}

impl PagedStore {
    pub fn new(shape: Shape, layers: u32, page_size: u32, num_pages: u32) -> Result<Self> {
        if page_size == 0 || num_pages == 0 || layers == 0 {
            return Err(invalid!("page_size = {page_size}, num_pages = {num_pages}, layers = {layers}: each must be at least 1"));
        }
        if shape.dtype.size_bytes() != 2 {
            return Err(packinfer::unsupported!("dtype = {} : the replay's KV store holds 16-bit elements (bf16, f16)", shape.dtype.name()));
        }
        let elems = num_pages as usize * page_size as usize * shape.num_kv_heads as usize * shape.head_dim as usize;
        Ok(PagedStore {
            shape,
            layers,
            page_size,
            num_pages,
            k: (0..layers).map(|_| vec![0u16; elems]).collect(),
            v: (0..layers).map(|_| vec![0u16; elems]).collect(),
            // Popped from the end: page 0 first on a fresh pool; after churn pages come back in
            // whatever order requests left, as in any paged engine.
            free: (0..num_pages).rev().collect(),
            refs: vec![0; num_pages as usize],
            seqs: Default::default(),
            committed: 0,
        })
    }

    fn token_elems(&self) -> usize {
        self.shape.num_kv_heads as usize * self.shape.head_dim as usize
    }

    fn seq(&self, id: u32) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or_else(|| invalid!("sequence {id} does not exist in the KV store"))
    }

    /// Pages a sequence of `len` tokens holds of its own (beyond `shared` shared pages).
    fn own_pages(&self, len: u32, shared: u32) -> u32 {
        len.div_ceil(self.page_size).saturating_sub(shared)
    }

    fn alloc(&mut self) -> Result<u32> {
        let p = self.free.pop().ok_or_else(|| Error::PoolExhausted(format!("all {} KV pages are in use", self.num_pages)))?;
        self.refs[p as usize] = 1;
        Ok(p)
    }
}

impl KvStore for PagedStore {
    fn admit(&mut self, id: u32, prefix: Option<u32>, final_len: u32) -> Result<bool> {
        if self.seqs.contains_key(&id) {
            return Err(invalid!("sequence {id} already exists in the KV store"));
        }
        let (shared_pages, copy_page, prefix_len) = match prefix {
            None => (0, None, 0),
            Some(p) => {
                let s = self.seq(p)?;
                let full = s.len / self.page_size;
                // Whole pages are shared; a partly filled last page is copied (copy-on-write
                // done eagerly), since the fork will append into it.
                let partial = (s.len % self.page_size != 0).then(|| s.pages[full as usize]);
                (full, partial, s.len)
            }
        };
        if final_len < prefix_len {
            return Err(invalid!("final_len = {final_len} is shorter than the shared prefix of {prefix_len} tokens"));
        }
        let need = self.own_pages(final_len, shared_pages).max(copy_page.is_some() as u32);
        if self.committed + need as u64 > self.num_pages as u64 {
            return Ok(false);
        }
        let mut pages = match prefix {
            Some(p) => self.seq(p)?.pages[..shared_pages as usize].to_vec(),
            None => Vec::new(),
        };
        for &p in &pages {
            self.refs[p as usize] += 1;
        }
        self.committed += need as u64;
        if let Some(src) = copy_page {
            let dst = self.alloc()?;
            let page_elems = self.page_size as usize * self.token_elems();
            let (s, d) = (src as usize * page_elems, dst as usize * page_elems);
            for layer in 0..self.layers as usize {
                self.k[layer].copy_within(s..s + page_elems, d);
                self.v[layer].copy_within(s..s + page_elems, d);
            }
            pages.push(dst);
        }
        self.seqs.insert(id, Sequence { pages, len: prefix_len, shared_pages, reserved_pages: need, prefix });
        Ok(true)
    }

    fn append(&mut self, id: u32, n: u32) -> Result<()> {
        let s = self.seq(id)?;
        let (len, have, shared, reserved) = (s.len + n, s.pages.len() as u32, s.shared_pages, s.reserved_pages);
        let want = len.div_ceil(self.page_size);
        let own_after = want.saturating_sub(shared);
        // Growing past the reservation is allowed while unreserved pages are free.
        if own_after > reserved {
            let extra = (own_after - reserved) as u64;
            if self.committed + extra > self.num_pages as u64 {
                return Err(Error::PoolExhausted(format!(
                    "sequence {id} needs {} more page(s) beyond its reservation but only {} of {} pages are uncommitted",
                    extra,
                    self.num_pages as u64 - self.committed,
                    self.num_pages
                )));
            }
            self.committed += extra;
        }
        let mut new_pages = Vec::new();
        for _ in have..want {
            new_pages.push(self.alloc()?);
        }
        let s = self.seqs.get_mut(&id).expect("checked above");
        s.pages.extend(new_pages);
        s.len = len;
        s.reserved_pages = s.reserved_pages.max(own_after);
        Ok(())
    }

    fn len(&self, id: u32) -> Result<u32> {
        Ok(self.seq(id)?.len)
    }

    fn write_kv(&mut self, layer: u32, id: u32, first: u32, k: &[u16], v: &[u16]) -> Result<()> {
        let te = self.token_elems();
        if k.len() != v.len() || k.len() % te != 0 {
            return Err(invalid!("K/V data of {} and {} elements is not whole tokens of {te} elements", k.len(), v.len()));
        }
        if layer >= self.layers {
            return Err(invalid!("layer = {layer} but the store holds {} layers", self.layers));
        }
        let n = (k.len() / te) as u32;
        let s = self.seq(id)?;
        if first + n > s.len || first < s.shared_pages * self.page_size {
            return Err(invalid!(
                "tokens {first}..{} of sequence {id} are not its own appended tokens ({}..{})",
                first + n,
                s.shared_pages * self.page_size,
                s.len
            ));
        }
        let ps = self.page_size;
        let slots: Vec<usize> = (first..first + n).map(|t| (s.pages[(t / ps) as usize] * ps + t % ps) as usize * te).collect();
        let (kl, vl) = (&mut self.k[layer as usize], &mut self.v[layer as usize]);
        for (i, at) in slots.into_iter().enumerate() {
            kl[at..at + te].copy_from_slice(&k[i * te..(i + 1) * te]);
            vl[at..at + te].copy_from_slice(&v[i * te..(i + 1) * te]);
        }
        Ok(())
    }

    fn plan(&mut self, step: &[(u32, u32)], profile: &DeviceProfile, options: PlanOptions) -> Result<Plan> {
        let mut batch = Batch {
            qo_indptr: vec![0],
            kv_indptr: vec![0],
            kv_page_indices: Vec::new(),
            kv_last_page_len: Vec::new(),
            page_size: self.page_size,
            num_pages: self.num_pages,
            prefix_groups: Vec::new(),
        };
        let mut by_prefix: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
        for (r, &(id, q)) in step.iter().enumerate() {
            let s = self.seq(id)?;
            batch.qo_indptr.push(batch.qo_indptr[r] + q as i32);
            batch.kv_page_indices.extend(s.pages.iter().map(|&p| p as i32));
            batch.kv_indptr.push(batch.kv_page_indices.len() as i32);
            batch.kv_last_page_len.push(if s.len == 0 { 0 } else { ((s.len - 1) % self.page_size + 1) as i32 });
            if let Some(p) = s.prefix {
                by_prefix.entry(p).or_default().push(r as u32);
            }
        }
        if options.prefix_sharing {
            for (p, members) in by_prefix {
                if members.len() >= 2 {
                    batch.prefix_groups.push(PrefixGroup { prefix_len: self.seq(p)?.len, members });
                }
            }
        }
        Plan::build(self.shape, batch, profile, options)
    }

    fn layout(&self, layer: u32) -> KvLayout {
        let te = self.token_elems() as i64;
        KvLayout {
            k: self.k[layer as usize].as_ptr() as u64,
            v: self.v[layer as usize].as_ptr() as u64,
            stride_page: self.page_size as i64 * te,
            stride_token: te,
            stride_head: self.shape.head_dim as i64,
            stride_dim: 1,
        }
    }

    fn release(&mut self, id: u32) -> Result<()> {
        if self.seqs.values().any(|s| s.prefix == Some(id)) {
            return Err(invalid!("sequence {id} is still the shared prefix of a live sequence"));
        }
        let s = self.seqs.remove(&id).ok_or_else(|| invalid!("sequence {id} does not exist in the KV store"))?;
        let own = s.pages_len_own().max(s.reserved_pages);
        for p in s.pages {
            self.refs[p as usize] -= 1;
            if self.refs[p as usize] == 0 {
                self.free.push(p);
            }
        }
        self.committed -= own as u64;
        Ok(())
    }

    fn metrics(&self) -> StoreMetrics {
        let mut tokens_stored = 0u64;
        let mut tokens_logical = 0u64;
        for s in self.seqs.values() {
            tokens_logical += s.len as u64;
            tokens_stored += (s.len - s.shared_pages * self.page_size) as u64;
        }
        StoreMetrics {
            pages_total: self.num_pages,
            pages_used: self.num_pages - self.free.len() as u32,
            page_size: self.page_size,
            tokens_stored,
            tokens_logical,
            regroups: 0,
            bytes_moved: 0,
        }
    }
}

impl Sequence {
    fn pages_len_own(&self) -> u32 {
        self.pages.len() as u32 - self.shared_pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packinfer::types::DType;

    fn shape() -> Shape {
        Shape { num_qo_heads: 2, num_kv_heads: 1, head_dim: 8, dtype: DType::Bf16, causal: true, sm_scale: 0.35 }
    }

    #[test]
    fn fork_shares_whole_pages_and_copies_the_partial_one() {
        let mut s = PagedStore::new(shape(), 2, 4, 16).unwrap();
        assert!(s.admit(100, None, 10).unwrap());
        s.append(100, 10).unwrap();
        let data: Vec<u16> = (0..80).collect();
        s.write_kv(1, 100, 0, &data, &data).unwrap();
        assert!(s.admit(1, Some(100), 13).unwrap());
        let m = s.metrics();
        // 3 pages of the prompt + 1 copied partial page; 10 + 2 stored tokens.
        assert_eq!((m.pages_used, m.tokens_stored, m.tokens_logical), (4, 12, 20));
        let (a, b) = (&s.seqs[&100].pages, &s.seqs[&1].pages);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // The copied page has the prompt's tokens 8 and 9.
        let at = b[2] as usize * 4 * 8;
        assert_eq!(s.k[1][at..at + 16], data[64..80]);
        s.append(1, 3).unwrap();
        assert_eq!(s.len(1).unwrap(), 13);
        assert!(s.write_kv(0, 1, 4, &data[..8], &data[..8]).is_err(), "shared pages are read-only");
        assert!(s.release(100).is_err(), "a prompt with live forks stays");
        s.release(1).unwrap();
        s.release(100).unwrap();
        assert_eq!(s.metrics().pages_used, 0);
        assert_eq!(s.committed, 0);
    }

    #[test]
    fn admission_respects_reservations() {
        let mut s = PagedStore::new(shape(), 1, 4, 4).unwrap();
        assert!(s.admit(0, None, 9).unwrap()); // 3 pages promised
        assert!(!s.admit(1, None, 5).unwrap()); // 2 more do not fit
        assert!(s.admit(2, None, 4).unwrap());
        s.append(0, 2).unwrap();
        assert_eq!(s.metrics().pages_used, 1);
        assert!(matches!(s.append(2, 5), Err(Error::PoolExhausted(_))));
        s.release(0).unwrap();
        s.release(2).unwrap();
        assert_eq!((s.committed, s.metrics().pages_used), (0, 0));
    }
}
