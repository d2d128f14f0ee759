//! The central key service (`edgekms-server`): the daemon around
//! [`edgekms_core::rotation::cluster`].
//!
//! [`Core`] owns the clusters in memory and in the [`store`]. Every change
//! follows one path ([`Core::mutate`]): clone the cluster, apply a pure
//! transition, commit the record (and any KEK created or destroyed) in one
//! synced batch, publish the clone, then wake the cluster's node streams
//! and write the audit lines. A crash anywhere leaves the last committed
//! state, from which nodes' reports (level-triggered, idempotent) carry the
//! protocol on.

pub mod audit;
pub mod backup;
pub mod error;
pub mod init;
pub mod metrics;
pub mod service;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use edgekms_hsm::Key256;
use edgekms_proto::fleet as pb;
use rand::Rng;
use tokio::sync::watch;

pub use self::audit::AuditRecord;
use self::audit::Refusals;
use self::error::ServerError;
use self::store::{Change, Store};
use edgekms_core::delivery;
use edgekms_core::keyid;
use edgekms_core::rotation::cluster::{Cluster, Event, FleetError, NodeState, TokenRecord};
use edgekms_core::VersionState;
use edgekms_daemon::pki::{self, Ca};

pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long and how many audit records are kept (`--audit-retention`,
/// `--audit-max-records`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_records: u64,
}

/// A year: an audit trail for key custody is usually asked for that long.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// About 300 MB of store at the usual record size of a few hundred bytes.
pub const DEFAULT_AUDIT_MAX_RECORDS: u64 = 1_000_000;

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_AUDIT_RETENTION,
            max_records: DEFAULT_AUDIT_MAX_RECORDS,
        }
    }
}

/// The time of a stored audit record, read from its head: records are
/// written with `time_ms` first, so retention and `--since` need not parse
/// whole records; anything else is parsed in full.
pub fn audit_time_ms(raw: &[u8]) -> Option<u64> {
    const HEAD: &[u8] = b"{\"time_ms\":";
    if let Some(rest) = raw.strip_prefix(HEAD) {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 {
            return std::str::from_utf8(&rest[..digits]).ok()?.parse().ok();
        }
    }
    #[derive(serde::Deserialize)]
    struct Time {
        time_ms: u64,
    }
    serde_json::from_slice::<Time>(raw).ok().map(|t| t.time_ms)
}

pub use edgekms_daemon::config::now_unix;

#[derive(Default)]
struct State {
    clusters: BTreeMap<String, Cluster>,
    /// Join token id -> (cluster, node).
    tokens: HashMap<String, (String, String)>,
}

impl State {
    fn cluster(&self, name: &str) -> Result<&Cluster, FleetError> {
        self.clusters
            .get(name)
            .ok_or_else(|| FleetError::UnknownCluster(name.to_owned()))
    }
}

/// Automatic rotation: a default interval and per-cluster overrides
/// (`None`: off).
#[derive(Debug, Clone, Default)]
pub struct AutoRotate {
    pub default: Option<Duration>,
    pub clusters: BTreeMap<String, Option<Duration>>,
}

impl AutoRotate {
    pub fn interval(&self, cluster: &str) -> Option<Duration> {
        match self.clusters.get(cluster) {
            Some(choice) => *choice,
            None => self.default,
        }
    }
}

/// What an accepted [`Core::add_node`] returns.
#[derive(Debug)]
pub struct Invitation {
    pub token: String,
    pub expires_unix: u64,
    pub ca_hash: String,
    pub cluster_created: bool,
}

