//! `edgekms-server`: the central key service. `init` creates a data dir;
//! without a subcommand it serves. Everything else lives in
//! `edgekms_kms::server`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use edgekms_kms::server::init::{self, SealerKind};
use edgekms_kms::server::{service, AutoRotate};
use serde::Deserialize;

const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// The edgekms central key service: enrols nodes, delivers KEK versions
/// wrapped to each node, and rotates them cluster by cluster (mTLS gRPC).
#[derive(Debug, Parser)]
#[command(name = "edgekms-server", version, args_conflicts_with_subcommands = true)]
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Data directory to create (state store, sealed root key, operator/)
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Where the root key is sealed: tpm, or soft (INSECURE, development)
    #[arg(long, value_enum, default_value = "tpm")]
    sealer: SealerKind,
    /// TPM TCTI (device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321, ...)
    #[arg(long, value_name = "TCTI", default_value = DEFAULT_TCTI)]
    tpm_tcti: String,
    /// Extra DNS name or IP address nodes dial the server by (repeatable);
    /// localhost, 127.0.0.1, ::1 and the host name are always included
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
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
    #[arg(long, value_enum)]
    sealer: Option<SealerKind>,
    /// TPM TCTI [default: device:/dev/tpmrm0]
    #[arg(long, value_name = "TCTI")]
    tpm_tcti: Option<String>,
    /// Rotate every cluster automatically this often (e.g. 90d) [default: off]
    #[arg(long, value_name = "DURATION")]
    auto_rotate_every: Option<String>,
    /// Per-cluster automatic rotation (config file only)
    #[arg(skip)]
    cluster_auto_rotate: BTreeMap<String, String>,
    /// How often each node stream gets a heartbeat [default: 15s]
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,
    /// Log format [default: text]
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

impl ServeArgs {
    fn or(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            config: self.config,
            data_dir: self.data_dir.or(file.data_dir),
            listen: self.listen.or(file.listen),
            sealer: self.sealer.or(file.sealer),
            tpm_tcti: self.tpm_tcti.or(file.tpm_tcti),
            auto_rotate_every: self.auto_rotate_every.or(file.auto_rotate_every),
            cluster_auto_rotate: file.cluster_auto_rotate,
            heartbeat: self.heartbeat.or(file.heartbeat),
            log_format: self.log_format.or(file.log_format),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Some(Command::Init(args)) => run_init(args),
        None => run_serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgekms-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn quiet_tss() {
    // The TSS C library prints its own warnings for every TPM error; ours
    // name the cause. Still single-threaded here.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
}

fn run_init(args: InitArgs) -> anyhow::Result<()> {
    quiet_tss();
    init_logging(LogFormat::Text);
    let sealer = init::sealer(&args.data_dir, args.sealer, &args.tpm_tcti)?;
    let names = init::server_names(&args.sans);
    let done = init::init(&args.data_dir, sealer.as_ref(), &names)?;
    println!(
        "initialized {dir}\n  root key sealed by: {sealer}\n  server certificate names: {names}\n  CA hash (for `edgekms-plugin join --ca-hash`): {hash}\n  operator credentials: {op}/{{ca.pem,cert.pem,key.pem}}\n    (move them to the operator's machine; key.pem is the operator's key)",
        dir = args.data_dir.display(),
        sealer = sealer.name(),
        names = done.server_names.join(", "),
        hash = done.ca_hash,
        op = done.operator_dir.display(),
    );
    Ok(())
}

fn duration(flag: &str, value: &str) -> anyhow::Result<Duration> {
    edgekms_kms::duration::parse(value).with_context(|| format!("--{flag}"))
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

/// A server with thousands of nodes holds one socket per node.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn run_serve(flags: ServeArgs) -> anyhow::Result<()> {
    quiet_tss();
    let file = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("config {}: {}", path.display(), e.message()))?
        }
        None => ServeArgs::default(),
    };
    let args = flags.or(file);
    let mut problems = Vec::new();
    if args.data_dir.is_none() {
        problems.push("--data-dir is required");
    }
    if args.listen.is_none() {
        problems.push("--listen is required (e.g. 0.0.0.0:8443)");
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
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
    init_logging(args.log_format.unwrap_or_default());
    if let Err(e) = edgekms_hsm::memory::harden_process() {
        tracing::warn!(error = %e, "cannot disable core dumps for this process");
    }
    raise_fd_limit();
    let sealer = init::sealer(
        &data_dir,
        args.sealer.unwrap_or(SealerKind::Tpm),
        args.tpm_tcti.as_deref().unwrap_or(DEFAULT_TCTI),
    )?;
    let mut core = init::open(&data_dir, sealer.as_ref())?;
    core.auto_rotate = rotate;
    core.heartbeat = heartbeat;
    let core = Arc::new(core);
    serve(core, listen, &data_dir)
}

fn serve(core: Arc<edgekms_kms::server::Core>, listen: SocketAddr, data_dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
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
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                ticker.auto_rotate_due();
            }
        });
        tracing::info!(
            listen = %listener.local_addr().unwrap_or(listen),
            data_dir = %data_dir.display(),
            "serving"
        );
        service::serve(core, listener, shutdown_signal())
            .await
            .map_err(|e| anyhow::anyhow!("server failed: {e}"))?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}
