//! The cost model: how long one work item keeps its CTA (or CPU thread) busy, in the profile's
//! units. It follows the kernel's execution model: a tile walks its chunks one by one, and for
//! each chunk only the 16-row slices of the tile that intersect the chunk's rows do math, so a
//! chunk computes (its rows rounded out to 16-row slices) × its keys and reads its keys once.
//!
//! cost(item) = a · Σ_chunks sliced_rows(chunk) · keys(chunk) + b · Σ_chunks keys(chunk) + c

use super::{DeviceProfile, KvChunk};

/// Rows of the MMA slice the kernel computes at a time; a chunk touching any row of a slice pays
/// for the whole slice. Set by the hardware, not tuned (docs/performance-log.md#unmeasured).
pub const ROW_SLICE: u32 = 16;

/// Below this many keys per query row on average, a batch is "short": its tiles have few key
/// blocks each, so the fixed cost of starting a tile (reading its rows, the first loads) is
/// what a device with a choice of tile heights should hide, with shorter tiles and more
/// resident workers; long prompts prefer the tall tiles (docs/performance-log.md#short-batch-keys).
pub(crate) const SHORT_BATCH_KEYS_PER_ROW: f64 = 512.0;

/// The mean number of keys a query row of `batch` sees (under a causal mask, its prefix).
pub fn mean_visible_keys(batch: &crate::types::Batch, causal: bool) -> f64 {
    let (mut rows, mut pairs) = (0u64, 0u64);
    for r in 0..batch.len() {
        let (q, k) = (batch.q_len(r) as u64, batch.kv_len(r) as u64);
        rows += q;
        // Causal: query i of q sees k - q + i + 1 keys.
        pairs += if causal { q * (k - q.min(k)) + q * (q + 1) / 2 } else { q * k };
    }
    if rows == 0 {
        0.0
    } else {
        pairs as f64 / rows as f64
    }
}

/// Rows the kernel computes for a chunk applying to tile rows `[row_begin, row_end)`.
#[inline]
pub fn sliced_rows(row_begin: u32, row_end: u32) -> u32 {
    if row_end <= row_begin {
        0
    } else {
        ((row_end - 1) / ROW_SLICE - row_begin / ROW_SLICE + 1) * ROW_SLICE
    }
}

/// Cost of one chunk, without the per-item constant.
#[inline]
pub fn chunk_cost(profile: &DeviceProfile, row_begin: u32, row_end: u32, keys: u32) -> f64 {
    let keys = keys as f64;
    profile.cost_row_key * sliced_rows(row_begin, row_end) as f64 * keys + profile.cost_key * keys
}

/// Cost of a whole item with these chunks.
pub fn item_cost(profile: &DeviceProfile, chunks: &[KvChunk]) -> f64 {
    profile.cost_item + chunks.iter().map(|c| chunk_cost(profile, c.row_begin, c.row_end, c.key_end - c.key_begin)).sum::<f64>()
}

/// Smallest capacity the automatic choice uses: one 16-row slice against `4 · block_n` keys plus
/// the item constant. Below it, splitting a request costs more in merges and per-item overhead
/// than the balance it buys.
pub fn min_capacity(profile: &DeviceProfile) -> f64 {
    profile.cost_item + chunk_cost(profile, 0, ROW_SLICE, 4 * profile.block_n)
}

/// Loads of groups (or workers) as a winner tree, for longest-processing-time-first placement
/// and for simulating workers that take groups in order. A key is the load in fixed point
/// (total cost = 2^(63 - group bits)) with the group in the low bits, so one integer comparison
/// orders by load, then by group, and every key is distinct: the least key is the least-loaded
/// group, ties going to the lower group. Leaves hold the groups' keys (padding leaves hold
/// `u64::MAX`), each inner node the least key below it, so the root is the answer and adding to a
/// group only recomputes its path to the root: a fixed number of branch-free minimums, where a
/// heap's sift-down takes a data-dependent branch per level that the CPU mispredicts.
pub(crate) struct LeastLoaded {
    /// `tree[1]` is the root; node `i` has children `2i` and `2i + 1`; leaf of group `g` is
    /// `tree[leaves + g]`. `tree[0]` is unused.
    tree: Vec<u64>,
    /// `tree[1]`, kept out of memory.
    root: u64,
    leaves: usize,
    groups: usize,
    group_bits: u32,
    scale: f64,
}

impl LeastLoaded {
    /// Groups `0..groups` holding the first `groups` of the units sorted by decreasing cost,
    /// one each (what LPT does with them: every group is empty and ties go to the lower group).
    /// No units at all means one empty group.
    #[cfg(test)]
    pub(crate) fn with_first_units(first_costs: impl ExactSizeIterator<Item = f64>, total_cost: f64) -> Self {
        let groups = first_costs.len();
        Self::with_first_units_keyed(first_costs, total_cost, groups)
    }

