//! `kmsctl node|rotate|retire|status|audit`: the central key service,
//! over mTLS with the operator's certificate from `--operator-dir`.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Subcommand;
use edgekms_daemon::pki::{self, PrivateKey};
use edgekms_daemon::tls;
use edgekms_proto::fleet as pb;
use edgekms_proto::fleet::operator_client::OperatorClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::{print_json, Failure};

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Enrol a node: prints a one-time join token and the CA hash (creates the cluster, with version 1 primary, on first use)
    Add {
        cluster: String,
        node: String,
        /// How long the token stays valid
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        ttl: String,
    },
    /// Revoke a node: refused from now on, receives nothing more
    Remove { cluster: String, node: String },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Invite a new replica (service on etcd): prints a one-time token and the `edgekms-server join` command to run on its host
    Add {
        name: String,
        /// How long the token stays valid
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        ttl: String,
    },
    /// Remove a replica: it stops serving and erases its sealed root key, and the store refuses its writes
    Remove { name: String },
    /// Every replica: state, last heartbeat, etcd member, address, and which one runs the once-only jobs
    List,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    pub cluster: String,
    /// Wait until every node serves the new primary, then for the apiservers' next Status poll (--settle)
    #[arg(long)]
    pub wait: bool,
    /// Promote without the nodes that have not acked (after giving connected nodes a moment) and name them
    #[arg(long)]
    pub force: bool,
    /// With --wait: time for every apiserver to poll Status and roll its DEK after the switch
    #[arg(long, default_value = "70s", value_name = "DURATION")]
    pub settle: String,
    /// With --wait or --force: give up after this long (exit code 3)
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub timeout: String,
}

pub enum CentralCommand {
    Node(NodeCommand),
    Replica(ReplicaCommand),
    Rotate(RotateArgs),
    Retire {
        cluster: String,
        version: u32,
        grace_secs: u64,
        skip_census: bool,
    },
    RestoreVersion {
        cluster: String,
        version: u32,
    },
    Status {
        cluster: Option<String>,
    },
    /// End a reconciliation without these nodes.
    Reconcile {
        cluster: String,
        without: Vec<String>,
    },
    Audit {
        since: Option<String>,
        limit: Option<u64>,
    },
}

fn read(dir: &Path, name: &str) -> Result<String, Failure> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|e| {
        Failure::Usage(format!(
            "cannot read {}: {e} (--operator-dir must hold ca.pem, cert.pem and key.pem from `edgekms-server init`)",
            path.display()
        ))
    })
}

/// Connects to the service with the operator's credentials.
pub async fn connect(
    server: &str,
    operator_dir: &Path,
) -> Result<OperatorClient<Channel>, Failure> {
    let bad_pem = |name: &str| {
        Failure::Usage(format!(
            "{} has no PEM block it should have",
            operator_dir.join(name).display()
        ))
    };
    let ca = pki::pem_decode("CERTIFICATE", &read(operator_dir, "ca.pem")?)
        .ok_or_else(|| bad_pem("ca.pem"))?;
    let cert = pki::pem_decode("CERTIFICATE", &read(operator_dir, "cert.pem")?)
        .ok_or_else(|| bad_pem("cert.pem"))?;
    let key_text = zeroize::Zeroizing::new(read(operator_dir, "key.pem")?);
    let key = PrivateKey::from_der(
        pki::pem_decode("PRIVATE KEY", &key_text).ok_or_else(|| bad_pem("key.pem"))?,
    );
    let cfg = tls::client_config(tls::Trust::Ca(&ca), Some((&cert, &key)))
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let channel = tls::connect(server, cfg)
        .await
        .map_err(|e| Failure::Usage(format!("{e} (is edgekms-server running there?)")))?;
    Ok(OperatorClient::new(channel))
}

/// A duration flag where zero makes no sense (`--ttl`, `--since`,
/// `--timeout`).
fn duration(flag: &str, value: &str) -> Result<Duration, Failure> {
    edgekms_daemon::duration::parse_nonzero(value)
        .map_err(|e| Failure::Usage(format!("--{flag}: {e}")))
}

