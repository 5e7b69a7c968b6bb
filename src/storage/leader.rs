//! How a hub works with the others sharing its database: which one publishes the
//! outbox and delivers notifications, and how each hears the others' commits.
//!
//! Every hub sharing a database decides transitions and adds them to one outbox; one
//! of them at a time sends the outbox on (the status publisher, the notification
//! sinks), so an event is published and a notification sent by one hub, not by each.
//! When the leading hub dies, another takes over from what is not yet marked sent.
//! A takeover can repeat the few events the old leader had sent but not yet marked:
//! the same events with the same ids (delivery is at least once, as after a restart).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// A hub's time as leader. `lost` is cancelled when the hub may no longer lead (its
/// hold on the database is gone); dropping the term gives the lead up.
pub struct Term {
    pub lost: CancellationToken,
    _keeper: Option<AbortOnDropHandle<()>>,
}

impl Term {
    /// A term that lasts until dropped.
    pub fn forever() -> Self {
        Self {
            lost: CancellationToken::new(),
            _keeper: None,
        }
    }

    /// A term a task keeps: it cancels `lost` when the hold ends, and is stopped when
    /// the term is dropped.
    pub fn kept(lost: CancellationToken, keeper: tokio::task::JoinHandle<()>) -> Self {
        Self {
            lost,
            _keeper: Some(AbortOnDropHandle::new(keeper)),
        }
    }
}

#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Waits until this hub leads and returns its term, or `None` once `stop` is
    /// cancelled first.
    async fn acquire(&self, stop: &CancellationToken) -> Option<Term>;

    /// Notifies `outbox_grew` whenever any hub sharing the database commits events,
    /// this one included, until the future is dropped. A database only one hub uses
    /// never notifies: that hub's own commits say so in-process.
    async fn listen(&self, outbox_grew: Arc<Notify>);
}

/// A database only one hub uses (SQLite): that hub always leads.
pub struct Alone;

#[async_trait]
impl Leadership for Alone {
    async fn acquire(&self, stop: &CancellationToken) -> Option<Term> {
        (!stop.is_cancelled()).then(Term::forever)
    }

    async fn listen(&self, _: Arc<Notify>) {
        std::future::pending().await
    }
}
