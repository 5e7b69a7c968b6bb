//! Which hub publishes the outbox and delivers notifications.
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
    _keepers: Vec<AbortOnDropHandle<()>>,
}

impl Term {
    /// A term that lasts until dropped.
    pub fn forever() -> Self {
        Self {
            lost: CancellationToken::new(),
            _keepers: Vec::new(),
        }
    }

    /// A term tasks keep (one cancels `lost` when the hold ends); they are stopped
    /// when the term is dropped.
    pub fn kept(lost: CancellationToken, keepers: Vec<tokio::task::JoinHandle<()>>) -> Self {
        Self {
            lost,
            _keepers: keepers.into_iter().map(AbortOnDropHandle::new).collect(),
        }
    }
}

#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Waits until this hub leads and returns its term, or `None` once `stop` is
    /// cancelled first. During the term, `outbox_grew` is notified when another hub
    /// adds to the outbox (this hub's own writes notify it in-process).
    async fn acquire(&self, stop: &CancellationToken, outbox_grew: &Arc<Notify>) -> Option<Term>;
}

/// A database only one hub uses (SQLite): that hub always leads.
pub struct Alone;

#[async_trait]
impl Leadership for Alone {
    async fn acquire(&self, stop: &CancellationToken, _: &Arc<Notify>) -> Option<Term> {
        (!stop.is_cancelled()).then(Term::forever)
    }
}
