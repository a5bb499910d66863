//! The `packinfer-replay` binary as a user runs it: end-to-end replays of small traces whose
//! reported numbers must add up, and the errors for a malformed trace, an empty trace and a
//! model shape the KV pool cannot hold.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_packinfer-replay");
const HEADER: &str = "TIMESTAMP,ContextTokens,GeneratedTokens";
/// The headline row of summary.csv: every library cost of the replay.
const TOTAL: &str = "TOTAL: planning + launch update + KV writes + relayout + attention (s)";

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("packinfer-replay-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_trace(dir: &Path, rows: &[(f64, u32, u32)]) -> PathBuf {
    let mut text = format!("{HEADER}\n");
    for &(t, ctx, gen) in rows {
        let (m, s) = ((t / 60.0) as u32, t % 60.0);
        text.push_str(&format!("2023-11-16 18:{m:02}:{s:010.7},{ctx},{gen}\n"));
    }
    let path = dir.join("trace.csv");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("the replay binary runs")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A small model shape and engine so a replay takes well under a second.
const SMALL: &[&str] = &["--len-scale", "1", "--heads", "4/2", "--head-dim", "16", "--layers", "2", "--page-size", "4", "--kv-mib", "4"];

/// Rows of `summary.csv` by metric: one value per schedule.
fn summary(dir: &Path) -> (Vec<String>, HashMap<String, Vec<f64>>) {
    let text = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    let mut lines = text.lines();
    let names = lines.next().unwrap().split(',').skip(1).map(String::from).collect();
    let rows = lines
        .map(|l| {
            // Metric names may be quoted (they contain commas).
            let (name, rest) = if let Some(stripped) = l.strip_prefix('"') {
                let end = stripped.find("\",").unwrap();
                (stripped[..end].replace("\"\"", "\""), &stripped[end + 2..])
            } else {
                let (n, r) = l.split_once(',').unwrap();
                (n.to_string(), r)
            };
            (name, rest.split(',').map(|v| v.parse::<f64>().unwrap_or(f64::NAN)).collect())
        })
        .collect();
    (names, rows)
}

/// `steps.csv` as one map per line.
fn steps(dir: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines.map(|l| header.iter().cloned().zip(l.split(',').map(String::from)).collect()).collect()
}

fn num(row: &HashMap<String, String>, key: &str) -> f64 {
    row[key].parse().unwrap_or_else(|_| panic!("{key} = {:?}", row[key]))
}

#[test]
fn a_small_trace_replays_and_its_numbers_add_up() {
    let dir = scratch("e2e");
    // Mixed lengths, one request that generates nothing, one longer than the step budget.
    let rows: Vec<(f64, u32, u32)> = vec![
        (0.0, 37, 5),
        (0.1, 3, 1),
        (0.2, 150, 12),
        (0.3, 9, 0),
        (0.4, 64, 7),
        (0.5, 1, 9),
        (0.6, 90, 3),
        (0.7, 17, 20),
        (0.8, 5, 2),
        (0.9, 48, 6),
        (1.0, 120, 1),
        (1.1, 33, 15),
    ];
    let trace = write_trace(&dir, &rows);
    let out = dir.join("out");
    let mut args = vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--token-budget", "64", "--max-batch", "5"];
    args.extend_from_slice(&["--system-prompts", "2", "--shared-fraction", "0.5", "--system-prompt-len", "10"]);
    args.extend_from_slice(SMALL);
    let o = run(&args);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "exit {:?}\n{stdout}\n{stderr}", o.status);
    assert!(stdout.contains("ATTENTION STAGE ONLY"), "{stdout}");
    assert!(stdout.contains("PackInfer") && stdout.contains("baseline"), "{stdout}");
    // The replay checks every step's output of the two schedules against each other.
    assert!(stdout.contains("both schedules computed the same attention"), "{stdout}");

    let generated: u32 = rows.iter().map(|r| r.2).sum();
    let prompts: u32 = rows.iter().map(|r| r.1).sum();
    let (names, s) = summary(&out);
    assert_eq!(names, ["PackInfer", "baseline"]);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(s["requests finished"][i], rows.len() as f64, "{name}");
        assert_eq!(s["tokens generated"][i], generated as f64, "{name}");
        assert_eq!(s["prefill tokens"][i], prompts as f64, "{name}");
        assert_eq!(s["KV pages used after the replay"][i], 0.0, "{name}: KV fully freed");
        assert!(s["attention time total (s)"][i] > 0.0, "{name}");
        // The headline counts every cost of the schedule.
        let total = s["attention time total (s)"][i]
            + s["planning time total (s)"][i]
            + s["launch update time total (s)"][i]
            + s["KV writes total (s)"][i]
            + s["relayout time total (s)"][i];
        assert!((s[TOTAL][i] - total).abs() <= 1e-9 * total.max(1.0), "{name}");
        assert!(s["planning time total (s)"][i] > 0.0, "{name}");
        assert!(s["KV pages used, peak"][i] > 0.0, "{name}");
    }
    assert!(s["regroups (trigger fired)"][0] >= 1.0, "PackInfer lays its groups out at least once");
    assert_eq!(s["regroups (trigger fired)"][1], 0.0, "the baseline never regroups");
    assert_eq!(s["relayout bytes moved (MiB)"][1], 0.0);

    let steps = steps(&out);
    let ours: Vec<_> = steps.iter().filter(|r| r["schedule"] == "PackInfer").collect();
    let base: Vec<_> = steps.iter().filter(|r| r["schedule"] == "baseline").collect();
    assert_eq!(ours.len(), base.len(), "both schedules run the same steps");
    assert_eq!(s["steps"][0], ours.len() as f64);
    for (a, b) in ours.iter().zip(&base) {
        for key in ["requests", "prefill_tokens", "decode_tokens", "kv_tokens", "kv_tokens_logical"] {
            assert_eq!(a[key], b[key], "step {}: {key}", a["step"]);
        }
        assert!(num(a, "prefill_tokens") + num(a, "decode_tokens") <= 64.0, "token budget");
        assert!(num(a, "requests") <= 5.0, "max batch");
        assert!(num(a, "attention_ms") >= 0.0 && num(a, "kv_pages_used") <= num(a, "kv_pages_total"));
    }
    // Every generated token is a decode step's, except the first of each request, which its
    // last prefill chunk yields.
    let producing = rows.iter().filter(|r| r.2 > 0).count() as f64;
    let decode: f64 = base.iter().map(|r| num(r, "decode_tokens")).sum();
    let prefill: f64 = base.iter().map(|r| num(r, "prefill_tokens")).sum();
    assert_eq!(decode + producing, generated as f64);
    assert_eq!(prefill, prompts as f64);

    let png = std::fs::read(out.join("steps.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn arrivals_follow_the_trace_timestamps() {
    let dir = scratch("arrivals");
    // Two requests 3 s apart: at 100 ms per step the second arrives around step 30, long after
    // the first finished, so the engine idles in between.
    let trace = write_trace(&dir, &[(0.0, 20, 3), (3.0, 20, 3)]);
    let out = dir.join("out");
    let mut args =
        vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--arrivals", "trace", "--step-ms", "100", "--mode", "baseline"];
    args.extend_from_slice(SMALL);
    let o = run(&args);
    assert!(o.status.success(), "{:?}", text(&o));
    let steps = steps(&out);
    assert_eq!(steps.len(), 6, "1 prefill + 2 decode steps each");
    let clocks: Vec<f64> = steps.iter().map(|r| num(r, "clock_s")).collect();
    assert!(clocks[2] < 1.0 && clocks[3] >= 3.0 - 1e-9, "{clocks:?}");
    assert!(clocks.windows(2).all(|w| w[0] < w[1]), "{clocks:?}");
    let (names, s) = summary(&out);
    assert_eq!(names, ["baseline"]);
    assert_eq!(s["tokens generated"][0], 6.0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_synthetic_trace_runs_with_no_file() {
    let dir = scratch("synthetic");
    let out = dir.join("out");
    let o = run(&["--requests", "12", "--out", out.to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("synthetic") && stdout.contains("SCALED DOWN"), "{stdout}");
    let (_, s) = summary(&out);
    assert_eq!(s["requests finished"], [12.0, 12.0]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs the replay on `trace_text` and expects exit status 2 with every `needles` in stderr.
fn expect_trace_error(name: &str, trace_text: &str, needles: &[&str]) {
    let dir = scratch(name);
    let path = dir.join("bad.csv");
    std::fs::write(&path, trace_text).unwrap();
    let o = run(&[path.to_str().unwrap(), "--out", dir.join("out").to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{name}: {stdout}\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{name}: {n:?} not in {stderr:?}");
    }
    assert!(!dir.join("out").exists(), "{name}: no output for a failed replay");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_malformed_trace_names_the_line_and_the_field() {
    let ok = "2023-11-16 18:17:03.9799600,4808,10";
    expect_trace_error(
        "bad-number",
        &format!("{HEADER}\n{ok}\n{ok}\n2023-11-16 18:17:05,110,lots\n"),
        &["bad.csv:4:", "GeneratedTokens", "\"lots\""],
    );
    expect_trace_error("bad-time", &format!("{HEADER}\n{ok}\n16/11/2023 18:17,110,3\n"), &["bad.csv:3:", "TIMESTAMP", "16/11/2023"]);
    expect_trace_error("zero-context", &format!("{HEADER}\n2023-11-16 18:17:03,0,3\n"), &["bad.csv:2:", "ContextTokens = 0"]);
    expect_trace_error("fields", &format!("{HEADER}\n{ok}\n2023-11-16 18:17:03,5\n"), &["bad.csv:3:", "2 field(s)"]);
    expect_trace_error("header", "time,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,1\n", &["bad.csv:1:", "TIMESTAMP"]);
}

#[test]
fn an_empty_trace_is_refused() {
    expect_trace_error("empty", "", &["empty"]);
    expect_trace_error("header-only", &format!("{HEADER}\n\n"), &["no requests"]);
    let o = run(&["/nonexistent/trace.csv"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("/nonexistent/trace.csv"));
}

#[test]
fn a_shape_the_pool_cannot_hold_says_what_would_fit() {
    let dir = scratch("fit");
    let trace = write_trace(&dir, &[(0.0, 300, 2), (0.1, 20, 2)]);
    let out = dir.join("out");
    let base = [
        trace.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--len-scale",
        "1",
        "--layers",
        "16",
        "--heads",
        "1/1",
        "--head-dim",
        "256",
    ];
    let o = run(&[&base[..], &["--kv-mib", "1", "--system-prompts", "0"]].concat());
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("does not fit") && stderr.contains("trace line 2") && stderr.contains("16384 bytes per token"), "{stderr}");
    // The size it proposes is enough.
    let mib = stderr.split("--kv-mib ").nth(1).and_then(|r| r.split_whitespace().next()).expect("a --kv-mib proposal");
    let o = run(&[&base[..], &["--kv-mib", mib, "--system-prompts", "0", "--mode", "baseline"]].concat());
    assert!(o.status.success(), "with --kv-mib {mib}: {:?}", text(&o));
    // A bad shape is refused before anything runs.
    let o = run(&[trace.to_str().unwrap(), "--heads", "6/4"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("num_qo_heads = 6"), "{:?}", text(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn arguments_are_checked() {
    let o = run(&["--help"]);
    assert!(o.status.success() && text(&o).0.contains("usage: packinfer-replay"));
    for (args, needle) in [
        (&["--token-budget", "0"][..], "--token-budget = 0"),
        // clap's own errors (exit status 2 too).
        (&["--bogus"][..], "unexpected argument '--bogus'"),
        (&["--requests"][..], "a value is required for '--requests <N>'"),
        (&["--arrivals", "later"][..], "invalid value 'later' for '--arrivals"),
        (&["--shared-fraction", "1.5"][..], "--shared-fraction = 1.5"),
        (&["a.csv", "b.csv"][..], "unexpected argument 'b.csv'"),
        (&["--capacity", "fast"][..], "invalid value 'fast' for '--capacity"),
        (&["--without", "split-kv,caching"][..], "invalid value 'caching' for '--without"),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(text(&o).1.contains(needle), "{args:?}: {:?}", text(&o).1);
    }
}

#[test]
fn a_budget_smaller_than_the_batch_starves_some_decodes_and_still_finishes() {
    let dir = scratch("starve");
    let rows: Vec<(f64, u32, u32)> = (0..6).map(|i| (i as f64 * 0.1, 3 + 5 * i, 4 + i)).collect();
    let trace = write_trace(&dir, &rows);
    let out = dir.join("out");
    let mut args = vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--token-budget", "2", "--max-batch", "6"];
    args.extend_from_slice(SMALL);
    let o = run(&args);
    assert!(o.status.success(), "{:?}", text(&o));
    let (_, s) = summary(&out);
    let generated: u32 = rows.iter().map(|r| r.2).sum();
    assert_eq!(s["tokens generated"], [generated as f64; 2]);
    assert_eq!(s["KV pages used after the replay"], [0.0, 0.0]);
    let steps = steps(&out);
    assert!(steps.iter().all(|r| num(r, "prefill_tokens") + num(r, "decode_tokens") <= 2.0));
    // A step serves at most 2 of the decoding requests; a starved one waits, so some token
    // came more than one step after the previous one: the TBT tail is above the median.
    assert!(s["TBT p99 (ms, all costs)"][1] > s["TBT p50 (ms, all costs)"][1], "{:?}", s["TBT p99 (ms, all costs)"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs the replay, killing it and failing the test if it has not exited within `limit` (a bad
/// value that slips through can spin the engine forever: a NaN speedup never lets the virtual
/// clock reach an arrival).
fn run_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the replay binary runs");
    // Drained while waiting, so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            r.read_to_end(&mut v).ok();
            v
        })
    };
    let (stdout, stderr) = (drain(Box::new(child.stdout.take().unwrap())), drain(Box::new(child.stderr.take().unwrap())));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("{args:?} still ran after {limit:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

const LIMIT: Duration = Duration::from_secs(20);

/// Expects `args` to be refused with exit status 2 and a one-line message naming `option` and
/// every `needles`, before any work: the trace given does not exist (reading it first would
/// have failed on it instead) and `--out` is not created.
fn expect_bad_value(args: &[&str], option: &str, needles: &[&str]) {
    // Tests run in parallel and name the same options: a directory per call.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = scratch(&format!("bad-{}", CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let out = dir.join("out");
    let all = [&["/nonexistent/trace.csv", "--out", out.to_str().unwrap()][..], args].concat();
    let o = run_within(&all, LIMIT);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {stdout}\n{stderr}");
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error.len(), 1, "{args:?}: one error line in {stderr:?}");
    for n in std::iter::once(&option).chain(needles) {
        assert!(error[0].contains(n), "{args:?}: {n:?} not in {stderr:?}");
    }
    assert!(!stderr.contains("nonexistent"), "{args:?}: the options are checked before the trace is read: {stderr:?}");
    assert!(!out.exists(), "{args:?}: nothing written");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn not_a_number_is_refused() {
    expect_bad_value(&["--arrivals", "trace", "--speedup", "nan"], "--speedup", &["NaN"]);
    expect_bad_value(&["--arrivals", "trace", "--step-ms", "nan"], "--step-ms", &["NaN"]);
    expect_bad_value(&["--len-scale", "nan"], "--len-scale", &["NaN"]);
    expect_bad_value(&["--shared-fraction", "NaN"], "--shared-fraction", &["NaN"]);
    expect_bad_value(&["--capacity", "nan"], "--capacity", &["NaN"]);
}

#[test]
fn infinities_are_refused() {
    expect_bad_value(&["--speedup", "inf"], "--speedup", &["inf"]);
    expect_bad_value(&["--step-ms", "infinity"], "--step-ms", &["inf"]);
    expect_bad_value(&["--len-scale", "inf"], "--len-scale", &["inf"]);
    expect_bad_value(&["--capacity=-inf"], "--capacity", &["-inf"]);
    // Finite but 0 s once converted to seconds: as stuck as NaN.
    expect_bad_value(&["--step-ms", "1e-322"], "--step-ms", &["1e-322"]);
}

#[test]
fn negative_values_are_refused() {
    expect_bad_value(&["--speedup", "-1"], "--speedup", &["-1"]);
    expect_bad_value(&["--step-ms=-20"], "--step-ms", &["-20"]);
    expect_bad_value(&["--len-scale", "-0.5"], "--len-scale", &["-0.5"]);
    expect_bad_value(&["--capacity", "-2"], "--capacity", &["-2"]);
    expect_bad_value(&["--shared-fraction", "-0.1"], "--shared-fraction", &["-0.1"]);
    // Counts are unsigned: clap refuses the value itself.
    expect_bad_value(&["--layers", "-1"], "--layers", &["-1"]);
    expect_bad_value(&["--kv-mib", "-64"], "--kv-mib", &["-64"]);
}

#[test]
fn zero_is_refused_where_it_is_impossible() {
    for option in [
        "--requests",
        "--layers",
        "--head-dim",
        "--max-context",
        "--max-generated",
        "--token-budget",
        "--max-batch",
        "--system-prompt-len",
        "--page-size",
        "--kv-mib",
    ] {
        expect_bad_value(&[option, "0"], option, &["0"]);
    }
    for option in ["--speedup", "--step-ms", "--len-scale", "--capacity"] {
        expect_bad_value(&[option, "0"], option, &["0"]);
    }
}

#[test]
fn heads_must_be_a_positive_multiple() {
    expect_bad_value(&["--heads", "6/4"], "--heads", &["6/4", "num_qo_heads = 6"]);
    expect_bad_value(&["--heads", "0/2"], "--heads", &["0/2"]);
    expect_bad_value(&["--heads", "8/0"], "--heads", &["8/0", "num_kv_heads = 0"]);
    expect_bad_value(&["--heads", "8"], "--heads", &["'8'"]);
    expect_bad_value(&["--head-dim", "100"], "--head-dim", &["100"]);
}

#[test]
fn impossible_sizes_are_refused() {
    // 2^44 MiB = 2^64 bytes.
    expect_bad_value(&["--kv-mib", "17592186044416"], "--kv-mib", &["17592186044416"]);
    expect_bad_value(&["--headroom-pages", "4000000000"], "--headroom-pages", &["4000000000"]);
    expect_bad_value(&["--requests", "3000000000"], "--requests", &["3000000000"]);
    expect_bad_value(&["--shared-fraction", "1.5"], "--shared-fraction", &["1.5"]);
}

/// Sizes that only add up with the device's defaults are checked once the device is known,
/// still before the trace is read or a pool allocated.
#[test]
fn sizes_the_device_defaults_take_part_in_are_refused() {
    let cpu = ["--device", "cpu"];
    // 2^44 - 1 MiB in pages of 32 bytes: more pages than int32 page tables address.
    let pages =
        [&cpu[..], &["--kv-mib", "17592186044415", "--page-size", "1", "--heads", "1/1", "--head-dim", "8", "--layers", "1"]].concat();
    expect_bad_value(&pages, "--kv-mib", &["page"]);
    expect_bad_value(&[&cpu[..], &["--len-scale", "1e12"]].concat(), "--len-scale", &["--system-prompt-len"]);
    expect_bad_value(&[&cpu[..], &["--max-context", "2147483647"]].concat(), "--max-context", &["2147483647"]);
}

#[test]
fn nan_speedup_and_step_return_at_once_on_a_real_trace() {
    let dir = scratch("nan-hang");
    let trace = write_trace(&dir, &[(0.0, 20, 3), (3.0, 20, 3)]);
    let out = dir.join("out");
    for bad in [["--speedup", "nan"], ["--step-ms", "nan"]] {
        let mut args = vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--arrivals", "trace", bad[0], bad[1]];
        args.extend_from_slice(SMALL);
        let started = Instant::now();
        let o = run_within(&args, LIMIT);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {:?}", text(&o));
        assert!(text(&o).1.contains(bad[0]), "{bad:?}: {:?}", text(&o).1);
        assert!(started.elapsed() < LIMIT);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_out_dir_that_cannot_be_made_fails_before_the_replay() {
    let dir = scratch("out-under-file");
    let trace = write_trace(&dir, &[(0.0, 20, 3), (0.1, 9, 2)]);
    let file = dir.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let out = file.join("out");
    let mut args = vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    let o = run_within(&args, LIMIT);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("--out") && stderr.contains(out.to_str().unwrap()), "{stderr}");
    assert!(!stdout.contains("PackInfer replay"), "nothing ran: {stdout}");
    // A directory that can be made is probed and left as it was: a failed replay leaves no output.
    let fresh = dir.join("new").join("out");
    let o = run_within(&["/nonexistent/trace.csv", "--out", fresh.to_str().unwrap()], LIMIT);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("/nonexistent/trace.csv"), "{:?}", text(&o));
    assert!(!dir.join("new").exists(), "the probe removed what it made");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_technique_switched_off_still_replays() {
    let dir = scratch("without-all");
    let rows: Vec<(f64, u32, u32)> = (0..8).map(|i| (i as f64 * 0.1, 5 + 17 * i, 1 + i)).collect();
    let trace = write_trace(&dir, &rows);
    let out = dir.join("out");
    for capacity in ["tuned", "auto", "2"] {
        let mut args = vec![
            trace.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--without",
            "packing,balancing,prefix-sharing,split-kv",
            "--capacity",
            capacity,
        ];
        args.extend_from_slice(&["--token-budget", "64", "--system-prompts", "2", "--shared-fraction", "0.5", "--system-prompt-len", "10"]);
        args.extend_from_slice(SMALL);
        let o = run_within(&args, LIMIT);
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "--capacity {capacity}: exit {:?}\n{stdout}\n{stderr}", o.status);
        assert!(stdout.contains("both schedules computed the same attention"), "{stdout}");
        // The banner says what PackInfer ran with.
        assert!(stdout.contains("PackInfer: one request per tile (every plan technique off)"), "{stdout}");
        assert!(stdout.contains("(--without packing,balancing,prefix-sharing,split-kv)"), "{stdout}");
        let (names, s) = summary(&out);
        assert_eq!(names, ["PackInfer", "baseline"]);
        assert_eq!(s["requests finished"], [rows.len() as f64; 2]);
        // One request per tile has no capacity to scale or tune.
        assert_eq!(s["capacity / automatic capacity, last step"], [0.0, 0.0], "--capacity {capacity}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--ablation` replays each adaptive part off beside the default, checks every schedule's
/// output against the first's, and says what each part's net effect was, all costs counted.
#[test]
fn the_ablation_replays_each_adaptive_part_off_with_every_cost_counted() {
    let dir = scratch("ablation");
    let rows: Vec<(f64, u32, u32)> = (0..24).map(|i| (i as f64 * 0.1, 5 + 37 * (i % 7), 1 + (i * 5) % 17)).collect();
    let trace = write_trace(&dir, &rows);
    let out = dir.join("out");
    let mut args = vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--ablation", "--token-budget", "64", "--max-batch", "8"];
    args.extend_from_slice(SMALL);
    let o = run_within(&args, LIMIT);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "exit {:?}\n{stdout}\n{stderr}", o.status);
    let (names, s) = summary(&out);
    assert_eq!(names, ["PackInfer", "no tuning", "no regroup", "no relayout", "relayout always", "no adaptive", "baseline"]);
    assert!(stdout.contains("every schedule computed the same attention"), "{stdout}");
    for part in ["capacity tuning", "regroup trigger", "relayout cost model (vs never moving)", "all adaptive parts"] {
        assert!(stdout.contains(part), "{part}: {stdout}");
    }
    // Each schedule's scheduler report: firing rate, relayouts, predicted vs measured.
    assert!(stdout.contains("PackInfer: scheduler") && stdout.contains("predicted copy"), "{stdout}");
    assert_eq!(s["requests finished"], [rows.len() as f64; 7]);
    // Parts switched off do nothing.
    let col = |name: &str| names.iter().position(|n| n == name).unwrap();
    assert_eq!(s["relayout bytes moved (MiB)"][col("no relayout")], 0.0);
    assert_eq!(s["relayout bytes moved (MiB)"][col("no adaptive")], 0.0);
    assert_eq!(s["regroups (trigger fired)"][col("no regroup")], 0.0);
    assert_eq!(s["capacity / automatic capacity, last step"][col("no tuning")], 1.0);
    // The trigger and the cost model are recorded per step.
    let steps = steps(&out);
    let ours: Vec<_> = steps.iter().filter(|r| r["schedule"] == "PackInfer").collect();
    let fired = ours.iter().filter(|r| r["regrouped"] == "1").count();
    assert_eq!(fired as f64, s["regroups (trigger fired)"][0]);
    assert!(ours.iter().all(|r| num(r, "drift") >= 0.0 && num(r, "drift_accumulated") >= 0.0));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_adaptive_parts_switch_off_one_by_one() {
    let dir = scratch("without-adaptive");
    let rows: Vec<(f64, u32, u32)> = (0..10).map(|i| (i as f64 * 0.1, 9 + 23 * i, 2 + i)).collect();
    let trace = write_trace(&dir, &rows);
    let out = dir.join("out");
    let mut args =
        vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--without", "tuning,regroup,relayout", "--mode", "packinfer"];
    args.extend_from_slice(&["--token-budget", "64"]);
    args.extend_from_slice(SMALL);
    let o = run_within(&args, LIMIT);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("KV left where the pages fell") && stdout.contains("automatic capacity"), "{stdout}");
    assert!(stdout.contains("(--without tuning,regroup,relayout)"), "{stdout}");
    let (_, s) = summary(&out);
    assert_eq!(s["regroups (trigger fired)"], [0.0]);
    assert_eq!(s["relayout bytes moved (MiB)"], [0.0]);
    assert_eq!(s["capacity / automatic capacity, last step"], [1.0]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_spellings_of_the_hand_written_parser_still_parse() {
    let dir = scratch("spellings");
    let trace = write_trace(&dir, &[(0.0, 20, 3), (0.1, 9, 2), (0.2, 5, 1)]);
    let out = dir.join("out");
    let out_arg = format!("--out={}", out.display());
    // --cpu for --device cpu, fp16 for f16, name=value, a repeated option's last value wins and
    // --without adds up over repeats.
    let mut args = vec![trace.to_str().unwrap(), &out_arg, "--gpu", "--cpu", "--dtype", "fp16", "--requests=1", "--requests", "2"];
    args.extend_from_slice(&["--without", "packing", "--without", "split-kv", "--mode=packinfer"]);
    args.extend_from_slice(SMALL);
    let o = run_within(&args, LIMIT);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("2 requests") && stdout.contains(", f16,"), "{stdout}");
    let (names, s) = summary(&out);
    assert_eq!(names, ["PackInfer"]);
    assert_eq!(s["requests finished"], [2.0]);
    std::fs::remove_dir_all(&dir).ok();
}

/// The percentile the replay's summary reports (nearest rank).
fn nearest_rank(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// `--record-batches`' file of one schedule: its header and steps, page tables rebuilt from the
/// runs (every table checked against its KV length and the pool).
struct Recording {
    header: serde_json::Value,
    steps: Vec<serde_json::Value>,
    /// Per step, per request of the step: its whole page table.
    tables: Vec<Vec<Vec<i64>>>,
}

fn read_recording(path: &Path) -> Recording {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")));
    let header = lines.next().unwrap();
    assert_eq!(header["format"], "packinfer-replay-batches");
    assert_eq!(header["version"], 1);
    let steps: Vec<_> = lines.collect();
    let ints = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<i64>>();
    let (page_size, num_pages) = (header["page_size"].as_i64().unwrap(), header["num_pages"].as_i64().unwrap());
    let mut last: HashMap<i64, Vec<i64>> = HashMap::new();
    let mut tables = Vec::new();
    for st in &steps {
        let (ids, kv, q) = (ints(&st["ids"]), ints(&st["kv"]), ints(&st["q"]));
        assert_eq!((ids.len(), kv.len(), q.len(), ints(&st["emit"]).len()), (ids.len(), ids.len(), ids.len(), ids.len()));
        let mut step_tables = Vec::new();
        for (i, entry) in st["pages"].as_array().unwrap().iter().enumerate() {
            let e = ints(entry);
            let old = last.remove(&ids[i]).unwrap_or_default();
            assert!(e[0] as usize <= old.len() && e.len() % 2 == 1, "step {}: {e:?}", st["step"]);
            let mut t = old[..e[0] as usize].to_vec();
            for run in e[1..].chunks(2) {
                assert!(run[1] > 0, "an empty run: {e:?}");
                t.extend(run[0]..run[0] + run[1]);
            }
            assert_eq!(t.len() as i64, (kv[i] + page_size - 1) / page_size, "step {}: request {} of {} keys", st["step"], ids[i], kv[i]);
            assert!(t.iter().all(|&p| (0..num_pages).contains(&p)));
            assert!(q[i] >= 1 && q[i] <= kv[i]);
            last.insert(ids[i], t.clone());
            step_tables.push(t);
        }
        assert_eq!(step_tables.len(), ids.len());
        for id in ints(&st["finished"]) {
            last.remove(&id);
        }
        tables.push(step_tables);
    }
    Recording { header, steps, tables }
}

#[test]
fn recorded_batches_match_the_step_table_and_the_timeline() {
    let dir = scratch("record");
    let rows: Vec<(f64, u32, u32)> =
        vec![(0.0, 37, 5), (0.1, 3, 1), (0.2, 150, 12), (0.3, 9, 0), (0.4, 64, 7), (0.5, 1, 9), (0.6, 90, 3), (0.7, 17, 20)];
    let trace = write_trace(&dir, &rows);
    let out = dir.join("out");
    let mut args = vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--token-budget", "64", "--max-batch", "5"];
    args.extend_from_slice(&["--system-prompts", "1", "--shared-fraction", "0.6", "--system-prompt-len", "10", "--record-batches"]);
    args.extend_from_slice(SMALL);
    let o = run(&args);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("batches-packinfer.jsonl") && stdout.contains("batches-baseline.jsonl"), "{stdout}");
    let table = steps(&out);
    let (names, summary) = summary(&out);
    let mut groups_seen = 0;
    for (i, (name, file)) in [("PackInfer", "batches-packinfer.jsonl"), ("baseline", "batches-baseline.jsonl")].into_iter().enumerate() {
        assert_eq!(names[i], name);
        let rec = read_recording(&out.join(file));
        let h = &rec.header;
        assert_eq!(h["schedule"], name);
        assert_eq!((h["num_qo_heads"].as_i64(), h["num_kv_heads"].as_i64(), h["head_dim"].as_i64()), (Some(4), Some(2), Some(16)));
        assert_eq!((h["layers"].as_i64(), h["page_size"].as_i64(), h["requests"].as_i64()), (Some(2), Some(4), Some(rows.len() as i64)));
        assert_eq!(h["dtype"], "bf16");
        let ours: Vec<_> = table.iter().filter(|r| r["schedule"] == name).collect();
        assert_eq!(rec.steps.len(), ours.len(), "{name}: one line per step");
        let mut total = 0.0;
        let mut arrived: Vec<i64> = Vec::new();
        let mut finished: Vec<i64> = Vec::new();
        let (mut firsts, mut laters) = (0, 0);
        for (st, row) in rec.steps.iter().zip(&ours) {
            let sum = |k: &str| st[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).sum::<i64>();
            assert_eq!(st["step"].as_f64().unwrap(), num(row, "step"));
            assert_eq!(st["ids"].as_array().unwrap().len() as f64, num(row, "requests"));
            assert_eq!(sum("q") as f64, num(row, "prefill_tokens") + num(row, "decode_tokens"));
            assert_eq!(sum("kv") as f64, num(row, "kv_tokens"));
            for (key, col) in [
                ("plan_s", "plan_ms"),
                ("bind_s", "bind_ms"),
                ("kv_write_s", "kv_write_ms"),
                ("relayout_s", "relayout_ms"),
                ("attention_s", "attention_ms"),
            ] {
                assert!((st[key].as_f64().unwrap() * 1e3 - num(row, col)).abs() <= 1e-4 + 1e-9, "{name} step {}: {key}", st["step"]);
            }
            let parts: f64 = ["plan_s", "bind_s", "kv_write_s", "relayout_s", "attention_s"].iter().map(|k| st[*k].as_f64().unwrap()).sum();
            assert!((st["total_s"].as_f64().unwrap() - parts).abs() <= 1e-12 + 1e-9 * parts);
            total += parts;
            arrived.extend(st["arrived"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()));
            finished.extend(st["finished"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()));
            for e in st["emit"].as_array().unwrap() {
                match e.as_i64().unwrap() {
                    1 => firsts += 1,
                    2 => laters += 1,
                    _ => {}
                }
            }
            groups_seen += st["groups"].as_array().unwrap().len();
        }
        assert!((summary[TOTAL][i] - total).abs() <= 1e-9 * total.max(1.0), "{name}: the headline is the recorded costs' sum");
        arrived.sort_unstable();
        finished.sort_unstable();
        let all: Vec<i64> = (0..rows.len() as i64).collect();
        assert_eq!((&arrived, &finished), (&all, &all), "{name}: every request arrives and leaves once");
        assert_eq!(firsts, rows.iter().filter(|r| r.2 > 0).count(), "{name}: first tokens");
        assert_eq!(laters as u32, rows.iter().map(|r| r.2.saturating_sub(1)).sum::<u32>(), "{name}: later tokens");

        // The timeline: TTFT and TBT from the recorded step costs give the summary's
        // percentiles (the replay adds the whole cost of every step a request waited through).
        let (mut ttft, mut tbt) = (Vec::new(), Vec::new());
        let mut since: HashMap<i64, f64> = HashMap::new();
        for st in &rec.steps {
            for id in st["arrived"].as_array().unwrap() {
                since.insert(id.as_i64().unwrap(), 0.0);
            }
            let t: f64 = ["plan_s", "bind_s", "kv_write_s", "relayout_s", "attention_s"].iter().map(|k| st[*k].as_f64().unwrap()).sum();
            since.values_mut().for_each(|s| *s += t);
            for (id, e) in st["ids"].as_array().unwrap().iter().zip(st["emit"].as_array().unwrap()) {
                let id = id.as_i64().unwrap();
                match e.as_i64().unwrap() {
                    1 => ttft.push(since.insert(id, 0.0).unwrap()),
                    2 => tbt.push(since.insert(id, 0.0).unwrap()),
                    _ => {}
                }
            }
            for id in st["finished"].as_array().unwrap() {
                since.remove(&id.as_i64().unwrap());
            }
        }
        for p in [50.0, 90.0, 99.0] {
            let (a, b) = (nearest_rank(&mut ttft, p) * 1e3, summary[&format!("TTFT p{p} (ms, all costs)")][i]);
            assert!((a - b).abs() <= 1e-9 * b.max(1.0), "{name} TTFT p{p}: {a} vs {b}");
            let (a, b) = (nearest_rank(&mut tbt, p) * 1e3, summary[&format!("TBT p{p} (ms, all costs)")][i]);
            assert!((a - b).abs() <= 1e-9 * b.max(1.0), "{name} TBT p{p}: {a} vs {b}");
        }
        // Same work as the step table: the other schedule's lengths are the same.
        if i == 1 {
            let first = read_recording(&out.join("batches-packinfer.jsonl"));
            for (a, b) in first.steps.iter().zip(&rec.steps) {
                for key in ["ids", "q", "kv", "emit"] {
                    assert_eq!(a[key], b[key], "step {}: {key}", a["step"]);
                }
            }
            assert_eq!(first.tables.len(), rec.tables.len());
        }
    }
    assert!(groups_seen > 0, "the shared system prompt makes prefix groups");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn without_the_flag_no_batches_are_recorded() {
    let dir = scratch("norecord");
    let trace = write_trace(&dir, &[(0.0, 20, 3)]);
    let out = dir.join("out");
    let mut args = vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--mode", "baseline"];
    args.extend_from_slice(SMALL);
    let o = run(&args);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(!out.join("batches-baseline.jsonl").exists());
    std::fs::remove_dir_all(&dir).ok();
}
