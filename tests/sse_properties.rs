//! Property tests for the SSE encoder: whatever the payload, a spec-following EventSource parser
//! (written here, independently of the gateway) sees exactly one event carrying it.

use proptest::prelude::*;
use ssehub::sse::{encode_event, event_type_of, Epoch};

/// One event as the WHATWG EventSource processing model dispatches it.
#[derive(Debug, PartialEq, Eq)]
struct Dispatched {
    event_type: String,
    data: String,
    last_event_id: String,
}

/// Parses a byte stream per <https://html.spec.whatwg.org/multipage/server-sent-events.html>.
fn parse_stream(bytes: &[u8]) -> Vec<Dispatched> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    let mut events = Vec::new();
    let (mut data, mut event_type, mut last_event_id) =
        (String::new(), String::new(), String::new());
    let mut rest = text;
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
        if line.is_empty() {
            if !data.is_empty() {
                data.pop(); // the trailing LF
                events.push(Dispatched {
                    event_type: if event_type.is_empty() {
                        "message".into()
                    } else {
                        event_type.clone()
                    },
                    data: data.clone(),
                    last_event_id: last_event_id.clone(),
                });
            }
            data.clear();
            event_type.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.find(':') {
            Some(at) => {
                let value = &line[at + 1..];
                (&line[..at], value.strip_prefix(' ').unwrap_or(value))
            }
            None => (line, ""),
        };
        match field {
            "event" => event_type = value.to_string(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => last_event_id = value.to_string(),
            _ => {}
        }
    }
    events
}

fn normalise_line_endings(payload: &str) -> String {
    payload.replace("\r\n", "\n").replace('\r', "\n")
}

/// Payloads rich in what breaks naive encoders.
fn payload() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("\r".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("\0".to_string()),
        Just(":".to_string()),
        Just("data: x".to_string()),
        Just("event: evil".to_string()),
        Just("id: 1".to_string()),
        Just(" ".to_string()),
        Just("é日本🎉".to_string()),
        "x{0,2000}".prop_map(|s| s),
        any::<String>(),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_payload_is_exactly_one_event_with_that_data(payload in payload(), seq in 1u64..u64::MAX) {
        let epoch = Epoch::random();
        let id = epoch.id(seq).to_string();
        let encoded = encode_event(epoch.id(seq), None, &payload);
        let events = parse_stream(&encoded);
        prop_assert_eq!(events, vec![Dispatched {
            event_type: "message".to_string(),
            data: normalise_line_endings(&payload),
            last_event_id: id,
        }]);
    }

    #[test]
    fn json_event_types_come_through_intact(
        event_type in "[^\r\n]{1,40}".prop_filter("reserved", |t| {
            !matches!(t.as_str(), "error" | "open") && !t.starts_with("gateway.")
        }),
        body in payload(),
    ) {
        let json = serde_json::json!({ "type": event_type, "body": body }).to_string();
        let detected = event_type_of(&json, "type");
        prop_assert_eq!(detected.as_deref(), Some(event_type.as_str()));
        let epoch = Epoch::random();
        let encoded = encode_event(epoch.id(1), detected.as_deref(), &json);
        let events = parse_stream(&encoded);
        prop_assert_eq!(events.len(), 1);
        prop_assert_eq!(&events[0].event_type, &event_type);
        prop_assert_eq!(&events[0].data, &json);
    }

    #[test]
    fn consecutive_events_never_merge(payloads in proptest::collection::vec(payload(), 1..8)) {
        let epoch = Epoch::random();
        let mut stream = Vec::new();
        for (n, payload) in payloads.iter().enumerate() {
            stream.extend_from_slice(&encode_event(epoch.id(n as u64 + 1), None, payload));
        }
        let events = parse_stream(&stream);
        let data: Vec<String> = events.into_iter().map(|e| e.data).collect();
        let expected: Vec<String> = payloads.iter().map(|p| normalise_line_endings(p)).collect();
        prop_assert_eq!(data, expected);
    }
}
