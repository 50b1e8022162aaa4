//! The HTTP-only ceiling of this machine, for comparison with figure 1:
//! THREADS threads (default 32, outbox.concurrency's default) each looping
//! keep-alive PUTs with ureq to the same nginx receiver, for SECONDS
//! (default 5). No database. Usage: bench-http-ceiling [SECONDS] [THREADS]

use outbox_e2e::bench::{self, Figure};
use outbox_e2e::nginx::Nginx;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let secs: u64 = bench::arg(1, 5);
    let threads: usize = bench::arg(2, 32);
    let r = Nginx::start();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).max_idle_connections_per_host(threads * 2).build().into();
    let body = br#"{"id":"12345","kind":"k"}"#;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (agent, stop, sent, url) = (agent.clone(), Arc::clone(&stop), Arc::clone(&sent), r.url(&format!("/k/{t}")));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let resp = agent.put(&url).header("content-type", "application/json").send(&body[..]).unwrap();
                    assert_eq!(resp.status().as_u16(), 201);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let rate = sent.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("settings: {threads} threads, keep-alive, no database; receiver: nginx, one worker process, `return 201`");
    bench::report(Figure {
        name: "http ceiling",
        summary: format!("{rate:.0} requests/s ({threads} ureq threads looping PUTs for {secs}s)"),
        json: format!("\"threads\":{threads},\"requests_per_s\":{rate:.0}"),
    });
}
