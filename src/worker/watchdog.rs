//! The last bound on a render. A body's statement is cancelled at its kind's
//! `render_timeout`, but PL/pgSQL can catch `query_canceled` and go on; only
//! `die` can't be caught. So a thread of its own (no Postgres in it, signals
//! blocked) sends the worker SIGTERM when a kind's render outlives its
//! deadline by [`GRACE`]. The kind being rendered is in shared memory, and
//! the next worker benches it (`shmem::take_stuck_kind`) instead of getting
//! stuck on it again.

use crossbeam_channel::{RecvTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long past its deadline a render may take to unwind its cancel.
const GRACE: Duration = Duration::from_secs(1);

static ARM: OnceLock<Sender<Option<Instant>>> = OnceLock::new();
static FIRED: AtomicBool = AtomicBool::new(false);

/// Starts the thread; call once, with every signal blocked.
pub fn start() -> std::io::Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded::<Option<Instant>>();
    std::thread::Builder::new().name("outbox watchdog".into()).spawn(move || {
        let mut armed: Option<Instant> = None;
        loop {
            let next = match armed {
                Some(deadline) => rx.recv_deadline(deadline),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match next {
                Ok(deadline) => armed = deadline,
                Err(RecvTimeoutError::Timeout) => {
                    FIRED.store(true, Ordering::SeqCst);
                    // SAFETY: a signal to our own process; Postgres' `die`
                    // handler runs on the main thread (ours block signals).
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    armed = None;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    })?;
    let _ = ARM.set(tx);
    Ok(())
}

/// Ends the worker if the render is still running at `deadline` + [`GRACE`].
pub fn arm(deadline: Instant) {
    if let Some(tx) = ARM.get() {
        // The thread lives as long as the process: sending cannot fail.
        let _ = tx.send(Some(deadline + GRACE));
    }
}

pub fn disarm() {
    if let Some(tx) = ARM.get() {
        let _ = tx.send(None);
    }
}

/// Whether the watchdog ended this worker.
pub fn fired() -> bool {
    FIRED.load(Ordering::SeqCst)
}

/// A kind's name as the number shared memory holds (FNV-1a).
pub fn kind_hash(kind: &str) -> u64 {
    kind.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)).max(1)
}
