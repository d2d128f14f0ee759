//! A replicated central service for the tests: a real three-member etcd
//! cluster (Debian's etcd-server) and real `edgekms-server` replicas on
//! loopback, the first made by `init --store etcd`, the others by
//! `kmsctl replica add` and `edgekms-server join`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use edgekms_testkit::etcd_cluster::EtcdCluster;

use super::bin;
use super::fleet::{node_args, text, Server};
use super::Plugin;

/// etcd and the replicas, all stopped on drop.
pub struct Replicated {
    pub etcd: EtcdCluster,
    pub replicas: Vec<Server>,
    pub dir: PathBuf,
}

/// `--store etcd` and where etcd is.
pub fn store_args(etcd: &EtcdCluster) -> Vec<String> {
    vec![
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.endpoints().join(","),
        "--etcd-insecure".into(),
    ]
}

fn run(cmd: &mut Command) -> Output {
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

impl Replicated {
    /// A three-member etcd and `n` replicas, serving; `None` when etcd is
    /// missing and the test is to skip.
    pub async fn start(dir: &Path, n: usize) -> Option<Self> {
        let etcd = EtcdCluster::fresh(3)?;
        let first = dir.join("r1");
        let out = run(Command::new(bin("edgekms-server"))
            .args(["init", "--sealer", "soft", "--name", "r1", "--data-dir"])
            .arg(&first)
            .args(store_args(&etcd)));
        assert!(out.status.success(), "init --store etcd: {}", text(&out));
        let mut me = Self {
            replicas: vec![Server::spawn(&first, &refs(&store_args(&etcd)))],
            etcd,
            dir: dir.to_owned(),
        };
        me.replicas[0].wait_ready().await;
        for i in 2..=n {
            me.add(&format!("r{i}")).await;
        }
        Some(me)
    }

    /// The first replica's operator credentials (every replica takes them).
    pub fn operator_dir(&self) -> PathBuf {
        self.replicas[0].operator_dir()
    }

    /// `kmsctl ... -o json` through replica `i`.
    pub fn kmsctl_json(&self, i: usize, args: &[&str]) -> serde_json::Value {
        self.replicas[i].kmsctl_json_as(&self.operator_dir(), args)
    }

    pub fn kmsctl(&self, i: usize, args: &[&str]) -> Output {
        self.replicas[i].kmsctl_as(&self.operator_dir(), args)
    }

    /// One cluster's status as replica `i` sees it.
    pub fn cluster(&self, i: usize, cluster: &str) -> serde_json::Value {
        self.kmsctl_json(i, &["status", cluster])["clusters"][0].clone()
    }

    /// A replica token from replica 0, joined into `dir/NAME`: `(out of
    /// join, data dir)`.
    pub fn join(&self, name: &str) -> (Output, PathBuf) {
        let inv = self.kmsctl_json(0, &["replica", "add", name]);
        let data = self.dir.join(name);
        let out = run(Command::new(bin("edgekms-server"))
            .args(["join", "--sealer", "soft", "--server"])
            .arg(self.replicas[0].url())
            .args(["--token", inv["token"].as_str().unwrap()])
            .args(["--ca-hash", inv["ca_hash"].as_str().unwrap()])
            .arg("--data-dir")
            .arg(&data));
        (out, data)
    }

    /// Adds replica `name` (token, join, serve), ready.
    pub async fn add(&mut self, name: &str) -> usize {
        let (out, data) = self.join(name);
        assert!(out.status.success(), "join {name}: {}", text(&out));
        let s = Server::spawn(&data, &refs(&store_args(&self.etcd)));
        s.wait_ready().await;
        self.replicas.push(s);
        self.replicas.len() - 1
    }

    /// Every replica's URL, comma-separated, starting with replica `first`.
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.replicas.len();
        (0..n)
            .map(|k| self.replicas[(first + k) % n].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Enrols `cluster/node` with a token from replica 0, joining through
    /// `servers` (a comma-separated list), and starts its plugin.
    pub async fn enrol(&self, cluster: &str, node: &str, servers: &str) -> Plugin {
        let inv = self.kmsctl_json(0, &["node", "add", cluster, node]);
        let dir = self.dir.join(format!("{cluster}-{node}"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(bin("edgekms-plugin"))
            .args(["join", "--server", servers])
            .args(["--token", inv["token"].as_str().unwrap()])
            .args(["--ca-hash", inv["ca_hash"].as_str().unwrap()])
            .args(node_args(&dir, cluster, node))
            .output()
            .unwrap();
        assert!(out.status.success(), "plugin join: {}", text(&out));
        let p = Plugin::spawn(&dir, node_args(&dir, cluster, node));
        p.wait_healthy().await;
        p
    }
}

pub fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
