//! A small HTTP/1.1 client for the controller's and the agents' APIs: bearer token on every
//! request, a deadline on every call, a bound on every response body.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
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
    inner: Transport,
}

#[derive(Clone)]
enum Transport {
    /// hyper's pool: connections opened as calls need them, idle ones kept for reuse.
    Pooled(HyperClient<HttpConnector, Full<Bytes>>),
    /// One connection of the client's own, for one call at a time ([`Client::dedicated`]); None
    /// until the first call and after an error.
    Dedicated(Arc<tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>>),
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

/// Opens a connection of a [`Client::dedicated`] client's own; hyper's side of it runs as a task
/// of its own until either end closes it.
async fn open(host: &str, url: &str) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    let stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| ClientError::Unreachable(format!("{url}: cannot connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Unreachable(format!("{url}: {e}")))?;
    tokio::spawn(connection);
    Ok(sender)
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
        let inner = Transport::Pooled(hyper_client(timeout, 1));
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
        self.inner = Transport::Pooled(hyper_client(self.timeout, 0));
        self
    }

    /// A client with one connection of its own, which its calls (and its clones') take in turn,
    /// each waiting for the one before it to be answered; opened again after an error. Pooled
    /// clients open a connection for every call made while the others are in flight: the load
    /// generator's 12,500 simulated nodes fetch their tables over 64 of these instead of 12,500
    /// connections, past the files this host lets a process hold.
    pub fn dedicated(mut self) -> Client {
        self.inner = Transport::Dedicated(Arc::new(tokio::sync::Mutex::new(None)));
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
        let host = &self.base["http://".len()..];
        // A pooled client finds its connection by the absolute URI; a connection of one's own
        // is already to the host, and the request names it in its Host header.
        let uri = match self.inner {
            Transport::Pooled(_) => url.as_str(),
            Transport::Dedicated(_) => path,
        };
        let mut builder = Request::builder().method(method.clone()).uri(uri).header("host", host);
        builder = builder.header("authorization", format!("Bearer {}", self.token));
        let payload = match body {
            Some((bytes, content_type)) => {
                builder = builder.header("content-type", content_type);
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder.body(payload).map_err(|e| ClientError::Unreachable(format!("{url}: {e}")))?;
        let unreachable = |e: hyper::Error| ClientError::Unreachable(format!("{method} {url}: {e}"));
        let read_body = |response: hyper::Response<hyper::body::Incoming>| async {
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), self.max_response_bytes)
                .collect()
                .await
                .map_err(|e| ClientError::Unreachable(format!("{method} {url}: reading the response: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        let call = async {
            match &self.inner {
                Transport::Pooled(pool) => {
                    let response = pool
                        .request(request)
                        .await
                        .map_err(|e| ClientError::Unreachable(format!("{method} {url}: {e}")))?;
                    read_body(response).await
                }
                Transport::Dedicated(conn) => {
                    // Held through the whole call: the next one waits for this answer to end.
                    let mut conn = conn.lock().await;
                    let mut kept = conn.take();
                    // The server may have closed a kept connection while it was idle.
                    if let Some(sender) = kept.as_mut() {
                        if sender.ready().await.is_err() {
                            kept = None;
                        }
                    }
                    let mut sender = match kept {
                        Some(sender) => sender,
                        None => {
                            let mut fresh = open(host, &url).await?;
                            fresh.ready().await.map_err(unreachable)?;
                            fresh
                        }
                    };
                    let response = sender.send_request(request).await.map_err(unreachable)?;
                    let answer = read_body(response).await;
                    // Kept only after a whole answer: a failed call may leave the connection
                    // mid-message, and the next call opens a fresh one.
                    if answer.is_ok() {
                        *conn = Some(sender);
                    }
                    answer
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A bare HTTP/1.1 server on loopback answering `ok` to every request; it counts the
    /// connections it accepts and, with `close`, ends each connection after its first answer.
    async fn server(close: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        // The client sends no body: a request ends with its blank line.
                        while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            request.drain(..end + 4);
                            let header = if close { "Connection: close\r\n" } else { "" };
                            let answer = format!("HTTP/1.1 200 OK\r\n{header}Content-Length: 2\r\n\r\nok");
                            if stream.write_all(answer.as_bytes()).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (base, accepted)
    }

    #[tokio::test]
    async fn calls_made_at_once_through_a_dedicated_client_share_its_one_connection() {
        let (base, accepted) = server(false).await;
        let client = Client::new(&base, "t", Duration::from_secs(5)).unwrap().dedicated();
        // All in flight together, through clones: a pooled client opens a connection for each.
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.call(Method::GET, "/x", None).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dedicated_client_opens_a_new_connection_when_the_server_closed_its_own() {
        let (base, accepted) = server(true).await;
        let client = Client::new(&base, "t", Duration::from_secs(5)).unwrap().dedicated();
        for _ in 0..3 {
            assert_eq!(client.call(Method::GET, "/x", None).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }
}
