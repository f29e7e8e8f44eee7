//! `[oidc]`: GitLab OIDC deploy roles, as the stack file says them, and the checks that
//! keep a role from trusting more than it names. Pure; `oidc` makes them in IAM.
//!
//! A role's trust rests on its `subjects` alone (IAM's `StringLike` on the token's `sub`
//! claim), so a subject must name the project path, the ref type and the ref, and a
//! wildcard may stand only where it cannot reach across them: a whole last segment of
//! the path under a literal top-level group (`group/*`), or inside the ref (`release/*`).
//! GitLab paths and git refs never contain `:`, which is what makes a `*` unable to eat
//! into the next field.

use serde::{Deserialize, Serialize};

/// The stack file's `[oidc]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Oidc {
    /// Create the IAM OIDC provider for GitLab (true), or use one that exists
    /// (`provider_arn`).
    #[serde(default = "yes")]
    pub(crate) provider: bool,
    /// The existing provider, with `provider = false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) provider_arn: Option<String>,
    /// The tokens' issuer (`iss`), when it is not `gitlab.url` (GitLab's external URL
    /// behind another name); https:// only, as IAM requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) issuer: Option<String>,
    /// The `aud` the jobs ask for in `id_tokens`; `gitlab.url` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) audience: Option<String>,
    #[serde(default)]
    pub(crate) roles: Vec<DeployRole>,
}

fn yes() -> bool {
    true
}

/// One `[[oidc.roles]]`: who may assume it and which bucket prefix it writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeployRole {
    /// Lower-case letters, digits and '-'; the IAM role is `flotilla-<stack>-<name>`.
    pub(crate) name: String,
    /// GitLab `sub` claims allowed to assume it:
    /// `project_path:<group>/<project>:ref_type:<branch|tag>:ref:<ref>`.
    pub(crate) subjects: Vec<String>,
    /// The bucket the role writes to.
    pub(crate) bucket: String,
    /// The key prefix it writes under (no leading or trailing '/').
    pub(crate) prefix: String,
}

/// A broken rule: the key as written in the stack file and what was expected.
pub(crate) type Problem = (String, String);

fn problem<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, Problem> {
    Err((key.into(), message.into()))
}

/// IAM's limit on a role name.
const MAX_ROLE_NAME: usize = 64;

impl Oidc {
    /// The section's rules. `gitlab_url` is `gitlab.url` (the default issuer and
    /// audience); `role_prefix` what role names start with (`flotilla-<stack>-`).
    pub(crate) fn check(&self, gitlab_url: &str, role_prefix: &str) -> Result<(), Problem> {
        match (self.provider, &self.provider_arn) {
            (true, Some(_)) => {
                return problem(
                    "oidc.provider_arn",
                    "only with oidc.provider = false (an existing provider); with \
                     provider = true the stack creates its own",
                )
            }
            (false, None) => {
                return problem(
                    "oidc.provider_arn",
                    "is required with oidc.provider = false: the ARN of the account's \
                     existing OIDC provider for GitLab (arn:aws:iam::<account>:oidc-provider/<host>)",
                )
            }
            (false, Some(arn)) => {
                if provider_host_of_arn(arn).is_none() {
                    return problem(
                        "oidc.provider_arn",
                        format!(
                            "{arn:?} is not an IAM OIDC provider ARN \
                             (arn:aws:iam::<account>:oidc-provider/<host>)"
                        ),
                    );
                }
                if self.issuer.is_some() {
                    return problem(
                        "oidc.issuer",
                        "only with oidc.provider = true (an existing provider has its URL)",
                    );
                }
            }
            (true, None) => {
                let (key, url) = match &self.issuer {
                    Some(i) => ("oidc.issuer", i.as_str()),
                    None => ("gitlab.url", gitlab_url),
                };
                if issuer_host(url).is_none() {
                    return problem(
                        key,
                        format!(
                            "{url:?}: the OIDC provider needs GitLab's https:// URL (IAM \
                             accepts no other); set oidc.issuer to the URL GitLab's tokens \
                             carry as `iss`"
                        ),
                    );
                }
            }
        }
        let audience = self.audience(gitlab_url);
        if audience.is_empty() || audience.len() > 255 || audience.contains(char::is_whitespace) {
            return problem(
                "oidc.audience",
                format!("{audience:?}: 1-255 characters without spaces"),
            );
        }
        if self.roles.is_empty() {
            return problem(
                "oidc.roles",
                "list at least one [[oidc.roles]] (or remove [oidc])",
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, role) in self.roles.iter().enumerate() {
            role.check(&format!("oidc.roles[{i}]"), role_prefix)?;
            if !names.insert(&role.name) {
                return problem(
                    format!("oidc.roles[{i}].name"),
                    format!("{:?} is listed twice", role.name),
                );
            }
        }
        Ok(())
    }

    /// The `aud` the trust policies require.
    pub(crate) fn audience(&self, gitlab_url: &str) -> String {
        self.audience
            .clone()
            .unwrap_or_else(|| gitlab_url.trim_end_matches('/').to_owned())
    }

    /// The issuer's host and path (`gitlab.example.com`), as IAM names the provider and
    /// prefixes its condition keys; `None` if it is not an https:// URL.
    pub(crate) fn provider_host(&self, gitlab_url: &str) -> Option<String> {
        match (&self.provider_arn, &self.issuer) {
            (Some(arn), _) if !self.provider => provider_host_of_arn(arn),
            (_, Some(issuer)) => issuer_host(issuer),
            _ => issuer_host(gitlab_url),
        }
    }
}

impl DeployRole {
    fn check(&self, key: &str, role_prefix: &str) -> Result<(), Problem> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok || role_prefix.len() + self.name.len() > MAX_ROLE_NAME {
            return problem(
                format!("{key}.name"),
                format!(
                    "{:?}: lower-case letters, digits and '-', at most {} characters (the \
                     IAM role is {role_prefix}<name>, at most {MAX_ROLE_NAME})",
                    self.name,
                    MAX_ROLE_NAME.saturating_sub(role_prefix.len())
                ),
            );
        }
        if self.subjects.is_empty() {
            return problem(
                format!("{key}.subjects"),
                "list at least one GitLab subject \
                 (project_path:<group>/<project>:ref_type:branch:ref:<branch>)",
            );
        }
        for (j, s) in self.subjects.iter().enumerate() {
            check_subject(s).map_err(|m| (format!("{key}.subjects[{j}]"), m))?;
        }
        if !is_bucket_name(&self.bucket) {
            return problem(
                format!("{key}.bucket"),
                format!("{:?} is not an S3 bucket name", self.bucket),
            );
        }
        let prefix_ok = !self.prefix.is_empty()
            && !self.prefix.starts_with('/')
            && !self.prefix.ends_with('/')
            && !self.prefix.contains("//")
            && self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !prefix_ok {
            return problem(
                format!("{key}.prefix"),
                format!(
                    "{:?}: a key prefix like \"site/main\" (letters, digits, '-', '_', '.', \
                     '/'; no wildcards, no leading or trailing '/'); the role writes under \
                     <prefix>/ only",
                    self.prefix
                ),
            );
        }
        Ok(())
    }
}

