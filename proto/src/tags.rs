//! EC2 tag keys Flotilla sets at launch. Everything the daemon may terminate carries
//! `flotilla:fleet=<own fleet>`; nothing without it is ever touched. An unknown instance
//! of the fleet is reaped as an orphan only if it also carries `flotilla:daemon=<own id>`
//! (or no daemon tag at all, from a version before daemon ids) and sits in one of the
//! daemon's configured subnets: another daemon's instances are reported, never terminated.

/// The fleet (one daemon's pool) an instance belongs to.
pub const FLEET: &str = "flotilla:fleet";
/// The persistent id of the daemon that launched the instance (its state dir's
/// `daemon-id`): two daemons sharing a fleet name never reap each other's instances.
pub const DAEMON: &str = "flotilla:daemon";
/// The machine class the instance was launched for.
pub const CLASS: &str = "flotilla:class";
/// The machine id; also names the machine in its TLS server certificate.
pub const MACHINE: &str = "flotilla:machine";
/// The console name.
pub const NAME: &str = "Name";

/// The `Name` tag value for a machine, readable in the EC2 console.
pub fn name_value(fleet: &str, machine_id: &str) -> String {
    format!("flotilla-{fleet}-{machine_id}")
}
