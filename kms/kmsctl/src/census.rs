//! `kmsctl local census`: which key_id every object in storage is under,
//! read from etcd (or kine, or k8s-dqlite) with kube-apiserver's own etcd
//! flags, by edgekms-census; each key_id's version from this node's plugin
//! when its admin socket answers. It renders; the census decides nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgekms_census::{Census, CensusError, EtcdTarget, Spec};
use edgekms_proto::admin::node_admin_client::NodeAdminClient;
use edgekms_proto::admin::StatusRequest;

use crate::Failure;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CensusArgs {
    /// etcd as kube-apiserver's --etcd-servers names it: https://HOST:PORT,
    /// http://HOST:PORT or unix://PATH (kine, k8s-dqlite), comma-separated
    #[arg(long, value_name = "URL,...", value_delimiter = ',', required = true)]
    pub(crate) etcd_endpoints: Vec<String>,
    /// The CA of etcd's certificate (kube-apiserver's --etcd-cafile)
    #[arg(long, value_name = "FILE")]
    pub(crate) etcd_cacert: Option<PathBuf>,
    /// Client certificate etcd accepts (kube-apiserver's --etcd-certfile)
    #[arg(long, value_name = "FILE")]
    pub(crate) etcd_cert: Option<PathBuf>,
    /// Its key (kube-apiserver's --etcd-keyfile)
    #[arg(long, value_name = "FILE")]
    pub(crate) etcd_key: Option<PathBuf>,
    /// The KMS v2 provider's name in the EncryptionConfiguration [default:
    /// the only KMS v2 provider of --encryption-config, else edgekms]
    #[arg(long)]
    pub(crate) provider: Option<String>,
    /// Where kube-apiserver keeps objects (its --etcd-prefix, plus /)
    #[arg(long, default_value = "/registry/")]
    pub(crate) prefix: String,
    /// kube-apiserver's --encryption-provider-config: count unencrypted
    /// objects only of the resources it says to encrypt with the provider
    #[arg(long, value_name = "FILE")]
    pub(crate) encryption_config: Option<PathBuf>,
    /// Objects per range request
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub(crate) page_size: u32,
}

fn spec(args: &CensusArgs) -> Result<Spec, Failure> {
    let mut spec = match &args.encryption_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
            Spec::from_encryption_config(&text, args.provider.as_deref())
                .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?
        }
        None => Spec {
            provider: args.provider.clone().unwrap_or_else(|| "edgekms".into()),
            ..Spec::default()
        },
    };
    spec.prefix = args.prefix.clone();
    spec.page_size = args.page_size;
    Ok(spec)
}

fn failure(e: CensusError) -> Failure {
    match e {
        CensusError::Refused { code, .. } => {
            Failure::Refused(tonic::Status::new(code, e.to_string()))
        }
        CensusError::Compacted { .. } => Failure::Refused(tonic::Status::aborted(e.to_string())),
        CensusError::Endpoint { .. }
        | CensusError::NoEndpoint
        | CensusError::Spec(_)
        | CensusError::File { .. }
        | CensusError::TlsConfig(_)
        | CensusError::Config(_)
        | CensusError::Unreachable { .. }
        | CensusError::Tls { .. }
        | CensusError::Timeout { .. }
        | CensusError::NotEtcd { .. } => Failure::Usage(e.to_string()),
    }
}

/// key_id → "VERSION (STATE)" from the plugin on `admin_socket`, or `None`
/// when it does not answer within two seconds.
async fn versions(admin_socket: &Path) -> Option<BTreeMap<String, String>> {
    let ask = async {
        let channel = edgekms_proto::uds::connect(admin_socket).await.ok()?;
        let status = NodeAdminClient::new(channel)
            .status(StatusRequest {})
            .await
            .ok()?
            .into_inner();
        Some(
            status
                .versions
                .into_iter()
                .map(|v| (v.key_id, format!("{} ({})", v.version, v.state)))
                .collect(),
        )
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

/// Takes a census as `args` say and gives it to the plugin on
/// `admin_socket` to keep ([`keep`]).
pub(crate) async fn take_and_keep(
    admin_socket: &Path,
    args: &CensusArgs,
) -> Result<Census, Failure> {
    let spec = spec(args)?;
    let target = EtcdTarget {
        endpoints: args.etcd_endpoints.clone(),
        cacert: args.etcd_cacert.clone(),
        cert: args.etcd_cert.clone(),
        key: args.etcd_key.clone(),
    };
    let census = edgekms_census::take(&target, &spec)
        .await
        .map_err(failure)?;
    keep(admin_socket, &census).await;
    Ok(census)
}

pub(crate) async fn run(admin_socket: &Path, args: CensusArgs, json: bool) -> Result<(), Failure> {
    let census = take_and_keep(admin_socket, &args).await?;
    if json {
        let value = serde_json::to_value(&census)
            .map_err(|e| Failure::Usage(format!("cannot render the census: {e}")))?;
        crate::print_json(value);
        return Ok(());
    }
    let versions = versions(admin_socket).await;
    render(&census, versions.as_ref());
    Ok(())
}

/// Gives the census to this node's plugin, which keeps the newest one for
/// the retire rule and reports it to the central service. A plugin that
/// does not answer (kmsctl run elsewhere) is named, not an error: the
/// census itself stands.
pub(crate) async fn keep(admin_socket: &Path, census: &Census) {
    let give = async {
        let channel = edgekms_proto::uds::connect(admin_socket)
            .await
            .map_err(|e| e.to_string())?;
        NodeAdminClient::new(channel)
            .record_census(census.to_wire())
            .await
            .map_err(|s| s.message().to_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), give).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!(
            "kmsctl: the census is not kept by the plugin on {} ({e}): a retire will not see it",
            admin_socket.display()
        ),
        Err(_) => eprintln!(
            "kmsctl: the plugin on {} did not answer: the census is not kept there",
            admin_socket.display()
        ),
    }
}

fn render(census: &Census, versions: Option<&BTreeMap<String, String>>) {
    let mut rows: Vec<[String; 4]> = Vec::new();
    for (key_id, resources) in &census.under {
        let version = match versions {
            None => "?".to_string(),
            Some(v) => v.get(key_id).cloned().unwrap_or_else(|| "not held".into()),
        };
        for (resource, n) in resources {
            rows.push([
                key_id.clone(),
                version.clone(),
                resource.clone(),
                n.to_string(),
            ]);
        }
    }
    for (resource, n) in &census.identity {
        rows.push([
            "identity".into(),
            "-".into(),
            resource.clone(),
            n.to_string(),
        ]);
    }
    for (label, resources) in &census.other {
        for (resource, n) in resources {
            rows.push([label.clone(), "-".into(), resource.clone(), n.to_string()]);
        }
    }
    for (resource, n) in &census.unreadable {
        rows.push([
            "unreadable".into(),
            "-".into(),
            resource.clone(),
            n.to_string(),
        ]);
    }
    let head = ["KEY ID", "VERSION", "RESOURCE", "OBJECTS"].map(String::from);
    let mut width = [0usize; 4];
    for row in std::iter::once(&head).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&head).chain(&rows) {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3]
        );
    }
    println!();
    println!(
        "{} keys read under {} at revision {}, {} (provider {}).",
        census.scanned,
        census.prefix,
        census.revision,
        crate::central::utc(census.taken_unix),
        census.provider
    );
    println!("identity: stored unencrypted; unreadable: the provider's prefix but no key_id; other rows: another provider or format.");
}
