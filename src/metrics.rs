//! Counters the hub keeps about itself. Plain atomics, shared by `Arc`, so the hot path
//! pays one relaxed add; the HTTP layer renders them for Prometheus.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::heartbeat::RejectReason;
use crate::status::Status;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Valid heartbeats handed to the handler.
    pub heartbeats_received: AtomicU64,
    /// Last Wills handed to the handler.
    pub wills_received: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    transitions: [AtomicU64; Status::ALL.len()],
    /// Status events the broker acknowledged.
    pub events_published: AtomicU64,
    /// Messages waiting in the subscriber -> handler queue at the last look.
    pub queue_depth: AtomicU64,
    pub flush: Timing,
    /// Device rows written by flushes.
    pub flush_rows: AtomicU64,
    /// Messages folded into those rows.
    pub flush_messages: AtomicU64,
    pub flush_errors: AtomicU64,
    pub check: Timing,
    pub check_errors: AtomicU64,
}

/// Count and total duration of a repeated operation.
#[derive(Debug, Default)]
pub struct Timing {
    pub count: AtomicU64,
    pub total_micros: AtomicU64,
}

impl Timing {
    pub fn record(&self, elapsed: Duration) {
        self.count.fetch_add(1, Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.total_micros.fetch_add(micros, Relaxed);
    }
}

impl Metrics {
    pub fn reject(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Relaxed);
    }

    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()].load(Relaxed)
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn transition(&self, to: Status) {
        self.transitions[to as usize].fetch_add(1, Relaxed);
    }

    pub fn transitions(&self, to: Status) -> u64 {
        self.transitions[to as usize].load(Relaxed)
    }
}
