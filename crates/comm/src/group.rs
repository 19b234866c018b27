//! The process group: a ring of TCP connections (each rank sends to rank+1 and receives from
//! rank−1) built by rendezvous through rank 0's store, and the collectives over it.
//!
//! Every blocking socket call runs under the collective's deadline. On any failure the group
//! shuts its sockets down, so its ring neighbours fail at once instead of at their own deadline,
//! and the error travels around the ring in milliseconds: no surviving rank hangs.

use crate::error::{CommError, Result};
use crate::store::{StoreClient, StoreServer};
use proto::env;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest slice handed to one read or write call: bounds how stale a deadline check can get and
/// lets reduction of a received chunk overlap the next chunk's arrival.
const CHUNK_BYTES: usize = 1 << 20;
/// Default deadline of a collective and of rendezvous (the ceiling).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const HELLO_MAGIC: u32 = 0x4d59_5244; // "MYRD"
/// The ring's hello: magic, world size, rank (u32 each), then the attempt's secret block.
const HELLO_BYTES: usize = 12 + SECRET_BYTES;
const SECRET_BYTES: usize = 64;

/// The secret as the ring's hello carries it: its bytes, zero-padded (all zero without one).
fn secret_block(secret: Option<&str>) -> [u8; SECRET_BYTES] {
    let mut block = [0u8; SECRET_BYTES];
    if let Some(s) = secret {
        let bytes = s.as_bytes();
        let n = bytes.len().min(SECRET_BYTES);
        block[..n].copy_from_slice(&bytes[..n]);
    }
    block
}

#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Deadline of rendezvous and of every collective.
    pub timeout: Duration,
    /// Use a shared-memory ring with a ring neighbour on the same host (falls back to TCP
    /// when the neighbour cannot map it). MYRIAD_COMM_SHM=0 turns it off.
    pub shm: bool,
    /// The attempt's secret (MYRIAD_COMM_SECRET): the store and the ring accept only
    /// connections that present it. None (a group started by hand) accepts any.
    pub secret: Option<String>,
}

impl GroupConfig {
    /// Reads torchrun's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Returns None when
    /// WORLD_SIZE is unset (a plain single-process run).
    pub fn from_env() -> Result<Option<Self>> {
        let var = |name: &str| std::env::var(name).ok();
        let Some(world) = var(env::WORLD_SIZE) else {
            return Ok(None);
        };
        let parse = |name: &str, v: Option<String>| -> Result<usize> {
            let v =
                v.ok_or_else(|| CommError::Config(format!("{name} is not set ({} is)", env::WORLD_SIZE)))?;
            v.trim()
                .parse()
                .map_err(|_| CommError::Config(format!("{name}={v:?} is not a non-negative integer")))
        };
        let world_size = parse(env::WORLD_SIZE, Some(world))?;
        let rank = if world_size == 1 {
            parse(env::RANK, var(env::RANK)).unwrap_or(0)
        } else {
            parse(env::RANK, var(env::RANK))?
        };
        let master_addr = var(env::MASTER_ADDR).unwrap_or_else(|| "127.0.0.1".into());
        let port = var(env::MASTER_PORT).unwrap_or_else(|| "29500".into());
        let master_port = port
            .trim()
            .parse()
            .map_err(|_| CommError::Config(format!("{}={port:?} is not a port number", env::MASTER_PORT)))?;
        let timeout = match var(env::MYRIAD_COMM_TIMEOUT_S) {
            Some(s) => Duration::from_secs_f64(
                s.parse::<f64>().ok().filter(|v| *v > 0.0 && v.is_finite()).ok_or_else(|| {
                    CommError::Config(format!(
                        "{}={s:?} is not a positive number",
                        env::MYRIAD_COMM_TIMEOUT_S
                    ))
                })?,
            ),
            None => DEFAULT_TIMEOUT,
        };
        let shm = var(env::MYRIAD_COMM_SHM).is_none_or(|v| v != "0");
        let secret = var(env::MYRIAD_COMM_SECRET).filter(|s| !s.is_empty());
        let cfg = GroupConfig { rank, world_size, master_addr, master_port, timeout, shm, secret };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(CommError::Config("WORLD_SIZE must be at least 1".into()));
        }
        if self.rank >= self.world_size {
            return Err(CommError::Config(format!(
                "RANK {} is not below WORLD_SIZE {}",
                self.rank, self.world_size
            )));
        }
        Ok(())
    }
}

