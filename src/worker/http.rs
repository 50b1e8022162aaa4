//! The HTTP threads: `outbox.http_threads` OS threads, each running an event
//! loop (a current-thread tokio runtime with hyper's pooled keep-alive
//! client). They do network I/O and pure Rust only: no pgrx, no pg_sys, no
//! logging (Postgres is bound to the main thread). They take requests from
//! the main thread, round robin, keep up to `outbox.concurrency` of them in
//! flight at once between them (one shared limit), and report outcomes over
//! one channel. When the main loop is about to wait, the first outcome after
//! that writes a byte to a pipe that it waits on together with its latch;
//! while it is busy, outcomes just queue up.
//!
//! Event loops rather than a blocking thread per request, which spent
//! most of its CPU in context switches; two loops by default, since one was
//! the bottleneck whenever the main thread was between turns. The
//! measurements: docs/benchmarks.md, "HTTP threads".

use super::connect::{forward_auth, Connector};
use crate::rules::policy::{parse_retry_after, Response};
use crate::rules::signing;
use bytes::Bytes;
use crossbeam_channel::{unbounded, Receiver, Sender};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, PROXY_AUTHORIZATION, USER_AGENT};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{timeout_at, Instant};

/// Characters of a response or error kept for `last_error`.
const EXCERPT_CHARS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Put,
    Delete,
}

/// One delivery, fully rendered by the main thread.
pub struct Request {
    pub job_id: i64,
    /// The claim it answers: its outcome names it (`queue::COMPLETE`).
    pub claim: i64,
    pub method: Method,
    pub url: String,
    /// JSON; `None` for a DELETE.
    pub body: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    /// HMAC keys when the kind has a secret: its secret, then the one it
    /// replaced while their overlap lasts (`outbox.rotate_secret`).
    pub keys: Vec<Arc<Vec<u8>>>,
    pub timeout: Duration,
    pub max_response_bytes: usize,
    /// Keep the connection for later requests. False when the host is one
    /// per record: the pool caps idle connections per host only, and would
    /// otherwise keep one open per record for a minute and a half.
    pub keep_alive: bool,
}

/// What happened to one request.
pub struct Outcome {
    pub job_id: i64,
    pub claim: i64,
    pub response: Response,
    pub retry_after: Option<Duration>,
    /// Response excerpt or error text, for `last_error`.
    pub detail: Option<String>,
    /// From the send's start to its outcome.
    pub took: Duration,
}

type HttpClient = Client<Connector, Full<Bytes>>;

/// What the main thread hands the event loop.
enum Message {
    Send(Request),
    /// Connect with these roots from now on (`outbox.ca_file` was reloaded).
    /// Requests in flight finish on the connections they have.
    Trust(RootCertStore),
}

pub struct Pool {
    /// One per event-loop thread; dropping them ends the loops, and the
    /// threads with them.
    requests: Vec<mpsc::UnboundedSender<Message>>,
    /// The thread the next request goes to: round robin.
    next: std::cell::Cell<usize>,
    outcomes: Receiver<Outcome>,
    wake_read: OwnedFd,
    /// Set by the main loop before it waits; the outcome that clears it pokes.
    waiting: Arc<AtomicBool>,
}

impl Pool {
    /// Starts `threads` event-loop threads that keep up to `concurrency`
    /// requests in flight between them. Call with all signals blocked, so
    /// that the threads (and the threads tokio starts from them for name
    /// lookups) inherit the mask and Postgres' handlers keep running on the
    /// main thread only.
    pub fn start(concurrency: usize, threads: usize, roots: RootCertStore) -> std::io::Result<Pool> {
        let (wake_read, wake_write) = pipe()?;
        let waiting = Arc::new(AtomicBool::new(false));
        // Read once: a changed environment needs a restart, as for any
        // process.
        let proxies = Arc::new(Matcher::from_env());
        let (out_tx, out_rx) = unbounded::<Outcome>();
        let report = Reporter { outcomes: out_tx, wake_write: Arc::new(wake_write), waiting: Arc::clone(&waiting) };
        // One limit for all the threads: a thread whose requests hang on a
        // slow receiver holds only the slots those requests take.
        let slots = Arc::new(Semaphore::new(concurrency));
        let threads = threads.clamp(1, concurrency.max(1));
        let mut requests = Vec::with_capacity(threads);
        for _ in 0..threads {
            requests.push(event_loop(concurrency, &slots, roots.clone(), Arc::clone(&proxies), report.clone())?);
        }
        Ok(Pool { requests, next: std::cell::Cell::new(0), outcomes: out_rx, wake_read, waiting })
    }

