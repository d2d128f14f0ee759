//! Whether `kmsctl migrate` may start: only once every apiserver writes
//! under the plugins' primary key_id. A stale apiserver would write the old
//! key again behind the migration, so until then it refuses, naming each
//! node and what to do. Pure: a list of facts in, a verdict out; where the
//! facts come from (each plugin's admin socket; the central service's
//! per-node status) is the caller's.

use std::collections::BTreeMap;

/// What one node's plugin says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeFact {
    /// How to name the node to the operator (`cluster/node (socket)`).
    pub node: String,
    /// The plugin's primary key_id: what KMS Status reports.
    pub primary_key_id: String,
    /// The key_id under which this node's apiserver last asked the plugin
    /// to Encrypt; empty when unknown.
    pub writes_key_id: String,
}

/// Why the migration may not start: one line per problem, each naming the
/// node and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal(pub Vec<String>);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not migrating: an apiserver that still writes under an older key_id would write it again behind the migration"
        )?;
        for line in &self.0 {
            write!(f, "\n  - {line}")?;
        }
        Ok(())
    }
}

/// The key_id every apiserver writes under, or why not all do.
pub(crate) fn check(facts: &[NodeFact]) -> Result<String, Refusal> {
    if facts.is_empty() {
        return Err(Refusal(vec![
            "no node to check: name each plugin's admin socket with --admin-socket".into(),
        ]));
    }
    let mut problems = Vec::new();
    let mut primaries: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in facts {
        if f.primary_key_id.is_empty() {
            problems.push(format!(
                "{}: its plugin has no primary key (is it unsealed and healthy? see `kmsctl local status`)",
                f.node
            ));
            continue;
        }
        primaries
            .entry(f.primary_key_id.as_str())
            .or_default()
            .push(f.node.as_str());
        if f.writes_key_id.is_empty() {
            problems.push(format!(
                "{}: unknown which key_id its apiserver writes under (it has not asked this plugin to Encrypt since the plugin started, or the plugin is older than this kmsctl): restart that kube-apiserver, or wait up to a minute for its Status poll, and run again",
                f.node
            ));
        } else if f.writes_key_id != f.primary_key_id {
            problems.push(format!(
                "{}: its apiserver still writes under key_id {}, the plugin's primary is {}: wait up to a minute for the apiserver's Status poll, or restart that kube-apiserver, and run again",
                f.node, f.writes_key_id, f.primary_key_id
            ));
        }
    }
    if primaries.len() > 1 {
        let each: Vec<String> = primaries
            .iter()
            .map(|(key_id, nodes)| format!("{key_id} on {}", nodes.join(", ")))
            .collect();
        problems.push(format!(
            "the plugins disagree on the primary key_id ({}): a rotation is still under way; wait for it (`kmsctl rotate --wait`) and run again",
            each.join("; ")
        ));
    }
    match (problems.is_empty(), primaries.into_keys().next()) {
        (true, Some(key_id)) => Ok(key_id.to_owned()),
        _ => Err(Refusal(problems)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(node: &str, primary: &str, writes: &str) -> NodeFact {
        NodeFact {
            node: node.into(),
            primary_key_id: primary.into(),
            writes_key_id: writes.into(),
        }
    }

    #[test]
    fn every_apiserver_on_the_primary_may_start() {
        let facts = [fact("a", "k2", "k2"), fact("b", "k2", "k2")];
        assert_eq!(check(&facts), Ok("k2".into()));
    }

    #[test]
    fn a_stale_apiserver_is_named_with_the_fix() {
        let facts = [fact("a", "k2", "k2"), fact("b", "k2", "k1")];
        let r = check(&facts).unwrap_err();
        assert_eq!(r.0.len(), 1);
        assert!(r.0[0].starts_with("b: its apiserver still writes under key_id k1"));
        assert!(r.0[0].contains("restart that kube-apiserver"));
        assert!(r.to_string().contains("\n  - b: "));
    }

    #[test]
    fn unknown_is_refused() {
        let r = check(&[fact("a", "k2", "")]).unwrap_err();
        assert!(r.0[0].starts_with("a: unknown which key_id"), "{r}");
    }

    #[test]
    fn no_primary_and_no_nodes_are_refused() {
        assert!(check(&[]).is_err());
        let r = check(&[fact("a", "", "")]).unwrap_err();
        assert!(r.0[0].contains("no primary key"), "{r}");
    }

    #[test]
    fn plugins_that_disagree_are_refused_even_if_each_is_current() {
        let r = check(&[fact("a", "k2", "k2"), fact("b", "k1", "k1")]).unwrap_err();
        assert_eq!(r.0.len(), 1);
        assert!(r.0[0].contains("k1 on b; k2 on a"), "{r}");
    }

    #[test]
    fn every_problem_is_listed() {
        let r = check(&[
            fact("a", "k2", "k1"),
            fact("b", "k2", ""),
            fact("c", "k2", "k2"),
        ])
        .unwrap_err();
        assert_eq!(r.0.len(), 2, "{r}");
    }
}
