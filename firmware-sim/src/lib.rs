//! Simulated fleetwatch devices.
//!
//! Device firmware publishes a heartbeat on `devices/{id}/heartbeat` every interval and
//! leaves a Last Will on `devices/{id}/lwt`. This crate does the same, so the hub can
//! be exercised without hardware:
//!
//! - [`SimDevice`]: one device on its own connection, with handles a test needs:
//!   silence it, resume it, make it report an error, cut its connection (the broker
//!   then publishes its Will), or stop it cleanly.
//! - [`Fleet`]: many devices multiplexed over few connections, so one laptop can play a
//!   large fleet; the `firmware-sim` binary is a thin shell around it.
//! - [`RawPublisher`]: publishes arbitrary bytes on arbitrary topics, for feeding the
//!   hub bad input.

mod connection;
mod device;
mod fleet;
mod payload;
mod raw;
mod url;

pub use device::{DeviceConfig, SimDevice};
pub use fleet::{Fleet, FleetConfig, FleetStats};
pub use payload::{heartbeat_declaring, heartbeat_payload};
pub use raw::RawPublisher;
pub use rumqttc::QoS;
pub use url::{BrokerUrl, Login, Tls, UrlError};

/// Errors of the simulator's own making; broker trouble is retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("could not connect to the broker at {url} within {timeout:?}")]
    ConnectTimeout {
        url: BrokerUrl,
        timeout: std::time::Duration,
    },
    #[error("the device task has stopped")]
    Stopped,
    #[error("publish failed: {0}")]
    Publish(#[from] rumqttc::ClientError),
}
