//! A class's boot hooks: extra cloud-init parts run after Flotilla's own
//! (`user_data_parts`), and a `ready_command` the daemon runs on a booting machine before it
//! counts as ready. Also the MIME multipart user data that carries the parts, rendered and
//! parsed without a MIME library (the format cloud-init reads is small and fixed).

use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;

/// Separates the parts of a multipart user data; no part may contain it.
pub const BOUNDARY: &str = "==flotilla-user-data-part==";

/// How cloud-init merges an operator's cloud-config part into Flotilla's: lists appended
/// (write_files, runcmd: Flotilla's run first), existing keys kept (Flotilla's win).
pub const MERGE_TYPE: &str = "list(append)+dict(no_replace,recurse_list)+str()";

/// Bytes set aside for every machine's own (Flotilla) part: CA and server certificates,
/// key, daemon.json, merge program (a few KiB; an estimate, not a measured bound). Used to
/// refuse at validation parts that would push the user data over EC2's 16 KiB; the exact
/// size is checked again at launch ([`crate::bootstrap::CloudConfig::render_with`]).
pub const FLOTILLA_PART_BUDGET: usize = 8 * 1024;

/// One extra cloud-init part of a class's user data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDataPart {
    /// `cloud-config` (YAML or JSON, merged into Flotilla's: lists appended, Flotilla's keys
    /// kept) or `shell` (a script cloud-init runs once, before Flotilla's dockerd restart).
    #[serde(rename = "type")]
    pub kind: PartKind,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartKind {
    CloudConfig,
    Shell,
}

impl PartKind {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::CloudConfig => "text/cloud-config",
            Self::Shell => "text/x-shellscript",
        }
    }
}

/// A check run on a booting machine once its dockerd answers, before it is ready: a
/// throwaway container of `image` running `command`, the machine's `/` mounted read-only
/// at `/host`. A non-zero exit, an error (e.g. the image cannot be pulled) or `timeout` is
/// a failed boot: the machine is terminated and replaced like one past its boot timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyCommand {
    pub image: String,
    /// Replaces the image's command; the image's own when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Longest the check may take (pull included); what is left of the boot timeout when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

/// Where the machine's `/` is mounted (read-only) in a ready command's container.
pub const HOST_MOUNT: &str = "/host";

/// Checks a class's parts and ready command; `Err((key relative to the class, message))`.
/// `flotilla_part` is the size of the class's own part, or [`FLOTILLA_PART_BUDGET`].
pub fn check(
    parts: &[UserDataPart],
    ready: Option<&ReadyCommand>,
    flotilla_part: usize,
    limit: usize,
) -> Result<(), (String, String)> {
    for (i, p) in parts.iter().enumerate() {
        let at = format!("user_data_parts[{i}].content");
        if p.content.trim().is_empty() {
            return Err((at, "must not be empty".into()));
        }
        if p.content.contains(BOUNDARY) {
            return Err((at, format!("must not contain {BOUNDARY}")));
        }
        if p.kind == PartKind::Shell && !p.content.starts_with("#!") {
            return Err((
                at,
                "a shell part must start with #! (e.g. #!/bin/sh)".into(),
            ));
        }
    }
    let size = multipart_size(flotilla_part, parts);
    if !parts.is_empty() && size > limit {
        return Err((
            "user_data_parts".into(),
            format!(
                "the user data would be about {size} bytes with Flotilla's own part, above \
                 EC2's limit of {limit}"
            ),
        ));
    }
    if let Some(r) = ready {
        if r.image.trim().is_empty() {
            return Err(("ready_command.image".into(), "must name an image".into()));
        }
        if r.timeout.is_some_and(|t| t.0.is_zero()) {
            return Err((
                "ready_command.timeout".into(),
                "must be greater than zero".into(),
            ));
        }
    }
    Ok(())
}

fn part_header(content_type: &str, merge: bool) -> String {
    let merge = if merge {
        format!("Merge-Type: {MERGE_TYPE}\n")
    } else {
        String::new()
    };
    format!(
        "--{BOUNDARY}\nContent-Type: {content_type}; charset=\"utf-8\"\nMIME-Version: 1.0\n{merge}\n"
    )
}

const MULTIPART_HEADER: &str = "Content-Type: multipart/mixed; boundary=\"";

/// Flotilla's part, then each of `parts`, as one MIME multipart cloud-init reads; just
/// Flotilla's part when there are none.
pub fn render_multipart(flotilla: &str, parts: &[UserDataPart]) -> String {
    if parts.is_empty() {
        return flotilla.to_owned();
    }
    let mut out = format!("{MULTIPART_HEADER}{BOUNDARY}\"\nMIME-Version: 1.0\n\n");
    out.push_str(&part_header("text/cloud-config", false));
    out.push_str(flotilla.trim_end());
    out.push('\n');
    for p in parts {
        out.push_str(&part_header(
            p.kind.content_type(),
            p.kind == PartKind::CloudConfig,
        ));
        out.push_str(p.content.trim_end());
        out.push('\n');
    }
    out.push_str(&format!("--{BOUNDARY}--\n"));
    out
}

