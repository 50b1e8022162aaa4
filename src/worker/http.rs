//! HTTP threads. They do network I/O and pure Rust only: no pgrx, no pg_sys,
//! no logging (Postgres is bound to the main thread). They take requests from
//! a channel, send them with one shared keep-alive `ureq` agent, and report
//! outcomes over another channel. When the main loop is about to wait, the
//! first outcome after that writes a byte to a pipe that it waits on together
//! with its latch; while it is busy, outcomes just queue up (a write and a
//! wake-up per request were a large part of a delivery's cost).

use crate::policy::{parse_retry_after, Response};
use super::resolver::CachingResolver;
use crate::signing;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Characters of a response or error kept for `last_error`.
pub const EXCERPT_CHARS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Put,
    Delete,
}

/// One delivery, fully rendered by the main thread.
pub struct Request {
    pub job_id: i64,
    pub method: Method,
    pub url: String,
    /// JSON; `None` for a DELETE.
    pub body: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    /// HMAC key when the kind has a secret.
    pub key: Option<Arc<Vec<u8>>>,
    pub timeout: Duration,
    pub max_response_bytes: usize,
}

/// What happened to one request.
pub struct Outcome {
    pub job_id: i64,
    pub response: Response,
    pub retry_after: Option<Duration>,
    /// Response excerpt or error text, for `last_error`.
    pub detail: Option<String>,
}

pub struct Pool {
    requests: Option<Sender<Request>>,
    outcomes: Receiver<Outcome>,
    wake_read: OwnedFd,
    /// Set by the main loop before it waits; the thread that clears it pokes.
    waiting: Arc<AtomicBool>,
}

impl Pool {
    /// Starts `threads` senders. Call with all signals blocked so that
    /// Postgres' handlers keep running on the main thread only.
    pub fn start(threads: usize) -> std::io::Result<Pool> {
        let (wake_read, wake_write) = pipe()?;
        let wake_write = Arc::new(wake_write);
        let waiting = Arc::new(AtomicBool::new(false));
        let (req_tx, req_rx) = unbounded::<Request>();
        let (out_tx, out_rx) = unbounded::<Outcome>();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(concat!("outbox/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections(threads.max(8) * 2)
            .max_idle_connections_per_host(threads.max(8) * 2)
            .build();
        let connector = ureq::unversioned::transport::DefaultConnector::new();
        let agent = ureq::Agent::with_parts(config, connector, CachingResolver::default());
        for i in 0..threads {
            let req_rx = req_rx.clone();
            let out_tx = out_tx.clone();
            let wake_write = Arc::clone(&wake_write);
            let waiting = Arc::clone(&waiting);
            let agent = agent.clone();
            std::thread::Builder::new().name(format!("outbox-http-{i}")).spawn(move || loop {
                let Ok(request) = req_rx.recv() else { return };
                let outcome = send(&agent, request);
                if out_tx.send(outcome).is_err() {
                    return;
                }
                if waiting.swap(false, Ordering::SeqCst) {
                    poke(&wake_write);
                }
            })?;
        }
        Ok(Pool { requests: Some(req_tx), outcomes: out_rx, wake_read, waiting })
    }

    pub fn submit(&self, request: Request) {
        if let Some(tx) = &self.requests {
            // The threads only stop when this sender is dropped.
            let _ = tx.send(request);
        }
    }

    /// The fd to wait on for "an outcome is ready".
    pub fn wake_fd(&self) -> i32 {
        self.wake_read.as_raw_fd()
    }

    /// Call right before waiting on [`Pool::wake_fd`]: from now on the next
    /// outcome pokes the pipe. Returns false if outcomes are already ready
    /// (nobody poked for them), so there is no point waiting.
    pub fn arm(&self) -> bool {
        self.waiting.store(true, Ordering::SeqCst);
        if self.outcomes.is_empty() {
            return true;
        }
        self.waiting.store(false, Ordering::SeqCst);
        false
    }

    /// Empties the wake pipe, then returns every outcome ready now.
    pub fn drain(&self) -> Vec<Outcome> {
        self.waiting.store(false, Ordering::SeqCst);
        let mut buf = [0u8; 256];
        // SAFETY: reading into a local buffer from our own non-blocking pipe.
        while unsafe { libc::read(self.wake_read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        self.outcomes.try_iter().collect()
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn poke(fd: &OwnedFd) {
    // A full pipe already means "wake up": EAGAIN is fine to ignore.
    // SAFETY: writing one byte from a local to our own pipe.
    unsafe { libc::write(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
}

fn excerpt(text: &str) -> String {
    let mut s: String = text.chars().take(EXCERPT_CHARS).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// Sends one request; never panics on a network or protocol problem.
pub fn send(agent: &ureq::Agent, r: Request) -> Outcome {
    let failed = |response: Response, detail: String| Outcome {
        job_id: r.job_id,
        response,
        retry_after: None,
        detail: Some(excerpt(&detail)),
    };
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let msg_id = r.job_id.to_string();
    let body: &[u8] = r.body.as_deref().unwrap_or(&[]);
    let builder = match r.method {
        Method::Put => agent.put(&r.url),
        Method::Delete => agent.delete(&r.url).force_send_body(),
    };
    let mut builder = builder
        .config()
        .timeout_global(Some(r.timeout))
        .build()
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(key) = &r.key {
        builder = builder.header("webhook-signature", signing::sign(key, &msg_id, timestamp, body));
    }
    for (name, value) in &r.headers {
        builder = builder.header(name, value);
    }
    let result = match r.method {
        Method::Put => builder.header("content-type", "application/json").send(body),
        Method::Delete => builder.send_empty(),
    };
    let mut response = match result {
        Ok(resp) => resp,
        Err(e) => return failed(Response::NetworkError, e.to_string()),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    // Read at most max_response_bytes; a receiver cannot make us buffer more.
    let mut buf = Vec::new();
    let read = response.body_mut().as_reader().take(r.max_response_bytes as u64).read_to_end(&mut buf);
    let detail = match read {
        Ok(_) if (200..300).contains(&status) => None,
        Ok(_) => Some(excerpt(&String::from_utf8_lossy(&buf))),
        // A 2xx whose body broke off still counts: the status was sent.
        Err(_) if (200..300).contains(&status) => None,
        Err(e) => Some(excerpt(&format!("reading response: {e}"))),
    };
    Outcome { job_id: r.job_id, response: Response::Status(status), retry_after, detail }
}