/// Checks one `sub` pattern; the message says what was expected.
pub(crate) fn check_subject(s: &str) -> Result<(), String> {
    let expected = "expected project_path:<group>/<project>:ref_type:<branch|tag>:ref:<ref> \
                    (GitLab's sub claim; '*' only as the last path segment or inside the ref)";
    if s.trim() == "*" {
        return Err(format!(
            "{s:?} would let every project of every GitLab that IAM trusts assume the role: {expected}"
        ));
    }
    let fields: Vec<&str> = s.split(':').collect();
    let ["project_path", path, "ref_type", ref_type, "ref", git_ref] = fields[..] else {
        return Err(format!("{s:?}: {expected}"));
    };
    let segments: Vec<&str> = path.split('/').collect();
    let plain = |seg: &str| {
        !seg.is_empty()
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let last = segments.len() - 1;
    let path_ok = segments.len() >= 2
        && segments
            .iter()
            .enumerate()
            .all(|(i, seg)| plain(seg) || (i == last && i > 0 && *seg == "*"));
    if !path_ok {
        return Err(format!(
            "{s:?}: the project path {path:?} must be <group>/<project> with a literal \
             group ('*' allowed only as a whole last segment, group/*): {expected}"
        ));
    }
    if !matches!(ref_type, "branch" | "tag") {
        return Err(format!(
            "{s:?}: ref_type {ref_type:?} must be branch or tag: {expected}"
        ));
    }
    let ref_ok = !git_ref.is_empty()
        && git_ref
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '*'));
    if !ref_ok {
        return Err(format!(
            "{s:?}: the ref {git_ref:?} must be a branch or tag name ('*' allowed): {expected}"
        ));
    }
    Ok(())
}

/// `https://host[/path]` without a trailing '/', as IAM names a provider: `host[/path]`.
fn issuer_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?.trim_end_matches('/');
    let host = rest.split('/').next()?;
    let ok = !host.is_empty()
        && !rest.contains(['?', '#', '@', ' ', '"', '\''])
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
    ok.then(|| rest.to_owned())
}

/// `arn:<partition>:iam::<account>:oidc-provider/<host>` → `<host>`.
fn provider_host_of_arn(arn: &str) -> Option<String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    match parts[..] {
        ["arn", partition, "iam", "", account, resource]
            if !partition.is_empty()
                && account.len() == 12
                && account.chars().all(|c| c.is_ascii_digit()) =>
        {
            resource
                .strip_prefix("oidc-provider/")
                .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
                .map(str::to_owned)
        }
        _ => None,
    }
}

