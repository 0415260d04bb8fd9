//! Units in topology files: durations, sizes, rates, times of day and weekdays.
//!
//! - Durations: `"90s"`, `"15m"`, `"1h30m"`, `"2d"` (humantime syntax: `s`, `m`,
//!   `h`, `d`, `w` and their long forms; parts add up).
//! - Sizes: a TOML integer (bytes) or a string `"<integer><unit>"` with unit `B`,
//!   decimal `KB` `MB` `GB` `TB` (powers of 1000) or binary `KiB` `MiB` `GiB` `TiB`
//!   (powers of 1024). A string without unit is bytes.
//! - Rates, always returned in bits per second: bit rates `bit`, `Kbit`, `Mbit`,
//!   `Gbit` (decimal: 1 Mbit = 1 000 000 bit/s; `/s` and `ps` suffixes allowed,
//!   e.g. `"100Mbit/s"`, `"100Mbps"`), byte rates `B/s`, decimal `KB/s` `MB/s`
//!   `GB/s` (1 MB/s = 8 000 000 bit/s) and binary `KiB/s` `MiB/s` `GiB/s`
//!   (1 MiB/s = 8 388 608 bit/s). The number may have a fraction: `"1.5Gbit"`.
//! - Times of day: `"HH:MM"`, 24-hour clock, node local time.
//! - Weekdays: `mon tue wed thu fri sat sun`; day sets are comma lists of days
//!   and ranges (`"mon-fri"`, `"sat,sun"`, `"fri-mon"` wraps), or `"daily"`.
//!
//! Every function returns an error message that says what was found and what
//! was expected; callers add the position.

use std::time::Duration;

use crate::schema::{DaySet, TimeOfDay, Weekday};

/// Example durations for messages.
pub const DURATION_EXAMPLES: &str = "a duration like \"90s\", \"15m\", \"1h30m\" or \"2d\"";
/// Example sizes for messages.
pub const SIZE_EXAMPLES: &str = "a size like \"4KiB\", \"1MiB\", \"512MB\" or an integer number of bytes";
/// Example rates for messages.
pub const RATE_EXAMPLES: &str =
    "a rate like \"100Mbit\", \"1.5Gbit\", \"12MB/s\" or \"10MiB/s\" (units: bit Kbit Mbit Gbit, B/s KB/s MB/s GB/s, KiB/s MiB/s GiB/s)";

/// Parses a duration such as `"15m"` or `"1h30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("empty duration; expected {DURATION_EXAMPLES}"));
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("duration {text:?} has no unit; expected {DURATION_EXAMPLES}"));
    }
    humantime::parse_duration(trimmed).map_err(|e| format!("bad duration {text:?} ({e}); expected {DURATION_EXAMPLES}"))
}

/// Splits `"12.5MB/s"` into `("12.5", "MB/s")`, trimming spaces between them.
fn split_number(text: &str) -> (&str, &str) {
    let text = text.trim();
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(text.len());
    (&text[..end], text[end..].trim())
}

/// Parses a decimal number with an optional fraction, scaled by `unit`, rounding down.
fn scaled(number: &str, unit: u128) -> Option<u128> {
    let number = number.replace('_', "");
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number.as_str(), ""),
    };
    if int.is_empty() || frac.contains('.') || frac.len() > 9 {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u128 = int.parse().ok()?;
    let frac_value: u128 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    let denom = 10u128.pow(frac.len() as u32);
    let whole = int.checked_mul(unit)?;
    Some(whole + frac_value * unit / denom)
}

/// Parses a size in bytes: `"4KiB"`, `"512MB"`, `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text);
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(format!("bad size {text:?}: unknown unit {unit:?}; expected {SIZE_EXAMPLES}")),
    };
    if number.is_empty() || number.contains('.') {
        return Err(format!("bad size {text:?}: expected a whole number before the unit; expected {SIZE_EXAMPLES}"));
    }
    scaled(number, u128::from(mult))
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| format!("bad size {text:?}: not a number or too large; expected {SIZE_EXAMPLES}"))
}

/// Parses a rate into bits per second: `"100Mbit"`, `"12MB/s"`, `"10MiB/s"`.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text);
    let bit_unit = unit.strip_suffix("/s").or_else(|| unit.strip_suffix("ps")).unwrap_or(unit);
    let mult: u128 = match (unit, bit_unit) {
        (_, "bit" | "b") => 1,
        (_, "Kbit" | "kbit" | "Kb" | "kb") => 1_000,
        (_, "Mbit" | "mbit" | "Mb") => 1_000_000,
        (_, "Gbit" | "gbit" | "Gb") => 1_000_000_000,
        ("B/s", _) => 8,
        ("KB/s" | "kB/s", _) => 8_000,
        ("MB/s", _) => 8_000_000,
        ("GB/s", _) => 8_000_000_000,
        ("KiB/s", _) => 8 << 10,
        ("MiB/s", _) => 8 << 20,
        ("GiB/s", _) => 8 << 30,
        ("", _) => return Err(format!("rate {text:?} has no unit; expected {RATE_EXAMPLES}")),
        _ => return Err(format!("bad rate {text:?}: unknown unit {unit:?}; expected {RATE_EXAMPLES}")),
    };
    let value = scaled(number, mult)
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| format!("bad rate {text:?}: not a number or too large; expected {RATE_EXAMPLES}"))?;
    if value == 0 {
        return Err(format!("rate {text:?} is zero; expected a positive rate, or \"unlimited\" where allowed"));
    }
    Ok(value)
}

