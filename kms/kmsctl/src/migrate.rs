//! `kmsctl migrate`: after a rotation, rewrite every object of the given
//! resources through the Kubernetes API, unchanged, so that kube-apiserver
//! stores each under the current key_id (it writes an object read under a
//! stale key_id even when nothing else changed). The shell around the pure
//! parts in the submodules: kube client, discovery, paginated lists, one
//! PUT per object at a bounded rate, the state file, progress and report.
//!
//! - [`precheck`]: refuses to start until every apiserver writes under the
//!   plugins' primary key_id;
//! - [`pace`]: the rate bound; [`progress`]: count, rate, ETA and their
//!   wording; [`state`]: what is done, to resume; [`report`]: the end.
//!
//! A census of what is stored under which key_id, before the first write
//! and after the last, plugs in through [`run_with`].

mod pace;
mod precheck;
mod progress;
mod report;
mod state;

use std::future::Future;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgekms_proto::admin::node_admin_client::NodeAdminClient;
use edgekms_proto::admin::StatusRequest;
use kube::api::{DynamicObject, ListParams, PostParams};
use kube::core::TypeMeta;
use kube::discovery::{verbs, ApiResource, Scope};
use kube::{Api, Client};

use crate::Failure;
use precheck::NodeFact;
use progress::Figures;
use state::{Counts, FailedObject, State};

/// Attempts at one object's write (conflicts and transient errors).
const ATTEMPTS: u32 = 5;
/// Attempts at one list call (transient errors).
const LIST_ATTEMPTS: u32 = 5;

#[derive(Debug, clap::Args)]
pub(crate) struct MigrateArgs {
    /// The kubeconfig (default: $KUBECONFIG, else ~/.kube/config)
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context)
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
    /// What to rewrite, comma-separated plural names; grouped ones as NAME.GROUP (deployments.apps, CRDs too)
    #[arg(
        long,
        value_name = "RESOURCE,...",
        value_delimiter = ',',
        default_value = "secrets"
    )]
    resources: Vec<String>,
    /// Objects written per second, at most
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Objects per list page
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    page_size: u32,
    /// Where to keep what is done, to resume after an interruption (default:
    /// $XDG_STATE_HOME/kmsctl or ~/.local/state/kmsctl, a file per apiserver
    /// URL and resources)
    #[arg(long, value_name = "FILE")]
    state_file: Option<PathBuf>,
    /// Start over rather than resume an interrupted run
    #[arg(long)]
    restart: bool,
    /// The admin socket of each control-plane node's plugin, whose
    /// apiserver must write under the primary key_id first (repeatable)
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_ADMIN_SOCKET)]
    admin_socket: Vec<PathBuf>,
    /// A cluster joined to the central key service: take what every active
    /// node's apiserver writes under from the service (--server,
    /// --operator-dir) instead of from admin sockets
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// With etcd access: a census before and after (kept by the plugin on
    /// the first --admin-socket); etcd as kube-apiserver's --etcd-servers
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The CA of etcd's certificate (kube-apiserver's --etcd-cafile)
    #[arg(long, value_name = "FILE")]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate etcd accepts (kube-apiserver's --etcd-certfile)
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// Its key (kube-apiserver's --etcd-keyfile)
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// kube-apiserver's --encryption-provider-config, for the census
    #[arg(long, value_name = "FILE")]
    encryption_config: Option<PathBuf>,
    /// The central service and operator dir (kmsctl's global flags).
    #[arg(skip)]
    pub(crate) central: (Option<String>, Option<PathBuf>),
}

/// When a census is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CensusPoint {
    /// After the precheck, before the first write of this run.
    Before,
    /// After the last write, before the report.
    After,
}

/// A census of what is stored under which key_id (the census crate's),
/// taken at each [`CensusPoint`]; what it returns goes into the report
/// (`census.before`, `census.after`). An error stops the migration.
pub(crate) type CensusFn<'a> = Box<
    dyn FnMut(CensusPoint) -> Pin<Box<dyn Future<Output = Result<serde_json::Value, String>> + 'a>>
        + 'a,
>;

