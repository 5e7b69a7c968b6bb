//! A Mosquitto of the test's own, on a free port, with the packet limit the project's
//! mosquitto/mosquitto.conf sets.

#![cfg_attr(not(feature = "mosquitto-tests"), allow(dead_code))]

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use firmware_sim::BrokerUrl;

use crate::helpers::{Broker, free_port};

pub struct Mosquitto {
    child: Child,
    pub url: BrokerUrl,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto`, failing loudly if it is not installed.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let limit = fleetwatch::mqtt::broker_packet_limit(
            fleetwatch::heartbeat::payload::DEFAULT_MAX_PAYLOAD,
        );
        let mut file = std::fs::File::create(&conf).expect("write mosquitto.conf");
        write!(
            file,
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_packet_size {limit}\nmax_queued_messages 100000\nlog_dest stderr\nlog_type error\n"
        )
        .expect("write mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
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
        Self {
            child,
            url: BrokerUrl::new("127.0.0.1", port),
            _dir: dir,
        }
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
