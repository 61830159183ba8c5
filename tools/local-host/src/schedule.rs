//! Timer schedules: NCRONTAB as the Functions host reads it, or a fixed interval for demos.
//!
//! NCRONTAB has six fields, `{second} {minute} {hour} {day} {month} {day-of-week}`, in UTC.
//! The `cron` crate reads the same syntax with one difference that matters: its day-of-week
//! numbers run 1 (Sunday) to 7, NCRONTAB's 0 (Sunday) to 6. So the day-of-week field is
//! parsed here and handed over as an explicit list in the crate's numbering; the other fields
//! pass through. Both require day-of-month AND day-of-week to match, as NCrontab does.

use std::{str::FromStr, time::Duration};

use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Utc};

#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        /// The NCRONTAB text, for messages.
        source: String,
        inner: Box<cron::Schedule>,
    },
    /// `--timer-every-ms`: not a host feature, a shortcut for local runs.
    Every(Duration),
}

impl Schedule {
    pub fn ncrontab(expr: &str) -> Result<Self> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        if fields.len() != 6 {
            if expr.contains(':') {
                bail!(
                    "schedule `{expr}` is a TimeSpan; those run only on App Service plans, use NCRONTAB"
                );
            }
            bail!(
                "schedule `{expr}` has {} fields; NCRONTAB needs 6: {{second}} {{minute}} {{hour}} {{day}} {{month}} {{day-of-week}}",
                fields.len()
            );
        }
        let dow = day_of_week(fields[5]).map_err(|e| anyhow!("schedule `{expr}`: {e}"))?;
        let translated = format!("{} {dow}", fields[..5].join(" "));
        let inner = cron::Schedule::from_str(&translated)
            .map_err(|e| anyhow!("schedule `{expr}` is not valid NCRONTAB: {e}"))?;
        if inner.upcoming(Utc).next().is_none() {
            bail!("schedule `{expr}` never fires");
        }
        Ok(Schedule::Cron {
            source: expr.to_string(),
            inner: Box::new(inner),
        })
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { inner, .. } => inner.after(&t).next(),
            Schedule::Every(d) => chrono::Duration::from_std(*d).ok().map(|d| t + d),
        }
    }

    /// The gap between the next two occurrences: how the host decides `useMonitor` when
    /// function.json leaves it out (on for schedules of a minute or more).
    pub fn interval_hint(&self) -> Duration {
        let now = Utc::now();
        self.next_after(now)
            .and_then(|a| Some((a, self.next_after(a)?)))
            .and_then(|(a, b)| (b - a).to_std().ok())
            .unwrap_or(Duration::MAX)
    }

    pub fn describe(&self) -> String {
        match self {
            Schedule::Cron { source, .. } => format!("NCRONTAB `{source}` (UTC)"),
            Schedule::Every(d) => format!("every {} ms (--timer-every-ms)", d.as_millis()),
        }
    }
}

const DAY_NAMES: [&str; 7] = [
    "sunday",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
];

/// An NCRONTAB day-of-week field (0 = Sunday … 6 = Saturday, or names) as the `cron` crate's
/// list (1 = Sunday … 7 = Saturday).
fn day_of_week(field: &str) -> Result<String> {
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: usize =
                    s.parse().ok().filter(|&s| s > 0).ok_or_else(|| {
                        anyhow!("day-of-week step `{s}` is not a positive number")
                    })?;
                (r, Some(step))
            }
            None => (item, None),
        };
        let (first, last) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (day(a)?, day(b)?);
            if a > b {
                bail!("day-of-week range `{range}` runs backwards");
            }
            (a, b)
        } else {
            let a = day(range)?;
            // `N/S` means from N to the end, every S.
            (a, if step.is_some() { 6 } else { a })
        };
        for d in (first..=last).step_by(step.unwrap_or(1)) {
            days[d] = true;
        }
    }
    if days.iter().all(|&d| d) {
        return Ok("*".into());
    }
    Ok(days
        .iter()
        .enumerate()
        .filter(|(_, on)| **on)
        .map(|(d, _)| (d + 1).to_string())
        .collect::<Vec<_>>()
        .join(","))
}

