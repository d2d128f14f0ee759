//! Helpers for the connection-abuse tests: a process's descriptors, memory
//! and CPU from /proc; many idle TLS or unix connections; a raw HTTP/2
//! client that opens streams and never finishes them (whatever the server's
//! SETTINGS say); a plugin started under an open-file limit.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Plugin;

/// What a process holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

/// The memory bounds a flood must keep: the peak RSS at most `peak_mib`
/// MiB above `before`, and what is left after it at most `after_mib`.
pub fn assert_memory_bounded(
    before: Usage,
    peak_rss: u64,
    after: Usage,
    peak_mib: u64,
    after_mib: u64,
) {
    assert!(
        peak_rss < before.rss_kib + peak_mib * 1024,
        "memory grew from {} KiB to {peak_rss} KiB",
        before.rss_kib
    );
    assert!(
        after.rss_kib < before.rss_kib + after_mib * 1024,
        "memory after: {} KiB (before {} KiB)",
        after.rss_kib,
        before.rss_kib
    );
}

pub fn usage(pid: u32) -> Usage {
    Usage {
        fds: fd_count(pid),
        rss_kib: rss_kib(pid),
        cpu_ticks: cpu_ticks(pid),
    }
}

pub use edgekms_testkit::procfs::{clk_tck, cpu_ticks, fd_count};

pub fn rss_kib(pid: u32) -> u64 {
    edgekms_testkit::procfs::status_kib(pid, "VmRSS").unwrap_or(0)
}

/// Samples a process's descriptors and RSS every 50 ms on a thread until
/// [`Sampler::finish`]: the peaks.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(usize, u64)>,
}

impl Sampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut fds, mut rss) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                fds = fds.max(fd_count(pid));
                rss = rss.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            (fds, rss)
        });
        Self { stop, handle }
    }

    /// (peak descriptors, peak RSS in KiB).
    pub fn finish(self) -> (usize, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// Raises this test process's own open-file limit (it holds the attack's
/// client ends).
pub fn raise_own_fd_limit(need: u64) {
    let have = edgekms_daemon::cli::raise_fd_limit();
    assert!(
        have >= need,
        "this test needs {need} open files, the hard limit allows {have}"
    );
}

/// A TLS client config without a client certificate, trusting the CA in
/// `ca_pem` (the operator dir's ca.pem).
pub fn anonymous_tls(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let text = std::fs::read_to_string(ca_pem).unwrap();
    let der = edgekms_daemon::pki::pem_decode("CERTIFICATE", &text).unwrap();
    edgekms_daemon::tls::client_config(edgekms_daemon::tls::Trust::Ca(&der), None).unwrap()
}

pub type TlsClient = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// One TLS connection from `source` to `addr` without a client certificate.
pub async fn tls_connect(
    addr: SocketAddr,
    source: IpAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsClient> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let tcp = sock.connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// Opens `n` TLS connections to `addr` (completed handshakes, no client
/// certificate), spread over `sources`, 32 handshakes at a time; returns
/// those that completed, and how many did not (shed by the server while
/// handshaking, or timed out).
pub async fn idle_tls(
    addr: SocketAddr,
    sources: &[IpAddr],
    n: usize,
    cfg: Arc<rustls::ClientConfig>,
) -> (Vec<TlsClient>, usize) {
    let mut done = Vec::with_capacity(n);
    let mut failed = 0;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        if set.len() >= 32 {
            match set.join_next().await.unwrap().unwrap() {
                Ok(c) => done.push(c),
                Err(_) => failed += 1,
            }
        }
        let source = sources[i % sources.len()];
        let cfg = cfg.clone();
        set.spawn(async move {
            tokio::time::timeout(Duration::from_secs(15), tls_connect(addr, source, cfg))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        });
    }
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(c) => done.push(c),
            Err(_) => failed += 1,
        }
    }
    (done, failed)
}

/// How many of `conns` the server has closed (a read returns EOF or an
/// error within a second, once whatever the server sent before is drained),
/// checked concurrently; hands the connections back.
pub async fn closed_by_server<S>(conns: Vec<S>) -> (Vec<S>, usize)
where
    S: AsyncRead + Unpin + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for mut c in conns {
        set.spawn(async move {
            let mut buf = [0u8; 4096];
            let closed = loop {
                match tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break true,
                    Ok(Ok(_)) => continue,
                    Err(_) => break false,
                }
            };
            (c, closed)
        });
    }
    let mut back = Vec::new();
    let mut closed = 0;
    while let Some(r) = set.join_next().await {
        let (c, was_closed) = r.unwrap();
        closed += usize::from(was_closed);
        back.push(c);
    }
    (back, closed)
}

/// Opens up to `n` unix connections to `path` without sending a byte; a
/// connect that fails or hangs (backlog full) is counted, not fatal.
pub async fn idle_unix(path: &Path, n: usize) -> (Vec<tokio::net::UnixStream>, usize) {
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::UnixStream::connect(path),
        )
        .await
        {
            Ok(Ok(c)) => conns.push(c),
            _ => failed += 1,
        }
    }
    (conns, failed)
}

// ---- raw HTTP/2 ----

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn hpack_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127, "short strings only");
    out.push(u8::try_from(s.len()).unwrap());
    out.extend_from_slice(s.as_bytes());
}

/// A gRPC request's header block, every field a literal without indexing
/// (so blocks are independent of each other): POST, http, `path`,
/// `authority`, content-type application/grpc, te trailers.
pub fn grpc_headers(path: &str, authority: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    b.push(0x04); // :path, name from the static table
    hpack_str(&mut b, path);
    b.push(0x01); // :authority, name from the static table
    hpack_str(&mut b, authority);
    b.extend_from_slice(&[0x0f, 0x10]); // content-type (static index 31)
    hpack_str(&mut b, "application/grpc");
    b.push(0x00); // new name
    hpack_str(&mut b, "te");
    hpack_str(&mut b, "trailers");
    b
}

