//! The processes a measurement needs: Mosquitto and the hub, each on free ports with
//! its own files, and what /proc says about them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use firmware_sim::BrokerUrl;
use tokio::process::{Child, Command};
use tokio::time::{self, Instant};

/// The repository root (where `mosquitto/mosquitto.conf` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_port(port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {limit:?}");
        }
        time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A child process and its /proc figures.
pub struct Proc {
    child: Child,
    pid: u32,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command) -> Result<Self> {
        let child = command
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("child has no pid")?;
        Ok(Self { child, pid, name })
    }

    /// User plus system CPU time so far, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid)
    }

    /// Resident set size, in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmRSS")?
            .parse::<u64>()?;
        Ok(kb * 1024)
    }

    /// SIGTERM, then up to `limit` for a clean exit, then SIGKILL.
    pub async fn stop(mut self, limit: Duration) -> Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        match time::timeout(limit, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("{} exited with {status}", self.name);
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("{} did not stop within {limit:?}", self.name)
            }
        }
    }
}

/// User plus system CPU time of process `pid` so far (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // getconf CLK_TCK is 100 on every Linux this runs on; ask anyway.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A Mosquitto with the shipped `mosquitto/mosquitto.conf`, on a free loopback port and
/// without persistence.
pub struct Mosquitto {
    pub proc: Proc,
    pub url: BrokerUrl,
}

impl Mosquitto {
    pub async fn start(dir: &Path) -> Result<Self> {
        let shipped = std::fs::read_to_string(repo_root().join("mosquitto/mosquitto.conf"))
            .context("reading mosquitto/mosquitto.conf")?;
        let port = free_port()?;
        let mut conf: String = shipped
            .lines()
            .filter(|line| {
                let key = line.split_whitespace().next().unwrap_or("");
                !matches!(
                    key,
                    "listener" | "persistence" | "persistence_location" | "log_dest"
                )
            })
            .map(|line| format!("{line}\n"))
            .collect();
        conf.push_str(&format!(
            "listener {port} 127.0.0.1\npersistence false\nlog_dest stderr\n"
        ));
        let path = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(dir.join(format!("mosquitto-{port}.log")))?;
        let proc = Proc::spawn(
            "mosquitto",
            Command::new("mosquitto")
                .arg("-c")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        wait_for_port(port, Duration::from_secs(10)).await?;
        Ok(Self {
            proc,
            url: BrokerUrl::new("127.0.0.1", port),
        })
    }

    pub async fn stop(self) -> Result<()> {
        self.proc.stop(Duration::from_secs(10)).await
    }
}

pub enum HubBroker<'a> {
    Embedded,
    External(&'a BrokerUrl),
}

/// The release `fleetwatch` binary, serving on free ports with its own SQLite file.
pub struct Hub {
    pub proc: Proc,
    /// Where devices connect.
    pub url: BrokerUrl,
    http: String,
    client: reqwest::Client,
}

impl Hub {
    /// Starts the hub on `db` (created if missing) and waits until /healthz says ok.
    pub async fn start(
        dir: &Path,
        db: &Path,
        broker: HubBroker<'_>,
        offline_after: Duration,
    ) -> Result<Self> {
        Self::start_with(dir, db, broker, offline_after, None, &[]).await
    }

    /// As [`Hub::start`], with a configuration file and more environment.
    pub async fn start_with(
        dir: &Path,
        db: &Path,
        broker: HubBroker<'_>,
        offline_after: Duration,
        config: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let exe = std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("fleetwatch");
        let http_port = free_port()?;
        let mut command = Command::new(&exe);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env(
                "FLEETWATCH_DATABASE__URL",
                format!("sqlite://{}", db.display()),
            )
            .env("FLEETWATCH_HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
            .env(
                "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
                format!("{}ms", offline_after.as_millis()),
            )
            // The benchmarks register whole fleets at once, a million devices at most:
            // the registration limits, which guard against invented ids, are lifted.
            .env("FLEETWATCH_DEVICES__MAX_DEVICES", "0")
            .env("FLEETWATCH_DEVICES__REGISTRATION_RATE", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                dir.join(format!("hub-{http_port}.log")),
            )?);
        let url = match broker {
            HubBroker::Embedded => {
                let port = free_port()?;
                command.env("FLEETWATCH_MQTT__LISTEN", format!("127.0.0.1:{port}"));
                BrokerUrl::new("127.0.0.1", port)
            }
            HubBroker::External(url) => {
                command
                    .env("FLEETWATCH_MQTT__BROKER", "external")
                    .env("FLEETWATCH_MQTT__URL", url.to_string());
                url.clone()
            }
        };
        let proc = Proc::spawn("fleetwatch", &mut command)
            .with_context(|| format!("{} (build it: bench/run.sh does)", exe.display()))?;
        let hub = Self {
            proc,
            url,
            http: format!("http://127.0.0.1:{http_port}"),
            client: reqwest::Client::new(),
        };
        hub.wait_healthy(Duration::from_secs(30)).await?;
        Ok(hub)
    }

    /// The HTTP API's base URL, `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> &str {
        &self.http
    }

    async fn wait_healthy(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let answer = self
                .client
                .get(format!("{}/healthz", self.http))
                .send()
                .await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the hub was not healthy within {limit:?}");
            }
            time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every sample of /metrics.
    pub async fn metrics(&self) -> Result<Samples> {
        let text = self
            .client
            .get(format!("{}/metrics", self.http))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(Samples(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.rsplit_once(' '))
                .filter_map(|(name, value)| Some((name.to_string(), value.parse().ok()?)))
                .collect(),
        ))
    }

    /// Devices the hub knows, in any status.
    pub async fn devices(&self) -> Result<f64> {
        Ok(self.metrics().await?.devices())
    }

    /// Heartbeats committed to the database so far.
    pub async fn committed(&self) -> Result<f64> {
        Ok(self.metrics().await?.get("fleetwatch_flush_messages_total"))
    }

    /// Waits until the committed count stops moving (the last batch is in).
    pub async fn settle(&self, limit: Duration) -> Result<f64> {
        let deadline = Instant::now() + limit;
        let mut last = self.committed().await?;
        loop {
            time::sleep(Duration::from_millis(750)).await;
            let now = self.committed().await?;
            if now == last || Instant::now() > deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    pub async fn stop(self) -> Result<()> {
        self.proc.stop(Duration::from_secs(15)).await
    }

    /// POSTs to the hub's API, without a body.
    pub async fn post(&self, path: &str) -> Result<()> {
        self.client
            .post(format!("{}{path}", self.http))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// GETs a JSON document from the hub's API.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        Ok(self
            .client
            .get(format!("{}{path}", self.http))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

/// One scrape of /metrics, by sample name with labels (`name{label="x"}`).
pub struct Samples(HashMap<String, f64>);

impl Samples {
    /// A sample's value, 0 when absent.
    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    /// `fleetwatch_devices` summed over statuses.
    pub fn devices(&self) -> f64 {
        self.0
            .iter()
            .filter(|(name, _)| name.starts_with("fleetwatch_devices{"))
            .map(|(_, value)| value)
            .sum()
    }
}
