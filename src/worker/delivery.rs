//! The delivery worker's loop: `loop { let rest = w.step(); w.rest(rest); }`.
//!
//! A step handles interrupts and reloads, then runs one turn: a short
//! transaction of named steps ([`Worker::turn`]: follow the extension, check
//! privileges, recover, record, absorb, read kinds, claim, render), and after
//! its commit, [`Worker::dispatch`] to the HTTP threads. [`Worker::rest`] is
//! the loop's one wait: for a commit, an outcome, or the next due job,
//! whichever comes first, and it ends the process if the postmaster dies.
//! No HTTP call ever runs inside a transaction.

use super::http::{self, Method, Outcome, Pool, Request};
use super::queue::{self, Failure};
use super::render::{self, Rendered};
use super::signals::{handle_interrupts, in_transaction, install_handlers, pause, reloads, report_activity, report_stats, wait};
use super::backfills::Backfills;
use super::breakers::Breakers;
use crate::rules::breaker::Allow;
use crate::rules::metrics::Tally;
use crate::rules::policy::{class, classify, error_text, retry_delay, status, Class, Response, Verdict};
use crate::rules::rate;
use crate::schema::JobState;
use crate::pg::shmem::{self, WorkerState};
use crate::pg::gucs;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

/// How often a worker whose role lacks privileges looks again.
const PRIVILEGES_RECHECK: Duration = Duration::from_secs(1);

/// Least time between the starts of two turns. Under a stream of commits
/// every commit sets the latch; pacing turns lets each one absorb and claim
/// several jobs instead of paying a transaction per job. An idle worker is
/// woken at once, so light-load latency is not affected.
const MIN_TURN_GAP: Duration = Duration::from_millis(2);

/// The gap once turns find work in numbers (at least [`BUSY_WORK`] rows):
/// [`BUSY_GAP_PER_TURN`] times the last turn's own length, within bounds, so
/// a turn's fixed cost is shared by more rows and a slow, busy machine makes
/// the worker back off rather than compete with the workload that feeds it.
/// Measurements behind these numbers: docs/benchmarks.md, "Pacing".
const BUSY_TURN_GAP: Duration = Duration::from_millis(10);
const MAX_BUSY_TURN_GAP: Duration = Duration::from_millis(50);
const BUSY_GAP_PER_TURN: u32 = 10;
/// Low enough that 2 ms turns under a few thousand commits/s reach it.
const BUSY_WORK: usize = 4;

/// What the last turn left to do at once, for the pause before the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    Nothing,
    /// Jobs due at once: a full claim, or an inbox it could not empty.
    Backlog,
    /// Backfilled jobs: it claimed some, and there may be more.
    Backfill,
}

/// The pause before the next turn, given how much the last one found (live
/// work: absorbed rows and live jobs claimed), what it left, how long it
/// took, and whether anything is being delivered. A lone commit is never
/// delayed, and a backlog (a full batch) is worked without gaps. So is a
/// backfill: its jobs come from no commit, and while live work is light a
/// commit's latch ends the wait at once. (The busy gap, ten times a turn
/// that the backfill made long, let the live changes of a few turns pile
/// up and keep it busy: live p50 19 ms in figure 7.) A busy stream that
/// leaves nothing to deliver (its kinds paused, or every change coalesced
/// into a job not due yet) waits the longest gap: no delivery is held back
/// by it.
fn turn_gap(last_work: usize, left: Left, last_turn: Duration, delivering: bool) -> Duration {
    if left == Left::Backfill && last_work < BUSY_WORK {
        return Duration::ZERO;
    }
    if last_work < BUSY_WORK || left != Left::Nothing {
        return MIN_TURN_GAP;
    }
    if !delivering {
        return MAX_BUSY_TURN_GAP;
    }
    last_turn.saturating_mul(BUSY_GAP_PER_TURN).clamp(BUSY_TURN_GAP, MAX_BUSY_TURN_GAP)
}

/// The sooner of two waits, either of which may be none.
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How long the worker may sleep when no commit or outcome wakes it: until
/// the next due job, at most the poll interval. While the inbox may hold rows
/// no commit will announce (`inbox_behind`), only until the next cursor
/// reset: rows may have gone before the cursor while the last scan ran (into
/// space that pruning or a vacuum freed), or the absorb put changes back.
fn sleep_limit(next_due: Option<Duration>, poll: Duration, inbox_behind: bool, since_reset: Duration) -> Duration {
    let limit = next_due.unwrap_or(poll).min(poll);
    if inbox_behind {
        limit.min(CURSOR_RESET.saturating_sub(since_reset))
    } else {
        limit
    }
}

/// The worker's session, whatever the database or its role sets:
/// - synchronous_commit: losing the last commits in a crash only means
///   delivering again, which at-least-once allows; not waiting for each
///   flush is much faster;
/// - the worker's statements are written for READ COMMITTED (a fresh
///   snapshot per statement, `SKIP LOCKED` over rows others just changed),
///   and must write: a serializable or read-only default would fail its
///   turns, one restart after another. At READ COMMITTED it also takes no
///   predicate locks that could fail the applications' serializable
///   transactions. Body functions run in these transactions too: they read
///   the record's latest committed state, which is what is to be sent;
/// - search_path: nothing the worker runs can be shadowed by a function or
///   operator someone created in a schema on the role's path (its SQL is
///   schema-qualified too). Body functions get the same path, and what they
///   set is undone after them (`roles::as_restricted`).
const SESSION_SETTINGS: [(&std::ffi::CStr, &std::ffi::CStr); 5] = [
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"synchronous_commit", c"off"),
    (c"application_name", c"outbox worker"),
    (c"default_transaction_isolation", c"read committed"),
    (c"default_transaction_read_only", c"off"),
];

