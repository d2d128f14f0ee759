//! `census_every`: the plugin counts what the cluster's storage holds per
//! key_id on a schedule (edgekms-census, through the etcd v3 API), keeps
//! the newest census for the retire rule and, joined, reports it to the
//! central service. A census that fails is logged and tried again at the
//! next tick; it never touches serving.

use std::sync::Arc;

use edgekms_census::Spec;

use crate::config::CensusSchedule;
use crate::node::Node;

/// The census's spec: from the EncryptionConfiguration when one is named.
fn spec(schedule: &CensusSchedule) -> Result<Spec, String> {
    match &schedule.encryption_config {
        None => Ok(Spec::default()),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Spec::from_encryption_config(&text, None)
                .map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

/// Takes a census every `schedule.every`, the first one at once.
pub async fn run(node: Arc<Node>, schedule: CensusSchedule) {
    let mut tick = tokio::time::interval(schedule.every);
    loop {
        tick.tick().await;
        // Read again each time: the file may change with the apiserver's.
        let spec = match spec(&schedule) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(error = %e, "no census: the EncryptionConfiguration is unusable");
                continue;
            }
        };
        let census = match edgekms_census::take(&schedule.target, &spec).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "the scheduled census failed; trying again at the next one");
                continue;
            }
        };
        let wire = census.to_wire();
        let n = node.clone();
        match tokio::task::spawn_blocking(move || n.record_census(wire)).await {
            Ok(Ok(())) => tracing::info!(
                scanned = census.scanned,
                revision = census.revision,
                "census taken"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "the census was not kept"),
            Err(e) => tracing::warn!(error = %e, "the census task failed"),
        }
    }
}
