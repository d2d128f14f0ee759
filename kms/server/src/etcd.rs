//! The replicated [`StateStore`]: etcd, shared by any number of service
//! replicas (`--store etcd`).
//!
//! | key (under the prefix, default `/edgekms/`) | value |
//! | --- | --- |
//! | `meta/format` | written last by `init` / `migrate-store`: the prefix is initialized |
//! | `meta/ca-cert` | the CA certificate, DER |
//! | `meta/ca-key` | the CA's PKCS#8 key, wrapped by the root key |
//! | `replica/<name>` | a [`ReplicaRecord`] (JSON); an active one's server key wrapped by the root key |
//! | `alive/<name>` | an [`Alive`] (JSON), under the replica's lease |
//! | `leader` | the name of the replica that runs the once-only jobs, under its lease |
//! | `conn/<replica>/<cluster>/<node>` | a node's sync stream is open on that replica (for status on every replica) |
//! | `cluster/<name>` | a [`Cluster`] record, JSON; its etcd mod revision is its [`Revision`] |
//! | `kek/<cluster>/<version, 10 digits>` | a KEK version wrapped by the root key |
//! | `audit/<seq, 20 digits>` | one audit record, JSON |
//! | `meta/audit-last` | the last audit sequence number taken (every append is conditioned on it) |
//!
//! The root key is never in etcd: each replica keeps it sealed by its own
//! sealer in its data dir ([`crate::init`]). Every value holding key
//! material is AES-256-GCM under the root key with associated data naming
//! its slot, as in [`crate::rocks`].
//!
//! Every change is one etcd transaction conditioned on the mod revisions
//! the caller read, and on this replica's own record being unchanged (a
//! removed replica can no longer write). The [`StateStore`] trait is
//! synchronous, so the etcd client runs on a small runtime of its own and
//! callers wait for its answers (as they wait for RocksDB's fsync).

pub mod liveness;
pub mod replicas;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use edgekms_core::rotation::cluster::Cluster;
use edgekms_daemon::pki::PrivateKey;
use edgekms_hsm::{aead, Key256};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{broadcast, watch};

use self::replicas::{Alive, ReplicaError, ReplicaRecord, ReplicaState};
use crate::rocks::aad;
use crate::state_store::{
    AuditVisitor, Batch, Changed, Identity, Kek, Op, Revision, Snapshot, StateStore, StoreError,
};

pub const DEFAULT_PREFIX: &str = "/edgekms/";
/// How long one request to etcd may take before it counts as unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys read per request when scanning.
const PAGE: i64 = 512;
/// etcd refuses transactions of more than 128 operations (its default
/// `--max-txn-ops`).
const MAX_TXN_OPS: usize = 120;
const FORMAT: &str = "edgekms central etcd v1";

/// Where the replicated store is and how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub prefix: String,
    /// Allows `http://` endpoints (tests only).
    pub insecure: bool,
}

impl EtcdConfig {
    /// Every problem with the settings, in one list.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.endpoints.is_empty() {
            out.push("--etcd-endpoints is required with --store etcd".to_owned());
        }
        for e in &self.endpoints {
            if let Some(rest) = e.strip_prefix("http://") {
                if !self.insecure {
                    out.push(format!("--etcd-endpoints {e}: plaintext etcd is refused (the store holds every cluster's wrapped keys and the audit log); use https:// with --etcd-cacert, --etcd-cert and --etcd-key (--etcd-insecure allows it, for tests only)"));
                }
                if rest.is_empty() {
                    out.push(format!("--etcd-endpoints {e}: no host"));
                }
            } else if e.starts_with("https://") {
                if self.cacert.is_none() {
                    out.push(format!(
                        "--etcd-endpoints {e}: --etcd-cacert is required for https"
                    ));
                }
            } else {
                out.push(format!(
                    "--etcd-endpoints {e}: must start with https:// (or http:// with --etcd-insecure)"
                ));
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            out.push("--etcd-cert and --etcd-key go together".to_owned());
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() < 2 {
            out.push(format!(
                "--etcd-prefix {}: must start and end with / (e.g. /edgekms/)",
                self.prefix
            ));
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a failed request may be sent again: a read always (on another
/// member, once the client picks one), a write only when it never left
/// (no connection to the member the client picked: with one member down,
/// its balancer keeps picking it now and then).
fn retryable(e: &etcd_client::Error, idempotent: bool) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && (idempotent || s.message().contains("connect"))
        }
        etcd_client::Error::TransportError(_) => idempotent,
        _ => false,
    }
}

/// Runs the request `f` makes, again (up to 8 times within about two
/// seconds) while it fails in a way [`retryable`] allows.
pub(crate) async fn retrying<T, Fut>(
    idempotent: bool,
    mut f: impl FnMut() -> Fut,
) -> Result<T, etcd_client::Error>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 0u64;
    loop {
        match f().await {
            Err(e) if attempt < 8 && retryable(&e, idempotent) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            result => return result,
        }
    }
}

/// Whether a failed write certainly was not applied: no connection, or
/// refused by a member that knows of no leader.
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            retryable(e, false)
                || s.message().contains("no leader")
                || s.code() == tonic::Code::InvalidArgument
                || s.code() == tonic::Code::PermissionDenied
                || s.code() == tonic::Code::Unauthenticated
        }
        etcd_client::Error::TransportError(_) => false,
        _ => true,
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

fn corrupt(key: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        detail: detail.to_string(),
    }
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn kek_slot(cluster: &str, version: u32) -> String {
    format!("kek/{cluster}/{version:010}")
}

fn audit_slot(seq: u64) -> String {
    format!("audit/{seq:020}")
}

fn replica_slot(name: &str) -> String {
    format!("replica/{name}")
}

/// The replica this process serves as, and its record's revision.
#[derive(Debug, Clone)]
struct Bound {
    name: String,
    revision: i64,
}

