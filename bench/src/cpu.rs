//! Where a benchmark's CPU went: user + system time of the worker's main
//! thread, its HTTP threads, the receiver and the rest of Postgres, read from
//! /proc (Linux). CPU time per delivery is steadier on a noisy machine than a
//! rate, and says what limits one: on 2 cores, the sum of the parts bounds
//! the rate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The processes and threads to account for.
pub struct Parties {
    /// The delivery worker's pid: its main thread, and its other threads
    /// (the HTTP event loops and any name-lookup threads).
    pub worker: i32,
    /// The postmaster: it and its children other than the worker.
    pub postmaster: i32,
    /// The receiver's main process: it and its children (nginx's worker).
    pub receiver: i32,
}

/// The groups, in the order they are printed.
pub const GROUPS: [&str; 5] = ["worker main thread", "worker HTTP threads", "receiver", "other Postgres processes", "benchmark client"];

/// CPU ticks of every task of every group at one moment, and the machine's
/// (all cores: idle or waiting for I/O, stolen by the hypervisor, in all).
pub struct Sample {
    tasks: HashMap<PathBuf, (usize, u64)>,
    machine: [u64; 3],
}

/// CPU seconds spent between two samples.
pub struct Spent {
    /// Per group, in the order of [`GROUPS`].
    pub groups: [f64; 5],
    /// All cores together: idle (or waiting for I/O), stolen by the
    /// hypervisor, and in all.
    pub idle: f64,
    pub steal: f64,
    pub total: f64,
}

impl Parties {
    pub fn sample(&self) -> Sample {
        let mut tasks = HashMap::new();
        let mut add = |group: usize, stat: PathBuf| {
            if let Some(t) = stat_fields(&stat).as_deref().and_then(ticks) {
                tasks.insert(stat, (group, t));
            }
        };
        for tid in dir_pids(&format!("/proc/{}/task", self.worker)) {
            add(usize::from(tid != self.worker), PathBuf::from(format!("/proc/{}/task/{tid}/stat", self.worker)));
        }
        add(2, proc_stat(self.receiver));
        add(3, proc_stat(self.postmaster));
        add(4, proc_stat(std::process::id() as i32));
        // Children, each stat file read once for its parent and its time.
        for pid in dir_pids("/proc") {
            let stat = proc_stat(pid);
            let Some(f) = stat_fields(&stat) else { continue };
            let group = match parent(&f) {
                Some(p) if p == self.receiver => 2,
                Some(p) if p == self.postmaster && pid != self.worker => 3,
                _ => continue,
            };
            if let Some(t) = ticks(&f) {
                tasks.insert(stat, (group, t));
            }
        }
        Sample { tasks, machine: machine_ticks().unwrap_or_default() }
    }
}

impl Sample {
    /// Seconds of CPU per group from `self` to `later`. A task that started
    /// in between counts whole; one that ended in between is not counted.
    pub fn until(&self, later: &Sample) -> Spent {
        let hz = clock_ticks_per_second();
        let mut groups = [0.0; 5];
        for (path, &(group, t)) in &later.tasks {
            let before = self.tasks.get(path).map_or(0, |&(_, b)| b);
            groups[group] += t.saturating_sub(before) as f64 / hz;
        }
        let machine = |i: usize| later.machine[i].saturating_sub(self.machine[i]) as f64 / hz;
        Spent { groups, idle: machine(0), steal: machine(1), total: machine(2) }
    }
}

/// [`Spent`] per unit of work: what [`per_unit`] and [`json`] print.
struct PerUnit {
    /// µs per group, and their sum.
    groups: [f64; 5],
    total: f64,
    /// Shares (0 to 1) of all the cores' time.
    idle: f64,
    steal: f64,
}

impl Spent {
    fn per(&self, units: u64) -> PerUnit {
        let groups = self.groups.map(|s| s * 1e6 / units.max(1) as f64);
        let share = |s: f64| s / self.total.max(f64::MIN_POSITIVE);
        PerUnit { groups, total: groups.iter().sum(), idle: share(self.idle), steal: share(self.steal) }
    }
}

