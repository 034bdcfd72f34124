//! Benchmarks of the conversation model's JSON and of the binary protocol: encode and decode of
//! a typical chat message (WebSocket form, stored record, binary send), in ns per message and
//! bytes per second.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kefu_protocol::binproto::{self, BinLimits, ClientMsg};
use kefu_protocol::model::{
    ClientMessage, ConversationId, Event, EventRecord, Message, MessageRecord, ModelLimits,
    Participant, Role, ServerMessage, WriteJson, parse_json,
};

/// A typical chat line: 120 bytes with a quote and a non-ASCII character to escape/validate.
const TEXT: &str = "Hi, my order #4411 arrived damaged: the \"blue\" mug has a crack. Can you send a replacement? Merci — Ann (Lyon)";

fn record() -> MessageRecord {
    MessageRecord {
        tenant: "demo".into(),
        conversation_id: ConversationId::from_parts(1, 4242).expect("fits 48 bits"),
        seq: 17,
        ts: 1_732_579_200_000_000,
        from: Participant::new(Role::Visitor, "v00000000001092"),
        text: TEXT.into(),
        client_msg_id: Some("m-7f3a9c".into()),
    }
}

fn json_encode(c: &mut Criterion) {
    let rec = record();
    let msg = ServerMessage::Message(rec.to_message());
    let event = EventRecord {
        tenant: "demo".into(),
        conversation_id: rec.conversation_id,
        seq: 18,
        ts: rec.ts + 1,
        from: None,
        event: Event::Assigned {
            agent: "alice".into(),
            group: "support".into(),
        },
        opened: None,
    };
    let mut out = Vec::with_capacity(512);
    let mut g = c.benchmark_group("model_json_encode");
    g.throughput(Throughput::Bytes(msg.to_json_vec().len() as u64));
    g.bench_function("ws_message", |b| {
        b.iter(|| {
            out.clear();
            black_box(&msg).write_json(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("ws_message_from_record", |b| {
        b.iter(|| {
            out.clear();
            black_box(&rec).write_ws_json(&mut out);
            black_box(out.len())
        })
    });
    g.throughput(Throughput::Bytes(rec.to_json_vec().len() as u64));
    g.bench_function("message_record", |b| {
        b.iter(|| {
            out.clear();
            black_box(&rec).write_json(&mut out);
            black_box(out.len())
        })
    });
    g.throughput(Throughput::Bytes(event.to_json_vec().len() as u64));
    g.bench_function("event_record_assigned", |b| {
        b.iter(|| {
            out.clear();
            black_box(&event).write_json(&mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn json_decode(c: &mut Criterion) {
    let limits = ModelLimits::DEFAULT;
    let rec = record();
    let send = ClientMessage::Send {
        conversation_id: rec.conversation_id,
        text: TEXT.into(),
        client_msg_id: rec.client_msg_id.clone(),
    }
    .to_json_vec();
    let msg = ServerMessage::Message(Message {
        client_msg_id: None,
        ..rec.to_message()
    })
    .to_json_vec();
    let stored = rec.to_json_vec();

    let mut g = c.benchmark_group("model_json_decode");
    g.throughput(Throughput::Bytes(send.len() as u64));
    g.bench_function("ws_client_send", |b| {
        b.iter(|| black_box(parse_json::<ClientMessage>(black_box(&send), &limits).unwrap()))
    });
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("ws_server_message", |b| {
        b.iter(|| black_box(parse_json::<ServerMessage>(black_box(&msg), &limits).unwrap()))
    });
    g.throughput(Throughput::Bytes(stored.len() as u64));
    g.bench_function("message_record", |b| {
        b.iter(|| black_box(parse_json::<MessageRecord>(black_box(&stored), &limits).unwrap()))
    });
    g.finish();
}

fn binary(c: &mut Criterion) {
    let limits = BinLimits::default();
    let rec = record();
    let send = ClientMsg::Send {
        conversation_id: rec.conversation_id,
        client_msg_id: rec.client_msg_id.as_deref(),
        text: TEXT,
    };
    let mut bytes = Vec::new();
    binproto::encode_client(&send, 0, &mut bytes).expect("fits");
    let mut out = Vec::with_capacity(512);

    let mut g = c.benchmark_group("binproto");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("encode_send", |b| {
        b.iter(|| {
            out.clear();
            binproto::encode_client(black_box(&send), 0, &mut out).expect("fits");
            black_box(out.len())
        })
    });
    g.bench_function("decode_send", |b| {
        b.iter(|| {
            let (m, used) = binproto::decode_client(black_box(&bytes), &limits).unwrap();
            black_box((m, used))
        })
    });
    g.finish();
}

criterion_group!(benches, json_encode, json_decode, binary);
criterion_main!(benches);
