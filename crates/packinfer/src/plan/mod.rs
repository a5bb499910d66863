//! The planner: pure host code that turns one step's batch into a work list. It never touches a
//! device; the CPU backend executes exactly what it produces, so everything here is tested in CI.

pub mod adapt;

mod check;
pub(crate) mod cost;
mod mask;
mod schedule;
pub mod scheduler;
mod window;
mod work;

use std::time::Instant;

use crate::error::Result;
use crate::invalid;
use crate::types::{limits, Batch, Shape};
pub use work::{ItemCopy, KvChunk, MergeRow, MergeSlot, RequestInfo, RowSegment, WorkItem, WorkUnit, FINAL_OUTPUT};

/// What the planner knows about the device it plans for.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    /// Persistent CTAs (or CPU worker threads) that execute groups concurrently.
    pub num_workers: u32,
    /// Rows in a Q tile.
    pub block_m: u32,
    /// Keys per inner step of the kernel; split boundaries fall on multiples of it.
    pub block_n: u32,
    /// Cost model: a·(rows × keys) + b·(keys read) + c per work item, in arbitrary time units;
    /// this is a.
    pub cost_row_key: f64,
    /// b: the cost of reading one key (its K and V).
    pub cost_key: f64,
    /// c: the fixed cost of one work item.
    pub cost_item: f64,
}

impl DeviceProfile {
    /// A profile for the CPU backend with `threads` worker threads.
    pub fn cpu(threads: u32) -> Self {
        DeviceProfile { num_workers: threads.max(1), block_m: 64, block_n: 64, cost_row_key: 1.0, cost_key: 4.0, cost_item: 256.0 }
    }

    /// Defaults for a Hopper GPU (H100/H200) with `num_sms` SMs, one persistent CTA per SM, in
    /// nanoseconds of one CTA for head_dim 128 in bf16, from the datasheet, not yet measured
    /// (the CUDA backend calibrates them): a (row, key) pair is 512 flops at about half of an
    /// SM's share of the ~990 TFLOP/s dense bf16 peak (0.14 ns); a key read is 512 bytes of K
    /// and V at about 80% of an SM's share of 3.35 TB/s (25 ns); an item costs ~1.5 µs to load
    /// its Q tile, write its rows and fetch the next one. Tiles of 128 rows (32 tokens at GQA
    /// 4): on the trace they halve prefill KV reads against 64 rows at no cost to decodes.
    /// Calibrated values: docs/performance-log.md#hopper-profile.
    pub fn hopper(num_sms: u32) -> Self {
        DeviceProfile { num_workers: num_sms.max(1), block_m: 128, block_n: 64, cost_row_key: 0.14, cost_key: 25.0, cost_item: 1500.0 }
    }

    /// Cost of one KV chunk of a work item under this cost model, without the per-item constant
    /// (the load a grouping adds up per request, e.g. for [`adapt::RegroupTrigger::observe`]):
    /// its rows rounded out to 16-row slices × its keys, and its keys read once.
    pub fn chunk_cost(&self, chunk: &KvChunk) -> f64 {
        cost::chunk_cost(self, chunk.row_begin, chunk.row_end, chunk.key_end.saturating_sub(chunk.key_begin))
    }

    /// Checks the values a caller (or a calibration) may have set.
    pub fn validate(&self) -> Result<()> {
        if self.num_workers == 0 {
            return Err(invalid!("profile num_workers = 0; a device runs at least one group at a time"));
        }
        if self.block_m == 0 || !self.block_m.is_multiple_of(cost::ROW_SLICE) {
            return Err(invalid!("profile block_m = {} must be a positive multiple of {}", self.block_m, cost::ROW_SLICE));
        }
        if self.block_n == 0 {
            return Err(invalid!("profile block_n = 0; the kernel reads at least one key per step"));
        }
        for (name, v) in [("cost_row_key", self.cost_row_key), ("cost_key", self.cost_key), ("cost_item", self.cost_item)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid!("profile {name} = {v} must be finite and not negative"));
            }
        }
        if self.cost_row_key + self.cost_key + self.cost_item <= 0.0 {
            return Err(invalid!("profile cost coefficients are all 0; the cost model needs one positive"));
        }
        Ok(())
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
    /// Load-balanced order (longest first, prefix groups and short requests kept on one CTA;
    /// off: one group per work item, in order, as a launch with one CTA per tile would run them).
    pub balancing: bool,
    /// Read declared shared prefixes once for all their members.
    pub prefix_sharing: bool,
    /// Split long requests along the KV axis.
    pub split_kv: bool,
    /// Capacity C in cost units: pieces costing more are split along their keys, and a prefix
    /// group or a short request costing at most C is kept on one CTA. `None` chooses it from the
    /// profile and the batch (total / (2 × num_workers)); `Some(0.0)` is an error.
    pub capacity: Option<f64>,
    /// Split granularity in keys for deterministic mode.
    pub split_keys: u32,
    /// Sliding window (local attention, FlashInfer's `window_left`): query at position p (keys
    /// counted from the request's first, causal alignment: p = kv_len − q_len + q) sees only
    /// keys ≥ p − window_left; `None` sees all. Fixed at plan time: the planner reads no key
    /// outside the window (see [`RequestInfo::key_start`]). A model whose layers have
    /// different windows makes one plan per window.
    pub window_left: Option<u32>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            deterministic: false,
            packing: true,
            balancing: true,
            prefix_sharing: true,
            split_kv: true,
            capacity: None,
            split_keys: 2048,
            window_left: None,
        }
    }
}

