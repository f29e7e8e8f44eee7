//! Image allow-lists (`allowed_images`, `allowed_services`, `allowed_privileged_*`) with
//! the glob semantics of gitlab-runner's docker executor (doublestar): `*` and `?` stay
//! within one `/`-separated segment, `**` crosses segments, `[a-z]` / `[!a]` classes and
//! `{a,b}` alternatives. Pure.

/// Whether `name` matches `pattern`.
pub fn matches(pattern: &str, name: &str) -> bool {
    let name: Vec<char> = name.chars().collect();
    expand_braces(pattern)
        .iter()
        .any(|p| match_here(&p.chars().collect::<Vec<_>>(), &name))
}

/// gitlab-runner's rule: an empty list allows everything; otherwise one pattern must match.
pub fn allowed(patterns: &[String], name: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| matches(p, name))
}

/// `{a,b}` alternatives, expanded into plain patterns (nested braces included).
fn expand_braces(pattern: &str) -> Vec<String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut depth = 0;
    let mut open = None;
    let mut splits = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 1,
            '{' => {
                if depth == 0 {
                    open = Some(i);
                    splits.clear();
                }
                depth += 1;
            }
            ',' if depth == 1 => splits.push(i),
            '}' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    let Some(start) = open else { break };
                    let prefix: String = chars[..start].iter().collect();
                    let suffix: String = chars[i + 1..].iter().collect();
                    let mut bounds = vec![start];
                    bounds.extend(&splits);
                    bounds.push(i);
                    let mut out = Vec::new();
                    for w in bounds.windows(2) {
                        let alt: String = chars[w[0] + 1..w[1]].iter().collect();
                        for tail in expand_braces(&format!("{alt}{suffix}")) {
                            out.push(format!("{prefix}{tail}"));
                        }
                    }
                    return out;
                }
            }
            _ => {}
        }
        i += 1;
    }
    vec![pattern.to_owned()]
}

fn match_here(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') if p.get(1) == Some(&'*') => {
            let rest = &p[2..];
            // `**/` also matches no directory at all.
            if rest.first() == Some(&'/') && match_here(&rest[1..], n) {
                return true;
            }
            (0..=n.len()).any(|k| match_here(rest, &n[k..]))
        }
        Some('*') => {
            let rest = &p[1..];
            for k in 0..=n.len() {
                if match_here(rest, &n[k..]) {
                    return true;
                }
                if n.get(k) == Some(&'/') {
                    break;
                }
            }
            false
        }
        Some('?') => n.first().is_some_and(|c| *c != '/') && match_here(&p[1..], &n[1..]),
        Some('[') => match class(&p[1..], n.first().copied()) {
            Some((true, used)) => match_here(&p[1 + used..], &n[1..]),
            Some((false, _)) => false,
            // An unclosed `[` is a literal.
            None => n.first() == Some(&'[') && match_here(&p[1..], &n[1..]),
        },
        Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && match_here(&p[2..], &n[1..]),
        Some(c) => n.first() == Some(c) && match_here(&p[1..], &n[1..]),
    }
}

/// Matches `c` against the class starting after `[`; returns (matched, chars used
/// including the closing `]`), or `None` when the class is not closed.
fn class(p: &[char], c: Option<char>) -> Option<(bool, usize)> {
    let close = p.iter().skip(1).position(|x| *x == ']')? + 1;
    let body = &p[..close];
    let Some(c) = c.filter(|c| *c != '/') else {
        return Some((false, close + 1));
    };
    let (negate, body) = match body.first() {
        Some('!') | Some('^') => (true, &body[1..]),
        _ => (false, body),
    };
    let mut hit = false;
    let mut i = 0;
    while i < body.len() {
        if i + 2 < body.len() && body[i + 1] == '-' {
            hit |= body[i] <= c && c <= body[i + 2];
            i += 3;
        } else {
            hit |= body[i] == c;
            i += 1;
        }
    }
    Some((hit != negate, close + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_stays_within_a_segment_and_double_star_crosses() {
        assert!(matches("docker:*", "docker:27-dind"));
        assert!(matches("docker:*-dind", "docker:27-dind"));
        assert!(!matches(
            "registry.example.com/*",
            "registry.example.com/a/b:1"
        ));
        assert!(matches(
            "registry.example.com/**",
            "registry.example.com/a/b:1"
        ));
        assert!(matches("**/ruby:*", "registry.example.com/lib/ruby:3.3"));
        assert!(matches("**/ruby:*", "ruby:3.3"));
        assert!(!matches("ruby:*", "evil/ruby:3.3"));
        assert!(matches("**/*", "alpine:3"));
        assert!(!matches("alpine", "alpine:3"));
    }

    #[test]
    fn classes_alternatives_and_escapes() {
        assert!(matches("postgres:1[3-6]", "postgres:15"));
        assert!(!matches("postgres:1[!3-6]", "postgres:15"));
        assert!(matches("{redis,postgres}:*", "redis:7"));
        assert!(matches("{redis,postgres}:*", "postgres:16"));
        assert!(!matches("{redis,postgres}:*", "mysql:8"));
        assert!(matches("a\\*b", "a*b"));
        assert!(!matches("a\\*b", "axb"));
        assert!(matches("img?", "img1"));
        assert!(!matches("img?", "img/"));
    }

    #[test]
    fn an_empty_list_allows_everything() {
        assert!(allowed(&[], "anything/at:all"));
        let list = vec!["alpine:*".to_string(), "docker:*".to_string()];
        assert!(allowed(&list, "docker:dind"));
        assert!(!allowed(&list, "ubuntu:24.04"));
    }
}
