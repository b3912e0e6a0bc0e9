"""``qlora-kit export``: merge a trained adapter onto exactly what was trained, write it, prove it.

The data path, one module per step::

    rundir.read_run ─► source (base checkpoint headers, quantised-module layout)
                    ─► adapter (LoRA factors, scales)
                    ─► merge (NF4-exact base + adapter delta, streamed tensor by tensor)
                    ─► hf (safetensors shards, config, tokenizer)      --format hf (default)
                       gguf_file + gguf_vocab + modelfile (+ llamacpp)  --format gguf
                    ─► verify (HF) / verify_gguf (llama.cpp or transformers' GGUF loader)
                    ─► card (README model card, export_report.json; no local path: portable)
                    ─► publish (staging directory renamed into place)
                    ─► hub (--push-to-hub: huggingface_hub's create_repo + upload_folder)

``command.export_run`` runs it; ``monitor`` holds the progress bar and memory sampling;
``push.push_path`` (``qlora-kit push``) uploads a run's adapter or a finished export.

The package imports nothing itself (``import qlora_kit`` stays fast); called as a function,
``qlora_kit.export(run, out, ...)`` is the Python API (``qlora_kit.api.export``, see ``qlora_kit/__init__.py``).
"""
