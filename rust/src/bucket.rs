//! Token buckets that many sessions (on several worker threads) draw from.
//!
//! A bucket refills at `rate` bytes/s up to `burst` bytes; rate 0 means
//! unlimited. Sessions do not poll for tokens: they *reserve* a quantum and
//! are told how long to sleep until the reservation is covered. The bucket
//! keeps two cumulative byte counts, `supply` (tokens ever credited) and
//! `demand` (tokens ever reserved); a reservation is the position `demand`
//! reached when it was taken, and it is covered once `supply` gets there.
//! Reservations are therefore served in the order they were made, which is
//! what splits a shared device bucket fairly between its sessions, and a
//! change of rate moves every sleeper's wake-up time at once (the worker
//! recomputes it from the same position).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Smallest default burst, in bytes (see [`default_burst`]).
pub const MIN_BURST: f64 = 16384.0;

/// Largest quantum a throttled session reserves at once. Bounds the bytes one
/// wake-up may move; 256 KiB keeps a 100 MB/s session at ~400 wake-ups/s.
pub const MAX_QUANTUM: u64 = 256 * 1024;

/// Burst used when none is given: 50 ms worth of rate, at least 16 KiB.
/// Same formula as `swiftftp.relay.default_burst`.
pub fn default_burst(rate: f64) -> f64 {
    (rate * 0.05).max(MIN_BURST)
}

#[derive(Debug)]
struct State {
    rate: f64,
    burst: f64,
    /// Tokens ever credited (whole bytes) ...
    supply: u64,
    /// ... plus the fraction of a byte not yet credited.
    frac: f64,
    /// Tokens ever reserved.
    demand: u64,
    stamp: Instant,
}

impl State {
    /// Tokens available now; negative while reservations are waiting.
    fn tokens(&self) -> f64 {
        self.supply as f64 - self.demand as f64 + self.frac
    }

    fn refill(&mut self, now: Instant) {
        if now <= self.stamp {
            return;
        }
        if self.rate > 0.0 {
            let add = now.duration_since(self.stamp).as_secs_f64() * self.rate + self.frac;
            let whole = add.floor();
            self.supply = self.supply.saturating_add(whole as u64);
            self.frac = add - whole;
            self.cap();
        }
        self.stamp = now;
    }

    /// Tokens beyond `burst` are thrown away (they were not used in time).
    fn cap(&mut self) {
        let ceiling = self.demand.saturating_add(self.burst as u64);
        if self.supply >= ceiling {
            self.supply = ceiling;
            self.frac = 0.0;
        }
    }
}

/// A thread-safe token bucket (see the module docs).
#[derive(Debug)]
pub struct Bucket {
    state: Mutex<State>,
}

impl Bucket {
    /// A full bucket; `burst` None (or 0) means [`default_burst`]`(rate)`.
    pub fn new(rate: f64, burst: Option<f64>, now: Instant) -> Result<Self, &'static str> {
        let bucket = Bucket {
            state: Mutex::new(State {
                rate: 0.0,
                burst: 0.0,
                supply: 0,
                frac: 0.0,
                demand: 0,
                stamp: now,
            }),
        };
        bucket.set_rate(rate, burst, now)?;
        {
            let mut s = bucket.lock();
            s.supply = s.burst as u64;
        }
        Ok(bucket)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain numbers, valid even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refill rate in bytes/s (0 = unlimited).
    pub fn rate(&self) -> f64 {
        self.lock().rate
    }

    /// Capacity in bytes.
    pub fn burst(&self) -> f64 {
        self.lock().burst
    }

    /// Tokens available at `now` (negative while sessions wait for tokens).
    pub fn tokens(&self, now: Instant) -> f64 {
        let mut s = self.lock();
        s.refill(now);
        s.tokens()
    }

