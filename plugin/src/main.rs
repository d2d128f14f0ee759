//! `edgekms-plugin`: the node daemon. Parses flags, hardens the process,
//! starts the metrics and health endpoint, unseals, and serves; everything
//! else lives in the library.

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::Parser;
use edgekms_daemon::cli;
use edgekms_daemon::config::LogFormat;
use edgekms_daemon::ops::{Handlers, OpsServer};
use edgekms_plugin::config::{Config, Settings};
use edgekms_plugin::metrics;
use edgekms_plugin::node::{sealer_from_config, Node};
use edgekms_plugin::{backup, socket, sync};

/// Kubernetes KMS v2 plugin: wraps kube-apiserver's DEK seeds with KEKs kept
/// in a local cache and sealed to this node's TPM.
#[derive(Debug, Parser)]
#[command(
    name = "edgekms-plugin",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file with the same keys as the flags (data_dir, tpm_tcti, ...); flags win
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Enrol this node with the central key service (once), then receive its cluster's keys
    Join(JoinArgs),
    /// Restore a standalone node's keys from a `kmsctl local backup` file into an empty data dir (run it with the plugin stopped)
    Restore(RestoreArgs),
}

#[derive(Debug, clap::Args)]
struct RestoreArgs {
    /// The backup file written by `kmsctl local backup`
    #[arg(long, value_name = "FILE")]
    from: std::path::PathBuf,
    /// File holding the backup key the file was made with (64 hex digits)
    #[arg(long, value_name = "KEYFILE")]
    key_file: std::path::PathBuf,
    /// TOML config file with the same keys as the flags; flags win
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// The central key service, https://HOST:PORT; replicas: several URLs, comma-separated or with the flag repeated, tried in order (a host with several addresses at each), all kept for the sync
    #[arg(
        long = "server",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true
    )]
    servers: Vec<String>,
    /// The one-time join token from `kmsctl node add`
    #[arg(
        long,
        value_name = "TOKEN",
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// Read the join token from this file instead (keeps it out of the process list)
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// The service CA's public-key hash from `kmsctl node add` (sha256:HEX)
    #[arg(long, value_name = "sha256:HEX")]
    ca_hash: String,
    /// TOML config file with the same keys as the flags; flags win
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    let cli = match cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Some(Command::Join(args)) => run_join(args),
        Some(Command::Restore(args)) => run_restore(args),
        None => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors carry their cause in their own message.
            eprintln!("edgekms-plugin: {e}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A bad flag or config value: exit code 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// Flags over the config file, validated; then logging and hardening.
fn prepare(config: Option<&std::path::Path>, settings: Settings) -> anyhow::Result<Config> {
    cli::quiet_tss();
    // RocksDB and the sealers create files with the process umask: private.
    edgekms_daemon::durable::private_umask();
    let file = match config {
        Some(path) => Settings::from_file(path).map_err(Usage)?,
        None => Settings::default(),
    };
    let cfg = settings.or(file).validate().map_err(Usage)?;
    cli::init_logging(cfg.log_format == LogFormat::Json);
    if let Err(e) = edgekms_hsm::memory::harden_process() {
        tracing::warn!(error = %e, "cannot disable core dumps for this process");
    }
    Ok(cfg)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

fn run_join(args: JoinArgs) -> anyhow::Result<()> {
    let token = cli::join_token(args.token.as_deref(), args.token_file.as_deref())?;
    // A bad URL is a usage error, found before anything is made.
    for url in &args.servers {
        edgekms_daemon::tls::Target::parse(url).map_err(|e| Usage(e.to_string()))?;
    }
    let cfg = prepare(args.config.as_deref(), args.settings)?;
    let joined = runtime()?.block_on(sync::join(&cfg, &args.servers, &token, &args.ca_hash))?;
    println!(
        "joined: node {}/{} is enrolled with {}",
        joined.cluster, joined.node, joined.server
    );
    match joined.first_sync {
        Ok(()) => println!(
            "holds versions {:?}, primary v{}; start the plugin with --data-dir {} and it syncs by itself",
            joined.holding.numbers(),
            joined.holding.primary,
            cfg.data_dir.display()
        ),
        Err(e) => println!(
            "enrolled, but the first sync failed ({e}); the plugin started with --data-dir {} retries by itself",
            cfg.data_dir.display()
        ),
    }
    Ok(())
}

fn run_restore(args: RestoreArgs) -> anyhow::Result<()> {
    let key = edgekms_daemon::config::read_key_file(&args.key_file)?;
    let cfg = prepare(args.config.as_deref(), args.settings)?;
    let blob = std::fs::read(&args.from)
        .map_err(|e| anyhow::anyhow!("cannot read --from {}: {e}", args.from.display()))?;
    let dump = backup::open(&blob, &key)?;
    if !cfg.cluster.is_empty() && cfg.cluster != dump.cluster {
        return Err(backup::RestoreError::Cluster {
            backup: dump.cluster,
            configured: cfg.cluster,
        }
        .into());
    }
    // Refuse an existing --recovery-passphrase-file before anything is made.
    let passphrase_out =
        edgekms_plugin::recovery::PassphraseOut::prepare(cfg.recovery_passphrase_file.as_deref())?;
    let restored = match backup::restore(&dump, &cfg.data_dir, |dir| {
        let mut cfg = cfg.clone();
        cfg.data_dir = dir.to_owned();
        cfg.cluster = dump.cluster.clone();
        sealer_from_config(&cfg)
    }) {
        Ok(restored) => restored,
        Err(e) => {
            edgekms_plugin::recovery::PassphraseOut::abandon(
                cfg.recovery_passphrase_file.as_deref(),
            );
            return Err(e.into());
        }
    };
    println!(
        "restored cluster {} into {}: {} key versions, primary {}; the next rotation makes version {} (versions the lost node may have made after the backup are never reused)",
        dump.cluster,
        cfg.data_dir.display(),
        restored.versions,
        restored
            .primary
            .as_ref()
            .map_or_else(|| "none".to_owned(), |(v, id)| format!("v{v} {id}")),
        restored.next_version
    );
    passphrase_out.write(&restored.passphrase)?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = prepare(cli.config.as_deref(), cli.settings)?;
    edgekms_plugin::node::require_cluster(&cfg)?;
    // One descriptor per connection: as many as the hard limit allows.
    let fds = cli::raise_fd_limit();
    let limits = socket::limits(cfg.max_connections);
    cli::log_connection_limits(limits.max_connections, fds);

    runtime()?.block_on(async {
        // Up before unsealing (which may wait on a busy TPM): /healthz
        // answers at once, /readyz says "starting" until the node is open.
        let opened: Arc<OnceLock<Arc<Node>>> = Arc::default();
        if let Some(addr) = cfg.metrics_addr {
            let ops = OpsServer::bind(addr).await?;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the metrics and health endpoint has no authentication and is reachable from other hosts");
            }
            tracing::info!(addr = %ops.local_addr(), "serving /metrics, /healthz and /readyz");
            tokio::spawn(ops.serve(handlers(opened.clone())));
        }
        let node = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || {
                let sealer = sealer_from_config(&cfg)?;
                Node::open(&cfg, sealer)
            })
            .await
            .map_err(|e| anyhow::anyhow!("unsealing stopped: {e}"))??
        };
        let node = Arc::new(node);
        let _ = opened.set(node.clone());
        // Bound only now that keys are loaded: a connecting apiserver finds a
        // plugin that can answer.
        let kms = socket::bind(&cfg.socket)?;
        let admin = socket::bind(&cfg.admin_socket)?;
        tokio::spawn(sync::run(
            node.clone(),
            cfg.sync_backoff_max,
            cfg.servers.clone(),
        ));
        tokio::spawn(destroy_when_due(node.clone()));
        if let Some(schedule) = cfg.census.clone() {
            tokio::spawn(edgekms_plugin::census::run(node.clone(), schedule));
        }
        socket::serve(node, kms, admin, limits, cli::shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// A standalone node destroys each disabled version once its grace period
/// is over (a joined node waits for the central service to say so). Checked
/// every few seconds: cheap, and a short test grace ends on time.
async fn destroy_when_due(node: Arc<Node>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        let n = node.clone();
        let now = edgekms_daemon::config::now_unix();
        match tokio::task::spawn_blocking(move || n.destroy_due(now)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "destroying a disabled version failed; retrying")
            }
            Err(e) => tracing::warn!(error = %e, "the destruction task failed"),
        }
    }
}

/// `/readyz` answers exactly what KMS Status reports as healthz ("ok", or
/// the reason), and "starting" until the node is open; `/metrics` renders
/// the plugin's metrics with `edgekms_ready` computed the same way.
fn handlers(opened: Arc<OnceLock<Arc<Node>>>) -> Handlers {
    let ready = move || match opened.get() {
        None => Err("starting".to_owned()),
        Some(node) => match node.status().0 {
            healthz if healthz == "ok" => Ok(()),
            reason => Err(reason),
        },
    };
    let ready = Arc::new(ready);
    let for_metrics = ready.clone();
    Handlers::new(
        move || ready(),
        move || {
            let mut text = metrics::render(for_metrics().is_ok());
            text.push_str(&edgekms_daemon::conn::render_metrics());
            text
        },
    )
}
