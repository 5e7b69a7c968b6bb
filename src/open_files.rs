//! The process's open-file limit: every HTTP client, every device on the embedded
//! broker and every database file takes a descriptor, and running out of them breaks
//! all three at once. At start the soft limit is raised to the hard one (as Go's
//! runtime does; nothing here uses `select(2)`), and the HTTP connection cap is fitted
//! inside what is left, so no number of HTTP clients can starve the database or the
//! broker.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept for the hub itself: database files, its own MQTT connections and
/// probes, the listeners, the runtime.
pub const RESERVE: u64 = 128;

/// How the open-file limit is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The soft limit in force.
    pub limit: u64,
    /// HTTP connections allowed at once.
    pub http_connections: usize,
    /// Descriptors left for devices on the embedded broker (`None`: external broker).
    pub devices: Option<u64>,
    /// Set when the configured HTTP cap did not fit and was lowered.
    pub lowered_from: Option<usize>,
}

/// Raises the soft open-file limit to the hard one; returns the limit in force.
pub fn raise_limit() -> u64 {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if let Some(current) = current
        && maximum.is_none_or(|max| max > current)
    {
        let raised = Rlimit {
            current: maximum,
            maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_err() {
            return current;
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Shares `limit` descriptors: [`RESERVE`] for the hub; with the embedded broker, at
/// most half of the rest for HTTP and the other half for device connections; with an
/// external broker, the rest for HTTP.
pub fn budget(limit: u64, http_configured: usize, embedded_broker: bool) -> Budget {
    let spare = limit.saturating_sub(RESERVE);
    let http_room = if embedded_broker { spare / 2 } else { spare };
    let http_room = usize::try_from(http_room).unwrap_or(usize::MAX).max(1);
    let http_connections = http_configured.min(http_room);
    Budget {
        limit,
        http_connections,
        devices: embedded_broker.then(|| spare.saturating_sub(http_connections as u64)),
        lowered_from: (http_connections < http_configured).then_some(http_configured),
    }
}

/// Descriptors open now, if `/proc` says.
pub fn in_use() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count())
}

/// "812 of 1024 open files", or as much of it as is known.
pub fn describe_usage() -> String {
    let limit = getrlimit(Resource::Nofile)
        .current
        .map_or_else(|| "unlimited".to_string(), |l| l.to_string());
    match in_use() {
        Some(used) => format!("{used} of {limit} open files"),
        None => format!("open-file limit {limit}"),
    }
}

/// True when the process is within a few descriptors of its limit: the likely cause
/// of any failure to open a connection or a file.
pub fn nearly_exhausted() -> bool {
    let listing = std::fs::read_dir("/proc/self/fd").map(|dir| dir.count());
    exhausted(listing, getrlimit(Resource::Nofile).current)
}

/// [`nearly_exhausted`] on a listing of `/proc/self/fd`: when there is no descriptor
/// left, opening that listing fails too, and that failure is the answer.
fn exhausted(listing: std::io::Result<usize>, limit: Option<u64>) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    match (listing, limit) {
        (Err(e), _) => matches!(e.raw_os_error(), Some(EMFILE | ENFILE)),
        (Ok(used), Some(limit)) => used as u64 + 16 >= limit,
        (Ok(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_broker_keeps_half_of_what_the_hub_does_not_need() {
        let budget = budget(1024, 1024, true);
        assert_eq!(budget.http_connections, 448);
        assert_eq!(budget.devices, Some(448));
        assert_eq!(budget.lowered_from, Some(1024));
    }

    #[test]
    fn a_cap_that_fits_is_kept() {
        let budget = budget(1_048_576, 1024, true);
        assert_eq!(budget.http_connections, 1024);
        assert_eq!(budget.lowered_from, None);
        assert_eq!(budget.devices, Some(1_048_576 - RESERVE - 1024));
        let external = super::budget(1024, 2000, false);
        assert_eq!((external.http_connections, external.devices), (896, None));
    }

    #[test]
    fn a_tiny_limit_still_serves_one_connection() {
        assert_eq!(budget(10, 1024, true).http_connections, 1);
    }

    #[test]
    fn no_descriptor_left_to_look_is_exhaustion() {
        let emfile = std::io::Error::from_raw_os_error(24);
        assert!(exhausted(Err(emfile), Some(1024)));
        let other = std::io::Error::from_raw_os_error(2);
        assert!(!exhausted(Err(other), Some(1024)));
        assert!(exhausted(Ok(1010), Some(1024)));
        assert!(!exhausted(Ok(500), Some(1024)));
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_limit();
        assert_eq!(Some(limit), getrlimit(Resource::Nofile).current);
        assert!(describe_usage().contains(&limit.to_string()));
    }
}
