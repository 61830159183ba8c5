//! Injected faults, all reproducible from `--seed`: throttling and server errors on the
//! control plane, and failed requests inside a batch.

use std::sync::Mutex;

use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Throttled,
    ServerError,
}

/// Draws one number per API request from a seeded generator, so the same sequence of requests
/// meets the same faults on every run.
pub struct FaultInjector {
    rng: Mutex<StdRng>,
    throttle_rate: f64,
    error_rate: f64,
}

impl FaultInjector {
    pub fn new(seed: u64, throttle_rate: f64, error_rate: f64) -> Self {
        Self {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            throttle_rate,
            error_rate,
        }
    }

    pub fn draw(&self) -> Option<Fault> {
        if self.throttle_rate <= 0.0 && self.error_rate <= 0.0 {
            return None;
        }
        let x: f64 = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .random();
        if x < self.throttle_rate {
            Some(Fault::Throttled)
        } else if x < self.throttle_rate + self.error_rate {
            Some(Fault::ServerError)
        } else {
            None
        }
    }
}

/// Whether a request fails, from its `custom_id` and the seed alone: independent of the order
/// lines are processed in, of step timing and of restarts, so a test can predict it.
pub fn line_fails(seed: u64, custom_id: &str, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    // FNV-1a: tiny, and stable across Rust versions (std's hasher promises neither).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.to_le_bytes().iter().chain(custom_id.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final mix so that ids differing only in their last character spread evenly.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    ((hash >> 11) as f64 / (1u64 << 53) as f64) < rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_failures_follow_the_rate_and_the_seed() {
        let count = |seed, rate| {
            (0..10_000)
                .filter(|i| line_fails(seed, &format!("task-{i}"), rate))
                .count()
        };
        assert_eq!(count(7, 0.0), 0);
        assert_eq!(count(7, 1.0), 10_000);
        let n = count(7, 0.3);
        assert!((2_700..3_300).contains(&n), "{n}");
        assert_eq!(count(7, 0.3), n, "deterministic");
        let differs = (0..100).any(|i| {
            line_fails(1, &format!("task-{i}"), 0.5) != line_fails(2, &format!("task-{i}"), 0.5)
        });
        assert!(differs, "the seed matters");
    }

    #[test]
    fn api_faults_are_reproducible() {
        let draws = |seed| {
            let f = FaultInjector::new(seed, 0.2, 0.2);
            (0..50).map(|_| f.draw()).collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        let d = draws(3);
        assert!(d.contains(&Some(Fault::Throttled)));
        assert!(d.contains(&Some(Fault::ServerError)));
        assert!(d.contains(&None));
        assert!(FaultInjector::new(1, 0.0, 0.0).draw().is_none());
        assert_eq!(
            FaultInjector::new(1, 0.0, 1.0).draw(),
            Some(Fault::ServerError)
        );
    }
}
