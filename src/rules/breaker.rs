//! A kind's circuit breaker. After `threshold` answers in a row that say the
//! receiver is down (no answer, 408, 429, 5xx), the kind's backlog waits: one
//! probe goes out per interval instead of one failing request per job, the
//! interval doubling up to a cap. The first probe that is answered lets the
//! backlog flow again. Jobs that wait meanwhile spend none of their attempts.
//! Pure: the clock comes in as an argument.

use super::policy::{backoff, Response};
use std::time::{Duration, Instant};

/// What an answer says of the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// It answered, even to refuse the request (a 4xx is not an outage).
    Up,
    /// No answer, or one that says it can't take requests now.
    Down,
}

/// What `response` says of the receiver; nothing if it was never asked.
pub fn signal(response: Response) -> Option<Signal> {
    match response {
        Response::Status(408 | 429) => Some(Signal::Down),
        Response::Status(s) if s >= 500 => Some(Signal::Down),
        Response::Status(_) => Some(Signal::Up),
        Response::NetworkError => Some(Signal::Down),
        Response::BuildError => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Down answers in a row that open the breaker; 0 never opens it.
    pub threshold: u32,
    /// The interval after the first opening.
    pub first: Duration,
    /// The longest interval between two probes.
    pub max: Duration,
}

impl Settings {
    /// The wait before probe number `strikes` (counting from 1).
    fn interval(&self, strikes: u32) -> Duration {
        backoff(strikes, self.first, self.max)
    }
}

/// A request of a kind, as its outcome names it: (job id, claim).
pub type Key = (i64, i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests flow; `failures` down answers in a row so far.
    Closed { failures: u32 },
    /// The receiver is taken for down: nothing goes out before `probe_at`,
    /// then one probe. `strikes` probes have failed since it opened (the
    /// opening counts as one).
    Open { strikes: u32, probe_at: Instant },
    /// The probe is out; its outcome decides.
    HalfOpen { strikes: u32, probe: Key },
}

/// What a state change means, for the log and `outbox.kind_stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed to open: the receiver is taken for down.
    Opened,
    /// A probe went out.
    Probing,
    /// The probe failed: open again, for longer.
    Reopened,
    /// The probe was answered: the backlog flows.
    Closed,
}

/// How many of a kind's requests may go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    All,
    /// One request, the probe.
    Probe,
    /// None before this instant.
    Until(Instant),
    /// None until the probe's outcome is in.
    None,
}

