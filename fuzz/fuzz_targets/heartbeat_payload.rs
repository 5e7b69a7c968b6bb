//! Any bytes as a heartbeat payload: never a panic, and what is accepted keeps the
//! documented limits (interface.md, "Heartbeat payload").
#![no_main]

use fleetwatch::heartbeat::payload::{self, MAX_ERROR_TEXT, MAX_METRICS, MAX_TEXT};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(heartbeat) = payload::parse(data, LIMIT) else {
        return;
    };
    assert!(data.len() <= LIMIT);
    assert!(
        heartbeat
            .error
            .as_ref()
            .is_none_or(|e| e.chars().count() <= MAX_ERROR_TEXT)
    );
    let report = &heartbeat.report;
    for text in [&report.hostname, &report.firmware_version]
        .into_iter()
        .flatten()
    {
        assert!(text.chars().count() <= MAX_TEXT);
    }
    if let Some(metrics) = &report.metrics {
        assert!(metrics.len() <= MAX_METRICS);
        assert!(metrics.keys().all(|name| name.chars().count() <= MAX_TEXT));
    }
    // Whatever was accepted can be stored and served: the report serialises.
    assert!(serde_json::to_vec(report).is_ok());
});
