//! The thread pool behind the artifact ABI's `parallel_for` callback.
//!
//! Generated code splits a kernel into `n` independent units and calls
//! `parallel_for(ctx, task, params, n)`; this pool runs `task(params, begin, end)` over chunks of
//! `0..n` on its workers and the calling thread, and returns when all are done. The generated code
//! carries no threading library, so the same artifact runs serially when the callback is NULL.
//!
//! A decode step makes a parallel_for call every 50-200 µs. Waking a sleeping thread costs a
//! futex round trip each time, so between calls workers spin for a short while (`SPIN`) before
//! they sleep, and the caller spins for its workers before it sleeps; condvars are signalled only
//! when someone actually sleeps.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a worker (or the waiting caller) spins before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// Spins until `ready()` or `SPIN` has passed; returns whether it became ready.
fn spin_until(ready: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() > SPIN {
            return ready();
        }
        // Let another runnable thread have this core: on a busy machine the thread we wait for
        // may be the one that needs it.
        std::thread::yield_now();
    }
}

/// `void task(const void *params, int64_t begin, int64_t end)`: `params` is opaque (the generated
/// caller's parameter block; it starts with the `EdgecCall` pointer).
pub type TaskFn = unsafe extern "C" fn(*const c_void, i64, i64);

/// The callback's C signature.
pub type ParallelForFn = unsafe extern "C" fn(*mut c_void, TaskFn, *const c_void, i64);

/// One `parallel_for` call being worked on.
struct Job {
    task: TaskFn,
    params: *const c_void,
    n: i64,
    chunk: i64,
}

// SAFETY: `params` points at the generated caller's parameter block, on its stack for the whole
// parallel_for call (which waits for every chunk).
unsafe impl Send for Job {}

struct Shared {
    /// The current job and its generation (workers run each generation once).
    job: Mutex<(u64, Option<Job>)>,
    wake: Condvar,
    /// The generation, readable without the lock (what spinning workers watch).
    generation: AtomicU64,
    /// Workers asleep on `wake`.
    sleepers: AtomicUsize,
    /// The caller is asleep on `done`.
    caller_sleeping: AtomicBool,
    /// Next unit to hand out.
    next: AtomicI64,
    /// Workers still busy with the current generation.
    busy: AtomicUsize,
    done: Condvar,
    done_lock: Mutex<()>,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises parallel_for calls (one run at a time uses the pool).
    gate: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads())
    }
}

impl Pool {
    /// A pool running work on `threads` threads in all (the caller's included).
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            job: Mutex::new((0, None)),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
            caller_sleeping: AtomicBool::new(false),
            next: AtomicI64::new(0),
            busy: AtomicUsize::new(0),
            done: Condvar::new(),
            done_lock: Mutex::new(()),
        });
        let workers = (1..threads.max(1))
            .map(|_| {
                let s = shared.clone();
                std::thread::spawn(move || worker(&s))
            })
            .collect();
        Pool { shared, workers, gate: Mutex::new(()) }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `task(params, begin, end)` over chunks covering `0..n`.
    ///
    /// # Safety
    /// `task` must be safe to call concurrently on disjoint ranges with this `params`.
    pub unsafe fn run(&self, task: TaskFn, params: *const c_void, n: i64) {
        if n <= 0 {
            return;
        }
        if self.workers.is_empty() || n == 1 {
            unsafe { task(params, 0, n) };
            return;
        }
        let _g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // A few chunks per thread balances uneven units without much hand-out traffic.
        let chunk = (n / (self.threads() as i64 * 4)).max(1);
        s.next.store(0, Ordering::SeqCst);
        s.busy.store(self.workers.len(), Ordering::SeqCst);
        {
            let mut j = s.job.lock().unwrap_or_else(|e| e.into_inner());
            j.0 += 1;
            j.1 = Some(Job { task, params, n, chunk });
            s.generation.store(j.0, Ordering::SeqCst);
        }
        // A worker that went to sleep did so under the job lock, before the job was posted.
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            s.wake.notify_all();
        }
        unsafe { work(s, task, params, n, chunk) };
        // Wait for the workers to finish their chunks: spin, then sleep.
        if !spin_until(|| s.busy.load(Ordering::SeqCst) == 0) {
            let mut g = s.done_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.caller_sleeping.store(true, Ordering::SeqCst);
            while s.busy.load(Ordering::SeqCst) != 0 {
                g = s.done.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.caller_sleeping.store(false, Ordering::SeqCst);
            drop(g);
        }
        s.job.lock().unwrap_or_else(|e| e.into_inner()).1 = None;
    }
}

/// Takes chunks until none are left.
unsafe fn work(s: &Shared, task: TaskFn, params: *const c_void, n: i64, chunk: i64) {
    loop {
        let begin = s.next.fetch_add(chunk, Ordering::SeqCst);
        if begin >= n {
            break;
        }
        unsafe { task(params, begin, (begin + chunk).min(n)) };
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // The next job usually comes within microseconds: watch for it before sleeping.
        spin_until(|| s.generation.load(Ordering::SeqCst) != seen);
        let (task, params, n, chunk) = {
            let mut j = s.job.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if j.0 == u64::MAX {
                    return;
                }
                if j.0 != seen {
                    if let Some(job) = &j.1 {
                        seen = j.0;
                        break (job.task, job.params, job.n, job.chunk);
                    }
                }
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                j = s.wake.wait(j).unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        };
        unsafe { work(s, task, params, n, chunk) };
        // The caller sets its flag under done_lock before it checks `busy` and sleeps.
        if s.busy.fetch_sub(1, Ordering::SeqCst) == 1 && s.caller_sleeping.load(Ordering::SeqCst) {
            let _g = s.done_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.done.notify_all();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.job.lock().unwrap_or_else(|e| e.into_inner()).0 = u64::MAX;
        self.shared.generation.store(u64::MAX, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The `parallel_for` callback handed to generated code; `ctx` is a `*const Pool`.
///
/// # Safety
/// `ctx` must be a live `Pool` and `task`/`params` as for [`Pool::run`].
pub unsafe extern "C" fn parallel_for(ctx: *mut c_void, task: TaskFn, params: *const c_void, n: i64) {
    // SAFETY: the runtime passes its own live pool as ctx for the duration of the run.
    let pool = unsafe { &*(ctx as *const Pool) };
    unsafe { pool.run(task, params, n) };
}
