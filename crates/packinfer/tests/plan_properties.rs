//! The planner's contract, checked on random batches: every (query row, head, visible key) is
//! covered exactly once, no row reads another request's keys (except a declared shared prefix,
//! through its first member), every (token, head) is written exactly once (by a final item or a
//! merge of exactly its pieces), the executed plan equals the naive f64 attention under every
//! combination of the ablation flags, and deterministic mode is batch-invariant bit for bit.

use packinfer_testkit as common;

use std::sync::Arc;

use common::{assert_close, rng, Case, CaseSpec, Tensor};
use packinfer::backend::cpu::CpuBackend;
use packinfer::backend::Backend;
use packinfer::plan::{automatic_capacity, DeviceProfile, Plan, PlanOptions, FINAL_OUTPUT};
use packinfer::types::{Batch, DType, PrefixGroup};
use packinfer::Error;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// The first key query `q` of `req` sees under the plan's sliding window, from the definition
/// (position kv_len − q_len + q, minus window_left, at least 0), written out here rather than
/// taken from the library.
fn window_start(plan: &Plan, req: &packinfer::plan::RequestInfo, q: u32) -> u32 {
    match plan.options.window_left {
        Some(w) => (req.kv_len as i64 - req.q_len as i64 + q as i64 - w as i64).max(0) as u32,
        None => 0,
    }
}

/// Whether the batch's custom mask lets query `q` of request `r` see key `k` (true without
/// one), from the layout's definition: bit `q·kv_len + k` of the request's bytes, little-endian.
fn mask_bit(batch: &Batch, r: usize, q: u32, k: u32) -> bool {
    if batch.mask_indptr.is_empty() {
        return true;
    }
    let bit = q as usize * batch.kv_len(r) as usize + k as usize;
    batch.custom_mask[batch.mask_indptr[r] as usize + bit / 8] >> (bit % 8) & 1 != 0
}

