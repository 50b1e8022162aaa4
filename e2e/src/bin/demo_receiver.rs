//! The receiver `make demo` runs: prints each request it gets and answers 201.
//! Usage: demo-receiver PORT SECONDS

use outbox_e2e::receiver::Receiver;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let r = Receiver::start();
    println!("{}", r.port);
    let start = Instant::now();
    let mut seen = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let reqs = r.requests();
        for q in &reqs[seen..] {
            eprintln!(
                "receiver: {} {}  webhook-id={} outbox-sequence={} signed={}  {}",
                q.method,
                q.path,
                q.header("webhook-id").unwrap_or("-"),
                q.header("outbox-sequence").unwrap_or("-"),
                q.header("webhook-signature").is_some(),
                String::from_utf8_lossy(&q.body)
            );
        }
        seen = reqs.len();
        std::thread::sleep(Duration::from_millis(50));
    }
}
