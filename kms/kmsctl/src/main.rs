//! `kmsctl`: the operator CLI.
//!
//! - `kmsctl local ...` talks to this node's plugin over its admin socket
//!   (status, rotate, retire, restore-version, tpm, reseal, backup), and
//!   `kmsctl local census` reads the cluster's storage ([`census`]);
//! - `kmsctl migrate` rewrites stored objects through the Kubernetes API
//!   under the current key ([`migrate`]);
//! - `kmsctl kms ...` talks KMS v2 to the plugin's socket exactly as
//!   kube-apiserver does (status, encrypt, decrypt, roundtrip);
//! - `kmsctl node|rotate|retire|status|audit|backup` talk to the central
//!   key service with the operator's certificate ([`central`], [`backup`]);
//! - `kmsctl migrate` rewrites objects through the Kubernetes API so they
//!   are stored under the current key_id ([`migrate`]).
//!
//! Human output by default, `-o json` for scripts. Exit codes: 0 success,
//! 1 the plugin or service refused or failed, 2 bad usage or unreachable
//! plugin or service, 3 gave up waiting (`rotate --wait --timeout`).

/// Every `println!` of kmsctl (this file and its modules, declared below)
/// goes through [`out_line`]: std's panics when the reader went away
/// (`kmsctl audit | head`); kmsctl stops quietly instead.
macro_rules! println {
    () => {
        $crate::out_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out_line(format_args!($($arg)*))
    };
}

mod backup;
mod census;
mod central;
mod migrate;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use clap::{Parser, Subcommand, ValueEnum};
use edgekms_proto::admin::node_admin_client::NodeAdminClient;
use edgekms_proto::admin::{
    ResealRequest, RestoreVersionRequest, RetireRequest, RotateRequest, StatusRequest,
};
use edgekms_proto::kms_v2::key_management_service_client::KeyManagementServiceClient;
use edgekms_proto::kms_v2::{DecryptRequest, EncryptRequest, StatusRequest as KmsStatusRequest};
use serde_json::json;
use zeroize::Zeroizing;

const DEFAULT_ADMIN_SOCKET: &str = "/var/run/edgekms/admin.sock";
const DEFAULT_KMS_SOCKET: &str = "/var/run/edgekms/kms.sock";