/// Unblocks a collective running on another thread: its sockets are shut down and it returns
/// [`CommError::Aborted`].
#[derive(Clone)]
pub struct AbortHandle {
    streams: Arc<Vec<TcpStream>>,
    aborted: Arc<AtomicBool>,
}

impl AbortHandle {
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        for s in self.streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

pub struct ProcessGroup {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Connection to rank+1 (we write) and from rank−1 (we read); None when world is 1.
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    /// Shared-memory rings replacing the streams' data path when the neighbour is on this host;
    /// the streams then only signal liveness.
    next_shm: Option<Link>,
    prev_shm: Option<Link>,
    /// Every link of the ring is shared memory, so all-reduce runs the fused streaming schedule
    /// (all ranks agree on this at rendezvous: the schedules do not interoperate).
    fused: bool,
    aborted: Arc<AtomicBool>,
    abort_streams: Arc<Vec<TcpStream>>,
    broken: Mutex<Option<String>>,
    /// Receive buffer reused across collectives (a fresh one per call costs page faults).
    scratch: Mutex<Vec<f32>>,
    _store: Option<StoreServer>,
}

#[cfg(target_os = "linux")]
type Link = crate::shm::ShmRing;
#[cfg(not(target_os = "linux"))]
type Link = std::convert::Infallible;

#[cfg(target_os = "linux")]
fn stall_err(op: &'static str, peer: usize, stall: crate::shm::Stall) -> CommError {
    match stall {
        crate::shm::Stall::Deadline => CommError::Timeout { op, peer, timeout: Duration::ZERO },
        crate::shm::Stall::PeerClosed => CommError::PeerClosed { op, peer },
        crate::shm::Stall::Aborted => CommError::Aborted { op },
    }
}

/// After the hellos: each rank offers rank+1 a shared-memory ring it created, and answers
/// rank−1's offer by mapping its ring (or declining, e.g. on another host or another /dev/shm).
/// The creator unlinks the file once answered, so nothing is left behind even after a crash.
/// Offers and answers are a few bytes each, so no rank blocks the ring while negotiating.
fn negotiate_shm(
    cfg: &GroupConfig,
    next: &mut TcpStream,
    prev: &mut TcpStream,
    deadline: Instant,
) -> Result<(Option<Link>, Option<Link>)> {
    let rv = |m: String| CommError::Rendezvous(m);
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let (next_rank, prev_rank) =
        ((cfg.rank + 1) % cfg.world_size, (cfg.rank + cfg.world_size - 1) % cfg.world_size);
    #[cfg(target_os = "linux")]
    let offered: Option<(std::path::PathBuf, Link)> = cfg
        .shm
        .then(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let path = std::path::PathBuf::from(format!(
                "/dev/shm/myriad-{}-{}-{nanos}",
                std::process::id(),
                cfg.rank
            ));
            let ring = crate::shm::ShmRing::create(&path, next.try_clone().ok()?).ok()?;
            Some((path, ring))
        })
        .flatten();
    #[cfg(not(target_os = "linux"))]
    let offered: Option<(std::path::PathBuf, Link)> = None;

    let mut offer = vec![0u8; 3];
    if let Some((path, _)) = &offered {
        let name = path.to_string_lossy().into_owned().into_bytes();
        offer = vec![1];
        offer.extend_from_slice(&(name.len() as u16).to_le_bytes());
        offer.extend_from_slice(&name);
    }
    next.set_write_timeout(Some(left())).ok();
    next.write_all(&offer).map_err(|e| rv(format!("shared-memory offer to rank {next_rank}: {e}")))?;

    prev.set_read_timeout(Some(left())).ok();
    let mut head = [0u8; 3];
    prev.read_exact(&mut head).map_err(|e| rv(format!("shared-memory offer from rank {prev_rank}: {e}")))?;
    let mut accepted: Option<Link> = None;
    if head[0] == 1 {
        let mut name = vec![0u8; u16::from_le_bytes([head[1], head[2]]) as usize];
        prev.read_exact(&mut name)
            .map_err(|e| rv(format!("shared-memory offer from rank {prev_rank}: {e}")))?;
        #[cfg(target_os = "linux")]
        if cfg.shm {
            let path = std::path::PathBuf::from(String::from_utf8_lossy(&name).into_owned());
            accepted = prev.try_clone().ok().and_then(|s| crate::shm::ShmRing::open(&path, s).ok());
        }
    }
    prev.set_write_timeout(Some(left())).ok();
    prev.write_all(&[u8::from(accepted.is_some())])
        .map_err(|e| rv(format!("shared-memory answer to rank {prev_rank}: {e}")))?;

