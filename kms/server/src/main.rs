//! `edgekms-server`: the central key service. `init` creates a data dir,
//! `restore` makes one from a `kmsctl backup`; without a subcommand it
//! serves (with its `/metrics`, `/healthz`, `/readyz` endpoint). Everything
//! else lives in `edgekms_server`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use edgekms_daemon::cli;
use edgekms_daemon::config::{read_toml, sealer_kind_parser, LogFormat};
use edgekms_daemon::ops::{Handlers, OpsServer};
use edgekms_hsm::{SealerConfig, SealerKind};
use edgekms_server::etcd::{self, EtcdConfig, EtcdStore};
use edgekms_server::init;
use edgekms_server::{backup, metrics, restore, service, AutoRotate, Central, Retention};
use serde::Deserialize;

/// Where `/metrics`, `/healthz` and `/readyz` are served unless told otherwise.
const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9465);

/// The edgekms central key service: enrols nodes, delivers KEK versions
/// wrapped to each node, and rotates them cluster by cluster (mTLS gRPC).
#[derive(Debug, Parser)]
#[command(
    name = "edgekms-server",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the root key, the CA and the first operator certificate
    Init(InitArgs),
    /// Create a data dir from a `kmsctl backup` file, with a new root key sealed on this host;
    /// all or nothing, and join tokens unused at backup time are withdrawn
    Restore(RestoreArgs),
    /// Become a new replica of a service on etcd, with a token from `kmsctl replica add`
    Join(JoinArgs),
    /// Move a single-node RocksDB service into etcd, as its first replica; nodes keep their certificates
    MigrateStore(MigrateStoreArgs),
}

/// Where the state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    /// Embedded RocksDB in the data dir: one server
    #[default]
    Rocksdb,
    /// etcd, shared by any number of replicas
    Etcd,
}

/// How to reach etcd (`init --store etcd`, `migrate-store`; `serve` takes
/// the same options and config keys in [`ServeArgs`]).
#[derive(Debug, Clone, Default, Args)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated: https://HOST:2379,...
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// CA certificate of etcd's serving certificates
    #[arg(long, value_name = "FILE")]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate etcd accepts
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// Client key
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// Key prefix of this service in etcd [default: /edgekms/]
    #[arg(long, value_name = "PREFIX")]
    etcd_prefix: Option<String>,
    /// Allow http:// endpoints (INSECURE: tests only)
    #[arg(long)]
    etcd_insecure: bool,
}

impl EtcdArgs {
    /// The settings, unvalidated.
    fn settings(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            cacert: self.etcd_cacert.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            prefix: self
                .etcd_prefix
                .clone()
                .unwrap_or_else(|| etcd::DEFAULT_PREFIX.to_owned()),
            insecure: self.etcd_insecure,
        }
    }

    /// The settings if valid; every problem in one usage error otherwise.
    fn config(&self) -> anyhow::Result<EtcdConfig> {
        let cfg = self.settings();
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(Usage(problems.join("; ")).into());
        }
        Ok(cfg)
    }
}

#[derive(Debug, Args)]
struct JoinArgs {
    /// URL of a serving replica, e.g. https://central-0:8443
    #[arg(long, value_name = "URL")]
    server: String,
    /// The token `kmsctl replica add` printed (visible in the process list: prefer --token-file)
    #[arg(
        long,
        value_name = "TOKEN",
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the token
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The service CA's hash, as `kmsctl replica add` printed it (sha256:HEX)
    #[arg(long, value_name = "sha256:HEX")]
    ca_hash: String,
    /// This replica's data dir (missing or empty): it will hold the root key, sealed here
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    #[command(flatten)]
    sealer: SealerArgs,
    /// Extra DNS name or IP address nodes dial this replica by (repeatable);
    /// localhost, 127.0.0.1, ::1 and the host name are always included
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
}

#[derive(Debug, Args)]
struct MigrateStoreArgs {
    /// The RocksDB service to copy: rocksdb:DIR (its server stopped)
    #[arg(long, value_name = "rocksdb:DIR")]
    from: String,
    /// The etcd to copy it to: etcd:URL[,URL...] (an empty prefix)
    #[arg(long, value_name = "etcd:URL[,URL...]")]
    to: String,
    /// The first replica's data dir (missing or empty)
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// The first replica's name [default: the host name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    sealer: SealerArgs,
}

/// Where a new root key is sealed (`init`, `restore`); `serve` takes the
/// same options (and config keys) in [`ServeArgs`].
#[derive(Debug, Args)]
struct SealerArgs {
    /// Where the root key is sealed: tpm, or soft (INSECURE, development)
    #[arg(long, value_parser = sealer_kind_parser(), default_value = "tpm")]
    sealer: SealerKind,
    /// TPM TCTI: device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321, mssim:host=...,port=..., tabrmd: [default: device:/dev/tpmrm0]
    #[arg(long, value_name = "TCTI")]
    tpm_tcti: Option<String>,
    /// Bind the root key to these PCRs, e.g. sha256:7 or sha256:0,2,7 [default: no PCR policy]
    #[arg(long, value_name = "BANK:LIST")]
    tpm_pcrs: Option<String>,
    /// File holding the TPM owner-hierarchy authorization, when the owner set one (kept out of argv)
    #[arg(long, value_name = "FILE")]
    tpm_owner_auth_file: Option<PathBuf>,
}

