//! Several hubs: heartbeats committed per second by one and by two hub processes that
//! share one Mosquitto (a shared subscription) and one PostgreSQL database, beside
//! the broker's own drain, and the detection lag with two offline checkers.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use firmware_sim::{Fleet, QoS};
use serde_json::json;
use tokio::time;

use crate::Scale;
use crate::listen::listen;
use crate::measure::{
    BrokerKind, NEVER, Rate, all_offline, broker_drain, fleet, ingest_fleet, lags_ms, quantile,
    window,
};
use crate::pgdb::with_database;
use crate::procs::{Hub, HubBroker, Mosquitto};
use crate::report::{Baseline, Goal, Report};

/// `n` hubs on `mosquitto` and the database `url`, one shared subscription group.
async fn hubs(
    dir: &Path,
    mosquitto: &Mosquitto,
    url: &str,
    n: usize,
    offline_after: Duration,
) -> Result<Vec<Hub>> {
    let mut hubs = Vec::with_capacity(n);
    for _ in 0..n {
        let env = [
            ("FLEETWATCH_DATABASE__URL", url),
            ("FLEETWATCH_MQTT__SHARED_GROUP", "bench"),
        ];
        hubs.push(
            Hub::start_with(
                dir,
                &dir.join("unused.db"),
                HubBroker::External(&mosquitto.url),
                offline_after,
                None,
                &env,
            )
            .await?,
        );
    }
    Ok(hubs)
}

async fn stop_all(hubs: Vec<Hub>) -> Result<()> {
    for hub in hubs {
        hub.stop().await?;
    }
    Ok(())
}

/// Heartbeats all hubs committed so far.
async fn committed(hubs: &[Hub]) -> Result<f64> {
    let mut sum = 0.0;
    for hub in hubs {
        sum += hub.committed().await?;
    }
    Ok(sum)
}

/// Which part could not keep up at one step of the baseline, if one did not: the
/// simulator (it sent less than asked), else the broker (it delivered less than it
/// was sent).
fn saturated(asked: u64, drain: &Rate) -> Option<&'static str> {
    if drain.offered_per_s < 0.9 * asked as f64 {
        Some("the load generator (it sent less than asked)")
    } else if drain.per_s < 0.9 * drain.offered_per_s {
        Some("the broker (it delivered less than it was sent)")
    } else {
        None
    }
}

/// One run of `n` hubs at `offered` heartbeats/s, on a fresh Mosquitto and `url`.
async fn commit(dir: &Path, url: &str, n: usize, offered: u64, scale: &Scale) -> Result<Rate> {
    let mosquitto = Mosquitto::start(dir).await?;
    let hubs = hubs(dir, &mosquitto, url, n, NEVER).await?;
    let fleet = ingest_fleet(&mosquitto.url, offered, QoS::AtLeastOnce, scale);
    let rate = window(scale, &fleet, None, || committed(&hubs)).await;
    fleet.stop().await;
    stop_all(hubs).await?;
    mosquitto.stop().await?;
    rate
}

/// A fleet whose deadlines are spread over one `offline_after` goes silent in front of
/// two hubs; returns each offline event's lag past its own deadline, in ms, sorted.
async fn two_checkers(dir: &Path, url: &str, scale: &Scale) -> Result<Vec<i64>> {
    let after = scale.lag_offline_after;
    let devices = scale.lag_devices;
    let mosquitto = Mosquitto::start(dir).await?;
    let hubs = hubs(dir, &mosquitto, url, 2, after).await?;
    let listener = listen(&mosquitto.url, "devices/+/status", QoS::AtLeastOnce, true).await?;
    let fleet = Fleet::start(fleet(
        &mosquitto.url,
        "lag2-",
        devices,
        after,
        20,
        QoS::AtLeastOnce,
    ));
    time::sleep(after).await;
    fleet.finish(Duration::from_secs(10)).await;
    for hub in &hubs {
        hub.settle(Duration::from_secs(30)).await?;
    }
    let events = all_offline(&listener.heard, &hubs[0], devices, after).await?;
    let lags = lags_ms(&events, after);
    stop_all(hubs).await?;
    mosquitto.stop().await?;
    Ok(lags)
}

pub async fn scaling(dir: &Path, admin: &str, scale: &Scale, report: &mut Report) -> Result<()> {
    // The broker's drain to a counting subscriber, ramped until one step falls short;
    // that step says which part gave out first.
    let mut best: Option<(u64, Rate)> = None;
    let mut first = "neither: the broker drained the highest rate tried (add higher rates)";
    for &asked in &scale.hubs_rates {
        let rate = broker_drain(dir, BrokerKind::Mosquitto, QoS::AtLeastOnce, asked, scale).await?;
        println!(
            "   Mosquitto drain, {asked}/s asked: {:.0}/s sent, {:.0}/s delivered",
            rate.offered_per_s, rate.per_s
        );
        let short = saturated(asked, &rate);
        if best.as_ref().is_none_or(|(_, b)| rate.per_s > b.per_s) {
            best = Some((asked, rate));
        }
        if let Some(short) = short {
            first = short;
            break;
        }
    }
    let Some((offered, drain)) = best else {
        bail!("no rates to try");
    };
    println!(
        "   baseline: Mosquitto drained {:.0}/s at {offered}/s asked; saturated first: {first}",
        drain.per_s
    );
    let mut rates = Vec::new();
    for n in [1, 2] {
        let rate = with_database(admin, async |url: &str| {
            commit(dir, url, n, offered, scale).await
        })
        .await?;
        println!(
            "   {n} hub(s), {offered}/s asked ({:.0}/s sent): {:.0}/s committed",
            rate.offered_per_s, rate.per_s
        );
        rates.push(rate);
    }
    let (one, two) = (&rates[0], &rates[1]);
    report.add(
        "hubs_two_vs_one",
        two.per_s / one.per_s,
        "",
        None,
        Some(Baseline {
            what: "one hub's committed heartbeats/s (Mosquitto, PostgreSQL, QoS 1)".into(),
            value: one.per_s,
            unit: "msg/s",
        }),
        json!({
            "asked_per_s": offered,
            "one_hub_committed_per_s": one.per_s,
            "two_hubs_committed_per_s": two.per_s,
            "sent_per_s_one_hub": one.offered_per_s,
            "sent_per_s_two_hubs": two.offered_per_s,
            "broker_drain_per_s": drain.per_s,
            "broker_drain_sent_per_s": drain.offered_per_s,
            "saturated_first_in_baseline": first,
            "two_hubs_vs_broker_drain": two.per_s / drain.per_s,
        }),
    );

    let lags = with_database(admin, async |url: &str| two_checkers(dir, url, scale).await).await?;
    report.add(
        "detect_lag_p99_two_hubs_s",
        quantile(&lags, 0.99) as f64 / 1e3,
        "s",
        Some(Goal::AtMost(1.0)),
        Some(Baseline {
            what: "offline_after".into(),
            value: scale.lag_offline_after.as_secs_f64(),
            unit: "s",
        }),
        json!({
            "devices": scale.lag_devices,
            "offline_events": lags.len(),
            "p50_ms": quantile(&lags, 0.5),
            "p99_ms": quantile(&lags, 0.99),
            "max_ms": lags.last(),
            "check_interval_ms": 250,
            "hubs": 2,
        }),
    );
    Ok(())
}