/// The service's state and every operation on it.
pub struct Core {
    store: Store,
    root: Key256,
    ca: Ca,
    ca_hash: String,
    state: Mutex<State>,
    /// Per cluster, bumped after every committed change.
    watches: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Open node streams: (cluster, node) -> stream id.
    connected: Mutex<HashMap<(String, String), u64>>,
    next_stream: AtomicU64,
    audit_seq: AtomicU64,
    refusals: Refusals,
    shutdown: watch::Sender<bool>,
    pub auto_rotate: AutoRotate,
    pub heartbeat: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A join token id: 128 random bits, hex. Never one in use: a collision
/// (astronomically unlikely, but then an invitation would silently replace
/// another node's) draws again, and gives up after a few draws.
fn fresh_token_id(
    in_use: &HashMap<String, (String, String)>,
    mut draw: impl FnMut() -> String,
) -> Result<String, ServerError> {
    for _ in 0..8 {
        let id = draw();
        if !in_use.contains_key(&id) {
            return Ok(id);
        }
    }
    Err(ServerError::InvalidArgument(
        "cannot draw an unused join token id; try again".into(),
    ))
}

fn random_token_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn random_string(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Core {
    /// Loads the state of an initialized data dir with its unsealed root key.
    pub fn load(store: Store, root: Key256) -> Result<Self, ServerError> {
        let (ca_cert, ca_key, _, _) = store.identity(&root)?;
        let ca = Ca::load(&ca_cert, &ca_key)?;
        let ca_hash = ca.pin()?;
        let mut state = State::default();
        for cluster in store.clusters()? {
            for (node, rec) in cluster.nodes() {
                if let Some(t) = &rec.token {
                    state
                        .tokens
                        .insert(t.id.clone(), (cluster.name().to_owned(), node.clone()));
                }
            }
            state.clusters.insert(cluster.name().to_owned(), cluster);
        }
        let audit_seq = store.last_audit_seq()?;
        Ok(Self {
            store,
            root,
            ca,
            ca_hash,
            state: Mutex::new(state),
            watches: Mutex::new(HashMap::new()),
            connected: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            audit_seq: AtomicU64::new(audit_seq),
            refusals: Refusals::default(),
            shutdown: watch::channel(false).0,
            auto_rotate: AutoRotate::default(),
            heartbeat: Duration::from_secs(15),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn root(&self) -> &Key256 {
        &self.root
    }

    /// The server's TLS material: `(CA cert, server cert, server key)`.
    pub fn tls_identity(&self) -> Result<(Vec<u8>, Vec<u8>, pki::PrivateKey), ServerError> {
        let (ca, _, cert, key) = self.store.identity(&self.root)?;
        Ok((ca, cert, key))
    }

    /// Ends every node stream (shutdown).
    pub fn shut_down(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
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

    /// The one path by which a cluster changes. `f` works on a copy; the
    /// copy is committed, then published.
    fn mutate<T>(
        &self,
        cluster: &str,
        f: impl FnOnce(&mut Cluster, &mut Change) -> Result<(T, Vec<Event>), ServerError>,
    ) -> Result<(T, Vec<Event>), ServerError> {
        let (out, events) = {
            let mut state = lock(&self.state);
            let mut next = state.cluster(cluster)?.clone();
            let mut change = Change::default();
            let (out, events) = f(&mut next, &mut change)?;
            self.persist(&mut change, &next, &events)?;
            if events.iter().any(|e| matches!(e, Event::Promoted { .. })) {
                edgekms_daemon::failpoint::hit("server-after-promote-commit");
            }
            state.clusters.insert(next.name().to_owned(), next);
            (out, events)
        };
        self.notify(cluster);
        self.audit_events(cluster, &events);
        Ok((out, events))
    }

    fn persist(
        &self,
        change: &mut Change,
        cluster: &Cluster,
        events: &[Event],
    ) -> Result<(), ServerError> {
        for event in events {
            if let Event::Destroyed { version } = event {
                change.delete_kek(cluster.name(), *version);
            }
        }
        change.put_cluster(cluster)?;
        self.store.commit(std::mem::take(change))?;
        Ok(())
    }

    fn audit_events(&self, cluster: &str, events: &[Event]) {
        for event in events {
            let rec = match event {
                Event::Acked { node, version } => AuditRecord::new("ack", "node")
                    .cluster(cluster)
                    .node(node)
                    .version(*version),
                Event::Dropped { node, version } => AuditRecord::new("drop-ack", "node")
                    .cluster(cluster)
                    .node(node)
                    .version(*version),
                Event::Promoted { version, without } => {
                    let rec = AuditRecord::new("promotion", "server")
                        .cluster(cluster)
                        .version(*version);
                    if without.is_empty() {
                        rec
                    } else {
                        rec.detail(format!("forced without {}", without.join(", ")))
                    }
                }
                Event::Destroyed { version } => AuditRecord::new("destroy", "server")
                    .cluster(cluster)
                    .version(*version)
                    .detail("every node dropped it; central copy destroyed"),
            };
            self.audit(rec);
        }
    }

    /// Writes one audit line (log target `audit`) and keeps it for
    /// `kmsctl audit`.
    pub fn audit(&self, rec: AuditRecord) {
        let seq = self.audit_seq.fetch_add(1, Ordering::SeqCst) + 1;
        rec.emit();
        if let Err(e) = self.store.put_audit(seq, &rec.to_json()) {
            tracing::error!(error = %e, "cannot store an audit record");
        }
    }

    /// A refusal of an unauthenticated or failed caller, counted per peer
    /// address and kind ([`Refusals`]): kept at once when it is the first
    /// of its kind this minute, else only counted.
    pub fn refused(
        &self,
        peer: Option<SocketAddr>,
        what: &'static str,
        class: &'static str,
        rec: impl FnOnce() -> AuditRecord,
    ) {
        if let Some(rec) = self.refusals.note(peer.map(|p| p.ip()), what, class, rec) {
            self.audit(rec);
        }
    }

    /// Ends the refusal window: one record per kind and peer with the
    /// count of what was only counted. Called every minute and at shutdown.
    pub fn flush_refusals(&self) {
        for rec in self.refusals.drain() {
            self.audit(rec);
        }
    }

    /// Applies audit retention: deletes the oldest records beyond
    /// `max_records` and those older than `max_age`. Returns how many
    /// sequence numbers were deleted.
    pub fn apply_retention(&self, retention: Retention) -> Result<u64, ServerError> {
        let Some(first) = self.store.first_audit_seq()? else {
            return Ok(0);
        };
        let last = self.store.last_audit_seq()?;
        // Sequence numbers are dense (gaps only where a write failed), so
        // keeping those above `last - max` keeps at most `max` records.
        let mut below = last
            .saturating_sub(retention.max_records)
            .saturating_add(1)
            .max(first);
        let cutoff_ms =
            (now_unix().saturating_sub(retention.max_age.as_secs())).saturating_mul(1000);
        // Records are appended in time order: the first one young enough
        // ends the scan.
        self.store
            .audit_scan(below, |seq, raw| match audit_time_ms(raw) {
                Some(t) if t < cutoff_ms => {
                    below = seq + 1;
                    true
                }
                _ => false,
            })?;
        if below <= first {
            return Ok(0);
        }
        self.store.delete_audit_below(below)?;
        let deleted = below - first;
        tracing::info!(
            deleted,
            kept_from = below,
            "audit retention: deleted the oldest records"
        );
        Ok(deleted)
    }

    /// `kmsctl audit`: records at or after `since_unix`, after sequence
    /// number `after_seq`, the newest `limit` of them (0: all), oldest
    /// first, handed to `send` in pages of bounded size until it says
    /// stop. Blocking (RocksDB reads): run it on a blocking thread.
    pub fn stream_audit(
        &self,
        since_unix: u64,
        limit: u64,
        after_seq: u64,
        mut send: impl FnMut(Vec<pb::AuditRecord>) -> bool,
    ) -> Result<(), ServerError> {
        const PAGE_RECORDS: usize = 2000;
        const PAGE_BYTES: usize = 1 << 20;
        let since_ms = since_unix.saturating_mul(1000);
        let young = |raw: &[u8]| since_ms == 0 || audit_time_ms(raw).is_some_and(|t| t >= since_ms);
        let mut start = after_seq.saturating_add(1);
        if limit > 0 {
            // Walk back from the newest to where the `limit` newest begin.
            let (floor, mut counted) = (start, 0);
            self.store.audit_scan_back(u64::MAX, |seq, raw| {
                if seq < floor || !young(raw) {
                    return false;
                }
                counted += 1;
                start = seq;
                counted < limit
            })?;
            if counted == 0 {
                return Ok(());
            }
        }
        let mut page = Vec::new();
        let mut bytes = 0;
        let mut sent = 0u64;
        let mut open = true;
        self.store.audit_scan(start, |seq, raw| {
            if !young(raw) {
                return true;
            }
            let json = String::from_utf8_lossy(raw).into_owned();
            bytes += json.len();
            page.push(pb::AuditRecord {
                time_unix_ms: audit_time_ms(raw).unwrap_or(0),
                json,
                seq,
            });
            sent += 1;
            if page.len() >= PAGE_RECORDS || bytes >= PAGE_BYTES {
                bytes = 0;
                open = send(std::mem::take(&mut page));
            }
            open && (limit == 0 || sent < limit)
        })?;
        if open && !page.is_empty() {
            send(page);
        }
        Ok(())
    }

    /// Audit records at or after `since_unix`.
    pub fn audit_since(&self, since_unix: u64) -> Result<Vec<AuditRecord>, ServerError> {
        let mut out = Vec::new();
        self.store.audit_records(|raw| {
            if let Ok(rec) = serde_json::from_slice::<AuditRecord>(raw) {
                if rec.time_ms / 1000 >= since_unix {
                    out.push(rec);
                }
            }
            true
        })?;
        Ok(out)
    }

    // ---- operator operations ----

    /// `kmsctl node add`: creates the cluster if needed, issues a token.
    pub fn add_node(
        &self,
        actor: &str,
        cluster: &str,
        node: &str,
        ttl: Duration,
    ) -> Result<Invitation, ServerError> {
        keyid::validate_name(cluster)?;
        keyid::validate_name(node)?;
        let now = now_unix();
        let expires_unix = now.checked_add(ttl.as_secs()).ok_or_else(|| {
            ServerError::InvalidArgument(format!(
                "token lifetime of {} s is too long",
                ttl.as_secs()
            ))
        })?;
        let secret = random_string(16);
        let (id, cluster_created) = {
            let mut state = lock(&self.state);
            let id = fresh_token_id(&state.tokens, random_token_id)?;
            let token = TokenRecord {
                id: id.clone(),
                secret_sha256: edgekms_core::rotation::cluster::token_hash(&secret),
                expires_unix,
                used: false,
            };
            let mut change = Change::default();
            let (mut next, created) = match state.clusters.get(cluster) {
                Some(c) => (c.clone(), false),
                None => {
                    let key = Key256::generate();
                    let key_id = keyid::derive(cluster, 1, &key);
                    change.put_kek(&self.root, cluster, 1, &key_id, &key);
                    (Cluster::new(cluster, key_id, now), true)
                }
            };
            let old_token = next.nodes().get(node).and_then(|n| n.token.clone());
            if let Err(e) = next.invite(node, token) {
                drop(state);
                self.audit(
                    AuditRecord::new("enrol-invite", actor)
                        .cluster(cluster)
                        .node(node)
                        .result(&e.to_string()),
                );
                return Err(e.into());
            }
            self.persist(&mut change, &next, &[])?;
            if let Some(old) = old_token {
                state.tokens.remove(&old.id);
            }
            state
                .tokens
                .insert(id.clone(), (cluster.to_owned(), node.to_owned()));
            state.clusters.insert(cluster.to_owned(), next);
            (id, created)
        };
        self.notify(cluster);
        if cluster_created {
            self.audit(
                AuditRecord::new("rotation", actor)
                    .cluster(cluster)
                    .version(1)
                    .detail("cluster created; version 1 is primary"),
            );
        }
        self.audit(
            AuditRecord::new("enrol-invite", actor)
                .cluster(cluster)
                .node(node)
                .detail(format!("join token {id} expires at {expires_unix}")),
        );
        Ok(Invitation {
            token: format!("{id}.{secret}"),
            expires_unix,
            ca_hash: self.ca_hash.clone(),
            cluster_created,
        })
    }

    /// Refuses (and audits, without the names) a call naming a cluster or
    /// node that is not a valid name: nothing else sees such a name.
    fn check_names(&self, event: &str, actor: &str, names: &[&str]) -> Result<(), ServerError> {
        for name in names {
            if let Err(e) = keyid::validate_name(name) {
                self.audit(AuditRecord::new(event, actor).result(&e.to_string()));
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// `kmsctl node remove`.
    pub fn remove_node(&self, actor: &str, cluster: &str, node: &str) -> Result<(), ServerError> {
        self.check_names("revocation", actor, &[cluster, node])?;
        let result = self.mutate(cluster, |c, _| {
            let token = c.nodes().get(node).and_then(|n| n.token.clone());
            let events = c.revoke(node, now_unix())?;
            Ok((token, events))
        });
        let rec = AuditRecord::new("revocation", actor)
            .cluster(cluster)
            .node(node);
        match result {
            Ok((token, _)) => {
                if let Some(t) = token {
                    lock(&self.state).tokens.remove(&t.id);
                }
                self.audit(rec);
                Ok(())
            }
            Err(e) => {
                self.audit(rec.result(&e.to_string()));
                Err(e)
            }
        }
    }

    /// `kmsctl rotate`: `(version, key_id, created, promoted)`.
    pub fn rotate(
        &self,
        actor: &str,
        cluster: &str,
    ) -> Result<(u32, String, bool, bool), ServerError> {
        self.check_names("rotation", actor, &[cluster])?;
        let root = &self.root;
        let result = self.mutate(cluster, |c, change| {
            let key = Key256::generate();
            let upcoming = c.upcoming_version();
            let key_id = keyid::derive(c.name(), upcoming, &key);
            let (version, created, events) = c.rotate(key_id.clone(), now_unix())?;
            if created {
                change.put_kek(root, c.name(), version, &key_id, &key);
            }
            let meta_id = c
                .versions()
                .get(&version)
                .map(|m| m.key_id.clone())
                .unwrap_or_default();
            edgekms_daemon::failpoint::hit("server-rotate-before-commit");
            let promoted = c
                .versions()
                .get(&version)
                .is_some_and(|m| m.state == VersionState::Primary);
            Ok(((version, meta_id, created, promoted), events))
        });
        match result {
            Ok(((version, key_id, created, promoted), _)) => {
                self.audit(
                    AuditRecord::new("rotation", actor)
                        .cluster(cluster)
                        .version(version)
                        .detail(if created {
                            "new pending version"
                        } else {
                            "a rotation was already pending"
                        }),
                );
                Ok((version, key_id, created, promoted))
            }
            Err(e) => {
                self.audit(
                    AuditRecord::new("rotation", actor)
                        .cluster(cluster)
                        .result(&e.to_string()),
                );
                Err(e)
            }
        }
    }

    /// `kmsctl rotate --force`: promotes now; returns the nodes left out.
    pub fn force_promote(
        &self,
        actor: &str,
        cluster: &str,
        version: u32,
    ) -> Result<Vec<String>, ServerError> {
        self.check_names("promotion", actor, &[cluster])?;
        let result = self.mutate(cluster, |c, _| {
            let events = c.force_promote(version, now_unix())?;
            Ok(((), events))
        });
        match result {
            Ok((_, events)) => Ok(events
                .into_iter()
                .find_map(|e| match e {
                    Event::Promoted { without, .. } => Some(without),
                    _ => None,
                })
                .unwrap_or_default()),
            Err(e) => {
                self.audit(
                    AuditRecord::new("promotion", actor)
                        .cluster(cluster)
                        .version(version)
                        .result(&e.to_string()),
                );
                Err(e)
            }
        }
    }

    /// `kmsctl retire`: `(destroyed, nodes still holding it)`.
    pub fn retire(
        &self,
        actor: &str,
        cluster: &str,
        version: u32,
    ) -> Result<(bool, Vec<String>), ServerError> {
        self.check_names("retirement", actor, &[cluster])?;
        let result = self.mutate(cluster, |c, _| {
            let events = c.retire(version, now_unix())?;
            let waiting = c
                .nodes()
                .iter()
                .filter(|(_, n)| n.state == NodeState::Active && n.held.contains(&version))
                .map(|(name, _)| name.clone())
                .collect::<Vec<_>>();
            Ok((waiting, events))
        });
        let rec = AuditRecord::new("retirement", actor)
            .cluster(cluster)
            .version(version);
        match result {
            Ok((waiting, events)) => {
                self.audit(rec);
                let destroyed = events.contains(&Event::Destroyed { version });
                Ok((destroyed, waiting))
            }
            Err(e) => {
                self.audit(rec.result(&e.to_string()));
                Err(e)
            }
        }
    }

    /// Starts rotations that automatic rotation calls for.
    pub fn auto_rotate_due(&self) {
        let now = now_unix();
        let due: Vec<String> = {
            let state = lock(&self.state);
            state
                .clusters
                .values()
                .filter(|c| c.pending().is_none())
                .filter(|c| {
                    let Some(interval) = self.auto_rotate.interval(c.name()) else {
                        return false;
                    };
                    c.primary()
                        .is_some_and(|(_, m)| m.changed_unix + interval.as_secs() <= now)
                })
                .map(|c| c.name().to_owned())
                .collect()
        };
        for cluster in due {
            if let Err(e) = self.rotate("auto-rotate", &cluster) {
                tracing::warn!(%cluster, error = %e, "automatic rotation failed");
            }
        }
    }

    pub fn status(&self, only: &str) -> Result<pb::StatusResponse, ServerError> {
        if !only.is_empty() {
            keyid::validate_name(only)?;
        }
        let state = lock(&self.state);
        let connected = lock(&self.connected);
        let clusters: Vec<&Cluster> = if only.is_empty() {
            state.clusters.values().collect()
        } else {
            vec![state.cluster(only)?]
        };
        let out = clusters
            .into_iter()
            .map(|c| pb::ClusterStatus {
                name: c.name().to_owned(),
                seq: c.seq(),
                primary: c.primary().map(|p| p.0).unwrap_or(0),
                pending: c.pending().map(|p| p.0).unwrap_or(0),
                versions: c
                    .versions()
                    .iter()
                    .map(|(&version, m)| pb::VersionStatus {
                        version,
                        state: m.state.as_str().into(),
                        key_id: m.key_id.clone(),
                        created_unix: m.created_unix,
                        held_by: c
                            .nodes()
                            .values()
                            .filter(|n| n.state == NodeState::Active && n.held.contains(&version))
                            .count() as u32,
                    })
                    .collect(),
                nodes: c
                    .nodes()
                    .iter()
                    .map(|(name, n)| pb::NodeStatus {
                        name: name.clone(),
                        state: n.state.as_str().into(),
                        connected: connected.contains_key(&(c.name().to_owned(), name.clone())),
                        last_contact_unix: n.last_contact_unix,
                        held: n.held.iter().copied().collect(),
                        primary: n.primary,
                        applied_seq: n.applied_seq,
                        behind: c.behind(name),
                        token_expires_unix: match n.state {
                            NodeState::Invited => {
                                n.token.as_ref().map(|t| t.expires_unix).unwrap_or(0)
                            }
                            _ => 0,
                        },
                    })
                    .collect(),
            })
            .collect();
        Ok(pb::StatusResponse {
            clusters: out,
            server_time_unix: now_unix(),
        })
    }

    /// For metrics: nodes per state (and connected), clusters with a
    /// pending rotation, age of the oldest un-acked delivery in seconds.
    pub fn gauges(&self) -> (BTreeMap<&'static str, u64>, u64, u64) {
        let state = lock(&self.state);
        let mut nodes = BTreeMap::from([("invited", 0), ("active", 0), ("revoked", 0)]);
        let mut pending = 0;
        let mut oldest: Option<u64> = None;
        for c in state.clusters.values() {
            for n in c.nodes().values() {
                *nodes.entry(n.state.as_str()).or_insert(0) += 1;
            }
            if c.pending().is_some() {
                pending += 1;
            }
            if let Some(since) = c.oldest_unacked_since() {
                oldest = Some(oldest.map_or(since, |o| o.min(since)));
            }
        }
        nodes.insert("connected", lock(&self.connected).len() as u64);
        let age = oldest.map_or(0, |since| now_unix().saturating_sub(since));
        (nodes, pending, age)
    }

    // ---- node operations ----

    /// Enrols a node. Returns `(certificate DER, CA DER)`.
    pub fn join(
        &self,
        peer: SocketAddr,
        req: &pb::JoinRequest,
    ) -> Result<(Vec<u8>, Vec<u8>), ServerError> {
        // Names first: a refused name reaches no record, no log line.
        let result = keyid::validate_name(&req.cluster)
            .and_then(|()| keyid::validate_name(&req.node))
            .map_err(ServerError::from)
            .and_then(|()| self.join_inner(req));
        let actor = format!("node at {peer}");
        match &result {
            Ok(_) => self.audit(
                AuditRecord::new("enrol", &actor)
                    .cluster(&req.cluster)
                    .node(&req.node),
            ),
            // Anyone can call Join: failures are counted per peer.
            Err(e) => self.refused(Some(peer), "join", e.class(), || {
                let rec = AuditRecord::new("enrol", &actor).result(&e.to_string());
                if matches!(e, ServerError::Name(_)) {
                    rec
                } else {
                    rec.cluster(&req.cluster).node(&req.node)
                }
            }),
        }
        result
    }

    fn join_inner(&self, req: &pb::JoinRequest) -> Result<(Vec<u8>, Vec<u8>), ServerError> {
        let (id, secret) = req.token.split_once('.').ok_or(FleetError::BadToken)?;
        let (cluster, node) = lock(&self.state)
            .tokens
            .get(id)
            .cloned()
            .ok_or(FleetError::BadToken)?;
        if (cluster.as_str(), node.as_str()) != (req.cluster.as_str(), req.node.as_str()) {
            // Check the secret first: a forged token learns nothing.
            lock(&self.state)
                .cluster(&cluster)?
                .check_token(&node, secret, now_unix())?;
            return Err(FleetError::TokenForOtherNode {
                expected: format!("{cluster}/{node}"),
                requested: format!("{}/{}", req.cluster, req.node),
            }
            .into());
        }
        lock(&self.state)
            .cluster(&cluster)?
            .check_token(&node, secret, now_unix())?;
        delivery::check_public_key(&req.delivery_public_key)?;
        let cert = self.ca.sign_node_csr(&req.csr_der, &cluster, &node)?;
        let fingerprint = pki::fingerprint(&cert);
        let public = hex::encode(&req.delivery_public_key);
        self.mutate(&cluster, |c, _| {
            c.join(&node, secret, now_unix(), fingerprint, public)?;
            Ok(((), Vec::new()))
        })?;
        // The id stays known, so a second use is refused as "already used".
        Ok((cert, self.ca.cert_der.clone()))
    }

    /// Checks that `cert_sha256` ([`pki::fingerprint`] of the peer's
    /// certificate) is the live certificate of an active node.
    pub fn authorize_node(
        &self,
        cluster: &str,
        node: &str,
        cert_sha256: &str,
    ) -> Result<(), ServerError> {
        let state = lock(&self.state);
        state.cluster(cluster)?.authorize(node, cert_sha256)?;
        Ok(())
    }

    /// Registers an open stream; returns its id.
    pub fn connect(&self, cluster: &str, node: &str) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        lock(&self.connected).insert((cluster.to_owned(), node.to_owned()), id);
        id
    }

    pub fn disconnect(&self, cluster: &str, node: &str, id: u64) {
        let mut connected = lock(&self.connected);
        let key = (cluster.to_owned(), node.to_owned());
        if connected.get(&key) == Some(&id) {
            connected.remove(&key);
        }
        drop(connected);
        if let Some(c) = lock(&self.state).clusters.get_mut(cluster) {
            c.touch(node, now_unix());
        }
    }

    /// A node's report. Only a report that changes what the node holds is
    /// committed: `applied_seq` and `primary` alone change in memory and
    /// reach the store with the cluster's next commit (a node reports them
    /// again whenever it connects). One synced commit fewer per node and
    /// state change, which is what bounds a fleet-wide rotation.
    pub fn report(
        &self,
        cluster: &str,
        node: &str,
        report: &pb::NodeReport,
    ) -> Result<(), ServerError> {
        let held: BTreeSet<u32> = report.held.iter().copied().collect();
        {
            let mut state = lock(&self.state);
            let c = state
                .clusters
                .get_mut(cluster)
                .ok_or_else(|| FleetError::UnknownCluster(cluster.to_owned()))?;
            if c.note_progress(node, &held, report.applied_seq, report.primary, now_unix()) {
                return Ok(());
            }
        }
        self.mutate(cluster, |c, _| {
            let events = c.report(node, held, report.applied_seq, report.primary, now_unix())?;
            Ok(((), events))
        })?;
        Ok(())
    }

    /// The next message for a node's stream, if it needs one: the cluster
    /// state, with every version the node lacks wrapped to it. `last` is
    /// what was last sent on this stream.
    pub fn next_message(
        &self,
        cluster: &str,
        node: &str,
        last: &mut Option<(u64, BTreeSet<u32>)>,
    ) -> Result<Option<pb::ClusterState>, ServerError> {
        let (desired, public, held_now) = {
            let state = lock(&self.state);
            let c = state.cluster(cluster)?;
            let Some(rec) = c.nodes().get(node) else {
                return Ok(None);
            };
            let key = (c.seq(), rec.held.clone());
            if last.as_ref() == Some(&key) {
                return Ok(None);
            }
            let up_to_date = !c.behind(node)
                && rec
                    .held
                    .iter()
                    .all(|v| c.versions().get(v).is_some_and(|m| m.state.held_by_nodes()));
            *last = Some(key);
            if up_to_date {
                return Ok(None);
            }
            (
                c.desired(node),
                rec.delivery_public_key.clone(),
                rec.held.clone(),
            )
        };
        let public = hex::decode(&public).map_err(|_| delivery::DeliveryError::BadPublicKey)?;
        let mut versions = Vec::with_capacity(desired.versions.len());
        for dv in desired.versions {
            // `desired` lists only states nodes hold; the others go as
            // retired numbers.
            let Some(state) = edgekms_proto::convert::wire_state(dv.state) else {
                continue;
            };
            let mut wrapped = Vec::new();
            if dv.needs_key && !held_now.contains(&dv.version) {
                let kek = self
                    .store
                    .kek(&self.root, cluster, dv.version, &dv.key_id)?
                    .ok_or(FleetError::UnknownVersion {
                        cluster: cluster.to_owned(),
                        version: dv.version,
                    })?;
                let binding = delivery::Binding {
                    cluster,
                    node,
                    version: dv.version,
                    key_id: &dv.key_id,
                };
                wrapped = delivery::wrap(&public, binding, &kek)?;
                self.audit(
                    AuditRecord::new("delivery", "server")
                        .cluster(cluster)
                        .node(node)
                        .version(dv.version),
                );
            }
            versions.push(pb::VersionEntry {
                version: dv.version,
                state: state as i32,
                key_id: dv.key_id,
                wrapped_key: wrapped.into(),
            });
        }
        Ok(Some(pb::ClusterState {
            seq: desired.seq,
            versions,
            retired: desired.retired,
            heartbeat: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn token_ids_are_128_bit_and_never_reuse_one_in_use() {
        let id = random_token_id();
        assert_eq!(id.len(), 32);
        assert!(hex::decode(&id).is_ok());
        assert_ne!(id, random_token_id());
        let mut in_use = HashMap::new();
        in_use.insert("taken".to_owned(), ("a".to_owned(), "n1".to_owned()));
        // A collision draws again.
        let mut draws = vec!["fresh", "taken"];
        let got = fresh_token_id(&in_use, || draws.pop().unwrap().to_owned()).unwrap();
        assert_eq!(got, "fresh");
        // Only collisions: refused, nothing replaced.
        assert!(fresh_token_id(&in_use, || "taken".to_owned()).is_err());
        assert_eq!(in_use.len(), 1);
    }

    #[test]
    fn audit_time_is_read_from_the_head_or_the_whole_record() {
        let rec = AuditRecord::new("x", "y");
        assert_eq!(audit_time_ms(&rec.to_json()), Some(rec.time_ms));
        assert_eq!(audit_time_ms(br#"{"event":"x","time_ms":42}"#), Some(42));
        assert_eq!(audit_time_ms(b"garbage"), None);
    }
}
