//! Group-contiguous KV, pool-native: the allocator itself moves a group's pages into one run —
//! the shared prefix once, then each member's own pages followed by δ headroom pages — so the
//! kernel streams a group's KV from one region, and decode appends land in the headroom, inside
//! the run. A relayout copies only the pages that are not already in place (on the caller's
//! stream), then rewrites every page table that referenced a moved page, so sequences outside
//! the group that share a moved page stay consistent.
//!
//! Why pool-native and not the paper's per-group workspace (a second, contiguous copy of each
//! group's KV rebuilt from the authoritative pages): `examples/kv_layout_bench.rs` runs both on a
//! trace-like decode workload under the same groups and rebuild rules. They copy about the same
//! bytes per rebuild and the step reads the same KV, but the workspace keeps a second copy of
//! every laid-out group, far more than the headroom pages pool-native needs, and writes every
//! new token twice (docs/performance-log.md#pool-layout). So the pool keeps a single
//! representation and `relayout` is its one layout interface.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::{KvPool, PoolState, SeqId};
use crate::error::Result;
use crate::invalid;
use crate::plan::Plan;

/// What one relayout did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayoutReport {
    /// Groups given.
    pub groups: u32,
    /// Groups already contiguous, or not due (no regroup and their headroom held).
    pub groups_in_place: u32,
    /// Groups whose pages were moved into one run.
    pub groups_rebuilt: u32,
    /// Groups that needed a rebuild but found no free run of pages long enough; left as they were.
    pub groups_no_room: u32,
    /// Pages copied (each counted once, for all its layers).
    pub pages_moved: u64,
    /// Bytes those copies moved (every layer, K and V).
    pub bytes_moved: u64,
}

/// The execution groups of `plan`, as sequence ids: `seq_ids[r]` is request `r` of the plan
/// (the order it was planned in). A request whose rows or keys span several groups (a split long
/// request) belongs to the first one; groups are returned in order, empty ones dropped.
pub fn groups_of_plan(plan: &Plan, seq_ids: &[SeqId]) -> Result<Vec<Vec<SeqId>>> {
    if seq_ids.len() != plan.requests.len() {
        return Err(invalid!(
            "{} seq_ids given for a plan of {} requests; pass the ids the plan was made from",
            seq_ids.len(),
            plan.requests.len()
        ));
    }
    let mut group_of: Vec<Option<u32>> = vec![None; seq_ids.len()];
    for item in &plan.items {
        let segs = &plan.row_segments[item.seg_begin as usize..(item.seg_begin + item.seg_count) as usize];
        let chunks = &plan.kv_chunks[item.chunk_begin as usize..(item.chunk_begin + item.chunk_count) as usize];
        for r in segs.iter().map(|s| s.request).chain(chunks.iter().map(|c| c.request)) {
            let g = &mut group_of[r as usize];
            *g = Some(g.map_or(item.group, |g| g.min(item.group)));
        }
    }
    let mut groups: std::collections::BTreeMap<u32, Vec<SeqId>> = Default::default();
    for (r, g) in group_of.iter().enumerate() {
        if let Some(g) = g {
            groups.entry(*g).or_default().push(seq_ids[r]);
        }
    }
    Ok(groups.into_values().collect())
}

/// The groups' runs, those too long for the pool, and the groups due for a rebuild.
struct Due {
    runs: Vec<Vec<Entry>>,
    too_long: HashSet<usize>,
    due: Vec<usize>,
}

/// One position of a group's run: an existing page moved (or kept) there, or headroom for a member.
#[derive(Clone, Copy, Debug)]
enum Entry {
    Page(u32),
    Headroom(SeqId),
}

impl PoolState {
    /// Pages a relayout of `groups` with `regroup` would copy at most (the pages of every group
    /// due for a rebuild; an anchored run copies fewer), without moving anything: the scheduler's
    /// predicted copy cost.
    pub(super) fn relayout_estimate(&self, groups: &[Vec<SeqId>], regroup: bool) -> Result<u64> {
        let Due { runs, too_long, due } = self.due(groups, regroup)?;
        Ok(due
            .iter()
            .filter(|g| !too_long.contains(g))
            .map(|&g| runs[g].iter().filter(|e| matches!(e, Entry::Page(_))).count() as u64)
            .sum())
    }

