//! Wall-clock helpers: Unix milliseconds and the RFC 3339 form the engine emits in `ts`.
//!
//! The engine always writes UTC with exactly three fractional digits and `Z` (§4.1), and
//! accepts any RFC 3339 time inbound.
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use wsengine_core::time::{parse_rfc3339_millis, rfc3339_millis};
//!
//! let t = UNIX_EPOCH + Duration::from_millis(1_795_969_337_832);
//! assert_eq!(rfc3339_millis(t), "2026-11-29T16:22:17.832Z");
//! assert_eq!(parse_rfc3339_millis("2026-11-29T16:22:17.832512+00:00"), Some(1_795_969_337_832));
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MILLIS_PER_DAY: i64 = 86_400_000;

/// The current time in Unix epoch milliseconds (0 if the clock is before 1970).
pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// Formats `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, milliseconds truncated).
///
/// Instants outside years 0000–9999, which RFC 3339 cannot express, are clamped to that range.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let millis: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i128,
        // Before the epoch: floor to the millisecond so the fraction stays non-negative.
        Err(e) => {
            let d = e.duration();
            -(d.as_millis() as i128) - i128::from(d.subsec_nanos() % 1_000_000 != 0)
        }
    };
    // 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z.
    const MIN: i128 = -62_167_219_200_000;
    const MAX: i128 = 253_402_300_799_999;
    let millis = millis.clamp(MIN, MAX) as i64;
    format_millis(millis)
}

/// The current time in the engine's RFC 3339 form.
pub fn now_rfc3339() -> String {
    rfc3339_millis(SystemTime::now())
}

fn format_millis(millis: i64) -> String {
    let days = millis.div_euclid(MILLIS_PER_DAY);
    let ms_of_day = millis.rem_euclid(MILLIS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let secs = ms_of_day / 1000;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", secs / 3600, secs / 60 % 60, secs % 60, ms_of_day % 1000)
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), using 400-year eras
/// so the arithmetic needs no tables and works for negative days.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each counted year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365, from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses an RFC 3339 date-time (`T`, `t` or a space as separator; any number of fractional
/// digits; `Z`, `z` or `±HH:MM`) to Unix epoch milliseconds, fractions truncated.
///
/// A leap second (`:60`) is read as the last millisecond of the preceding second's minute.
/// Returns `None` for anything malformed or out of range.
pub fn parse_rfc3339_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |from: usize, len: usize| -> Option<u32> {
        let digits = b.get(from..from + len)?;
        digits.iter().try_fold(0u32, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0')))
    };
    let year = i64::from(num(0, 4)?);
    let month = num(5, 2)?;
    let day = num(8, 2)?;
    let hour = num(11, 2)?;
    let minute = num(14, 2)?;
    let second = num(17, 2)?;
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                frac_ms = frac_ms * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            frac_ms *= 10;
        }
    }
    let offset_min: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        &sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = i64::from(oh * 60 + om);
            if sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    let (second, frac_ms) = if second == 60 { (59, 999) } else { (second, frac_ms) };
    let secs =
        days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_min * 60;
    Some(secs * 1000 + frac_ms)
}

/// Converts Unix epoch milliseconds (possibly negative) to a [`SystemTime`].
pub fn system_time_from_millis(millis: i64) -> SystemTime {
    let d = Duration::from_millis(millis.unsigned_abs());
    if millis >= 0 { UNIX_EPOCH + d } else { UNIX_EPOCH - d }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(millis: i64) -> String {
        rfc3339_millis(system_time_from_millis(millis))
    }

    #[test]
    fn known_instants() {
        let table = [
            (0, "1970-01-01T00:00:00.000Z"),
            (1, "1970-01-01T00:00:00.001Z"),
            (1_795_969_337_832, "2026-11-29T16:22:17.832Z"),
            // Leap days: 2024-02-29, and 2000-02-29 (divisible by 400).
            (1_709_164_800_000, "2024-02-29T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (951_868_799_999, "2000-02-29T23:59:59.999Z"),
            (951_868_800_000, "2000-03-01T00:00:00.000Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"), // 2100 is not a leap year
            (-1, "1969-12-31T23:59:59.999Z"),
            (-86_400_000, "1969-12-31T00:00:00.000Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
            (i64::MAX, "9999-12-31T23:59:59.999Z"),
            (-62_167_219_200_000, "0000-01-01T00:00:00.000Z"),
        ];
        for (ms, want) in table {
            assert_eq!(at(ms), want, "{ms}");
        }
    }

    #[test]
    fn sub_millisecond_parts_are_truncated() {
        let t = UNIX_EPOCH + Duration::from_nanos(1_795_969_337_832_999_999);
        assert_eq!(rfc3339_millis(t), "2026-11-29T16:22:17.832Z");
        let before = UNIX_EPOCH - Duration::from_nanos(1);
        assert_eq!(rfc3339_millis(before), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn now_has_the_engine_shape() {
        let s = now_rfc3339();
        assert_eq!(s.len(), 24);
        assert!(s.ends_with('Z'));
        assert_eq!(&s[19..20], ".");
        let parsed = parse_rfc3339_millis(&s).unwrap();
        let now = unix_millis() as i64;
        assert!((now - parsed).abs() < 5_000);
    }

    #[test]
    fn parse_table() {
        let table = [
            ("2026-11-29T16:22:17.832Z", Some(1_795_969_337_832)),
            ("2026-11-29T16:22:17.835512+00:00", Some(1_795_969_337_835)),
            ("2026-11-29t16:22:17z", Some(1_795_969_337_000)),
            ("2026-11-29 16:22:17.8Z", Some(1_795_969_337_800)),
            ("2026-11-29T18:22:17.832+02:00", Some(1_795_969_337_832)),
            ("2026-11-29T15:52:17.832-00:30", Some(1_795_969_337_832)),
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2016-12-31T23:59:60Z", Some(1_483_228_799_999)),
            ("2023-02-29T00:00:00Z", None),
            ("2026-13-01T00:00:00Z", None),
            ("2026-11-29T24:00:00Z", None),
            ("2026-11-29T16:22:17.Z", None),
            ("2026-11-29T16:22:17", None),
            ("2026-11-29T16:22:17.832", None),
            ("2026-11-29T16:22:17+0000", None),
            ("2026-11-29T16:22:17Zx", None),
            ("2026-11-2916:22:17.832Z", None),
            ("+026-11-29T16:22:17Z", None),
            ("", None),
        ];
        for (s, want) in table {
            assert_eq!(parse_rfc3339_millis(s), want, "{s}");
        }
    }

    proptest! {
        #[test]
        fn format_parse_round_trip(ms in -62_167_219_200_000i64..=253_402_300_799_999) {
            let s = at(ms);
            prop_assert_eq!(s.len(), 24);
            prop_assert_eq!(parse_rfc3339_millis(&s), Some(ms));
        }

        #[test]
        fn days_round_trip(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert!((1..=12).contains(&m));
            prop_assert!(d >= 1 && d <= days_in_month(y, m));
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_rfc3339_millis(&s);
        }
    }
}
