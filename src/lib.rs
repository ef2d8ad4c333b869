//! Herald: a self-hosted mobile push backend.
//!
//! Apps register device tokens, submit jobs (202 + tracking id), and learn about progress through
//! APNs/FCM pushes, live streams and a durable per-user update log they sync on launch.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod providers;
pub mod auth;
pub mod fakes;