/// A whole percent from 1 to 100, written `"10%"` (the `%` may be left out).
pub fn parse_percent(text: &str) -> Result<u32, String> {
    match text.trim().trim_end_matches('%').trim().parse::<u32>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("{text:?} is not a share from 1% to 100% (write it like \"10%\")")),
    }
}

/// Parses `"HH:MM"` (24-hour clock). `"24:00"` is accepted only when `allow_24` is set
/// (the end of a window).
pub fn parse_time_of_day(text: &str, allow_24: bool) -> Result<TimeOfDay, String> {
    let expected =
        if allow_24 { "a time \"HH:MM\" from 00:00 to 24:00" } else { "a time \"HH:MM\" from 00:00 to 23:59" };
    let bad = || format!("bad time {text:?}; expected {expected}");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let hour: u16 = h.parse().map_err(|_| bad())?;
    let minute: u16 = m.parse().map_err(|_| bad())?;
    if minute > 59 || hour > 24 || (hour == 24 && (minute != 0 || !allow_24)) {
        return Err(bad());
    }
    Ok(TimeOfDay { minutes: hour * 60 + minute })
}

/// Parses a weekday name: `mon`, `monday`, … (any case).
pub fn parse_weekday(text: &str) -> Result<Weekday, String> {
    let lower = text.trim().to_ascii_lowercase();
    Weekday::ALL
        .into_iter()
        .find(|d| lower == d.name() || (lower.len() > 3 && full_name(*d) == lower))
        .ok_or_else(|| format!("bad day {text:?}; expected one of mon, tue, wed, thu, fri, sat, sun"))
}

fn full_name(day: Weekday) -> &'static str {
    ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"][day as usize]
}

/// Parses a day set: `"mon-fri"`, `"sat,sun"`, `"fri-mon"`, `"daily"`.
pub fn parse_days(text: &str) -> Result<DaySet, String> {
    let mut set = DaySet::default();
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("daily") || trimmed.eq_ignore_ascii_case("all") {
        for d in Weekday::ALL {
            set.insert(d);
        }
        return Ok(set);
    }
    for part in trimmed.split(',') {
        let wrap = |e: String| format!("{e} in days {text:?}; expected e.g. \"mon-fri\", \"sat,sun\" or \"daily\"");
        match part.split_once('-') {
            Some((a, b)) => {
                let a = parse_weekday(a).map_err(wrap)? as usize;
                let b = parse_weekday(b).map_err(wrap)? as usize;
                let mut d = a;
                loop {
                    set.insert(Weekday::ALL[d]);
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => set.insert(parse_weekday(part).map_err(wrap)?),
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {

    #[test]
    fn percents_are_whole_and_between_1_and_100() {
        assert_eq!(parse_percent("10%"), Ok(10));
        assert_eq!(parse_percent(" 100 % "), Ok(100));
        assert_eq!(parse_percent("1"), Ok(1));
        for bad in ["0%", "101%", "ten", "", "5.5%", "-3%"] {
            assert!(parse_percent(bad).unwrap_err().contains("1% to 100%"), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86400)));
        assert!(parse_duration("15").unwrap_err().contains("no unit"));
        assert!(parse_duration("15x").unwrap_err().contains("expected a duration"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512MB"), Ok(512_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("1Mib").unwrap_err().contains("unknown unit \"Mib\""));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100Mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("100Mbit/s"), Ok(100_000_000));
        assert_eq!(parse_rate("100Mbps"), Ok(100_000_000));
        assert_eq!(parse_rate("1.5Gbit"), Ok(1_500_000_000));
        assert_eq!(parse_rate("12MB/s"), Ok(96_000_000));
        assert_eq!(parse_rate("1MiB/s"), Ok(8 * 1024 * 1024));
        assert_eq!(parse_rate("64Kbit"), Ok(64_000));
        assert!(parse_rate("100").unwrap_err().contains("no unit"));
        assert!(parse_rate("100MB").unwrap_err().contains("unknown unit"));
        assert!(parse_rate("0Mbit").unwrap_err().contains("zero"));
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn times_and_days() {
        assert_eq!(parse_time_of_day("08:30", false), Ok(TimeOfDay { minutes: 510 }));
        assert_eq!(parse_time_of_day("24:00", true), Ok(TimeOfDay { minutes: 1440 }));
        assert!(parse_time_of_day("24:00", false).is_err());
        assert!(parse_time_of_day("8", false).is_err());
        assert!(parse_time_of_day("12:60", false).is_err());
        assert!(parse_time_of_day("25:00", true).is_err());
        let weekdays = parse_days("mon-fri").unwrap();
        assert!(weekdays.contains(Weekday::Mon) && weekdays.contains(Weekday::Fri));
        assert!(!weekdays.contains(Weekday::Sat));
        let wrap = parse_days("fri-mon").unwrap();
        assert_eq!(wrap.bits.count_ones(), 4);
        assert_eq!(parse_days("daily").unwrap().bits, 0x7f);
        assert_eq!(parse_days("sat,sun").unwrap().bits.count_ones(), 2);
        assert!(parse_days("mon-fry").unwrap_err().contains("bad day \"fry\""));
    }
}
