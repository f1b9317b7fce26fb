//! Newtypes that parse and validate input at the edge. Once built, they are valid.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InputError {
    pub field: String,
    pub reason: String,
}

impl InputError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        InputError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

macro_rules! newtype {
    ($name:ident) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

newtype!(Slug);
newtype!(CommitSha);
newtype!(JobKey);
newtype!(QueueName);
newtype!(Branch);

fn charset_ok(s: &str, extra: &[char]) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

impl Slug {
    /// Lower-case letters, digits and dashes; 1 to 64 characters; starts with a letter or digit.
    pub fn parse(field: &str, s: &str) -> Result<Self, InputError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if ok {
            Ok(Slug(s.to_owned()))
        } else {
            Err(InputError::new(
                field,
                "must be 1-64 lower-case letters, digits or dashes, starting with a letter or digit",
            ))
        }
    }
}

impl CommitSha {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        if s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(CommitSha(s.to_ascii_lowercase()))
        } else {
            Err(InputError::new(
                "commit",
                "must be 40 hexadecimal characters",
            ))
        }
    }
}

impl JobKey {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        if !s.is_empty() && s.len() <= 100 && charset_ok(s, &['-', '_', '.', ':']) {
            Ok(JobKey(s.to_owned()))
        } else {
            Err(InputError::new(
                "jobs[].key",
                format!(
                    "`{}` must be 1-100 letters, digits, `-`, `_`, `.` or `:`",
                    truncate(s)
                ),
            ))
        }
    }
}

impl QueueName {
    pub fn parse(field: &str, s: &str) -> Result<Self, InputError> {
        if !s.is_empty() && s.len() <= 64 && charset_ok(s, &['-', '_', '.', ':']) {
            Ok(QueueName(s.to_owned()))
        } else {
            Err(InputError::new(
                field,
                "must be 1-64 letters, digits, `-`, `_`, `.` or `:`",
            ))
        }
    }
}

impl Branch {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        if !s.is_empty() && s.chars().count() <= 255 && !s.chars().any(char::is_control) {
            Ok(Branch(s.to_owned()))
        } else {
            Err(InputError::new(
                "branch",
                "must be 1-255 characters without control characters",
            ))
        }
    }
}

// Limits count characters (Unicode scalar values), as JSON Schema's `maxLength` does,
// so a request the OpenAPI description allows is one the server accepts.

/// Most characters a job's `command` may have.
pub const MAX_COMMAND_CHARS: usize = 64 * 1024;
/// Most characters a job's `label` may have.
pub const MAX_LABEL_CHARS: usize = 255;
/// Most variables in a job's `env`.
pub const MAX_ENV_VARS: usize = 100;
/// Most characters of an env variable's name.
pub const MAX_ENV_NAME_CHARS: usize = 255;
/// Most characters of a job's whole `env`, names and values together.
pub const MAX_ENV_CHARS: usize = 32 * 1024;
/// Most characters of a build's `message`.
pub const MAX_MESSAGE_CHARS: usize = 10_000;

