//! Which helper image a job gets. `helper_image` may name `${ARCH}` (the machine's
//! architecture as GitLab names its helper tags: `x86_64`, `arm64`...), and
//! `${CI_RUNNER_VERSION}` / `${CI_RUNNER_REVISION}` (the gitlab-runner running the job,
//! as its docker executor expands them), so one setting serves x86_64 and Graviton
//! classes and follows runner upgrades. The default is GitLab's own helper for the
//! machine's architecture and the runner's version.
//!
//! The runner's version and revision arrive as job variables, which a job can override:
//! only characters a tag may hold are accepted, so a job can pick no other repository or
//! registry than the configured one.

use flotilla_proto::config::DEFAULT_HELPER_IMAGE;

/// Helper tags GitLab publishes, per Go architecture (dockerd's `/version` `Arch`).
const ARCHES: &[(&str, &str)] = &[
    ("amd64", "x86_64"),
    ("arm64", "arm64"),
    ("arm", "arm"),
    ("s390x", "s390x"),
    ("ppc64le", "ppc64le"),
    ("riscv64", "riscv64"),
];

/// The helper version used when the runner does not say its own (never with a real
/// gitlab-runner, which always sets `CI_RUNNER_VERSION`).
const FALLBACK_VERSION: &str = "18.6.0";

/// What the job's environment says of the gitlab-runner running it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Runner<'a> {
    pub(crate) version: Option<&'a str>,
    pub(crate) revision: Option<&'a str>,
}

/// The image to use, and a line for the job log when a fallback was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub(crate) image: String,
    pub(crate) note: Option<String>,
}

/// Why no helper image could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HelperError {
    /// The job's variables (`CI_RUNNER_*` overridden with what no tag can hold).
    #[error("{0}")]
    Job(String),
    /// The machine or the runner.
    #[error("{0}")]
    System(String),
}

/// Whether resolving `template` needs the machine's architecture (one `/version` call).
pub(crate) fn needs_arch(template: &str) -> bool {
    template.contains("${ARCH}")
}

/// GitLab's helper-tag name for a Go architecture; `None` for one GitLab has no helper for.
pub(crate) fn helper_arch(go_arch: &str) -> Option<&'static str> {
    ARCHES
        .iter()
        .find(|(go, _)| *go == go_arch)
        .map(|(_, tag)| *tag)
}

/// Expands the placeholders of `template`. `arch` is the machine's Go architecture
/// (required when the template names `${ARCH}`).
pub(crate) fn resolve(
    template: &str,
    arch: Option<&str>,
    runner: Runner<'_>,
) -> Result<Resolved, HelperError> {
    let mut note = None;
    let mut out = template.to_owned();
    if needs_arch(template) {
        let go = arch.ok_or_else(|| {
            HelperError::System("the machine did not say its architecture".into())
        })?;
        let tag = helper_arch(go).ok_or_else(|| {
            HelperError::System(format!(
                "GitLab publishes no helper image for the machine's architecture {go:?}"
            ))
        })?;
        out = out.replace("${ARCH}", tag);
    }
    let version = runner
        .version
        .map(|v| checked("CI_RUNNER_VERSION", v))
        .transpose()?;
    let revision = runner
        .revision
        .map(|v| checked("CI_RUNNER_REVISION", v))
        .transpose()?;
    // GitLab tags helpers `v<version>` for releases only; a development runner's helper is
    // tagged by revision. The default follows that; an operator's template is taken as is.
    if template == DEFAULT_HELPER_IMAGE {
        match (version, revision) {
            (Some(v), _) if is_release(v) => {}
            (_, Some(rev)) => {
                let short: String = rev.chars().take(8).collect();
                out = out.replace("v${CI_RUNNER_VERSION}", &short);
            }
            _ => {}
        }
    }
    if out.contains("${CI_RUNNER_VERSION}") {
        let v = version.unwrap_or_else(|| {
            note = Some(format!(
                "WARNING: the runner did not set CI_RUNNER_VERSION; using helper version {FALLBACK_VERSION}"
            ));
            FALLBACK_VERSION
        });
        out = out.replace("${CI_RUNNER_VERSION}", v);
    }
    if out.contains("${CI_RUNNER_REVISION}") {
        let rev = revision.ok_or_else(|| {
            HelperError::System(
                "helper_image names ${CI_RUNNER_REVISION}, which the runner did not set".into(),
            )
        })?;
        out = out.replace("${CI_RUNNER_REVISION}", rev);
    }
    Ok(Resolved { image: out, note })
}

