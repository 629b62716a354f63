//! A tiny C function that lets a Rust function raise a Lua error the way Redis' C functions do.
//!
//! Redis' `redis.call` raises a *table* (`{err = "..."}`), `cjson.decode` raises a message
//! prefixed with the caller's position (`luaL_error`), and bad arguments raise `bad argument #1
//! to 'decode' (...)` (`luaL_argerror`). An mlua callback can only raise its own error type,
//! and a Lua wrapper around it would not do either: `return redis.call(...)` would become a tail
//! call that erases the script's frame, and with it the line number Redis reports.
//!
//! So each such function is this shim, a C closure whose upvalue is the Rust function. The Rust
//! function never raises; it returns `(true, value)` or `(false, payload, mode)`, and the shim
//! returns the value or raises the payload with `lua_error`, as it is (`mode` 0), after
//! `luaL_where(L, 1)` (`mode` -1), or through `luaL_argerror(L, mode, payload)` (`mode` > 0).
//! Being a C function, it keeps the caller's frame on the stack exactly as Redis' would.

use mlua::{ffi, Function, Lua};
use std::os::raw::c_int;

/// Raise the payload as it is (a table or a string).
pub const RAISE: i64 = 0;
/// Raise the payload prefixed with the caller's position, like `luaL_error`.
pub const RAISE_WHERE: i64 = -1;

unsafe extern "C-unwind" fn shim(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: called by Lua with a valid state; the upvalue is the Rust function set by `wrap`.
    // No Rust value with a destructor lives in this frame, so `lua_error`'s longjmp is sound.
    unsafe {
        let nargs = ffi::lua_gettop(state);
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
        ffi::lua_insert(state, 1);
        ffi::lua_call(state, nargs, 3);
        if ffi::lua_toboolean(state, 1) != 0 {
            ffi::lua_settop(state, 2);
            return 1;
        }
        let mode = ffi::lua_tonumber(state, 3);
        ffi::lua_settop(state, 2);
        if mode > 0.0 {
            let msg = ffi::lua_tolstring(state, 2, std::ptr::null_mut());
            ffi::luaL_argerror(state, mode as c_int, msg);
        } else if mode < 0.0 {
            ffi::luaL_where(state, 1);
            ffi::lua_insert(state, 2);
            ffi::lua_concat(state, 2);
        }
        ffi::lua_error(state)
    }
}

/// Wraps a Rust function following the `(ok, payload, mode)` convention into a raising one.
pub fn wrap(lua: &Lua, raw: Function) -> mlua::Result<Function> {
    // SAFETY: pushes one C closure capturing the function argument as its single upvalue.
    unsafe { lua.exec_raw(raw, |state| ffi::lua_pushcclosure(state, shim, 1)) }
}
