//! A proxy-wasm host on wasmtime that loads the real filter `.wasm` and lets a test play Envoy:
//! configure it, send request headers and bodies, see the callouts it makes and answer them (or
//! let them fail), tick the clock, stream a response in chunks, and read what the filter did —
//! local replies, resumed requests, headers it set, metrics, logs.
//!
//! Every import the module declares is linked by name with the type the module expects
//! (`Linker::func_new`), so a signature can never drift from the SDK's. Unsupported calls
//! (gRPC, foreign functions) answer "unimplemented" rather than trapping.
//!
//! Status codes are proxy-wasm's: Ok 0, NotFound 1, BadArgument 2. Map types: request headers 0,
//! response headers 2, call response headers 6. Buffers: request body 0, response body 1, call
//! response body 4, plugin configuration 7.

pub mod cluster;
pub mod envoy;
pub mod load;
pub mod mock;
pub mod sidecar;
pub mod stores;

use anyhow::{anyhow, bail, Context as _, Result};
use std::collections::HashMap;
use std::sync::OnceLock;
use wasmtime::{Caller, Config, Engine, Extern, Instance, Linker, Module, Store, Val};

const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const UNIMPLEMENTED: i32 = 12;

/// proxy-wasm `Action`: Continue = 0, Pause = 1.
pub const CONTINUE: i32 = 0;
pub const PAUSE: i32 = 1;

pub type Headers = Vec<(String, String)>;

/// A `dispatch_http_call` the filter made.
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub token: u32,
    pub context_id: u32,
    pub cluster: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

impl HttpCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A `send_local_response` the filter made.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl LocalResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct Stream {
    request_headers: Headers,
    response_headers: Headers,
    request_body: Vec<u8>,
    response_body: Vec<u8>,
    local: Option<LocalResponse>,
    resumed: u32,
    /// The filter paused the response body: Envoy buffers what comes next with it.
    response_paused: bool,
    /// Response body bytes passed on to the client.
    delivered: Vec<u8>,
}

/// Everything the host knows; tests read it through [`Filter`].
pub struct State {
    now_ns: u64,
    plugin_config: Vec<u8>,
    /// Clusters `dispatch_http_call` accepts; any other name fails at once, as in Envoy.
    clusters: Vec<String>,
    current: u32,
    streams: HashMap<u32, Stream>,
    call_response: Option<(Headers, Vec<u8>)>,
    calls: Vec<HttpCall>,
    next_token: u32,
    tick_ms: u32,
    logs: Vec<(i32, String)>,
    metric_names: Vec<String>,
    metrics: HashMap<String, i64>,
    shared: HashMap<String, (Vec<u8>, u32)>,
    queues: Vec<(String, std::collections::VecDeque<Vec<u8>>)>,
    /// Queues with an `on_queue_ready` posted and not yet delivered.
    ready: Vec<u32>,
    /// Properties by path (segments joined with NUL, as the ABI serializes them).
    properties: HashMap<Vec<u8>, Vec<u8>>,
    rng: u64,
}

