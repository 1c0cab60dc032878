//! Switchboard presence service (to be filled in).
