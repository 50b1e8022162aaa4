//! The HTTP-only ceiling of this machine, for comparison with figure 1. No
//! database; the same nginx receiver as the benchmarks; CONCURRENCY
//! (default 32, outbox.concurrency's default) requests in flight, for
//! SECONDS (default 5) each:
//! - ureq: as many threads, each looping blocking keep-alive PUTs (the
//!   ceiling the issue quotes);
//! - event loop: one thread, hyper on a current-thread tokio runtime, as the
//!   worker sends (the worker's own limit on this machine).
//!
//! Usage: bench-http-ceiling [SECONDS] [CONCURRENCY]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use outbox_bench::figure::{self, Figure};
use outbox_bench::nginx::Nginx;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BODY: &[u8] = br#"{"id":"12345","kind":"k"}"#;

fn main() {
    let secs: u64 = figure::arg(1, 5);
    let concurrency: usize = figure::arg(2, 32);
    let r = Nginx::start();
    let threads = ureq_threads(&r, secs, concurrency);
    let event_loop = hyper_loop(&r, secs, concurrency);
    println!("settings: {concurrency} requests in flight, keep-alive, no database; receiver: nginx, one worker process, `return 201`");
    figure::report(Figure {
        name: "http ceiling",
        summary: format!(
            "{threads:.0} requests/s ({concurrency} ureq threads); {event_loop:.0} requests/s (one hyper event loop, as the worker sends); {secs}s each"
        ),
        json: format!("\"concurrency\":{concurrency},\"requests_per_s\":{threads:.0},\"event_loop_requests_per_s\":{event_loop:.0}"),
    });
}

/// Requests per second of `concurrency` threads looping blocking PUTs.
fn ureq_threads(r: &Nginx, secs: u64, concurrency: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).max_idle_connections_per_host(concurrency * 2).build().into();
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|t| {
            let (agent, stop, sent, url) = (agent.clone(), Arc::clone(&stop), Arc::clone(&sent), r.url(&format!("/k/{t}")));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let resp = agent.put(&url).header("content-type", "application/json").send(BODY).unwrap();
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
    sent.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Requests per second of one event loop keeping `concurrency` PUTs in flight.
fn hyper_loop(r: &Nginx, secs: u64, concurrency: usize) -> f64 {
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    let client: Client<_, Full<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).pool_max_idle_per_host(concurrency * 2).build(tcp);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let sent = runtime.block_on(async {
        let loops: Vec<_> = (0..concurrency)
            .map(|t| {
                let (client, url) = (client.clone(), r.url(&format!("/k/{t}")).parse::<hyper::Uri>().unwrap());
                tokio::spawn(async move {
                    let mut sent = 0u64;
                    while Instant::now() < deadline {
                        let request = hyper::Request::put(url.clone())
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(BODY)))
                            .unwrap();
                        let resp = client.request(request).await.unwrap();
                        assert_eq!(resp.status().as_u16(), 201);
                        resp.into_body().collect().await.unwrap();
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        let mut total = 0;
        for l in loops {
            total += l.await.unwrap();
        }
        total
    });
    sent as f64 / start.elapsed().as_secs_f64()
}