#[derive(Debug, Parser)]
#[command(
    name = "kmsctl",
    version,
    about = "Operate edgekms: the central key service, the local node plugin and its keys"
)]
struct Cli {
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value = "human", global = true)]
    output: Output,
    /// The central key service, https://HOST:PORT
    #[arg(long, env = "KMSCTL_SERVER", global = true, value_name = "URL")]
    server: Option<String>,
    /// Directory with the operator's ca.pem, cert.pem and key.pem
    #[arg(long, env = "KMSCTL_OPERATOR_DIR", global = true, value_name = "DIR")]
    operator_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the plugin on this node through its admin socket
    Local {
        /// The plugin's admin socket
        #[arg(long, env = "KMSCTL_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET, value_name = "PATH")]
        admin_socket: PathBuf,
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Call the plugin's KMS v2 socket as kube-apiserver does
    Kms {
        /// The plugin's KMS v2 socket
        #[arg(long, env = "KMSCTL_KMS_SOCKET", default_value = DEFAULT_KMS_SOCKET, value_name = "PATH")]
        socket: PathBuf,
        #[command(subcommand)]
        command: KmsCommand,
    },
    /// Enrol or revoke nodes (central service)
    Node {
        #[command(subcommand)]
        command: central::NodeCommand,
    },
    /// Add, remove or list the central service's replicas (service on etcd)
    Replica {
        #[command(subcommand)]
        command: central::ReplicaCommand,
    },
    /// Start a two-phase rotation of a cluster's KEK (central service)
    Rotate(central::RotateArgs),
    /// Retire a decrypt-only version: disabled on every node at once (Decrypt refused, restorable), destroyed after the grace period (central service). Refused unless a census shows nothing stored under it
    Retire {
        cluster: String,
        version: u32,
        #[command(flatten)]
        how: RetireFlags,
    },
    /// Bring a disabled (retired, not yet destroyed) version back to decrypt-only (central service)
    RestoreVersion { cluster: String, version: u32 },
    /// Versions and nodes per cluster, and any reconciliation or clash (central service)
    Status { cluster: Option<String> },
    /// End a cluster's reconciliation without the nodes it waits for, named exactly as `kmsctl status` lists them (central service)
    Reconcile {
        cluster: String,
        /// The nodes to go on without, comma-separated
        #[arg(long, value_name = "NODE,...", value_delimiter = ',', required = true)]
        without: Vec<String>,
    },
    /// The central service's audit log, oldest first, streamed (`-o json`: a JSON array, one record per line)
    Audit {
        /// Only records newer than this (e.g. 1h, 7d)
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Only the newest N records
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Write the central service's whole state, encrypted under your key, to a new file (restore: `edgekms-server restore`)
    Backup(backup::BackupArgs),
    /// After a rotation, rewrite every object of some resources through the Kubernetes API so each is stored under the current key_id (resumable)
    Migrate(migrate::MigrateArgs),
}

#[derive(Debug, Subcommand)]
enum LocalCommand {
    /// Health, primary key, every cached version and the sealer
    Status,
    /// Make a new KEK version primary now; older ones stay decrypt-only
    Rotate,
    /// Retire a decrypt-only version: disabled at once (Decrypt refused, restorable), its key destroyed after the grace period. Refused unless a census shows nothing stored under it
    Retire {
        /// The version number, as `kmsctl local status` shows it
        version: u32,
        #[command(flatten)]
        how: RetireFlags,
    },
    /// Bring a disabled (retired, not yet destroyed) version back to decrypt-only
    RestoreVersion {
        /// The version number, as `kmsctl local status` shows it
        version: u32,
    },
    /// What the plugin sees of its sealer: backend, TCTI, manufacturer, PCR policy
    Tpm,
    /// After a PCR change the operator has checked: unseal with the recovery
    /// passphrase and seal again to the present PCR values
    Reseal {
        /// Read the passphrase from this file instead of standard input
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Back up this standalone node's keys, encrypted under your backup key
    /// (restore with `edgekms-plugin restore`)
    Backup(backup::LocalBackupArgs),
    /// Count the objects in etcd under each key_id (and unencrypted, or under
    /// another provider), with kube-apiserver's etcd flags
    Census(census::CensusArgs),
}

/// How a version is retired, centrally or locally.
#[derive(Debug, Clone, clap::Args)]
struct RetireFlags {
    /// How long the version stays disabled (Decrypt refused, restorable) before its key is destroyed; at least 1h
    #[arg(long, value_name = "DURATION", default_value = "7d")]
    grace: String,
    /// Retire although no census shows the version unused (DANGEROUS: data still under it is lost once the grace period ends; audited)
    #[arg(long)]
    skip_census: bool,
}

impl RetireFlags {
    fn grace_secs(&self) -> Result<u64, Failure> {
        edgekms_daemon::duration::parse_nonzero(&self.grace)
            .map(|d| d.as_secs())
            .map_err(|e| Failure::Usage(format!("--grace: {e}")))
    }

    /// Says loudly what `--skip-census` means, before asking.
    fn warn(&self, version: u32) {
        if self.skip_census {
            eprintln!("WARNING: --skip-census: retiring v{version} without a census showing that nothing is stored under it. Anything still encrypted under it becomes unreadable now and is lost for good when the grace period ends. This is recorded in the audit log.");
        }
    }
}

#[derive(Debug, Subcommand)]
enum KmsCommand {
    /// KMS Status: version, healthz, key_id
    Status,
    /// Encrypt TEXT; prints key_id and base64 ciphertext
    Encrypt {
        text: String,
        #[arg(long, default_value = "kmsctl")]
        uid: String,
    },
    /// Decrypt a base64 ciphertext made by `encrypt`
    Decrypt {
        ciphertext: String,
        #[arg(long)]
        key_id: String,
        #[arg(long, default_value = "kmsctl")]
        uid: String,
    },
    /// Status, Encrypt and Decrypt of TEXT, showing each step
    Roundtrip {
        #[arg(default_value = "hello from edgekms")]
        text: String,
    },
}

/// Why kmsctl failed, which decides the exit code.
pub(crate) enum Failure {
    /// Bad usage or unreachable plugin.
    Usage(String),
    /// The plugin answered with an error.
    Refused(tonic::Status),
    /// Gave up waiting.
    Timeout(String),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        // The peer dropped the connection rather than answering: with TLS
        // 1.3 that is how a server refuses a client certificate. Depending
        // on when the close lands, the client reports it as a transport
        // error or as its own request cancelled.
        let dropped = (matches!(s.code(), tonic::Code::Unknown | tonic::Code::Unavailable)
            && s.message().contains("transport error"))
            || (s.code() == tonic::Code::Cancelled && s.message() == "operation was canceled");
        if dropped {
            return Failure::Usage(format!(
                "the connection was closed without an answer ({}): the central service refuses certificates not issued by its CA (is --operator-dir from this service's `init`?), or the peer is going down",
                s.message()
            ));
        }
        Failure::Refused(s)
    }
}

fn main() -> ExitCode {
    let cli = match edgekms_daemon::cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kmsctl: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("kmsctl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Refused(status)) => {
            eprintln!("kmsctl: {:?}: {}", status.code(), status.message());
            ExitCode::FAILURE
        }
        Err(Failure::Timeout(msg)) => {
            eprintln!("kmsctl: {msg}");
            ExitCode::from(3)
        }
    }
}

