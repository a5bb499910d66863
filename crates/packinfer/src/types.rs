//! Plain descriptions shared by every layer: element types, the model's attention shape, the
//! batch of one engine step, and the layout of an engine's KV cache.

use crate::error::Result;
use crate::invalid;

/// Element type of Q, K, V and O. Accumulation is always fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision (the CPU backend only).
    F32,
    /// fp8 e4m3 ([`crate::fp8`]), for K and V only ([`Shape::kv_dtype`]), with scales given
    /// per run ([`KvScales`]).
    Fp8E4m3,
}

impl DType {
    /// Bytes of one element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::Fp8E4m3 => 1,
            DType::F16 | DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }
    /// "f16", "bf16", "f32" or "fp8_e4m3", for messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
            DType::Fp8E4m3 => "fp8_e4m3",
        }
    }
}

/// The attention shape of one model layer (every layer of a step shares it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Query (and output) heads; a positive multiple of `num_kv_heads`.
    pub num_qo_heads: u32,
    /// Key/value heads (GQA: each serves `num_qo_heads / num_kv_heads` query heads).
    pub num_kv_heads: u32,
    /// Elements of one head's vector.
    pub head_dim: u32,
    /// Element type of Q and O, and of K and V unless `kv_dtype` says otherwise.
    pub dtype: DType,
    /// Element type of K and V: `dtype`, or [`DType::Fp8E4m3`] (an fp8 cache, dequantized with
    /// the run's [`KvScales`]). Fixed at plan time, like the rest of the shape.
    pub kv_dtype: DType,
    /// Bottom-right aligned causal mask: query i of a request of q_len queries and kv_len keys
    /// sees keys `0 ..= kv_len - q_len + i`.
    pub causal: bool,
    /// Softmax scale applied to q·k; `1/sqrt(head_dim)` unless the engine says otherwise.
    pub sm_scale: f32,
}

impl Shape {
    /// The softmax scale an engine gets when it passes 0: `1/sqrt(head_dim)`.
    pub fn default_sm_scale(head_dim: u32) -> f32 {
        1.0 / (head_dim.max(1) as f32).sqrt()
    }

    /// Query heads that read the same KV head (the GQA group size); they share tile rows.
    pub fn group_size(&self) -> u32 {
        self.num_qo_heads / self.num_kv_heads
    }

    /// Checks the shape; the message names the first bad value.
    pub fn validate(&self) -> Result<()> {
        if self.num_kv_heads == 0 {
            return Err(invalid!("num_kv_heads = 0; need at least one KV head"));
        }
        if self.num_qo_heads > limits::MAX_HEADS {
            return Err(invalid!(
                "num_qo_heads = {} is more than the {} query heads a layer may have",
                self.num_qo_heads,
                limits::MAX_HEADS
            ));
        }
        if self.num_qo_heads == 0 || !self.num_qo_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid!(
                "num_qo_heads = {} is not a positive multiple of num_kv_heads = {}",
                self.num_qo_heads,
                self.num_kv_heads
            ));
        }
        if self.head_dim == 0 {
            return Err(invalid!("head_dim = 0; a head has at least one dimension"));
        }
        if !self.head_dim.is_multiple_of(8) || self.head_dim > 512 {
            return Err(crate::unsupported!(
                "head_dim = {} is not supported (multiples of 8 up to 512; the GPU kernels take 64, 96, 128, 192 and 256)",
                self.head_dim
            ));
        }
        if self.dtype == DType::Fp8E4m3 {
            return Err(invalid!("dtype = fp8_e4m3, but Q and O are f16, bf16 or f32; fp8 is a K/V dtype (kv_dtype)"));
        }
        if self.kv_dtype != self.dtype && self.kv_dtype != DType::Fp8E4m3 {
            return Err(invalid!(
                "kv_dtype = {} with dtype = {}: K and V have Q's dtype or fp8_e4m3",
                self.kv_dtype.name(),
                self.dtype.name()
            ));
        }
        if !(self.sm_scale.is_finite() && self.sm_scale > 0.0) {
            return Err(invalid!("sm_scale = {} must be positive and finite (0 selects 1/sqrt(head_dim))", self.sm_scale));
        }
        Ok(())
    }
}

