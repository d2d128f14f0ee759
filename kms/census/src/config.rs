//! kube-apiserver's EncryptionConfiguration (`--encryption-provider-config`,
//! YAML or JSON): the KMS v2 providers it names and the resources each
//! rule covers. Pure.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::CensusError;

#[derive(Deserialize)]
struct EncryptionConfiguration {
    kind: Option<String>,
    #[serde(default)]
    resources: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    providers: Vec<Provider>,
}

#[derive(Deserialize)]
struct Provider {
    kms: Option<Kms>,
}

#[derive(Deserialize)]
struct Kms {
    name: String,
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
}

/// The KMS v2 provider the census counts (`wanted`, or the only KMS v2
/// provider the configuration names) and the resources of every rule
/// that lists it: the resources that should be under it.
pub fn parse(yaml: &str, wanted: Option<&str>) -> Result<(String, BTreeSet<String>), CensusError> {
    let config: EncryptionConfiguration = serde_yaml_ng::from_str(yaml)
        .map_err(|e| CensusError::Config(format!("not an EncryptionConfiguration: {e}")))?;
    if let Some(kind) = &config.kind {
        if kind != "EncryptionConfiguration" {
            return Err(CensusError::Config(format!(
                "kind is {kind:?}, not EncryptionConfiguration"
            )));
        }
    }
    // KMS v1 providers have apiVersion v1 (the default when it is absent).
    let kms_v2 = |p: &Provider| {
        p.kms
            .as_ref()
            .filter(|k| k.api_version.as_deref() == Some("v2"))
            .map(|k| k.name.clone())
    };
    let names: BTreeSet<String> = config
        .resources
        .iter()
        .flat_map(|r| r.providers.iter().filter_map(kms_v2))
        .collect();
    let provider = match wanted {
        Some(w) if names.contains(w) => w.to_string(),
        Some(w) => {
            return Err(CensusError::Config(format!(
                "names no KMS v2 provider {w:?} (it names {})",
                list(&names)
            )))
        }
        None => match names.len() {
            1 => names.iter().next().cloned().unwrap_or_default(),
            0 => {
                return Err(CensusError::Config(
                    "names no KMS v2 provider (kms with apiVersion: v2)".into(),
                ))
            }
            _ => {
                return Err(CensusError::Config(format!(
                    "names several KMS v2 providers ({}): say which with --provider",
                    list(&names)
                )))
            }
        },
    };
    let resources = config
        .resources
        .iter()
        .filter(|r| {
            r.providers
                .iter()
                .any(|p| kms_v2(p).as_deref() == Some(&provider))
        })
        .flat_map(|r| r.resources.iter().cloned())
        .collect();
    Ok((provider, resources))
}

fn list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        return "none".into();
    }
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CONFIG: &str = r#"
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets, configmaps]
    providers:
      - kms:
          apiVersion: v2
          name: edgekms
          endpoint: unix:///var/run/edgekms/kms.sock
          timeout: 3s
      - identity: {}
  - resources: ["*.apps"]
    providers:
      - aescbc:
          keys: [{name: key1, secret: c2VjcmV0IGlzIHNlY3VyZSwgaXMgaXQ/}]
  - resources: ["widgets.example.com"]
    providers:
      - kms: {apiVersion: v2, name: edgekms, endpoint: unix:///x.sock}
      - kms: {name: legacy, endpoint: unix:///y.sock}
"#;

    #[test]
    fn the_only_kms_v2_provider_and_its_resources() {
        let (p, r) = parse(CONFIG, None).unwrap();
        assert_eq!(p, "edgekms");
        assert_eq!(
            r.into_iter().collect::<Vec<_>>(),
            ["configmaps", "secrets", "widgets.example.com"]
        );
        assert_eq!(parse(CONFIG, Some("edgekms")).unwrap().0, "edgekms");
    }

    #[test]
    fn refusals_name_what_is_there() {
        let e = parse(CONFIG, Some("legacy")).unwrap_err().to_string();
        assert!(e.contains("\"legacy\"") && e.contains("edgekms"), "{e}");
        let two = CONFIG.replace("name: edgekms, endpoint", "name: other, endpoint");
        let e = parse(&two, None).unwrap_err().to_string();
        assert!(
            e.contains("edgekms, other") && e.contains("--provider"),
            "{e}"
        );
        assert_eq!(parse(&two, Some("other")).unwrap().1.len(), 1);
        let e = parse("kind: Pod\n", None).unwrap_err().to_string();
        assert!(e.contains("Pod"), "{e}");
        assert!(parse("resources: 3", None).is_err());
        assert!(parse("kind: EncryptionConfiguration\n", None)
            .unwrap_err()
            .to_string()
            .contains("no KMS v2"));
    }

    #[test]
    fn json_too() {
        let json = r#"{"kind":"EncryptionConfiguration","apiVersion":"apiserver.config.k8s.io/v1",
            "resources":[{"resources":["secrets"],"providers":[{"kms":{"apiVersion":"v2","name":"edgekms"}},{"identity":{}}]}]}"#;
        assert_eq!(parse(json, None).unwrap().1.len(), 1);
    }
}
