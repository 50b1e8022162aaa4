//! The executor and utility hooks, chained to any installed before ours:
//! - after each statement's executor finishes (its AFTER triggers have run)
//!   and after a COPY or TRUNCATE, what tracked tables buffered goes to the
//!   inbox ([`crate::capture::inbox::flush`]), so that the next statement sees it;
//! - before DDL that needs the served database to itself, the worker steps
//!   aside ([`crate::capture::database_ddl`]);
//! - after a partition is created or attached, it gets the TRUNCATE triggers
//!   of its tracked ancestors ([`crate::capture::triggers::cover_new_partition`]);
//! - after a COPY into the extension's own tables (a restore), jobs restored
//!   `running` are made `pending` and the worker is told ([`crate::capture::restore`]);
//! - after `COMMIT PREPARED`, the worker is woken and the launcher told
//!   (no callback of the prepared transaction runs at its commit);
//! - after `CREATE EXTENSION outbox`, the launcher is told when it commits,
//!   and after a `DROP EXTENSION` or `DROP SCHEMA`, the worker is woken to
//!   see whether the extension is gone (it then exits).

use pgrx::prelude::*;

static mut PREV_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;
#[cfg(not(feature = "pg13"))]
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hooks; called once per process, from `_PG_init`.
pub(crate) fn install() {
    // SAFETY: called once from _PG_init, on the main thread, before any query
    // of this backend could call the hooks.
    unsafe {
        PREV_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
    }
    // PG13's hook has another signature; there the commit-time flush covers
    // COPY, and database DDL waits for the worker as it does without us.
    #[cfg(not(feature = "pg13"))]
    // SAFETY: as above.
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

// Postgres' own implementations, called directly: pgrx's wrappers would
// catch an ERROR and raise it again without its schema, table and
// constraint fields, which clients read (a foreign key violation raised by a
// statement's AFTER triggers passes through here).
unsafe extern "C-unwind" {
    #[link_name = "standard_ExecutorFinish"]
    fn standard_executor_finish(query: *mut pg_sys::QueryDesc);
    #[cfg(not(feature = "pg13"))]
    #[link_name = "standard_ProcessUtility"]
    #[allow(clippy::too_many_arguments)]
    fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

/// Not `#[pg_guard]`, so that the statement's own ERROR passes through as it
/// is: its longjmp crosses only this frame, which owns nothing to drop.
unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    // SAFETY: the hook's contract: call the previous hook or the standard
    // function with the same argument.
    unsafe {
        match PREV_EXECUTOR_FINISH {
            Some(prev) => prev(query),
            None => standard_executor_finish(query),
        }
    }
    // The statement's AFTER triggers have fired: write what they buffered,
    // so that the next statement sees it.
    flush_after_statement();
}

/// The part of the hooks that runs our code: a panic becomes an ERROR.
#[pg_guard]
extern "C-unwind" fn flush_after_statement() {
    crate::capture::inbox::flush();
}

/// As [`flush_after_statement`].
#[cfg(not(feature = "pg13"))]
#[pg_guard]
unsafe extern "C-unwind" fn before_utility(stmt: *mut pg_sys::Node, toplevel: bool) {
    // SAFETY: called with the statement the utility hook runs.
    unsafe { crate::capture::database_ddl::step_aside_for(stmt, toplevel) };
}

/// Not `#[pg_guard]`, as for [`executor_finish`].
#[cfg(not(feature = "pg13"))]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: as for executor_finish; pstmt is a valid utility statement.
    let tag = unsafe {
        let stmt = (*pstmt).utilityStmt;
        before_utility(stmt, context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL);
        let tag = (*stmt).type_;
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            None => standard_process_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        }
        tag
    };
    // COPY FROM fires row triggers, and TRUNCATE its statement triggers,
    // without an executor of their own.
    match tag {
        pg_sys::NodeTag::T_TruncateStmt => flush_after_statement(),
        pg_sys::NodeTag::T_CopyStmt => {
            flush_after_statement();
            // SAFETY: the statement is the COPY that just ran.
            unsafe { after_copy((*pstmt).utilityStmt.cast()) };
        }
        // SAFETY: the statement is the one that just ran.
        pg_sys::NodeTag::T_CreateStmt | pg_sys::NodeTag::T_AlterTableStmt => unsafe { after_table_ddl((*pstmt).utilityStmt) },
        // SAFETY: the node is a TransactionStmt, by its tag.
        pg_sys::NodeTag::T_TransactionStmt => unsafe { after_transaction_statement((*pstmt).utilityStmt.cast()) },
        pg_sys::NodeTag::T_CreateExtensionStmt => tell_launcher_if_installed(),
        // SAFETY: the node is a DropStmt, by its tag.
        pg_sys::NodeTag::T_DropStmt => unsafe { after_drop((*pstmt).utilityStmt.cast()) },
        _ => {}
    }
}

