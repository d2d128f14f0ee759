//! Durations as operators type them: `90s`, `15m`, `24h`, `30d`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {0:?}: use a whole number followed by s, m, h or d (e.g. 90s, 15m, 24h, 30d)"
)]
pub struct BadDuration(pub String);

/// A duration where zero makes no sense (an interval, a period, a TTL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonZeroError {
    #[error(transparent)]
    Invalid(#[from] BadDuration),
    #[error("{0:?} is zero; it must be at least 1s")]
    Zero(String),
}

/// [`parse`], refusing zero.
pub fn parse_nonzero(text: &str) -> Result<Duration, NonZeroError> {
    let d = parse(text)?;
    if d.is_zero() {
        return Err(NonZeroError::Zero(text.trim().to_owned()));
    }
    Ok(d)
}

pub fn parse(text: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(text.to_owned());
    let text = text.trim();
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(unit_at);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_secs(secs))
}

/// The shortest exact form, for display.
pub fn format(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse("30d").unwrap(), Duration::from_secs(30 * 86_400));
        for bad in ["", "h", "10", "10x", "-1s", "1.5h", "99999999999999999999d"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format(Duration::from_secs(86_400)), "1d");
        assert_eq!(format(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn zero_is_refused_where_asked() {
        assert_eq!(parse("0s").unwrap(), Duration::ZERO);
        for zero in ["0s", "0m", " 0h", "00d"] {
            let e = parse_nonzero(zero).unwrap_err();
            assert!(matches!(e, NonZeroError::Zero(_)), "{zero}: {e}");
            assert!(e.to_string().contains("at least 1s"), "{e}");
        }
        assert!(matches!(parse_nonzero("x"), Err(NonZeroError::Invalid(_))));
        assert_eq!(parse_nonzero("1s").unwrap(), Duration::from_secs(1));
    }
}

#[cfg(test)]
mod proptests;
