//! Webhook wire work, and nothing else: Standard Webhooks signing, the SSRF guard (when
//! a URL is registered, and again at connect time against DNS rebinding), sending one
//! attempt with bounded time, bounded per-host concurrency and a bounded response,
//! classifying the receiver's answer, and the retry schedule.
//!
//! It touches no database and no broker: callers (`deliver`) decide what an [`Attempt`]
//! means for the delivery row, and `limits` owns rates. Nothing a receiver does (slow
//! answers, huge or endless bodies, redirects, garbage headers) can panic here or hold a
//! worker past the configured timeout.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{DateTime, NaiveDateTime, Utc};
use hmac::{Hmac, Mac};
use rand::{Rng, RngCore};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The most of a receiver's answer that is read and kept.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The contract's default schedule: the delay after the 1st, 2nd, … failed attempt.
pub const RETRY_SCHEDULE: [Duration; 8] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(2 * 60),
    Duration::from_secs(10 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(60 * 60),
    Duration::from_secs(3 * 60 * 60),
    Duration::from_secs(6 * 60 * 60),
];

/// A receiver's `Retry-After` is honoured up to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest URL accepted, in characters.
pub const MAX_URL_CHARS: usize = 2048;

/// How long [`check_url`] waits for DNS.
const CHECK_DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// An error message kept on an attempt is cut to this many bytes.
const MAX_ERROR_BYTES: usize = 1024;

/// Per-host semaphores are swept of idle hosts once the map reaches this size (or twice
/// its size after the last sweep, whichever is larger).
const HOST_SWEEP_FLOOR: usize = 1024;

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `HERALD_WEBHOOKS__ALLOW_PRIVATE_NETWORKS`: allow loopback / private / link-local
    /// destinations (development and tests only).
    pub allow_private_networks: bool,
    pub connect_timeout: Duration,
    /// The whole attempt: connect, send, and reading the (capped) answer.
    pub timeout: Duration,
    /// Attempts in flight to one host at once; further sends to it wait.
    pub per_host_concurrency: usize,
    pub user_agent: String,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            allow_private_networks: false,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            per_host_concurrency: 16,
            user_agent: format!("Herald-Webhooks/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid webhook URL: {0}")]
    InvalidUrl(String),
    #[error("webhook URL points at a loopback, private, link-local or otherwise non-public address: {0}")]
    PrivateAddress(String),
    #[error("webhook host does not resolve: {0}")]
    Unresolvable(String),
    #[error("invalid webhook secret: expected `whsec_` followed by base64")]
    InvalidSecret,
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
}

// ---------------------------------------------------------------------------------------
// Signing
// ---------------------------------------------------------------------------------------

/// A new endpoint secret: `whsec_` + standard base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    format!("whsec_{}", STANDARD.encode(key))
}

fn mac(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<Hmac<Sha256>, WebhookError> {
    let key = secret
        .strip_prefix("whsec_")
        .and_then(|k| STANDARD.decode(k).ok())
        .filter(|k| !k.is_empty())
        .ok_or(WebhookError::InvalidSecret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| WebhookError::InvalidSecret)?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(mac)
}

/// Standard Webhooks: `v1,` + base64(HMAC-SHA256(key, "{msg_id}.{timestamp}.{body}")),
/// the key being the base64-decoded part of the secret after `whsec_`.
pub fn sign(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, WebhookError> {
    let tag = mac(secret, msg_id, timestamp, body)?
        .finalize()
        .into_bytes();
    Ok(format!("v1,{}", STANDARD.encode(tag)))
}

/// The receiver's side: true when any `v1,` entry of a (space-separated)
/// `webhook-signature` header matches, compared in constant time. Does not check the
/// timestamp's age; receivers should also do that.
pub fn verify(secret: &str, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    header.split_whitespace().any(|entry| {
        let Some(sig) = entry
            .strip_prefix("v1,")
            .and_then(|s| STANDARD.decode(s).ok())
        else {
            return false;
        };
        mac(secret, msg_id, timestamp, body).is_ok_and(|m| m.verify_slice(&sig).is_ok())
    })
}

// ---------------------------------------------------------------------------------------
// SSRF guard
// ---------------------------------------------------------------------------------------

/// True only for globally routable unicast addresses. False for loopback, private,
/// link-local, CGNAT, multicast, unspecified, broadcast, documentation, benchmarking and
/// reserved ranges, IPv6 unique-local / site-local, and IPv6 forms that embed one of
/// those (IPv4-mapped, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if v6.is_unspecified() || v6.is_loopback() {
                return false;
            }
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                Ipv4Addr::new(a, b, c, d)
            };
            // NAT64 well-known prefix: public exactly when the IPv4 address inside is.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public_v4(embedded(s[6], s[7]));
            }
            // 6to4 carries its IPv4 address in bits 16..48.
            if s[0] == 0x2002 {
                return is_public_v4(embedded(s[1], s[2]));
            }
            // Global unicast is 2000::/3; everything else (::/96 IPv4-compatible,
            // fc00::/7, fe80::/10, fec0::/10, ff00::/8, 100::/64, 64:ff9b:1::/48, …) is not.
            let global = (s[0] & 0xe000) == 0x2000;
            global
                // 2001::/23: IETF protocol assignments (Teredo, benchmarking, ORCHID, …).
                && !(s[0] == 0x2001 && s[1] < 0x0200)
                // 2001:db8::/32 and 3fff::/20: documentation.
                && !(s[0] == 0x2001 && s[1] == 0x0db8)
                && !(s[0] == 0x3fff && s[1] < 0x1000)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // 0.0.0.0/8 "this network", includes the unspecified address
        || a == 10
        || a == 127
        || (a == 100 && (b & 0xc0) == 64) // 100.64.0.0/10 CGNAT
        || (a == 169 && b == 254)
        || (a == 172 && (b & 0xf0) == 16)
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24 IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // TEST-NET-1
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast (deprecated)
        || (a == 198 && (b & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113) // TEST-NET-3
        || a >= 224) // multicast 224/4, reserved 240/4, broadcast
}