async fn channel(path: &Path) -> Result<tonic::transport::Channel, Failure> {
    edgekms_proto::uds::connect(path).await.map_err(|e| {
        Failure::Usage(format!(
            "cannot reach the plugin at {}: {e} (is edgekms-plugin running?)",
            path.display()
        ))
    })
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.output == Output::Json;
    match cli.command {
        // Reads etcd; the plugin's admin socket is optional (versions).
        Command::Local {
            admin_socket,
            command: LocalCommand::Census(args),
        } => census::run(&admin_socket, args, json).await,
        Command::Local {
            admin_socket,
            command,
        } => {
            let mut admin = NodeAdminClient::new(channel(&admin_socket).await?);
            local(&mut admin, command, json).await
        }
        Command::Kms { socket, command } => {
            let mut kms = KeyManagementServiceClient::new(channel(&socket).await?);
            kms_cmd(&mut kms, command, json).await
        }
        Command::Node { command } => {
            central_cmd(
                cli.server,
                cli.operator_dir,
                central::CentralCommand::Node(command),
                json,
            )
            .await
        }
        Command::Replica { command } => {
            central_cmd(
                cli.server,
                cli.operator_dir,
                central::CentralCommand::Replica(command),
                json,
            )
            .await
        }
        Command::Rotate(args) => {
            central_cmd(
                cli.server,
                cli.operator_dir,
                central::CentralCommand::Rotate(args),
                json,
            )
            .await
        }
        Command::Retire {
            cluster,
            version,
            how,
        } => {
            let grace_secs = how.grace_secs()?;
            how.warn(version);
            let cmd = central::CentralCommand::Retire {
                cluster,
                version,
                grace_secs,
                skip_census: how.skip_census,
            };
            central_cmd(cli.server, cli.operator_dir, cmd, json).await
        }
        Command::RestoreVersion { cluster, version } => {
            let cmd = central::CentralCommand::RestoreVersion { cluster, version };
            central_cmd(cli.server, cli.operator_dir, cmd, json).await
        }
        Command::Status { cluster } => {
            let cmd = central::CentralCommand::Status { cluster };
            central_cmd(cli.server, cli.operator_dir, cmd, json).await
        }
        Command::Reconcile { cluster, without } => {
            let cmd = central::CentralCommand::Reconcile { cluster, without };
            central_cmd(cli.server, cli.operator_dir, cmd, json).await
        }
        Command::Audit { since, limit } => {
            let cmd = central::CentralCommand::Audit { since, limit };
            central_cmd(cli.server, cli.operator_dir, cmd, json).await
        }
        Command::Backup(args) => {
            let key = backup::prepare(&args)?;
            let client = operator_client(cli.server, cli.operator_dir).await?;
            backup::run(client, args, key, json).await
        }
        Command::Migrate(mut args) => {
            args.central = (cli.server, cli.operator_dir);
            migrate::run(args, json).await
        }
    }
}

