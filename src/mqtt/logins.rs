//! Who the embedded broker lets in when `mqtt.require_login` is on: a device as
//! itself (client id = username = a registered device id, with the secret
//! `POST /api/v1/devices/{id}/credentials` gave it), or one of the hub's own
//! connections (client ids `{mqtt.client_id}-{role}`, with a secret made at each start
//! that never leaves the process).
//!
//! rumqttd awaits the check in the task of the connection that sent CONNECT, on the
//! broker's own single-threaded runtime, before the router hears of the connection:
//! a slow check delays that one client, not the router. The database lookup itself
//! runs on the hub's runtime (the store's connection pool belongs to it), at most
//! [`CONCURRENT_LOOKUPS`] at a time and for at most [`LOOKUP_TIMEOUT`], so a fleet
//! reconnecting at once cannot take the pool from heartbeat commits, and a database
//! that is down refuses logins (devices retry) rather than holding connections open.
//!
//! What this cannot do: rumqttd 0.20 has no per-topic authorisation, so a device that
//! has logged in may publish on any topic, including another device's heartbeat and
//! Will. The README's "Choosing a broker" says so and recommends Mosquitto (password
//! file and ACL) for devices that are not trusted.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use crate::credentials::CredentialHash;
use crate::device::DeviceId;
use crate::storage::Store;

/// Credential lookups in flight at once: a fraction of the smallest pool (SQLite's 4
/// connections). One lookup is a primary-key read, so this still admits thousands of
/// logins a second.
pub const CONCURRENT_LOOKUPS: usize = 2;
/// Longest a login waits for its lookup (queueing included) before it is refused.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The hub's own login to its embedded broker: username `{prefix}`, a random
/// password made at each start, accepted only for client ids `{prefix}-…`. A device
/// cannot take one of those client ids (and so cannot take over one of the hub's
/// connections), whatever credential it holds.
#[derive(Clone)]
pub struct HubLogin {
    prefix: String,
    secret: String,
}

impl HubLogin {
    /// A new login for the hub whose client ids start with `prefix`.
    pub fn generate(prefix: &str) -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(Self {
            prefix: prefix.to_string(),
            secret: URL_SAFE_NO_PAD.encode(bytes),
        })
    }

    /// The username and password the hub's clients connect with.
    pub fn credentials(&self) -> (String, String) {
        (self.prefix.clone(), self.secret.clone())
    }

    /// Whether `client_id` is in the hub's namespace, `{prefix}-…`.
    fn owns(&self, client_id: &str) -> bool {
        client_id
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.starts_with('-'))
    }

    fn accepts(&self, username: &str, password: &str) -> bool {
        let secret: bool = password.as_bytes().ct_eq(self.secret.as_bytes()).into();
        username == self.prefix && secret
    }
}

impl fmt::Debug for HubLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubLogin")
            .field("prefix", &self.prefix)
            .field("secret", &"***")
            .finish()
    }
}

/// Why a CONNECT was refused (logged at debug with the client id; never the password).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("a client id reserved for the hub's own connections, without the hub's secret")]
    NotTheHub,
    #[error("the client id differs from the username")]
    ClientIdNotUsername,
    #[error("the username is not a valid device id")]
    NotADeviceId,
    #[error("no such device, or it has no credential")]
    NoCredential,
    #[error("wrong secret")]
    WrongSecret,
    #[error("the credential could not be read in time")]
    Unavailable,
}

/// The embedded broker's login check.
#[derive(Clone)]
pub struct Logins {
    hub: HubLogin,
    store: Arc<dyn Store>,
    /// The hub's runtime, where lookups run.
    runtime: Handle,
    lookups: Arc<Semaphore>,
}

impl Logins {
    /// Must be called on the hub's runtime: lookups are run there.
    pub fn new(hub: HubLogin, store: Arc<dyn Store>) -> Self {
        Self {
            hub,
            store,
            runtime: Handle::current(),
            lookups: Arc::new(Semaphore::new(CONCURRENT_LOOKUPS)),
        }
    }

