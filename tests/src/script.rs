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

/// gitlab-runner's `helpers.ShellEscape`: the word as it is when it holds only
/// `[A-Za-z0-9,./@_-]`, else `$'...'` with `\xNN` for control and non-ASCII bytes.
pub fn shell_escape(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    let mut out = String::with_capacity(s.len() + 3);
    let mut quote = false;
    for &b in s.as_bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b',' | b'-' | b'.' | b'/' | b'@' | b'_' => {
                out.push(b as char)
            }
            0x07 => out.push_str("\\a"),
            0x08 => out.push_str("\\b"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            0x0b => out.push_str("\\v"),
            0x0c => out.push_str("\\f"),
            b'\r' => out.push_str("\\r"),
            b'\'' => out.push_str("\\'"),
            b'\\' => out.push_str("\\\\"),
            b' ' | b'!' | b'"' | b'#' | b'$' | b'%' | b'&' | b'(' | b')' | b'*' | b'+' | b':'
            | b';' | b'<' | b'=' | b'>' | b'?' | b'[' | b']' | b'^' | b'`' | b'{' | b'|' | b'}'
            | b'~' => out.push(b as char),
            other => out.push_str(&format!("\\x{other:02x}")),
        }
        quote |= !matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b',' | b'-' | b'.' | b'/' | b'@' | b'_');
    }
    if quote {
        format!("$'{out}'")
    } else {
        out
    }
}

/// gitlab-runner's ANSI colours (helpers/ansi_colors.go).
pub const ANSI_BOLD_GREEN: &str = "\x1b[32;1m";
pub const ANSI_YELLOW: &str = "\x1b[0;33m";
pub const ANSI_RESET: &str = "\x1b[0;m";

/// The stage-body half of gitlab-runner's `BashWriter` (shells/bash.go): indented lines,
/// commands with shell-escaped words, `if cmd ; then` blocks, coloured `echo`s.
#[derive(Debug, Default)]
pub struct BashWriter {
    lines: Vec<String>,
    indent: usize,
}

