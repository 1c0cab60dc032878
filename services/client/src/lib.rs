//! Switchboard client library.
