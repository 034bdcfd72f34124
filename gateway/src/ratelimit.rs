//! Per-visitor rate limits (HTTP 429): a token bucket per visitor in a fixed-capacity table with CLOCK eviction, so memory stays bounded however many visitors come; time is passed in, never read.
//!
//! A bucket holds up to `burst` tokens and refills at `messages_per_s`; each message takes one.
//! Tokens are kept in thousandths, so refill is exact integer arithmetic: one millisecond adds
//! `messages_per_s` thousandths.
//!
//! The table holds `visitors_tracked_max` buckets, allocated at construction. When a new visitor
//! arrives and the table is full, one bucket is evicted: first choice is a bucket that has
//! refilled completely (forgetting it loses nothing, a new bucket starts full), otherwise the
//! CLOCK hand's pick among buckets not used since the hand last passed. New buckets start
//! unreferenced, so a crowd of one-message visitors evicts each other rather than the visitor
//! that keeps sending (and keeps being limited). Evicting a bucket that was not full forgives
//! its debt; [`RateLimiter::evicted_unfilled`] counts those so an operator can size the table.
//!
//! Keys: the gateway uses the conversation id for messages (a visitor token grants exactly one
//! conversation) and [`ip_key`] of the peer address for starting conversations, each in its own
//! limiter.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::tenant::RateLimitConfig;

const MILLI: u64 = 1000;

/// Refused: try again after `retry_after_ms` (for `Retry-After`, rounded up to seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded: retry after {retry_after_ms} ms")]
pub struct Limited {
    pub retry_after_ms: u64,
}

impl Limited {
    pub const HTTP_STATUS: u16 = 429;

    /// Whole seconds for the `Retry-After` header (at least 1).
    pub fn retry_after_s(&self) -> u64 {
        self.retry_after_ms.div_ceil(1000).max(1)
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    tokens_milli: u64,
    updated_ms: u64,
    /// Used since the CLOCK hand last passed (not set on creation).
    referenced: bool,
}

/// Token buckets for up to `visitors_tracked_max` visitors. Not thread-safe: one per shard.
#[derive(Debug)]
pub struct RateLimiter {
    refill_milli_per_ms: u64,
    burst_milli: u64,
    capacity: usize,
    slots: Vec<Slot>,
    /// foldhash (seeded per process): keys are conversation ids the gateway made, or peer
    /// addresses, whose insertions a peer cannot aim at one bucket without the seed.
    index: HashMap<u64, u32, foldhash::fast::RandomState>,
    hand: usize,
    evicted_unfilled: u64,
}

impl RateLimiter {
    /// Panics on zero limits: `tenant::validate_tenants` checks them first.
    pub fn new(config: &RateLimitConfig) -> Self {
        assert!(config.messages_per_s >= 1 && config.burst >= 1);
        assert!(
            config.visitors_tracked_max >= 1 && config.visitors_tracked_max <= u32::MAX as usize
        );
        Self {
            refill_milli_per_ms: u64::from(config.messages_per_s),
            burst_milli: u64::from(config.burst) * MILLI,
            capacity: config.visitors_tracked_max,
            slots: Vec::with_capacity(config.visitors_tracked_max),
            // Grows with the visitors seen (up to the bound) rather than sized for the bound:
            // a table sized for 65,536 keys spreads a few active ones over megabytes, and each
            // check then misses the cache.
            index: HashMap::default(),
            hand: 0,
            evicted_unfilled: 0,
        }
    }

    /// Takes one token from `key`'s bucket at `now_ms`, or says how long until one is there.
    /// A clock that steps back counts as no time passing.
    pub fn check(&mut self, key: u64, now_ms: u64) -> Result<(), Limited> {
        let at = match self.index.get(&key) {
            Some(&at) => {
                let at = at as usize;
                self.refill(at, now_ms);
                self.slots[at].referenced = true;
                at
            }
            None => self.insert(key, now_ms),
        };
        let slot = &mut self.slots[at];
        if slot.tokens_milli >= MILLI {
            slot.tokens_milli -= MILLI;
            Ok(())
        } else {
            let missing = MILLI - slot.tokens_milli;
            Err(Limited {
                retry_after_ms: missing.div_ceil(self.refill_milli_per_ms),
            })
        }
    }

    fn refill(&mut self, at: usize, now_ms: u64) {
        let slot = &mut self.slots[at];
        let elapsed_ms = now_ms.saturating_sub(slot.updated_ms);
        slot.tokens_milli = slot
            .tokens_milli
            .saturating_add(elapsed_ms.saturating_mul(self.refill_milli_per_ms))
            .min(self.burst_milli);
        slot.updated_ms = slot.updated_ms.max(now_ms);
    }

    fn insert(&mut self, key: u64, now_ms: u64) -> usize {
        let slot = Slot {
            key,
            tokens_milli: self.burst_milli,
            updated_ms: now_ms,
            referenced: false,
        };
        let at = if self.slots.len() < self.capacity {
            self.slots.push(slot);
            self.slots.len() - 1
        } else {
            let at = self.victim(now_ms);
            let old = std::mem::replace(&mut self.slots[at], slot);
            self.index.remove(&old.key);
            at
        };
        self.index.insert(key, at as u32);
        at
    }

