//! Creating and opening a central data dir.
//!
//! `init` makes the root key (sealed by the chosen sealer), the CA, the
//! server certificate and the first operator's client certificate, and
//! writes the operator's files to `<data-dir>/operator/`. Only the
//! operator's own key is ever written in the clear, with mode 0600, for the
//! operator to move off the host.
//!
//! A root key is made only in a provably empty directory (no marker, no
//! record copy, no state record): the marker is written before the first
//! key reaches the disk, and serving never makes a key (see
//! [`edgekms_daemon::durable`]). The data dir must be owned by the service's user
//! and not writable by others.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use edgekms_hsm::{Key256, SealError, Sealer, SealerConfig, SoftKeyFile};

use crate::error::ServerError;
use crate::rocks::{self, Probe, Store};
use crate::state_store::{Identity, StoreError};
use crate::Central;
use edgekms_daemon::pki;

/// Builds the sealer for a new root key (`init`, `restore`), as
/// [`edgekms_hsm::open`] does for either daemon: a soft-sealer key file is
/// made by the first seal. Never falls back to another sealer.
pub fn sealer(data_dir: &Path, cfg: &SealerConfig) -> Result<Box<dyn Sealer>, ServerError> {
    private_dir(data_dir)?;
    Ok(edgekms_hsm::open(cfg, data_dir, SoftKeyFile::MayCreate)?)
}

/// [`sealer`] for serving an existing data dir: once it holds a state, a
/// missing soft-sealer key file is refused rather than made anew (a new one
/// cannot unseal the root key).
pub fn serve_sealer(data_dir: &Path, cfg: &SealerConfig) -> Result<Box<dyn Sealer>, ServerError> {
    let initialized = edgekms_daemon::durable::has_marker(data_dir)
        || data_dir.join(rocks::STATE_DIR).exists()
        || is_replica_dir(data_dir);
    let key_file = if initialized {
        SoftKeyFile::MustExist
    } else {
        SoftKeyFile::MayCreate
    };
    private_dir(data_dir)?;
    Ok(edgekms_hsm::open(cfg, data_dir, key_file)?)
}

fn io(op: String) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| SealError::Io { op, source }.into()
}

/// Creates `dir` with mode 0700, or checks an existing one (ours, not
/// writable by others; read access for others is removed and logged).
pub(super) fn private_dir(dir: &Path) -> Result<(), ServerError> {
    edgekms_daemon::durable::private_data_dir(dir).map_err(StoreError::from)?;
    Ok(())
}

pub(super) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ServerError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(format!("create {}", path.display())))?;
    // The process umask is 077; public files (certificates) get their mode.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(io(format!("write {}", path.display())))
}

/// What `init` made.
#[derive(Debug)]
pub struct Initialized {
    pub operator_dir: PathBuf,
    pub ca_hash: String,
    pub server_names: Vec<String>,
}

/// The names the server certificate carries: loopback, the host name, and
/// whatever the operator adds with `--san`.
pub fn server_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_owned());
        }
    }
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// Initializes `data_dir`. Refuses a data dir that is already initialized.
pub fn init(
    data_dir: &Path,
    sealer: &dyn Sealer,
    names: &[String],
) -> Result<Initialized, ServerError> {
    private_dir(data_dir)?;
    match rocks::probe(data_dir)? {
        Probe::Empty => {}
        Probe::Initialized(why) | Probe::Partial(why) => {
            return Err(StoreError::NotEmpty {
                dir: data_dir.display().to_string(),
                why,
            }
            .into())
        }
    }
    let operator_dir = data_dir.join("operator");
    if operator_dir.exists() {
        return Err(ServerError::InvalidArgument(format!(
            "{} exists; move it away first",
            operator_dir.display()
        )));
    }
    let root = Key256::generate();
    let sealed = sealer.seal(&root)?;
    let ca_issued = pki::new_ca()?;
    let ca = pki::Ca::load(&ca_issued.cert_der, &ca_issued.key)?;
    let server = ca.issue_server(names)?;
    let operator = ca.issue_operator("admin")?;

    // The marker, before any key reaches the disk.
    let store = Store::create(data_dir)?;
    write_operator(data_dir, &operator_dir, &ca_issued.cert_der, &operator)?;
    // Last: until this lands, the data dir counts as not initialized.
    store.put_init(
        &sealed,
        &root,
        &ca_issued.cert_der,
        &ca_issued.key,
        &server.cert_der,
        &server.key,
    )?;
    Ok(Initialized {
        operator_dir,
        ca_hash: ca.pin()?,
        server_names: names.to_vec(),
    })
}

