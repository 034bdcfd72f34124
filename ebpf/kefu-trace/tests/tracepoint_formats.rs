//! The eBPF probes read the TCP tracepoints' fields at fixed offsets
//! (`ebpf/kefu-trace-ebpf/src/main.rs`, module `tp`; the io_uring probes are raw tracepoints
//! whose `struct io_kiocb` offsets come from BTF at attach time). This checks those offsets against the running kernel's format files, so a
//! kernel whose layout differs fails here instead of producing wrong data.

use kefu_trace::procfs::ensure_tracefs;

/// (group, event, field, offset, size) as the probes use them; keep in sync with `tp` there.
const FIELDS: &[(&str, &str, &str, usize, usize)] = &[
    ("sock", "inet_sock_set_state", "skaddr", 8, 8),
    ("sock", "inet_sock_set_state", "oldstate", 16, 4),
    ("sock", "inet_sock_set_state", "newstate", 20, 4),
    ("sock", "inet_sock_set_state", "sport", 24, 2),
    ("sock", "inet_sock_set_state", "dport", 26, 2),
    ("sock", "inet_sock_set_state", "family", 28, 2),
    ("sock", "inet_sock_set_state", "protocol", 30, 2),
    ("sock", "inet_sock_set_state", "saddr", 32, 4),
    ("sock", "inet_sock_set_state", "daddr", 36, 4),
    ("tcp", "tcp_retransmit_skb", "skaddr", 16, 8),
    ("tcp", "tcp_retransmit_skb", "state", 24, 4),
    ("tcp", "tcp_retransmit_skb", "sport", 28, 2),
    ("tcp", "tcp_retransmit_skb", "dport", 30, 2),
    ("tcp", "tcp_retransmit_skb", "family", 32, 2),
    ("tcp", "tcp_retransmit_skb", "saddr", 34, 4),
    ("tcp", "tcp_retransmit_skb", "daddr", 38, 4),
];

/// `field:<type> <name>[N];<TAB>offset:O;<TAB>size:S;` -> (name, offset, size).
fn parse_format(text: &str) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let parts: Vec<&str> = rest.split(';').map(str::trim).collect();
        if parts.len() < 3 {
            continue;
        }
        let decl = parts[0];
        let name = decl
            .rsplit(' ')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("")
            .to_string();
        let offset = parts[1]
            .strip_prefix("offset:")
            .and_then(|v| v.parse().ok());
        let size = parts[2].strip_prefix("size:").and_then(|v| v.parse().ok());
        if let (Some(offset), Some(size)) = (offset, size) {
            out.push((name, offset, size));
        }
    }
    out
}

#[test]
fn probe_offsets_match_this_kernel() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: reading tracepoint formats needs root (tracefs)");
        return;
    }
    ensure_tracefs().expect("tracefs");
    let root = if std::path::Path::new("/sys/kernel/tracing/events").exists() {
        "/sys/kernel/tracing/events"
    } else {
        "/sys/kernel/debug/tracing/events"
    };
    for &(group, event, field, offset, size) in FIELDS {
        let path = format!("{root}/{group}/{event}/format");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let fields = parse_format(&text);
        let found = fields.iter().find(|(n, _, _)| n == field);
        assert_eq!(
            found.map(|(_, o, s)| (*o, *s)),
            Some((offset, size)),
            "{group}:{event} field {field}"
        );
    }
}

#[test]
fn parses_format_lines() {
    let text = "name: x\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;\n";
    assert_eq!(
        parse_format(text),
        vec![
            ("common_type".to_string(), 0, 2),
            ("saddr".to_string(), 32, 4)
        ]
    );
}
