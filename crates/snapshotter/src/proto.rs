//! Generated containerd API types and the Snapshots server trait (module nesting mirrors the
//! protobuf packages, as the generated code expects).
#![allow(missing_docs, clippy::all)]

/// `containerd.*` packages.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

/// `runtime.v1`: the CRI v1 API (the ImageService proxy of the CRI keychain uses it).
pub mod runtime {
    /// `runtime.v1`.
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
