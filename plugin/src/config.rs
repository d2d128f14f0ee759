//! Plugin configuration: one struct serves as command-line flags and as the
//! TOML config file; flags win over the file. [`Settings::validate`] turns it
//! into a [`Config`], reporting every bad field at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::Args;
use edgekms_daemon::config::{sealer_kind_parser, LogFormat};
use edgekms_hsm::SealerConfig;
use serde::Deserialize;

/// The sealer choice, defined once for both daemons in `edgekms_hsm`.
pub use edgekms_hsm::SealerKind;

pub const DEFAULT_SOCKET: &str = "/var/run/edgekms/kms.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/edgekms";
/// Where `/metrics`, `/healthz` and `/readyz` are served unless told otherwise.
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// What the operator can set, from flags or the config file.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// KMS v2 unix socket that kube-apiserver connects to [default: /var/run/edgekms/kms.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Directory for the key cache (RocksDB) and the sealed node key [default: /var/lib/edgekms]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cluster this node belongs to (a DNS label, e.g. edge-1); bound into every ciphertext. Required on a data dir's first start; then read from the data dir
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// This node's name [default: the joined name in the data dir, else the host name]
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Where the node sealing key is sealed: tpm (real nodes) or soft (INSECURE, development) [default: tpm]
    #[arg(long, value_parser = sealer_kind_parser())]
    pub sealer: Option<SealerKind>,
    /// Admin socket for `kmsctl local` [default: admin.sock beside --socket]
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// TPM TCTI: device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321, mssim:host=...,port=..., tabrmd: [default: device:/dev/tpmrm0]
    #[arg(long, value_name = "TCTI")]
    pub tpm_tcti: Option<String>,
    /// Bind the sealed key to these PCRs, e.g. sha256:7 or sha256:0,2,7 [default: no PCR policy]
    #[arg(long, value_name = "BANK:LIST")]
    pub tpm_pcrs: Option<String>,
    /// File holding the TPM owner-hierarchy authorization, when the owner set one (kept out of argv and the config)
    #[arg(long, value_name = "FILE")]
    pub tpm_owner_auth_file: Option<PathBuf>,
    /// Log format [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Address for the HTTP endpoint serving /metrics (Prometheus), /healthz and /readyz [default: 127.0.0.1:9464]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve no metrics or health endpoint (binds no TCP port); wins over metrics_addr in the config file
    #[arg(long, conflicts_with = "metrics_addr")]
    #[serde(default)]
    pub no_metrics: bool,
    /// After `join`: longest wait between reconnects to the central key service [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub sync_backoff_max: Option<String>,
    /// After `join`: the central key service's URLs, comma-separated, tried in order, instead of those given to `join` (replicas added or moved) [default: join's]
    #[arg(
        long = "servers",
        id = "sync_servers",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub servers: Option<Vec<String>>,
    /// Write the recovery passphrase, made when the node key is created, to this new file (mode 0600; refused if it exists) instead of the terminal or stderr
    #[arg(long, value_name = "PATH")]
    pub recovery_passphrase_file: Option<PathBuf>,
    /// Open connections on both sockets at most; when full, the one idle longest is closed
    /// [default: the open-file limit minus 128]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// The shortest grace period `kmsctl local retire --grace` may ask for [default: 1h]. Lower it only for tests
    #[arg(long, value_name = "DURATION", hide = true)]
    pub min_retire_grace: Option<String>,
    /// Take a census of the cluster's storage this often (e.g. 6h), kept and reported to the central service; needs census_etcd_endpoints [default: off]
    #[arg(long, value_name = "DURATION")]
    pub census_every: Option<String>,
    /// The etcd v3 endpoints the census reads, as kube-apiserver's --etcd-servers (https://..., unix://...)
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    pub census_etcd_endpoints: Option<Vec<String>>,
    /// CA certificate of the census's etcd endpoints (kube-apiserver's --etcd-cafile)
    #[arg(long, value_name = "FILE")]
    pub census_etcd_cacert: Option<PathBuf>,
    /// Client certificate for the census's etcd endpoints (kube-apiserver's --etcd-certfile)
    #[arg(long, value_name = "FILE")]
    pub census_etcd_cert: Option<PathBuf>,
    /// Client key for the census's etcd endpoints (kube-apiserver's --etcd-keyfile)
    #[arg(long, value_name = "FILE")]
    pub census_etcd_key: Option<PathBuf>,
    /// The EncryptionConfiguration the apiserver reads: the census counts unencrypted objects of the resources it names, and takes the provider name from it
    #[arg(long, value_name = "FILE")]
    pub census_encryption_config: Option<PathBuf>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    pub data_dir: PathBuf,
    /// Empty: the data dir's (see [`crate::node::Node::open`]).
    pub cluster: String,
    pub node: String,
    /// Whether `node` was given (flag or file) rather than the host name:
    /// only a given name can conflict with the data dir's.
    pub node_given: bool,
    /// The sealer and its TPM options, validated; opened by
    /// [`crate::node::sealer_from_config`].
    pub sealer: SealerConfig,
    pub log_format: LogFormat,
    pub sync_backoff_max: std::time::Duration,
    /// The service's URLs instead of the join record's (empty: the join
    /// record's).
    pub servers: Vec<String>,
    /// The metrics and health endpoint; `None` with `--no-metrics`.
    pub metrics_addr: Option<SocketAddr>,
    /// Where a new recovery passphrase goes, instead of the tty or stderr.
    pub recovery_passphrase_file: Option<PathBuf>,
    /// Connection cap of both sockets; `None`: from the open-file limit.
    pub max_connections: Option<usize>,
    /// The shortest grace period a standalone retire may ask for.
    pub min_grace_secs: u64,
    /// A census on a schedule (`census_every`); `None`: off.
    pub census: Option<CensusSchedule>,
}

