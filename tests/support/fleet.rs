//! Helpers for the central key service tests: a real `edgekms-server` on a
//! free loopback port, `kmsctl` against it, and plugins that join it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use edgekms_testkit::process::{command_with_nofile, Daemon};

use super::{bin, free_port, http, poll_until, Plugin};

/// A running `edgekms-server` (soft sealer) on free loopback ports, killed
/// on drop.
pub struct Server {
    pub data_dir: PathBuf,
    /// The gRPC address, kept across restarts.
    pub listen: SocketAddr,
    /// The metrics and health endpoint, unless the arguments chose one or
    /// turned it off.
    pub ops: SocketAddr,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Open-file limit (soft and hard) to start the process with, via prlimit.
    pub nofile: Option<u64>,
    /// The process; `None` before the first spawn.
    daemon: Option<Daemon>,
}

impl Server {
    /// `edgekms-server init --sealer soft` into `data_dir`.
    pub fn init(data_dir: &Path) {
        let out = Command::new(bin("edgekms-server"))
            .args(["init", "--sealer", "soft", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "init failed: {}", text(&out));
    }

    /// `init` in `dir/server`, then serve, ready.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[]).await
    }

    pub async fn start_with(dir: &Path, extra_args: &[&str]) -> Self {
        let data_dir = dir.join("server");
        Self::init(&data_dir);
        let s = Self::spawn(&data_dir, extra_args);
        s.wait_up().await;
        s
    }

    /// Serves an existing data dir (made by `init` or `restore`), ready.
    pub async fn serve(data_dir: &Path) -> Self {
        let s = Self::spawn(data_dir, &[]);
        s.wait_ready().await;
        s
    }

    /// Starts serving `data_dir` with `extra_args`, logging to
    /// `<data_dir>.log`; a free port for the metrics endpoint unless the
    /// arguments pick one, turn it off or read a config file.
    pub fn spawn(data_dir: &Path, extra_args: &[&str]) -> Self {
        let mut extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        if !extra_args
            .iter()
            .any(|a| ["--metrics-addr", "--no-metrics", "--config"].contains(&a.as_str()))
        {
            extra_args.extend(["--metrics-addr".into(), ops.to_string()]);
        }
        let mut s = Self {
            data_dir: data_dir.to_owned(),
            listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            ops,
            extra_args,
            env: Vec::new(),
            nofile: None,
            daemon: None,
        };
        s.respawn();
        s
    }

    /// [`Server::spawn`] under an open-file limit of `nofile` (soft and
    /// hard, so the server cannot raise it).
    pub fn spawn_with_nofile(data_dir: &Path, extra_args: &[&str], nofile: u64) -> Self {
        let mut s = Self::spawn(data_dir, extra_args);
        s.kill();
        s.nofile = Some(nofile);
        s.respawn();
        s
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    pub fn operator_dir(&self) -> PathBuf {
        self.data_dir.join("operator")
    }

    /// Starts the process (again) on the same address and data dir.
    pub fn respawn(&mut self) {
        let mut cmd = command_with_nofile(&bin("edgekms-server"), self.nofile);
        // A short minimum grace: tests retire with `--grace 1s`.
        cmd.args([
            "--sealer",
            "soft",
            "--heartbeat",
            "1s",
            "--min-retire-grace",
            "1s",
        ])
        .arg("--data-dir")
        .arg(&self.data_dir)
        .args(["--listen", &self.listen.to_string()])
        .args(&self.extra_args)
        .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "info");
        match &mut self.daemon {
            Some(d) => d.respawn(cmd),
            None => {
                let log = self.data_dir.with_extension("log");
                self.daemon = Some(Daemon::spawn("server", cmd, &log));
            }
        }
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("the server was never spawned")
    }

    /// `<data_dir>.log`, where its output goes.
    pub fn log(&self) -> &Path {
        self.daemon
            .as_ref()
            .expect("the server was never spawned")
            .log()
    }

    /// Waits until the service answers `kmsctl status`.
    pub async fn wait_up(&self) {
        poll_until(
            "server not up",
            15,
            || self.log_text(),
            || async { self.kmsctl(&["status"]).status.success() },
        )
        .await;
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        http::wait_200(
            "server not ready",
            15,
            || self.log_text(),
            self.ops,
            "/readyz",
        )
        .await;
    }

    /// Scrapes `/metrics` and parses it as the Prometheus text format.
    pub async fn scrape(&self) -> prometheus_parse::Scrape {
        http::scrape(self.ops).await
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.daemon
            .as_ref()
            .expect("the server was never spawned")
            .pid()
    }

    /// SIGKILL, as `kill -9`.
    pub fn kill(&mut self) {
        if let Some(d) = &mut self.daemon {
            d.kill();
        }
    }

    /// SIGTERM; returns the exit code. Async: the test's own client
    /// connections must keep running to close while the server drains.
    pub async fn stop(&mut self) -> Option<i32> {
        self.daemon()
            .stop_async(Duration::from_secs(15))
            .await
            .and_then(|s| s.code())
    }

