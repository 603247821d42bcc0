//! `google.protobuf.Duration` in its protobuf JSON form, as Envoy reads it.

use std::time::Duration;

/// Largest `seconds` protobuf allows in a Duration (10,000 years).
const MAX_SECONDS: u64 = 315_576_000_000;

/// Parses an Envoy (protobuf JSON) duration string: decimal seconds with at most nine
/// fractional digits, followed by `s`: `"5s"`, `"0.25s"`, `"1.5s"`, `"300s"`,
/// `"1.000000001s"`. Negative durations are rejected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let hint = "an Envoy duration is a number of seconds ending in `s`, like \"5s\" or \"0.25s\"";
    let Some(body) = s.strip_suffix('s') else {
        return Err(format!("`{s}` is not a valid duration: {hint}"));
    };
    if body.starts_with('-') {
        return Err(format!("`{s}` is negative: durations must be >= 0s"));
    }
    let (whole, frac) = match body.split_once('.') {
        Some((whole, frac)) => (whole, Some(frac)),
        None => (body, None),
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || frac.is_some_and(|f| !all_digits(f) || f.len() > 9) {
        return Err(format!(
            "`{s}` is not a valid duration: {hint} (at most 9 fractional digits)"
        ));
    }
    let seconds: u64 = whole
        .parse()
        .ok()
        .filter(|v| *v <= MAX_SECONDS)
        .ok_or_else(|| format!("`{s}` is too large: at most {MAX_SECONDS}s"))?;
    let nanos = match frac {
        Some(f) => {
            let digits: u32 = f
                .parse()
                .map_err(|_| format!("`{s}` is not a valid duration: {hint}"))?;
            // `f` has 1..=9 digits: scale to nanoseconds.
            let scale = 10u32.pow(9 - f.len() as u32);
            digits * scale
        }
        None => 0,
    };
    Ok(Duration::new(seconds, nanos))
}

/// The object form `{seconds: N, nanos: M}`.
pub(crate) fn duration_from_parts(seconds: i64, nanos: i64) -> Result<Duration, String> {
    if seconds < 0 || nanos < 0 {
        return Err(format!(
            "{{seconds: {seconds}, nanos: {nanos}}} is negative: durations must be >= 0s"
        ));
    }
    if nanos > 999_999_999 {
        return Err(format!("nanos {nanos} is out of range (0..=999999999)"));
    }
    let seconds = seconds.unsigned_abs();
    if seconds > MAX_SECONDS {
        return Err(format!(
            "seconds {seconds} is too large: at most {MAX_SECONDS}"
        ));
    }
    // `nanos` is within 0..=999_999_999 here.
    Ok(Duration::new(seconds, nanos.unsigned_abs() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_envoy_forms() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0.25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.000000001s"), Ok(Duration::new(1, 1)));
        assert_eq!(parse_duration("0.000000001s"), Ok(Duration::new(0, 1)));
        assert_eq!(
            parse_duration("315576000000s"),
            Ok(Duration::from_secs(MAX_SECONDS))
        );
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in [
            "",
            "s",
            "5",
            "5ms",
            "5m",
            "1h",
            "-1s",
            "-0.5s",
            ".5s",
            "5.s",
            "1.0000000001s",
            "5 s",
            " 5s",
            "+5s",
            "1e3s",
            "0x10s",
            "5S",
            "315576000001s",
            "99999999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_duration("-1s").unwrap_err().contains("negative"));
        assert!(parse_duration("5").unwrap_err().contains("ending in `s`"));
    }

    #[test]
    fn object_form() {
        assert_eq!(duration_from_parts(5, 0), Ok(Duration::from_secs(5)));
        assert_eq!(
            duration_from_parts(0, 250_000_000),
            Ok(Duration::from_millis(250))
        );
        assert!(duration_from_parts(-1, 0).is_err());
        assert!(duration_from_parts(0, -1).is_err());
        assert!(duration_from_parts(0, 1_000_000_000).is_err());
    }

    proptest::proptest! {
        #[test]
        fn roundtrips_whole_and_fraction(secs in 0u64..=MAX_SECONDS, nanos in 0u32..1_000_000_000) {
            let text = format!("{secs}.{nanos:09}s");
            proptest::prop_assert_eq!(parse_duration(&text), Ok(Duration::new(secs, nanos)));
        }

        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_duration(&s);
        }
    }
}
