//! A plan bound to the device: fixed-capacity device buffers holding the work list, the kernel
//! variant resolved, scratch bound, and a completion event. `run` only fills a parameter struct
//! on the stack and launches two kernels whose grids depend on the device, never on the batch,
//! so it can be captured in a CUDA graph and replayed after `update` uploads another plan.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use parking_lot::Mutex;

use super::compile::Variant;
use super::driver::{self, DeviceBuffer, Event, PinnedBuffer};
use super::{LoadedAttention, Shared};
use crate::backend::{BoundPlan, LaunchCapacity, Scratch};
use crate::error::Result;
use crate::invalid;
use crate::plan::{KvChunk, LayoutStamp, Plan, RequestInfo, RowSegment, FINAL_OUTPUT};
use crate::types::{Batch, DType, KvLayout, RunArgs, Shape};

/// Counts and shape of the uploaded plan; mirrors `PlanHeader` in `kernels/work.cuh`. The
/// structs here are `Pod` because they reach the device as bytes: the derive proves they have
/// no padding (the reserved fields are named, and zeroed).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct PlanHeader {
    /// Work items of the plan.
    pub num_items: u32,
    /// Execution groups (entries of the group offsets, less one).
    pub num_groups: u32,
    /// Merge rows.
    pub num_merges: u32,
    /// Partial slots.
    pub num_slots: u32,
    /// Query heads per KV head.
    pub group_size: u32,
    /// Keys per page.
    pub page_size: u32,
    /// 1 for a causal mask.
    pub causal: u32,
    /// The sliding window, or `NO_WINDOW` (`PI_NO_WINDOW` in kernels/mask.cuh).
    pub window_left: u32,
    /// The softmax scale times log2(e): the kernels work in base 2.
    pub sm_scale_log2: f32,
    /// Zero; pads the header to 48 bytes, as work.cuh does.
    pub reserved2: [u32; 3],
}

/// The by-value parameter of both kernels; mirrors `KernelParams` in `kernels/work.cuh`. The
/// driver copies its bytes into the launch.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct KernelParams {
    /// Device address of the plan header.
    pub header: u64,
    /// Device address of the work items.
    pub items: u64,
    /// Device address of the resolved row segments.
    pub segments: u64,
    /// Device address of the resolved KV chunks.
    pub chunks: u64,
    /// Device address of the page list.
    pub pages: u64,
    /// Device address of the group offsets (group g's items are `off[g] .. off[g + 1]`).
    pub group_offsets: u64,
    /// Device address of the merge rows.
    pub merges: u64,
    /// Device address of the merge slot list.
    pub merge_slots: u64,
    /// The caller's Q.
    pub q: u64,
    /// Q's token stride, in elements.
    pub q_stride_token: i64,
    /// Q's head stride, in elements.
    pub q_stride_head: i64,
    /// The caller's K cache.
    pub k: u64,
    /// The caller's V cache.
    pub v: u64,
    /// K/V page stride, in elements.
    pub kv_stride_page: i64,
    /// K/V token stride, in elements.
    pub kv_stride_token: i64,
    /// K/V head stride, in elements.
    pub kv_stride_head: i64,
    /// K/V dim stride, in elements.
    pub kv_stride_dim: i64,
    /// The caller's O.
    pub o: u64,
    /// O's token stride, in elements.
    pub o_stride_token: i64,
    /// O's head stride, in elements.
    pub o_stride_head: i64,
    /// The caller's LSE, or 0.
    pub lse: u64,
    /// Partial rows, then their LSEs (fp32).
    pub scratch: u64,
    /// The next group to take; reset by the merge kernel.
    pub group_counter: u64,
    /// The `FLAG_*` bits that hold for this run.
    pub flags: u32,
    /// Query heads.
    pub num_qo_heads: u32,
    /// The run's soft-cap as the kernels apply it (`soft_cap` in kernels/mask.cuh):
    /// `2 log2(e) sm_scale / cap`, 0 without a soft-cap.
    pub softcap_in: f32,
    /// `cap / sm_scale`.
    pub softcap_out: f32,
    /// An fp8 cache's per-tensor K scale (`KvScales`; read by the fp8 kernel only).
    pub k_scale: f32,
    /// An fp8 cache's per-tensor V scale.
    pub v_scale: f32,
    /// Device address of the per-KV-head K scales, or 0.
    pub k_head_scales: u64,
    /// Device address of the per-KV-head V scales, or 0.
    pub v_head_scales: u64,
    /// Device address of the plan's custom mask bits, or 0 without a custom mask.
    pub mask: u64,
    /// Device address of, per query token of the step, the mask bit of (that query, key 0).
    pub mask_bit0: u64,
    /// Zero; keeps the TMA maps 64-byte aligned without padding.
    pub reserved: [u32; 4],
    /// TMA descriptor of K's rows (with `FLAG_KV_TMA`).
    pub k_map: TensorMap,
    /// TMA descriptor of V's rows (with `FLAG_KV_TMA`).
    pub v_map: TensorMap,
    /// TMA descriptor of Q (with `FLAG_Q_TMA`).
    pub q_map: TensorMap,
    /// TMA descriptor of O (with `FLAG_O_TMA`).
    pub o_map: TensorMap,
}

/// One KV head's copy of a plan's work item, as the kernels read it today (mirrors `WorkItem`
/// in `kernels/work.cuh`): the launch image lists the plan's item copies
/// ([`Plan::item_copies`]), sorted by group.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KernelItem {
    /// The KV head whose query heads fill the rows.
    pub kv_head: u32,
    /// The item's row segments.
    pub seg_begin: u32,
    /// See `seg_begin`.
    pub seg_count: u32,
    /// The item's KV chunks.
    pub chunk_begin: u32,
    /// See `chunk_begin`.
    pub chunk_count: u32,
    /// Rows of the tile.
    pub num_rows: u32,
    /// `FINAL_OUTPUT` (`PI_FINAL_OUTPUT`), or the copy's first partial slot.
    pub partial_slot: u32,
    /// The copy's group.
    pub group: u32,
}