    /// Change the limits. Tokens earned so far are kept (up to the new burst);
    /// sessions waiting on this bucket must be re-evaluated by their workers.
    pub fn set_rate(
        &self,
        rate: f64,
        burst: Option<f64>,
        now: Instant,
    ) -> Result<(), &'static str> {
        if !(rate >= 0.0 && rate.is_finite()) || burst.is_some_and(|b| !(b >= 0.0 && b.is_finite()))
        {
            return Err("rate and burst must be finite and >= 0");
        }
        let mut s = self.lock();
        s.refill(now);
        let was_unlimited = s.rate == 0.0;
        s.rate = rate;
        s.burst = match burst {
            Some(b) if b > 0.0 => b,
            _ => default_burst(rate),
        };
        if was_unlimited && s.supply < s.demand {
            // Reservations made while unlimited were all let through: forget the debt.
            s.supply = s.demand;
            s.frac = 0.0;
        }
        s.cap();
        Ok(())
    }

    /// Reserve `n` tokens: None when the bucket is unlimited (nothing to wait
    /// for), else the position that [`Bucket::wait`] checks.
    pub fn reserve(&self, n: u64, now: Instant) -> Option<u64> {
        let mut s = self.lock();
        if s.rate == 0.0 {
            return None;
        }
        s.refill(now);
        s.demand += n;
        Some(s.demand)
    }

    /// How long until the reservation at `pos` is covered; None = covered now
    /// (or the bucket became unlimited).
    pub fn wait(&self, pos: u64, now: Instant) -> Option<Duration> {
        let mut s = self.lock();
        if s.rate == 0.0 {
            return None;
        }
        s.refill(now);
        if s.supply >= pos {
            return None;
        }
        let missing = (pos - s.supply) as f64 - s.frac;
        // Round up to a whole microsecond so the timer never fires just short.
        Some(Duration::from_micros(
            (missing / s.rate * 1e6).ceil().max(1.0) as u64,
        ))
    }

    /// Give back `n` reserved tokens that were not used.
    pub fn refund(&self, n: u64, now: Instant) {
        let mut s = self.lock();
        if s.rate == 0.0 || n == 0 {
            return;
        }
        s.refill(now);
        s.supply = s.supply.saturating_add(n);
        s.cap();
    }

    /// The quantum a session reserves from this bucket: half a burst, so the
    /// tokens that pile up while a timer fires late still fit under the cap.
    fn quantum(&self) -> Option<u64> {
        let s = self.lock();
        (s.rate > 0.0).then(|| ((s.burst / 2.0) as u64).clamp(1, MAX_QUANTUM))
    }
}

/// The buckets one direction of a session draws from (session, device, node).
#[derive(Debug, Clone, Default)]
pub struct Chain {
    buckets: Vec<Arc<Bucket>>,
}

/// Tokens reserved in every limited bucket of a chain, not yet covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    amount: u64,
    /// (index in the chain, position) for each bucket that was limited.
    positions: Vec<(usize, u64)>,
}

impl Reservation {
    /// Bytes reserved.
    pub fn amount(&self) -> u64 {
        self.amount
    }
}

impl Chain {
    /// A chain over `buckets`, in any order.
    pub fn new(buckets: Vec<Arc<Bucket>>) -> Self {
        Chain { buckets }
    }

    /// True when there is no bucket at all (the fast path: never reserve).
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Reserve up to `want` bytes (the quantum of the tightest bucket). None
    /// when every bucket is unlimited right now: move `want` bytes freely.
    pub fn reserve(&self, want: u64, now: Instant) -> Option<Reservation> {
        let amount = self
            .buckets
            .iter()
            .filter_map(|b| b.quantum())
            .min()?
            .min(want)
            .max(1);
        let positions: Vec<(usize, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.reserve(amount, now).map(|pos| (i, pos)))
            .collect();
        if positions.is_empty() {
            return None; // became unlimited between the two looks
        }
        Some(Reservation { amount, positions })
    }

    /// How long until `r` is covered in every bucket; None = go now.
    pub fn wait(&self, r: &Reservation, now: Instant) -> Option<Duration> {
        r.positions
            .iter()
            .filter_map(|&(i, pos)| self.buckets[i].wait(pos, now))
            .max()
    }

