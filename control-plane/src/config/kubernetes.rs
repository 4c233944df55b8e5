//! Flags of what the control plane does in the cluster: the injection
//! webhook, and publishing the trust bundle.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use serde::Serialize;

use super::{ConfigError, text};
use crate::{inject::config::is_dns_label, publish::PublishConfig};

/// Flags of `serve` for the injection webhook.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// Injection configuration (YAML); when set, the sidecar-injection webhook is served on --webhook-addr. Watched for changes.
    #[arg(long, env = "PALISADE_INJECTION_CONFIG", value_name = "FILE")]
    pub injection_config: Option<PathBuf>,
    /// Address of the injection webhook (HTTPS, path /inject).
    #[arg(long, env = "PALISADE_WEBHOOK_ADDR", default_value = "0.0.0.0:15017")]
    pub webhook_addr: SocketAddr,
}

/// Flags of `serve` for publishing the trust bundle into the cluster.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// MutatingWebhookConfiguration whose webhooks' caBundle is kept equal to the trust bundle.
    #[arg(long, env = "PALISADE_WEBHOOK_CONFIGURATION", value_name = "NAME")]
    pub webhook_configuration: Option<String>,
    /// ConfigMap (key ca.crt) written into every namespace labelled palisade.io/inject=enabled.
    #[arg(long, env = "PALISADE_BUNDLE_CONFIGMAP", value_name = "NAME")]
    pub bundle_configmap: Option<String>,
    /// How often the webhook caBundle and the bundle ConfigMaps are re-checked without a change.
    #[arg(long, env = "PALISADE_PUBLISH_RESYNC", default_value = "5m", value_parser = humantime::parse_duration)]
    pub publish_resync: Duration,
}

/// The injection webhook's listener and configuration file.
#[derive(Clone, Debug, Serialize)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    pub injection_config: PathBuf,
}

// === impl WebhookArgs ===

impl WebhookArgs {
    /// The webhook, when an injection configuration is given.
    pub fn webhook(self) -> Option<WebhookConfig> {
        self.injection_config.map(|injection_config| WebhookConfig {
            addr: self.webhook_addr,
            injection_config,
        })
    }
}

// === impl PublishArgs ===

impl PublishArgs {
    /// What to publish where; names must be Kubernetes object names.
    pub fn into_config(self, request_timeout: Duration) -> Result<PublishConfig, ConfigError> {
        for (flag, name) in [
            ("--webhook-configuration", &self.webhook_configuration),
            ("--bundle-configmap", &self.bundle_configmap),
        ] {
            if let Some(name) = name
                && !is_dns_label(name)
                && !name.split('.').all(is_dns_label)
            {
                return Err(ConfigError::new(
                    flag,
                    name.clone(),
                    "is not a Kubernetes object name (lowercase letters, digits, '-', '.')",
                ));
            }
        }
        if self.publish_resync < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "--publish-resync",
                text(self.publish_resync),
                "must be at least 1s",
            ));
        }
        Ok(PublishConfig {
            webhook_configuration: self.webhook_configuration,
            bundle_configmap: self.bundle_configmap,
            resync: self.publish_resync,
            request_timeout,
        })
    }
}
