//! Training (SPEC §4): the step (networks, loss, backward, AdamW) and the loop around it.

pub mod api;
