//! A real etcd for tests and benches (Debian's `etcd`, package
//! `etcd-server`, v3.4): a single member on free loopback ports with its
//! data in a temporary directory, killed on drop; plain `http://`, or TLS
//! with client-certificate auth (a CA, server and client certificates made
//! with rcgen, and a second CA that signed nothing, for refusals).
//!
//! Data goes in through etcd's v3 JSON gateway (`/v3/kv/txn`, up to 128
//! puts a request) over plain HTTP/1.1 on a second, plain client listener:
//! this crate knows no gRPC. The rule for a missing etcd is swtpm's: a test
//! skips with a message unless `EDGEKMS_REQUIRE_ETCD=1` (as CI sets).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::net::free_port;
use crate::process::Daemon;

/// Where Debian installs etcd.
const ETCD: &str = "/usr/bin/etcd";

const REQUIRE: &str = "EDGEKMS_REQUIRE_ETCD";

/// Whether `EDGEKMS_REQUIRE_ETCD=1`: a missing etcd fails the tests.
pub fn required() -> bool {
    crate::skip::required(REQUIRE)
}

pub(crate) fn binary() -> PathBuf {
    std::env::var_os("EDGEKMS_ETCD").map_or_else(|| PathBuf::from(ETCD), PathBuf::from)
}

/// Why the etcd that [`Etcd::start`] runs cannot run, if it cannot.
pub(crate) fn missing() -> Option<String> {
    let bin = binary();
    (!crate::skip::runs(&bin)).then(|| format!("{} is not installed", bin.display()))
}

fn installed() -> bool {
    missing().is_none()
}

/// Whether the etcd tests can run. When etcd is missing, says so (the test
/// then skips) or, under `EDGEKMS_REQUIRE_ETCD=1`, fails the test.
pub fn available() -> bool {
    crate::skip::may_run(REQUIRE, missing(), "apt-get install etcd-server")
}

/// Fails unless etcd is installed: for benches, which cannot skip.
pub fn require() {
    assert!(installed(), "etcd is needed: apt-get install etcd-server");
}

/// The PEM files of a TLS etcd, in its directory.
#[derive(Clone, Debug)]
pub struct Tls {
    /// The CA that signed etcd's and the client's certificates.
    pub ca: PathBuf,
    /// A client certificate and key etcd accepts.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A CA that signed nothing here (a wrong `--etcd-cacert`).
    pub other_ca: PathBuf,
    /// A client certificate and key signed by `other_ca` (refused by etcd).
    pub other_cert: PathBuf,
    pub other_key: PathBuf,
}

/// One running etcd member, killed on drop.
pub struct Etcd {
    /// What the census connects to: `http://127.0.0.1:P` or
    /// `https://127.0.0.1:P` (client certificates required).
    pub endpoint: String,
    /// The certificates, when `endpoint` is https.
    pub tls: Option<Tls>,
    /// The plain HTTP listener data is loaded through.
    loader: u16,
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// A plain-http etcd, or `None` when the test is to skip.
    pub fn fresh_plain() -> Option<Etcd> {
        available().then(|| Etcd::start(false))
    }

    /// A TLS etcd requiring client certificates, or `None` to skip.
    pub fn fresh_tls() -> Option<Etcd> {
        available().then(|| Etcd::start(true))
    }

