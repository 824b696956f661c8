//! How the image operations are declared once.
//!
//! One line per operation, in the `image_operations!` list in `image.rs` next to the
//! argument types, gives its wire tag, its argument type, its name, its reply type and
//! how errors and logs describe it. Everything else follows from that line: the [`ImageOp`] request enum, the
//! [`ImageReply`] enum, the [`ImageOperation`] trait that ties a reply type to its
//! request (so the host's `Session::image` returns `Op::Reply`), and
//! [`ImageOp::dispatch`], which makes the agent implement [`Handle`] for every operation
//! or fail to compile.
//!
//! Wire tags are append-only: a tag is never reused or renumbered, so inserting an
//! operation anywhere in the list changes no other operation's encoding. Both enums are
//! encoded as `(tag, value)`; the golden test in `tests/golden.rs` pins one encoding of
//! every operation and reply and tells when [`crate::PROTOCOL_VERSION`] must change.

use crate::{ImageOp, ImageReply, OperationError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Implemented by every image operation's argument type.
pub trait ImageOperation: Into<ImageOp> + Serialize + DeserializeOwned {
    /// What the agent answers when the operation succeeds.
    type Reply: Serialize + DeserializeOwned + std::fmt::Debug;
    /// The stable wire tag.
    const TAG: u32;
    /// The name in logs, plans and errors (`write-file`).
    const NAME: &'static str;
    /// This operation's reply, or the reply back if it belongs to another operation.
    fn reply(reply: ImageReply) -> Result<Self::Reply, ImageReply>;
}

/// How the agent carries out operation `O`. [`ImageOp::dispatch`] requires an
/// implementation for every operation.
pub trait Handle<O: ImageOperation> {
    fn handle(&self, op: O) -> Result<O::Reply, OperationError>;
}

/// Reads what [`tagged`] wrote: `(tag, value)` on the wire, `{name: value}` in
/// human-readable formats; an unknown tag or name is an error.
macro_rules! deserialize_tagged {
    ($enum:ident, $expecting:literal; $( $tag:literal $op:ident $name:literal ),*) => {
        impl<'de> ::serde::Deserialize<'de> for $enum {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visit;
                impl<'de> ::serde::de::Visitor<'de> for Visit {
                    type Value = $enum;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_seq<A: ::serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<$enum, A::Error> {
                        let tag: u32 = seq.next_element()?.ok_or_else(|| ::serde::de::Error::invalid_length(0, &self))?;
                        match tag {
                            $( $tag => Ok($enum::$op(seq.next_element()?.ok_or_else(|| ::serde::de::Error::invalid_length(1, &self))?)), )*
                            _ => Err(::serde::de::Error::custom(format!("unknown image operation tag {tag}"))),
                        }
                    }
                    fn visit_map<A: ::serde::de::MapAccess<'de>>(self, mut map: A) -> Result<$enum, A::Error> {
                        let name: String = map.next_key()?.ok_or_else(|| ::serde::de::Error::invalid_length(0, &self))?;
                        match name.as_str() {
                            $( $name => Ok($enum::$op(map.next_value()?)), )*
                            _ => Err(::serde::de::Error::custom(format!("unknown image operation `{name}`"))),
                        }
                    }
                }
                if d.is_human_readable() { d.deserialize_map(Visit) } else { d.deserialize_tuple(2, Visit) }
            }
        }
    };
}

macro_rules! image_operations {
    ($( $tag:literal $op:ident $name:literal -> $reply:ty, |$this:ident| $describe:expr; )*) => {
        /// A request to operate on the image.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
        pub enum ImageOp {
            $( $op($op), )*
        }

        /// The successful answer to an [`ImageOp`]: the variant of the same name.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
        pub enum ImageReply {
            $( $op(<$op as $crate::ImageOperation>::Reply), )*
        }

        $(
            impl $crate::ImageOperation for $op {
                type Reply = $reply;
                const TAG: u32 = $tag;
                const NAME: &'static str = $name;
                fn reply(reply: ImageReply) -> Result<$reply, ImageReply> {
                    match reply {
                        ImageReply::$op(r) => Ok(r),
                        #[allow(unreachable_patterns)]
                        other => Err(other),
                    }
                }
            }

            impl From<$op> for ImageOp {
                fn from(op: $op) -> ImageOp {
                    ImageOp::$op(op)
                }
            }
        )*

        impl ImageOp {
            pub fn tag(&self) -> u32 {
                match self { $( ImageOp::$op(_) => $tag, )* }
            }

            pub fn name(&self) -> &'static str {
                match self { $( ImageOp::$op(_) => $name, )* }
            }

            /// One line saying what the operation does to the image, for errors and logs.
            pub fn describe(&self) -> String {
                match self { $( ImageOp::$op($this) => $describe, )* }
            }

            /// Hands the operation to `handler`'s implementation for its type.
            pub fn dispatch<H>(self, handler: &H) -> Result<ImageReply, $crate::OperationError>
            where
                H: ?Sized $( + $crate::Handle<$op> )*,
            {
                match self { $( ImageOp::$op(op) => <H as $crate::Handle<$op>>::handle(handler, op).map(ImageReply::$op), )* }
            }

            /// Every tag in use with its name, in declaration order.
            pub const ALL: &'static [(u32, &'static str)] = &[ $( ($tag, $name), )* ];
        }

        impl ImageReply {
            pub fn tag(&self) -> u32 {
                match self { $( ImageReply::$op(_) => $tag, )* }
            }

            pub fn name(&self) -> &'static str {
                match self { $( ImageReply::$op(_) => $name, )* }
            }
        }

        impl ::serde::Serialize for ImageOp {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self { $( ImageOp::$op(op) => $crate::operations::tagged(s, $tag, $name, op), )* }
            }
        }

        impl ::serde::Serialize for ImageReply {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self { $( ImageReply::$op(r) => $crate::operations::tagged(s, $tag, $name, r), )* }
            }
        }

        deserialize_tagged!(ImageOp, "an image operation"; $( $tag $op $name ),*);
        deserialize_tagged!(ImageReply, "an image operation's reply"; $( $tag $op $name ),*);
    };
}

/// `(tag, value)` on the wire; `{name: value}` in human-readable formats (plans).
pub(crate) fn tagged<S: serde::Serializer, T: Serialize>(
    s: S,
    tag: u32,
    name: &str,
    value: &T,
) -> Result<S::Ok, S::Error> {
    use serde::ser::{SerializeMap, SerializeTuple};
    if s.is_human_readable() {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(name, value)?;
        map.end()
    } else {
        let mut tuple = s.serialize_tuple(2)?;
        tuple.serialize_element(&tag)?;
        tuple.serialize_element(value)?;
        tuple.end()
    }
}
