//! What `outbox.metrics()` tells, in the Prometheus text exposition format
//! (version 0.0.4), and the delivery latency histogram the worker counts
//! into. Pure: the rows come in as arguments.

use super::policy::Class;
use std::fmt::Write;

/// Upper bounds, in seconds, of the latency histogram's buckets: from a
/// few milliseconds (a worker that keeps up) to an hour (a receiver that
/// was down). A last bucket, +Inf, holds the rest.
const LATENCY_BOUNDS: [f64; 16] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Buckets a kind's histogram has, +Inf included.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS.len() + 1;

/// The bucket a latency of `seconds` falls in: the first whose bound it
/// does not exceed.
fn latency_bucket(seconds: f64) -> usize {
    LATENCY_BOUNDS.iter().position(|&le| seconds <= le).unwrap_or(LATENCY_BOUNDS.len())
}

/// A batch's counts for one kind, as `outbox.kind_stats` adds them up.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    pub delivered: i64,
    /// Failed attempts: rejected, throttled, server errors, unreachable,
    /// unbuildable.
    pub failed: [i64; 5],
    pub latency: [i64; LATENCY_BUCKETS],
    pub latency_sum: f64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { delivered: 0, failed: [0; 5], latency: [0; LATENCY_BUCKETS], latency_sum: 0.0 }
    }
}

impl Tally {
    /// Counts an attempt; a delivery in the histogram too when a request
    /// went out (`latency`: the seconds since its change).
    pub fn add(&mut self, class: Class, latency: Option<f64>) {
        let failed = match class {
            Class::Delivered => {
                self.delivered += 1;
                if let Some(latency) = latency {
                    let latency = latency.max(0.0);
                    self.latency[latency_bucket(latency)] += 1;
                    self.latency_sum += latency;
                }
                return;
            }
            failed => FAILED.iter().position(|c| *c == failed).expect("a failed class"),
        };
        self.failed[failed] += 1;
    }
}

/// What `outbox.metrics()` reads of one kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KindRow {
    pub kind: String,
    pub pending: i64,
    pub running: i64,
    pub dead: i64,
    /// Seconds the oldest pending change has waited (0 when none).
    pub oldest_pending: f64,
    pub delivered: i64,
    /// As in [`Tally::failed`].
    pub failed: [i64; 5],
    /// Per bucket, not cumulative; shorter (a kind that never delivered)
    /// means zeros.
    pub latency: Vec<i64>,
    pub latency_sum: f64,
    /// closed, open or half-open.
    pub breaker: String,
    pub paused: bool,
    pub max_in_flight: Option<i32>,
    pub rate_limit: Option<f64>,
}

/// The classes [`Tally::failed`] counts, in its order.
const FAILED: [Class; 5] = [Class::Rejected, Class::Throttled, Class::ServerError, Class::Unreachable, Class::Unbuildable];

/// A label value with `\`, `"` and newlines escaped, as the format asks.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes one metric family: its HELP and TYPE lines, then a sample per
/// (labels after database and kind, value) that `samples` gives for a kind.
fn family<F>(out: &mut String, database: &str, rows: &[KindRow], name: &str, kind: &str, help: &str, samples: F)
where
    F: Fn(&KindRow) -> Vec<(String, String)>,
{
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for row in rows {
        let labels = format!("database=\"{}\",kind=\"{}\"", escape(database), escape(&row.kind));
        for (suffix, value) in samples(row) {
            // A suffix is `_bucket{le="…"}`-like: the name's end, then labels.
            let (end, more) = suffix.split_once('{').map_or((suffix.as_str(), ""), |(e, m)| (e, m.trim_end_matches('}')));
            let more = if more.is_empty() { String::new() } else { format!(",{more}") };
            let _ = writeln!(out, "{name}{end}{{{labels}{more}}} {value}");
        }
    }
}

/// Formats a float as Prometheus reads it.
fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// The breaker as `outbox_kind_breaker_state` tells it.
fn breaker_state(breaker: &str) -> u8 {
    match breaker {
        "closed" => 0,
        "half-open" => 1,
        _ => 2,
    }
}