impl SealerArgs {
    /// The sealer choice, validated: a bad one is a usage error.
    fn config(self) -> anyhow::Result<SealerConfig> {
        sealer_config(SealerConfig {
            kind: self.sealer,
            tpm_tcti: self.tpm_tcti,
            tpm_pcrs: self.tpm_pcrs,
            tpm_owner_auth_file: self.tpm_owner_auth_file,
        })
    }
}

/// `cfg` if valid; every problem in one usage error otherwise.
fn sealer_config(cfg: SealerConfig) -> anyhow::Result<SealerConfig> {
    cfg.validate().map_err(|e| Usage(e.to_string()))?;
    Ok(cfg)
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Data directory to create (state store, sealed root key, operator/)
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    #[command(flatten)]
    sealer: SealerArgs,
    /// Extra DNS name or IP address nodes dial the server by (repeatable);
    /// localhost, 127.0.0.1, ::1 and the host name are always included
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
    /// Where the state lives: rocksdb (in the data dir) or etcd (shared by replicas)
    #[arg(long, value_enum, default_value = "rocksdb")]
    store: StoreKind,
    /// With --store etcd: this replica's name [default: the host name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// Backup file written by `kmsctl backup`
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The backup's key: 64 hex digits (32 bytes), as given to `kmsctl backup`
    #[arg(long, value_name = "KEYFILE")]
    key_file: PathBuf,
    /// Data directory to create: missing or empty, anything else is
    /// refused. Built beside it and renamed into place when complete: a
    /// failed restore leaves it as it was
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    #[command(flatten)]
    sealer: SealerArgs,
    /// Issue a new server certificate (same CA) for this DNS name or IP
    /// (repeatable), plus localhost, 127.0.0.1, ::1 and this host's name;
    /// without it the backed-up server certificate is kept
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
    /// Where to restore to: rocksdb (the data dir) or etcd (an empty prefix; the data dir
    /// becomes its first replica)
    #[arg(long, value_enum, default_value = "rocksdb")]
    store: StoreKind,
    /// With --store etcd: the first replica's name [default: the host name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// Serving settings, from flags or the TOML `--config` (flags win).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeArgs {
    /// TOML file with the same keys (data_dir, listen, ...) plus
    /// [cluster_auto_rotate] NAME = "30d" | "off"
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory made by `edgekms-server init`
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address to serve mTLS gRPC on, e.g. 0.0.0.0:8443
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// The sealer the root key was sealed with at init [default: tpm]
    #[arg(long, value_parser = sealer_kind_parser())]
    sealer: Option<SealerKind>,
    /// TPM TCTI [default: device:/dev/tpmrm0]
    #[arg(long, value_name = "TCTI")]
    tpm_tcti: Option<String>,
    /// The PCRs given to init, e.g. sha256:7 (a root key sealed under a PCR policy is unsealed under the configured one) [default: no PCR policy]
    #[arg(long, value_name = "BANK:LIST")]
    tpm_pcrs: Option<String>,
    /// File holding the TPM owner-hierarchy authorization, when the owner set one (kept out of argv and the config)
    #[arg(long, value_name = "FILE")]
    tpm_owner_auth_file: Option<PathBuf>,
    /// Rotate every cluster automatically this often (e.g. 90d) [default: off]
    #[arg(long, value_name = "DURATION")]
    auto_rotate_every: Option<String>,
    /// Per-cluster automatic rotation (config file only)
    #[arg(skip)]
    #[serde(default)]
    cluster_auto_rotate: BTreeMap<String, String>,
    /// How often each node stream gets a heartbeat [default: 15s]
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,
    /// Delete audit records older than this (e.g. 90d) [default: 365d]
    #[arg(long, value_name = "DURATION")]
    audit_retention: Option<String>,
    /// Keep at most this many audit records, deleting the oldest [default: 1000000]
    #[arg(long, value_name = "N")]
    audit_max_records: Option<u64>,
    /// Log format [default: text]
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Address for the HTTP endpoint serving /metrics (Prometheus), /healthz and /readyz [default: 127.0.0.1:9465]
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_addr: Option<SocketAddr>,
    /// Serve no metrics or health endpoint (binds no TCP port); wins over metrics_addr in the config file
    #[arg(long, conflicts_with = "metrics_addr")]
    #[serde(default)]
    no_metrics: bool,
    /// Open connections at most; when full, the oldest unauthenticated ones are closed
    /// [default: the open-file limit minus 128]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Connections without a client certificate (or still in their TLS handshake) one
    /// peer address may hold; more close its oldest [default: 128]
    #[arg(long, value_name = "N")]
    max_unauthenticated_per_peer: Option<usize>,
    /// The shortest grace period `kmsctl retire --grace` may ask for [default: 1h]. Lower it only for tests
    #[arg(long, value_name = "DURATION", hide = true)]
    min_retire_grace: Option<String>,
    /// Where the state lives: rocksdb (in the data dir) [default] or etcd (shared by replicas)
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
    /// With --store etcd: etcd endpoints, comma-separated (https://HOST:2379,...)
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// CA certificate of etcd's serving certificates
    #[arg(long, value_name = "FILE")]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate etcd accepts
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// Client key
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// Key prefix of this service in etcd [default: /edgekms/]
    #[arg(long, value_name = "PREFIX")]
    etcd_prefix: Option<String>,
    /// Allow http:// etcd endpoints (INSECURE: tests only)
    #[arg(long)]
    #[serde(default)]
    etcd_insecure: bool,
}

