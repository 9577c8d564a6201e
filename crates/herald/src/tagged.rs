//! One pass over an internally tagged JSON body: the variant's struct is
//! decoded while its `event_type` field is checked and left out.
//!
//! Why: reading the tag first and the struct after walks the body twice, and
//! the tag is usually its first field but may be anywhere, so the first walk
//! reads to the end. Decoding through a map that hides the tag from the
//! struct (as serde's own internally tagged enums do, but without buffering
//! the object into an intermediate tree) reads every byte once.

use std::cell::Cell;
use std::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, Visitor};

/// The tag field of every herald event body.
const TAG: &str = "event_type";

/// What was seen of the tag while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagSeen {
    Absent,
    Expected,
    /// Another value, a second tag field, or a value that is not a string.
    Wrong,
}

/// Decodes `payload` as `T` when its tag is `expected`; `None` for anything
/// else (another or a missing tag, invalid JSON, a body `T` refuses).
pub(crate) fn decode_tagged<T: DeserializeOwned>(payload: &[u8], expected: &str) -> Option<T> {
    let seen = Cell::new(TagSeen::Absent);
    let mut json = serde_json::Deserializer::from_slice(payload);
    let value = T::deserialize(WithoutTag {
        inner: &mut json,
        expected,
        seen: &seen,
    })
    .ok()?;
    json.end().ok()?;
    (seen.get() == TagSeen::Expected).then_some(value)
}

/// A deserializer that presents a JSON object without its tag field.
struct WithoutTag<'t, D> {
    inner: D,
    expected: &'t str,
    seen: &'t Cell<TagSeen>,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for WithoutTag<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_map(MapVisitor {
            visitor,
            expected: self.expected,
            seen: self.seen,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// Hands the object to the struct's visitor through [`FilteredMap`].
struct MapVisitor<'t, V> {
    visitor: V,
    expected: &'t str,
    seen: &'t Cell<TagSeen>,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for MapVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(FilteredMap {
            map,
            expected: self.expected,
            seen: self.seen,
        })
    }
}

/// The object's entries, the tag's taken out and checked on the way.
struct FilteredMap<'t, A> {
    map: A,
    expected: &'t str,
    seen: &'t Cell<TagSeen>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for FilteredMap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        loop {
            let Some(key) = self.map.next_key_seed(KeySeed)? else {
                return Ok(None);
            };
            match key {
                Key::Tag => {
                    let matches = self.map.next_value_seed(TagValue(self.expected))?;
                    let seen = match (self.seen.get(), matches) {
                        (TagSeen::Absent, true) => TagSeen::Expected,
                        _ => TagSeen::Wrong,
                    };
                    self.seen.set(seen);
                }
                Key::Borrowed(name) => {
                    return seed
                        .deserialize(BorrowedStrDeserializer::new(name))
                        .map(Some)
                }
                Key::Owned(name) => {
                    return seed
                        .deserialize(de::IntoDeserializer::<A::Error>::into_deserializer(name))
                        .map(Some)
                }
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        self.map.next_value_seed(seed)
    }
}

/// An object key: the tag, or another field's name (borrowed from the body
/// unless it had escapes).
enum Key<'de> {
    Tag,
    Borrowed(&'de str),
    Owned(String),
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key<'de>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Key<'de>, E> {
        Ok(if name == TAG {
            Key::Tag
        } else {
            Key::Borrowed(name)
        })
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key<'de>, E> {
        Ok(if name == TAG {
            Key::Tag
        } else {
            Key::Owned(name.to_owned())
        })
    }
}

/// The tag's value: whether it is the expected string.
struct TagValue<'t>(&'t str);

impl<'de> DeserializeSeed<'de> for TagValue<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for TagValue<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the event_type string")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<bool, E> {
        Ok(value == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Deserialize)]
    struct Shipped {
        order_id: String,
        #[serde(default)]
        items: Vec<u32>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        order_id: String,
    }

    fn shipped(body: &str) -> Option<Shipped> {
        decode_tagged(body.as_bytes(), "Shipped")
    }

    #[test]
    fn reads_the_struct_with_the_tag_anywhere() {
        let want = Some(Shipped {
            order_id: "o-1".into(),
            items: vec![1, 2],
        });
        for body in [
            r#"{"event_type":"Shipped","order_id":"o-1","items":[1,2]}"#,
            r#"{"order_id":"o-1","items":[1,2],"event_type":"Shipped"}"#,
            r#"{"order_id":"o-1","event_type":"Shipped","items":[1,2],"newer":{"x":[1]}}"#,
            // Escapes in a key or in the tag itself.
            r#"{"order\u005fid":"o-1","items":[1,2],"event_\u0074ype":"Ship\u0070ed"}"#,
        ] {
            assert_eq!(shipped(body), want, "{body}");
        }
        // The tag is hidden from a struct that refuses unknown fields.
        assert_eq!(
            decode_tagged::<Strict>(br#"{"event_type":"Shipped","order_id":"o"}"#, "Shipped"),
            Some(Strict {
                order_id: "o".into()
            })
        );
    }

    #[test]
    fn anything_unusual_is_none() {
        for body in [
            r#"{"event_type":"Cancelled","order_id":"o-1"}"#,
            r#"{"order_id":"o-1"}"#,
            r#"{"event_type":"Shipped","event_type":"Shipped","order_id":"o-1"}"#,
            r#"{"event_type":7,"order_id":"o-1"}"#,
            r#"{"event_type":"Shipped","order_id":1}"#,
            r#"{"event_type":"Shipped","order_id":"o-1"} trailing"#,
            r#"["Shipped","o-1"]"#,
            r#"{"event_type":"Shipped","#,
            "",
        ] {
            assert_eq!(shipped(body), None, "{body}");
        }
    }
}
