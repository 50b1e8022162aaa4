//! Hostile receivers: each one misbehaves while another kind keeps being
//! delivered, and the worker stays up with bounded memory. Also the network
//! in between: TLS trust, and a forward proxy.

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::proxy::Proxy;
use outbox_e2e::receiver::{Action, Receiver};
use outbox_e2e::wait_until;
use postgres::Client;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

/// A cluster with kind `bad` (to `bad`, with a 500 ms timeout) and kind `good`.
fn setup(bad: &Receiver) -> (Cluster, Receiver, Client, i32) {
    let db = Cluster::start();
    let good = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('bad', '{}', timeout => '500 ms');
         SELECT outbox.register('good', '{}');",
        bad.url("/bad/{id}"),
        good.url("/good/{id}")
    ))
    .unwrap();
    let pid = db.wait_for_worker();
    (db, good, c, pid)
}

fn job(c: &mut Client, kind: &str, id: &str) -> Option<(String, i32, Option<i32>, Option<String>)> {
    c.query_opt("SELECT state, attempts, last_status, last_error FROM outbox.jobs WHERE kind = $1 AND id = $2", &[&kind, &id])
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

/// The good kind is still delivered and the worker is the same process.
fn still_healthy(db: &Cluster, c: &mut Client, good: &Receiver, pid: i32) {
    c.batch_execute("SELECT outbox.enqueue('good', 'after')").unwrap();
    assert!(wait_until(LONG, || good.requests_for("/good/after").len() == 1), "the other kind is still delivered");
    assert_eq!(db.worker_pid(), Some(pid), "the worker did not restart");
}

/// A figure from /proc/<pid>/status, in kB: `VmRSS` now, `VmHWM` at its peak.
fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

fn rss_kb(pid: i32) -> u64 {
    status_kb(pid, "VmRSS")
}

#[test]
fn a_receiver_that_never_answers_times_out_without_exhausting_capacity() {
    let bad = Receiver::start();
    bad.set_fallback(Some(Action::Hang(Duration::from_secs(20))));
    let (db, good, mut c, pid) = setup(&bad);
    // More hung requests than there are HTTP threads (32).
    c.batch_execute("SELECT outbox.enqueue('bad', g) FROM generate_series(1, 64) g").unwrap();
    c.batch_execute("SELECT outbox.enqueue('good', g) FROM generate_series(1, 20) g").unwrap();
    assert!(wait_until(LONG, || good.count() >= 20), "timeouts free the threads");
    // Timed out, the jobs fail with the error, and the receiver is taken
    // for down: it gets probes (attempts again of some job), not the
    // backlog again.
    let retried = "SELECT count(*) FILTER (WHERE attempts >= 2 AND last_error IS NOT NULL) FROM outbox.jobs WHERE kind = 'bad'";
    assert!(wait_until(LONG, || c.query_one(retried, &[]).unwrap().get::<_, i64>(0) >= 1), "the receiver is tried again");
    let breaker: String = c.query_one("SELECT breaker FROM outbox.stats() WHERE kind = 'bad'", &[]).unwrap().get(0);
    assert_ne!(breaker, "closed");
    still_healthy(&db, &mut c, &good, pid);
}

#[test]
fn a_huge_response_is_read_only_up_to_the_limit() {
    let bad = Receiver::start();
    bad.set_fallback(Some(Action::Huge(100 * 1024 * 1024)));
    let (db, good, mut c, pid) = setup(&bad);
    let before = rss_kb(pid);
    c.batch_execute("SELECT outbox.enqueue('bad', g) FROM generate_series(1, 8) g").unwrap();
    assert!(wait_until(LONG, || job(&mut c, "bad", "8").is_none() && bad.count() >= 8), "2xx with a huge body counts as delivered");
    let after = rss_kb(pid);
    eprintln!("worker RSS: {before} kB before, {after} kB after 8 × 100 MB responses");
    assert!(after < before + 50 * 1024, "RSS grew from {before} kB to {after} kB");
    still_healthy(&db, &mut c, &good, pid);
}

/// Bodies over `outbox.max_body_bytes` fail their own jobs, are never held
/// whole by the worker, and go once the limit allows them.
#[test]
fn a_huge_body_fails_its_job_without_the_worker_holding_it() {
    let big = Receiver::start();
    let (db, good, mut c, pid) = setup(&big);
    c.batch_execute(&format!(
        "CREATE FUNCTION big_body(id text) RETURNS json LANGUAGE sql STABLE AS $$
             SELECT json_build_object('id', id, 'pad', repeat('x', CASE WHEN id LIKE 'huge%' THEN 20000000 ELSE 10 END))
         $$;
         CREATE ROLE reader NOLOGIN;
         -- Six 20 MB bodies take about a second to build on the test
         -- machine: more time than the default render_timeout, which is
         -- not what this test is about.
         SELECT outbox.register('big', '{}', body => 'big_body(text)', run_as => 'reader', max_attempts => 1,
                                render_timeout => '1 min');",
        big.url("/big/{id}")
    ))
    .unwrap();
    let peak_before = status_kb(pid, "VmHWM");
    // Six 20 MB bodies in one batch, with a small one.
    c.batch_execute(
        "BEGIN; SELECT outbox.enqueue('big', 'huge' || g) FROM generate_series(1, 6) g; SELECT outbox.enqueue('big', 'small'); COMMIT;",
    )
    .unwrap();
    assert!(wait_until(LONG, || {
        big.requests_for("/big/small").len() == 1 && (1..=6).all(|g| job(&mut c, "big", &format!("huge{g}")).is_some_and(|j| j.0 == "dead"))
    }));
    let (_, _, status, error) = job(&mut c, "big", "huge1").unwrap();
    assert_eq!(status, None, "nothing was sent");
    let error = error.unwrap();
    assert!(error.contains("bytes; outbox.max_body_bytes is 1048576"), "{error}");
    assert!(big.requests_for("/big/huge1").is_empty());
    let peak_after = status_kb(pid, "VmHWM");
    eprintln!("worker peak RSS: {peak_before} kB before, {peak_after} kB after six 20 MB bodies");
    assert!(peak_after < peak_before + 150 * 1024, "peak RSS grew from {peak_before} kB to {peak_after} kB");
    // Allowed by a reload, the body goes whole.
    c.batch_execute("ALTER SYSTEM SET outbox.max_body_bytes = '64MB'").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    // The worker takes the new limit at its next turn after the SIGHUP
    // reaches it; a retry claimed before that fails on the old limit, as it
    // should, and is retried until the new one applies.
    let retry = "SELECT outbox.retry(job_id) FROM outbox.jobs WHERE kind = 'big' AND id = 'huge1' AND state = 'dead'";
    assert!(wait_until(LONG, || {
        c.batch_execute(retry).unwrap();
        big.requests_for("/big/huge1").len() == 1
    }));
    assert!(big.requests_for("/big/huge1")[0].body.len() > 20_000_000);
    still_healthy(&db, &mut c, &good, pid);
}

#[test]
fn a_redirect_is_not_followed_and_the_job_is_dead() {
    let bad = Receiver::start();
    let target = Receiver::start();
    bad.set_fallback(Some(Action::with_header(302, "Location", &target.url("/elsewhere"))));
    let (db, good, mut c, pid) = setup(&bad);
    c.batch_execute("SELECT outbox.enqueue('bad', 'r')").unwrap();
    assert!(wait_until(LONG, || job(&mut c, "bad", "r").is_some_and(|j| j.0 == "dead")));
    let (_, attempts, status, error) = job(&mut c, "bad", "r").unwrap();
    assert_eq!((attempts, status), (1, Some(302)));
    assert!(error.unwrap().starts_with("HTTP 302"));
    assert_eq!(target.count(), 0, "the redirect was not followed");
    still_healthy(&db, &mut c, &good, pid);
}

#[test]
fn invalid_http_and_a_slow_drip_are_retried() {
    let bad = Receiver::start();
    bad.script("/bad/garbage", [Action::Raw { bytes: b"this is not HTTP\r\n\r\n".to_vec(), drip: None }]);
    let drip = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec();
    bad.script("/bad/drip", [Action::Raw { bytes: drip, drip: Some(Duration::from_millis(100)) }]);
    let (db, good, mut c, pid) = setup(&bad);
    c.batch_execute("SELECT outbox.enqueue('bad', 'garbage'); SELECT outbox.enqueue('bad', 'drip');").unwrap();
    // Both fail once (protocol error, timeout), then the fallback 201 delivers them.
    assert!(wait_until(LONG, || job(&mut c, "bad", "garbage").is_none() && job(&mut c, "bad", "drip").is_none()));
    assert_eq!(bad.requests_for("/bad/garbage").len(), 2);
    assert_eq!(bad.requests_for("/bad/drip").len(), 2);
    still_healthy(&db, &mut c, &good, pid);
}

/// Runs openssl with these arguments; panics if it fails.
fn openssl(args: &[&str], dir: &std::path::Path) {
    let ok = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl {args:?}");
}

/// A private CA (`ca.pem`) in a new directory named for `name`, and a
/// certificate it issued for 127.0.0.1 (`leaf.pem`, `leaf.key`).
fn private_ca(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=outbox test CA", "-keyout", "ca.key", "-out", "ca.pem"], &dir);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "leaf.key", "-out", "leaf.csr"], &dir);
    std::fs::write(dir.join("leaf.ext"), "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n").unwrap();
    openssl(&["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", "leaf.ext", "-out", "leaf.pem"], &dir);
    dir
}

#[test]
fn https_to_a_private_ca_is_delivered_once_outbox_ca_file_trusts_it() {
    let dir = private_ca("ca");
    let tls = Receiver::start_tls(&dir.join("leaf.pem"), &dir.join("leaf.key"));
    let placeholder = Receiver::start();
    let (db, good, mut c, pid) = setup(&placeholder);
    c.batch_execute(&format!("SELECT outbox.register('tls', '{}')", tls.url("/tls/{id}"))).unwrap();
    c.batch_execute("SELECT outbox.enqueue('tls', 'x')").unwrap();
    // Not trusted yet: the TLS error is on the job, which is retried.
    assert!(wait_until(LONG, || job(&mut c, "tls", "x").is_some_and(|j| j.1 >= 1 && j.3.is_some())));
    let error = job(&mut c, "tls", "x").unwrap().3.unwrap().to_lowercase();
    assert!(error.contains("certificate") || error.contains("issuer"), "a clear TLS error: {error}");
    assert_eq!(tls.count(), 0);
    // A file that can't be used keeps what is trusted, and says why in the log.
    c.batch_execute(&format!("ALTER SYSTEM SET outbox.ca_file = '{}'", dir.join("missing.pem").display())).unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tls.count(), 0);
    // Trusted on reload: the next attempt goes through.
    c.batch_execute(&format!("ALTER SYSTEM SET outbox.ca_file = '{}'", dir.join("ca.pem").display())).unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let delivered = wait_until(LONG, || job(&mut c, "tls", "x").is_none());
    let log = db.log();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(delivered, "delivered: {:?}", job(&mut c, "tls", "x"));
    let requests = tls.requests_for("/tls/x");
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "PUT");
    assert!(log.contains("outbox.ca_file: ") && log.contains("missing.pem"), "the unusable file is logged");
    assert!(log.contains("1 certificate authorities from"), "the trusted file is logged");
    still_healthy(&db, &mut c, &good, pid);
}

