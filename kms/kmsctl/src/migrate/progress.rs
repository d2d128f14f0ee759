//! What `kmsctl migrate` says while it runs: the figures (count, rate,
//! ETA) and how they are worded, for the progress bar on a terminal and the
//! plain lines otherwise, and when a plain line is due. Pure: the caller
//! owns the clock and the terminal.

use std::time::Duration;

/// How often a plain progress line is written when stderr is no terminal.
pub(crate) const LINE_EVERY: Duration = Duration::from_secs(2);

/// The objects of one run so far, over every resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Figures {
    /// Objects handled (rewritten, skipped or failed), earlier runs included.
    pub done: u64,
    /// Of those, handled by this run (the rate's numerator).
    pub done_this_run: u64,
    /// The estimated total: objects listed so far plus what the apiserver
    /// says remains (`remainingItemCount`); 0 when not known yet.
    pub total: u64,
    pub failed: u64,
}

/// Objects per second over `elapsed`.
pub(crate) fn rate(done: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    done as f64 / secs
}

/// Time left at `rate` objects per second, when it can be told.
pub(crate) fn eta(done: u64, total: u64, rate: f64) -> Option<Duration> {
    if total < done || rate <= 0.0 || !rate.is_finite() {
        return None;
    }
    Some(Duration::from_secs_f64((total - done) as f64 / rate))
}

/// A duration as people read it: `850ms`, `42s`, `3m05s`, `1h02m`.
pub(crate) fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    if secs < 60 {
        return format!("{secs}s");
    }
    if secs < 3600 {
        return format!("{}m{:02}s", secs / 60, secs % 60);
    }
    format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
}

/// One plain progress line: `migrate: secrets: 1200/~3000 objects, 3 failed,
/// 48.9/s, ETA 37s`.
pub(crate) fn line(resource: &str, f: &Figures, elapsed: Duration) -> String {
    let r = rate(f.done_this_run, elapsed);
    let total = if f.total > 0 {
        format!("/~{}", f.total)
    } else {
        String::new()
    };
    let failed = if f.failed > 0 {
        format!(", {} failed", f.failed)
    } else {
        String::new()
    };
    let eta = match eta(f.done, f.total, r) {
        Some(d) if f.total > 0 => format!(", ETA {}", human_duration(d)),
        _ => String::new(),
    };
    format!(
        "migrate: {resource}: {}{total} objects{failed}, {r:.1}/s{eta}",
        f.done
    )
}

/// Whether a plain line is due at `now` (since the run started), the last
/// one written at `last` (none yet: the first is due one interval in, when
/// the rate means something).
pub(crate) fn line_due(last: Option<Duration>, now: Duration) -> bool {
    now.saturating_sub(last.unwrap_or_default()) >= LINE_EVERY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn eta_is_what_remains_at_the_rate() {
        assert_eq!(eta(100, 300, 50.0), Some(Duration::from_secs(4)));
        assert_eq!(eta(300, 300, 50.0), Some(Duration::ZERO));
        assert_eq!(eta(10, 300, 0.0), None);
        // An estimate that fell short: no ETA rather than a wrong one.
        assert_eq!(eta(310, 300, 50.0), None);
    }

    #[test]
    fn the_rate_counts_this_run_only() {
        let f = Figures {
            done: 1200,
            done_this_run: 100,
            total: 3000,
            failed: 0,
        };
        assert_eq!(
            line("secrets", &f, Duration::from_secs(2)),
            "migrate: secrets: 1200/~3000 objects, 50.0/s, ETA 36s"
        );
    }

    #[test]
    fn a_line_says_failures_and_omits_what_is_unknown() {
        let f = Figures {
            done: 7,
            done_this_run: 7,
            total: 0,
            failed: 2,
        };
        assert_eq!(
            line("deployments.apps", &f, Duration::ZERO),
            "migrate: deployments.apps: 7 objects, 2 failed, 0.0/s"
        );
    }

    #[test]
    fn lines_are_spaced() {
        assert!(!line_due(None, Duration::from_secs(1)));
        assert!(line_due(None, Duration::from_secs(2)));
        assert!(!line_due(
            Some(Duration::from_secs(1)),
            Duration::from_secs(2)
        ));
        assert!(line_due(
            Some(Duration::from_secs(1)),
            Duration::from_secs(3)
        ));
    }
}
