//! soci-rs containerd snapshotter: the `containerd.services.snapshots.v1.Snapshots` service
//! over a crash-safe metadata store and overlayfs directories.

pub mod config;
pub mod cri;
pub mod error;
pub mod holder;
pub mod metrics;
pub mod overlay;
pub mod proto;
pub mod remote;
pub mod service;
pub mod store;
pub mod timeline;
pub mod unpack;

pub use config::Config;
pub use service::{Service, Snapshotter};
