//! A Kubernetes client (kube) for the tests against a real kube-apiserver
//! (`edgekms_testkit::apiserver`).

use std::path::Path;

/// A client from `kubeconfig` (its current context).
pub async fn client(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}
