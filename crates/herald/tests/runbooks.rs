//! Runbooks that cannot rot: every file of `runbooks/` is parsed, and the test fails
//! when one names a metric Herald does not export (scraped from a running app after
//! some traffic), an endpoint the router does not serve, a `herald` subcommand or flag
//! that does not exist (checked against the clap definition), or a config key that is
//! not in `config/default.toml`. Each runbook must also say how to mitigate in one
//! `herald ops ...` command or one click on `/ops`.

mod common;

use clap::CommandFactory;
use common::*;
use herald_client::Method;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn runbooks() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(root().join("runbooks"))
        .expect("runbooks/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, std::fs::read_to_string(&p).expect("read runbook"))
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 12,
        "one runbook per alert and per seed incident"
    );
    out
}

/// The code of a markdown text: fenced blocks line by line, and inline code spans.
fn code(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            out.push(line.to_owned());
            continue;
        }
        let parts: Vec<&str> = line.split('`').collect();
        out.extend(parts.iter().skip(1).step_by(2).map(|s| (*s).to_owned()));
    }
    out
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `herald_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    let mut before: Option<char> = None;
    while let Some(i) = rest.find("herald_") {
        let prev = rest[..i].chars().last().or(before);
        let tail = &rest[i..];
        let len = tail.find(|c: char| !is_word(c)).unwrap_or(tail.len());
        let name = &tail[..len];
        if !prev.is_some_and(is_word) && !name.ends_with('_') {
            out.insert(name.to_owned());
        }
        before = name.chars().last();
        rest = &tail[len..];
    }
    out
}

/// Names that look like metrics but are NOTIFY channels.
fn channels() -> BTreeSet<String> {
    use herald_storage::channels as c;
    use herald_storage::notify::channels as n;
    [
        c::DISPATCH,
        c::AGENT_FREE,
        c::ASSIGNED,
        c::AGENT_GONE,
        c::OUTBOX,
        c::HEALTH,
        n::SUBSCRIPTIONS,
        n::TYPES,
        n::DUE,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Every endpoint path in `text`: `/v1/...`, `/ops`, and the health paths.
fn endpoints(text: &str) -> BTreeSet<String> {
    let path_char = |c: char| c.is_ascii_alphanumeric() || "_-{}$<>/.".contains(c);
    let mut out = BTreeSet::new();
    for start in ["/v1/", "/ops", "/metrics", "/healthz", "/readyz"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if start != "/v1/" && text[..at].ends_with("/v1") {
                continue;
            }
            let tail = &text[at..];
            let len = tail.find(|c| !path_char(c)).unwrap_or(tail.len());
            let p = tail[..len].trim_end_matches(['.', ',']);
            if start == "/v1/" || p == start {
                out.insert(p.to_owned());
            }
        }
    }
    out
}

/// A path as a request can name it: placeholders become an id.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with(['{', '$', '<']) {
                "0190f4a2-0000-7000-8000-000000000000"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Splits a command line like a shell would (quotes, no expansion), up to a comment
/// or a separator.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() || any {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, '#' | '|' | ';' | '&') if cur.is_empty() && !any => break,
            (None, c) => cur.push(c),
        }
    }
    if !cur.is_empty() || any {
        out.push(cur);
    }
    out
}

/// The `herald ...` commands of a code line.
fn herald_commands(line: &str) -> Vec<Vec<String>> {
    let w = words(line);
    let mut out = Vec::new();
    for (i, word) in w.iter().enumerate() {
        if word == "herald" && (i == 0 || ["$", "sudo", "exec"].contains(&w[i - 1].as_str())) {
            out.push(w[i + 1..].to_vec());
        }
    }
    out
}

/// Why `args` is not a command `herald` accepts, if it is not.
fn check_command(args: &[String]) -> Result<(), String> {
    let mut path: Vec<clap::Command> = vec![herald::cli::Cli::command()];
    let mut positional_seen = false;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let cmd = path.last().cloned().expect("a command");
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, _)) => (n, true),
                None => (long, false),
            };
            if name == "help" || name == "version" {
                i += 1;
                continue;
            }
            let arg = path.iter().rev().enumerate().find_map(|(depth, c)| {
                c.get_arguments()
                    .find(|x| x.get_long() == Some(name) && (depth == 0 || x.is_global_set()))
                    .cloned()
            });
            let Some(arg) = arg else {
                return Err(format!("`{}` has no flag --{name}", cmd.get_name()));
            };
            let takes_value = arg.get_num_args().is_none_or(|n| n.takes_values())
                && !matches!(
                    arg.get_action(),
                    clap::ArgAction::SetTrue | clap::ArgAction::SetFalse | clap::ArgAction::Count
                );
            i += if takes_value && !inline { 2 } else { 1 };
            continue;
        }
        if a.starts_with(['<', '$', '[', '.']) {
            // A placeholder for the operator to fill in.
            i += 1;
            positional_seen = true;
            continue;
        }
        if let Some(sub) = cmd.find_subcommand(a) {
            if positional_seen {
                return Err(format!("`{a}` after a positional argument"));
            }
            path.push(sub.clone());
        } else if cmd.has_subcommands() {
            return Err(format!("`{}` has no subcommand `{a}`", cmd.get_name()));
        } else if cmd.get_positionals().next().is_none() {
            return Err(format!("`{}` takes no argument `{a}`", cmd.get_name()));
        } else {
            positional_seen = true;
        }
        i += 1;
    }
    if path
        .last()
        .is_some_and(|c| c.is_subcommand_required_set() || c.has_subcommands())
    {
        return Err("incomplete: a subcommand is missing".into());
    }
    Ok(())
}

/// Every key of config/default.toml (`section.key`), documented unset keys
/// (`# key: ...`) included, and every section.
fn config_keys() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(root().join("config/default.toml")).expect("default.toml");
    let mut keys = BTreeSet::new();
    let mut sections = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            sections.insert(section.clone());
            continue;
        }
        let key = match line.strip_prefix('#') {
            Some(c) => c.trim().split_once(':').map(|(k, _)| k.trim()),
            None => line.split_once('=').map(|(k, _)| k.trim()),
        };
        if let Some(k) = key.filter(|k| !k.is_empty() && k.chars().all(is_word)) {
            keys.insert(format!("{section}.{k}"));
        }
    }
    (keys, sections)
}

