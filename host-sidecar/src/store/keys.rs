//! Redis key names. Every key of an account carries the hash tag of the account's virtual shard
//! (`tg:{7}:...`), so one script touches one Redis Cluster slot, and each shard has one outbox
//! stream that the sync worker drains in order.

#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
    shards: u32,
}

impl Keyspace {
    pub fn new(prefix: &str, shards: u32) -> Self {
        Self {
            prefix: prefix.to_string(),
            shards: shards.max(1),
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// FNV-1a of the account id: stable across processes and releases.
    pub fn shard_of(&self, account: &str) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for b in account.bytes() {
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
        ] {
            assert_eq!(&k[k.find('{').unwrap()..=k.find('}').unwrap()], tag, "{k}");
        }
        assert_eq!(
            ks.shard_of("acct_42"),
            Keyspace::new("other", 16).shard_of("acct_42")
        );
    }
}