/// Limits of the API (the header states them): a value beyond one is `InvalidArgument`. They
/// keep every index in 32 bits and every allocation the planner makes bounded by the batch.
pub(crate) mod limits {
    /// Query heads of a layer.
    pub const MAX_HEADS: u32 = 1 << 16;
    /// Keys of one request: kv lengths and key positions are 32-bit signed in the kernels.
    pub const MAX_KV_LEN: u64 = i32::MAX as u64;
    /// Query rows of a step, `total_q × num_qo_heads`: rows are 32-bit in the kernels.
    pub const MAX_QO_ROWS: u64 = i32::MAX as u64;
    /// Work items of a plan (a split into smaller pieces than this allows is refused: see
    /// `PlanOptions::capacity` and `split_keys`).
    pub const MAX_WORK_ITEMS: usize = 1 << 22;
}

/// Requests that share the first `prefix_len` keys: their KV there is the same content, so it is
/// read once (from the first member's pages) for all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixGroup {
    /// Keys the members share, from their first.
    pub prefix_len: u32,
    /// Requests of the batch (at least two, each in at most one group).
    pub members: Vec<u32>,
}

impl PrefixGroup {
    /// A group of `members`, in the allocation of one of `spare`'s groups where there is one.
    pub fn reusing(spare: &mut Vec<PrefixGroup>, prefix_len: u32, members: &[u32]) -> PrefixGroup {
        let mut g = spare.pop().unwrap_or(PrefixGroup { prefix_len, members: Vec::new() });
        g.prefix_len = prefix_len;
        g.members.clear();
        g.members.extend_from_slice(members);
        g
    }
}

/// One engine step: which query tokens each request brings and where its keys live, as CSR page
/// tables (FlashInfer's convention). Owned copies: the library keeps no pointer into caller memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `batch_size + 1` entries: request r's query tokens are `qo_indptr[r] .. qo_indptr[r + 1]`.
    pub qo_indptr: Vec<i32>,
    /// `batch_size + 1` entries: request r's pages are `kv_page_indices[kv_indptr[r] ..
    /// kv_indptr[r + 1]]`.
    pub kv_indptr: Vec<i32>,
    /// The requests' pages, in key order.
    pub kv_page_indices: Vec<i32>,
    /// Keys in each request's last page (1 ..= page_size; 0 for a request without pages).
    pub kv_last_page_len: Vec<i32>,
    /// Keys per page.
    pub page_size: u32,
    /// Pages in the cache the page indices point into; every index must be below it.
    pub num_pages: u32,
    /// Requests declared to share a prefix.
    pub prefix_groups: Vec<PrefixGroup>,
    /// Bit-packed custom masks (tree speculative decoding), FlashInfer's layout: request r's
    /// mask is `custom_mask[mask_indptr[r] .. mask_indptr[r + 1]]`, its `q_len × kv_len` bits
    /// row-major (query i, key j is bit `i·kv_len + j`), little-endian within each byte (bit
    /// b of byte B is bit `8·B + b`), padded to whole bytes. A set bit lets the query see the
    /// key. With a mask the causal mask is not applied (the custom mask replaces it, as in
    /// FlashInfer); a sliding window and the soft-cap still are. Empty: no custom mask.
    pub custom_mask: Vec<u8>,
    /// Empty (no custom mask) or `batch_size + 1` byte offsets into `custom_mask`, from 0,
    /// request r's segment holding exactly `ceil(q_len · kv_len / 8)` bytes.
    pub mask_indptr: Vec<i32>,
}

impl Batch {
    /// Requests in the batch.
    pub fn len(&self) -> usize {
        self.kv_last_page_len.len()
    }
    /// Whether the batch has no request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Index of request `r`'s first query token in the step.
    #[inline]
    pub fn q_start(&self, r: usize) -> u32 {
        self.qo_indptr[r] as u32
    }
    /// Query tokens of request `r`.
    #[inline]
    pub fn q_len(&self, r: usize) -> u32 {
        (self.qo_indptr[r + 1] - self.qo_indptr[r]) as u32
    }
    /// Keys of request `r`. At most `limits::MAX_KV_LEN` once the batch is validated.
    #[inline]
    pub fn kv_len(&self, r: usize) -> u32 {
        self.kv_len_u64(r).min(u32::MAX as u64) as u32
    }
    /// `kv_len` in 64 bits, for validation: pages × page_size overflows 32 bits on bad input.
    #[inline]
    fn kv_len_u64(&self, r: usize) -> u64 {
        let pages = (self.kv_indptr[r + 1] as i64 - self.kv_indptr[r] as i64).max(0) as u64;
        if pages == 0 {
            0
        } else {
            (pages - 1) * self.page_size as u64 + self.kv_last_page_len[r].max(0) as u64
        }
    }
    /// Whether the batch carries custom masks (`mask_indptr` is not empty).
    #[inline]
    pub fn has_custom_mask(&self) -> bool {
        !self.mask_indptr.is_empty()
    }
    /// Whether the causal mask applies to this batch under a shape's `causal`: not when the
    /// batch carries custom masks, which replace it (FlashInfer's rule).
    #[inline]
    pub fn applies_causal(&self, causal: bool) -> bool {
        causal && !self.has_custom_mask()
    }
    /// Whether query `q` (0-based in request `r`) may see key `k` under the custom mask; true
    /// without one. The batch must be validated and `q`, `k` inside the request.
    #[inline]
    pub fn mask_allows(&self, r: usize, q: u32, k: u32) -> bool {
        if self.mask_indptr.is_empty() {
            return true;
        }
        let bit = q as u64 * self.kv_len(r) as u64 + k as u64;
        let byte = self.custom_mask[self.mask_indptr[r] as usize + (bit / 8) as usize];
        (byte >> (bit % 8)) & 1 != 0
    }
    /// Query tokens of the whole step.
    pub fn total_q(&self) -> u32 {
        *self.qo_indptr.last().unwrap_or(&0) as u32
    }
    /// Makes this batch a copy of `other`, in this batch's allocations where they are large
    /// enough (`clone_from` would allocate each prefix group's members anew).
    pub fn copy_from(&mut self, other: &Batch) {
        self.copy_from_keeping(other, &mut Vec::new());
    }

