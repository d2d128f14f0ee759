//! Choosing and opening a sealer: the one home of that choice for both
//! daemons.
//!
//! [`SealerConfig`] is what an operator sets (`--sealer`, `--tpm-tcti`,
//! `--tpm-pcrs`, `--tpm-owner-auth-file`, or the same keys in a config
//! file); [`SealerConfig::validate`] reports every problem with it at once;
//! [`open`] builds the sealer it names, and never falls back to another one.
//! A build without the `tpm` feature fails [`open`] for `tpm` with
//! [`SealError::Unsupported`]: this is the only place that knows.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::{SealError, Sealer};

/// The kernel's resource-managed TPM device.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// The soft sealer's key file, inside the data dir.
pub const SOFT_KEY_FILE: &str = "soft-sealer.key";

/// Which backend seals the key: the `--sealer` flag, the `sealer` config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SealerKind {
    /// TPM 2.0 (the default, and the only choice outside development).
    #[default]
    Tpm,
    /// Key file on disk. INSECURE: development only.
    Soft,
}

impl SealerKind {
    /// Every kind, as written in flags and config files.
    pub const NAMES: [&'static str; 2] = ["tpm", "soft"];

    /// The name in flags, config files and [`Sealer::name`].
    pub fn name(self) -> &'static str {
        match self {
            SealerKind::Tpm => "tpm",
            SealerKind::Soft => "soft",
        }
    }
}

impl fmt::Display for SealerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SealerKind {
    type Err = SealError;

    fn from_str(s: &str) -> Result<Self, SealError> {
        match s {
            "tpm" => Ok(SealerKind::Tpm),
            "soft" => Ok(SealerKind::Soft),
            other => Err(SealError::Config(format!(
                "unknown sealer {other:?} (tpm, or soft for development)"
            ))),
        }
    }
}

/// The sealer an operator chose, with its TPM options. Holds no secret:
/// the owner auth stays in its file until [`open`] reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealerConfig {
    pub kind: SealerKind,
    /// A tss-esapi TCTI string [default: [`DEFAULT_TCTI`]].
    pub tpm_tcti: Option<String>,
    /// PCRs to bind the key to, e.g. `sha256:0,2,7` [default: none].
    pub tpm_pcrs: Option<String>,
    /// File holding the owner-hierarchy authorization, when one is set.
    pub tpm_owner_auth_file: Option<PathBuf>,
}

/// Everything wrong with a [`SealerConfig`], one item per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct ConfigProblems(pub Vec<String>);

impl SealerConfig {
    /// The TCTI to use: the configured one or [`DEFAULT_TCTI`].
    pub fn tcti(&self) -> &str {
        self.tpm_tcti.as_deref().unwrap_or(DEFAULT_TCTI)
    }

    /// Checks every field (no I/O: the owner auth file is read by [`open`])
    /// and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigProblems> {
        let mut problems = Vec::new();
        match self.kind {
            SealerKind::Soft => {
                let given: Vec<&str> = [
                    ("--tpm-tcti", self.tpm_tcti.is_some()),
                    ("--tpm-pcrs", self.tpm_pcrs.is_some()),
                    ("--tpm-owner-auth-file", self.tpm_owner_auth_file.is_some()),
                ]
                .into_iter()
                .filter_map(|(flag, set)| set.then_some(flag))
                .collect();
                if !given.is_empty() {
                    problems.push(format!(
                        "--tpm-* options given but --sealer is soft ({}): drop them, or use --sealer tpm",
                        given.join(", ")
                    ));
                }
            }
            SealerKind::Tpm => {
                if self
                    .tpm_tcti
                    .as_deref()
                    .is_some_and(|t| t.trim().is_empty())
                {
                    problems.push(format!(
                        "--tpm-tcti is empty (e.g. {DEFAULT_TCTI}, or swtpm:host=127.0.0.1,port=2321)"
                    ));
                }
                #[cfg(feature = "tpm")]
                if let Some(Err(e)) = self.tpm_pcrs.as_deref().map(crate::tpm::PcrPolicy::parse) {
                    problems.push(format!("--tpm-pcrs: {e}"));
                }
                if self
                    .tpm_owner_auth_file
                    .as_ref()
                    .is_some_and(|p| p.as_os_str().is_empty())
                {
                    problems.push("--tpm-owner-auth-file is empty: name the file that holds the owner auth, or leave it out".to_owned());
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigProblems(problems))
        }
    }
}

