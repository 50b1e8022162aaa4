//! The suite runs against the server `OUTBOX_PG_BIN` names (`make test`
//! runs it on PostgreSQL 15 and 18): a check that it really does.

use outbox_e2e::cluster::{bin_dir, Cluster};
use std::process::Command;

#[test]
fn the_cluster_runs_the_version_asked_for() {
    let out = Command::new(format!("{}/pg_config", bin_dir())).arg("--version").output().expect("pg_config");
    let wanted = String::from_utf8_lossy(&out.stdout);
    let major = wanted.trim().trim_start_matches("PostgreSQL ").split('.').next().unwrap().to_string();
    let db = Cluster::start();
    let mut c = db.client();
    let num: String = c.query_one("SHOW server_version_num", &[]).unwrap().get(0);
    assert_eq!(num[..num.len() - 4], major, "{wanted}");
    let ext: String = c.query_one("SELECT extversion FROM pg_extension WHERE extname = 'outbox'", &[]).unwrap().get(0);
    assert_eq!(ext, outbox_e2e::extension_version(), "the extension's version is the crate's");
}