    /// [`Batch::copy_from`], moving prefix groups this batch no longer needs into `spare` and
    /// taking those it needs from there first, so that their member lists' allocations survive
    /// steps with fewer groups.
    pub fn copy_from_keeping(&mut self, other: &Batch, spare: &mut Vec<PrefixGroup>) {
        self.copy_from_measuring_pages(other, spare);
    }

    /// [`Batch::copy_from_keeping`], returning the page list's largest index (read as
    /// unsigned) where it was found while copying (with AVX2), for [`Batch::validate_with`]: the
    /// planner's check then needs no second pass over a list that may be a large part of
    /// planning time.
    pub(crate) fn copy_from_measuring_pages(&mut self, other: &Batch, spare: &mut Vec<PrefixGroup>) -> Option<u32> {
        self.qo_indptr.clone_from(&other.qo_indptr);
        self.kv_indptr.clone_from(&other.kv_indptr);
        let largest_page = self.set_pages_measuring(&other.kv_page_indices);
        self.kv_last_page_len.clone_from(&other.kv_last_page_len);
        self.page_size = other.page_size;
        self.num_pages = other.num_pages;
        self.custom_mask.clone_from(&other.custom_mask);
        self.mask_indptr.clone_from(&other.mask_indptr);
        spare.append(&mut self.prefix_groups);
        for src in &other.prefix_groups {
            self.prefix_groups.push(PrefixGroup::reusing(spare, src.prefix_len, &src.members));
        }
        largest_page
    }

    /// Makes `pages` this batch's page list (in its allocation where it is large enough),
    /// returning its largest index as [`Batch::copy_from_measuring_pages`] does.
    pub(crate) fn set_pages_measuring(&mut self, pages: &[i32]) -> Option<u32> {
        copy_pages(&mut self.kv_page_indices, pages)
    }

    /// The page holding key `k` of request `r`.
    pub fn page_of(&self, r: usize, k: u32) -> u32 {
        self.kv_page_indices[self.kv_indptr[r] as usize + (k / self.page_size) as usize] as u32
    }

    /// Checks every structural rule; the message names the first bad value it finds.
    pub fn validate(&self, causal: bool) -> Result<()> {
        self.validate_with(causal, &mut Vec::new(), None)
    }