/// Checks the command's duration flags before connecting, so that a bad
/// one is a usage error (exit 2) whether or not the service is reachable.
pub fn check(command: &CentralCommand) -> Result<(), Failure> {
    match command {
        CentralCommand::Node(NodeCommand::Add { ttl, .. })
        | CentralCommand::Replica(ReplicaCommand::Add { ttl, .. }) => {
            duration("ttl", ttl).map(drop)
        }
        CentralCommand::Audit {
            since: Some(since), ..
        } => duration("since", since).map(drop),
        CentralCommand::Rotate(args) => {
            duration("timeout", &args.timeout)?;
            edgekms_daemon::duration::parse(&args.settle)
                .map(drop)
                .map_err(|e| Failure::Usage(format!("--settle: {e}")))
        }
        _ => Ok(()),
    }
}

pub async fn run(
    client: &mut OperatorClient<Channel>,
    command: CentralCommand,
    json: bool,
) -> Result<(), Failure> {
    match command {
        CentralCommand::Node(NodeCommand::Add { cluster, node, ttl }) => {
            let ttl = duration("ttl", &ttl)?;
            let r = client
                .add_node(pb::AddNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    ttl_seconds: ttl.as_secs(),
                })
                .await?
                .into_inner();
            if json {
                print_json(json!({
                    "cluster": cluster, "node": node, "token": r.token,
                    "expires_unix": r.expires_unix, "ca_hash": r.ca_hash,
                    "cluster_created": r.cluster_created,
                }));
            } else {
                if r.cluster_created {
                    println!("created cluster {cluster} (version 1 is primary)");
                }
                println!(
                    "node {cluster}/{node} may join until {}",
                    utc(r.expires_unix)
                );
                println!("token:   {}", r.token);
                println!("ca-hash: {}", r.ca_hash);
                println!(
                    "\non the node:\n  edgekms-plugin join --server <URL> --token {} --ca-hash {} --cluster {cluster} --node {node} --data-dir /var/lib/edgekms",
                    r.token, r.ca_hash
                );
            }
        }
        CentralCommand::Node(NodeCommand::Remove { cluster, node }) => {
            client
                .remove_node(pb::RemoveNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                })
                .await?;
            if json {
                print_json(json!({"cluster": cluster, "node": node, "revoked": true}));
            } else {
                println!("revoked {cluster}/{node}: it is refused from now on");
            }
        }
        CentralCommand::Rotate(args) => rotate(client, args, json).await?,
        CentralCommand::RestoreVersion { cluster, version } => {
            client
                .restore_version(pb::RestoreVersionRequest {
                    cluster: cluster.clone(),
                    version,
                })
                .await?;
            if json {
                print_json(json!({"cluster": cluster, "restored": version}));
            } else {
                println!(
                    "restored {cluster} v{version}: decrypt-only again on every node as it syncs"
                );
            }
        }
        CentralCommand::Retire {
            cluster,
            version,
            grace_secs,
            skip_census,
        } => {
            let r = client
                .retire(pb::RetireRequest {
                    cluster: cluster.clone(),
                    version,
                    grace_seconds: grace_secs,
                    skip_census,
                })
                .await?
                .into_inner();
            if json {
                print_json(json!({
                    "cluster": cluster, "version": version,
                    "destroyed": r.destroyed, "waiting_for": r.waiting_for,
                    "destroy_after_unix": r.destroy_after_unix,
                    "census_skipped": r.census_skipped,
                }));
            } else if r.destroy_after_unix != 0 && !r.destroyed {
                println!(
                    "disabled {cluster} v{version}: Decrypt under it is refused on every node as it syncs; destroyed at {} unless `kmsctl restore-version {cluster} {version}` brings it back first",
                    utc(r.destroy_after_unix)
                );
            } else if r.destroyed {
                println!(
                    "retired {cluster} v{version}: every node dropped it, central copy destroyed"
                );
            } else {
                println!(
                    "retiring {cluster} v{version}: waiting for {} to drop it; the central copy goes once they have",
                    r.waiting_for.join(", ")
                );
            }
        }
        CentralCommand::Status { cluster } => {
            let s = client
                .status(pb::StatusRequest {
                    cluster: cluster.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                print_json(status_json(&s));
            } else {
                print_status(&s);
            }
        }
        CentralCommand::Reconcile { cluster, without } => {
            client
                .end_reconcile(pb::EndReconcileRequest {
                    cluster: cluster.clone(),
                    without: without.clone(),
                })
                .await?;
            if json {
                print_json(json!({"cluster": cluster, "reconciled": true, "without": without}));
            } else {
                println!(
                    "cluster {cluster} reconciled without {}: they are not counted until what they report agrees with the service",
                    without.join(", ")
                );
            }
        }
        CentralCommand::Audit { since, limit } => audit(client, since, limit, json).await?,
        CentralCommand::Replica(cmd) => replica(client, cmd, json).await?,
    }
    Ok(())
}

