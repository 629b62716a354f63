//! A sorted set: members ordered by score, then by member bytes (as Redis' skiplist orders
//! them, which scripts rely on when they add members with equal scores for lexical order).

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

/// An (score, member) pair in set order. Scores are never NaN (ZADD rejects NaN), and compare
/// like C doubles, so `-0` and `0` tie and the member decides, as in Redis.
#[derive(Debug, Clone)]
pub struct Ranked {
    pub score: f64,
    pub member: Vec<u8>,
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| self.member.cmp(&other.member))
    }
}

#[derive(Debug, Default, Clone)]
pub struct ZSet {
    scores: HashMap<Vec<u8>, f64>,
    order: BTreeSet<Ranked>,
}

/// One end of a score range (`ZRANGEBYSCORE`): a value, exclusive or not.
#[derive(Debug, Clone, Copy)]
pub struct ScoreBound {
    pub value: f64,
    pub exclusive: bool,
}

impl ZSet {
    pub fn score(&self, member: &[u8]) -> Option<f64> {
        self.scores.get(member).copied()
    }

    /// Sets a member's score; true when the member is new.
    pub fn insert(&mut self, member: &[u8], score: f64) -> bool {
        // Small sorted sets in Redis (listpacks) store -0 as the integer 0.
        let score = if score == 0.0 { 0.0 } else { score };
        match self.scores.get_mut(member) {
            Some(old) => {
                // Like Redis, an equal score (even -0 for 0) leaves the member untouched.
                if *old != score {
                    self.order.remove(&Ranked {
                        score: *old,
                        member: member.to_vec(),
                    });
                    self.order.insert(Ranked {
                        score,
                        member: member.to_vec(),
                    });
                    *old = score;
                }
                false
            }
            None => {
                self.scores.insert(member.to_vec(), score);
                self.order.insert(Ranked {
                    score,
                    member: member.to_vec(),
                });
                true
            }
        }
    }

    /// Removes a member; true when it was there.
    pub fn remove(&mut self, member: &[u8]) -> bool {
        match self.scores.remove(member) {
            Some(score) => {
                self.order.remove(&Ranked {
                    score,
                    member: member.to_vec(),
                });
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// All members in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Ranked> {
        self.order.iter()
    }

    /// Members whose score is within [min, max] (bounds possibly exclusive), in order.
    pub fn range_by_score(
        &self,
        min: ScoreBound,
        max: ScoreBound,
    ) -> impl DoubleEndedIterator<Item = &Ranked> {
        let empty =
            min.value > max.value || (min.value == max.value && (min.exclusive || max.exclusive));
        let (lo, hi) = if empty {
            (None, None)
        } else {
            (
                Some(Ranked {
                    score: min.value,
                    member: Vec::new(),
                }),
                self.order.iter().next_back().cloned(),
            )
        };
        let inner = match (lo, hi) {
            (Some(lo), Some(hi)) if lo <= hi => Some(self.order.range(lo..=hi)),
            _ => None,
        };
        inner
            .into_iter()
            .flatten()
            .filter(move |r| {
                if min.exclusive {
                    r.score > min.value
                } else {
                    r.score >= min.value
                }
            })
            .filter(move |r| {
                if max.exclusive {
                    r.score < max.value
                } else {
                    r.score <= max.value
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members<'a>(it: impl Iterator<Item = &'a Ranked>) -> Vec<String> {
        it.map(|r| String::from_utf8_lossy(&r.member).into_owned())
            .collect()
    }

    #[test]
    fn orders_by_score_then_member() {
        let mut z = ZSet::default();
        assert!(z.insert(b"b", 0.0));
        assert!(z.insert(b"a", 0.0));
        assert!(z.insert(b"c", -1.0));
        assert!(!z.insert(b"c", 5.0));
        assert_eq!(members(z.iter()), ["a", "b", "c"]);
        let all = members(z.range_by_score(
            ScoreBound {
                value: f64::NEG_INFINITY,
                exclusive: false,
            },
            ScoreBound {
                value: 0.0,
                exclusive: false,
            },
        ));
        assert_eq!(all, ["a", "b"]);
        let none = members(z.range_by_score(
            ScoreBound {
                value: 0.0,
                exclusive: true,
            },
            ScoreBound {
                value: 5.0,
                exclusive: true,
            },
        ));
        assert!(none.is_empty());
        assert!(z.remove(b"a"));
        assert_eq!(z.len(), 2);
    }
}