/// What [`open`] may do about a missing soft-sealer key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftKeyFile {
    /// A missing file is made by the first seal (a new data dir; a node,
    /// whose unseal then names the missing file).
    MayCreate,
    /// A missing file is refused here: a key is sealed under it, and a new
    /// one would open nothing (serving an initialized data dir).
    MustExist,
}

/// Builds the sealer `cfg` names, for the data dir `data_dir` (where the
/// soft sealer keeps [`SOFT_KEY_FILE`]). Never falls back to another
/// sealer. Does not create `data_dir`: the caller does, with its mode.
pub fn open(
    cfg: &SealerConfig,
    data_dir: &Path,
    key_file: SoftKeyFile,
) -> Result<Box<dyn Sealer>, SealError> {
    cfg.validate()
        .map_err(|problems| SealError::Config(problems.to_string()))?;
    match cfg.kind {
        SealerKind::Soft => {
            let path = data_dir.join(SOFT_KEY_FILE);
            if key_file == SoftKeyFile::MustExist && !path.exists() {
                return Err(SealError::SoftKeyFile {
                    path: path.display().to_string(),
                    problem: "is missing (deleted, or not copied with the data dir), and a key is sealed under it".into(),
                });
            }
            Ok(Box::new(crate::soft::SoftSealer::open_or_create(&path)?))
        }
        SealerKind::Tpm => open_tpm(cfg),
    }
}

#[cfg(feature = "tpm")]
fn open_tpm(cfg: &SealerConfig) -> Result<Box<dyn Sealer>, SealError> {
    use crate::tpm::{PcrPolicy, TpmConfig, TpmSealer};
    use zeroize::Zeroizing;
    let pcrs = cfg.tpm_pcrs.as_deref().map(PcrPolicy::parse).transpose()?;
    let owner_auth = match &cfg.tpm_owner_auth_file {
        Some(path) => {
            let text =
                Zeroizing::new(
                    std::fs::read_to_string(path).map_err(|source| SealError::Io {
                        op: format!("read TPM owner auth {}", path.display()),
                        source,
                    })?,
                );
            Some(Zeroizing::new(
                text.trim_end_matches(['\r', '\n']).to_owned(),
            ))
        }
        None => None,
    };
    Ok(Box::new(TpmSealer::new(TpmConfig {
        tcti: cfg.tcti().to_owned(),
        pcrs,
        owner_auth,
    })?))
}

