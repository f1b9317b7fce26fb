//! One config struct, loaded in layers: the embedded `config/default.toml`, then an
//! optional file, then `HERALD_*` environment variables (nesting by `__`). A bad value
//! fails start-up with a message that names its key.

use anyhow::{anyhow, bail, Context};
use herald_dispatch::{DispatchSettings, JobsSettings, MaintenanceSettings};
use herald_relay::RelaySettings;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

pub const DEFAULTS: &str = include_str!("../../../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub database: DatabaseConfig,
    pub amqp: AmqpConfig,
    pub http: HttpConfig,
    pub auth: AuthConfig,
    pub dispatch: DispatchSettings,
    pub agents: AgentsConfig,
    pub jobs: JobsSettings,
    pub relay: RelaySettings,
    pub maintenance: MaintenanceSettings,
    pub webhooks: WebhooksConfig,
    pub notify: herald_notify::NotifySettings,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseConfig {
    pub primary_url: String,
    pub replica_url: Option<String>,
    pub acquire_timeout_ms: u64,
    pub api_pool_max: u32,
    pub replica_pool_max: u32,
    pub dispatch_pool_max: u32,
    pub relay_pool_max: u32,
    pub notify_pool_max: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpConfig {
    pub url: String,
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpConfig {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthConfig {
    pub admin_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AgentsConfig {
    pub lost_after_s: f64,
    pub heartbeat_interval_s: u64,
    pub ping_wait_max_s: u64,
    pub heartbeat_flush_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WebhooksConfig {
    pub allow_private_networks: bool,
    /// An endpoint whose every attempt failed for this long ...
    pub disable_after_s: f64,
    /// ... with at least this many attempts is disabled (reason `failing`).
    pub disable_min_failures: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogConfig {
    pub filter: String,
    pub json: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP collector's base URL; empty exports no traces.
    pub otlp_endpoint: String,
    pub service_name: String,
}

impl Config {
    /// Defaults, then `file` (or `HERALD_CONFIG`), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    pub fn load_from(file: Option<&Path>, env: &HashMap<String, String>) -> anyhow::Result<Config> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        let file = file.map(|p| p.to_path_buf()).or_else(|| {
            env.get("HERALD_CONFIG")
                .filter(|s| !s.is_empty())
                .map(Into::into)
        });
        if let Some(path) = file {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            builder = builder.add_source(config::File::from(path.as_path()));
        }
        // Only HERALD_<section>__<key>; HERALD_CONFIG and unrelated HERALD_* names are not settings.
        let vars: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("HERALD_") && k.contains("__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("HERALD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars)),
        );
        let raw = builder.build().context("cannot read configuration")?;
        let cfg: Config = raw
            .try_deserialize()
            .map_err(|e| anyhow!("invalid configuration: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        for (key, url) in [
            ("database.primary_url", Some(&self.database.primary_url)),
            ("database.replica_url", self.database.replica_url.as_ref()),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    bail!("invalid configuration: {key} must be a postgres:// URL, got `{url}`");
                }
            }
        }
        if !(self.amqp.url.starts_with("amqp://") || self.amqp.url.starts_with("amqps://")) {
            bail!("invalid configuration: amqp.url must be an amqp:// URL");
        }
        let p = &self.amqp.prefix;
        if p.is_empty()
            || p.len() > 64
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "invalid configuration: amqp.prefix must be 1-64 letters, digits, `-`, `_` or `.`"
            );
        }
        if self.database.notify_pool_max >= self.database.dispatch_pool_max {
            bail!("invalid configuration: database.notify_pool_max must be below database.dispatch_pool_max");
        }
        if self.agents.ping_wait_max_s == 0 || self.agents.ping_wait_max_s > 120 {
            bail!("invalid configuration: agents.ping_wait_max_s must be 1-120");
        }
        if !(0..=19).contains(&self.notify.nice) {
            bail!("invalid configuration: notify.nice must be 0-19");
        }
        if self.notify.worker_threads > 64 {
            bail!("invalid configuration: notify.worker_threads must be 0-64");
        }
        for (key, v) in [
            ("dispatch.accept_timeout_s", self.dispatch.accept_timeout_s),
            ("agents.lost_after_s", self.agents.lost_after_s),
            ("agents.heartbeat_flush_s", self.agents.heartbeat_flush_s),
            ("maintenance.interval_s", self.maintenance.interval_s),
            ("jobs.cancel_grace_s", self.jobs.cancel_grace_s),
            ("webhooks.disable_after_s", self.webhooks.disable_after_s),
            (
                "notify.history_retention_s",
                self.notify.history_retention_s,
            ),
            (
                "notify.claim_restart_grace_s",
                self.notify.claim_restart_grace_s,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("invalid configuration: {key} must be a positive number");
            }
        }
        for (key, v) in [
            (
                "notify.throttle.min_factor",
                self.notify.throttle.min_factor,
            ),
            (
                "notify.throttle.commit_status_min_factor",
                self.notify.throttle.commit_status_min_factor,
            ),
        ] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                bail!("invalid configuration: {key} must be a number from 0 to 1");
            }
        }
        let otlp = self.telemetry.otlp_endpoint.trim();
        if !(otlp.is_empty() || otlp.starts_with("http://") || otlp.starts_with("https://")) {
            bail!("invalid configuration: telemetry.otlp_endpoint must be an http:// or https:// URL, or empty");
        }
        if !(1..=86_400).contains(&self.jobs.default_timeout_s) {
            bail!("invalid configuration: jobs.default_timeout_s must be 1-86400");
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.http.listen.parse().map_err(|_| {
            anyhow!(
                "invalid configuration: http.listen must be host:port, got `{}`",
                self.http.listen
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load() {
        let c = Config::load_from(None, &env(&[])).expect("defaults");
        assert_eq!(
            c.database.primary_url,
            "postgres://postgres@127.0.0.1:5432/herald"
        );
        assert_eq!(c.database.replica_url, None);
        assert_eq!(c.amqp.prefix, "herald");
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.auth.admin_token, None);
        assert!(!c.webhooks.allow_private_networks);
        assert_eq!(c.webhooks.disable_after_s, 432000.0);
        assert_eq!(c.webhooks.disable_min_failures, 20);
        assert_eq!(c.dispatch.accept_timeout_s, 30.0);
        assert_eq!(c.agents.lost_after_s, 90.0);
        assert_eq!(c.jobs.default_timeout_s, 3600);
        assert_eq!(c.jobs.cancel_grace_s, 60.0);
        assert_eq!(c.telemetry.otlp_endpoint, "");
        assert_eq!(c.telemetry.service_name, "herald");
    }

    #[test]
    fn environment_overrides_with_double_underscore() {
        let c = Config::load_from(
            None,
            &env(&[
                (
                    "HERALD_DATABASE__REPLICA_URL",
                    "postgres://postgres@127.0.0.1:5433/herald",
                ),
                ("HERALD_AMQP__PREFIX", "t1"),
                ("HERALD_AUTH__ADMIN_TOKEN", "12345"),
                ("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true"),
                ("HERALD_HTTP__LISTEN", "127.0.0.1:0"),
                ("HERALD_CONFIG", ""),
                ("HERALD_TEST_SOMETHING", "x"),
            ]),
        )
        .expect("env");
        assert_eq!(
            c.database.replica_url.as_deref(),
            Some("postgres://postgres@127.0.0.1:5433/herald")
        );
        assert_eq!(c.amqp.prefix, "t1");
        assert_eq!(c.auth.admin_token.as_deref(), Some("12345"));
        assert!(c.webhooks.allow_private_networks);
    }

    #[test]
    fn a_file_overrides_defaults_and_env_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("herald-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("herald.toml");
        std::fs::write(
            &path,
            "[amqp]\nprefix = \"fromfile\"\n[http]\nlisten = \"127.0.0.1:9999\"\n",
        )
        .expect("write");
        let c = Config::load_from(
            Some(&path),
            &env(&[("HERALD_HTTP__LISTEN", "127.0.0.1:7777")]),
        )
        .expect("file");
        assert_eq!(c.amqp.prefix, "fromfile");
        assert_eq!(c.http.listen, "127.0.0.1:7777");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Config::load_from(None, &env(&[("HERALD_AGENTS__LOST_AFTER_S", "soon")]))
            .expect_err("bad number");
        assert!(format!("{err:#}").contains("lost_after_s"), "{err:#}");
        let err = Config::load_from(None, &env(&[("HERALD_HTTP__LISTEN", "nowhere")]))
            .expect_err("bad addr");
        assert!(format!("{err:#}").contains("http.listen"), "{err:#}");
        let err = Config::load_from(
            None,
            &env(&[("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "maybe")]),
        )
        .expect_err("bad bool");
        assert!(
            format!("{err:#}").contains("allow_private_networks"),
            "{err:#}"
        );
        let err = Config::load_from(None, &env(&[("HERALD_NOTIFY__NICE", "25")]))
            .expect_err("nice out of range");
        assert!(format!("{err:#}").contains("notify.nice"), "{err:#}");
        let err = Config::load_from(None, &env(&[("HERALD_NOTIFY__WORKER_THREADS", "100")]))
            .expect_err("too many threads");
        assert!(
            format!("{err:#}").contains("notify.worker_threads"),
            "{err:#}"
        );
        let c = Config::load_from(None, &env(&[("HERALD_NOTIFY__WORKER_THREADS", "0")]))
            .expect("0 shares the process's runtime");
        assert_eq!(c.notify.worker_threads, 0);
        let err = Config::load_from(
            None,
            &env(&[("HERALD_TELEMETRY__OTLP_ENDPOINT", "127.0.0.1:4318")]),
        )
        .expect_err("no scheme");
        assert!(
            format!("{err:#}").contains("telemetry.otlp_endpoint"),
            "{err:#}"
        );
    }
}