    /// rumqttd's auth handler: whether to let this CONNECT in.
    pub async fn check(self, client_id: String, username: String, password: String) -> bool {
        match self.admit(&client_id, &username, &password).await {
            Ok(()) => true,
            Err(why) => {
                tracing::debug!(?client_id, reason = %why, "embedded broker refused a login");
                false
            }
        }
    }

    async fn admit(&self, client_id: &str, username: &str, password: &str) -> Result<(), Refused> {
        if self.hub.owns(client_id) {
            return if self.hub.accepts(username, password) {
                Ok(())
            } else {
                Err(Refused::NotTheHub)
            };
        }
        if username != client_id {
            return Err(Refused::ClientIdNotUsername);
        }
        let id = DeviceId::parse(username).map_err(|_| Refused::NotADeviceId)?;
        match self.lookup(id).await? {
            Some(stored) if stored.verify(password.as_bytes()) => Ok(()),
            Some(_) => Err(Refused::WrongSecret),
            None => Err(Refused::NoCredential),
        }
    }

    async fn lookup(&self, id: DeviceId) -> Result<Option<CredentialHash>, Refused> {
        let store = Arc::clone(&self.store);
        let lookups = Arc::clone(&self.lookups);
        let lookup = self.runtime.spawn(async move {
            tokio::time::timeout(LOOKUP_TIMEOUT, async {
                let _permit = lookups.acquire().await.ok()?;
                match store.credential(&id).await {
                    Ok(found) => Some(found),
                    Err(e) => {
                        tracing::warn!(device_id = %id, error = %e, "could not read a device's credential; its login is refused");
                        None
                    }
                }
            })
            .await
            .ok()
            .flatten()
        });
        // An error here: the hub's runtime is shutting down.
        lookup.await.ok().flatten().ok_or(Refused::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::credentials::DeviceSecret;

    async fn logins() -> (Logins, HubLogin, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let store = crate::storage::connect(&url).await.expect("store");
        let id = DeviceId::parse("pump-7").expect("id");
        store
            .register(&id, Timestamp::from_unix_millis(1), None)
            .await
            .expect("register");
        let secret = DeviceSecret::generate().expect("rng");
        store
            .set_credential(&id, &secret.hash().expect("rng"))
            .await
            .expect("set");
        let hub = HubLogin::generate("hub").expect("rng");
        (
            Logins::new(hub.clone(), store),
            hub,
            secret.expose().to_string(),
            dir,
        )
    }

    #[tokio::test]
    async fn a_device_logs_in_as_itself_with_its_secret_only() {
        let (logins, _, secret, _dir) = logins().await;
        assert_eq!(logins.admit("pump-7", "pump-7", &secret).await, Ok(()));
        assert_eq!(
            logins.admit("pump-7", "pump-7", "guess").await,
            Err(Refused::WrongSecret)
        );
        assert_eq!(
            logins.admit("pump-8", "pump-7", &secret).await,
            Err(Refused::ClientIdNotUsername)
        );
        assert_eq!(
            logins.admit("pump-8", "pump-8", &secret).await,
            Err(Refused::NoCredential)
        );
        assert_eq!(
            logins.admit("a/b", "a/b", &secret).await,
            Err(Refused::NotADeviceId)
        );
    }

    #[tokio::test]
    async fn the_hubs_client_ids_take_only_the_hubs_secret() {
        let (logins, hub, secret, _dir) = logins().await;
        let (user, password) = hub.credentials();
        assert_eq!(logins.admit("hub-ingest", &user, &password).await, Ok(()));
        assert_eq!(logins.admit("hub-probe", &user, &password).await, Ok(()));
        // A device's secret does not open the hub's ids, nor the hub's a device's.
        assert_eq!(
            logins.admit("hub-ingest", "hub-ingest", &secret).await,
            Err(Refused::NotTheHub)
        );
        assert_eq!(
            logins.admit("hub-ingest", &user, "guess").await,
            Err(Refused::NotTheHub)
        );
        assert_eq!(
            logins.admit("pump-7", &user, &password).await,
            Err(Refused::ClientIdNotUsername)
        );
        assert!(!hub.owns("hub"), "only {{prefix}}-…");
        assert!(!hub.owns("hubx-ingest"));
        assert!(!format!("{hub:?}").contains(&password));
    }
}