/// `kmsctl audit`: pages from the server's stream go out as they come,
/// so memory stays flat however long the log. A closed stdout (`| head`)
/// ends it quietly.
async fn audit(
    client: &mut OperatorClient<Channel>,
    since: Option<String>,
    limit: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    use std::io::Write;
    let since_unix = match since {
        Some(s) => {
            let d = duration("since", &s)?;
            unix_now().saturating_sub(d.as_secs()).max(1)
        }
        None => 0,
    };
    let mut stream = client
        .audit(pb::AuditRequest {
            since_unix,
            limit: limit.unwrap_or(0),
            after_seq: 0,
        })
        .await?
        .into_inner();
    let stdout = std::io::stdout();
    let mut printer = AuditPrinter {
        out: std::io::BufWriter::new(stdout.lock()),
        json,
        first: true,
    };
    let mut failed = None;
    let written: std::io::Result<()> = async {
        loop {
            match stream.message().await {
                Ok(Some(page)) => {
                    for rec in &page.records {
                        printer.record(rec)?;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    failed = Some(status);
                    break;
                }
            }
        }
        // A stream cut short leaves the array open: no one mistakes it for
        // the whole log.
        if failed.is_none() {
            printer.end()?;
        }
        printer.out.flush()
    }
    .await;
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(Failure::Usage(format!("cannot write the audit log: {e}")))
        }
        _ => {}
    }
    match failed {
        Some(status) => Err(status.into()),
        None => Ok(()),
    }
}

struct AuditPrinter<W> {
    out: W,
    json: bool,
    first: bool,
}

impl<W: std::io::Write> AuditPrinter<W> {
    fn record(&mut self, rec: &pb::AuditRecord) -> std::io::Result<()> {
        if self.json {
            // Each record is already one JSON object: passed through.
            let sep = if self.first { "[\n" } else { ",\n" };
            self.first = false;
            return write!(self.out, "{sep}{}", rec.json);
        }
        let v: serde_json::Value =
            serde_json::from_str(&rec.json).unwrap_or(serde_json::Value::Null);
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
        let mut what = field("cluster").to_owned();
        if !field("node").is_empty() {
            what = format!("{what}/{}", field("node"));
        }
        if let Some(ver) = v.get("version").and_then(|x| x.as_u64()) {
            what = format!("{what} v{ver}");
        }
        let count = match v.get("count").and_then(|x| x.as_u64()) {
            Some(n) => format!(" x{n}"),
            None => String::new(),
        };
        writeln!(
            self.out,
            "{}  {:<13} {:<28} {:<24} {}{}{}",
            utc(rec.time_unix_ms / 1000),
            field("event"),
            field("actor"),
            what.trim(),
            field("result"),
            count,
            match field("detail") {
                "" => String::new(),
                d => format!("  ({d})"),
            }
        )
    }

    fn end(&mut self) -> std::io::Result<()> {
        if self.json {
            writeln!(self.out, "{}", if self.first { "[]" } else { "\n]" })?;
        }
        Ok(())
    }
}