    /// [`LeastLoaded::with_first_units`] with the fixed point of `key_groups` groups (at least as
    /// many as `first_costs` has): trees of different sizes then round loads alike.
    fn with_first_units_keyed(first_costs: impl ExactSizeIterator<Item = f64>, total_cost: f64, key_groups: usize) -> Self {
        let groups = first_costs.len();
        debug_assert!(groups <= key_groups.max(1));
        let group_bits = (usize::BITS - key_groups.max(groups).saturating_sub(1).leading_zeros()).max(1);
        let scale = (1u64 << (63 - group_bits)) as f64 / total_cost.max(f64::MIN_POSITIVE);
        let leaves = groups.max(1).next_power_of_two();
        let mut tree = vec![u64::MAX; 2 * leaves];
        tree[leaves] = 0;
        for (g, c) in first_costs.enumerate() {
            tree[leaves + g] = ((c * scale) as u64) << group_bits | g as u64;
        }
        for i in (1..leaves).rev() {
            tree[i] = tree[2 * i].min(tree[2 * i + 1]);
        }
        LeastLoaded { root: tree[1], tree, leaves, groups: groups.max(1), group_bits, scale }
    }

    /// The largest load, in cost units (to the fixed point's resolution).
    pub(crate) fn max_load(&self) -> f64 {
        self.tree[self.leaves..self.leaves + self.groups].iter().map(|&k| k >> self.group_bits).max().unwrap_or(0) as f64 / self.scale
    }

    /// Adds `cost` to the least-loaded group and returns that group.
    #[inline]
    pub(crate) fn add_to_least(&mut self, cost: f64) -> u32 {
        let t = &mut self.tree[..];
        let mask = (1u64 << self.group_bits) - 1;
        // The root from the last call's register rather than memory: placements are a chain.
        let group = self.root & mask;
        let load = (self.root >> self.group_bits) + (cost * self.scale) as u64;
        let mut key = load << self.group_bits | group;
        let mut i = self.leaves + group as usize;
        t[i] = key;
        while i > 1 {
            key = key.min(t[i ^ 1]);
            i >>= 1;
            t[i] = key;
        }
        self.root = key;
        group as u32
    }
}

