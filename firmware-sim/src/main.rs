//! `firmware-sim`: simulated devices publishing fleetwatch heartbeats.

use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Parser;
use firmware_sim::{BrokerUrl, Fleet, FleetConfig, QoS};
use tokio::time::{self, Instant, MissedTickBehavior};

/// Simulates N devices that heartbeat to an MQTT broker on devices/{id}/heartbeat.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Broker to publish to: mqtt://[USER:PASSWORD@]HOST[:PORT], or mqtts://… for TLS.
    /// Every connection logs in as USER.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    url: BrokerUrl,
    /// mqtts://: trust the CA certificates in this PEM file instead of the Mozilla roots.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: u64,
    /// Time between a device's heartbeats ("1s", "60s", "500ms").
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Each interval varies randomly by up to this much either way.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    jitter: Duration,
    /// Device ids are PREFIX followed by a zero-padded index.
    #[arg(long, default_value = "sim-")]
    id_prefix: String,
    /// MQTT QoS of heartbeats: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// MQTT connections to spread the devices over (default: one per device).
    #[arg(long)]
    connections: Option<u64>,
    /// Fraction of heartbeats (0 to 1) that report "status":"error".
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Give each connection a Last Will on devices/{id}/lwt (its first device's id). It
    /// fires when a connection drops; the simulator's own exit disconnects cleanly.
    #[arg(long)]
    lwt: bool,
    /// Say "interval" in every heartbeat: the hub takes a device offline after
    /// heartbeat.missed_beats of them are missing, instead of its fleet-wide default.
    #[arg(long)]
    declare_interval: bool,
    /// A label every heartbeat declares, KEY:VALUE (repeat for several), so the hub
    /// can list the simulated fleet by it (`GET /api/v1/devices?label=KEY:VALUE`).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The device id every heartbeat names as its parent (the gateway the devices are
    /// reached through), so the hub can list them (`GET /api/v1/devices?parent=ID`).
    #[arg(long, value_parser = parse_parent)]
    parent: Option<String>,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

/// A device id as the hub takes one: `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$`.
fn parse_parent(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let valid = bytes.len() <= 128
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a device id (letters, digits and _ . : -, starting with a letter or digit, up to 128)"
        ))
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once(':')
        .filter(|(key, value)| !key.is_empty() && !value.is_empty())
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY:VALUE"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.error_rate) {
        eprintln!("firmware-sim: --error-rate must be between 0 and 1");
        return ExitCode::from(2);
    }
    if args.devices == 0 || args.interval.is_zero() {
        eprintln!("firmware-sim: --devices and --interval must be greater than zero");
        return ExitCode::from(2);
    }
    let url = match &args.ca_file {
        None => args.url.clone(),
        Some(_) if args.url.tls.is_none() => {
            eprintln!("firmware-sim: --ca-file is for TLS: use an mqtts:// --url");
            return ExitCode::from(2);
        }
        Some(path) => match args.url.clone().with_ca_file(path) {
            Ok(url) => url,
            Err(e) => {
                eprintln!("firmware-sim: --ca-file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let config = FleetConfig {
        url,
        devices: args.devices,
        interval: args.interval,
        jitter: args.jitter,
        id_prefix: args.id_prefix,
        qos: if args.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        connections: args.connections.unwrap_or(args.devices),
        error_rate: args.error_rate,
        lwt: args.lwt,
        declare_interval: args.declare_interval,
        labels: args.labels,
        parent: args.parent,
    };
    let connections = config.connections.clamp(1, config.devices);
    println!(
        "firmware-sim: {} devices over {} connections to {}, every {} (~{:.0} heartbeats/s)",
        config.devices,
        connections,
        args.url,
        humantime::format_duration(config.interval),
        config.devices as f64 / config.interval.as_secs_f64()
    );
    let fleet = Fleet::start(config);
    let stats = fleet.stats.clone();
    let started = Instant::now();
    let stop_at = args.duration.map(|d| started + d);
    let mut ticker = time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_sent = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = ticker.tick() => {
                let sent = stats.sent.load(Relaxed);
                println!(
                    "t={:>4}s sent/s={:>7} sent={:>9} errors={} connections={}/{}",
                    started.elapsed().as_secs(),
                    sent - last_sent,
                    sent,
                    stats.errors.load(Relaxed),
                    stats.connected.load(Relaxed),
                    connections,
                );
                last_sent = sent;
                if stop_at.is_some_and(|at| Instant::now() >= at) {
                    break;
                }
            }
        }
    }
    // Everything counted as sent reaches the broker before the clean disconnect.
    fleet.finish(Duration::from_secs(5)).await;
    let sent = stats.sent.load(Relaxed);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "firmware-sim: sent {sent} heartbeats in {secs:.1}s ({:.0}/s), {} errors",
        sent as f64 / secs,
        stats.errors.load(Relaxed)
    );
    ExitCode::SUCCESS
}
