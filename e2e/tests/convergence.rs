//! The promise, tested at random: concurrent writers change 1,000 tracked
//! records (some transactions roll back, some changes sit in savepoints that
//! are released or rolled back, some statements change 300 records at once)
//! while the receiver fails at random
//! and the worker is killed and the server restarted at random moments.
//! Some of their transactions also change an untracked table, `items2`, and
//! announce those changes with `outbox.enqueue()`: the other capture path,
//! in the same transactions. After quiescing, the receiver's latest state of
//! every record of both kinds must equal the database's. OUTBOX_SEED replays
//! a run's faults; OUTBOX_SOAK_SECS lengthens it (`make soak`).

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::{Chaos, Receiver, Recorded};
use outbox_e2e::wait_until;
use postgres::{Client, NoTls};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RECORDS: i64 = 1000;
const WRITERS: u64 = 4;

fn connect(conninfo: &str) -> Client {
    loop {
        if let Ok(c) = Client::connect(conninfo, NoTls) {
            return c;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The operations [`apply`] draws from.
const OPS: u8 = 25;

/// One of a writer's changes: insert-or-update, increment, delete, or now
/// and then an increment of a run of 300 records (more ids than one inbox
/// row); or an insert-or-update or a delete of an `items2` row, announced
/// by an enqueue (before or after the change: either way it is in the
/// transaction).
fn apply(tx: &mut postgres::Transaction<'_>, (op, id, v): &(u8, i64, i64)) -> Result<u64, postgres::Error> {
    const ENQUEUE: &str = "SELECT outbox.enqueue('item2', $1::bigint)";
    match op {
        0..=11 => tx.execute("INSERT INTO items VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v", &[id, v]),
        12..=15 => tx.execute("UPDATE items SET v = v + 1 WHERE id = $1", &[id]),
        16..=18 => tx.execute("DELETE FROM items WHERE id = $1", &[id]),
        19 => tx.execute("UPDATE items SET v = v + 1 WHERE id BETWEEN $1 AND $1 + 299", &[id]),
        20..=22 => {
            tx.execute("INSERT INTO items2 VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v", &[id, v])?;
            tx.execute(ENQUEUE, &[id])
        }
        _ => {
            tx.execute(ENQUEUE, &[id])?;
            tx.execute("DELETE FROM items2 WHERE id = $1", &[id])
        }
    }
}

/// One writer: random inserts, updates and deletes in small transactions,
/// a fifth of them rolled back, and some of their changes in a savepoint
/// that is released or rolled back. Errors (a restarting server, deadlocks)
/// reconnect.
fn writer(conninfo: String, seed: u64, stop: Arc<AtomicBool>, commits: Arc<AtomicU64>, rollbacks: Arc<AtomicU64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = connect(&conninfo);
    while !stop.load(Ordering::Relaxed) {
        let ops: Vec<(u8, i64, i64)> = (0..rng.gen_range(1..=4)).map(|_| (rng.gen_range(0..OPS), rng.gen_range(1..=RECORDS), rng.gen())).collect();
        let commit = rng.gen_bool(0.8);
        // The ops from `split` on run in a savepoint.
        let split = if rng.gen_bool(0.3) { rng.gen_range(0..ops.len()) } else { ops.len() };
        let release = rng.gen_bool(0.5);
        let result = (|| -> Result<(), postgres::Error> {
            let mut tx = c.transaction()?;
            for op in &ops[..split] {
                apply(&mut tx, op)?;
            }
            if split < ops.len() {
                let mut sp = tx.savepoint("sp")?;
                for op in &ops[split..] {
                    apply(&mut sp, op)?;
                }
                if release {
                    sp.commit()?;
                } else {
                    sp.rollback()?;
                }
            }
            if commit {
                tx.commit()
            } else {
                tx.rollback()
            }
        })();
        match result {
            Ok(()) if commit => commits.fetch_add(1, Ordering::Relaxed),
            Ok(()) => rollbacks.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                // Deadlocks and restarts: the transaction did not happen.
                std::thread::sleep(Duration::from_millis(50));
                if c.is_closed() || c.simple_query("SELECT 1").is_err() {
                    c = connect(&conninfo);
                }
                0
            }
        };
    }
}

/// The latest successful request per path, by outbox-sequence.
fn latest(requests: &[Recorded]) -> HashMap<String, &Recorded> {
    let mut by_path: HashMap<String, &Recorded> = HashMap::new();
    for q in requests.iter().filter(|q| q.answered.is_some_and(|s| (200..300).contains(&s))) {
        let seq = |r: &Recorded| r.header("outbox-sequence").and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        match by_path.get(&q.path) {
            Some(prev) if seq(prev) >= seq(q) => {}
            _ => {
                by_path.insert(q.path.clone(), q);
            }
        }
    }
    by_path
}

#[test]
fn every_committed_change_converges_under_faults() {
    let seed: u64 = std::env::var("OUTBOX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let secs: u64 = std::env::var("OUTBOX_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(25);
    eprintln!("convergence: seed {seed} (replay with OUTBOX_SEED={seed}), {secs}s of faults");
    let mut opts = Options::default();
    opts.conf.push("outbox.retry_max = '500ms'".into());
    let mut db = Cluster::start_with(opts);
    let r = Receiver::start();
    {
        let mut c = db.client();
        c.batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
             CREATE ROLE reader NOLOGIN IN ROLE pg_read_all_data;
             CREATE FUNCTION item_body(id text) RETURNS jsonb LANGUAGE sql STABLE
                 AS $$ SELECT to_jsonb(i) FROM public.items i WHERE i.id = $1::bigint $$;
             SELECT outbox.register('item', '{}', body => 'item_body(text)', run_as => 'reader', timeout => '300 ms');
             SELECT outbox.track('items', 'item');
             CREATE TABLE items2 (id bigint PRIMARY KEY, v bigint NOT NULL);
             CREATE FUNCTION item2_body(id text) RETURNS jsonb LANGUAGE sql STABLE
                 AS $$ SELECT to_jsonb(i) FROM public.items2 i WHERE i.id = $1::bigint $$;
             SELECT outbox.register('item2', '{}', body => 'item2_body(text)', run_as => 'reader', timeout => '300 ms');",
            r.url("/items/{id}"),
            r.url("/items2/{id}")
        ))
        .unwrap();
    }
    db.wait_for_worker();
    r.set_chaos(Some(Chaos::new(seed, 0.2, Duration::from_millis(600))));

    let stop = Arc::new(AtomicBool::new(false));
    let (commits, rollbacks) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let conninfo = db.conninfo(&db.database);
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (conninfo, stop, commits, rollbacks) = (conninfo.clone(), stop.clone(), commits.clone(), rollbacks.clone());
            std::thread::spawn(move || writer(conninfo, seed ^ (i + 1), stop, commits, rollbacks))
        })
        .collect();

    // Worker and server faults at random moments.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.rotate_left(17));
    let mut faults: HashMap<&str, u64> = HashMap::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(1500..4000)));
        let fault = match rng.gen_range(0..4) {
            0 | 1 => {
                if let Some(pid) = db.worker_pid() {
                    // SAFETY: signalling a process of the test's own cluster.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                "kill -9 worker"
            }
            2 => {
                db.restart("fast");
                "restart fast"
            }
            _ => {
                db.restart("immediate");
                "restart immediate"
            }
        };
        *faults.entry(fault).or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let receiver_faults = r.set_chaos(None);

    // Quiesce: nothing left to deliver.
    let drained = wait_until(Duration::from_secs(120), || db.drained());
    assert!(drained, "queue did not drain (seed {seed})");
    std::thread::sleep(Duration::from_millis(300));

    let mut c = db.client();
    let requests = r.requests();
    let last = latest(&requests);
    let mut lost = Vec::new();
    let mut in_tables = Vec::new();
    for table in ["items", "items2"] {
        let rows: HashMap<String, serde_json::Value> = c
            .query(&format!("SELECT id::text, to_jsonb(i)::text FROM {table} i"), &[])
            .unwrap()
            .into_iter()
            .map(|row| (format!("/{table}/{}", row.get::<_, String>(0)), serde_json::from_str(row.get::<_, &str>(1)).unwrap()))
            .collect();
        in_tables.push(format!("{} in {table}", rows.len()));
        for id in 1..=RECORDS {
            let path = format!("/{table}/{id}");
            match (rows.get(&path), last.get(&path)) {
                (Some(row), Some(q)) if q.method == "PUT" && &q.json() == row => {}
                (None, Some(q)) if q.method == "DELETE" => {}
                (None, None) => {}
                (row, q) => lost.push(format!("{path}: db {row:?}, receiver {:?}", q.map(|q| (&q.method, q.json())))),
            }
        }
    }
    let ok: Vec<&Recorded> = requests.iter().filter(|q| q.answered.is_some_and(|s| (200..300).contains(&s))).collect();
    let mut per_job: HashMap<&str, u64> = HashMap::new();
    for q in &ok {
        *per_job.entry(q.header("webhook-id").unwrap_or("")).or_default() += 1;
    }
    let duplicates: u64 = per_job.values().map(|n| n - 1).sum();
    eprintln!(
        "convergence: seed {seed}; {} commits, {} rollbacks; faults {faults:?}; receiver {receiver_faults:?}; \
         {RECORDS} records of each kind checked, {}; {} requests, {} delivered, {duplicates} duplicate deliveries; {} lost",
        commits.load(Ordering::Relaxed),
        rollbacks.load(Ordering::Relaxed),
        in_tables.join(", "),
        requests.len(),
        ok.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "seed {seed}: {} records diverged:\n{}", lost.len(), lost.join("\n"));
}
