//! The hidden packaging commands both binaries answer for `scripts/package`
//! (`completions`, `man`), generated from the binary's own clap definitions, so those are
//! the single source of the man pages and completions. Parsed apart from the real CLI and
//! before any config is read; absent from the help and from what it generates. Each
//! `main.rs` includes this file with `#[path]`, as each build script includes
//! `git_revision.rs`: the two crates share no library that could hold clap code. clap
//! names the parser after the including package (`flotilla`, `flotilla-provision`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};

#[derive(Parser)]
pub(crate) enum Packaging {
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (NAME.1, and NAME-<command>.1 for each command) into DIR.
    Man { dir: PathBuf },
}

impl Packaging {
    /// Runs the command for the binary whose CLI is `C`; a failure is printed after
    /// `error_prefix` (each binary's own way of starting an error line).
    pub(crate) fn run<C: CommandFactory>(self, error_prefix: &str) -> ExitCode {
        let mut cmd = C::command();
        let done = match self {
            Self::Completions { shell } => {
                let name = cmd.get_name().to_owned();
                clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
                Ok(())
            }
            Self::Man { dir } => clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display())),
        };
        match done {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{error_prefix}: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}