/// One (token, query head) merge, as the kernels read it today (mirrors `MergeRow` in
/// `kernels/work.cuh`): the launch image expands each of the plan's merge rows (a token, every
/// query head) to one per query head, with that head's slots.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KernelMergeRow {
    /// The query token.
    pub q_token: u32,
    /// The query head.
    pub qo_head: u32,
    /// First entry of the image's merge slot list.
    pub slot_begin: u32,
    /// Entries: the token's pieces.
    pub slot_count: u32,
}

/// `PlanHeader::window_left` of a plan without a sliding window.
pub const NO_WINDOW: u32 = u32::MAX;

/// A plan's row segment resolved against its request, as the kernels read it (mirrors
/// `SegmentInfo` in `kernels/work.cuh`): row r of it is query token `token0 + (r - row_begin) /
/// group`, which sees keys below `limit0 + step * ((r - row_begin) / group)`. In a plan with a
/// sliding window that value is the query's position + 1 whether or not the plan is causal
/// (`row_keys` in kernels/mask.cuh turns it into the row's window and limit).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SegmentInfo {
    /// First tile row of the segment.
    pub row_begin: u32,
    /// Query token (in the step) of its first row.
    pub token0: u32,
    /// Keys its first row sees.
    pub limit0: u32,
    /// Keys each next token sees more (1 causal, 0 not).
    pub step: u32,
}

impl SegmentInfo {
    /// `seg` resolved against its request, for a plan with a sliding window (`windowed`) or not.
    pub fn of(seg: &RowSegment, req: &RequestInfo, causal: bool, windowed: bool) -> SegmentInfo {
        let positions = causal || windowed;
        SegmentInfo {
            row_begin: seg.row_begin,
            // Wrapping like the kernels' u32 arithmetic (the planner has checked q_len <= kv_len
            // for causal plans; a non-causal window's position may be negative, and the kernel
            // reads it as a signed number).
            token0: req.q_start.wrapping_add(seg.q_begin),
            // Causal masks are bottom-right aligned: query i of the request sees kv_len - q_len + i + 1 keys.
            limit0: if positions { req.kv_len.wrapping_sub(req.q_len).wrapping_add(seg.q_begin).wrapping_add(1) } else { req.kv_len },
            step: positions as u32,
        }
    }
}

/// A plan's KV chunk with its request's first page (mirrors `KvRange` in `kernels/work.cuh`),
/// and, where its keys sit in consecutive cache rows (row = page · page_size + slot: its pages
/// follow one another), the row of its first key, so that a kernel over a cache with a row view
/// addresses keys without reading their pages; `NO_ROW` otherwise.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KvRange {
    /// Offset of the request's first page in the page list.
    pub page_start: u32,
    /// First key of the chunk.
    pub key_begin: u32,
    /// One past its last key.
    pub key_end: u32,
    /// First tile row that reads it.
    pub row_begin: u32,
    /// One past the last such row.
    pub row_end: u32,
    /// Cache row of its first key, or `NO_ROW`.
    pub row0: u32,
}

/// `KvRange::row0` of a chunk whose keys are not in consecutive rows.
pub const NO_ROW: u32 = u32::MAX;

impl KvRange {
    /// `runs[i]`: the end of the run of consecutive page numbers that page list entry i starts
    /// (`consecutive_page_runs`).
    pub fn of(chunk: &KvChunk, req: &RequestInfo, batch: &Batch) -> KvRange {
        let mut row0 = NO_ROW;
        if chunk.key_end > chunk.key_begin {
            let ps = batch.page_size;
            let first = (req.page_start + chunk.key_begin / ps) as usize;
            let last = (req.page_start + (chunk.key_end - 1) / ps) as usize;
            let page = batch.kv_page_indices[first];
            let row = page as i64 * ps as i64 + (chunk.key_begin % ps) as i64;
            // The kernels add key offsets to row0 in 32 bits and TMA boxes take rows as i32.
            let consecutive = pages_consecutive(&batch.kv_page_indices[first..=last]);
            if consecutive && page >= 0 && row + ((chunk.key_end - chunk.key_begin) as i64) <= i32::MAX as i64 {
                row0 = row as u32;
            }
        }
        KvRange {
            page_start: req.page_start,
            key_begin: chunk.key_begin,
            key_end: chunk.key_end,
            row_begin: chunk.row_begin,
            row_end: chunk.row_end,
            row0,
        }
    }
}

/// Whether each page of `pages` is the one before plus 1. Scanned in blocks without an early
/// exit inside a block (so the compiler vectorises it), stopping at the first block with a gap:
/// scattered pages stop at once, pages in order cost one pass.
fn pages_consecutive(pages: &[i32]) -> bool {
    if pages.len() < 2 {
        return true;
    }
    let (a, b) = (&pages[..pages.len() - 1], &pages[1..]);
    a.chunks(64).zip(b.chunks(64)).all(|(x, y)| x.iter().zip(y).fold(true, |ok, (&u, &v)| ok & (u != i32::MAX) & (u.wrapping_add(1) == v)))
}

/// A TMA descriptor (the driver's CUtensorMap: 128 opaque bytes, 64-byte aligned).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct TensorMap(pub [u64; 16]);

pub const FLAG_Q_VEC: u32 = 1;
pub const FLAG_KV_VEC: u32 = 2;
pub const FLAG_KV_TMA: u32 = 4;
pub const FLAG_O_VEC: u32 = 8;
pub const FLAG_KV_ROWS: u32 = 16;
pub const FLAG_Q_TMA: u32 = 32;
pub const FLAG_O_TMA: u32 = 64;

/// The K/V caches' row stride (elements) where rows exist: the slots of a page are evenly spaced
/// rows and the next page continues them (row = page · page_size + slot), as in a ragged or
/// NHD-paged cache; None otherwise (e.g. HND pages of several slots).
fn kv_row_stride(kv: &KvLayout, page_size: u32) -> Option<i64> {
    // With one slot per page the token stride is never used: rows are pages.
    let row_stride = if page_size == 1 { kv.stride_page } else { kv.stride_token };
    (kv.stride_page == page_size as i64 * row_stride && row_stride > 0).then_some(row_stride)
}

