//! Who may call `outbox.enqueue()`: the roles an admin allowed, for one kind
//! or for every kind (`outbox.enqueuers`). Membership counts, as for a
//! GRANT; superusers may always. Tracked tables need no grant: their
//! triggers were made by an admin.

use crate::pg::errors::{raise, require, require_kind, unknown_kind};
use pgrx::prelude::*;
use pgrx::FromDatum;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;

const GRANT: &str = "
INSERT INTO outbox.enqueuers (role, kind) VALUES ($1::pg_catalog.regrole, $2)
ON CONFLICT (role, (coalesce(kind, ''))) DO NOTHING";

/// A kind is never '' (a CHECK on kinds): '' stands for every kind, as in
/// the unique index.
const REVOKE: &str = "
DELETE FROM outbox.enqueuers
 WHERE role OPERATOR(pg_catalog.=) $1::pg_catalog.regrole
   AND coalesce(kind, '') OPERATOR(pg_catalog.=) coalesce($2::pg_catalog.text, '')";

const KIND_EXISTS: &str = "SELECT EXISTS (SELECT FROM outbox.kinds WHERE kind OPERATOR(pg_catalog.=) $1)";


/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] = &[("GRANT", GRANT), ("REVOKE", REVOKE), ("KIND_EXISTS", KIND_EXISTS)];

/// What a role may do with a kind through `enqueue()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// The same answer whether or not the kind exists: a role learns nothing
    /// of kinds it may not use.
    Denied,
    /// Allowed, but nobody registered the kind.
    UnknownKind,
}

thread_local! {
    /// (user, kind) pairs found allowed to enqueue, and registered, in this
    /// transaction. Forgotten when it ends, when a subtransaction aborts (a
    /// grant or register made in it is gone), and after a grant, a revoke
    /// or a change of the kinds.
    static ALLOWED: RefCell<HashSet<(pg_sys::Oid, String)>> = RefCell::new(HashSet::new());
}

/// Forgets who was found allowed what in this transaction.
pub fn forget() {
    ALLOWED.with(|a| {
        if let Ok(mut a) = a.try_borrow_mut() {
            a.clear();
        }
    });
}

/// The cache goes with the transaction and with an aborted subtransaction.
pub const XACT: crate::pg::xact::Handlers =
    crate::pg::xact::Handlers { before_commit: || {}, ended: |_| forget(), subtransaction_aborted: |_| forget() };

/// Raises 42501 unless the current user may enqueue `kind`, and 42704 if
/// the kind is not registered (checked once per user and kind in a
/// transaction). The same 42501 whether or not the kind exists: a role
/// learns nothing of kinds it may not use.
pub fn require_access(kind: &str) {
    // SAFETY: reading the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    if ALLOWED.with(|a| a.borrow().iter().any(|(u, k)| *u == user && k == kind)) {
        return;
    }
    match access(user, kind) {
        Access::Allowed => {}
        Access::UnknownKind => unknown_kind(kind),
        Access::Denied => raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to enqueue kind \"{kind}\""),
            Some("An admin allows a role with SELECT outbox.grant_enqueue('role', 'kind'), or for every kind with SELECT outbox.grant_enqueue('role')."),
        ),
    }
    ALLOWED.with(|a| a.borrow_mut().insert((user, kind.to_string())));
}

/// What `user` may do with `kind`, as of the statement's snapshot. The
/// tables are read directly (`outbox.kinds` on its primary key, the few
/// rows of `outbox.enqueuers` in full), below privileges, as the extension's
/// own bookkeeping: every enqueuing transaction asks once per kind, and an
/// SPI statement for it was a tenth of a one-row UPDATE's time.
pub fn access(user: pg_sys::Oid, kind: &str) -> Access {
    // SAFETY: a syscache lookup of a role.
    let superuser = unsafe { pg_sys::superuser_arg(user) };
    let allowed = superuser || allowed_roles(kind).into_iter().any(|role| {
        // SAFETY: a role membership lookup; false for a role dropped since.
        unsafe { pg_sys::has_privs_of_role(user, role) }
    });
    match (allowed, kind_exists(kind)) {
        (false, _) => Access::Denied,
        (true, false) => Access::UnknownKind,
        (true, true) => Access::Allowed,
    }
}

