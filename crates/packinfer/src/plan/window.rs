//! The sliding window's key ranges: where a query's visible keys start. Kept apart from the
//! schedule so that every place that clips a key range asks one function.

use super::work::RequestInfo;

impl RequestInfo {
    /// The first key query `q` (0-based in the request) sees under a sliding window of
    /// `window_left` keys: its position is `kv_len − q_len + q` (bottom-right aligned, as the
    /// causal mask) and it sees keys from `position − window_left`, at least 0. Without a
    /// window, 0. The window bounds keys on the left only; `key_limit` gives the right end.
    #[inline]
    pub fn key_start(&self, q: u32, window_left: Option<u32>) -> u32 {
        match window_left {
            None => 0,
            Some(w) => (self.kv_len as i64 - self.q_len as i64 + q as i64 - w as i64).clamp(0, u32::MAX as i64) as u32,
        }
    }

    /// Keys `[key_start, key_limit)` visible to query `q`, an empty range when it sees none.
    #[inline]
    pub fn visible_range(&self, q: u32, causal: bool, window_left: Option<u32>) -> (u32, u32) {
        let end = self.key_limit(q, causal);
        (self.key_start(q, window_left).min(end), end)
    }
}
