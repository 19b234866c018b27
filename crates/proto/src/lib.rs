//! Myriad's contracts, each rule in one place: the controller's API and the job spec ([`api`],
//! [`spec`]), the environment every rank gets ([`env`]), the progress message a rank sends its
//! agent ([`progress`]), the checkpoint directory layout and its verification ([`checkpoint`]),
//! the kinds of events ([`events`]) and the agent's side of the heartbeat protocol ([`node`]).
//!
//! Serde-level dependencies only (and SHA-256 for manifests): the controller's core, the
//! simulator, the agent, the trainer and the binary all link this crate, and none of them may pull
//! a runtime, a server or a database through it.

pub mod api;
pub mod checkpoint;
pub mod env;
pub mod events;
pub mod node;
pub mod progress;
pub mod spec;
pub mod vec_map;