    /// [`Batch::validate`] with its per-request buffer (used only with prefix groups) lent, so a
    /// planner that validates every step allocates nothing. `largest_page` is the page list's
    /// largest index read as unsigned, where [`Batch::copy_from_measuring_pages`] found it while
    /// making this batch (None: the list is scanned here).
    pub(crate) fn validate_with(&self, causal: bool, group_of: &mut Vec<u32>, largest_page: Option<u32>) -> Result<()> {
        let n = self.kv_last_page_len.len();
        if self.page_size == 0 {
            return Err(invalid!("page_size = 0; pages hold at least one token"));
        }
        if self.qo_indptr.len() != n + 1 || self.kv_indptr.len() != n + 1 {
            return Err(invalid!(
                "qo_indptr and kv_indptr need batch_size + 1 = {} entries (got {} and {})",
                n + 1,
                self.qo_indptr.len(),
                self.kv_indptr.len()
            ));
        }
        check_indptr("qo_indptr", &self.qo_indptr)?;
        check_indptr("kv_indptr", &self.kv_indptr)?;
        let nnz = self.kv_indptr[n] as usize;
        if nnz != self.kv_page_indices.len() {
            return Err(invalid!("kv_indptr[{n}] = {nnz} but kv_page_indices has {} entries", self.kv_page_indices.len()));
        }
        // A branch-free pass over the whole array (`pages_in_range`) unless the copy measured
        // it; only a bad batch pays for finding the first offender.
        let in_range = match largest_page {
            // The measure of no pages is 0, which no page of an empty cache fits.
            Some(largest) => self.kv_page_indices.is_empty() || largest_page_fits(largest, self.num_pages),
            None => pages_in_range(&self.kv_page_indices, self.num_pages),
        };
        if !in_range {
            let (i, p) = self
                .kv_page_indices
                .iter()
                .enumerate()
                .find(|(_, &p)| p < 0 || p as u32 >= self.num_pages)
                .map(|(i, &p)| (i, p))
                .expect("an offending index");
            return Err(invalid!("kv_page_indices[{i}] = {p} is outside the cache's {} pages", self.num_pages));
        }
        let causal = self.applies_causal(causal);
        for r in 0..n {
            let pages = self.kv_indptr[r + 1] - self.kv_indptr[r];
            let last = self.kv_last_page_len[r];
            let ok = if pages == 0 { last == 0 } else { last >= 1 && last as u32 <= self.page_size };
            if !ok {
                return Err(invalid!(
                    "kv_last_page_len[{r}] = {last} is not valid for a request with {pages} pages of {} tokens (1..={} when it has pages, 0 when it has none)",
                    self.page_size,
                    self.page_size
                ));
            }
            // `kv_len_u64` from the values at hand (the indptr rises, so `pages` ≥ 0).
            let kv_len = if pages == 0 { 0 } else { (pages - 1) as u64 * self.page_size as u64 + last as u64 };
            if kv_len > limits::MAX_KV_LEN {
                return Err(invalid!(
                    "request {r} has {pages} pages of page_size = {} (kv_len = {kv_len}), more than the {} keys a request may have",
                    self.page_size,
                    limits::MAX_KV_LEN
                ));
            }
            if causal && self.q_len(r) as u64 > kv_len {
                return Err(invalid!(
                    "request {r} has q_len = {} > kv_len = {}; causal attention needs every query's own key in the cache",
                    self.q_len(r),
                    self.kv_len(r)
                ));
            }
        }
        self.validate_custom_mask()?;
        group_of.clear();
        group_of.resize(if self.prefix_groups.is_empty() { 0 } else { n }, u32::MAX);
        for (g, pg) in self.prefix_groups.iter().enumerate() {
            if pg.members.len() < 2 {
                return Err(invalid!("prefix_groups[{g}] has {} member(s); a shared prefix needs at least 2", pg.members.len()));
            }
            if pg.prefix_len == 0 {
                return Err(invalid!("prefix_groups[{g}].prefix_len = 0"));
            }
            for (j, &m) in pg.members.iter().enumerate() {
                let m = m as usize;
                if m >= n {
                    return Err(invalid!("prefix_groups[{g}].members[{j}] = {m} is not a request of this batch of {n}"));
                }
                if group_of[m] != u32::MAX {
                    return Err(invalid!(
                        "request {m} is in prefix_groups[{}] and prefix_groups[{g}]; a request belongs to at most one prefix group",
                        group_of[m]
                    ));
                }
                group_of[m] = g as u32;
                if pg.prefix_len > self.kv_len(m) {
                    return Err(invalid!(
                        "prefix_groups[{g}].prefix_len = {} is longer than member request {m}'s kv_len = {}",
                        pg.prefix_len,
                        self.kv_len(m)
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Batch {
    /// The custom mask's rules (see `custom_mask`); the message names the first bad value.
    /// Called after the indptrs and page tables are checked, so `kv_len` is exact.
    fn validate_custom_mask(&self) -> Result<()> {
        if self.mask_indptr.is_empty() {
            if !self.custom_mask.is_empty() {
                return Err(invalid!(
                    "custom_mask has {} bytes but mask_indptr is empty; a custom mask needs batch_size + 1 offsets",
                    self.custom_mask.len()
                ));
            }
            return Ok(());
        }
        let n = self.len();
        if self.mask_indptr.len() != n + 1 {
            return Err(invalid!("mask_indptr needs batch_size + 1 = {} entries (got {})", n + 1, self.mask_indptr.len()));
        }
        check_indptr("mask_indptr", &self.mask_indptr)?;
        for r in 0..n {
            let bytes = (self.mask_indptr[r + 1] - self.mask_indptr[r]) as u64;
            let want = (self.q_len(r) as u64 * self.kv_len(r) as u64).div_ceil(8);
            if bytes != want {
                return Err(invalid!(
                    "mask_indptr[{}] - mask_indptr[{r}] = {bytes} bytes, but request {r}'s mask of q_len = {} × kv_len = {} bits packs into {want}",
                    r + 1,
                    self.q_len(r),
                    self.kv_len(r)
                ));
            }
        }
        let end = self.mask_indptr[n] as usize;
        if end != self.custom_mask.len() {
            return Err(invalid!("mask_indptr[{n}] = {end} but custom_mask has {} bytes", self.custom_mask.len()));
        }
        Ok(())
    }
}

/// Whether every index of `pages` is a page of a cache of `num_pages` (in `0..num_pages`).
/// On long contexts this check is a large part of planning time: it vectorizes, with AVX2
/// where the CPU has it (a build for baseline x86-64 has only SSE2, which takes 3 instructions
/// per 4 indices here against 1 per 8).
fn pages_in_range(pages: &[i32], num_pages: u32) -> bool {
    let Some(last) = num_pages.checked_sub(1) else {
        return pages.is_empty();
    };
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // A negative index reads as 2^31 or more, above every page an i32 can name.
        // SAFETY: the CPU has AVX2, the only feature the function enables (checked just above).
        return unsafe { largest_page_avx2(pages) } <= last.min(i32::MAX as u32);
    }
    pages_up_to(pages, last)
}

/// Whether a page list whose largest index read as unsigned is `largest` names only pages of a
/// cache of `num_pages`: a negative index reads as 2^31 or more, above every page an i32 can
/// name.
#[inline]
fn largest_page_fits(largest: u32, num_pages: u32) -> bool {
    num_pages.checked_sub(1).is_some_and(|last| largest <= last.min(i32::MAX as u32))
}

/// Copies `src` into `dst` (its allocation reused) and, with AVX2, returns the largest index
/// read as unsigned (0 for none), found in the same pass: the load each index needs for the
/// copy serves the check, where a copy and then a scan read the list twice. Without AVX2 (no
/// unsigned maximum) it only copies and returns None.
fn copy_pages(dst: &mut Vec<i32>, src: &[i32]) -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        dst.clear();
        dst.reserve(src.len());
        // SAFETY: the CPU has AVX2, the only feature the function enables (checked just above).
        let largest = unsafe { copy_largest_page_avx2(&mut dst.spare_capacity_mut()[..src.len()], src) };
        // SAFETY: the reserve made room for `src.len()` elements, and the copy initialised the
        // first `src.len()` of the spare capacity.
        unsafe { dst.set_len(src.len()) };
        return Some(largest);
    }
    dst.clear();
    dst.extend_from_slice(src);
    None
}

/// Writes `src` into `dst` (at least as long) and returns its largest index read as unsigned,
/// 0 for none: per 8 indices a load, a store and an unsigned maximum. In intrinsics, because
/// the compiler splits the plain loop back into a `memcpy` and a scan.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn copy_largest_page_avx2(dst: &mut [std::mem::MaybeUninit<i32>], src: &[i32]) -> u32 {
    use std::arch::x86_64::{__m256i, _mm256_max_epu32, _mm256_setzero_si256};
    assert!(dst.len() >= src.len());
    let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let blocks = src.len() / 16;
    for i in 0..blocks {
        // SAFETY: indices 16i..16i + 16 are inside `src` (i < len / 16) and `dst` (as long or
        // longer); the loads and stores are unaligned, any i32 is a valid `__m256i` lane.
        unsafe {
            let from = src.as_ptr().add(16 * i).cast::<__m256i>();
            let to = dst.as_mut_ptr().add(16 * i).cast::<__m256i>();
            let (x, y) = (from.read_unaligned(), from.add(1).read_unaligned());
            to.write_unaligned(x);
            to.add(1).write_unaligned(y);
            a = _mm256_max_epu32(a, x);
            b = _mm256_max_epu32(b, y);
        }
    }
    // SAFETY: a `__m256i` is 8 lanes of 32 bits.
    let lanes: [u32; 8] = unsafe { std::mem::transmute(_mm256_max_epu32(a, b)) };
    let mut largest = lanes.into_iter().max().unwrap_or(0);
    for (d, &p) in dst[16 * blocks..].iter_mut().zip(&src[16 * blocks..]) {
        d.write(p);
        largest = largest.max(p as u32);
    }
    largest
}

/// Whether every index of `pages` is in `0..=last`, without AVX2. An index p is in range
/// exactly when neither p nor last - p is negative, so OR-ing both into one word and testing
/// its sign is the whole check: a subtraction and two ORs per index, no compares (SSE2 has no
/// unsigned maximum). For p < 0 the subtraction may wrap; p's own sign bit is already set.
fn pages_up_to(pages: &[i32], last: u32) -> bool {
    let last = last.min(i32::MAX as u32) as i32;
    pages.iter().fold(0i32, |acc, &p| acc | p | last.wrapping_sub(p)) >= 0
}

/// The largest index of `pages` read as unsigned, 0 for none: one unsigned maximum per 8
/// indices.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn largest_page_avx2(pages: &[i32]) -> u32 {
    pages.iter().fold(0u32, |m, &p| m.max(p as u32))
}

fn check_indptr(name: &str, v: &[i32]) -> Result<()> {
    if v[0] != 0 {
        return Err(invalid!("{name}[0] = {} must be 0", v[0]));
    }
    for i in 1..v.len() {
        if v[i] < v[i - 1] {
            return Err(invalid!("{name}[{i}] = {} is smaller than {name}[{}] = {}; it must not decrease", v[i], i - 1, v[i - 1]));
        }
    }
    Ok(())
}

/// Where K and V of a paged cache live: base pointers and element strides, so NHD, HND and an
/// engine's own layout all work without copies. Element (page p, token t, head h, dim d) of K is
/// at `k + p*page + t*token + h*head + d*dim` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Address of K's element (0, 0, 0, 0).
    pub k: u64,
    /// Address of V's element (0, 0, 0, 0).
    pub v: u64,
    /// Elements between pages.
    pub stride_page: i64,
    /// Elements between the tokens of a page.
    pub stride_token: i64,
    /// Elements between KV heads.
    pub stride_head: i64,
    /// Elements between the dims of a head (1 for the fast paths).
    pub stride_dim: i64,
}

/// Where a layer's query and output live: ragged token-major `[tokens, heads, head_dim]` with
/// element strides (contiguous when the strides are `heads*head_dim` and `head_dim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsTensor {
    /// Address of element (0, 0, 0).
    pub ptr: u64,
    /// Elements between tokens.
    pub stride_token: i64,
    /// Elements between heads (dims are contiguous).
    pub stride_head: i64,
}

