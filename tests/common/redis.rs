//! A real `redis-server` (the Debian package) on a free loopback port, in a temp dir, with no
//! persistence; stopped by pid when dropped. Self-contained: loadgen's tests include it too.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long redis-server may take to answer its first PING.
const DEADLINE: Duration = Duration::from_secs(15);

pub struct Redis {
    pub child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    /// Starts on `port` (again, after a stop: the same URL comes back).
    pub fn start_on(port: u16) -> Redis {
        Self::start_in(port, false)
    }

    /// Starts with an append-only file fsynced at every write (`appendfsync always`), in a
    /// directory kept for `port`: a restart on the same port finds what was acknowledged.
    pub fn start_durable(port: u16) -> Redis {
        Self::start_in(port, true)
    }

    fn start_in(port: u16, durable: bool) -> Redis {
        let dir = std::env::temp_dir().join(format!("sb-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aof: &[&str] = if durable {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(aof)
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; .ci/run installs it)");
        let r = Redis { child, port, dir };
        r.wait_ping();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one inline command; the raw reply.
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 65536];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn ping(&self) -> bool {
        self.command("PING").is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Stops the server by pid (SIGKILL: nothing is flushed on the way out) and waits.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `n` masters (no replicas) on free loopback ports, slots split evenly,
/// each master in its own temp dir; stopped by pid when dropped.
pub struct RedisCluster {
    pub masters: Vec<Redis>,
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let masters: Vec<Redis> = (0..n)
            .map(|_| Redis::start_cluster_node(free_cluster_port()))
            .collect();
        let per = 16_384 / n;
        for (i, m) in masters.iter().enumerate() {
            let from = i * per;
            let to = if i + 1 == n {
                16_383
            } else {
                (i + 1) * per - 1
            };
            let r = m.command(&format!("CLUSTER ADDSLOTSRANGE {from} {to}"));
            assert!(r.as_deref().is_some_and(|r| r.starts_with("+OK")), "{r:?}");
        }
        for m in &masters[1..] {
            let r = masters[0].command(&format!("CLUSTER MEET 127.0.0.1 {}", m.port));
            assert!(r.as_deref().is_some_and(|r| r.starts_with("+OK")), "{r:?}");
        }
        let c = RedisCluster { masters };
        c.wait_ok();
        c
    }

    /// Waits until every master says the cluster is ok and knows every master.
    pub fn wait_ok(&self) {
        let start = Instant::now();
        let n = self.masters.len();
        while !self.masters.iter().all(|m| {
            m.command("CLUSTER INFO").is_some_and(|i| {
                i.contains("cluster_state:ok") && i.contains(&format!("cluster_size:{n}"))
            })
        }) {
            assert!(
                start.elapsed() < DEADLINE,
                "the Redis Cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL of the first master (nodes find the others from it).
    pub fn url(&self) -> String {
        self.masters[0].url()
    }

    /// The calls of `command` (lowercase, e.g. `spublish`) on every master, from `INFO
    /// commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        self.masters.iter().map(|m| m.calls(command)).sum()
    }
}

impl Redis {
    fn start_cluster_node(port: u16) -> Redis {
        let dir = std::env::temp_dir().join(format!("sb-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::spawn_cluster_node(port, &dir);
        let r = Redis { child, port, dir };
        r.wait_ping();
        r
    }

    /// Kills a cluster node and starts it again in its dir: it rejoins with its slots (and,
    /// without persistence, no data).
    pub fn restart_cluster_node(&mut self) {
        self.stop();
        self.child = Self::spawn_cluster_node(self.port, &self.dir);
        self.wait_ping();
    }

    fn wait_ping(&self) {
        let start = Instant::now();
        while !self.ping() {
            assert!(
                start.elapsed() < DEADLINE,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn_cluster_node(port: u16, dir: &std::path::Path) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            // Masters that stay up keep serving their slots while another is down.
            .args([
                "--cluster-node-timeout",
                "2000",
                "--cluster-require-full-coverage",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; .ci/run installs it)")
    }

    /// The calls of `command` (lowercase) from `INFO commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.command("INFO commandstats").unwrap_or_default();
        let key = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Errors of `kind` (e.g. `MOVED`) answered, from `INFO errorstats`.
    pub fn errors(&self, kind: &str) -> u64 {
        let info = self.command("INFO errorstats").unwrap_or_default();
        let key = format!("errorstat_{kind}:count=");
        info.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Keys in the database.
    pub fn dbsize(&self) -> u64 {
        self.command("DBSIZE")
            .and_then(|r| r.trim().strip_prefix(':').and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    }
}
