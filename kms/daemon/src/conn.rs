//! Connection hygiene shared by both daemons: the table of open connections
//! with its cap and per-peer fair share, the deadlines of connections that
//! have not proved who they are, shedding (closing a connection from
//! outside), the HTTP/2 limits every server applies, and an accept loop that
//! backs off when the process runs out of file descriptors.
//!
//! A connection is registered when accepted and wrapped in [`Tracked`],
//! whose reads and writes fail once the table sheds it; hyper then drops the
//! connection and its descriptor. Who gets shed: first connections still in
//! their TLS handshake or without a client certificate (oldest first, from
//! the peer holding most of them), then, where the daemon allows it
//! ([`Limits::shed_idle_trusted`]), the trusted connection idle longest.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// File descriptors kept out of the connection cap: the store's files, the
/// metrics endpoint, logs, the TPM, the runtime's own.
pub const RESERVED_FDS: u64 = 128;

/// The largest HTTP/2 header block a peer may send (SETTINGS_MAX_HEADER_LIST_SIZE).
/// gRPC metadata here is a handful of short headers.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Streams a peer may open and reset before the connection is closed
/// (HTTP/2 rapid reset, CVE-2023-44487).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the server may reset because of the peer's errors (e.g. streams
/// beyond SETTINGS_MAX_CONCURRENT_STREAMS) before it closes the connection
/// with GOAWAY (CVE-2025-8671, "MadeYouReset").
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// A tonic server with the HTTP/2 limits every edgekms server applies: at
/// most `max_concurrent_streams` open streams per connection
/// (SETTINGS_MAX_CONCURRENT_STREAMS; h2 refuses streams beyond it, and a
/// peer that keeps opening them runs into the reset limits and gets GOAWAY),
/// a bounded header block, the rapid-reset limits, and a PING every 30 s
/// (20 s to answer) so that connections of vanished peers close.
pub fn grpc_server(max_concurrent_streams: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(max_concurrent_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// The default connection cap for a soft open-file limit of `nofile`.
pub fn default_max_connections(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(RESERVED_FDS).max(32)).unwrap_or(usize::MAX)
}

/// The soft open-file limit of this process.
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

/// What the table allows.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections (including TLS handshakes in progress) at most.
    pub max_connections: usize,
    /// Handshaking or unauthenticated connections one peer address may hold.
    pub max_unauthenticated_per_peer: usize,
    /// An unauthenticated connection is closed after this long without a
    /// byte from its peer...
    pub unauthenticated_idle: Duration,
    /// ...and this long after its handshake in any case.
    pub unauthenticated_max_age: Duration,
    /// A trusted connection that sends nothing (not even the HTTP/2 preface)
    /// this long after it was admitted is closed.
    pub preface_timeout: Duration,
    /// When full, a trusted connection idle at least this long may be shed
    /// (the plugin: every local caller is equally trusted). `None`: trusted
    /// connections are never shed (the central service: nodes and operators).
    pub shed_idle_trusted: Option<Duration>,
}

impl Limits {
    /// The central service: mTLS, `Join` is the only call without a
    /// client certificate.
    pub fn central(max_connections: usize, max_unauthenticated_per_peer: usize) -> Self {
        Self {
            max_connections,
            max_unauthenticated_per_peer,
            unauthenticated_idle: Duration::from_secs(10),
            unauthenticated_max_age: Duration::from_secs(30),
            preface_timeout: Duration::from_secs(10),
            shed_idle_trusted: None,
        }
    }

    /// The plugin's unix sockets (mode 0600: every caller is trusted alike).
    pub fn local(max_connections: usize) -> Self {
        Self {
            max_connections,
            max_unauthenticated_per_peer: max_connections,
            unauthenticated_idle: Duration::from_secs(10),
            unauthenticated_max_age: Duration::from_secs(30),
            preface_timeout: Duration::from_secs(10),
            shed_idle_trusted: Some(Duration::from_secs(1)),
        }
    }
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TLS handshake in progress.
    Handshake,
    /// No client certificate: may only call `Join`.
    Unauthenticated,
    /// A verified client certificate, or a local socket.
    Trusted,
}

/// Why connections were closed by the table, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The table or a peer's share was full when another connection came.
    Full,
    /// accept() failed for lack of file descriptors.
    OutOfFds,
    /// Unauthenticated and idle or too old, or silent after admission.
    Timeout,
}

#[derive(Debug, Default)]
struct Shared {
    killed: AtomicBool,
    waker: AtomicWaker,
    /// Milliseconds since the table's epoch of the last read with data.
    last_read_ms: AtomicU64,
    /// Reads with data so far.
    reads: AtomicU64,
}

