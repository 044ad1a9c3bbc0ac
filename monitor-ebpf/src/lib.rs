//! Library target only so `monitor` can name this crate as a
//! build-dependency (cargo then rebuilds the daemon when the eBPF sources
//! change); the program itself is the `monitor` binary in main.rs.
#![no_std]