/// Numbers that say what the planner did, for engines' logs and for benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PlanStats {
    /// Execution groups (each run whole by one CTA or CPU thread).
    pub num_groups: u32,
    /// Work items (tiles), counted per KV head: the copies of `Plan::items`.
    pub num_items: u32,
    /// Requests whose keys were split into more than one piece.
    pub num_split_requests: u32,
    /// (token, query head) rows computed in pieces and merged by log-sum-exp.
    pub num_merge_rows: u32,
    /// Partial slots the pieces write (they size the scratch).
    pub num_partial_slots: u32,
    /// Real (row, visible key) pairs over (row, key) pairs the tiles compute.
    pub tile_utilization: f64,
    /// Cost of the costliest group, in the profile's units.
    pub max_group_cost: f64,
    /// Mean cost of a group.
    pub mean_group_cost: f64,
    /// Load of the busiest worker (CTA or CPU thread) when the workers take groups in order,
    /// each the next group as soon as it is free, and the mean over all `num_workers` (idle
    /// workers count as 0). Equal to the group numbers when there are no more groups than workers.
    pub max_worker_cost: f64,
    /// See `max_worker_cost`.
    pub mean_worker_cost: f64,
    /// Work items (per KV head) that read only part of a row block's keys (split pieces and
    /// prefix tiles).
    pub num_partial_items: u32,
    /// The capacity C the plan was made with (0 for the one-request-per-tile schedule).
    pub capacity: f64,
    /// Time `Plan::build` took.
    pub planning_ns: u64,
}

/// The schedule for one step: the batch it was made for and the work list that computes it.
#[derive(Debug, Clone)]
///
/// The fields are public for inspection (and for tests that build plans by hand); a backend
/// checks a plan with [`Plan::check_consistent`] before it executes it.
pub struct Plan {
    /// The attention shape every layer of the step shares.
    pub shape: Shape,
    /// The step's batch (an owned copy).
    pub batch: Batch,
    /// The options it was planned with.
    pub options: PlanOptions,
    /// Rows of a tile in this plan (the profile's).
    pub block_m: u32,
    /// Per request, its queries, keys and first page.
    pub requests: Vec<RequestInfo>,
    /// The work items, each once for every KV head, in units (`units`).
    pub items: Vec<WorkItem>,
    /// The items in runs whose KV-head copies are laid out together, in order; together they
    /// hold every item once.
    pub units: Vec<WorkUnit>,
    /// The items' rows, `items[i].seg_begin ..` for `seg_count`.
    pub row_segments: Vec<RowSegment>,
    /// The items' key ranges, `items[i].chunk_begin ..` for `chunk_count`.
    pub kv_chunks: Vec<KvChunk>,
    /// The tokens computed in pieces, merged (every query head) after the items.
    pub merges: Vec<MergeRow>,
    /// The merge rows' pieces, `merges[i].slot_begin ..` for `slot_count`, in key order.
    pub merge_slots: Vec<MergeSlot>,
    /// Cost of each group's items under the profile's cost model, by group.
    pub group_costs: Vec<f64>,
    /// What the planner did, but for the busiest worker's load ([`Plan::stats`]).
    pub(crate) stats: PlanStats,
    /// What [`Plan::stats`] needs to simulate the workers' loads, and its answer once asked.
    pub(crate) worker_load: WorkerLoad,
    /// For a plan made from a KV pool: the pool's layout when it was made (its page numbers hold
    /// only until a relayout moves pages).
    pub(crate) pool_layout: Option<LayoutStamp>,
    /// The planner's working buffers, kept for the next [`Plan::rebuild`].
    pub(crate) scratch: schedule::Scratch,
}

/// A KV pool's layout generation as a plan saw it. The pool bumps the generation when a relayout
/// moves pages; a plan made before that reads the pages' old places, so it is refused. The
/// generation sits behind a read-write lock that a relayout holds (write) while it moves and
/// frees pages, and a CPU run holds (read, [`Plan::pin_layout`]) while it reads them: a run that
/// found its plan fresh reads the pages where they were when it was made, however many other
/// threads relay the pool out meanwhile.
#[derive(Debug, Clone)]
pub(crate) struct LayoutStamp {
    pub(crate) generation: std::sync::Arc<parking_lot::RwLock<u64>>,
    pub(crate) seen: u64,
}

