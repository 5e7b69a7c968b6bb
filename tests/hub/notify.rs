//! Notifications against real receivers on loopback: signed webhooks verified by the
//! Standard Webhooks reference library, a receiver that is down and comes back, dead
//! letters, a fake Telegram Bot API and a Slack receiver, sinks switched off and on.

use std::collections::HashMap;
use std::time::Duration;

use fleetwatch::config::{Secret, SinkSettings};
use fleetwatch::notify::filter::FilterSettings;
use fleetwatch::status::Status;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::receiver::Receiver;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BEAT: Duration = Duration::from_millis(300);

pub fn webhook(name: &str, url: String) -> SinkSettings {
    SinkSettings {
        name: name.into(),
        kind: "webhook".into(),
        enabled: true,
        url: Some(Secret::new(url)),
        secret: Some(Secret::new(SECRET)),
        token: None,
        chat_id: None,
        api_url: None,
        filter: FilterSettings::default(),
    }
}

/// A hub whose notifications retry fast (the backoff itself is unit-tested).
async fn hub_with(sinks: Vec<SinkSettings>) -> TestApp {
    spawn_app_with(Broker::Embedded, |s| {
        s.notify.sinks = sinks;
        s.notify.retry_max = Duration::from_millis(200);
        s.notify.timeout = Duration::from_secs(2);
    })
    .await
}

