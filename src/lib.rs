//! fleetwatch: a hub that watches fleets of IoT devices over MQTT.
//!
//! Devices publish heartbeats on `devices/{id}/heartbeat`; the hub keeps each device's
//! `last_seen_at` and status, notices silence once `offline_after` has passed, and
//! announces each transition exactly once, retained, on `devices/{id}/status`.
//!
//! A message travels one way through these modules:
//!
//! - [`mqtt::broker`]: the embedded broker (rumqttd), unless an external one is used.
//!   With `mqtt.require_login`, [`mqtt::logins`] decides who connects, against the
//!   device [`credentials`] the store keeps.
//! - [`mqtt::subscriber`]: subscribes, validates topic ([`device`]) and payload
//!   ([`heartbeat::payload`]), and queues what is valid.
//! - [`heartbeat::handler`]: coalesces per device ([`update`]) and commits each flush
//!   through the [`storage`] trait. A store reads the devices a flush names, [`rules`]
//!   decides the rows and events (the [`status`] machine every transition), and the
//!   store writes them.
//! - [`checker`]: takes silent devices offline with one conditional update per pass,
//!   each device at its own deadline ([`deadline`]).
//! - [`alerts`]: committed transitions are logged, counted and wake the sinks.
//! - [`mqtt::publisher`]: publishes the outbox ([`event`]) and marks what the broker
//!   acknowledged.
//!
//! [`app`] wires them together with an ordered shutdown; [`config`] and [`cli`] are
//! the edges; [`clock`] is the one source of time; [`metrics`] counts; [`health`] is
//! what the parts report about whether the hub can do its job. [`silence`] says which
//! devices an operator's maintenance windows cover.

pub mod alerts;
pub mod app;
pub mod checker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod deadline;
pub mod device;
pub mod event;
pub mod health;
pub mod heartbeat;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod mqtt;
pub mod notify;
pub mod open_files;
pub mod registration;
pub mod rules;
pub mod silence;
pub mod status;
pub mod storage;
pub mod update;
