//! Roles: who a kind's body functions run as (`run_as`), and running code
//! as that role.
//!
//! Body functions are user code. The worker runs them as the kind's
//! `run_as` role inside a security-restricted operation, as Postgres runs
//! index expressions during maintenance (CVE-2022-1552): no `SET ROLE`, no
//! temporary objects, and every setting they change is put back. So a body
//! can do no more than its role could, whoever owns it and whatever it reads.

use crate::pg::errors::raise;
use pgrx::prelude::*;

/// Whether `role` exists and is a superuser now.
pub fn is_superuser(role: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup; false for a role that does not exist.
    unsafe { pg_sys::superuser_arg(role) && role_exists(role) }
}

/// Whether a role with this oid exists.
pub fn role_exists(role: pg_sys::Oid) -> bool {
    // SAFETY: a syscache existence check of one key.
    unsafe {
        pg_sys::SearchSysCacheExists(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            pg_sys::Datum::from(role),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    }
}

/// Whether the current user may act as `role` (`SET ROLE` to it).
fn may_act_as(role: pg_sys::Oid) -> bool {
    // SAFETY: role membership lookups in a transaction; superusers pass.
    unsafe {
        let me = pg_sys::GetUserId();
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        return pg_sys::is_member_of_role(me, role);
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        return pg_sys::member_can_set_role(me, role);
    }
}

/// Raises 42501 unless the current user may have `what` run as `role`:
/// it may act as the role, and only a superuser may name a superuser.
pub fn require_may_run_as(what: &str, role: pg_sys::Oid) {
    if !role_exists(role) {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("the role {what} would run as does not exist"), None);
    }
    // SAFETY: a syscache lookup of the current user.
    let caller_is_superuser = unsafe { pg_sys::superuser() };
    if !may_act_as(role) || (is_superuser(role) && !caller_is_superuser) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to make {what} run as role \"{}\"", role_name(role)),
            Some("Only a member of that role may, and only a superuser for a superuser."),
        );
    }
}

/// What `register` refuses for `run_as`: a role the registrar may not act
/// as, and a superuser without the explicit opt-in, which only a superuser
/// may give.
fn check_run_as(kind: &str, role: pg_sys::Oid, allow_superuser: bool) {
    if !role_exists(role) {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("run_as role of kind \"{kind}\" does not exist"), None);
    }
    if !may_act_as(role) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to make kind \"{kind}\" run its body as role \"{}\"", role_name(role)),
            Some("The registrar must be a member of run_as (GRANT run_as_role TO registrar). Without run_as, bodies run as the body function's owner."),
        );
    }
    // SAFETY: a syscache lookup of the current user.
    let registrar_is_superuser = unsafe { pg_sys::superuser() };
    if allow_superuser && !registrar_is_superuser {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only a superuser may set allow_superuser",
            None,
        );
    }
    if is_superuser(role) && !allow_superuser {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("kind \"{kind}\" would run its body function as superuser \"{}\"", role_name(role)),
            Some("Create a role with only what the body reads and pass run_as => 'that_role' (or make it the function's owner). To run bodies as a superuser anyway, a superuser passes allow_superuser => true."),
        );
    }
}

/// The role a body function really runs as, if it is not its caller: the
/// owner of a SECURITY DEFINER function.
fn definer_of(function: pg_sys::Oid) -> Option<pg_sys::Oid> {
    crate::pg::syscache::row(pg_sys::SysCacheIdentifier::PROCOID, function, |p: &pg_sys::FormData_pg_proc| {
        p.prosecdef.then_some(p.proowner)
    })
    .flatten()
}

/// What a kind may run as, checked on every write of its body, run_as or
/// allow_superuser: run_as by [`check_run_as`], and the owner of a SECURITY
/// DEFINER body likewise, since the body runs as that owner.
pub fn check_kind(kind: &str, body: Option<pg_sys::Oid>, run_as: Option<pg_sys::Oid>, allow_superuser: bool) {
    if let Some(role) = run_as {
        check_run_as(kind, role, allow_superuser);
    }
    if let Some(definer) = body.and_then(definer_of) {
        check_run_as(kind, definer, allow_superuser);
    }
}

/// A role's name, or its oid if it has none.
pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: a syscache lookup; NULL for a role that does not exist.
    let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if name.is_null() {
        return format!("{}", role.to_u32());
    }
    // SAFETY: a palloc'd NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

/// The user and security context to put back, and the GUC nest level to
/// unwind (every setting changed since, as after an index build: isCommit
/// false). Dropped on every path, an ERROR's unwinding included.
struct Switched {
    user: pg_sys::Oid,
    context: i32,
    guc_level: i32,
}

impl Switched {
    /// Becomes `role` in a security-restricted operation.
    fn to(role: pg_sys::Oid) -> Switched {
        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        // SAFETY: saving and switching the user and security context, and
        // opening a GUC nest level, as index builds do; on the main thread,
        // in a transaction. `Drop` restores them.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            let switched = Switched { user, context, guc_level: pg_sys::NewGUCNestLevel() };
            let restricted = pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
            pg_sys::SetUserIdAndSecContext(role, context | restricted);
            switched
        }
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        // SAFETY: puts back exactly what `Switched::to` saved, in the same
        // (sub)transaction on the main thread.
        unsafe {
            pg_sys::AtEOXact_GUC(false, self.guc_level);
            pg_sys::SetUserIdAndSecContext(self.user, self.context);
        }
    }
}

/// Runs `f` as `role`, in a security-restricted operation, with
/// `search_path = pg_catalog, pg_temp`: what body functions run in. The
/// user, the security context and every setting `f` changed are put back
/// afterwards, also when `f` raises.
pub fn as_restricted<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let _switched = Switched::to(role);
    // SAFETY: a session-level setting inside the nest level opened above,
    // which `_switched` unwinds.
    unsafe {
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
    f()
}

/// Runs `f`, the extension's own statements on its tables, as the owner of
/// `outbox.queue`, after the caller's own rights were checked: what
/// SECURITY DEFINER would do, without hiding who the caller is from that
/// check.
pub fn as_queue_owner<R>(f: impl FnOnce() -> R) -> R {
    let Some(queue) = crate::schema::relid(c"queue") else { return f() };
    // SAFETY: a relcache entry of a table that exists, opened and closed
    // here; the owner is a plain field of its pg_class row.
    let owner = unsafe {
        let rel = pg_sys::RelationIdGetRelation(queue);
        let owner = (*(*rel).rd_rel).relowner;
        pg_sys::RelationClose(rel);
        owner
    };
    let _switched = Switched::to(owner);
    f()
}
