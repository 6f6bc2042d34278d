"""Running the stack natively (no Docker): the vLLM CPU server command, readiness waits, port checks
and process supervision (`processes`, `ports`), and two entry points: `python -m stack.serve`
(`make serve`: vLLM and the gateway) and `python -m stack.vllm` (`make vllm`: vLLM alone). Used by
the benchmarks and the integration tests too, so all of them start vLLM the same way as
`docker-compose.yml` does. Not part of the gateway image."""
