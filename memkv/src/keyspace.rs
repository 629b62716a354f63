//! The key space: keys, their values and their expiry.
//!
//! Expiry is an absolute unix time in ms per key. A key is live while `now <= expire_at` (as in
//! Redis, it expires once the clock is past it). Two mechanisms keep expired keys out:
//! every lookup checks the key's time (lazy), and [`Keyspace::begin`], called before each
//! command or script, purges every key that is due, using an index ordered by expiry time so
//! memory goes back down even for keys nobody reads again (Redis' active expire cycle).
//!
//! `now` is taken once per command or script and frozen for its duration, as Redis 7 does for
//! scripts: a key cannot vanish half way through a script, and XADD ids within one script share
//! the script's millisecond.

use crate::reply::Reply;
use crate::types::{Hash, Stream, ZSet};
use std::collections::{BTreeSet, HashMap};

/// A key's value.
#[derive(Debug, Clone)]
pub enum Val {
    Str(Vec<u8>),
    Hash(Hash),
    ZSet(ZSet),
    Stream(Stream),
}

impl Val {
    /// The name `TYPE` answers.
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::Str(_) => "string",
            Val::Hash(_) => "hash",
            Val::ZSet(_) => "zset",
            Val::Stream(_) => "stream",
        }
    }
}

#[derive(Debug)]
struct Entry {
    val: Val,
    expire_at: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Keyspace {
    map: HashMap<Vec<u8>, Entry>,
    /// (expire_at, key) for every key with an expiry.
    expiries: BTreeSet<(u64, Vec<u8>)>,
    now: u64,
    /// Commands run, for `INFO stats`.
    pub commands_processed: u64,
}

/// Unix time in ms.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Keyspace {
    /// Starts a command or script at `now` (unix ms): freezes the clock and purges due keys.
    pub fn begin(&mut self, now: u64) {
        self.now = now;
        self.purge_expired();
    }

    /// The frozen clock of the current command or script.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Removes every key whose expiry is past.
    pub fn purge_expired(&mut self) {
        while let Some((at, _)) = self.expiries.first() {
            if *at >= self.now {
                break;
            }
            if let Some((at, key)) = self.expiries.pop_first() {
                if self.map.get(&key).and_then(|e| e.expire_at) == Some(at) {
                    self.map.remove(&key);
                }
            }
        }
    }

    fn live(&self, key: &[u8]) -> Option<&Entry> {
        self.map
            .get(key)
            .filter(|e| e.expire_at.is_none_or(|at| at >= self.now))
    }

    /// The entry for writing; an expired one is dropped first.
    fn live_mut(&mut self, key: &[u8]) -> Option<&mut Entry> {
        if self.map.contains_key(key) && self.live(key).is_none() {
            self.remove(key);
        }
        self.map.get_mut(key)
    }

    pub fn get(&self, key: &[u8]) -> Option<&Val> {
        self.live(key).map(|e| &e.val)
    }

    pub fn exists(&self, key: &[u8]) -> bool {
        self.live(key).is_some()
    }

    /// None when the key is missing, Some(None) when it has no expiry.
    pub fn expire_at(&self, key: &[u8]) -> Option<Option<u64>> {
        self.live(key).map(|e| e.expire_at)
    }

    /// Stores a value, replacing any; the expiry is cleared unless `keep_ttl`.
    pub fn set(&mut self, key: &[u8], val: Val, keep_ttl: bool) {
        let old_expiry = match self.live_mut(key) {
            Some(e) => e.expire_at,
            None => None,
        };
        let expire_at = if keep_ttl { old_expiry } else { None };
        if let (Some(at), None) = (old_expiry, expire_at) {
            self.expiries.remove(&(at, key.to_vec()));
        }
        self.map.insert(key.to_vec(), Entry { val, expire_at });
    }

    /// Sets or clears a live key's expiry; false when the key is missing.
    pub fn set_expire(&mut self, key: &[u8], at: Option<u64>) -> bool {
        let Some(entry) = self.live_mut(key) else {
            return false;
        };
        let old = std::mem::replace(&mut entry.expire_at, at);
        if let Some(old) = old {
            self.expiries.remove(&(old, key.to_vec()));
        }
        if let Some(at) = at {
            self.expiries.insert((at, key.to_vec()));
        }
        true
    }

