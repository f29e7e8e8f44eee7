//! What Flotilla's programs and its build machines must agree on.
//!
//! Invariant: this crate does no I/O beyond reading a config file it is handed, and
//! depends on no AWS, Docker or async crate, so every side can use it cheaply.

pub mod api;
pub mod boot_hooks;
pub mod bootstrap;
pub mod cloud_files;
pub mod config;
pub mod container;
pub mod dockerd;
pub mod duration;
pub mod journal;
pub mod logs;
pub mod schedule;
pub mod tags;
