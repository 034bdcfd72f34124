-- wrk script for benches/scripts/durable_floor.py: every request is a small JSON POST,
-- so the durable_floor server logs and syncs each one before answering.
wrk.method = "POST"
wrk.body = '{"text":"hello from wrk"}'
wrk.headers["Content-Type"] = "application/json"