#[test]
fn the_environment_s_proxy_carries_http_and_https_deliveries() {
    let dir = private_ca("proxied");
    let proxy = Proxy::start();
    let (plain, direct) = (Receiver::start(), Receiver::start());
    let tls = Receiver::start_tls(&dir.join("leaf.pem"), &dir.join("leaf.key"));
    let via = format!("http://outbox:s3cret@127.0.0.1:{}", proxy.port);
    let mut opts = Options::default();
    opts.conf.push(format!("outbox.ca_file = '{}'", dir.join("ca.pem").display()));
    opts.env = vec![("HTTP_PROXY".into(), via.clone()), ("HTTPS_PROXY".into(), via), ("NO_PROXY".into(), "localhost".into())];
    let db = Cluster::start_with(opts);
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('plain', '{}');
         SELECT outbox.register('tls', '{}');
         SELECT outbox.register('direct', 'http://localhost:{}/direct/{{id}}');",
        plain.url("/plain/{id}"),
        tls.url("/tls/{id}"),
        direct.port
    ))
    .unwrap();
    for n in 1..=3 {
        c.batch_execute(&format!("SELECT outbox.enqueue('plain', {n}), outbox.enqueue('tls', {n}), outbox.enqueue('direct', {n})")).unwrap();
    }
    let delivered = wait_until(LONG, || outbox_e2e::jobs_left(&mut c) == 0);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(delivered, "left: {:?}", c.query("SELECT kind, id, attempts, last_error FROM outbox.jobs", &[]).unwrap().iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, i32>(2), r.get::<_, Option<String>>(3))).collect::<Vec<_>>());
    for n in 1..=3 {
        for (r, path) in [(&plain, format!("/plain/{n}")), (&tls, format!("/tls/{n}")), (&direct, format!("/direct/{n}"))] {
            assert_eq!(r.requests_for(&path).len(), 1, "{path}");
        }
    }
    let seen = proxy.seen();
    let auth = Some("Basic b3V0Ym94OnMzY3JldA==".to_string());
    // Plain HTTP: each request, in absolute form, with the credentials.
    for n in 1..=3 {
        let line = format!("PUT http://127.0.0.1:{}/plain/{n} HTTP/1.1", plain.port);
        assert!(seen.iter().any(|s| s.line == line && s.auth == auth), "{line} in {seen:?}");
    }
    // HTTPS: tunnels to the receiver, the credentials on the CONNECT.
    let connect = format!("CONNECT 127.0.0.1:{} HTTP/1.1", tls.port);
    assert!(seen.iter().any(|s| s.line == connect && s.auth == auth), "{connect} in {seen:?}");
    // NO_PROXY: straight to the receiver.
    assert!(!seen.iter().any(|s| s.line.contains("direct")), "{seen:?}");
}

#[test]
fn https_to_a_self_signed_certificate_fails_clearly_and_is_retried() {
    // A TLS server with a certificate no root vouches for.
    let dir = std::env::temp_dir().join(format!("outbox-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", "key.pem", "-out", "cert.pem"], &dir);
    let tls = Receiver::start_tls(&dir.join("cert.pem"), &dir.join("key.pem"));
    let _ = std::fs::remove_dir_all(&dir);
    let placeholder = Receiver::start();
    let (db, good, mut c, pid) = setup(&placeholder);
    c.batch_execute(&format!("SELECT outbox.register('tls', '{}')", tls.url("/{id}"))).unwrap();
    c.batch_execute("SELECT outbox.enqueue('tls', 'x')").unwrap();
    let retried = wait_until(LONG, || job(&mut c, "tls", "x").is_some_and(|j| j.1 >= 2 && j.0 == "pending"));
    let row = job(&mut c, "tls", "x");
    assert_eq!(tls.count(), 0, "no request got through");
    assert!(retried, "retried: {row:?}");
    let error = row.unwrap().3.unwrap_or_default().to_lowercase();
    assert!(error.contains("certificate") || error.contains("issuer"), "a clear TLS error: {error}");
    still_healthy(&db, &mut c, &good, pid);
}
