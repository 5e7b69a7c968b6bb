//! From a received message to a committed status change.
//!
//! [`payload`] turns bytes into a [`Heartbeat`] or a [`RejectReason`]; [`Inbound`] is
//! what the MQTT subscriber and the HTTP endpoint hand to the [`HeartbeatHandler`] over
//! a bounded queue; the handler coalesces what arrives between flushes in a
//! [`Batch`](crate::update::Batch) and commits it.

pub mod handler;
pub mod payload;
mod reject;

use tokio::sync::oneshot;

use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::registration::Refusal;
use crate::update::Heartbeat;
pub use handler::{FlushError, FlushHandle, HeartbeatHandler, Limits, Unsaved};
pub use payload::PayloadError;
pub(crate) use payload::Wire as HeartbeatPayload;
pub use reject::{RejectLog, RejectReason};

/// What became of a heartbeat whose sender waits to hear (HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed; `registered`: it made the device known.
    Committed { registered: bool },
    /// The device is unknown and the registration policy refused it; for a rate
    /// limit, when a registration will be allowed again.
    Refused(Refusal, Option<std::time::Duration>),
}

/// Answers an HTTP heartbeat once its batch is committed (or failed).
pub type Receipt = oneshot::Sender<Result<Outcome, FlushError>>;

/// A message for the heartbeat handler, in the order it was received.
#[derive(Debug)]
pub enum Inbound {
    /// A valid heartbeat, stamped with the hub's clock at receipt. Boxed: the queue
    /// holds thousands of messages, most of them much smaller than a full report.
    Heartbeat {
        device: DeviceId,
        at: Timestamp,
        heartbeat: Box<Heartbeat>,
        /// Answered once the heartbeat is committed (HTTP heartbeats wait for it).
        receipt: Option<Receipt>,
    },
    /// The broker published the device's Last Will.
    ConnectionLost { device: DeviceId, at: Timestamp },
    /// Commit everything queued before this message, then answer.
    Flush {
        reply: oneshot::Sender<Result<(), FlushError>>,
    },
}
