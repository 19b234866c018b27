//! A map kept as one sorted vector, for the few entries a node holds (its ranks, its ports).
//!
//! A node holds a rank per slot for an attempt or two, a port per attempt: a handful of entries,
//! changed with every restart. A `BTreeMap` gives each node a heap node of 11 entries (1.3 KB
//! with a rank's figures) reached through pointers; at 12,500 simulated nodes those were a
//! sixth of a 100,000-GPU simulation. One vector keeps the entries together, in key order, and
//! keeps its room when emptied, so a restart that forgets an attempt and inserts the next
//! allocates nothing.

use std::ops::Index;

#[derive(Clone, Debug, PartialEq)]
pub struct VecMap<K, V> {
    /// Sorted by key, each key once.
    entries: Vec<(K, V)>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap { entries: Vec::new() }
    }
}

impl<K: Ord + Copy, V> VecMap<K, V> {
    fn find(&self, key: &K) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_ok()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    /// Sets `key` to `value`, returning the value it replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    /// Sets `key` to `value` unless it is already held (the first value stays).
    pub fn insert_if_absent(&mut self, key: K, value: V) {
        if let Err(i) = self.find(&key) {
            self.entries.insert(i, (key, value));
        }
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// Keeps the entries for which `keep` is true, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.entries.retain_mut(|(k, v)| keep(k, v));
    }

    /// Removes every entry; the room stays.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The entries with keys from `from` to `to`, both included, in key order.
    pub fn range(&self, from: K, to: K) -> impl Iterator<Item = (&K, &V)> {
        let start = self.entries.partition_point(|(k, _)| *k < from);
        self.entries[start..].iter().take_while(move |(k, _)| *k <= to).map(|(k, v)| (k, v))
    }

    /// Every entry in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + ExactSizeIterator {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = (&K, &mut V)> + ExactSizeIterator {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.entries.iter_mut().map(|(_, v)| v)
    }
}

impl<K: Ord + Copy, V> Index<&K> for VecMap<K, V> {
    type Output = V;

    fn index(&self, key: &K) -> &V {
        self.get(key).expect("no entry for the key")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn behaves_as_a_btree_map_over_a_seeded_mix_of_operations() {
        // The reference is the standard map; keys from a small space so that hits, misses and
        // repeats all happen often.
        let mut map: VecMap<(u64, u32), u32> = VecMap::default();
        let mut reference: BTreeMap<(u64, u32), u32> = BTreeMap::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for value in 0..20_000u32 {
            let r = next();
            let key = (r % 4, (r >> 8) as u32 % 5);
            match (r >> 16) % 6 {
                0 => assert_eq!(map.insert(key, value), reference.insert(key, value)),
                1 => {
                    map.insert_if_absent(key, value);
                    reference.entry(key).or_insert(value);
                }
                2 => assert_eq!(map.remove(&key), reference.remove(&key)),
                3 => {
                    let cut = value % 7;
                    map.retain(|k, v| (k.1 + *v) % 7 != cut);
                    reference.retain(|k, v| (k.1 + *v) % 7 != cut);
                }
                4 => {
                    let got: Vec<_> = map.range((key.0, 0), (key.0, u32::MAX)).collect();
                    let want: Vec<_> = reference.range((key.0, 0)..=(key.0, u32::MAX)).collect();
                    assert_eq!(got, want);
                }
                _ => {
                    if let Some(v) = map.get_mut(&key) {
                        *v += 1;
                    }
                    if let Some(v) = reference.get_mut(&key) {
                        *v += 1;
                    }
                }
            }
            assert_eq!(map.get(&key), reference.get(&key));
            assert_eq!(map.contains_key(&key), reference.contains_key(&key));
        }
        let all: Vec<_> = map.iter().collect();
        assert_eq!(all, reference.iter().collect::<Vec<_>>());
        assert_eq!(map.len(), reference.len());
        map.clear();
        assert!(map.is_empty());
    }
}
