//! The test harness of the files whose tests need a CUDA device or NVRTC (`harness = false` in
//! Cargo.toml). libtest-mimic keeps libtest's command line and output, so name filters, `--skip`,
//! `--exact`, `--list` and `--test-threads` work as with `#[test]` (several name filters too, as
//! `bench/gpu_suite.sh` passes them; see [`main`]). What it adds: a test that calls [`skipped`]
//! (its GPU or NVRTC is missing here) is reported as ignored, with the reason, instead of passing
//! without having checked anything. Whether a missing GPU or NVRTC is a failure instead
//! (`PACKINFER_REQUIRE_GPU=1`, `PACKINFER_REQUIRE_NVRTC=1`, see [`required`]) is the call of the
//! test file's helper, which then panics instead of calling [`skipped`].

use std::cell::RefCell;
use std::ffi::OsString;

use libtest_mimic::{Arguments, Completion, Trial};

thread_local! {
    /// Why the test running on this thread skipped its main check, if it did. A trial runs on
    /// one thread from start to end, so its body and its runner see the same slot.
    static SKIPPED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Marks the running test as skipped: it is reported as ignored with `reason` once it returns
/// (what it ran before returning must still pass: a panic is a failure).
pub fn skipped(reason: impl Into<String>) {
    SKIPPED.with(|s| *s.borrow_mut() = Some(reason.into()));
}

/// Whether environment variable `var` is `1`: then what it names must be there, and a test that
/// would skip fails.
pub fn required(var: &str) -> bool {
    std::env::var(var).map(|v| v == "1").unwrap_or(false)
}

/// One trial per test function, named after it.
#[macro_export]
macro_rules! trials {
    ($($test:ident),* $(,)?) => {
        vec![$($crate::harness::trial(stringify!($test), $test)),*]
    };
}
pub use crate::trials;

pub fn trial(name: &'static str, test: fn()) -> Trial {
    Trial::ignorable_test(name, move || {
        SKIPPED.with(|s| s.borrow_mut().take());
        test();
        Ok(match SKIPPED.with(|s| s.borrow_mut().take()) {
            Some(reason) => Completion::ignored_with(reason),
            None => Completion::Completed,
        })
    })
}

/// Runs the trials as libtest would (sorted by name) and exits with its status.
pub fn main(mut trials: Vec<Trial>) -> ! {
    trials.sort_by(|a, b| a.name().cmp(b.name()));
    let (args, filters) = split_filters(std::env::args_os().collect());
    if filters.len() > 1 {
        // libtest runs the tests that match any of several filters; libtest-mimic takes one, so
        // the rest are applied here (its summary then counts none as filtered out).
        let exact = args.iter().any(|a| a == "--exact");
        trials.retain(|t| filters.iter().any(|f| if exact { t.name() == f } else { t.name().contains(f.as_str()) }));
    }
    libtest_mimic::run(&Arguments::from_iter(args), trials).exit()
}

/// The command line without its name filters when there are several, and the filters.
fn split_filters(argv: Vec<OsString>) -> (Vec<OsString>, Vec<String>) {
    // libtest's options that take a value as the next argument.
    const WITH_VALUE: [&str; 6] = ["--test-threads", "--logfile", "--skip", "--color", "--format", "-Z"];
    let mut kept = Vec::new();
    let mut filters = Vec::new();
    let mut argv = argv.into_iter();
    kept.extend(argv.next()); // the program
    while let Some(a) = argv.next() {
        let s = a.to_string_lossy().into_owned();
        if s.starts_with('-') {
            let takes_value = WITH_VALUE.contains(&s.as_str());
            kept.push(a);
            if takes_value {
                kept.extend(argv.next());
            }
        } else {
            filters.push(s);
        }
    }
    if filters.len() <= 1 {
        kept.extend(filters.iter().map(OsString::from));
    }
    (kept, filters)
}