/// `kmsctl migrate`, with a census before and after when etcd is given.
pub(crate) async fn run(args: MigrateArgs, json: bool) -> Result<(), Failure> {
    if args.etcd_endpoints.is_empty() {
        return run_with(args, json, None).await;
    }
    let census_args = crate::census::CensusArgs {
        etcd_endpoints: args.etcd_endpoints.clone(),
        etcd_cacert: args.etcd_cacert.clone(),
        etcd_cert: args.etcd_cert.clone(),
        etcd_key: args.etcd_key.clone(),
        provider: None,
        prefix: "/registry/".into(),
        encryption_config: args.encryption_config.clone(),
        page_size: 500,
    };
    let admin = args.admin_socket.first().cloned().unwrap_or_default();
    let take: CensusFn<'_> = Box::new(move |_point| {
        let (admin, census_args) = (admin.clone(), census_args.clone());
        Box::pin(async move {
            let c = crate::census::take_and_keep(&admin, &census_args)
                .await
                .map_err(|f| match f {
                    Failure::Usage(m) | Failure::Timeout(m) => m,
                    Failure::Refused(s) => s.message().to_owned(),
                })?;
            serde_json::to_value(&c).map_err(|e| e.to_string())
        })
    });
    run_with(args, json, Some(take)).await
}

/// `kmsctl migrate`, with a census before and after when one is given.
pub(crate) async fn run_with(
    args: MigrateArgs,
    json: bool,
    mut census: Option<CensusFn<'_>>,
) -> Result<(), Failure> {
    let specs = parse_resources(&args.resources).map_err(Failure::Usage)?;
    let (client, server) = connect(&args).await?;
    let mut targets = Vec::new();
    for spec in &specs {
        targets.push(Arc::new(resolve(&client, spec).await?));
    }

    let facts = match &args.cluster {
        Some(cluster) => central_facts(&args.central, cluster).await?,
        None => node_facts(&args.admin_socket).await?,
    };
    let key_id = precheck::check(&facts)
        .map_err(|r| Failure::Refused(tonic::Status::failed_precondition(r.to_string())))?;

    let names: Vec<String> = specs.iter().map(|s| s.given.clone()).collect();
    let path = match &args.state_file {
        Some(p) => p.clone(),
        None => state::default_dir(
            std::env::var("XDG_STATE_HOME").ok().as_deref(),
            std::env::var("HOME").ok().as_deref(),
        )
        .ok_or_else(|| {
            Failure::Usage(
                "no $XDG_STATE_HOME nor $HOME for the state file: pass --state-file".into(),
            )
        })?
        .join(state::file_name(&server, &names)),
    };
    let (mut st, resumed) = open_state(&path, &server, &names, args.restart)?;
    let progress = Progress::new(std::io::stderr().is_terminal());
    progress.say(&format!(
        "migrate: every apiserver writes under key_id {key_id}; rewriting {} of {server} at most {}/s (state: {})",
        names.join(","),
        args.rate,
        path.display()
    ));
    if resumed {
        progress.say(&format!(
            "migrate: resuming an interrupted run: {}",
            resume_summary(&st)
        ));
    }
    st.runs += 1;
    state::save(&path, &st).map_err(Failure::Usage)?;

    let before = match census.as_mut() {
        Some(take) => Some(take(CensusPoint::Before).await.map_err(census_failed)?),
        None => None,
    };

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        });
    }
    let mut run = Run {
        pacer: pace::Pacer::new(args.rate),
        workers: (args.rate / 10).clamp(1, 16) as usize,
        page_size: args.page_size,
        started: Instant::now(),
        handled: 0,
        base_elapsed: st.elapsed_secs.max(0.0),
        estimates: st.progress.iter().map(|p| p.counts.listed).collect(),
        progress,
        interrupted,
        path: path.clone(),
    };
    for (i, target) in targets.iter().enumerate() {
        run.resource(&mut st, i, target).await?;
    }
    run.progress.finish();

    let after = match census.as_mut() {
        Some(take) => Some(take(CensusPoint::After).await.map_err(census_failed)?),
        None => None,
    };
    let duration = run.started.elapsed();
    let report = report::Report {
        server,
        resumed,
        duration,
        duration_all_runs: duration + Duration::from_secs_f64(run.base_elapsed),
        handled_this_run: run.handled,
        resources: st.progress.clone(),
        census: before.zip(after),
    };
    // Every page is done: nothing to resume, whatever failed.
    state::remove(&path).map_err(Failure::Usage)?;
    if json {
        crate::print_json(report.json());
    } else {
        println!("{}", report.human());
    }
    let failed = report.totals().failed;
    if failed > 0 {
        return Err(Failure::Refused(tonic::Status::aborted(format!(
            "{failed} object(s) could not be rewritten (named in the report): fix what is named, then run again (objects already under key_id {key_id} cost a no-op write)"
        ))));
    }
    Ok(())
}