impl BashWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The lines written so far.
    pub fn finish(self) -> Vec<String> {
        self.lines
    }

    pub fn line(&mut self, text: &str) {
        self.lines
            .push(format!("{}{text}", "  ".repeat(self.indent)));
    }

    fn build(command: &str, args: &[String]) -> String {
        let mut words = vec![shell_escape(command)];
        words.extend(args.iter().map(|a| shell_escape(a)));
        words.join(" ")
    }

    /// `Command`: the command and its arguments, each shell-escaped.
    pub fn command(&mut self, command: &str, args: &[String]) {
        let line = Self::build(command, args);
        self.line(&line);
    }

    /// `CommandArgExpand`: arguments in double quotes (variables expand).
    pub fn command_arg_expand(&mut self, command: &str, args: &[&str]) {
        let mut words = vec![shell_escape(command)];
        words.extend(args.iter().map(|a| format!("\"{a}\"")));
        self.line(&words.join(" "));
    }

    /// `IfCmd`: `if <cmd> >/dev/null 2>&1 ; then`.
    pub fn if_cmd(&mut self, command: &str, args: &[String]) {
        let line = format!("if {} >/dev/null 2>&1 ; then", Self::build(command, args));
        self.line(&line);
        self.indent += 1;
    }

    /// `IfCmdWithOutput`: `if <cmd> ; then`.
    pub fn if_cmd_with_output(&mut self, command: &str, args: &[String]) {
        let line = format!("if {} ; then", Self::build(command, args));
        self.line(&line);
        self.indent += 1;
    }

    /// `IfFile`: `if [ -e "<path>" ]; then`.
    pub fn if_file(&mut self, path: &str) {
        self.line(&format!("if [ -e {} ]; then", go_quote(path)));
        self.indent += 1;
    }

    /// `IfDirectory`: `if [ -d "<path>" ]; then`.
    pub fn if_directory(&mut self, path: &str) {
        self.line(&format!("if [ -d {} ]; then", go_quote(path)));
        self.indent += 1;
    }

    pub fn else_(&mut self) {
        self.indent = self.indent.saturating_sub(1);
        self.line("else");
        self.indent += 1;
    }

    pub fn end_if(&mut self) {
        self.indent = self.indent.saturating_sub(1);
        self.line("fi");
    }

    /// `Cd`: `cd <path>`.
    pub fn cd(&mut self, path: &str) {
        self.command("cd", &[path.to_owned()]);
    }

    /// `RmFile`: `rm "-f" "<path>"`.
    pub fn rm_file(&mut self, path: &str) {
        self.command_arg_expand("rm", &["-f", path]);
    }

    /// `Noticef`: bold green.
    pub fn notice(&mut self, text: &str) {
        let line = format!(
            "echo {}",
            shell_escape(&format!("{ANSI_BOLD_GREEN}{text}{ANSI_RESET}"))
        );
        self.line(&line);
    }

    /// `Warningf`: yellow.
    pub fn warning(&mut self, text: &str) {
        let line = format!(
            "echo {}",
            shell_escape(&format!("{ANSI_YELLOW}{text}{ANSI_RESET}"))
        );
        self.line(&line);
    }

    /// `Variable` for a plain variable: `export KEY=<escaped value>`.
    pub fn export(&mut self, key: &str, value: &str) {
        let line = format!("export {}={}", shell_escape(key), shell_escape(value));
        self.line(&line);
    }

    /// `SourceEnv`: creates the file and exports each of its lines.
    pub fn source_env(&mut self, dir: &str, path: &str) {
        self.line(&format!("mkdir -p {}", go_quote(dir)));
        self.line(&format!("touch {}", go_quote(path)));
        self.line(&format!(
            "while read -r line; do export \"$line\"; done < {}",
            go_quote(path)
        ));
    }

    /// `DotEnvVariables`: a heredoc writing `KEY="value"` lines to `path`.
    pub fn dot_env(&mut self, path: &str, vars: &[(String, String)]) {
        let mut text = format!("cat << EOF > {path}\n");
        let mut sorted: Vec<&(String, String)> = vars.iter().collect();
        sorted.sort();
        for (k, v) in sorted {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
                .replace('\r', "\\r");
            text.push_str(&format!("{k}=\"{v}\"\n"));
        }
        text.push_str("EOF\n");
        self.line(&text);
    }
}

/// Go's `%q` for the paths gitlab-runner quotes with it.
pub fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
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
    fn shell_escape_is_gitlab_runners() {
        assert_eq!(shell_escape("cache-extractor"), "cache-extractor");
        assert_eq!(
            shell_escape("../../cache/a/cache.zip"),
            "../../cache/a/cache.zip"
        );
        assert_eq!(shell_escape(""), "''");
        assert_eq!(
            shell_escape("http://h:1/b?X=1&Y=2"),
            "$'http://h:1/b?X=1&Y=2'"
        );
        assert_eq!(shell_escape("it's"), "$'it\\'s'");
        assert_eq!(shell_escape("\x1b[0;m"), "$'\\x1b[0;m'");
    }

    #[test]
    fn bash_writer_nests_ifs() {
        let mut w = BashWriter::new();
        w.if_cmd("gitlab-runner", &["--version".into()]);
        w.notice("hi");
        w.else_();
        w.warning("no");
        w.end_if();
        assert_eq!(
            w.finish(),
            vec![
                "if gitlab-runner --version >/dev/null 2>&1 ; then".to_owned(),
                "  echo $'\\x1b[32;1mhi\\x1b[0;m'".to_owned(),
                "else".to_owned(),
                "  echo $'\\x1b[0;33mno\\x1b[0;m'".to_owned(),
                "fi".to_owned(),
            ]
        );
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
