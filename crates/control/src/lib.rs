//! Myriad's controller: the deterministic core ([`core`]), the job specs it accepts ([`spec`]), the
//! wire types ([`api`]), and the edges that do IO: the SQLite store ([`store`]), the HTTP server
//! ([`server`], with its Prometheus [`metrics`] and its web dashboard [`web`]) and the HTTP client
//! the agents and the CLI use ([`client`]).

pub mod api;
pub mod auth;
pub mod client;
pub mod core;
pub mod metrics;
pub mod server;
pub mod spec;
pub mod store;
pub mod web;