/// Opens an initialized data dir: unseals the root key, loads the state.
pub fn open(data_dir: &Path, sealer: &dyn Sealer) -> Result<Central, ServerError> {
    private_dir(data_dir)?;
    let store = Store::open(data_dir)?;
    let blob = store.sealed_root()?;
    edgekms_hsm::check_backend(sealer, &blob)?;
    let root = sealer.unseal(&blob)?;
    Central::load(std::sync::Arc::new(store), root)
}

/// An etcd replica's data dir keeps only this: its record files under
/// `replica/` (checksummed, replaced atomically): `root`, the root key
/// sealed by this host's sealer, and `identity`, the replica's name and
/// the store prefix it serves. Everything else is in etcd.
pub const REPLICA_DIR: &str = "replica";
const ROOT_RECORD: &str = "root";
const IDENTITY_RECORD: &str = "identity";

/// Who this replica is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaIdentity {
    pub name: String,
    pub etcd_prefix: String,
}

/// Whether `data_dir` is (or was being made) an etcd replica's.
pub fn is_replica_dir(data_dir: &Path) -> bool {
    data_dir.join(REPLICA_DIR).exists()
}

/// Refuses a data dir that holds anything of a service (either kind).
fn refuse_unless_empty(data_dir: &Path) -> Result<(), ServerError> {
    let why = if is_replica_dir(data_dir) {
        Some("it holds an etcd replica's keys".to_owned())
    } else {
        match rocks::probe(data_dir)? {
            Probe::Empty => None,
            Probe::Initialized(why) | Probe::Partial(why) => Some(why),
        }
    };
    match why {
        None => Ok(()),
        Some(why) => Err(StoreError::NotEmpty {
            dir: data_dir.display().to_string(),
            why,
        }
        .into()),
    }
}

/// Writes a replica's data dir: the sealed root key, then (last, so that
/// an interrupted write leaves no identity) who it is.
fn write_replica_dir(
    data_dir: &Path,
    sealer: &dyn Sealer,
    root: &Key256,
    identity: &ReplicaIdentity,
) -> Result<(), ServerError> {
    let files = edgekms_daemon::durable::RecordFiles::open(&data_dir.join(REPLICA_DIR))
        .map_err(StoreError::from)?;
    let sealed = sealer.seal(root)?;
    files
        .put(ROOT_RECORD, &sealed.encode())
        .map_err(StoreError::from)?;
    let json = serde_json::to_vec(identity)
        .map_err(|e| ServerError::InvalidArgument(format!("replica identity: {e}")))?;
    files
        .put(IDENTITY_RECORD, &json)
        .map_err(StoreError::from)?;
    Ok(())
}

/// Reads a replica's data dir: its identity and its root key, unsealed.
pub fn read_replica_dir(
    data_dir: &Path,
    sealer: &dyn Sealer,
) -> Result<(ReplicaIdentity, Key256), ServerError> {
    let files = edgekms_daemon::durable::RecordFiles::open(&data_dir.join(REPLICA_DIR))
        .map_err(StoreError::from)?;
    let missing = |what: &str| {
        ServerError::from(StoreError::NotInitialized(format!(
            "{} ({what} missing: was it made by `edgekms-server init --store etcd`, `join` or `migrate-store`, or was this replica removed?)",
            data_dir.display()
        )))
    };
    let identity = files
        .get(IDENTITY_RECORD)
        .map_err(StoreError::from)?
        .ok_or_else(|| missing("identity"))?;
    let identity: ReplicaIdentity =
        serde_json::from_slice(&identity).map_err(|e| StoreError::Corrupt {
            key: format!("{}/{REPLICA_DIR}/{IDENTITY_RECORD}", data_dir.display()),
            detail: e.to_string(),
        })?;
    let blob = files
        .get(ROOT_RECORD)
        .map_err(StoreError::from)?
        .ok_or_else(|| missing("sealed root key"))?;
    let blob = edgekms_hsm::SealedBlob::decode(&blob)?;
    edgekms_hsm::check_backend(sealer, &blob)?;
    Ok((identity, sealer.unseal(&blob)?))
}

/// A removed replica erases its sealed root key (its identity stays, so
/// that a restart says why it cannot serve).
pub fn erase_replica_root(data_dir: &Path) -> Result<(), ServerError> {
    let files = edgekms_daemon::durable::RecordFiles::open(&data_dir.join(REPLICA_DIR))
        .map_err(StoreError::from)?;
    // Overwritten before removal: the sealed blob is useless without this
    // host's TPM, but nothing of it need stay on the disk.
    let path = files.path(ROOT_RECORD);
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&path) {
        // In place (no truncation, which would free the blocks unwritten).
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f
            .write_all(&vec![0u8; len as usize])
            .and_then(|()| f.sync_all());
    }
    files.remove(ROOT_RECORD).map_err(StoreError::from)?;
    Ok(())
}

