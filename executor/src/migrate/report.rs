//! The migration report: one line for every docker+machine setting, saying what it became
//! in Flotilla, or that it has no equivalent and what to do instead. Nothing of the input
//! is dropped without a line here. Values of secret settings (runner tokens, AWS keys) are
//! never shown: [`shown`] redacts them.

use std::fmt::Write as _;

/// What happened to one setting. The order is the order of the rendered report: what the
/// operator must act on first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Converted, but Flotilla needs something docker+machine did not (a security group id,
    /// an AMI with Docker): the fleet will not work until it is done.
    Action,
    /// No Flotilla equivalent: not converted; the message says what to do instead.
    Unsupported,
    /// Not a key gitlab-runner or docker-machine knows (a typo?).
    Unknown,
    /// A value Flotilla needs that docker+machine did not have: a documented default.
    Default,
    /// Converted to the Flotilla setting named in the message.
    Converted,
    /// Left as it was in the runner's config.toml.
    Kept,
    /// How a behaviour differs, for information.
    Note,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Action => "action required",
            Self::Unsupported => "no equivalent",
            Self::Unknown => "unknown key",
            Self::Default => "default",
            Self::Converted => "converted",
            Self::Kept => "kept",
            Self::Note => "note",
        }
    }
}

/// One line of the report: where in the input (`at`) and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub at: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    entries: Vec<Entry>,
}

impl Report {
    pub fn push(&mut self, kind: Kind, at: impl Into<String>, message: impl Into<String>) {
        self.entries.push(Entry {
            kind,
            at: at.into(),
            message: message.into(),
        });
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.entries.iter().filter(|e| e.kind == kind).count()
    }

    /// The lines of one kind, as rendered (`<label>: <at>: <message>`).
    pub fn lines(&self, kind: Kind) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(render_entry)
            .collect()
    }

    /// The whole report: `summary`, then one line per entry, the kinds in [`Kind`] order
    /// and the entries of a kind in input order.
    pub fn render(&self, summary: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{summary}");
        let _ = writeln!(
            out,
            "{} action required, {} with no equivalent, {} unknown keys, {} defaults chosen, \
             {} converted, {} kept",
            self.count(Kind::Action),
            self.count(Kind::Unsupported),
            self.count(Kind::Unknown),
            self.count(Kind::Default),
            self.count(Kind::Converted),
            self.count(Kind::Kept),
        );
        let mut entries: Vec<&Entry> = self.entries.iter().collect();
        entries.sort_by_key(|e| e.kind);
        let mut last = None;
        for e in entries {
            if last != Some(e.kind) {
                let _ = writeln!(out);
                last = Some(e.kind);
            }
            let _ = writeln!(out, "{}", render_entry(e));
        }
        out
    }
}

fn render_entry(e: &Entry) -> String {
    format!("{}: {}: {}", e.kind.label(), e.at, e.message)
}

/// True for setting names whose values are credentials: shown as `<redacted>`.
pub fn is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    // IMDS settings, not credentials.
    if n.contains("metadata-token") {
        return false;
    }
    [
        "token",
        "secret",
        "password",
        "passwd",
        "credential",
        "access-key",
        "access_key",
        "accesskey",
        "private-key",
        "private_key",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// `name=value` for the report, the value redacted when the name is a secret's.
pub fn shown(name: &str, value: &str) -> String {
    if is_secret(name) {
        format!("{name}=<redacted>")
    } else {
        format!("{name}={value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_by_name() {
        assert_eq!(
            shown("amazonec2-secret-key", "wJalr"),
            "amazonec2-secret-key=<redacted>"
        );
        assert_eq!(
            shown("amazonec2-access-key", "AKIA"),
            "amazonec2-access-key=<redacted>"
        );
        assert_eq!(shown("token", "glrt-x"), "token=<redacted>");
        assert_eq!(shown("amazonec2-zone", "a"), "amazonec2-zone=a");
        assert_eq!(
            shown("amazonec2-metadata-token", "required"),
            "amazonec2-metadata-token=required"
        );
    }

    #[test]
    fn render_puts_actions_first_and_keeps_input_order_within_a_kind() {
        let mut r = Report::default();
        r.push(Kind::Converted, "a", "one");
        r.push(Kind::Action, "b", "two");
        r.push(Kind::Converted, "c", "three");
        let text = r.render("summary");
        let b = text.find("action required: b: two").unwrap();
        let a = text.find("converted: a: one").unwrap();
        let c = text.find("converted: c: three").unwrap();
        assert!(b < a && a < c, "{text}");
        assert!(text.starts_with("summary\n1 action required"), "{text}");
    }
}
