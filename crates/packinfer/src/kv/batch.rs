//! Plan from the pool: a step's (sequence, new query tokens) list becomes a `Batch` whose page
//! tables are the sequences' pages and whose prefix groups come from shared physical pages.
//! The batch is written into a plan's own (reused) batch with buffers the pool keeps, so a
//! re-plan from the pool allocates nothing once it has seen a step as large.

use super::{KvPool, PoolState, SeqId};
use crate::error::Result;
use crate::invalid;
use crate::types::{Batch, PrefixGroup};

/// Working buffers of [`PoolState::fill_batch`], kept in the pool (batches are built under its
/// lock). A copy starts empty, as a plan's scratch does.
#[derive(Default)]
pub(crate) struct BatchScratch {
    /// (sequence, request), sorted, to find a repeated sequence.
    ids: Vec<(SeqId, u32)>,
    /// Per request, the keys every query of it sees (those before its first new token).
    shareable: Vec<u32>,
    /// Requests with pages, in the lexicographic order of their page lists.
    sorted: Vec<u32>,
    nodes: Vec<Node>,
    /// (parent node, range of `sorted`) still to expand.
    todo: Vec<(u32, u32, u32)>,
}

/// A cluster of requests sharing pages `0..common`: `sorted[begin..end]`.
#[derive(Clone, Copy)]
struct Node {
    parent: u32,
    begin: u32,
    end: u32,
    prefix_len: u32,
    /// Keys saved by one group of all members over their common pages.
    whole: u64,
    /// Keys saved by the best groups of the sub-clusters (summed from the children).
    split: u64,
    /// An ancestor takes its whole cluster.
    covered: bool,
}

impl Clone for BatchScratch {
    fn clone(&self) -> Self {
        BatchScratch::default()
    }
}

impl std::fmt::Debug for BatchScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BatchScratch")
    }
}

const ROOT: u32 = u32::MAX;

impl Node {
    /// One group of everyone unless the sub-clusters together save more.
    fn takes_whole(&self) -> bool {
        self.split <= self.whole && self.prefix_len > 0
    }
    fn best(&self) -> u64 {
        if self.takes_whole() {
            self.whole
        } else {
            self.split
        }
    }
}

impl PoolState {
    /// Writes the batch for `requests` over `batch` (every field; its vectors keep their
    /// allocations, prefix groups come from `spare`'s), and returns the KV bytes (all layers)
    /// the step reads with and without reading each shared prefix once per group.
    pub(super) fn fill_batch(
        &mut self,
        pool: &KvPool,
        requests: impl Iterator<Item = (SeqId, u32)> + Clone,
        batch: &mut Batch,
        spare: &mut Vec<PrefixGroup>,
    ) -> Result<(u64, u64)> {
        let ps = pool.config.page_size;
        let mut sc = std::mem::take(&mut self.batch_scratch);
        let result = self.fill_batch_with(ps, pool.config.num_pages, requests, batch, spare, &mut sc);
        self.batch_scratch = sc;
        let unshared = result? * pool.config.token_bytes_all_layers();
        let saved: u64 = batch.prefix_groups.iter().map(|g| (g.members.len() as u64 - 1) * g.prefix_len as u64).sum::<u64>()
            * pool.config.token_bytes_all_layers();
        Ok((unshared - saved, unshared))
    }

