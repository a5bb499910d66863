//! The schedule as it was before its steps became functions (one function of ~470 lines),
//! kept verbatim for the test that the rewrite plans every batch identically.

#![allow(clippy::all)]

use crate::plan::cost::{chunk_cost, item_cost, min_capacity, ROW_SLICE};
use crate::plan::{DeviceProfile, KvChunk, MergeRow, Plan, RowSegment, WorkItem, FINAL_OUTPUT};
use super::Outcome;
use crate::error::Result;
use crate::invalid;
use crate::types::limits;

const NO_BUNDLE: u32 = u32::MAX;
const NO_RUN: u32 = u32::MAX;

/// The automatic capacity is total cost / (AUTO_WAVES × num_workers): pieces costing more are
/// split. Two waves' worth rather than one: the GPU runs two CTAs per SM with its narrow kernel
/// (decode-only launches), which pieces of one worker's share would leave half idle; more waves
/// gained decodes little and cost prefill (docs/performance-log.md#auto-waves).
const AUTO_WAVES: f64 = 2.0;

/// A run of one request's query tokens against one range of its keys: a work item of one
/// segment and one chunk, unless packing puts it into a shared tile.
#[derive(Clone, Copy, Debug)]
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

/// A shared-prefix tile before splitting: member rows stacked in `segments[seg_begin..]` against
/// the prefix keys `[0, key_end)`, read through request `reader`'s page table.
#[derive(Clone, Copy, Debug)]
struct PrefixTile {
    seg_begin: u32,
    seg_count: u32,
    num_rows: u32,
    reader: u32,
    key_end: u32,
    bundle: u32,
}

/// One future work item, replicated for every KV head.
#[derive(Clone, Copy, Debug)]
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
#[derive(Clone, Copy, Debug)]
struct PartialRow {
    token: u32,
    key_begin: u32,
    piece: u32,
    row: u32,
}


/// An integer whose unsigned order is `f64::total_cmp`'s order of `x`.
#[inline]
fn total_order_key(x: f64) -> u64 {
    let bits = x.to_bits() as i64;
    (bits ^ (((bits >> 63) as u64) >> 1) as i64) as u64 ^ (1 << 63)
}

