//! The key as a secret: [`ApiKey`], its [`KeyDigest`], the [`KeyFormat`] check and key generation.
//!
//! The raw key exists only between extraction and hashing. Everything after that works on the
//! SHA-256 digest (caches, stores, limiters) and on the key id.

use sha2::{Digest as _, Sha256};
use std::fmt;

#[doc = include_str!("../docs/api_key.md")]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ApiKey(Box<str>);

impl ApiKey {
    /// Wraps a raw key.
    pub fn new(key: impl Into<Box<str>>) -> Self {
        Self(key.into())
    }

    /// The raw key. Call this only to hand the key to a verifier or to show it once to its owner.
    #[must_use]
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The SHA-256 digest of the key: what caches and stores keep instead of the key.
    #[must_use]
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(&self.0)
    }

    /// A prefix that is safe to log: at most 4 characters and at most a quarter of the key.
    #[must_use]
    pub fn redacted(&self) -> Redacted<'_> {
        Redacted(&self.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey(\"{}\")", self.redacted())
    }
}

#[doc = include_str!("../docs/redacted.md")]
#[derive(Clone, Copy)]
pub struct Redacted<'a>(&'a str);

impl<'a> Redacted<'a> {
    /// Redacts a raw key held as a string.
    #[must_use]
    pub fn of(key: &'a str) -> Self {
        Self(key)
    }
}

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = (self.0.len() / 4).min(4);
        // Keys are visible ASCII by the time they are redacted, but stay safe on any input.
        let cut = (0..=shown).rev().find(|&i| self.0.is_char_boundary(i)).unwrap_or(0);
        write!(f, "{}…", &self.0[..cut])
    }
}

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[doc = include_str!("../docs/key_digest.md")]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Hashes a raw key.
    #[must_use]
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// The digest's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a digest from its bytes.
    #[must_use]
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's first 8 bytes: uniformly random, as all of SHA-256's output is, so they index
    /// a table without hashing again; distinct keys share them with odds of 1 in 2^64 per pair.
    pub(crate) fn prefix(&self) -> u64 {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        u64::from_le_bytes([a, b, c, d, e, f, g, h])
    }
}

/// Hashed as its first 8 bytes, one word: SHA-256 output is uniform, so the rest adds nothing a
/// table can use, and keygate's tables keyed by digests take that word as it is.
impl std::hash::Hash for KeyDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.prefix());
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({:02x}{:02x}{:02x}{:02x}…)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

#[doc = include_str!("../docs/parse_digest_error.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseDigestError;

impl fmt::Display for ParseDigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key digest is `sha256:` followed by 64 hex digits")
    }
}

impl std::error::Error for ParseDigestError {}

impl std::str::FromStr for KeyDigest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("sha256:").ok_or(ParseDigestError)?.as_bytes();
        if hex.len() != 64 {
            return Err(ParseDigestError);
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8).ok_or(ParseDigestError);
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Ok(Self(out))
    }
}

#[doc = include_str!("../docs/fingerprint.md")]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fingerprint(
    // Two words, not a `u128`: 8-byte aligned, so a table slot of a fingerprint and a pointer is
    // 24 bytes, not 32.
    [u64; 2],
);

impl Fingerprint {
    /// The fingerprint of a raw key.
    pub fn of(key: &str) -> Self {
        use siphasher::sip128::Hasher128;
        use std::hash::{BuildHasher, Hasher};
        // One keyed 128-bit SipHash-1-3 pass (two 64-bit passes cost twice as much); its key is
        // drawn from the OS once per process, by way of std's `RandomState`.
        static KEY: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
        let &(k0, k1) = KEY.get_or_init(|| {
            let state = std::collections::hash_map::RandomState::new();
            (state.hash_one(0_u8), state.hash_one(1_u8))
        });
        let mut hasher = siphasher::sip128::SipHasher13::new_with_keys(k0, k1);
        hasher.write(key.as_bytes());
        let hash = hasher.finish128();
        Self([hash.h1, hash.h2])
    }
}

/// Hashed as one `u128`: an array would also hash its length, one more round of the cache's SipHash.
impl std::hash::Hash for Fingerprint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from(self.0[0]) | u128::from(self.0[1]) << 64);
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:08x}…)", (self.0[1] >> 32) as u32)
    }
}

#[doc = include_str!("../docs/presented_key.md")]
pub struct PresentedKey<'a> {
    raw: &'a str,
    digest: std::cell::OnceCell<KeyDigest>,
    fingerprint: std::cell::OnceCell<Fingerprint>,
}

impl<'a> PresentedKey<'a> {
    /// Wraps a raw key.
    #[must_use]
    pub fn new(raw: &'a str) -> Self {
        Self { raw, digest: Default::default(), fingerprint: Default::default() }
    }

    /// Its SHA-256 digest, computed once.
    pub fn digest(&self) -> &KeyDigest {
        self.digest.get_or_init(|| KeyDigest::of(self.raw))
    }