    /// [`PoolState::fill_batch`] with its buffers; returns the keys of all requests.
    fn fill_batch_with(
        &self,
        ps: u32,
        num_pages: u32,
        requests: impl Iterator<Item = (SeqId, u32)> + Clone,
        batch: &mut Batch,
        spare: &mut Vec<PrefixGroup>,
        sc: &mut BatchScratch,
    ) -> Result<u64> {
        // The first request that repeats an earlier one, and that one.
        sc.ids.clear();
        sc.ids.extend(requests.clone().enumerate().map(|(i, (id, _))| (id, i as u32)));
        sc.ids.sort_unstable();
        let repeat = sc.ids.windows(2).filter(|w| w[0].0 == w[1].0).map(|w| (w[1].1, w[0].1)).min();
        batch.qo_indptr.clear();
        batch.qo_indptr.push(0);
        batch.kv_indptr.clear();
        batch.kv_indptr.push(0);
        batch.kv_page_indices.clear();
        batch.kv_last_page_len.clear();
        batch.page_size = ps;
        batch.num_pages = num_pages;
        batch.prefix_groups.clear();
        sc.shareable.clear();
        let mut keys = 0u64;
        for (i, (id, q_new)) in requests.enumerate() {
            if let Some((r, j)) = repeat.filter(|&(r, _)| r as usize == i) {
                return Err(invalid!("seq_ids[{r}] = {id} repeats seq_ids[{j}]; a sequence appears at most once in a step"));
            }
            let q = self.seq(id)?;
            if q_new > q.len {
                return Err(invalid!(
                    "num_new_tokens[{i}] = {q_new} but sequence {id} holds {} tokens; append the step's tokens before planning",
                    q.len
                ));
            }
            let q_total = batch.qo_indptr[i] as i64 + q_new as i64;
            if q_total > i32::MAX as i64 {
                return Err(invalid!("num_new_tokens sums past {} at seq_ids[{i}]", i32::MAX));
            }
            batch.qo_indptr.push(q_total as i32);
            batch.kv_page_indices.extend(q.pages.iter().map(|&p| p as i32));
            batch.kv_indptr.push(batch.kv_page_indices.len() as i32);
            batch.kv_last_page_len.push(if q.len == 0 { 0 } else { ((q.len - 1) % ps + 1) as i32 });
            // A shared prefix must be visible to every query of every member: cap it at the
            // keys before each member's first new token.
            sc.shareable.push(q.len - q_new);
            keys += q.len as u64;
        }
        prefix_groups(batch, ps, spare, sc);
        Ok(keys)
    }
}

