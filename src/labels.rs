//! Labels: a device's `key: value` pairs (`site: north`, `kind: pump`), set by its
//! heartbeats (`labels`, merged key by key) and by operators (`PUT
//! /api/v1/devices/{id}/labels`, the whole set), and used to list a part of the fleet.
//!
//! Bounded so a label costs a device little and a filter reads plainly: keys are
//! letters, digits and `_ . / -` (no `:`, which separates key from value in a filter),
//! values any text without `,` (which separates filters) or control characters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most labels a device may carry.
pub const MAX_LABELS: usize = 16;
/// Longest key and value, in characters.
pub const MAX_KEY: usize = 64;
pub const MAX_VALUE: usize = 128;

/// A key, as a regular expression (the OpenAPI document states it).
const KEY_PATTERN: &str = "^[A-Za-z0-9_./-]{1,64}$";
/// A value: no `,` and no control character (Unicode's Cc, what `char::is_control`
/// means).
const VALUE_PATTERN: &str = "^[^,\\u0000-\\u001f\\u007f-\\u009f]{1,128}$";
/// The API's `label` filter: `key:value`, comma-separated.
pub const FILTER_PATTERN: &str = concat!(
    "^[A-Za-z0-9_./-]{1,64}:[^,\\u0000-\\u001f\\u007f-\\u009f]{1,128}",
    "(,[A-Za-z0-9_./-]{1,64}:[^,\\u0000-\\u001f\\u007f-\\u009f]{1,128})*$"
);

/// A device's labels, by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<String, String>);

/// The bounds, stated in the OpenAPI document so clients (and schemathesis) know them.
impl utoipa::PartialSchema for Labels {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(KEY_PATTERN)),
            ))
            .additional_properties(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(MAX_VALUE))
                    .pattern(Some(VALUE_PATTERN)),
            ))
            .max_properties(Some(MAX_LABELS))
            .examples([serde_json::json!({"site": "north", "kind": "pump"})])
            .into()
    }
}

impl utoipa::ToSchema for Labels {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("{0} labels, over the limit of {MAX_LABELS}")]
    TooMany(usize),
    #[error("label key {0:?} must be 1 to {MAX_KEY} letters, digits or `_ . / -` (no `:`)")]
    Key(String),
    #[error(
        "label {key:?}: value must be 1 to {MAX_VALUE} characters, without `,` or control characters"
    )]
    Value { key: String },
}

/// What [`KEY_PATTERN`] says.
pub fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-'))
}