/// Config keys named in `text`: `section.key` where `section` is one of the file's,
/// and `HERALD_SECTION__KEY` variables.
fn named_keys(text: &str, sections: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let key_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.';
    for (i, _) in text.match_indices(|c: char| c.is_ascii_lowercase()) {
        if text[..i]
            .chars()
            .last()
            .is_some_and(|c| key_char(c) || c.is_ascii_alphanumeric() || c == '/' || c == '-')
        {
            continue;
        }
        let tail = &text[i..];
        let len = tail.find(|c| !key_char(c)).unwrap_or(tail.len());
        let token = tail[..len].trim_end_matches('.');
        if let Some((first, _)) = token.split_once('.') {
            let next = tail[len..].chars().next();
            // A file name (`alerts.yml`) or a path is not a key.
            if sections.contains(first) && !matches!(next, Some('/' | '-')) {
                out.insert(token.to_owned());
            }
        }
    }
    for (i, _) in text.match_indices("HERALD_") {
        let tail = &text[i + "HERALD_".len()..];
        let len = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let var = &tail[..len];
        if var.contains("__") {
            out.insert(var.to_lowercase().replace("__", "."));
        }
    }
    out
}

fn mitigation(text: &str) -> Option<String> {
    let start = text.find("\n## Mitigate")?;
    let body = &text[start + 1..];
    let body = body[body.find('\n')?..].to_owned();
    Some(match body.find("\n## ") {
        Some(end) => body[..end].to_owned(),
        None => body,
    })
}

