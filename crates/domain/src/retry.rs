//! Job timeouts and retry rules: what a client may ask for, and which rule retries a
//! failed job.

use crate::input::InputError;
use serde::Deserialize;
use serde_json::Value;

pub const MAX_TIMEOUT_S: i64 = 86_400;
pub const MAX_RETRY_LIMIT: i64 = 10;
pub const MAX_RETRY_RULES: usize = 10;

/// `retry` as a client sends it.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default)]
    pub automatic: Vec<RawRule>,
    #[serde(default)]
    pub manual: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub exit_status: Value,
    pub limit: i64,
}

/// Which exit statuses a rule retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitMatch {
    /// `"*"`: any failure.
    Any,
    Status(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryRule {
    pub exit_status: ExitMatch,
    pub limit: u8,
}

/// A validated retry policy. Stored as JSON in the shape the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub automatic: Vec<RetryRule>,
    pub manual: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            automatic: Vec::new(),
            manual: true,
        }
    }
}

impl RetryPolicy {
    pub fn parse(raw: RawRetry) -> Result<Self, InputError> {
        if raw.automatic.len() > MAX_RETRY_RULES {
            return Err(InputError::new(
                "jobs[].retry.automatic",
                format!("must have at most {MAX_RETRY_RULES} rules"),
            ));
        }
        let automatic = raw
            .automatic
            .iter()
            .map(|r| {
                let exit_status = match &r.exit_status {
                    Value::String(s) if s == "*" => ExitMatch::Any,
                    Value::Number(n) => n
                        .as_i64()
                        .and_then(|n| i32::try_from(n).ok())
                        .map(ExitMatch::Status)
                        .ok_or_else(bad_exit_status)?,
                    _ => return Err(bad_exit_status()),
                };
                if !(1..=MAX_RETRY_LIMIT).contains(&r.limit) {
                    return Err(InputError::new(
                        "jobs[].retry.automatic[].limit",
                        format!("must be an integer from 1 to {MAX_RETRY_LIMIT}"),
                    ));
                }
                Ok(RetryRule {
                    exit_status,
                    limit: r.limit as u8,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(RetryPolicy {
            automatic,
            manual: raw.manual.unwrap_or(true),
        })
    }

    /// The rules as stored: `[{"exit_status": -1 | "*", "limit": n}]`.
    pub fn rules_json(&self) -> Value {
        Value::Array(self.automatic.iter().map(rule_json).collect())
    }

    pub fn rules_from_json(v: &Value) -> Vec<RetryRule> {
        let raw: Vec<RawRule> = serde_json::from_value(v.clone()).unwrap_or_default();
        RetryPolicy::parse(RawRetry {
            automatic: raw,
            manual: None,
        })
        .map(|p| p.automatic)
        .unwrap_or_default()
    }
}

fn rule_json(r: &RetryRule) -> Value {
    let exit_status = match r.exit_status {
        ExitMatch::Any => Value::String("*".into()),
        ExitMatch::Status(s) => Value::from(s),
    };
    serde_json::json!({"exit_status": exit_status, "limit": r.limit})
}

fn bad_exit_status() -> InputError {
    InputError::new(
        "jobs[].retry.automatic[].exit_status",
        "must be an integer exit status or \"*\"",
    )
}

/// The rule that retries a job that failed with `exit_status`, given how many retries
/// each rule already made (`counts`, by rule; missing = 0): the first rule that matches
/// and has retries left. `None`: no retry.
pub fn retry_rule(rules: &[RetryRule], counts: &[i32], exit_status: i32) -> Option<usize> {
    if exit_status == 0 {
        return None;
    }
    rules.iter().enumerate().position(|(i, r)| {
        let matches = match r.exit_status {
            ExitMatch::Any => true,
            ExitMatch::Status(s) => s == exit_status,
        };
        matches && counts.get(i).copied().unwrap_or(0) < i32::from(r.limit)
    })
}

/// The counts a retry made by rule `rule` carries.
pub fn counts_after(rules: &[RetryRule], counts: &[i32], rule: usize) -> Vec<i32> {
    let mut next: Vec<i32> = (0..rules.len())
        .map(|i| counts.get(i).copied().unwrap_or(0))
        .collect();
    if let Some(c) = next.get_mut(rule) {
        *c += 1;
    }
    next
}

/// `timeout_s` as a client sends it: 1 to 86400.
pub fn parse_timeout(raw: Option<i64>) -> Result<Option<i32>, InputError> {
    match raw {
        None => Ok(None),
        Some(t) if (1..=MAX_TIMEOUT_S).contains(&t) => Ok(Some(t as i32)),
        Some(_) => Err(InputError::new(
            "jobs[].timeout_s",
            format!("must be an integer from 1 to {MAX_TIMEOUT_S}"),
        )),
    }
}

/// Exit status of a job whose agent was lost, or whose cancel outlived its grace.
pub const EXIT_LOST: i32 = -1;
/// Exit status of a job that ran longer than its `timeout_s`.
pub const EXIT_TIMED_OUT: i32 = -2;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(v: Value) -> Result<RetryPolicy, InputError> {
        RetryPolicy::parse(serde_json::from_value(v).expect("shape"))
    }

    #[test]
    fn rules_validate() {
        assert!(policy(json!({"automatic": [{"exit_status": -1, "limit": 2}]})).is_ok());
        assert!(policy(json!({"automatic": [{"exit_status": "*", "limit": 10}]})).is_ok());
        assert!(policy(json!({"automatic": [{"exit_status": "x", "limit": 1}]})).is_err());
        assert!(policy(json!({"automatic": [{"exit_status": 1.5, "limit": 1}]})).is_err());
        assert!(policy(json!({"automatic": [{"exit_status": 1, "limit": 0}]})).is_err());
        assert!(policy(json!({"automatic": [{"exit_status": 1, "limit": 11}]})).is_err());
        assert!(!policy(json!({"manual": false})).expect("ok").manual);
        assert!(policy(json!({})).expect("ok").manual);
    }

    #[test]
    fn the_first_matching_rule_with_retries_left_retries() {
        let p = policy(json!({"automatic": [
            {"exit_status": -1, "limit": 2}, {"exit_status": "*", "limit": 1}]}))
        .expect("ok");
        let r = &p.automatic;
        assert_eq!(retry_rule(r, &[], -1), Some(0));
        assert_eq!(retry_rule(r, &[1], -1), Some(0));
        assert_eq!(retry_rule(r, &[2], -1), Some(1));
        assert_eq!(retry_rule(r, &[2, 1], -1), None);
        assert_eq!(retry_rule(r, &[], 3), Some(1));
        assert_eq!(retry_rule(r, &[], 0), None);
        assert_eq!(counts_after(r, &[2], 1), vec![2, 1]);
        assert_eq!(RetryPolicy::rules_from_json(&p.rules_json()), p.automatic);
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout(None), Ok(None));
        assert_eq!(parse_timeout(Some(1)), Ok(Some(1)));
        assert_eq!(parse_timeout(Some(86_400)), Ok(Some(86_400)));
        assert!(parse_timeout(Some(0)).is_err());
        assert!(parse_timeout(Some(86_401)).is_err());
    }
}