/// The snapshot the calling statement runs with (the transaction's, outside
/// one).
///
/// # Safety
/// In a transaction.
unsafe fn statement_snapshot() -> pg_sys::Snapshot {
    // SAFETY: the caller's contract; both only read the snapshot stack.
    unsafe {
        if pg_sys::ActiveSnapshotSet() {
            pg_sys::GetActiveSnapshot()
        } else {
            pg_sys::GetTransactionSnapshot()
        }
    }
}

/// Runs `f` over the rows of `outbox.<table>` whose first column equals
/// `key` (every row without one), with the active snapshot, until `f`
/// returns false: on index `outbox.<index>` when there is one, else by a
/// scan of the table. Nothing if the table is missing.
fn scan(table: &CStr, index: Option<&CStr>, key: Option<&str>, mut f: impl FnMut(pg_sys::HeapTuple, pg_sys::TupleDesc) -> bool) {
    let Some((relid, ns)) = crate::schema::relation(table) else { return };
    // SAFETY: the table is opened with a lock and closed below; the scan
    // key's datum lives until the scan ends; the snapshot is the one the
    // calling statement runs with. An ERROR releases all of it through the
    // resource owner.
    unsafe {
        let index = index.map_or(pg_sys::InvalidOid, |i| pg_sys::get_relname_relid(i.as_ptr(), ns));
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let datum = key.map(|k| pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(k.as_ptr().cast(), k.len() as i32)));
        let mut keys: [pg_sys::ScanKeyData; 1] = std::mem::zeroed();
        if let Some(datum) = datum {
            pg_sys::ScanKeyEntryInitialize(
                &mut keys[0],
                0,
                1,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                pg_sys::C_COLLATION_OID,
                pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                datum,
            );
        }
        let use_index = index != pg_sys::InvalidOid && datum.is_some();
        let snapshot = statement_snapshot();
        let nkeys = i32::from(datum.is_some());
        let scan = pg_sys::systable_beginscan(rel, index, use_index, snapshot, nkeys, keys.as_mut_ptr());
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() || !f(tuple, (*rel).rd_att) {
                break;
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

thread_local! {
    /// Where each kind's row was last found: the next transaction that asks
    /// looks at that tuple (one heap fetch) before it searches the index.
    static KIND_ROWS: RefCell<HashMap<String, pg_sys::ItemPointerData>> = RefCell::new(HashMap::new());
}

/// Whether `kind` is registered: a row of `outbox.kinds` with that kind is
/// visible to the statement's snapshot. The tuple where the kind was found
/// last is tried first; any visible tuple of the table holding that kind
/// proves it, and anything else (gone, moved, vacuumed, another kind) sends
/// the lookup to the index.
pub fn kind_exists(kind: &str) -> bool {
    if let Some(tid) = KIND_ROWS.with(|k| k.borrow().get(kind).copied()) {
        if still_there(kind, tid) {
            return true;
        }
    }
    let mut found = None;
    scan(c"kinds", Some(c"kinds_pkey"), Some(kind), |tuple, _| {
        // SAFETY: a tuple the scan returned, valid until the next fetch.
        found = Some(unsafe { (*tuple).t_self });
        false
    });
    KIND_ROWS.with(|k| {
        let mut k = k.borrow_mut();
        match found {
            Some(tid) => {
                if k.len() > 1000 {
                    k.clear();
                }
                k.insert(kind.to_string(), tid);
            }
            None => {
                k.remove(kind);
            }
        }
    });
    found.is_some()
}

/// Whether the tuple at `tid` of `outbox.kinds` is visible to the
/// statement's snapshot and holds `kind`.
fn still_there(kind: &str, tid: pg_sys::ItemPointerData) -> bool {
    thread_local! {
        static KINDS: std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> = const { std::cell::Cell::new(None) };
    }
    let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
    // SAFETY: in a transaction; closed below.
    let Some(rel) = (unsafe { crate::schema::open(c"kinds", &KINDS, lock) }) else { return false };
    // SAFETY: the table is open with a lock and closed below. heap_fetch
    // checks the block and offset against the relation and the page, and
    // returns with the buffer pinned only when the tuple is visible; the
    // column is read while it is pinned.
    unsafe {
        let (block, _) = pgrx::itemptr::item_pointer_get_both(tid);
        let mut found = false;
        if block < pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM) {
            let snapshot = statement_snapshot();
            let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
            tuple.t_self = tid;
            let mut buffer: pg_sys::Buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
            if pg_sys::heap_fetch(rel, snapshot, &mut tuple, &mut buffer, false) {
                let mut null = false;
                let value = pg_sys::heap_getattr(&mut tuple, 1, (*rel).rd_att, &mut null);
                found = !null && String::from_datum(value, false).as_deref() == Some(kind);
                pg_sys::ReleaseBuffer(buffer);
            }
        }
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        found
    }
}

/// The roles allowed to enqueue `kind`: granted it, or every kind.
fn allowed_roles(kind: &str) -> Vec<pg_sys::Oid> {
    let mut roles = Vec::new();
    scan(c"enqueuers", None, None, |tuple, desc| {
        // SAFETY: a tuple of outbox.enqueuers (role regrole, kind text, ...),
        // valid until the next one is fetched.
        unsafe {
            let (mut null, role_at, kind_at) = (false, pg_sys::SPI_fnumber(desc, c"role".as_ptr()), pg_sys::SPI_fnumber(desc, c"kind".as_ptr()));
            if role_at <= 0 || kind_at <= 0 {
                return false;
            }
            let role = pg_sys::heap_getattr(tuple, role_at, desc, &mut null);
            if null {
                return true;
            }
            let k = pg_sys::heap_getattr(tuple, kind_at, desc, &mut null);
            let every = null;
            if every || String::from_datum(k, false).as_deref() == Some(kind) {
                roles.push(pg_sys::Oid::from_datum(role, false).unwrap_or(pg_sys::InvalidOid));
            }
        }
        true
    });
    roles
}

fn check_kind(c: &pgrx::spi::SpiClient<'_>, kind: Option<&str>) {
    let Some(kind) = kind else { return };
    let kind = require_kind(Some(kind));
    let exists = c
        .select(KIND_EXISTS, None, &[kind.into()])
        .and_then(|t| t.first().get_one::<bool>())
        .unwrap_or_else(|e| panic!("looking up kind: {e}"));
    if exists != Some(true) {
        unknown_kind(kind);
    }
}

fn require_role(role: Option<pg_sys::Oid>) -> pg_sys::Oid {
    let role = require(role, "role");
    if !crate::pg::roles::role_exists(role) {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("role with oid {} does not exist", role.to_u32()), None);
    }
    role
}

