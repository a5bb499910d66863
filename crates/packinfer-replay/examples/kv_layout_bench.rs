//! Group-contiguous KV: the pool-native layout (the allocator moves a group's pages into one run,
//! `src/kv/layout.rs`) against the paper's per-group workspace (a contiguous copy of each group's
//! KV, rebuilt from the authoritative pages), on a trace-like decode workload, on the CPU.
//!
//! Both approaches see the same steps, the same execution groups and the same rebuild rules: a
//! group is rebuilt when the regroup trigger fires (here every `REGROUP_EVERY` steps) and its
//! layout does not already match, or when one of its members runs out of its δ headroom pages.
//! Pool-native is the library's real relayout; the workspace is implemented here with real
//! copies out of the same pool's pages (it is the alternative the library did not adopt).
//!
//! Run: `cargo run --release --example kv_layout_bench [trace.csv]`; prints a markdown table.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use packinfer::backend::cpu::CpuBackend;
use packinfer::backend::Backend;
use packinfer::kv::{KvPool, PoolConfig, SeqId};
use packinfer::plan::PlanOptions;
use packinfer::types::{DType, Shape};

const KV_HEADS: u32 = 8;
const HEAD_DIM: u32 = 128;
const LAYERS: u32 = 1;
const PAGE: u32 = 16;
const BATCH: usize = 32;
const GROUPS: usize = 8;
const STEPS: usize = 512;
const REGROUP_EVERY: usize = 64;
const CONTEXT_CAP: u32 = 2048;
const GEN_CAP: u32 = 512;
/// Requests `i % 8 < 4` belong to one of 4 families that share a 512-token system prompt.
const FAMILY_PREFIX: u32 = 512;

struct Request {
    seq: SeqId,
    family: Option<usize>,
    remaining: u32,
}

#[derive(Default, Debug, Clone, Copy)]
struct Totals {
    rebuilds: u64,
    bytes_moved: u64,
    relayout_s: f64,
    no_room: u64,
    extra_bytes_max: u64,
    append_bytes: u64,
}

/// The workspace alternative: per group, a contiguous copy of its pages in a separate buffer.
struct Workspace {
    buf: Vec<u8>,
    /// Per group: members, and per member the token capacity of its copy (its pages + δ pages).
    groups: Vec<(BTreeSet<SeqId>, BTreeMap<SeqId, u32>, usize)>,
}

use packinfer_replay::trace as trace_csv;

/// (context tokens, generated tokens) per trace row.
fn trace(path: &str) -> Vec<(u32, u32)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let rows = trace_csv::parse_csv(path, &text, None).unwrap_or_else(|e| panic!("{e}"));
    rows.iter().map(|r| (r.context_tokens, r.generated_tokens)).collect()
}

/// Execution groups: each family's members together (their prefix is read once), the rest
/// packed longest-first into the least loaded group, as the planner's LPT grouping does.
fn make_groups(pool: &KvPool, reqs: &[Request]) -> Vec<Vec<SeqId>> {
    let mut units: Vec<(u64, Vec<SeqId>)> = Vec::new();
    let mut fam: BTreeMap<usize, Vec<SeqId>> = BTreeMap::new();
    for r in reqs {
        match r.family {
            Some(f) => fam.entry(f).or_default().push(r.seq),
            None => units.push((pool.sequence_len(r.seq).unwrap() as u64, vec![r.seq])),
        }
    }
    for (_, members) in fam {
        let cost = FAMILY_PREFIX as u64 + members.iter().map(|&s| (pool.sequence_len(s).unwrap() - FAMILY_PREFIX) as u64).sum::<u64>();
        units.push((cost, members));
    }
    units.sort_by_key(|u| std::cmp::Reverse(u.0));
    let mut groups: Vec<(u64, Vec<SeqId>)> = vec![(0, Vec::new()); GROUPS];
    for (cost, members) in units {
        let g = groups.iter_mut().min_by_key(|g| g.0).unwrap();
        g.0 += cost;
        g.1.extend(members);
    }
    groups.into_iter().map(|g| g.1).filter(|g| !g.is_empty()).collect()
}