/// The `outbox-sequence` of a turn's deliveries: the wall clock in µs, and
/// more than the last turn's. It grows with every delivery of a record,
/// across worker restarts and failovers alike, as long as the clock does not
/// step back further than a restart takes. The claim's transaction id would
/// not: the worker commits without waiting for the flush, so after a crash
/// (or on a standby promoted) ids are handed out again, and a receiver
/// would drop the newer state as stale.
fn next_sequence(last: &mut i64) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    *last = now.max(*last + 1);
    *last
}

/// What a worker that waits for another to exit shows in pg_stat_activity,
/// and how often it looks whether that one has.
const WAITING_FOR_OTHER: &std::ffi::CStr = c"waiting for the other outbox worker to exit";
const OTHER_WORKER_RECHECK: Duration = Duration::from_millis(100);

/// How long to wait when a due job is locked by an open transaction.
const LOCKED_BACKOFF: Duration = Duration::from_millis(100);

/// How often claim and absorb scans start from the front again (see
/// `queue::CLAIM` and `queue::ABSORB_INBOX`), and the kinds are read again
/// even if no commit said they changed (an admin's direct UPDATE, or COMMIT
/// PREPARED, which runs no callback of ours).
const CURSOR_RESET: Duration = Duration::from_secs(1);

/// A turn claims at most this many backfilled jobs of a kind: a live change
/// that commits during a turn waits for its end, so a backfill keeps turns
/// short.
const BACKFILLED_PER_TURN: usize = 64;

/// How many strikes more a kind whose render the watchdog had to end
/// starts with than one that ran out of time: benched from 16-32 s at the
/// default `outbox.retry_base`, since each time costs a worker restart.
const STUCK_EXTRA_STRIKES: u32 = 5;

/// A job handed to the HTTP threads, until its outcome is recorded.
struct InFlight {
    kind: String,
    /// The record's id, for `outbox.attempts`.
    id: String,
    ctid: String,
    /// Holds the record back from claims while in flight (`queue::CLAIM`).
    key_hash: i64,
    attempts: i32,
    max_attempts: i32,
    is_delete: bool,
    /// When the change was made (µs since the Unix epoch).
    enqueued_us: i64,
}

/// A finished attempt waiting to be written down.
struct Finished {
    job: InFlight,
    job_id: i64,
    claim: i64,
    response: Response,
    retry_after: Option<Duration>,
    detail: Option<String>,
    /// Seconds from the change to this outcome; None when no request went
    /// out (a skip, a body that failed).
    latency: Option<f64>,
    /// How long the request took, when one went out.
    took: Option<Duration>,
}

/// Seconds from `enqueued_us` (µs since the Unix epoch) to now.
fn seconds_since(enqueued_us: i64) -> f64 {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    now.as_secs_f64() - enqueued_us as f64 / 1e6
}

enum Turn {
    /// The database has no extension (any more): the worker exits.
    NoExtension,
    /// The worker's role lacks privileges on the extension's tables.
    NoPrivileges,
    Worked { requests: Vec<(Request, InFlight)>, next_due: Option<Duration> },
}

/// How the worker rests between two steps: it shows `state` and `activity`,
/// starts no turn sooner than `pace` after the last one started, and waits
/// for its latch (a commit), an outcome (if `outcomes`), or `timeout`.
struct Rest {
    state: WorkerState,
    activity: &'static std::ffi::CStr,
    pace: Duration,
    timeout: Duration,
    outcomes: bool,
}

impl Rest {
    /// Waiting for something other than work: a commit or the timeout.
    fn idle(state: WorkerState, activity: &'static std::ffi::CStr, timeout: Duration) -> Self {
        Rest { state, activity, pace: Duration::ZERO, timeout, outcomes: false }
    }
}

/// Where the worker stands with the database it serves, from one turn to
/// the next. Each turn starts by moving it on, and only [`Phase::Serving`]
/// records, absorbs and claims.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Installed, and the worker's role not yet found to have what it needs
    /// on the extension's tables: never checked (None), or lacking this
    /// (said once).
    Unchecked(Option<String>),
    /// Privileges fine; the jobs a previous worker left running are not
    /// pending again yet.
    Recovering,
    Serving,
}

struct Worker {
    pool: Pool,
    /// The name of the database, for the log.
    database: String,
    /// The extension was found here: if it goes, the log says so.
    found_extension: bool,
    phase: Phase,
    /// By (job_id, claim): a job id may come again (`TRUNCATE ... RESTART
    /// IDENTITY`) while an older claim of it is still out.
    in_flight: HashMap<(i64, i64), InFlight>,
    finished: Vec<Finished>,
    cursors: queue::Cursors,
    /// Where the next absorb starts in the inbox.
    inbox: queue::InboxCursor,
    cursors_reset_at: Instant,
    /// Rows absorbed and live jobs claimed by the last turn: what paces
    /// turns (see [`turn_gap`]). Backfilled jobs come from no commit, and
    /// a pause for them would hold up the live changes that come meanwhile.
    last_work: usize,
    /// The last turn left work that was due at once.
    more_due: bool,
    /// The last turn claimed backfilled jobs (see [`turn_gap`]).
    backfilling: bool,
    /// The last absorb stopped at its limit: the inbox has more.
    inbox_backlog: bool,
    /// The `outbox-sequence` of the last turn that claimed.
    last_sequence: i64,
    /// The last absorb put changes back into the inbox (their job was held
    /// by another transaction): look again within a cursor reset.
    inbox_left: bool,
    /// When the last turn started, and how long its transaction took.
    turn_started: Instant,
    last_turn_time: Duration,
    /// The extension and its schema, as the last turn found them.
    extension: Option<(pg_sys::Oid, pg_sys::Oid)>,
    /// The kinds as last read, and the kinds generation they were read at
    /// (None: read them again).
    kinds: HashMap<String, render::Kind>,
    kinds_generation: Option<u64>,
    /// `outbox.ca_file` as the HTTP threads last took it.
    ca_file: Option<String>,
    /// Configuration reloads handled so far.
    reloads_seen: u64,
    /// Kinds whose bodies last ran out of their render_timeout: not claimed
    /// until the instant, so one blocked kind stalls the others' turns once
    /// per back-off, not every turn. With how often it happened in a row.
    benched: HashMap<String, (Instant, u32)>,
    /// The token buckets of the kinds with a `rate_limit`.
    buckets: HashMap<String, rate::Bucket>,
    /// The kinds' circuit breakers.
    breakers: Breakers,
    /// The running backfills.
    backfills: Backfills,
    /// The kind a previous worker got stuck rendering (its hash), and how
    /// many times in a row: benched once the kinds are read.
    stuck: Option<(u64, u32)>,
}