    /// Its fingerprint, computed once.
    pub fn fingerprint(&self) -> Fingerprint {
        *self.fingerprint.get_or_init(|| Fingerprint::of(self.raw))
    }

    /// A loggable prefix.
    pub fn redacted(&self) -> Redacted<'a> {
        Redacted(self.raw)
    }

    pub(crate) fn to_owned_key(&self) -> ApiKey {
        ApiKey::new(self.raw)
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKey(\"{}\")", self.redacted())
    }
}

/// A `Hasher` for keys that are uniform already (fingerprints, SHA-256 digests, which hash as one
/// word): it takes that word instead of hashing it again.
#[derive(Default, Clone, Copy)]
pub(crate) struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by the keys above; any other key is folded in, a byte at a time.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }

    fn write_usize(&mut self, _: usize) {}
}

/// Tables keyed by digests or fingerprints.
pub(crate) type UniformState = std::hash::BuildHasherDefault<PassThrough>;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 22 base62 characters carry 130 bits, above the 128-bit floor.
const RANDOM_LEN: usize = 22;
/// 6 base62 characters hold a CRC-32 (62^6 > 2^32).
const CHECKSUM_LEN: usize = 6;
/// 11 base62 characters hold a 64-bit tag (62^11 > 2^64).
const TAG_LEN: usize = 11;

#[doc = include_str!("../docs/key_format.md")]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyFormat {
    /// Any non-empty visible-ASCII key (the extraction rules still apply). The default, because a
    /// remote verifier's keys may have any shape.
    #[default]
    Any,
    /// keygate's generated keys: `prefix`, 22 base62 characters of OS randomness (130 bits), and a
    /// 6-character base62 CRC-32 of the two.
    Checksummed {
        /// The fixed prefix, such as `kg_`.
        prefix: Box<str>,
    },
    /// `prefix`, 22 base62 characters of OS randomness, and an 11-character base62 tag: SipHash-2-4
    /// of the two under a 128-bit [`KeySecret`] (a keyed PRF made for short inputs; a software
    /// HMAC-SHA256 would cost more than the whole gate on CPUs without SHA extensions).
    Keyed {
        /// The fixed prefix, such as `kg_`.
        prefix: Box<str>,
        /// The first makes new keys; all are accepted (rotation: new first, then the old).
        secrets: std::sync::Arc<[KeySecret]>,
    },
}

#[doc = include_str!("../docs/key_secret.md")]
#[derive(Clone, PartialEq, Eq)]
pub struct KeySecret([u8; 16]);

impl KeySecret {
    /// From at least 16 bytes of secret; longer secrets (a passphrase, a 32-byte key) are
    /// condensed with SHA-256.
    ///
    /// # Errors
    /// [`InvalidSecret`] for fewer than 16 bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, InvalidSecret> {
        use sha2::Digest;
        match bytes.len() {
            0..=15 => Err(InvalidSecret),
            16 => Ok(Self(first_16(bytes))),
            _ => Ok(Self(first_16(&sha2::Sha256::digest(bytes)))),
        }
    }

    /// A new secret from the OS random source.
    ///
    /// # Errors
    /// When the OS random source fails.
    pub fn generate() -> Result<Self, RandomnessError> {
        let mut bytes = [0u8; 16];
        fill_random(&mut bytes)?;
        Ok(Self(bytes))
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        use std::hash::Hasher;
        let mut h = siphasher::sip::SipHasher24::new_with_key(&self.0);
        h.write(body);
        base62_fixed::<TAG_LEN>(h.finish())
    }
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySecret(…)")
    }
}

#[doc = include_str!("../docs/invalid_secret.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSecret;

impl fmt::Display for InvalidSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key secret is at least 16 bytes")
    }
}

impl std::error::Error for InvalidSecret {}

#[doc = include_str!("../docs/invalid_prefix.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPrefix;

impl fmt::Display for InvalidPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key prefix is 1 to 16 characters of [A-Za-z0-9_-], and a keyed format has a secret")
    }
}

impl std::error::Error for InvalidPrefix {}

