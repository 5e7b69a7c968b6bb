use chrono::{SecondsFormat, Utc};
use serde_json::json;

/// A heartbeat as typical firmware sends it (about 300 bytes). `error` makes it an
/// error heartbeat carrying that text.
pub fn heartbeat_payload(device_id: &str, uptime_seconds: u64, error: Option<&str>) -> Vec<u8> {
    heartbeat_declaring(device_id, uptime_seconds, error, None, &[], None)
}

/// As [`heartbeat_payload`], declaring the device's heartbeat `interval` (in seconds)
/// when one is given (the hub then takes it offline after that many missed beats) and
/// its `labels`, `(key, value)` pairs, when there are any, and the `parent` (a
/// gateway's id) it is reached through, when it names one.
pub fn heartbeat_declaring(
    device_id: &str,
    uptime_seconds: u64,
    error: Option<&str>,
    interval: Option<std::time::Duration>,
    labels: &[(String, String)],
    parent: Option<&str>,
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
    if let (false, Some(map)) = (labels.is_empty(), body.as_object_mut()) {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(key, value)| (key.clone(), json!(value)))
            .collect();
        map.insert("labels".into(), serde_json::Value::Object(labels));
    }
    if let (Some(parent), Some(map)) = (parent, body.as_object_mut()) {
        map.insert("parent".into(), json!(parent));
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_interval_and_labels_are_in_the_heartbeat_and_absent_when_not_given() {
        let labels = [("site".to_string(), "north".to_string())];
        let body: serde_json::Value = serde_json::from_slice(&heartbeat_declaring(
            "pump-1",
            5,
            None,
            Some(std::time::Duration::from_millis(2_500)),
            &labels,
            Some("gw-1"),
        ))
        .expect("json");
        assert_eq!(body["interval"], json!(2.5));
        assert_eq!(body["labels"], json!({"site": "north"}));
        assert_eq!(body["parent"], json!("gw-1"));
        let plain: serde_json::Value =
            serde_json::from_slice(&heartbeat_payload("pump-1", 5, None)).expect("json");
        assert!(
            plain.get("interval").is_none()
                && plain.get("labels").is_none()
                && plain.get("parent").is_none()
        );
    }
}