/// `18.6.0`, not `18.7.0~pre.42.gabcdef12`.
fn is_release(version: &str) -> bool {
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// A value that can only ever be (part of) a tag: no `/`, `:` or `@` to reach another
/// repository, registry or digest.
fn checked<'a>(name: &str, value: &'a str) -> Result<&'a str, HelperError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-~+".contains(c));
    if ok {
        Ok(value)
    } else {
        Err(HelperError::Job(format!(
            "{name} is not a version a helper image tag can hold (letters, digits and ._-~+ only)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELEASE: Runner<'static> = Runner {
        version: Some("18.6.0"),
        revision: Some("6d9a3d3e9a1b"),
    };

    #[test]
    fn the_default_is_gitlabs_helper_for_the_machines_architecture_and_the_runners_version() {
        let x86 = resolve(DEFAULT_HELPER_IMAGE, Some("amd64"), RELEASE).unwrap();
        assert_eq!(
            x86.image,
            "registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper:x86_64-v18.6.0"
        );
        assert_eq!(x86.note, None);
        let arm = resolve(DEFAULT_HELPER_IMAGE, Some("arm64"), RELEASE).unwrap();
        assert!(arm.image.ends_with(":arm64-v18.6.0"), "{}", arm.image);
    }

    #[test]
    fn a_development_runner_gets_the_helper_of_its_revision() {
        let dev = Runner {
            version: Some("18.7.0~pre.42.g6d9a3d3e"),
            revision: Some("6d9a3d3e9a1b"),
        };
        let r = resolve(DEFAULT_HELPER_IMAGE, Some("arm64"), dev).unwrap();
        assert!(r.image.ends_with(":arm64-6d9a3d3e"), "{}", r.image);
    }

    #[test]
    fn without_a_runner_version_the_pinned_one_is_used_and_said() {
        let r = resolve(DEFAULT_HELPER_IMAGE, Some("amd64"), Runner::default()).unwrap();
        assert!(r.image.ends_with(":x86_64-v18.6.0"), "{}", r.image);
        assert!(r.note.unwrap().contains("CI_RUNNER_VERSION"));
    }

    #[test]
    fn an_operators_template_is_expanded_and_a_fixed_image_left_alone() {
        let t = "registry.example.com/helper:${ARCH}-${CI_RUNNER_REVISION}";
        let r = resolve(t, Some("arm64"), RELEASE).unwrap();
        assert_eq!(r.image, "registry.example.com/helper:arm64-6d9a3d3e9a1b");
        let fixed = "registry.example.com/helper:pinned";
        assert!(!needs_arch(fixed));
        assert_eq!(
            resolve(fixed, None, Runner::default()).unwrap().image,
            fixed
        );
    }

    #[test]
    fn a_job_cannot_steer_the_helper_to_another_repository() {
        for evil in ["1.0@sha256:abc", "x/../../evil", "1:2", ""] {
            let runner = Runner {
                version: Some(evil),
                revision: None,
            };
            let err = resolve(DEFAULT_HELPER_IMAGE, Some("amd64"), runner).unwrap_err();
            assert!(
                matches!(&err, HelperError::Job(m) if m.contains("CI_RUNNER_VERSION")),
                "{evil}: {err}"
            );
        }
    }

    #[test]
    fn an_unknown_architecture_is_named() {
        let err = resolve(DEFAULT_HELPER_IMAGE, Some("mips64"), RELEASE).unwrap_err();
        assert!(
            matches!(&err, HelperError::System(m) if m.contains("mips64")),
            "{err}"
        );
        assert!(resolve(DEFAULT_HELPER_IMAGE, None, RELEASE).is_err());
    }
}