async fn cluster_status(
    client: &mut OperatorClient<Channel>,
    cluster: &str,
) -> Result<pb::ClusterStatus, Failure> {
    client
        .status(pb::StatusRequest {
            cluster: cluster.to_owned(),
        })
        .await?
        .into_inner()
        .clusters
        .into_iter()
        .next()
        .ok_or_else(|| Failure::Usage(format!("cluster {cluster} vanished")))
}

/// Prints progress lines on stderr, each only when it changes.
struct Progress {
    last: String,
}

impl Progress {
    fn show(&mut self, line: String) {
        if line != self.last {
            eprintln!("{line}");
            self.last = line;
        }
    }
}

async fn rotate(
    client: &mut OperatorClient<Channel>,
    args: RotateArgs,
    json: bool,
) -> Result<(), Failure> {
    // Zero is meaningful here: do not wait for the apiservers.
    let settle = edgekms_daemon::duration::parse(&args.settle)
        .map_err(|e| Failure::Usage(format!("--settle: {e}")))?;
    let timeout = duration("timeout", &args.timeout)?;
    let deadline = Instant::now() + timeout;
    let cluster = args.cluster;
    let r = client
        .rotate(pb::RotateRequest {
            cluster: cluster.clone(),
        })
        .await?
        .into_inner();
    let version = r.version;
    let mut progress = Progress {
        last: String::new(),
    };
    if !json {
        progress.show(format!(
            "{} {cluster} v{version} ({}): pending until every node holds it",
            if r.created {
                "rotating"
            } else {
                "rotation already pending:"
            },
            r.key_id
        ));
    }
    // The service decides when --force promotes and when --wait is done;
    // this renders its progress.
    let mut stale = Vec::new();
    let mut waited = false;
    if args.force || args.wait {
        let watch = client.watch_rotation(pb::WatchRotationRequest {
            cluster: cluster.clone(),
            version,
            force: args.force,
            wait: args.wait,
        });
        let mut stream = match tokio::time::timeout_at(deadline.into(), watch).await {
            Ok(reply) => reply?.into_inner(),
            Err(_) => return Err(timed_out(&args.timeout, &progress)),
        };
        loop {
            let next = match tokio::time::timeout_at(deadline.into(), stream.message()).await {
                Ok(next) => next?,
                Err(_) => return Err(timed_out(&args.timeout, &progress)),
            };
            let Some(p) = next else {
                return Err(Failure::Refused(tonic::Status::unavailable(format!(
                    "the service ended the watch of {cluster} v{version} early: {}",
                    progress.last
                ))));
            };
            if p.phase == "promoted" {
                stale = p.stale_nodes.clone();
            }
            if !json {
                if let Some(line) = progress_line(&cluster, &p) {
                    progress.show(line);
                }
            }
            if p.phase == "gone" {
                return Err(Failure::Timeout(format!(
                    "{cluster} v{version} is {} now: it left this rotation",
                    p.state
                )));
            }
            if p.done {
                break;
            }
        }
        if args.wait {
            if !settle.is_zero() {
                if !json {
                    progress.show(format!(
                        "{cluster} v{version} is served by every node; waiting {} for every apiserver's next Status poll",
                        args.settle
                    ));
                }
                tokio::time::sleep(settle).await;
            }
            waited = true;
        }
    }
    let c = cluster_status(client, &cluster).await?;
    let state = c
        .versions
        .iter()
        .find(|v| v.version == version)
        .map(|v| v.state.clone())
        .unwrap_or_default();
    if json {
        print_json(json!({
            "cluster": cluster, "version": version, "key_id": r.key_id,
            "created": r.created, "state": state, "stale_nodes": stale,
            "waited": waited,
        }));
    } else if waited {
        println!(
            "{cluster} v{version} is primary everywhere: storage migration can start (kubectl get secrets -A -o json | kubectl replace -f -)"
        );
    } else {
        println!("{cluster} v{version}: {state}");
    }
    Ok(())
}

fn timed_out(timeout: &str, progress: &Progress) -> Failure {
    Failure::Timeout(format!("gave up after {timeout}: {}", progress.last))
}