    /// Each group's run and which groups a relayout with `regroup` would rebuild.
    fn due(&self, groups: &[Vec<SeqId>], regroup: bool) -> Result<Due> {
        let mut group_of_seq = HashMap::new();
        for (g, members) in groups.iter().enumerate() {
            for &id in members {
                self.seq(id)?;
                if let Some(h) = group_of_seq.insert(id, g) {
                    return Err(invalid!("sequence {id} is in groups {h} and {g}; a sequence belongs to one group"));
                }
            }
        }
        // Without a regroup only a member that outgrew its headroom makes its group due: most
        // steps have none, and a scheduler asks every step.
        if !regroup && !group_of_seq.keys().any(|id| self.seqs[id].overflowed) {
            return Ok(Due { runs: Vec::new(), too_long: HashSet::new(), due: Vec::new() });
        }
        // Each page belongs to the run of the first group that uses it.
        let mut owner: HashMap<u32, usize> = HashMap::new();
        let mut runs: Vec<Vec<Entry>> = Vec::with_capacity(groups.len());
        let num_pages = self.refcount.len();
        let mut too_long: HashSet<usize> = HashSet::new();
        for (g, members) in groups.iter().enumerate() {
            let mut order = members.clone();
            // Sequences sharing leading pages are adjacent, so a shared prefix comes first once.
            // Members that overflowed go last in their cluster: their extra pages then come at
            // the end, where the run can often grow in place.
            order.sort_by_key(|id| {
                let q = &self.seqs[id];
                (q.pages.first().copied().unwrap_or(u32::MAX), q.overflowed, *id)
            });
            let mut run = Vec::new();
            let mut in_run = HashSet::new();
            for id in order {
                let q = &self.seqs[&id];
                for &p in &q.pages {
                    if *owner.entry(p).or_insert(g) == g && in_run.insert(p) {
                        run.push(Entry::Page(p));
                    }
                }
                // A run longer than the pool cannot be placed: stop before it costs memory.
                if run.len() + self.headroom_pages as usize > num_pages {
                    run.clear();
                    too_long.insert(g);
                    break;
                }
                run.extend(std::iter::repeat_n(Entry::Headroom(id), self.headroom_pages as usize));
            }
            runs.push(run);
        }
        let due: Vec<usize> = (0..groups.len())
            .filter(|&g| {
                (regroup || groups[g].iter().any(|id| self.seqs[id].overflowed)) && (too_long.contains(&g) || !self.in_place(&runs[g]))
            })
            .collect();
        Ok(Due { runs, too_long, due })
    }

    /// Lays out `groups` contiguously. A group is rebuilt when it is not contiguous and either
    /// `regroup` is set (the trigger fired; the groups are new) or one of its members ran out
    /// of headroom since it was laid out. Groups that are due but find no free run are left as
    /// they are (counted in the report): layout is an optimisation, never a reason to fail a step.
    pub(super) fn relayout(&mut self, pool: &KvPool, groups: &[Vec<SeqId>], regroup: bool, stream: u64) -> Result<RelayoutReport> {
        let Due { runs, too_long, due } = self.due(groups, regroup)?;
        let mut report = RelayoutReport { groups: groups.len() as u32, ..Default::default() };
        report.groups_in_place = (groups.len() - due.len()) as u32;
        if due.is_empty() {
            return Ok(report);
        }
        // Runs are taken from a working copy of the free set, so a group that finds no room
        // leaves nothing behind.
        let mut free = self.free.clone();
        // (group, first page of its new run)
        let mut rebuild: Vec<(usize, u32)> = Vec::new();
        for g in due {
            if too_long.contains(&g) {
                report.groups_no_room += 1;
                continue;
            }
            match self.anchored_run(&runs[g], &mut free).or_else(|| take_run(&mut free, runs[g].len())) {
                Some(start) => rebuild.push((g, start)),
                None => report.groups_no_room += 1,
            }
        }
        // Copy first (the only step that can fail), then rewrite the tables. Pages already at
        // their position stay.
        let mut moves: Vec<(u32, u32)> = Vec::new();
        for &(g, start) in &rebuild {
            for (i, e) in runs[g].iter().enumerate() {
                match *e {
                    Entry::Page(p) if p != start + i as u32 => moves.push((p, start + i as u32)),
                    _ => {}
                }
            }
        }
        // Runs on other threads may be reading these pages through plans made before this
        // relayout (fresh until now): wait for them, and hold later runs off until the pages
        // have moved and those plans are stale. Once the old pages are free, the next append
        // (of any sequence) may take them and write other tokens there.
        let mut generation = (!moves.is_empty()).then(|| pool.layout_generation.write());
        pool.copy_pages(&moves, stream)?;
        let remap: HashMap<u32, u32> = moves.iter().copied().collect();
        for &(_, new) in &moves {
            self.free.remove(&new);
        }
        for &(old, new) in &moves {
            self.refcount[new as usize] = self.refcount[old as usize];
            self.refcount[old as usize] = 0;
            self.free.insert(old);
            if let Some(h) = self.hash_of_page.remove(&old) {
                self.hash_of_page.insert(new, h);
                self.page_by_hash.insert(h, new);
            }
        }
        for q in self.seqs.values_mut() {
            for p in &mut q.pages {
                if let Some(&n) = remap.get(p) {
                    *p = n;
                }
            }
        }
        for &(g, start) in &rebuild {
            let mut kept: BTreeSet<u32> = BTreeSet::new();
            for (i, e) in runs[g].iter().enumerate() {
                if let Entry::Headroom(id) = *e {
                    let page = start + i as u32;
                    if self.seqs[&id].reserved.contains(&page) {
                        kept.insert(page);
                    }
                }
            }
            for &id in &groups[g] {
                let old = std::mem::take(&mut self.seqs.get_mut(&id).unwrap().reserved);
                for p in old.into_iter().filter(|p| !kept.contains(p)) {
                    self.unref(p);
                }
            }
            for (i, e) in runs[g].iter().enumerate() {
                if let Entry::Headroom(id) = *e {
                    let page = start + i as u32;
                    if !kept.contains(&page) {
                        self.free.remove(&page);
                        self.refcount[page as usize] = 1;
                    }
                    self.seqs.get_mut(&id).unwrap().reserved.push(page);
                }
            }
            for &id in &groups[g] {
                let q = self.seqs.get_mut(&id).unwrap();
                q.laid_out = true;
                q.overflowed = false;
            }
        }
        if let Some(g) = &mut generation {
            **g += 1;
        }
        report.groups_rebuilt = rebuild.len() as u32;
        report.pages_moved = moves.len() as u64;
        report.bytes_moved = moves.len() as u64 * pool.config.page_bytes_all_layers();
        if !rebuild.is_empty() {
            self.stats.relayouts += 1;
            self.stats.relayout_pages_moved += report.pages_moved;
            self.stats.relayout_bytes_moved += report.bytes_moved;
        }
        Ok(report)
    }

