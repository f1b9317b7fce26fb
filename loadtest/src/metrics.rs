//! What the load test measures besides its own clocks: PostgreSQL's transaction and
//! WAL counters (pg_stat_database, pg_stat_wal) and Herald's histograms from
//! GET /metrics; and how latencies are printed.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use herald_client::{Client, Method};
use serde_json::Value;
use sqlx::{Connection, PgConnection, Row};

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub fn quantiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, mean {:.2} ms (n={})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.mean() / 1000.0,
        h.len()
    )
}

pub struct TxProbe {
    pub conn: PgConnection,
    pub label: &'static str,
}

impl TxProbe {
    pub async fn connect(url: &str, label: &'static str) -> Result<Self> {
        let conn = PgConnection::connect(url)
            .await
            .with_context(|| format!("connecting to the {label} database for pg_stat_database"))?;
        // One warm-up read, so the connection's own start-up is flushed to the
        // statistics long before the measurement window opens.
        let mut p = TxProbe { conn, label };
        p.read().await?;
        Ok(p)
    }

    /// Committed + rolled back transactions of this database so far. A single simple
    /// query: exactly one transaction of our own.
    pub async fn read(&mut self) -> Result<i64> {
        let row = sqlx::raw_sql(
            "SELECT coalesce(sum(xact_commit + xact_rollback), 0)::bigint \
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut self.conn)
        .await
        .with_context(|| format!("reading pg_stat_database on the {}", self.label))?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// The primary's WAL position in bytes (`pg_current_wal_lsn`), of the whole
    /// cluster: every database on it writes there.
    pub async fn lsn(&mut self) -> Result<i64> {
        let row = sqlx::raw_sql("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(&mut self.conn)
            .await
            .with_context(|| format!("reading pg_current_wal_lsn on the {}", self.label))?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// WAL bytes written and WAL flushes (fsyncs) so far, of the whole cluster
    /// (`pg_stat_wal`): what every commit costs the disk and the replica.
    pub async fn wal(&mut self) -> Result<(i64, i64)> {
        let row = sqlx::raw_sql("SELECT wal_bytes::bigint, wal_sync FROM pg_stat_wal")
            .fetch_one(&mut self.conn)
            .await
            .with_context(|| format!("reading pg_stat_wal on the {}", self.label))?;
        Ok((row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?))
    }
}

/// (busy, total) jiffies of all CPUs, from /proc/stat.
pub fn cpu_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 when that
/// fails, the value on every common Linux).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User + system CPU ticks of process `pid` ("self" for this one) so far.
pub fn process_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&s)
}

/// utime + stime of a /proc/<pid>/stat line (fields 14 and 15; the command name in
/// parentheses may hold spaces, so fields are counted after its closing parenthesis).
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[derive(Debug, Clone, Default)]
pub struct PromHist {
    /// (upper bound, cumulative count), ascending.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

pub fn label_value<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!("{name}=\"");
    let i = labels.find(&pat)? + pat.len();
    let rest = &labels[i..];
    Some(&rest[..rest.find('"')?])
}

/// Sums every series of histogram `name` whose labels contain `filter`.
pub fn parse_hist(text: &str, name: &str, filter: &str) -> Option<PromHist> {
    let mut h = PromHist::default();
    let mut found = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (kind, rest) = if let Some(r) = rest.strip_prefix("_bucket") {
            ("bucket", r)
        } else if let Some(r) = rest.strip_prefix("_sum") {
            ("sum", r)
        } else if let Some(r) = rest.strip_prefix("_count") {
            ("count", r)
        } else {
            continue;
        };
        let (labels, value) = match rest.rfind(' ') {
            Some(i) => (&rest[..i], rest[i + 1..].trim()),
            None => continue,
        };
        if !labels.is_empty() && !labels.starts_with('{') {
            continue; // another metric sharing the prefix
        }
        if !labels.contains(filter) {
            continue;
        }
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        found = true;
        match kind {
            "bucket" => {
                let le = match label_value(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(s) => s.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some(b) => b.1 += v,
                    None => h.buckets.push((le, v)),
                }
            }
            "sum" => h.sum += v,
            _ => h.count += v,
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    found.then_some(h)
}

impl PromHist {
    pub fn minus(&self, before: Option<&PromHist>) -> PromHist {
        let Some(b) = before else {
            return self.clone();
        };
        PromHist {
            buckets: self
                .buckets
                .iter()
                .map(|(le, c)| {
                    let prev = b.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
                    (*le, c - prev)
                })
                .collect(),
            sum: self.sum - b.sum,
            count: self.count - b.count,
        }
    }

    /// The upper bound of the bucket holding quantile `q`.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map(|(le, _)| *le)
    }

    pub fn describe(&self) -> String {
        if self.count <= 0.0 {
            return "no samples".into();
        }
        let bound = |q| match self.quantile_bound(q) {
            Some(b) if b.is_finite() => format!("<= {} ms", b * 1000.0),
            Some(_) => "> largest bucket".into(),
            None => "?".into(),
        };
        format!(
            "n={}, mean {:.2} ms, p50 {}, p99 {}",
            self.count,
            self.sum / self.count * 1000.0,
            bound(0.5),
            bound(0.99)
        )
    }
}

pub const SERVER_HISTOGRAMS: &[(&str, &str, &str)] = &[
    (
        "herald_dispatch_latency_seconds",
        "",
        "scheduled_at -> ping answered (server)",
    ),
    (
        "herald_dispatch_assign_seconds",
        "",
        "scheduled_at -> assignment committed",
    ),
    (
        "herald_dispatch_round_seconds",
        "",
        "one assignment round (transaction)",
    ),
    (
        "herald_db_pool_acquire_seconds",
        "pool=\"dispatch\"",
        "dispatch pool acquire",
    ),
];

pub async fn scrape(plain: &Client) -> Option<String> {
    match plain.call(Method::GET, "/metrics", None).await {
        Ok(r) if r.status.is_success() => match r.body {
            Value::String(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

pub fn server_report(before: Option<&str>, after: Option<&str>) -> Vec<String> {
    let Some(after) = after else {
        return vec!["(GET /metrics failed)".into()];
    };
    SERVER_HISTOGRAMS
        .iter()
        .map(|(name, filter, what)| {
            let now = parse_hist(after, name, filter);
            let then = before.and_then(|b| parse_hist(b, name, filter));
            let shown = if filter.is_empty() {
                name.to_string()
            } else {
                format!("{name}{{{filter}}}")
            };
            match now {
                Some(h) => format!("{shown} ({what}): {}", h.minus(then.as_ref()).describe()),
                None => format!("{shown} ({what}): not exported"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_cpu_times() {
        let line = "4242 (herald serve) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
            150 25 0 0 20 0 9 0 123 456 789";
        assert_eq!(parse_stat_ticks(line), Some(175));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn parses_prometheus_histograms() {
        let text = "# TYPE herald_dispatch_round_seconds histogram\n\
            herald_dispatch_round_seconds_bucket{le=\"0.001\"} 2\n\
            herald_dispatch_round_seconds_bucket{le=\"0.01\"} 9\n\
            herald_dispatch_round_seconds_bucket{le=\"+Inf\"} 10\n\
            herald_dispatch_round_seconds_sum 0.05\n\
            herald_dispatch_round_seconds_count 10\n\
            herald_db_pool_acquire_seconds_bucket{pool=\"dispatch\",le=\"0.001\"} 4\n\
            herald_db_pool_acquire_seconds_bucket{pool=\"api\",le=\"0.001\"} 7\n\
            herald_db_pool_acquire_seconds_count{pool=\"dispatch\"} 4\n";
        let h = parse_hist(text, "herald_dispatch_round_seconds", "").unwrap();
        assert_eq!(h.count, 10.0);
        assert_eq!(h.quantile_bound(0.5), Some(0.01));
        assert_eq!(h.quantile_bound(0.99), Some(f64::INFINITY));
        let p = parse_hist(text, "herald_db_pool_acquire_seconds", "pool=\"dispatch\"").unwrap();
        assert_eq!(p.buckets, vec![(0.001, 4.0)]);
        assert!(parse_hist(text, "herald_nothing", "").is_none());
    }
}
