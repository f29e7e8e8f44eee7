//! `flotilla migrate`: turns a gitlab-runner `config.toml` with docker+machine runners into
//! a `flotilla.toml` (one fleet, one class per runner) and the same `config.toml` with those
//! runners on the custom executor, plus a report of what became of every setting.
//!
//! The conversion is a pure function of the input text ([`convert()`]); only [`run`] reads
//! and writes files. Module map, each depending only on those after it: `convert` (input
//! text to output texts, on top), `fleet` (the fleet around the classes), `class` (one
//! runner to a class), `runner` (the rewritten `[[runners]]` entry), `render` (the output
//! texts), `machine_options` (`MachineOptions`), `idle` (the idle policy, `limit`,
//! autoscaling periods), `periods` (cron periods), `job` (shared and per-class `[job]`
//! tables), `docker` (`[runners.docker]`), `fields` (typed reads naming the key), `names`
//! (class and fleet names), `options` (what the conversion needs besides the input),
//! `report` (what became of every setting), `error` (`Bad`, `MigrateError`).

mod class;
mod convert;
mod docker;
mod error;
mod fields;
mod fleet;
mod idle;
mod job;
mod machine_options;
mod names;
mod options;
mod periods;
mod render;
pub mod report;
mod runner;

use std::io::Write as _;
use std::path::{Path, PathBuf};

pub use self::convert::{convert, Migration};
pub use self::error::{Bad, MigrateError};
pub use self::options::Options;
pub use self::report::{Kind, Report};

/// The files `flotilla migrate` writes into `--out-dir`.
pub const FLOTILLA_TOML: &str = "flotilla.toml";
pub const RUNNER_TOML: &str = "config.toml";
pub const REPORT_FILE: &str = "migration-report.txt";

/// Arguments of `flotilla migrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// gitlab-runner's config.toml with the docker+machine runners (read only).
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// Where to write flotilla.toml, config.toml (the runner config for the custom executor)
    /// and migration-report.txt; created if missing.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Fleet name (the flotilla:fleet tag) [default: from the runner names].
    #[arg(long, value_name = "NAME")]
    pub fleet: Option<String>,
    /// Migrate only this runner (by its `name`); repeat for several. Other runners are
    /// kept as they are [default: every docker+machine runner].
    #[arg(long = "runner", value_name = "NAME")]
    pub runners: Vec<String>,
    /// AMI for runners whose MachineOptions set no amazonec2-ami (it must have Docker and
    /// cloud-init).
    #[arg(long, value_name = "AMI_ID")]
    pub ami: Option<String>,
    /// Subnet for runners whose MachineOptions set no amazonec2-subnet-id; repeat for
    /// several zones.
    #[arg(long = "subnet", value_name = "SUBNET_ID")]
    pub subnets: Vec<String>,
    /// The daemon's state directory, written to flotilla.toml.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/flotilla")]
    pub state_dir: PathBuf,
    /// The flotilla binary the runner's [runners.custom] section calls.
    #[arg(long, value_name = "PATH", default_value = "/usr/local/bin/flotilla")]
    pub binary: String,
    /// Where flotilla.toml will be installed: the path [runners.custom] passes to the stages.
    #[arg(long, value_name = "PATH", default_value = flotilla_proto::config::DEFAULT_CONFIG_PATH)]
    pub config_path: String,
    /// Overwrite files already in --out-dir.
    #[arg(long)]
    pub force: bool,
}

/// `flotilla migrate`: reads `--from`, converts, writes the three files into `--out-dir`
/// and prints the report on stderr. Returns the migration for the caller to summarise.
pub fn run(args: &Args) -> Result<Migration, MigrateError> {
    let text = std::fs::read_to_string(&args.from).map_err(|source| MigrateError::Read {
        path: args.from.clone(),
        source,
    })?;
    let options = Options {
        source: args.from.display().to_string(),
        fleet: args.fleet.clone(),
        state_dir: args.state_dir.clone(),
        binary: args.binary.clone(),
        config_path: args.config_path.clone(),
        ami: args.ami.clone(),
        subnets: args.subnets.clone(),
        runners: args.runners.clone(),
    };
    let migration = convert(&text, &options)?;
    let outputs = [
        (FLOTILLA_TOML, &migration.flotilla_toml, 0o644),
        (RUNNER_TOML, &migration.runner_toml, 0o600),
        (REPORT_FILE, &migration.report_text, 0o644),
    ];
    let input = std::fs::canonicalize(&args.from).ok();
    for (name, _, _) in &outputs {
        let path = args.out_dir.join(name);
        if input.is_some() && std::fs::canonicalize(&path).ok() == input {
            return Err(MigrateError::WouldOverwriteInput { path });
        }
        if !args.force && path.exists() {
            return Err(MigrateError::Exists { path });
        }
    }
    std::fs::create_dir_all(&args.out_dir).map_err(|source| MigrateError::Write {
        path: args.out_dir.clone(),
        source,
    })?;
    for (name, content, mode) in outputs {
        write_file(&args.out_dir.join(name), content, mode)?;
    }
    eprint!("{}", migration.report_text);
    Ok(migration)
}

/// Writes `content` with `mode` (config.toml holds runner tokens: 0600), replacing any file.
fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), MigrateError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let failed = |source| MigrateError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(failed)?;
    f.write_all(content.as_bytes()).map_err(failed)?;
    f.sync_all().map_err(failed)
}
