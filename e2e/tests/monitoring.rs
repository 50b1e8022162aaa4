//! Metrics and alerts (issue #25), checked with the real tools:
//! `outbox.metrics()` passes `promtool check metrics`; postgres_exporter,
//! run with `docs/monitoring/postgres_exporter.yaml`, serves the same
//! samples; the alert rules pass `promtool test rules`. The tools come from
//! Debian's packages, unpacked by `scripts/setup.sh` into
//! `OUTBOX_MONITORING_BIN`.

use outbox_e2e::cluster::{free_port, Cluster};
use outbox_e2e::receiver::{Action, Receiver};
use outbox_e2e::wait_until;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("OUTBOX_MONITORING_BIN").unwrap_or_else(|_| "/opt/outbox-monitoring/usr/bin".into());
    let path = PathBuf::from(dir).join(name);
    assert!(path.exists(), "{} is missing: scripts/setup.sh unpacks it", path.display());
    path
}

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring")
}

/// Samples by name and labels (sorted, without `skip`), from an exposition.
fn samples(text: &str, skip: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("outbox_")) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let mut labels: Vec<&str> =
            labels.trim_end_matches('}').split(',').filter(|l| !l.is_empty() && !l.starts_with(&format!("{skip}="))).collect();
        labels.sort();
        let value = if value == "+Inf" { f64::INFINITY } else { value.parse().unwrap_or_else(|e| panic!("{line}: {e}")) };
        out.insert(format!("{name}{{{}}}", labels.join(",")), value);
    }
    out
}