/// The roots HTTPS receivers are checked against, with what `ca_file` adds
/// logged (a misconfigured file is the first thing to rule out when TLS fails).
fn trusted_roots(ca_file: Option<&str>) -> Result<rustls::RootCertStore, String> {
    let roots = http::trust_roots(ca_file)?;
    if let Some(path) = ca_file {
        let added = roots.len() - http::mozilla_roots().len();
        log!("outbox worker: HTTPS trusts the Mozilla roots and {added} certificate authorities from {path}");
    }
    Ok(roots)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_worker_main(arg: pg_sys::Datum) {
    install_handlers();
    let (db, role) = super::launcher::worker_connection(arg);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), (role != pg_sys::InvalidOid).then_some(role));
    // SAFETY: registering a plain function for process exit. On shared
    // memory exit, not before it: the slot is freed for a waiting worker only
    // after this one's transaction was aborted and its locks released.
    unsafe { pg_sys::on_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    // SAFETY: setting GUCs on the main thread, outside a transaction, over
    // what the database's and role's settings said. Before the first
    // transaction, which a serializable default would fail on a standby.
    unsafe {
        for (name, value) in SESSION_SETTINGS {
            pg_sys::SetConfigOption(name.as_ptr(), value.as_ptr(), pg_sys::GucContext::PGC_USERSET, pg_sys::GucSource::PGC_S_SESSION);
        }
    }
    // SAFETY: a plain read of this worker's database, which can't be
    // dropped while we are connected (DROP DATABASE waits for us).
    let here = unsafe { pg_sys::MyDatabaseId };
    let database = in_transaction(|| crate::pg::syscache::database_name(here).unwrap_or_default());
    let mut said_waiting = false;
    // One worker per database at a time, before any statement: two would
    // both claim jobs, send a record twice at once, and answer each other's
    // claims.
    loop {
        match shmem::claim_worker() {
            shmem::Claim::Serving => break,
            shmem::Claim::Held(pid) => {
                report_activity(false, WAITING_FOR_OTHER);
                if !said_waiting {
                    log!("outbox worker: another worker (pid {pid}) still serves database \"{database}\"; waiting for it to exit");
                }
                said_waiting = true;
                handle_interrupts();
                wait(None, OTHER_WORKER_RECHECK);
            }
            shmem::Claim::NoSlot => {
                log!("outbox worker: the launcher has no slot for database \"{database}\" any more; exiting");
                return;
            }
        }
    }
    // Most databases a worker looks at have no extension: it leaves before
    // starting any thread.
    if in_transaction(|| lock_extension(None)).is_none() {
        not_installed(&database, false);
    }
    let concurrency = gucs::CONCURRENCY.get().max(1) as usize;
    let ca_file = gucs::ca_file();
    let roots = trusted_roots(ca_file.as_deref()).unwrap_or_else(|e| {
        warning!("outbox.ca_file: {e}; HTTPS receivers are checked against the Mozilla roots only");
        http::mozilla_roots()
    });
    let threads = gucs::HTTP_THREADS.get().max(1) as usize;
    let pool = with_signals_blocked(|| Pool::start(concurrency, threads, roots)).unwrap_or_else(|e| panic!("starting the HTTP threads: {e}"));
    with_signals_blocked(super::watchdog::start).unwrap_or_else(|e| panic!("starting the watchdog: {e}"));
    let mut w = Worker {
        pool,
        database,
        found_extension: false,
        in_flight: HashMap::new(),
        finished: Vec::new(),
        phase: Phase::Unchecked(None),
        cursors: queue::Cursors::new(),
        inbox: queue::InboxCursor::default(),
        cursors_reset_at: Instant::now(),
        last_work: 0,
        backfilling: false,
        more_due: false,
        inbox_backlog: true,
        inbox_left: false,
        last_sequence: 0,
        turn_started: Instant::now(),
        last_turn_time: Duration::ZERO,
        extension: None,
        kinds: HashMap::new(),
        kinds_generation: None,
        ca_file,
        reloads_seen: reloads(),
        benched: HashMap::new(),
        buckets: HashMap::new(),
        breakers: Breakers::default(),
        backfills: Backfills::default(),
        stuck: shmem::take_stuck_kind(),
    };
    loop {
        let rest = w.step();
        w.rest(rest);
    }
}

unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    if super::watchdog::fired() {
        shmem::mark_stuck();
    }
    shmem::release_worker();
}

/// Without the extension, the worker exits, and marks its slot so that
/// the launcher starts none here until the extension is created. Said at
/// LOG level when the database was named by `outbox.database` or the
/// extension was there before, and quietly when the worker was only looking.
fn not_installed(database: &str, found_before: bool) -> ! {
    let what = format!("outbox worker: extension \"outbox\" is not installed in database \"{database}\"; the worker exits until CREATE EXTENSION outbox");
    if found_before || gucs::database().is_some() {
        log!("{what}");
    } else {
        debug1!("{what}");
    }
    shmem::set_state(WorkerState::NotInstalled);
    exit_now()
}

