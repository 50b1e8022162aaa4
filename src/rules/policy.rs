//! Delivery policy: how a response is classified and when a failed job runs
//! again. Pure: the clock and the randomness come in as arguments.

use std::time::{Duration, SystemTime};

/// What a delivery attempt means for its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered: the job is done.
    Success,
    /// Try again after a backoff (or after `Retry-After`).
    Retry,
    /// Retrying cannot help: the job goes straight to `dead`.
    Permanent,
}

/// The outcome of an HTTP exchange as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Status(u16),
    /// No usable response: connect error, timeout, reset, malformed HTTP.
    NetworkError,
    /// The job could not even be built (bad URL, body function raised).
    BuildError,
}

pub fn classify(is_delete: bool, response: Response) -> Verdict {
    match response {
        Response::Status(s) if (200..300).contains(&s) => Verdict::Success,
        Response::Status(404 | 410) if is_delete => Verdict::Success,
        Response::Status(408 | 429) => Verdict::Retry,
        Response::Status(s) if s >= 500 => Verdict::Retry,
        Response::Status(_) => Verdict::Permanent,
        Response::NetworkError | Response::BuildError => Verdict::Retry,
    }
}

/// The HTTP status of a response, if it had one.
pub fn status(response: Response) -> Option<i32> {
    match response {
        Response::Status(s) => Some(i32::from(s)),
        _ => None,
    }
}

/// What a failed attempt's job shows as its last_error: the status, and
/// what the receiver said, if anything.
pub fn error_text(response: Response, detail: Option<&str>) -> Option<String> {
    match (status(response), detail.filter(|d| !d.is_empty())) {
        (Some(s), Some(d)) => Some(format!("HTTP {s}: {d}")),
        (Some(s), None) => Some(format!("HTTP {s}")),
        (None, d) => d.map(str::to_string),
    }
}

/// What came of an attempt, as the counters and `outbox.metrics()` tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Delivered,
    /// Refused for good: a 3xx, or a 4xx but 408 and 429.
    Rejected,
    /// 429: the receiver asked us to slow down.
    Throttled,
    /// A 5xx, or 408.
    ServerError,
    /// No usable answer: connect error, timeout, reset, malformed HTTP.
    Unreachable,
    /// No request: the URL or the body could not be made.
    Unbuildable,
}

impl Class {
    /// As `outbox.attempts` and `outbox.metrics()` name it.
    pub fn name(self) -> &'static str {
        match self {
            Class::Delivered => "delivered",
            Class::Rejected => "rejected",
            Class::Throttled => "throttled",
            Class::ServerError => "server_error",
            Class::Unreachable => "unreachable",
            Class::Unbuildable => "unbuildable",
        }
    }
}

pub fn class(is_delete: bool, response: Response) -> Class {
    match (classify(is_delete, response), response) {
        (Verdict::Success, _) => Class::Delivered,
        (_, Response::Status(429)) => Class::Throttled,
        (_, Response::Status(s)) if s >= 500 || s == 408 => Class::ServerError,
        (_, Response::Status(_)) => Class::Rejected,
        (_, Response::NetworkError) => Class::Unreachable,
        (_, Response::BuildError) => Class::Unbuildable,
    }
}

/// The jitter-free curve: `base * 2^(attempt-1)`, capped at `max` before it
/// can overflow. `attempt` counts from 1 (the attempt that just failed).
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(62);
    let factor = 1u64 << exp;
    let millis = (base.as_millis() as u64).saturating_mul(factor);
    Duration::from_millis(millis).min(max)
}

/// Spreads a delay over `[delay/2, delay]` so that jobs failing together do
/// not come back together. `unit` is a uniform sample from `[0, 1)`.
fn jitter(delay: Duration, unit: f64) -> Duration {
    let unit = unit.clamp(0.0, 1.0);
    delay.mul_f64(0.5 + unit / 2.0)
}