/// Everything one `run` needs besides the launch: one layer's tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunArgs {
    /// The queries, `[total_q, num_qo_heads, head_dim]`.
    pub q: RowsTensor,
    /// The paged K/V cache the plan's page indices point into.
    pub kv: KvLayout,
    /// The output, Q's shape and dtype.
    pub o: RowsTensor,
    /// `float32 [total_q, num_qo_heads]`, natural log; 0 when not wanted.
    pub lse: u64,
    /// The caller's CUDA stream (ignored by the CPU backend).
    pub stream: u64,
    /// Logit soft-cap (Gemma 2): a score `s = sm_scale · q·k` becomes `cap · tanh(s / cap)`
    /// before the softmax; 0 turns it off. A run parameter, not a plan one: each run (each
    /// layer) uses the value it is given, and nothing about it is fixed when the plan is made.
    pub logits_soft_cap: f32,
    /// How an fp8 cache's codes become values; [`KvScales::NONE`] for a cache of Q's dtype. A
    /// run parameter (each layer has its own scales), like the soft-cap.
    pub kv_scales: KvScales,
}

/// The dequantization scales of an fp8 K/V cache ([`Shape::kv_dtype`] = [`DType::Fp8E4m3`]):
/// element `x` of KV head `h` of K is `e4m3(x) · k_scale · k_head_scales[h]` (V alike), the
/// per-head factor 1 where its array is not given. Engines pass one of the two: vLLM and
/// FlashInfer a per-tensor scale per layer, checkpoints quantized per head an array.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvScales {
    /// K's per-tensor scale.
    pub k_scale: f32,
    /// V's per-tensor scale.
    pub v_scale: f32,
    /// 0, or the address of `num_kv_heads` f32 (device memory on CUDA, host memory on the
    /// CPU), read by each run (so a captured CUDA graph reads their current values).
    pub k_head_scales: u64,
    /// See `k_head_scales`.
    pub v_head_scales: u64,
}

