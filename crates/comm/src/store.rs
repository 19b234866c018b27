//! The rendezvous key-value store rank 0 hosts on MASTER_ADDR:MASTER_PORT (torchrun's TCPStore
//! role). Keys are set once: a second SET of a key is refused, which is how a duplicate rank is
//! caught. Line protocol over TCP: `SET key value` → `OK` | `EXISTS`; `WAIT key ms` → `VAL value`
//! | `TIMEOUT`. Every line, key count and wait is bounded. A store started with the attempt's
//! secret (MYRIAD_COMM_SECRET) answers nothing until a connection says `AUTH secret` first: a
//! stray or hostile process on the network can neither read the ranks' addresses nor join.

use crate::error::{CommError, Result};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const MAX_LINE_BYTES: usize = 4096;
const MAX_KEYS: usize = 1 << 20;
const MAX_WAIT: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Shared {
    map: Mutex<HashMap<String, String>>,
    changed: Condvar,
}

/// A running store; stops accepting when dropped.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    pub fn start(listener: TcpListener, secret: Option<String>) -> Result<Self> {
        let addr = listener.local_addr().map_err(|e| CommError::Rendezvous(format!("store address: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("myriad-store".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = shared.clone();
                    let secret = secret.clone();
                    let _ = std::thread::Builder::new()
                        .name("myriad-store-conn".into())
                        .spawn(move || serve(conn, &shared, secret.as_deref()));
                }
            })
            .map_err(|e| CommError::Rendezvous(format!("store thread: {e}")))?;
        Ok(StoreServer { addr, stop, thread: Some(thread) })
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a connection may take to authenticate.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

fn serve(conn: TcpStream, shared: &Shared, secret: Option<&str>) {
    let _ = conn.set_read_timeout(Some(if secret.is_some() { AUTH_TIMEOUT } else { MAX_WAIT }));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if let Some(secret) = secret {
        let said = (&mut reader).take(MAX_LINE_BYTES as u64).read_line(&mut line).is_ok();
        let given = line.trim_end().strip_prefix("AUTH ").unwrap_or("");
        if !said || !crate::constant_time_eq(given.as_bytes(), secret.as_bytes()) {
            let _ = writer.write_all(b"DENIED\n");
            return;
        }
        if writer.write_all(b"OK\n").is_err() {
            return;
        }
        let _ = reader.get_ref().set_read_timeout(Some(MAX_WAIT));
    }
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE_BYTES as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = handle(line.trim_end(), shared);
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn handle(line: &str, shared: &Shared) -> String {
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("SET"), Some(key), Some(value)) => {
            let mut map = shared.map.lock().unwrap();
            if map.contains_key(key) {
                return "EXISTS\n".into();
            }
            if map.len() >= MAX_KEYS {
                return "FULL\n".into();
            }
            map.insert(key.to_string(), value.to_string());
            shared.changed.notify_all();
            "OK\n".into()
        }
        (Some("WAIT"), Some(key), Some(ms)) => {
            let wait = Duration::from_millis(ms.parse().unwrap_or(0)).min(MAX_WAIT);
            let deadline = Instant::now() + wait;
            let mut map = shared.map.lock().unwrap();
            loop {
                if let Some(v) = map.get(key) {
                    return format!("VAL {v}\n");
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return "TIMEOUT\n".into();
                }
                map = shared.changed.wait_timeout(map, left).unwrap().0;
            }
        }
        _ => "ERR bad request\n".into(),
    }
}

/// A client connection to the store.
pub struct StoreClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    master: String,
}

impl StoreClient {
    /// Connects to the store, retrying until `deadline` (rank 0 may start after the others), and
    /// authenticates with the attempt's secret when there is one.
    pub fn connect(master: &str, deadline: Instant, secret: Option<&str>) -> Result<Self> {
        let mut client = StoreClient::reach(master, deadline)?;
        if let Some(secret) = secret {
            match client.request(&format!("AUTH {secret}\n"), deadline)?.as_str() {
                "OK" => {}
                other => {
                    return Err(CommError::Rendezvous(format!(
                        "the store at {master} refused this rank's MYRIAD_COMM_SECRET ({other}): it belongs to another attempt"
                    )))
                }
            }
        }
        Ok(client)
    }

    fn reach(master: &str, deadline: Instant) -> Result<Self> {
        use std::net::ToSocketAddrs;
        let mut last_err = String::from("no address");
        loop {
            let addrs: Vec<SocketAddr> = match master.to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => {
                    return Err(CommError::Rendezvous(format!(
                        "MASTER_ADDR:MASTER_PORT {master} does not resolve: {e}"
                    )))
                }
            };
            for addr in &addrs {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
                match TcpStream::connect_timeout(addr, left.min(Duration::from_secs(2))) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let writer =
                            s.try_clone().map_err(|e| CommError::Rendezvous(format!("store socket: {e}")))?;
                        return Ok(StoreClient {
                            reader: BufReader::new(s),
                            writer,
                            master: master.to_string(),
                        });
                    }
                    Err(e) => last_err = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(CommError::Rendezvous(format!(
                    "could not reach the master store at {master} before the deadline ({last_err})"
                )));
            }
            // Rank 0 may not be listening yet: retry a few times a second until the deadline.
            std::thread::sleep(
                Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
    }

    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.writer.local_addr().ok().map(|a| a.ip())
    }

    fn request(&mut self, line: &str, deadline: Instant) -> Result<String> {
        let err = |e: std::io::Error| CommError::Rendezvous(format!("store at {}: {e}", self.master));
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.writer.set_write_timeout(Some(left)).map_err(err)?;
        self.reader.get_ref().set_read_timeout(Some(left + Duration::from_secs(1))).map_err(err)?;
        self.writer.write_all(line.as_bytes()).map_err(err)?;
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(0) => Err(CommError::Rendezvous(format!("store at {} closed the connection", self.master))),
            Ok(_) => Ok(reply.trim_end().to_string()),
            Err(e) => Err(err(e)),
        }
    }

    /// Sets `key` once; returns false if it was already set.
    pub fn set(&mut self, key: &str, value: &str, deadline: Instant) -> Result<bool> {
        assert!(!key.contains(' ') && !key.contains('\n') && !value.contains('\n'));
        match self.request(&format!("SET {key} {value}\n"), deadline)?.as_str() {
            "OK" => Ok(true),
            "EXISTS" => Ok(false),
            other => Err(CommError::Rendezvous(format!("store refused SET {key}: {other}"))),
        }
    }

    /// Waits until `key` is set, or the deadline passes.
    pub fn wait(&mut self, key: &str, deadline: Instant) -> Result<Option<String>> {
        let ms = deadline.saturating_duration_since(Instant::now()).as_millis();
        let reply = self.request(&format!("WAIT {key} {ms}\n"), deadline)?;
        match reply.strip_prefix("VAL ") {
            Some(v) => Ok(Some(v.to_string())),
            None if reply == "TIMEOUT" => Ok(None),
            None => Err(CommError::Rendezvous(format!("store refused WAIT {key}: {reply}"))),
        }
    }
}
