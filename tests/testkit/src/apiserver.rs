//! A real kube-apiserver for tests: the unmodified binary of the testbin
//! (`../shared/testbin/README.md`) on a free loopback port, over a
//! plain-http single-member etcd of its own, with the encryption config the
//! caller passes (typically KMS v2 to an edgekms-plugin's socket), a static
//! admin token, and a kubeconfig file for clients; both processes are killed
//! on drop. And the rule for when the binary or etcd is missing: a test
//! skips with a message, unless `EDGEKMS_REQUIRE_APISERVER=1` (as CI sets)
//! makes that a failure.
//!
//! The apiserver polls the plugin's Status every minute, so a new key_id
//! reaches its writes up to a minute after a rotation;
//! [`KubeApiServer::restart`] makes it pick the new one up at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::free_port;
use crate::process::{without_terminal, Daemon};
use crate::skip;

/// The binary's path: `EDGEKMS_KUBE_APISERVER` (as `.ci/test` sets it from
/// the testbin's `unpack`), else where `unpack` puts it by default.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("EDGEKMS_KUBE_APISERVER") {
        return Some(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME")?;
    let default = PathBuf::from(home).join(".cache/edgekms-testbin/kube-apiserver-v1.36.2");
    default.exists().then_some(default)
}

const REQUIRE: &str = "EDGEKMS_REQUIRE_APISERVER";

/// Whether `EDGEKMS_REQUIRE_APISERVER=1`: a missing kube-apiserver or etcd
/// fails the tests.
pub fn required() -> bool {
    skip::required(REQUIRE)
}

/// Whether the kube-apiserver tests can run. When the binary or etcd (the
/// one [`crate::etcd::Etcd`] runs) is missing, says so (the test then
/// skips) or, under `EDGEKMS_REQUIRE_APISERVER=1`, fails the test.
pub fn available() -> bool {
    let missing = match binary() {
        None => Some("no kube-apiserver: set EDGEKMS_KUBE_APISERVER to the path `../shared/testbin/unpack` prints".to_owned()),
        Some(bin) if !skip::runs(&bin) => Some(format!(
            "EDGEKMS_KUBE_APISERVER={} does not run (`--version` failed)",
            bin.display()
        )),
        Some(_) => crate::etcd::missing(),
    };
    skip::may_run(
        REQUIRE,
        missing,
        "see ../shared/testbin/README.md; apt-get install etcd-server",
    )
}

/// An EncryptionConfiguration that encrypts `resources` (e.g. "secrets",
/// "configmaps") with KMS v2 through the plugin listening on `socket` (named
/// "edgekms", as the plugin's deploy files do), reading unencrypted data
/// too (`identity`).
pub fn kms_encryption_config(resources: &[&str], socket: &Path) -> String {
    let list: Vec<String> = resources.iter().map(|r| format!("      - {r}\n")).collect();
    format!(
        "apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
{}    providers:
      - kms:
          apiVersion: v2
          name: edgekms
          endpoint: unix://{}
          timeout: 3s
      - identity: {{}}
",
        list.concat(),
        socket.display()
    )
}

/// How long the apiserver may take to answer `/readyz` 200.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long it may take to stop on SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// A running kube-apiserver over an etcd of its own, both killed on drop.
pub struct KubeApiServer {
    pub dir: PathBuf,
    /// The admin's bearer token (group system:masters).
    pub token: String,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// A kubeconfig for the admin: this server, its CA, the token.
    pub kubeconfig: PathBuf,
    /// `http://127.0.0.1:PORT`, etcd's client endpoint.
    pub etcd_endpoint: String,
    args: Vec<String>,
    apiserver: Daemon,
    /// Kept for its lifetime: dropped (killed) after the apiserver.
    _etcd: crate::etcd::Etcd,
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver under `dir` (created if needed), with
    /// `encryption_config` (an EncryptionConfiguration, see
    /// [`kms_encryption_config`]), and waits until `/readyz` answers 200
    /// (the KMS plugin must answer Status for that). Call [`available`]
    /// first.
    pub async fn start(dir: &Path, encryption_config: &str) -> KubeApiServer {
        std::fs::create_dir_all(dir).unwrap();
        let bin = binary().expect("no kube-apiserver: check apiserver::available() first");
        // The census tests' etcd: plain http on free loopback ports.
        let etcd = crate::etcd::Etcd::start(false);
        let etcd_endpoint = etcd.endpoint.clone();

        let token = format!("edgekms-test-{}", std::process::id());
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let encryption = write("encryption.yaml", encryption_config);
        let tokens = write(
            "tokens.csv",
            &format!("{token},admin,1,\"system:masters\"\n"),
        );
        let sa = rcgen::KeyPair::generate().unwrap();
        let sa_key = write("sa.key", &sa.serialize_pem());
        let sa_pub = write("sa.pub", &sa.public_key_pem());
        let cert_dir = dir.join("certs");
        let port = free_port();
        let args: Vec<String> = vec![
            format!("--etcd-servers={etcd_endpoint}"),
            format!("--encryption-provider-config={encryption}"),
            format!("--token-auth-file={tokens}"),
            "--authorization-mode=AlwaysAllow".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={sa_pub}"),
            format!("--service-account-signing-key-file={sa_key}"),
            "--endpoint-reconciler-type=none".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", cert_dir.display()),
        ];
        let mut cmd = without_terminal(Command::new(&bin));
        cmd.args(&args);
        let apiserver = Daemon::spawn("kube-apiserver", cmd, &dir.join("kube-apiserver.log"));
        let mut server = KubeApiServer {
            dir: dir.to_owned(),
            token,
            url: format!("https://127.0.0.1:{port}"),
            kubeconfig: dir.join("kubeconfig"),
            etcd_endpoint,
            args,
            apiserver,
            _etcd: etcd,
        };
        server.wait_ready().await;
        let ca = std::fs::read(cert_dir.join("apiserver.crt")).unwrap();
        std::fs::write(&server.kubeconfig, server.kubeconfig_text(&ca)).unwrap();
        server
    }

