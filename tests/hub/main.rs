//! Integration tests: the real hub, a real broker, a fresh database, devices driven by
//! firmware-sim. All of tests/ builds into this one binary.
//!
//! The core scenarios run against the embedded broker on SQLite always, against a real
//! Mosquitto (started by the test on a free port) with `--features mosquitto-tests`,
//! and on PostgreSQL (a database per test) with `--features postgres-tests`.

mod browser;
mod cli;
mod database;
mod deadlines;
mod faults;
mod helpers;
mod http;
mod labels;
#[cfg(feature = "mosquitto-tests")]
mod lockdown;
mod logins;
mod mosquitto;
mod notify;
mod parent;
mod policy;
mod receiver;
mod registration;
mod restart;
mod scenarios;
#[cfg(all(feature = "mosquitto-tests", feature = "postgres-tests"))]
mod several_hubs;
mod silences;
mod sim;

/// Every core scenario as a test of its own, run against the broker `$broker`
/// evaluates to (a `(Broker, guard)` pair, the guard kept alive for the test) on a
/// fresh database of the kind `$database`.
macro_rules! core_scenarios {
    ($broker:expr, $database:expr) => {
        core_scenarios!($broker, $database =>
            first_heartbeat_registers_online_and_last_seen_moves,
            silence_means_one_offline_event_and_recovery_one_online_event,
            a_hundred_devices_silent_at_once_are_all_reported,
            error_heartbeat_means_error_and_the_next_ok_one_online,
            a_cut_connection_fires_the_will_before_the_deadline,
            a_device_beating_just_inside_offline_after_never_flaps,
            bad_input_is_rejected_counted_and_changes_nothing,
            events_committed_before_start_are_published,
            a_backlog_larger_than_a_page_is_all_published,
        );
    };
    ($broker:expr, $database:expr => $($scenario:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let (broker, _guard) = $broker;
                let database = $database;
                crate::scenarios::$scenario(crate::helpers::Setup { broker, database }).await;
            }
        )+
    };
}

mod embedded {
    core_scenarios!(
        (crate::helpers::Broker::Embedded, ()),
        crate::helpers::Database::Sqlite
    );

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_device_goes_offline_at_its_own_deadline() {
        crate::deadlines::each_device_goes_offline_at_its_own_deadline(
            crate::helpers::Broker::Embedded.into(),
        )
        .await;
    }
}

#[cfg(feature = "mosquitto-tests")]
mod external_mosquitto {
    core_scenarios!(
        crate::mosquitto::Mosquitto::start().broker(),
        crate::helpers::Database::Sqlite
    );

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retained_heartbeats_from_before_the_hub_started_are_ignored() {
        let (broker, _mosquitto) = crate::mosquitto::Mosquitto::start().broker();
        let crate::helpers::Broker::External(url) = &broker else {
            unreachable!()
        };
        // Retained on the broker (PUBACK received) before the hub subscribes.
        publish_and_wait(
            url,
            &[
                ("devices/stale-1/heartbeat", b"{}"),
                ("devices/stale-1/lwt", b"gone"),
            ],
        )
        .await;

        let app = crate::helpers::spawn_app(broker.clone()).await;
        crate::helpers::eventually(
            crate::helpers::PATIENCE,
            "both retained messages to be refused",
            || {
                let metrics = app.metrics.clone();
                async move { metrics.rejected(fleetwatch::heartbeat::RejectReason::Retained) >= 2 }
            },
        )
        .await;
        assert_eq!(
            app.status_of("stale-1").await,
            None,
            "a retained heartbeat is old news"
        );
        app.stop().await;
    }

    async fn publish_and_wait(url: &firmware_sim::BrokerUrl, messages: &[(&str, &[u8])]) {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let (client, mut eventloop) = AsyncClient::new(
            MqttOptions::new("stale-publisher", url.host.clone(), url.port),
            16,
        );
        for (topic, payload) in messages {
            client
                .publish(*topic, QoS::AtLeastOnce, true, payload.to_vec())
                .await
                .expect("queue publish");
        }
        let mut acked = 0;
        crate::helpers::within(crate::helpers::PATIENCE, "PUBACKs", async {
            while acked < messages.len() {
                if let Event::Incoming(Packet::PubAck(_)) =
                    eventloop.poll().await.expect("broker connection")
                {
                    acked += 1;
                }
            }
        })
        .await;
    }
}

/// The hub on PostgreSQL: every core scenario on the embedded broker (and on a real
/// Mosquitto too with `--features mosquitto-tests`), and the SIGKILL restart.
#[cfg(feature = "postgres-tests")]
mod postgres {
    core_scenarios!(
        (crate::helpers::Broker::Embedded, ()),
        crate::helpers::Database::Postgres
    );

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_device_goes_offline_at_its_own_deadline() {
        crate::deadlines::each_device_goes_offline_at_its_own_deadline(crate::helpers::Setup {
            broker: crate::helpers::Broker::Embedded,
            database: crate::helpers::Database::Postgres,
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigkill_and_restart_lose_nothing_repeat_nothing_and_respect_the_grace() {
        crate::restart::sigkill_and_restart(crate::helpers::Database::Postgres).await;
    }

    #[cfg(feature = "mosquitto-tests")]
    mod external_mosquitto {
        core_scenarios!(
            crate::mosquitto::Mosquitto::start().broker(),
            crate::helpers::Database::Postgres
        );
    }
}
