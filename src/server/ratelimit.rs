//! Token-bucket rate limiting, per API key and per client IP (seed 002's
//! `X-RateLimit-*` and `Retry-After` headers), and of failed
//! authentications per client IP, where a request [`RateLimiter::peek`]s
//! first and spends a token only when its key is refused.
//!
//! Each caller gets a bucket of `per_minute` tokens that refills at
//! `per_minute / 60` tokens a second; a request takes one token. Buckets of
//! callers idle for a while are dropped so the map stays small.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The verdict for one request, and the numbers for the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_after: u64,
    /// Seconds until one token is available (for Retry-After).
    pub retry_after: u64,
}

pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Buckets are swept when the map grows past this many callers.
const SWEEP_AT: usize = 10_000;

impl RateLimiter {
    /// `per_minute == 0` disables limiting.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_minute > 0
    }

    /// Takes a token from `caller`'s bucket.
    pub fn check(&self, caller: &str) -> Decision {
        self.check_at(caller, Instant::now())
    }

    pub fn check_at(&self, caller: &str, now: Instant) -> Decision {
        self.decide(caller, now, true)
    }

    /// Whether `caller` has a token left, without taking it: the failed-
    /// authentication limit asks this before looking at a key, and takes a
    /// token only when the key turns out wrong.
    pub fn peek(&self, caller: &str) -> Decision {
        self.peek_at(caller, Instant::now())
    }

    pub fn peek_at(&self, caller: &str, now: Instant) -> Decision {
        self.decide(caller, now, false)
    }

    fn decide(&self, caller: &str, now: Instant, take: bool) -> Decision {
        let cap = f64::from(self.per_minute);
        let rate = cap / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = match buckets.get(caller) {
            Some(b) => (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(cap),
            None => cap,
        };
        let allowed = tokens >= 1.0;
        let left = if allowed && take {
            tokens - 1.0
        } else {
            tokens
        };
        // Peeking never adds a bucket: only what was taken is state.
        if take {
            if buckets.len() > SWEEP_AT {
                // A full bucket carries no state worth keeping.
                buckets.retain(|_, b| {
                    b.tokens + now.duration_since(b.last).as_secs_f64() * rate < cap
                });
            }
            buckets.insert(
                caller.to_string(),
                Bucket {
                    tokens: left,
                    last: now,
                },
            );
        }
        Decision {
            allowed,
            limit: self.per_minute,
            remaining: left.floor() as u32,
            reset_after: ((cap - left) / rate).ceil() as u64,
            retry_after: if allowed {
                0
            } else {
                ((1.0 - left) / rate).ceil().max(1.0) as u64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_empties_then_refills() {
        let rl = RateLimiter::new(60);
        let t0 = Instant::now();
        for i in 0..60 {
            let d = rl.check_at("a", t0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 59 - i);
        }
        let d = rl.check_at("a", t0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, 1);
        assert!(rl.check_at("b", t0).allowed, "callers are independent");
        assert!(rl.check_at("a", t0 + Duration::from_secs(1)).allowed);
        assert!(!rl.check_at("a", t0 + Duration::from_secs(1)).allowed);
    }

    #[test]
    fn peeking_takes_nothing() {
        let rl = RateLimiter::new(2);
        let t0 = Instant::now();
        for _ in 0..5 {
            let d = rl.peek_at("a", t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, 2);
        }
        assert!(rl.check_at("a", t0).allowed);
        assert!(rl.check_at("a", t0).allowed);
        let d = rl.peek_at("a", t0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, 30);
        // Two a minute: one token is back after 30 s.
        assert!(rl.peek_at("a", t0 + Duration::from_secs(30)).allowed);
    }
}
