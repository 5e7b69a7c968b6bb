//! The heartbeat write path alone: `Store::apply` with batches of existing, online
//! devices (the steady state), against a bare batched upsert of the same rows on the
//! same SQLite settings. Prints figures; asserts nothing.
//!
//!   cargo bench --bench store -- [devices] [batch]

// The same allocator as the fleetwatch binary, so figures match production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use fleetwatch::clock::Timestamp;
use fleetwatch::device::DeviceId;
use fleetwatch::heartbeat::batch::Batch;
use fleetwatch::heartbeat::{Heartbeat, Report};
use fleetwatch::storage::Store;
use fleetwatch::storage::sqlite::SqliteStore;

fn heartbeat() -> Heartbeat {
    Heartbeat {
        healthy: true,
        error: None,
        device_time: Some(Timestamp::from_unix_millis(1_700_000_000_000)),
        report: Report {
            uptime_seconds: Some(1234),
            free_memory: Some(48_213_504),
            firmware_version: Some("1.4.2".into()),
            hostname: Some("sim".into()),
            ..Report::default()
        },
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let devices = args.first().copied().unwrap_or(100_000);
    let batch_size = args.get(1).copied().unwrap_or(5_000);
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = SqliteStore::connect(&url).await?;
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::parse(&format!("dev-{i:07}")).expect("id"))
        .collect();

    let mut clock = 1_000_000i64;
    // Register everyone first (first heartbeats, with events).
    let started = Instant::now();
    for chunk in ids.chunks(batch_size) {
        let mut batch = Batch::default();
        for id in chunk {
            clock += 1;
            batch.add_heartbeat(id.clone(), Timestamp::from_unix_millis(clock), heartbeat());
        }
        store.apply(&batch.take()).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "register {devices} devices in batches of {batch_size}: {:.0} rows/s",
        devices as f64 / secs
    );

    // Steady state: every device heartbeats again, no transitions.
    for round in 0..3 {
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        for chunk in ids.chunks(batch_size) {
            let mut batch = Batch::default();
            for id in chunk {
                clock += 1;
                batch.add_heartbeat(id.clone(), Timestamp::from_unix_millis(clock), heartbeat());
            }
            let updates = batch.take();
            let t = Instant::now();
            let events = store.apply(&updates).await?;
            slowest = slowest.max(t.elapsed());
            assert!(events.is_empty());
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "round {round}: apply {:.0} rows/s (slowest batch {:.1} ms)",
            devices as f64 / secs,
            slowest.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
