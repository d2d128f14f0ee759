//! Shared helpers for the end-to-end tests: find the built binaries, run a
//! real `edgekms-plugin` on temporary sockets (and a free loopback port for
//! its metrics and health endpoint), talk to it over gRPC and HTTP, run a
//! real swtpm.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod abuse;
pub mod conn;
pub mod faults;
pub mod fleet;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use edgekms_proto::admin::node_admin_client::NodeAdminClient;
use edgekms_proto::kms_v2::key_management_service_client::KeyManagementServiceClient;
use edgekms_proto::kms_v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tonic::transport::Channel;

pub type Kms = KeyManagementServiceClient<Channel>;
pub type Admin = NodeAdminClient<Channel>;

/// Path of a workspace binary built next to this test executable, or in
/// `EDGEKMS_BIN_DIR` when set (for worktrees sharing one target dir).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("EDGEKMS_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (the README's test command does)",
        path.display()
    );
    path
}

/// A running `edgekms-plugin`, killed on drop.
pub struct Plugin {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// The metrics and health endpoint; `None` with `--no-metrics`.
    pub metrics_addr: Option<SocketAddr>,
    child: Option<Child>,
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
    pub fn spawn_with_env(dir: &Path, mut args: Vec<String>, env: &[(&str, &str)]) -> Self {
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
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
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
        let child = without_terminal(Command::new(bin("edgekms-plugin")))
            .args(&args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self {
            dir: dir.to_owned(),
            socket,
            admin_socket,
            data_dir,
            log,
            args,
            metrics_addr,
            child: Some(child),
        }
    }

    /// The metrics and health endpoint (panics under `--no-metrics`).
    pub fn ops_addr(&self) -> SocketAddr {
        self.metrics_addr
            .expect("this plugin runs with --no-metrics")
    }

    /// GET `path` on the metrics and health endpoint: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.ops_addr(), path).await.unwrap()
    }

    /// Scrapes `/metrics` and parses it as the Prometheus text format.
    pub async fn scrape(&self) -> prometheus_parse::Scrape {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }

    /// Waits until `/healthz` answers 200 (10 s at most).
    pub async fn wait_live(&self) {
        let addr = self.ops_addr();
        poll_until(
            "no /healthz",
            10,
            || self.log_text(),
            || async move { matches!(http_get(addr, "/healthz").await, Ok((200, _))) },
        )
        .await;
    }

    /// Waits until Status says "ok" (10 s at most).
    pub async fn wait_healthy(&self) {
        poll_until(
            "plugin not healthy",
            10,
            || self.log_text(),
            || async {
                match self.try_kms().await {
                    Ok(mut kms) => kms
                        .status(StatusRequest {})
                        .await
                        .is_ok_and(|s| s.get_ref().healthz == "ok"),
                    Err(_) => false,
                }
            },
        )
        .await;
    }

    /// Waits until the KMS socket answers at all (whatever healthz says).
    pub async fn wait_serving(&self) {
        poll_until(
            "plugin not serving",
            10,
            || self.log_text(),
            || async {
                match self.try_kms().await {
                    Ok(mut kms) => kms.status(StatusRequest {}).await.is_ok(),
                    Err(_) => false,
                }
            },
        )
        .await;
    }

    pub async fn try_kms(&self) -> Result<Kms, tonic::transport::Error> {
        Ok(KeyManagementServiceClient::new(
            edgekms_proto::uds::connect(&self.socket).await?,
        ))
    }

    pub async fn kms(&self) -> Kms {
        self.try_kms().await.unwrap()
    }

