//! A small HTTP/1.1 client for the controller's and the agents' APIs: bearer token on every
//! request, a deadline on every call, a bound on every response body.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

use proto::api::ErrorBody;

pub use hyper::Method;

/// Largest response body read (logs are fetched as tails well below this).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

#[derive(Debug)]
pub enum ClientError {
    /// The server could not be reached or did not answer in time.
    Unreachable(String),
    /// The server answered with an error status; `message` is its explanation.
    Status { status: u16, message: String },
    /// A 2xx answer whose body was not what the API promises.
    BadBody(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable(m) => write!(f, "{m}"),
            ClientError::Status { status, message } => write!(f, "HTTP {status}: {message}"),
            ClientError::BadBody(m) => write!(f, "unexpected response: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    timeout: Duration,
    max_response_bytes: usize,
    inner: HyperClient<HttpConnector, Full<Bytes>>,
}

fn hyper_client(
    connect_timeout: Duration,
    max_idle_per_host: usize,
) -> HyperClient<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

impl Client {
    /// `base` is `http://host:port`; no TLS (cluster-internal networks), no path.
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<Client, String> {
        let trimmed = base.trim_end_matches('/');
        let rest = trimmed
            .strip_prefix("http://")
            .ok_or_else(|| format!("controller URL {base:?} must start with http://"))?;
        if rest.is_empty() || rest.contains('/') {
            return Err(format!("controller URL {base:?} must be http://HOST:PORT"));
        }
        // One idle connection per host: an agent calling again the moment an answer arrives
        // (before the pool has its connection back) opens a second one, which is then closed
        // rather than kept; at 1,250 agents every extra socket costs the controller ~30 KB.
        let inner = hyper_client(timeout, 1);
        Ok(Client {
            base: trimmed.to_string(),
            token: token.to_string(),
            timeout,
            max_response_bytes: MAX_RESPONSE_BYTES,
            inner,
        })
    }

    /// A client that closes each connection after its call instead of keeping it for reuse:
    /// for one-off calls (doorbells) to thousands of hosts, whose idle connections would
    /// otherwise hold buffers for the pool's idle timeout.
    pub fn unpooled(mut self) -> Client {
        self.inner = hyper_client(self.timeout, 0);
        self
    }

    /// Raises (or lowers) the bound on response bodies, for bulk transfers such as checkpoints.
    pub fn with_response_limit(mut self, bytes: usize) -> Client {
        self.max_response_bytes = bytes;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request; returns the status and the body, whatever the status.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<(u16, Bytes), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder().method(method.clone()).uri(&url);
        builder = builder.header("authorization", format!("Bearer {}", self.token));
        let payload = match body {
            Some((bytes, content_type)) => {
                builder = builder.header("content-type", content_type);
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder.body(payload).map_err(|e| ClientError::Unreachable(format!("{url}: {e}")))?;
        let call = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|e| ClientError::Unreachable(format!("{method} {url}: {e}")))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), self.max_response_bytes)
                .collect()
                .await
                .map_err(|e| ClientError::Unreachable(format!("{method} {url}: reading the response: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                Err(ClientError::Unreachable(format!("{method} {url}: no answer within {:?}", self.timeout)))
            }
        }
    }

    /// A request whose 2xx body is returned raw; other statuses become [`ClientError::Status`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<Bytes, ClientError> {
        let (status, bytes) = self.request(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
        Err(ClientError::Status { status, message })
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadBody(format!("GET {path}: {e}")))
    }

    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let json = serde_json::to_vec(body).expect("API types serialise");
        let bytes = self.call(Method::POST, path, Some((json, "application/json"))).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadBody(format!("POST {path}: {e}")))
    }
}
