//! GitHub commit statuses: this module owns the GitHub wire format (`POST
//! {api_url}/repos/{owner}/{repo}/statuses/{sha}` and its headers and body), the mapping
//! of Herald build/job states to GitHub states, the per-token budgets (a keyed governor
//! limiter) and the back-off GitHub asks for with 403/429 (`Retry-After`,
//! `x-ratelimit-reset`). It touches no database and no broker: callers decide what to
//! send and what to do with a [`GithubOutcome`].
//!
//! Tokens are never used as map keys, logged or printed: every per-token structure is
//! keyed by the SHA-256 hex of the token, and [`StatusRequest`]'s `Debug` redacts it.
//!
//! Metrics: `herald_github_requests_total{outcome}` (`success`, `rate_limited`, `retry`,
//! `fatal`) and the gauge `herald_github_blocked_tokens` (tokens under a 403/429 block).

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use reqwest::header::{HeaderMap, ACCEPT, DATE, RETRY_AFTER};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// GitHub rejects longer descriptions.
pub const MAX_DESCRIPTION_CHARS: usize = 140;
/// The REST API version this module speaks.
pub const API_VERSION: &str = "2022-11-28";
/// How long a token rests after a 403/429 that names no time ("wait at least a minute").
pub const FALLBACK_BLOCK: Duration = Duration::from_secs(60);
/// A 403/429 never lets the token be used again sooner than this.
const MIN_BLOCK: Duration = Duration::from_secs(1);
/// Nor blocks it longer than this (GitHub's longest window is an hour); guards against
/// nonsense headers.
const MAX_BLOCK: Duration = Duration::from_secs(3600);
/// At most this much of a response body is read (to tell rate limits from permission
/// errors, to quote GitHub's message, and to keep the connection reusable).
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct GithubSettings {
    /// Content-creating requests per token per minute (GitHub's secondary limit is 80).
    pub per_token_per_minute: u32,
    /// How many requests an idle token may make at once; `None` = `per_token_per_minute`
    /// (see [`GithubClient::new`]). Clamped to `1..=per_token_per_minute`.
    pub burst: Option<u32>,
    /// The whole request, body included.
    pub timeout: Duration,
    pub user_agent: String,
}

impl Default for GithubSettings {
    fn default() -> Self {
        GithubSettings {
            per_token_per_minute: 80,
            burst: None,
            timeout: Duration::from_secs(15),
            user_agent: "herald".to_owned(),
        }
    }
}

/// Herald build/job state → GitHub state: waiting, scheduled, assigned, accepted,
/// running, canceling → `pending`; passed → `success`; failed → `failure`; canceled,
/// skipped → `error`. Unknown → `None`.
pub fn github_state(state: &str) -> Option<&'static str> {
    Some(match state {
        "waiting" | "scheduled" | "assigned" | "accepted" | "running" | "canceling" => "pending",
        "passed" => "success",
        "failed" => "failure",
        "canceled" | "skipped" => "error",
        _ => return None,
    })
}

/// Ordering used for "a status never goes back": `pending` = 0, `success`, `failure`,
/// `error` = 1. Anything else is treated as pending (0), so it never overrides a final
/// state.
pub fn rank(github_state: &str) -> u8 {
    match github_state {
        "success" | "failure" | "error" => 1,
        _ => 0,
    }
}

/// `herald/{pipeline}` for a build, `herald/{pipeline}/{job_key}` for a job.
pub fn context(pipeline: &str, job_key: Option<&str>) -> String {
    match job_key {
        Some(k) => format!("herald/{pipeline}/{k}"),
        None => format!("herald/{pipeline}"),
    }
}

/// A human description such as `Build #12: passed` or `Job test of build #12: running`,
/// at most [`MAX_DESCRIPTION_CHARS`] characters.
pub fn describe(subject: &str, state: &str) -> String {
    truncate_description(&format!("{subject}: {state}"))
}

/// At most 140 characters (chars, not bytes), cut on a character boundary and ending
/// with `…` when cut.
pub fn truncate_description(s: &str) -> String {
    if s.chars().count() <= MAX_DESCRIPTION_CHARS {
        return s.to_owned();
    }
    let kept: String = s.chars().take(MAX_DESCRIPTION_CHARS - 1).collect();
    let mut out = kept.trim_end().to_owned();
    out.push('…');
    out
}

#[derive(Clone)]
pub struct StatusRequest {
    /// `https://api.github.com`, or a GitHub Enterprise base such as
    /// `https://ghe.example/api/v3`.
    pub api_url: String,
    pub token: String,
    /// `owner/repo`.
    pub repository: String,
    pub sha: String,
    /// A GitHub state: `pending`, `success`, `failure` or `error`.
    pub state: String,
    pub target_url: String,
    /// Cut to 140 characters when sent.
    pub description: String,
    pub context: String,
}