impl Shared {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

#[derive(Debug)]
struct Entry {
    peer: Option<IpAddr>,
    stage: Stage,
    /// When the current stage began (ms since the epoch).
    stage_ms: u64,
    /// `reads` when the current stage began.
    stage_reads: u64,
    shared: Arc<Shared>,
}

impl Entry {
    fn sheddable_first(&self) -> bool {
        self.stage != Stage::Trusted
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// By id, so by age: the oldest first.
    conns: BTreeMap<u64, Entry>,
    /// Handshaking or unauthenticated connections per peer address.
    untrusted_per_peer: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if e.stage != Stage::Trusted {
            self.dec_peer(e.peer);
        }
        Some(e)
    }

    fn dec_peer(&mut self, peer: Option<IpAddr>) {
        if let Some(ip) = peer {
            if let Some(n) = self.untrusted_per_peer.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.untrusted_per_peer.remove(&ip);
                }
            }
        }
    }

    /// The oldest handshaking or unauthenticated connection of `peer`.
    fn oldest_untrusted_of(&self, peer: IpAddr) -> Option<u64> {
        self.conns
            .iter()
            .find(|(_, e)| e.sheddable_first() && e.peer == Some(peer))
            .map(|(id, _)| *id)
    }

    /// Whom to shed when the table is full: the oldest untrusted connection
    /// of the peer holding most of them; else the trusted connection idle
    /// longest, if idle for at least `trusted_idle`.
    fn victim(&self, now_ms: u64, trusted_idle: Option<Duration>) -> Option<u64> {
        let heaviest = self
            .untrusted_per_peer
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(ip, _)| *ip);
        if let Some(id) = heaviest.and_then(|ip| self.oldest_untrusted_of(ip)) {
            return Some(id);
        }
        // Untrusted connections without a peer address (none today).
        if let Some((id, _)) = self.conns.iter().find(|(_, e)| e.sheddable_first()) {
            return Some(*id);
        }
        let min_idle = u64::try_from(trusted_idle?.as_millis()).unwrap_or(u64::MAX);
        self.conns
            .iter()
            .map(|(id, e)| (*id, e.shared.last_read_ms.load(Ordering::Relaxed)))
            .filter(|(_, last)| now_ms.saturating_sub(*last) >= min_idle)
            .min_by_key(|(_, last)| *last)
            .map(|(id, _)| id)
    }
}

/// The open connections of one server, with its limits.
#[derive(Debug)]
pub struct ConnTable {
    name: &'static str,
    limits: Limits,
    epoch: Instant,
    inner: Mutex<Inner>,
    shed_full: AtomicU64,
    shed_fds: AtomicU64,
    shed_timeout: AtomicU64,
    refused: AtomicU64,
}

/// Counters since start, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub open: usize,
    pub untrusted: usize,
    pub shed_full: u64,
    pub shed_out_of_fds: u64,
    pub shed_timeout: u64,
    /// New connections closed at once: full of trusted connections.
    pub refused: u64,
}

/// Every live table, for [`render_metrics`].
static TABLES: Mutex<Vec<Weak<ConnTable>>> = Mutex::new(Vec::new());

/// The connection metrics of every table of this process, in the
/// Prometheus text format (appended to each daemon's `/metrics`):
/// `edgekms_connections{server,state}` (open now: all, unauthenticated) and
/// `edgekms_connections_closed_total{server,reason}` (closed by the limits:
/// full, out_of_fds, timeout, refused).
pub fn render_metrics() -> String {
    let tables: Vec<Arc<ConnTable>> = {
        let mut all = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|t| t.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    if tables.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "# HELP edgekms_connections Open connections (all), and those without a client certificate or still in their TLS handshake (unauthenticated).\n# TYPE edgekms_connections gauge\n",
    );
    for t in &tables {
        let s = t.stats();
        out.push_str(&format!(
            "edgekms_connections{{server=\"{}\",state=\"open\"}} {}\nedgekms_connections{{server=\"{}\",state=\"unauthenticated\"}} {}\n",
            t.name, s.open, t.name, s.untrusted
        ));
    }
    out.push_str("# HELP edgekms_connections_closed_total Connections closed by the connection limits: to make room (full), for a descriptor when accept failed (out_of_fds), idle or silent (timeout), or at once because every connection was trusted and busy (refused).\n# TYPE edgekms_connections_closed_total counter\n");
    for t in &tables {
        let s = t.stats();
        for (reason, n) in [
            ("full", s.shed_full),
            ("out_of_fds", s.shed_out_of_fds),
            ("timeout", s.shed_timeout),
            ("refused", s.refused),
        ] {
            out.push_str(&format!(
                "edgekms_connections_closed_total{{server=\"{}\",reason=\"{reason}\"}} {n}\n",
                t.name
            ));
        }
    }
    out
}

