//! The request trace: read from a CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`, the Azure LLM
//! inference trace's columns) or generated, so the replay runs on a fresh machine with no files.

use std::fmt;

/// One request of the trace, as the trace gives it (before any scaling for a small machine).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRequest {
    /// Line of the CSV it came from (1-based, the header is line 1); 0 for a synthetic request.
    pub line: usize,
    /// Seconds after the trace's first request.
    pub arrival_s: f64,
    pub context_tokens: u32,
    pub generated_tokens: u32,
}

/// Why a trace could not be read. The message names the file, the line and the field.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceError(pub String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const COLUMNS: [&str; 3] = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"];

/// Parses a trace CSV. `limit` keeps only the first that many requests (rows after it are not
/// read, so an error further down does not stop a replay of the first rows).
pub fn parse_csv(name: &str, text: &str, limit: Option<usize>) -> Result<Vec<TraceRequest>, TraceError> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
    let header = loop {
        match lines.next() {
            None => {
                return Err(TraceError(format!(
                    "{name}: the trace is empty (no header, no requests); expected a header line `{}`",
                    COLUMNS.join(",")
                )))
            }
            Some((_, l)) if l.trim().is_empty() => continue,
            Some(h) => break h,
        }
    };
    let names: Vec<&str> = header.1.split(',').map(|s| s.trim()).collect();
    let mut col = [0usize; 3];
    for (c, want) in COLUMNS.iter().enumerate() {
        col[c] = names.iter().position(|n| n == want).ok_or_else(|| {
            TraceError(format!(
                "{name}:{}: the header has no column `{want}` (it has: {}); expected `{}`",
                header.0,
                names.join(", "),
                COLUMNS.join(",")
            ))
        })?;
    }
    let mut out = Vec::new();
    let mut first_time: Option<f64> = None;
    for (line_no, line) in lines {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(|s| s.trim()).collect();
        if fields.len() != names.len() {
            return Err(TraceError(format!(
                "{name}:{line_no}: {} field(s) where the header has {} ({}): {line:?}",
                fields.len(),
                names.len(),
                names.join(",")
            )));
        }
        let time = parse_timestamp(fields[col[0]]).ok_or_else(|| {
            TraceError(format!(
                "{name}:{line_no}: field TIMESTAMP = {:?} is not a date and time (expected YYYY-MM-DD HH:MM:SS[.fraction])",
                fields[col[0]]
            ))
        })?;
        let count = |c: usize, min: u32| -> Result<u32, TraceError> {
            let raw = fields[col[c]];
            match raw.parse::<u32>() {
                Ok(v) if v >= min => Ok(v),
                Ok(v) => Err(TraceError(format!("{name}:{line_no}: field {} = {v} must be at least {min}", COLUMNS[c]))),
                Err(_) => Err(TraceError(format!("{name}:{line_no}: field {} = {raw:?} is not a whole number of tokens", COLUMNS[c]))),
            }
        };
        // A request needs at least one prompt token to attend over; it may generate nothing.
        let context_tokens = count(1, 1)?;
        let generated_tokens = count(2, 0)?;
        let t0 = *first_time.get_or_insert(time);
        out.push(TraceRequest { line: line_no, arrival_s: time - t0, context_tokens, generated_tokens });
    }
    if out.is_empty() {
        return Err(TraceError(format!("{name}: the trace has a header but no requests")));
    }
    Ok(out)
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` (or with a `T`) as seconds since 1970-01-01, or `None`.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let (y, m, day): (i64, u32, u32) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut t = time.split(':');
    let (h, min): (u32, u32) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    if t.next().is_some() || h > 23 || min > 59 || !(0.0..61.0).contains(&sec) {
        return None;
    }
    Some(days_from_civil(y, m, day) as f64 * 86400.0 + (h * 3600 + min * 60) as f64 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the usual era-based formula).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// A small seeded generator (SplitMix64): the replay must be reproducible and needs no crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// A synthetic trace with a long-tailed length mix like production code-completion traffic:
/// prompts log-normal around 1000 tokens with a tail to 8000, outputs log-normal around 20 tokens
/// with a tail to a few hundred, Poisson arrivals at `rate` requests per second.
pub fn synthetic(n: usize, seed: u64, rate: f64) -> Vec<TraceRequest> {
    let mut rng = Rng::new(seed);
    let mut t = 0.0;
    (0..n)
        .map(|i| {
            if i > 0 {
                t += -(1.0 - rng.uniform()).ln() / rate;
            }
            let context = (1000.0 * (1.1 * rng.normal()).exp()).clamp(8.0, 8000.0) as u32;
            let generated = (20.0 * (0.9 * rng.normal()).exp()).clamp(1.0, 400.0) as u32;
            TraceRequest { line: 0, arrival_s: t, context_tokens: context, generated_tokens: generated }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_azure_format() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:05.0,110,27\n";
        let t = parse_csv("t.csv", text, None).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].line, t[0].context_tokens, t[0].generated_tokens), (2, 4808, 10));
        assert!((t[1].arrival_s - 1.02004).abs() < 1e-6, "{}", t[1].arrival_s);
    }

    #[test]
    fn limit_stops_reading() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,1\nbroken line\n";
        assert_eq!(parse_csv("t.csv", text, Some(1)).unwrap().len(), 1);
        let e = parse_csv("t.csv", text, None).unwrap_err().0;
        assert!(e.contains("t.csv:3:"), "{e}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let h = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
        let e = parse_csv("x", &format!("{h}2023-11-16 18:17:03,abc,1\n"), None).unwrap_err().0;
        assert!(e.contains("x:2:") && e.contains("ContextTokens") && e.contains("\"abc\""), "{e}");
        let e = parse_csv("x", &format!("{h}2023-11-16 18:17:03,5,1\n2023-13-16 18:17:03,5,1\n"), None).unwrap_err().0;
        assert!(e.contains("x:3:") && e.contains("TIMESTAMP"), "{e}");
        let e = parse_csv("x", &format!("{h}2023-11-16 18:17:03,0,1\n"), None).unwrap_err().0;
        assert!(e.contains("ContextTokens = 0"), "{e}");
        let e = parse_csv("x", "TIMESTAMP,Context,GeneratedTokens\n", None).unwrap_err().0;
        assert!(e.contains("no column `ContextTokens`"), "{e}");
        assert!(parse_csv("x", h, None).unwrap_err().0.contains("no requests"));
        assert!(parse_csv("x", "", None).unwrap_err().0.contains("empty"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-02 00:00:01"), Some(86401.0));
        assert_eq!(parse_timestamp("2000-03-01T00:00:00"), Some(951868800.0));
        assert_eq!(parse_timestamp("2023-11-16"), None);
        assert_eq!(parse_timestamp("2023-11-16 25:00:00"), None);
    }

    #[test]
    fn synthetic_is_long_tailed_and_reproducible() {
        let a = synthetic(2000, 7, 10.0);
        assert_eq!(a, synthetic(2000, 7, 10.0));
        let mut ctx: Vec<u32> = a.iter().map(|r| r.context_tokens).collect();
        ctx.sort();
        let (p50, p99) = (ctx[1000], ctx[1980]);
        assert!(p50 > 600 && p50 < 1600 && p99 > 5 * p50, "p50 {p50} p99 {p99}");
        assert!(a.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
    }
}