/// A TMA descriptor of 16-bit elements over a 3-D tensor (dims[0] contiguous, byte strides of
/// dims 1 and 2) for boxes of `boxes` swizzled by 128 bytes (the kernels' shared-memory layout:
/// boxes[0] = 64 elements); None where TMA cannot describe it or the driver refuses it.
/// Host-only: no device call, no synchronisation.
fn tensor_map_3d(base: u64, dims: [u64; 3], strides: [u64; 2], boxes: [u32; 3]) -> Option<TensorMap> {
    use sys::{CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle};
    if !base.is_multiple_of(16)
        || strides.iter().any(|&s| s == 0 || !s.is_multiple_of(16) || s >= 1 << 40)
        || boxes.iter().any(|&b| b == 0 || b > 256)
    {
        return None;
    }
    let steps: [u32; 3] = [1, 1, 1];
    let mut map = TensorMap::default();
    // SAFETY: `map` is 128 writable, 64-byte aligned bytes (CUtensorMap's size and alignment);
    // the arrays have the rank's lengths. The call only encodes a descriptor on the host.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map as *mut TensorMap as *mut sys::CUtensorMap,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            3,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(map)
}

/// Elements to bytes for a TMA stride (None for a stride TMA cannot take).
fn stride_bytes(s: i64) -> Option<u64> {
    (s > 0).then(|| s as u64 * 2)
}

/// The TMA descriptor of one KV cache viewed as (head_dim, KV heads, rows) with row = page ·
/// page_size + slot, for boxes of 64 dims × 1 head × `box_rows` rows; None where that view does
/// not exist (`kv_row_stride`), the dims are not unit-strided, or head_dim is not a multiple of 64.
fn kv_tensor_map(base: u64, kv: &KvLayout, page_size: u32, head_dim: u32, kv_heads: u32, box_rows: u32) -> Option<TensorMap> {
    let row_stride = kv_row_stride(kv, page_size)?;
    if !head_dim.is_multiple_of(64) || kv.stride_dim != 1 {
        return None;
    }
    // Rows the kernel may ask for: any below 2^31 (it never asks past a plan's pages, and a plan
    // given to `update` may have more pages than the launch's first one).
    tensor_map_3d(
        base,
        [head_dim as u64, kv_heads as u64, i32::MAX as u64],
        [stride_bytes(kv.stride_head)?, stride_bytes(row_stride)?],
        [64, 1, box_rows],
    )
}

/// The TMA descriptor of Q or O viewed as (head_dim, query heads, tokens), for boxes of a tile
/// of one request's consecutive tokens: 64 dims × `group` heads × `block_m / group` tokens (a
/// tile row is a token's query head of the KV head, token-major). None where a tile is not such
/// a box (block_m not a multiple of the group) or TMA cannot describe the tensor.
fn qo_tensor_map(base: u64, stride_token: i64, stride_head: i64, shape: &Shape, block_m: u32) -> Option<TensorMap> {
    let group = shape.group_size();
    if !shape.head_dim.is_multiple_of(64) || group == 0 || !block_m.is_multiple_of(group) {
        return None;
    }
    // Tokens the kernel may ask for: the kernels move only whole tiles of one request by TMA, so
    // every box lies in the caller's tensor whatever the plan (a plan given to `update` may
    // have more tokens than the launch's first one).
    let dims = [shape.head_dim as u64, shape.num_qo_heads as u64, i32::MAX as u64];
    tensor_map_3d(base, dims, [stride_bytes(stride_head)?, stride_bytes(stride_token)?], [64, group, block_m / group])
}

/// Byte offsets of each array in the launch's device buffer (fixed by the capacity).
#[derive(Debug, Clone, Copy)]
struct Layout {
    group_counter: usize,
    items: usize,
    segments: usize,
    chunks: usize,
    pages: usize,
    group_offsets: usize,
    merges: usize,
    merge_slots: usize,
    mask: usize,
    mask_bit0: usize,
    total: usize,
}

impl Layout {
    fn new(c: &LaunchCapacity) -> Layout {
        let mut at = 0usize;
        let mut take = |bytes: usize| {
            let start = at;
            at = (at + bytes).div_ceil(256) * 256;
            start
        };
        let _header = take(std::mem::size_of::<PlanHeader>());
        let group_counter = take(4);
        let items = take(c.items as usize * std::mem::size_of::<KernelItem>());
        let segments = take(c.row_segments as usize * std::mem::size_of::<SegmentInfo>());
        let chunks = take(c.kv_chunks as usize * std::mem::size_of::<KvRange>());
        let pages = take(c.pages as usize * 4);
        let group_offsets = take((c.groups as usize + 1) * 4);
        let merges = take(c.merge_rows as usize * std::mem::size_of::<KernelMergeRow>());
        let merge_slots = take(c.merge_slots as usize * 4);
        let mask = take(c.mask_bytes as usize);
        let mask_bit0 = take(c.mask_queries as usize * 4);
        Layout { group_counter, items, segments, chunks, pages, group_offsets, merges, merge_slots, mask, mask_bit0, total: at }
    }
}

/// Copies `values` into the staging image at byte `at`; the layout sized the image for the
/// capacity, which the plan fits. `Pod`: the values' bytes are all initialized.
fn put<T: Pod>(buf: &mut [u8], at: usize, values: &[T]) {
    let src: &[u8] = bytemuck::cast_slice(values);
    buf[at..at + src.len()].copy_from_slice(src);
}

/// The first `len` values of type `T` at the start of `bytes` (an image's array: its offset is a
/// multiple of 256 in an image aligned for `T`, and the layout made room for `len`).
fn typed<T: Pod>(bytes: &mut [u8], len: usize) -> &mut [T] {
    bytemuck::cast_slice_mut(&mut bytes[..len * std::mem::size_of::<T>()])
}

