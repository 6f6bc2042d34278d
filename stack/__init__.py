"""Running the stack natively (no Docker): the vLLM CPU server command, readiness waits and process
supervision. Used by `make serve`, the benchmarks and the integration tests, so all of them start
vLLM the same way as `docker-compose.yml` does. Not part of the gateway image."""
