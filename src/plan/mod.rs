//! The planner: pure host code that turns one step's batch into a work list. It never touches a
//! device; the CPU backend executes exactly what it produces, so everything here is tested in CI.

pub mod work;

use std::time::Instant;

use crate::error::Result;
use crate::invalid;
use crate::types::{Batch, Shape};
pub use work::{KvChunk, MergeRow, RequestInfo, RowSegment, WorkItem, FINAL_OUTPUT};

/// What the planner knows about the device it plans for.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    /// Persistent CTAs (or CPU worker threads) that execute groups concurrently.
    pub num_workers: u32,
    /// Rows in a Q tile.
    pub block_m: u32,
    /// Keys per inner step of the kernel; split boundaries fall on multiples of it.
    pub block_n: u32,
    /// Cost model: a·(rows × keys) + b·(keys read) + c per work item, in arbitrary time units.
    pub cost_row_key: f64,
    pub cost_key: f64,
    pub cost_item: f64,
}

impl DeviceProfile {
    pub fn cpu(threads: u32) -> Self {
        DeviceProfile { num_workers: threads.max(1), block_m: 64, block_n: 64, cost_row_key: 1.0, cost_key: 4.0, cost_item: 256.0 }
    }
}

/// How the planner may schedule; the switches exist for ablations and for engines that need
/// batch-invariant results.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Split boundaries fixed at absolute multiples of `split_keys`, so a request's output is
    /// bitwise identical whatever else is in the batch.
    pub deterministic: bool,
    /// Pack rows of several short requests into one tile.
    pub packing: bool,
    /// Load-balanced grouping (off: one group per request, in order).
    pub balancing: bool,
    /// Read declared shared prefixes once for all their members.
    pub prefix_sharing: bool,
    /// Split long requests along the KV axis.
    pub split_kv: bool,
    /// Group capacity in cost units; 0 chooses it from the profile and the batch.
    pub capacity: f64,
    /// Split granularity in keys for deterministic mode.
    pub split_keys: u32,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { deterministic: false, packing: true, balancing: true, prefix_sharing: true, split_kv: true, capacity: 0.0, split_keys: 2048 }
    }
}

/// Numbers that say what the planner did, for engines' logs and for benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PlanStats {
    pub num_groups: u32,
    pub num_items: u32,
    /// Requests whose keys were split into more than one piece.
    pub num_split_requests: u32,
    pub num_merge_rows: u32,
    pub num_partial_slots: u32,
    /// Real (row, visible key) pairs over (row, key) pairs the tiles compute.
    pub tile_utilization: f64,
    pub max_group_cost: f64,
    pub mean_group_cost: f64,
    pub capacity: f64,
    pub planning_ns: u64,
}

/// The schedule for one step: the batch it was made for and the work list that computes it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub shape: Shape,
    pub batch: Batch,
    pub options: PlanOptions,
    pub block_m: u32,
    pub requests: Vec<RequestInfo>,
    /// Items sorted by `group`.
    pub items: Vec<WorkItem>,
    pub row_segments: Vec<RowSegment>,
    pub kv_chunks: Vec<KvChunk>,
    pub merges: Vec<MergeRow>,
    pub merge_slots: Vec<u32>,
    pub stats: PlanStats,
}

impl Plan {
    /// Builds the plan for `batch`. Validates everything first; the message names the bad value.
    pub fn build(shape: Shape, batch: Batch, profile: &DeviceProfile, options: PlanOptions) -> Result<Plan> {
        let started = Instant::now();
        shape.validate()?;
        batch.validate(shape.causal)?;
        if options.capacity < 0.0 || !options.capacity.is_finite() {
            return Err(invalid!("capacity = {} must be finite and not negative (0 = automatic)", options.capacity));
        }
        if options.deterministic && options.split_keys == 0 {
            return Err(invalid!("split_keys = 0; deterministic mode needs a split granularity"));
        }
        let requests = (0..batch.len())
            .map(|r| RequestInfo { q_start: batch.q_start(r), q_len: batch.q_len(r), kv_len: batch.kv_len(r), page_start: batch.kv_indptr[r] as u32 })
            .collect();
        let mut plan = Plan {
            shape,
            batch,
            options,
            block_m: profile.block_m,
            requests,
            items: Vec::new(),
            row_segments: Vec::new(),
            kv_chunks: Vec::new(),
            merges: Vec::new(),
            merge_slots: Vec::new(),
            stats: PlanStats::default(),
        };
        plan.schedule_one_request_per_tile();
        plan.finish_stats(profile, started);
        Ok(plan)
    }