/// Writes the values `values` yields into the image at byte `at`, one after another.
fn put_each<T: Pod>(buf: &mut [u8], at: usize, values: impl ExactSizeIterator<Item = T>) {
    let size = std::mem::size_of::<T>();
    let dst = &mut buf[at..at + values.len() * size];
    for (d, v) in dst.chunks_exact_mut(size).zip(values) {
        d.copy_from_slice(bytemuck::bytes_of(&v));
    }
}

/// Writes `plan` into `img`, the image of a launch's device buffer laid out by `layout` for a
/// capacity the plan fits, and returns how many leading bytes of it the plan uses (what the
/// upload copies). The plan lists each work item and merged token once; the kernels read a copy
/// per KV head and a merge row per query head, so the image expands them as it is written
/// (`Plan::item_copies`; merge rows token by token, KV head by KV head, query head by query
/// head). Checks what the kernels need beyond `Plan::check_consistent` (which `bind` and
/// `update` run first): tiles no taller than this kernel's, whose rows then also bound the
/// segments an item may have (the kernels keep one per row in shared memory). Allocates
/// nothing.
fn write_image(layout: &Layout, block_m: u32, plan: &Plan, img: &mut [u8]) -> Result<usize> {
    if let Some((i, it)) = plan.items.iter().enumerate().find(|(_, it)| it.num_rows > block_m) {
        return Err(invalid!("items[{i}].num_rows = {} is more than the CUDA kernel's block_m = {block_m}", it.num_rows));
    }
    let s = &plan.shape;
    let l = layout;
    // A custom mask replaces the causal one (Batch::applies_causal).
    let causal = plan.batch.applies_causal(s.causal);
    let (heads, group) = (s.num_kv_heads, s.group_size());
    // check_consistent has checked that the copies are sorted by group, every group below the
    // number of copies: group g's copies start at the first copy of a group >= g.
    let groups = plan.num_groups();
    let num_items = plan.num_item_copies();
    let header = PlanHeader {
        num_items: num_items as u32,
        num_groups: groups,
        num_merges: plan.num_merge_rows() as u32,
        num_slots: plan.num_partial_slots(),
        group_size: group,
        page_size: plan.batch.page_size,
        causal: causal as u32,
        window_left: plan.options.window_left.unwrap_or(NO_WINDOW),
        sm_scale_log2: s.sm_scale * std::f32::consts::LOG2_E,
        reserved2: [0; 3],
    };
    put(img, 0, &[header]);
    put(img, l.group_counter, &[0u32]);
    {
        // The copies and the group offsets in one pass, unit by unit, KV head by KV head.
        let (head, tail) = img.split_at_mut(l.group_offsets);
        let items: &mut [KernelItem] = typed(&mut head[l.items..], num_items);
        let offsets: &mut [u32] = typed(tail, groups as usize + 1);
        let (mut at, mut g) = (0usize, 0u32);
        for u in &plan.units {
            let unit_items = &plan.items[u.item_begin as usize..(u.item_begin + u.item_count) as usize];
            for h in 0..heads {
                let dst = &mut items[at..at + unit_items.len()];
                for (k, (d, it)) in dst.iter_mut().zip(unit_items).enumerate() {
                    let group = it.group + h * u.group_stride;
                    // Groups do not decrease (check_consistent): group g starts at the first copy
                    // of a group >= g.
                    while g <= group {
                        offsets[g as usize] = (at + k) as u32;
                        g += 1;
                    }
                    *d = KernelItem {
                        kv_head: h,
                        seg_begin: it.seg_begin,
                        seg_count: it.seg_count,
                        chunk_begin: it.chunk_begin,
                        chunk_count: it.chunk_count,
                        num_rows: it.num_rows,
                        partial_slot: if it.partial_slot == FINAL_OUTPUT { FINAL_OUTPUT } else { it.partial_slot + h * u.slot_stride },
                        group,
                    };
                }
                at += unit_items.len();
            }
        }
        debug_assert_eq!((at, g), (num_items, groups));
        offsets[groups as usize] = num_items as u32;
    }
    // check_consistent has verified every request index.
    let windowed = plan.options.window_left.is_some();
    put_each(
        img,
        l.segments,
        plan.row_segments.iter().map(|sg| SegmentInfo::of(sg, &plan.requests[sg.request as usize], causal, windowed)),
    );
    put_each(img, l.chunks, plan.kv_chunks.iter().map(|c| KvRange::of(c, &plan.requests[c.request as usize], &plan.batch)));
    put(img, l.pages, &plan.batch.kv_page_indices);
    // Merge rows per (token, query head), their slots per piece after one another.
    let qo_heads = plan.shape.num_qo_heads as usize;
    let total_slots = plan.merge_slots.len() * qo_heads;
    {
        let (head, tail) = img.split_at_mut(l.merge_slots);
        let rows: &mut [KernelMergeRow] = typed(&mut head[l.merges..], plan.merges.len() * qo_heads);
        let slots: &mut [u32] = typed(tail, total_slots);
        let (mut rows, mut slots) = (rows, slots);
        let group_us = group as usize;
        let mut next = 0u32;
        for m in &plan.merges {
            let pieces = &plan.merge_slots[m.slot_begin as usize..(m.slot_begin + m.slot_count) as usize];
            let count = pieces.len();
            // This token's rows and slots, then per KV head its group's; zipped, so the writes
            // need no bounds checks.
            let (token_rows, rest) = std::mem::take(&mut rows).split_at_mut(qo_heads);
            rows = rest;
            let (token_slots, rest) = std::mem::take(&mut slots).split_at_mut(qo_heads * count);
            slots = rest;
            for (row, q) in token_rows.iter_mut().zip(0u32..) {
                *row = KernelMergeRow { q_token: m.q_token, qo_head: q, slot_begin: next + q * count as u32, slot_count: count as u32 };
            }
            next += (qo_heads * count) as u32;
            if count == 0 {
                continue;
            }
            for (h, head_slots) in (0u32..).zip(token_slots.chunks_exact_mut(group_us * count)) {
                // The KV head's first query head's slots, then each next query head's one more:
                // its rows follow in the tile (a vector add per query head).
                let (first, rest) = head_slots.split_at_mut(count);
                for (d, p) in first.iter_mut().zip(pieces) {
                    *d = p.slot + h * p.head_stride;
                }
                for (j, dst) in (1u32..).zip(rest.chunks_exact_mut(count)) {
                    for (d, &f) in dst.iter_mut().zip(first.iter()) {
                        *d = f + j;
                    }
                }
            }
        }
    }
    if !plan.batch.has_custom_mask() {
        return Ok(l.merge_slots + total_slots * 4);
    }
    put(img, l.mask, &plan.batch.custom_mask);
    // Per query token, the bit of (its query, key 0): mask_indptr is in bytes, each query a row
    // of kv_len bits (check_kernel_plan has bounded them to 32 bits).
    for (r, req) in plan.requests.iter().enumerate() {
        let first = plan.batch.mask_indptr[r] as u32 * 8;
        let at = l.mask_bit0 + req.q_start as usize * 4;
        for (q, d) in img[at..at + req.q_len as usize * 4].chunks_exact_mut(4).enumerate() {
            d.copy_from_slice(&(first + q as u32 * req.kv_len).to_ne_bytes());
        }
    }
    Ok(l.mask_bit0 + plan.batch.total_q() as usize * 4)
}

