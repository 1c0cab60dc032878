//! Switchboard's client library: the WebSocket client protocol as a Rust API, used
//! by the end-to-end tests and the load harness.
//!
//! It owns: opening a connection (token, device, JSON or protobuf subprotocol,
//! `welcome`), one background task per connection that correlates acks with
//! requests and queues events (every queue bounded), typed requests (including
//! the conversation features: replies, threads, mentions, edits, deletes,
//! reactions, receipts, group administration, notification preferences, rich
//! presence), sends retried under the same idempotency key ([`send_reliable`]),
//! client-side ordering with gap filling and sync cursors ([`Timeline`]) for every
//! kind of timeline event, and applying edit, delete and reaction events to the
//! messages an application holds ([`apply_event`]).
//!
//! It does not own: TLS (plain `ws://` only), reconnect policy beyond the
//! [`Reconnector`] building block, or any server behaviour.

mod connection;
mod error;
mod features;
mod requests;
mod retry;
mod timeline;

pub use connection::{Client, ConnectOptions, Event, Events, TokenPlacement, CONNECT_PATH};
pub use error::ClientError;
pub use features::{MarkerKind, PresenceUpdate, SendOptions};
pub use requests::{new_client_msg_id, Direction, MembersAction, DEFAULT_CONTENT_TYPE};
pub use retry::{send_reliable, ClientSource, Reconnector, RetryPolicy};
pub use switchboard_proto::codec::Encoding;
pub use switchboard_proto::ErrorCode;
pub use timeline::{
    apply_event, EventKind, Gap, HistorySource, Observed, Timeline, DEFAULT_MAX_AHEAD, FILL_PAGE,
};
