//! A throwaway PostgreSQL cluster with outbox preloaded, on a free
//! loopback port, run as `postgres` when the tests run as root. Stopped and
//! removed on drop. `OUTBOX_PG_BIN` names the server's `bin` directory
//! (`make test` runs the suite on PostgreSQL 15 and 18); PostgreSQL 15 from
//! Debian's packages by default.

use postgres::{Client, NoTls};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The server's binaries, unless `OUTBOX_PG_BIN` says otherwise.
const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The directory of the server's binaries (`postgres`, `pg_ctl`, `psql`).
pub fn bin_dir() -> String {
    std::env::var("OUTBOX_PG_BIN").unwrap_or_else(|_| DEFAULT_BIN.to_string())
}
pub const DATABASE: &str = "outbox_e2e";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub database: String,
    running: bool,
    /// The server's extra environment, kept for restarts.
    env: Vec<(String, String)>,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a Postgres binary, as `postgres` when we are root.
pub fn pg_command(bin: &str) -> Command {
    let path = format!("{}/{bin}", bin_dir());
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `dir` a fresh, empty directory the server can write to: owned by
/// `postgres` when we are root.
pub fn server_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    if is_root() {
        let mut c = Command::new("chown");
        c.args(["postgres:postgres", dir.to_str().unwrap()]);
        run(c, "chown");
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Settings for a new cluster.
pub struct Options {
    /// Extra postgresql.conf lines.
    pub conf: Vec<String>,
    /// Create the database and the extension before returning.
    pub create_extension: bool,
    /// Extra environment variables of the server (and so of the worker).
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            conf: vec![
                // Tests need no durability across OS crashes; benchmarks keep it.
                "fsync = off".into(),
                "outbox.retry_base = '100ms'".into(),
                "outbox.retry_max = '2s'".into(),
                "outbox.poll_interval = '1s'".into(),
            ],
            create_extension: true,
            env: Vec::new(),
        }
    }
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Cluster {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("outbox-e2e-{}-{n}", std::process::id()));
        server_dir(&dir);
        let data = dir.join("data");
        let mut initdb = pg_command("initdb");
        initdb.args(["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"]);
        run(initdb, "initdb");
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'outbox'\noutbox.database = '{DATABASE}'\n\
             max_wal_senders = 4\nwal_level = replica\nhot_standby = on\n\
             log_line_prefix = '%m [%p] %b '\n",
            dir.display()
        );
        for line in &opts.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        append(&data.join("postgresql.conf"), &conf);
        append(&data.join("pg_hba.conf"), "host replication all 127.0.0.1/32 trust\n");
        let mut c = Cluster { dir, port, database: DATABASE.into(), running: false, env: opts.env };
        c.pg_ctl_start();
        if opts.create_extension {
            c.admin("postgres").batch_execute(&format!("CREATE DATABASE {DATABASE}")).unwrap();
            c.client().batch_execute("CREATE EXTENSION outbox").unwrap();
        }
        c
    }

    /// A cluster already initialised in `dir` (e.g. a standby).
    pub fn adopt(dir: PathBuf, port: u16) -> Cluster {
        Cluster { dir, port, database: DATABASE.into(), running: false, env: Vec::new() }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pg_ctl_start(&mut self) {
        let mut c = pg_command("pg_ctl");
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.args(["-D", self.data().to_str().unwrap(), "-l", self.log_path().to_str().unwrap(), "-w", "-t", "60", "start"]);
        run(c, "pg_ctl start");
        self.running = true;
    }

    /// `pg_ctl stop -m mode` (smart, fast or immediate).
    pub fn stop(&mut self, mode: &str) {
        let mut c = pg_command("pg_ctl");
        c.args(["-D", self.data().to_str().unwrap(), "-w", "-t", "60", "-m", mode, "stop"]);
        run(c, "pg_ctl stop");
        self.running = false;
    }

    pub fn restart(&mut self, mode: &str) {
        self.stop(mode);
        self.pg_ctl_start();
    }

    /// Runs a client tool (pg_dump, pg_restore, ...) against this cluster,
    /// as `postgres` when we are root; panics with its output if it fails.
    pub fn tool(&self, bin: &str, args: &[&str]) {
        let mut c = pg_command(bin);
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"]).args(args);
        run(c, bin);
    }

    pub fn conninfo(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10", self.port)
    }

    pub fn admin(&self, db: &str) -> Client {
        Client::connect(&self.conninfo(db), NoTls).unwrap_or_else(|e| panic!("connect to {db}: {e}"))
    }

    /// A client of the outbox database.
    pub fn client(&self) -> Client {
        self.admin(&self.database)
    }

    /// A client, or None while the server does not accept connections
    /// (starting up, in crash recovery).
    pub fn try_client(&self) -> Option<Client> {
        Client::connect(&self.conninfo(&self.database), NoTls).ok()
    }

    /// Whether no job is left; false while the cluster can't be reached
    /// (for waits across restarts and promotions).
    pub fn drained(&self) -> bool {
        self.try_client().is_some_and(|mut c| {
            c.query_one("SELECT count(*) FROM outbox.jobs", &[]).map(|r| r.get::<_, i64>(0) == 0).unwrap_or(false)
        })
    }

    /// The delivery worker's pid, from pg_stat_activity.
    pub fn worker_pid(&self) -> Option<i32> {
        let mut c = self.try_client()?;
        c.query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox worker'", &[])
            .ok()
            .flatten()
            .map(|r| r.get(0))
    }

    /// The postmaster's pid, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
    }

    /// Waits for the worker to run and be past its start-up.
    pub fn wait_for_worker(&self) -> i32 {
        let mut pid = None;
        let ok = crate::wait_until(Duration::from_secs(30), || {
            let Some(mut c) = self.try_client() else { return false };
            pid = c
                .query_opt(
                    "SELECT pid FROM outbox.worker_status() WHERE state IN ('idle', 'delivering')",
                    &[],
                )
                .ok()
                .flatten()
                .and_then(|r| r.get::<_, Option<i32>>(0));
            pid.is_some()
        });
        assert!(ok, "worker did not come up; log:\n{}", self.log());
        pid.unwrap()
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let mut c = pg_command("pg_ctl");
            c.args(["-D", self.data().to_str().unwrap(), "-w", "-t", "60", "-m", "immediate", "stop"]);
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        if std::thread::panicking() {
            eprintln!("cluster log ({}):\n{}", self.log_path().display(), self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