impl KvScales {
    /// No scaling: what a cache of Q's dtype runs with (and an fp8 one of scale 1).
    pub const NONE: KvScales = KvScales { k_scale: 1.0, v_scale: 1.0, k_head_scales: 0, v_head_scales: 0 };

    /// Checks the scales against the K/V dtype; the message names the bad value. The per-head
    /// arrays' values are the caller's memory (device memory on CUDA) and are not checked.
    pub fn validate(&self, kv_dtype: DType) -> Result<()> {
        if kv_dtype != DType::Fp8E4m3 {
            let stray = if self.k_scale != 1.0 {
                format!("k_scale = {}", self.k_scale)
            } else if self.v_scale != 1.0 {
                format!("v_scale = {}", self.v_scale)
            } else if self.k_head_scales != 0 {
                format!("k_head_scales = 0x{:x}", self.k_head_scales)
            } else if self.v_head_scales != 0 {
                format!("v_head_scales = 0x{:x}", self.v_head_scales)
            } else {
                return Ok(());
            };
            return Err(invalid!(
                "{stray}, but K and V are {}: scales apply to an fp8_e4m3 cache only (leave the scales 1 and the per-head arrays null)",
                kv_dtype.name()
            ));
        }
        for (name, x) in [("k_scale", self.k_scale), ("v_scale", self.v_scale)] {
            if !(x.is_finite() && x > 0.0) {
                return Err(invalid!("{name} = {x} must be positive and finite"));
            }
        }
        Ok(())
    }
}

