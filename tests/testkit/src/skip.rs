//! Whether a test that needs an outside program (swtpm, etcd,
//! kube-apiserver) may run: it skips, saying why, when the program is
//! missing, unless CI's `EDGEKMS_REQUIRE_*=1` makes that a failure.

use std::path::Path;
use std::process::{Command, Stdio};

/// Whether `var` is `1`: a missing program fails the tests.
pub fn required(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

/// Whether `program --version` runs and succeeds.
pub fn runs(program: &Path) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `true` when nothing is `missing`; otherwise fails the test under
/// `var=1`, or says SKIPPED with `missing` and `how` (how to get it) and
/// returns `false`.
pub fn may_run(var: &str, missing: Option<String>, how: &str) -> bool {
    let Some(why) = missing else {
        return true;
    };
    assert!(!required(var), "{var}=1 but {why} ({how})");
    eprintln!("SKIPPED: {why} ({how}, or set {var}=1 to make this a failure)");
    false
}
