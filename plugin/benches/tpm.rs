//! `cargo bench -p edgekms-plugin --bench tpm`: against a real swtpm started
//! here, the time of one seal and one unseal of the node sealing key, and
//! plugin start-up to healthz "ok" with 1 and with 1,000 cached KEK versions
//! (target: 1,000 within 1.5 times 1; the TPM is used once per start,
//! whatever the number of versions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edgekms_hsm::tpm::{TpmConfig, TpmSealer};
use edgekms_hsm::{Key256, Sealer};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    // swtpm on a free loopback port pair (P for commands, P+1 for control).
    let port = loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break p;
        }
    };
    let state = dir.path().join("tpm");
    std::fs::create_dir_all(&state).unwrap();
    let _swtpm = Proc(
        Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is needed: apt-get install swtpm swtpm-tools"),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "swtpm did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");

    let sealer = TpmSealer::new(TpmConfig {
        tcti: tcti.clone(),
        ..TpmConfig::default()
    })
    .unwrap();
    let key = Key256::generate();
    let (mut seals, mut unseals) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        let t = Instant::now();
        let blob = sealer.seal(&key).unwrap();
        seals.push(t.elapsed());
        let t = Instant::now();
        assert!(sealer.unseal(&blob).unwrap() == key);
        unseals.push(t.elapsed());
    }
    drop(sealer);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = dir.path().join("node");
    std::fs::create_dir_all(&node).unwrap();
    let tpm_flags = vec!["--sealer".into(), "tpm".into(), "--tpm-tcti".into(), tcti];
    let (one, thousand) = rt.block_on(async {
        let one = startup(&node, &tpm_flags, 5).await;
        grow_to(&node, &tpm_flags, 1000).await;
        (one, startup(&node, &tpm_flags, 5).await)
    });

    println!("edgekms TPM benchmark against swtpm (ECC P-256 storage primary, release build)");
    println!("machine: {}", machine());
    println!("seal NSK:   {} ms (median of 9)", ms(median(seals)));
    println!("unseal NSK: {} ms (median of 9)", ms(median(unseals)));
    println!(
        "start-up to healthz ok, 1 KEK version:      {} ms (median of 5)",
        ms(one)
    );
    println!(
        "start-up to healthz ok, 1,000 KEK versions: {} ms (median of 5)",
        ms(thousand)
    );
    println!(
        "ratio 1,000 / 1: {:.2} (target <= 1.50)",
        thousand.as_secs_f64() / one.as_secs_f64()
    );
}