    let mut answer = [0u8; 1];
    next.set_read_timeout(Some(left())).ok();
    let got = next.read_exact(&mut answer);
    let sending = match offered {
        Some((path, ring)) => {
            let _ = std::fs::remove_file(&path);
            (got.is_ok() && answer[0] == 1).then_some(ring)
        }
        None => None,
    };
    got.map_err(|e| rv(format!("shared-memory answer from rank {next_rank}: {e}")))?;
    Ok((sending, accepted))
}

/// Puts a received piece that starts at element `offset` of the message into `dst`: copied, or
/// added onto what is there with `add`. Returns the part of `dst` it landed in.
fn land<'a>(dst: &'a mut [f32], offset: usize, piece: &[f32], add: bool) -> &'a mut [f32] {
    let d = &mut dst[offset..offset + piece.len()];
    if add {
        d.iter_mut().zip(piece).for_each(|(d, s)| *d += s);
    } else {
        d.copy_from_slice(piece);
    }
    d
}

fn bytes_as_f32(bytes: &[u8]) -> &[f32] {
    assert!(
        bytes.len().is_multiple_of(4)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>())
    );
    // SAFETY: length and alignment checked; every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) }
}

fn io_err(op: &'static str, peer: usize, e: std::io::Error) -> CommError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            CommError::Timeout { op, peer, timeout: Duration::ZERO }
        }
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => CommError::PeerClosed { op, peer },
        _ => CommError::Io { op, peer, source: e },
    }
}