/// What a run checks of the plan uploaded last, kept instead of the plan itself: the launch
/// holds no plan, so the engine may re-plan into it (`Plan::rebuild`) while the device runs.
struct Uploaded {
    total_q: u32,
    pages: usize,
    /// The plan has a custom mask: runs pass the kernels its bits and take the plain kernel.
    masked: bool,
    pool_layout: Option<LayoutStamp>,
}

impl Uploaded {
    fn of(plan: &Plan) -> Uploaded {
        Uploaded {
            total_q: plan.batch.total_q(),
            pages: plan.batch.kv_page_indices.len(),
            masked: plan.batch.has_custom_mask(),
            pool_layout: plan.pool_layout.clone(),
        }
    }
}

/// Page-locked images a launch uploads from. A copy from page-locked memory reads it when the
/// copy runs on the stream, possibly after later uploads were written: each upload takes a slot
/// whose last copy has completed, adding one while the host runs ahead of the device (at most
/// `MAX_STAGING_SLOTS`; beyond that it waits for the oldest copy).
struct Staging {
    slots: Vec<StagingSlot>,
    /// The slot to try first, and the one written last.
    next: usize,
    last: usize,
}

struct StagingSlot {
    image: PinnedBuffer,
    /// Recorded after the copy from `image`.
    copied: Event,
}

/// Uploads a launch may have in flight before the next one waits: an engine that plans and
/// updates a step ahead of the device uses two.
const MAX_STAGING_SLOTS: usize = 4;

impl Staging {
    /// A slot whose image may be written: the next in turn if its copy has completed, else a new
    /// one while there are fewer than `MAX_STAGING_SLOTS`, else the next after its copy.
    fn free_slot(&mut self, dev: &driver::Device, bytes: usize) -> Result<usize> {
        let i = self.next;
        if self.slots[i].copied.is_done()? {
            return Ok(i);
        }
        if self.slots.len() < MAX_STAGING_SLOTS {
            self.slots.push(StagingSlot { image: PinnedBuffer::new(dev, bytes, "allocating an upload image")?, copied: Event::new(dev)? });
            return Ok(self.slots.len() - 1);
        }
        self.slots[i].copied.wait()?;
        Ok(i)
    }
}

/// The host work of `packinfer_launch_update` without a device, for the planner benchmark:
/// the checks an update makes and the image it writes (everything but the copy and the event).
pub struct HostUpload {
    shape: Shape,
    page_size: u32,
    capacity: LaunchCapacity,
    layout: Layout,
    block_m: u32,
    /// Words, so that the image is aligned for its arrays (as a page-locked image is).
    image: Vec<u32>,
}

impl HostUpload {
    /// For a launch created from `plan` with `capacity` and a kernel of `block_m` rows.
    pub fn new(plan: &Plan, capacity: &LaunchCapacity, block_m: u32) -> HostUpload {
        let capacity = capacity.max(&LaunchCapacity::of(plan));
        let layout = Layout::new(&capacity);
        HostUpload { shape: plan.shape, page_size: plan.batch.page_size, capacity, layout, block_m, image: vec![0; layout.total / 4] }
    }

    /// What `update_planned` (`packinfer_launch_update`) does on the host for `plan`; returns
    /// the bytes it would copy.
    pub fn update_planned(&mut self, plan: &Plan) -> Result<usize> {
        plan.check_fresh()?;
        super::check_kernel_plan(&plan.shape, &plan.batch)?;
        crate::backend::check_update(&self.shape, self.page_size, &self.capacity, plan)?;
        write_image(&self.layout, self.block_m, plan, bytemuck::cast_slice_mut(&mut self.image))
    }

    /// What the checked `update` (the Rust API's) does on the host for `plan`.
    pub fn update(&mut self, plan: &Plan) -> Result<usize> {
        plan.check_consistent()?;
        self.update_planned(plan)
    }

    /// The image the last update wrote (its first bytes, as many as that update returned, are
    /// what a launch would copy to the device).
    pub fn image(&self) -> &[u8] {
        bytemuck::cast_slice(&self.image)
    }
}

enum ScratchMem {
    Owned(DeviceBuffer),
    Caller(Scratch),
}

/// The attention kernels a launch runs: the one chosen for its first plan, and the ones a run
/// may need instead.
pub(super) struct Kernels {
    pub chosen: Arc<LoadedAttention>,
    /// The plain kernel of the same tile size, run instead of a warp-specialised `chosen` when
    /// the caller's cache has no row view for TMA (its cp.async producer is slow).
    pub plain: Option<Arc<LoadedAttention>>,
    /// The masked plain kernel of the same tile size, for plans with a custom mask; present when
    /// the launch's capacity has room for masks.
    pub masked: Option<Arc<LoadedAttention>>,
    /// The (variant, warps) `Shared::kernel_choice` gave for the first plan.
    pub choice: (Variant, u32),
    /// Created with a capacity (`bind_with_capacity`).
    pub capacity_launch: bool,
}

