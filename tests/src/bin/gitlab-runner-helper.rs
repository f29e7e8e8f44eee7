//! A stand-in for the stock helper image's `/usr/bin/gitlab-runner-helper`: the subcommands
//! gitlab-runner's stage scripts call (`--version`, `cache-extractor`, `cache-archiver`,
//! `artifacts-uploader`, `artifacts-downloader`), with gitlab-runner's flag names, messages
//! and exit codes, moving real zip files over HTTP (pre-signed S3 URLs for the cache, the
//! GitLab jobs API for artifacts). Modelled on gitlab-runner's commands/helpers/*.go.
//!
//! Differences from the real helper, none of which the sandbox's scripts rely on: only the
//! zip format; `--untracked` takes every file under the project dir except `.git` (the
//! sandbox has no git checkout); an archive is always rebuilt (no "Archive is up to date!");
//! GoCloud URLs are refused. Job tokens are never printed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const VERSION: &str = "19.3.0~flotilla-sandbox";

/// A failure the real helper reports with `logrus.Fatalln` / `Warningln` + exit 1.
#[derive(Debug)]
enum Failure {
    Fatal(String),
    Warning(String),
}

type Res<T> = Result<T, Failure>;

fn fatal<T>(msg: impl Into<String>) -> Res<T> {
    Err(Failure::Fatal(msg.into()))
}

fn info(msg: &str) {
    eprintln!("{msg}");
}

fn warning(msg: &str) {
    eprintln!("\x1b[0;33mWARNING: {msg}\x1b[0;m");
}

fn error(msg: &str) {
    eprintln!("\x1b[31;1mERROR: {msg}\x1b[0;m");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("usage: gitlab-runner-helper <command> [flags]");
        return ExitCode::from(1);
    };
    let rest = &args[1..];
    let result = match cmd.as_str() {
        "--version" | "-v" | "version" => {
            print_version();
            Ok(())
        }
        "cache-extractor" => Flags::parse(rest, CACHE_EXTRACTOR).and_then(|f| cache_extractor(&f)),
        "cache-archiver" => Flags::parse(rest, CACHE_ARCHIVER).and_then(|f| cache_archiver(&f)),
        "artifacts-uploader" => {
            Flags::parse(rest, ARTIFACTS_UPLOADER).and_then(|f| artifacts_uploader(&f))
        }
        "artifacts-downloader" => {
            Flags::parse(rest, ARTIFACTS_DOWNLOADER).and_then(|f| artifacts_downloader(&f))
        }
        other => fatal(format!("No help topic for '{other}'")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Fatal(m)) => {
            eprintln!("\x1b[31;1mFATAL: {m}\x1b[0;m");
            ExitCode::from(1)
        }
        Err(Failure::Warning(m)) => {
            warning(&m);
            ExitCode::from(1)
        }
    }
}

fn print_version() {
    println!("Version:      {VERSION}");
    println!("Git revision: 00000000");
    println!("Git branch:   sandbox");
    println!("GO version:   (stand-in written in Rust)");
    println!("OS/Arch:      linux/amd64");
}

/// One subcommand's flags: (name, takes a value).
type Spec = &'static [(&'static str, bool)];

const CACHE_EXTRACTOR: Spec = &[
    ("file", true),
    ("url", true),
    ("gocloud-url", true),
    ("alternate-url", true),
    ("alternate-gocloud-url", true),
    ("head-url", true),
    ("alternate-head-url", true),
    ("timeout", true),
    ("env-file", true),
    ("transfer-buffer-size", true),
    ("chunk-size", true),
    ("concurrency", true),
];

const CACHE_ARCHIVER: Spec = &[
    ("file", true),
    ("alternate-file", true),
    ("url", true),
    ("check-url", true),
    ("gocloud-url", true),
    ("timeout", true),
    ("header", true),
    ("metadata", true),
    ("compression-level", true),
    ("compression-format", true),
    ("max-uploaded-archive-size", true),
    ("env-file", true),
    ("transfer-buffer-size", true),
    ("chunk-size", true),
    ("concurrency", true),
    ("path", true),
    ("exclude", true),
    ("untracked", false),
];

