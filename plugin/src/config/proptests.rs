//! Property tests for the config file (`--config`, TOML): any text, and
//! any value for every known key, gives settings or an error, never a
//! panic; settings that parse validate to a config or to one message.

use proptest::prelude::*;

use super::*;
use crate::proptests::config;

fn key() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        "socket",
        "data_dir",
        "cluster",
        "node",
        "sealer",
        "admin_socket",
        "tpm_tcti",
        "tpm_pcrs",
        "tpm_owner_auth_file",
        "log_format",
        "metrics_addr",
        "no_metrics",
        "sync_backoff_max",
        "servers",
        "unknown",
    ])
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,20}".prop_map(|s| format!("{s:?}")),
        Just("\"soft\"".to_owned()),
        Just("\"json\"".to_owned()),
        "[0-9]{1,20}[smhd]?".prop_map(|s| format!("{s:?}")),
        "[0-9.:\\[\\]]{1,25}".prop_map(|s| format!("{s:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\\PC{0,10}",
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_config_text_never_panics(
        lines in proptest::collection::vec((key(), value()), 0..6),
        junk in "\\PC{0,40}",
    ) {
        let text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        for text in [text.as_str(), junk.as_str()] {
            if let Ok(settings) = toml::from_str::<Settings>(text) {
                let _ = settings.validate();
            }
        }
    }
}
