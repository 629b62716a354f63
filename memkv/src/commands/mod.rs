//! The command table and the checks Redis makes before running a command.
//!
//! Each command has Redis' arity (positive: exact argument count including the name; negative:
//! minimum) and flags, because the errors for a bad call come from those before the command
//! itself runs: "unknown command", "wrong number of arguments", and, from a script, "not
//! allowed from script" or "Write commands are not allowed from read-only scripts.".
//! Handlers receive the whole argv (name first) and the key space, and return a [`Reply`].

mod hashes;
mod server;
mod streams;
mod strings;
mod zsets;

pub use server::REDIS_VERSION;

use crate::keyspace::Keyspace;
use crate::reply::Reply;

/// A command run against the key space.
pub type Handler = fn(&mut Keyspace, &[&[u8]]) -> Reply;

/// The command changes data (refused in read-only scripts).
pub const WRITE: u8 = 1;
/// The command cannot be called from a script.
pub const NOSCRIPT: u8 = 2;

/// The scripting commands, which need the script engine rather than just the key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptCmd {
    Eval {
        sha: bool,
        read_only: bool,
    },
    Load,
    Exists,
    Flush,
    /// `FCALL` / `FCALL_RO`: a function of a loaded library.
    Fcall {
        read_only: bool,
    },
    FunctionLoad,
    FunctionDelete,
    FunctionFlush,
}

pub enum Kind {
    Data(Handler),
    Script(ScriptCmd),
    /// A command with subcommands (`CONFIG GET`); its own entry only serves the arity error.
    Container(&'static [Spec]),
}

pub struct Spec {
    /// Redis' full name, as error messages show it (`config|get`).
    pub name: &'static str,
    pub arity: i32,
    pub flags: u8,
    pub kind: Kind,
}

impl Spec {
    pub fn arity_ok(&self, argc: usize) -> bool {
        let argc = i64::try_from(argc).unwrap_or(i64::MAX);
        let arity = i64::from(self.arity);
        if arity >= 0 {
            argc == arity
        } else {
            argc >= -arity
        }
    }

    pub fn is_write(&self) -> bool {
        self.flags & WRITE != 0
    }

