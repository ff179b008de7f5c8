//! Go-style durations, as the reference Drafter's flags take them:
//! `1m0s`, `500ms`, `1h30m`, `2.5s`, `0`.

use std::time::Duration;

/// Parses a Go duration (`time.ParseDuration`): a sequence of decimal
/// numbers, each with an optional fraction and a unit (`ns`, `us`, `µs`,
/// `ms`, `s`, `m`, `h`), e.g. `1m0s` or `1.5h`. A lone `0` is zero. Negative
/// durations are refused.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration {s:?}: {why} (examples: 1m0s, 500ms, 5s)");
    let mut rest = s.trim();
    if let Some(r) = rest.strip_prefix('+') {
        rest = r;
    }
    if rest.starts_with('-') {
        return Err(bad("negative"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad("expected a number"));
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| bad("malformed number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit: f64 = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(bad("missing unit")),
            _ => return Err(bad("unknown unit")),
        };
        rest = &rest[unit_len..];
        total += number * nanos_per_unit;
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// Formats a duration the way Go prints one (`1m0s`, `500ms`, `5s`).
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        return if nanos.is_multiple_of(1_000_000) {
            format!("{}ms", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            format!("{}µs", nanos / 1_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let frac = d.subsec_nanos();
    let sec = if frac == 0 {
        format!("{s}s")
    } else {
        let f = format!("{:09}", frac);
        format!("{s}.{}s", f.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => sec,
        (0, m) => format!("{m}m{sec}"),
        (h, m) => format!("{h}h{m}m{sec}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_go_prints_and_accepts() {
        let ok = |s: &str, d: Duration| assert_eq!(parse_go_duration(s), Ok(d), "{s}");
        ok("1m0s", Duration::from_secs(60));
        ok("1m", Duration::from_secs(60));
        ok("500ms", Duration::from_millis(500));
        ok("5s", Duration::from_secs(5));
        ok("1h30m", Duration::from_secs(5400));
        ok("1.5s", Duration::from_millis(1500));
        ok("10us", Duration::from_micros(10));
        ok("10µs", Duration::from_micros(10));
        ok("7ns", Duration::from_nanos(7));
        ok("0", Duration::ZERO);
        ok("2m30.5s", Duration::from_millis(150_500));
        for bad in ["", "5", "-1s", "1x", "s", "1m0", "1..2s", "abc"] {
            let e = parse_go_duration(bad).err().unwrap_or_default();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::from_secs(60)), "1m0s");
        assert_eq!(format_go_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::from_secs(3725)), "1h2m5s");
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
        for d in [60_000u64, 5_000, 500, 1_500, 3_725_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d));
        }
    }
}
