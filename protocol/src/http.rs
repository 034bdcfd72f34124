//! HTTP/1.1 request parsing (keep-alive and pipelining aware) and response writing.