fn serialize_map(map: &[(String, String)]) -> Vec<u8> {
    let mut out = (map.len() as u32).to_le_bytes().to_vec();
    for (k, v) in map {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

fn deserialize_map(bytes: &[u8]) -> Result<Headers> {
    let n = u32::from_le_bytes(bytes.get(0..4).context("map too short")?.try_into()?) as usize;
    let mut p = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let s = 4 + i * 8;
        let kl = u32::from_le_bytes(bytes.get(s..s + 4).context("map")?.try_into()?) as usize;
        let vl = u32::from_le_bytes(bytes.get(s + 4..s + 8).context("map")?.try_into()?) as usize;
        let k = bytes.get(p..p + kl).context("map key")?;
        p += kl + 1;
        let v = bytes.get(p..p + vl).context("map value")?;
        p += vl + 1;
        out.push((
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    Ok(out)
}

fn engine_and_module(path: &str) -> Result<&'static (Engine, Module)> {
    static CACHE: OnceLock<(Engine, Module)> = OnceLock::new();
    if let Some(c) = CACHE.get() {
        return Ok(c);
    }
    let mut config = Config::new();
    config.consume_fuel(true);
    let engine = Engine::new(&config)?;
    let bytes = std::fs::read(path).with_context(|| {
        format!("cannot read the filter at {path}: build it with ./tg test (or cargo build --profile wasm --target wasm32-wasip1 -p tollgate-filter)")
    })?;
    let module = Module::new(&engine, bytes)?;
    Ok(CACHE.get_or_init(|| (engine, module)))
}

/// Where the compiled filter is: `TOLLGATE_FILTER_WASM`, else the target directory.s `wasm` profile build.
pub fn wasm_path() -> String {
    if let Ok(p) = std::env::var("TOLLGATE_FILTER_WASM") {
        return p;
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| format!("{}/../target", env!("CARGO_MANIFEST_DIR")));
    format!("{target}/wasm32-wasip1/wasm/tollgate_filter.wasm")
}

/// Memory helpers usable from inside host functions.
fn memory(caller: &mut Caller<'_, State>) -> Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => bail!("module has no memory export"),
    }
}

fn read(caller: &mut Caller<'_, State>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let mem = memory(caller)?;
    let mut buf = vec![0u8; len as u32 as usize];
    mem.read(&*caller, ptr as u32 as usize, &mut buf)?;
    Ok(buf)
}

fn write_u32(caller: &mut Caller<'_, State>, ptr: i32, v: u32) -> Result<()> {
    let mem = memory(caller)?;
    mem.write(caller, ptr as u32 as usize, &v.to_le_bytes())?;
    Ok(())
}

/// Copies `data` into memory the module allocates, and stores its address and size.
fn give(caller: &mut Caller<'_, State>, data: &[u8], ret_ptr: i32, ret_len: i32) -> Result<()> {
    let alloc = match caller.get_export("proxy_on_memory_allocate") {
        Some(Extern::Func(f)) => f.typed::<i32, i32>(&*caller)?,
        _ => bail!("module does not export proxy_on_memory_allocate"),
    };
    let addr = if data.is_empty() {
        0
    } else {
        alloc.call(&mut *caller, data.len() as i32)?
    };
    if !data.is_empty() {
        let mem = memory(caller)?;
        mem.write(&mut *caller, addr as u32 as usize, data)?;
    }
    write_u32(caller, ret_ptr, addr as u32)?;
    write_u32(caller, ret_len, data.len() as u32)?;
    Ok(())
}

fn i(args: &[Val], n: usize) -> i32 {
    args.get(n).and_then(Val::i32).unwrap_or(0)
}

impl State {
    fn stream(&mut self) -> &mut Stream {
        self.streams.entry(self.current).or_default()
    }

    fn map(&mut self, map_type: i32) -> Option<&mut Headers> {
        match map_type {
            0 => Some(&mut self.stream().request_headers),
            2 => Some(&mut self.stream().response_headers),
            6 => self.call_response.as_mut().map(|(h, _)| h),
            _ => None,
        }
    }
}

/// One import, by name. Returns the status (or nothing for `proc_exit`-like calls).
fn host_call(caller: &mut Caller<'_, State>, name: &str, a: &[Val]) -> Result<i32> {
    Ok(match name {
        "proxy_log" => {
            let msg = read(caller, i(a, 1), i(a, 2))?;
            caller
                .data_mut()
                .logs
                .push((i(a, 0), String::from_utf8_lossy(&msg).into_owned()));
            OK
        }
        "proxy_get_current_time_nanoseconds" => {
            let now = caller.data().now_ns;
            let mem = memory(caller)?;
            mem.write(caller, i(a, 0) as u32 as usize, &now.to_le_bytes())?;
            OK
        }
        "proxy_set_tick_period_milliseconds" => {
            caller.data_mut().tick_ms = i(a, 0) as u32;
            OK
        }
        "proxy_get_buffer_bytes" => {
            let (kind, start, max) = (i(a, 0), i(a, 1) as u32 as usize, i(a, 2) as u32 as usize);
            let data = {
                let s = caller.data_mut();
                match kind {
                    0 => s.stream().request_body.clone(),
                    1 => s.stream().response_body.clone(),
                    4 => s
                        .call_response
                        .as_ref()
                        .map(|(_, b)| b.clone())
                        .unwrap_or_default(),
                    7 => s.plugin_config.clone(),
                    _ => return Ok(NOT_FOUND),
                }
            };
            let end = start.saturating_add(max).min(data.len());
            let slice = data.get(start.min(end)..end).unwrap_or_default().to_vec();
            give(caller, &slice, i(a, 3), i(a, 4))?;
            OK
        }
        // Replaces bytes [start, start + length) of a body with the given data, as Envoy does.
        "proxy_set_buffer_bytes" => {
            let (kind, start, len) = (i(a, 0), i(a, 1) as u32 as usize, i(a, 2) as u32 as usize);
            let data = read(caller, i(a, 3), i(a, 4))?;
            let s = caller.data_mut();
            let body = match kind {
                0 => &mut s.stream().request_body,
                1 => &mut s.stream().response_body,
                _ => return Ok(BAD_ARGUMENT),
            };
            let start = start.min(body.len());
            let end = start.saturating_add(len).min(body.len());
            body.splice(start..end, data);
            OK
        }
        "proxy_get_header_map_pairs" => {
            let bytes = match caller.data_mut().map(i(a, 0)) {
                Some(m) => serialize_map(m),
                None => return Ok(NOT_FOUND),
            };
            give(caller, &bytes, i(a, 1), i(a, 2))?;
            OK
        }
        "proxy_set_header_map_pairs" => {
            let pairs = deserialize_map(&read(caller, i(a, 1), i(a, 2))?)?;
            match caller.data_mut().map(i(a, 0)) {
                Some(m) => *m = pairs,
                None => return Ok(BAD_ARGUMENT),
            }
            OK
        }
        "proxy_get_header_map_value" => {
            let key = String::from_utf8_lossy(&read(caller, i(a, 1), i(a, 2))?).to_lowercase();
            let value = caller
                .data_mut()
                .map(i(a, 0))
                .and_then(|m| m.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()));
            match value {
                Some(v) => {
                    give(caller, v.as_bytes(), i(a, 3), i(a, 4))?;
                    OK
                }
                None => NOT_FOUND,
            }
        }
        "proxy_replace_header_map_value" | "proxy_add_header_map_value" => {
            let key = String::from_utf8_lossy(&read(caller, i(a, 1), i(a, 2))?).to_lowercase();
            let value = String::from_utf8_lossy(&read(caller, i(a, 3), i(a, 4))?).into_owned();
            let replace = name == "proxy_replace_header_map_value";
            match caller.data_mut().map(i(a, 0)) {
                Some(m) => {
                    if replace {
                        m.retain(|(k, _)| *k != key);
                    }
                    m.push((key, value));
                    OK
                }
                None => BAD_ARGUMENT,
            }
        }
        "proxy_remove_header_map_value" => {
            let key = String::from_utf8_lossy(&read(caller, i(a, 1), i(a, 2))?).to_lowercase();
            if let Some(m) = caller.data_mut().map(i(a, 0)) {
                m.retain(|(k, _)| *k != key);
            }
            OK
        }
        "proxy_get_property" => {
            let path = read(caller, i(a, 0), i(a, 1))?;
            let path = path.strip_suffix(&[0]).unwrap_or(&path).to_vec();
            match caller.data().properties.get(&path).cloned() {
                Some(v) => {
                    give(caller, &v, i(a, 2), i(a, 3))?;
                    OK
                }
                None => NOT_FOUND,
            }
        }
        "proxy_set_property" => {
            let path = read(caller, i(a, 0), i(a, 1))?;
            let path = path.strip_suffix(&[0]).unwrap_or(&path).to_vec();
            let value = read(caller, i(a, 2), i(a, 3))?;
            caller.data_mut().properties.insert(path, value);
            OK
        }
        "proxy_get_shared_data" => {
            let key = String::from_utf8_lossy(&read(caller, i(a, 0), i(a, 1))?).into_owned();
            match caller.data().shared.get(&key).cloned() {
                Some((v, cas)) => {
                    give(caller, &v, i(a, 2), i(a, 3))?;
                    write_u32(caller, i(a, 4), cas)?;
                    OK
                }
                None => NOT_FOUND,
            }
        }
        "proxy_set_shared_data" => {
            let key = String::from_utf8_lossy(&read(caller, i(a, 0), i(a, 1))?).into_owned();
            let value = read(caller, i(a, 2), i(a, 3))?;
            let cas = i(a, 4) as u32;
            let s = caller.data_mut();
            let current = s.shared.get(&key).map_or(0, |(_, c)| *c);
            if cas != 0 && cas != current {
                return Ok(8); // CasMismatch
            }
            s.shared.insert(key, (value, current + 1));
            OK
        }
        // Shared queues: ids are 1-based indexes; one VM, so the vm id is ignored.
        "proxy_register_shared_queue" | "proxy_resolve_shared_queue" => {
            let (name_at, ret) = if name == "proxy_register_shared_queue" {
                (0, 2)
            } else {
                (2, 4)
            };
            let qname = String::from_utf8_lossy(&read(caller, i(a, name_at), i(a, name_at + 1))?)
                .into_owned();
            let s = caller.data_mut();
            let id = match s.queues.iter().position(|(n, _)| *n == qname) {
                Some(p) => p + 1,
                None if name == "proxy_register_shared_queue" => {
                    s.queues.push((qname, Default::default()));
                    s.queues.len()
                }
                None => return Ok(NOT_FOUND),
            };
            write_u32(caller, i(a, ret), id as u32)?;
            OK
        }
        "proxy_enqueue_shared_queue" => {
            let value = read(caller, i(a, 1), i(a, 2))?;
            match caller
                .data_mut()
                .queues
                .get_mut((i(a, 0) as usize).wrapping_sub(1))
            {
                Some((_, q)) => {
                    q.push_back(value);
                    // As Envoy does: the registrant's on_queue_ready is posted to its event
                    // loop, so it runs after the current callback.
                    let id = i(a, 0) as u32;
                    let s = caller.data_mut();
                    if !s.ready.contains(&id) {
                        s.ready.push(id);
                    }
                    OK
                }
                None => NOT_FOUND,
            }
        }
        "proxy_dequeue_shared_queue" => {
            let item = match caller
                .data_mut()
                .queues
                .get_mut((i(a, 0) as usize).wrapping_sub(1))
            {
                Some((_, q)) => q.pop_front(),
                None => return Ok(NOT_FOUND),
            };
            match item {
                Some(v) => {
                    give(caller, &v, i(a, 1), i(a, 2))?;
                    OK
                }
                None => 7, // Empty
            }
        }
        "proxy_continue_stream" => {
            if i(a, 0) == 0 {
                caller.data_mut().stream().resumed += 1;
            }
            if i(a, 0) == 1 {
                // The held response body goes on to the client.
                let s = caller.data_mut().stream();
                if std::mem::take(&mut s.response_paused) {
                    let held = std::mem::take(&mut s.response_body);
                    s.delivered.extend(held);
                }
            }
            OK
        }
        "proxy_close_stream" => OK,
        "proxy_send_local_response" => {
            let body = read(caller, i(a, 3), i(a, 4))?;
            let headers = deserialize_map(&read(caller, i(a, 5), i(a, 6))?)?;
            caller.data_mut().stream().local = Some(LocalResponse {
                status: i(a, 0) as u32,
                headers,
                body,
            });
            OK
        }
        "proxy_http_call" => {
            let cluster = String::from_utf8_lossy(&read(caller, i(a, 0), i(a, 1))?).into_owned();
            let headers = deserialize_map(&read(caller, i(a, 2), i(a, 3))?)?;
            let body = read(caller, i(a, 4), i(a, 5))?;
            let s = caller.data_mut();
            if !s.clusters.contains(&cluster) {
                return Ok(BAD_ARGUMENT);
            }
            s.next_token += 1;
            let token = s.next_token;
            let call = HttpCall {
                token,
                context_id: s.current,
                cluster,
                headers,
                body,
                timeout_ms: i(a, 8) as u32,
            };
            s.calls.push(call);
            write_u32(caller, i(a, 9), token)?;
            OK
        }
        "proxy_set_effective_context" => {
            caller.data_mut().current = i(a, 0) as u32;
            OK
        }
        "proxy_define_metric" => {
            let name = String::from_utf8_lossy(&read(caller, i(a, 1), i(a, 2))?).into_owned();
            let s = caller.data_mut();
            s.metric_names.push(name.clone());
            s.metrics.entry(name).or_insert(0);
            let id = s.metric_names.len() as u32;
            write_u32(caller, i(a, 3), id)?;
            OK
        }
        "proxy_increment_metric" | "proxy_record_metric" => {
            let id = i(a, 0) as usize;
            let v = a.get(1).and_then(Val::i64).unwrap_or(0);
            let s = caller.data_mut();
            let Some(metric) = s.metric_names.get(id.wrapping_sub(1)).cloned() else {
                return Ok(NOT_FOUND);
            };
            if name == "proxy_increment_metric" {
                *s.metrics.entry(metric).or_insert(0) += v;
            } else {
                // Histograms and gauges: keep the last value, and count the records.
                s.metrics.insert(metric.clone(), v);
                *s.metrics.entry(format!("{metric}.count")).or_insert(0) += 1;
            }
            OK
        }
        "proxy_done" => OK,
        // WASI, for what Rust's std pulls in.
        "fd_write" => {
            // iovecs are (ptr, len) pairs; report everything written.
            let (iovs, n, nwritten) = (i(a, 1), i(a, 2), i(a, 3));
            let raw = read(caller, iovs, n * 8)?;
            let mut total = 0u32;
            let mut text = Vec::new();
            for c in raw.chunks(8) {
                let p = i32::from_le_bytes(c.get(0..4).context("iov")?.try_into()?);
                let l = i32::from_le_bytes(c.get(4..8).context("iov")?.try_into()?);
                text.extend(read(caller, p, l)?);
                total += l as u32;
            }
            caller
                .data_mut()
                .logs
                .push((-1, String::from_utf8_lossy(&text).into_owned()));
            write_u32(caller, nwritten, total)?;
            0
        }
        "environ_sizes_get" => {
            write_u32(caller, i(a, 0), 0)?;
            write_u32(caller, i(a, 1), 0)?;
            0
        }
        "environ_get" => 0,
        "random_get" => {
            let (ptr, len) = (i(a, 0), i(a, 1));
            let mut buf = vec![0u8; len as u32 as usize];
            let s = caller.data_mut();
            for b in buf.iter_mut() {
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                *b = s.rng as u8;
            }
            let mem = memory(caller)?;
            mem.write(caller, ptr as u32 as usize, &buf)?;
            0
        }
        "proc_exit" => bail!("the filter called proc_exit({})", i(a, 0)),
        _ => UNIMPLEMENTED,
    })
}

/// One loaded filter: a VM with its root context, and the requests a test drives through it.
pub struct Filter {
    store: Store<State>,
    instance: Instance,
    root: u32,
    next_context: u32,
    /// Whether `proxy_on_configure` accepted the configuration.
    pub configured: bool,
}

impl Filter {
    /// Loads the compiled filter, starts the VM and configures it. The sidecar cluster is
    /// `sidecar` (dispatches to any other cluster fail at once, as in Envoy).
    pub fn load(config_json: &str) -> Result<Filter> {
        Self::load_with(config_json, &["sidecar"])
    }

    pub fn load_with(config_json: &str, clusters: &[&str]) -> Result<Filter> {
        let (engine, module) = engine_and_module(&wasm_path())?;
        let state = State {
            now_ns: 1_795_348_800_000_000_000,
            plugin_config: config_json.as_bytes().to_vec(),
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            current: 0,
            streams: HashMap::new(),
            call_response: None,
            calls: Vec::new(),
            next_token: 0,
            tick_ms: 0,
            logs: Vec::new(),
            metric_names: Vec::new(),
            metrics: HashMap::new(),
            shared: HashMap::new(),
            queues: Vec::new(),
            ready: Vec::new(),
            properties: HashMap::new(),
            rng: 0x2545_f491_4f6c_dd1d,
        };
        let mut store = Store::new(engine, state);
        store.set_fuel(u64::MAX)?;
        let mut linker: Linker<State> = Linker::new(engine);
        for import in module.imports() {
            let wasmtime::ExternType::Func(ty) = import.ty() else {
                bail!("unexpected non-function import {}", import.name());
            };
            let name = import.name().to_string();
            let returns = ty.results().len();
            linker.func_new(
                import.module(),
                import.name(),
                ty,
                move |mut caller, args, results| {
                    let status = host_call(&mut caller, &name, args)
                        .map_err(|e| wasmtime::Error::msg(format!("{e:#}")))?;
                    if returns == 1 {
                        if let Some(r) = results.get_mut(0) {
                            *r = Val::I32(status);
                        }
                    }
                    Ok(())
                },
            )?;
        }
        let instance = linker.instantiate(&mut store, module)?;
        let mut f = Filter {
            store,
            instance,
            root: 1,
            next_context: 2,
            configured: false,
        };
        if let Ok(init) = f
            .instance
            .get_typed_func::<(), ()>(&mut f.store, "_initialize")
        {
            init.call(&mut f.store, ())?;
        }
        f.store.data_mut().current = f.root;
        f.call("proxy_on_context_create", &[f.root as i32, 0])?;
        f.call("proxy_on_vm_start", &[f.root as i32, 0])?;
        let size = config_json.len() as i32;
        f.configured = f.call("proxy_on_configure", &[f.root as i32, size])? != 0;
        Ok(f)
    }

    /// Calls an export with i32 arguments; returns its i32 result (0 if it has none). Then
    /// runs what the call posted (`on_queue_ready`), as the event loop would next.
    fn call(&mut self, export: &str, args: &[i32]) -> Result<i32> {
        let r = self.call_now(export, args)?;
        let mut rounds = 0;
        while !self.store.data().ready.is_empty() {
            rounds += 1;
            if rounds > 1000 {
                bail!("on_queue_ready keeps posting itself");
            }
            let ready = std::mem::take(&mut self.store.data_mut().ready);
            let current = self.store.data().current;
            for q in ready {
                self.enter(self.root);
                self.call_now("proxy_on_queue_ready", &[self.root as i32, q as i32])?;
            }
            self.enter(current);
        }
        Ok(r)
    }

    fn call_now(&mut self, export: &str, args: &[i32]) -> Result<i32> {
        let func = self
            .instance
            .get_func(&mut self.store, export)
            .ok_or_else(|| anyhow!("the filter does not export {export}"))?;
        let params: Vec<Val> = args.iter().map(|a| Val::I32(*a)).collect();
        let mut results = vec![Val::I32(0); func.ty(&self.store).results().len()];
        func.call(&mut self.store, &params, &mut results)?;
        Ok(results.first().and_then(Val::i32).unwrap_or(0))
    }

    fn enter(&mut self, context: u32) {
        self.store.data_mut().current = context;
    }

    /// A new request context.
    pub fn new_request(&mut self) -> Result<u32> {
        let id = self.next_context;
        self.next_context += 1;
        self.enter(id);
        self.call("proxy_on_context_create", &[id as i32, self.root as i32])?;
        Ok(id)
    }

    pub fn request_headers(
        &mut self,
        ctx: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<i32> {
        self.enter(ctx);
        let h: Headers = headers
            .iter()
            .map(|(k, v)| (k.to_lowercase(), v.to_string()))
            .collect();
        let n = h.len() as i32;
        self.store.data_mut().stream().request_headers = h;
        self.call(
            "proxy_on_request_headers",
            &[ctx as i32, n, end_of_stream as i32],
        )
    }

    /// Delivers request body bytes; like Envoy, the buffer holds everything received so far
    /// while the filter pauses.
    pub fn request_body(&mut self, ctx: u32, chunk: &[u8], end_of_stream: bool) -> Result<i32> {
        self.enter(ctx);
        let s = self.store.data_mut().stream();
        s.request_body.extend_from_slice(chunk);
        let size = s.request_body.len() as i32;
        self.call(
            "proxy_on_request_body",
            &[ctx as i32, size, end_of_stream as i32],
        )
    }

    pub fn response_headers(
        &mut self,
        ctx: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<i32> {
        self.enter(ctx);
        let h: Headers = headers
            .iter()
            .map(|(k, v)| (k.to_lowercase(), v.to_string()))
            .collect();
        let n = h.len() as i32;
        self.store.data_mut().stream().response_headers = h;
        self.call(
            "proxy_on_response_headers",
            &[ctx as i32, n, end_of_stream as i32],
        )
    }

    /// Delivers one response chunk. Like Envoy: when the filter continues, the body goes on to
    /// the client and the next call sees only new bytes; while it pauses, what comes next is
    /// buffered with what it holds, until it continues or resumes the response.
    pub fn response_body(&mut self, ctx: u32, chunk: &[u8], end_of_stream: bool) -> Result<i32> {
        self.enter(ctx);
        let s = self.store.data_mut().stream();
        if s.response_paused {
            s.response_body.extend_from_slice(chunk);
        } else {
            s.response_body = chunk.to_vec();
        }
        let size = s.response_body.len() as i32;
        let r = self.call(
            "proxy_on_response_body",
            &[ctx as i32, size, end_of_stream as i32],
        )?;
        self.enter(ctx);
        let s = self.store.data_mut().stream();
        if r == 0 {
            s.response_paused = false;
            let body = std::mem::take(&mut s.response_body);
            s.delivered.extend(body);
        } else {
            s.response_paused = true;
        }
        Ok(r)
    }

    /// The response body the client received so far.
    pub fn delivered(&self, ctx: u32) -> Vec<u8> {
        self.store
            .data()
            .streams
            .get(&ctx)
            .map_or_else(Vec::new, |s| s.delivered.clone())
    }

    /// The stream ends (completed or the client went away): on_log, on_done, on_delete.
    pub fn finish(&mut self, ctx: u32) -> Result<()> {
        self.enter(ctx);
        self.call("proxy_on_log", &[ctx as i32])?;
        self.call("proxy_on_done", &[ctx as i32])?;
        self.call("proxy_on_delete", &[ctx as i32])?;
        Ok(())
    }

    /// The stream is reset before it completed (the client went away mid-response): Envoy calls
    /// on_done and on_delete but not on_log.
    pub fn reset(&mut self, ctx: u32) -> Result<()> {
        self.enter(ctx);
        self.call("proxy_on_done", &[ctx as i32])?;
        self.call("proxy_on_delete", &[ctx as i32])?;
        Ok(())
    }

    /// Callouts made since the last call.
    pub fn take_calls(&mut self) -> Vec<HttpCall> {
        std::mem::take(&mut self.store.data_mut().calls)
    }

    /// Answers a callout (as Envoy does, to the root context id).
    pub fn answer(&mut self, token: u32, status: u16, body: &[u8]) -> Result<()> {
        self.answer_with(token, status, &[], body)
    }

    /// Answers a callout with extra response headers (e.g. `x-tollgate-replayed`).
    pub fn answer_with(
        &mut self,
        token: u32,
        status: u16,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Result<()> {
        let mut headers = vec![(":status".to_string(), status.to_string())];
        headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let n = headers.len() as i32;
        self.store.data_mut().call_response = Some((headers, body.to_vec()));
        self.enter(self.root);
        let r = self.call(
            "proxy_on_http_call_response",
            &[self.root as i32, token as i32, n, body.len() as i32, 0],
        );
        self.store.data_mut().call_response = None;
        r.map(|_| ())
    }

    /// Moves the clock.
    pub fn advance_ms(&mut self, ms: u64) {
        self.store.data_mut().now_ns += ms * 1_000_000;
    }

    pub fn now_ms(&self) -> u64 {
        self.store.data().now_ns / 1_000_000
    }

    pub fn tick(&mut self) -> Result<()> {
        self.enter(self.root);
        self.call("proxy_on_tick", &[self.root as i32]).map(|_| ())
    }

    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_ms
    }

    pub fn local_response(&self, ctx: u32) -> Option<&LocalResponse> {
        self.store
            .data()
            .streams
            .get(&ctx)
            .and_then(|s| s.local.as_ref())
    }

    /// How many times the filter resumed the request after pausing it.
    pub fn resumed(&self, ctx: u32) -> u32 {
        self.store.data().streams.get(&ctx).map_or(0, |s| s.resumed)
    }

    pub fn request_header(&self, ctx: u32, name: &str) -> Option<String> {
        let s = self.store.data().streams.get(&ctx)?;
        s.request_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// The request body as it would go upstream (after any change the filter made).
    pub fn request_body_now(&self, ctx: u32) -> Vec<u8> {
        self.store
            .data()
            .streams
            .get(&ctx)
            .map(|s| s.request_body.clone())
            .unwrap_or_default()
    }

    pub fn response_header(&self, ctx: u32, name: &str) -> Option<String> {
        let s = self.store.data().streams.get(&ctx)?;
        s.response_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Sets a property the filter can read (`["request", "id"]` etc.).
    pub fn set_property(&mut self, path: &[&str], value: &[u8]) {
        let key = path.join("\0").into_bytes();
        self.store.data_mut().properties.insert(key, value.to_vec());
    }

    pub fn metric(&self, name: &str) -> i64 {
        self.store.data().metrics.get(name).copied().unwrap_or(0)
    }

    pub fn logs(&self) -> &[(i32, String)] {
        &self.store.data().logs
    }

    /// Fuel consumed so far (≈ wasm instructions executed).
    pub fn fuel_used(&self) -> u64 {
        u64::MAX - self.store.get_fuel().unwrap_or(u64::MAX)
    }
}