/// The simulation of the workers' loads behind `PlanStats::max_worker_cost`, run when the stats
/// are asked for, not at every (re)plan: it costs a tenth of planning a decode step and an engine
/// reads the statistics when it wants them, not every step.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkerLoad {
    workers: u32,
    /// The group costs come in runs of `num_kv_heads` equal costs (`cost::max_worker_load`).
    runs_known: bool,
    /// Sum of the group costs.
    total: f64,
    max: std::sync::OnceLock<f64>,
}

/// A run's hold on its pool's layout ([`Plan::pin_layout`]): no relayout of that pool moves a
/// page until it is dropped. Empty for a plan not made from a pool.
pub(crate) struct LayoutPin<'a> {
    _held: Option<parking_lot::RwLockReadGuard<'a, u64>>,
}

impl LayoutStamp {
    fn stale() -> crate::error::Error {
        invalid!("the plan is stale: its KV pool moved pages (a relayout) after the plan was made; plan the step again after relayout")
    }

    /// Refuses a plan whose pool has moved pages since the stamp was taken.
    pub(crate) fn check(&self) -> Result<()> {
        // Recursive: a check only reads the number, so it need not queue behind a relayout
        // that waits for runs to finish.
        if *self.generation.read_recursive() != self.seen {
            return Err(Self::stale());
        }
        Ok(())
    }

    /// [`LayoutStamp::check`], then holds the layout until the pin is dropped
    /// ([`Plan::pin_layout`]).
    pub(crate) fn pin(&self) -> Result<LayoutPin<'_>> {
        let g = self.generation.read();
        if *g != self.seen {
            return Err(Self::stale());
        }
        Ok(LayoutPin { _held: Some(g) })
    }
}

impl Plan {
    /// Refuses a plan made from a KV pool that has moved pages since (a relayout): its page
    /// tables point at where the keys were. Backends call it at bind, update and run.
    pub fn check_fresh(&self) -> Result<()> {
        match &self.pool_layout {
            Some(l) => l.check(),
            None => Ok(()),
        }
    }

    /// [`Plan::check_fresh`], and then keeps the plan fresh until the pin is dropped: a relayout
    /// of the plan's pool waits for it before it moves (and frees) pages. What a CPU run holds
    /// while it reads the pool, so that a relayout on another thread cannot move the pages it
    /// reads, nor let another sequence take and write them, between its check and its reads.
    pub(crate) fn pin_layout(&self) -> Result<LayoutPin<'_>> {
        match &self.pool_layout {
            Some(l) => l.pin(),
            None => Ok(LayoutPin { _held: None }),
        }
    }
}

/// The capacity the planner chooses for `batch` when `options` leave it automatic (`capacity:
/// None`): the batch's total cost over twice the profile's workers, never below the smallest
/// capacity of the cost model; 0 where the options switch every technique off (a plan without
/// a capacity). The planner's own policy, computed without scheduling: a caller that scales it
/// (the [`scheduler`]) plans once. Validates as [`Plan::build`] does.
pub fn automatic_capacity(shape: &Shape, batch: &Batch, profile: &DeviceProfile, options: &PlanOptions) -> Result<f64> {
    let mut plan = Plan::empty(*shape, PlanOptions { capacity: None, ..options.clone() }, profile.block_m);
    let largest_page = plan.batch.copy_from_measuring_pages(batch, &mut Vec::new());
    plan.validate_and_fill_requests(profile, largest_page)?;
    if one_request_per_tile(&plan.options) {
        return Ok(0.0);
    }
    Ok(schedule::plan_automatic_capacity(&mut plan, profile))
}

/// Every technique off: each (request, KV head, block of rows) is its own tile, no capacity.
fn one_request_per_tile(o: &PlanOptions) -> bool {
    !(o.packing || o.balancing || o.prefix_sharing || o.split_kv)
}

impl Plan {
    /// Builds the plan for `batch`. Validates everything first; the message names the bad value.
    pub fn build(shape: Shape, batch: Batch, profile: &DeviceProfile, options: PlanOptions) -> Result<Plan> {
        let started = Instant::now();
        let mut plan = Plan::empty(shape, options, profile.block_m);
        plan.batch = batch;
        plan.plan_batch(profile, started)?;
        Ok(plan)
    }

    /// Plans `batch` into this plan, as [`Plan::build`] would, reusing this plan's arrays and the
    /// planner's working buffers: once a plan has held a step at least as large, re-planning
    /// allocates nothing (an engine re-plans one or two plans every step). The plan must not be
    /// bound to a launch that still reads it (a `BoundPlan` holds an `Arc`, so it cannot be).
    ///
    /// On error the plan holds an empty batch (no requests, no work) until the next successful
    /// rebuild, so a plan is never left half made.
    pub fn rebuild(&mut self, shape: Shape, batch: &Batch, profile: &DeviceProfile, options: PlanOptions) -> Result<()> {
        // The copy measures the page list for the check, which then reads it no second time.
        self.rebuild_scaled(shape, options, |b, spare| Ok(b.copy_from_measuring_pages(batch, spare)), |_, _| profile.clone(), 1.0)
            .map(|_| ())
    }

