use chrono::{SecondsFormat, Utc};
use serde_json::json;

/// A heartbeat as typical firmware sends it (about 300 bytes). `error` makes it an
/// error heartbeat carrying that text.
pub fn heartbeat_payload(device_id: &str, uptime_seconds: u64, error: Option<&str>) -> Vec<u8> {
    heartbeat_declaring(device_id, uptime_seconds, error, None)
}

/// As [`heartbeat_payload`], declaring the device's heartbeat `interval` (in seconds)
/// when one is given: the hub then takes it offline after that many missed beats.
pub fn heartbeat_declaring(
    device_id: &str,
    uptime_seconds: u64,
    error: Option<&str>,
    interval: Option<std::time::Duration>,
) -> Vec<u8> {
    let mut body = json!({
        "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        "status": if error.is_some() { "error" } else { "ok" },
        "uptime_seconds": uptime_seconds,
        "free_memory": 48_213_504u64,
        "firmware_version": "1.4.2",
        "hostname": device_id,
        "os_info": {
            "distribution": "fleetwatch-sim",
            "version": env!("CARGO_PKG_VERSION"),
            "kernel": "6.1.0",
            "architecture": "armv7l"
        },
        "metrics": { "cpu_percent": 12.5, "temperature_c": 41.0 }
    });
    if let (Some(text), Some(map)) = (error, body.as_object_mut()) {
        map.insert("error".into(), json!(text));
    }
    if let (Some(interval), Some(map)) = (interval, body.as_object_mut()) {
        map.insert("interval".into(), json!(interval.as_secs_f64()));
    }
    serde_json::to_vec(&body).unwrap_or_default()
}
