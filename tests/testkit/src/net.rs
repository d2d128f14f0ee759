//! Free loopback TCP ports for test servers. A port is handed out at most
//! once per process, so that tests running side by side never race each
//! other for one (the kernel may hand the same ephemeral port out again as
//! soon as the probing listener is closed).

use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// Ports this process has handed out.
static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());

fn ephemeral() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// A free loopback port, not handed out before by this process.
pub fn free_port() -> u16 {
    let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = ephemeral();
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
}

/// `127.0.0.1:P` with P from [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A free loopback port P with P+1 free too (swtpm's control channel),
/// neither handed out before by this process.
pub fn free_port_pair() -> u16 {
    let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = ephemeral();
        if port < u16::MAX
            && !used.contains(&port)
            && !used.contains(&(port + 1))
            && TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
        {
            used.extend([port, port + 1]);
            return port;
        }
    }
}
