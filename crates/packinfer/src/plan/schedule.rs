//! The PackInfer schedule: one step's batch → pieces (row blocks × key ranges, shared-prefix
//! tiles, packed tiles) → load-balanced groups → the work list and its merge list.
//!
//! Steps, each switched off by its `PlanOptions` flag:
//! 1. **Prefix sharing.** The query rows of a prefix group's members are stacked into tiles that
//!    read the prefix keys `[0, prefix_len)` once, through the first member's page table; each
//!    member's suffix `[prefix_len, kv_len)` is its own work. Both write partial slots and are
//!    merged by log-sum-exp. Load accounting therefore counts the prefix once. Only members
//!    whose rows fit one 16-row slice share (decodes); a longer member (a prompt chunk) reads the
//!    prefix in its own tiles, and a group with fewer than two sharing members is not shared.
//! 2. **Row blocks.** Every other request's tokens are cut into blocks of `block_m / group`
//!    tokens (a block's rows are its tokens × the GQA heads of one KV head).
//! 3. **Capacity and splits.** C comes from the options or is `total cost / (AUTO_WAVES ×
//!    num_workers)`, never below [`cost::min_capacity`]. A piece costing more than C is
//!    split along its keys into ⌈cost / C⌉ pieces on `block_n` boundaries; in deterministic mode
//!    instead every key range is cut at the absolute multiples of `split_keys`, so a request's
//!    pieces do not depend on the rest of the batch (a shared prefix then counts only up to its
//!    last multiple of `split_keys`, and with `split_kv` off is not shared at all: either would
//!    cut a row's keys where running alone would not).
//! 4. **Packing.** Unsplit blocks of fewer than `block_m` rows are packed, next-fit in
//!    request order, into shared tiles (one chunk per block), up to `block_m` rows and C/8 cost.
//!    Blocks are only packed with blocks of the same finality (a tile writes either O or partial
//!    slots) and the same prefix group (so the group stays together). Blocks of at most one
//!    16-row slice (decodes) are packed only with each other and only up to one slice: the
//!    kernel spreads the keys of a one-slice tile over all its warps, while in a taller tile a
//!    chunk runs on the warps of its own slices alone, so a decode packed into a tall tile would
//!    run on one warp (docs/performance-log.md#decode-packing).
//! 5. **Grouping.** Longest-processing-time first: units sorted by decreasing cost, each its own
//!    group, so the workers (persistent CTAs drawing from a counter) take them costliest first,
//!    each the next as soon as it is free. A unit is one piece for one KV head, or a whole
//!    prefix group for one KV head when it fits in C (so its members share a CTA, the paper's
//!    I/O-aware grouping), or a run: all tiles of a request that fits in C (tail tile
//!    unpacked), one after another on one CTA, each reading its keys from L2 where the one
//!    before left them.
//!
//! [`schedule`] runs them as one function per step, each stating what its result guarantees:
//! [`bundle_prefixes`] (1), [`row_blocks`] (2), [`capacity`], [`runs`] and [`split`] with
//! [`cut_keys`] (3), [`pack`] (4), [`group`] (5), then [`emit`] (work items and partial slots)
//! and [`merge_list`] (merges).
//!
//! A piece is one work item, computed for every KV head: the items of a unit (an entity of step
//! 5) are one [`WorkUnit`], whose KV-head copies run in consecutive groups (group stride 1) and
//! write consecutive partial slots (`plan/work.rs` describes the copies). Merges are per token,
//! for every query head.

use super::cost::{chunk_cost, item_cost, min_capacity, sliced_rows, ROW_SLICE};
use super::mask::masked_key_span;
use super::{visible_keys, WorkTotals};
use super::{DeviceProfile, KvChunk, MergeRow, MergeSlot, Plan, PlanOptions, RequestInfo, RowSegment, WorkItem, WorkUnit, FINAL_OUTPUT};
use crate::error::Result;
use crate::invalid;
use crate::types::{limits, Batch, PrefixGroup};

const NO_BUNDLE: u32 = u32::MAX;
const NO_RUN: u32 = u32::MAX;

/// The automatic capacity is total cost / (AUTO_WAVES × num_workers): pieces costing more are
/// split. Two waves' worth rather than one: the GPU runs two CTAs per SM with its narrow kernel
/// (decode-only launches), which pieces of one worker's share would leave half idle; more waves
/// gained decodes little and cost prefill (docs/performance-log.md#auto-waves).
const AUTO_WAVES: f64 = 2.0;

/// What every step reads: the requests, the tile geometry and the options of one plan.
struct Setup<'a> {
    profile: &'a DeviceProfile,
    opts: &'a PlanOptions,
    requests: &'a [RequestInfo],
    /// The plan's batch (its custom mask trims blocks).
    batch: &'a Batch,
    /// Query heads per KV head: a token is `group` rows of a tile.
    group: u32,
    block_m: u32,
    /// Tokens of one request in a full tile, `block_m / group`.
    tokens_per_tile: u32,
    /// KV heads: every piece becomes a work item for each.
    heads: u32,
    causal: bool,
    /// The sliding window, if any: blocks start at their first query's window.
    window: Option<u32>,
    /// Deterministic mode's split granularity: `split_keys` when deterministic with `split_kv`.
    fixed_split: Option<u32>,
}

impl<'a> Setup<'a> {
    fn new(plan: &'a Plan, profile: &'a DeviceProfile) -> Self {
        let opts = &plan.options;
        let group = plan.shape.group_size();
        Setup {
            profile,
            opts,
            requests: &plan.requests,
            batch: &plan.batch,
            group,
            block_m: plan.block_m,
            tokens_per_tile: plan.block_m / group,
            heads: plan.shape.num_kv_heads,
            causal: plan.batch.applies_causal(plan.shape.causal),
            window: opts.window_left,
            fixed_split: if opts.deterministic && opts.split_kv { Some(opts.split_keys) } else { None },
        }
    }

    /// Cost of an item of one chunk: `rows` tile rows from row 0 against `keys` keys.
    #[inline]
    fn block_cost(&self, rows: u32, keys: u32) -> f64 {
        self.profile.cost_item + chunk_cost(self.profile, 0, rows, keys)
    }

    /// Pieces a plan may have: its work items are `pieces × heads`.
    fn max_pieces(&self) -> usize {
        limits::MAX_WORK_ITEMS / self.heads as usize
    }
}

/// What scheduling decided, for the statistics.
pub(super) struct Outcome {
    pub capacity: f64,
    pub num_split_requests: u32,
    /// The statistics' totals, counted per piece rather than per work item (the plan's
    /// `group_costs` come with them).
    pub totals: WorkTotals,
}

/// Builds the work list of `plan` (whose requests are filled in) with every technique its
/// options enable.
pub(super) fn schedule(plan: &mut Plan, profile: &DeviceProfile) -> Result<Outcome> {
    // The plan's own arrays and the steps' buffers are reused: a step of a size seen before
    // allocates nothing (`Plan::rebuild`).
    let mut sc = std::mem::take(&mut plan.scratch);
    sc.items = std::mem::take(&mut plan.items);
    sc.units = std::mem::take(&mut plan.units);
    sc.segments = std::mem::take(&mut plan.row_segments);
    sc.chunks = std::mem::take(&mut plan.kv_chunks);
    sc.merges = std::mem::take(&mut plan.merges);
    sc.merge_slots = std::mem::take(&mut plan.merge_slots);
    let result = schedule_steps(plan, profile, &mut sc);
    plan.items = std::mem::take(&mut sc.items);
    plan.units = std::mem::take(&mut sc.units);
    plan.row_segments = std::mem::take(&mut sc.segments);
    plan.kv_chunks = std::mem::take(&mut sc.chunks);
    plan.merges = std::mem::take(&mut sc.merges);
    plan.merge_slots = std::mem::take(&mut sc.merge_slots);
    if result.is_ok() {
        std::mem::swap(&mut plan.group_costs, &mut sc.group_costs);
    }
    plan.scratch = sc;
    result
}

/// The steps of [`schedule`], with their buffers in `sc`; the work list is left in `sc`'s
/// `items`, `units`, `segments`, `chunks`, `merges` and `merge_slots`.
fn schedule_steps(plan: &Plan, profile: &DeviceProfile, sc: &mut Scratch) -> Result<Outcome> {
    let s = Setup::new(plan, profile);
    let bundles = bundle_prefixes(&s, &plan.batch.prefix_groups, sc);
    let num_bundles = bundles.len();
    let blocks = row_blocks(&s, &bundles, sc);
    let capacity = capacity(&s, &blocks, &bundles.prefix_tiles);
    let runs = runs(&s, &blocks, capacity, sc);
    let Bundles { bundle_of, shared_len, prefix_tiles, segments } = bundles;
    let split = split(&s, capacity, &prefix_tiles, segments, &blocks, &runs, sc);
    (sc.bundle_of, sc.shared_len, sc.prefix_tiles, sc.blocks, sc.run) = (bundle_of, shared_len, prefix_tiles, blocks, runs);
    let Split { mut work, to_pack, num_split_requests } = split?;
    pack(&s, capacity, num_bundles, &to_pack, &mut work, sc);
    sc.to_pack = to_pack;
    let groups = group(&s, capacity, num_bundles, &work.pieces, sc);
    let Pieces { pieces, chunks, segments, partial_rows, counts } = work;
    (sc.chunks, sc.segments) = (chunks, segments);
    let groups = match groups {
        Ok(g) => g,
        Err(e) => {
            (sc.pieces, sc.partial_rows) = (pieces, partial_rows);
            return Err(e);
        }
    };
    let Emitted { items, units, slot_of, group_costs, total_cost, max_group_cost } = emit(&s, &pieces, sc);
    let Merges { merges, merge_slots } = merge_list(plan.batch.total_q(), &partial_rows, &slot_of, sc);
    debug_assert!(pieces.iter().all(|p| (item_cost(
        profile,
        &sc.chunks[p.chunk_begin as usize..(p.chunk_begin + p.chunk_count) as usize]
    ) - p.cost)
        .abs()
        <= 1e-6 * p.cost.max(1.0)));
    debug_assert!(group_costs.len() == groups.num_groups || pieces.is_empty());
    let heads = s.heads as u64;
    // Every partial item gets `num_rows` slots of its own (`emit`).
    let totals = WorkTotals {
        useful: counts.useful * heads,
        computed: counts.computed * heads,
        partial_items: counts.partial_pieces * s.heads,
        partial_slots: counts.partial_rows * s.heads,
        total_cost,
        max_group_cost,
    };
    sc.group_costs = group_costs;
    (sc.pieces, sc.partial_rows, sc.slot_of) = (pieces, partial_rows, slot_of);
    (sc.items, sc.units, sc.merges, sc.merge_slots) = (items, units, merges, merge_slots);
    Ok(Outcome { capacity, num_split_requests, totals })
}

