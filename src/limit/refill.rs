//! When a usage allowance refills: the start of the period a moment falls in, pure calendar
//! arithmetic on UTC milliseconds (no time-zone database, no dependency).
//!
//! Counters store the start of the period they count for; a decision that computes a later start
//! refills (counts from zero again). Starts only move forward, so instances whose clocks differ
//! by a little refill once per period, at the earliest of their boundaries.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DAY_MS: u64 = 24 * 3600 * 1000;

#[doc = include_str!("../../docs/refill.md")]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Refill(Schedule);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Schedule {
    Daily,
    /// On this day of each month (1–31; the month's last day where it has fewer).
    Monthly(u8),
    /// Every this many milliseconds, counted from the Unix epoch.
    Every(u64),
}

#[doc = include_str!("../../docs/invalid_refill.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRefill(String);

impl fmt::Display for InvalidRefill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid refill {:?}: write `daily`, `monthly:<day 1-31>` or `every:<n>s` / `every:<n>ms` (1 ms to 366 days)",
            self.0
        )
    }
}

impl std::error::Error for InvalidRefill {}

impl Refill {
    /// The longest period [`every`](Self::every) takes: 366 days, as for a rate limit's window.
    pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);

    /// Each day at 00:00 UTC.
    #[must_use]
    pub const fn daily() -> Self {
        Self(Schedule::Daily)
    }

    /// Each month on `day` at 00:00 UTC; in a month without that day (31 in April, 29–31 in
    /// February), on its last day.
    ///
    /// # Errors
    /// [`InvalidRefill`] for a day outside 1–31.
    pub fn monthly(day: u8) -> Result<Self, InvalidRefill> {
        match day {
            1..=31 => Ok(Self(Schedule::Monthly(day))),
            _ => Err(InvalidRefill(format!("monthly:{day}"))),
        }
    }

    /// Every `period`, from the Unix epoch (so every instance draws the same boundaries).
    ///
    /// # Errors
    /// [`InvalidRefill`] for a period under 1 ms (or not whole milliseconds) or above
    /// [`MAX_PERIOD`](Self::MAX_PERIOD).
    pub fn every(period: Duration) -> Result<Self, InvalidRefill> {
        let whole = period.subsec_nanos().is_multiple_of(1_000_000);
        if !whole || period < Duration::from_millis(1) || period > Self::MAX_PERIOD {
            return Err(InvalidRefill(format!("every {period:?}")));
        }
        Ok(Self(Schedule::Every(period.as_millis() as u64)))
    }

    /// The start of the period `at` falls in, in milliseconds since the Unix epoch (0 before it).
    #[must_use]
    pub fn period_start(&self, at: SystemTime) -> u64 {
        let ms = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64);
        match self.0 {
            Schedule::Daily => ms - ms % DAY_MS,
            Schedule::Every(period) => ms - ms % period,
            Schedule::Monthly(day) => {
                let today = ms / DAY_MS;
                let (year, month, _) = civil(today);
                let this = anchor(year, month, day);
                let start = if today >= this {
                    this
                } else if month == 1 {
                    anchor(year - 1, 12, day)
                } else {
                    anchor(year, month - 1, day)
                };
                start * DAY_MS
            }
        }
    }
}

/// The day (since the epoch) of `day` in `year`-`month`, or the month's last day.
fn anchor(year: i64, month: u32, day: u8) -> u64 {
    days_from_civil(year, month, u32::from(day).min(days_in_month(year, month)))
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// (year, month 1–12, day 1–31) of a day since 1970-01-01, by Howard Hinnant's `civil_from_days`.
fn civil(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Days since 1970-01-01 of a date on or after it (Hinnant's `days_from_civil`); 0 before it.
fn days_from_civil(year: i64, month: u32, day: u32) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468).max(0) as u64
}

impl fmt::Display for Refill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Schedule::Daily => f.write_str("daily"),
            Schedule::Monthly(day) => write!(f, "monthly:{day}"),
            Schedule::Every(ms) if ms.is_multiple_of(1000) => write!(f, "every:{}s", ms / 1000),
            Schedule::Every(ms) => write!(f, "every:{ms}ms"),
        }
    }
}

impl fmt::Debug for Refill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Refill({self})")
    }
}

impl FromStr for Refill {
    type Err = InvalidRefill;

    /// `daily`, `monthly:<day>`, `every:<n>s` or `every:<n>ms`.
    fn from_str(text: &str) -> Result<Self, InvalidRefill> {
        let bad = || InvalidRefill(text.to_owned());
        let text = text.trim();
        if text == "daily" {
            return Ok(Self::daily());
        }
        if let Some(day) = text.strip_prefix("monthly:") {
            return Self::monthly(day.trim().parse().map_err(|_| bad())?).map_err(|_| bad());
        }
        let every = text.strip_prefix("every:").ok_or_else(bad)?.trim();
        let period = match every.strip_suffix("ms") {
            Some(ms) => Duration::from_millis(ms.parse().map_err(|_| bad())?),
            None => Duration::from_secs(every.strip_suffix('s').ok_or_else(bad)?.parse().map_err(|_| bad())?),
        };
        Self::every(period).map_err(|_| bad())
    }
}

impl serde::Serialize for Refill {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Refill {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn the_civil_conversions_round_trip() {
        for days in (0..200_000u64).step_by(7) {
            let (y, m, d) = civil(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn schedules_read_and_print_the_same() {
        for text in ["daily", "monthly:1", "monthly:31", "every:1s", "every:1500ms", "every:86400s"] {
            assert_eq!(text.parse::<Refill>().unwrap().to_string(), text);
        }
        for bad in ["", "weekly", "monthly:0", "monthly:32", "every:0s", "every:s", "every:1h", "every:31622401s"] {
            assert!(bad.parse::<Refill>().is_err(), "{bad}");
        }
        assert!(Refill::every(Duration::from_micros(1500)).is_err());
    }

    #[test]
    fn a_monthly_refill_on_the_31st_falls_on_a_short_month_s_last_day() {
        let r = Refill::monthly(31).unwrap();
        let day = |y, m, d| days_from_civil(y, m, d) * DAY_MS;
        // 2025-03-15: the period began on 28 February (no 31st then).
        assert_eq!(r.period_start(at(day(2025, 3, 15))), day(2025, 2, 28));
        assert_eq!(r.period_start(at(day(2024, 3, 1))), day(2024, 2, 29));
        assert_eq!(r.period_start(at(day(2025, 3, 31) - 1)), day(2025, 2, 28));
        assert_eq!(r.period_start(at(day(2025, 3, 31))), day(2025, 3, 31));
        // January, from December of the year before.
        assert_eq!(Refill::monthly(15).unwrap().period_start(at(day(2026, 1, 3))), day(2025, 12, 15));
    }
}
