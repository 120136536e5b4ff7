//! The one error a misconfigured layer, route table or verifier is refused with, at build time.

use std::fmt;
use std::time::Duration;

/// The longest key the layer can be set to accept ([`max_key_len`](crate::ApiKeyLayerBuilder::max_key_len)).
pub const KEY_LEN_CEILING: usize = 4096;

#[doc = include_str!("../docs/build_error.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// No key source was configured.
    NoKeySource,
    /// The same key source was configured twice.
    DuplicateKeySource(String),
    /// A query-parameter source has an empty or unusable name.
    InvalidQueryParameter(String),
    /// The key length cap is out of range.
    MaxKeyLen(usize),
    /// `unavailable_retry_after` is longer than a day.
    RetryAfter(Duration),
    /// A verifier's settings are not valid.
    Verifier(String),
    /// A route template could not be added to the table.
    Route {
        /// The template.
        template: String,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoKeySource => {
                f.write_str("no key source: configure at least one of Bearer, a header or a query parameter")
            }
            Self::DuplicateKeySource(s) => write!(f, "key source {s} is configured twice"),
            Self::InvalidQueryParameter(name) => {
                write!(f, "query parameter name {name:?} must be non-empty and free of `&=#?`")
            }
            Self::MaxKeyLen(n) => write!(f, "max_key_len is {n}; it must be between 1 and {KEY_LEN_CEILING} bytes"),
            Self::RetryAfter(d) => write!(f, "unavailable_retry_after is {d:?}; it must be at most a day"),
            Self::Route { template, reason } => write!(f, "route {template:?}: {reason}"),
            Self::Verifier(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for BuildError {}
