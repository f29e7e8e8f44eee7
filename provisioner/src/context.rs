//! What every resource module is handed during one pass: the AWS clients, the stack, its
//! names, the plan being recorded (which knows the mode) and what the command line adds.
//! Its own module so the resource modules and the engine that orders them both depend
//! on it, and not on each other.

use std::collections::BTreeMap;

use flotilla_proto::config::ClassConfig;

use crate::aws::Aws;
use crate::binary::LocalBinary;
use crate::gitlab::Secret;
use crate::naming::Names;
use crate::plan::{Action, Go, Mode, Plan};
use crate::stack::Stack;

/// What the command line adds to the stack file for the runner hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostOptions {
    /// The flotilla binary apply uploads and the hosts install; `None` when the stack
    /// sets `runner_hosts.flotilla_url` (and for destroy, which installs nothing).
    pub flotilla: Option<LocalBinary>,
    /// Replace hosts without the readiness check and the drain (`apply --no-drain`).
    pub no_drain: bool,
}

/// One pass's shared state (plan or apply, per the mode it was made with).
pub struct Ctx<'a> {
    pub(crate) aws: &'a Aws,
    pub(crate) stack: &'a Stack,
    pub(crate) names: Names,
    /// The changes recorded so far; printed by the caller after the pass.
    pub plan: Plan,
    pub(crate) gitlab_token: Option<Secret>,
    /// The fleet's machine classes as the daemon will see them.
    pub(crate) classes: BTreeMap<String, ClassConfig>,
    pub(crate) hosts: HostOptions,
}

impl<'a> Ctx<'a> {
    pub fn new(aws: &'a Aws, stack: &'a Stack, mode: Mode, gitlab_token: Option<Secret>) -> Self {
        Self {
            aws,
            stack,
            names: Names::new(&stack.name),
            plan: Plan::new(mode),
            gitlab_token,
            classes: stack
                .placeholder_config()
                .map(|c| c.classes)
                .unwrap_or_default(),
            hosts: HostOptions::default(),
        }
    }

    pub fn with_hosts(self, hosts: HostOptions) -> Self {
        Self { hosts, ..self }
    }

    /// For waits only (a plan never waits for AWS); writes need a [`Go`] instead.
    pub(crate) fn applying(&self) -> bool {
        self.plan.mode() == Mode::Apply
    }

    /// Whether hosts are checked and drained over SSM when they are replaced.
    pub(crate) fn drain(&self) -> bool {
        !self.hosts.no_drain
    }

    /// Records a change; in apply mode also announces it and returns the [`Go`] that
    /// the write calls making it need.
    pub(crate) fn change(
        &self,
        action: Action,
        kind: &str,
        name: &str,
        detail: impl Into<String>,
    ) -> Option<Go> {
        self.plan.change(action, kind, name, detail)
    }

    /// Progress line after a create.
    pub(crate) fn created(&self, kind: &str, name: &str, id: &str) {
        tracing::info!("  created {kind} {name}: {id}");
    }
}