    pub async fn admin(&self) -> Admin {
        NodeAdminClient::new(
            edgekms_proto::uds::connect(&self.admin_socket)
                .await
                .unwrap(),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then waits for exit; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("plugin did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, as `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited by itself within `within`.
    pub fn died_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            match self.child.as_mut() {
                None => return true,
                Some(c) => {
                    if c.try_wait().unwrap().is_some() {
                        self.child = None;
                        return true;
                    }
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit by itself (e.g. on a start-up error).
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("plugin still running after 15 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts again with the same arguments.
    pub async fn restart(&mut self) {
        assert_eq!(self.stop(), Some(0));
        *self = Self::spawn(&self.dir.clone(), self.args.clone());
        self.wait_healthy().await;
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `ready` every 20 ms until it holds; fails with "`what` in
/// `secs` s" and the process log after `secs` seconds.
pub async fn poll_until<F, Fut>(what: &str, secs: u64, log: impl Fn() -> String, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ready().await {
        assert!(
            Instant::now() < deadline,
            "{what} in {secs} s; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One GET over a fresh HTTP/1.1 connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8(body.to_vec()).unwrap()))
}

/// The value of the sample `name` whose labels are exactly `labels`
/// (counters, gauges and the `_count`/`_sum` of histograms).
pub fn sample(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name} is not a single value: {other:?}"),
        })
}

/// Loopback TCP ports process `pid` listens on (from /proc: the socket
/// inodes among its file descriptors, looked up in /proc/net/tcp{,6}).
pub fn tcp_listen_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is f[1] (hex ip:port), st is f[3] (0A = LISTEN), inode is f[9].
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `cmd` run in a session of its own, without a controlling terminal: as
/// under systemd or the kubelet, whether or not the tests run from one (the
/// plugin shows its recovery passphrase on `/dev/tty` when there is one).
pub fn without_terminal(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid(2) is async-signal-safe; the child calls nothing else
    // before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd
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

pub async fn encrypt(kms: &mut Kms, plaintext: &[u8]) -> (Vec<u8>, String) {
    let r = kms
        .encrypt(EncryptRequest {
            plaintext: plaintext.to_vec().into(),
            uid: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (r.ciphertext.to_vec(), r.key_id)
}

pub async fn decrypt(
    kms: &mut Kms,
    ciphertext: &[u8],
    key_id: &str,
) -> Result<Vec<u8>, tonic::Status> {
    kms.decrypt(DecryptRequest {
        ciphertext: ciphertext.to_vec().into(),
        uid: "test".into(),
        key_id: key_id.into(),
        annotations: Default::default(),
    })
    .await
    .map(|r| r.into_inner().plaintext.to_vec())
}

pub async fn key_id(kms: &mut Kms) -> String {
    kms.status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id
}

/// Every file under `dir` that contains `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path);
                }
            }
        }
    }
    hits
}

/// Whether the swtpm tests can run; panics when they must
/// (`EDGEKMS_REQUIRE_SWTPM=1`, as CI sets) and swtpm is missing.
pub fn swtpm_available() -> bool {
    let present = Command::new("swtpm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        assert!(
            std::env::var("EDGEKMS_REQUIRE_SWTPM").as_deref() != Ok("1"),
            "EDGEKMS_REQUIRE_SWTPM=1 but swtpm is not installed"
        );
        eprintln!("SKIPPED: swtpm is not installed (apt-get install swtpm swtpm-tools)");
    }
    present
}

/// A real software TPM listening on loopback TCP (tss-esapi 7.7's swtpm
/// TCTI takes only host= and port=), with its state in `state`; stopped on
/// drop.
pub struct Swtpm {
    pub state: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// Ports this test process has handed out.
static USED_PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A free loopback port, not handed out before by this process.
pub fn free_port() -> u16 {
    let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
}

/// A free loopback port P with P+1 free too (swtpm's control channel).
fn free_port_pair() -> u16 {
    let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < u16::MAX
            && !used.contains(&port)
            && !used.contains(&(port + 1))
            && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
        {
            used.extend([port, port + 1]);
            return port;
        }
    }
}

impl Swtpm {
    pub fn start(state: &Path) -> Self {
        std::fs::create_dir_all(state).unwrap();
        for _ in 0..5 {
            let port = free_port_pair();
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let ready = loop {
                if child.try_wait().unwrap().is_some() {
                    break false; // lost the port race: try another pair
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break true;
                }
                assert!(Instant::now() < deadline, "swtpm did not start");
                std::thread::sleep(Duration::from_millis(5));
            };
            if ready {
                return Self {
                    state: state.to_owned(),
                    port,
                    child: Some(child),
                };
            }
        }
        panic!("swtpm could not get a port pair");
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Freezes swtpm (SIGSTOP): connections are still accepted by the
    /// kernel, but no command is answered until [`Swtpm::resume`].
    pub fn pause(&self) {
        signal(self.child.as_ref().unwrap().id(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.as_ref().unwrap().id(), "CONT");
    }

    /// Extends `pcr` in the sha256 bank (as a firmware or boot-loader
    /// change would), with tpm2-tools.
    pub fn extend_pcr(&self, pcr: u8) {
        let out = Command::new("tpm2_pcrextend")
            .arg(format!("{pcr}:sha256={}", "ab".repeat(32)))
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tpm2_pcrextend: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "CONT");
            signal(child.id(), "TERM");
            let _ = child.wait();
        }
    }
}

/// Copies a directory tree (a data dir moved to another node).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
