//! What one request line is parsed into: [`Request`], the four fields validation looks at
//! (`custom_id`, `method`, `url`, `body.model`) and the prompt's parts the token estimate
//! counts (`tokens`), every other key skipped but still parsed.
//! The deserializers are written by hand so that a field of the wrong type is a finding for
//! the checker (`Value::Other("number")`), not a parse error, and so that strings are borrowed
//! from the line unless they hold escapes. Tested through the checker (`validator.rs`).

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
};

use super::tokens::{PROMPT_KEYS, Prompt};

/// One request line, as far as validation cares; every other key is skipped (but still
/// parsed, so invalid JSON anywhere in the line is found). Strings are borrowed from the
/// line unless they contain escapes. A key given twice is an error (serde's "duplicate
/// field"), reported as `invalid_json_line`: which of the two the service would use is
/// unknowable.
#[derive(Deserialize)]
pub(super) struct Request<'a> {
    #[serde(default, borrow)]
    pub(super) custom_id: Value<'a>,
    #[serde(default, borrow)]
    pub(super) method: Value<'a>,
    #[serde(default, borrow)]
    pub(super) url: Value<'a>,
    #[serde(default, borrow)]
    pub(super) body: Body<'a>,
}

/// A field that should be a string: absent, a string, or something else (named, for the
/// message). Deserializes from any JSON value, so a wrong type is a finding, not a parse error.
#[derive(Default)]
pub(super) enum Value<'a> {
    #[default]
    Missing,
    Str(Cow<'a, str>),
    Other(&'static str),
}

/// `body`: absent, an object (of which `model` and the prompt's parts are kept), or
/// something else.
#[derive(Default)]
pub(super) enum Body<'a> {
    #[default]
    Missing,
    Object {
        model: Value<'a>,
        prompt: Prompt<'a>,
    },
    Other(&'static str),
}

/// `visit_*` for the JSON kinds that are "something else" to both `Value` and `Body`.
macro_rules! other_kinds {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other("boolean"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other("number"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other("number"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other("number"))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other("null"))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($other("array"))
        }
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for Value<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Value<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Value<'a>, E> {
                Ok(Value::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Value<'a>, E> {
                Ok(Value::Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Value<'a>, E> {
                Ok(Value::Str(Cow::Owned(s)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'a>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Value::Other("object"))
            }
            other_kinds!(Value::Other);
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Body<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Body<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Body<'a>, E> {
                Ok(Body::Other("string"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body<'a>, A::Error> {
                let mut model = None;
                let mut prompt = Prompt::default();
                while let Some(key) = map.next_key()? {
                    match key {
                        BodyKey::Model => {
                            if model.is_some() {
                                return Err(de::Error::duplicate_field("model"));
                            }
                            model = Some(map.next_value::<Value<'a>>()?);
                        }
                        BodyKey::Prompt(key) => map.next_value_seed(prompt.field(key))?,
                        BodyKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Body::Object {
                    model: model.unwrap_or_default(),
                    prompt,
                })
            }
            other_kinds!(Body::Other);
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A key of `body`: `model`, a key of the prompt, or another; read without allocating.
enum BodyKey {
    Model,
    Prompt(&'static str),
    Other,
}

impl<'de> Deserialize<'de> for BodyKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = BodyKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<BodyKey, E> {
                if s == "model" {
                    return Ok(BodyKey::Model);
                }
                Ok(PROMPT_KEYS
                    .iter()
                    .find(|k| **k == s)
                    .map_or(BodyKey::Other, |k| BodyKey::Prompt(k)))
            }
        }
        d.deserialize_str(V)
    }
}