/// The buffers of the schedule's steps, kept in the plan between builds (`Plan::rebuild`): each
/// step takes its vectors from here, cleared, and [`schedule`] puts them back, so planning a
/// step no larger than one planned before allocates nothing.
#[derive(Default)]
pub(crate) struct Scratch {
    bundle_of: Vec<u32>,
    shared_len: Vec<u32>,
    prefix_tiles: Vec<PrefixTile>,
    sharers: Vec<u32>,
    blocks: Vec<Block>,
    request_cost: Vec<f64>,
    run: Vec<bool>,
    split_request: Vec<bool>,
    ranges: Vec<(u32, u32)>,
    to_pack: Vec<Block>,
    pieces: Vec<Piece>,
    partial_rows: Vec<PartialRow>,
    class_start: Vec<u32>,
    order: Vec<u32>,
    bundle_cost: Vec<f64>,
    bundle_whole: Vec<bool>,
    /// (LPT key, entity): see [`lpt_key`].
    entities: Vec<(u64, u32)>,
    entity_pieces: Vec<u32>,
    entity_start: Vec<u32>,
    bundle_start: Vec<u32>,
    bundle_list: Vec<u32>,
    group_costs: Vec<f64>,
    slot_of: Vec<MergeSlot>,
    token_start: Vec<u32>,
    token_next: Vec<u32>,
    by_token: Vec<u32>,
    /// The plan's arrays while the steps fill them.
    items: Vec<WorkItem>,
    units: Vec<WorkUnit>,
    segments: Vec<RowSegment>,
    chunks: Vec<KvChunk>,
    merges: Vec<MergeRow>,
    merge_slots: Vec<MergeSlot>,
    /// `finish_stats`: per item, its measure; `Batch` validation's prefix group per request.
    pub(super) measured: Vec<Option<(f64, u64, u64)>>,
    pub(super) group_of_request: Vec<u32>,
    /// Prefix groups of earlier batches, whose member lists the next batch reuses.
    pub(super) spare_groups: Vec<crate::types::PrefixGroup>,
}

impl Clone for Scratch {
    /// Buffers only: a copy of a plan starts with none.
    fn clone(&self) -> Self {
        Scratch::default()
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

/// `v`, taken out of its place and cleared (its allocation kept).
#[inline]
pub(super) fn reuse<T>(v: &mut Vec<T>) -> Vec<T> {
    let mut v = std::mem::take(v);
    v.clear();
    v
}

/// A shared-prefix tile before splitting: member rows stacked in `segments[seg_begin..]` against
/// the prefix keys `[0, key_end)`, read through request `reader`'s page table.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PrefixTile {
    seg_begin: u32,
    seg_count: u32,
    num_rows: u32,
    reader: u32,
    key_end: u32,
    bundle: u32,
}

/// Step 1's result: the prefix groups that are shared ("bundles") and the tiles that read their
/// prefixes.
struct Bundles {
    /// Per request, its bundle, or [`NO_BUNDLE`] when the request reads all its keys itself.
    bundle_of: Vec<u32>,
    /// Per bundle, the keys `[0, shared_len)` its tiles read once for all its members.
    shared_len: Vec<u32>,
    /// The tiles, bundle by bundle.
    prefix_tiles: Vec<PrefixTile>,
    /// The tiles' rows, tile by tile: the first entries of the plan's `row_segments`.
    segments: Vec<RowSegment>,
}

impl Bundles {
    fn len(&self) -> usize {
        self.shared_len.len()
    }
}

/// Step 1, prefix groups ("bundles"). Guarantees: bundles are numbered in prefix-group order;
/// a prefix group is a bundle when sharing is on (and, in deterministic mode, `split_kv` too),
/// at least two of its members have rows that fit one [`ROW_SLICE`] (its sharers, which alone
/// get the bundle) and its shared length is positive: the prefix, rounded down to a multiple of
/// `split_keys` in deterministic mode. The sharers' tokens, in member order, are stacked into
/// tiles of at most `block_m` rows (segments whole tokens, laid out from row 0), each reading
/// keys `[0, key_end)`, `key_end` ≤ the shared length, through its first sharer's pages.
fn bundle_prefixes(s: &Setup, prefix_groups: &[PrefixGroup], sc: &mut Scratch) -> Bundles {
    let (requests, group, block_m) = (s.requests, s.group, s.block_m);
    // In deterministic mode the shared part is rounded down to a split boundary, so a member's
    // key pieces are the same as when it runs alone.
    let mut bundle_of = reuse(&mut sc.bundle_of);
    bundle_of.resize(requests.len(), NO_BUNDLE);
    let mut shared_len = reuse(&mut sc.shared_len);
    let mut segments = reuse(&mut sc.segments);
    let mut prefix_tiles = reuse(&mut sc.prefix_tiles);
    // Deterministic without splits computes every row in one pass, as it would alone; sharing
    // a prefix would cut it in two.
    let sharing = s.opts.prefix_sharing && (s.fixed_split.is_some() || !s.opts.deterministic);
    if sharing {
        let sharers = &mut sc.sharers;
        for pg in prefix_groups {
            let len = match s.fixed_split {
                Some(fs) => pg.prefix_len / fs * fs,
                None => pg.prefix_len,
            };
            // Members whose rows fit one slice (decodes, a few speculative tokens) share the
            // prefix. A longer member reads it in its own tiles: its rows see many keys past the
            // prefix too, so sharing saves little, and it would turn each of them into partial
            // rows written, read back and merged (docs/performance-log.md#prefix-members).
            sharers.clear();
            // Under a sliding window only members whose every query still sees key 0 share:
            // a prefix tile reads the whole prefix, and no key outside a window is read.
            // With a custom mask none share: a prefix tile would read keys the mask may hide.
            sharers.extend(pg.members.iter().copied().filter(|&m| {
                let req = &requests[m as usize];
                !s.batch.has_custom_mask() && req.q_len * group <= ROW_SLICE && req.key_start(req.q_len.saturating_sub(1), s.window) == 0
            }));
            if len == 0 || sharers.len() < 2 {
                continue;
            }
            let b = shared_len.len() as u32;
            shared_len.push(len);
            for &m in sharers.iter() {
                bundle_of[m as usize] = b;
            }
            // Stack the members' tokens into tiles of at most block_m rows.
            let reader = sharers[0];
            let mut tile = PrefixTile { seg_begin: segments.len() as u32, seg_count: 0, num_rows: 0, reader, key_end: 0, bundle: b };
            for &m in sharers.iter() {
                let req = requests[m as usize];
                let mut q = 0;
                while q < req.q_len {
                    if tile.num_rows + group > block_m {
                        prefix_tiles.push(tile);
                        tile = PrefixTile { seg_begin: segments.len() as u32, seg_count: 0, num_rows: 0, reader, key_end: 0, bundle: b };
                    }
                    let count = ((block_m - tile.num_rows) / group).min(req.q_len - q);
                    segments.push(RowSegment { request: m, q_begin: q, q_count: count, row_begin: tile.num_rows });
                    tile.seg_count += 1;
                    tile.num_rows += count * group;
                    tile.key_end = tile.key_end.max(req.key_limit(q + count - 1, s.causal).min(len));
                    q += count;
                }
            }
            if tile.num_rows > 0 {
                prefix_tiles.push(tile);
            }
        }
    }
    Bundles { bundle_of, shared_len, prefix_tiles, segments }
}

/// A run of one request's query tokens against one range of its keys: a work item of one
/// segment and one chunk, unless packing puts it into a shared tile.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Block {
    request: u32,
    q_begin: u32,
    q_count: u32,
    key_begin: u32,
    key_end: u32,
    /// Its rows' results are merged with other pieces: it writes partial slots, not O.
    partial: bool,
    /// The prefix group (bundle) the request belongs to, or [`NO_BUNDLE`].
    bundle: u32,
    cost: f64,
}

/// Step 2, row blocks. Guarantees: in request order, then query order, each request's tokens in
/// blocks of `tokens_per_tile` (the last one shorter), each block against the keys
/// `[key_begin, key_end)` where `key_end` is what its last token sees. A block of a request in
/// no bundle starts at key 0 and is not partial; one of a bundle's sharer starts at the shared
/// length and is partial (it is merged with the prefix tile), and is left out when its tokens
/// see nothing past the prefix. Under a sliding window a block starts no earlier than its first
/// token's window (`RequestInfo::key_start`). `cost` is the block as an item of its own.
fn row_blocks(s: &Setup, bundles: &Bundles, sc: &mut Scratch) -> Vec<Block> {
    // A prefix member's blocks cover only its suffix keys.
    let mut blocks = reuse(&mut sc.blocks);
    for (r, req) in s.requests.iter().enumerate() {
        let bundle = bundles.bundle_of[r];
        let key_begin = if bundle == NO_BUNDLE { 0 } else { bundles.shared_len[bundle as usize] };
        let mut q = 0;
        while q < req.q_len {
            let count = s.tokens_per_tile.min(req.q_len - q);
            let limit = req.key_limit(q + count - 1, s.causal);
            // A member block whose rows see nothing past the prefix has no suffix work.
            if bundle == NO_BUNDLE || limit > key_begin {
                let key_end = limit.max(key_begin);
                // Keys before the block's first window are read by none of its rows.
                let key_begin = key_begin.max(req.key_start(q, s.window)).min(key_end);
                // Keys the custom mask hides from all its rows are read by none of them.
                let (key_begin, key_end) = masked_key_span(s.batch, req, r, q..q + count, s.window, (key_begin, key_end));
                let cost = s.block_cost(count * s.group, key_end - key_begin);
                blocks.push(Block {
                    request: r as u32,
                    q_begin: q,
                    q_count: count,
                    key_begin,
                    key_end,
                    partial: bundle != NO_BUNDLE,
                    bundle,
                    cost,
                });
            }
            q += count;
        }
    }
    blocks
}

/// Step 3, the capacity C: the options' if set, else [`automatic_capacity`].
fn capacity(s: &Setup, blocks: &[Block], prefix_tiles: &[PrefixTile]) -> f64 {
    s.opts.capacity.unwrap_or_else(|| automatic_capacity(s, blocks, prefix_tiles))
}

/// The automatic capacity: the total cost of the blocks and prefix tiles (for every KV head) /
/// (AUTO_WAVES × num_workers), never below [`min_capacity`].
fn automatic_capacity(s: &Setup, blocks: &[Block], prefix_tiles: &[PrefixTile]) -> f64 {
    let total: f64 = (blocks.iter().map(|b| b.cost).sum::<f64>()
        + prefix_tiles.iter().map(|t| s.block_cost(t.num_rows, t.key_end)).sum::<f64>())
        * s.heads as f64;
    (total / (AUTO_WAVES * s.profile.num_workers as f64)).max(min_capacity(s.profile))
}

