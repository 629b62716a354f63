//! Who is calling: API keys and accounts, read from PostgreSQL and cached in memory for a short
//! TTL (`server.account_cache_ttl_ms`) so the hot path never waits on the database. Unknown keys
//! are cached too (negatively), so a flood of bad keys does not reach PostgreSQL either.
//! Changes made through this sidecar's admin API invalidate its cache at once; other sidecars
//! see them within the TTL.

use crate::ledger::{AccountRow, KeyRow, Ledger};
use chrono_tz::Tz;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An account with its timezone parsed.
#[derive(Debug, Clone)]
pub struct Account {
    pub row: AccountRow,
    pub tz: Tz,
}

/// Past this many entries a cache is cleared rather than grown further.
const MAX_ENTRIES: usize = 200_000;

/// A cached lookup: when it was made, and what it found (None = known absent).
type Entry<V> = (Instant, Option<Arc<V>>);

struct Cache<K, V> {
    ttl: Duration,
    map: Mutex<HashMap<K, Entry<V>>>,
}

impl<K: Eq + Hash + Clone, V> Cache<K, V> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(entry)` when cached and fresh (the entry itself may be "absent").
    fn get(&self, k: &K) -> Option<Option<Arc<V>>> {
        let map = self.map.lock().ok()?;
        let (at, v) = map.get(k)?;
        (at.elapsed() < self.ttl).then(|| v.clone())
    }

    fn put(&self, k: K, v: Option<Arc<V>>) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
            map.insert(k, (Instant::now(), v));
        }
    }

    fn remove(&self, k: &K) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(k);
        }
    }

    fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }
}

pub struct Directory {
    ledger: Ledger,
    pepper: String,
    accounts: Cache<String, Account>,
    keys: Cache<[u8; 32], KeyRow>,
}

impl Directory {
    pub fn new(ledger: Ledger, ttl: Duration, pepper: String) -> Self {
        Self {
            ledger,
            pepper,
            accounts: Cache::new(ttl),
            keys: Cache::new(ttl),
        }
    }

    pub fn hash_key(&self, api_key: &str) -> [u8; 32] {
        crate::apikey::hash(&self.pepper, api_key)
    }

    pub async fn account(&self, id: &str) -> Result<Option<Arc<Account>>, sqlx::Error> {
        if let Some(hit) = self.accounts.get(&id.to_string()) {
            return Ok(hit);
        }
        let acct = self.ledger.account(id).await?.map(|row| {
            let tz = row.timezone.parse().unwrap_or(Tz::UTC);
            Arc::new(Account { row, tz })
        });
        self.accounts.put(id.to_string(), acct.clone());
        Ok(acct)
    }

    pub async fn key(&self, api_key: &str) -> Result<Option<Arc<KeyRow>>, sqlx::Error> {
        let hash = self.hash_key(api_key);
        if let Some(hit) = self.keys.get(&hash) {
            return Ok(hit);
        }
        let key = self.ledger.key_by_hash(&hash).await?.map(Arc::new);
        self.keys.put(hash, key.clone());
        Ok(key)
    }

    pub fn forget_account(&self, id: &str) {
        self.accounts.remove(&id.to_string());
    }

    /// Keys are cached by hash; a change to one key drops them all (admin changes are rare).
    pub fn forget_keys(&self) {
        self.keys.clear();
    }
}
