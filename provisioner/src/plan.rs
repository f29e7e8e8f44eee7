//! Plans: the list of changes computed from what AWS says before anything is written,
//! printed before `apply` or `destroy` act, and the run mode that decides whether a
//! resource module only records a change (plan) or also makes it (apply).

use std::fmt;
use std::sync::Mutex;

/// What one step would do to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Create,
    Update,
    Replace,
    Delete,
}

impl Action {
    fn symbol(self) -> &'static str {
        match self {
            Self::Create => "+",
            Self::Update => "~",
            Self::Replace => "-/+",
            Self::Delete => "-",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Replace => "replace",
            Self::Delete => "delete",
        }
    }
}

/// One change: `kind` is the AWS resource type (`ec2:vpc`), `name` the stack's logical id
/// or the resource's name, `detail` what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub action: Action,
    pub kind: String,
    pub name: String,
    pub detail: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>3} {:<24} {}",
            self.action.symbol(),
            self.kind,
            self.name
        )?;
        if !self.detail.is_empty() {
            write!(f, "  ({})", self.detail)?;
        }
        Ok(())
    }
}

/// Whether the resource modules only look (plan) or also act (apply, destroy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plan,
    Apply,
}

/// The placeholder for an id that only exists after apply.
pub fn pending(logical: &str) -> String {
    format!("(known after apply: {logical})")
}

pub fn is_pending(id: &str) -> bool {
    id.starts_with("(known after apply")
}

/// Changes recorded during one pass, plus notes (things skipped, with the reason).
#[derive(Debug, Default)]
pub struct Plan {
    changes: Mutex<Vec<Change>>,
    notes: Mutex<Vec<String>>,
}

impl Plan {
    pub fn record(&self, action: Action, kind: &str, name: &str, detail: impl Into<String>) {
        let change = Change {
            action,
            kind: kind.to_owned(),
            name: name.to_owned(),
            detail: detail.into(),
        };
        self.changes.lock().unwrap().push(change);
    }

    pub fn note(&self, note: impl Into<String>) {
        self.notes.lock().unwrap().push(note.into());
    }

    pub fn changes(&self) -> Vec<Change> {
        self.changes.lock().unwrap().clone()
    }

    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap().clone()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.lock().unwrap().is_empty()
    }

    /// The plan as printed on stdout.
    pub fn render(&self, title: &str) -> String {
        let changes = self.changes();
        let mut out = String::new();
        let count = |a: Action| changes.iter().filter(|c| c.action == a).count();
        out.push_str(&format!(
            "{title}: {} to create, {} to update, {} to replace, {} to delete\n",
            count(Action::Create),
            count(Action::Update),
            count(Action::Replace),
            count(Action::Delete)
        ));
        for c in &changes {
            out.push_str(&format!("  {c}\n"));
        }
        for n in self.notes() {
            out.push_str(&format!("  note: {n}\n"));
        }
        if changes.is_empty() {
            out.push_str("  nothing to do\n");
        }
        out
    }

    /// One line per action kind, for logs.
    pub fn summary(&self) -> String {
        let changes = self.changes();
        [
            Action::Create,
            Action::Update,
            Action::Replace,
            Action::Delete,
        ]
        .iter()
        .map(|a| {
            format!(
                "{} {}",
                changes.iter().filter(|c| c.action == *a).count(),
                a.verb()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_lines() {
        let p = Plan::default();
        p.record(Action::Create, "ec2:vpc", "vpc", "10.0.0.0/16");
        p.record(Action::Delete, "ec2:instance", "host/1", "");
        let text = p.render("Plan");
        assert!(text.starts_with("Plan: 1 to create, 0 to update, 0 to replace, 1 to delete"));
        assert!(text.contains("+ ec2:vpc"), "{text}");
        assert!(text.contains("(10.0.0.0/16)"), "{text}");
        assert!(Plan::default().render("Plan").contains("nothing to do"));
        assert!(is_pending(&pending("vpc")));
    }
}