/// Drives `device` through error and recovery with HTTP heartbeats: two notified
/// transitions (error, recovery) after its registration (not notified).
async fn error_then_recovery(app: &TestApp, device: &str) {
    for body in [r#"{}"#, r#"{"status":"error","error":"fan"}"#, r#"{}"#] {
        let response = app
            .request(Method::POST, &format!("/api/v1/devices/{device}/heartbeat"))
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// `(device, type)` of each accepted webhook, in arrival order.
fn deliveries(receiver: &Receiver) -> Vec<(String, String)> {
    receiver
        .accepted()
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["data"]["device_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                body["type"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gets_one_signed_post_per_notified_transition() {
    let receiver = Receiver::start().await;
    let app = hub_with(vec![webhook("ops", receiver.url("/hooks/fleetwatch"))]).await;
    let mut watcher = app.watch().await;
    let device = app.device("pump-7", BEAT).await;
    watcher.expect("pump-7", Status::Online, "registered").await;
    device.silence().await.expect("silence");
    watcher
        .expect("pump-7", Status::Offline, "heartbeat_timeout")
        .await;
    device.resume().await.expect("resume");
    watcher.expect("pump-7", Status::Online, "heartbeat").await;
    device.report_error("disk full").await.expect("error");
    watcher
        .expect("pump-7", Status::Error, "device_error")
        .await;

    receiver.wait_for_accepted(3, PATIENCE).await;
    watcher.collect_for(BEAT * 3).await;
    let posts = receiver.received();
    assert_eq!(posts.len(), 3, "registration is no alarm; nothing twice");
    let verifier = standardwebhooks::Webhook::new(SECRET).expect("secret");
    let history = app
        .store
        .events(&"pump-7".parse().expect("id"), None, 10)
        .await
        .expect("history");
    for (post, kind) in posts
        .iter()
        .zip(["device.offline", "device.recovered", "device.error"])
    {
        assert_eq!(post.path, "/hooks/fleetwatch");
        verifier
            .verify(&post.body, &post.headers)
            .unwrap_or_else(|e| panic!("signature does not verify: {e}"));
        let body = post.json();
        assert_eq!(body["type"], kind, "{body}");
        let event_id = body["data"]["event_id"].as_str().expect("event id");
        assert_eq!(
            post.header("webhook-id"),
            event_id,
            "the event id is the key"
        );
        assert!(
            history
                .iter()
                .any(|e| e.event.event_id.to_string() == event_id),
            "a committed event"
        );
    }
    let recovered = posts[1].json();
    assert!(
        recovered["data"]["down_for_s"]
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "{recovered}"
    );
    assert_eq!(posts[2].json()["data"]["error"], "disk full");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_then_back_gets_everything_in_order_once() {
    let mut receiver = Receiver::start().await;
    receiver.answer(503);
    let app = hub_with(vec![webhook("ops", receiver.url("/in"))]).await;
    let devices: Vec<String> = (0..5).map(|i| format!("flappy-{i}")).collect();
    for device in &devices {
        error_then_recovery(&app, device).await;
    }
    // Two notified transitions a device: ten notifications, refused while it is down.
    receiver.wait_for_requests(10).await;
    assert!(receiver.accepted().is_empty());
    // Then it refuses connections for a while,
    receiver.stop();
    for device in &devices {
        error_then_recovery(&app, device).await;
    }
    eventually(PATIENCE, "the backlog to hold all twenty", || async {
        app.get_json("/api/v1/sinks").await["sinks"][0]["backlog"] == 20
    })
    .await;
    // and comes back.
    receiver.restart().await;
    receiver.answer(200);
    receiver.wait_for_accepted(20, PATIENCE).await;
    eventually(PATIENCE, "the backlog to drain", || async {
        app.get_json("/api/v1/sinks").await["sinks"][0]["backlog"] == 0
    })
    .await;

    let delivered = deliveries(&receiver);
    assert_eq!(delivered.len(), 20, "nothing twice: {delivered:?}");
    let keys: std::collections::HashSet<String> = receiver
        .accepted()
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    assert_eq!(keys.len(), 20);
    for device in &devices {
        let kinds: Vec<&str> = delivered
            .iter()
            .filter(|(d, _)| d == device)
            .map(|(_, k)| k.as_str())
            .collect();
        assert_eq!(
            kinds,
            [
                "device.error",
                "device.recovered",
                "device.error",
                "device.recovered"
            ],
            "{device}: in commit order"
        );
    }
    let sink = &app.get_json("/api/v1/sinks").await["sinks"][0];
    assert_eq!(sink["delivered"], 20);
    assert!(sink["failed"].as_u64().is_some_and(|f| f >= 10), "{sink}");
    assert!(sink["last_success_at"].is_string(), "{sink}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_notification_goes_to_the_dead_letters_and_the_queue_moves_on() {
    let receiver = Receiver::start().await;
    // The first notification of poison-1 is refused outright.
    receiver.answer_with(|request| {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let poison = body["data"]["device_id"] == "poison-1" && body["type"] == "device.error";
        if poison {
            (400, r#"{"error":"unknown device"}"#.into())
        } else {
            (200, "{}".into())
        }
    });
    let app = hub_with(vec![webhook("ops", receiver.url("/in"))]).await;
    error_then_recovery(&app, "poison-1").await;
    error_then_recovery(&app, "healthy-1").await;
    receiver.wait_for_accepted(3, PATIENCE).await;
    let delivered = deliveries(&receiver);
    assert!(
        delivered.contains(&("poison-1".into(), "device.recovered".into())),
        "{delivered:?}"
    );
    assert_eq!(receiver.received().len(), 4, "the 400 was not retried");

    let letters = app.get_json("/api/v1/sinks/ops/dead-letters").await;
    let letter = &letters["dead_letters"][0];
    assert_eq!(letter["device_id"], "poison-1");
    assert_eq!(letter["type"], "device.error");
    assert!(
        letter["error"].as_str().is_some_and(|e| e.contains("400")),
        "{letter}"
    );
    let sink = &app.get_json("/api/v1/sinks").await["sinks"][0];
    assert_eq!(sink["dead_letters"], 1);

    // Retried by an operator, it is sent again (and refused again, here).
    let retried = app
        .send(Method::POST, "/api/v1/sinks/ops/dead-letters/retry")
        .await;
    assert_eq!(json_of(retried).await["count"], 1);
    receiver.wait_for_requests(5).await;
    eventually(PATIENCE, "the letter to be dead again", || async {
        app.get_json("/api/v1/sinks").await["sinks"][0]["dead_letters"] == 1
    })
    .await;
    let dropped = app
        .send(Method::POST, "/api/v1/sinks/ops/dead-letters/drop")
        .await;
    assert_eq!(json_of(dropped).await["count"], 1);
    assert_eq!(
        app.get_json("/api/v1/sinks").await["sinks"][0]["dead_letters"],
        0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_and_slack_get_texts_and_a_wrong_token_is_a_dead_letter() {
    const TOKEN: &str = "123456:ABC-right-token";
    const WRONG: &str = "999999:XYZ-wrong-token";
    let telegram = Receiver::start().await;
    telegram.answer_with(|request| {
        if request.path == format!("/bot{TOKEN}/sendMessage") {
            (200, r#"{"ok":true,"result":{"message_id":1}}"#.into())
        } else {
            (
                401,
                r#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#.into(),
            )
        }
    });
    let slack = Receiver::start().await;
    let bot = |name: &str, token: &str| SinkSettings {
        kind: "telegram".into(),
        url: None,
        secret: None,
        token: Some(Secret::new(token)),
        chat_id: Some("-100200300".into()),
        api_url: Some(telegram.url("")),
        ..webhook(name, String::new())
    };
    let chat = SinkSettings {
        kind: "slack".into(),
        url: Some(Secret::new(slack.url("/services/T0/B0/XYZ"))),
        secret: None,
        ..webhook("team-chat", String::new())
    };
    let app = hub_with(vec![
        bot("oncall", TOKEN),
        bot("misconfigured", WRONG),
        chat,
    ])
    .await;
    error_then_recovery(&app, "pump-9").await;

    slack.wait_for_accepted(2, PATIENCE).await;
    telegram.wait_for_accepted(2, PATIENCE).await;
    let texts: Vec<String> = telegram
        .accepted()
        .iter()
        .map(|r| {
            let body = r.json();
            assert_eq!(body["chat_id"], "-100200300");
            body["text"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert!(
        texts[0].starts_with("🟠 pump-9 reports an error: fan"),
        "{texts:?}"
    );
    assert!(
        texts[1].starts_with("🟢 pump-9 is back online\nDown for: "),
        "{texts:?}"
    );
    let slack_texts: Vec<Value> = slack.accepted().iter().map(|r| r.json()).collect();
    assert_eq!(slack_texts[0], json!({ "text": texts[0] }));

    eventually(
        PATIENCE,
        "the wrong token's notifications to be dead",
        || async { app.get_json("/api/v1/sinks").await["sinks"][1]["dead_letters"] == 2 },
    )
    .await;
    let sinks = app.get_json("/api/v1/sinks").await;
    let misconfigured = &sinks["sinks"][1];
    assert_eq!(misconfigured["name"], "misconfigured");
    let error = misconfigured["last_error"].as_str().expect("an error");
    assert!(
        error.contains("401") && error.contains("Unauthorized"),
        "{error}"
    );
    let listing = sinks.to_string();
    for secret in [TOKEN, WRONG, "XYZ", SECRET] {
        assert!(!listing.contains(secret), "a secret in the API: {listing}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switched_off_sink_sends_nothing_and_on_again_hears_from_then_on() {
    let receiver = Receiver::start().await;
    let mut sink = webhook("ops", receiver.url("/in"));
    sink.enabled = false;
    let app = hub_with(vec![sink]).await;
    error_then_recovery(&app, "missed-1").await;
    let test = app.send(Method::POST, "/api/v1/sinks/ops/test").await;
    // An operator's test is sent even while it is off: it checks the receiver.
    assert_eq!(json_of(test).await["delivered"], true);
    let test_post = receiver.received().remove(0).json();
    assert_eq!(test_post["type"], "fleetwatch.test");

    let enabled = app
        .request(Method::PATCH, "/api/v1/sinks/ops")
        .json(&json!({"enabled": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(json_of(enabled).await["enabled"], true);
    error_then_recovery(&app, "heard-1").await;
    receiver.wait_for_accepted(3, PATIENCE).await;
    // A negative assertion needs a window: a missed notification wrongly sent would
    // be queued beside heard-1's and arrive within it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered: Vec<String> = deliveries(&receiver)
        .into_iter()
        .skip(1)
        .map(|(device, _)| device)
        .collect();
    assert_eq!(
        delivered,
        ["heard-1", "heard-1"],
        "what it missed is not sent"
    );

    let disabled = app
        .request(Method::PATCH, "/api/v1/sinks/ops")
        .json(&json!({"enabled": false}))
        .send()
        .await
        .expect("request");
    assert_eq!(json_of(disabled).await["enabled"], false);
    app.stop().await;
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

#[test]
fn bad_sink_settings_stop_start_up_with_one_line_naming_the_sink() {
    let cases: HashMap<&str, (&str, &str)> = HashMap::from([
        (
            "kind = \"pager\"\nurl = \"http://x\"",
            ("notify.sinks[0]", "not a sink kind"),
        ),
        (
            "kind = \"telegram\"\nchat_id = 5",
            ("notify.sinks[0]", "token"),
        ),
        (
            "kind = \"webhook\"\nurl = \"not a url\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
            ("notify.sinks[0]", "url"),
        ),
        (
            "kind = \"webhook\"\nurl = \"http://x\"\nsecret = \"plain\"",
            ("notify.sinks[0]", "whsec_"),
        ),
        (
            "kind = \"slack\"\nurl = \"http://x\"\ncolour = \"red\"",
            ("colour", ""),
        ),
    ]);
    for (body, (key, problem)) in cases {
        let toml = format!("[[notify.sinks]]\nname = \"s1\"\n{body}\n");
        let error = fleetwatch::config::Settings::load_from_toml(&toml, [])
            .expect_err(body)
            .to_string();
        assert!(
            error.contains(key) && error.contains(problem),
            "{body}: {error}"
        );
        assert!(!error.contains('\n'), "one line: {error}");
        assert!(
            !error.contains("ABC") && !error.contains("MfKQ9r8"),
            "no secret: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_pending_when_the_hub_is_killed_are_delivered_after_restart_under_the_same_key()
 {
    use crate::restart::{HubProcess, hub_env};

    let receiver = Receiver::start().await;
    receiver.answer(503);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("fleetwatch.toml");
    std::fs::write(
        &config,
        format!(
            "[notify]\nretry_max = \"200ms\"\ngroup_threshold = 0\n\n[[notify.sinks]]\nname = \"ops\"\nkind = \"webhook\"\n\
             url = \"{}\"\nsecret = \"{SECRET}\"\n",
            receiver.url("/in")
        ),
    )
    .expect("write the configuration");
    let http_port = free_port();
    let mut env = hub_env(free_port(), &dir.path().join("fleetwatch.db"));
    env.retain(|(name, _)| *name != "FLEETWATCH_HTTP__LISTEN");
    env.push(("FLEETWATCH_HTTP__LISTEN", format!("127.0.0.1:{http_port}")));
    let args = ["--config", config.to_str().expect("path")];
    let base = format!("http://127.0.0.1:{http_port}");
    let client = reqwest::Client::new();
    let mut hub = HubProcess::spawn(dir.path(), &args, &env);
    hub.wait_for_line("subscribed to device heartbeats").await;
    for i in 0..10 {
        for body in [r#"{}"#, r#"{"status":"error"}"#] {
            let response = client
                .post(format!("{base}/api/v1/devices/killed-{i}/heartbeat"))
                .body(body)
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), StatusCode::OK);
        }
    }
    // Ten error notifications, each refused at least once: pending when it dies.
    eventually(PATIENCE, "every notification tried", || async {
        let tried: std::collections::HashSet<String> = receiver
            .received()
            .iter()
            .map(|r| r.header("webhook-id").to_string())
            .collect();
        tried.len() == 10
    })
    .await;
    hub.kill().await;
    let keys_before: std::collections::HashSet<String> = receiver
        .received()
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();

    receiver.answer(200);
    let mut hub = HubProcess::spawn(dir.path(), &args, &env);
    hub.wait_for_line("subscribed to device heartbeats").await;
    receiver.wait_for_accepted(10, PATIENCE).await;
    eventually(PATIENCE, "the backlog to drain", || async {
        let sinks: Value = client
            .get(format!("{base}/api/v1/sinks"))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        sinks["sinks"][0]["backlog"] == 0
    })
    .await;
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 10, "each delivered once");
    let keys_after: std::collections::HashSet<String> = accepted
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    assert_eq!(
        keys_after, keys_before,
        "the same idempotency keys after the restart"
    );
    hub.terminate();
    assert!(hub.wait().await.success());
    let log = hub.log.join("\n");
    assert!(
        !log.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "the secret in the log"
    );
}
