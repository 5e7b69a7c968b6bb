//! Arbitrary messages on arbitrary topics: the misbehaving firmware a hub must survive.

use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::connection::{self, ConnectionSpec};
use crate::{BrokerUrl, SimError};

pub struct RawPublisher {
    client: AsyncClient,
    connected: watch::Receiver<bool>,
    network: JoinHandle<()>,
}

impl RawPublisher {
    pub async fn connect(url: &BrokerUrl, client_id: &str) -> Result<Self, SimError> {
        let connection::Connected {
            client,
            connected,
            network,
        } = connection::connect(
            ConnectionSpec {
                url,
                client_id: client_id.to_string(),
                will_for: None,
                keep_alive: Duration::from_secs(30),
                inflight: 100,
                capacity: 64,
            },
            Duration::from_secs(10),
        )
        .await?;
        Ok(Self {
            client,
            connected,
            network,
        })
    }

    /// Queues one message (QoS 1, not retained) and returns once the client took it.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> Result<(), SimError> {
        self.publish_with(topic, payload, false).await
    }

    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
    ) -> Result<(), SimError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await?;
        Ok(())
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }
}

impl Drop for RawPublisher {
    fn drop(&mut self) {
        self.network.abort();
    }
}
