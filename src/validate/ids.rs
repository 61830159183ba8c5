//! The `custom_id` uniqueness check: [`IdSet`] remembers each id as a 128-bit keyed hash with
//! the line it was first seen on, so memory is fixed per id however long the ids are.
//! Tested through the checker (`validator.rs`).

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
};

/// The `custom_id`s seen so far, as 128-bit keyed hashes with the first line of each.
///
/// Hashes, not strings, so that memory is fixed per id (about 40 bytes with the table's
/// overhead: 4 MB for 100,000 ids) however long the ids are; with strings, a file of long ids
/// would cost about its own size. The price is a false `duplicate_custom_id` when two
/// different ids collide: with 128 bits and 100,000 ids that chance is about 10⁻²⁹, i.e.
/// never. The keys are random per validator (`RandomState`), so nobody can craft ids that
/// collide, or that all land in one bucket.
pub(super) struct IdSet {
    keys: (RandomState, RandomState),
    first_line: HashMap<u128, u64, BuildHasherDefault<PassThrough>>,
}

impl IdSet {
    pub(super) fn new() -> Self {
        IdSet {
            keys: (RandomState::new(), RandomState::new()),
            first_line: HashMap::default(),
        }
    }

    /// The line where `id` was first seen, if it was; otherwise remembers it at `line`.
    pub(super) fn insert(&mut self, id: &str, line: u64, remember: bool) -> Option<u64> {
        let hash = |state: &RandomState| {
            let mut h = state.build_hasher();
            h.write(id.as_bytes());
            h.finish()
        };
        let key = (u128::from(hash(&self.keys.0)) << 64) | u128::from(hash(&self.keys.1));
        if remember {
            match self.first_line.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(line);
                    None
                }
            }
        } else {
            self.first_line.get(&key).copied()
        }
    }
}

/// The keys are already uniform hashes: hashing them again would only cost time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = (i as u64) ^ ((i >> 64) as u64);
    }
}