fn multipart_size(flotilla: usize, parts: &[UserDataPart]) -> usize {
    let framing = MULTIPART_HEADER.len() + 2 * BOUNDARY.len() + 32;
    let headers: usize = parts
        .iter()
        .map(|p| part_header(p.kind.content_type(), p.kind == PartKind::CloudConfig).len() + 1)
        .sum();
    let contents: usize = parts.iter().map(|p| p.content.len()).sum();
    flotilla + framing + part_header("text/cloud-config", false).len() + headers + contents
}

/// Splits user data into Flotilla's part and the others (`(content type, content)`);
/// plain (non-multipart) user data is Flotilla's part alone.
pub fn split_multipart(user_data: &str) -> Option<(String, Vec<(String, String)>)> {
    if !user_data.starts_with(MULTIPART_HEADER) {
        return Some((user_data.to_owned(), Vec::new()));
    }
    let delimiter = format!("--{BOUNDARY}");
    let mut sections = user_data.split(&delimiter);
    sections.next()?; // the multipart's own headers
    let mut parts = Vec::new();
    for section in sections {
        if section.starts_with("--") {
            break;
        }
        let (headers, body) = section.trim_start_matches('\n').split_once("\n\n")?;
        let content_type = headers
            .lines()
            .find_map(|l| l.strip_prefix("Content-Type: "))?
            .split(';')
            .next()?
            .to_owned();
        parts.push((content_type, body.to_owned()));
    }
    let (_, flotilla) = parts.first().cloned()?;
    Some((flotilla, parts.into_iter().skip(1).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(kind: PartKind, content: &str) -> UserDataPart {
        UserDataPart {
            kind,
            content: content.into(),
        }
    }

    #[test]
    fn parts_follow_flotillas_and_round_trip() {
        let parts = [
            part(PartKind::CloudConfig, "#cloud-config\nca_certs: {}\n"),
            part(PartKind::Shell, "#!/bin/sh\necho hi\n"),
        ];
        let text = render_multipart("#cloud-config\n{\"a\":1}\n", &parts);
        assert!(text.starts_with("Content-Type: multipart/mixed"));
        assert!(text.contains(&format!("Merge-Type: {MERGE_TYPE}")));
        let (ours, others) = split_multipart(&text).unwrap();
        assert_eq!(ours, "#cloud-config\n{\"a\":1}\n");
        assert_eq!(
            others,
            vec![
                (
                    "text/cloud-config".to_string(),
                    "#cloud-config\nca_certs: {}\n".to_string()
                ),
                (
                    "text/x-shellscript".to_string(),
                    "#!/bin/sh\necho hi\n".to_string()
                ),
            ]
        );
        assert!(multipart_size(22, &parts) >= text.len());
        // No parts: the user data stays plain cloud-config.
        assert_eq!(
            render_multipart("#cloud-config\n{}\n", &[]),
            "#cloud-config\n{}\n"
        );
        assert_eq!(
            split_multipart("#cloud-config\n{}\n").unwrap().0,
            "#cloud-config\n{}\n"
        );
    }

    #[test]
    fn bad_parts_and_ready_commands_name_the_key() {
        let cases: [(Vec<UserDataPart>, Option<ReadyCommand>, &str); 5] = [
            (
                vec![part(PartKind::Shell, "echo")],
                None,
                "user_data_parts[0].content",
            ),
            (
                vec![part(PartKind::CloudConfig, &format!("x\n--{BOUNDARY}\n"))],
                None,
                "user_data_parts[0].content",
            ),
            (
                vec![part(
                    PartKind::Shell,
                    &format!("#!/bin/sh\n{}", "x".repeat(9000)),
                )],
                None,
                "user_data_parts",
            ),
            (
                vec![],
                Some(ReadyCommand {
                    image: " ".into(),
                    command: vec![],
                    timeout: None,
                }),
                "ready_command.image",
            ),
            (
                vec![],
                Some(ReadyCommand {
                    image: "busybox".into(),
                    command: vec![],
                    timeout: Some(HumanDuration::from_secs(0)),
                }),
                "ready_command.timeout",
            ),
        ];
        for (parts, ready, key) in cases {
            let (k, _) =
                check(&parts, ready.as_ref(), FLOTILLA_PART_BUDGET, 16 * 1024).unwrap_err();
            assert_eq!(k, key);
        }
    }
}
