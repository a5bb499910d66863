//! Plan from the pool: a step's (sequence, new query tokens) list becomes a `Batch` whose page
//! tables are the sequences' pages and whose prefix groups come from shared physical pages.

use std::collections::BTreeMap;

use super::{KvPool, PoolState, SeqId};
use crate::error::Result;
use crate::invalid;
use crate::types::{Batch, PrefixGroup};

impl PoolState {
    /// The batch for `requests`, and the KV bytes (all layers) the step reads with and without
    /// reading each shared prefix once per group.
    pub(super) fn batch(&self, pool: &KvPool, requests: &[(SeqId, u32)]) -> Result<(Batch, u64, u64)> {
        let ps = pool.config.page_size;
        let mut seen = BTreeMap::new();
        let (mut qo_indptr, mut kv_indptr, mut pages, mut last) = (vec![0i32], vec![0i32], Vec::new(), Vec::new());
        let mut kv_lens = Vec::with_capacity(requests.len());
        for (i, &(id, q_new)) in requests.iter().enumerate() {
            if let Some(j) = seen.insert(id, i) {
                return Err(invalid!("seq_ids[{i}] = {id} repeats seq_ids[{j}]; a sequence appears at most once in a step"));
            }
            let q = self.seq(id)?;
            if q_new > q.len {
                return Err(invalid!(
                    "num_new_tokens[{i}] = {q_new} but sequence {id} holds {} tokens; append the step's tokens before planning",
                    q.len
                ));
            }
            let q_total = qo_indptr[i] as i64 + q_new as i64;
            if q_total > i32::MAX as i64 {
                return Err(invalid!("num_new_tokens sums past {} at seq_ids[{i}]", i32::MAX));
            }
            qo_indptr.push(q_total as i32);
            pages.extend(q.pages.iter().map(|&p| p as i32));
            kv_indptr.push(pages.len() as i32);
            last.push(if q.len == 0 { 0 } else { ((q.len - 1) % ps + 1) as i32 });
            kv_lens.push(q.len);
        }
        // A shared prefix must be visible to every query of every member: cap it at the keys
        // before each member's first new token.
        let members: Vec<Member> = requests
            .iter()
            .enumerate()
            .map(|(i, &(id, q_new))| Member { request: i as u32, pages: &self.seqs[&id].pages, shareable: kv_lens[i] - q_new })
            .collect();
        let all: Vec<usize> = (0..members.len()).collect();
        let prefix_groups = best_groups(&members, split_by_page(&members, &all, 0), ps);
        let token_bytes = pool.config.token_bytes_all_layers();
        let unshared: u64 = kv_lens.iter().map(|&l| l as u64).sum::<u64>() * token_bytes;
        let saved: u64 = prefix_groups.iter().map(|g| (g.members.len() as u64 - 1) * g.prefix_len as u64).sum::<u64>() * token_bytes;
        let batch = Batch {
            qo_indptr,
            kv_indptr,
            kv_page_indices: pages,
            kv_last_page_len: last,
            page_size: ps,
            num_pages: pool.config.num_pages,
            prefix_groups,
        };
        Ok((batch, unshared - saved, unshared))
    }
}

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
