//! A programmable HTTP/1.1 receiver on a free loopback port. It records every
//! request (method, path, headers, body, arrival time) as it arrives, then
//! acts on the next scripted [`Action`] for that path (or the default one):
//! answer with a status, headers and delay, hang, drop the connection, or
//! hold the request until the test opens a [`Gate`]. It also notes every
//! request that arrived while another one for the same path was still being
//! handled ([`Receiver::overlaps`]).
//! [`Receiver::start_tls`] serves the same over TLS, with a given certificate.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use crate::listener::Listener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub enum Action {
    Respond { status: u16, headers: Vec<(String, String)>, body: String, delay: Duration },
    /// Read the request, then answer nothing for this long, then close.
    Hang(Duration),
    /// Close the connection without answering.
    Drop,
    /// Write these bytes as they are, one every `drip` if set, then close.
    Raw { bytes: Vec<u8>, drip: Option<Duration> },
    /// Answer 200 with a body of this many bytes, written until the client
    /// stops reading.
    Huge(u64),
    /// Read the request, wait until the gate opens, then act as `then`.
    Held { gate: Gate, then: Box<Action> },
}

impl Action {
    pub fn status(status: u16) -> Action {
        Action::Respond { status, headers: vec![], body: String::new(), delay: Duration::ZERO }
    }
    pub fn delayed(status: u16, delay: Duration) -> Action {
        Action::Respond { status, headers: vec![], body: String::new(), delay }
    }
    pub fn with_body(status: u16, body: &str) -> Action {
        Action::Respond { status, headers: vec![], body: body.into(), delay: Duration::ZERO }
    }
    pub fn with_header(status: u16, name: &str, value: &str) -> Action {
        Action::Respond { status, headers: vec![(name.into(), value.into())], body: String::new(), delay: Duration::ZERO }
    }
    /// Answer `status` once `gate` opens.
    pub fn held(gate: &Gate, status: u16) -> Action {
        Action::Held { gate: gate.clone(), then: Box::new(Action::status(status)) }
    }

    /// The status this action answers with, if it answers.
    fn answers(&self) -> Option<u16> {
        match self {
            Action::Respond { status, .. } => Some(*status),
            Action::Held { then, .. } => then.answers(),
            _ => None,
        }
    }

    /// Waits for the gates of a held action; returns what to do then.
    fn released(self) -> Action {
        match self {
            Action::Held { gate, then } => {
                gate.wait();
                then.released()
            }
            action => action,
        }
    }
}

/// How long a held request waits at most for its gate: a test that failed
/// before opening it leaves no thread behind for long.
const GATE_LIMIT: Duration = Duration::from_secs(120);

/// Holds requests ([`Action::Held`]) until the test opens it: a request in
/// flight for exactly as long as a test needs, without guessing a delay.
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Releases the requests held now, and lets later ones through at once.
    pub fn open(&self) {
        let (open, changed) = &*self.0;
        *open.lock().unwrap() = true;
        changed.notify_all();
    }

    fn wait(&self) {
        let (open, changed) = &*self.0;
        let _ = changed.wait_timeout_while(open.lock().unwrap(), GATE_LIMIT, |open| !*open);
    }
}

#[derive(Clone, Debug)]
pub struct Recorded {
    /// The status this receiver answered (or, while it holds or delays the
    /// request, will answer) with; None if it hung or dropped.
    pub answered: Option<u16>,
    pub method: String,
    pub path: String,
    /// Lower-cased names.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    by_path: Mutex<HashMap<String, VecDeque<Action>>>,
    default_actions: Mutex<VecDeque<Action>>,
    /// Applied when no script is left.
    fallback: Mutex<Option<Action>>,
    /// Random faults, when set (takes precedence over the fallback).
    chaos: Mutex<Option<Chaos>>,
    /// Requests being handled now, per path (see [`InProgress`]).
    in_progress: Mutex<HashMap<String, usize>>,
    /// The path of every request that arrived while another request for it
    /// was still being handled.
    overlaps: Mutex<Vec<String>>,
    /// Record only requests whose path starts with this (the others are
    /// counted in `arrivals`): for a load of millions of requests.
    keep_only: Mutex<Option<String>>,
    /// Every request that arrived, recorded or not.
    arrivals: std::sync::atomic::AtomicUsize,
}

