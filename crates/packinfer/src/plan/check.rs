//! The plan consistency check every backend runs before it executes a plan (at bind and at
//! update). A plan's fields are public, so a caller can hand a backend a plan that `Plan::build`
//! never made; the backends index arrays, caller tensors and the KV cache with what the plan
//! says, so a hand-made or buggy plan must be refused here with an error, never turned into an
//! out-of-bounds access. Limits of one backend's kernels (its tile height) stay in that backend.

use crate::error::{Error, Result};
use crate::invalid;
use crate::types::limits;

use super::{MergeSlot, Plan, RequestInfo, FINAL_OUTPUT};

impl Plan {
    /// Checks the facts backends rely on for memory safety: the shape and batch are valid and
    /// the requests are the batch's; the units hold every item once, in order; every work item
    /// names row segments, KV chunks, requests, queries and keys that exist, its segments lay
    /// its rows out from row 0 without gaps, its copies' partial slots do not overflow; the item
    /// copies ([`Plan::item_copies`]) are sorted by group, with at most one group per copy;
    /// merge rows read existing slots for every query head and write tokens of the batch. The
    /// message names the first offending value.
    pub fn check_consistent(&self) -> Result<()> {
        self.check_fresh()?;
        self.shape.validate()?;
        self.batch.validate(self.shape.causal)?;
        let n = self.batch.len();
        if self.requests.len() != n {
            return Err(invalid!("the plan has {} requests but its batch has {n}", self.requests.len()));
        }
        for (r, req) in self.requests.iter().enumerate() {
            let want = RequestInfo::of(&self.batch, r);
            if *req != want {
                return Err(invalid!("requests[{r}] = {req:?} does not match the batch's request {r}: {want:?}"));
            }
        }
        for (what, len) in [
            ("items", self.items.len()),
            ("units", self.units.len()),
            ("row segments", self.row_segments.len()),
            ("KV chunks", self.kv_chunks.len()),
            ("merge rows", self.merges.len()),
            ("merge slots", self.merge_slots.len()),
        ] {
            if len > u32::MAX as usize {
                return Err(invalid!("the plan has {len} {what}; at most {} are addressable", u32::MAX));
            }
        }
        let heads = self.shape.num_kv_heads as u64;
        let copies = self.items.len() as u64 * heads;
        if copies > limits::MAX_WORK_ITEMS as u64 {
            return Err(invalid!(
                "the plan has {} work items × {heads} KV heads, more than the {} a plan may have",
                self.items.len(),
                limits::MAX_WORK_ITEMS
            ));
        }
        let group = self.shape.group_size() as u64;
        let total_q = self.batch.total_q();
        let rows = total_q as u64 * self.shape.num_qo_heads as u64;
        if rows > limits::MAX_QO_ROWS {
            return Err(invalid!(
                "{total_q} query tokens × num_qo_heads = {} are {rows} rows, more than the {} a step may have",
                self.shape.num_qo_heads,
                limits::MAX_QO_ROWS
            ));
        }
        // The units partition the items, in order, each of one of the two shapes; their copies
        // then come sorted by group when each unit starts at or after the last one's last group.
        let mut next_item = 0u64;
        let mut last_group = 0u64;
        for (u, unit) in self.units.iter().enumerate() {
            if unit.item_begin as u64 != next_item || unit.item_count == 0 {
                return Err(invalid!(
                    "units[{u}] holds items {}..{} where items {next_item}.. come next (units hold every item once, in order)",
                    unit.item_begin,
                    unit.item_begin as u64 + unit.item_count as u64
                ));
            }
            next_item += unit.item_count as u64;
            let Some(items) = self.items.get(unit.item_begin as usize..next_item as usize) else {
                return Err(invalid!("units[{u}] holds items past the plan's {}", self.items.len()));
            };
            let (first, last) = (items[0].group as u64, items[items.len() - 1].group as u64);
            let stride = unit.group_stride as u64;
            // One of the two unit shapes (`WorkUnit`): a group per KV head, or a group per copy.
            let per_head = items.iter().all(|it| it.group as u64 == first) && (stride > 0 || heads == 1);
            let per_copy = stride == items.len() as u64 && items.iter().zip(first..).all(|(it, g)| it.group as u64 == g);
            if !(per_head || per_copy) {
                return Err(invalid!(
                    "units[{u}] (group stride {stride}) has items in groups {first}..={last}: a unit's items share a group (stride > 0), or have consecutive groups and stride = its items"
                ));
            }
            if first < last_group {
                return Err(invalid!(
                    "units[{u}] starts at group {first}, out of group order after group {last_group}; item copies must be sorted by group"
                ));
            }
            last_group = last + (heads - 1) * stride;
            if last_group >= copies {
                return Err(invalid!("units[{u}] runs copies in group {last_group} but a plan of {copies} item copies has fewer groups"));
            }
            let last_head_slots = (heads - 1) * unit.slot_stride as u64;
            for (k, it) in items.iter().enumerate() {
                if it.partial_slot != FINAL_OUTPUT && it.partial_slot as u64 + last_head_slots + it.num_rows as u64 > u32::MAX as u64 {
                    return Err(invalid!(
                        "items[{}] writes partial slots up to {}, past the last slot number",
                        unit.item_begin as usize + k,
                        it.partial_slot as u64 + last_head_slots + it.num_rows as u64
                    ));
                }
            }
        }
        if next_item != self.items.len() as u64 {
            return Err(invalid!("the units hold {next_item} items but the plan has {}", self.items.len()));
        }
        for (i, it) in self.items.iter().enumerate() {
            let segs = self.row_segments.get(it.seg_begin as usize..it.seg_begin as usize + it.seg_count as usize);
            let chunks = self.kv_chunks.get(it.chunk_begin as usize..it.chunk_begin as usize + it.chunk_count as usize);
            let (Some(segs), Some(chunks)) = (segs, chunks) else {
                return Err(invalid!("items[{i}] names row segments or KV chunks past the plan's arrays"));
            };
            // Segments lay the tile's rows out in order from row 0: row r belongs to the last
            // segment starting at or before it, and every row to exactly one token.
            let mut row = 0u64;
            for s in segs {
                let req = self
                    .requests
                    .get(s.request as usize)
                    .ok_or_else(|| invalid!("items[{i}] has a row segment of request {} which does not exist", s.request))?;
                if s.q_count == 0 || s.q_begin as u64 + s.q_count as u64 > req.q_len as u64 {
                    return Err(invalid!(
                        "items[{i}] has queries {}..{} of request {} which has {}",
                        s.q_begin,
                        s.q_begin as u64 + s.q_count as u64,
                        s.request,
                        req.q_len
                    ));
                }
                if s.row_begin as u64 != row {
                    return Err(invalid!("items[{i}] has a row segment starting at row {} where row {row} comes next", s.row_begin));
                }
                row += s.q_count as u64 * group;
            }
            if row != it.num_rows as u64 {
                return Err(invalid!("items[{i}].num_rows = {} but its row segments hold {row} rows", it.num_rows));
            }
            for c in chunks {
                let req = self
                    .requests
                    .get(c.request as usize)
                    .ok_or_else(|| invalid!("items[{i}] has a KV chunk of request {} which does not exist", c.request))?;
                if c.key_end > req.kv_len || c.key_begin > c.key_end || c.row_end > it.num_rows || c.row_begin > c.row_end {
                    return Err(invalid!(
                        "items[{i}] has KV chunk keys {}..{} rows {}..{} outside request {} (kv_len {}) or the tile ({} rows)",
                        c.key_begin,
                        c.key_end,
                        c.row_begin,
                        c.row_end,
                        c.request,
                        req.kv_len,
                        it.num_rows
                    ));
                }
            }
        }
        // Only now that no slot count overflows.
        let slots = self.num_partial_slots();
        for (i, m) in self.merges.iter().enumerate() {
            let Some(ss) = self.merge_slots.get(m.slot_begin as usize..m.slot_begin as usize + m.slot_count as usize) else {
                return Err(invalid!("merges[{i}] names merge slots past the plan's {}", self.merge_slots.len()));
            };
            // The last query head's slot: KV head heads − 1, the group's last.
            let last = |s: &MergeSlot| s.slot as u64 + (heads - 1) * s.head_stride as u64 + group - 1;
            if let Some(s) = ss.iter().find(|s| last(s) >= slots as u64) {
                return Err(invalid!("merges[{i}] reads partial slot {} but the plan has {slots}", last(s)));
            }
            if m.q_token >= total_q {
                return Err(invalid!("merges[{i}] writes token {} outside the batch's {total_q}", m.q_token));
            }
        }
        Ok(())
    }