#[cfg(not(feature = "tpm"))]
fn open_tpm(_: &SealerConfig) -> Result<Box<dyn Sealer>, SealError> {
    Err(SealError::Unsupported(
        "--sealer tpm (this build has no `tpm` feature)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Key256;

    fn soft() -> SealerConfig {
        SealerConfig {
            kind: SealerKind::Soft,
            ..SealerConfig::default()
        }
    }

    #[test]
    fn kinds_parse_print_and_default_to_tpm() {
        assert_eq!(SealerConfig::default().kind, SealerKind::Tpm);
        assert_eq!(SealerConfig::default().tcti(), DEFAULT_TCTI);
        for name in SealerKind::NAMES {
            let kind: SealerKind = name.parse().unwrap();
            assert_eq!(kind.to_string(), name);
        }
        let e = "hsm".parse::<SealerKind>().unwrap_err().to_string();
        assert!(e.contains("\"hsm\"") && e.contains("tpm"), "{e}");
    }

    #[test]
    fn tpm_options_with_a_soft_sealer_are_named() {
        assert_eq!(soft().validate(), Ok(()));
        let e = SealerConfig {
            tpm_pcrs: Some("sha256:7".into()),
            tpm_owner_auth_file: Some("/etc/owner".into()),
            ..soft()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--tpm-* options given but --sealer is soft"),
            "{e}"
        );
        assert!(
            e.contains("--tpm-pcrs") && e.contains("--tpm-owner-auth-file"),
            "{e}"
        );
        assert!(!e.contains("--tpm-tcti"), "{e}");
    }

    #[test]
    fn every_tpm_problem_is_reported_at_once() {
        let cfg = SealerConfig {
            kind: SealerKind::Tpm,
            tpm_tcti: Some(" ".into()),
            tpm_pcrs: Some("sha256:99".into()),
            tpm_owner_auth_file: Some(PathBuf::new()),
        };
        let problems = cfg.validate().unwrap_err();
        let text = problems.to_string();
        assert!(text.contains("--tpm-tcti is empty"), "{text}");
        assert!(text.contains("--tpm-owner-auth-file is empty"), "{text}");
        #[cfg(feature = "tpm")]
        {
            assert_eq!(problems.0.len(), 3, "{text}");
            assert!(text.contains("--tpm-pcrs") && text.contains("99"), "{text}");
        }
        let good = SealerConfig {
            tpm_tcti: Some("swtpm:host=127.0.0.1,port=2321".into()),
            tpm_pcrs: Some("sha256:0,2,7".into()),
            tpm_owner_auth_file: Some("/etc/edgekms/owner-auth".into()),
            ..SealerConfig::default()
        };
        assert_eq!(good.validate(), Ok(()));
    }

    #[test]
    fn open_soft_may_create_or_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join(SOFT_KEY_FILE);
        match open(&soft(), dir.path(), SoftKeyFile::MustExist) {
            Err(e @ SealError::SoftKeyFile { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("is missing") && msg.contains(SOFT_KEY_FILE),
                    "{msg}"
                );
            }
            other => panic!("expected SoftKeyFile, got {:?}", other.map(|s| s.name())),
        }
        assert!(!key_file.exists(), "MustExist never creates the key file");

        let sealer = open(&soft(), dir.path(), SoftKeyFile::MayCreate).unwrap();
        assert_eq!(sealer.name(), "soft");
        assert!(!sealer.is_hardware_backed());
        let key = Key256::generate();
        let blob = sealer.seal(&key).unwrap();
        assert!(key_file.exists(), "the first seal makes the key file");

        let again = open(&soft(), dir.path(), SoftKeyFile::MustExist).unwrap();
        assert!(again.unseal(&blob).unwrap() == key);
    }

    #[test]
    fn open_refuses_an_invalid_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SealerConfig {
            tpm_tcti: Some("device:/dev/tpmrm0".into()),
            ..soft()
        };
        match open(&cfg, dir.path(), SoftKeyFile::MayCreate) {
            Err(SealError::Config(msg)) => assert!(msg.contains("--sealer is soft"), "{msg}"),
            other => panic!("expected Config, got {:?}", other.map(|s| s.name())),
        }
    }

    #[cfg(not(feature = "tpm"))]
    #[test]
    fn open_tpm_without_the_feature_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        match open(&SealerConfig::default(), dir.path(), SoftKeyFile::MayCreate) {
            Err(e @ SealError::Unsupported(_)) => {
                assert!(e.to_string().contains("tpm"), "{e}");
            }
            other => panic!("expected Unsupported, got {:?}", other.map(|s| s.name())),
        }
    }

    #[cfg(feature = "tpm")]
    #[test]
    fn open_tpm_reads_the_owner_auth_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SealerConfig {
            tpm_owner_auth_file: Some(dir.path().join("missing")),
            ..SealerConfig::default()
        };
        match open(&cfg, dir.path(), SoftKeyFile::MayCreate) {
            Err(e @ SealError::Io { .. }) => {
                assert!(e.to_string().contains("read TPM owner auth"), "{e}");
            }
            other => panic!("expected Io, got {:?}", other.map(|s| s.name())),
        }
    }
}
