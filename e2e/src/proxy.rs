//! A forward HTTP proxy on a free loopback port, as a corporate network
//! would put between the server and the internet. It serves `CONNECT`
//! tunnels and absolute-form requests, and records each request line with
//! its `Proxy-Authorization`. Stopped on drop.

use std::io::{BufRead, BufReader, Read, Write};
use crate::listener::Listener;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};

/// A request the proxy was asked to carry.
#[derive(Clone, Debug)]
pub struct Seen {
    /// "CONNECT 127.0.0.1:4433 HTTP/1.1", or "PUT http://127.0.0.1:80/x HTTP/1.1".
    pub line: String,
    pub auth: Option<String>,
}

pub struct Proxy {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Stops accepting when the proxy is dropped.
    _listener: Listener,
}

impl Proxy {
    pub fn start() -> Proxy {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let listener = Listener::start(move |conn, _| {
            let _ = serve(conn, &s);
        });
        Proxy { port: listener.port, seen, _listener: listener }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one request head: its line and header lines, without the blank line.
fn head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, Vec<String>)>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        if h.trim_end().is_empty() {
            break;
        }
        headers.push(h.trim_end().to_string());
    }
    Ok(Some((line.trim_end().to_string(), headers)))
}

fn header<'h>(headers: &'h [String], name: &str) -> Option<&'h str> {
    headers.iter().find_map(|h| {
        let (k, v) = h.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Copies both ways until either side closes.
fn splice(client: TcpStream, upstream: TcpStream) -> std::io::Result<()> {
    let (mut c2, mut u2) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let (mut u, mut c) = (upstream, client);
    let _ = std::io::copy(&mut u, &mut c);
    let _ = c.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

fn serve(conn: TcpStream, seen: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let Some((line, headers)) = head(&mut reader)? else { return Ok(()) };
    seen.lock().unwrap().push(Seen { line: line.clone(), auth: header(&headers, "proxy-authorization").map(str::to_string) });
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method == "CONNECT" {
        let upstream = TcpStream::connect(target)?;
        (&conn).write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
        return splice(conn, upstream);
    }
    // Absolute form: "http://host:port/path". One request per connection
    // is enough here; the answer's end closes both.
    let rest = target.strip_prefix("http://").unwrap_or(target);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut upstream = TcpStream::connect(if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") })?;
    let mut out = format!("{method} {} HTTP/1.1\r\n", if path.is_empty() { "/" } else { path });
    for h in headers.iter().filter(|h| !h.to_ascii_lowercase().starts_with("proxy-") && !h.to_ascii_lowercase().starts_with("connection:")) {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    upstream.write_all(out.as_bytes())?;
    let len: usize = header(&headers, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    upstream.write_all(&body)?;
    // No second request comes: the receiver sees the end and closes after
    // answering.
    upstream.shutdown(Shutdown::Write)?;
    // The receiver's answer, then both sides close.
    let mut answer = Vec::new();
    let _ = upstream.read_to_end(&mut answer);
    let mut answer = String::from_utf8_lossy(&answer).into_owned();
    if !answer.to_ascii_lowercase().contains("connection: close") {
        answer = answer.replacen("\r\n", "\r\nconnection: close\r\n", 1);
    }
    (&conn).write_all(answer.as_bytes())?;
    conn.shutdown(Shutdown::Both)
}
