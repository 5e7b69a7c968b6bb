//! Device identity: the one place that decides what a device id may look like.
//!
//! The id travels in MQTT topic levels, URLs and log lines, so anything that could
//! break one of those (wildcards, `/`, spaces, control characters) is refused here,
//! before it can reach the database.

use std::fmt;
use std::sync::Arc;

/// Longest accepted device id, in bytes (interface.md section 2).
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// A validated device id: `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$`.
///
/// Cheap to clone (the text is shared), because one id is carried from the subscriber
/// through the batch into events.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Arc<str>);

/// Why a string is not a device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDeviceId {
    #[error("device id is empty")]
    Empty,
    #[error("device id is longer than {MAX_DEVICE_ID_LEN} bytes")]
    TooLong,
    #[error("device id must start with a letter or digit")]
    BadFirstChar,
    #[error("device id may only contain letters, digits and _ . : -")]
    BadChar,
}

impl DeviceId {
    pub fn parse(text: &str) -> Result<Self, InvalidDeviceId> {
        validate(text)?;
        Ok(Self(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks `text` against the id grammar without allocating.
pub fn validate(text: &str) -> Result<(), InvalidDeviceId> {
    let bytes = text.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(InvalidDeviceId::Empty);
    };
    if bytes.len() > MAX_DEVICE_ID_LEN {
        return Err(InvalidDeviceId::TooLong);
    }
    if !first.is_ascii_alphanumeric() {
        return Err(InvalidDeviceId::BadFirstChar);
    }
    let valid_rest = bytes[1..]
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if valid_rest {
        Ok(())
    } else {
        Err(InvalidDeviceId::BadChar)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DeviceId {
    type Err = InvalidDeviceId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl utoipa::PartialSchema for DeviceId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"))
            .examples(["pump-7"])
            .into()
    }
}

impl utoipa::ToSchema for DeviceId {}

impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ids_the_interface_promises() {
        for id in ["pump-7", "AA:BB:CC:00:11:22", "a", "sensor_1.eu-west", "9"] {
            assert_eq!(
                DeviceId::parse(id).map(|d| d.to_string()),
                Ok(id.to_string())
            );
        }
        let longest = "a".repeat(MAX_DEVICE_ID_LEN);
        assert!(DeviceId::parse(&longest).is_ok());
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        let cases = [
            ("", InvalidDeviceId::Empty),
            ("+", InvalidDeviceId::BadFirstChar),
            ("#", InvalidDeviceId::BadFirstChar),
            ("-pump", InvalidDeviceId::BadFirstChar),
            ("a/b", InvalidDeviceId::BadChar),
            ("pump 7", InvalidDeviceId::BadChar),
            ("pump+", InvalidDeviceId::BadChar),
            ("pümp", InvalidDeviceId::BadChar),
            ("a\u{0}", InvalidDeviceId::BadChar),
        ];
        for (id, why) in cases {
            assert_eq!(DeviceId::parse(id), Err(why), "{id:?}");
        }
        let too_long = "a".repeat(MAX_DEVICE_ID_LEN + 1);
        assert_eq!(DeviceId::parse(&too_long), Err(InvalidDeviceId::TooLong));
    }
}
