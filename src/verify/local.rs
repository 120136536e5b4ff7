//! The embedded verifier: keys in a [`KeyStore`] in this process (or in Redis, with that feature).

use super::{BoxFuture, KeyFacts, Verification, Verifier, VerifyError, VerifyRequest};
use crate::key::{ApiKey, KeyFormat, PresentedKey};
use crate::store::{KeyFile, KeyStore, LoadError, Lookup, MemoryStore, Previous, StoreError, StoredKey};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[doc = include_str!("../../docs/local_verifier.md")]
#[derive(Clone)]
pub struct LocalVerifier {
    store: Arc<dyn KeyStore>,
    format: KeyFormat,
}

#[doc = include_str!("../../docs/created_key.md")]
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The plain key, to hand to its owner once. Redacted in `Debug`.
    pub key: ApiKey,
    /// What was stored.
    pub facts: Arc<KeyFacts>,
}

impl LocalVerifier {
    /// The longest grace window [`rotate`](Self::rotate) accepts: 366 days.
    pub const MAX_GRACE: Duration = Duration::from_secs(366 * 24 * 3600);

    /// A verifier over `store`, generating keys in the default `kg_` format.
    pub fn new(store: impl KeyStore) -> Self {
        Self { store: Arc::new(store), format: KeyFormat::Checksummed { prefix: "kg_".into() } }
    }

    /// A verifier over a fresh [`MemoryStore`].
    #[must_use]
    pub fn in_memory() -> Self {
        Self::new(MemoryStore::new())
    }

    /// A verifier over a [`MemoryStore`] holding the keys of a TOML key file (see
    /// [`KeyFile`] for the format).
    ///
    /// # Errors
    /// [`LoadError`] as [`KeyFile::read`].
    pub fn from_key_file(path: impl AsRef<std::path::Path>) -> Result<Self, LoadError> {
        let store = MemoryStore::new();
        for (digest, key) in KeyFile::read(path)?.keys {
            let id = key.facts.id.clone();
            // Ids are checked unique by the parser; digests are checked here.
            store
                .insert_now(digest, key)
                .map_err(|_| LoadError::new(format!("entry {id:?} holds the same key as another")))?;
        }
        Ok(Self::new(store))
    }

    /// The format of generated keys. Use the same on the layer ([`key_format`]) so that forged
    /// keys are refused before any lookup.
    ///
    /// [`key_format`]: crate::ApiKeyLayerBuilder::key_format
    #[must_use]
    pub fn with_key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// The format of generated keys.
    #[must_use]
    pub fn key_format(&self) -> &KeyFormat {
        &self.format
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Creates a key with these facts and returns the plain key, once.
    ///
    /// # Errors
    /// [`StoreError::Exists`] when the id is taken; [`StoreError::Backend`] when the store fails.
    pub async fn create(&self, facts: KeyFacts) -> Result<CreatedKey, StoreError> {
        let key = self.generate()?;
        let stored = StoredKey::new(facts);
        let facts = stored.facts.clone();
        self.store.insert(key.digest(), stored).await?;
        Ok(CreatedKey { key, facts })
    }

    /// Adds a key whose secret is already known (imported, or a fixed development key).
    ///
    /// # Errors
    /// [`StoreError::Exists`] when the id or the secret is taken; [`StoreError::Backend`] when the store fails.
    pub async fn add(&self, key: &ApiKey, facts: KeyFacts) -> Result<Arc<KeyFacts>, StoreError> {
        let stored = StoredKey::new(facts);
        let facts = stored.facts.clone();
        self.store.insert(key.digest(), stored).await?;
        Ok(facts)
    }

    /// Disables a key: it is refused (`DISABLED`) until enabled again.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown id; [`StoreError::Backend`] when the store fails.
    pub async fn disable(&self, id: &str) -> Result<(), StoreError> {
        self.update(id, None, |k, _| k.enabled = false).await
    }

    /// Enables a disabled key.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown id; [`StoreError::Backend`] when the store fails.
    pub async fn enable(&self, id: &str) -> Result<(), StoreError> {
        self.update(id, None, |k, _| k.enabled = true).await
    }

    /// Deletes a key for good: it is refused (`DELETED`).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown id; [`StoreError::Backend`] when the store fails.
    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.update(id, None, |k, _| k.deleted = true).await
    }

    /// Replaces a key's secret, keeping its id and facts. The old secret keeps working for
    /// `grace` (on every instance, whatever the store), and a request made with it carries
    /// [`VerifiedKey::grace_ends`](crate::VerifiedKey::grace_ends) so the application can warn its
    /// owner; `Duration::ZERO` stops it at once. A key rotated again in its window keeps each
    /// earlier secret until that secret's own end.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a `grace` over [`MAX_GRACE`](Self::MAX_GRACE);
    /// [`StoreError::NotFound`] for an unknown id; [`StoreError::Backend`] when the store fails or the
    /// OS random source does.
    pub async fn rotate(&self, id: &str, grace: Duration) -> Result<ApiKey, StoreError> {
        if grace > Self::MAX_GRACE {
            return Err(StoreError::Invalid(format!("a grace window of {grace:?} is longer than 366 days")));
        }
        let key = self.generate()?;
        // To the millisecond, as every store keeps it.
        let until = crate::store::unix_ms::from_ms(crate::store::unix_ms::to_ms(SystemTime::now() + grace));
        self.update(id, Some(key.digest()), |k, current| {
            if !grace.is_zero() {
                k.previous.push(Previous { digest: current, until });
            }
        })
        .await?;
        Ok(key)
    }

    /// Reads the key, changes it, and writes it back only if nobody changed it meanwhile;
    /// otherwise reads it again. Each lost race means another admin's update landed, so a bounded
    /// number of retries is only exhausted by a storm of updates to one key. Earlier secrets past
    /// their grace window are dropped on the way.
    async fn update(
        &self,
        id: &str,
        new_digest: Option<crate::key::KeyDigest>,
        change: impl Fn(&mut StoredKey, crate::key::KeyDigest),
    ) -> Result<(), StoreError> {
        const ATTEMPTS: usize = 64;
        for _ in 0..ATTEMPTS {
            let (digest, was) = self.store.find(id).await?.ok_or_else(|| StoreError::NotFound(id.into()))?;
            let mut next = was.clone();
            let now = SystemTime::now();
            next.previous.retain(|p| p.until > now);
            change(&mut next, digest);
            if self.store.replace(digest, &was, new_digest.unwrap_or(digest), next).await? {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!("key {id:?} changed under {ATTEMPTS} updates in a row; not updated")))
    }

    fn generate(&self) -> Result<ApiKey, StoreError> {
        self.format.generate().map_err(|e| StoreError::Backend(format!("OS random source: {e}")))
    }

    fn answer(stored: Option<StoredKey>) -> Verification {
        match stored {
            None => Verification::invalid(),
            Some(k) => Verification::new(k.status(), k.facts),
        }
    }
}

impl Verifier for LocalVerifier {
    fn verify_now(&self, key: &PresentedKey<'_>) -> Option<Verification> {
        match self.store.get_now(key) {
            Lookup::Found(key) => Some(Self::answer(Some(key))),
            Lookup::Absent => Some(Self::answer(None)),
            Lookup::NeedsIo => None,
        }
    }

    fn verify(&self, request: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        let lookup = self.store.get(&request.digest);
        Box::pin(async move { lookup.await.map(Self::answer).map_err(|e| VerifyError::new(e.to_string())) })
    }
}

impl fmt::Debug for LocalVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalVerifier").field("format", &self.format).finish_non_exhaustive()
    }
}
