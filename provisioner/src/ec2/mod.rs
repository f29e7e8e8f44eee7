//! EC2: one module per resource type, each with its create, update and delete side by
//! side; `inventory` reads the stack's EC2 resources once per pass and holds the tag
//! helpers they share. This file only declares them (the engine orders them).

pub(crate) mod client_vpn;
pub(crate) mod image;
pub(crate) mod instance;
pub(crate) mod internet_gateway;
pub(crate) mod inventory;
pub(crate) mod launch_template;
pub(crate) mod nat_gateway;
pub(crate) mod route_table;
pub(crate) mod security_group;
pub(crate) mod subnet;
pub(crate) mod vpc;
pub(crate) mod vpc_endpoint;