const ARTIFACTS_UPLOADER: Spec = &[
    ("url", true),
    ("token", true),
    ("id", true),
    ("name", true),
    ("expire-in", true),
    ("artifact-format", true),
    ("artifact-type", true),
    ("compression-level", true),
    ("timeout", true),
    ("response-header-timeout", true),
    ("ci-debug-trace", false),
    ("path", true),
    ("exclude", true),
    ("untracked", false),
];

const ARTIFACTS_DOWNLOADER: Spec = &[
    ("url", true),
    ("token", true),
    ("id", true),
    ("direct-download", false),
    ("archiver-staging-dir", true),
];

/// Parsed `--name value` / `--name=value` flags; repeated flags keep every value.
struct Flags(BTreeMap<String, Vec<String>>);

impl Flags {
    fn parse(args: &[String], spec: Spec) -> Res<Self> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(body) = a.strip_prefix("--") else {
                return fatal(format!("unexpected argument {a:?}"));
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (body, None),
            };
            let Some((_, takes)) = spec.iter().find(|(n, _)| *n == name) else {
                return fatal(format!("flag provided but not defined: -{name}"));
            };
            let value = match (takes, inline) {
                (true, Some(v)) => v,
                (true, None) => match it.next() {
                    Some(v) => v.clone(),
                    None => return fatal(format!("flag needs an argument: -{name}")),
                },
                (false, v) => v.unwrap_or_else(|| "true".into()),
            };
            map.entry(name.to_owned()).or_default().push(value);
        }
        Ok(Self(map))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0.get(name).cloned().unwrap_or_default()
    }

    fn bool(&self, name: &str) -> bool {
        self.get(name).is_some_and(|v| v != "false")
    }
}

/// `--env-file`: `KEY="value"` lines (gitlab-runner's DotEnvEscape) into the environment.
fn load_env_file(flags: &Flags) -> Res<()> {
    let Some(path) = flags.get("env-file") else {
        return Ok(());
    };
    let text = std::fs::read_to_string(path)
        .or_else(|e| fatal(format!("reading env file {path}: {e}")))?;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        let mut out = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            match (c, c == '\\') {
                (_, true) => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some(o) => out.push(o),
                    None => {}
                },
                (c, false) => out.push(c),
            }
        }
        std::env::set_var(k.trim(), out);
    }
    Ok(())
}

/// A URL without its query (gitlab-runner's url_helpers.CleanURL), for logs.
fn clean_url(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(timeout)
        .redirects(0)
        .build()
}

/// `--timeout` of the cache commands: minutes, default 10.
fn cache_timeout(flags: &Flags) -> Duration {
    let minutes = flags
        .get("timeout")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|m| *m > 0)
        .unwrap_or(10);
    Duration::from_secs(minutes * 60)
}

/// A Go duration (`1h0m0s`, `10m0s`, `30s`, `500ms`).
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut unit = String::new();
    let mut flush = |num: &mut String, unit: &mut String| -> Option<()> {
        if num.is_empty() {
            return if unit.is_empty() { Some(()) } else { None };
        }
        let n: f64 = num.parse().ok()?;
        let factor = match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += n * factor;
        num.clear();
        unit.clear();
        Some(())
    };
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            if !unit.is_empty() {
                flush(&mut num, &mut unit)?;
            }
            num.push(c);
        } else {
            unit.push(c);
        }
    }
    flush(&mut num, &mut unit)?;
    Some(Duration::from_secs_f64(total))
}

enum Got {
    Response(Box<ureq::Response>),
    /// Transport error (connection refused, timeout...): retried.
    Transport(String),
}

fn send(req: ureq::Request, body: Option<&[u8]>) -> Got {
    let r = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    match r {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => Got::Response(Box::new(resp)),
        Err(e) => Got::Transport(e.to_string()),
    }
}

