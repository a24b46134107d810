//! The strict JSON parser on arbitrary bytes. Oracle: it accepts only what serde_json
//! accepts too, and reads the same value; and it refuses what serde_json reads as
//! something other than an object only as "not a JSON object". (No round-trip check:
//! serde_json without `float_roundtrip` may read back a float one ulp off, by design.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokenbroker_core::json;

fuzz_target!(|data: &[u8]| {
    let strict = json::parse_object(data);
    let lax = serde_json::from_slice::<Value>(data);
    match (&strict, &lax) {
        (Ok(map), Ok(value)) => {
            assert_eq!(&Value::Object(map.clone()), value, "strict and serde_json read different values")
        }
        (Ok(_), Err(_)) => panic!("the strict parser accepted what serde_json refuses"),
        (Err(_), Ok(Value::Object(_))) | (Err(_), Err(_)) => {}
        (Err(e), Ok(_)) => assert_eq!(*e, "not a JSON object"),
    }
});
