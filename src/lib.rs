#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod body;
#[cfg(feature = "oneloop")]
pub mod breaker;
pub mod cache;
mod context;
mod extract;
mod future;
mod gate;
mod key;
mod layer;
pub mod limit;
mod outage;
mod reject;
mod scope;
mod service;
pub mod store;
pub mod usage;
pub mod verify;

pub use body::ResponseBody;
pub use context::VerifiedKey;
#[cfg(feature = "axum")]
pub use context::VerifiedKeyRejection;
pub use extract::KeySource;
pub use future::ResponseFuture;
pub use key::{
    ApiKey, Fingerprint, InvalidPrefix, InvalidSecret, KeyDigest, KeyFormat, KeySecret, ParseDigestError, PresentedKey,
    Redacted,
};
pub use layer::{ApiKeyLayer, ApiKeyLayerBuilder, BuildError, DEFAULT_MAX_KEY_LEN, MAX_MAX_KEY_LEN};
pub use reject::{ProblemJson, Rejection, Responder};
pub use scope::{
    require, require_scope, Action, ParseScopeError, RequireLayer, RequireService, RequiredScope, RoutePolicy, Scope,
    ScopeMap, Unmapped,
};
pub use service::ApiKeyService;
pub use verify::local::CreatedKey;
pub use verify::{KeyFacts, KeyStatus, LocalVerifier, Verification, Verifier, VerifyError, VerifyRequest};