/// Ends the process through Postgres' exit callbacks, with code 0: not
/// restarted. (`proc_exit` is declared diverging on some versions only.)
#[allow(unreachable_code)]
fn exit_now() -> ! {
    // SAFETY: called outside any transaction, on the main thread.
    unsafe { pg_sys::proc_exit(0) };
    unreachable!("proc_exit returned")
}

/// Runs `f` with every signal blocked, so threads it spawns inherit the mask
/// and Postgres' handlers only ever run on the main thread.
fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: sigset_t is plain data; pthread_sigmask only touches this thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

impl Worker {
    /// After a reload: a changed `outbox.ca_file`, or a file that is set and
    /// may have new contents, goes to the HTTP threads for new connections. A
    /// file that can't be used leaves the roots in use as they are.
    fn reload_trust(&mut self) {
        let ca_file = gucs::ca_file();
        if ca_file.is_none() && self.ca_file.is_none() {
            return;
        }
        match trusted_roots(ca_file.as_deref()) {
            Ok(roots) => {
                self.pool.trust(roots);
                self.ca_file = ca_file;
            }
            Err(e) => warning!("outbox.ca_file: {e}; the certificate authorities in use are kept"),
        }
    }

    /// One step of the loop: interrupts and reloads, then a turn and the
    /// dispatch of what it rendered, unless the server is a standby.
    fn step(&mut self) -> Rest {
        handle_interrupts();
        if reloads() != self.reloads_seen {
            self.reloads_seen = reloads();
            self.reload_trust();
        }
        // SAFETY: a plain query of shared recovery state.
        if unsafe { pg_sys::RecoveryInProgress() } {
            let timeout = gucs::poll_interval().min(Duration::from_secs(1));
            return Rest::idle(WorkerState::Standby, c"standby: not delivering", timeout);
        }
        self.turn_started = Instant::now();
        self.collect_outcomes();
        report_activity(true, c"claiming");
        // Read before the turn's snapshot: a change that bumped it after
        // that snapshot is then seen by the next turn.
        let kinds_generation = shmem::kinds_generation();
        let turn = in_transaction(|| self.turn(kinds_generation));
        self.last_turn_time = self.turn_started.elapsed();
        report_stats();
        match turn {
            Turn::NoPrivileges => Rest::idle(
                WorkerState::WaitingForPrivileges,
                c"waiting for privileges on the outbox tables",
                PRIVILEGES_RECHECK,
            ),
            Turn::NoExtension => not_installed(&self.database, self.found_extension),
            Turn::Worked { requests, next_due } => {
                self.more_due = next_due == Some(Duration::ZERO);
                self.dispatch(requests);
                // Jobs just dispatched, or earlier ones whose outcomes are
                // not collected yet, are in flight.
                let delivering = !self.in_flight.is_empty();
                Rest {
                    state: if delivering { WorkerState::Delivering } else { WorkerState::Idle },
                    activity: c"waiting",
                    pace: turn_gap(self.last_work, self.left(), self.last_turn_time, delivering),
                    timeout: self.sleep_limit(next_due),
                    outcomes: true,
                }
            }
        }
    }

    fn left(&self) -> Left {
        if self.backfilling {
            Left::Backfill
        } else if self.more_due {
            Left::Backlog
        } else {
            Left::Nothing
        }
    }

    /// The loop's one wait. The pace is kept first, with the latch left set,
    /// so a commit during it still ends the wait that follows; both end the
    /// process if the postmaster dies.
    fn rest(&mut self, rest: Rest) {
        shmem::set_state(rest.state);
        report_activity(false, rest.activity);
        let rested = self.turn_started.elapsed();
        if let Some(left) = rest.pace.checked_sub(rested).filter(|d| !d.is_zero()) {
            pause(left);
        }
        let timeout = rest.timeout.saturating_sub(self.turn_started.elapsed().saturating_sub(rested));
        if rest.outcomes {
            if !timeout.is_zero() && self.pool.arm() {
                wait(Some(self.pool.wake_fd()), timeout);
            }
        } else {
            wait(None, timeout);
        }
    }

    /// Hands the rendered requests to the HTTP threads, after the turn that
    /// claimed them committed.
    fn dispatch(&mut self, requests: Vec<(Request, InFlight)>) {
        let claimed_any = !requests.is_empty();
        for (request, job) in requests {
            self.in_flight.insert((request.job_id, request.claim), job);
            self.pool.submit(request);
        }
        if claimed_any {
            shmem::mark_batch();
        }
        shmem::set_in_flight(self.in_flight.len());
    }

    fn sleep_limit(&self, next_due: Option<Duration>) -> Duration {
        let behind = self.inbox.block > 0 || self.inbox_left;
        sleep_limit(next_due, gucs::poll_interval(), behind, self.cursors_reset_at.elapsed())
    }

    /// Moves outcomes reported by the HTTP threads into `finished`, and
    /// feeds them to the kinds' breakers.
    fn collect_outcomes(&mut self) {
        let settings = gucs::breaker();
        for Outcome { job_id, claim, response, retry_after, detail, took } in self.pool.drain() {
            if let Some(job) = self.in_flight.remove(&(job_id, claim)) {
                self.breakers.outcome(&job.kind, (job_id, claim), response, detail.as_deref(), retry_after, &settings);
                let latency = Some(seconds_since(job.enqueued_us));
                self.finished.push(Finished { job, job_id, claim, response, retry_after, detail, latency, took: Some(took) });
            }
        }
    }

