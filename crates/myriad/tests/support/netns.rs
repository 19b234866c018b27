//! Network namespaces as hosts: each a veth to a bridge in a switch namespace, an address each,
//! made and removed by the test itself. Needs root (CI runs as root, and sets
//! MYRIAD_REQUIRE_NETNS so the tests cannot skip there).

use std::process::Command;

/// Network namespaces on one bridge: `hosts[0]` for the controller, the rest for agents.
pub struct Net {
    switch: String,
    pub hosts: Vec<Host>,
}

pub struct Host {
    pub ns: String,
    pub ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// `hosts` namespaces, or None (with the reason printed) where this machine cannot make them.
    pub fn new(tag: &str, hosts: usize) -> Option<Net> {
        // Unique per process and test: several test binaries or runs may make hosts at once.
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let subnet = 20 + std::process::id() % 200;
        let mut net = Net { switch: format!("myr{id}sw"), hosts: Vec::new() };
        let made = (|| -> Result<(), String> {
            ip(&["netns", "add", &net.switch])?;
            let sw = |args: &[&str]| {
                let mut all = vec!["-n", net.switch.as_str()];
                all.extend_from_slice(args);
                ip(&all)
            };
            sw(&["link", "add", "br0", "type", "bridge"])?;
            sw(&["link", "set", "br0", "up"])?;
            for i in 0..hosts {
                let host = Host { ns: format!("myr{id}h{i}"), ip: format!("10.77.{subnet}.{}", i + 1) };
                ip(&["netns", "add", &host.ns])?;
                let (inner, outer) = (format!("m{id}i{i}"), format!("m{id}o{i}"));
                ip(&[
                    "link",
                    "add",
                    &inner,
                    "netns",
                    &host.ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &outer,
                    "netns",
                    &net.switch,
                ])?;
                sw(&["link", "set", &outer, "master", "br0"])?;
                sw(&["link", "set", &outer, "up"])?;
                ip(&["-n", &host.ns, "addr", "add", &format!("{}/24", host.ip), "dev", &inner])?;
                ip(&["-n", &host.ns, "link", "set", &inner, "up"])?;
                ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
                net.hosts.push(host);
            }
            Ok(())
        })();
        match made {
            Ok(()) => Some(net),
            Err(e) => {
                drop(net);
                assert!(
                    std::env::var_os("MYRIAD_REQUIRE_NETNS").is_none(),
                    "MYRIAD_REQUIRE_NETNS is set, but: {e}"
                );
                eprintln!(
                    "cannot make network namespaces here (root and iproute2 are needed): {e}; skipping"
                );
                None
            }
        }
    }

    /// `program args` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns, program]);
        c
    }

    /// `program args` inside host `i`'s network namespace under a UTS namespace of its own named
    /// `hostname`, as a daemon of that host sees itself. Unlike `ip netns exec`, the host's /sys
    /// stays mounted (Slurm's daemons read its cgroups).
    pub fn host_command(&self, i: usize, hostname: &str, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.hosts[i].ns)).args([
            "unshare",
            "--uts",
            "sh",
            "-c",
            "hostname \"$0\" && exec \"$@\"",
            hostname,
            program,
        ]);
        c
    }

    /// Cuts host `i` off from host `j` (both ways), and nobody else.
    pub fn cut(&self, i: usize, j: usize) {
        for (a, b) in [(i, j), (j, i)] {
            ip(&["-n", &self.hosts[a].ns, "route", "add", "blackhole", &format!("{}/32", self.hosts[b].ip)])
                .unwrap();
        }
    }

    pub fn heal(&self, i: usize, j: usize) {
        for (a, b) in [(i, j), (j, i)] {
            ip(&["-n", &self.hosts[a].ns, "route", "del", "blackhole", &format!("{}/32", self.hosts[b].ip)])
                .unwrap();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of each veth, and so the pair.
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}
