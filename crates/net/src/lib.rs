//! The HTTP pieces both edges (the controller's server and the node agent) share: the client with
//! deadlines and a response bound ([`client`]), the cluster token ([`auth`]), and the server side's
//! one JSON error type, token check and shutdown signal ([`http`]).

pub mod auth;
pub mod client;
pub mod http;
