#![no_main]
//! Fuzz target: every inbound model type parsed from arbitrary bytes must answer a value or a
//! precise error, never panic; whatever parses must write back to JSON that parses to the same
//! value. The borrowed parses of the send paths (`SendMessageRequestRef`, `ClientMessageRef`)
//! must accept, refuse and explain exactly like their owned types.
use kefu_protocol::model::{
    AgentStatusRequest, ClientMessage, ClientMessageRef, CreateConversationRequest, EventRecord,
    MessageRecord, MessagesPage, ModelLimits, SendMessageRequest, SendMessageRequestRef,
    ServerMessage, TransferRequest, WriteJson, parse_json, parse_json_borrowed,
};
/// Parse `$t` from the input; what parses must write back to JSON that parses to the same value.
/// (A macro rather than a generic function keeps serde out of this crate's dependencies.)
macro_rules! roundtrip {
    ($t:ty, $data:expr, $limits:expr) => {
        match parse_json::<$t>($data, $limits) {
            Ok(v) => {
                let text = v.to_json_vec();
                let back = parse_json::<$t>(&text, $limits).expect("written JSON parses back");
                assert_eq!(back, v);
            }
            Err(e) => {
                // The error renders (it becomes a 400 body).
                let _ = e.to_string();
            }
        }
    };
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = ModelLimits {
        // Small limits so the fuzzer reaches the size checks.
        text_bytes_max: 64,
        name_bytes_max: 16,
        client_msg_id_bytes_max: 8,
        id_bytes_max: 16,
        channel_bytes_max: 8,
        reason_bytes_max: 32,
        token_bytes_max: 32,
        page_entries_max: 4,
    };
    roundtrip!(ClientMessage, data, &limits);
    roundtrip!(ServerMessage, data, &limits);
    roundtrip!(CreateConversationRequest, data, &limits);
    roundtrip!(SendMessageRequest, data, &limits);
    roundtrip!(AgentStatusRequest, data, &limits);
    roundtrip!(TransferRequest, data, &limits);
    roundtrip!(MessagesPage, data, &limits);
    roundtrip!(MessageRecord, data, &limits);
    roundtrip!(EventRecord, data, &limits);

    let owned = parse_json::<SendMessageRequest>(data, &limits);
    let borrowed = parse_json_borrowed::<SendMessageRequestRef<'_>, SendMessageRequest>(data, &limits);
    match (&owned, &borrowed) {
        (Ok(o), Ok(b)) => {
            assert_eq!(o.text, b.text);
            assert_eq!(o.client_msg_id.as_deref(), b.client_msg_id.as_deref());
        }
        (Err(o), Err(b)) => assert_eq!(o.to_string(), b.to_string()),
        _ => panic!("owned {owned:?}, borrowed {borrowed:?}"),
    }
    let owned = parse_json::<ClientMessage>(data, &limits);
    let borrowed = parse_json_borrowed::<ClientMessageRef<'_>, ClientMessage>(data, &limits);
    match (&owned, borrowed) {
        (Ok(o), Ok(b)) => assert_eq!(o, &b.into_owned()),
        (Err(o), Err(b)) => assert_eq!(o.to_string(), b.to_string()),
        (_, b) => panic!("owned {owned:?}, borrowed {b:?}"),
    }
});
