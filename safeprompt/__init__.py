"""The shared contract between training and serving a safety prompt; the bottom floor of the house.

`gateway/`, `trainer/` and `evaluation/` import this package and never each other:
- `artifact`: the trained soft prompt's on-disk format (safetensors + manifest) and its checks;
- `prompts`: the human safety prompts and the condition names (`none`, `default`, ...);
- `embeds`: the `<prompt_embeds>` sentinel, vLLM's prompt-embeds encoding and the safety system message;
- `judge`: the refusal judges (`python -m safeprompt.judge` judges JSONL answers);
- `postprocess`: the paper's answer post-processing;
- `sampling`: the paper's sampling settings, one typed model for the trainer's labels and the evaluation;
- `client`: the offline OpenAI-compatible streaming client (one SSE reader) of labels and evaluation;
- `queryfiles`: the query-file readers (CSV column, JSONL key, lines);
- `files`: atomic writes and hashes;
- `models`: where the embedded chat models and the tiny test models come from.
It imports nothing from the packages above it (tests/test_layers.py checks).
"""
