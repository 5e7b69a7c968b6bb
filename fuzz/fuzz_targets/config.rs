//! Any configuration file and environment: never a panic; a refusal is one line
//! naming what is wrong; what loads, validates.
//!
//! Input: the TOML text, then optionally a NUL byte and `NAME=VALUE` lines taken as
//! the environment.
#![no_main]

use fleetwatch::config::Settings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let vars = env.lines().filter_map(|line| {
        let (name, value) = line.split_once('=')?;
        Some((name.to_string(), value.to_string()))
    });
    match Settings::load_from_toml(toml, vars) {
        Ok(settings) => assert!(settings.validate().is_ok()),
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "not one line: {line:?}");
        }
    }
});