/// Syntax only: http(s), a host, no userinfo, at most [`MAX_URL_CHARS`].
fn parse_url(url: &str) -> Result<reqwest::Url, WebhookError> {
    if url.chars().count() > MAX_URL_CHARS {
        return Err(WebhookError::InvalidUrl(format!(
            "longer than {MAX_URL_CHARS} characters"
        )));
    }
    let u = reqwest::Url::parse(url).map_err(|e| WebhookError::InvalidUrl(e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(WebhookError::InvalidUrl(format!(
            "the scheme must be http or https, not `{}`",
            u.scheme()
        )));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(WebhookError::InvalidUrl(
            "credentials in the URL are not allowed".into(),
        ));
    }
    if u.host_str().unwrap_or_default().is_empty() {
        return Err(WebhookError::InvalidUrl("the URL has no host".into()));
    }
    Ok(u)
}

/// The URL's host when it is an IP literal (the URL parser has already normalised forms
/// like `http://2130706433/` to `127.0.0.1`).
fn literal_ip(u: &reqwest::Url) -> Option<IpAddr> {
    let host = u.host_str()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

/// Validates a webhook URL when it is created: http or https, a host, no userinfo, at
/// most 2048 characters; then resolves the host and refuses it if ANY address is not
/// public. With `allow_private` the host is neither resolved nor restricted (internal
/// names may only resolve later, e.g. in a compose network).
pub async fn check_url(url: &str, allow_private: bool) -> Result<reqwest::Url, WebhookError> {
    let u = parse_url(url)?;
    if allow_private {
        return Ok(u);
    }
    if let Some(ip) = literal_ip(&u) {
        return if is_public(ip) {
            Ok(u)
        } else {
            Err(WebhookError::PrivateAddress(ip.to_string()))
        };
    }
    let host = u.host_str().unwrap_or_default().to_owned();
    let port = u.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        CHECK_DNS_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => return Err(WebhookError::Unresolvable(format!("{host}: {e}"))),
        Err(_) => return Err(WebhookError::Unresolvable(format!("{host}: DNS timed out"))),
    };
    if addrs.is_empty() {
        return Err(WebhookError::Unresolvable(format!("{host}: no addresses")));
    }
    if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(WebhookError::PrivateAddress(format!(
            "{host} resolves to {}",
            bad.ip()
        )));
    }
    Ok(u)
}

/// The client's resolver when private networks are not allowed: the system resolver,
/// minus every non-public address, so a name that passed [`check_url`] cannot be rebound
/// to an internal address later. Not consulted for IP literals; `send` checks those.
struct PublicOnlyResolver;

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<SocketAddr> = addrs.filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!("refused: {host} resolves to no public address").into());
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

// ---------------------------------------------------------------------------------------
// One attempt
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx.
    Success,
    /// 410: disable the endpoint.
    Gone,
    /// 429 or 503 with a parseable `Retry-After` (capped at [`MAX_RETRY_AFTER`]).
    RetryAfter(Duration),
    /// Any other status, a timeout, a connect error, a refused address.
    Retry,
}

