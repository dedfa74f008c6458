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

/// A free loopback port never handed out before in this process: tests run in parallel, and
/// one that stops a Redis to start another on the same port must not find a Redis of
/// another test there.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&p) {
            given.push(p);
            return p;
        }
    }
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

    /// Starts on `port` as a replica of the Redis on `master` (no persistence), and waits
    /// until its link to the master is up.
    pub fn start_replica_of(port: u16, master: u16) -> Redis {
        let r = Self::start_args(
            port,
            &[
                "--appendonly",
                "no",
                "--replicaof",
                "127.0.0.1",
                &master.to_string(),
            ],
        );
        r.wait_linked();
        r
    }

    /// Waits until this replica's link to its master is up (the first sync is done).
    pub fn wait_linked(&self) {
        let start = Instant::now();
        while !self
            .command("INFO replication")
            .is_some_and(|i| i.contains("master_link_status:up"))
        {
            assert!(start.elapsed() < DEADLINE, "the replica never synced");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether this Redis says it is a master (`ROLE`).
    pub fn is_master(&self) -> bool {
        self.command("ROLE").is_some_and(|r| r.contains("master"))
    }

    fn start_in(port: u16, durable: bool) -> Redis {
        let aof: &[&str] = if durable {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        Self::start_args(port, aof)
    }

    fn start_args(port: u16, more: &[&str]) -> Redis {
        let dir = std::env::temp_dir().join(format!("sb-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(more)
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; .ci/run installs it)");
        let mut r = Redis { child, port, dir };
        r.wait_ping();
        r
    }

    /// `REPLICAOF NO ONE`: this replica becomes a master (under a new replication id).
    pub fn promote(&self) {
        let r = self.command("REPLICAOF NO ONE");
        assert!(r.as_deref().is_some_and(|r| r.starts_with("+OK")), "{r:?}");
    }

    /// Cuts every pub/sub connection (`CLIENT KILL TYPE pubsub`); there must have been one.
    pub fn kill_subscribers(&self) {
        let killed = self.command("CLIENT KILL TYPE pubsub").unwrap_or_default();
        assert_ne!(
            killed.trim(),
            ":0",
            "the nodes' subscribers were connected: {killed}"
        );
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

/// A Redis Sentinel (`redis-server --sentinel`) watching one master as `name`, quorum 1,
/// the master down after 1 s without answers; stopped by pid when dropped.
pub struct Sentinel {
    pub redis: Redis,
    pub name: String,
}

impl Sentinel {
    pub fn start(master: u16, name: &str) -> Sentinel {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sb-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 4000\n\
                 sentinel parallel-syncs {name} 4\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; .ci/run installs it)");
        let mut redis = Redis { child, port, dir };
        redis.wait_ping();
        Sentinel {
            redis,
            name: name.to_owned(),
        }
    }

    /// The `--broker` URL that finds the master through this sentinel.
    pub fn url(&self) -> String {
        format!(
            "redis+sentinel://127.0.0.1:{}/{}",
            self.redis.port, self.name
        )
    }

    /// Waits until the sentinel knows `n` replicas of its master, all linked.
    pub fn wait_replicas(&self, n: usize) {
        let start = Instant::now();
        loop {
            let r = self
                .redis
                .command(&format!("SENTINEL replicas {}", self.name))
                .unwrap_or_default();
            // Healthy ones only: `flags` is exactly `slave` (not `slave,disconnected`).
            let ok = r.matches("flags\r\n$5\r\nslave\r\n").count();
            if ok >= n {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the sentinel never saw {n} replicas: {r}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The master's port as the sentinel says now.
    pub fn master_port(&self) -> Option<u16> {
        let r = self
            .redis
            .command(&format!("SENTINEL get-master-addr-by-name {}", self.name))?;
        r.lines().nth(4)?.trim().parse().ok()
    }
}

/// A Redis Cluster of `n` masters on free loopback ports, slots split evenly, each node in
/// its own temp dir, optionally one replica per master; stopped by pid when dropped.
pub struct RedisCluster {
    pub masters: Vec<Redis>,
    pub replicas: Vec<Redis>,
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
        let c = RedisCluster {
            masters,
            replicas: Vec::new(),
        };
        c.wait_ok();
        c
    }

    /// `n` masters, each with one replica that takes its slots over when it dies
    /// (automatic failover after the 2 s node timeout).
    pub fn start_with_replicas(n: usize) -> RedisCluster {
        let mut c = RedisCluster::start(n);
        for i in 0..n {
            let r = Redis::start_cluster_node(free_cluster_port());
            let met = c.masters[0].command(&format!("CLUSTER MEET 127.0.0.1 {}", r.port));
            assert!(
                met.as_deref().is_some_and(|m| m.starts_with("+OK")),
                "{met:?}"
            );
            let id = c.masters[i].command("CLUSTER MYID").unwrap();
            let id = id.lines().nth(1).unwrap().trim().to_owned();
            let start = Instant::now();
            // The replica must know the master first (gossip spreads the MEET).
            loop {
                let a = r
                    .command(&format!("CLUSTER REPLICATE {id}"))
                    .unwrap_or_default();
                if a.starts_with("+OK") {
                    break;
                }
                assert!(start.elapsed() < DEADLINE, "CLUSTER REPLICATE: {a}");
                std::thread::sleep(Duration::from_millis(50));
            }
            c.replicas.push(r);
        }
        for r in &c.replicas {
            r.wait_linked();
        }
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
        let mut r = Redis { child, port, dir };
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

    /// Waits for this process's PING answer (one that exited, e.g. because its port was
    /// taken, fails here instead of leaving a stranger's Redis on that port to the test).
    fn wait_ping(&mut self) {
        let start = Instant::now();
        while !self.ping() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(
                start.elapsed() < DEADLINE,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("redis-server on port {} exited: {status}", self.port);
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