fn day(text: &str) -> Result<usize> {
    if let Ok(n) = text.parse::<usize>() {
        if n <= 6 {
            return Ok(n);
        }
        bail!("day of week `{text}` is out of range 0-6 (0 = Sunday)");
    }
    let lower = text.to_ascii_lowercase();
    if lower.len() >= 3
        && let Some(i) = DAY_NAMES.iter().position(|d| d.starts_with(&lower))
    {
        return Ok(i);
    }
    bail!("`{text}` is not a day of week (0-6 or a name)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Weekday};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next_n(s: &Schedule, from: &str, n: usize) -> Vec<String> {
        let mut t = at(from);
        (0..n)
            .map(|_| {
                t = s.next_after(t).unwrap();
                t.to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn every_five_minutes() {
        let s = Schedule::ncrontab("0 */5 * * * *").unwrap();
        assert_eq!(
            next_n(&s, "2026-11-28T08:03:17Z", 3),
            [
                "2026-11-28T08:05:00+00:00",
                "2026-11-28T08:10:00+00:00",
                "2026-11-28T08:15:00+00:00"
            ]
        );
        // Strictly after: an occurrence exactly now is not the next one.
        assert_eq!(
            next_n(&s, "2026-11-28T08:55:00Z", 2),
            ["2026-11-28T09:00:00+00:00", "2026-11-28T09:05:00+00:00"]
        );
        assert_eq!(s.interval_hint(), Duration::from_secs(300));
    }

    #[test]
    fn every_five_seconds() {
        let s = Schedule::ncrontab("*/5 * * * * *").unwrap();
        assert_eq!(
            next_n(&s, "2026-11-28T23:59:57Z", 2),
            ["2026-11-29T00:00:00+00:00", "2026-11-29T00:00:05+00:00"]
        );
        assert_eq!(s.interval_hint(), Duration::from_secs(5));
    }

    #[test]
    fn day_of_week_zero_is_sunday() {
        // 2026-11-29 is a Sunday.
        assert_eq!(
            Utc.with_ymd_and_hms(2026, 11, 29, 0, 0, 0)
                .unwrap()
                .weekday(),
            Weekday::Sun
        );
        let s = Schedule::ncrontab("0 30 9 * * 0").unwrap();
        assert_eq!(
            next_n(&s, "2026-11-28T12:00:00Z", 2),
            ["2026-11-29T09:30:00+00:00", "2026-12-06T09:30:00+00:00"]
        );
        let weekdays = Schedule::ncrontab("0 0 12 * * 1-5").unwrap();
        let days: Vec<Weekday> = (0..5)
            .scan(at("2026-11-28T13:00:00Z"), |t, _| {
                *t = weekdays.next_after(*t).unwrap();
                Some(t.weekday())
            })
            .collect();
        assert_eq!(
            days,
            [
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri
            ]
        );
        let sat = Schedule::ncrontab("0 0 0 * * 6").unwrap();
        assert_eq!(
            sat.next_after(at("2026-11-28T12:00:00Z"))
                .unwrap()
                .weekday(),
            Weekday::Sat
        );
    }

    #[test]
    fn day_of_week_field_translation() {
        assert_eq!(day_of_week("*").unwrap(), "*");
        assert_eq!(day_of_week("0").unwrap(), "1");
        assert_eq!(day_of_week("6").unwrap(), "7");
        assert_eq!(day_of_week("1-5").unwrap(), "2,3,4,5,6");
        assert_eq!(day_of_week("*/2").unwrap(), "1,3,5,7");
        assert_eq!(day_of_week("1/2").unwrap(), "2,4,6");
        assert_eq!(day_of_week("Sun,sat").unwrap(), "1,7");
        assert_eq!(day_of_week("mon-wednesday").unwrap(), "2,3,4");
        assert_eq!(day_of_week("0-6").unwrap(), "*");
        assert!(day_of_week("7").is_err());
        assert!(day_of_week("5-1").is_err());
        assert!(day_of_week("su").is_err());
        assert!(day_of_week("*/0").is_err());
    }

    #[test]
    fn rejects_what_the_host_rejects() {
        let e = Schedule::ncrontab("*/5 * * * *").unwrap_err().to_string();
        assert!(e.contains("needs 6"), "{e}");
        let e = Schedule::ncrontab("00:05:00").unwrap_err().to_string();
        assert!(e.contains("TimeSpan"), "{e}");
        assert!(Schedule::ncrontab("0 61 * * * *").is_err());
        assert!(Schedule::ncrontab("0 0 0 31 2 *").is_err());
    }

    #[test]
    fn fixed_interval() {
        let s = Schedule::Every(Duration::from_millis(2500));
        assert_eq!(
            next_n(&s, "2026-11-28T08:00:00Z", 2),
            ["2026-11-28T08:00:02.500+00:00", "2026-11-28T08:00:05+00:00"]
        );
    }
}