fn prefix_ok(prefix: &str) -> bool {
    (1..=16).contains(&prefix.len()) && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `rest` is `n` base62 characters.
fn base62_of_len(rest: &str, n: usize) -> bool {
    rest.len() == n && rest.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl KeyFormat {
    /// Generated keys with this prefix, checked by CRC-32.
    ///
    /// # Errors
    /// [`InvalidPrefix`] for a prefix that is not 1 to 16 characters of `[A-Za-z0-9_-]`.
    pub fn checksummed(prefix: &str) -> Result<Self, InvalidPrefix> {
        prefix_ok(prefix).then(|| Self::Checksummed { prefix: prefix.into() }).ok_or(InvalidPrefix)
    }

    /// Generated keys with this prefix, tagged under `secrets`: the first makes new keys, all are
    /// accepted. To rotate: list the new secret first and the old after it until the old keys are
    /// replaced, then drop the old one.
    ///
    /// # Errors
    /// [`InvalidPrefix`] for a bad prefix or no secret.
    pub fn keyed(prefix: &str, secrets: impl IntoIterator<Item = KeySecret>) -> Result<Self, InvalidPrefix> {
        let secrets: std::sync::Arc<[KeySecret]> = secrets.into_iter().collect();
        (prefix_ok(prefix) && !secrets.is_empty())
            .then(|| Self::Keyed { prefix: prefix.into(), secrets })
            .ok_or(InvalidPrefix)
    }

    /// Whether a presented key has this format. Cheap: no allocation; one CRC-32, or one SipHash per
    /// secret listed.
    #[must_use]
    pub fn accepts(&self, key: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Checksummed { prefix } => {
                let Some(rest) = key.strip_prefix(&**prefix) else { return false };
                if !base62_of_len(rest, RANDOM_LEN + CHECKSUM_LEN) {
                    return false;
                }
                let (body, sum) = key.split_at(key.len() - CHECKSUM_LEN);
                sum.as_bytes() == base62_fixed::<CHECKSUM_LEN>(crc32(body.as_bytes()) as u64)
            }
            Self::Keyed { prefix, secrets } => {
                let Some(rest) = key.strip_prefix(&**prefix) else { return false };
                if !base62_of_len(rest, RANDOM_LEN + TAG_LEN) {
                    return false;
                }
                let (body, tag) = key.split_at(key.len() - TAG_LEN);
                secrets.iter().any(|s| s.tag(body.as_bytes()) == tag.as_bytes())
            }
        }
    }

    /// Generates a new key of this format from the OS random source.
    ///
    /// [`KeyFormat::Any`] generates keys of the default `kg_` format.
    ///
    /// # Errors
    /// When the OS random source fails.
    pub fn generate(&self) -> Result<ApiKey, RandomnessError> {
        let prefix = match self {
            Self::Any => "kg_",
            Self::Checksummed { prefix } | Self::Keyed { prefix, .. } => prefix,
        };
        let mut random = [0u8; RANDOM_LEN];
        fill_random(&mut random)?;
        let mut key = String::with_capacity(prefix.len() + RANDOM_LEN + TAG_LEN);
        key.push_str(prefix);
        // 256 % 62 != 0, so plain `b % 62` is biased; rejection sampling keeps every symbol equally
        // likely. Refill the rejected bytes until all are usable.
        for slot in random.iter_mut() {
            while *slot >= 248 {
                let mut b = [0u8; 1];
                fill_random(&mut b)?;
                *slot = b[0];
            }
            key.push(BASE62[(*slot % 62) as usize] as char);
        }
        match self {
            Self::Keyed { secrets, .. } => {
                let tag = secrets[0].tag(key.as_bytes());
                key.extend(tag.iter().map(|&b| b as char));
            }
            _ => {
                let sum = base62_fixed::<CHECKSUM_LEN>(crc32(key.as_bytes()) as u64);
                key.extend(sum.iter().map(|&b| b as char));
            }
        }
        Ok(ApiKey::new(key))
    }
}

fn base62_fixed<const N: usize>(mut n: u64) -> [u8; N] {
    let mut out = [b'0'; N];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE): catches every typo of up to 32 bits; not a MAC, the randomness is the secret.
fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| CRC_TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn every_single_character_typo_is_rejected() {
        let format = KeyFormat::checksummed("kg_").unwrap();
        let key = format.generate().unwrap();
        let key = key.expose_secret();
        for i in 3..key.len() {
            for &c in BASE62.iter() {
                if key.as_bytes()[i] == c {
                    continue;
                }
                let mut typo = key.as_bytes().to_vec();
                typo[i] = c;
                assert!(!format.accepts(std::str::from_utf8(&typo).unwrap()));
            }
        }
    }

    #[test]
    fn redaction_never_shows_more_than_a_quarter() {
        assert_eq!(Redacted::of("abc").to_string(), "…");
        assert_eq!(Redacted::of("abcdefgh").to_string(), "ab…");
        assert_eq!(Redacted::of("kg_abcdefghijklmnopqrstuvwxyz").to_string(), "kg_a…");
        assert_eq!(Redacted::of("aéééé").to_string(), "a…"); // never cuts inside a character
    }
}

#[doc = include_str!("../docs/randomness_error.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomnessError(String);

impl fmt::Display for RandomnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the OS random source failed: {}", self.0)
    }
}

impl std::error::Error for RandomnessError {}

/// The first 16 of at least 16 bytes.
fn first_16(bytes: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&bytes[..16]);
    out
}

/// Fills `bytes` from the OS random source.
fn fill_random(bytes: &mut [u8]) -> Result<(), RandomnessError> {
    getrandom::fill(bytes).map_err(|e| RandomnessError(e.to_string()))
}
