//! The CPU backend's persistent worker threads: started once with the backend, they run every
//! phase of every run (work items, then merges), so a run starts no thread. Starting threads on
//! each run cost 10–30% of a run with merges on a loaded 2-core machine.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

/// A job's closure with its lifetime erased; see [`Workers::broadcast`] for why that is sound.
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn() + Sync));

// SAFETY: the closure is `Sync`, so calling it from several threads at once is sound; the
// pointer is only dereferenced while `broadcast` keeps the closure alive.
unsafe impl Send for JobPtr {}

struct State {
    job: Option<JobPtr>,
    /// Bumped for every job, so a worker runs each job once.
    generation: u64,
    /// Workers still running the current job.
    running: usize,
    /// A worker's job panicked: its payload, re-raised on the caller's thread.
    panic: Option<Box<dyn std::any::Any + Send>>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    start: Condvar,
    finished: Condvar,
}

/// `threads − 1` parked threads; the calling thread is the last worker of each job.
pub(super) struct Workers {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// One job at a time (runs of different launches on one backend take turns).
    turn: Mutex<()>,
}

impl Workers {
    /// Starts `threads − 1` workers (none for one thread).
    pub(super) fn new(threads: u32) -> Workers {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { job: None, generation: 0, running: 0, panic: None, shutdown: false }),
            start: Condvar::new(),
            finished: Condvar::new(),
        });
        let mut handles = Vec::new();
        for i in 1..threads.max(1) {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("packinfer-cpu-{i}")).spawn(move || worker(&shared));
            // Fewer workers than asked (the system refused a thread) still run every job.
            match spawned {
                Ok(h) => handles.push(h),
                Err(_) => break,
            }
        }
        Workers { shared, handles, turn: Mutex::new(()) }
    }

    /// Runs `f(0..n)` on the workers and the calling thread, which take indices from a shared
    /// counter; returns when every index is done.
    pub(super) fn parallel_for(&self, n: usize, f: impl Fn(usize) + Sync) {
        let next = AtomicUsize::new(0);
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
        };
        if n <= 1 || self.handles.is_empty() {
            return work();
        }
        self.broadcast(&work);
    }

    /// Runs `job` on every worker and on the calling thread, and returns once all have returned
    /// from it (re-raising a worker's panic here).
    fn broadcast(&self, job: &(dyn Fn() + Sync)) {
        let _turn = self.turn.lock();
        // SAFETY: only the lifetime is erased (same fat-pointer layout). The pointer is
        // dereferenced by workers between the publication below and their `running -= 1`, and
        // this function does not return (nor unwind: the caller's own call is caught) before
        // `running` is back to 0 and the job is withdrawn, so `job` outlives every use.
        let ptr = JobPtr(unsafe { std::mem::transmute::<*const (dyn Fn() + Sync + '_), *const (dyn Fn() + Sync + 'static)>(job) });
        {
            let mut s = self.shared.state.lock();
            s.job = Some(ptr);
            s.generation += 1;
            s.running = self.handles.len();
            self.shared.start.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(job));
        let mut s = self.shared.state.lock();
        while s.running > 0 {
            self.shared.finished.wait(&mut s);
        }
        s.job = None;
        let theirs = s.panic.take();
        drop(s);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        let job = {
            let mut s = shared.state.lock();
            while !s.shutdown && s.generation == seen {
                shared.start.wait(&mut s);
            }
            if s.shutdown {
                return;
            }
            seen = s.generation;
            s.job.expect("a job is published with its generation")
        };
        // SAFETY: `broadcast` keeps the closure alive until this worker has decremented
        // `running` below (see there).
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)() }));
        let mut s = shared.state.lock();
        if let Err(p) = result {
            s.panic.get_or_insert(p);
        }
        s.running -= 1;
        if s.running == 0 {
            shared.finished.notify_all();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.start.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_on_the_same_threads_run_after_run() {
        let w = Workers::new(4);
        let ids = Mutex::new(std::collections::HashSet::new());
        for n in [0usize, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            w.parallel_for(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                ids.lock().insert(std::thread::current().id());
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        }
        // The caller and at most 3 workers, the same ones each run: no thread per run.
        assert!(ids.lock().len() <= 4, "{}", ids.lock().len());
    }

    #[test]
    fn a_panic_in_a_job_reaches_the_caller_and_the_workers_survive_it() {
        let w = Workers::new(3);
        let r = catch_unwind(AssertUnwindSafe(|| w.parallel_for(64, |i| assert!(i != 40, "item {i}"))));
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        w.parallel_for(100, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    #[test]
    fn runs_from_several_threads_take_turns() {
        let w = Arc::new(Workers::new(2));
        let total = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (w, total) = (w.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        w.parallel_for(10, |_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 10);
    }
}