    /// Give back `n` unused tokens to every limited bucket.
    pub fn refund(&self, n: u64, now: Instant) {
        if n == 0 {
            return;
        }
        for b in &self.buckets {
            b.refund(n, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn default_burst_matches_python() {
        assert_eq!(default_burst(0.0), 16384.0);
        assert_eq!(default_burst(1_000_000.0), 50_000.0);
        let t0 = Instant::now();
        let b = Bucket::new(1_000_000.0, None, t0).unwrap();
        assert_eq!(b.burst(), 50_000.0);
        let b = Bucket::new(1_000_000.0, Some(0.0), t0).unwrap();
        assert_eq!(b.burst(), 50_000.0);
        assert!(Bucket::new(-1.0, None, t0).is_err());
        assert!(Bucket::new(1.0, Some(f64::NAN), t0).is_err());
    }

    #[test]
    fn starts_full_and_refills_at_rate_up_to_burst() {
        let t0 = Instant::now();
        let b = Bucket::new(100_000.0, Some(10_000.0), t0).unwrap();
        assert_eq!(b.tokens(t0), 10_000.0);
        assert_eq!(b.reserve(10_000, t0), Some(10_000));
        assert_eq!(b.tokens(t0), 0.0);
        assert!((b.tokens(at(t0, 50)) - 5_000.0).abs() < 1.0);
        assert_eq!(b.tokens(at(t0, 5_000)), 10_000.0, "capped at burst");
    }

    #[test]
    fn unlimited_bucket_never_waits() {
        let t0 = Instant::now();
        let b = Arc::new(Bucket::new(0.0, None, t0).unwrap());
        let chain = Chain::new(vec![b]);
        assert_eq!(chain.reserve(1 << 30, t0), None);
    }

    #[test]
    fn reservation_waits_for_exactly_the_missing_tokens() {
        let t0 = Instant::now();
        let b = Bucket::new(1_000_000.0, Some(100_000.0), t0).unwrap();
        let pos = b.reserve(100_000, t0).unwrap();
        assert_eq!(
            b.wait(pos, t0),
            None,
            "a full bucket covers a burst at once"
        );
        let pos = b.reserve(50_000, t0).unwrap();
        let d = b.wait(pos, t0).unwrap();
        assert!((d.as_secs_f64() - 0.05).abs() < 1e-5, "{d:?}");
        assert_eq!(b.wait(pos, t0 + d), None);
    }

    #[test]
    fn reservations_are_served_in_order() {
        let t0 = Instant::now();
        let b = Bucket::new(1000.0, Some(1000.0), t0).unwrap();
        b.reserve(1000, t0).unwrap();
        let first = b.reserve(500, t0).unwrap();
        let second = b.reserve(500, t0).unwrap();
        let w1 = b.wait(first, t0).unwrap();
        let w2 = b.wait(second, t0).unwrap();
        assert!((w1.as_secs_f64() - 0.5).abs() < 1e-3 && (w2.as_secs_f64() - 1.0).abs() < 1e-3);
    }

    #[test]
    fn set_rate_moves_waiting_reservations() {
        let t0 = Instant::now();
        let b = Bucket::new(1000.0, Some(1000.0), t0).unwrap();
        b.reserve(1000, t0);
        let pos = b.reserve(1000, t0).unwrap();
        assert!(b.wait(pos, t0).unwrap() >= Duration::from_millis(999));
        b.set_rate(100_000.0, Some(1000.0), at(t0, 100)).unwrap();
        // 100 tokens earned at the old rate, 900 more at 100 kB/s = 9 ms.
        let d = b.wait(pos, at(t0, 100)).unwrap();
        assert!((d.as_secs_f64() - 0.009).abs() < 1e-4, "{d:?}");
        b.set_rate(0.0, None, at(t0, 101)).unwrap();
        assert_eq!(b.wait(pos, at(t0, 101)), None, "unlimited lets everyone go");
    }

    #[test]
    fn debt_from_unlimited_times_is_forgotten() {
        let t0 = Instant::now();
        let b = Bucket::new(1000.0, Some(1000.0), t0).unwrap();
        b.set_rate(0.0, None, t0).unwrap();
        assert_eq!(b.reserve(1 << 20, t0), None);
        b.set_rate(1000.0, Some(1000.0), t0).unwrap();
        assert!(b.tokens(t0) >= 0.0);
    }

    #[test]
    fn refund_is_capped_at_burst() {
        let t0 = Instant::now();
        let b = Bucket::new(1000.0, Some(1000.0), t0).unwrap();
        b.reserve(600, t0);
        b.refund(400, t0);
        assert_eq!(b.tokens(t0), 800.0);
        b.refund(10_000, t0);
        assert_eq!(b.tokens(t0), 1000.0);
    }

    #[test]
    fn chain_waits_for_its_slowest_bucket_and_uses_the_smallest_quantum() {
        let t0 = Instant::now();
        let session = Arc::new(Bucket::new(10_000.0, Some(2_000.0), t0).unwrap());
        let device = Arc::new(Bucket::new(1_000_000.0, Some(100_000.0), t0).unwrap());
        let node = Arc::new(Bucket::new(0.0, None, t0).unwrap());
        let chain = Chain::new(vec![session.clone(), device.clone(), node]);
        let r = chain.reserve(1 << 20, t0).unwrap();
        assert_eq!(r.amount(), 1_000, "half the session burst");
        assert_eq!(chain.wait(&r, t0), None);
        let r = chain.reserve(1 << 20, t0).unwrap();
        assert_eq!(chain.wait(&r, t0), None, "second half of the burst");
        let r = chain.reserve(1 << 20, t0).unwrap();
        let d = chain.wait(&r, t0).unwrap();
        assert!(
            (d.as_secs_f64() - 0.1).abs() < 1e-3,
            "session bucket rules: {d:?}"
        );
        assert_eq!(device.tokens(t0), 97_000.0);
    }

    #[test]
    fn simulated_rate_is_exact_with_late_timers() {
        // One session moving as fast as a bucket lets it, its timer always 1 ms late.
        let t0 = Instant::now();
        let rate = 200_000.0;
        let b = Arc::new(Bucket::new(rate, Some(8192.0), t0).unwrap());
        let chain = Chain::new(vec![b]);
        let mut now = t0;
        let mut moved = 0u64;
        while now < t0 + Duration::from_secs(3) {
            let r = chain.reserve(1 << 20, now).unwrap();
            if let Some(d) = chain.wait(&r, now) {
                now += d + Duration::from_millis(1);
            }
            moved += r.amount();
        }
        let secs = (now - t0).as_secs_f64();
        let measured = (moved as f64 - 8192.0) / secs;
        assert!((measured - rate).abs() < 0.01 * rate, "{measured}");
    }

    #[test]
    fn simulated_shared_bucket_is_fair() {
        let t0 = Instant::now();
        let b = Arc::new(Bucket::new(2_000_000.0, Some(16384.0), t0).unwrap());
        let chains = [Chain::new(vec![b.clone()]), Chain::new(vec![b])];
        // Each session: (time it may next reserve, pending reservation, bytes).
        let mut next = [t0, t0 + Duration::from_micros(300)];
        let mut pending: [Option<Reservation>; 2] = [None, None];
        let mut moved = [0u64; 2];
        let end = t0 + Duration::from_secs(3);
        loop {
            let i = if next[0] <= next[1] { 0 } else { 1 };
            let now = next[i];
            if now >= end {
                break;
            }
            let r = pending[i]
                .take()
                .unwrap_or_else(|| chains[i].reserve(1 << 20, now).unwrap());
            match chains[i].wait(&r, now) {
                None => {
                    moved[i] += r.amount();
                    next[i] = now + Duration::from_micros(50);
                }
                Some(d) => {
                    next[i] = now + d;
                    pending[i] = Some(r);
                }
            }
        }
        let half = (moved[0] + moved[1]) as f64 / 2.0;
        for m in moved {
            assert!((m as f64 - half).abs() < 0.02 * half, "{moved:?}");
        }
    }

    #[test]
    fn bucket_is_shared_across_threads() {
        let t0 = Instant::now();
        let b = Arc::new(Bucket::new(1e9, Some(1e9), t0).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        b.reserve(10, t0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.tokens(t0), 1e9 - 400_000.0);
    }
}