    /// One transaction of named steps: follow the extension, check
    /// privileges, recover, record, absorb, read kinds, backfill, claim,
    /// render.
    fn turn(&mut self, kinds_generation: Option<u64>) -> Turn {
        self.backfilling = false;
        if !self.follow_extension() {
            return Turn::NoExtension;
        }
        Spi::connect_mut(|c| {
            if !self.check_privileges(c) {
                return Turn::NoPrivileges;
            }
            self.recover(c);
            record(c, std::mem::take(&mut self.finished));
            let batch = gucs::BATCH_SIZE.get().max(1) as usize;
            let inbox_full = self.absorb(c, batch);
            self.read_kinds(c, kinds_generation);
            let backfilling = self.backfills.step(c).then_some(Duration::ZERO);
            let now = Instant::now();
            let limit = gucs::CONCURRENCY.get().max(1) as usize + batch;
            let room = limit.saturating_sub(self.in_flight.len()).min(batch);
            let (active, rate_wait) = self.active_kinds(now, room);
            // A benched kind is looked at again when its time is up, and one
            // held back by its rate when it may go on.
            let bench_ends = self.benched.values().map(|b| b.0).filter(|&until| until > now).min().map(|until| until - now);
            let held_ends = earliest(bench_ends, rate_wait);
            // No room in flight, or every kind paused or at its limit (the
            // outcomes wake us): nothing to claim.
            if room == 0 || active.is_empty() {
                self.breakers.write(c);
                let next_due = if inbox_full { Some(Duration::ZERO) } else { held_ends };
                return Turn::Worked { requests: Vec::new(), next_due: earliest(next_due, backfilling) };
            }
            // Every job in flight is `running`: none was recorded yet.
            let busy: queue::InFlightKeys = self.in_flight.values().map(|j| j.key_hash).collect();
            let (claimed, more) = self.claim(c, &active, room, &busy);
            let (requests, done_now) = self.render(&claimed);
            for (request, job) in &requests {
                self.breakers.sent(&job.kind, (request.job_id, request.claim), now);
            }
            self.breakers.write(c);
            record(c, done_now);
            // A full batch means more is probably due: come straight back.
            let next_due = if more || inbox_full {
                Some(Duration::ZERO)
            } else if !requests.is_empty() {
                // Their outcomes wake us, and that turn looks again.
                None
            } else {
                let active = active.into_iter().map(|(kind, _)| kind).collect();
                queue::next_due_ms(c, active, &busy, self.backfilled_limit() > 0).map(|ms| match ms {
                    // Due, yet nothing could be claimed: the job is locked by
                    // a transaction that enqueued it again. Its commit wakes
                    // us; until then, don't spin.
                    0 if claimed.is_empty() => LOCKED_BACKOFF,
                    ms => Duration::from_millis(ms as u64),
                })
            };
            let next_due = earliest(earliest(next_due, held_ends), backfilling);
            Turn::Worked { requests, next_due }
        })
    }

    /// Step: whether the extension is installed (held until the turn ends).
    /// Without it, the worker exits ([`not_installed`]).
    fn follow_extension(&mut self) -> bool {
        let extension = lock_extension(self.extension);
        if extension != self.extension {
            // Gone, or created anew: nothing cached belongs to it, and the
            // outcomes not yet recorded belonged to the one before. Requests
            // still in flight stay counted, so that their records are not
            // sent again alongside them; their outcomes name claims no job
            // of the new tables has, and change nothing.
            self.extension = extension;
            self.kinds_generation = None;
            self.finished.clear();
            self.breakers.clear();
            super::plans::forget();
            if extension.is_some() {
                self.phase = Phase::Unchecked(None);
                if !self.found_extension {
                    log!(
                        "outbox worker started for database \"{}\" with up to {} requests in flight from {} HTTP thread(s)",
                        self.database,
                        gucs::CONCURRENCY.get().max(1),
                        self.pool.threads()
                    );
                }
            }
        }
        self.found_extension |= extension.is_some();
        extension.is_some()
    }

    /// Step: whether the worker's role has what it needs on the tables. A
    /// role without it would fail every turn, one restart after another: say
    /// once what to grant, and wait for it. Checked when the extension is
    /// found; a REVOKE after that fails a turn, and the next worker waits here.
    fn check_privileges(&mut self, c: &mut SpiClient<'_>) -> bool {
        let Phase::Unchecked(said) = &self.phase else { return true };
        let lacking = c
            .select(queue::MISSING_PRIVILEGES, None, &[])
            .and_then(|t| t.first().get_one::<String>())
            .unwrap_or_else(|e| panic!("checking privileges: {e}"));
        match lacking {
            Some(what) => {
                if said.as_ref() != Some(&what) {
                    log!("outbox worker: its role may not {what}; waiting until that is granted (see the README's Security section)");
                    self.phase = Phase::Unchecked(Some(what));
                }
                false
            }
            None => {
                if said.is_some() {
                    log!("outbox worker: its role has the privileges it needs; delivering");
                }
                self.phase = Phase::Recovering;
                true
            }
        }
    }

    /// Step: jobs a previous worker left running are pending again, once.
    fn recover(&mut self, c: &mut SpiClient<'_>) {
        if self.phase != Phase::Recovering {
            return;
        }
        let n = c.update(queue::RECOVER_RUNNING, None, &[]).map(|t| t.len()).unwrap_or_else(|e| panic!("recover: {e}"));
        if n > 0 {
            log!("outbox worker: {n} job(s) left running by a previous worker are pending again");
        }
        c.update(queue::DEAD_LETTER_ORPHANS, None, &[]).unwrap_or_else(|e| panic!("orphans: {e}"));
        self.breakers.restore(c);
        self.phase = Phase::Serving;
    }