fn run(trace: &[(u32, u32)], headroom: u32) -> (Totals, Totals, f64, f64, (u64, u64)) {
    let config = PoolConfig {
        num_layers: LAYERS,
        shape: Shape {
            num_qo_heads: KV_HEADS * 4,
            num_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            dtype: DType::Bf16,
            kv_dtype: DType::Bf16,
            causal: true,
            sm_scale: 0.0,
        },
        page_size: PAGE,
        num_pages: 12288,
        headroom_pages: headroom,
    };
    let cpu = Arc::new(CpuBackend::new(1));
    let pool = KvPool::new(cpu.clone(), config).unwrap();
    let page_bytes = config.page_bytes_all_layers();
    let families: Vec<SeqId> = (0..4)
        .map(|_| {
            let s = pool.create_sequence();
            pool.append(s, FAMILY_PREFIX, 0).unwrap();
            s
        })
        .collect();
    let mut next_row = 1000;
    let mut admit = |pool: &KvPool, slot: usize| -> Request {
        let (ctx, gen) = trace[next_row % trace.len()];
        next_row += 1;
        let ctx = ctx.clamp(FAMILY_PREFIX + 1, CONTEXT_CAP);
        let family = (slot % 8 < 4).then_some(slot % 4);
        let seq = match family {
            Some(f) => {
                let s = pool.fork(families[f], FAMILY_PREFIX, 0).unwrap();
                pool.append(s, ctx - FAMILY_PREFIX, 0).unwrap();
                s
            }
            None => {
                let s = pool.create_sequence();
                pool.append(s, ctx, 0).unwrap();
                s
            }
        };
        Request { seq, family, remaining: gen.clamp(1, GEN_CAP) }
    };
    let mut reqs: Vec<Request> = (0..BATCH).map(|i| admit(&pool, i)).collect();
    // The execution groups: recomputed when the trigger fires, kept in between (finished
    // requests leave their group, new ones join the least loaded one), as the planner does.
    let mut groups: Vec<Vec<SeqId>> = Vec::new();
    let mut scattered = (0u64, 0u64);
    let mut native = Totals::default();
    let mut ws_t = Totals::default();
    let mut ws = Workspace { buf: vec![0u8; (12288 * page_bytes) as usize], groups: Vec::new() };
    let (mut read_shared, mut read_unshared) = (0u64, 0u64);
    let layout = pool.kv_layout(0).unwrap();
    let one_page = config.page_bytes() as usize;
    for step in 0..STEPS {
        let regroup = step % REGROUP_EVERY == 0;
        if regroup {
            groups = make_groups(&pool, &reqs);
        }
        // KV a step reads (both approaches read the same: shared prefixes once).
        let plan_reqs: Vec<(SeqId, u32)> = reqs.iter().map(|r| (r.seq, 1)).collect();
        if step % 16 == 0 {
            pool.plan(&plan_reqs, Some(&cpu.profile()), PlanOptions::default()).unwrap();
            let st = pool.stats();
            read_shared += st.step_read_bytes_shared;
            read_unshared += st.step_read_bytes_unshared;
        }

        // Workspace: find due groups (same rules), copy every page of each into the buffer.
        // Group g's copy is `ws.groups[g]`: its members and each member's token capacity.
        let t = Instant::now();
        ws.groups.resize_with(groups.len(), || (BTreeSet::new(), BTreeMap::new(), 0));
        let mut offset = 0usize;
        for (g, members) in groups.iter().enumerate() {
            let set: BTreeSet<SeqId> = members.iter().copied().collect();
            let copy = &ws.groups[g];
            let overflowed = copy.1.iter().any(|(s, &c)| set.contains(s) && pool.sequence_len(*s).unwrap() > c);
            let current = copy.0 == set && !overflowed;
            let due = (regroup && !current) || overflowed;
            if !due {
                offset = offset.max(copy.2);
                continue;
            }
            let mut seen = BTreeSet::new();
            let mut caps = BTreeMap::new();
            for &s in members {
                let pages = pool.sequence_pages(s).unwrap();
                for p in pages.iter().filter(|p| seen.insert(**p)) {
                    for (base, half) in [(layout.k, 0), (layout.v, 1)] {
                        let src = (base as usize + *p as usize * one_page) as *const u8;
                        let dst = (offset * 2 + half * one_page) % (ws.buf.len() - one_page);
                        // SAFETY: the source is a page of the CPU pool's host memory (its own page number); the
                        // destination a page inside `ws.buf` (the offset is taken modulo its room).
                        unsafe { std::ptr::copy_nonoverlapping(src, ws.buf.as_mut_ptr().add(dst), one_page) };
                    }
                    offset += one_page;
                    ws_t.bytes_moved += page_bytes;
                }
                offset += headroom as usize * one_page;
                caps.insert(s, (pages.len() as u32 + headroom) * PAGE);
            }
            ws_t.rebuilds += 1;
            ws.groups[g] = (set, caps, offset);
        }
        ws_t.relayout_s += t.elapsed().as_secs_f64();
        let ws_bytes: u64 = ws.groups.iter().map(|g| g.1.values().map(|&c| (c / PAGE) as u64).sum::<u64>()).sum::<u64>() * page_bytes;
        ws_t.extra_bytes_max = ws_t.extra_bytes_max.max(ws_bytes);
        for (g, members) in groups.iter().enumerate() {
            let copy = &ws.groups[g];
            let ok = members.iter().all(|s| copy.1.get(s).is_some_and(|&c| pool.sequence_len(*s).unwrap() <= c));
            scattered.1 += !ok as u64;
        }

        // Pool-native: the library's relayout.
        let t = Instant::now();
        let rep = pool.relayout(&groups, regroup, 0).unwrap();
        native.relayout_s += t.elapsed().as_secs_f64();
        native.rebuilds += rep.groups_rebuilt as u64;
        native.bytes_moved += rep.bytes_moved;
        native.no_room += rep.groups_no_room as u64;
        let st = pool.stats();
        native.extra_bytes_max = native.extra_bytes_max.max(st.slots_reserved_unused * config.token_bytes_all_layers());
        scattered.0 += not_contiguous(&pool, &groups);

        // Decode: one token each; finished requests leave and the next trace row is admitted.
        let mut admitted = Vec::new();
        for (i, r) in reqs.iter_mut().enumerate() {
            pool.append(r.seq, 1, 0).unwrap();
            native.append_bytes += config.token_bytes_all_layers();
            ws_t.append_bytes += 2 * config.token_bytes_all_layers();
            r.remaining -= 1;
            if r.remaining == 0 {
                pool.release(r.seq).unwrap();
                for g in &mut groups {
                    g.retain(|&s| s != r.seq);
                }
                *r = admit(&pool, i);
                admitted.push((r.seq, r.family));
            }
        }
        // A family member joins a group holding its family; others the least loaded group.
        let family_of: BTreeMap<SeqId, Option<usize>> = reqs.iter().map(|r| (r.seq, r.family)).collect();
        for (seq, family) in admitted {
            let home = family.and_then(|f| groups.iter().position(|g| g.iter().any(|s| family_of.get(s) == Some(&Some(f)))));
            let least = (0..groups.len()).min_by_key(|&g| groups[g].iter().map(|&s| pool.sequence_len(s).unwrap() as u64).sum::<u64>());
            if let Some(g) = home.or(least) {
                groups[g].push(seq);
            }
        }
    }
    (native, ws_t, read_shared as f64, read_unshared as f64, scattered)
}