    /// Waits up to `within` for the process to exit by itself (a failpoint,
    /// a start-up error); its exit status, or None if it still runs.
    pub fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        self.daemon().exited_within(within)
    }

    /// `kmsctl --server .. --operator-dir .. ARGS`.
    pub fn kmsctl(&self, args: &[&str]) -> Output {
        self.kmsctl_as(&self.operator_dir(), args)
    }

    /// `kmsctl` with the operator credentials in `operator_dir`.
    pub fn kmsctl_as(&self, operator_dir: &Path, args: &[&str]) -> Output {
        Command::new(bin("kmsctl"))
            .args(["--server", &self.url(), "--operator-dir"])
            .arg(operator_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `kmsctl ... -o json ARGS`, which must succeed.
    pub fn kmsctl_json(&self, args: &[&str]) -> serde_json::Value {
        self.kmsctl_json_as(&self.operator_dir(), args)
    }

    pub fn kmsctl_json_as(&self, operator_dir: &Path, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.kmsctl_as(operator_dir, &all);
        assert!(
            out.status.success(),
            "kmsctl {args:?}: {}\nserver log:\n{}",
            text(&out),
            self.log_text()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A one-time token for `cluster/node`: (token, ca_hash).
    pub fn add_node(&self, cluster: &str, node: &str) -> (String, String) {
        let v = self.kmsctl_json(&["node", "add", cluster, node]);
        (
            v["token"].as_str().unwrap().to_owned(),
            v["ca_hash"].as_str().unwrap().to_owned(),
        )
    }

    /// `kmsctl status CLUSTER -o json` of one cluster.
    pub fn cluster(&self, cluster: &str) -> serde_json::Value {
        self.kmsctl_json(&["status", cluster])["clusters"][0].clone()
    }

    /// The server's audit records.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.kmsctl_json(&["audit"]).as_array().unwrap().clone()
    }

    /// Polls `f` on the cluster status until true (15 s at most).
    pub async fn wait_cluster(
        &self,
        cluster: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let c = self.cluster(cluster);
            if f(&c) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status:\n{c:#}\nlog:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Plugin arguments for node `node` of `cluster` under `dir`, with fast
/// reconnects.
pub fn node_args(dir: &Path, cluster: &str, node: &str) -> Vec<String> {
    let mut args = Plugin::soft_args(dir, cluster);
    let i = args.iter().position(|a| a == "--node").unwrap();
    args[i + 1] = node.to_owned();
    args.extend(["--sync-backoff-max".into(), "1s".into()]);
    args
}

/// `edgekms-plugin join` for `cluster/node` into `dir`'s data dir.
pub fn join(
    server: &Server,
    dir: &Path,
    cluster: &str,
    node: &str,
    token: &str,
    ca_hash: &str,
) -> Output {
    join_at(&server.url(), dir, cluster, node, token, ca_hash)
}

/// [`join`] with `--server servers` as given (a comma-separated list).
pub fn join_at(
    servers: &str,
    dir: &Path,
    cluster: &str,
    node: &str,
    token: &str,
    ca_hash: &str,
) -> Output {
    std::fs::create_dir_all(dir).unwrap();
    Command::new(bin("edgekms-plugin"))
        .args([
            "join",
            "--server",
            servers,
            "--token",
            token,
            "--ca-hash",
            ca_hash,
        ])
        .args(node_args(dir, cluster, node))
        .output()
        .unwrap()
}

/// Enrols `cluster/node` (token, join) and starts its plugin, healthy.
pub async fn enrol(server: &Server, root: &Path, cluster: &str, node: &str) -> Plugin {
    let dir = root.join(format!("{cluster}-{node}"));
    let (token, hash) = server.add_node(cluster, node);
    let out = join(server, &dir, cluster, node, &token, &hash);
    assert!(out.status.success(), "join failed: {}", text(&out));
    let p = Plugin::spawn(&dir, node_args(&dir, cluster, node));
    p.wait_healthy().await;
    p
}

/// `kmsctl -o json local status` of a plugin.
pub fn local_status(p: &Plugin) -> serde_json::Value {
    let out = Command::new(bin("kmsctl"))
        .args(["-o", "json", "local", "--admin-socket"])
        .arg(&p.admin_socket)
        .arg("status")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `(version, state, key_id)` of every version in a JSON status object.
pub fn version_key_ids(status: &serde_json::Value) -> Vec<(u64, String, String)> {
    status["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["state"].as_str().unwrap().to_owned(),
                v["key_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `(version, state)` of every version in a JSON status object (a cluster
/// of `kmsctl status`, or `kmsctl local status`).
pub fn version_states(status: &serde_json::Value) -> Vec<(u64, String)> {
    version_key_ids(status)
        .into_iter()
        .map(|(version, state, _)| (version, state))
        .collect()
}