    /// Step: moves inbox rows into the queue, coalescing them. The inbox is
    /// read when a commit said it appended, while a backlog is left, and
    /// every CURSOR_RESET in case a mark was missed (a prepared transaction,
    /// a worker restart). Returns whether the absorb stopped at its limit.
    fn absorb(&mut self, c: &mut SpiClient<'_>, batch: usize) -> bool {
        // More than a batch: the inbox holds raw changes, many of which
        // coalesce, and an empty inbox keeps the jobs view exact.
        let absorb_limit = (batch * 16) as i64;
        let mut absorb = shmem::take_inbox_dirty() || self.inbox_backlog;
        if self.cursors_reset_at.elapsed() >= CURSOR_RESET {
            self.cursors.clear();
            self.inbox.block = 0;
            self.cursors_reset_at = Instant::now();
            self.kinds_generation = None;
            absorb = true;
        }
        let absorbed = if absorb { queue::absorb_inbox(c, absorb_limit, &mut self.inbox, super::quarantine::absorb_one_by_one) } else { queue::Absorbed::default() };
        let inbox_full = absorbed.moved >= absorb_limit;
        self.inbox_backlog = inbox_full;
        if absorb {
            self.inbox_left = absorbed.left > 0;
        }
        self.last_work = absorbed.moved as usize;
        inbox_full
    }

    /// Step: the kinds, read again when a change to them was announced (or
    /// can't be told), and the kind a previous worker got stuck on benched.
    fn read_kinds(&mut self, c: &mut SpiClient<'_>, kinds_generation: Option<u64>) {
        if kinds_generation.is_none() || self.kinds_generation != kinds_generation {
            self.kinds = render::load_kinds(c);
            self.kinds_generation = kinds_generation;
            self.backfills.forget();
        }
        if let Some((hash, times)) = self.stuck.take() {
            let stuck: Vec<String> = self.kinds.keys().filter(|k| super::watchdog::kind_hash(k) == hash).cloned().collect();
            for kind in stuck {
                warning!("outbox worker: the last worker was stopped while rendering kind \"{kind}\", whose bodies ignored their cancel");
                // Each time costs a worker: bench it longer than a slow kind.
                bench_kind(&mut self.benched, &kind, times + STUCK_EXTRA_STRIKES);
            }
        }
    }

    /// The kinds to claim for: neither paused nor benched, nor with as many
    /// requests in flight as their `max_in_flight` allows, nor out of their
    /// `rate_limit`, nor with an open breaker whose probe is not due (one
    /// job when it is); with how many more each may have (at most `room`).
    /// And how soon a kind held back by its rate or breaker may go on.
    fn active_kinds(&mut self, now: Instant, room: usize) -> (Vec<(String, i64)>, Option<Duration>) {
        let kinds = &self.kinds;
        self.benched.retain(|name, _| kinds.contains_key(name));
        self.buckets.retain(|name, _| kinds.get(name).is_some_and(|k| k.rate_limit.is_some()));
        self.breakers.retain(|name| kinds.contains_key(name));
        let benched = |name: &str| self.benched.get(name).is_some_and(|b| b.0 > now);
        let mut in_flight: HashMap<&str, usize> = HashMap::new();
        for job in self.in_flight.values() {
            *in_flight.entry(job.kind.as_str()).or_default() += 1;
        }
        let mut rate_wait: Option<Duration> = None;
        let mut active = Vec::new();
        for (name, kind) in kinds.iter().filter(|(n, k)| !k.paused && !benched(n)) {
            let mut left = kind.max_in_flight.map_or(room, |max| max.saturating_sub(in_flight.get(name.as_str()).copied().unwrap_or(0)));
            match self.breakers.allows(name, now) {
                Allow::All => {}
                Allow::Probe => left = left.min(1),
                Allow::Until(at) => {
                    rate_wait = earliest(rate_wait, Some(at - now));
                    continue;
                }
                Allow::None => continue,
            }
            if let Some(rate) = kind.rate_limit {
                let bucket = self.buckets.entry(name.clone()).or_insert_with(|| rate::Bucket::new(rate, now));
                let tokens = bucket.available(rate, now);
                if tokens == 0 {
                    rate_wait = earliest(rate_wait, Some(bucket.wait_for_one(rate)));
                }
                left = left.min(tokens);
            }
            if left > 0 {
                active.push((name.clone(), left.min(room) as i64));
            }
        }
        (active, rate_wait)
    }

    /// Step: claims up to `room` due jobs, none of a record in flight, and
    /// of a kind's backfilled ones up to [`BACKFILLED_PER_TURN`], and only
    /// while fewer than two rounds of `outbox.concurrency` are in flight: a
    /// live request then waits in the HTTP threads' queue behind at most
    /// one round of them. Says whether more are probably due: the claim was
    /// full, or a backfill had more.
    fn claim(
        &mut self,
        c: &mut SpiClient<'_>,
        active: &[(String, i64)],
        room: usize,
        busy: &queue::InFlightKeys,
    ) -> (Vec<queue::Claimed>, bool) {
        let backfilled_limit = self.backfilled_limit();
        let mut claimed = queue::claim(c, active, &mut self.cursors, room as i64, backfilled_limit as i64, busy);
        // Sent in this order: live ones first.
        claimed.sort_by_key(|j| j.backfilled);
        let mut backfilled: HashMap<&str, usize> = HashMap::new();
        for job in &claimed {
            if let Some(bucket) = self.buckets.get_mut(&job.kind) {
                bucket.take(1);
            }
            if job.backfilled {
                *backfilled.entry(job.kind.as_str()).or_default() += 1;
            }
        }
        self.last_work += claimed.len() - backfilled.values().sum::<usize>();
        self.backfilling = !backfilled.is_empty();
        // Backfilled ones stopped by the requests in flight wait for their
        // outcomes, which wake us.
        let more = claimed.len() >= room || backfilled.values().any(|&n| n >= BACKFILLED_PER_TURN);
        (claimed, more)
    }

