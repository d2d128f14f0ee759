//! `edgekms-server restore` is all or nothing, on real processes: a target
//! that holds anything is refused untouched; an unreachable TPM, or a
//! restore killed just before its rename, leaves the target as it was and
//! no staging dir behind (a killed one's is removed by the next restore);
//! and join tokens unused at backup time are refused by the restored
//! service, even one a node used after the backup.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use edgekms_e2e::fleet::{enrol, join, node_args, text, Server};
use edgekms_e2e::{bin, free_port, Plugin};
use edgekms_testkit::files::tree;

/// `edgekms-server restore FILE --key-file KEY --data-dir DIR ARGS`, run
/// to completion with `env` added.
fn restore(b: &Backup, data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin("edgekms-server"))
        .arg("restore")
        .arg(&b.file)
        .arg("--key-file")
        .arg(&b.key_file)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

const SOFT: &[&str] = &["--sealer", "soft"];

/// A backup file of a served data dir, and its key.
struct Backup {
    file: PathBuf,
    key_file: PathBuf,
}

/// `kmsctl backup` of `server` into `dir`.
fn back_up(server: &Server, dir: &Path) -> Backup {
    let key_file = dir.join("backup.key");
    std::fs::write(&key_file, format!("{}\n", "42".repeat(32))).unwrap();
    let file = dir.join("edgekms.bak");
    server.kmsctl_json(&[
        "backup",
        file.to_str().unwrap(),
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    Backup { file, key_file }
}

/// A server with one cluster, backed up, then stopped: the backup and the
/// operator credentials (kept in the old data dir).
async fn a_backup(dir: &Path) -> (Backup, PathBuf) {
    let mut server = Server::start(dir).await;
    server.add_node("edge-1", "n1");
    let b = back_up(&server, dir);
    assert_eq!(server.stop().await, Some(0));
    (b, server.operator_dir())
}

/// The restore staging dirs in `parent` (`.NAME.restore-PID`).
fn staging_dirs(parent: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.contains(".restore-"))
        .collect();
    v.sort();
    v
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_holds_a_file_is_refused_and_left_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, _) = a_backup(tmp.path()).await;
    let parent = tmp.path().join("restores");
    let target = parent.join("data");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("ca.pem"), b"someone else's CA\n").unwrap();
    let before = tree(&parent);

    // Twice: the reported bug said "holds a partial state" on the retry.
    for _ in 0..2 {
        let out = restore(&b, &target, SOFT, &[]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = stderr(&out);
        assert!(
            err.contains("is not empty (it holds ca.pem)") && err.contains("nothing was written"),
            "{err}"
        );
        assert!(!err.contains("partial"), "{err}");
        assert_eq!(tree(&parent), before, "the target changed");
        assert!(staging_dirs(&parent).is_empty());
    }

    // Checked first: before the backup is even read.
    let no_backup = Backup {
        file: tmp.path().join("missing.bak"),
        key_file: b.key_file.clone(),
    };
    let out = restore(&no_backup, &target, SOFT, &[]);
    assert!(stderr(&out).contains("is not empty"), "{}", text(&out));
    assert_eq!(tree(&parent), before);

    // Emptied, the same dir takes the restore.
    std::fs::remove_file(target.join("ca.pem")).unwrap();
    let out = restore(&b, &target, SOFT, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(target.join("ca.pem").exists());
    assert!(staging_dirs(&parent).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_tpm_leaves_no_data_dir_and_no_staging_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, _) = a_backup(tmp.path()).await;
    let parent = tmp.path().join("restores");
    std::fs::create_dir(&parent).unwrap();
    let target = parent.join("data");
    // A port nobody listens on: the TPM is unreachable.
    let tcti = format!("swtpm:host=127.0.0.1,port={}", free_port());
    let out = restore(&b, &target, &["--sealer", "tpm", "--tpm-tcti", &tcti], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("no TPM reachable"), "{}", text(&out));
    assert!(!target.exists(), "{} was left behind", target.display());
    assert!(
        std::fs::read_dir(&parent).unwrap().next().is_none(),
        "{:?}",
        tree(&parent)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_before_its_rename_leaves_the_target_and_the_next_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, operator) = a_backup(tmp.path()).await;
    let parent = tmp.path().join("restores");
    let target = parent.join("data");
    std::fs::create_dir_all(&target).unwrap();

    let child = Command::new(bin("edgekms-server"))
        .arg("restore")
        .arg(&b.file)
        .arg("--key-file")
        .arg(&b.key_file)
        .arg("--data-dir")
        .arg(&target)
        .args(SOFT)
        .env("RUST_LOG", "warn")
        .env("EDGEKMS_FAILPOINT", "restore-before-rename")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", text(&out));
    // The target is the empty dir it was; the killed restore's staging
    // dir, complete but never placed, is all that is left.
    assert!(std::fs::read_dir(&target).unwrap().next().is_none());
    let stale = format!(".data.restore-{pid}");
    assert_eq!(staging_dirs(&parent), [stale.as_str()]);

    // The next restore removes it, and succeeds.
    let out = restore(&b, &target, SOFT, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "removed {}, left by an interrupted restore",
            parent.join(&stale).display()
        )),
        "{said}"
    );
    assert!(staging_dirs(&parent).is_empty());
    let server = Server::serve(&target).await;
    let status = server.kmsctl_json_as(&operator, &["status", "edge-1"]);
    assert_eq!(status["clusters"][0]["name"], "edge-1", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_unused_at_backup_time_are_refused_after_restore_and_new_ones_work() {
    let tmp = tempfile::tempdir().unwrap();
    let mut old = Server::start(tmp.path()).await;
    // n0 joined before the backup; n1 and n2 are only invited.
    let n0 = enrol(&old, tmp.path(), "edge-1", "n0").await;
    let (t1, hash) = old.add_node("edge-1", "n1");
    let (t2, _) = old.add_node("edge-1", "n2");
    let b = back_up(&old, tmp.path());
    // After the backup, n1 joins the old service with its token.
    let out = join(&old, &tmp.path().join("n1-old"), "edge-1", "n1", &t1, &hash);
    assert!(out.status.success(), "{}", text(&out));
    drop(n0);
    assert_eq!(old.stop().await, Some(0));
    let operator = old.operator_dir();

    let new_dir = tmp.path().join("restored");
    let out = restore(&b, &new_dir, SOFT, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(
            "join tokens withdrawn: 2 (edge-1/n1, edge-1/n2): issue new ones with `kmsctl node add`"
        ),
        "{said}"
    );

    let new = Server::serve(&new_dir).await;
    // The used one and the never used one are both refused.
    for (node, token) in [("n1", &t1), ("n2", &t2)] {
        let out = join(
            &new,
            &tmp.path().join(format!("{node}-new")),
            "edge-1",
            node,
            token,
            &hash,
        );
        assert!(!out.status.success(), "{node}: {}", text(&out));
        assert!(
            text(&out).contains("join token is not valid"),
            "{node}: {}",
            text(&out)
        );
    }
    // The restore is audited with what it withdrew.
    let audit = new.kmsctl_json_as(&operator, &["audit"]);
    let restore_rec = audit
        .as_array()
        .unwrap()
        .iter()
        .rfind(|r| r["event"] == "restore")
        .unwrap();
    assert!(
        restore_rec["detail"]
            .as_str()
            .unwrap()
            .contains("withdrawn: 2 (edge-1/n1, edge-1/n2)"),
        "{restore_rec}"
    );

    // The restored cluster reconciles and waits for n0, which is gone:
    // the operator names it to go on without it.
    let c = new.kmsctl_json_as(&operator, &["status", "edge-1"]);
    assert_eq!(
        c["clusters"][0]["reconciling"]["waiting_for"],
        serde_json::json!(["n0"]),
        "{c:#}"
    );
    new.kmsctl_json_as(&operator, &["reconcile", "edge-1", "--without", "n0"]);
    // A new token for n1 works: it joins, and its plugin gets the keys.
    let v = new.kmsctl_json_as(&operator, &["node", "add", "edge-1", "n1"]);
    let dir = tmp.path().join("n1-again");
    let out = join(
        &new,
        &dir,
        "edge-1",
        "n1",
        v["token"].as_str().unwrap(),
        &hash,
    );
    assert!(out.status.success(), "{}", text(&out));
    let p = Plugin::spawn(&dir, node_args(&dir, "edge-1", "n1"));
    p.wait_healthy().await;
}
