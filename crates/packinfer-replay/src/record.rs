//! `--record-batches`: every step's exact batch and library costs, one JSON line per step, so a
//! harness (bench/replay_anchors.py) can replay the same steps through other attention libraries.
//!
//! File `batches-<schedule>.jsonl` in `--out` (schedule `packinfer`, `baseline`, ...). Line 1 is
//! the header: the format name and version, the model shape, layers, page size, pool pages,
//! request count, arrivals, and the schedule. Every further line is one step:
//!
//! - `step`, `clock_s`: index and virtual clock;
//! - `arrived`: request ids that arrived before this step (they wait from this step on);
//! - `ids`, `q`, `kv`, `emit`: per request of the step in batch order, its id (trace row), query
//!   tokens, keys (new tokens included) and the token it produced: 0 none, 1 first, 2 later;
//! - `finished`: ids of the step's requests that left after it (their KV freed);
//! - `pages`: per request, its page table relative to the last one recorded for that id:
//!   `[keep, start0, len0, start1, len1, ...]` = the first `keep` pages of the previous table,
//!   then runs of consecutive pages `start .. start + len`. A request's table only grows between
//!   relayouts, so a decode step costs `[n]`; the first time (or after a relayout) keep is 0;
//! - `groups`: `[prefix_len, member, member, ...]` per prefix group (members: batch positions);
//! - the step's library costs in seconds: `plan_s`, `bind_s` (launch update), `kv_write_s`,
//!   `relayout_s`, `attention_s` (all layers) and `total_s`, their sum; `pages_moved`.
//!
//! The last page of a request holds `kv - (pages - 1) * page_size` keys.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::engine::{StepBatch, StepRecord};

pub const FORMAT: &str = "packinfer-replay-batches";
pub const VERSION: u32 = 1;

/// What the header line says about the replay.
pub struct Header<'a> {
    pub schedule: &'a str,
    pub shape: packinfer::types::Shape,
    pub layers: u32,
    pub page_size: u32,
    pub num_pages: u32,
    pub requests: usize,
    /// `"all"` or `"trace"`.
    pub arrivals: &'a str,
    pub trace: &'a str,
    pub device: &'a str,
}

/// The file name of a schedule's recording: `batches-packinfer.jsonl`, `batches-no-regroup.jsonl`.
pub fn file_name(schedule: &str) -> String {
    let slug: String = schedule.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    format!("batches-{slug}.jsonl")
}

/// A JSON string literal (the header's names; paths may hold quotes or backslashes).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number as JSON (JSON has no NaN or infinity: those become null).
fn json_f64(x: f64) -> String {
    if x.is_finite() {
        format!("{x:e}")
    } else {
        "null".into()
    }
}

fn push_list<T: std::fmt::Display>(line: &mut String, key: &str, values: impl IntoIterator<Item = T>) {
    let _ = write!(line, ",\"{key}\":[");
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        let _ = write!(line, "{v}");
    }
    line.push(']');
}

/// `pages` after the first `keep` as runs of consecutive pages: `start, len, start, len, ...`.
fn push_runs(line: &mut String, pages: &[i32]) {
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] as i64 == pages[j - 1] as i64 + 1 {
            j += 1;
        }
        let _ = write!(line, ",{},{}", pages[i], j - i);
        i = j;
    }
}

/// Writes one schedule's recording.
pub struct Recorder {
    path: PathBuf,
    out: BufWriter<File>,
    /// The page table last recorded per request id (dropped when the request leaves).
    tables: HashMap<u32, Vec<i32>>,
    line: String,
}

