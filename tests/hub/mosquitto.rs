//! A Mosquitto of the test's own, on a free port, running the project's shipped
//! mosquitto/mosquitto.conf (only its port and data directory changed).

#![cfg_attr(not(feature = "mosquitto-tests"), allow(dead_code))]

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use firmware_sim::BrokerUrl;

use crate::helpers::{Broker, free_port};

pub struct Mosquitto {
    child: Child,
    pub url: BrokerUrl,
    conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto`, failing loudly if it is not installed.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, shipped_config(port, dir.path())).expect("write mosquitto.conf");
        let child = Self::spawn(&conf, port);
        Self {
            child,
            url: BrokerUrl::new("127.0.0.1", port),
            conf,
            _dir: dir,
        }
    }

    /// SIGKILL: no chance to save retained messages or say goodbye to clients.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL mosquitto");
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.conf, self.url.port);
    }

    fn spawn(conf: &std::path::Path, port: u16) -> Child {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "the mosquitto-tests feature needs the `mosquitto` binary on PATH \
                     (apt-get install -y mosquitto): {e}"
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// The broker for a hub, and the process guard to keep alive meanwhile.
    pub fn broker(self) -> (Broker, Self) {
        (Broker::External(self.url.clone()), self)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mosquitto/mosquitto.conf with the listener moved to `port` on loopback and the
/// persistence directory moved to `data`.
fn shipped_config(port: u16, data: &std::path::Path) -> String {
    let shipped = include_str!("../../mosquitto/mosquitto.conf");
    shipped
        .lines()
        .map(|line| match line.split_whitespace().next() {
            Some("listener") => format!("listener {port} 127.0.0.1"),
            Some("persistence_location") => format!("persistence_location {}/", data.display()),
            Some("log_dest") => "log_dest stderr".to_string(),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shipped_config_refuses_exactly_what_the_hub_lets_through() {
    let shipped = include_str!("../../mosquitto/mosquitto.conf");
    let limit = shipped
        .lines()
        .find_map(|line| line.strip_prefix("max_packet_size "))
        .and_then(|value| value.trim().parse::<usize>().ok())
        .expect("mosquitto.conf sets max_packet_size");
    let expected =
        fleetwatch::mqtt::broker_packet_limit(fleetwatch::heartbeat::payload::DEFAULT_MAX_PAYLOAD);
    assert_eq!(
        limit, expected,
        "keep max_packet_size at 2 x heartbeat.max_payload + 1024"
    );
}
