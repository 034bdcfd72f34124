//! Helpers for kefu end-to-end tests (start the real binary on port 0, real clients); the tests live in `tests/tests/`.
