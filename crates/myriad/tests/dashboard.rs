//! The web dashboard in a real browser: headless Chromium, driven over WebDriver by chromedriver
//! (Debian packages chromium and chromium-driver), opens the dashboard of a local cluster whose
//! job has survived a fault, checks what a person would look at, and saves a screenshot.
//! Without chromedriver the test is skipped, unless MYRIAD_REQUIRE_CHROMIUM is set (`.ci/run`
//! sets it): then it fails.

mod support;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{cli, controller, get, scratch, submit, up, wait_for, Guard};

/// An executable on PATH (or in /usr/bin, where Debian puts these), if there is one.
fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]).collect::<Vec<_>>();
    names.iter().flat_map(|n| dirs.iter().map(move |d| d.join(n))).find(|p| p.is_file())
}

/// One WebDriver call: JSON in, the reply's `value` out. chromedriver keeps the connection open
/// whatever the request says, so the reply ends where its Content-Length says.
fn webdriver(port: u16, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("chromedriver: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let (head_len, length) = loop {
        let n = s.read(&mut buf).map_err(|e| format!("{method} {path}: {e}"))?;
        if n == 0 {
            return Err(format!("{method} {path}: connection closed before the headers ended"));
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| format!("{method} {path}: no Content-Length in {head}"))?;
            break (end + 4, length);
        }
    };
    while raw.len() < head_len + length {
        let n = s.read(&mut buf).map_err(|e| format!("{method} {path}: {e}"))?;
        if n == 0 {
            return Err(format!("{method} {path}: connection closed mid-reply"));
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&raw[..head_len]);
    let payload = &raw[head_len..head_len + length];
    let reply: Value = serde_json::from_slice(payload)
        .map_err(|e| format!("{method} {path}: {e}: {:.300}", String::from_utf8_lossy(payload)))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{method} {path}: {head:.40}: {reply}"));
    }
    Ok(reply["value"].clone())
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> =
        text.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A browser session, closed (and its Chromium with it) when dropped.
struct Session {
    port: u16,
    id: String,
}

