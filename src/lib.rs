#![cfg_attr(feature = "axum", doc = include_str!("../README.md"))]
#![cfg_attr(
    not(feature = "axum"),
    doc = "Tower middleware that gates HTTP APIs by API key. The guide (README.md) needs the `axum` feature for its examples; \
           start at [`ApiKeyLayer`]."
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod boxed;
#[cfg(feature = "oneloop")]
pub mod breaker;
mod build_error;
pub mod cache;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod connection;
mod context;
mod extract;
mod facts;
mod fnv;
mod future;
mod gate;
mod key;
mod layer;
pub mod limit;
mod lock;
pub mod observe;
#[cfg(feature = "oneloop")]
pub mod oneloop;
mod outage;
mod reject;
mod require;
mod route;
mod scope;
mod service;
pub mod store;
pub mod usage;
pub mod verify;

pub use boxed::BoxFuture;
pub use build_error::{BuildError, KEY_LEN_CEILING};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use connection::RedisConnection;
pub use context::VerifiedKey;
#[cfg(feature = "axum")]
pub use context::VerifiedKeyRejection;
pub use extract::KeySource;
pub use future::ResponseFuture;
pub use key::{
    ApiKey, Fingerprint, InvalidPrefix, InvalidSecret, KeyDigest, KeyFormat, KeySecret, ParseDigestError, PresentedKey,
    RandomnessError, Redacted,
};
pub use layer::{ApiKeyLayer, ApiKeyLayerBuilder, DEFAULT_MAX_KEY_LEN};
pub use reject::{ProblemJson, Rejection, Responder};
pub use require::{require, require_scope, RequireLayer, RequireService};
pub use route::{RoutePolicy, RouteTable, Unmapped};
pub use scope::{Action, ParseScopeError, RequiredScope, Scope};
pub use service::ApiKeyService;
pub use verify::local::CreatedKey;
pub use verify::{
    IdentityQuota, KeyFacts, KeyStatus, LocalVerifier, Verification, Verifier, VerifyError, VerifyRequest,
};
