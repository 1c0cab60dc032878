//! Switchboard gateway service (to be filled in).