/// Checks the work list's structure and coverage; panics with `ctx` and the first violation.
/// Under a sliding window every chunk starts at or after the first window of its rows: no key
/// outside every row's window is read. Under a custom mask (which replaces causal) every key
/// the mask shows is covered exactly once, and masked keys at most once.
fn check_plan(plan: &Plan, ctx: &str) {
    let shape = &packinfer::types::Shape { causal: plan.shape.causal && plan.batch.mask_indptr.is_empty(), ..plan.shape };
    let masked = !plan.batch.mask_indptr.is_empty();
    let g = shape.group_size();
    let hq = shape.num_qo_heads as usize;
    let total_q = plan.batch.total_q() as usize;
    let reqs = &plan.requests;
    // Which prefix group each request is in, if any.
    let mut prefix_of: Vec<Option<&PrefixGroup>> = vec![None; reqs.len()];
    for pg in &plan.batch.prefix_groups {
        for &m in &pg.members {
            prefix_of[m as usize] = Some(pg);
        }
    }
    let mut writes = vec![0u32; total_q * hq];
    let mut intervals: Vec<Vec<(u32, u32)>> = vec![Vec::new(); total_q * hq];
    let num_slots = plan.num_partial_slots() as usize;
    let mut slot_owner: Vec<Option<usize>> = vec![None; num_slots];
    let mut last_group = 0;
    // The units hold every item once, in order.
    let mut next_item = 0;
    for u in &plan.units {
        assert_eq!(u.item_begin, next_item, "{ctx}: unit {u:?} does not start where the last one ended");
        assert!(u.item_count > 0, "{ctx}: empty unit");
        next_item += u.item_count;
    }
    assert_eq!(next_item as usize, plan.items.len(), "{ctx}: the units do not hold every item");
    assert_eq!(plan.item_copies().count(), plan.num_item_copies(), "{ctx}: copies");
    for copy in plan.item_copies() {
        let item = &plan.items[copy.item as usize];
        let ctx = format!("{ctx}: item {} KV head {} {item:?}", copy.item, copy.kv_head);
        assert!(copy.group >= last_group, "{ctx}: copies not sorted by group");
        assert!(copy.group <= last_group + 1, "{ctx}: group ids skip an empty group");
        last_group = copy.group;
        assert!(copy.kv_head < shape.num_kv_heads, "{ctx}: kv_head");
        assert!(item.num_rows >= 1 && item.num_rows <= plan.block_m, "{ctx}: num_rows outside 1..=block_m {}", plan.block_m);
        let segs = &plan.row_segments[item.seg_begin as usize..(item.seg_begin + item.seg_count) as usize];
        let chunks = &plan.kv_chunks[item.chunk_begin as usize..(item.chunk_begin + item.chunk_count) as usize];
        let mut row = 0;
        for s in segs {
            assert_eq!(s.row_begin, row, "{ctx}: segments not laid out in order");
            assert!(s.q_count > 0 && s.q_begin + s.q_count <= reqs[s.request as usize].q_len, "{ctx}: segment {s:?} outside its request");
            row += s.q_count * g;
        }
        assert_eq!(row, item.num_rows, "{ctx}: segments' rows != num_rows");
        for c in chunks {
            assert!(c.row_begin < c.row_end && c.row_end <= item.num_rows, "{ctx}: chunk {c:?} rows outside the tile");
            assert!(c.key_begin <= c.key_end, "{ctx}: chunk {c:?} keys reversed");
            let reader = reqs[c.request as usize];
            assert!(c.key_end <= reader.kv_len, "{ctx}: chunk {c:?} reads past its request's kv_len {}", reader.kv_len);
            let mut max_limit = 0;
            let mut min_start = u32::MAX;
            for s in segs.iter().filter(|s| s.row_begin < c.row_end && s.row_begin + s.q_count * g > c.row_begin) {
                assert!(s.row_begin >= c.row_begin && s.row_begin + s.q_count * g <= c.row_end, "{ctx}: chunk {c:?} cuts segment {s:?}");
                if s.request != c.request {
                    // Only a shared prefix may be read through another request's pages: a
                    // member's (the first that shares), within the prefix.
                    let pg =
                        prefix_of[s.request as usize].unwrap_or_else(|| panic!("{ctx}: segment {s:?} reads request {}'s keys", c.request));
                    assert!(
                        pg.members.contains(&c.request) && pg.members.contains(&s.request),
                        "{ctx}: segment {s:?} reads request {}'s keys",
                        c.request
                    );
                    assert!(c.key_end <= pg.prefix_len, "{ctx}: chunk {c:?} reads past the shared prefix {}", pg.prefix_len);
                }
                let req = reqs[s.request as usize];
                for q in s.q_begin..s.q_begin + s.q_count {
                    let limit = req.key_limit(q, shape.causal);
                    let start = window_start(plan, &req, q).min(limit);
                    max_limit = max_limit.max(limit);
                    min_start = min_start.min(start);
                    let token = (req.q_start + q) as usize;
                    for h in 0..g {
                        let head = (copy.kv_head * g + h) as usize;
                        let (kb, ke) = (c.key_begin.max(start), c.key_end.min(limit));
                        if kb < ke {
                            intervals[token * hq + head].push((kb, ke));
                        }
                    }
                }
            }
            assert!(
                c.key_end <= max_limit.max(c.key_begin),
                "{ctx}: chunk {c:?} reads keys none of its rows can see (max limit {max_limit})"
            );
            assert!(
                c.key_begin >= min_start.min(c.key_end) || min_start == u32::MAX,
                "{ctx}: chunk {c:?} reads keys before every row's window (first window start {min_start})"
            );
        }
        for s in segs {
            let req = reqs[s.request as usize];
            for q in s.q_begin..s.q_begin + s.q_count {
                for h in 0..g {
                    let token = (req.q_start + q) as usize;
                    let head = (copy.kv_head * g + h) as usize;
                    if copy.partial_slot == FINAL_OUTPUT {
                        writes[token * hq + head] += 1;
                    } else {
                        let slot = (copy.partial_slot + s.row_begin + (q - s.q_begin) * g + h) as usize;
                        assert!(slot_owner[slot].is_none(), "{ctx}: partial slot {slot} written twice");
                        slot_owner[slot] = Some(token * hq + head);
                    }
                }
            }
        }
    }
    let mut slot_merged = vec![false; num_slots];
    for m in &plan.merges {
        assert!(m.slot_count >= 1, "{ctx}: merge {m:?} has no slots");
        // Every query head of the token: KV head head / g, the (head % g)-th of its group.
        for head in 0..hq as u32 {
            let th = m.q_token as usize * hq + head as usize;
            writes[th] += 1;
            for p in &plan.merge_slots[m.slot_begin as usize..(m.slot_begin + m.slot_count) as usize] {
                let s = p.slot + head / g * p.head_stride + head % g;
                assert_eq!(slot_owner[s as usize], Some(th), "{ctx}: merge {m:?} head {head} takes slot {s}, which holds another row");
                assert!(!slot_merged[s as usize], "{ctx}: slot {s} merged twice");
                slot_merged[s as usize] = true;
            }
        }
    }
    for (s, owner) in slot_owner.iter().enumerate() {
        assert_eq!(owner.is_some(), slot_merged[s], "{ctx}: slot {s} written but not merged (or merged but never written)");
    }
    for (r, &req) in reqs.iter().enumerate() {
        for q in 0..req.q_len {
            let limit = req.key_limit(q, shape.causal);
            let start = window_start(plan, &req, q).min(limit);
            for head in 0..hq {
                let th = (req.q_start + q) as usize * hq + head;
                assert_eq!(writes[th], 1, "{ctx}: request {r} query {q} head {head} written {} times", writes[th]);
                let iv = &mut intervals[th];
                iv.sort_unstable();
                if masked {
                    // Pieces may leave out keys the mask hides, never overlap, and cover every
                    // key it shows.
                    assert!(iv.windows(2).all(|w| w[0].1 <= w[1].0), "{ctx}: request {r} query {q} head {head}: overlapping keys {iv:?}");
                    let covered = |k: u32| iv.iter().any(|&(kb, ke)| kb <= k && k < ke);
                    if let Some(k) = (start..limit).find(|&k| mask_bit(&plan.batch, r, q, k) && !covered(k)) {
                        panic!("{ctx}: request {r} query {q} head {head}: key {k}, which the mask shows, is not read ({iv:?})");
                    }
                    continue;
                }
                let mut next = start;
                for &(kb, ke) in iv.iter() {
                    assert_eq!(
                        kb, next,
                        "{ctx}: request {r} query {q} head {head}: keys {:?} cover [{start}, {limit}) with a gap or overlap",
                        iv
                    );
                    next = ke;
                }
                assert_eq!(next, limit, "{ctx}: request {r} query {q} head {head}: keys {:?} do not reach {limit}", iv);
            }
        }
    }
    assert_eq!(plan.stats().num_items as usize, plan.num_item_copies());
    assert_eq!(plan.stats().num_merge_rows as usize, plan.num_merge_rows());
    assert!(plan.num_groups() <= plan.stats().num_groups, "{ctx}: copies run in groups past the plan's");
    assert!(
        plan.stats().tile_utilization > 0.0 && plan.stats().tile_utilization <= 1.0,
        "{ctx}: tile utilization {}",
        plan.stats().tile_utilization
    );
}

/// Runs `plan` on the CPU backend; returns O and LSE.
fn execute(case: &Case, plan: Plan) -> (Tensor, Vec<f32>) {
    let cpu = CpuBackend::new(2);
    let bound = cpu.bind(Arc::new(plan), 0, None).expect("bind");
    let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
    let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
    // SAFETY: the case's Q, K and V, O of out_len() and LSE of total_q × heads elements, on the host.
    unsafe { bound.run(&case.run_args(&mut o, &mut lse)) }.expect("run");
    (o, lse)
}

