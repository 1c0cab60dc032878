//! The open-loop send schedule.
//!
//! The total rate is spread evenly over all senders: global send number `g` is due
//! at `start + g / rate`, and sender `s` of `S` owns the sends `g = s, s + S, s + 2S,
//! ...`. Every send has its intended time fixed before the run; a send is made at
//! that time whether or not earlier sends were answered, and latency is measured
//! from the intended time. A late generator or a slow server therefore shows up as
//! latency instead of silently lowering the offered rate (no coordinated omission).

use std::time::Duration;

use tokio::time::Instant;

/// When each sender's sends are due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Due time of global send number 0.
    start: Instant,
    /// Sends due after this instant are not made.
    end: Instant,
    /// Number of senders sharing the rate.
    senders: usize,
    /// Total sends per second over all senders.
    rate: f64,
}

impl Schedule {
    /// `rate` sends per second in total, shared by `senders`, from `start` until
    /// (excluding) `end`.
    pub fn new(start: Instant, end: Instant, senders: usize, rate: f64) -> Schedule {
        assert!(senders > 0, "a schedule needs at least one sender");
        assert!(
            rate.is_finite() && rate > 0.0,
            "a schedule needs a positive rate"
        );
        Schedule {
            start,
            end,
            senders,
            rate,
        }
    }

    /// Due time of the `n`th send of `sender`, or `None` when it falls at or after
    /// the end of the schedule.
    pub fn due(&self, sender: usize, n: u64) -> Option<Instant> {
        let global = sender as f64 + n as f64 * self.senders as f64;
        let at = self.start + Duration::from_secs_f64(global / self.rate);
        (at < self.end).then_some(at)
    }

    /// Due time of global send number `global` (made by sender `global % senders`),
    /// or `None` when it falls at or after the end of the schedule.
    pub fn due_global(&self, global: u64) -> Option<Instant> {
        let at = self.start + Duration::from_secs_f64(global as f64 / self.rate);
        (at < self.end).then_some(at)
    }

    /// The sender that makes global send number `global`.
    pub fn sender_of(&self, global: u64) -> usize {
        (global % self.senders as u64) as usize
    }

    /// The interval between two sends of one sender.
    pub fn sender_interval(&self) -> Duration {
        Duration::from_secs_f64(self.senders as f64 / self.rate)
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn end(&self) -> Instant {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_spread_evenly_over_senders() {
        let start = Instant::now();
        let schedule = Schedule::new(start, start + Duration::from_secs(1), 4, 100.0);
        // 100/s in total: one send every 10 ms, senders taking turns.
        let ms = |sender, n| {
            schedule
                .due(sender, n)
                .map(|at| (at - start).as_secs_f64() * 1000.0)
        };
        let near = |got: Option<f64>, want: f64| got.is_some_and(|g| (g - want).abs() < 0.001);
        assert!(near(ms(0, 0), 0.0));
        assert!(near(ms(1, 0), 10.0));
        assert!(near(ms(3, 0), 30.0));
        assert!(near(ms(0, 1), 40.0));
        assert!(near(ms(2, 5), 220.0));
        assert!((schedule.sender_interval().as_secs_f64() - 0.04).abs() < 1e-9);
    }

    #[test]
    fn the_schedule_holds_rate_times_duration_sends() {
        let start = Instant::now();
        let schedule = Schedule::new(start, start + Duration::from_secs(2), 7, 350.0);
        let total: u64 = (0..7)
            .map(|sender| {
                (0..)
                    .take_while(|&n| schedule.due(sender, n).is_some())
                    .count() as u64
            })
            .sum();
        assert_eq!(total, 700);
    }

    #[test]
    fn global_numbers_agree_with_per_sender_numbers() {
        let start = Instant::now();
        let schedule = Schedule::new(start, start + Duration::from_secs(1), 3, 30.0);
        assert_eq!(schedule.due_global(7), schedule.due(1, 2));
        assert_eq!(schedule.sender_of(7), 1);
        assert_eq!(schedule.due_global(30), None);
    }

    #[test]
    fn no_send_is_due_at_or_after_the_end() {
        let start = Instant::now();
        let schedule = Schedule::new(start, start + Duration::from_secs(1), 1, 10.0);
        assert!(schedule.due(0, 9).is_some());
        assert!(schedule.due(0, 10).is_none());
    }
}
