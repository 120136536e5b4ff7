//! The little of MessagePack the batch script needs: an array of integers each way.
//!
//! Why not plain arguments and an array reply: Redis's Lua reads a number argument with
//! `tonumber` (`strtod`, which cost Redis more per decision than the commands it runs), and the
//! client parses a RESP value per number. `cmsgpack`, built into Redis's Lua, reads and writes a
//! whole array in one C call, and the client reads one bulk string.

/// An array of unsigned integers, written as they come (the length is filled in at the end).
pub(super) struct Numbers {
    bytes: Vec<u8>,
    len: u32,
}

impl Numbers {
    pub(super) fn with_capacity(numbers: usize) -> Self {
        let mut bytes = Vec::with_capacity(5 + 9 * numbers);
        bytes.extend_from_slice(&[0xdd, 0, 0, 0, 0]);
        Self { bytes, len: 0 }
    }

    pub(super) fn push(&mut self, n: u64) {
        match n {
            0..0x80 => self.bytes.push(n as u8),
            0x80..=0xffff_ffff => {
                self.bytes.push(0xce);
                self.bytes.extend_from_slice(&(n as u32).to_be_bytes());
            }
            _ => {
                self.bytes.push(0xcf);
                self.bytes.extend_from_slice(&n.to_be_bytes());
            }
        }
        self.len += 1;
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.bytes[1..5].copy_from_slice(&self.len.to_be_bytes());
        self.bytes
    }
}

/// An array of integers as `cmsgpack.pack` writes Lua numbers that are whole; `None` for
/// anything else.
pub(super) fn integers(bytes: &[u8]) -> Option<Vec<i64>> {
    let mut reader = Reader(bytes);
    let len = match reader.byte()? {
        b @ 0x90..=0x9f => usize::from(b & 0x0f),
        0x80 => 0, // an empty Lua table
        0xdc => usize::from(u16::from_be_bytes(reader.take()?)),
        0xdd => u32::from_be_bytes(reader.take()?) as usize,
        _ => return None,
    };
    // Each number takes a byte at least: a length past the end is not believed.
    let mut out = Vec::with_capacity(len.min(reader.0.len()));
    for _ in 0..len {
        out.push(reader.integer()?);
    }
    reader.0.is_empty().then_some(out)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn integer(&mut self) -> Option<i64> {
        Some(match self.byte()? {
            b @ 0x00..=0x7f => i64::from(b),
            b @ 0xe0..=0xff => i64::from(b as i8),
            0xcc => i64::from(self.byte()?),
            0xcd => i64::from(u16::from_be_bytes(self.take()?)),
            0xce => i64::from(u32::from_be_bytes(self.take()?)),
            0xcf => i64::try_from(u64::from_be_bytes(self.take()?)).ok()?,
            0xd0 => i64::from(self.byte()? as i8),
            0xd1 => i64::from(i16::from_be_bytes(self.take()?)),
            0xd2 => i64::from(i32::from_be_bytes(self.take()?)),
            0xd3 => i64::from_be_bytes(self.take()?),
            // A whole number Lua kept as a double.
            0xcb => {
                let f = f64::from_be_bytes(self.take()?);
                (f.fract() == 0.0 && f.abs() < 9.2e18).then_some(f as i64)?
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{integers, Numbers};
    use proptest::prelude::*;

    /// Encodes as `cmsgpack.pack` does: the smallest form of each integer.
    fn packed(values: &[i64]) -> Vec<u8> {
        let mut out = vec![0xdd];
        out.extend_from_slice(&(values.len() as u32).to_be_bytes());
        for &v in values {
            match v {
                0..=0x7f => out.push(v as u8),
                -32..=-1 => out.push(v as i8 as u8),
                0x80..=0xff => out.extend_from_slice(&[0xcc, v as u8]),
                0x100..=0xffff => out.extend(std::iter::once(0xcd).chain((v as u16).to_be_bytes())),
                0x1_0000..=0xffff_ffff => out.extend(std::iter::once(0xce).chain((v as u32).to_be_bytes())),
                0x1_0000_0000.. => out.extend(std::iter::once(0xcf).chain((v as u64).to_be_bytes())),
                -128..=-33 => out.extend_from_slice(&[0xd0, v as i8 as u8]),
                -32768..=-129 => out.extend(std::iter::once(0xd1).chain((v as i16).to_be_bytes())),
                -2_147_483_648..=-32769 => out.extend(std::iter::once(0xd2).chain((v as i32).to_be_bytes())),
                _ => out.extend(std::iter::once(0xd3).chain(v.to_be_bytes())),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn integers_read_what_was_packed(values in prop::collection::vec(any::<i64>(), 0..40)) {
            prop_assert_eq!(integers(&packed(&values)), Some(values));
        }

        #[test]
        fn numbers_round_trip(values in prop::collection::vec(0u64..=i64::MAX as u64, 0..40)) {
            let mut numbers = Numbers::with_capacity(values.len());
            for &v in &values {
                numbers.push(v);
            }
            let read = integers(&numbers.finish()).unwrap();
            prop_assert_eq!(read, values.iter().map(|&v| v as i64).collect::<Vec<_>>());
        }

        #[test]
        fn anything_else_is_none_or_a_list(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            // Never a panic, whatever arrives.
            let _ = integers(&bytes);
        }
    }

    #[test]
    fn short_long_and_trailing_input_is_refused() {
        let whole = packed(&[1, 300, -5]);
        assert_eq!(integers(&whole), Some(vec![1, 300, -5]));
        assert_eq!(integers(&whole[..whole.len() - 1]), None);
        let mut longer = whole.clone();
        longer.push(7);
        assert_eq!(integers(&longer), None);
        // fixarray, array 16, an empty map (Lua's empty table), and a whole double
        assert_eq!(integers(&[0x92, 0x01, 0x02]), Some(vec![1, 2]));
        assert_eq!(integers(&[0xdc, 0, 1, 0x05]), Some(vec![5]));
        assert_eq!(integers(&[0x80]), Some(vec![]));
        let mut double = vec![0x91, 0xcb];
        double.extend_from_slice(&9_007_199_254_740_992f64.to_be_bytes());
        assert_eq!(integers(&double), Some(vec![9_007_199_254_740_992]));
        let mut half = vec![0x91, 0xcb];
        half.extend_from_slice(&0.5f64.to_be_bytes());
        assert_eq!(integers(&half), None);
        // a string is not a number
        assert_eq!(integers(&[0x91, 0xa1, b'x']), None);
    }
}
