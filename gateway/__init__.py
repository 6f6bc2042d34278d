"""DRO safety gateway: an OpenAI-compatible front for vLLM that serves safety prompts.

Importing this package is cheap and has no side effects; the FastAPI app is built by
`gateway.app.build_app(settings)`. `safeprompt.artifact`, `safeprompt.judge` and `safeprompt.prompts` are
also the shared definitions the offline trainer and evaluation import.
"""
