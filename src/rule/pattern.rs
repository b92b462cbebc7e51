//! Client and resource patterns: `"*"`, a prefix glob `"team-*"`, or an exact
//! string, and the specificity order that decides which rule wins.
//!
//! Owns parsing and matching only; the rule table that uses it lives in the
//! daemon. No allocation when matching.

use std::cmp::Ordering;
use std::fmt;

/// Longest client id, resource name or pattern accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 512;

/// A parsed client or resource pattern.
///
/// ```
/// use rld::rule::Pattern;
/// let p = Pattern::parse("team-*").unwrap();
/// assert!(p.matches("team-a"));
/// assert!(!p.matches("teams"));
/// assert!(Pattern::parse("a*b").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `*`: matches everything.
    Any,
    /// `abc*`: matches every string starting with `abc` (including `abc`).
    Prefix(Box<str>),
    /// `abc`: matches only `abc`.
    Exact(Box<str>),
}

/// Why a pattern was rejected. The message names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("is empty; use \"*\" to match everything")]
    Empty,
    #[error("is {0} bytes long; the maximum is {MAX_NAME_BYTES} bytes")]
    TooLong(usize),
    #[error(
        "has a '*' that is not at the end; only a trailing '*' (prefix match) or \"*\" alone is supported"
    )]
    InnerWildcard,
}

impl Pattern {
    /// Parses `"*"`, `"prefix*"` or an exact string.
    ///
    /// # Errors
    /// Empty patterns, patterns longer than [`MAX_NAME_BYTES`] and patterns with a
    /// `*` anywhere but the end.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > MAX_NAME_BYTES {
            return Err(PatternError::TooLong(text.len()));
        }
        let (body, glob) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.contains('*') {
            return Err(PatternError::InnerWildcard);
        }
        Ok(match (glob, body.is_empty()) {
            (true, true) => Pattern::Any,
            (true, false) => Pattern::Prefix(body.into()),
            (false, _) => Pattern::Exact(body.into()),
        })
    }

    /// Whether `name` matches this pattern.
    #[inline]
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(prefix) => name.starts_with(&**prefix),
            Pattern::Exact(exact) => name == &**exact,
        }
    }

    /// How specific the pattern is: exact beats prefix beats `*`, and a longer
    /// prefix beats a shorter one. Two different patterns of equal specificity
    /// never match the same name, which is why only identical patterns can tie.
    pub fn specificity(&self) -> Specificity {
        match self {
            Pattern::Any => Specificity(0, 0),
            Pattern::Prefix(p) => Specificity(1, p.len()),
            Pattern::Exact(e) => Specificity(2, e.len()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Exact(e) => f.write_str(e),
        }
    }
}

/// Ordering key of a pattern: (kind, length). Larger is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity(u8, usize);

/// Orders two (client, resource) pattern pairs by precedence: the client pattern
/// decides first, the resource pattern breaks ties. `Greater` wins.
pub fn precedence(a: (&Pattern, &Pattern), b: (&Pattern, &Pattern)) -> Ordering {
    a.0.specificity()
        .cmp(&b.0.specificity())
        .then_with(|| a.1.specificity().cmp(&b.1.specificity()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds() {
        assert_eq!(Pattern::parse("*").unwrap(), Pattern::Any);
        assert_eq!(Pattern::parse("ab*").unwrap(), Pattern::Prefix("ab".into()));
        assert_eq!(Pattern::parse("ab").unwrap(), Pattern::Exact("ab".into()));
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("*a"), Err(PatternError::InnerWildcard));
        assert_eq!(Pattern::parse("a**"), Err(PatternError::InnerWildcard));
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            Pattern::parse(&long),
            Err(PatternError::TooLong(MAX_NAME_BYTES + 1))
        );
    }

    #[test]
    fn unicode_prefixes_match_on_bytes() {
        let p = Pattern::parse("é*").unwrap();
        assert!(p.matches("été"));
        assert!(!p.matches("e"));
    }

    #[test]
    fn exact_beats_prefix_beats_any_and_client_decides_first() {
        let any = Pattern::Any;
        let pre = Pattern::parse("a*").unwrap();
        let longer = Pattern::parse("ab*").unwrap();
        let exact = Pattern::parse("abc").unwrap();
        assert!(exact.specificity() > longer.specificity());
        assert!(longer.specificity() > pre.specificity());
        assert!(pre.specificity() > any.specificity());
        // A precise client with `*` resource beats `*` client with a precise resource.
        assert_eq!(
            precedence((&exact, &any), (&any, &exact)),
            Ordering::Greater
        );
        assert_eq!(precedence((&pre, &exact), (&pre, &any)), Ordering::Greater);
    }
}
