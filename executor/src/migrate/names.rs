//! Names: classes from runner names, the fleet from the classes, both tag-safe (the
//! `flotilla:class` and `flotilla:fleet` EC2 tag values).

/// A class or fleet name from a runner name: lowercase letters, digits, `-`, `_` and `.`,
/// at most 64 characters (`fallback` when nothing is left).
pub(super) fn tag_safe(name: &str, fallback: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            s.push(c);
        } else if !s.is_empty() && !s.ends_with('-') {
            s.push('-');
        }
    }
    s.truncate(64);
    let s = s.trim_end_matches('-');
    if s.is_empty() {
        fallback.to_owned()
    } else {
        s.to_owned()
    }
}

pub(super) fn unique(name: &str, taken: &[&str]) -> String {
    if !taken.contains(&name) {
        return name.to_owned();
    }
    (2..)
        .map(|n| format!("{}-{n}", &name[..name.len().min(60)]))
        .find(|c| !taken.contains(&c.as_str()))
        .unwrap_or_else(|| name.to_owned())
}

/// The names' common prefix, cut at a separator (`ci-small`, `ci-large` -> `ci`); for one
/// name, the name.
pub(super) fn common_prefix(names: &[&str]) -> Option<String> {
    let first = *names.first()?;
    if names.len() == 1 {
        return Some(first.to_owned());
    }
    let mut len = first.len();
    for n in &names[1..] {
        len = len.min(
            first
                .bytes()
                .zip(n.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    let prefix = &first[..len];
    let cut = if names.iter().all(|n| n.len() == len) {
        prefix
    } else {
        prefix.rfind(['-', '_', '.']).map_or("", |i| &prefix[..i])
    };
    let cut = cut.trim_end_matches(['-', '_', '.']);
    (!cut.is_empty()).then(|| cut.to_owned())
}

/// What `flotilla.toml` accepts as a fleet name: 1-64 letters, digits, `-`, `_` or `.`.
pub(super) fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_tag_safe() {
        assert_eq!(
            tag_safe("Autoscale Runner (on-demand)", "x"),
            "autoscale-runner-on-demand"
        );
        assert_eq!(tag_safe("!!!", "runner-0"), "runner-0");
        assert_eq!(unique("a", &["a", "a-2"]), "a-3");
        assert_eq!(
            common_prefix(&["ci-small", "ci-large"]).as_deref(),
            Some("ci")
        );
        assert_eq!(common_prefix(&["alpha", "beta"]), None);
        assert_eq!(common_prefix(&["ci-a", "ci-a"]).as_deref(), Some("ci-a"));
        assert!(is_valid("ci-prod") && !is_valid("ci prod"));
    }
}
