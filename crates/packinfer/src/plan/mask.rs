//! The custom mask's key ranges: which keys of a block of queries the mask leaves visible.
//! Kept apart from the schedule so that every place that trims a block asks one function.

use crate::types::Batch;

use super::work::RequestInfo;

/// The smallest key range inside `keys = (key_begin, key_end)` that holds every key some query
/// of `queries` of request `r` sees under the batch's custom mask and the
/// sliding window: keys outside it are masked for all those queries, so a block reads none of
/// them. An empty range (at `key_begin`) when the mask hides every key from every query.
/// Without a custom mask, `[key_begin, key_end)`.
// Inlined, its search apart: the planner asks for every block, and most batches have no mask.
#[inline]
pub(crate) fn masked_key_span(
    batch: &Batch,
    req: &RequestInfo,
    r: usize,
    queries: std::ops::Range<u32>,
    window_left: Option<u32>,
    keys: (u32, u32),
) -> (u32, u32) {
    if !batch.has_custom_mask() {
        return keys;
    }
    search_masked_span(batch, req, r, queries, window_left, keys)
}

/// [`masked_key_span`] for a batch with a custom mask.
fn search_masked_span(
    batch: &Batch,
    req: &RequestInfo,
    r: usize,
    queries: std::ops::Range<u32>,
    window_left: Option<u32>,
    keys: (u32, u32),
) -> (u32, u32) {
    let (key_begin, key_end) = keys;
    let (mut first, mut end) = (key_end, key_begin);
    for q in queries {
        // Causal does not apply with a custom mask; the window does.
        let lo = req.key_start(q, window_left).max(key_begin);
        // Only keys outside the span found so far can widen it.
        if let Some(k) = (lo..first.min(key_end)).find(|&k| batch.mask_allows(r, q, k)) {
            first = k;
        }
        if let Some(k) = (lo.max(end)..key_end).rev().find(|&k| batch.mask_allows(r, q, k)) {
            end = k + 1;
        }
    }
    if first >= end {
        (key_begin, key_begin)
    } else {
        (first, end)
    }
}
