//! Switchboard's protocol: the client frames spoken over WebSocket (JSON and protobuf
//! encodings of the same messages) and the internal gRPC contracts between the
//! gateway, presence, routing and storage services.
//!
//! This crate owns the wire types, their two client encodings ([`codec`]) and the
//! stable error codes ([`ErrorCode`]) with their one mapping to gRPC status. It holds
//! no behaviour of any service.

pub mod codec;
mod error;
pub mod ids;
pub mod timeline;

pub use error::{client_message, status, status_error_code, ErrorCode};

/// Generated types of package `switchboard.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.rs"));
}

pub use v1::*;
