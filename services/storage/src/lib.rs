//! Switchboard storage service (to be filled in).