    /// Starts etcd (see [`fresh_plain`](Self::fresh_plain)); fails if it is
    /// missing.
    pub fn start(tls: bool) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let files = tls.then(|| make_tls(dir.path()));
        for _attempt in 0..5 {
            let (client, loader, peer) = (free_port(), free_port(), free_port());
            let scheme = if tls { "https" } else { "http" };
            let endpoint = format!("{scheme}://127.0.0.1:{client}");
            let data = dir.path().join(format!("data-{client}"));
            let mut cmd = Command::new(binary());
            cmd.arg("--name=census")
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!(
                    "--listen-client-urls={endpoint},http://127.0.0.1:{loader}"
                ))
                .arg(format!("--advertise-client-urls={endpoint}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster=census=http://127.0.0.1:{peer}"))
                .arg("--log-level=warn")
                .arg("--logger=zap");
            if let Some(t) = &files {
                cmd.arg("--client-cert-auth")
                    .arg(format!("--trusted-ca-file={}", t.ca.display()))
                    .arg(format!(
                        "--cert-file={}",
                        dir.path().join("server.pem").display()
                    ))
                    .arg(format!(
                        "--key-file={}",
                        dir.path().join("server-key.pem").display()
                    ));
            }
            let log = dir.path().join(format!("etcd-{client}.log"));
            let mut daemon = Daemon::spawn("etcd", cmd, &log);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = daemon.try_exit() {
                    eprintln!(
                        "etcd exited ({status}), retrying on other ports:\n{}",
                        daemon.log_tail(20)
                    );
                    break;
                }
                if current_revision(loader).is_some() {
                    return Etcd {
                        endpoint,
                        tls: files,
                        loader,
                        daemon,
                        _dir: dir,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd did not answer within 20 s:\n{}",
                    daemon.log_tail(30)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("etcd would not start on free ports (5 attempts)");
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Writes every `(key, value)`, 128 a transaction; returns the
    /// revision of the last write.
    pub fn put_all(&self, items: &[(Vec<u8>, Vec<u8>)]) -> i64 {
        let mut revision = 0;
        for chunk in items.chunks(128) {
            let ops: Vec<String> = chunk
                .iter()
                .map(|(k, v)| {
                    format!(
                        r#"{{"requestPut":{{"key":"{}","value":"{}"}}}}"#,
                        base64(k),
                        base64(v)
                    )
                })
                .collect();
            let body = format!(r#"{{"success":[{}]}}"#, ops.join(","));
            let answer = post(self.loader, "/v3/kv/txn", &body)
                .unwrap_or_else(|e| panic!("etcd txn: {e}\n{}", self.daemon.log_tail(20)));
            revision =
                header_revision(&answer).unwrap_or_else(|| panic!("etcd txn answered {answer}"));
        }
        revision
    }

    /// Writes one key.
    pub fn put(&self, key: &[u8], value: &[u8]) -> i64 {
        self.put_all(&[(key.to_vec(), value.to_vec())])
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        current_revision(self.loader).expect("etcd answers")
    }
}

/// etcd's current revision through the JSON gateway, if it answers.
fn current_revision(port: u16) -> Option<i64> {
    let answer = post(port, "/v3/kv/range", r#"{"key":"AA=="}"#).ok()?;
    header_revision(&answer)
}

pub(crate) fn header_revision(answer: &str) -> Option<i64> {
    // {"header":{..., "revision":"12", ...}, ...}
    let at = answer.find("\"revision\":\"")? + "\"revision\":\"".len();
    let rest = &answer[at..];
    rest[..rest.find('"')?].parse().ok()
}

/// POSTs a JSON body over HTTP/1.1 (connection closed after), returning
/// the body of a 200 answer.
fn post(port: u16, path: &str, body: &str) -> Result<String, String> {
    post_within(port, path, body, Duration::from_secs(30))
}

/// [`post`] that gives up after `within` without an answer (an etcd
/// member that is not ready yet accepts connections but answers nothing).
pub(crate) fn post_within(
    port: u16,
    path: &str,
    body: &str,
    within: Duration,
) -> Result<String, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, within).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(within)).unwrap();
    s.set_write_timeout(Some(within)).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    // etcd's gateway sends errors chunked (they carry a trailer).
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or(head);
        return Err(format!("{status}: {}", body.trim()));
    }
    Ok(body)
}

/// The data of a chunked HTTP/1.1 body (trailers dropped); what cannot be
/// parsed is kept as it is.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = body.split_once("\r\n") else {
            out.push_str(body);
            break;
        };
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            out.push_str(body);
            break;
        };
        let (Some(chunk), Some(after)) = (rest.get(..n), rest.get(n..)) else {
            out.push_str(rest);
            break;
        };
        out.push_str(chunk);
        if n == 0 {
            break;
        }
        body = after.strip_prefix("\r\n").unwrap_or(after);
    }
    out
}

pub(crate) fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A CA, etcd's server certificate (127.0.0.1, localhost), a client
/// certificate, and a second CA with a client certificate of its own.
fn make_tls(dir: &Path) -> Tls {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert, Issuer::new(params, key))
    }
    fn leaf(
        issuer: &Issuer<'static, KeyPair>,
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "census test");
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let (ca_cert, issuer) = ca("census test etcd CA");
    let (other_cert, other_issuer) = ca("census test other CA");
    let (server, server_key) = leaf(
        &issuer,
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write("server.pem", &server);
    write("server-key.pem", &server_key);
    let (client, client_key) = leaf(&issuer, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let (o_client, o_client_key) = leaf(
        &other_issuer,
        &["client"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    Tls {
        ca: write("ca.pem", &ca_cert.pem()),
        cert: write("client.pem", &client),
        key: write("client-key.pem", &client_key),
        other_ca: write("other-ca.pem", &other_cert.pem()),
        other_cert: write("other-client.pem", &o_client),
        other_key: write("other-client-key.pem", &o_client_key),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_joined() {
        let body = "5d\r\n{\"error\":\"etcdserver: request timed out\",\"message\":\"etcdserver: request timed out\",\"code\":14}\r\n0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n";
        assert_eq!(
            super::dechunk(body),
            r#"{"error":"etcdserver: request timed out","message":"etcdserver: request timed out","code":14}"#
        );
        assert_eq!(super::dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
        assert_eq!(super::dechunk("not chunked"), "not chunked");
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(raw.as_bytes()), enc);
        }
    }
}
