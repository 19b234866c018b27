//! Human progress output on stderr: a redrawn bar on a terminal, a line every few seconds
//! otherwise (logs stay readable).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    total: u64,
    tty: bool,
    last_line: Option<Instant>,
    line_every: Duration,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            last_line: None,
            line_every: Duration::from_secs(5),
        }
    }

    /// Shows `message` for step `done` of `total`; `eta_s` is the estimated time left.
    pub fn update(&mut self, done: u64, message: &str, eta_s: f64) {
        let frac = if self.total == 0 { 1.0 } else { done as f64 / self.total as f64 };
        let width = 24;
        let filled = ((frac * width as f64) as usize).min(width);
        let bar: String = "#".repeat(filled) + &".".repeat(width - filled);
        let line = format!("step {done}/{} [{bar}] {message} | ETA {}", self.total, format_duration(eta_s));
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if done == self.total {
                let _ = writeln!(err);
            }
        } else if done == self.total || self.last_line.is_none_or(|t| t.elapsed() >= self.line_every) {
            let _ = writeln!(err, "{line}");
            self.last_line = Some(Instant::now());
        }
        let _ = err.flush();
    }

    /// Ends a bar left mid-line (an error or an early stop), so the next message starts clean.
    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
