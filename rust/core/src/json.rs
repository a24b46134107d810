//! Strict JSON for JOSE headers and claim sets: the top level must be an object, a member
//! name may appear only once (serde_json keeps the last duplicate silently, which lets two
//! parsers disagree about a token), and numbers must be finite.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Parses a JSON object, rejecting duplicate member names at any depth.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, &'static str> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(Value::Object(map))) => Ok(map),
        Ok(_) => Err("not a JSON object"),
        Err(e) if e.to_string().contains("duplicate member") => Err("duplicate member name"),
        Err(_) => Err("not valid JSON"),
    }
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("non-finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if map.contains_key(&name) {
                return Err(de::Error::custom("duplicate member"));
            }
            let Strict(value) = access.next_value()?;
            map.insert(name, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_objects() {
        let m = parse_object(br#"{"a":1,"b":{"c":[1,2]}}"#).unwrap();
        assert_eq!(m["a"], 1);
    }

    #[test]
    fn rejects_duplicates_at_any_depth_and_through_escapes() {
        assert_eq!(parse_object(br#"{"a":1,"a":2}"#), Err("duplicate member name"));
        assert_eq!(parse_object(br#"{"x":{"a":1,"a":2}}"#), Err("duplicate member name"));
        assert_eq!(parse_object(br#"{"a":1,"\u0061":2}"#), Err("duplicate member name"));
    }

    #[test]
    fn rejects_non_objects_and_non_json() {
        assert_eq!(parse_object(b"[1]"), Err("not a JSON object"));
        assert_eq!(parse_object(br#"{"a":NaN}"#), Err("not valid JSON"));
        assert_eq!(parse_object(br#"{"a":Infinity}"#), Err("not valid JSON"));
        assert_eq!(parse_object(br#"{"a":1e999}"#), Err("not valid JSON"));
        assert_eq!(parse_object(b"{\"a\":1} x"), Err("not valid JSON"));
        assert_eq!(parse_object(b"\xff"), Err("not valid JSON"));
    }
}
