//! Crash points for the crash-safety tests: when `EDGEKMS_FAILPOINT` names
//! a point, the process kills itself there with SIGKILL, exactly as an
//! operator's `kill -9` or a power cut would. Unset (always, outside
//! tests), a point costs one environment lookup at a rare state change.

/// Dies here if `EDGEKMS_FAILPOINT` is `name`.
pub fn hit(name: &str) {
    if std::env::var_os("EDGEKMS_FAILPOINT").is_some_and(|v| v == name) {
        tracing::warn!(failpoint = name, "failpoint: killing this process");
        // SAFETY: kill(2) on our own pid; no memory is involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
