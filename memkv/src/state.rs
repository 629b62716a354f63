//! Everything behind the lock: the key space and the script engine, and how a command or a
//! pipeline runs against them.

use crate::commands::{self, Kind};
use crate::keyspace::{unix_ms, Keyspace};
use crate::reply::Reply;
use crate::script::ScriptEngine;

pub struct State {
    pub ks: Keyspace,
    /// None only if the Lua interpreter could not be created (then scripts answer an error).
    scripts: Result<ScriptEngine, String>,
}

impl State {
    pub fn new() -> Self {
        Self {
            ks: Keyspace::default(),
            scripts: ScriptEngine::new().map_err(|e| e.to_string()),
        }
    }

    /// Runs one command from a client.
    pub fn exec(&mut self, argv: &[&[u8]]) -> Reply {
        let spec = match commands::check(argv) {
            Ok(spec) => spec,
            Err(e) => return e,
        };
        self.ks.begin(unix_ms());
        self.ks.commands_processed += 1;
        match spec.kind {
            Kind::Data(handler) => handler(&mut self.ks, argv),
            Kind::Script(cmd) => match &mut self.scripts {
                Ok(engine) => engine.run(&mut self.ks, cmd, argv),
                Err(e) => Reply::Error(format!("ERR scripting is unavailable: {e}")),
            },
            // `check` resolves containers to a subcommand or reports an arity error.
            Kind::Container(_) => Reply::arity(spec.name),
        }
    }

    /// Runs a MULTI/EXEC transaction as Redis answers it: `OK`, one `QUEUED` per command, then
    /// the array of results, or `EXECABORT` if a command was rejected while queuing.
    pub fn exec_transaction(&mut self, cmds: &[Vec<&[u8]>]) -> Vec<Reply> {
        let mut replies = vec![Reply::ok()];
        let mut aborted = false;
        for argv in cmds {
            match commands::check(argv) {
                Ok(_) => replies.push(Reply::Status("QUEUED".into())),
                Err(e) => {
                    aborted = true;
                    replies.push(e);
                }
            }
        }
        if aborted {
            replies.push(Reply::err(
                "EXECABORT Transaction discarded because of previous errors.",
            ));
        } else {
            replies.push(Reply::Array(
                cmds.iter().map(|argv| self.exec(argv)).collect(),
            ));
        }
        replies
    }
}
