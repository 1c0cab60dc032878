//! The two client encodings of the same frames: JSON text (`switchboard.v1.json`)
//! and protobuf binary (`switchboard.v1.proto`). Decoding never panics on any input.

use serde::{de::DeserializeOwned, Serialize};

use crate::ErrorCode;

/// WebSocket subprotocol of JSON text frames.
pub const SUBPROTOCOL_JSON: &str = "switchboard.v1.json";
/// WebSocket subprotocol of protobuf binary frames.
pub const SUBPROTOCOL_PROTO: &str = "switchboard.v1.proto";

/// The encoding negotiated for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Proto,
}

impl Encoding {
    /// The encoding for a subprotocol name.
    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        match name.trim() {
            SUBPROTOCOL_JSON => Some(Encoding::Json),
            SUBPROTOCOL_PROTO => Some(Encoding::Proto),
            _ => None,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => SUBPROTOCOL_JSON,
            Encoding::Proto => SUBPROTOCOL_PROTO,
        }
    }
}

/// An encoded frame: text for JSON, binary for protobuf.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Text(String),
    Binary(Vec<u8>),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Text(s) => s.len(),
            Payload::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a frame could not be decoded. Carries the request id when one could be read,
/// so the error can be sent as that request's ack.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<String>,
}

/// Encode a frame in the given encoding.
pub fn encode<T: prost::Message + Serialize>(frame: &T, encoding: Encoding) -> Payload {
    match encoding {
        // Serializing generated types to JSON cannot fail: they hold only strings,
        // numbers, booleans, vectors and maps with string keys.
        Encoding::Json => Payload::Text(serde_json::to_string(frame).unwrap_or_default()),
        Encoding::Proto => Payload::Binary(frame.encode_to_vec()),
    }
}

/// Decode a JSON text frame.
pub fn decode_json<T: DeserializeOwned>(text: &str) -> Result<T, DecodeError> {
    serde_json::from_str(text).map_err(|e| {
        // Recover the id if the frame is at least a JSON object with a string id.
        let id = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
        DecodeError {
            code: ErrorCode::BadFrame,
            message: format!("invalid json frame: {e}"),
            id,
        }
    })
}

/// Decode a JSON object (an HTTP request body, for example) strictly: the text
/// must be an object, and no message inside it may be given as an array (serde
/// would read its fields by position).
pub fn decode_json_object<T: DeserializeOwned + Serialize>(text: &str) -> Result<T, DecodeError> {
    let bad = |message: String| DecodeError {
        code: ErrorCode::BadFrame,
        message,
        id: None,
    };
    if !text.trim_start().starts_with('{') {
        return Err(bad("expected a JSON object".into()));
    }
    let value: T = decode_json(text)?;
    match array_for_object(text, &value) {
        Some(path) => Err(bad(format!("`{path}` must be an object, not an array"))),
        None => Ok(value),
    }
}

/// Decode a protobuf binary frame.
pub fn decode_proto<T: prost::Message + Default>(bytes: &[u8]) -> Result<T, DecodeError> {
    T::decode(bytes).map_err(|e| DecodeError {
        code: ErrorCode::BadFrame,
        message: format!("invalid protobuf frame: {e}"),
        id: None,
    })
}

/// Decode a payload in the connection's encoding. A binary frame on a JSON
/// connection (or text on a protobuf one) is a bad frame.
pub fn decode<T: prost::Message + Default + DeserializeOwned>(
    payload: &Payload,
    encoding: Encoding,
) -> Result<T, DecodeError> {
    match (payload, encoding) {
        (Payload::Text(t), Encoding::Json) => decode_json(t),
        (Payload::Binary(b), Encoding::Proto) => decode_proto(b),
        _ => Err(DecodeError {
            code: ErrorCode::BadFrame,
            message: format!(
                "frame type does not match subprotocol {}",
                encoding.subprotocol()
            ),
            id: None,
        }),
    }
}

/// Names of the client requests in the JSON encoding (the `ClientFrame.request` cases).
pub const REQUEST_NAMES: &[&str] = &[
    "send",
    "history",
    "sync",
    "read",
    "typing",
    "presence_set",
    "presence_watch",
    "conversation_create",
    "conversation_members",
    "conversation_list",
    "ping",
    "edit",
    "delete",
    "react",
    "thread",
    "receipts",
    "conversation_update",
    "notification_set",
];

