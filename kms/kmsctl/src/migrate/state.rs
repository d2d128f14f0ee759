//! The resume state of `kmsctl migrate`: per resource, what is done (the
//! continue token of the next page to list, the counts so far), in a JSON
//! file keyed by the apiserver URL and the resources, so that a run
//! interrupted (Ctrl-C, kill -9) resumes where it left off. Written after
//! every page, atomically (temp file, fsync, rename, fsync of the
//! directory): a crash leaves the old state or the new one, never half.
//!
//! A page is recorded only once each of its objects was handled, so a
//! crash redoes at most one page: its objects are rewritten again, which
//! for an object already under the current key_id is a no-op write.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file format's version.
const FORMAT: u32 = 1;
/// Failures kept per resource (the count goes on).
pub(crate) const FAILURES_KEPT: usize = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct State {
    pub format: u32,
    /// The apiserver's URL, as the kubeconfig names it.
    pub server: String,
    /// The resources as given (`secrets`, `deployments.apps`), in order.
    pub resources: Vec<String>,
    /// Runs that started on this state, this one included.
    pub runs: u32,
    /// Seconds spent by earlier runs.
    pub elapsed_secs: f64,
    pub progress: Vec<ResourceProgress>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ResourceProgress {
    pub resource: String,
    /// Every page listed and handled.
    pub done: bool,
    /// The continue token of the next page to list; none: from the start.
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
    pub pages: u64,
    pub counts: Counts,
    /// Times it started over because its continue token had expired.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub failures: Vec<FailedObject>,
}

/// Objects of one resource, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counts {
    pub listed: u64,
    pub rewritten: u64,
    /// Deleted between the list and the write.
    pub skipped: u64,
    pub failed: u64,
    /// Writes that met a newer version of the object and were retried on it.
    pub conflicts: u64,
}

impl Counts {
    pub(crate) fn handled(&self) -> u64 {
        self.rewritten + self.skipped + self.failed
    }