fn plan_check_run(case: &Case, profile: &DeviceProfile, options: PlanOptions, ctx: &str) -> Plan {
    let plan = Plan::build(case.shape, case.batch.clone(), profile, options.clone()).unwrap_or_else(|e| panic!("{ctx}: plan: {e}"));
    check_plan(&plan, ctx);
    let (o, lse) = execute(case, plan.clone());
    assert_close(case, &o, &lse, ctx);
    plan
}

/// Up to two prefix groups over distinct requests, each prefix no longer than its members' keys.
fn random_prefix_groups(r: &mut SmallRng, lens: &[(u32, u32)]) -> Vec<PrefixGroup> {
    let mut free: Vec<u32> = (0..lens.len() as u32).filter(|&i| lens[i as usize].1 > 0).collect();
    free.shuffle(r);
    let mut groups = Vec::new();
    for _ in 0..r.random_range(0..=2) {
        let size = r.random_range(2..=5).min(free.len());
        if size < 2 {
            break;
        }
        let mut members: Vec<u32> = free.drain(..size).collect();
        // Case::build copies the prefix from the first member, which must come first in the batch.
        members.sort_unstable();
        let max = members.iter().map(|&m| lens[m as usize].1).min().unwrap();
        groups.push(PrefixGroup { prefix_len: r.random_range(1..=max), members });
    }
    groups
}

/// A random profile: CPU-like or GPU-like worker counts, several tile heights.
fn random_profile(r: &mut SmallRng, group: u32) -> DeviceProfile {
    let mut p =
        if r.random_bool(0.5) { DeviceProfile::cpu(r.random_range(1..=16)) } else { DeviceProfile::hopper(r.random_range(8..=132)) };
    let heights: Vec<u32> = [16, 32, 64, 128].into_iter().filter(|&m| m >= group).collect();
    p.block_m = heights[r.random_range(0..heights.len())];
    p.block_n = [16, 64][r.random_range(0..2)];
    p
}

/// A random case that plans into splits, packs and prefix tiles: several requests, some long.
fn random_case(r: &mut SmallRng) -> (Case, CaseSpec) {
    let spec = CaseSpec {
        batch_size: r.random_range(1..=10),
        max_kv: [16, 200, 700, 2000][r.random_range(0..4)],
        page_size: [1, 16][r.random_range(0..2)],
        num_kv_heads: r.random_range(1..=2),
        group: [1, 2, 4, 8][r.random_range(0..4)],
        head_dim: 64,
        dtype: [DType::F32, DType::Bf16][r.random_range(0..2)],
        causal: r.random_bool(0.7),
        decode_fraction: r.random_range(0.2..0.9),
        hnd: r.random_bool(0.5),
    };
    let lens = common::random_lengths(r, &spec);
    let groups = random_prefix_groups(r, &lens);
    (Case::build(r, &spec, &lens, groups), spec)
}

fn options_from_bits(bits: u32, r: &mut SmallRng) -> PlanOptions {
    PlanOptions {
        deterministic: bits & 1 != 0,
        packing: bits & 2 != 0,
        balancing: bits & 4 != 0,
        prefix_sharing: bits & 8 != 0,
        split_kv: bits & 16 != 0,
        capacity: None,
        split_keys: [16, 64, 100, 2048][r.random_range(0..4)],
        window_left: None,
    }
}

/// A random sliding window (none half the time) and soft-cap (none half the time) for `case`.
fn random_features(r: &mut SmallRng, case: &mut Case, options: &mut PlanOptions) {
    options.window_left = if r.random_bool(0.5) { Some([0, 1, 5, 33, 128, 700][r.random_range(0..6)]) } else { None };
    case.window_left = options.window_left;
    case.logits_soft_cap = if r.random_bool(0.5) { [1.0, 5.0, 30.0][r.random_range(0..3)] } else { 0.0 };
}

#[test]
fn every_flag_combination_covers_exactly_once_and_matches_f64() {
    let mut r = rng(0x91a2);
    // (plans with a split request, with a packed tile, with a shared-prefix tile): the random
    // cases must exercise every technique, or this test proves little.
    let (mut split, mut packed, mut shared) = (0, 0, 0);
    for bits in 0..32 {
        for i in 0..6 {
            let (mut case, spec) = random_case(&mut r);
            let profile = random_profile(&mut r, spec.group);
            let mut options = options_from_bits(bits, &mut r);
            // Small explicit capacities force splits on small batches.
            if i % 2 == 1 {
                options.capacity = Some(r.random_range(1e3..1e5));
            }
            // Every third case with a sliding window and/or a soft-cap, so every combination of
            // flags meets them and the counts below still see plenty of plain cases.
            if i % 3 == 2 {
                random_features(&mut r, &mut case, &mut options);
                // Half of those with a custom mask too (some rows fully masked).
                if r.random_bool(0.5) {
                    let density = [0.0, 0.1, 0.7, 1.0][r.random_range(0..4)];
                    case = case.with_random_mask(&mut r, density, true);
                }
            }
            let ctx = format!("flags {bits:05b} case {i} {spec:?} {profile:?} {options:?} groups {:?}", case.batch.prefix_groups);
            let plan = plan_check_run(&case, &profile, options.clone(), &ctx);
            // The automatic capacity, computed without scheduling, is the one the planner uses.
            if options.capacity.is_none() {
                let automatic = automatic_capacity(&case.shape, &case.batch, &profile, &options).unwrap();
                assert_eq!(automatic, plan.stats().capacity, "{ctx}");
            }
            let chunks_of =
                |it: &packinfer::plan::WorkItem| &plan.kv_chunks[it.chunk_begin as usize..(it.chunk_begin + it.chunk_count) as usize];
            split += plan.items.iter().any(|it| {
                it.partial_slot != FINAL_OUTPUT
                    && chunks_of(it)
                        .iter()
                        .any(|c| c.key_begin > 0 && plan.batch.prefix_groups.iter().all(|pg| !pg.members.contains(&c.request)))
            }) as u32;
            packed += plan.items.iter().any(|it| it.chunk_count > 1) as u32;
            shared += plan.items.iter().any(|it| {
                it.seg_count > 1
                    && it.chunk_count == 1
                    && plan.row_segments[it.seg_begin as usize..(it.seg_begin + it.seg_count) as usize]
                        .iter()
                        .any(|s| s.request != chunks_of(it)[0].request)
            }) as u32;
        }
    }
    eprintln!("plans with splits: {split}, with packed tiles: {packed}, with shared-prefix tiles: {shared} (of 192)");
    assert!(split >= 10 && packed >= 10 && shared >= 10, "too few: splits {split}, packed {packed}, shared {shared}");
}