#[test]
fn the_checks_catch_what_they_should() {
    assert!(check_command(&words("ops notifications pause webhook --reason \"x y\"")).is_ok());
    assert!(check_command(&words("ops queues --url http://h:8080")).is_ok());
    assert!(check_command(&words("ops notifications frobnicate webhook")).is_err());
    assert!(check_command(&words("ops queues --no-such-flag")).is_err());
    assert!(check_command(&words("serve --roles api,relay")).is_ok());
    assert!(check_command(&words("ops")).is_err());
    assert_eq!(
        metric_names("`herald_a_total` and herald_b{x=\"1\"}, not my_herald_c nor herald_"),
        ["herald_a_total", "herald_b"].map(String::from).into()
    );
    assert_eq!(
        endpoints("curl \"$U/v1/webhooks/$ID/deliveries?limit=5\"; open /ops. /opsx /metrics"),
        ["/metrics", "/ops", "/v1/webhooks/$ID/deliveries"]
            .map(String::from)
            .into()
    );
    let (keys, sections) = config_keys();
    assert!(keys.contains("notify.throttle.latency_target_ms"));
    assert!(keys.contains("auth.admin_token"));
    let named = named_keys(
        "`notify.fanout_max_backlog`, HERALD_DATABASE__REPLICA_URL, see runbooks/x.md, `dispatch.nope`",
        &sections,
    );
    assert_eq!(
        named,
        [
            "database.replica_url",
            "dispatch.nope",
            "notify.fanout_max_backlog"
        ]
        .map(String::from)
        .into()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runbooks_name_only_what_exists() {
    let books = runbooks();
    let env = TestEnv::new().await;
    let mut app = env
        .start(
            "api,relay,dispatch,notify,maintenance",
            &[("HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true")],
        )
        .await;

    // Some traffic, so that the metrics of every path a runbook talks about exist.
    let (api, reg) = org(&app, "acme").await;
    let (agent, _) = agent(&app, &reg, "ci-1").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let r = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
        let _ = axum::serve(listener, r).await;
    });
    let (s, _) = call(
        &api,
        Method::POST,
        "/v1/webhooks",
        Some(json!({"url": hook, "events": ["*"]})),
    )
    .await;
    assert_eq!(s, 201);
    let b = api
        .create_build("web", &build_body(json!([{"key": "a"}])))
        .await
        .expect("build");
    let job = eventually(T, "a job", || async { agent.ping(5).await.ok().flatten() }).await;
    agent.run_job(job.id, 0, Duration::ZERO).await.expect("run");
    wait_build_state(&api, b["id"].as_str().expect("id"), "passed", T).await;
    let _ = call(&app.admin, Method::GET, "/v1/ops/overview", None).await;
    let _ = call(&app.admin, Method::GET, "/v1/nothing-here", None).await;

    let metrics_url = format!("{}/metrics", app.client.base());
    let exported: BTreeSet<String> = eventually(T, "the metrics of every role", || async {
        let text = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
        let names: BTreeSet<String> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(|n| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| n.strip_suffix(s))
                    .unwrap_or(n)
                    .to_owned()
            })
            .collect();
        [
            "herald_webhook_attempts_total",
            "herald_queue_oldest_age_seconds",
            "herald_leader",
            "herald_dispatch_latency_seconds",
            "herald_notify_throttle_factor",
        ]
        .iter()
        .all(|m| names.contains(*m))
        .then_some(names)
    })
    .await;

    let (keys, sections) = config_keys();
    let not_metrics = channels();
    let mut problems = Vec::new();
    for (name, text) in &books {
        for m in metric_names(text) {
            if !exported.contains(&m) && !not_metrics.contains(&m) {
                problems.push(format!("{name}: metric {m} is not exported"));
            }
        }
        for p in endpoints(text) {
            // No route answers TRACE: a routed path says 405, an unrouted one 404.
            let r = reqwest::Client::new()
                .request(
                    reqwest::Method::TRACE,
                    format!("{}{}", app.client.base(), concrete(&p)),
                )
                .send()
                .await
                .expect("TRACE");
            if r.status() == reqwest::StatusCode::NOT_FOUND {
                problems.push(format!("{name}: endpoint {p} is not routed"));
            }
        }
        for line in code(text) {
            for args in herald_commands(&line) {
                if let Err(e) = check_command(&args) {
                    problems.push(format!("{name}: `herald {}`: {e}", args.join(" ")));
                }
            }
        }
        for k in named_keys(text, &sections) {
            if !keys.contains(&k) && !sections.contains(&k) {
                problems.push(format!(
                    "{name}: config key {k} is not in config/default.toml"
                ));
            }
        }
        match mitigation(text) {
            None => problems.push(format!("{name}: no `## Mitigate` section")),
            Some(m) => {
                let commands: Vec<_> = code(&m).iter().flat_map(|l| herald_commands(l)).collect();
                let ops = commands
                    .iter()
                    .any(|c| c.first().is_some_and(|s| s == "ops"));
                if !ops && !m.contains("/ops") {
                    problems.push(format!(
                        "{name}: the mitigation is neither a `herald ops` command nor a click on /ops"
                    ));
                }
            }
        }
    }
    // Stop first: a failing assert with the roles still running would hang the test.
    app.stop().await;
    env.cleanup().await;
    if !problems.is_empty() {
        eprintln!("exported: {exported:?}");
    }
    assert!(
        problems.is_empty(),
        "runbooks have rotted:\n{}",
        problems.join("\n")
    );
}
