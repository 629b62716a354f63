//! Who is calling: API keys and accounts, read from PostgreSQL and cached in memory so the hot
//! path never waits on the database.
//!
//! An entry is fresh for `server.account_cache_ttl_ms` when it records an absence (an unknown
//! key or account), and [`KNOWN_FACTOR`] times that when it holds a row: every change to an
//! account, its plan or its keys bumps the account's version, which every decision checks in
//! Redis (the script answers `stale`, and the entry is dropped and read again), so the TTL of a
//! known entry only bounds how long read routes may see an old row — and re-reading every
//! account and key once a second was, under load, most of PostgreSQL's work (`perf`, issue 15).
//! After that it is still served while one
//! background task re-reads it (stale-while-revalidate), so a busy key never pays a database
//! round trip on the request path; an entry older than [`STALE_FACTOR`] × TTL is re-read inline.
//! Unknown keys are cached too (negatively), so a flood of bad keys does not reach PostgreSQL.
//! Changes made through this sidecar's admin API invalidate its cache at once; other sidecars
//! see them within about two TTLs.

use crate::ledger::{AccountRow, KeyRow, Ledger};
use chrono_tz::Tz;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An account with its timezone parsed.
#[derive(Debug, Clone)]
pub struct Account {
    pub row: AccountRow,
    pub tz: Tz,
}

impl Account {
    /// The row with its timezone (validated when the account was written; UTC if unreadable).
    pub fn new(row: AccountRow) -> Self {
        let tz = row.timezone.parse().unwrap_or(Tz::UTC);
        Account { row, tz }
    }
}

/// Past this many entries a cache is cleared rather than grown further.
const MAX_ENTRIES: usize = 200_000;

/// How many TTLs a stale entry may still be served while it is refreshed in the background.
const STALE_FACTOR: u32 = 10;

/// How many TTLs an entry that holds a row stays fresh (see the module's header).
const KNOWN_FACTOR: u32 = 30;

/// A cached lookup: when it was read, what it found (None = known absent), and whether a
/// refresh is under way.
struct Entry<V> {
    at: Instant,
    value: Option<Arc<V>>,
    refreshing: bool,
}

enum Lookup<V> {
    Fresh(Option<Arc<V>>),
    /// Serve this, and refresh it in the background.
    Stale(Option<Arc<V>>),
    Miss,
}

struct Cache<K, V> {
    ttl: Duration,
    map: Mutex<HashMap<K, Entry<V>>>,
}

impl<K: Eq + Hash + Clone + Send + 'static, V: Send + Sync + 'static> Cache<K, V> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lookup(&self, k: &K) -> Lookup<V> {
        let Ok(mut map) = self.map.lock() else {
            return Lookup::Miss;
        };
        let Some(e) = map.get_mut(k) else {
            return Lookup::Miss;
        };
        let age = e.at.elapsed();
        let ttl = if e.value.is_some() {
            self.ttl * KNOWN_FACTOR
        } else {
            self.ttl
        };
        if age < ttl {
            Lookup::Fresh(e.value.clone())
        } else if age < ttl * STALE_FACTOR && !e.refreshing {
            e.refreshing = true;
            Lookup::Stale(e.value.clone())
        } else if age < ttl * STALE_FACTOR {
            Lookup::Fresh(e.value.clone())
        } else {
            Lookup::Miss
        }
    }

    fn put(&self, k: K, value: Option<Arc<V>>) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
            map.insert(
                k,
                Entry {
                    at: Instant::now(),
                    value,
                    refreshing: false,
                },
            );
        }
    }

    fn unmark(&self, k: &K) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(e) = map.get_mut(k) {
                e.refreshing = false;
            }
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

    /// The cached value, or `load`'s (cached for next time).
    async fn get_or_load<F, Fut>(
        self: &Arc<Self>,
        k: K,
        load: F,
    ) -> Result<Option<Arc<V>>, sqlx::Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, sqlx::Error>> + Send + 'static,
    {
        match self.lookup(&k) {
            Lookup::Fresh(v) => Ok(v),
            Lookup::Stale(v) => {
                let cache = Arc::clone(self);
                let fut = load();
                tokio::spawn(async move {
                    match fut.await {
                        Ok(fresh) => cache.put(k, fresh.map(Arc::new)),
                        Err(e) => {
                            tracing::warn!(error = %e, "directory refresh failed; serving the cached entry");
                            cache.unmark(&k);
                        }
                    }
                });
                Ok(v)
            }
            Lookup::Miss => {
                let v = load().await?.map(Arc::new);
                self.put(k, v.clone());
                Ok(v)
            }
        }
    }
}

#[derive(Clone)]
pub struct Directory {
    ledger: Ledger,
    pepper: String,
    /// Key lookups that reached the ledger (PostgreSQL or SQLite): what a flood of made-up keys
    /// would cost, were they not refused by their shape and check first.
    pub key_lookups: Arc<std::sync::atomic::AtomicU64>,
    /// Keys refused by their shape or check, before any lookup.
    pub keys_refused: Arc<std::sync::atomic::AtomicU64>,
    accounts: Arc<Cache<String, Account>>,
    keys: Arc<Cache<[u8; 32], KeyRow>>,
}

impl Directory {
    pub fn new(ledger: Ledger, ttl: Duration, pepper: String) -> Self {
        Self {
            ledger,
            pepper,
            key_lookups: Default::default(),
            keys_refused: Default::default(),
            accounts: Arc::new(Cache::new(ttl)),
            keys: Arc::new(Cache::new(ttl)),
        }
    }

    pub fn pepper(&self) -> &str {
        &self.pepper
    }

    pub fn hash_key(&self, api_key: &str) -> [u8; 32] {
        crate::apikey::hash(&self.pepper, api_key)
    }

    pub async fn account(&self, id: &str) -> Result<Option<Arc<Account>>, sqlx::Error> {
        let ledger = self.ledger.clone();
        let owned = id.to_string();
        self.accounts
            .get_or_load(id.to_string(), move || async move {
                Ok(ledger.account(&owned).await?.map(Account::new))
            })
            .await
    }

    /// The key's row: refused at once if it cannot be a key of ours, else from the cache
    /// (unknown keys are cached as unknown too), else from the ledger.
    pub async fn key(&self, api_key: &str) -> Result<Option<Arc<KeyRow>>, sqlx::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        if !crate::apikey::plausible(&self.pepper, api_key) {
            self.keys_refused.fetch_add(1, Relaxed);
            return Ok(None);
        }
        let hash = self.hash_key(api_key);
        let (ledger, lookups) = (self.ledger.clone(), Arc::clone(&self.key_lookups));
        self.keys
            .get_or_load(hash, move || async move {
                lookups.fetch_add(1, Relaxed);
                ledger.key_by_hash(&hash).await
            })
            .await
    }

    pub fn forget_account(&self, id: &str) {
        self.accounts.remove(&id.to_string());
    }

    /// Keys are cached by hash; a change to one key drops them all (admin changes are rare).
    pub fn forget_keys(&self) {
        self.keys.clear();
    }
}
