//! Switchboard routing service (to be filled in).
