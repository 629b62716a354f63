//! Leases: admitting from an allowance, asking once, backing off, committing what was used.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use tollgate_filter::lease::{LeaseKey, Leases};
use tollgate_protocol::Meters;

fn m(pairs: &[(&str, u64)]) -> Meters {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn key() -> LeaseKey {
    ("tg_k".into(), 0, None)
}

#[test]
fn a_lease_admits_until_its_allowance_runs_out_and_commits_what_was_used() {
    let mut ls = Leases::default();
    let est = m(&[("requests", 1), ("tokens", 10)]);
    assert_eq!(ls.take(&key(), "chat", &est, 3, 1000, 0), None);
    let ask = ls.asks.pop_front().unwrap();
    assert_eq!(ask.meters, m(&[("requests", 3), ("tokens", 30)]));
    assert_eq!(
        ls.take(&key(), "chat", &est, 3, 1000, 0),
        None,
        "asked once"
    );
    assert!(ls.asks.is_empty());
    ls.granted(ask, "acct/lease-1".into(), 0);
    let a = ls.take(&key(), "chat", &est, 3, 1000, 1).unwrap();
    let b = ls.take(&key(), "chat", &est, 3, 1000, 1).unwrap();
    let c = ls.take(&key(), "chat", &est, 3, 1000, 1).unwrap();
    assert_eq!((a, b), (c, c));
    assert_eq!(ls.take(&key(), "chat", &est, 3, 1000, 1), None, "exhausted");
    ls.settle(a, Some(&m(&[("requests", 1), ("tokens", 4)])));
    ls.settle(b, None); // released (an upstream failure)
    assert!(ls.due(2000).is_empty(), "one request still in flight");
    ls.settle(c, Some(&m(&[("requests", 1), ("tokens", 12)])));
    let done = ls.due(2000);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].used, m(&[("requests", 2), ("tokens", 16)]));
    assert_eq!(done[0].hold_id, "acct/lease-1");
}

#[test]
fn a_request_larger_than_what_is_left_goes_the_exact_way() {
    let mut ls = Leases::default();
    let ask = {
        ls.take(&key(), "chat", &m(&[("tokens", 10)]), 2, 1000, 0);
        ls.asks.pop_front().unwrap()
    };
    ls.granted(ask, "h".into(), 0);
    assert_eq!(
        ls.take(&key(), "chat", &m(&[("tokens", 25)]), 2, 1000, 1),
        None
    );
    assert!(ls
        .take(&key(), "chat", &m(&[("tokens", 20)]), 2, 1000, 1)
        .is_some());
    // A meter the lease does not hold is not covered.
    assert_eq!(
        ls.take(&key(), "chat", &m(&[("bytes", 1)]), 2, 1000, 1),
        None
    );
}

#[test]
fn a_refused_lease_is_not_asked_again_before_its_backoff() {
    let mut ls = Leases::default();
    let est = m(&[("requests", 1)]);
    ls.take(&key(), "chat", &est, 5, 1000, 0);
    let ask = ls.asks.pop_front().unwrap();
    ls.refused(&ask.key, 500);
    ls.take(&key(), "chat", &est, 5, 1000, 100);
    assert!(ls.asks.is_empty());
    ls.take(&key(), "chat", &est, 5, 1000, 600);
    assert_eq!(ls.asks.len(), 1);
}

#[test]
fn an_expired_lease_admits_nothing_and_a_fresh_one_replaces_it() {
    let mut ls = Leases::default();
    let est = m(&[("requests", 1)]);
    ls.take(&key(), "chat", &est, 8, 1000, 0);
    let ask = ls.asks.pop_front().unwrap();
    ls.granted(ask.clone(), "old".into(), 0);
    let id = ls.take(&key(), "chat", &est, 8, 1000, 10).unwrap();
    assert_eq!(ls.take(&key(), "chat", &est, 8, 1000, 1000), None);
    ls.granted(ask, "new".into(), 1000);
    assert!(ls.take(&key(), "chat", &est, 8, 1000, 1001).is_some());
    ls.settle(id, Some(&est));
    let done = ls.due(1001);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].hold_id, "old");
}
