//! What the three binaries (`edgekms-plugin`, `edgekms-server`, `kmsctl`)
//! do alike at start and stop: parse flags with one-line errors, set up
//! logging, quiet the TSS library, raise the open-file limit, wait for
//! SIGTERM/SIGINT.

use std::process::ExitCode;

/// Parses the command line. On `--help`/`--version` prints and exits 0; on
/// bad usage prints clap's first line (not the whole usage block), exit 2.
pub fn parse<C: clap::Parser>() -> Result<C, ExitCode> {
    match C::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
            Err(ExitCode::from(2))
        }
    }
}

/// Logs to stderr, levels from `RUST_LOG` (default info), text or JSON.
/// Text fields go through [`crate::logfmt::SafeFields`]: escaped and
/// bounded, one line per event (JSON escapes by itself). Colours only on
/// a terminal, so that a log file holds no escape sequences of ours.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.fmt_fields(crate::logfmt::SafeFields).init();
    }
}

/// The TSS C library prints its own warnings for every TPM error; ours name
/// the cause and the fix. Call while still single-threaded.
pub fn quiet_tss() {
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
}

/// Raises the soft open-file limit to the hard one (one socket per node,
/// for the server and the fleet benchmark); returns the soft limit now.
pub fn raise_fd_limit() -> u64 {
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
    lim.rlim_cur
}

/// Logs the connection cap against the open-file limit at start, warning
/// when the cap is above it (accept then fails before the cap is reached).
pub fn log_connection_limits(max_connections: usize, open_file_limit: u64) {
    if u64::try_from(max_connections).unwrap_or(u64::MAX) > open_file_limit {
        tracing::warn!(
            max_connections,
            open_file_limit,
            "--max-connections is above the open-file limit: beyond it accept fails and idle connections are shed; raise LimitNOFILE"
        );
    }
    tracing::info!(max_connections, open_file_limit, "connection limits");
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
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

/// A one-time join token from `--token`, or read from `--token-file`
/// (which keeps it out of the process list); held in zeroizing memory.
pub fn join_token(
    token: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<zeroize::Zeroizing<String>> {
    match (token, file) {
        (Some(token), _) => Ok(zeroize::Zeroizing::new(token.to_owned())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| anyhow::anyhow!("cannot read --token-file {}: {e}", path.display())),
        (None, None) => anyhow::bail!("--token or --token-file is required"),
    }
}
