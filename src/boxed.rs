//! The boxed future the traits' asynchronous halves return.

use std::future::Future;
use std::pin::Pin;

/// A boxed, `Send` future, as returned by the asynchronous halves of the traits
/// ([`Verifier::verify`](crate::Verifier::verify), [`Limiter::check`](crate::limit::Limiter::check),
/// [`KeyStore::get`](crate::store::KeyStore::get)).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