/// `COMMIT PREPARED` runs none of the prepared transaction's callbacks: the
/// transaction that wrote the changes said nothing at PREPARE, so the
/// command's own transaction asks for the wake-up, as if it had appended to
/// the inbox and changed the kinds (a spare look costs one turn); `wake`
/// sets the latch when it commits.
///
/// # Safety
/// `stmt` is the TransactionStmt that just ran.
#[cfg(not(feature = "pg13"))]
unsafe fn after_transaction_statement(stmt: *mut pg_sys::TransactionStmt) {
    // SAFETY: the caller's contract.
    if unsafe { (*stmt).kind } == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED {
        crate::capture::wake::for_inbox();
        crate::capture::wake::kinds_changed();
        // It may have created the extension (a prepared transaction must
        // be committed from its own database).
        tell_launcher_if_installed();
    }
}

/// After a `CREATE EXTENSION` (of outbox, or of another with CASCADE; run
/// from a function or a restore too) or a `COMMIT PREPARED`: if `outbox` is
/// installed here now, the launcher is told when the transaction commits,
/// and starts a worker if none runs. (Even with one running: it may be
/// about to exit for a `DROP EXTENSION` just before.) A database without
/// the extension tells it nothing, so that ordinary two-phase commits don't
/// bring workers to look there.
#[cfg(not(feature = "pg13"))]
#[pg_guard]
extern "C-unwind" fn tell_launcher_if_installed() {
    // SAFETY: catalog lookups in the statement's transaction. The
    // invalidations and a new catalog snapshot make a prepared transaction
    // committed just now visible; missing_ok.
    let installed = unsafe {
        pg_sys::AcceptInvalidationMessages();
        pg_sys::InvalidateCatalogSnapshot();
        pg_sys::get_extension_oid(c"outbox".as_ptr(), true) != pg_sys::InvalidOid
    };
    if installed {
        crate::capture::wake::extension_created();
    }
}

/// A `DROP EXTENSION` or `DROP SCHEMA` (with CASCADE, it drops the
/// extension too) wakes the worker when it commits, to look: a worker that
/// finds its extension gone exits. Any other drop can't remove it.
///
/// # Safety
/// `stmt` is the DropStmt that just ran.
#[cfg(not(feature = "pg13"))]
unsafe fn after_drop(stmt: *mut pg_sys::DropStmt) {
    // SAFETY: the caller's contract.
    let kind = unsafe { (*stmt).removeType };
    if matches!(kind, pg_sys::ObjectType::OBJECT_EXTENSION | pg_sys::ObjectType::OBJECT_SCHEMA) {
        crate::capture::wake::on_commit();
    }
}

/// As [`flush_after_statement`].
#[cfg(not(feature = "pg13"))]
#[pg_guard]
unsafe extern "C-unwind" fn after_table_ddl(stmt: *mut pg_sys::Node) {
    // SAFETY: called with the statement that just ran.
    unsafe { crate::capture::triggers::cover_new_partition(stmt) };
}

/// As [`flush_after_statement`].
#[cfg(not(feature = "pg13"))]
#[pg_guard]
unsafe extern "C-unwind" fn after_copy(stmt: *mut pg_sys::CopyStmt) {
    // SAFETY: called with the COPY statement that just ran.
    unsafe { crate::capture::restore::after_copy(stmt) };
}
