//! A kind's `rate_limit`: a token bucket, so that requests go out evenly at
//! the rate, not in bursts. It holds a tenth of a second's worth of
//! requests (at least one): a kind idle for a while starts with that much,
//! never with a second's burst. Pure: the clock comes in as an argument.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The most tokens a bucket holds at `per_second`.
fn capacity(per_second: f64) -> f64 {
    (per_second / 10.0).max(1.0)
}

impl Bucket {
    /// A full bucket.
    pub fn new(per_second: f64, now: Instant) -> Bucket {
        Bucket { tokens: capacity(per_second), at: now }
    }

    fn refill(&mut self, per_second: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(capacity(per_second));
        self.at = now;
    }

    /// How many requests may go out now.
    pub fn available(&mut self, per_second: f64, now: Instant) -> usize {
        self.refill(per_second, now);
        self.tokens.max(0.0).floor() as usize
    }

    /// Spends `n` tokens (for requests just claimed).
    pub fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// How long until one more request may go out.
    pub fn wait_for_one(&self, per_second: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / per_second).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_holds_a_tenth_of_a_second_and_refills_at_the_rate() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Bucket::new(50.0, t0);
        assert_eq!(b.available(50.0, t0), 5);
        b.take(5);
        assert_eq!(b.available(50.0, t0), 0);
        assert_eq!(b.wait_for_one(50.0), ms(20));
        assert_eq!(b.available(50.0, t0 + ms(20)), 1);
        assert_eq!(b.available(50.0, t0 + ms(60)), 3);
        // Idle a long time: still no more than the capacity.
        assert_eq!(b.available(50.0, t0 + Duration::from_secs(60)), 5);
    }

    #[test]
    fn a_slow_rate_holds_one_request_and_spaces_the_next() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2.0, t0);
        assert_eq!(b.available(2.0, t0), 1);
        b.take(1);
        assert_eq!(b.available(2.0, t0 + Duration::from_millis(499)), 0);
        assert_eq!(b.wait_for_one(2.0), Duration::from_millis(1));
        assert_eq!(b.available(2.0, t0 + Duration::from_millis(500)), 1);
    }

    #[test]
    fn over_time_the_rate_holds() {
        // Claims as soon as a token is there, for ten seconds at 7/s.
        let t0 = Instant::now();
        let mut b = Bucket::new(7.0, t0);
        let mut sent = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            let n = b.available(7.0, now);
            b.take(n);
            sent += n;
            now += b.wait_for_one(7.0).max(Duration::from_millis(1));
        }
        assert!((70..=71).contains(&sent), "{sent}");
    }
}