impl Default for KvScales {
    fn default() -> Self {
        KvScales::NONE
    }
}

impl RunArgs {
    /// Checks the run's scalar parameters for a plan whose K/V are `kv_dtype`; the message
    /// names the bad value.
    pub fn validate(&self, kv_dtype: DType) -> Result<()> {
        let cap = self.logits_soft_cap;
        if !(cap.is_finite() && cap >= 0.0) {
            return Err(invalid!("logits_soft_cap = {cap} must be 0 (off) or positive and finite"));
        }
        self.kv_scales.validate(kv_dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_indices_are_checked_against_the_cache_at_its_edges() {
        // One request of three pages of 16 keys; page 1 is the one under test.
        let batch = |page: i32, num_pages: u32| Batch {
            qo_indptr: vec![0, 1],
            kv_indptr: vec![0, 3],
            kv_page_indices: vec![0, page, 0],
            kv_last_page_len: vec![16],
            page_size: 16,
            num_pages,
            prefix_groups: vec![],
            custom_mask: Vec::new(),
            mask_indptr: Vec::new(),
        };
        let max = i32::MAX;
        for (page, num_pages, ok) in [
            (0, 1, true),
            (4, 5, true),
            (5, 5, false),
            (-1, 5, false),
            (i32::MIN, 5, false),
            (max, 5, false),
            (max - 1, max as u32, true),
            (max, max as u32, false),
            (max, max as u32 + 1, true),
            (max, u32::MAX, true),
            (-1, u32::MAX, false),
            (i32::MIN, u32::MAX, false),
        ] {
            let got = batch(page, num_pages).validate(true);
            // The planner's way: the copy measures the list, validation trusts the measure.
            let mut copy = batch(0, 1);
            let largest = copy.copy_from_measuring_pages(&batch(page, num_pages), &mut Vec::new());
            let copied = copy.validate_with(true, &mut Vec::new(), largest);
            for got in [got, copied] {
                assert_eq!(got.is_ok(), ok, "page {page} of {num_pages}: {got:?}");
                if !ok {
                    let m = got.unwrap_err().to_string();
                    assert!(m.contains(&format!("kv_page_indices[1] = {page}")), "{m}");
                }
            }
        }
        // Both ways of checking, against a plain compare, across the vector widths' remainders.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(21);
        let mut copy = vec![7; 3];
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 64, 100, 1027] {
            for num_pages in [1u32, 2, 1000, max as u32, max as u32 + 1, u32::MAX] {
                for bad in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                    let mut pages: Vec<i32> = (0..len).map(|_| (rng.random_range(0..num_pages as u64)) as i32).collect();
                    if let (Some(i), false) = (bad, pages.is_empty()) {
                        pages[i] = [-1, i32::MIN, num_pages.min(max as u32) as i32, max][rng.random_range(0..4)];
                    }
                    let want = pages.iter().all(|&p| p >= 0 && (p as u32) < num_pages);
                    assert_eq!(pages_in_range(&pages, num_pages), want, "{len} pages of {num_pages}, bad {bad:?}");
                    assert_eq!(pages_up_to(&pages, num_pages - 1), want, "{len} pages of {num_pages}, bad {bad:?}");
                    let largest = copy_pages(&mut copy, &pages);
                    assert_eq!(copy, pages);
                    if let Some(largest) = largest {
                        assert_eq!(largest, pages.iter().map(|&p| p as u32).max().unwrap_or(0), "{len} pages");
                        assert_eq!(largest_page_fits(largest, num_pages), want, "{len} pages of {num_pages}, bad {bad:?}");
                    }
                }
            }
        }
        // No pages in the cache: any index is outside; none is fine.
        assert!(batch(0, 0).validate(true).is_err());
        let empty =
            Batch { kv_indptr: vec![0, 0], kv_page_indices: vec![], kv_last_page_len: vec![0], qo_indptr: vec![0, 0], ..batch(0, 0) };
        empty.validate(true).unwrap();
        let mut copy = batch(0, 1);
        let largest = copy.copy_from_measuring_pages(&empty, &mut Vec::new());
        copy.validate_with(true, &mut Vec::new(), largest).unwrap();
        let largest = copy.copy_from_measuring_pages(&batch(0, 0), &mut Vec::new());
        assert!(copy.validate_with(true, &mut Vec::new(), largest).is_err());
    }