async fn central_cmd(
    server: Option<String>,
    operator_dir: Option<PathBuf>,
    command: central::CentralCommand,
    json: bool,
) -> Result<(), Failure> {
    central::check(&command)?;
    let mut client = operator_client(server, operator_dir).await?;
    central::run(&mut client, command, json).await
}

pub(crate) async fn operator_client(
    server: Option<String>,
    operator_dir: Option<PathBuf>,
) -> Result<edgekms_proto::fleet::operator_client::OperatorClient<tonic::transport::Channel>, Failure>
{
    let server = server.ok_or_else(|| {
        Failure::Usage(
            "--server (or KMSCTL_SERVER) is required: https://HOST:PORT of edgekms-server".into(),
        )
    })?;
    let dir = operator_dir.ok_or_else(|| {
        Failure::Usage("--operator-dir (or KMSCTL_OPERATOR_DIR) is required: the directory with ca.pem, cert.pem, key.pem".into())
    })?;
    central::connect(&server, &dir).await
}

/// Writes one line to stdout. When the reader is gone (EPIPE: `| head`
/// has what it wanted) kmsctl exits at once, quietly, with 0: what it was
/// asked to do is done, and `head` closing early is no failure. Any other
/// write error is one line on stderr and exit 1, never a panic.
pub(crate) fn out_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            // stderr may be gone too; nothing more to say then.
            let _ = writeln!(std::io::stderr(), "kmsctl: cannot write the output: {e}");
            std::process::exit(1)
        }
    }
}

pub(crate) fn print_json(value: serde_json::Value) {
    println!("{value:#}");
}

