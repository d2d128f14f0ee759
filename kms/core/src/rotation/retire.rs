//! Whether a version may be retired, for the central service and a
//! standalone node alike: the storage census rule and the grace period.
//!
//! A version may be retired (disabled, then destroyed once its grace
//! period is over) only when storage is known not to use it any more:
//! - every node's kube-apiserver has switched to another key_id (it last
//!   had a DEK seed encrypted under another version), since a stale
//!   apiserver would write under the old one again;
//! - a census was taken after the version stopped being primary and after
//!   the last apiserver switched away from it, and it counts no object
//!   under its key_id.
//!
//! `--skip-census` overrides (the caller audits it); the grace period is
//! what still protects data then.

use std::collections::BTreeMap;

use super::version::DEFAULT_GRACE_SECS;
use crate::utc;

/// What a census counted, as the retire rule reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CensusCounts {
    pub taken_unix: u64,
    /// Objects per key_id, per resource.
    pub under: BTreeMap<String, BTreeMap<String, u64>>,
}

impl CensusCounts {
    /// Objects under `key_id`, per resource, largest first.
    pub fn resources_under(&self, key_id: &str) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .under
            .get(key_id)
            .map(|m| m.iter().map(|(r, n)| (r.clone(), *n)).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

/// What one node's kube-apiserver writes under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub node: String,
    /// Empty: the node saw no Encrypt (no apiserver, or before it knew).
    pub key_id: String,
    pub since_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InUse {
    #[error("the kube-apiserver of {nodes} still writes under version {version}: wait for its next Status poll (up to a minute) or restart it, take a census (`kmsctl local census`), then retire")]
    StillWritten { version: u32, nodes: String },
    #[error("no census of the storage was taken since version {version} stopped being used for writing ({}): run `kmsctl migrate`, then `kmsctl local census` (or wait for the plugin's census_every), then retire; --skip-census retires without one", utc::format(*since_unix))]
    NoCensus { version: u32, since_unix: u64 },
    #[error("the newest census counts {total} object(s) under version {version} ({key_id}): {resources} (counted {}); run `kmsctl migrate` to rewrite them under the primary, take a census again, then retire", utc::format(*taken_unix))]
    Objects {
        version: u32,
        key_id: String,
        total: u64,
        resources: String,
        taken_unix: u64,
    },
}

/// Whether `version` (`key_id`), which stopped being primary at
/// `superseded_unix`, may be retired given the newest `census` and what
/// each node's apiserver writes under (module docs).
pub fn check_unused(
    version: u32,
    key_id: &str,
    superseded_unix: u64,
    census: Option<&CensusCounts>,
    writers: &[Writer],
) -> Result<(), InUse> {
    let still: Vec<&str> = writers
        .iter()
        .filter(|w| w.key_id == key_id)
        .map(|w| w.node.as_str())
        .collect();
    if !still.is_empty() {
        return Err(InUse::StillWritten {
            version,
            nodes: still.join(", "),
        });
    }
    let switched = writers
        .iter()
        .filter(|w| !w.key_id.is_empty())
        .map(|w| w.since_unix)
        .chain(std::iter::once(superseded_unix))
        .max()
        .unwrap_or(superseded_unix);
    let census = match census {
        Some(c) if c.taken_unix > switched => c,
        _ => {
            return Err(InUse::NoCensus {
                version,
                since_unix: switched,
            })
        }
    };
    let resources = census.resources_under(key_id);
    let total: u64 = resources.iter().map(|(_, n)| n).sum();
    if total > 0 {
        return Err(InUse::Objects {
            version,
            key_id: key_id.to_owned(),
            total,
            resources: resources
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            taken_unix: census.taken_unix,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a grace period of {secs} s is too short: a retired version stays disabled (restorable) for at least {min} s before it is destroyed")]
pub struct GraceTooShort {
    pub secs: u64,
    pub min: u64,
}

/// The grace period for a retire asking for `requested` seconds (0: the
/// default, 7 days), at least `min` (normally
/// [`super::MIN_GRACE_SECS`]).
pub fn grace(requested: u64, min: u64) -> Result<u64, GraceTooShort> {
    let secs = if requested == 0 {
        DEFAULT_GRACE_SECS.max(min)
    } else {
        requested
    };
    if secs < min {
        return Err(GraceTooShort { secs, min });
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rotation::MIN_GRACE_SECS;

    fn census(taken_unix: u64, counts: &[(&str, &str, u64)]) -> CensusCounts {
        let mut under: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (k, r, n) in counts {
            under
                .entry(k.to_string())
                .or_default()
                .insert(r.to_string(), *n);
        }
        CensusCounts { taken_unix, under }
    }

    fn writer(node: &str, key_id: &str, since_unix: u64) -> Writer {
        Writer {
            node: node.into(),
            key_id: key_id.into(),
            since_unix,
        }
    }

    #[test]
    fn a_clean_census_after_every_switch_allows_the_retire() {
        let c = census(300, &[("new", "secrets", 10), ("old", "secrets", 0)]);
        let w = [writer("a", "new", 200), writer("b", "", 0)];
        assert_eq!(check_unused(1, "old", 100, Some(&c), &w), Ok(()));
    }

    #[test]
    fn objects_under_the_version_are_named_by_resource() {
        let c = census(300, &[("old", "secrets", 2), ("old", "configmaps", 5)]);
        let err = check_unused(1, "old", 100, Some(&c), &[]).unwrap_err();
        assert_eq!(
            err,
            InUse::Objects {
                version: 1,
                key_id: "old".into(),
                total: 7,
                resources: "configmaps 5, secrets 2".into(),
                taken_unix: 300,
            }
        );
        assert!(err.to_string().contains("kmsctl migrate"));
    }

    #[test]
    fn no_census_or_one_too_old_refuses() {
        assert_eq!(
            check_unused(1, "old", 100, None, &[]),
            Err(InUse::NoCensus {
                version: 1,
                since_unix: 100
            })
        );
        // Taken before the version stopped being primary.
        let c = census(100, &[]);
        assert!(matches!(
            check_unused(1, "old", 100, Some(&c), &[]),
            Err(InUse::NoCensus { .. })
        ));
        // Taken before the last apiserver switched away from it: a write
        // under the old key may have come after the count.
        let c = census(150, &[]);
        let w = [writer("a", "new", 120), writer("b", "new", 200)];
        assert_eq!(
            check_unused(1, "old", 100, Some(&c), &w),
            Err(InUse::NoCensus {
                version: 1,
                since_unix: 200
            })
        );
    }

    #[test]
    fn an_apiserver_still_writing_under_it_refuses_whatever_the_census() {
        let c = census(1_000, &[]);
        let w = [writer("a", "new", 200), writer("b", "old", 50)];
        assert_eq!(
            check_unused(1, "old", 100, Some(&c), &w),
            Err(InUse::StillWritten {
                version: 1,
                nodes: "b".into()
            })
        );
    }

    #[test]
    fn grace_defaults_to_seven_days_and_has_a_floor() {
        assert_eq!(grace(0, MIN_GRACE_SECS), Ok(7 * 86_400));
        assert_eq!(grace(3_600, MIN_GRACE_SECS), Ok(3_600));
        assert_eq!(
            grace(3_599, MIN_GRACE_SECS),
            Err(GraceTooShort {
                secs: 3_599,
                min: 3_600
            })
        );
        assert_eq!(grace(2, 1), Ok(2));
    }
}
