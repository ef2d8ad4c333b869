//! Herald: a self-hosted mobile push backend.
//!
//! Apps register device tokens, submit jobs (202 + tracking id), and learn about progress through
//! APNs/FCM pushes, live streams and a durable per-user update log they sync on launch.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod demo;
pub mod devices;
pub mod dispatch;
pub mod error;
pub mod fakes;
pub mod jobs;
pub mod providers;
pub mod queue;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod updates;
pub mod webhooks;