/// Free text that PostgreSQL can store: no NUL (which `text` and `jsonb` refuse), at
/// most `max` characters. Other control characters (newlines, tabs) are fine here.
pub fn text(field: &str, s: &str, max: usize) -> Result<(), InputError> {
    if s.contains('\0') {
        return Err(InputError::new(field, "must not contain NUL characters"));
    }
    if s.chars().count() > max {
        return Err(InputError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

/// One line of printable text (names, tokens, URLs): 1 to `max` characters, no control
/// characters at all.
pub fn line(field: &str, s: &str, max: usize) -> Result<(), InputError> {
    if s.is_empty() || s.chars().count() > max || s.chars().any(char::is_control) {
        return Err(InputError::new(
            field,
            format!("must be 1-{max} characters without control characters"),
        ));
    }
    Ok(())
}

/// A note a person writes (an operator's `reason`): trimmed, then 1 to `max`
/// characters with at least one that is not white space, and no NUL. Returns the
/// trimmed text, which is what gets stored.
pub fn note<'a>(field: &str, s: &'a str, max: usize) -> Result<&'a str, InputError> {
    let s = s.trim();
    if s.contains('\0') {
        return Err(InputError::new(field, "must not contain NUL characters"));
    }
    if s.is_empty() || s.chars().count() > max {
        return Err(InputError::new(
            field,
            format!("say why, in 1-{max} characters that are not all white space"),
        ));
    }
    Ok(s)
}

/// A job's free-form fields: `command`, `label` and `env`.
pub fn job_text(
    command: &str,
    label: Option<&str>,
    env: &std::collections::HashMap<String, String>,
) -> Result<(), InputError> {
    text("jobs[].command", command, MAX_COMMAND_CHARS)?;
    if let Some(label) = label {
        text("jobs[].label", label, MAX_LABEL_CHARS)?;
    }
    if env.len() > MAX_ENV_VARS {
        return Err(InputError::new(
            "jobs[].env",
            format!("must have at most {MAX_ENV_VARS} variables"),
        ));
    }
    let mut total = 0;
    for (name, value) in env {
        if name.is_empty()
            || name.chars().count() > MAX_ENV_NAME_CHARS
            || name.contains('=')
            || name.chars().any(char::is_control)
        {
            return Err(InputError::new(
                "jobs[].env",
                format!(
                    "variable names must be 1-{MAX_ENV_NAME_CHARS} characters without `=` or control characters"
                ),
            ));
        }
        text("jobs[].env", value, MAX_ENV_CHARS)?;
        total += name.chars().count() + value.chars().count();
    }
    if total > MAX_ENV_CHARS {
        return Err(InputError::new(
            "jobs[].env",
            format!("names and values must total at most {MAX_ENV_CHARS} characters"),
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// `owner/name`, as GitHub spells a repository.
pub fn parse_repository(s: &str) -> Result<String, InputError> {
    let mut parts = s.split('/');
    let ok = match (parts.next(), parts.next(), parts.next()) {
        (Some(owner), Some(name), None) => {
            !owner.is_empty()
                && !name.is_empty()
                && s.len() <= 200
                && charset_ok(owner, &['-', '_', '.'])
                && charset_ok(name, &['-', '_', '.'])
        }
        _ => false,
    };
    if ok {
        Ok(s.to_owned())
    } else {
        Err(InputError::new("repository", "must be `owner/name`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_trimmed_and_counted_in_characters() {
        assert_eq!(note("reason", "  deploy  ", 1000).ok(), Some("deploy"));
        for blank in ["", " ", "\u{b}", "\t\n", "\u{a0}", "\u{3000}"] {
            assert!(note("reason", blank, 1000).is_err(), "{blank:?}");
        }
        assert!(note("reason", "a\0b", 1000).is_err());
        // 1000 characters of three bytes each is within a 1000-character limit.
        assert!(note("reason", &"\u{20ac}".repeat(1000), 1000).is_ok());
        assert!(note("reason", &"a".repeat(1001), 1000).is_err());
    }

    #[test]
    fn a_branch_is_limited_in_characters() {
        assert!(Branch::parse(&"\u{e9}".repeat(255)).is_ok());
        assert!(Branch::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn slugs() {
        assert!(Slug::parse("slug", "acme-1").is_ok());
        assert!(Slug::parse("slug", "").is_err());
        assert!(Slug::parse("slug", "-acme").is_err());
        assert!(Slug::parse("slug", "Acme").is_err());
        assert!(Slug::parse("slug", &"a".repeat(65)).is_err());
    }

    #[test]
    fn commits() {
        let sha = "ABCDEF0123456789abcdef0123456789abcdef01";
        assert_eq!(
            CommitSha::parse(sha).map(|c| c.into_inner()),
            Ok(sha.to_ascii_lowercase())
        );
        assert!(CommitSha::parse("abc").is_err());
        assert!(CommitSha::parse(&"g".repeat(40)).is_err());
    }

    #[test]
    fn keys_queues_branches_repositories() {
        assert!(JobKey::parse("test:unit-1").is_ok());
        assert!(JobKey::parse("has space").is_err());
        assert!(QueueName::parse("queue", "default").is_ok());
        assert!(QueueName::parse("queue", "").is_err());
        assert!(Branch::parse("feature/x").is_ok());
        assert!(Branch::parse("a\nb").is_err());
        assert!(parse_repository("acme/web").is_ok());
        assert!(parse_repository("acme").is_err());
        assert!(parse_repository("a/b/c").is_err());
        assert!(Branch::parse("a\0b").is_err());
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert!(text("message", "a\nb", 10).is_ok());
        assert!(text("message", "a\0b", 10).is_err());
        assert!(text("message", "abc", 2).is_err());
        assert!(line("token", "abc", 10).is_ok());
        assert!(line("token", "a\0", 10).is_err());
        assert!(line("token", "", 10).is_err());
        let env = |k: &str, v: &str| [(k.to_owned(), v.to_owned())].into();
        assert!(job_text("make", Some("x"), &env("A", "1")).is_ok());
        assert!(job_text("ma\0ke", None, &env("A", "1")).is_err());
        assert!(job_text("make", Some("\0"), &env("A", "1")).is_err());
        assert!(job_text("make", None, &env("A\0", "1")).is_err());
        assert!(job_text("make", None, &env("A", "\0")).is_err());
        assert!(job_text("make", None, &env("", "1")).is_err());
        assert!(job_text("make", None, &env("A", &"x".repeat(MAX_ENV_CHARS))).is_err());
    }
}