    pub(crate) fn add(&mut self, other: &Counts) {
        self.listed += other.listed;
        self.rewritten += other.rewritten;
        self.skipped += other.skipped;
        self.failed += other.failed;
        self.conflicts += other.conflicts;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FailedObject {
    /// `namespace/name`, or `name` when cluster-scoped.
    pub object: String,
    pub error: String,
}

impl State {
    pub(crate) fn new(server: &str, resources: &[String]) -> Self {
        Self {
            format: FORMAT,
            server: server.to_owned(),
            resources: resources.to_vec(),
            runs: 0,
            elapsed_secs: 0.0,
            progress: resources
                .iter()
                .map(|r| ResourceProgress {
                    resource: r.clone(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// Whether this state is the one of `server` and `resources`.
    pub(crate) fn check_for(&self, server: &str, resources: &[String]) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {} (this kmsctl reads {FORMAT})",
                self.format
            ));
        }
        if self.server != server || self.resources != resources {
            return Err(format!(
                "it is the state of {} for {}",
                self.server,
                self.resources.join(",")
            ));
        }
        if self.progress.len() != self.resources.len()
            || self
                .progress
                .iter()
                .zip(&self.resources)
                .any(|(p, r)| &p.resource != r)
        {
            return Err("its progress does not match its resources".into());
        }
        Ok(())
    }

    /// Whether any page was recorded: a run on it resumes.
    pub(crate) fn started(&self) -> bool {
        self.progress.iter().any(|p| p.done || p.pages > 0)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec_pretty(self).unwrap_or_default();
        text.push(b'\n');
        text
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

impl ResourceProgress {
    /// A page was handled: `next` is its continue token (none: it was the
    /// last page), `counts` and `failures` its outcome.
    pub(crate) fn page_done(
        &mut self,
        next: Option<String>,
        counts: &Counts,
        failures: Vec<FailedObject>,
    ) {
        self.pages += 1;
        self.counts.add(counts);
        let room = FAILURES_KEPT.saturating_sub(self.failures.len());
        self.failures.extend(failures.into_iter().take(room));
        self.done = next.is_none();
        self.continue_token = next;
    }

    /// Its continue token expired (410 Gone): it starts over from the
    /// first page, its counts from zero.
    pub(crate) fn start_over(&mut self) {
        *self = ResourceProgress {
            resource: std::mem::take(&mut self.resource),
            restarts: self.restarts + 1,
            ..Default::default()
        };
    }
}

/// The state file's name for `server` and `resources`.
pub(crate) fn file_name(server: &str, resources: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(server.as_bytes());
    h.update(b"\n");
    h.update(resources.join(",").as_bytes());
    format!("migrate-{}.json", &hex::encode(h.finalize())[..16])
}

/// Where state files go: `$XDG_STATE_HOME/kmsctl`, else
/// `$HOME/.local/state/kmsctl` (empty variables count as unset).
pub(crate) fn default_dir(xdg_state_home: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
    let nonempty = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    nonempty(xdg_state_home)
        .or_else(|| nonempty(home).map(|h| h.join(".local/state")))
        .map(|d| d.join("kmsctl"))
}

/// Reads the state at `path`; `None` when there is none.
pub(crate) fn load(path: &Path) -> Result<Option<State>, String> {
    match std::fs::read(path) {
        Ok(bytes) => State::decode(&bytes)
            .map(Some)
            .map_err(|e| format!("cannot read the state file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "cannot read the state file {}: {e}",
            path.display()
        )),
    }
}

/// Writes `state` to `path` atomically and durably (its directory is
/// created, private, when missing).
pub(crate) fn save(path: &Path, state: &State) -> Result<(), String> {
    let fail = |what: &str, e: std::io::Error| {
        format!("cannot {what} the state file {}: {e}", path.display())
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail("create the directory of", e))?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| fail("write", e))?
    };
    f.write_all(&state.encode())
        .and_then(|()| f.sync_all())
        .map_err(|e| fail("write", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| fail("replace", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("sync the directory of", e))
}

/// Removes the state at `path` (done: nothing to resume).
pub(crate) fn remove(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "cannot remove the state file {}: {e}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn counts(listed: u64, rewritten: u64) -> Counts {
        Counts {
            listed,
            rewritten,
            ..Default::default()
        }
    }

    #[test]
    fn the_file_is_keyed_by_server_and_resources() {
        let a = file_name("https://a:6443", &res(&["secrets"]));
        assert!(a.starts_with("migrate-") && a.ends_with(".json") && a.len() == 29);
        assert_eq!(a, file_name("https://a:6443", &res(&["secrets"])));
        assert_ne!(a, file_name("https://b:6443", &res(&["secrets"])));
        assert_ne!(
            a,
            file_name("https://a:6443", &res(&["secrets", "configmaps"]))
        );
    }

    #[test]
    fn the_default_dir_follows_xdg() {
        assert_eq!(
            default_dir(Some("/x"), Some("/home/u")),
            Some(PathBuf::from("/x/kmsctl"))
        );
        assert_eq!(
            default_dir(Some(""), Some("/home/u")),
            Some(PathBuf::from("/home/u/.local/state/kmsctl"))
        );
        assert_eq!(default_dir(None, None), None);
    }

    #[test]
    fn pages_move_the_token_and_add_up() {
        let mut s = State::new("https://a", &res(&["secrets"]));
        assert!(!s.started());
        let p = &mut s.progress[0];
        p.page_done(Some("t1".into()), &counts(500, 500), vec![]);
        p.page_done(Some("t2".into()), &counts(500, 499), vec![]);
        assert_eq!(p.continue_token.as_deref(), Some("t2"));
        assert!(!p.done);
        p.page_done(None, &counts(10, 10), vec![]);
        assert!(p.done);
        assert_eq!(p.continue_token, None);
        assert_eq!(p.counts.listed, 1010);
        assert_eq!(p.counts.rewritten, 1009);
        assert_eq!(p.pages, 3);
        assert!(s.started());
    }

    #[test]
    fn an_expired_token_starts_the_resource_over() {
        let mut p = ResourceProgress {
            resource: "secrets".into(),
            ..Default::default()
        };
        p.page_done(Some("t1".into()), &counts(500, 500), vec![]);
        p.start_over();
        assert_eq!(p.resource, "secrets");
        assert_eq!(p.continue_token, None);
        assert_eq!(p.counts, Counts::default());
        assert_eq!(p.restarts, 1);
    }

    #[test]
    fn failures_kept_are_bounded() {
        let mut p = ResourceProgress::default();
        let many = |n: usize| {
            (0..n)
                .map(|i| FailedObject {
                    object: format!("ns/o{i}"),
                    error: "e".into(),
                })
                .collect::<Vec<_>>()
        };
        p.page_done(Some("t".into()), &Counts::default(), many(70));
        p.page_done(None, &Counts::default(), many(70));
        assert_eq!(p.failures.len(), FAILURES_KEPT);
    }

    #[test]
    fn a_state_is_for_its_server_and_resources_only() {
        let s = State::new("https://a", &res(&["secrets", "configmaps"]));
        assert!(s
            .check_for("https://a", &res(&["secrets", "configmaps"]))
            .is_ok());
        assert!(s
            .check_for("https://b", &res(&["secrets", "configmaps"]))
            .is_err());
        assert!(s
            .check_for("https://a", &res(&["configmaps", "secrets"]))
            .is_err());
        let mut bad = s.clone();
        bad.progress.pop();
        assert!(bad
            .check_for("https://a", &res(&["secrets", "configmaps"]))
            .is_err());
    }

    #[test]
    fn saved_state_reads_back_and_replaces_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(load(&path).unwrap(), None);
        let mut s = State::new("https://a", &res(&["secrets"]));
        save(&path, &s).unwrap();
        s.progress[0].page_done(Some("tok".into()), &counts(5, 5), vec![]);
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), Some(s));
        assert!(!dir.path().join("sub/state.json.tmp").exists());
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(load(&path).unwrap(), None);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{\"format\": 1, \"serv").unwrap();
        assert!(load(&path).is_err());
    }

    #[test]
    fn the_wire_names_are_stable() {
        let mut s = State::new("https://a", &res(&["secrets"]));
        s.progress[0].page_done(Some("tok".into()), &counts(1, 1), vec![]);
        let v: serde_json::Value = serde_json::from_slice(&s.encode()).unwrap();
        assert_eq!(v["progress"][0]["continue"], "tok");
        assert_eq!(v["progress"][0]["counts"]["rewritten"], 1);
    }
}