/// A census taken every `every` ([`crate::census`]).
#[derive(Debug, Clone)]
pub struct CensusSchedule {
    pub every: std::time::Duration,
    pub target: edgekms_census::EtcdTarget,
    pub encryption_config: Option<PathBuf>,
}

impl Settings {
    /// Reads a TOML config file with the same keys as the flags
    /// (`data_dir`, `tpm_tcti`, ...).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        edgekms_daemon::config::read_toml(path)
    }

    /// `self` with every unset field taken from `file`.
    pub fn or(self, file: Settings) -> Settings {
        let (metrics_addr, no_metrics) = edgekms_daemon::config::merge_metrics_flags(
            (self.metrics_addr, self.no_metrics),
            (file.metrics_addr, file.no_metrics),
        );
        Settings {
            socket: self.socket.or(file.socket),
            data_dir: self.data_dir.or(file.data_dir),
            cluster: self.cluster.or(file.cluster),
            node: self.node.or(file.node),
            sealer: self.sealer.or(file.sealer),
            admin_socket: self.admin_socket.or(file.admin_socket),
            tpm_tcti: self.tpm_tcti.or(file.tpm_tcti),
            tpm_pcrs: self.tpm_pcrs.or(file.tpm_pcrs),
            tpm_owner_auth_file: self.tpm_owner_auth_file.or(file.tpm_owner_auth_file),
            log_format: self.log_format.or(file.log_format),
            metrics_addr,
            no_metrics,
            sync_backoff_max: self.sync_backoff_max.or(file.sync_backoff_max),
            servers: self.servers.or(file.servers),
            recovery_passphrase_file: self
                .recovery_passphrase_file
                .or(file.recovery_passphrase_file),
            max_connections: self.max_connections.or(file.max_connections),
            min_retire_grace: self.min_retire_grace.or(file.min_retire_grace),
            census_every: self.census_every.or(file.census_every),
            census_etcd_endpoints: self.census_etcd_endpoints.or(file.census_etcd_endpoints),
            census_etcd_cacert: self.census_etcd_cacert.or(file.census_etcd_cacert),
            census_etcd_cert: self.census_etcd_cert.or(file.census_etcd_cert),
            census_etcd_key: self.census_etcd_key.or(file.census_etcd_key),
            census_encryption_config: self
                .census_encryption_config
                .or(file.census_encryption_config),
        }
    }

    /// Applies defaults and checks every field; all problems in one message.
    pub fn validate(self) -> Result<Config, String> {
        let mut problems = Vec::new();
        let socket = self.socket.unwrap_or_else(|| DEFAULT_SOCKET.into());
        let admin_socket = self
            .admin_socket
            .unwrap_or_else(|| socket.with_file_name("admin.sock"));
        if socket == admin_socket {
            problems.push("--admin-socket must differ from --socket".to_owned());
        }
        // Checked against the data dir at open: required only on a first start.
        let cluster = self.cluster.unwrap_or_default();
        if !cluster.is_empty() {
            if let Err(e) = edgekms_core::keyid::validate_name(&cluster) {
                problems.push(e.to_string());
            }
        }
        let node_given = self.node.is_some();
        let node = self.node.unwrap_or_else(hostname);
        if let Err(e) = edgekms_core::keyid::validate_name(&node) {
            problems.push(format!("--node: {e}"));
        }
        let sealer = SealerConfig {
            kind: self.sealer.unwrap_or_default(),
            tpm_tcti: self.tpm_tcti,
            tpm_pcrs: self.tpm_pcrs,
            tpm_owner_auth_file: self.tpm_owner_auth_file,
        };
        if let Err(e) = sealer.validate() {
            problems.extend(e.0);
        }
        let sync_backoff_max = match self.sync_backoff_max.as_deref() {
            None => std::time::Duration::from_secs(30),
            Some(text) => match edgekms_daemon::duration::parse_nonzero(text) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(format!("--sync-backoff-max: {e}"));
                    std::time::Duration::from_secs(30)
                }
            },
        };
        let servers = self.servers.unwrap_or_default();
        for url in &servers {
            if let Err(e) = edgekms_daemon::tls::Target::parse(url) {
                problems.push(format!("--servers {url}: {e}"));
            }
        }
        let min_grace_secs = match self.min_retire_grace.as_deref() {
            None => edgekms_core::rotation::MIN_GRACE_SECS,
            Some(text) => match edgekms_daemon::duration::parse(text) {
                Ok(d) => d.as_secs(),
                Err(e) => {
                    problems.push(format!("--min-retire-grace: {e}"));
                    edgekms_core::rotation::MIN_GRACE_SECS
                }
            },
        };
        let census = match (self.census_every.as_deref(), self.census_etcd_endpoints) {
            (None, _) => None,
            (Some(_), None) => {
                problems.push("census_every needs census_etcd_endpoints".to_owned());
                None
            }
            (Some(every), Some(endpoints)) => {
                match edgekms_daemon::duration::parse_nonzero(every) {
                    Ok(every) => Some(CensusSchedule {
                        every,
                        target: edgekms_census::EtcdTarget {
                            endpoints,
                            cacert: self.census_etcd_cacert,
                            cert: self.census_etcd_cert,
                            key: self.census_etcd_key,
                        },
                        encryption_config: self.census_encryption_config,
                    }),
                    Err(e) => {
                        problems.push(format!("--census-every: {e}"));
                        None
                    }
                }
            }
        };
        if self.max_connections == Some(0) {
            problems.push("--max-connections must be at least 1".to_owned());
        }
        if problems.is_empty() {
            Ok(Config {
                census,
                min_grace_secs,
                max_connections: self.max_connections,
                sync_backoff_max,
                servers,
                socket,
                admin_socket,
                data_dir: self.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
                cluster,
                node,
                node_given,
                sealer,
                log_format: self.log_format.unwrap_or_default(),
                metrics_addr: if self.no_metrics {
                    None
                } else {
                    Some(self.metrics_addr.unwrap_or(DEFAULT_METRICS_ADDR))
                },
                recovery_passphrase_file: self.recovery_passphrase_file,
            })
        } else {
            Err(problems.join("; "))
        }
    }
}