impl Outcome {
    /// The `outcome` label of `herald_webhook_attempts_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Gone => "gone",
            Outcome::RetryAfter(_) => "retry_after",
            Outcome::Retry => "retry",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attempt {
    /// None when no answer arrived.
    pub status_code: Option<u16>,
    pub outcome: Outcome,
    /// None on success.
    pub error: Option<String>,
    /// At most [`MAX_RESPONSE_BYTES`] of the answer, lossy UTF-8.
    pub response_body: Option<String>,
    /// From sending to the end of reading the answer (waiting for the host's slot
    /// excluded).
    pub duration: Duration,
    /// Unix seconds: the signed `webhook-timestamp`.
    pub timestamp: i64,
}

/// Classifies a receiver's status; `retry_after` is the raw header, if any.
pub fn classify(status: u16, retry_after: Option<&str>, now: DateTime<Utc>) -> Outcome {
    match status {
        200..=299 => Outcome::Success,
        410 => Outcome::Gone,
        429 | 503 => retry_after
            .and_then(|v| parse_retry_after(v, now))
            .map_or(Outcome::Retry, Outcome::RetryAfter),
        _ => Outcome::Retry,
    }
}

/// One semaphore per host, created on first use and swept once nobody holds it.
struct HostSlots {
    per_host: usize,
    inner: Mutex<SlotMap>,
}

struct SlotMap {
    map: HashMap<String, Arc<Semaphore>>,
    sweep_at: usize,
}

impl HostSlots {
    fn new(per_host: usize) -> Self {
        HostSlots {
            per_host: per_host.clamp(1, Semaphore::MAX_PERMITS),
            inner: Mutex::new(SlotMap {
                map: HashMap::new(),
                sweep_at: HOST_SWEEP_FLOOR,
            }),
        }
    }

    fn get(&self, host: &str) -> Arc<Semaphore> {
        let mut m = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = m.map.get(host) {
            return s.clone();
        }
        if m.map.len() >= m.sweep_at {
            // Clones are only made under this lock, so a count of 1 means no task holds
            // or waits on it: dropping it cannot let a host exceed its cap.
            m.map.retain(|_, s| Arc::strong_count(s) > 1);
            m.sweep_at = (m.map.len() * 2).max(HOST_SWEEP_FLOOR);
        }
        let s = Arc::new(Semaphore::new(self.per_host));
        m.map.insert(host.to_owned(), s.clone());
        s
    }
}

/// Sends attempts through one shared HTTP client. Cheap to clone; Send + Sync.
#[derive(Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    settings: Arc<WebhookSettings>,
    hosts: Arc<HostSlots>,
}

