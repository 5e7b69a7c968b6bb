//! Counters the hub keeps about itself. Plain atomics, shared by `Arc`, so the hot path
//! pays one relaxed add; [`Metrics::render`] writes them in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::heartbeat::RejectReason;
use crate::status::Status;
use crate::storage::Summary;

#[derive(Debug)]
pub struct Metrics {
    /// Valid heartbeats handed to the handler over MQTT.
    pub heartbeats_received: AtomicU64,
    /// Valid heartbeats received over HTTP.
    pub http_heartbeats_received: AtomicU64,
    /// Last Wills handed to the handler.
    pub wills_received: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    transitions: [AtomicU64; Status::ALL.len()],
    /// Status events the broker acknowledged.
    pub events_published: AtomicU64,
    /// Messages waiting in the subscriber -> handler queue at the last look.
    pub queue_depth: AtomicU64,
    /// How long committing a batch took.
    pub flush: Histogram,
    /// Device rows per committed batch.
    pub batch_rows: Histogram,
    /// Messages folded into committed rows.
    pub flush_messages: AtomicU64,
    pub flush_errors: AtomicU64,
    /// How long an offline-check pass took.
    pub check: Histogram,
    pub check_errors: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            heartbeats_received: AtomicU64::default(),
            http_heartbeats_received: AtomicU64::default(),
            wills_received: AtomicU64::default(),
            rejected: Default::default(),
            transitions: Default::default(),
            events_published: AtomicU64::default(),
            queue_depth: AtomicU64::default(),
            flush: Histogram::seconds(),
            batch_rows: Histogram::new(&[1, 10, 100, 1_000, 5_000, 10_000, 20_000, 50_000], 1.0),
            flush_messages: AtomicU64::default(),
            flush_errors: AtomicU64::default(),
            check: Histogram::seconds(),
            check_errors: AtomicU64::default(),
        }
    }
}

/// A Prometheus histogram over integer observations (microseconds, rows).
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds of the buckets, in observation units.
    bounds: &'static [u64],
    /// Per bucket (not cumulative), plus one for +Inf.
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
    /// Observation units per exposed unit (1e6 for microseconds shown as seconds):
    /// dividing keeps bucket bounds like 0.025 exact in the output.
    per_unit: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64], per_unit: f64) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
            per_unit,
        }
    }

    /// Durations, observed in microseconds and exposed in seconds.
    pub fn seconds() -> Self {
        Self::new(
            &[
                500, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
                5_000_000,
            ],
            1e6,
        )
    }

    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Sum of observations, in observation units.
    pub fn sum(&self) -> u64 {
        self.sum.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let le = *bound as f64 / self.per_unit;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum() as f64 / self.per_unit);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {}", value.load(Relaxed));
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

    /// Everything in the Prometheus text exposition format, with `devices` (counted
    /// by the caller from the database) as a gauge per status.
    pub fn render(&self, devices: &Summary) -> String {
        let mut out = String::with_capacity(4096);
        header(
            &mut out,
            "fleetwatch_heartbeats_received_total",
            "counter",
            "Valid heartbeats received, by transport.",
        );
        for (transport, value) in [
            ("mqtt", &self.heartbeats_received),
            ("http", &self.http_heartbeats_received),
        ] {
            let _ = writeln!(
                out,
                "fleetwatch_heartbeats_received_total{{transport=\"{transport}\"}} {}",
                value.load(Relaxed)
            );
        }
        counter(
            &mut out,
            "fleetwatch_wills_received_total",
            "Last Wills (devices/{id}/lwt) received.",
            &self.wills_received,
        );
        header(
            &mut out,
            "fleetwatch_heartbeats_rejected_total",
            "counter",
            "Messages dropped without touching state, by reason.",
        );
        for reason in RejectReason::ALL {
            let _ = writeln!(
                out,
                "fleetwatch_heartbeats_rejected_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.rejected(reason)
            );
        }
        header(
            &mut out,
            "fleetwatch_transitions_total",
            "counter",
            "Status transitions committed, by new status.",
        );
        for status in Status::ALL {
            let _ = writeln!(
                out,
                "fleetwatch_transitions_total{{status=\"{status}\"}} {}",
                self.transitions(status)
            );
        }
        header(
            &mut out,
            "fleetwatch_devices",
            "gauge",
            "Devices, by current status.",
        );
        for status in Status::ALL {
            let _ = writeln!(
                out,
                "fleetwatch_devices{{status=\"{status}\"}} {}",
                devices.count(status)
            );
        }
        counter(
            &mut out,
            "fleetwatch_events_published_total",
            "Status events the broker acknowledged.",
            &self.events_published,
        );
        header(
            &mut out,
            "fleetwatch_queue_depth",
            "gauge",
            "Messages waiting between the MQTT subscriber and the heartbeat handler.",
        );
        let _ = writeln!(
            out,
            "fleetwatch_queue_depth {}",
            self.queue_depth.load(Relaxed)
        );
        self.flush.render(
            &mut out,
            "fleetwatch_flush_duration_seconds",
            "Time to commit one batch of heartbeats.",
        );
        self.batch_rows.render(
            &mut out,
            "fleetwatch_flush_batch_rows",
            "Device rows per committed batch.",
        );
        counter(
            &mut out,
            "fleetwatch_flush_messages_total",
            "Messages folded into committed batches.",
            &self.flush_messages,
        );
        counter(
            &mut out,
            "fleetwatch_flush_errors_total",
            "Batches that failed to commit (and were kept for the next attempt).",
            &self.flush_errors,
        );
        self.check.render(
            &mut out,
            "fleetwatch_check_duration_seconds",
            "Time of one offline-check pass, flush included.",
        );
        counter(
            &mut out,
            "fleetwatch_check_errors_total",
            "Offline-check passes that failed.",
            &self.check_errors,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_scaled() {
        let h = Histogram::seconds();
        h.observe_duration(Duration::from_micros(700));
        h.observe_duration(Duration::from_millis(30));
        h.observe_duration(Duration::from_secs(10));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.05\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn render_labels_every_reason_and_status() {
        let metrics = Metrics::default();
        metrics.reject(RejectReason::TooDeep);
        metrics.transition(Status::Offline);
        let text = metrics.render(&Summary {
            online: 7,
            ..Summary::default()
        });
        assert!(text.contains("fleetwatch_heartbeats_rejected_total{reason=\"too_deep\"} 1"));
        assert!(text.contains("fleetwatch_transitions_total{status=\"offline\"} 1"));
        assert!(text.contains("fleetwatch_devices{status=\"online\"} 7"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
        }
    }
}