/// The delay before the next attempt. A receiver's `Retry-After` wins over
/// the curve but is still capped by `max`.
pub fn retry_delay(attempt: u32, retry_after: Option<Duration>, base: Duration, max: Duration, unit: f64) -> Duration {
    match retry_after {
        Some(d) => d.min(max),
        None => jitter(backoff(attempt, base, max), unit),
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP date, relative to `now`.
/// Past dates mean "now"; garbage means no hint.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn classification_table() {
        use Response::*;
        use Verdict::*;
        let table = [
            (false, Status(200), Success),
            (false, Status(201), Success),
            (false, Status(204), Success),
            (false, Status(299), Success),
            (false, Status(404), Permanent),
            (true, Status(404), Success),
            (true, Status(410), Success),
            (false, Status(410), Permanent),
            (false, Status(408), Retry),
            (false, Status(429), Retry),
            (false, Status(500), Retry),
            (false, Status(503), Retry),
            (false, Status(599), Retry),
            (false, Status(400), Permanent),
            (false, Status(401), Permanent),
            (false, Status(422), Permanent),
            (false, Status(301), Permanent),
            (false, Status(302), Permanent),
            (false, Status(100), Permanent),
            (false, NetworkError, Retry),
            (true, NetworkError, Retry),
            (false, BuildError, Retry),
        ];
        for (is_delete, response, want) in table {
            assert_eq!(classify(is_delete, response), want, "{is_delete} {response:?}");
        }
    }

    #[test]
    fn error_texts_say_the_status_and_what_the_receiver_said() {
        use Response::*;
        assert_eq!(error_text(Status(503), Some("busy")).as_deref(), Some("HTTP 503: busy"));
        assert_eq!(error_text(Status(503), Some("")).as_deref(), Some("HTTP 503"));
        assert_eq!(error_text(Status(500), None).as_deref(), Some("HTTP 500"));
        assert_eq!(error_text(NetworkError, Some("timed out")).as_deref(), Some("timed out"));
        assert_eq!(error_text(NetworkError, None), None);
        assert_eq!(status(Status(204)), Some(204));
        assert_eq!(status(BuildError), None);
    }

    #[test]
    fn classes_of_outcomes() {
        use Response::*;
        for (is_delete, response, want) in [
            (false, Status(204), Class::Delivered),
            (true, Status(404), Class::Delivered),
            (false, Status(404), Class::Rejected),
            (false, Status(301), Class::Rejected),
            (false, Status(429), Class::Throttled),
            (false, Status(408), Class::ServerError),
            (false, Status(502), Class::ServerError),
            (false, NetworkError, Class::Unreachable),
            (false, BuildError, Class::Unbuildable),
        ] {
            assert_eq!(class(is_delete, response), want, "{is_delete} {response:?}");
        }
    }

    #[test]
    fn base_curve_schedule() {
        let base = S(1);
        let max = S(3600);
        let got: Vec<u64> = (1..=14).map(|a| backoff(a, base, max).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600]);
        assert_eq!(backoff(0, base, max), S(1));
        assert_eq!(backoff(u32::MAX, base, max), max);
        assert_eq!(backoff(200, Duration::from_millis(u64::MAX / 2), Duration::MAX), Duration::from_millis(u64::MAX));
    }

    #[test]
    fn jitter_bounds() {
        let d = S(100);
        assert_eq!(jitter(d, 0.0), S(50));
        assert_eq!(jitter(d, 0.5), S(75));
        assert!(jitter(d, 0.999_999) <= d);
        assert_eq!(jitter(d, 7.0), d);
        assert_eq!(jitter(d, -1.0), S(50));
        for i in 0..100 {
            let j = jitter(d, i as f64 / 100.0);
            assert!(j >= S(50) && j <= d);
        }
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        assert_eq!(retry_delay(1, Some(S(7)), S(1), S(60), 0.0), S(7));
        assert_eq!(retry_delay(1, Some(S(7200)), S(1), S(60), 0.0), S(60));
        assert_eq!(retry_delay(3, None, S(1), S(60), 0.0), S(2));
        assert_eq!(retry_delay(3, None, S(1), S(60), 1.0), S(4));
    }

    #[test]
    fn parses_retry_after() {
        let now = SystemTime::UNIX_EPOCH + S(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after("120", now), Some(S(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(S(0)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(S(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(S(0)));
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