impl fmt::Debug for StatusRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusRequest")
            .field("api_url", &self.api_url)
            .field("token", &"<redacted>")
            .field("repository", &self.repository)
            .field("sha", &self.sha)
            .field("state", &self.state)
            .field("target_url", &self.target_url)
            .field("description", &self.description)
            .field("context", &self.context)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum GithubOutcome {
    /// 2xx.
    Success,
    /// 429, or a 403 that is a rate limit; the token is blocked until `retry_at`.
    RateLimited { retry_at: Instant },
    /// 5xx, 408, timeouts, connection errors: worth another try later.
    Retry(String),
    /// Other 4xx (401, 404, 422, a 403 that is a permission error), 3xx (redirects are
    /// not followed) and requests that cannot be built: retrying won't help.
    Fatal(String),
}

impl GithubOutcome {
    fn label(&self) -> &'static str {
        match self {
            GithubOutcome::Success => "success",
            GithubOutcome::RateLimited { .. } => "rate_limited",
            GithubOutcome::Retry(_) => "retry",
            GithubOutcome::Fatal(_) => "fatal",
        }
    }
}

type TokenLimiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// Sends commit statuses and keeps each token within its budget. `Send + Sync`; share it
/// behind an `Arc`.
pub struct GithubClient {
    timeout: Duration,
    http: reqwest::Client,
    budgets: TokenLimiter,
    /// Token key → the instant GitHub told us to wait for.
    blocked: Mutex<HashMap<String, Instant>>,
}

