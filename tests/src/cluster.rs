//! A 3-master Redis Cluster on loopback ports for tests: started with `redis-server
//! --cluster-enabled yes` three times and joined with `redis-cli --cluster create`, stopped (by
//! PID) when dropped. Shared by the host-sidecar conformance suite (included there by path) and
//! the end-to-end tests.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// A free loopback port for a server a test starts: below the kernel's ephemeral range (32768
/// and up here), so no outgoing connection takes it between this check and the server's bind,
/// and with port + 10000 free too (a cluster node's bus port). Another test may still pick the
/// same one, so whoever starts a server on it retries on another port if the bind fails.
pub fn spare_port() -> u16 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    loop {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32)
            ^ STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let mut x = seed | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = 12_000 + (x % 10_000) as u16;
        if free(p) && free(p + 10_000) {
            return p;
        }
    }
}

/// A 3-master Redis Cluster on loopback ports (no replicas, nothing on disk), made with
/// `redis-cli --cluster create`. Every server is stopped (by PID) when dropped.
pub struct LocalCluster {
    servers: Vec<Child>,
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl LocalCluster {
    /// Starts the cluster; a node that cannot start (its port was taken between the check and
    /// the server's bind) makes it try again on other ports, up to five times.
    pub async fn start() -> LocalCluster {
        for attempt in 1..=5 {
            match Self::try_start().await {
                Ok(c) => return c,
                Err(why) => eprintln!("local cluster, attempt {attempt}: {why}"),
            }
        }
        panic!("the local Redis Cluster did not start in five attempts");
    }

    async fn try_start() -> Result<LocalCluster, String> {
        let dir = std::env::temp_dir().join(format!(
            "tgt_cluster_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = spare_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut cluster = LocalCluster {
            servers: Vec::new(),
            ports: ports.clone(),
            dir: dir.clone(),
        };
        for p in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--maxmemory-policy", "noeviction"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            cluster.servers.push(child);
        }
        for p in &ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{p}")).unwrap();
            let mut up = false;
            for _ in 0..200 {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                    {
                        up = true;
                        break;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            if !up {
                return Err(format!("cluster node {p} did not start"));
            }
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        if !out.status.success() {
            return Err(format!(
                "cluster create: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        // Every node must agree the cluster is up before the first command.
        for p in &ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{p}")).unwrap();
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("node {p}: {e}"))?;
            let mut ok = false;
            for _ in 0..400 {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    ok = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            if !ok {
                return Err(format!("cluster not ok on {p}"));
            }
        }
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// FLUSHALL on every master.
    pub async fn flushall(&self) {
        for p in &self.ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{p}")).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