    /// Like [`Plan::rebuild`], for a batch that `fill` writes over the plan's previous one (every
    /// field; its vectors keep their allocations): the C API copies the caller's arrays straight
    /// into it. `fill` gets the batch with no prefix groups and the previous groups as spares
    /// for [`PrefixGroup::reusing`](crate::types::PrefixGroup::reusing); `profile` then gives
    /// the device profile to plan with for the filled batch (a backend's `profile_for`). An
    /// error from `fill` leaves the plan empty, as any other error does.
    pub fn rebuild_with(
        &mut self,
        shape: Shape,
        options: PlanOptions,
        fill: impl FnOnce(&mut Batch, &mut Vec<crate::types::PrefixGroup>) -> Result<()>,
        profile: impl FnOnce(&Shape, &Batch) -> DeviceProfile,
    ) -> Result<()> {
        self.rebuild_scaled(shape, options, |b, spare| fill(b, spare).map(|()| None), profile, 1.0).map(|_| ())
    }

    /// Like [`Plan::rebuild_with`], for a `fill` that writes every field but `kv_page_indices`
    /// and returns the page list: the plan copies it in and checks its indices in the same pass
    /// (a copy by `fill` and then validation's check read a list that on long contexts is a
    /// large part of planning twice). To have an allocation failure reported rather than fatal,
    /// `fill` reserves room for the list in `kv_page_indices` (whose contents it may leave).
    pub fn rebuild_with_pages<'p>(
        &mut self,
        shape: Shape,
        options: PlanOptions,
        fill: impl FnOnce(&mut Batch, &mut Vec<crate::types::PrefixGroup>) -> Result<&'p [i32]>,
        profile: impl FnOnce(&Shape, &Batch) -> DeviceProfile,
    ) -> Result<()> {
        self.rebuild_scaled(
            shape,
            options,
            |b, spare| {
                let pages = fill(b, spare)?;
                Ok(b.set_pages_measuring(pages))
            },
            profile,
            1.0,
        )
        .map(|_| ())
    }

    /// [`Plan::rebuild_with`] at `capacity_factor` × the automatic capacity where `options`
    /// leave the capacity automatic (the scheduler's tuned capacity, in one planning pass);
    /// returns the automatic capacity (0 for a plan without one). `fill` returns the page
    /// list's largest index (read as unsigned) where it measured it while copying
    /// ([`Batch::copy_from_measuring_pages`], [`Batch::set_pages_measuring`]; validation then
    /// trusts it), None where it did not.
    pub(crate) fn rebuild_scaled(
        &mut self,
        shape: Shape,
        options: PlanOptions,
        fill: impl FnOnce(&mut Batch, &mut Vec<crate::types::PrefixGroup>) -> Result<Option<u32>>,
        profile: impl FnOnce(&Shape, &Batch) -> DeviceProfile,
        capacity_factor: f64,
    ) -> Result<f64> {
        let started = Instant::now();
        self.shape = shape;
        self.options = options;
        self.pool_layout = None;
        let spare = &mut self.scratch.spare_groups;
        spare.append(&mut self.batch.prefix_groups);
        let result = fill(&mut self.batch, spare).and_then(|largest_page| {
            let profile = profile(&self.shape, &self.batch);
            self.block_m = profile.block_m;
            self.plan_batch_scaled(&profile, started, capacity_factor, largest_page)
        });
        if result.is_err() {
            self.clear();
        }
        result
    }

    /// A plan of no requests.
    pub(crate) fn empty(shape: Shape, options: PlanOptions, block_m: u32) -> Plan {
        Plan {
            shape,
            batch: Batch {
                qo_indptr: vec![0],
                kv_indptr: vec![0],
                kv_page_indices: Vec::new(),
                kv_last_page_len: Vec::new(),
                page_size: 1,
                num_pages: 0,
                prefix_groups: Vec::new(),
                custom_mask: Vec::new(),
                mask_indptr: Vec::new(),
            },
            options,
            block_m,
            requests: Vec::new(),
            items: Vec::new(),
            units: Vec::new(),
            row_segments: Vec::new(),
            kv_chunks: Vec::new(),
            merges: Vec::new(),
            merge_slots: Vec::new(),
            group_costs: Vec::new(),
            stats: PlanStats::default(),
            worker_load: WorkerLoad::default(),
            pool_layout: None,
            scratch: schedule::Scratch::default(),
        }
    }

    /// Makes this a plan of no requests (keeping its allocations and page size).
    fn clear(&mut self) {
        let b = &mut self.batch;
        for v in [&mut b.qo_indptr, &mut b.kv_indptr] {
            v.clear();
            v.push(0);
        }
        b.kv_page_indices.clear();
        b.kv_last_page_len.clear();
        b.prefix_groups.clear();
        b.custom_mask.clear();
        b.mask_indptr.clear();
        self.requests.clear();
        self.items.clear();
        self.units.clear();
        self.row_segments.clear();
        self.kv_chunks.clear();
        self.merges.clear();
        self.merge_slots.clear();
        self.group_costs.clear();
        self.stats = PlanStats::default();
        self.worker_load = WorkerLoad::default();
        self.pool_layout = None;
    }

    /// Validates the plan's shape, batch and options and schedules its batch.
    fn plan_batch(&mut self, profile: &DeviceProfile, started: Instant) -> Result<()> {
        self.plan_batch_scaled(profile, started, 1.0, None).map(|_| ())
    }

    /// [`Plan::plan_batch`] at `capacity_factor` × the automatic capacity where the options
    /// leave it automatic; returns the automatic capacity (0 for a plan without one).
    /// `largest_page` as for [`Batch::validate_with`].
    fn plan_batch_scaled(
        &mut self,
        profile: &DeviceProfile,
        started: Instant,
        capacity_factor: f64,
        largest_page: Option<u32>,
    ) -> Result<f64> {
        self.validate_and_fill_requests(profile, largest_page)?;
        if one_request_per_tile(&self.options) {
            self.schedule_one_request_per_tile();
            self.finish_stats(profile, 0.0, 0, None, started);
            return Ok(0.0);
        }
        let automatic = match self.options.capacity {
            None if capacity_factor != 1.0 => {
                let automatic = schedule::plan_automatic_capacity(self, profile);
                self.options.capacity = Some(automatic * capacity_factor);
                Some(automatic)
            }
            _ => None,
        };
        let outcome = schedule::schedule(self, profile)?;
        // Where it was not computed before, the automatic capacity is the one just used (or
        // unknown: the options fixed it).
        let automatic = automatic.unwrap_or(if self.options.capacity.is_none() { outcome.capacity } else { 0.0 });
        self.finish_stats(profile, outcome.capacity, outcome.num_split_requests, Some(outcome.totals), started);
        Ok(automatic)
    }

    /// The plan's checks, then its requests' geometry (what scheduling reads). `largest_page`
    /// as for [`Batch::validate_with`].
    fn validate_and_fill_requests(&mut self, profile: &DeviceProfile, largest_page: Option<u32>) -> Result<()> {
        let (shape, batch) = (&self.shape, &self.batch);
        shape.validate()?;
        batch.validate_with(shape.causal, &mut self.scratch.group_of_request, largest_page)?;
        profile.validate()?;
        let options = &self.options;
        if let Some(c) = options.capacity {
            if !(c.is_finite() && c > 0.0) {
                return Err(invalid!("capacity = {c} must be positive and finite (None = automatic)"));
            }
        }
        if shape.group_size() > profile.block_m {
            return Err(crate::unsupported!(
                "{} query heads per KV head do not fit in a tile of block_m = {} rows",
                shape.group_size(),
                profile.block_m
            ));
        }
        let rows = batch.total_q() as u64 * shape.num_qo_heads as u64;
        if rows > limits::MAX_QO_ROWS {
            return Err(invalid!(
                "{} query tokens × num_qo_heads = {} are {rows} rows, more than the {} a step may have",
                batch.total_q(),
                shape.num_qo_heads,
                limits::MAX_QO_ROWS
            ));
        }
        // Every full tile of a request's rows is at least one work item per KV head (packing
        // only merges partial tiles): refuse a batch over the limit before planning allocates
        // per tile.
        // Counted as the requests are filled in: one pass over the batch's per-request arrays.
        let tokens_per_tile = (profile.block_m / shape.group_size()).max(1) as u64;
        let mut full_tiles = 0u64;
        self.requests.clear();
        self.requests.extend((0..batch.len()).map(|r| {
            let info = RequestInfo::of(batch, r);
            full_tiles += info.q_len as u64 / tokens_per_tile;
            info
        }));
        if full_tiles * shape.num_kv_heads as u64 > limits::MAX_WORK_ITEMS as u64 {
            return Err(invalid!(
                "{} query tokens need at least {} work items ({full_tiles} tiles of {tokens_per_tile} tokens × {} KV heads), more than the {} a plan may have",
                batch.total_q(),
                full_tiles * shape.num_kv_heads as u64,
                shape.num_kv_heads,
                limits::MAX_WORK_ITEMS
            ));
        }
        if options.deterministic && options.split_keys == 0 {
            return Err(invalid!("split_keys = 0; deterministic mode needs a split granularity"));
        }
        Ok(())
    }

    /// The simplest correct schedule: every (request, KV head, block of rows) is its own tile
    /// against all the keys its rows can see, each tile its own group, request by request and
    /// within a request KV head by KV head. No packing, no splits. A request's blocks are one
    /// unit whose copies each have a group (group stride: its blocks).
    fn schedule_one_request_per_tile(&mut self) {
        self.items.clear();
        self.units.clear();
        self.row_segments.clear();
        self.kv_chunks.clear();
        self.merges.clear();
        self.merge_slots.clear();
        let group = self.shape.group_size();
        let heads = self.shape.num_kv_heads;
        let tokens_per_tile = (self.block_m / group).max(1);
        let (causal, window) = (self.batch.applies_causal(self.shape.causal), self.options.window_left);
        let mut first_group = 0u32;
        for (r, req) in self.requests.iter().enumerate() {
            let item_begin = self.items.len() as u32;
            let mut q = 0;
            while q < req.q_len {
                let count = tokens_per_tile.min(req.q_len - q);
                let rows = count * group;
                let key_end = req.key_limit(q + count - 1, causal);
                let key_begin = req.key_start(q, window).min(key_end);
                let (key_begin, key_end) = mask::masked_key_span(&self.batch, req, r, q..q + count, window, (key_begin, key_end));
                let item = WorkItem {
                    seg_begin: self.row_segments.len() as u32,
                    seg_count: 1,
                    chunk_begin: self.kv_chunks.len() as u32,
                    chunk_count: 1,
                    num_rows: rows,
                    partial_slot: FINAL_OUTPUT,
                    group: first_group + self.items.len() as u32 - item_begin,
                };
                self.row_segments.push(RowSegment { request: r as u32, q_begin: q, q_count: count, row_begin: 0 });
                self.kv_chunks.push(KvChunk { request: r as u32, key_begin, key_end, row_begin: 0, row_end: rows });
                self.items.push(item);
                q += count;
            }
            let item_count = self.items.len() as u32 - item_begin;
            if item_count > 0 {
                self.units.push(WorkUnit { item_begin, item_count, group_stride: item_count, slot_stride: 0 });
                first_group += item_count * heads;
            }
        }
    }

    /// Fills `group_costs` from the finished work list and returns its totals, copy by copy
    /// (each item measured once).
    fn measure_items(&mut self, profile: &DeviceProfile) -> WorkTotals {
        let group = self.shape.group_size() as u64;
        let causal = self.batch.applies_causal(self.shape.causal);
        let window = self.options.window_left;
        // Per item: (item cost, useful pairs, computed pairs), measured once.
        let mut measured = schedule::reuse(&mut self.scratch.measured);
        measured.resize(self.items.len(), None);
        let (mut computed, mut useful) = (0u64, 0u64);
        let num_groups = self.num_groups() as usize;
        let mut group_costs = schedule::reuse(&mut self.group_costs);
        group_costs.resize(num_groups, 0.0);
        // Copies come sorted by group: a group's cost is summed in a register, in copy order.
        let (mut run_group, mut run_cost) = (0usize, 0.0f64);
        // What `num_partial_slots` computes, in the same pass.
        let (mut partial_items, mut partial_slots) = (0u32, 0u32);
        for copy in self.item_copies() {
            let item = &self.items[copy.item as usize];
            if copy.partial_slot != FINAL_OUTPUT {
                partial_items += 1;
                partial_slots = partial_slots.max(copy.partial_slot + item.num_rows);
            }
            let m = match measured[copy.item as usize] {
                Some(m) => m,
                None => {
                    let chunks = &self.kv_chunks[item.chunk_begin as usize..(item.chunk_begin + item.chunk_count) as usize];
                    let segs = &self.row_segments[item.seg_begin as usize..(item.seg_begin + item.seg_count) as usize];
                    let (mut use_, mut comp) = (0u64, 0u64);
                    for c in chunks {
                        comp += cost::sliced_rows(c.row_begin, c.row_end) as u64 * (c.key_end - c.key_begin) as u64;
                        // Segments are laid out in row order: those starting in the chunk's rows
                        // are one run.
                        let first = segs.partition_point(|s| s.row_begin < c.row_begin);
                        for s in segs[first..].iter().take_while(|s| s.row_begin < c.row_end) {
                            let req = &self.requests[s.request as usize];
                            use_ += group * visible_keys(req, s.q_begin, s.q_count, causal, window, c.key_begin, c.key_end);
                        }
                    }
                    let m = (cost::item_cost(profile, chunks), use_, comp);
                    measured[copy.item as usize] = Some(m);
                    m
                }
            };
            useful += m.1;
            computed += m.2;
            let g = copy.group as usize;
            if g != run_group {
                group_costs[run_group] = run_cost;
                (run_group, run_cost) = (g, 0.0);
            }
            run_cost += m.0;
        }
        if num_groups > 0 {
            group_costs[run_group] = run_cost;
        }
        // One pass: a sum is a chain of dependent additions, the maximum another beside it.
        let (total_cost, max_group_cost) = group_costs.iter().fold((0.0f64, 0.0f64), |(t, m), &c| (t + c, m.max(c)));
        self.group_costs = group_costs;
        self.scratch.measured = measured;
        WorkTotals { useful, computed, partial_items, partial_slots, total_cost, max_group_cost }
    }

    /// The statistics and group costs measured item by item (what the scheduler counts per
    /// piece), for tests.
    pub(crate) fn stats_by_items(&self, profile: &DeviceProfile) -> (PlanStats, Vec<f64>) {
        let mut p = self.clone();
        p.finish_stats(profile, self.stats.capacity, self.stats.num_split_requests, None, Instant::now());
        (p.stats(), p.group_costs)
    }

    /// Fills `stats` (and `group_costs`, unless the scheduler's `totals` come with them).
    fn finish_stats(
        &mut self,
        profile: &DeviceProfile,
        capacity: f64,
        num_split_requests: u32,
        totals: Option<WorkTotals>,
        started: Instant,
    ) {
        // The scheduler's group costs come a unit's cost per KV head (`schedule::emit`).
        let runs_known = totals.is_some();
        let WorkTotals { useful, computed, partial_items, partial_slots, total_cost: total, max_group_cost: max_group } = match totals {
            Some(t) => t,
            None => self.measure_items(profile),
        };
        let n = self.group_costs.len().max(1) as f64;
        let workers = profile.num_workers;
        self.stats = PlanStats {
            num_groups: self.group_costs.len() as u32,
            num_items: self.num_item_copies() as u32,
            num_split_requests,
            num_merge_rows: self.num_merge_rows() as u32,
            num_partial_slots: partial_slots,
            tile_utilization: if computed == 0 { 1.0 } else { useful as f64 / computed as f64 },
            max_group_cost: max_group,
            mean_group_cost: total / n,
            max_worker_cost: 0.0,
            mean_worker_cost: total / workers as f64,
            num_partial_items: partial_items,
            capacity,
            planning_ns: 0,
        };
        self.worker_load = WorkerLoad { workers, runs_known, total, max: std::sync::OnceLock::new() };
        self.stats.planning_ns = started.elapsed().as_nanos() as u64;
    }

    /// What the planner did. The busiest worker's load is simulated on the first call after a
    /// (re)plan (workers take the groups in order, each the next one as soon as it is free).
    pub fn stats(&self) -> PlanStats {
        let w = &self.worker_load;
        let max_worker_cost = *w.max.get_or_init(|| {
            if self.group_costs.len() <= w.workers as usize {
                self.stats.max_group_cost
            } else {
                let kv_heads = self.shape.num_kv_heads as usize;
                cost::max_worker_load(&self.group_costs, w.total, w.workers as usize, kv_heads, w.runs_known)
            }
        });
        PlanStats { max_worker_cost, ..self.stats }
    }

    /// The request and query (0-based within it) of tile row `row` of `item`.
    pub fn row_request(&self, item: &WorkItem, row: u32, group: u32) -> (u32, u32) {
        let segs = &self.row_segments[item.seg_begin as usize..(item.seg_begin + item.seg_count) as usize];
        let seg = segs.iter().rev().find(|s| s.row_begin <= row).expect("row before the first segment");
        (seg.request, seg.q_begin + (row - seg.row_begin) / group)
    }

    /// Partial slots the plan writes (split pieces and prefix partials); sizes the scratch.
    pub fn num_partial_slots(&self) -> u32 {
        let last_head = self.shape.num_kv_heads.saturating_sub(1);
        self.units
            .iter()
            .flat_map(|u| {
                let items = &self.items[u.item_begin as usize..(u.item_begin + u.item_count) as usize];
                // In u64: a hand-made plan is checked with this (`check_consistent`).
                let last_slots = last_head as u64 * u.slot_stride as u64;
                items.iter().filter(|i| i.partial_slot != FINAL_OUTPUT).map(move |i| i.partial_slot as u64 + last_slots + i.num_rows as u64)
            })
            .max()
            .map_or(0, |n| n.min(u32::MAX as u64) as u32)
    }

    /// The per-KV-head work list: every item's copy for every KV head, unit by unit, within a
    /// unit KV head by KV head, within a KV head the unit's items in order (sorted by group in a
    /// plan that passes [`Plan::check_consistent`]). What the CUDA kernels read today, and the
    /// order the CPU backend runs groups in.
    pub fn item_copies(&self) -> impl Iterator<Item = ItemCopy> + '_ {
        let heads = self.shape.num_kv_heads;
        self.units.iter().flat_map(move |u| {
            (0..heads).flat_map(move |h| {
                (u.item_begin..u.item_begin + u.item_count).map(move |i| {
                    let it = &self.items[i as usize];
                    ItemCopy {
                        item: i,
                        kv_head: h,
                        // Wrapping: only a plan that passed `check_consistent` is expanded for use.
                        group: it.group.wrapping_add(h.wrapping_mul(u.group_stride)),
                        partial_slot: if it.partial_slot == FINAL_OUTPUT {
                            FINAL_OUTPUT
                        } else {
                            it.partial_slot.wrapping_add(h.wrapping_mul(u.slot_stride))
                        },
                    }
                })
            })
        })
    }

    /// Work items counted per KV head: the length of [`Plan::item_copies`].
    pub fn num_item_copies(&self) -> usize {
        self.items.len() * self.shape.num_kv_heads as usize
    }

    /// Execution groups: one past the group of the last item copy (0 without items).
    pub fn num_groups(&self) -> u32 {
        match self.units.last() {
            Some(u) if u.item_count > 0 => {
                let last = &self.items[(u.item_begin + u.item_count - 1) as usize];
                let n = last.group as u64 + self.shape.num_kv_heads.saturating_sub(1) as u64 * u.group_stride as u64 + 1;
                n.min(u32::MAX as u64) as u32
            }
            _ => 0,
        }
    }

    /// Merge rows counted per query head, as the kernels merge them: `merges` × query heads.
    pub fn num_merge_rows(&self) -> usize {
        self.merges.len() * self.shape.num_qo_heads as usize
    }

    /// Scratch bytes a backend needs for this plan: fp32 partial outputs and their LSEs.
    pub fn scratch_bytes(&self) -> usize {
        scratch_bytes(self.num_partial_slots(), self.shape.head_dim)
    }
}

