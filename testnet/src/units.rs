//! Units of the command line and of the printed tables: seconds (every duration
//! flag goes through [`check_secs`] or [`parse_secs`]) and byte counts.

/// The longest duration any flag accepts: 30 days. Past it a run is a mistake,
/// and every `Instant + Duration` and `Duration::from_secs_f64` stays far from
/// overflow.
pub(crate) const MAX_SECS: f64 = 30.0 * 24.0 * 3600.0;

/// Whether 0 seconds is a valid value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Zero {
    Allowed,
    Refused,
}

/// A duration in seconds given to `what` (a flag, or a flag and its value):
/// finite, not negative (with [`Zero::Refused`] more than 0) and at most [`MAX_SECS`].
pub(crate) fn check_secs(what: &str, secs: f64, zero: Zero) -> Result<f64, String> {
    in_range(what, &secs.to_string(), secs, zero)
}

fn in_range(what: &str, shown: &str, secs: f64, zero: Zero) -> Result<f64, String> {
    let low_ok = match zero {
        Zero::Allowed => secs >= 0.0,
        Zero::Refused => secs > 0.0,
    };
    // NaN fails both comparisons.
    if !(low_ok && secs <= MAX_SECS) {
        let low = if zero == Zero::Allowed { "from 0" } else { "more than 0 and" };
        return Err(format!("{what}: '{shown}' seconds is out of range: give a number {low} up to {MAX_SECS} (30 days)"));
    }
    Ok(secs)
}

/// Parses seconds (`12`, `12.5`, `12.5s`) for `what`, checked as [`check_secs`] does.
pub(crate) fn parse_secs(what: &str, s: &str, zero: Zero) -> Result<f64, String> {
    let t = s.trim();
    let num = t.strip_suffix('s').unwrap_or(t);
    // f64's parser also takes `inf`, `nan` and `1e30`: the range check refuses them.
    let secs: f64 = num.parse().map_err(|_| format!("{what}: '{t}' is not a number of seconds (e.g. 12.5)"))?;
    in_range(what, t, secs, zero)
}

/// A byte count in decimal SI units with 3 significant digits: `999 B`,
/// `12.3 kB`, `1.86 GB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    // 999.5 kB and up rounds to 1.00 MB, not 1000 kB.
    while v >= 999.5 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    let digits = if v >= 99.95 {
        0
    } else if v >= 9.995 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_must_be_finite_and_in_range() {
        assert_eq!(parse_secs("--x", "12.5s", Zero::Allowed), Ok(12.5));
        assert_eq!(parse_secs("--x", "0", Zero::Allowed), Ok(0.0));
        for bad in ["inf", "nan", "-5", "1e30", "-0.1", "x", ""] {
            let e = parse_secs("--x", bad, Zero::Allowed).unwrap_err();
            assert!(e.starts_with("--x: "), "{e}");
        }
        assert!(parse_secs("--x", "0", Zero::Refused).is_err());
        assert!(check_secs("--x", f64::NAN, Zero::Allowed).is_err());
        assert!(check_secs("--x", MAX_SECS, Zero::Refused).is_ok());
    }

    #[test]
    fn bytes_in_si_units_with_three_digits() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1000), "1.00 kB");
        assert_eq!(human_bytes(12_345), "12.3 kB");
        assert_eq!(human_bytes(123_456), "123 kB");
        assert_eq!(human_bytes(999_499), "999 kB");
        assert_eq!(human_bytes(999_500), "1.00 MB");
        assert_eq!(human_bytes(1_857_953_578), "1.86 GB");
        assert_eq!(human_bytes(u64::MAX), "18.4 EB");
    }
}