/// S3's bucket naming rules (3-63 lower-case letters, digits, '-', '.').
fn is_bucket_name(name: &str) -> bool {
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = name
        .chars()
        .next()
        .zip(name.chars().last())
        .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
    (3..=63).contains(&name.len()) && chars_ok && ends_ok && !name.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GITLAB: &str = "https://gitlab.example.com/";

    fn section(text: &str) -> Oidc {
        toml::from_str(text).unwrap()
    }

    const GOOD: &str = r#"
[[roles]]
name = "site"
subjects = ["project_path:web/site:ref_type:branch:ref:main"]
bucket = "example-site"
prefix = "www"
"#;

    #[test]
    fn defaults_create_the_provider_for_the_gitlab_url() {
        let o = section(GOOD);
        o.check(GITLAB, "flotilla-ci-").unwrap();
        assert!(o.provider);
        assert_eq!(o.audience(GITLAB), "https://gitlab.example.com");
        assert_eq!(
            o.provider_host(GITLAB).as_deref(),
            Some("gitlab.example.com")
        );
    }

    #[test]
    fn subjects_must_name_project_ref_type_and_ref() {
        for good in [
            "project_path:web/site:ref_type:branch:ref:main",
            "project_path:web/sub/site:ref_type:tag:ref:v*",
            "project_path:web/*:ref_type:branch:ref:main",
            "project_path:web/site:ref_type:branch:ref:release/*",
        ] {
            check_subject(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "*",
            " * ",
            "project_path:*:ref_type:branch:ref:main",
            "project_path:*/site:ref_type:branch:ref:main",
            "project_path:web:ref_type:branch:ref:main",
            "project_path:web/si*:ref_type:branch:ref:main",
            "project_path:web/site:ref_type:*:ref:main",
            "project_path:web/site:ref_type:branch:ref:",
            "project_path:web/site:ref_type:branch",
            "project_path:web/site:*",
            "project_path:web/site:ref_type:branch:ref:main:extra",
            "project_path:web/site:ref_type:branch:ref:ma in",
            "project_path:web/site:ref_type:branch:ref:${aws:username}",
            "project_path:web/site:ref_type:branch:ref:ma?n",
        ] {
            let e = check_subject(bad).unwrap_err();
            assert!(e.contains("project_path:<group>/<project>"), "{bad}: {e}");
        }
    }

    #[test]
    fn each_problem_names_its_key() {
        let role = |extra: &str| format!("{GOOD}{extra}");
        for (text, key) in [
            (
                GOOD.replace(
                    "[\"project_path:web/site:ref_type:branch:ref:main\"]",
                    "[]",
                ),
                "oidc.roles[0].subjects",
            ),
            (GOOD.replace("ref:main\"]", "ref:main\", \"*\"]"), "oidc.roles[0].subjects[1]"),
            (GOOD.replace("\"www\"", "\"www/\""), "oidc.roles[0].prefix"),
            (GOOD.replace("\"www\"", "\"ww*\""), "oidc.roles[0].prefix"),
            (GOOD.replace("example-site", "Example_Site"), "oidc.roles[0].bucket"),
            (GOOD.replace("\"site\"", "\"Site\""), "oidc.roles[0].name"),
            (GOOD.replace("\"site\"", &format!("\"{}\"", "a".repeat(60))), "oidc.roles[0].name"),
            (role(&GOOD.replace("bucket = \"example-site\"", "bucket = \"other\"")), "oidc.roles[1].name"),
            (format!("provider = false\n{GOOD}"), "oidc.provider_arn"),
            (
                format!("provider_arn = \"arn:aws:iam::123456789012:oidc-provider/g.example.com\"\n{GOOD}"),
                "oidc.provider_arn",
            ),
            (
                format!("provider = false\nprovider_arn = \"arn:aws:iam::1:oidc-provider/g\"\n{GOOD}"),
                "oidc.provider_arn",
            ),
            (format!("issuer = \"http://gitlab.example.com\"\n{GOOD}"), "oidc.issuer"),
            (format!("audience = \"a b\"\n{GOOD}"), "oidc.audience"),
            ("provider = true\n".to_string(), "oidc.roles"),
        ] {
            let e = section(&text).check(GITLAB, "flotilla-ci-").unwrap_err();
            assert_eq!(e.0, key, "{text}: {}", e.1);
        }
        // The provider needs an https:// issuer: a loopback http gitlab.url names itself.
        let e = section(GOOD)
            .check("http://127.0.0.1:8080", "flotilla-ci-")
            .unwrap_err();
        assert_eq!(e.0, "gitlab.url");
        assert!(e.1.contains("oidc.issuer"), "{}", e.1);
    }

    #[test]
    fn an_existing_provider_gives_the_condition_keys_host() {
        let o = section(&format!(
            "provider = false\nprovider_arn = \"arn:aws:iam::123456789012:oidc-provider/gitlab.example.com\"\n{GOOD}"
        ));
        o.check(GITLAB, "flotilla-ci-").unwrap();
        assert_eq!(
            o.provider_host("http://127.0.0.1").as_deref(),
            Some("gitlab.example.com")
        );
        let o = section(&format!("issuer = \"https://git.example.com/gl/\"\n{GOOD}"));
        o.check("http://127.0.0.1", "flotilla-ci-").unwrap();
        assert_eq!(
            o.provider_host("http://127.0.0.1").as_deref(),
            Some("git.example.com/gl")
        );
    }
}
