//! A stream: entries keyed by `ms-seq` ids, plus the last id ever added (which, as in Redis,
//! survives deletes and trims so new ids keep increasing). An emptied stream stays a key.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// The next id, or None after the last possible one.
    pub fn incr(self) -> Option<StreamId> {
        if self.seq == u64::MAX {
            if self.ms == u64::MAX {
                return None;
            }
            Some(StreamId {
                ms: self.ms + 1,
                seq: 0,
            })
        } else {
            Some(StreamId {
                ms: self.ms,
                seq: self.seq + 1,
            })
        }
    }

    /// The previous id, or None before 0-0.
    pub fn decr(self) -> Option<StreamId> {
        if self.seq == 0 {
            if self.ms == 0 {
                return None;
            }
            Some(StreamId {
                ms: self.ms - 1,
                seq: u64::MAX,
            })
        } else {
            Some(StreamId {
                ms: self.ms,
                seq: self.seq - 1,
            })
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Stream entries: id → flat field/value list.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    pub entries: BTreeMap<StreamId, Vec<Vec<u8>>>,
    pub last_id: StreamId,
}

impl Stream {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Removes entries with an id below `min`; returns how many.
    pub fn trim_min_id(&mut self, min: StreamId) -> usize {
        let keep = self.entries.split_off(&min);
        let removed = self.entries.len();
        self.entries = keep;
        removed
    }

    /// Removes the oldest entries until at most `max` remain; returns how many.
    pub fn trim_max_len(&mut self, max: usize) -> usize {
        let mut removed = 0;
        while self.entries.len() > max {
            if self.entries.pop_first().is_none() {
                break;
            }
            removed += 1;
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_step_and_trim() {
        let id = StreamId {
            ms: 5,
            seq: u64::MAX,
        };
        assert_eq!(id.incr(), Some(StreamId { ms: 6, seq: 0 }));
        assert_eq!(StreamId::MAX.incr(), None);
        assert_eq!(StreamId::MIN.decr(), None);
        let mut s = Stream::default();
        for ms in 1..=5 {
            s.entries.insert(StreamId { ms, seq: 0 }, vec![]);
        }
        assert_eq!(s.trim_min_id(StreamId { ms: 3, seq: 0 }), 2);
        assert_eq!(s.trim_max_len(1), 2);
        assert_eq!(s.entries.keys().next(), Some(&StreamId { ms: 5, seq: 0 }));
    }
}
