//! DDL that needs the served database to itself: `DROP DATABASE`,
//! `ALTER DATABASE ... RENAME TO` and `... SET TABLESPACE`, and `CREATE
//! DATABASE ... TEMPLATE` it. Postgres waits five seconds for every other
//! session in the database to leave, then fails; the worker never would. So
//! when such a statement names the served database and its user may run it
//! (the database's owner, or a superuser), the worker is asked to stop
//! first. The lock the statement takes on the database is taken before
//! that, so the worker the launcher starts next waits in its connection
//! until the statement ends, then connects, or finds the database gone (and
//! waits for it, as at startup). If the statement fails, nothing is lost:
//! the next worker sends the deliveries that were in flight again.

use crate::{gucs, shmem};
use pgrx::prelude::*;
use pgrx::PgList;
use std::ffi::{c_char, CStr};

/// A statement that needs a database to itself.
struct Ddl {
    /// The database.
    name: *const c_char,
    /// The lock the statement takes on it.
    lock: pg_sys::LOCKMODE,
    /// What to call the statement in the log.
    what: &'static str,
    /// Whether it may run in a transaction block (the others fail there
    /// before they wait for anyone).
    in_block: bool,
}

/// What `stmt` would do to a database.
///
/// # Safety
/// `stmt` is a valid utility statement node.
unsafe fn needs_database_alone(stmt: *mut pg_sys::Node) -> Option<Ddl> {
    use pg_sys::NodeTag::*;
    let exclusive = pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE;
    // SAFETY: the node tag says which statement struct `stmt` points to.
    unsafe {
        match (*stmt).type_ {
            T_DropdbStmt => {
                let name = (*stmt.cast::<pg_sys::DropdbStmt>()).dbname;
                Some(Ddl { name: name.cast_const(), lock: exclusive, what: "DROP DATABASE", in_block: false })
            }
            T_RenameStmt => {
                let s = stmt.cast::<pg_sys::RenameStmt>();
                ((*s).renameType == pg_sys::ObjectType::OBJECT_DATABASE).then(|| Ddl {
                    name: (*s).subname.cast_const(),
                    lock: exclusive,
                    what: "ALTER DATABASE ... RENAME",
                    in_block: true,
                })
            }
            T_AlterDatabaseStmt => {
                let s = stmt.cast::<pg_sys::AlterDatabaseStmt>();
                option(PgList::from_pg((*s).options), "tablespace").map(|_| Ddl {
                    name: (*s).dbname.cast_const(),
                    lock: exclusive,
                    what: "ALTER DATABASE ... SET TABLESPACE",
                    in_block: false,
                })
            }
            T_CreatedbStmt => {
                let s = stmt.cast::<pg_sys::CreatedbStmt>();
                let name = option(PgList::from_pg((*s).options), "template")?;
                Some(Ddl { name, lock: pg_sys::ShareLock as pg_sys::LOCKMODE, what: "CREATE DATABASE ... TEMPLATE", in_block: false })
            }
            _ => None,
        }
    }
}

/// The value of option `name` in a statement's options, if given one.
///
/// # Safety
/// `options` holds valid `DefElem`s.
unsafe fn option(options: PgList<pg_sys::DefElem>, name: &str) -> Option<*const c_char> {
    // SAFETY: each element is a valid DefElem with a NUL-terminated name;
    // `defGetString` reads the grammar's string and number values and raises
    // only for values these options can't have. TEMPLATE DEFAULT has no arg.
    unsafe {
        let def = options.iter_ptr().find(|&d| CStr::from_ptr((*d).defname).to_bytes() == name.as_bytes())?;
        (!(*def).arg.is_null()).then(|| pg_sys::defGetString(def).cast_const())
    }
}

/// Whether the current user owns database `db` (superusers own everything).
fn may_run_ddl_on(db: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup of a database that exists, in a transaction.
    unsafe {
        let user = pg_sys::GetUserId();
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        return pg_sys::pg_database_ownercheck(db, user);
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        return pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, db, user);
    }
}

/// Called before every utility statement: stops the worker if `stmt` is DDL
/// that needs the served database to itself.
///
/// # Safety
/// `stmt` is a valid utility statement node.
pub unsafe fn step_aside_for(stmt: *mut pg_sys::Node) {
    // SAFETY: as this function's contract.
    let Some(Ddl { name, lock, what, in_block }) = (unsafe { needs_database_alone(stmt) }) else { return };
    // SAFETY: a plain read of the transaction state.
    if !in_block && unsafe { pg_sys::IsTransactionBlock() } {
        return;
    }
    // SAFETY: statement names are NUL-terminated strings.
    let name = unsafe { CStr::from_ptr(name) };
    if gucs::database().is_none_or(|served| served.as_bytes() != name.to_bytes()) {
        return;
    }
    let Some(pid) = shmem::snapshot().and_then(|s| s.pid) else { return };
    // SAFETY: a catalog lookup; missing_ok, so an unknown name is InvalidOid.
    let db = unsafe { pg_sys::get_database_oid(name.as_ptr(), true) };
    // From inside the database itself the statement fails anyway.
    // SAFETY: a plain read of this backend's database.
    if db == pg_sys::InvalidOid || db == unsafe { pg_sys::MyDatabaseId } || !may_run_ddl_on(db) {
        return;
    }
    // SAFETY: the lock the statement itself takes next, in this transaction;
    // taken again by the statement, it is simply counted twice. Then a check
    // that `pid` is still a session in this database, and a signal, as
    // pg_terminate_backend does.
    unsafe {
        pg_sys::LockSharedObject(pg_sys::DatabaseRelationId, db, 0, lock);
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if proc_.is_null() || (*proc_).databaseId != db {
            return;
        }
        log!("outbox: stopping the worker of database \"{}\" for {what}", name.to_string_lossy());
        libc::kill(pid, libc::SIGTERM);
    }
}
