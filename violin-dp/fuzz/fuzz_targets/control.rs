//! A control request line as a daemon reads it: JSON decoding of arbitrary bytes, then
//! the daemon's check of any spec it carries. Neither may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use violin_dp::control::Request;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    if let Request::AddViolin { violin }
    | Request::ApplyViolin { violin }
    | Request::PrepareIncoming { violin, .. } = &req
    {
        let _ = violin_dp::spec::check(violin);
    }
    let _ = req.is_read_only();
});
