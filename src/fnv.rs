//! FNV-1a, for maps keyed by trusted strings: route templates (the application's own) and the
//! ids of keys already verified. A few instructions a byte, where SipHash costs ~150 per lookup;
//! never for anything a client chooses, which could then force collisions.

use std::hash::{BuildHasherDefault, Hasher};

/// The FNV-1a hasher.
#[derive(Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A `HashMap`'s hasher state for [`Fnv`].
pub(crate) type FnvState = BuildHasherDefault<Fnv>;