/// What [`VALUE_PATTERN`] says.
fn valid_value(value: &str) -> bool {
    (1..=MAX_VALUE).contains(&value.chars().count())
        && !value.chars().any(|c| c == ',' || c.is_control())
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = LabelError;

    fn try_from(map: BTreeMap<String, String>) -> Result<Self, LabelError> {
        if map.len() > MAX_LABELS {
            return Err(LabelError::TooMany(map.len()));
        }
        for (key, value) in &map {
            if !valid_key(key) {
                return Err(LabelError::Key(key.clone()));
            }
            if !valid_value(value) {
                return Err(LabelError::Value { key: key.clone() });
            }
        }
        Ok(Self(map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(labels: Labels) -> Self {
        labels.0
    }
}

impl Labels {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Each `(key, value)`, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Sets the keys `newer` carries, keeping the others (how a heartbeat's labels
    /// apply).
    pub fn merge(&mut self, newer: Labels) {
        self.0.extend(newer.0);
    }

    /// About how much memory the labels take (a batch's bound counts it).
    pub fn approx_bytes(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len() + 48).sum()
    }

    /// Labels from `(key, value)` pairs, for tests (panics on an invalid label).
    #[cfg(test)]
    pub fn of(pairs: &[(&str, &str)]) -> Self {
        Self::try_from(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        )
        .expect("valid labels")
    }

    /// As a JSON object, the way both stores keep it.
    pub fn to_json(&self) -> String {
        // A map of strings always serializes.
        serde_json::to_string(&self.0).unwrap_or_else(|_| "{}".into())
    }
}

/// One `key:value` a listing must match (the API's `label` parameter, comma-separated
/// for several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelFilter {
    pub key: String,
    pub value: String,
}

impl LabelFilter {
    /// `site:north,kind:pump` as two filters.
    pub fn parse_list(text: &str) -> Result<Vec<LabelFilter>, String> {
        text.split(',')
            .map(|pair| {
                let (key, value) = pair
                    .split_once(':')
                    .ok_or_else(|| format!("label filter {pair:?} is not key:value"))?;
                if !valid_key(key) || !valid_value(value) {
                    return Err(format!("label filter {pair:?} is not a valid key:value"));
                }
                Ok(LabelFilter {
                    key: key.to_string(),
                    value: value.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(json: &str) -> Result<Labels, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn keys_and_values_are_bounded_and_plain() {
        assert!(labels(r#"{"site":"north","app.io/name":"pump v2"}"#).is_ok());
        for bad in [
            r#"{"":"x"}"#,
            r#"{"si:te":"x"}"#,
            r#"{"site":""}"#,
            r#"{"site":"a,b"}"#,
            r#"{"site":"a\nb"}"#,
            r#"{"site":1}"#,
        ] {
            assert!(labels(bad).is_err(), "{bad}");
        }
        let many: BTreeMap<String, String> = (0..17)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert_eq!(Labels::try_from(many), Err(LabelError::TooMany(17)));
    }

    /// The patterns the OpenAPI document states accept exactly what is parsed.
    #[test]
    fn the_documented_patterns_match_exactly_what_is_parsed() {
        let key = regex::Regex::new(KEY_PATTERN).expect("key pattern");
        let value = regex::Regex::new(VALUE_PATTERN).expect("value pattern");
        let filter = regex::Regex::new(FILTER_PATTERN).expect("filter pattern");
        let long = "x".repeat(65);
        let longer = "é".repeat(129);
        let texts = [
            "",
            "site",
            "app.io/name",
            "si:te",
            "a,b",
            "a b",
            "\u{0}",
            "\u{85}",
            "\u{7f}",
            "é",
            &long,
            &longer,
            "north:pole",
        ];
        for text in texts {
            assert_eq!(key.is_match(text), valid_key(text), "key {text:?}");
            assert_eq!(value.is_match(text), valid_value(text), "value {text:?}");
        }
        for text in [
            "site:north",
            "site:north,kind:pump",
            "site:",
            ":north",
            "site",
            "site:a,",
            "site:north:pole",
            "s i:x",
            "site:\u{1}",
        ] {
            assert_eq!(
                filter.is_match(text),
                LabelFilter::parse_list(text).is_ok(),
                "filter {text:?}"
            );
        }
    }

    #[test]
    fn a_merge_sets_the_keys_it_carries_and_keeps_the_rest() {
        let mut stored = labels(r#"{"site":"north","kind":"pump"}"#).expect("valid");
        stored.merge(labels(r#"{"site":"south","fw":"2"}"#).expect("valid"));
        assert_eq!(
            stored.to_json(),
            r#"{"fw":"2","kind":"pump","site":"south"}"#
        );
    }

    #[test]
    fn filters_are_comma_separated_key_value_pairs() {
        assert_eq!(
            LabelFilter::parse_list("site:north,kind:pump v2"),
            Ok(vec![
                LabelFilter {
                    key: "site".into(),
                    value: "north".into()
                },
                LabelFilter {
                    key: "kind".into(),
                    value: "pump v2".into()
                },
            ])
        );
        assert!(LabelFilter::parse_list("site").is_err());
        assert!(LabelFilter::parse_list("site:").is_err());
        assert!(LabelFilter::parse_list(":north").is_err());
    }
}