/// Three attempts on transport errors and 5xx, like gitlab-runner's retry helper.
fn with_retry(mut attempt: impl FnMut() -> Got) -> Res<ureq::Response> {
    let mut last = String::new();
    for n in 1..=3 {
        if n > 1 {
            warning(&format!("Retrying... error={last}"));
            std::thread::sleep(Duration::from_secs(1));
        }
        match attempt() {
            Got::Response(r) if r.status() < 500 => return Ok(*r),
            Got::Response(r) => last = format!("received: {} {}", r.status(), r.status_text()),
            Got::Transport(e) => last = e,
        }
    }
    fatal(last)
}

// --- archives ---

/// The files and directories an archive holds, relative to the working directory, in
/// order (gitlab-runner's fileArchiver.enumerate).
fn enumerate(flags: &Flags, wd: &Path) -> Vec<PathBuf> {
    let all = walk(wd);
    let mut picked: BTreeMap<PathBuf, ()> = BTreeMap::new();
    for pattern in flags.all("path") {
        if pattern.is_empty() {
            warning("No matching files. Path is empty.");
            continue;
        }
        let rel = match relative_in_project(&pattern, wd) {
            Some(r) => r,
            None => {
                warning(&format!(
                    "processPath: artifact path is not a subpath of project directory: {pattern}"
                ));
                continue;
            }
        };
        let segments: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
        let mut found = 0;
        for p in &all {
            let text = p.to_string_lossy();
            let parts: Vec<&str> = text.split('/').collect();
            // A match is the path itself or anything under a matching directory.
            let hit = (1..=parts.len()).any(|n| glob_match(&segments, &parts[..n]));
            if hit {
                picked.insert(p.clone(), ());
                found += 1;
            }
        }
        if found == 0 {
            warning(&format!(
                "{pattern}: no matching files. Ensure that the artifact path is relative to the working directory ({})",
                wd.display()
            ));
        } else {
            info(&format!(
                "{pattern}: found {found} matching artifact files and directories"
            ));
        }
    }
    if flags.bool("untracked") {
        let mut found = 0;
        for p in &all {
            if p.components()
                .next()
                .is_some_and(|c| c.as_os_str() == ".git")
            {
                continue;
            }
            if wd.join(p).is_dir() {
                continue;
            }
            picked.insert(p.clone(), ());
            found += 1;
        }
        if found == 0 {
            warning("untracked: no files");
        } else {
            info(&format!("untracked: found {found} files"));
        }
    }
    let excludes: Vec<Vec<String>> = flags
        .all("exclude")
        .iter()
        .filter_map(|e| relative_in_project(e, wd))
        .map(|e| e.split('/').map(str::to_owned).collect())
        .collect();
    picked
        .into_keys()
        .filter(|p| {
            let text = p.to_string_lossy();
            let parts: Vec<&str> = text.split('/').collect();
            !excludes.iter().any(|ex| {
                let ex: Vec<&str> = ex.iter().map(String::as_str).collect();
                (1..=parts.len()).any(|n| glob_match(&ex, &parts[..n]))
            })
        })
        .collect()
}

/// `pattern` relative to the project dir (`wd`), `None` when it points outside.
fn relative_in_project(pattern: &str, wd: &Path) -> Option<String> {
    let joined = if pattern.starts_with('/') {
        PathBuf::from(pattern)
    } else {
        wd.join(pattern)
    };
    let mut parts: Vec<String> = Vec::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop()?;
            }
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    let wd_parts: Vec<String> = wd
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    if parts.len() < wd_parts.len() || parts[..wd_parts.len()] != wd_parts[..] {
        return None;
    }
    Some(parts[wd_parts.len()..].join("/"))
}

/// doublestar-style matching of path segments: `**` spans any number of segments, `*` and
/// `?` stay inside one.
fn glob_match(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| glob_match(rest, &path[i..])),
        Some((seg, rest)) => match path.split_first() {
            Some((p, prest)) => {
                segment_match(seg.as_bytes(), p.as_bytes()) && glob_match(rest, prest)
            }
            None => false,
        },
    }
}

