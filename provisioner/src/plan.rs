//! Plans: the list of changes computed from what AWS says before anything is written,
//! printed before `apply` or `destroy` act, and the run mode that decides whether a
//! resource module only records a change (plan) or also makes it (apply).
//!
//! The mode is not a boolean the resource modules consult: recording a change in apply
//! mode hands back a [`Go`], and every AWS write call takes one (`Aws::write`). A module
//! cannot write what it did not record, and in plan mode it has nothing to write with.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// What one step would do to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Action {
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
pub(crate) struct Change {
    action: Action,
    kind: String,
    name: String,
    detail: String,
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

/// Whether a pass only looks (plan) or also acts (apply, destroy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plan,
    Apply,
}

/// Proof that a change was recorded in apply mode: the only way to make an AWS write
/// call. Minted by [`Plan::change`] alone, never in plan mode.
#[derive(Debug, Clone, Copy)]
#[must_use = "a recorded change is made with this"]
pub(crate) struct Go {
    _private: (),
}

/// Changes recorded during one pass, plus notes (things skipped, with the reason).
#[derive(Debug)]
pub struct Plan {
    mode: Mode,
    changes: Mutex<Vec<Change>>,
    notes: Mutex<Vec<String>>,
}

/// A poisoned lock only means another thread panicked mid-push; the list is still whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Plan {
    pub(crate) fn new(mode: Mode) -> Self {
        Self {
            mode,
            changes: Mutex::default(),
            notes: Mutex::default(),
        }
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// Records a change; in apply mode also announces it and returns the [`Go`] to make
    /// it with.
    pub(crate) fn change(
        &self,
        action: Action,
        kind: &str,
        name: &str,
        detail: impl Into<String>,
    ) -> Option<Go> {
        let detail = detail.into();
        if self.mode == Mode::Apply {
            let verb = match action {
                Action::Create => "creating",
                Action::Update => "updating",
                Action::Replace => "replacing",
                Action::Delete => "deleting",
            };
            if detail.is_empty() {
                tracing::info!("{verb} {kind} {name}");
            } else {
                tracing::info!("{verb} {kind} {name} ({detail})");
            }
        }
        lock(&self.changes).push(Change {
            action,
            kind: kind.to_owned(),
            name: name.to_owned(),
            detail,
        });
        (self.mode == Mode::Apply).then_some(Go { _private: () })
    }

    pub(crate) fn note(&self, note: impl Into<String>) {
        lock(&self.notes).push(note.into());
    }

    pub(crate) fn changes(&self) -> Vec<Change> {
        lock(&self.changes).clone()
    }

    fn notes(&self) -> Vec<String> {
        lock(&self.notes).clone()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.changes).is_empty()
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
        let p = Plan::new(Mode::Plan);
        assert!(p
            .change(Action::Create, "ec2:vpc", "vpc", "10.0.0.0/16")
            .is_none());
        assert!(p
            .change(Action::Delete, "ec2:instance", "host/1", "")
            .is_none());
        let text = p.render("Plan");
        assert!(text.starts_with("Plan: 1 to create, 0 to update, 0 to replace, 1 to delete"));
        assert!(text.contains("+ ec2:vpc"), "{text}");
        assert!(text.contains("(10.0.0.0/16)"), "{text}");
        assert!(Plan::new(Mode::Plan)
            .render("Plan")
            .contains("nothing to do"));
    }

    #[test]
    fn only_apply_mode_hands_out_the_right_to_write() {
        let apply = Plan::new(Mode::Apply);
        assert!(apply
            .change(Action::Update, "s3:bucket", "b", "x")
            .is_some());
        assert_eq!(apply.changes().len(), 1, "recorded in both modes");
    }
}
