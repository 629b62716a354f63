//! A hash that iterates in insertion order.
//!
//! Redis stores small hashes (up to 128 fields of up to 64 bytes) as a listpack, so `HGETALL`
//! answers in insertion order, updates keep a field's place and deletes close the gap. That is
//! the order kept here, for hashes of any size.

use std::collections::HashMap;

#[derive(Debug, Default, Clone)]
pub struct Hash {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    index: HashMap<Vec<u8>, usize>,
}

impl Hash {
    pub fn get(&self, field: &[u8]) -> Option<&[u8]> {
        self.index.get(field).map(|&i| self.entries[i].1.as_slice())
    }

    /// Sets a field; true when it is new.
    pub fn insert(&mut self, field: &[u8], value: Vec<u8>) -> bool {
        match self.index.get(field) {
            Some(&i) => {
                self.entries[i].1 = value;
                false
            }
            None => {
                self.index.insert(field.to_vec(), self.entries.len());
                self.entries.push((field.to_vec(), value));
                true
            }
        }
    }

    /// Removes a field; true when it was there.
    pub fn remove(&mut self, field: &[u8]) -> bool {
        let Some(i) = self.index.remove(field) else {
            return false;
        };
        self.entries.remove(i);
        for (f, _) in &self.entries[i..] {
            if let Some(pos) = self.index.get_mut(f) {
                *pos -= 1;
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|(f, v)| (f.as_slice(), v.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::Hash;

    #[test]
    fn keeps_insertion_order() {
        let mut h = Hash::default();
        assert!(h.insert(b"a", b"1".to_vec()));
        assert!(h.insert(b"b", b"2".to_vec()));
        assert!(h.insert(b"c", b"3".to_vec()));
        assert!(!h.insert(b"a", b"9".to_vec()));
        assert!(h.remove(b"b"));
        assert!(!h.remove(b"b"));
        let order: Vec<_> = h.iter().map(|(f, v)| (f.to_vec(), v.to_vec())).collect();
        assert_eq!(
            order,
            vec![
                (b"a".to_vec(), b"9".to_vec()),
                (b"c".to_vec(), b"3".to_vec())
            ]
        );
        assert_eq!(h.get(b"c"), Some(&b"3"[..]));
    }
}
