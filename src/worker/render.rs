//! Turning claimed jobs into requests: the kind's URL template, its body
//! function (called now, so the body is the record's current state), its
//! headers and signing key.

use super::http::{Method, Request};
use super::queue::{Claimed, LOAD_KINDS};
use super::plans::with_settings;
use crate::subxact::try_subtransaction;
use crate::{signing, template};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Header that grows with every delivery of a record, so a receiver can drop
/// a stale PUT that arrives late.
pub const SEQUENCE_HEADER: &str = "outbox-sequence";

pub struct Kind {
    pub url: String,
    /// The body function, as a name Postgres resolves (regproc output).
    pub body_fn: Option<String>,
    pub headers: Vec<(String, String)>,
    pub key: Option<Arc<Vec<u8>>>,
    pub timeout: Duration,
    pub max_attempts: i32,
    pub delete_when_missing: bool,
    pub paused: bool,
    /// The URL's host depends on the record id: don't keep connections.
    pub host_per_record: bool,
}

pub fn load_kinds(c: &mut SpiClient<'_>) -> HashMap<String, Kind> {
    let rows = super::plans::execute(c, LOAD_KINDS, &[], &[]).unwrap_or_else(|e| panic!("loading kinds: {e}"));
    let mut kinds = HashMap::new();
    for r in rows {
        let Ok(Some(name)) = r.get::<String>(1) else { continue };
        let headers: Vec<(String, String)> = r
            .get::<String>(4)
            .ok()
            .flatten()
            .and_then(|h| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&h).ok())
            .map(|m| m.into_iter().filter_map(|(k, v)| Some((k, v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let key = r
            .get::<String>(5)
            .ok()
            .flatten()
            .and_then(|s| signing::decode_secret(&s).ok())
            .map(Arc::new);
        let url = r.get::<String>(2).ok().flatten().unwrap_or_default();
        kinds.insert(
            name,
            Kind {
                host_per_record: template::id_in_authority(&url),
                url,
                body_fn: r.get::<String>(3).ok().flatten(),
                headers,
                key,
                timeout: Duration::from_millis(r.get::<i64>(6).ok().flatten().unwrap_or(10_000).max(1) as u64),
                max_attempts: r.get::<i32>(7).ok().flatten().unwrap_or(25),
                delete_when_missing: r.get::<String>(8).ok().flatten().as_deref() != Some("skip"),
                paused: r.get::<bool>(9).ok().flatten().unwrap_or(false),
            },
        );
    }
    kinds
}

/// What a claimed job turned into.
pub enum Rendered {
    Send(Request),
    /// The record is gone and the kind says `skip`: nothing to send.
    Skip,
    /// The request could not be built (bad URL, body function raised, body
    /// over `outbox.max_body_bytes`).
    Broken(String),
}

/// A body and its size in bytes, from a statement that hands over only the
/// bodies within the limit: (NULL, NULL) when the function returned NULL.
type Measured = (Option<String>, Option<i64>);

/// What a body came to, given its size and the `outbox.max_body_bytes` limit.
fn within_limit((body, size): Measured, limit: i64) -> Result<Option<String>, String> {
    match (body, size) {
        (Some(body), _) => Ok(Some(body)),
        (None, Some(size)) => Err(format!("the body is {size} bytes; outbox.max_body_bytes is {limit}")),
        (None, None) => Ok(None),
    }
}

/// How long a body function may wait for a lock (a migration's, a LOCK
/// TABLE's) before its jobs are retried later: meanwhile the worker would
/// deliver nothing, of any kind.
const BODY_LOCK_TIMEOUT: &std::ffi::CStr = c"1s";

/// Calls the body function of `kind` for each id; `None` means the function
/// returned NULL. One statement for all; if it raises, one subtransaction per
/// id so that only the bad ids fail. If it waits too long for a lock, every
/// id fails (to be retried), without a second wait per id.
///
/// A body over `limit` bytes is measured and dropped inside the statement
/// (OFFSET 0 keeps the function to one call per id): the statement's result
/// holds only bodies within the limit, so one huge record, or a body
/// function gone wrong, cannot run the worker out of memory (and the server
/// into a crash-restart, again at every claim).
fn bodies(function: &str, ids: &[String], limit: i64) -> Vec<Result<Option<String>, String>> {
    use super::plans::types::{INT8, TEXT_ARRAY};
    let batch_sql = format!(
        "SELECT CASE WHEN pg_catalog.octet_length(b.t) <= $2 THEN b.t END, pg_catalog.octet_length(b.t)::bigint
           FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS u(id, n)
          CROSS JOIN LATERAL (SELECT {function}(u.id)::text AS t OFFSET 0) b
          ORDER BY u.n"
    );
    let ids_owned = ids.to_vec();
    // Read-write SPI (update) takes a fresh snapshot per statement, so the
    // body is read after the claim's snapshot: never older than the job.
    let batch = try_subtransaction(move || {
        with_settings(&[(c"lock_timeout", BODY_LOCK_TIMEOUT)], || {
            Spi::connect_mut(|c| {
                super::plans::execute_plain(c, &batch_sql, &[TEXT_ARRAY, INT8], &[ids_owned.into(), limit.into()])
                    .unwrap_or_else(|e| panic!("{e}"))
                    .map(|r| (r.get::<String>(1).ok().flatten(), r.get::<i64>(2).ok().flatten()))
                    .collect::<Vec<Measured>>()
            })
        })
    });
    match batch {
        Ok(rows) if rows.len() == ids.len() => return rows.into_iter().map(|r| within_limit(r, limit)).collect(),
        Err(e) if e.is_lock_timeout() => {
            let error = format!("body function {function} waited too long for a lock: {} (SQLSTATE {})", e.message, e.sqlstate);
            return ids.iter().map(|_| Err(error.clone())).collect();
        }
        _ => {}
    }
    let one_sql = format!(
        "SELECT CASE WHEN pg_catalog.octet_length(b.t) <= $2 THEN b.t END, pg_catalog.octet_length(b.t)::bigint
           FROM (SELECT {function}($1)::text AS t OFFSET 0) b"
    );
    ids.iter()
        .map(|id| {
            let sql = one_sql.clone();
            let id = id.clone();
            try_subtransaction(move || {
                with_settings(&[(c"lock_timeout", BODY_LOCK_TIMEOUT)], || {
                    Spi::connect_mut(|c| {
                        let t = c.update(sql.as_str(), None, &[id.as_str().into(), limit.into()]).unwrap_or_else(|e| panic!("{e}"));
                        t.first().get_two::<String, i64>().unwrap_or_else(|e| panic!("{e}"))
                    })
                })
            })
            .map_err(|e| format!("body function {function} failed: {} (SQLSTATE {})", e.message, e.sqlstate))
            .and_then(|r| within_limit(r, limit))
        })
        .collect()
}

pub fn render(kinds: &HashMap<String, Kind>, jobs: &[Claimed], max_body_bytes: i64, max_response_bytes: usize) -> Vec<Rendered> {
    // Body functions, one call per kind.
    let mut by_kind: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, j) in jobs.iter().enumerate() {
        by_kind.entry(j.kind.as_str()).or_default().push(i);
    }
    let mut body_of: Vec<Option<Result<Option<String>, String>>> = (0..jobs.len()).map(|_| None).collect();
    for (kind, idx) in &by_kind {
        let Some(function) = kinds.get(*kind).and_then(|k| k.body_fn.as_deref()) else { continue };
        let ids: Vec<String> = idx.iter().map(|&i| jobs[i].id.clone()).collect();
        for (&i, b) in idx.iter().zip(bodies(function, &ids, max_body_bytes)) {
            body_of[i] = Some(b);
        }
    }
    jobs.iter()
        .zip(body_of)
        .map(|(job, body)| {
            let Some(kind) = kinds.get(&job.kind) else {
                return Rendered::Broken("kind is not registered".into());
            };
            let url = template::render(&kind.url, &job.kind, &job.id);
            let (method, body) = match body {
                None => {
                    let doc = serde_json::json!({ "kind": job.kind, "id": job.id });
                    (Method::Put, Some(doc.to_string().into_bytes()))
                }
                Some(Err(e)) => return Rendered::Broken(e),
                Some(Ok(Some(json))) => (Method::Put, Some(json.into_bytes())),
                Some(Ok(None)) if kind.delete_when_missing => (Method::Delete, None),
                Some(Ok(None)) => return Rendered::Skip,
            };
            let mut headers = kind.headers.clone();
            headers.push((SEQUENCE_HEADER.to_string(), job.sequence.to_string()));
            Rendered::Send(Request {
                job_id: job.job_id,
                method,
                url,
                body,
                headers,
                key: kind.key.clone(),
                timeout: kind.timeout,
                max_response_bytes,
                keep_alive: !kind.host_per_record,
            })
        })
        .collect()
}

#[cfg(test)]
mod unit {
    use super::within_limit;

    #[test]
    fn a_body_over_the_limit_is_an_error_naming_both_sizes() {
        assert_eq!(within_limit((Some("{}".into()), Some(2)), 10), Ok(Some("{}".into())));
        assert_eq!(within_limit((None, None), 10), Ok(None));
        let e = within_limit((None, Some(11)), 10).unwrap_err();
        assert!(e.contains("11 bytes") && e.contains("outbox.max_body_bytes is 10"), "{e}");
    }
}
