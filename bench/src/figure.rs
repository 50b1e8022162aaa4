//! What the benchmark binaries share: settings from the environment, the
//! queue's size, and one way to print a figure (a line for people, then a
//! JSON line that `make bench` appends to target/bench/results.json).

use postgres::Client;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Figure {
    pub name: &'static str,
    pub summary: String,
    /// JSON members (without braces) besides "figure" and "at".
    pub json: String,
}

pub fn report(f: Figure) {
    let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    println!("{}: {}", f.name, f.summary);
    println!("{{\"figure\":\"{}\",\"at\":{at},{}}}", f.name, f.json);
}

/// BENCH_CONF: extra postgresql.conf lines separated by ';' (for profiling).
/// Every figure is printed with the settings it changed.
pub fn conf_from_env() -> Vec<String> {
    std::env::var("BENCH_CONF").map(|v| v.split(';').filter(|s| !s.trim().is_empty()).map(str::to_string).collect()).unwrap_or_default()
}

pub fn print_settings(conf: &[String], receiver: &str) {
    if conf.is_empty() {
        println!("settings: default Postgres and outbox settings; receiver: {receiver}");
    } else {
        println!("settings changed: {}; receiver: {receiver}", conf.join("; "));
    }
}

/// Bytes of the queue and the inbox, indexes and TOAST included.
pub fn queue_bytes(c: &mut Client) -> i64 {
    c.query_one("SELECT pg_total_relation_size('outbox.queue') + pg_total_relation_size('outbox.inbox')", &[]).unwrap().get(0)
}

/// With pg_stat_statements preloaded through BENCH_CONF, prints the
/// statements that took the most time.
pub fn pg_stat_statements(c: &mut Client, conf: &[String]) {
    if !conf.iter().any(|l| l.contains("pg_stat_statements")) {
        return;
    }
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").unwrap();
    let sql = "SELECT round(total_exec_time)::bigint, calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
                 FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12";
    for row in c.query(sql, &[]).unwrap() {
        println!("  {:>8} ms {:>8} calls  {}", row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, String>(2));
    }
}

/// "queue 12 MB, queue_pkey 2 MB, ...": each outbox relation's own size.
pub fn relation_sizes(c: &mut Client) -> String {
    let sql = "SELECT c.relname::text, pg_relation_size(c.oid) FROM pg_class c
                WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind IN ('r', 'i') AND c.relname <> 'kinds' AND c.relname NOT LIKE 'kind%'
                ORDER BY 1";
    c.query(sql, &[]).unwrap().iter().map(|r| format!("{} {} kB", r.get::<_, String>(0), r.get::<_, i64>(1) / 1024)).collect::<Vec<_>>().join(", ")
}

/// The `i`th command-line argument, or `default`.
pub fn arg<T: std::str::FromStr>(i: usize, default: T) -> T {
    std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// A cluster (with BENCH_CONF), an nginx receiver, a client, and kind `k`
/// registered to deliver to `/k/{id}` with the worker running.
pub fn start_delivery() -> (outbox_e2e::cluster::Cluster, crate::nginx::Nginx, Client, Vec<String>) {
    let conf = conf_from_env();
    let db = outbox_e2e::cluster::Cluster::start_with(outbox_e2e::cluster::Options { conf: conf.clone(), create_extension: true, env: Vec::new() });
    let r = crate::nginx::Nginx::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    (db, r, c, conf)
}
