//! Any topic as the subscriber sees it: never a panic; an id that passes is one the
//! topic, URL and log line can carry, and it round-trips through its topics.
#![no_main]

use fleetwatch::device::{DeviceId, MAX_DEVICE_ID_LEN};
use fleetwatch::mqtt::topic::{self, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((raw, kind)) = topic::parse(text) else {
        return;
    };
    let Ok(id) = DeviceId::parse(raw) else {
        return;
    };
    let id = id.as_str();
    assert!(!id.is_empty() && id.len() <= MAX_DEVICE_ID_LEN);
    assert!(
        !id.contains(['/', '+', '#', '$', ' ', '\0']) && id.is_ascii(),
        "{id:?} passed"
    );
    let again = match kind {
        Kind::Heartbeat => topic::heartbeat(id),
        Kind::Lwt => topic::lwt(id),
    };
    assert_eq!(topic::parse(&again), Some((id, kind)));
});