    fn kubeconfig_text(&self, ca_pem: &[u8]) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: test
    cluster:
      server: {}
      certificate-authority-data: {}
users:
  - name: admin
    user:
      token: {}
contexts:
  - name: test
    context:
      cluster: test
      user: admin
current-context: test
",
            self.url,
            base64_encode(ca_pem),
            self.token
        )
    }

    /// The apiserver's self-signed serving certificate (and its CA), PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("certs/apiserver.crt")).unwrap()
    }

    /// The apiserver's log so far.
    pub fn log_text(&self) -> String {
        self.apiserver.log_text()
    }

    /// The apiserver's process id.
    pub fn pid(&self) -> u32 {
        self.apiserver.pid()
    }

    /// GET `path` with the admin token: (status, body), or why it failed.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        https_get(&self.url, &self.ca_pem(), &self.token, path).await
    }

    /// Waits until `/readyz` answers 200, failing with the log after
    /// [`READY_WITHIN`] (or as soon as the process exits).
    pub async fn wait_ready(&mut self) {
        self.wait_readyz("ready", |code, _| code == 200).await
    }

    /// Waits until `/readyz?verbose` passes `check` (e.g. `kms-providers`),
    /// whatever the others say: an apiserver whose informers cannot list
    /// what a disabled key encrypted stays unready, and still serves.
    pub async fn wait_check(&mut self, check: &str) {
        let passed = format!("[+]{check} ok");
        self.wait_readyz(check, |_, body| body.contains(&passed))
            .await
    }

    async fn wait_readyz(&mut self, what: &str, done: impl Fn(u16, &str) -> bool) {
        let deadline = Instant::now() + READY_WITHIN;
        let ca_file = self.dir.join("certs/apiserver.crt");
        let mut last = String::new();
        loop {
            if let Some(status) = self.apiserver.try_exit() {
                panic!(
                    "kube-apiserver exited ({status}) before it was ready; log tail:\n{}",
                    tail(&self.log_text(), 40)
                );
            }
            if let Ok(ca) = std::fs::read(&ca_file) {
                match https_get(&self.url, &ca, &self.token, "/readyz?verbose").await {
                    Ok((code, body)) if done(code, &body) => return,
                    Ok((code, body)) => last = format!("{code}: {body}"),
                    Err(e) => last = e,
                }
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not {what} in {READY_WITHIN:?} (last /readyz: {last}); log tail:\n{}",
                tail(&self.log_text(), 40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the apiserver (SIGTERM) and starts it again with the same
    /// flags, port and certificates, over the same etcd; waits until it is
    /// ready. It asks the plugin's Status at once, so it writes under the
    /// plugin's current key_id from then on.
    pub async fn restart(&mut self) {
        self.apiserver.stop_async(STOP_WITHIN).await;
        let mut cmd = without_terminal(Command::new(binary().unwrap()));
        cmd.args(&self.args);
        self.apiserver.respawn(cmd);
        self.wait_ready().await;
    }

    /// [`restart`](Self::restart), waiting only until `check` passes
    /// ([`wait_check`](Self::wait_check)).
    pub async fn restart_until(&mut self, check: &str) {
        self.apiserver.stop_async(STOP_WITHIN).await;
        let mut cmd = without_terminal(Command::new(binary().unwrap()));
        cmd.args(&self.args);
        self.apiserver.respawn(cmd);
        self.wait_check(check).await;
    }

    /// Stops the apiserver (etcd stops when this is dropped).
    pub fn stop(&mut self) {
        self.apiserver.terminate(STOP_WITHIN);
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        // Before etcd (a field, dropped after this).
        self.apiserver.kill();
    }
}

/// One HTTPS GET of `path` on `url` (`https://HOST:PORT`) with a bearer
/// token, trusting only the certificates in `ca_pem`.
async fn https_get(
    url: &str,
    ca_pem: &[u8],
    token: &str,
    path: &str,
) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let authority = url.strip_prefix("https://").ok_or("not https")?;
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .to_owned();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    exchange(tls, &request(path, &host, Some(token))).await
}

fn request(path: &str, host: &str, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
}

/// Sends `request`, reads the answer until the peer closes: (status, body).
/// Bodies here are small and not chunked (health checks).
async fn exchange<S>(mut stream: S, request: &str) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    // A peer that closes without close_notify still sent its answer.
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    if answer.is_empty() {
        return Err(match read {
            Ok(Ok(_)) => "empty answer".into(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in 10 s".into(),
        });
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not HTTP: {text}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
