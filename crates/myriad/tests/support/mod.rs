//! Helpers shared by the test binaries that run real clusters: processes stopped when their guard
//! drops (even when an assertion fails), waits that poll a condition under a deadline, the CLI run
//! against a cluster directory, and plain-socket HTTP.
// Each test binary uses its own subset of these.
#![allow(dead_code)]

pub mod netns;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_myriad")
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("myriad-cluster-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process that is asked to stop (SIGTERM) and then killed when dropped.
pub struct Guard(pub Option<Child>);

impl Guard {
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit, at most `within`.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(15));
    }
}

/// Polls `f` every 50 ms until it yields a value or `within` passes.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a CLI command against the cluster in `dir`.
pub fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .env("MYRIAD_CLUSTER", dir.join(".myriad"))
        .current_dir(dir)
        .output()
        .unwrap()
}

pub fn cli_json(dir: &Path, args: &[&str]) -> Value {
    let out = cli(dir, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn job_state(dir: &Path, id: u64) -> Value {
    cli_json(dir, &["status", &id.to_string(), "--json"])
}

pub fn wait_job_state(dir: &Path, id: u64, states: &[&str], within: Duration) -> Value {
    wait_for(&format!("job {id} to be {states:?}"), within, || {
        let s = job_state(dir, id);
        states.contains(&s["job"]["state"].as_str().unwrap()).then_some(s)
    })
}

/// `myriad up` in `dir`; returns once it printed that the cluster is up.
pub fn up(dir: &Path, args: &[&str]) -> Guard {
    let mut child = Command::new(exe())
        .arg("up")
        .args(args)
        .args(["--json", "--heartbeat-ms", "200"])
        .env("MYRIAD_CLUSTER", dir.join(".myriad"))
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let info: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("`myriad up` printed {line:?}: {e}"));
    assert!(info["url"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    Guard(Some(child))
}

pub fn submit(dir: &Path, args: &[&str]) -> u64 {
    let mut all = vec!["submit", "--json"];
    all.extend_from_slice(args);
    cli_json(dir, &all)["id"].as_u64().unwrap()
}

/// The controller's `host:port` and the cluster token of the cluster `up` started in `dir`.
pub fn controller(dir: &Path) -> (String, String) {
    let state = dir.join(".myriad/controller");
    let url = std::fs::read_to_string(state.join("controller.url")).unwrap();
    let token = std::fs::read_to_string(state.join("token")).unwrap();
    (url.trim().trim_start_matches("http://").to_string(), token.trim().to_string())
}

/// The body of a GET with the cluster token, over a plain socket (HTTP/1.0: no chunking).
pub fn get(addr: &str, path: &str, token: &str) -> String {
    let (status, body) = get_status(addr, path, token);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// A GET's status code and body, whatever the status.
pub fn get_status(addr: &str, path: &str, token: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// The bytes of the final checkpoint's weights and optimizer state under `root`.
pub fn final_state(root: &Path) -> Vec<Vec<u8>> {
    let step = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("step_"))
        .unwrap_or_else(|| panic!("no final checkpoint under {}", root.display()));
    ["model.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|f| std::fs::read(step.join(f)).unwrap())
        .collect()
}

/// Pids of the live (not zombie) processes on this machine whose environment holds every one of
/// `vars` (`NAME=value`); every namespace's processes are visible here.
pub fn pids_with_env(vars: &[&str]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let have: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            !zombie && vars.iter().all(|v| have.contains(&v.as_bytes()))
        })
        .collect()
}

/// A process's command line, its arguments joined by spaces ("" once it is gone).
pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).split('\0').collect::<Vec<_>>().join(" ").trim().to_string()
}
