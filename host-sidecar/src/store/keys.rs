//! Redis key names. Every key of an account carries the hash tag of the account's virtual shard
//! (`tg:{7}:...`), so one script touches one Redis Cluster slot, and each shard has one outbox
//! stream that the sync worker drains in order.
//!
//! An account's shard is its *root's*: an account with a parent (organization > team >
//! account) keeps its keys in the shard of the top of its tree, so one script can check and
//! charge every level. The engine places a child ([`Keyspace::place`]) before it names any of
//! its keys; a root (every account without a parent) needs no placing.

/// Tombstone buckets per shard and replay window (see [`Keyspace::tombs`]): at 3,000 settled
/// requests a second, a 600 s window and 16 shards, ~55 tombstones each, well under Redis's
/// `hash-max-listpack-entries` (128).
pub const TOMB_SLOTS: u64 = 2048;

/// A settled request's field in its tombstone bucket: the hold id (`<account>/<key>`; a
/// consume's is `<account>//<key>`), or when that is long, a 128-bit digest of it, so that
/// fields stay within Redis's `hash-max-listpack-value` (64 bytes) with the value.
pub fn tomb_field(id: &str) -> String {
    use sha2::{Digest, Sha256};
    if id.len() <= 40 {
        return id.to_string();
    }
    format!("#{}", hex::encode(&Sha256::digest(id.as_bytes())[..16]))
}

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// An account above another, and whether the one below spends its credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    pub id: String,
    pub pays: bool,
}

fn fnv64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
    shards: u32,
    /// Accounts with a parent -> the accounts above them (parent first, root last), each with
    /// whether the account's spending draws on its credit. Both are set at creation and never
    /// change, so an entry never goes stale; it holds only accounts with a parent this process
    /// has seen.
    roots: Arc<RwLock<HashMap<String, Vec<Level>>>>,
}

impl Keyspace {
    pub fn new(prefix: &str, shards: u32) -> Self {
        Self {
            prefix: prefix.to_string(),
            shards: shards.max(1),
            roots: Arc::default(),
        }
    }

    /// Records the accounts above `account` (parent first, root last): its keys live in the
    /// root's shard, and its scripts check that every level is loaded.
    pub fn place(&self, account: &str, above: &[Level]) {
        if above.is_empty() {
            return;
        }
        let known = self
            .roots
            .read()
            .map(|m| m.get(account).is_some_and(|r| r == above))
            .unwrap_or(false);
        if !known {
            if let Ok(mut m) = self.roots.write() {
                m.insert(account.to_string(), above.to_vec());
            }
        }
    }

    /// The accounts above `account`, as placed (none for a root).
    pub fn above(&self, account: &str) -> Vec<String> {
        self.levels_of(account).into_iter().map(|l| l.id).collect()
    }

    fn levels_of(&self, account: &str) -> Vec<Level> {
        self.roots
            .read()
            .ok()
            .and_then(|m| m.get(account).cloned())
            .unwrap_or_default()
    }

