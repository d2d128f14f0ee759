//! The node's key manager: what the KMS and admin services act on.
//!
//! At start it unseals the node sealing key (NSK) once, unwraps every cached
//! KEK version with it, and publishes the keyring as one immutable
//! [`Snapshot`]. Status, Encrypt and Decrypt each read one snapshot, so they
//! can never disagree on the primary key_id; rotate and retire build the next
//! keyring from the current one, persist it, and only then publish it.
//!
//! A node that joined the central key service ("fleet mode") never makes
//! keys itself: [`Node::apply_cluster_state`] takes the versions and states
//! the service sends, stores them durably, and only then publishes them.
//!
//! When the sealer refuses for a policy reason (a bound PCR changed), the
//! node still starts but serves no key material: Status reports the reason
//! as healthz, and Encrypt/Decrypt fail with UNAVAILABLE.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use edgekms_core::delivery::{self, Binding, DeliveryKey};
use edgekms_core::rotation::cluster::Report;
use edgekms_core::rotation::node::{converge, Received};
use edgekms_core::rotation::retire::{self, Writer};
use edgekms_core::{KeyVersion, Keyring, KeyringError};
use edgekms_daemon::config::now_unix;
use edgekms_hsm::{Key256, SealError, SealedBlob, Sealer, SealerInfo, SoftKeyFile};
use edgekms_proto::fleet::{Census, ClusterState, KeyRef, NodeReport, ReturnedKey};
use prost::Message;
use zeroize::Zeroizing;

use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::error::NodeError;
use crate::metrics::{self, SealerOp};
use crate::recovery;

/// What the KMS service reads, published whole.
#[derive(Debug)]
pub struct Snapshot {
    pub keyring: Keyring,
    /// Why no key material is served, when it is not.
    pub unavailable: Option<String>,
}

/// A node's view of itself, for `kmsctl local status`.
#[derive(Debug, Clone)]
pub struct LocalStatus {
    pub cluster: String,
    pub node: String,
    pub healthz: String,
    pub primary: Option<(u32, String)>,
    /// (version, state, key_id, created, destroy_after (0: none)).
    pub versions: Vec<(u32, &'static str, String, u64, u64)>,
    pub sealer: SealerInfo,
    /// What the sealer reads from this node's sealed key (TPM: noDA).
    pub sealed_key: SealerInfo,
    pub hardware_backed: bool,
    pub unsealed: bool,
    /// The central key service last said it is reconciling.
    pub central_reconciling: bool,
    /// What the apiserver writes under, and since when (empty: unknown).
    pub writes: (String, u64),
    /// The newest census this node keeps.
    pub census: Option<Census>,
}

pub struct Node {
    cluster: String,
    node: String,
    cache: Cache,
    sealer: Box<dyn Sealer>,
    nsk: Mutex<Option<Arc<Key256>>>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Serializes rotate/retire/apply so that each builds on the last.
    admin: Mutex<()>,
    /// Joined to the central key service: keys come only from there.
    fleet: bool,
    /// The last central cluster state applied.
    fleet_seq: AtomicU64,
    /// What the central service last said of itself: reconciling or not.
    central_reconciling: AtomicBool,
    /// The key_id the apiserver last had a DEK seed encrypted under, and
    /// since when (persisted, so a restart does not forget it).
    writes: Mutex<(String, u64)>,
    /// The newest census (persisted; read once at start).
    census: Mutex<Option<Census>>,
    /// Wakes the sync task to report at once (a new census, a switch).
    report_now: tokio::sync::Notify,
    /// The shortest grace period a standalone retire may ask for.
    min_grace_secs: u64,
}

/// Why a version the central service asked for is not returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReturned {
    #[error("the central service asks for version {version} ({wanted:?}), which this node does not hold")]
    NotHeld { version: u32, wanted: String },
    #[error("the central service asks for version {version} as {wanted:?}, but this node holds it as {held:?}: not returned")]
    OtherKey {
        version: u32,
        wanted: String,
        held: String,
    },
    #[error("the central service asks for version {version} ({wanted:?}), which this node destroyed (as {held:?}): not returned")]
    Destroyed {
        version: u32,
        wanted: String,
        held: String,
    },
}

/// Which of the `wanted` versions this node returns: only those whose key
/// it holds under exactly the key_id asked for, each once. The others are
/// listed with the reason (the service asking for a key it should not
/// get is worth a warning, never an answer).
pub fn choose_returns<'r>(
    keyring: &'r Keyring,
    wanted: &[KeyRef],
) -> (Vec<&'r KeyVersion>, Vec<NotReturned>) {
    let mut chosen: Vec<&KeyVersion> = Vec::new();
    let mut refused = Vec::new();
    for want in wanted {
        let wanted_id = || want.key_id.clone();
        match keyring.get(want.version) {
            None => refused.push(NotReturned::NotHeld {
                version: want.version,
                wanted: wanted_id(),
            }),
            Some(kv) if kv.key().is_none() => refused.push(NotReturned::Destroyed {
                version: want.version,
                wanted: wanted_id(),
                held: kv.key_id.clone(),
            }),
            Some(kv) if kv.key_id != want.key_id => refused.push(NotReturned::OtherKey {
                version: want.version,
                wanted: wanted_id(),
                held: kv.key_id.clone(),
            }),
            // Asked twice: wrapped once (bounds the work to what is held).
            Some(kv) if chosen.iter().any(|c| c.version == kv.version) => {}
            Some(kv) => chosen.push(kv),
        }
    }
    (chosen, refused)
}

