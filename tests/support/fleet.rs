//! Helpers for the central key service tests: a real `edgekms-server` on a
//! free loopback port, `kmsctl` against it, and plugins that join it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use super::{bin, free_port, signal, Plugin};

/// A running `edgekms-server` (soft sealer), killed on drop.
pub struct Server {
    pub data_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Server {
    /// `edgekms-server init` in `dir/server`, then serve.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[]).await
    }

    pub async fn start_with(dir: &Path, extra_args: &[&str]) -> Self {
        let data_dir = dir.join("server");
        let out = Command::new(bin("edgekms-server"))
            .args(["init", "--sealer", "soft", "--data-dir"])
            .arg(&data_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "init failed: {}", text(&out));
        let mut s = Self {
            data_dir,
            port: free_port(),
            log: dir.join("server.log"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
        };
        s.spawn();
        s.wait_up().await;
        s
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn operator_dir(&self) -> PathBuf {
        self.data_dir.join("operator")
    }

    /// Starts the process (again) on the same port and data dir.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("edgekms-server"))
            .args([
                "--sealer",
                "soft",
                "--heartbeat",
                "1s",
                "--no-metrics",
                "--data-dir",
            ])
            .arg(&self.data_dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until the service answers `kmsctl status`.
    pub async fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.kmsctl(&["status"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not up in 15 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, as `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "server did not stop");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Waits for the process to exit by itself (a failpoint); true if it did.
    pub fn wait_died(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Some(c) = self.child.as_mut() {
            if c.try_wait().unwrap().is_some() {
                self.child = None;
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// `kmsctl --server .. --operator-dir .. ARGS`.
    pub fn kmsctl(&self, args: &[&str]) -> Output {
        Command::new(bin("kmsctl"))
            .args(["--server", &self.url(), "--operator-dir"])
            .arg(self.operator_dir())
            .args(args)
            .output()
            .unwrap()
    }

    /// `kmsctl ... -o json ARGS`, which must succeed.
    pub fn kmsctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.kmsctl(&all);
        assert!(out.status.success(), "kmsctl {args:?}: {}", text(&out));
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

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
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
    std::fs::create_dir_all(dir).unwrap();
    Command::new(bin("edgekms-plugin"))
        .args([
            "join",
            "--server",
            &server.url(),
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