fn segment_match(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| segment_match(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && segment_match(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && segment_match(rest, &s[1..]),
    }
}

/// Every file and directory under `wd` (relative), symlinks not followed.
fn walk(wd: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(wd.join(&rel)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = rel.join(e.file_name());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Writes a zip of `files` (relative to `wd`) to `out`.
fn write_zip<W: Write + std::io::Seek>(wd: &Path, files: &[PathBuf], out: W) -> Res<W> {
    use std::os::unix::fs::PermissionsExt;
    use zip::write::SimpleFileOptions;
    let mut zw = zip::ZipWriter::new(out);
    for rel in files {
        let full = wd.join(rel);
        let meta = std::fs::symlink_metadata(&full)
            .or_else(|e| fatal(format!("{}: {e}", rel.display())))?;
        let name = rel.to_string_lossy().into_owned();
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(meta.permissions().mode() & 0o7777);
        let r = if meta.is_dir() {
            zw.add_directory(format!("{name}/"), opts)
        } else if meta.file_type().is_symlink() {
            let target =
                std::fs::read_link(&full).or_else(|e| fatal(format!("{}: {e}", rel.display())))?;
            zw.add_symlink(name, target.to_string_lossy(), opts)
        } else {
            zw.start_file(name, opts).and_then(|()| {
                let mut f = std::fs::File::open(&full)?;
                std::io::copy(&mut f, &mut zw)?;
                Ok(())
            })
        };
        r.or_else(|e| fatal(format!("archiving {}: {e}", rel.display())))?;
    }
    zw.finish()
        .or_else(|e| fatal(format!("finishing the archive: {e}")))
}

/// Extracts a zip into `wd`, overwriting files, refusing paths that leave `wd`.
fn extract_zip(file: &Path, wd: &Path) -> Res<()> {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::File::open(file).or_else(|e| fatal(format!("{}: {e}", file.display())))?;
    let mut z = zip::ZipArchive::new(f).or_else(|e| fatal(format!("zip: {e}")))?;
    for i in 0..z.len() {
        let mut entry = z.by_index(i).or_else(|e| fatal(format!("zip: {e}")))?;
        let Some(rel) = entry.enclosed_name() else {
            let name = entry.name().map(|n| n.into_owned()).unwrap_or_default();
            warning(&format!("{name}: path escapes the project dir, skipped"));
            continue;
        };
        let dest = wd.join(rel);
        let io = |e: std::io::Error| Failure::Fatal(format!("{}: {e}", dest.display()));
        if entry.is_dir() {
            std::fs::create_dir_all(&dest).map_err(io)?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        if std::fs::symlink_metadata(&dest).is_ok() {
            std::fs::remove_file(&dest).map_err(io)?;
        }
        if entry.is_symlink() {
            let mut target = String::new();
            entry.read_to_string(&mut target).map_err(io)?;
            std::os::unix::fs::symlink(target, &dest).map_err(io)?;
            continue;
        }
        let mut out = std::fs::File::create(&dest).map_err(io)?;
        std::io::copy(&mut entry, &mut out).map_err(io)?;
        if let Some(mode) = entry.unix_mode() {
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(io)?;
        }
    }
    Ok(())
}

fn cwd() -> Res<PathBuf> {
    std::env::current_dir().or_else(|_| fatal("Unable to get working directory"))
}

/// A temp file next to `path` (so the final rename stays on one filesystem).
fn temp_beside(path: &Path, prefix: &str) -> Res<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).or_else(|e| fatal(format!("{}: {e}", dir.display())))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempfile_in(dir)
        .or_else(|e| fatal(format!("{}: {e}", dir.display())))
}

// --- cache-extractor ---

fn cache_extractor(flags: &Flags) -> Res<()> {
    load_env_file(flags)?;
    let wd = cwd()?;
    if flags.get("gocloud-url").is_some() {
        return fatal("GoCloud URLs are not supported by this stand-in");
    }
    let Some(file) = flags.get("file").map(PathBuf::from) else {
        return Err(Failure::Warning("Missing cache file".into()));
    };
    let timeout = cache_timeout(flags);
    if let Some(url) = flags.get("url") {
        if let Err(e) = download_cache(flags, url, &file, timeout) {
            return Err(match e {
                Failure::Fatal(m) | Failure::Warning(m) => Failure::Warning(m),
            });
        }
    } else {
        info(
            "No URL provided, cache will not be downloaded from shared cache server. \
             Instead a local version of cache will be extracted.",
        );
    }
    if !file.exists() {
        return Err(Failure::Warning("Cache file does not exist".into()));
    }
    extract_zip(&file, &wd)
}

/// `Last-Modified` of a HEAD, `None` when absent or not 200.
fn head_time(agent: &ureq::Agent, url: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    match send(agent.head(url), None) {
        Got::Response(r) if r.status() == 200 => r
            .header("Last-Modified")
            .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok()),
        _ => None,
    }
}

fn download_cache(flags: &Flags, url: &str, file: &Path, timeout: Duration) -> Res<()> {
    let agent = agent(timeout);
    info("Using presigned URL for cache download");
    // selectPresignedURL: the alternate URL when only it exists or it is newer.
    let mut chosen = url.to_owned();
    if let Some(alt) = flags.get("alternate-url") {
        let primary = head_time(&agent, flags.get("head-url").unwrap_or(url));
        let alternate = head_time(&agent, flags.get("alternate-head-url").unwrap_or(alt));
        match (primary, alternate) {
            (None, Some(_)) => {
                info("Selecting alternate cache URL: primary not available");
                chosen = alt.to_owned();
            }
            (Some(p), Some(a)) if a > p => {
                info("Selecting alternate cache URL: newer timestamp");
                chosen = alt.to_owned();
            }
            _ => info("Selecting primary cache URL"),
        }
    }
    let resp = with_retry(|| send(agent.get(&chosen), None))?;
    if resp.status() == 404 {
        return fatal("file does not exist");
    }
    if resp.status() != 200 {
        return fatal(format!(
            "received: {} {}",
            resp.status(),
            resp.status_text()
        ));
    }
    let modified = resp
        .header("Last-Modified")
        .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok());
    if let (Some(remote), Ok(meta)) = (modified, std::fs::metadata(file)) {
        let local: chrono::DateTime<chrono::Utc> = meta
            .modified()
            .map(Into::into)
            .unwrap_or_else(|_| chrono::Utc::now());
        if remote <= local {
            info(&format!(
                "{} is up to date",
                file.file_name().unwrap_or_default().to_string_lossy()
            ));
            return Ok(());
        }
    }
    let name = file
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    info(&format!("Downloading {name} from {}", clean_url(&chosen)));
    let mut tmp = temp_beside(file, "cache")?;
    let mut body = resp.into_reader();
    std::io::copy(&mut body, tmp.as_file_mut()).or_else(|e| fatal(format!("downloading: {e}")))?;
    if let Some(t) = modified {
        let t: std::time::SystemTime = t.into();
        let _ = tmp.as_file().set_modified(t);
    }
    tmp.persist(file)
        .map(|_| ())
        .or_else(|e| fatal(format!("renaming: {e}")))
}