impl ServeArgs {
    fn or(self, file: ServeArgs) -> ServeArgs {
        let (metrics_addr, no_metrics) = edgekms_daemon::config::merge_metrics_flags(
            (self.metrics_addr, self.no_metrics),
            (file.metrics_addr, file.no_metrics),
        );
        ServeArgs {
            config: self.config,
            data_dir: self.data_dir.or(file.data_dir),
            listen: self.listen.or(file.listen),
            sealer: self.sealer.or(file.sealer),
            tpm_tcti: self.tpm_tcti.or(file.tpm_tcti),
            tpm_pcrs: self.tpm_pcrs.or(file.tpm_pcrs),
            tpm_owner_auth_file: self.tpm_owner_auth_file.or(file.tpm_owner_auth_file),
            auto_rotate_every: self.auto_rotate_every.or(file.auto_rotate_every),
            cluster_auto_rotate: file.cluster_auto_rotate,
            heartbeat: self.heartbeat.or(file.heartbeat),
            audit_retention: self.audit_retention.or(file.audit_retention),
            audit_max_records: self.audit_max_records.or(file.audit_max_records),
            log_format: self.log_format.or(file.log_format),
            metrics_addr,
            no_metrics,
            max_connections: self.max_connections.or(file.max_connections),
            max_unauthenticated_per_peer: self
                .max_unauthenticated_per_peer
                .or(file.max_unauthenticated_per_peer),
            min_retire_grace: self.min_retire_grace.or(file.min_retire_grace),
            store: self.store.or(file.store),
            etcd_endpoints: self.etcd_endpoints.or(file.etcd_endpoints),
            etcd_cacert: self.etcd_cacert.or(file.etcd_cacert),
            etcd_cert: self.etcd_cert.or(file.etcd_cert),
            etcd_key: self.etcd_key.or(file.etcd_key),
            etcd_prefix: self.etcd_prefix.or(file.etcd_prefix),
            etcd_insecure: self.etcd_insecure || file.etcd_insecure,
        }
    }

    /// With `--store etcd`, where etcd is (unvalidated); `None` on RocksDB.
    fn etcd(&self) -> Option<EtcdConfig> {
        (self.store == Some(StoreKind::Etcd)).then(|| {
            EtcdArgs {
                etcd_endpoints: self.etcd_endpoints.clone().unwrap_or_default(),
                etcd_cacert: self.etcd_cacert.clone(),
                etcd_cert: self.etcd_cert.clone(),
                etcd_key: self.etcd_key.clone(),
                etcd_prefix: self.etcd_prefix.clone(),
                etcd_insecure: self.etcd_insecure,
            }
            .settings()
        })
    }

    /// The sealer choice, unvalidated.
    fn sealer(&self) -> SealerConfig {
        SealerConfig {
            kind: self.sealer.unwrap_or_default(),
            tpm_tcti: self.tpm_tcti.clone(),
            tpm_pcrs: self.tpm_pcrs.clone(),
            tpm_owner_auth_file: self.tpm_owner_auth_file.clone(),
        }
    }

    /// The metrics and health endpoint; `None` with `no_metrics`.
    fn metrics(&self) -> Option<SocketAddr> {
        if self.no_metrics {
            None
        } else {
            Some(self.metrics_addr.unwrap_or(DEFAULT_METRICS_ADDR))
        }
    }
}

