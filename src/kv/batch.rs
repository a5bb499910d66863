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
        let mut prefix_groups = Vec::new();
        let all: Vec<usize> = (0..members.len()).collect();
        for cluster in split_by_page(&members, &all, 0) {
            prefix_groups.extend(best_groups(&members, cluster, 0, ps).1);
        }
        let token_bytes = pool.config.token_bytes_all_layers();
        let unshared: u64 = kv_lens.iter().map(|&l| l as u64).sum::<u64>() * token_bytes;
        let saved: u64 = prefix_groups.iter().map(|g| (g.members.len() as u64 - 1) * g.prefix_len as u64).sum::<u64>() * token_bytes;
        let batch = Batch { qo_indptr, kv_indptr, kv_page_indices: pages, kv_last_page_len: last, page_size: ps, num_pages: pool.config.num_pages, prefix_groups };
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

/// Prefix groups for `set`, members that share pages `0..=depth`, chosen to save the most key
/// reads: either one group of all of them over their longest common run of pages, or the best
/// groups of the sub-clusters that share more. Returns (keys saved, groups).
fn best_groups(members: &[Member], set: Vec<usize>, depth: usize, page_size: u32) -> (u64, Vec<PrefixGroup>) {
    let mut common = depth + 1;
    while set.iter().all(|&m| members[m].pages.get(common) == members[set[0]].pages.get(common) && members[m].pages.len() > common) {
        common += 1;
    }
    let prefix_len = set.iter().map(|&m| members[m].shareable).min().unwrap_or(0).min(common as u32 * page_size);
    let whole = (set.len() as u64 - 1) * prefix_len as u64;
    let mut split_saved = 0;
    let mut split = Vec::new();
    for sub in split_by_page(members, &set, common) {
        let (s, g) = best_groups(members, sub, common, page_size);
        split_saved += s;
        split.extend(g);
    }
    if split_saved > whole {
        (split_saved, split)
    } else if prefix_len == 0 {
        (0, Vec::new())
    } else {
        (whole, vec![PrefixGroup { prefix_len, members: set.iter().map(|&m| members[m].request).collect() }])
    }
}