fn census_failed(e: String) -> Failure {
    Failure::Usage(format!("the census failed: {e}"))
}

/// One resource as the operator named it: `secrets`, `deployments.apps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResourceSpec {
    given: String,
    plural: String,
    /// The API group; empty for the core group.
    group: String,
}

/// The resources named on the command line, lower-cased, each once.
fn parse_resources(list: &[String]) -> Result<Vec<ResourceSpec>, String> {
    let mut specs: Vec<ResourceSpec> = Vec::new();
    for raw in list {
        let given = raw.trim().to_ascii_lowercase();
        if given.is_empty() {
            continue;
        }
        let (plural, group) = given.split_once('.').unwrap_or((&given, ""));
        if plural.is_empty() || given.contains('/') || given.ends_with('.') {
            return Err(format!(
                "--resources: {raw:?} is no resource: name it as `kubectl api-resources` does, e.g. secrets or deployments.apps"
            ));
        }
        if !specs.iter().any(|s| s.given == given) {
            specs.push(ResourceSpec {
                plural: plural.to_owned(),
                group: group.to_owned(),
                given,
            });
        }
    }
    if specs.is_empty() {
        return Err("--resources names no resource".into());
    }
    Ok(specs)
}

/// A client for the kubeconfig's context, and the server's URL.
async fn connect(args: &MigrateArgs) -> Result<(Client, String), Failure> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let kubeconfig = match &args.kubeconfig {
        Some(path) => Kubeconfig::read_from(path),
        None => Kubeconfig::read(),
    }
    .map_err(|e| Failure::Usage(format!("cannot read the kubeconfig: {e}")))?;
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| Failure::Usage(format!("cannot use the kubeconfig: {e}")))?;
    let server = config.cluster_url.to_string();
    let server = server.trim_end_matches('/').to_owned();
    let client = Client::try_from(config)
        .map_err(|e| Failure::Usage(format!("cannot make a client for {server}: {e}")))?;
    Ok((client, server))
}

/// One resolved resource: how to list and write it.
struct Target {
    name: String,
    client: Client,
    ar: ApiResource,
    namespaced: bool,
}

impl Target {
    fn api(&self, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) if self.namespaced => Api::namespaced_with(self.client.clone(), ns, &self.ar),
            _ => Api::all_with(self.client.clone(), &self.ar),
        }
    }
}

/// Finds `spec` by discovery, in its group's preferred version.
async fn resolve(client: &Client, spec: &ResourceSpec) -> Result<Target, Failure> {
    let unreachable = |e: kube::Error| {
        Failure::Usage(format!("cannot discover {}: {}", spec.given, describe(&e)))
    };
    let group = match kube::discovery::group(client, &spec.group).await {
        Ok(g) => g,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            return Err(Failure::Usage(format!(
                "--resources: the apiserver has no API group {:?} (for {})",
                spec.group, spec.given
            )))
        }
        Err(e) => return Err(unreachable(e)),
    };
    let found = group
        .recommended_resources()
        .into_iter()
        .find(|(ar, _)| ar.plural == spec.plural || ar.kind.eq_ignore_ascii_case(&spec.plural));
    let Some((ar, caps)) = found else {
        return Err(Failure::Usage(format!(
            "--resources: the apiserver has no resource {} (see `kubectl api-resources`)",
            spec.given
        )));
    };
    for verb in [verbs::LIST, verbs::GET, verbs::UPDATE] {
        if !caps.supports_operation(verb) {
            return Err(Failure::Usage(format!(
                "--resources: {} does not support {verb}, which migrate needs",
                spec.given
            )));
        }
    }
    Ok(Target {
        name: spec.given.clone(),
        client: client.clone(),
        namespaced: caps.scope == Scope::Namespaced,
        ar,
    })
}

/// What each plugin says about its primary key_id and its apiserver.
async fn node_facts(sockets: &[PathBuf]) -> Result<Vec<NodeFact>, Failure> {
    let mut facts = Vec::new();
    for socket in sockets {
        let mut admin = NodeAdminClient::new(crate::channel(socket).await?);
        let s = admin.status(StatusRequest {}).await?.into_inner();
        facts.push(NodeFact {
            node: format!("{}/{} ({})", s.cluster, s.node, socket.display()),
            primary_key_id: s.primary_key_id,
            writes_key_id: s.writes_key_id,
        });
    }
    Ok(facts)
}