/// One line of a rotation's progress, as the service reports it.
fn progress_line(cluster: &str, p: &pb::RotationProgress) -> Option<String> {
    let v = p.version;
    Some(match p.phase.as_str() {
        "pending" => format!(
            "{cluster} v{v}: pending, acked by {}/{} nodes{}",
            p.holding.len(),
            p.holding.len() + p.missing.len(),
            if p.missing.is_empty() {
                String::new()
            } else {
                format!(" (waiting for {})", p.missing.join(", "))
            }
        ),
        "primary" => format!(
            "{cluster} v{v}: primary; serving it on {}/{} nodes",
            p.serving.len(),
            p.serving.len() + p.waiting.len()
        ),
        "promoted" if p.stale_nodes.is_empty() => {
            format!("{cluster} v{v} is primary on every node")
        }
        "promoted" => format!(
            "{cluster} v{v} promoted WITHOUT stale nodes: {} (they get it when they reconnect; until then they cannot read data written under it)",
            p.stale_nodes.join(", ")
        ),
        _ => return None,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DD HH:MM:SSZ` (UTC).
pub fn utc(unix: u64) -> String {
    let (date, (h, m, s)) = edgekms_core::utc::parts(unix);
    format!("{date} {h:02}:{m:02}:{s:02}Z")
}

fn ago(now: u64, then: u64) -> String {
    if then == 0 {
        return "never".into();
    }
    let s = now.saturating_sub(then);
    match s {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

fn versions_list(v: &[u32]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|v| format!("v{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn replica(
    client: &mut OperatorClient<Channel>,
    cmd: ReplicaCommand,
    json: bool,
) -> Result<(), Failure> {
    match cmd {
        ReplicaCommand::Add { name, ttl } => {
            let ttl = duration("ttl", &ttl)?;
            let r = client
                .add_replica(pb::AddReplicaRequest {
                    name: name.clone(),
                    ttl_seconds: ttl.as_secs(),
                })
                .await?
                .into_inner();
            if json {
                print_json(json!({
                    "replica": name, "token": r.token, "expires_unix": r.expires_unix,
                    "ca_hash": r.ca_hash, "etcd_prefix": r.etcd_prefix,
                }));
            } else {
                println!("replica {name} may join until {}", utc(r.expires_unix));
                println!("token:   {}", r.token);
                println!("ca-hash: {}", r.ca_hash);
                println!(
                    "\non its host:\n  edgekms-server join --server <URL of a serving replica> --token {} --ca-hash {} --data-dir /var/lib/edgekms-server [--san <its DNS name>]\nthen serve it with --store etcd --etcd-prefix {} and the etcd endpoints and client certificate",
                    r.token, r.ca_hash, r.etcd_prefix
                );
            }
        }
        ReplicaCommand::Remove { name } => {
            client
                .remove_replica(pb::RemoveReplicaRequest { name: name.clone() })
                .await?;
            if json {
                print_json(json!({"replica": name, "removed": true}));
            } else {
                println!("removed replica {name}: it stops serving and erases its sealed root key; the store refuses its writes. Revoke its etcd client certificate too");
            }
        }
        ReplicaCommand::List => {
            let s = client
                .status(pb::StatusRequest {
                    cluster: String::new(),
                })
                .await?
                .into_inner();
            if json {
                print_json(json!({"replicas": replicas_json(&s)}));
            } else {
                print_replicas(&s);
            }
        }
    }
    Ok(())
}

fn replicas_json(s: &pb::StatusResponse) -> serde_json::Value {
    s.replicas
        .iter()
        .map(|r| {
            json!({
                "name": r.name, "state": r.state, "heartbeat_unix": r.heartbeat_unix,
                "etcd_member": r.etcd_member, "address": r.address, "leader": r.leader,
                "added_unix": r.added_unix,
            })
        })
        .collect()
}

fn print_replicas(s: &pb::StatusResponse) {
    if s.store != "etcd" {
        println!(
            "store: {} (one server; replicas need --store etcd)",
            s.store
        );
        return;
    }
    println!("store: etcd, answered by replica {}", s.answered_by);
    println!(
        "  {:<16} {:<8} {:<7} {:<14} {:<12} ADDRESS",
        "REPLICA", "STATE", "LEADER", "HEARTBEAT", "ETCD MEMBER"
    );
    for r in &s.replicas {
        println!(
            "  {:<16} {:<8} {:<7} {:<14} {:<12} {}",
            r.name,
            r.state,
            if r.leader { "yes" } else { "" },
            if r.heartbeat_unix == 0 {
                "none".to_owned()
            } else {
                ago(s.server_time_unix, r.heartbeat_unix)
            },
            if r.etcd_member.is_empty() {
                "-"
            } else {
                &r.etcd_member
            },
            if r.address.is_empty() {
                "-"
            } else {
                &r.address
            },
        );
    }
}

fn print_status(s: &pb::StatusResponse) {
    if s.store == "etcd" {
        print_replicas(s);
        println!();
    }
    if s.clusters.is_empty() {
        println!("no clusters yet: `kmsctl node add CLUSTER NODE` creates one");
    }
    for (i, c) in s.clusters.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!(
            "CLUSTER {}  primary v{}  pending {}",
            c.name,
            c.primary,
            if c.pending == 0 {
                "-".into()
            } else {
                format!("v{}", c.pending)
            }
        );
        if c.reconciling {
            print_reconciling(c);
        }
        if !c.clashes.is_empty() {
            println!("  CLASHES: two keys under one version number (never counted as held; see the operator guide, \"Clashes\")");
            for x in &c.clashes {
                let service = if x.service_key_id.is_empty() {
                    "no key for it (its nodes disagree, or the number is beyond any it could have made)".to_owned()
                } else {
                    x.service_key_id.clone()
                };
                println!(
                    "    node {} holds v{} as {}; the service knows {}",
                    x.node, x.version, x.node_key_id, service
                );
            }
        }
        let active = c.nodes.iter().filter(|n| n.state == "active").count();
        println!(
            "  {:<8} {:<13} {:<6} {:<20} KEY ID",
            "VERSION", "STATE", "HELD", "CREATED"
        );
        for v in &c.versions {
            let scheduled = if v.destroy_after_unix == 0 {
                String::new()
            } else {
                format!("  (destroyed at {})", utc(v.destroy_after_unix))
            };
            println!(
                "  {:<8} {:<13} {:<6} {:<20} {}{scheduled}",
                format!("v{}", v.version),
                v.state,
                format!("{}/{}", v.held_by, active),
                utc(v.created_unix),
                v.key_id
            );
        }
        match &c.census {
            Some(x) => print_census(
                x,
                &format!(" by {}", c.census_node),
                c.versions.iter().map(|v| (v.version, v.key_id.as_str())),
            ),
            None => println!("  CENSUS: none yet (`kmsctl local census` on a node, or the plugin's census_every)"),
        }
        if c.nodes.is_empty() {
            println!("  (no nodes)");
            continue;
        }
        println!(
            "  {:<16} {:<8} {:<10} {:<13} {:<14} {:<8} BEHIND",
            "NODE", "STATE", "CONNECTED", "LAST CONTACT", "HELD", "PRIMARY"
        );
        for n in &c.nodes {
            println!(
                "  {:<16} {:<8} {:<10} {:<13} {:<14} {:<8} {}",
                n.name,
                n.state,
                if n.connected { "yes" } else { "no" },
                ago(s.server_time_unix, n.last_contact_unix),
                versions_list(&n.held),
                if n.primary == 0 {
                    "-".into()
                } else {
                    format!("v{}", n.primary)
                },
                match (n.state.as_str(), n.behind) {
                    ("invited", _) if n.token_expires_unix == 0 => {
                        "(no valid token: `kmsctl node add`)".into()
                    }
                    ("invited", _) => format!("(token expires {})", utc(n.token_expires_unix)),
                    _ if n.excused => "left out".into(),
                    (_, true) => "yes".into(),
                    _ => "no".into(),
                }
            );
        }
    }
}

/// What a reconciling cluster waits for, in plain words.
fn print_reconciling(c: &pb::ClusterStatus) {
    println!(
        "  RECONCILING since {}: {}",
        utc(c.reconciling_since_unix),
        c.reconciling_reason
    );
    println!("    nothing is rotated, promoted or retired until every active node has reported; nodes keep serving their own keys");
    if c.reconciling_waiting_for.is_empty() {
        println!("    waiting for: nobody (it ends with the next report)");
    } else {
        println!("    waiting for: {}", c.reconciling_waiting_for.join(", "));
    }
    for w in &c.reconciling_wanted {
        println!(
            "    asked back from the nodes: v{} {} (a version they hold and the service lacks)",
            w.version, w.key_id
        );
    }
    if !c.reconciling_waiting_for.is_empty() {
        println!(
            "    to go on without them: kmsctl reconcile {} --without {}",
            c.name,
            c.reconciling_waiting_for.join(",")
        );
    }
}

/// A census's objects per version (by key_id) and resource.
pub(crate) fn print_census<'a>(
    c: &pb::Census,
    by: &str,
    versions: impl Iterator<Item = (u32, &'a str)>,
) {
    let names: std::collections::BTreeMap<&str, u32> = versions.map(|(v, k)| (k, v)).collect();
    println!("  CENSUS counted {}{by}:", utc(c.taken_unix));
    if c.under.is_empty() {
        println!("    no object under this provider");
    }
    for n in &c.under {
        let version = names
            .get(n.key_id.as_str())
            .map_or("v?".to_owned(), |v| format!("v{v}"));
        println!(
            "    {version:<6} {:<24} {:>8}  {}",
            n.resource, n.objects, n.key_id
        );
    }
}

pub(crate) fn census_json(c: &pb::Census) -> serde_json::Value {
    let counts = |list: &[pb::CensusCount]| {
        list.iter()
            .map(|n| json!({"key_id": n.key_id, "resource": n.resource, "objects": n.objects}))
            .collect::<Vec<_>>()
    };
    json!({
        "taken_unix": c.taken_unix, "revision": c.revision, "provider": c.provider,
        "prefix": c.prefix, "scanned": c.scanned, "under": counts(&c.under),
        "identity": counts(&c.identity), "other": counts(&c.other),
        "unreadable": counts(&c.unreadable),
    })
}

fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    json!({
        "server_time_unix": s.server_time_unix,
        "store": s.store,
        "answered_by": s.answered_by,
        "replicas": replicas_json(s),
        "clusters": s.clusters.iter().map(|c| json!({
            "name": c.name, "seq": c.seq, "primary": c.primary, "pending": c.pending,
            "reconciling": c.reconciling.then(|| json!({
                "reason": c.reconciling_reason, "since_unix": c.reconciling_since_unix,
                "waiting_for": c.reconciling_waiting_for,
                "wanted": c.reconciling_wanted.iter().map(|w| json!({
                    "version": w.version, "key_id": w.key_id,
                })).collect::<Vec<_>>(),
            })),
            "clashes": c.clashes.iter().map(|x| json!({
                "node": x.node, "version": x.version,
                "service_key_id": x.service_key_id, "node_key_id": x.node_key_id,
            })).collect::<Vec<_>>(),
            "versions": c.versions.iter().map(|v| json!({
                "version": v.version, "state": v.state, "key_id": v.key_id,
                "created_unix": v.created_unix, "held_by": v.held_by,
                "destroy_after_unix": v.destroy_after_unix, "demoted_unix": v.demoted_unix,
            })).collect::<Vec<_>>(),
            "census": c.census.as_ref().map(|x| {
                let mut j = census_json(x);
                j["node"] = json!(c.census_node);
                j
            }),
            "nodes": c.nodes.iter().map(|n| json!({
                "name": n.name, "state": n.state, "connected": n.connected,
                "last_contact_unix": n.last_contact_unix, "held": n.held,
                "primary": n.primary, "applied_seq": n.applied_seq, "behind": n.behind,
                "token_expires_unix": n.token_expires_unix, "excused": n.excused,
                "writes_key_id": n.writes_key_id, "writes_since_unix": n.writes_since_unix,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18 11:06:40Z");
    }
}