/// What the statistics count over a plan's work items.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WorkTotals {
    /// Real (row, visible key) pairs and (row, key) pairs the tiles compute.
    pub(crate) useful: u64,
    pub(crate) computed: u64,
    /// Items writing partial slots, and the slots they write.
    pub(crate) partial_items: u32,
    pub(crate) partial_slots: u32,
    /// The sum of `group_costs` in group order, and their maximum.
    pub(crate) total_cost: f64,
    pub(crate) max_group_cost: f64,
}

/// Scratch for `slots` partial rows of `head_dim`: their fp32 outputs, then their LSEs.
pub fn scratch_bytes(slots: u32, head_dim: u32) -> usize {
    slots as usize * (head_dim as usize + 1) * 4
}

/// Σ over queries `q_begin .. q_begin + q_count` of `req` of the keys in `[key_begin, key_end)`
/// each can see. Causal limits grow by one key per query, so the sum is computed in closed form;
/// under a sliding window it is summed query by query (statistics only).
#[inline]
pub(crate) fn visible_keys(
    req: &RequestInfo,
    q_begin: u32,
    q_count: u32,
    causal: bool,
    window: Option<u32>,
    key_begin: u32,
    key_end: u32,
) -> u64 {
    if q_count == 0 || key_end <= key_begin {
        return 0;
    }
    if window.is_some() {
        return (q_begin..q_begin + q_count)
            .map(|q| {
                let (start, end) = req.visible_range(q, causal, window);
                end.min(key_end).saturating_sub(start.max(key_begin)) as u64
            })
            .sum();
    }
    if !causal {
        return q_count as u64 * (req.kv_len.min(key_end).saturating_sub(key_begin)) as u64;
    }
    if q_count == 1 {
        // A decode's one query: the closed form below with one term, without its multiplications.
        return req.key_limit(q_begin, true).min(key_end).saturating_sub(key_begin) as u64;
    }
    // limit(q) = first + (q - q_begin); sum of clamp(limit, key_begin, key_end) - key_begin.
    let first = req.key_limit(q_begin, true) as i64;
    let (lo, hi, n) = (key_begin as i64, key_end as i64, q_count as i64);
    // Queries whose limit is at most lo see nothing; those at or beyond hi see hi - lo.
    let below = (lo - first + 1).clamp(0, n); // limits first..first+below-1 are <= lo
    let at_cap = (first + n - hi).clamp(0, n - below); // limits >= hi
    let mid = n - below - at_cap;
    let mid_first = first + below; // limits mid_first .. mid_first + mid - 1, all in (lo, hi)
    let mid_sum = mid * (mid_first - lo) + mid * (mid - 1) / 2;
    (mid_sum + at_cap * (hi - lo)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_keys_sums_each_querys_visible_keys_in_the_range() {
        // Against the sum query by query, for one query (a decode's fast path) and several,
        // causal or not, with and without a window, over every key range.
        for kv_len in [1u32, 5, 17] {
            for q_len in 1..=kv_len.min(4) {
                let req = RequestInfo { q_start: 0, q_len, kv_len, page_start: 0 };
                for (causal, window) in [(false, None), (true, None), (true, Some(3)), (false, Some(2))] {
                    for q_begin in 0..q_len {
                        for q_count in 0..=q_len - q_begin {
                            for key_begin in 0..=kv_len {
                                for key_end in key_begin..=kv_len {
                                    let want: u64 = (q_begin..q_begin + q_count)
                                        .map(|q| {
                                            let (start, end) = req.visible_range(q, causal, window);
                                            end.min(key_end).saturating_sub(start.max(key_begin)) as u64
                                        })
                                        .sum();
                                    let got = visible_keys(&req, q_begin, q_count, causal, window, key_begin, key_end);
                                    assert_eq!(
                                        got, want,
                                        "{req:?} q {q_begin}+{q_count} keys {key_begin}..{key_end} causal {causal} window {window:?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