#[test]
fn splits_merges_and_prefix_tiles_happen_and_are_exact() {
    let mut r = rng(77);
    let spec = CaseSpec {
        batch_size: 8,
        max_kv: 3000,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 1.0,
        hnd: false,
    };
    // Eight decodes: three share a 1500-key prefix, one is long enough to be split (two
    // workers; the automatic capacity is a quarter of the total cost).
    let lens = [(1, 3000), (1, 1600), (1, 1501), (1, 1500), (1, 40), (3, 90), (1, 7), (2, 2)];
    let groups = vec![PrefixGroup { prefix_len: 1500, members: vec![1, 2, 3] }];
    let case = Case::build(&mut r, &spec, &lens, groups);
    let profile = DeviceProfile::hopper(2);
    let plan = plan_check_run(&case, &profile, PlanOptions::default(), "decodes with prefix");
    let s = plan.stats();
    assert!(s.num_split_requests >= 4, "{s:?}");
    assert!(s.num_merge_rows > 0 && s.num_partial_slots > 0, "{s:?}");
    // The prefix is read once (an item for every KV head): one chunk over [0, 1500) reading
    // request 1's pages for the rows of all three members.
    let prefix_items: Vec<_> =
        plan.items.iter().filter(|it| plan.kv_chunks[it.chunk_begin as usize].request == 1 && it.seg_count == 3).collect();
    assert_eq!(
        prefix_items
            .iter()
            .map(|it| plan.kv_chunks[it.chunk_begin as usize].key_end - plan.kv_chunks[it.chunk_begin as usize].key_begin)
            .sum::<u32>(),
        1500,
        "{:?}",
        plan.items
    );
    // The members share a group (per KV head).
    for h in 0..2 {
        let groups: std::collections::BTreeSet<u32> = plan
            .item_copies()
            .filter(|c| {
                let it = &plan.items[c.item as usize];
                c.kv_head == h
                    && plan.row_segments[it.seg_begin as usize..(it.seg_begin + it.seg_count) as usize]
                        .iter()
                        .any(|s| (1..=3).contains(&s.request))
            })
            .map(|c| c.group)
            .collect();
        assert_eq!(groups.len(), 1, "prefix group members spread over groups {groups:?}");
    }
    // Packing: the short decodes share tiles.
    assert!(plan.items.iter().any(|it| it.seg_count > 1 && it.partial_slot == FINAL_OUTPUT), "no packed tile");
    // The long request is split.
    assert!(plan.kv_chunks.iter().filter(|c| c.request == 0).count() > 1, "request 0 not split");
    // Every unit is its own group, costliest first (the order the workers take them in).
    assert!(plan.group_costs.windows(2).all(|w| w[0] >= w[1] * (1.0 - 1e-12)), "groups not in decreasing cost: {:?}", plan.group_costs);
    assert!(s.max_worker_cost <= 1.5 * s.mean_worker_cost, "{s:?}");
}

#[test]
fn ablation_flags_switch_their_technique_off() {
    let mut r = rng(5);
    for i in 0..20 {
        let (case, spec) = random_case(&mut r);
        let profile = random_profile(&mut r, spec.group);
        let ctx = format!("case {i} {spec:?}");
        let tokens_per_tile = profile.block_m / spec.group;
        let base = PlanOptions { capacity: Some(2e3), ..PlanOptions::default() };

        let p = Plan::build(case.shape, case.batch.clone(), &profile, PlanOptions { packing: false, ..base.clone() }).unwrap();
        assert!(p.items.iter().all(|it| it.chunk_count == 1), "{ctx}: packing off but an item has several chunks");
        assert!(p.row_segments.iter().all(|s| s.q_count <= tokens_per_tile));

        let p =
            Plan::build(case.shape, case.batch.clone(), &profile, PlanOptions { split_kv: false, prefix_sharing: false, ..base.clone() })
                .unwrap();
        assert!(
            p.merges.is_empty() && p.items.iter().all(|it| it.partial_slot == FINAL_OUTPUT),
            "{ctx}: split_kv and prefix sharing off but pieces are merged"
        );

        let p = Plan::build(case.shape, case.batch.clone(), &profile, PlanOptions { prefix_sharing: false, ..base.clone() }).unwrap();
        assert!(p.kv_chunks.iter().all(|c| p.row_segments.iter().any(|s| s.request == c.request)), "{ctx}");
        for it in &p.items {
            for c in &p.kv_chunks[it.chunk_begin as usize..(it.chunk_begin + it.chunk_count) as usize] {
                for s in &p.row_segments[it.seg_begin as usize..(it.seg_begin + it.seg_count) as usize] {
                    if s.row_begin >= c.row_begin && s.row_begin < c.row_end {
                        assert_eq!(s.request, c.request, "{ctx}: prefix sharing off but a row reads another request's keys");
                    }
                }
            }
        }

        let p = Plan::build(case.shape, case.batch.clone(), &profile, PlanOptions { balancing: false, ..base.clone() }).unwrap();
        assert_eq!(p.stats().num_groups as usize, p.num_item_copies(), "{ctx}: balancing off but groups hold several items");

        // All four off: the one-request-per-tile baseline, tile by tile.
        let off = PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..base.clone() };
        let p = Plan::build(case.shape, case.batch.clone(), &profile, off).unwrap();
        let copies: Vec<_> = p.item_copies().collect();
        let mut expected = 0;
        for (rq, req) in p.requests.iter().enumerate() {
            for h in 0..case.shape.num_kv_heads {
                let mut q = 0;
                while q < req.q_len {
                    let count = tokens_per_tile.min(req.q_len - q);
                    let copy = copies[expected];
                    let it = p.items[copy.item as usize];
                    let seg = p.row_segments[it.seg_begin as usize];
                    let c = p.kv_chunks[it.chunk_begin as usize];
                    assert_eq!(
                        (copy.kv_head, copy.group, it.seg_count, it.chunk_count, copy.partial_slot),
                        (h, expected as u32, 1, 1, FINAL_OUTPUT),
                        "{ctx}"
                    );
                    assert_eq!((seg.request, seg.q_begin, seg.q_count), (rq as u32, q, count), "{ctx}");
                    assert_eq!((c.key_begin, c.key_end), (0, req.key_limit(q + count - 1, case.shape.causal)), "{ctx}");
                    expected += 1;
                    q += count;
                }
            }
        }
        assert_eq!(expected, copies.len(), "{ctx}");
    }
}