/// A plan bound to the CUDA backend (what `Backend::bind` returns, as its concrete type).
pub struct CudaBound {
    /// The shape and page size of the plan the launch was created with: the launch's.
    shape: Shape,
    page_size: u32,
    /// The plan uploaded last (by `new` or `update`), as far as `run` checks it.
    current: Mutex<Uploaded>,
    kernels: Arc<LoadedAttention>,
    /// See `Kernels`.
    plain: Option<Arc<LoadedAttention>>,
    masked: Option<Arc<LoadedAttention>>,
    /// See `Kernels`.
    choice: (Variant, u32),
    capacity_launch: bool,
    capacity: LaunchCapacity,
    layout: Layout,
    buffer: DeviceBuffer,
    scratch: ScratchMem,
    /// Page-locked images of the device buffer that uploads copy from.
    staging: Mutex<Staging>,
    /// The stream of the last upload or run, and an event to order the next one after it when
    /// it comes on another stream: the work list, group counter and scratch are one per launch.
    last_stream: Mutex<u64>,
    handover: Event,
    grid: u32,
    merge_grid: u32,
    shared: Arc<Shared>,
}

impl CudaBound {
    pub(super) fn new(
        shared: Arc<Shared>,
        kernels: Kernels,
        plan: Arc<Plan>,
        stream: u64,
        scratch: Option<Scratch>,
        capacity: &LaunchCapacity,
    ) -> Result<CudaBound> {
        let Kernels { chosen: kernels, plain, masked, choice, capacity_launch } = kernels;
        let shape = &plan.shape;
        let capacity = capacity.max(&LaunchCapacity::of(&plan));
        let layout = Layout::new(&capacity);
        let dev = &shared.dev;
        let scratch_need = crate::plan::scratch_bytes(capacity.partial_slots, shape.head_dim);
        let scratch = match scratch {
            Some(s) if s.ptr != 0 && s.bytes >= scratch_need => ScratchMem::Caller(s),
            Some(s) if s.bytes < scratch_need => {
                return Err(invalid!("scratch_bytes = {} is smaller than the {scratch_need} bytes this launch needs", s.bytes))
            }
            Some(_) if scratch_need > 0 => return Err(invalid!("scratch pointer is null but the launch needs {scratch_need} bytes")),
            _ => ScratchMem::Owned(DeviceBuffer::new(dev, scratch_need, "allocating the launch's scratch")?),
        };
        let buffer = DeviceBuffer::new(dev, layout.total, "allocating the launch's work list")?;
        let grid = dev.sm_count * kernels.ctas_per_sm;
        let slot = StagingSlot { image: PinnedBuffer::new(dev, layout.total, "allocating an upload image")?, copied: Event::new(dev)? };
        let bound = CudaBound {
            shape: plan.shape,
            page_size: plan.batch.page_size,
            current: Mutex::new(Uploaded::of(&plan)),
            kernels,
            plain,
            masked,
            choice,
            capacity_launch,
            capacity,
            layout,
            buffer,
            scratch,
            staging: Mutex::new(Staging { slots: vec![slot], next: 0, last: 0 }),
            last_stream: Mutex::new(stream),
            handover: Event::new(dev)?,
            grid,
            merge_grid: dev.sm_count * 2,
            shared: shared.clone(),
        };
        bound.upload(&plan, stream)?;
        Ok(bound)
    }

    /// Orders work about to be enqueued on `stream` after this launch's work on the stream used
    /// last, when they differ, so two streams never use the launch's buffers at once. Nothing
    /// to order while either stream is being captured: a graph runs when the caller replays it.
    fn order_after(&self, last: &mut u64, stream: u64) -> Result<()> {
        if *last != stream && !driver::is_capturing(*last)? && !driver::is_capturing(stream)? {
            self.handover.record(*last)?;
            self.handover.wait_on(stream)?;
        }
        *last = stream;
        Ok(())
    }

    /// Whether this launch was bound to the warp-specialised kernel (which still runs the plain
    /// one where a run's cache has no row view for TMA, see `copies_kv_by_tma`).
    pub fn warp_specialized(&self) -> bool {
        self.kernels.warp_specialized
    }

    /// Keys per inner step of the kernel this launch runs (32 for the short-prefill kernel).
    pub fn block_n(&self) -> u32 {
        self.kernels.block_n
    }

    /// Whether a run with `args` copies K/V by TMA where rows are consecutive (the
    /// warp-specialised kernel, with caches that have a row view; see `kv_tensor_map`).
    pub fn copies_kv_by_tma(&self, args: &RunArgs) -> Result<bool> {
        let _g = self.shared.dev.enter()?;
        Ok(self.params(args).flags & FLAG_KV_TMA != 0)
    }

    /// Whether a run with `args` moves whole one-request Q and O tiles by TMA (the short-prefill
    /// kernel, with Q and O that TMA can describe; see `qo_tensor_map`).
    pub fn moves_qo_by_tma(&self, args: &RunArgs) -> Result<bool> {
        let _g = self.shared.dev.enter()?;
        Ok(self.params(args).flags & (FLAG_Q_TMA | FLAG_O_TMA) == FLAG_Q_TMA | FLAG_O_TMA)
    }

    /// Grid of the attention kernel (persistent CTAs).
    pub fn grid(&self) -> u32 {
        self.grid
    }
    /// Rows of a tile of the kernel this launch runs.
    pub fn block_m(&self) -> u32 {
        self.kernels.block_m
    }
    /// The counts the launch's buffers hold.
    pub fn capacity(&self) -> LaunchCapacity {
        self.capacity
    }

