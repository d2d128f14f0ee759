//! The configuration idiom both daemons follow: one struct serves as
//! command-line flags and as a TOML file with the same keys; flags win
//! over the file; validation reports every bad field at once. This module
//! holds the parts they share: reading the file, the log format, the
//! `--sealer` flag's parser, the backup key file, and the clock. What a
//! sealer choice means lives in [`edgekms_hsm::config`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::ValueEnum;
use edgekms_hsm::{Key256, SealerKind};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use zeroize::Zeroizing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The `--sealer` flag of both daemons: `tpm` or `soft`, listed in `--help`
/// and in clap's error for any other value.
pub fn sealer_kind_parser() -> impl TypedValueParser<Value = SealerKind> {
    PossibleValuesParser::new(SealerKind::NAMES).try_map(|name| name.parse::<SealerKind>())
}

/// Reads a TOML config file into `T` (whose unknown keys the caller's
/// `deny_unknown_fields` refuses).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config {}: {}", path.display(), e.message()))
}

/// `--metrics-addr` / `--no-metrics` from flags over the config file: a
/// flag wins in both directions (`--metrics-addr` turns on what the file's
/// `no_metrics = true` turned off; `--no-metrics` turns off the file's
/// address). Returns the merged `(metrics_addr, no_metrics)`.
pub fn merge_metrics_flags(
    flag: (Option<SocketAddr>, bool),
    file: (Option<SocketAddr>, bool),
) -> (Option<SocketAddr>, bool) {
    let (addr, off) = flag;
    let (file_addr, file_off) = file;
    if off {
        (None, true)
    } else {
        (addr.or(file_addr), addr.is_none() && file_off)
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A backup key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("key file {path}: {reason}")]
pub struct KeyFileError {
    pub path: String,
    pub reason: String,
}

/// Reads a backup key file (`openssl rand -hex 32 > backup.key`): 64 hex
/// digits, surrounding white space ignored.
pub fn read_key_file(path: &Path) -> Result<Key256, KeyFileError> {
    let err = |reason: String| KeyFileError {
        path: path.display().to_string(),
        reason,
    };
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    Key256::from_hex(&text).ok_or_else(|| {
        err("must hold 32 random bytes as 64 hex digits, e.g. from `openssl rand -hex 32` or `head -c 32 /dev/urandom | xxd -p -c 64`".into())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_metrics_flag_wins_over_the_file_both_ways() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert_eq!(
            merge_metrics_flags((None, false), (Some(b), false)),
            (Some(b), false)
        );
        assert_eq!(
            merge_metrics_flags((Some(a), false), (Some(b), false)),
            (Some(a), false)
        );
        assert_eq!(
            merge_metrics_flags((Some(a), false), (None, true)),
            (Some(a), false)
        );
        assert_eq!(
            merge_metrics_flags((None, true), (Some(b), false)),
            (None, true)
        );
        assert_eq!(
            merge_metrics_flags((None, false), (None, true)),
            (None, true)
        );
    }

    #[test]
    fn key_files_hold_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key256::generate();
        let path = dir.path().join("k");
        std::fs::write(&path, format!("{}\n", hex::encode(key.expose()))).unwrap();
        assert!(read_key_file(&path).unwrap() == key);
        std::fs::write(&path, "zz".repeat(32)).unwrap();
        let e = read_key_file(&path).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        assert!(read_key_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_sealer_flag_takes_tpm_or_soft() {
        #[derive(clap::Parser)]
        struct Flags {
            #[arg(long, value_parser = sealer_kind_parser())]
            sealer: Option<SealerKind>,
        }
        use clap::Parser as _;
        let parse = |v: &str| Flags::try_parse_from(["x", "--sealer", v]).map(|f| f.sealer);
        assert_eq!(parse("soft").unwrap(), Some(SealerKind::Soft));
        assert_eq!(parse("tpm").unwrap(), Some(SealerKind::Tpm));
        let e = parse("hsm").map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("tpm") && e.contains("soft"), "{e}");
    }
}
