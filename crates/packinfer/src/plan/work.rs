//! The work list: what a backend executes. Each struct is `#[repr(C)]` because the CUDA kernels
//! read the same bytes (`kernels/work.cuh` mirrors them; a test checks the sizes match), and
//! `Pod`: the derive proves there is no padding, so uploading them as bytes reads no
//! uninitialized memory.
//!
//! A [`WorkItem`] is one tile of up to `block_m` query rows, all attached to one KV head, against
//! one or more [`KvChunk`]s. Its rows are listed by [`RowSegment`]s: a run of one request's query
//! tokens, each expanded to the `group` query heads sharing the KV head (row = token*group + head
//! within the segment, as FlashInfer packs GQA). A chunk is a range of one request's keys (read
//! through that request's page table) that applies to a contiguous range of the tile's rows:
//! a packed tile of several short requests has one chunk per request; a shared-prefix tile has one
//! chunk (the prefix, read once) applying to the rows of all its members.

use bytemuck::{Pod, Zeroable};

/// Marks a work item whose rows are written straight to O (and LSE), not to a partial slot.
pub const FINAL_OUTPUT: u32 = u32::MAX;

/// One tile: up to `block_m` query rows of one KV head against one or more KV chunks.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct WorkItem {
    /// The KV head whose query heads fill the rows.
    pub kv_head: u32,
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
    /// [`FINAL_OUTPUT`], or the first partial slot: tile row `r` writes slot `partial_slot + r`.
    pub partial_slot: u32,
    /// The group (persistent CTA on the GPU) that executes this item; items are sorted by it.
    pub group: u32,
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
    pub fn key_limit(&self, q: u32, causal: bool) -> u32 {
        if causal {
            self.kv_len - self.q_len + q + 1
        } else {
            self.kv_len
        }
    }
}

/// One (query token, query head) whose result was computed in pieces: the pieces' partial slots
/// are `merge_slots[slot_begin .. slot_begin + slot_count]`, combined exactly by log-sum-exp.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
pub struct MergeRow {
    /// The query token (its index in the step).
    pub q_token: u32,
    /// The query head.
    pub qo_head: u32,
    /// First entry of `merge_slots`.
    pub slot_begin: u32,
    /// Entries of `merge_slots`.
    pub slot_count: u32,
}