/// The only form of a token this module keeps: SHA-256, hex.
fn token_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl GithubClient {
    /// One reqwest client (the whole-request `timeout`, no redirects, the user agent)
    /// and a keyed governor limiter per token (keyed by the SHA-256 hex of the token).
    ///
    /// Budget: the bucket refills at `per_token_per_minute` (one request every
    /// `60 s / per_token_per_minute`) and holds `burst`, by default the whole minute's
    /// budget. A token with a backlog therefore runs at exactly the configured rate, and
    /// one that sat idle for a minute may spend its minute at once — so a sliding
    /// 60-second window can see up to `burst + per_token_per_minute` requests right after
    /// an idle minute. If GitHub objects, its 403/429 blocks the token (see
    /// [`Self::post_status`]). Set `burst` lower (e.g. a quarter) to smooth that out;
    /// strictly never exceeding N in any 60 s takes `per_token_per_minute = N - burst`.
    ///
    /// Errors on a zero budget, a zero timeout, an empty user agent, or if the HTTP
    /// client cannot be built.
    pub fn new(settings: GithubSettings) -> Result<Self, String> {
        let per_minute = NonZeroU32::new(settings.per_token_per_minute)
            .ok_or("github per_token_per_minute must be at least 1")?;
        let burst = match settings.burst {
            None => per_minute,
            Some(b) => NonZeroU32::new(b.min(per_minute.get()))
                .ok_or("github per-token burst must be at least 1")?,
        };
        if settings.timeout.is_zero() {
            return Err("github timeout must be positive".into());
        }
        if settings.user_agent.trim().is_empty() {
            return Err(
                "github user agent must not be empty (GitHub rejects such requests)".into(),
            );
        }
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(settings.user_agent)
            .build()
            .map_err(|e| format!("cannot build the GitHub HTTP client: {e}"))?;
        Ok(GithubClient {
            timeout: settings.timeout,
            http,
            budgets: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            blocked: Mutex::new(HashMap::new()),
        })
    }

    /// The whole-request timeout: no send outlives it.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn blocks(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        // The map is consistent after every statement; a panic elsewhere can't tear it.
        self.blocked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn blocked_until_key(&self, key: &str) -> Option<Instant> {
        let until = self.blocks().get(key).copied()?;
        (until > Instant::now()).then_some(until)
    }

    /// Whether the token is blocked by an earlier 403/429 right now, and until when.
    pub fn blocked_until(&self, token: &str) -> Option<Instant> {
        self.blocked_until_key(&token_key(token))
    }

    /// Keeps the later of an existing and a new block; drops expired blocks.
    fn block(&self, key: &str, until: Instant) {
        let now = Instant::now();
        let mut map = self.blocks();
        map.retain(|_, at| *at > now);
        let at = map.entry(key.to_owned()).or_insert(until);
        *at = (*at).max(until);
        metrics::gauge!("herald_github_blocked_tokens").set(map.len() as f64);
    }

    /// Waits until this token may be used: first any block from a previous 403/429
    /// (until its `retry_at`), then one unit of the token's budget, which it takes.
    ///
    /// Cancel-safe: the budget is taken synchronously, right before returning, so
    /// dropping the future at any await point consumes nothing. A block that arrives
    /// while waiting for the budget is honoured before the budget is taken.
    pub async fn wait_for_budget(&self, token: &str) {
        let key = token_key(token);
        loop {
            if let Some(until) = self.blocked_until_key(&key) {
                tokio::time::sleep_until(until.into()).await;
                continue;
            }
            match self.budgets.check_key(&key) {
                Ok(()) => return,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.budgets.clock().now());
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                }
            }
        }
    }

    /// Takes one unit of the token's budget if the token is not blocked and the budget
    /// has one now; never waits.
    pub fn try_acquire(&self, token: &str) -> bool {
        let key = token_key(token);
        self.blocked_until_key(&key).is_none() && self.budgets.check_key(&key).is_ok()
    }

    /// `POST {api_url}/repos/{repository}/statuses/{sha}` with `Authorization: Bearer`,
    /// `Accept: application/vnd.github+json`, `X-GitHub-Api-Version: 2022-11-28`, the
    /// user agent and the JSON body `{state, target_url, description, context}` (the
    /// description cut to 140 characters).
    ///
    /// - 2xx → `Success`.
    /// - 429, or a 403 that is a rate limit (it has `Retry-After`, or
    ///   `x-ratelimit-remaining: 0`, or its message says "rate limit") → `RateLimited`,
    ///   `retry_at` from `Retry-After` (seconds or an HTTP date), else from
    ///   `x-ratelimit-reset` (epoch seconds, measured against the response's `Date` so
    ///   clock skew doesn't matter, else against our clock), else 60 s; clamped to
    ///   1 s..1 h. The token is blocked until then, which [`Self::wait_for_budget`]
    ///   honours.
    /// - Any other 403 (no rate-limit marker: "Resource not accessible by integration")
    ///   → `Fatal`, and the token is not blocked: it still works for other repositories.
    /// - 5xx, 408, timeouts, connection errors → `Retry`.
    /// - Other 4xx, 3xx, an invalid repository/sha/URL/token → `Fatal`.
    ///
    /// Does not wait for the budget itself.
    pub async fn post_status(&self, req: &StatusRequest) -> GithubOutcome {
        let outcome = self.send(req).await;
        metrics::counter!("herald_github_requests_total", "outcome" => outcome.label())
            .increment(1);
        outcome
    }

    async fn send(&self, req: &StatusRequest) -> GithubOutcome {
        if let Err(e) = validate(req) {
            return GithubOutcome::Fatal(e);
        }
        let url = format!(
            "{}/repos/{}/statuses/{}",
            req.api_url.trim_end_matches('/'),
            req.repository,
            req.sha
        );
        let body = json!({
            "state": req.state,
            "target_url": req.target_url,
            "description": truncate_description(&req.description),
            "context": req.context,
        });
        let sent = self
            .http
            .post(&url)
            .bearer_auth(&req.token)
            .header(ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", API_VERSION)
            .json(&body)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) if e.is_builder() => {
                return GithubOutcome::Fatal(format!("invalid request: {}", error_text(e)))
            }
            Err(e) => return GithubOutcome::Retry(error_text(e)),
        };
        let received = Instant::now();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        // A body that fails half-way changes nothing: the status line already decided.
        let mut body = Vec::new();
        while body.len() < MAX_BODY_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        match classify(status, &headers, &body, SystemTime::now()) {
            Classified::Outcome(o) => {
                if let GithubOutcome::Fatal(e) = &o {
                    tracing::debug!(repository = %req.repository, error = %e, "GitHub refused a commit status");
                }
                o
            }
            Classified::RateLimited(wait) => {
                let retry_at = received + wait;
                let key = token_key(&req.token);
                self.block(&key, retry_at);
                tracing::warn!(
                    token = &key[..12],
                    status,
                    wait_s = wait.as_secs_f64(),
                    "GitHub rate-limited a token; holding it back"
                );
                GithubOutcome::RateLimited { retry_at }
            }
        }
    }

    /// Drops limiter state of tokens idle long enough to be indistinguishable from new
    /// ones (governor's `retain_recent`, then `shrink_to_fit`) and expired blocks. Call
    /// periodically (e.g. once a minute); budgets of active tokens are kept.
    pub fn retain_recent(&self) {
        self.budgets.retain_recent();
        self.budgets.shrink_to_fit();
        let now = Instant::now();
        let mut map = self.blocks();
        map.retain(|_, at| *at > now);
        map.shrink_to_fit();
        metrics::gauge!("herald_github_blocked_tokens").set(map.len() as f64);
    }

    /// How many tokens the budget limiter holds state for.
    pub fn tracked_tokens(&self) -> usize {
        self.budgets.len()
    }
}

/// GitHub's owner and repository names: letters, digits, `-`, `_`, `.`, never `.`/`..`
/// (which would walk out of `/repos/`).
fn valid_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn validate(req: &StatusRequest) -> Result<(), String> {
    let repo_ok = matches!(
        req.repository.split('/').collect::<Vec<_>>().as_slice(),
        [owner, name] if valid_name_part(owner) && valid_name_part(name)
    );
    if !repo_ok {
        return Err(format!(
            "invalid repository {:?}: must be owner/name",
            req.repository
        ));
    }
    if !matches!(req.sha.len(), 40 | 64) || !req.sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "invalid sha {:?}: must be 40 or 64 hex digits",
            req.sha
        ));
    }
    if !(req.api_url.starts_with("https://") || req.api_url.starts_with("http://")) {
        return Err("invalid api_url: must be an http(s) URL".into());
    }
    Ok(())
}

