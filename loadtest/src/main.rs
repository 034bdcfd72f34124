//! `kefu-loadtest`: run one load scenario and print its report (see `--help`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: kefu-loadtest <scenario> [flags]

scenarios:
  http         any HTTP/1.1 server: --url http://127.0.0.1:PORT/PATH [--method GET] [--body S]
               [--header 'K: V']... [--expect-status N] [--compare wrk] [--rounds 3]
               [--min-rps N] [--max-p99-ms MS] [--min-ratio R]
  send         kefu message sends over HTTP: --http ADDR [--conversations 8192] [--open-s 10]
               [--rate-open R (default: --min-rps)] [--closed-s 5] [--min-rps 8900]
               [--max-p99-ms 11] [--compare wrk] [--rounds 3]
  chat         kefu WebSocket chat: --http ADDR --agent-token T... [--visitors 16]
               [--messages 20] [--interval-ms 250] [--max-p99-ms MS]
  connections  idle kefu WebSockets: --http ADDR [--count 10000] [--processes 2]
               [--sources 4] [--hold-s 10] [--ping-interval-ms 1000] [--gateway-pid PID]
  reconnect    kefu resume with `after`: --http ADDR [--subscribers 32] [--messages 30]
               [--interval-ms 250] [--drop-every 5]

generator flags (scenarios that send HTTP):
  --connections C (64)  --threads T (cores)  --rate R (open loop, total req/s; omit: closed)
  --duration-s S (10)  --requests-max N (100000000)  --timeout-ms MS (2000)
  --json PATH  --quiet (no progress line)

Targets are loopback only. Every run is bounded in time and count. Exit code: 0 all targets
met, 1 a target missed, 2 the run failed.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        None | Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            if args.is_empty() { 2 } else { 0 }
        }
        Some(name) => match kefu_loadtest::scenario::run(name, &args[1..]) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("kefu-loadtest: error: {e:#}");
                2
            }
        },
    };
    std::process::exit(code);
}
