//! Figure 5, bulk: one UPDATE of every row of a ROWS-row table (default
//! 1,000,000), tracked by outbox.track against the same table untracked,
//! alternated, three rounds each; the median times are compared. The kind
//! is paused so that no delivery runs during the statements; between rounds
//! the worker moves the tracked changes into the queue (timed separately)
//! and both tables are vacuumed, so every round starts alike. A third
//! table is tracked with a filter (`track(..., filter => ...)`) that every
//! row passes: the filter's cost where it saves nothing.
//! Usage: bench-bulk [ROWS] [ROUNDS]

use outbox_bench::figure::{self, Figure};
use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::wait_until;
use std::time::{Duration, Instant};

fn main() {
    let rows: i64 = figure::arg(1, 1_000_000);
    let rounds: usize = figure::arg(2, 3);
    let conf = figure::conf_from_env();
    let db = Cluster::start_with(Options { conf: conf.clone(), create_extension: true, env: Vec::new() });
    let mut c = db.client();
    c.batch_execute(
        "SELECT outbox.register('item', 'http://127.0.0.1:9/items/{id}'); SELECT outbox.pause('item');
         SELECT outbox.register('filtered', 'http://127.0.0.1:9/items/{id}'); SELECT outbox.pause('filtered');",
    )
    .unwrap();
    let tables = ["plain_items", "tracked_items", "filtered_items"];
    for t in tables {
        c.batch_execute(&format!("CREATE TABLE {t} (id bigint PRIMARY KEY, qty int NOT NULL, name text NOT NULL)")).unwrap();
        c.execute(&format!("INSERT INTO {t} SELECT g, 0, 'item ' || g FROM generate_series(1, $1::bigint) g"), &[&rows]).unwrap();
        c.batch_execute(&format!("VACUUM ANALYZE {t}")).unwrap();
    }
    c.batch_execute(
        "SELECT outbox.track('tracked_items', 'item');
         SELECT outbox.track('filtered_items', 'filtered', filter => 'qty >= 0 AND name <> ''''');",
    )
    .unwrap();
    db.wait_for_worker();
    let mut times: [Vec<f64>; 3] = [vec![], vec![], vec![]];
    let mut absorbs = Vec::new();
    for round in 0..rounds {
        for (i, t) in tables.iter().enumerate() {
            let start = Instant::now();
            let n = c.execute(&format!("UPDATE {t} SET qty = qty + 1"), &[]).unwrap();
            let took = start.elapsed().as_secs_f64();
            assert_eq!(n as i64, rows);
            times[i].push(took);
            if i >= 1 {
                let start = Instant::now();
                let absorbed = wait_until(Duration::from_secs(900), || {
                    c.query_one("SELECT NOT EXISTS (SELECT FROM outbox.inbox)", &[]).unwrap().get::<_, bool>(0)
                });
                assert!(absorbed, "inbox not absorbed");
                if i == 1 {
                    absorbs.push(start.elapsed().as_secs_f64());
                }
            }
            println!("  round {}: UPDATE of {rows} rows, {t}: {took:.2}s", round + 1);
            c.batch_execute(&format!("VACUUM {t}")).unwrap();
        }
        c.batch_execute("VACUUM outbox.queue, outbox.inbox").unwrap();
    }
    let jobs: i64 = c.query_one("SELECT count(*) FROM outbox.queue WHERE kind = 'item' AND state = 'pending'", &[]).unwrap().get(0);
    assert_eq!(jobs, rows, "one pending job per changed row, coalesced over the rounds");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (plain, tracked, filtered) = (median(&mut times[0]), median(&mut times[1]), median(&mut times[2]));
    let absorb = median(&mut absorbs);
    figure::print_settings(&conf, "none (kind paused)");
    figure::report(Figure {
        name: "bulk",
        summary: format!(
            "UPDATE of {rows} rows: tracked {tracked:.2}s, untracked {plain:.2}s (medians of {rounds}): x{:.2} (target <= 1.5); \
             tracked with a filter every row passes {filtered:.2}s: x{:.2}; the worker then moved the changes into the queue in {absorb:.1}s",
            tracked / plain,
            filtered / plain
        ),
        json: format!(
            "\"rows\":{rows},\"tracked_s\":{tracked:.3},\"untracked_s\":{plain:.3},\"ratio\":{:.3},\"filtered_s\":{filtered:.3},\"filtered_ratio\":{:.3},\"absorb_s\":{absorb:.3}",
            tracked / plain,
            filtered / plain
        ),
    });
}