async fn local(
    admin: &mut NodeAdminClient<tonic::transport::Channel>,
    command: LocalCommand,
    json: bool,
) -> Result<(), Failure> {
    match command {
        LocalCommand::Status => {
            let s = admin.status(StatusRequest {}).await?.into_inner();
            if json {
                print_json(json!({
                    "cluster": s.cluster, "node": s.node, "healthz": s.healthz,
                    "primary_version": s.primary_version, "primary_key_id": s.primary_key_id,
                    "unsealed": s.unsealed, "hardware_backed": s.hardware_backed,
                    "sealer": s.sealer, "central_reconciling": s.central_reconciling,
                    "versions": s.versions.iter().map(|v| json!({
                        "version": v.version, "state": v.state, "key_id": v.key_id, "created_unix": v.created_unix,
                        "destroy_after_unix": v.destroy_after_unix,
                    })).collect::<Vec<_>>(),
                    "writes_key_id": s.writes_key_id, "writes_since_unix": s.writes_since_unix,
                    "census": s.census.as_ref().map(central::census_json),
                }));
            } else {
                println!(
                    "cluster:  {}\nnode:     {}\nhealthz:  {}",
                    s.cluster, s.node, s.healthz
                );
                println!("primary:  v{} ({})", s.primary_version, s.primary_key_id);
                if s.central_reconciling {
                    println!("central service: reconciling (this node keeps serving its own keys)");
                }
                println!(
                    "sealer:   {}{}",
                    s.sealer.get("backend").map(String::as_str).unwrap_or("?"),
                    if s.hardware_backed {
                        ""
                    } else {
                        " (INSECURE: not hardware-protected)"
                    }
                );
                if !s.writes_key_id.is_empty() {
                    println!(
                        "apiserver writes under: {} (since {})",
                        s.writes_key_id,
                        central::utc(s.writes_since_unix)
                    );
                }
                println!("\n{:>7}  {:<12}  KEY ID", "VERSION", "STATE");
                for v in &s.versions {
                    let scheduled = if v.destroy_after_unix == 0 {
                        String::new()
                    } else {
                        format!("  (destroyed at {})", central::utc(v.destroy_after_unix))
                    };
                    println!("{:>7}  {:<12}  {}{scheduled}", v.version, v.state, v.key_id);
                }
                if let Some(c) = &s.census {
                    central::print_census(
                        c,
                        "",
                        s.versions.iter().map(|v| (v.version, v.key_id.as_str())),
                    );
                }
            }
        }
        LocalCommand::Rotate => {
            let r = admin.rotate(RotateRequest {}).await?.into_inner();
            if json {
                print_json(json!({"version": r.version, "key_id": r.key_id}));
            } else {
                println!("rotated: v{} is primary ({})", r.version, r.key_id);
            }
        }
        LocalCommand::Retire { version, how } => {
            let grace_seconds = how.grace_secs()?;
            how.warn(version);
            let r = admin
                .retire(RetireRequest {
                    version,
                    grace_seconds,
                    skip_census: how.skip_census,
                })
                .await?
                .into_inner();
            if json {
                print_json(
                    json!({"disabled": version, "destroy_after_unix": r.destroy_after_unix}),
                );
            } else {
                println!(
                    "disabled: v{version}; Decrypt under it is refused, and its key is destroyed at {} unless `kmsctl local restore-version {version}` brings it back first",
                    central::utc(r.destroy_after_unix)
                );
            }
        }
        LocalCommand::RestoreVersion { version } => {
            admin
                .restore_version(RestoreVersionRequest { version })
                .await?;
            if json {
                print_json(json!({"restored": version}));
            } else {
                println!("restored: v{version} is decrypt-only again");
            }
        }
        LocalCommand::Tpm => {
            let s = admin.status(StatusRequest {}).await?.into_inner();
            if json {
                print_json(
                    json!({"sealer": s.sealer, "sealed_key": s.sealed_key, "hardware_backed": s.hardware_backed, "unsealed": s.unsealed, "healthz": s.healthz}),
                );
            } else {
                for (k, v) in &s.sealer {
                    println!("{k:<16} {v}");
                }
                // The node's own sealed key: noDA yes/no (TPM).
                for (k, v) in &s.sealed_key {
                    println!("{k:<16} {v}");
                }
                println!("{:<16} {}", "key_unsealed", s.unsealed);
                println!("{:<16} {}", "healthz", s.healthz);
            }
        }
        LocalCommand::Reseal { passphrase_file } => {
            let passphrase = read_passphrase(passphrase_file.as_deref())?;
            admin
                .reseal(ResealRequest {
                    recovery_passphrase: passphrase.to_string(),
                })
                .await?;
            if json {
                print_json(json!({"resealed": true}));
            } else {
                println!("resealed: the node sealing key is bound to the present PCR values and keys are served");
            }
        }
        LocalCommand::Backup(args) => backup::run_local(admin, args, json).await?,
        LocalCommand::Census(_) => {
            return Err(Failure::Usage(
                "census is run without the admin channel (see run)".into(),
            ))
        }
    }
    Ok(())
}

