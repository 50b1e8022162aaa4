//! DDL that needs a served database to itself: `DROP DATABASE`,
//! `ALTER DATABASE ... RENAME TO` and `... SET TABLESPACE`, and `CREATE
//! DATABASE` from it (`TEMPLATE`, template1 by default). Postgres waits
//! five seconds for every other session in the database to leave, then
//! fails; the worker never would. So when such a statement names a database
//! a worker serves and Postgres will run it
//! (its permission checks pass: the owner, CREATEDB, the tablespace's
//! CREATE, a free new name), the worker is asked to stop first; a statement
//! Postgres refuses leaves the worker alone. The lock the statement takes on the database is taken before
//! that, so the worker the launcher starts next waits in its connection
//! until the statement ends, then connects, or finds the database gone (and
//! waits for it, as at startup). If the statement fails, nothing is lost:
//! the next worker sends the deliveries that were in flight again.

use crate::pg::{shmem, syscache};
use pgrx::prelude::*;
use pgrx::PgList;
use std::ffi::{c_char, CStr};

/// What Postgres checks before it runs a statement on a database, beyond
/// the database's existence: the hook acts only on statements that pass.
enum Needs {
    /// DROP DATABASE: the owner, and not a template.
    Drop,
    /// RENAME: the owner with CREATEDB, and a new name not taken.
    Rename { new_name: *const c_char },
    /// SET TABLESPACE: the owner, with CREATE on a tablespace that exists.
    Tablespace { tablespace: *const c_char },
    /// CREATE DATABASE (from template1 unless TEMPLATE says otherwise):
    /// CREATEDB, a template or the owner, and a new name not taken.
    Copy { new_name: *const c_char },
}

/// A statement that needs a database to itself.
struct Ddl {
    /// The database.
    name: *const c_char,
    /// What Postgres will check first.
    needs: Needs,
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
                Some(Ddl { name: name.cast_const(), needs: Needs::Drop, lock: exclusive, what: "DROP DATABASE", in_block: false })
            }
            T_RenameStmt => {
                let s = stmt.cast::<pg_sys::RenameStmt>();
                ((*s).renameType == pg_sys::ObjectType::OBJECT_DATABASE).then(|| Ddl {
                    name: (*s).subname.cast_const(),
                    needs: Needs::Rename { new_name: (*s).newname.cast_const() },
                    lock: exclusive,
                    what: "ALTER DATABASE ... RENAME",
                    in_block: true,
                })
            }
            T_AlterDatabaseStmt => {
                let s = stmt.cast::<pg_sys::AlterDatabaseStmt>();
                option(PgList::from_pg((*s).options), "tablespace").map(|tablespace| Ddl {
                    name: (*s).dbname.cast_const(),
                    needs: Needs::Tablespace { tablespace },
                    lock: exclusive,
                    what: "ALTER DATABASE ... SET TABLESPACE",
                    in_block: false,
                })
            }
            T_CreatedbStmt => {
                let s = stmt.cast::<pg_sys::CreatedbStmt>();
                let name = option(PgList::from_pg((*s).options), "template").unwrap_or(c"template1".as_ptr());
                Some(Ddl {
                    name,
                    needs: Needs::Copy { new_name: (*s).dbname.cast_const() },
                    lock: pg_sys::ShareLock as pg_sys::LOCKMODE,
                    what: "CREATE DATABASE ... TEMPLATE",
                    in_block: false,
                })
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
fn owns(db: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup of a database that exists, in a transaction.
    unsafe {
        let user = pg_sys::GetUserId();
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        return pg_sys::pg_database_ownercheck(db, user);
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        return pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, db, user);
    }
}

/// Whether the current user may create databases (as dbcommands.c asks).
fn may_create_databases() -> bool {
    // SAFETY: reading the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    // SAFETY: a syscache lookup.
    let superuser = unsafe { pg_sys::superuser_arg(user) };
    superuser
        || syscache::row(pg_sys::SysCacheIdentifier::AUTHOID, user, |r: &pg_sys::FormData_pg_authid| r.rolcreatedb) == Some(true)
}

/// Whether database `db` is a template (`datistemplate`).
fn is_template(db: pg_sys::Oid) -> bool {
    syscache::row(pg_sys::SysCacheIdentifier::DATABASEOID, db, |r: &pg_sys::FormData_pg_database| r.datistemplate) == Some(true)
}

