//! The one path by which the central state changes ([`Commit::mutate`]),
//! and the view of the state this process serves from.
//!
//! A change: read the cluster with its revision; apply a pure transition
//! ([`edgekms_core::rotation::cluster`]) to a copy; write the copy, and the
//! KEKs it creates or destroys, as one batch conditioned on that revision
//! ([`StateStore::apply`]); only then publish the copy to the view and wake
//! the cluster's node streams. A conflict (another writer moved the cluster
//! on) reloads it and runs the transition again. A crash anywhere leaves
//! the last applied state, from which nodes' reports (level-triggered,
//! idempotent) carry the protocol on. The caller writes the audit records,
//! once the change is applied.
//!
//! The view is a cache of the store, never the only truth: it is reloaded
//! on a conflict and when [`StateStore::watch`] reports a change made by
//! another writer ([`Commit::follow`]). One kind of change skips the store
//! on purpose ([`Commit::absorb`]): a node's progress that moves no
//! protocol step (what it applied, its primary, when it was last heard).
//! It reaches the store with the cluster's next change; a node reports it
//! again on every connect and heartbeat, so losing it costs nothing, and
//! not writing it saves one synced write per node and rotation, which is
//! what bounds a fleet-wide rotation.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use edgekms_core::rotation::cluster::{Cluster, Event, FleetError};
use edgekms_hsm::Key256;
use tokio::sync::{broadcast, watch};

use crate::error::ServerError;
use crate::state_store::{Batch, Op, Revision, StateStore, StoreError};

/// How often a transition is run again when other writers keep moving
/// the cluster on.
const MAX_ATTEMPTS: usize = 16;
/// How long a change is tried again while the store is unavailable (a
/// replicated store electing a new leader takes a second or two).
const UNAVAILABLE_FOR: std::time::Duration = std::time::Duration::from_secs(15);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct View {
    clusters: BTreeMap<String, (Cluster, Revision)>,
    /// Join token id -> (cluster, node), derived from the clusters.
    tokens: HashMap<String, (String, String)>,
}

impl View {
    /// Keeps `cluster` at `revision` unless the view already holds that
    /// revision or a newer one: a reload racing a change of this process
    /// must neither go back nor drop progress absorbed on top of the same
    /// stored record (the node that reported it would not report again).
    fn put(&mut self, cluster: Cluster, revision: Revision) {
        let name = cluster.name().to_owned();
        if self
            .clusters
            .get(&name)
            .is_some_and(|(_, seen)| *seen >= revision)
        {
            return;
        }
        self.tokens.retain(|_, (c, _)| *c != name);
        for (node, rec) in cluster.nodes() {
            if let Some(t) = &rec.token {
                self.tokens
                    .insert(t.id.clone(), (name.clone(), node.clone()));
            }
        }
        self.clusters.insert(name, (cluster, revision));
    }
}

/// The store, the root key that wraps what it holds, and the view.
pub struct Commit {
    store: Arc<dyn StateStore>,
    root: Key256,
    view: Mutex<View>,
    /// Per cluster, held across a change's write: this process's changes
    /// to one cluster apply one at a time and in order (only another
    /// writer can conflict), while changes to different clusters overlap
    /// (a replicated store's round trips would otherwise add up).
    writing: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Per cluster, bumped after every change applied.
    watches: Mutex<HashMap<String, watch::Sender<u64>>>,
}

/// What a transition may add to its batch besides the cluster record.
pub type Ops = Vec<Op>;

impl Commit {
    /// Loads every cluster from `store`.
    pub fn load(store: Arc<dyn StateStore>, root: Key256) -> Result<Self, ServerError> {
        let mut view = View::default();
        for (cluster, rev) in store.clusters()? {
            view.put(cluster, rev);
        }
        Ok(Self {
            store,
            root,
            view: Mutex::new(view),
            writing: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
        })
    }

    pub fn store(&self) -> &dyn StateStore {
        self.store.as_ref()
    }

    pub fn root(&self) -> &Key256 {
        &self.root
    }