// --- cache-archiver ---

fn cache_archiver(flags: &Flags) -> Res<()> {
    load_env_file(flags)?;
    let wd = cwd()?;
    if flags.get("gocloud-url").is_some() {
        return fatal("GoCloud URLs are not supported by this stand-in");
    }
    let Some(file) = flags.get("file").map(PathBuf::from) else {
        return fatal("Missing --file");
    };
    if let Some(alt) = flags.get("alternate-file").map(PathBuf::from) {
        if alt != file && !file.exists() && alt.exists() {
            if let Some(parent) = file.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            match std::fs::rename(&alt, &file) {
                Ok(()) => info("Renamed alternate cache file to primary"),
                Err(e) => warning(&format!(
                    "Failed to rename alternate cache file to primary: {e}"
                )),
            }
        }
    }
    let files = enumerate(flags, &wd);
    if files.is_empty() {
        warning("No files to cache.");
        return Ok(());
    }
    let tmp = temp_beside(&file, "archive_")?;
    let out = tmp.reopen().or_else(|e| fatal(format!("{e}")))?;
    write_zip(&wd, &files, out)?;
    let size = tmp.as_file().metadata().map(|m| m.len()).unwrap_or(0);
    tmp.persist(&file)
        .or_else(|e| fatal(format!("renaming: {e}")))?;

    let Some(url) = flags.get("url") else {
        info(
            "No URL provided, cache will not be uploaded to shared cache server. \
             Cache will be stored only locally.",
        );
        return Ok(());
    };
    let max: u64 = flags
        .get("max-uploaded-archive-size")
        .or(std::env::var("CACHE_MAX_UPLOADED_ARCHIVE_SIZE")
            .ok()
            .as_deref())
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if max != 0 && size > max {
        info(&format!(
            "Cache archive size ({size}) is too big (Limit is set to {max}). \
             Cache will be stored only locally."
        ));
        return Ok(());
    }
    info("Using presigned URL for cache upload");
    info(&format!(
        "Uploading {} to {}",
        file.file_name().unwrap_or_default().to_string_lossy(),
        clean_url(url)
    ));
    let body = std::fs::read(&file).or_else(|e| fatal(format!("{}: {e}", file.display())))?;
    let modified: chrono::DateTime<chrono::Utc> = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .map(Into::into)
        .unwrap_or_else(|_| chrono::Utc::now());
    let agent = agent(cache_timeout(flags));
    let headers: Vec<(String, String)> = flags
        .all("header")
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let resp = with_retry(|| {
        let mut req = agent.put(url);
        for (k, v) in &headers {
            req = req.set(k, v);
        }
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.set("Content-Type", "application/octet-stream");
        }
        req = req.set(
            "Last-Modified",
            &modified.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        );
        send(req, Some(&body))
    })?;
    if !(200..300).contains(&resp.status()) {
        return fatal(format!(
            "received: {} {}",
            resp.status(),
            resp.status_text()
        ));
    }
    Ok(())
}

