//! fleetwatch's benchmark harness (run it with `bench/run.sh`). Every figure is a ratio
//! to a baseline measured in the same run, printed beside it, because a shared
//! machine's absolute figures drift from run to run while ratios within one run hold.
//! Prints a table, writes `target/bench/results.json`, asserts nothing.

// The same allocator as the fleetwatch binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod db;
mod deadlines;
mod grouping;
mod http;
mod listen;
mod measure;
mod notify;
mod pgdb;
mod procs;
mod report;
mod scaling;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;

use crate::report::Report;

const MEASUREMENTS: [&str; 14] = [
    "ingest",
    "db",
    "pgdb",
    "coalescing",
    "lag",
    "storm",
    "deadlines",
    "memory",
    "http",
    "sustained",
    "notify",
    "outage",
    "grouping",
    "hubs",
];

#[derive(Parser, Debug)]
#[command(about = "fleetwatch benchmarks: each figure a ratio to a baseline of the same run")]
struct Args {
    /// Everything at a small scale, in about five minutes (a smoke test: figures at
    /// this scale say little).
    #[arg(long)]
    quick: bool,
    /// Only these measurements, comma-separated: ingest, db, pgdb, coalescing, lag,
    /// storm, deadlines, memory, http, sustained, notify, outage, hubs.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The PostgreSQL server `pgdb` creates its databases on (and drops them after),
    /// as a URL whose user may create databases.
    #[arg(long, env = "FLEETWATCH_BENCH_POSTGRES", default_value = pgdb::DEFAULT_ADMIN_URL)]
    postgres: String,
    /// Where to write the results.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Internal: run the notification baseline's bare client loop against this URL in
    /// this process and print its requests/s.
    #[arg(long, hide = true)]
    bare_loop: Option<String>,
    /// Internal: how many requests that loop sends.
    #[arg(long, hide = true, default_value_t = 10_000)]
    requests: u64,
}

/// The sizes of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scale {
    /// Offered heartbeats per second, tried in turn until the broker no longer keeps
    /// up with a counting subscriber: the best rate it drained is the baseline.
    pub ingest_rates: Vec<u64>,
    pub ingest_interval: Duration,
    pub ingest_connections: u64,
    pub warmup: Duration,
    pub window: Duration,
    pub db_devices: usize,
    pub db_batch: usize,
    pub db_each: Duration,
    pub coalescing_devices: u64,
    pub coalescing_interval: Duration,
    pub lag_devices: u64,
    pub lag_offline_after: Duration,
    pub storm_devices: u64,
    pub storm_offline_after: Duration,
    /// Storm grouping: sites, and devices in each.
    pub grouping_sites: (u64, u64),
    /// Per-device deadlines: the fleet, how long its offline events are watched, and
    /// how long after writing it the first deadline begins (the hub must be up).
    pub deadline_devices: u64,
    pub deadline_window: Duration,
    pub deadline_lead: Duration,
    pub memory_connections: Vec<u64>,
    pub sustained_devices: u64,
    pub sustained_interval: Duration,
    pub sustained_for: Duration,
    /// The receiver-outage measurement: flapping devices, their interval, the outage.
    pub outage_devices: u64,
    pub outage_interval: Duration,
    pub outage_for: Duration,
    /// The offered rates the several-hubs measurement ramps through: higher than the
    /// ingest ramp, to find what saturates first with two hubs behind the broker.
    pub hubs_rates: Vec<u64>,
    /// HTTP heartbeats: registered devices, each wrk run, each paced run.
    pub http_devices: u64,
    pub http_for: Duration,
    pub http_paced_for: Duration,
}