    /// How many backfilled jobs of a kind the next claim may take.
    fn backfilled_limit(&self) -> usize {
        let free = (2 * gucs::CONCURRENCY.get().max(1) as usize).saturating_sub(self.in_flight.len());
        BACKFILLED_PER_TURN.min(free)
    }

    /// Step: renders the claimed jobs into requests, and what needs no
    /// request (a skip, a body that failed) into finished attempts.
    fn render(&mut self, claimed: &[queue::Claimed]) -> (Vec<(Request, InFlight)>, Vec<Finished>) {
        let max_response = gucs::MAX_RESPONSE_BYTES.get().max(0) as usize;
        let max_body = i64::from(gucs::MAX_BODY_BYTES.get().max(0));
        let sequence = next_sequence(&mut self.last_sequence);
        let kinds = &self.kinds;
        let (rendered, slow_kinds) = render::render(kinds, claimed, sequence, max_body, max_response);
        bench(&mut self.benched, claimed, &slow_kinds);
        let mut requests = Vec::new();
        let mut done_now = Vec::new();
        for (job, r) in claimed.iter().zip(rendered) {
            let kind = kinds.get(&job.kind);
            let max_attempts = kind.map_or(1, |k| k.max_attempts);
            let info = |is_delete| InFlight {
                kind: job.kind.clone(),
                id: job.id.clone(),
                ctid: job.ctid.clone(),
                key_hash: job.key_hash,
                attempts: job.attempts,
                max_attempts,
                is_delete,
                enqueued_us: job.enqueued_us,
            };
            match r {
                Rendered::Send(req) => {
                    let is_delete = req.method == Method::Delete;
                    requests.push((req, info(is_delete)));
                }
                Rendered::Skip => done_now.push(Finished {
                    job: info(false),
                    job_id: job.job_id,
                    claim: job.claim,
                    response: Response::Status(204),
                    retry_after: None,
                    detail: None,
                    latency: None,
                    took: None,
                }),
                Rendered::Broken(e) => done_now.push(Finished {
                    job: InFlight { max_attempts: if kind.is_none() { 1 } else { max_attempts }, ..info(false) },
                    job_id: job.job_id,
                    claim: job.claim,
                    response: Response::BuildError,
                    retry_after: None,
                    detail: Some(e),
                    latency: None,
                    took: None,
                }),
            }
        }
        (requests, done_now)
    }
}

/// Benches the kinds whose bodies ran out of time, for the retry back-off of
/// how many turns in a row they did; a kind rendered in time is off the
/// bench.
fn bench(benched: &mut HashMap<String, (Instant, u32)>, claimed: &[queue::Claimed], slow_kinds: &[String]) {
    for job in claimed {
        if !slow_kinds.contains(&job.kind) {
            benched.remove(&job.kind);
        }
    }
    for kind in slow_kinds {
        let strikes = benched.get(kind).map_or(0, |b| b.1) + 1;
        bench_kind(benched, kind, strikes);
    }
}

/// Benches `kind` for the retry back-off of its `strikes`-th time.
fn bench_kind(benched: &mut HashMap<String, (Instant, u32)>, kind: &str, strikes: u32) {
    let pause = retry_delay(strikes, None, gucs::retry_base(), gucs::retry_max(), rand::random::<f64>());
    warning!("outbox worker: bodies of kind \"{kind}\" ran out of their render_timeout; not claiming the kind for {} ms", pause.as_millis());
    benched.insert(kind.to_string(), (Instant::now() + pause, strikes));
}

/// The extension's oid and its schema's, if it is installed; if so, it stays
/// installed until this transaction ends: we hold a share lock on it, which
/// DROP EXTENSION waits for, so a drop can't pull the tables from under a
/// turn. `known` is what the last turn found: if the extension still has the
/// schema it had then, it is the same extension, and the scan of
/// pg_extension (which has no syscache) is skipped.
fn lock_extension(known: Option<(pg_sys::Oid, pg_sys::Oid)>) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
    // SAFETY: catalog lookups and a lock inside a transaction. Taking the
    // lock processes invalidations, so the lookups after it see a drop that
    // committed while we waited; DROP EXTENSION drops the schema with it.
    unsafe {
        if let Some((ext, schema)) = known {
            pg_sys::LockDatabaseObject(pg_sys::ExtensionRelationId, ext, 0, lock);
            if pg_sys::get_namespace_oid(c"outbox".as_ptr(), true) == schema {
                return known;
            }
        }
        let ext = pg_sys::get_extension_oid(c"outbox".as_ptr(), true);
        if ext == pg_sys::InvalidOid {
            return None;
        }
        pg_sys::LockDatabaseObject(pg_sys::ExtensionRelationId, ext, 0, lock);
        if pg_sys::get_extension_oid(c"outbox".as_ptr(), true) != ext {
            return None;
        }
        Some((ext, pg_sys::get_namespace_oid(c"outbox".as_ptr(), true)))
    }
}

