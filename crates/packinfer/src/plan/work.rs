//! The work list: what a backend executes. Each struct is `#[repr(C)]` and `Pod` (the derive
//! proves there is no padding), so it can be uploaded as bytes without reading uninitialized
//! memory.
//!
//! A [`WorkItem`] is one tile of up to `block_m` query rows against one or more [`KvChunk`]s,
//! computed once for every KV head: the plan lists each piece of work once, and its KV-head
//! copies are derived (the KV heads of a step do the same work on different heads). Its rows
//! are listed by [`RowSegment`]s: a run of one request's query tokens, each expanded to the
//! `group` query heads sharing a KV head (row = token*group + head within the segment, as
//! FlashInfer packs GQA). A chunk is a range of one request's keys (read through that request's
//! page table) that applies to a contiguous range of the tile's rows: a packed tile of several
//! short requests has one chunk per request; a shared-prefix tile has one chunk (the prefix,
//! read once) applying to the rows of all its members.
//!
//! **KV-head copies.** Items come in [`WorkUnit`]s, runs of consecutive items. The copy of item
//! `i` for KV head `h` fills its rows with the query heads `h*group ..` of each token, runs in
//! execution group `items[i].group + h × unit.group_stride` and, if partial, writes partial
//! slots from `items[i].partial_slot + h × unit.slot_stride` (one slot per tile row). The
//! per-KV-head work list the CUDA kernels read lists the copies unit by unit, within a unit KV
//! head by KV head, within a KV head the unit's items in order; copies are then sorted by
//! group ([`Plan::item_copies`](super::Plan::item_copies) yields that list). A balanced plan's
//! unit is one group per KV head (group stride 1: its items for KV head h run one after another
//! on one CTA); the one-request-per-tile schedule's unit is a request, each copy a group of its
//! own (group stride = the unit's items).
//!
//! **Merges.** A [`MergeRow`] combines, by log-sum-exp, the partial results of one query token
//! for every query head; its [`MergeSlot`]s (one per piece, in key order) give query head
//! `h*group + j` (KV head h, j-th of its group) at slot `slot + h × head_stride + j`.

use bytemuck::{Pod, Zeroable};

/// Marks a work item whose rows are written straight to O (and LSE), not to a partial slot.
pub const FINAL_OUTPUT: u32 = u32::MAX;

/// One tile: up to `block_m` query rows against one or more KV chunks, computed for every KV
/// head (see the module's documentation for the copies).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct WorkItem {
    /// Rows: `row_segments[seg_begin .. seg_begin + seg_count]`, laid out in that order.
    pub seg_begin: u32,
    /// See `seg_begin`.
    pub seg_count: u32,
    /// Keys: `kv_chunks[chunk_begin .. chunk_begin + chunk_count]`.
    pub chunk_begin: u32,
    /// See `chunk_begin`.
    pub chunk_count: u32,
    /// Total rows of the tile (sum of its segments' rows), at most the plan's `block_m`.
    pub num_rows: u32,
    /// [`FINAL_OUTPUT`], or the first partial slot of KV head 0's copy: its tile row `r` writes
    /// slot `partial_slot + r`; KV head h's copy adds `h × slot_stride` of its unit.
    pub partial_slot: u32,
    /// The group (persistent CTA on the GPU) that executes KV head 0's copy; KV head h's copy
    /// runs in `group + h × group_stride` of its unit.
    pub group: u32,
}

/// A run of consecutive work items whose KV-head copies are laid out together: for each KV head
/// in turn, the unit's items in order. A unit has one of two shapes: **a group per KV head**
/// (its items share one group and `group_stride > 0`: KV head h's copies run one after another
/// on one CTA, in group `group + h × group_stride`), or **a group per copy** (item k's group is
/// the first item's + k and `group_stride = item_count`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct WorkUnit {
    /// Items `items[item_begin .. item_begin + item_count]`.
    pub item_begin: u32,
    /// See `item_begin`.
    pub item_count: u32,
    /// KV head h's copy of an item runs in group `item.group + h × group_stride`.
    pub group_stride: u32,
    /// KV head h's copy of a partial item writes slots from `item.partial_slot + h ×
    /// slot_stride`.
    pub slot_stride: u32,
}

/// One KV head's copy of a work item, as the per-KV-head work list holds it
/// ([`Plan::item_copies`](super::Plan::item_copies)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemCopy {
    /// Index of the item in `Plan::items`.
    pub item: u32,
    /// The KV head whose query heads fill the rows.
    pub kv_head: u32,
    /// The group that executes the copy.
    pub group: u32,
    /// [`FINAL_OUTPUT`], or the copy's first partial slot.
    pub partial_slot: u32,
}

/// A run of one request's query tokens in a tile, each expanded to the query heads of the
/// item's KV head.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct RowSegment {
    /// The request the queries belong to.
    pub request: u32,
    /// First query of the request (0-based within the request) and how many.
    pub q_begin: u32,
    /// See `q_begin`.
    pub q_count: u32,
    /// First tile row of this segment.
    pub row_begin: u32,
}

/// A range of one request's keys that a contiguous range of a tile's rows attends to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct KvChunk {
    /// The request whose page table holds these keys.
    pub request: u32,
    /// Key positions `[key_begin, key_end)` in that request's sequence.
    pub key_begin: u32,
    /// See `key_begin`.
    pub key_end: u32,
    /// Tile rows `[row_begin, row_end)` that attend to these keys.
    pub row_begin: u32,
    /// See `row_begin`.
    pub row_end: u32,
}

/// Per request, what the backends need to address and mask it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct RequestInfo {
    /// Global index of the request's first query token (its `qo_indptr` entry).
    pub q_start: u32,
    /// Query tokens of the request.
    pub q_len: u32,
    /// Keys of the request.
    pub kv_len: u32,
    /// Offset of the request's first page in the plan's page list (its `kv_indptr` entry).
    pub page_start: u32,
}

impl RequestInfo {
    /// Keys visible to query `q` (0-based in the request): causal attention is bottom-right
    /// aligned, so query `q` sees keys `0 ..= kv_len - q_len + q`.
    #[inline]
    pub fn key_limit(&self, q: u32, causal: bool) -> u32 {
        if causal {
            self.kv_len - self.q_len + q + 1
        } else {
            self.kv_len
        }
    }
}

/// One query token whose result was computed in pieces, for every query head: the pieces'
/// partial rows are `merge_slots[slot_begin .. slot_begin + slot_count]`, in key order,
/// combined exactly by log-sum-exp.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct MergeRow {
    /// The query token (its index in the step).
    pub q_token: u32,
    /// First entry of `merge_slots`.
    pub slot_begin: u32,
    /// Entries of `merge_slots`: the token's pieces.
    pub slot_count: u32,
}

/// Where one piece holds a merged token's partial rows: query head `h × group + j` (the j-th
/// query head of KV head h) is partial slot `slot + h × head_stride + j`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct MergeSlot {
    /// The slot of query head 0.
    pub slot: u32,
    /// Slots from one KV head's rows to the next's (the slot stride of the piece's unit).
    pub head_stride: u32,
}