    pub fn is_noscript(&self) -> bool {
        self.flags & NOSCRIPT != 0
    }
}

const fn data(name: &'static str, arity: i32, flags: u8, h: Handler) -> Spec {
    Spec {
        name,
        arity,
        flags,
        kind: Kind::Data(h),
    }
}

const fn script(name: &'static str, arity: i32, cmd: ScriptCmd) -> Spec {
    Spec {
        name,
        arity,
        flags: NOSCRIPT,
        kind: Kind::Script(cmd),
    }
}

static CONFIG_SUBS: [Spec; 1] = [data("config|get", -3, NOSCRIPT, server::config_get)];

static SCRIPT_SUBS: [Spec; 3] = [
    script("script|load", 3, ScriptCmd::Load),
    script("script|exists", -3, ScriptCmd::Exists),
    script("script|flush", -2, ScriptCmd::Flush),
];

static FUNCTION_SUBS: [Spec; 3] = [
    script("function|load", -3, ScriptCmd::FunctionLoad),
    script("function|delete", 3, ScriptCmd::FunctionDelete),
    script("function|flush", -2, ScriptCmd::FunctionFlush),
];

static COMMANDS: [Spec; 52] = [
    // Strings and keys.
    data("get", 2, 0, strings::get),
    data("mget", -2, 0, strings::mget),
    data("set", -3, WRITE, strings::set),
    data("setnx", 3, WRITE, strings::setnx),
    data("incrby", 3, WRITE, strings::incrby),
    data("del", -2, WRITE, strings::del),
    data("exists", -2, 0, strings::exists),
    data("pexpire", -3, WRITE, strings::pexpire),
    data("expire", -3, WRITE, strings::expire),
    data("pttl", 2, 0, strings::pttl),
    data("ttl", 2, 0, strings::ttl),
    // Hashes.
    data("hget", 3, 0, hashes::hget),
    data("hmget", -3, 0, hashes::hmget),
    data("hset", -4, WRITE, hashes::hset),
    data("hdel", -3, WRITE, hashes::hdel),
    data("hincrby", 4, WRITE, hashes::hincrby),
    data("hgetall", 2, 0, hashes::hgetall),
    data("hlen", 2, 0, hashes::hlen),
    data("hexists", 3, 0, hashes::hexists),
    // Sorted sets.
    data("zadd", -4, WRITE, zsets::zadd),
    data("zrem", -3, WRITE, zsets::zrem),
    data("zrange", -4, 0, zsets::zrange),
    data("zrangebyscore", -4, 0, zsets::zrangebyscore),
    data("zremrangebyscore", 4, WRITE, zsets::zremrangebyscore),
    data("zcard", 2, 0, zsets::zcard),
    data("zscore", 3, 0, zsets::zscore),
    // Streams.
    data("xadd", -5, WRITE, streams::xadd),
    data("xrange", -4, 0, streams::xrange),
    data("xrevrange", -4, 0, streams::xrevrange),
    data("xtrim", -4, WRITE, streams::xtrim),
    data("xlen", 2, 0, streams::xlen),
    data("xdel", -3, WRITE, streams::xdel),
    // Server.
    data("ping", -1, 0, server::ping),
    data("flushall", -1, WRITE, server::flushall),
    data("flushdb", -1, WRITE, server::flushdb),
    data("dbsize", 1, 0, server::dbsize),
    data("keys", 2, 0, server::keys),
    data("type", 2, 0, server::type_),
    data("info", -1, 0, server::info),
    data("time", 1, 0, server::time),
    Spec {
        name: "config",
        arity: -2,
        flags: NOSCRIPT,
        kind: Kind::Container(&CONFIG_SUBS),
    },
    // Scripting.
    script(
        "eval",
        -3,
        ScriptCmd::Eval {
            sha: false,
            read_only: false,
        },
    ),
    script(
        "evalsha",
        -3,
        ScriptCmd::Eval {
            sha: true,
            read_only: false,
        },
    ),
    script(
        "eval_ro",
        -3,
        ScriptCmd::Eval {
            sha: false,
            read_only: true,
        },
    ),
    script(
        "evalsha_ro",
        -3,
        ScriptCmd::Eval {
            sha: true,
            read_only: true,
        },
    ),
    Spec {
        name: "script",
        arity: -2,
        flags: NOSCRIPT,
        kind: Kind::Container(&SCRIPT_SUBS),
    },
    script("fcall", -3, ScriptCmd::Fcall { read_only: false }),
    script("fcall_ro", -3, ScriptCmd::Fcall { read_only: true }),
    Spec {
        name: "function",
        arity: -2,
        flags: NOSCRIPT,
        kind: Kind::Container(&FUNCTION_SUBS),
    },
    // Aliases some clients send; handled like their modern forms.
    data("incr", 2, WRITE, strings::incr),
    data("decrby", 3, WRITE, strings::decrby),
    data("decr", 2, WRITE, strings::decr),
];

/// What a command name resolves to.
pub enum Lookup {
    Found(&'static Spec),
    UnknownCommand,
    /// A container command with an unknown subcommand.
    UnknownSubcommand,
}

/// Finds the command for an argv (case-insensitively), descending into subcommands.
pub fn lookup(argv: &[&[u8]]) -> Lookup {
    let Some(name) = argv.first() else {
        return Lookup::UnknownCommand;
    };
    let Some(spec) = COMMANDS
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
    else {
        return Lookup::UnknownCommand;
    };
    match (&spec.kind, argv.get(1)) {
        (Kind::Container(subs), Some(sub)) => subs
            .iter()
            .find(|s| {
                s.name
                    .split('|')
                    .nth(1)
                    .is_some_and(|n| n.as_bytes().eq_ignore_ascii_case(sub))
            })
            .map_or(Lookup::UnknownSubcommand, Lookup::Found),
        _ => Lookup::Found(spec),
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Redis 7's reply to an unknown command (name and args as sent, truncated like Redis does).
pub fn unknown_command(argv: &[&[u8]]) -> Reply {
    let name = argv
        .first()
        .map(|n| lossy(&n[..n.len().min(128)]))
        .unwrap_or_default();
    let mut args = String::new();
    for a in argv.iter().skip(1) {
        if args.len() >= 128 {
            break;
        }
        let room = 128 - args.len();
        args.push_str(&format!("'{}' ", lossy(&a[..a.len().min(room)])));
    }
    Reply::Error(format!(
        "ERR unknown command '{name}', with args beginning with: {args}"
    ))
}

pub fn unknown_subcommand(argv: &[&[u8]]) -> Reply {
    let cmd = argv
        .first()
        .map(|n| lossy(n).to_uppercase())
        .unwrap_or_default();
    let sub = argv
        .get(1)
        .map(|s| lossy(&s[..s.len().min(128)]))
        .unwrap_or_default();
    Reply::Error(format!("ERR unknown subcommand '{sub}'. Try {cmd} HELP."))
}

/// Checks an argv the way Redis does before running it from a client.
pub fn check(argv: &[&[u8]]) -> Result<&'static Spec, Reply> {
    match lookup(argv) {
        Lookup::UnknownCommand => Err(unknown_command(argv)),
        Lookup::UnknownSubcommand => Err(unknown_subcommand(argv)),
        Lookup::Found(spec) if !spec.arity_ok(argv.len()) => Err(Reply::arity(spec.name)),
        Lookup::Found(spec) => Ok(spec),
    }
}

/// Checks an argv the way Redis does before running it from a script (`redis.call`); errors
/// are the bare messages that the script layer wraps as `ERR ...`.
pub fn check_from_script(argv: &[&[u8]], read_only: bool) -> Result<Handler, &'static str> {
    let spec = match lookup(argv) {
        Lookup::Found(spec) => spec,
        _ => return Err("Unknown Redis command called from script"),
    };
    if !spec.arity_ok(argv.len()) {
        return Err("Wrong number of args calling Redis command from script");
    }
    if spec.is_noscript() {
        return Err("This Redis command is not allowed from script");
    }
    if read_only && spec.is_write() {
        return Err("Write commands are not allowed from read-only scripts.");
    }
    match spec.kind {
        Kind::Data(h) => Ok(h),
        _ => Err("This Redis command is not allowed from script"),
    }
}

/// Case-insensitive comparison of an argument with an option name.
pub fn is(arg: &[u8], opt: &str) -> bool {
    arg.eq_ignore_ascii_case(opt.as_bytes())
}

/// Parses a strict integer argument or answers Redis' error.
pub fn int_arg(arg: &[u8]) -> Result<i64, Reply> {
    crate::num::parse_i64(arg).ok_or_else(Reply::not_int)
}
