//! AWS ids as a pass knows them: a real id, or, in plan mode, the placeholder for one
//! that only apply will create. A type rather than a marker string, so that nothing can
//! pass a placeholder to AWS by mistake: a call needs [`Id::known`].

use std::fmt;

/// An AWS id (`vpc-...`, an ARN), or the stand-in for one not created yet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Id {
    Known(String),
    /// Created by apply; holds the stack's logical id (or name) of the resource.
    Pending(String),
}

impl Id {
    pub(crate) fn known(&self) -> Option<&str> {
        match self {
            Self::Known(id) => Some(id),
            Self::Pending(_) => None,
        }
    }

    pub(crate) fn is_pending(&self) -> bool {
        matches!(self, Self::Pending(_))
    }

    pub(crate) fn pending(logical: &str) -> Self {
        Self::Pending(logical.to_owned())
    }

    /// An id AWS returned; `Option` as the SDK's output fields are.
    pub(crate) fn from_aws(id: Option<&str>) -> Self {
        Self::Known(id.unwrap_or_default().to_owned())
    }
}

/// Plan lines and outputs show a placeholder as `(known after apply: <logical id>)`.
impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Known(id) => f.write_str(id),
            Self::Pending(logical) => write!(f, "(known after apply: {logical})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placeholder_prints_as_before_and_is_never_an_id() {
        let p = Id::pending("subnet/private/us-east-1a");
        assert_eq!(
            p.to_string(),
            "(known after apply: subnet/private/us-east-1a)"
        );
        assert_eq!(p.known(), None);
        assert_eq!(Id::Known("vpc-1".into()).known(), Some("vpc-1"));
        assert_eq!(Id::Known("vpc-1".into()).to_string(), "vpc-1");
    }
}