/// Groups whose pages (not claimed by an earlier group) do not form one run.
fn not_contiguous(pool: &KvPool, groups: &[Vec<SeqId>]) -> u64 {
    let snap = packinfer::testing::pool_snapshot(pool);
    let by_id: BTreeMap<SeqId, (&Vec<u32>, &Vec<u32>)> = snap.seqs.iter().map(|(id, p, r, _)| (*id, (p, r))).collect();
    let mut claimed: BTreeSet<u32> = BTreeSet::new();
    let mut bad = 0;
    for members in groups {
        let mut mine: BTreeSet<u32> = BTreeSet::new();
        for id in members {
            let (pages, reserved) = by_id[id];
            mine.extend(pages.iter().chain(reserved.iter()).filter(|p| !claimed.contains(*p)));
        }
        if let (Some(&lo), Some(&hi)) = (mine.first(), mine.last()) {
            bad += ((hi - lo + 1) as usize != mine.len()) as u64;
        }
        claimed.extend(mine);
    }
    bad
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| "../shared/traces/azure_llm_2023_code.csv".into());
    let trace = trace(&path);
    println!("# Group-contiguous KV on the CPU: pool-native vs per-group workspace\n");
    println!(
        "Workload: {BATCH} concurrent decoding requests from `{}` rows 1000.. (ContextTokens capped at {CONTEXT_CAP}, GeneratedTokens at {GEN_CAP}; a finished request is replaced by the next row); half of them in 4 families sharing a {FAMILY_PREFIX}-token prefix; {GROUPS} LPT execution groups; regroup every {REGROUP_EVERY} steps; {STEPS} steps. Shape per layer: {KV_HEADS} KV heads × {HEAD_DIM}, bf16, page {PAGE} tokens; {LAYERS} layer (bytes scale with the layer count).\n",
        path.rsplit('/').next().unwrap()
    );
    println!("| δ (pages) | approach | group rebuilds | bytes moved (MiB) | relayout time (ms) | due groups without room | (group, step)s not contiguous | extra memory, peak (MiB) | append bytes written (MiB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut reads = (0.0, 0.0);
    for headroom in [1, 2, 4] {
        let (n, w, rs, ru, scattered) = run(&trace, headroom);
        reads = (rs, ru);
        for (name, t, sc) in [("pool-native", n, scattered.0), ("workspace", w, scattered.1)] {
            println!(
                "| {headroom} | {name} | {} | {:.1} | {:.1} | {} | {sc} of {} | {:.1} | {:.1} |",
                t.rebuilds,
                mib(t.bytes_moved),
                t.relayout_s * 1e3,
                t.no_room,
                STEPS * GROUPS,
                mib(t.extra_bytes_max),
                mib(t.append_bytes)
            );
        }
    }
    println!(
        "\nKV bytes read per step (sampled every 16 steps, both approaches): {:.1} MiB with prefix sharing, {:.1} MiB without ({:.0}% saved).",
        reads.0 / (STEPS / 16) as f64 / (1 << 20) as f64,
        reads.1 / (STEPS / 16) as f64 / (1 << 20) as f64,
        100.0 * (1.0 - reads.0 / reads.1)
    );
    println!("\nExtra memory: pool-native = headroom and partial-page slots inside the pool (internal fragmentation); workspace = the second copy of the laid-out groups' KV, on top of the pool.");
}
