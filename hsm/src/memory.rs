//! Process memory hygiene for a process that holds keys: no core dumps, no
//! ptrace by other users, key pages locked against swap.

use std::sync::atomic::{AtomicBool, Ordering};

static LOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// Makes the process non-dumpable and disables core files, so that a crash
/// or `gcore` cannot write key material to disk. Call first thing in `main`.
pub fn harden_process() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE) and setrlimit take plain integers and a
    // pointer to a local struct; neither touches Rust-managed memory.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True when [`harden_process`] is in force.
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

/// Locks the pages holding `len` bytes at `ptr` in RAM. Pages stay locked
/// after the key is dropped (another key may share the page); the cost is
/// bounded by the number of keys. Warns once where the system refuses
/// (RLIMIT_MEMLOCK), and carries on: refusing to run would be worse.
pub fn lock(ptr: *const u8, len: usize) {
    // SAFETY: mlock only changes page attributes of a range we own.
    let rc = unsafe { libc::mlock(ptr.cast(), len) };
    if rc != 0 && !LOCK_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lock key memory against swapping (raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK); keys may reach swap"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hardening_makes_the_process_non_dumpable() {
        // Tests run in one process; harden it and check the flag took.
        super::harden_process().unwrap();
        assert!(!super::is_dumpable());
    }
}
