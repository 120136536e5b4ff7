//! Redis topologies of the test's own, on free loopback ports: a 3-master Cluster, and a primary
//! with a replica watched by 3 sentinels. Stopped by PID when dropped.

use super::own_redis::{free_port, OwnRedis};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A directory of the test's own for nodes' and sentinels' files.
fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keygate-{what}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what} not ready within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) struct OwnCluster {
    pub nodes: Vec<OwnRedis>,
    dir: PathBuf,
}

impl OwnCluster {
    /// Three masters, no replicas, all 16 384 slots assigned, `cluster_state:ok` on each.
    pub(crate) fn start() -> Self {
        let dir = scratch("cluster");
        let nodes: Vec<OwnRedis> = (0..3)
            .map(|_| {
                let (port, bus) = (free_port(), free_port());
                let conf = dir.join(format!("nodes-{port}.conf"));
                OwnRedis::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus.to_string(),
                        "--cluster-config-file",
                        conf.to_str().unwrap(),
                        "--cluster-node-timeout",
                        "2000",
                        "--dir",
                        dir.to_str().unwrap(),
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created =
            Command::new("redis-cli").args(["--cluster", "create"]).args(&addrs).arg("--cluster-yes").output().unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stdout));
        wait_for("the cluster", Duration::from_secs(20), || {
            nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        });
        Self { nodes, dir }
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(OwnRedis::url).collect()
    }

    /// Which node (index) serves `key`'s hash slot.
    pub(crate) fn node_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]).trim().parse().unwrap();
        let myself = |n: &OwnRedis| n.cli(&["CLUSTER", "MYID"]).trim().to_owned();
        // CLUSTER NODES: "<id> <addr> <flags> … <slot ranges>"
        let table = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        for line in table.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let serves = fields.iter().skip(8).any(|r| match r.split_once('-') {
                Some((a, b)) => (a.parse::<u16>().unwrap_or(u16::MAX)..=b.parse().unwrap_or(0)).contains(&slot),
                None => r.parse::<u16>() == Ok(slot),
            });
            if serves {
                return self.nodes.iter().position(|n| myself(n) == fields[0]).unwrap();
            }
        }
        panic!("no node serves slot {slot}");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) struct OwnSentinels {
    pub primary: OwnRedis,
    pub replica: OwnRedis,
    pub sentinels: Vec<OwnRedis>,
    dir: PathBuf,
}

/// The name the sentinels know the primary by.
pub(crate) const SERVICE: &str = "kgprimary";

impl OwnSentinels {
    /// A primary, its replica, and 3 sentinels (quorum 2) that know both and each other.
    pub(crate) fn start() -> Self {
        let dir = scratch("sentinel");
        let primary = OwnRedis::start(free_port());
        let replica = OwnRedis::start_with(free_port(), &["--replicaof", "127.0.0.1", &primary.port.to_string()]);
        let sentinels: Vec<OwnRedis> = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {SERVICE} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {SERVICE} 1000\nsentinel failover-timeout {SERVICE} 10000\n",
                        dir.display(),
                        primary.port
                    ),
                )
                .unwrap();
                OwnRedis::spawn(port, Command::new("redis-server").arg(&conf).arg("--sentinel"))
            })
            .collect();
        let this = Self { primary, replica, sentinels, dir };
        wait_for("the replica's sync", Duration::from_secs(20), || {
            this.replica.cli(&["INFO", "replication"]).contains("master_link_status:up")
        });
        wait_for("the sentinels", Duration::from_secs(30), || {
            this.sentinels.iter().all(|s| {
                let info = s.cli(&["SENTINEL", "MASTER", SERVICE]);
                let field = |name: &str| {
                    let lines: Vec<&str> = info.lines().collect();
                    lines.iter().position(|l| *l == name).and_then(|i| lines.get(i + 1)).map(|v| v.to_string())
                };
                field("num-slaves").as_deref() == Some("1") && field("num-other-sentinels").as_deref() == Some("2")
            })
        });
        this
    }

    pub(crate) fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(OwnRedis::url).collect()
    }

    /// Asks a sentinel to fail over now, and waits until all of them name the replica.
    pub(crate) fn fail_over(&self) {
        let said = self.sentinels[0].cli(&["SENTINEL", "FAILOVER", SERVICE]);
        assert!(said.contains("OK"), "{said}");
    }

    /// Whether every sentinel names the (old) replica as primary.
    pub(crate) fn replica_is_primary(&self) -> bool {
        let port = self.replica.port.to_string();
        self.sentinels.iter().all(|s| s.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE]).contains(&port))
    }
}

impl Drop for OwnSentinels {
    fn drop(&mut self) {
        self.sentinels.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