fn main() -> ExitCode {
    let cli = match cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // Every file this process creates (RocksDB's, the record copies) is
    // private to its user.
    edgekms_daemon::durable::private_umask();
    let result = match cli.command {
        Some(Command::Init(args)) => run_init(args),
        Some(Command::Restore(args)) => run_restore(args),
        Some(Command::Join(args)) => run_join(args),
        Some(Command::MigrateStore(args)) => run_migrate_store(args),
        None => run_serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgekms-server: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// This host's name, the default replica name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn run_init(args: InitArgs) -> anyhow::Result<()> {
    cli::quiet_tss();
    cli::init_logging(false);
    let etcd = match args.store {
        StoreKind::Rocksdb => {
            if !args.etcd.etcd_endpoints.is_empty() || args.name.is_some() {
                return Err(Usage("--etcd-* and --name need --store etcd".into()).into());
            }
            None
        }
        StoreKind::Etcd => Some(args.etcd.config()?),
    };
    let sealer = init::sealer(&args.data_dir, &args.sealer.config()?)?;
    let names = init::server_names(&args.sans);
    let (done, replica) = match etcd {
        None => (
            init::init(&args.data_dir, sealer.as_ref(), &names)?,
            String::new(),
        ),
        Some(cfg) => {
            let name = args.name.clone().unwrap_or_else(host_name);
            let store = EtcdStore::connect(&cfg)?;
            let done = init::init_etcd(&args.data_dir, sealer.as_ref(), &names, &store, &name)?;
            (
                done,
                format!(
                    "\n  replica: {name}, state in etcd under {prefix} (this data dir holds only the sealed root key and the replica's identity)\n  more replicas: `kmsctl replica add NAME`, then `edgekms-server join` on their hosts",
                    prefix = cfg.prefix
                ),
            )
        }
    };
    println!(
        "initialized {dir}\n  root key sealed by: {sealer}\n  server certificate names: {names}\n  CA hash (for `edgekms-plugin join --ca-hash`): {hash}\n  operator credentials: {op}/{{ca.pem,cert.pem,key.pem}}\n    (move them to the operator's machine; key.pem is the operator's key){replica}",
        dir = args.data_dir.display(),
        sealer = sealer.name(),
        names = done.server_names.join(", "),
        hash = done.ca_hash,
        op = done.operator_dir.display(),
    );
    Ok(())
}

fn run_join(args: JoinArgs) -> anyhow::Result<()> {
    cli::quiet_tss();
    cli::init_logging(false);
    let sealer = init::sealer(&args.data_dir, &args.sealer.config()?)?;
    let names = init::server_names(&args.sans);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let token = cli::join_token(args.token.as_deref(), args.token_file.as_deref())?;
    let joined = runtime.block_on(init::join(
        &args.server,
        &token,
        &args.ca_hash,
        &args.data_dir,
        sealer.as_ref(),
        &names,
    ))?;
    println!(
        "joined as replica {name}\n  root key sealed by: {sealer} in {dir}\n  server certificate names: {names}\nserve it: edgekms-server --data-dir {dir} --listen 0.0.0.0:8443 --sealer {sealer} --store etcd --etcd-prefix {prefix} --etcd-endpoints ... (with the etcd client certificate options)",
        name = joined.name,
        sealer = sealer.name(),
        dir = args.data_dir.display(),
        names = names.join(", "),
        prefix = joined.etcd_prefix,
    );
    Ok(())
}

fn run_migrate_store(args: MigrateStoreArgs) -> anyhow::Result<()> {
    cli::quiet_tss();
    cli::init_logging(false);
    let from = args
        .from
        .strip_prefix("rocksdb:")
        .map(PathBuf::from)
        .ok_or_else(|| Usage(format!("--from {}: must be rocksdb:DIR", args.from)))?;
    let endpoints = args
        .to
        .strip_prefix("etcd:")
        .ok_or_else(|| Usage(format!("--to {}: must be etcd:URL[,URL...]", args.to)))?;
    let mut etcd_args = args.etcd.clone();
    etcd_args.etcd_endpoints = endpoints.split(',').map(str::to_owned).collect();
    let cfg = etcd_args.config()?;
    let sealer_cfg = args.sealer.config()?;
    let from_sealer = init::serve_sealer(&from, &sealer_cfg)?;
    let to_sealer = init::sealer(&args.data_dir, &sealer_cfg)?;
    let name = args.name.clone().unwrap_or_else(host_name);
    let store = EtcdStore::connect(&cfg)?;
    let done = init::migrate_store(
        &from,
        from_sealer.as_ref(),
        &store,
        &args.data_dir,
        to_sealer.as_ref(),
        &name,
    )
    .with_context(|| format!("cannot migrate {}", from.display()))?;
    println!(
        "migrated {from} into etcd under {prefix}\n  {clusters} clusters, {keks} key versions, {audit} audit records\n  first replica: {name}, root key sealed by {sealer} in {dir}\n  CA hash (unchanged; nodes keep their certificates): {hash}\nserve it: edgekms-server --data-dir {dir} --listen ... --sealer {sealer} --store etcd --etcd-prefix {prefix} --etcd-endpoints {endpoints}\n{from} is no longer served: keep it until the replicas run, then remove it",
        from = from.display(),
        prefix = cfg.prefix,
        clusters = done.clusters,
        keks = done.key_versions,
        audit = done.audit_records,
        sealer = to_sealer.name(),
        dir = args.data_dir.display(),
        hash = done.ca_hash,
    );
    Ok(())
}

fn run_restore(args: RestoreArgs) -> anyhow::Result<()> {
    cli::quiet_tss();
    cli::init_logging(false);
    // First, before the backup or the sealer is opened: a target that is
    // not missing or empty is refused with nothing written.
    restore::check_target(&args.data_dir)?;
    let file = args.file.display().to_string();
    let key = backup::read_key_file(&args.key_file)?;
    let blob = std::fs::read(&args.file).with_context(|| format!("cannot read {file}"))?;
    // The whole backup is checked before anything is created.
    let dump = backup::open(&blob, &key).with_context(|| format!("cannot restore {file}"))?;
    let sealer_cfg = args.sealer.config()?;
    let names = (!args.sans.is_empty()).then(|| init::server_names(&args.sans));
    if args.store == StoreKind::Etcd {
        return restore_into_etcd(
            (&args.data_dir, &args.etcd, args.name.clone()),
            &dump,
            &sealer_cfg,
            names.as_deref(),
            &file,
        );
    }
    // The sealer is opened on the staging dir: the soft sealer's key file
    // belongs with the data dir it seals, and moves with it.
    let done = restore::restore(
        &dump,
        &args.data_dir,
        |dir| init::sealer(dir, &sealer_cfg),
        names.as_deref(),
    )
    .with_context(|| format!("cannot restore {file}"))?;
    let s = &done.summary;
    for stale in &done.stale_removed {
        println!(
            "removed {}, left by an interrupted restore",
            stale.display()
        );
    }
    println!(
        "restored {dir} from {file} (backup made at unix time {created})\n  {clusters} clusters, {keks} key versions, {audit} audit records\n  {tokens}\n  new root key sealed by: {sealer}\n  CA hash (unchanged; nodes and operators keep their certificates): {hash}\n  server certificate: {cert}\n  CA certificate: {dir}/ca.pem\n  every cluster reconciles until its nodes have reported: nothing is rotated or retired meanwhile (`kmsctl status` shows it)\nstart it: edgekms-server --data-dir {dir} --listen 0.0.0.0:8443 --sealer {sealer}",
        dir = args.data_dir.display(),
        created = s.created_unix,
        clusters = s.clusters,
        keks = s.key_versions,
        audit = s.audit_records,
        tokens = done.tokens_line(),
        sealer = done.sealer,
        hash = done.ca_hash,
        cert = match &done.reissued {
            Some(names) => format!("issued anew for {}", names.join(", ")),
            None => "kept from the backup (same names)".into(),
        },
    );
    Ok(())
}

/// `restore --store etcd`: the backup is restored as for RocksDB into a
/// staging dir beside the target (a new root key sealed by the configured
/// sealer, unused join tokens withdrawn, every cluster reconciling), then
/// moved into the empty etcd prefix as by `migrate-store`; the staging dir
/// is removed either way.
fn restore_into_etcd(
    (data_dir, etcd, name): (&PathBuf, &EtcdArgs, Option<String>),
    dump: &backup::Dump,
    sealer_cfg: &edgekms_hsm::SealerConfig,
    names: Option<&[String]>,
    file: &str,
) -> anyhow::Result<()> {
    let cfg = etcd.config()?;
    let store = EtcdStore::connect(&cfg)?;
    let mut staging = data_dir.clone().into_os_string();
    staging.push(".restore-staging");
    let staging = PathBuf::from(staging);
    restore::check_target(&staging).with_context(|| {
        format!(
            "{} is left from an interrupted restore: remove it",
            staging.display()
        )
    })?;
    let result = (|| -> anyhow::Result<()> {
        let done = restore::restore(dump, &staging, |dir| init::sealer(dir, sealer_cfg), names)
            .with_context(|| format!("cannot restore {file}"))?;
        let from_sealer = init::serve_sealer(&staging, sealer_cfg)?;
        let to_sealer = init::sealer(data_dir, sealer_cfg)?;
        let name = name.unwrap_or_else(host_name);
        let moved = init::migrate_store(
            &staging,
            from_sealer.as_ref(),
            &store,
            data_dir,
            to_sealer.as_ref(),
            &name,
        )?;
        println!(
            "restored {file} into etcd under {prefix} (backup made at unix time {created})\n  {clusters} clusters, {keks} key versions, {audit} audit records\n  {tokens}\n  first replica: {name}, new root key sealed by {sealer} in {dir}\n  CA hash (unchanged; nodes and operators keep their certificates): {hash}\n  every cluster reconciles until its nodes have reported\nserve it: edgekms-server --data-dir {dir} --listen 0.0.0.0:8443 --sealer {sealer} --store etcd --etcd-prefix {prefix} --etcd-endpoints ...",
            prefix = cfg.prefix,
            created = done.summary.created_unix,
            clusters = moved.clusters,
            keks = moved.key_versions,
            audit = moved.audit_records,
            tokens = done.tokens_line(),
            sealer = to_sealer.name(),
            dir = data_dir.display(),
            hash = moved.ca_hash,
        );
        Ok(())
    })();
    if staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Bad flags or config values: exit code 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// A duration flag; zero is refused (every one is an interval or a period:
/// a zero heartbeat or rotation period would spin or panic).
fn duration(flag: &str, value: &str) -> anyhow::Result<Duration> {
    edgekms_daemon::duration::parse_nonzero(value)
        .map_err(|e| Usage(format!("--{flag}: {e}")).into())
}

fn auto_rotate(args: &ServeArgs) -> anyhow::Result<AutoRotate> {
    let mut out = AutoRotate {
        default: args
            .auto_rotate_every
            .as_deref()
            .map(|v| duration("auto-rotate-every", v))
            .transpose()?,
        ..Default::default()
    };
    for (cluster, value) in &args.cluster_auto_rotate {
        let choice = match value.as_str() {
            "off" => None,
            v => Some(duration(&format!("cluster_auto_rotate.{cluster}"), v)?),
        };
        out.clusters.insert(cluster.clone(), choice);
    }
    Ok(out)
}

/// `--audit-retention` and `--audit-max-records`: both must keep something.
fn retention(args: &ServeArgs) -> anyhow::Result<Retention> {
    let mut out = Retention::default();
    if let Some(v) = &args.audit_retention {
        out.max_age = duration("audit-retention", v)?;
        if out.max_age.is_zero() {
            anyhow::bail!("--audit-retention: must be longer than 0s");
        }
    }
    if let Some(n) = args.audit_max_records {
        if n == 0 {
            anyhow::bail!("--audit-max-records: must be at least 1");
        }
        out.max_records = n;
    }
    Ok(out)
}

/// How often audit retention runs (and once at start).
const RETENTION_EVERY: Duration = Duration::from_secs(600);
/// The window over which refusals are counted into one record per peer.
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

fn run_serve(flags: ServeArgs) -> anyhow::Result<()> {
    cli::quiet_tss();
    let file = match &flags.config {
        Some(path) => read_toml(path).map_err(|e| anyhow::anyhow!(e))?,
        None => ServeArgs::default(),
    };
    let args = flags.or(file);
    let mut problems = Vec::new();
    if args.data_dir.is_none() {
        problems.push("--data-dir is required".to_owned());
    }
    if args.listen.is_none() {
        problems.push("--listen is required (e.g. 0.0.0.0:8443)".to_owned());
    }
    let sealer = args.sealer();
    if let Err(e) = sealer.validate() {
        problems.extend(e.0);
    }
    let etcd = args.etcd();
    if let Some(cfg) = &etcd {
        problems.extend(cfg.problems());
    } else if args.etcd_endpoints.is_some() {
        problems.push("--etcd-endpoints needs --store etcd".to_owned());
    }
    if !problems.is_empty() {
        return Err(Usage(problems.join("; ")).into());
    }
    let (Some(data_dir), Some(listen)) = (args.data_dir.clone(), args.listen) else {
        anyhow::bail!("--data-dir and --listen are required");
    };
    let rotate = auto_rotate(&args)?;
    let heartbeat = args
        .heartbeat
        .as_deref()
        .map(|v| duration("heartbeat", v))
        .transpose()?
        .unwrap_or(Duration::from_secs(15));
    let retention = retention(&args)?;
    let min_grace_secs = match args.min_retire_grace.as_deref() {
        None => edgekms_core::rotation::MIN_GRACE_SECS,
        Some(v) => edgekms_daemon::duration::parse(v)
            .map_err(|e| Usage(format!("--min-retire-grace: {e}")))?
            .as_secs(),
    };
    cli::init_logging(args.log_format.unwrap_or_default() == LogFormat::Json);
    if let Err(e) = edgekms_hsm::memory::harden_process() {
        tracing::warn!(error = %e, "cannot disable core dumps for this process");
    }
    let fds = cli::raise_fd_limit();
    let mut limits = service::default_limits();
    if let Some(n) = args.max_connections {
        if n == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        limits.max_connections = n;
    }
    if let Some(n) = args.max_unauthenticated_per_peer {
        if n == 0 {
            anyhow::bail!("--max-unauthenticated-per-peer must be at least 1");
        }
        limits.max_unauthenticated_per_peer = n;
    }
    cli::log_connection_limits(limits.max_connections, fds);
    tracing::info!(
        max_unauthenticated_per_peer = limits.max_unauthenticated_per_peer,
        "connection limits per peer"
    );
    let open = Open {
        data_dir,
        etcd,
        listen,
        sealer,
        auto_rotate: rotate,
        heartbeat,
        retention,
        min_grace_secs,
    };
    serve(open, listen, args.metrics(), limits)
}

/// How to open the data dir (unsealing the root key).
struct Open {
    data_dir: PathBuf,
    /// Replicated mode.
    etcd: Option<EtcdConfig>,
    listen: SocketAddr,
    sealer: SealerConfig,
    auto_rotate: AutoRotate,
    heartbeat: Duration,
    retention: Retention,
    min_grace_secs: u64,
}

impl Open {
    fn open(self) -> anyhow::Result<Central> {
        let sealer = init::serve_sealer(&self.data_dir, &self.sealer)?;
        let mut core = match &self.etcd {
            None => {
                if init::is_replica_dir(&self.data_dir) {
                    return Err(Usage(format!(
                        "{} is an etcd replica's data dir: serve it with --store etcd",
                        self.data_dir.display()
                    ))
                    .into());
                }
                init::open(&self.data_dir, sealer.as_ref())?
            }
            Some(cfg) => {
                let store = std::sync::Arc::new(EtcdStore::connect(cfg)?);
                init::open_etcd(
                    &self.data_dir,
                    sealer.as_ref(),
                    store,
                    self.listen.to_string(),
                )?
            }
        };
        core.auto_rotate = self.auto_rotate;
        core.heartbeat = self.heartbeat;
        core.min_grace_secs = self.min_grace_secs;
        Ok(core)
    }
}

/// `/readyz`: 503 "starting" until the root key is unsealed, the state
/// loaded and the gRPC listener bound; 503 "stopping" once shutting down;
/// on etcd, 503 with the reason while etcd cannot answer a read.
/// `/metrics`: the server's metrics, gauges from the loaded state.
fn handlers(core: Arc<OnceLock<Arc<Central>>>, stopping: Arc<AtomicBool>) -> Handlers {
    let for_metrics = core.clone();
    Handlers::new(
        move || match core.get() {
            None => Err("starting".to_owned()),
            Some(_) if stopping.load(Ordering::SeqCst) => Err("stopping".to_owned()),
            // Replicated: 503 while etcd has no quorum (writes would fail).
            Some(core) => core.store_health(),
        },
        move || {
            let mut text = metrics::render(for_metrics.get().map(|c| c.as_ref()));
            text.push_str(&edgekms_daemon::conn::render_metrics());
            text
        },
    )
}

fn serve(
    open: Open,
    listen: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    limits: edgekms_daemon::conn::Limits,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let data_dir = open.data_dir.clone();
    runtime.block_on(async move {
        // Up before unsealing (which may wait on a busy TPM): /healthz
        // answers at once, /readyz says "starting" until the state is open.
        let ready: Arc<OnceLock<Arc<Central>>> = Arc::default();
        let stopping = Arc::new(AtomicBool::new(false));
        if let Some(addr) = metrics_addr {
            let ops = OpsServer::bind(addr).await?;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the metrics and health endpoint has no authentication and is reachable from other hosts");
            }
            tracing::info!(addr = %ops.local_addr(), "serving /metrics, /healthz and /readyz");
            tokio::spawn(ops.serve(handlers(ready.clone(), stopping.clone())));
        }
        let retention = open.retention;
        let core = tokio::task::spawn_blocking(move || {
            let core = open.open()?;
            // Before serving: a store that grew past its limits while the
            // server was down is trimmed first (on etcd, by the leader).
            if core.replication().is_none() {
                core.audit_log().apply_retention(retention)?;
            }
            anyhow::Ok(core)
        })
        .await
        .map_err(|e| anyhow::anyhow!("unsealing stopped: {e}"))??;
        let core = Arc::new(core);
        tokio::spawn(core.follow_store());
        let keeper = core.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETENTION_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                if !keeper.leads() {
                    continue;
                }
                let core = keeper.clone();
                let done = tokio::task::spawn_blocking(move || core.audit_log().apply_retention(retention)).await;
                if let Ok(Err(e)) = done {
                    tracing::error!(error = %e, "audit retention failed");
                }
            }
        });
        let counter = core.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFUSAL_WINDOW);
            tick.tick().await;
            loop {
                tick.tick().await;
                counter.audit_log().flush_refusals();
            }
        });
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let ticker = core.clone();
        // Often enough for the shortest configured interval, at most 10 s.
        let shortest = core
            .auto_rotate
            .clusters
            .values()
            .flatten()
            .chain(core.auto_rotate.default.iter())
            .min()
            .copied()
            .unwrap_or(Duration::from_secs(40));
        let period = (shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
        tokio::spawn(async move {
            // Not at start-up: a rotation falls due from the recorded time
            // of the last one, and the first look comes one period in.
            let first = tokio::time::Instant::now() + period;
            let mut tick = tokio::time::interval_at(first, period);
            loop {
                tick.tick().await;
                if ticker.leads() {
                    let core = ticker.clone();
                    let _ = tokio::task::spawn_blocking(move || core.auto_rotate_due()).await;
                }
            }
        });
        // Grace periods end on time to within a few seconds; the check
        // reads only the in-memory view.
        let reaper = core.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                if !reaper.leads() {
                    continue;
                }
                let core = reaper.clone();
                let _ = tokio::task::spawn_blocking(move || core.destroy_due()).await;
            }
        });
        tracing::info!(
            listen = %listener.local_addr().unwrap_or(listen),
            data_dir = %data_dir.display(),
            "serving"
        );
        let _ = ready.set(core.clone());
        let removed = Arc::new(AtomicBool::new(false));
        let mut removal = core.replication().map(|s| s.removed());
        let (gone, stop) = (removed.clone(), stopping.clone());
        let shutdown = async move {
            let removal = async {
                match removal.as_mut() {
                    Some(rx) => {
                        let _ = rx.wait_for(|r| *r).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = cli::shutdown_signal() => {}
                _ = removal => gone.store(true, Ordering::SeqCst),
            }
            stop.store(true, Ordering::SeqCst);
        };
        let result = service::serve_with(core.clone(), listener, limits, shutdown).await;
        // Refusals counted but not yet kept are kept now.
        core.audit_log().flush_refusals();
        if removed.load(Ordering::SeqCst) {
            init::erase_replica_root(&data_dir)?;
            anyhow::bail!(
                "this replica was removed from the service (`kmsctl replica remove`): stopped, and its sealed root key was erased from {}",
                data_dir.display()
            );
        }
        result.map_err(|e| anyhow::anyhow!("server failed: {e}"))?;
        tracing::info!("stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_flag_wins_over_the_file() {
        let off_in_file: ServeArgs = toml::from_str("no_metrics = true").unwrap();
        let flag = ServeArgs {
            metrics_addr: Some("127.0.0.1:9300".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            flag.or(off_in_file.clone()).metrics(),
            Some("127.0.0.1:9300".parse().unwrap())
        );
        assert_eq!(ServeArgs::default().or(off_in_file).metrics(), None);
        let on_in_file: ServeArgs = toml::from_str("metrics_addr = \"127.0.0.1:9100\"").unwrap();
        let off_flag = ServeArgs {
            no_metrics: true,
            ..Default::default()
        };
        assert_eq!(off_flag.or(on_in_file).metrics(), None);
    }

    #[test]
    fn sealer_options_come_from_flags_or_the_file() {
        let file: ServeArgs = toml::from_str(
            "sealer = \"tpm\"\ntpm_pcrs = \"sha256:7\"\ntpm_owner_auth_file = \"/etc/edgekms/owner\"",
        )
        .unwrap();
        let flags = ServeArgs {
            tpm_tcti: Some("swtpm:host=127.0.0.1,port=2321".into()),
            ..Default::default()
        };
        let cfg = flags.or(file).sealer();
        assert_eq!(
            cfg,
            SealerConfig {
                kind: SealerKind::Tpm,
                tpm_tcti: Some("swtpm:host=127.0.0.1,port=2321".into()),
                tpm_pcrs: Some("sha256:7".into()),
                tpm_owner_auth_file: Some("/etc/edgekms/owner".into()),
            }
        );
        assert!(cfg.validate().is_ok());
        let soft: ServeArgs = toml::from_str("sealer = \"soft\"\ntpm_pcrs = \"sha256:7\"").unwrap();
        let e = soft.sealer().validate().unwrap_err().to_string();
        assert!(e.contains("--sealer is soft"), "{e}");
        assert!(toml::from_str::<ServeArgs>("tpm_pcr = \"sha256:7\"").is_err());
    }

    #[test]
    fn init_and_restore_take_the_nodes_tpm_options() {
        let cli = Cli::try_parse_from([
            "edgekms-server",
            "init",
            "--data-dir",
            "/d",
            "--tpm-pcrs",
            "sha256:7",
            "--tpm-owner-auth-file",
            "/etc/owner",
        ])
        .unwrap();
        let Some(Command::Init(init)) = cli.command else {
            panic!("not init: {cli:?}")
        };
        let cfg = init.sealer.config().unwrap();
        assert_eq!(cfg.kind, SealerKind::Tpm);
        assert_eq!(cfg.tcti(), edgekms_hsm::DEFAULT_TCTI);
        assert_eq!(cfg.tpm_pcrs.as_deref(), Some("sha256:7"));
        let cli = Cli::try_parse_from([
            "edgekms-server",
            "restore",
            "b.bak",
            "--key-file",
            "k",
            "--data-dir",
            "/d",
            "--sealer",
            "soft",
            "--tpm-pcrs",
            "sha256:7",
        ])
        .unwrap();
        let Some(Command::Restore(restore)) = cli.command else {
            panic!("not restore: {cli:?}")
        };
        let e = restore.sealer.config().unwrap_err();
        assert!(e.downcast_ref::<Usage>().is_some(), "{e}");
        assert!(e.to_string().contains("--sealer is soft"), "{e}");
    }

    /// The example config in deploy/ parses with the real settings, and
    /// names a valid etcd store.
    #[test]
    fn the_shipped_etcd_config_is_valid() {
        let file: ServeArgs =
            toml::from_str(include_str!("../../../deploy/server/server-etcd.toml")).unwrap();
        let cfg = ServeArgs::default().or(file).etcd().unwrap();
        assert_eq!(cfg.endpoints.len(), 3);
        assert_eq!(cfg.prefix, etcd::DEFAULT_PREFIX);
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        // Plaintext needs the test-only switch.
        let plain: ServeArgs =
            toml::from_str("store = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]")
                .unwrap();
        let e = plain.etcd().unwrap().problems().join(";");
        assert!(e.contains("plaintext etcd is refused"), "{e}");
        // etcd flags without the etcd store are refused at serve.
        let cli =
            Cli::try_parse_from(["edgekms-server", "--etcd-endpoints", "https://e:2379"]).unwrap();
        assert!(cli.serve.etcd().is_none());
    }

    #[test]
    fn zero_durations_are_usage_errors() {
        for (flag, value) in [("heartbeat", "0s"), ("auto-rotate-every", "0d")] {
            let e = duration(flag, value).unwrap_err();
            assert!(e.downcast_ref::<Usage>().is_some(), "{e}");
            assert!(
                e.to_string().contains(flag) && e.to_string().contains("at least 1s"),
                "{e}"
            );
        }
        let args: ServeArgs = toml::from_str("[cluster_auto_rotate]\nedge-1 = \"0s\"").unwrap();
        assert!(auto_rotate(&args).is_err());
        assert_eq!(
            duration("heartbeat", "15s").unwrap(),
            Duration::from_secs(15)
        );
    }
}