/// What the central service says of every active node of `cluster`: the
/// cluster's primary key_id, and what each node's apiserver writes under.
async fn central_facts(
    central: &(Option<String>, Option<PathBuf>),
    cluster: &str,
) -> Result<Vec<NodeFact>, Failure> {
    let mut client = crate::operator_client(central.0.clone(), central.1.clone()).await?;
    let status = client
        .status(edgekms_proto::fleet::StatusRequest {
            cluster: cluster.to_owned(),
        })
        .await?
        .into_inner();
    let c = status
        .clusters
        .into_iter()
        .find(|c| c.name == cluster)
        .ok_or_else(|| Failure::Usage(format!("the central service has no cluster {cluster:?}")))?;
    let primary_key_id = c
        .versions
        .iter()
        .find(|v| v.version == c.primary)
        .map(|v| v.key_id.clone())
        .unwrap_or_default();
    Ok(c.nodes
        .into_iter()
        .filter(|n| n.state == "active")
        .map(|n| NodeFact {
            node: format!("{cluster}/{} (central service)", n.name),
            primary_key_id: primary_key_id.clone(),
            writes_key_id: n.writes_key_id,
        })
        .collect())
}

/// The state to work on, and whether it resumes an interrupted run.
fn open_state(
    path: &std::path::Path,
    server: &str,
    names: &[String],
    restart: bool,
) -> Result<(State, bool), Failure> {
    if restart {
        return Ok((State::new(server, names), false));
    }
    match state::load(path) {
        Ok(Some(st)) => {
            st.check_for(server, names).map_err(|why| {
                Failure::Usage(format!(
                    "the state file {} is not for this migration: {why}; pass another --state-file, or --restart to start over",
                    path.display()
                ))
            })?;
            let resumed = st.started();
            Ok((st, resumed))
        }
        Ok(None) => Ok((State::new(server, names), false)),
        Err(e) => Err(Failure::Usage(format!(
            "{e}: pass --restart to start over (objects already under the current key_id cost a no-op write)"
        ))),
    }
}

fn resume_summary(st: &State) -> String {
    let parts: Vec<String> = st
        .progress
        .iter()
        .map(|p| match (p.done, p.pages) {
            (true, _) => format!("{} done ({} objects)", p.resource, p.counts.listed),
            (false, 0) => format!("{} not started", p.resource),
            (false, n) => format!(
                "{} from page {} ({} objects done)",
                p.resource,
                n + 1,
                p.counts.handled()
            ),
        })
        .collect();
    parts.join(", ")
}

/// How one object's write ended.
enum Outcome {
    Rewritten,
    /// Deleted meanwhile.
    Skipped,
    Failed(FailedObject),
}

/// How an API error is handled.
enum Class {
    NotFound,
    Conflict,
    /// The continue token expired (410 Gone).
    Gone,
    /// Worth another try after a pause (throttled, unavailable, network).
    Transient,
    Fatal,
}

fn classify(e: &kube::Error) -> Class {
    match e {
        kube::Error::Api(s) => match s.code {
            404 => Class::NotFound,
            409 => Class::Conflict,
            410 => Class::Gone,
            429 | 500 | 502 | 503 | 504 => Class::Transient,
            _ => Class::Fatal,
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => Class::Transient,
        _ => Class::Fatal,
    }
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 << attempt.min(5))
}

/// Writes `obj` back unchanged (with its resourceVersion); on a conflict
/// re-reads it and writes that. Returns the outcome and the conflicts met.
async fn rewrite(target: Arc<Target>, mut obj: DynamicObject) -> (Outcome, u64) {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let namespace = obj.metadata.namespace.clone();
    let label = match &namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.clone(),
    };
    let failed = |error: String| {
        Outcome::Failed(FailedObject {
            object: label.clone(),
            error,
        })
    };
    let api = target.api(namespace.as_deref());
    let mut conflicts = 0;
    let mut attempt = 0;
    loop {
        attempt += 1;
        obj.types = Some(TypeMeta {
            api_version: target.ar.api_version.clone(),
            kind: target.ar.kind.clone(),
        });
        let err = match api.replace(&name, &PostParams::default(), &obj).await {
            Ok(_) => return (Outcome::Rewritten, conflicts),
            Err(e) => e,
        };
        match classify(&err) {
            Class::NotFound => return (Outcome::Skipped, conflicts),
            Class::Conflict if attempt < ATTEMPTS => {
                conflicts += 1;
                match api.get(&name).await {
                    Ok(fresh) => obj = fresh,
                    Err(e) => match classify(&e) {
                        Class::NotFound => return (Outcome::Skipped, conflicts),
                        _ => {
                            return (
                                failed(format!("re-reading it after a conflict: {}", describe(&e))),
                                conflicts,
                            )
                        }
                    },
                }
            }
            Class::Transient if attempt < ATTEMPTS => tokio::time::sleep(backoff(attempt)).await,
            Class::Conflict => {
                return (
                    failed(format!(
                        "still conflicting after {ATTEMPTS} attempts: {}",
                        describe(&err)
                    )),
                    conflicts,
                )
            }
            _ => return (failed(describe(&err)), conflicts),
        }
    }
}