    /// A run for the group that starts where its first page already is, so pages already at
    /// their position need no copy: every other position must be free (or, for headroom, be a
    /// headroom page of that member already). Takes the free positions out of `free`.
    fn anchored_run(&self, run: &[Entry], free: &mut BTreeSet<u32>) -> Option<u32> {
        let (i0, p0) = run.iter().enumerate().find_map(|(i, e)| match e {
            Entry::Page(p) => Some((i, *p)),
            Entry::Headroom(_) => None,
        })?;
        let start = p0.checked_sub(i0 as u32)?;
        if start as usize + run.len() > self.refcount.len() {
            return None;
        }
        let mut take = Vec::new();
        for (i, e) in run.iter().enumerate() {
            let pos = start + i as u32;
            let ok = match *e {
                Entry::Page(p) => p == pos,
                Entry::Headroom(id) => self.seqs[&id].reserved.contains(&pos),
            };
            if !ok {
                if !free.contains(&pos) {
                    return None;
                }
                take.push(pos);
            }
        }
        for p in take {
            free.remove(&p);
        }
        Some(start)
    }

    /// Whether a group's pages already form its run: its own pages in run order followed, per
    /// member, by whatever headroom it has left, all consecutive.
    fn in_place(&self, run: &[Entry]) -> bool {
        let mut actual: Vec<u32> = Vec::with_capacity(run.len());
        let mut i = 0;
        while i < run.len() {
            match run[i] {
                Entry::Page(p) => {
                    actual.push(p);
                    i += 1;
                }
                Entry::Headroom(id) => {
                    actual.extend(&self.seqs[&id].reserved);
                    while i < run.len() && matches!(run[i], Entry::Headroom(x) if x == id) {
                        i += 1;
                    }
                }
            }
        }
        actual.windows(2).all(|w| w[1] == w[0] + 1)
    }
}

/// Takes the lowest run of `len` consecutive free pages out of `free`.
fn take_run(free: &mut BTreeSet<u32>, len: usize) -> Option<u32> {
    if len == 0 {
        return None;
    }
    let (mut start, mut count, mut prev) = (0u32, 0usize, None::<u32>);
    for &p in free.iter() {
        if prev.is_some_and(|q| q + 1 == p) {
            count += 1;
        } else {
            start = p;
            count = 1;
        }
        prev = Some(p);
        if count == len {
            break;
        }
    }
    if count < len {
        return None;
    }
    for p in start..start + len as u32 {
        free.remove(&p);
    }
    Some(start)
}