/// The capacity [`schedule`] would choose for `plan` (validated, its requests filled in)
/// without one in its options, from steps 1 and 2 alone (in the plan's buffers: nothing is
/// allocated once the plan has held a step as large).
pub(super) fn plan_automatic_capacity(plan: &mut Plan, profile: &DeviceProfile) -> f64 {
    let mut sc = std::mem::take(&mut plan.scratch);
    sc.segments = std::mem::take(&mut plan.row_segments);
    let s = Setup::new(plan, profile);
    let bundles = bundle_prefixes(&s, &plan.batch.prefix_groups, &mut sc);
    let blocks = row_blocks(&s, &bundles, &mut sc);
    let capacity = automatic_capacity(&s, &blocks, &bundles.prefix_tiles);
    let Bundles { bundle_of, shared_len, prefix_tiles, segments } = bundles;
    (sc.bundle_of, sc.shared_len, sc.prefix_tiles, sc.blocks) = (bundle_of, shared_len, prefix_tiles, blocks);
    plan.row_segments = segments;
    plan.scratch = sc;
    capacity
}

/// Step 3, runs: per request, whether its blocks are placed as one unit (step 5). Guarantees: a
/// run has no bundle, at least one full tile (`block_m` rows) and a total cost of at most
/// `capacity`; there are none (an empty list) without balancing or in deterministic mode.
fn runs(s: &Setup, blocks: &[Block], capacity: f64, sc: &mut Scratch) -> Vec<bool> {
    // Runs: a request of at least one full tile, no prefix group and a total cost within C is
    // placed as one unit (step 5), its tiles one after another on one CTA, tail tile included
    // (not packed). Its tiles read growing prefixes of the same keys, so each tile finds them
    // in L2 where the previous one left them; scattered by LPT over the whole launch, the tiles
    // of a batch of short prompts may re-read their keys from DRAM
    // (docs/performance-log.md#runs).
    let mut run = reuse(&mut sc.run);
    if !(s.opts.balancing && s.fixed_split.is_none()) {
        return run;
    }
    let n = s.requests.len();
    let request_cost = &mut sc.request_cost;
    request_cost.clear();
    request_cost.resize(n, 0.0);
    run.resize(n, false);
    for b in blocks.iter().filter(|b| b.bundle == NO_BUNDLE) {
        request_cost[b.request as usize] += b.cost;
        run[b.request as usize] |= b.q_count * s.group == s.block_m;
    }
    for (run, &cost) in run.iter_mut().zip(request_cost.iter()) {
        *run &= cost <= capacity;
    }
    run
}

/// Step 3, cutting: the key ranges of a piece of keys `[key_begin, key_end)` costing `cost`,
/// into `out` (cleared first). Guarantees: the ranges are consecutive, in order, and cover the
/// keys exactly (one empty range for no keys). In deterministic mode they end at the absolute
/// multiples of `split_keys`; otherwise, with `split_kv` and a cost above `capacity`, they are
/// ⌈cost / capacity⌉ (at most) ranges of a multiple of `block_n` keys (the last shorter);
/// otherwise one range. More than `room` ranges is an error, returned before any is made (a
/// tiny capacity or split_keys over long contexts would ask for billions).
// Inlined: it runs for every block and mostly returns the one range; the call showed in
// plan_bench.
#[inline(always)]
fn cut_keys(s: &Setup, capacity: f64, key_begin: u32, key_end: u32, cost: f64, room: usize, out: &mut Vec<(u32, u32)>) -> Result<()> {
    out.clear();
    let (opts, block_n) = (s.opts, s.profile.block_n);
    let keys = key_end.saturating_sub(key_begin) as u64;
    let count = match s.fixed_split {
        Some(fs) => (key_end.max(1) as u64 - 1) / fs as u64 + 1 - key_begin as u64 / fs as u64,
        None if opts.split_kv && cost > capacity && keys > block_n as u64 => {
            let pieces = (cost / capacity).ceil().min(keys as f64) as u64;
            keys.div_ceil(keys.div_ceil(pieces).next_multiple_of(block_n as u64))
        }
        None => 1,
    };
    if count as usize > room {
        return Err(invalid!(
            "the plan would need more than {} work items (capacity = {capacity}, split_keys = {}, {} KV heads): raise the capacity or split_keys",
            limits::MAX_WORK_ITEMS,
            opts.split_keys,
            s.heads
        ));
    }
    match s.fixed_split {
        Some(fs) => {
            let mut k = key_begin;
            loop {
                // In u64: the next multiple of a large `fs` may not fit in u32.
                let end = ((k as u64 / fs as u64 + 1) * fs as u64).min(key_end as u64) as u32;
                out.push((k, end.max(k)));
                if end >= key_end {
                    break;
                }
                k = end;
            }
        }
        None if opts.split_kv && cost > capacity && key_end - key_begin > block_n => {
            let pieces = (cost / capacity).ceil() as u32;
            let step = ((key_end - key_begin).div_ceil(pieces) as u64).next_multiple_of(block_n as u64);
            let mut k = key_begin as u64;
            while k < key_end as u64 {
                out.push((k as u32, (k + step).min(key_end as u64) as u32));
                k += step;
            }
        }
        None => out.push((key_begin, key_end)),
    }
    Ok(())
}

/// One future work item, replicated for every KV head.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Piece {
    seg_begin: u32,
    seg_count: u32,
    chunk_begin: u32,
    chunk_count: u32,
    num_rows: u32,
    partial: bool,
    bundle: u32,
    /// The request whose pieces are grouped as one unit (see step 5), or [`NO_RUN`].
    run: u32,
    cost: f64,
}

/// One query token's partial result: the piece and tile row (of the token's first head) that
/// hold it, and where its keys start. Merges list a token's pieces in key order, so a result
/// never depends on the order items were emitted in.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PartialRow {
    token: u32,
    key_begin: u32,
    piece: u32,
    row: u32,
}

/// The pieces made so far and the plan entries they name: a piece's rows are
/// `segments[seg_begin..][..seg_count]`, its keys `chunks[chunk_begin..][..chunk_count]`; each
/// token row of a partial piece has its [`PartialRow`]; `counts` counts them.
struct Pieces {
    segments: Vec<RowSegment>,
    chunks: Vec<KvChunk>,
    pieces: Vec<Piece>,
    partial_rows: Vec<PartialRow>,
    counts: Counts,
}

/// The statistics' counts of the pieces made so far, for one KV head: real (row, visible key)
/// pairs, (row, key) pairs the tiles compute, partial pieces and their rows. Counted as each
/// piece is made, where its chunks and the segments each covers are at hand (the sums are
/// integers: the order they are counted in does not matter).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counts {
    useful: u64,
    computed: u64,
    partial_pieces: u32,
    partial_rows: u32,
}

impl Counts {
    /// Counts chunk `c` against `segments`, the segments whose rows it covers. Always inlined:
    /// out of line, the chunk and segment it is lent go through the stack, and pushing them
    /// afterwards reads back as one wide load what was just stored field by field (a store
    /// forwarding stall per piece).
    #[inline(always)]
    fn chunk(&mut self, s: &Setup, c: &KvChunk, segments: &[RowSegment]) {
        self.computed += sliced_rows(c.row_begin, c.row_end) as u64 * (c.key_end - c.key_begin) as u64;
        for sg in segments {
            let req = &s.requests[sg.request as usize];
            self.useful += s.group as u64 * visible_keys(req, sg.q_begin, sg.q_count, s.causal, s.window, c.key_begin, c.key_end);
        }
    }

    /// Counts a piece of `num_rows` rows.
    #[inline]
    fn piece(&mut self, partial: bool, num_rows: u32) {
        if partial {
            self.partial_pieces += 1;
            self.partial_rows += num_rows;
        }
    }
}

/// Records a partial row for each token of `seg`, a segment of `piece` reading from `key_begin`.
#[inline]
fn record_partials(s: &Setup, partial_rows: &mut Vec<PartialRow>, seg: &RowSegment, key_begin: u32, piece: u32) {
    let q_start = s.requests[seg.request as usize].q_start;
    for t in 0..seg.q_count {
        partial_rows.push(PartialRow { token: q_start + seg.q_begin + t, key_begin, piece, row: seg.row_begin + t * s.group });
    }
}

/// Step 3's result.
struct Split {
    work: Pieces,
    /// The blocks left for packing (step 4), in request order.
    to_pack: Vec<Block>,
    /// Requests with a partial piece: split, or sharing a prefix.
    num_split_requests: u32,
}

/// Step 3, splits. Guarantees: every prefix tile, then every block, in order, is cut by
/// [`cut_keys`] into pieces of one chunk each (a prefix tile's read through its reader's pages
/// for all its rows) that share the tile's or block's segments, appended after `segments`, the
/// prefix tiles'. Prefix-tile pieces, bundle members' and split blocks' pieces are partial and
/// record their partial rows; a run's pieces carry the run. A block cut into one range, of
/// fewer than `block_m` rows and not in a run, is left in `to_pack` instead when packing is on.
/// More than `max_pieces` pieces is an error.
fn split(
    s: &Setup,
    capacity: f64,
    prefix_tiles: &[PrefixTile],
    mut segments: Vec<RowSegment>,
    blocks: &[Block],
    runs: &[bool],
    sc: &mut Scratch,
) -> Result<Split> {
    let mut split_request = reuse(&mut sc.split_request);
    split_request.resize(s.requests.len(), false);
    // Without splits: a piece and a chunk per prefix tile and block, a segment per block (packing
    // only merges pieces). Splits grow them.
    let unsplit = prefix_tiles.len() + blocks.len();
    segments.reserve(blocks.len());
    let mut pieces = reuse(&mut sc.pieces);
    pieces.reserve(unsplit);
    let mut chunks = reuse(&mut sc.chunks);
    chunks.reserve(unsplit);
    let mut partial_rows = reuse(&mut sc.partial_rows);
    let mut ranges = reuse(&mut sc.ranges);
    let mut to_pack = reuse(&mut sc.to_pack);
    let mut counts = Counts::default();
    let result = split_into(
        s,
        capacity,
        prefix_tiles,
        blocks,
        runs,
        (&mut segments, &mut chunks, &mut pieces, &mut partial_rows, &mut counts),
        &mut ranges,
        &mut split_request,
        &mut to_pack,
    );
    let num_split_requests = split_request.iter().filter(|&&x| x).count() as u32;
    (sc.split_request, sc.ranges) = (split_request, ranges);
    let work = Pieces { segments, chunks, pieces, partial_rows, counts };
    match result {
        Ok(()) => Ok(Split { work, to_pack, num_split_requests }),
        Err(e) => {
            let Pieces { segments, chunks, pieces, partial_rows, .. } = work;
            (sc.segments, sc.chunks, sc.pieces, sc.partial_rows, sc.to_pack) = (segments, chunks, pieces, partial_rows, to_pack);
            Err(e)
        }
    }
}

