//! Stage scripts in gitlab-runner's bash format: the same shape its bash shell writes, so
//! the driver is fed what it would get in production (busybox ash runs it in the sandbox).
//!
//! ```text
//! #!/usr/bin/env bash
//!
//! set -eo pipefail
//! set +o noclobber
//! : | eval $'export CI_JOB_ID=$\'7\'\n...\necho $\'$ make\'\nmake\n'
//! exit 0
//! ```

/// ANSI-C quotes a string for bash/ash: `$'...'` with `\\`, `\'`, newlines and control
/// characters escaped.
pub fn ansi_c_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("$'");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\{:03o}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A command line, echoed first like gitlab-runner does (`$ <cmd>`), then run.
pub fn user_command(cmd: &str) -> Vec<String> {
    vec![
        format!("echo {}", ansi_c_quote(&format!("$ {cmd}"))),
        cmd.to_owned(),
    ]
}

/// The full stage script: variable exports, then `body` lines, in gitlab-runner's frame.
pub fn stage_script(exports: &[(String, String)], body: &[String]) -> String {
    let mut inner = String::new();
    for (k, v) in exports {
        inner.push_str(&format!("export {k}={}\n", ansi_c_quote(v)));
    }
    for line in body {
        inner.push_str(line);
        inner.push('\n');
    }
    format!(
        "#!/usr/bin/env bash\n\nset -eo pipefail\nset +o noclobber\n: | eval {}\nexit 0\n",
        ansi_c_quote(&inner)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_nested_quotes_and_newlines() {
        assert_eq!(ansi_c_quote("a'b\\c\nd"), "$'a\\'b\\\\c\\nd'");
        assert_eq!(ansi_c_quote("\u{1b}[0m"), "$'\\033[0m'");
    }

    #[test]
    fn stage_script_has_gitlab_frame() {
        let s = stage_script(&[("A".into(), "x y".into())], &user_command("echo hi"));
        assert!(
            s.starts_with("#!/usr/bin/env bash\n\nset -eo pipefail\nset +o noclobber\n: | eval $'")
        );
        assert!(s.ends_with("'\nexit 0\n"));
        assert!(s.contains("export A=$\\'x y\\'\\n"), "{s}");
    }
}
