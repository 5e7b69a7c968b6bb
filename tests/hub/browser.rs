//! The dashboard in a real browser (feature `browser-tests`): Debian's Chromium driven
//! by playwright-core (tests/browser/dashboard.mjs) against a hub with simulated
//! devices in every status.
//!
//! Needs `node`, `/usr/bin/chromium` (or CHROMIUM=path) and
//! `npm ci --prefix tests/browser`; .ci/run installs all three. Set SCREENSHOT=FILE to
//! keep a screenshot of the page.

#![cfg(feature = "browser-tests")]

use std::process::Stdio;
use std::time::Duration;

use fleetwatch::config::Secret;
use fleetwatch::status::Status;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::helpers::*;

const KEY: &str = "browser-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_and_turns_a_silent_device_red_without_reloading() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/dashboard.mjs");
    let modules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/node_modules/playwright-core"
    );
    assert!(
        std::path::Path::new(modules).exists(),
        "playwright-core is missing: run `npm ci --prefix tests/browser`"
    );

    // A webhook sink, so the Notifications panel has something to show.
    let receiver = crate::receiver::Receiver::start().await;
    let sink = crate::notify::webhook("ops", receiver.url("/in"));
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.http.api_key = Some(Secret::new(KEY));
        s.notify.sinks = vec![sink];
    })
    .await;
    let mut watcher = app.watch().await;
    let beat = Duration::from_millis(300);
    let _online = app.device("pump-online", beat).await;
    let live = app.device("pump-live", beat).await;
    let error = app.device("pump-error", beat).await;
    let offline = app.device("pump-offline", beat).await;
    for id in ["pump-online", "pump-live", "pump-error", "pump-offline"] {
        watcher.expect(id, Status::Online, "registered").await;
    }
    error
        .report_error("simulated fault")
        .await
        .expect("report error");
    offline.silence().await.expect("silence");
    let registered = app
        .request(reqwest::Method::POST, "/api/v1/devices")
        .json(&json!({"device_id": "pump-spare"}))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), reqwest::StatusCode::CREATED);
    // Two devices at one site, for the label filter.
    for id in ["pump-online", "pump-error"] {
        let labelled = app
            .request(
                reqwest::Method::PUT,
                &format!("/api/v1/devices/{id}/labels"),
            )
            .json(&json!({"site": "north"}))
            .send()
            .await
            .expect("labels");
        assert_eq!(labelled.status(), reqwest::StatusCode::OK);
    }
    // A fleet around them, for a realistic page.
    let mut fleet = Vec::new();
    for i in 0..24 {
        fleet.push(
            app.device(&format!("sensor-{i:02}"), Duration::from_secs(1))
                .await,
        );
    }
    watcher
        .expect("pump-error", Status::Error, "device_error")
        .await;
    watcher
        .expect("pump-offline", Status::Offline, "heartbeat_timeout")
        .await;
    // The error and the offline transitions, delivered.
    receiver.wait_for_accepted(2, PATIENCE).await;

    let mut browser = Command::new("node");
    browser
        .arg(script)
        .arg(&app.http)
        .arg(KEY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if let Some(path) = std::env::var_os("SCREENSHOT") {
        browser.arg(path);
    }
    let mut browser = browser
        .spawn()
        .unwrap_or_else(|e| panic!("browser-tests need `node` on PATH: {e}"));
    let mut stdin = browser.stdin.take().expect("stdin piped");
    let mut lines = BufReader::new(browser.stdout.take().expect("stdout piped")).lines();
    let mut log = Vec::new();
    within(Duration::from_secs(90), "the browser test", async {
        while let Some(line) = lines.next_line().await.expect("read browser output") {
            log.push(line.clone());
            match line.as_str() {
                "READY" => {
                    live.silence().await.expect("silence");
                    stdin
                        .write_all(b"SILENCED\n")
                        .await
                        .expect("tell the browser");
                }
                "PASS" => return,
                failure if failure.starts_with("FAIL") => panic!("{failure}\n{}", log.join("\n")),
                _ => {}
            }
        }
        panic!("the browser script ended without PASS:\n{}", log.join("\n"));
    })
    .await;
    let status = within(PATIENCE, "node to exit", browser.wait())
        .await
        .expect("wait");
    assert!(status.success(), "{status:?}\n{}", log.join("\n"));
    app.stop().await;
}
