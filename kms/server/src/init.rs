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
use crate::state_store::StoreError;
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
    let initialized =
        edgekms_daemon::durable::has_marker(data_dir) || data_dir.join(rocks::STATE_DIR).exists();
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
    private_dir(&operator_dir)?;
    let ca_pem = pki::cert_pem(&ca_issued.cert_der);
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
    write_file(&data_dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
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