/// The host name as a DNS label, or "node" when it is not one.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let label = name.split('.').next().unwrap_or_default().to_owned();
    if edgekms_core::keyid::validate_name(&label).is_ok() {
        label
    } else {
        "node".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let file: Settings = toml::from_str(
            "cluster = \"edge-1\"\nsocket = \"/run/x/kms.sock\"\nsealer = \"soft\"\n",
        )
        .unwrap();
        let flags = Settings {
            cluster: Some("edge-2".into()),
            ..Default::default()
        };
        let cfg = flags.or(file).validate().unwrap();
        assert_eq!(cfg.cluster, "edge-2");
        assert_eq!(cfg.socket, PathBuf::from("/run/x/kms.sock"));
        assert_eq!(cfg.admin_socket, PathBuf::from("/run/x/admin.sock"));
        assert_eq!(cfg.sealer.kind, SealerKind::Soft);
        assert_eq!(cfg.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn tpm_is_the_default_sealer() {
        let cfg = Settings {
            cluster: Some("c".into()),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(cfg.sealer.kind, SealerKind::Tpm);
        assert_eq!(cfg.sealer.tcti(), edgekms_hsm::DEFAULT_TCTI);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Settings {
            cluster: Some("Bad_Name".into()),
            node: Some("-x".into()),
            socket: Some("/a.sock".into()),
            admin_socket: Some("/a.sock".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.contains("Bad_Name") && err.contains("--node") && err.contains("--admin-socket"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn metrics_default_to_loopback_and_can_be_moved_or_turned_off() {
        let base = || Settings {
            cluster: Some("c".into()),
            ..Default::default()
        };
        assert_eq!(
            base().validate().unwrap().metrics_addr,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let file: Settings =
            toml::from_str("metrics_addr = \"127.0.0.1:9100\"\ncluster = \"c\"\n").unwrap();
        assert_eq!(
            Settings::default()
                .or(file.clone())
                .validate()
                .unwrap()
                .metrics_addr,
            Some("127.0.0.1:9100".parse().unwrap())
        );
        let flags = Settings {
            metrics_addr: Some("[::1]:9200".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            flags.or(file.clone()).validate().unwrap().metrics_addr,
            Some("[::1]:9200".parse().unwrap())
        );
        let off = Settings {
            no_metrics: true,
            ..Default::default()
        };
        assert_eq!(off.or(file).validate().unwrap().metrics_addr, None);
        let off_in_file: Settings = toml::from_str("no_metrics = true\ncluster = \"c\"").unwrap();
        assert_eq!(
            Settings::default()
                .or(off_in_file)
                .validate()
                .unwrap()
                .metrics_addr,
            None
        );
        assert!(toml::from_str::<Settings>("metrics_addr = \"localhost\"").is_err());
    }

    #[test]
    fn a_metrics_flag_wins_over_the_file() {
        let off_in_file: Settings = toml::from_str("no_metrics = true\ncluster = \"c\"").unwrap();
        let flag = Settings {
            metrics_addr: Some("127.0.0.1:9300".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            flag.or(off_in_file).validate().unwrap().metrics_addr,
            Some("127.0.0.1:9300".parse().unwrap())
        );
        let both_in_file: Settings =
            toml::from_str("no_metrics = true\nmetrics_addr = \"127.0.0.1:9100\"\ncluster = \"c\"")
                .unwrap();
        // Without a flag the file decides (off), and --no-metrics is off.
        assert_eq!(
            Settings::default()
                .or(both_in_file.clone())
                .validate()
                .unwrap()
                .metrics_addr,
            None
        );
        let off_flag = Settings {
            no_metrics: true,
            ..Default::default()
        };
        let on_in_file: Settings =
            toml::from_str("metrics_addr = \"127.0.0.1:9100\"\ncluster = \"c\"").unwrap();
        assert_eq!(
            off_flag.or(on_in_file).validate().unwrap().metrics_addr,
            None
        );
    }

    #[test]
    fn zero_durations_and_passphrase_file_key() {
        let err = Settings {
            cluster: Some("c".into()),
            sync_backoff_max: Some("0s".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.contains("--sync-backoff-max") && err.contains("at least 1s"),
            "{err}"
        );
        let file: Settings =
            toml::from_str("cluster = \"c\"\nrecovery_passphrase_file = \"/root/pass\"").unwrap();
        assert_eq!(
            Settings::default()
                .or(file)
                .validate()
                .unwrap()
                .recovery_passphrase_file,
            Some(PathBuf::from("/root/pass"))
        );
    }

    #[test]
    fn sealer_options_are_validated_with_the_rest() {
        let err = Settings {
            cluster: Some("Bad_Name".into()),
            sealer: Some(SealerKind::Soft),
            tpm_tcti: Some("swtpm:".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.contains("Bad_Name") && err.contains("--tpm-* options given but --sealer is soft"),
            "{err}"
        );
        let file: Settings = toml::from_str(
            "cluster = \"c\"\ntpm_tcti = \"swtpm:host=127.0.0.1,port=2321\"\ntpm_pcrs = \"sha256:7\"\ntpm_owner_auth_file = \"/etc/edgekms/owner\"\n",
        )
        .unwrap();
        let cfg = Settings::default().or(file).validate().unwrap();
        assert_eq!(
            cfg.sealer,
            SealerConfig {
                kind: SealerKind::Tpm,
                tpm_tcti: Some("swtpm:host=127.0.0.1,port=2321".into()),
                tpm_pcrs: Some("sha256:7".into()),
                tpm_owner_auth_file: Some("/etc/edgekms/owner".into()),
            }
        );
    }

    #[test]
    fn unknown_config_keys_are_refused() {
        assert!(toml::from_str::<Settings>("sealr = \"soft\"").is_err());
    }
}

#[cfg(test)]
mod proptests;
