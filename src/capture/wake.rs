//! Waking the worker when a transaction that gave it work commits, not
//! before and not after a rollback, and telling the launcher when one
//! created the extension: a mark per transaction, acted on at its end
//! ([`XACT`]).

use crate::pg::xact::Handlers;
use std::cell::Cell;

/// What the current transaction asks of the worker once it commits.
#[derive(Default, Clone, Copy)]
struct Marks {
    wake: bool,
    /// It appended to the inbox.
    inbox: bool,
    /// It changed `outbox.kinds`.
    kinds: bool,
    /// It created the extension: the database needs a worker.
    created: bool,
}

thread_local! {
    static MARKS: Cell<Marks> = Cell::new(Marks::default());
}

fn mark(f: impl FnOnce(&mut Marks)) {
    let mut m = MARKS.get();
    m.wake = true;
    f(&mut m);
    MARKS.set(m);
}

/// Sets the worker's latch when the current transaction commits.
pub fn on_commit() {
    mark(|_| {});
}

/// Like [`on_commit`], and tells the worker the inbox has rows.
pub fn for_inbox() {
    mark(|m| m.inbox = true);
}

/// Like [`on_commit`], and tells the worker to read the kinds again.
pub fn kinds_changed() {
    mark(|m| m.kinds = true);
}

/// Tells the launcher, once the current transaction commits, that this
/// database may have the extension now.
pub fn extension_created() {
    let mut m = MARKS.get();
    m.created = true;
    MARKS.set(m);
}

fn ended(committed: bool) {
    let m = MARKS.take();
    if !committed {
        return;
    }
    if m.inbox {
        crate::pg::shmem::mark_inbox_dirty();
    }
    if m.kinds {
        crate::pg::shmem::bump_kinds_generation();
    }
    if m.wake {
        crate::pg::shmem::wake_worker();
    }
    if m.created {
        crate::pg::shmem::announce_extension();
    }
}

/// A subtransaction's marks stay: waking the worker for nothing costs it a
/// turn, missing a wake-up costs a change its latency.
pub const XACT: Handlers = Handlers { before_commit: || {}, ended, subtransaction_aborted: |_| {} };
