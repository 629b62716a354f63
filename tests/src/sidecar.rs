//! The real sidecar binary as a child process, for tests and benchmarks that kill it (`kill -9`),
//! restart it, or measure its memory. Stopped with SIGKILL when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct SidecarProcess {
    child: Child,
}

impl SidecarProcess {
    /// Starts `binary --config config` listening on `127.0.0.1:port`, with `env` added (URLs,
    /// admin token), and waits until `/readyz` answers 200.
    pub async fn start(
        binary: &Path,
        config: &Path,
        env: &[(String, String)],
        port: u16,
    ) -> SidecarProcess {
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(config)
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the sidecar binary starts");
        let me = SidecarProcess { child };
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
            {
                if r.status() == 200 {
                    return me;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the sidecar did not become ready on port {port}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