/// Case `sub` holds requests `keep` of `case` (in that order), on the same cache, with their Q
/// rows moved to their new positions, and the prefix groups that still have two members.
fn sub_batch(case: &Case, keep: &[u32]) -> Case {
    let b = &case.batch;
    let (hq, d) = (case.shape.num_qo_heads as usize, case.shape.head_dim as usize);
    let row = hq * d * case.shape.dtype.size_bytes();
    let (mut qo, mut kv, mut pages, mut last, mut qbytes) = (vec![0], vec![0], Vec::new(), Vec::new(), Vec::new());
    let mut qexact = Vec::new();
    for &r in keep {
        let r = r as usize;
        qo.push(qo.last().unwrap() + b.q_len(r) as i32);
        pages.extend_from_slice(&b.kv_page_indices[b.kv_indptr[r] as usize..b.kv_indptr[r + 1] as usize]);
        kv.push(pages.len() as i32);
        last.push(b.kv_last_page_len[r]);
        let (t0, t1) = (b.qo_indptr[r] as usize, b.qo_indptr[r + 1] as usize);
        qbytes.extend_from_slice(&case.q.bytes[t0 * row..t1 * row]);
        qexact.extend_from_slice(&case.q.exact[t0 * hq * d..t1 * hq * d]);
    }
    let mut groups = Vec::new();
    for pg in &b.prefix_groups {
        let members: Vec<u32> = pg.members.iter().filter_map(|m| keep.iter().position(|k| k == m).map(|p| p as u32)).collect();
        if members.len() >= 2 {
            groups.push(PrefixGroup { prefix_len: pg.prefix_len, members });
        }
    }
    let batch = Batch {
        qo_indptr: qo,
        kv_indptr: kv,
        kv_page_indices: pages,
        kv_last_page_len: last,
        page_size: b.page_size,
        num_pages: b.num_pages,
        prefix_groups: groups,
        custom_mask: Vec::new(),
        mask_indptr: Vec::new(),
    };
    let q = Tensor { dtype: case.q.dtype, bytes: qbytes, exact: qexact };
    let copy = |t: &Tensor| Tensor { dtype: t.dtype, bytes: t.bytes.clone(), exact: t.exact.clone() };
    let (k, v) = (copy(&case.k), copy(&case.v));
    let mut layout = case.layout;
    layout.k = k.ptr();
    layout.v = v.ptr();
    Case {
        shape: case.shape,
        batch,
        q,
        k,
        v,
        layout,
        hnd: case.hnd,
        window_left: case.window_left,
        logits_soft_cap: case.logits_soft_cap,
        k_scale: case.k_scale,
        v_scale: case.v_scale,
        k_head_scales: case.k_head_scales.clone(),
        v_head_scales: case.v_head_scales.clone(),
    }
}

#[test]
fn deterministic_mode_is_bitwise_batch_invariant() {
    let mut r = rng(0xde7);
    for i in 0..12 {
        let spec = CaseSpec {
            batch_size: 8,
            max_kv: 1500,
            page_size: 16,
            num_kv_heads: 2,
            group: 4,
            head_dim: 64,
            dtype: [DType::F32, DType::Bf16][i % 2],
            causal: i % 3 != 0,
            decode_fraction: 0.5,
            hnd: false,
        };
        let lens = common::random_lengths(&mut r, &spec);
        let groups = random_prefix_groups(&mut r, &lens);
        let case = Case::build(&mut r, &spec, &lens, groups);
        let split_keys = [64, 100, 512][i % 3];
        // Odd cases without KV splits: then nothing may cut a row's keys, a shared prefix neither.
        let options = PlanOptions { deterministic: true, split_keys, split_kv: i % 2 == 0, ..PlanOptions::default() };
        let full_profile = DeviceProfile::hopper(132);
        let full = plan_check_run(&case, &full_profile, options.clone(), &format!("det {i} full"));
        let (o_full, lse_full) = execute(&case, full);
        // The same requests in other company: a random subset in a random order, planned for
        // another device.
        let mut keep: Vec<u32> = (0..8).filter(|_| r.random_bool(0.6)).collect();
        if keep.is_empty() {
            keep.push(0);
        }
        keep.shuffle(&mut r);
        let sub = sub_batch(&case, &keep);
        let sub_profile = DeviceProfile::cpu(r.random_range(1..=8));
        let plan = plan_check_run(&sub, &sub_profile, options.clone(), &format!("det {i} sub {keep:?}"));
        let (o_sub, lse_sub) = execute(&sub, plan);
        let (hq, d) = (case.shape.num_qo_heads as usize, case.shape.head_dim as usize);
        let es = case.shape.dtype.size_bytes();
        for (j, &rq) in keep.iter().enumerate() {
            let (a0, n) = (case.batch.qo_indptr[rq as usize] as usize, case.batch.q_len(rq as usize) as usize);
            let b0 = sub.batch.qo_indptr[j] as usize;
            assert_eq!(
                &o_full.bytes[a0 * hq * d * es..(a0 + n) * hq * d * es],
                &o_sub.bytes[b0 * hq * d * es..(b0 + n) * hq * d * es],
                "det {i}: request {rq} output differs bitwise in another batch"
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&lse_full[a0 * hq..(a0 + n) * hq]),
                bits(&lse_sub[b0 * hq..(b0 + n) * hq]),
                "det {i}: request {rq} LSE differs"
            );
        }
    }
}

