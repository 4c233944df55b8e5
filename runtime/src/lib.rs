//! What both Palisade binaries run on.
//!
//! - [`watch`]: file change notification for hot reloads.
//! - [`admin`]: the admin server: `/metrics`, `/ready`, `/live`, `/config`.
//! - [`telemetry`]: logging setup.

#![forbid(unsafe_code)]

pub mod admin;
pub mod telemetry;
pub mod watch;