    /// The slot to reuse: the first full bucket the hand meets, else the first unreferenced one
    /// (clearing reference bits on the way). At most two turns of the hand.
    fn victim(&mut self, now_ms: u64) -> usize {
        let len = self.slots.len();
        for _ in 0..2 * len {
            let at = self.hand;
            self.hand = (self.hand + 1) % len;
            self.refill(at, now_ms);
            let slot = &mut self.slots[at];
            if slot.tokens_milli == self.burst_milli {
                return at;
            }
            if !slot.referenced {
                self.evicted_unfilled += 1;
                return at;
            }
            slot.referenced = false;
        }
        unreachable!("after one turn every reference bit is clear")
    }

    /// Visitors tracked now (at most `visitors_tracked_max`).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Buckets evicted before they had refilled: each let one visitor start over early.
    pub fn evicted_unfilled(&self) -> u64 {
        self.evicted_unfilled
    }
}

/// A limiter key for a peer address. IPv6 visitors are keyed by their /64 (one host usually has
/// the whole prefix, so keying by full address would let it rotate past the limit); the top bit
/// tells the two families apart.
pub fn ip_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u64::from(u32::from(v4)),
            None => (u128::from(v6) >> 64) as u64 | (1 << 63),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(messages_per_s: u32, burst: u32, visitors_tracked_max: usize) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig {
            messages_per_s,
            burst,
            visitors_tracked_max,
        })
    }

    #[test]
    fn burst_then_steady_rate() {
        let mut l = limiter(2, 3, 16);
        for _ in 0..3 {
            assert_eq!(l.check(1, 1_000), Ok(()));
        }
        // Empty: one token takes 500 ms at 2/s.
        assert_eq!(
            l.check(1, 1_000),
            Err(Limited {
                retry_after_ms: 500
            })
        );
        assert_eq!(
            l.check(1, 1_300),
            Err(Limited {
                retry_after_ms: 200
            })
        );
        assert_eq!(l.check(1, 1_500), Ok(()));
        assert!(l.check(1, 1_500).is_err());
        // Other visitors are independent.
        assert_eq!(l.check(2, 1_500), Ok(()));
        // A long pause refills only up to the burst.
        for _ in 0..3 {
            assert_eq!(l.check(1, 100_000), Ok(()));
        }
        assert!(l.check(1, 100_000).is_err());
        // Over 10 s at 2/s exactly 20 messages pass, whatever the call pattern.
        let mut passed = 0;
        for ms in (100_001..=110_000).step_by(7) {
            passed += usize::from(l.check(1, ms).is_ok());
        }
        assert_eq!(
            passed, 19,
            "10 s minus the first ms at 2/s, from an empty bucket"
        );
        assert_eq!(Limited { retry_after_ms: 1 }.retry_after_s(), 1);
        assert_eq!(
            Limited {
                retry_after_ms: 1_001
            }
            .retry_after_s(),
            2
        );
    }

    #[test]
    fn clock_going_back_gives_nothing() {
        let mut l = limiter(1, 1, 4);
        assert!(l.check(7, 10_000).is_ok());
        assert!(l.check(7, 5_000).is_err());
        assert!(l.check(7, 10_999).is_err());
        assert!(l.check(7, 11_000).is_ok());
    }

    #[test]
    fn memory_is_bounded_and_a_persistent_sender_stays_limited() {
        let mut l = limiter(1, 2, 8);
        // Visitor 1 spends its burst and keeps trying.
        assert!(l.check(1, 0).is_ok());
        assert!(l.check(1, 0).is_ok());
        let (mut now, mut allowed) = (0u64, 0usize);
        for new_visitor in 100..10_000u64 {
            now += 1;
            assert!(
                l.check(new_visitor, now).is_ok(),
                "a new visitor starts with a burst"
            );
            assert!(l.len() <= 8);
            if new_visitor % 3 == 0 {
                allowed += usize::from(l.check(1, now).is_ok());
            }
        }
        // 9.9 s at 1/s after spending the burst: 9 messages. Had its bucket been evicted, it
        // would have started over with a burst of 2 each time.
        assert_eq!(allowed, 9, "visitor 1 was forgiven");
        assert_eq!(l.len(), 8);
        assert!(
            l.evicted_unfilled() > 0,
            "one-message visitors evicted each other"
        );
        assert!(l.index.len() == l.slots.len());
        for (at, slot) in l.slots.iter().enumerate() {
            assert_eq!(l.index[&slot.key] as usize, at);
        }
    }

    #[test]
    fn full_buckets_are_evicted_first() {
        let mut l = limiter(1, 1, 2);
        assert!(l.check(1, 0).is_ok()); // empty bucket, referenced on its next use
        assert!(l.check(1, 0).is_err());
        assert!(l.check(2, 0).is_ok()); // empty too, unreferenced
        // At 500 ms neither has refilled; the hand clears 1's bit and takes 2 (unreferenced).
        assert!(l.check(3, 500).is_ok());
        assert!(l.check(1, 500).is_err(), "visitor 1 kept its debt");
        // At 5 s every bucket refilled: any can go without forgiving anything.
        let before = l.evicted_unfilled();
        assert!(l.check(4, 5_000).is_ok());
        assert_eq!(l.evicted_unfilled(), before);
    }

    #[test]
    fn ip_keys() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(ip_key(v4), ip_key(mapped));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        assert_ne!(ip_key(a), ip_key(v4));
    }
}
