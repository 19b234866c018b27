//! Following ranks' output while a job runs (`myriad run`, `myriad logs --follow`): each poll asks
//! the controller for every followed log's bytes past what was already printed (`offset=`), and
//! prints complete lines, prefixed `[rankN]:` as torchrun does when asked. A new attempt starts
//! every log from its beginning; a log that does not exist yet (a rank still starting, a node
//! not reachable right now) is asked again on the next poll.

use net::client::{Client, Method};
use proto::api::{JobId, MAX_LOG_TAIL_BYTES};
use std::collections::BTreeMap;
use std::io::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One followed log: how far it was read, and the unfinished line at its end.
#[derive(Default)]
struct Log {
    offset: u64,
    partial: Vec<u8>,
}

pub struct Follower {
    job: JobId,
    ranks: Vec<u32>,
    streams: Vec<Stream>,
    /// Prefix lines with their rank.
    prefix: bool,
    attempt: Option<u32>,
    logs: BTreeMap<(u32, Stream), Log>,
}

impl Follower {
    pub fn new(job: JobId, ranks: Vec<u32>, streams: Vec<Stream>, prefix: bool) -> Follower {
        Follower { job, ranks, streams, prefix, attempt: None, logs: BTreeMap::new() }
    }

    /// Prints what the followed logs of `attempt` gained since the last poll. With `last`, the
    /// job has ended: every log is read to its end and unfinished lines are printed too.
    pub async fn poll(&mut self, client: &Client, attempt: u32, last: bool) {
        if self.attempt != Some(attempt) {
            // What the previous attempt wrote after the last poll is printed before the new one's.
            if let Some(previous) = self.attempt {
                self.read(client, previous).await;
            }
            self.finish_lines();
            self.logs.clear();
            self.attempt = Some(attempt);
        }
        self.read(client, attempt).await;
        if last {
            self.finish_lines();
        }
    }

    async fn read(&mut self, client: &Client, attempt: u32) {
        for rank in self.ranks.clone() {
            for stream in self.streams.clone() {
                loop {
                    let log = self.logs.entry((rank, stream)).or_default();
                    let path = format!(
                        "/v1/jobs/{}/logs?rank={rank}&attempt={attempt}&stream={}&offset={}",
                        self.job,
                        stream.name(),
                        log.offset
                    );
                    let Ok(bytes) = client.call(Method::GET, &path, None).await else { break };
                    log.offset += bytes.len() as u64;
                    log.partial.extend_from_slice(&bytes);
                    self.print_lines(rank, stream);
                    // A full answer may have left more behind.
                    if (bytes.len() as u64) < MAX_LOG_TAIL_BYTES {
                        break;
                    }
                }
            }
        }
    }

    fn print_lines(&mut self, rank: u32, stream: Stream) {
        let log = self.logs.get_mut(&(rank, stream)).expect("just polled");
        let Some(end) = log.partial.iter().rposition(|&b| b == b'\n') else { return };
        let complete: Vec<u8> = log.partial.drain(..=end).collect();
        emit(rank, stream, self.prefix, &complete);
    }

    /// Prints every unfinished line as it is.
    fn finish_lines(&mut self) {
        for (&(rank, stream), log) in &mut self.logs {
            if !log.partial.is_empty() {
                let mut rest = std::mem::take(&mut log.partial);
                rest.push(b'\n');
                emit(rank, stream, self.prefix, &rest);
            }
        }
    }
}

/// Writes complete lines to the stream they came from; a failed write (a closed pipe) is dropped.
fn emit(rank: u32, stream: Stream, prefix: bool, lines: &[u8]) {
    let text = String::from_utf8_lossy(lines);
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        if prefix {
            out += &format!("[rank{rank}]: ");
        }
        out += line;
        out.push('\n');
    }
    let _ = match stream {
        Stream::Stdout => {
            let mut o = std::io::stdout().lock();
            o.write_all(out.as_bytes()).and_then(|_| o.flush())
        }
        Stream::Stderr => std::io::stderr().lock().write_all(out.as_bytes()),
    };
}
