//! The spec parser on arbitrary text: it accepts or names what is wrong, never panics;
//! whatever it accepts passes `spec::check` (what a daemon applies).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let hosts: BTreeMap<String, Ipv4Addr> = [
        ("h1".to_string(), Ipv4Addr::new(172, 31, 0, 1)),
        ("h2".to_string(), Ipv4Addr::new(172, 31, 0, 2)),
    ]
    .into();
    match violin_dp::spec::parse(text, &hosts) {
        Ok(v) => assert!(violin_dp::spec::check(&v).is_ok(), "{v:?}"),
        Err(e) => assert!(!e.errors.is_empty()),
    }
});
