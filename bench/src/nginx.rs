//! A fast receiver for benchmarks: Debian's nginx on a free loopback port,
//! one worker process, answering 201 to everything at once and recording
//! nothing. Requests are counted by nginx's stub_status module, so the count
//! costs the receiver nothing per request. Stopped on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const STATUS_PATH: &str = "/__outbox_bench_status";

pub struct Nginx {
    pub port: u16,
    dir: PathBuf,
    child: Child,
    /// Status requests made so far: nginx counts them as requests too.
    polls: std::cell::Cell<u64>,
}

impl Nginx {
    pub fn start() -> Nginx {
        let port = outbox_e2e::cluster::free_port();
        let dir = std::env::temp_dir().join(format!("outbox-bench-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = format!(
            "worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = {STATUS_PATH} {{ stub_status; }}
        location / {{ return 201; }}
    }}
}}
",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .args(["-p", &dir.display().to_string(), "-c", "nginx.conf", "-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting nginx (scripts/setup.sh bench installs it): {e}"));
        let n = Nginx { port, dir, child, polls: 0.into() };
        assert!(outbox_e2e::wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok()), "nginx did not start");
        n
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The master process's pid (its worker is its child).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Requests answered so far, not counting our own status requests.
    pub fn count(&self) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "GET {STATUS_PATH} HTTP/1.0\r\nHost: bench\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        self.polls.set(self.polls.get() + 1);
        // "server accepts handled requests\n A B C\n": C counts this request.
        let requests: u64 = text
            .lines()
            .skip_while(|l| !l.contains("accepts handled requests"))
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected stub_status answer: {text}"));
        requests - self.polls.get()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if !outbox_e2e::wait_until(Duration::from_secs(5), || matches!(self.child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
