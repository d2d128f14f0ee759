//! A real `edgekms-plugin` for a test: its command line, temporary sockets
//! and data dir, a free loopback port for its metrics and health endpoint,
//! waits for it to be live, serving or healthy, and its stop, kill and
//! restart; and the `kmsctl` CLI. The process itself is an
//! `edgekms_testkit::process::Daemon`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use edgekms_proto::kms_v2::{StatusRequest, StatusResponse};
use edgekms_testkit::process::{command_with_nofile, target_bin as bin, without_terminal, Daemon};

use super::kms::{self, Admin, Kms};
use super::{free_port, http, poll_until};

/// How long the plugin may take to stop on SIGTERM, or to exit by itself.
const EXIT_WITHIN: Duration = Duration::from_secs(15);

/// A running `edgekms-plugin`, killed on drop.
pub struct Plugin {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    /// The metrics and health endpoint; `None` with `--no-metrics`.
    pub metrics_addr: Option<SocketAddr>,
    daemon: Daemon,
}

impl Plugin {
    /// Arguments for a soft-sealed plugin of `cluster` under `dir`.
    pub fn soft_args(dir: &Path, cluster: &str) -> Vec<String> {
        vec![
            "--socket".into(),
            dir.join("run/kms.sock").display().to_string(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--cluster".into(),
            cluster.into(),
            "--node".into(),
            "node-1".into(),
            "--sealer".into(),
            "soft".into(),
            // Tests retire with `--grace 1s`.
            "--min-retire-grace".into(),
            "1s".into(),
        ]
    }

    /// Starts a soft-sealed plugin and waits for healthz "ok".
    pub async fn start(dir: &Path, cluster: &str) -> Self {
        let p = Self::spawn(dir, Self::soft_args(dir, cluster));
        p.wait_healthy().await;
        p
    }

    /// Starts the plugin with `args`, logging to `dir/plugin.log` (appended).
    /// Unless `args` name `--metrics-addr` or `--no-metrics`, the metrics
    /// and health endpoint goes to a free loopback port (kept on restart),
    /// so that tests running side by side never share the default port.
    pub fn spawn(dir: &Path, args: Vec<String>) -> Self {
        Self::spawn_with_env(dir, args, &[])
    }

    /// [`Plugin::spawn`] with extra environment (e.g. a failpoint).
    pub fn spawn_with_env(dir: &Path, args: Vec<String>, env: &[(&str, &str)]) -> Self {
        Self::spawn_limited(dir, args, env, None)
    }

    /// [`Plugin::spawn_with_env`] under an open-file limit of `nofile`
    /// (soft and hard, via prlimit) when one is given.
    pub fn spawn_limited(
        dir: &Path,
        mut args: Vec<String>,
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        if !args
            .iter()
            .any(|a| a == "--metrics-addr" || a == "--no-metrics")
        {
            args.extend([
                "--metrics-addr".into(),
                format!("127.0.0.1:{}", free_port()),
            ]);
        }
        let log = dir.join("plugin.log");
        let arg = |flag: &str, default: PathBuf| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| PathBuf::from(&args[i + 1]))
                .unwrap_or(default)
        };
        let socket = arg("--socket", dir.join("run/kms.sock"));
        let admin_socket = arg("--admin-socket", socket.with_file_name("admin.sock"));
        let data_dir = arg("--data-dir", dir.join("data"));
        let metrics_addr = args
            .iter()
            .position(|a| a == "--metrics-addr")
            .map(|i| args[i + 1].parse().unwrap())
            .filter(|_| !args.iter().any(|a| a == "--no-metrics"));
        let mut cmd = without_terminal(command_with_nofile(&bin("edgekms-plugin"), nofile));
        cmd.args(&args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        let daemon = Daemon::spawn("plugin", cmd, &log);
        Self {
            dir: dir.to_owned(),
            socket,
            admin_socket,
            data_dir,
            args,
            metrics_addr,
            daemon,
        }
    }

    /// The metrics and health endpoint (panics under `--no-metrics`).
    pub fn ops_addr(&self) -> SocketAddr {
        self.metrics_addr
            .expect("this plugin runs with --no-metrics")
    }

    /// GET `path` on the metrics and health endpoint: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http::http_get(self.ops_addr(), path).await.unwrap()
    }

    /// Scrapes `/metrics` and parses it as the Prometheus text format.
    pub async fn scrape(&self) -> prometheus_parse::Scrape {
        http::scrape(self.ops_addr()).await
    }

    /// Waits until `/healthz` answers 200 (10 s at most).
    pub async fn wait_live(&self) {
        http::wait_200(
            "no /healthz",
            10,
            || self.log_text(),
            self.ops_addr(),
            "/healthz",
        )
        .await;
    }

    /// Waits until Status says "ok" (10 s at most).
    pub async fn wait_healthy(&self) {
        self.wait_status("plugin not healthy", |s| s.healthz == "ok")
            .await;
    }

    /// Waits until the KMS socket answers at all (whatever healthz says).
    pub async fn wait_serving(&self) {
        self.wait_status("plugin not serving", |_| true).await;
    }

    /// Waits until Status answers and `ok` holds of the answer (10 s at
    /// most).
    async fn wait_status(&self, what: &str, ok: impl Fn(&StatusResponse) -> bool) {
        let ok = &ok;
        poll_until(
            what,
            10,
            || self.log_text(),
            || async move {
                match self.try_kms().await {
                    Ok(mut kms) => kms
                        .status(StatusRequest {})
                        .await
                        .is_ok_and(|s| ok(s.get_ref())),
                    Err(_) => false,
                }
            },
        )
        .await;
    }

    pub async fn try_kms(&self) -> Result<Kms, tonic::transport::Error> {
        kms::try_kms(&self.socket).await
    }

    pub async fn kms(&self) -> Kms {
        self.try_kms().await.unwrap()
    }

    pub async fn admin(&self) -> Admin {
        kms::admin(&self.admin_socket).await
    }

    /// `dir/plugin.log`, where its output goes.
    pub fn log(&self) -> &Path {
        self.daemon.log()
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// SIGTERM, then waits for exit; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        self.daemon.stop(EXIT_WITHIN).and_then(|s| s.code())
    }

    /// SIGKILL, as `kill -9`.
    pub fn kill9(&mut self) {
        self.daemon.kill();
    }

    /// Whether the process has exited by itself within `within`.
    pub fn died_within(&mut self, within: Duration) -> bool {
        !self.daemon.is_running() || self.daemon.exited_within(within).is_some()
    }

    /// Waits for the process to exit by itself (e.g. on a start-up error).
    pub fn wait_exit(&mut self) -> Option<i32> {
        self.daemon.wait_exit(EXIT_WITHIN).and_then(|s| s.code())
    }

    /// Starts again with the same arguments.
    pub async fn restart(&mut self) {
        assert_eq!(self.stop(), Some(0));
        *self = Self::spawn(&self.dir.clone(), self.args.clone());
        self.wait_healthy().await;
    }
}

/// Runs `kmsctl` with `args`.
pub fn kmsctl(args: &[&str]) -> Output {
    Command::new(bin("kmsctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `kmsctl` and parses its `-o json` output, asserting success.
pub fn kmsctl_json(args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-o", "json"]);
    let out = kmsctl(&all);
    assert!(
        out.status.success(),
        "kmsctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
