//! A real etcd cluster of several members (Debian's `etcd`, v3.4), for
//! tests of what a client does when members fail: each member on free
//! loopback client and peer ports, plain `http://`, its data dir in one
//! temporary directory, every member killed on drop. A member can be
//! killed, stopped, and started again on the same data dir and flags, and
//! then rejoins.
//!
//! Leadership, writes and reads go through etcd's v3 JSON gateway on each
//! member's client port (uint64 fields come as JSON strings there). Raft
//! timings are short, so that a new leader is elected within about a
//! second. A missing etcd skips or fails the test as for [`crate::etcd`].

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::etcd::{available, base64, header_revision, post_within};
use crate::net::free_port;
use crate::process::Daemon;

/// A follower calls an election after 500 ms without a heartbeat (etcd's
/// defaults: 100 ms and 1 s).
const HEARTBEAT_MS: u32 = 50;
const ELECTION_MS: u32 = 500;
/// 256 MiB: more than any test writes, small enough that a runaway test
/// meets etcd's "database space exceeded" before the disk fills.
const QUOTA_BYTES: u64 = 256 << 20;
/// How long one request to a member may go unanswered. etcd itself gives
/// up on a write it cannot commit after 5 s + 2 election timeouts (6 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a status request may go unanswered: a member started again
/// accepts connections but answers nothing until it has rejoined.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the members have to form a cluster, or one to rejoin.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for a member to exit after SIGTERM (a leader
/// hands its leadership over first).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// One member: how to start it again, and its process.
struct Member {
    client: u16,
    /// Every flag it was started with, to start it again identically.
    args: Vec<String>,
    /// Its raft member id, fixed by its peer URL and the cluster token.
    id: u64,
    daemon: Daemon,
}

impl Member {
    fn command(&self) -> Command {
        let mut cmd = Command::new(crate::etcd::binary());
        cmd.args(&self.args);
        cmd
    }
}

/// What a member's `/v3/maintenance/status` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Status {
    /// Its own member id (`header.member_id`).
    id: u64,
    /// The leader it follows, or itself; `None` when it knows of none.
    leader: Option<u64>,
    raft_term: u64,
}

