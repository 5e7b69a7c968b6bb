//! A real HTTP receiver on loopback for the notification tests: it records every
//! request and answers with whatever status the test sets, and can be stopped (the
//! port then refuses connections) and started again on the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use tokio::task::JoinHandle;

use crate::helpers::{PATIENCE, eventually};

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The status it was answered with.
    pub answered: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// Decides each answer: the status and the body.
type Answer = Box<dyn Fn(&Received) -> (u16, String) + Send + Sync>;

#[derive(Clone)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    shared: Shared,
    server: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on a free loopback port and answers 200 `{"ok":true}`.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a receiver");
        let addr = listener.local_addr().expect("addr");
        let shared = Shared {
            received: Arc::default(),
            answer: Arc::new(Mutex::new(Box::new(|_| (200, r#"{"ok":true}"#.into())))),
        };
        let server = Some(serve(listener, shared.clone()));
        Self {
            addr,
            shared,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers every request with `status` from now on.
    pub fn answer(&self, status: u16) {
        self.answer_with(move |_| (status, format!("{{\"status\":{status}}}")));
    }

    pub fn answer_with(&self, answer: impl Fn(&Received) -> (u16, String) + Send + Sync + 'static) {
        *self.shared.answer.lock().expect("lock") = Box::new(answer);
    }

    /// Stops listening: connections are refused until [`Receiver::restart`].
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("bind the receiver's port again");
        self.server = Some(serve(listener, self.shared.clone()));
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("lock").clone()
    }

    /// The requests it answered with a success.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .collect()
    }

    /// Waits until `count` requests were accepted.
    pub async fn wait_for_accepted(&self, count: usize, limit: Duration) {
        eventually(limit, &format!("{count} accepted requests"), || async {
            self.accepted().len() >= count
        })
        .await;
    }

    pub async fn wait_for_requests(&self, count: usize) {
        eventually(PATIENCE, &format!("{count} requests"), || async {
            self.received().len() >= count
        })
        .await;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: tokio::net::TcpListener, shared: Shared) -> JoinHandle<()> {
    let app = axum::Router::new().fallback(record).with_state(shared);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

async fn record(
    State(shared): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let mut received = Received {
        path: uri.path().to_string(),
        headers,
        body,
        answered: 0,
    };
    let (status, body) = (shared.answer.lock().expect("lock"))(&received);
    received.answered = status;
    shared.received.lock().expect("lock").push(received);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body,
    )
}
