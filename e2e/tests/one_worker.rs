//! One delivery worker serves the database at every moment (issue #22).
//!
//! A launcher that restarts has no handle on the worker it started, so it
//! starts another: that one must wait, showing so in pg_stat_activity, until
//! the first exits, then take over, woken by commits as the first was. Two
//! workers at once would claim the same jobs, send a record twice at once and
//! answer each other's claims.
//!
//! And an outcome names the claim it answers: after
//! `TRUNCATE outbox.queue RESTART IDENTITY`, a request still in flight must
//! not complete the new job that took its job id.

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::{Action, Gate, Receiver};
use outbox_e2e::{jobs_left, wait_until};
use postgres::{Client, NoTls};
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(30);
/// What a worker shows as its activity while another one serves.
const WAITING: &str = "waiting for the other outbox worker to exit";
/// How soon a commit must be delivered when only its wake-up can explain a
/// delivery (a poll interval of a minute).
const PROMPT: Duration = Duration::from_secs(5);
const RECORDS: i32 = 200;
const WRITERS: u64 = 2;

/// The outbox worker backends: pid, and whether it waits for another.
fn workers(c: &mut Client) -> Vec<(i32, bool)> {
    c.query(
        "SELECT pid, coalesce(query = $1, false) FROM pg_stat_activity WHERE backend_type = 'outbox worker'",
        &[&WAITING],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Worker backends that don't say they wait: the one serving, and any just
/// started that hasn't yet looked whether another serves.
fn not_waiting(c: &mut Client) -> HashSet<i32> {
    workers(c).into_iter().filter(|w| !w.1).map(|w| w.0).collect()
}

fn launcher(c: &mut Client) -> Option<i32> {
    c.query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox launcher'", &[])
        .unwrap()
        .map(|r| r.get(0))
}

/// The worker `outbox.worker_status()` names, once it is past its start-up.
fn serving(c: &mut Client) -> Option<i32> {
    c.query_opt("SELECT pid FROM outbox.worker_status() WHERE state IN ('idle', 'delivering')", &[])
        .unwrap()
        .and_then(|r| r.get(0))
}

fn terminate(c: &mut Client, pids: &[i32]) {
    c.execute("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p", &[&pids.to_vec()]).unwrap();
}

/// Waits until a worker other than `gone` serves: named by worker_status(),
/// and the only worker in pg_stat_activity that doesn't wait.
fn wait_for_takeover(c: &mut Client, gone: i32) -> i32 {
    let mut pid = None;
    let took_over = wait_until(LONG, || {
        pid = serving(c).filter(|p| *p != gone && not_waiting(c) == HashSet::from([*p]));
        pid.is_some()
    });
    assert!(took_over, "no worker took over from {gone}: {:?}", workers(c));
    pid.unwrap()
}

/// A tracked `items` table (int key) whose body is the row as JSON, read as
/// role `reader`; its kind `item` sends to `r` at /items/{id}.
fn items(c: &mut Client, r: &Receiver) {
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         CREATE ROLE reader NOLOGIN IN ROLE pg_read_all_data;
         CREATE FUNCTION item_body(id text) RETURNS jsonb LANGUAGE sql STABLE
             AS $$ SELECT to_jsonb(i) FROM public.items i WHERE i.id = $1::int $$;
         SELECT outbox.register('item', '{}', body => 'item_body(text)', run_as => 'reader');
         SELECT outbox.track('items', 'item');",
        r.url("/items/{id}")
    ))
    .unwrap();
}