/// Decode a client frame. Unlike [`decode`], tells a malformed known request
/// (`bad_frame`) from a request type the server does not know (`unknown_frame`).
pub fn decode_client_frame(
    payload: &Payload,
    encoding: Encoding,
) -> Result<crate::v1::ClientFrame, DecodeError> {
    let frame: crate::v1::ClientFrame = decode(payload, encoding)?;
    let id = (!frame.id.is_empty()).then(|| frame.id.clone());
    if frame.request.is_some() {
        if let Payload::Text(text) = payload {
            if let Some(path) = array_for_object(text, &frame) {
                return Err(DecodeError {
                    code: ErrorCode::BadFrame,
                    message: format!("`{path}` must be an object, not an array"),
                    id,
                });
            }
        }
        return Ok(frame);
    }
    // serde drops a flattened oneof that fails to decode; find out which case it was.
    let known = match payload {
        Payload::Text(text) => serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| {
                v.as_object().and_then(|o| {
                    o.keys()
                        .find(|k| REQUEST_NAMES.contains(&k.as_str()))
                        .cloned()
                })
            }),
        Payload::Binary(_) => None,
    };
    Err(match known {
        Some(name) => DecodeError {
            code: ErrorCode::BadFrame,
            message: format!("invalid `{name}` request"),
            id,
        },
        None => DecodeError {
            code: ErrorCode::UnknownFrame,
            message: "frame names no known request".into(),
            id,
        },
    })
}

/// The first place where a JSON frame gives an array for a message: serde accepts a
/// sequence for a struct (fields by position), the protocol does not. Found by
/// walking the client's JSON next to the decoded frame encoded again (which has every
/// field, so an object wherever a message is).
fn array_for_object<T: Serialize>(text: &str, decoded: &T) -> Option<String> {
    // Frames without any array cannot hold a positional message.
    if !text.contains('[') {
        return None;
    }
    let input = serde_json::from_str::<serde_json::Value>(text).ok()?;
    let decoded = serde_json::to_value(decoded).ok()?;
    let mut path = String::new();
    find_array_for_object(&input, &decoded, &mut path).then_some(path)
}