/// A request counted as being handled, from its arrival until the receiver
/// is done waiting (its delay, gate or hang) and answers or closes: dropped
/// just before the client can learn the outcome, so that a client that
/// waits for it before it sends that path again is never counted twice.
struct InProgress<'a> {
    state: &'a State,
    path: String,
}

impl<'a> InProgress<'a> {
    fn arrive(state: &'a State, path: &str) -> InProgress<'a> {
        let mut counts = state.in_progress.lock().unwrap();
        let n = counts.entry(path.into()).or_default();
        if *n > 0 {
            state.overlaps.lock().unwrap().push(path.into());
        }
        *n += 1;
        InProgress { state, path: path.into() }
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        let mut counts = self.state.in_progress.lock().unwrap();
        if let Some(n) = counts.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.path);
            }
        }
    }
}

/// Random faults from a seeded generator: the same seed, the same sequence.
pub struct Chaos {
    rng: rand::rngs::StdRng,
    /// Probability that a request fails, split evenly over 500, 429 with
    /// Retry-After, a hang past the client's timeout, and a dropped connection.
    pub fault_rate: f64,
    pub hang: Duration,
    pub counts: HashMap<&'static str, u64>,
}

impl Chaos {
    pub fn new(seed: u64, fault_rate: f64, hang: Duration) -> Chaos {
        use rand::SeedableRng;
        Chaos { rng: rand::rngs::StdRng::seed_from_u64(seed), fault_rate, hang, counts: HashMap::new() }
    }

    fn next(&mut self) -> Action {
        use rand::Rng;
        let roll: f64 = self.rng.gen();
        let (name, action) = if roll >= self.fault_rate {
            ("ok", Action::status(201))
        } else {
            match (roll / self.fault_rate * 4.0) as u32 {
                0 => ("500", Action::status(500)),
                1 => ("429+Retry-After", Action::with_header(429, "Retry-After", "0")),
                2 => ("timeout", Action::Hang(self.hang)),
                _ => ("drop", Action::Drop),
            }
        };
        *self.counts.entry(name).or_default() += 1;
        action
    }
}

