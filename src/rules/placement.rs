//! Which databases get a delivery worker, and which wait for one: the
//! launcher's decision each round, given what it found in `pg_database` and
//! what it knows of each database. Pure: databases are plain ids and names.

use std::collections::HashSet;
use std::time::Duration;

/// A row of `pg_database`, as the launcher reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub id: u32,
    pub name: String,
    /// `datallowconn`, and not left invalid by an interrupted `DROP
    /// DATABASE`: a worker could not connect otherwise.
    pub allows_connections: bool,
    /// `datistemplate`: copied by CREATE DATABASE, which fails while anyone
    /// is connected to the template.
    pub is_template: bool,
}

/// What the launcher knows besides the catalog.
pub struct Known<'a> {
    /// `outbox.database`: serve only the database of this name.
    pub only: Option<&'a str>,
    /// Databases that have a worker slot (its worker runs, starts, or is
    /// started again).
    pub served: &'a HashSet<u32>,
    /// Databases a worker found without the extension, and nothing said
    /// since that it was created there.
    pub absent: &'a HashSet<u32>,
    /// Worker slots free under `outbox.max_workers`.
    pub free_slots: usize,
}

/// The round's decision, each list in the order of the databases' ids.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Start a worker here now.
    pub start: Vec<u32>,
    /// Would start one, but every slot is taken.
    pub waiting: Vec<u32>,
}

/// Whether a worker should serve `db` at all. Without `outbox.database`,
/// every database that allows connections and is not a template; with it,
/// only that one (a template too, as someone named it), if it allows
/// connections.
pub fn wanted(db: &Database, only: Option<&str>) -> bool {
    db.allows_connections && only.map_or(!db.is_template, |name| db.name == name)
}

/// Which databases to start a worker in this round: those wanted, not
/// served, not known to lack the extension, and `ready` (the caller's own
/// checks: not started a moment ago, the role may connect). As many as
/// there are free slots, the lowest ids first, so that the order is stable
/// from one round to the next; the others wait.
pub fn plan(databases: &[Database], known: Known<'_>, mut ready: impl FnMut(&Database) -> bool) -> Plan {
    let mut candidates: Vec<&Database> = databases
        .iter()
        .filter(|db| wanted(db, known.only) && !known.served.contains(&db.id) && !known.absent.contains(&db.id))
        .collect();
    candidates.sort_by_key(|db| db.id);
    let mut plan = Plan::default();
    for db in candidates {
        if !ready(db) {
            continue;
        }
        if plan.start.len() < known.free_slots {
            plan.start.push(db.id);
        } else {
            plan.waiting.push(db.id);
        }
    }
    plan
}

/// The pause before another start in a database whose last `strikes`
/// workers failed to get past their start (to connect, or to claim their
/// slot in time): `base`, doubling with each strike, at most `max`.
pub fn backoff(strikes: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(1 << strikes.min(16)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(id: u32, name: &str) -> Database {
        Database { id, name: name.into(), allows_connections: true, is_template: false }
    }

    fn known<'a>(served: &'a HashSet<u32>, absent: &'a HashSet<u32>, free_slots: usize) -> Known<'a> {
        Known { only: None, served, absent, free_slots }
    }

    #[test]
    fn every_database_that_allows_connections_and_is_no_template_is_wanted() {
        let closed = Database { allows_connections: false, ..db(1, "closed") };
        let template = Database { is_template: true, ..db(2, "template1") };
        assert!(wanted(&db(3, "app"), None));
        assert!(!wanted(&closed, None));
        assert!(!wanted(&template, None));
        // Named by outbox.database: only that one, a template too.
        assert!(wanted(&template, Some("template1")));
        assert!(!wanted(&db(3, "app"), Some("template1")));
        assert!(!wanted(&closed, Some("closed")));
    }

    #[test]
    fn starts_the_lowest_ids_in_the_free_slots_and_the_rest_wait() {
        let dbs = [db(30, "c"), db(10, "a"), db(20, "b"), db(40, "d")];
        let (served, absent) = (HashSet::from([10]), HashSet::from([40]));
        let p = plan(&dbs, known(&served, &absent, 1), |_| true);
        assert_eq!(p, Plan { start: vec![20], waiting: vec![30] });
        let p = plan(&dbs, known(&served, &absent, 5), |_| true);
        assert_eq!(p, Plan { start: vec![20, 30], waiting: vec![] });
        let p = plan(&dbs, known(&served, &absent, 0), |_| true);
        assert_eq!(p, Plan { start: vec![], waiting: vec![20, 30] });
    }

    #[test]
    fn a_database_not_ready_neither_starts_nor_takes_a_slot() {
        let dbs = [db(10, "a"), db(20, "b"), db(30, "c")];
        let none = HashSet::new();
        let p = plan(&dbs, known(&none, &none, 1), |d| d.id != 10);
        assert_eq!(p, Plan { start: vec![20], waiting: vec![30] });
    }

    #[test]
    fn failed_starts_back_off_doubling_up_to_a_cap() {
        let s = Duration::from_secs;
        let pauses: Vec<Duration> = (0..8).map(|n| backoff(n, s(1), s(60))).collect();
        assert_eq!(pauses, [s(1), s(2), s(4), s(8), s(16), s(32), s(60), s(60)]);
        assert_eq!(backoff(u32::MAX, s(1), s(60)), s(60));
    }

    #[test]
    fn outbox_database_limits_the_plan_to_one_database() {
        let dbs = [db(10, "a"), db(20, "b")];
        let none = HashSet::new();
        let p = plan(&dbs, Known { only: Some("b"), ..known(&none, &none, 4) }, |_| true);
        assert_eq!(p, Plan { start: vec![20], waiting: vec![] });
        let p = plan(&dbs, Known { only: Some("gone"), ..known(&none, &none, 4) }, |_| true);
        assert_eq!(p, Plan::default());
    }
}