/// Builds the sealer the config asks for (see [`edgekms_hsm::open`]).
/// Never falls back to another one. A missing soft-sealer key file is made
/// by the first seal; with a key sealed under it, unsealing names it.
pub fn sealer_from_config(cfg: &Config) -> Result<Box<dyn Sealer>, NodeError> {
    require_cluster(cfg)?;
    private_data_dir(&cfg.data_dir)?;
    Ok(edgekms_hsm::open(
        &cfg.sealer,
        &cfg.data_dir,
        SoftKeyFile::MayCreate,
    )?)
}

/// `--cluster` may be left out only once the data dir names one: checked
/// before anything is created in a new data dir (a soft sealer's key).
pub fn require_cluster(cfg: &Config) -> Result<(), NodeError> {
    if cfg.cluster.is_empty()
        && !cfg.data_dir.join(crate::cache::CACHE_DIR).exists()
        && !cfg.data_dir.join(crate::cache::COPIES_DIR).exists()
    {
        return Err(NodeError::InvalidArgument(format!(
            "--cluster is required (the cluster this node belongs to): the data dir {} names none yet",
            cfg.data_dir.display()
        )));
    }
    Ok(())
}

/// Creates the data dir with mode 0700, or checks an existing one: owned by
/// this user, not writable by others (refused), not readable by others
/// (tightened, and said so).
pub fn private_data_dir(dir: &std::path::Path) -> Result<(), NodeError> {
    edgekms_daemon::durable::private_data_dir(dir).map_err(CacheError::from)?;
    Ok(())
}

impl Node {
    /// Opens the cache in `cfg.data_dir` and unseals. On first start creates
    /// the NSK and, unless the node joined the central service, KEK version 1
    /// (primary).
    pub fn open(cfg: &Config, sealer: Box<dyn Sealer>) -> Result<Self, NodeError> {
        Self::open_as(cfg, sealer, false)
    }

    /// Opens for `join`: like [`Node::open`], but makes no KEK version, and
    /// refuses a cache that already has standalone keys.
    pub fn open_for_join(cfg: &Config, sealer: Box<dyn Sealer>) -> Result<Self, NodeError> {
        Self::open_as(cfg, sealer, true)
    }