    /// Writes `plan` into a free page-locked image and copies the part it uses with one async
    /// copy on `stream`, then records the slot's event (the launch's completion event). Neither
    /// waits for the device nor allocates, unless the host is further ahead of the device than
    /// ever before (`Staging::free_slot`). The plan fits the capacity: `new` sized it for the
    /// first plan, `update` checked later ones (`check_update`).
    fn upload(&self, plan: &Plan, stream: u64) -> Result<()> {
        let mut staging = self.staging.lock();
        let _g = self.shared.dev.enter()?;
        let i = staging.free_slot(&self.shared.dev, self.layout.total)?;
        let used = write_image(&self.layout, self.kernels.block_m, plan, staging.slots[i].image.as_mut_slice())?;
        let slot = &staging.slots[i];
        // SAFETY: the device buffer is layout.total bytes and `used` is at most that. The image
        // is page-locked, so the copy reads it when it runs on the stream: the slot is not
        // written again before its event, recorded right after, says the copy has completed.
        unsafe { cu::memcpy_htod_async(self.buffer.ptr, &slot.image.as_slice()[..used], stream as sys::CUstream) }
            .map_err(|e| driver::device_err("uploading the work list", e))?;
        slot.copied.record(stream)?;
        staging.last = i;
        staging.next = (i + 1) % staging.slots.len();
        Ok(())
    }

    fn params(&self, args: &RunArgs) -> KernelParams {
        let base = self.buffer.ptr;
        let l = &self.layout;
        let at = |o: usize| base + o as u64;
        let scratch = match &self.scratch {
            ScratchMem::Owned(b) => b.ptr,
            ScratchMem::Caller(s) => s.ptr,
        };
        let a16 = |x: u64| x.is_multiple_of(16);
        let m8 = |x: i64| x % 8 == 0;
        let kv = &args.kv;
        let mut flags = 0;
        if a16(args.q.ptr) && m8(args.q.stride_token) && m8(args.q.stride_head) {
            flags |= FLAG_Q_VEC;
        }
        // A 16-byte vector is 8 elements of a 16-bit cache, 16 of an fp8 one.
        let kv_vec = if self.shape.kv_dtype == DType::Fp8E4m3 { 16 } else { 8 };
        let mkv = |x: i64| x % kv_vec == 0;
        if a16(kv.k) && a16(kv.v) && kv.stride_dim == 1 && mkv(kv.stride_page) && mkv(kv.stride_token) && mkv(kv.stride_head) {
            flags |= FLAG_KV_VEC;
        }
        if a16(args.o.ptr) && m8(args.o.stride_token) && m8(args.o.stride_head) {
            flags |= FLAG_O_VEC;
        }
        if flags & FLAG_KV_VEC != 0 && kv_row_stride(kv, self.page_size).is_some() {
            flags |= FLAG_KV_ROWS;
        }
        let (mut q_map, mut o_map) = (TensorMap::default(), TensorMap::default());
        if self.kernels.qo_tma {
            let s = &self.shape;
            if let Some(m) = qo_tensor_map(args.q.ptr, args.q.stride_token, args.q.stride_head, s, self.kernels.block_m)
                .filter(|_| flags & FLAG_Q_VEC != 0)
            {
                (q_map, flags) = (m, flags | FLAG_Q_TMA);
            }
            if let Some(m) = qo_tensor_map(args.o.ptr, args.o.stride_token, args.o.stride_head, s, self.kernels.block_m)
                .filter(|_| flags & FLAG_O_VEC != 0)
            {
                (o_map, flags) = (m, flags | FLAG_O_TMA);
            }
        }
        let masked = self.current.lock().masked;
        let (mut k_map, mut v_map) = (TensorMap::default(), TensorMap::default());
        // Without the TMA flag a warp-specialised launch runs its plain kernel, the one that
        // applies custom masks.
        if self.kernels.warp_specialized && flags & FLAG_KV_VEC != 0 && !masked {
            let s = &self.shape;
            let map = |base| kv_tensor_map(base, kv, self.page_size, s.head_dim, s.num_kv_heads, self.kernels.block_n);
            if let (Some(k), Some(v)) = (map(kv.k), map(kv.v)) {
                (k_map, v_map) = (k, v);
                flags |= FLAG_KV_TMA;
            }
        }
        // The soft-cap comes with each run (RunArgs), never from the plan.
        let (softcap_in, softcap_out) = match args.logits_soft_cap {
            cap if cap > 0.0 => {
                let sm_scale = self.shape.sm_scale;
                (2.0 * std::f32::consts::LOG2_E * sm_scale / cap, cap / sm_scale)
            }
            _ => (0.0, 0.0),
        };
        KernelParams {
            header: base,
            items: at(l.items),
            segments: at(l.segments),
            chunks: at(l.chunks),
            pages: at(l.pages),
            group_offsets: at(l.group_offsets),
            merges: at(l.merges),
            merge_slots: at(l.merge_slots),
            q: args.q.ptr,
            q_stride_token: args.q.stride_token,
            q_stride_head: args.q.stride_head,
            k: kv.k,
            v: kv.v,
            kv_stride_page: kv.stride_page,
            kv_stride_token: kv.stride_token,
            kv_stride_head: kv.stride_head,
            kv_stride_dim: kv.stride_dim,
            o: args.o.ptr,
            o_stride_token: args.o.stride_token,
            o_stride_head: args.o.stride_head,
            lse: args.lse,
            scratch,
            group_counter: at(l.group_counter),
            flags,
            num_qo_heads: self.shape.num_qo_heads,
            softcap_in,
            softcap_out,
            k_scale: args.kv_scales.k_scale,
            v_scale: args.kv_scales.v_scale,
            k_head_scales: args.kv_scales.k_head_scales,
            v_head_scales: args.kv_scales.v_head_scales,
            mask: if masked { at(l.mask) } else { 0 },
            mask_bit0: if masked { at(l.mask_bit0) } else { 0 },
            reserved: [0; 4],
            k_map,
            v_map,
            q_map,
            o_map,
        }
    }
}

impl Drop for CudaBound {
    /// A launch destroyed before its last upload ran (no run after it) would free the
    /// page-locked image the queued copy reads, and the buffer it writes: wait for the copies.
    fn drop(&mut self) {
        if let Ok(_g) = self.shared.dev.enter() {
            for slot in &self.staging.get_mut().slots {
                let _ = slot.copied.wait();
            }
        }
    }
}