/// A running etcd cluster; every member is killed on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// A cluster of `n` members with a leader, or `None` when the test is
    /// to skip (etcd missing and `EDGEKMS_REQUIRE_ETCD` not set).
    pub fn fresh(n: usize) -> Option<EtcdCluster> {
        available().then(|| EtcdCluster::start(n))
    }

    /// Starts `n` members and waits until they have elected a leader and
    /// every member answers; fails if etcd is missing or they do not.
    pub fn start(n: usize) -> EtcdCluster {
        assert!(n > 0, "an etcd cluster has at least one member");
        let dir = tempfile::tempdir().unwrap();
        for attempt in 0..5 {
            // Another process may take a free port before etcd binds it:
            // then a member exits, and all start again on other ports.
            let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
            let initial_cluster = ports
                .iter()
                .enumerate()
                .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
                .collect::<Vec<_>>()
                .join(",");
            // Unique per cluster, so that a member of another test's cluster
            // that reached one of these ports is refused rather than joined.
            let token = format!("edgekms-test-{}-{}", std::process::id(), ports[0].0);
            let mut members: Vec<Member> = ports
                .iter()
                .enumerate()
                .map(|(i, &(client, peer))| {
                    let name = format!("m{i}");
                    let data = dir.path().join(format!("{name}-{client}"));
                    let args = member_args(&name, &data, client, peer, &initial_cluster, &token);
                    let mut cmd = Command::new(crate::etcd::binary());
                    cmd.args(&args);
                    let log = dir.path().join(format!("{name}-{client}.log"));
                    Member {
                        client,
                        args,
                        id: 0,
                        daemon: Daemon::spawn("etcd", cmd, &log),
                    }
                })
                .collect();
            if let Some(ids) = wait_formed(&mut members) {
                for (m, id) in members.iter_mut().zip(ids) {
                    m.id = id;
                }
                return EtcdCluster { members, _dir: dir };
            }
            eprintln!("etcd cluster attempt {attempt} failed, retrying on other ports");
        }
        panic!("an etcd cluster of {n} would not start on free ports (5 attempts)");
    }

    /// How many members the cluster has (up or not).
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Every member's client URL, `http://127.0.0.1:P`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.size()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client)
    }

    /// Member `i`'s raft member id (as `etcdctl member list` shows it in
    /// hex); known whether or not it is up.
    pub fn member_id(&self, i: usize) -> u64 {
        self.members[i].id
    }

    /// Member `i`'s process id (fails when it is not running).
    pub fn pid(&self, i: usize) -> u32 {
        self.members[i].daemon.pid()
    }

    /// The last `lines` lines of member `i`'s log (warnings and errors).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.members[i].daemon.log_tail(lines)
    }

    /// Whether member `i`'s process runs: started, and neither killed,
    /// stopped nor exited. (It may run and not answer, while rejoining.)
    pub fn is_up(&self, i: usize) -> bool {
        let d = &self.members[i].daemon;
        d.is_running() && process_alive(d.pid())
    }

    /// The member that is leader, by asking each member that is up: the
    /// one whose status names itself leader (the one of the highest raft
    /// term, should two). `None` when no member that answers leads.
    pub fn leader(&self) -> Option<usize> {
        let statuses = self.statuses();
        statuses
            .iter()
            .filter(|(_, s)| s.leader == Some(s.id))
            .max_by_key(|(_, s)| s.raft_term)
            .map(|(i, _)| *i)
    }

    /// Waits until one member leads and every member that answers follows
    /// it; that leader. Fails after `timeout`, with every member's log.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.statuses();
            let leader = statuses
                .iter()
                .filter(|(_, s)| s.leader == Some(s.id))
                .max_by_key(|(_, s)| s.raft_term);
            if let Some((l, s)) = leader {
                if statuses.iter().all(|(_, o)| o.leader == Some(s.id)) {
                    return *l;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader all members follow within {timeout:?} (statuses {statuses:?}):\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to member `i`, as a crash; reaped.
    pub fn kill(&mut self, i: usize) {
        self.members[i].daemon.kill();
    }

    /// SIGTERM to member `i`, and waits for it to exit (fails the test if
    /// it lingers 15 s).
    pub fn stop(&mut self, i: usize) {
        self.members[i].daemon.stop(STOP_TIMEOUT);
    }

    /// Starts member `i` again, killed or stopped before, on its data dir
    /// and with its flags: it rejoins as the same member. When the members
    /// up, it included, make a quorum, waits until it has rejoined (it
    /// answers and follows a leader); otherwise it cannot answer before
    /// more members are back, and this returns once it is started.
    pub fn start_again(&mut self, i: usize) {
        assert!(!self.is_up(i), "etcd member {i} is still up");
        // Reaps a member that exited by itself, so that it can be spawned.
        let _ = self.members[i].daemon.try_exit();
        let cmd = self.members[i].command();
        self.members[i].daemon.respawn(cmd);
        let up = (0..self.size()).filter(|&j| self.is_up(j)).count();
        if up < self.size() / 2 + 1 {
            return;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.members[i].daemon.try_exit() {
                panic!(
                    "etcd member {i} exited ({status}) when started again:\n{}",
                    self.log_tail(i, 30)
                );
            }
            if self.status(i).is_ok_and(|s| s.leader.is_some()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {i} did not rejoin within {START_TIMEOUT:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes `key` through member `i`; the revision of the write, or the
    /// error etcd answered (`HTTP/1.1 5xx ...` and etcd's message) or the
    /// connection's (refused, no answer within 10 s).
    pub fn put(&self, i: usize, key: &[u8], value: &[u8]) -> Result<i64, String> {
        let body = format!(r#"{{"key":"{}","value":"{}"}}"#, base64(key), base64(value));
        let answer = post_within(self.members[i].client, "/v3/kv/put", &body, REQUEST_TIMEOUT)?;
        header_revision(&answer).ok_or_else(|| format!("etcd put answered {answer}"))
    }

    /// Reads `key` through member `i`, linearizably (the read needs a
    /// quorum, as a write does); its value, `None` when there is no such
    /// key, or the error as for [`put`](Self::put).
    pub fn get(&self, i: usize, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        use base64::Engine;
        let body = format!(r#"{{"key":"{}"}}"#, base64(key));
        let answer = post_within(
            self.members[i].client,
            "/v3/kv/range",
            &body,
            REQUEST_TIMEOUT,
        )?;
        if !answer.contains("\"kvs\":[") {
            return Ok(None);
        }
        // One key asked, so at most one value; etcd leaves an empty one out.
        let Some(value) = json_string(&answer, "value") else {
            return Ok(Some(Vec::new()));
        };
        base64::engine::general_purpose::STANDARD
            .decode(value)
            .map(Some)
            .map_err(|e| format!("etcd range answered {answer}: {e}"))
    }

    /// Member `i`'s status, if it answers within a second.
    fn status(&self, i: usize) -> Result<Status, String> {
        let answer = post_within(
            self.members[i].client,
            "/v3/maintenance/status",
            "{}",
            PROBE_TIMEOUT,
        )?;
        parse_status(&answer).ok_or_else(|| format!("etcd status answered {answer}"))
    }

    /// The status of every member that is up and answers.
    fn statuses(&self) -> Vec<(usize, Status)> {
        (0..self.size())
            .filter(|&i| self.is_up(i))
            .filter_map(|i| self.status(i).ok().map(|s| (i, s)))
            .collect()
    }

    /// The end of every member's log, for failure messages.
    fn logs(&self) -> String {
        (0..self.size())
            .map(|i| format!("--- etcd member {i}:\n{}", self.log_tail(i, 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The flags of member `name`; the `--initial-*` ones matter only at the
/// first start (later etcd reads the membership from its data dir).
fn member_args(
    name: &str,
    data: &Path,
    client: u16,
    peer: u16,
    initial_cluster: &str,
    token: &str,
) -> Vec<String> {
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    vec![
        format!("--name={name}"),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster={initial_cluster}"),
        format!("--initial-cluster-token={token}"),
        "--initial-cluster-state=new".to_owned(),
        format!("--heartbeat-interval={HEARTBEAT_MS}"),
        format!("--election-timeout={ELECTION_MS}"),
        format!("--quota-backend-bytes={QUOTA_BYTES}"),
        "--log-level=warn".to_owned(),
        "--logger=zap".to_owned(),
    ]
}

/// Waits until every member answers and follows one leader: their member
/// ids, in order. `None` (every member killed) when one exits first, as
/// when its port was taken; fails after [`START_TIMEOUT`].
fn wait_formed(members: &mut [Member]) -> Option<Vec<u64>> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        for (i, m) in members.iter_mut().enumerate() {
            if let Some(status) = m.daemon.try_exit() {
                eprintln!(
                    "etcd member {i} exited ({status}):\n{}",
                    m.daemon.log_tail(20)
                );
                members.iter_mut().for_each(|m| m.daemon.kill());
                return None;
            }
        }
        let statuses: Vec<Option<Status>> = members
            .iter()
            .map(|m| {
                post_within(m.client, "/v3/maintenance/status", "{}", PROBE_TIMEOUT)
                    .ok()
                    .and_then(|a| parse_status(&a))
            })
            .collect();
        if let Some(all) = statuses.iter().copied().collect::<Option<Vec<Status>>>() {
            let leader = all[0].leader;
            if leader.is_some() && all.iter().all(|s| s.leader == leader) {
                return Some(all.iter().map(|s| s.id).collect());
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = members
                .iter()
                .enumerate()
                .map(|(i, m)| format!("--- etcd member {i}:\n{}", m.daemon.log_tail(15)))
                .collect();
            panic!(
                "etcd cluster did not elect a leader within {START_TIMEOUT:?} (statuses {statuses:?}):\n{}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `{"header":{..,"member_id":"N",..},..,"leader":"N",..,"raftTerm":"N",..}`;
/// etcd leaves `leader` out while it knows of none.
fn parse_status(answer: &str) -> Option<Status> {
    let number = |name: &str| json_string(answer, name).and_then(|v| v.parse::<u64>().ok());
    Some(Status {
        id: number("member_id")?,
        leader: number("leader").filter(|&l| l != 0),
        raft_term: number("raftTerm")?,
    })
}

/// The string value of the first field `name` in a JSON text, for the few
/// flat fields read here (no escapes in them: numbers and base64).
fn json_string<'a>(json: &'a str, name: &str) -> Option<&'a str> {
    let tag = format!("\"{name}\":\"");
    let at = json.find(&tag)? + tag.len();
    let rest = &json[at..];
    Some(&rest[..rest.find('"')?])
}

/// Whether process `pid` exists and is not a zombie (exited, not reaped).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ELECTION: Duration = Duration::from_secs(10);

    #[test]
    fn status_parses_with_and_without_a_leader() {
        let led = r#"{"header":{"cluster_id":"85","member_id":"5068672569658588005","revision":"1","raft_term":"2"},"version":"3.4.23","dbSize":"20480","leader":"11743043525309198013","raftIndex":"8","raftTerm":"2","raftAppliedIndex":"8","dbSizeInUse":"16384"}"#;
        assert_eq!(
            parse_status(led),
            Some(Status {
                id: 5068672569658588005,
                leader: Some(11743043525309198013),
                raft_term: 2,
            })
        );
        let alone = r#"{"header":{"cluster_id":"85","member_id":"11743043525309198013","revision":"1","raft_term":"2"},"version":"3.4.23","dbSize":"20480","raftIndex":"8","raftTerm":"2","raftAppliedIndex":"8","errors":["etcdserver: no leader"],"dbSizeInUse":"16384"}"#;
        assert_eq!(parse_status(alone).unwrap().leader, None);
        assert_eq!(parse_status(r#"{"error":"x"}"#), None);
    }

    #[test]
    fn etcd_cluster_elects_a_new_leader_when_the_leader_is_killed_and_it_rejoins() {
        let Some(mut c) = EtcdCluster::fresh(3) else {
            return;
        };
        assert_eq!(c.endpoints().len(), 3);
        let mut ids: Vec<u64> = (0..3).map(|i| c.member_id(i)).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 3, "three distinct member ids");
        let old = c.wait_leader(ELECTION);
        assert!(c.leader().is_some());
        c.put(old, b"k", b"before").unwrap();

        c.kill(old);
        assert!(!c.is_up(old));
        let since = Instant::now();
        let new = c.wait_leader(ELECTION);
        eprintln!("new leader {new} in {:?}", since.elapsed());
        assert_ne!(new, old, "a member that is down cannot lead");
        assert_eq!(c.leader(), Some(new));
        // Two of three are a quorum: writes and reads go on through either.
        for i in (0..3).filter(|&i| i != old) {
            c.put(i, b"k", format!("during {i}").as_bytes()).unwrap();
            assert_eq!(c.get(i, b"k").unwrap(), Some(format!("during {i}").into()));
        }
        let last = (0..3).rfind(|&i| i != old).unwrap();

        c.start_again(old);
        assert!(c.is_up(old));
        let leader = c.wait_leader(ELECTION);
        // The same member came back (same id), and it has every write made
        // while it was down.
        assert_eq!(c.status(old).unwrap().id, c.member_id(old));
        assert_eq!(c.status(old).unwrap().leader, Some(c.member_id(leader)));
        assert_eq!(
            c.get(old, b"k").unwrap(),
            Some(format!("during {last}").into())
        );
        assert_eq!(c.get(old, b"absent").unwrap(), None);
        c.put(old, b"empty", b"").unwrap();
        assert_eq!(c.get(leader, b"empty").unwrap(), Some(Vec::new()));
    }

    #[test]
    fn etcd_cluster_without_quorum_refuses_writes_and_recovers() {
        let Some(mut c) = EtcdCluster::fresh(3) else {
            return;
        };
        let before = c.put(0, b"k", b"1").unwrap();

        c.stop(0);
        c.stop(1);
        assert!(!c.is_up(0) && !c.is_up(1) && c.is_up(2));
        let since = Instant::now();
        let refused = c.put(2, b"k", b"2");
        let took = since.elapsed();
        eprintln!("write without quorum: {refused:?} after {took:?}");
        let err = refused.expect_err("a write without quorum");
        // etcd answers with an error of its own (not our timeout), in about
        // 5 s + 2 election timeouts.
        assert!(err.starts_with("HTTP/1.1 5"), "{err}");
        assert!(took < REQUEST_TIMEOUT, "{took:?}");
        assert_eq!(c.leader(), None, "one member of three cannot lead");
        // The member left keeps answering what needs no quorum: its status.
        assert_eq!(c.status(2).unwrap().leader, None);

        c.start_again(0);
        c.start_again(1);
        let leader = c.wait_leader(ELECTION);
        assert!(c.is_up(leader));
        let after = c.put(2, b"k", b"3").unwrap();
        assert!(after > before);
        for i in 0..3 {
            assert_eq!(c.get(i, b"k").unwrap(), Some(b"3".to_vec()), "member {i}");
        }
    }
}