fn find_array_for_object(
    input: &serde_json::Value,
    decoded: &serde_json::Value,
    path: &mut String,
) -> bool {
    use serde_json::Value;
    match (input, decoded) {
        (Value::Array(_), Value::Object(_)) => true,
        (Value::Object(input), Value::Object(decoded)) => {
            for (key, value) in input {
                let Some(decoded) = decoded.get(key) else {
                    continue;
                };
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                if find_array_for_object(value, decoded, path) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        (Value::Array(input), Value::Array(decoded)) => {
            for (i, (value, decoded)) in input.iter().zip(decoded).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if find_array_for_object(value, decoded, path) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{self, client_frame::Request, server_frame::Event};

    fn send_frame() -> v1::ClientFrame {
        v1::ClientFrame {
            id: "r1".into(),
            request: Some(Request::Send(v1::SendRequest {
                conversation_id: "c1".into(),
                client_msg_id: "m1".into(),
                body: "hello".into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn json_shape_puts_the_request_next_to_the_id() {
        let Payload::Text(text) = encode(&send_frame(), Encoding::Json) else {
            panic!("json encodes to text");
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["id"], "r1");
        assert_eq!(v["send"]["conversation_id"], "c1");
        assert_eq!(v["send"]["body"], "hello");
    }

    #[test]
    fn both_encodings_round_trip() {
        for enc in [Encoding::Json, Encoding::Proto] {
            let payload = encode(&send_frame(), enc);
            let back: v1::ClientFrame = decode(&payload, enc).unwrap();
            assert_eq!(back, send_frame());
        }
    }

    #[test]
    fn minimal_json_with_missing_fields_decodes_with_defaults() {
        let f: v1::ClientFrame =
            decode_json(r#"{"id":"7","history":{"conversation_id":"c"}}"#).unwrap();
        let Some(Request::History(h)) = f.request else {
            panic!("expected history")
        };
        assert_eq!(h.limit, 0);
        assert_eq!(h.conversation_id, "c");
    }

    #[test]
    fn snake_case_names_for_multi_word_requests() {
        let f: v1::ClientFrame =
            decode_json(r#"{"id":"1","presence_watch":{"user_ids":["bob"]}}"#).unwrap();
        assert!(matches!(f.request, Some(Request::PresenceWatch(_))));
    }

    fn text(s: &str) -> Payload {
        Payload::Text(s.to_owned())
    }

    #[test]
    fn unknown_request_is_unknown_frame_with_id() {
        let e =
            decode_client_frame(&text(r#"{"id":"1","teleport":{}}"#), Encoding::Json).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownFrame);
        assert_eq!(e.id.as_deref(), Some("1"));
    }

    #[test]
    fn malformed_known_request_is_bad_frame_with_id() {
        let e = decode_client_frame(&text(r#"{"id":"9","send":{"body":5}}"#), Encoding::Json)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        assert_eq!(e.id.as_deref(), Some("9"));
        let e = decode_client_frame(&text("{not json"), Encoding::Json).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        assert_eq!(e.id, None);
        let e = decode_client_frame(&Payload::Binary(vec![1, 2]), Encoding::Json).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
    }

    #[test]
    fn malformed_requests_of_every_kind_are_bad_frame() {
        for name in REQUEST_NAMES {
            let text = format!(r#"{{"id":"5","{name}":7}}"#);
            let e = decode_client_frame(&Payload::Text(text), Encoding::Json).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadFrame, "{name}: {}", e.message);
            assert_eq!(e.id.as_deref(), Some("5"));
        }
        let e = decode_client_frame(
            &text(r#"{"id":"6","edit":{"conversation_id":"c","seq":"x"}}"#),
            Encoding::Json,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
    }

    #[test]
    fn arrays_are_refused_where_an_object_is_expected() {
        // serde would read these positionally as conversation_id, client_msg_id, body.
        let e = decode_client_frame(
            &text(r#"{"id":"3","send":["c1","m1","hello"]}"#),
            Encoding::Json,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        assert_eq!(e.id.as_deref(), Some("3"));
        assert!(e.message.contains("`send`"), "{}", e.message);
        let e = decode_client_frame(
            &text(r#"{"id":"4","presence_set":{"status_text":["x"]}}"#),
            Encoding::Json,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        let e = decode_client_frame(
            &text(r#"{"id":"5","sync":{"cursors":[{"conversation_id":"a"},["c1",5]]}}"#),
            Encoding::Json,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        assert!(e.message.contains("`sync.cursors[1]`"), "{}", e.message);
        let e = decode_client_frame(&text(r#"["4",{"ping":{}}]"#), Encoding::Json).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        // Arrays where the protocol has lists are fine.
        let f = decode_client_frame(
            &text(r#"{"id":"1","presence_watch":{"user_ids":["bob","carol"]}}"#),
            Encoding::Json,
        )
        .unwrap();
        assert!(matches!(f.request, Some(Request::PresenceWatch(_))));
    }

    #[test]
    fn json_objects_are_decoded_strictly() {
        let send: v1::SendRequest =
            decode_json_object(r#"{"conversation_id":"c1","body":"hi"}"#).unwrap();
        assert_eq!(send.body, "hi");
        let e = decode_json_object::<v1::SendRequest>(r#"["c1","m1","hi"]"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        let e = decode_json_object::<v1::SendRequest>("7").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        let e = decode_json_object::<v1::ConversationCreateRequest>(
            r#"{"kind":"group","members":"bob"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
    }

    #[test]
    fn request_names_cover_every_request_case() {
        use v1::client_frame::Request as R;
        let all = [
            R::Send(Default::default()),
            R::History(Default::default()),
            R::Sync(Default::default()),
            R::Read(Default::default()),
            R::Typing(Default::default()),
            R::PresenceSet(Default::default()),
            R::PresenceWatch(Default::default()),
            R::ConversationCreate(Default::default()),
            R::ConversationMembers(Default::default()),
            R::ConversationList(Default::default()),
            R::Ping(Default::default()),
            R::Edit(Default::default()),
            R::Delete(Default::default()),
            R::React(Default::default()),
            R::Thread(Default::default()),
            R::Receipts(Default::default()),
            R::ConversationUpdate(Default::default()),
            R::NotificationSet(Default::default()),
        ];
        assert_eq!(all.len(), REQUEST_NAMES.len());
        for (req, name) in all.into_iter().zip(REQUEST_NAMES) {
            let f = v1::ClientFrame {
                id: "x".into(),
                request: Some(req),
            };
            let v: serde_json::Value = serde_json::to_value(&f).unwrap();
            assert!(v.get(*name).is_some(), "{name} missing in {v}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed: u32 = 12345;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = decode_proto::<v1::ClientFrame>(&bytes);
            let _ = decode_json::<v1::ClientFrame>(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn ack_error_json_shape() {
        let frame = v1::ServerFrame {
            event: Some(Event::Ack(v1::Ack {
                id: "r1".into(),
                result: Some(v1::ack::Result::Error(v1::ErrorEvent {
                    code: "not_member".into(),
                    message: "no".into(),
                    ..Default::default()
                })),
            })),
        };
        let Payload::Text(text) = encode(&frame, Encoding::Json) else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["ack"]["id"], "r1");
        assert_eq!(v["ack"]["error"]["code"], "not_member");
    }
}