/// Records whose latest successful delivery (by outbox-sequence, the later
/// arrival on a tie) is not the row as it is now.
fn diverged(c: &mut Client, r: &Receiver) -> Vec<String> {
    let mut latest: HashMap<String, (i64, serde_json::Value)> = HashMap::new();
    for q in r.requests().iter().filter(|q| q.answered.is_some_and(|s| (200..300).contains(&s))) {
        let seq: i64 = q.header("outbox-sequence").and_then(|s| s.parse().ok()).unwrap_or(0);
        if latest.get(&q.path).is_none_or(|(prev, _)| seq >= *prev) {
            latest.insert(q.path.clone(), (seq, q.json()));
        }
    }
    let mut lost = Vec::new();
    for row in c.query("SELECT id, to_jsonb(i)::text FROM items i ORDER BY id", &[]).unwrap() {
        let path = format!("/items/{}", row.get::<_, i32>(0));
        let now: serde_json::Value = serde_json::from_str(row.get(1)).unwrap();
        match latest.get(&path) {
            Some((_, sent)) if *sent == now => {}
            sent => lost.push(format!("{path}: db {now}, receiver {:?}", sent.map(|s| &s.1))),
        }
    }
    lost
}

/// Polls pg_stat_activity every 10 ms, over its own connection, for two
/// workers that both serve (neither shows the waiting message). A worker
/// just started has not yet said that it waits, and one that just exited may
/// be listed a moment longer: a sighting counts if the same two still both
/// serve 200 ms later, as two workers really serving would.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, Vec<String>)>,
}

impl Watch {
    fn start(conninfo: &str) -> Watch {
        let mut c = Client::connect(conninfo, NoTls).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let (mut looks, mut seen) = (0, Vec::new());
            while !stopped.load(Ordering::Relaxed) {
                looks += 1;
                let serving = not_waiting(&mut c);
                if serving.len() > 1 {
                    std::thread::sleep(Duration::from_millis(200));
                    let still: Vec<i32> = not_waiting(&mut c).intersection(&serving).copied().collect();
                    if still.len() > 1 {
                        seen.push(format!("at {:?}: {still:?} both serve; workers {:?}", start.elapsed(), workers(&mut c)));
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (looks, seen)
        });
        Watch { stop, thread }
    }

    /// Stops watching: how many looks it took, and what it saw.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Increments random records, one to three a transaction (in id order, so
/// that writers never deadlock), until `stop`; returns how many it committed.
/// Each transaction holds `pause` for reading: the test takes it for writing
/// to hold the writers still.
fn writer(conninfo: String, seed: u64, stop: Arc<AtomicBool>, pause: Arc<RwLock<()>>) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = Client::connect(&conninfo, NoTls).unwrap();
    let mut commits = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut ids: Vec<i32> = (0..rng.gen_range(1..=3)).map(|_| rng.gen_range(1..=RECORDS)).collect();
        ids.sort();
        {
            let _writing = pause.read().unwrap();
            let mut tx = c.transaction().unwrap();
            for id in &ids {
                tx.execute("UPDATE items SET v = v + 1 WHERE id = $1", &[id]).unwrap();
            }
            tx.commit().unwrap();
        }
        commits += 1;
        // A pace two cores keep up with, beside the worker and the receiver.
        std::thread::sleep(Duration::from_millis(5));
    }
    commits
}