/// `init --store etcd`: the first replica. Makes the root key, the CA,
/// this replica's server certificate and the first operator's, writes the
/// CA and the server identity to etcd (keys wrapped by the root key), and
/// the sealed root key to `data_dir`.
pub fn init_etcd(
    data_dir: &Path,
    sealer: &dyn Sealer,
    names: &[String],
    store: &crate::etcd::EtcdStore,
    replica: &str,
) -> Result<Initialized, ServerError> {
    edgekms_core::keyid::validate_name(replica)?;
    private_dir(data_dir)?;
    refuse_unless_empty(data_dir)?;
    let operator_dir = data_dir.join("operator");
    if operator_dir.exists() {
        return Err(ServerError::InvalidArgument(format!(
            "{} exists; move it away first",
            operator_dir.display()
        )));
    }
    if !store.is_empty()? {
        return Err(StoreError::NotEmpty {
            dir: format!("etcd prefix {}", store.prefix()),
            why: "it already holds a service (join it with `kmsctl replica add` and `edgekms-server join` instead)".into(),
        }
        .into());
    }
    let root = Key256::generate();
    let ca_issued = pki::new_ca()?;
    let ca = pki::Ca::load(&ca_issued.cert_der, &ca_issued.key)?;
    let server = ca.issue_server(names)?;
    let operator = ca.issue_operator("admin")?;
    // The sealed key first: an init that fails after this leaves a data
    // dir that is refused (not empty), never a store no one can open.
    write_replica_dir(
        data_dir,
        sealer,
        &root,
        &ReplicaIdentity {
            name: replica.to_owned(),
            etcd_prefix: store.prefix().to_owned(),
        },
    )?;
    let identity = Identity {
        ca_cert: ca_issued.cert_der.clone(),
        ca_key: ca_issued.key,
        server_cert: server.cert_der,
        server_key: server.key,
    };
    store.put_init(&root, &identity, replica, crate::now_unix())?;
    write_operator(data_dir, &operator_dir, &identity.ca_cert, &operator)?;
    Ok(Initialized {
        operator_dir,
        ca_hash: ca.pin()?,
        server_names: names.to_vec(),
    })
}