impl BoundPlan for CudaBound {
    fn shape(&self) -> &Shape {
        &self.shape
    }

    unsafe fn run(&self, args: &RunArgs) -> Result<()> {
        let (layout, total_q, pages) = {
            let current = self.current.lock();
            (current.pool_layout.clone(), current.total_q, current.pages)
        };
        // The staleness check, held until the kernels are enqueued: a relayout of the pool on
        // another thread then enqueues its copies (and whoever takes the pages it frees, their
        // writes) after them, not between this check and the launch; on one stream they then
        // read before those.
        let _layout = layout.as_ref().map(LayoutStamp::pin).transpose()?;
        crate::backend::cpu::check_run_pointers(self.shape.kv_dtype, total_q, pages, args)?;
        let stream = args.stream as sys::CUstream;
        // Encoding the tensor maps (in params) needs the context current.
        let _g = self.shared.dev.enter()?;
        // Held until the kernels are enqueued, so runs from several threads keep one order.
        let mut last = self.last_stream.lock();
        self.order_after(&mut last, args.stream)?;
        let mut p = self.params(args);
        let (k, grid) = match (&self.masked, &self.plain) {
            (Some(masked), _) if p.mask != 0 => (masked, self.shared.dev.sm_count * masked.ctas_per_sm),
            (_, Some(plain)) if self.kernels.warp_specialized && p.flags & FLAG_KV_TMA == 0 => {
                (plain, self.shared.dev.sm_count * plain.ctas_per_sm)
            }
            _ => (&self.kernels, self.grid),
        };
        // SAFETY: KernelParams mirrors the kernels' parameter and the context is current; every
        // pointer in it is a buffer of this launch, sized for a plan that passed the checks at
        // bind/update, or a caller's tensor that run's contract makes valid for that plan.
        unsafe {
            driver::launch(k.attention, grid, k.threads, k.smem_bytes, stream, &mut p, "launching packed_attention")?;
            driver::launch(k.merge, self.merge_grid, 128, 0, stream, &mut p, "launching merge_partials")?;
        }
        Ok(())
    }

    fn is_ready(&self) -> Result<bool> {
        let staging = self.staging.lock();
        let _g = self.shared.dev.enter()?;
        staging.slots[staging.last].copied.is_done()
    }

    fn wait(&self) -> Result<()> {
        let staging = self.staging.lock();
        let _g = self.shared.dev.enter()?;
        staging.slots[staging.last].copied.wait()
    }

    fn suits(&self, plan: &Plan) -> bool {
        crate::backend::check_update(&self.shape, self.page_size, &self.capacity, plan).is_ok()
            && self.shared.kernel_choice(plan, self.capacity_launch) == self.choice
    }

    fn update(&self, plan: Arc<Plan>, stream: u64) -> Result<()> {
        plan.check_consistent()?;
        // SAFETY: the plan has just passed the check `update_planned` may skip.
        unsafe { self.update_planned(plan, stream) }
    }

    unsafe fn update_planned(&self, plan: Arc<Plan>, stream: u64) -> Result<()> {
        debug_assert!(plan.check_consistent().is_ok(), "a planned plan fails the consistency check");
        plan.check_fresh()?;
        super::check_kernel_plan(&plan.shape, &plan.batch)?;
        crate::backend::check_update(&self.shape, self.page_size, &self.capacity, &plan)?;
        let mut last = self.last_stream.lock();
        {
            let _g = self.shared.dev.enter()?;
            self.order_after(&mut last, stream)?;
        }
        self.upload(&plan, stream)?;
        *self.current.lock() = Uploaded::of(&plan);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(pages: Vec<i32>, page_size: u32) -> Batch {
        let n = pages.len() as i32;
        Batch {
            qo_indptr: vec![0, 1],
            kv_indptr: vec![0, n],
            kv_last_page_len: vec![page_size as i32],
            num_pages: 1 << 20,
            kv_page_indices: pages,
            page_size,
            prefix_groups: vec![],
            custom_mask: Vec::new(),
            mask_indptr: Vec::new(),
        }
    }

    fn row0(b: &Batch, key_begin: u32, key_end: u32) -> u32 {
        let req = RequestInfo { q_start: 0, q_len: 1, kv_len: b.kv_page_indices.len() as u32 * b.page_size, page_start: 0 };
        let chunk = KvChunk { request: 0, key_begin, key_end, row_begin: 0, row_end: 1 };
        KvRange::of(&chunk, &req, b).row0
    }

    #[test]
    fn chunks_in_consecutive_rows_get_their_first_row() {
        // One token per page, in order (a ragged batch): any chunk is consecutive.
        let ragged = batch((100..164).collect(), 1);
        assert_eq!(row0(&ragged, 0, 64), 100);
        assert_eq!(row0(&ragged, 10, 33), 110);
        // Pages of 16: consecutive pages continue each other's rows; a gap breaks the chunk.
        let paged = batch(vec![7, 8, 3, 4], 16);
        assert_eq!(row0(&paged, 5, 32), 7 * 16 + 5);
        assert_eq!(row0(&paged, 16, 20), 8 * 16);
        assert_eq!(row0(&paged, 20, 40), NO_ROW);
        assert_eq!(row0(&paged, 33, 64), 3 * 16 + 1);
        // A gap anywhere in a long run, and i32::MAX (whose successor does not exist), break it.
        let long: Vec<i32> = (1000..1300).collect();
        assert!(pages_consecutive(&long) && pages_consecutive(&[]) && pages_consecutive(&[7]));
        for gap in [1, 63, 64, 65, 200, 299] {
            let mut p = long.clone();
            p[gap] += 1;
            assert!(!pages_consecutive(&p), "gap at {gap}");
        }
        assert!(!pages_consecutive(&[i32::MAX, i32::MIN]));
        // Empty chunks and rows past i32 have none.
        assert_eq!(row0(&paged, 3, 3), NO_ROW);
        assert_eq!(row0(&batch(vec![i32::MAX / 16, i32::MAX / 16 + 1], 16), 0, 32), NO_ROW);
    }
}