    /// One request of 3 queries × 5 keys (15 bits, 2 bytes) and one of 1 × 2 (1 byte).
    fn masked(custom_mask: Vec<u8>, mask_indptr: Vec<i32>) -> Batch {
        Batch {
            qo_indptr: vec![0, 3, 4],
            kv_indptr: vec![0, 1, 2],
            kv_page_indices: vec![0, 1],
            kv_last_page_len: vec![5, 2],
            page_size: 8,
            num_pages: 2,
            prefix_groups: vec![],
            custom_mask,
            mask_indptr,
        }
    }

    #[test]
    fn custom_mask_bits_are_row_major_and_little_endian_per_request() {
        // Request 0: query i sees key j where bit i*5 + j is set. Row 0 = keys 0, 4; row 1 =
        // key 1 (bit 6); row 2 = key 3 (bit 13). Request 1: query 0 sees key 1 only.
        let b = masked(vec![0b0101_0001, 0b0010_0000, 0b10], vec![0, 2, 3]);
        b.validate(true).unwrap();
        let seen = |r: usize, q: u32| (0..b.kv_len(r)).filter(|&k| b.mask_allows(r, q, k)).collect::<Vec<_>>();
        assert_eq!(seen(0, 0), [0, 4]);
        assert_eq!(seen(0, 1), [1]);
        assert_eq!(seen(0, 2), [3]);
        assert_eq!(seen(1, 0), [1]);
        assert!(!b.applies_causal(true));
        assert!(masked(vec![], vec![]).applies_causal(true));
    }

    #[test]
    fn custom_mask_lengths_and_offsets_are_checked_by_name() {
        let bad = |m: Vec<u8>, ip: Vec<i32>, needle: &str| {
            let e = masked(m, ip).validate(true).unwrap_err();
            assert!(matches!(e, crate::error::Error::InvalidArgument(_)), "{e:?}");
            assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        };
        bad(vec![0; 3], vec![], "custom_mask has 3 bytes but mask_indptr is empty");
        bad(vec![0; 3], vec![0, 2], "mask_indptr needs batch_size + 1 = 3 entries (got 2)");
        bad(vec![0; 3], vec![1, 2, 3], "mask_indptr[0] = 1 must be 0");
        bad(vec![0; 3], vec![0, 3, 2], "mask_indptr[2] = 2 is smaller");
        bad(
            vec![0; 3],
            vec![0, 1, 2],
            "mask_indptr[1] - mask_indptr[0] = 1 bytes, but request 0's mask of q_len = 3 × kv_len = 5 bits packs into 2",
        );
        bad(vec![0; 4], vec![0, 2, 4], "mask_indptr[2] - mask_indptr[1] = 2 bytes");
        bad(vec![0; 4], vec![0, 2, 3], "mask_indptr[2] = 3 but custom_mask has 4 bytes");
        // Without causal masking a mask lets a request have more queries than keys.
        let mut b = masked(vec![0; 3], vec![0, 2, 3]);
        b.validate(true).unwrap();
        b.qo_indptr = vec![0, 3, 6];
        b.custom_mask = vec![0; 3];
        b.mask_indptr = vec![0, 2, 3];
        b.validate(true).unwrap();
        b.mask_indptr.clear();
        b.custom_mask.clear();
        assert!(b.validate(true).unwrap_err().to_string().contains("q_len = 3 > kv_len = 2"));
    }
}