impl ProcessGroup {
    /// Rendezvous: rank 0 serves the store; every rank publishes its ring listener, connects to
    /// rank+1 and accepts rank−1, checking world size and rank on both ends.
    pub fn connect(cfg: &GroupConfig) -> Result<Self> {
        cfg.validate()?;
        let deadline = Instant::now() + cfg.timeout;
        let (rank, world) = (cfg.rank, cfg.world_size);
        if world == 1 {
            return Ok(ProcessGroup {
                rank,
                world,
                timeout: cfg.timeout,
                next: None,
                prev: None,
                next_shm: None,
                prev_shm: None,
                fused: false,
                aborted: Arc::new(AtomicBool::new(false)),
                abort_streams: Arc::new(Vec::new()),
                broken: Mutex::new(None),
                scratch: Mutex::new(Vec::new()),
                _store: None,
            });
        }
        let master = format!("{}:{}", cfg.master_addr, cfg.master_port);
        let store = if rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", cfg.master_port)).map_err(|e| {
                CommError::Rendezvous(format!(
                    "rank 0 cannot serve the store on port {}: {e}",
                    cfg.master_port
                ))
            })?;
            Some(StoreServer::start(listener, cfg.secret.clone())?)
        } else {
            None
        };
        let mut client = StoreClient::connect(&master, deadline, cfg.secret.as_deref())?;
        let rv = |m: String| CommError::Rendezvous(m);

        // World size: rank 0 states it, everyone else must agree.
        if rank == 0 {
            client.set("world_size", &world.to_string(), deadline)?;
        } else {
            let theirs = client.wait("world_size", deadline)?.ok_or_else(|| {
                rv(format!("rank 0 did not publish its world size at {master} before the deadline"))
            })?;
            if theirs != world.to_string() {
                return Err(rv(format!("this rank has WORLD_SIZE {world} but rank 0 has {theirs}")));
            }
        }

        let listener = TcpListener::bind(("0.0.0.0", 0)).map_err(|e| rv(format!("ring listener: {e}")))?;
        let port = listener.local_addr().map_err(|e| rv(format!("ring listener: {e}")))?.port();
        let ip = client.local_ip().ok_or_else(|| rv("cannot tell this host's address".into()))?;
        if !client.set(&format!("rank/{rank}"), &SocketAddr::new(ip, port).to_string(), deadline)? {
            return Err(rv(format!("RANK {rank} joined twice (another process already registered it)")));
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_addr: SocketAddr = client
            .wait(&format!("rank/{next_rank}"), deadline)?
            .ok_or_else(|| rv(format!("rank {next_rank} did not join before the deadline")))?
            .parse()
            .map_err(|e| rv(format!("rank {next_rank} published a bad address: {e}")))?;

        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let mut next = TcpStream::connect_timeout(&next_addr, left)
            .map_err(|e| rv(format!("cannot connect to rank {next_rank} at {next_addr}: {e}")))?;
        next.set_nodelay(true).ok();
        let mut hello = Vec::with_capacity(HELLO_BYTES);
        for v in [HELLO_MAGIC, world as u32, rank as u32] {
            hello.extend_from_slice(&v.to_le_bytes());
        }
        hello.extend_from_slice(&secret_block(cfg.secret.as_deref()));
        next.set_write_timeout(Some(left)).ok();
        next.write_all(&hello).map_err(|e| rv(format!("hello to rank {next_rank}: {e}")))?;

        // Accept rank−1 with a deadline (std's accept has none, so poll a non-blocking listener).
        // A connection that does not say the ring's hello with the attempt's secret is dropped,
        // and the wait for rank−1 goes on.
        listener.set_nonblocking(true).map_err(|e| rv(format!("ring listener: {e}")))?;
        let expected = secret_block(cfg.secret.as_deref());
        let (mut prev, got) = loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).ok();
                    let left =
                        deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                    s.set_read_timeout(Some(left.min(Duration::from_secs(5)))).ok();
                    let mut got = [0u8; HELLO_BYTES];
                    if s.read_exact(&mut got).is_err()
                        || got[..4] != HELLO_MAGIC.to_le_bytes()
                        || !crate::constant_time_eq(&got[12..], &expected)
                    {
                        continue;
                    }
                    break (s, got);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(rv(format!(
                            "rank {prev_rank} did not connect with this attempt's ring hello before the deadline"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(rv(format!("accepting rank {prev_rank}: {e}"))),
            }
        };
        prev.set_nodelay(true).ok();
        prev.set_read_timeout(Some(
            deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
        ))
        .ok();
        let word = |i: usize| u32::from_le_bytes(got[4 * i..4 * i + 4].try_into().unwrap());
        if word(1) as usize != world || word(2) as usize != prev_rank {
            return Err(rv(format!(
                "expected rank {prev_rank} of {world} before this rank, got rank {} of {}",
                word(2),
                word(1)
            )));
        }
        let (next_shm, prev_shm) = negotiate_shm(cfg, &mut next, &mut prev, deadline)?;
        let abort_streams = Arc::new(vec![
            next.try_clone().map_err(|e| rv(e.to_string()))?,
            prev.try_clone().map_err(|e| rv(e.to_string()))?,
        ]);
        let mut group = ProcessGroup {
            rank,
            world,
            timeout: cfg.timeout,
            next: Some(next),
            prev: Some(prev),
            fused: false,
            next_shm,
            prev_shm,
            aborted: Arc::new(AtomicBool::new(false)),
            abort_streams,
            broken: Mutex::new(None),
            scratch: Mutex::new(Vec::new()),
            _store: store,
        };
        // Which ranks have shared memory on both links; also a barrier: nobody returns before
        // everyone is connected, so the store may go away after this.
        let mut both_shm = vec![0f32; world];
        both_shm[rank] = f32::from(u8::from(group.next_shm.is_some() && group.prev_shm.is_some()));
        group.all_gather(&mut both_shm)?;
        group.fused = both_shm.iter().all(|&f| f == 1.0);
        Ok(group)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the deadline of later collectives (e.g. derived from the observed step time).
    pub fn set_timeout(&mut self, timeout: Duration) {
        assert!(!timeout.is_zero());
        self.timeout = timeout;
    }

    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle { streams: self.abort_streams.clone(), aborted: self.aborted.clone() }
    }

    fn check_usable(&self) -> Result<()> {
        if let Some(first) = self.broken.lock().unwrap().as_ref() {
            return Err(CommError::Broken(first.clone()));
        }
        Ok(())
    }

    /// Records the first failure and shuts the sockets, so neighbours fail now, not at a deadline.
    fn fail(&self, op: &'static str, e: CommError) -> CommError {
        let e = match e {
            _ if self.aborted.load(Ordering::Acquire) => CommError::Aborted { op },
            CommError::Timeout { op, peer, .. } => CommError::Timeout { op, peer, timeout: self.timeout },
            other => other,
        };
        let mut broken = self.broken.lock().unwrap();
        if broken.is_none() {
            *broken = Some(e.to_string());
        }
        for s in self.abort_streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        e
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }
    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn write_all(&self, op: &'static str, bytes: &[u8], deadline: Instant) -> Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(ring) = &self.next_shm {
            return ring.send(bytes, deadline, &self.aborted).map_err(|s| stall_err(op, self.next_rank(), s));
        }
        let mut s = self.next.as_ref().expect("ring stream");
        for chunk in bytes.chunks(CHUNK_BYTES) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CommError::Timeout { op, peer: self.next_rank(), timeout: Duration::ZERO });
            }
            s.set_write_timeout(Some(left)).map_err(|e| io_err(op, self.next_rank(), e))?;
            s.write_all(chunk).map_err(|e| io_err(op, self.next_rank(), e))?;
        }
        Ok(())
    }

    /// Receives `dst.len()` floats from rank−1, copying them into `dst` or, with `add`, adding
    /// them to it; `landed(first_index, piece)` sees each finished piece of `dst` as it completes,
    /// so the reduction and any forwarding overlap the arrival of the rest.
    fn receive(
        &self,
        op: &'static str,
        dst: &mut [f32],
        add: bool,
        deadline: Instant,
        mut landed: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(ring) = &self.prev_shm {
            return ring
                .recv(dst.len() * 4, deadline, &self.aborted, |offset, piece| {
                    landed(offset / 4, land(dst, offset / 4, bytes_as_f32(piece), add));
                })
                .map_err(|s| stall_err(op, self.prev_rank(), s));
        }
        let mut s = self.prev.as_ref().expect("ring stream");
        let per_chunk = CHUNK_BYTES / 4;
        let mut scratch = if add { Some(self.scratch.lock().unwrap()) } else { None };
        for (i, chunk) in dst.chunks_mut(per_chunk).enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CommError::Timeout { op, peer: self.prev_rank(), timeout: Duration::ZERO });
            }
            s.set_read_timeout(Some(left)).map_err(|e| io_err(op, self.prev_rank(), e))?;
            match scratch.as_mut() {
                Some(tmp) => {
                    tmp.resize(chunk.len(), 0.0);
                    s.read_exact(as_bytes_mut(tmp)).map_err(|e| io_err(op, self.prev_rank(), e))?;
                    land(chunk, 0, tmp, true);
                }
                None => s.read_exact(as_bytes_mut(chunk)).map_err(|e| io_err(op, self.prev_rank(), e))?,
            }
            landed(i * per_chunk, chunk);
        }
        Ok(())
    }

    /// Sends `send` to rank+1 while receiving into (or adding into) `dst` from rank−1; a
    /// writer thread keeps the exchange full-duplex, so neither side waits on the other.
    fn exchange(
        &self,
        op: &'static str,
        send: &[f32],
        dst: &mut [f32],
        add: bool,
        deadline: Instant,
    ) -> Result<()> {
        #[cfg(target_os = "linux")]
        if let (Some(out), Some(inp)) = (&self.next_shm, &self.prev_shm) {
            let len = dst.len() * 4;
            let landed = |offset: usize, piece: &[u8]| {
                land(dst, offset / 4, bytes_as_f32(piece), add);
            };
            return crate::shm::exchange(out, as_bytes(send), inp, len, deadline, &self.aborted, landed)
                .map_err(|(receiving, s)| {
                    stall_err(op, if receiving { self.prev_rank() } else { self.next_rank() }, s)
                });
        }
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| self.write_all(op, as_bytes(send), deadline));
            let read = self.receive(op, dst, add, deadline, |_, _| {});
            if read.is_err() {
                // Unblock our own writer too; the group is unusable after this anyway.
                if let Some(s) = &self.next {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
            let write = writer.join().expect("ring writer thread panicked");
            read.and(write)
        })
    }

    fn guarded<T>(&self, op: &'static str, f: impl FnOnce(Instant) -> Result<T>) -> Result<T> {
        self.check_usable()?;
        if self.aborted.load(Ordering::Acquire) {
            return Err(self.fail(op, CommError::Aborted { op }));
        }
        f(Instant::now() + self.timeout).map_err(|e| self.fail(op, e))
    }

    /// Sums `buf` elementwise over all ranks, in place (ring reduce-scatter then all-gather).
    /// Each element is summed in an order fixed by its position, so every rank and every run
    /// gets the same bits.
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.guarded("all_reduce", |deadline| {
            #[cfg(target_os = "linux")]
            if let (true, Some(out), Some(inp)) = (self.fused, &self.next_shm, &self.prev_shm) {
                return crate::shm::all_reduce_fused(
                    out,
                    inp,
                    buf,
                    self.rank,
                    self.world,
                    deadline,
                    &self.aborted,
                )
                .map_err(|(receiving, s)| {
                    stall_err("all_reduce", if receiving { self.prev_rank() } else { self.next_rank() }, s)
                });
            }
            self.reduce_scatter_inner(buf, deadline)?;
            self.all_gather_inner(buf, deadline)
        })
    }

    /// Reduce-scatter in place: afterwards this rank's segment ([`segment`]) of `buf` holds the
    /// sum over ranks; the other segments hold partial sums.
    pub fn reduce_scatter_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.guarded("reduce_scatter", |deadline| self.reduce_scatter_inner(buf, deadline))
    }

    /// All-gather in place: every rank's segment ([`segment`]) of `buf` is copied to all ranks.
    pub fn all_gather(&self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.guarded("all_gather", |deadline| self.all_gather_inner(buf, deadline))
    }

    fn reduce_scatter_inner(&self, buf: &mut [f32], deadline: Instant) -> Result<()> {
        let (n, r) = (self.world, self.rank);
        for step in 0..n - 1 {
            let send_seg = segment(buf.len(), n, (r + 2 * n - step - 1) % n);
            let recv_seg = segment(buf.len(), n, (r + 2 * n - step - 2) % n);
            let (send, dst) = disjoint(buf, send_seg, recv_seg);
            self.exchange("reduce_scatter", send, dst, true, deadline)?;
        }
        Ok(())
    }

    fn all_gather_inner(&self, buf: &mut [f32], deadline: Instant) -> Result<()> {
        let (n, r) = (self.world, self.rank);
        for step in 0..n - 1 {
            let send_seg = segment(buf.len(), n, (r + n - step) % n);
            let recv_seg = segment(buf.len(), n, (r + 2 * n - step - 1) % n);
            let (send, dst) = disjoint(buf, send_seg, recv_seg);
            self.exchange("all_gather", send, dst, false, deadline)?;
        }
        Ok(())
    }

    /// Copies `buf` from rank `root` to every rank (pipelined along the ring in chunks).
    pub fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        assert!(root < self.world, "broadcast root {root} outside world {}", self.world);
        if self.world == 1 {
            return Ok(());
        }
        self.guarded("broadcast", |deadline| {
            if self.rank == root {
                return self.write_all("broadcast", as_bytes(buf), deadline);
            }
            let forward = self.next_rank() != root;
            let mut write_err = None;
            self.receive("broadcast", buf, false, deadline, |_, piece| {
                if forward && write_err.is_none() {
                    write_err = self.write_all("broadcast", as_bytes(piece), deadline).err();
                }
            })?;
            write_err.map_or(Ok(()), Err)
        })
    }

    /// Returns once every rank has called it (each rank's token travels the whole ring).
    pub fn barrier(&self) -> Result<()> {
        let mut tokens = vec![0f32; self.world];
        tokens[self.rank] = 1.0;
        self.all_gather(&mut tokens)?;
        debug_assert!(tokens.iter().all(|&t| t == 1.0));
        Ok(())
    }
}

/// The index range of segment `i` when `len` elements are split over `n` ranks (the first
/// `len % n` segments are one longer).
pub fn segment(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// A shared view of range `a` and a mutable view of range `b` of one buffer (`a`, `b` disjoint).
fn disjoint(buf: &mut [f32], a: std::ops::Range<usize>, b: std::ops::Range<usize>) -> (&[f32], &mut [f32]) {
    assert!(a.end <= b.start || b.end <= a.start, "ring segments overlap");
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

fn as_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: every bit pattern is a valid f32; the byte view has the same lifetime and length.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

fn as_bytes(x: &[f32]) -> &[u8] {
    // The wire format is little-endian f32; on little-endian hosts that is the memory layout.
    #[cfg(not(target_endian = "little"))]
    compile_error!("the ring wire format assumes a little-endian host");
    // SAFETY: f32 has no padding or invalid bit patterns; the byte view has the same lifetime.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}