/// Prefix groups of `batch` (requests whose leading pages are the same pages), chosen to save
/// the most key reads: per cluster of requests sharing their first page, either one group of
/// all of them over their longest common run of pages, or the best groups of the sub-clusters
/// that share more. Groups list their members in request order; clusters are visited in page
/// order. Requests sorted by their page lists make every cluster a range of that order, whose
/// common pages are its first and last entries' common pages; the tree is walked without
/// recursion (a comb of forks, member i sharing the first i pages, nests as deep as it has
/// members).
fn prefix_groups(batch: &mut Batch, ps: u32, spare: &mut Vec<PrefixGroup>, sc: &mut BatchScratch) {
    let (kv_indptr, all_pages) = (&batch.kv_indptr, &batch.kv_page_indices);
    let pages = |r: u32| &all_pages[kv_indptr[r as usize] as usize..kv_indptr[r as usize + 1] as usize];
    sc.sorted.clear();
    sc.sorted.extend((0..batch.kv_last_page_len.len() as u32).filter(|&r| !pages(r).is_empty()));
    sc.sorted.sort_unstable_by(|&a, &b| pages(a).cmp(pages(b)).then(a.cmp(&b)));
    let sorted = &sc.sorted;
    // Pushes the clusters of `sorted[begin..end]` (which share pages 0..depth) by their page at
    // `depth`, those of at least two, last first so they are expanded in page order. Requests
    // without a page at `depth` sort first.
    let push_clusters = |todo: &mut Vec<(u32, u32, u32)>, parent: u32, begin: usize, end: usize, depth: usize| {
        let mut hi = end;
        while hi > begin {
            let Some(&page) = pages(sorted[hi - 1]).get(depth) else { break };
            let mut lo = hi - 1;
            while lo > begin && pages(sorted[lo - 1]).get(depth) == Some(&page) {
                lo -= 1;
            }
            if hi - lo >= 2 {
                todo.push((parent, lo as u32, hi as u32));
            }
            hi = lo;
        }
    };
    sc.nodes.clear();
    sc.todo.clear();
    push_clusters(&mut sc.todo, ROOT, 0, sorted.len(), 0);
    // Pre-order expansion: children get larger indices than their parent.
    while let Some((parent, begin, end)) = sc.todo.pop() {
        let me = sc.nodes.len() as u32;
        let (first, last) = (pages(sorted[begin as usize]), pages(sorted[end as usize - 1]));
        let common = first.iter().zip(last).take_while(|(a, b)| a == b).count();
        let prefix_len = sorted[begin as usize..end as usize]
            .iter()
            .map(|&r| sc.shareable[r as usize])
            .min()
            .unwrap_or(0)
            .min((common as u64 * ps as u64).min(u32::MAX as u64) as u32);
        let whole = (end - begin - 1) as u64 * prefix_len as u64;
        sc.nodes.push(Node { parent, begin, end, prefix_len, whole, split: 0, covered: false });
        push_clusters(&mut sc.todo, me, begin as usize, end as usize, common);
    }
    // Bottom-up sums: a child's index is above its parent's.
    for i in (0..sc.nodes.len()).rev() {
        let (p, best) = (sc.nodes[i].parent, sc.nodes[i].best());
        if p != ROOT {
            sc.nodes[p as usize].split += best;
        }
    }
    // Top-down, in pre-order (the nodes' order): the groups nearest the roots that take their
    // whole cluster.
    for i in 0..sc.nodes.len() {
        let n = sc.nodes[i];
        let covered = n.parent != ROOT && {
            let p = &sc.nodes[n.parent as usize];
            p.covered || p.takes_whole()
        };
        sc.nodes[i].covered = covered;
        if !covered && n.takes_whole() {
            let mut g = PrefixGroup::reusing(spare, n.prefix_len, &sorted[n.begin as usize..n.end as usize]);
            g.members.sort_unstable();
            batch.prefix_groups.push(g);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    // The search as first written (recursive sets in maps), the reference for the sorted one.
    struct Member<'a> {
        request: u32,
        pages: &'a [u32],
        /// Keys every query of the request sees: those before its first new token.
        shareable: u32,
    }

    /// Splits `set` (members sharing pages `0..depth`) by their page at `depth`; members without
    /// one drop out. Only clusters of at least two are returned.
    fn split_by_page(members: &[Member], set: &[usize], depth: usize) -> Vec<Vec<usize>> {
        let mut by_page: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for &m in set {
            if let Some(&p) = members[m].pages.get(depth) {
                by_page.entry(p).or_default().push(m);
            }
        }
        by_page.into_values().filter(|c| c.len() >= 2).collect()
    }

    /// A cluster of members that share pages `0..common`, in the search tree of `best_groups`.
    struct Node {
        parent: usize,
        /// Keys saved by one group of all members over their common pages, and that group.
        whole: u64,
        group: Option<PrefixGroup>,
        /// Keys saved by the best groups of the sub-clusters (summed from the children).
        split: u64,
        children: Vec<usize>,
    }

    impl Node {
        /// One group of everyone unless the sub-clusters together save more.
        fn takes_whole(&self) -> bool {
            self.split <= self.whole && self.group.is_some()
        }
        fn best(&self) -> u64 {
            if self.takes_whole() {
                self.whole
            } else {
                self.split
            }
        }
    }

    /// Prefix groups for `clusters` (each a set of members sharing their first page), chosen to
    /// save the most key reads: per cluster either one group of all of them over their longest
    /// common run of pages, or the best groups of the sub-clusters that share more. Iterative: a
    /// comb of forks (member i sharing the first i pages) nests as deep as it has members.
    fn best_groups(members: &[Member], clusters: Vec<Vec<usize>>, page_size: u32) -> Vec<PrefixGroup> {
        const ROOT: usize = usize::MAX;
        // Pre-order expansion: children get larger indices than their parent.
        let mut nodes: Vec<Node> = Vec::new();
        let mut todo: Vec<(usize, Vec<usize>, usize)> = clusters.into_iter().rev().map(|c| (ROOT, c, 0)).collect();
        let mut roots = Vec::new();
        while let Some((parent, set, depth)) = todo.pop() {
            let me = nodes.len();
            if parent == ROOT {
                roots.push(me);
            } else {
                nodes[parent].children.push(me);
            }
            let first = members[set[0]].pages;
            let mut common = depth + 1;
            while set.iter().all(|&m| members[m].pages.len() > common && members[m].pages[common] == first[common]) {
                common += 1;
            }
            let prefix_len = set
                .iter()
                .map(|&m| members[m].shareable)
                .min()
                .unwrap_or(0)
                .min((common as u64 * page_size as u64).min(u32::MAX as u64) as u32);
            let whole = (set.len() as u64 - 1) * prefix_len as u64;
            let group = (prefix_len > 0).then(|| PrefixGroup { prefix_len, members: set.iter().map(|&m| members[m].request).collect() });
            nodes.push(Node { parent, whole, group, split: 0, children: Vec::new() });
            for sub in split_by_page(members, &set, common).into_iter().rev() {
                todo.push((me, sub, common));
            }
        }
        // Bottom-up sums: a child's index is above its parent's.
        for i in (0..nodes.len()).rev() {
            let (p, best) = (nodes[i].parent, nodes[i].best());
            if p != ROOT {
                nodes[p].split += best;
            }
        }
        // Top-down: emit the chosen groups.
        let mut out = Vec::new();
        let mut stack: Vec<usize> = roots.into_iter().rev().collect();
        while let Some(i) = stack.pop() {
            if nodes[i].takes_whole() {
                out.push(nodes[i].group.take().unwrap());
            } else {
                stack.extend(nodes[i].children.iter().rev());
            }
        }
        out
    }

    #[test]
    fn sorted_search_finds_the_groups_of_the_reference() {
        let mut rng = SmallRng::seed_from_u64(7);
        let ps = 4;
        let mut nested = 0;
        for case in 0..2000 {
            // Requests drawn from a few shared page trunks that fork at random depths.
            let n = rng.random_range(0..24usize);
            let trunks: Vec<Vec<u32>> = (0..rng.random_range(1..4)).map(|t| (0..12).map(|i| 1000 * t + i).collect()).collect();
            let mut next = 10_000;
            let lists: Vec<Vec<u32>> = (0..n)
                .map(|_| {
                    let t = &trunks[rng.random_range(0..trunks.len())];
                    let mut p = t[..rng.random_range(0..=t.len())].to_vec();
                    for _ in 0..rng.random_range(0..3) {
                        p.push(next);
                        next += 1;
                    }
                    p
                })
                .collect();
            let shareable: Vec<u32> = lists.iter().map(|p| (p.len() as u32 * ps).saturating_sub(rng.random_range(0..2 * ps))).collect();
            let members: Vec<Member> = (0..n).map(|i| Member { request: i as u32, pages: &lists[i], shareable: shareable[i] }).collect();
            let all: Vec<usize> = (0..n).collect();
            let want = best_groups(&members, split_by_page(&members, &all, 0), ps);
            let (mut qo, mut kv, mut pages, mut last) = (vec![0i32], vec![0i32], Vec::new(), Vec::new());
            for p in &lists {
                qo.push(qo.last().unwrap() + 1);
                pages.extend(p.iter().map(|&x| x as i32));
                kv.push(pages.len() as i32);
                last.push(if p.is_empty() { 0 } else { ps as i32 });
            }
            let mut batch = Batch {
                qo_indptr: qo,
                kv_indptr: kv,
                kv_page_indices: pages,
                kv_last_page_len: last,
                page_size: ps,
                num_pages: 20_000,
                prefix_groups: vec![],
                custom_mask: Vec::new(),
                mask_indptr: Vec::new(),
            };
            let mut sc = BatchScratch { shareable, ..BatchScratch::default() };
            prefix_groups(&mut batch, ps, &mut Vec::new(), &mut sc);
            assert_eq!(batch.prefix_groups, want, "case {case}: {lists:?}");
            nested += (want.len() >= 2) as u32;
        }
        assert!(nested > 200, "{nested} cases with two groups or more: the cases test too little");
    }
}
