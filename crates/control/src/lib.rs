//! Myriad's controller: the edges around the pure core (`myriad_core`) that do IO: the SQLite
//! store ([`store`]), the HTTP server ([`server`], with its Prometheus [`metrics`] and its web
//! dashboard [`web`]). The wire types live in `proto`, the HTTP client and token in `net`.

pub mod metrics;
pub mod server;
pub mod store;
pub mod web;