/// Builds the work list of `plan` (whose requests are filled in) with every technique its
/// options enable.
pub(super) fn schedule_reference(plan: &mut Plan, profile: &DeviceProfile) -> Result<Outcome> {
    let shape = plan.shape;
    let opts = plan.options.clone();
    let group = shape.group_size();
    let block_m = plan.block_m;
    let tokens_per_tile = block_m / group;
    let heads = shape.num_kv_heads;
    let causal = shape.causal;
    let requests = &plan.requests;
    let n = requests.len();
    let fixed_split = if opts.deterministic && opts.split_kv { Some(opts.split_keys) } else { None };
    let block_cost = |rows: u32, keys: u32| profile.cost_item + chunk_cost(profile, 0, rows, keys);

    // 1. Prefix groups ("bundles"). In deterministic mode the shared part is rounded down to a
    // split boundary, so a member's key pieces are the same as when it runs alone.
    let mut bundle_of = vec![NO_BUNDLE; n];
    let mut shared_len: Vec<u32> = Vec::new();
    let mut segments: Vec<RowSegment> = Vec::new();
    let mut prefix_tiles: Vec<PrefixTile> = Vec::new();
    // Deterministic without splits computes every row in one pass, as it would alone; sharing
    // a prefix would cut it in two.
    let sharing = opts.prefix_sharing && (fixed_split.is_some() || !opts.deterministic);
    if sharing {
        let mut sharers: Vec<u32> = Vec::new();
        for pg in &plan.batch.prefix_groups {
            let len = match fixed_split {
                Some(s) => pg.prefix_len / s * s,
                None => pg.prefix_len,
            };
            // Members whose rows fit one slice (decodes, a few speculative tokens) share the
            // prefix. A longer member reads it in its own tiles: its rows see many keys past the
            // prefix too, so sharing saves little, and it would turn each of them into partial
            // rows written, read back and merged (docs/performance-log.md#prefix-members).
            sharers.clear();
            sharers.extend(pg.members.iter().copied().filter(|&m| requests[m as usize].q_len * group <= ROW_SLICE));
            if len == 0 || sharers.len() < 2 {
                continue;
            }
            let b = shared_len.len() as u32;
            shared_len.push(len);
            for &m in &sharers {
                bundle_of[m as usize] = b;
            }
            // Stack the members' tokens into tiles of at most block_m rows.
            let reader = sharers[0];
            let mut tile = PrefixTile { seg_begin: segments.len() as u32, seg_count: 0, num_rows: 0, reader, key_end: 0, bundle: b };
            for &m in &sharers {
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
                    tile.key_end = tile.key_end.max(req.key_limit(q + count - 1, causal).min(len));
                    q += count;
                }
            }
            if tile.num_rows > 0 {
                prefix_tiles.push(tile);
            }
        }
    }

    // 2. Row blocks of every request; a prefix member's blocks cover only its suffix keys.
    let mut blocks: Vec<Block> = Vec::with_capacity(n);
    for (r, req) in requests.iter().enumerate() {
        let bundle = bundle_of[r];
        let key_begin = if bundle == NO_BUNDLE { 0 } else { shared_len[bundle as usize] };
        let mut q = 0;
        while q < req.q_len {
            let count = tokens_per_tile.min(req.q_len - q);
            let limit = req.key_limit(q + count - 1, causal);
            // A member block whose rows see nothing past the prefix has no suffix work.
            if bundle == NO_BUNDLE || limit > key_begin {
                let key_end = limit.max(key_begin);
                let cost = block_cost(count * group, key_end - key_begin);
                blocks.push(Block { request: r as u32, q_begin: q, q_count: count, key_begin, key_end, partial: bundle != NO_BUNDLE, bundle, cost });
            }
            q += count;
        }
    }

    // 3. Capacity, then splits.
    let total: f64 = (blocks.iter().map(|b| b.cost).sum::<f64>() + prefix_tiles.iter().map(|t| block_cost(t.num_rows, t.key_end)).sum::<f64>()) * heads as f64;
    let capacity = opts.capacity.unwrap_or_else(|| (total / (AUTO_WAVES * profile.num_workers as f64)).max(min_capacity(profile)));
    // Pieces are made per KV head: the plan's work items are `pieces × heads`.
    let max_pieces = limits::MAX_WORK_ITEMS / heads as usize;
    // Splits `key_begin..key_end` into `out`, refusing more pieces than `room` before it
    // allocates them (a tiny capacity or split_keys over long contexts would ask for billions).
    let split = |key_begin: u32, key_end: u32, cost: f64, room: usize, out: &mut Vec<(u32, u32)>| -> Result<()> {
        out.clear();
        let keys = key_end.saturating_sub(key_begin) as u64;
        let count = match fixed_split {
            Some(s) => (key_end.max(1) as u64 - 1) / s as u64 + 1 - key_begin as u64 / s as u64,
            None if opts.split_kv && cost > capacity && keys > profile.block_n as u64 => {
                let pieces = (cost / capacity).ceil().min(keys as f64) as u64;
                keys.div_ceil(keys.div_ceil(pieces).next_multiple_of(profile.block_n as u64))
            }
            None => 1,
        };
        if count as usize > room {
            return Err(invalid!(
                "the plan would need more than {} work items (capacity = {capacity}, split_keys = {}, {} KV heads): raise the capacity or split_keys",
                limits::MAX_WORK_ITEMS,
                opts.split_keys,
                heads
            ));
        }
        match fixed_split {
            Some(s) => {
                let mut k = key_begin;
                loop {
                    // In u64: the next multiple of a large `s` may not fit in u32.
                    let end = ((k as u64 / s as u64 + 1) * s as u64).min(key_end as u64) as u32;
                    out.push((k, end.max(k)));
                    if end >= key_end {
                        break;
                    }
                    k = end;
                }
            }
            None if opts.split_kv && cost > capacity && key_end - key_begin > profile.block_n => {
                let pieces = (cost / capacity).ceil() as u32;
                let step = ((key_end - key_begin).div_ceil(pieces) as u64).next_multiple_of(profile.block_n as u64);
                let mut k = key_begin as u64;
                while k < key_end as u64 {
                    out.push((k as u32, (k + step).min(key_end as u64) as u32));
                    k += step;
                }
            }
            None => out.push((key_begin, key_end)),
        }
        Ok(())
    };

    let mut split_request = vec![false; n];
    // Without splits: a piece and a chunk per prefix tile and block, a segment per block (packing
    // only merges pieces). Splits grow them.
    let unsplit = prefix_tiles.len() + blocks.len();
    segments.reserve(blocks.len());
    let mut pieces: Vec<Piece> = Vec::with_capacity(unsplit);
    let mut chunks: Vec<KvChunk> = Vec::with_capacity(unsplit);
    let mut partial_rows: Vec<PartialRow> = Vec::new();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    let record_partials = |partial_rows: &mut Vec<PartialRow>, seg: &RowSegment, key_begin: u32, piece: u32| {
        let q_start = requests[seg.request as usize].q_start;
        for t in 0..seg.q_count {
            partial_rows.push(PartialRow { token: q_start + seg.q_begin + t, key_begin, piece, row: seg.row_begin + t * group });
        }
    };

    // Prefix tiles: split pieces share the tile's segments.
    for tile in &prefix_tiles {
        split(0, tile.key_end, block_cost(tile.num_rows, tile.key_end), max_pieces.saturating_sub(pieces.len()), &mut ranges)?;
        for &(kb, ke) in &ranges {
            let p = pieces.len() as u32;
            chunks.push(KvChunk { request: tile.reader, key_begin: kb, key_end: ke, row_begin: 0, row_end: tile.num_rows });
            pieces.push(Piece {
                seg_begin: tile.seg_begin,
                seg_count: tile.seg_count,
                chunk_begin: chunks.len() as u32 - 1,
                chunk_count: 1,
                num_rows: tile.num_rows,
                partial: true,
                bundle: tile.bundle,
                run: NO_RUN,
                cost: block_cost(tile.num_rows, ke - kb),
            });
            for seg in &segments[tile.seg_begin as usize..(tile.seg_begin + tile.seg_count) as usize] {
                record_partials(&mut partial_rows, seg, kb, p);
            }
            for seg in &segments[tile.seg_begin as usize..(tile.seg_begin + tile.seg_count) as usize] {
                split_request[seg.request as usize] = true;
            }
        }
    }

    // Runs: a request of at least one full tile, no prefix group and a total cost within C is
    // placed as one unit (step 5), its tiles one after another on one CTA, tail tile included
    // (not packed). Its tiles read growing prefixes of the same keys, so each tile finds them
    // in L2 where the previous one left them; scattered by LPT over the whole launch, the tiles
    // of a batch of short prompts may re-read their keys from DRAM
    // (docs/performance-log.md#runs).
    let runs = opts.balancing && fixed_split.is_none();
    let mut request_cost = vec![0.0f64; if runs { n } else { 0 }];
    let mut full_tile = vec![false; request_cost.len()];
    for b in blocks.iter().filter(|b| runs && b.bundle == NO_BUNDLE) {
        request_cost[b.request as usize] += b.cost;
        full_tile[b.request as usize] |= b.q_count * group == block_m;
    }
    let in_run = |r: u32| full_tile.get(r as usize).copied().unwrap_or(false) && request_cost[r as usize] <= capacity;

    // Blocks: a split block's pieces share its segment; unsplit short blocks wait for packing.
    let mut pack: Vec<Block> = Vec::with_capacity(blocks.len());
    for b in &blocks {
        split(b.key_begin, b.key_end, b.cost, max_pieces.saturating_sub(pieces.len()), &mut ranges)?;
        let rows = b.q_count * group;
        let run = if in_run(b.request) { b.request } else { NO_RUN };
        if ranges.len() == 1 && opts.packing && rows < block_m && run == NO_RUN {
            pack.push(*b);
            continue;
        }
        let partial = b.partial || ranges.len() > 1;
        split_request[b.request as usize] |= partial;
        let seg = RowSegment { request: b.request, q_begin: b.q_begin, q_count: b.q_count, row_begin: 0 };
        let seg_begin = segments.len() as u32;
        segments.push(seg);
        for &(kb, ke) in &ranges {
            let p = pieces.len() as u32;
            chunks.push(KvChunk { request: b.request, key_begin: kb, key_end: ke, row_begin: 0, row_end: rows });
            pieces.push(Piece { seg_begin, seg_count: 1, chunk_begin: chunks.len() as u32 - 1, chunk_count: 1, num_rows: rows, partial, bundle: b.bundle, run, cost: block_cost(rows, ke - kb) });
            if partial {
                record_partials(&mut partial_rows, &seg, kb, p);
            }
        }
    }

    // 4. Packing, next-fit within a class (prefix group, finality), in request order. A stable
    // counting sort by class keeps this linear.
    let class_of = |b: &Block| (b.bundle.wrapping_add(1) as usize) << 1 | b.partial as usize;
    let num_classes = (shared_len.len() + 1) << 1;
    let mut class_start = vec![0u32; num_classes + 1];
    for b in &pack {
        class_start[class_of(b) + 1] += 1;
    }
    for c in 0..num_classes {
        class_start[c + 1] += class_start[c];
    }
    let mut order = vec![0u32; pack.len()];
    for (i, b) in pack.iter().enumerate() {
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
        let first = pack[order[i] as usize];
        let (seg_begin, chunk_begin) = (segments.len() as u32, chunks.len() as u32);
        let mut rows = 0;
        let mut cost = profile.cost_item;
        let one_slice = |rows: u32| rows <= ROW_SLICE;
        let tile_rows = if one_slice(first.q_count * group) { ROW_SLICE } else { block_m };
        let mut j = i;
        while j < order.len() {
            let b = pack[order[j] as usize];
            let b_rows = b.q_count * group;
            let b_cost = chunk_cost(profile, rows, rows + b_rows, b.key_end - b.key_begin);
            let same_class = b.bundle == first.bundle && b.partial == first.partial && one_slice(b_rows) == one_slice(first.q_count * group);
            if j > i && (!same_class || rows + b_rows > tile_rows || cost + b_cost > pack_limit) {
                break;
            }
            segments.push(RowSegment { request: b.request, q_begin: b.q_begin, q_count: b.q_count, row_begin: rows });
            chunks.push(KvChunk { request: b.request, key_begin: b.key_begin, key_end: b.key_end, row_begin: rows, row_end: rows + b_rows });
            rows += b_rows;
            cost += b_cost;
            j += 1;
        }
        let p = pieces.len() as u32;
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
                record_partials(&mut partial_rows, &seg, chunks[chunk_begin as usize + k].key_begin, p);
            }
        }
        i = j;
    }

    // 5. Grouping. A unit is (entity, KV head); an entity is a piece, or a whole prefix group
    // that fits in C.
    let heads_us = heads as usize;
    if pieces.len() > max_pieces {
        return Err(invalid!(
            "the batch needs {} work items ({} tiles × {heads} KV heads), more than the {} a plan may have",
            pieces.len() * heads_us,
            pieces.len(),
            limits::MAX_WORK_ITEMS
        ));
    }
    let mut group_of = vec![0u32; pieces.len() * heads_us];
    let num_groups;
    if opts.balancing {
        let mut bundle_cost = vec![0.0f64; shared_len.len()];
        for p in &pieces {
            if p.bundle != NO_BUNDLE {
                bundle_cost[p.bundle as usize] += p.cost;
            }
        }
        let bundle_whole: Vec<bool> = bundle_cost.iter().map(|&c| c <= capacity).collect();
        // Entities, each a list of pieces placed together: a whole bundle, a run (one request's
        // consecutive pieces), or one piece. Entity e is (cost, e), its pieces
        // entity_pieces[entity_start[e]..entity_start[e + 1]].
        let mut entities: Vec<(f64, u32)> = Vec::with_capacity(pieces.len());
        let mut entity_pieces: Vec<u32> = Vec::with_capacity(pieces.len());
        let mut entity_start: Vec<u32> = vec![0];
        // Ends the entity whose pieces run up to entity_pieces[..end].
        let mut close = |cost: f64, end: usize| {
            entities.push((cost, entity_start.len() as u32 - 1));
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
        let mut bundle_pieces: Vec<Vec<u32>> = vec![Vec::new(); shared_len.len()];
        for (i, p) in pieces.iter().enumerate() {
            if p.bundle != NO_BUNDLE && bundle_whole[p.bundle as usize] {
                bundle_pieces[p.bundle as usize].push(i as u32);
            }
        }
        for (b, members) in bundle_pieces.iter().enumerate().filter(|(b, _)| bundle_whole[*b]) {
            entity_pieces.extend_from_slice(members);
            close(bundle_cost[b], entity_pieces.len());
        }
        // By decreasing cost (in `f64::total_cmp` order), then by index: integer keys compare
        // without the float comparison's branches.
        entities.sort_unstable_by_key(|&(cost, i)| (!total_order_key(cost), i));
        // Each unit its own group, in LPT order: the CTAs draw groups from a shared counter in
        // this order, so the costliest units start first and a CTA takes the next one as soon as
        // it is free (list scheduling). LPT bins fixed on the host (the first version) leave the
        // cost model's errors to the last groups, and measured slower on decode steps and on the
        // trace replay (docs/performance-log.md#lpt-units).
        let units = entities.len() * heads_us;
        num_groups = units.max(1);
        for (u, &(_, e)) in entities.iter().enumerate() {
            for h in 0..heads_us {
                let g = (u * heads_us + h) as u32;
                for &p in &entity_pieces[entity_start[e as usize] as usize..entity_start[e as usize + 1] as usize] {
                    group_of[p as usize * heads_us + h] = g;
                }
            }
        }
    } else {
        // A group per item, in order: what a non-persistent launch (a CTA per tile) does.
        for (u, g) in group_of.iter_mut().enumerate() {
            *g = u as u32;
        }
        num_groups = group_of.len();
    }

    // 6. Emission in group order; partial slots handed out in that order.
    let mut group_start = vec![0u32; num_groups + 1];
    for &g in &group_of {
        group_start[g as usize + 1] += 1;
    }
    for g in 0..num_groups {
        group_start[g + 1] += group_start[g];
    }
    // Items land at their place in group order (by unit within a group) in one scatter; partial
    // slots are handed out afterwards in that order, when any piece writes them.
    let any_partial = pieces.iter().any(|p| p.partial);
    let mut items = vec![WorkItem::default(); group_of.len()];
    let mut piece_at = if any_partial { vec![0u32; group_of.len()] } else { Vec::new() };
    {
        let mut next = group_start;
        for ((piece, p), groups) in pieces.iter().enumerate().zip(group_of.chunks_exact(heads_us)) {
            let partial_slot = if p.partial { 0 } else { FINAL_OUTPUT };
            for (kv_head, &g) in groups.iter().enumerate() {
                let at = next[g as usize] as usize;
                next[g as usize] += 1;
                items[at] = WorkItem {
                    kv_head: kv_head as u32,
                    seg_begin: p.seg_begin,
                    seg_count: p.seg_count,
                    chunk_begin: p.chunk_begin,
                    chunk_count: p.chunk_count,
                    num_rows: p.num_rows,
                    partial_slot,
                    group: g,
                };
                if any_partial {
                    piece_at[at] = piece as u32;
                }
            }
        }
    }
    let mut slot_of = if any_partial { vec![FINAL_OUTPUT; group_of.len()] } else { Vec::new() };
    if any_partial {
        let mut next_slot = 0u32;
        for (item, &piece) in items.iter_mut().zip(&piece_at) {
            if item.partial_slot != FINAL_OUTPUT {
                item.partial_slot = next_slot;
                slot_of[piece as usize * heads_us + item.kv_head as usize] = next_slot;
                next_slot += item.num_rows;
            }
        }
    }

    // 7. Merges: per partial token, its pieces in key order, for every query head. Nothing to
    // do (and no per-token pass over the batch) when no piece is partial.
    let (merges, merge_slots) = if partial_rows.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let total_q = plan.batch.total_q() as usize;
        let mut token_start = vec![0u32; total_q + 1];
        for pr in &partial_rows {
            token_start[pr.token as usize + 1] += 1;
        }
        for t in 0..total_q {
            token_start[t + 1] += token_start[t];
        }
        let mut by_token = vec![PartialRow { token: 0, key_begin: 0, piece: 0, row: 0 }; partial_rows.len()];
        {
            let mut next = token_start.clone();
            for pr in &partial_rows {
                by_token[next[pr.token as usize] as usize] = *pr;
                next[pr.token as usize] += 1;
            }
        }
        // Sizes are known: one merge per (merged token, query head), its pieces' slots each.
        let merged_tokens = token_start.windows(2).filter(|w| w[1] > w[0]).count();
        let qo_heads = shape.num_qo_heads as usize;
        let mut merges = Vec::with_capacity(merged_tokens * qo_heads);
        let mut merge_slots = vec![0u32; partial_rows.len() * qo_heads];
        let mut next = 0usize;
        for t in 0..total_q {
            let list = &mut by_token[token_start[t] as usize..token_start[t + 1] as usize];
            if list.is_empty() {
                continue;
            }
            if list.len() > 1 {
                list.sort_unstable_by_key(|pr| pr.key_begin);
            }
            let count = list.len();
            for kv_head in 0..heads_us {
                let kv_base = kv_head as u32 * group;
                // This (token, KV head)'s slots: for each query head of the group, one per piece.
                // A piece's row for the group's first head is its slot; the other heads sit in the
                // next rows of the same tile.
                let slots = &mut merge_slots[next..next + group as usize * count];
                for (j, pr) in list.iter().enumerate() {
                    let first = slot_of[pr.piece as usize * heads_us + kv_head] + pr.row;
                    for (in_group, dst) in slots[j..].iter_mut().step_by(count).enumerate() {
                        *dst = first + in_group as u32;
                    }
                }
                merges.extend((0..group).map(|in_group| MergeRow {
                    q_token: t as u32,
                    qo_head: kv_base + in_group,
                    slot_begin: (next + in_group as usize * count) as u32,
                    slot_count: count as u32,
                }));
                next += group as usize * count;
            }
        }
        debug_assert_eq!(next, merge_slots.len());
        (merges, merge_slots)
    };

    debug_assert!(pieces.iter().all(|p| (item_cost(profile, &chunks[p.chunk_begin as usize..(p.chunk_begin + p.chunk_count) as usize]) - p.cost).abs() <= 1e-6 * p.cost.max(1.0)));
    plan.items = items;
    plan.row_segments = segments;
    plan.kv_chunks = chunks;
    plan.merges = merges;
    plan.merge_slots = merge_slots;
    Ok(Outcome { capacity, num_split_requests: split_request.iter().filter(|&&s| s).count() as u32 })
}