/// The busiest worker's load when `workers` workers take the groups of `costs` in order, each
/// the next group as soon as it is free (list scheduling; at least one group per worker).
/// `total` is the costs' sum (it sets the fixed point).
///
/// Groups come in runs of `copies` equal costs (a unit's KV-head copies). Where `r` divides both
/// the worker count and every run, the loads stay `r` copies of the loads of `workers / r`
/// workers taking every `r`-th group: the `r` least-loaded workers hold equal loads and take
/// the `r` equal groups one each. So that smaller simulation gives the same loads, in `r`
/// times fewer placements on a shallower tree, rounded in the same fixed point.
///
/// `runs_known`: the caller guarantees the runs (the scheduler's group costs, which it writes
/// a unit's cost per KV head), so they are not checked here, a pass over every group.
pub(crate) fn max_worker_load(costs: &[f64], total: f64, workers: usize, copies: usize, runs_known: bool) -> f64 {
    let equal_runs = |r: usize| costs.len().is_multiple_of(r) && costs.chunks_exact(r).all(|run| run.iter().all(|&c| c == run[0]));
    let mut r = gcd(workers, copies.max(1));
    debug_assert!(!runs_known || equal_runs(r), "group costs not in runs of {copies} equal costs");
    while r > 1 && !runs_known && !equal_runs(r) {
        // Runs shorter than the copies (not a plan's groups): try the next divisor down.
        r = (1..r).rev().find(|d| r.is_multiple_of(*d)).unwrap_or(1);
    }
    let reduced = workers / r;
    let mut loads = LeastLoaded::with_first_units_keyed(costs[..workers].iter().step_by(r).copied(), total, workers);
    debug_assert_eq!(loads.groups, reduced);
    for &c in costs[workers..].iter().step_by(r) {
        loads.add_to_least(c);
    }
    loads.max_load()
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_picks_the_least_load_then_the_lowest_group() {
        for groups in [1usize, 2, 3, 4, 5, 16, 17, 132, 300] {
            let first: Vec<f64> = (0..groups).map(|g| ((g * 7919) % 13) as f64).collect();
            let total = 10_000.0;
            let mut least = LeastLoaded::with_first_units(first.clone().into_iter(), total);
            // The same fixed point, by a linear scan.
            let bits = least.group_bits;
            let mut loads: Vec<u64> = first.iter().map(|&c| (c * least.scale) as u64).collect();
            for step in 0..1000 {
                let cost = ((step * 31) % 17) as f64 * 0.5;
                let want = (0..groups).min_by_key(|&g| (loads[g], g)).unwrap();
                assert_eq!(least.add_to_least(cost) as usize, want, "{groups} groups, step {step}");
                loads[want] += (cost * least.scale) as u64;
                assert!(loads[want] < 1 << (63 - bits));
            }
            let max = *loads.iter().max().unwrap() as f64 / least.scale;
            assert_eq!(least.max_load(), max);
        }
    }

    #[test]
    fn worker_load_of_equal_runs_is_the_full_simulations() {
        // The full simulation, group by group, in the same fixed point.
        let full = |costs: &[f64], workers: usize| {
            let total: f64 = costs.iter().sum();
            let mut t = LeastLoaded::with_first_units(costs[..workers].iter().copied(), total);
            for &c in &costs[workers..] {
                t.add_to_least(c);
            }
            t.max_load()
        };
        for (workers, copies) in [(132, 8), (132, 4), (16, 8), (7, 8), (12, 6), (5, 1), (132, 1)] {
            for units in [workers, workers + 1, 3 * workers + 5, 200] {
                // Decreasing costs (LPT order) with ties, then a shuffled order.
                let mut unit_costs: Vec<f64> = (0..units).map(|u| 1.0 + ((units - u) * 37 % 101) as f64 * 0.25).collect();
                for sorted in [true, false] {
                    if sorted {
                        unit_costs.sort_by(|a, b| b.total_cmp(a));
                    }
                    let costs: Vec<f64> = unit_costs.iter().flat_map(|&c| std::iter::repeat_n(c, copies)).collect();
                    if costs.len() <= workers {
                        continue;
                    }
                    let max = max_worker_load(&costs, costs.iter().sum(), workers, copies, false);
                    let known = max_worker_load(&costs, costs.iter().sum(), workers, copies, true);
                    assert_eq!(known, max, "{workers} workers, {copies} copies, {units} units, runs known");
                    assert_eq!(max, full(&costs, workers), "{workers} workers, {copies} copies, {units} units");
                }
            }
        }
        // Runs that break the copies fall back to the full simulation.
        let costs: Vec<f64> = (0..1000).map(|g| 1.0 + (g * 7 % 13) as f64).collect();
        assert_eq!(max_worker_load(&costs, costs.iter().sum(), 132, 8, false), full(&costs, 132));
    }

    #[test]
    fn mean_visible_keys_counts_each_rows_prefix() {
        // Request 0: 3 queries over 5 keys (page size 1), request 1: a decode over 10 keys.
        let batch = crate::types::Batch {
            qo_indptr: vec![0, 3, 4],
            kv_indptr: vec![0, 5, 15],
            kv_page_indices: (0..15).collect(),
            kv_last_page_len: vec![1, 1],
            page_size: 1,
            num_pages: 15,
            prefix_groups: vec![],
            custom_mask: Vec::new(),
            mask_indptr: Vec::new(),
        };
        // Causal: the queries see 3, 4, 5 and 10 keys.
        assert_eq!(mean_visible_keys(&batch, true), (3.0 + 4.0 + 5.0 + 10.0) / 4.0);
        assert_eq!(mean_visible_keys(&batch, false), (3.0 * 5.0 + 10.0) / 4.0);
        let empty =
            crate::types::Batch { qo_indptr: vec![0], kv_indptr: vec![0], kv_page_indices: vec![], kv_last_page_len: vec![], ..batch };
        assert_eq!(mean_visible_keys(&empty, true), 0.0);
    }

    #[test]
    fn slices_round_out_to_sixteen_rows() {
        assert_eq!(sliced_rows(0, 0), 0);
        assert_eq!(sliced_rows(0, 1), 16);
        assert_eq!(sliced_rows(4, 8), 16);
        assert_eq!(sliced_rows(12, 20), 32);
        assert_eq!(sliced_rows(16, 32), 16);
        assert_eq!(sliced_rows(0, 64), 64);
    }

    #[test]
    fn item_cost_adds_compute_io_and_constant() {
        let p = DeviceProfile { num_workers: 1, block_m: 64, block_n: 64, cost_row_key: 2.0, cost_key: 3.0, cost_item: 5.0 };
        let chunks = [
            KvChunk { request: 0, key_begin: 0, key_end: 10, row_begin: 0, row_end: 4 },
            KvChunk { request: 1, key_begin: 5, key_end: 7, row_begin: 4, row_end: 20 },
        ];
        assert_eq!(item_cost(&p, &chunks), 5.0 + (2.0 * 16.0 * 10.0 + 30.0) + (2.0 * 32.0 * 2.0 + 6.0));
    }
}