/// Launchers killed and restarted while a worker serves, then the launcher
/// and the worker at once, then the worker alone, all under a steady stream
/// of commits. At no moment do two workers serve; the receiver never has two
/// requests for one record at once; every record converges; and after the
/// last handover a commit still wakes the worker.
#[test]
fn restarted_launchers_and_killed_workers_never_make_two_workers() {
    let seed: u64 = std::env::var("OUTBOX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("one worker: seed {seed} (replay with OUTBOX_SEED={seed})");
    // A poll interval of a minute: deliveries are explained by commits'
    // wake-ups (and takeovers), never by polling.
    let mut opts = Options::default();
    opts.conf.push("outbox.poll_interval = '60s'".into());
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    // Answers take a moment, so that requests are in flight across the
    // launcher restarts.
    r.set_fallback(Some(Action::delayed(200, Duration::from_millis(30))));
    let mut c = db.client();
    items(&mut c, &r);
    let mut worker = db.wait_for_worker();
    c.execute("INSERT INTO items SELECT g, 0 FROM generate_series(1, $1::int) g", &[&RECORDS]).unwrap();
    assert!(wait_until(LONG, || r.distinct_paths() == RECORDS as usize), "every record delivered once");

    let conninfo = db.conninfo(&db.database);
    let watch = Watch::start(&conninfo);
    let (stop, pause) = (Arc::new(AtomicBool::new(false)), Arc::new(RwLock::new(())));
    let writers: Vec<JoinHandle<u64>> = (0..WRITERS)
        .map(|i| {
            let (conninfo, stop, pause) = (conninfo.clone(), Arc::clone(&stop), Arc::clone(&pause));
            std::thread::spawn(move || writer(conninfo, seed ^ (i + 1), stop, pause))
        })
        .collect();

    // Three times: the launcher dies, and the postmaster starts it again
    // after its restart time (5 s). The new launcher has no handle on the
    // worker that serves: it must leave it alone, not start a second. (A
    // second one started anyway waits: `launcher::tests`.)
    for round in 1..=3 {
        let old = launcher(&mut c).expect("a launcher");
        terminate(&mut c, &[old]);
        assert!(wait_until(LONG, || launcher(&mut c).is_some_and(|p| p != old)), "round {round}: the launcher is back");
        let saw = wait_until(LONG, || db.log().matches("a worker this launcher did not start").count() >= round);
        assert!(saw, "round {round}: the new launcher found the worker serving");
        let n = r.count();
        assert!(wait_until(LONG, || r.count() > n + 10), "round {round}: deliveries go on");
        assert_eq!(workers(&mut c), vec![(worker, false)], "round {round}: one worker, the first");
        assert_eq!(serving(&mut c), Some(worker), "round {round}: the first worker serves on");
    }

    // Then the launcher and the serving worker at once, and then the serving
    // worker alone: a waiting worker (or a new one) takes over. The writers
    // are held still and the queue drained before each kill, so that no
    // request of the killed worker is left in flight: the receiver may still
    // be answering a dead worker's request when its job is rightly sent
    // again, an overlap that is not the workers' doing.
    for (what, with_launcher) in [("launcher and worker", true), ("worker alone", false)] {
        let old_launcher = launcher(&mut c).expect("a launcher");
        {
            let _still = pause.write().unwrap();
            assert!(wait_until(LONG, || jobs_left(&mut c) == 0), "{what}: drained before the kill");
            terminate(&mut c, &if with_launcher { vec![worker, old_launcher] } else { vec![worker] });
            // Held until it has exited: a commit must not wake it into one
            // more claim on its way out.
            let exited = wait_until(LONG, || workers(&mut c).iter().all(|w| w.0 != worker));
            assert!(exited, "{what}: the killed worker exited");
        }
        let next = wait_for_takeover(&mut c, worker);
        if with_launcher {
            assert!(wait_until(LONG, || launcher(&mut c).is_some_and(|p| p != old_launcher)), "{what}: the launcher is back");
        }
        worker = next;
        let n = r.count();
        assert!(wait_until(LONG, || r.count() > n + 10), "{what}: commits wake the worker that took over");
    }

    stop.store(true, Ordering::Relaxed);
    let commits: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(wait_until(Duration::from_secs(60), || jobs_left(&mut c) == 0), "the queue drains");
    let (looks, seen) = watch.finish();
    eprintln!(
        "one worker: {commits} commits, {} requests, {looks} looks at pg_stat_activity, workers now {:?}",
        r.count(),
        workers(&mut c)
    );
    assert!(seen.is_empty(), "two workers served at once:\n{}", seen.join("\n"));
    assert!(r.overlaps().is_empty(), "records with two requests in flight at once: {:?}", r.overlaps());
    let lost = diverged(&mut c, &r);
    assert!(lost.is_empty(), "{} records diverged:\n{}", lost.len(), lost.join("\n"));
    // A launcher may just have started a worker that has yet to say it waits.
    let one = wait_until(LONG, || not_waiting(&mut c) == HashSet::from([worker]));
    assert!(one, "one worker serves: {:?}", workers(&mut c));
    assert_eq!(serving(&mut c), Some(worker), "worker_status() names it");

    // A commit after the last handover, delivered promptly: with a poll
    // interval of a minute, only the commit's wake-up can explain that.
    let v: i32 = c.query_one("UPDATE items SET v = v + 1000 WHERE id = 1 RETURNING v", &[]).unwrap().get(0);
    let prompt = wait_until(PROMPT, || r.requests_for("/items/1").last().is_some_and(|q| q.json()["v"] == v));
    assert!(prompt, "a commit after the last handover was not delivered within {PROMPT:?}");
}

/// Job ids start again at 1 after `TRUNCATE outbox.queue RESTART IDENTITY`.
/// The answers to requests sent before it must not settle the new jobs that
/// took their ids: here the old requests succeed while the new ones are in
/// flight and then fail, so an old answer taken for a new job's would lose
/// that job's record.
#[test]
fn an_answer_to_a_truncated_job_does_not_settle_the_job_that_took_its_id() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    let (old, new) = (Gate::new(), Gate::new());
    for i in 1..=5 {
        r.script(&format!("/k/a{i}"), [Action::held(&old, 200)]);
        r.script(&format!("/k/b{i}"), [Action::held(&new, 500), Action::status(200)]);
    }
    let enqueue_five = |c: &mut Client, prefix: &str| {
        let calls: String = (1..=5).map(|i| format!("SELECT outbox.enqueue('k', '{prefix}{i}');")).collect();
        c.batch_execute(&format!("BEGIN; {calls} COMMIT;")).unwrap();
    };
    let all_sent = |prefix: &str| (1..=5).all(|i| !r.requests_for(&format!("/k/{prefix}{i}")).is_empty());
    let job_ids = |prefix: &str| -> HashSet<String> {
        let path = format!("/k/{prefix}");
        r.requests().iter().filter(|q| q.path.starts_with(&path)).filter_map(|q| q.header("webhook-id").map(String::from)).collect()
    };

    enqueue_five(&mut c, "a");
    assert!(wait_until(LONG, || all_sent("a")), "a1..a5 in flight");
    c.batch_execute("TRUNCATE outbox.queue RESTART IDENTITY").unwrap();
    enqueue_five(&mut c, "b");
    assert!(wait_until(LONG, || all_sent("b")), "b1..b5 are sent while a1..a5 are still in flight");
    let (a_ids, b_ids) = (job_ids("a"), job_ids("b"));
    assert!(!a_ids.is_disjoint(&b_ids), "the new jobs took the old ones' ids: a {a_ids:?}, b {b_ids:?}");

    // The old requests succeed. A marker delivered and recorded after that
    // shows the worker has had those answers.
    old.open();
    c.batch_execute("SELECT outbox.enqueue('k', 'marker')").unwrap();
    let marker_done = |c: &mut Client| {
        c.query_one("SELECT count(*) FROM outbox.jobs WHERE id = 'marker'", &[]).unwrap().get::<_, i64>(0) == 0
    };
    assert!(wait_until(LONG, || !r.requests_for("/k/marker").is_empty() && marker_done(&mut c)), "the marker is delivered");
    let running: Vec<(i64, String, String)> = c
        .query("SELECT job_id, id, state FROM outbox.jobs WHERE id LIKE 'b%' ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert!(
        running.len() == 5 && running.iter().all(|j| j.2 == "running"),
        "the old answers left the new jobs running: {running:?}"
    );

    // The new requests fail, and are retried until they succeed.
    new.open();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0), "the queue drains");
    for i in 1..=5 {
        let path = format!("/k/b{i}");
        let answers: Vec<Option<u16>> = r.requests_for(&path).iter().map(|q| q.answered).collect();
        assert_eq!(answers, [Some(500), Some(200)], "{path}: failed once, then delivered");
    }
}
