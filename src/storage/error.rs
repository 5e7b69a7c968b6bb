use crate::device::DeviceId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("device {0} not found")]
    NotFound(DeviceId),
    #[error("device {0} already exists")]
    AlreadyExists(DeviceId),
    #[error("silence {0} not found")]
    SilenceNotFound(i64),
    #[error("devices.max_devices ({0}) reached")]
    DeviceLimit(u64),
    #[error("unsupported database url {0:?} (expected sqlite://PATH or postgres://USER@HOST/DB)")]
    UnsupportedUrl(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// The database failed (as opposed to refusing a request it understood).
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            StoreError::Database(_) | StoreError::Corrupt(_) | StoreError::Migrate(_)
        )
    }
}
