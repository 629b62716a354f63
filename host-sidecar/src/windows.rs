//! Calendar windows and their period ids.
//!
//! A window never needs a scheduler to reset: the sidecar computes the id of the *current* period
//! in the account's timezone (`d:2026-11-22`, `m:2026-11`, ...) and passes it to Lua, where each
//! period has its own counter. When the clock crosses a boundary the id changes and the new
//! counter starts at zero — exactly once, lazily, on whichever request comes first.
//!
//! Day, week and month windows start at `day_starts_at` local time (e.g. 00:05); months start on
//! the account's billing anchor day (1..=28). Minute and hour windows follow the local clock.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc,
    Weekday,
};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Lifetime,
    /// Not a period of time: what is held at once (requests in flight), taken at authorize and
    /// given back when the hold settles or expires.
    Concurrent,
    /// The last 60 s / 3,600 s at every instant, not a calendar period (lua/lib.lua `slide`).
    #[serde(rename = "sliding_minute")]
    SlidingMinute,
    #[serde(rename = "sliding_hour")]
    SlidingHour,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Week => "week",
            Window::Month => "month",
            Window::Lifetime => "lifetime",
            Window::Concurrent => "concurrent",
            Window::SlidingMinute => "sliding_minute",
            Window::SlidingHour => "sliding_hour",
        }
    }

    /// A sliding window's length in ms.
    pub fn sliding_ms(self) -> Option<u64> {
        match self {
            Window::SlidingMinute => Some(60_000),
            Window::SlidingHour => Some(3_600_000),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSettings {
    pub day_offset_minutes: u32,
    pub week_start: Weekday,
}

impl Default for WindowSettings {
    fn default() -> Self {
        Self {
            day_offset_minutes: 0,
            week_start: Weekday::Mon,
        }
    }
}

/// One period of a window: its id and when it ends (unix ms; 0 = never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub id: String,
    pub end_ms: u64,
}

/// The instant a local wall-clock time names. In a DST gap (the time does not exist) the first
/// instant after the gap is used; when it occurs twice, the first.
fn resolve(tz: Tz, local: NaiveDateTime) -> DateTime<Tz> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t,
        LocalResult::Ambiguous(a, _) => a,
        LocalResult::None => {
            let mut probe = local;
            for _ in 0..8 {
                probe += Duration::minutes(15);
                if let Some(t) = tz.from_local_datetime(&probe).earliest() {
                    return t;
                }
            }
            tz.from_utc_datetime(&local)
        }
    }
}

fn ms(t: DateTime<Tz>) -> u64 {
    u64::try_from(t.timestamp_millis()).unwrap_or(0)
}

fn month_start(year: i32, month: u32, anchor: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(year, month, anchor.clamp(1, 28)).unwrap_or(NaiveDate::MIN)
}

fn add_month(d: NaiveDate) -> NaiveDate {
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    month_start(y, m, d.day())
}