// --- artifacts ---

/// `--url --token --id`, the JobCredentials every artifacts command needs.
fn job_credentials(flags: &Flags) -> Res<(String, String, u64)> {
    let url = flags.get("url");
    let token = flags.get("token");
    let id = flags.get("id").and_then(|i| i.parse::<u64>().ok());
    if url.is_none() {
        warning("Missing URL (--url)");
    }
    if token.is_none() {
        warning("Missing runner credentials (--token)");
    }
    if id.is_none() {
        warning("Missing build ID (--id)");
    }
    match (url, token, id) {
        (Some(u), Some(t), Some(i)) => Ok((u.trim_end_matches('/').to_owned(), t.to_owned(), i)),
        _ => fatal("Incomplete arguments"),
    }
}

fn artifacts_uploader(flags: &Flags) -> Res<()> {
    let wd = cwd()?;
    let (url, token, id) = job_credentials(flags)?;
    let format = flags.get("artifact-format").unwrap_or("zip");
    if format != "zip" {
        return fatal(format!(
            "artifact format {format:?} is not supported by this stand-in (zip only)"
        ));
    }
    let files = enumerate(flags, &wd);
    if files.is_empty() {
        error("No files to upload");
        return Ok(());
    }
    // `--name` defaults to "artifacts"; an empty or odd one becomes "default".
    let name = match flags.0.get("name").and_then(|v| v.last()) {
        None => "artifacts".to_owned(),
        Some(n) => Path::new(n)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
    };
    let filename = format!("{name}.zip");
    let zip = write_zip(&wd, &files, std::io::Cursor::new(Vec::new()))?.into_inner();
    let boundary = format!("flotilla-sandbox-{:x}", std::process::id());
    let mut body = Vec::with_capacity(zip.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
             filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&zip);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let mut query: Vec<(&str, &str)> = Vec::new();
    if let Some(f) = flags.get("artifact-format") {
        query.push(("artifact_format", f));
    }
    if let Some(t) = flags.get("artifact-type") {
        query.push(("artifact_type", t));
    }
    if let Some(e) = flags.get("expire-in") {
        query.push(("expire_in", e));
    }
    let timeout = flags
        .get("timeout")
        .and_then(go_duration)
        .unwrap_or(Duration::from_secs(3600));
    let agent = agent(timeout);
    let endpoint = format!("{url}/api/v4/jobs/{id}/artifacts");
    let prefix = match flags.get("artifact-type") {
        Some(t) => format!("Uploading artifacts as {t:?} to coordinator..."),
        None => "Uploading artifacts to coordinator...".to_owned(),
    };
    let resp = with_retry(|| {
        let mut req = agent.post(&endpoint).set("JOB-TOKEN", &token).set(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        );
        for (k, v) in &query {
            req = req.query(k, v);
        }
        send(req, Some(&body))
    })?;
    let status = format!("{} {}", resp.status(), resp.status_text());
    match resp.status() {
        201 => {
            info(&format!(
                "{prefix} {status} id={id} responseStatus={status}"
            ));
            Ok(())
        }
        403 => {
            error(&format!("{prefix} forbidden id={id} status={status}"));
            fatal("permission denied")
        }
        413 => {
            error(&format!(
                "{prefix} too large archive id={id} status={status}"
            ));
            fatal("too large")
        }
        _ => {
            error(&format!("{prefix} failed id={id} status={status}"));
            fatal(format!("upload failed: {status}"))
        }
    }
}