fn write_operator(
    data_dir: &Path,
    operator_dir: &Path,
    ca_der: &[u8],
    operator: &pki::Issued,
) -> Result<(), ServerError> {
    private_dir(operator_dir)?;
    let ca_pem = pki::cert_pem(ca_der);
    write_file(&operator_dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
    write_file(
        &operator_dir.join("cert.pem"),
        pki::cert_pem(&operator.cert_der).as_bytes(),
        0o644,
    )?;
    write_file(
        &operator_dir.join("key.pem"),
        operator.key.pem()?.as_bytes(),
        0o600,
    )?;
    write_file(&data_dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)
}

/// Opens an etcd replica: unseals its root key, binds it in the store
/// (refused once removed) and loads the state.
pub fn open_etcd(
    data_dir: &Path,
    sealer: &dyn Sealer,
    store: std::sync::Arc<crate::etcd::EtcdStore>,
    address: String,
) -> Result<Central, ServerError> {
    private_dir(data_dir)?;
    let (identity, root) = read_replica_dir(data_dir, sealer)?;
    if identity.etcd_prefix != store.prefix() {
        return Err(ServerError::InvalidArgument(format!(
            "replica {} belongs to etcd prefix {}, not {} (--etcd-prefix)",
            identity.name,
            identity.etcd_prefix,
            store.prefix()
        )));
    }
    Central::load_replica(store, root, &identity.name, address)
}

/// What `edgekms-server join` made.
#[derive(Debug)]
pub struct JoinedReplica {
    pub name: String,
    pub etcd_prefix: String,
}

/// `edgekms-server join`: becomes a replica with a `kmsctl replica add`
/// token, trusting the service only through the CA pin; the root key it
/// receives is sealed by `sealer` into `data_dir`.
pub async fn join(
    server: &str,
    token: &str,
    ca_hash: &str,
    data_dir: &Path,
    sealer: &dyn Sealer,
    names: &[String],
) -> Result<JoinedReplica, ServerError> {
    use edgekms_proto::fleet::fleet_client::FleetClient;
    private_dir(data_dir)?;
    refuse_unless_empty(data_dir)?;
    let pin = pki::parse_pin(ca_hash)?;
    let delivery = edgekms_core::delivery::DeliveryKey::generate();
    let tls = edgekms_daemon::tls::client_config(edgekms_daemon::tls::Trust::Pin(pin), None)
        .map_err(|e| ServerError::InvalidArgument(e.to_string()))?;
    let channel = edgekms_daemon::tls::connect(server, tls)
        .await
        .map_err(|e| ServerError::InvalidArgument(format!("cannot reach {server}: {e}")))?;
    let resp = FleetClient::new(channel)
        .join_replica(edgekms_proto::fleet::JoinReplicaRequest {
            token: token.trim().to_owned(),
            delivery_public_key: delivery.public_key().into(),
            server_names: names.to_vec(),
        })
        .await
        .map_err(|s| ServerError::PermissionDenied(format!("{server} refused: {}", s.message())))?
        .into_inner();
    let root = delivery.unwrap(
        crate::replication::root_binding(&resp.name, &resp.root_key_id),
        &resp.wrapped_root,
    )?;
    write_replica_dir(
        data_dir,
        sealer,
        &root,
        &ReplicaIdentity {
            name: resp.name.clone(),
            etcd_prefix: resp.etcd_prefix.clone(),
        },
    )?;
    write_file(
        &data_dir.join("ca.pem"),
        pki::cert_pem(&resp.ca_der).as_bytes(),
        0o644,
    )?;
    Ok(JoinedReplica {
        name: resp.name,
        etcd_prefix: resp.etcd_prefix,
    })
}

/// What `migrate-store` moved.
#[derive(Debug)]
pub struct Migrated {
    pub clusters: usize,
    pub key_versions: usize,
    pub audit_records: usize,
    pub ca_hash: String,
}

/// `migrate-store`: copies a RocksDB service's whole state (clusters, key
/// versions, CA and server identity, audit log) into an empty etcd prefix,
/// and makes `to_dir` its first replica, `replica`, with the same root key
/// sealed by `to_sealer`. Nodes keep their certificates: same CA, same
/// server certificate. The source is only read; stop its server first.
pub fn migrate_store(
    from_dir: &Path,
    from_sealer: &dyn Sealer,
    store: &crate::etcd::EtcdStore,
    to_dir: &Path,
    to_sealer: &dyn Sealer,
    replica: &str,
) -> Result<Migrated, ServerError> {
    edgekms_core::keyid::validate_name(replica)?;
    private_dir(to_dir)?;
    refuse_unless_empty(to_dir)?;
    let source = Store::open(from_dir)?;
    let blob = source.sealed_root()?;
    edgekms_hsm::check_backend(from_sealer, &blob)?;
    let root = from_sealer.unseal(&blob)?;
    let snap = crate::state_store::StateStore::snapshot(&source, &root, true)?;
    drop(source);
    let ca = pki::Ca::load(&snap.identity.ca_cert, &snap.identity.ca_key)?;
    write_replica_dir(
        to_dir,
        to_sealer,
        &root,
        &ReplicaIdentity {
            name: replica.to_owned(),
            etcd_prefix: store.prefix().to_owned(),
        },
    )?;
    store.import(&root, &snap, replica, crate::now_unix())?;
    write_file(
        &to_dir.join("ca.pem"),
        pki::cert_pem(&snap.identity.ca_cert).as_bytes(),
        0o644,
    )?;
    Ok(Migrated {
        clusters: snap.clusters.len(),
        key_versions: snap.keks.len(),
        audit_records: snap.audit.len(),
        ca_hash: ca.pin()?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// A replica's data dir reads back; a flipped byte in either record, or
    /// an erased root key, is refused naming the file, never read as
    /// another key or another replica.
    #[test]
    fn a_damaged_or_erased_replica_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let sealer = crate::backup::tests::soft(&dir);
        let root = Key256::generate();
        let id = ReplicaIdentity {
            name: "r1".into(),
            etcd_prefix: "/edgekms/".into(),
        };
        write_replica_dir(&dir, &sealer, &root, &id).unwrap();
        let (read, key) = read_replica_dir(&dir, &sealer).unwrap();
        assert_eq!(read, id);
        assert!(key == root);
        assert!(
            refuse_unless_empty(&dir).is_err(),
            "a replica dir is not empty"
        );
        for record in [IDENTITY_RECORD, ROOT_RECORD] {
            let path = dir.join(REPLICA_DIR).join(record);
            let good = std::fs::read(&path).unwrap();
            let mut bad = good.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let e = read_replica_dir(&dir, &sealer).unwrap_err().to_string();
            assert!(e.contains(record), "{record}: {e}");
            std::fs::write(&path, &good).unwrap();
        }
        erase_replica_root(&dir).unwrap();
        let e = read_replica_dir(&dir, &sealer).unwrap_err().to_string();
        assert!(e.contains("sealed root key missing"), "{e}");
    }
}