/// The current period of `window` at `now_ms` for an account in `tz` whose months start on
/// `anchor_day`.
pub fn current_period(
    window: Window,
    now_ms: u64,
    tz: Tz,
    s: &WindowSettings,
    anchor_day: u32,
) -> Period {
    let now = Utc
        .timestamp_millis_opt(now_ms as i64)
        .single()
        .unwrap_or_default()
        .with_timezone(&tz);
    let local = now.naive_local();
    let offset = Duration::minutes(i64::from(s.day_offset_minutes));
    match window {
        Window::Lifetime => Period {
            id: "l".into(),
            end_ms: 0,
        },
        // The scripts give a `c` counter back in full when its hold settles (lua/lib.lua).
        Window::Concurrent => Period {
            id: "c".into(),
            end_ms: 0,
        },
        // One counter for good (`s:<ms>`): the scripts drop what leaves the window.
        Window::SlidingMinute | Window::SlidingHour => Period {
            id: format!("s:{}", window.sliding_ms().unwrap_or(60_000)),
            end_ms: 0,
        },
        Window::Minute | Window::Hour => {
            // Measured back from the instant, not from the wall clock: when a DST change repeats
            // an hour, its two passes are different periods (the id carries the UTC offset).
            let hour = window == Window::Hour;
            let mut into = u64::from(local.second()) * 1000
                + u64::from((local.nanosecond() / 1_000_000).min(999));
            if hour {
                into += u64::from(local.minute()) * 60_000;
            }
            let into = into.min(now_ms);
            let start = now - Duration::milliseconds(into as i64);
            let (len, fmt) = if hour {
                (3_600_000, "h:%Y-%m-%dT%H%z")
            } else {
                (60_000, "i:%Y-%m-%dT%H:%M%z")
            };
            Period {
                id: start.format(fmt).to_string(),
                end_ms: now_ms - into + len,
            }
        }
        Window::Day | Window::Week | Window::Month => {
            // Shift by the reset offset so that 00:03 with a 00:05 reset still belongs to yesterday.
            let date = (local - offset).date();
            let (next, id) = match window {
                Window::Day => (date + Duration::days(1), format!("d:{date}")),
                Window::Week => {
                    let back = (7 + date.weekday().num_days_from_monday()
                        - s.week_start.num_days_from_monday())
                        % 7;
                    let start = date - Duration::days(i64::from(back));
                    (start + Duration::days(7), format!("w:{start}"))
                }
                _ => {
                    let anchor = anchor_day.clamp(1, 28);
                    let this = month_start(date.year(), date.month(), anchor);
                    let start = if date >= this {
                        this
                    } else if date.month() == 1 {
                        month_start(date.year() - 1, 12, anchor)
                    } else {
                        month_start(date.year(), date.month() - 1, anchor)
                    };
                    let id = if anchor == 1 {
                        format!("m:{}", start.format("%Y-%m"))
                    } else {
                        format!("m:{start}")
                    };
                    (add_month(start), id)
                }
            };
            let end_local = next.and_hms_opt(0, 0, 0).unwrap_or_default() + offset;
            Period {
                id,
                end_ms: ms(resolve(tz, end_local)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> u64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis() as u64
    }

    #[test]
    fn day_resets_at_local_midnight() {
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let s = WindowSettings::default();
        // 15:59:59Z is 23:59:59 in Shanghai; one second later is the next local day.
        let before = current_period(Window::Day, at("2026-11-22T15:59:59Z"), tz, &s, 1);
        let after = current_period(Window::Day, at("2026-11-22T16:00:00Z"), tz, &s, 1);
        assert_eq!(before.id, "d:2026-11-22");
        assert_eq!(after.id, "d:2026-11-23");
        assert_eq!(before.end_ms, at("2026-11-22T16:00:00Z"));
    }

    #[test]
    fn reset_offset_and_anchor_day() {
        let tz: Tz = "UTC".parse().unwrap();
        let s = WindowSettings {
            day_offset_minutes: 5,
            week_start: Weekday::Mon,
        };
        assert_eq!(
            current_period(Window::Day, at("2026-11-22T00:03:00Z"), tz, &s, 1).id,
            "d:2026-11-21"
        );
        assert_eq!(
            current_period(Window::Day, at("2026-11-22T00:05:00Z"), tz, &s, 1).id,
            "d:2026-11-22"
        );
        let m = current_period(Window::Month, at("2026-01-10T12:00:00Z"), tz, &s, 15);
        assert_eq!(m.id, "m:2025-12-15");
        assert_eq!(m.end_ms, at("2026-01-15T00:05:00Z"));
        let w = current_period(Window::Week, at("2026-11-22T12:00:00Z"), tz, &s, 1); // a Sunday
        assert_eq!(w.id, "w:2026-11-16");
    }

    #[test]
    fn dst_day_is_23_hours_long() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let s = WindowSettings::default();
        let p = current_period(Window::Day, at("2026-03-08T12:00:00Z"), tz, &s, 1);
        assert_eq!(p.id, "d:2026-03-08");
        assert_eq!(p.end_ms, at("2026-03-09T04:00:00Z"));
        let h = current_period(Window::Hour, at("2026-03-08T06:30:00Z"), tz, &s, 1); // 01:30 EST
        assert_eq!(h.end_ms, at("2026-03-08T07:00:00Z")); // 03:00 EDT, the gap skipped
        assert_eq!(h.id, "h:2026-03-08T01-0500");
    }

    #[test]
    fn a_repeated_hour_is_two_periods() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let s = WindowSettings::default();
        // 01:30 EDT, then 01:30 EST an hour later.
        let first = current_period(Window::Hour, at("2026-11-01T05:30:00Z"), tz, &s, 1);
        let second = current_period(Window::Hour, at("2026-11-01T06:30:00Z"), tz, &s, 1);
        assert_ne!(first.id, second.id);
        assert_eq!(first.end_ms, at("2026-11-01T06:00:00Z"));
        assert_eq!(second.end_ms, at("2026-11-01T07:00:00Z"));
        let m = current_period(Window::Minute, at("2026-11-01T06:30:59.999Z"), tz, &s, 1);
        assert_eq!(
            (m.id.as_str(), m.end_ms),
            ("i:2026-11-01T01:30-0500", at("2026-11-01T06:31:00Z"))
        );
        // Half-hour offsets: the local hour, not the UTC one.
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let h = current_period(Window::Hour, at("2026-11-22T10:45:00Z"), kolkata, &s, 1); // 16:15 IST
        assert_eq!(h.end_ms, at("2026-11-22T11:30:00Z"));
    }
}