    /// Changes `cluster` by `f`, which works on a copy and may add KEK
    /// operations; the copy is applied to the store, then published.
    pub fn mutate<T>(
        &self,
        cluster: &str,
        f: impl FnMut(&mut Cluster, &mut Ops) -> Result<(T, Vec<Event>), ServerError>,
    ) -> Result<(T, Vec<Event>), ServerError> {
        self.change(cluster, None::<fn(&mut Ops) -> Cluster>, f)
    }

    /// Like [`Commit::mutate`], creating the cluster with `create` (which
    /// may add KEK operations) when it does not exist.
    pub fn create_or_mutate<T>(
        &self,
        cluster: &str,
        create: impl FnMut(&mut Ops) -> Cluster,
        f: impl FnMut(&mut Cluster, &mut Ops) -> Result<(T, Vec<Event>), ServerError>,
    ) -> Result<(T, Vec<Event>), ServerError> {
        self.change(cluster, Some(create), f)
    }

    fn change<T>(
        &self,
        cluster: &str,
        mut create: Option<impl FnMut(&mut Ops) -> Cluster>,
        mut f: impl FnMut(&mut Cluster, &mut Ops) -> Result<(T, Vec<Event>), ServerError>,
    ) -> Result<(T, Vec<Event>), ServerError> {
        let writing = self.writing(cluster);
        let _writing = lock(&writing);
        let deadline = std::time::Instant::now() + UNAVAILABLE_FOR;
        let mut conflicts = 0;
        let mut unconfirmed = false;
        while conflicts < MAX_ATTEMPTS {
            let mut ops = Ops::new();
            let current = lock(&self.view).clusters.get(cluster).cloned();
            let (mut next, rev) = match (current, create.as_mut()) {
                (Some((c, rev)), _) => (c, rev),
                (None, Some(create)) => (create(&mut ops), 0),
                (None, None) => return Err(FleetError::UnknownCluster(cluster.to_owned()).into()),
            };
            let (out, events) = f(&mut next, &mut ops)?;
            for event in &events {
                if let Event::Destroyed { version } = event {
                    ops.push(Op::DeleteKek {
                        cluster: cluster.to_owned(),
                        version: *version,
                    });
                }
            }
            ops.push(Op::PutCluster(next.clone()));
            let batch = Batch {
                expect: vec![(cluster.to_owned(), rev)],
                ops,
            };
            match self.store.apply(&self.root, batch) {
                Ok(changed) => {
                    if events.iter().any(|e| matches!(e, Event::Promoted { .. })) {
                        edgekms_daemon::failpoint::hit("server-after-promote-commit");
                    }
                    let rev = changed
                        .iter()
                        .find(|c| c.cluster == cluster)
                        .map_or(rev, |c| c.revision);
                    let mut view = lock(&self.view);
                    view.put(next, rev);
                    drop(view);
                    self.notify(cluster);
                    return Ok((out, events));
                }
                Err(StoreError::Conflict { .. }) => {
                    conflicts += 1;
                    self.reload(cluster)?;
                }
                Err(e @ (StoreError::Unavailable(_) | StoreError::Unconfirmed(_))) => {
                    if let StoreError::Unconfirmed(_) = e {
                        unconfirmed = true;
                    }
                    if std::time::Instant::now() >= deadline {
                        // Once a write went unconfirmed, the change may
                        // still land: say so, whatever came after.
                        return Err(match e {
                            StoreError::Unavailable(why) if unconfirmed => {
                                StoreError::Unconfirmed(why)
                            }
                            e => e,
                        }
                        .into());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    // A write that timed out may have been applied all the
                    // same: then it is this change's, and it is done (its
                    // events are returned, and audited, once).
                    match self.store.cluster(cluster) {
                        Ok(Some((stored, revision))) if stored == next => {
                            lock(&self.view).put(stored, revision);
                            self.notify(cluster);
                            return Ok((out, events));
                        }
                        // Not applied (or another writer moved on): again, on
                        // what the store holds now.
                        Ok(_) => {
                            let _ = self.reload(cluster);
                        }
                        Err(_) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict {
            cluster: cluster.to_owned(),
        }
        .into())
    }

    fn writing(&self, cluster: &str) -> Arc<Mutex<()>> {
        lock(&self.writing)
            .entry(cluster.to_owned())
            .or_default()
            .clone()
    }

    /// Applies `f` to the view's copy of `cluster` only: for node progress
    /// that moves no protocol step (see the module documentation). `None`
    /// when the cluster is unknown.
    pub fn absorb<R>(&self, cluster: &str, f: impl FnOnce(&mut Cluster) -> R) -> Option<R> {
        // Not while a change of the cluster is in flight: its copy, taken
        // before, would overwrite what is absorbed now.
        let writing = self.writing(cluster);
        let _writing = lock(&writing);
        lock(&self.view)
            .clusters
            .get_mut(cluster)
            .map(|(c, _)| f(c))
    }

    /// Reads `cluster` from the view.
    pub fn read<R>(&self, cluster: &str, f: impl FnOnce(&Cluster) -> R) -> Result<R, ServerError> {
        let view = lock(&self.view);
        let (c, _) = view
            .clusters
            .get(cluster)
            .ok_or_else(|| FleetError::UnknownCluster(cluster.to_owned()))?;
        Ok(f(c))
    }

    /// Reads every cluster from the view, in name order.
    pub fn read_all<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &Cluster>) -> R) -> R {
        let view = lock(&self.view);
        let mut all = view.clusters.values().map(|(c, _)| c);
        f(&mut all)
    }

    /// The `(cluster, node)` a join token id was issued for.
    pub fn token(&self, id: &str) -> Option<(String, String)> {
        lock(&self.view).tokens.get(id).cloned()
    }

    /// KEK `version` of `cluster`, unwrapped.
    pub fn kek(
        &self,
        cluster: &str,
        version: u32,
        key_id: &str,
    ) -> Result<Option<Key256>, ServerError> {
        Ok(self.store.kek(&self.root, cluster, version, key_id)?)
    }

    /// A receiver that changes whenever `cluster` changes.
    pub fn subscribe(&self, cluster: &str) -> watch::Receiver<u64> {
        lock(&self.watches)
            .entry(cluster.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn notify(&self, cluster: &str) {
        if let Some(tx) = lock(&self.watches).get(cluster) {
            tx.send_modify(|g| *g += 1);
        }
    }

    /// Replaces the view's copy of `cluster` with the store's.
    fn reload(&self, cluster: &str) -> Result<(), ServerError> {
        let stored = self.store.cluster(cluster)?;
        let mut view = lock(&self.view);
        match stored {
            Some((c, rev)) => view.put(c, rev),
            None => {
                view.clusters.remove(cluster);
            }
        }
        drop(view);
        self.notify(cluster);
        Ok(())
    }

    /// Keeps the view current with changes other writers make (another
    /// replica on a shared store): runs until the store's watch ends.
    pub async fn follow(self: Arc<Self>) {
        let mut changes = self.store.watch();
        // What changed between loading and subscribing.
        match self.store.clusters() {
            Ok(all) => {
                for (c, rev) in all {
                    let stale = lock(&self.view)
                        .clusters
                        .get(c.name())
                        .is_none_or(|(_, seen)| *seen < rev);
                    if stale {
                        lock(&self.view).put(c.clone(), rev);
                        self.notify(c.name());
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the state to follow it"),
        }
        loop {
            match changes.recv().await {
                Ok(changed) => {
                    let stale = lock(&self.view)
                        .clusters
                        .get(&changed.cluster)
                        .is_none_or(|(_, rev)| *rev < changed.revision);
                    if !stale {
                        continue;
                    }
                    if let Some(record) = changed.record {
                        if record.name() == changed.cluster {
                            lock(&self.view).put((*record).clone(), changed.revision);
                            self.notify(&changed.cluster);
                            continue;
                        }
                    }
                    {
                        if let Err(e) = self.reload(&changed.cluster) {
                            tracing::warn!(cluster = %changed.cluster, error = %e, "cannot reload a cluster another writer changed");
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let names: Vec<String> = match self.store.clusters() {
                        Ok(all) => all.into_iter().map(|(c, _)| c.name().to_owned()).collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot reload the state after missing changes");
                            continue;
                        }
                    };
                    for name in names {
                        if let Err(e) = self.reload(&name) {
                            tracing::warn!(cluster = %name, error = %e, "cannot reload a cluster");
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::rocks;
    use edgekms_core::rotation::cluster::Cluster;

    /// A commit path over a real embedded store holding cluster "a".
    fn commit(dir: &std::path::Path) -> (Arc<rocks::Store>, Commit) {
        let store = Arc::new(rocks::Store::create(dir).unwrap());
        let root = Key256::generate();
        let a = Cluster::new("a", "a/v1/x".into(), 1);
        let batch = Batch {
            expect: vec![("a".into(), 0)],
            ops: vec![Op::PutCluster(a)],
        };
        store.apply(&root, batch).unwrap();
        let commit = Commit::load(store.clone(), root).unwrap();
        (store, commit)
    }

    fn seq(commit: &Commit) -> u64 {
        commit.read("a", |c| c.seq()).unwrap()
    }

    /// The view is not the truth: a change another writer made under it
    /// is read back and the transition runs again on top of it, so no
    /// change is lost and no version number is minted twice.
    #[test]
    fn a_change_made_by_another_writer_is_reloaded_and_built_on() {
        let dir = tempfile::tempdir().unwrap();
        let (store, commit) = commit(dir.path());
        // Another writer rotates "a" (v2) behind this view's back.
        let (mut other, rev) = store.cluster("a").unwrap().unwrap();
        other.rotate("a/v2/other".into(), 2).unwrap();
        let batch = Batch {
            expect: vec![("a".into(), rev)],
            ops: vec![Op::PutCluster(other)],
        };
        store.apply(commit.root(), batch).unwrap();
        // This view still has v1 only; its rotation conflicts, reloads and
        // is run again: it finds v2 taken (primary already: no node to
        // wait for) and mints v3.
        let mut attempts = 0;
        let (version, _) = commit
            .mutate("a", |c, _| {
                attempts += 1;
                let (v, _, events) = c.rotate("a/v2/mine".into(), 3)?;
                Ok((v, events))
            })
            .unwrap();
        assert_eq!((version, attempts), (3, 2));
        let key_id = commit
            .read("a", |c| c.versions()[&2].key_id.clone())
            .unwrap();
        assert_eq!(key_id, "a/v2/other");
    }

    /// A reload of the revision the view already holds (the store's watch
    /// reporting this process's own write, racing its publication) keeps
    /// what was absorbed on top of it: dropping it left nodes looking
    /// behind forever at fleet scale.
    #[test]
    fn a_reload_of_the_same_revision_keeps_absorbed_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, commit) = commit(dir.path());
        let before = seq(&commit);
        // Stands in for absorbed progress: any change to the view's copy.
        commit
            .absorb("a", |c| c.rotate("a/v2/absorbed".into(), 2))
            .unwrap()
            .unwrap();
        commit.reload("a").unwrap();
        assert!(seq(&commit) > before, "the absorbed change was dropped");
    }

    #[test]
    fn absorbed_progress_stays_in_the_view_and_changes_are_announced() {
        let dir = tempfile::tempdir().unwrap();
        let (store, commit) = commit(dir.path());
        let changes = commit.subscribe("a");
        let before = seq(&commit);
        commit
            .mutate("a", |c, _| {
                let (_, _, events) = c.rotate("a/v2/y".into(), 2)?;
                Ok(((), events))
            })
            .unwrap();
        assert!(changes.has_changed().unwrap());
        assert!(seq(&commit) > before);
        assert_eq!(store.cluster("a").unwrap().unwrap().0.seq(), seq(&commit));
        assert!(commit.absorb("a", |c| c.touch("nobody", 9)).is_some());
        assert!(commit.absorb("missing", |_| ()).is_none());
        assert!(matches!(
            commit.mutate("missing", |_, _| Ok(((), Vec::new()))),
            Err(ServerError::Fleet(FleetError::UnknownCluster(_)))
        ));
    }

    /// A store whose next `apply` fails as unavailable, after applying
    /// the batch (`applied`: a write that timed out but landed) or not.
    use crate::state_store::Changed;

    struct Flaky {
        inner: Arc<rocks::Store>,
        fail_next: std::sync::atomic::AtomicBool,
        applied: bool,
    }

    impl StateStore for Flaky {
        fn identity(&self, root: &Key256) -> Result<crate::state_store::Identity, StoreError> {
            StateStore::identity(self.inner.as_ref(), root)
        }
        fn clusters(&self) -> Result<Vec<(Cluster, Revision)>, StoreError> {
            StateStore::clusters(self.inner.as_ref())
        }
        fn cluster(&self, name: &str) -> Result<Option<(Cluster, Revision)>, StoreError> {
            StateStore::cluster(self.inner.as_ref(), name)
        }
        fn kek(
            &self,
            root: &Key256,
            c: &str,
            v: u32,
            id: &str,
        ) -> Result<Option<Key256>, StoreError> {
            StateStore::kek(self.inner.as_ref(), root, c, v, id)
        }
        fn apply(&self, root: &Key256, batch: Batch) -> Result<Vec<Changed>, StoreError> {
            if self
                .fail_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                if self.applied {
                    self.inner.apply(root, batch)?;
                }
                return Err(StoreError::Unavailable("no quorum".into()));
            }
            self.inner.apply(root, batch)
        }
        fn watch(&self) -> broadcast::Receiver<Changed> {
            self.inner.watch()
        }
        fn append_audit(&self, json: &[u8]) -> Result<u64, StoreError> {
            self.inner.append_audit(json)
        }
        fn audit_scan(
            &self,
            from: u64,
            v: crate::state_store::AuditVisitor<'_>,
        ) -> Result<(), StoreError> {
            StateStore::audit_scan(self.inner.as_ref(), from, v)
        }
        fn audit_scan_back(
            &self,
            upto: u64,
            v: crate::state_store::AuditVisitor<'_>,
        ) -> Result<(), StoreError> {
            StateStore::audit_scan_back(self.inner.as_ref(), upto, v)
        }
        fn audit_bounds(&self) -> Result<Option<(u64, u64)>, StoreError> {
            self.inner.audit_bounds()
        }
        fn delete_audit_below(&self, below: u64) -> Result<(), StoreError> {
            StateStore::delete_audit_below(self.inner.as_ref(), below)
        }
        fn snapshot(
            &self,
            root: &Key256,
            a: bool,
        ) -> Result<crate::state_store::Snapshot, StoreError> {
            self.inner.snapshot(root, a)
        }
    }

    /// A write that fails as unavailable is tried again; one that landed
    /// all the same is recognised as this change's: one version minted,
    /// its events returned once.
    #[test]
    fn an_unavailable_store_is_waited_for_and_a_landed_write_is_not_made_twice() {
        for applied in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (store, commit) = commit(dir.path());
            let root = Key256::from_bytes(commit.root().expose());
            let flaky = Arc::new(Flaky {
                inner: store,
                fail_next: std::sync::atomic::AtomicBool::new(true),
                applied,
            });
            let commit = Commit::load(flaky.clone(), root).unwrap();
            let mut attempts = 0;
            let (version, events) = commit
                .mutate("a", |c, _| {
                    attempts += 1;
                    let (v, _, events) = c.rotate(format!("a/v2/{attempts}"), 2)?;
                    Ok((v, events))
                })
                .unwrap();
            assert_eq!(version, 2, "applied {applied}");
            assert!(
                !events.is_empty(),
                "applied {applied}: the rotation's events"
            );
            assert_eq!(attempts, if applied { 1 } else { 2 });
            let versions = commit.read("a", |c| c.versions().len()).unwrap();
            assert_eq!(versions, 2);
        }
    }

    #[tokio::test]
    async fn the_view_follows_changes_other_writers_make() {
        let dir = tempfile::tempdir().unwrap();
        let (store, commit) = commit(dir.path());
        let commit = Arc::new(commit);
        let mut changes = commit.subscribe("a");
        tokio::spawn(commit.clone().follow());
        tokio::task::yield_now().await;
        let (mut other, rev) = store.cluster("a").unwrap().unwrap();
        other.rotate("a/v2/other".into(), 2).unwrap();
        let batch = Batch {
            expect: vec![("a".into(), rev)],
            ops: vec![Op::PutCluster(other.clone())],
        };
        store.apply(commit.root(), batch).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), changes.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(commit.read("a", |c| c.clone()).unwrap(), other);
    }
}
