//! A 3-master Redis Cluster on loopback ports for tests: started with `redis-server
//! --cluster-enabled yes` three times and joined with `redis-cli --cluster create`, stopped (by
//! PID) when dropped. Shared by the host-sidecar conformance suite (included there by path) and
//! the end-to-end tests.

use std::process::{Child, Command, Stdio};

/// A 3-master Redis Cluster on loopback ports (no replicas, nothing on disk), made with
/// `redis-cli --cluster create`. Every server is stopped (by PID) when dropped.
pub struct LocalCluster {
    servers: Vec<Child>,
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl LocalCluster {
    pub async fn start() -> LocalCluster {
        let dir = std::env::temp_dir().join(format!(
            "tgt_cluster_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // A port whose cluster bus port (+10000) is free too.
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
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
            assert!(up, "cluster node {p} did not start");
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Every node must agree the cluster is up before the first command.
        for p in &ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{p}")).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
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
            assert!(ok, "cluster not ok on {p}");
        }
        cluster
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