/// Whether no database is called `name`.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
unsafe fn name_is_free(name: *const c_char) -> bool {
    // SAFETY: as this function's contract; missing_ok.
    !name.is_null() && unsafe { pg_sys::get_database_oid(name, true) } == pg_sys::InvalidOid
}

/// Whether the current user may create in tablespace `name`, which exists.
///
/// # Safety
/// `name` is a NUL-terminated string.
unsafe fn may_use_tablespace(name: *const c_char) -> bool {
    // SAFETY: catalog lookups; missing_ok.
    unsafe {
        let space = pg_sys::get_tablespace_oid(name, true);
        if space == pg_sys::InvalidOid {
            return false;
        }
        let user = pg_sys::GetUserId();
        let create = pg_sys::ACL_CREATE as pg_sys::AclMode;
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        let result = pg_sys::pg_tablespace_aclcheck(space, user, create);
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        let result = pg_sys::object_aclcheck(pg_sys::TableSpaceRelationId, space, user, create);
        result == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Whether Postgres will let the current user run the statement on `db`:
/// its permission checks, and the plain refusals that come before it waits
/// for other sessions. Anything it refuses must not stop the worker: a
/// role could otherwise restart it at will.
///
/// # Safety
/// The pointers in `needs` come from a valid statement node.
unsafe fn postgres_allows(needs: &Needs, db: pg_sys::Oid) -> bool {
    // SAFETY: as this function's contract.
    unsafe {
        match *needs {
            Needs::Drop => owns(db) && !is_template(db),
            Needs::Rename { new_name } => owns(db) && may_create_databases() && name_is_free(new_name),
            Needs::Tablespace { tablespace } => owns(db) && may_use_tablespace(tablespace),
            Needs::Copy { new_name } => may_create_databases() && (is_template(db) || owns(db)) && name_is_free(new_name),
        }
    }
}

/// Called before every utility statement: stops the worker if `stmt` is DDL
/// that needs the served database to itself.
///
/// # Safety
/// `stmt` is a valid utility statement node.
pub unsafe fn step_aside_for(stmt: *mut pg_sys::Node, toplevel: bool) {
    // SAFETY: as this function's contract.
    let Some(Ddl { name, needs, lock, what, in_block }) = (unsafe { needs_database_alone(stmt) }) else { return };
    // SAFETY: a plain read of the transaction state.
    // Those that can't run in a block can't run from a function either.
    if !in_block && (!toplevel || unsafe { pg_sys::IsTransactionBlock() }) {
        return;
    }
    // SAFETY: statement names are NUL-terminated strings.
    let name = unsafe { CStr::from_ptr(name) };
    // SAFETY: a catalog lookup; missing_ok, so an unknown name is InvalidOid.
    let db = unsafe { pg_sys::get_database_oid(name.as_ptr(), true) };
    if !shmem::has_slot(db) {
        return;
    }
    // From inside the database itself the statement fails anyway.
    // SAFETY: a plain read of this backend's database.
    if db == pg_sys::InvalidOid || db == unsafe { pg_sys::MyDatabaseId } {
        return;
    }
    // SAFETY: `needs` points into the statement node.
    if !unsafe { postgres_allows(&needs, db) } {
        return;
    }
    // SAFETY: the lock the statement itself takes next, in this transaction;
    // taken again by the statement, it is simply counted twice. Then counts
    // of the sessions in the database, and a signal, as pg_terminate_backend
    // sends, to a worker found there.
    unsafe {
        pg_sys::LockSharedObject(pg_sys::DatabaseRelationId, db, 0, lock);
        // Sessions still in the database fail the statement whatever the
        // worker does (none can connect while we hold the lock). Postgres
        // waits five seconds for them to leave; so do we, for one that is
        // closing, and for a worker that connected before the lock and has
        // yet to claim its slot.
        for _ in 0..50 {
            if pg_sys::CountDBConnections(db) == 0 {
                if let Some(pid) = shmem::worker_of(db) {
                    let proc_ = pg_sys::BackendPidGetProc(pid);
                    if !proc_.is_null() && (*proc_).databaseId == db {
                        log!("outbox: stopping the worker of database \"{}\" for {what}", name.to_string_lossy());
                        libc::kill(pid, libc::SIGTERM);
                    }
                    return;
                }
                // Nobody else in the database: nothing to stop.
                if pg_sys::CountDBBackends(db) == 0 {
                    return;
                }
            }
            pg_sys::pg_usleep(100_000);
            pg_sys::check_for_interrupts!();
        }
    }
}
