//! The `outbox.*` settings. Postmaster-context ones can only be defined while
//! the library is preloaded, so they are skipped when it is loaded later.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(4);
pub static ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(256);
pub static CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(32);
pub static HTTP_THREADS: GucSetting<i32> = GucSetting::<i32>::new(2);
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
static RETRY_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
static RETRY_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(3_600_000);
static BREAKER_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(10);
static BREAKER_MAX_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static ATTEMPTS_KEPT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_RESPONSE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static MAX_BODY_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
static CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn init(preloading: bool) {
    if preloading {
        GucRegistry::define_string_guc(
            c"outbox.database",
            c"Serve only this database (default: every database that has the extension).",
            c"The launcher waits, logging once, until this database exists and allows connections.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"outbox.max_workers",
            c"Most delivery workers running at once, one per database.",
            c"Each is a background worker: max_worker_processes must leave room for them, the launcher and parallel queries.",
            &MAX_WORKERS,
            1,
            crate::pg::shmem::MAX_WORKERS as i32,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc(
            c"outbox.role",
            c"Role the outbox worker connects as (default: the bootstrap superuser).",
            c"Body functions run as this role.",
            &ROLE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"outbox.concurrency",
            c"Requests the worker keeps in flight at once.",
            c"",
            &CONCURRENCY,
            1,
            1024,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"outbox.http_threads",
            c"Threads the outbox worker sends requests from, each an event loop.",
            c"outbox.concurrency is one limit for all of them; there are never more threads than it allows requests.",
            &HTTP_THREADS,
            1,
            64,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"outbox.batch_size",
        c"Jobs the worker claims per transaction.",
        c"",
        &BATCH_SIZE,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.poll_interval",
        c"Longest sleep between looks at the queue when no commit wakes the worker.",
        c"",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.retry_base",
        c"Delay before the first retry; it doubles with each attempt.",
        c"",
        &RETRY_BASE_MS,
        1,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.retry_max",
        c"Longest delay between two attempts, Retry-After included.",
        c"",
        &RETRY_MAX_MS,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.breaker_threshold",
        c"Failed requests in a row (no answer, 408, 429, 5xx) after which a kind's receiver is taken for down.",
        c"Its backlog then waits, and one probe a time goes out until the receiver answers; 0 turns the breaker off.",
        &BREAKER_THRESHOLD,
        0,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.breaker_max_interval",
        c"Longest wait between two probes of a receiver taken for down.",
        c"The first wait is outbox.retry_base; it doubles with each failed probe.",
        &BREAKER_MAX_INTERVAL_MS,
        10,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.attempts_kept",
        c"Attempts kept per kind in outbox.attempts, the last ones (0: none).",
        c"Each with its outcome, status, duration and error, for looking into a receiver without the server log.",
        &ATTEMPTS_KEPT,
        0,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.max_response_bytes",
        c"Most bytes of a response body the worker reads.",
        c"",
        &MAX_RESPONSE_BYTES,
        0,
        64 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"outbox.max_body_bytes",
        c"Largest request body the worker sends; a larger one fails its job.",
        c"Bounds the worker's memory: a claimed batch holds up to batch_size bodies.",
        &MAX_BODY_BYTES,
        1024,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_string_guc(
        c"outbox.ca_file",
        c"PEM file of certificate authorities trusted for HTTPS besides the Mozilla roots.",
        c"For receivers with a private CA. Relative to the data directory; read again on reload.",
        &CA_FILE,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

fn millis(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

pub fn poll_interval() -> Duration {
    millis(&POLL_INTERVAL_MS)
}
pub fn retry_base() -> Duration {
    millis(&RETRY_BASE_MS)
}
/// The circuit breakers' settings (`rules::breaker`).
pub fn breaker() -> crate::rules::breaker::Settings {
    crate::rules::breaker::Settings {
        threshold: BREAKER_THRESHOLD.get().max(0) as u32,
        first: retry_base(),
        max: millis(&BREAKER_MAX_INTERVAL_MS),
    }
}
pub fn retry_max() -> Duration {
    millis(&RETRY_MAX_MS)
}
/// A text setting; None when it is unset or empty.
fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting.get().and_then(|c| c.into_string().ok()).filter(|s| !s.is_empty())
}

pub fn database() -> Option<String> {
    text(&DATABASE)
}
pub fn max_workers() -> usize {
    MAX_WORKERS.get().max(1) as usize
}
pub fn role() -> Option<String> {
    text(&ROLE)
}
pub fn ca_file() -> Option<String> {
    text(&CA_FILE)
}