/// One run over the resources: the pacing, the workers, the progress.
struct Run {
    pacer: pace::Pacer,
    workers: usize,
    page_size: u32,
    started: Instant,
    /// Objects handled by this run.
    handled: u64,
    /// Seconds spent by earlier runs on this state.
    base_elapsed: f64,
    /// Per resource, the estimated total (listed plus remaining).
    estimates: Vec<u64>,
    progress: Progress,
    interrupted: Arc<AtomicBool>,
    path: PathBuf,
}

impl Run {
    fn figures(&self, st: &State, page: &Counts) -> Figures {
        let mut done = page.handled();
        let mut failed = page.failed;
        for p in &st.progress {
            done += p.counts.handled();
            failed += p.counts.failed;
        }
        Figures {
            done,
            done_this_run: self.handled,
            total: self.estimates.iter().sum(),
            failed,
        }
    }

    fn stop_if_interrupted(&self) -> Result<(), Failure> {
        if self.interrupted.load(Ordering::SeqCst) {
            self.progress.finish();
            return Err(Failure::Refused(tonic::Status::cancelled(format!(
                "interrupted: run the same command again to resume from the last page done (state: {})",
                self.path.display()
            ))));
        }
        Ok(())
    }

    /// Lists and rewrites resource `i` page by page from where its state
    /// says, saving the state after each page.
    async fn resource(
        &mut self,
        st: &mut State,
        i: usize,
        target: &Arc<Target>,
    ) -> Result<(), Failure> {
        let list_api = target.api(None);
        while !st.progress[i].done {
            self.stop_if_interrupted()?;
            let mut params = ListParams::default().limit(self.page_size);
            if let Some(token) = &st.progress[i].continue_token {
                params = params.continue_token(token);
            }
            let page = match self.list(&list_api, &params, &target.name).await? {
                Some(page) => page,
                None => {
                    self.progress.say(&format!(
                        "migrate: {}: the continue token expired (the apiserver compacted its history): starting {} over from the first page",
                        target.name, target.name
                    ));
                    st.progress[i].start_over();
                    self.estimates[i] = 0;
                    state::save(&self.path, st).map_err(Failure::Usage)?;
                    continue;
                }
            };
            let next = page.metadata.continue_.clone().filter(|t| !t.is_empty());
            let remaining = page
                .metadata
                .remaining_item_count
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0);
            let mut counts = Counts {
                listed: page.items.len() as u64,
                ..Default::default()
            };
            self.estimates[i] = st.progress[i].counts.listed + counts.listed + remaining;
            let mut failures = Vec::new();
            let mut tasks = tokio::task::JoinSet::new();
            let mut items = page.items.into_iter();
            loop {
                if self.interrupted.load(Ordering::SeqCst) {
                    tasks.shutdown().await;
                    self.stop_if_interrupted()?;
                }
                let next_item = if tasks.len() < self.workers {
                    items.next()
                } else {
                    None
                };
                if let Some(obj) = next_item {
                    let wait = self.pacer.reserve(self.started.elapsed());
                    tokio::time::sleep(wait).await;
                    tasks.spawn(rewrite(target.clone(), obj));
                    continue;
                }
                let Some(joined) = tasks.join_next().await else {
                    break;
                };
                let (outcome, conflicts) = joined.map_err(|e| {
                    Failure::Usage(format!("a write of {} did not finish: {e}", target.name))
                })?;
                counts.conflicts += conflicts;
                match outcome {
                    Outcome::Rewritten => counts.rewritten += 1,
                    Outcome::Skipped => counts.skipped += 1,
                    Outcome::Failed(f) => {
                        counts.failed += 1;
                        self.progress.say(&format!(
                            "migrate: failed: {} {}: {}",
                            target.name, f.object, f.error
                        ));
                        failures.push(f);
                    }
                }
                self.handled += 1;
                let figures = self.figures(st, &counts);
                self.progress
                    .update(&target.name, &figures, self.started.elapsed());
            }
            st.progress[i].page_done(next, &counts, failures);
            st.elapsed_secs = self.base_elapsed + self.started.elapsed().as_secs_f64();
            state::save(&self.path, st).map_err(Failure::Usage)?;
        }
        self.estimates[i] = st.progress[i].counts.listed;
        Ok(())
    }

    /// One page; `None` when the continue token has expired.
    async fn list(
        &self,
        api: &Api<DynamicObject>,
        params: &ListParams,
        name: &str,
    ) -> Result<Option<kube::core::ObjectList<DynamicObject>>, Failure> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match api.list(params).await {
                Ok(page) => return Ok(Some(page)),
                Err(e) => match classify(&e) {
                    Class::Gone if params.continue_token.is_some() => return Ok(None),
                    Class::Transient if attempt < LIST_ATTEMPTS => {
                        tokio::time::sleep(backoff(attempt)).await
                    }
                    _ => {
                        self.progress.finish();
                        return Err(Failure::Usage(format!(
                            "cannot list {name}: {}; run the same command again to resume from the last page done (state: {})",
                            describe(&e),
                            self.path.display()
                        )));
                    }
                },
            }
        }
    }
}