fn artifacts_downloader(flags: &Flags) -> Res<()> {
    let wd = cwd()?;
    let (url, token, id) = job_credentials(flags)?;
    let staging = flags
        .get("archiver-staging-dir")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let agent = agent(Duration::from_secs(3600));
    let endpoint = format!("{url}/api/v4/jobs/{id}/artifacts");
    let resp = with_retry(|| send(agent.get(&endpoint).set("JOB-TOKEN", &token), None))?;
    let status = format!("{} {}", resp.status(), resp.status_text());
    let what = "Downloading artifacts from coordinator...";
    match resp.status() {
        200 => {}
        401 => {
            error(&format!("{what} unauthorized id={id} status={status}"));
            return fatal("unauthorized");
        }
        403 => {
            error(&format!("{what} forbidden id={id} status={status}"));
            return fatal("forbidden");
        }
        404 => {
            error(&format!("{what} not found id={id} status={status}"));
            return fatal("file does not exist");
        }
        _ => {
            error(&format!("{what} failed id={id} status={status}"));
            return fatal(format!("download failed: {status}"));
        }
    }
    let mut tmp = temp_beside(&staging.join("artifacts.zip"), "artifacts")?;
    std::io::copy(&mut resp.into_reader(), tmp.as_file_mut())
        .or_else(|e| fatal(format!("downloading: {e}")))?;
    info(&format!("{what} ok id={id} responseStatus={status}"));
    extract_zip(tmp.path(), &wd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> Vec<&str> {
        s.split('/').collect()
    }

    #[test]
    fn globs_like_doublestar() {
        assert!(glob_match(&seg("out/*.bin"), &seg("out/a.bin")));
        assert!(!glob_match(&seg("out/*.bin"), &seg("out/x/a.bin")));
        assert!(glob_match(&seg("**/a.bin"), &seg("out/x/a.bin")));
        assert!(glob_match(&seg("**"), &seg("a")));
        assert!(glob_match(&seg("v?ndor"), &seg("vendor")));
    }

    #[test]
    fn parses_go_durations_and_flags() {
        assert_eq!(go_duration("1h0m0s"), Some(Duration::from_secs(3600)));
        assert_eq!(go_duration("10m0s"), Some(Duration::from_secs(600)));
        let args: Vec<String> = ["--path", "a", "--path=b", "--untracked", "--timeout", "5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let f = Flags::parse(&args, CACHE_ARCHIVER).unwrap();
        assert_eq!(f.all("path"), vec!["a", "b"]);
        assert!(f.bool("untracked"));
        assert_eq!(cache_timeout(&f), Duration::from_secs(300));
        assert!(Flags::parse(&["--nope".to_string()], CACHE_ARCHIVER).is_err());
    }

    #[test]
    fn paths_outside_the_project_are_refused() {
        let wd = Path::new("/builds/g/p");
        assert_eq!(relative_in_project("out/", wd).as_deref(), Some("out"));
        assert_eq!(relative_in_project("../p/x", wd).as_deref(), Some("x"));
        assert_eq!(relative_in_project("../../etc", wd), None);
        assert_eq!(relative_in_project("/etc/passwd", wd), None);
    }
}
