//! `herald ops …`: the on-call engineer's commands. They call the same HTTP API as
//! everyone else, with the operator token.

use crate::config::Config;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use herald_client::{Client, Method};
use serde_json::{json, Value};

#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Notification kill switches and rates.
    Notifications {
        #[command(subcommand)]
        command: NotificationsCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Backlogs, in PostgreSQL and in the broker.
    Queues {
        #[command(flatten)]
        target: Target,
    },
    /// Send dead deliveries again.
    ReplayDeadLetters {
        /// webhook or github_commit_status; both without it.
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        limit: Option<i64>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Args)]
pub struct Target {
    /// Herald's base URL (default: http:// + http.listen).
    #[arg(long, global = true)]
    url: Option<String>,
    /// Operator token (default: auth.admin_token / HERALD_AUTH__ADMIN_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum NotificationsCommand {
    /// Show every type's mode, rate and burst.
    List,
    /// Deliver again (and send what a pause held).
    Enable(Change),
    /// Hold every notification of the type; nothing is lost.
    Pause(Change),
    /// Skip new notifications of the type (recorded as skipped, never sent).
    Disable(Change),
    /// Change the rate or burst, keeping the mode.
    SetRate(Change),
}

#[derive(Debug, Args)]
pub struct Change {
    /// webhook or github_commit_status
    kind: String,
    /// Why: kept in the audit trail.
    #[arg(long)]
    reason: String,
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long)]
    burst: Option<i64>,
}

fn client(cfg: &Config, t: &Target) -> anyhow::Result<Client> {
    let token = t
        .token
        .clone()
        .or_else(|| cfg.auth.admin_token.clone())
        .context("no operator token: pass --token or set HERALD_AUTH__ADMIN_TOKEN")?;
    let url = t
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.http.listen));
    Ok(Client::new(url).with_token(token))
}

async fn call(
    c: &Client,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let r = c.call(method, path, body.as_ref()).await?;
    if !r.status.is_success() {
        bail!("{} {}: {}", r.status.as_u16(), path, r.body);
    }
    Ok(r.body)
}

pub async fn run(cfg: &Config, command: OpsCommand) -> anyhow::Result<()> {
    let out = match command {
        OpsCommand::Queues { target } => {
            call(&client(cfg, &target)?, Method::GET, "/v1/ops/queues", None).await?
        }
        OpsCommand::ReplayDeadLetters {
            kind,
            limit,
            target,
        } => {
            let mut body = json!({});
            if let Some(k) = kind {
                body["type"] = json!(k);
            }
            if let Some(l) = limit {
                body["limit"] = json!(l);
            }
            call(
                &client(cfg, &target)?,
                Method::POST,
                "/v1/ops/dead-letters/replay",
                Some(body),
            )
            .await?
        }
        OpsCommand::Notifications { command, target } => {
            let c = client(cfg, &target)?;
            let (mode, change) = match command {
                NotificationsCommand::List => {
                    let v = call(&c, Method::GET, "/v1/ops/notification-types", None).await?;
                    println!(
                        "{:<22} {:<9} {:>10} {:>8}  {:<27} reason",
                        "type", "mode", "rate/s", "burst", "updated"
                    );
                    for t in v["items"].as_array().into_iter().flatten() {
                        println!(
                            "{:<22} {:<9} {:>10} {:>8}  {:<27} {}",
                            t["type"].as_str().unwrap_or(""),
                            t["mode"].as_str().unwrap_or(""),
                            t["rate_per_s"],
                            t["burst"],
                            t["updated_at"].as_str().unwrap_or(""),
                            t["reason"].as_str().unwrap_or("")
                        );
                    }
                    return Ok(());
                }
                NotificationsCommand::Enable(ch) => (Some("enabled"), ch),
                NotificationsCommand::Pause(ch) => (Some("paused"), ch),
                NotificationsCommand::Disable(ch) => (Some("disabled"), ch),
                NotificationsCommand::SetRate(ch) => (None, ch),
            };
            let mode = match mode {
                Some(m) => m.to_owned(),
                None => {
                    let v = call(&c, Method::GET, "/v1/ops/notification-types", None).await?;
                    v["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|t| t["type"] == change.kind.as_str())
                        .and_then(|t| t["mode"].as_str().map(str::to_owned))
                        .with_context(|| format!("unknown notification type `{}`", change.kind))?
                }
            };
            let mut body = json!({"mode": mode, "reason": change.reason});
            if let Some(r) = change.rate {
                body["rate_per_s"] = json!(r);
            }
            if let Some(b) = change.burst {
                body["burst"] = json!(b);
            }
            call(
                &c,
                Method::PUT,
                &format!("/v1/ops/notification-types/{}", change.kind),
                Some(body),
            )
            .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