/// Progress on stderr: a bar on a terminal, plain lines every few seconds
/// otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<Duration>,
}

impl Progress {
    fn new(terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template("[{bar:30}] {msg}") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Self {
            bar,
            last_line: None,
        }
    }

    /// A message of its own (above the bar on a terminal).
    fn say(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn update(&mut self, resource: &str, f: &Figures, elapsed: Duration) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(f.total.max(f.done));
                bar.set_position(f.done);
                bar.set_message(progress::line(resource, f, elapsed));
            }
            None => {
                if progress::line_due(self.last_line, elapsed) {
                    self.last_line = Some(elapsed);
                    eprintln!("{}", progress::line(resource, f, elapsed));
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &[&str]) -> Result<Vec<(String, String)>, String> {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        parse_resources(&list).map(|v| v.into_iter().map(|s| (s.plural, s.group)).collect())
    }

    #[test]
    fn resources_are_named_as_kubectl_names_them() {
        assert_eq!(
            parse(&[
                "secrets",
                " ConfigMaps",
                "deployments.apps",
                "foos.example.com"
            ])
            .unwrap(),
            vec![
                ("secrets".into(), "".into()),
                ("configmaps".into(), "".into()),
                ("deployments".into(), "apps".into()),
                ("foos".into(), "example.com".into()),
            ]
        );
        assert_eq!(parse(&["secrets", "secrets", ""]).unwrap().len(), 1);
    }

    #[test]
    fn what_is_no_resource_is_refused() {
        assert!(parse(&[""]).is_err());
        assert!(parse(&[".apps"]).is_err());
        assert!(parse(&["apps/v1"]).is_err());
        assert!(parse(&["secrets."]).is_err());
    }

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            reason: "Reason".into(),
            message: "what".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn api_errors_are_handled_by_their_code() {
        let class = |code| classify(&api_error(code));
        assert!(matches!(class(404), Class::NotFound));
        assert!(matches!(class(409), Class::Conflict));
        assert!(matches!(class(410), Class::Gone));
        for code in [429, 500, 502, 503, 504] {
            assert!(matches!(class(code), Class::Transient), "{code}");
        }
        for code in [400, 401, 403, 422] {
            assert!(matches!(class(code), Class::Fatal), "{code}");
        }
        assert_eq!(describe(&api_error(422)), "422 Reason: what");
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(2), Duration::from_millis(800));
        assert_eq!(backoff(9), backoff(5));
    }

    #[test]
    fn a_resume_is_summed_up_per_resource() {
        let names = vec![
            "secrets".to_string(),
            "configmaps".to_string(),
            "x.y".to_string(),
        ];
        let mut st = State::new("https://a", &names);
        st.progress[0].page_done(
            Some("t".into()),
            &Counts {
                listed: 50,
                rewritten: 50,
                ..Default::default()
            },
            vec![],
        );
        st.progress[1].page_done(None, &Counts::default(), vec![]);
        assert_eq!(
            resume_summary(&st),
            "secrets from page 2 (50 objects done), configmaps done (0 objects), x.y not started"
        );
    }
}