impl Session {
    fn start(port: u16, chromium: &std::path::Path) -> Session {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                // Root in a container: no sandbox, no GPU, /tmp rather than a small /dev/shm.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--hide-scrollbars", "--window-size=1400,1400"],
            },
        }}});
        let value = webdriver(port, "POST", "/session", Some(caps)).expect("chromedriver starts Chromium");
        Session { port, id: value["sessionId"].as_str().unwrap().to_string() }
    }

    fn call(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}/{what}", self.id);
        webdriver(self.port, method, &path, body).unwrap_or_else(|e| panic!("{e}"))
    }

    fn open(&self, url: &str) {
        self.call("POST", "url", Some(json!({ "url": url })));
    }

    fn script(&self, body: &str) -> Value {
        self.call("POST", "execute/sync", Some(json!({ "script": body, "args": [] })))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = webdriver(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

/// What a person would look at, read from the page.
const READ_PAGE: &str = r#"
const q = (s) => document.querySelector(s);
const chart = (k) => ({
  value: q('#chart-' + k + ' .value').textContent,
  points: Number(q('#chart-' + k).dataset.points || 0),
  line: q('#chart-' + k + ' polyline') ? q('#chart-' + k + ' polyline').getAttribute('points').split(' ').length : 0,
});
return {
  polls: Number(document.body.dataset.polls || 0),
  login_shown: !q('#login').hidden,
  main_shown: !q('#main').hidden,
  conn: q('#conn').textContent,
  href: location.href,
  rows: [...document.querySelectorAll('#jobs-table tbody tr')].map((tr) => [...tr.children].map((td) => td.textContent)),
  charts: { loss: chart('loss'), tokens: chart('tokens'), mfu: chart('mfu'), ettr: chart('ettr') },
  fault_windows: document.querySelectorAll('#chart-loss .fault-window').length,
  events: [...document.querySelectorAll('#events li')].map((li) => li.dataset.kind),
  recovery_bars: document.querySelectorAll('#events .recovery').length,
  nodes: document.querySelectorAll('#node-grid .node').length,
  busy: document.querySelectorAll('#node-grid .node.busy').length,
  spare: document.querySelectorAll('#node-grid .node.spare').length,
  gpu_warning: document.querySelectorAll('#node-grid .node.gpu-warning').length,
  time_bar: document.querySelectorAll('#time-bar span').length,
};
"#;

#[test]
fn the_dashboard_shows_a_faulted_jobs_table_live_charts_timeline_and_nodes_in_chromium() {
    let (Some(driver), Some(chromium)) = (find(&["chromedriver"]), find(&["chromium", "chromium-browser"]))
    else {
        assert!(
            std::env::var_os("MYRIAD_REQUIRE_CHROMIUM").is_none(),
            "MYRIAD_REQUIRE_CHROMIUM is set but chromedriver or chromium is missing"
        );
        eprintln!(
            "chromium or chromedriver not installed: skipping (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let dir = scratch("dashboard");
    // One GPU per node (the agents' fake backend); node-0's runs hot: a GPU warning on the grid.
    let gpus = dir.join("gpus");
    std::fs::create_dir_all(&gpus).unwrap();
    for (node, throttle) in [("node-0", r#"["thermal"]"#), ("node-1", "[]"), ("spare-0", "[]")] {
        let gpu = format!(
            r#"{{"uuid":"GPU-{node}","bus_id":"00000000:18:00.0","model":"NVIDIA H200","memory_mib":143771,"throttle":{throttle}}}"#
        );
        std::fs::write(
            gpus.join(format!("{node}.json")),
            format!(r#"{{"driver":"550.54.15","gpus":[{gpu}]}}"#),
        )
        .unwrap();
    }
    let _cluster =
        up(&dir, &["--nodes", "2", "--slots", "1", "--spares", "1", "--fake-gpus", gpus.to_str().unwrap()]);
    let (addr, token) = controller(&dir);
    let exe = env!("CARGO_BIN_EXE_myriad");
    let train = [exe, "train", "--preset", "tiny", "--peak-gflops", "100", "--batch", "2", "--seq", "16"];
    let mut args =
        vec!["--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "3", "--spares", "1", "--"];
    args.extend(train);
    args.extend(["--steps", "1000000"]);
    let id = submit(&dir, &args);

    // A fault the job recovers from, so the timeline has something to show.
    let job = |what: &str| -> Value { serde_json::from_str(&get(&addr, what, &token)).unwrap() };
    wait_for("the job's first steps", Duration::from_secs(60), || {
        (job(&format!("/v1/jobs/{id}"))["step"].as_u64().unwrap_or(0) >= 5).then_some(())
    });
    let chaos = cli(&dir, &["chaos", "kill-rank", "--job", &id.to_string(), "--rank", "1"]);
    assert!(chaos.status.success(), "{}", String::from_utf8_lossy(&chaos.stderr));
    wait_for("the job to recover", Duration::from_secs(60), || {
        let events = job(&format!("/v1/jobs/{id}/events"));
        events.as_array().unwrap().iter().any(|e| e["kind"] == "recovered").then_some(())
    });

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _driver = Guard(Some(
        Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    wait_for("chromedriver to listen", Duration::from_secs(30), || {
        webdriver(port, "GET", "/status", None).ok().filter(|v| v["ready"] == true)
    });
    let browser = Session::start(port, &chromium);

    // Without the token the page shows only the token form.
    browser.open(&format!("http://{addr}/"));
    let page = wait_for("the token form", Duration::from_secs(30), || {
        let page = browser.script(READ_PAGE);
        (page["login_shown"] == true).then_some(page)
    });
    assert_eq!(page["main_shown"], false, "{page}");
    assert_eq!(page["rows"].as_array().unwrap().len(), 0, "{page}");
    // A wrong token typed into the form: the controller's 401 brings the form back, saying so.
    let submit = |token: &str| {
        let script = format!(
            "document.getElementById('token').value = {};\
             document.getElementById('login').requestSubmit(); return true;",
            json!(token)
        );
        browser.script(&script);
    };
    submit("not-the-cluster-token");
    let refused = wait_for("the form to come back", Duration::from_secs(30), || {
        let said = browser.script(
            "return document.getElementById('login').hidden ? null : \
             document.getElementById('login-error').textContent;",
        );
        said.as_str().filter(|s| !s.is_empty()).map(str::to_string)
    });
    assert!(refused.contains("refused the token"), "{refused}");
    // The right one typed in shows the cluster.
    submit(&token);
    wait_for("the jobs table after typing the token", Duration::from_secs(30), || {
        let page = browser.script(READ_PAGE);
        (page["main_shown"] == true && !page["rows"].as_array().unwrap().is_empty()).then_some(())
    });

    // With it, as `myriad up` prints the link: everything, live.
    browser.open(&format!("http://{addr}/?view=1#token={token}"));
    let ready = |page: &Value| {
        let c = &page["charts"];
        page["polls"].as_u64().unwrap() >= 2
            && ["loss", "tokens", "mfu", "ettr"].iter().all(|k| c[k]["points"].as_u64().unwrap() >= 2)
            && page["events"].as_array().unwrap().iter().any(|k| k == "recovered")
    };
    let first = wait_for("the dashboard to fill", Duration::from_secs(60), || {
        let page = browser.script(READ_PAGE);
        ready(&page).then_some(page)
    });
    assert!(
        !first["href"].as_str().unwrap().contains("token="),
        "the token stays in the address bar: {first}"
    );
    assert!(first["conn"].as_str().unwrap().starts_with("live"), "{first}");

    // The jobs table: the job, running, with its figures.
    let rows = first["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{first}");
    let row: Vec<&str> = rows[0].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!((row[0], row[2], row[3]), (&*id.to_string(), "running", "2×1"), "{row:?}");
    assert!(row[5].parse::<f64>().is_ok(), "loss cell {:?}", row[5]);
    assert!(row[8].ends_with('%') && row[9] == "1", "ETTR and faults cells: {row:?}");

    // Charts: a line of every figure, its current value shown, and the fault's window.
    for (k, suffix) in [("loss", ""), ("tokens", ""), ("mfu", "%"), ("ettr", "%")] {
        let c = &first["charts"][k];
        let value = c["value"].as_str().unwrap();
        assert!(value != "–" && value.ends_with(suffix), "{k} chart value {value:?}");
        assert_eq!(c["line"], c["points"], "{k}: one vertex per point: {c}");
    }
    assert!(first["fault_windows"].as_u64().unwrap() >= 1, "no fault window on the charts: {first}");
    assert_eq!(first["time_bar"].as_u64().unwrap(), 6, "{first}");

    // The event timeline: the fault, its detection and the recovery with its lost seconds.
    let kinds: Vec<&str> = first["events"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    for kind in ["submitted", "rank_exited", "attempt_failed", "recovered"] {
        assert!(kinds.contains(&kind), "timeline lacks {kind}: {kinds:?}");
    }
    assert!(first["recovery_bars"].as_u64().unwrap() >= 1, "{first}");

    // The node grid: every node, the two running ranks and the idle spare.
    assert_eq!((first["nodes"].as_u64(), first["busy"].as_u64()), (Some(3), Some(2)), "{first}");
    let tip = browser.script(
        "const c = document.querySelector('#node-grid .node');\
         c.dispatchEvent(new MouseEvent('mousemove', {bubbles: true, clientX: 20, clientY: 20}));\
         const t = document.getElementById('tooltip'); return t.hidden ? null : t.textContent;",
    );
    let tip = tip.as_str().expect("a tooltip on hover");
    assert!(tip.contains("node-0") && tip.contains("slots: 1 of 1 in use"), "{tip}");
    // GPU health on the grid and in the hover.
    assert_eq!(first["gpu_warning"].as_u64(), Some(1), "{first}");
    assert!(
        tip.contains("GPUs: 1 × NVIDIA H200 (140 GiB)") && tip.contains("GPU 0 warning: throttled (thermal)"),
        "{tip}"
    );

    // Live: a few polls later the job has moved on and the charts have grown.
    let step = |page: &Value| page["rows"][0][4].as_str().unwrap().parse::<u64>().unwrap();
    let later = wait_for("the dashboard to move on", Duration::from_secs(30), || {
        let page = browser.script(READ_PAGE);
        (page["polls"].as_u64() >= Some(first["polls"].as_u64().unwrap() + 3) && step(&page) > step(&first))
            .then_some(page)
    });
    assert!(
        later["charts"]["loss"]["points"].as_u64() > first["charts"]["loss"]["points"].as_u64(),
        "the loss chart did not grow: {first} then {later}"
    );

    // The same cluster in a terminal: `status --watch` redraws until Ctrl-C, then exits 0.
    let mut watch = Command::new(exe)
        .args(["status", "--watch", "0.2"])
        .env("MYRIAD_CLUSTER", dir.join(".myriad"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let mut watch = Guard(Some(watch));
    std::thread::sleep(Duration::from_millis(1500));
    let child = watch.0.as_mut().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    // A few frames fit the pipe's buffer: the process never blocks writing before it is read.
    let status =
        wait_for("status --watch to stop on Ctrl-C", Duration::from_secs(10), || child.try_wait().unwrap());
    let mut text = String::new();
    stdout.read_to_string(&mut text).unwrap();
    assert!(status.success(), "status --watch after Ctrl-C: {status:?}");
    let frames = text.matches("myriad status · every 0.2 s").count();
    assert!(frames >= 3, "{frames} frames in 1.5 s:\n{text}");
    assert!(
        text.contains("running") && text.contains("ETTR") && text.contains("nodes: 3 healthy of 3"),
        "{text}"
    );

    let png = base64_decode(browser.call("GET", "screenshot", None).as_str().unwrap());
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000, "{} bytes", png.len());
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot: {}", shot.display());
    drop(browser);
    let _ = std::fs::remove_dir_all(&dir);
}