impl ConnTable {
    /// A table named `name` (in logs and metrics), swept every second while
    /// it lives.
    pub fn new(name: &'static str, limits: Limits) -> Arc<Self> {
        let table = Arc::new(Self {
            name,
            limits,
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
            shed_full: AtomicU64::new(0),
            shed_fds: AtomicU64::new(0),
            shed_timeout: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(sweep_loop(Arc::downgrade(&table)));
        }
        TABLES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&table));
        table
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the table inconsistent mid-update in
        // a way that matters more than serving on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn stats(&self) -> ConnStats {
        let inner = self.lock();
        ConnStats {
            open: inner.conns.len(),
            untrusted: inner.untrusted_per_peer.values().sum(),
            shed_full: self.shed_full.load(Ordering::Relaxed),
            shed_out_of_fds: self.shed_fds.load(Ordering::Relaxed),
            shed_timeout: self.shed_timeout.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn count(&self, reason: ShedReason) {
        let counter = match reason {
            ShedReason::Full => &self.shed_full,
            ShedReason::OutOfFds => &self.shed_fds,
            ShedReason::Timeout => &self.shed_timeout,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn shed(&self, inner: &mut Inner, id: u64, reason: ShedReason) {
        if let Some(e) = inner.remove(id) {
            e.shared.kill();
            self.count(reason);
        }
    }

    /// Registers a connection just accepted from `peer` in `stage`, shedding
    /// others to make room. `None`: no room (every connection is trusted and
    /// busy); close it.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>, stage: Stage) -> Option<Registration> {
        let now = self.now_ms();
        let mut inner = self.lock();
        if stage != Stage::Trusted {
            if let Some(ip) = peer {
                let held = inner.untrusted_per_peer.get(&ip).copied().unwrap_or(0);
                if held >= self.limits.max_unauthenticated_per_peer {
                    if let Some(id) = inner.oldest_untrusted_of(ip) {
                        self.shed(&mut inner, id, ShedReason::Full);
                    }
                }
            }
        }
        while inner.conns.len() >= self.limits.max_connections {
            match inner.victim(now, self.limits.shed_idle_trusted) {
                Some(id) => self.shed(&mut inner, id, ShedReason::Full),
                None => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let shared = Arc::new(Shared::default());
        shared.last_read_ms.store(now, Ordering::Relaxed);
        if stage != Stage::Trusted {
            if let Some(ip) = peer {
                *inner.untrusted_per_peer.entry(ip).or_insert(0) += 1;
            }
        }
        inner.conns.insert(
            id,
            Entry {
                peer,
                stage,
                stage_ms: now,
                stage_reads: 0,
                shared: shared.clone(),
            },
        );
        Some(Registration {
            table: Arc::downgrade(self),
            id,
            shared,
        })
    }

    /// Sheds one connection after accept() failed with `e`, if `e` means
    /// the process or the system is out of descriptors (or memory); returns
    /// how long the accept loop should wait before trying again.
    pub fn on_accept_error(&self, e: &io::Error, failures: u32) -> Duration {
        let out_of_fds = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if out_of_fds {
            let now = self.now_ms();
            let mut inner = self.lock();
            // Even a trusted connection: the descriptor is needed now.
            let victim = inner
                .victim(now, self.limits.shed_idle_trusted)
                .or_else(|| inner.victim(now, Some(Duration::ZERO)));
            if let Some(id) = victim {
                self.shed(&mut inner, id, ShedReason::OutOfFds);
            }
        }
        // 5 ms, doubling to 1 s: never a busy loop on a listener that stays
        // readable while accept() keeps failing.
        Duration::from_millis(5u64 << failures.min(8)).min(Duration::from_secs(1))
    }

    /// Closes untrusted connections that are idle or too old, and any that
    /// sent nothing since admission; returns how many.
    pub fn sweep(&self) -> usize {
        let now = self.now_ms();
        let l = &self.limits;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut inner = self.lock();
        let expired: Vec<u64> = inner
            .conns
            .iter()
            .filter(|(_, e)| {
                let reads = e.shared.reads.load(Ordering::Relaxed);
                let last = e.shared.last_read_ms.load(Ordering::Relaxed);
                let age = now.saturating_sub(e.stage_ms);
                match e.stage {
                    // The handshake task has its own deadline.
                    Stage::Handshake => false,
                    Stage::Unauthenticated => {
                        now.saturating_sub(last) >= ms(l.unauthenticated_idle)
                            || age >= ms(l.unauthenticated_max_age)
                    }
                    Stage::Trusted => reads == e.stage_reads && age >= ms(l.preface_timeout),
                }
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.shed(&mut inner, *id, ShedReason::Timeout);
        }
        expired.len()
    }
}

/// Sweeps every second and logs what was shed, at most one line a second.
async fn sweep_loop(table: Weak<ConnTable>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = ConnStats::default();
    let mut trimmed = Instant::now();
    loop {
        tick.tick().await;
        let Some(table) = table.upgrade() else {
            return;
        };
        table.sweep();
        let now = table.stats();
        let full = now.shed_full - last.shed_full;
        let fds = now.shed_out_of_fds - last.shed_out_of_fds;
        let timeout = now.shed_timeout - last.shed_timeout;
        let refused = now.refused - last.refused;
        if full + fds + refused > 0 {
            tracing::warn!(
                server = table.name,
                open = now.open,
                unauthenticated = now.untrusted,
                shed_full = full,
                shed_out_of_fds = fds,
                refused,
                "connection limit reached: closed the oldest unauthenticated or idle connections"
            );
        } else if timeout > 0 {
            tracing::info!(
                server = table.name,
                closed = timeout,
                open = now.open,
                "closed idle unauthenticated or silent connections"
            );
        }
        // Connections went away (a flood ended): give the freed heap back to
        // the system, at most every 5 s (glibc keeps it otherwise).
        if now.open < last.open && trimmed.elapsed() >= Duration::from_secs(5) {
            release_free_memory();
            trimmed = Instant::now();
        }
        last = now;
    }
}

/// Returns freed heap pages to the system where the allocator keeps them.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A connection's place in the table; removes it when dropped.
#[derive(Debug)]
pub struct Registration {
    table: Weak<ConnTable>,
    id: u64,
    shared: Arc<Shared>,
}

impl Registration {
    /// Moves the connection to `stage` (after its TLS handshake).
    pub fn set_stage(&self, stage: Stage) {
        let Some(table) = self.table.upgrade() else {
            return;
        };
        let now = table.now_ms();
        let mut inner = table.lock();
        let Some(e) = inner.conns.get_mut(&self.id) else {
            return;
        };
        let was = e.stage;
        let peer = e.peer;
        e.stage = stage;
        e.stage_ms = now;
        e.stage_reads = self.shared.reads.load(Ordering::Relaxed);
        if was != Stage::Trusted && stage == Stage::Trusted {
            inner.dec_peer(peer);
        }
    }

    /// A handle that tells, after the stream is gone, whether it was shed.
    pub fn watch(&self) -> ShedWatch {
        ShedWatch(self.shared.clone())
    }

    /// Wraps the connection's stream.
    pub fn wrap<IO>(self, io: IO) -> Tracked<IO> {
        Tracked { io, reg: self }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade() {
            table.lock().remove(self.id);
        }
    }
}

/// Whether a connection was shed by its table.
#[derive(Debug, Clone)]
pub struct ShedWatch(Arc<Shared>);

impl ShedWatch {
    pub fn is_shed(&self) -> bool {
        self.0.killed.load(Ordering::SeqCst)
    }
}

/// A stream whose reads and writes fail once its table sheds it.
#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    reg: Registration,
}

impl<IO> Tracked<IO> {
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    pub fn registration(&self) -> &Registration {
        &self.reg
    }

    fn check(&self, cx: &mut Context<'_>) -> io::Result<()> {
        let shared = &self.reg.shared;
        shared.waker.register(cx.waker());
        if shared.killed.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection shed",
            ));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let shared = &self.reg.shared;
            shared.reads.fetch_add(1, Ordering::Relaxed);
            if let Some(table) = self.reg.table.upgrade() {
                shared.last_read_ms.store(table.now_ms(), Ordering::Relaxed);
            }
        }
        res
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Tracked<IO> {
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts on a unix listener into `table`: every accepted stream is
/// tracked; accept errors never reach the server (which would retry at
/// once): the loop sheds and backs off instead. Ends when the receiver is
/// dropped.
pub fn unix_incoming(
    listener: tokio::net::UnixListener,
    table: Arc<ConnTable>,
) -> tokio_stream::wrappers::ReceiverStream<Result<Tracked<tokio::net::UnixStream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    failures = 0;
                    let Some(reg) = table.admit(None, Stage::Trusted) else {
                        continue; // dropped: closed at once
                    };
                    if tx.send(Ok(reg.wrap(stream))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let wait = table.on_accept_error(&e, failures);
                    if failures == 0 {
                        tracing::warn!(server = table.name, error = %e, "accept failed; backing off");
                    }
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    fn limits(max: usize, per_peer: usize) -> Limits {
        Limits::central(max, per_peer)
    }

    #[tokio::test]
    async fn full_table_sheds_the_heaviest_peers_oldest_untrusted_connection() {
        let t = ConnTable::new("t", limits(4, 10));
        let a1 = t.admit(ip(1), Stage::Unauthenticated).unwrap();
        let a2 = t.admit(ip(1), Stage::Unauthenticated).unwrap();
        let b1 = t.admit(ip(2), Stage::Unauthenticated).unwrap();
        let op = t.admit(ip(3), Stage::Handshake).unwrap();
        op.set_stage(Stage::Trusted);
        // Full: a newcomer sheds peer 1's oldest (peer 1 holds the most).
        let _n = t.admit(ip(4), Stage::Handshake).unwrap();
        assert!(a1.shared.killed.load(Ordering::SeqCst));
        assert!(!a2.shared.killed.load(Ordering::SeqCst));
        assert!(!b1.shared.killed.load(Ordering::SeqCst));
        assert!(!op.shared.killed.load(Ordering::SeqCst));
        assert_eq!(t.stats().shed_full, 1);
    }

    #[tokio::test]
    async fn per_peer_share_sheds_that_peers_oldest() {
        let t = ConnTable::new("t", limits(100, 2));
        let a1 = t.admit(ip(1), Stage::Handshake).unwrap();
        let a2 = t.admit(ip(1), Stage::Unauthenticated).unwrap();
        let _a3 = t.admit(ip(1), Stage::Handshake).unwrap();
        assert!(a1.shared.killed.load(Ordering::SeqCst));
        assert!(!a2.shared.killed.load(Ordering::SeqCst));
        assert_eq!(t.stats().untrusted, 2);
    }

    #[tokio::test]
    async fn trusted_connections_are_never_shed_by_the_central_table() {
        let t = ConnTable::new("t", limits(2, 10));
        let a = t.admit(ip(1), Stage::Trusted).unwrap();
        let b = t.admit(ip(2), Stage::Trusted).unwrap();
        assert!(t.admit(ip(3), Stage::Handshake).is_none());
        assert!(!a.shared.killed.load(Ordering::SeqCst));
        assert!(!b.shared.killed.load(Ordering::SeqCst));
        assert_eq!(t.stats().refused, 1);
        drop(a);
        assert!(t.admit(ip(3), Stage::Handshake).is_some());
    }

    #[tokio::test]
    async fn out_of_fds_sheds_even_a_trusted_connection_and_backs_off() {
        let t = ConnTable::new("t", limits(10, 10));
        let a = t.admit(ip(1), Stage::Trusted).unwrap();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let w0 = t.on_accept_error(&emfile, 0);
        assert!(a.shared.killed.load(Ordering::SeqCst));
        assert!(w0 >= Duration::from_millis(5));
        assert_eq!(t.on_accept_error(&emfile, 40), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn sweep_closes_idle_unauthenticated_and_silent_trusted_connections() {
        let mut l = limits(10, 10);
        l.unauthenticated_idle = Duration::ZERO;
        l.preface_timeout = Duration::ZERO;
        let t = ConnTable::new("t", l);
        let u = t.admit(ip(1), Stage::Unauthenticated).unwrap();
        let h = t.admit(ip(1), Stage::Handshake).unwrap();
        let s = t.admit(ip(2), Stage::Trusted).unwrap();
        let r = t.admit(ip(3), Stage::Trusted).unwrap();
        r.shared.reads.fetch_add(1, Ordering::Relaxed);
        assert_eq!(t.sweep(), 2);
        assert!(u.shared.killed.load(Ordering::SeqCst));
        assert!(s.shared.killed.load(Ordering::SeqCst));
        assert!(!h.shared.killed.load(Ordering::SeqCst));
        assert!(!r.shared.killed.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn local_table_sheds_the_longest_idle_when_full() {
        let mut l = Limits::local(2);
        l.shed_idle_trusted = Some(Duration::ZERO);
        let t = ConnTable::new("t", l);
        let old = t.admit(None, Stage::Trusted).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let busy = t.admit(None, Stage::Trusted).unwrap();
        let _new = t.admit(None, Stage::Trusted).unwrap();
        assert!(old.shared.killed.load(Ordering::SeqCst));
        assert!(!busy.shared.killed.load(Ordering::SeqCst));
    }
}