    fn open_as(cfg: &Config, sealer: Box<dyn Sealer>, joining: bool) -> Result<Self, NodeError> {
        private_data_dir(&cfg.data_dir)?;
        let configured = (!cfg.cluster.is_empty()).then_some(cfg.cluster.as_str());
        let store = Cache::open_with(&cfg.data_dir, configured)?;
        let fleet = store.fleet()?;
        if joining && fleet.is_some() {
            return Err(NodeError::InvalidArgument(format!(
                "{} already joined the central key service; the plugin syncs by itself (start it with this --data-dir)",
                cfg.data_dir.display()
            )));
        }
        if joining && store.has_versions()? {
            return Err(NodeError::InvalidArgument(format!(
                "{} holds standalone keys; joining would mix two key sources. Use an empty --data-dir",
                cfg.data_dir.display()
            )));
        }
        // After join the node's name is the data dir's: the certificate and
        // every delivered key are bound to it.
        let name = match &fleet {
            Some(rec) if cfg.node_given && rec.node != cfg.node => {
                return Err(NodeError::InvalidArgument(format!(
                    "the data dir {} joined as node {:?}, not {:?}: start without --node (or with --node {}), or use the data dir of node {:?}",
                    cfg.data_dir.display(),
                    rec.node,
                    cfg.node,
                    rec.node,
                    cfg.node
                )))
            }
            Some(rec) => rec.node.clone(),
            None => cfg.node.clone(),
        };
        let fleet_seq = store.fleet_seq()?;
        // Only a hint for retire checks: a damaged record is forgotten.
        let writes = store.writes().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "forgetting what the apiserver writes under");
            None
        });
        // Only evidence for retire checks: a damaged record is as good as
        // none (a retire then waits for a new census).
        let census = match store.census() {
            Ok(raw) => raw.and_then(|raw| Census::decode(raw.as_slice()).ok()),
            Err(e) => {
                tracing::warn!(error = %e, "forgetting the kept census");
                None
            }
        };
        let cluster = store.cluster().to_owned();
        let node = Self {
            snapshot: RwLock::new(Arc::new(Snapshot {
                keyring: Keyring::new(&cluster)?,
                unavailable: Some("starting".into()),
            })),
            cluster,
            node: name,
            cache: store,
            sealer,
            nsk: Mutex::new(None),
            admin: Mutex::new(()),
            fleet: joining || fleet.is_some(),
            fleet_seq: AtomicU64::new(fleet_seq),
            central_reconciling: AtomicBool::new(false),
            writes: Mutex::new(writes.unwrap_or_default()),
            census: Mutex::new(census),
            report_now: tokio::sync::Notify::new(),
            min_grace_secs: cfg.min_grace_secs,
        };
        let nsk = match node.cache.sealed_nsk()? {
            Some(blob) => {
                edgekms_hsm::check_backend(node.sealer.as_ref(), &blob)?;
                match node.unseal(&blob) {
                    Ok(nsk) => nsk,
                    Err(SealError::PolicyCheckFailed { reason }) => {
                        let reason = format!("TPM policy check failed: {reason}");
                        tracing::error!(%reason, "not serving key material until an operator runs `kmsctl local reseal`");
                        node.publish(Keyring::new(&node.cluster)?, Some(reason));
                        return Ok(node);
                    }
                    // Recoverable by the operator with the passphrase
                    // (`kmsctl local reseal`), which needs a running plugin.
                    Err(e @ SealError::SoftKeyFile { .. }) => {
                        let reason = e.to_string();
                        tracing::error!(%reason, "not serving key material until the key file is restored or an operator runs `kmsctl local reseal`");
                        node.publish(Keyring::new(&node.cluster)?, Some(reason));
                        return Ok(node);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            None if edgekms_daemon::durable::has_marker(&cfg.data_dir) || node.cache.holds_keys()? => {
                return Err(CacheError::Damaged(format!(
                    "the data dir {} has held keys but its sealed node key is in neither the key cache (meta/nsk) nor {}: \
                     restore that file from a backup of the data dir, or run `edgekms-plugin restore` from a `kmsctl local backup` file, \
                     or (joined node) join again with an empty --data-dir. If the very first start of this data dir was interrupted, \
                     empty it and start again. No key was made",
                    cfg.data_dir.display(),
                    node.cache.copy_path("nsk").display()
                ))
                .into())
            }
            None => node.create(cfg, joining)?,
        };
        node.load(nsk)?;
        Ok(node)
    }

    /// First start in a provably empty data dir: marks it, then makes and
    /// stores the NSK (with its recovery wrapper) and, for a standalone
    /// node, KEK version 1 as primary, all in one write.
    fn create(&self, cfg: &Config, joining: bool) -> Result<Key256, NodeError> {
        // Where the passphrase goes is settled (an existing
        // --recovery-passphrase-file refused) before any key exists, and it
        // is written before the key is stored.
        let passfile = cfg.recovery_passphrase_file.as_deref();
        let out = recovery::PassphraseOut::prepare(passfile)?;
        let nsk = Key256::generate();
        let passphrase = recovery::generate_passphrase();
        let wrapped = recovery::wrap(&nsk, &passphrase, &self.cluster);
        let blob = self.seal(&nsk)?;
        let mut ring = Keyring::new(&self.cluster)?;
        if !joining {
            let v = ring.add_pending(Key256::generate(), now_unix())?;
            ring.promote(v)?;
        }
        let stored = out
            .write(&passphrase)
            .map_err(NodeError::from)
            .and_then(|()| {
                edgekms_daemon::durable::write_marker(&cfg.data_dir).map_err(CacheError::from)?;
                Ok(self.cache.put_new_nsk(&blob, &wrapped, &nsk, &ring)?)
            });
        if let Err(e) = stored {
            recovery::PassphraseOut::abandon(passfile);
            return Err(e);
        }
        tracing::info!(
            sealer = self.sealer.name(),
            "created and sealed a new node sealing key"
        );
        if let Some(p) = ring.primary() {
            tracing::info!(version = p.version, "created KEK version as primary");
        }
        Ok(nsk)
    }

    /// Loads every cached version with `nsk`, then self-tests and
    /// publishes. A standalone node without a primary refuses: its keys
    /// are lost, and a new one would not open anything written before.
    fn load(&self, nsk: Key256) -> Result<(), NodeError> {
        let ring = self.cache.load_keyring(&nsk)?;
        if ring.primary().is_none() && self.fleet {
            *self.nsk.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(nsk));
            self.publish(
                ring,
                Some("no KEK delivered yet: waiting for the central key service".into()),
            );
            return Ok(());
        }
        if ring.primary().is_none() {
            let held: Vec<u32> = ring.versions().map(|kv| kv.version).collect();
            return Err(CacheError::Damaged(format!(
                "the data dir {} holds the node key but no primary KEK version (versions present: {held:?}) \
                 in the key cache or {}: restore the data dir from a backup, or run `edgekms-plugin restore` \
                 from a `kmsctl local backup` file. No key was made",
                self.cache.data_dir().display(),
                self.cache.data_dir().join(crate::cache::COPIES_DIR).display()
            ))
            .into());
        }
        ring.self_test()?;
        tracing::info!(
            versions = ring.versions().count(),
            primary = ring.primary().map(|p| p.key_id.as_str()).unwrap_or(""),
            "keys loaded"
        );
        *self.nsk.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(nsk));
        self.publish(ring, None);
        Ok(())
    }

    /// Seals with the configured sealer, timed for the metrics.
    fn seal(&self, nsk: &Key256) -> Result<SealedBlob, SealError> {
        let start = Instant::now();
        let sealed = self.sealer.seal(nsk);
        metrics::observe_sealer(SealerOp::Seal, self.sealer.name(), start.elapsed());
        sealed
    }

    /// Unseals with the configured sealer, timed for the metrics.
    fn unseal(&self, blob: &SealedBlob) -> Result<Key256, SealError> {
        let start = Instant::now();
        let nsk = self.sealer.unseal(blob);
        metrics::observe_sealer(SealerOp::Unseal, self.sealer.name(), start.elapsed());
        nsk
    }

    fn publish(&self, keyring: Keyring, unavailable: Option<String>) {
        metrics::set_keys(
            keyring.primary().map_or(0, |p| p.version),
            keyring.versions().filter(|kv| kv.key().is_some()).count(),
        );
        let snap = Arc::new(Snapshot {
            keyring,
            unavailable,
        });
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = snap;
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// KMS Status: `(healthz, key_id)`. healthz is "ok" only when the
    /// primary is loaded and a round trip under it succeeds right now.
    pub fn status(&self) -> (String, String) {
        let snap = self.snapshot();
        if let Some(reason) = &snap.unavailable {
            return (reason.clone(), String::new());
        }
        let key_id = snap
            .keyring
            .primary()
            .map(|p| p.key_id.clone())
            .unwrap_or_default();
        match snap.keyring.self_test() {
            Ok(()) => ("ok".into(), key_id),
            Err(e) => (e.to_string(), key_id),
        }
    }

    fn serving(&self) -> Result<Arc<Snapshot>, NodeError> {
        let snap = self.snapshot();
        match &snap.unavailable {
            Some(reason) => Err(NodeError::Unavailable(reason.clone())),
            None => Ok(snap),
        }
    }

    /// Encrypts under the primary; returns `(ciphertext, key_id, version)`.
    /// Each call is kube-apiserver wrapping a new DEK seed, so the key_id
    /// is what it writes under from now on ([`Node::note_writes`]).
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<(Vec<u8>, String, u32), NodeError> {
        let snap = self.serving()?;
        let (ct, kv) = snap.keyring.encrypt(plaintext)?;
        self.note_writes(&kv.key_id);
        Ok((ct, kv.key_id.clone(), kv.version))
    }

    /// Remembers (durably) that the apiserver writes under `key_id` from
    /// now on; the retire rule and `kmsctl migrate` read it. Only a change
    /// costs a write, and a failed write costs only the hint.
    fn note_writes(&self, key_id: &str) {
        let mut writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        if writes.0 == key_id {
            return;
        }
        let since = now_unix();
        if let Err(e) = self.cache.put_writes(key_id, since) {
            tracing::warn!(error = %e, "cannot record what the apiserver writes under");
        }
        *writes = (key_id.to_owned(), since);
        drop(writes);
        tracing::info!(key_id, "kube-apiserver now writes under this key_id");
        self.report_now.notify_one();
    }

    /// What the apiserver writes under, and since when.
    pub fn writes(&self) -> (String, u64) {
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Resolves when something worth reporting at once changed.
    pub async fn report_wanted(&self) {
        self.report_now.notified().await
    }

    /// The newest census this node keeps.
    pub fn census(&self) -> Option<Census> {
        self.census
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keeps `census` if it is newer than the one kept (what `kmsctl local
    /// census` and `census_every` give); a joined node reports it.
    pub fn record_census(&self, census: Census) -> Result<(), NodeError> {
        edgekms_proto::convert::census_counts(&census)
            .map_err(|e| NodeError::InvalidArgument(e.to_string()))?;
        let _guard = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .census()
            .is_some_and(|kept| kept.taken_unix > census.taken_unix)
        {
            return Err(NodeError::InvalidArgument(
                "a newer census is already kept".into(),
            ));
        }
        self.cache.put_census(&census.encode_to_vec())?;
        *self.census.lock().unwrap_or_else(|e| e.into_inner()) = Some(census.clone());
        tracing::info!(target: "audit", op = "census", taken_unix = census.taken_unix, revision = census.revision, scanned = census.scanned, result = "ok");
        self.report_now.notify_one();
        Ok(())
    }

    /// This node's report on the wire, with `returned` keys.
    pub fn wire_report(&self, report: &Report, returned: Vec<ReturnedKey>) -> NodeReport {
        edgekms_proto::convert::node_report(report, returned, self.census())
    }

    /// Decrypts under the version the envelope names.
    pub fn decrypt(
        &self,
        ciphertext: &[u8],
        key_id: &str,
    ) -> Result<(Zeroizing<Vec<u8>>, u32), NodeError> {
        let snap = self.serving()?;
        let (plain, kv) = snap.keyring.decrypt(ciphertext, key_id)?;
        Ok((plain, kv.version))
    }

    fn current_nsk(&self) -> Result<Arc<Key256>, NodeError> {
        self.nsk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| NodeError::Unavailable("the node sealing key is not unsealed".into()))
    }

    fn refuse_if_fleet(&self, what: &str) -> Result<(), NodeError> {
        if self.fleet {
            return Err(NodeError::InvalidArgument(format!(
                "this node's keys are managed by the central key service: use `kmsctl {what} {}` there, not `kmsctl local`",
                self.cluster
            )));
        }
        Ok(())
    }

    /// Standalone rotation: a new version becomes primary at once.
    pub fn rotate(&self) -> Result<KeyVersion, NodeError> {
        self.refuse_if_fleet("rotate")?;
        let _guard = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let nsk = self.current_nsk()?;
        let mut next = self.serving()?.keyring.clone();
        let old = next.primary().map(|p| p.version);
        let v = next.add_pending(Key256::generate(), now_unix())?;
        next.promote(v)?;
        next.self_test()?;
        let changed: Vec<u32> = std::iter::once(v).chain(old).collect();
        self.cache.save_versions(&nsk, &next, &changed)?;
        let kv = next
            .get(v)
            .cloned()
            .ok_or(edgekms_core::KeyringError::NoPrimary)?;
        self.publish(next, None);
        tracing::info!(target: "audit", op = "rotate", version = v, key_id = %kv.key_id, result = "ok");
        Ok(kv)
    }

    /// Standalone retire: disables `version` for `grace_secs` (0: the
    /// default), after which [`Node::destroy_due`] destroys it. Refused
    /// while the newest census does not show it unused, unless
    /// `skip_census` ([`retire::check_unused`]). Returns when it will be
    /// destroyed.
    pub fn retire(
        &self,
        version: u32,
        grace_secs: u64,
        skip_census: bool,
    ) -> Result<u64, NodeError> {
        self.refuse_if_fleet("retire")?;
        let _guard = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let nsk = self.current_nsk()?;
        let mut next = self.serving()?.keyring.clone();
        let refused = |e: NodeError| {
            tracing::info!(target: "audit", op = "retire", version, result = %e);
            e
        };
        let grace = retire::grace(grace_secs, self.min_grace_secs)
            .map_err(|e| refused(NodeError::InvalidArgument(e.to_string())))?;
        let kv = next.get(version).cloned().ok_or_else(|| {
            refused(
                KeyringError::UnknownVersion {
                    version,
                    key_id: String::new(),
                }
                .into(),
            )
        })?;
        if skip_census {
            tracing::warn!(target: "audit", op = "retire", version, census = "skipped", "retiring without a census showing the version unused (--skip-census)");
        } else if kv.state() == edgekms_core::VersionState::DecryptOnly {
            let census = self
                .census()
                .and_then(|c| edgekms_proto::convert::census_counts(&c).ok());
            let (key_id, since) = self.writes();
            let writer = Writer {
                node: self.node.clone(),
                key_id,
                since_unix: since,
            };
            let superseded = next.superseded_unix(version).unwrap_or_default();
            retire::check_unused(version, &kv.key_id, superseded, census.as_ref(), &[writer])
                .map_err(|e| refused(NodeError::FailedPrecondition(e.to_string())))?;
        }
        let destroy_after = now_unix().saturating_add(grace);
        next.disable(version, destroy_after)
            .map_err(|e| refused(e.into()))?;
        self.cache.save_versions(&nsk, &next, &[version])?;
        self.publish(next, None);
        tracing::info!(target: "audit", op = "retire", version, destroy_after_unix = destroy_after, census_skipped = skip_census, result = "disabled");
        Ok(destroy_after)
    }

    /// Standalone: brings disabled `version` back to decrypt-only.
    pub fn restore_version(&self, version: u32) -> Result<(), NodeError> {
        self.refuse_if_fleet("restore-version")?;
        let _guard = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let nsk = self.current_nsk()?;
        let mut next = self.serving()?.keyring.clone();
        if let Err(e) = next.restore(version) {
            tracing::info!(target: "audit", op = "restore-version", version, result = %e);
            return Err(e.into());
        }
        self.cache.save_versions(&nsk, &next, &[version])?;
        self.publish(next, None);
        tracing::info!(target: "audit", op = "restore-version", version, result = "ok");
        Ok(())
    }

    /// Standalone: destroys every disabled version whose grace period is
    /// over at `now`. Returns the versions destroyed.
    pub fn destroy_due(&self, now: u64) -> Result<Vec<u32>, NodeError> {
        if self.fleet {
            return Ok(Vec::new());
        }
        let _guard = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(snap) = self.serving() else {
            return Ok(Vec::new());
        };
        let due = snap.keyring.due_for_destruction(now);
        if due.is_empty() {
            return Ok(due);
        }
        let nsk = self.current_nsk()?;
        let mut next = snap.keyring.clone();
        for &v in &due {
            next.retire(v)?;
        }
        self.cache.save_versions(&nsk, &next, &due)?;
        self.publish(next, None);
        for &version in &due {
            tracing::info!(target: "audit", op = "destroy", version, reason = "grace period over", result = "ok");
        }
        Ok(due)
    }

    /// Recovery after a policy failure: opens the NSK with the recovery
    /// passphrase, seals it again to the sealer's present state (PCR values),
    /// and serves. Also works on a serving node (to re-bind after a planned
    /// firmware update).
    pub fn reseal(&self, passphrase: &str) -> Result<(), NodeError> {
        let _guard = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let blob = self.cache.recovery_blob()?.ok_or_else(|| {
            NodeError::Recovery(
                "this node has no recovery wrapper (created before recovery existed?)".into(),
            )
        })?;
        let Some(nsk) = recovery::unwrap(&blob, passphrase, &self.cluster) else {
            tracing::warn!(target: "audit", op = "reseal", result = "wrong recovery passphrase");
            return Err(NodeError::Recovery(
                "the recovery passphrase is wrong".into(),
            ));
        };
        self.cache.put_sealed_nsk(&self.seal(&nsk)?)?;
        self.load(nsk)?;
        tracing::info!(target: "audit", op = "reseal", sealer = self.sealer.name(), result = "ok");
        Ok(())
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn name(&self) -> &str {
        &self.node
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The NSK, for wrapping the node's fleet keys.
    pub fn sealing_key(&self) -> Result<Arc<Key256>, NodeError> {
        self.current_nsk()
    }

    /// What this node holds, for its report to the central service, with
    /// and what its apiserver writes under. The census travels on the wire
    /// whole ([`Node::wire_report`]), not in this.
    pub fn holding(&self) -> Report {
        let (writes_key_id, writes_since_unix) = self.writes();
        Report {
            writes_key_id,
            writes_since_unix,
            ..Report::of(
                &self.snapshot().keyring,
                self.fleet_seq.load(Ordering::SeqCst),
            )
        }
    }

    /// Remembers what the central service last said of itself.
    pub fn note_central_reconciling(&self, reconciling: bool) {
        if self.central_reconciling.swap(reconciling, Ordering::SeqCst) != reconciling {
            tracing::info!(
                reconciling,
                "the central key service {} (this node keeps serving its own keys)",
                if reconciling {
                    "is reconciling"
                } else {
                    "ended its reconciliation"
                }
            );
        }
        metrics::set_central_reconciling(reconciling);
    }

    /// The keys a reconciling central service asked for (`wanted`) that
    /// this node holds under exactly those key_ids, each wrapped to the
    /// service's delivery key `service_key`. Keys are never sent any other
    /// way; what is not returned is logged.
    pub fn return_wanted(&self, wanted: &[KeyRef], service_key: &[u8]) -> Vec<ReturnedKey> {
        let snap = self.snapshot();
        let (chosen, refused) = choose_returns(&snap.keyring, wanted);
        // The ask is the service's: a few lines name the versions, a count
        // stands for the rest.
        const NAMED: usize = 8;
        for why in refused.iter().take(NAMED) {
            tracing::warn!(reason = %why, "a key the central service asked for is not returned");
        }
        if refused.len() > NAMED {
            tracing::warn!(
                more = refused.len() - NAMED,
                "more keys the central service asked for are not returned"
            );
        }
        let mut returned = Vec::new();
        for kv in chosen {
            let Some(key) = kv.key() else { continue };
            let binding = Binding {
                cluster: &self.cluster,
                node: &self.node,
                version: kv.version,
                key_id: &kv.key_id,
            };
            match delivery::return_key(service_key, binding, key) {
                Ok(wrapped) => {
                    tracing::info!(target: "audit", op = "return-key", version = kv.version, key_id = %kv.key_id, result = "ok");
                    returned.push(ReturnedKey {
                        version: kv.version,
                        key_id: kv.key_id.clone(),
                        wrapped_key: wrapped.into(),
                    });
                }
                // One bad key makes every wrap fail: say it once.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot return keys to the central service");
                    return Vec::new();
                }
            }
        }
        returned
    }

    /// Converges on the central service's state for this cluster (the
    /// rules are [`edgekms_core::rotation::node`]'s), unwrapping delivered
    /// keys with `delivery`; publishes only once all of it is durable.
    pub fn apply_cluster_state(
        &self,
        state: &ClusterState,
        delivery: &DeliveryKey,
    ) -> Result<Report, NodeError> {
        let _guard = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let nsk = self.current_nsk()?;
        let current = self.snapshot().keyring.clone();
        let received = edgekms_proto::convert::received(state)
            .map_err(|e| NodeError::InvalidArgument(e.to_string()))
            .inspect_err(|_| metrics::record_refused_state(metrics::RefusalReason::Other))?;
        let unwrap = |r: &Received<'_>| {
            let binding = Binding {
                cluster: &self.cluster,
                node: &self.node,
                version: r.version,
                key_id: r.key_id,
            };
            delivery
                .unwrap(binding, r.wrapped_key)
                .map_err(|e| e.to_string())
        };
        let retired = edgekms_proto::convert::retire_orders(state);
        let step =
            converge(&current, &received, &retired, now_unix(), unwrap).inspect_err(|e| {
                metrics::record_refused_state(metrics::RefusalReason::of(e));
            })?;
        let next = step.keyring;
        let all: Vec<u32> = next.versions().map(|kv| kv.version).collect();
        edgekms_daemon::failpoint::hit("plugin-before-store");
        self.cache.save_versions_at(&nsk, &next, &all, state.seq)?;
        edgekms_daemon::failpoint::hit("plugin-after-store");
        let unavailable = match next.primary() {
            Some(_) => None,
            None => {
                Some("no primary KEK delivered yet: waiting for the central key service".into())
            }
        };
        self.publish(next, unavailable);
        self.fleet_seq.store(state.seq, Ordering::SeqCst);
        if let Some((_, new_primary)) = step.promoted {
            tracing::info!(target: "audit", op = "promote", version = new_primary.unwrap_or(0), source = "central", result = "ok");
        }
        for v in step.destroyed {
            tracing::info!(target: "audit", op = "retire", version = v, source = "central", result = "ok");
        }
        Ok(self.holding())
    }

    /// Everything `kmsctl local status` shows.
    pub fn local_status(&self) -> LocalStatus {
        let snap = self.snapshot();
        let (healthz, _) = self.status();
        LocalStatus {
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            healthz,
            primary: snap
                .keyring
                .primary()
                .map(|p| (p.version, p.key_id.clone())),
            versions: snap
                .keyring
                .versions()
                .map(|kv| {
                    (
                        kv.version,
                        kv.state().as_str(),
                        kv.key_id.clone(),
                        kv.created_unix,
                        kv.destroy_after_unix().unwrap_or_default(),
                    )
                })
                .collect(),
            sealer: self.sealer.info(),
            sealed_key: match self.cache.sealed_nsk() {
                Ok(Some(blob)) => self.sealer.describe_sealed(&blob),
                _ => SealerInfo::new(),
            },
            hardware_backed: self.sealer.is_hardware_backed(),
            unsealed: snap.unavailable.is_none(),
            central_reconciling: self.central_reconciling.load(Ordering::SeqCst),
            writes: self.writes(),
            census: self.census(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::config::Settings;
    use edgekms_core::delivery;
    use edgekms_core::rotation::cluster::Held;
    use edgekms_core::VersionState;
    use edgekms_hsm::SealerKind;
    use edgekms_proto::fleet::{VersionEntry, VersionState as Wire};

    /// A joined (fleet) node of cluster "c" in `dir`, with no key yet.
    fn joined(dir: &std::path::Path) -> Node {
        let cfg = Settings {
            data_dir: Some(dir.join("data")),
            cluster: Some("c".into()),
            node: Some("n1".into()),
            sealer: Some(SealerKind::Soft),
            socket: Some(dir.join("kms.sock")),
            recovery_passphrase_file: Some(dir.join("passphrase")),
            ..Settings::default()
        }
        .validate()
        .unwrap();
        let sealer = sealer_from_config(&cfg).unwrap();
        Node::open_for_join(&cfg, sealer).unwrap()
    }

    #[test]
    fn the_newest_census_is_kept_across_a_restart_and_an_older_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let census = Census {
            taken_unix: 10,
            under: vec![edgekms_proto::convert::census_count(
                "c/v1/00", "secrets", 3,
            )],
            ..Census::default()
        };
        joined(dir.path()).record_census(census.clone()).unwrap();
        let node = joined(dir.path());
        assert_eq!(node.census(), Some(census.clone()));
        let older = Census {
            taken_unix: 9,
            ..Census::default()
        };
        assert!(node.record_census(older).is_err());
        assert_eq!(node.census(), Some(census));
    }

    /// Version `v` of "c" as the service sends it to `node`, key wrapped.
    fn entry(dk: &DeliveryKey, v: u32, state: Wire, key: &Key256) -> VersionEntry {
        let key_id = edgekms_core::keyid::derive("c", v, key);
        let binding = Binding {
            cluster: "c",
            node: "n1",
            version: v,
            key_id: &key_id,
        };
        VersionEntry {
            version: v,
            state: state as i32,
            wrapped_key: delivery::wrap(&dk.public_key(), binding, key)
                .unwrap()
                .into(),
            key_id,
            destroy_after_unix: 0,
        }
    }

    /// `(version, key_id)` of `key` as version `v` of "c".
    fn key_ref(v: u32, key: &Key256) -> KeyRef {
        KeyRef {
            version: v,
            key_id: edgekms_core::keyid::derive("c", v, key),
        }
    }

    /// The count of refused states with `reason`, from the global metrics.
    fn refused(reason: metrics::RefusalReason) -> f64 {
        let series = format!(
            "edgekms_sync_refused_states_total{{reason=\"{}\"}} ",
            reason.as_str()
        );
        metrics::render(true)
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0.0, |v| v.parse().unwrap())
    }

    /// A joined node holding v1 (decrypt-only) and v2 (primary), with v3
    /// (pending, then abandoned) destroyed: `(node, delivery key, keys)`.
    fn settled(dir: &std::path::Path) -> (Node, DeliveryKey, [Key256; 3]) {
        let node = joined(dir);
        let dk = DeliveryKey::generate();
        let keys = [Key256::generate(), Key256::generate(), Key256::generate()];
        let [k1, k2, k3] = &keys;
        let steps = [
            ClusterState {
                seq: 1,
                versions: vec![entry(&dk, 1, Wire::Primary, k1)],
                ..Default::default()
            },
            ClusterState {
                seq: 2,
                versions: vec![
                    entry(&dk, 1, Wire::DecryptOnly, k1),
                    entry(&dk, 2, Wire::Primary, k2),
                    entry(&dk, 3, Wire::Pending, k3),
                ],
                ..Default::default()
            },
            ClusterState {
                seq: 3,
                versions: vec![
                    entry(&dk, 1, Wire::DecryptOnly, k1),
                    entry(&dk, 2, Wire::Primary, k2),
                ],
                retired: vec![3],
                retired_keys: vec![key_ref(3, k3)],
                ..Default::default()
            },
        ];
        for state in &steps {
            node.apply_cluster_state(state, &dk).unwrap();
        }
        (node, dk, keys)
    }

    #[test]
    fn a_delivered_state_is_stored_then_published_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let node = joined(dir.path());
        let dk = DeliveryKey::generate();
        assert!(node.snapshot().unavailable.is_some());
        let k1 = Key256::generate();
        let state = ClusterState {
            seq: 7,
            versions: vec![entry(&dk, 1, Wire::Primary, &k1)],
            ..Default::default()
        };
        let holding = node.apply_cluster_state(&state, &dk).unwrap();
        let held = Held {
            key_id: key_ref(1, &k1).key_id,
            state: VersionState::Primary,
        };
        assert_eq!(
            holding,
            Report {
                held: [(1, held)].into(),
                destroyed: Default::default(),
                applied_seq: 7,
                primary: 1,
                ..Report::default()
            }
        );
        assert_eq!(node.status().0, "ok");
        // Durable before published: a fresh open of the cache has it.
        let nsk = node.sealing_key().unwrap();
        let ring = node.cache().load_keyring(&nsk).unwrap();
        assert_eq!(ring.primary().map(|p| p.version), Some(1));
    }

    #[test]
    fn holding_names_each_version_by_key_id_and_state_and_the_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _, [k1, k2, k3]) = settled(dir.path());
        let holding = node.holding();
        let held = |version, key: &Key256, state| {
            let key_id = key_ref(version, key).key_id;
            (version, Held { key_id, state })
        };
        assert_eq!(
            holding,
            Report {
                held: [
                    held(1, &k1, VersionState::DecryptOnly),
                    held(2, &k2, VersionState::Primary)
                ]
                .into(),
                destroyed: [(3, key_ref(3, &k3).key_id)].into(),
                applied_seq: 3,
                primary: 2,
                ..Report::default()
            }
        );
        assert_eq!(holding.numbers(), [1, 2]);
    }

    #[test]
    fn a_refused_state_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (node, dk, [k1, k2, k3]) = settled(dir.path());
        let before = node.holding();
        let nsk = node.sealing_key().unwrap();
        let on_disk = |node: &Node| {
            let ring = node.cache().load_keyring(&nsk).unwrap();
            Report::of(&ring, node.cache().fleet_seq().unwrap())
        };
        let stored = on_disk(&node);
        let mut unspecified = entry(&dk, 4, Wire::Primary, &Key256::generate());
        unspecified.state = Wire::Unspecified as i32;
        let mut other_id = entry(&dk, 2, Wire::Primary, &k2);
        other_id.key_id = "c/v2/0000000000000000".into();
        other_id.wrapped_key = Default::default();
        let v1 = || entry(&dk, 1, Wire::DecryptOnly, &k1);
        let v2 = || entry(&dk, 2, Wire::Primary, &k2);
        use metrics::RefusalReason::*;
        let cases = [
            (
                "unspecified state",
                vec![v1(), v2(), unspecified],
                None,
                Other,
            ),
            ("key_id mismatch", vec![v1(), other_id], None, KeyIdClash),
            (
                "a held version delivered under another key",
                vec![v1(), entry(&dk, 2, Wire::Primary, &Key256::generate())],
                None,
                KeyIdClash,
            ),
            (
                "a destroyed version sent again with its key",
                vec![v1(), v2(), entry(&dk, 3, Wire::Pending, &k3)],
                None,
                Destroyed,
            ),
            (
                "a retire under another key_id",
                vec![v2()],
                Some(key_ref(1, &Key256::generate())),
                KeyIdClash,
            ),
            (
                "an older primary",
                vec![
                    entry(&dk, 1, Wire::Primary, &k1),
                    entry(&dk, 2, Wire::DecryptOnly, &k2),
                ],
                None,
                Rollback,
            ),
            (
                "no primary",
                vec![v1(), entry(&dk, 2, Wire::DecryptOnly, &k2)],
                None,
                Rollback,
            ),
        ];
        for (what, versions, retire, reason) in cases {
            let counted = refused(reason);
            let bad = ClusterState {
                seq: 4,
                versions,
                retired: retire.iter().map(|r| r.version).collect(),
                retired_keys: retire.into_iter().collect(),
                ..Default::default()
            };
            let err = node.apply_cluster_state(&bad, &dk).unwrap_err();
            assert!(
                matches!(err, NodeError::InvalidArgument(_)),
                "{what}: {err}"
            );
            assert_eq!(node.holding(), before, "{what}");
            assert_eq!(on_disk(&node), stored, "{what}");
            assert_eq!(node.status().0, "ok", "{what}");
            // Other tests of this binary may count too: at least one more.
            assert!(refused(reason) > counted, "{what}: {reason:?} counted");
        }
    }

    #[test]
    fn a_destroyed_version_sent_again_with_its_key_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (node, dk, [k1, k2, k3]) = settled(dir.path());
        let again = ClusterState {
            seq: 4,
            versions: vec![
                entry(&dk, 1, Wire::DecryptOnly, &k1),
                entry(&dk, 2, Wire::DecryptOnly, &k2),
                entry(&dk, 3, Wire::Primary, &k3),
            ],
            ..Default::default()
        };
        let err = node
            .apply_cluster_state(&again, &dk)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("version 3") && err.contains(&key_ref(3, &k3).key_id),
            "{err}"
        );
        assert!(node.snapshot().keyring.get(3).unwrap().key().is_none());
        assert_eq!(node.holding().primary, 2);
    }

    #[test]
    fn only_keys_held_under_the_wanted_key_id_are_chosen_for_return() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _, [k1, k2, k3]) = settled(dir.path());
        let ring = &node.snapshot().keyring;
        let other = key_ref(2, &Key256::generate());
        let wanted = [
            key_ref(1, &k1),
            other.clone(),
            key_ref(3, &k3),
            key_ref(9, &Key256::generate()),
            key_ref(1, &k1),
        ];
        let (chosen, refused) = choose_returns(ring, &wanted);
        let chosen: Vec<_> = chosen.iter().map(|kv| kv.version).collect();
        assert_eq!(chosen, [1]);
        assert_eq!(
            refused,
            [
                NotReturned::OtherKey {
                    version: 2,
                    wanted: other.key_id.clone(),
                    held: key_ref(2, &k2).key_id
                },
                NotReturned::Destroyed {
                    version: 3,
                    wanted: key_ref(3, &k3).key_id,
                    held: key_ref(3, &k3).key_id
                },
                NotReturned::NotHeld {
                    version: 9,
                    wanted: wanted[3].key_id.clone()
                },
            ]
        );
        let text = refused[0].to_string();
        assert!(text.contains(&other.key_id) && text.contains(&key_ref(2, &k2).key_id));
    }

    #[test]
    fn a_returned_key_opens_only_for_the_service_it_was_wrapped_to() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _, [k1, k2, _]) = settled(dir.path());
        let service = DeliveryKey::generate();
        let wanted = [key_ref(2, &k2), key_ref(1, &Key256::generate())];
        let returned = node.return_wanted(&wanted, &service.public_key());
        assert_eq!(returned.len(), 1);
        let r = &returned[0];
        assert_eq!((r.version, &r.key_id), (2, &wanted[0].key_id));
        let binding = Binding {
            cluster: "c",
            node: "n1",
            version: 2,
            key_id: &r.key_id,
        };
        assert_eq!(service.open_returned(binding, &r.wrapped_key).unwrap(), k2);
        assert!(DeliveryKey::generate()
            .open_returned(binding, &r.wrapped_key)
            .is_err());
        // A delivery key that is no P-256 point: nothing is returned.
        assert!(node.return_wanted(&[key_ref(1, &k1)], b"bad").is_empty());
    }

    #[test]
    fn local_status_shows_what_the_service_last_said() {
        let dir = tempfile::tempdir().unwrap();
        let node = joined(dir.path());
        assert!(!node.local_status().central_reconciling);
        node.note_central_reconciling(true);
        assert!(node.local_status().central_reconciling);
        node.note_central_reconciling(false);
        assert!(!node.local_status().central_reconciling);
    }
}
