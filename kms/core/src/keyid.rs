//! Names: cluster names and the `key_id` of a KEK version.
//!
//! `key_id = "<cluster>/v<version>/<fingerprint>"`, the fingerprint being
//! the first 16 hex digits of SHA-256 over a domain tag, the cluster, the
//! version and the key. So the id is stable for a version, differs for every
//! version, and differs for a different key even under the same version
//! number (a central store restored from an old backup that mints "v5" again
//! mints another key, so another id: kube-apiserver never sees one id stand
//! for two keys). A SHA-256 of a uniformly random 256-bit key reveals
//! nothing usable about it.

use edgekms_hsm::Key256;
use sha2::{Digest, Sha256};

/// kube-apiserver rejects longer key ids.
pub const MAX_KEY_ID: usize = 1024;
/// DNS-1123 label length; keeps every key_id far under [`MAX_KEY_ID`].
pub const MAX_CLUSTER_NAME: usize = 63;

/// A refused name. It carries only a short escaped preview and the length:
/// the name comes from callers (a 4 MB `Join` cluster name must not be
/// echoed into the answer, the audit log or the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster or node name {preview} ({len} bytes): use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit")]
pub struct InvalidName {
    /// At most [`PREVIEW_CHARS`] characters of the name, escaped, quoted.
    pub preview: String,
    pub len: usize,
}

/// How much of a refused name an error shows.
pub const PREVIEW_CHARS: usize = 40;

/// `text` quoted, control and non-ASCII characters escaped, cut after
/// `max` characters with a `...` marker: safe to show and log.
pub fn preview(text: &str, max: usize) -> String {
    let mut out = String::from("\"");
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// Checks a cluster (or node) name is a DNS-1123 label.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CLUSTER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            preview: preview(name, PREVIEW_CHARS),
            len: name.len(),
        })
    }
}

/// The key_id of KEK `version` of `cluster` holding `key`.
pub fn derive(cluster: &str, version: u32, key: &Key256) -> String {
    let mut h = Sha256::new();
    h.update(b"edgekms key-id v1\0");
    h.update((cluster.len() as u32).to_be_bytes());
    h.update(cluster.as_bytes());
    h.update(version.to_be_bytes());
    h.update(key.expose());
    let digest = h.finalize();
    format!("{cluster}/v{version}/{}", hex::encode(&digest[..8]))
}

/// Whether `key_id` has the shape [`derive`] gives version `version` of
/// `cluster` (what a node reports is checked before it is kept).
pub fn is_for(key_id: &str, cluster: &str, version: u32) -> bool {
    let prefix = format!("{cluster}/v{version}/");
    key_id.strip_prefix(&prefix).is_some_and(|fp| {
        fp.len() == 16
            && fp
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_id_is_checked_against_its_cluster_and_version() {
        let id = derive("edge-1", 7, &Key256::generate());
        assert!(is_for(&id, "edge-1", 7));
        assert!(!is_for(&id, "edge-1", 8));
        assert!(!is_for(&id, "edge-2", 7));
        assert!(!is_for(&format!("{id}0"), "edge-1", 7));
        assert!(!is_for(&id.to_uppercase(), "edge-1", 7));
    }

    #[test]
    fn stable_per_version_distinct_across_versions_and_keys() {
        let key = Key256::from_slice(&[1; 32]).unwrap();
        let other = Key256::from_slice(&[2; 32]).unwrap();
        let a = derive("edge-1", 1, &key);
        assert_eq!(a, derive("edge-1", 1, &key));
        assert!(a.starts_with("edge-1/v1/"));
        assert_ne!(a, derive("edge-1", 2, &key));
        assert_ne!(a, derive("edge-1", 1, &other));
        assert_ne!(a, derive("edge-2", 1, &key));
    }

    #[test]
    fn longest_id_is_under_the_apiserver_limit() {
        let name = "a".repeat(MAX_CLUSTER_NAME);
        assert!(derive(&name, u32::MAX, &Key256::generate()).len() < MAX_KEY_ID);
    }

    #[test]
    fn names_are_dns_labels() {
        for good in ["a", "edge-1", "0abc", &"x".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "Edge", "a_b", "a.b", "a/b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_refused_name_is_not_echoed_whole() {
        let huge = format!("a\nINFO audit: forged{}", "x".repeat(4 << 20));
        let e = validate_name(&huge).unwrap_err().to_string();
        assert!(e.len() < 300, "{} bytes", e.len());
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains(&format!("({} bytes)", huge.len())), "{e}");
    }
}

#[cfg(test)]
mod proptests;