/// A transport error's text without the URL, with its causes (e.g. "connection
/// refused"), which reqwest's own `Display` leaves out.
fn error_text(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[derive(Debug, PartialEq)]
enum Classified {
    Outcome(GithubOutcome),
    /// Block the token this long from when the response arrived.
    RateLimited(Duration),
}

/// What a response means; `now` is our wall clock, used only when the response has no
/// `Date` to measure `x-ratelimit-reset` against.
fn classify(status: u16, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Classified {
    let message = || github_message(body);
    let with_message = |prefix: String| match message() {
        Some(m) => format!("{prefix}: {m}"),
        None => prefix,
    };
    let rate_limited = match status {
        429 => true,
        403 => {
            headers.contains_key(RETRY_AFTER)
                || header_str(headers, "x-ratelimit-remaining") == Some("0")
                || String::from_utf8_lossy(body)
                    .to_ascii_lowercase()
                    .contains("rate limit")
        }
        _ => false,
    };
    if rate_limited {
        let wait = rate_limit_wait(headers, now).unwrap_or(FALLBACK_BLOCK);
        return Classified::RateLimited(wait.clamp(MIN_BLOCK, MAX_BLOCK));
    }
    Classified::Outcome(match status {
        200..=299 => GithubOutcome::Success,
        408 | 500..=599 => GithubOutcome::Retry(with_message(format!("HTTP {status}"))),
        300..=399 => GithubOutcome::Fatal(format!("HTTP {status}: redirects are not followed")),
        _ => GithubOutcome::Fatal(with_message(format!("HTTP {status}"))),
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn http_date(s: &str) -> Option<SystemTime> {
    let t = chrono::DateTime::parse_from_rfc2822(s).ok()?;
    let secs = u64::try_from(t.timestamp()).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// How long GitHub asked us to wait, if it said.
fn rate_limit_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    // The server's "now": its Date header (second resolution, so at most a second
    // early: the wait errs long), else ours.
    let server_now = header_str(headers, DATE.as_str())
        .and_then(http_date)
        .unwrap_or(now);
    let until = |t: SystemTime| t.duration_since(server_now).unwrap_or(Duration::ZERO);
    if let Some(v) = header_str(headers, RETRY_AFTER.as_str()) {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Some(at) = http_date(v) {
            return Some(until(at));
        }
    }
    let reset = header_str(headers, "x-ratelimit-reset")?
        .parse::<u64>()
        .ok()?;
    Some(until(UNIX_EPOCH.checked_add(Duration::from_secs(reset))?))
}

/// GitHub's `{"message": …}`, shortened, for error texts.
fn github_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let m = v.get("message")?.as_str()?;
    Some(m.chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{Method, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    use axum::Router;
    use reqwest::header::HeaderValue;
    use std::sync::Arc;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
    const TOKEN: &str = "ghp_test_token";

    /// What the fake GitHub does with every request.
    #[derive(Clone, Copy, Debug)]
    enum Behaviour {
        Created,
        /// `per_window` requests, then 403 with `Retry-After: 1` until that second is up.
        Limit403 {
            per_window: u32,
        },
        /// `per_window` requests, then 429 with `x-ratelimit-reset` = now + 1 (and a
        /// matching `Date`) until that reset.
        Limit429 {
            per_window: u32,
        },
        /// This status, with GitHub's JSON `message`.
        Status(u16, &'static str),
        /// Answers after this long.
        Slow(Duration),
    }

    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        headers: axum::http::HeaderMap,
        body: Bytes,
    }

    struct Fake {
        behaviour: Behaviour,
        seen: Mutex<Vec<Seen>>,
        /// (accepted in this window, rejecting until).
        window: Mutex<(u32, Option<Instant>)>,
        /// Requests that came while the fake had told the client to wait.
        early: Mutex<u32>,
        /// The last `x-ratelimit-reset` it sent.
        last_reset: Mutex<Option<u64>>,
    }

    impl Fake {
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("lock").clone()
        }

        fn early(&self) -> u32 {
            *self.early.lock().expect("lock")
        }

        fn last_reset(&self) -> Option<u64> {
            *self.last_reset.lock().expect("lock")
        }

        /// Applies a per-window limit; `Some(response)` rejects.
        fn limit(
            &self,
            per_window: u32,
            reject: impl Fn() -> (Response, Instant),
        ) -> Option<Response> {
            let mut w = self.window.lock().expect("lock");
            let now = Instant::now();
            if let Some(until) = w.1 {
                if now < until {
                    *self.early.lock().expect("lock") += 1;
                    return Some(reject().0);
                }
                *w = (0, None);
            }
            if w.0 >= per_window {
                let (response, until) = reject();
                w.1 = Some(until);
                return Some(response);
            }
            w.0 += 1;
            None
        }
    }

    fn http_date_of(secs: u64) -> String {
        chrono::DateTime::from_timestamp(i64::try_from(secs).expect("secs"), 0)
            .expect("timestamp")
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string()
    }

    fn reject_403() -> (Response, Instant) {
        let r = (
            StatusCode::FORBIDDEN,
            [("retry-after", "1"), ("content-type", "application/json")],
            r#"{"message":"You have exceeded a secondary rate limit."}"#,
        )
            .into_response();
        (r, Instant::now() + Duration::from_secs(1))
    }

    fn reject_429() -> (Response, Instant) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let reset_at = UNIX_EPOCH + Duration::from_secs(secs + 1);
        let until = Instant::now() + reset_at.duration_since(now).unwrap_or(Duration::ZERO);
        let r = (
            StatusCode::TOO_MANY_REQUESTS,
            [
                ("x-ratelimit-reset", (secs + 1).to_string()),
                ("x-ratelimit-remaining", "0".to_owned()),
                ("date", http_date_of(secs)),
            ],
            r#"{"message":"API rate limit exceeded."}"#,
        )
            .into_response();
        (r, until)
    }

    async fn fake_github(
        State(f): State<Arc<Fake>>,
        method: Method,
        uri: Uri,
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> Response {
        let limited = match f.behaviour {
            Behaviour::Limit403 { per_window } => f.limit(per_window, reject_403),
            Behaviour::Limit429 { per_window } => f.limit(per_window, reject_429),
            _ => None,
        };
        f.seen.lock().expect("lock").push(Seen {
            method,
            path: uri.path().to_owned(),
            headers,
            body,
        });
        if let Some(r) = limited {
            if let Some(reset) = r
                .headers()
                .get("x-ratelimit-reset")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                *f.last_reset.lock().expect("lock") = Some(reset);
            }
            return r;
        }
        match f.behaviour {
            Behaviour::Status(code, message) => (
                StatusCode::from_u16(code).expect("status"),
                [("content-type", "application/json")],
                json!({ "message": message }).to_string(),
            )
                .into_response(),
            Behaviour::Slow(d) => {
                tokio::time::sleep(d).await;
                StatusCode::CREATED.into_response()
            }
            _ => (StatusCode::CREATED, r#"{"id":1,"state":"success"}"#).into_response(),
        }
    }

    /// A real HTTP server on 127.0.0.1 that answers every method and path.
    async fn spawn_fake(behaviour: Behaviour) -> (String, Arc<Fake>) {
        let fake = Arc::new(Fake {
            behaviour,
            seen: Mutex::default(),
            window: Mutex::default(),
            early: Mutex::default(),
            last_reset: Mutex::default(),
        });
        let app = Router::new().fallback(fake_github).with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}"), fake)
    }

    fn client(per_token_per_minute: u32) -> GithubClient {
        GithubClient::new(GithubSettings {
            per_token_per_minute,
            ..Default::default()
        })
        .expect("client")
    }

    fn request(api_url: &str, repository: &str, description: &str) -> StatusRequest {
        StatusRequest {
            api_url: api_url.to_owned(),
            token: TOKEN.to_owned(),
            repository: repository.to_owned(),
            sha: SHA.to_owned(),
            state: "success".to_owned(),
            target_url: "https://herald.example/builds/12".to_owned(),
            description: description.to_owned(),
            context: context("web", None),
        }
    }

    fn header<'a>(h: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn state_mapping_table() {
        let table = [
            ("waiting", "pending"),
            ("scheduled", "pending"),
            ("assigned", "pending"),
            ("accepted", "pending"),
            ("running", "pending"),
            ("canceling", "pending"),
            ("passed", "success"),
            ("failed", "failure"),
            ("canceled", "error"),
            ("skipped", "error"),
        ];
        for (herald, github) in table {
            assert_eq!(github_state(herald), Some(github), "{herald}");
        }
        for unknown in ["", "bogus", "Passed", "PASSED", "pending", "success"] {
            assert_eq!(github_state(unknown), None, "{unknown}");
        }
        assert_eq!(rank("pending"), 0);
        for last in ["success", "failure", "error"] {
            assert_eq!(rank(last), 1, "{last}");
        }
        assert_eq!(rank("nonsense"), 0);
        // Every mapped state has a rank consistent with "never goes back".
        for (herald, _) in table {
            let g = github_state(herald).expect("mapped");
            assert_eq!(rank(g) == 0, g == "pending", "{herald}");
        }
    }

    #[test]
    fn context_format() {
        assert_eq!(context("web", None), "herald/web");
        assert_eq!(context("web", Some("test")), "herald/web/test");
        assert_eq!(
            context("api-2", Some("lint:rust")),
            "herald/api-2/lint:rust"
        );
    }

    #[test]
    fn descriptions_are_cut_to_140_chars() {
        assert_eq!(describe("Build #12", "passed"), "Build #12: passed");
        assert_eq!(describe("Job test", "running"), "Job test: running");
        let exact = "a".repeat(140);
        assert_eq!(truncate_description(&exact), exact);
        let cut = truncate_description(&"a".repeat(141));
        assert_eq!(cut.chars().count(), 140);
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with(&"a".repeat(139)));
        // Multi-byte characters: counted as characters and cut on their boundaries.
        for ch in ["é", "日", "🦀"] {
            let cut = truncate_description(&ch.repeat(300));
            assert_eq!(cut.chars().count(), 140, "{ch}");
            assert_eq!(cut, format!("{}…", ch.repeat(139)));
        }
        assert_eq!(truncate_description(&"é".repeat(140)), "é".repeat(140));
        let long = describe(&format!("Job {}", "k".repeat(200)), "running");
        assert_eq!(long.chars().count(), 140);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn debug_redacts_the_token_and_the_client_is_shareable() {
        let text = format!("{:?}", request("https://api.github.com", "acme/web", "x"));
        assert!(!text.contains(TOKEN), "{text}");
        assert!(text.contains("<redacted>"));
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<GithubClient>();
        assert!(GithubClient::new(GithubSettings {
            per_token_per_minute: 0,
            ..Default::default()
        })
        .is_err());
    }

    #[tokio::test]
    async fn request_has_the_github_wire_format() {
        let (api, fake) = spawn_fake(Behaviour::Created).await;
        let c = client(80);
        let mut req = request(&format!("{api}/"), "acme/web", &"d".repeat(200));
        req.context = context("web", Some("test"));
        assert_eq!(c.post_status(&req).await, GithubOutcome::Success);

        let seen = fake.seen();
        assert_eq!(seen.len(), 1);
        let s = &seen[0];
        assert_eq!(s.method, Method::POST);
        assert_eq!(s.path, format!("/repos/acme/web/statuses/{SHA}"));
        assert_eq!(
            header(&s.headers, "authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert_eq!(
            header(&s.headers, "accept"),
            Some("application/vnd.github+json")
        );
        assert_eq!(
            header(&s.headers, "x-github-api-version"),
            Some("2022-11-28")
        );
        assert_eq!(header(&s.headers, "user-agent"), Some("herald"));
        assert_eq!(header(&s.headers, "content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&s.body).expect("json body");
        let description = format!("{}…", "d".repeat(139));
        assert_eq!(
            body,
            json!({
                "state": "success",
                "target_url": "https://herald.example/builds/12",
                "description": description,
                "context": "herald/web/test",
            })
        );
        assert_eq!(
            body["description"].as_str().map(|d| d.chars().count()),
            Some(140)
        );
    }

    /// The fake's limit: 2 requests, then 403 + `Retry-After: 1`.
    #[tokio::test]
    async fn forbidden_with_retry_after_blocks_the_token_for_that_long() {
        let (api, fake) = spawn_fake(Behaviour::Limit403 { per_window: 2 }).await;
        let c = client(6000);
        let req = request(&api, "acme/web", "Build #12: passed");
        for _ in 0..2 {
            c.wait_for_budget(TOKEN).await;
            assert_eq!(c.post_status(&req).await, GithubOutcome::Success);
        }
        c.wait_for_budget(TOKEN).await;
        let sent = Instant::now();
        let GithubOutcome::RateLimited { retry_at } = c.post_status(&req).await else {
            panic!("expected RateLimited");
        };
        let wait = retry_at.saturating_duration_since(sent);
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_millis(1500),
            "{wait:?}"
        );
        assert_eq!(c.blocked_until(TOKEN), Some(retry_at));
        assert_eq!(c.blocked_until("another token"), None);
        assert!(!c.try_acquire(TOKEN), "a blocked token has no budget");

        let start = Instant::now();
        c.wait_for_budget(TOKEN).await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(900), "waited {waited:?}");
        assert!(waited < Duration::from_secs(3), "waited {waited:?}");
        assert!(Instant::now() >= retry_at);
        assert_eq!(c.blocked_until(TOKEN), None);
        assert_eq!(c.post_status(&req).await, GithubOutcome::Success);
        assert_eq!(fake.early(), 0, "no request while the fake said wait");
        assert_eq!(fake.seen().len(), 4);
    }

    /// The fake's limit: 1 request, then 429 + `x-ratelimit-reset: now + 1`.
    #[tokio::test]
    async fn too_many_requests_with_ratelimit_reset_blocks_until_the_reset() {
        let (api, fake) = spawn_fake(Behaviour::Limit429 { per_window: 1 }).await;
        let c = client(6000);
        let req = request(&api, "acme/web", "Build #12: passed");
        c.wait_for_budget(TOKEN).await;
        assert_eq!(c.post_status(&req).await, GithubOutcome::Success);
        c.wait_for_budget(TOKEN).await;
        let GithubOutcome::RateLimited { retry_at } = c.post_status(&req).await else {
            panic!("expected RateLimited");
        };
        assert!(c.blocked_until(TOKEN).is_some());
        let reset = fake.last_reset().expect("the fake sent x-ratelimit-reset");

        let start = Instant::now();
        c.wait_for_budget(TOKEN).await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(900), "waited {waited:?}");
        assert!(waited < Duration::from_secs(3), "waited {waited:?}");
        assert!(Instant::now() >= retry_at);
        assert!(
            SystemTime::now() >= UNIX_EPOCH + Duration::from_secs(reset),
            "waited past the reset second"
        );
        assert_eq!(c.post_status(&req).await, GithubOutcome::Success);
        assert_eq!(fake.early(), 0, "no request before x-ratelimit-reset");
    }

    #[tokio::test]
    async fn rate_limit_fallbacks_and_permission_errors() {
        // 429 naming no time: a minute.
        let (api, _) = spawn_fake(Behaviour::Status(429, "slow down")).await;
        let c = client(6000);
        let sent = Instant::now();
        let GithubOutcome::RateLimited { retry_at } =
            c.post_status(&request(&api, "acme/web", "x")).await
        else {
            panic!("expected RateLimited");
        };
        let wait = retry_at.saturating_duration_since(sent);
        assert!(
            wait > Duration::from_secs(59) && wait <= Duration::from_secs(61),
            "{wait:?}"
        );
        assert!(c.blocked_until(TOKEN).is_some());
        // Blocked tokens don't hold back others.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), c.wait_for_budget("other"))
                .await
                .is_ok()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(200), c.wait_for_budget(TOKEN))
                .await
                .is_err()
        );

        // A 403 that says it's a secondary rate limit, without headers: a minute too.
        let (api, _) = spawn_fake(Behaviour::Status(
            403,
            "You have exceeded a secondary rate limit. Please wait a few minutes.",
        ))
        .await;
        let c = client(6000);
        assert!(matches!(
            c.post_status(&request(&api, "acme/web", "x")).await,
            GithubOutcome::RateLimited { .. }
        ));

        // A 403 that is a permission error: fatal, and the token stays usable.
        let (api, _) = spawn_fake(Behaviour::Status(
            403,
            "Resource not accessible by integration",
        ))
        .await;
        let c = client(6000);
        assert_eq!(
            c.post_status(&request(&api, "acme/web", "x")).await,
            GithubOutcome::Fatal("HTTP 403: Resource not accessible by integration".into())
        );
        assert_eq!(c.blocked_until(TOKEN), None);
    }

    #[test]
    fn rate_limit_headers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = |pairs: &[(&'static str, String)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_str(v).expect("value"));
            }
            h
        };
        let rl = |h: &HeaderMap| match classify(429, h, b"", now) {
            Classified::RateLimited(d) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            rl(&headers(&[("retry-after", "7".into())])),
            Duration::from_secs(7)
        );
        // Retry-After wins over x-ratelimit-reset.
        assert_eq!(
            rl(&headers(&[
                ("retry-after", "3".into()),
                ("x-ratelimit-reset", "1700000100".into())
            ])),
            Duration::from_secs(3)
        );
        // An HTTP-date Retry-After, measured against the server's Date.
        assert_eq!(
            rl(&headers(&[
                ("retry-after", http_date_of(1_700_000_030)),
                ("date", http_date_of(1_699_999_990)),
            ])),
            Duration::from_secs(40)
        );
        // x-ratelimit-reset against our clock, then against the server's Date (skew).
        assert_eq!(
            rl(&headers(&[("x-ratelimit-reset", "1700000042".into())])),
            Duration::from_secs(42)
        );
        assert_eq!(
            rl(&headers(&[
                ("x-ratelimit-reset", "1700000042".into()),
                ("date", http_date_of(1_700_000_032)),
            ])),
            Duration::from_secs(10)
        );
        // Nothing usable: a minute; nonsense is clamped to 1 s..1 h.
        assert_eq!(
            rl(&headers(&[("retry-after", "soon".into())])),
            FALLBACK_BLOCK
        );
        assert_eq!(rl(&HeaderMap::new()), FALLBACK_BLOCK);
        assert_eq!(rl(&headers(&[("retry-after", "0".into())])), MIN_BLOCK);
        assert_eq!(
            rl(&headers(&[("x-ratelimit-reset", "1600000000".into())])),
            MIN_BLOCK
        );
        assert_eq!(rl(&headers(&[("retry-after", "999999".into())])), MAX_BLOCK);
        // 403: a rate limit only with a marker.
        let primary = headers(&[
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", "1700000005".into()),
        ]);
        assert_eq!(
            classify(403, &primary, b"{}", now),
            Classified::RateLimited(Duration::from_secs(5))
        );
        assert_eq!(
            classify(
                403,
                &headers(&[("x-ratelimit-remaining", "4999".into())]),
                b"{}",
                now
            ),
            Classified::Outcome(GithubOutcome::Fatal("HTTP 403".into()))
        );
        assert_eq!(
            classify(201, &primary, b"", now),
            Classified::Outcome(GithubOutcome::Success)
        );
        assert!(matches!(
            classify(408, &HeaderMap::new(), b"", now),
            Classified::Outcome(GithubOutcome::Retry(_))
        ));
        assert!(matches!(
            classify(307, &HeaderMap::new(), b"", now),
            Classified::Outcome(GithubOutcome::Fatal(_))
        ));
    }

    #[tokio::test]
    async fn governor_budget_is_per_token() {
        let c = client(3); // burst 3, then one every 20 s
        for _ in 0..3 {
            assert!(
                tokio::time::timeout(Duration::from_millis(200), c.wait_for_budget("t1"))
                    .await
                    .is_ok()
            );
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), c.wait_for_budget("t1"))
                .await
                .is_err(),
            "the 4th request of the minute waits"
        );
        assert!(!c.try_acquire("t1"));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), c.wait_for_budget("t2"))
                .await
                .is_ok(),
            "another token has its own budget"
        );
        assert_eq!(c.tracked_tokens(), 2);
        // Forgetting idle keys never forgets a spent budget.
        c.retain_recent();
        assert!(!c.try_acquire("t1"));
        assert!(c.tracked_tokens() >= 1);

        // An explicit, smaller burst.
        let c = GithubClient::new(GithubSettings {
            per_token_per_minute: 3,
            burst: Some(1),
            ..Default::default()
        })
        .expect("client");
        assert!(c.try_acquire("t1"));
        assert!(!c.try_acquire("t1"));
    }

    /// A tiny period (60,000,000 per minute = one per microsecond) makes every key
    /// indistinguishable from a fresh one a few microseconds after its single use, which
    /// is when governor's `retain_recent` may drop it.
    #[tokio::test]
    async fn retain_recent_keeps_memory_flat() {
        let c = client(60_000_000);
        for round in 0..2 {
            for i in 0..100_000 {
                assert!(c.try_acquire(&format!("round-{round}-token-{i}")));
            }
            assert_eq!(c.tracked_tokens(), 100_000, "round {round}");
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.retain_recent();
            assert_eq!(c.tracked_tokens(), 0, "round {round}");
        }
        // Expired blocks go too.
        let key = token_key("blocked");
        c.block(&key, Instant::now() + Duration::from_millis(10));
        assert!(c.blocked_until("blocked").is_some());
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.retain_recent();
        assert!(c.blocks().is_empty());
    }

    #[tokio::test]
    async fn fatal_and_retry_statuses() {
        for (code, fatal) in [
            (404, true),
            (401, true),
            (422, true),
            (500, false),
            (502, false),
            (503, false),
        ] {
            let (api, _) = spawn_fake(Behaviour::Status(code, "nope")).await;
            let outcome = client(80)
                .post_status(&request(&api, "acme/web", "x"))
                .await;
            let expected = format!("HTTP {code}: nope");
            if fatal {
                assert_eq!(outcome, GithubOutcome::Fatal(expected), "{code}");
            } else {
                assert_eq!(outcome, GithubOutcome::Retry(expected), "{code}");
            }
        }

        // A timeout and a refused connection are worth retrying.
        let (api, _) = spawn_fake(Behaviour::Slow(Duration::from_secs(5))).await;
        let c = GithubClient::new(GithubSettings {
            timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .expect("client");
        let outcome = c.post_status(&request(&api, "acme/web", "x")).await;
        assert!(
            matches!(&outcome, GithubOutcome::Retry(e) if e.contains("timed out")),
            "{outcome:?}"
        );
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let outcome = c
            .post_status(&request(&format!("http://{addr}"), "acme/web", "x"))
            .await;
        assert!(matches!(outcome, GithubOutcome::Retry(_)), "{outcome:?}");

        // What can't be a GitHub status is refused before anything is sent.
        let (api, fake) = spawn_fake(Behaviour::Created).await;
        for repository in ["acme", "acme/web/x", "../web", "acme/..", "acme/we b", ""] {
            let outcome = c.post_status(&request(&api, repository, "x")).await;
            assert!(matches!(outcome, GithubOutcome::Fatal(_)), "{repository}");
        }
        let mut bad_sha = request(&api, "acme/web", "x");
        bad_sha.sha = "../../user".into();
        assert!(matches!(
            c.post_status(&bad_sha).await,
            GithubOutcome::Fatal(_)
        ));
        let mut bad_token = request(&api, "acme/web", "x");
        bad_token.token = "line\nbreak".into();
        assert!(matches!(
            c.post_status(&bad_token).await,
            GithubOutcome::Fatal(_)
        ));
        assert!(fake.seen().is_empty());
    }
}