impl std::fmt::Debug for WebhookSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSender")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl WebhookSender {
    /// One `reqwest::Client` for every endpoint: connect and total timeouts, no
    /// redirects, no proxy from the environment (a proxy would resolve names itself and
    /// bypass the guard), the public-only resolver unless private networks are allowed,
    /// and a pool sized for many hosts with a few connections each.
    pub fn new(settings: WebhookSettings) -> Result<Self, WebhookError> {
        let per_host = settings.per_host_concurrency.max(1);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .no_proxy()
            .user_agent(settings.user_agent.as_str())
            .pool_max_idle_per_host(per_host)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true);
        if !settings.allow_private_networks {
            builder = builder.dns_resolver(Arc::new(PublicOnlyResolver));
        }
        let client = builder
            .build()
            .map_err(|e| WebhookError::Client(error_chain(&e)))?;
        Ok(WebhookSender {
            client,
            hosts: Arc::new(HostSlots::new(per_host)),
            settings: Arc::new(settings),
        })
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    /// One attempt: POST `url` with `content-type: application/json`, `webhook-id:
    /// msg_id`, `webhook-timestamp` (now, taken once the host's slot is held),
    /// `webhook-signature` and the user agent. Refuses non-public IP-literal URLs unless
    /// private networks are allowed (names are refused by the resolver). Holds a
    /// per-host permit throughout; keeps at most [`MAX_RESPONSE_BYTES`] of the answer.
    /// Never panics on anything the receiver does; every failure is an [`Attempt`].
    pub async fn send(&self, url: &str, secret: &str, msg_id: &str, body: &[u8]) -> Attempt {
        self.send_signed(url, secret, None, msg_id, body).await
    }

    /// [`send`](Self::send), also signed with `old_secret` while a rotation overlaps:
    /// `webhook-signature: v1,<new> v1,<old>`, so a receiver that knows either secret
    /// verifies it. The second signature costs one more HMAC, nothing else.
    pub async fn send_signed(
        &self,
        url: &str,
        secret: &str,
        old_secret: Option<&str>,
        msg_id: &str,
        body: &[u8],
    ) -> Attempt {
        let attempt = self.attempt(url, secret, old_secret, msg_id, body).await;
        metrics::counter!("herald_webhook_attempts_total", "outcome" => attempt.outcome.label())
            .increment(1);
        metrics::histogram!("herald_webhook_attempt_seconds")
            .record(attempt.duration.as_secs_f64());
        attempt
    }

    async fn attempt(
        &self,
        url: &str,
        secret: &str,
        old_secret: Option<&str>,
        msg_id: &str,
        body: &[u8],
    ) -> Attempt {
        let u = match parse_url(url) {
            Ok(u) => u,
            Err(e) => return failed(e.to_string(), Instant::now()),
        };
        if !self.settings.allow_private_networks {
            if let Some(ip) = literal_ip(&u).filter(|ip| !is_public(*ip)) {
                return failed(
                    format!("refused: {ip} is not a public address"),
                    Instant::now(),
                );
            }
        }
        let slot = self.hosts.get(u.host_str().unwrap_or_default());
        let Ok(_permit) = slot.acquire_owned().await else {
            return failed("the host's slot was closed".into(), Instant::now());
        };

        let started = Instant::now();
        let timestamp = Utc::now().timestamp();
        let mut signature = match sign(secret, msg_id, timestamp, body) {
            Ok(s) => s,
            Err(e) => return failed(e.to_string(), started),
        };
        // A broken old secret must not stop deliveries signed with the new one.
        if let Some(Ok(old)) = old_secret.map(|o| sign(o, msg_id, timestamp, body)) {
            signature.push(' ');
            signature.push_str(&old);
        }
        let sent = self
            .client
            .post(u)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_vec())
            .send()
            .await;
        let mut res = match sent {
            Ok(r) => r,
            Err(e) => return failed(error_chain(&e), started),
        };

        let status = res.status();
        let header = |name: reqwest::header::HeaderName| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = header(reqwest::header::RETRY_AFTER);
        let location = header(reqwest::header::LOCATION);
        let outcome = classify(status.as_u16(), retry_after.as_deref(), Utc::now());

        // Stream the answer and stop at the cap; the total timeout still applies.
        let mut kept: Vec<u8> = Vec::new();
        let mut read_error = None;
        while kept.len() < MAX_RESPONSE_BYTES {
            match res.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_RESPONSE_BYTES - kept.len();
                    kept.extend_from_slice(chunk.get(..room).unwrap_or(&chunk));
                }
                Ok(None) => break,
                Err(e) => {
                    read_error = Some(format!("reading the answer: {}", error_chain(&e)));
                    break;
                }
            }
        }
        drop(res);

        let error = match outcome {
            Outcome::Success => None,
            _ => {
                let mut msg = format!("HTTP {status}");
                if status.is_redirection() {
                    let to = location.unwrap_or_default();
                    msg.push_str(&format!(
                        " (redirect to `{}` not followed)",
                        truncate(&to, 200)
                    ));
                }
                if let Some(e) = read_error {
                    msg.push_str("; ");
                    msg.push_str(&e);
                }
                Some(truncate(&msg, MAX_ERROR_BYTES).to_owned())
            }
        };
        Attempt {
            status_code: Some(status.as_u16()),
            outcome,
            error,
            response_body: Some(String::from_utf8_lossy(&kept).into_owned()),
            duration: started.elapsed(),
            timestamp,
        }
    }
}

/// An attempt that got no answer.
fn failed(error: String, started: Instant) -> Attempt {
    Attempt {
        status_code: None,
        outcome: Outcome::Retry,
        error: Some(truncate(&error, MAX_ERROR_BYTES).to_owned()),
        response_body: None,
        duration: started.elapsed(),
        timestamp: Utc::now().timestamp(),
    }
}