    /// Checks that no two writers share a destination: every (token, query head) row of O and
    /// LSE is written by at most one final work item row or merge row, and every partial slot
    /// by at most one item row. `Plan::build` guarantees it; a backend that runs items on
    /// several host threads needs it of any plan (else two threads write the same memory).
    /// Call it after `check_consistent`.
    pub(crate) fn check_writes_once(&self) -> Result<()> {
        let heads = self.shape.num_qo_heads as usize;
        let group = self.shape.group_size();
        let mut rows = BitSet::new(self.batch.total_q() as usize * heads, "the plan's output rows")?;
        let mut slots = BitSet::new(self.num_partial_slots() as usize, "the plan's partial slots")?;
        let twice = |token: u32, head: u32| invalid!("(token {token}, head {head}) is written twice: by two work items or merge rows");
        for copy in self.item_copies() {
            let (i, it) = (copy.item, &self.items[copy.item as usize]);
            if copy.partial_slot != FINAL_OUTPUT {
                for s in copy.partial_slot..copy.partial_slot + it.num_rows {
                    if !slots.insert(s as usize) {
                        return Err(invalid!(
                            "items[{i}] (KV head {}) writes partial slot {s}, which another item writes too",
                            copy.kv_head
                        ));
                    }
                }
                continue;
            }
            for s in &self.row_segments[it.seg_begin as usize..(it.seg_begin + it.seg_count) as usize] {
                let q_start = self.requests[s.request as usize].q_start;
                for q in s.q_begin..s.q_begin + s.q_count {
                    for h in copy.kv_head * group..(copy.kv_head + 1) * group {
                        if !rows.insert((q_start + q) as usize * heads + h as usize) {
                            return Err(twice(q_start + q, h));
                        }
                    }
                }
            }
        }
        for m in &self.merges {
            for h in 0..heads as u32 {
                if !rows.insert(m.q_token as usize * heads + h as usize) {
                    return Err(twice(m.q_token, h));
                }
            }
        }
        Ok(())
    }
}

impl RequestInfo {
    /// Request `r` of a batch, as a plan lists it.
    #[inline]
    pub(crate) fn of(batch: &crate::types::Batch, r: usize) -> RequestInfo {
        RequestInfo { q_start: batch.q_start(r), q_len: batch.q_len(r), kv_len: batch.kv_len(r), page_start: batch.kv_indptr[r] as u32 }
    }
}

/// A fixed-size set of small integers, allocated fallibly (a plan may be large).
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(len: usize, what: &str) -> Result<BitSet> {
        let mut words = Vec::new();
        words
            .try_reserve_exact(len.div_ceil(64))
            .map_err(|_| Error::OutOfMemory(format!("no host memory to check {what} ({len} of them)")))?;
        words.resize(len.div_ceil(64), 0);
        Ok(BitSet(words))
    }

    /// Adds `i`; false if it was there already.
    fn insert(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        let new = self.0[w] & b == 0;
        self.0[w] |= b;
        new
    }
}
