//! The request rate bound of `kmsctl migrate`: a pacer that hands out one
//! slot every `1/rate` seconds, with no burst, so the apiserver (and the
//! plugin behind it) see a steady load whatever the object sizes. Pure: the
//! caller passes the time and does the sleeping.

use std::time::Duration;

/// Hands out write slots at most `rate` per second.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    interval: Duration,
    /// The earliest time (since the caller's epoch) of the next slot.
    next: Duration,
}

impl Pacer {
    /// A pacer of `rate` slots per second (0 counts as 1).
    pub(crate) fn new(rate: u32) -> Self {
        let rate = rate.max(1);
        Self {
            interval: Duration::from_secs(1) / rate,
            next: Duration::ZERO,
        }
    }

    /// Takes the next slot at `now` (time since the caller's epoch): how
    /// long to wait before using it. Time not used is not saved up: after a
    /// pause, slots start again from `now`.
    pub(crate) fn reserve(&mut self, now: Duration) -> Duration {
        let slot = self.next.max(now);
        self.next = slot + self.interval;
        slot - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn slots_are_spaced_by_the_interval() {
        let mut p = Pacer::new(10);
        assert_eq!(p.reserve(ms(0)), ms(0));
        assert_eq!(p.reserve(ms(0)), ms(100));
        assert_eq!(p.reserve(ms(0)), ms(200));
        // Someone slept as told: the next slot is 100 ms later still.
        assert_eq!(p.reserve(ms(200)), ms(100));
    }

    #[test]
    fn idle_time_is_not_saved_up_as_a_burst() {
        let mut p = Pacer::new(10);
        p.reserve(ms(0));
        assert_eq!(p.reserve(ms(5_000)), ms(0));
        assert_eq!(p.reserve(ms(5_000)), ms(100));
    }

    #[test]
    fn n_slots_take_n_minus_one_intervals() {
        let mut p = Pacer::new(50);
        let mut now = ms(0);
        for _ in 0..100 {
            now += p.reserve(now);
        }
        assert_eq!(now, ms(99 * 20));
    }

    #[test]
    fn a_rate_of_zero_is_one_a_second() {
        let mut p = Pacer::new(0);
        p.reserve(ms(0));
        assert_eq!(p.reserve(ms(0)), ms(1_000));
    }
}