/// `kind: message: cause: cause…`, without the URL (it is on the delivery already).
fn error_chain(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else if e.is_builder() {
        "invalid request"
    } else if e.is_body() || e.is_decode() {
        "body error"
    } else {
        "request error"
    };
    let mut parts = vec![kind.to_owned()];
    let mut next: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = next {
        let mut text = err.to_string();
        if let Some(url) = e.url() {
            text = text.replace(&format!(" for url ({url})"), "");
        }
        if parts.last() != Some(&text) && !text.is_empty() {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------
// Retry schedule
// ---------------------------------------------------------------------------------------

/// The delay before the next attempt after `attempts_made` failed attempts (1-based:
/// after the 1st failure, `RETRY_SCHEDULE[0]`; 0 is treated as 1), with ±20 % jitter.
/// None once the schedule is exhausted: the delivery is dead.
pub fn next_retry_delay(attempts_made: u32) -> Option<Duration> {
    let i = usize::try_from(attempts_made.max(1) - 1).ok()?;
    let base = *RETRY_SCHEDULE.get(i)?;
    let jitter: f64 = rand::thread_rng().gen_range(0.8..=1.2);
    Some(base.mul_f64(jitter))
}

/// `Retry-After` as delta-seconds or an HTTP-date (IMF-fixdate, RFC 850 or asctime),
/// relative to `now`; a date in the past is zero; capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    let delay = if v.bytes().all(|b| b.is_ascii_digit()) {
        // Only digits: the one way to fail is overflow, which the cap absorbs.
        Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = parse_http_date(v)?;
        (at - now).to_std().unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

fn parse_http_date(v: &str) -> Option<DateTime<Utc>> {
    if let Ok(d) = DateTime::parse_from_rfc2822(v) {
        return Some(d.with_timezone(&Utc));
    }
    // RFC 850 ("Sunday, 06-Nov-94 08:49:37 GMT") and asctime ("Sun Nov  6 08:49:37 1994").
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(v, f).ok())
        .map(|n| n.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, Bytes};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{any, post};
    use axum::Router;
    use chrono::TimeZone;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A real HTTP server on 127.0.0.1:0; returns its base URL.
    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }

    fn sender(allow_private: bool) -> WebhookSender {
        WebhookSender::new(WebhookSettings {
            allow_private_networks: allow_private,
            ..Default::default()
        })
        .expect("sender")
    }

    /// A route that counts its requests and answers 200.
    fn counting(hits: &Arc<AtomicUsize>) -> axum::routing::MethodRouter {
        let hits = hits.clone();
        any(move || {
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                StatusCode::OK
            }
        })
    }

    #[test]
    fn sign_matches_an_independent_hmac_and_the_standard_webhooks_vector() {
        let secret = generate_secret();
        let key = STANDARD
            .decode(secret.strip_prefix("whsec_").expect("prefix"))
            .expect("base64");
        assert_eq!(key.len(), 32);
        let body = br#"{"type":"build.finished","data":{}}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
        mac.update(b"msg_42.1700000000.");
        mac.update(body);
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        let got = sign(&secret, "msg_42", 1_700_000_000, body).expect("sign");
        assert_eq!(got, expected);
        assert!(verify(
            &secret,
            "msg_42",
            1_700_000_000,
            body,
            &format!("v1,bm9wZQ== {got}")
        ));
        assert!(!verify(&secret, "msg_42", 1_700_000_001, body, &got));

        let vector = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .expect("sign");
        assert_eq!(vector, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");

        for bad in [
            "",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_",
            "whsec_!!!",
        ] {
            assert!(
                matches!(sign(bad, "m", 1, b"x"), Err(WebhookError::InvalidSecret)),
                "{bad}"
            );
        }
        assert_ne!(generate_secret(), secret);
    }

    #[tokio::test]
    async fn a_receiver_checking_every_header_and_the_signature_accepts_the_attempt() {
        let secret = generate_secret();
        let key = STANDARD
            .decode(secret.strip_prefix("whsec_").expect("prefix"))
            .expect("base64");
        let sent_body = br#"{"type":"build.finished","data":{"build":{"id":1}}}"#;
        let app = Router::new().route(
            "/hook",
            post(move |h: HeaderMap, body: Bytes| {
                let key = key.clone();
                async move {
                    let get = |n: &str| {
                        h.get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let mut problems = Vec::new();
                    if get("content-type") != "application/json" {
                        problems.push("content-type");
                    }
                    if get("webhook-id") != "msg_2Xb" {
                        problems.push("webhook-id");
                    }
                    if !get("user-agent").starts_with("Herald-Webhooks/") {
                        problems.push("user-agent");
                    }
                    let ts: i64 = get("webhook-timestamp").parse().unwrap_or(0);
                    if (Utc::now().timestamp() - ts).abs() > 5 {
                        problems.push("webhook-timestamp");
                    }
                    // Verified independently of sign(): HMAC over id.timestamp.body.
                    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
                    mac.update(
                        format!("{}.{}.", get("webhook-id"), get("webhook-timestamp")).as_bytes(),
                    );
                    mac.update(&body);
                    let want = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
                    if get("webhook-signature") != want {
                        problems.push("webhook-signature");
                    }
                    if problems.is_empty() {
                        (StatusCode::OK, "thanks".to_owned())
                    } else {
                        (StatusCode::BAD_REQUEST, problems.join(","))
                    }
                }
            }),
        );
        let base = serve(app).await;
        let a = sender(true)
            .send(&format!("{base}/hook"), &secret, "msg_2Xb", sent_body)
            .await;
        assert_eq!(a.outcome, Outcome::Success, "{a:?}");
        assert_eq!(a.status_code, Some(200));
        assert_eq!(a.response_body.as_deref(), Some("thanks"));
        assert_eq!(a.error, None);
        assert!((Utc::now().timestamp() - a.timestamp).abs() <= 5);
    }

    #[tokio::test]
    async fn answers_are_classified_and_redirects_are_not_followed() {
        let target_hits = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route("/gone", post(|| async { StatusCode::GONE }))
            .route(
                "/busy",
                post(|| async { (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "7")]) }),
            )
            .route(
                "/busy-bare",
                post(|| async { StatusCode::TOO_MANY_REQUESTS }),
            )
            .route(
                "/down",
                post(|| async {
                    let at = (Utc::now() + chrono::Duration::seconds(120))
                        .format("%a, %d %b %Y %H:%M:%S GMT")
                        .to_string();
                    (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", at)])
                }),
            )
            .route(
                "/down-garbage",
                post(|| async { (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "soon")]) }),
            )
            .route(
                "/err",
                post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
            )
            .route(
                "/moved",
                post(|| async { (StatusCode::TEMPORARY_REDIRECT, [("location", "/target")]) }),
            )
            .route(
                "/found",
                post(|| async { (StatusCode::FOUND, [("location", "/target")]) }),
            )
            .route("/target", counting(&target_hits));
        let base = serve(app).await;
        let s = sender(true);
        let secret = generate_secret();
        let send = |path: &str| {
            let (s, url, secret) = (s.clone(), format!("{base}{path}"), secret.clone());
            async move { s.send(&url, &secret, "msg_c", b"{}").await }
        };

        let gone = send("/gone").await;
        assert_eq!((gone.outcome, gone.status_code), (Outcome::Gone, Some(410)));
        assert!(gone.error.is_some());
        assert_eq!(
            send("/busy").await.outcome,
            Outcome::RetryAfter(Duration::from_secs(7))
        );
        assert_eq!(send("/busy-bare").await.outcome, Outcome::Retry);
        match send("/down").await.outcome {
            Outcome::RetryAfter(d) => {
                assert!(
                    d > Duration::from_secs(100) && d <= Duration::from_secs(120),
                    "{d:?}"
                )
            }
            other => panic!("503 with an HTTP-date: {other:?}"),
        }
        assert_eq!(send("/down-garbage").await.outcome, Outcome::Retry);
        let err = send("/err").await;
        assert_eq!(
            (err.outcome.clone(), err.status_code),
            (Outcome::Retry, Some(500))
        );
        assert_eq!(err.response_body.as_deref(), Some("boom"));
        assert!(
            err.error.as_deref().is_some_and(|e| e.contains("500")),
            "{err:?}"
        );
        for path in ["/moved", "/found"] {
            let moved = send(path).await;
            assert_eq!(moved.outcome, Outcome::Retry, "{moved:?}");
            assert!(matches!(moved.status_code, Some(302 | 307)), "{moved:?}");
            assert!(
                moved
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("not followed")),
                "{moved:?}"
            );
        }
        assert_eq!(
            target_hits.load(Ordering::SeqCst),
            0,
            "the redirect target got a request"
        );
    }

    #[tokio::test]
    async fn only_64_kib_of_an_answer_is_kept() {
        let app = Router::new()
            .route("/big", post(|| async { "x".repeat(1024 * 1024) }))
            .route(
                "/endless",
                post(|| async {
                    let chunk = Bytes::from_static(&[b'y'; 8192]);
                    let stream = futures::stream::repeat_with(move || {
                        Ok::<_, std::io::Error>(chunk.clone())
                    });
                    Response::new(Body::from_stream(stream))
                }),
            )
            .route(
                "/binary",
                post(|| async {
                    (StatusCode::BAD_REQUEST, vec![0xffu8, 0xfe, b'o', b'k']).into_response()
                }),
            );
        let base = serve(app).await;
        let s = sender(true);
        let secret = generate_secret();
        let big = s.send(&format!("{base}/big"), &secret, "m", b"{}").await;
        assert_eq!(big.outcome, Outcome::Success);
        assert_eq!(big.response_body.map(|b| b.len()), Some(MAX_RESPONSE_BYTES));

        let started = Instant::now();
        let endless = s
            .send(&format!("{base}/endless"), &secret, "m", b"{}")
            .await;
        assert_eq!(endless.outcome, Outcome::Success, "{endless:?}");
        assert_eq!(
            endless.response_body.map(|b| b.len()),
            Some(MAX_RESPONSE_BYTES)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "stopped reading at the cap"
        );

        let binary = s.send(&format!("{base}/binary"), &secret, "m", b"{}").await;
        assert_eq!(binary.outcome, Outcome::Retry);
        assert_eq!(binary.response_body.as_deref(), Some("\u{fffd}\u{fffd}ok"));
    }

    #[tokio::test]
    async fn a_slow_receiver_times_out_and_a_closed_port_is_a_connect_error() {
        let app = Router::new().route(
            "/",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK
            }),
        );
        let base = serve(app).await;
        let s = WebhookSender::new(WebhookSettings {
            allow_private_networks: true,
            timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .expect("sender");
        let started = Instant::now();
        let a = s.send(&base, &generate_secret(), "m", b"{}").await;
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!((a.outcome.clone(), a.status_code), (Outcome::Retry, None));
        assert!(
            a.error.as_deref().is_some_and(|e| e.contains("timeout")),
            "{a:?}"
        );

        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            l.local_addr().expect("addr")
        };
        let a = s
            .send(&format!("http://{closed}/"), &generate_secret(), "m", b"{}")
            .await;
        assert_eq!(a.outcome, Outcome::Retry);
        assert!(
            a.error
                .as_deref()
                .is_some_and(|e| e.starts_with("connect error")),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn check_url_refuses_private_addresses_and_bad_urls() {
        for url in [
            "http://127.0.0.1:1/x",
            "http://localhost/x",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fd00::1]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0.0.0.0/",
            "http://100.64.1.1/",
        ] {
            let r = check_url(url, false).await;
            assert!(
                matches!(r, Err(WebhookError::PrivateAddress(_))),
                "{url}: {r:?}"
            );
        }
        let too_long = format!("https://example.com/{}", "a".repeat(MAX_URL_CHARS));
        for url in [
            "ftp://example.com/",
            "http://",
            "http:///",
            "https://user:pw@example.com/",
            "https://user@example.com/",
            "not a url",
            "mailto:a@example.com",
            too_long.as_str(),
        ] {
            for allow in [false, true] {
                let r = check_url(url, allow).await;
                assert!(
                    matches!(r, Err(WebhookError::InvalidUrl(_))),
                    "{url}: {r:?}"
                );
            }
        }
        assert!(check_url("http://127.0.0.1:1/x", true).await.is_ok());
        assert!(check_url("http://localhost/x", true).await.is_ok());
        let ok = check_url("https://93.184.216.34/hook?a=1", false)
            .await
            .expect("public");
        assert_eq!(ok.as_str(), "https://93.184.216.34/hook?a=1");
        assert!(check_url("https://[2606:4700::1111]/", false).await.is_ok());
    }

    #[tokio::test]
    async fn send_refuses_private_receivers_unless_allowed() {
        let hits = Arc::new(AtomicUsize::new(0));
        let base = serve(Router::new().route("/", counting(&hits))).await;
        let secret = generate_secret();
        let guarded = sender(false);

        let literal = guarded.send(&base, &secret, "m", b"{}").await;
        assert_eq!(
            (literal.outcome.clone(), literal.status_code),
            (Outcome::Retry, None)
        );
        assert!(
            literal
                .error
                .as_deref()
                .is_some_and(|e| e.contains("refused")),
            "{literal:?}"
        );

        // A name resolving to loopback is dropped by the resolver at connect time.
        let by_name = base.replace("127.0.0.1", "localhost");
        let rebound = guarded.send(&by_name, &secret, "m", b"{}").await;
        assert_eq!(rebound.outcome, Outcome::Retry);
        assert!(
            rebound
                .error
                .as_deref()
                .is_some_and(|e| e.contains("no public address")),
            "{rebound:?}"
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "the private receiver got a request"
        );

        let allowed = sender(true);
        assert_eq!(
            allowed.send(&base, &secret, "m", b"{}").await.outcome,
            Outcome::Success
        );
        assert_eq!(
            allowed.send(&by_name, &secret, "m", b"{}").await.outcome,
            Outcome::Success
        );
        assert_eq!(hits.load(Ordering::SeqCst), 2);

        let bad_secret = allowed.send(&base, "nope", "m", b"{}").await;
        assert_eq!(bad_secret.outcome, Outcome::Retry);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        let bad_id = allowed.send(&base, &secret, "bad\nid", b"{}").await;
        assert_eq!(bad_id.outcome, Outcome::Retry);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn public_and_non_public_addresses() {
        for ip in [
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "::",
            "::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::1",
            "100::1",
            "3fff::1",
        ] {
            assert!(
                !is_public(ip.parse().expect("ip")),
                "{ip} must not be public"
            );
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "100.128.0.1",
            "172.32.0.1",
            "192.169.0.1",
            "::ffff:8.8.8.8",
            "2606:4700::1111",
            "2a00:1450:4001::200e",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip.parse().expect("ip")), "{ip} must be public");
        }
    }

    #[test]
    fn the_retry_schedule_has_20_percent_jitter_and_ends_after_8() {
        for _ in 0..50 {
            for (i, base) in RETRY_SCHEDULE.iter().enumerate() {
                let made = u32::try_from(i + 1).expect("small");
                let d = next_retry_delay(made).expect("delay");
                assert!(
                    d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2),
                    "{made}: {d:?}"
                );
            }
        }
        assert_eq!(next_retry_delay(9), None);
        assert_eq!(next_retry_delay(u32::MAX), None);
        assert!(next_retry_delay(0).is_some_and(|d| d <= Duration::from_secs(6)));
    }

    #[test]
    fn retry_after_values() {
        let now = Utc
            .with_ymd_and_hms(2015, 10, 21, 7, 0, 0)
            .single()
            .expect("now");
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(parse_retry_after("7", now), secs(7));
        assert_eq!(parse_retry_after(" 0 ", now), secs(0));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            secs(28 * 60)
        );
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:00 GMT", now),
            secs(28 * 60)
        );
        assert_eq!(
            parse_retry_after("Wed Oct 21 07:28:00 2015", now),
            secs(28 * 60)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 06:00:00 GMT", now),
            secs(0)
        );
        assert_eq!(parse_retry_after("999999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT", now),
            Some(MAX_RETRY_AFTER)
        );
        for bad in [
            "",
            "soon",
            "-5",
            "+5",
            "1.5",
            "Wed, 32 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
        assert_eq!(
            classify(429, Some("3"), now),
            Outcome::RetryAfter(Duration::from_secs(3))
        );
        assert_eq!(classify(500, Some("3"), now), Outcome::Retry);
        assert_eq!(classify(204, None, now), Outcome::Success);
        assert_eq!(classify(301, None, now), Outcome::Retry);
    }

    #[tokio::test]
    async fn per_host_concurrency_is_capped() {
        let now = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let (n2, m2) = (now.clone(), max.clone());
        let app = Router::new().route(
            "/",
            post(move || {
                let (n, m) = (n2.clone(), m2.clone());
                async move {
                    let c = n.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(c, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    n.fetch_sub(1, Ordering::SeqCst);
                    StatusCode::OK
                }
            }),
        );
        let base = serve(app).await;
        let s = WebhookSender::new(WebhookSettings {
            allow_private_networks: true,
            per_host_concurrency: 2,
            ..Default::default()
        })
        .expect("sender");
        let secret = generate_secret();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (s, base, secret) = (s.clone(), base.clone(), secret.clone());
            tasks.push(tokio::spawn(async move {
                s.send(&base, &secret, &format!("msg_{i}"), b"{}").await
            }));
        }
        for t in tasks {
            let a = t.await.expect("join");
            assert_eq!(a.outcome, Outcome::Success, "{a:?}");
        }
        assert_eq!(max.load(Ordering::SeqCst), 2, "never more than 2 at once");
        assert!(
            started.elapsed() >= Duration::from_millis(850),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn host_slots_are_swept_only_when_idle() {
        let slots = HostSlots::new(1);
        let held = slots.get("busy.example");
        for i in 0..HOST_SWEEP_FLOOR + 10 {
            drop(slots.get(&format!("h{i}.example")));
        }
        assert!(
            Arc::ptr_eq(&held, &slots.get("busy.example")),
            "a held slot survives"
        );
        let len = slots.inner.lock().expect("lock").map.len();
        assert!(len < HOST_SWEEP_FLOOR, "{len}");
    }

    #[test]
    fn the_sender_is_clone_send_and_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<WebhookSender>();
        assert!(WebhookSender::new(WebhookSettings {
            user_agent: "bad\nagent".into(),
            ..Default::default()
        })
        .is_err());
    }
}
