//! The HTTP server: hyper's HTTP/1 connection with its header-read timeout, a cap on
//! open connections, and a graceful stop.
//!
//! `axum::serve` has neither a header timeout nor a connection cap: 1,100 clients that
//! sent half a request each, under a 1,024 file limit, took every file descriptor and
//! with them the database and the embedded broker. Here a connection is accepted only
//! with a permit (so the rest wait in the kernel's backlog, costing no descriptor of
//! ours), and hyper closes one that has not sent a whole request head within
//! `header_timeout`, which also bounds how long an idle keep-alive connection is kept.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Connections the kernel completes and queues for us while every permit is taken.
/// The standard library's (and mio's) 128 overflows under a burst, and a client whose
/// handshake overflows waits for SYN retransmits (1 s, 3 s, 7 s, 15 s) instead of its
/// turn in the queue.
const BACKLOG: u32 = 1024;
/// After the stop: how long requests in flight may take to finish.
const DRAIN: Duration = Duration::from_secs(5);
/// After a failed accept (out of file descriptors, say), before trying again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Binds `addr` for [`serve`], with a listen backlog of [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// What the server lets clients hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// A connection that has not sent a complete request head this long after it
    /// opened, or after its previous response, is closed.
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in
/// flight finish (for up to [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut accept_errors = AcceptErrors::default();
    // Every connection's task, so the ones still open after the drain (a client that
    // stopped reading a response blocks its connection for good) can be ended: each
    // holds a clone of the router and with it the heartbeat queue.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_errors.record(&e);
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        // Small responses go out at once instead of waiting for Nagle.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            // A client that hangs up or times out is its own business.
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "HTTP connections still open after {DRAIN:?}; closing them"
        );
    }
    connections.shutdown().await;
    Ok(())
}

/// Accept failures are logged once a minute at most: when descriptors run out they
/// come in a tight loop.
#[derive(Default)]
struct AcceptErrors {
    logged_at: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    const EVERY: Duration = Duration::from_secs(60);

    fn record(&mut self, error: &io::Error) {
        if self.logged_at.is_some_and(|at| at.elapsed() < Self::EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            error = %error,
            suppressed = self.suppressed,
            open_files = %crate::open_files::describe_usage(),
            "the HTTP server could not accept a connection"
        );
        self.logged_at = Some(Instant::now());
        self.suppressed = 0;
    }
}
