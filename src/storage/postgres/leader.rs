//! Leadership on PostgreSQL: a session advisory lock held on a connection of its own.
//!
//! The lock lives as long as the connection: a hub that dies (SIGKILL, a lost network)
//! releases it when the server drops the connection, and the next hub trying takes it
//! within [`RETRY`]. The holder checks its connection every [`CHECK`]; a check that
//! fails or hangs ends its term, so a hub cut off from the database stops sending
//! within about `CHECK + CHECK_TIMEOUT` (the server may hand the lock on sooner, once
//! it notices the connection is gone: the two may then overlap by that much, which
//! repeats events with their own ids, never sends an event twice under two ids).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::OUTBOX_CHANNEL;
use crate::storage::leader::{Leadership, Term};

/// The session lock of the outbox's sender, "fltp" in ASCII (the outbox's own
/// transaction lock is [`super::OUTBOX_LOCK`]).
pub const LEADER_LOCK: i64 = 0x666c_7470;
/// How often a hub that does not lead tries to.
const RETRY: Duration = Duration::from_secs(1);
/// How often the leader checks the connection that holds the lock.
const CHECK: Duration = Duration::from_secs(1);
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct PgLeadership {
    options: PgConnectOptions,
}

impl PgLeadership {
    pub fn new(options: PgConnectOptions) -> Self {
        Self { options }
    }

    /// The connection holding the lock, if this hub got it.
    async fn try_lead(&self) -> Result<Option<PgConnection>, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        Ok(got.then_some(conn))
    }
}

#[async_trait]
impl Leadership for PgLeadership {
    async fn acquire(&self, stop: &CancellationToken) -> Option<Term> {
        let mut failing = false;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match self.try_lead().await {
                Ok(Some(conn)) => {
                    let lost = CancellationToken::new();
                    let keeper = tokio::spawn(keep(conn, lost.clone()));
                    return Some(Term::kept(lost, keeper));
                }
                Ok(None) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "could not ask the database which hub leads; retrying");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// Re-makes its connection when lost; a notification missed meanwhile is caught by
    /// the publisher's and the sinks' own periodic reads.
    async fn listen(&self, outbox_grew: Arc<Notify>) {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(self.options.clone());
        let mut failing = false;
        loop {
            let listening = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(OUTBOX_CHANNEL).await?;
                // Listening again: the next outage is logged too.
                failing = false;
                loop {
                    listener.recv().await?;
                    outbox_grew.notify_one();
                }
            };
            let result: Result<(), sqlx::Error> = listening.await;
            if let Err(e) = result
                && !std::mem::replace(&mut failing, true)
            {
                tracing::warn!(error = %e, "cannot listen for other hubs' status events; reading the outbox every second");
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Holds the lock's connection until it fails (then cancels `lost`) or the term is
/// dropped (this task is aborted and the connection, with the lock, closed).
async fn keep(mut conn: PgConnection, lost: CancellationToken) {
    loop {
        tokio::time::sleep(CHECK).await;
        let check = sqlx::query("SELECT 1").execute(&mut conn);
        match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lost the database connection that made this hub lead");
                break;
            }
            Err(_) => {
                tracing::warn!(
                    timeout_s = CHECK_TIMEOUT.as_secs(),
                    "the database connection that made this hub lead stopped answering"
                );
                break;
            }
        }
    }
    lost.cancel();
}

#[cfg(all(test, feature = "postgres-tests"))]
mod tests {
    use super::*;
    use crate::storage::postgres::scratch::ScratchDatabase;
    use crate::storage::postgres::{PgSettings, PgStore};

    const PATIENCE: Duration = Duration::from_secs(10);

    async fn leadership(db: &ScratchDatabase) -> PgLeadership {
        PgLeadership::new(PgStore::options(&db.url, PgSettings::default()).expect("options"))
    }

    #[tokio::test]
    async fn one_hub_leads_at_a_time_and_the_next_takes_over_when_it_lets_go() {
        let db = ScratchDatabase::create().await;
        let (first, second) = (leadership(&db).await, leadership(&db).await);
        let stop = CancellationToken::new();
        let term = tokio::time::timeout(PATIENCE, first.acquire(&stop))
            .await
            .expect("the first hub leads at once")
            .expect("not stopped");
        let waiting = tokio::spawn(async move {
            let stop = CancellationToken::new();
            second.acquire(&stop).await.map(|term| (term, second))
        });
        // Two of its retries pass without the lead changing hands.
        tokio::time::sleep(RETRY * 2 + RETRY / 2).await;
        if waiting.is_finished() {
            let led = waiting.await.expect("task").is_some();
            panic!("a second hub's acquire returned while the first led (led: {led})");
        }
        assert!(!term.lost.is_cancelled());
        drop(term);
        let (next, _second) = tokio::time::timeout(PATIENCE, waiting)
            .await
            .expect("the second hub takes over")
            .expect("task")
            .expect("not stopped");
        assert!(!next.lost.is_cancelled());
    }

    #[tokio::test]
    async fn a_leader_whose_connection_dies_loses_its_term_and_another_leads() {
        let db = ScratchDatabase::create().await;
        let (first, second) = (leadership(&db).await, leadership(&db).await);
        let stop = CancellationToken::new();
        let term = first.acquire(&stop).await.expect("leads");
        // The server ends the leader's connection, as when its host vanishes.
        let mut admin = PgConnection::connect(&db.url).await.expect("connect");
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND objid = $1 AND granted \
                   AND database = (SELECT oid FROM pg_database \
                                   WHERE datname = current_database())) AS t",
        )
        .bind(LEADER_LOCK)
        .fetch_one(&mut admin)
        .await
        .expect("terminate");
        assert_eq!(ended, 1, "the lock is held by exactly one connection");
        tokio::time::timeout(PATIENCE, term.lost.cancelled())
            .await
            .expect("the old leader learns it lost the lead");
        let next = tokio::time::timeout(PATIENCE, second.acquire(&stop))
            .await
            .expect("another hub leads")
            .expect("not stopped");
        assert!(!next.lost.is_cancelled());
        stop.cancel();
        assert!(
            first.acquire(&stop).await.is_none(),
            "a stopped hub does not wait to lead"
        );
    }

    #[tokio::test]
    async fn a_hub_hears_at_once_when_another_hub_adds_to_the_outbox() {
        use crate::clock::Timestamp;
        use crate::storage::Store;

        let db = ScratchDatabase::create().await;
        let other_hub = PgStore::connect(&db.url, PgSettings::default())
            .await
            .expect("store");
        let grew = Arc::new(Notify::new());
        let hub = leadership(&db).await;
        let listening = tokio::spawn({
            let grew = Arc::clone(&grew);
            async move { hub.listen(grew).await }
        });
        let _listening = tokio_util::task::AbortOnDropHandle::new(listening);
        // The listener connects in the background: commit until it hears one.
        let heard = tokio::time::timeout(PATIENCE, async {
            for n in 0.. {
                let device = format!("d{n}").parse().expect("id");
                other_hub
                    .register(&device, Timestamp::from_unix_millis(n), None)
                    .await
                    .expect("register");
                let wait = Duration::from_millis(200);
                if tokio::time::timeout(wait, grew.notified()).await.is_ok() {
                    return n;
                }
            }
            unreachable!()
        })
        .await;
        assert!(heard.is_ok(), "no wake-up for another hub's events");
    }
}