/// "CPU per delivery: worker main thread 18.2 µs, ...; total 45.3 µs: 2
/// cores allow at most 44150/s; the cores were idle 5% of the time, and 1%
/// was stolen": the CPU of each group per unit of work, the rate the
/// machine's cores would bound it to, and what the cores did besides.
pub fn per_unit(spent: &Spent, units: u64, unit: &str) -> String {
    let p = spent.per(units);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let parts: Vec<String> = GROUPS.iter().zip(p.groups).map(|(g, us)| format!("{g} {us:.1} µs")).collect();
    format!(
        "CPU per {unit}: {}; total {:.1} µs: {cores} cores allow at most {:.0}/s; the cores were idle {:.0}% of the time, and {:.0}% was stolen",
        parts.join(", "),
        p.total,
        cores * 1e6 / p.total.max(f64::MIN_POSITIVE),
        100.0 * p.idle,
        100.0 * p.steal
    )
}

/// The CPU figures as JSON members: µs per unit for each group and in all,
/// and the cores' idle and stolen shares.
pub fn json(spent: &Spent, units: u64) -> String {
    let p = spent.per(units);
    let keys = ["worker_main_us", "worker_http_us", "receiver_us", "other_postgres_us", "client_us"];
    let mut members: Vec<String> = keys.iter().zip(p.groups).map(|(k, us)| format!("\"{k}\":{us:.1}")).collect();
    members.push(format!("\"total_cpu_us\":{:.1}", p.total));
    members.push(format!("\"idle_share\":{:.3},\"steal_share\":{:.3}", p.idle, p.steal));
    members.join(",")
}

fn proc_stat(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/stat"))
}

fn dir_pids(dir: &str) -> Vec<i32> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// The fields of a stat file after the command name, which may hold spaces
/// and parentheses: field 3 (state) is the first.
fn stat_fields(stat: &Path) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(stat).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    // The state is a letter; keep the numbering by putting 0 in its place.
    Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// utime + stime (fields 14 and 15), in clock ticks, of [`stat_fields`].
fn ticks(f: &[u64]) -> Option<u64> {
    Some(f.get(11)? + f.get(12)?)
}

/// The parent pid (field 4) of [`stat_fields`].
fn parent(f: &[u64]) -> Option<i32> {
    f.get(1).map(|&p| p as i32)
}

/// The machine's CPU ticks so far, over all cores, from the first line of
/// /proc/stat ("cpu user nice system idle iowait irq softirq steal ..."):
/// [idle + iowait, steal, all].
fn machine_ticks() -> Option<[u64; 3]> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = text.lines().next()?.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    // guest and guest_nice are already counted in user and nice.
    let all: u64 = f.iter().take(8).sum();
    Some([f.get(3)? + f.get(4)?, *f.get(7)?, all])
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_thread_that_spins_is_counted_in_its_group() {
        let me = std::process::id() as i32;
        // This process stands in for the worker: its threads other than the
        // main one are the "HTTP threads" group.
        let parties = super::Parties { worker: me, postmaster: -1, receiver: -1 };
        let before = parties.sample();
        let (spun, done) = mpsc::channel();
        let (finish, wait) = mpsc::channel::<()>();
        let spinner = std::thread::spawn(move || {
            let t = Instant::now();
            let mut x = 0u64;
            while t.elapsed() < Duration::from_millis(400) {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            spun.send(()).unwrap();
            // Alive until sampled: an ended thread's time is gone from /proc.
            wait.recv().unwrap();
            x
        });
        done.recv().unwrap();
        let spent = before.until(&parties.sample());
        finish.send(()).unwrap();
        spinner.join().unwrap();
        let secs = spent.groups;
        assert!(secs[1] >= 0.3, "{secs:?}");
        assert!(secs.iter().all(|&s| s >= 0.0), "{secs:?}");
        // The machine's clock ran at least as long as the spinning thread.
        assert!(spent.total >= secs[1] && spent.idle <= spent.total, "{} {} {}", spent.total, spent.idle, secs[1]);
    }
}
