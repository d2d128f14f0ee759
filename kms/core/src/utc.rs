//! Unix times as people read them in messages ("2026-12-09 05:00:00 UTC"),
//! without a time crate in the core.

/// `unix` (seconds) as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format(unix: u64) -> String {
    let (date, (h, m, s)) = parts(unix);
    format!("{date} {h:02}:{m:02}:{s:02} UTC")
}

/// `unix` (seconds) as the date `YYYY-MM-DD` and (hours, minutes,
/// seconds), UTC: for callers that print times their own way.
pub fn parts(unix: u64) -> (String, (u64, u64, u64)) {
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days((unix / 86_400) as i64);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        (secs / 3600, secs / 60 % 60, secs % 60),
    )
}

/// Howard Hinnant's days-to-civil: days since 1970-01-01 to (y, m, d).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::format;

    #[test]
    fn known_dates() {
        assert_eq!(format(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format(1_796_187_723), "2026-12-02 05:02:03 UTC");
        assert!(format(u64::MAX).ends_with(" UTC"));
    }
}
