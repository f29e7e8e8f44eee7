//! EC2 tag keys Flotilla sets at launch. Everything the daemon may terminate carries
//! `flotilla:fleet=<own fleet>`; nothing without it is ever touched.

/// The fleet (one daemon's pool) an instance belongs to.
pub const FLEET: &str = "flotilla:fleet";
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