/// The body of [`split`], writing into its buffers.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn split_into(
    s: &Setup,
    capacity: f64,
    prefix_tiles: &[PrefixTile],
    blocks: &[Block],
    runs: &[bool],
    (segments, chunks, pieces, partial_rows, counts): (
        &mut Vec<RowSegment>,
        &mut Vec<KvChunk>,
        &mut Vec<Piece>,
        &mut Vec<PartialRow>,
        &mut Counts,
    ),
    ranges: &mut Vec<(u32, u32)>,
    split_request: &mut [bool],
    to_pack: &mut Vec<Block>,
) -> Result<()> {
    let (group, block_m) = (s.group, s.block_m);
    let max_pieces = s.max_pieces();

    // Prefix tiles: split pieces share the tile's segments.
    for tile in prefix_tiles {
        cut_keys(s, capacity, 0, tile.key_end, s.block_cost(tile.num_rows, tile.key_end), max_pieces.saturating_sub(pieces.len()), ranges)?;
        for &(kb, ke) in ranges.iter() {
            let p = pieces.len() as u32;
            let chunk = KvChunk { request: tile.reader, key_begin: kb, key_end: ke, row_begin: 0, row_end: tile.num_rows };
            counts.chunk(s, &chunk, &segments[tile.seg_begin as usize..(tile.seg_begin + tile.seg_count) as usize]);
            counts.piece(true, tile.num_rows);
            chunks.push(chunk);
            pieces.push(Piece {
                seg_begin: tile.seg_begin,
                seg_count: tile.seg_count,
                chunk_begin: chunks.len() as u32 - 1,
                chunk_count: 1,
                num_rows: tile.num_rows,
                partial: true,
                bundle: tile.bundle,
                run: NO_RUN,
                cost: s.block_cost(tile.num_rows, ke - kb),
            });
            for seg in &segments[tile.seg_begin as usize..(tile.seg_begin + tile.seg_count) as usize] {
                record_partials(s, partial_rows, seg, kb, p);
            }
            for seg in &segments[tile.seg_begin as usize..(tile.seg_begin + tile.seg_count) as usize] {
                split_request[seg.request as usize] = true;
            }
        }
    }

    // Blocks: a split block's pieces share its segment; unsplit short blocks wait for packing.
    let in_run = |r: u32| runs.get(r as usize).copied().unwrap_or(false);
    for b in blocks {
        cut_keys(s, capacity, b.key_begin, b.key_end, b.cost, max_pieces.saturating_sub(pieces.len()), ranges)?;
        if s.batch.has_custom_mask() {
            // A piece whose keys the mask hides from all the block's rows is no work; the others
            // shrink to the keys it shows. The block's own range was trimmed likewise, so its
            // first piece stays, and a block that sees nothing keeps its one empty piece.
            let req = &s.requests[b.request as usize];
            let queries = b.q_begin..b.q_begin + b.q_count;
            let first = ranges.first().copied();
            ranges.retain_mut(|range| {
                *range = masked_key_span(s.batch, req, b.request as usize, queries.clone(), s.window, *range);
                range.0 < range.1
            });
            if let (true, Some(first)) = (ranges.is_empty(), first) {
                ranges.push(first);
            }
        }
        let rows = b.q_count * group;
        let run = if in_run(b.request) { b.request } else { NO_RUN };
        if ranges.len() == 1 && s.opts.packing && rows < block_m && run == NO_RUN {
            to_pack.push(*b);
            continue;
        }
        let partial = b.partial || ranges.len() > 1;
        split_request[b.request as usize] |= partial;
        let seg = RowSegment { request: b.request, q_begin: b.q_begin, q_count: b.q_count, row_begin: 0 };
        let seg_begin = segments.len() as u32;
        segments.push(seg);
        for &(kb, ke) in ranges.iter() {
            let p = pieces.len() as u32;
            let chunk = KvChunk { request: b.request, key_begin: kb, key_end: ke, row_begin: 0, row_end: rows };
            counts.chunk(s, &chunk, std::slice::from_ref(&seg));
            counts.piece(partial, rows);
            chunks.push(chunk);
            pieces.push(Piece {
                seg_begin,
                seg_count: 1,
                chunk_begin: chunks.len() as u32 - 1,
                chunk_count: 1,
                num_rows: rows,
                partial,
                bundle: b.bundle,
                run,
                cost: s.block_cost(rows, ke - kb),
            });
            if partial {
                record_partials(s, partial_rows, &seg, kb, p);
            }
        }
    }
    Ok(())
}

/// Step 4, packing: appends a piece per packed tile to `work`. Guarantees: the blocks are taken
/// class by class (bundle, then finality), in their order within a class, and packed next-fit:
/// a tile is a run of consecutive blocks of one class, whose rows are all at most one
/// [`ROW_SLICE`] or all more, of at most `ROW_SLICE` rows in the first case and `block_m` in
/// the other, and of a cost of at most `capacity / 8` unless it is a single block. A tile has a
/// segment and a chunk per block, on consecutive rows from row 0, and is no run; a partial
/// tile records its partial rows.
fn pack(s: &Setup, capacity: f64, num_bundles: usize, to_pack: &[Block], work: &mut Pieces, sc: &mut Scratch) {
    let (profile, group, block_m) = (s.profile, s.group, s.block_m);
    let Pieces { segments, chunks, pieces, partial_rows, counts } = work;
    // Next-fit within a class (prefix group, finality), in request order. A stable counting
    // sort by class keeps this linear.
    let class_of = |b: &Block| (b.bundle.wrapping_add(1) as usize) << 1 | b.partial as usize;
    let num_classes = (num_bundles + 1) << 1;
    let class_start = &mut sc.class_start;
    class_start.clear();
    class_start.resize(num_classes + 1, 0);
    for b in to_pack {
        class_start[class_of(b) + 1] += 1;
    }
    for c in 0..num_classes {
        class_start[c + 1] += class_start[c];
    }
    let order = &mut sc.order;
    order.clear();
    order.resize(to_pack.len(), 0);
    for (i, b) in to_pack.iter().enumerate() {
        let c = class_of(b);
        order[class_start[c] as usize] = i as u32;
        class_start[c] += 1;
    }
    // Packed tiles stay below an eighth of a group, so the grouping can still even out loads
    // with them (LPT's excess over the mean is at most about its smallest late units;
    // docs/performance-log.md#pack-limit).
    let pack_limit = capacity / 8.0;
    let mut i = 0;
    while i < order.len() {
        let first = to_pack[order[i] as usize];
        let (seg_begin, chunk_begin) = (segments.len() as u32, chunks.len() as u32);
        let mut rows = 0;
        let mut cost = profile.cost_item;
        let one_slice = |rows: u32| rows <= ROW_SLICE;
        let tile_rows = if one_slice(first.q_count * group) { ROW_SLICE } else { block_m };
        let mut j = i;
        while j < order.len() {
            let b = to_pack[order[j] as usize];
            let b_rows = b.q_count * group;
            let b_cost = chunk_cost(profile, rows, rows + b_rows, b.key_end - b.key_begin);
            let same_class =
                b.bundle == first.bundle && b.partial == first.partial && one_slice(b_rows) == one_slice(first.q_count * group);
            if j > i && (!same_class || rows + b_rows > tile_rows || cost + b_cost > pack_limit) {
                break;
            }
            let seg = RowSegment { request: b.request, q_begin: b.q_begin, q_count: b.q_count, row_begin: rows };
            let chunk = KvChunk { request: b.request, key_begin: b.key_begin, key_end: b.key_end, row_begin: rows, row_end: rows + b_rows };
            // A tile's chunk covers its block's segment alone.
            counts.chunk(s, &chunk, std::slice::from_ref(&seg));
            segments.push(seg);
            chunks.push(chunk);
            rows += b_rows;
            cost += b_cost;
            j += 1;
        }
        let p = pieces.len() as u32;
        counts.piece(first.partial, rows);
        pieces.push(Piece {
            seg_begin,
            seg_count: (j - i) as u32,
            chunk_begin,
            chunk_count: (j - i) as u32,
            num_rows: rows,
            partial: first.partial,
            bundle: first.bundle,
            run: NO_RUN,
            cost,
        });
        if first.partial {
            for k in 0..(j - i) {
                let seg = segments[seg_begin as usize + k];
                record_partials(s, partial_rows, &seg, chunks[chunk_begin as usize + k].key_begin, p);
            }
        }
        i = j;
    }
}

/// Step 5's result. The groups are the entities of `Scratch::entities` in order, each for every
/// KV head: group `u × heads + h` is entity `entities[u]`'s pieces for KV head `h`. Groups are
/// numbered `0..num_groups`; only the last ones may be empty (with balancing, one when there are
/// no pieces, and one per bundle without pieces: its cost 0 sorts it last).
struct Groups {
    num_groups: usize,
}

/// An entity's place in LPT order, from its cost: decreasing cost is increasing key (in
/// `f64::total_cmp` order; integers compare without the float comparison's branches, and
/// made once per entity rather than per comparison).
#[inline]
fn lpt_key(cost: f64) -> u64 {
    !total_order_key(cost)
}

/// An integer whose unsigned order is `f64::total_cmp`'s order of `x`.
#[inline]
fn total_order_key(x: f64) -> u64 {
    let bits = x.to_bits() as i64;
    (bits ^ (((bits >> 63) as u64) >> 1) as i64) as u64 ^ (1 << 63)
}

