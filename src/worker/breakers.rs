//! The kinds' circuit breakers (`rules::breaker`) in the worker: fed each
//! request's outcome, asked before a claim how many of a kind's jobs may go
//! out, and written to `outbox.kind_stats` when they change, so that
//! `outbox.stats()` and `outbox.metrics()` show them and the next worker
//! starts from them.

use super::plans::{execute, types::*};
use crate::rules::breaker::{self, Allow, Key, Settings, Signal, State, Transition};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The breakers a previous worker left open or half-open, and how many
/// seconds ago they opened.
const LEFT_OPEN: &str = "
SELECT kind, extract(epoch FROM pg_catalog.now() OPERATOR(pg_catalog.-) breaker_opened_at)::float8
  FROM outbox.kind_stats
 WHERE breaker OPERATOR(pg_catalog.<>) 'closed'";

/// Sets breakers ($1 kinds) to their state ($2) and last error ($3). The
/// time it opened is kept while it stays open or half-open.
const WRITE: &str = "
UPDATE outbox.kind_stats s
   SET breaker = u.breaker,
       breaker_opened_at = CASE WHEN u.breaker OPERATOR(pg_catalog.=) 'closed' THEN NULL
                                ELSE coalesce(s.breaker_opened_at, pg_catalog.now()) END,
       breaker_error = CASE WHEN u.breaker OPERATOR(pg_catalog.=) 'closed' THEN NULL
                            ELSE coalesce(u.error, s.breaker_error) END
  FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::text[]))
       AS u(kind, breaker, error)
 WHERE s.kind OPERATOR(pg_catalog.=) u.kind";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] = &[("LEFT_OPEN", LEFT_OPEN), ("WRITE", WRITE)];

#[derive(Default)]
struct Entry {
    state: State,
    /// When it opened, for the log line that says it closed.
    opened: Option<Instant>,
    /// The failure that opened it or kept it open, not written yet.
    error: Option<String>,
    /// Its state changed since it was last written.
    changed: bool,
}

#[derive(Default)]
pub struct Breakers {
    kinds: HashMap<String, Entry>,
}

impl Breakers {
    /// Starts from what the last worker left: a kind it left open probes at
    /// once. Nothing on a database still on 0.2.0, which has no breakers.
    pub fn restore(&mut self, c: &mut SpiClient<'_>) {
        self.kinds.clear();
        if !crate::schema::at_0_3() {
            return;
        }
        let now = Instant::now();
        let rows = c.select(LEFT_OPEN, None, &[]).unwrap_or_else(|e| panic!("breakers: {e}"));
        for row in rows {
            if let Ok(Some(kind)) = row.get::<String>(1) {
                let ago = row.get::<f64>(2).ok().flatten().filter(|s| s.is_finite() && *s > 0.0).unwrap_or(0.0);
                let opened = now.checked_sub(Duration::from_secs_f64(ago.min(1e9))).unwrap_or(now);
                self.kinds.insert(kind, Entry { state: State::open_now(now), opened: Some(opened), ..Entry::default() });
            }
        }
    }

    /// Forgets them all: the extension is gone, or was made anew.
    pub fn clear(&mut self) {
        self.kinds.clear();
    }

    /// Drops the breakers of kinds that are gone.
    pub fn retain(&mut self, exists: impl Fn(&str) -> bool) {
        self.kinds.retain(|k, _| exists(k));
    }

    pub fn allows(&self, kind: &str, now: Instant) -> Allow {
        self.kinds.get(kind).map_or(Allow::All, |e| e.state.allows(now))
    }

    /// Request `key` of `kind` went out: the probe, if the breaker waited for one.
    pub fn sent(&mut self, kind: &str, key: Key, now: Instant) {
        let Some(e) = self.kinds.get_mut(kind) else { return };
        if e.state.allows(now) == Allow::Probe && e.state.probe_sent(key) == Some(Transition::Probing) {
            e.changed = true;
            debug1!("outbox worker: kind \"{kind}\": probing its receiver");
        }
    }

    /// Feeds the outcome of request `key` of `kind`, with what the receiver
    /// said (`detail`). The error text is made only when the state changes:
    /// this runs for every delivery.
    pub fn outcome(&mut self, kind: &str, key: Key, response: crate::rules::policy::Response, detail: Option<&str>, retry_after: Option<Duration>, settings: &Settings) {
        let Some(signal) = breaker::signal(response) else { return };
        if signal == Signal::Up && !self.kinds.contains_key(kind) {
            // A closed breaker with no failures: nothing to keep.
            return;
        }
        let now = Instant::now();
        let e = self.kinds.entry(kind.to_string()).or_default();
        let Some(transition) = e.state.outcome(key, signal, retry_after, now, settings) else { return };
        e.changed = true;
        let error = crate::rules::policy::error_text(response, detail).unwrap_or_else(|| "no answer".to_string());
        let wait = match e.state {
            State::Open { probe_at, .. } => probe_at.saturating_duration_since(now),
            _ => Duration::ZERO,
        };
        match transition {
            Transition::Opened => {
                e.opened = Some(now);
                warning!(
                    "outbox worker: kind \"{kind}\": {} failed requests in a row, the last {error}; its receiver is taken for down: its jobs wait, and a probe goes out in {} ms",
                    settings.threshold,
                    wait.as_millis()
                );
                e.error = Some(error);
            }
            Transition::Reopened => {
                debug1!("outbox worker: kind \"{kind}\": the probe failed ({error}); the next in {} ms", wait.as_millis());
                e.error = Some(error);
            }
            Transition::Closed => {
                let down = e.opened.take().map_or(0, |at| now.duration_since(at).as_secs());
                log!("outbox worker: kind \"{kind}\": its receiver answered a probe after {down} s down; its jobs flow again");
                e.error = None;
            }
            Transition::Probing => {}
        }
    }

    /// Writes the breakers that changed to `outbox.kind_stats`.
    pub fn write(&mut self, c: &mut SpiClient<'_>) {
        let changed: Vec<&String> = self.kinds.iter().filter(|(_, e)| e.changed).map(|(k, _)| k).collect();
        if changed.is_empty() || !crate::schema::at_0_3() {
            return;
        }
        let kinds: Vec<String> = changed.iter().map(|k| k.to_string()).collect();
        let states: Vec<String> = kinds.iter().map(|k| self.kinds[k].state.name().to_string()).collect();
        let errors: Vec<Option<String>> = kinds.iter().map(|k| self.kinds[k].error.clone()).collect();
        let args: [DatumWithOid; 3] = [kinds.into(), states.into(), errors.into()];
        execute(c, WRITE, &[TEXT_ARRAY, TEXT_ARRAY, TEXT_ARRAY], &args).unwrap_or_else(|e| panic!("breakers: {e}"));
        for e in self.kinds.values_mut() {
            e.changed = false;
        }
        // A closed breaker with no failures holds nothing worth keeping.
        self.kinds.retain(|_, e| e.state != State::default());
    }
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
    }
}
