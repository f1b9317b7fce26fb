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
        if !s.is_empty() && s.len() <= 255 && !s.chars().any(char::is_control) {
            Ok(Branch(s.to_owned()))
        } else {
            Err(InputError::new(
                "branch",
                "must be 1-255 characters without control characters",
            ))
        }
    }
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
    }
}