impl Recorder {
    pub fn create(dir: &Path, h: &Header) -> Result<Self, String> {
        let path = dir.join(file_name(h.schedule));
        let file = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut r = Recorder { path, out: BufWriter::with_capacity(1 << 20, file), tables: HashMap::new(), line: String::new() };
        let s = &h.shape;
        let line = format!(
            "{{\"format\":\"{FORMAT}\",\"version\":{VERSION},\"schedule\":{},\"num_qo_heads\":{},\"num_kv_heads\":{},\"head_dim\":{},\"dtype\":\"{}\",\"causal\":{},\"sm_scale\":{},\"layers\":{},\"page_size\":{},\"num_pages\":{},\"requests\":{},\"arrivals\":\"{}\",\"trace\":{},\"device\":{}}}\n",
            json_string(h.schedule),
            s.num_qo_heads,
            s.num_kv_heads,
            s.head_dim,
            s.dtype.name(),
            s.causal,
            json_f64(s.sm_scale as f64),
            h.layers,
            h.page_size,
            h.num_pages,
            h.requests,
            h.arrivals,
            json_string(h.trace),
            json_string(h.device),
        );
        r.write(line)?;
        Ok(r)
    }

    fn write(&mut self, line: String) -> Result<(), String> {
        let result = self.out.write_all(line.as_bytes()).map_err(|e| format!("cannot write {}: {e}", self.path.display()));
        self.line = line;
        result
    }

    /// One step's line. `b` must be the batch of the step `rec` describes.
    pub fn step(&mut self, rec: &StepRecord, b: &StepBatch) -> Result<(), String> {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let _ = write!(line, "{{\"step\":{},\"clock_s\":{}", rec.step, json_f64(rec.clock_s));
        push_list(&mut line, "arrived", &b.arrived);
        push_list(&mut line, "ids", &b.ids);
        push_list(&mut line, "q", &b.q_lens);
        push_list(&mut line, "kv", &b.kv_lens);
        push_list(&mut line, "emit", &b.emits);
        push_list(&mut line, "finished", &b.finished);
        line.push_str(",\"pages\":[");
        for (i, &id) in b.ids.iter().enumerate() {
            let table = &b.pages[b.page_indptr[i] as usize..b.page_indptr[i + 1] as usize];
            let old = self.tables.entry(id).or_default();
            let keep = old.iter().zip(table).take_while(|(a, b)| a == b).count();
            if i > 0 {
                line.push(',');
            }
            let _ = write!(line, "[{keep}");
            push_runs(&mut line, &table[keep..]);
            line.push(']');
            old.clear();
            old.extend_from_slice(table);
        }
        line.push_str("],\"groups\":[");
        for (i, (len, members)) in b.prefix_groups.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            let _ = write!(line, "[{len}");
            for m in members {
                let _ = write!(line, ",{m}");
            }
            line.push(']');
        }
        line.push(']');
        let total = rec.plan_s + rec.bind_s + rec.kv_write_s + rec.relayout_s + rec.attention_s;
        for (key, v) in [
            ("plan_s", rec.plan_s),
            ("bind_s", rec.bind_s),
            ("kv_write_s", rec.kv_write_s),
            ("relayout_s", rec.relayout_s),
            ("attention_s", rec.attention_s),
            ("total_s", total),
        ] {
            let _ = write!(line, ",\"{key}\":{}", json_f64(v));
        }
        let _ = writeln!(line, ",\"pages_moved\":{}}}", rec.pages_moved);
        // Requests that left: their tables are not needed again.
        for id in &b.finished {
            self.tables.remove(id);
        }
        self.write(line)
    }

    pub fn finish(mut self) -> Result<PathBuf, String> {
        self.out.flush().map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_consecutive_pages() {
        let mut s = String::new();
        push_runs(&mut s, &[4, 5, 6, 9, 2, 3]);
        assert_eq!(s, ",4,3,9,1,2,2");
        s.clear();
        push_runs(&mut s, &[]);
        assert_eq!(s, "");
    }

    #[test]
    fn names_and_strings() {
        assert_eq!(file_name("PackInfer"), "batches-packinfer.jsonl");
        assert_eq!(file_name("no regroup"), "batches-no-regroup.jsonl");
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json_f64(f64::NAN), "null");
    }
}