/// The exposition of `database`'s kinds. The names, labels and values are
/// also what `docs/monitoring/postgres_exporter.yaml` makes of `stats()`
/// and `kind_stats`, so that one set of dashboards and alerts fits both.
pub fn exposition(database: &str, rows: &[KindRow]) -> String {
    let mut out = String::new();
    let o = &mut out;
    let one = |v: String| vec![(String::new(), v)];
    family(o, database, rows, "outbox_kind_pending", "gauge", "Pending jobs, changes not yet moved into the queue included.", |r| one(r.pending.to_string()));
    family(o, database, rows, "outbox_kind_running", "gauge", "Running jobs: their requests are out.", |r| one(r.running.to_string()));
    family(o, database, rows, "outbox_kind_dead", "gauge", "Jobs that gave up, and inbox rows set aside.", |r| one(r.dead.to_string()));
    family(o, database, rows, "outbox_kind_in_flight", "gauge", "Requests out, waiting for their answer.", |r| one(r.running.to_string()));
    family(o, database, rows, "outbox_kind_oldest_pending_age_seconds", "gauge", "How long the oldest pending change has waited (0 when none).", |r| {
        one(number(r.oldest_pending))
    });
    family(o, database, rows, "outbox_kind_delivered_total", "counter", "Records delivered (a 2xx; a 404 or 410 to a DELETE).", |r| one(r.delivered.to_string()));
    family(o, database, rows, "outbox_kind_breaker_state", "gauge", "The circuit breaker: 0 closed, 1 half-open (a probe is out), 2 open.", |r| {
        one(breaker_state(&r.breaker).to_string())
    });
    family(o, database, rows, "outbox_kind_paused", "gauge", "1 while an admin has paused the kind.", |r| one(u8::from(r.paused).to_string()));
    family(o, database, rows, "outbox_kind_max_in_flight", "gauge", "The kind's max_in_flight (0: none).", |r| one(r.max_in_flight.unwrap_or(0).to_string()));
    family(o, database, rows, "outbox_kind_rate_limit", "gauge", "The kind's rate_limit in requests a second (0: none).", |r| {
        one(number(r.rate_limit.unwrap_or(0.0)))
    });
    family(o, database, rows, "outbox_attempts_total", "counter", "Delivery attempts by what came of them.", |r| {
        let mut v = vec![("{outcome=\"delivered\"}".to_string(), r.delivered.to_string())];
        v.extend(FAILED.iter().zip(r.failed).map(|(o, n)| (format!("{{outcome=\"{}\"}}", o.name()), n.to_string())));
        v
    });
    family(o, database, rows, "outbox_delivery_latency_seconds", "histogram", "From a change's transaction to its delivery.", |r| {
        let mut cumulative = 0;
        let mut v = Vec::new();
        for (i, le) in LATENCY_BOUNDS.iter().copied().chain([f64::INFINITY]).enumerate() {
            cumulative += r.latency.get(i).copied().unwrap_or(0);
            v.push((format!("_bucket{{le=\"{}\"}}", number(le)), cumulative.to_string()));
        }
        v.push(("_sum".into(), number(r.latency_sum)));
        v.push(("_count".into(), cumulative.to_string()));
        v
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_the_first_bucket_they_do_not_exceed() {
        assert_eq!(latency_bucket(0.0), 0);
        assert_eq!(latency_bucket(0.005), 0);
        assert_eq!(latency_bucket(0.0051), 1);
        assert_eq!(latency_bucket(1.0), 7);
        assert_eq!(latency_bucket(3600.0), 15);
        assert_eq!(latency_bucket(3600.1), 16);
        assert_eq!(latency_bucket(f64::INFINITY), 16);
    }

    #[test]
    fn a_tally_counts_classes_and_latencies() {
        let mut t = Tally::default();
        t.add(Class::Delivered, Some(0.003));
        t.add(Class::Delivered, Some(2.0));
        t.add(Class::Delivered, Some(-1.0));
        // A skipped job: delivered, no request, no latency.
        t.add(Class::Delivered, None);
        t.add(Class::Throttled, Some(9.0));
        t.add(Class::Unbuildable, None);
        assert_eq!(t.delivered, 4);
        assert_eq!(t.failed, [0, 1, 0, 0, 1]);
        assert_eq!(t.latency[0], 2);
        assert_eq!(t.latency[8], 1);
        assert_eq!(t.latency_sum, 2.003);
    }

    #[test]
    fn the_exposition_has_every_family_once_with_escaped_labels() {
        let row = KindRow {
            kind: "we\"ird\\kind\n".into(),
            pending: 3,
            running: 1,
            dead: 2,
            oldest_pending: 1.5,
            delivered: 7,
            failed: [1, 2, 3, 4, 5],
            latency: vec![5, 0, 2],
            latency_sum: 0.25,
            breaker: "open".into(),
            paused: false,
            max_in_flight: Some(4),
            rate_limit: None,
        };
        let text = exposition("db", &[row, KindRow { kind: "b".into(), breaker: "closed".into(), ..KindRow::default() }]);
        let k = r#"database="db",kind="we\"ird\\kind\n""#;
        for line in [
            format!("outbox_kind_delivered_total{{{k}}} 7"),
            format!("outbox_attempts_total{{{k},outcome=\"delivered\"}} 7"),
            format!("outbox_attempts_total{{{k},outcome=\"throttled\"}} 2"),
            format!("outbox_attempts_total{{{k},outcome=\"unbuildable\"}} 5"),
            format!("outbox_kind_dead{{{k}}} 2"),
            format!("outbox_kind_in_flight{{{k}}} 1"),
            format!("outbox_kind_oldest_pending_age_seconds{{{k}}} 1.5"),
            format!("outbox_delivery_latency_seconds_bucket{{{k},le=\"0.005\"}} 5"),
            format!("outbox_delivery_latency_seconds_bucket{{{k},le=\"0.025\"}} 7"),
            format!("outbox_delivery_latency_seconds_bucket{{{k},le=\"+Inf\"}} 7"),
            format!("outbox_delivery_latency_seconds_sum{{{k}}} 0.25"),
            format!("outbox_delivery_latency_seconds_count{{{k}}} 7"),
            format!("outbox_kind_breaker_state{{{k}}} 2"),
            format!("outbox_kind_max_in_flight{{{k}}} 4"),
            format!("outbox_kind_rate_limit{{{k}}} 0"),
            "outbox_kind_breaker_state{database=\"db\",kind=\"b\"} 0".to_string(),
            "outbox_delivery_latency_seconds_bucket{database=\"db\",kind=\"b\",le=\"+Inf\"} 0".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
        // Every family is typed once, before its samples.
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE")).count(), 12);
        assert_eq!(text.matches("# TYPE outbox_kind_rate_limit gauge").count(), 1);
    }
}
