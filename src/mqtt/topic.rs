//! The topic names of interface.md section 3, in one place.

pub const HEARTBEAT_FILTER: &str = "devices/+/heartbeat";
pub const LWT_FILTER: &str = "devices/+/lwt";
pub const STATUS_FILTER: &str = "devices/+/status";

/// What a device topic is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Heartbeat,
    Lwt,
}

/// Splits `devices/{id}/heartbeat` or `devices/{id}/lwt` into the raw id (not yet
/// validated) and its kind. `None` for any other topic.
pub fn parse(topic: &str) -> Option<(&str, Kind)> {
    let rest = topic.strip_prefix("devices/")?;
    let (id, suffix) = rest.rsplit_once('/')?;
    let kind = match suffix {
        "heartbeat" => Kind::Heartbeat,
        "lwt" => Kind::Lwt,
        _ => return None,
    };
    Some((id, kind))
}

pub fn status(device_id: &str) -> String {
    format!("devices/{device_id}/status")
}

pub fn heartbeat(device_id: &str) -> String {
    format!("devices/{device_id}/heartbeat")
}

pub fn lwt(device_id: &str) -> String {
    format!("devices/{device_id}/lwt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_device_topics() {
        assert_eq!(
            parse("devices/pump-7/heartbeat"),
            Some(("pump-7", Kind::Heartbeat))
        );
        assert_eq!(parse("devices/AA:BB/lwt"), Some(("AA:BB", Kind::Lwt)));
        // The id is returned raw; validating it is the caller's job.
        assert_eq!(parse("devices//heartbeat"), Some(("", Kind::Heartbeat)));
        assert_eq!(
            parse("devices/a/b/heartbeat"),
            Some(("a/b", Kind::Heartbeat))
        );
        assert_eq!(parse("devices/pump-7/status"), None);
        assert_eq!(parse("other/pump-7/heartbeat"), None);
        assert_eq!(parse("devices/heartbeat"), None);
    }
}
