//! Slices of many chips (issue 9, in progress; the planned layout is in docs/architecture.md):
//! [`topology`] — chips, cores, hosts and the directed ICI links of a slice; [`network`] —
//! transfers over those links, chunked, queueing where they share a link; [`collectives`] —
//! reduce-scatter, all-gather and all-reduce as bidirectional rings, axis by axis, timed on
//! the network and held to their closed forms, and the values an all-reduce leaves, summed in
//! the algorithm's order.

pub mod collectives;
pub mod network;
pub mod slice;
pub mod topology;
