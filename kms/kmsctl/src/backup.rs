//! `kmsctl backup FILE --key-file KEYFILE`: the central service's whole
//! state, encrypted under the operator's key, written to a new file with
//! mode 0600. `edgekms-server restore` reads it back on a new host.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use edgekms_proto::fleet as pb;
use edgekms_proto::fleet::operator_client::OperatorClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::{print_json, Failure};

/// A backup carries every KEK and the audit log: far more than gRPC's
/// default 4 MiB message limit on a large fleet.
const MAX_BACKUP: usize = 1 << 30;

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// File to write (created with mode 0600; an existing file is refused)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// File holding the backup key: 32 random bytes as 64 hex digits
    /// (`openssl rand -hex 32 > backup.key`); keep it apart from the backups
    #[arg(long, value_name = "KEYFILE")]
    pub key_file: PathBuf,
    /// Leave the audit log out of the backup
    #[arg(long)]
    pub no_audit: bool,
}

/// Checks what can be checked before calling the service: the key file, and
/// that FILE does not exist yet.
pub fn prepare(args: &BackupArgs) -> Result<edgekms_hsm::Key256, Failure> {
    prepare_paths(&args.file, &args.key_file)
}

fn prepare_paths(file: &Path, key_file: &Path) -> Result<edgekms_hsm::Key256, Failure> {
    let key = edgekms_daemon::config::read_key_file(key_file)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if file.symlink_metadata().is_ok() {
        return Err(Failure::Usage(format!(
            "{} exists; refusing to overwrite it (choose a new file name)",
            file.display()
        )));
    }
    Ok(key)
}

/// `kmsctl local backup FILE --key-file KEYFILE`: a standalone node's keys.
#[derive(Debug, clap::Args)]
pub struct LocalBackupArgs {
    /// File to write (created with mode 0600; an existing file is refused)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// File holding the backup key: 32 random bytes as 64 hex digits
    /// (`openssl rand -hex 32 > backup.key`); keep it apart from the backups
    #[arg(long, value_name = "KEYFILE")]
    pub key_file: PathBuf,
}

pub async fn run_local(
    admin: &mut edgekms_proto::admin::node_admin_client::NodeAdminClient<Channel>,
    args: LocalBackupArgs,
    json: bool,
) -> Result<(), Failure> {
    let key = prepare_paths(&args.file, &args.key_file)?;
    let r = admin
        .backup(edgekms_proto::admin::BackupRequest {
            key: key.expose().to_vec().into(),
        })
        .await?
        .into_inner();
    write_new(&args.file, &r.blob)?;
    if json {
        print_json(json!({
            "file": args.file.display().to_string(), "bytes": r.blob.len(),
            "cluster": r.cluster, "key_versions": r.key_versions,
            "primary_version": r.primary_version, "created_unix": r.created_unix,
        }));
    } else {
        println!(
            "backup written to {} ({} bytes): cluster {}, {} key versions, primary v{}",
            args.file.display(),
            r.blob.len(),
            r.cluster,
            r.key_versions,
            r.primary_version
        );
        println!(
            "encrypted under the key in {}; the node sealing key is not in it. Restore into an empty data dir with:\n  edgekms-plugin restore --from {} --key-file {} --data-dir /var/lib/edgekms --sealer tpm",
            args.key_file.display(),
            args.file.display(),
            args.key_file.display()
        );
    }
    Ok(())
}

pub async fn run(
    client: OperatorClient<Channel>,
    args: BackupArgs,
    key: edgekms_hsm::Key256,
    json: bool,
) -> Result<(), Failure> {
    let mut client = client.max_decoding_message_size(MAX_BACKUP);
    let r = client
        .backup(pb::BackupRequest {
            key: key.expose().to_vec().into(),
            skip_audit: args.no_audit,
        })
        .await?
        .into_inner();
    write_new(&args.file, &r.blob)?;
    if json {
        print_json(json!({
            "file": args.file.display().to_string(), "bytes": r.blob.len(),
            "clusters": r.clusters, "key_versions": r.key_versions,
            "audit_records": r.audit_records, "created_unix": r.created_unix,
        }));
    } else {
        println!(
            "backup written to {} ({} bytes): {} clusters, {} key versions, {} audit records",
            args.file.display(),
            r.blob.len(),
            r.clusters,
            r.key_versions,
            r.audit_records
        );
        println!(
            "encrypted under the key in {}; the server's root key is not in it. Restore on a new host with:\n  edgekms-server restore {} --key-file {} --data-dir /var/lib/edgekms-server --sealer tpm",
            args.key_file.display(),
            args.file.display(),
            args.key_file.display()
        );
    }
    Ok(())
}

/// Creates `path` (mode 0600, never an existing file), writes and syncs
/// it; removes it again if the write fails half way.
fn write_new(path: &Path, contents: &[u8]) -> Result<(), Failure> {
    let fail = |what: &str, e: std::io::Error| {
        Failure::Usage(format!("cannot {what} {}: {e}", path.display()))
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail("create", e))?;
    if let Err(e) = f.write_all(contents).and_then(|_| f.sync_all()) {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(fail("write", e));
    }
    // The new directory entry too.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