/// Stops the exporter when the test ends, however it ends.
struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.lines().next()?.contains(" 200 ").then(|| body.to_string())
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    for args in [["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]] {
        let out = Command::new(tool("promtool")).args(args).current_dir(monitoring_dir()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
    }
}

/// Kinds in every state the metrics tell: delivering, refused (dead jobs),
/// down (an open breaker), paused with a backlog, limited.
#[test]
fn metrics_pass_promtool_and_the_exporter_file_serves_the_same() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    for (kind, status) in [("ok", 204), ("bad", 422), ("down", 503), ("held", 204)] {
        c.batch_execute(&format!("SELECT outbox.register('{kind}', '{}')", r.url(&format!("/{kind}/{{id}}")))).unwrap();
        for i in 0..20 {
            r.script(&format!("/{kind}/{i}"), std::iter::repeat_n(Action::status(status), 50));
        }
    }
    c.batch_execute(
        "SELECT outbox.pause('held'); SELECT outbox.set_max_in_flight('ok', 4); SELECT outbox.set_rate_limit('ok', 500);
         SELECT count(outbox.enqueue(k, g)) FROM unnest('{ok,bad,down,held}'::text[]) k, generate_series(0, 19) g",
    )
    .unwrap();
    db.wait_for_worker();
    let stat = |c: &mut postgres::Client, sql: &str| -> i64 { c.query_one(sql, &[]).unwrap().get(0) };
    assert!(wait_until(LONG, || {
        stat(&mut c, "SELECT count(*) FROM outbox.stats() WHERE (kind = 'ok' AND delivered = 20) OR (kind = 'bad' AND dead = 20)
                       OR (kind = 'down' AND breaker <> 'closed')") == 3
    }));
    // Stop the probes, then let what is out come back: both reads below see
    // the same counters.
    c.batch_execute("SELECT outbox.pause('down')").unwrap();
    assert!(wait_until(LONG, || stat(&mut c, "SELECT sum(running)::bigint FROM outbox.stats()") == 0));

    let metrics: String = c.query_one("SELECT outbox.metrics()", &[]).unwrap().get(0);
    let mut check = Command::new(tool("promtool")).args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    check.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = samples(&metrics, "");
    let get = |name: &str, kind: &str, more: &str| {
        let key = format!("{name}{{database=\"outbox_e2e\",kind=\"{kind}\"{more}}}");
        *ours.get(&key).unwrap_or_else(|| panic!("no {key} in\n{metrics}"))
    };
    assert_eq!(get("outbox_kind_delivered_total", "ok", ""), 20.0);
    assert_eq!(get("outbox_delivery_latency_seconds_count", "ok", ""), 20.0);
    assert_eq!(get("outbox_attempts_total", "bad", ",outcome=\"rejected\""), 20.0);
    assert_eq!(get("outbox_kind_dead", "bad", ""), 20.0);
    assert!(get("outbox_attempts_total", "down", ",outcome=\"server_error\"") >= 10.0);
    assert_eq!(get("outbox_kind_breaker_state", "down", ""), 2.0);
    assert_eq!(get("outbox_kind_breaker_state", "ok", ""), 0.0);
    assert_eq!(get("outbox_kind_pending", "held", ""), 20.0);
    assert_eq!(get("outbox_kind_paused", "held", ""), 1.0);
    assert_eq!(get("outbox_kind_max_in_flight", "ok", ""), 4.0);
    assert_eq!(get("outbox_kind_rate_limit", "ok", ""), 500.0);

    // The exporter's role has only what docs/operations.md grants it.
    c.batch_execute(
        "CREATE ROLE exporter LOGIN;
         GRANT USAGE ON SCHEMA outbox TO exporter;
         GRANT EXECUTE ON FUNCTION outbox.stats() TO exporter;
         GRANT SELECT ON outbox.jobs, outbox.kind_stats TO exporter;
         GRANT SELECT (kind, paused, max_in_flight, rate_limit) ON outbox.kinds TO exporter;",
    )
    .unwrap();
    let port = free_port();
    let log = std::env::temp_dir().join(format!("outbox-exporter-{port}.log"));
    let _exporter = Exporter(
        Command::new(tool("prometheus-postgres-exporter"))
            .arg(format!("--extend.query-path={}", monitoring_dir().join("postgres_exporter.yaml").display()))
            .args(["--disable-default-metrics", "--disable-settings-metrics", &format!("--web.listen-address=127.0.0.1:{port}")])
            .env("DATA_SOURCE_NAME", format!("{} sslmode=disable", db.conninfo("outbox_e2e").replace("user=postgres", "user=exporter")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut scraped = None;
    let served = wait_until(LONG, || {
        scraped = scrape(port).filter(|t| t.contains("outbox_attempts_total"));
        scraped.is_some()
    });
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(served, "the exporter served no outbox metrics; it said:\n{said}");
    let theirs = samples(&scraped.unwrap(), "server");
    // The same series, and the same values but for the ages, which grew
    // between the two reads.
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (series, value) in &ours {
        let other = theirs[series];
        if series.starts_with("outbox_kind_oldest_pending_age_seconds") {
            assert!((other - value).abs() < 30.0, "{series}: {value} and {other}");
        } else {
            assert_eq!(*value, other, "{series}");
        }
    }
}

/// `outbox.attempts` keeps the last `outbox.attempts_kept` attempts of each
/// kind, with outcome, status, duration and error; none at 0.
#[test]
fn the_last_attempts_of_each_kind_are_kept_when_asked() {
    let mut opts = outbox_e2e::cluster::Options::default();
    opts.conf.push("outbox.attempts_kept = 3".into());
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('a', '{}'); SELECT outbox.register('b', '{}');", r.url("/a/{id}"), r.url("/b/{id}")))
        .unwrap();
    db.wait_for_worker();
    r.script("/a/1", [Action::status(500), Action::status(500), Action::status(204)]);
    r.script("/a/2", [Action::with_body(422, "no such thing")]);
    // Jobs not yet settled (the rejected one stays, dead).
    let left = |c: &mut postgres::Client| -> i64 { c.query_one("SELECT count(*) FROM outbox.jobs WHERE state <> 'dead'", &[]).unwrap().get(0) };
    c.execute("SELECT outbox.enqueue('a', 1)", &[]).unwrap();
    assert!(wait_until(LONG, || left(&mut c) == 0));
    c.execute("SELECT outbox.enqueue('a', 2)", &[]).unwrap();
    assert!(wait_until(LONG, || r.requests_for("/a/2").len() == 1));
    c.batch_execute("SELECT count(outbox.enqueue('b', g)) FROM generate_series(1, 5) g").unwrap();
    assert!(wait_until(LONG, || r.distinct_paths() == 7));
    let rows = |c: &mut postgres::Client, kind: &str| -> Vec<String> {
        c.query(
            "SELECT concat_ws(' ', id, attempt, method, outcome, status, duration_ms >= 0, error) FROM outbox.attempts WHERE kind = $1 ORDER BY attempt_id",
            &[&kind],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert!(wait_until(LONG, || rows(&mut c, "a").len() == 3 && rows(&mut c, "b").len() == 3), "{:?}", rows(&mut c, "a"));
    assert_eq!(rows(&mut c, "a"), ["1 2 PUT server_error 500 t HTTP 500", "1 3 PUT delivered 204 t", "2 1 PUT rejected 422 t HTTP 422: no such thing"]);
    // At 0, none more.
    c.batch_execute("ALTER SYSTEM SET outbox.attempts_kept = 0").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before: i64 = c.query_one("SELECT max(attempt_id) FROM outbox.attempts", &[]).unwrap().get(0);
    c.batch_execute("SELECT count(outbox.enqueue('b', g)) FROM generate_series(6, 9) g").unwrap();
    assert!(wait_until(LONG, || r.distinct_paths() == 11 && left(&mut c) == 0));
    let after: i64 = c.query_one("SELECT max(attempt_id) FROM outbox.attempts", &[]).unwrap().get(0);
    assert_eq!(after, before);
}