#[test]
fn extreme_options_stay_exact() {
    let mut r = rng(99);
    let spec = CaseSpec {
        batch_size: 4,
        max_kv: 300,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let lens = [(1, 300), (20, 120), (1, 1), (5, 64)];
    let case = Case::build(&mut r, &spec, &lens, vec![PrefixGroup { prefix_len: 50, members: vec![1, 3] }]);
    let tiny_tiles = DeviceProfile { block_m: 16, block_n: 16, ..DeviceProfile::hopper(7) };
    let cases = [
        ("capacity 1: every block split to block_n keys", PlanOptions { capacity: Some(1.0), ..PlanOptions::default() }),
        ("capacity 1e30: nothing split", PlanOptions { capacity: Some(1e30), ..PlanOptions::default() }),
        ("deterministic, split every key", PlanOptions { deterministic: true, split_keys: 1, ..PlanOptions::default() }),
        ("deterministic, split_keys u32::MAX", PlanOptions { deterministic: true, split_keys: u32::MAX, ..PlanOptions::default() }),
    ];
    for (name, options) in cases {
        let plan = plan_check_run(&case, &tiny_tiles, options.clone(), name);
        if options.capacity == Some(1e30) {
            assert_eq!(plan.stats().num_split_requests, 0, "{name}");
        }
        if options.split_keys == u32::MAX {
            assert!(plan.merges.is_empty(), "{name}: nothing to split, no prefix to share");
        }
    }
}

/// The regroup trigger reads a plan's group loads: a kept grouping as unbalanced as the plan's
/// own groups never fires; one whose busiest group carries `d` more per step fires once the
/// decayed sum of d / C reaches the threshold, and never when d / C stays below
/// threshold × (1 − decay).
#[test]
fn regroup_trigger_accumulates_imbalance_beyond_the_plans_own() {
    use packinfer::plan::adapt::RegroupTrigger;
    let mut r = rng(21);
    let spec = CaseSpec {
        batch_size: 9,
        max_kv: 3000,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 1.0,
        hnd: false,
    };
    let lens = common::random_lengths(&mut r, &spec);
    let case = Case::build(&mut r, &spec, &lens, vec![]);
    let plan = Plan::build(case.shape, case.batch.clone(), &DeviceProfile::hopper(5), PlanOptions::default()).unwrap();
    let s = plan.stats();
    assert_eq!(plan.group_costs.len() as u32, s.num_groups);
    let total: f64 = plan.group_costs.iter().sum();
    assert!((total / s.num_groups as f64 - s.mean_group_cost).abs() <= 1e-9 * total);
    let max = plan.group_costs.iter().cloned().fold(0.0, f64::max);
    assert_eq!(max, s.max_group_cost);
    let mut trigger = RegroupTrigger::new(s.capacity);
    for _ in 0..1000 {
        assert!(!trigger.observe(&plan.group_costs, &plan.group_costs));
    }
    // The busiest kept group grew by d (its members' keys, new requests): drift d per step.
    let (decay, threshold) = (RegroupTrigger::DECAY, RegroupTrigger::THRESHOLD);
    let d = s.capacity / 3.0;
    let mut kept = plan.group_costs.clone();
    *kept.iter_mut().find(|c| **c == max).unwrap() += d;
    let (mut sum, mut steps) = (0.0, 0u64);
    while sum < threshold {
        sum = sum * decay + 1.0 / 3.0;
        steps += 1;
    }
    assert!(steps > 1, "a lasting drift, not one step, fires");
    for step in 1..=steps {
        assert_eq!(trigger.observe(&kept, &plan.group_costs), step == steps, "step {step} of {steps}");
    }
    // Below threshold × (1 − decay) per step: the sum converges under the threshold.
    let mut trigger = RegroupTrigger::new(s.capacity);
    let mut kept = plan.group_costs.clone();
    *kept.iter_mut().find(|c| **c == max).unwrap() += 0.9 * threshold * (1.0 - decay) * s.capacity;
    for _ in 0..1000 {
        assert!(!trigger.observe(&kept, &plan.group_costs));
    }
}

fn small_case() -> Case {
    let mut r = rng(1);
    let spec = CaseSpec {
        batch_size: 3,
        max_kv: 50,
        page_size: 16,
        num_kv_heads: 1,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    Case::build(&mut r, &spec, &[(1, 40), (2, 30), (1, 20)], vec![])
}

#[test]
fn bad_inputs_give_clear_errors() {
    let case = small_case();
    let profile = DeviceProfile::cpu(2);
    let build = |batch: Batch, options: PlanOptions| Plan::build(case.shape, batch, &profile, options);
    let message = |e: Error| match e {
        Error::InvalidArgument(m) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    for c in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let m = message(build(case.batch.clone(), PlanOptions { capacity: Some(c), ..PlanOptions::default() }).unwrap_err());
        assert!(m.contains("capacity"), "{m}");
    }
    let mut b = case.batch.clone();
    b.prefix_groups = vec![PrefixGroup { prefix_len: 25, members: vec![0, 2] }];
    let m = message(build(b, PlanOptions::default()).unwrap_err());
    assert!(m.contains("prefix_len = 25") && m.contains("request 2"), "{m}");
    let mut b = case.batch.clone();
    b.prefix_groups = vec![PrefixGroup { prefix_len: 5, members: vec![0, 1] }, PrefixGroup { prefix_len: 5, members: vec![2, 1] }];
    let m = message(build(b, PlanOptions::default()).unwrap_err());
    assert!(m.contains("request 1") && m.contains("prefix_groups[0]") && m.contains("prefix_groups[1]"), "{m}");
    let m = message(build(case.batch.clone(), PlanOptions { deterministic: true, split_keys: 0, ..PlanOptions::default() }).unwrap_err());
    assert!(m.contains("split_keys"), "{m}");
    let m = message(
        Plan::build(case.shape, case.batch.clone(), &DeviceProfile { num_workers: 0, ..profile.clone() }, PlanOptions::default())
            .unwrap_err(),
    );
    assert!(m.contains("num_workers"), "{m}");
    for bad in [-1, case.batch.num_pages as i32] {
        let mut b = case.batch.clone();
        b.kv_page_indices[2] = bad;
        let m = message(build(b, PlanOptions::default()).unwrap_err());
        assert!(m.contains(&format!("kv_page_indices[2] = {bad}")), "{m}");
    }
    // A GQA group taller than a tile cannot be laid out.
    let tiny = DeviceProfile { block_m: 16, ..profile.clone() };
    let mut shape = case.shape;
    shape.num_qo_heads = 32;
    assert!(matches!(Plan::build(shape, case.batch.clone(), &tiny, PlanOptions::default()), Err(Error::Unsupported(_))));

    // An empty batch is a valid, empty plan.
    let empty = Batch {
        qo_indptr: vec![0],
        kv_indptr: vec![0],
        kv_page_indices: vec![],
        kv_last_page_len: vec![],
        page_size: 16,
        num_pages: 4,
        prefix_groups: vec![],
        custom_mask: Vec::new(),
        mask_indptr: Vec::new(),
    };
    let plan = build(empty, PlanOptions::default()).expect("empty batch");
    assert!(plan.items.is_empty() && plan.merges.is_empty());
    assert_eq!(plan.stats().num_items, 0);
}

/// Decodes (one 16-row slice each) are packed only with each other and only up to one slice,
/// so the GPU kernel keeps spreading their keys over all warps; taller blocks pack as before.
#[test]
fn one_slice_blocks_pack_only_into_one_slice_tiles() {
    let mut r = rng(77);
    let spec = CaseSpec {
        batch_size: 1,
        max_kv: 1,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.0,
        hnd: false,
    };
    // 40 decodes and 12 short prefills (8 tokens × 4 heads = 32 rows each).
    let lens: Vec<(u32, u32)> =
        (0..52).map(|i| if i % 13 == 0 || i % 13 == 5 || i % 13 == 9 { (8, 40 + i) } else { (1, 30 + 7 * i) }).collect();
    let case = Case::build(&mut r, &spec, &lens, vec![]);
    let plan = plan_check_run(&case, &DeviceProfile::hopper(4), PlanOptions::default(), "decodes and short prefills");
    let mut packed = 0;
    for item in &plan.items {
        let segs = &plan.row_segments[item.seg_begin as usize..(item.seg_begin + item.seg_count) as usize];
        let narrow = segs.iter().map(|s| s.q_count * 4 <= 16).collect::<Vec<_>>();
        assert!(narrow.iter().all(|&n| n == narrow[0]), "a tile mixes one-slice and taller blocks: {segs:?}");
        if narrow[0] {
            assert!(item.num_rows <= 16, "decodes packed into {} rows", item.num_rows);
        }
        packed += (item.seg_count > 1) as u32;
    }
    assert!(packed > 0, "nothing was packed; the test no longer exercises packing");
}

/// Only members whose rows fit one slice share a prefix: a prompt chunk in the group reads the
/// prefix in its own tiles and writes final rows, while the decodes still share it.
#[test]
fn prompt_chunks_read_a_shared_prefix_in_their_own_tiles() {
    let mut r = rng(78);
    let spec = CaseSpec {
        batch_size: 3,
        max_kv: 3000,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 1.0,
        hnd: false,
    };
    let lens = [(1, 1600), (64, 1700), (1, 1550)];
    let case = Case::build(&mut r, &spec, &lens, vec![PrefixGroup { prefix_len: 1500, members: vec![0, 1, 2] }]);
    let options = PlanOptions { split_kv: false, ..PlanOptions::default() };
    let plan = plan_check_run(&case, &DeviceProfile::hopper(2), options, "a prompt chunk in a prefix group");
    let segs = |it: &packinfer::plan::WorkItem| plan.row_segments[it.seg_begin as usize..(it.seg_begin + it.seg_count) as usize].to_vec();
    let chunk_items: Vec<_> = plan.items.iter().filter(|it| segs(it).iter().any(|s| s.request == 1)).collect();
    assert!(!chunk_items.is_empty());
    for it in chunk_items {
        assert_eq!(it.partial_slot, FINAL_OUTPUT, "the chunk's rows are final: {it:?}");
        assert_eq!(plan.kv_chunks[it.chunk_begin as usize].key_begin, 0, "the chunk reads the prefix itself: {it:?}");
    }
    assert!(
        plan.items.iter().any(|it| segs(it).iter().any(|s| s.request == 0) && segs(it).iter().any(|s| s.request == 2)),
        "the decodes share the prefix: {:?}",
        plan.items
    );
}

/// A sliding window bounds what the plan reads: a long prompt chunk and long decodes under a
/// 4096-key window read each KV head's keys only within (a tile's span of) the window, split
/// ranges included, and the plan stays exact.
#[test]
fn sliding_window_plans_read_only_the_window() {
    let mut r = rng(0x3196);
    let spec = CaseSpec {
        batch_size: 4,
        max_kv: 20000,
        page_size: 16,
        num_kv_heads: 1,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let (w, lens) = (4096u32, [(1u32, 20000u32), (1, 9000), (64, 12000), (1, 300)]);
    let case = Case::build(&mut r, &spec, &lens, vec![]).with_features(Some(w), 0.0);
    let profile = DeviceProfile::hopper(8);
    for (name, options) in [
        ("default", PlanOptions::default()),
        ("deterministic", PlanOptions { deterministic: true, split_keys: 1024, ..PlanOptions::default() }),
        (
            "one request per tile",
            PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..PlanOptions::default() },
        ),
    ] {
        let plan = plan_check_run(&case, &profile, case.plan_options(options), name);
        // Keys read per request (one KV head): at most the window plus the tile's own span.
        let mut read = vec![0u64; lens.len()];
        for item in &plan.items {
            for c in &plan.kv_chunks[item.chunk_begin as usize..(item.chunk_begin + item.chunk_count) as usize] {
                read[c.request as usize] += (c.key_end - c.key_begin) as u64;
            }
        }
        let tokens_per_tile = (profile.block_m / spec.group) as u64;
        for (i, &(q, kv)) in lens.iter().enumerate() {
            let tiles = (q as u64).div_ceil(tokens_per_tile);
            let bound = tiles * (w as u64 + 1 + tokens_per_tile);
            assert!(
                read[i] <= bound.min(kv as u64 * tiles),
                "{name}: request {i} reads {} keys, more than {bound} ({kv} keys, window {w})",
                read[i]
            );
        }
        assert!(plan.stats().tile_utilization > 0.5, "{name}: {:?}", plan.stats());
    }
}

/// A custom mask bounds what the plan reads: keys the mask hides from every row of a block are
/// not read (tree speculative decoding shows a window of recent keys plus the draft tree), a
/// request whose mask shows nothing reads no key and still writes O = 0 and LSE = -inf, and the
/// plan stays exact. The same batch without the mask reads far more, so the bound can fail.
#[test]
fn custom_mask_plans_skip_masked_blocks() {
    let mut r = rng(0x3a5c);
    let spec = CaseSpec {
        batch_size: 3,
        max_kv: 1,
        page_size: 16,
        num_kv_heads: 1,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 0.0,
        hnd: false,
    };
    let lens = [(64u32, 12000u32), (8, 3000), (4, 500), (1, 10000)];
    // Request 0's queries see keys 6000..8000 and their own draft position; request 1's see
    // keys 100..200 only; request 2's see nothing; request 3's see keys 0..100 and 9900..10000
    // (a gap inside its block: split pieces over the gap are skipped).
    let shows = |r: usize, q: u32, k: u32| match r {
        0 => (6000..8000).contains(&k) || k == 12000 - 64 + q,
        1 => (100..200).contains(&k),
        3 => !(100..9900).contains(&k),
        _ => false,
    };
    let (mut mask, mut indptr) = (Vec::new(), vec![0i32]);
    for (i, &(q, kv)) in lens.iter().enumerate() {
        let mut bytes = vec![0u8; (q as usize * kv as usize).div_ceil(8)];
        for qi in 0..q {
            for k in (0..kv).filter(|&k| shows(i, qi, k)) {
                let bit = (qi * kv + k) as usize;
                bytes[bit / 8] |= 1 << (bit % 8);
            }
        }
        mask.extend_from_slice(&bytes);
        indptr.push(mask.len() as i32);
    }
    let plain = Case::build(&mut r, &spec, &lens, vec![]);
    let mut case = Case::build(&mut r, &spec, &lens, vec![]);
    case.batch.custom_mask = mask;
    case.batch.mask_indptr = indptr;
    let profile = DeviceProfile::hopper(8);
    let read_per_request = |plan: &Plan| {
        let mut read = vec![0u64; lens.len()];
        for item in &plan.items {
            for c in &plan.kv_chunks[item.chunk_begin as usize..(item.chunk_begin + item.chunk_count) as usize] {
                read[c.request as usize] += (c.key_end - c.key_begin) as u64;
            }
        }
        read
    };
    for (name, options) in [
        ("default", PlanOptions::default()),
        ("deterministic", PlanOptions { deterministic: true, split_keys: 1024, ..PlanOptions::default() }),
        (
            "one request per tile",
            PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..PlanOptions::default() },
        ),
    ] {
        let plan = plan_check_run(&case, &profile, options.clone(), name);
        let read = read_per_request(&plan);
        // Request 0: each tile reads at most keys 6000 .. its last draft position + 1.
        let tiles = 64u64.div_ceil((profile.block_m / spec.group) as u64);
        // Request 3 reads its gap unless the block is split (then only the shown keys).
        let split = options.deterministic;
        let bounds = [tiles * (12000 - 6000), 100, 0, if split { 200 } else { 10000 }];
        for i in 0..lens.len() {
            assert!(read[i] <= bounds[i], "{name}: request {i} reads {} keys, more than {}", read[i], bounds[i]);
        }
        // Without the mask the same plan options read more than the bound for every request.
        let unmasked = Plan::build(plain.shape, plain.batch.clone(), &profile, options).expect("plan");
        let read = read_per_request(&unmasked);
        for i in (0..lens.len()).filter(|&i| i != 3 || split) {
            assert!(read[i] > bounds[i], "{name}: without the mask request {i} reads only {} keys", read[i]);
        }
    }
}