/// Writes finished attempts down: deletes the delivered, reschedules or
/// buries the failed, and adds them up in the per-kind counters. Batched.
fn record(c: &mut SpiClient<'_>, finished: Vec<Finished>) {
    if finished.is_empty() {
        return;
    }
    let base = gucs::retry_base();
    let max = gucs::retry_max();
    let mut delivered = Vec::new();
    let mut failures = Vec::new();
    let mut tallies: HashMap<String, Tally> = HashMap::new();
    let kept = gucs::ATTEMPTS_KEPT.get().max(0) as i64;
    let mut attempts = Vec::new();
    for f in finished {
        let class = class(f.job.is_delete, f.response);
        let status = status(f.response);
        tallies.entry(f.job.kind.clone()).or_default().add(class, f.latency);
        // An attempt is a request, or a body or URL that could not be made
        // (not a skip of a record gone).
        if kept > 0 && (f.took.is_some() || f.response == Response::BuildError) {
            attempts.push(queue::Attempt {
                kind: f.job.kind.clone(),
                id: f.job.id.clone(),
                job_id: f.job_id,
                attempt: f.job.attempts,
                method: if f.job.is_delete { "DELETE" } else { "PUT" },
                outcome: class.name(),
                status,
                duration_ms: f.took.map(|d| d.as_secs_f64() * 1000.0),
                error: error_text(f.response, f.detail.as_deref()).filter(|_| class != Class::Delivered),
            });
        }
        match classify(f.job.is_delete, f.response) {
            Verdict::Success => delivered.push(queue::Delivered { job_id: f.job_id, claim: f.claim, ctid: f.job.ctid }),
            verdict @ (Verdict::Retry | Verdict::Permanent) => {
                let give_up = verdict == Verdict::Permanent || f.job.attempts >= f.job.max_attempts;
                let delay = retry_delay(f.job.attempts.max(1) as u32, f.retry_after, base, max, rand::random::<f64>());
                failures.push(Failure {
                    job_id: f.job_id,
                    claim: f.claim,
                    state: if give_up { JobState::Dead } else { JobState::Pending },
                    delay_ms: if give_up { 0 } else { delay.as_millis() as i64 },
                    status,
                    error: error_text(f.response, f.detail.as_deref()),
                });
            }
        }
    }
    queue::complete(c, delivered);
    queue::fail(c, failures);
    queue::bump_stats(c, tallies.into_iter().collect());
    if !attempts.is_empty() {
        keep_attempts(c, attempts, kept);
    }
}

thread_local! {
    /// Keeping attempts failed, and the log said so: it says so again only
    /// once it worked in between.
    static ATTEMPTS_REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Adds attempts to `outbox.attempts`. Optional: without the table (a
/// database on 0.2.0) nothing, and a failure (the worker's role may not
/// write it) costs the attempts, never the turn.
fn keep_attempts(c: &mut SpiClient<'_>, attempts: Vec<queue::Attempt>, kept: i64) {
    if !crate::schema::at_0_3() {
        return;
    }
    // Never waiting long on a lock an admin holds on kept attempts.
    let kept_them = crate::pg::subxact::try_subtransaction(std::panic::AssertUnwindSafe(|| {
        crate::pg::settings::with_settings(&[(c"lock_timeout", c"100ms")], || queue::record_attempts(c, attempts, kept))
    }));
    match kept_them {
        Ok(()) => ATTEMPTS_REFUSED.set(false),
        Err(e) => {
            if !ATTEMPTS_REFUSED.replace(true) {
                warning!("outbox worker: keeping attempts in outbox.attempts failed: {} (SQLSTATE {})", e.message, e.sqlstate);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_spaced_by_their_own_length_only_while_busy() {
        let ms = Duration::from_millis;
        // Little work, or a backlog: the shortest gap.
        assert_eq!(turn_gap(1, Left::Nothing, ms(30), true), MIN_TURN_GAP);
        assert_eq!(turn_gap(500, Left::Backlog, ms(30), true), MIN_TURN_GAP);
        assert_eq!(turn_gap(1, Left::Nothing, ms(30), false), MIN_TURN_GAP);
        assert_eq!(turn_gap(500, Left::Backlog, ms(30), false), MIN_TURN_GAP);
        // A steady stream: ten times the turn, within bounds.
        assert_eq!(turn_gap(BUSY_WORK, Left::Nothing, ms(2), true), ms(20));
        assert_eq!(turn_gap(40, Left::Nothing, Duration::from_micros(300), true), BUSY_TURN_GAP);
        assert_eq!(turn_gap(40, Left::Nothing, ms(9), true), MAX_BUSY_TURN_GAP);
        assert_eq!(turn_gap(40, Left::Nothing, Duration::MAX, true), MAX_BUSY_TURN_GAP);
        // A steady stream with nothing to deliver: the longest gap.
        assert_eq!(turn_gap(BUSY_WORK, Left::Nothing, ms(2), false), MAX_BUSY_TURN_GAP);
        assert_eq!(turn_gap(40, Left::Nothing, Duration::from_micros(300), false), MAX_BUSY_TURN_GAP);
        // A backfill: no pause while live work is light, the shortest gap
        // under a stream.
        assert_eq!(turn_gap(0, Left::Backfill, ms(30), true), Duration::ZERO);
        assert_eq!(turn_gap(40, Left::Backfill, ms(9), true), MIN_TURN_GAP);
    }

    #[test]
    fn the_sequence_grows_even_when_the_clock_does_not() {
        let mut last = 0;
        let first = next_sequence(&mut last);
        assert!(first > 1_700_000_000_000_000, "µs since the epoch: {first}");
        let mut ahead = first + 60_000_000;
        assert_eq!(next_sequence(&mut ahead), first + 60_000_001, "a clock behind the last turn's");
        let second = next_sequence(&mut last);
        assert!(second > first);
    }

    #[test]
    fn sleeps_until_the_next_due_job_or_the_poll_interval_or_the_inbox_reset() {
        let ms = Duration::from_millis;
        let poll = ms(10_000);
        assert_eq!(sleep_limit(None, poll, false, ms(0)), poll);
        assert_eq!(sleep_limit(Some(ms(30)), poll, false, ms(0)), ms(30));
        assert_eq!(sleep_limit(Some(ms(60_000)), poll, false, ms(0)), poll);
        // The inbox cursor is past block 0: look from the front within a reset.
        assert_eq!(sleep_limit(None, poll, true, ms(300)), CURSOR_RESET - ms(300));
        assert_eq!(sleep_limit(Some(ms(30)), poll, true, ms(300)), ms(30));
        assert_eq!(sleep_limit(None, poll, true, CURSOR_RESET * 2), Duration::ZERO);
    }
}