impl Scale {
    fn full() -> Self {
        Self {
            ingest_rates: vec![20_000, 30_000, 35_000, 40_000, 50_000, 60_000],
            ingest_interval: Duration::from_millis(500),
            ingest_connections: 20,
            warmup: Duration::from_secs(3),
            window: Duration::from_secs(8),
            db_devices: 100_000,
            db_batch: 5_000,
            db_each: Duration::from_secs(8),
            coalescing_devices: 2_000,
            coalescing_interval: Duration::from_millis(50),
            lag_devices: 100_000,
            lag_offline_after: Duration::from_secs(10),
            storm_devices: 10_000,
            storm_offline_after: Duration::from_secs(5),
            grouping_sites: (100, 100),
            deadline_devices: 1_000_000,
            deadline_window: Duration::from_secs(120),
            deadline_lead: Duration::from_secs(20),
            memory_connections: vec![1_000, 10_000],
            sustained_devices: 1_000_000,
            sustained_interval: Duration::from_secs(60),
            sustained_for: Duration::from_secs(300),
            outage_devices: 5_000,
            outage_interval: Duration::from_secs(10),
            outage_for: Duration::from_secs(600),
            hubs_rates: vec![60_000, 120_000, 180_000, 240_000, 300_000],
            http_devices: 10_000,
            http_for: Duration::from_secs(10),
            http_paced_for: Duration::from_secs(10),
        }
    }

    fn quick() -> Self {
        Self {
            ingest_rates: vec![10_000, 20_000],
            ingest_interval: Duration::from_millis(500),
            ingest_connections: 8,
            warmup: Duration::from_secs(1),
            window: Duration::from_secs(2),
            db_devices: 20_000,
            db_batch: 5_000,
            db_each: Duration::from_secs(2),
            coalescing_devices: 500,
            coalescing_interval: Duration::from_millis(50),
            lag_devices: 5_000,
            lag_offline_after: Duration::from_secs(3),
            storm_devices: 2_000,
            storm_offline_after: Duration::from_secs(3),
            grouping_sites: (10, 50),
            deadline_devices: 50_000,
            deadline_window: Duration::from_secs(20),
            deadline_lead: Duration::from_secs(5),
            memory_connections: vec![200],
            sustained_devices: 20_000,
            sustained_interval: Duration::from_secs(2),
            sustained_for: Duration::from_secs(12),
            outage_devices: 500,
            outage_interval: Duration::from_secs(1),
            outage_for: Duration::from_secs(15),
            hubs_rates: vec![10_000, 20_000],
            http_devices: 10_000,
            http_for: Duration::from_secs(3),
            http_paced_for: Duration::from_secs(3),
        }
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let args = Args::parse();
    if let Some(url) = &args.bare_loop {
        println!("{}", notify::bare_loop(url, args.requests).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let scale = if args.quick {
        Scale::quick()
    } else {
        Scale::full()
    };
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let dir = tempfile::Builder::new()
        .prefix("fleetwatch-bench")
        .tempdir()?;
    let mut report = Report::new(if args.quick { "quick" } else { "full" }, &scale);
    println!(
        "fleetwatch bench ({} run); logs and databases in {}",
        report.mode,
        dir.path().display()
    );

    for name in MEASUREMENTS {
        if !wanted(name) {
            continue;
        }
        println!("== {name}");
        let (dir, scale, report) = (dir.path(), &scale, &mut report);
        let result = match name {
            "ingest" => measure::ingest(dir, scale, report).await,
            "db" => measure::db(dir, scale, report).await,
            "pgdb" => measure::pgdb(&args.postgres, scale, report).await,
            "coalescing" => measure::coalescing(dir, scale, report).await,
            "lag" => measure::lag(dir, scale, report).await,
            "storm" => measure::storm(dir, scale, report).await,
            "deadlines" => deadlines::deadlines(dir, scale, report).await,
            "memory" => measure::memory(dir, scale, report).await,
            "http" => http::http(dir, scale, report).await,
            "notify" => notify::storm(dir, scale, report).await,
            "outage" => notify::outage(dir, scale, report).await,
            "grouping" => grouping::grouping(dir, scale, report).await,
            "hubs" => scaling::scaling(dir, &args.postgres, scale, report).await,
            _ => measure::sustained(dir, scale, report).await,
        };
        // A failed measurement is reported and the rest still run.
        if let Err(e) = result {
            println!("   {name} failed: {e:#}");
            report.failed(name, format!("{e:#}"));
        }
    }

    report.print();
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, report.to_json()?)?;
    let markdown = args.out.with_extension("md");
    std::fs::write(&markdown, report.to_markdown())?;
    println!("wrote {} and {}", args.out.display(), markdown.display());
    if !report.failures.is_empty() {
        eprintln!(
            "fleetwatch-bench: {} measurement(s) failed",
            report.failures.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