/// Step 5, grouping: fills the entities (`Scratch::entities`, `entity_pieces`, `entity_start`).
/// Guarantees: more than `max_pieces` pieces is an error. With balancing, each unit (an entity
/// for one KV head) is a group of its own, the entities ordered by decreasing cost (ties by
/// entity order), the KV heads of an entity consecutive; an entity is a whole bundle costing at
/// most `capacity` (its pieces in piece order), else the consecutive pieces of one run, else one
/// piece; whole bundles come after the others in ties. Without balancing, each piece is an
/// entity, in piece order: each item is a group of its own, numbered `piece × heads + kv_head`.
fn group(s: &Setup, capacity: f64, num_bundles: usize, pieces: &[Piece], sc: &mut Scratch) -> Result<Groups> {
    // A unit is (entity, KV head); an entity is a piece, or a whole prefix group that fits in C.
    let heads = s.heads;
    let heads_us = heads as usize;
    if pieces.len() > s.max_pieces() {
        return Err(invalid!(
            "the batch needs {} work items ({} tiles × {heads} KV heads), more than the {} a plan may have",
            pieces.len() * heads_us,
            pieces.len(),
            limits::MAX_WORK_ITEMS
        ));
    }
    let (entities, entity_pieces, entity_start) = (&mut sc.entities, &mut sc.entity_pieces, &mut sc.entity_start);
    entities.clear();
    entity_pieces.clear();
    entity_start.clear();
    entity_start.push(0);
    if !s.opts.balancing {
        // A group per item, in order: what a non-persistent launch (a CTA per tile) does.
        entities.extend(pieces.iter().enumerate().map(|(i, p)| (lpt_key(p.cost), i as u32)));
        entity_pieces.extend(0..pieces.len() as u32);
        entity_start.extend(1..=pieces.len() as u32);
        return Ok(Groups { num_groups: pieces.len() * heads_us });
    }
    let bundle_cost = &mut sc.bundle_cost;
    bundle_cost.clear();
    bundle_cost.resize(num_bundles, 0.0);
    for p in pieces {
        if p.bundle != NO_BUNDLE {
            bundle_cost[p.bundle as usize] += p.cost;
        }
    }
    let bundle_whole = &mut sc.bundle_whole;
    bundle_whole.clear();
    bundle_whole.extend(bundle_cost.iter().map(|&c| c <= capacity));
    // Entities, each a list of pieces placed together: a whole bundle, a run (one request's
    // consecutive pieces), or one piece. Entity e is (cost, e), its pieces
    // entity_pieces[entity_start[e]..entity_start[e + 1]].
    // Ends the entity whose pieces run up to entity_pieces[..end].
    let mut close = |cost: f64, end: usize| {
        entities.push((lpt_key(cost), entity_start.len() as u32 - 1));
        entity_start.push(end as u32);
    };
    let mut i = 0;
    while i < pieces.len() {
        let p = pieces[i];
        let mut j = i + 1;
        if p.bundle == NO_BUNDLE || !bundle_whole[p.bundle as usize] {
            while p.run != NO_RUN && j < pieces.len() && pieces[j].run == p.run {
                j += 1;
            }
            entity_pieces.extend(i as u32..j as u32);
            close(pieces[i..j].iter().map(|q| q.cost).sum(), entity_pieces.len());
        }
        i = j;
    }
    // The whole bundles' pieces, bundle by bundle, in piece order (a counting sort).
    let (bundle_start, bundle_list) = (&mut sc.bundle_start, &mut sc.bundle_list);
    bundle_start.clear();
    bundle_start.resize(num_bundles + 1, 0);
    let whole = |p: &Piece| p.bundle != NO_BUNDLE && bundle_whole[p.bundle as usize];
    for p in pieces.iter().filter(|p| whole(p)) {
        bundle_start[p.bundle as usize + 1] += 1;
    }
    for b in 0..num_bundles {
        bundle_start[b + 1] += bundle_start[b];
    }
    bundle_list.clear();
    bundle_list.resize(bundle_start[num_bundles] as usize, 0);
    for (i, p) in pieces.iter().enumerate().filter(|(_, p)| whole(p)) {
        bundle_list[bundle_start[p.bundle as usize] as usize] = i as u32;
        bundle_start[p.bundle as usize] += 1;
    }
    let mut begin = 0usize;
    for b in 0..num_bundles {
        // bundle_start[b] is now bundle b's end.
        let end = bundle_start[b] as usize;
        if bundle_whole[b] {
            entity_pieces.extend_from_slice(&bundle_list[begin..end]);
            close(bundle_cost[b], entity_pieces.len());
        }
        begin = end;
    }
    // By decreasing cost (in `f64::total_cmp` order), then by index: integer keys compare
    // without the float comparison's branches.
    entities.sort_unstable();
    // Each unit its own group, in LPT order: the CTAs draw groups from a shared counter in
    // this order, so the costliest units start first and a CTA takes the next one as soon as
    // it is free (list scheduling). LPT bins fixed on the host (the first version) leave the
    // cost model's errors to the last groups, and measured slower on decode steps and on the
    // trace replay (docs/performance-log.md#lpt-units).
    Ok(Groups { num_groups: (entities.len() * heads_us).max(1) })
}

/// Step 6's work items, their units and partial slots.
struct Emitted {
    items: Vec<WorkItem>,
    units: Vec<WorkUnit>,
    /// Per piece, its first partial slot (KV head 0's, row 0) and the slot stride of its unit;
    /// `slot` is [`FINAL_OUTPUT`] for a final piece. Empty when no piece is partial.
    slot_of: Vec<MergeSlot>,
    /// Each group's cost (none without pieces), their sum in group order and their maximum.
    group_costs: Vec<f64>,
    total_cost: f64,
    max_group_cost: f64,
}

/// Step 6, emission. Guarantees: an item per piece, a [`WorkUnit`] per entity with pieces, in
/// entity order, its items the entity's pieces in order; entity `u`'s items run in group `u ×
/// heads` (KV head h's copies in `u × heads + h`: group stride 1). Partial slots are handed out
/// in the order of the item copies (unit by unit, KV head by KV head, item by item), `num_rows`
/// slots each, from slot 0, so a unit's slot stride is its partial items' rows; final items
/// write O. Unit `u`'s groups cost its pieces, summed in piece order as the count by items
/// sums them (an entity without pieces costs 0); none without pieces.
fn emit(s: &Setup, pieces: &[Piece], sc: &mut Scratch) -> Emitted {
    let heads = s.heads;
    let any_partial = pieces.iter().any(|p| p.partial);
    let mut items = reuse(&mut sc.items);
    let mut units = reuse(&mut sc.units);
    let mut slot_of = reuse(&mut sc.slot_of);
    let mut group_costs = reuse(&mut sc.group_costs);
    // The groups' total cost is a chain of dependent additions, one per group (KV-head copy),
    // in group order; here the item writing runs beside it.
    let (mut total_cost, mut max_group_cost) = (0.0f64, 0.0f64);
    items.reserve(pieces.len());
    units.reserve(sc.entities.len());
    if any_partial {
        slot_of.resize(pieces.len(), MergeSlot { slot: FINAL_OUTPUT, head_stride: 0 });
    }
    let mut next_slot = 0u32;
    for (u, &(_, e)) in sc.entities.iter().enumerate() {
        let list = &sc.entity_pieces[sc.entity_start[e as usize] as usize..sc.entity_start[e as usize + 1] as usize];
        if list.is_empty() {
            if !pieces.is_empty() {
                group_costs.extend(std::iter::repeat_n(0.0, heads as usize));
            }
            continue;
        }
        let group = u as u32 * heads;
        let item_begin = items.len() as u32;
        let mut unit_slots = 0u32;
        let mut cost = 0.0;
        for &p in list {
            let piece = &pieces[p as usize];
            cost += piece.cost;
            let partial_slot = if piece.partial {
                let slot = next_slot + unit_slots;
                unit_slots += piece.num_rows;
                slot
            } else {
                FINAL_OUTPUT
            };
            items.push(WorkItem {
                seg_begin: piece.seg_begin,
                seg_count: piece.seg_count,
                chunk_begin: piece.chunk_begin,
                chunk_count: piece.chunk_count,
                num_rows: piece.num_rows,
                partial_slot,
                group,
            });
        }
        if unit_slots > 0 {
            for (&p, item) in list.iter().zip(&items[item_begin as usize..]) {
                slot_of[p as usize] = MergeSlot { slot: item.partial_slot, head_stride: unit_slots };
            }
        }
        units.push(WorkUnit { item_begin, item_count: list.len() as u32, group_stride: 1, slot_stride: unit_slots });
        next_slot += unit_slots * heads;
        group_costs.extend(std::iter::repeat_n(cost, heads as usize));
        for _ in 0..heads {
            total_cost += cost;
        }
        max_group_cost = max_group_cost.max(cost);
    }
    Emitted { items, units, slot_of, group_costs, total_cost, max_group_cost }
}

/// Step 6's merge list.
struct Merges {
    merges: Vec<MergeRow>,
    merge_slots: Vec<MergeSlot>,
}