    /// How many event-loop threads it started (never more than the requests
    /// it may have in flight).
    pub fn threads(&self) -> usize {
        self.requests.len()
    }

    pub fn submit(&self, request: Request) {
        let i = self.next.get();
        self.next.set((i + 1) % self.requests.len());
        // Fails only once the loop has stopped, when nothing is waiting for
        // the outcome any more.
        let _ = self.requests[i].send(Message::Send(request));
    }

    /// Trusts `roots` for connections made from now on.
    pub fn trust(&self, roots: RootCertStore) {
        for tx in &self.requests {
            let _ = tx.send(Message::Trust(roots.clone()));
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

/// Starts one event-loop thread (a current-thread tokio runtime with its own
/// pooled client) that sends each request once it holds one of `slots`
/// (`concurrency` in all, shared with the other threads), and returns where
/// to send it work.
fn event_loop(
    concurrency: usize,
    slots: &Arc<Semaphore>,
    roots: RootCertStore,
    proxies: Arc<Matcher>,
    report: Reporter,
) -> std::io::Result<mpsc::UnboundedSender<Message>> {
    // Blocking threads only look names up, at most one per request in
    // flight.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(concurrency)
        .build()?;
    let mut http = client(concurrency, roots, &proxies)?;
    let (req_tx, mut req_rx) = mpsc::unbounded_channel::<Message>();
    let slots = Arc::clone(slots);
    std::thread::Builder::new().name("outbox-http".into()).spawn(move || {
        runtime.block_on(async move {
            while let Some(message) = req_rx.recv().await {
                let request = match message {
                    Message::Send(request) => request,
                    Message::Trust(roots) => {
                        // Fails only for a bad protocol setup, which the
                        // first build would have hit already.
                        if let Ok(c) = client(concurrency, roots, &proxies) {
                            http = c;
                        }
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
                let (client, report, proxies) = (http.clone(), report.clone(), Arc::clone(&proxies));
                tokio::spawn(async move {
                    let started = Instant::now();
                    let mut outcome = send(&client, &proxies, request).await;
                    outcome.took = started.elapsed();
                    drop(slot);
                    report.send(outcome);
                });
            }
        });
        // Requests still in flight are dropped with the runtime: the
        // worker is exiting, and they are delivered again after it.
    })?;
    Ok(req_tx)
}

/// The HTTP threads' side of the outcome channel and the wake-up pipe.
#[derive(Clone)]
struct Reporter {
    outcomes: Sender<Outcome>,
    wake_write: Arc<OwnedFd>,
    waiting: Arc<AtomicBool>,
}

impl Reporter {
    fn send(&self, outcome: Outcome) {
        if self.outcomes.send(outcome).is_ok() && self.waiting.swap(false, Ordering::SeqCst) {
            // A full pipe already means "wake up": EAGAIN is fine to ignore.
            // SAFETY: writing one byte from a local to our own pipe.
            unsafe { libc::write(self.wake_write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }
}

/// The certificate authorities HTTPS receivers are checked against: the
/// Mozilla roots, as a browser would trust, and those of the PEM file
/// `ca_file` (a private CA), if given.
pub fn trust_roots(ca_file: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = mozilla_roots();
    let Some(path) = ca_file else { return Ok(roots) };
    let mut found = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{path}: {e}"))? {
        let cert = cert.map_err(|e| format!("{path}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{path}: certificate {}: {e}", found + 1))?;
        found += 1;
    }
    if found == 0 {
        return Err(format!("{path}: no PEM certificate (\"-----BEGIN CERTIFICATE-----\") in it"));
    }
    Ok(roots)
}

pub fn mozilla_roots() -> RootCertStore {
    RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

/// hyper's pooled client over TCP or TLS (rustls, checked against `roots`).
/// Names are looked up only when a connection is made, not per request.
fn client(concurrency: usize, roots: RootCertStore, proxies: &Arc<Matcher>) -> std::io::Result<HttpClient> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    // A request is written at once, not held back waiting for an ACK.
    tcp.set_nodelay(true);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = Connector::new(tcp, config, Arc::clone(proxies));
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(concurrency.max(8) * 2)
        .build(connector))
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

fn excerpt(text: &str) -> String {
    let mut s: String = text.chars().take(EXCERPT_CHARS).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// An error with its causes: hyper's own text ("client error (Connect)")
/// says little without the TLS or socket error underneath.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The request as hyper takes it, with the Standard Webhooks headers.
fn build(r: Request, proxies: &Matcher) -> Result<hyper::Request<Full<Bytes>>, String> {
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let msg_id = r.job_id.to_string();
    let body = r.body.unwrap_or_default();
    // Not the URL itself in the error: it may carry credentials.
    let uri: hyper::Uri = r.url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    let mut builder = hyper::Request::builder()
        .method(match r.method {
            Method::Put => hyper::Method::PUT,
            Method::Delete => hyper::Method::DELETE,
        })
        .uri(uri.clone())
        .header(USER_AGENT, concat!("outbox/", env!("CARGO_PKG_VERSION")))
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(signatures) = signing::sign_all(r.keys.iter().map(|k| k.as_slice()), &msg_id, timestamp, &body) {
        builder = builder.header("webhook-signature", signatures);
    }
    for (name, value) in &r.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name:?}: {e}"))?;
        let value = HeaderValue::from_str(value).map_err(|e| format!("header {name}: {e}"))?;
        builder = builder.header(name, value);
    }
    if r.method == Method::Put {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    if !r.keep_alive {
        builder = builder.header(CONNECTION, "close");
    }
    if let Some(auth) = forward_auth(proxies, &uri) {
        builder = builder.header(PROXY_AUTHORIZATION, auth);
    }
    builder.body(Full::new(Bytes::from(body))).map_err(|e| format!("invalid request: {}", describe(&e)))
}

/// Reads at most `max` bytes of a body: a receiver cannot make us buffer
/// more. A longer body is cut off, and its connection closed.
async fn read_limited(mut body: Incoming, max: usize) -> Result<Vec<u8>, hyper::Error> {
    let mut buf = Vec::new();
    while buf.len() < max {
        let Some(frame) = body.frame().await else { break };
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data[..data.len().min(max - buf.len())]);
        }
    }
    Ok(buf)
}

/// Sends one request; never panics on a network or protocol problem. The
/// timeout covers everything: lookup, connect, TLS, request and response.
async fn send(client: &HttpClient, proxies: &Matcher, r: Request) -> Outcome {
    let (job_id, claim, limit, timeout) = (r.job_id, r.claim, r.max_response_bytes, r.timeout);
    let deadline = Instant::now() + timeout;
    let failed =
        |detail: String| Outcome { job_id, claim, response: Response::NetworkError, retry_after: None, detail: Some(excerpt(&detail)), took: Duration::ZERO };
    let timed_out = || format!("timed out after {} ms", timeout.as_millis());
    let request = match build(r, proxies) {
        Ok(request) => request,
        Err(e) => return failed(e),
    };
    let response = match timeout_at(deadline, client.request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return failed(describe(&e)),
        Err(_) => return failed(timed_out()),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let read = timeout_at(deadline, read_limited(response.into_body(), limit)).await;
    let detail = match read {
        // A 2xx whose body broke off still counts: the status was sent.
        _ if (200..300).contains(&status) => None,
        Ok(Ok(buf)) => Some(excerpt(&String::from_utf8_lossy(&buf))),
        Ok(Err(e)) => Some(excerpt(&format!("reading response: {}", describe(&e)))),
        Err(_) => Some(format!("reading response: {}", timed_out())),
    };
    Outcome { job_id, claim, response: Response::Status(status), retry_after, detail, took: Duration::ZERO }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A one-connection server: reads one request head, answers `answer`,
    /// and returns the head it read.
    fn serve_once(answer: &'static str) -> (u16, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            while reader.read_line(&mut head).unwrap() > 2 {}
            (&stream).write_all(answer.as_bytes()).unwrap();
            head
        });
        (port, server)
    }

    fn request(url: String, timeout: Duration) -> Request {
        Request {
            job_id: 7,
            claim: 1,
            method: Method::Delete,
            url,
            body: None,
            headers: vec![("x-extra".into(), "yes".into())],
            keys: Vec::new(),
            timeout,
            max_response_bytes: 4,
            keep_alive: true,
        }
    }

    /// A certificate authority's PEM, made by openssl.
    fn ca_pem(dir: &std::path::Path) -> std::path::PathBuf {
        let (key, cert) = (dir.join("ca.key"), dir.join("ca.pem"));
        let ok = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=outbox test CA"])
            .arg("-keyout").arg(&key).arg("-out").arg(&cert)
            .stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null())
            .status().unwrap().success();
        assert!(ok, "openssl req");
        cert
    }

    #[test]
    fn a_ca_file_adds_its_authorities_to_the_mozilla_roots() {
        let mozilla = mozilla_roots().len();
        assert!(mozilla > 100, "{mozilla}");
        assert_eq!(trust_roots(None).unwrap().len(), mozilla);
        let dir = std::env::temp_dir().join(format!("outbox-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = ca_pem(&dir);
        let path = ca.to_str().unwrap();
        assert_eq!(trust_roots(Some(path)).unwrap().len(), mozilla + 1);
        // A bundle: every certificate in it counts.
        let bundle = dir.join("bundle.pem");
        let one = std::fs::read_to_string(&ca).unwrap();
        std::fs::write(&bundle, format!("# our CAs\n{one}{one}")).unwrap();
        assert_eq!(trust_roots(Some(bundle.to_str().unwrap())).unwrap().len(), mozilla + 2);
        // What can't be used says which file and why.
        let missing = dir.join("missing.pem");
        let e = trust_roots(Some(missing.to_str().unwrap())).unwrap_err();
        assert!(e.starts_with(missing.to_str().unwrap()), "{e}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(trust_roots(Some(empty.to_str().unwrap())).unwrap_err().contains("no PEM certificate"));
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        assert!(trust_roots(Some(broken.to_str().unwrap())).unwrap_err().contains("certificate 1"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn deliver(r: Request) -> Outcome {
        let pool = Pool::start(2, 2, mozilla_roots()).unwrap();
        pool.submit(r);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(o) = pool.drain().pop() {
                return o;
            }
            assert!(std::time::Instant::now() < deadline, "no outcome");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_host_name_is_looked_up_and_the_headers_are_sent() {
        let (port, server) = serve_once("HTTP/1.1 409 Conflict\r\ncontent-length: 10\r\n\r\nstale 1234");
        let o = deliver(request(format!("http://localhost:{port}/k/1"), Duration::from_secs(5)));
        let head = server.join().unwrap().to_lowercase();
        assert!(head.starts_with("delete /k/1 http/1.1\r\n"), "{head}");
        for h in ["webhook-id: 7\r\n", "x-extra: yes\r\n", "user-agent: outbox/"] {
            assert!(head.contains(h), "{h:?} missing from {head}");
        }
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!((o.job_id, o.response), (7, Response::Status(409)));
        // Only max_response_bytes of the body are kept.
        assert_eq!(o.detail.as_deref(), Some("stal"));
    }

    #[test]
    fn the_threads_share_one_limit_of_requests_in_flight() {
        use std::sync::atomic::AtomicUsize;
        // A server that counts request heads and answers none of them until
        // released.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(AtomicUsize::new(0));
        let released = Arc::new(AtomicBool::new(false));
        let (h, r) = (Arc::clone(&heads), Arc::clone(&released));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (h, r) = (Arc::clone(&h), Arc::clone(&r));
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut head = String::new();
                        while reader.read_line(&mut head).unwrap_or(0) > 2 {}
                        if head.is_empty() {
                            return;
                        }
                        h.fetch_add(1, Ordering::SeqCst);
                        while !r.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if (&stream).write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let pool = Pool::start(3, 2, mozilla_roots()).unwrap();
        assert_eq!(pool.threads(), 2);
        // Never more threads than requests allowed in flight.
        assert_eq!(Pool::start(1, 4, mozilla_roots()).unwrap().threads(), 1);
        for i in 0..6 {
            pool.submit(request(format!("http://127.0.0.1:{port}/k/{i}"), Duration::from_secs(10)));
        }
        // Three are sent (both threads have some), and no more until one
        // is answered.
        let until = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while heads.load(Ordering::SeqCst) < n && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            heads.load(Ordering::SeqCst)
        };
        assert_eq!(until(3), 3);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(heads.load(Ordering::SeqCst), 3, "more than outbox.concurrency in flight");
        released.store(true, Ordering::SeqCst);
        let mut outcomes = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while outcomes.len() < 6 && std::time::Instant::now() < deadline {
            outcomes.extend(pool.drain());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(outcomes.len(), 6);
        assert!(outcomes.iter().all(|o| o.response == Response::Status(201)));
    }

    #[test]
    fn a_host_per_record_gets_no_kept_connection() {
        let (port, server) = serve_once("HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n");
        let o = deliver(Request { keep_alive: false, ..request(format!("http://127.0.0.1:{port}/k/1"), Duration::from_secs(5)) });
        let head = server.join().unwrap().to_lowercase();
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert_eq!((o.response, o.detail), (Response::Status(201), None));
    }

    #[test]
    fn the_timeout_covers_a_response_that_never_comes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let o = deliver(request(format!("http://127.0.0.1:{port}/k/1"), Duration::from_millis(200)));
        drop(listener);
        assert_eq!(o.response, Response::NetworkError);
        assert_eq!(o.detail.as_deref(), Some("timed out after 200 ms"));
    }
}