    /// The root of `account`'s tree, as placed (itself when it has no parent).
    pub fn root_of<'a>(&self, account: &'a str) -> std::borrow::Cow<'a, str> {
        match self
            .roots
            .read()
            .ok()
            .and_then(|m| m.get(account).and_then(|a| a.last().map(|l| l.id.clone())))
        {
            Some(r) => std::borrow::Cow::Owned(r),
            None => std::borrow::Cow::Borrowed(account),
        }
    }

    /// The keys of the levels above `account`, for its scripts: each level's state hash (a
    /// script that counts on its counters answers `cold` unless it is loaded), followed by its
    /// grant order and remaining amounts when the account's spending draws on its credit (see
    /// `wallets` in lua/lib.lua).
    pub fn levels(&self, account: &str) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.levels_of(account) {
            out.push(self.account(&l.id));
            if l.pays {
                out.push(self.grant_order(&l.id));
                out.push(self.grant_remaining(&l.id));
            }
        }
        out
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// FNV-1a of the id of the account's root (itself, for an account without a parent):
    /// stable across processes and releases.
    pub fn shard_of(&self, account: &str) -> u32 {
        let root = self.root_of(account);
        let mut h: u32 = 0x811c_9dc5;
        for b in root.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h % self.shards
    }

    fn tag(&self, shard: u32) -> String {
        format!("{}:{{{}}}", self.prefix, shard)
    }

    fn acct_tag(&self, account: &str) -> String {
        self.tag(self.shard_of(account))
    }

    pub fn account(&self, account: &str) -> String {
        format!("{}:a:{account}", self.acct_tag(account))
    }
    pub fn loading(&self, account: &str) -> String {
        format!("{}:a:{account}:loading", self.acct_tag(account))
    }
    pub fn grant_order(&self, account: &str) -> String {
        format!("{}:a:{account}:go", self.acct_tag(account))
    }
    pub fn grant_remaining(&self, account: &str) -> String {
        format!("{}:a:{account}:gr", self.acct_tag(account))
    }
    /// `hold_id` is `<account>/<request id>`.
    pub fn hold(&self, account: &str, hold_id: &str) -> String {
        format!("{}:h:{hold_id}", self.acct_tag(account))
    }
    pub fn idempotency(&self, account: &str, op: &str, key: &str) -> String {
        format!("{}:i:{account}:{op}:{key}", self.acct_tag(account))
    }
    /// `scope` is `a:<account>` or `k:<key id>`; `period` e.g. `d:2026-11-22`.
    pub fn counter(&self, account: &str, scope: &str, meter: &str, period: &str) -> String {
        format!("{}:c:{scope}:{meter}:{period}", self.acct_tag(account))
    }
    pub fn outbox(&self, shard: u32) -> String {
        format!("{}:outbox", self.tag(shard))
    }
    pub fn holds(&self, shard: u32) -> String {
        format!("{}:holds", self.tag(shard))
    }
    /// The two tombstone buckets a request's tombstone may be in at `now_ms` (the current replay
    /// window's and the one before), and the time to live a bucket written now gets: until the
    /// end of the window after its own, so a tombstone is kept one to two windows. Each window
    /// has [`TOMB_SLOTS`] buckets per shard, a request's chosen by its field, so that a bucket
    /// stays small enough for Redis's compact (listpack) hash encoding under load.
    pub fn tombs(
        &self,
        account: &str,
        field: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> (String, String, u64) {
        let w = window_ms.max(1);
        let n = now_ms / w;
        let slot = fnv64(field.as_bytes()) % TOMB_SLOTS;
        let tag = self.acct_tag(account);
        let ttl = (n + 2) * w - now_ms + 1000;
        (
            format!("{tag}:t:{n}:{slot}"),
            format!("{tag}:t:{}:{slot}", n.saturating_sub(1)),
            ttl,
        )
    }

    /// A random id set once per stream lifetime: when Redis loses the stream, the epoch changes
    /// and the sync worker restarts its cursor instead of skipping the new stream's entries.
    pub fn epoch(&self, shard: u32) -> String {
        format!("{}:epoch", self.tag(shard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_keys_of_an_account_share_one_hash_tag() {
        let ks = Keyspace::new("tg", 16);
        let s = ks.shard_of("acct_42");
        let tag = format!("{{{s}}}");
        for k in [
            ks.account("acct_42"),
            ks.grant_order("acct_42"),
            ks.hold("acct_42", "acct_42/r1"),
            ks.counter("acct_42", "k:key_1", "requests", "d:2026-11-22"),
            ks.outbox(s),
            ks.holds(s),
            ks.tombs("acct_42", "acct_42/r1", 1_000_000, 600_000).0,
            ks.tombs("acct_42", "acct_42/r1", 1_000_000, 600_000).1,
        ] {
            assert_eq!(&k[k.find('{').unwrap()..=k.find('}').unwrap()], tag, "{k}");
        }
        assert_eq!(
            ks.shard_of("acct_42"),
            Keyspace::new("other", 16).shard_of("acct_42")
        );
    }

    #[test]
    fn a_placed_account_lives_in_its_roots_shard() {
        let ks = Keyspace::new("tg", 64);
        let (org, team) = ("acme", "acme-eng-team-7");
        assert_ne!(
            ks.shard_of(org),
            ks.shard_of(team),
            "pick ids in two shards"
        );
        ks.place(
            team,
            &[Level {
                id: org.to_string(),
                pays: false,
            }],
        );
        assert_eq!(ks.levels(team), vec![ks.account(org)]);
        ks.place(
            "member",
            &[
                Level {
                    id: team.to_string(),
                    pays: true,
                },
                Level {
                    id: org.to_string(),
                    pays: false,
                },
            ],
        );
        assert_eq!(
            ks.levels("member"),
            vec![
                ks.account(team),
                ks.grant_order(team),
                ks.grant_remaining(team),
                ks.account(org)
            ]
        );
        assert_eq!(ks.shard_of(team), ks.shard_of(org));
        let clone = ks.clone();
        assert_eq!(
            clone.counter(team, "a:x", "m", "d"),
            ks.counter(team, "a:x", "m", "d")
        );
        assert_eq!(ks.root_of("someone-else"), "someone-else");
    }

    #[test]
    fn a_tombstone_is_found_for_two_windows_and_fields_stay_short() {
        let ks = Keyspace::new("tg", 16);
        let w = 600_000;
        let (cur, prev, ttl) = ks.tombs("a", "a/r1", 5 * w + 10, w);
        // Written in window 5; still read (as "previous") during window 6.
        let (cur6, prev6, _) = ks.tombs("a", "a/r1", 6 * w + 599_000, w);
        assert_eq!(prev6, cur);
        assert_ne!(cur6, cur);
        assert_ne!(prev, cur);
        assert_eq!(ttl, 2 * w - 10 + 1000);
        assert_eq!(tomb_field("a/r1"), "a/r1");
        let long = format!("{}/tg-{}", "x".repeat(30), "f".repeat(32));
        assert_eq!(tomb_field(&long).len(), 33);
        assert_ne!(tomb_field(&long), tomb_field(&format!("{long}0")));
    }
}