/// What a raw HTTP/2 client saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// SETTINGS_MAX_CONCURRENT_STREAMS in the server's first SETTINGS.
    pub max_concurrent_streams: Option<u32>,
    pub settings_max_header_list_size: Option<u32>,
    /// RST_STREAM frames, by error code.
    pub resets: std::collections::BTreeMap<u32, u64>,
    /// HEADERS frames (responses).
    pub headers: u64,
    /// GOAWAY's error code, if one came.
    pub goaway: Option<u32>,
    /// The server closed the connection.
    pub closed: bool,
}

/// Reads frames until EOF or `stop`, recording what came.
async fn read_frames<R: AsyncRead + Unpin>(mut r: R, seen: Arc<std::sync::Mutex<Seen>>) {
    let mut head = [0u8; 9];
    loop {
        if r.read_exact(&mut head).await.is_err() {
            break;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let kind = head[3];
        let flags = head[4];
        let mut payload = vec![0u8; len];
        if r.read_exact(&mut payload).await.is_err() {
            break;
        }
        let mut s = seen.lock().unwrap();
        match kind {
            SETTINGS if flags & 1 == 0 => {
                for p in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([p[0], p[1]]);
                    let v = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
                    match id {
                        3 => s.max_concurrent_streams = Some(v),
                        6 => s.settings_max_header_list_size = Some(v),
                        _ => {}
                    }
                }
            }
            RST_STREAM if payload.len() >= 4 => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                *s.resets.entry(code).or_insert(0) += 1;
            }
            HEADERS => s.headers += 1,
            GOAWAY if payload.len() >= 8 => {
                s.goaway = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
            _ => {}
        }
    }
    seen.lock().unwrap().closed = true;
}

/// Opens `streams` gRPC streams on `path` over `io` as fast as it can write
/// them, never sending a body or END_STREAM (nor, with `rapid_reset`, keeping
/// them: each is reset right after its HEADERS), ignoring the server's
/// SETTINGS; then holds the connection for `hold`. Returns what it saw and
/// how many streams it got to write before the server closed.
pub async fn flood<S>(
    io: S,
    path: &str,
    streams: u32,
    rapid_reset: bool,
    hold: Duration,
) -> (Seen, u32)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(io);
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let reader = tokio::spawn(read_frames(r, seen.clone()));
    let mut written = 0u32;
    let mut start = PREFACE.to_vec();
    start.extend(frame(SETTINGS, 0, 0, &[]));
    if w.write_all(&start).await.is_ok() {
        let block = grpc_headers(path, "localhost");
        let mut id = 1u32;
        'out: while written < streams {
            let mut batch = Vec::with_capacity(1000 * (block.len() + 30));
            for _ in 0..1000.min(streams - written) {
                batch.extend(frame(HEADERS, END_HEADERS, id, &block));
                if rapid_reset {
                    batch.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
                }
                id += 2;
                written += 1;
            }
            if w.write_all(&batch).await.is_err() || seen.lock().unwrap().closed {
                break 'out;
            }
        }
        let _ = w.flush().await;
        let deadline = Instant::now() + hold;
        while Instant::now() < deadline && !seen.lock().unwrap().closed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(w);
    reader.abort();
    let out = seen.lock().unwrap().clone();
    (out, written)
}

/// One unary gRPC call with an empty request message, :authority set to
/// `authority`, over raw HTTP/2 on a unix socket: what came back.
pub async fn unary_with_authority(socket: &Path, path: &str, authority: &str) -> Seen {
    let io = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, mut w) = tokio::io::split(io);
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let reader = tokio::spawn(read_frames(r, seen.clone()));
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &grpc_headers(path, authority),
    ));
    // An empty message: not compressed, length 0.
    out.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    w.write_all(&out).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        {
            let s = seen.lock().unwrap();
            if s.headers > 0 || !s.resets.is_empty() || s.closed {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no answer in 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reader.abort();
    let s = seen.lock().unwrap().clone();
    s
}

/// Starts a soft-sealed plugin of `cluster` under `dir` with `extra` flags,
/// under an open-file limit of `nofile` (soft and hard, via prlimit), and
/// waits until it answers.
pub async fn plugin_with_nofile(dir: &Path, cluster: &str, extra: &[&str], nofile: u64) -> Plugin {
    let mut args = Plugin::soft_args(dir, cluster);
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = Plugin::spawn_limited(dir, args, &[], Some(nofile));
    p.wait_healthy().await;
    p
}

/// The Python interpreter with grpcio and grpcio-tools: `EDGEKMS_PYTHON`,
/// else the venv `.ci/setup` makes. `None` (the test skips) when missing,
/// unless `EDGEKMS_REQUIRE_GRPCIO=1` (CI), which makes it fail.
pub fn python_with_grpcio() -> Option<PathBuf> {
    let python = std::env::var_os("EDGEKMS_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/edgekms-py/bin/python"))
        });
    let ok = python.as_ref().is_some_and(|p| {
        Command::new(p)
            .args(["-c", "import grpc, grpc_tools"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        assert!(
            std::env::var("EDGEKMS_REQUIRE_GRPCIO").as_deref() != Ok("1"),
            "EDGEKMS_REQUIRE_GRPCIO=1 but {python:?} cannot import grpc and grpc_tools (run .ci/setup)"
        );
        eprintln!(
            "SKIPPED: no Python with grpcio and grpcio-tools (run .ci/setup or set EDGEKMS_PYTHON)"
        );
        return None;
    }
    python
}
