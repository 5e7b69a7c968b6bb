//! The command line (interface.md section 6): `serve` (the default), `check`,
//! `devices`. Errors end here as one line on stderr and an exit code: 2 for bad
//! configuration, 1 for anything else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::Application;
use crate::clock::{Clock, Timestamp};
use crate::config::Settings;
use crate::status::Status;
use crate::storage::{self, Device, DeviceQuery};

#[derive(Parser, Debug)]
#[command(
    name = "fleetwatch",
    version,
    about = "Watches fleets of IoT devices over MQTT."
)]
pub struct Cli {
    /// TOML configuration file (default: ./fleetwatch.toml if it exists).
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the hub until SIGINT or SIGTERM (the default).
    Serve,
    /// Run one offline-check pass against the database and print the ids that went
    /// offline, one a line. Their events are published by the running hub.
    Check,
    /// List devices from the database.
    Devices {
        /// Only devices with this status.
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_status(text: &str) -> Result<Status, String> {
    text.parse()
        .map_err(|e: crate::status::UnknownStatus| e.to_string())
}

const EXIT_CONFIG: u8 = 2;

/// Parses arguments, runs the command, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("fleetwatch: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fleetwatch: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(settings).await,
            Command::Check => check(settings).await,
            Command::Devices { status, json } => devices(settings, status, json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // rumqttd logs every connection and disconnection, at error level for abrupt
    // ones; RUST_LOG=rumqttd=info brings that back when wanted.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off,sqlx=warn"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    // Listen for signals before anything starts: a SIGTERM that arrives while the hub
    // is starting must stop it cleanly, not kill it.
    let shutdown = shutdown_signal()?;
    let app = Application::build(settings).await?;
    app.run_until_stopped(shutdown).await?;
    Ok(())
}

/// Registers SIGINT and SIGTERM handlers now; the future resolves on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

async fn check(settings: Settings) -> anyhow::Result<()> {
    let store = storage::connect_all(&settings.database, settings.heartbeat.deadlines())
        .await?
        .devices;
    let now = Clock::new().now();
    // A one-off pass has no grace: every device's deadline counts.
    let events = store
        .mark_offline(now, Timestamp::from_unix_millis(0))
        .await?;
    for event in &events {
        println!("{}", event.device_id);
    }
    Ok(())
}

async fn devices(settings: Settings, status: Option<Status>, json: bool) -> anyhow::Result<()> {
    let store = storage::connect_all(&settings.database, settings.heartbeat.deadlines())
        .await?
        .devices;
    let mut devices = Vec::new();
    let mut query = DeviceQuery {
        status,
        limit: 1000,
        ..DeviceQuery::default()
    };
    loop {
        let page = store.devices(&query).await?;
        let last = page.last().map(|device| device.device_id.clone());
        devices.extend(page);
        match last {
            Some(last) => query.after = Some(last),
            None => break,
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
        return Ok(());
    }
    let now = Clock::new().now();
    println!(
        "{:<32} {:<13} {:<16} FIRMWARE",
        "DEVICE", "STATUS", "LAST SEEN"
    );
    for device in &devices {
        println!("{}", table_row(device, now));
    }
    Ok(())
}

fn table_row(device: &Device, now: Timestamp) -> String {
    let last_seen = device
        .last_seen_at
        .map(|seen| ago(now.millis_since(seen)))
        .unwrap_or_else(|| "never".into());
    format!(
        "{:<32} {:<13} {:<16} {}",
        device.device_id,
        device.status,
        last_seen,
        device.report.firmware_version.as_deref().unwrap_or("-")
    )
}

fn ago(millis: i64) -> String {
    let secs = millis.max(0) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_subcommand_means_serve() {
        let cli = Cli::try_parse_from(["fleetwatch"]).expect("parses");
        assert!(cli.command.is_none());
        let cli = Cli::try_parse_from(["fleetwatch", "devices", "--status", "offline", "--json"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::Devices {
                status: Some(Status::Offline),
                json: true
            })
        ));
        assert!(Cli::try_parse_from(["fleetwatch", "devices", "--status", "asleep"]).is_err());
    }

    #[test]
    fn table_columns_line_up() {
        let device = Device {
            device_id: "pump-7".parse().expect("valid id"),
            status: Status::Online,
            last_seen_at: Some(Timestamp::from_unix_millis(1_000)),
            first_seen_at: None,
            status_changed_at: Timestamp::from_unix_millis(0),
            registered_at: Timestamp::from_unix_millis(0),
            device_time: None,
            clock_skew_ms: None,
            error: None,
            offline_after: None,
            interval: None,
            deadline_at: None,
            labels: Default::default(),
            parent: None,
            report: Default::default(),
        };
        let row = table_row(&device, Timestamp::from_unix_millis(6_000));
        assert_eq!(
            row,
            format!("{:<32} {:<13} {:<16} -", "pump-7", "online", "5s ago")
        );
        assert_eq!(row.find("online"), Some(33));
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(5_000), "5s ago");
        assert_eq!(ago(120_000), "2m ago");
        assert_eq!(ago(7_200_000), "2h ago");
    }
}
