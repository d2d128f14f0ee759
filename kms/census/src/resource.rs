//! Which resource a storage key holds, and whether an EncryptionConfiguration
//! resource name (`secrets`, `deployments.apps`, `*.apps`, `*.`, `*.*`)
//! covers it. Pure.
//!
//! kube-apiserver's keys are `PREFIX` + the resource's storage path + the
//! object (`NS/NAME` or `NAME`). The storage path is:
//!
//! - for the core group and the built-in groups, the resource alone
//!   (`/registry/secrets/NS/NAME`, `/registry/deployments/NS/NAME`: no
//!   group), with a few historical names (`minions` for nodes, `controllers`
//!   for replicationcontrollers, `services/specs` and `services/endpoints`,
//!   `ingress` for ingresses);
//! - for custom resources and aggregated built-ins (`apiextensions.k8s.io`,
//!   `apiregistration.k8s.io`), `GROUP/RESOURCE`: the first segment has a
//!   dot (`/registry/example.com/widgets/NS/NAME`).
//!
//! So the census names a resource `RESOURCE` for the first kind (the
//! group, when it is a built-in one we know, serves only to match
//! `deployments.apps` or `*.apps`) and `RESOURCE.GROUP` for the second.

/// The resource a key holds, named as the census reports it; `None` when
/// the key is not under `prefix`.
pub fn of_key(key: &[u8], prefix: &str) -> Option<String> {
    let rest = key.strip_prefix(prefix.as_bytes())?;
    let rest = String::from_utf8_lossy(rest);
    let mut parts = rest.split('/');
    let first = parts.next().filter(|s| !s.is_empty())?;
    if first.contains('.') {
        return Some(match parts.next().filter(|s| !s.is_empty()) {
            Some(resource) => format!("{resource}.{first}"),
            None => first.to_string(),
        });
    }
    let second = parts.next();
    let name = match (first, second) {
        ("minions", _) => "nodes",
        ("controllers", _) => "replicationcontrollers",
        ("ingress", _) => "ingresses",
        ("services", Some("endpoints")) => "endpoints",
        ("services", _) => "services",
        (other, _) => other,
    };
    Some(name.to_string())
}

/// The API group of a resource as [`of_key`] names it: the part after the
/// first dot, or the built-in group it belongs to ("" for the core group).
pub fn group_of(resource: &str) -> (&str, &str) {
    if let Some((plural, group)) = resource.split_once('.') {
        return (plural, group);
    }
    let group = match resource {
        "deployments" | "replicasets" | "statefulsets" | "daemonsets" | "controllerrevisions" => {
            "apps"
        }
        "jobs" | "cronjobs" => "batch",
        "horizontalpodautoscalers" => "autoscaling",
        "poddisruptionbudgets" => "policy",
        "roles" | "rolebindings" | "clusterroles" | "clusterrolebindings" => {
            "rbac.authorization.k8s.io"
        }
        "ingresses" | "ingressclasses" | "networkpolicies" | "ipaddresses" | "servicecidrs" => {
            "networking.k8s.io"
        }
        "storageclasses"
        | "volumeattachments"
        | "csidrivers"
        | "csinodes"
        | "csistoragecapacities"
        | "volumeattributesclasses" => "storage.k8s.io",
        "priorityclasses" => "scheduling.k8s.io",
        "leases" => "coordination.k8s.io",
        "endpointslices" => "discovery.k8s.io",
        "certificatesigningrequests" => "certificates.k8s.io",
        "validatingwebhookconfigurations"
        | "mutatingwebhookconfigurations"
        | "validatingadmissionpolicies"
        | "validatingadmissionpolicybindings" => "admissionregistration.k8s.io",
        "runtimeclasses" => "node.k8s.io",
        "flowschemas" | "prioritylevelconfigurations" => "flowcontrol.apiserver.k8s.io",
        _ => "",
    };
    (resource, group)
}

/// Whether the EncryptionConfiguration resource name `pattern` covers
/// `resource` (as [`of_key`] names it): `*.*` all; `*.` the core group;
/// `*.GROUP` a group; `PLURAL.GROUP` or `PLURAL` one resource (a bare
/// plural matches the name the census reports, so `deployments` matches
/// as well as `deployments.apps`).
pub fn covered(pattern: &str, resource: &str) -> bool {
    let (plural, group) = group_of(resource);
    match pattern.split_once('.') {
        Some(("*", "*")) => true,
        Some(("*", g)) => g == group,
        Some((p, g)) => p == plural && g == group,
        None => pattern == resource || (pattern == plural && group.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_from_keys() {
        for (key, want) in [
            ("/registry/secrets/default/s1", Some("secrets")),
            ("/registry/configmaps/kube-system/c", Some("configmaps")),
            ("/registry/deployments/default/d", Some("deployments")),
            ("/registry/namespaces/default", Some("namespaces")),
            ("/registry/minions/node-1", Some("nodes")),
            (
                "/registry/controllers/default/rc",
                Some("replicationcontrollers"),
            ),
            (
                "/registry/services/specs/default/kubernetes",
                Some("services"),
            ),
            (
                "/registry/services/endpoints/default/kubernetes",
                Some("endpoints"),
            ),
            ("/registry/ingress/default/i", Some("ingresses")),
            (
                "/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.example.com",
                Some("customresourcedefinitions.apiextensions.k8s.io"),
            ),
            (
                "/registry/example.com/widgets/ns/w1",
                Some("widgets.example.com"),
            ),
            ("/registry/example.com", Some("example.com")),
            ("/registry/", None),
            ("/other/secrets/x", None),
            ("/registry//x", None),
        ] {
            assert_eq!(
                of_key(key.as_bytes(), "/registry/").as_deref(),
                want,
                "{key}"
            );
        }
        // Not UTF-8: named lossily, never refused.
        assert_eq!(
            of_key(b"/registry/sec\xffrets/a", "/registry/").as_deref(),
            Some("sec\u{fffd}rets")
        );
    }

    #[test]
    fn encryption_config_names() {
        assert!(covered("secrets", "secrets"));
        assert!(!covered("secrets", "configmaps"));
        assert!(covered("*.*", "widgets.example.com"));
        assert!(covered("*.", "secrets"));
        assert!(!covered("*.", "deployments"));
        assert!(covered("*.apps", "deployments"));
        assert!(covered("deployments.apps", "deployments"));
        assert!(covered("deployments", "deployments"));
        assert!(covered("widgets.example.com", "widgets.example.com"));
        assert!(covered("*.example.com", "widgets.example.com"));
        assert!(!covered("*.example.com", "widgets.example.org"));
        assert!(covered(
            "customresourcedefinitions.apiextensions.k8s.io",
            "customresourcedefinitions.apiextensions.k8s.io"
        ));
    }
}
