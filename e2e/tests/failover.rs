//! A streaming standby delivers nothing; after the primary dies and the
//! standby is promoted, it delivers every job the primary committed.

use outbox_e2e::cluster::{free_port, pg_command, server_dir, Cluster, DATABASE};
use postgres::{Client, NoTls};
use outbox_e2e::receiver::{Action, Receiver};
use outbox_e2e::wait_until;
use std::time::Duration;

/// A client that reads at REPEATABLE READ: the database defaults to
/// serializable, which a hot standby refuses.
fn client(db: &Cluster) -> Option<Client> {
    let mut c = Client::connect(&db.conninfo(DATABASE), NoTls).ok()?;
    // SET takes no snapshot, so it runs under the serializable default.
    c.batch_execute("SET default_transaction_isolation = 'repeatable read'").ok()?;
    Some(c)
}

fn status(db: &Cluster) -> Option<String> {
    let mut c = client(db)?;
    c.query_opt("SELECT state FROM outbox.worker_status()", &[]).ok().flatten().map(|r| r.get(0))
}

#[test]
fn standby_idles_and_delivers_everything_after_promotion() {
    let mut primary = Cluster::start();
    let r = Receiver::start();
    // Refuse everything while the primary lives, so its jobs stay queued.
    r.set_fallback(Some(Action::status(503)));
    let mut c = primary.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    // Sessions default to serializable, which a hot standby refuses: the
    // worker's own transactions must not, there either.
    c.batch_execute("ALTER DATABASE outbox_e2e SET default_transaction_isolation = 'serializable'").unwrap();
    primary.wait_for_worker();

    // A standby made with pg_basebackup, streaming from the primary.
    let dir = primary.dir.with_extension("standby");
    server_dir(&dir);
    let data = dir.join("data");
    primary.tool("pg_basebackup", &["-D", data.to_str().unwrap(), "-R", "-X", "stream", "-c", "fast"]);
    let port = free_port();
    let conf = format!("\nport = {port}\nunix_socket_directories = '{}'\n", dir.display());
    let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
    std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
    drop(f);
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    phase("base backup taken");
    let mut standby = Cluster::adopt(dir, port);
    standby.pg_ctl_start();
    assert!(wait_until(Duration::from_secs(30), || status(&standby).as_deref() == Some("standby")), "standby status");

    phase("standby idles");
    for i in 0..50 {
        c.execute("SELECT outbox.enqueue('k', $1::text)", &[&i.to_string()]).unwrap();
    }
    let lsn: String = c.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    assert!(wait_until(Duration::from_secs(30), || {
        client(&standby).is_some_and(|mut s| {
            s.query_one("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", &[&lsn]).map(|r| r.get::<_, bool>(0)).unwrap_or(false)
        })
    }));
    phase("standby caught up");
    drop(c);
    primary.stop("immediate");
    r.set_fallback(None);
    let before = r.count();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(r.count(), before, "a standby sends nothing");
    assert_eq!(status(&standby).as_deref(), Some("standby"));

    phase("primary gone, standby silent");
    let mut promote = pg_command("pg_ctl");
    promote.args(["-D", data.to_str().unwrap(), "-w", "promote"]);
    assert!(promote.status().unwrap().success());
    let drained = || client(&standby).is_some_and(|mut c| c.query_one("SELECT count(*) FROM outbox.jobs", &[]).is_ok_and(|r| r.get::<_, i64>(0) == 0));
    assert!(wait_until(Duration::from_secs(60), drained), "the promoted standby delivers everything");
    phase("promoted standby delivered everything");
    // Requests since the primary died all come from the promoted standby.
    let mut delivered: Vec<String> = r.requests()[before..].iter().map(|q| q.path.clone()).collect();
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), 50);
}
