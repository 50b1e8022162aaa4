//! Who may call `outbox.enqueue()`: the roles an admin allowed, for one kind
//! or for every kind (`outbox.enqueuers`). Membership counts, as for a
//! GRANT; superusers may always. Tracked tables need no grant: their
//! triggers were made by an admin.

use crate::errors::{raise, require, require_kind, unknown_kind};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;
use std::cell::OnceCell;

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


/// Whether kind $1 is registered, and the roles allowed to enqueue it: what
/// an `enqueue()` asks once per transaction and kind, in one statement.
const ACCESS: &str = "
SELECT EXISTS (SELECT FROM outbox.kinds k WHERE k.kind OPERATOR(pg_catalog.=) $1),
       ARRAY(SELECT e.role::pg_catalog.oid FROM outbox.enqueuers e
              WHERE e.kind IS NULL OR e.kind OPERATOR(pg_catalog.=) $1)";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] =
    &[("GRANT", GRANT), ("REVOKE", REVOKE), ("KIND_EXISTS", KIND_EXISTS), ("ACCESS", ACCESS)];

thread_local! {
    static PLAN: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
}

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

/// What `user` may do with `kind`. Reads the tables as the queue's owner:
/// application roles can't read them.
pub fn access(user: pg_sys::Oid, kind: &str) -> Access {
    let (exists, roles): (bool, Vec<pg_sys::Oid>) = crate::roles::as_queue_owner(|| {
        PLAN.with(|plan| {
            let plan = plan.get_or_init(|| {
                Spi::connect(|c| {
                    let text = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
                    c.prepare(ACCESS, &[text]).unwrap_or_else(|e| panic!("preparing enqueue access: {e}")).keep()
                })
            });
            Spi::connect(|c| {
                let row = c.select(plan, None, &[kind.into()]).unwrap_or_else(|e| panic!("reading enqueuers: {e}"));
                let row = row.first();
                (
                    row.get::<bool>(1).ok().flatten().unwrap_or(false),
                    row.get::<Vec<pg_sys::Oid>>(2).ok().flatten().unwrap_or_default(),
                )
            })
        })
    });
    // SAFETY: role lookups in the syscache; false for a role dropped since.
    let allowed = unsafe { pg_sys::superuser_arg(user) || roles.into_iter().any(|role| pg_sys::has_privs_of_role(user, role)) };
    match (allowed, exists) {
        (false, _) => Access::Denied,
        (true, false) => Access::UnknownKind,
        (true, true) => Access::Allowed,
    }
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
    if !crate::roles::role_exists(role) {
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
    crate::enqueue::forget_this_transaction();
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
    crate::enqueue::forget_this_transaction();
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
        let r = crate::subxact::try_subtransaction(|| {
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
