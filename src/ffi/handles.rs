//! Generation-checked handle registries. A C handle is an index plus a generation and a type tag
//! packed in 64 bits; the object lives in an `Arc` in the registry. Destroying removes it and
//! bumps the generation, so a stale or doubled handle is recognised and refused, and a call that
//! already holds the `Arc` finishes safely.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};

pub(crate) struct Registry<T> {
    tag: u8,
    kind: &'static str,
    slots: Mutex<Slots<T>>,
}

struct Slots<T> {
    entries: Vec<(u32, Option<Arc<T>>)>,
    free: Vec<u32>,
}

const INDEX_BITS: u64 = 32;
const GENERATION_MASK: u64 = 0xff_ffff;

impl<T> Registry<T> {
    pub(crate) const fn new(tag: u8, kind: &'static str) -> Self {
        Registry { tag, kind, slots: Mutex::new(Slots { entries: Vec::new(), free: Vec::new() }) }
    }

    /// Stores `value` and returns its handle bits (never 0).
    pub(crate) fn insert(&self, value: T) -> u64 {
        let mut s = self.slots.lock();
        let index = match s.free.pop() {
            Some(i) => i,
            None => {
                s.entries.push((0, None));
                s.entries.len() as u32 - 1
            }
        };
        let entry = &mut s.entries[index as usize];
        entry.1 = Some(Arc::new(value));
        (self.tag as u64) << 56 | (entry.0 as u64 & GENERATION_MASK) << INDEX_BITS | (index as u64 + 1)
    }

    fn locate(&self, bits: u64) -> Result<(usize, u32)> {
        let bad = |why: &str| Error::InvalidHandle(format!("{} handle 0x{bits:x} {why}", self.kind));
        if bits == 0 {
            return Err(bad("is null"));
        }
        if (bits >> 56) as u8 != self.tag {
            return Err(bad("is not a handle of this kind"));
        }
        let index = (bits & 0xffff_ffff) as usize;
        if index == 0 {
            return Err(bad("has no index"));
        }
        Ok((index - 1, ((bits >> INDEX_BITS) & GENERATION_MASK) as u32))
    }

    /// The live object behind `bits`.
    pub(crate) fn get(&self, bits: u64) -> Result<Arc<T>> {
        let (index, generation) = self.locate(bits)?;
        let s = self.slots.lock();
        match s.entries.get(index) {
            Some((g, Some(v))) if *g & GENERATION_MASK as u32 == generation => Ok(v.clone()),
            _ => Err(self.stale(bits)),
        }
    }

    /// Takes the object out; the handle (and any copy of it) is invalid afterwards.
    pub(crate) fn remove(&self, bits: u64) -> Result<Arc<T>> {
        let (index, generation) = self.locate(bits)?;
        let mut s = self.slots.lock();
        let value = match s.entries.get_mut(index) {
            Some((g, v @ Some(_))) if *g & GENERATION_MASK as u32 == generation => {
                *g = g.wrapping_add(1);
                v.take().unwrap()
            }
            _ => return Err(self.stale(bits)),
        };
        s.free.push(index as u32);
        Ok(value)
    }

    fn stale(&self, bits: u64) -> Error {
        Error::InvalidHandle(format!("{} handle 0x{bits:x} was destroyed or never created", self.kind))
    }
}