pub struct Receiver {
    pub port: u16,
    tls: bool,
    state: Arc<State>,
    /// Stops accepting when the receiver is dropped.
    _listener: Listener,
}

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::listen(None)
    }

    /// Serves HTTPS with the certificate chain and private key of these PEM
    /// files.
    pub fn start_tls(cert_pem: &Path, key_pem: &Path) -> Receiver {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert_pem).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(key_pem).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Receiver::listen(Some(Arc::new(config)))
    }

    fn listen(tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let state = Arc::new(State::default());
        let (s, is_tls) = (Arc::clone(&state), tls.is_some());
        let listener = Listener::start(move |conn, stop| {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            match &tls {
                None => serve(conn, &s, stop),
                Some(config) => {
                    let Ok(session) = rustls::ServerConnection::new(Arc::clone(config)) else { return };
                    serve(rustls::StreamOwned::new(session, conn), &s, stop)
                }
            }
        });
        Receiver { port: listener.port, tls: is_tls, state, _listener: listener }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    /// Scripts the next responses for `path`, in order.
    pub fn script(&self, path: &str, actions: impl IntoIterator<Item = Action>) {
        self.state.by_path.lock().unwrap().entry(path.into()).or_default().extend(actions);
    }

    /// Scripts the next responses for any path without its own script.
    pub fn script_any(&self, actions: impl IntoIterator<Item = Action>) {
        self.state.default_actions.lock().unwrap().extend(actions);
    }

    /// What to do once scripts run out (default: 201 at once).
    pub fn set_fallback(&self, action: Option<Action>) {
        *self.state.fallback.lock().unwrap() = action;
    }

    /// Turns random faults on (Some) or off (None); returns the counts of
    /// what the previous chaos did.
    pub fn set_chaos(&self, chaos: Option<Chaos>) -> HashMap<&'static str, u64> {
        let old = std::mem::replace(&mut *self.state.chaos.lock().unwrap(), chaos);
        old.map(|c| c.counts).unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn requests_for(&self, path: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }

    /// How many different paths were requested (records reached at least once).
    pub fn distinct_paths(&self) -> usize {
        let mut paths: Vec<String> = self.requests().into_iter().map(|q| q.path).collect();
        paths.sort();
        paths.dedup();
        paths.len()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// The paths of requests that arrived while another request for the
    /// same path was still being handled, once per such arrival: two
    /// deliveries of one record in flight at once.
    pub fn overlaps(&self) -> Vec<String> {
        self.state.overlaps.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.state.requests.lock().unwrap().clear();
    }

    /// From now on, records only the requests whose path starts with
    /// `prefix`; [`Receiver::arrivals`] still counts every one.
    pub fn keep_only(&self, prefix: &str) {
        *self.state.keep_only.lock().unwrap() = Some(prefix.to_string());
    }

    /// Every request that arrived, recorded or not.
    pub fn arrivals(&self) -> usize {
        self.state.arrivals.load(Ordering::SeqCst)
    }
}

fn next_action(state: &State, path: &str) -> Action {
    if let Some(chaos) = state.chaos.lock().unwrap().as_mut() {
        return chaos.next();
    }
    if let Some(a) = state.by_path.lock().unwrap().get_mut(path).and_then(VecDeque::pop_front) {
        return a;
    }
    if let Some(a) = state.default_actions.lock().unwrap().pop_front() {
        return a;
    }
    state.fallback.lock().unwrap().clone().unwrap_or(Action::status(201))
}

fn serve(conn: impl Read + Write, state: &State, stop: &AtomicBool) {
    // Answers go straight to the stream, past the read buffer.
    let mut reader = BufReader::new(conn);
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path)) = (parts.next(), parts.next()) else { return };
        let (method, path) = (method.to_string(), path.to_string());
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        // Declared after the stream: a return ends it before the connection
        // closes.
        let handling = InProgress::arrive(state, &path);
        let action = next_action(state, &path);
        let answered = action.answers();
        let at = Instant::now();
        state.arrivals.fetch_add(1, Ordering::SeqCst);
        if state.keep_only.lock().unwrap().as_deref().is_none_or(|prefix| path.starts_with(prefix)) {
            state.requests.lock().unwrap().push(Recorded { answered, method, path: path.clone(), headers, body, at });
        }
        let action = action.released();
        let writer = reader.get_mut();
        match action {
            Action::Held { .. } => unreachable!("released above"),
            Action::Drop => return,
            Action::Raw { bytes, drip } => {
                drop(handling);
                match drip {
                    None => {
                        let _ = writer.write_all(&bytes);
                    }
                    Some(d) => {
                        for b in bytes {
                            if writer.write_all(&[b]).is_err() {
                                break;
                            }
                            std::thread::sleep(d);
                        }
                    }
                }
                return;
            }
            Action::Huge(n) => {
                drop(handling);
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                if writer.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len() as u64) as usize;
                    if writer.write_all(&chunk[..k]).is_err() {
                        return;
                    }
                    left -= k as u64;
                }
            }
            Action::Hang(d) => {
                std::thread::sleep(d);
                return;
            }
            Action::Respond { status, headers, body, delay } => {
                std::thread::sleep(delay);
                drop(handling);
                let mut resp = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
                for (k, v) in headers {
                    resp.push_str(&format!("{k}: {v}\r\n"));
                }
                resp.push_str("\r\n");
                resp.push_str(&body);
                if writer.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}
