//! A real software TPM for tests and benches: swtpm on free loopback TCP
//! ports (tss-esapi 7.7's swtpm TCTI takes only `host=` and `port=`, no unix
//! socket `path=`) with its state in a directory of the caller's, stopped on
//! drop; and the rule for when swtpm is missing: a test skips with a
//! message, unless `EDGEKMS_REQUIRE_SWTPM=1` (as CI sets) makes that a
//! failure.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::net::free_port_pair;
use crate::process::{try_signal, Daemon};
use crate::skip;

const REQUIRE: &str = "EDGEKMS_REQUIRE_SWTPM";

/// Whether `EDGEKMS_REQUIRE_SWTPM=1`: a missing swtpm fails the tests.
pub fn required() -> bool {
    skip::required(REQUIRE)
}

fn installed() -> bool {
    skip::runs(Path::new("swtpm"))
}

/// Whether the swtpm tests can run. When swtpm is missing, says so (the
/// test then skips) or, under `EDGEKMS_REQUIRE_SWTPM=1`, fails the test.
pub fn available() -> bool {
    let missing = (!installed()).then(|| "the swtpm binary is not on PATH".to_owned());
    skip::may_run(REQUIRE, missing, "apt-get install swtpm swtpm-tools")
}

/// Fails unless swtpm is installed: for benches, which cannot skip.
pub fn require() {
    assert!(
        installed(),
        "swtpm is needed: apt-get install swtpm swtpm-tools"
    );
}

/// A swtpm on state of its own in a fresh temporary directory (the state
/// in `dir/state`; the directory is the caller's to use too), or `None`
/// when the test is to skip (see [`available`]).
pub fn fresh() -> Option<(tempfile::TempDir, Swtpm)> {
    if !available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&dir.path().join("state"));
    Some((dir, tpm))
}

/// One running swtpm; stopped (SIGCONT, SIGTERM so that it writes its
/// state, then SIGKILL if it lingers) on drop.
pub struct Swtpm {
    pub state: PathBuf,
    port: u16,
    daemon: Daemon,
}

impl Swtpm {
    /// Starts swtpm on the state directory `state` (created if needed),
    /// logging to `state/swtpm.log`, and waits until it answers.
    pub fn start(state: &Path) -> Swtpm {
        std::fs::create_dir_all(state).unwrap();
        let log = state.join("swtpm.log");
        for _attempt in 0..5 {
            let port = free_port_pair();
            let mut cmd = Command::new("swtpm");
            cmd.args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1));
            let mut daemon = Daemon::spawn("swtpm", cmd, &log);
            let deadline = Instant::now() + Duration::from_secs(10);
            let ready = loop {
                if daemon.try_exit().is_some() {
                    break false; // lost the port race, or bad state: try another pair
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Make sure it is our swtpm that answered, not a
                    // stranger on the port while ours dies of EADDRINUSE.
                    std::thread::sleep(Duration::from_millis(30));
                    break daemon.try_exit().is_none();
                }
                if Instant::now() > deadline {
                    daemon.kill();
                    break false;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            if ready {
                return Swtpm {
                    state: state.to_owned(),
                    port,
                    daemon,
                };
            }
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("swtpm did not start on {}: {log}", state.display());
    }

    /// The TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Freezes swtpm (SIGSTOP): connections are still accepted by the
    /// kernel, but no command is answered until [`Swtpm::resume`].
    pub fn pause(&self) {
        self.daemon.signal("STOP");
    }

    pub fn resume(&self) {
        self.daemon.signal("CONT");
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

    /// Stops swtpm, keeping its state directory, and returns it (to start
    /// again on the same state: a TPM reset).
    pub fn stop(mut self) -> PathBuf {
        self.terminate();
        self.state.clone()
    }

    fn terminate(&mut self) {
        if self.daemon.is_running() {
            // A paused swtpm would not act on SIGTERM.
            try_signal(self.daemon.pid(), "CONT");
        }
        self.daemon.terminate(Duration::from_secs(5));
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.terminate();
    }
}
