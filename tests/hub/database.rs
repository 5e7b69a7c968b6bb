//! The database a hub under test runs on: a fresh SQLite file, or with
//! `--features postgres-tests` a fresh PostgreSQL database, made per test and kept
//! for as long as the test holds it (a hub restarted on it finds everything).

use std::path::{Path, PathBuf};

/// Which kind of database a test's hub uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Database {
    Sqlite,
    /// A database of its own on the server `FLEETWATCH_TEST_POSTGRES` names.
    #[cfg(feature = "postgres-tests")]
    Postgres,
}

/// A fresh, empty database; dropping it deletes it.
pub enum TestDatabase {
    Sqlite {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    #[cfg(feature = "postgres-tests")]
    Postgres(fleetwatch::storage::postgres::scratch::ScratchDatabase),
}

impl TestDatabase {
    pub async fn create(kind: Database) -> Self {
        match kind {
            Database::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                Self::Sqlite {
                    path: dir.path().join("fleetwatch.db"),
                    _dir: dir,
                }
            }
            #[cfg(feature = "postgres-tests")]
            Database::Postgres => Self::Postgres(
                fleetwatch::storage::postgres::scratch::ScratchDatabase::create().await,
            ),
        }
    }

    /// The `database.url` a hub or a store opens it with.
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
            #[cfg(feature = "postgres-tests")]
            Self::Postgres(scratch) => scratch.url.clone(),
        }
    }

    /// The file, for the tests that reach into SQLite itself (`None` on PostgreSQL).
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite { path, .. } => Some(path),
            #[cfg(feature = "postgres-tests")]
            Self::Postgres(_) => None,
        }
    }
}
