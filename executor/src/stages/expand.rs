//! `$VAR` / `${VAR}` expansion of image and service names and aliases from the job's
//! variables, as gitlab-runner's `ExpandValue` (Go's `os.Expand`): an unknown variable
//! expands to nothing. Pure.

/// Expands `$NAME` and `${NAME}` in `value` with `lookup`.
pub fn expand<'a>(value: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => {
                    out.push_str(lookup(&braced[..end]).unwrap_or(""));
                    rest = &braced[end + 1..];
                }
                // `${` without `}`: Go drops the bad syntax.
                None => rest = "",
            }
            continue;
        }
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if len == 0 {
            // A lone `$` (or `$` before punctuation) stays as written.
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(lookup(&after[..len]).unwrap_or(""));
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<&'static str> {
        match name {
            "DIND_VERSION" => Some("27"),
            "CI_REGISTRY_IMAGE" => Some("registry.example.com/group/app"),
            "CI_COMMIT_SHA" => Some("abc123"),
            _ => None,
        }
    }

    #[test]
    fn expands_plain_and_braced_names() {
        assert_eq!(
            expand("docker:${DIND_VERSION}-dind", vars),
            "docker:27-dind"
        );
        assert_eq!(
            expand("$CI_REGISTRY_IMAGE:$CI_COMMIT_SHA", vars),
            "registry.example.com/group/app:abc123"
        );
        assert_eq!(expand("img:$UNKNOWN", vars), "img:");
        assert_eq!(expand("no-vars:1", vars), "no-vars:1");
        assert_eq!(expand("cost$", vars), "cost$");
        assert_eq!(expand("a${BROKEN", vars), "a");
    }
}
