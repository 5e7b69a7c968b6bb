//! Ingest throughput: a firmware-sim fleet publishing as fast as configured into a hub
//! (embedded broker or an external one), reporting what the hub received and committed
//! each second. Prints figures; asserts nothing.
//!
//!   cargo bench --bench ingest -- --devices 20000 --interval 200ms --connections 40
//!   cargo bench --bench ingest -- --broker mqtt://127.0.0.1:1883 --qos 0 ...

// The same allocator as the fleetwatch binary, so figures match production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Parser;
use firmware_sim::{BrokerUrl, Fleet, FleetConfig, QoS};
use fleetwatch::app::Application;
use fleetwatch::config::{BrokerMode, Settings};
use tokio::time::{self, Instant};

#[derive(Parser, Debug)]
struct Args {
    /// "embedded", or the URL of an external broker.
    #[arg(long, default_value = "embedded")]
    broker: String,
    #[arg(long, default_value_t = 10_000)]
    devices: u64,
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[arg(long, default_value_t = 20)]
    connections: u64,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seconds at the start left out of the averages.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    // `cargo bench` passes --bench; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut settings = Settings::default();
    settings.database.url = format!("sqlite://{}", dir.path().join("bench.db").display());
    settings.heartbeat.offline_after = Duration::from_secs(3600);
    let url = if args.broker == "embedded" {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        settings.mqtt.listen = ([127, 0, 0, 1], port).into();
        BrokerUrl::new("127.0.0.1", port)
    } else {
        settings.mqtt.broker = BrokerMode::External;
        settings.mqtt.url = args.broker.clone();
        args.broker.parse()?
    };
    let app = Application::build(settings).await?;
    let metrics = app.metrics();
    let mut listening = app.listening();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    listening.wait_for(|since| since.is_some()).await?;

    let fleet = Fleet::start(FleetConfig {
        url,
        devices: args.devices,
        interval: args.interval,
        jitter: Duration::ZERO,
        id_prefix: "bench-".into(),
        qos: if args.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        connections: args.connections,
        error_rate: 0.0,
        lwt: false,
    });
    let offered = args.devices as f64 / args.interval.as_secs_f64();
    println!(
        "broker={} devices={} interval={:?} connections={} qos={} offered={offered:.0}/s",
        args.broker, args.devices, args.interval, args.connections, args.qos
    );
    println!("   t   sent/s  received/s  committed/s  rows/s  queue  flush_ms");
    let start = Instant::now();
    let mut tick = time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let snapshot = || {
        (
            fleet.stats.sent.load(Relaxed),
            metrics.heartbeats_received.load(Relaxed),
            metrics.flush_messages.load(Relaxed),
            metrics.batch_rows.sum(),
            metrics.flush.count(),
            metrics.flush.sum(),
        )
    };
    let mut last = snapshot();
    let mut steady = Vec::new();
    for second in 1..=args.duration.as_secs() {
        tick.tick().await;
        let now = snapshot();
        let flushes = now.4 - last.4;
        let flush_ms = if flushes == 0 {
            0.0
        } else {
            (now.5 - last.5) as f64 / flushes as f64 / 1e3
        };
        let row = (
            now.0 - last.0,
            now.1 - last.1,
            now.2 - last.2,
            now.3 - last.3,
        );
        println!(
            "{second:>4} {:>8} {:>11} {:>12} {:>7} {:>6} {flush_ms:>9.1}",
            row.0,
            row.1,
            row.2,
            row.3,
            metrics.queue_depth.load(Relaxed)
        );
        if second > args.warmup {
            steady.push(row);
        }
        last = now;
    }
    let n = steady.len().max(1) as f64;
    let avg = |f: fn(&(u64, u64, u64, u64)) -> u64| steady.iter().map(f).sum::<u64>() as f64 / n;
    println!(
        "steady state ({} s): sent {:.0}/s, hub received {:.0}/s, committed {:.0}/s, rows {:.0}/s",
        steady.len(),
        avg(|r| r.0),
        avg(|r| r.1),
        avg(|r| r.2),
        avg(|r| r.3)
    );
    fleet.stop().await;
    let _ = stop.send(());
    hub.await??;
    Ok(())
}
