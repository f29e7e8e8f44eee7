// The git revision a binary was built from, for `--version`: included by the build
// scripts of `flotilla` and `flotilla-provision` (`include!`), so both say the same.
//
// Sets `FLOTILLA_GIT_REVISION` for the crate: `FLOTILLA_GIT_REVISION` from the build's
// environment when set (a build from a source tarball that knows its revision), else
// `git rev-parse --short HEAD` in the crate's directory, else "unknown" (no git, not a
// checkout). Reruns when HEAD moves: `HEAD` (a checkout, a detached commit), the branch's
// ref file (a commit) and `packed-refs`, located with `git rev-parse --git-path` so a
// linked worktree's HEAD and the shared refs are both watched.

use std::path::{Path, PathBuf};
use std::process::Command;

const VAR: &str = "FLOTILLA_GIT_REVISION";

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn watch(dir: &Path, git_path: &str) {
    if let Some(p) = git(dir, &["rev-parse", "--git-path", git_path]) {
        let p = dir.join(PathBuf::from(p));
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../build/git_revision.rs");
    println!("cargo:rerun-if-env-changed={VAR}");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let revision = match std::env::var(VAR) {
        Ok(r) if !r.trim().is_empty() => r.trim().to_owned(),
        _ => {
            watch(&dir, "HEAD");
            if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
                watch(&dir, &branch);
            }
            watch(&dir, "packed-refs");
            git(&dir, &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env={VAR}={revision}");
}
