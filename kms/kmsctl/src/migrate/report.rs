//! The final report of `kmsctl migrate`, for people and as JSON: per
//! resource the objects listed, rewritten, skipped (deleted meanwhile) and
//! failed (each named, up to a bound), the conflicts retried, the duration
//! and the rate. Pure.

use std::time::Duration;

use serde_json::json;

use super::progress::{human_duration, rate};
use super::state::{Counts, ResourceProgress, FAILURES_KEPT};

#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub server: String,
    /// This run took up a state left by an interrupted one.
    pub resumed: bool,
    pub resources: Vec<ResourceProgress>,
    /// This run's wall time.
    pub duration: Duration,
    /// Every run's on this state, this one included.
    pub duration_all_runs: Duration,
    /// Objects this run handled.
    pub handled_this_run: u64,
    /// The census before the first write and after the last, when taken.
    pub census: Option<(serde_json::Value, serde_json::Value)>,
}

impl Report {
    pub(crate) fn totals(&self) -> Counts {
        let mut all = Counts::default();
        for r in &self.resources {
            all.add(&r.counts);
        }
        all
    }

    pub(crate) fn rate(&self) -> f64 {
        rate(self.handled_this_run, self.duration)
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        let t = self.totals();
        let mut v = json!({
            "server": self.server,
            "resumed": self.resumed,
            "resources": self.resources.iter().map(|r| json!({
                "resource": r.resource,
                "listed": r.counts.listed,
                "rewritten": r.counts.rewritten,
                "skipped": r.counts.skipped,
                "failed": r.counts.failed,
                "conflicts": r.counts.conflicts,
                "restarts": r.restarts,
                "failures": r.failures.iter().map(|f| json!({"object": f.object, "error": f.error})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "total": {
                "listed": t.listed, "rewritten": t.rewritten, "skipped": t.skipped,
                "failed": t.failed, "conflicts": t.conflicts,
            },
            "duration_secs": round3(self.duration.as_secs_f64()),
            "duration_all_runs_secs": round3(self.duration_all_runs.as_secs_f64()),
            "rate_per_sec": round3(self.rate()),
        });
        if let Some((before, after)) = &self.census {
            v["census"] = json!({"before": before, "after": after});
        }
        v
    }

    pub(crate) fn human(&self) -> String {
        let mut out = format!(
            "{:<24} {:>9} {:>9} {:>8} {:>7} {:>9}\n",
            "RESOURCE", "LISTED", "REWRITTEN", "SKIPPED", "FAILED", "CONFLICTS"
        );
        let row = |name: &str, c: &Counts| {
            format!(
                "{name:<24} {:>9} {:>9} {:>8} {:>7} {:>9}\n",
                c.listed, c.rewritten, c.skipped, c.failed, c.conflicts
            )
        };
        for r in &self.resources {
            out += &row(&r.resource, &r.counts);
        }
        if self.resources.len() > 1 {
            out += &row("total", &self.totals());
        }
        for r in &self.resources {
            if r.restarts > 0 {
                out += &format!(
                    "{}: started over {} time(s): its continue token had expired (the apiserver compacted its history)\n",
                    r.resource, r.restarts
                );
            }
            for f in &r.failures {
                out += &format!("failed: {} {}: {}\n", r.resource, f.object, f.error);
            }
            if r.counts.failed > r.failures.len() as u64 {
                out += &format!(
                    "failed: {} more of {} (only the first {FAILURES_KEPT} are named)\n",
                    r.counts.failed - r.failures.len() as u64,
                    r.resource
                );
            }
        }
        let resumed = if self.resumed {
            format!(
                ", {} over every run (resumed)",
                human_duration(self.duration_all_runs)
            )
        } else {
            String::new()
        };
        out += &format!(
            "done in {} ({} objects, {:.1}/s){resumed}",
            human_duration(self.duration),
            self.handled_this_run,
            self.rate()
        );
        out
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::super::state::FailedObject;
    use super::*;

    fn report() -> Report {
        let secrets = ResourceProgress {
            resource: "secrets".into(),
            done: true,
            counts: Counts {
                listed: 300,
                rewritten: 297,
                skipped: 1,
                failed: 2,
                conflicts: 1,
            },
            failures: vec![FailedObject {
                object: "default/s1".into(),
                error: "422 Invalid".into(),
            }],
            ..Default::default()
        };
        let configmaps = ResourceProgress {
            resource: "configmaps".into(),
            done: true,
            restarts: 1,
            counts: Counts {
                listed: 30,
                rewritten: 30,
                ..Default::default()
            },
            ..Default::default()
        };
        Report {
            server: "https://127.0.0.1:6443".into(),
            resumed: true,
            resources: vec![secrets, configmaps],
            duration: Duration::from_secs(4),
            duration_all_runs: Duration::from_secs(10),
            handled_this_run: 200,
            census: None,
        }
    }

    #[test]
    fn json_has_every_count_and_the_totals() {
        let v = report().json();
        assert_eq!(v["resources"][0]["rewritten"], 297);
        assert_eq!(v["resources"][0]["failures"][0]["object"], "default/s1");
        assert_eq!(v["resources"][1]["restarts"], 1);
        assert_eq!(v["total"]["listed"], 330);
        assert_eq!(v["total"]["failed"], 2);
        assert_eq!(v["rate_per_sec"], 50.0);
        assert_eq!(v["resumed"], true);
        assert!(v.get("census").is_none());
    }

    #[test]
    fn people_see_a_table_the_failures_and_the_rate() {
        let text = report().human();
        assert!(text.contains("secrets"), "{text}");
        assert!(
            text.contains("total                          330"),
            "{text}"
        );
        assert!(
            text.contains("failed: secrets default/s1: 422 Invalid"),
            "{text}"
        );
        assert!(text.contains("failed: 1 more of secrets"), "{text}");
        assert!(
            text.contains("configmaps: started over 1 time(s)"),
            "{text}"
        );
        assert!(
            text.ends_with("done in 4s (200 objects, 50.0/s), 10s over every run (resumed)"),
            "{text}"
        );
    }

    #[test]
    fn the_census_is_reported_when_taken() {
        let mut r = report();
        r.census = Some((json!({"old": 3}), json!({"old": 0})));
        assert_eq!(r.json()["census"]["after"]["old"], 0);
    }
}
