//! Handle registries. A C handle is a type tag and a serial number packed in 64 bits; the object
//! lives in an `Arc` in the registry. Serial numbers are never reused within a process (56 bits:
//! a million handles a second for two thousand years), so a stale or doubled handle is always
//! recognised and refused, and a call that already holds the `Arc` finishes safely.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use packinfer::error::{Error, Result};

pub(crate) struct Registry<T> {
    tag: u8,
    kind: &'static str,
    slots: Mutex<Slots<T>>,
}

struct Slots<T> {
    live: Option<HashMap<u64, Arc<T>>>,
    next: u64,
}

const SERIAL_BITS: u32 = 56;
const SERIAL_MASK: u64 = (1 << SERIAL_BITS) - 1;

impl<T> Registry<T> {
    pub(crate) const fn new(tag: u8, kind: &'static str) -> Self {
        Registry { tag, kind, slots: Mutex::new(Slots { live: None, next: 1 }) }
    }

    /// Stores `value` and returns its handle bits (never 0).
    pub(crate) fn insert(&self, value: T) -> Result<u64> {
        let mut s = self.slots.lock();
        let serial = s.next;
        if serial > SERIAL_MASK {
            return Err(Error::Internal(format!("every {} handle number of this process is used", self.kind)));
        }
        s.next += 1;
        s.live.get_or_insert_with(HashMap::new).insert(serial, Arc::new(value));
        Ok((self.tag as u64) << SERIAL_BITS | serial)
    }

    fn serial(&self, bits: u64) -> Result<u64> {
        let bad = |why: &str| Error::InvalidHandle(format!("{} handle 0x{bits:x} {why}", self.kind));
        if bits == 0 {
            return Err(bad("is null"));
        }
        if (bits >> SERIAL_BITS) as u8 != self.tag {
            return Err(bad("is not a handle of this kind"));
        }
        Ok(bits & SERIAL_MASK)
    }

    /// The live object behind `bits`.
    pub(crate) fn get(&self, bits: u64) -> Result<Arc<T>> {
        let serial = self.serial(bits)?;
        let s = self.slots.lock();
        s.live.as_ref().and_then(|m| m.get(&serial)).cloned().ok_or_else(|| self.stale(bits))
    }

    /// Takes the object out; the handle (and any copy of it) is invalid afterwards.
    pub(crate) fn remove(&self, bits: u64) -> Result<Arc<T>> {
        let serial = self.serial(bits)?;
        let mut s = self.slots.lock();
        s.live.as_mut().and_then(|m| m.remove(&serial)).ok_or_else(|| self.stale(bits))
    }

    fn stale(&self, bits: u64) -> Error {
        Error::InvalidHandle(format!("{} handle 0x{bits:x} was destroyed or never created", self.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot's 24-bit generation used to wrap after 2^24 create/destroy cycles, bringing a
    /// destroyed handle back to life: serial numbers never repeat.
    #[test]
    fn a_destroyed_handle_stays_dead_after_two_to_the_24_cycles() {
        let r: Registry<u32> = Registry::new(0x7E, "test");
        let first = r.insert(0).unwrap();
        r.remove(first).unwrap();
        for i in 0..(1u32 << 24) + 1 {
            let h = r.insert(i).unwrap();
            assert_ne!(h, first);
            r.remove(h).unwrap();
        }
        assert!(matches!(r.get(first), Err(Error::InvalidHandle(_))));
        assert!(matches!(r.remove(first), Err(Error::InvalidHandle(_))));
    }
}