    /// The simplest correct schedule: every (request, KV head, block of rows) is its own tile
    /// against all the keys its rows can see, each tile its own group. No packing, no splits.
    fn schedule_one_request_per_tile(&mut self) {
        let group = self.shape.group_size();
        let tokens_per_tile = (self.block_m / group).max(1);
        for (r, req) in self.requests.iter().enumerate() {
            for kv_head in 0..self.shape.num_kv_heads {
                let mut q = 0;
                while q < req.q_len {
                    let count = tokens_per_tile.min(req.q_len - q);
                    let rows = count * group;
                    let key_end = req.key_limit(q + count - 1, self.shape.causal);
                    let item = WorkItem {
                        kv_head,
                        seg_begin: self.row_segments.len() as u32,
                        seg_count: 1,
                        chunk_begin: self.kv_chunks.len() as u32,
                        chunk_count: 1,
                        num_rows: rows,
                        partial_slot: FINAL_OUTPUT,
                        group: self.items.len() as u32,
                    };
                    self.row_segments.push(RowSegment { request: r as u32, q_begin: q, q_count: count, row_begin: 0 });
                    self.kv_chunks.push(KvChunk { request: r as u32, key_begin: 0, key_end, row_begin: 0, row_end: rows });
                    self.items.push(item);
                    q += count;
                }
            }
        }
    }

    /// Fills `stats` from the finished work list.
    fn finish_stats(&mut self, profile: &DeviceProfile, started: Instant) {
        let group = self.shape.group_size();
        let mut computed = 0u64;
        let mut useful = 0u64;
        let mut group_cost: Vec<f64> = Vec::new();
        for item in &self.items {
            let mut keys_read = 0u64;
            for c in &self.kv_chunks[item.chunk_begin as usize..(item.chunk_begin + item.chunk_count) as usize] {
                let keys = (c.key_end - c.key_begin) as u64;
                keys_read += keys;
                computed += keys * (c.row_end - c.row_begin) as u64;
                for row in c.row_begin..c.row_end {
                    let (req, q) = self.row_request(item, row, group);
                    let limit = self.requests[req as usize].key_limit(q, self.shape.causal);
                    useful += limit.min(c.key_end).saturating_sub(c.key_begin) as u64;
                }
            }
            let cost = profile.cost_row_key * (item.num_rows as f64) * keys_read as f64 + profile.cost_key * keys_read as f64 + profile.cost_item;
            let g = item.group as usize;
            if group_cost.len() <= g {
                group_cost.resize(g + 1, 0.0);
            }
            group_cost[g] += cost;
        }
        let n = group_cost.len().max(1) as f64;
        self.stats = PlanStats {
            num_groups: group_cost.len() as u32,
            num_items: self.items.len() as u32,
            num_split_requests: 0,
            num_merge_rows: self.merges.len() as u32,
            num_partial_slots: self.num_partial_slots(),
            tile_utilization: if computed == 0 { 1.0 } else { useful as f64 / computed as f64 },
            max_group_cost: group_cost.iter().cloned().fold(0.0, f64::max),
            mean_group_cost: group_cost.iter().sum::<f64>() / n,
            capacity: self.options.capacity,
            planning_ns: started.elapsed().as_nanos() as u64,
        };
    }

    /// The request and query (0-based within it) of tile row `row` of `item`.
    pub fn row_request(&self, item: &WorkItem, row: u32, group: u32) -> (u32, u32) {
        let segs = &self.row_segments[item.seg_begin as usize..(item.seg_begin + item.seg_count) as usize];
        let seg = segs.iter().rev().find(|s| s.row_begin <= row).expect("row before the first segment");
        (seg.request, seg.q_begin + (row - seg.row_begin) / group)
    }

    /// Partial slots the plan writes (split pieces and prefix partials); sizes the scratch.
    pub fn num_partial_slots(&self) -> u32 {
        self.items.iter().filter(|i| i.partial_slot != FINAL_OUTPUT).map(|i| i.partial_slot + i.num_rows).max().unwrap_or(0)
    }

    /// Scratch bytes a backend needs for this plan: fp32 partial outputs and their LSEs.
    pub fn scratch_bytes(&self) -> usize {
        self.num_partial_slots() as usize * (self.shape.head_dim as usize + 1) * 4
    }
}