impl State {
    /// The name `outbox.stats()` shows.
    pub fn name(&self) -> &'static str {
        match self {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half-open",
        }
    }

    /// A breaker the last worker left open: probe at once, and if that
    /// fails, go on from the first interval.
    pub fn open_now(now: Instant) -> State {
        State::Open { strikes: 1, probe_at: now }
    }

    pub fn allows(&self, now: Instant) -> Allow {
        match *self {
            State::Closed { .. } => Allow::All,
            State::Open { probe_at, .. } if probe_at <= now => Allow::Probe,
            State::Open { probe_at, .. } => Allow::Until(probe_at),
            State::HalfOpen { .. } => Allow::None,
        }
    }

    /// The probe `Allow::Probe` allowed went out as request `probe`.
    pub fn probe_sent(&mut self, probe: Key) -> Option<Transition> {
        match *self {
            State::Open { strikes, .. } => {
                *self = State::HalfOpen { strikes, probe };
                Some(Transition::Probing)
            }
            _ => None,
        }
    }

    /// The outcome of request `key`. An outcome while open is of a request
    /// sent before it opened, and one while half-open counts only if it is
    /// the probe's. A `retry_after` the receiver asked for keeps the breaker
    /// open at least that long.
    pub fn outcome(&mut self, key: Key, signal: Signal, retry_after: Option<Duration>, now: Instant, settings: &Settings) -> Option<Transition> {
        let open = |strikes: u32| {
            let wait = settings.interval(strikes).max(retry_after.unwrap_or(Duration::ZERO).min(settings.max));
            State::Open { strikes, probe_at: now + wait }
        };
        match (*self, signal) {
            (State::Closed { .. }, Signal::Up) => {
                *self = State::Closed { failures: 0 };
                None
            }
            (State::Closed { failures }, Signal::Down) => {
                let failures = failures.saturating_add(1);
                if settings.threshold > 0 && failures >= settings.threshold {
                    *self = open(1);
                    Some(Transition::Opened)
                } else {
                    *self = State::Closed { failures };
                    None
                }
            }
            (State::Open { .. }, _) => None,
            (State::HalfOpen { probe, .. }, _) if probe != key => None,
            (State::HalfOpen { .. }, Signal::Up) => {
                *self = State::Closed { failures: 0 };
                Some(Transition::Closed)
            }
            (State::HalfOpen { strikes, .. }, Signal::Down) => {
                *self = open(strikes.saturating_add(1));
                Some(Transition::Reopened)
            }
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State::Closed { failures: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const SETTINGS: Settings = Settings { threshold: 3, first: Duration::from_secs(1), max: Duration::from_secs(8) };

    fn down(b: &mut State, key: i64, now: Instant) -> Option<Transition> {
        b.outcome((key, 1), Signal::Down, None, now, &SETTINGS)
    }

    #[test]
    fn what_an_answer_says_of_the_receiver() {
        use Response::*;
        for (response, want) in [
            (Status(200), Some(Signal::Up)),
            (Status(404), Some(Signal::Up)),
            (Status(400), Some(Signal::Up)),
            (Status(408), Some(Signal::Down)),
            (Status(429), Some(Signal::Down)),
            (Status(500), Some(Signal::Down)),
            (Status(503), Some(Signal::Down)),
            (NetworkError, Some(Signal::Down)),
            (BuildError, None),
        ] {
            assert_eq!(signal(response), want, "{response:?}");
        }
    }

    #[test]
    fn opens_after_the_threshold_in_a_row_only() {
        let t0 = Instant::now();
        let mut b = State::default();
        assert_eq!(down(&mut b, 1, t0), None);
        assert_eq!(down(&mut b, 2, t0), None);
        // An answer in between starts the count over.
        assert_eq!(b.outcome((3, 1), Signal::Up, None, t0, &SETTINGS), None);
        assert_eq!(down(&mut b, 4, t0), None);
        assert_eq!(down(&mut b, 5, t0), None);
        assert_eq!(b.allows(t0), Allow::All);
        assert_eq!(down(&mut b, 6, t0), Some(Transition::Opened));
        assert_eq!(b.name(), "open");
        assert_eq!(b.allows(t0), Allow::Until(t0 + S(1)));
        // Outcomes of requests sent before it opened change nothing.
        assert_eq!(down(&mut b, 7, t0), None);
        assert_eq!(b.outcome((8, 1), Signal::Up, None, t0, &SETTINGS), None);
        assert_eq!(b.allows(t0), Allow::Until(t0 + S(1)));
    }

    #[test]
    fn a_threshold_of_zero_never_opens() {
        let settings = Settings { threshold: 0, ..SETTINGS };
        let t0 = Instant::now();
        let mut b = State::default();
        for i in 0..1000 {
            assert_eq!(b.outcome((i, 1), Signal::Down, None, t0, &settings), None);
        }
        assert_eq!(b.allows(t0), Allow::All);
    }

    #[test]
    fn probes_back_off_to_the_cap_and_one_answer_closes_it() {
        let t0 = Instant::now();
        let mut b = State::default();
        for i in 0..3 {
            down(&mut b, i, t0);
        }
        let mut now = t0;
        let mut waits = Vec::new();
        for probe in 10..16 {
            let Allow::Until(at) = b.allows(now) else { panic!("{b:?}") };
            waits.push((at - now).as_secs());
            now = at;
            assert_eq!(b.allows(now), Allow::Probe);
            assert_eq!(b.probe_sent((probe, 1)), Some(Transition::Probing));
            assert_eq!(b.name(), "half-open");
            assert_eq!(b.allows(now), Allow::None);
            // Another request's outcome is not the probe's.
            assert_eq!(down(&mut b, 99, now), None);
            assert_eq!(down(&mut b, probe, now), Some(Transition::Reopened));
        }
        assert_eq!(waits, [1, 2, 4, 8, 8, 8]);
        now += S(8);
        b.probe_sent((20, 1));
        assert_eq!(b.outcome((20, 1), Signal::Up, None, now, &SETTINGS), Some(Transition::Closed));
        assert_eq!(b.allows(now), Allow::All);
        // Closed anew: it takes the whole threshold to open again.
        assert_eq!(down(&mut b, 21, now), None);
    }

    #[test]
    fn retry_after_holds_it_open_longer_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = State::default();
        for i in 0..2 {
            down(&mut b, i, t0);
        }
        b.outcome((2, 1), Signal::Down, Some(S(5)), t0, &SETTINGS);
        assert_eq!(b.allows(t0), Allow::Until(t0 + S(5)));
        b.probe_sent((3, 1));
        b.outcome((3, 1), Signal::Down, Some(S(3600)), t0, &SETTINGS);
        assert_eq!(b.allows(t0), Allow::Until(t0 + S(8)));
    }

    #[test]
    fn left_open_by_a_previous_worker_probes_at_once() {
        let t0 = Instant::now();
        let mut b = State::open_now(t0);
        assert_eq!(b.allows(t0), Allow::Probe);
        b.probe_sent((1, 1));
        assert_eq!(down(&mut b, 1, t0), Some(Transition::Reopened));
        assert_eq!(b.allows(t0), Allow::Until(t0 + S(2)));
    }

    #[test]
    fn a_probe_is_sent_only_from_open() {
        let mut b = State::default();
        assert_eq!(b.probe_sent((1, 1)), None);
        assert_eq!(b, State::default());
    }
}
