//! The circuit breaker: after consecutive failures, tasks run locally for a while; then one probe.

use super::*;

/// What the breaker lets through this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    All,
    /// Half-open: one task probes the tier, the others are computed locally.
    Probe,
    Nothing,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum BreakerState {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

/// A circuit breaker over the function tier: after `threshold` consecutive
/// task failures of any cause (or at once when the endpoint is unreachable) it
/// opens and the peer computes locally for a back-off period; then one task
/// probes the tier: success closes it, failure re-opens it for twice as long
/// (at most `cap`). Pure: the caller passes the time and logs the lines it returns.
#[derive(Clone, Debug)]
pub struct Breaker {
    pub(super) threshold: u32,
    pub(super) base: Duration,
    pub(super) cap: Duration,
    pub(super) backoff: Duration,
    pub(super) consecutive: u32,
    pub(super) state: BreakerState,
    pub opens: u64,
    pub probes: u64,
}

impl Breaker {
    pub fn new(threshold: u32, base: Duration, cap: Duration) -> Self {
        Breaker { threshold: threshold.max(1), base, cap: cap.max(base), backoff: base, consecutive: 0, state: BreakerState::Closed, opens: 0, probes: 0 }
    }

    pub fn is_open(&self) -> bool {
        self.state != BreakerState::Closed
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            BreakerState::Closed => Admit::All,
            BreakerState::Open { until } if now < until => Admit::Nothing,
            BreakerState::Open { .. } | BreakerState::HalfOpen => {
                self.state = BreakerState::HalfOpen;
                self.probes += 1;
                Admit::Probe
            }
        }
    }

    pub(super) fn open(&mut self, now: Instant, why: String) -> String {
        self.state = BreakerState::Open { until: now + self.backoff };
        self.opens += 1;
        let line = format!("{why}; computing locally for {:.0} s, then probing with one task", self.backoff.as_secs_f64());
        self.backoff = (self.backoff * 2).min(self.cap);
        line
    }

    /// One task's outcome in the tier; a line to log when the state changes.
    pub fn record(&mut self, now: Instant, ok: bool, cause: &str) -> Option<String> {
        if ok {
            self.consecutive = 0;
            if self.state == BreakerState::Closed {
                return None;
            }
            self.state = BreakerState::Closed;
            self.backoff = self.base;
            return Some("function tier: a probe task succeeded; offloading again".into());
        }
        self.consecutive += 1;
        match self.state {
            BreakerState::HalfOpen => Some(self.open(now, format!("function tier: the probe task failed ({cause})"))),
            BreakerState::Closed if self.consecutive >= self.threshold => {
                Some(self.open(now, format!("function tier: {} tasks failed in a row (last: {cause})", self.consecutive)))
            }
            _ => None,
        }
    }

    /// Opens at once (the endpoint cannot be reached: every task would fail).
    pub fn trip(&mut self, now: Instant, why: &str) -> Option<String> {
        self.consecutive = self.consecutive.max(self.threshold);
        match self.state {
            BreakerState::Open { .. } => None,
            _ => Some(self.open(now, format!("function tier: {why}"))),
        }
    }
}


/// The longest the breaker stays open between probes.
pub(super) const BREAKER_CAP: Duration = Duration::from_secs(300);
