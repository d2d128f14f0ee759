//! The lifecycle of a daemon that a test runs as a child process: where the
//! built binary is, spawning it with its output appended to a log file,
//! reading that log, signals by name, waiting for its exit with a deadline,
//! and killing it when the test lets go of it. What the daemon is (its
//! flags, its sockets, its readiness) belongs to the caller.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary built next to the running test executable,
/// or in `EDGEKMS_BIN_DIR` when set (for worktrees sharing one target dir).
pub fn target_bin(name: &str) -> PathBuf {
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

/// A command running `program`, under an open-file limit of `nofile` (soft
/// and hard, so the program cannot raise it; via prlimit) when one is given.
pub fn command_with_nofile(program: &Path, nofile: Option<u64>) -> Command {
    match nofile {
        Some(n) => {
            let mut cmd = Command::new("prlimit");
            cmd.arg(format!("--nofile={n}:{n}")).arg("--").arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Sends signal `sig` (a name as `kill -l` lists it: TERM, KILL, STOP,
/// CONT, HUP...) to `pid`; fails the test if it cannot.
pub fn signal(pid: u32, sig: &str) {
    assert!(try_signal(pid, sig), "kill -{sig} {pid} failed");
}

/// [`signal`] that only says whether it was sent (for clean-ups).
pub fn try_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A daemon child process whose stdout and stderr are appended to a log
/// file; killed (SIGKILL) and reaped on drop unless stopped before.
pub struct Daemon {
    /// What it is, for failure messages ("plugin", "server", "swtpm").
    name: &'static str,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Spawns `cmd` (stdin closed, stdout and stderr appended to `log`).
    pub fn spawn(name: &'static str, cmd: Command, log: &Path) -> Daemon {
        let mut d = Daemon {
            name,
            log: log.to_owned(),
            child: None,
        };
        d.respawn(cmd);
        d
    }

    /// Spawns `cmd` again under this daemon (the previous process must be
    /// gone), appending to the same log.
    pub fn respawn(&mut self, mut cmd: Command) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{} log {}: {e}", self.name, self.log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({cmd:?}): {e}", self.name));
        self.child = Some(child);
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The whole log so far (empty if there is none yet).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log_text();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process is ours still: started and not yet seen to exit.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id (fails the test when it is not running).
    pub fn pid(&self) -> u32 {
        match &self.child {
            Some(c) => c.id(),
            None => panic!("{} is not running", self.name),
        }
    }

    /// Sends signal `sig` by name (see [`signal`]).
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Its exit status if it has exited (then it is no longer running).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// SIGTERM, then waits up to `within` for the exit; fails the test (after
    /// a SIGKILL) if it lingers. `None` when it was not running.
    pub fn stop(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = self.ask_to_stop(within)?;
        loop {
            if let Some(status) = self.stopped_by(deadline, within) {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`Daemon::stop`] that yields to the tokio runtime while it waits, so
    /// that the test's own connections keep running while the daemon drains.
    pub async fn stop_async(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = self.ask_to_stop(within)?;
        loop {
            if let Some(status) = self.stopped_by(deadline, within) {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM if running: the deadline to exit by.
    fn ask_to_stop(&mut self, within: Duration) -> Option<Instant> {
        self.child.as_ref()?;
        self.signal("TERM");
        Some(Instant::now() + within)
    }

    /// Its exit status once it has exited; fails the test (after a SIGKILL)
    /// past `deadline`.
    fn stopped_by(&mut self, deadline: Instant, within: Duration) -> Option<ExitStatus> {
        let status = self.try_exit();
        if status.is_none() && Instant::now() > deadline {
            self.kill();
            panic!("{} did not stop within {within:?} of SIGTERM", self.name);
        }
        status
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; never fails (for
    /// drops, and for daemons that write their state on SIGTERM).
    pub fn terminate(&mut self, grace: Duration) {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return;
        };
        if self.try_exit().is_some() {
            return;
        }
        try_signal(pid, "TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.try_exit().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    /// SIGKILL, as `kill -9`, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `within` for the process to exit by itself (a failpoint,
    /// a start-up error); its exit status, or `None` if it still runs (or
    /// was not running).
    pub fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            self.child.as_ref()?;
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `within` for the process to exit by itself; fails the
    /// test (after a SIGKILL) if it still runs. `None` when it was not
    /// running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        self.child.as_ref()?;
        match self.exited_within(within) {
            Some(status) => Some(status),
            None => {
                self.kill();
                panic!("{} still running after {within:?}", self.name);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
