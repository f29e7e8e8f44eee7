//! Build script: the git revision for `--version` (see build/git_revision.rs).
include!("../build/git_revision.rs");