    /// Deletes a key; true when it existed (and was live).
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let was_live = self.live(key).is_some();
        if let Some(entry) = self.map.remove(key) {
            if let Some(at) = entry.expire_at {
                self.expiries.remove(&(at, key.to_vec()));
            }
        }
        was_live
    }

    /// Keys stored, including any expired one not purged yet (none right after `begin`).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keys with an expiry.
    pub fn expiring(&self) -> usize {
        self.expiries.len()
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.expiries.clear();
    }

    /// Live keys, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let now = self.now;
        self.map
            .iter()
            .filter(move |(_, e)| e.expire_at.is_none_or(|at| at >= now))
            .map(|(k, _)| k.as_slice())
    }

    /// A string value, or WRONGTYPE.
    pub fn get_str(&self, key: &[u8]) -> Result<Option<&[u8]>, Reply> {
        match self.get(key) {
            None => Ok(None),
            Some(Val::Str(s)) => Ok(Some(s)),
            Some(_) => Err(Reply::wrongtype()),
        }
    }

    /// The string value to modify in place (keeping the expiry), or WRONGTYPE.
    pub fn str_mut(&mut self, key: &[u8]) -> Result<Option<&mut Vec<u8>>, Reply> {
        match self.live_mut(key).map(|e| &mut e.val) {
            None => Ok(None),
            Some(Val::Str(s)) => Ok(Some(s)),
            Some(_) => Err(Reply::wrongtype()),
        }
    }

    pub fn hash(&self, key: &[u8]) -> Result<Option<&Hash>, Reply> {
        match self.get(key) {
            None => Ok(None),
            Some(Val::Hash(h)) => Ok(Some(h)),
            Some(_) => Err(Reply::wrongtype()),
        }
    }

    pub fn hash_mut(&mut self, key: &[u8]) -> Result<Option<&mut Hash>, Reply> {
        match self.live_mut(key).map(|e| &mut e.val) {
            None => Ok(None),
            Some(Val::Hash(h)) => Ok(Some(h)),
            Some(_) => Err(Reply::wrongtype()),
        }
    }

    /// The hash at `key`, created empty when missing.
    pub fn hash_or_create(&mut self, key: &[u8]) -> Result<&mut Hash, Reply> {
        if !self.exists(key) {
            self.set(key, Val::Hash(Hash::default()), false);
        }
        self.hash_mut(key)?.ok_or_else(Reply::wrongtype)
    }

    pub fn zset(&self, key: &[u8]) -> Result<Option<&ZSet>, Reply> {
        match self.get(key) {
            None => Ok(None),
            Some(Val::ZSet(z)) => Ok(Some(z)),
            Some(_) => Err(Reply::wrongtype()),
        }
    }

    pub fn zset_mut(&mut self, key: &[u8]) -> Result<Option<&mut ZSet>, Reply> {
        match self.live_mut(key).map(|e| &mut e.val) {
            None => Ok(None),
            Some(Val::ZSet(z)) => Ok(Some(z)),
            Some(_) => Err(Reply::wrongtype()),
        }
    }

    pub fn stream(&self, key: &[u8]) -> Result<Option<&Stream>, Reply> {
        match self.get(key) {
            None => Ok(None),
            Some(Val::Stream(s)) => Ok(Some(s)),
            Some(_) => Err(Reply::wrongtype()),
        }
    }

    pub fn stream_mut(&mut self, key: &[u8]) -> Result<Option<&mut Stream>, Reply> {
        match self.live_mut(key).map(|e| &mut e.val) {
            None => Ok(None),
            Some(Val::Stream(s)) => Ok(Some(s)),
            Some(_) => Err(Reply::wrongtype()),
        }
    }

    /// Deletes a hash or sorted set left empty (Redis never keeps those; streams it keeps).
    pub fn remove_if_empty(&mut self, key: &[u8]) {
        let empty = match self.get(key) {
            Some(Val::Hash(h)) => h.is_empty(),
            Some(Val::ZSet(z)) => z.is_empty(),
            _ => false,
        };
        if empty {
            self.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_lazy_and_active() {
        let mut ks = Keyspace::default();
        ks.begin(1_000);
        ks.set(b"a", Val::Str(b"1".to_vec()), false);
        ks.set(b"b", Val::Str(b"2".to_vec()), false);
        assert!(ks.set_expire(b"a", Some(1_010)));
        assert_eq!(ks.expire_at(b"a"), Some(Some(1_010)));
        ks.begin(1_010);
        assert!(ks.exists(b"a"), "live until the clock is past its time");
        ks.now = 1_011;
        assert!(!ks.exists(b"a"), "lazy: invisible once due");
        assert_eq!(ks.len(), 2);
        ks.begin(1_011);
        assert_eq!(ks.len(), 1, "active: purged");
        assert_eq!(ks.expiring(), 0);
    }

    #[test]
    fn set_clears_or_keeps_ttl() {
        let mut ks = Keyspace::default();
        ks.begin(0);
        ks.set(b"a", Val::Str(vec![]), false);
        ks.set_expire(b"a", Some(50));
        ks.set(b"a", Val::Str(vec![]), true);
        assert_eq!(ks.expire_at(b"a"), Some(Some(50)));
        ks.set(b"a", Val::Str(vec![]), false);
        assert_eq!(ks.expire_at(b"a"), Some(None));
        assert_eq!(ks.expiring(), 0);
    }
}