fn read_passphrase(file: Option<&Path>) -> Result<Zeroizing<String>, Failure> {
    let mut text = Zeroizing::new(String::new());
    match file {
        Some(path) => {
            *text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
        }
        None => {
            std::io::stdin().read_to_string(&mut text).map_err(|e| {
                Failure::Usage(format!("cannot read the passphrase from stdin: {e}"))
            })?;
        }
    }
    let trimmed = Zeroizing::new(text.trim().to_owned());
    if trimmed.is_empty() {
        return Err(Failure::Usage("empty recovery passphrase".into()));
    }
    Ok(trimmed)
}

async fn kms_cmd(
    kms: &mut KeyManagementServiceClient<tonic::transport::Channel>,
    command: KmsCommand,
    json: bool,
) -> Result<(), Failure> {
    let b64 = base64::engine::general_purpose::STANDARD;
    match command {
        KmsCommand::Status => {
            let s = kms.status(KmsStatusRequest {}).await?.into_inner();
            if json {
                print_json(json!({"version": s.version, "healthz": s.healthz, "key_id": s.key_id}));
            } else {
                println!(
                    "version: {}\nhealthz: {}\nkey_id:  {}",
                    s.version, s.healthz, s.key_id
                );
            }
        }
        KmsCommand::Encrypt { text, uid } => {
            let r = kms
                .encrypt(EncryptRequest {
                    plaintext: text.into_bytes().into(),
                    uid,
                })
                .await?
                .into_inner();
            if json {
                print_json(json!({"key_id": r.key_id, "ciphertext": b64.encode(&r.ciphertext)}));
            } else {
                println!(
                    "key_id:     {}\nciphertext: {}",
                    r.key_id,
                    b64.encode(&r.ciphertext)
                );
            }
        }
        KmsCommand::Decrypt {
            ciphertext,
            key_id,
            uid,
        } => {
            let ct = b64
                .decode(ciphertext.trim())
                .map_err(|e| Failure::Usage(format!("ciphertext is not base64: {e}")))?;
            let r = kms
                .decrypt(DecryptRequest {
                    ciphertext: ct.into(),
                    uid,
                    key_id,
                    annotations: Default::default(),
                })
                .await?
                .into_inner();
            if json {
                print_json(json!({"plaintext": b64.encode(&r.plaintext)}));
            } else {
                println!("{}", String::from_utf8_lossy(&r.plaintext));
            }
        }
        KmsCommand::Roundtrip { text } => {
            let s = kms.status(KmsStatusRequest {}).await?.into_inner();
            let e = kms
                .encrypt(EncryptRequest {
                    plaintext: text.clone().into_bytes().into(),
                    uid: "kmsctl-roundtrip".into(),
                })
                .await?
                .into_inner();
            let d = kms
                .decrypt(DecryptRequest {
                    ciphertext: e.ciphertext.clone(),
                    uid: "kmsctl-roundtrip".into(),
                    key_id: e.key_id.clone(),
                    annotations: e.annotations.clone(),
                })
                .await?
                .into_inner();
            let same = d.plaintext.as_ref() == text.as_bytes();
            if json {
                print_json(json!({
                    "status": {"version": s.version, "healthz": s.healthz, "key_id": s.key_id},
                    "encrypt": {"key_id": e.key_id, "ciphertext": b64.encode(&e.ciphertext)},
                    "decrypt": {"plaintext": String::from_utf8_lossy(&d.plaintext)},
                    "match": same,
                }));
            } else {
                println!(
                    "Status  -> version={} healthz={} key_id={}",
                    s.version, s.healthz, s.key_id
                );
                println!(
                    "Encrypt -> key_id={} ciphertext({} bytes)={}",
                    e.key_id,
                    e.ciphertext.len(),
                    b64.encode(&e.ciphertext)
                );
                println!("Decrypt -> {:?}", String::from_utf8_lossy(&d.plaintext));
                println!(
                    "{}",
                    if same {
                        "round trip OK"
                    } else {
                        "round trip MISMATCH"
                    }
                );
            }
            if !same {
                return Err(Failure::Usage(
                    "decrypted text differs from the input".into(),
                ));
            }
        }
    }
    Ok(())
}