/// Allows `role` (and its members) to enqueue `kind`, or every kind when
/// `kind` is NULL.
#[pg_extern(sql = "
CREATE FUNCTION outbox.grant_enqueue(role regrole, kind text DEFAULT NULL) RETURNS void
VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn grant_enqueue(role: Option<pg_sys::Oid>, kind: Option<&str>) {
    let role = require_role(role);
    Spi::connect_mut(|c| {
        check_kind(c, kind);
        c.update(GRANT, None, &[role.into(), kind.into()]).unwrap_or_else(|e| panic!("granting: {e}"));
    });
    forget();
}

/// Takes back what `grant_enqueue(role, kind)` gave (a grant for every kind
/// is taken back with a NULL kind).
#[pg_extern(sql = "
CREATE FUNCTION outbox.revoke_enqueue(role regrole, kind text DEFAULT NULL) RETURNS void
VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn revoke_enqueue(role: Option<pg_sys::Oid>, kind: Option<&str>) {
    let role = require(role, "role");
    Spi::connect_mut(|c| {
        c.update(REVOKE, None, &[role.into(), kind.into()]).unwrap_or_else(|e| panic!("revoking: {e}"));
    });
    forget();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::testing::sqlstate_of;
    use pgrx::prelude::*;

    #[pg_test]
    fn only_granted_roles_enqueue_and_only_their_kinds() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}'), outbox.register('order', 'http://h/{id}')").unwrap();
        Spi::run("CREATE ROLE outbox_test_app NOLOGIN NOSUPERUSER; CREATE ROLE outbox_test_member NOLOGIN IN ROLE outbox_test_app").unwrap();
        let as_role = |role: &str, sql: &str| {
            Spi::run(&format!("SET ROLE {role}")).unwrap();
            let state = sqlstate_of(sql);
            Spi::run("RESET ROLE").unwrap();
            state
        };
        // Denied alike whether the kind exists or not.
        for sql in ["SELECT outbox.enqueue('user', 1)", "SELECT outbox.enqueue('nope', 1)"] {
            assert_eq!(as_role("outbox_test_app", sql), "42501", "{sql}");
        }
        Spi::run("SELECT outbox.grant_enqueue('outbox_test_app', 'user')").unwrap();
        Spi::run("SELECT outbox.grant_enqueue('outbox_test_app', 'user')").unwrap();
        assert_eq!(as_role("outbox_test_app", "SELECT outbox.enqueue('user', 1)"), "00000");
        assert_eq!(as_role("outbox_test_member", "SELECT outbox.enqueue('user', 2)"), "00000", "members may too");
        assert_eq!(as_role("outbox_test_app", "SELECT outbox.enqueue('order', 1)"), "42501");
        Spi::run("SELECT outbox.grant_enqueue('outbox_test_app')").unwrap();
        assert_eq!(as_role("outbox_test_app", "SELECT outbox.enqueue('order', 1)"), "00000");
        assert_eq!(as_role("outbox_test_app", "SELECT outbox.enqueue('nope', 1)"), "42704", "granted every kind: told it is unknown");
        Spi::run("SELECT outbox.revoke_enqueue('outbox_test_app')").unwrap();
        // A grant rolled back with its subtransaction allows nothing after.
        let r = crate::pg::subxact::try_subtransaction(|| {
            Spi::run("SELECT outbox.grant_enqueue('outbox_test_app', 'order')").unwrap();
            Spi::run("SET ROLE outbox_test_app").unwrap();
            Spi::run("SELECT outbox.enqueue('order', 2)").unwrap();
            panic!("roll the subtransaction back");
        });
        assert!(r.is_err());
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(as_role("outbox_test_app", "SELECT outbox.enqueue('order', 3)"), "42501", "the rolled-back grant is forgotten");
        Spi::run("SELECT outbox.revoke_enqueue('outbox_test_app', 'user')").unwrap();
        assert_eq!(as_role("outbox_test_app", "SELECT outbox.enqueue('user', 3)"), "42501");
        // Admin only, with clear errors.
        assert_eq!(as_role("outbox_test_app", "SELECT outbox.grant_enqueue('outbox_test_app')"), "42501");
        let cases = [
            ("SELECT outbox.grant_enqueue(NULL)", "22004"),
            ("SELECT outbox.grant_enqueue('outbox_test_app', 'nope')", "42704"),
            ("SELECT outbox.grant_enqueue('outbox_test_app', '')", "22023"),
            ("SELECT outbox.grant_enqueue('no_such_role_x')", "42704"),
        ];
        crate::testing::assert_sqlstates(&cases);
        // A kind's grants go with it.
        Spi::run("SELECT outbox.grant_enqueue('outbox_test_app', 'order'), outbox.unregister('order', true)").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.enqueuers WHERE kind = 'order'").unwrap(), Some(0));
    }
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
    }
}
