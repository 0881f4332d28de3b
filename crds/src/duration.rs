//! Durations as the Kubernetes API writes them (`metav1.Duration`): `"500ms"`, `"30s"`, `"1m30s"`.

use std::time::Duration;

/// The schema pattern for a duration: one or more `<number><unit>` groups,
/// units `ms`, `s`, `m`, `h`.
pub const PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// Why a duration string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: expected groups like 500ms, 30s, 1m or 1h")]
pub struct ParseDurationError {
    /// The rejected text.
    pub input: String,
}

/// Parses a duration in the form `PATTERN` describes.
pub fn parse(input: &str) -> Result<Duration, ParseDurationError> {
    let err = || ParseDurationError {
        input: input.to_owned(),
    };
    if input.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = input;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return Err(err());
        };
        rest = &rest[len..];
        let part = unit
            .checked_mul(u32::try_from(value).map_err(|_| err())?)
            .ok_or_else(err)?;
        total = total.checked_add(part).ok_or_else(err)?;
    }
    Ok(total)
}

/// Formats a duration so that [`parse`] reads it back exactly.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_compound_units() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "10", "1d", "-1s", "1.5s", "1s "] {
            assert!(parse(bad).is_err(), "{bad:?} must not parse");
        }
    }

    proptest::proptest! {
        #[test]
        fn format_round_trips(ms in 0u64..10_000_000) {
            let d = Duration::from_millis(ms);
            proptest::prop_assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