/// Step 6, merges. Guarantees: a merge row per token with partial rows, in token order, whose
/// slots are its pieces' rows (the slot of its first query head, and its unit's slot stride
/// from one KV head to the next), in key order; a merge's slots are consecutive in
/// `merge_slots`, merges in the order listed. Nothing (and no per-token pass over the batch)
/// when there are no partial rows.
fn merge_list(total_q: u32, partial_rows: &[PartialRow], slot_of: &[MergeSlot], sc: &mut Scratch) -> Merges {
    let mut merges = reuse(&mut sc.merges);
    let mut merge_slots = reuse(&mut sc.merge_slots);
    if partial_rows.is_empty() {
        return Merges { merges, merge_slots };
    }
    let total_q = total_q as usize;
    let token_start = &mut sc.token_start;
    token_start.clear();
    token_start.resize(total_q + 1, 0);
    for pr in partial_rows {
        token_start[pr.token as usize + 1] += 1;
    }
    for t in 0..total_q {
        token_start[t + 1] += token_start[t];
    }
    // Sizes are known: one merge slot per partial row. Each token's rows land at their place
    // in token order (a bucket pass, no sort).
    merge_slots.resize(partial_rows.len(), MergeSlot::default());
    // Indices into `partial_rows`, token by token: a quarter of the rows' bytes (a plan of 2^22
    // pieces has as many partial rows).
    let by_token = &mut sc.by_token;
    by_token.clear();
    by_token.resize(partial_rows.len(), 0);
    {
        let next = &mut sc.token_next;
        next.clear();
        next.extend_from_slice(token_start);
        for (i, pr) in partial_rows.iter().enumerate() {
            by_token[next[pr.token as usize] as usize] = i as u32;
            next[pr.token as usize] += 1;
        }
    }
    let merged_tokens = token_start.windows(2).filter(|w| w[1] > w[0]).count();
    merges.reserve(merged_tokens);
    for t in 0..total_q {
        let (begin, end) = (token_start[t] as usize, token_start[t + 1] as usize);
        if begin == end {
            continue;
        }
        let list = &mut by_token[begin..end];
        // Pieces are made in key order per token (prefix tile, then the suffix's splits, or a
        // packed tile), and the bucket pass above keeps that order: sorting is a fallback.
        let key = |&i: &u32| partial_rows[i as usize].key_begin;
        if !list.is_sorted_by_key(key) {
            list.sort_unstable_by_key(key);
        }
        for (dst, &i) in merge_slots[begin..end].iter_mut().zip(list.iter()) {
            let pr = &partial_rows[i as usize];
            let of = slot_of[pr.piece as usize];
            *dst = MergeSlot { slot: of.slot + pr.row, head_stride: of.head_stride };
        }
        merges.push(MergeRow { q_token: t as u32, slot_begin: begin as u32, slot_count: (end - begin) as u32 });
    }
    Merges { merges, merge_slots }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanStats;
    use crate::types::{Batch, DType, Shape};

    #[test]
    fn total_order_key_orders_as_total_cmp() {
        let xs = [
            f64::NEG_INFINITY,
            -1e300,
            -2.5,
            -1.0,
            -f64::MIN_POSITIVE,
            -0.0,
            0.0,
            f64::MIN_POSITIVE,
            1e-300,
            1.0,
            2.5,
            3.0,
            1e300,
            f64::INFINITY,
            f64::NAN,
            -f64::NAN,
        ];
        for a in xs {
            for b in xs {
                assert_eq!(total_order_key(a).cmp(&total_order_key(b)), a.total_cmp(&b), "{a} vs {b}");
            }
        }
    }

    /// Costs that are easy to follow by hand: a chunk costs its sliced rows × its keys.
    fn profile(block_m: u32) -> DeviceProfile {
        DeviceProfile { num_workers: 2, block_m, block_n: 16, cost_row_key: 1.0, cost_key: 0.0, cost_item: 0.0 }
    }

    /// A plan as `Plan::build` hands it to the scheduler, for causal `(q_len, kv_len)` requests
    /// on pages of 16 keys: validated, requests filled in.
    fn plan(
        lens: &[(u32, u32)],
        group: u32,
        heads: u32,
        profile: &DeviceProfile,
        options: PlanOptions,
        prefix_groups: Vec<PrefixGroup>,
    ) -> Plan {
        let shape = Shape {
            num_qo_heads: heads * group,
            num_kv_heads: heads,
            head_dim: 128,
            dtype: DType::Bf16,
            kv_dtype: DType::Bf16,
            causal: true,
            sm_scale: 0.1,
        };
        let (mut qo, mut kv, mut last) = (vec![0i32], vec![0i32], Vec::new());
        for &(q, k) in lens {
            qo.push(qo.last().unwrap() + q as i32);
            kv.push(kv.last().unwrap() + k.div_ceil(16) as i32);
            last.push(if k == 0 { 0 } else { ((k - 1) % 16 + 1) as i32 });
        }
        let num_pages = *kv.last().unwrap() as u32;
        let batch = Batch {
            qo_indptr: qo,
            kv_indptr: kv,
            kv_page_indices: (0..num_pages as i32).collect(),
            kv_last_page_len: last,
            page_size: 16,
            num_pages: num_pages.max(1),
            prefix_groups,
            custom_mask: Vec::new(),
            mask_indptr: Vec::new(),
        };
        shape.validate().unwrap();
        batch.validate(true).unwrap();
        profile.validate().unwrap();
        let requests = (0..batch.len())
            .map(|r| RequestInfo {
                q_start: batch.q_start(r),
                q_len: batch.q_len(r),
                kv_len: batch.kv_len(r),
                page_start: batch.kv_indptr[r] as u32,
            })
            .collect();
        Plan {
            shape,
            batch,
            options,
            block_m: profile.block_m,
            requests,
            items: Vec::new(),
            units: Vec::new(),
            row_segments: Vec::new(),
            kv_chunks: Vec::new(),
            merges: Vec::new(),
            merge_slots: Vec::new(),
            group_costs: Vec::new(),
            stats: PlanStats::default(),
            worker_load: Default::default(),
            pool_layout: None,
            scratch: Default::default(),
        }
    }

    fn seg(request: u32, q_begin: u32, q_count: u32, row_begin: u32) -> RowSegment {
        RowSegment { request, q_begin, q_count, row_begin }
    }

    fn block(request: u32, q_begin: u32, q_count: u32, keys: (u32, u32), partial: bool, bundle: u32, cost: f64) -> Block {
        Block { request, q_begin, q_count, key_begin: keys.0, key_end: keys.1, partial, bundle, cost }
    }

    fn piece(cost: f64, bundle: u32, run: u32) -> Piece {
        Piece { seg_begin: 0, seg_count: 1, chunk_begin: 0, chunk_count: 1, num_rows: 16, partial: false, bundle, run, cost }
    }

    fn no_pieces() -> Pieces {
        Pieces { segments: Vec::new(), chunks: Vec::new(), pieces: Vec::new(), partial_rows: Vec::new(), counts: Counts::default() }
    }

    #[test]
    fn bundles_stack_the_sharers_decodes_and_leave_prompts_out() {
        // GQA 4, one-slice tiles: 4 tokens a tile. Request 1 (8 tokens, 32 rows) is no sharer.
        let p = profile(16);
        let plan = plan(
            &[(1, 100), (8, 100), (1, 120), (1, 50)],
            4,
            1,
            &p,
            PlanOptions::default(),
            vec![PrefixGroup { prefix_len: 64, members: vec![2, 0, 1] }],
        );
        let b = bundle_prefixes(&Setup::new(&plan, &p), &plan.batch.prefix_groups, &mut Scratch::default());
        assert_eq!(b.bundle_of, [0, NO_BUNDLE, 0, NO_BUNDLE]);
        assert_eq!(b.shared_len, [64]);
        // Member order; the first sharer's pages are read.
        assert_eq!(b.prefix_tiles, [PrefixTile { seg_begin: 0, seg_count: 2, num_rows: 8, reader: 2, key_end: 64, bundle: 0 }]);
        assert_eq!(b.segments, [seg(2, 0, 1, 0), seg(0, 0, 1, 4)]);
    }

    #[test]
    fn bundle_tiles_hold_at_most_block_m_rows_and_cut_a_member_between_them() {
        let p = profile(16);
        let plan = plan(&[(3, 100), (3, 90)], 4, 1, &p, PlanOptions::default(), vec![PrefixGroup { prefix_len: 64, members: vec![0, 1] }]);
        let b = bundle_prefixes(&Setup::new(&plan, &p), &plan.batch.prefix_groups, &mut Scratch::default());
        assert_eq!(
            b.prefix_tiles,
            [
                PrefixTile { seg_begin: 0, seg_count: 2, num_rows: 16, reader: 0, key_end: 64, bundle: 0 },
                PrefixTile { seg_begin: 2, seg_count: 1, num_rows: 8, reader: 0, key_end: 64, bundle: 0 }
            ]
        );
        assert_eq!(b.segments, [seg(0, 0, 3, 0), seg(1, 0, 1, 12), seg(1, 1, 2, 0)]);
    }

    #[test]
    fn bundles_follow_the_options() {
        let p = profile(16);
        let groups = vec![PrefixGroup { prefix_len: 64, members: vec![0, 1] }];
        let bundles = |lens: &[(u32, u32)], options: PlanOptions| {
            let plan = plan(lens, 4, 1, &p, options, groups.clone());
            let b = bundle_prefixes(&Setup::new(&plan, &p), &plan.batch.prefix_groups, &mut Scratch::default());
            (b.shared_len, b.prefix_tiles.iter().map(|t| t.key_end).collect::<Vec<_>>())
        };
        let decodes = [(1, 100), (1, 100)];
        let det = |split_kv, split_keys| PlanOptions { deterministic: true, split_kv, split_keys, ..PlanOptions::default() };
        assert_eq!(bundles(&decodes, PlanOptions::default()), (vec![64], vec![64]));
        assert_eq!(bundles(&decodes, PlanOptions { prefix_sharing: false, ..PlanOptions::default() }), (vec![], vec![]));
        // Deterministic: the prefix down to a multiple of split_keys, none when that is 0 or
        // when nothing is split.
        assert_eq!(bundles(&decodes, det(true, 48)), (vec![48], vec![48]));
        assert_eq!(bundles(&decodes, det(true, 100)), (vec![], vec![]));
        assert_eq!(bundles(&decodes, det(false, 48)), (vec![], vec![]));
        // One sharer is no bundle.
        assert_eq!(bundles(&[(1, 100), (8, 100)], PlanOptions::default()), (vec![], vec![]));
    }

    #[test]
    fn row_blocks_cut_tokens_into_tiles_and_members_to_their_suffix() {
        // GQA 4, 64-row tiles: 16 tokens a block.
        let p = profile(64);
        let plan = plan(
            &[(40, 100), (1, 70), (1, 64), (1, 80)],
            4,
            1,
            &p,
            PlanOptions::default(),
            vec![PrefixGroup { prefix_len: 64, members: vec![1, 2] }],
        );
        let s = Setup::new(&plan, &p);
        let bundles = bundle_prefixes(&s, &plan.batch.prefix_groups, &mut Scratch::default());
        let blocks = row_blocks(&s, &bundles, &mut Scratch::default());
        assert_eq!(
            blocks,
            [
                // Causal: a block's keys end where its last token's do.
                block(0, 0, 16, (0, 76), false, NO_BUNDLE, 64.0 * 76.0),
                block(0, 16, 16, (0, 92), false, NO_BUNDLE, 64.0 * 92.0),
                block(0, 32, 8, (0, 100), false, NO_BUNDLE, 32.0 * 100.0),
                // A member's suffix, merged with its prefix tile; request 2 has none.
                block(1, 0, 1, (64, 70), true, 0, 16.0 * 6.0),
                block(3, 0, 1, (0, 80), false, NO_BUNDLE, 16.0 * 80.0),
            ]
        );
    }

    #[test]
    fn capacity_is_the_options_or_the_cost_per_wave_and_worker() {
        let p = profile(64);
        let blocks = [block(0, 0, 16, (0, 10), false, NO_BUNDLE, 1000.0), block(1, 0, 16, (0, 10), false, NO_BUNDLE, 3000.0)];
        let tiles = [PrefixTile { seg_begin: 0, seg_count: 1, num_rows: 16, reader: 0, key_end: 10, bundle: 0 }];
        let capacity_with = |heads: u32, c: Option<f64>| {
            let plan = plan(&[(1, 10), (1, 10)], 1, heads, &p, PlanOptions { capacity: c, ..PlanOptions::default() }, vec![]);
            capacity(&Setup::new(&plan, &p), &blocks, &tiles)
        };
        // (1000 + 3000 + 16 × 10) × heads / (2 waves × 2 workers).
        assert_eq!(capacity_with(1, None), 1040.0);
        assert_eq!(capacity_with(2, None), 2080.0);
        assert_eq!(capacity_with(1, Some(5.0)), 5.0);
        // Never below min_capacity: 16 rows × 4 block_n keys.
        let plan = plan(&[(1, 10)], 1, 1, &p, PlanOptions::default(), vec![]);
        assert_eq!(capacity(&Setup::new(&plan, &p), &blocks[..1], &[]), 1024.0);
    }

    #[test]
    fn runs_are_requests_with_a_full_tile_within_capacity() {
        let p = profile(64);
        // Costs: 64 × 100 = 6400; 64 × 96 + 16 × 100 = 7744; 8 tokens, no full tile; 32 × 300.
        let lens = [(16, 100), (20, 100), (8, 100), (32, 300)];
        let runs_with = |options: PlanOptions, capacity: f64| {
            let plan = plan(&lens, 4, 1, &p, options, vec![]);
            let s = Setup::new(&plan, &p);
            let blocks = row_blocks(&s, &bundle_prefixes(&s, &[], &mut Scratch::default()), &mut Scratch::default());
            runs(&s, &blocks, capacity, &mut Scratch::default())
        };
        assert_eq!(runs_with(PlanOptions::default(), 6400.0), [true, false, false, false]);
        assert_eq!(runs_with(PlanOptions::default(), 6399.0), [false, false, false, false]);
        assert_eq!(runs_with(PlanOptions::default(), 8000.0), [true, true, false, false]);
        assert_eq!(
            runs_with(PlanOptions { deterministic: true, split_kv: false, ..PlanOptions::default() }, 8000.0),
            [true, true, false, false]
        );
        assert!(runs_with(PlanOptions { balancing: false, ..PlanOptions::default() }, 8000.0).is_empty());
        assert!(runs_with(PlanOptions { deterministic: true, ..PlanOptions::default() }, 8000.0).is_empty());
        // A bundle's full tile (4 decode tokens of GQA 4 in 16-row tiles) is no run.
        let p = profile(16);
        let plan = plan(&[(4, 100), (4, 100)], 4, 1, &p, PlanOptions::default(), vec![PrefixGroup { prefix_len: 64, members: vec![0, 1] }]);
        let s = Setup::new(&plan, &p);
        let blocks = row_blocks(&s, &bundle_prefixes(&s, &plan.batch.prefix_groups, &mut Scratch::default()), &mut Scratch::default());
        assert_eq!(runs(&s, &blocks, 1e30, &mut Scratch::default()), [false, false]);
    }

    #[test]
    fn cut_keys_splits_by_capacity_on_block_n_or_at_fixed_multiples() {
        let p = profile(64);
        let cut = |options: PlanOptions, keys: (u32, u32), cost: f64, room: usize| {
            let plan = plan(&[(1, 10)], 1, 1, &p, options, vec![]);
            let mut out = Vec::new();
            cut_keys(&Setup::new(&plan, &p), 3.0, keys.0, keys.1, cost, room, &mut out).map(|()| out)
        };
        let o = PlanOptions::default;
        // ⌈10 / 3⌉ = 4 pieces of ⌈1000 / 4⌉ = 250 keys, rounded up to 16.
        assert_eq!(cut(o(), (0, 1000), 10.0, 100).unwrap(), [(0, 256), (256, 512), (512, 768), (768, 1000)]);
        assert_eq!(cut(o(), (64, 1000), 10.0, 100).unwrap(), [(64, 304), (304, 544), (544, 784), (784, 1000)]);
        // Within capacity, not splitting, or at most block_n keys: one range.
        assert_eq!(cut(o(), (0, 1000), 3.0, 100).unwrap(), [(0, 1000)]);
        assert_eq!(cut(PlanOptions { split_kv: false, ..o() }, (0, 1000), 10.0, 100).unwrap(), [(0, 1000)]);
        assert_eq!(cut(o(), (0, 16), 10.0, 100).unwrap(), [(0, 16)]);
        // Deterministic: at the absolute multiples of split_keys, whatever the cost.
        let det = |split_keys| PlanOptions { deterministic: true, split_keys, ..o() };
        assert_eq!(cut(det(100), (50, 350), 0.0, 100).unwrap(), [(50, 100), (100, 200), (200, 300), (300, 350)]);
        assert_eq!(cut(det(100), (0, 250), 0.0, 100).unwrap(), [(0, 100), (100, 200), (200, 250)]);
        assert_eq!(cut(det(100), (0, 0), 0.0, 100).unwrap(), [(0, 0)]);
        assert_eq!(cut(det(u32::MAX), (5, u32::MAX - 1), 0.0, 100).unwrap(), [(5, u32::MAX - 1)]);
        // More ranges than the room is an error.
        assert_eq!(cut(det(100), (0, 1000), 0.0, 10).unwrap().len(), 10);
        let e = cut(det(100), (0, 1000), 0.0, 9).unwrap_err().to_string();
        assert!(e.contains("more than") && e.contains("split_keys = 100"), "{e}");
        assert!(cut(o(), (0, 1000), 10.0, 3).is_err());
    }

    #[test]
    fn cut_keys_refuses_billions_of_ranges_before_making_them() {
        let p = profile(64);
        let plan = plan(&[(1, 10)], 1, 1, &p, PlanOptions { deterministic: true, split_keys: 1, ..PlanOptions::default() }, vec![]);
        let mut out = Vec::new();
        assert!(cut_keys(&Setup::new(&plan, &p), 1.0, 0, 1 << 31, 0.0, limits::MAX_WORK_ITEMS, &mut out).is_err());
        assert_eq!(out.capacity(), 0);
    }

    /// Steps 1 to 3 of `plan`.
    fn split_plan(plan: &Plan, profile: &DeviceProfile, capacity: f64) -> Result<(Split, Vec<Block>)> {
        let s = Setup::new(plan, profile);
        let bundles = bundle_prefixes(&s, &plan.batch.prefix_groups, &mut Scratch::default());
        let blocks = row_blocks(&s, &bundles, &mut Scratch::default());
        let runs = runs(&s, &blocks, capacity, &mut Scratch::default());
        Ok((split(&s, capacity, &bundles.prefix_tiles, bundles.segments, &blocks, &runs, &mut Scratch::default())?, blocks))
    }

    #[test]
    fn split_makes_prefix_pieces_then_block_pieces_and_leaves_short_blocks_to_pack() {
        let p = profile(64);
        // Two decodes sharing 64 keys, a prompt of three blocks, a long decode; C = 3000.
        let plan = plan(
            &[(1, 100), (1, 90), (40, 100), (1, 500)],
            4,
            1,
            &p,
            PlanOptions::default(),
            vec![PrefixGroup { prefix_len: 64, members: vec![0, 1] }],
        );
        let (Split { work, to_pack, num_split_requests }, blocks) = split_plan(&plan, &p, 3000.0).unwrap();
        // The members' suffixes are unsplit and short: packing takes them.
        assert_eq!(to_pack, [blocks[0], blocks[1]]);
        let ranges: Vec<(u32, u32)> = work.chunks.iter().map(|c| (c.key_begin, c.key_end)).collect();
        // Prefix tile 16 × 64 = 1024; prompt blocks 64 × 76, 64 × 92, 32 × 100; decode 16 × 500.
        assert_eq!(ranges, [(0, 64), (0, 48), (48, 76), (0, 48), (48, 92), (0, 64), (64, 100), (0, 176), (176, 352), (352, 500)]);
        assert_eq!(work.pieces.iter().map(|p| p.seg_begin).collect::<Vec<_>>(), [0, 2, 2, 3, 3, 4, 4, 5, 5, 5]);
        assert_eq!(
            work.segments,
            [seg(0, 0, 1, 0), seg(1, 0, 1, 4), seg(2, 0, 16, 0), seg(2, 16, 16, 0), seg(2, 32, 8, 0), seg(3, 0, 1, 0)]
        );
        assert_eq!(work.chunks[0].request, 0, "the prefix is read through its first member's pages");
        for (i, piece) in work.pieces.iter().enumerate() {
            assert_eq!((piece.chunk_begin, piece.chunk_count), (i as u32, 1));
            let c = work.chunks[i];
            assert_eq!((c.row_begin, c.row_end), (0, piece.num_rows));
            assert_eq!(piece.cost, p.cost_item + chunk_cost(&p, 0, piece.num_rows, c.key_end - c.key_begin));
            assert!(piece.partial && piece.run == NO_RUN);
        }
        // Every token of a partial piece, once per piece: 2 + 2 × (16 + 16 + 8) + 3.
        assert_eq!(work.partial_rows.len(), 85);
        assert_eq!(
            work.partial_rows[..2],
            [PartialRow { token: 0, key_begin: 0, piece: 0, row: 0 }, PartialRow { token: 1, key_begin: 0, piece: 0, row: 4 }]
        );
        assert_eq!(work.partial_rows[84], PartialRow { token: 42, key_begin: 352, piece: 9, row: 0 });
        assert_eq!(num_split_requests, 4);
    }

    #[test]
    fn split_keeps_runs_whole_and_packs_nothing_without_packing() {
        let p = profile(64);
        let lens = [(40, 100), (1, 500)];
        let plan_with = |options| plan(&lens, 4, 1, &p, options, vec![]);
        let (Split { work, to_pack, num_split_requests }, _) = split_plan(&plan_with(PlanOptions::default()), &p, 1e9).unwrap();
        // The prompt is a run, tail tile included; the decode waits for packing.
        assert_eq!(
            work.pieces.iter().map(|p| (p.run, p.num_rows, p.partial)).collect::<Vec<_>>(),
            [(0, 64, false), (0, 64, false), (0, 32, false)]
        );
        assert_eq!(to_pack.len(), 1);
        assert!(work.partial_rows.is_empty() && num_split_requests == 0);
        let (Split { work, to_pack, .. }, _) =
            split_plan(&plan_with(PlanOptions { packing: false, balancing: false, ..PlanOptions::default() }), &p, 1e9).unwrap();
        assert_eq!(
            work.pieces.iter().map(|p| (p.run, p.num_rows)).collect::<Vec<_>>(),
            [(NO_RUN, 64), (NO_RUN, 64), (NO_RUN, 32), (NO_RUN, 4)]
        );
        assert!(to_pack.is_empty());
    }

    #[test]
    fn split_refuses_more_pieces_than_a_plan_may_have() {
        // 65536 KV heads leave room for 64 pieces; 2000 keys by 16 make 125.
        let p = profile(64);
        let options = PlanOptions { deterministic: true, split_keys: 16, ..PlanOptions::default() };
        let e = split_plan(&plan(&[(1, 2000)], 1, 65536, &p, options.clone(), vec![]), &p, 1.0).err().unwrap().to_string();
        assert!(e.contains("the plan would need more than"), "{e}");
        assert!(split_plan(&plan(&[(1, 1024)], 1, 65536, &p, options, vec![]), &p, 1.0).is_ok());
    }

    #[test]
    fn pack_fills_tiles_next_fit_by_class_rows_and_cost() {
        // GQA 4, 64-row tiles, C = 8000: a packed tile costs at most 1000.
        let p = profile(64);
        let plan = plan(
            &[(1, 100), (1, 100), (6, 100), (1, 100), (1, 100), (1, 300), (1, 100), (1, 100)],
            4,
            1,
            &p,
            PlanOptions::default(),
            vec![],
        );
        let s = Setup::new(&plan, &p);
        let final_ = |r: u32, q: u32, keys: u32| block(r, 0, q, (0, keys), false, NO_BUNDLE, 0.0);
        let member = |r: u32| block(r, 0, 1, (64, 74), true, 0, 0.0);
        let to_pack = [
            final_(0, 1, 10),
            member(1),
            final_(2, 6, 20),
            final_(3, 1, 10),
            final_(4, 1, 10),
            final_(5, 1, 60),
            member(6),
            final_(7, 1, 10),
        ];
        let mut work = no_pieces();
        pack(&s, 8000.0, 1, &to_pack, &mut work, &mut Scratch::default());
        let tiles: Vec<Vec<u32>> = work
            .pieces
            .iter()
            .map(|p| work.segments[p.seg_begin as usize..][..p.seg_count as usize].iter().map(|s| s.request).collect())
            .collect();
        // Final tiles first, then the bundle's partial ones. Decodes (one slice) and the 24-row
        // block do not share a tile; request 5 (16 × 60 keys) would pass the cost limit.
        assert_eq!(tiles, [vec![0], vec![2], vec![3, 4], vec![5], vec![7], vec![1, 6]]);
        let tile = work.pieces[2];
        assert_eq!((tile.num_rows, tile.chunk_count, tile.cost, tile.partial, tile.run), (8, 2, 320.0, false, NO_RUN));
        assert_eq!(work.segments[tile.seg_begin as usize + 1], seg(4, 0, 1, 4));
        let c = work.chunks[tile.chunk_begin as usize + 1];
        assert_eq!((c.request, c.key_begin, c.key_end, c.row_begin, c.row_end), (4, 0, 10, 4, 8));
        assert_eq!(work.pieces[5].bundle, 0);
        assert_eq!(
            work.partial_rows,
            [PartialRow { token: 1, key_begin: 64, piece: 5, row: 0 }, PartialRow { token: 11, key_begin: 64, piece: 5, row: 4 }]
        );
    }

    #[test]
    fn pack_holds_one_slice_of_decodes_and_block_m_rows_of_taller_blocks() {
        let p = profile(64);
        let plan = plan(&[(1, 10); 9], 4, 1, &p, PlanOptions::default(), vec![]);
        let s = Setup::new(&plan, &p);
        // Six decodes (4 rows each), then three blocks of 6 tokens (24 rows).
        let to_pack: Vec<Block> = (0..9).map(|r| block(r, 0, if r < 6 { 1 } else { 6 }, (0, 1), false, NO_BUNDLE, 0.0)).collect();
        let mut work = no_pieces();
        pack(&s, 1e9, 0, &to_pack, &mut work, &mut Scratch::default());
        assert_eq!(work.pieces.iter().map(|p| (p.seg_count, p.num_rows)).collect::<Vec<_>>(), [(4, 16), (2, 8), (2, 48), (1, 24)]);
    }

    #[test]
    fn group_orders_units_longest_first_and_keeps_bundles_and_runs_whole() {
        let p = profile(64);
        let plan_with = |heads, balancing| plan(&[(1, 10)], 1, heads, &p, PlanOptions { balancing, ..PlanOptions::default() }, vec![]);
        let pieces = [
            piece(50.0, NO_BUNDLE, NO_RUN),
            piece(30.0, NO_BUNDLE, 7),
            piece(40.0, NO_BUNDLE, 7),
            piece(10.0, 0, NO_RUN),
            piece(20.0, 0, NO_RUN),
            // Bundle 0 costs C = 30, a unit; bundle 1 more: its pieces are units of their own.
            piece(80.0, 1, NO_RUN),
            piece(60.0, 1, NO_RUN),
            piece(5.0, NO_BUNDLE, 9),
            // Ties with bundle 0 (30): the whole bundle comes after.
            piece(30.0, NO_BUNDLE, NO_RUN),
        ];
        // Per piece, the group of its KV head 0 copy (unit u runs in u × heads).
        let groups_of = |sc: &Scratch, heads: u32| {
            let mut of = vec![u32::MAX; pieces.len()];
            for (u, &(_, e)) in sc.entities.iter().enumerate() {
                for &p in &sc.entity_pieces[sc.entity_start[e as usize] as usize..sc.entity_start[e as usize + 1] as usize] {
                    of[p as usize] = u as u32 * heads;
                }
            }
            of
        };
        let plan = plan_with(2, true);
        let mut sc = Scratch::default();
        let g = group(&Setup::new(&plan, &p), 30.0, 2, &pieces, &mut sc).unwrap();
        // Units by cost: 80, run 70, 60, 50, 30, bundle 30, 5; two KV heads each.
        assert_eq!(groups_of(&sc, 2), [6, 2, 2, 10, 10, 0, 4, 12, 8]);
        assert_eq!(g.num_groups, 14);
        // Without balancing, a unit per piece in order: a group per item copy.
        let plan = plan_with(2, false);
        let mut sc = Scratch::default();
        let g = group(&Setup::new(&plan, &p), 30.0, 2, &pieces, &mut sc).unwrap();
        assert_eq!(groups_of(&sc, 2), (0..9).map(|p| p * 2).collect::<Vec<u32>>());
        assert_eq!(g.num_groups, 18);
        // No pieces: one (empty) group.
        let plan = plan_with(2, true);
        let mut sc = Scratch::default();
        let g = group(&Setup::new(&plan, &p), 100.0, 0, &[], &mut sc).unwrap();
        assert!(sc.entities.is_empty() && g.num_groups == 1);
    }

    #[test]
    fn group_refuses_more_pieces_than_a_plan_may_have() {
        let p = profile(64);
        let plan = plan(&[(1, 10)], 1, 65536, &p, PlanOptions::default(), vec![]);
        let s = Setup::new(&plan, &p);
        let pieces = vec![piece(1.0, NO_BUNDLE, NO_RUN); 65];
        let e = group(&s, 100.0, 0, &pieces, &mut Scratch::default()).err().unwrap().to_string();
        assert!(e.contains("the batch needs 4259840 work items (65 tiles × 65536 KV heads)"), "{e}");
        assert!(group(&s, 100.0, 0, &pieces[..64], &mut Scratch::default()).is_ok());
    }

    #[test]
    fn emit_writes_an_item_per_piece_in_units_and_hands_out_partial_slots_in_copy_order() {
        let p = profile(64);
        let mut plan = plan(&[(1, 10)], 1, 2, &p, PlanOptions::default(), vec![]);
        let planned = plan.clone();
        let s = Setup::new(&planned, &p);
        let with = |num_rows, partial, seg_begin| Piece {
            num_rows,
            partial,
            seg_begin,
            chunk_begin: seg_begin + 10,
            ..piece(1.0, NO_BUNDLE, NO_RUN)
        };
        let pieces = [with(4, false, 0), with(8, true, 1), with(16, true, 2)];
        // Pieces 1 and 2 one unit (groups 0 and 1), piece 0 after them, then an entity without
        // pieces (a whole bundle left with none).
        let mut sc = Scratch {
            entities: vec![(lpt_key(2.0), 0), (lpt_key(1.0), 1), (lpt_key(0.0), 2)],
            entity_pieces: vec![1, 2, 0],
            entity_start: vec![0, 2, 3, 3],
            ..Scratch::default()
        };
        let Emitted { items, units, slot_of, group_costs, total_cost, max_group_cost } = emit(&s, &pieces, &mut sc);
        // A unit's cost per KV head, the empty entity's groups 0.
        assert_eq!((group_costs, total_cost, max_group_cost), (vec![2.0, 2.0, 1.0, 1.0, 0.0, 0.0], 6.0, 2.0));
        let summary: Vec<(u32, u32, u32, u32)> = items.iter().map(|i| (i.group, i.seg_begin, i.chunk_begin, i.partial_slot)).collect();
        assert_eq!(summary, [(0, 1, 11, 0), (0, 2, 12, 8), (2, 0, 10, FINAL_OUTPUT)]);
        assert_eq!(
            units,
            [
                WorkUnit { item_begin: 0, item_count: 2, group_stride: 1, slot_stride: 24 },
                WorkUnit { item_begin: 2, item_count: 1, group_stride: 1, slot_stride: 0 }
            ]
        );
        let f = MergeSlot { slot: FINAL_OUTPUT, head_stride: 0 };
        assert_eq!(slot_of, [f, MergeSlot { slot: 0, head_stride: 24 }, MergeSlot { slot: 8, head_stride: 24 }]);
        // The copies: KV head 1's follow head 0's, in the next group and slots.
        (plan.items, plan.units) = (items, units);
        let copies: Vec<(u32, u32, u32, u32)> = plan.item_copies().map(|c| (c.group, c.kv_head, c.item, c.partial_slot)).collect();
        assert_eq!(copies, [(0, 0, 0, 0), (0, 0, 1, 8), (1, 1, 0, 24), (1, 1, 1, 32), (2, 0, 2, FINAL_OUTPUT), (3, 1, 2, FINAL_OUTPUT)]);
        assert_eq!((plan.num_groups(), plan.num_partial_slots()), (4, 48));
        // Nothing partial: no slots.
        let mut sc = Scratch { entities: vec![(lpt_key(1.0), 0)], entity_pieces: vec![0], entity_start: vec![0, 1], ..Scratch::default() };
        let Emitted { items, slot_of, .. } = emit(&s, &pieces[..1], &mut sc);
        assert!(slot_of.is_empty() && items.iter().all(|i| i.partial_slot == FINAL_OUTPUT));
        // No pieces: no group costs, even for an entity.
        let mut sc = Scratch { entities: vec![(lpt_key(0.0), 0)], entity_pieces: vec![], entity_start: vec![0, 0], ..Scratch::default() };
        let Emitted { items, group_costs, .. } = emit(&s, &[], &mut sc);
        assert!(items.is_empty() && group_costs.is_empty());
    }

    #[test]
    fn merges_list_each_tokens_pieces_in_key_order_with_their_head_strides() {
        // Token 1 in two pieces, listed out of key order; token 2 in one; token 0 final.
        let rows = [
            PartialRow { token: 1, key_begin: 64, piece: 0, row: 2 },
            PartialRow { token: 2, key_begin: 0, piece: 1, row: 4 },
            PartialRow { token: 1, key_begin: 0, piece: 1, row: 0 },
        ];
        // Per piece: KV head 0's first slot, and the next KV head's 10 slots on.
        let slot_of = [MergeSlot { slot: 10, head_stride: 10 }, MergeSlot { slot: 30, head_stride: 10 }];
        let Merges { merges, merge_slots } = merge_list(3, &rows, &slot_of, &mut Scratch::default());
        let m: Vec<(u32, u32, u32)> = merges.iter().map(|m| (m.q_token, m.slot_begin, m.slot_count)).collect();
        assert_eq!(m, [(1, 0, 2), (2, 2, 1)]);
        // A piece's slot is its first slot + the token's row (query head 0 of the group).
        let slot = |slot| MergeSlot { slot, head_stride: 10 };
        assert_eq!(merge_slots, [slot(30), slot(12), slot(34)]);
        let Merges { merges, merge_slots } = merge_list(3, &[], &[], &mut Scratch::default());
        assert!(merges.is_empty() && merge_slots.is_empty());
    }
}