/// The etcd state store.
pub struct EtcdStore {
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: String,
    bound: Mutex<Option<Bound>>,
    changes: broadcast::Sender<Changed>,
    /// Audit records waiting to be written, and the counter as last seen.
    audit: AuditQueue,
    /// Flips to true when this replica's record stops being active.
    removed: watch::Sender<bool>,
    /// The last readiness probe's outcome.
    health: Arc<Mutex<Result<(), String>>>,
    /// Streams opened and closed on this replica, written in order to
    /// `conn/<replica>/<cluster>/<node>` by one task.
    streams: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(String, bool)>>>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Never blocks (a store may be dropped inside an async context).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn read_pem(path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    tokio::fs::read(path).await.map_err(|e| StoreError::Open {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

impl EtcdStore {
    /// Connects to etcd (nothing is read or written yet).
    pub fn connect(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(StoreError::Backend(problems.join("; ")));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot start the etcd client: {e}")))?;
        let cfg2 = cfg.clone();
        let client = wait(&rt, async move {
            let mut opts = ConnectOptions::new()
                .with_timeout(REQUEST_TIMEOUT)
                .with_connect_timeout(Duration::from_secs(3))
                .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
                .with_require_leader(true);
            if cfg2.endpoints.iter().any(|e| e.starts_with("https://")) {
                let mut tls = etcd_client::TlsOptions::new();
                if let Some(ca) = &cfg2.cacert {
                    tls =
                        tls.ca_certificate(etcd_client::Certificate::from_pem(read_pem(ca).await?));
                }
                if let (Some(cert), Some(key)) = (&cfg2.cert, &cfg2.key) {
                    let key_pem = zeroize::Zeroizing::new(read_pem(key).await?);
                    tls = tls.identity(etcd_client::Identity::from_pem(
                        read_pem(cert).await?,
                        key_pem.as_slice(),
                    ));
                }
                opts = opts.with_tls(tls);
            }
            Client::connect(&cfg2.endpoints, Some(opts))
                .await
                .map_err(unavailable)
        })??;
        Ok(Self {
            rt: Some(rt),
            client,
            prefix: cfg.prefix.clone(),
            bound: Mutex::new(None),
            changes: broadcast::channel(4096).0,
            audit: AuditQueue::default(),
            removed: watch::channel(false).0,
            health: Arc::new(Mutex::new(Err("not probed yet".into()))),
            streams: Mutex::new(None),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        // Only taken in drop.
        self.rt.as_ref().unwrap_or_else(|| unreachable!())
    }

    /// Runs `fut` on the store's runtime and waits for it.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        wait(self.rt(), fut)?
    }

    /// Spawns `fut` on the store's runtime (background tasks).
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.rt().spawn(fut);
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    fn key(&self, slot: &str) -> Vec<u8> {
        let mut k = self.prefix.as_bytes().to_vec();
        k.extend_from_slice(slot.as_bytes());
        k
    }

    fn slot_of<'a>(&self, key: &'a [u8]) -> &'a [u8] {
        key.strip_prefix(self.prefix.as_bytes()).unwrap_or(key)
    }

    /// One read (retried off a dead member), waited for.
    fn kv_get(
        &self,
        key: Vec<u8>,
        opts: GetOptions,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        let kv = self.client.kv_client();
        self.run(async move {
            retrying(true, || {
                let (mut kv, key, opts) = (kv.clone(), key.clone(), opts.clone());
                async move { kv.get(key, Some(opts)).await }
            })
            .await
            .map_err(unavailable)
        })
    }

    /// One delete (retried: deleting twice is deleting once), waited for.
    fn kv_delete(&self, key: Vec<u8>, opts: DeleteOptions) -> Result<(), StoreError> {
        let kv = self.client.kv_client();
        self.run(async move {
            retrying(true, || {
                let (mut kv, key, opts) = (kv.clone(), key.clone(), opts.clone());
                async move { kv.delete(key, Some(opts)).await }
            })
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn get(&self, slot: &str) -> Result<Option<KeyValue>, StoreError> {
        self.get_at(slot, 0)
    }

    fn get_at(&self, slot: &str, revision: i64) -> Result<Option<KeyValue>, StoreError> {
        let opts = GetOptions::new().with_revision(revision);
        let mut resp = self.kv_get(self.key(slot), opts)?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Pages through `[start, end)` at `revision` (0: now), oldest key
    /// first (or newest first with `back`); returns the revision read at.
    fn scan(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        back: bool,
        mut visit: impl FnMut(&KeyValue) -> Result<bool, StoreError>,
    ) -> Result<i64, StoreError> {
        let (mut lo, mut hi) = (start, end);
        let mut at = revision;
        loop {
            let mut opts = GetOptions::new()
                .with_range(hi.clone())
                .with_limit(PAGE)
                .with_revision(at);
            if back {
                opts = opts.with_sort(SortTarget::Key, SortOrder::Descend);
            }
            let mut resp = self.kv_get(lo.clone(), opts)?;
            let rev = resp.header().map_or(0, |h| h.revision());
            let more = resp.more();
            let kvs = resp.take_kvs();
            if at == 0 {
                at = rev;
            }
            let Some(last) = kvs.last().map(|kv| kv.key().to_vec()) else {
                return Ok(at);
            };
            for kv in &kvs {
                if !visit(kv)? {
                    return Ok(at);
                }
            }
            if !more {
                return Ok(at);
            }
            if back {
                hi = last;
            } else {
                lo = last;
                lo.push(0);
            }
        }
    }

    fn scan_prefix(
        &self,
        slot_prefix: &str,
        revision: i64,
        visit: impl FnMut(&KeyValue) -> Result<bool, StoreError>,
    ) -> Result<i64, StoreError> {
        let start = self.key(slot_prefix);
        let end = prefix_end(&start);
        self.scan(start, end, revision, false, visit)
    }

    /// A write: failures where it never reached a leader are
    /// [`StoreError::Unavailable`] (nothing changed); any other is
    /// [`StoreError::Unconfirmed`] (it may still be applied).
    fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        let kv = self.client.kv_client();
        let result = self.run(async move {
            retrying(false, || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(|e| {
                if not_sent(&e) {
                    unavailable(e)
                } else {
                    StoreError::Unconfirmed(format!("etcd: {e}"))
                }
            })
        });
        match result {
            // The wait itself gave up: the request may be in flight.
            Err(StoreError::Unavailable(why)) if why.contains("no answer in time") => {
                Err(StoreError::Unconfirmed(why))
            }
            other => other,
        }
    }

    /// Whether `init` (or `migrate-store`) completed under the prefix.
    pub fn initialized(&self) -> Result<bool, StoreError> {
        Ok(self.get("meta/format")?.is_some())
    }

    /// Whether nothing at all is stored under the prefix.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let mut any = false;
        self.scan_prefix("", 0, |_| {
            any = true;
            Ok(false)
        })?;
        Ok(!any)
    }

    fn refuse_unless_empty(&self) -> Result<(), StoreError> {
        if !self.is_empty()? {
            return Err(StoreError::NotEmpty {
                dir: format!("etcd prefix {}", self.prefix),
                why: if self.initialized()? {
                    "a service is already initialized there".into()
                } else {
                    "it holds keys, perhaps from an interrupted init or migrate-store; delete them (etcdctl del --prefix) if so".into()
                },
            });
        }
        Ok(())
    }

    fn wrap(root: &Key256, slot: &str, key_id: &str, plain: &[u8]) -> Vec<u8> {
        aead::seal(root, &aad(slot.as_bytes(), key_id), plain)
    }

    fn unwrap(
        root: &Key256,
        slot: &str,
        key_id: &str,
        wrapped: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
        aead::open(root, &aad(slot.as_bytes(), key_id), wrapped)
            .map(|p| zeroize::Zeroizing::new(p.to_vec()))
            .map_err(|_| StoreError::Unwrap {
                key: slot.to_owned(),
            })
    }

    fn replica_put(
        &self,
        root: &Key256,
        name: &str,
        cert: &[u8],
        key: &PrivateKey,
        now: u64,
    ) -> Result<TxnOp, StoreError> {
        let slot = replica_slot(name);
        let rec = ReplicaRecord {
            name: name.to_owned(),
            state: ReplicaState::Active,
            added_unix: now,
            token_sha256: None,
            token_expires_unix: 0,
            server_cert: None,
            server_key: None,
        }
        .admitted(cert, &Self::wrap(root, &slot, "", key.der()));
        let json = serde_json::to_vec(&rec).map_err(|e| corrupt(&slot, e))?;
        Ok(TxnOp::put(self.key(&slot), json, None))
    }

    /// Writes what `init` made: the CA and the first replica's server
    /// identity, private keys wrapped by `root`. Refuses a prefix that
    /// holds anything.
    pub fn put_init(
        &self,
        root: &Key256,
        identity: &Identity,
        replica: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        self.refuse_unless_empty()?;
        self.finish_init(root, identity, replica, now)
    }

    /// The last transaction of `init` and `migrate-store`: identity and
    /// `meta/format` together, only if no other init got there first.
    fn finish_init(
        &self,
        root: &Key256,
        identity: &Identity,
        replica: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        let Identity {
            ca_cert,
            ca_key,
            server_cert,
            server_key,
        } = identity;
        let ops = vec![
            TxnOp::put(self.key("meta/ca-cert"), ca_cert.to_vec(), None),
            TxnOp::put(
                self.key("meta/ca-key"),
                Self::wrap(root, "meta/ca-key", "", ca_key.der()),
                None,
            ),
            self.replica_put(root, replica, server_cert, server_key, now)?,
            TxnOp::put(self.key("meta/format"), FORMAT, None),
        ];
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.key("meta/format"),
                CompareOp::Equal,
                0,
            )])
            .and_then(ops);
        if !self.txn(txn)?.succeeded() {
            return Err(StoreError::NotEmpty {
                dir: format!("etcd prefix {}", self.prefix),
                why: "another init completed there meanwhile".into(),
            });
        }
        Ok(())
    }

    /// `migrate-store`: copies a whole state (from a RocksDB service) into
    /// an empty prefix, `replica` serving with the state's server identity.
    /// The prefix counts as initialized only once everything is in.
    pub fn import(
        &self,
        root: &Key256,
        snap: &Snapshot,
        replica: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        self.refuse_unless_empty()?;
        let mut ops = Vec::new();
        for c in &snap.clusters {
            let slot = format!("cluster/{}", c.name());
            let json = serde_json::to_vec(c).map_err(|e| corrupt(&slot, e))?;
            ops.push(TxnOp::put(self.key(&slot), json, None));
        }
        for k in &snap.keks {
            let slot = kek_slot(&k.cluster, k.version);
            let wrapped = Self::wrap(root, &slot, &k.key_id, k.key.expose());
            ops.push(TxnOp::put(self.key(&slot), wrapped, None));
        }
        for (i, json) in snap.audit.iter().enumerate() {
            ops.push(TxnOp::put(
                self.key(&audit_slot(i as u64 + 1)),
                json.clone(),
                None,
            ));
        }
        for chunk in ops.chunks(MAX_TXN_OPS) {
            self.txn(Txn::new().and_then(chunk.to_vec()))?;
        }
        self.finish_init(root, &snap.identity, replica, now)
    }

    /// Every replica's record, in name order.
    pub fn replica_records(&self) -> Result<Vec<ReplicaRecord>, StoreError> {
        let mut out = Vec::new();
        self.scan_prefix("replica/", 0, |kv| {
            let slot = String::from_utf8_lossy(self.slot_of(kv.key())).into_owned();
            out.push(serde_json::from_slice(kv.value()).map_err(|e| corrupt(&slot, e))?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every live replica's heartbeat, by name.
    pub fn alive(&self) -> Result<Vec<(String, Alive)>, StoreError> {
        let mut out = Vec::new();
        self.scan_prefix("alive/", 0, |kv| {
            let name = String::from_utf8_lossy(self.slot_of(kv.key()))
                .trim_start_matches("alive/")
                .to_owned();
            // A heartbeat that does not parse is shown as unknown.
            out.push((name, serde_json::from_slice(kv.value()).unwrap_or_default()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The replica running the once-only jobs, if any.
    pub fn leader(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .get("leader")?
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    fn replica(&self, name: &str) -> Result<Option<(ReplicaRecord, i64)>, StoreError> {
        let slot = replica_slot(name);
        match self.get(&slot)? {
            None => Ok(None),
            Some(kv) => Ok(Some((
                serde_json::from_slice(kv.value()).map_err(|e| corrupt(&slot, e))?,
                kv.mod_revision(),
            ))),
        }
    }

    /// Changes one replica record with `f`, conditioned on the revision
    /// it was read at; `extra` operations go in the same transaction.
    fn change_replica(
        &self,
        name: &str,
        f: impl Fn(Option<&ReplicaRecord>) -> Result<(ReplicaRecord, Vec<TxnOp>), ServerReplicaError>,
    ) -> Result<ReplicaRecord, ServerReplicaError> {
        let slot = replica_slot(name);
        for _ in 0..8 {
            let current = self.replica(name)?;
            let (next, extra) = f(current.as_ref().map(|(r, _)| r))?;
            let json = serde_json::to_vec(&next).map_err(|e| corrupt(&slot, e))?;
            let mut ops = vec![TxnOp::put(self.key(&slot), json, None)];
            ops.extend(extra);
            let rev = current.as_ref().map_or(0, |(_, rev)| *rev);
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    self.key(&slot),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then(ops);
            if self.txn(txn)?.succeeded() {
                return Ok(next);
            }
        }
        Err(StoreError::Conflict {
            cluster: format!("replica {name}"),
        }
        .into())
    }

    /// Records an invitation for replica `name` (`kmsctl replica add`).
    pub fn invite_replica(
        &self,
        name: &str,
        token_sha256: &str,
        now: u64,
        expires_unix: u64,
    ) -> Result<(), ServerReplicaError> {
        self.change_replica(name, |cur| {
            Ok((
                ReplicaRecord::invite(cur, name, token_sha256.to_owned(), now, expires_unix)?,
                Vec::new(),
            ))
        })?;
        Ok(())
    }

    /// Checks a replica join token without changing anything (before any
    /// work is done for an unauthenticated caller).
    pub fn check_replica_token(
        &self,
        name: &str,
        secret_sha256: &str,
        now: u64,
    ) -> Result<(), ServerReplicaError> {
        let (rec, _) = self.replica(name)?.ok_or(ReplicaError::BadToken)?;
        rec.check_token(secret_sha256, now)?;
        Ok(())
    }

    /// Admits replica `name` if `secret_sha256` matches its invitation,
    /// with its server certificate and key.
    pub fn admit_replica(
        &self,
        root: &Key256,
        name: &str,
        secret_sha256: &str,
        now: u64,
        cert: &[u8],
        key: &PrivateKey,
    ) -> Result<(), ServerReplicaError> {
        let wrapped = Self::wrap(root, &replica_slot(name), "", key.der());
        self.change_replica(name, |cur| {
            let rec = cur.ok_or(ReplicaError::BadToken)?;
            rec.check_token(secret_sha256, now)?;
            Ok((rec.admitted(cert, &wrapped), Vec::new()))
        })?;
        Ok(())
    }

    /// Removes replica `name`: its keys are dropped and its writes refused
    /// from now on.
    pub fn remove_replica(&self, name: &str) -> Result<(), ServerReplicaError> {
        let all = self.replica_records()?;
        let alive = TxnOp::delete(self.key(&format!("alive/{name}")), None);
        let streams = TxnOp::delete(
            self.key(&format!("conn/{name}/")),
            Some(DeleteOptions::new().with_prefix()),
        );
        self.change_replica(name, |cur| {
            let rec = cur.ok_or_else(|| ReplicaError::Unknown(name.to_owned()))?;
            Ok((rec.removed(&all)?, vec![alive.clone(), streams.clone()]))
        })?;
        Ok(())
    }

    /// Serves as replica `name`: it must be active. Its record's revision
    /// conditions every write from now on, and a change of the record
    /// (removal) is reported by [`EtcdStore::removed`].
    pub fn bind(&self, name: &str) -> Result<(), StoreError> {
        let removed = |why: &str| {
            StoreError::Removed(format!(
                "{name}: {why}; this data dir can no longer serve (a removed replica joins again with a new `kmsctl replica add` token and an empty data dir)"
            ))
        };
        let (rec, revision) = self
            .replica(name)?
            .ok_or_else(|| removed("not a replica of the service under this prefix"))?;
        if rec.state != ReplicaState::Active {
            return Err(removed(&format!("its record is {}", rec.state.as_str())));
        }
        *lock(&self.bound) = Some(Bound {
            name: name.to_owned(),
            revision,
        });
        self.watch_own_record(name.to_owned(), revision);
        self.start_stream_registry(name)?;
        Ok(())
    }

    /// Streams this replica had open when it last stopped are gone; the
    /// ones it opens from now on are written, in order, as they come.
    fn start_stream_registry(&self, name: &str) -> Result<(), StoreError> {
        let prefix = self.key(&format!("conn/{name}/"));
        self.kv_delete(prefix.clone(), DeleteOptions::new().with_prefix())?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, bool)>();
        *lock(&self.streams) = Some(tx);
        let kv = self.client.kv_client();
        self.spawn(async move {
            while let Some((who, open)) = rx.recv().await {
                let mut key = prefix.clone();
                key.extend_from_slice(who.as_bytes());
                let done = retrying(true, || {
                    let (mut kv, key) = (kv.clone(), key.clone());
                    async move {
                        if open {
                            kv.put(key, Vec::new(), None).await.map(drop)
                        } else {
                            kv.delete(key, None).await.map(drop)
                        }
                    }
                })
                .await;
                if let Err(e) = done {
                    // Shown wrong in `kmsctl status` on other replicas
                    // until the node reconnects; nothing else reads it.
                    tracing::debug!(error = %e, stream = %who, "cannot record a node stream");
                }
            }
        });
        Ok(())
    }

    /// Records that a node's stream opened (or closed) on this replica.
    pub fn note_stream(&self, cluster: &str, node: &str, open: bool) {
        if let Some(tx) = lock(&self.streams).as_ref() {
            let _ = tx.send((format!("{cluster}/{node}"), open));
        }
    }

    /// `(cluster, node)` of every stream open on a live replica.
    pub fn open_streams(
        &self,
        alive: &[(String, Alive)],
    ) -> Result<std::collections::HashSet<(String, String)>, StoreError> {
        let alive: std::collections::HashSet<&str> =
            alive.iter().map(|(name, _)| name.as_str()).collect();
        let mut out = std::collections::HashSet::new();
        self.scan_prefix("conn/", 0, |kv| {
            let slot = String::from_utf8_lossy(self.slot_of(kv.key())).into_owned();
            let mut parts = slot.trim_start_matches("conn/").splitn(3, '/');
            if let (Some(replica), Some(cluster), Some(node)) =
                (parts.next(), parts.next(), parts.next())
            {
                if alive.contains(replica) {
                    out.insert((cluster.to_owned(), node.to_owned()));
                }
            }
            Ok(true)
        })?;
        Ok(out)
    }

    pub fn replica_name(&self) -> Option<String> {
        lock(&self.bound).as_ref().map(|b| b.name.clone())
    }

    /// Turns true once this replica's record changed (it was removed).
    pub fn removed(&self) -> watch::Receiver<bool> {
        self.removed.subscribe()
    }

    fn watch_own_record(&self, name: String, revision: i64) {
        let client = self.client.clone();
        let key = self.key(&replica_slot(&name));
        let removed = self.removed.clone();
        self.spawn(async move {
            loop {
                // Read first (a watch cannot start below a compaction):
                // any write of the record since it was bound is a removal,
                // as nothing else rewrites it.
                let mut kv = client.kv_client();
                let from = match kv.get(key.clone(), None).await {
                    Ok(resp) => {
                        let now = resp.kvs().first().map_or(0, |kv| kv.mod_revision());
                        if now != revision {
                            let _ = removed.send(true);
                            return;
                        }
                        resp.header().map_or(revision, |h| h.revision())
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reading this replica's record");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let mut c = client.clone();
                let opts = WatchOptions::new().with_start_revision(from + 1);
                if let Ok(mut stream) = c.watch(key.clone(), Some(opts)).await {
                    while let Ok(Some(resp)) = stream.message().await {
                        if resp.canceled() {
                            break;
                        }
                        if !resp.events().is_empty() {
                            let _ = removed.send(true);
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Follows every change of cluster records, from `from` on, into
    /// [`StateStore::watch`]. After a broken watch, every cluster is
    /// announced at its current revision (followers reload what they miss).
    fn follow_clusters(&self, from: i64) {
        let client = self.client.clone();
        let prefix = self.key("cluster/");
        let tx = self.changes.clone();
        self.spawn(async move {
            let mut next = from + 1;
            loop {
                let mut c = client.clone();
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(next)
                    .with_progress_notify();
                if let Ok(mut stream) = c.watch(prefix.clone(), Some(opts)).await {
                    loop {
                        match stream.message().await {
                            Ok(Some(resp)) => {
                                if resp.canceled() || resp.compact_revision() > 0 {
                                    break;
                                }
                                if let Some(h) = resp.header() {
                                    next = next.max(h.revision() + 1);
                                }
                                for ev in resp.events() {
                                    let Some(kv) = ev.kv() else { continue };
                                    let name = String::from_utf8_lossy(
                                        kv.key()
                                            .strip_prefix(prefix.as_slice())
                                            .unwrap_or(kv.key()),
                                    )
                                    .into_owned();
                                    let revision = match ev.event_type() {
                                        EventType::Put => kv.mod_revision(),
                                        EventType::Delete => kv.mod_revision().max(next - 1),
                                    };
                                    next = next.max(kv.mod_revision() + 1);
                                    // A value that does not decode is read
                                    // again (and refused) by the follower.
                                    let record = match ev.event_type() {
                                        EventType::Put => {
                                            serde_json::from_slice(kv.value()).ok().map(Arc::new)
                                        }
                                        EventType::Delete => None,
                                    };
                                    let _ = tx.send(Changed {
                                        cluster: name,
                                        revision: revision as Revision,
                                        record,
                                    });
                                }
                            }
                            Ok(None) => break,
                            Err(_) => break,
                        }
                    }
                }
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    // Whatever happened while the watch was down: every
                    // cluster at its current revision.
                    let mut kv = client.kv_client();
                    let opts = GetOptions::new().with_prefix().with_keys_only();
                    if let Ok(resp) = kv.get(prefix.clone(), Some(opts)).await {
                        for kv in resp.kvs() {
                            let name = String::from_utf8_lossy(
                                kv.key().strip_prefix(prefix.as_slice()).unwrap_or(kv.key()),
                            )
                            .into_owned();
                            let _ = tx.send(Changed {
                                cluster: name,
                                revision: kv.mod_revision() as Revision,
                                record: None,
                            });
                        }
                        if let Some(h) = resp.header() {
                            next = h.revision() + 1;
                        }
                    }
                }
            }
        });
    }

    /// Starts following cluster changes made by other replicas.
    pub fn start_following(&self) -> Result<(), StoreError> {
        let resp = self.kv_get(self.key("meta/format"), GetOptions::new())?;
        self.follow_clusters(resp.header().map_or(0, |h| h.revision()));
        Ok(())
    }

    /// The last readiness probe: `Err(reason)` when etcd could not answer
    /// a linearizable read (no quorum, unreachable).
    pub fn health(&self) -> Result<(), String> {
        lock(&self.health).clone()
    }

    pub(crate) fn health_cell(&self) -> Arc<Mutex<Result<(), String>>> {
        self.health.clone()
    }

    fn audit_last(&self) -> Result<u64, StoreError> {
        let start = self.key("audit/");
        let end = prefix_end(&start);
        let mut last = 0;
        self.scan(start, end, 0, true, |kv| {
            // A damaged key is passed over, as in RocksDB.
            if let Some(seq) = audit_seq(self.slot_of(kv.key())) {
                last = seq;
                return Ok(false);
            }
            Ok(true)
        })?;
        Ok(last)
    }

    fn identity_at(&self, root: &Key256, revision: i64) -> Result<Identity, StoreError> {
        let required = |slot: &str| -> Result<Vec<u8>, StoreError> {
            self.get_at(slot, revision)?
                .map(|kv| kv.value().to_vec())
                .ok_or_else(|| {
                    corrupt(
                        slot,
                        format!("missing (is etcd prefix {} initialized?)", self.prefix),
                    )
                })
        };
        let ca_cert = required("meta/ca-cert")?;
        let ca_key = Self::unwrap(root, "meta/ca-key", "", &required("meta/ca-key")?)?;
        let name = self
            .replica_name()
            .ok_or_else(|| StoreError::Backend("no replica bound to this store".into()))?;
        let slot = replica_slot(&name);
        let rec: ReplicaRecord =
            serde_json::from_slice(&required(&slot)?).map_err(|e| corrupt(&slot, e))?;
        let (Some(cert), Some(key)) = (rec.server_cert, rec.server_key) else {
            return Err(StoreError::Removed(name));
        };
        let cert = hex::decode(cert).map_err(|e| corrupt(&slot, e))?;
        let key = hex::decode(key).map_err(|e| corrupt(&slot, e))?;
        let key = Self::unwrap(root, &slot, "", &key)?;
        Ok(Identity {
            ca_cert,
            ca_key: PrivateKey::from_der(ca_key.to_vec()),
            server_cert: cert,
            server_key: PrivateKey::from_der(key.to_vec()),
        })
    }

    fn decode_cluster(&self, kv: &KeyValue) -> Result<(Cluster, Revision), StoreError> {
        let slot = String::from_utf8_lossy(self.slot_of(kv.key())).into_owned();
        let c: Cluster = serde_json::from_slice(kv.value()).map_err(|e| corrupt(&slot, e))?;
        Ok((c, kv.mod_revision() as Revision))
    }

    fn kek_at(
        &self,
        root: &Key256,
        cluster: &str,
        version: u32,
        key_id: &str,
        revision: i64,
    ) -> Result<Option<Key256>, StoreError> {
        let slot = kek_slot(cluster, version);
        let Some(kv) = self.get_at(&slot, revision)? else {
            return Ok(None);
        };
        let plain = Self::unwrap(root, &slot, key_id, kv.value())?;
        Key256::from_slice(&plain)
            .map(Some)
            .ok_or_else(|| corrupt(&slot, "not a 256-bit key"))
    }
}

/// [`StateStore::append_audit`]'s group commit.
#[derive(Default)]
struct AuditQueue {
    state: Mutex<AuditState>,
    written: std::sync::Condvar,
    /// `(last sequence number, the counter's mod revision)` as this
    /// process last wrote or read it.
    counter: Mutex<Option<(u64, i64)>>,
}

#[derive(Default)]
struct AuditState {
    next_ticket: u64,
    pending: Vec<(u64, Vec<u8>)>,
    flushing: bool,
    done: std::collections::HashMap<u64, Result<u64, String>>,
}

impl EtcdStore {
    /// Writes `records` numbered on from the counter `meta/audit-last`, in
    /// one transaction conditioned on the counter's revision (replicas
    /// append to one log); returns the first one's sequence number.
    fn commit_audit(&self, records: &[&[u8]]) -> Result<u64, StoreError> {
        let counter_key = self.key("meta/audit-last");
        let mut counter = lock(&self.audit.counter);
        for _ in 0..32 {
            let (last, rev) = match *counter {
                Some(c) => c,
                None => match self.get("meta/audit-last")? {
                    Some(kv) => (
                        std::str::from_utf8(kv.value())
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(|| corrupt("meta/audit-last", "not a number"))?,
                        kv.mod_revision(),
                    ),
                    // Before the first record (or after an import): the
                    // newest record's number.
                    None => (self.audit_last()?, 0),
                },
            };
            let top = last + records.len() as u64;
            let mut ops = vec![TxnOp::put(counter_key.clone(), top.to_string(), None)];
            for (i, json) in records.iter().enumerate() {
                ops.push(TxnOp::put(
                    self.key(&audit_slot(last + 1 + i as u64)),
                    json.to_vec(),
                    None,
                ));
            }
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    counter_key.clone(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then(ops);
            let resp = self.txn(txn)?;
            if resp.succeeded() {
                let rev = resp.header().map_or(0, |h| h.revision());
                *counter = Some((top, rev));
                return Ok(last + 1);
            }
            // Another replica appended: read the counter again.
            *counter = None;
        }
        Err(StoreError::Conflict {
            cluster: "audit log".into(),
        })
    }
}

fn audit_seq(slot: &[u8]) -> Option<u64> {
    std::str::from_utf8(slot.strip_prefix(b"audit/")?)
        .ok()?
        .parse()
        .ok()
}

/// Runs `fut` on `rt` and waits for it from any thread, async or not (a
/// channel, not `block_on`, which refuses to run inside a runtime).
fn wait<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    // The client's own timeout bounds every request; this is a backstop.
    rx.recv_timeout(REQUEST_TIMEOUT * 3)
        .map_err(|_| StoreError::Unavailable("etcd: no answer in time".into()))
}

/// Errors of replica membership changes.
#[derive(Debug, thiserror::Error)]
pub enum ServerReplicaError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl StateStore for EtcdStore {
    fn identity(&self, root: &Key256) -> Result<Identity, StoreError> {
        self.identity_at(root, 0)
    }

    fn clusters(&self) -> Result<Vec<(Cluster, Revision)>, StoreError> {
        let mut out = Vec::new();
        self.scan_prefix("cluster/", 0, |kv| {
            out.push(self.decode_cluster(kv)?);
            Ok(true)
        })?;
        Ok(out)
    }

    fn cluster(&self, name: &str) -> Result<Option<(Cluster, Revision)>, StoreError> {
        self.get(&format!("cluster/{name}"))?
            .map(|kv| self.decode_cluster(&kv))
            .transpose()
    }

    fn kek(
        &self,
        root: &Key256,
        cluster: &str,
        version: u32,
        key_id: &str,
    ) -> Result<Option<Key256>, StoreError> {
        self.kek_at(root, cluster, version, key_id, 0)
    }

    fn apply(&self, root: &Key256, batch: Batch) -> Result<Vec<Changed>, StoreError> {
        let bound = lock(&self.bound).clone();
        let mut when = Vec::new();
        let mut check = Vec::new();
        for (cluster, rev) in &batch.expect {
            let key = self.key(&format!("cluster/{cluster}"));
            when.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                *rev as i64,
            ));
            check.push(TxnOp::get(key, None));
        }
        if let Some(b) = &bound {
            let key = self.key(&replica_slot(&b.name));
            when.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                b.revision,
            ));
            check.push(TxnOp::get(key, None));
        }
        let mut ops = Vec::new();
        let mut written = Vec::new();
        for op in &batch.ops {
            match op {
                Op::PutCluster(c) => {
                    let slot = format!("cluster/{}", c.name());
                    let json = serde_json::to_vec(c).map_err(|e| corrupt(&slot, e))?;
                    ops.push(TxnOp::put(self.key(&slot), json, None));
                    written.push(c.name().to_owned());
                }
                Op::PutKek {
                    cluster,
                    version,
                    key_id,
                    key,
                } => {
                    let slot = kek_slot(cluster, *version);
                    let wrapped = Self::wrap(root, &slot, key_id, key.expose());
                    ops.push(TxnOp::put(self.key(&slot), wrapped, None));
                }
                Op::DeleteKek { cluster, version } => {
                    ops.push(TxnOp::delete(
                        self.key(&kek_slot(cluster, *version)),
                        None::<DeleteOptions>,
                    ));
                }
            }
        }
        let resp = self.txn(Txn::new().when(when).and_then(ops).or_else(check))?;
        if !resp.succeeded() {
            // Which condition failed: this replica's record first.
            let mut seen = Vec::new();
            for r in resp.op_responses() {
                if let TxnOpResponse::Get(g) = r {
                    seen.push(g.kvs().first().map_or(0, |kv| kv.mod_revision()));
                }
            }
            if let Some(b) = &bound {
                if seen.last().copied() != Some(b.revision) {
                    let _ = self.removed.send(true);
                    return Err(StoreError::Removed(b.name.clone()));
                }
            }
            let cluster = batch
                .expect
                .iter()
                .zip(&seen)
                .find(|((_, want), got)| *want as i64 != **got)
                .map_or_else(
                    || {
                        batch
                            .expect
                            .first()
                            .map(|(c, _)| c.clone())
                            .unwrap_or_default()
                    },
                    |((c, _), _)| c.clone(),
                );
            return Err(StoreError::Conflict { cluster });
        }
        let revision = resp.header().map_or(0, |h| h.revision()) as Revision;
        // Watchers hear of it from etcd's watch, record included, as they
        // hear of every other replica's changes.
        Ok(written
            .into_iter()
            .map(|cluster| Changed {
                cluster,
                revision,
                record: None,
            })
            .collect())
    }

    fn watch(&self) -> broadcast::Receiver<Changed> {
        self.changes.subscribe()
    }

    /// Group commit: records appended while a batch is being written go
    /// together in the next one (one transaction, not one each).
    fn append_audit(&self, json: &[u8]) -> Result<u64, StoreError> {
        let q = &self.audit;
        let mut state = lock(&q.state);
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.pending.push((ticket, json.to_vec()));
        if !state.flushing {
            state.flushing = true;
            while !state.pending.is_empty() {
                let take = state.pending.len().min(MAX_TXN_OPS - 1);
                let batch: Vec<(u64, Vec<u8>)> = state.pending.drain(..take).collect();
                drop(state);
                let records: Vec<&[u8]> = batch.iter().map(|(_, j)| j.as_slice()).collect();
                let result = self.commit_audit(&records);
                state = lock(&q.state);
                for (i, (t, _)) in batch.iter().enumerate() {
                    let outcome = match &result {
                        Ok(first) => Ok(first + i as u64),
                        Err(e) => Err(e.to_string()),
                    };
                    state.done.insert(*t, outcome);
                }
                q.written.notify_all();
            }
            state.flushing = false;
        }
        loop {
            if let Some(outcome) = state.done.remove(&ticket) {
                return outcome.map_err(StoreError::Backend);
            }
            state = q.written.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn audit_scan(&self, from: u64, visit: AuditVisitor<'_>) -> Result<(), StoreError> {
        let start = self.key(&audit_slot(from));
        let end = prefix_end(&self.key("audit/"));
        self.scan(start, end, 0, false, |kv| {
            Ok(match audit_seq(self.slot_of(kv.key())) {
                Some(seq) => visit(seq, kv.value()),
                None => true,
            })
        })?;
        Ok(())
    }

    fn audit_scan_back(&self, upto: u64, visit: AuditVisitor<'_>) -> Result<(), StoreError> {
        let start = self.key("audit/");
        let mut end = self.key(&audit_slot(upto.min(u64::MAX - 1)));
        end.push(0);
        self.scan(start, end, 0, true, |kv| {
            Ok(match audit_seq(self.slot_of(kv.key())) {
                Some(seq) => visit(seq, kv.value()),
                None => true,
            })
        })?;
        Ok(())
    }

    fn audit_bounds(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let mut first = None;
        self.scan_prefix("audit/", 0, |kv| {
            first = audit_seq(self.slot_of(kv.key()));
            Ok(first.is_none())
        })?;
        Ok(match first {
            Some(f) => Some((f, self.audit_last()?)),
            None => None,
        })
    }

    fn delete_audit_below(&self, below: u64) -> Result<(), StoreError> {
        let end = self.key(&audit_slot(below));
        self.kv_delete(self.key("audit/"), DeleteOptions::new().with_range(end))
    }

    fn snapshot(&self, root: &Key256, with_audit: bool) -> Result<Snapshot, StoreError> {
        // One revision for everything read: one consistent cut.
        let mut clusters = Vec::new();
        let at = self.scan_prefix("cluster/", 0, |kv| {
            clusters.push(self.decode_cluster(kv)?.0);
            Ok(true)
        })?;
        let identity = self.identity_at(root, at)?;
        let mut keks = Vec::new();
        for c in &clusters {
            for (&version, meta) in c.versions() {
                if let Some(key) = self.kek_at(root, c.name(), version, &meta.key_id, at)? {
                    keks.push(Kek {
                        cluster: c.name().to_owned(),
                        version,
                        key_id: meta.key_id.clone(),
                        key,
                    });
                }
            }
        }
        let mut audit = Vec::new();
        if with_audit {
            self.scan_prefix("audit/", at, |kv| {
                if audit_seq(self.slot_of(kv.key())).is_some() {
                    audit.push(kv.value().to_vec());
                }
                Ok(true)
            })?;
        }
        Ok(Snapshot {
            identity,
            clusters,
            keks,
            audit,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use edgekms_testkit::etcd::Etcd;

    fn config(endpoint: String, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![endpoint],
            prefix: prefix.into(),
            insecure: true,
            ..Default::default()
        }
    }

    fn identity(ca: edgekms_daemon::pki::Issued, server: edgekms_daemon::pki::Issued) -> Identity {
        Identity {
            ca_cert: ca.cert_der,
            ca_key: ca.key,
            server_cert: server.cert_der,
            server_key: server.key,
        }
    }

    /// A store under `prefix` initialized for replica "r1".
    fn initialized(etcd: &Etcd, prefix: &str) -> (EtcdStore, Key256) {
        let store = EtcdStore::connect(&config(etcd.endpoint.clone(), prefix)).unwrap();
        let root = Key256::generate();
        let ca = edgekms_daemon::pki::new_ca().unwrap();
        let loaded = edgekms_daemon::pki::Ca::load(&ca.cert_der, &ca.key).unwrap();
        let server = loaded.issue_server(&["localhost".into()]).unwrap();
        store
            .put_init(&root, &identity(ca, server), "r1", 1)
            .unwrap();
        store.bind("r1").unwrap();
        store.start_following().unwrap();
        (store, root)
    }

    #[test]
    fn settings_refuse_plaintext_and_half_configured_tls() {
        let mut cfg = config("http://127.0.0.1:2379".into(), "/edgekms/");
        assert!(cfg.problems().is_empty());
        cfg.insecure = false;
        assert!(cfg.problems()[0].contains("plaintext etcd is refused"));
        cfg.endpoints = vec!["https://e:2379".into()];
        cfg.cert = Some("c".into());
        let p = cfg.problems().join("; ");
        assert!(
            p.contains("--etcd-cacert is required") && p.contains("go together"),
            "{p}"
        );
        cfg.prefix = "edgekms".into();
        assert!(cfg.problems().join(";").contains("--etcd-prefix"));
        cfg.endpoints = vec!["127.0.0.1:2379".into()];
        assert!(cfg
            .problems()
            .join(";")
            .contains("must start with https://"));
    }

    #[test]
    fn the_etcd_store_meets_the_state_store_contract() {
        let Some(etcd) = Etcd::fresh_plain() else {
            return;
        };
        let (store, root) = initialized(&etcd, "/conformance/");
        crate::state_store::conformance::run(&store, &root);
    }

    /// Over TLS with client certificates, as in production; a client
    /// certificate etcd does not trust is refused.
    #[test]
    fn the_etcd_store_meets_the_contract_over_mutual_tls() {
        let Some(etcd) = Etcd::fresh_tls() else {
            return;
        };
        let tls = etcd.tls.clone().unwrap();
        let mut cfg = EtcdConfig {
            endpoints: vec![etcd.endpoint.clone()],
            cacert: Some(tls.ca.clone()),
            cert: Some(tls.cert.clone()),
            key: Some(tls.key.clone()),
            prefix: "/tls/".into(),
            insecure: false,
        };
        let store = EtcdStore::connect(&cfg).unwrap();
        assert!(store.is_empty().unwrap());
        cfg.cert = Some(tls.other_cert.clone());
        cfg.key = Some(tls.other_key.clone());
        let refused = EtcdStore::connect(&cfg).and_then(|s| s.is_empty());
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{:?}",
            refused.err()
        );
    }

    #[test]
    fn a_second_init_an_unbound_name_and_a_removed_replica_are_refused() {
        let Some(etcd) = Etcd::fresh_plain() else {
            return;
        };
        let (store, root) = initialized(&etcd, "/p/");
        let again = initialized_err(&etcd, "/p/");
        assert!(again.contains("already initialized"), "{again}");
        let other = EtcdStore::connect(&config(etcd.endpoint.clone(), "/p/")).unwrap();
        let e = other.bind("r9").unwrap_err().to_string();
        assert!(e.contains("not a replica"), "{e}");
        // Invite and admit r2, then remove r1: r1's writes are refused.
        let h = edgekms_core::rotation::cluster::token_hash("s");
        store.invite_replica("r2", &h, 1, u64::MAX).unwrap();
        let key = edgekms_daemon::pki::PrivateKey::from_der(vec![1; 40]);
        assert!(store
            .admit_replica(
                &root,
                "r2",
                &edgekms_core::rotation::cluster::token_hash("x"),
                2,
                b"c",
                &key
            )
            .is_err());
        store.admit_replica(&root, "r2", &h, 2, b"c", &key).unwrap();
        assert!(
            store.admit_replica(&root, "r2", &h, 2, b"c", &key).is_err(),
            "the token is spent"
        );
        other.bind("r2").unwrap();
        let mut removed = store.removed();
        other.remove_replica("r1").unwrap();
        let c = Cluster::new("a", "a/v1/x".into(), 1);
        let batch = Batch {
            expect: vec![("a".into(), 0)],
            ops: vec![Op::PutCluster(c)],
        };
        assert!(matches!(
            store.apply(&root, batch),
            Err(StoreError::Removed(_))
        ));
        assert!(*removed.borrow_and_update());
        let e = other.remove_replica("r2").unwrap_err().to_string();
        assert!(e.contains("last active replica"), "{e}");
    }

    fn initialized_err(etcd: &Etcd, prefix: &str) -> String {
        let store = EtcdStore::connect(&config(etcd.endpoint.clone(), prefix)).unwrap();
        let ca = edgekms_daemon::pki::new_ca().unwrap();
        let loaded = edgekms_daemon::pki::Ca::load(&ca.cert_der, &ca.key).unwrap();
        let server = loaded.issue_server(&["localhost".into()]).unwrap();
        store
            .put_init(&Key256::generate(), &identity(ca, server), "r1", 1)
            .unwrap_err()
            .to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_sees_what_another_changed() {
        let Some(etcd) = Etcd::fresh_plain() else {
            return;
        };
        let (one, root) = initialized(&etcd, "/w/");
        let two = EtcdStore::connect(&config(etcd.endpoint.clone(), "/w/")).unwrap();
        two.bind("r1").unwrap();
        two.start_following().unwrap();
        let mut changes = two.watch();
        let c = Cluster::new("a", "a/v1/x".into(), 1);
        let c2 = c.clone();
        let batch = Batch {
            expect: vec![("a".into(), 0)],
            ops: vec![Op::PutCluster(c)],
        };
        let rev = one.apply(&root, batch).unwrap()[0].revision;
        let seen = tokio::time::timeout(Duration::from_secs(5), changes.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((seen.cluster.as_str(), seen.revision), ("a", rev));
        assert_eq!(seen.record.as_deref(), Some(&c2));
    }
}
